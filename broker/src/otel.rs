//! The broker's spans (when an OTLP endpoint is configured; see `weft_proto::otel`): `receive`
//! for each publish (on the broker the client called, and again on the leader it was forwarded
//! to, as a child), `replicate` for the Raft append until the batch is committed and applied,
//! and `deliver` / `fetch` for records sent to consumers. Each is linked to the creation
//! contexts the records carry in their headers, and without a caller context it is a child of
//! the first record's, so a record's trace runs from its producer to its consumers.

use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use weft_proto::otel;
use weft_proto::v1::Record;

use crate::error::BrokerError;

/// The creation contexts of `records` (those that carry one).
pub fn record_contexts(records: &[Record]) -> Vec<SpanContext> {
    records
        .iter()
        .filter_map(|r| {
            otel::record_context(r.headers.iter().map(|h| (h.key.as_str(), &h.value[..])))
        })
        .collect()
}

/// Starts a span named `name` of `kind`: a child of `caller` when it holds a span, else of the
/// first record's creation context; linked to the records' contexts.
pub fn start(
    name: String,
    kind: SpanKind,
    caller: &Context,
    records: Vec<SpanContext>,
    attributes: Vec<KeyValue>,
) -> Context {
    let parent = if caller.span().span_context().is_valid() {
        caller.clone()
    } else {
        records.first().map_or_else(Context::new, |sc| {
            Context::new().with_remote_span_context(sc.clone())
        })
    };
    let tracer = otel::tracer();
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .with_links(otel::links(records))
        .start_with_context(&tracer, &parent);
    Context::new().with_span(span)
}

/// A child span of `parent` (no links).
pub fn child(name: String, parent: &Context, attributes: Vec<KeyValue>) -> Context {
    let tracer = otel::tracer();
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_attributes(attributes)
        .start_with_context(&tracer, parent);
    Context::new().with_span(span)
}

/// Sets an attribute on `cx`'s span.
pub fn set(cx: &Context, attribute: KeyValue) {
    cx.span().set_attribute(attribute);
}

/// Ends `cx`'s span, with the error when the step failed.
pub fn end<T>(cx: &Context, result: &Result<T, BrokerError>) {
    let span = cx.span();
    if let Err(e) = result {
        span.set_status(Status::error(e.to_string()));
    }
    span.end();
}

/// This broker's node id, as a span attribute.
pub fn node(node_id: u64) -> KeyValue {
    KeyValue::new(otel::NODE_ID, node_id as i64)
}
