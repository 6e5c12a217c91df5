//! W3C trace context through OpenTelemetry's API (feature `trace-context`;
//! README, "Trace context").
//!
//! - [`crate::outbox::insert`] records the current span as the row's
//!   `traceparent` (and `tracestate`) headers, unless the event has them.
//! - The relay publishes those headers unchanged and, when spans are
//!   exported ([`enable`]; the binary's `--otlp-endpoint`), makes one
//!   producer span per batch linked to each row's context.
//! - The consumer runtime runs each handler in a consumer span whose parent
//!   is the message's `traceparent`, with the global tracer provider the
//!   application installed.
//!
//! Only the API crate: without a provider the spans are no-ops.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer,
};
use opentelemetry::{Context, KeyValue, global};

use crate::outbox::OutboxRow;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The instrumentation scope of every span made here.
const SCOPE: &str = "outbox-relay";

static RELAY_SPANS: AtomicBool = AtomicBool::new(false);

/// Makes the relay loop create batch spans (the binary calls it once it
/// installed an exporting tracer provider).
pub fn enable() {
    RELAY_SPANS.store(true, Ordering::Relaxed);
}

/// The current context's span as `(traceparent, tracestate)`, if there is
/// a valid one.
pub fn current() -> Option<(String, Option<String>)> {
    let cx = Context::current();
    let span = cx.span();
    let context = span.span_context();
    if !context.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{:032x}-{:016x}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    );
    let state = context.trace_state().header();
    Some((traceparent, (!state.is_empty()).then_some(state)))
}

/// A remote span context from a `traceparent` value (and `tracestate`);
/// none for a value that is not a valid W3C trace parent.
pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let [version, trace_id, span_id, flags, ..] = parts.as_slice() else {
        return None;
    };
    let well_formed = version.len() == 2
        && *version != "ff"
        && (*version != "00" || parts.len() == 4)
        && trace_id.len() == 32
        && span_id.len() == 16
        && flags.len() == 2;
    if !well_formed {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        tracestate
            .and_then(|state| state.parse::<TraceState>().ok())
            .unwrap_or_default(),
    );
    context.is_valid().then_some(context)
}

/// One batch's producer span: a root span linked to the context each row
/// was written in. Ends when dropped.
pub struct BatchSpan(Option<global::BoxedSpan>);

impl BatchSpan {
    pub fn start(schema: &str, rows: &[OutboxRow]) -> Self {
        if !RELAY_SPANS.load(Ordering::Relaxed) {
            return BatchSpan(None);
        }
        let links: Vec<Link> = rows
            .iter()
            .filter_map(|row| {
                let traceparent = row.headers.get(TRACEPARENT)?.as_str()?;
                let tracestate = row.headers.get(TRACESTATE).and_then(|v| v.as_str());
                parse(traceparent, tracestate).map(Link::with_context)
            })
            .collect();
        let tracer = global::tracer(SCOPE);
        let span = tracer
            .span_builder("outbox publish")
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.batch.message_count", rows.len() as i64),
                KeyValue::new("outbox.schema", schema.to_owned()),
                KeyValue::new("outbox.first_seq", rows.first().map_or(0, |row| row.seq)),
            ])
            .with_links(links)
            .start_with_context(&tracer, &Context::new());
        BatchSpan(Some(span))
    }

    /// The batch was confirmed.
    pub fn confirmed(&mut self, published: usize, dead_lettered: usize) {
        use opentelemetry::trace::Span;
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new("outbox.published", published as i64));
            span.set_attribute(KeyValue::new("outbox.dead_lettered", dead_lettered as i64));
        }
    }

    /// Publishing failed (the rows are read again).
    pub fn failed(&mut self, cause: &str) {
        use opentelemetry::trace::Span;
        if let Some(span) = &mut self.0 {
            span.set_status(Status::error(cause.to_owned()));
        }
    }
}

/// Runs `handling` (the consumer's handler for one message) in a consumer
/// span whose parent is the message's `traceparent`.
#[cfg(feature = "consumer")]
pub async fn in_consumer_span<T, E: std::fmt::Display>(
    group: &str,
    message: &crate::consumer::Message,
    handling: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    use opentelemetry::trace::FutureExt;
    let header = |name: &str| {
        message
            .header(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    };
    let parent = match header(TRACEPARENT).and_then(|tp| parse(tp, header(TRACESTATE))) {
        Some(remote) => Context::new().with_remote_span_context(remote),
        None => Context::current(),
    };
    let tracer = global::tracer(SCOPE);
    let span = tracer
        .span_builder(format!("process {}", message.topic))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", message.topic.clone()),
            KeyValue::new("messaging.consumer.group.name", group.to_owned()),
            KeyValue::new("messaging.message.id", message.id.to_string()),
        ])
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);
    let result = handling.with_context(cx.clone()).await;
    let span = cx.span();
    if let Err(error) = &result {
        span.set_status(Status::error(error.to_string()));
    }
    span.end();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_by_the_w3c_rules() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let context = parse(good, Some("vendor=opaque")).unwrap();
        assert_eq!(
            format!("{:032x}", context.trace_id()),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(format!("{:016x}", context.span_id()), "b7ad6b7169203331");
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(context.trace_state().header(), "vendor=opaque");
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-xyz7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(parse(bad, None).is_none(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            parse(
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
                None
            )
            .is_some()
        );
    }
}
