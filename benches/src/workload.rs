//! Workload files: what a run does, declared in TOML under `benches/workloads/`, in the spirit of
//! the OpenMessaging Benchmark's workload YAML.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// How producers pick a key (and so a partition) for each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyDistribution {
    /// No key: each producer spreads messages over the partitions in turn.
    None,
    /// A random 16-byte key per message; partition = murmur2(key) mod partitions (Kafka's rule).
    Random,
    /// `key_count` keys used in turn; partition by murmur2 like `random`.
    RoundRobin,
}

/// One workload, as read from its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Name (defaults to the file stem).
    #[serde(default)]
    pub name: String,
    /// One line on what the workload shows.
    #[serde(default)]
    pub description: String,
    /// Number of topics.
    pub topics: u32,
    /// Partitions per topic.
    pub partitions_per_topic: u32,
    /// Producers per topic.
    pub producers_per_topic: u32,
    /// Consumer groups per topic; each group receives every message (0: no consumers).
    #[serde(default)]
    pub consumer_groups_per_topic: u32,
    /// Consumers per group; a group's partitions are split among them.
    #[serde(default = "one")]
    pub consumers_per_group: u32,
    /// Message payload size in bytes (at least 16: the first 8 carry the intended send time).
    pub message_size: usize,
    /// Keys.
    #[serde(default = "no_keys")]
    pub key_distribution: KeyDistribution,
    /// Distinct keys for `round-robin`.
    #[serde(default = "default_key_count")]
    pub key_count: u32,
    /// Target rate over all producers, messages per second; 0 = as fast as acknowledgements
    /// allow.
    pub producer_rate: u64,
    /// Unacknowledged messages each producer may have in flight.
    pub in_flight: usize,
    /// Seconds run before measuring (their messages are counted, not measured).
    pub warmup_seconds: f64,
    /// Measured seconds.
    pub duration_seconds: f64,
}

fn one() -> u32 {
    1
}

fn no_keys() -> KeyDistribution {
    KeyDistribution::None
}

fn default_key_count() -> u32 {
    1024
}

/// Upper bounds that keep a typo from starting a run that cannot finish.
const TOPICS_MAX: u32 = 64;
const PARTITIONS_MAX: u32 = 1024;
const CLIENTS_MAX: u32 = 256;
const MESSAGE_SIZE_MAX: usize = 4 * 1024 * 1024;
const IN_FLIGHT_MAX: usize = 1_000_000;
const SECONDS_MAX: f64 = 24.0 * 3600.0;
const KEY_COUNT_MAX: u32 = 1_000_000;

/// The smallest payload: 8 bytes of intended send time and 8 of producer and sequence.
pub const MESSAGE_SIZE_MIN: usize = 16;

impl Workload {
    /// Parses a workload from TOML text; `name` fills in a missing `name`.
    pub fn from_toml(text: &str, name: &str) -> Result<Workload> {
        let mut workload: Workload = toml::from_str(text).context("invalid workload file")?;
        if workload.name.is_empty() {
            workload.name = name.to_string();
        }
        workload.validate()?;
        Ok(workload)
    }

    /// Loads a workload by file path or by name from the workload directory.
    pub fn load(name_or_path: &str, dir: &Path) -> Result<Workload> {
        let path = resolve(name_or_path, dir)?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(name_or_path)
            .to_string();
        Workload::from_toml(&text, &stem).with_context(|| format!("in {}", path.display()))
    }

