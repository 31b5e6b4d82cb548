//! One span per public API call, named by its gRPC method, with its status.
//!
//! A wrapper around a generated tonic service rather than code in each
//! handler, so a new RPC gets its span too. The span is DEBUG: disabled
//! (and skipped after one check) unless a trace exporter or a debug log
//! filter wants it. A caller's W3C `traceparent` header is continued.
//!
//! Not built under madsim: its server takes only madsim-generated
//! services, and the simulator exports no traces.
use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tracing::Instrument;

/// `S` with a span around each call.
#[derive(Clone)]
pub struct Traced<S>(pub S);

impl<S: NamedService> NamedService for Traced<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for Traced<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let span = tracing::debug_span!(
            "rpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if span.is_disabled() {
            return Box::pin(self.0.call(req));
        }
        if let Some(tp) = req.headers().get(crate::trace::TRACEPARENT).and_then(|v| v.to_str().ok()) {
            crate::trace::set_parent(&span, tp);
        }
        let fut = self.0.call(req).instrument(span.clone());
        Box::pin(async move {
            let resp = fut.await?;
            // An error is a trailers-only response: its status is in the
            // headers. Otherwise it comes in the trailers, and it is OK
            // unless a stream fails later.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .unwrap_or(0);
            span.record("rpc.grpc.status_code", code);
            span.record("otel.status_code", if code == 0 { "OK" } else { "ERROR" });
            Ok(resp)
        })
    }
}
