//! Events on the emulator's EventBridge (DESIGN §9): a rule routes pgshift's events to an SQS
//! FIFO queue, as the stack does; a full load and CDC drains put them, each valid against its
//! JSON Schema (`infra/events/`, checked by the `jsonschema` package, an independent
//! validator); a bus that refuses the put loses no batch and the batch is announced again.

use std::sync::Arc;

use pgshift::events;
use pgshift::job::full_load::{self, Progress};
use pgshift::options::LoadOptions;
use pgshift_tests::{Staging, env, unique_name};

/// A bus (created or not), a FIFO queue and a rule on the bus for `task`'s events.
pub(crate) struct Route {
    pub(crate) bus: String,
    pub(crate) queue_url: String,
    sqs: aws_sdk_sqs::Client,
    eb: aws_sdk_eventbridge::Client,
}

impl Route {
    pub(crate) async fn new(prefix: &str) -> Route {
        let _ = env("AWS_ENDPOINT_URL");
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let (sqs, eb) = (
            aws_sdk_sqs::Client::new(&conf),
            aws_sdk_eventbridge::Client::new(&conf),
        );
        let name = unique_name(prefix).replace('_', "-");
        let queue_url = sqs
            .create_queue()
            .queue_name(format!("{name}.fifo"))
            .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::ContentBasedDeduplication,
                "true",
            )
            .send()
            .await
            .unwrap_or_else(|e| panic!("AWS emulator unreachable or refused create_queue: {e:?}"))
            .queue_url
            .unwrap();
        Route {
            bus: name,
            queue_url,
            sqs,
            eb,
        }
    }

    /// Creates the bus and the rule (`source` pgshift, this task) delivering to the queue.
    pub(crate) async fn connect(&self, task: &str) {
        self.eb
            .create_event_bus()
            .name(&self.bus)
            .send()
            .await
            .unwrap();
        let pattern = serde_json::json!({"source": ["pgshift"], "detail": {"task": [task]}});
        self.eb
            .put_rule()
            .name(format!("{}-rule", self.bus))
            .event_bus_name(&self.bus)
            .event_pattern(pattern.to_string())
            .send()
            .await
            .unwrap();
        let arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        self.eb
            .put_targets()
            .rule(format!("{}-rule", self.bus))
            .event_bus_name(&self.bus)
            .targets(
                aws_sdk_eventbridge::types::Target::builder()
                    .id("queue")
                    .arn(arn)
                    .sqs_parameters(
                        aws_sdk_eventbridge::types::SqsParameters::builder()
                            .message_group_id(task)
                            .build(),
                    )
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
    }

    /// Every event the queue holds now, in order.
    pub(crate) async fn drain(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        loop {
            let got = self
                .sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(10)
                .send()
                .await
                .unwrap();
            let messages = got.messages.unwrap_or_default();
            if messages.is_empty() {
                return out;
            }
            for m in messages {
                out.push(serde_json::from_str(m.body.as_deref().unwrap()).unwrap());
                self.sqs
                    .delete_message()
                    .queue_url(&self.queue_url)
                    .receipt_handle(m.receipt_handle.unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
    }
}

/// Validates events against `infra/events/<detail-type>.schema.json` with Python's
/// `jsonschema` (the test virtualenv's), panicking with what is wrong.
pub(crate) fn validate(events: &[serde_json::Value]) {
    let python = env("PGSHIFT_TEST_PYTHON");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/events");
    let file = std::env::temp_dir().join(format!("{}.json", unique_name("events")));
    std::fs::write(&file, serde_json::to_vec(events).unwrap()).unwrap();
    let script = "import json, sys, jsonschema\n\
        events = json.load(open(sys.argv[1]))\n\
        for e in events:\n\
        \x20   name = e['detail-type'].lower().replace(' ', '-')\n\
        \x20   schema = json.load(open(f'{sys.argv[2]}/{name}.schema.json'))\n\
        \x20   jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(e)\n\
        print(len(events))\n";
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(&file)
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "events do not match their schemas: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        events.len().to_string()
    );
}

fn of_type<'a>(events: &'a [serde_json::Value], t: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["detail-type"] == t).collect()
}