    /// Checks every field against its bounds, naming the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        let check =
            |ok: bool, what: &str| -> Result<()> { if ok { Ok(()) } else { bail!("{what}") } };
        check(
            !self.name.is_empty()
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "name must be non-empty letters, digits, '-' or '_'",
        )?;
        check(
            (1..=TOPICS_MAX).contains(&self.topics),
            &format!("topics must be 1..={TOPICS_MAX}"),
        )?;
        check(
            (1..=PARTITIONS_MAX).contains(&self.partitions_per_topic),
            &format!("partitions_per_topic must be 1..={PARTITIONS_MAX}"),
        )?;
        check(
            (1..=CLIENTS_MAX).contains(&self.producers_per_topic),
            &format!("producers_per_topic must be 1..={CLIENTS_MAX}"),
        )?;
        check(
            self.consumer_groups_per_topic <= CLIENTS_MAX,
            &format!("consumer_groups_per_topic must be at most {CLIENTS_MAX}"),
        )?;
        check(
            (1..=CLIENTS_MAX).contains(&self.consumers_per_group),
            &format!("consumers_per_group must be 1..={CLIENTS_MAX}"),
        )?;
        check(
            self.consumers_per_group <= self.partitions_per_topic,
            "consumers_per_group must not exceed partitions_per_topic (a consumer would be idle)",
        )?;
        check(
            (MESSAGE_SIZE_MIN..=MESSAGE_SIZE_MAX).contains(&self.message_size),
            &format!("message_size must be {MESSAGE_SIZE_MIN}..={MESSAGE_SIZE_MAX} bytes"),
        )?;
        check(
            (1..=KEY_COUNT_MAX).contains(&self.key_count),
            &format!("key_count must be 1..={KEY_COUNT_MAX}"),
        )?;
        check(
            (1..=IN_FLIGHT_MAX).contains(&self.in_flight),
            &format!("in_flight must be 1..={IN_FLIGHT_MAX}"),
        )?;
        check(
            self.producer_rate <= 10_000_000,
            "producer_rate must be at most 10,000,000 msg/s (0 = as fast as possible)",
        )?;
        check(
            self.warmup_seconds.is_finite() && (0.0..=SECONDS_MAX).contains(&self.warmup_seconds),
            "warmup_seconds must be 0..=86400",
        )?;
        check(
            self.duration_seconds.is_finite()
                && self.duration_seconds > 0.0
                && self.duration_seconds <= SECONDS_MAX,
            "duration_seconds must be more than 0 and at most 86400",
        )?;
        Ok(())
    }

    /// True when the workload consumes (and so measures end-to-end latency).
    pub fn has_consumers(&self) -> bool {
        self.consumer_groups_per_topic > 0
    }
}

/// The shipped workload directory (`benches/workloads`), unless `WEFT_BENCH_WORKLOADS` names
/// another.
pub fn default_dir() -> PathBuf {
    std::env::var_os("WEFT_BENCH_WORKLOADS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/workloads")))
}

fn resolve(name_or_path: &str, dir: &Path) -> Result<PathBuf> {
    let direct = PathBuf::from(name_or_path);
    if direct.is_file() {
        return Ok(direct);
    }
    let named = dir.join(format!("{name_or_path}.toml"));
    if named.is_file() {
        return Ok(named);
    }
    let known = list(dir).unwrap_or_default();
    bail!(
        "no workload {name_or_path:?}: not a file, and not in {} (known: {})",
        dir.display(),
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )
}

/// Names of the workloads in a directory, sorted.
pub fn list(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("toml")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_workloads_parse_and_validate() {
        let dir = default_dir();
        let names = list(&dir).expect("list");
        for required in [
            "max-throughput-1k",
            "max-throughput-16p",
            "latency-5k",
            "fanout",
            "small-100b",
        ] {
            assert!(names.iter().any(|n| n == required), "missing {required}");
        }
        for name in names {
            let w = Workload::load(&name, &dir).expect("valid workload");
            assert_eq!(w.name, name);
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let base = "topics = 1\npartitions_per_topic = 1\nproducers_per_topic = 1\n\
                    message_size = 1024\nproducer_rate = 0\nin_flight = 10\n\
                    warmup_seconds = 1\nduration_seconds = 2\n";
        assert!(Workload::from_toml(base, "ok").is_ok());
        let err = Workload::from_toml(&base.replace("1024", "8"), "x").unwrap_err();
        assert!(format!("{err:#}").contains("message_size"), "{err:#}");
        let err = Workload::from_toml(&format!("{base}bogus = 1\n"), "x").unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
        let err = Workload::from_toml(
            &base.replace("duration_seconds = 2", "duration_seconds = 0"),
            "x",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("duration_seconds"), "{err:#}");
        let err = Workload::from_toml(
            &format!("{base}consumer_groups_per_topic = 1\nconsumers_per_group = 2\n"),
            "x",
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("consumers_per_group"),
            "{err:#}"
        );
    }
}
