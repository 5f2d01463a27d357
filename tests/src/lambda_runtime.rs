//! The packaged Lambda binaries (`cargo lambda build --release`, the `bootstrap` files that are
//! deployed) run for real: `cargo lambda watch --only-lambda-apis` serves the Lambda runtime
//! API on 127.0.0.1, each bootstrap polls it as it would on AWS, and `cargo lambda invoke`
//! sends the fixture events of `tests/fixtures/events/`. The functions read their settings from
//! the environment the SAM template gives them, the source from a Secrets Manager secret, and
//! stage to S3 and checkpoint in DynamoDB on the emulator.
//!
//! `PGSHIFT_LAMBDA_DIR` (the folder with `<binary>/bootstrap`) and `PGSHIFT_CARGO_LAMBDA` (the
//! cargo-lambda executable) are set by `scripts/test.sh`, which builds both.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgshift::aws::Aws;
use pgshift::staging::{ObjectSink, S3Sink};
use pgshift::state::DynamoStore;
use pgshift_tests::{TempDir, TestDb, env, unique_name};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/events").join(name)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A child process killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct RuntimeApi {
    port: u16,
    cargo_lambda: String,
    _server: Proc,
    dir: TempDir,
}

impl RuntimeApi {
    /// `cargo lambda watch --only-lambda-apis` on a free port, ready to take invocations.
    fn start() -> RuntimeApi {
        let cargo_lambda = env("PGSHIFT_CARGO_LAMBDA");
        let dir = TempDir::new("lambda-rt");
        let port = free_port();
        let log = dir.path().join("watch.log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&cargo_lambda)
            .args(["lambda", "watch", "--only-lambda-apis", "--ignore-changes"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port"])
            .arg(port.to_string())
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cargo_lambda} lambda watch: {e}"));
        let server = Proc { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the Lambda runtime API did not start: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        RuntimeApi {
            port,
            cargo_lambda,
            _server: server,
            dir,
        }
    }

    /// Starts the packaged `bootstrap` of `function` against this runtime API.
    fn function(&self, function: &str, env_vars: &[(&str, String)]) -> Proc {
        let bootstrap = PathBuf::from(env("PGSHIFT_LAMBDA_DIR"))
            .join(function)
            .join("bootstrap");
        assert!(
            bootstrap.is_file(),
            "{} missing: build it with cargo lambda build --release",
            bootstrap.display()
        );
        let log = self.dir.path().join(format!("{function}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(&bootstrap);
        cmd.env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{}/.rt/{function}", self.port),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", function)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
        .env("AWS_LAMBDA_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out);
        for (k, v) in env_vars {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bootstrap.display()));
        Proc { child, log }
    }

    /// `cargo lambda invoke`: the function's response, or its error (`errorType: message`).
    fn invoke(&self, function: &str, payload: Payload) -> Result<Value, String> {
        let mut cmd = Command::new(&self.cargo_lambda);
        cmd.args(["lambda", "invoke", function, "--output-format", "json"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port"])
            .arg(self.port.to_string())
            .current_dir(repo_root());
        match payload {
            Payload::Fixture(name) => cmd.arg("--data-file").arg(fixture(name)),
            Payload::Json(v) => cmd.arg("--data-ascii").arg(v.to_string()),
        };
        let out = cmd.output().expect("cargo lambda invoke");
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(serde_json::from_str::<Value>(text.trim())
                .unwrap_or_else(|e| panic!("{function} returned non-JSON ({e}): {text}")))
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

enum Payload {
    Fixture(&'static str),
    Json(Value),
}

/// A Secrets Manager secret of `db`'s credentials, in the DMS / RDS shape; its ARN.
async fn db_secret(aws: &Aws, prefix: &str, db: &TestDb) -> String {
    let cfg = db.config();
    aws.secrets()
        .create_secret()
        .name(unique_name(prefix))
        .secret_string(
            json!({
                "engine": "postgres", "host": cfg.host, "port": cfg.port,
                "username": cfg.user,
                "password": cfg.password.as_ref().map(|p| p.expose_secret().to_owned()),
                "dbname": db.name
            })
            .to_string(),
        )
        .send()
        .await
        .expect("create secret")
        .arn()
        .expect("secret arn")
        .to_owned()
}

async fn setup_aws(task: &str, db: &TestDb) -> (Vec<(&'static str, String)>, S3Sink, DynamoStore) {
    let aws = Aws::from_env().await;
    let bucket = pgshift_tests::emulator_bucket(&aws, "pgshift-rt").await;
    let table = unique_name("pgshift-rt-state");
    let state = DynamoStore::new(aws.dynamodb(), &table);
    state.ensure_table().await.expect("state table");
    let secret = db_secret(&aws, "pgshift/rt-source", db).await;
    let stage = format!("s3://{bucket}/{task}");
    let sink = S3Sink::new(aws.s3(), &stage).expect("sink");
    // What template.yaml's Globals give every function (credentials and the emulator come
    // from this process's environment).
    let vars = vec![
        ("PGSHIFT_TASK", task.to_owned()),
        ("PGSHIFT_SOURCE_SECRET_ARN", secret),
        ("PGSHIFT_SOURCE_SSLMODE", "auto".to_owned()),
        ("PGSHIFT_STAGE", stage),
        ("PGSHIFT_STATE_TABLE", table),
        ("PGSHIFT_FORMAT", "csv".to_owned()),
        ("PGSHIFT_TABLE_MAPPINGS", String::new()),
        ("PGSHIFT_CHUNK_MB", "1".to_owned()),
        ("PGSHIFT_MAX_CONCURRENCY", "8".to_owned()),
    ];
    (vars, sink, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packaged_lambdas_run_through_the_runtime_api() {
    let db = TestDb::new("rt").await;
    let c = db.client().await;
    c.batch_execute(
        "create table orders (id int primary key, note text not null);
         insert into orders select g, repeat('x', 200) || g from generate_series(1, 20000) g;
         create table \"Audit Log\" (id bigserial primary key, what text);
         insert into \"Audit Log\" (what) values ('created'), ('loaded');",
    )
    .await
    .unwrap();
    let task = unique_name("rt").replace('_', "-");
    let (vars, sink, state) = setup_aws(&task, &db).await;
    let api = RuntimeApi::start();
    let _endpoint = api.function("test-endpoint", &vars);
    let full_load = api.function("full-load", &vars);
    let poller = api.function("cdc-poller", &vars);

    // test-endpoint: the default event reads the source from the function's secret.
    let report = api
        .invoke(
            "test-endpoint",
            Payload::Fixture("test-endpoint-default.json"),
        )
        .unwrap_or_else(|e| panic!("test-endpoint failed: {e}"));
    assert!(report["connection_failure"].is_null(), "{report:#}");
    assert_eq!(report["server"]["database"], db.name.as_str(), "{report:#}");
    let checks = report["checks"].as_array().expect("checks");
    assert!(checks.len() > 10, "{report:#}");
    assert!(
        checks
            .iter()
            .any(|c| c["id"] == "wal_level" && c["status"] == "pass"),
        "{report:#}"
    );

    // full-load, as the state machine drives it: Plan, every chunk, Finish.
    let plan = api
        .invoke("full-load", Payload::Fixture("full-load-plan.json"))
        .unwrap_or_else(|e| panic!("Plan failed: {e}"));
    let chunks = plan["chunks"]
        .as_array()
        .expect("inline chunk list")
        .clone();
    assert!(chunks.len() >= 2, "1 MiB chunks split orders: {plan:#}");
    assert_eq!(plan["chunk_count"], chunks.len());
    for chunk in &chunks {
        let done = api
            .invoke(
                "full-load",
                Payload::Json(json!({"action": "ExportChunk", "chunk": chunk})),
            )
            .unwrap_or_else(|e| panic!("ExportChunk {chunk} failed: {e}"));
        assert!(done["key"].as_str().is_some(), "{done:#}");
    }
    let finish = api
        .invoke("full-load", Payload::Fixture("full-load-finish.json"))
        .unwrap_or_else(|e| panic!("Finish failed: {e}"));
    assert_eq!(finish["rows"], 20002, "{finish:#}");
    assert_eq!(finish["tables"], 2, "{finish:#}");
    let status = pgshift::job::status::run(&state, &task, None)
        .await
        .unwrap();
    assert_eq!(status.load, "complete", "{status:#?}");
    // Metrics (EMF on stdout): one line per chunk whose rows add up to the load's, and the
    // load's end; every declared metric carries a number.
    let lines = emf_lines(&full_load.log());
    let chunk_lines: Vec<_> = lines
        .iter()
        .filter(|l| l.get("FullLoadRowsStaged").is_some())
        .collect();
    assert_eq!(chunk_lines.len(), chunks.len(), "{lines:#?}");
    let rows: u64 = chunk_lines
        .iter()
        .map(|l| l["FullLoadRowsStaged"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 20002);
    assert!(
        chunk_lines.iter().all(
            |l| l["FullLoadThroughputRowsSource"].as_f64().unwrap() > 0.0
                && l["FullLoadBytesStaged"].as_u64().unwrap() > 0
                && l["Task"] == task.as_str()
        ),
        "{chunk_lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["FullLoadRowsLoaded"] == 20002 && l["FullLoadTablesLoaded"] == 2),
        "{lines:#?}"
    );
    let keys = sink.list("").await.unwrap();
    let loads: Vec<_> = keys.iter().filter(|k| k.contains("/LOAD")).collect();
    // One object per chunk, whatever its rows.
    assert_eq!(loads.len(), chunks.len(), "{keys:#?}");
    assert!(
        keys.iter().any(|k| k.starts_with("public/Audit Log/")),
        "{keys:#?}"
    );
    let mut staged_rows = 0;
    for key in loads.iter().filter(|k| k.starts_with("public/orders/")) {
        let body = sink.get(key).await.unwrap().expect("listed object");
        staged_rows += body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
    }
    assert_eq!(staged_rows, 20000);

    // cdc-poller, as the schedule starts it: changes since the load's consistent point.
    c.batch_execute(
        "update orders set note = 'changed' where id <= 10;
         delete from orders where id > 19990;
         insert into \"Audit Log\" (what) values ('polled');",
    )
    .await
    .unwrap();
    let poll = api
        .invoke("cdc-poller", Payload::Fixture("cdc-poller-schedule.json"))
        .unwrap_or_else(|e| panic!("cdc-poller failed: {e}\n{}", poller.log()));
    assert_eq!(poll["outcome"], "drained", "{poll:#}");
    assert_eq!(poll["changes"], 21, "{poll:#}");
    assert_eq!(poll["rows_staged"], 21, "{poll:#}");
    let batches = poll["batches"].as_array().expect("batches");
    assert_eq!(batches.len(), 1, "{poll:#}");
    let manifests = sink.list("_manifests/cdc/").await.unwrap();
    assert_eq!(manifests.len(), 1, "{manifests:#?}");
    let checkpoint = poll["checkpoint"].as_str().unwrap().to_owned();
    assert_ne!(poll["start_checkpoint"].as_str().unwrap(), checkpoint);
    // The Embedded Metric Format line reached the function's stdout (CloudWatch's input).
    let lines = emf_lines(&poller.log());
    assert!(
        lines
            .iter()
            .any(|l| l["CDCIncomingChanges"] == 21 && l["CDCLatencySource"].is_number()),
        "{lines:#?}"
    );
    // A reload of orders into the running task, as the state machine drives an execution
    // started with {"reload": [..]}: Plan, every chunk, Finish with the plan's position.
    let plan = api
        .invoke(
            "full-load",
            Payload::Json(json!({"action": "Plan", "reload": ["public.orders"]})),
        )
        .unwrap_or_else(|e| panic!("reload Plan failed: {e}"));
    let r0 = plan["reload"]
        .as_str()
        .expect("the reload's position")
        .to_owned();
    let chunks = plan["chunks"]
        .as_array()
        .expect("inline chunk list")
        .clone();
    assert!(!chunks.is_empty(), "{plan:#}");
    for chunk in &chunks {
        assert_eq!(chunk["reload"], r0.as_str(), "{chunk}");
        let done = api
            .invoke(
                "full-load",
                Payload::Json(json!({"action": "ExportChunk", "chunk": chunk})),
            )
            .unwrap_or_else(|e| panic!("reload ExportChunk {chunk} failed: {e}"));
        assert!(
            done["key"].as_str().unwrap().contains("/reload-"),
            "{done:#}"
        );
    }
    let done = api
        .invoke(
            "full-load",
            Payload::Json(json!({"action": "Finish", "reload": r0})),
        )
        .unwrap_or_else(|e| panic!("reload Finish failed: {e}"));
    assert_eq!(done["rows"], 19990, "{done:#}");
    assert_eq!(done["tables"], json!(["public.orders"]), "{done:#}");
    assert_eq!(sink.list("_manifests/reload/").await.unwrap().len(), 1);

    // The slot watch: what the slot retains, read without polling (the checkpoint stays).
    let watch = api
        .invoke("cdc-poller", Payload::Json(json!({"action": "Watch"})))
        .unwrap_or_else(|e| panic!("Watch failed: {e}\n{}", poller.log()));
    assert_eq!(watch["exists"], true, "{watch:#}");
    assert!(watch["retained_bytes"].as_i64().unwrap() > 0, "{watch:#}");
    let lines = emf_lines(&poller.log());
    assert!(
        lines.iter().any(
            |l| l.get("SlotRetainedBytes") == Some(&watch["retained_bytes"])
                && l.get("CDCIncomingChanges").is_none()
        ),
        "{lines:#?}"
    );
    let err = api
        .invoke("cdc-poller", Payload::Json(json!({"action": "Drain"})))
        .expect_err("an unknown poller action must fail");
    assert!(err.contains("action"), "{err}");
    // An idle second run stages nothing and never moves the checkpoint back.
    let again = api
        .invoke("cdc-poller", Payload::Fixture("cdc-poller-schedule.json"))
        .unwrap_or_else(|e| panic!("second poll failed: {e}"));
    assert_eq!(again["changes"], 0, "{again:#}");
    let again_lsn: pgshift::lsn::Lsn = again["checkpoint"].as_str().unwrap().parse().unwrap();
    let first_lsn: pgshift::lsn::Lsn = checkpoint.parse().unwrap();
    assert!(again_lsn >= first_lsn, "{again:#}");

    // A bad event is a terminal error with a type the state machine does not retry.
    let err = api
        .invoke("full-load", Payload::Json(json!({"action": "Explode"})))
        .expect_err("an unknown action must fail");
    assert!(
        err.contains("EventError") && err.contains("action"),
        "{err}"
    );
    assert!(!err.contains("Transient"), "{err}");
    // A chunk's failure names the chunk (the state machine's LoadFailed cause carries it).
    let err = api
        .invoke(
            "full-load",
            Payload::Json(
                json!({"action": "ExportChunk", "chunk": {"schema": "public", "table": "nope", "n": 7}}),
            ),
        )
        .expect_err("a chunk the plan does not have must fail");
    assert!(err.contains("chunk public.nope#7"), "{err}");
    // The functions keep serving after an error (the runtime reports it; no crash).
    let again = api
        .invoke("full-load", Payload::Fixture("full-load-finish.json"))
        .unwrap_or_else(|e| panic!("Finish after an error failed: {e}"));
    assert_eq!(again["rows"], 20002);
}

/// The function's EMF lines (JSON objects with `_aws`), each checked: every metric it declares
/// carries a number.
fn emf_lines(log: &str) -> Vec<Value> {
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect();
    for l in &lines {
        let declared = l["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap_or_else(|| panic!("no metrics declared: {l}"));
        assert_eq!(
            l["_aws"]["CloudWatchMetrics"][0]["Namespace"], "pgshift",
            "{l}"
        );
        for m in declared {
            let name = m["Name"].as_str().unwrap();
            assert!(l[name].is_number(), "{name} declared without a value: {l}");
        }
    }
    lines
}

/// Cold start of each packaged function: process start to the first response (a bad event, so
/// no source or AWS work is timed), against a warm invocation. Figures are printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packaged_lambdas_cold_start_figures() {
    let api = RuntimeApi::start();
    let vars = [
        ("PGSHIFT_TASK", "cold-start".to_owned()),
        (
            "PGSHIFT_SOURCE_SECRET_ARN",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:none".to_owned(),
        ),
        ("PGSHIFT_STAGE", "s3://cold-start/x".to_owned()),
        ("PGSHIFT_STATE_TABLE", "cold-start".to_owned()),
        (
            "PGSHIFT_TARGET_SECRET_ARN",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:none".to_owned(),
        ),
    ];
    for function in ["test-endpoint", "full-load", "cdc-poller", "apply"] {
        let started = Instant::now();
        let proc = api.function(function, &vars);
        let err = api
            .invoke(function, Payload::Json(json!("not an event")))
            .expect_err("a string is not an event");
        let cold = started.elapsed();
        assert!(err.contains("EventError"), "{err}\n{}", proc.log());
        let started = Instant::now();
        let _ = api.invoke(function, Payload::Json(json!("not an event")));
        let warm = started.elapsed();
        let size = std::fs::metadata(
            PathBuf::from(env("PGSHIFT_LAMBDA_DIR"))
                .join(function)
                .join("bootstrap"),
        )
        .map(|m| m.len())
        .unwrap_or(0);
        eprintln!(
            "[figures] {function}: bootstrap {:.1} MB, cold start + first invoke {} ms, warm invoke {} ms (both include ~{} ms of `cargo lambda invoke` process start)",
            size as f64 / 1e6,
            cold.as_millis(),
            warm.as_millis(),
            warm.as_millis()
        );
    }
}

/// A warm function reuses the secret it read (one Secrets Manager call per 5 minutes, not
/// per poll), but a source that refuses the cached credentials (the password rotated) makes
/// the next invocation read the secret again instead of failing for 5 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_is_read_again_after_the_source_refuses_it() {
    let db = TestDb::new("rt_rotate").await;
    db.client()
        .await
        .batch_execute("create table r (id int primary key); insert into r values (1)")
        .await
        .unwrap();
    let task = unique_name("rt-rotate").replace('_', "-");
    let (vars, _sink, _state) = setup_aws(&task, &db).await;
    let secret = vars
        .iter()
        .find(|(k, _)| *k == "PGSHIFT_SOURCE_SECRET_ARN")
        .map(|(_, v)| v.clone())
        .unwrap();
    let aws = Aws::from_env().await;
    let cfg = db.config();
    let put = |password: String| {
        let aws = aws.clone();
        let secret = secret.clone();
        let cfg = cfg.clone();
        let name = db.name.clone();
        async move {
            aws.secrets()
                .put_secret_value()
                .secret_id(&secret)
                .secret_string(
                    json!({"engine": "postgres", "host": cfg.host, "port": cfg.port,
                        "username": cfg.user, "password": password, "dbname": name})
                    .to_string(),
                )
                .send()
                .await
                .expect("put secret value");
        }
    };
    let right = cfg.password.as_ref().unwrap().expose_secret().to_owned();
    put("not-the-password".to_owned()).await;
    let api = RuntimeApi::start();
    let poller = api.function("cdc-poller", &vars);
    let err = api
        .invoke("cdc-poller", Payload::Json(json!({"action": "Watch"})))
        .expect_err("a wrong password fails");
    assert!(err.contains("auth"), "{err}");
    put(right).await;
    let watch = api
        .invoke("cdc-poller", Payload::Json(json!({"action": "Watch"})))
        .unwrap_or_else(|e| {
            panic!(
                "the rotated secret was not read again: {e}\n{}",
                poller.log()
            )
        });
    assert_eq!(watch["exists"], false, "{watch:#}");
}

/// The apply function as the stack runs it: the task's events, routed by a rule to an SQS
/// FIFO queue, each invoke it with one message; the messages arrive duplicated, out of order
/// and one of them never; the target ends equal to the source, and a duplicate is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apply_function_follows_its_queue_through_lost_and_repeated_messages() {
    use std::sync::Arc;
    let db = TestDb::new("rt_apply_src").await;
    let target = TestDb::new("rt_apply_dst").await;
    let c = db.client().await;
    c.batch_execute(
        "create table orders (id int primary key, note text not null, n int default 0);
         insert into orders select g, 'o' || g from generate_series(1, 3000) g;
         create table lines (order_id int references orders (id), k int, primary key (order_id, k));
         insert into lines select g, 1 from generate_series(1, 3000) g;",
    )
    .await
    .unwrap();
    let task = unique_name("rt-apply").replace('_', "-");
    let (mut vars, sink, state) = setup_aws(&task, &db).await;
    let aws = Aws::from_env().await;
    let tcfg = target.config();
    let target_secret = db_secret(&aws, "pgshift/rt-target", &target).await;
    let route = crate::events::Route::new("pgshift-rt-apply").await;
    route.connect(&task).await;
    vars.push(("PGSHIFT_TARGET_SECRET_ARN", target_secret));
    vars.push(("PGSHIFT_TARGET_SSLMODE", tcfg.sslmode.as_str().to_owned()));
    vars.push(("PGSHIFT_EVENTS_BUS", route.bus.clone()));
    vars.push(("PGSHIFT_APPLY_QUEUE_URL", route.queue_url.clone()));
    let events = pgshift::events::for_bus(&aws, Some(&route.bus));

    // The load and three CDC polls, each announcing on the bus.
    let source_cfg = db.config();
    let mut lo = pgshift::options::LoadOptions::new(&task, source_cfg.clone(), "loader");
    lo.cdc = true;
    lo.events = events.clone();
    pgshift::job::full_load::run_local(
        &sink,
        &state,
        &lo,
        2,
        Arc::new(pgshift::job::full_load::Progress::default()),
    )
    .await
    .unwrap();
    let mut co = pgshift::options::CdcOptions::new(&task, source_cfg, "poller");
    co.events = events.clone();
    for round in 0..3 {
        c.batch_execute(&format!(
            "update orders set n = n + 1, note = 'r{round}' where id % 3 = {round};
             delete from lines where order_id % 7 = {round};
             insert into orders values ({0}, 'new', 0); insert into lines values ({0}, 2);",
            10_000 + round
        ))
        .await
        .unwrap();
        let r = pgshift::job::cdc_poll::run(&sink, &state, &co)
            .await
            .unwrap();
        assert_eq!(r.batches.len(), 1, "{r:?}");
    }
    let delivered = route.drain().await;
    crate::events::validate(&delivered);
    let wanted: Vec<&Value> = delivered
        .iter()
        .filter(|e| e["detail-type"] == "Load Finished" || e["detail-type"] == "Batch Committed")
        .collect();
    assert_eq!(wanted.len(), 4, "{delivered:#?}");

    let api = RuntimeApi::start();
    let function = api.function("apply", &vars);
    let invoke = |e: &Value, n: usize| {
        api.invoke(
            "apply",
            Payload::Json(json!({"Records": [{
                "messageId": format!("m{n}"), "eventSource": "aws:sqs",
                "body": e.to_string(),
            }]})),
        )
        .unwrap_or_else(|err| panic!("apply failed: {err}\n{}", function.log()))
    };
    // Out of order: the second batch's message first (it applies the load and every batch
    // staged up to now), then the load's, a duplicate, the first batch's; the third batch's
    // message is lost.
    let first = invoke(wanted[2], 0);
    assert_eq!(first["outcome"], "applied", "{first:#}");
    assert_eq!(first["load_applied"], true, "{first:#}");
    assert_eq!(first["batches_applied"], 3, "{first:#}");
    for (n, e) in [wanted[0], wanted[2], wanted[1]].into_iter().enumerate() {
        let again = invoke(e, n + 1);
        assert_eq!(again["batches_applied"], 0, "{again:#}");
        assert_eq!(again["load_applied"], false, "{again:#}");
    }
    pgshift_tests::assert_same(&db.config(), &target.config()).await;
    // Another task's message or an unrelated one changes nothing.
    let other = invoke(
        &json!({"source": "pgshift", "detail-type": "Batch Committed", "detail": {"task": "someone-else"}}),
        9,
    );
    assert_eq!(other["outcome"], "ignored", "{other:#}");
    // More changes: the next message brings the target level again.
    c.batch_execute("truncate lines; update orders set note = 'after'")
        .await
        .unwrap();
    pgshift::job::cdc_poll::run(&sink, &state, &co)
        .await
        .unwrap();
    let next = route.drain().await;
    let batch = next
        .iter()
        .find(|e| e["detail-type"] == "Batch Committed")
        .expect("the batch's event");
    let applied = invoke(batch, 10);
    assert_eq!(applied["batches_applied"], 1, "{applied:#}");
    pgshift_tests::assert_same(&db.config(), &target.config()).await;
}
