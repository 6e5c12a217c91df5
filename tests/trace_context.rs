//! Trace context end to end, against an OTLP/HTTP receiver in the test: a
//! service span writes an event (`outbox::insert` records its
//! `traceparent`), the relay binary publishes it (the header unchanged) and
//! exports a batch span linked to it, and the consumer runtime applies it
//! in a consumer span whose parent is the service span. The receiver
//! decodes what the exporters send (OTLP/JSON, chosen with the standard
//! `OTEL_EXPORTER_OTLP_PROTOCOL`) and the ids are compared.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use opentelemetry::trace::{FutureExt, TraceContextExt, Tracer};
use opentelemetry::{Context, global};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use outbox_relay::consumer::{
    self, ConsumerConfig, HandlerError, KafkaConsumer, KafkaSettings, Message,
};
use outbox_relay::outbox::{self, Event};
use serde_json::{Value, json};
use sqlx::{Postgres, Transaction};
use support::*;

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    links: Vec<(String, String)>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// An OTLP/HTTP (JSON) trace receiver on its own thread; returns its base URL.
fn start_receiver(spans: Spans) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = Router::new()
                .route("/v1/traces", post(receive))
                .with_state(spans);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    url
}

async fn receive(
    State(spans): State<Spans>,
    body: Bytes,
) -> ([(&'static str, &'static str); 1], &'static str) {
    let request: Value = serde_json::from_slice(&body).expect("OTLP/JSON");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| text(&a["value"]["stringValue"]))
            .unwrap_or_default();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                spans.lock().unwrap().push(Received {
                    service: service.clone(),
                    name: text(&span["name"]),
                    trace_id: text(&span["traceId"]),
                    span_id: text(&span["spanId"]),
                    parent_span_id: text(&span["parentSpanId"]),
                    links: span["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| (text(&l["traceId"]), text(&l["spanId"])))
                        .collect(),
                });
            }
        }
    }
    ([("content-type", "application/json")], "{}")
}

/// What the handler saw: the message's traceparent header and its own
/// current span.
#[derive(Default)]
struct Seen(Mutex<Vec<(Option<String>, String, String)>>);

struct Recording(Arc<Seen>);

impl consumer::Handler for Recording {
    async fn handle(
        &self,
        _tx: &mut Transaction<'static, Postgres>,
        message: &Message,
    ) -> Result<(), HandlerError> {
        let header = message
            .header("traceparent")
            .map(|v| String::from_utf8(v.to_vec()).unwrap());
        let cx = Context::current();
        let span = cx.span();
        let current = span.span_context();
        self.0.0.lock().unwrap().push((
            header,
            format!("{:032x}", current.trace_id()),
            format!("{:016x}", current.span_id()),
        ));
        Ok(())
    }
}

