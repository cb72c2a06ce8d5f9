//! Where a producer sends a partition's publishes: straight to the partition's leader when the
//! cluster has said who leads it (`Cluster.ListPartitions`: its client address), else to the
//! brokers the client was given (which forward to the leader). The table is refreshed when a
//! topic is first used, in the background every [`REFRESH_EVERY`], and soon after a publish
//! fails; a stale entry costs a forward, never a wrong answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::Client;
use crate::stream::PublishLane;

/// How often a topic's leaders are asked again while it is used.
const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Soonest a topic's leaders are asked again after a failure.
const REFRESH_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// How long a leader address that failed a publish is not used (the partition's publishes go
/// to the brokers the client was given meanwhile, which forward them).
const AVOID_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// A leader address avoided at least this long is used again as soon as a refresh asked after
/// that names it as a leader and the broker answers a probe from this client (it came back and
/// leads again; earlier, the cluster may still name a broker that is gone, until it has
/// elected another leader).
const TRUST_REFRESH_AFTER: Duration = Duration::from_secs(5);
/// Deadline of that probe.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Tables {
    /// Client address of each partition's leader, by topic then partition.
    leaders: HashMap<Arc<str>, (Instant, HashMap<u32, String>)>,
    /// A client per leader address.
    clients: HashMap<String, Client>,
    /// A publish stream per topic and address ("" for the brokers the client was given).
    lanes: HashMap<(Arc<str>, String), PublishLane>,
    /// Leader addresses that failed a publish, and when.
    avoided: HashMap<String, Instant>,
    /// Client address of each broker seen leading a partition, by node id (to follow a
    /// broker's leader hint).
    nodes: HashMap<u64, String>,
    /// Each topic's partition count and record batch limit (`max_message_bytes`), as of the
    /// last refresh: a topic's partitions may grow, its limit change, or the topic be created
    /// again under its name.
    configs: HashMap<Arc<str>, (u32, usize)>,
}

impl Tables {
    /// Drops the publish streams and clients of addresses that lead nothing any more (a lane
    /// dropped here still finishes what was sent on it), and failures older than
    /// [`AVOID_AFTER_FAILURE`]: a long-lived producer in a cluster whose brokers come and go
    /// keeps only what it uses.
    fn forget_unused(&mut self) {
        let Tables {
            leaders,
            clients,
            lanes,
            avoided,
            ..
        } = self;
        let leads = |topic: &Arc<str>, address: &str| {
            leaders
                .get(topic)
                .is_some_and(|(_, l)| l.values().any(|a| a == address))
        };
        lanes.retain(|(topic, address), _| address.is_empty() || leads(topic, address));
        clients.retain(|address, _| {
            leaders
                .values()
                .any(|(_, l)| l.values().any(|a| a == address))
        });
        avoided.retain(|_, at| at.elapsed() < AVOID_AFTER_FAILURE);
    }
}

/// Whether a publish that failed with `error` may have gone to a broker that no longer leads
/// the partition, or is gone: no connection, no answer in time, a proxy's answer in front of
/// it (a 403 or a 502, translated by the transport), a status the HTTP/2 transport made up
/// (UNAVAILABLE, UNKNOWN, CANCELLED, INTERNAL without the broker's ErrorInfo reason), or the
/// broker's UNAVAILABLE, DEADLINE_EXCEEDED or NOT_FOUND. A broker's other refusals, with a
/// reason or without (RESOURCE_EXHAUSTED when it is busy or a request is too large, a refused
/// batch, its authentication layer's UNAUTHENTICATED), come from a leader that still leads.
/// Nor does a request that was not answered because its publish stream ended
/// (`STREAM_ENDED`): the request that ended it carries why.
fn leader_may_have_moved(error: &crate::Error) -> bool {
    match error {
        crate::Error::Connect { .. } | crate::Error::Timeout(_) => true,
        crate::Error::Status { message, .. }
            if message.starts_with(weft_proto::transport::PROXY_ANSWER_PREFIX) =>
        {
            true
        }
        crate::Error::Status { reason, .. } if reason == "STREAM_ENDED" => false,
        crate::Error::Status { code, reason, .. } if reason.is_empty() => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::Internal
        ),
        crate::Error::Status { code, .. } => matches!(
            code,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::NotFound
        ),
        crate::Error::InvalidArgument(_) | crate::Error::Closed => false,
    }
}

/// A producer's routing table (shared by its partitions' senders).
#[derive(Debug, Clone)]
pub(crate) struct Router {
    base: Client,
    /// Whether to go straight to leaders (false: always through the brokers given).
    to_leaders: bool,
    tables: Arc<RwLock<Tables>>,
    refreshing: Arc<Mutex<std::collections::HashSet<Arc<str>>>>,
}

