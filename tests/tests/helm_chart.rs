//! The Helm chart (charts/weft), with real Helm (PyPI's helm-python-sdk, offline) and real
//! brokers:
//! - `tests/chart/check_chart.py check`: `helm lint --strict` and rendering of the default values
//!   and every mesh profile, each manifest validated against the Kubernetes schemas
//!   (kubernetes-validate), the chart's promises checked, bad values refused by the schema.
//! - A three-node cluster started from the rendered StatefulSet exactly as a kubelet would start
//!   its pods: the container's command, args and environment (field references and `$(VAR)`
//!   expanded), its volume mounts (the ConfigMap's files, a data volume), one network namespace
//!   per pod with its own address and the cluster's DNS names in its hosts file, host names
//!   from the pod names. The probes the chart declares pass, a client in a namespace of its own
//!   produces and consumes through the client Service's name, a fourth pod (the release scaled
//!   to four) joins and gets replicas from a rebalance, then one pod's preStop hook runs
//!   (its leaderships move away), it is stopped with SIGTERM, and nothing is lost.
//!
//! Needs root (network namespaces) and the Python packages `.ci/test.sh` installs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_jepsen::net::Net;
use weft_tests::{bin_dir, binary, http};

const NAMESPACE: &str = "messaging";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("chart/check_chart.py")
}

fn python(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .expect("python3 (.ci/test.sh installs helm-python-sdk and kubernetes-validate)")
}

#[test]
fn the_chart_lints_renders_and_validates_in_every_profile() {
    weft_tests::ensure_binaries();
    let broker = binary("weft-broker");
    let output = python(&["check", broker.to_str().expect("utf-8")]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("chart OK"), "{stdout}");
}

/// What the cluster test creates outside its temp dir, removed on drop (also after a panic).
struct Guard {
    net: Option<Net>,
    netns_dirs: Vec<PathBuf>,
    mount_points: Vec<PathBuf>,
    pods: Vec<Option<Child>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for child in self.pods.iter_mut().flatten() {
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_raw(child.id() as i32).expect("pid"),
                rustix::process::Signal::KILL,
            );
            let _ = child.wait();
        }
        if let Some(net) = self.net.as_mut() {
            net.teardown();
        }
        for dir in &self.netns_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        // /etc/netns itself, if nothing else uses it.
        let _ = std::fs::remove_dir("/etc/netns");
        for dir in self.mount_points.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// One pod of the StatefulSet, as the kubelet would run it.
struct Pod {
    name: String,
    ip: Ipv4Addr,
    netns: String,
    env: BTreeMap<String, String>,
    dir: PathBuf,
}

/// Expands `$(VAR)` references to variables defined earlier, as Kubernetes does.
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (name, v) in env {
        out = out.replace(&format!("$({name})"), v);
    }
    out
}

/// The container's environment for pod `name` at `ip`.
fn pod_env(container: &Value, name: &str, ip: Ipv4Addr) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container["env"].as_array().expect("env") {
        let key = var["name"].as_str().expect("name").to_string();
        let value = if let Some(v) = var["value"].as_str() {
            expand(v, &env)
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => name.to_string(),
                Some("metadata.namespace") => NAMESPACE.to_string(),
                Some("status.podIP") => ip.to_string(),
                other => panic!("{key}: unsupported valueFrom {other:?}"),
            }
        };
        env.insert(key, value);
    }
    // The image puts weft-broker and weft on PATH.
    env.insert(
        "PATH".into(),
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            bin_dir().display()
        ),
    );
    env
}

/// Runs `argv` in the pod's network namespace with its environment (and, for the broker, its
/// volumes bind-mounted where the container mounts them).
fn in_pod(pod: &Pod, mounts: &[(PathBuf, String, bool)], argv: &[String]) -> Command {
    let mut script = String::from("set -e\n");
    for (source, target, read_only) in mounts {
        script += &format!("mount --bind '{}' '{target}'\n", source.display());
        if *read_only {
            script += &format!("mount -o remount,bind,ro '{target}'\n");
        }
    }
    script += "exec \"$@\"\n";
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &pod.netns, "sh", "-c", &script, "sh"])
        .args(argv)
        .env_clear()
        .envs(&pod.env)
        .current_dir("/");
    command
}

