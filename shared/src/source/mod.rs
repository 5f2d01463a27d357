//! The PostgreSQL source: connecting, the catalog, and the endpoint checks.

pub mod catalog;
pub mod checks;
pub mod connect;
pub mod slot;

pub use catalog::{ServerInfo, TableInfo};
pub use connect::connect;

/// Quotes an identifier the way `quote_ident` does, always (so case and odd characters survive).
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for ch in name.chars() {
        if ch == '"' {
            out.push('"');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

/// `"schema"."table"`.
pub fn quote_qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_every_identifier() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident("Table1"), "\"Table1\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_qualified("s.x", "t y"), "\"s.x\".\"t y\"");
    }
}
