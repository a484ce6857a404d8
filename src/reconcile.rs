//! Reconciliation (SPEC section 7): Cognito `sub` -> PostgreSQL `users.cognito_user_id`.
//!
//! One run, on a PostgreSQL connection of its own (not one of the pool's):
//!
//! 1. `pg_try_advisory_lock(LOCK_KEY)`, a session lock: one run at a time per database across
//!    the whole fleet. Not acquired: the run is `skipped` and does nothing else. The lock dies
//!    with the connection, so a crashed instance never leaves it behind.
//! 2. ListUsers over every page, paced to `reconcile.cognito_max_rps` calls a second, throttling
//!    retried inside that pace ([`crate::cognito::for_each_user_page`]).
//! 3. One transaction, set-based: the listing goes into a temporary table with one
//!    `INSERT .. SELECT FROM UNNEST($1, $2, $3)`, one statement classifies every Cognito user
//!    (updated / unchanged / unmatched / conflict), one `UPDATE .. FROM` writes the rows whose
//!    value differs, one query counts and names the outcomes. A dry run rolls back. Any error
//!    (PostgreSQL gone, the connection dropped) rolls back too: PostgreSQL is as before the run.
//! 4. The subs whose mapping changed (new and previous) are dropped from the daemon's users
//!    cache after the commit, so the next request sees the new mapping. Other instances of a
//!    fleet, and the CLI's runs, reach it through `cache.users_ttl`.
//!
//! [`schedule`] is the daemon's loop: first run a few seconds after start, then every
//! `interval` plus up to `jitter`, never overlapping, metrics after every run. It reads its
//! [`Settings`] (`[reconcile]` and `auth.user_pool_id`) at every tick, so a reload that moves
//! the daemon to another user pool moves reconciliation with it.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_cognitoidentityprovider::types::UserType;
use futures::future::BoxFuture;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::cognito::{attribute, for_each_user_page, Pacer};
use crate::config::{Config, MatchOn, ReconcileConfig};
use crate::error::{Error, Result};
use crate::metrics::{Metrics, OutcomeLabels, RunLabels, RunResult};
use crate::model::CognitoSub;
use crate::retry::jitter;
use crate::{aws, pg};

/// The advisory lock key every instance of the fleet takes around a run ("cruddurR").
pub const LOCK_KEY: i64 = 0x6372_7564_6475_7252;

/// How many names of each outcome the report carries.
pub(crate) const REPORT_NAMES: usize = 5;

/// The first run after start waits this long (or `interval` when shorter), plus jitter.
pub(crate) const FIRST_RUN_DELAY: Duration = Duration::from_secs(5);

/// One Cognito user as reconciliation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CognitoUser {
    pub username: String,
    pub sub: Option<String>,
    /// The match attribute: `preferred_username` or `email`, per `reconcile.match_on`.
    pub value: Option<String>,
}

impl CognitoUser {
    pub(crate) fn from_user(user: &UserType, match_on: MatchOn) -> CognitoUser {
        let present = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_string);
        CognitoUser {
            username: user.username().unwrap_or_default().to_string(),
            sub: present(attribute(user, "sub")),
            value: present(attribute(user, match_attribute(match_on))),
        }
    }
}

/// The `users` column a match attribute is compared with.
pub(crate) fn match_column(match_on: MatchOn) -> &'static str {
    match match_on {
        MatchOn::Handle => "handle",
        MatchOn::Email => "email",
    }
}

fn match_attribute(match_on: MatchOn) -> &'static str {
    match match_on {
        MatchOn::Handle => "preferred_username",
        MatchOn::Email => "email",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The run went through (a dry run included).
    Completed,
    /// Another instance held the lock; nothing was done.
    Skipped,
}

/// How many Cognito users had one outcome, and the first few of them by name (sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub count: usize,
    pub first: Vec<String>,
}

