//! State in a DynamoDB table.

// SDK calls are boxed (`.send().boxed()`): their futures are tens of KB each, and inline they
// would grow every future that waits on one (the poller's per-message futures, in debug
// builds past a test thread's 2 MiB stack).
use futures_util::FutureExt;
use serde_json::Value;

use super::{StateStore, Versioned, conflict};
use crate::error::{Error, Result};
use aws_sdk_dynamodb::types::AttributeValue;

use crate::error::sdk_error;
// DynamoDB

/// State in a DynamoDB table (`pk` S, `sk` S; on-demand).
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> DynamoStore {
        DynamoStore {
            client,
            table: table.into(),
        }
    }

    /// Creates the table if it does not exist (the CLI and tests; on AWS the stack creates it).
    pub async fn ensure_table(&self) -> Result<()> {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        let exists = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .boxed()
            .await;
        match exists {
            Ok(_) => return Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) => {}
            Err(e) => {
                return Err(sdk_error(
                    "dynamodb",
                    format!("describing table {}", self.table),
                    e,
                ));
            }
        }
        let attr = |n: &str| {
            AttributeDefinition::builder()
                .attribute_name(n)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Error::config("state", e.to_string()))
        };
        let key = |n: &str, t: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(n)
                .key_type(t)
                .build()
                .map_err(|e| Error::config("state", e.to_string()))
        };
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr("pk")?)
            .attribute_definitions(attr("sk")?)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .send()
            .boxed()
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error(
                "dynamodb",
                format!("creating table {}", self.table),
                e,
            )),
        }
    }
}

/// JSON to a DynamoDB attribute (numbers stay numbers).
pub(super) fn to_attr(v: &Value) -> AttributeValue {
    match v {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Array(a) => AttributeValue::L(a.iter().map(to_attr).collect()),
        Value::Object(o) => {
            AttributeValue::M(o.iter().map(|(k, v)| (k.clone(), to_attr(v))).collect())
        }
    }
}

pub(super) fn from_attr(a: &AttributeValue) -> Value {
    match a {
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::N(n) => n
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| n.parse::<i64>().map(Value::from))
            .or_else(|_| n.parse::<f64>().map(Value::from))
            .unwrap_or(Value::Null),
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::L(l) => Value::Array(l.iter().map(from_attr).collect()),
        AttributeValue::M(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), from_attr(v))).collect())
        }
        _ => Value::Null,
    }
}

impl StateStore for DynamoStore {
    async fn get(&self, task: &str, key: &str) -> Result<Option<Versioned>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(task.to_owned()))
            .key("sk", AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .boxed()
            .await
            .map_err(|e| sdk_error("dynamodb", format!("reading {task}/{key}"), e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let version = item
            .get("version")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::config("state", format!("{task}/{key} has no version attribute"))
            })?;
        let doc = item.get("doc").map(from_attr).unwrap_or(Value::Null);
        Ok(Some(Versioned { version, doc }))
    }

    async fn put(&self, task: &str, key: &str, doc: &Value, expected: Option<u64>) -> Result<u64> {
        let version = expected.unwrap_or(0) + 1;
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(task.to_owned()))
            .item("sk", AttributeValue::S(key.to_owned()))
            .item("version", AttributeValue::N(version.to_string()))
            .item("doc", to_attr(doc));
        req = match expected {
            None => req.condition_expression("attribute_not_exists(pk)"),
            Some(v) => req
                .condition_expression("version = :expected")
                .expression_attribute_values(":expected", AttributeValue::N(v.to_string())),
        };
        match req.send().boxed().await {
            Ok(_) => Ok(version),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(conflict(task, key, expected))
            }
            Err(e) => Err(sdk_error("dynamodb", format!("writing {task}/{key}"), e)),
        }
    }

    async fn delete(&self, task: &str, key: &str) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(task.to_owned()))
            .key("sk", AttributeValue::S(key.to_owned()))
            .send()
            .boxed()
            .await
            .map_err(|e| sdk_error("dynamodb", format!("deleting {task}/{key}"), e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("dynamodb://{}", self.table)
    }
}
