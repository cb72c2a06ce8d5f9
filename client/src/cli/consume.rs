//! `weft consume`: from earliest, latest, an offset or a timestamp, or as a group member.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, ValueEnum};
use serde_json::json;
use weft_client::{Client, ConsumerConfig, Message, StartFrom};

/// What to read.
#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    /// Topic.
    pub(crate) topic: String,
    /// Where to start: earliest, latest, an offset, or @<ms since epoch> for a timestamp.
    #[arg(short, long, default_value = "latest")]
    pub(crate) from: String,
    /// Join this consumer group (offsets are committed as records are printed).
    #[arg(short, long)]
    pub(crate) group: Option<String>,
    /// Read only these partitions (outside a group).
    #[arg(short, long)]
    pub(crate) partition: Vec<u32>,
    /// Stop after this many records.
    #[arg(short = 'n', long)]
    pub(crate) count: Option<u64>,
    /// Stop when no record arrives for this long (milliseconds).
    #[arg(long)]
    pub(crate) idle_timeout_ms: Option<u64>,
    /// How to print records.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,
}

/// Record output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// The value, one per line (key<TAB>value when there is a key).
    Text,
    /// One JSON object per line with every field.
    Json,
}

fn parse_start(from: &str) -> anyhow::Result<StartFrom> {
    Ok(match from {
        "earliest" | "beginning" => StartFrom::Earliest,
        "latest" | "end" => StartFrom::Latest,
        s if s.starts_with('@') => StartFrom::Timestamp(
            s[1..]
                .parse()
                .map_err(|_| anyhow::anyhow!("--from {s}: bad timestamp"))?,
        ),
        s => match s.parse() {
            Ok(offset) => StartFrom::Offset(offset),
            Err(_) => {
                bail!("--from {s:?}: expected earliest, latest, an offset or @<timestamp ms>")
            }
        },
    })
}

fn print(message: &Message, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => outln!(
            "{}",
            json!({
                "topic": message.topic,
                "partition": message.partition,
                "offset": message.offset,
                "timestamp_ms": message.timestamp_ms,
                "key": String::from_utf8_lossy(&message.key),
                "value": String::from_utf8_lossy(&message.value),
                "headers": message.headers.iter().map(|(k, v)| json!([k, String::from_utf8_lossy(v)])).collect::<Vec<_>>(),
            })
        ),
        Format::Text if message.key.is_empty() => {
            outln!("{}", String::from_utf8_lossy(&message.value))
        }
        Format::Text => outln!(
            "{}\t{}",
            String::from_utf8_lossy(&message.key),
            String::from_utf8_lossy(&message.value)
        ),
    }
    Ok(())
}

/// Prints records until the count, the idle timeout, or Ctrl-C.
pub(crate) async fn run(client: &Client, args: ConsumeArgs) -> anyhow::Result<()> {
    let mut config = ConsumerConfig::new(&args.topic)
        .start(parse_start(&args.from)?)
        .partitions(args.partition.clone());
    if let Some(group) = &args.group {
        config = config.group(group);
    }
    let mut consumer = client.consumer(config).await?;
    let mut seen = 0u64;
    let idle = args.idle_timeout_ms.map(Duration::from_millis);
    loop {
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
        let next = tokio::select! {
            next = async {
                match idle {
                    Some(wait) => consumer.next_timeout(wait).await,
                    None => consumer.next().await,
                }
            } => next?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(message) = next else { break };
        // A record that cannot be printed (the output's reader went away) ends the command
        // before the consumer's close commits its position: it was not consumed.
        print(&message, args.format)?;
        seen += 1;
    }
    consumer.close().await?;
    if let Some(n) = args.count
        && seen < n
    {
        bail!("read {seen} of {n} records before the idle timeout");
    }
    Ok(())
}
