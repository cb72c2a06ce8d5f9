//! Smoke runs of the benchmark harness: every installed driver runs a short workload with
//! consumers, and its JSON result must be well formed with counts that add up (sent = acked +
//! failed, every consumer group received every acknowledged message), charts written next to it.
//! Performance figures are never asserted.
//!
//! A driver whose server is not installed is skipped with a message, unless it is listed in
//! `WEFT_BENCH_REQUIRE` (the README's test command installs NATS and Redis and requires them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use weft_tests::binary;

/// True when the driver can run here (as `weft-bench list` reports it); panics when it is
/// required and cannot.
fn available(driver: &str) -> bool {
    let kind = driver.split(':').next().unwrap_or(driver);
    let output = Command::new(binary("weft-bench"))
        .arg("list")
        .output()
        .expect("run weft-bench list");
    assert!(output.status.success(), "weft-bench list failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.split_whitespace().next() == Some(kind))
        .unwrap_or_else(|| panic!("weft-bench list does not know {kind}:\n{stdout}"));
    if line.split_whitespace().nth(1) == Some("installed") {
        return true;
    }
    // In CI every peer is installed by the test command: a missing one is a failure there,
    // never a silent skip.
    let required = std::env::var("WEFT_BENCH_REQUIRE").unwrap_or_default();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !ci && !required.split(',').any(|r| r.trim() == kind),
        "{kind} is required (CI={ci}, WEFT_BENCH_REQUIRE={required}) but {line}"
    );
    eprintln!("skipping {driver}: {line}");
    false
}

fn bench(args: &[&str]) -> Output {
    let output = Command::new(binary("weft-bench"))
        .args(args)
        .output()
        .expect("run weft-bench");
    eprintln!(
        "weft-bench {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn result_dirs(out: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .expect("out dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("result.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing or not a count in {v}"))
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing or not a number in {v}"))
}

