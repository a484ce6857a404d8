//! One `SdkConfig` and the three service clients, with the endpoint overrides of `[aws]`, and
//! what their errors mean ([`errors`]).

pub(crate) mod errors;

pub(crate) use errors::from_sdk;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

use crate::config::AwsConfig;

/// Attempts per AWS call, the first included (the SDK's standard retry mode).
pub(crate) const CALL_ATTEMPTS: u32 = 3;
/// The SDK's pause before retry `n` (from 1) is a random fraction of `RETRY_BASE * 2^(n-1)`,
/// capped at the max backoff, so all pauses of one call add up to at most
/// `(2^(CALL_ATTEMPTS-1) - 1) * RETRY_BASE`. The cap is set to the longest of them, so that a
/// service's retry-after hint cannot stretch a pause past what `call_bound` counts.
const RETRY_BASE: Duration = Duration::from_secs(1);

/// The longest one AWS call can take with every attempt and every pause between them. The SDK
/// is told to give up then (`operation_timeout`), so a loop that makes one call per turn can
/// promise its next turn by then, whatever the network does (see `TailerStatus::turn_limit`).
pub(crate) fn call_bound(call_timeout: Duration) -> Duration {
    call_timeout * CALL_ATTEMPTS + RETRY_BASE * ((1 << (CALL_ATTEMPTS - 1)) - 1)
}

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

pub(crate) async fn sdk_config(cfg: &AwsConfig) -> SdkConfig {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(cfg.call_timeout)
        .operation_timeout(call_bound(cfg.call_timeout))
        .build();
    // The SDK's defaults but for the pause cap, spelled out because `call_bound` depends on
    // them (so `AWS_MAX_ATTEMPTS` and `AWS_RETRY_MODE` do not apply).
    let retries = RetryConfig::standard()
        .with_max_attempts(CALL_ATTEMPTS)
        .with_initial_backoff(RETRY_BASE)
        .with_max_backoff(RETRY_BASE * (1 << (CALL_ATTEMPTS - 2)));
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(cfg.region.clone()))
        .timeout_config(timeouts)
        .retry_config(retries);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_bounded_by_its_attempts_and_pauses() {
        // Three 10 s attempts and pauses of at most 1 s and 2 s.
        assert_eq!(call_bound(Duration::from_secs(10)), Duration::from_secs(33));
        assert_eq!(call_bound(Duration::from_millis(500)), Duration::from_millis(4500));
    }
}
