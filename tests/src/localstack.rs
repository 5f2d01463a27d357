//! Tests for the LocalStack lane only (`scripts/test-localstack.sh`; `scripts/test.sh` runs
//! everything else on moto and leaves these out): the full-load state machine executed.
//!
//! The project's own ASL (`infra/statemachine/full-load.asl.json`, what the stack deploys) runs
//! on LocalStack's Step Functions through both Map branches. LocalStack cannot run the Lambda
//! functions on these machines (it downloads their runtime), so the `lambda:invoke` tasks are
//! answered by mocked integrations (`tests/fixtures/sfn-mock.json`, LocalStack's
//! `SFN_MOCK_CONFIG`, the Step Functions Local format): the real functions' output shapes, a
//! transient error (retried), terminal ones (caught into `LoadFailed` with the failing chunk
//! in the cause). The functions themselves run through the Lambda runtime API in
//! `lambda_runtime.rs`, in both lanes. An ASL edit that breaks a path fails here.

use std::time::{Duration, Instant};

use aws_sdk_sfn::types::{ExecutionStatus, HistoryEventType};
use pgshift_tests::env;

/// The mock configuration's state machine (its test cases are `<arn>#<case>`).
const MACHINE: &str = "pgshift-full-load-mocked";
/// The Distributed Map's item list (the mocked Plan points at it).
const BUCKET: &str = "pgshift-sfn-mocked";
const CHUNK_LIST: &str = "orders/_manifests/chunks.json";

struct Lane {
    sfn: aws_sdk_sfn::Client,
    machine: String,
}

impl Lane {
    async fn new() -> Lane {
        // Only on the lane: LocalStack started with the mock configuration.
        let mock = env("PGSHIFT_TEST_SFN_MOCK");
        assert!(
            std::path::Path::new(&mock).is_file(),
            "{mock} (SFN_MOCK_CONFIG) is missing"
        );
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let sfn = aws_sdk_sfn::Client::new(&conf);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let asl = std::fs::read_to_string(root.join("infra/statemachine/full-load.asl.json"))
            .expect("the state machine definition");
        // What the stack's DefinitionSubstitutions put there. The child workflows are
        // STANDARD here: LocalStack 4.9.2's ASL parser refuses EXPRESS (the template's
        // default, which AWS takes) for a Distributed Map.
        let definition = asl
            .replace(
                "${FullLoadFunctionArn}",
                "arn:aws:lambda:us-east-1:000000000000:function:pgshift-full-load",
            )
            .replace("${ChunkWorkflowType}", "STANDARD");
        let machine = match sfn
            .create_state_machine()
            .name(MACHINE)
            .definition(&definition)
            .role_arn("arn:aws:iam::000000000000:role/pgshift-full-load-machine")
            .send()
            .await
        {
            Ok(out) => out.state_machine_arn,
            Err(e) => panic!(
                "LocalStack refused the state machine: {}",
                aws_sdk_sfn::error::DisplayErrorContext(&e)
            ),
        };
        Lane { sfn, machine }
    }

    /// Runs test case `case` to its end: status, error, cause, output, the history's events.
    async fn run(
        &self,
        case: &str,
    ) -> (
        ExecutionStatus,
        Option<String>,
        Option<String>,
        Option<String>,
        Vec<HistoryEventType>,
    ) {
        self.run_with(case, "{}").await
    }

