//! Operating a broker: JSON log lines for collectors, the log filter changed at run time through
//! the admin API, and `weft-broker --check-config` for CI pipelines (real processes).

use std::time::Duration;

use weft_tests::{Broker, binary};

/// The log's JSON lines, each parsed (every line must be one object).
fn json_lines(broker: &Broker) -> Vec<serde_json::Value> {
    broker
        .log()
        .lines()
        .filter(|l| !l.trim().is_empty())
        // The readiness banner is printed on stdout, which the harness writes to the same file.
        .filter(|l| !l.starts_with("weft-broker ready"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn json_logs_and_a_log_filter_changed_at_run_time() {
    let broker = Broker::start_with_env(&["--log-format", "json"], &[("WEFT_LOG", "info")]);
    // The readiness line reaches the log just after the banner on stdout.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let lines = json_lines(&broker);
        if let Some(ready) = lines
            .iter()
            .find(|l| l["fields"]["message"] == "weft-broker ready")
        {
            break ready.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no readiness line in {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ready["level"], "INFO", "{ready}");
    assert!(ready["timestamp"].is_string(), "{ready}");
    assert!(ready["fields"]["client"].is_string(), "{ready}");

    let (status, body) = broker.http("GET", "/v1/log-level", None);
    assert_eq!((status, body.as_str()), (200, r#"{"filter":"info"}"#));

    // Debug lines appear only once the filter lets them through.
    let debug_lines = |broker: &Broker| {
        json_lines(broker)
            .into_iter()
            .filter(|l| l["level"] == "DEBUG")
            .count()
    };
    weft_tests::ok_stdout(&broker.cli(&["topic", "create", "quiet", "--partitions", "1"]));
    assert_eq!(debug_lines(&broker), 0, "debug lines under an info filter");
    let (status, body) = broker.http("PUT", "/v1/log-level", Some(r#"{"filter":"debug"}"#));
    assert_eq!((status, body.as_str()), (200, r#"{"filter":"debug"}"#));
    assert_eq!(
        broker.http("GET", "/v1/log-level", None).1,
        r#"{"filter":"debug"}"#
    );
    weft_tests::ok_stdout(&broker.cli(&["topic", "create", "loud", "--partitions", "1"]));
    weft_tests::ok_stdout(&broker.cli(&["produce", "loud", "a", "b"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while debug_lines(&broker) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no debug line after the filter was set to debug:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let changed = json_lines(&broker).into_iter().any(|l| {
        l["fields"]["message"] == "log filter changed" && l["fields"]["filter"] == "debug"
    });
    assert!(changed, "the change itself is logged");

    // Back to info: the debug lines stop.
    let (status, _) = broker.http("PUT", "/v1/log-level", Some(r#"{"filter":"info"}"#));
    assert_eq!(status, 200);
    let before = debug_lines(&broker);
    weft_tests::ok_stdout(&broker.cli(&["produce", "loud", "c", "d"]));
    weft_tests::ok_stdout(&broker.cli(&["topic", "create", "calm", "--partitions", "1"]));
    assert_eq!(
        debug_lines(&broker),
        before,
        "debug lines after going back to info"
    );

    // Bad filters: a 400 with a JSON body naming the field; the filter in force is unchanged.
    for bad in [
        r#"{"filter":"weft_broker=shouting"}"#,
        r#"{"filter":""}"#,
        r#"{"level":"debug"}"#,
        "not json",
    ] {
        let (status, body) = broker.http("PUT", "/v1/log-level", Some(bad));
        assert_eq!(status, 400, "{bad}: {body}");
        let error: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{bad}: {e}: {body}"));
        assert!(error["error"]["message"].is_string(), "{bad}: {body}");
    }
    assert_eq!(
        broker.http("GET", "/v1/log-level", None).1,
        r#"{"filter":"info"}"#
    );
}

#[test]
fn text_logs_on_a_file_carry_no_colour_and_a_bad_log_setting_is_refused() {
    let broker = Broker::start();
    // The readiness line reaches the log just after the banner on stdout.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = broker.log();
        if log.contains("weft-broker ready") {
            break log;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log file");
    assert!(
        log.lines().all(|l| !l.starts_with('{')),
        "JSON lines by default: {log}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    for (args, envs, key) in [
        (vec!["--log-format", "yaml"], vec![], "log_format"),
        (vec![], vec![("WEFT_LOG", "weft=shouting")], "log_level"),
    ] {
        let output = std::process::Command::new(binary("weft-broker"))
            .args(["--data-dir", dir.path().to_str().expect("utf-8")])
            .args(&args)
            .envs(envs)
            .output()
            .expect("run weft-broker");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(key), "{args:?}: {stderr}");
    }
}

#[test]
fn check_config_validates_without_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("never-created");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "data_dir = {:?}\npeer_address_pattern = \"weft-{{ordinal}}.weft-peers.default.svc:7401\"\n\
             cluster_size = 3\nnode_id_from_host_name = true\nlog_format = \"json\"\n",
            data.to_str().expect("utf-8")
        ),
    )
    .expect("write");
    let check = |path: &std::path::Path, host: &str| {
        let mut command = std::process::Command::new(binary("weft-broker"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WEFT_") {
                command.env_remove(key);
            }
        }
        command
            .args(["--check-config", "--config", path.to_str().expect("utf-8")])
            .env("HOSTNAME", host)
            .output()
            .expect("run weft-broker")
    };
    let output = check(&good, "weft-2");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("node 3 of 3 brokers"),
        "the ordinal decides the node id: {stdout}"
    );
    assert!(!data.exists(), "--check-config created the data directory");

    // The same file on a host whose name has no ordinal, and a file with a bad key.
    let output = check(&good, "laptop");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("node_id_from_host_name"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "raft_heartbeat_ms = \"fast\"\n").expect("write");
    let output = check(&bad, "weft-0");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("raft_heartbeat_ms"));
}
