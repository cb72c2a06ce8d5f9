//! Starting and stopping the servers under test: on loopback, on a free port, in the run's data
//! directory, with their output in a log file there.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// How long a server may take to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds a program on `PATH`.
pub fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is not installed (not on PATH); the README's test command installs the peers")
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A server process, killed when dropped.
#[derive(Debug)]
pub struct Server {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Spawns `program args...` in `dir`, its output appended to `dir/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Server> {
        Server::spawn_with_env(name, program, args, &[], dir)
    }

    /// Like [`Server::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
    ) -> Result<Server> {
        let log = dir.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Server {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Wraps an already spawned child (whose output goes to `log`).
    pub fn from_child(name: &str, child: Child, log: PathBuf) -> Server {
        Server {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT...) to the process.
    pub fn signal(&self, signal: rustix::process::Signal) -> Result<()> {
        let pid = self
            .child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
            .with_context(|| format!("{} has exited", self.name))?;
        rustix::process::kill_process(pid, signal)
            .with_context(|| format!("signalling {} ({pid:?})", self.name))
    }

    /// Waits until `addr` accepts TCP connections, failing early if the process exits.
    pub async fn wait_for_port(&mut self, addr: &str) -> Result<()> {
        self.wait_for_port_within(addr, START_TIMEOUT).await
    }

    /// [`Server::wait_for_port`] with its own limit (for servers slower to boot).
    pub async fn wait_for_port_within(&mut self, addr: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {addr}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within {limit:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops the server (SIGKILL: its data directory is thrown away after the run) and reaps it.
    pub async fn stop(mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.start_kill().ok();
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .with_context(|| format!("{} did not exit", self.name))??;
        Ok(())
    }
}
