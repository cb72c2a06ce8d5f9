//! The producer: records are grouped per partition into batches (closed by size, record count or
//! linger), and each partition's batches are sent in order by a sender task that keeps a bounded
//! window of publishes in flight. A partition with nothing in flight gets its open batch at once
//! (natural batching): linger only holds records back while earlier publishes are outstanding, so
//! a lightly loaded producer adds no delay and a busy one still sends full batches. Every batch
//! carries this producer's id, epoch and sequence, so a retry of a batch whose first attempt was
//! stored is answered with the original offsets instead of storing it again. On a failure the sender waits for the window to drain and resends, in
//! sequence order, everything not acknowledged.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::{Notify, Semaphore, oneshot};

use crate::router::Router;
use crate::stream::PublishLane;
use crate::{Client, Error, Record, Result, proto};

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Close a batch at this many bytes (and always within the topic's `max_message_bytes`).
    pub batch_bytes_max: usize,
    /// Close a batch at this many records.
    pub batch_records_max: usize,
    /// Close a batch this long after its first record, if it has not gone already (a partition
    /// with no publish in flight sends its batch at once).
    pub linger: Duration,
    /// Publishes in flight per partition, at most [`IN_FLIGHT_PER_PARTITION_MAX`] (the batches a
    /// partition remembers per producer to answer retries; a larger value is lowered to it).
    pub in_flight_per_partition: usize,
    /// A partition with fewer publishes than this in flight sends its open batch as soon as its
    /// sender task runs (with every record given by then), without lingering (default 2). 1 sends at once
    /// only when nothing is in flight (larger batches, a linger's wait more often); higher values
    /// mean smaller batches and less waiting. Records wait for the linger only while this many
    /// of their partition's publishes are outstanding. At most `in_flight_per_partition`.
    pub eager_in_flight: usize,
    /// Records given to the producer and not yet answered, over all partitions, before `send`
    /// and `send_nowait` wait for room.
    pub queue_records_max: usize,
    /// Bytes of records given to the producer and not yet answered, over all partitions, before
    /// `send` and `send_nowait` wait for room (default 64 MiB; Kafka's `buffer.memory` is the
    /// same idea). A record larger than this waits until nothing else is unanswered.
    pub queue_bytes_max: usize,
    /// Attempts per batch before its records fail.
    pub retries_max: u32,
    /// Wait before the second attempt; each later one waits that much longer, up to ten times
    /// it (100 ms, 200 ms, ... 1 s by default: the 20 attempts then span about 15 s, more than
    /// a partition leader's replacement after a crash).
    pub retry_backoff: Duration,
    /// Use a producer id and sequences so retries never duplicate (default true).
    pub idempotent: bool,
    /// How batches travel to the broker (default: one stream per topic).
    pub transport: PublishTransport,
    /// A partition that gets no record for this long gives up its sender task and batching
    /// state (its producer sequence numbers are kept: a few bytes), so a long-lived producer
    /// that has written to many topics and partitions does not keep a task for each. The next
    /// record for it starts a sender again, continuing the sequence.
    pub partition_idle_timeout: Duration,
    /// Send each partition's batches straight to its leader, learnt from the cluster's
    /// metadata (default true). False: every batch goes to the brokers the client was given,
    /// which forward it to the leader; for clients that reach the cluster through one address
    /// only (a Kubernetes Service, an ingress or a mesh's virtual IP) and cannot reach brokers
    /// one by one.
    pub to_leaders: bool,
}

/// How a producer's batches travel to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PublishTransport {
    /// One `PublishStream` per topic carries every partition's batches (no call set-up per
    /// batch; the broker answers each as soon as it is stored).
    #[default]
    Stream,
    /// One unary `Publish` call per batch (a service mesh then sees, and can route and measure,
    /// every batch as its own call).
    Unary,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            batch_bytes_max: 1024 * 1024,
            batch_records_max: 10_000,
            linger: Duration::from_millis(5),
            in_flight_per_partition: 4,
            eager_in_flight: 2,
            queue_records_max: 100_000,
            queue_bytes_max: 64 * 1024 * 1024,
            retries_max: 20,
            retry_backoff: Duration::from_millis(100),
            idempotent: true,
            transport: PublishTransport::default(),
            partition_idle_timeout: Duration::from_secs(60),
            to_leaders: true,
        }
    }
}

/// Where a record was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Topic (shared by every acknowledgement of a batch).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// True when a retry found the record already stored.
    pub duplicate: bool,
}

pub use weft_proto::{murmur2, partition_for_key};

/// Most publishes a producer keeps in flight per partition: a partition remembers this many
/// batches per producer, so a retry of any batch in flight is recognised as a duplicate.
pub const IN_FLIGHT_PER_PARTITION_MAX: usize = 5;

/// Room left in a batch for its header and per-record framing beyond what `Record::size` counts.
const BATCH_OVERHEAD_BYTES: usize = 1024;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The answer to one batch, shared by the acknowledgements of all its records: one allocation
/// and one lock per batch, where a channel per record would take one of each per record.
#[derive(Debug)]
struct Outcome {
    topic: Arc<str>,
    partition: u32,
    state: Mutex<OutcomeState>,
}

#[derive(Debug)]
enum OutcomeState {
    /// Not answered yet: the wakers of the acknowledgements being awaited.
    Waiting(Vec<Waker>),
    /// Stored from this base offset (and whether as a duplicate of an earlier attempt), or failed.
    Done(std::result::Result<(u64, bool), Error>),
}

impl Outcome {
    /// Answers the batch once (a later answer is ignored) and wakes whoever awaits it.
    fn settle(&self, result: std::result::Result<(u64, bool), Error>) {
        let waiting = {
            let mut state = lock(&self.state);
            let OutcomeState::Waiting(wakers) = &mut *state else {
                return;
            };
            let wakers = std::mem::take(wakers);
            *state = OutcomeState::Done(result);
            wakers
        };
        for waker in waiting {
            waker.wake();
        }
    }
}

/// The acknowledgement of one record given to [`Producer::send_nowait`]: resolves once the
/// record's batch is answered, to where the record was stored or why it was not
/// ([`Error::Closed`] if the producer stopped before it could be sent).
#[derive(Debug)]
#[must_use = "an acknowledgement tells whether the record was stored only when awaited"]
pub struct AckFuture {
    outcome: Arc<Outcome>,
    /// The record's place in its batch.
    index: u64,
    /// Where this future's waker sits in the outcome's list, once registered.
    waker: Option<usize>,
}

impl Future for AckFuture {
    type Output = Result<Ack>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Ack>> {
        let this = &mut *self;
        let mut state = lock(&this.outcome.state);
        match &mut *state {
            OutcomeState::Done(Ok((base_offset, duplicate))) => {
                Poll::Ready(match base_offset.checked_add(this.index) {
                    Some(offset) => Ok(Ack {
                        topic: this.outcome.topic.clone(),
                        partition: this.outcome.partition,
                        offset,
                        duplicate: *duplicate,
                    }),
                    // Only a broken answer: offsets end far below.
                    None => Err(Error::Status {
                        code: tonic::Code::Internal,
                        message: format!(
                            "the broker answered a base offset of {base_offset}, past the \
                             last offset there can be"
                        ),
                        reason: String::new(),
                        leader_id: None,
                    }),
                })
            }
            OutcomeState::Done(Err(error)) => Poll::Ready(Err(error.clone())),
            OutcomeState::Waiting(wakers) => {
                match this.waker {
                    Some(i) if i < wakers.len() => {
                        if !wakers[i].will_wake(cx.waker()) {
                            wakers[i] = cx.waker().clone();
                        }
                    }
                    _ => {
                        this.waker = Some(wakers.len());
                        wakers.push(cx.waker().clone());
                    }
                }
                Poll::Pending
            }
        }
    }
}

