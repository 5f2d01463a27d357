//! Connection strings as libpq reads them: `postgres://` URLs and `key=value` conninfo, the
//! `PG*` environment variables for what a string leaves out, and the password file
//! (`PGPASSFILE`, else `~/.pgpass`) when neither gives a password. Explicit settings win over
//! the environment, the environment over the defaults (host required, port 5432, user
//! `postgres`, database = user, `sslmode` `prefer`, or `verify-full` on an RDS/Aurora host).

use std::collections::HashMap;

use percent_encoding::percent_decode_str;
use secrecy::SecretString;

use super::{PgConfig, SslMode, parse_port, split_host_port};
use crate::error::{Error, Result};

/// The `PG*` variables and the password file's text a connection string is completed from.
#[derive(Default, Clone)]
pub struct LibpqEnv {
    vars: HashMap<String, String>,
    pgpass: Option<String>,
}

/// `PG*` variable → connection setting.
const ENV_KEYS: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGPORT", "port"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGDATABASE", "dbname"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGAPPNAME", "application_name"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
];

impl LibpqEnv {
    /// Nothing from outside (Lambdas, tests): the string alone decides.
    pub fn none() -> LibpqEnv {
        LibpqEnv::default()
    }

    /// From explicit variables and password-file text (tests).
    pub fn from_parts<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
        pgpass: Option<&str>,
    ) -> LibpqEnv {
        LibpqEnv {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            pgpass: pgpass.map(str::to_owned),
        }
    }

    /// This process's `PG*` variables and password file. As libpq does, a password file other
    /// users may read is not used (with a warning).
    pub fn from_process() -> LibpqEnv {
        let vars = ENV_KEYS
            .iter()
            .filter_map(|(k, _)| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
            .collect();
        let path = std::env::var_os("PGPASSFILE")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")));
        let pgpass = path.and_then(|p| read_pgpass(&p));
        LibpqEnv { vars, pgpass }
    }

    fn setting(&self, key: &str) -> Option<&str> {
        ENV_KEYS
            .iter()
            .find(|(_, k)| *k == key)
            .and_then(|(var, _)| self.vars.get(*var))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

fn read_pgpass(path: &std::path::Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).ok()?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "password file has group or world access; permissions should be u=rw (0600) or less: not used"
            );
            return None;
        }
    }
    std::fs::read_to_string(path).ok()
}

/// The settings a `postgres://` URL gives, in order (nothing filled in).
pub fn url_settings(url: &str, field: &str) -> Result<Vec<(String, String)>> {
    let bad = |reason: &str| Error::config(field, reason.to_owned());
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| bad("expected a postgres:// URL or secret:<arn>"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, p),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let decode = |s: &str, what: &str| -> Result<String> {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| bad(&format!("{what} is not valid percent-encoded UTF-8")))
    };
    let mut out = Vec::new();
    if let Some(ui) = userinfo {
        let (u, p) = match ui.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (ui, None),
        };
        let user = decode(u, "user")?;
        if !user.is_empty() {
            out.push(("user".to_owned(), user));
        }
        if let Some(p) = p {
            out.push(("password".to_owned(), decode(p, "password")?));
        }
    }
    if !hostport.is_empty() {
        let (host, port) = split_host_port(hostport).map_err(|r| bad(&r))?;
        if !host.is_empty() {
            out.push(("host".to_owned(), host));
        }
        if hostport.ends_with(&format!(":{port}")) {
            out.push(("port".to_owned(), port.to_string()));
        }
    }
    let dbname = decode(path, "database name")?;
    if !dbname.is_empty() {
        out.push(("dbname".to_owned(), dbname));
    }
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad(&format!("query parameter {pair:?} has no value")))?;
        out.push((k.to_owned(), decode(v, k)?));
    }
    Ok(out)
}

