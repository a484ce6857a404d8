//! Helpers shared by the integration tests (`crate::support` in the modules of `tests/it`).
//!
//! Tests start what they need: moto comes from the project's venv (`scripts/venv`), PostgreSQL
//! is the server on 127.0.0.1:5432 (`scripts/ensure-postgres`), one database per test.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use sqlx::{Connection, PgConnection};

pub mod app;
pub mod daemon;
pub mod fault_proxy;
pub mod link;
pub mod nats;
pub mod pgcluster;
pub mod tcp_proxy;
pub mod workload;

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

// ---------------------------------------------------------------------------------------------
// moto

const MOTO_START_DEADLINE: Duration = Duration::from_secs(30);

/// Runs moto ($0 = moto_server, $1 = port) and kills it when stdin reaches EOF. The test process
/// holds the only write end of that pipe, so the kernel closes it when the process ends however
/// it ends (panic, abort, SIGKILL) and no moto outlives its tests. `wait` makes the wrapper exit
/// as soon as moto does, so a moto that cannot start (port taken) is noticed at once.
const WRAPPER: &str = r#"exec 3<&0
"$0" -H 127.0.0.1 -p "$1" </dev/null &
pid=$!
{ read _ <&3; kill $pid 2>/dev/null; } &
wait $pid"#;

struct SharedMoto {
    url: String,
    // Never dropped: its stdin pipe must stay open until the process exits.
    _wrapper: Child,
}

static SHARED_MOTO: OnceLock<SharedMoto> = OnceLock::new();

/// The moto server shared by every test of this binary, started on first use. Tests that reset,
/// stop or restart moto must use their own ([`spawn_moto`]): the others run concurrently.
pub fn moto_url() -> String {
    SHARED_MOTO
        .get_or_init(|| {
            let (wrapper, port, _log) = launch(None);
            SharedMoto { url: url_for(port), _wrapper: wrapper }
        })
        .url
        .clone()
}

/// A moto server owned by one test; killed on drop.
pub struct MotoServer {
    wrapper: Option<Child>,
    port: u16,
    log: PathBuf,
}

pub fn spawn_moto() -> MotoServer {
    let (wrapper, port, log) = launch(None);
    MotoServer { wrapper: Some(wrapper), port, log }
}

impl MotoServer {
    pub fn url(&self) -> String {
        url_for(self.port)
    }

