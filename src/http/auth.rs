//! Cognito JWT verification for the HTTP API (SPEC section 5).
//!
//! A request's `Authorization` header goes through, in this order:
//!
//! 1. **Header**: `Bearer <token>` (scheme case-insensitive, one space, an RFC 6750 `b68token`
//!    of bounded length). Anything else is [`AuthError::Missing`] or [`AuthError::BadScheme`].
//! 2. **Cache**: successful verifications are cached under the SHA-256 of the token until the
//!    token's `exp` (capped at [`CACHE_TTL_CAP`]), so a hot client costs one hash and one lookup.
//!    A hit is re-checked against the clock, so an expired token is never served from the cache.
//!    Failures are never cached.
//! 3. **Header of the JWT**: `alg` must be `RS256` (checked before any key is touched, so `none`,
//!    `HS256` signed with the public key, and everything else fail the same way), `kid` present.
//! 4. **Key**: looked up by `kid` in the cached JWKS. An unknown `kid` refetches the JWKS, at
//!    most once per [`REFETCH_MIN_INTERVAL`] across all requests: one fetch is in flight at a
//!    time and concurrent requests wait for its result instead of fetching again. Besides, the
//!    JWKS is refetched every `auth.jwks_refresh_interval` ([`Authenticator::spawn_refresh`]),
//!    sooner when its `Cache-Control: max-age` says so: a key the pool stopped publishing stops
//!    verifying at the first successful refresh without it, cached verifications included (each
//!    remembers the key that verified it and the key set's generation). A failed refresh keeps
//!    the keys loaded before.
//! 5. **Signature and registered claims** by jsonwebtoken: RS256 only, `exp` required, `exp` and
//!    `nbf` with [`LEEWAY_SECS`] of leeway, `iss` equal to the configured issuer.
//! 6. **Cognito claims**: `token_use` as configured; `client_id` (access tokens) or `aud`
//!    (id tokens) equal to the configured app client; `sub` present and non-empty.
//!
//! An [`Authenticator`] is built for one [`AuthConfig`]; a reload that changes `[auth]` builds a
//! new one (the cache is keyed by the token only).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{AuthConfig, TokenUse};
use crate::dependency::Dependencies;
use crate::metrics::{Metrics, RunLabels, RunResult};

/// Leeway on `exp` and `nbf` (SPEC section 5: at most 60 s).
pub(crate) const LEEWAY_SECS: u64 = 60;
/// An unknown `kid` refetches the JWKS at most this often (SPEC section 5).
pub(crate) const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Bound on one JWKS fetch, connect to last byte.
pub(crate) const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A verified token stays cached until its `exp`, but never longer than this (a key removed
/// from the JWKS stops being honoured within this bound).
pub(crate) const CACHE_TTL_CAP: Duration = Duration::from_secs(10 * 60);
/// Verified tokens kept at most.
pub(crate) const CACHE_MAX_ENTRIES: u64 = 100_000;
/// Longest token accepted; Cognito's are 1-2 KB. Longer ones are rejected unparsed.
pub(crate) const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

pub(crate) use crate::model::CognitoSub;

/// What a valid token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub sub: CognitoSub,
    /// The token's `exp`.
    pub expires_at: SystemTime,
}

/// Why a request is not authenticated. Every message is one sentence meant for the client; none
/// contains any part of the token. Only [`AuthError::JwksUnavailable`] is the server's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the request has no Authorization header; send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the Authorization header must be `Bearer` followed by one space and a token")]
    BadScheme,
    #[error("the bearer token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token must be signed with RS256")]
    Algorithm,
    #[error("the token header has no key id (kid)")]
    NoKid,
    #[error("the token was signed with a key this user pool does not publish")]
    UnknownKid,
    #[error("the token signature is invalid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was not issued by the configured user pool")]
    Issuer,
    #[error("the token is not of the accepted kind (token_use)")]
    TokenUse,
    #[error("the token was issued to a different app client (client_id)")]
    ClientId,
    #[error("the token was issued for a different audience (aud)")]
    Audience,
    #[error("the token has no subject (sub)")]
    NoSubject,
    /// No JWKS could be fetched at all, so nothing can be verified. `detail` (the URL and the
    /// cause) is for logs, not for clients.
    #[error("the token signing keys are unavailable; try again later")]
    JwksUnavailable { detail: String },
}

impl AuthError {
    /// The RFC 6750 `error` attribute for `WWW-Authenticate: Bearer error="..."`: none when
    /// the request sent no credentials at all (section 3.1: the client may not know that
    /// authentication is needed, so it gets a plain `Bearer` challenge), `invalid_request` when
    /// the Authorization header is not a usable bearer credential, `invalid_token` otherwise.
    /// (Not meaningful for [`AuthError::JwksUnavailable`], which is answered 503.)
    pub fn www_authenticate_error(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing => None,
            AuthError::BadScheme => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }

