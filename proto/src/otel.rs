//! OpenTelemetry traces, shared by the client and the broker: W3C trace context (`traceparent`,
//! `tracestate`) read from and written to request metadata and record headers, the messaging
//! semantic-convention attributes (`messaging.system = weft`), and OTLP export over gRPC.
//!
//! Nothing is traced until [`install_otlp`] (or [`enable`], for a program that installs its own
//! tracer provider) is called: before, [`enabled`] is false and callers skip every span, so the
//! hot path pays one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Link, SpanContext, TraceContextExt};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

pub use opentelemetry;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The tracer's name (the instrumentation scope of every Weft span).
pub const SCOPE: &str = "weft";

/// `messaging.system`.
pub const SYSTEM: &str = "messaging.system";
/// `messaging.destination.name`: the topic.
pub const DESTINATION: &str = "messaging.destination.name";
/// `messaging.destination.partition.id`.
pub const PARTITION: &str = "messaging.destination.partition.id";
/// `messaging.operation.type`: create, send, receive, process (and, on the broker, its own
/// steps: receive, settle, deliver).
pub const OPERATION_TYPE: &str = "messaging.operation.type";
/// `messaging.operation.name`: the call (publish, subscribe ...).
pub const OPERATION_NAME: &str = "messaging.operation.name";
/// `messaging.batch.message_count`.
pub const BATCH_COUNT: &str = "messaging.batch.message_count";
/// `messaging.consumer.group.name`.
pub const CONSUMER_GROUP: &str = "messaging.consumer.group.name";
/// The offset of a record (of a batch's first record), as `messaging.kafka.offset` is for Kafka.
pub const OFFSET: &str = "messaging.weft.offset";
/// The broker that recorded a span.
pub const NODE_ID: &str = "weft.node.id";

/// Most links a span carries to the creation contexts of the records it handles.
pub const LINKS_MAX: usize = 32;

/// Whether spans are recorded (an exporter or a tracer provider was installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns tracing on for a program that installed its own global tracer provider (the client
/// library then records its spans through `opentelemetry::global`).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// The tracer of Weft's spans (the global provider's).
pub fn tracer() -> global::BoxedTracer {
    global::tracer(SCOPE)
}

/// The messaging attributes of a span on `topic` (and `partition`, when known).
pub fn messaging(
    operation_type: &'static str,
    operation_name: &'static str,
    topic: &str,
    partition: Option<u32>,
) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new(SYSTEM, "weft"),
        KeyValue::new(OPERATION_TYPE, operation_type),
        KeyValue::new(OPERATION_NAME, operation_name),
        KeyValue::new(DESTINATION, topic.to_string()),
    ];
    if let Some(p) = partition {
        attributes.push(KeyValue::new(PARTITION, p.to_string()));
    }
    attributes
}

/// The pairs that carry a context: `traceparent` and `tracestate`.
struct Pairs<'a>(Vec<(&'a str, &'a str)>);

impl Extractor for Pairs<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| *v)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| *k).collect()
    }
}

/// The remote context that `traceparent` / `tracestate` pairs carry (among other pairs, which
/// are ignored); an empty context when there is none or it is malformed.
pub fn extract<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Context {
    let pairs: Vec<(&str, &str)> = pairs
        .into_iter()
        .filter(|(k, _)| {
            k.eq_ignore_ascii_case("traceparent") || k.eq_ignore_ascii_case("tracestate")
        })
        .filter_map(|(k, v)| Some((k, std::str::from_utf8(v).ok()?)))
        .collect();
    if pairs.is_empty() {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&Pairs(pairs))
}

