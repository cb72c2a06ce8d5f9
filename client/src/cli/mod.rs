//! The `weft` command line: one file per command.

/// `println!` that returns from the command with an error ([`stdout_error`]) when standard
/// output cannot be written (its pipe closed: `weft topic list | head -1`), instead of
/// panicking as `println!` does.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err($crate::cli::stdout_error)?
    }};
}

mod acl;
mod cluster;
mod consume;
mod group;
mod produce;
mod topic;

use clap::{Parser, Subcommand, ValueEnum};
use weft_client::Client;

/// Talk to a Weft broker.
#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "The Weft command-line client")]
pub(crate) struct Args {
    /// Broker address(es), host:port, comma-separated.
    #[arg(
        short,
        long,
        global = true,
        env = "WEFT_SERVER",
        default_value = "127.0.0.1:7400"
    )]
    pub(crate) server: String,
    /// How to print structured results.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
    /// Deadline of each call, in milliseconds (at most a day).
    #[arg(long, global = true, default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub(crate) timeout_ms: u64,
    /// Connect with TLS (also implied by https:// addresses and by the other --tls-* flags).
    #[arg(long, global = true, env = "WEFT_TLS")]
    pub(crate) tls: bool,
    /// PEM CA bundle that signs the brokers' certificates (default: the system's CAs).
    #[arg(long, global = true, env = "WEFT_TLS_CA_FILE")]
    pub(crate) tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for brokers that require mutual TLS.
    #[arg(
        long,
        global = true,
        env = "WEFT_TLS_CERT_FILE",
        requires = "tls_key_file"
    )]
    pub(crate) tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(
        long,
        global = true,
        env = "WEFT_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    pub(crate) tls_key_file: Option<std::path::PathBuf>,
    /// The name the brokers' certificates carry, when it is not the host dialled.
    #[arg(long, global = true, env = "WEFT_TLS_SERVER_NAME")]
    pub(crate) tls_server_name: Option<String>,
    /// Bearer token sent with every call (prefer the environment variable: arguments show in
    /// process lists).
    #[arg(long, global = true, env = "WEFT_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Export this command's spans (a `create` span per produced record, `publish` per batch,
    /// `process` per consumed record) over OTLP/gRPC to this endpoint (`http://collector:4317`).
    #[arg(long, global = true, env = "WEFT_OTLP_ENDPOINT")]
    pub(crate) otlp_endpoint: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Human-readable tables.
    Text,
    /// JSON, for scripts.
    Json,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Publish records (values from arguments, or one per stdin line).
    Produce(produce::ProduceArgs),
    /// Read records.
    Consume(consume::ConsumeArgs),
    /// Inspect consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Inspect the cluster.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Access-control rules (stored in the controller).
    #[command(subcommand)]
    Acl(acl::AclCommand),
    /// Who the broker takes this client to be (from the token, a sidecar, or the client
    /// certificate): the identity ACLs and audit lines use.
    Whoami,
}

/// Runs a command.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let telemetry = match &args.otlp_endpoint {
        Some(endpoint) => Some(
            weft_client::telemetry::install_otlp(endpoint, "weft-cli", Vec::new())
                .map_err(|e| anyhow::anyhow!("--otlp-endpoint: {e}"))?,
        ),
        None => None,
    };
    let result = run_command(args).await;
    if let Some(telemetry) = telemetry {
        // Export every span before the process ends.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    result
}

async fn run_command(args: Args) -> anyhow::Result<()> {
    let addresses: Vec<&str> = args
        .server
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let tls = args.tls
        || args.tls_ca_file.is_some()
        || args.tls_cert_file.is_some()
        || args.tls_server_name.is_some();
    let options = weft_client::ConnectOptions {
        tls: tls.then(|| weft_client::TlsOptions {
            ca_file: args.tls_ca_file.clone(),
            cert_file: args.tls_cert_file.clone(),
            key_file: args.tls_key_file.clone(),
            server_name: args.tls_server_name.clone(),
        }),
        token: args.token.clone(),
    };
    let client = Client::connect_with(addresses, options)
        .await?
        .with_timeout(std::time::Duration::from_millis(args.timeout_ms));
    match args.command {
        Command::Topic(command) => topic::run(&client, args.output, command).await,
        Command::Produce(produce) => produce::run(&client, args.output, produce).await,
        Command::Consume(consume) => consume::run(&client, consume).await,
        Command::Group(command) => group::run(&client, args.output, command).await,
        Command::Cluster(command) => cluster::run(&client, args.output, command).await,
        Command::Acl(command) => acl::run(&client, args.output, command).await,
        Command::Whoami => {
            let (principal, source) = client.who_am_i().await?;
            match args.output {
                Output::Text => outln!("{principal} (from {source})"),
                Output::Json => outln!(
                    "{}",
                    serde_json::json!({ "principal": principal, "source": source })
                ),
            }
            Ok(())
        }
    }
}

/// Prints a JSON value on one line.
pub(crate) fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    outln!("{value}");
    Ok(())
}

/// Standard output could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the output: {0}")]
pub(crate) struct StdoutError(#[source] pub(crate) std::io::Error);

/// The error of a failed write to standard output (see [`closed_pipe`]).
pub(crate) fn stdout_error(error: std::io::Error) -> anyhow::Error {
    StdoutError(error).into()
}

/// Whether `error` is a write to standard output whose reader went away: the command ends
/// quietly then, as Unix tools do.
pub(crate) fn closed_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<StdoutError>()
        .is_some_and(|e| e.0.kind() == std::io::ErrorKind::BrokenPipe)
}
