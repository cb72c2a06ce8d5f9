//! The consumer: one `Subscribe` stream per consumer. It grants the broker credit as the
//! application takes records (so at most `credit_records` / `credit_bytes` are buffered), sends
//! heartbeats, follows group reassignments, and reconnects when the broker ends the stream (stream
//! rotation, restarts): outside a group it resumes from its positions; in a group it rejoins with
//! its member id and resumes from the committed offsets.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use crate::{Client, Error, Result, proto};
use proto::subscribe_response::Event;

/// Where to start in partitions with no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The oldest retained record.
    Earliest,
    /// Only records published from now on.
    #[default]
    Latest,
    /// This offset.
    Offset(u64),
    /// The first record at or after this time (ms since the Unix epoch).
    Timestamp(i64),
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Topic.
    pub topic: String,
    /// Consumer group to join; None to choose partitions yourself.
    pub group: Option<String>,
    /// Partitions to read outside a group (empty: all).
    pub partitions: Vec<u32>,
    /// Where to start without a committed offset.
    pub start: StartFrom,
    /// Commit positions automatically (group consumers).
    pub auto_commit: bool,
    /// How often automatic commits happen.
    pub auto_commit_interval: Duration,
    /// Records the broker may have delivered and not yet credited back.
    pub credit_records: u32,
    /// Bytes the broker may have delivered and not yet credited back.
    pub credit_bytes: u64,
    /// Group session timeout (None: the broker's default).
    pub session_timeout: Option<Duration>,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Reconnection attempts in a row before `next` fails. A stream that ends within a second
    /// of opening is opened again after a growing wait (100 ms more each time, at most 2 s).
    pub reconnects_max: u32,
}

impl ConsumerConfig {
    /// Defaults for `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        ConsumerConfig {
            topic: topic.into(),
            group: None,
            partitions: Vec::new(),
            start: StartFrom::Latest,
            auto_commit: true,
            auto_commit_interval: Duration::from_secs(1),
            credit_records: 2000,
            credit_bytes: 8 * 1024 * 1024,
            session_timeout: None,
            heartbeat_interval: Duration::from_secs(1),
            reconnects_max: 30,
        }
    }

    /// Joins this group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Starts here when there is no committed offset.
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Reads only these partitions (outside a group).
    pub fn partitions(mut self, partitions: Vec<u32>) -> Self {
        self.partitions = partitions;
        self
    }

    /// Turns automatic commits on or off.
    pub fn auto_commit(mut self, on: bool) -> Self {
        self.auto_commit = on;
        self
    }

    /// Sets the group session timeout: how long the group keeps this member's partitions after
    /// its stream ends or its heartbeats stop. Between 100 ms and 1 hour (the broker refuses
    /// others with INVALID_ARGUMENT); unset, the broker's `session_timeout_ms`.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = Some(timeout);
        self
    }
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Key (empty: none).
    pub key: Bytes,
    /// Value.
    pub value: Bytes,
    /// Creation time, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Headers, in publish order.
    pub headers: Vec<(String, Bytes)>,
}

impl Message {
    /// The record's creation context (the producer's `create` span, from its `traceparent` /
    /// `tracestate` headers), to parent or link the application's own spans; an empty context
    /// when the record carries none.
    pub fn creation_context(&self) -> opentelemetry::Context {
        weft_proto::otel::extract(self.headers.iter().map(|(k, v)| (k.as_str(), &v[..])))
    }
}

/// Reads a topic. Not `Clone`: one consumer, one stream.
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    requests: Option<mpsc::Sender<proto::SubscribeRequest>>,
    responses: Option<Streaming<proto::SubscribeResponse>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    buffer: VecDeque<Message>,
    positions: BTreeMap<u32, u64>,
    committed: BTreeMap<u32, u64>,
    member_id: String,
    generation: u64,
    uncredited: (u32, u64),
    last_commit: Instant,
    /// Whether the current Subscribe stream is open (commits then travel over it).
    stream_live: bool,
    /// Commits sent over the stream and not yet acknowledged (answered in order).
    commits_in_flight: usize,
    /// Whether the last acknowledged stream commit was refused (its generation was stale).
    last_commit_refused: bool,
    /// The `process` span of the record `next` returned last (tracing on): it ends when the
    /// application asks for the next record, or closes the consumer.
    processing: Option<opentelemetry::Context>,
    /// When the current Subscribe stream was opened.
    stream_opened: Instant,
    /// Streams in a row that ended within [`QUICK_STREAM`] of opening: each reconnection after
    /// one waits longer (see [`reconnect_delay`]).
    quick_ends: u32,
    /// Whether the current stream has announced an assignment yet.
    assigned_on_stream: bool,
    /// The session timeout the broker last said is in force.
    broker_session: Option<Duration>,
    /// How often the heartbeat task beats.
    heartbeat_interval: Duration,
    /// How often the broker said it sends a heartbeat on a quiet stream (the current stream's
    /// last assignment; None before it, or from a broker that does not say).
    broker_heartbeat: Option<Duration>,
    /// When something last came on the current stream (or it was opened, or the consumer went
    /// back to waiting on it after handing out records): the silence is measured from then,
    /// across calls of `next` that gave no record (a caller polling with short timeouts).
    last_heard: tokio::time::Instant,
    /// A record was handed to the application since the consumer last waited on the stream.
    handed_out: bool,
    /// Records were handed to the application since auto-commit last sent the positions.
    handed_since_commit: bool,
    /// Streams in a row that failed (counted across calls of `next`, so a caller that polls
    /// with short timeouts still gets the error once `reconnects_max` is passed).
    failures: u32,
    /// A new stream to open: when, and the attempts made so far. Kept across calls of `next`,
    /// so a caller's timeout that cuts a reconnection short does not skip its wait.
    reconnecting: Option<Reconnecting>,
    /// A stream being opened, in a task of its own: a caller's timeout that cuts `next` short
    /// leaves it under way, and the next call waits for the same one (before, each poll shorter
    /// than the broker's answer cancelled its attempt and used up `reconnects_max` without
    /// any stream ever opening).
    opening: Option<Opening>,
}

