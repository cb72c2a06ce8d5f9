//! Kill -9 the leader of a partition while four producers publish to it (real processes on
//! 127.0.0.x, free ports, temp dirs): another replica leads within seconds, the producers carry
//! on, and the partition holds every acknowledged record exactly once at its acknowledged
//! offset, with dense offsets and no record twice.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use weft_client::{Client, ProducerConfig, Record};
use weft_tests::{
    fetch_range, metric, start_cluster, start_cluster_each, start_cluster_env, wait_for,
};

const PRODUCERS: usize = 4;

/// Leader of partition 0 of "hot" as `broker` sees it (0: none).
fn leader(broker: &weft_tests::Broker) -> u64 {
    let (status, body) = broker.http("GET", "/v1/topics/hot", None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["partition_details"][0]["leader_id"]
        .as_u64()
        .unwrap_or(0)
}

/// Creates the topic "hot" (one partition) through `brokers[0]` and waits up to `limit` for
/// its leader; returns the leader's node id.
async fn create_hot(brokers: &[weft_tests::Broker], limit: Duration) -> u64 {
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"hot","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    wait_for("a leader", limit, || {
        let l = leader(&brokers[0]);
        async move { (l != 0).then_some(l) }
    })
    .await
}

/// What one producer saw: acknowledged (value, offset, when), and failed sends.
struct Outcome {
    acked: Vec<(String, u64, Instant)>,
    failed: usize,
}

