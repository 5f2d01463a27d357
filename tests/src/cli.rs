//! The `pgshift` command's conventions: completions and manual pages, -v/-q and JSON logs,
//! and flags a command would ignore refused with a usage error that names them.

use pgshift_tests::{TempDir, TestDb, run_cli};

#[test]
fn completions_and_manual_pages_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run_cli(&["completions", shell]);
        assert_eq!(code, Some(0), "{err}");
        for command in ["full-load", "cdc", "apply", "validate", "teardown"] {
            assert!(out.contains(command), "{shell} completion lacks {command}");
        }
        assert!(
            out.contains("max-batch-changes"),
            "{shell}: flags are completed"
        );
    }
    let (code, _, err) = run_cli(&["completions", "tcsh"]);
    assert_eq!(code, Some(2), "an unknown shell is a usage error");
    assert!(err.contains("tcsh"), "{err}");

    let (code, out, err) = run_cli(&["man"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(".TH pgshift 1"), "{out}");
    let dir = TempDir::new("man");
    let (code, _, err) = run_cli(&["man", "--out-dir", &dir.path().to_string_lossy()]);
    assert_eq!(code, Some(0), "{err}");
    let page = std::fs::read_to_string(dir.path().join("pgshift-full-load.1")).unwrap();
    assert!(page.contains(".TH pgshift-full-load"), "{page}");
    // Environment variables are documented with their flags.
    assert!(page.contains("PGSHIFT_SOURCE"), "{page}");
}

#[test]
fn flags_a_command_would_ignore_are_usage_errors() {
    let target = "postgres://u@127.0.0.1:1/db";
    let refused: &[(&[&str], &str)] = &[
        (
            &[
                "apply", "--task", "t", "--target", target, "--state", "/tmp/s",
            ],
            "--state",
        ),
        (
            &[
                "apply", "--task", "t", "--target", target, "--source", target,
            ],
            "--source",
        ),
        (
            &[
                "apply", "--task", "t", "--target", target, "--until", "0/1", "--format", "jsonl",
            ],
            "--format",
        ),
        (
            &[
                "apply",
                "--task",
                "t",
                "--target",
                target,
                "--interval",
                "5",
            ],
            "--interval",
        ),
        (
            &[
                "validate", "--task", "t", "--source", target, "--target", target, "--stage", "x",
            ],
            "--stage",
        ),
        (
            &[
                "cdc",
                "--task",
                "t",
                "--source",
                target,
                "--once",
                "--interval",
                "3",
            ],
            "--interval",
        ),
        (
            &[
                "teardown", "--task", "t", "--source", target, "--state", "/tmp/s", "--yes",
            ],
            "--state",
        ),
    ];
    for (args, flag) in refused {
        let (code, out, err) = run_cli(args);
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert!(err.contains(flag), "{args:?} must name {flag}: {err}");
    }
    // The same settings from the environment are not errors (one environment serves every
    // command): this apply fails on the unreachable target, not on PGSHIFT_STATE.
    let out = std::process::Command::new(pgshift_tests::pgshift_bin())
        .args([
            "apply",
            "--task",
            "t",
            "--target",
            target,
            "--stage",
            "/nonexistent/stage",
        ])
        .env("PGSHIFT_STATE", "/tmp/s")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("PGSHIFT_STATE") && !err.contains("--state"),
        "{err}"
    );
}

#[tokio::test]
async fn verbosity_and_json_logs() {
    let db = TestDb::new("cli_logs").await;
    db.client()
        .await
        .batch_execute(
            "create table public.a (id int primary key); insert into public.a values (1)",
        )
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());
    let dir = TempDir::new("cli-logs");
    let path = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let (stage, state) = (path("stage"), path("state"));
    let common = [
        "--task", "logs", "--stage", &stage, "--state", &state, "--source", &url,
    ];
    let (code, out, err) = run_cli(&[&["full-load", "--cdc"][..], &common].concat());
    assert_eq!(code, Some(0), "{out}{err}");

    // -v --log-format json: info lines, each a JSON object with a level and the poll's fields.
    let (code, out, err) = run_cli(
        &[
            &["-v", "--log-format", "json", "cdc", "--once"][..],
            &common,
        ]
        .concat(),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["task"] == "logs"),
        "{err}"
    );
    // -q: nothing below errors; no colour codes when not a terminal.
    let (code, out, err) = run_cli(&[&["-q", "cdc", "--once"][..], &common].concat());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.trim().is_empty(), "{err}");
    let (code, _, err) = run_cli(&[&["-v", "cdc", "--once"][..], &common].concat());
    assert_eq!(code, Some(0));
    assert!(err.contains("INFO") && !err.contains('\u{1b}'), "{err}");
    let _ = run_cli(&["teardown", "--task", "logs", "--source", &url, "--yes"]);
}