    /// True only when verification could not happen because no JWKS could be fetched (503);
    /// every other error means the token was looked at and refused (401).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuthError::JwksUnavailable { .. })
    }

    /// Every value [`AuthError::reason`] returns: the `reason` label values of
    /// `auth_failures_total`, each exported from the first scrape on.
    pub const REASONS: [&'static str; 15] = [
        "missing",
        "bad_scheme",
        "malformed",
        "algorithm",
        "no_kid",
        "unknown_kid",
        "signature",
        "expired",
        "not_yet_valid",
        "issuer",
        "token_use",
        "client_id",
        "audience",
        "no_subject",
        "jwks_unavailable",
    ];

    /// A short stable name for logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::BadScheme => "bad_scheme",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::NoKid => "no_kid",
            AuthError::UnknownKid => "unknown_kid",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Issuer => "issuer",
            AuthError::TokenUse => "token_use",
            AuthError::ClientId => "client_id",
            AuthError::Audience => "audience",
            AuthError::NoSubject => "no_subject",
            AuthError::JwksUnavailable { .. } => "jwks_unavailable",
        }
    }
}

/// Extracts the token from an `Authorization` header value: `Bearer` (any case), exactly one
/// space, then a non-empty RFC 6750 `b64token` (`[A-Za-z0-9-._~+/]+=*`) of at most
/// [`MAX_TOKEN_LEN`] bytes. Surrounding whitespace (HTTP OWS) is ignored.
#[cfg(test)]
fn bearer_token(header_value: Option<&str>) -> Result<&str, AuthError> {
    let token = bearer_credentials(header_value)?;
    check_b64token(token)?;
    Ok(token)
}

/// The part of `bearer_token` that finds the token, without looking at its characters: a
/// token found in the verified cache was checked when it was verified, so the per-byte pass
/// runs only on a miss.
fn bearer_credentials(header_value: Option<&str>) -> Result<&str, AuthError> {
    let value = header_value.map(|v| v.trim_matches([' ', '\t'])).unwrap_or_default();
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::BadScheme)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.starts_with([' ', '\t']) {
        return Err(AuthError::BadScheme);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed("it is too long"));
    }
    Ok(token)
}

fn check_b64token(token: &str) -> Result<(), AuthError> {
    let body = token.trim_end_matches('=');
    let b64token = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
    if body.is_empty() || !body.bytes().all(b64token) {
        return Err(AuthError::Malformed("it contains characters a bearer token cannot contain"));
    }
    Ok(())
}

/// The authenticator in force, replaced as a whole when a reload changes `[auth]`: requests
/// already verifying keep the one they started with.
#[derive(Debug)]
pub struct AuthSlot(std::sync::RwLock<Authenticator>);

impl AuthSlot {
    pub(crate) fn new(auth: Authenticator) -> Self {
        AuthSlot(std::sync::RwLock::new(auth))
    }

    pub(crate) fn current(&self) -> Authenticator {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn replace(&self, auth: Authenticator) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = auth;
    }
}

/// Verifies Cognito JWTs. Cheap to clone; clones share keys, cache and counters.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    client_id: String,
    token_use: TokenUse,
    jwks_url: String,
    http: reqwest::Client,
    validation: Validation,
    refetch_interval: Duration,
    refresh_interval: Duration,
    keys: RwLock<Option<Arc<KeySet>>>,
    /// The generation of the key set in force. Raised before a set that drops or changes a key
    /// is stored, so a cached verification made with an older set is re-checked on its next hit.
    generation: AtomicU64,
    /// Held while a fetch is in flight; holds when the last one started.
    fetch: tokio::sync::Mutex<Option<Instant>>,
    /// `Cache-Control: max-age` of the last successful fetch.
    max_age: Mutex<Option<Duration>>,
    /// Set from a failed fetch until the next successful one: a failure streak is logged once.
    failing: AtomicBool,
    cache: moka::future::Cache<[u8; 32], CachedToken>,
    verifications: AtomicU64,
    fetches: AtomicU64,
    metrics: Option<Arc<Metrics>>,
    /// Set once: by the builder, or by a reload once this authenticator's first fetch worked
    /// (a trial fetch that fails must not mark the JWKS in force as degraded).
    health: std::sync::OnceLock<Arc<Dependencies>>,
    /// Stops the scheduled refresh when the last clone of this authenticator goes (a reload
    /// replaced it).
    refresh_stop: CancellationToken,
    _refresh_guard: DropGuard,
}

/// The usable keys of one JWKS document.
struct KeySet {
    keys: HashMap<String, PublishedKey>,
    generation: u64,
}

#[derive(Clone)]
struct PublishedKey {
    key: Arc<DecodingKey>,
    /// The RSA modulus and exponent as published: a refresh that publishes the same ones under
    /// the same kid keeps the same `key`, so verifications cached with it stay valid.
    components: (String, String),
}

#[derive(Clone)]
struct CachedToken {
    verified: Verified,
    exp: u64,
    ttl: Duration,
    kid: Arc<str>,
    /// The key that verified the token and the generation of the set it came from.
    key: Arc<DecodingKey>,
    generation: u64,
}

struct CachedTokenExpiry;

