//! The integration-test harness: where the services are, and per-test resources that clean up
//! after themselves.
//!
//! Services are found through environment variables that `scripts/test.sh` sets (point them at
//! your own servers to reuse them):
//! - `PGSHIFT_TEST_PG_URL`: superuser URL of a PostgreSQL 15 cluster with `wal_level=logical`;
//! - `PGSHIFT_TEST_PG_REPLICA_URL`: superuser URL of a cluster with `wal_level=replica`;
//! - `PGSHIFT_TEST_CA_FILE`: the CA that signed the clusters' server certificate;
//! - `AWS_ENDPOINT_URL`: the AWS emulator (moto or LocalStack).
//!
//! A missing variable or an unreachable service fails the test with a message saying how to
//! start them; tests never skip.

use std::sync::atomic::{AtomicU32, Ordering};

use pgshift::config::PgConfig;
use tokio_postgres::Client;

/// Reads a required environment variable or fails the test with a clear message.
pub fn env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: run the tests with ./scripts/test.sh, which starts PostgreSQL and the AWS emulator{}",
            if std::env::var("CI").as_deref() == Ok("true") {
                " (CI=true: services are required)"
            } else {
                ""
            }
        ),
    }
}

/// The superuser configuration of the logical cluster.
pub fn admin_config() -> PgConfig {
    PgConfig::from_url(&env("PGSHIFT_TEST_PG_URL"), "PGSHIFT_TEST_PG_URL")
        .expect("PGSHIFT_TEST_PG_URL")
}

/// The superuser configuration of the `wal_level=replica` cluster.
pub fn replica_admin_config() -> PgConfig {
    PgConfig::from_url(
        &env("PGSHIFT_TEST_PG_REPLICA_URL"),
        "PGSHIFT_TEST_PG_REPLICA_URL",
    )
    .expect("PGSHIFT_TEST_PG_REPLICA_URL")
}

/// A session for test set-up (not through the code under test's settings).
pub async fn connect(cfg: &PgConfig) -> Client {
    pgshift::source::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("test PostgreSQL at {} is unreachable: {e}", cfg.target()))
}

/// A name no other test uses: `<prefix>_<pid>_<n>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A database of its own for one test, with roles it created; dropped (with its slots and
/// roles) when the value is dropped.
pub struct TestDb {
    pub name: String,
    admin: PgConfig,
    roles: Vec<String>,
}

impl TestDb {
    /// A fresh database on the logical cluster.
    pub async fn new(prefix: &str) -> TestDb {
        TestDb::on(admin_config(), prefix).await
    }

    /// A fresh database on the cluster `admin` points at.
    pub async fn on(admin: PgConfig, prefix: &str) -> TestDb {
        let name = unique_name(prefix);
        let client = connect(&admin).await;
        client
            .batch_execute(&format!(
                "create database {}",
                pgshift::source::quote_ident(&name)
            ))
            .await
            .expect("create test database");
        TestDb {
            name,
            admin,
            roles: Vec::new(),
        }
    }

    /// Superuser settings for this database.
    pub fn config(&self) -> PgConfig {
        self.admin.with_dbname(&self.name)
    }

    /// A superuser session on this database.
    pub async fn client(&self) -> Client {
        connect(&self.config()).await
    }