/// The span context a record's headers carry (its creation context), if valid.
pub fn record_context<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Option<SpanContext> {
    let cx = extract(headers);
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// Links to the distinct creation contexts of records (at most [`LINKS_MAX`]).
pub fn links(contexts: impl IntoIterator<Item = SpanContext>) -> Vec<Link> {
    let mut links: Vec<Link> = Vec::new();
    for sc in contexts {
        if links.len() >= LINKS_MAX {
            break;
        }
        if !links.iter().any(|l| l.span_context == sc) {
            links.push(Link::with_context(sc));
        }
    }
    links
}

/// `cx`'s span context as W3C pairs (`traceparent`, and `tracestate` when not empty).
pub fn inject(cx: &Context) -> Vec<(&'static str, String)> {
    struct Out(Vec<(&'static str, String)>);
    impl Injector for Out {
        fn set(&mut self, key: &str, value: String) {
            let key = if key.eq_ignore_ascii_case("traceparent") {
                "traceparent"
            } else if key.eq_ignore_ascii_case("tracestate") {
                "tracestate"
            } else {
                return;
            };
            if !value.is_empty() {
                self.0.push((key, value));
            }
        }
    }
    let mut out = Out(Vec::new());
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut out);
    }
    out.0
}

/// The context of `metadata`'s `traceparent` / `tracestate`.
pub fn metadata_context(metadata: &tonic::metadata::MetadataMap) -> Context {
    extract(
        ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|key| metadata.get(key).map(|v| (key, v.as_bytes()))),
    )
}

/// Sets `cx`'s span context as `metadata`'s `traceparent` / `tracestate` (replacing theirs).
pub fn inject_metadata(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    for (key, value) in inject(cx) {
        if let Ok(value) = value.parse() {
            metadata.insert(key, value);
        }
    }
}

/// The installed OTLP exporter: flushes what is queued; shut it down before the process ends.
#[derive(Debug, Clone)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports every finished span now (blocking: call it from a blocking thread).
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!("flushing spans: {e}");
        }
    }

    /// Exports what is queued and stops (blocking).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("stopping the span exporter: {e}");
        }
    }
}

/// Longest wait for one OTLP export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks an OTLP endpoint: `http://HOST:PORT` (the exporter is built without TLS).
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URI: {e}"))?;
    if uri.scheme_str() == Some("https") {
        return Err(format!(
            "{endpoint:?}: OTLP over TLS is not supported yet; export to a collector over \
             http://HOST:PORT (a local agent or the mesh's sidecar encrypts the hop)"
        ));
    }
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("{endpoint:?} must be http://HOST:PORT"));
    }
    Ok(())
}

/// Exports spans over OTLP/gRPC to `endpoint` (`http://collector:4317`) as `service_name`,
/// with these resource attributes, and turns tracing on. Spans wait in a bounded queue (the
/// SDK's batch processor: 2,048 spans, a batch every 5 s or `OTEL_BSP_SCHEDULE_DELAY` ms);
/// when it is full, new spans are dropped, never waited for. Call it inside a Tokio runtime.
pub fn install_otlp(
    endpoint: &str,
    service_name: &str,
    attributes: Vec<KeyValue>,
) -> Result<Telemetry, String> {
    use opentelemetry_otlp::WithExportConfig;
    check_endpoint(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter for {endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attributes(attributes)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    global::set_tracer_provider(provider.clone());
    global::set_text_map_propagator(TraceContextPropagator::new());
    enable();
    Ok(Telemetry { provider })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn a_context_goes_out_and_comes_back() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(sc.clone());
        let pairs = inject(&cx);
        assert_eq!(
            pairs,
            vec![(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string()
            )]
        );
        let back = record_context(pairs.iter().map(|(k, v)| (*k, v.as_bytes())));
        assert_eq!(
            back.map(|b| (b.trace_id(), b.span_id())),
            Some((sc.trace_id(), sc.span_id()))
        );
    }

    #[test]
    fn malformed_or_missing_contexts_are_none() {
        assert!(record_context([("traceparent", b"00-zz".as_slice())]).is_none());
        assert!(record_context([("other", b"x".as_slice())]).is_none());
        assert!(inject(&Context::new()).is_empty());
    }

    #[test]
    fn links_are_distinct_and_bounded() {
        let sc = |i: u64| {
            SpanContext::new(
                TraceId::from_bytes([1; 16]),
                SpanId::from_bytes((i + 1).to_be_bytes()),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )
        };
        assert_eq!(links([sc(1), sc(1), sc(2)]).len(), 2);
        assert_eq!(links((0..100).map(sc)).len(), LINKS_MAX);
    }
}
