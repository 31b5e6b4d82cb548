//! A node's logs (`--log-format text|json`) and trace export
//! (`--otlp-endpoint URL`).
//!
//! Logs go to stderr through tracing-subscriber's formatter, filtered by
//! `--log`. Traces are a second, separately filtered layer that exists only
//! when an endpoint is given: then the DEBUG-level spans of blixard-core
//! (one per API call, forward, proposal batch, propose handler and
//! reconciler action) go to an OTLP/gRPC collector through the SDK's batch
//! span processor, and a [`TraceHook`] lets core carry the W3C trace
//! context across forwards. Without an endpoint there is no exporter, no
//! layer and no hook, and those spans are disabled at their call sites.
use blixard_core::trace::TraceHook;
use clap::ValueEnum;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::Failure;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, fields, spans.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// What must be flushed when the node stops.
pub struct Telemetry {
    #[cfg(not(madsim))]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (waits for the collector, bounded
    /// by the exporter's timeout).
    pub async fn shutdown(self) {
        #[cfg(not(madsim))]
        if let Some(provider) = self.provider {
            // Blocks until the batch processor's thread has exported.
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = done {
                eprintln!("trace export did not shut down cleanly: {e}");
            }
        }
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the process's subscriber: logs in `format` filtered by
/// `filter`, and trace export to `otlp` if given (resource: service.name
/// `blixard`, `blixard.node.id`).
pub fn init(filter: &str, format: LogFormat, otlp: Option<&str>, node_id: u64) -> Result<Telemetry, Failure> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| Failure::new(format!("invalid --log filter {filter:?}: {e}")))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs: BoxedLayer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(filter).boxed()
        }
    };
    let mut layers = vec![logs];
    let telemetry = match otlp {
        None => Telemetry {
            #[cfg(not(madsim))]
            provider: None,
        },
        Some(endpoint) => {
            #[cfg(not(madsim))]
            {
                let (layer, provider) = otlp::layer(endpoint, node_id)?;
                layers.push(layer);
                blixard_core::trace::install(Box::new(otlp::W3cHook));
                Telemetry { provider: Some(provider) }
            }
            #[cfg(madsim)]
            {
                let _ = (endpoint, node_id);
                return Err(Failure::new("--otlp-endpoint: simulation builds export no traces"));
            }
        }
    };
    tracing_subscriber::registry().with(layers).init();
    Ok(telemetry)
}

#[cfg(not(madsim))]
mod otlp {
    use std::collections::HashMap;

    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TracerProvider;
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;

    use super::{BoxedLayer, TraceHook};
    use crate::Failure;

    /// The tracing layer that exports Blixard's spans, and its provider.
    pub fn layer(endpoint: &str, node_id: u64) -> Result<(BoxedLayer, SdkTracerProvider), Failure> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| Failure::new(format!("--otlp-endpoint {endpoint}: {e}")))?;
        let resource = Resource::builder()
            .with_service_name("blixard")
            .with_attribute(KeyValue::new("blixard.node.id", node_id as i64))
            .build();
        let provider =
            SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        let tracer = provider.tracer("blixard");
        // Only Blixard's own spans (and its events inside them): not
        // openraft's, tonic's or hyper's.
        let only_blixard = tracing_subscriber::filter::filter_fn(|m| {
            m.target().starts_with("blixard") && (m.is_span() || *m.level() <= tracing::Level::INFO)
        });
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_blixard).boxed();
        Ok((layer, provider))
    }

    /// W3C Trace Context for core's forwards.
    pub struct W3cHook;

    impl TraceHook for W3cHook {
        fn traceparent(&self, span: &tracing::Span) -> Option<String> {
            let mut carrier = HashMap::new();
            TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
            carrier.remove(blixard_core::trace::TRACEPARENT)
        }

        fn set_parent(&self, span: &tracing::Span, traceparent: &str) {
            let carrier =
                HashMap::from([(blixard_core::trace::TRACEPARENT.to_string(), traceparent.to_string())]);
            let cx = TraceContextPropagator::new().extract(&carrier);
            if let Err(e) = span.set_parent(cx) {
                tracing::debug!(error = %e, "could not continue a remote trace");
            }
        }
    }
}
