//! [`Metrics`]: the registry of every proxy metric, and the sources read at scrape time.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::access_log::{AccessLogStats, UpstreamInfo};
use crate::router::Route;
use crate::server::ServerStats;

/// Latency buckets in seconds: fine below 100 ms where proxied APIs live, coarse up to
/// a minute, so `histogram_quantile(0.99, ...)` has resolution where p50 and p99 fall.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The proxy's metrics: a cheap, shareable handle (clones share one registry).
///
/// The request metrics are fed by [`MetricsLayer`](super::MetricsLayer); the rest by
/// the parts that know them: the server's connection counters
/// ([`register_server`](Self::register_server)), the balancer's per-server state
/// ([`register_upstream_stats`](Self::register_upstream_stats)), counters handed out
/// once to the balancer, limiter and TLS acceptor ([`retries`](Self::retries),
/// [`rate_limit_rejections`](Self::rate_limit_rejections),
/// [`tls_handshakes`](Self::tls_handshakes)), and the binary's reload logic
/// ([`record_reload`](Self::record_reload)).
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    in_flight: Gauge,
    latency: HistogramFamily<RouteLabels>,
    upstream_latency: HistogramFamily<UpstreamLabels>,
    retries: Family<GroupLabels, Counter>,
    rejections: Family<ZoneLabels, Counter>,
    tls_handshakes: Family<OutcomeLabels, Counter>,
    cert_expiry: Family<CertLabels, Gauge>,
    reloads: Family<OutcomeLabels, Counter>,
    last_reload_success: Gauge,
    last_reload_time: Gauge,
    sources: Arc<Sources>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every proxy metric registered (and no samples yet).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "proxy_http_requests",
            "Requests answered, by server, location, upstream server and status class",
            requests.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "proxy_http_requests_in_flight",
            "Requests waiting for their response header",
            in_flight.clone(),
        );
        let latency: HistogramFamily<RouteLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "proxy_http_request_duration_seconds",
            "Time from receiving a request to sending its response header",
            latency.clone(),
        );
        let upstream_latency: HistogramFamily<UpstreamLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "proxy_upstream_response_duration_seconds",
            "Time an upstream server took to send its response header",
            upstream_latency.clone(),
        );
        let retries = Family::<GroupLabels, Counter>::default();
        registry.register(
            "proxy_upstream_retries",
            "Requests tried again on another upstream server",
            retries.clone(),
        );
        let rejections = Family::<ZoneLabels, Counter>::default();
        registry.register(
            "proxy_rate_limit_rejections",
            "Requests refused by a rate or connection limit",
            rejections.clone(),
        );
        let tls_handshakes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "proxy_tls_handshakes",
            "TLS handshakes, by outcome",
            tls_handshakes.clone(),
        );
        let cert_expiry = Family::<CertLabels, Gauge>::default();
        registry.register(
            "proxy_tls_certificate_expiry_timestamp_seconds",
            "When each served certificate expires (Unix time)",
            cert_expiry.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "proxy_config_reloads",
            "Configuration reloads, by outcome",
            reloads.clone(),
        );
        let last_reload_success = Gauge::default();
        registry.register(
            "proxy_config_last_reload_successful",
            "1 if the last configuration reload succeeded, 0 if it failed",
            last_reload_success.clone(),
        );
        let last_reload_time = Gauge::default();
        registry.register(
            "proxy_config_last_reload_timestamp_seconds",
            "When the last configuration reload was attempted (Unix time)",
            last_reload_time.clone(),
        );
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(sources.clone()));
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                in_flight,
                latency,
                upstream_latency,
                retries,
                rejections,
                tls_handshakes,
                cert_expiry,
                reloads,
                last_reload_success,
                last_reload_time,
                sources,
            }),
        }
    }

    /// The metrics in the OpenMetrics text format (what Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.inner.registry).is_err() {
            // Writing to a String cannot fail; a collector's error would leave a
            // truncated exposition, which is worse than none.
            out.clear();
        }
        out
    }

    /// Report the connection counters of a listener under `listener` (nginx
    /// `stub_status`: active, accepts, handled). Registering the same name again
    /// replaces the earlier one (after a reload).
    pub fn register_server(&self, listener: impl Into<Arc<str>>, stats: Arc<ServerStats>) {
        let listener = listener.into();
        let mut servers = write(&self.inner.sources.servers);
        servers.retain(|(name, _)| *name != listener);
        servers.push((listener, stats));
    }

    /// Report the balancer's per-server health and in-flight requests: `source` is
    /// called at each scrape. Replaces any source registered before (a reload registers
    /// the new upstream groups).
    pub fn register_upstream_stats(
        &self,
        source: Box<dyn Fn() -> Vec<UpstreamServerStat> + Send + Sync>,
    ) {
        *write(&self.inner.sources.upstreams) = Some(source);
    }

    /// Report an access log's written and dropped lines under `name`.
    pub fn register_access_log(&self, name: impl Into<Arc<str>>, stats: Arc<AccessLogStats>) {
        let name = name.into();
        let mut logs = write(&self.inner.sources.access_logs);
        logs.retain(|(n, _)| *n != name);
        logs.push((name, stats));
    }

    /// Report a Redis-shared rate-limit zone's decisions, Redis errors and fail-mode
    /// outcomes under `name`. Registering the same name again replaces the earlier zone
    /// (after a reload).
    #[cfg(feature = "redis")]
    pub fn register_redis_zone(
        &self,
        name: impl Into<Arc<str>>,
        zone: crate::limit::redis::RedisZone,
    ) {
        let name = name.into();
        let mut zones = write(&self.inner.sources.redis_zones);
        zones.retain(|(n, _)| *n != name);
        zones.push((name, zone));
    }

    /// The retry counter of an upstream group, for the balancer to keep and increment.
    pub fn retries(&self, upstream: &str) -> Counter {
        self.inner.retries.get_or_create_owned(&GroupLabels {
            upstream: upstream.into(),
        })
    }

    /// The rejection counter of a limit zone, for the limiter to keep and increment.
    pub fn rate_limit_rejections(&self, zone: &str) -> Counter {
        self.inner
            .rejections
            .get_or_create_owned(&ZoneLabels { zone: zone.into() })
    }

    /// The counter of successful (`ok = true`) or failed TLS handshakes, for the TLS
    /// acceptor to keep and increment.
    pub fn tls_handshakes(&self, ok: bool) -> Counter {
        self.inner
            .tls_handshakes
            .get_or_create_owned(&OutcomeLabels {
                result: Outcome::from(ok),
            })
    }

    /// Set when the certificate served for `name` expires.
    pub fn set_certificate_expiry(&self, name: &str, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.inner
            .cert_expiry
            .get_or_create(&CertLabels { name: name.into() })
            .set(secs);
    }

    /// Forget every certificate's expiry (before setting the current ones after a
    /// certificate reload).
    pub fn clear_certificate_expiry(&self) {
        self.inner.cert_expiry.clear();
    }

    /// Count a configuration reload and remember whether it succeeded.
    pub fn record_reload(&self, ok: bool) {
        self.inner
            .reloads
            .get_or_create(&OutcomeLabels {
                result: Outcome::from(ok),
            })
            .inc();
        self.inner.last_reload_success.set(i64::from(ok));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.inner.last_reload_time.set(now);
    }

    pub(crate) fn request_started(&self) {
        self.inner.in_flight.inc();
    }

    /// Record one answered request. Label sets are built from `Arc` clones: no
    /// allocation once a label combination has been seen.
    pub(crate) fn request_finished(
        &self,
        route: Option<&Arc<Route>>,
        upstream: Option<&UpstreamInfo>,
        status: u16,
        elapsed: Duration,
    ) {
        self.inner.in_flight.dec();
        let server = route.map(|r| r.server.clone());
        let location = route.map(|r| r.location.clone());
        let upstream_addr = AddrLabel(upstream.map(|u| u.addr));
        self.inner
            .requests
            .get_or_create(&RequestLabels {
                server: server.clone(),
                location: location.clone(),
                upstream: upstream_addr,
                class: StatusClass::of(status),
            })
            .inc();
        self.inner
            .latency
            .get_or_create(&RouteLabels { server, location })
            .observe(elapsed.as_secs_f64());
        if let Some(up) = upstream {
            self.inner
                .upstream_latency
                .get_or_create(&UpstreamLabels {
                    upstream: upstream_addr,
                })
                .observe(up.duration.as_secs_f64());
        }
    }
}

