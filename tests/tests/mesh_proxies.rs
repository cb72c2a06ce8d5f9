//! A three-broker cluster with a real HTTP/2 gRPC proxy (Debian's nginx, `grpc_pass`) in front
//! of each broker, as a mesh puts a sidecar in every pod, and nothing else between them:
//! - clients reach the brokers only through the proxies (each broker advertises its proxy's
//!   address, so clients that learn leaders from the metadata come back through a proxy);
//! - brokers reach each other only through the proxies: each broker's peer address is its
//!   proxy's mutual-TLS port, and a broker dials a peer through its own proxy's outbound
//!   listener for that peer (`peer_upstreams`, as Consul's upstreams do); the proxies talk
//!   mutual TLS to each other with their own certificates and accept peer calls only from a
//!   certificate of the mesh's CA naming a proxy. Plaintext between brokers would not work at
//!   all (a peer address is a TLS port), so a working cluster proves every hop was proxied;
//! - a proxy rule denies `/weft.v1.TopicAdmin/` on the applications' port: that client is
//!   refused with PERMISSION_DENIED (saying the proxy answered), the operators' port creates
//!   topics; rules on the `weft-topic` and `weft-group` headers our client mirrors refuse a
//!   topic and a consumer group to the applications;
//! - produce, consume as a group, a simple CommitOffsets, a Subscribe stream that outlives its
//!   maximum age (rotated) and waits idle through heartbeats, and a leader killed with kill -9:
//!   every acknowledged record is read back;
//! - the access logs show each Publish, Subscribe, CommitOffsets and AppendEntries call with its
//!   gRPC path and status, and each peer call with its verified client certificate;
//! - a call a broker forwards to another (a commit to the group coordinator) carries its
//!   caller's W3C `traceparent` on the peer hop, as the mesh sees it;
//! - a proxy's plain HTTP answer to a broker (502 while a peer is down) is read as the gRPC
//!   status it stands for (UNAVAILABLE), as the Rust client reads it, not as a broken message.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_tests::{Broker, Nginx, binary, free_port, free_port_on, ok_stdout, wait_for};

/// Runs openssl in `dir`; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and one certificate per proxy (`proxy<i>.pem`/`.key`, CN `weft-proxy-<i>`, a SPIFFE
/// URI SAN as a mesh issues, usable as server and client), in `dir`.
fn make_certificates(dir: &Path, proxies: usize) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=weft test mesh CA",
        ],
    );
    for i in 1..=proxies {
        let name = format!("weft-proxy-{i}");
        std::fs::write(
            dir.join(format!("proxy{i}.ext")),
            format!(
                "subjectAltName=DNS:{name},URI:spiffe://weft.test/ns/messaging/sa/weft,IP:127.0.0.1\n\
                 extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
            ),
        )
        .expect("ext file");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("proxy{i}.key"),
                "-out",
                &format!("proxy{i}.csr"),
                "-subj",
                &format!("/O=weft/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("proxy{i}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("proxy{i}.pem"),
                "-extfile",
                &format!("proxy{i}.ext"),
            ],
        );
    }
}

/// The ports of one broker's sidecar (all on 127.0.0.1).
#[derive(Debug, Clone)]
struct SidecarPorts {
    /// Applications: administration denied.
    apps: u16,
    /// Operators: everything.
    ops: u16,
    /// Peers, mutual TLS: the broker's peer address as the cluster knows it.
    peer: u16,
    /// Outbound, plaintext from the local broker: (peer node id, port) for each other broker.
    outbound: Vec<(usize, u16)>,
}

