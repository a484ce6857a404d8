//! The Prometheus families of SPEC section 6, in one registry that every component shares.
//!
//! prometheus-client appends `_total` to counters itself, so counters are registered without
//! it (`stream_records` becomes `cruddur_syncd_stream_records_total`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum StreamEvent {
    INSERT,
    MODIFY,
    REMOVE,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ShardState {
    reading,
    finished,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StreamErrorKind {
    expired_iterator,
    trimmed,
    throttled,
    not_found,
    other,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CacheName {
    groups,
    messages,
    users,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CacheResult {
    hit,
    miss,
    /// Served past its TTL while its reload failed (`cache.stale_if_error`).
    stale,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StoreRead {
    groups,
    messages,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    pub dependency: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreReadLabels {
    pub read: StoreRead,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RunResult {
    success,
    failure,
    skipped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: StreamEvent,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub state: ShardState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: StreamErrorKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: CacheName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheRequestLabels {
    pub cache: CacheName,
    pub result: CacheResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub result: RunResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The `reason` values of `projector_records_skipped_total`.
pub(crate) const PROJECTOR_SKIP_REASONS: [&str; 5] = ["not_message", "stale", "no_group_rows", "gone", "failed"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
    pub revision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: &'static str,
}

/// The `reason` values of `fanout_gaps_total`: a gap the relay published (the stream lost
/// records), a JetStream sequence the follower did not receive, a lost NATS connection.
pub(crate) const FANOUT_GAP_REASONS: [&str; 3] = ["source", "missed", "reconnect"];

pub(crate) type FloatGauge = Gauge<f64, AtomicU64>;

fn duration_histogram() -> Histogram {
    // 50 µs .. ~3.3 s: cache hits are microseconds, DynamoDB misses tens of milliseconds.
    Histogram::new(exponential_buckets(0.00005, 4.0, 9))
}

/// Every metric the daemon exports. Cheap to share behind an `Arc`; all fields are atomic.
pub struct Metrics {
    registry: Registry,
    pub stream_records: Family<EventLabels, Counter>,
    pub stream_iterator_age_seconds: FloatGauge,
    pub stream_shards: Family<ShardLabels, Gauge>,
    pub stream_errors: Family<ErrorLabels, Counter>,
    pub stream_resyncs: Counter,
    pub stream_skipped_records: Family<SkipLabels, Counter>,
    pub cache_requests: Family<CacheRequestLabels, Counter>,
    pub cache_entries: Family<CacheLabels, Gauge>,
    pub cache_weight_bytes: Family<CacheLabels, Gauge>,
    pub store_items_read: Family<StoreReadLabels, Counter>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_duration_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub reconcile_runs: Family<RunLabels, Counter>,
    pub reconcile_last_success_timestamp_seconds: FloatGauge,
    pub reconcile_users: Family<OutcomeLabels, Gauge>,
    pub config_reloads: Family<RunLabels, Counter>,
    pub jwks_refreshes: Family<RunLabels, Counter>,
    pub dependency_up: Family<DependencyLabels, Gauge>,
    pub projector_records: Counter,
    pub projector_rows_moved: Counter,
    pub projector_records_skipped: Family<ReasonLabels, Counter>,
    pub projector_failures: Counter,
    pub projector_conflicts: Counter,
    pub projector_lag_seconds: FloatGauge,
    pub projector_leader: Gauge,
    pub projector_retrying: Gauge,
    pub stream_get_records_calls: Counter,
    pub fanout_role: Family<RoleLabels, Gauge>,
    pub fanout_published: Counter,
    pub fanout_received: Counter,
    pub fanout_lag_seconds: FloatGauge,
    pub fanout_gaps: Family<ReasonLabels, Counter>,
    /// 1 on an instance that runs the projector (`[projector] enabled`), leading or standing
    /// by: what the "projector leaders != 1" alert is gated on.
    pub projector_enabled: Gauge,
    pub build_info: Family<VersionLabels, Gauge>,
    /// Requests refused by the token check, by `AuthError::reason()`.
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// The unprefixed `process_*` series, read at each scrape.
    process: Registry,
    hot: HotSeries,
}

/// The series every API request touches, resolved once. A family lookup hashes the labels and
/// takes the family's lock on each call; these handles share the family's atomics, so the
/// exported numbers are the same.
struct HotSeries {
    /// By [`CacheName`] then [`CacheResult`].
    cache_requests: [[Counter; 3]; 3],
    /// By served route (`ApiRoute::SERVED`): the statuses of a served read (200, 304).
    http_ok: [Counter; 2],
    http_not_modified: [Counter; 2],
    http_duration: [Histogram; 2],
}

/// The `route` label of the API families: the matched template, never the raw path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ApiRoute {
    MessageGroups,
    Messages,
    Other,
}

impl ApiRoute {
    /// The routes with handlers, in the order of [`HotSeries`]' arrays.
    const SERVED: [ApiRoute; 2] = [ApiRoute::MessageGroups, ApiRoute::Messages];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ApiRoute::MessageGroups => "/api/message_groups",
            ApiRoute::Messages => "/api/messages/{message_group_uuid}",
            ApiRoute::Other => "other",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cruddur_syncd");
        // The families the request path touches come first, so their hot handles can be
        // resolved before the struct exists.
        let cache_requests = Family::default();
        let http_requests = Family::default();
        let http_request_duration_seconds = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let hot = HotSeries::resolve(&cache_requests, &http_requests, &http_request_duration_seconds);
        let m = Metrics {
            stream_records: Family::default(),
            stream_iterator_age_seconds: FloatGauge::default(),
            stream_shards: Family::default(),
            stream_errors: Family::default(),
            stream_resyncs: Counter::default(),
            stream_skipped_records: Family::default(),
            cache_requests,
            cache_entries: Family::default(),
            cache_weight_bytes: Family::default(),
            store_items_read: Family::default(),
            http_requests,
            http_request_duration_seconds,
            reconcile_runs: Family::default(),
            reconcile_last_success_timestamp_seconds: FloatGauge::default(),
            reconcile_users: Family::default(),
            config_reloads: Family::default(),
            jwks_refreshes: Family::default(),
            dependency_up: Family::default(),
            projector_records: Counter::default(),
            projector_rows_moved: Counter::default(),
            projector_records_skipped: Family::default(),
            projector_failures: Counter::default(),
            projector_conflicts: Counter::default(),
            projector_lag_seconds: FloatGauge::default(),
            projector_leader: Gauge::default(),
            projector_retrying: Gauge::default(),
            stream_get_records_calls: Counter::default(),
            fanout_role: Family::default(),
            fanout_published: Counter::default(),
            fanout_received: Counter::default(),
            fanout_lag_seconds: FloatGauge::default(),
            fanout_gaps: Family::default(),
            projector_enabled: Gauge::default(),
            build_info: Family::default(),
            auth_failures: Family::default(),
            process: Registry::default(),
            registry: Registry::default(),
            hot,
        };
        registry.register("stream_records", "Stream records read, by event name", m.stream_records.clone());
        registry.register(
            "stream_iterator_age_seconds",
            "Now minus ApproximateCreationDateTime of the newest record read; 0 when caught up",
            m.stream_iterator_age_seconds.clone(),
        );
        registry.register("stream_shards", "Shards known to the tailer, by state", m.stream_shards.clone());
        registry.register("stream_errors", "Stream read errors, by kind", m.stream_errors.clone());
        registry.register(
            "stream_resyncs",
            "Cache flushes after a possible gap in the stream",
            m.stream_resyncs.clone(),
        );
        registry.register(
            "stream_skipped_records",
            "Stream records that did not fit the model and were skipped, by reason",
            m.stream_skipped_records.clone(),
        );
        registry.register("cache_requests", "Cache lookups, by cache and result", m.cache_requests.clone());
        registry.register("cache_entries", "Entries in each cache", m.cache_entries.clone());
        registry.register("cache_weight_bytes", "Weighed size of each cache", m.cache_weight_bytes.clone());
        registry.register(
            "store_items_read",
            "Items DynamoDB returned to the cache's loads and pages, by what was read",
            m.store_items_read.clone(),
        );
        registry.register("http_requests", "API requests, by route and status", m.http_requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "API request latency, by route",
            m.http_request_duration_seconds.clone(),
        );
        registry.register("reconcile_runs", "Reconciliation runs, by result", m.reconcile_runs.clone());
        registry.register(
            "reconcile_last_success_timestamp_seconds",
            "Unix time of the last successful reconciliation",
            m.reconcile_last_success_timestamp_seconds.clone(),
        );
        registry.register("reconcile_users", "Users by outcome in the last reconciliation", m.reconcile_users.clone());
        registry.register("config_reloads", "Config reloads, by result", m.config_reloads.clone());
        registry.register(
            "dependency_up",
            "1 unless the last call to the dependency failed (a degraded dependency never fails /readyz)",
            m.dependency_up.clone(),
        );
        registry.register(
            "jwks_refreshes",
            "JWKS fetches (scheduled, on an unknown kid, at start and reload), by result",
            m.jwks_refreshes.clone(),
        );
        registry.register(
            "projector_records",
            "Stream records the projector handled (every event, its own writes included)",
            m.projector_records.clone(),
        );
        registry.register(
            "projector_rows_moved",
            "Conversation rows the projector moved to a newer message",
            m.projector_rows_moved.clone(),
        );
        registry.register(
            "projector_records_skipped",
            "Stream records that moved no row, by reason",
            m.projector_records_skipped.clone(),
        );
        registry.register(
            "projector_failures",
            "Failed attempts to project a record (each retry counts)",
            m.projector_failures.clone(),
        );
        registry.register(
            "projector_conflicts",
            "Row moves cancelled because another writer changed the rows first (re-read and retried)",
            m.projector_conflicts.clone(),
        );
        registry.register(
            "projector_lag_seconds",
            "Now minus ApproximateCreationDateTime of the last record the projector applied",
            m.projector_lag_seconds.clone(),
        );
        registry.register(
            "projector_leader",
            "1 while this instance holds the projector lock and runs the projector, else 0",
            m.projector_leader.clone(),
        );
        registry.register(
            "projector_retrying",
            "1 while the projector retries a record that failed for a transient reason (DynamoDB down, throttled, the index behind), else 0",
            m.projector_retrying.clone(),
        );
        registry.register(
            "stream_get_records_calls",
            "GetRecords calls this instance made (with fan-out on, only the relay makes any)",
            m.stream_get_records_calls.clone(),
        );
        registry.register(
            "fanout_role",
            "1 for this instance's fan-out role: relay (holds the relay lock, reads the stream) or follower",
            m.fanout_role.clone(),
        );
        registry.register(
            "fanout_published",
            "Changes (and gap notices) this instance published to JetStream as the relay",
            m.fanout_published.clone(),
        );
        registry.register(
            "fanout_received",
            "Messages this instance's follower received from JetStream",
            m.fanout_received.clone(),
        );
        registry.register(
            "fanout_lag_seconds",
            "Now minus the creation time of the last stream record the follower applied",
            m.fanout_lag_seconds.clone(),
        );
        registry.register("fanout_gaps", "Follower cache flushes, by reason", m.fanout_gaps.clone());
        registry.register(
            "projector_enabled",
            "1 when this instance runs the projector ([projector] enabled), leading or standing by, else 0",
            m.projector_enabled.clone(),
        );
        registry.register("build_info", "Build information", m.build_info.clone());
        m.build_info
            .get_or_create(&VersionLabels { version: crate::version::VERSION, revision: crate::version::REVISION })
            .set(1);
        registry.register(
            "auth_failures",
            "API requests refused by the token check, by reason",
            m.auth_failures.clone(),
        );
        for reason in crate::http::auth::AuthError::REASONS {
            let _ = m.auth_failures.get_or_create(&ReasonLabels { reason });
        }
        let mut process = Registry::default();
        process.register_collector(Box::new(crate::process_metrics::ProcessCollector));
        // Every known label value starts at 0, so dashboards and rate() see a series from the
        // first scrape instead of only after the first event.
        for event in [StreamEvent::INSERT, StreamEvent::MODIFY, StreamEvent::REMOVE] {
            let _ = m.stream_records.get_or_create(&EventLabels { event });
        }
        for kind in [
            StreamErrorKind::expired_iterator,
            StreamErrorKind::trimmed,
            StreamErrorKind::throttled,
            StreamErrorKind::not_found,
            StreamErrorKind::other,
        ] {
            let _ = m.stream_errors.get_or_create(&ErrorLabels { kind });
        }
        for state in [ShardState::reading, ShardState::finished] {
            let _ = m.stream_shards.get_or_create(&ShardLabels { state });
        }
        for cache in [CacheName::groups, CacheName::messages, CacheName::users] {
            let _ = m.cache_entries.get_or_create(&CacheLabels { cache });
            let _ = m.cache_weight_bytes.get_or_create(&CacheLabels { cache });
            for result in [CacheResult::hit, CacheResult::miss, CacheResult::stale] {
                let _ = m.cache_requests.get_or_create(&CacheRequestLabels { cache, result });
            }
        }
        for read in [StoreRead::groups, StoreRead::messages] {
            let _ = m.store_items_read.get_or_create(&StoreReadLabels { read });
        }
        for outcome in ["updated", "unchanged", "unmatched", "conflict", "skipped"] {
            let _ = m.reconcile_users.get_or_create(&OutcomeLabels { outcome });
        }
        for reason in PROJECTOR_SKIP_REASONS {
            let _ = m.projector_records_skipped.get_or_create(&ReasonLabels { reason });
        }
        for result in [RunResult::success, RunResult::failure, RunResult::skipped] {
            let _ = m.reconcile_runs.get_or_create(&RunLabels { result });
            let _ = m.config_reloads.get_or_create(&RunLabels { result });
        }
        for result in [RunResult::success, RunResult::failure] {
            let _ = m.jwks_refreshes.get_or_create(&RunLabels { result });
        }
        for reason in FANOUT_GAP_REASONS {
            let _ = m.fanout_gaps.get_or_create(&ReasonLabels { reason });
        }
        for dependency in ["postgres", "dynamodb", "streams", "jwks"] {
            m.dependency_up.get_or_create(&DependencyLabels { dependency }).set(1);
        }
        Metrics { registry, process, ..m }
    }

    /// Counts one request refused by the token check.
    pub(crate) fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts one cache lookup.
    pub(crate) fn cache_request(&self, cache: CacheName, result: CacheResult) {
        let c = match cache {
            CacheName::groups => 0,
            CacheName::messages => 1,
            CacheName::users => 2,
        };
        let r = match result {
            CacheResult::hit => 0,
            CacheResult::miss => 1,
            CacheResult::stale => 2,
        };
        self.hot.cache_requests[c][r].inc();
    }

    /// Counts the items one store read returned.
    pub fn store_items_read(&self, read: StoreRead, items: usize) {
        self.store_items_read.get_or_create(&StoreReadLabels { read }).inc_by(items as u64);
    }

    /// Counts and times one API request.
    pub(crate) fn http_request(&self, route: ApiRoute, status: u16, seconds: f64) {
        let served = match route {
            ApiRoute::MessageGroups => Some(0),
            ApiRoute::Messages => Some(1),
            ApiRoute::Other => None,
        };
        match (served, status) {
            (Some(i), 200) => self.hot.http_ok[i].inc(),
            (Some(i), 304) => self.hot.http_not_modified[i].inc(),
            _ => self.http_requests.get_or_create(&HttpLabels { route: route.as_str(), status }).inc(),
        };
        match served {
            Some(i) => self.hot.http_duration[i].observe(seconds),
            None => self
                .http_request_duration_seconds
                .get_or_create(&RouteLabels { route: route.as_str() })
                .observe(seconds),
        }
    }

    /// Every family in OpenMetrics text (what prometheus-client writes).
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.process);
        let _ = encode_eof(&mut out);
        out
    }

    /// Every family in the classic Prometheus text format (0.0.4), for scrapers and tools such
    /// as `promtool check metrics` that do not speak OpenMetrics.
    pub(crate) fn encode_prometheus(&self) -> String {
        use prometheus_client::encoding::prometheus_text::encode;
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        let _ = encode(&mut out, &self.process);
        out
    }
}

impl HotSeries {
    fn resolve(
        cache_requests: &Family<CacheRequestLabels, Counter>,
        http_requests: &Family<HttpLabels, Counter>,
        http_durations: &Family<RouteLabels, Histogram, fn() -> Histogram>,
    ) -> Self {
        let cache = |cache, result| cache_requests.get_or_create(&CacheRequestLabels { cache, result }).clone();
        let http = |route: ApiRoute, status| {
            http_requests.get_or_create(&HttpLabels { route: route.as_str(), status }).clone()
        };
        HotSeries {
            cache_requests: [CacheName::groups, CacheName::messages, CacheName::users]
                .map(|c| [cache(c, CacheResult::hit), cache(c, CacheResult::miss), cache(c, CacheResult::stale)]),
            http_ok: ApiRoute::SERVED.map(|r| http(r, 200)),
            http_not_modified: ApiRoute::SERVED.map(|r| http(r, 304)),
            http_duration: ApiRoute::SERVED
                .map(|r| http_durations.get_or_create(&RouteLabels { route: r.as_str() }).clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let m = Metrics::new();
        m.stream_records.get_or_create(&EventLabels { event: StreamEvent::INSERT }).inc();
        m.stream_errors.get_or_create(&ErrorLabels { kind: StreamErrorKind::expired_iterator }).inc();
        m.stream_resyncs.inc();
        let text = m.encode();
        for needle in [
            "cruddur_syncd_stream_records_total{event=\"INSERT\"} 1",
            "cruddur_syncd_stream_errors_total{kind=\"expired_iterator\"} 1",
            "cruddur_syncd_stream_resyncs_total 1",
            "cruddur_syncd_build_info{version=\"",
            "cruddur_syncd_auth_failures_total{reason=\"expired\"} 0",
            "# TYPE cruddur_syncd_stream_iterator_age_seconds gauge",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let classic = m.encode_prometheus();
        assert!(classic.contains("# TYPE cruddur_syncd_stream_records_total counter"), "{classic}");
        assert!(!classic.contains("# EOF"));
    }

    #[test]
    fn build_info_carries_version_and_revision_and_process_series_are_unprefixed() {
        let text = Metrics::new().encode();
        let expected = format!(
            "cruddur_syncd_build_info{{version=\"{}\",revision=\"{}\"}} 1",
            crate::version::VERSION,
            crate::version::REVISION
        );
        assert!(text.contains(&expected), "{expected} missing from\n{text}");
        assert!(!crate::version::REVISION.is_empty());
        if cfg!(target_os = "linux") {
            for family in ["process_cpu_seconds_total ", "process_resident_memory_bytes ", "process_open_fds "] {
                assert!(text.lines().any(|l| l.starts_with(family)), "{family} missing from\n{text}");
            }
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
