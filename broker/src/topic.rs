//! Topic configuration: defaults, validation of names and values (pure, unit-tested), and the
//! mapping to the segment store's log config.

use serde::{Deserialize, Serialize};
use weft_storage::{FsyncPolicy, LogConfig};

/// When a topic's publishes become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Fsync {
    /// fdatasync before acknowledging (group-committed). The default.
    #[default]
    Always,
    /// Acknowledge once written; sync every this many milliseconds.
    IntervalMs(u32),
}

/// A topic's configuration, with every value resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Number of partitions.
    pub partitions: u32,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Delete old segments beyond this many bytes per partition.
    pub retention_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this.
    pub retention_ms: Option<u64>,
    /// Largest accepted batch, encoded.
    pub max_message_bytes: u32,
    /// Durability of publishes.
    pub fsync: Fsync,
    /// Segment size.
    pub segment_bytes: u64,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            replication_factor: 1,
            retention_bytes: None,
            retention_ms: None,
            max_message_bytes: 1024 * 1024,
            fsync: Fsync::Always,
            segment_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Most partitions a topic may have.
pub const PARTITIONS_MAX: u32 = 1024;
/// Most replicas a topic may ask for (the bound of `topic_defaults.replication_factor` too).
pub const REPLICATION_FACTOR_MAX: u32 = 16;
/// Largest `max_message_bytes` a topic may set.
pub const MESSAGE_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// A field of a request that failed validation, for `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `config.partitions`.
    pub field: String,
    /// What is wrong.
    pub description: String,
}

impl FieldViolation {
    pub(crate) fn new(field: &str, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// At most 64 characters of a name, for messages (a hostile name is not echoed whole).
fn clip(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &name[..end]),
        None => name.to_string(),
    }
}

