//! test-endpoint against the real clusters and the emulator's Secrets Manager.

use std::time::{Duration, Instant};

use pgshift::aws::Aws;
use pgshift::config::{PgConfig, SslMode};
use pgshift::error::ConnectFailure;
use pgshift::job::test_endpoint::{self, EndpointReport, TestEndpointEvent};
use pgshift::selection::Selection;
use pgshift::source::checks::{CheckOptions, Status};
use pgshift_tests::{TestDb, admin_config, env, replica_admin_config};
use secrecy::ExposeSecret;

fn status(report: &EndpointReport, id: &str) -> Status {
    report
        .check(id)
        .unwrap_or_else(|| panic!("check {id} missing from {report:#?}"))
        .status
}

/// Options selecting the test database's `public` tables.
fn public_tables() -> CheckOptions {
    CheckOptions {
        selection: Selection::from_json(
            r#"{"rules":[{"rule-type":"selection","rule-id":"1","rule-name":"1","object-locator":{"schema-name":"public","table-name":"%"},"rule-action":"include"}]}"#,
            "tables",
        )
        .unwrap(),
        ..CheckOptions::default()
    }
}

/// A source configured as pgshift wants it: every check passes (cluster-wide checks included,
/// so this test is in the `cluster-wide` nextest group, serial with the tests that open
/// long-running or prepared transactions).
#[tokio::test]
async fn cluster_wide_configured_source_passes_every_check() {
    let db = TestDb::new("ep_ok").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.orders (id bigint primary key, placed_at timestamptz not null, qty int4);
         create table public.\"Table1\" (id int primary key, amount numeric(12,2));",
    )
    .await
    .unwrap();
    let report = test_endpoint::run(&db.config(), &public_tables())
        .await
        .unwrap();
    for check in &report.checks {
        assert_eq!(check.status, Status::Pass, "{check:#?}");
    }
    assert!(report.ok);
    let server = report.server.as_ref().unwrap();
    assert!(server.version_num >= 150_000 && !server.is_rds && !server.in_recovery);
    assert!(
        server.tls,
        "the test cluster has ssl=on and sslmode=prefer uses it"
    );
    assert!(
        report
            .check("table_selection")
            .unwrap()
            .detail
            .contains("2 tables")
    );
    assert!(
        report.elapsed_ms < 10_000,
        "checks must run in seconds: {} ms",
        report.elapsed_ms
    );
}

#[tokio::test]
async fn wal_level_replica_fails_with_remedy() {
    let db = TestDb::on(replica_admin_config(), "ep_replica").await;
    let report = test_endpoint::run(&db.config(), &CheckOptions::default())
        .await
        .unwrap();
    assert!(!report.ok);
    let check = report.check("wal_level").unwrap();
    assert_eq!(check.status, Status::Fail);
    assert!(check.detail.contains("wal_level = replica"), "{check:?}");
    assert!(
        check
            .remedy
            .contains("ALTER SYSTEM SET wal_level = logical"),
        "{check:?}"
    );
}

/// RDS is recognised by its `rds.*` settings; the remedy is then the parameter-group setting.
#[tokio::test]
async fn rds_source_gets_parameter_group_remedies() {
    let db = TestDb::on(replica_admin_config(), "ep_rds").await;
    db.client()
        .await
        .batch_execute(&format!(
            "alter database {} set rds.logical_replication = '0'",
            pgshift::source::quote_ident(&db.name)
        ))
        .await
        .unwrap();
    let mut db = db;
    let role = db.create_role("").await;
    let report = test_endpoint::run(&role, &CheckOptions::default())
        .await
        .unwrap();
    assert!(report.server.as_ref().unwrap().is_rds, "{report:#?}");
    let wal = report.check("wal_level").unwrap();
    assert_eq!(wal.status, Status::Fail);
    assert!(
        wal.remedy.contains("rds.logical_replication = 1"),
        "{wal:?}"
    );
    let repl = report.check("replication_privilege").unwrap();
    assert_eq!(repl.status, Status::Fail);
    assert!(
        repl.remedy.starts_with("GRANT rds_replication TO"),
        "{repl:?}"
    );
}

