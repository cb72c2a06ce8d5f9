#!/usr/bin/env python3
"""Checks the Helm chart (charts/weft) with real Helm, offline, and renders it for the tests.

  check_chart.py check BROKER   lint (strict) the default values and every ci/*-values.yaml
                                profile, render each, validate every manifest against the
                                Kubernetes schemas (kubernetes-validate, strict), check what the
                                chart promises, and check the values schema refuses bad values.
                                BROKER is a weft-broker binary: the rendered config must be one
                                it accepts (--check-config), key for key with its own.
  check_chart.py render [JSON]  prints the rendered manifests (default values, plus the JSON
                                object of values given) as one JSON array, for tests/tests/helm_chart.rs.

Needs PyPI's helm-python-sdk (real Helm through its C library) and kubernetes-validate;
.ci/test.sh installs both. Exits 1 with every failed check listed.
"""

import json
import os
import subprocess
import tempfile
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "weft"
RELEASE, NAMESPACE = "weft", "messaging"
# Keys of weft.toml the chart sets itself, from the pod (environment variables).
POD_KEYS = {
    "node_id", "data_dir", "client_listen", "peer_listen", "admin_listen",
    "advertised_client_address", "peers", "node_id_from_host_name",
    "peer_address_pattern", "cluster_size",
}
# Keys the broker leaves unset by default (absent from --print-config).
UNSET_BY_DEFAULT = {"advertised_client_address", "peer_address_pattern", "retention_bytes",
                    "otlp_endpoint", "quic_listen", "client", "peer", "admin", "quic"}
# Where the chart's default differs from the broker's, on purpose: JSON lines for collectors.
CHART_CHOICES = {"log_format"}
# Custom resources: their schemas are not Kubernetes' own; their API versions are checked.
CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor"),
    ("security.istio.io/v1", "PeerAuthentication"), ("security.istio.io/v1", "AuthorizationPolicy"),
    ("policy.linkerd.io/v1beta3", "Server"), ("policy.linkerd.io/v1alpha1", "AuthorizationPolicy"),
    ("policy.linkerd.io/v1alpha1", "MeshTLSAuthentication"),
    ("policy.linkerd.io/v1alpha1", "NetworkAuthentication"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"), ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("consul.hashicorp.com/v1alpha1", "ServiceDefaults"),
    ("consul.hashicorp.com/v1alpha1", "ServiceIntentions"),
}
# Administration: whole services ("/*") and one method. Producers and consumers call only
# Publisher, Subscriber and Metadata (tests/tests/proxy.rs).
OPERATOR_PATHS = {"/weft.v1.TopicAdmin/*", "/weft.v1.Cluster/*", "/weft.v1.Subscriber/DeleteGroup"}

failures = []


def check(condition, what):
    if not condition:
        failures.append(what)
    return condition


def render(values):
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template"] = path
                docs.append(doc)
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name=None):
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    check(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0] if found else {}


def validate(docs, profile):
    version = kubernetes_validate.latest_version()
    for doc in docs:
        doc = {k: v for k, v in doc.items() if k != "__template"}
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM:
            check("spec" in doc, f"{profile}: {key} has no spec")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except Exception as e:  # noqa: BLE001 (every validation failure is a finding)
            failures.append(f"{profile}: {doc['kind']}/{doc['metadata']['name']} is not a valid "
                            f"Kubernetes {version} object: {e}")
    return version


