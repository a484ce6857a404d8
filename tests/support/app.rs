//! A whole daemon in-process against the shared moto and its own PostgreSQL database, with
//! Cognito users that have real tokens, and the truth of SPEC section 2 read from DynamoDB.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_cognitoidentityprovider::types::{AttributeType, AuthFlowType, MessageActionType};
use aws_sdk_dynamodb::types::AttributeValue as V;
use cruddur_syncd::config::{self, LoadedConfig};
use cruddur_syncd::daemon::{self, Running};
use cruddur_syncd::model::{conversation_list, ApiEntry, Message, MessageGroup, MessageGroupId, Sk, UserUuid};
use cruddur_syncd::store::Store;
use cruddur_syncd::tools::{self, JsonLines};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::TestDb;

pub struct User {
    pub uuid: UserUuid,
    pub handle: String,
    pub access_token: String,
    pub id_token: String,
    pub sub: String,
}

pub struct App {
    pub running: Option<Running>,
    pub api: String,
    pub admin: String,
    pub moto: String,
    pub table: String,
    pub pool_id: String,
    pub client_id: String,
    pub db: Option<TestDb>,
    pub ddb: aws_sdk_dynamodb::Client,
    pub cognito: aws_sdk_cognitoidentityprovider::Client,
    pub pg: sqlx::PgPool,
    pub http: reqwest::Client,
    pub loaded: LoadedConfig,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Options a test may change before the daemon starts.
#[derive(Default)]
pub struct Setup {
    /// Extra lines appended to the config file (whole sections).
    pub extra_config: String,
    /// DynamoDB (not Streams) goes through this endpoint instead of moto.
    pub dynamodb_endpoint: Option<String>,
}

impl App {
    pub async fn start() -> App {
        App::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> App {
        let moto = super::moto_url();
        let sdk = super::sdk_config(&moto).await;
        let ddb = super::ddb_client(&sdk);
        let cognito = super::cognito_client(&sdk);
        let pool_id = super::create_pool(&cognito, "api-").await;
        let client_id = super::create_app_client(&cognito, &pool_id, "api-test").await;
        let db = TestDb::create().await;
        let pg = sqlx::PgPool::connect(&db.url).await.unwrap();
        sqlx::raw_sql(tools::db::SCHEMA).execute(&pg).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let table = super::unique("api-");
        let path = super::write_config(dir.path(), &moto, &table, &db.url, &pool_id, &client_id);
        let mut text = std::fs::read_to_string(&path).unwrap();
        if let Some(ep) = &setup.dynamodb_endpoint {
            text = text.replace("[aws]\n", &format!("[aws]\ndynamodb_endpoint_url = \"{ep}\"\n"));
        }
        text.push_str("\n[stream]\npoll_interval = \"100ms\"\nshard_sync_interval = \"2s\"\n");
        // Merge the test's sections key by key into the base file.
        let mut doc: toml::Table = text.parse().unwrap();
        let extra: toml::Table = setup.extra_config.parse().unwrap();
        for (section, keys) in extra {
            let target = doc.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let (Some(target), toml::Value::Table(keys)) = (target.as_table_mut(), keys) {
                target.extend(keys);
            }
        }
        std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
        let loaded = config::load(&path).unwrap();

        let store = Store::new(ddb.clone(), table.clone(), moto.clone());
        tools::ddb::schema_load(&loaded.config, &store, &mut JsonLines::new(Vec::new())).await.unwrap();

        let running = daemon::start(&loaded).await.unwrap_or_else(|e| panic!("daemon did not start: {e}"));
        let api = format!("http://{}", running.api_addr);
        let admin = format!("http://{}", running.admin_addr);
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
        let app = App {
            running: Some(running),
            api,
            admin,
            moto,
            table,
            pool_id,
            client_id,
            db: Some(db),
            ddb,
            cognito,
            pg,
            http,
            loaded,
            config_path: path,
            _dir: dir,
        };
        let url = format!("{}/readyz", app.admin);
        let http = app.http.clone();
        super::wait_until(Duration::from_secs(20), "the daemon is ready", || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        app
    }

    /// A Cognito user with real tokens and, when `provisioned`, a `users` row mapped to its sub.
    pub async fn user(&self, handle: &str, uuid: Option<UserUuid>, provisioned: bool) -> User {
        let attr = |k: &str, v: &str| AttributeType::builder().name(k).value(v).build().unwrap();
        self.cognito
            .admin_create_user()
            .user_pool_id(&self.pool_id)
            .username(handle)
            .user_attributes(attr("preferred_username", handle))
            .user_attributes(attr("email", &format!("{handle}@example.com")))
            .message_action(MessageActionType::Suppress)
            .send()
            .await
            .unwrap();
        self.cognito
            .admin_set_user_password()
            .user_pool_id(&self.pool_id)
            .username(handle)
            .password("Testing123!")
            .permanent(true)
            .send()
            .await
            .unwrap();
        let auth = self
            .cognito
            .admin_initiate_auth()
            .user_pool_id(&self.pool_id)
            .client_id(&self.client_id)
            .auth_flow(AuthFlowType::AdminUserPasswordAuth)
            .auth_parameters("USERNAME", handle)
            .auth_parameters("PASSWORD", "Testing123!")
            .send()
            .await
            .unwrap()
            .authentication_result
            .unwrap();
        let got = self.cognito.admin_get_user().user_pool_id(&self.pool_id).username(handle).send().await.unwrap();
        let sub = got.user_attributes().iter().find(|a| a.name() == "sub").and_then(|a| a.value()).unwrap().to_string();
        let uuid = uuid.unwrap_or_else(|| UserUuid(uuid::Uuid::new_v4()));
        if provisioned {
            sqlx::query(
                "INSERT INTO public.users (uuid, display_name, handle, email, cognito_user_id) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(uuid.0)
            .bind(format!("Display {handle}"))
            .bind(handle)
            .bind(format!("{handle}@example.com"))
            .bind(&sub)
            .execute(&self.pg)
            .await
            .unwrap();
        }
        User {
            uuid,
            handle: handle.to_string(),
            access_token: auth.access_token.unwrap(),
            id_token: auth.id_token.unwrap(),
            sub,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.api)).bearer_auth(token).send().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }

    /// The sum of a metric's samples whose line contains every needle.
    pub async fn metric(&self, name: &str, needles: &[&str]) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn store(&self) -> Store {
        Store::new(self.ddb.clone(), self.table.clone(), self.moto.clone())
    }

    /// Every conversation of `user` as SPEC section 2 defines it, read from DynamoDB.
    pub async fn truth_groups(&self, user: UserUuid) -> Vec<MessageGroup> {
        let (rows, misfits) = self.store().group_rows(user).await.unwrap();
        assert!(misfits.is_empty());
        conversation_list(rows)
    }

    /// Every message of a group, oldest first, read from DynamoDB.
    pub async fn truth_messages(&self, group: MessageGroupId) -> Vec<Message> {
        self.store().messages(group).await.unwrap().0
    }

    /// Every item of a list route, following `Link: rel="next"`, in the route's order across
    /// pages: conversations newest first; messages oldest first (each page is oldest first
    /// and pages go back in time, so they are put together in reverse).
    pub async fn all_pages(&self, first: &str, token: &str) -> Vec<serde_json::Value> {
        let pages = self.pages(first, token).await;
        if first.starts_with("/api/messages/") {
            pages.into_iter().rev().flatten().collect()
        } else {
            pages.into_iter().flatten().collect()
        }
    }

    /// Every page of a list route, as served.
    pub async fn pages(&self, first: &str, token: &str) -> Vec<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        let mut next = Some(first.to_string());
        while let Some(path) = next.take() {
            let res = self.get(&path, token).await;
            assert_eq!(res.status(), 200, "{path}");
            next = res
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix('<')?.split_once(">; rel=\"next\"").map(|(u, _)| u.to_string()));
            let page: Vec<serde_json::Value> = res.json().await.unwrap();
            out.push(page);
        }
        out
    }

