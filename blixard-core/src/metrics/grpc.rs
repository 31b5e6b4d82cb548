//! API observability as one tower layer around the gRPC server: every
//! public call is counted by method and status code, timed, and traced (a
//! span per call, named by its method, continuing a caller's W3C
//! `traceparent`), in one place, so no handler has to remember to and a new
//! RPC gets all three. The span is DEBUG: when no trace exporter or debug
//! log filter wants it, it is disabled at its call site and nothing else is
//! done. The wrapper future is not boxed: no allocation per call.
//!
//! The code is read from the response headers: tonic answers a failed call
//! with a trailers-only response (`grpc-status` in the headers), and a
//! successful unary call with headers and a body whose trailers say OK. So a
//! response without `grpc-status` in its headers is counted as OK, and its
//! time is the time to the response headers (for a server stream, the time
//! to open it). Internal Raft RPCs are not counted here (the Raft metrics
//! cover them). Under madsim, tonic's simulated server ignores layers.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

use super::NodeMetrics;

/// The public API's methods, sorted (binary-searched by name); the index is
/// the method's slot in [`NodeMetrics`]. Unknown public methods count as
/// `other`. A unit test keeps this list in step with the proto.
pub const METHODS: [&str; 31] = [
    "CreateToken",
    "CreateVm",
    "CreateVms",
    "DeleteQuota",
    "DeleteVm",
    "DrainNode",
    "FollowVmLogs",
    "GetQuota",
    "GetVm",
    "Join",
    "Leave",
    "ListQuotas",
    "ListTokens",
    "ListVms",
    "LocalVm",
    "MigrateVm",
    "Remove",
    "RestartVm",
    "RevokeToken",
    "SetEligible",
    "SetNode",
    "SetNodeTimeout",
    "SetQuota",
    "SetScheduler",
    "StartVm",
    "Status",
    "StopVm",
    "VmConsole",
    "VmLogs",
    "Watch",
    "other",
];

/// The services whose calls are counted.
const PUBLIC: [&str; 2] = ["/blixard.v1.ClusterService/", "/blixard.v1.VmService/"];

/// gRPC status codes 0..=16, by number.
pub const CODES: usize = 17;
pub const CODE_NAMES: [&str; CODES] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The metrics slot of a request path, `None` for calls that are not
/// counted (internal services, health, reflection).
pub fn method_slot(path: &str) -> Option<usize> {
    let name = PUBLIC.iter().find_map(|p| path.strip_prefix(p))?;
    let other = METHODS.len() - 1;
    Some(METHODS[..other].binary_search(&name).unwrap_or(other))
}

/// Parses a `grpc-status` header value.
fn code_of(v: &[u8]) -> usize {
    let mut n = 0usize;
    for &b in v {
        if !b.is_ascii_digit() {
            return 2; // UNKNOWN
        }
        n = n * 10 + usize::from(b - b'0');
    }
    if v.is_empty() || n >= CODES {
        2
    } else {
        n
    }
}

/// Counts, times and traces public API calls.
#[derive(Clone)]
pub struct ApiMetricsLayer {
    metrics: Arc<NodeMetrics>,
}

impl ApiMetricsLayer {
    pub fn new(metrics: Arc<NodeMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for ApiMetricsLayer {
    type Service = ApiMetrics<S>;
    fn layer(&self, inner: S) -> ApiMetrics<S> {
        ApiMetrics { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct ApiMetrics<S> {
    inner: S,
    metrics: Arc<NodeMetrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for ApiMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Timed<S::Future> {
        let path = req.uri().path();
        let Some(slot) = method_slot(path) else {
            return Timed { inner: self.inner.call(req), timing: None, span: tracing::Span::none() };
        };
        let span = tracing::debug_span!(
            "rpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if !span.is_disabled() {
            if let Some(tp) = req.headers().get(crate::trace::TRACEPARENT).and_then(|v| v.to_str().ok()) {
                crate::trace::set_parent(&span, tp);
            }
        }
        let inner = {
            let _in = span.enter();
            self.inner.call(req)
        };
        Timed { inner, timing: Some((slot, Instant::now(), self.metrics.clone())), span }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future, timed and inside its span.
    pub struct Timed<F> {
        #[pin]
        inner: F,
        timing: Option<(usize, Instant, Arc<NodeMetrics>)>,
        span: tracing::Span,
    }
}

impl<F, RB, E> Future for Timed<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = {
            let _in = this.span.enter();
            std::task::ready!(this.inner.poll(cx))
        };
        if let Some((slot, start, metrics)) = this.timing.take() {
            let code = match &out {
                Ok(resp) => resp.headers().get("grpc-status").map_or(0, |v| code_of(v.as_bytes())),
                // The transport failed the call: gRPC's UNKNOWN.
                Err(_) => 2,
            };
            metrics.api_request(slot, code, start.elapsed().as_secs_f64());
            if !this.span.is_disabled() {
                this.span.record("rpc.grpc.status_code", code as i64);
                this.span.record("otel.status_code", if code == 0 { "OK" } else { "ERROR" });
            }
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_sorted_and_cover_the_public_services() {
        let named = &METHODS[..METHODS.len() - 1];
        assert!(named.windows(2).all(|w| w[0] < w[1]), "METHODS must stay sorted");
        let proto = include_str!("../../../proto/proto/blixard.proto");
        assert!(proto.contains("package blixard.v1;"), "the package changed: update PUBLIC");
        let mut service = "";
        for line in proto.lines().map(str::trim) {
            if let Some(s) = line.strip_prefix("service ") {
                service = s.split_whitespace().next().unwrap_or("");
            } else if let Some(rpc) = line.strip_prefix("rpc ") {
                let name = rpc.split('(').next().unwrap().trim();
                if service == "ClusterService" || service == "VmService" {
                    let path = format!("/blixard.v1.{service}/{name}");
                    let slot = method_slot(&path).unwrap();
                    assert_eq!(METHODS[slot], name, "{path} has no metrics slot; add it to METHODS");
                }
            }
        }
        assert_eq!(method_slot("/blixard.v1.RaftService/AppendEntries"), None);
        assert_eq!(method_slot("/grpc.health.v1.Health/Check"), None);
        assert_eq!(METHODS[method_slot("/blixard.v1.VmService/Nope").unwrap()], "other");
    }

    #[test]
    fn status_codes_parse() {
        assert_eq!(code_of(b"0"), 0);
        assert_eq!(code_of(b"14"), 14);
        assert_eq!(code_of(b"16"), 16);
        assert_eq!(code_of(b"17"), 2);
        assert_eq!(code_of(b"x"), 2);
        assert_eq!(code_of(b""), 2);
    }
}