/// nginx for broker `i` (its client, peer and admin listeners `broker`), with `ports`; `all`
/// holds every sidecar's ports (to reach the other proxies' peer ports); certificates in
/// `certs`.
fn start_sidecar(
    i: usize,
    broker: &[String; 3],
    ports: &SidecarPorts,
    all: &[SidecarPorts],
    certs: &Path,
) -> Nginx {
    let c = certs.display();
    let mut upstreams = format!(
        "    upstream broker_client {{ server {}; keepalive 32; }}\n    \
         upstream broker_peer {{ server {}; keepalive 32; }}\n",
        broker[0], broker[1]
    );
    let mut outbound = String::new();
    for (j, port) in &ports.outbound {
        upstreams.push_str(&format!(
            "    upstream proxy{j} {{ server 127.0.0.1:{}; keepalive 32; }}\n",
            all[j - 1].peer
        ));
        outbound.push_str(&format!(
            r#"
    # Outbound: this broker's calls to broker {j}, over mutual TLS to its proxy.
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpcs://proxy{j};
            grpc_ssl_certificate {c}/proxy{i}.pem;
            grpc_ssl_certificate_key {c}/proxy{i}.key;
            grpc_ssl_trusted_certificate {c}/ca.pem;
            grpc_ssl_verify on;
            grpc_ssl_name weft-proxy-{j};
            grpc_ssl_server_name on;
        }}
    }}