/// Records of one partition sent together, with their shared answer. Answered exactly once:
/// a batch dropped unanswered (the producer's tasks stopped) fails its records with
/// [`Error::Closed`]. Each record holds a unit of the producer's room until then.
#[derive(Debug)]
struct Batch {
    records: Vec<Record>,
    outcome: Arc<Outcome>,
    room: Arc<Semaphore>,
    /// The producer's room in bytes, and how much of it the records hold.
    room_bytes: Arc<Semaphore>,
    bytes_held: usize,
    answered: bool,
}

impl Batch {
    fn new(
        topic: Arc<str>,
        partition: u32,
        room: Arc<Semaphore>,
        room_bytes: Arc<Semaphore>,
    ) -> Batch {
        Batch {
            room_bytes,
            bytes_held: 0,
            records: Vec::new(),
            outcome: Arc::new(Outcome {
                topic,
                partition,
                state: Mutex::new(OutcomeState::Waiting(Vec::new())),
            }),
            room,
            answered: false,
        }
    }

    /// The acknowledgement of the record added next.
    fn push(&mut self, record: Record) -> AckFuture {
        let ack = AckFuture {
            outcome: self.outcome.clone(),
            index: self.records.len() as u64,
            waker: None,
        };
        self.records.push(record);
        ack
    }

    fn answer(&mut self, result: std::result::Result<(u64, bool), Error>) {
        if !self.answered {
            self.answered = true;
            self.outcome.settle(result);
            self.room.add_permits(self.records.len());
            self.room_bytes.add_permits(self.bytes_held);
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.answer(Err(Error::Closed));
    }
}

/// The batch a partition is filling.
struct Open {
    batch: Batch,
    bytes: usize,
    opened: Instant,
}

enum ToSender {
    Batch(Batch),
    Flush(oneshot::Sender<()>),
}

/// One partition's place in the producer: the batch being filled, the closed batches (and
/// flush marks) its sender has still to take, in order, and how many it has in flight.
struct Lane {
    open: Option<Open>,
    ready: VecDeque<ToSender>,
    /// Publishes the sender has taken and not yet answered.
    outstanding: usize,
    wake: Arc<Notify>,
}

/// What the callers of `send_nowait` and the partitions' senders share, under one lock taken
/// once per record (the caller places its record itself: no queue and no task in between).
struct State {
    /// Per topic: partition count and the topic's largest batch.
    topics: HashMap<Arc<str>, (u32, usize)>,
    /// When `topics` last took what the router's refreshes learned.
    topics_checked: Instant,
    /// Where a topic's keyless records without a partition go now (sticky partitioner).
    sticky: HashMap<Arc<str>, u32>,
    lanes: HashMap<(Arc<str>, u32), Lane>,
    /// Epoch and next sequence of partitions whose lane was dropped for idleness: the lane's
    /// next sender continues from them (a sequence restarting at 0 would be answered as a
    /// duplicate of the partition's first batch).
    resumes: HashMap<(Arc<str>, u32), (u32, u64)>,
    /// Set when the producer is dropped: senders send what is left and stop.
    closed: bool,
}

struct Shared {
    client: Client,
    config: ProducerConfig,
    producer_id: u64,
    /// Where each partition's batches go: its leader when known (over a stream per topic and
    /// broker, with transport Stream).
    router: Router,
    /// A partition with fewer publishes than this in flight takes its open batch at once.
    eager: usize,
    /// Records given to the producer and not yet answered, at most `queue_records_max`.
    room: Arc<Semaphore>,
    /// Their bytes, at most `queue_bytes_max`.
    room_bytes: Arc<Semaphore>,
    state: Mutex<State>,
}

impl Shared {
    fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        for lane in state.lanes.values() {
            lane.wake.notify_one();
        }
    }
}

/// Publishes records with batching and idempotent retries. Cheap to share behind an `Arc`.
pub struct Producer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("producer_id", &self.shared.producer_id)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // Records already given are still sent; the senders stop once they are answered.
        self.shared.close();
    }
}

impl Producer {
    pub(crate) fn new(client: Client, mut config: ProducerConfig) -> Producer {
        if config.in_flight_per_partition > IN_FLIGHT_PER_PARTITION_MAX {
            tracing::warn!(
                asked = config.in_flight_per_partition,
                max = IN_FLIGHT_PER_PARTITION_MAX,
                "in_flight_per_partition lowered to what partitions remember per producer"
            );
            config.in_flight_per_partition = IN_FLIGHT_PER_PARTITION_MAX;
        }
        config.in_flight_per_partition = config.in_flight_per_partition.max(1);
        let producer_id = if config.idempotent {
            rand::random::<u64>() | 1
        } else {
            0
        };
        let router = Router::new(client.clone(), config.to_leaders && !client.is_quic());
        let eager = config
            .eager_in_flight
            .clamp(1, config.in_flight_per_partition);
        let room = Arc::new(Semaphore::new(
            config.queue_records_max.clamp(1, Semaphore::MAX_PERMITS),
        ));
        config.queue_bytes_max = config
            .queue_bytes_max
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let room_bytes = Arc::new(Semaphore::new(config.queue_bytes_max));
        let shared = Arc::new(Shared {
            client,
            config,
            producer_id,
            router,
            eager,
            room,
            room_bytes,
            state: Mutex::new(State {
                topics: HashMap::new(),
                topics_checked: Instant::now(),
                sticky: HashMap::new(),
                lanes: HashMap::new(),
                resumes: HashMap::new(),
                closed: false,
            }),
        });
        tokio::spawn(linger(Arc::downgrade(&shared)));
        Producer { shared }
    }

    /// Gives a record to the producer (waiting while `queue_records_max` records, or
    /// `queue_bytes_max` bytes of them, are unanswered) and returns its acknowledgement, to
    /// await later: one caller can keep many records in flight. Fails at once if the topic is
    /// unknown.
    pub async fn send_nowait(&self, topic: &str, record: Record) -> Result<AckFuture> {
        let mut record = record;
        if weft_proto::otel::enabled() {
            trace_creation(topic, &mut record);
        }
        // The record's unit of room is kept from here only once the record is in a batch (which
        // returns it when answered): a call that fails or is cancelled before gives it back.
        let room = self
            .shared
            .room
            .acquire()
            .await
            .map_err(|_| Error::Closed)?;
        // (At most the whole room: a larger record waits until nothing else is unanswered.)
        let size = record.size();
        let units = size.clamp(1, self.shared.config.queue_bytes_max);
        let room_bytes = self
            .shared
            .room_bytes
            .acquire_many(u32::try_from(units).unwrap_or(u32::MAX))
            .await
            .map_err(|_| Error::Closed)?;
        let ack = self.place(topic, record, size, units).await?;
        room.forget();
        room_bytes.forget();
        Ok(ack)
    }

