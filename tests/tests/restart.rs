//! Restarts and crashes: every acknowledged record survives a graceful restart and a kill -9
//! during concurrent publishing, exactly once, at its acknowledged offset, with dense offsets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use weft_client::{ProducerConfig, Record};
use weft_tests::Broker;

/// Reads every record of `topic`, every partition from its start up to its high watermark (an
/// exact end, never an idle gap): (partition, offset) -> value.
async fn read_all(broker: &Broker, topic: &str) -> BTreeMap<(u32, u64), String> {
    let client = broker.client().await;
    // Partitions answer UNAVAILABLE while they open after a restart.
    let partitions =
        weft_tests::wait_for("the partitions to serve", Duration::from_secs(60), || {
            let client = &client;
            async move { client.admin().offsets(topic, None).await.ok() }
        })
        .await;
    let mut all = BTreeMap::new();
    for p in partitions {
        for (offset, value) in weft_tests::fetch_range(
            &broker.client_addr,
            topic,
            p.partition,
            p.log_start_offset,
            p.high_watermark,
        )
        .await
        {
            all.insert(
                (p.partition, offset),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_every_record_at_its_offset() {
    let mut broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("durable", 2)
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig::default());
    let mut acked = HashMap::new();
    for i in 0..500 {
        let ack = producer
            .send(
                "durable",
                Record::new(format!("v{i}")).key(format!("k{}", i % 9)),
            )
            .await
            .expect("stored");
        acked.insert((ack.partition, ack.offset), format!("v{i}"));
    }
    producer.close().await.expect("close");
    drop(client);

    assert_eq!(
        broker.stop(),
        Some(0),
        "SIGTERM exits 0; log:\n{}",
        broker.log()
    );
    broker.start_again();
    let all = read_all(&broker, "durable").await;
    assert_eq!(all.len(), acked.len());
    for (key, value) in &acked {
        assert_eq!(all.get(key), Some(value), "record at {key:?} after restart");
    }
    // Publishing continues after the restart at the next offsets.
    let client = broker.client().await;
    let ack = client
        .producer(ProducerConfig::default())
        .send("durable", Record::new("after").partition(0))
        .await
        .expect("stored");
    let before = acked.keys().filter(|(p, _)| *p == 0).count() as u64;
    assert_eq!(ack.offset, before, "offsets continue densely");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_publishing_loses_no_acknowledged_record() {
    kill_9_during_publishing(Broker::start(), |_| {}).await;
}

/// The same with `direct_io = true`: segments written with O_DIRECT in whole blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_publishing_with_direct_io_loses_no_acknowledged_record() {
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(config.path(), "direct_io = true\n").expect("write config");
    let broker = Broker::start_with(&["--config", config.path().to_str().expect("utf-8")]);
    kill_9_during_publishing(broker, |broker| {
        // Written directly, in whole blocks: each partition's active data file ends on a block
        // boundary (its last block padded with zeros) until the restart cuts the padding.
        let probe = broker.data_dir().join("direct-io-probe");
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(&probe)
                .is_ok()
        };
        let _ = std::fs::remove_file(&probe);
        if !direct {
            eprintln!("this filesystem refuses O_DIRECT: the broker wrote through the page cache");
            return;
        }
        let topics = broker.data_dir().join("topics");
        let mut active = Vec::new();
        for topic in std::fs::read_dir(&topics).expect("topics") {
            for partition in std::fs::read_dir(topic.expect("topic").path()).expect("partitions") {
                let mut logs: Vec<_> = std::fs::read_dir(partition.expect("partition").path())
                    .expect("files")
                    .map(|e| e.expect("file").path())
                    .filter(|p| p.extension().is_some_and(|e| e == "log"))
                    .collect();
                logs.sort();
                active.extend(logs.pop());
            }
        }
        assert_eq!(
            active.len(),
            3,
            "one active data file per partition: {active:?}"
        );
        for path in active {
            let len = std::fs::metadata(&path).expect("stat").len();
            assert!(
                len > 0 && len % 4096 == 0,
                "{} holds {len} bytes",
                path.display()
            );
        }
    })
    .await;
}

async fn kill_9_during_publishing(mut broker: Broker, before_restart: impl FnOnce(&Broker)) {
    let client = broker.client().await;
    client
        .admin()
        .create_topic("crash", 3)
        .await
        .expect("create");
    let acked = Arc::new(std::sync::Mutex::new(HashMap::<(u32, u64), String>::new()));
    let mut producers = Vec::new();
    for p in 0..4 {
        let client = client.clone();
        let acked = acked.clone();
        producers.push(tokio::spawn(async move {
            let producer = client.producer(ProducerConfig {
                linger: Duration::from_millis(1),
                retries_max: 2,
                retry_backoff: Duration::from_millis(50),
                ..ProducerConfig::default()
            });
            // Bounded: at most 20 000 records per producer; the broker dies long before.
            for i in 0..20_000 {
                let value = format!("p{p}-{i}");
                match producer
                    .send(
                        "crash",
                        Record::new(value.clone()).key(format!("{p}-{}", i % 5)),
                    )
                    .await
                {
                    Ok(ack) => {
                        acked
                            .lock()
                            .expect("lock")
                            .insert((ack.partition, ack.offset), value);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Let them publish for a while, then kill the broker mid-stream.
    weft_tests::wait_for("500 acknowledgements", Duration::from_secs(120), || async {
        (acked.lock().expect("lock").len() >= 500).then_some(())
    })
    .await;
    broker.kill9();
    for producer in producers {
        tokio::time::timeout(Duration::from_secs(60), producer)
            .await
            .expect("the producer gave up once the broker was gone")
            .expect("the producer did not panic");
    }
    let acked = acked.lock().expect("lock").clone();

    before_restart(&broker);
    broker.start_again();
    let all = read_all(&broker, "crash").await;
    for (key, value) in &acked {
        assert_eq!(
            all.get(key),
            Some(value),
            "acknowledged record at {key:?} lost or changed"
        );
    }
    // Exactly once: no value twice.
    let mut values = HashSet::new();
    for value in all.values() {
        assert!(values.insert(value), "value {value} stored twice");
    }
    // Dense offsets per partition, from 0.
    for partition in 0..3u32 {
        let offsets: Vec<u64> = all
            .keys()
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as u64).collect::<Vec<_>>(),
            "partition {partition} offsets are dense"
        );
    }
}
