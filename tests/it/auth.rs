//! Cognito JWT verification against tokens minted by moto's Cognito, and against tokens signed
//! here with moto's own private key (claims moto would never issue: expired, wrong issuer...).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use cruddur_syncd::config::{AuthConfig, TokenUse};
use cruddur_syncd::http::auth::{AuthError, Authenticator};
use cruddur_syncd::metrics::{Metrics, RunLabels, RunResult};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support;

const MOTO_KID: &str = "dummy";
const OTHER_PEM: &[u8] = include_bytes!("../fixtures/test-rsa.pem");
const OTHER_JWKS: &str = include_str!("../fixtures/test-rsa-jwks.json");
const OTHER_KID: &str = "test-key";

// ---------------------------------------------------------------------------------------------
// A pool, an app client and a user in moto, with real tokens

struct Pool {
    moto: String,
    pool_id: String,
    client_id: String,
    /// The user's `sub` attribute as AdminGetUser reports it.
    sub: String,
    access: String,
    id: String,
}

async fn pool() -> Pool {
    let moto = support::moto_url();
    let cognito = support::cognito_client(&support::sdk_config(&moto).await);
    let pool_id = support::create_pool(&cognito, "auth-").await;
    let client_id = support::create_app_client(&cognito, &pool_id, "syncd-auth-test").await;
    let user = support::sign_up(&cognito, &pool_id, &client_id, "andrew", &[]).await;
    Pool { moto, pool_id, client_id, sub: user.sub, access: user.access_token, id: user.id_token }
}

impl Pool {
    fn issuer(&self) -> String {
        format!("https://cognito-idp.us-east-1.amazonaws.com/{}", self.pool_id)
    }

    fn jwks_url(&self) -> String {
        format!("{}/{}/.well-known/jwks.json", self.moto, self.pool_id)
    }

    fn cfg(&self, token_use: TokenUse) -> AuthConfig {
        AuthConfig {
            user_pool_id: self.pool_id.clone(),
            client_id: self.client_id.clone(),
            issuer: self.issuer(),
            jwks_url: self.jwks_url(),
            token_use,
            ..AuthConfig::default()
        }
    }

    async fn auth(&self, token_use: TokenUse) -> Authenticator {
        let auth = Authenticator::new(&self.cfg(token_use), http());
        assert_eq!(auth.refresh_jwks().await.unwrap(), 1, "moto publishes one key");
        auth
    }

    /// The claims of moto's access (or id) token, to be altered and re-signed.
    fn claims(&self, of: &str) -> Value {
        jsonwebtoken::dangerous::insecure_decode_claims(of).unwrap()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// Signing: moto's private key (converted from the JWK moto ships), and a key of our own

/// moto's private key and the matching public key, both PEM, converted from the JWK that ships
/// in the venv (it has n, e and d only; the primes are recovered from them).
fn moto_keys() -> &'static (String, String) {
    static KEYS: OnceLock<(String, String)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let jwk = root.join(".venv/lib/python3.11/site-packages/moto/cognitoidp/resources/jwks-private.json.gz");
        assert!(jwk.exists(), "{} is missing: run scripts/venv", jwk.display());
        let script = r#"
import base64, gzip, json, sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import rsa
k = json.load(gzip.open(sys.argv[1]))
k = k["keys"][0] if "keys" in k else k
i = lambda v: int.from_bytes(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)), "big")
n, e, d = i(k["n"]), i(k["e"]), i(k["d"])
p, q = rsa.rsa_recover_prime_factors(n, e, d)
key = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                            rsa.RSAPublicNumbers(e, n)).private_key()
sys.stdout.write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()).decode())
sys.stdout.write(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo).decode())
"#;
        let out = std::process::Command::new(root.join(".venv/bin/python"))
            .arg("-c")
            .arg(script)
            .arg(&jwk)
            .output()
            .expect("running the venv's python");
        assert!(out.status.success(), "converting moto's JWK: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let split = text.find("-----BEGIN PUBLIC KEY-----").expect("a public key PEM");
        (text[..split].to_string(), text[split..].to_string())
    })
}