/// One upstream server's state as the balancer sees it, reported at each scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamServerStat {
    /// The upstream group's name.
    pub upstream: Arc<str>,
    /// The server's address.
    pub server: SocketAddr,
    /// Whether the server is taking requests (not marked down by `max_fails` or a
    /// health check).
    pub healthy: bool,
    /// Requests in flight to it now.
    pub in_flight: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    server: Option<Arc<str>>,
    location: Option<Arc<str>>,
    upstream: AddrLabel,
    class: StatusClass,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    server: Option<Arc<str>>,
    location: Option<Arc<str>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: AddrLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    upstream: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZoneLabels {
    zone: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    name: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    result: Outcome,
}

/// An upstream server address, formatted only at scrape time; empty when no upstream
/// answered (the proxy answered itself).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct AddrLabel(Option<SocketAddr>);

impl EncodeLabelValue for AddrLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        if let Some(addr) = self.0 {
            write!(encoder, "{addr}")?;
        }
        Ok(())
    }
}

/// `1xx` ... `5xx`: the status class label (exact codes would multiply the series).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
    Other,
}

impl StatusClass {
    pub(crate) fn of(status: u16) -> Self {
        match status / 100 {
            1 => StatusClass::Informational,
            2 => StatusClass::Success,
            3 => StatusClass::Redirection,
            4 => StatusClass::ClientError,
            5 => StatusClass::ServerError,
            _ => StatusClass::Other,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirection => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
            StatusClass::Other => "other",
        }
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum Outcome {
    Ok,
    Error,
}

impl From<bool> for Outcome {
    fn from(ok: bool) -> Self {
        if ok {
            Outcome::Ok
        } else {
            Outcome::Error
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
        })
    }
}

/// Reads one connection count of a listener.
type ServerCount = fn(&ServerStats) -> u64;

type UpstreamSource = Box<dyn Fn() -> Vec<UpstreamServerStat> + Send + Sync>;

/// What is read at scrape time rather than counted on the request path.
#[derive(Default)]
struct Sources {
    servers: RwLock<Vec<(Arc<str>, Arc<ServerStats>)>>,
    upstreams: RwLock<Option<UpstreamSource>>,
    access_logs: RwLock<Vec<(Arc<str>, Arc<AccessLogStats>)>>,
    #[cfg(feature = "redis")]
    redis_zones: RwLock<Vec<(Arc<str>, crate::limit::redis::RedisZone)>>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

// A panic while holding one of these locks cannot leave the lists half-updated in a
// way that matters (each update is a single push or replace), so poisoning is ignored.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Collector for Sources {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        {
            let servers = read(&self.servers);
            let counters: [(&str, &str, ServerCount); 3] = [
                (
                    "proxy_connections_accepted",
                    "Client connections accepted (stub_status accepts)",
                    |s| as_u64(s.accepted()),
                ),
                (
                    "proxy_connections_handled",
                    "Client connections served, not refused at the connection cap (stub_status handled)",
                    |s| as_u64(s.accepted().saturating_sub(s.refused())),
                ),
                (
                    "proxy_connections_refused",
                    "Client connections refused because the connection cap was reached",
                    |s| as_u64(s.refused()),
                ),
            ];
            for (name, help, value) in counters {
                let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (listener, stats) in servers.iter() {
                    let labels = [("listener", listener.as_ref())];
                    ConstCounter::new(value(stats)).encode(m.encode_family(&labels)?)?;
                }
            }
            let mut m = enc.encode_descriptor(
                "proxy_connections_active",
                "Client connections open now (stub_status active)",
                None,
                MetricType::Gauge,
            )?;
            for (listener, stats) in servers.iter() {
                let labels = [("listener", listener.as_ref())];
                ConstGauge::new(as_u64(stats.active())).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let stats = read(&self.upstreams)
                .as_ref()
                .map(|f| f())
                .unwrap_or_default();
            let labelled: Vec<_> = stats
                .iter()
                .map(|s| {
                    [
                        ("upstream", s.upstream.to_string()),
                        ("server", s.server.to_string()),
                    ]
                })
                .collect();
            let mut m = enc.encode_descriptor(
                "proxy_upstream_server_up",
                "1 if the upstream server takes requests, 0 if it is marked down",
                None,
                MetricType::Gauge,
            )?;
            for (s, labels) in stats.iter().zip(&labelled) {
                ConstGauge::new(i64::from(s.healthy)).encode(m.encode_family(labels)?)?;
            }
            let mut m = enc.encode_descriptor(
                "proxy_upstream_server_in_flight",
                "Requests in flight to the upstream server",
                None,
                MetricType::Gauge,
            )?;
            for (s, labels) in stats.iter().zip(&labelled) {
                ConstGauge::new(s.in_flight).encode(m.encode_family(labels)?)?;
            }
        }
        {
            let logs = read(&self.access_logs);
            let mut m = enc.encode_descriptor(
                "proxy_access_log_lines_dropped",
                "Access log lines dropped because the writer fell behind or failed",
                None,
                MetricType::Counter,
            )?;
            for (name, stats) in logs.iter() {
                let labels = [("log", name.as_ref())];
                ConstCounter::new(stats.dropped()).encode(m.encode_family(&labels)?)?;
            }
            let mut m = enc.encode_descriptor(
                "proxy_access_log_lines_written",
                "Access log lines written",
                None,
                MetricType::Counter,
            )?;
            for (name, stats) in logs.iter() {
                let labels = [("log", name.as_ref())];
                ConstCounter::new(stats.written()).encode(m.encode_family(&labels)?)?;
            }
        }
        #[cfg(feature = "redis")]
        self.encode_redis_zones(&mut enc)?;
        Ok(())
    }
}

