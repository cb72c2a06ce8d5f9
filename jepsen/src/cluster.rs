//! The brokers under test: one `weft-broker` process per network namespace, each its own
//! process group, with its data directory, log and sync journal under the run directory
//! (`nodes/n<ID>/`). Started, killed (-9), paused (SIGSTOP), resumed, restarted (optionally under
//! faketime), and stopped for good at the end.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};

use crate::net::Net;

/// The brokers' ports (every broker has its own address).
pub const CLIENT_PORT: u16 = 7400;
/// Peer port.
pub const PEER_PORT: u16 = 7401;
/// Admin HTTP port.
pub const ADMIN_PORT: u16 = 7402;

/// What a broker process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Running.
    Up,
    /// Stopped with SIGSTOP.
    Paused,
    /// Not running (killed or stopped).
    Down,
}

/// One broker.
#[derive(Debug)]
pub struct Node {
    /// Node id (from 1).
    pub id: u64,
    /// Its directory: `data/`, `broker.log`, `sync.journal`.
    pub dir: PathBuf,
    child: Option<Child>,
    /// Its state.
    pub state: State,
    /// A faketime offset (`+5s`, `-3s`) it runs under, if any.
    pub skew: Option<String>,
    /// Whether it belongs to the cluster (a spare for the membership fault does not, until it
    /// is added; a removed broker no longer does).
    pub member: bool,
}

impl Node {
    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The sync journal (what each partition file durably holds).
    pub fn journal(&self) -> PathBuf {
        self.dir.join("sync.journal")
    }
}

/// The cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The network it runs on.
    pub net: Net,
    /// The brokers, in id order.
    pub nodes: Vec<Node>,
    broker: PathBuf,
    peers: String,
    /// More environment for every broker (a canary's switch).
    pub env: Vec<(String, String)>,
}