    pub async fn put_group(&self, g: &MessageGroup) {
        self.ddb.put_item().table_name(&self.table).set_item(Some(g.to_item())).send().await.unwrap();
    }

    pub async fn put_message(&self, m: &Message) {
        self.ddb.put_item().table_name(&self.table).set_item(Some(m.to_item())).send().await.unwrap();
    }

    pub async fn delete(&self, pk: String, sk: &Sk) {
        self.ddb
            .delete_item()
            .table_name(&self.table)
            .key("pk", V::S(pk))
            .key("sk", V::S(sk.as_str().to_string()))
            .send()
            .await
            .unwrap();
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        self.pg.close().await;
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
    }
}

/// A message from `sender` at `sk`, with the sender named as [`App::user`] names users.
pub fn message(group: MessageGroupId, sk: Sk, sender: &User, text: &str) -> Message {
    Message {
        group,
        sk,
        message_uuid: cruddur_syncd::model::MessageId(uuid::Uuid::new_v4()),
        message: text.to_string(),
        user_uuid: sender.uuid,
        user_display_name: format!("Display {}", sender.handle),
        user_handle: sender.handle.clone(),
    }
}

/// Both rows of a conversation between `a` and `b` (each naming the other) at `sk`, saying
/// `text`.
pub fn conversation_rows(group: MessageGroupId, sk: Sk, a: &User, b: &User, text: &str) -> [MessageGroup; 2] {
    let row = |owner: &User, other: &User| MessageGroup {
        owner: owner.uuid,
        sk: sk.clone(),
        message_group_uuid: group,
        message: text.to_string(),
        user_uuid: other.uuid,
        user_display_name: format!("Display {}", other.handle),
        user_handle: other.handle.clone(),
    };
    [row(a, b), row(b, a)]
}

/// Entries as JSON values, to compare with the API's.
pub fn entries_json(entries: &[ApiEntry]) -> Vec<serde_json::Value> {
    entries.iter().map(|e| serde_json::to_value(e).unwrap()).collect()
}

/// A TCP proxy to `upstream` that can hold every answer back for a while: a real connection
/// made slow, for the load/stream race test.
pub struct DelayProxy {
    pub url: String,
    delay_ms: Arc<AtomicU64>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl DelayProxy {
    pub async fn start(upstream: &str) -> DelayProxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let delay_ms = Arc::new(AtomicU64::new(0));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (delay, is_down) = (delay_ms.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if is_down.load(Ordering::Relaxed) {
                    drop(client); // the upstream is "down": every connection is closed at once
                    continue;
                }
                let (upstream, delay) = (upstream.clone(), delay.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let d = delay.load(Ordering::Relaxed);
                        if d > 0 {
                            tokio::time::sleep(Duration::from_millis(d)).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        DelayProxy { url, delay_ms, down }
    }

    /// While down, new connections are closed at once (pooled ones are not cut: the SDK
    /// notices on their next use).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }
}

/// Renders `entries` with Flask itself (moto's venv ships it): the bytes the Flask app sends.
pub fn flask_render(entries: &[ApiEntry]) -> Vec<u8> {
    let json = serde_json::to_string(&entries_json(entries)).unwrap();
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = "import json,sys\nfrom flask import Flask\napp=Flask('cruddur')\nwith app.app_context():\n    sys.stdout.buffer.write(app.json.response(json.loads(sys.stdin.read())).get_data())\n";
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), json.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[allow(dead_code)]
pub type Truth = HashMap<MessageGroupId, Vec<Message>>;