impl moka::Expiry<[u8; 32], CachedToken> for CachedTokenExpiry {
    fn expire_after_create(&self, _key: &[u8; 32], value: &CachedToken, _created_at: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// How long a token verified at `now` (unix seconds) with this `exp` may stay cached: until its
/// `exp`, capped; None when it must not be cached at all (already at or past `exp`, which the
/// leeway can allow).
fn cache_ttl(exp: u64, now: u64, cap: Duration) -> Option<Duration> {
    let left = exp.checked_sub(now).filter(|&s| s > 0)?;
    Some(Duration::from_secs(left).min(cap))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    token_use: Option<String>,
    client_id: Option<String>,
    aud: Option<Audience>,
    // Presence and format are checked by jsonwebtoken; a NumericDate may be fractional.
    exp: serde_json::Number,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, client_id: &str) -> bool {
        match self {
            Audience::One(a) => a == client_id,
            Audience::Many(all) => all.iter().any(|a| a == client_id),
        }
    }
}

/// How an [`Authenticator`] is made: [`Authenticator::builder`].
pub struct AuthenticatorBuilder<'a> {
    cfg: &'a AuthConfig,
    http: reqwest::Client,
    keys: Option<HashMap<String, (String, String)>>,
    refetch_interval: Duration,
    leeway: u64,
    metrics: Option<Arc<Metrics>>,
    health: Option<Arc<Dependencies>>,
}

