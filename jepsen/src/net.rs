//! The private network: one Linux bridge and one network namespace per broker, each with its own
//! address on a /24 the harness picks among those this machine does not use. The namespaces have
//! no default route, so nothing in them reaches beyond the bridge. Faults are iptables rules
//! inside the brokers' namespaces; healing flushes them.
//!
//! The harness only touches what it created: every name carries the run's id, is checked to be
//! free before it is created, and is recorded in `net.json` in the run directory (so
//! `weft-jepsen cleanup DIR` can remove exactly that after a harness that was killed).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// What the harness created, by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Net {
    /// The run's id (6 hex digits), in every name.
    pub id: String,
    /// The third octet of 10.213.X.0/24.
    pub subnet: u8,
    /// The bridge (in the root namespace; it holds 10.213.X.1, where the clients are).
    pub bridge: String,
    /// One namespace per broker, in node order (node id = index + 1).
    pub namespaces: Vec<String>,
    /// The root-side end of each broker's veth pair.
    pub veths: Vec<String>,
    /// Whether each was created (teardown removes only those).
    #[serde(default)]
    created: Vec<String>,
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv4 networks this machine has addresses or routes in (the default route excluded).
fn used_networks() -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    let text = run("ip", &["-4", "-o", "addr", "show"])?
        + &run("ip", &["-4", "route", "show", "table", "all"])?;
    for word in text.split_whitespace() {
        let (addr, len) = match word.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok()),
            None => (word, Some(32)),
        };
        if let (Ok(addr), Some(len)) = (addr.parse::<Ipv4Addr>(), len) {
            out.push((addr, len.min(32)));
        }
    }
    Ok(out)
}

fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    (u32::from(a.0) & mask) == (u32::from(b.0) & mask)
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn namespaces() -> Result<BTreeSet<String>> {
    Ok(run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

impl Net {
    /// Creates the bridge and `nodes` namespaces, and records them in `dir/net.json`.
    pub fn create(nodes: usize, dir: &Path, rng: &mut impl Rng) -> Result<Net> {
        let id = format!("{:06x}", rng.random::<u32>() & 0xff_ffff);
        let used = used_networks()?;
        let subnet = (0..64)
            .map(|_| rng.random_range(16..=250u8))
            .find(|k| {
                let ours = (Ipv4Addr::new(10, 213, *k, 0), 24);
                !used.iter().any(|u| overlaps(*u, ours))
            })
            .context("no free 10.213.X.0/24 on this machine")?;
        let mut net = Net {
            bridge: format!("wjb{id}"),
            namespaces: (1..=nodes).map(|i| format!("wj{id}n{i}")).collect(),
            veths: (1..=nodes).map(|i| format!("wjv{id}n{i}")).collect(),
            id,
            subnet,
            created: Vec::new(),
        };
        let existing = namespaces()?;
        for name in std::iter::once(&net.bridge).chain(&net.veths) {
            if link_exists(name) {
                bail!("a link named {name} exists already; it is not ours");
            }
        }
        if let Some(taken) = net.namespaces.iter().find(|n| existing.contains(*n)) {
            bail!("a namespace named {taken} exists already; it is not ours");
        }
        net.save(dir)?;
        if let Err(e) = net.build(dir) {
            net.teardown();
            return Err(e);
        }
        Ok(net)
    }

    fn build(&mut self, dir: &Path) -> Result<()> {
        let bridge = self.bridge.clone();
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        self.created.push(format!("link:{bridge}"));
        self.save(dir)?;
        let host = format!("{}/24", self.host_ip());
        run("ip", &["addr", "add", &host, "dev", &bridge])?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for i in 0..self.namespaces.len() {
            let ns = self.namespaces[i].clone();
            let veth = self.veths[i].clone();
            let inner = format!("{veth}p");
            run("ip", &["netns", "add", &ns])?;
            self.created.push(format!("netns:{ns}"));
            run(
                "ip",
                &["link", "add", &veth, "type", "veth", "peer", "name", &inner],
            )?;
            self.created.push(format!("link:{veth}"));
            self.save(dir)?;
            run("ip", &["link", "set", &inner, "netns", &ns])?;
            run("ip", &["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
            let address = format!("{}/24", self.node_ip(i as u64 + 1));
            run("ip", &["-n", &ns, "addr", "add", &address, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["link", "set", &veth, "master", &bridge])?;
            run("ip", &["link", "set", &veth, "up"])?;
        }
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("net.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads what a run created from its `net.json`.
    pub fn load(dir: &Path) -> Result<Net> {
        let path = dir.join("net.json");
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    /// The clients' address (on the bridge, in the root namespace).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// Node `id`'s address (ids from 1).
    pub fn node_ip(&self, id: u64) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 10 + id as u8)
    }

    /// Node `id`'s namespace.
    pub fn namespace(&self, id: u64) -> &str {
        &self.namespaces[id as usize - 1]
    }

    fn iptables(&self, id: u64, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", self.namespace(id), "iptables", "-w"];
        full.extend_from_slice(args);
        run("ip", &full).map(|_| ())
    }

    /// Node `to` no longer receives anything from node `from` (one way).
    pub fn drop_from(&self, to: u64, from: u64) -> Result<()> {
        let source = self.node_ip(from).to_string();
        self.iptables(to, &["-A", "INPUT", "-s", &source, "-j", "DROP"])
    }

    /// Nodes `a` and `b` no longer reach each other.
    pub fn cut(&self, a: u64, b: u64) -> Result<()> {
        self.drop_from(a, b)?;
        self.drop_from(b, a)
    }

    /// Node `id` drops each packet it receives with this probability.
    pub fn lose(&self, id: u64, probability: f64) -> Result<()> {
        let p = format!("{probability:.3}");
        self.iptables(
            id,
            &[
                "-A",
                "INPUT",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ],
        )
    }

    /// Removes every rule of every node's namespace.
    pub fn heal(&self) -> Result<()> {
        for id in 1..=self.namespaces.len() as u64 {
            self.iptables(id, &["-F"])?;
        }
        Ok(())
    }

    /// Removes what this run created (errors are reported, not fatal: the rest still goes).
    pub fn teardown(&mut self) {
        for item in std::mem::take(&mut self.created).iter().rev() {
            let result = match item.split_once(':') {
                Some(("link", name)) if link_exists(name) => run("ip", &["link", "del", name]),
                Some(("netns", name)) if namespaces().is_ok_and(|n| n.contains(name)) => {
                    run("ip", &["netns", "del", name])
                }
                _ => Ok(String::new()),
            };
            if let Err(e) = result {
                eprintln!("teardown: {e:#}");
            }
        }
    }

    /// After [`Net::load`] of a run whose harness died mid-build: treat every name of the run as
    /// created (teardown still removes only those that exist).
    pub fn restore_created(&mut self) {
        let mut created = vec![format!("link:{}", self.bridge)];
        for (ns, veth) in self.namespaces.iter().zip(&self.veths) {
            created.push(format!("netns:{ns}"));
            created.push(format!("link:{veth}"));
        }
        for item in created {
            if !self.created.contains(&item) {
                self.created.push(item);
            }
        }
    }

    /// Whether anything is left to tear down.
    pub fn is_torn_down(&self) -> bool {
        self.created.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_overlap_by_their_shorter_prefix() {
        let ours = (Ipv4Addr::new(10, 213, 40, 0), 24);
        assert!(overlaps((Ipv4Addr::new(10, 0, 0, 0), 8), ours));
        assert!(overlaps((Ipv4Addr::new(10, 213, 40, 7), 32), ours));
        assert!(!overlaps((Ipv4Addr::new(10, 213, 41, 0), 24), ours));
        assert!(!overlaps((Ipv4Addr::new(192, 0, 2, 0), 24), ours));
    }
}
