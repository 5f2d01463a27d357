//! The `pgshift` command's conventions: completions and manual pages, -v/-q and JSON logs,
//! and flags a command would ignore refused with a usage error that names them.

use pgshift_tests::{CliTask, TempDir, TestDb, run_cli};

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
fn help_teaches_with_examples_and_environment_variables() {
    for command in [
        "test-endpoint",
        "full-load",
        "apply",
        "validate",
        "cutover",
        "status",
        "cdc",
        "teardown",
    ] {
        let (code, out, err) = run_cli(&[command, "--help"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(
            out.contains("Examples:\n  pgshift "),
            "{command} --help has no examples: {out}"
        );
        assert!(
            out.contains("[env: PGSHIFT_TASK=]") || command == "test-endpoint",
            "{command}: {out}"
        );
    }
    let (_, out, _) = run_cli(&["full-load", "--help"]);
    assert!(
        out.contains("parquet") && out.contains("[env: PGSHIFT_S3_SETTINGS=]"),
        "{out}"
    );
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
    let task = CliTask::new("logs", &db.config(), &db.config());
    let url = task.src.clone();
    let (code, out, err) = task.run(&["full-load", "--cdc", "--source", &url]);
    assert_eq!(code, Some(0), "{out}{err}");

    // -v --log-format json: info lines, each a JSON object with a level and the poll's fields.
    let (code, out, err) = task.run(&[
        "-v",
        "--log-format",
        "json",
        "cdc",
        "--once",
        "--source",
        &url,
    ]);
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
    let (code, out, err) = task.run(&["-q", "cdc", "--once", "--source", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.trim().is_empty(), "{err}");
    let (code, _, err) = task.run(&["-v", "cdc", "--once", "--source", &url]);
    assert_eq!(code, Some(0));
    assert!(err.contains("INFO") && !err.contains('\u{1b}'), "{err}");
    let _ = run_cli(&["teardown", "--task", "logs", "--source", &url, "--yes"]);
}

/// Connections as libpq users write them: conninfo, `PG*` variables for what a string leaves
/// out, the password from a private password file (a readable one is not used); the password
/// never needs to be in argv.
#[tokio::test]
async fn connections_read_conninfo_pg_variables_and_the_password_file() {
    use secrecy::ExposeSecret;
    let db = TestDb::new("cli_libpq").await;
    let cfg = db.config();
    let password = cfg.password.as_ref().unwrap().expose_secret().to_owned();
    let dir = TempDir::new("cli-libpq");
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "# pgshift test\n{}:{}:*:{}:{}\n",
            cfg.host, cfg.port, cfg.user, password
        ),
    )
    .unwrap();
    let run = |source: &str, vars: &[(&str, String)]| {
        let mut cmd = std::process::Command::new(pgshift_tests::pgshift_bin());
        cmd.args(["test-endpoint", "--json", "--source", source]);
        for k in [
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGPASSWORD",
            "PGDATABASE",
            "PGSSLMODE",
            "PGPASSFILE",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let report: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        (out.status.code(), report, err)
    };
    let private = |p: &std::path::Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    private(&pgpass, 0o600);
    let conninfo = format!(
        "host={} port={} user={} dbname='{}' sslmode=disable",
        cfg.host, cfg.port, cfg.user, db.name
    );
    let file = ("PGPASSFILE", pgpass.to_string_lossy().into_owned());
    let (code, report, err) = run(&conninfo, std::slice::from_ref(&file));
    let report = report.unwrap_or_else(|| panic!("{err}"));
    assert!(report["connection_failure"].is_null(), "{report:#}");
    assert_eq!(report["server"]["database"], db.name.as_str());
    assert_ne!(code, Some(2), "{err}");

    // Everything from PG* variables: `postgres://` alone.
    let vars = [
        ("PGHOST", cfg.host.clone()),
        ("PGPORT", cfg.port.to_string()),
        ("PGUSER", cfg.user.clone()),
        ("PGPASSWORD", password.clone()),
        ("PGDATABASE", db.name.clone()),
        ("PGSSLMODE", "disable".to_owned()),
    ];
    let (_, report, err) = run("postgres://", &vars);
    let report = report.unwrap_or_else(|| panic!("{err}"));
    assert!(report["connection_failure"].is_null(), "{report:#}");
    assert_eq!(report["server"]["database"], db.name.as_str());

    // A password file others may read is not used: authentication fails.
    private(&pgpass, 0o644);
    let (_, report, err) = run(&conninfo, std::slice::from_ref(&file));
    let report = report.unwrap_or_else(|| panic!("{err}"));
    assert_eq!(report["connection_failure"], "auth", "{report:#}");
    assert!(err.contains("password file"), "{err}");

    // Malformed conninfo is a usage error naming the flag, without the password.
    let (code, _, err) = run("host=h password=hunter2 sslmod=require", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--source") && err.contains("sslmod") && !err.contains("hunter2"),
        "{err}"
    );
}

/// `--profile` picks a profile of the AWS config file, `credential_process` profiles included
/// (aws-config's SSO and process providers are in the command): a secret is read with its
/// credentials, and a profile whose process fails is an error naming the profile.
#[tokio::test]
async fn aws_profiles_with_credential_process() {
    use secrecy::ExposeSecret;
    let _ = pgshift_tests::env("AWS_ENDPOINT_URL");
    let db = TestDb::new("cli_profile").await;
    let cfg = db.config();
    let aws = pgshift::aws::Aws::from_env().await;
    let arn = aws
        .secrets()
        .create_secret()
        .name(pgshift_tests::unique_name("pgshift/profile"))
        .secret_string(
            serde_json::json!({"host": cfg.host, "port": cfg.port, "username": cfg.user,
                "password": cfg.password.as_ref().unwrap().expose_secret(), "dbname": db.name,
                "sslmode": "disable"})
            .to_string(),
        )
        .send()
        .await
        .unwrap()
        .arn()
        .unwrap()
        .to_owned();
    let dir = TempDir::new("cli-profile");
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        "[profile by-process]\nregion = us-east-1\ncredential_process = printf '{\"Version\":1,\"AccessKeyId\":\"testing\",\"SecretAccessKey\":\"testing\"}'\n\n\
         [profile broken]\nregion = us-east-1\ncredential_process = false\n",
    )
    .unwrap();
    let run = |profile: &str| {
        let out = std::process::Command::new(pgshift_tests::pgshift_bin())
            .args(["--profile", profile, "test-endpoint", "--json", "--source"])
            .arg(format!("secret:{arn}"))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", &config)
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (_, out, err) = run("by-process");
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(report["server"]["database"], db.name.as_str(), "{report:#}");
    let (code, out, err) = run("broken");
    assert_ne!(code, Some(0), "{out}");
    assert!(
        err.contains("secretsmanager") || err.contains("credential"),
        "{err}"
    );
}

/// `cdc --follow` survives a source that is down: it says so, and tries again later, longer
/// each time; a one-off `--once` run fails at once instead.
#[test]
fn follow_backs_off_through_transient_failures() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener); // nothing listens there now: connections are refused
    let dir = TempDir::new("cli-follow");
    let path = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let source = format!("postgres://u:p@127.0.0.1:{port}/db?sslmode=disable");
    let common = [
        "--task",
        "down",
        "--source",
        &source,
        "--stage",
        &path("stage"),
        "--state",
        &path("state"),
    ];
    let (code, _, err) = run_cli(&[&["cdc", "--once"][..], &common].concat());
    assert_eq!(code, Some(1), "{err}");
    let mut child = std::process::Command::new(pgshift_tests::pgshift_bin())
        .args([&["cdc", "--follow", "--interval", "1"][..], &common].concat())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3800));
    let alive = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(alive, "--follow exited on a transient failure: {err}");
    assert!(
        err.contains("trying again in 1 s") && err.contains("trying again in 2 s"),
        "{err}"
    );
    assert!(err.contains("2 in a row"), "{err}");
    assert!(!err.contains(":p@"), "{err}");
}

