//! The one place AWS SDK clients are built.
//!
//! Clients honour `AWS_ENDPOINT_URL` (and the service-specific `AWS_ENDPOINT_URL_<SERVICE>`)
//! through the SDK's own configuration loading, so the same code talks to AWS, to LocalStack or
//! to the moto server the tests start. S3 uses path-style addressing whenever an endpoint is
//! set, because emulators do not serve virtual-hosted buckets.

use aws_config::{BehaviorVersion, SdkConfig};

/// Shared SDK configuration and the clients built from it, once per cold start.
#[derive(Clone, Debug)]
pub struct Aws {
    config: SdkConfig,
}

impl Aws {
    /// Loads region, credentials and endpoint from the environment (the Lambda role on AWS).
    pub async fn from_env() -> Aws {
        Aws::with_choice(None, None).await
    }

    /// As [`Aws::from_env`], with a named profile and region (the CLI's `--profile` and
    /// `--region`) taking precedence over `AWS_PROFILE` / `AWS_REGION`.
    pub async fn with_choice(profile: Option<&str>, region: Option<&str>) -> Aws {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = region {
            loader = loader.region(aws_config::Region::new(r.to_owned()));
        }
        Aws {
            config: loader.load().await,
        }
    }

    /// The SDK configuration (for clients a function builds itself).
    pub fn sdk_config(&self) -> &SdkConfig {
        &self.config
    }

    /// Whether a custom endpoint (an emulator) is configured for every service.
    pub fn has_custom_endpoint(&self) -> bool {
        self.config.endpoint_url().is_some()
    }

    /// Whether S3 goes to a custom endpoint: the global one, or `AWS_ENDPOINT_URL_S3` (which
    /// the SDK honours on its own, and which wins).
    pub fn s3_has_custom_endpoint(&self) -> bool {
        self.has_custom_endpoint()
            || std::env::var("AWS_ENDPOINT_URL_S3").is_ok_and(|v| !v.trim().is_empty())
    }

    pub fn s3(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::config::Builder::from(&self.config)
            .force_path_style(self.s3_has_custom_endpoint())
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.config)
    }

    pub fn eventbridge(&self) -> aws_sdk_eventbridge::Client {
        aws_sdk_eventbridge::Client::new(&self.config)
    }

    pub fn secrets(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::new(&self.config)
    }
}