/// A subscription stream being opened: its request channel, the call, and its heartbeats,
/// which start with the call: once the broker has the stream, the member's session runs, also
/// while the application does not poll (a stream opened but not yet taken up by `next`).
#[derive(Debug)]
struct Opening {
    requests: mpsc::Sender<proto::SubscribeRequest>,
    call: tokio::task::JoinHandle<Result<Streaming<proto::SubscribeResponse>>>,
    heartbeat: tokio::task::JoinHandle<()>,
    heartbeat_interval: Duration,
}

impl Opening {
    /// Stops the call and its heartbeats.
    fn abort(&self) {
        self.call.abort();
        self.heartbeat.abort();
    }
}

/// A pending reconnection of a [`Consumer`].
#[derive(Debug, Clone, Copy)]
struct Reconnecting {
    /// Not before then.
    at: tokio::time::Instant,
    /// Attempts made so far (each counted when it starts, so one a caller's timeout cut
    /// short counts too).
    attempts: u32,
}

/// How many of the broker's heartbeat intervals may pass with nothing on the stream before the
/// consumer takes it as lost (a hung broker, a proxy holding the stream) and subscribes again.
const SILENT_HEARTBEATS_MAX: u32 = 3;

/// The least silence taken as a lost stream, however often the broker heartbeats: a broker's
/// session sends nothing while it waits on a slow step (a rebalance waits up to 2 s for
/// commits in flight, and up to 3 s for each partition still opening).
const SILENCE_MIN: Duration = Duration::from_secs(15);

/// The longest a stream may stay silent before its first assignment (a group member's may wait
/// for a rebalance), unless the client's timeout is longer.
const FIRST_ANSWER_SILENCE_MAX: Duration = Duration::from_secs(30);

/// A stream that ends sooner than this after it opened counts as a quick end: the broker
/// accepted it and then failed it at once (a partition still opening, a coordinator taking
/// over), and opening another at once would only fail the same way.
const QUICK_STREAM: Duration = Duration::from_secs(1);

/// The wait before opening a stream again after `quick_ends` streams in a row ended quickly:
/// none after a stream that lived, then 100 ms more per quick end, at most 2 s.
fn reconnect_delay(quick_ends: u32) -> Duration {
    Duration::from_millis(100 * u64::from(quick_ends.min(20)))
}

/// The stream's next message of a kind this client knows; None when the stream ended. A
/// message whose event this build does not know (a newer broker's) is passed over: before, it
/// read as the end of the stream, the consumer opened another while the old one was still
/// open, and its group rebalanced at each.
async fn next_known(
    responses: &mut tonic::Streaming<proto::SubscribeResponse>,
) -> std::result::Result<Option<proto::SubscribeResponse>, tonic::Status> {
    loop {
        match responses.message().await? {
            Some(message) if message.event.is_none() => {
                tracing::debug!(
                    "a subscription message of a kind this client does not know: passed over"
                );
            }
            other => return Ok(other),
        }
    }
}

/// The positions after an assignment that announced `owned` (each partition with the broker's
/// position in it), `restarted` of them lost and given back since the previous assignment on
/// this stream. The first assignment of a stream (`same_stream` false) places every partition.
/// A later one keeps this consumer's position in the partitions it already owned: the broker's
/// is where it has delivered to, and the records between the two are still buffered here, not
/// taken by the application (a commit of the broker's position would cover them). A restarted
/// partition starts at the broker's offset: another member held it in between (a generation
/// this stream never saw), and may have committed past this member's position.
///
/// Outside a group (`plain`) the partitions are this consumer's for good: one the broker left
/// out (its replicas did not answer; the broker adds it once they do) keeps the position it
/// had, which the next stream names again. Before, it was dropped, and the next stream started
/// it at the configured start ("latest" skipped what it had not read yet).
fn kept_positions(
    before: BTreeMap<u32, u64>,
    owned: BTreeMap<u32, u64>,
    restarted: &BTreeSet<u32>,
    same_stream: bool,
    plain: bool,
) -> BTreeMap<u32, u64> {
    let mut positions: BTreeMap<u32, u64> = if same_stream {
        owned
            .iter()
            .map(|(&partition, &offset)| match before.get(&partition) {
                Some(&mine) if !restarted.contains(&partition) => (partition, mine),
                _ => (partition, offset),
            })
            .collect()
    } else {
        owned.clone()
    };
    if plain {
        for (partition, mine) in before {
            positions.entry(partition).or_insert(mine);
        }
    }
    positions
}

/// How often the client heartbeats: `heartbeat_interval`, and at least three times per session
/// timeout, its own or else the one the broker said is in force (a session of 500 ms with
/// heartbeats every second expired between every two, and the member rejoined under a new id,
/// again and again), never more often than every 10 ms.
fn heartbeat_every(config: &ConsumerConfig, broker_session: Option<Duration>) -> Duration {
    let interval = match config.session_timeout.or(broker_session) {
        Some(session) => config.heartbeat_interval.min(session / 3),
        None => config.heartbeat_interval,
    };
    interval.max(Duration::from_millis(10))
}

/// Whether `event` shows the stream working, so the reconnections counted against
/// `reconnects_max` start over. An assignment does not: a broker announces one on every stream
/// it accepts, also on one it then fails at once (its partitions unreadable), and counting from
/// zero after each let such streams be opened again forever.
fn shows_a_working_stream(event: &Event) -> bool {
    !matches!(event, Event::Assignment(_))
}

