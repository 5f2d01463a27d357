//! Test harness support (see src/main.rs for the tests).