/// The JSON result in `out` whose name ends with `suffix`.
fn json_result(out: &Path, suffix: &str) -> Value {
    let file = std::fs::read_dir(out)
        .expect("out dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .unwrap_or_else(|| panic!("no {suffix} result in {}", out.display()));
    serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json")
}

/// Checks a result file the way a reader of it would.
fn check_result(dir: &Path, driver: &str) {
    let text = std::fs::read_to_string(dir.join("result.json")).expect("result.json");
    let v: Value = serde_json::from_str(&text).expect("result.json is JSON");
    let kind = driver.split(':').next().expect("kind");
    assert_eq!(v["driver"], kind);
    if !driver.contains(':') && !matches!(kind, "weft" | "weft-cluster" | "disk") {
        assert_eq!(
            v["durability"], "default",
            "a bare peer runs at its default"
        );
    }
    assert!(
        v["durability_detail"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "every result names its durability"
    );
    let (sent, acked, failed) = (
        u(&v, "/counts/sent"),
        u(&v, "/counts/acked"),
        u(&v, "/counts/failed"),
    );
    assert!(sent > 0, "nothing was sent");
    assert_eq!(sent, acked + failed, "sent = acked + failed");
    assert_eq!(failed, 0, "errors: {}", v["errors"]);
    assert!(f(&v, "/msgs_per_sec") > 0.0);
    assert!(f(&v, "/mb_per_sec") > 0.0);
    assert!(u(&v, "/publish_latency_ms/count") > 0);
    for p in ["p50", "p90", "p99", "p99_9", "max"] {
        assert!(f(&v, &format!("/publish_latency_ms/{p}")) >= 0.0);
    }
    assert!(f(&v, "/publish_latency_ms/p50") <= f(&v, "/publish_latency_ms/max"));
    let timeline = v["timeline"].as_array().expect("timeline");
    let timeline_acked: u64 = timeline.iter().map(|s| u(s, "/acked")).sum();
    assert_eq!(timeline_acked, acked, "the timeline accounts for every ack");
    if kind != "disk" {
        let groups = v["counts"]["consumed_per_group"]
            .as_array()
            .expect("groups");
        assert_eq!(groups.len(), 4, "fanout has four groups");
        let mut consumed = 0;
        for g in groups {
            assert_eq!(u(g, "/acked_on_topic"), acked);
            assert!(
                u(g, "/consumed") >= acked,
                "group {} consumed {} of {acked}",
                g["group"],
                u(g, "/consumed")
            );
            consumed += u(g, "/consumed");
        }
        assert_eq!(u(&v, "/counts/consumed"), consumed);
        assert!(u(&v, "/end_to_end_latency_ms/count") > 0);
    }
    assert_eq!(v["checks"]["sent_is_acked_plus_failed"], true);
    assert_eq!(v["checks"]["consumed_covers_acked"], true);
    for chart in [
        "throughput.svg",
        "throughput.png",
        "latency.svg",
        "latency.png",
    ] {
        let bytes = std::fs::read(dir.join(chart)).unwrap_or_else(|_| panic!("{chart} written"));
        assert!(bytes.len() > 1000, "{chart} has content");
    }
}

fn smoke(driver: &str) {
    if !available(driver) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let data = tmp.path().join("data");
    let output = bench(&[
        "run",
        "fanout",
        "--driver",
        driver,
        "--duration",
        "1.5",
        "--warmup",
        "0.5",
        "--rate",
        "2000",
        // Generous: the run ends as soon as everything is consumed.
        "--drain-timeout",
        "120",
        "--out",
        out.to_str().expect("utf-8"),
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]);
    assert!(output.status.success(), "weft-bench run failed");
    let dirs = result_dirs(&out);
    assert_eq!(dirs.len(), 1, "one result directory");
    check_result(&dirs[0], driver);
    let file = dirs[0].join("result.json");
    let checked = bench(&["check", file.to_str().expect("utf-8")]);
    assert!(checked.status.success(), "weft-bench check refused it");
    // The servers' data directories are removed after the run.
    let left: Vec<_> = std::fs::read_dir(&data)
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn smoke_weft() {
    smoke("weft");
}

#[test]
fn smoke_weft_cluster() {
    smoke("weft-cluster");
}

#[test]
fn smoke_nats_default() {
    smoke("nats:default");
}

#[test]
fn smoke_nats_fsync() {
    smoke("nats:fsync");
}

#[test]
fn smoke_nats_cluster_fsync() {
    smoke("nats-cluster:fsync");
}

#[test]
fn smoke_redis_default() {
    smoke("redis:default");
}

#[test]
fn smoke_redis_fsync() {
    smoke("redis:fsync");
}

#[test]
fn smoke_rabbitmq() {
    smoke("rabbitmq");
}

#[test]
fn smoke_disk() {
    smoke("disk");
}

#[test]
fn compare_alternates_rounds_and_reports_ratios_to_weft() {
    // The disk driver's label names its sync mode, as a peer's names its setting.
    let (peer, label) = if available("redis") {
        ("redis:fsync", "redis:fsync")
    } else {
        ("disk", "disk:fsync")
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let drivers = format!("weft,{peer}");
    let output = bench(&[
        "compare",
        "latency-5k",
        "--drivers",
        &drivers,
        "--rounds",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--rate",
        "1000",
        "--out",
        out.to_str().expect("utf-8"),
        "--data-dir",
        tmp.path().to_str().expect("utf-8"),
        "--quiet",
    ]);
    assert!(output.status.success(), "compare failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("thr/weft"), "{stdout}");
    let dir = std::fs::read_dir(&out)
        .expect("out")
        .map(|e| e.expect("entry").path())
        .find(|p| p.join("compare.json").is_file())
        .expect("compare.json written");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("compare.json")).expect("read"))
            .expect("compare.json is JSON");
    let drivers = v["drivers"].as_array().expect("drivers");
    assert_eq!(drivers.len(), 2);
    assert_eq!(drivers[0]["label"], "weft:fsync");
    assert_eq!(drivers[1]["label"], label);
    for d in drivers {
        assert_eq!(u(d, "/runs"), 2, "two rounds of {}", d["label"]);
        assert_eq!(d["counts_add_up"], true);
        assert!(f(d, "/msgs_per_sec") > 0.0);
    }
    assert!((f(&drivers[0], "/throughput_vs_weft") - 1.0).abs() < 1e-9);
    assert!(f(&drivers[1], "/throughput_vs_weft") > 0.0);
    // Rounds alternate: r1 of both drivers, then r2 of both.
    for round in ["r1", "r2"] {
        for label in ["weft-fsync", &label.replace(':', "-")] {
            let run = dir.join(format!("{round}-{label}"));
            assert!(
                run.join("result.json").is_file(),
                "{} missing",
                run.display()
            );
        }
    }
    assert!(dir.join("compare-latency.png").is_file());
    assert!(dir.join("compare-throughput.svg").is_file());
}

#[test]
fn bad_workloads_and_drivers_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "topics = 1\npartitions_per_topic = 1\nproducers_per_topic = 1\nmessage_size = 4\n\
         producer_rate = 0\nin_flight = 10\nwarmup_seconds = 0\nduration_seconds = 1\n",
    )
    .expect("write");
    let output = bench(&["run", bad.to_str().expect("utf-8"), "--driver", "disk"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("message_size"));

    let output = bench(&["run", "no-such-workload"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("max-throughput-1k"));

    let output = bench(&["run", "latency-5k", "--driver", "kafka"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown driver"));

    // RabbitMQ Streams have no fsync-before-confirm setting: refused, not faked.
    let output = bench(&["run", "latency-5k", "--driver", "rabbitmq:fsync"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot fsync"));

    let output = bench(&["check", bad.to_str().expect("utf-8")]);
    assert!(
        !output.status.success(),
        "a non-result file fails the check"
    );
}

/// `weft-bench failover` runs a real three-broker cluster, freezes the leader, sees another
/// broker lead, and writes its figures; the frozen broker is resumed and everything stopped.
#[test]
fn failover_freezes_the_leader_and_reports_the_time_to_a_new_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let output = bench(&[
        "failover",
        "--rounds",
        "1",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("failover after SIGSTOP of the leader"),
        "{stdout}"
    );
    let value = json_result(&out, "-failover.json");
    let seconds = value["failover_seconds"]
        .as_array()
        .expect("failover_seconds");
    assert_eq!(seconds.len(), 1);
    let s = seconds[0].as_f64().expect("seconds");
    // A new leader was seen (liveness only: the figure itself belongs in the note).
    assert!(s > 0.0 && s < 60.0, "{s}");
    let (frozen, next) = (&value["leaders"][0][0], &value["leaders"][0][1]);
    assert_ne!(frozen, next, "another broker leads");
    // The cluster's data directory is removed and no broker is left running in it.
    assert_eq!(
        std::fs::read_dir(&data).expect("data dir").count(),
        0,
        "the run's brokers and data are gone"
    );
    let output = bench(&["failover", "--rounds", "0"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--rounds"));
}

/// `weft-bench catch-up` runs a real three-broker cluster, freezes a follower while records go
/// through the leader, resumes it, sees the leader report it caught up, and writes its figures.
#[test]
fn catch_up_freezes_a_follower_and_reports_how_fast_it_caught_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let output = bench(&[
        "catch-up",
        "--records",
        "600",
        "--record-bytes",
        "512",
        "--limit-seconds",
        "60",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("catch-up of"), "{stdout}");
    let value = json_result(&out, "-catch-up.json");
    // The follower lacked what went through the leader while it was frozen (600 records of
    // 512 bytes: at least 300 KB), and caught up (liveness only: the figures belong in the note).
    assert!(u(&value, "/lag_entries") >= 1, "{value}");
    assert!(u(&value, "/lag_bytes") >= 600 * 512 / 2, "{value}");
    let seconds = f(&value, "/catch_up_seconds");
    assert!(seconds > 0.0 && seconds < 60.0, "{seconds}");
    assert!(f(&value, "/first_progress_seconds") <= seconds);
    assert_eq!(
        std::fs::read_dir(&data).expect("data dir").count(),
        0,
        "the run's brokers and data are gone"
    );
    let output = bench(&["catch-up", "--records", "0"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--records"));
}