/// Per Cognito user: `updated` (a row matched and got its sub; in a dry run: would get it),
/// `unchanged` (the row already had it), `unmatched` (no row has the value), `skipped` (no
/// match attribute or no sub), `conflict` (several Cognito users share the value, several
/// rows have it, or another row already carries the user's sub; none of those rows is
/// written). Names are the match value, the Cognito username for `skipped`; a conflict over a
/// sub names both rows: `alice_new (its sub is already on alice)` (their handles).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    pub updated: Outcome,
    pub unchanged: Outcome,
    pub unmatched: Outcome,
    pub skipped: Outcome,
    pub conflict: Outcome,
}

impl Outcomes {
    fn by_name(&mut self, outcome: &str) -> Option<&mut Outcome> {
        match outcome {
            "updated" => Some(&mut self.updated),
            "unchanged" => Some(&mut self.unchanged),
            "unmatched" => Some(&mut self.unmatched),
            "skipped" => Some(&mut self.skipped),
            "conflict" => Some(&mut self.conflict),
            _ => None,
        }
    }

    /// `(label, outcome)` in report order; the labels are the metric's `outcome` values.
    pub(crate) fn iter(&self) -> [(&'static str, &Outcome); 5] {
        [
            ("updated", &self.updated),
            ("unchanged", &self.unchanged),
            ("unmatched", &self.unmatched),
            ("skipped", &self.skipped),
            ("conflict", &self.conflict),
        ]
    }
}

/// What one run did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub status: Status,
    pub dry_run: bool,
    pub match_on: MatchOn,
    pub user_pool_id: String,
    pub postgres: String,
    pub cognito_users: usize,
    pub outcomes: Outcomes,
    /// How long listing Cognito took (pacing included).
    pub cognito_seconds: f64,
    /// How long the PostgreSQL transaction took.
    pub postgres_seconds: f64,
    /// Subs whose mapping changed (the new ones and the ones they replaced); empty in a dry run.
    #[serde(skip)]
    pub changed_subs: Vec<CognitoSub>,
}

impl Report {
    /// The human-readable form the CLI prints without `--json`.
    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        if self.status == Status::Skipped {
            return writeln!(
                out,
                "reconcile skipped: another instance holds the reconcile lock on {}; nothing was done",
                self.postgres
            );
        }
        let mode = if self.dry_run { " (dry run: nothing written)" } else { "" };
        writeln!(out, "reconcile completed{mode}")?;
        writeln!(
            out,
            "  cognito users   {:>7}  pool {}, listed in {:.2}s",
            self.cognito_users, self.user_pool_id, self.cognito_seconds
        )?;
        for (label, o) in self.outcomes.iter() {
            let label = if self.dry_run && label == "updated" { "would update" } else { label };
            let names = if o.first.is_empty() {
                String::new()
            } else {
                let more = if o.count > o.first.len() { ", ..." } else { "" };
                format!("  {}{more}", o.first.join(", "))
            };
            writeln!(out, "  {label:<15} {:>7}{names}", o.count)?;
        }
        writeln!(
            out,
            "  postgres phase  {:>6.2}s  {} (users.{} = Cognito {})",
            self.postgres_seconds,
            self.postgres,
            match_column(self.match_on),
            match_attribute(self.match_on)
        )
    }
}

/// A point of a run where tests may step in (stop PostgreSQL, hold the lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The advisory lock is held; Cognito is not listed yet.
    Locked,
    /// Cognito is listed; the transaction has not begun.
    Listed,
    /// Every statement ran inside the transaction; COMMIT (or the dry run's ROLLBACK) is next.
    BeforeCommit,
}

/// Called at each [`Phase`]; the run waits for the future.
#[cfg(any(test, feature = "test-support"))]
pub type Hook = Arc<dyn Fn(Phase) -> BoxFuture<'static, ()> + Send + Sync>;
/// No hooks outside tests: a type with no values.
#[cfg(not(any(test, feature = "test-support")))]
pub enum Hook {}