impl AuthenticatorBuilder<'_> {
    /// Keys from `jwks_json` (a JWKS document) instead of a first fetch; an unknown `kid` and
    /// the scheduled refresh still fetch from `cfg.jwks_url`. For benchmarks and offline tests.
    pub fn jwks(mut self, jwks_json: &[u8]) -> Result<Self, AuthError> {
        self.keys = Some(parse_jwks(jwks_json).map_err(|detail| AuthError::JwksUnavailable { detail })?);
        Ok(self)
    }

    /// Another minimum interval between refetches for an unknown `kid` (SPEC: 30 s), so that
    /// tests of key rotation need not wait that long.
    pub fn refetch_interval(mut self, interval: Duration) -> Self {
        self.refetch_interval = interval;
        self
    }

    /// Counts every JWKS fetch in `jwks_refreshes_total`.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reports every JWKS fetch to `health.jwks` (`/readyz`, `dependency_up`).
    pub fn health(mut self, health: Arc<Dependencies>) -> Self {
        self.health = Some(health);
        self
    }

    #[cfg(test)]
    fn leeway(mut self, leeway: u64) -> Self {
        self.leeway = leeway;
        self
    }

    pub fn build(self) -> Authenticator {
        let cfg = self.cfg;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // token_use decides between client_id and aud; checked after decoding.
        validation.validate_aud = false;
        validation.set_issuer(&[&cfg.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let cache =
            moka::future::Cache::builder().max_capacity(CACHE_MAX_ENTRIES).expire_after(CachedTokenExpiry).build();
        let keys = self.keys.map(|published| Arc::new(key_set(published, None, 0)));
        let refresh_stop = CancellationToken::new();
        Authenticator {
            inner: Arc::new(Inner {
                issuer: cfg.issuer.clone(),
                client_id: cfg.client_id.clone(),
                token_use: cfg.token_use,
                jwks_url: cfg.jwks_url.clone(),
                http: self.http,
                validation,
                refetch_interval: self.refetch_interval,
                refresh_interval: cfg.jwks_refresh_interval,
                keys: RwLock::new(keys),
                generation: AtomicU64::new(0),
                fetch: tokio::sync::Mutex::new(None),
                max_age: Mutex::new(None),
                failing: AtomicBool::new(false),
                cache,
                verifications: AtomicU64::new(0),
                fetches: AtomicU64::new(0),
                metrics: self.metrics,
                health: self.health.map(std::sync::OnceLock::from).unwrap_or_default(),
                _refresh_guard: refresh_stop.clone().drop_guard(),
                refresh_stop,
            }),
        }
    }
}

/// A key set from the published `(n, e)` per kid, keeping the decoded key of `old` wherever a
/// kid publishes the same components.
fn key_set(published: HashMap<String, (String, String)>, old: Option<&KeySet>, generation: u64) -> KeySet {
    let mut keys = HashMap::with_capacity(published.len());
    for (kid, components) in published {
        let kept = old.and_then(|o| o.keys.get(&kid)).filter(|k| k.components == components).cloned();
        let key = match kept {
            Some(k) => k,
            None => match DecodingKey::from_rsa_components(&components.0, &components.1) {
                Ok(key) => PublishedKey { key: Arc::new(key), components },
                Err(err) => {
                    tracing::warn!(kid, "skipping a JWKS key that is not a valid RSA key: {err}");
                    continue;
                }
            },
        };
        keys.insert(kid, key);
    }
    KeySet { keys, generation }
}

impl Authenticator {
    /// An authenticator with no keys yet: call [`Authenticator::refresh_jwks`] at start (a
    /// verification with no keys fetches them itself, within the refetch limit).
    pub fn new(cfg: &AuthConfig, http: reqwest::Client) -> Self {
        Self::builder(cfg, http).build()
    }

    pub fn builder(cfg: &AuthConfig, http: reqwest::Client) -> AuthenticatorBuilder<'_> {
        AuthenticatorBuilder {
            cfg,
            http,
            keys: None,
            refetch_interval: REFETCH_MIN_INTERVAL,
            leeway: LEEWAY_SECS,
            metrics: None,
            health: None,
        }
    }

    /// Reports this authenticator's fetches to `health.jwks` from now on (no-op when it already
    /// reports somewhere), starting with its JWKS loaded state.
    pub fn report_to(&self, health: Arc<Dependencies>) {
        if self.inner.health.set(health.clone()).is_ok() && self.jwks_loaded() {
            health.jwks.ok();
        }
    }

    /// True once a JWKS with at least one usable key has been loaded (the readiness check).
    pub fn jwks_loaded(&self) -> bool {
        self.current_keys().is_some()
    }

    /// Fetches the JWKS now (regardless of the refetch limit) and returns how many usable RS256
    /// keys it holds. On failure the keys loaded before, if any, stay in force.
    pub async fn refresh_jwks(&self) -> Result<usize, AuthError> {
        let mut last = self.inner.fetch.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_store().await
    }

    /// Refetches the JWKS every `auth.jwks_refresh_interval` (or its `max-age`, when shorter,
    /// but not more often than [`REFETCH_MIN_INTERVAL`]) until the last clone of this
    /// authenticator is dropped. After a failure the next attempt comes within
    /// [`REFETCH_MIN_INTERVAL`]. Needs a tokio runtime.
    pub fn spawn_refresh(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let stop = self.inner.refresh_stop.clone();
        let first = self.next_refresh(true);
        tokio::spawn(refresh_loop(weak, stop, first))
    }

    /// When the next scheduled refresh is due after a fetch that succeeded (or not).
    fn next_refresh(&self, succeeded: bool) -> Duration {
        let interval = self.inner.refresh_interval;
        if !succeeded {
            return interval.min(REFETCH_MIN_INTERVAL);
        }
        match *self.inner.max_age.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(max_age) => interval.min(max_age.max(REFETCH_MIN_INTERVAL)),
            None => interval,
        }
    }

    /// JWKS fetches attempted so far (successful or not).
    pub fn jwks_fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// Full (RSA) verifications attempted so far; cache hits do not count.
    pub fn verifications(&self) -> u64 {
        self.inner.verifications.load(Ordering::Relaxed)
    }

    /// Verifies the raw `Authorization` header value (None when the header is absent).
    pub async fn verify(&self, header_value: Option<&str>) -> Result<Verified, AuthError> {
        let token = bearer_credentials(header_value)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.inner.cache.get(&digest).await {
            // moka's expiry has its own clock and granularity: the token's exp decides.
            if hit.exp > unix_now() && self.still_published(&hit) {
                return Ok(hit.verified);
            }
            self.inner.cache.invalidate(&digest).await;
        }
        check_b64token(token)?;
        // Boxed: the cold path may fetch the JWKS, whose future would otherwise make every
        // cached verification's future kilobytes larger.
        let (verified, exp, cached) = Box::pin(self.verify_uncached(token)).await?;
        if let Some(ttl) = cache_ttl(exp, unix_now(), CACHE_TTL_CAP) {
            let entry = CachedToken { verified: verified.clone(), exp, ttl, ..cached };
            self.inner.cache.insert(digest, entry).await;
        }
        Ok(verified)
    }

    /// Whether the key that verified a cached token is still in the key set in force: free
    /// while no refresh dropped or changed a key since, a lookup otherwise.
    fn still_published(&self, hit: &CachedToken) -> bool {
        if hit.generation == self.inner.generation.load(Ordering::Acquire) {
            return true;
        }
        self.lookup(&hit.kid).is_some_and(|(key, _)| Arc::ptr_eq(&key, &hit.key))
    }

    /// The verified token, its `exp`, and a cache entry's key fields (the rest filled by the caller).
    async fn verify_uncached(&self, token: &str) -> Result<(Verified, u64, CachedToken), AuthError> {
        let kid = check_header(token)?;
        let (key, generation) = self.key_for(&kid).await?;
        self.inner.verifications.fetch_add(1, Ordering::Relaxed);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.inner.validation).map_err(map_jwt_error)?;
        let claims = data.claims;
        self.check_cognito_claims(&claims)?;
        let sub = match claims.sub {
            Some(s) if !s.is_empty() => CognitoSub(s),
            _ => return Err(AuthError::NoSubject),
        };
        let exp = claims
            .exp
            .as_u64()
            .or_else(|| claims.exp.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
            .ok_or(AuthError::Malformed("its exp claim is not a date"))?;
        let expires_at = UNIX_EPOCH.checked_add(Duration::from_secs(exp)).unwrap_or(UNIX_EPOCH);
        let verified = Verified { sub, expires_at };
        let entry =
            CachedToken { verified: verified.clone(), exp, ttl: Duration::ZERO, kid: kid.into(), key, generation };
        Ok((verified, exp, entry))
    }

    fn check_cognito_claims(&self, claims: &Claims) -> Result<(), AuthError> {
        let kind = claims.token_use.as_deref();
        let is_access = match (self.inner.token_use, kind) {
            (TokenUse::Access | TokenUse::Any, Some("access")) => true,
            (TokenUse::Id | TokenUse::Any, Some("id")) => false,
            _ => return Err(AuthError::TokenUse),
        };
        let client_id = self.inner.client_id.as_str();
        if is_access {
            if claims.client_id.as_deref() != Some(client_id) {
                return Err(AuthError::ClientId);
            }
        } else if !claims.aud.as_ref().is_some_and(|a| a.contains(client_id)) {
            return Err(AuthError::Audience);
        }
        Ok(())
    }

    fn current_keys(&self) -> Option<Arc<KeySet>> {
        self.inner.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The key published under `kid` and the generation of the set it belongs to.
    fn lookup(&self, kid: &str) -> Option<(Arc<DecodingKey>, u64)> {
        self.current_keys().and_then(|set| set.keys.get(kid).map(|k| (k.key.clone(), set.generation)))
    }

    /// The key for `kid`, refetching the JWKS at most once per refetch interval. One fetch is
    /// in flight at a time; requests that waited for it use its result.
    async fn key_for(&self, kid: &str) -> Result<(Arc<DecodingKey>, u64), AuthError> {
        if let Some(key) = self.lookup(kid) {
            return Ok(key);
        }
        let mut last = self.inner.fetch.lock().await;
        if let Some(key) = self.lookup(kid) {
            return Ok(key);
        }
        let recent = last.is_some_and(|t| t.elapsed() < self.inner.refetch_interval);
        let outcome = if recent {
            None
        } else {
            *last = Some(Instant::now());
            Some(self.fetch_and_store().await)
        };
        drop(last);
        if let Some(key) = self.lookup(kid) {
            return Ok(key);
        }
        if self.jwks_loaded() {
            return Err(AuthError::UnknownKid);
        }
        Err(match outcome {
            Some(Err(e)) => e,
            _ => AuthError::JwksUnavailable {
                detail: format!("no JWKS loaded from {} and the last attempt was too recent", self.inner.jwks_url),
            },
        })
    }

    /// One fetch of the JWKS; stores its keys when it holds at least one usable key. The caller
    /// holds the fetch lock.
    async fn fetch_and_store(&self) -> Result<usize, AuthError> {
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let url = &self.inner.jwks_url;
        let fetched = match tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch_jwks(&self.inner.http, url)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no complete answer within {JWKS_FETCH_TIMEOUT:?}")),
        };
        let parsed = fetched.and_then(|(body, max_age)| Ok((parse_jwks(&body)?, max_age)));
        let count = |result| {
            if let Some(m) = &self.inner.metrics {
                m.jwks_refreshes.get_or_create(&RunLabels { result }).inc();
            }
        };
        match parsed {
            Ok((published, max_age)) => {
                count(RunResult::success);
                if let Some(h) = self.inner.health.get() {
                    h.jwks.ok();
                }
                let (n, changed) = self.store_keys(published);
                *self.inner.max_age.lock().unwrap_or_else(|p| p.into_inner()) = max_age;
                if self.inner.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(jwks_url = %url, keys = n, "the JWKS loads again");
                } else if changed {
                    tracing::info!(jwks_url = %url, keys = n, "loaded the JWKS");
                } else {
                    tracing::debug!(jwks_url = %url, keys = n, "the JWKS is unchanged");
                }
                Ok(n)
            }
            Err(e) => {
                count(RunResult::failure);
                let detail = format!("fetching the JWKS from {url}: {e}");
                if let Some(h) = self.inner.health.get() {
                    h.jwks.failed(&detail);
                }
                let kept = self.current_keys().map_or(0, |k| k.keys.len());
                // One line per failure streak: a JWKS outage must not fill the log.
                if !self.inner.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        "{detail}; the {kept} key(s) loaded before stay in force (logged once until it works again)"
                    );
                } else {
                    tracing::debug!("{detail}");
                }
                Err(AuthError::JwksUnavailable { detail })
            }
        }
    }

    /// Puts a freshly fetched key set in force. Returns how many keys it holds and whether it
    /// differs from the set before. When a key was dropped or changed, the generation is raised
    /// first, so that no cached verification can pass as current with a key of the old set.
    fn store_keys(&self, published: HashMap<String, (String, String)>) -> (usize, bool) {
        let mut slot = self.inner.keys.write().unwrap_or_else(|p| p.into_inner());
        let old = slot.clone();
        let dropped = old
            .as_ref()
            .is_some_and(|o| o.keys.iter().any(|(kid, k)| published.get(kid).is_none_or(|c| *c != k.components)));
        let mut generation = old.as_ref().map_or(0, |o| o.generation);
        if dropped {
            generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        }
        let set = key_set(published, old.as_deref(), generation);
        let n = set.keys.len();
        let changed = old.as_ref().is_none_or(|o| dropped || o.keys.len() != n);
        if dropped {
            let gone: Vec<&String> =
                old.iter().flat_map(|o| o.keys.keys()).filter(|k| !set.keys.contains_key(*k)).collect();
            tracing::info!(?gone, "the JWKS no longer publishes some keys; tokens signed with them stop verifying");
        }
        *slot = Some(Arc::new(set));
        (n, changed)
    }
}