impl Router {
    pub(crate) fn new(base: Client, to_leaders: bool) -> Router {
        Router {
            base,
            to_leaders,
            tables: Arc::default(),
            refreshing: Arc::default(),
        }
    }

    /// The client address of `topic`/`partition`'s leader, if known and not avoided.
    fn leader(&self, topic: &Arc<str>, partition: u32) -> Option<String> {
        if !self.to_leaders {
            return None;
        }
        let tables = self.tables.read().ok()?;
        let (_, leaders) = tables.leaders.get(topic)?;
        let address = leaders.get(&partition)?;
        let avoided = tables
            .avoided
            .get(address)
            .is_some_and(|at| at.elapsed() < AVOID_AFTER_FAILURE);
        (!avoided).then(|| address.clone())
    }

    /// The client that reaches `topic`/`partition`'s leader (the base client when unknown).
    /// Starts a background refresh when the topic's table is old.
    pub(crate) fn client(&self, topic: &Arc<str>, partition: u32) -> Client {
        self.refresh_if_older(topic, REFRESH_EVERY);
        self.client_at(self.leader(topic, partition))
    }

    /// The client of `address` (the base client for none).
    fn client_at(&self, address: Option<String>) -> Client {
        let Some(address) = address else {
            return self.base.clone();
        };
        if let Some(client) = self
            .tables
            .read()
            .ok()
            .and_then(|t| t.clients.get(&address).cloned())
        {
            return client;
        }
        match self.base.to_address(&address) {
            Ok(client) => {
                if let Ok(mut tables) = self.tables.write() {
                    tables.clients.insert(address, client.clone());
                }
                client
            }
            Err(_) => self.base.clone(),
        }
    }

    /// The publish stream of `topic` towards `partition`'s leader.
    pub(crate) fn lane(&self, topic: &Arc<str>, partition: u32) -> PublishLane {
        let address = self.leader(topic, partition).unwrap_or_default();
        self.refresh_if_older(topic, REFRESH_EVERY);
        if let Some(lane) = self
            .tables
            .read()
            .ok()
            .and_then(|t| t.lanes.get(&(topic.clone(), address.clone())).cloned())
        {
            return lane;
        }
        // The lane's key and its client name the same address (read once).
        let client = self.client_at((!address.is_empty()).then(|| address.clone()));
        let lane = PublishLane::start(client, topic.clone());
        if let Ok(mut tables) = self.tables.write() {
            tables
                .lanes
                .entry((topic.clone(), address))
                .or_insert(lane)
                .clone()
        } else {
            lane
        }
    }

    /// A publish to `topic`/`partition` failed with `error`. When the error says the leader
    /// may be gone or have moved (no connection, no answer in time, UNAVAILABLE), its address
    /// is avoided for a while (the retries go to the brokers the client was given) and the
    /// leaders are asked again. Other errors come from the leader itself, which still leads
    /// (RESOURCE_EXHAUSTED: it is busy; a refused batch): the retries keep going to it.
    /// Before, every error avoided the leader for 30 s, so a producer that met backpressure
    /// sent everything through another broker, one hop more, for that long.
    ///
    /// A broker that answered UNAVAILABLE naming the leader (its `leader_id` hint: it no
    /// longer leads the partition, say after a leadership transfer) is up: the partition's
    /// publishes go to the named leader at once when its address is known (else to the
    /// brokers given), and the broker is not avoided for the partitions it still leads.
    /// Before, the hint was ignored and the broker avoided for 30 s in every partition.
    pub(crate) fn failed(&self, topic: &Arc<str>, partition: u32, error: &crate::Error) {
        if !leader_may_have_moved(error) {
            return;
        }
        if let crate::Error::Status {
            code: tonic::Code::Unavailable,
            leader_id: Some(hint),
            ..
        } = error
            && self.to_leaders
        {
            if let Ok(mut tables) = self.tables.write() {
                let address = tables.nodes.get(hint).cloned();
                let named_now = self.leader_named(&tables, topic, partition);
                if let Some((_, leaders)) = tables.leaders.get_mut(topic) {
                    match address {
                        Some(address) if named_now.as_deref() != Some(address.as_str()) => {
                            leaders.insert(partition, address);
                        }
                        // The broker names the one that failed: not followed.
                        Some(_) => {}
                        None => {
                            leaders.remove(&partition);
                        }
                    }
                }
            }
            self.refresh_if_older(topic, REFRESH_AFTER_FAILURE);
            return;
        }
        if let Some(address) = self.leader(topic, partition)
            && let Ok(mut tables) = self.tables.write()
        {
            tables.avoided.insert(address, Instant::now());
        }
        self.refresh_if_older(topic, REFRESH_AFTER_FAILURE);
    }