async fn at(hook: Option<&Hook>, phase: Phase) {
    #[cfg(any(test, feature = "test-support"))]
    if let Some(h) = hook {
        h(phase).await;
    }
    #[cfg(not(any(test, feature = "test-support")))]
    let _ = (hook, phase);
}

/// What a scheduled run reads at every tick; a reload replaces it.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub reconcile: ReconcileConfig,
    /// The pool listed: the one whose tokens the API verifies (`auth.user_pool_id`).
    pub user_pool_id: String,
}

impl Settings {
    pub(crate) fn of(cfg: &Config) -> Settings {
        Settings { reconcile: cfg.reconcile.clone(), user_pool_id: cfg.auth.user_pool_id.clone() }
    }
}

/// Runs reconciliations against one pool and one database.
#[derive(Clone)]
pub struct Reconciler {
    cognito: aws_sdk_cognitoidentityprovider::Client,
    cognito_endpoint: String,
    user_pool_id: String,
    pg: PgConnectOptions,
    pg_target: String,
    connect_timeout: Duration,
    cache: Option<Arc<Cache>>,
    /// With fan-out on: where the changed subs are published, so every instance forgets them.
    fanout: Option<Arc<crate::fanout::Nats>>,
}

impl Reconciler {
    /// Publishes the subs each run changed on the fan-out stream (every instance's follower
    /// forgets them at once, not at `cache.users_ttl`).
    pub(crate) fn with_fanout(mut self, nats: Arc<crate::fanout::Nats>) -> Self {
        self.fanout = Some(nats);
        self
    }

    pub fn new(
        cognito: aws_sdk_cognitoidentityprovider::Client,
        cognito_endpoint: impl Into<String>,
        user_pool_id: impl Into<String>,
        pg: PgConnectOptions,
        connect_timeout: Duration,
        cache: Option<Arc<Cache>>,
    ) -> Reconciler {
        let pg_target = pg::describe(&pg);
        Reconciler {
            cognito,
            cognito_endpoint: cognito_endpoint.into(),
            user_pool_id: user_pool_id.into(),
            pg,
            pg_target,
            connect_timeout,
            cache,
            fanout: None,
        }
    }

    /// The pool of `auth.user_pool_id` and the database of `[postgres]`; `cache` is the daemon's
    /// (the CLI has none).
    pub(crate) fn from_config(cfg: &Config, clients: &aws::Clients, cache: Option<Arc<Cache>>) -> Result<Reconciler> {
        Ok(Reconciler::new(
            clients.cognito.clone(),
            clients.endpoints.cognito.clone(),
            cfg.auth.user_pool_id.clone(),
            pg::options(&cfg.postgres)?,
            cfg.postgres.connect_timeout,
            cache,
        ))
    }

    /// The same reconciler for another pool.
    pub(crate) fn for_pool(&self, user_pool_id: &str) -> Reconciler {
        Reconciler { user_pool_id: user_pool_id.to_string(), ..self.clone() }
    }

    /// One run now. `Ok` with [`Status::Skipped`] when another instance holds the lock; `Err`
    /// when Cognito or PostgreSQL failed, in which case nothing was written.
    pub async fn run(&self, settings: &ReconcileConfig, dry_run: bool) -> Result<Report> {
        self.run_hooked(settings, dry_run, None).await
    }