#[cfg(feature = "redis")]
impl Sources {
    fn encode_redis_zones(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let zones = read(&self.redis_zones);
        let stats: Vec<_> = zones.iter().map(|(n, z)| (n, z.stats())).collect();
        let mut m = enc.encode_descriptor(
            "proxy_rate_limit_redis_decisions",
            "Requests of a Redis-shared zone, by what decided them: redis (a round trip), \
             fast_path (admitted locally), fail_open, fail_closed, fail_local (Redis down)",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &stats {
            for (by, value) in [
                ("redis", s.remote),
                ("fast_path", s.fast_path),
                ("fail_open", s.failed_open),
                ("fail_closed", s.failed_closed),
                ("fail_local", s.failed_local),
            ] {
                let labels = [("zone", name.as_ref()), ("decided_by", by)];
                ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
            }
        }
        for (metric, help, value) in [
            (
                "proxy_rate_limit_redis_errors",
                "Redis errors and timeouts of a Redis-shared zone",
                (|s| s.redis_errors) as fn(&crate::limit::redis::RedisZoneStats) -> u64,
            ),
            (
                "proxy_rate_limit_redis_overshoot",
                "Fast-path admissions that Redis then counted over the limit",
                |s| s.overshoot,
            ),
        ] {
            let mut m = enc.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (name, s) in &stats {
                let labels = [("zone", name.as_ref())];
                ConstCounter::new(value(s)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn route() -> Arc<Route> {
        Arc::new(Route {
            server: "api".into(),
            location: "/v1/".into(),
        })
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn redis_zones_are_reported_by_name() {
        let m = Metrics::new();
        // Nothing listens there; a zone connects on first use only.
        let zone = crate::limit::redis::RedisZone::builder(
            "redis://127.0.0.1:1/",
            "10r/s".parse().unwrap(),
        )
        .unwrap()
        .name("api")
        .build();
        m.register_redis_zone("api", zone.clone());
        m.register_redis_zone("api", zone);
        let text = m.encode();
        assert_eq!(
            text.matches(
                "proxy_rate_limit_redis_decisions_total{zone=\"api\",decided_by=\"redis\"} 0"
            )
            .count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("proxy_rate_limit_redis_errors_total{zone=\"api\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::of(101).as_str(), "1xx");
        assert_eq!(StatusClass::of(204).as_str(), "2xx");
        assert_eq!(StatusClass::of(308).as_str(), "3xx");
        assert_eq!(StatusClass::of(499).as_str(), "4xx");
        assert_eq!(StatusClass::of(504).as_str(), "5xx");
        assert_eq!(StatusClass::of(999).as_str(), "other");
    }

    #[test]
    fn requests_are_counted_by_labels_and_timed() {
        let m = Metrics::new();
        let up = UpstreamInfo::new("127.0.0.1:8001".parse().unwrap(), Duration::from_millis(3));
        for _ in 0..3 {
            m.request_started();
            m.request_finished(Some(&route()), Some(&up), 200, Duration::from_millis(4));
        }
        m.request_started();
        m.request_finished(Some(&route()), None, 502, Duration::from_millis(1));
        let text = m.encode();
        assert!(text.contains(
            "proxy_http_requests_total{server=\"api\",location=\"/v1/\",upstream=\"127.0.0.1:8001\",class=\"2xx\"} 3\n"
        ), "{text}");
        assert!(text.contains(
            "proxy_http_requests_total{server=\"api\",location=\"/v1/\",upstream=\"\",class=\"5xx\"} 1\n"
        ), "{text}");
        assert!(
            text.contains(
                "proxy_http_request_duration_seconds_count{server=\"api\",location=\"/v1/\"} 4\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "proxy_http_request_duration_seconds_bucket{le=\"0.005\",server=\"api\",location=\"/v1/\"} 4\n"
        ), "{text}");
        assert!(
            text.contains(
                "proxy_upstream_response_duration_seconds_count{upstream=\"127.0.0.1:8001\"} 3\n"
            ),
            "{text}"
        );
        assert!(text.contains("proxy_http_requests_in_flight 0\n"), "{text}");
    }

    #[test]
    fn fed_values_appear() {
        let m = Metrics::new();
        m.retries("app").inc();
        m.retries("app").inc();
        m.rate_limit_rejections("login").inc();
        m.tls_handshakes(true).inc();
        m.tls_handshakes(false).inc_by(2);
        m.set_certificate_expiry(
            "example.com",
            UNIX_EPOCH + Duration::from_secs(1_900_000_000),
        );
        m.record_reload(true);
        m.record_reload(false);
        m.register_upstream_stats(Box::new(|| {
            vec![UpstreamServerStat {
                upstream: "app".into(),
                server: "127.0.0.1:8002".parse().unwrap(),
                healthy: false,
                in_flight: 7,
            }]
        }));
        let stats = Arc::new(ServerStats::default());
        m.register_server("main", stats.clone());
        m.register_server("main", stats);
        let text = m.encode();
        for want in [
            "proxy_upstream_retries_total{upstream=\"app\"} 2\n",
            "proxy_rate_limit_rejections_total{zone=\"login\"} 1\n",
            "proxy_tls_handshakes_total{result=\"ok\"} 1\n",
            "proxy_tls_handshakes_total{result=\"error\"} 2\n",
            "proxy_tls_certificate_expiry_timestamp_seconds{name=\"example.com\"} 1900000000\n",
            "proxy_config_reloads_total{result=\"ok\"} 1\n",
            "proxy_config_reloads_total{result=\"error\"} 1\n",
            "proxy_config_last_reload_successful 0\n",
            "proxy_upstream_server_up{upstream=\"app\",server=\"127.0.0.1:8002\"} 0\n",
            "proxy_upstream_server_in_flight{upstream=\"app\",server=\"127.0.0.1:8002\"} 7\n",
            "proxy_connections_active{listener=\"main\"} 0\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(text.matches("proxy_connections_accepted_total{").count(), 1);
        m.clear_certificate_expiry();
        assert!(!m.encode().contains("name=\"example.com\""));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.rate_limit_rejections("a\"b\\c\nd").inc();
        assert!(m
            .encode()
            .contains("proxy_rate_limit_rejections_total{zone=\"a\\\"b\\\\c\\nd\"} 1\n"));
    }
}
