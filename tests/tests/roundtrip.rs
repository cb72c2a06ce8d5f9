//! Produce and consume round trips through the CLI and through the library; headers (W3C trace
//! context among them) come back unchanged.

use std::time::Duration;

use weft_client::{ConsumerConfig, ProducerConfig, Record, StartFrom};
use weft_tests::{Broker, ok_stdout};

#[test]
fn cli_round_trip_keeps_keys_headers_and_order() {
    let broker = Broker::start();
    let created = ok_stdout(&broker.cli(&[
        "topic",
        "create",
        "orders",
        "--partitions",
        "2",
        "--output",
        "json",
    ]));
    let created: serde_json::Value = serde_json::from_str(created.trim()).expect("json");
    assert_eq!(created["partitions"], 2);

    let acks = ok_stdout(&broker.cli(&[
        "produce",
        "orders",
        "first",
        "second",
        "--key",
        "customer-7",
        "-H",
        "traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "-H",
        "tenant=acme",
        "--output",
        "json",
    ]));
    let acks: Vec<serde_json::Value> = acks
        .lines()
        .map(|l| serde_json::from_str(l).expect("json ack"))
        .collect();
    assert_eq!(acks.len(), 2);
    assert_eq!(acks[0]["offset"], 0);
    assert_eq!(acks[1]["offset"], 1);
    assert_eq!(
        acks[0]["partition"], acks[1]["partition"],
        "one key, one partition"
    );

    ok_stdout(&broker.cli_with_stdin(
        &["produce", "orders", "--key-separator", ":"],
        "k1:line one\nk2:line two\nk3:line three\n",
    ));

    let out = ok_stdout(&broker.cli(&[
        "consume", "orders", "--from", "earliest", "--count", "5", "--format", "json",
    ]));
    let records: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json record"))
        .collect();
    assert_eq!(records.len(), 5);
    let first = records
        .iter()
        .find(|r| r["value"] == "first")
        .expect("first record");
    assert_eq!(first["key"], "customer-7");
    assert_eq!(
        first["headers"],
        serde_json::json!([
            [
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ],
            ["tenant", "acme"]
        ]),
        "headers come back unchanged and in order"
    );
    let mut lines: Vec<String> = records
        .iter()
        .filter(|r| r["key"].as_str().is_some_and(|k| k.starts_with('k')))
        .map(|r| r["value"].as_str().unwrap_or_default().to_string())
        .collect();
    lines.sort();
    assert_eq!(lines, ["line one", "line three", "line two"]);

    // Text format, from an offset, one partition.
    let partition = first["partition"].to_string();
    let text = ok_stdout(&broker.cli(&[
        "consume",
        "orders",
        "--from",
        "1",
        "--partition",
        &partition,
        "--count",
        "1",
    ]));
    assert_eq!(text.trim(), "customer-7\tsecond");

    // Listing and describing.
    let listed = ok_stdout(&broker.cli(&["topic", "list"]));
    assert!(listed.contains("orders"));
    let described = ok_stdout(&broker.cli(&["topic", "describe", "orders", "--output", "json"]));
    let described: serde_json::Value = serde_json::from_str(described.trim()).expect("json");
    let hw: u64 = described["partition_details"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["high_watermark"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(hw, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_round_trip_with_headers_and_timestamps() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("events", 3)
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(2),
        ..ProducerConfig::default()
    });
    let mut sent = Vec::new();
    for i in 0..300u32 {
        let record = Record::new(format!("value-{i}"))
            .key(format!("key-{}", i % 17))
            .header("traceparent", format!("00-{:032x}-{:016x}-01", i, i))
            .header("seq", i.to_string())
            .timestamp_ms(1_700_000_000_000 + i64::from(i));
        sent.push((
            i,
            producer
                .send_nowait("events", record)
                .await
                .expect("queued"),
        ));
    }
    let mut acked = std::collections::HashMap::new();
    for (i, ack) in sent {
        let ack = ack.await.expect("stored");
        assert!(!ack.duplicate);
        acked.insert((ack.partition, ack.offset), i);
    }
    producer.close().await.expect("close");
    assert_eq!(
        acked.len(),
        300,
        "every record has its own (partition, offset)"
    );

    let mut consumer = client
        .consumer(ConsumerConfig::new("events").start(StartFrom::Earliest))
        .await
        .expect("subscribe");
    assert_eq!(consumer.assignment(), vec![0, 1, 2]);
    let mut seen = 0;
    while seen < 300 {
        let message = consumer
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("next")
            .expect("a record within 20 s");
        let i = acked[&(message.partition, message.offset)];
        assert_eq!(message.value, format!("value-{i}").as_bytes());
        assert_eq!(message.key, format!("key-{}", i % 17).as_bytes());
        assert_eq!(message.timestamp_ms, 1_700_000_000_000 + i64::from(i));
        assert_eq!(message.headers.len(), 2);
        assert_eq!(message.headers[0].0, "traceparent");
        assert_eq!(
            message.headers[0].1,
            format!("00-{:032x}-{:016x}-01", i, i).as_bytes()
        );
        assert_eq!(
            message.headers[1],
            ("seq".to_string(), bytes::Bytes::from(i.to_string()))
        );
        seen += 1;
    }
    // Nothing more was stored: the high watermarks add up to what was sent, and the consumer
    // stands at them.
    let bounds = client
        .admin()
        .offsets("events", None)
        .await
        .expect("offsets");
    assert_eq!(
        bounds.iter().map(|p| p.high_watermark).sum::<u64>(),
        seen as u64,
        "nothing stored twice or extra"
    );
    for p in &bounds {
        assert_eq!(
            consumer.positions().get(&p.partition).copied().unwrap_or(0),
            p.high_watermark,
            "partition {}",
            p.partition
        );
    }
    consumer.close().await.expect("close");
}

#[test]
fn the_quickstart_example_runs() {
    let broker = Broker::start();
    let example = weft_tests::bin_dir().join("examples").join("quickstart");
    weft_tests::ensure_binaries();
    let output = std::process::Command::new(example)
        .arg(&broker.client_addr)
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("read 10 records"), "{stdout}");
}

