//! Objects in an S3 bucket under a prefix (multipart uploads).

use aws_sdk_s3::types::ServerSideEncryption;
use bytes::Bytes;
// SDK calls are boxed (`.send().boxed()`): their futures are tens of KB each, and inline they
// would grow every future that waits on one (the poller's per-message futures, in debug
// builds past a test thread's 2 MiB stack).
use futures_util::FutureExt;

use super::{ObjectSink, ObjectWriter, check_key};
use crate::error::sdk_error;
use crate::error::{Error, Result};
// S3

/// Multipart part size: S3's minimum is 5 MiB; 8 MiB keeps a 10,000-part object above 80 GB.
pub const S3_PART_SIZE: usize = 8 << 20;

/// How written objects are encrypted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Encryption {
    /// The bucket's default encryption (SSE-S3, or the KMS key the bucket names).
    #[default]
    BucketDefault,
    /// SSE-KMS with this key (its id, ARN or alias), or S3's AWS-managed key (`aws/s3`);
    /// with an S3 Bucket Key, so KMS is asked once per object, not per part.
    Kms { key_id: Option<String> },
}

/// Objects in an S3 bucket under a prefix.
#[derive(Debug, Clone)]
pub struct S3Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    part_size: usize,
    encryption: Encryption,
}

impl S3Sink {
    /// `url` is `s3://bucket[/prefix]`.
    pub fn new(client: aws_sdk_s3::Client, url: &str) -> Result<S3Sink> {
        let (bucket, prefix) = parse_s3_url(url)?;
        Ok(S3Sink {
            client,
            bucket,
            prefix,
            part_size: S3_PART_SIZE,
            encryption: Encryption::BucketDefault,
        })
    }

    /// Objects written encrypted as `encryption` says (DMS's `EncryptionMode` and
    /// `ServerSideEncryptionKmsKeyId`).
    pub fn with_encryption(mut self, encryption: Encryption) -> S3Sink {
        self.encryption = encryption;
        self
    }

    /// The SSE-KMS request settings, when asked: (key id, bucket key).
    fn kms(&self) -> Option<(Option<String>, bool)> {
        match &self.encryption {
            Encryption::BucketDefault => None,
            Encryption::Kms { key_id } => Some((key_id.clone(), true)),
        }
    }

    /// Smaller parts (at least 5 MiB) for tests of the multipart path.
    pub fn with_part_size(mut self, part_size: usize) -> S3Sink {
        self.part_size = part_size.max(5 << 20);
        self
    }

    /// A PutObject of `full_key`, encrypted as asked.
    fn put_request(
        &self,
        full_key: &str,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        let put = self.client.put_object().bucket(&self.bucket).key(full_key);
        match self.kms() {
            Some((key_id, bucket_key)) => put
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id)
                .bucket_key_enabled(bucket_key),
            None => put,
        }
    }

    /// The bucket and full object key of `key` (for a Distributed Map's ItemReader).
    pub fn locate(&self, key: &str) -> Result<(String, String)> {
        Ok((self.bucket.clone(), self.full_key(key)?))
    }

    fn full_key(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }
}

/// Splits `s3://bucket/prefix` (prefix without leading or trailing `/`).
pub fn parse_s3_url(url: &str) -> Result<(String, String)> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        Error::config("stage", format!("{url:?} is not an s3://bucket/prefix URL"))
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid_bucket {
        return Err(Error::config(
            "stage",
            format!(
                "{bucket:?} is not a valid S3 bucket name (3-63 lowercase letters, digits, '-', '.')"
            ),
        ));
    }
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

pub struct S3Writer {
    sink: S3Sink,
    key: String,
    buf: Vec<u8>,
    upload_id: Option<String>,
    /// Parts uploaded, and parts uploading while the writer goes on filling the next one (at
    /// most [`PARTS_IN_FLIGHT`]): the export never waits for S3 unless S3 is the slower side.
    parts: Vec<aws_sdk_s3::types::CompletedPart>,
    uploading: std::collections::VecDeque<
        tokio::task::JoinHandle<Result<aws_sdk_s3::types::CompletedPart>>,
    >,
    next_part: i32,
    bytes: u64,
}

/// Parts of one object uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