/// A task that heartbeats every `interval` on a stream's requests, until the stream is gone.
fn heartbeat_task(
    requests: mpsc::Sender<proto::SubscribeRequest>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let beat = proto::SubscribeRequest {
                request: Some(proto::subscribe_request::Request::Heartbeat(
                    proto::Heartbeat { time_ms: 0 },
                )),
            };
            if requests.send(beat).await.is_err() {
                return;
            }
        }
    })
}

/// Bytes of a record as the broker counts them against credit.
fn message_size(message: &Message) -> u64 {
    (message.key.len()
        + message.value.len()
        + message
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()) as u64
}

impl Consumer {
    pub(crate) async fn new(client: Client, config: ConsumerConfig) -> Result<Consumer> {
        if config.credit_records == 0 || config.credit_bytes == 0 {
            return Err(Error::InvalidArgument(
                "credit_records and credit_bytes must be positive".into(),
            ));
        }
        // (The protocol reads an empty group id as none: a consumer asked to join "" would
        // read as a plain one, then fail on its first commit.)
        if config.group.as_deref().is_some_and(str::is_empty) {
            return Err(Error::InvalidArgument(
                "the group id is empty: give a group of 1 to 249 bytes, or none".into(),
            ));
        }
        // A connection of its own: deliveries not read yet hold no one else's HTTP/2 window.
        let client = client.own_connection()?;
        let mut consumer = Consumer {
            client,
            config,
            requests: None,
            responses: None,
            heartbeat: None,
            buffer: VecDeque::new(),
            positions: BTreeMap::new(),
            committed: BTreeMap::new(),
            member_id: String::new(),
            generation: 0,
            uncredited: (0, 0),
            last_commit: Instant::now(),
            stream_live: false,
            commits_in_flight: 0,
            last_commit_refused: false,
            processing: None,
            stream_opened: Instant::now(),
            quick_ends: 0,
            assigned_on_stream: false,
            broker_session: None,
            heartbeat_interval: Duration::ZERO,
            broker_heartbeat: None,
            last_heard: tokio::time::Instant::now(),
            handed_out: false,
            handed_since_commit: false,
            failures: 0,
            reconnecting: None,
            opening: None,
        };
        // A broker that is starting (its partitions opening) answers UNAVAILABLE: retry as a
        // reconnect would.
        let mut attempt = 0;
        loop {
            match consumer.start().await {
                Ok(()) => return Ok(consumer),
                Err(e) if e.is_retriable() && attempt < consumer.config.reconnects_max => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(20))))
                        .await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Subscribes and waits for the first assignment, which the broker announces before
    /// delivering, so `assignment()` is meaningful once this returns.
    async fn start(&mut self) -> Result<()> {
        self.subscribe().await?;
        loop {
            match self.receive().await? {
                Some(Event::Assignment(_)) => return Ok(()),
                Some(_) => {}
                None => return Err(Error::Closed),
            }
        }
    }

    /// Opens a stream (or goes on waiting for the one a cancelled call left opening) and makes
    /// it the consumer's. Cancel-safe: the call runs in a task of its own.
    async fn subscribe(&mut self) -> Result<()> {
        if self.opening.is_none() {
            self.opening = Some(self.open_stream());
        }
        let Some(opening) = self.opening.as_mut() else {
            return Err(Error::Closed);
        };
        let answer = (&mut opening.call).await;
        let Some(opening) = self.opening.take() else {
            return Err(Error::Closed);
        };
        let failed = |consumer: &mut Self| {
            // A stream that failed to open counts as one that ended at once: the next
            // reconnection waits longer ([`Consumer::begin_reconnect`]), and the stream before
            // it no longer counts as one that worked. Before, the old stream's times stood, and
            // an application calling `next` again after each refusal made a Subscribe call at
            // once, every time.
            consumer.stream_opened = Instant::now();
            consumer.assigned_on_stream = false;
        };
        let responses = match answer {
            Ok(Ok(responses)) => responses,
            Ok(Err(e)) => {
                opening.abort();
                failed(self);
                return Err(e);
            }
            // The task panicked or was aborted: no stream.
            Err(_) => {
                opening.abort();
                failed(self);
                return Err(Error::Closed);
            }
        };
        self.stream_opened = Instant::now();
        self.last_heard = tokio::time::Instant::now();
        // Announced again by this stream's broker (another, maybe, with its own setting).
        self.broker_heartbeat = None;
        self.requests = Some(opening.requests);
        if let Some(old) = self.heartbeat.replace(opening.heartbeat) {
            old.abort();
        }
        self.heartbeat_interval = opening.heartbeat_interval;
        self.responses = Some(responses);
        self.stream_live = true;
        self.assigned_on_stream = false;
        self.commits_in_flight = 0;
        // Records buffered from the old stream were not credited on the new one.
        self.buffer.clear();
        self.uncredited = (0, 0);
        Ok(())
    }