    /// [`Reconciler::run`], calling `hook` at each [`Phase`].
    #[cfg(any(test, feature = "test-support"))]
    pub fn run_with_hook<'a>(
        &'a self,
        settings: &'a ReconcileConfig,
        dry_run: bool,
        hook: Option<&'a Hook>,
    ) -> BoxFuture<'a, Result<Report>> {
        self.run_hooked(settings, dry_run, hook)
    }

    /// Boxed so that the future's `Send` is proven here, where its lifetimes are concrete (the
    /// daemon spawns it).
    fn run_hooked<'a>(
        &'a self,
        settings: &'a ReconcileConfig,
        dry_run: bool,
        hook: Option<&'a Hook>,
    ) -> BoxFuture<'a, Result<Report>> {
        Box::pin(self.run_inner(settings, dry_run, hook))
    }

    async fn run_inner(&self, settings: &ReconcileConfig, dry_run: bool, hook: Option<&Hook>) -> Result<Report> {
        let mut report = Report {
            status: Status::Skipped,
            dry_run,
            match_on: settings.match_on,
            user_pool_id: self.user_pool_id.clone(),
            postgres: self.pg_target.clone(),
            cognito_users: 0,
            outcomes: Outcomes::default(),
            cognito_seconds: 0.0,
            postgres_seconds: 0.0,
            changed_subs: Vec::new(),
        };
        // A connection of the run's own: the session lock lives exactly as long as it, and any
        // early return drops it, which ends the session (lock released, transaction rolled back).
        let mut conn = self.connect().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| pg::query_error(&self.pg_target, "taking the reconcile lock", e))?;
        if !locked {
            let _ = conn.close().await;
            return Ok(report);
        }
        at(hook, Phase::Locked).await;

        let started = Instant::now();
        let users = self.list(settings).await?;
        report.cognito_seconds = started.elapsed().as_secs_f64();
        report.cognito_users = users.len();
        at(hook, Phase::Listed).await;

        let started = Instant::now();
        let (outcomes, changed) = apply(&mut conn, &self.pg_target, &users, settings.match_on, dry_run, hook).await?;
        report.postgres_seconds = started.elapsed().as_secs_f64();
        report.outcomes = outcomes;
        report.status = Status::Completed;
        // Committed: the lock can go. If the unlock fails the close below ends the session anyway.
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(LOCK_KEY).execute(&mut conn).await;
        let _ = conn.close().await;

        if !dry_run {
            if let Some(cache) = &self.cache {
                cache.forget_users(changed.iter().cloned()).await;
            }
            if let (Some(nats), false) = (&self.fanout, changed.is_empty()) {
                // Best effort: the other instances see the change within users_ttl anyway.
                if let Err(e) = nats.publish(&crate::fanout::wire::Notice::Users(changed.clone())).await {
                    tracing::warn!(
                        "cannot tell the fleet which mappings changed ({e}); they see it within cache.users_ttl"
                    );
                }
            }
            report.changed_subs = changed;
        }
        Ok(report)
    }

    async fn connect(&self) -> Result<PgConnection> {
        let cfg = crate::config::PostgresConfig { connect_timeout: self.connect_timeout, ..Default::default() };
        match tokio::time::timeout(self.connect_timeout, PgConnection::connect_with(&self.pg)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(pg::connect_error(&self.pg_target, &e, &cfg)),
            Err(_) => Err(pg::connect_error(&self.pg_target, &sqlx::Error::PoolTimedOut, &cfg)),
        }
    }

    async fn list(&self, settings: &ReconcileConfig) -> Result<Vec<CognitoUser>> {
        let mut users = Vec::new();
        let mut pacer = Pacer::per_second(settings.cognito_max_rps);
        for_each_user_page(&self.cognito, &self.cognito_endpoint, &self.user_pool_id, &mut pacer, |page| {
            users.extend(page.iter().map(|u| CognitoUser::from_user(u, settings.match_on)));
            Ok(())
        })
        .await?;
        Ok(users)
    }
}

/// The PostgreSQL phase on its own (public for the benchmark): one transaction on `conn`,
/// committed unless `dry_run`. Returns the outcomes and the subs whose mapping changed.
pub fn apply<'a>(
    conn: &'a mut PgConnection,
    target: &'a str,
    users: &'a [CognitoUser],
    match_on: MatchOn,
    dry_run: bool,
    hook: Option<&'a Hook>,
) -> BoxFuture<'a, Result<(Outcomes, Vec<CognitoSub>)>> {
    Box::pin(apply_inner(conn, target, users, match_on, dry_run, hook))
}