    /// [`Lane::run`] with the execution's input.
    async fn run_with(
        &self,
        case: &str,
        input: &str,
    ) -> (
        ExecutionStatus,
        Option<String>,
        Option<String>,
        Option<String>,
        Vec<HistoryEventType>,
    ) {
        let arn = self
            .sfn
            .start_execution()
            .state_machine_arn(format!("{}#{case}", self.machine))
            .input(input)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "start {case}: {}",
                    aws_sdk_sfn::error::DisplayErrorContext(&e)
                )
            })
            .execution_arn;
        let deadline = Instant::now() + Duration::from_secs(120);
        let out = loop {
            let d = self
                .sfn
                .describe_execution()
                .execution_arn(&arn)
                .send()
                .await
                .unwrap();
            if d.status != ExecutionStatus::Running {
                break d;
            }
            assert!(
                Instant::now() < deadline,
                "{case} still running after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let mut events = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .sfn
                .get_execution_history()
                .execution_arn(&arn)
                .set_next_token(token)
                .max_results(1000)
                .send()
                .await
                .unwrap();
            events.extend(page.events.iter().map(|e| e.r#type.clone()));
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        (out.status, out.error, out.cause, out.output, events)
    }
}

fn count(events: &[HistoryEventType], t: HistoryEventType) -> usize {
    events.iter().filter(|e| **e == t).count()
}

#[tokio::test]
async fn the_full_load_state_machine_runs_its_paths() {
    let lane = Lane::new().await;
    // The inline Map: every chunk exported, a transient error retried, then Finish.
    let (status, error, cause, output, events) = lane.run("InlineRetried").await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{error:?} {cause:?}");
    assert_eq!(
        count(&events, HistoryEventType::MapIterationSucceeded),
        3,
        "{events:?}"
    );
    assert!(
        count(&events, HistoryEventType::TaskFailed) >= 1,
        "the transient error was not raised: {events:?}"
    );
    let out: serde_json::Value = serde_json::from_str(output.as_deref().unwrap()).unwrap();
    assert_eq!(out["result"]["rows"], 30, "{out}");

    // The Distributed Map: 1,500 chunks read from the chunk list in S3.
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    );
    let _ = s3.create_bucket().bucket(BUCKET).send().await;
    let items: Vec<serde_json::Value> = (0..1500)
        .map(|n| serde_json::json!({"schema": "public", "table": "orders", "n": n}))
        .collect();
    s3.put_object()
        .bucket(BUCKET)
        .key(CHUNK_LIST)
        .body(serde_json::to_vec(&items).unwrap().into())
        .send()
        .await
        .unwrap();
    let (status, error, cause, _, events) = lane.run("Distributed").await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{error:?} {cause:?}");
    assert_eq!(
        count(&events, HistoryEventType::MapRunSucceeded),
        1,
        "{events:?}"
    );
    assert_eq!(count(&events, HistoryEventType::MapIterationSucceeded), 0);

    // A terminal error in a chunk: caught, the execution fails as FullLoadFailed naming it.
    let (status, error, cause, _, events) = lane.run("ChunkFails").await;
    assert_eq!(status, ExecutionStatus::Failed);
    assert_eq!(error.as_deref(), Some("FullLoadFailed"));
    let cause = cause.unwrap_or_default();
    assert!(cause.contains("chunk public.orders#1"), "{cause}");
    assert_eq!(
        count(&events, HistoryEventType::TaskSucceeded),
        1,
        "only Plan succeeds, Finish never runs: {events:?}"
    );

    // An execution started with `reload`: the reload's Plan and Finish (with the plan's
    // position), the same chunk Map between them.
    let (status, error, cause, output, events) = lane
        .run_with("Reload", r#"{"reload": ["public.orders"]}"#)
        .await;
    assert_eq!(status, ExecutionStatus::Succeeded, "{error:?} {cause:?}");
    assert_eq!(count(&events, HistoryEventType::MapIterationSucceeded), 2);
    let out: serde_json::Value = serde_json::from_str(output.as_deref().unwrap()).unwrap();
    assert_eq!(out["result"]["reload"], "0/16B3748", "{out}");
    assert_eq!(out["result"]["rows"], 20, "{out}");

    // A terminal Plan error is not retried: LoadFailed at once, its cause kept.
    let (status, error, cause, _, events) = lane.run("PlanFails").await;
    assert_eq!(status, ExecutionStatus::Failed);
    assert_eq!(error.as_deref(), Some("FullLoadFailed"));
    assert!(cause.unwrap_or_default().contains("selects no table"));
    assert_eq!(
        count(&events, HistoryEventType::TaskFailed),
        1,
        "{events:?}"
    );
}

/// Service-specific endpoints only (`AWS_ENDPOINT_URL_S3` for LocalStack's S3,
/// `AWS_ENDPOINT_URL_DYNAMODB` for moto's DynamoDB, no `AWS_ENDPOINT_URL`), as users split
/// services between emulators: the CLI stages to S3 with path-style addressing (an emulator on
/// 127.0.0.1 serves no virtual-hosted buckets) and keeps its state on the other emulator.
#[tokio::test]
async fn the_cli_follows_service_specific_endpoints() {
    let s3_endpoint = env("AWS_ENDPOINT_URL");
    let dynamodb_endpoint = env("AWS_ENDPOINT_URL_DYNAMODB");
    let aws = pgshift::aws::Aws::from_env().await;
    let bucket = pgshift_tests::emulator_bucket(&aws, "pgshift-split").await;
    let db = pgshift_tests::TestDb::new("ls_split").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.t (id int primary key, v text); insert into public.t values (1, 'a'), (2, 'b');",
    )
    .await
    .unwrap();
    let url = pgshift_tests::url(&db.config());
    let stage = format!("s3://{bucket}/split");
    let state = format!("dynamodb://{}", pgshift_tests::unique_name("pgshift-split"));
    let out = std::process::Command::new(pgshift_tests::pgshift_bin())
        .args([
            "full-load",
            "--task",
            "split",
            "--source",
            &url,
            "--stage",
            &stage,
            "--state",
            &state,
            "--json",
        ])
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_ENDPOINT_URL_S3", &s3_endpoint)
        .env("AWS_ENDPOINT_URL_DYNAMODB", &dynamodb_endpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rows"], 2, "{report}");
    let sink = pgshift::staging::S3Sink::new(aws.s3(), &stage).unwrap();
    let keys = pgshift::staging::ObjectSink::list(&sink, "public/t/")
        .await
        .unwrap();
    assert!(keys.iter().any(|k| k.contains("LOAD")), "{keys:?}");
}