/// Node ids from `voters + 1` on are spares: not started with the cluster, added later.
impl Cluster {
    /// Prepares `net.namespaces.len()` brokers under `dir/nodes` (not started); the first
    /// `voters` form the cluster, the rest are spares.
    pub fn new(net: Net, dir: &Path, broker: &Path, voters: usize) -> Result<Cluster> {
        let count = net.namespaces.len() as u64;
        let peers = (1..=voters as u64)
            .map(|id| format!("{id}@{}:{PEER_PORT}", net.node_ip(id)))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = (1..=count)
            .map(|id| {
                let dir = dir.join("nodes").join(format!("n{id}"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Ok(Node {
                    id,
                    dir,
                    child: None,
                    state: State::Down,
                    skew: None,
                    member: id <= voters as u64,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Cluster {
            env: Vec::new(),
            net,
            nodes,
            broker: broker.to_path_buf(),
            peers,
        })
    }

    /// The client address of node `id`.
    pub fn client_address(&self, id: u64) -> String {
        format!("{}:{CLIENT_PORT}", self.net.node_ip(id))
    }

    /// The admin address of node `id`.
    pub fn admin_address(&self, id: u64) -> String {
        format!("{}:{ADMIN_PORT}", self.net.node_ip(id))
    }

    /// Node ids.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Ids of the brokers that belong to the cluster.
    pub fn members(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.member)
            .map(|n| n.id)
            .collect()
    }

    /// Node `id`, to change.
    pub fn node_mut(&mut self, id: u64) -> Result<&mut Node> {
        self.node(id)
    }

    fn node(&mut self, id: u64) -> Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    /// Starts every broker (the seed, node 1, last: it asks the others whether they have a
    /// cluster before it starts one) and waits until each is ready.
    pub async fn start_all(&mut self) -> Result<()> {
        let mut ids = self.members();
        ids.reverse();
        for id in ids {
            self.start(id)?;
        }
        for id in self.members() {
            wait_ready(id, &self.admin_address(id), Duration::from_secs(90)).await?;
        }
        Ok(())
    }

    /// Starts node `id` (it must be down).
    pub fn start(&mut self, id: u64) -> Result<()> {
        let broker = self.broker.clone();
        let ns = self.net.namespace(id).to_string();
        let ip = self.net.node_ip(id);
        // A broker added later lists the cluster's brokers and itself: it joins.
        let peers = if self
            .peers
            .split(',')
            .any(|p| p.starts_with(&format!("{id}@")))
        {
            self.peers.clone()
        } else {
            format!("{},{id}@{ip}:{PEER_PORT}", self.peers)
        };
        let env = self.env.clone();
        let node = self.node(id)?;
        if node.state != State::Down {
            bail!("node {id} is running already");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("broker.log"))
            .context("opening the broker log")?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns]);
        if let Some(skew) = &node.skew {
            command.args(["faketime", "-f", skew]);
        }
        command
            .arg(&broker)
            .args(["--node-id", &id.to_string(), "--peers", &peers])
            .arg("--data-dir")
            .arg(node.data_dir())
            .args(["--client-listen", &format!("{ip}:{CLIENT_PORT}")])
            .args(["--peer-listen", &format!("{ip}:{PEER_PORT}")])
            .args(["--admin-listen", &format!("{ip}:{ADMIN_PORT}")])
            .env("WEFT_SYNC_JOURNAL", node.journal())
            // `WEFT_JEPSEN_BROKER_LOG` sets the brokers' log filter (for a closer look at a
            // run, for example `info,openraft=warn,openraft::engine=info,sled=warn`).
            .env(
                "WEFT_LOG",
                std::env::var("WEFT_JEPSEN_BROKER_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn,sled=warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WEFT_")
                && key != "WEFT_SYNC_JOURNAL"
                && key != "WEFT_LOG"
            {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} in {ns}", broker.display()))?;
        node.child = Some(child);
        node.state = State::Up;
        Ok(())
    }

    fn signal(&mut self, id: u64, signal: Signal) -> Result<()> {
        let node = self.node(id)?;
        let Some(child) = node.child.as_ref() else {
            bail!("node {id} is not running");
        };
        let pid = Pid::from_raw(child.id() as i32).context("pid")?;
        kill_process_group(pid, signal).with_context(|| format!("signalling node {id}"))?;
        Ok(())
    }

    /// kill -9 node `id` (a no-op when it is down), and waits until every process of its group
    /// is gone (under faketime the broker is a child of the process we started).
    pub fn kill(&mut self, id: u64) -> Result<()> {
        if self.node(id)?.state == State::Down {
            return Ok(());
        }
        self.signal(id, Signal::KILL)?;
        let node = self.node(id)?;
        if let Some(mut child) = node.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = child.wait();
            if let Some(pid) = pid {
                wait_group_gone(pid, Duration::from_secs(10));
            }
        }
        node.state = State::Down;
        Ok(())
    }

    /// Stops node `id` gracefully (SIGTERM, then kill -9 after 10 s).
    pub fn stop(&mut self, id: u64) -> Result<()> {
        if self.node(id)?.state == State::Paused {
            self.resume(id)?;
        }
        if self.node(id)?.state == State::Down {
            return Ok(());
        }
        self.signal(id, Signal::TERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let node = self.node(id)?;
        if let Some(child) = node.child.as_mut() {
            let pid = Pid::from_raw(child.id() as i32);
            while Instant::now() < deadline {
                // The process we started has exited, and so has every process of its group
                // (faketime runs the broker as its child).
                if child.try_wait().ok().flatten().is_some()
                    && pid.is_none_or(|pid| test_kill_process_group(pid).is_err())
                {
                    node.child = None;
                    node.state = State::Down;
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill_group(id)
    }

    /// kill -9 node `id`'s whole process group, also once the process we started has exited.
    fn kill_group(&mut self, id: u64) -> Result<()> {
        let node = self.node(id)?;
        if let Some(mut child) = node.child.take()
            && let Some(pid) = Pid::from_raw(child.id() as i32)
        {
            let _ = kill_process_group(pid, Signal::KILL);
            let _ = child.wait();
            wait_group_gone(pid, Duration::from_secs(10));
        }
        node.state = State::Down;
        Ok(())
    }

    /// SIGSTOP node `id`.
    pub fn pause(&mut self, id: u64) -> Result<()> {
        if self.node(id)?.state != State::Up {
            return Ok(());
        }
        self.signal(id, Signal::STOP)?;
        self.node(id)?.state = State::Paused;
        Ok(())
    }

    /// SIGCONT node `id`.
    pub fn resume(&mut self, id: u64) -> Result<()> {
        if self.node(id)?.state != State::Paused {
            return Ok(());
        }
        self.signal(id, Signal::CONT)?;
        self.node(id)?.state = State::Up;
        Ok(())
    }

    /// Stops every broker (gracefully) and waits for them.
    pub fn stop_all(&mut self) {
        for id in self.ids() {
            if let Err(e) = self.stop(id) {
                eprintln!("stopping node {id}: {e:#}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                if let Some(pid) = Pid::from_raw(child.id() as i32) {
                    let _ = kill_process_group(pid, Signal::CONT);
                    let _ = kill_process_group(pid, Signal::KILL);
                }
                let _ = child.wait();
            }
        }
        self.net.teardown();
    }
}

/// Waits (up to `limit`) until no process of group `pid` is left.
fn wait_group_gone(pid: Pid, limit: Duration) {
    let deadline = Instant::now() + limit;
    while test_kill_process_group(pid).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the broker at admin `address` answers `/readyz` with 200.
pub async fn wait_ready(id: u64, address: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match http_get(address, "/readyz").await {
            Ok((200, _)) => return Ok(()),
            other => {
                if Instant::now() > deadline {
                    bail!("node {id} was not ready within {limit:?}: {other:?}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.1 GET with a 2 s limit: (status, body).
pub async fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    http(address, "GET", path, Duration::from_secs(2)).await
}

/// A plain HTTP/1.1 POST without a body, with a 30 s limit: (status, body). It is an admin
/// call that changes the cluster and may wait for the controller's commits and for liveness
/// checks of other brokers, so it is given longer than a read.
pub async fn http_post(address: &str, path: &str) -> Result<(u16, String)> {
    http(address, "POST", path, ADMIN_WRITE_TIMEOUT).await
}

/// How long an admin call that changes the cluster may take before the nemesis gives up.
const ADMIN_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

async fn http(address: &str, method: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let text = tokio::time::timeout(timeout, exchange)
        .await
        .context("timed out")??;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