    /// Stops the server; its port is free when this returns. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut wrapper) = self.wrapper.take() {
            drop(wrapper.stdin.take());
            let _ = wrapper.wait();
        }
    }

    /// A fresh, empty server on the same port (an outage followed by recovery, as clients see it).
    pub fn restart(&mut self) {
        self.kill();
        let (wrapper, _, _) = launch(Some(self.port));
        self.wrapper = Some(wrapper);
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn url_for(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Starts moto on `port` (a free one if None) and waits until it answers. A port picked here
/// can be taken by someone else before moto binds it; moto then exits and we try another.
fn launch(port: Option<u16>) -> (Child, u16, PathBuf) {
    let moto = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    assert!(moto.exists(), "{} is missing: run scripts/venv to create the project's moto venv", moto.display());
    let mut failure = String::new();
    for _attempt in 0..3 {
        let port = port.unwrap_or_else(free_port);
        let log = log_path(port);
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let err = out.try_clone().expect("duplicating the moto log handle");
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg(&moto)
            .arg(port.to_string())
            // Same region and name give the same pool and client ids, run after run.
            .env("MOTO_COGNITO_IDP_USER_POOL_ID_STRATEGY", "HASH")
            .env("MOTO_COGNITO_IDP_USER_POOL_CLIENT_ID_STRATEGY", "HASH")
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} through sh: {e}", moto.display()));

        let deadline = Instant::now() + MOTO_START_DEADLINE;
        loop {
            if let Ok(Some(status)) = wrapper.try_wait() {
                failure = format!("moto exited ({status}) on port {port}; {}", log_tail(&log));
                break;
            }
            if answers(port) {
                return (wrapper, port, log);
            }
            if Instant::now() > deadline {
                drop(wrapper.stdin.take());
                let _ = wrapper.wait();
                panic!(
                    "moto did not answer on {}/moto-api/ within {MOTO_START_DEADLINE:?}; {}",
                    url_for(port),
                    log_tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A fixed port (restart) may still be held for a moment; a random one is simply replaced.
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("moto failed to start 3 times: {failure}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0 to find a free port")
        .port()
}

/// Blocking on purpose: callable from sync tests and from inside a runtime alike.
fn answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut resp = Vec::new();
    stream
        .write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .and_then(|()| stream.read_to_end(&mut resp))
        .is_ok()
        && resp.starts_with(b"HTTP/1.")
        && resp.get(9..12) == Some(b"200".as_slice())
}

/// target/tmp/moto/<test binary>-<port>.log: kept for a look after a failed run.
fn log_path(port: u16) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "test".to_owned());
    dir.join(format!("{exe}-{port}.log"))
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("the end of {}:\n{tail}", log.display())
}

// ---------------------------------------------------------------------------------------------
// AWS SDK clients against moto

pub async fn sdk_config(moto_url: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region("us-east-1")
        .endpoint_url(moto_url)
        .test_credentials()
        .load()
        .await
}

pub fn ddb_client(config: &SdkConfig) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(config)
}

pub fn streams_client(config: &SdkConfig) -> aws_sdk_dynamodbstreams::Client {
    aws_sdk_dynamodbstreams::Client::new(config)
}

pub fn cognito_client(config: &SdkConfig) -> aws_sdk_cognitoidentityprovider::Client {
    aws_sdk_cognitoidentityprovider::Client::new(config)
}

/// A new user pool named `{prefix}<unique>`; its id.
pub async fn create_pool(cognito: &aws_sdk_cognitoidentityprovider::Client, prefix: &str) -> String {
    let out = cognito.create_user_pool().pool_name(unique(prefix)).send().await.unwrap();
    out.user_pool.and_then(|p| p.id).expect("CreateUserPool returned no id")
}

/// An app client of `pool_id` that may sign in with ADMIN_USER_PASSWORD_AUTH (how tests mint
/// tokens); its id.
pub async fn create_app_client(cognito: &aws_sdk_cognitoidentityprovider::Client, pool_id: &str, name: &str) -> String {
    let out = cognito
        .create_user_pool_client()
        .user_pool_id(pool_id)
        .client_name(name)
        .explicit_auth_flows(aws_sdk_cognitoidentityprovider::types::ExplicitAuthFlowsType::AllowAdminUserPasswordAuth)
        .send()
        .await
        .unwrap();
    out.user_pool_client.and_then(|c| c.client_id).expect("CreateUserPoolClient returned no id")
}

/// A Cognito user signed in: its `sub` and tokens.
pub struct SignedIn {
    pub sub: String,
    pub access_token: String,
    pub id_token: String,
}

/// Creates `username` in `pool_id` with `attrs` (no invitation, no password: it cannot sign
/// in) and reads its `sub`.
pub async fn create_user(
    cognito: &aws_sdk_cognitoidentityprovider::Client,
    pool_id: &str,
    username: &str,
    attrs: &[(&str, &str)],
) -> String {
    use aws_sdk_cognitoidentityprovider::types::{AttributeType, MessageActionType};
    let mut create = cognito
        .admin_create_user()
        .user_pool_id(pool_id)
        .username(username)
        .message_action(MessageActionType::Suppress);
    for (name, value) in attrs {
        create = create.user_attributes(AttributeType::builder().name(*name).value(*value).build().unwrap());
    }
    create.send().await.unwrap_or_else(|e| panic!("creating Cognito user {username}: {e:?}"));
    let got = cognito.admin_get_user().user_pool_id(pool_id).username(username).send().await.unwrap();
    got.user_attributes().iter().find(|a| a.name() == "sub").and_then(|a| a.value()).unwrap().to_string()
}

/// Creates `username` in `pool_id` with `attrs` ([`create_user`]), gives it a permanent
/// password, signs it in through `client_id` (ADMIN_USER_PASSWORD_AUTH) and reads its `sub`.
pub async fn sign_up(
    cognito: &aws_sdk_cognitoidentityprovider::Client,
    pool_id: &str,
    client_id: &str,
    username: &str,
    attrs: &[(&str, &str)],
) -> SignedIn {
    use aws_sdk_cognitoidentityprovider::types::AuthFlowType;
    const PASSWORD: &str = "Testing123!";
    let sub = create_user(cognito, pool_id, username, attrs).await;
    cognito
        .admin_set_user_password()
        .user_pool_id(pool_id)
        .username(username)
        .password(PASSWORD)
        .permanent(true)
        .send()
        .await
        .unwrap();
    let auth = cognito
        .admin_initiate_auth()
        .user_pool_id(pool_id)
        .client_id(client_id)
        .auth_flow(AuthFlowType::AdminUserPasswordAuth)
        .auth_parameters("USERNAME", username)
        .auth_parameters("PASSWORD", PASSWORD)
        .send()
        .await
        .unwrap()
        .authentication_result
        .unwrap();
    SignedIn { sub, access_token: auth.access_token.unwrap(), id_token: auth.id_token.unwrap() }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// A database of its own for one test, on the shared server.
pub struct TestDb {
    pub name: String,
    pub url: String,
    dropped: bool,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = unique("syncd_test_");
        let mut conn = PgConnection::connect(PG_ADMIN_URL).await.unwrap_or_else(|e| {
            panic!("PostgreSQL does not answer at {PG_ADMIN_URL} ({e}); run scripts/ensure-postgres")
        });
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let _ = conn.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        TestDb { name, url, dropped: false }
    }

    pub async fn drop_db(mut self) {
        self.dropped = true;
        if let Err(e) = drop_database(&self.name).await {
            panic!("dropping database {}: {e}", self.name);
        }
    }
}

impl Drop for TestDb {
    // Best effort for tests that end early (a failed assertion). Drop may run inside a runtime,
    // where blocking on another one panics, hence a thread with a runtime of its own.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let name = std::mem::take(&mut self.name);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(drop_database(&name)).ok()
        })
        .join();
    }
}

