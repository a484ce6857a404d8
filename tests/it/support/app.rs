//! A whole daemon in-process against the shared moto and its own PostgreSQL database, with
//! Cognito users that have real tokens, and the truth of SPEC section 2 read from DynamoDB.

use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue as V;
use cruddur_syncd::config::{self, LoadedConfig};
use cruddur_syncd::daemon::{self, Running};
use cruddur_syncd::model::{conversation_list, ApiEntry, Message, MessageGroup, MessageGroupId, Sk, UserUuid};
use cruddur_syncd::store::Store;
use cruddur_syncd::tools::{self, JsonLines};

use super::workload::ApiClient;
use super::TestDb;

pub struct User {
    pub uuid: UserUuid,
    pub handle: String,
    pub access_token: String,
    pub id_token: String,
}

pub struct App {
    pub running: Option<Running>,
    pub api: String,
    pub admin: String,
    /// The shared moto: Cognito and the JWKS.
    pub moto: String,
    /// The moto that holds the table (the shared one unless [`Setup::table_moto`]).
    pub ddb_url: String,
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
    /// The daemon's DynamoDB client goes through this endpoint (a proxy) instead of moto.
    pub dynamodb_endpoint: Option<String>,
    /// The daemon's DynamoDB Streams client goes through this endpoint instead of moto.
    pub streams_endpoint: Option<String>,
    /// The moto that holds the table (a test's own, to restart it); default: the shared one.
    /// Cognito (and so the tokens) stays on the shared moto.
    pub table_moto: Option<String>,
    /// A PostgreSQL database of the test's own (a throwaway cluster, to stop it) instead of a
    /// new database on the shared server; the users schema is loaded into it.
    pub postgres_url: Option<String>,
    /// Prepare everything (config file, table, database) but do not start a daemon: the test
    /// runs the binary itself ([`super::daemon::Daemon`]) with `config_path`.
    pub external_daemon: bool,
}

impl App {
    pub async fn start() -> App {
        App::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> App {
        // The in-process daemon logs only when asked (RUST_LOG), to debug a failing test.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let moto = super::moto_url();
        let sdk = super::sdk_config(&moto).await;
        let ddb_url = setup.table_moto.clone().unwrap_or_else(|| moto.clone());
        let ddb = super::ddb_client(&super::sdk_config(&ddb_url).await);
        let cognito = super::cognito_client(&sdk);
        let pool_id = super::create_pool(&cognito, "api-").await;
        let client_id = super::create_app_client(&cognito, &pool_id, "api-test").await;
        let (db, pg_url) = match &setup.postgres_url {
            Some(url) => (None, url.clone()),
            None => {
                let db = TestDb::create().await;
                let url = db.url.clone();
                (Some(db), url)
            }
        };
        let pg = sqlx::PgPool::connect(&pg_url).await.unwrap();
        sqlx::raw_sql(tools::db::SCHEMA).execute(&pg).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let table = super::unique("api-");
        let path = super::write_config(dir.path(), &moto, &table, &pg_url, &pool_id, &client_id);
        let mut text = std::fs::read_to_string(&path).unwrap();
        let endpoints = [
            ("dynamodb_endpoint_url", setup.dynamodb_endpoint.as_ref().or(setup.table_moto.as_ref())),
            ("streams_endpoint_url", setup.streams_endpoint.as_ref().or(setup.table_moto.as_ref())),
        ];
        for (key, url) in endpoints {
            if let Some(url) = url {
                text = text.replace("[aws]\n", &format!("[aws]\n{key} = \"{url}\"\n"));
            }
        }
        text.push_str("\n[stream]\npoll_interval = \"100ms\"\nshard_sync_interval = \"2s\"\n");
        let mut doc: toml::Table = text.parse().unwrap();
        super::merge_config(&mut doc, &setup.extra_config);
        std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
        let loaded = config::load(&path).unwrap();

        let store = Store::new(ddb.clone(), table.clone(), ddb_url.clone());
        tools::ddb::schema_load(&loaded.config, &store, &mut JsonLines::new(Vec::new())).await.unwrap();

        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
        let running = if setup.external_daemon {
            None
        } else {
            Some(daemon::start(&loaded).await.unwrap_or_else(|e| panic!("daemon did not start: {e}")))
        };
        let addr = |a: Option<std::net::SocketAddr>| a.map(|a| format!("http://{a}")).unwrap_or_default();
        let api = addr(running.as_ref().map(|r| r.api_addr));
        let admin = addr(running.as_ref().map(|r| r.admin_addr));
        let app = App {
            running,
            api,
            admin,
            moto,
            ddb_url,
            table,
            pool_id,
            client_id,
            db,
            ddb,
            cognito,
            pg,
            http,
            loaded,
            config_path: path,
            _dir: dir,
        };
        if app.running.is_none() {
            return app;
        }
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
        let email = format!("{handle}@example.com");
        let attrs = [("preferred_username", handle), ("email", email.as_str())];
        let signed_in = super::sign_up(&self.cognito, &self.pool_id, &self.client_id, handle, &attrs).await;
        let uuid = uuid.unwrap_or_else(|| UserUuid(uuid::Uuid::new_v4()));
        if provisioned {
            sqlx::query(
                "INSERT INTO public.users (uuid, display_name, handle, email, cognito_user_id) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(uuid.0)
            .bind(format!("Display {handle}"))
            .bind(handle)
            .bind(format!("{handle}@example.com"))
            .bind(&signed_in.sub)
            .execute(&self.pg)
            .await
            .unwrap();
        }
        User { uuid, handle: handle.to_string(), access_token: signed_in.access_token, id_token: signed_in.id_token }
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.api)).bearer_auth(token).send().await.unwrap()
    }

    /// A list route's items, or `None` for any other answer. For waits only: a change that
    /// takes two writes (the Lambda's delete + put of a group row) is served in between, as
    /// Flask would serve it, and a `messages` read then is a 404.
    pub async fn list_if_ok(&self, path: &str, token: &str) -> Option<Vec<serde_json::Value>> {
        let res = self.get(path, token).await;
        if res.status() != reqwest::StatusCode::OK {
            return None;
        }
        Some(res.json().await.expect("a 200 from a list route is a JSON array"))
    }

    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }

    /// The sum of a metric's samples whose line contains every needle.
    pub async fn metric(&self, name: &str, needles: &[&str]) -> f64 {
        super::metric(&self.metrics().await, name, needles)
    }

    pub fn store(&self) -> Store {
        Store::new(self.ddb.clone(), self.table.clone(), self.ddb_url.clone())
    }

    /// The in-process daemon's API as a client sees it.
    pub fn api_client(&self) -> ApiClient {
        ApiClient { http: self.http.clone(), base: self.api.clone() }
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

    /// Every item of a list route across its pages, in the route's order ([`ApiClient::all_pages`]).
    pub async fn all_pages(&self, first: &str, token: &str) -> Vec<serde_json::Value> {
        self.api_client().all_pages(first, token).await
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