fn sign_with(pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
}

/// Signed by moto's key, so only the claims can make it fail.
fn moto_signed(claims: &Value) -> String {
    sign_with(moto_keys().0.as_bytes(), Some(MOTO_KID), claims)
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

// ---------------------------------------------------------------------------------------------
// Tokens moto issued

#[tokio::test]
async fn moto_tokens_are_accepted_according_to_token_use() {
    let p = pool().await;
    let access = p.auth(TokenUse::Access).await;
    assert!(access.jwks_loaded());
    let v = access.verify(Some(&bearer(&p.access))).await.unwrap();
    assert_eq!(v.sub.as_str(), p.sub, "the sub must be the user's, as AdminGetUser reports it");
    assert_eq!(v.sub.to_string(), p.sub);
    let exp = p.claims(&p.access)["exp"].as_u64().unwrap();
    assert_eq!(v.expires_at, UNIX_EPOCH + Duration::from_secs(exp));
    assert_eq!(access.verify(Some(&bearer(&p.id))).await, Err(AuthError::TokenUse));

    let id = p.auth(TokenUse::Id).await;
    assert_eq!(id.verify(Some(&bearer(&p.id))).await.unwrap().sub.as_str(), p.sub);
    assert_eq!(id.verify(Some(&bearer(&p.access))).await, Err(AuthError::TokenUse));

    let any = p.auth(TokenUse::Any).await;
    assert_eq!(any.verify(Some(&bearer(&p.access))).await.unwrap().sub.as_str(), p.sub);
    assert_eq!(any.verify(Some(&bearer(&p.id))).await.unwrap().sub.as_str(), p.sub);
    // The scheme is case-insensitive.
    assert!(any.verify(Some(&format!("bearer {}", p.access))).await.is_ok());
}

// ---------------------------------------------------------------------------------------------
// Every fault

struct Case {
    name: &'static str,
    header: Option<String>,
    want: AuthError,
}

fn case(name: &'static str, header: Option<String>, want: AuthError) -> Case {
    Case { name, header, want }
}

fn bearer_case(name: &'static str, token: String, want: AuthError) -> Case {
    case(name, Some(bearer(&token)), want)
}

/// Runs every case, then reports every mismatch at once.
async fn check_cases(auth: &Authenticator, cases: Vec<Case>) {
    let mut wrong = Vec::new();
    for c in cases {
        match auth.verify(c.header.as_deref()).await {
            Ok(v) => wrong.push(format!("{}: accepted (sub {})", c.name, v.sub)),
            Err(got) => {
                let same = match (&got, &c.want) {
                    (AuthError::Malformed(_), AuthError::Malformed(_)) => true,
                    _ => got == c.want,
                };
                if !same {
                    wrong.push(format!("{}: got {got:?}, want {:?}", c.name, c.want));
                }
                if got.is_unavailable() {
                    wrong.push(format!("{}: reported as unavailable (503) instead of 401", c.name));
                }
                // RFC 6750 section 3.1: no error code when no credentials were sent.
                let want_www = match c.want {
                    AuthError::Missing => None,
                    AuthError::BadScheme => Some("invalid_request"),
                    _ => Some("invalid_token"),
                };
                if got.www_authenticate_error() != want_www {
                    wrong.push(format!("{}: WWW-Authenticate error {:?}", c.name, got.www_authenticate_error()));
                }
                let msg = got.to_string();
                let token_part = c.header.as_deref().and_then(|h| h.split_once(' ')).map(|(_, t)| t).unwrap_or("");
                if token_part.len() >= 8 && msg.contains(&token_part[..8]) {
                    wrong.push(format!("{}: the message echoes the token: {msg}", c.name));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{} case(s) went wrong:\n{}", wrong.len(), wrong.join("\n"));
}

#[tokio::test]
async fn every_token_fault_is_refused_for_its_own_reason() {
    let p = pool().await;
    let auth = p.auth(TokenUse::Access).await;
    let (moto_private, moto_public) = moto_keys();
    let good = p.claims(&p.access);
    // Sanity: the re-signed claims of moto's own token are accepted, so each case below fails
    // only because of what it changes.
    assert_eq!(auth.verify(Some(&bearer(&moto_signed(&good)))).await.unwrap().sub.as_str(), p.sub);

    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        moto_signed(&c)
    };
    let payload = b64(good.to_string().as_bytes());
    let unsigned = format!("{}.{payload}.", b64(br#"{"alg":"none","kid":"dummy"}"#));
    let unsigned_typ = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
    let hs256 = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(MOTO_KID.into());
        jsonwebtoken::encode(&h, &good, &EncodingKey::from_secret(moto_public.as_bytes()).unwrap()).unwrap()
    };
    let tampered = {
        // moto's real signature over other claims.
        let parts: Vec<&str> = p.access.split('.').collect();
        let mut c = good.clone();
        c["sub"] = json!("someone-else");
        format!("{}.{}.{}", parts[0], b64(c.to_string().as_bytes()), parts[2])
    };
    assert!(moto_private.starts_with("-----BEGIN PRIVATE KEY-----"));

    let cases = vec![
        case("no header", None, AuthError::Missing),
        case("empty header", Some(String::new()), AuthError::Missing),
        case("basic scheme", Some("Basic dXNlcjpwYXNzd29yZA==".into()), AuthError::BadScheme),
        case("token without scheme", Some(p.access.clone()), AuthError::BadScheme),
        case("two spaces", Some(format!("Bearer  {}", p.access)), AuthError::BadScheme),
        case("garbage", Some("Bearer garbage".into()), AuthError::Malformed("")),
        case("three garbage parts", Some("Bearer not.a.jwt".into()), AuthError::Malformed("")),
        case("binary-looking base64", Some("Bearer //79/Pv6.+fj39vU.8/Lx8A==".into()), AuthError::Malformed("")),
        case("huge", Some(format!("Bearer {}", "A".repeat(1 << 20))), AuthError::Malformed("")),
        bearer_case("alg none", unsigned, AuthError::Algorithm),
        bearer_case("alg none without kid", unsigned_typ, AuthError::Algorithm),
        bearer_case("HS256 signed with the public key", hs256, AuthError::Algorithm),
        bearer_case("another RSA key, moto's kid", sign_with(OTHER_PEM, Some(MOTO_KID), &good), AuthError::Signature),
        bearer_case("moto's signature over altered claims", tampered, AuthError::Signature),
        bearer_case("unknown kid", sign_with(OTHER_PEM, Some("rotated-away"), &good), AuthError::UnknownKid),
        bearer_case("no kid", sign_with(moto_private.as_bytes(), None, &good), AuthError::NoKid),
        bearer_case("expired beyond leeway", with(&|c| c["exp"] = json!(now() - 120)), AuthError::Expired),
        bearer_case("nbf beyond leeway", with(&|c| c["nbf"] = json!(now() + 120)), AuthError::NotYetValid),
        bearer_case("no exp", with(&|c| drop(c.as_object_mut().unwrap().remove("exp"))), AuthError::Malformed("")),
        bearer_case("exp not a number", with(&|c| c["exp"] = json!("tomorrow")), AuthError::Malformed("")),
        bearer_case("wrong iss", with(&|c| c["iss"] = json!(format!("{}x", p.issuer()))), AuthError::Issuer),
        bearer_case(
            "another pool's iss",
            with(&|c| c["iss"] = json!("https://cognito-idp.us-east-1.amazonaws.com/us-east-1_other")),
            AuthError::Issuer,
        ),
        bearer_case("no iss", with(&|c| drop(c.as_object_mut().unwrap().remove("iss"))), AuthError::Issuer),
        bearer_case("wrong client_id", with(&|c| c["client_id"] = json!("another-client")), AuthError::ClientId),
        bearer_case(
            "no client_id",
            with(&|c| drop(c.as_object_mut().unwrap().remove("client_id"))),
            AuthError::ClientId,
        ),
        bearer_case("id token where access is required", p.id.clone(), AuthError::TokenUse),
        bearer_case("token_use refresh", with(&|c| c["token_use"] = json!("refresh")), AuthError::TokenUse),
        bearer_case(
            "no token_use",
            with(&|c| drop(c.as_object_mut().unwrap().remove("token_use"))),
            AuthError::TokenUse,
        ),
        bearer_case("no sub", with(&|c| drop(c.as_object_mut().unwrap().remove("sub"))), AuthError::NoSubject),
        bearer_case("empty sub", with(&|c| c["sub"] = json!("")), AuthError::NoSubject),
    ];
    check_cases(&auth, cases).await;
}

#[tokio::test]
async fn id_token_faults_are_refused() {
    let p = pool().await;
    let auth = p.auth(TokenUse::Id).await;
    let good = p.claims(&p.id);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        moto_signed(&c)
    };
    assert!(auth.verify(Some(&bearer(&with(&|_| ())))).await.is_ok());
    // An audience list naming the client is a valid `aud` (RFC 7519).
    let list = with(&|c| c["aud"] = json!(["someone", p.client_id]));
    assert!(auth.verify(Some(&bearer(&list))).await.is_ok());
    let cases = vec![
        bearer_case("wrong aud", with(&|c| c["aud"] = json!("another-client")), AuthError::Audience),
        bearer_case("no aud", with(&|c| drop(c.as_object_mut().unwrap().remove("aud"))), AuthError::Audience),
        bearer_case("aud list without the client", with(&|c| c["aud"] = json!(["a", "b"])), AuthError::Audience),
        // An id token cannot borrow the access token's check.
        bearer_case(
            "client_id instead of aud",
            with(&|c| {
                let o = c.as_object_mut().unwrap();
                o.remove("aud");
                o.insert("client_id".into(), json!(p.client_id));
            }),
            AuthError::Audience,
        ),
        bearer_case("access token where id is required", p.access.clone(), AuthError::TokenUse),
    ];
    check_cases(&auth, cases).await;

    // With "any", each kind gets its own check.
    let any = p.auth(TokenUse::Any).await;
    let cases = vec![
        bearer_case("any: id token, wrong aud", with(&|c| c["aud"] = json!("another-client")), AuthError::Audience),
        bearer_case(
            "any: access token, wrong client_id",
            {
                let mut c = p.claims(&p.access);
                c["client_id"] = json!("another-client");
                moto_signed(&c)
            },
            AuthError::ClientId,
        ),
    ];
    check_cases(&any, cases).await;
}

#[tokio::test]
async fn exp_and_nbf_within_the_leeway_are_accepted() {
    let p = pool().await;
    let auth = p.auth(TokenUse::Access).await;
    let mut c = p.claims(&p.access);
    c["exp"] = json!(now() - 30);
    assert_eq!(auth.verify(Some(&bearer(&moto_signed(&c)))).await.unwrap().sub.as_str(), p.sub);
    let mut c = p.claims(&p.access);
    c["nbf"] = json!(now() + 30);
    assert_eq!(auth.verify(Some(&bearer(&moto_signed(&c)))).await.unwrap().sub.as_str(), p.sub);
}

// ---------------------------------------------------------------------------------------------
// The verified-token cache

#[tokio::test]
async fn a_verified_token_is_served_from_the_cache_until_its_exp() {
    let p = pool().await;
    let auth = p.auth(TokenUse::Any).await;
    assert_eq!(auth.verifications(), 0);
    for _ in 0..3 {
        assert_eq!(auth.verify(Some(&bearer(&p.access))).await.unwrap().sub.as_str(), p.sub);
    }
    assert_eq!(auth.verifications(), 1, "repeat verifications of one token must be cache hits");
    // A clone shares the cache.
    assert!(auth.clone().verify(Some(&format!("BEARER {}", p.access))).await.is_ok());
    assert_eq!(auth.verifications(), 1);
    assert!(auth.verify(Some(&bearer(&p.id))).await.is_ok());
    assert_eq!(auth.verifications(), 2, "another token is verified in full");

    // A token that expires in 3 s: cached until then, verified in full after (still inside the
    // leeway, so accepted, but not from the cache). The key is converted before the clock starts.
    let _ = moto_keys();
    let mut c = p.claims(&p.access);
    let exp = now() + 3;
    c["exp"] = json!(exp);
    let short = bearer(&moto_signed(&c));
    assert!(auth.verify(Some(&short)).await.is_ok());
    assert!(auth.verify(Some(&short)).await.is_ok());
    assert_eq!(auth.verifications(), 3);
    support::wait_until(Duration::from_secs(6), "the token's exp has passed", || async { now() > exp }).await;
    assert!(auth.verify(Some(&short)).await.is_ok(), "within the leeway");
    assert_eq!(auth.verifications(), 4, "a token past its exp must not be served from the cache");
    assert!(auth.verify(Some(&short)).await.is_ok());
    assert_eq!(auth.verifications(), 5, "nor cached again");
}

// ---------------------------------------------------------------------------------------------
// The JWKS: refetch limits, rotation, outages (served by a tiny local server that counts)

struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    /// Status and body of every answer from now on.
    answer: Arc<Mutex<(u16, String)>>,
}

impl JwksServer {
    async fn start(status: u16, body: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(Mutex::new((status, body)));
        let (h, a) = (hits.clone(), answer.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let (h, a) = (h.clone(), a.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = a.lock().unwrap().clone();
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        JwksServer { url, hits, answer }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn serve(&self, status: u16, body: String) {
        *self.answer.lock().unwrap() = (status, body);
    }
}

async fn moto_jwks(p: &Pool) -> String {
    http().get(p.jwks_url()).send().await.unwrap().error_for_status().unwrap().text().await.unwrap()
}

/// moto's key and ours in one JWKS (a rotation in progress).
fn both_keys(moto: &str) -> String {
    let mut a: Value = serde_json::from_str(moto).unwrap();
    let b: Value = serde_json::from_str(OTHER_JWKS).unwrap();
    a["keys"].as_array_mut().unwrap().extend(b["keys"].as_array().unwrap().iter().cloned());
    a.to_string()
}

#[tokio::test]
async fn an_unknown_kid_refetches_at_most_once_per_30_seconds() {
    let p = pool().await;
    let server = JwksServer::start(200, moto_jwks(&p).await).await;
    let mut cfg = p.cfg(TokenUse::Access);
    cfg.jwks_url = server.url.clone();
    let auth = Authenticator::new(&cfg, http());
    assert!(!auth.jwks_loaded());
    let unknown = bearer(&sign_with(OTHER_PEM, Some(OTHER_KID), &p.claims(&p.access)));

    // Nothing loaded yet: the first verify fetches, and the kid is still unknown.
    assert_eq!(auth.verify(Some(&unknown)).await, Err(AuthError::UnknownKid));
    assert_eq!(server.hits(), 1);
    assert!(auth.jwks_loaded());
    // The key appears at the source, but the last fetch was less than 30 s ago.
    server.serve(200, both_keys(&moto_jwks(&p).await));
    assert_eq!(auth.verify(Some(&unknown)).await, Err(AuthError::UnknownKid));
    assert_eq!(server.hits(), 1, "a second unknown kid within 30 s must not refetch");
    let many = (0..16).map(|_| auth.verify(Some(&unknown)));
    assert!(futures::future::join_all(many).await.iter().all(|r| *r == Err(AuthError::UnknownKid)));
    assert_eq!(server.hits(), 1, "nor may concurrent ones");
    assert_eq!(auth.jwks_fetches(), 1);
    // Known kids keep working meanwhile.
    assert!(auth.verify(Some(&bearer(&p.access))).await.is_ok());
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_by_one_refetch_after_the_interval() {
    let p = pool().await;
    let moto = moto_jwks(&p).await;
    let server = JwksServer::start(200, moto.clone()).await;
    let mut cfg = p.cfg(TokenUse::Access);
    cfg.jwks_url = server.url.clone();
    let interval = Duration::from_millis(500);
    let auth = Authenticator::builder(&cfg, http()).refetch_interval(interval).build();
    assert_eq!(auth.refresh_jwks().await, Ok(1));
    assert_eq!(server.hits(), 1);

    server.serve(200, both_keys(&moto));
    let rotated = bearer(&sign_with(OTHER_PEM, Some(OTHER_KID), &p.claims(&p.access)));
    assert_eq!(auth.verify(Some(&rotated)).await, Err(AuthError::UnknownKid), "inside the interval");
    assert_eq!(server.hits(), 1);
    tokio::time::sleep(interval).await;
    // Concurrent requests with the new kid: exactly one fetch, and all of them use its result.
    let many = (0..16).map(|_| auth.verify(Some(&rotated)));
    let results = futures::future::join_all(many).await;
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|v| v.sub.as_str() == p.sub)), "{results:?}");
    assert_eq!(server.hits(), 2, "one fetch for all the concurrent requests");
}

#[tokio::test]
async fn no_jwks_at_all_is_unavailable_and_recovers() {
    let p = pool().await;
    let server = JwksServer::start(500, "<html>oops</html>".into()).await;
    let mut cfg = p.cfg(TokenUse::Access);
    cfg.jwks_url = server.url.clone();
    let interval = Duration::from_millis(300);
    let auth = Authenticator::builder(&cfg, http()).refetch_interval(interval).build();

    let err = auth.refresh_jwks().await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!err.to_string().contains("127.0.0.1"), "the client-facing message names no URL: {err}");
    assert!(!auth.jwks_loaded());
    let err = auth.verify(Some(&bearer(&p.access))).await.unwrap_err();
    assert!(err.is_unavailable(), "a valid token with no keys at all is a 503, not a 401: {err:?}");
    // Still checked first: what can be refused without keys is a 401.
    assert_eq!(auth.verify(None).await, Err(AuthError::Missing));
    assert!(!auth.verify(Some("Bearer x.y.z")).await.unwrap_err().is_unavailable());

    // Not JSON, and a JWKS without usable keys: unavailable too, never loaded.
    tokio::time::sleep(interval).await;
    server.serve(200, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "dummy"}]}"#.into());
    assert!(auth.refresh_jwks().await.unwrap_err().is_unavailable());
    assert!(!auth.jwks_loaded());

    server.serve(200, moto_jwks(&p).await);
    tokio::time::sleep(interval).await;
    assert_eq!(auth.verify(Some(&bearer(&p.access))).await.unwrap().sub.as_str(), p.sub);
    assert!(auth.jwks_loaded());

    // The source breaks again: loaded keys stay in force; an unknown kid is a plain 401.
    server.serve(500, String::new());
    tokio::time::sleep(interval).await;
    assert!(auth.refresh_jwks().await.unwrap_err().is_unavailable());
    assert!(auth.jwks_loaded());
    assert!(auth.verify(Some(&bearer(&p.id))).await.is_err_and(|e| e == AuthError::TokenUse));
    let unknown = bearer(&sign_with(OTHER_PEM, Some(OTHER_KID), &p.claims(&p.access)));
    tokio::time::sleep(interval).await;
    assert_eq!(auth.verify(Some(&unknown)).await, Err(AuthError::UnknownKid));
}

#[tokio::test]
async fn an_unreachable_jwks_url_is_unavailable() {
    let p = pool().await;
    let mut cfg = p.cfg(TokenUse::Access);
    // A port that was free a moment ago: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    cfg.jwks_url = format!("http://127.0.0.1:{port}/jwks.json");
    let auth = Authenticator::new(&cfg, http());
    assert!(auth.refresh_jwks().await.unwrap_err().is_unavailable());
    assert!(auth.verify(Some(&bearer(&p.access))).await.unwrap_err().is_unavailable());
    assert_eq!(auth.jwks_fetches(), 1, "the verify came within 30 s of the failed fetch");
}

// ---------------------------------------------------------------------------------------------
// The scheduled refresh: a key the pool stops publishing stops verifying

fn refreshes(metrics: &Metrics, result: RunResult) -> u64 {
    metrics.jwks_refreshes.get_or_create(&RunLabels { result }).get()
}

#[tokio::test]
async fn a_key_dropped_from_the_jwks_stops_verifying_at_the_next_scheduled_refresh() {
    let p = pool().await;
    let moto = moto_jwks(&p).await;
    // Keys {A (moto's), B (ours)}.
    let server = JwksServer::start(200, both_keys(&moto)).await;
    let mut cfg = p.cfg(TokenUse::Access);
    cfg.jwks_url = server.url.clone();
    cfg.jwks_refresh_interval = Duration::from_millis(500);
    let metrics = Arc::new(Metrics::new());
    let auth = Authenticator::builder(&cfg, http()).metrics(metrics.clone()).build();
    assert_eq!(auth.refresh_jwks().await, Ok(2));
    auth.spawn_refresh();
    let signed_a = bearer(&p.access);
    let signed_b = bearer(&sign_with(OTHER_PEM, Some(OTHER_KID), &p.claims(&p.access)));
    assert!(auth.verify(Some(&signed_a)).await.is_ok());
    assert!(auth.verify(Some(&signed_b)).await.is_ok());
    assert_eq!(auth.verifications(), 2);
    assert!(auth.verify(Some(&signed_a)).await.is_ok());
    assert_eq!(auth.verifications(), 2, "both are cached now");

    // The pool rotates A out: the served set becomes {B}.
    let fetches = server.hits();
    server.serve(200, OTHER_JWKS.to_string());
    support::wait_until(Duration::from_secs(10), "the A token is refused", || async {
        auth.verify(Some(&signed_a)).await == Err(AuthError::UnknownKid)
    })
    .await;
    assert!(server.hits() > fetches, "the scheduled refresh fetched the new set");
    let before = auth.verifications();
    assert!(auth.verify(Some(&signed_b)).await.is_ok(), "B is still published");
    assert_eq!(auth.verifications(), before, "B's cached verification survives the refresh");
    assert_eq!(auth.verify(Some(&signed_a)).await, Err(AuthError::UnknownKid), "and A stays refused");
    assert_eq!(refreshes(&metrics, RunResult::failure), 0);

    // The JWKS endpoint fails: the last good set ({B}) stays in force, and the failures count.
    server.serve(503, "unavailable".into());
    support::wait_until(Duration::from_secs(10), "a failed refresh is counted", || async {
        refreshes(&metrics, RunResult::failure) >= 2
    })
    .await;
    assert!(auth.jwks_loaded());
    assert!(auth.verify(Some(&signed_b)).await.is_ok());
    assert_eq!(auth.verify(Some(&signed_a)).await, Err(AuthError::UnknownKid));
    assert!(refreshes(&metrics, RunResult::success) >= 2);

    // Dropping the authenticator stops its refresh.
    drop(auth);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_drop = server.hits();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(server.hits(), after_drop, "no refresh after the last clone is gone");
}
