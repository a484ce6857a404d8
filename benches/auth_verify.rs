//! A verified-token cache hit against a full verification (header, key lookup, RS256 signature,
//! claims, cache insert) of the same token, both through `Authenticator::verify`. No network:
//! the keys come from an in-memory JWKS (tests/fixtures).
//!
//! `cargo bench --bench auth_verify` prints criterion's estimates, then a same-run comparison
//! (median of batches) with the ratio.

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{BatchSize, Criterion};
use cruddur_syncd::config::{AuthConfig, TokenUse};
use cruddur_syncd::http::auth::Authenticator;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const PEM: &[u8] = include_bytes!("../tests/fixtures/test-rsa.pem");
const JWKS: &[u8] = include_bytes!("../tests/fixtures/test-rsa-jwks.json");
const ISSUER: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_bench";

fn cfg() -> AuthConfig {
    AuthConfig {
        user_pool_id: "us-east-1_bench".into(),
        client_id: "bench-client".into(),
        issuer: ISSUER.into(),
        jwks_url: "http://127.0.0.1:9/unused".into(),
        token_use: TokenUse::Access,
        ..AuthConfig::default()
    }
}

fn fresh() -> Authenticator {
    static HTTP: OnceLock<reqwest::Client> = OnceLock::new();
    let http = HTTP.get_or_init(reqwest::Client::new).clone();
    Authenticator::builder(&cfg(), http).jwks(JWKS).expect("the fixture JWKS").build()
}

/// A Cognito-shaped access token, valid for an hour.
fn header_value() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": "5f0a4c1e-8d2b-4f7e-9a51-0c3b2d1e4f60", "client_id": "bench-client",
        "token_use": "access", "scope": "aws.cognito.signin.user.admin", "auth_time": now, "iat": now,
        "exp": now + 3600, "jti": "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0", "username": "andrewbrown",
    });
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("test-key".into());
    let token = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_rsa_pem(PEM).unwrap()).unwrap();
    format!("Bearer {token}")
}

/// Median ns per call over `batches` batches of `n` calls.
fn median_ns(batches: usize, n: u32, mut f: impl FnMut()) -> f64 {
    let mut per_call: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    per_call.sort_by(|a, b| a.total_cmp(b));
    per_call[per_call.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let header = header_value();
    let hot = fresh();
    rt.block_on(hot.verify(Some(&header))).expect("the bench token verifies");
    assert_eq!(hot.verifications(), 1);

    let mut c = Criterion::default().configure_from_args().measurement_time(Duration::from_secs(5));
    let mut g = c.benchmark_group("auth_verify");
    g.bench_function("cached", |b| b.iter(|| rt.block_on(hot.verify(black_box(Some(&header)))).unwrap()));
    g.bench_function("full", |b| {
        b.iter_batched_ref(fresh, |a| rt.block_on(a.verify(black_box(Some(&header)))).unwrap(), BatchSize::SmallInput)
    });
    g.finish();
    c.final_summary();

    // Same-run comparison. The full path needs a cold cache per call: a pool of fresh
    // authenticators is built outside the timed loop.
    let cached = median_ns(21, 20_000, || {
        rt.block_on(hot.verify(black_box(Some(&header)))).unwrap();
    });
    let pool: Vec<Authenticator> = (0..11 * 100).map(|_| fresh()).collect();
    let mut it = pool.iter();
    let full = median_ns(11, 100, || {
        rt.block_on(it.next().unwrap().verify(black_box(Some(&header)))).unwrap();
    });
    assert_eq!(hot.verifications(), 1, "the cached path must never verify again");
    println!(
        "auth_verify: cached {cached:.0} ns/verify, full {full:.0} ns/verify, full/cached = {:.0}x",
        full / cached
    );
}
