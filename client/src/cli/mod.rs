//! The `weft` command line: one file per command.

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
    /// Deadline of each call, in milliseconds.
    #[arg(long, global = true, default_value_t = 30_000)]
    pub(crate) timeout_ms: u64,
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
}

/// Runs a command.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let addresses: Vec<&str> = args
        .server
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let client = Client::connect(addresses)
        .await?
        .with_timeout(std::time::Duration::from_millis(args.timeout_ms));
    match args.command {
        Command::Topic(command) => topic::run(&client, args.output, command).await,
        Command::Produce(produce) => produce::run(&client, args.output, produce).await,
        Command::Consume(consume) => consume::run(&client, consume).await,
        Command::Group(command) => group::run(&client, args.output, command).await,
        Command::Cluster(command) => cluster::run(&client, args.output, command).await,
    }
}

/// Prints a JSON value on one line.
pub(crate) fn print_json(value: &serde_json::Value) {
    println!("{value}");
}