    /// Starts the Subscribe call of a new stream, in a task of its own.
    fn open_stream(&self) -> Opening {
        let (tx, rx) = mpsc::channel(16);
        // Outside a group, a stream after the first names where this consumer got to in every
        // partition it was given; one it was never given was added to the topic since, and all
        // of it came after this consumer started: it is read from its start, whatever the
        // configured start (the latest offset would skip what was published there meanwhile).
        let start = if self.config.group.is_none() && !self.positions.is_empty() {
            StartFrom::Earliest
        } else {
            self.config.start
        };
        let start = match start {
            StartFrom::Earliest => {
                proto::start_position::Position::Earliest(proto::start_position::Earliest {})
            }
            StartFrom::Latest => {
                proto::start_position::Position::Latest(proto::start_position::Latest {})
            }
            StartFrom::Offset(o) => proto::start_position::Position::Offset(o),
            StartFrom::Timestamp(t) => proto::start_position::Position::TimestampMs(t),
        };
        // Outside a group, resume where this consumer got to; in a group the commits decide.
        let resume = if self.config.group.is_some() {
            Vec::new()
        } else {
            self.positions
                .iter()
                .map(|(&partition, &offset)| proto::PartitionOffset { partition, offset })
                .collect()
        };
        let first = proto::SubscribeRequest {
            request: Some(proto::subscribe_request::Request::Start(
                proto::SubscribeStart {
                    topic: self.config.topic.clone(),
                    partitions: self.config.partitions.clone(),
                    group_id: self.config.group.clone().unwrap_or_default(),
                    member_id: self.member_id.clone(),
                    start: Some(proto::StartPosition {
                        position: Some(start),
                    }),
                    resume,
                    credit: Some(proto::Credit {
                        records: self.config.credit_records,
                        bytes: self.config.credit_bytes,
                    }),
                    session_timeout_ms: self
                        .config
                        .session_timeout
                        .map_or(0, |d| d.as_millis() as u32),
                },
            )),
        };
        // The channel is new and empty: there is room.
        let _ = tx.try_send(first);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Ok(topic) = self.config.topic.parse() {
            request
                .metadata_mut()
                .insert(weft_proto::TOPIC_HEADER, topic);
        }
        if let Some(group) = &self.config.group {
            crate::mirror_group(&mut request, group);
        }
        // The stream's headers come at once from a broker that works: a hung one (or a
        // connection that went dead) gets the client's call timeout, not forever.
        let heartbeat_interval = heartbeat_every(&self.config, self.broker_session);
        let heartbeat = heartbeat_task(tx.clone(), heartbeat_interval);
        let timeout = self.client.timeout();
        let mut subscriber = self.client.subscriber();
        let call = tokio::spawn(async move {
            Ok(tokio::time::timeout(timeout, subscriber.subscribe(request))
                .await
                .map_err(|_| Error::Status {
                    code: Code::DeadlineExceeded,
                    message: format!(
                        "the broker did not answer the subscription within {timeout:?}"
                    ),
                    reason: String::new(),
                    leader_id: None,
                })?
                .map_err(Error::from)?
                .into_inner())
        });
        Opening {
            requests: tx,
            call,
            heartbeat,
            heartbeat_interval,
        }
    }

    /// Whether the stream that just ended worked: it announced an assignment and lived at least
    /// [`QUICK_STREAM`].
    fn stream_worked(&self) -> bool {
        self.assigned_on_stream && self.stream_opened.elapsed() >= QUICK_STREAM
    }

    /// Heartbeats every `interval` on the current stream (in place of any before).
    fn start_heartbeats(&mut self, interval: Duration) {
        if let Some(old) = self.heartbeat.take() {
            old.abort();
        }
        let Some(heartbeat_tx) = self.requests.clone() else {
            return;
        };
        self.heartbeat_interval = interval;
        self.heartbeat = Some(heartbeat_task(heartbeat_tx, interval));
    }

    /// How long the stream may stay silent before it is taken as lost: before its first
    /// assignment, [`FIRST_ANSWER_SILENCE_MAX`] (or the client's timeout, if longer); then a few
    /// of the heartbeat intervals its broker announced (at least [`SILENCE_MIN`]). A broker that
    /// announces none (an older build) is not watched: its interval is not known.
    fn silence_max(&self) -> Option<Duration> {
        if !self.assigned_on_stream {
            return Some(FIRST_ANSWER_SILENCE_MAX.max(self.client.timeout()));
        }
        self.broker_heartbeat
            .map(|every| every.saturating_mul(SILENT_HEARTBEATS_MAX).max(SILENCE_MIN))
    }