    /// The address the table names for `topic`/`partition`'s leader, avoided or not.
    fn leader_named(&self, tables: &Tables, topic: &Arc<str>, partition: u32) -> Option<String> {
        tables
            .leaders
            .get(topic)
            .and_then(|(_, l)| l.get(&partition).cloned())
    }

    /// Takes in `topic`'s leaders as a refresh asked at `asked_at` found them: (partition,
    /// leader node id, its client address). Returns the avoided addresses to probe: avoided
    /// since at least [`TRUST_REFRESH_AFTER`] before the question, and named as a leader (the
    /// cluster says it leads; whether this client reaches it, a probe says).
    fn learn(
        &self,
        topic: &Arc<str>,
        found: Vec<(u32, u64, String)>,
        asked_at: Instant,
    ) -> Vec<String> {
        let Ok(mut tables) = self.tables.write() else {
            return Vec::new();
        };
        for (_, node, address) in &found {
            tables.nodes.insert(*node, address.clone());
        }
        let leaders: HashMap<u32, String> = found
            .into_iter()
            .map(|(partition, _, address)| (partition, address))
            .collect();
        let probe: Vec<String> = tables
            .avoided
            .iter()
            .filter(|(address, at)| {
                leaders.values().any(|a| a == *address)
                    && asked_at.saturating_duration_since(**at) >= TRUST_REFRESH_AFTER
            })
            .map(|(address, _)| address.clone())
            .collect();
        tables
            .leaders
            .insert(topic.clone(), (Instant::now(), leaders));
        tables.forget_unused();
        probe
    }

    /// Uses `address` again if it answers a WhoAmI within [`PROBE_DEADLINE`] and has not
    /// failed again since `asked_at`.
    async fn probe(&self, address: String, asked_at: Instant) {
        let client = self.client_at(Some(address.clone()));
        let answered = tokio::time::timeout(PROBE_DEADLINE, client.who_am_i())
            .await
            .is_ok_and(|r| r.is_ok());
        if answered && let Ok(mut tables) = self.tables.write() {
            tables
                .avoided
                .retain(|a, at| a != &address || *at > asked_at);
        }
    }

    /// Asks for `topic`'s leaders now and waits for the answer (a failure keeps the table).
    pub(crate) async fn refresh(&self, topic: &Arc<str>) {
        let asked_at = Instant::now();
        let Ok(metadata) = self.base.topic_metadata(topic).await else {
            // Keep what is known, and do not ask again at once.
            if let Ok(mut tables) = self.tables.write() {
                let entry = tables
                    .leaders
                    .entry(topic.clone())
                    .or_insert_with(|| (Instant::now(), HashMap::new()));
                entry.0 = Instant::now();
            }
            return;
        };
        if let Some(config) = &metadata.config
            && let Ok(mut tables) = self.tables.write()
        {
            tables.configs.insert(topic.clone(), topic_limits(config));
        }
        let found = metadata
            .partitions
            .into_iter()
            .filter(|p| p.leader_id != 0 && !p.leader_address.is_empty())
            .map(|p| (p.partition, p.leader_id, p.leader_address))
            .collect();
        for address in self.learn(topic, found, asked_at) {
            self.probe(address, asked_at).await;
        }
    }

    /// `topic`'s partition count and record batch limit as of the last refresh, if known.
    pub(crate) fn topic_config(&self, topic: &str) -> Option<(u32, usize)> {
        self.tables.read().ok()?.configs.get(topic).copied()
    }

    /// Refreshes `topic` in the background when its table is older than `age` (one refresh
    /// per topic at a time).
    fn refresh_if_older(&self, topic: &Arc<str>, age: Duration) {
        let fresh = self.tables.read().ok().is_some_and(|t| {
            t.leaders
                .get(topic)
                .is_some_and(|(at, _)| at.elapsed() < age)
        });
        if fresh {
            return;
        }
        let started = self
            .refreshing
            .lock()
            .is_ok_and(|mut r| r.insert(topic.clone()));
        if !started {
            return;
        }
        let (router, topic) = (self.clone(), topic.clone());
        tokio::spawn(async move {
            router.refresh(&topic).await;
            if let Ok(mut r) = router.refreshing.lock() {
                r.remove(&topic);
            }
        });
    }
}