async fn drop_database(name: &str) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect(PG_ADMIN_URL).await?;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name)
    .execute(&mut conn)
    .await?;
    // FORCE also covers a connection opened between the terminate and the drop.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)))
        .execute(&mut conn)
        .await?;
    conn.close().await
}

// ---------------------------------------------------------------------------------------------
// Small things

/// `prefix` followed by 12 random hex digits; valid in table, pool and database names.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &id[..12])
}

/// The sum of the samples of metric `name` in a Prometheus text exposition whose line contains
/// every needle.
pub fn metric(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 20 ms until it returns true; panics naming `what` after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    // Wall-clock on purpose: moto and PostgreSQL do not follow tokio's paused clock.
    let end = Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `dir/config.toml` (SPEC section 4) pointing the daemon at moto and `pg_url`, with
/// both listeners on ephemeral ports.
pub fn write_config(dir: &Path, moto_url: &str, table: &str, pg_url: &str, pool_id: &str, client_id: &str) -> PathBuf {
    let q = |s: &str| toml::Value::from(s).to_string();
    let text = format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = {moto}
emulator_credentials = true

[dynamodb]
table = {table}

[auth]
user_pool_id = {pool}
client_id = {client}
issuer = {issuer}
jwks_url = {jwks}

[postgres]
url = {pg}

[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
"#,
        moto = q(moto_url),
        table = q(table),
        pool = q(pool_id),
        client = q(client_id),
        // moto signs with the real AWS issuer but serves the JWKS itself.
        issuer = q(&format!("https://cognito-idp.us-east-1.amazonaws.com/{pool_id}")),
        jwks = q(&format!("{moto_url}/{pool_id}/.well-known/jwks.json")),
        pg = q(pg_url),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Merges the sections of the TOML text `extra` into `doc` key by key: a key of `extra`
/// replaces the same key of `doc`, the section's other keys stay.
pub fn merge_config(doc: &mut toml::Table, extra: &str) {
    let extra: toml::Table = extra.parse().unwrap();
    for (section, keys) in extra {
        let target = doc.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let (Some(target), toml::Value::Table(keys)) = (target.as_table_mut(), keys) {
            target.extend(keys);
        }
    }
}

/// The daemon binary, isolated from the developer's environment: no RUST_LOG, no config path,
/// no `CRUDDUR_SYNCD__*` overrides, no colours in captured output.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cruddur-syncd"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CRUDDUR_SYNCD__") {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG").env_remove("CRUDDUR_SYNCD_CONFIG").env("NO_COLOR", "1");
    cmd
}

// ---------------------------------------------------------------------------------------------
// Stream consumers

/// What a [`RecordingSink`] saw, in the order the tailer delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkEvent {
    Apply(cruddur_syncd::stream::ChangeRecord),
    Gap(cruddur_syncd::stream::GapReason),
    Progress(cruddur_syncd::stream::Progress),
    Positioned,
}

/// The test consumer of the stream tailer: records every call.
#[derive(Debug, Default)]
pub struct RecordingSink {
    events: std::sync::Mutex<Vec<SinkEvent>>,
    /// How long each `apply` takes (a change queued behind slow loads of its key).
    apply_latency: std::sync::Mutex<Duration>,
    /// How long `positioned` takes after it is recorded.
    positioned_latency: std::sync::Mutex<Duration>,
}

impl RecordingSink {
    pub fn set_apply_latency(&self, latency: Duration) {
        *self.apply_latency.lock().unwrap() = latency;
    }

    pub fn set_positioned_latency(&self, latency: Duration) {
        *self.positioned_latency.lock().unwrap() = latency;
    }

    pub fn events(&self) -> Vec<SinkEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Every record applied, in delivery order.
    pub fn changes(&self) -> Vec<cruddur_syncd::stream::ChangeRecord> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                SinkEvent::Apply(record) => Some(record),
                SinkEvent::Gap(_) | SinkEvent::Progress(_) | SinkEvent::Positioned => None,
            })
            .collect()
    }

    pub fn gaps(&self) -> Vec<cruddur_syncd::stream::GapReason> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                SinkEvent::Gap(g) => Some(g),
                SinkEvent::Apply(_) | SinkEvent::Progress(_) | SinkEvent::Positioned => None,
            })
            .collect()
    }
}

impl cruddur_syncd::stream::ChangeSink for RecordingSink {
    async fn apply(&self, record: cruddur_syncd::stream::ChangeRecord) {
        let latency = *self.apply_latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        self.events.lock().unwrap().push(SinkEvent::Apply(record));
    }

    async fn gap(&self, reason: cruddur_syncd::stream::GapReason) {
        self.events.lock().unwrap().push(SinkEvent::Gap(reason));
    }

    async fn progress(&self, progress: cruddur_syncd::stream::Progress) {
        self.events.lock().unwrap().push(SinkEvent::Progress(progress));
    }

    async fn positioned(&self) {
        self.events.lock().unwrap().push(SinkEvent::Positioned);
        let latency = *self.positioned_latency.lock().unwrap();
        tokio::time::sleep(latency).await;
    }
}