/// Publish RPCs answered `Ok` so far, from the broker's Prometheus metrics.
/// Batches published so far, whichever call carried them (each passes a publish queue).
fn publishes(broker: &Broker) -> u64 {
    weft_tests::metric(broker, "weft_publish_queue_seconds_count").map_or(0, |n| n as u64)
}

/// Natural batching: a partition with nothing in flight gets its record at once, whatever the
/// linger; records that arrive while a publish is outstanding share later publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_producer_sends_at_once_and_batches_while_busy() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("natural", 1)
        .await
        .expect("create");
    // A linger of 10 minutes: waiting for it would fail the test by its time-outs (2 minutes),
    // whatever the machine's speed.
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_secs(600),
        ..ProducerConfig::default()
    });
    // Nothing in flight: the record goes now, not after the linger.
    let ack = tokio::time::timeout(
        Duration::from_secs(120),
        producer.send("natural", Record::new("alone")),
    )
    .await
    .expect("an idle producer does not wait for linger")
    .expect("stored");
    assert_eq!(ack.offset, 0);

    let before = publishes(&broker);
    let mut acks = Vec::new();
    for i in 0..2_000u32 {
        acks.push(
            producer
                .send_nowait("natural", Record::new(format!("r{i}")))
                .await
                .expect("queued"),
        );
    }
    let answered = tokio::time::timeout(Duration::from_secs(120), async {
        let mut offsets = Vec::new();
        for ack in acks {
            offsets.push(ack.await.expect("stored").offset);
        }
        offsets
    })
    .await
    .expect("every record answered well before the linger");
    assert_eq!(answered, (1..=2_000).collect::<Vec<u64>>(), "in order");
    let used = publishes(&broker) - before;
    assert!(
        (1..2_000).contains(&used),
        "2,000 records took {used} publishes: records queued behind a publish in flight share one"
    );
    producer.close().await.expect("close");
}

/// `weft produce` reading a stdin that stays open (`tail -f app.log | weft produce logs`)
/// publishes each line and prints where it went as lines come, not only at the end of input:
/// its memory stays bounded however long the input runs. Before, it printed nothing (and
/// kept every acknowledgement) until stdin closed (helper-90).
#[test]
fn cli_produce_prints_each_line_as_it_comes_from_an_open_stdin() {
    use std::io::{BufRead, Write};
    let broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "lines", "--partitions", "1"]));
    let mut child = std::process::Command::new(weft_tests::binary("weft"))
        .args(["--server", &broker.client_addr, "produce", "lines"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn weft");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (printed_tx, printed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if printed_tx.send(line).is_err() {
                return;
            }
        }
    });
    for (i, value) in ["first", "second"].into_iter().enumerate() {
        writeln!(stdin, "{value}").expect("write a line");
        stdin.flush().expect("flush");
        let line = printed
            .recv_timeout(Duration::from_secs(10))
            .expect("the line's offset printed within 10 s, stdin still open");
        assert_eq!(line, format!("lines/0 offset {i}"));
    }
    drop(stdin);
    let status = child.wait().expect("weft exits");
    assert!(
        status.success(),
        "weft produce exits 0 at the end of its input"
    );
}
