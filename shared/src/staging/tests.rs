//! Unit tests of the sinks.

use super::*;

#[test]
fn keys_are_checked() {
    for bad in ["", "/a", "a//b", "a/../b", "./a", "a/"] {
        assert!(check_key(bad).is_err(), "{bad:?}");
    }
    assert!(check_key("public/t/cdc/0000000001000000.csv").is_ok());
}

#[test]
fn s3_urls() {
    assert_eq!(
        parse_s3_url("s3://my-bucket/a/b/").unwrap(),
        ("my-bucket".into(), "a/b".into())
    );
    assert_eq!(
        parse_s3_url("s3://my-bucket").unwrap(),
        ("my-bucket".into(), "".into())
    );
    assert!(parse_s3_url("http://x").is_err());
    assert!(
        parse_s3_url("s3://My_Bucket/x")
            .unwrap_err()
            .to_string()
            .contains("bucket name")
    );
}