#[tokio::test]
async fn role_without_replication_or_select_is_reported() {
    let mut db = TestDb::new("ep_priv").await;
    db.client()
        .await
        .batch_execute("create table public.secret_stuff (id int primary key); create table public.open_stuff (id int primary key);")
        .await
        .unwrap();
    let role = db.create_role("").await;
    db.client()
        .await
        .batch_execute(&format!(
            "grant select on public.open_stuff to {}",
            pgshift::source::quote_ident(&role.user)
        ))
        .await
        .unwrap();
    let report = test_endpoint::run(&role, &public_tables()).await.unwrap();
    assert!(!report.ok);
    let repl = report.check("replication_privilege").unwrap();
    assert_eq!(repl.status, Status::Fail);
    assert_eq!(
        repl.remedy,
        format!(
            "ALTER ROLE {} WITH REPLICATION;",
            pgshift::source::quote_ident(&role.user)
        )
    );
    let sel = report.check("select_privilege").unwrap();
    assert_eq!(sel.status, Status::Fail);
    assert!(sel.detail.contains("public.secret_stuff"), "{sel:?}");
    assert!(!sel.detail.contains("open_stuff"), "{sel:?}");
    assert!(
        sel.remedy
            .contains("GRANT SELECT ON \"public\".\"secret_stuff\" TO"),
        "{sel:?}"
    );

    // With REPLICATION granted that check passes; SELECT is still missing.
    db.client()
        .await
        .batch_execute(&format!(
            "alter role {} with replication",
            pgshift::source::quote_ident(&role.user)
        ))
        .await
        .unwrap();
    let report = test_endpoint::run(&role, &public_tables()).await.unwrap();
    assert_eq!(status(&report, "replication_privilege"), Status::Pass);
    assert_eq!(status(&report, "select_privilege"), Status::Fail);
    // No event trigger for this role: schema changes come from the catalog, and the report
    // says what is then lost.
    let ddl = report.check("ddl_capture").unwrap();
    assert_eq!(ddl.status, Status::Warn);
    assert!(
        ddl.detail.contains("may not create event triggers") && ddl.detail.contains("DROP TABLE"),
        "{ddl:?}"
    );
    // A superuser on 14+: captured in order.
    let report = test_endpoint::run(&db.config(), &public_tables())
        .await
        .unwrap();
    assert_eq!(status(&report, "ddl_capture"), Status::Pass);
    let off = CheckOptions {
        capture_ddl: false,
        ..public_tables()
    };
    let report = test_endpoint::run(&db.config(), &off).await.unwrap();
    assert_eq!(status(&report, "ddl_capture"), Status::Warn);
}

#[tokio::test]
async fn tables_without_key_or_with_toast_are_named() {
    let db = TestDb::new("ep_tables").await;
    db.client()
        .await
        .batch_execute(
            "create table public.no_pk (a int, b int);
             create table public.docs (id int primary key, body text);
             create table public.docs_full (id int primary key, body text);
             alter table public.docs_full replica identity full;
             create table public.plain (id int primary key, n int8);
             create table public.\"Mixed\" (id int primary key);
             create table public.mixed (id int primary key);
             create table public.parts (id int, at date) partition by range (at);",
        )
        .await
        .unwrap();
    let report = test_endpoint::run(&db.config(), &public_tables())
        .await
        .unwrap();
    let ri = report.check("replica_identity").unwrap();
    assert_eq!(ri.status, Status::Warn);
    assert!(ri.detail.contains("public.no_pk"), "{ri:?}");
    assert!(
        !ri.detail.contains("docs") && !ri.detail.contains("plain"),
        "{ri:?}"
    );
    assert!(
        ri.remedy
            .contains("ALTER TABLE \"public\".\"no_pk\" REPLICA IDENTITY FULL"),
        "{ri:?}"
    );

    let toast = report.check("toast_replica_identity").unwrap();
    assert_eq!(toast.status, Status::Warn);
    assert!(toast.detail.contains("public.docs"), "{toast:?}");
    assert!(!toast.detail.contains("docs_full"), "{toast:?}");
    assert!(!toast.detail.contains("plain"), "{toast:?}");

    let case = report.check("case_collisions").unwrap();
    assert_eq!(case.status, Status::Warn);
    assert!(
        case.detail.contains("public.Mixed / public.mixed"),
        "{case:?}"
    );

    assert_eq!(status(&report, "partitioned_tables"), Status::Warn);
    assert!(
        report
            .check("partitioned_tables")
            .unwrap()
            .detail
            .contains("public.parts")
    );
    assert!(report.ok, "warnings only: {report:#?}");
}

