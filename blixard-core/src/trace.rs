//! Trace context across nodes, without an OpenTelemetry dependency.
//!
//! Core only emits `tracing` spans (at DEBUG level, so that with the
//! default log filter and no exporter they are disabled at their call site
//! and cost one relaxed load). Exporting them, and turning a span into a
//! W3C `traceparent` and back, is the binary's business: it installs a
//! [`TraceHook`] when it exports traces. Without a hook, nothing here does
//! any work. The simulator never installs one.
use std::sync::OnceLock;

/// The gRPC metadata key (W3C Trace Context) a forwarded request carries.
pub const TRACEPARENT: &str = "traceparent";

/// What the binary's tracing setup provides to carry a trace between nodes.
pub trait TraceHook: Send + Sync + 'static {
    /// The W3C `traceparent` naming `span`, if it belongs to an exported trace.
    fn traceparent(&self, span: &tracing::Span) -> Option<String>;
    /// Makes `span` a child of the remote span that `traceparent` names.
    fn set_parent(&self, span: &tracing::Span, traceparent: &str);
}

static HOOK: OnceLock<Box<dyn TraceHook>> = OnceLock::new();

/// Installs the process's hook; false if one was installed already.
pub fn install(hook: Box<dyn TraceHook>) -> bool {
    HOOK.set(hook).is_ok()
}

/// The `traceparent` to send along with a call made inside `span`.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let hook = HOOK.get()?;
    if span.is_disabled() {
        return None;
    }
    hook.traceparent(span)
}

/// Continues the caller's trace: makes `span` a child of the span named by
/// the `traceparent` in `metadata`, if there is one (and a hook).
pub fn continue_from(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let Some(hook) = HOOK.get() else { return };
    if span.is_disabled() {
        return;
    }
    if let Some(tp) = metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
        hook.set_parent(span, tp);
    }
}

/// [`continue_from`] for a `traceparent` already read from a request.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(hook) = HOOK.get() {
        if !span.is_disabled() {
            hook.set_parent(span, traceparent);
        }
    }
}