/// The scheduled refresh of one authenticator (see [`Authenticator::spawn_refresh`]).
async fn refresh_loop(weak: Weak<Inner>, stop: CancellationToken, first: Duration) {
    let mut delay = first;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        let auth = Authenticator { inner };
        let succeeded = {
            let mut last = auth.inner.fetch.lock().await;
            *last = Some(Instant::now());
            auth.fetch_and_store().await.is_ok()
        };
        delay = auth.next_refresh(succeeded);
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuer", &self.inner.issuer)
            .field("jwks_url", &self.inner.jwks_url)
            .field("token_use", &self.inner.token_use)
            .field("jwks_loaded", &self.jwks_loaded())
            .finish_non_exhaustive()
    }
}

/// The body of a JWKS answer and its `Cache-Control: max-age`, if any.
async fn fetch_jwks(http: &reqwest::Client, url: &str) -> Result<(Vec<u8>, Option<Duration>), String> {
    let mut resp = http.get(url).timeout(JWKS_FETCH_TIMEOUT).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let max_age = resp.headers().get(reqwest::header::CACHE_CONTROL).and_then(|v| v.to_str().ok()).and_then(max_age);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("the document is larger than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, max_age))
}

/// The `max-age` directive of a `Cache-Control` value (`no-cache`/`no-store` count as 0).
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').map(str::trim).find_map(|directive| {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return Some(Duration::ZERO);
        }
        let secs = lower.strip_prefix("max-age=")?.trim_matches('"').parse::<u64>().ok()?;
        Some(Duration::from_secs(secs))
    })
}