#[tokio::test]
async fn unknown_table_in_selection_fails_and_lossy_types_warn() {
    let db = TestDb::new("ep_sel").await;
    db.client()
        .await
        .batch_execute(
            "create type mood as enum ('sad', 'ok');
             create table public.wallet (id int primary key, cash money, feeling mood);",
        )
        .await
        .unwrap();
    let opts = CheckOptions {
        selection: Selection::from_json(
            r#"{"rules":[
              {"rule-type":"selection","rule-id":"1","object-locator":{"schema-name":"public","table-name":"wallet"},"rule-action":"include"},
              {"rule-type":"selection","rule-id":"2","object-locator":{"schema-name":"public","table-name":"Wallet"},"rule-action":"include"}]}"#,
            "tables",
        )
        .unwrap(),
        ..CheckOptions::default()
    };
    let report = test_endpoint::run(&db.config(), &opts).await.unwrap();
    let sel = report.check("table_selection").unwrap();
    assert_eq!(sel.status, Status::Fail, "{sel:?}");
    assert!(sel.detail.contains("public.Wallet (rule-id 2)"), "{sel:?}");
    let types = report.check("data_types").unwrap();
    assert_eq!(types.status, Status::Warn);
    assert!(
        types.detail.contains("public.wallet.cash money"),
        "{types:?}"
    );
    assert!(
        types.detail.contains("public.wallet.feeling mood"),
        "{types:?}"
    );
}

