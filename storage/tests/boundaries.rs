//! The storage crate knows nothing of the network: no async runtime, gRPC, Raft or protocol crate
//! may appear anywhere in its (normal) dependency tree.
//!
//! Checked with `cargo tree` for the host platform only: it needs just the crates a build of this
//! machine already fetched. (`cargo metadata` resolves every platform's crates, so offline it fails
//! on a fresh machine whose cache holds only the host's.)

use std::collections::BTreeSet;
use std::process::Command;

const FORBIDDEN: &[&str] = &[
    "tokio",
    "tonic",
    "openraft",
    "prost",
    "weft-proto",
    "hyper",
    "async-std",
    "quinn",
];

#[test]
fn storage_depends_on_no_network_runtime_or_protocol_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--package",
            "weft-storage",
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--locked",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // One package per line: "name vX.Y.Z (source)", "(*)" marking repeats.
    let tree: BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(
        tree.contains("weft-storage") && tree.contains("sled") && tree.contains("crc32fast"),
        "the walk found the real tree: {tree:?}"
    );
    let bad: Vec<&&str> = FORBIDDEN.iter().filter(|f| tree.contains(**f)).collect();
    assert!(
        bad.is_empty(),
        "weft-storage must stay synchronous and network-free, but depends on {bad:?}"
    );
}