/// Checks a topic name: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), FieldViolation> {
    let bad = |why: &str| {
        Err(FieldViolation::new(
            "name",
            format!("topic name {:?} {why}", clip(name)),
        ))
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 249 {
        return bad("is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return bad("is reserved");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("may only contain letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// What is wrong with a topic's `config` (created when `current` is None, else changed from
/// `current`): its own limits, a record size a gRPC listener with `grpc_max` would refuse (no
/// publish of it could arrive), and a replication factor above [`REPLICATION_FACTOR_MAX`]. Only
/// a change checks the last two: a topic made by an older build, or through a broker with a
/// larger limit, keeps its values through other changes.
pub fn config_violations(
    config: &TopicConfig,
    current: Option<&TopicConfig>,
    grpc_max: u32,
) -> Vec<FieldViolation> {
    let mut violations = config.validate();
    let changed = current.is_none_or(|c| c.max_message_bytes != config.max_message_bytes);
    if changed && config.max_message_bytes > grpc_max {
        violations.push(FieldViolation::new(
            "config.max_message_bytes",
            format!(
                "{} is above this broker's grpc_message_bytes_max ({grpc_max}): a publish that \
                 large would be refused before it reached the topic",
                config.max_message_bytes
            ),
        ));
    }
    let rf_changed = current.is_none_or(|c| c.replication_factor != config.replication_factor);
    if rf_changed && config.replication_factor > REPLICATION_FACTOR_MAX {
        violations.push(FieldViolation::new(
            "config.replication_factor",
            format!(
                "{} is outside 1 ..= {REPLICATION_FACTOR_MAX}",
                config.replication_factor
            ),
        ));
    }
    violations
}

impl TopicConfig {
    /// Checks every value; returns all violations.
    pub fn validate(&self) -> Vec<FieldViolation> {
        let mut violations = Vec::new();
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            violations.push(FieldViolation::new(
                "config.partitions",
                format!("{} is outside 1 ..= {PARTITIONS_MAX}", self.partitions),
            ));
        }
        // (The upper bound, REPLICATION_FACTOR_MAX, is checked where a topic is created: a
        // topic an older build stored with more keeps its value through other changes.)
        if self.replication_factor == 0 {
            violations.push(FieldViolation::new(
                "config.replication_factor",
                "must be at least 1",
            ));
        }
        if self.max_message_bytes < 128 || self.max_message_bytes > MESSAGE_BYTES_MAX {
            violations.push(FieldViolation::new(
                "config.max_message_bytes",
                format!(
                    "{} is outside 128 ..= {MESSAGE_BYTES_MAX}",
                    self.max_message_bytes
                ),
            ));
        }
        if self.segment_bytes < 1024 * 1024 || self.segment_bytes > u64::from(u32::MAX) {
            violations.push(FieldViolation::new(
                "config.segment_bytes",
                format!("{} is outside 1 MiB ..= 4 GiB", self.segment_bytes),
            ));
        } else if u64::from(self.max_message_bytes) + 1024 > self.segment_bytes {
            violations.push(FieldViolation::new(
                "config.max_message_bytes",
                "must be smaller than segment_bytes",
            ));
        }
        if let Fsync::IntervalMs(ms) = self.fsync
            && !(1..=60_000).contains(&ms)
        {
            violations.push(FieldViolation::new(
                "config.fsync_interval_ms",
                format!("{ms} is outside 1 ..= 60000"),
            ));
        }
        if self.retention_ms == Some(0) {
            violations.push(FieldViolation::new(
                "config.retention_ms",
                "must be positive",
            ));
        }
        if self.retention_bytes == Some(0) {
            violations.push(FieldViolation::new(
                "config.retention_bytes",
                "must be positive",
            ));
        }
        violations
    }

    /// The segment-store configuration for one of this topic's partitions.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes_max: self.segment_bytes,
            // The topic's max_message_bytes is checked when a publish arrives; it can change at
            // any time, so the log itself accepts any batch a topic may ever allow (a raised
            // limit must not turn the next large entry into a fatal storage error).
            batch_bytes_max: u64::from(MESSAGE_BYTES_MAX) + 1024,
            fsync: match self.fsync {
                Fsync::Always => FsyncPolicy::Always,
                Fsync::IntervalMs(ms) => FsyncPolicy::Interval {
                    interval_ms: u64::from(ms),
                },
            },
            retention_bytes: self.retention_bytes,
            retention_ms: self.retention_ms.map(|ms| ms.min(i64::MAX as u64) as i64),
            sync_listener: crate::sync_journal::listener(),
            ..LogConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replication factor above the maximum is refused when a topic is created with it or
    /// changed to it, never when a topic an older build stored with it changes another field
    /// (before, such a topic could no longer be changed at all).
    #[test]
    fn the_replication_factor_bound_holds_for_new_values_only() {
        let grpc_max = 16 * 1024 * 1024;
        let named =
            |v: Vec<FieldViolation>| v.iter().any(|v| v.field == "config.replication_factor");
        let wide = TopicConfig {
            replication_factor: 20,
            ..TopicConfig::default()
        };
        assert!(named(config_violations(&wide, None, grpc_max)), "created");
        let narrow = TopicConfig::default();
        assert!(
            named(config_violations(&wide, Some(&narrow), grpc_max)),
            "raised"
        );
        let changed = TopicConfig {
            retention_ms: Some(60_000),
            ..wide.clone()
        };
        assert!(
            config_violations(&changed, Some(&wide), grpc_max).is_empty(),
            "another field of a topic stored with 20"
        );
        let bounded = TopicConfig {
            replication_factor: REPLICATION_FACTOR_MAX,
            ..TopicConfig::default()
        };
        assert!(config_violations(&bounded, None, grpc_max).is_empty());
    }

    #[test]
    fn names() {
        for good in ["orders", "a", "a.b_c-D9", &"x".repeat(249)] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "with space",
            "slash/no",
            "ümlaut",
            &"x".repeat(250),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configs() {
        assert!(TopicConfig::default().validate().is_empty());
        assert!(TopicConfig::default().log_config().validate().is_ok());
        let cases = [
            (
                TopicConfig {
                    partitions: 0,
                    ..TopicConfig::default()
                },
                "config.partitions",
            ),
            (
                TopicConfig {
                    partitions: 5000,
                    ..TopicConfig::default()
                },
                "config.partitions",
            ),
            (
                TopicConfig {
                    replication_factor: 0,
                    ..TopicConfig::default()
                },
                "config.replication_factor",
            ),
            (
                TopicConfig {
                    max_message_bytes: 10,
                    ..TopicConfig::default()
                },
                "config.max_message_bytes",
            ),
            (
                TopicConfig {
                    segment_bytes: 10,
                    ..TopicConfig::default()
                },
                "config.segment_bytes",
            ),
            (
                TopicConfig {
                    fsync: Fsync::IntervalMs(0),
                    ..TopicConfig::default()
                },
                "config.fsync_interval_ms",
            ),
            (
                TopicConfig {
                    retention_ms: Some(0),
                    ..TopicConfig::default()
                },
                "config.retention_ms",
            ),
        ];
        for (config, field) in cases {
            let violations = config.validate();
            assert!(
                violations.iter().any(|v| v.field == field),
                "{field}: {violations:?}"
            );
        }
    }
}