#[tokio::test]
async fn a_load_and_cdc_put_their_events_and_a_failed_put_is_reannounced() {
    let s = Staging::new("events_src").await;
    let route = Route::new("pgshift-events").await;
    let task = "events-e2e";
    let aws = pgshift::aws::Aws::from_env().await;
    let bus = events::for_bus(&aws, Some(&route.bus));
    let c = s.db.client().await;
    c.batch_execute(
        "create table public.a (id int primary key, v text); insert into public.a select g, 'a' from generate_series(1, 100) g;
         create table public.b (id int primary key); insert into public.b select generate_series(1, 10);",
    )
    .await
    .unwrap();
    route.connect(task).await;
    let mut lo = LoadOptions::new(task, s.db.config(), "loader");
    lo.cdc = true;
    lo.events = bus.clone();
    full_load::run_local(&s.sink, &s.state, &lo, 2, Arc::new(Progress::default()))
        .await
        .unwrap();
    let loaded = route.drain().await;
    validate(&loaded);
    let tables: Vec<(&str, u64)> = of_type(&loaded, events::TABLE_LOADED)
        .iter()
        .map(|e| {
            (
                e["detail"]["table"].as_str().unwrap(),
                e["detail"]["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(tables.len(), 2, "{loaded:#?}");
    assert!(tables.contains(&("a", 100)) && tables.contains(&("b", 10)));
    let finished = of_type(&loaded, events::LOAD_FINISHED);
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["detail"]["rows"], 110);
    assert_eq!(finished[0]["source"], "pgshift");
    assert!(finished[0]["detail"].get("reload").is_none());

    // A reload of `a` into the running task: its Table Loaded names the reload's manifest,
    // its Load Finished carries R0 (an event-driven apply runs on it).
    let reloaded = pgshift::job::full_load::reload::run_local(
        &s.sink,
        &s.state,
        &lo,
        &[("public".to_owned(), "a".to_owned())],
        1,
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    let got = route.drain().await;
    validate(&got);
    let table = of_type(&got, events::TABLE_LOADED);
    assert_eq!(table.len(), 1, "{got:#?}");
    assert!(
        table[0]["detail"]["manifest_key"]
            .as_str()
            .unwrap()
            .starts_with("_manifests/reload/"),
        "{got:#?}"
    );
    let finished = of_type(&got, events::LOAD_FINISHED);
    assert_eq!(finished[0]["detail"]["reload"], reloaded.r0.to_string());
    assert_eq!(finished[0]["detail"]["rows"], 100);

    // CDC: two batches, each announced after its checkpoint moved.
    let mut co = pgshift::options::CdcOptions::new(task, s.db.config(), "poller");
    co.events = bus.clone();
    co.max_batch_changes = 50;
    for sql in [
        "update public.a set v = 'b' where id <= 60",
        "update public.a set v = 'c' where id > 60",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let r = pgshift::job::cdc_poll::run(&s.sink, &s.state, &co)
        .await
        .unwrap();
    assert_eq!(r.batches.len(), 2, "{r:?}");
    assert_eq!((r.events_put, r.events_failed), (2, 0));
    let got = route.drain().await;
    validate(&got);
    let keys: Vec<&str> = of_type(&got, events::BATCH_COMMITTED)
        .iter()
        .map(|e| e["detail"]["manifest_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, r.batches);
    assert_eq!(got[0]["detail"]["changes"], 60);
    assert_eq!(got[0]["detail"]["tables"][0]["table"], "a");

    // EventBridge unreachable (the put fails whatever the emulator): the batch is staged all
    // the same.
    let mut broken = co.clone();
    let unreachable = aws_sdk_eventbridge::Client::from_conf(
        aws_sdk_eventbridge::config::Builder::from(aws.sdk_config())
            .endpoint_url("http://127.0.0.1:9")
            .build(),
    );
    broken.events = events::Events::to(Arc::new(events::EventBridge::new(
        unreachable,
        route.bus.clone(),
    )));
    c.batch_execute("delete from public.b where id <= 3")
        .await
        .unwrap();
    let missed = pgshift::job::cdc_poll::run(&s.sink, &s.state, &broken)
        .await
        .unwrap();
    assert_eq!(missed.batches.len(), 1);
    assert_eq!((missed.events_put, missed.events_failed), (0, 1));
    assert_eq!(missed.checkpoint, missed.target);
    assert!(route.drain().await.is_empty());
    // The next poll on the working bus announces it again, flagged, then its own batch.
    c.batch_execute("insert into public.b values (1000)")
        .await
        .unwrap();
    let next = pgshift::job::cdc_poll::run(&s.sink, &s.state, &co)
        .await
        .unwrap();
    let got = route.drain().await;
    validate(&got);
    let batches: Vec<(&str, bool)> = of_type(&got, events::BATCH_COMMITTED)
        .iter()
        .map(|e| {
            (
                e["detail"]["manifest_key"].as_str().unwrap(),
                e["detail"]["reannounced"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        batches,
        [
            (missed.batches[0].as_str(), true),
            (next.batches[0].as_str(), false)
        ]
    );
    // A source that refuses the poll: the failure is an event an operator's rule can route.
    let mut bad = co.clone();
    bad.source.dbname = "pgshift_no_such_database".to_owned();
    pgshift::job::cdc_poll::run(&s.sink, &s.state, &bad)
        .await
        .unwrap_err();
    let got = route.drain().await;
    validate(&got);
    let failed = of_type(&got, events::TASK_STATE_CHANGED);
    assert_eq!(failed.len(), 1, "{got:#?}");
    assert_eq!(failed[0]["detail"]["state"], "PollFailed");
    let message = failed[0]["detail"]["message"].as_str().unwrap();
    assert!(message.contains("pgshift_no_such_database"), "{message}");
    if let Some(pw) = &co.source.password {
        use secrecy::ExposeSecret;
        assert!(!message.contains(pw.expose_secret()), "{message}");
    }
}
