//! The cluster fixture for integration tests: real `weft-broker` processes, each in its own
//! temporary data directory, listening on free ports on 127.0.0.1, stopped by the test (or on
//! drop). Helpers to stop gracefully, kill -9 and restart a broker, run the `weft` CLI against it,
//! and make plain HTTP/1.1 requests to its admin port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

static BUILD: Once = Once::new();

/// The directory holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Builds `weft-broker`, `weft`, `weft-bench` and `weft-jepsen` once per test process (a no-op when they are up to date).
pub fn ensure_binaries() {
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // Cargo gives a test process its package's variables (CARGO_PKG_NAME, CARGO_MANIFEST_DIR
        // ...); build scripts that track them (ring's) would see them change from the shell's
        // build and rebuild everything above them. Build with the shell's environment.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || name.starts_with("CARGO_BIN_")
                || matches!(
                    &*name,
                    "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
            {
                build.env_remove(&*name);
            }
        }
        let status = build
            .args([
                "build",
                "--locked",
                // The same features as the workspace build that built this test (the tests
                // crate turns on the broker's sync journal), so this build is a no-op then.
                "--features",
                "weft-broker/sync-journal",
                "-p",
                "weft-broker",
                "-p",
                "weft-client",
                "-p",
                "weft-bench",
                "-p",
                "weft-jepsen",
                "--bins",
                "--examples",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
}

/// Path of a workspace binary.
pub fn binary(name: &str) -> PathBuf {
    ensure_binaries();
    bin_dir().join(name)
}

/// A running broker process.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    dir: PathBuf,
    data_dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    /// Client gRPC address.
    pub client_addr: String,
    /// Admin HTTP address.
    pub admin_addr: String,
    /// Peer gRPC address.
    pub peer_addr: String,
    /// QUIC (HTTP/3) address, when the broker has a QUIC listener (else empty).
    pub quic_addr: String,
    extra: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Broker {
    /// Starts a broker in a new temporary directory.
    pub fn start() -> Broker {
        Self::start_with(&[])
    }

    /// Starts a broker with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Broker {
        let tempdir = tempfile::tempdir().expect("tempdir");
        let data_dir = tempdir.path().join("data");
        Self::start_at(tempdir, data_dir, extra)
    }

    /// Starts a broker whose data lives in `data_dir` (a filesystem the test prepared, say),
    /// logging into `dir`.
    pub fn start_at(dir: tempfile::TempDir, data_dir: PathBuf, extra: &[&str]) -> Broker {
        let tempdir = dir;
        let dir = tempdir.path().to_path_buf();
        let mut broker = Broker {
            child: None,
            dir,
            data_dir,
            _tempdir: Some(tempdir),
            client_addr: String::new(),
            admin_addr: String::new(),
            peer_addr: String::new(),
            quic_addr: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            envs: Vec::new(),
        };
        broker.spawn();
        broker
    }

    /// Starts a broker with extra arguments and environment variables (on top of a clean
    /// environment: no inherited `WEFT_*`).
    pub fn start_with_env(extra: &[&str], envs: &[(&str, &str)]) -> Broker {
        let mut broker = Broker::unstarted(extra, envs);
        broker.spawn();
        broker
    }

    /// Starts a broker on the given client, peer and admin addresses (a cluster's brokers must
    /// know each other's peer addresses before they start: see [`free_port`]), retrying for up
    /// to 10 s while a port is taken.
    pub fn start_on(listen: [String; 3], extra: &[&str], envs: &[(&str, &str)]) -> Broker {
        let mut broker = Broker::unstarted(extra, envs);
        let [client, peer, admin] = listen;
        broker.client_addr = client;
        broker.peer_addr = peer;
        broker.admin_addr = admin;
        broker.start_again_same_ports();
        broker
    }

    /// A broker not started yet, in a new temporary directory.
    fn unstarted(extra: &[&str], envs: &[(&str, &str)]) -> Broker {
        let tempdir = tempfile::tempdir().expect("tempdir");
        let dir = tempdir.path().to_path_buf();
        Broker {
            child: None,
            data_dir: dir.join("data"),
            dir,
            _tempdir: Some(tempdir),
            client_addr: String::new(),
            admin_addr: String::new(),
            peer_addr: String::new(),
            quic_addr: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The broker's working directory (its log is `broker.log`; data lives in `data/` unless
    /// the test chose another data directory).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn spawn(&mut self) {
        if let Err(why) = self.try_spawn(["127.0.0.1:0"; 3]) {
            panic!("{why}");
        }
    }

    /// Starts the broker on the given client, peer and admin addresses; Err if it exited
    /// before it was ready (with its log).
    fn try_spawn(&mut self, listen: [&str; 3]) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .expect("log file");
        let mut command = Command::new(binary("weft-broker"));
        // A clean environment: a WEFT_* variable in the developer's shell (or CI's) must not
        // change what the test runs.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WEFT_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .args(["--data-dir", self.data_dir.to_str().expect("utf-8 path")])
            .args([
                "--client-listen",
                listen[0],
                "--peer-listen",
                listen[1],
                "--admin-listen",
                listen[2],
            ])
            .args(&self.extra)
            // WEFT_TEST_BROKER_LOG (a tracing filter) sets the brokers' log level when a test
            // is debugged.
            .env(
                "WEFT_LOG",
                std::env::var("WEFT_TEST_BROKER_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn,sled=warn".into()),
            )
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn weft-broker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("weft-broker ready:") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child
                    .wait()
                    .map_or_else(|e| format!("wait: {e}"), |s| s.to_string());
                return Err(format!(
                    "broker did not start ({status}); log:\n{}",
                    self.log()
                ));
            }
        };
        for field in line.split_whitespace() {
            if let Some((key, value)) = field.split_once('=') {
                match key {
                    "client" => self.client_addr = value.to_string(),
                    "admin" => self.admin_addr = value.to_string(),
                    "peer" => self.peer_addr = value.to_string(),
                    "quic" => self.quic_addr = value.to_string(),
                    _ => {}
                }
            }
        }
        self.child = Some(child);
        Ok(())
    }

    /// Starts a stopped or killed broker again on the ports it had, so clients connected to it
    /// reconnect by themselves (as to a restarted pod behind a stable address). A port taken in
    /// the meantime is retried for up to 10 s.
    pub fn start_again_same_ports(&mut self) {
        assert!(self.child.is_none(), "broker still running");
        let listen = [
            self.client_addr.clone(),
            self.peer_addr.clone(),
            self.admin_addr.clone(),
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_spawn([&listen[0], &listen[1], &listen[2]]) {
                Ok(()) => return,
                Err(why) if why.contains("cannot listen") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    /// Starts a stopped broker again expecting it to stop by itself before it is ready: it
    /// never prints its ready line, so it never took a call. Returns why it did not start (its
    /// exit status and log). Panics if it becomes ready.
    pub fn start_again_expecting_exit(&mut self) -> String {
        assert!(self.child.is_none(), "broker still running");
        match self.try_spawn(["127.0.0.1:0"; 3]) {
            Ok(()) => panic!("the broker became ready; log:\n{}", self.log()),
            Err(why) => why,
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    /// SIGTERM, and waits for a graceful exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "broker did not stop within 30 s after SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the process keeps its sockets and files but does nothing (a hung broker, or
    /// one cut off from its peers without any connection closing).
    ///
    /// Returns once every thread of the broker is stopped: a signal is delivered
    /// asynchronously, and a thread running on another core could otherwise still answer a
    /// request sent right after this call.
    pub fn pause(&self) {
        self.signal(rustix::process::Signal::STOP);
        let pid = self.child.as_ref().expect("the broker runs").id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .expect("the broker's threads")
                .filter_map(|t| t.ok())
                .map(|t| std::fs::read_to_string(t.path().join("stat")).unwrap_or_default());
            // The state follows the command name's closing parenthesis: T when stopped (R, S,
            // D, I or W while it may still run).
            let running = tasks
                .filter(|stat| {
                    stat.rsplit_once(')').is_some_and(|(_, rest)| {
                        rest.trim_start().starts_with(['R', 'S', 'D', 'I', 'W'])
                    })
                })
                .count();
            if running == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{running} broker threads still running 10 s after SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT after [`Broker::pause`].
    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().expect("the broker runs");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a pid");
        rustix::process::kill_process(pid, signal).expect("signal the broker");
    }

    /// The running broker's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("the broker runs").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc/<pid>/status")
            * 1024
    }

    /// kill -9: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker gracefully and starts it again on the same data directory (new ports);
    /// returns once it is ready (`/readyz` 200: every partition opened and replayed). Tests of
    /// what happens before then use [`Broker::stop`] and [`Broker::start_again`].
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready();
    }

    /// Waits until `/readyz` answers 200 (at most 60 s).
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.http("GET", "/readyz", None);
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the broker was not ready within 60 s: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a stopped or killed broker again.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "broker still running");
        self.spawn();
    }

    /// Sets an environment variable for the broker's next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_string(), value.to_string()));
    }

    /// Waits up to `limit` for the broker to exit by itself; its exit code (None: killed by a
    /// signal). Panics, with its log, if it is still running then.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("the broker runs");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("broker still running after {limit:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client connected to this broker.
    pub async fn client(&self) -> weft_client::Client {
        weft_client::Client::connect([self.client_addr.as_str()])
            .await
            .expect("connect")
    }

    /// Runs the `weft` CLI against this broker.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, "")
    }

    /// Runs the `weft` CLI with `stdin` as its input.
    pub fn cli_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(binary("weft"))
            .args(["--server", &self.client_addr])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("weft output")
    }

    /// A plain HTTP/1.1 request to the admin port: (status, body).
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(&self.admin_addr, method, path, body)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // The test failed: its broker's log says why, and the temporary directory goes.
            let log = self.log();
            if let Ok(keep) = std::env::var("WEFT_TEST_KEEP_LOGS") {
                let _ = std::fs::create_dir_all(&keep);
                let name = self.peer_addr.replace([':', '.'], "_");
                let _ = std::fs::write(
                    std::path::Path::new(&keep).join(format!("{name}.log")),
                    &log,
                );
            }
            let lines: Vec<&str> = log.lines().collect();
            if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
                // A panic's message is what explains it; its backtrace would push it out of the tail.
                eprintln!("--- the broker panicked ({}) ---", self.dir.display());
                for line in lines.iter().skip(at.saturating_sub(2)).take(6) {
                    eprintln!("{line}");
                }
            }
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- last lines of the broker's log ({}) ---",
                self.dir.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A minimal HTTP/1.1 client (Connection: close): (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with_headers(addr, method, path, body, &[])
}

