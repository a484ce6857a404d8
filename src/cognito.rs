//! Listing a Cognito user pool, as the daemon's reconciliation and the `cognito list-users` tool
//! both need it: every page of ListUsers, paced to a rate, with throttling retried inside that
//! pace.

use std::time::Duration;

use aws_sdk_cognitoidentityprovider::config::retry::RetryConfig;
use aws_sdk_cognitoidentityprovider::operation::list_users::ListUsersOutput;
use aws_sdk_cognitoidentityprovider::types::UserType;
use aws_sdk_cognitoidentityprovider::Client;

use crate::aws::errors::{code, is_throttling_code};
use crate::aws::from_sdk;
use crate::error::{Error, Result};
use crate::retry::Backoff;

/// ListUsers' page size limit on real Cognito.
pub const PAGE_SIZE: i32 = 60;
/// Attempts per ListUsers page while Cognito throttles, before the listing fails as a whole.
pub const THROTTLE_ATTEMPTS: u32 = 6;
const THROTTLE_FIRST_BACKOFF: Duration = Duration::from_millis(250);
const THROTTLE_MAX_BACKOFF: Duration = Duration::from_secs(8);

/// A user's attribute by name (`sub`, `email`, `preferred_username`...).
pub fn attribute<'a>(user: &'a UserType, name: &str) -> Option<&'a str> {
    user.attributes().iter().find(|a| a.name() == name).and_then(|a| a.value())
}

/// Every user of the pool, page by page; `each` sees every page as it arrives. Every ListUsers
/// call (retries included) is spaced by `pacer`.
///
/// With a rate limit the SDK's own retries are switched off for these calls, so that no attempt
/// escapes the pacer: throttling is retried here, with backoff, up to [`THROTTLE_ATTEMPTS`]
/// attempts per page.
pub async fn for_each_user_page(
    client: &Client,
    endpoint: &str,
    pool_id: &str,
    pacer: &mut Pacer,
    mut each: impl FnMut(&[UserType]) -> Result<()>,
) -> Result<usize> {
    let mut token: Option<String> = None;
    let mut n = 0;
    loop {
        let page = list_page(client, endpoint, pool_id, token.take(), pacer).await?;
        n += page.users().len();
        each(page.users())?;
        match page.pagination_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(n),
        }
    }
}

async fn list_page(
    client: &Client,
    endpoint: &str,
    pool_id: &str,
    token: Option<String>,
    pacer: &mut Pacer,
) -> Result<ListUsersOutput> {
    let context = || format!("Cognito ListUsers of pool {pool_id} at {endpoint}");
    let mut backoff = Backoff::with_floor(THROTTLE_FIRST_BACKOFF * 2, THROTTLE_MAX_BACKOFF);
    loop {
        pacer.wait().await;
        let request = client.list_users().user_pool_id(pool_id).limit(PAGE_SIZE).set_pagination_token(token.clone());
        let result = if pacer.is_limited() {
            request
                .customize()
                .config_override(
                    aws_sdk_cognitoidentityprovider::Config::builder().retry_config(RetryConfig::disabled()),
                )
                .send()
                .await
        } else {
            request.send().await
        };
        match result {
            Ok(page) => return Ok(page),
            Err(e) if code(&e).is_some_and(is_throttling_code) => {
                let code = code(&e).unwrap_or_default().to_string();
                if backoff.failures() + 1 >= THROTTLE_ATTEMPTS {
                    return Err(Error::Unavailable(format!(
                        "{}: still throttled ({code}) after {THROTTLE_ATTEMPTS} attempts",
                        context()
                    )));
                }
                let pause = backoff.next_delay();
                tracing::debug!(%code, attempt = backoff.failures(), pause = ?pause, "Cognito throttled ListUsers; backing off");
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(from_sdk(context(), e)),
        }
    }
}

/// Spaces calls at least `1 / max_rps` seconds apart: a simple interval pacer, which keeps the
/// rate under the limit over any window without bursts.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: Option<tokio::time::Instant>,
}

impl Pacer {
    pub fn per_second(max_rps: u32) -> Pacer {
        Pacer { interval: Duration::from_secs(1) / max_rps.max(1), next: None }
    }

    pub fn unlimited() -> Pacer {
        Pacer { interval: Duration::ZERO, next: None }
    }

    pub fn is_limited(&self) -> bool {
        !self.interval.is_zero()
    }

    /// Returns when the next call may start (at once for the first one).
    pub async fn wait(&mut self) {
        let now = tokio::time::Instant::now();
        let at = self.next.map_or(now, |n| n.max(now));
        tokio::time::sleep_until(at).await;
        self.next = Some(at + self.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_calls_by_the_rate() {
        let mut pacer = Pacer::per_second(5);
        let start = tokio::time::Instant::now();
        let mut at = Vec::new();
        for _ in 0..4 {
            pacer.wait().await;
            at.push(start.elapsed());
        }
        let ms: Vec<u128> = at.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 200, 400, 600]);
        // A slow caller does not earn a burst afterwards.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = start.elapsed();
        pacer.wait().await;
        pacer.wait().await;
        assert_eq!((start.elapsed() - before).as_millis(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_pacer_never_waits() {
        let mut pacer = Pacer::unlimited();
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            pacer.wait().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(!pacer.is_limited());
    }
}
