//! `weft-jepsen`: fault injection for Weft, after Jepsen's Kafka workload.
//!
//! A run ([`run`]) creates a private network ([`net`]: a bridge and one network namespace per
//! broker, addresses it picked and checked to be free), starts a real `weft-broker` in each
//! ([`cluster`]), drives a workload of unique sends and polls ([`workload`]) while the nemesis
//! ([`nemesis`]) injects faults on a schedule, records every operation ([`history`]), then heals
//! everything, reads every key back from offset 0 and each replica's own copy, and checks the
//! history ([`checker`]) for every anomaly of `RELIABILITY.md` it covers. [`report`] writes the
//! summary, `results.json` and the plots; [`power`] simulates power loss and file corruption on
//! a stopped broker's files. See `jepsen/README.md`.

pub mod checker;
pub mod cluster;
pub mod groups;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod power;
pub mod report;
pub mod run;
pub mod workload;