async fn apply_inner(
    conn: &mut PgConnection,
    target: &str,
    users: &[CognitoUser],
    match_on: MatchOn,
    dry_run: bool,
    hook: Option<&Hook>,
) -> Result<(Outcomes, Vec<CognitoSub>)> {
    let column = match_column(match_on);
    let mut outcomes = Outcomes::default();

    // Users without a sub or a match attribute are skipped; a sub seen twice (the pool changed
    // while it was paged) counts once, so it cannot conflict with itself.
    let (mut usernames, mut subs, mut values): (Vec<String>, Vec<String>, Vec<String>) = Default::default();
    let mut seen = HashSet::new();
    let mut skipped = Vec::new();
    for u in users {
        match (&u.sub, &u.value) {
            (Some(sub), Some(value)) => {
                if seen.insert(sub.as_str()) {
                    usernames.push(u.username.clone());
                    subs.push(sub.clone());
                    values.push(value.clone());
                }
            }
            _ => skipped.push(u.username.clone()),
        }
    }
    outcomes.skipped.count = skipped.len();
    skipped.sort_unstable();
    skipped.truncate(REPORT_NAMES);
    outcomes.skipped.first = skipped;

    let mut tx = conn.begin().await.map_err(|e| pg::query_error(target, "beginning the reconcile transaction", e))?;

    // The hash joins and aggregates below hold every listed user: give them room to stay in
    // memory for this transaction only (the default 4MB spills 100,000 users to disk).
    sqlx::query("SET LOCAL work_mem = '64MB'")
        .execute(&mut *tx)
        .await
        .map_err(|e| pg::query_error(target, "setting work_mem", e))?;
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'users'",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| pg::query_error(target, "reading the columns of public.users", e))?;
    if columns.is_empty() {
        return Err(Error::Failed(format!(
            "cannot reconcile: table public.users does not exist in PostgreSQL at {target} (cruddur-syncd db schema-load creates it)"
        )));
    }
    for needed in [column, "cognito_user_id"] {
        if !columns.iter().any(|c| c == needed) {
            return Err(Error::Failed(format!(
                "cannot reconcile: table public.users in PostgreSQL at {target} has no column {needed}{}",
                if needed == column { format!(" (reconcile.match_on = \"{column}\")") } else { String::new() }
            )));
        }
    }

    sqlx::query(
        "CREATE TEMPORARY TABLE reconcile_cognito (username text NOT NULL, sub text NOT NULL, value text NOT NULL) \
         ON COMMIT DROP",
    )
    .execute(&mut *tx)
    .await
    .map_err(|e| pg::query_error(target, "creating the reconcile temporary table", e))?;
    sqlx::query("INSERT INTO reconcile_cognito SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])")
        .bind(&usernames)
        .bind(&subs)
        .bind(&values)
        .execute(&mut *tx)
        .await
        .map_err(|e| pg::query_error(target, "loading the Cognito users", e))?;
    // A temporary table has no statistics until analysed; the joins below need them.
    sqlx::query("ANALYZE reconcile_cognito")
        .execute(&mut *tx)
        .await
        .map_err(|e| pg::query_error(target, "analysing the Cognito users", e))?;

    // One row per Cognito user with its outcome. Both kinds of claim conflict are found by
    // hashing once: values several Cognito users claim, and values several rows carry. A value
    // in several rows is joined to none of them, so every Cognito user stays one plan row. A
    // sub that another row than the matched one already carries is a conflict too: writing it
    // would leave two rows with one sub, which the API serves to nobody (403).
    let named = if columns.iter().any(|c| c == "handle") { "handle" } else { column };
    let classify = format!(
        "CREATE TEMPORARY TABLE reconcile_plan ON COMMIT DROP AS
         WITH shared_claims AS (SELECT value FROM reconcile_cognito GROUP BY value HAVING count(*) > 1),
              shared_rows AS (
                SELECT {column} AS value FROM public.users WHERE {column} IS NOT NULL
                GROUP BY {column} HAVING count(*) > 1),
              carriers AS (
                SELECT cognito_user_id AS sub, array_agg(uuid) AS uuids, array_agg({named}::text) AS names
                FROM public.users WHERE cognito_user_id IN (SELECT sub FROM reconcile_cognito)
                GROUP BY cognito_user_id),
              matched AS (
                SELECT k.username, k.sub, k.value, u.uuid, u.cognito_user_id AS current,
                       u.{named}::text AS row_name, r.value AS shared_row, c.value AS shared_claim,
                       (SELECT coalesce(n, id::text) FROM unnest(s.uuids, s.names) AS x(id, n)
                        WHERE u.uuid IS NOT NULL AND x.id <> u.uuid ORDER BY 1 LIMIT 1) AS sub_on
                FROM reconcile_cognito k
                LEFT JOIN shared_rows r ON r.value = k.value
                LEFT JOIN public.users u ON r.value IS NULL AND u.{column} = k.value
                LEFT JOIN shared_claims c ON c.value = k.value
                LEFT JOIN carriers s ON s.sub = k.sub)
         SELECT username, sub, value, uuid, current,
                CASE WHEN shared_row IS NOT NULL THEN 'conflict'
                     WHEN uuid IS NULL THEN 'unmatched'
                     WHEN shared_claim IS NOT NULL THEN 'conflict'
                     WHEN sub_on IS NOT NULL THEN 'conflict'
                     WHEN current IS NOT DISTINCT FROM sub THEN 'unchanged'
                     ELSE 'updated' END AS outcome,
                CASE WHEN shared_row IS NULL AND uuid IS NOT NULL AND shared_claim IS NULL AND sub_on IS NOT NULL
                     THEN coalesce(row_name, value) || ' (its sub is already on ' || sub_on || ')'
                     ELSE value END AS name
         FROM matched"
    );
    // Only the match column varies, and it is one of a closed set ("handle" or "email").
    sqlx::query(sqlx::AssertSqlSafe(classify))
        .execute(&mut *tx)
        .await
        .map_err(|e| pg::query_error(target, "matching Cognito users to public.users", e))?;

    // Without statistics the UPDATE below would be planned as 100,000 index lookups.
    sqlx::query("ANALYZE reconcile_plan")
        .execute(&mut *tx)
        .await
        .map_err(|e| pg::query_error(target, "analysing the plan", e))?;

    // Only rows whose value differs are written (the plan says so; the WHERE makes sure).
    sqlx::query(
        "UPDATE public.users u SET cognito_user_id = p.sub FROM reconcile_plan p \
         WHERE p.outcome = 'updated' AND u.uuid = p.uuid AND u.cognito_user_id IS DISTINCT FROM p.sub",
    )
    .execute(&mut *tx)
    .await
    .map_err(|e| pg::query_error(target, "updating public.users.cognito_user_id", e))?;

    // Counts in one pass; the first names of each outcome by a top-N per outcome, not a sort of
    // the whole plan.
    let counts: Vec<(String, i64, Vec<String>)> = sqlx::query_as(
        "SELECT o.outcome, o.n,
                ARRAY(SELECT p.name FROM reconcile_plan p WHERE p.outcome = o.outcome
                      GROUP BY p.name ORDER BY p.name LIMIT $1)
         FROM (SELECT outcome, count(*) AS n FROM reconcile_plan GROUP BY outcome) o",
    )
    .bind(REPORT_NAMES as i64)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| pg::query_error(target, "counting the outcomes", e))?;
    for (outcome, count, first) in counts {
        if let Some(o) = outcomes.by_name(&outcome) {
            o.count = usize::try_from(count).unwrap_or_default();
            o.first = first;
        }
    }

    let mut changed = Vec::new();
    if !dry_run {
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT sub, current FROM reconcile_plan WHERE outcome = 'updated'")
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| pg::query_error(target, "reading the changed mappings", e))?;
        for (new, old) in rows {
            changed.push(CognitoSub(new));
            changed.extend(old.map(CognitoSub));
        }
    }

    at(hook, Phase::BeforeCommit).await;
    if dry_run {
        tx.rollback().await.map_err(|e| pg::query_error(target, "rolling back the dry run", e))?;
    } else {
        tx.commit().await.map_err(|e| pg::query_error(target, "committing the reconcile transaction", e))?;
    }
    Ok((outcomes, changed))
}