"#
        ));
    }
    Nginx::start(
        "$server_port $request_method $request_uri $status grpc-status=$sent_trailer_grpc_status \
         client-verify=$ssl_client_verify client-dn=\"$ssl_client_s_dn\" traceparent=$http_traceparent",
        |_| {
            format!(
                r#"    # gRPC streams are long and carry many messages: no body limit, long timeouts.
    client_max_body_size 0;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 1000;
    grpc_read_timeout 300s;
    grpc_send_timeout 300s;
{upstreams}
    # Applications: producers and consumers do not administer, and policies by topic and by
    # consumer group match the weft-topic and weft-group headers (the broker refuses a call
    # whose headers disagree with its body).
    server {{
        listen 127.0.0.1:{apps} http2;
        location /weft.v1.TopicAdmin/ {{ return 403; }}
        location /weft.v1.Cluster/ {{ return 403; }}
        location / {{
            if ($http_weft_topic = "payments") {{ return 403; }}
            if ($http_weft_group = "payroll") {{ return 403; }}
            grpc_pass grpc://broker_client;
        }}
    }}

    # Operators.
    server {{
        listen 127.0.0.1:{ops} http2;
        location / {{ grpc_pass grpc://broker_client; }}
    }}

    # Inbound from the other brokers' proxies: mutual TLS, certificates of the mesh's CA that
    # name a proxy.
    server {{
        listen 127.0.0.1:{peer} ssl http2;
        ssl_certificate {c}/proxy{i}.pem;
        ssl_certificate_key {c}/proxy{i}.key;
        ssl_client_certificate {c}/ca.pem;
        ssl_verify_client on;
        location / {{
            if ($ssl_client_s_dn !~ "CN=weft-proxy-[0-9]+") {{ return 403; }}
            grpc_pass grpc://broker_peer;
        }}
    }}
{outbound}"#,
                apps = ports.apps,
                ops = ports.ops,
                peer = ports.peer,
            )
        },
        &format!("127.0.0.1:{}", ports.apps),
    )
}

/// The `weft` CLI through a proxy's port.
fn cli(port: u16, args: &[&str]) -> std::process::Output {
    Command::new(binary("weft"))
        .args([
            "--server",
            &format!("127.0.0.1:{port}"),
            "--timeout-ms",
            "20000",
        ])
        .args(args)
        .env_remove("WEFT_SERVER")
        .output()
        .expect("run weft")
}

/// Leader of partition `partition` of `topic` as `broker` sees it (0: none), on its admin API.
fn leader(broker: &Broker, topic: &str, partition: usize) -> u64 {
    let (status, body) = broker.http("GET", &format!("/v1/topics/{topic}"), None);
    if status != 200 {
        return 0;
    }
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["partition_details"][partition]["leader_id"]
        .as_u64()
        .unwrap_or(0)
}

/// Values of a `weft consume` run, one per line.
fn values(output: &std::process::Output) -> Vec<String> {
    ok_stdout(output).lines().map(str::to_string).collect()
}

#[test]
fn a_cluster_whose_every_hop_passes_a_mutual_tls_proxy_works_and_shows_each_call() {
    const N: usize = 3;
    let started = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1?}] {what}", started.elapsed());
    let certs = tempfile::tempdir().expect("tempdir");
    make_certificates(certs.path(), N);

    // Brokers on 127.0.0.x (their own address each), sidecars on 127.0.0.1.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
        ^ u64::from(std::process::id());
    let first = 2 + seed % 240;
    let listen: Vec<[String; 3]> = (0..N as u64)
        .map(|i| {
            let ip = format!("127.0.0.{}", first + i);
            [(); 3].map(|()| format!("{ip}:{}", free_port_on(&ip)))
        })
        .collect();
    let ports: Vec<SidecarPorts> = (1..=N)
        .map(|i| SidecarPorts {
            apps: free_port(),
            ops: free_port(),
            peer: free_port(),
            outbound: (1..=N)
                .filter(|j| *j != i)
                .map(|j| (j, free_port()))
                .collect(),
        })
        .collect();
    let peers = (1..=N)
        .map(|i| format!("{i}@127.0.0.1:{}", ports[i - 1].peer))
        .collect::<Vec<_>>()
        .join(",");
    let config = certs.path().join("weft.toml");
    // Short stream lifetimes and heartbeats, so that a consumer sees a rotation.
    std::fs::write(
        &config,
        "stream_age_ms_max = 3000\nstream_heartbeat_ms = 300\n",
    )
    .expect("config");

    // The sidecars first, as a pod's proxy starts before its application.
    let sidecars: Vec<Nginx> = (1..=N)
        .map(|i| start_sidecar(i, &listen[i - 1], &ports[i - 1], &ports, certs.path()))
        .collect();
    // The seed (node 1) last, as start_cluster does.
    let mut brokers: Vec<Option<Broker>> = (0..N).map(|_| None).collect();
    for i in (1..=N).rev() {
        let p = &ports[i - 1];
        let upstreams = p
            .outbound
            .iter()
            .map(|(j, port)| format!("127.0.0.1:{}=127.0.0.1:{port}", ports[j - 1].peer))
            .collect::<Vec<_>>()
            .join(",");
        let id = i.to_string();
        let advertised = format!("127.0.0.1:{}", p.apps);
        brokers[i - 1] = Some(Broker::start_on(
            listen[i - 1].clone(),
            &[
                "--node-id",
                &id,
                "--peers",
                &peers,
                "--peer-upstreams",
                &upstreams,
                "--advertised-client-address",
                &advertised,
                "--config",
                config.to_str().expect("utf-8"),
            ],
            &[],
        ));
    }
    let mut brokers: Vec<Broker> = brokers.into_iter().map(Option::unwrap).collect();
    for broker in &brokers {
        broker.wait_ready();
    }

    phase("cluster ready behind the proxies");
    // Operators create topics; the applications' port refuses it at the proxy.
    ok_stdout(&cli(
        ports[0].ops,
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
    ));
    let refused = cli(ports[1].apps, &["topic", "create", "payments"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "the proxy let CreateTopic through"
    );
    assert!(
        (stderr.contains("PermissionDenied") || stderr.contains("permission denied"))
            && stderr.contains("HTTP 403")
            && stderr.contains("proxy"),
        "{stderr}"
    );
    ok_stdout(&cli(ports[2].ops, &["topic", "create", "payments"]));
    let topics = ok_stdout(&cli(ports[1].ops, &["topic", "list"]));
    assert!(
        topics.contains("orders") && topics.contains("payments"),
        "{topics}"
    );

    phase("topics created");
    // Policies by topic and by group, on the headers our client mirrors.
    let refused = cli(ports[0].apps, &["produce", "payments", "p0"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("HTTP 403"),
        "a produce to payments passed the topic policy: {stderr}"
    );
    ok_stdout(&cli(ports[0].apps, &["produce", "orders", "warm-up"]));
    let refused = cli(
        ports[0].apps,
        &[
            "consume", "orders", "--group", "payroll", "--from", "earliest", "--count", "1",
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("HTTP 403"),
        "a consumer of the payroll group passed the group policy: {stderr}"
    );

    // Produce and consume as a group, through the applications' ports only.
    let first_batch: Vec<String> = (0..30).map(|n| format!("a{n}")).collect();
    let mut args = vec!["produce", "orders"];
    args.extend(first_batch.iter().map(String::as_str));
    ok_stdout(&cli(ports[0].apps, &args));
    let consumed = values(&cli(
        ports[2].apps,
        &[
            "consume", "orders", "--group", "billing", "--from", "earliest", "--count", "31",
        ],
    ));
    let consumed: BTreeSet<String> = consumed.into_iter().collect();
    let mut expected: BTreeSet<String> = first_batch.iter().cloned().collect();
    expected.insert("warm-up".into());
    assert_eq!(consumed, expected);

    phase("produced and consumed as a group");
    // A simple commit (a consumer outside group membership) through a proxy: the broker
    // forwards it to the group's coordinator over the proxied peer links.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // Through every broker, each call with its own W3C trace context: those the broker
    // forwards to the coordinator carry the caller's traceparent on the peer hop.
    let traceparents: Vec<String> = (1..=N)
        .map(|i| {
            format!(
                "00-{:032x}-{:016x}-01",
                0xa11ce_u128 + i as u128,
                0xb0b_u64 + i as u64
            )
        })
        .collect();
    runtime.block_on(async {
        for (i, traceparent) in traceparents.iter().enumerate() {
            let channel = weft_tests::grpc::channel(&format!("127.0.0.1:{}", ports[i].apps)).await;
            let mut request = tonic::Request::new(weft_proto::v1::CommitOffsetsRequest {
                group_id: "audit".into(),
                topic: "orders".into(),
                offsets: (0..3)
                    .map(|partition| weft_proto::v1::PartitionOffset {
                        partition,
                        offset: 0,
                    })
                    .collect(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(20));
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().expect("ascii"));
            weft_tests::grpc::subscriber(&channel)
                .commit_offsets(request)
                .await
                .expect("CommitOffsets through the proxy");
        }
    });

    phase("committed");
    // A consumer that waits longer than a stream's maximum age (3 s) for its next record: its
    // Subscribe stream is rotated and heartbeats keep it alive through the proxy meanwhile.
    let waiting = Command::new(binary("weft"))
        .args(["--server", &format!("127.0.0.1:{}", ports[1].apps)])
        .args([
            "--timeout-ms",
            "20000",
            "consume",
            "orders",
            "--from",
            "earliest",
        ])
        .args(["--count", "32", "--idle-timeout-ms", "30000"])
        .env_remove("WEFT_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run weft consume");
    std::thread::sleep(Duration::from_secs(5));
    ok_stdout(&cli(ports[2].apps, &["produce", "orders", "late"]));
    let waited = waiting.wait_with_output().expect("consume ends");
    let waited: BTreeSet<String> = values(&waited).into_iter().collect();
    assert!(
        waited.contains("late") && waited.len() == 32,
        "the waiting consumer got {waited:?}"
    );

    phase("the waiting consumer got its record");
    // Kill -9 the leader of partition 0: the cluster goes on through the survivors' proxies.
    let killed = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader(&brokers[0], "orders", 0);
        async move { (l != 0).then_some(l) }
    });
    let killed = runtime.block_on(killed);
    brokers[killed as usize - 1].kill9();
    let survivor = if killed == 1 { 1 } else { 0 };
    let new_leader = runtime.block_on(wait_for("a new leader", Duration::from_secs(60), || {
        let l = leader(&brokers[survivor], "orders", 0);
        async move { (l != 0 && l != killed).then_some(l) }
    }));
    eprintln!("killed node {killed}; node {new_leader} leads partition 0");
    phase("new leader elected");
    let second_batch: Vec<String> = (0..20).map(|n| format!("b{n}")).collect();
    let mut args = vec!["produce", "orders"];
    args.extend(second_batch.iter().map(String::as_str));
    ok_stdout(&cli(ports[survivor].apps, &args));
    let all = values(&cli(
        ports[survivor].apps,
        &[
            "consume",
            "orders",
            "--group",
            "after-kill",
            "--from",
            "earliest",
            "--count",
            "52",
        ],
    ));
    let all: BTreeSet<String> = all.into_iter().collect();
    let expected: BTreeSet<String> = first_batch
        .iter()
        .chain(second_batch.iter())
        .cloned()
        .chain(["late".to_string(), "warm-up".to_string()])
        .collect();
    assert_eq!(
        all, expected,
        "records lost or invented after the leader kill"
    );

    phase("everything read back after the kill");
    // The access logs: every call by its gRPC path and status; peer calls only over verified
    // mutual TLS from another proxy.
    let logs: Vec<String> = sidecars.iter().map(Nginx::access_log).collect();
    let joined = logs.join("");
    for line in [
        "POST /weft.v1.Publisher/PublishStream 200",
        "POST /weft.v1.Subscriber/Subscribe 200",
        "POST /weft.v1.Subscriber/CommitOffsets 200 grpc-status=0",
        "POST /weft.v1.TopicAdmin/CreateTopic 403",
        "POST /weft.v1.TopicAdmin/CreateTopic 200 grpc-status=0",
        "POST /weft.internal.v1.Raft/AppendEntriesBatch 200 grpc-status=0 client-verify=SUCCESS",
        "POST /weft.internal.v1.Forward/CommitOffsets 200 grpc-status=0 client-verify=SUCCESS",
    ] {
        assert!(
            joined.contains(line),
            "no {line:?} in the access logs:\n{joined}"
        );
    }
    // The forwarded commits kept their callers' trace context across the peer hop (two of the
    // three brokers are not the coordinator, so at least two were forwarded; the CLI's own
    // commits carry none).
    let forwarded_with_context = traceparents
        .iter()
        .filter(|t| {
            joined.lines().any(|l| {
                l.contains("/weft.internal.v1.Forward/CommitOffsets 200")
                    && l.ends_with(&format!("traceparent={t}"))
            })
        })
        .count();
    assert!(
        forwarded_with_context >= 2,
        "forwarded commits lost their callers' trace context:\n{joined}"
    );
    for (i, log) in logs.iter().enumerate() {
        let peer_port = ports[i].peer.to_string();
        let peer_calls: Vec<&str> = log
            .lines()
            .filter(|l| l.split(' ').next() == Some(peer_port.as_str()))
            .collect();
        assert!(
            !peer_calls.is_empty(),
            "proxy {} saw no peer call:\n{log}",
            i + 1
        );
        for call in peer_calls {
            assert!(
                call.contains("client-verify=SUCCESS")
                    && call.contains("CN=weft-proxy-")
                    && !call.contains(&format!("CN=weft-proxy-{}", i + 1)),
                "a peer call to proxy {} without another proxy's certificate: {call}",
                i + 1
            );
        }
    }
    // The rotated stream: the waiting consumer's proxy saw Subscribe end well more than once.
    let subscribes_ok = logs[1]
        .lines()
        .filter(|l| l.contains("/weft.v1.Subscriber/Subscribe 200 grpc-status=0"))
        .count();
    assert!(
        subscribes_ok >= 2,
        "no rotated Subscribe stream on proxy 2:\n{}",
        logs[1]
    );
    // A proxy's plain HTTP answer on a peer link (a 502 while a broker was down or starting)
    // reads as the status it stands for, never as a broken gRPC message.
    for broker in &brokers {
        let log = broker.log();
        assert!(
            !log.contains("invalid compression flag"),
            "a proxy's answer was decoded as gRPC:\n{log}"
        );
    }
    drop(sidecars);
    for broker in &mut brokers {
        broker.stop();
    }
}
