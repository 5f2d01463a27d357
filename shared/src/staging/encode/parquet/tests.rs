use super::*;

#[test]
fn dates_and_timestamps() {
    assert_eq!(parse_date("1970-01-01"), Some(0));
    assert_eq!(parse_date("2000-03-01"), Some(11_017));
    assert_eq!(
        parse_date("0001-01-01 BC"),
        Some(days_from_civil(0, 1, 1) as i32)
    );
    assert_eq!(parse_date("infinity"), Some(i32::MAX));
    assert_eq!(parse_date("2024-13-01"), None);
    assert_eq!(
        parse_timestamp("1970-01-01 00:00:01.5", false),
        Some(1_500_000)
    );
    assert_eq!(
        parse_timestamp("1970-01-02 00:00:00+00", true),
        Some(86_400_000_000)
    );
    assert_eq!(
        parse_timestamp("1970-01-02 00:00:00", true),
        None,
        "timestamptz needs its offset"
    );
    assert_eq!(parse_timestamp("-infinity", false), Some(i64::MIN));
    assert!(parse_timestamp("294247-01-01 00:00:00", false).is_some());
}

#[test]
fn decimals_scale_exactly() {
    assert_eq!(parse_decimal("12.34", 2), Some(1234));
    assert_eq!(parse_decimal("-0.5", 3), Some(-500));
    assert_eq!(parse_decimal("7", 2), Some(700));
    assert_eq!(parse_decimal("1.234", 2), None);
    assert_eq!(parse_decimal("1e5", 0), None);
}

#[test]
fn kinds_follow_the_type() {
    assert_eq!(
        kind_of(1700, ((12 << 16) | 2) + 4),
        Kind::Decimal {
            precision: 12,
            scale: 2
        }
    );
    assert_eq!(
        kind_of(1700, -1),
        Kind::Text,
        "unconstrained numeric stays text"
    );
    assert_eq!(
        kind_of(1700, ((50 << 16) | 2) + 4),
        Kind::Text,
        "precision above 38 stays text"
    );
    assert_eq!(kind_of(25, -1), Kind::Text);
}

#[test]
fn rows_encode_to_a_readable_file() {
    let cols = vec![
        "id".to_owned(),
        "f".to_owned(),
        "n".to_owned(),
        "t".to_owned(),
    ];
    let types = [(23, -1), (701, -1), (1700, ((5 << 16) | 2) + 4), (25, -1)];
    let mut enc = ParquetEncoder::new("s", "t", &cols, &types).unwrap();
    let row = |v: [Option<&str>; 4]| v.map(|f| f.map(|s| s.as_bytes().to_vec())).to_vec();
    enc.push_row(&row([Some("1"), Some("NaN"), Some("1.50"), Some("")]))
        .unwrap();
    enc.push_row(&row([Some("2"), Some("-Infinity"), Some("NaN"), None]))
        .unwrap();
    let err = enc
        .push_row(&row([Some("x"), None, None, None]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("s.t.id") && err.contains("int4"), "{err}");
    let mut bytes = enc.take_output();
    bytes.extend(enc.finish().unwrap());
    assert_eq!(&bytes[..4], b"PAR1");
    assert_eq!(&bytes[bytes.len() - 4..], b"PAR1");
}