/// The usable keys of a JWKS document (jsonwebtoken's `JwkSet`): RSA keys with a `kid`, meant
/// for signatures (no `use`, or `sig`) with RS256 (no `alg`, or `RS256`), each as its `(n, e)`.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, (String, String)>, String> {
    let jwks: JwkSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &jwks.keys {
        let (Some(kid), AlgorithmParameters::RSA(rsa)) = (&jwk.common.key_id, &jwk.algorithm) else { continue };
        let for_signatures = jwk.common.public_key_use.as_ref().is_none_or(|u| *u == PublicKeyUse::Signature);
        let rs256 = jwk.common.key_algorithm.is_none_or(|a| a == KeyAlgorithm::RS256);
        if kid.is_empty() || !for_signatures || !rs256 {
            continue;
        }
        // Decoded here too, so a document whose every key is broken counts as no JWKS at all.
        match DecodingKey::from_jwk(jwk) {
            Ok(_) => {
                keys.insert(kid.clone(), (rsa.n.clone(), rsa.e.clone()));
            }
            Err(err) => tracing::warn!(kid, "skipping a JWKS key that is not a valid RSA key: {err}"),
        }
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable RS256 key".into());
    }
    Ok(keys)
}

/// Checks the JWT header before any key is touched: RS256 only, no `crit`, a `kid`. Returns it.
fn check_header(token: &str) -> Result<String, AuthError> {
    match jsonwebtoken::decode_header(token) {
        Ok(h) => {
            if h.alg != Algorithm::RS256 {
                return Err(AuthError::Algorithm);
            }
            if h.crit.is_some() {
                return Err(AuthError::Malformed("its header names critical extensions this server does not support"));
            }
            match h.kid {
                Some(kid) if !kid.is_empty() => Ok(kid),
                _ => Err(AuthError::NoKid),
            }
        }
        // jsonwebtoken refuses algorithms it does not know (`none` among them) as a parse error:
        // tell them apart from garbage by looking at the raw header.
        Err(_) => Err(match raw_alg(token) {
            Some(alg) if alg != "RS256" => AuthError::Algorithm,
            _ => AuthError::Malformed("it is not a signed JWT"),
        }),
    }
}

