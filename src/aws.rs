//! One `SdkConfig` and the three service clients, with the endpoint overrides of `[aws]`.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

use crate::config::AwsConfig;

/// The clients every component shares; cheap to clone.
#[derive(Clone, Debug)]
pub struct Clients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub streams: aws_sdk_dynamodbstreams::Client,
    pub cognito: aws_sdk_cognitoidentityprovider::Client,
    pub endpoints: Endpoints,
}

/// Where each client points, for messages that must name the endpoint at fault.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub dynamodb: String,
    pub streams: String,
    pub cognito: String,
}

pub async fn sdk_config(cfg: &AwsConfig) -> SdkConfig {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(cfg.call_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(cfg.region.clone()))
        .timeout_config(timeouts);
    if cfg.emulator_credentials {
        loader = loader.test_credentials();
    }
    loader.load().await
}

pub async fn clients(cfg: &AwsConfig) -> Clients {
    let sdk = sdk_config(cfg).await;
    let default_endpoint = |service: &str| format!("https://{service}.{}.amazonaws.com", cfg.region);

    let mut ddb = aws_sdk_dynamodb::config::Builder::from(&sdk);
    if let Some(url) = cfg.dynamodb_endpoint() {
        ddb = ddb.endpoint_url(url);
    }
    let mut streams = aws_sdk_dynamodbstreams::config::Builder::from(&sdk);
    if let Some(url) = cfg.streams_endpoint() {
        streams = streams.endpoint_url(url);
    }
    let mut cognito = aws_sdk_cognitoidentityprovider::config::Builder::from(&sdk);
    if let Some(url) = cfg.cognito_endpoint() {
        cognito = cognito.endpoint_url(url);
    }
    Clients {
        dynamodb: aws_sdk_dynamodb::Client::from_conf(ddb.build()),
        streams: aws_sdk_dynamodbstreams::Client::from_conf(streams.build()),
        cognito: aws_sdk_cognitoidentityprovider::Client::from_conf(cognito.build()),
        endpoints: Endpoints {
            dynamodb: cfg.dynamodb_endpoint().map(str::to_string).unwrap_or_else(|| default_endpoint("dynamodb")),
            streams: cfg.streams_endpoint().map(str::to_string).unwrap_or_else(|| default_endpoint("streams.dynamodb")),
            cognito: cfg.cognito_endpoint().map(str::to_string).unwrap_or_else(|| default_endpoint("cognito-idp")),
        },
    }
}