    /// Receives one event and applies it; None when the stream ended cleanly. A stream on which
    /// nothing came for [`Consumer::silence_max`] fails (UNAVAILABLE, reason STREAM_SILENT):
    /// the broker hung, or something between holds the stream, and only a new stream helps.
    async fn receive(&mut self) -> Result<Option<Event>> {
        if std::mem::take(&mut self.handed_out) {
            self.last_heard = tokio::time::Instant::now();
        }
        let silence = self.silence_max();
        // From when something last came, not from this call: a caller polling with short
        // timeouts still sees a silent stream fail.
        // (Not watched: a day at a time.)
        let until = self.last_heard + silence.unwrap_or(Duration::from_secs(86_400));
        let Some(responses) = self.responses.as_mut() else {
            return Err(Error::Closed);
        };
        let message = match tokio::time::timeout_at(until, next_known(responses)).await {
            Ok(Ok(message)) => {
                self.last_heard = tokio::time::Instant::now();
                message
            }
            Ok(Err(status)) => {
                self.stream_live = false;
                return Err(Error::from(status));
            }
            Err(_) => {
                self.stream_live = false;
                return Err(Error::Status {
                    code: Code::Unavailable,
                    message: format!(
                        "nothing came on the subscription stream for {:?} (its broker \
                         heartbeats every {:?}): taken as lost",
                        silence.unwrap_or_default(),
                        self.broker_heartbeat.unwrap_or_default()
                    ),
                    reason: "STREAM_SILENT".into(),
                    leader_id: None,
                });
            }
        };
        let Some(event) = message.and_then(|m| m.event) else {
            self.stream_live = false;
            return Ok(None);
        };
        match &event {
            Event::Assignment(a) => {
                self.generation = a.generation;
                if a.heartbeat_ms > 0 {
                    self.broker_heartbeat = Some(Duration::from_millis(a.heartbeat_ms.into()));
                }
                // The session timeout in force (the broker's default when this consumer named
                // none) sets how often to heartbeat.
                if a.session_timeout_ms > 0 {
                    self.broker_session = Some(Duration::from_millis(a.session_timeout_ms.into()));
                    let interval = heartbeat_every(&self.config, self.broker_session);
                    if interval != self.heartbeat_interval {
                        self.start_heartbeats(interval);
                    }
                }
                if !a.member_id.is_empty() {
                    self.member_id = a.member_id.clone();
                }
                let owned: BTreeMap<u32, u64> = a
                    .partitions
                    .iter()
                    .map(|p| (p.partition, p.offset))
                    .collect();
                // Partitions given back after another member held them (an older broker names
                // none).
                let restarted: BTreeSet<u32> = a.restarted_partitions.iter().copied().collect();
                // Records of partitions this member lost are dropped (and of those given back:
                // delivery starts over from the assignment's offset), and credited back: the
                // broker counted them against this stream's credit when it sent them.
                let mut dropped = (0u32, 0u64);
                self.buffer.retain(|m| {
                    let keep =
                        owned.contains_key(&m.partition) && !restarted.contains(&m.partition);
                    if !keep {
                        dropped.0 += 1;
                        dropped.1 += message_size(m);
                    }
                    keep
                });
                self.uncredited.0 += dropped.0;
                self.uncredited.1 += dropped.1;
                self.positions = kept_positions(
                    std::mem::take(&mut self.positions),
                    owned,
                    &restarted,
                    self.assigned_on_stream,
                    self.config.group.is_none(),
                );
                self.assigned_on_stream = true;
                self.committed.retain(|p, _| self.positions.contains_key(p));
            }
            Event::Delivery(d) => {
                for record in &d.records {
                    self.buffer.push_back(Message {
                        topic: self.config.topic.clone(),
                        partition: d.partition,
                        offset: record.offset,
                        key: record.key.clone(),
                        value: record.value.clone(),
                        timestamp_ms: record.timestamp_ms,
                        headers: record
                            .headers
                            .iter()
                            .map(|h| (h.key.clone(), h.value.clone()))
                            .collect(),
                    });
                }
            }
            Event::Heartbeat(_) => tracing::debug!(
                topic = %self.config.topic,
                buffered = self.buffer.len(),
                uncredited_records = self.uncredited.0,
                uncredited_bytes = self.uncredited.1,
                positions = ?self.positions,
                "subscription heartbeat"
            ),
            Event::CommitAck(ack) => {
                self.commits_in_flight = self.commits_in_flight.saturating_sub(1);
                // No offsets: refused, the generation it named is no longer current. An
                // automatic commit is then due again at its next interval, under the new
                // generation (the positions of the partitions kept are still uncommitted);
                // before, it counted as done, and a quiet topic left them uncommitted.
                self.last_commit_refused = ack.offsets.is_empty();
                if self.last_commit_refused {
                    self.handed_since_commit = true;
                }
                for o in &ack.offsets {
                    if self.positions.contains_key(&o.partition) {
                        self.committed.insert(o.partition, o.offset);
                    }
                }
            }
        }
        Ok(Some(event))
    }

    /// Notes that the stream ended (`why`): a new one is opened by [`Consumer::reconnect`],
    /// after a wait.
    async fn begin_reconnect(&mut self, why: &Error) {
        tracing::debug!("subscription ended ({why}); reconnecting");
        // A stream that ended right after it opened is not opened again at once: a broker
        // failing every stream (its partition opening, its coordinator taking over) would
        // otherwise see a tight loop of streams, and `next` run through its reconnections in
        // well under a second.
        if self.stream_opened.elapsed() < QUICK_STREAM {
            self.quick_ends = self.quick_ends.saturating_add(1);
        } else {
            self.quick_ends = 0;
        }
        self.reconnecting = Some(Reconnecting {
            at: tokio::time::Instant::now() + reconnect_delay(self.quick_ends),
            attempts: 0,
        });
        // Committed as the member this consumer was (a fenced one's commit is refused), and
        // only then its membership forgotten.
        if self.config.group.is_some() && self.config.auto_commit {
            let _ = self.commit().await;
        }
        if why.reason() == "STALE_GENERATION" {
            // Our membership expired: join as a new member (commits until then come from
            // outside membership: generation 0).
            self.member_id.clear();
            self.generation = 0;
        }
    }