    /// Creates a login role (dropped with the database) and returns settings to connect as it.
    pub async fn create_role(&mut self, attributes: &str) -> PgConfig {
        let role = unique_name("role");
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&self.admin).await;
        admin
            .batch_execute(&format!(
                "create role {} login password '{password}' {attributes}",
                pgshift::source::quote_ident(&role)
            ))
            .await
            .expect("create role");
        self.roles.push(role.clone());
        let mut cfg = self.config();
        cfg.user = role;
        cfg.password = Some(password.into());
        cfg
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        let roles = std::mem::take(&mut self.roles);
        // Drop runs inside the test's runtime: clean up on a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let Ok(client) = pgshift::source::connect(&admin).await else { return };
                let _ = client
                    .execute(
                        "select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = $1 and not active",
                        &[&name],
                    )
                    .await;
                let _ = client
                    .batch_execute(&format!(
                        "drop database if exists {} with (force)",
                        pgshift::source::quote_ident(&name)
                    ))
                    .await;
                for role in roles {
                    let q = pgshift::source::quote_ident(&role);
                    let _ = client.batch_execute(&format!("drop role if exists {q}")).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// The `pgshift` binary built beside the test binary (`cargo test --workspace` builds it).
pub fn pgshift_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("pgshift");
    assert!(
        bin.exists(),
        "{} not found: build the workspace (cargo build --workspace) before the tests",
        bin.display()
    );
    bin
}

/// Runs the `pgshift` binary: exit code (`None` when killed by a signal), stdout, stderr.
pub fn run_cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(pgshift_bin())
        .args(args)
        .output()
        .expect("run pgshift");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub mod replay;

/// A folder of its own for one test, removed when dropped.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(&format!("pgshift-{prefix}")));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new bucket in the AWS emulator (`AWS_ENDPOINT_URL`), named after `prefix`.
pub async fn emulator_bucket(aws: &pgshift::aws::Aws, prefix: &str) -> String {
    let _ = env("AWS_ENDPOINT_URL");
    let name = unique_name(prefix).replace('_', "-");
    aws.s3()
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("AWS emulator unreachable or refused create_bucket: {e:?}"));
    name
}

/// A `postgres://` URL of `cfg` (for running the CLI in tests).
pub fn url(cfg: &PgConfig) -> String {
    let pw = cfg
        .password
        .as_ref()
        .map(|p| secrecy::ExposeSecret::expose_secret(p).to_owned())
        .unwrap_or_default();
    format!(
        "postgres://{}:{}@{}:{}/{}",
        cfg.user, pw, cfg.host, cfg.port, cfg.dbname
    )
}

/// A test database with a folder sink and a file state store of its own.
pub struct Staging {
    pub db: TestDb,
    pub sink: pgshift::staging::LocalSink,
    pub state: pgshift::state::FileStore,
    pub dir: TempDir,
}

impl Staging {
    pub async fn new(prefix: &str) -> Staging {
        let dir = TempDir::new(prefix);
        Staging {
            db: TestDb::new(prefix).await,
            sink: pgshift::staging::LocalSink::new(dir.path().join("stage")),
            state: pgshift::state::FileStore::new(dir.path().join("state")),
            dir,
        }
    }

    /// One CDC poll of `task` into this stage, with the default options.
    pub async fn poll(&self, task: &str) -> pgshift::state::records::PollReport {
        let opts = pgshift::options::CdcOptions::new(task, self.db.config(), "poller");
        pgshift::job::cdc_poll::run(&self.sink, &self.state, &opts)
            .await
            .unwrap_or_else(|e| panic!("cdc poll of {task}: {e}"))
    }
}

/// Asserts `validate` finds the target equal to the source (every table).
pub async fn assert_same(source: &PgConfig, target: &PgConfig) {
    let v = pgshift::job::validate::run(source, target, &pgshift::selection::Selection::all())
        .await
        .unwrap_or_else(|e| panic!("validate: {e}"));
    assert!(v.equal, "{v:#?}");
}

/// The `pgshift` command for one task of a test: its own stage and state folders, and the
/// source's and target's URLs.
pub struct CliTask {
    pub src: String,
    pub dst: String,
    /// The state folder (`--state`), for commands that take no `--stage`.
    pub state: String,
    common: Vec<String>,
    _dir: TempDir,
}

impl CliTask {
    pub fn new(task: &str, source: &PgConfig, target: &PgConfig) -> CliTask {
        let dir = TempDir::new(task);
        let path = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
        CliTask {
            src: url(source),
            dst: url(target),
            state: path("state"),
            common: vec![
                "--task".to_owned(),
                task.to_owned(),
                "--stage".to_owned(),
                path("stage"),
                "--state".to_owned(),
                path("state"),
            ],
            _dir: dir,
        }
    }