async fn produce(addresses: Vec<String>, id: usize, stop: Arc<AtomicBool>) -> Outcome {
    let client = Client::connect(addresses).await.expect("connect");
    let producer = client.producer(ProducerConfig {
        retries_max: 1000,
        retry_backoff: Duration::from_millis(50),
        ..ProducerConfig::default()
    });
    let mut pending = FuturesUnordered::new();
    let mut outcome = Outcome {
        acked: Vec::new(),
        failed: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let value = format!("p{id}-{i:06}");
        i += 1;
        let ack = producer
            .send_nowait("hot", Record::new(value.clone()).partition(0))
            .await
            .expect("queued");
        pending.push(async move { (value, ack.await) });
        // A bounded window: wait for the oldest answers once 64 are out.
        while pending.len() >= 64 {
            if let Some((value, result)) = pending.next().await {
                match result {
                    Ok(ack) => outcome.acked.push((value, ack.offset, Instant::now())),
                    _ => outcome.failed += 1,
                }
            }
        }
        if i.is_multiple_of(64) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    while let Some((value, result)) = pending.next().await {
        match result {
            Ok(ack) => outcome.acked.push((value, ack.offset, Instant::now())),
            _ => outcome.failed += 1,
        }
    }
    let _ = producer.close().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_four_producers_loses_and_repeats_nothing() {
    let mut brokers = start_cluster(3);
    let first_leader = create_hot(&brokers, Duration::from_secs(30)).await;
    let addresses: Vec<String> = brokers.iter().map(|b| b.client_addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|id| tokio::spawn(produce(addresses.clone(), id, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = (first_leader - 1) as usize;
    brokers[killed].kill9();
    let killed_at = Instant::now();
    let survivor = (killed + 1) % 3;
    let new_leader = wait_for("a new leader", Duration::from_secs(30), || {
        let l = leader(&brokers[survivor]);
        async move { (l != 0 && l != first_leader).then_some(l) }
    })
    .await;
    eprintln!("node {new_leader} leads after {:?}", killed_at.elapsed());
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for p in producers {
        outcomes.push(p.await.expect("producer"));
    }

    // Every producer had records acknowledged after the kill: they carried on.
    for (id, o) in outcomes.iter().enumerate() {
        let before = o.acked.iter().filter(|a| a.2 < killed_at).count();
        let after = o.acked.len() - before;
        eprintln!(
            "producer {id}: {before} acknowledged before the kill, {after} after, {} failed",
            o.failed
        );
        assert!(before > 0 && after > 0, "producer {id}: {before} / {after}");
    }
    let acked: BTreeMap<u64, String> = outcomes
        .iter()
        .flat_map(|o| o.acked.iter().map(|(v, off, _)| (*off, v.clone())))
        .collect();
    let acked_count: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    assert_eq!(
        acked.len(),
        acked_count,
        "two acknowledgements name one offset"
    );

    let address = brokers[survivor].client_addr.clone();
    let end = weft_tests::offsets(&address, "hot", 0, None)
        .await
        .expect("offsets")
        .high_watermark;
    let read = fetch_range(&address, "hot", 0, 0, end).await;
    assert_eq!(read.len() as u64, end, "offsets are dense");
    let mut seen = HashSet::new();
    for (i, (offset, value)) in read.iter().enumerate() {
        assert_eq!(*offset, i as u64, "offsets are dense");
        let value = String::from_utf8_lossy(value).into_owned();
        assert!(seen.insert(value.clone()), "{value} stored twice");
        if let Some(want) = acked.get(offset) {
            assert_eq!(
                &value, want,
                "offset {offset} holds what was acknowledged there"
            );
        }
    }
    for (offset, value) in &acked {
        assert!(
            *offset < end,
            "acknowledged {value} at {offset}, past the end {end}"
        );
    }
    eprintln!("{acked_count} acknowledged, {end} stored");
}

/// Regression: replicas whose Raft ticks share one phase (here forced by a test hook; in CI it
/// happened by chance, and the run waited 15 s for a leader) stood for election at the same
/// tick after their leader was killed (openraft's own timer), each voted for itself, and stood
/// together again three ticks later, election after election. Elections now start only from
/// the election watch, after a pre-vote, each replica at a delay of its own per term and
/// attempt, so one candidate stands alone and wins whatever the phase of the ticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_ticking_in_step_still_elect_a_leader_when_theirs_is_killed() {
    for round in 0..2 {
        let mut brokers = start_cluster_env(3, &[], &[("WEFT_TEST_TICK_PHASE_MS", "0")]);
        let first_leader = create_hot(&brokers, Duration::from_secs(30)).await;
        let killed = (first_leader - 1) as usize;
        brokers[killed].kill9();
        let killed_at = Instant::now();
        let survivor = (killed + 1) % 3;
        // Liveness, not speed: a leader within a generous deadline (about 4 s is usual; the
        // split votes went on for good).
        let new_leader = wait_for("a new leader", Duration::from_secs(20), || {
            let l = leader(&brokers[survivor]);
            async move { (l != 0 && l != first_leader).then_some(l) }
        })
        .await;
        eprintln!(
            "round {round}: node {new_leader} leads after {:?}",
            killed_at.elapsed()
        );
    }
}

/// A leader that goes silent without closing anything (SIGSTOP: no FIN, no RST, as when it is
/// cut off) is replaced as soon as its lease has run out: the followers' leader watch stands
/// one of them after the lease plus its own random half to one and a half ticks. openraft 0.9
/// alone waits the lease plus a whole random election timeout, checked on its tick. With a 4 s
/// election timeout (lease 5 s, ticks of 750 ms) the watch stands after 5.4-6.2 s of silence,
/// openraft's timer after at least 9 s: a new leader within 8.5 s of the pause, and a
/// survivor's counter of watch elections, show the watch at work. Without it, the new leader
/// came after 9.4-10 s (and the counter did not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_leader_is_replaced_once_its_lease_runs_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "raft_election_timeout_ms = 4000\n").expect("write the config");
    let config = config.to_str().expect("utf-8 path").to_string();
    let brokers = start_cluster_each(3, |_| vec!["--config".into(), config.clone()], &[]);
    let first_leader = create_hot(&brokers, Duration::from_secs(60)).await;
    let paused = (first_leader - 1) as usize;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != paused).collect();
    let before: f64 = survivors
        .iter()
        .map(|i| metric(&brokers[*i], "weft_raft_prompt_elections_total").unwrap_or(0.0))
        .sum();
    brokers[paused].pause();
    let paused_at = Instant::now();
    let new_leader = wait_for("a new leader", Duration::from_secs(60), || {
        let l = leader(&brokers[survivors[0]]);
        async move { (l != 0 && l != first_leader).then_some(l) }
    })
    .await;
    let waited = paused_at.elapsed();
    brokers[paused].resume();
    let after: f64 = survivors
        .iter()
        .map(|i| metric(&brokers[*i], "weft_raft_prompt_elections_total").unwrap_or(0.0))
        .sum();
    eprintln!("node {new_leader} leads {waited:?} after node {first_leader} was paused");
    assert!(
        after > before,
        "no survivor stood through the leader watch ({before} -> {after})"
    );
    assert!(
        waited < Duration::from_millis(8500),
        "the new leader came after {waited:?}: openraft's own timer, not the watch"
    );
}

/// Leader of every partition of `topic` as `broker` sees it (0: none).
fn leaders(broker: &weft_tests::Broker, topic: &str) -> Vec<u64> {
    let (status, body) = broker.http("GET", &format!("/v1/topics/{topic}"), None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["partition_details"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["leader_id"].as_u64().unwrap_or(0))
        .collect()
}

/// A partition `led` (each partition's leader) does not have led by `node`.
fn elsewhere(led: &[u64], node: u64) -> u32 {
    led.iter().position(|l| *l != node).expect("another leader") as u32
}

/// A producer's records for the partitions of a leader that hangs (SIGSTOP: connections stay
/// open, nothing is answered) are all answered within a few of the client's timeouts: when the
/// hung broker opens no publish stream within the timeout, the records queued behind the first
/// fail with it and are sent again once the client knows the new leaders. Before, each queued
/// request waited a whole timeout for a stream of its own, one after the other (helper-90).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_for_a_hung_leader_are_answered_within_a_few_timeouts() {
    const TIMEOUT: Duration = Duration::from_secs(4);
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"spread","partitions":12}"#),
    );
    assert_eq!(status, 201, "{body}");
    let led = wait_for(
        "a leader for every partition",
        Duration::from_secs(30),
        || {
            let led = leaders(&brokers[0], "spread");
            std::future::ready(led.iter().all(|l| *l != 0).then_some(led))
        },
    )
    .await;
    let hung = led[0];
    let others: Vec<&str> = brokers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != hung)
        .map(|(_, b)| b.client_addr.as_str())
        .collect();
    let client = Client::connect(others)
        .await
        .expect("connect")
        .with_timeout(TIMEOUT);
    let config = ProducerConfig {
        batch_records_max: 1,
        ..ProducerConfig::default()
    };
    // The client has a connection open to the broker about to hang (a first producer
    // published there); the producer that then sends has no publish stream there yet.
    let first = client.producer(config.clone());
    first
        .send("spread", Record::new("first").partition(0))
        .await
        .expect("stored");
    first.close().await.expect("close");
    let producer = client.producer(config);
    producer
        .send(
            "spread",
            Record::new("second").partition(elsewhere(&led, hung)),
        )
        .await
        .expect("stored");
    brokers[(hung - 1) as usize].pause();
    let theirs: Vec<u32> = (0..led.len() as u32)
        .filter(|p| led[*p as usize] == hung)
        .collect();
    let mut acks = Vec::new();
    for &p in &theirs {
        for i in 0..8 {
            acks.push(
                producer
                    .send_nowait("spread", Record::new(format!("r{i}")).partition(p))
                    .await
                    .expect("queued"),
            );
        }
    }
    let began = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), async {
        for ack in acks {
            let _ = ack.await;
        }
    })
    .await
    .expect("every record answered within 60 s");
    let took = began.elapsed();
    brokers[(hung - 1) as usize].resume();
    eprintln!(
        "{} records for {} partitions answered in {took:?}",
        theirs.len() * 8,
        theirs.len()
    );
    // A timeout for a stream that never opens (or two, if the records come back before the
    // client knows the new leader), then the records go to the new leader: well under 6
    // timeouts. Before, about 14 (one per request queued for the hung broker).
    assert!(
        took < 6 * TIMEOUT,
        "the records of {} partitions of the hung leader took {took:?}",
        theirs.len()
    );
}