/// The daemon's loop: one run at a time, until `stop`. `settings` is read at every tick, so a
/// reload of `interval`, `jitter`, `match_on`, `cognito_max_rps`, `enabled` or the user pool
/// applies from the next tick; while disabled it only waits for a change.
pub(crate) async fn schedule(
    reconciler: Reconciler,
    mut settings: watch::Receiver<Settings>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut first = true;
    loop {
        let cfg = settings.borrow_and_update().reconcile.clone();
        if !cfg.enabled {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = settings.changed() => {
                    if changed.is_err() {
                        // No one can turn it on any more.
                        stop.cancelled().await;
                        return;
                    }
                }
            }
            continue;
        }
        let delay = if first {
            FIRST_RUN_DELAY.min(cfg.interval) + jitter(cfg.jitter.min(FIRST_RUN_DELAY))
        } else {
            cfg.interval + jitter(cfg.jitter)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        first = false;
        let now = settings.borrow().clone();
        if !now.reconcile.enabled {
            continue;
        }
        let run = if now.user_pool_id == reconciler.user_pool_id {
            reconciler.clone()
        } else {
            reconciler.for_pool(&now.user_pool_id)
        };
        // Cancelling drops the run: its connection closes, so PostgreSQL rolls it back.
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = run.run(&now.reconcile, false) => r,
        };
        record(&metrics, &result);
    }
}