    /// Runs `pgshift <args>` with the `--task/--stage/--state` its command takes
    /// ([`CliTask::common_for`]): (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        run_cli(&[args, &self.common_for(args)[..]].concat())
    }

    /// The common arguments the command in `args` takes (a flag a command would ignore is an
    /// error): `validate` only `--task`; `apply` `--state` only when it drains CDC itself
    /// (`--until` with `--source`); the other commands all three.
    pub fn common_for(&self, args: &[&str]) -> Vec<&str> {
        let all = self.common();
        match args.first() {
            Some(&"validate") => all[..2].to_vec(),
            Some(&"apply") if !(args.contains(&"--until") && args.contains(&"--source")) => {
                all[..4].to_vec()
            }
            _ => all,
        }
    }

    /// `apply` to the target, then `validate` source against target; both must succeed.
    /// Returns validate's report (its `EQUAL <table>` lines).
    pub fn apply_and_validate(&self) -> String {
        let (code, out, err) = self.run(&["apply", "--target", &self.dst]);
        assert_eq!(code, Some(0), "apply: {out}{err}");
        let (code, out, err) =
            self.run(&["validate", "--source", &self.src, "--target", &self.dst]);
        assert_eq!(code, Some(0), "validate: {out}{err}");
        out
    }

    /// The `--task .. --stage .. --state ..` arguments, for a command run another way.
    pub fn common(&self) -> Vec<&str> {
        self.common.iter().map(String::as_str).collect()
    }
}

/// Where a test kills a poll run, as a crash of the process would (the steps of DESIGN §4),
/// by wrapping the sink or the state store the run is given (production options carry no
/// test hooks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// After the peek returned rows, before any file is complete.
    AfterPeek,
    /// After the first table file of a batch is complete.
    AfterFirstFile,
    /// After every file of a batch, before the manifest.
    AfterFiles,
    /// After the manifest, before the checkpoint moves.
    AfterManifest,
    /// After the checkpoint moved, before the slot advances.
    AfterCheckpoint,
}

impl Kill {
    /// Runs one poll against the PostgreSQL source of `opts`, killed at this step.
    pub async fn poll<S, St>(
        self,
        sink: &S,
        state: &St,
        opts: &pgshift::options::CdcOptions,
    ) -> pgshift::Result<pgshift::state::records::PollReport>
    where
        S: pgshift::staging::ObjectSink + Clone,
        St: pgshift::state::StateStore + Clone,
    {
        use pgshift::job::cdc_poll::poll;
        use pgshift::staging::{Crash, UnreliableSink};
        use pgshift::state::UnreliableStore;
        use pgshift::state::unreliable::StoreCrash;
        let source = pgshift::source::PgSource::connect(&opts.source).await?;
        let sink_dies = |crash| UnreliableSink::new(sink.clone(), crash);
        // Writes of the `cdc` item: the lease, its renewal at the first peek, then the
        // checkpoint.
        let store_dies = |crash| UnreliableStore::new(state.clone(), crash);
        let checkpoint = || ("cdc".to_owned(), 2);
        match self {
            Kill::AfterPeek => {
                poll(
                    &source,
                    &sink_dies(Crash::at_object("/cdc/", 0)),
                    state,
                    opts,
                )
                .await
            }
            Kill::AfterFirstFile => {
                poll(
                    &source,
                    &sink_dies(Crash::at_object("/cdc/", 1)),
                    state,
                    opts,
                )
                .await
            }
            Kill::AfterFiles => {
                poll(
                    &source,
                    &sink_dies(Crash::at_object("_manifests/cdc/", 0)),
                    state,
                    opts,
                )
                .await
            }
            Kill::AfterManifest => {
                let (key, n) = checkpoint();
                poll(
                    &source,
                    sink,
                    &store_dies(StoreCrash::BeforePut { key, n }),
                    opts,
                )
                .await
            }
            Kill::AfterCheckpoint => {
                let (key, n) = checkpoint();
                poll(
                    &source,
                    sink,
                    &store_dies(StoreCrash::AfterPut { key, n }),
                    opts,
                )
                .await
            }
        }
    }
}