def ports_are_named_and_typed(docs, profile):
    for svc in by_kind(docs, "Service"):
        for p in svc["spec"]["ports"]:
            name = p["name"]
            if name == "udp-quic":
                check(p.get("protocol") == "UDP" and "appProtocol" not in p,
                      f"{profile}: {svc['metadata']['name']}:{name} is UDP, with no appProtocol: {p}")
                continue
            check(name.startswith(("grpc-", "http-")), f"{profile}: Service port {name} is not grpc-*/http-*")
            if name.startswith("grpc-"):
                check(p.get("appProtocol") == "kubernetes.io/h2c",
                      f"{profile}: {svc['metadata']['name']}:{name} lacks appProtocol kubernetes.io/h2c")
    for sts in by_kind(docs, "StatefulSet"):
        for c in sts["spec"]["template"]["spec"]["containers"]:
            for p in c["ports"]:
                if p["name"] == "udp-quic":
                    check(p.get("protocol") == "UDP", f"{profile}: container port udp-quic is UDP: {p}")
                    continue
                check(p["name"].startswith(("grpc-", "http-")), f"{profile}: container port {p['name']}")


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def check_default(docs, broker):
    sts = one(docs, "StatefulSet", RELEASE)
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    check(spec["podManagementPolicy"] == "Parallel", "podManagementPolicy is not Parallel")
    check(spec["replicas"] == 3, "three brokers by default")
    check(spec["serviceName"] == f"{RELEASE}-peers", "serviceName is the headless Service")
    vct = spec.get("volumeClaimTemplates", [])
    check(len(vct) == 1 and vct[0]["spec"]["resources"]["requests"]["storage"] == "20Gi",
          "a 20Gi volumeClaimTemplate")
    peers = one(docs, "Service", f"{RELEASE}-peers")
    check(peers["spec"].get("clusterIP") == "None", "the peer Service is headless")
    check(peers["spec"].get("publishNotReadyAddresses") is True, "publishNotReadyAddresses")
    client = one(docs, "Service", RELEASE)
    check(client["spec"].get("clusterIP") != "None", "the client Service has a ClusterIP")
    pdb = one(docs, "PodDisruptionBudget")
    check(pdb["spec"]["maxUnavailable"] == 1, "PDB maxUnavailable 1")
    check("topologySpreadConstraints" in pod, "topologySpreadConstraints")
    check("podAntiAffinity" in pod.get("affinity", {}), "pod anti-affinity")
    check(c["startupProbe"]["grpc"]["port"] == 7400, "startup probe: gRPC health, client port")
    check(c["livenessProbe"]["grpc"]["port"] == 7400, "liveness probe: gRPC health, client port")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe: /readyz")
    check(c["readinessProbe"]["httpGet"]["port"] == "http-admin", "readiness on the admin port")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    check(pre[:1] == ["weft"] and pre[-2:] == ["cluster", "drain"], f"preStop drains: {pre}")
    check(pod["terminationGracePeriodSeconds"] >= 60, "terminationGracePeriodSeconds >= 60")
    psc, sc = pod["securityContext"], c["securityContext"]
    check(psc.get("runAsNonRoot") is True, "runAsNonRoot")
    check(psc.get("runAsUser") not in (None, 0, 1337), "a UID other than 0 and 1337")
    check(sc.get("readOnlyRootFilesystem") is True, "read-only root filesystem")
    check(sc.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"),
          "capabilities: drop ALL, add none")
    check("resources" in c and c["resources"].get("requests"), "resource requests")
    env = env_of(c)
    check(env["WEFT_PEER_ADDRESS_PATTERN"]["value"]
          == f"{RELEASE}-{{ordinal}}.{RELEASE}-peers.{NAMESPACE}.svc.cluster.local:7401",
          "peers by stable DNS name")
    check(env["WEFT_CLUSTER_SIZE"]["value"] == "3", "cluster size = replicas")
    check(env["HOSTNAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name",
          "the node id comes from the pod name")

    # The config file maps onto the broker's keys one to one.
    cm = one(docs, "ConfigMap", RELEASE)
    config = tomllib.loads(cm["data"]["weft.toml"])
    values = helm.Chart.load(str(CHART)).values["config"]
    tables = [k for k, v in values.items() if isinstance(v, dict)]
    expected = {k: v for k, v in values.items() if v is not None and not isinstance(v, dict)}
    for table in tables:
        expected[table] = {k: v for k, v in values[table].items() if v is not None}
    check(config == expected, f"weft.toml differs from values.config: {config} vs {expected}")
    printed = tomllib.loads(subprocess.run([broker, "--print-config"], check=True,
                                           capture_output=True, text=True,
                                           env={"PATH": os.environ.get("PATH", "")}).stdout)
    # --print-config leaves out keys that are unset (None).
    chart_keys = set(values) | POD_KEYS
    check(set(printed) <= chart_keys and chart_keys - set(printed) <= UNSET_BY_DEFAULT,
          f"values.config + the pod's keys != the broker's keys: missing {set(printed) - chart_keys}, "
          f"unknown {chart_keys - set(printed) - UNSET_BY_DEFAULT}")
    for table in tables:
        defaults = values[table]
        broker_table = printed.get(table, {})
        check(set(broker_table) == {k for k, v in defaults.items() if v is not None}
              and set(defaults) - set(broker_table) <= UNSET_BY_DEFAULT,
              f"config.{table} != the broker's: {sorted(defaults)} vs {sorted(broker_table)}")
        for key, value in defaults.items():
            check(broker_table.get(key) == value,
                  f"config.{table}.{key}: the chart says {value!r}, the broker's default is "
                  f"{broker_table.get(key)!r}")
    for key, value in values.items():
        if key in CHART_CHOICES:
            continue
        if not isinstance(value, dict) and value is not None:
            check(printed.get(key) == value, f"config.{key}: the chart says {value!r}, "
                                             f"the broker's default is {printed.get(key)!r}")
    # The broker accepts the rendered file with the pod's environment.
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"weft-chart-{os.getpid()}.toml"
    tmp.write_text(cm["data"]["weft.toml"])
    pod_env = {"PATH": os.environ.get("PATH", "")}
    for name, e in env.items():
        if "value" in e:
            pod_env[name] = e["value"].replace("$(POD_NAME)", f"{RELEASE}-1")
    pod_env["HOSTNAME"] = f"{RELEASE}-1"
    ran = subprocess.run([broker, "--check-config", "--config", str(tmp)], env=pod_env,
                         capture_output=True, text=True)
    tmp.unlink()
    check(ran.returncode == 0 and "node 2 of 3 brokers" in ran.stdout,
          f"the broker refuses the rendered config: {ran.stdout} {ran.stderr}")


def check_probes(profile, docs):
    """Startup and liveness: gRPC health on the client port where the mesh lets gRPC probes
    through (none, Istio), HTTP /healthz on the admin port under Linkerd and Consul."""
    sts = one(docs, "StatefulSet", RELEASE)
    c = sts["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe"):
        if profile in ("linkerd", "consul"):
            check(c[probe].get("httpGet", {}).get("path") == "/healthz"
                  and c[probe]["httpGet"].get("port") == "http-admin",
                  f"{profile}: {probe} is HTTP /healthz on the admin port: {c[probe]}")
        else:
            check(c[probe].get("grpc", {}).get("port") == 7400,
                  f"{profile}: {probe} is the gRPC health check on the client port: {c[probe]}")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{profile}: readiness /readyz")


def check_schema_bounds(broker):
    """Every numeric config key's bounds in the schema are values the broker accepts: a value
    Helm lets through never makes the pods crash-loop on a config error."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config_schema = schema["properties"]["config"]["properties"]
    cases = []
    for key, spec in config_schema.items():
        tables = [(key, spec)] if spec.get("type") != "object" else [
            (f"{key}.{k}", v) for k, v in spec.get("properties", {}).items()]
        for path, leaf in tables:
            types = leaf.get("type")
            if types not in ("integer", "number") and not (
                    isinstance(types, list) and "integer" in types):
                continue
            for bound in ("minimum", "maximum"):
                if bound in leaf:
                    cases.append((path, bound, leaf[bound]))
            for alt in leaf.get("anyOf", []):
                for bound in ("minimum", "maximum", "const"):
                    if bound in alt:
                        cases.append((path, bound, alt[bound]))
            # The broker bounds every such key but these (any positive value is fine; the
            # leader balance's interval is 0 or within bounds: an anyOf, whose bounds are
            # checked above).
            if path not in ("leader_balance_interval_ms", "topic_defaults.retention_bytes",
                            "topic_defaults.retention_ms"):
                check("minimum" in leaf and "maximum" in leaf,
                      f"config.{path} has both bounds in the schema: {leaf}")
    check(len(cases) >= 20, f"numeric config keys with bounds in the schema: {len(cases)}")
    base = helm.Chart.load(str(CHART)).values["config"]
    with tempfile.TemporaryDirectory() as tmp:
        for path, bound, value in cases:
            values = json.loads(json.dumps(base))
            table, _, leaf = path.rpartition(".")
            (values[table] if table else values)[leaf] = value
            if path == "raft_election_timeout_ms" and bound == "minimum":
                values["raft_heartbeat_ms"] = value // 2
            if path == "raft_heartbeat_ms" and bound == "maximum":
                values["raft_election_timeout_ms"] = value * 2
            # Limits that must fit in a gRPC message (a rule across keys, which the broker
            # checks at start).
            if path == "grpc_message_bytes_max" and bound == "minimum":
                values["fetch_bytes_max"] = value
                values["topic_defaults"]["max_message_bytes"] = value
            # A record must fit in a segment with room for its frame (checked at start too).
            if path == "topic_defaults.segment_bytes" and bound == "minimum":
                values["topic_defaults"]["max_message_bytes"] = value - 1024
            if path == "topic_defaults.max_message_bytes" and bound == "maximum":
                values["topic_defaults"]["segment_bytes"] = max(
                    values["topic_defaults"].get("segment_bytes", 0), value + 1024)
            if path in ("fetch_bytes_max", "topic_defaults.max_message_bytes") \
                    and bound == "maximum":
                values["grpc_message_bytes_max"] = \
                    config_schema["grpc_message_bytes_max"]["maximum"]
            docs = render({"config": values})
            cm = one(docs, "ConfigMap", RELEASE)
            file = os.path.join(tmp, "weft.toml")
            with open(file, "w") as f:
                f.write(cm["data"]["weft.toml"])
            out = subprocess.run([broker, "--config", file, "--check-config"],
                                 capture_output=True, text=True,
                                 env={"PATH": os.environ.get("PATH", "")})
            check(out.returncode == 0,
                  f"the schema's {bound} of config.{path} ({value}) is refused by the broker: "
                  f"{out.stderr.strip()}")
    print(f"schema bounds the broker accepts: {len(cases)}")


def check_listener_tls(broker):
    """Listener TLS and config-file ACL rules through the chart: weft.toml gets [tls.client],
    [tls.peer], [tls.admin] and [[acl.rules]] tables the broker accepts (with real files), the
    probes move off the TLS client port (HTTPS on a TLS admin port), and the preStop drain's
    `weft` gets its TLS settings from the environment."""
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in ("ca", "broker"):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                            "-keyout", f"{tmp}/{name}-key.pem", "-out", f"{tmp}/{name}.pem",
                            "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:weft"],
                           check=True, capture_output=True)
            files[name] = (f"{tmp}/{name}.pem", f"{tmp}/{name}-key.pem")
        listener = {"cert_file": files["broker"][0], "key_file": files["broker"][1],
                    "ca_file": files["ca"][0], "client_auth": "optional"}
        values = {
            "config": {
                "tls": {"client": listener, "peer": listener, "admin": listener},
                "auth": {"broker_identities": ["spiffe://cluster.local/ns/weft/sa/weft"]},
                "acl": {"enabled": True, "rules": [
                    {"identity": "spiffe://cluster.local/ns/shop/sa/orders",
                     "resource": "topic:orders", "operations": ["publish", "describe"]}]},
            },
            "drainToken": {"secretName": "weft-drain", "key": "token"},
            "extraVolumes": [{"name": "tls", "secret": {"secretName": "weft-tls"}}],
            "extraVolumeMounts": [{"name": "tls", "mountPath": "/etc/weft/tls",
                                   "readOnly": True}],
        }
        docs = render(values)
        validate(docs, "listener-tls")
        cm = one(docs, "ConfigMap", RELEASE)
        config = tomllib.loads(cm["data"]["weft.toml"])
        check(config["tls"]["client"] == listener and config["tls"]["admin"] == listener,
              f"[tls.client] and [tls.admin] rendered: {config.get('tls')}")
        check(config["acl"]["rules"] == values["config"]["acl"]["rules"],
              f"[[acl.rules]] rendered: {config['acl']}")
        file = os.path.join(tmp, "weft.toml")
        with open(file, "w") as f:
            f.write(cm["data"]["weft.toml"])
        out = subprocess.run([broker, "--config", file, "--check-config"], capture_output=True,
                             text=True, env={"PATH": os.environ.get("PATH", "")})
        check(out.returncode == 0, f"the broker refuses the TLS config: {out.stderr.strip()}")
        sts = one(docs, "StatefulSet", RELEASE)
        pod = sts["spec"]["template"]["spec"]
        c = pod["containers"][0]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe].get("httpGet", {})
            check(get.get("port") == "http-admin" and get.get("scheme") == "HTTPS",
                  f"listener TLS: {probe} is HTTPS on the admin port: {c[probe]}")
        env = env_of(c)
        check(env.get("WEFT_TLS_CA_FILE", {}).get("value") == files["ca"][0]
              and env.get("WEFT_TLS_CERT_FILE", {}).get("value") == files["broker"][0]
              and "$(POD_NAME)" in env.get("WEFT_TLS_SERVER_NAME", {}).get("value", ""),
              f"the drain's TLS settings in the environment: {env}")
        check("--tls" in c["lifecycle"]["preStop"]["exec"]["command"],
              "the drain calls with TLS")
        check(any(m["mountPath"] == "/etc/weft/tls" for m in c["volumeMounts"])
              and any(v["name"] == "tls" for v in pod["volumes"]),
              "the TLS Secret is mounted")
    print("listener TLS and ACL rules render into a config the broker accepts")


def check_drain_token():
    """With ACLs on, the preStop drain gets its bearer token from a Secret (WEFT_TOKEN)."""
    docs = render({"config": {"acl": {"enabled": True}},
                   "drainToken": {"secretName": "weft-drain", "key": "token"}})
    sts = one(docs, "StatefulSet", RELEASE)
    env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    ref = env.get("WEFT_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    check(ref == {"name": "weft-drain", "key": "token"}, f"the drain token from its Secret: {ref}")
    chart = helm.Chart.load(str(CHART))
    notes = chart.render({"config": {"acl": {"enabled": True}}}, name=RELEASE,
                         namespace=NAMESPACE, is_install=True)
    text = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    check("drainToken" in text, "NOTES warns when ACLs are on and the drain has no token")
    check("cluster rebalance --wait" in text and "cluster remove-broker" in text,
          "NOTES gives the scale-up and scale-down commands")


def check_profile(profile, docs):
    check_probes(profile, docs)
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    if profile == "istio":
        pa = one(docs, "PeerAuthentication")
        check(pa.get("spec", {}).get("mtls", {}).get("mode") == "STRICT", "istio: STRICT mTLS")
        ap = one(docs, "AuthorizationPolicy")
        rules = ap.get("spec", {}).get("rules", [])
        peer = [r for r in rules if r["to"][0]["operation"].get("ports") == ["7401"]]
        check(len(peer) == 1 and peer[0]["from"][0]["source"]["principals"]
              == [f"cluster.local/ns/{NAMESPACE}/sa/{RELEASE}"],
              "istio: the peer port only from the brokers' service account")
        ops = [r for r in rules if "from" in r
               and r["from"][0]["source"].get("principals") == ["cluster.local/ns/ops/sa/weft-operator"]]
        check(len(ops) == 1 and set(ops[0]["to"][0]["operation"]["paths"]) == OPERATOR_PATHS,
              "istio: operator methods only from the operator")
        open_rule = [r for r in rules if r["to"][0]["operation"].get("notPaths")]
        check(len(open_rule) == 1 and set(open_rule[0]["to"][0]["operation"]["notPaths"])
              == OPERATOR_PATHS, "istio: clients get every other method")
    elif profile == "linkerd":
        servers = by_kind(docs, "Server")
        check({s["spec"]["port"]: s["spec"]["proxyProtocol"] for s in servers}
              == {"grpc-client": "gRPC", "grpc-peer": "gRPC", "http-admin": "HTTP/1"},
              "linkerd: a Server per port with its protocol")
        route = one(docs, "GRPCRoute", f"{RELEASE}-operator-methods")
        methods = {f"/{m['method']['service']}/{m['method'].get('method', '*')}"
                   for m in route["spec"]["rules"][0]["matches"]}
        check(methods == OPERATOR_PATHS, f"linkerd: operator GRPCRoute methods {methods}")
        targets = {d["spec"]["targetRef"]["name"] for d in by_kind(docs, "AuthorizationPolicy")}
        check({f"{RELEASE}-peer", f"{RELEASE}-operator-methods", f"{RELEASE}-client-methods",
               f"{RELEASE}-admin-api", f"{RELEASE}-admin-health"} <= targets,
              f"linkerd: authorization for every route and the peer Server: {targets}")
    elif profile == "consul":
        sd = one(docs, "ServiceDefaults")
        check(sd["spec"]["protocol"] == "grpc", "consul: protocol grpc")
        si = one(docs, "ServiceIntentions")
        sources = {s["name"]: s for s in si["spec"]["sources"]}
        check(sources.get(RELEASE, {}).get("action") == "allow", "consul: brokers allowed")
        check(sources.get("weft-operator", {}).get("action") == "allow", "consul: operator allowed")
        for client in ("orders", "billing"):
            perms = sources.get(client, {}).get("permissions", [])
            denied = {p["http"].get("pathExact") or p["http"]["pathPrefix"] + "*"
                      for p in perms if p["action"] == "deny"}
            check(denied == OPERATOR_PATHS and perms[-1]["action"] == "allow",
                  f"consul: {client} is denied the operator methods only")
    elif profile == "per-pod-services":
        names = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
        check({f"{RELEASE}-{i}" for i in range(5)} <= names, f"per-pod Services: {names}")
        env = env_of(one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0])
        check(env["WEFT_PEER_ADDRESS_PATTERN"]["value"]
              == f"{RELEASE}-{{ordinal}}.{NAMESPACE}.svc.cluster.local:7401",
              "per-pod Services: peers through them")
        check(env["WEFT_CLUSTER_SIZE"]["value"] == "5", "five brokers")
        check(("monitoring.coreos.com/v1", "ServiceMonitor") in kinds, "a ServiceMonitor")
        check(("monitoring.coreos.com/v1", "PodMonitor") in kinds, "a PodMonitor")
    elif profile == "quic":
        # The listener's UDP port on the pods, the client Service and every per-pod Service.
        sts = one(docs, "StatefulSet")
        ports = sts["spec"]["template"]["spec"]["containers"][0]["ports"]
        check({"name": "udp-quic", "containerPort": 7403, "protocol": "UDP"} in ports,
              f"quic: the container opens UDP 7403: {ports}")
        services = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"]
        check(len(services) == 4, f"quic: the client Service and three per-pod Services: {len(services)}")
        for svc in services:
            check({"name": "udp-quic", "port": 7403, "targetPort": "udp-quic", "protocol": "UDP"}
                  in svc["spec"]["ports"], f"quic: {svc['metadata']['name']} opens UDP 7403")
        config = one(docs, "ConfigMap")["data"]
        check(any('quic_listen = "0.0.0.0:7403"' in text for text in config.values()),
              f"quic: the broker's config sets the listener: {config}")
    elif profile == "single-node":
        sts = one(docs, "StatefulSet")
        check("volumeClaimTemplates" not in sts["spec"], "no volume claim without persistence")
        check(not by_kind(docs, "PodDisruptionBudget"), "no PDB")
    if profile != "quic":
        check(not any(p["name"] == "udp-quic" for svc in by_kind(docs, "Service")
                      for p in svc["spec"]["ports"]), f"{profile}: no QUIC port without quic_listen")
    if profile != "istio":
        check(not by_kind(docs, "PeerAuthentication"), f"{profile}: no Istio objects")
    if profile != "default":
        return
    check(not any(k[0].startswith(("security.istio", "policy.linkerd", "consul.", "monitoring."))
                  for k in kinds), "default: no mesh or monitoring objects")


def check_image(docs):
    """The image (broker/Dockerfile) holds what the pod runs, as the user the chart expects."""
    dockerfile = (CHART.parents[1] / "broker" / "Dockerfile").read_text()
    lines = [l.strip() for l in dockerfile.splitlines() if l.strip() and not l.startswith("#")]
    runtime = lines[max(i for i, l in enumerate(lines) if l.startswith("FROM ")):]
    copied = " ".join(l for l in runtime if l.startswith("COPY "))
    users = [l.split()[1] for l in runtime if l.startswith("USER ")]
    check(users and users[-1].split(":")[0] not in ("0", "root", "1337"),
          f"the image runs as {users}: not root, not 1337")
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    check(users and int(users[-1].split(":")[0]) == pod["securityContext"]["runAsUser"],
          "the image's user is the chart's runAsUser")
    container = pod["containers"][0]
    for program in (container["command"][0], container["lifecycle"]["preStop"]["exec"]["command"][0]):
        check(f"/{program} " in copied + " " and "/usr/local/bin/" in copied,
              f"the image has no /usr/local/bin/{program}")
    check("--release" in dockerfile and "--locked" in dockerfile, "a locked release build")


BAD_VALUES = [
    ({"replicaCount": 0}, "replicaCount"),
    ({"config": {"topic_defaults": {"fsync_policy": "never"}}}, "fsync_policy"),
    ({"config": {"no_such_key": 1}}, "no_such_key"),
    ({"config": {"raft_heartbeat_ms": "fast"}}, "raft_heartbeat_ms"),
    ({"mesh": {"profile": "cilium"}}, "profile"),
    ({"podSecurityContext": {"runAsUser": 1337}}, "runAsUser"),
    ({"persistence": {"size": "lots"}}, "size"),
    ({"ports": {"client": 70000}}, "client"),
    ({"replicas": 3}, "replicas"),
    ({"securityContext": {"privileged": True}}, "privileged"),
    ({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}, "add"),
    ({"securityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
    ({"securityContext": {"runAsUser": 0}}, "runAsUser"),
    ({"resources": {"foo": 1}}, "foo"),
    ({"terminationGracePeriodSeconds": 30}, "terminationGracePeriodSeconds"),
    ({"config": {"request_timeout_ms": 1}}, "request_timeout_ms"),
    ({"config": {"tls": {"client": {"cert_file": "/c.pem"}}}}, "key_file"),
    ({"config": {"tls": {"admin": {"cert_file": "/c.pem", "key_file": "/k.pem",
                                   "ca_file": "/ca.pem"}}}}, "client_auth"),
    ({"config": {"acl": {"rules": [{"identity": "a", "resource": "cluster",
                                    "operations": ["fly"]}]}}}, "operations"),
    ({"config": {"topic_defaults": {"segment_bytes": 1024}}}, "segment_bytes"),
    ({"config": {"topic_defaults": {"segment_bytes": 1048576}}}, "max_message_bytes"),
]


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "render":
        values = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
        docs = render(values)
        print(json.dumps(docs))
        return 0
    if len(sys.argv) != 3 or sys.argv[1] != "check":
        print(__doc__, file=sys.stderr)
        return 2
    broker = sys.argv[2]
    profiles = [("default", None)] + [
        (p.name.removesuffix("-values.yaml"), yaml.safe_load(p.read_text()))
        for p in sorted((CHART / "ci").glob("*-values.yaml"))
    ]
    check(len(profiles) >= 7, "the ci/ profiles are missing")
    rendered = 0
    for profile, values in profiles:
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        serious = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
        check(not serious, f"{profile}: helm lint --strict: {serious}")
        docs = render(values)
        version = validate(docs, profile)
        ports_are_named_and_typed(docs, profile)
        check_profile(profile, docs)
        if profile == "default":
            check_default(docs, broker)
            check_image(docs)
        rendered += len(docs)
        print(f"{profile}: lint clean, {len(docs)} manifests valid for Kubernetes {version}")
    check_drain_token()
    check_listener_tls(broker)
    check_schema_bounds(broker)
    for values, key in BAD_VALUES:
        try:
            render(values)
            failures.append(f"the values schema accepted {values}")
        except helm.HelmError as e:
            check(key in str(e), f"the refusal of {values} does not name {key}: {e}")
    print(f"bad values refused: {len(BAD_VALUES)}")
    if failures:
        print(f"\n{len(failures)} check(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print(f"chart OK: {len(profiles)} profiles, {rendered} manifests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
