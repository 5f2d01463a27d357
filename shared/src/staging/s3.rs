//! Objects in an S3 bucket under a prefix (multipart uploads).

use bytes::Bytes;

use super::{ObjectSink, ObjectWriter, check_key};
use crate::error::sdk_error;
use crate::error::{Error, Result};
// S3

/// Multipart part size: S3's minimum is 5 MiB; 8 MiB keeps a 10,000-part object above 80 GB.
pub const S3_PART_SIZE: usize = 8 << 20;

/// Objects in an S3 bucket under a prefix.
#[derive(Debug, Clone)]
pub struct S3Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    part_size: usize,
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
        })
    }

    /// Smaller parts (at least 5 MiB) for tests of the multipart path.
    pub fn with_part_size(mut self, part_size: usize) -> S3Sink {
        self.part_size = part_size.max(5 << 20);
        self
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
    parts: Vec<aws_sdk_s3::types::CompletedPart>,
    bytes: u64,
}

impl S3Writer {
    async fn flush_part(&mut self) -> Result<()> {
        let s3 = &self.sink.client;
        if self.upload_id.is_none() {
            let out = s3
                .create_multipart_upload()
                .bucket(&self.sink.bucket)
                .key(&self.key)
                .send()
                .await
                .map_err(|e| sdk_error("s3", format!("starting upload of {}", self.key), e))?;
            self.upload_id = out.upload_id().map(str::to_owned);
        }
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let number = self.parts.len() as i32 + 1;
        let body = std::mem::take(&mut self.buf);
        let out = s3
            .upload_part()
            .bucket(&self.sink.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .part_number(number)
            .body(Bytes::from(body).into())
            .send()
            .await
            .map_err(|e| sdk_error("s3", format!("uploading part {number} of {}", self.key), e))?;
        self.parts.push(
            aws_sdk_s3::types::CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build(),
        );
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.bytes += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.sink.part_size {
            self.flush_part().await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<u64> {
        let s3 = self.sink.client.clone();
        if self.upload_id.is_none() {
            let body = std::mem::take(&mut self.buf);
            s3.put_object()
                .bucket(&self.sink.bucket)
                .key(&self.key)
                .body(Bytes::from(body).into())
                .send()
                .await
                .map_err(|e| sdk_error("s3", format!("writing {}", self.key), e))?;
            return Ok(self.bytes);
        }
        if !self.buf.is_empty()
            && let Err(e) = self.flush_part().await
        {
            self.abort().await;
            return Err(e);
        }
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let done = aws_sdk_s3::types::CompletedMultipartUpload::builder()
            .set_parts(Some(std::mem::take(&mut self.parts)))
            .build();
        let result = s3
            .complete_multipart_upload()
            .bucket(&self.sink.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .multipart_upload(done)
            .send()
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

    async fn abort(self) {
        if let Some(id) = &self.upload_id {
            let _ = self
                .sink
                .client
                .abort_multipart_upload()
                .bucket(&self.sink.bucket)
                .key(&self.key)
                .upload_id(id)
                .send()
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
            bytes: 0,
        })
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let key = self.full_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .body(body.into())
            .send()
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
        while let Some(page) = pages.next().await {
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
            .await
            .map_err(|e| sdk_error("s3", format!("deleting {key}"), e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}