    /// Opens a new stream once the pending reconnection's wait is over, trying again (within
    /// `reconnects_max`) while the broker is unavailable. Cancel-safe: a later call goes on
    /// with the same wait and attempts.
    async fn reconnect(&mut self) -> Result<()> {
        while let Some(pending) = self.reconnecting {
            if self.opening.is_some() {
                // An attempt a cancelled call left under way: its answer, not a new one.
                match self.subscribe().await {
                    Ok(()) => self.reconnecting = None,
                    Err(e)
                        if e.is_retriable() && pending.attempts <= self.config.reconnects_max => {}
                    Err(e) => {
                        self.reconnecting = None;
                        return Err(e);
                    }
                }
                continue;
            }
            if pending.attempts > self.config.reconnects_max {
                // Attempts cut short by the caller's timeouts (a broker that hangs) count too.
                self.reconnecting = None;
                return Err(Error::Status {
                    code: Code::Unavailable,
                    message: format!(
                        "no subscription stream opened in {} attempts",
                        pending.attempts
                    ),
                    reason: "STREAM_NOT_OPENED".into(),
                    leader_id: None,
                });
            }
            tokio::time::sleep_until(pending.at).await;
            // Counted (and the wait before the next one set) before it is made: a caller's
            // timeout that cuts it short has used it all the same.
            let attempts = pending.attempts + 1;
            self.reconnecting = Some(Reconnecting {
                at: tokio::time::Instant::now()
                    + Duration::from_millis(100 * u64::from(attempts.min(20))),
                attempts,
            });
            match self.subscribe().await {
                Ok(()) => self.reconnecting = None,
                Err(e) if e.is_retriable() && attempts <= self.config.reconnects_max => {}
                Err(e) => {
                    self.reconnecting = None;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The next record, waiting as long as it takes. Cancel-safe: dropping the future before it
    /// completes loses no record.
    pub async fn next(&mut self) -> Result<Option<Message>> {
        self.end_processing();
        loop {
            // A reconnection a cancelled call left under way goes on (its records are not
            // taken from the old stream's buffer meanwhile: the new stream starts over).
            if self.reconnecting.is_some() {
                if let Err(e) = self.reconnect().await {
                    self.failures = 0;
                    return Err(e);
                }
                continue;
            }
            // Every await comes before a record is taken, so a caller that drops this future
            // (a timeout, a select) never loses a record: it stays buffered for the next call.
            self.grant_credit().await;
            if !self.buffer.is_empty() {
                if self.config.auto_commit
                    && self.config.group.is_some()
                    && self.last_commit.elapsed() >= self.config.auto_commit_interval
                {
                    // Sent over the stream, not waited for: waiting here (or for a unary call on
                    // the same connection) while this stream's deliveries sit unread can hold
                    // the connection's HTTP/2 window, and with it every call on it.
                    self.send_commit().await;
                }
                if let Some(message) = self.buffer.pop_front() {
                    // The application works on it for as long as it takes: meanwhile the
                    // broker may send nothing (the stream's window full), and that is not
                    // silence. It counts again from the next wait on the stream.
                    self.handed_out = true;
                    self.handed_since_commit = true;
                    self.positions
                        .insert(message.partition, message.offset.saturating_add(1));
                    self.uncredited.0 += 1;
                    self.uncredited.1 += message_size(&message);
                    if weft_proto::otel::enabled() {
                        self.processing = Some(self.process_span(&message));
                    }
                    return Ok(Some(message));
                }
            }
            // Nothing buffered: the records handed out before this call are processed. Once the
            // interval is up their positions are committed, even while no record comes.
            // Before, only the next record's arrival did: a quiet topic kept them uncommitted
            // for as long as it stayed quiet, and a crash then delivered them again.
            let event = match self.auto_commit_due() {
                Some(at) if at <= Instant::now() => {
                    self.send_commit().await;
                    continue;
                }
                Some(at) => {
                    let at = tokio::time::Instant::from_std(at);
                    match tokio::time::timeout_at(at, self.receive()).await {
                        Ok(event) => event,
                        Err(_) => continue,
                    }
                }
                None => self.receive().await,
            };
            match event {
                Ok(Some(event)) => {
                    if shows_a_working_stream(&event) {
                        self.failures = 0;
                    }
                }
                Ok(None) => {
                    // A stream that was assigned and lived a while worked: the count starts over.
                    // (One that failed before its assignment, a partition that cannot open
                    // failing it after a few seconds, did not.)
                    if self.stream_worked() {
                        self.failures = 0;
                    }
                    self.failures += 1;
                    if self.failures > self.config.reconnects_max {
                        // Said once; a later call starts over.
                        self.failures = 0;
                        self.begin_reconnect(&Error::Closed).await;
                        return Err(Error::Closed);
                    }
                    self.begin_reconnect(&Error::Closed).await;
                }
                Err(e) => {
                    let recoverable = e.is_retriable()
                        || e.code() == Some(Code::FailedPrecondition)
                            && e.reason() == "STALE_GENERATION"
                        || e.code() == Some(Code::Cancelled);
                    if self.stream_worked() {
                        self.failures = 0;
                    }
                    self.failures += 1;
                    if !recoverable || self.failures > self.config.reconnects_max {
                        self.failures = 0;
                        if recoverable {
                            // A later call tries again, after the wait.
                            self.begin_reconnect(&e).await;
                        }
                        return Err(e);
                    }
                    self.begin_reconnect(&e).await;
                }
            }
        }
    }

    /// Ends the `process` span of the record returned last, if any.
    fn end_processing(&mut self) {
        use opentelemetry::trace::TraceContextExt;
        if let Some(cx) = self.processing.take() {
            cx.span().end();
        }
    }

    /// The `process` span of a record handed to the application: a child of the record's
    /// creation context (one trace from the producer's `create` through the brokers to here),
    /// linked to it as the messaging conventions ask.
    fn process_span(&self, message: &Message) -> opentelemetry::Context {
        use opentelemetry::KeyValue;
        use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
        let created = message.creation_context();
        let mut attributes = weft_proto::otel::messaging(
            "process",
            "process",
            &message.topic,
            Some(message.partition),
        );
        attributes.push(KeyValue::new(
            weft_proto::otel::OFFSET,
            message.offset as i64,
        ));
        if let Some(group) = &self.config.group {
            attributes.push(KeyValue::new(
                weft_proto::otel::CONSUMER_GROUP,
                group.clone(),
            ));
        }
        let links = weft_proto::otel::links(
            std::iter::once(created.span().span_context().clone()).filter(|sc| sc.is_valid()),
        );
        let tracer = weft_proto::otel::tracer();
        let span = tracer
            .span_builder(format!("process {}", message.topic))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(&tracer, &created);
        opentelemetry::Context::new().with_span(span)
    }

    /// The next record, or None if none arrives within `wait`.
    pub async fn next_timeout(&mut self, wait: Duration) -> Result<Option<Message>> {
        match tokio::time::timeout(wait, self.next()).await {
            Ok(result) => result,
            Err(_) => Ok(None),
        }
    }

    /// Gives back credit for records the application has taken: once half the window is used,
    /// or when everything delivered has been taken.
    async fn grant_credit(&mut self) {
        let (records, bytes) = self.uncredited;
        let half_used =
            records >= self.config.credit_records / 2 || bytes >= self.config.credit_bytes / 2;
        let drained = self.buffer.is_empty() && records > 0;
        if (half_used || drained)
            && let Some(tx) = &self.requests
        {
            let credit = proto::SubscribeRequest {
                request: Some(proto::subscribe_request::Request::Credit(proto::Credit {
                    records,
                    bytes,
                })),
            };
            if tx.send(credit).await.is_ok() {
                self.uncredited = (0, 0);
            }
        }
    }

    /// Commits the positions reached (the offset after the last record returned by `next`) in
    /// every owned partition. Group consumers only.
    pub async fn commit(&mut self) -> Result<()> {
        let Some(group) = self.config.group.clone() else {
            return Err(Error::InvalidArgument("only group consumers commit".into()));
        };
        let changed = self.uncommitted();
        self.last_commit = Instant::now();
        if changed.is_empty() && self.commits_in_flight == 0 {
            return Ok(());
        }
        // Over the open stream, reading it while waiting for the acknowledgement: a unary call
        // could wait behind this stream's unread deliveries for the connection's window.
        if self.stream_live
            && (changed.is_empty() || self.send_stream_commit(changed.clone()).await)
        {
            return self.await_commit_acks().await;
        }
        if changed.is_empty() {
            return Ok(());
        }
        let request = self.client.group_request(
            proto::CommitOffsetsRequest {
                group_id: group.clone(),
                member_id: self.member_id.clone(),
                generation: self.generation,
                topic: self.config.topic.clone(),
                offsets: changed.clone(),
                reset: false,
            },
            Some(&self.config.topic),
            &group,
        );
        self.client
            .subscriber()
            .commit_offsets(request)
            .await
            .map_err(Error::from)?;
        for o in changed {
            self.committed.insert(o.partition, o.offset);
        }
        Ok(())
    }

    /// When the positions of records handed out are due to be committed by auto-commit; None
    /// when there is nothing to commit (or auto-commit is off, or no stream to send it on).
    fn auto_commit_due(&self) -> Option<Instant> {
        let on = self.config.auto_commit && self.config.group.is_some() && self.stream_live;
        (on && self.handed_since_commit && self.commits_in_flight == 0)
            .then(|| self.last_commit + self.config.auto_commit_interval)
    }

    /// The positions not committed yet, as a commit names them.
    fn uncommitted(&self) -> Vec<proto::PartitionOffset> {
        self.positions
            .iter()
            .filter(|(p, o)| self.committed.get(p) != Some(o))
            .map(|(&partition, &offset)| proto::PartitionOffset { partition, offset })
            .collect()
    }

    /// Sends `offsets` as a commit over the open stream; whether it went.
    async fn send_stream_commit(&mut self, offsets: Vec<proto::PartitionOffset>) -> bool {
        let Some(tx) = &self.requests else {
            return false;
        };
        let commit = proto::SubscribeRequest {
            request: Some(proto::subscribe_request::Request::Commit(
                proto::StreamCommit {
                    generation: self.generation,
                    offsets,
                },
            )),
        };
        let sent = tx.send(commit).await.is_ok();
        if sent {
            self.commits_in_flight += 1;
        }
        sent
    }

    /// The automatic commit: the positions reached, over the stream, without waiting for the
    /// acknowledgement (it arrives with the deliveries). At most one is outstanding.
    async fn send_commit(&mut self) {
        self.last_commit = Instant::now();
        if !self.stream_live || self.commits_in_flight > 0 {
            return;
        }
        let changed = self.uncommitted();
        if !changed.is_empty() {
            self.send_stream_commit(changed).await;
        }
        self.handed_since_commit = false;
    }

    /// Reads the stream until every commit sent over it is acknowledged, buffering what arrives
    /// meanwhile (bounded by the credit, which is not renewed while waiting), within the
    /// client's timeout.
    async fn await_commit_acks(&mut self) -> Result<()> {
        let timeout = self.client.timeout();
        let wait = async {
            while self.commits_in_flight > 0 {
                match self.receive().await? {
                    Some(_) => {}
                    None => return Err(Error::Closed),
                }
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(())) if self.last_commit_refused => Err(Error::Status {
                code: Code::FailedPrecondition,
                message: format!(
                    "the commit was refused: generation {} of group {:?} is no longer current (the group rebalanced); the new assignment follows",
                    self.generation,
                    self.config.group.as_deref().unwrap_or_default()
                ),
                reason: "STALE_GENERATION".into(),
                leader_id: None,
            }),
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(format!(
                "commit not acknowledged within {timeout:?}"
            ))),
        }
    }

    /// Partitions this consumer owns now (outside a group, also those the broker left out of
    /// its stream for now, their replicas not answering: it reads them once they answer).
    pub fn assignment(&self) -> Vec<u32> {
        self.positions.keys().copied().collect()
    }

    /// The position (next offset to return) per owned partition (see [`Consumer::assignment`]).
    pub fn positions(&self) -> &BTreeMap<u32, u64> {
        &self.positions
    }

    /// The group generation of the current assignment (0 outside a group).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This member's id in its group.
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// Commits (when automatic commits are on) and closes the stream cleanly: a group member
    /// leaves its group at once, so the others take over its partitions without waiting for its
    /// session to expire. A closing commit refused because the group rebalanced meanwhile is
    /// not an error (as in Kafka's `close`): the partitions are others' now, and they go on
    /// from the group's last commit, so records read since may come to them again.
    pub async fn close(mut self) -> Result<()> {
        self.end_processing();
        let result = if self.config.group.is_some() && self.config.auto_commit {
            match self.commit().await {
                Err(e) if e.reason() == "STALE_GENERATION" => {
                    tracing::warn!("the closing commit was refused, the group rebalanced: {e}");
                    Ok(())
                }
                other => other,
            }
        } else {
            Ok(())
        };
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        // A stream being opened (a reconnection) is not finished: the LeaveGroup below tells the
        // group, whether or not the broker took it up.
        if let Some(opening) = self.opening.take() {
            opening.abort();
        }
        // End our side of the stream, then let the broker finish it.
        self.requests.take();
        let responses = self.responses.take();
        let had_stream = match responses {
            Some(mut responses) if self.stream_live => {
                let drain = async { while let Ok(Some(_)) = responses.message().await {} };
                let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
                true
            }
            _ => false,
        };
        // Without a live stream (closed mid-rejoin, or while reconnecting: the stream that
        // ended is not this member's any more), closing it told the group nothing: leave.
        if !had_stream && let Some(leave) = self.leave_call() {
            let _ = leave.await;
        }
        self.member_id.clear();
        self.generation = 0;
        result
    }

    /// A LeaveGroup for this member, when it is one.
    fn leave_call(&self) -> Option<impl std::future::Future<Output = Result<()>> + use<>> {
        let group = self.config.group.clone()?;
        if self.member_id.is_empty() {
            return None;
        }
        let request = self.client.group_request(
            proto::LeaveGroupRequest {
                group_id: group.clone(),
                member_id: self.member_id.clone(),
            },
            Some(&self.config.topic),
            &group,
        );
        let mut subscriber = self.client.subscriber();
        Some(async move {
            subscriber
                .leave_group(request)
                .await
                .map(|_| ())
                .map_err(Error::from)
        })
    }
}

impl Drop for Consumer {
    /// A group member dropped without [`Consumer::close`] leaves its group (in the background,
    /// on the current Tokio runtime), so the others take its partitions over at once instead of
    /// when its session expires.
    fn drop(&mut self) {
        self.end_processing();
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if let Some(opening) = self.opening.take() {
            opening.abort();
        }
        self.requests.take();
        self.responses.take();
        if let (Some(leave), Ok(runtime)) =
            (self.leave_call(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = leave.await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message whose event this build does not know (a newer broker's: field 9 here) is
    /// passed over; the next known one is read. Before, it read as the end of the stream.
    #[tokio::test]
    async fn a_message_of_an_unknown_kind_is_passed_over() {
        use prost::Message as _;
        use tonic::codec::Codec as _;
        let frame = |body: &[u8]| {
            let mut framed = vec![0u8];
            framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
            framed.extend_from_slice(body);
            framed
        };
        let known = proto::SubscribeResponse {
            event: Some(Event::Heartbeat(proto::Heartbeat { time_ms: 7 })),
        };
        let mut body = frame(&[0x48, 0x01]);
        body.extend(frame(&known.encode_to_vec()));
        let stream = || {
            let mut codec = tonic_prost::ProstCodec::<
                proto::SubscribeRequest,
                proto::SubscribeResponse,
            >::default();
            tonic::Streaming::new_response(
                codec.decoder(),
                http_body_util::Full::new(bytes::Bytes::from(body.clone())),
                tonic::codegen::http::StatusCode::OK,
                None,
                None,
            )
        };
        // Read as it comes, the first message has no event (what was taken for the end).
        let raw = stream().message().await.expect("decoded");
        assert_eq!(raw, Some(proto::SubscribeResponse { event: None }));
        let first = next_known(&mut stream()).await.expect("decoded");
        assert_eq!(first, Some(known));
    }

    /// A later assignment on a stream keeps this consumer's own position in the partitions it
    /// owned, unless the broker says one restarted (given back after another member held it);
    /// a broker that names none (an older one) leaves every owned partition kept.
    #[test]
    fn positions_are_kept_unless_a_partition_restarted() {
        let before = BTreeMap::from([(0, 10), (1, 20)]);
        let owned = BTreeMap::from([(0, 100), (1, 200), (2, 5)]);
        let none = BTreeSet::new();
        assert_eq!(
            kept_positions(before.clone(), owned.clone(), &none, true, false),
            BTreeMap::from([(0, 10), (1, 20), (2, 5)])
        );
        assert_eq!(
            kept_positions(
                before.clone(),
                owned.clone(),
                &BTreeSet::from([1]),
                true,
                false
            ),
            BTreeMap::from([(0, 10), (1, 200), (2, 5)])
        );
        assert_eq!(
            kept_positions(before.clone(), owned.clone(), &none, false, false),
            owned,
            "a stream's first assignment places every partition"
        );
        // A group member loses what it is not given; a plain consumer keeps its place in a
        // partition the broker left out for now.
        let given = BTreeMap::from([(0, 100)]);
        assert_eq!(
            kept_positions(before.clone(), given.clone(), &none, false, false),
            given
        );
        assert_eq!(
            kept_positions(before.clone(), given.clone(), &none, false, true),
            BTreeMap::from([(0, 100), (1, 20)])
        );
        assert_eq!(
            kept_positions(before, given, &none, true, true),
            BTreeMap::from([(0, 10), (1, 20)])
        );
    }

    /// A stream that lived is opened again at once; streams that end right after opening wait
    /// longer and longer, at most 2 s (30 reconnections then span about 45 s, not a few ms).
    #[test]
    fn quick_stream_ends_wait_longer_before_the_next_stream() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::from_millis(100));
        assert_eq!(reconnect_delay(5), Duration::from_millis(500));
        assert_eq!(reconnect_delay(20), Duration::from_secs(2));
        assert_eq!(reconnect_delay(u32::MAX), Duration::from_secs(2));
        let total: Duration = (1..=ConsumerConfig::new("t").reconnects_max)
            .map(reconnect_delay)
            .sum();
        assert!(total > Duration::from_secs(30), "{total:?}");
    }

    /// Streams that fail right after their assignment count against `reconnects_max`; records,
    /// heartbeats and commit acknowledgements show a working stream.
    #[test]
    fn only_a_working_stream_resets_the_reconnections_counted() {
        assert!(!shows_a_working_stream(&Event::Assignment(
            proto::Assignment::default()
        )));
        assert!(shows_a_working_stream(&Event::Delivery(
            proto::Delivery::default()
        )));
        assert!(shows_a_working_stream(&Event::Heartbeat(
            proto::Heartbeat::default()
        )));
        assert!(shows_a_working_stream(&Event::CommitAck(
            proto::CommitAck::default()
        )));
    }
}
