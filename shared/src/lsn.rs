//! WAL positions.
//!
//! An [`Lsn`] is PostgreSQL's 64-bit WAL location, shown as `X/Y` (two hexadecimal halves,
//! upper-case, no padding), exactly as `pg_current_wal_lsn()` prints it. It is a newtype so a
//! position is never confused with a count or a byte size. Parsing is strict: two non-empty hex
//! halves of at most 8 digits each, nothing else. Object keys use [`Lsn::key_hex`], 16
//! zero-padded digits, so keys sort in LSN order.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PostgreSQL WAL location (`pg_lsn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`: no position.
    pub const ZERO: Lsn = Lsn(0);

    /// The 16-digit zero-padded upper-case hex form used in object keys.
    pub fn key_hex(self) -> String {
        format!("{:016X}", self.0)
    }

    /// Parses the 16-digit form written by [`Lsn::key_hex`].
    pub fn from_key_hex(s: &str) -> Result<Lsn, LsnParseError> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(LsnParseError(s.chars().take(40).collect()));
        }
        u64::from_str_radix(s, 16)
            .map(Lsn)
            .map_err(|_| LsnParseError(s.to_owned()))
    }

    /// Bytes from `earlier` to `self`, zero when `earlier` is ahead.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Text that is not an `X/Y` WAL location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal halves like 16/B374D848")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.chars().take(40).collect());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(h, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where CDC staging stops (DMS's `CdcStopPosition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopPosition {
    /// Transactions whose commit ends at or before this WAL position are staged, none after.
    Lsn(Lsn),
    /// Transactions committed at or before this time (µs since 2000-01-01 UTC, the source's
    /// commit timestamps) are staged; staging stops before the first one committed after it.
    CommitTime(i64),
}

impl fmt::Display for StopPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopPosition::Lsn(l) => write!(f, "{l}"),
            StopPosition::CommitTime(t) => write!(
                f,
                "commit_time:{}Z",
                crate::change::format_pg_timestamp(*t, 'T')
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_postgres_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!("ffffffff/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "g/1",
            "1/ 2",
            "+1/2",
            "123456789/0",
            "-1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn key_hex_sorts_like_lsn() {
        let a = Lsn(0x1_0000_0000);
        let b = Lsn(0xFFFF_FFFF);
        assert!(b < a);
        assert!(b.key_hex() < a.key_hex());
        assert_eq!(Lsn::from_key_hex(&a.key_hex()).unwrap(), a);
        assert!(Lsn::from_key_hex("xyz").is_err());
    }

    #[test]
    fn serde_uses_text_form() {
        let json = serde_json::to_string(&Lsn(0x1_0000_00FF)).unwrap();
        assert_eq!(json, "\"1/FF\"");
        let back: Lsn = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Lsn(0x1_0000_00FF));
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(v in any::<u64>()) {
            let lsn = Lsn(v);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
            prop_assert_eq!(Lsn::from_key_hex(&lsn.key_hex()).unwrap(), lsn);
        }

        #[test]
        fn parse_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Lsn>();
        }
    }
}