/// Metrics and the one log line of a run.
pub(crate) fn record(metrics: &Metrics, result: &Result<Report>) {
    let run = |result| metrics.reconcile_runs.get_or_create(&RunLabels { result }).inc();
    match result {
        Ok(r) if r.status == Status::Skipped => {
            run(RunResult::skipped);
            tracing::info!(postgres = %r.postgres, "reconcile skipped: another instance holds the lock");
        }
        Ok(r) => {
            run(RunResult::success);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            metrics.reconcile_last_success_timestamp_seconds.set(now.as_secs_f64());
            for (outcome, o) in r.outcomes.iter() {
                metrics.reconcile_users.get_or_create(&OutcomeLabels { outcome }).set(o.count as i64);
            }
            tracing::info!(
                cognito_users = r.cognito_users,
                updated = r.outcomes.updated.count,
                unchanged = r.outcomes.unchanged.count,
                unmatched = r.outcomes.unmatched.count,
                skipped = r.outcomes.skipped.count,
                conflict = r.outcomes.conflict.count,
                conflicts = ?r.outcomes.conflict.first,
                cognito_seconds = r.cognito_seconds,
                postgres_seconds = r.postgres_seconds,
                "reconcile completed"
            );
        }
        Err(e) => {
            run(RunResult::failure);
            tracing::warn!("reconcile failed, nothing written; the next tick retries: {e}");
        }
    }
}

/// The CLI's `reconcile` command: one run now, the report on `out`. Skipped is `Ok` here; the
/// caller decides the exit code.
pub async fn run_once(cfg: &Config, clients: &aws::Clients, dry_run: bool) -> Result<Report> {
    Reconciler::from_config(cfg, clients, None)?.run(&cfg.reconcile, dry_run).await
}