/// A topic's partition count (at least 1) and record batch limit (`max_message_bytes`, 1 MiB
/// when unset), from its configuration.
pub(crate) fn topic_limits(config: &crate::proto::TopicConfig) -> (u32, usize) {
    (
        config.partitions.max(1),
        config
            .max_message_bytes
            .map_or(1024 * 1024, |b| usize::try_from(b).unwrap_or(usize::MAX)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lanes_and_clients_of_former_leaders_are_forgotten_on_refresh() {
        // Two addresses: a balanced channel, which connects only when used.
        let base = Client::connect(["127.0.0.1:1", "127.0.0.1:5"])
            .await
            .expect("client");
        let router = Router::new(base, true);
        let topic: Arc<str> = Arc::from("t");
        let other: Arc<str> = Arc::from("u");
        {
            let mut tables = router.tables.write().expect("lock");
            tables.leaders.insert(
                topic.clone(),
                (
                    Instant::now(),
                    HashMap::from([(0, "127.0.0.1:2".to_string())]),
                ),
            );
            tables.leaders.insert(
                other.clone(),
                (
                    Instant::now(),
                    HashMap::from([(0, "127.0.0.1:3".to_string())]),
                ),
            );
            tables
                .avoided
                .insert("gone".into(), Instant::now() - AVOID_AFTER_FAILURE * 2);
            tables.avoided.insert("recent".into(), Instant::now());
        }
        for t in [&topic, &other] {
            router.lane(t, 0);
            router.client(t, 0);
        }
        let _base_lane = router.lane(&topic, 7); // no known leader: the base lane ("")
        assert_eq!(router.tables.read().expect("lock").lanes.len(), 3);
        // Partition 0 of `t` moved to another broker.
        router.tables.write().expect("lock").leaders.insert(
            topic.clone(),
            (
                Instant::now(),
                HashMap::from([(0, "127.0.0.1:4".to_string())]),
            ),
        );
        router.tables.write().expect("lock").forget_unused();
        let tables = router.tables.read().expect("lock");
        let mut lanes: Vec<_> = tables
            .lanes
            .keys()
            .map(|(t, a)| format!("{t}@{a}"))
            .collect();
        lanes.sort();
        assert_eq!(lanes, ["t@", "u@127.0.0.1:3"]);
        let mut clients: Vec<_> = tables.clients.keys().cloned().collect();
        clients.sort();
        assert_eq!(clients, ["127.0.0.1:3"]);
        assert_eq!(tables.avoided.keys().collect::<Vec<_>>(), ["recent"]);
    }

    /// Only errors that say the leader may be gone or have moved turn the publishes away from
    /// it; a busy leader (RESOURCE_EXHAUSTED) or a refused batch keeps them.
    #[tokio::test]
    async fn only_a_leader_that_may_have_moved_is_avoided() {
        let base = Client::connect(["127.0.0.1:1", "127.0.0.1:5"])
            .await
            .expect("client");
        let router = Router::new(base, true);
        let topic: Arc<str> = Arc::from("t");
        router.tables.write().expect("lock").leaders.insert(
            topic.clone(),
            (
                Instant::now(),
                HashMap::from([(0, "127.0.0.1:2".to_string())]),
            ),
        );
        // The broker's answers carry an ErrorInfo reason.
        let status = |code, reason: &str| crate::Error::Status {
            code,
            message: String::new(),
            reason: reason.into(),
            leader_id: None,
        };
        for kept in [
            status(tonic::Code::ResourceExhausted, "OVERLOADED"),
            status(tonic::Code::InvalidArgument, "BATCH_TOO_LARGE"),
            status(tonic::Code::FailedPrecondition, "SEQUENCE_GAP"),
            status(tonic::Code::PermissionDenied, "PERMISSION_DENIED"),
        ] {
            router.failed(&topic, 0, &kept);
            assert_eq!(
                router.leader(&topic, 0).as_deref(),
                Some("127.0.0.1:2"),
                "{kept}"
            );
        }
        router.failed(&topic, 0, &status(tonic::Code::Unavailable, "UNAVAILABLE"));
        assert_eq!(router.leader(&topic, 0), None);
        // The broker's own refusals without a reason (a request over the size limit, its
        // authentication layer) and requests left unanswered when a stream ended keep it.
        router.tables.write().expect("lock").avoided.clear();
        for kept in [
            status(tonic::Code::ResourceExhausted, ""),
            status(tonic::Code::Unauthenticated, ""),
            status(tonic::Code::Unavailable, "STREAM_ENDED"),
        ] {
            router.failed(&topic, 0, &kept);
            assert!(router.leader(&topic, 0).is_some(), "{kept}");
        }
        // A proxy's 403 in front of the leader, as the transport translates it.
        let proxy = tonic::Status::new(
            weft_proto::transport::code_for_http_status(403),
            format!(
                "{} HTTP 403 Forbidden (server: envoy) with no content type",
                weft_proto::transport::PROXY_ANSWER_PREFIX
            ),
        );
        router.failed(&topic, 0, &crate::Error::from(proxy));
        assert_eq!(router.leader(&topic, 0), None);
        // A transport failure without a reason.
        router.tables.write().expect("lock").avoided.clear();
        router.failed(&topic, 0, &status(tonic::Code::Internal, ""));
        assert_eq!(router.leader(&topic, 0), None);
    }

    /// A broker that answers UNAVAILABLE naming the partition's leader (it no longer leads
    /// it) is up: the partition's publishes go to the named leader at once, and the broker
    /// keeps the publishes of the partitions it still leads. Before, the hint was ignored: the
    /// broker was avoided for 30 s in every partition, whose publishes all went through the
    /// brokers given (one hop more).
    #[tokio::test]
    async fn a_leader_hint_moves_the_partition_and_keeps_the_broker() {
        let base = Client::connect(["127.0.0.1:1", "127.0.0.1:5"])
            .await
            .expect("client");
        let router = Router::new(base, true);
        let topic: Arc<str> = Arc::from("t");
        router.learn(
            &topic,
            vec![
                (0, 1, "127.0.0.1:11".into()),
                (1, 1, "127.0.0.1:11".into()),
                (2, 2, "127.0.0.1:12".into()),
            ],
            Instant::now(),
        );
        let moved = crate::Error::Status {
            code: tonic::Code::Unavailable,
            message: "not the leader".into(),
            reason: "UNAVAILABLE".into(),
            leader_id: Some(2),
        };
        router.failed(&topic, 0, &moved);
        assert_eq!(router.leader(&topic, 0).as_deref(), Some("127.0.0.1:12"));
        assert_eq!(
            router.leader(&topic, 1).as_deref(),
            Some("127.0.0.1:11"),
            "the broker that answered still leads partition 1"
        );
        // A hint naming a broker whose address is not known: through the brokers given.
        let unknown = crate::Error::Status {
            code: tonic::Code::Unavailable,
            message: "not the leader".into(),
            reason: "UNAVAILABLE".into(),
            leader_id: Some(9),
        };
        router.failed(&topic, 1, &unknown);
        assert_eq!(router.leader(&topic, 1), None);
        assert_eq!(router.leader(&topic, 2).as_deref(), Some("127.0.0.1:12"));
        // The hint travels in the status's ErrorInfo.
        let mut details = tonic_types::ErrorDetails::new();
        details.set_error_info(
            "UNAVAILABLE",
            "weft.dev",
            HashMap::from([("leader_id".to_string(), "3".to_string())]),
        );
        let status = <tonic::Status as tonic_types::StatusExt>::with_error_details(
            tonic::Code::Unavailable,
            "not the leader",
            details,
        );
        match crate::Error::from(status) {
            crate::Error::Status { leader_id, .. } => assert_eq!(leader_id, Some(3)),
            other => panic!("{other:?}"),
        }
    }

    /// A broker avoided after a failure is probed once a refresh asked at least
    /// [`TRUST_REFRESH_AFTER`] later names it as a leader (it came back, and leads again), and
    /// used again if it answers. Before, it stayed avoided for 30 s whatever the cluster said,
    /// and its partitions' publishes went through the brokers given.
    #[tokio::test]
    async fn a_broker_named_leader_by_a_later_refresh_is_used_again() {
        let base = Client::connect(["127.0.0.1:1", "127.0.0.1:5"])
            .await
            .expect("client");
        let router = Router::new(base, true);
        let topic: Arc<str> = Arc::from("t");
        let now = Instant::now();
        {
            let mut tables = router.tables.write().expect("lock");
            tables
                .avoided
                .insert("127.0.0.1:11".into(), now - TRUST_REFRESH_AFTER * 2);
            tables.avoided.insert("127.0.0.1:12".into(), now);
        }
        let probe = router.learn(
            &topic,
            vec![(0, 1, "127.0.0.1:11".into()), (1, 2, "127.0.0.1:12".into())],
            now,
        );
        assert_eq!(
            probe,
            ["127.0.0.1:11"],
            "a refresh right after the failure may still name a broker that is gone"
        );
        // A broker that does not answer stays avoided.
        router.probe("127.0.0.1:11".into(), now).await;
        assert_eq!(router.leader(&topic, 0), None);
    }
}
