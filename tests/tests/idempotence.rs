//! Idempotent publishing: a retried batch is stored once and answered with its original offsets,
//! also after a restart; gaps and stale epochs are refused with FAILED_PRECONDITION.

use tonic::Code;
use tonic_types::StatusExt;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::publisher_client::PublisherClient;
use weft_proto::v1::subscriber_client::SubscriberClient;
use weft_proto::v1::{FetchRequest, PublishRequest, Record};
use weft_tests::Broker;

fn batch(producer_id: u64, epoch: u32, base_sequence: u64, values: &[&str]) -> PublishRequest {
    PublishRequest {
        topic: "idem".into(),
        target: Some(Target::Partition(0)),
        records: values
            .iter()
            .map(|v| Record {
                value: bytes::Bytes::from(v.to_string()),
                ..Record::default()
            })
            .collect(),
        producer_id,
        producer_epoch: epoch,
        base_sequence,
        request_id: base_sequence,
    }
}

async fn fetch_all(broker: &Broker) -> Vec<String> {
    let mut subscriber = SubscriberClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");
    let response = subscriber
        .fetch(FetchRequest {
            topic: "idem".into(),
            partition: 0,
            offset: 0,
            max_bytes: 0,
            max_wait_ms: 0,
            min_bytes: 0,
            max_records: 0,
        })
        .await
        .expect("fetch")
        .into_inner();
    response
        .records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_stored_once() {
    let mut broker = Broker::start();
    broker
        .client()
        .await
        .admin()
        .create_topic("idem", 1)
        .await
        .expect("create");
    let mut publisher = PublisherClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");

    let first = publisher
        .publish(batch(42, 0, 0, &["a", "b"]))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(
        (first.base_offset, first.record_count, first.duplicate),
        (0, 2, false)
    );
    let retry = publisher
        .publish(batch(42, 0, 0, &["a", "b"]))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        (retry.base_offset, retry.record_count, retry.duplicate),
        (0, 2, true),
        "the retry gets the original offsets"
    );
    let next = publisher
        .publish(batch(42, 0, 2, &["c"]))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(next.base_offset, 2);
    assert_eq!(fetch_all(&broker).await, ["a", "b", "c"], "stored once");

    // A gap is refused, with the expected sequence in the details.
    let gap = publisher
        .publish(batch(42, 0, 10, &["x"]))
        .await
        .expect_err("gap");
    assert_eq!(gap.code(), Code::FailedPrecondition);
    let info = gap.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SEQUENCE_GAP");
    assert_eq!(
        info.metadata.get("expected_sequence").map(String::as_str),
        Some("3")
    );

    // A new epoch fences the old one.
    publisher
        .publish(batch(42, 1, 0, &["d"]))
        .await
        .expect("new epoch starts at 0");
    let fenced = publisher
        .publish(batch(42, 0, 3, &["y"]))
        .await
        .expect_err("fenced");
    assert_eq!(fenced.code(), Code::FailedPrecondition);
    assert_eq!(
        fenced.get_details_error_info().expect("ErrorInfo").reason,
        "PRODUCER_FENCED"
    );

    // An idempotent publish needs a partition or a key.
    let mut no_target = batch(42, 1, 1, &["z"]);
    no_target.target = None;
    let status = publisher.publish(no_target).await.expect_err("no target");
    assert_eq!(status.code(), Code::InvalidArgument);

    // After a restart the producer state is rebuilt from the log: the last batch is still a duplicate.
    broker.restart();
    let mut publisher = PublisherClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");
    let again = publisher
        .publish(batch(42, 1, 0, &["d"]))
        .await
        .expect("retry after restart")
        .into_inner();
    assert!(
        again.duplicate,
        "a retry after a restart is still recognised"
    );
    assert_eq!(again.base_offset, 3);
    assert_eq!(fetch_all(&broker).await, ["a", "b", "c", "d"]);
}
