//! Prometheus metrics (`weft_` prefix, base units). RPC counters and latencies are recorded by the
//! handlers; partition and group gauges are refreshed when `/metrics` is scraped.
//!
//! Where a publish's time goes, stage by stage (histograms, seconds): `weft_publish_queue_seconds`
//! (waiting in the partition's queue), `weft_publish_coalesce_seconds` (accepted, waiting for a
//! Raft entry to carry it), `weft_publish_commit_seconds` (proposed until applied: Raft append,
//! the flusher's write and fdatasync, apply), inside which the flusher reports
//! `weft_flush_write_seconds` and `weft_flush_sync_seconds` per round; `weft_entry_batches`
//! counts publishes per entry; `weft_delivery_seconds` is the time from a record's commit to its
//! delivery on a Subscribe stream; `weft_rpc_duration_seconds` is each call as the server saw it.

use std::sync::OnceLock;
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::node::Node;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("weft_entry_batches".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (tests): render an empty registry.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Records one RPC: a counter by method and status code, and its latency.
pub fn rpc<T>(method: &'static str, started: Instant, result: &Result<T, tonic::Status>) {
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    metrics::counter!("weft_rpc_requests_total", "method" => method, "code" => format!("{code:?}"))
        .increment(1);
    metrics::histogram!("weft_rpc_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
}

/// Counts records and bytes published.
pub fn published(topic: &str, records: u64, bytes: u64) {
    metrics::counter!("weft_published_records_total", "topic" => topic.to_string())
        .increment(records);
    metrics::counter!("weft_published_bytes_total", "topic" => topic.to_string()).increment(bytes);
}

/// Records what a partition re-applied when it opened (from its snapshot to the log's end).
pub fn replayed(topic: &str, partition: u32, entries: u64, bytes: u64) {
    let labels = [
        ("topic", topic.to_string()),
        ("partition", partition.to_string()),
    ];
    metrics::gauge!("weft_partition_replayed_entries", &labels).set(entries as f64);
    metrics::gauge!("weft_partition_replayed_bytes", &labels).set(bytes as f64);
}

/// Refreshes the gauges of every hosted partition and group, then renders the text format.
pub fn render(node: &Node) -> String {
    // 1 while this broker withholds votes: its data directory was empty at a start in a
    // cluster and it has not settled yet (new, or caught up after losing its data).
    let voting = match node.peers().recovery() {
        crate::raft::Recovery::Normal => "normal",
        crate::raft::Recovery::Undecided => "undecided",
        crate::raft::Recovery::Rejoining => "rejoining",
    };
    for mode in ["normal", "undecided", "rejoining"] {
        metrics::gauge!("weft_voting_mode", "mode" => mode).set(if mode == voting {
            1.0
        } else {
            0.0
        });
    }
    for ((topic, partition), phase) in node.hosted() {
        for state in ["opening", "replaying", "ready", "down"] {
            let labels = [
                ("topic", topic.clone()),
                ("partition", partition.to_string()),
                ("state", state.to_string()),
            ];
            let value = if phase.name() == state { 1.0 } else { 0.0 };
            metrics::gauge!("weft_partition_state", &labels).set(value);
        }
    }
    let mut under_replicated = 0u64;
    for partition in node.partitions() {
        let bounds = partition.bounds();
        let labels = [
            ("topic", partition.topic.clone()),
            ("partition", partition.partition.to_string()),
        ];
        metrics::gauge!("weft_partition_log_end_offset", &labels).set(bounds.log_end as f64);
        metrics::gauge!("weft_partition_high_watermark", &labels).set(bounds.high_watermark as f64);
        metrics::gauge!("weft_partition_log_start_offset", &labels).set(bounds.log_start as f64);
        metrics::gauge!("weft_partition_size_bytes", &labels).set(bounds.size_bytes as f64);
        metrics::gauge!("weft_partition_damaged_ranges", &labels)
            .set(partition.damage().len() as f64);
        metrics::gauge!("weft_partition_producers", &labels)
            .set(partition.group().state().producers.len() as f64);
        let status = partition.group().status();
        metrics::gauge!("weft_partition_leader_id", &labels).set(status.leader.unwrap_or(0) as f64);
        metrics::gauge!("weft_partition_term", &labels).set(status.term as f64);
        if let Some(applied) = status.last_applied_index {
            metrics::gauge!("weft_partition_applied_index", &labels).set(applied as f64);
        }
        if let Some(saved) = partition.group().reader().committed_saved_index() {
            metrics::gauge!("weft_partition_committed_saved_index", &labels).set(saved as f64);
        }
        // On the leader: how far each replica is behind, and whether any is.
        let lag = partition.group().follower_lag();
        for replica in &lag {
            let labels = [
                ("topic", partition.topic.clone()),
                ("partition", partition.partition.to_string()),
                ("replica", replica.node.to_string()),
            ];
            metrics::gauge!("weft_partition_replica_lag_entries", &labels)
                .set(replica.entries as f64);
            metrics::gauge!("weft_partition_replica_lag_bytes", &labels).set(replica.bytes as f64);
        }
        if partition.group().is_leader() {
            let behind = lag.iter().filter(|l| l.entries > 0).count();
            metrics::gauge!("weft_partition_replicas_behind", &labels).set(behind as f64);
        }
        let under = node
            .topic(&partition.topic)
            .ok()
            .and_then(|t| {
                t.partitions.get(partition.partition as usize).map(|p| {
                    crate::grpc::cluster::partition_info(
                        node,
                        &t.name,
                        t.config.replication_factor,
                        p,
                    )
                })
            })
            .is_some_and(|info| info.under_replicated);
        if partition.group().is_leader() {
            metrics::gauge!("weft_partition_under_replicated", &labels).set(if under {
                1.0
            } else {
                0.0
            });
            if under {
                under_replicated += 1;
            }
        }
    }
    // Partitions led here with fewer replicas, or fewer in sync, than they should have.
    metrics::gauge!("weft_under_replicated_partitions").set(under_replicated as f64);
    // Partitions hosted here that serve but know no leader right now.
    let leaderless = node
        .partitions()
        .iter()
        .filter(|p| p.group().status().leader.is_none())
        .count();
    metrics::gauge!("weft_partitions_leaderless").set(leaderless as f64);
    let leading = node
        .partitions()
        .iter()
        .filter(|p| p.group().is_leader())
        .count();
    metrics::gauge!("weft_partitions_led").set(leading as f64);
    if let Ok(groups) = node.groups.list() {
        for group in groups {
            let Ok(description) = crate::grpc::subscribe::describe_group(node, &group) else {
                continue;
            };
            for p in &description.partitions {
                // Only where this broker knows the high watermark (a replica here): a series of
                // lag 0 for a partition it cannot see would be wrong, its absence is not.
                if node.partition(&p.topic, p.partition).is_err() {
                    continue;
                }
                let labels = [
                    ("group", group.clone()),
                    ("topic", p.topic.clone()),
                    ("partition", p.partition.to_string()),
                ];
                metrics::gauge!("weft_group_lag_records", &labels).set(p.lag as f64);
                metrics::gauge!("weft_group_committed_offset", &labels)
                    .set(p.committed_offset as f64);
            }
        }
    }
    metrics::gauge!("weft_uptime_seconds").set(node.uptime().as_secs_f64());
    install().render()
}