/// The `alg` string of a JWT's header, if the header is base64url JSON with a string `alg`.
fn raw_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
    value.get("alg")?.as_str().map(str::to_owned)
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            AuthError::Algorithm
        }
        ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
            "sub" => AuthError::NoSubject,
            "iss" => AuthError::Issuer,
            "exp" => AuthError::Malformed("it has no exp claim"),
            _ => AuthError::Malformed("a required claim is missing"),
        },
        ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed("a claim has the wrong type"),
        ErrorKind::Json(_) => AuthError::Malformed("its claims are not the JSON a Cognito token carries"),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
            AuthError::Malformed("it is not a signed JWT")
        }
        // Key problems cannot come from the token (keys are parsed when the JWKS is loaded);
        // whatever else jsonwebtoken reports, the signature was not shown to be valid.
        _ => AuthError::Signature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const TEST_PEM: &[u8] = include_bytes!("../../tests/fixtures/test-rsa.pem");
    const TEST_JWKS: &[u8] = include_bytes!("../../tests/fixtures/test-rsa-jwks.json");
    const TEST_KID: &str = "test-key";

    fn cfg(token_use: TokenUse) -> AuthConfig {
        AuthConfig {
            user_pool_id: "us-east-1_test".into(),
            client_id: "client-1".into(),
            issuer: "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_test".into(),
            // Nothing listens there: an unknown kid fails to refetch, fast.
            jwks_url: "http://127.0.0.1:9/jwks.json".into(),
            token_use,
            ..AuthConfig::default()
        }
    }

    fn auth_with_leeway(leeway: u64) -> Authenticator {
        Authenticator::builder(&cfg(TokenUse::Access), reqwest::Client::new())
            .jwks(TEST_JWKS)
            .unwrap()
            .leeway(leeway)
            .build()
    }

    fn sign(claims: &serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(TEST_KID.into());
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_rsa_pem(TEST_PEM).unwrap()).unwrap()
    }

    fn access_claims(exp: u64) -> serde_json::Value {
        json!({
            "iss": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_test",
            "sub": "sub-1", "token_use": "access", "client_id": "client-1", "exp": exp,
        })
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(None), Err(AuthError::Missing));
        assert_eq!(bearer_token(Some("")), Err(AuthError::Missing));
        assert_eq!(bearer_token(Some("   ")), Err(AuthError::Missing));
        assert_eq!(bearer_token(Some("Bearer abc.def.ghi")), Ok("abc.def.ghi"));
        assert_eq!(bearer_token(Some("bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("BEARER abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("  Bearer abc  ")), Ok("abc"));
        assert_eq!(bearer_token(Some("Bearer a+b/c~d-e_f.g==")), Ok("a+b/c~d-e_f.g=="));
        assert_eq!(bearer_token(Some("Basic dXNlcjpwYXNz")), Err(AuthError::BadScheme));
        assert_eq!(bearer_token(Some("Bearer")), Err(AuthError::BadScheme));
        assert_eq!(bearer_token(Some("Bearerabc")), Err(AuthError::BadScheme));
        assert_eq!(bearer_token(Some("Bearer  abc")), Err(AuthError::BadScheme));
        assert_eq!(bearer_token(Some("Bearer\tabc")), Err(AuthError::BadScheme));
        assert_eq!(bearer_token(Some("Bearer ")), Err(AuthError::BadScheme));
        assert!(matches!(bearer_token(Some("Bearer a b")), Err(AuthError::Malformed(_))));
        assert!(matches!(bearer_token(Some("Bearer a\"b")), Err(AuthError::Malformed(_))));
        assert!(matches!(bearer_token(Some("Bearer ===")), Err(AuthError::Malformed(_))));
        assert!(matches!(bearer_token(Some("Bearer a=b")), Err(AuthError::Malformed(_))));
        assert!(matches!(bearer_token(Some("Bearer é")), Err(AuthError::Malformed(_))));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert!(matches!(bearer_token(Some(&long)), Err(AuthError::Malformed(_))));
        let max = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN));
        assert!(bearer_token(Some(&max)).is_ok());
    }

    #[test]
    fn every_reason_is_listed() {
        let all = [
            AuthError::Missing,
            AuthError::BadScheme,
            AuthError::Malformed("x"),
            AuthError::Algorithm,
            AuthError::NoKid,
            AuthError::UnknownKid,
            AuthError::Signature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::Issuer,
            AuthError::TokenUse,
            AuthError::ClientId,
            AuthError::Audience,
            AuthError::NoSubject,
            AuthError::JwksUnavailable { detail: String::new() },
        ];
        let reasons: Vec<&str> = all.iter().map(AuthError::reason).collect();
        assert_eq!(reasons, AuthError::REASONS);
    }

    #[test]
    fn error_classes() {
        assert_eq!(AuthError::Missing.www_authenticate_error(), None);
        assert_eq!(AuthError::BadScheme.www_authenticate_error(), Some("invalid_request"));
        assert_eq!(AuthError::Expired.www_authenticate_error(), Some("invalid_token"));
        assert!(AuthError::JwksUnavailable { detail: "x".into() }.is_unavailable());
        assert!(!AuthError::UnknownKid.is_unavailable());
        // The detail (URLs, causes) is for logs only.
        assert!(!AuthError::JwksUnavailable { detail: "http://secret".into() }.to_string().contains("secret"));
    }

    #[test]
    fn max_age_comes_from_cache_control() {
        assert_eq!(max_age("max-age=300"), Some(Duration::from_secs(300)));
        assert_eq!(max_age("public, Max-Age=\"60\", must-revalidate"), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-cache"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }

    #[test]
    fn the_next_refresh_is_the_interval_or_a_shorter_max_age_but_not_below_the_floor() {
        let mut c = cfg(TokenUse::Access);
        c.jwks_refresh_interval = Duration::from_secs(900);
        let auth = Authenticator::new(&c, reqwest::Client::new());
        assert_eq!(auth.next_refresh(true), Duration::from_secs(900));
        let set = |d: Option<Duration>| *auth.inner.max_age.lock().unwrap() = d;
        set(Some(Duration::from_secs(120)));
        assert_eq!(auth.next_refresh(true), Duration::from_secs(120));
        set(Some(Duration::ZERO));
        assert_eq!(auth.next_refresh(true), REFETCH_MIN_INTERVAL, "max-age never pushes below the floor");
        set(Some(Duration::from_secs(3600)));
        assert_eq!(auth.next_refresh(true), Duration::from_secs(900), "nor lengthens the interval");
        assert_eq!(auth.next_refresh(false), REFETCH_MIN_INTERVAL, "a failure retries within the floor");
    }

    #[test]
    fn cache_ttl_is_until_exp_capped_and_never_past_it() {
        let cap = Duration::from_secs(600);
        assert_eq!(cache_ttl(1_000_100, 1_000_000, cap), Some(Duration::from_secs(100)));
        assert_eq!(cache_ttl(1_100_000, 1_000_000, cap), Some(cap));
        assert_eq!(cache_ttl(1_000_000, 1_000_000, cap), None);
        assert_eq!(cache_ttl(999_970, 1_000_000, cap), None, "accepted within leeway, but not cached");
        assert_eq!(cache_ttl(0, u64::MAX, cap), None);
    }

    #[test]
    fn jwks_parsing_keeps_only_usable_rsa_keys() {
        let keys = parse_jwks(TEST_JWKS).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), [TEST_KID]);
        let mixed = json!({"keys": [
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "ok", "n": "AQAB", "e": "AQAB"},
        ]});
        let keys = parse_jwks(mixed.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["ok"]);
        assert!(parse_jwks(b"{\"keys\": []}").is_err());
        assert!(parse_jwks(b"<html>").is_err());
        assert!(parse_jwks(b"{}").is_err());
    }

    #[tokio::test]
    async fn a_cached_token_is_refused_once_expired() {
        // No leeway, so a token past its exp is refused outright.
        let auth = auth_with_leeway(0);
        let exp = unix_now() + 3;
        let header = format!("Bearer {}", sign(&access_claims(exp)));
        assert_eq!(auth.verify(Some(&header)).await.unwrap().sub.as_str(), "sub-1");
        assert_eq!(auth.verify(Some(&header)).await.unwrap().sub.as_str(), "sub-1");
        assert_eq!(auth.verifications(), 1, "the second verify must be a cache hit");
        // Wall clock on purpose: exp is wall-clock seconds.
        while unix_now() <= exp {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(auth.verify(Some(&header)).await, Err(AuthError::Expired));
        assert_eq!(auth.verifications(), 2, "an expired token must not be served from the cache");
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let auth = auth_with_leeway(LEEWAY_SECS);
        let mut claims = access_claims(unix_now() + 600);
        claims["client_id"] = json!("other");
        let header = format!("Bearer {}", sign(&claims));
        for n in 1..=2 {
            assert_eq!(auth.verify(Some(&header)).await, Err(AuthError::ClientId));
            assert_eq!(auth.verifications(), n);
        }
    }

    #[tokio::test]
    async fn messages_never_echo_the_token() {
        let auth = auth_with_leeway(LEEWAY_SECS);
        let mut claims = access_claims(unix_now() - 3600);
        claims["sub"] = json!("very-recognisable-subject");
        let token = sign(&claims);
        let err = auth.verify(Some(&format!("Bearer {token}"))).await.unwrap_err();
        assert_eq!(err, AuthError::Expired);
        let text = format!("{err} {err:?}");
        assert!(!text.contains(&token[..20]) && !text.contains("recognisable"), "{text}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        #[test]
        fn garbage_never_panics(s in "\\PC{0,300}", dots in "[A-Za-z0-9_=.-]{0,300}") {
            static AUTH: std::sync::OnceLock<Authenticator> = std::sync::OnceLock::new();
            let auth = AUTH.get_or_init(|| auth_with_leeway(LEEWAY_SECS));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                for value in [s.clone(), format!("Bearer {s}"), format!("Bearer {dots}"), format!("bearer e30.{dots}")] {
                    let r = auth.verify(Some(&value)).await;
                    proptest::prop_assert!(r.is_err());
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn crafted_headers_are_refused_before_any_key_is_used() {
        let auth = auth_with_leeway(LEEWAY_SECS);
        let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let body = b64(access_claims(unix_now() + 600));
        let cases = [
            (b64(json!({"alg": "none", "kid": TEST_KID})), AuthError::Algorithm),
            (b64(json!({"alg": "None"})), AuthError::Algorithm),
            (b64(json!({"alg": "HS256", "kid": TEST_KID})), AuthError::Algorithm),
            (b64(json!({"alg": "PS256", "kid": TEST_KID})), AuthError::Algorithm),
            (b64(json!({"alg": "RS256"})), AuthError::NoKid),
            (b64(json!({"alg": "RS256", "kid": ""})), AuthError::NoKid),
            (b64(json!({"alg": "RS256", "kid": TEST_KID, "crit": ["exp"]})), AuthError::Malformed("")),
            (b64(json!({"kid": TEST_KID})), AuthError::Malformed("")),
            (b64(json!({"alg": 5})), AuthError::Malformed("")),
            ("e30".to_string(), AuthError::Malformed("")),
        ];
        for (header, want) in cases {
            let got = auth.verify(Some(&format!("Bearer {header}.{body}.c2ln"))).await.unwrap_err();
            let same = match (&got, &want) {
                (AuthError::Malformed(_), AuthError::Malformed(_)) => true,
                _ => got == want,
            };
            assert!(same, "header {header}: got {got:?}, want {want:?}");
        }
        assert_eq!(auth.verifications(), 0);
    }
}