/// The settings of `key=value` conninfo (`host=db port=5432 dbname='my db'`; values quoted
/// with `'`, `\` escaping `'` and `\`).
pub fn conninfo_settings(text: &str, field: &str) -> Result<Vec<(String, String)>> {
    let bad = |reason: String| Error::config(field, reason);
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad(format!(
                "expected a postgres:// URL, key=value conninfo or secret:<arn>; {key:?} has no value"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(bad(format!("the value of {key} has no closing quote"))),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(bad(format!("the value of {key} ends in \\"))),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    match chars.next() {
                        Some(e) => value.push(e),
                        None => return Err(bad(format!("the value of {key} ends in \\"))),
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    if out.is_empty() {
        return Err(bad(
            "empty: give a postgres:// URL, key=value conninfo or secret:<arn>".to_owned(),
        ));
    }
    Ok(out)
}

/// Connection settings from explicit `settings`, completed from `env`.
pub fn build(settings: Vec<(String, String)>, field: &str, env: &LibpqEnv) -> Result<PgConfig> {
    let bad = |reason: String| Error::config(field, reason);
    let given = |key: &str| {
        settings
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| env.setting(key).map(str::to_owned))
    };
    let host = given("host").ok_or_else(|| bad("host is missing".to_owned()))?;
    if host.contains(',') {
        return Err(bad("multiple hosts are not supported".to_owned()));
    }
    if host.starts_with('/') {
        return Err(bad(format!(
            "host {host:?} is a Unix-domain socket folder; pgshift connects over TCP"
        )));
    }
    let port = match given("port") {
        Some(p) => parse_port(&p).map_err(bad)?,
        None => 5432,
    };
    let user = given("user").unwrap_or_else(|| "postgres".to_owned());
    let dbname = given("dbname").unwrap_or_else(|| user.clone());
    let mut cfg = PgConfig::new(host, port, user, dbname);
    cfg.sslmode = SslMode::for_host(&cfg.host, SslMode::Prefer);
    let mut keys: Vec<&str> = settings.iter().map(|(k, _)| k.as_str()).collect();
    for (_, key) in ENV_KEYS {
        if !keys.contains(key) && env.setting(key).is_some() {
            keys.push(key);
        }
    }
    for key in keys {
        if matches!(key, "host" | "port" | "user" | "dbname") {
            continue;
        }
        let value = given(key).unwrap_or_default();
        cfg.set_option(key, &value).map_err(bad)?;
    }
    if cfg.password.is_none()
        && let Some(text) = &env.pgpass
        && let Some(pw) = pgpass_lookup(text, &cfg.host, cfg.port, &cfg.dbname, &cfg.user)
    {
        cfg.password = Some(SecretString::from(pw));
    }
    Ok(cfg)
}

/// The password the password file gives `host:port:dbname:user` (`*` matches anything; `\`
/// escapes `:` and `\`; the first matching line wins; `#` lines are comments).
pub fn pgpass_lookup(
    text: &str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    let want = [host, port.as_str(), dbname, user];
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = vec![String::new()];
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(e) = chars.next() {
                        fields.last_mut()?.push(e);
                    }
                }
                ':' if fields.len() < 5 => fields.push(String::new()),
                c => fields.last_mut()?.push(c),
            }
        }
        if fields.len() != 5 {
            continue;
        }
        let matches = want
            .iter()
            .zip(&fields)
            .all(|(w, f)| f == "*" || f == w || (f == "localhost" && *w == "127.0.0.1"));
        if matches {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(vars: &[(&str, &str)], pgpass: Option<&str>) -> LibpqEnv {
        LibpqEnv::from_parts(vars.iter().copied(), pgpass)
    }

    #[test]
    fn environment_fills_what_the_string_leaves_out() {
        let e = env(
            &[
                ("PGHOST", "db.internal"),
                ("PGPORT", "6432"),
                ("PGUSER", "app"),
                ("PGPASSWORD", "from-env"),
                ("PGDATABASE", "orders"),
                ("PGSSLMODE", "require"),
                ("PGAPPNAME", "mine"),
            ],
            None,
        );
        let c = build(url_settings("postgres://", "s").unwrap(), "s", &e).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str(), c.dbname.as_str()),
            ("db.internal", 6432, "app", "orders")
        );
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "from-env");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name, "mine");
        // The string wins over the environment.
        let c = build(
            url_settings("postgres://u:p@h:7000/d?sslmode=disable", "s").unwrap(),
            "s",
            &e,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.user.as_str()), ("h", 7000, "u"));
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "p");
        assert_eq!(c.sslmode, SslMode::Disable);
        // Bad environment values are named errors.
        let e = env(&[("PGHOST", "h"), ("PGPORT", "x")], None);
        let err = build(url_settings("postgres://", "s").unwrap(), "--source", &e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--source") && err.contains("port"), "{err}");
    }

    #[test]
    fn conninfo_is_read_as_libpq_reads_it() {
        let s = conninfo_settings(
            r"host=db.example.com port=5433 dbname='my db' user=u password='it\'s' sslmode=verify-full",
            "s",
        )
        .unwrap();
        let c = build(s, "s", &LibpqEnv::none()).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.dbname.as_str()),
            ("db.example.com", 5433, "my db")
        );
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "it's");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        for (bad, want) in [
            ("host", "no value"),
            ("host='db", "closing quote"),
            ("host=h sslmod=require", "unknown connection parameter"),
            ("", "empty"),
            ("host=/var/run/postgresql", "Unix-domain socket"),
        ] {
            let err = conninfo_settings(bad, "--source")
                .and_then(|s| build(s, "--source", &LibpqEnv::none()))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("--source"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_password_file_gives_the_password_nothing_else_gave() {
        let file = "# comment\nother:5432:*:app:no\ndb.internal:6432:*:app:right\\:one\n*:*:*:*:fallback\n";
        let e = env(&[("PGHOST", "db.internal"), ("PGPORT", "6432")], Some(file));
        let c = build(
            url_settings("postgres://app@/orders", "s").unwrap(),
            "s",
            &e,
        )
        .unwrap();
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "right:one");
        let c = build(url_settings("postgres://bob@x/y", "s").unwrap(), "s", &e).unwrap();
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "fallback");
        // An explicit password is never replaced.
        let c = build(
            url_settings("postgres://app:given@db.internal:6432/o", "s").unwrap(),
            "s",
            &e,
        )
        .unwrap();
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "given");
        assert_eq!(
            pgpass_lookup("h:1:d:u", "h", 1, "d", "u"),
            None,
            "no password field"
        );
    }
}