/// `cdc --stop-position X/Y` (DMS's `CdcStopPosition`): transactions committed before it are
/// staged, none after, and the task rests there until the position is lifted.
#[tokio::test]
async fn cdc_stops_at_the_stop_position() {
    let db = TestDb::new("cli_stop").await;
    let c = db.client().await;
    c.batch_execute("create table public.s (id int primary key)")
        .await
        .unwrap();
    let task = CliTask::new("stop", &db.config(), &db.config());
    let url = task.src.clone();
    let poll = |extra: &[&str]| {
        let (code, out, err) =
            task.run(&[&["cdc", "--once", "--json", "--source", &url][..], extra].concat());
        assert_eq!(code, Some(0), "{out}{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    poll(&[]); // the task's slot, from here on
    c.batch_execute("insert into public.s values (1), (2), (3)")
        .await
        .unwrap();
    let stop: String = c
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute("insert into public.s values (4), (5)")
        .await
        .unwrap();
    let first = poll(&["--stop-position", &stop]);
    assert_eq!(first["changes"], 3, "{first:#}");
    assert_eq!(first["stopped_at"], stop.as_str(), "{first:#}");
    let again = poll(&["--stop-position", &stop]);
    assert_eq!(again["changes"], 0, "{again:#}");
    let rest = poll(&[]);
    assert_eq!(rest["changes"], 2, "{rest:#}");
    assert!(rest.get("stopped_at").is_none(), "{rest:#}");

    for (bad, why) in [
        ("server_time:2026-12-02T10:00:00", "server_time"),
        ("commit_time:2026-12-02", "not a time"),
        ("0/XYZ", "not a WAL position"),
    ] {
        let (code, _, err) = task.run(&["cdc", "--once", "--source", &url, "--stop-position", bad]);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("--stop-position") && err.contains(why),
            "{err}"
        );
    }
    let _ = run_cli(&["teardown", "--task", "stop", "--source", &url, "--yes"]);
}

/// `cdc --stop-position commit_time:T` (DMS's `CdcStopPosition` by commit time): the
/// transactions the source committed at or before T are staged, the first one after it and
/// everything later are not; the task rests there — later polls with the same stop decode
/// nothing — until the stop is lifted.
#[tokio::test]
async fn cdc_stops_at_a_commit_time() {
    let db = TestDb::new("cli_stop_time").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.s (id int primary key); create table public.other (id int)",
    )
    .await
    .unwrap();
    let task = CliTask::new("stoptime", &db.config(), &db.config());
    let url = task.src.clone();
    let poll = |extra: &[&str]| {
        let (code, out, err) =
            task.run(&[&["cdc", "--once", "--json", "--source", &url][..], extra].concat());
        assert_eq!(code, Some(0), "{out}{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    poll(&[]); // the task's slot, from here on
    // One transaction per statement (a multi-statement string would be one).
    for sql in [
        "insert into public.s values (1), (2)",
        "insert into public.s values (3)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    // The source's clock between the commits, with an offset to show it is honoured.
    let time: String = c
        .query_one(
            "select to_char(clock_timestamp() at time zone 'Asia/Kolkata', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+05:30'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for sql in [
        "select pg_sleep(0.05)",
        "insert into public.other values (0)",
        "insert into public.s values (4)",
        "insert into public.s values (5)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let stop = format!("commit_time:{time}");
    let first = poll(&["--stop-position", &stop]);
    assert_eq!(first["changes"], 3, "{first:#}");
    assert_eq!(first["transactions"], 2, "{first:#}");
    let at = first["stopped_at"]
        .as_str()
        .unwrap_or_else(|| panic!("{first:#}"));
    assert_eq!(first["checkpoint"], at, "{first:#}");
    // Resting: no decoding past the stop, the same position reported.
    let again = poll(&["--stop-position", &stop]);
    assert_eq!(again["changes"], 0, "{again:#}");
    assert_eq!(again["peeks"], 0, "{again:#}");
    assert_eq!(again["stopped_at"], at, "{again:#}");
    // A later stop time moves on to it: 4 and 5 were committed before now.
    let now: String = c
        .query_one(
            "select to_char(clock_timestamp() at time zone 'utc', 'YYYY-MM-DD HH24:MI:SS.US')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let later = poll(&["--stop-position", &format!("commit_time:{now}")]);
    assert_eq!(later["changes"], 3, "{later:#}");
    assert_eq!(later["transactions"], 3, "{later:#}");
    // (Whether it rests already depends on whether anything — pgshift's own bookkeeping
    // included — committed in this database after `now`: either is right.)
    c.batch_execute("insert into public.s values (6)")
        .await
        .unwrap();
    let rest = poll(&[]);
    assert_eq!(rest["changes"], 1, "{rest:#}");
    let _ = run_cli(&["teardown", "--task", "stoptime", "--source", &url, "--yes"]);
}

/// DMS's `S3Settings` JSON (`--s3-settings file://s3.json`): the bucket and folder become the
/// stage, DataFormat + CompressionType the format; a setting pgshift does not honour is a usage
/// error naming it.
#[tokio::test]
async fn dms_s3_settings_choose_the_stage_and_format() {
    let _ = pgshift_tests::env("AWS_ENDPOINT_URL");
    let db = TestDb::new("cli_s3s").await;
    db.client()
        .await
        .batch_execute("create table public.t (id int primary key); insert into public.t select generate_series(1, 100)")
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());
    let aws = pgshift::aws::Aws::from_env().await;
    let bucket = pgshift_tests::emulator_bucket(&aws, "pgshift-s3s").await;
    let dir = TempDir::new("cli-s3s");
    let settings = dir.path().join("s3.json");
    std::fs::write(
        &settings,
        serde_json::json!({"BucketName": bucket, "BucketFolder": "dms/orders",
            "DataFormat": "csv", "CompressionType": "GZIP", "CsvDelimiter": ",",
            "IncludeOpForFullLoad": true,
            "ServiceAccessRoleArn": "arn:aws:iam::123456789012:role/dms-s3"})
        .to_string(),
    )
    .unwrap();
    let state = dir.path().join("state").to_string_lossy().into_owned();
    let file = format!("file://{}", settings.display());
    let load = |task: &str| {
        run_cli(&[
            "full-load",
            "--task",
            task,
            "--source",
            &url,
            "--state",
            &state,
            "--s3-settings",
            &file,
        ])
    };
    let (code, out, err) = load("s3s");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("ServiceAccessRoleArn is not used"), "{err}");
    let sink =
        pgshift::staging::S3Sink::new(aws.s3(), &format!("s3://{bucket}/dms/orders")).unwrap();
    let keys = pgshift::staging::ObjectSink::list(&sink, "public/t/")
        .await
        .unwrap();
    let loads: Vec<_> = keys.iter().filter(|k| k.contains("/LOAD")).collect();
    assert!(
        !loads.is_empty() && loads.iter().all(|k| k.ends_with(".csv.gz")),
        "{keys:?}"
    );
    // IncludeOpForFullLoad: every load row starts with `I`, as DMS writes it; apply reads
    // the rows without it.
    let mut ids = Vec::new();
    for key in &loads {
        let body = pgshift::staging::ObjectSink::get(&sink, key)
            .await
            .unwrap()
            .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text)
            .unwrap();
        for line in text.lines() {
            let id = line
                .strip_prefix("I,")
                .unwrap_or_else(|| panic!("{key}: {line:?}"));
            ids.push(id.parse::<i32>().unwrap());
        }
    }
    ids.sort();
    assert_eq!(ids, (1..=100).collect::<Vec<_>>());
    let target = TestDb::new("cli_s3s_dst").await;
    let applied = pgshift::job::apply::run(&sink, &target.config(), "s3s")
        .await
        .unwrap();
    assert!(applied.load_applied, "{applied:?}");
    let loaded: i64 = target
        .client()
        .await
        .query_one(
            "select count(*) from public.t where id between 1 and 100",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(loaded, 100);

    std::fs::write(&settings, r#"{"DataFormat": "csv", "CdcPath": "changes"}"#).unwrap();
    let (code, _, err) = load("s3s2");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("S3Settings.CdcPath"), "{err}");

    // SSE_KMS with a key: every object pgshift writes (chunks, manifests, schema versions)
    // is encrypted with that key, whatever the bucket's default.
    let key_arn = "arn:aws:kms:us-east-1:123456789012:key/0b9c4f6e-5a38-4e44-9a5d-3f0e2b8f7a11";
    std::fs::write(
        &settings,
        serde_json::json!({"BucketName": bucket, "BucketFolder": "dms/kms",
            "EncryptionMode": "SSE_KMS", "ServerSideEncryptionKmsKeyId": key_arn})
        .to_string(),
    )
    .unwrap();
    let (code, out, err) = load("s3s3");
    assert_eq!(code, Some(0), "{out}{err}");
    let s3 = aws.s3();
    let listed = s3
        .list_objects_v2()
        .bucket(&bucket)
        .prefix("dms/kms/")
        .send()
        .await
        .unwrap();
    let keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    assert!(keys.iter().any(|k| k.contains("/LOAD")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("_manifests/")), "{keys:?}");
    for key in &keys {
        let head = s3
            .head_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.server_side_encryption(),
            Some(&aws_sdk_s3::types::ServerSideEncryption::AwsKms),
            "{key}"
        );
        assert_eq!(head.ssekms_key_id(), Some(key_arn), "{key}");
    }
    // A key without SSE_KMS is a usage error naming it; SSE_KMS on a folder stage too.
    let (code, _, err) = run_cli(&[
        "full-load",
        "--task",
        "s3s4",
        "--source",
        &url,
        "--state",
        &state,
        "--s3-settings",
        &format!(r#"{{"ServerSideEncryptionKmsKeyId": "{key_arn}"}}"#),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("S3Settings.ServerSideEncryptionKmsKeyId"),
        "{err}"
    );
    let (code, _, err) = run_cli(&[
        "full-load",
        "--task",
        "s3s5",
        "--source",
        &url,
        "--state",
        &state,
        "--s3-settings",
        r#"{"EncryptionMode": "SSE_KMS"}"#,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("S3Settings.EncryptionMode"), "{err}");
}

/// DMS's `CsvDelimiter`, `CsvNullValue` and `CsvRowDelimiter` (with `AddColumnName` and
/// `DatePartitionEnabled`, all through `--s3-settings`): the load chunks and CDC files are
/// staged in that dialect, NULL kept apart from the empty string and from the text `NULL`, a
/// value holding the delimiter, a quote or a line break quoted; `apply` reads them back and
/// the target equals the source.
#[tokio::test]
async fn dms_csv_dialect_is_staged_as_asked_and_applied_back() {
    let source = TestDb::new("cli_dialect_src").await;
    let target = TestDb::new("cli_dialect_dst").await;
    let c = source.client().await;
    c.batch_execute(
        "create table public.d (id int primary key, a text, b text, n int);
         insert into public.d values (1, null, 'NULL', 7), (2, '', 'x|y', null), (3, 'q\"q', E'l1\\nl2', 5);",
    )
    .await
    .unwrap();
    let task = CliTask::new("dialect", &source.config(), &target.config());
    let src = task.src.clone();
    let stage = std::path::PathBuf::from(task.common()[3]);
    let dir = TempDir::new("cli-dialect");
    let settings = dir.path().join("s3.json");
    std::fs::write(
        &settings,
        serde_json::json!({"CsvDelimiter": "|", "CsvNullValue": "NULL",
            "CsvRowDelimiter": "\\r\\n", "AddColumnName": true, "DatePartitionEnabled": true})
        .to_string(),
    )
    .unwrap();
    let s3 = format!("file://{}", settings.display());
    let (code, out, err) =
        task.run(&["full-load", "--source", &src, "--cdc", "--s3-settings", &s3]);
    assert_eq!(code, Some(0), "{out}{err}");
    let chunk = std::fs::read_to_string(stage.join("public/d/LOAD00000001.csv")).unwrap();
    assert_eq!(
        chunk,
        "id|a|b|n\r\n1|NULL|\"NULL\"|7\r\n2|\"\"|\"x|y\"|NULL\r\n3|\"q\"\"q\"|\"l1\nl2\"|5\r\n"
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stage.join("_manifests/load/public.d.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["csv"],
        serde_json::json!({"delimiter": "|", "null_value": "NULL", "row_delimiter": "\r\n"})
    );

    c.batch_execute(
        "insert into public.d values (4, null, 'NULL', null);
         update public.d set a = 'a|b' where id = 1;
         delete from public.d where id = 3;",
    )
    .await
    .unwrap();
    let (code, out, err) = task.run(&["cdc", "--source", &src, "--once", "--s3-settings", &s3]);
    assert_eq!(code, Some(0), "{out}{err}");
    // public/d/cdc/<yyyy>/<mm>/<dd>/<C>.csv: the date folders came through --s3-settings too.
    let mut files = Vec::new();
    let mut dirs = vec![stage.join("public/d/cdc")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert_eq!(files.len(), 1, "{files:?}");
    let rel = files[0].strip_prefix(stage.join("public/d/cdc")).unwrap();
    let folders: Vec<String> = rel
        .parent()
        .unwrap()
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert!(
        folders.len() == 3
            && folders
                .iter()
                .all(|f| f.bytes().all(|b| b.is_ascii_digit())),
        "{rel:?}"
    );
    let cdc = std::fs::read_to_string(&files[0]).unwrap();
    let rows: Vec<&str> = cdc.split_inclusive("\r\n").collect();
    assert_eq!(
        rows,
        [
            "Op|id|a|b|n|unchanged_toast\r\n",
            "I|4|NULL|\"NULL\"|NULL|NULL\r\n",
            "U|1|\"a|b\"|\"NULL\"|7|NULL\r\n",
            // A delete carries its key (REPLICA IDENTITY DEFAULT).
            "D|3|NULL|NULL|NULL|NULL\r\n",
        ],
        "{cdc:?}"
    );

    let out = task.apply_and_validate();
    assert!(out.contains("EQUAL public.d"), "{out}");
    let nulls: i64 = target
        .client()
        .await
        .query_one(
            "select count(*) from public.d where (id = 4 and a is null and b = 'NULL' and n is null) or (id = 2 and a = '' and n is null)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(nulls, 2);

    for (bad, why) in [
        (r#"{"CsvDelimiter": "||"}"#, "S3Settings.CsvDelimiter"),
        (
            r#"{"CsvNullValue": "a|b", "CsvDelimiter": "|"}"#,
            "S3Settings.CsvNullValue",
        ),
        (r#"{"CsvRowDelimiter": ";"}"#, "S3Settings.CsvRowDelimiter"),
        (
            r#"{"CsvDelimiter": "|", "DataFormat": "parquet"}"#,
            "DataFormat is parquet",
        ),
    ] {
        let (code, _, err) = task.run(&["cdc", "--source", &src, "--once", "--s3-settings", bad]);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }
    let _ = run_cli(&["teardown", "--task", "dialect", "--source", &src, "--yes"]);
}

/// DMS's `PreserveTransactions` with `CdcPath` through `--s3-settings`: `cdc` writes each
/// batch's transaction file in the folder, every table's rows in commit order in the CSV
/// dialect asked (`Op|table|schema|ts|fields|unchanged`); the tables' files stay, so `apply`
/// and `validate` work as without it.
#[tokio::test]
async fn dms_preserve_transactions_writes_transaction_files_through_the_cli() {
    let source = TestDb::new("cli_ptxn_src").await;
    let target = TestDb::new("cli_ptxn_dst").await;
    let c = source.client().await;
    c.batch_execute(
        "create table public.a (id int primary key, v text);
         create table public.b (id int primary key, a_id int);
         insert into public.a values (1, 'one');",
    )
    .await
    .unwrap();
    let task = CliTask::new("ptxn", &source.config(), &target.config());
    let src = task.src.clone();
    let stage = std::path::PathBuf::from(task.common()[3]);
    let dir = TempDir::new("cli-ptxn");
    let settings = dir.path().join("s3.json");
    std::fs::write(
        &settings,
        serde_json::json!({"PreserveTransactions": true, "CdcPath": "txn",
            "CsvDelimiter": "|", "TimestampColumnName": "ts"})
        .to_string(),
    )
    .unwrap();
    let s3 = format!("file://{}", settings.display());
    let (code, out, err) =
        task.run(&["full-load", "--source", &src, "--cdc", "--s3-settings", &s3]);
    assert_eq!(code, Some(0), "{out}{err}");
    c.batch_execute(
        "begin; insert into public.b values (10, 1); update public.a set v = 'x|y' where id = 1;
             commit;
         insert into public.a values (2, null);
         begin; delete from public.b where id = 10; insert into public.b values (11, 2); commit;",
    )
    .await
    .unwrap();
    let (code, out, err) = task.run(&["cdc", "--source", &src, "--once", "--s3-settings", &s3]);
    assert_eq!(code, Some(0), "{out}{err}");
    let files: Vec<_> = std::fs::read_dir(stage.join("txn"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("CDC_TXN-") && files[0].ends_with(".csv"),
        "{files:?}"
    );
    let text = std::fs::read_to_string(stage.join("txn").join(&files[0])).unwrap();
    // Op, table, schema, then the commit time (TimestampColumnName), the columns, unchanged.
    let rows: Vec<String> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            assert!(
                f[3].len() >= 19 && f[3].as_bytes()[4] == b'-',
                "a commit time: {l}"
            );
            [&f[..3], &f[4..]].concat().join("|")
        })
        .collect();
    assert_eq!(
        rows,
        [
            "I|b|public|10|1|",
            "U|a|public|1|\"x|y\"|",
            "I|a|public|2||",
            "D|b|public|10||",
            "I|b|public|11|2|",
        ],
        "{text}"
    );
    let out = task.apply_and_validate();
    assert!(
        out.contains("EQUAL public.a") && out.contains("EQUAL public.b"),
        "{out}"
    );
    for (bad, why) in [
        (
            r#"{"PreserveTransactions": true}"#,
            "S3Settings.PreserveTransactions",
        ),
        (
            r#"{"PreserveTransactions": true, "CdcPath": "txn", "AddColumnName": true}"#,
            "S3Settings.AddColumnName",
        ),
    ] {
        let (code, _, err) = task.run(&["cdc", "--source", &src, "--once", "--s3-settings", bad]);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }
    let _ = run_cli(&["teardown", "--task", "ptxn", "--source", &src, "--yes"]);
}

/// Native start (DMS's `slotName` + `CdcStartPosition`): the task reads the slot and
/// publication its user made, from a position; nothing is created on the source, and
/// teardown leaves the user's slot and publication in place. Every misuse is named.
#[tokio::test]
async fn cdc_native_start_reads_the_users_slot_from_a_position() {
    let db = TestDb::new("cli_native").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.n (id int primary key); create table public.other (id int primary key);
         create publication user_pub for table public.n;",
    )
    .await
    .unwrap();
    // Each in its own database: slot names are cluster-wide.
    let slot = format!("user_slot_{}", std::process::id());
    c.query_one(
        "select pg_create_logical_replication_slot($1, 'pgoutput')::text",
        &[&slot],
    )
    .await
    .unwrap();
    for sql in [
        "insert into public.n values (1)",
        "insert into public.n values (2)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let start: String = c
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for sql in [
        "insert into public.n values (3)",
        "insert into public.other values (3)",
        "insert into public.n values (4)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let task = CliTask::new("native", &db.config(), &db.config());
    let url = task.src.clone();
    let native = [
        "--slot-name",
        slot.as_str(),
        "--publication",
        "user_pub",
        "--start-position",
        start.as_str(),
    ];
    let poll = |extra: &[&str]| {
        let (code, out, err) =
            task.run(&[&["cdc", "--once", "--json", "--source", &url][..], extra].concat());
        assert_eq!(code, Some(0), "{out}{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let first = poll(&native);
    // 3 and 4: after the start; `other` is not in the user's publication.
    assert_eq!(
        (first["changes"].as_u64(), first["slot"].as_str()),
        (Some(2), Some(slot.as_str())),
        "{first:#}"
    );
    c.batch_execute("insert into public.n values (5)")
        .await
        .unwrap();
    let next = poll(&[]);
    assert_eq!(
        next["changes"], 1,
        "the task keeps its user's slot: {next:#}"
    );
    let slot_confirmed: String = c
        .query_one(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(next["checkpoint"], slot_confirmed.as_str(), "{next:#}");
    // pgshift made nothing of its own on the source.
    let own: i64 = c
        .query_one(
            "select (select count(*) from pg_replication_slots where slot_name like 'pgshift%' and database = current_database()) + (select count(*) from pg_publication where pubname like 'pgshift%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(own, 0);

    let usage = |args: &[&str], why: &str| {
        let (code, _, err) = task.run(&[&["cdc", "--once", "--source", &url][..], args].concat());
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    };
    usage(&["--start-position", &start], "--slot-name");
    usage(&["--slot-name", &slot], "--publication");
    usage(
        &["--slot-name", "Bad-Slot", "--publication", "p"],
        "--slot-name",
    );
    usage(
        &[
            "--slot-name",
            &slot,
            "--publication",
            "p",
            "--start-position",
            "later",
        ],
        "--start-position",
    );
    let failed = |t: &str, args: &[&str], why: &str| {
        let (code, _, err) = run_cli(
            &[
                &["cdc", "--once", "--source", &url, "--task", t][..],
                &task.common()[2..],
                args,
            ]
            .concat(),
        );
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    };
    // The recorded task cannot switch slots; a new one checks what it is given.
    failed(
        "native",
        &["--slot-name", "other_slot", "--publication", "user_pub"],
        "cannot switch",
    );
    failed(
        "native2",
        &["--slot-name", "no_such_slot", "--publication", "user_pub"],
        "does not exist",
    );
    failed(
        "native3",
        &["--slot-name", &slot, "--publication", "no_such_pub"],
        "publication no_such_pub does not exist",
    );
    failed(
        "native4",
        &[
            "--slot-name",
            &slot,
            "--publication",
            "user_pub",
            "--start-position",
            "0/1",
        ],
        "before slot",
    );

    let (code, out, err) = run_cli(&["teardown", "--task", "native", "--source", &url, "--yes"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let kept: i64 = c
        .query_one(
            "select (select count(*) from pg_replication_slots where slot_name = $1) + (select count(*) from pg_publication where pubname = 'user_pub')",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 2, "teardown leaves the user's slot and publication");
    c.query_one("select pg_drop_replication_slot($1)::text", &[&slot])
        .await
        .unwrap();
}

/// DMS transformation rules (schema rename, table prefix and lower case, a column renamed, a
/// column removed): the stage holds the transformed names everywhere a reader looks — keys,
/// manifests, headers, schema versions, a schema change after the load — and the removed
/// column's values appear nowhere; `apply` refuses such a stage, naming why.
#[tokio::test]
async fn transformation_rules_rename_what_is_staged_and_remove_columns() {
    let source = TestDb::new("cli_transform_src").await;
    let target = TestDb::new("cli_transform_dst").await;
    let c = source.client().await;
    c.batch_execute(
        "create table public.\"Orders\" (id int primary key, secret_note text, qty int, note text);
         insert into public.\"Orders\" values (1, 'TOPSECRET-1', 5, 'a'), (2, 'TOPSECRET-2', 7, null);
         create table public.other (id int primary key);",
    )
    .await
    .unwrap();
    let task = CliTask::new("transform", &source.config(), &target.config());
    let (src, dst) = (task.src.clone(), task.dst.clone());
    let stage = std::path::PathBuf::from(task.common()[3]);
    let dir = TempDir::new("cli-transform");
    let mappings = dir.path().join("mappings.json");
    std::fs::write(
        &mappings,
        serde_json::json!({"rules": [
            {"rule-type": "selection", "rule-id": "1", "object-locator": {"schema-name": "public", "table-name": "Orders"}, "rule-action": "include"},
            {"rule-type": "transformation", "rule-id": "2", "rule-target": "schema", "object-locator": {"schema-name": "public"}, "rule-action": "rename", "value": "sales"},
            {"rule-type": "transformation", "rule-id": "3", "rule-target": "table", "object-locator": {"schema-name": "public", "table-name": "%"}, "rule-action": "convert-lowercase"},
            {"rule-type": "transformation", "rule-id": "4", "rule-target": "table", "object-locator": {"schema-name": "public", "table-name": "%"}, "rule-action": "add-prefix", "value": "dms_"},
            {"rule-type": "transformation", "rule-id": "5", "rule-target": "column", "object-locator": {"schema-name": "%", "table-name": "%", "column-name": "secret%"}, "rule-action": "remove-column"},
            {"rule-type": "transformation", "rule-id": "6", "rule-target": "column", "object-locator": {"schema-name": "public", "table-name": "Orders", "column-name": "qty"}, "rule-action": "rename", "value": "quantity"}
        ]})
        .to_string(),
    )
    .unwrap();
    let tables = format!("file://{}", mappings.display());
    let s3 = r#"{"AddColumnName": true}"#;
    let (code, out, err) = task.run(&[
        "full-load",
        "--source",
        &src,
        "--cdc",
        "--tables",
        &tables,
        "--s3-settings",
        s3,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let table_dir = stage.join("sales/dms_orders");
    let chunk = std::fs::read_to_string(table_dir.join("LOAD00000001.csv")).unwrap();
    assert_eq!(chunk, "id,quantity,note\n1,5,a\n2,7,\n");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stage.join("_manifests/load/sales.dms_orders.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["columns"],
        serde_json::json!(["id", "quantity", "note"])
    );
    assert_eq!(manifest["transformed"], true);
    assert!(
        !stage.join("public").exists(),
        "nothing under the source's names"
    );

    for sql in [
        "insert into public.\"Orders\" values (3, 'TOPSECRET-3', 1, 'c')",
        "update public.\"Orders\" set qty = 6, secret_note = 'TOPSECRET-4' where id = 1",
        "delete from public.\"Orders\" where id = 2",
        "alter table public.\"Orders\" add column secret_pin int, add column extra int",
        "insert into public.\"Orders\" values (4, 'TOPSECRET-5', 2, 'd', 987654321, 9)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let (code, out, err) = task.run(&[
        "cdc",
        "--source",
        &src,
        "--once",
        "--tables",
        &tables,
        "--s3-settings",
        s3,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut cdc_files: Vec<_> = std::fs::read_dir(table_dir.join("cdc"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cdc_files.sort();
    let cdc: String = cdc_files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(
        cdc,
        "Op,id,quantity,note,unchanged_toast\nI,3,1,c,\nU,1,6,a,\nD,2,,,\n\
         Op,id,quantity,note,extra,unchanged_toast\nI,4,2,d,9,\n",
        "{cdc_files:?}"
    );
    // The schema version of the change: staged names, the removed column in no operation.
    let mut versions: Vec<_> = std::fs::read_dir(table_dir.join("_schema"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    versions.sort();
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(versions.last().unwrap()).unwrap()).unwrap();
    let text = last.to_string();
    assert!(
        text.contains("\"extra\"") && text.contains("\"dms_orders\""),
        "{text}"
    );
    assert!(
        !text.contains("secret") && !text.contains("\"qty\""),
        "{text}"
    );
    // The removed column's values are nowhere in the stage.
    let mut dirs = vec![stage.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !text.contains("TOPSECRET") && !text.contains("987654321"),
                    "{p:?}: {text}"
                );
            }
        }
    }
    // Apply cannot build such a target from the source's schema...
    let (code, out, err) = task.run(&["apply", "--target", &dst]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("transformation rules") && err.contains("--target-prep truncate"),
        "{err}"
    );
    // ... but applies into the tables the user made under the staged names (DMS's
    // TargetTablePrepMode TRUNCATE_BEFORE_LOAD), the schema change included, and validate
    // compares each source table with its transformed target.
    target
        .client()
        .await
        .batch_execute(
            "create schema sales; create table sales.dms_orders (id int primary key, quantity int, note text)",
        )
        .await
        .unwrap();
    let (code, out, err) = task.run(&["apply", "--target", &dst, "--target-prep", "truncate"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let rows: Vec<String> = target
        .client()
        .await
        .query(
            "select format('%s|%s|%s|%s', id, quantity, note, extra) from sales.dms_orders order by id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["1|6|a|", "3|1|c|", "4|2|d|9"]);
    let (code, out, err) = task.run(&[
        "validate", "--source", &src, "--target", &dst, "--tables", &tables,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("EQUAL public.Orders"), "{out}");
    target
        .client()
        .await
        .batch_execute("update sales.dms_orders set quantity = 0 where id = 3")
        .await
        .unwrap();
    let (code, out, _) = task.run(&[
        "validate", "--source", &src, "--target", &dst, "--tables", &tables,
    ]);
    assert_eq!(code, Some(1), "a difference is found: {out}");
    let _ = run_cli(&["teardown", "--task", "transform", "--source", &src, "--yes"]);
}