    /// Publishes a record and waits until it is stored.
    pub async fn send(&self, topic: &str, record: Record) -> Result<Ack> {
        self.send_nowait(topic, record).await?.await
    }

    /// Puts the record into its partition's open batch; closes the batch when it is full, and
    /// wakes the partition's sender when it has a batch to take.
    async fn place(
        &self,
        topic: &str,
        record: Record,
        size: usize,
        units: usize,
    ) -> Result<AckFuture> {
        let shared = &self.shared;
        // A publish larger than a gRPC message may be fails in the transport with nothing but
        // "h2 protocol error": refuse such a record here, by name, before it takes a sequence.
        // (`size` is `record.size()`, worked out once by the caller.)
        let carried = shared
            .client
            .message_bytes_max
            .saturating_sub(topic.len() + BATCH_OVERHEAD_BYTES);
        if size > carried {
            return Err(Error::InvalidArgument(format!(
                "a record of {size} bytes is larger than one publish can carry ({carried} bytes: \
                 the client's gRPC message limit of {} bytes, the default of the broker's \
                 grpc_message_bytes_max too)",
                shared.client.message_bytes_max
            )));
        }
        let known = lock(&shared.state).topics.contains_key(topic);
        if !known {
            // A read, asked again while the broker cannot answer yet (UNAVAILABLE: its copy of
            // the cluster's metadata is not current, it has not registered): the record has
            // taken no sequence yet.
            let mut attempt = 0;
            let metadata = loop {
                match shared.client.topic_metadata(topic).await {
                    Ok(metadata) => break metadata,
                    Err(e) if e.is_retriable() && attempt + 1 < shared.config.retries_max => {
                        attempt += 1;
                        tokio::time::sleep(retry_delay(shared.config.retry_backoff, attempt)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let config = metadata.config.unwrap_or_default();
            let name: Arc<str> = Arc::from(topic);
            lock(&shared.state)
                .topics
                .insert(name.clone(), crate::router::topic_limits(&config));
            // Learn the leaders before the first batch goes out.
            shared.router.refresh(&name).await;
        }
        let config = &shared.config;
        let mut state = lock(&shared.state);
        let State {
            topics,
            topics_checked,
            sticky,
            lanes,
            closed,
            ..
        } = &mut *state;
        if *closed {
            return Err(Error::Closed);
        }
        // The router refreshes a topic's metadata as it routes (every few seconds): its
        // partition count and batch limit as of then, taken here once a second. Before, the
        // first ones stayed for the producer's life: a topic grown from 2 to 4 partitions kept
        // its keys hashed over 2 by this producer and over 4 by any other (a key's records in
        // two partitions).
        if topics_checked.elapsed() >= TOPICS_CHECK_EVERY {
            *topics_checked = Instant::now();
            for (name, cached) in topics.iter_mut() {
                if let Some(current) = shared.router.topic_config(name) {
                    *cached = current;
                }
            }
        }
        let Some((topic, &(partitions, topic_bytes_max))) = topics.get_key_value(topic) else {
            // Topics are never forgotten; this is unreachable, and harmless if not.
            return Err(Error::Closed);
        };
        let partition = match record.partition {
            Some(p) => p,
            None if !record.key.is_empty() => partition_for_key(&record.key, partitions),
            // (Within the partitions the topic has now: it may have been created again with
            // fewer.)
            None => {
                let p = sticky
                    .entry(topic.clone())
                    .or_insert_with(|| rand::random::<u32>() % partitions);
                *p %= partitions;
                *p
            }
        };
        let key = (topic.clone(), partition);
        let lane = lanes.entry(key).or_insert_with_key(|key| {
            let wake = Arc::new(Notify::new());
            tokio::spawn(send_partition(
                shared.clone(),
                key.0.clone(),
                key.1,
                wake.clone(),
            ));
            Lane {
                open: None,
                ready: VecDeque::new(),
                outstanding: 0,
                wake,
            }
        });
        // Keyless records move to another partition once a batch is full (sticky partitioner).
        let mut next_sticky = || {
            if let Some(p) = sticky.get_mut(topic) {
                *p = (*p + 1) % partitions;
            }
        };
        // A batch never grows past the producer's limit nor the topic's (with room for the
        // batch header): close it before a record would overflow it.
        let limit = config
            .batch_bytes_max
            .min(topic_bytes_max.saturating_sub(BATCH_OVERHEAD_BYTES))
            .min(carried)
            .max(1);
        let mut wake = false;
        if lane
            .open
            .as_ref()
            .is_some_and(|o| !o.batch.records.is_empty() && o.bytes + size > limit)
            && let Some(full) = lane.open.take()
        {
            lane.ready.push_back(ToSender::Batch(full.batch));
            wake = true;
            next_sticky();
        }
        let fresh = lane.open.is_none();
        let open = lane.open.get_or_insert_with(|| Open {
            batch: Batch::new(
                topic.clone(),
                partition,
                shared.room.clone(),
                shared.room_bytes.clone(),
            ),
            bytes: 0,
            opened: Instant::now(),
        });
        let ack = open.batch.push(record);
        open.batch.bytes_held += units;
        open.bytes += size;
        if open.bytes >= limit || open.batch.records.len() >= config.batch_records_max {
            if let Some(full) = lane.open.take() {
                lane.ready.push_back(ToSender::Batch(full.batch));
            }
            wake = true;
            next_sticky();
        } else if fresh && lane.outstanding < shared.eager {
            // Natural batching: a partition with few publishes in flight takes its open batch
            // as soon as its sender runs, with whatever records have joined it by then.
            wake = true;
        }
        if wake {
            lane.wake.notify_one();
        }
        Ok(ack)
    }

    /// Sends every record given so far now and waits until they are all answered (records other
    /// tasks give meanwhile do not hold it up).
    pub async fn flush(&self) -> Result<()> {
        let waits: Vec<oneshot::Receiver<()>> = {
            let mut state = lock(&self.shared.state);
            state
                .lanes
                .values_mut()
                .map(|lane| {
                    if let Some(open) = lane.open.take() {
                        lane.ready.push_back(ToSender::Batch(open.batch));
                    }
                    let (done, wait) = oneshot::channel();
                    lane.ready.push_back(ToSender::Flush(done));
                    lane.wake.notify_one();
                    wait
                })
                .collect()
        };
        for wait in waits {
            wait.await.map_err(|_| Error::Closed)?;
        }
        Ok(())
    }

    /// Partitions for which this producer keeps a sender task and batching state now: those
    /// that had records within `partition_idle_timeout` (or still have some in flight).
    pub fn active_partitions(&self) -> usize {
        lock(&self.shared.state).lanes.len()
    }

    /// Flushes and stops.
    pub async fn close(self) -> Result<()> {
        self.flush().await
    }
}

/// A batch of `topic`'s `partition` was closed (taken by its sender, or closed by the linger):
/// keyless records move on to the next partition when it was theirs (the sticky partitioner
/// moves on with every closed batch, as Kafka's does; before, only a full one moved it, so a
/// producer sending few records at a time put every keyless record in one partition).
fn batch_closed(state: &mut State, topic: &Arc<str>, partition: u32) {
    let partitions = state.topics.get(topic).map_or(1, |(p, _)| (*p).max(1));
    if let Some(sticky) = state.sticky.get_mut(topic)
        && *sticky == partition
    {
        *sticky = (partition + 1) % partitions;
    }
}

/// Closes batches that have waited `linger` since their first record, for producers whose
/// partitions are busy (an idle partition's sender takes its batch at once).
async fn linger(shared: std::sync::Weak<Shared>) {
    let Some(linger) = shared.upgrade().map(|s| s.config.linger) else {
        return;
    };
    let mut ticker = tokio::time::interval((linger / 2).max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = lock(&shared.state);
        if state.closed {
            return;
        }
        let mut closed = Vec::new();
        for (key, lane) in state.lanes.iter_mut() {
            if lane
                .open
                .as_ref()
                .is_some_and(|o| o.opened.elapsed() >= linger)
                && let Some(open) = lane.open.take()
            {
                lane.ready.push_back(ToSender::Batch(open.batch));
                lane.wake.notify_one();
                closed.push(key.clone());
            }
        }
        for (topic, partition) in closed {
            batch_closed(&mut state, &topic, partition);
        }
    }
}

/// How one publish travels (see [`PublishTransport`]). It lives only inside the publish's
/// future, so the larger unary variant is not boxed (that would allocate per batch).
#[allow(clippy::large_enum_variant)]
enum Route {
    Stream(PublishLane, proto::PublishRequest),
    Unary(
        proto::publisher_client::PublisherClient<crate::Transport>,
        tonic::Request<proto::PublishRequest>,
    ),
}

/// A batch with its place in the producer's sequence.
struct Numbered {
    batch: Batch,
    epoch: u32,
    base_sequence: u64,
}

/// Sends one partition's batches in order, with a window of publishes in flight: it takes the
/// lane's closed batches while the window has room, and its open batch too while fewer than
/// `eager` publishes are in flight (or once the producer is dropped).
async fn send_partition(shared: Arc<Shared>, topic: Arc<str>, partition: u32, wake: Arc<Notify>) {
    let config = &shared.config;
    let router = &shared.router;
    let producer_id = shared.producer_id;
    let key = (topic.clone(), partition);
    // Where an earlier sender of this partition stopped (placed before its lane was dropped,
    // under the lock this lane was created under).
    let (mut epoch, mut next_sequence) = lock(&shared.state).resumes.remove(&key).unwrap_or((0, 0));
    let mut window: FuturesOrdered<_> = FuturesOrdered::new();
    // Flushes waiting, each with the number of batches taken before it: it is answered once
    // that many have been answered, whatever was taken after it.
    let mut flushes: VecDeque<(u64, oneshot::Sender<()>)> = VecDeque::new();
    let mut taken_batches = 0u64;
    let publish = |n: &Numbered| {
        let span = weft_proto::otel::enabled().then(|| publish_span(&topic, partition, &n.batch));
        let mut request = proto::PublishRequest {
            topic: topic.to_string(),
            target: Some(proto::publish_request::Target::Partition(partition)),
            records: n.batch.records.iter().map(Record::to_proto).collect(),
            producer_id,
            producer_epoch: n.epoch,
            base_sequence: n.base_sequence,
            request_id: n.base_sequence,
            trace_context: Default::default(),
        };
        // To the partition's leader when known: over the topic's stream to that broker, or as a
        // call of its own.
        let route = match config.transport {
            PublishTransport::Stream => {
                if let Some(cx) = &span {
                    // The stream's headers are shared by every request on it: each request
                    // names its own publish span, of which the broker's spans are children.
                    request.trace_context = weft_proto::otel::inject(cx)
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect();
                }
                Route::Stream(router.lane(&topic, partition), request)
            }
            PublishTransport::Unary => {
                let client = router.client(&topic, partition);
                let mut request = client.request(request, Some(&topic), Some(partition));
                if let Some(cx) = &span {
                    // The broker's spans of this call are children of this one.
                    weft_proto::otel::inject_metadata(cx, request.metadata_mut());
                }
                Route::Unary(client.publisher(), request)
            }
        };
        async move {
            let result = match route {
                Route::Stream(stream, request) => stream.publish(request).await,
                Route::Unary(mut publisher, request) => publisher
                    .publish(request)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(Error::from),
            };
            if let Some(cx) = span {
                end_publish_span(&cx, &result);
            }
            result
        }
    };
    let mut in_window: VecDeque<Numbered> = VecDeque::new();
    loop {
        // Take what is due, under the lock; publish it outside.
        let (taken, finished) = {
            let mut state = lock(&shared.state);
            let closed = state.closed;
            let mut closed_open = false;
            let outcome = match state.lanes.get_mut(&key) {
                None => (None, true),
                Some(lane) => {
                    let room = in_window.len() < config.in_flight_per_partition;
                    let taken = if !room {
                        None
                    } else if let Some(next) = lane.ready.pop_front() {
                        Some(next)
                    } else if in_window.len() < shared.eager || closed {
                        let open = lane.open.take().map(|open| ToSender::Batch(open.batch));
                        closed_open = open.is_some();
                        open
                    } else {
                        None
                    };
                    let taking = usize::from(matches!(taken, Some(ToSender::Batch(_))));
                    lane.outstanding = in_window.len() + taking;
                    let finished = taken.is_none()
                        && closed
                        && in_window.is_empty()
                        && lane.ready.is_empty()
                        && lane.open.is_none();
                    (taken, finished)
                }
            };
            if closed_open {
                batch_closed(&mut state, &key.0, key.1);
            }
            outcome
        };
        match taken {
            Some(ToSender::Batch(batch)) => {
                let count = batch.records.len() as u64;
                let numbered = Numbered {
                    batch,
                    epoch,
                    base_sequence: next_sequence,
                };
                next_sequence += count;
                taken_batches += 1;
                window.push_back(publish(&numbered));
                in_window.push_back(numbered);
                continue;
            }
            Some(ToSender::Flush(done)) => {
                if in_window.is_empty() {
                    let _ = done.send(());
                } else {
                    flushes.push_back((taken_batches, done));
                }
                continue;
            }
            None if finished => break,
            None => {}
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(config.partition_idle_timeout), if in_window.is_empty() && flushes.is_empty() => {
                // Idle: drop the lane (unless a record arrived meanwhile) and stop; the next
                // record starts a sender that continues this one's sequence.
                let mut state = lock(&shared.state);
                let idle = state
                    .lanes
                    .get(&key)
                    .is_some_and(|lane| lane.open.is_none() && lane.ready.is_empty());
                if idle {
                    state.lanes.remove(&key);
                    if (epoch, next_sequence) != (0, 0) {
                        // (Nothing to continue for a partition that never took a record,
                        // one out of the topic's range, say.)
                        state.resumes.insert(key.clone(), (epoch, next_sequence));
                    }
                    break;
                }
            }
            Some(result) = window.next(), if !in_window.is_empty() => {
                let Some(first) = in_window.pop_front() else { continue };
                match result {
                    Ok(response) => answer(first.batch, Ok(&response)),
                    Err(error) => {
                        // The leader may have moved: ask again where it is.
                        router.failed(&topic, partition, &error);
                        // Drain the window: later batches may have failed on the gap this one left.
                        let mut pending = vec![(first, Some(error))];
                        while let Some(result) = window.next().await {
                            let Some(n) = in_window.pop_front() else { break };
                            match result {
                                Ok(response) => answer(n.batch, Ok(&response)),
                                Err(e) => pending.push((n, Some(e))),
                            }
                        }
                        // Each retry's failure moves the route too: a retry that finds the
                        // broker it went to gone (a leader hint naming a broker that died, say)
                        // goes elsewhere next time.
                        let publish_again = |n: &Numbered| {
                            let sent = publish(n);
                            let topic = &topic;
                            async move {
                                let result = sent.await;
                                if let Err(error) = &result {
                                    router.failed(topic, partition, error);
                                }
                                result
                            }
                        };
                        next_sequence = resend(&publish_again, &answer, config, &topic, partition, pending, &mut epoch, next_sequence).await;
                    }
                }
                // Every batch not in the window has been answered (a resend answers all it took).
                let answered = taken_batches - in_window.len() as u64;
                while flushes.front().is_some_and(|(mark, _)| *mark <= answered) {
                    if let Some((_, done)) = flushes.pop_front() {
                        let _ = done.send(());
                    }
                }
            }
        }
    }
    for (_, done) in flushes {
        let _ = done.send(());
    }
}

/// Gives a record its creation context, when it has none (the application's own
/// `traceparent` header stands): a `create` span, a child of the caller's current context,
/// whose context goes into the record's `traceparent` / `tracestate` headers and travels with
/// it to every consumer.
fn trace_creation(topic: &str, record: &mut Record) {
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
    if record
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
    {
        return;
    }
    let tracer = weft_proto::otel::tracer();
    let span = tracer
        .span_builder(format!("create {topic}"))
        .with_kind(SpanKind::Producer)
        .with_attributes(weft_proto::otel::messaging(
            "create",
            "create",
            topic,
            record.partition,
        ))
        .start_with_context(&tracer, &opentelemetry::Context::current());
    let cx = opentelemetry::Context::current_with_span(span);
    for (key, value) in weft_proto::otel::inject(&cx) {
        record.headers.push((key.to_string(), value.into()));
    }
    cx.span().end();
}

/// The span of one attempt to publish a batch (`send`): a child of its first record's creation
/// context (so a record sent alone makes one trace from creation to consumption), linked to
/// every record's.
fn publish_span(topic: &str, partition: u32, batch: &Batch) -> opentelemetry::Context {
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
    let contexts: Vec<_> = batch
        .records
        .iter()
        .filter_map(|r| {
            weft_proto::otel::record_context(r.headers.iter().map(|(k, v)| (k.as_str(), &v[..])))
        })
        .collect();
    let parent = contexts
        .first()
        .map_or_else(opentelemetry::Context::new, |sc| {
            opentelemetry::Context::new().with_remote_span_context(sc.clone())
        });
    let mut attributes = weft_proto::otel::messaging("send", "publish", topic, Some(partition));
    attributes.push(KeyValue::new(
        weft_proto::otel::BATCH_COUNT,
        batch.records.len() as i64,
    ));
    let tracer = weft_proto::otel::tracer();
    let span = tracer
        .span_builder(format!("publish {topic}"))
        .with_kind(SpanKind::Producer)
        .with_attributes(attributes)
        .with_links(weft_proto::otel::links(contexts))
        .start_with_context(&tracer, &parent);
    opentelemetry::Context::new().with_span(span)
}

/// Ends a publish span with the batch's offset, or its error.
fn end_publish_span(cx: &opentelemetry::Context, result: &Result<proto::PublishResponse>) {
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{Status, TraceContextExt};
    let span = cx.span();
    match result {
        Ok(response) => span.set_attribute(KeyValue::new(
            weft_proto::otel::OFFSET,
            response.base_offset as i64,
        )),
        Err(e) => span.set_status(Status::error(e.to_string())),
    }
    span.end();
}

/// How often a producer takes the partition counts and batch limits its router's refreshes
/// learned.
const TOPICS_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The reasons (ErrorInfo) with which the broker refuses a publish before storing anything: a
/// gap (an earlier batch is missing), a fenced epoch, a forgotten producer, a full queue, a
/// partition that remembers as many producers as it may (a new one is refused), a caller it
/// does not know or allow, or a batch it will never take (too large, invalid, unknown topic or
/// partition).
pub const NOT_STORED_REASONS: [&str; 12] = [
    "SEQUENCE_GAP",
    "PRODUCER_FENCED",
    "UNKNOWN_PRODUCER",
    "OVERLOADED",
    "LIMIT_REACHED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "BATCH_TOO_LARGE",
    "TOO_MANY_RECORDS",
    "INVALID_ARGUMENT",
    "TOPIC_NOT_FOUND",
    "PARTITION_NOT_FOUND",
];

/// The wait before attempt `attempt` (1 for the second): `backoff` times the attempts made, at
/// most ten times `backoff`. A fixed 100 ms between 20 attempts gave up after 2 s, within the
/// 3-4 s a partition's new leader takes after a crash: the batch's outcome was then unknown and
/// every later batch of the partition failed with it.
fn retry_delay(backoff: Duration, attempt: u32) -> Duration {
    backoff.saturating_mul(attempt.clamp(1, 10))
}

/// Whether this attempt surely stored nothing: the broker said so (its ErrorInfo reason), or the
/// client refused the batch itself. Anything else may have been stored, above all errors of the
/// transport (an HTTP/2 reset or protocol error reaches the client as CANCELLED, INTERNAL or
/// RESOURCE_EXHAUSTED without the broker's reason). DUPLICATE_SEQUENCE is the opposite: stored
/// long ago, its offsets no longer remembered.
fn surely_not_stored(error: &Error) -> bool {
    match error {
        Error::Status { reason, .. } => NOT_STORED_REASONS.contains(&reason.as_str()),
        Error::InvalidArgument(_) => true,
        _ => false,
    }
}

/// Resends, in sequence order and one at a time, the batches of a window that failed. A batch
/// keeps its epoch and sequence as long as it may have been stored: a retry of a stored batch is
/// answered with its original offsets, never stored again.
///
/// - A batch the broker surely did not store (refused, or a persistent gap) fails; the batches
///   after it were surely not stored either (the broker takes sequences in order), so their
///   sequences move down to close the hole.
/// - A batch whose outcome stays unknown after every retry (the broker unreachable) fails, and so
///   does every batch after it: resending them under new numbers could store them twice. The
///   producer moves to a new epoch, which fences anything still in flight from the old one; new
///   batches start at sequence 0.
/// - A partition that forgot the producer (UNKNOWN_PRODUCER: idle past its expiry) stored none
///   of the batches still to be answered, unless an earlier attempt of one may have stored it
///   before the producer expired: that batch fails as OUTCOME_UNKNOWN (with every later one),
///   the others are numbered afresh in a new epoch.
///
/// Returns the next sequence to hand out.
#[allow(clippy::too_many_arguments)]
async fn resend<P, F, S>(
    publish: &P,
    settle: &S,
    config: &ProducerConfig,
    topic: &str,
    partition: u32,
    pending: Vec<(Numbered, Option<Error>)>,
    epoch: &mut u32,
    next_sequence: u64,
) -> u64
where
    P: Fn(&Numbered) -> F,
    F: std::future::Future<Output = Result<proto::PublishResponse>>,
    S: Fn(Batch, Result<&proto::PublishResponse, Error>),
{
    // Sequences freed by batches that surely were not stored, to be taken off later batches.
    let mut freed = 0u64;
    // Set when the partition forgot this producer (idle too long): from then on batches are
    // numbered afresh in a new epoch, from 0.
    let mut restart: Option<u64> = None;
    // Set once a batch's outcome stayed unknown: everything after it fails too.
    let mut unknown: Option<Error> = None;
    for (mut n, mut last_error) in pending {
        if let Some(error) = &unknown {
            settle(
                n.batch,
                Err(Error::Status {
                    code: tonic::Code::Aborted,
                    message: format!(
                        "not sent again: an earlier batch of this producer failed with an unknown outcome ({error})"
                    ),
                    reason: "EARLIER_BATCH_UNKNOWN".into(),
                    leader_id: None,
                }),
            );
            continue;
        }
        let count = n.batch.records.len() as u64;
        match restart.as_mut() {
            Some(next) => {
                n.epoch = *epoch;
                n.base_sequence = *next;
                *next += count;
                // Its UNKNOWN_PRODUCER answer came from the old epoch, which was left already:
                // renumbered in the new one, it must not start yet another epoch.
                if last_error
                    .as_ref()
                    .is_some_and(|e| e.reason() == "UNKNOWN_PRODUCER")
                {
                    last_error = None;
                }
            }
            None if freed > 0 && last_error.as_ref().is_some_and(|e| !surely_not_stored(e)) => {
                // An earlier batch was surely not stored, but this one may have reached the
                // broker (its stream ended, say): there it waits for the freed sequences (the
                // broker holds a batch that comes ahead of its turn for a while), and renumbered
                // down it would be stored twice, once its old copy took the turn after the new
                // one, and the batch after it answered as a duplicate of that copy. So it and
                // every later batch go to a new epoch, from sequence 0: the old copies are
                // fenced.
                *epoch += 1;
                n.epoch = *epoch;
                n.base_sequence = 0;
                restart = Some(count);
            }
            None => n.base_sequence -= freed,
        }
        let mut attempt = 0;
        // Whether an attempt so far may have stored the batch (a later definite refusal, say a
        // full queue, does not undo that).
        let mut maybe_stored = last_error.as_ref().is_some_and(|e| !surely_not_stored(e));
        loop {
            let forgotten = last_error
                .as_ref()
                .is_some_and(|e| e.reason() == "UNKNOWN_PRODUCER");
            if forgotten && !maybe_stored && attempt <= config.retries_max {
                // Nothing of this producer is known there any more, and no attempt of this
                // batch may have been stored (nor, in sequence order, any batch after it):
                // start a new epoch and number them afresh.
                *epoch += 1;
                n.epoch = *epoch;
                n.base_sequence = 0;
                restart = Some(count);
                last_error = None;
            }
            // Forgotten after an attempt that may have stored it (its answer lost, then the
            // producer expired there): renumbered, it could be stored twice. Its outcome is
            // unknown; it and every later batch fail, under a new epoch.
            let give_up = match &last_error {
                Some(_) if forgotten && maybe_stored => true,
                Some(e) if !e.is_retriable() && e.reason() != "SEQUENCE_GAP" => true,
                _ => attempt >= config.retries_max,
            };
            if give_up {
                let mut error = last_error.take().unwrap_or(Error::Closed);
                if forgotten && maybe_stored {
                    error = Error::Status {
                        code: tonic::Code::Unknown,
                        message: format!(
                            "an earlier attempt may have stored this batch (its answer was lost), \
                             and the partition has since forgotten this producer ({error}): sent \
                             again under a new number it could be stored twice, so its outcome \
                             stays unknown"
                        ),
                        reason: "OUTCOME_UNKNOWN".into(),
                        leader_id: None,
                    };
                } else if maybe_stored && surely_not_stored(&error) {
                    // The last answer says "not stored" (a full queue, a refusal for good), but
                    // an earlier attempt may have stored it: the caller must not take it for a
                    // record that surely is not there.
                    error = Error::Status {
                        code: tonic::Code::Unknown,
                        message: format!(
                            "an earlier attempt may have stored this batch (its answer was \
                             lost), then it was refused ({error}): its outcome stays unknown"
                        ),
                        reason: "OUTCOME_UNKNOWN".into(),
                        leader_id: None,
                    };
                }
                tracing::warn!(%topic, partition, "publish failed for good: {error}");
                if surely_not_stored(&error) && !maybe_stored {
                    match restart.as_mut() {
                        Some(next) => *next -= count,
                        None => freed += count,
                    }
                } else if error.reason() != "DUPLICATE_SEQUENCE" {
                    unknown = Some(error.clone());
                }
                settle(n.batch, Err(error));
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(retry_delay(config.retry_backoff, attempt)).await;
            }
            attempt += 1;
            match publish(&n).await {
                Ok(response) => {
                    settle(n.batch, Ok(&response));
                    break;
                }
                Err(e) => {
                    maybe_stored |= !surely_not_stored(&e);
                    last_error = Some(e);
                }
            }
        }
    }
    if unknown.is_some() {
        *epoch += 1;
        0
    } else if let Some(next) = restart {
        next
    } else {
        next_sequence - freed
    }
}

/// Answers every record of `batch` with where it was stored, or the error.
fn answer(mut batch: Batch, result: Result<&proto::PublishResponse, Error>) {
    batch.answer(result.map(|response| (response.base_offset, response.duplicate)));
}

#[cfg(test)]
mod tests {
    //! The retry rules of [`resend`], driven by a scripted broker: which batches keep their
    //! numbers, which fail, and what the next sequence and epoch are.

    use std::cell::RefCell;

    use super::*;

    /// Attempts wait longer and longer, up to ten times the backoff: the default 20 attempts
    /// span more than a leader's replacement after a crash (3-4 s).
    #[test]
    fn retries_wait_longer_up_to_ten_backoffs() {
        let backoff = Duration::from_millis(100);
        assert_eq!(retry_delay(backoff, 1), backoff);
        assert_eq!(retry_delay(backoff, 2), 2 * backoff);
        assert_eq!(retry_delay(backoff, 10), 10 * backoff);
        assert_eq!(retry_delay(backoff, 50), 10 * backoff);
        let config = ProducerConfig::default();
        let total: Duration = (1..config.retries_max)
            .map(|a| retry_delay(config.retry_backoff, a))
            .sum();
        assert!(total > Duration::from_secs(10), "{total:?}");
    }

    /// A batch of `records` records, numbered, with the acknowledgements of its records.
    fn numbered(records: usize, epoch: u32, base_sequence: u64) -> (Numbered, Vec<AckFuture>) {
        let mut batch = Batch::new(
            Arc::from("t"),
            0,
            Arc::new(Semaphore::new(0)),
            Arc::new(Semaphore::new(0)),
        );
        let acks = (0..records)
            .map(|i| batch.push(Record::new(format!("r{i}"))))
            .collect();
        (
            Numbered {
                batch,
                epoch,
                base_sequence,
            },
            acks,
        )
    }

    fn status(code: tonic::Code, reason: &str) -> Error {
        Error::Status {
            code,
            message: format!("scripted {reason}"),
            reason: reason.into(),
            leader_id: None,
        }
    }

    fn stored(base_offset: u64) -> proto::PublishResponse {
        proto::PublishResponse {
            base_offset,
            ..proto::PublishResponse::default()
        }
    }

    fn config() -> ProducerConfig {
        ProducerConfig {
            retries_max: 3,
            retry_backoff: Duration::from_millis(1),
            ..ProducerConfig::default()
        }
    }

    /// Runs `resend` over `pending` against `script` (answers in the order publishes are made);
    /// returns (next sequence, epoch, the (epoch, base_sequence) of every publish attempt).
    async fn run(
        pending: Vec<(Numbered, Option<Error>)>,
        script: Vec<Result<proto::PublishResponse>>,
        epoch: u32,
        next_sequence: u64,
    ) -> (u64, u32, Vec<(u32, u64)>) {
        let script = RefCell::new(VecDeque::from(script));
        let attempts = RefCell::new(Vec::new());
        let publish = |n: &Numbered| {
            attempts.borrow_mut().push((n.epoch, n.base_sequence));
            let answer = script
                .borrow_mut()
                .pop_front()
                .expect("the script has an answer for every publish");
            async move { answer }
        };
        let settle =
            |batch: Batch, result: Result<&proto::PublishResponse, Error>| answer(batch, result);
        let mut epoch = epoch;
        let next = resend(
            &publish,
            &settle,
            &config(),
            "t",
            0,
            pending,
            &mut epoch,
            next_sequence,
        )
        .await;
        assert!(script.borrow().is_empty(), "unused answers in the script");
        (next, epoch, attempts.into_inner())
    }

    fn outcome(acks: Vec<AckFuture>) -> Vec<Result<u64, String>> {
        use futures::FutureExt;
        acks.into_iter()
            .map(|ack| {
                ack.now_or_never()
                    .expect("answered")
                    .map(|ack| ack.offset)
                    .map_err(|e| match e {
                        // A batch dropped without an answer: never what these tests expect.
                        Error::Closed => "dropped unanswered".to_string(),
                        e => e.reason().to_string(),
                    })
            })
            .collect()
    }

    #[tokio::test]
    async fn a_retried_batch_keeps_its_epoch_and_sequence() {
        let (a, ra) = numbered(2, 3, 10);
        let (b, rb) = numbered(1, 3, 12);
        let unavailable = status(tonic::Code::Unavailable, "");
        let (next, epoch, attempts) = run(
            vec![
                (a, Some(unavailable.clone())),
                (b, Some(unavailable.clone())),
            ],
            vec![Err(unavailable), Ok(stored(100)), Ok(stored(102))],
            3,
            13,
        )
        .await;
        assert_eq!(attempts, vec![(3, 10), (3, 10), (3, 12)]);
        assert_eq!((next, epoch), (13, 3));
        assert_eq!(outcome(ra), vec![Ok(100), Ok(101)]);
        assert_eq!(outcome(rb), vec![Ok(102)]);
    }

    #[tokio::test]
    async fn a_batch_surely_not_stored_fails_and_later_batches_close_the_hole() {
        // The first batch is refused for good (too large): it was not stored, so the batch after
        // it (which failed on the gap) moves down to its sequence.
        let (a, ra) = numbered(2, 0, 0);
        let (b, rb) = numbered(3, 0, 2);
        let (next, epoch, attempts) = run(
            vec![
                (
                    a,
                    Some(status(tonic::Code::ResourceExhausted, "BATCH_TOO_LARGE")),
                ),
                (
                    b,
                    Some(status(tonic::Code::FailedPrecondition, "SEQUENCE_GAP")),
                ),
            ],
            vec![Ok(stored(7))],
            0,
            5,
        )
        .await;
        assert_eq!(
            attempts,
            vec![(0, 0)],
            "the refused batch is not sent again"
        );
        assert_eq!((next, epoch), (3, 0));
        assert_eq!(
            outcome(ra),
            vec![Err("BATCH_TOO_LARGE".into()), Err("BATCH_TOO_LARGE".into())]
        );
        assert_eq!(outcome(rb), vec![Ok(7), Ok(8), Ok(9)]);
    }

    /// A new producer refused by a partition that remembers as many producers as it may
    /// (LIMIT_REACHED), or a caller refused its rights: nothing was stored, so only that batch
    /// fails and the batch after it takes its sequences. Before, such a refusal counted as an
    /// unknown outcome: every later batch of the partition failed with it, under a new epoch.
    #[tokio::test]
    async fn a_refusal_for_want_of_room_or_rights_fails_that_batch_alone() {
        for (code, reason) in [
            (tonic::Code::ResourceExhausted, "LIMIT_REACHED"),
            (tonic::Code::PermissionDenied, "PERMISSION_DENIED"),
            (tonic::Code::Unauthenticated, "UNAUTHENTICATED"),
        ] {
            let (a, ra) = numbered(1, 0, 0);
            let (b, rb) = numbered(2, 0, 1);
            let (next, epoch, attempts) = run(
                vec![
                    (a, Some(status(code, reason))),
                    (
                        b,
                        Some(status(tonic::Code::FailedPrecondition, "SEQUENCE_GAP")),
                    ),
                ],
                vec![Ok(stored(40))],
                0,
                3,
            )
            .await;
            assert_eq!(attempts, vec![(0, 0)], "{reason}: b moves down to 0");
            assert_eq!((next, epoch), (2, 0), "{reason}");
            assert_eq!(outcome(ra), vec![Err(reason.into())]);
            assert_eq!(outcome(rb), vec![Ok(40), Ok(41)], "{reason}");
        }
    }

    /// The first batch is refused for good; the second's stream ended before its answer, so a
    /// copy of it may wait at the broker for the first one's sequences. Renumbered down to
    /// them (as before), it was stored twice: the new copy took the turn, the old one the
    /// next, and the batch after it was answered as a duplicate of that old copy, its records
    /// never stored. It goes to a new epoch instead, from 0, which fences the old copy.
    #[tokio::test]
    async fn a_batch_that_may_wait_at_the_broker_is_not_renumbered_into_a_freed_hole() {
        let (a, ra) = numbered(2, 4, 10);
        let (b, rb) = numbered(2, 4, 12);
        let (c, rc) = numbered(1, 4, 14);
        let ended = status(tonic::Code::Unavailable, "STREAM_ENDED");
        let (next, epoch, attempts) = run(
            vec![
                (
                    a,
                    Some(status(tonic::Code::InvalidArgument, "INVALID_ARGUMENT")),
                ),
                (b, Some(ended.clone())),
                (c, Some(ended)),
            ],
            vec![Ok(stored(50)), Ok(stored(52))],
            4,
            15,
        )
        .await;
        assert_eq!(attempts, vec![(5, 0), (5, 2)]);
        assert_eq!((next, epoch), (3, 5));
        assert_eq!(
            outcome(ra),
            vec![
                Err("INVALID_ARGUMENT".into()),
                Err("INVALID_ARGUMENT".into())
            ]
        );
        assert_eq!(outcome(rb), vec![Ok(50), Ok(51)]);
        assert_eq!(outcome(rc), vec![Ok(52)]);
    }

    #[tokio::test]
    async fn an_unknown_outcome_fails_every_later_batch_and_fences_with_a_new_epoch() {
        // The first batch may have been stored (the broker stayed unreachable): nothing after it
        // may be renumbered and sent as new, so it all fails and the next epoch starts at 0.
        let (a, ra) = numbered(1, 2, 40);
        let (b, rb) = numbered(2, 2, 41);
        let unavailable = status(tonic::Code::Unavailable, "");
        let (next, epoch, attempts) = run(
            vec![
                (a, Some(unavailable.clone())),
                (b, Some(unavailable.clone())),
            ],
            vec![
                Err(unavailable.clone()),
                Err(unavailable.clone()),
                Err(unavailable),
            ],
            2,
            43,
        )
        .await;
        assert_eq!(attempts, vec![(2, 40); 3], "only the first batch is tried");
        assert_eq!((next, epoch), (0, 3));
        assert_eq!(outcome(ra), vec![Err(String::new())]);
        assert_eq!(
            outcome(rb),
            vec![
                Err("EARLIER_BATCH_UNKNOWN".into()),
                Err("EARLIER_BATCH_UNKNOWN".into())
            ]
        );
    }

    #[tokio::test]
    async fn a_transport_error_without_a_broker_reason_is_an_unknown_outcome() {
        // An HTTP/2 stream reset or protocol error reaches the client as CANCELLED, INTERNAL or
        // RESOURCE_EXHAUSTED without the broker's ErrorInfo: the request may have been stored
        // (seen by the fault-injection harness after a paused broker resumed). Renumbering the
        // batches after it would store them under sequences the broker answers as duplicates.
        for code in [
            tonic::Code::Cancelled,
            tonic::Code::Internal,
            tonic::Code::ResourceExhausted,
        ] {
            let (a, ra) = numbered(1, 2, 40);
            let (b, rb) = numbered(2, 2, 41);
            let broken = status(code, "");
            let (next, epoch, attempts) = run(
                vec![(a, Some(broken.clone())), (b, Some(broken.clone()))],
                vec![Err(broken.clone()), Err(broken.clone()), Err(broken)],
                2,
                43,
            )
            .await;
            assert_eq!(
                attempts,
                vec![(2, 40); 3],
                "{code:?}: only the first batch is tried"
            );
            assert_eq!(
                (next, epoch),
                (0, 3),
                "{code:?}: a new epoch fences the old one"
            );
            assert_eq!(outcome(ra), vec![Err(String::new())], "{code:?}");
            assert_eq!(
                outcome(rb),
                vec![
                    Err("EARLIER_BATCH_UNKNOWN".into()),
                    Err("EARLIER_BATCH_UNKNOWN".into())
                ],
                "{code:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_forgotten_producer_starts_a_new_epoch_from_sequence_zero() {
        let (a, ra) = numbered(2, 1, 500);
        let (b, rb) = numbered(1, 1, 502);
        let forgotten = status(tonic::Code::FailedPrecondition, "UNKNOWN_PRODUCER");
        let (next, epoch, attempts) = run(
            vec![(a, Some(forgotten.clone())), (b, Some(forgotten))],
            vec![Ok(stored(0)), Ok(stored(2))],
            1,
            503,
        )
        .await;
        assert_eq!(attempts, vec![(2, 0), (2, 2)]);
        assert_eq!((next, epoch), (3, 2));
        assert_eq!(outcome(ra), vec![Ok(0), Ok(1)]);
        assert_eq!(outcome(rb), vec![Ok(2)]);
    }

    /// A batch whose earlier attempt may have been stored (its answer lost) and whose retry
    /// finds the producer forgotten (expired meanwhile) may be stored already: it fails with an
    /// unknown outcome, and so do the batches after it, under a new epoch. Before, it was
    /// renumbered from sequence 0 in a new epoch and stored a second time (helper-90).
    #[tokio::test]
    async fn a_batch_that_may_be_stored_is_not_renumbered_when_its_producer_is_forgotten() {
        let (a, ra) = numbered(1, 1, 7);
        let (b, rb) = numbered(1, 1, 8);
        let forgotten = status(tonic::Code::FailedPrecondition, "UNKNOWN_PRODUCER");
        let (next, epoch, attempts) = run(
            vec![
                (a, Some(status(tonic::Code::Unavailable, ""))),
                (b, Some(status(tonic::Code::Unavailable, ""))),
            ],
            vec![Err(forgotten)],
            1,
            9,
        )
        .await;
        assert_eq!(
            attempts,
            vec![(1, 7)],
            "only the retry under its own number"
        );
        assert_eq!((next, epoch), (0, 2), "a new epoch fences the old one");
        assert_eq!(outcome(ra), vec![Err("OUTCOME_UNKNOWN".into())]);
        assert_eq!(outcome(rb), vec![Err("EARLIER_BATCH_UNKNOWN".into())]);
    }

    /// An attempt that may have stored the batch (its answer lost), then refusals that say
    /// "not stored" (a full queue each time, or a refusal for good): the batch's outcome stays
    /// unknown, and that is what its caller hears (OUTCOME_UNKNOWN), not the last refusal.
    /// Before, the caller got OVERLOADED or PERMISSION_DENIED, reasons that promise the record
    /// was not stored (`NOT_STORED_REASONS`), while the producer itself treated it as unknown.
    #[tokio::test]
    async fn a_batch_that_may_have_been_stored_never_fails_as_not_stored() {
        let overloaded = || Err(status(tonic::Code::ResourceExhausted, "OVERLOADED"));
        let (a, ra) = numbered(1, 2, 40);
        let (_, epoch, _) = run(
            vec![(a, Some(status(tonic::Code::Unavailable, "")))],
            vec![overloaded(), overloaded(), overloaded()],
            2,
            41,
        )
        .await;
        assert_eq!(epoch, 3, "a new epoch fences the batch that may be stored");
        assert_eq!(outcome(ra), vec![Err("OUTCOME_UNKNOWN".into())]);

        let (a, ra) = numbered(1, 2, 40);
        let (b, rb) = numbered(1, 2, 41);
        let (_, epoch, attempts) = run(
            vec![
                (a, Some(status(tonic::Code::DeadlineExceeded, "TIMEOUT"))),
                (b, Some(status(tonic::Code::Unavailable, ""))),
            ],
            vec![Err(status(
                tonic::Code::PermissionDenied,
                "PERMISSION_DENIED",
            ))],
            2,
            42,
        )
        .await;
        assert_eq!(attempts, vec![(2, 40)]);
        assert_eq!(epoch, 3);
        assert_eq!(outcome(ra), vec![Err("OUTCOME_UNKNOWN".into())]);
        assert_eq!(outcome(rb), vec![Err("EARLIER_BATCH_UNKNOWN".into())]);
    }

    #[tokio::test]
    async fn a_duplicate_too_old_to_answer_fails_without_freeing_its_sequences() {
        // DUPLICATE_SEQUENCE: stored long ago. It fails (no offsets to give), but its sequences
        // stay used: the next batch keeps its number.
        let (a, ra) = numbered(1, 0, 0);
        let (b, rb) = numbered(1, 0, 1);
        let (next, _, attempts) = run(
            vec![
                (
                    a,
                    Some(status(tonic::Code::AlreadyExists, "DUPLICATE_SEQUENCE")),
                ),
                (b, Some(status(tonic::Code::Unavailable, ""))),
            ],
            vec![Ok(stored(9))],
            0,
            2,
        )
        .await;
        assert_eq!(attempts, vec![(0, 1)]);
        assert_eq!(next, 2);
        assert_eq!(outcome(ra), vec![Err("DUPLICATE_SEQUENCE".into())]);
        assert_eq!(outcome(rb), vec![Ok(9)]);
    }
}