impl S3Writer {
    /// Hands the buffer to a background upload as the next part (starting the multipart
    /// upload first); waits for the oldest upload when [`PARTS_IN_FLIGHT`] are running.
    async fn flush_part(&mut self) -> Result<()> {
        let s3 = self.sink.client.clone();
        if self.upload_id.is_none() {
            let mut start = s3
                .create_multipart_upload()
                .bucket(&self.sink.bucket)
                .key(&self.key);
            if let Some((key_id, bucket_key)) = self.sink.kms() {
                start = start
                    .server_side_encryption(ServerSideEncryption::AwsKms)
                    .set_ssekms_key_id(key_id)
                    .bucket_key_enabled(bucket_key);
            }
            let out = start
                .send()
                .boxed()
                .await
                .map_err(|e| sdk_error("s3", format!("starting upload of {}", self.key), e))?;
            self.upload_id = out.upload_id().map(str::to_owned);
        }
        while self.uploading.len() >= PARTS_IN_FLIGHT {
            self.collect_one().await?;
        }
        let upload_id = self.upload_id.clone().unwrap_or_default();
        self.next_part += 1;
        let number = self.next_part;
        let body = Bytes::from(std::mem::take(&mut self.buf));
        let (bucket, key) = (self.sink.bucket.clone(), self.key.clone());
        self.uploading.push_back(tokio::spawn(async move {
            let out = s3
                .upload_part()
                .bucket(&bucket)
                .key(&key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(body.into())
                .send()
                .boxed()
                .await
                .map_err(|e| sdk_error("s3", format!("uploading part {number} of {key}"), e))?;
            Ok(aws_sdk_s3::types::CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build())
        }));
        Ok(())
    }

    /// Waits for the oldest part upload.
    async fn collect_one(&mut self) -> Result<()> {
        if let Some(handle) = self.uploading.pop_front() {
            let part = handle.await.map_err(|e| Error::Io {
                context: format!("a part upload of {} did not finish", self.key),
                source: std::io::Error::other(e.to_string()),
            })??;
            self.parts.push(part);
        }
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.bytes += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.sink.part_size
            && let Err(e) = self.flush_part().await
        {
            // Aborting here: the caller may drop the writer without calling abort.
            self.cancel_uploads().await;
            return Err(e);
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<u64> {
        let s3 = self.sink.client.clone();
        if self.upload_id.is_none() {
            let body = std::mem::take(&mut self.buf);
            self.sink
                .put_request(&self.key)
                .body(Bytes::from(body).into())
                .send()
                .boxed()
                .await
                .map_err(|e| sdk_error("s3", format!("writing {}", self.key), e))?;
            return Ok(self.bytes);
        }
        let mut flushed = Ok(());
        if !self.buf.is_empty() {
            flushed = self.flush_part().await;
        }
        while flushed.is_ok() && !self.uploading.is_empty() {
            flushed = self.collect_one().await;
        }
        if let Err(e) = flushed {
            self.abort().await;
            return Err(e);
        }
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        let done = aws_sdk_s3::types::CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let result = s3
            .complete_multipart_upload()
            .bucket(&self.sink.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .multipart_upload(done)
            .send()
            .boxed()
            .await;
        match result {
            Ok(_) => Ok(self.bytes),
            Err(e) => {
                let err = sdk_error("s3", format!("completing upload of {}", self.key), e);
                self.abort().await;
                Err(err)
            }
        }
    }

    async fn abort(mut self) {
        self.cancel_uploads().await;
    }
}

impl S3Writer {
    /// Stops the part uploads and aborts the multipart upload (S3 then frees its parts).
    async fn cancel_uploads(&mut self) {
        for handle in self.uploading.drain(..) {
            handle.abort();
        }
        if let Some(id) = self.upload_id.take() {
            let _ = self
                .sink
                .client
                .abort_multipart_upload()
                .bucket(&self.sink.bucket)
                .key(&self.key)
                .upload_id(&id)
                .send()
                .boxed()
                .await;
        }
    }
}

impl ObjectSink for S3Sink {
    type Writer = S3Writer;

    async fn writer(&self, key: &str) -> Result<S3Writer> {
        Ok(S3Writer {
            key: self.full_key(key)?,
            sink: self.clone(),
            buf: Vec::new(),
            upload_id: None,
            parts: Vec::new(),
            uploading: std::collections::VecDeque::new(),
            next_part: 0,
            bytes: 0,
        })
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let key = self.full_key(key)?;
        self.put_request(&key)
            .body(body.into())
            .send()
            .boxed()
            .await
            .map_err(|e| sdk_error("s3", format!("writing {key}"), e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let Some(mut reader) = self.reader(key).await? else {
            return Ok(None);
        };
        let mut body = Vec::new();
        while let Some(piece) = reader.next().await? {
            body.extend_from_slice(&piece);
        }
        Ok(Some(Bytes::from(body)))
    }

    async fn reader(&self, key: &str) -> Result<Option<super::ObjectReader>> {
        let key = self.full_key(key)?;
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .boxed()
            .await
        {
            Ok(o) => o,
            Err(e) => {
                if e.as_service_error().is_some_and(|se| se.is_no_such_key()) {
                    return Ok(None);
                }
                return Err(sdk_error("s3", format!("reading {key}"), e));
            }
        };
        let stream =
            futures_util::stream::try_unfold((out.body, key), |(mut body, key)| async move {
                match body.try_next().await {
                    Ok(Some(b)) => Ok(Some((b, (body, key)))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(Error::Aws {
                        service: "s3",
                        context: format!("reading {key}"),
                        detail: e.to_string(),
                        transient: true,
                        source: Some(Box::new(e)),
                    }),
                }
            });
        Ok(Some(super::ObjectReader::new(stream)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let full = if self.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = Box::pin(pages.next()).await {
            let page = page.map_err(|e| sdk_error("s3", format!("listing {full}"), e))?;
            for obj in page.contents() {
                if let Some(k) = obj.key() {
                    out.push(k[strip.min(k.len())..].to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let key = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .boxed()
            .await
            .map_err(|e| sdk_error("s3", format!("deleting {key}"), e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}
