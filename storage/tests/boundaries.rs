//! The storage crate knows nothing of the network: no async runtime, gRPC, Raft or protocol crate
//! may appear anywhere in its (normal) dependency tree. Checked against `cargo metadata`.

use std::collections::{BTreeSet, HashMap};
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
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("metadata is JSON");

    let names: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("id"),
                p["name"].as_str().expect("name"),
            )
        })
        .collect();
    let nodes: HashMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve nodes")
        .iter()
        .map(|n| (n["id"].as_str().expect("id"), n))
        .collect();
    let root = names
        .iter()
        .find(|(_, name)| **name == "weft-storage")
        .map(|(id, _)| *id)
        .expect("weft-storage in the workspace");

    // Walk normal (non-dev, non-build) dependencies transitively.
    let mut seen = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().expect("deps") {
            let normal = dep["dep_kinds"]
                .as_array()
                .expect("dep_kinds")
                .iter()
                .any(|k| k["kind"].is_null());
            if normal {
                stack.push(dep["pkg"].as_str().expect("pkg"));
            }
        }
    }
    let tree: BTreeSet<&str> = seen.iter().map(|id| names[id]).collect();
    assert!(
        tree.contains("sled") && tree.contains("crc32fast"),
        "the walk found the real tree: {tree:?}"
    );
    let bad: Vec<&&str> = FORBIDDEN.iter().filter(|f| tree.contains(**f)).collect();
    assert!(
        bad.is_empty(),
        "weft-storage must stay synchronous and network-free, but depends on {bad:?}"
    );
}