/// [`http`] with extra request headers (`authorization`, say).
pub fn http_with_headers(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect admin");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    parse_http_response(&response)
}

/// An HTTP/1.1 response read to its end: (status, body), chunked bodies joined.
pub fn parse_http_response(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies: strip the chunk-size lines.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// stdout of a CLI run as text, asserting success.
pub fn ok_stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "weft failed ({:?}): {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Plain gRPC clients (generated code only, no `weft-client` logic), with message limits large
/// enough for tests that move batches of several MiB.
pub mod grpc {
    use tonic::transport::Channel;
    use weft_proto::v1::publisher_client::PublisherClient;
    use weft_proto::v1::subscriber_client::SubscriberClient;
    use weft_proto::v1::topic_admin_client::TopicAdminClient;

    const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

    /// A channel to `address` (host:port).
    pub async fn channel(address: &str) -> Channel {
        Channel::from_shared(format!("http://{address}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// A Publisher client.
    pub fn publisher(channel: &Channel) -> PublisherClient<Channel> {
        PublisherClient::new(channel.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// The sending half and the answers of a raw Subscribe stream.
    pub type SubscribeStream = (
        tokio::sync::mpsc::Sender<weft_proto::v1::SubscribeRequest>,
        tonic::Streaming<weft_proto::v1::SubscribeResponse>,
    );

    /// Opens a raw Subscribe stream to `address` whose first message is `start`.
    pub async fn subscribe(
        address: &str,
        start: weft_proto::v1::SubscribeStart,
    ) -> SubscribeStream {
        let channel = channel(address).await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(weft_proto::v1::SubscribeRequest {
            request: Some(weft_proto::v1::subscribe_request::Request::Start(start)),
        })
        .await
        .expect("queue the start");
        let responses = subscriber(&channel)
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("subscribe")
            .into_inner();
        (tx, responses)
    }

    /// The next group assignment on a Subscribe stream at generation `at_least` or later
    /// (skipping deliveries, heartbeats and older assignments).
    pub async fn next_assignment(
        responses: &mut tonic::Streaming<weft_proto::v1::SubscribeResponse>,
        at_least: u64,
    ) -> weft_proto::v1::Assignment {
        loop {
            match responses
                .message()
                .await
                .expect("stream")
                .expect("open")
                .event
            {
                Some(weft_proto::v1::subscribe_response::Event::Assignment(a))
                    if a.generation >= at_least =>
                {
                    return a;
                }
                _ => continue,
            }
        }
    }

    /// The next commit acknowledgement on a Subscribe stream (skipping other events).
    pub async fn next_commit_ack(
        responses: &mut tonic::Streaming<weft_proto::v1::SubscribeResponse>,
    ) -> weft_proto::v1::CommitAck {
        loop {
            if let Some(weft_proto::v1::subscribe_response::Event::CommitAck(ack)) = responses
                .message()
                .await
                .expect("stream")
                .expect("open")
                .event
            {
                return ack;
            }
        }
    }

    /// A Subscriber client.
    pub fn subscriber(channel: &Channel) -> SubscriberClient<Channel> {
        SubscriberClient::new(channel.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// A TopicAdmin client.
    pub fn topic_admin(channel: &Channel) -> TopicAdminClient<Channel> {
        TopicAdminClient::new(channel.clone())
    }
}

/// A cluster of `size` brokers (node ids 1..=size, each knowing the others from `--peers`),
/// every one ready. Each broker listens on its own loopback address 127.0.0.x (x picked at
/// random per cluster), so a broker restarted on its ports does not find one of them taken by a
/// server of another test that was handed the port on 127.0.0.1 meanwhile.
pub fn start_cluster(size: u64) -> Vec<Broker> {
    start_cluster_with(size, &[])
}

/// [`start_cluster`] with more flags for every broker.
pub fn start_cluster_with(size: u64, extra: &[&str]) -> Vec<Broker> {
    start_cluster_env(size, extra, &[])
}

/// [`start_cluster`] with more flags and environment variables for every broker.
pub fn start_cluster_env(size: u64, extra: &[&str], envs: &[(&str, &str)]) -> Vec<Broker> {
    start_cluster_each(
        size,
        |_| extra.iter().map(|a| a.to_string()).collect(),
        envs,
    )
}

/// [`start_cluster`] with flags of each broker's own: `extra(i)` for node `i + 1` (a config
/// file per broker, say), and environment variables for every broker.
pub fn start_cluster_each(
    size: u64,
    extra: impl Fn(usize) -> Vec<String>,
    envs: &[(&str, &str)],
) -> Vec<Broker> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
        ^ u64::from(std::process::id());
    let first = 2 + seed % (250 - size);
    let listen: Vec<[String; 3]> = (0..size)
        .map(|i| {
            let ip = format!("127.0.0.{}", first + i);
            [(); 3].map(|()| format!("{ip}:{}", free_port_on(&ip)))
        })
        .collect();
    let peers = listen
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{}@{}", i + 1, l[1]))
        .collect::<Vec<_>>()
        .join(",");
    // The seed (node 1) last: it asks the others whether they have a cluster before it starts
    // one, and those already listening answer at once that they have none.
    let mut brokers: Vec<Broker> = listen
        .into_iter()
        .enumerate()
        .rev()
        .map(|(i, l)| {
            let id = (i + 1).to_string();
            let own = extra(i);
            let mut args = vec!["--node-id", &id, "--peers", &peers];
            args.extend(own.iter().map(String::as_str));
            Broker::start_on(l, &args, envs)
        })
        .collect();
    brokers.reverse();
    for broker in &brokers {
        broker.wait_ready();
    }
    brokers
}

/// One idempotent publish (producer 77, epoch 0) of `value` to `topic`/`partition` at `sequence`, tried on each broker
/// in turn until one acknowledges it (a broker that is down, or has no leader yet, answers
/// UNAVAILABLE or cannot be reached); a retry of an ambiguous attempt reuses the sequence, so
/// the partition stores it once. Returns the offset and the failed attempts.
pub async fn publish_until_acknowledged(
    addresses: &[String],
    topic: &str,
    partition: u32,
    sequence: u64,
    value: &str,
) -> (u64, usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut attempt = 0usize;
    loop {
        let address = &addresses[attempt % addresses.len()];
        attempt += 1;
        let call = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .expect("endpoint")
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut request = tonic::Request::new(weft_proto::v1::PublishRequest {
                topic: topic.into(),
                target: Some(weft_proto::v1::publish_request::Target::Partition(
                    partition,
                )),
                records: vec![weft_proto::v1::Record {
                    value: value.as_bytes().to_vec().into(),
                    ..weft_proto::v1::Record::default()
                }],
                producer_id: 77,
                producer_epoch: 0,
                base_sequence: sequence,
                ..weft_proto::v1::PublishRequest::default()
            });
            request.set_timeout(Duration::from_secs(5));
            grpc::publisher(&channel).publish(request).await
        };
        match call.await {
            Ok(response) => return (response.into_inner().base_offset, attempt - 1),
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Cancelled
                            | tonic::Code::Unknown
                    ),
                    "publish of {value}: {status:?}"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "{value} not acknowledged within 90 s: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Starts one more broker (node id `brokers.len() + 1`, on the next 127.0.0.x address) that
/// joins the running cluster of `brokers` (started by [`start_cluster`]); waits until it serves.
pub fn add_broker(brokers: &[Broker], extra: &[&str]) -> Broker {
    let broker = add_broker_env(brokers, extra, &[]);
    broker.wait_ready();
    broker
}

/// [`add_broker`] with environment variables, returning once the broker has printed that it
/// listens (before it has joined, and without waiting until it is ready: it may be refused).
pub fn add_broker_env(brokers: &[Broker], extra: &[&str], envs: &[(&str, &str)]) -> Broker {
    let last = brokers.last().expect("a cluster");
    let ip: std::net::Ipv4Addr = last
        .peer_addr
        .rsplit_once(':')
        .and_then(|(ip, _)| ip.parse().ok())
        .expect("an IPv4 peer address");
    let [a, b, c, d] = ip.octets();
    let ip = std::net::Ipv4Addr::new(a, b, c, d + 1).to_string();
    let listen = [(); 3].map(|()| format!("{ip}:{}", free_port_on(&ip)));
    let id = (brokers.len() + 1).to_string();
    let peers = brokers
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{}@{}", i + 1, b.peer_addr))
        .chain(std::iter::once(format!("{id}@{}", listen[1])))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["--node-id", &id, "--peers", &peers];
    args.extend_from_slice(extra);
    Broker::start_on(listen, &args, envs)
}

/// A port that was free a moment ago on 127.0.0.1 (for a server that must know its peers'
/// addresses before they start; [`Broker::start_on`] retries when one was taken meanwhile).
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A port that was free a moment ago on the loopback address `ip`, chosen at random below the
/// kernel's ephemeral range: bind(0) hands out ports of that range, which outgoing connections
/// take too, so a port picked there could be taken by another test's connection before the
/// broker binds it (seen in CI: "Address already in use" on a cluster broker's port).
pub fn free_port_on(ip: &str) -> u16 {
    use rand::Rng;
    let ephemeral_min = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = ephemeral_min.saturating_sub(16_000).max(1024);
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(low..ephemeral_min.max(low + 1));
        if std::net::TcpListener::bind((ip, port)).is_ok() && reserve_port(ip, port) {
            return port;
        }
    }
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Claims `ip:port` for this test process, across the test processes running at once: a lock
/// on a file per port, held until the process exits (the kernel then releases it, whatever
/// the way it ended). A cluster broker keeps its ports across restarts, and while it was down
/// another test saw its port free and gave it to a broker of its own (seen in CI: "Address
/// already in use" restarting a cluster broker).
fn reserve_port(ip: &str, port: u16) -> bool {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("weft-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(format!("{ip}-{port}")))
    else {
        return true;
    };
    // Another open of the file conflicts, in this process too.
    if file.try_lock().is_err() {
        return false;
    }
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
    true
}

/// What `future` gives, or a panic naming `what` once `limit` has passed.
pub async fn within<T>(
    what: &str,
    limit: Duration,
    future: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Reads nothing for 4 s (the topic is idle), and checks the member kept its id and its
/// generation meanwhile (no expiry, no rejoin); then closes it.
pub async fn stays_idle_for_4_s(mut member: weft_client::Consumer) {
    let (id, generation) = (member.member_id().to_string(), member.generation());
    let began = std::time::Instant::now();
    while began.elapsed() < Duration::from_secs(4) {
        assert!(
            member
                .next_timeout(Duration::from_millis(200))
                .await
                .expect("next")
                .is_none()
        );
    }
    assert_eq!(member.member_id(), id, "the member kept its id");
    assert_eq!(member.generation(), generation, "no rebalance");
    member.close().await.expect("close");
}

/// Polls `probe` every 20 ms until it returns Some, failing the test with `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One partition's bounds from GetOffsets, and the group's committed offset if `group` is given.
/// Err is the gRPC status (UNAVAILABLE while the partition is opening, say).
pub async fn offsets(
    address: &str,
    topic: &str,
    partition: u32,
    group: Option<&str>,
) -> Result<weft_proto::v1::PartitionOffsets, tonic::Status> {
    let channel = grpc::channel(address).await;
    let response = grpc::subscriber(&channel)
        .get_offsets(weft_proto::v1::GetOffsetsRequest {
            topic: topic.into(),
            partitions: vec![partition],
            group_id: group.unwrap_or_default().into(),
            timestamp_ms: None,
        })
        .await?
        .into_inner();
    Ok(response
        .partitions
        .into_iter()
        .next()
        .expect("one partition"))
}

/// Reads offsets `from .. until` of a partition with Fetch (never judging "done" by an idle
/// gap: it reads exactly up to `until`). Returns (offset, value) in order; panics on an error
/// (see [`try_fetch_range`] for probes that retry).
pub async fn fetch_range(
    address: &str,
    topic: &str,
    partition: u32,
    from: u64,
    until: u64,
) -> Vec<(u64, bytes::Bytes)> {
    try_fetch_range(address, topic, partition, from, until)
        .await
        .unwrap_or_else(|(next, status)| panic!("fetch {topic}/{partition} at {next}: {status:?}"))
}

/// [`fetch_range`], answering the first refused Fetch (its offset and status) instead of
/// panicking: for probes that wait until a replica is open and caught up (a replica still
/// replaying answers UNAVAILABLE).
pub async fn try_fetch_range(
    address: &str,
    topic: &str,
    partition: u32,
    from: u64,
    until: u64,
) -> Result<Vec<(u64, bytes::Bytes)>, (u64, tonic::Status)> {
    let channel = grpc::channel(address).await;
    let mut subscriber = grpc::subscriber(&channel);
    let mut out = Vec::new();
    let mut next = from;
    while next < until {
        let response = subscriber
            .fetch(weft_proto::v1::FetchRequest {
                topic: topic.into(),
                partition,
                offset: next,
                max_bytes: 4 * 1024 * 1024,
                max_wait_ms: 5_000,
                min_bytes: 1,
                max_records: 0,
            })
            .await
            .map_err(|status| (next, status))?
            .into_inner();
        assert!(
            !response.records.is_empty(),
            "fetch at {next} returned nothing although the high watermark is {}",
            response.high_watermark
        );
        for record in response.records {
            if record.offset >= until {
                return Ok(out);
            }
            out.push((record.offset, record.value));
        }
        next = response.next_offset;
    }
    Ok(out)
}

/// The value of a Prometheus sample `name{labels}` scraped from the broker's /metrics (labels in
/// the order the exporter prints them), or None when absent.
pub fn metric(broker: &Broker, name_and_labels: &str) -> Option<f64> {
    let (status, body) = broker.http("GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Packet filter rules a test adds (iptables, as root) and removes when dropped, also when the
/// test fails. Each rule carries a comment naming this process, and rules only ever name the
/// loopback addresses and ports of the test's own brokers.
#[derive(Debug, Default)]
pub struct Firewall {
    rules: Vec<Vec<String>>,
}

impl Firewall {
    /// No rules yet.
    pub fn new() -> Firewall {
        Firewall::default()
    }

    fn run(action: &str, rule: &[String]) -> Result<(), String> {
        let output = Command::new("iptables")
            .arg(action)
            .arg("INPUT")
            .args(rule)
            .output()
            .map_err(|e| format!("cannot run iptables (the test needs it, as root): {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "iptables {action} INPUT {}: {}",
                rule.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Drops TCP packets from `source` (an IP, or None for any) to `destination` (ip:port).
    pub fn drop_tcp(&mut self, source: Option<&str>, destination: &str) {
        self.add(source, destination, &["DROP"]);
    }

    /// Answers TCP packets from `source` (an IP, or None for any) to `destination` (ip:port)
    /// with a reset: open connections there break at their next packet, new ones are refused.
    pub fn reset_tcp(&mut self, source: Option<&str>, destination: &str) {
        self.add(
            source,
            destination,
            &["REJECT", "--reject-with", "tcp-reset"],
        );
    }

    /// Drops every TCP packet from the IP `source` to the IP `destination`, whatever the ports:
    /// with only this rule, `source` still receives what `destination` sends it, but nothing it
    /// answers (acknowledgements and responses included) comes back.
    pub fn drop_tcp_between(&mut self, source: &str, destination: &str) {
        let mut rule: Vec<String> = ["-s", source, "-d", destination, "-p", "tcp"]
            .map(String::from)
            .to_vec();
        rule.extend(["-m", "comment", "--comment"].map(String::from));
        rule.push(format!("weft-test-{}", std::process::id()));
        rule.extend(["-j", "DROP"].map(String::from));
        Self::run("-I", &rule).expect("add a packet filter rule");
        self.rules.push(rule);
    }

    fn add(&mut self, source: Option<&str>, destination: &str, target: &[&str]) {
        let (ip, port) = destination
            .rsplit_once(':')
            .expect("destination is IP:PORT");
        let mut rule: Vec<String> = Vec::new();
        if let Some(source) = source {
            rule.extend(["-s".into(), source.into()]);
        }
        rule.extend(
            [
                "-d",
                ip,
                "-p",
                "tcp",
                "--dport",
                port,
                "-m",
                "comment",
                "--comment",
            ]
            .map(String::from),
        );
        rule.push(format!("weft-test-{}", std::process::id()));
        rule.push("-j".into());
        rule.extend(target.iter().map(|t| t.to_string()));
        Self::run("-I", &rule).expect("add a packet filter rule");
        self.rules.push(rule);
    }

    /// Removes every rule added so far.
    pub fn heal(&mut self) {
        for rule in self.rules.drain(..) {
            if let Err(e) = Self::run("-D", &rule) {
                eprintln!("{e}");
            }
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.heal();
    }
}

/// The segment data files (`*.log`) of partition 0 of every topic on `broker`, sorted.
pub fn segment_files(broker: &Broker) -> Vec<PathBuf> {
    let topics = broker.data_dir().join("topics");
    let mut files = Vec::new();
    for topic in std::fs::read_dir(&topics).expect("topics dir") {
        let dir = topic.expect("entry").path().join("0");
        for file in std::fs::read_dir(&dir).expect("partition dir") {
            let path = file.expect("entry").path();
            if path.extension().is_some_and(|e| e == "log") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Debian's nginx as an HTTP/2 gRPC proxy (a mesh sidecar or gateway), in a temporary
/// directory of its own, one worker, stopped on drop.
#[derive(Debug)]
pub struct Nginx {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx whose `http` block logs each request with `log_format` to `access.log` and
    /// holds `servers` (server and upstream blocks); `servers` gets the directory (for files
    /// beside the configuration). Returns once `probe` (host:port) accepts connections.
    pub fn start(log_format: &str, servers: impl FnOnce(&Path) -> String, probe: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        let config = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format grpc '{log_format}';
    access_log {d}/access.log grpc;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{servers}
}}
"#,
            servers = servers(dir.path())
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config).expect("nginx.conf");
        let child = Command::new("nginx")
            .args(["-p", &d.to_string(), "-c", path.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("stderr")).expect("stderr"),
            ))
            .spawn()
            .expect("nginx (apt-get install nginx; .ci/test.sh does)");
        let nginx = Nginx {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(probe).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}{}",
                nginx.file("error.log"),
                nginx.file("stderr")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    /// A file of its directory ("" when absent).
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        self.file("access.log")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Test certificates: a CA made by the test and the certificates it issues (rcgen).
pub mod pki {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };

    /// A test CA and the files it issues, in a temporary directory.
    #[derive(Debug)]
    pub struct Pki {
        dir: PathBuf,
        name: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Pki {
        pub fn new(dir: &Path, name: &str) -> Pki {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, format!("{name} test CA"));
            let cert = params.self_signed(&key).expect("CA certificate");
            std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).expect("write CA");
            Pki {
                dir: dir.to_path_buf(),
                name: name.to_string(),
                issuer: Issuer::new(params, key),
            }
        }

        pub fn ca_file(&self) -> PathBuf {
            self.dir.join(format!("{}-ca.pem", self.name))
        }

        /// A certificate (subject CN=`cn`, an optional URI SAN, every 127.0.0.x as IP SANs when
        /// `server`), as (cert file, key file) named `stem`.
        pub fn issue(
            &self,
            stem: &str,
            cn: &str,
            uri: Option<&str>,
            server: bool,
        ) -> (PathBuf, PathBuf) {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params
                .distinguished_name
                .push(DnType::OrganizationName, "weft-tests");
            if let Some(uri) = uri {
                params
                    .subject_alt_names
                    .push(SanType::URI(uri.try_into().expect("URI")));
            }
            if server {
                for last in 1..=254u8 {
                    params
                        .subject_alt_names
                        .push(SanType::IpAddress([127, 0, 0, last].into()));
                }
            }
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer).expect("sign");
            let cert_file = self.dir.join(format!("{stem}.pem"));
            let key_file = self.dir.join(format!("{stem}-key.pem"));
            std::fs::write(&cert_file, cert.pem()).expect("write cert");
            std::fs::write(&key_file, key.serialize_pem()).expect("write key");
            (cert_file, key_file)
        }
    }

    /// What `printf %s TEXT | sha256sum` prints: the form `auth.tokens` holds a token in.
    pub fn sha256_hex(text: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A slow link: a TCP proxy on `listen` to `target` that carries what the client sends at most
/// `bytes_per_sec` (answers go back at full speed). Stopped, with every connection it carries,
/// when dropped.
#[derive(Debug)]
pub struct SlowLink {
    listen: String,
    /// Bytes carried towards the target so far.
    carried: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sockets: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl SlowLink {
    pub fn start(listen: &str, target: &str, bytes_per_sec: u64) -> SlowLink {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(listen).expect("bind the slow link");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sockets: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> =
            Default::default();
        let carried = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop_a, sockets_a, target) = (stop.clone(), sockets.clone(), target.to_string());
        let carried_a = carried.clone();
        let acceptor = std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if stop_a.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(inbound) = inbound else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                {
                    let mut held = sockets_a.lock().expect("sockets");
                    held.extend([&inbound, &outbound].map(|s| s.try_clone().expect("clone")));
                }
                let copy = |mut from: std::net::TcpStream,
                            mut to: std::net::TcpStream,
                            rate: Option<u64>| {
                    let carried = carried_a.clone();
                    std::thread::spawn(move || {
                        // When the bytes read so far may have crossed: idle time earns
                        // no credit (the link never bursts).
                        let mut next = Instant::now();
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if let Some(rate) = rate {
                                next = next.max(Instant::now())
                                    + Duration::from_secs_f64(n as f64 / rate as f64);
                                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            if rate.is_some() {
                                carried.fetch_add(n as u64, Ordering::SeqCst);
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                copy(
                    inbound.try_clone().expect("clone"),
                    outbound.try_clone().expect("clone"),
                    Some(bytes_per_sec),
                );
                copy(outbound, inbound, None);
            }
        });
        SlowLink {
            listen: listen.to_string(),
            carried,
            stop,
            sockets,
            acceptor: Some(acceptor),
        }
    }
}

impl SlowLink {
    /// The bytes carried towards the target so far (every connection).
    pub fn carried(&self) -> u64 {
        self.carried.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Cuts every connection the link carries now; it goes on accepting new ones.
    pub fn cut(&self) {
        for socket in self.sockets.lock().expect("sockets").drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the acceptor so it sees the flag.
        let _ = std::net::TcpStream::connect(&self.listen);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for socket in self.sockets.lock().expect("sockets").drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}
