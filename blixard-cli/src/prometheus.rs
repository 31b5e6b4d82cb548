//! The node's Prometheus endpoint: an OpenTelemetry meter provider whose
//! only reader is the Prometheus exporter (a pull reader: nothing runs until
//! a scrape), and a small HTTP server that answers `GET /metrics` with the
//! text exposition format.
//!
//! On a node with TLS the endpoint speaks HTTPS only, with the node's
//! certificate (scrape with `scheme: https` and the cluster's CA); it asks
//! for no client certificate, since metrics are read-only counts that carry
//! no secrets (docs/OPERATIONS.md, "TLS").
use std::net::SocketAddr;
use std::sync::Arc;

use blixard_core::tls::NodeTls;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, TextEncoder};

use crate::Failure;

/// Where `node start` serves metrics: `none`, or HOST:PORT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    At(SocketAddr),
}

impl MetricsAddr {
    /// `--metrics-addr`, defaulting to the bind host with the bind port +
    /// 1000 (7420 → 8420).
    pub fn parse(flag: Option<&str>, bind: SocketAddr) -> Result<MetricsAddr, Failure> {
        match flag {
            Some("none") => Ok(MetricsAddr::Off),
            Some(s) => s.parse().map(MetricsAddr::At).map_err(|_| {
                Failure::new(format!(
                    "--metrics-addr {s:?}: expected HOST:PORT (an IP address and a port) or none"
                ))
            }),
            None => {
                let port = bind.port().checked_add(1000).filter(|_| bind.port() != 0).ok_or_else(|| {
                    Failure::new(format!(
                        "--bind {bind}: no default metrics port (bind port + 1000); give --metrics-addr HOST:PORT or none"
                    ))
                })?;
                Ok(MetricsAddr::At(SocketAddr::new(bind.ip(), port)))
            }
        }
    }
}

/// A running endpoint. Dropping it does not stop the server; the process
/// exit does.
pub struct Endpoint {
    pub meter: Meter,
    pub addr: SocketAddr,
    _provider: SdkMeterProvider,
}

/// How long a scraper may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The endpoint's TLS: the node's certificate and key, no client auth,
/// HTTP/1.1.
fn tls_acceptor(tls: &NodeTls) -> Result<tokio_rustls::TlsAcceptor, Failure> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let err = |e: &dyn std::fmt::Display| Failure::new(format!("metrics endpoint TLS: {e}"));
    let certs =
        CertificateDer::pem_slice_iter(&tls.cert).collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key).map_err(|e| err(&e))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| err(&e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| err(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Builds the meter provider for node `id` and starts serving `/metrics` on
/// `addr` (HTTPS with `tls`). Binding happens before this returns: a busy
/// port is an error.
pub async fn start(addr: SocketAddr, id: u64, tls: Option<&NodeTls>) -> Result<Endpoint, Failure> {
    let acceptor = tls.map(tls_acceptor).transpose()?;
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        // Every series carries `node`; scope labels would only add noise.
        .scope_info_enabled(false)
        .build()
        .map_err(|e| Failure::new(format!("metrics exporter: {e}")))?;
    let resource = Resource::builder()
        .with_service_name("blixard")
        .with_attribute(opentelemetry::KeyValue::new("blixard.node.id", id.to_string()))
        .build();
    let provider = SdkMeterProvider::builder().with_reader(exporter).with_resource(resource).build();
    let meter = provider.meter("blixard");
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::new(format!("cannot serve metrics on {addr}: {e} (use --metrics-addr)")))?;
    let addr = listener.local_addr().unwrap_or(addr);
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => serve(stream, registry).await,
                    Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => serve(stream, registry).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics endpoint: TLS handshake failed"),
                        Err(_) => tracing::debug!("metrics endpoint: TLS handshake timed out"),
                    },
                }
            });
        }
    });
    Ok(Endpoint { meter, addr, _provider: provider })
}

/// Answers HTTP/1.1 requests on one connection.
async fn serve<IO>(stream: IO, registry: Arc<prometheus::Registry>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let registry = registry.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&registry, &req)) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
        tracing::debug!(error = %e, "metrics endpoint: connection ended");
    }
}

fn answer<B>(registry: &prometheus::Registry, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &'static str, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
        r
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"use GET\n".to_vec());
    }
    match req.uri().path() {
        "/metrics" => {
            let encoder = TextEncoder::new();
            let mut body = Vec::with_capacity(16 * 1024);
            match encoder.encode(&registry.gather(), &mut body) {
                Ok(()) => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body),
                Err(e) => {
                    reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n").into_bytes())
                }
            }
        }
        "/" => reply(StatusCode::OK, "text/plain", b"blixard node: metrics at /metrics\n".to_vec()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found; metrics are at /metrics\n".to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_defaults_to_bind_port_plus_1000() {
        let bind: SocketAddr = "127.0.0.1:7420".parse().unwrap();
        let parse = |flag: Option<&str>| MetricsAddr::parse(flag, bind).ok();
        assert_eq!(parse(None), Some(MetricsAddr::At("127.0.0.1:8420".parse().unwrap())));
        assert_eq!(parse(Some("none")), Some(MetricsAddr::Off));
        assert_eq!(parse(Some("0.0.0.0:9100")), Some(MetricsAddr::At("0.0.0.0:9100".parse().unwrap())));
        assert!(MetricsAddr::parse(Some("localhost"), bind).is_err());
        assert!(MetricsAddr::parse(None, "127.0.0.1:65000".parse().unwrap()).is_err());
        assert!(MetricsAddr::parse(None, "127.0.0.1:0".parse().unwrap()).is_err());
    }
}