fn run_ok(mut command: Command, what: &str) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{what}: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_statefulset_runs_a_cluster_and_its_prestop_drains() {
    weft_tests::ensure_binaries();
    let render = |values: &str| -> Vec<Value> {
        let output = python(&["render", values]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("rendered JSON")
    };
    let docs = render(r#"{"replicaCount": 3}"#);
    // The release scaled up to four brokers: the new pod's spec.
    let scaled = render(r#"{"replicaCount": 4}"#);
    let scaled_container =
        &find(&scaled, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0];
    let sts = find(&docs, "StatefulSet")[0];
    let pod_spec = &sts["spec"]["template"]["spec"];
    let container = &pod_spec["containers"][0];
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas") as usize;
    let base = sts["metadata"]["name"].as_str().expect("name").to_string();
    let config_map = find(&docs, "ConfigMap")[0];
    let port_of = |name: &str| -> u16 {
        container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {name}")) as u16
    };
    let client_port = port_of("grpc-client");

    let tmp = tempfile::tempdir().expect("tempdir");
    let mut guard = Guard {
        net: None,
        netns_dirs: Vec::new(),
        mount_points: Vec::new(),
        pods: Vec::new(),
    };
    // One namespace per pod (the three, and a fourth for the scale-up), and one for the client.
    let net = Net::create(replicas + 2, tmp.path(), &mut rand::rng()).expect("network");
    let pods: Vec<Pod> = (0..=replicas)
        .map(|i| {
            let name = format!("{base}-{i}");
            let ip = net.node_ip(i as u64 + 1);
            let dir = tmp.path().join(&name);
            std::fs::create_dir_all(&dir).expect("pod dir");
            let spec = if i < replicas {
                container
            } else {
                scaled_container
            };
            Pod {
                env: pod_env(spec, &name, ip),
                name,
                ip,
                netns: net.namespace(i as u64 + 1).to_string(),
                dir,
            }
        })
        .collect();
    let client_ns = net.namespace(replicas as u64 + 2).to_string();
    let client_pod = Pod {
        name: "client".into(),
        ip: net.node_ip(replicas as u64 + 2),
        netns: client_ns.clone(),
        env: pod_env(
            &serde_json::json!({"env": []}),
            "client",
            Ipv4Addr::LOCALHOST,
        ),
        dir: tmp.path().join("client"),
    };
    guard.net = Some(net);

    // Cluster DNS: each pod's name under the peer pattern and its advertised address, and the
    // client Service's name (a Service address stands for one ready pod here).
    let host_of = |address: &str| address.rsplit_once(':').expect("host:port").0.to_string();
    let pattern = &pods[0].env["WEFT_PEER_ADDRESS_PATTERN"];
    let services = find(&docs, "Service");
    let client_service = services
        .iter()
        .find(|s| s["spec"]["clusterIP"] != "None")
        .expect("client Service")["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let pattern_host = host_of(pattern);
    let domain = pattern_host
        .split_once(&format!(".{NAMESPACE}.svc."))
        .expect("namespace in the pattern")
        .1
        .to_string();
    let client_service_host = format!("{client_service}.{NAMESPACE}.svc.{domain}");
    let hosts = |service_pod: usize| {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (i, pod) in pods.iter().enumerate() {
            let peer = host_of(&pattern.replace("{ordinal}", &i.to_string()));
            let advertised = host_of(&pod.env["WEFT_ADVERTISED_CLIENT_ADDRESS"]);
            text += &format!("{} {peer} {advertised} {}\n", pod.ip, pod.name);
        }
        text += &format!("{} {client_service_host}\n", pods[service_pod].ip);
        text
    };
    let write_hosts = |guard: &mut Guard, netns: &str, text: &str| {
        // `ip netns exec` bind-mounts /etc/netns/<name>/* over /etc/*.
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).expect("/etc/netns/<ns>");
        if !guard.netns_dirs.contains(&dir) {
            guard.netns_dirs.push(dir.clone());
        }
        std::fs::write(dir.join("hosts"), text).expect("hosts");
    };
    for pod in &pods {
        write_hosts(&mut guard, &pod.netns, &hosts(0));
    }
    write_hosts(&mut guard, &client_ns, &hosts(0));

    // The volumes: the ConfigMap's files and the data volume, at the container's mount paths.
    let mut command: Vec<String> = container["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect();
    command.extend(
        container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|v| v.as_str().expect("string").to_string()),
    );
    let mut pod_mounts = Vec::new();
    for pod in &pods {
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
            let volume = mount["name"].as_str().expect("name");
            let target = mount["mountPath"].as_str().expect("mountPath").to_string();
            let source = pod.dir.join(volume);
            std::fs::create_dir_all(&source).expect("volume dir");
            let declared = pod_spec["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .find(|v| v["name"] == volume);
            if let Some(map) = declared.and_then(|v| v["configMap"]["name"].as_str()) {
                assert_eq!(config_map["metadata"]["name"], map);
                for (file, text) in config_map["data"].as_object().expect("data") {
                    std::fs::write(source.join(file), text.as_str().expect("text"))
                        .expect("config file");
                }
            } else {
                let claim = sts["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["metadata"]["name"] == volume));
                assert!(
                    claim || declared.is_some_and(|v| v.get("emptyDir").is_some()),
                    "volume {volume}"
                );
                // The pod's user owns its volume (fsGroup).
            }
            // The mount point must exist on this machine (created here, removed after).
            let mut missing = Vec::new();
            let mut path = PathBuf::from(&target);
            while !path.exists() {
                missing.push(path.clone());
                path = path.parent().expect("parent").to_path_buf();
            }
            for dir in missing.into_iter().rev() {
                std::fs::create_dir(&dir).expect("mount point");
                guard.mount_points.push(dir);
            }
            mounts.push((source, target, mount["readOnly"].as_bool().unwrap_or(false)));
        }
        pod_mounts.push(mounts);
    }

    // Start the three pods at once (podManagementPolicy: Parallel).
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    let start = |pod: &Pod, mounts: &[(PathBuf, String, bool)]| -> Child {
        let log = std::fs::File::create(pod.dir.join("log")).expect("log");
        let mut command = in_pod(pod, mounts, &command);
        command
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command.spawn().expect("start the pod's container")
    };
    for (pod, mounts) in pods.iter().zip(&pod_mounts).take(replicas) {
        guard.pods.push(Some(start(pod, mounts)));
    }
    let logs = |pods: &[Pod]| {
        pods.iter()
            .map(|p| {
                format!(
                    "--- {}:\n{}",
                    p.name,
                    std::fs::read_to_string(p.dir.join("log")).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // The probes the chart declares: readiness (HTTP on the admin port) and the gRPC health
    // check of the startup and liveness probes.
    let readiness = &container["readinessProbe"]["httpGet"];
    let ready_path = readiness["path"].as_str().expect("path").to_string();
    let ready_port = port_of(readiness["port"].as_str().expect("named port"));
    let live_port = container["livenessProbe"]["grpc"]["port"]
        .as_u64()
        .expect("grpc port") as u16;
    let wait_ready = async |pod: &Pod| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let address = format!("{}:{ready_port}", pod.ip);
            let listening = std::net::TcpStream::connect_timeout(
                &address.parse().expect("address"),
                Duration::from_secs(1),
            )
            .is_ok();
            let ready = listening && http(&address, "GET", &ready_path, None).0 == 200;
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became ready\n{}",
                pod.name,
                logs(&pods)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}:{live_port}", pod.ip))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect for the gRPC health probe");
        let health = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("gRPC health probe")
            .into_inner();
        assert_eq!(
            health.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    };
    for pod in &pods[..replicas] {
        wait_ready(pod).await;
    }
    // The node ids came from the pod names.
    for (i, pod) in pods.iter().enumerate().take(replicas) {
        let log = std::fs::read_to_string(pod.dir.join("log")).unwrap_or_default();
        assert!(
            log.contains(&format!("\"node\":{}", i + 1)),
            "{}: node id {} expected in its JSON log:\n{log}",
            pod.name,
            i + 1
        );
    }

    // A client in its own namespace, through the client Service's name.
    let server = format!("{client_service_host}:{client_port}");
    let weft = |args: &[&str]| {
        let mut argv = vec!["weft".to_string(), "--server".into(), server.clone()];
        argv.extend(args.iter().map(|s| s.to_string()));
        in_pod(&client_pod, &[], &argv)
    };
    run_ok(
        weft(&["topic", "create", "orders", "--partitions", "3"]),
        "create a topic",
    );
    let values: Vec<String> = (0..30).map(|i| format!("order-{i}")).collect();
    let mut args = vec!["produce", "orders"];
    args.extend(values.iter().map(String::as_str));
    run_ok(weft(&args), "produce through the Service");
    let consumed = run_ok(
        weft(&[
            "consume", "orders", "--group", "billing", "--from", "earliest", "--count", "30",
        ]),
        "consume as a group",
    );
    let mut got: Vec<&str> = consumed.lines().collect();
    got.sort();
    let mut want: Vec<&str> = values.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want);

    let admin = |pod: &Pod| format!("{}:{ready_port}", pod.ip);
    let partitions = |pod: &Pod| -> Vec<Value> {
        let (status, body) = http(&admin(pod), "GET", "/v1/topics/orders", None);
        assert_eq!(status, 200, "{body}");
        let topic: Value = serde_json::from_str(&body).expect("json");
        topic["partition_details"]
            .as_array()
            .expect("partitions")
            .clone()
    };
    let leaders = |pod: &Pod| -> Vec<u64> {
        partitions(pod)
            .iter()
            .map(|p| p["leader_id"].as_u64().expect("leader"))
            .collect()
    };

    // Scale-up: the fourth pod, with the spec of the release at four replicas, joins; a
    // rebalance (docs/kubernetes.md) gives it replicas.
    guard
        .pods
        .push(Some(start(&pods[replicas], &pod_mounts[replicas])));
    wait_ready(&pods[replicas]).await;
    let new_node = replicas as u64 + 1;
    run_ok(weft(&["cluster", "rebalance", "--wait"]), "rebalance");
    let holds: usize = partitions(&pods[0])
        .iter()
        .filter(|p| {
            p["replicas"]
                .as_array()
                .expect("replicas")
                .iter()
                .any(|r| r.as_u64() == Some(new_node))
        })
        .count();
    assert!(
        holds > 0,
        "node {new_node} holds no replica after the rebalance: {:?}",
        partitions(&pods[0])
    );

    // The preStop hook of a pod that leads partitions: its leaderships move away.
    let before = leaders(&pods[0]);
    let victim = (1..=new_node)
        .max_by_key(|id| before.iter().filter(|l| *l == id).count())
        .expect("a leader");
    assert!(before.contains(&victim), "nobody leads: {before:?}");
    let v = victim as usize - 1;
    let pre_stop: Vec<String> = container["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .expect("preStop command")
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect();
    let drained = run_ok(in_pod(&pods[v], &[], &pre_stop), "the preStop hook");
    assert!(drained.contains("moved"), "{drained}");
    let survivor = pods
        .iter()
        .position(|p| p.name != pods[v].name)
        .expect("a survivor");
    // (The survivor's own replicas learn the new leaders from their first heartbeats.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let after = leaders(&pods[survivor]);
        if !after.contains(&victim) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {victim} still leads 10 s after its preStop drain: {after:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Then SIGTERM, as the kubelet sends after preStop; the broker exits cleanly in time.
    let grace = pod_spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let mut child = guard.pods[v].take().expect("running");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).expect("pid"),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(grace),
            "the broker outlived terminationGracePeriodSeconds"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}\n{}", logs(&pods));

    // The Service now points at a pod that is still there; nothing was lost, the cluster
    // still takes writes.
    write_hosts(&mut guard, &client_ns, &hosts(survivor));
    run_ok(
        weft(&["produce", "orders", "late-1", "late-2"]),
        "produce after the drain",
    );
    let all = run_ok(
        weft(&[
            "consume", "orders", "--group", "audit", "--from", "earliest", "--count", "32",
        ]),
        "consume everything",
    );
    let mut got: Vec<&str> = all.lines().collect();
    got.sort();
    let mut want: Vec<&str> = values
        .iter()
        .map(String::as_str)
        .chain(["late-1", "late-2"])
        .collect();
    want.sort();
    assert_eq!(got, want);
    drop(guard);
}