/// Cluster-wide: runs serially with the all-pass test (nextest group `cluster-wide`).
#[tokio::test]
async fn cluster_wide_long_running_and_prepared_transactions_warn() {
    let db = TestDb::new("ep_xact").await;
    let setup = db.client().await;
    setup
        .batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();

    let holder = db.client().await;
    holder
        .batch_execute("begin; insert into public.t values (1);")
        .await
        .unwrap();
    let gid = format!("pgshift-test-{}", db.name);
    let preparer = db.client().await;
    preparer
        .batch_execute(&format!(
            "begin; insert into public.t values (2); prepare transaction '{gid}';"
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let opts = CheckOptions {
        long_transaction_secs: 1.0,
        ..public_tables()
    };
    let report = test_endpoint::run(&db.config(), &opts).await;
    // Clean up before asserting so a failure does not leave a prepared transaction behind.
    let _ = setup
        .batch_execute(&format!("rollback prepared '{gid}'"))
        .await;
    let _ = holder.batch_execute("rollback").await;
    let report = report.unwrap();

    let long = report.check("long_running_transactions").unwrap();
    assert_eq!(long.status, Status::Warn, "{long:?}");
    assert!(long.detail.contains("has written"), "{long:?}");
    assert!(long.detail.contains(&db.name), "{long:?}");
    let prepared = report.check("prepared_transactions").unwrap();
    assert_eq!(prepared.status, Status::Warn, "{prepared:?}");
    assert!(prepared.detail.contains(&gid), "{prepared:?}");
    assert!(
        prepared.remedy.contains("ROLLBACK PREPARED"),
        "{prepared:?}"
    );
}

async fn failure_of(cfg: &PgConfig) -> (ConnectFailure, EndpointReport, Duration) {
    let started = Instant::now();
    let report = test_endpoint::run(cfg, &CheckOptions::default())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(!report.ok);
    let kind = report
        .connection_failure
        .unwrap_or_else(|| panic!("no failure in {report:#?}"));
    (kind, report, took)
}

#[tokio::test]
async fn connection_failures_are_classified_fast() {
    let good = admin_config();

    let mut wrong_pw = good.clone();
    wrong_pw.password = Some("definitely-wrong".to_owned().into());
    let (kind, report, took) = failure_of(&wrong_pw).await;
    assert_eq!(kind, ConnectFailure::Auth);
    assert!(
        !format!("{report:?}").contains("definitely-wrong"),
        "password leaked"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A closed port: bind a port, then free it so nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut closed = good.clone();
    closed.port = port;
    let (kind, _, took) = failure_of(&closed).await;
    assert_eq!(kind, ConnectFailure::Refused);
    assert!(took < Duration::from_secs(5), "{took:?}");

    let mut unknown = good.clone();
    unknown.host = "no-such-host.invalid".to_owned();
    let (kind, _, took) = failure_of(&unknown).await;
    assert_eq!(kind, ConnectFailure::Dns);
    assert!(took < Duration::from_secs(5), "{took:?}");

    let missing_db = good.with_dbname("no_such_database_here");
    let (kind, _, _) = failure_of(&missing_db).await;
    assert_eq!(kind, ConnectFailure::Database);

    // A server that accepts TCP and never answers: a timeout after 2 x connect_timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut hung = good.clone();
    hung.port = silent.local_addr().unwrap().port();
    hung.connect_timeout = Duration::from_secs(1);
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let (kind, report, took) = failure_of(&hung).await;
    accept.abort();
    assert_eq!(kind, ConnectFailure::Timeout, "{report:#?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test]
async fn tls_modes_behave_like_libpq() {
    let mut cfg = admin_config();
    cfg.host = "localhost".to_owned();

    cfg.sslmode = SslMode::Require;
    let report = test_endpoint::run(&cfg, &CheckOptions::default())
        .await
        .unwrap();
    assert_eq!(status(&report, "tls"), Status::Pass, "{report:#?}");

    cfg.sslmode = SslMode::Disable;
    let report = test_endpoint::run(&cfg, &CheckOptions::default())
        .await
        .unwrap();
    assert_eq!(status(&report, "tls"), Status::Warn);

    // verify-full without the private CA: the certificate is not trusted.
    cfg.sslmode = SslMode::VerifyFull;
    let (kind, _, _) = failure_of(&cfg).await;
    assert_eq!(kind, ConnectFailure::Tls);

    // With the CA: verified, host name matches.
    cfg.sslrootcert = Some(env("PGSHIFT_TEST_CA_FILE").into());
    let report = test_endpoint::run(&cfg, &CheckOptions::default())
        .await
        .unwrap();
    assert!(report.connection_failure.is_none(), "{report:#?}");
    assert_eq!(status(&report, "tls"), Status::Pass);

    // verify-full checks the name: the certificate names localhost, not 127.0.0.1.
    let mut wrong_name = cfg.clone();
    wrong_name.host = "127.0.0.1".to_owned();
    let (kind, _, _) = failure_of(&wrong_name).await;
    assert_eq!(kind, ConnectFailure::Tls);
    // verify-ca does not check the name.
    wrong_name.sslmode = SslMode::VerifyCa;
    let report = test_endpoint::run(&wrong_name, &CheckOptions::default())
        .await
        .unwrap();
    assert!(report.connection_failure.is_none(), "{report:#?}");
}

async fn put_secret(name: &str, value: &serde_json::Value) -> String {
    let _ = env("AWS_ENDPOINT_URL");
    let aws = Aws::from_env().await;
    let out = aws
        .secrets()
        .create_secret()
        .name(name)
        .secret_string(value.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("AWS emulator unreachable or refused create_secret: {e:?}"));
    out.arn().unwrap().to_owned()
}

#[tokio::test]
async fn credentials_come_from_a_dms_secret_in_the_emulator() {
    let db = TestDb::new("ep_secret").await;
    let cfg = db.config();
    let password = cfg.password.as_ref().unwrap().expose_secret().to_owned();
    let arn = put_secret(
        &pgshift_tests::unique_name("pgshift/source"),
        &serde_json::json!({
            "engine": "postgres", "host": cfg.host, "port": cfg.port.to_string(),
            "username": cfg.user, "password": password, "dbname": db.name
        }),
    )
    .await;
    let event = TestEndpointEvent::from_json(serde_json::json!({ "secret_arn": arn })).unwrap();
    let aws = Aws::from_env().await;
    let source = event
        .resolve_source(Some(&aws), None, Some(SslMode::Require))
        .await
        .unwrap();
    assert_eq!(source.dbname, db.name);
    assert_eq!(source.sslmode, SslMode::Require);
    let report = test_endpoint::run(&source, &CheckOptions::default())
        .await
        .unwrap();
    assert!(report.connection_failure.is_none(), "{report:#?}");
    assert_eq!(report.server.unwrap().database, db.name);

    // The function's default secret is used when the event names none.
    let event = TestEndpointEvent::from_json(serde_json::json!({})).unwrap();
    let source = event
        .resolve_source(Some(&aws), Some(&arn), None)
        .await
        .unwrap();
    assert_eq!(source.dbname, db.name);

    // A malformed secret is a clear error that never shows the password.
    let bad = put_secret(
        &pgshift_tests::unique_name("pgshift/bad"),
        &serde_json::json!({"hostname": "h", "password": "s3cr3t-value"}),
    )
    .await;
    let err = aws
        .read_source_secret(&bad, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a DMS PostgreSQL secret"), "{err}");
    assert!(!err.contains("s3cr3t-value"), "{err}");

    let err = aws
        .read_source_secret(
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:missing",
            None,
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("ResourceNotFoundException"),
        "{err}"
    );
    assert!(!err.is_transient());
}

/// A Lambda has no file to point `sslrootcert` at: the secret may hold the CA's PEM text, and
/// with it `verify-full` verifies the server; an RDS/Aurora host without a mode gets
/// `verify-full` (the RDS certificate authorities are built in), any other host `require`.
#[tokio::test]
async fn a_secret_carries_its_ca_and_rds_hosts_verify_by_default() {
    let db = TestDb::new("ep_secret_ca").await;
    let cfg = db.config();
    let password = cfg.password.as_ref().unwrap().expose_secret().to_owned();
    let ca = std::fs::read_to_string(env("PGSHIFT_TEST_CA_FILE")).unwrap();
    let aws = Aws::from_env().await;
    let secret = |host: &str, extra: serde_json::Value| {
        let mut v = serde_json::json!({
            "engine": "postgres", "host": host, "port": cfg.port,
            "username": cfg.user, "password": password, "dbname": db.name
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };

    let with_ca = put_secret(
        &pgshift_tests::unique_name("pgshift/ca"),
        &secret(
            "localhost",
            serde_json::json!({"sslmode": "verify-full", "sslrootcert": ca}),
        ),
    )
    .await;
    let source = aws.read_source_secret(&with_ca, None).await.unwrap();
    assert_eq!(source.sslmode, SslMode::VerifyFull);
    assert!(source.sslrootcert_pem.is_some());
    let report = test_endpoint::run(&source, &CheckOptions::default())
        .await
        .unwrap();
    assert!(report.connection_failure.is_none(), "{report:#?}");
    assert_eq!(status(&report, "tls"), Status::Pass);

    // The same without the CA: the private CA is not trusted, the connection refused.
    let without_ca = put_secret(
        &pgshift_tests::unique_name("pgshift/noca"),
        &secret("localhost", serde_json::json!({"sslmode": "verify-full"})),
    )
    .await;
    let source = aws.read_source_secret(&without_ca, None).await.unwrap();
    let (kind, _, _) = failure_of(&source).await;
    assert_eq!(kind, ConnectFailure::Tls);

    // No mode in the secret: require here, verify-full on RDS; the stack's mode wins over both.
    let plain = put_secret(
        &pgshift_tests::unique_name("pgshift/plain"),
        &secret("localhost", serde_json::json!({})),
    )
    .await;
    let source = aws.read_source_secret(&plain, None).await.unwrap();
    assert_eq!(source.sslmode, SslMode::Require);
    let rds = put_secret(
        &pgshift_tests::unique_name("pgshift/rds"),
        &secret(
            "db1.abcdefghijkl.eu-west-1.rds.amazonaws.com",
            serde_json::json!({}),
        ),
    )
    .await;
    let source = aws.read_source_secret(&rds, None).await.unwrap();
    assert_eq!(source.sslmode, SslMode::VerifyFull);
    let source = aws
        .read_source_secret(&rds, Some(SslMode::Require))
        .await
        .unwrap();
    assert_eq!(source.sslmode, SslMode::Require);
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(pgshift_tests::pgshift_bin())
        .args(args)
        .env_remove("PGSHIFT_SOURCE")
        .output()
        .expect("run pgshift");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_exit_codes_and_json() {
    let db = TestDb::new("ep_cli").await;
    db.client()
        .await
        .batch_execute("create table public.a (id int primary key)")
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());

    let (code, out, err) = run_cli(&["test-endpoint", "--source", &url, "--json"]);
    assert_ne!(code, 2, "{err}");
    let report: EndpointReport =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(code, if report.ok { 0 } else { 1 }, "{out}");
    assert!(report.check("wal_level").is_some());

    let (code, out, _) = run_cli(&["test-endpoint", "--source", &url]);
    assert!(out.contains("STATUS") && out.contains("wal_level"), "{out}");
    assert!(code == 0 || code == 1);

    let replica = TestDb::on(replica_admin_config(), "ep_cli_r").await;
    let (code, out, _) = run_cli(&[
        "test-endpoint",
        "--source",
        &pgshift_tests::url(&replica.config()),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL   wal_level"), "{out}");

    let (code, _, err) = run_cli(&[
        "test-endpoint",
        "--source",
        "postgres://u:hunter2@h:notaport/db",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--source") && err.contains("port"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let (code, _, err) = run_cli(&[
        "test-endpoint",
        "--source",
        &url,
        "--tables",
        "/nonexistent/rules.json",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--tables"), "{err}");

    let (code, _, _) = run_cli(&["test-endpoint"]);
    assert_eq!(code, 2, "missing --source is a usage error");
}