#[test]
fn a_trace_follows_an_event_from_the_service_through_the_relay_to_the_consumer() {
    let spans: Spans = Arc::default();
    let url = start_receiver(spans.clone());
    // The service's (and the consumer's) tracer provider, exporting to the
    // receiver. Made outside the async runtime: its HTTP client blocks.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(format!("{url}/v1/traces"))
        .build()
        .unwrap();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder_empty()
                .with_service_name("checkout-service")
                .build(),
        )
        .build();
    global::set_tracer_provider(provider.clone());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let seen = Arc::new(Seen::default());
    let (service_trace, service_span, topic) = runtime.block_on(async {
        let t = Setup::new(Kafka::start()).await;
        let topic = t.topic("acct", 1).await;
        let mut conn = t.pool.acquire().await.unwrap();

        // The service: one event inside its span, one outside any.
        let tracer = global::tracer("checkout-service");
        let cx = Context::current_with_span(tracer.start("checkout"));
        let traced = Event::new("acct", "a-1", "debited", json!({"amount": 10}));
        outbox::insert(&mut conn, &traced)
            .with_context(cx.clone())
            .await
            .unwrap();
        let service = cx.span().span_context().clone();
        cx.span().end();
        let untraced = Event::new("acct", "a-2", "debited", json!({"amount": 5}));
        outbox::insert(&mut conn, &untraced).await.unwrap();
        let (trace, span) = (
            format!("{:032x}", service.trace_id()),
            format!("{:016x}", service.span_id()),
        );
        let headers: Vec<(uuid::Uuid, Value)> =
            sqlx::query_as("select id, headers from outbox order by seq")
                .fetch_all(&t.pool)
                .await
                .unwrap();
        assert_eq!(
            headers,
            [
                (
                    traced.id,
                    json!({"traceparent": format!("00-{trace}-{span}-01")})
                ),
                (untraced.id, json!({})),
            ],
            "the service's span was not recorded in the row, or recorded where there was none"
        );

        // The relay, exporting over OTLP/JSON by the standard variables.
        let mut relay = t
            .relay_command()
            .args(["--otlp-endpoint", &url])
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_until_drained(&t.pool, Duration::from_secs(90)).await;
        // SIGTERM: it flushes its spans before it exits.
        kill(Pid::from_raw(relay.id().unwrap() as i32), Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), relay.wait())
            .await
            .expect("the relay stops on SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");

        // The consumer runtime, with the global provider.
        let group = format!("traced-{topic}");
        let member = KafkaConsumer::new(
            t.pool.clone(),
            ConsumerConfig::new(&group, [&topic]),
            KafkaSettings::new(t.kafka.brokers()),
            Recording(seen.clone()),
        )
        .unwrap();
        let stats = member.stats();
        member
            .run(async {
                wait_for(
                    "both messages to be applied",
                    Duration::from_secs(60),
                    || async { stats.applied() >= 2 },
                )
                .await
            })
            .await
            .unwrap();
        (trace, span, topic)
    });
    drop(runtime);
    provider.force_flush().unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let all = loop {
        let all = spans.lock().unwrap().clone();
        let consumer_spans = all
            .iter()
            .filter(|s| s.name.starts_with("process "))
            .count();
        if (consumer_spans >= 2 && all.iter().any(|s| s.service == "outbox-relay"))
            || std::time::Instant::now() > deadline
        {
            break all;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let service_spans: Vec<&Received> = all.iter().filter(|s| s.name == "checkout").collect();
    assert_eq!(service_spans.len(), 1, "{all:#?}");
    assert_eq!(
        (
            service_spans[0].trace_id.as_str(),
            service_spans[0].span_id.as_str()
        ),
        (service_trace.as_str(), service_span.as_str())
    );

    // The relay: batch spans of its own service, linked to the service span
    // (and to nothing else: the other row had no context).
    let relay_spans: Vec<&Received> = all
        .iter()
        .filter(|s| s.service == "outbox-relay" && s.name == "outbox publish")
        .collect();
    assert!(
        !relay_spans.is_empty(),
        "the relay exported no batch span: {all:#?}"
    );
    let links: Vec<&(String, String)> = relay_spans.iter().flat_map(|s| &s.links).collect();
    assert_eq!(
        links,
        [&(service_trace.clone(), service_span.clone())],
        "the batch spans' links: {relay_spans:#?}"
    );
    for span in &relay_spans {
        assert!(
            span.parent_span_id.is_empty(),
            "a batch span is a root: {span:?}"
        );
    }

    // The consumer: the traced message's span is a child of the service
    // span, in its trace; the handler ran inside it; the header arrived
    // unchanged.
    let name = format!("process {topic}");
    let consumer_spans: Vec<&Received> = all.iter().filter(|s| s.name == name).collect();
    assert_eq!(consumer_spans.len(), 2, "{all:#?}");
    let child = consumer_spans
        .iter()
        .find(|s| s.trace_id == service_trace)
        .unwrap_or_else(|| panic!("no consumer span in the service's trace: {consumer_spans:#?}"));
    assert_eq!(child.parent_span_id, service_span, "{child:?}");
    let other = consumer_spans
        .iter()
        .find(|s| s.trace_id != service_trace)
        .unwrap();
    assert!(
        other.parent_span_id.is_empty(),
        "an untraced message starts its own trace: {other:?}"
    );
    let seen = seen.0.lock().unwrap();
    let in_handler = seen
        .iter()
        .find(|(header, _, _)| header.is_some())
        .expect("the handler saw the traceparent header");
    assert_eq!(
        in_handler,
        &(
            Some(format!("00-{service_trace}-{service_span}-01")),
            child.trace_id.clone(),
            child.span_id.clone()
        ),
        "the header changed on the way, or the handler ran outside the consumer span"
    );
}
