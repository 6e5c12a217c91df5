//! Exporting the relay's spans over OTLP/HTTP (`run --otlp-endpoint`, or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `..._TRACES_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or
//! `http/json`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_SDK_DISABLED`).
//!
//! The exporter's HTTP client blocks: it is made and shut down outside the
//! async runtime, and exports on the batch processor's own thread.

use opentelemetry::global;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use outbox_relay::error::Error;

/// Spans are being exported; [`Exporting::shutdown`] flushes them.
pub struct Exporting(SdkTracerProvider);

impl Exporting {
    /// Exports what is left; call outside the async runtime.
    pub fn shutdown(self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("warning: exporting the last spans over OTLP failed: {e}");
        }
    }
}

/// Starts exporting when an endpoint is configured (the flag, or the OTLP
/// environment variables); `None` otherwise.
pub fn start(endpoint: Option<&str>) -> Result<Option<Exporting>, Error> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if endpoint.is_none()
        && !set("OTEL_EXPORTER_OTLP_ENDPOINT")
        && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    {
        return Ok(None);
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(endpoint) = endpoint {
        let endpoint = endpoint.trim().trim_end_matches('/');
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            || endpoint.contains(char::is_whitespace)
        {
            return Err(Error::Config(format!(
                "--otlp-endpoint (OUTBOX_OTLP_ENDPOINT) {endpoint:?} is not an http:// or https:// URL; give the collector's OTLP/HTTP base URL, e.g. http://otel-collector:4318"
            )));
        }
        exporter = exporter.with_endpoint(format!("{endpoint}/v1/traces"));
    }
    let exporter = exporter.build().map_err(|e| {
        Error::Config(format!(
            "the OTLP exporter: {e}; check --otlp-endpoint (OUTBOX_OTLP_ENDPOINT) and the OTEL_EXPORTER_OTLP_* variables (protocol http/protobuf or http/json)"
        ))
    })?;
    let named = set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name("outbox-relay");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        // A batch links to each of its rows' contexts (up to --batch-size).
        .with_max_links_per_span(100_000)
        .build();
    global::set_tracer_provider(provider.clone());
    outbox_relay::trace_context::enable();
    Ok(Some(Exporting(provider)))
}
