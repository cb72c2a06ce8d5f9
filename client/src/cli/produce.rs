//! `weft produce`: values from arguments or stdin lines, with keys and headers.

use std::io::BufRead;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde_json::json;
use weft_client::{Client, ProducerConfig, Record};

use super::{Output, print_json};

/// Values read ahead of their publish.
const VALUES_AHEAD: usize = 1024;
/// Records given to the producer and not yet answered (and printed).
const UNANSWERED_MAX: usize = 10_000;

/// What to publish.
#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    /// Topic.
    pub(crate) topic: String,
    /// Values to publish; without any, every line of stdin is one value.
    pub(crate) values: Vec<String>,
    /// Key of every record.
    #[arg(short, long)]
    pub(crate) key: Option<String>,
    /// Split each value at the first occurrence of this separator into key and value.
    #[arg(long)]
    pub(crate) key_separator: Option<String>,
    /// A header NAME=VALUE on every record (repeatable).
    #[arg(short = 'H', long = "header")]
    pub(crate) headers: Vec<String>,
    /// Send to this partition.
    #[arg(short, long)]
    pub(crate) partition: Option<u32>,
}

/// Publishes and prints where each record went.
pub(crate) async fn run(client: &Client, output: Output, args: ProduceArgs) -> anyhow::Result<()> {
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once('=')
            .with_context(|| format!("header {h:?} is not NAME=VALUE"))?;
        headers.push((name.to_string(), bytes::Bytes::from(value.to_string())));
    }
    // Values come through a bounded queue (stdin read on a thread of its own), and each
    // acknowledgement is printed as it arrives, in order, with at most `UNANSWERED_MAX` records
    // given and not yet answered: `tail -f app.log | weft produce logs` publishes and prints as
    // lines come, in bounded memory, rather than holding every acknowledgement until the end.
    let (tx, mut values) = tokio::sync::mpsc::channel::<std::io::Result<String>>(VALUES_AHEAD);
    if args.values.is_empty() {
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if tx.blocking_send(line).is_err() {
                    return;
                }
            }
        });
    } else {
        let given = args.values.clone();
        tokio::spawn(async move {
            for value in given {
                if tx.send(Ok(value)).await.is_err() {
                    return;
                }
            }
        });
    }
    let producer = client.producer(ProducerConfig::default());
    let mut pending = futures::stream::FuturesOrdered::new();
    let mut count = 0u64;
    let mut input_done = false;
    loop {
        tokio::select! {
            biased;
            Some(ack) = pending.next(), if !pending.is_empty() => {
                let ack: weft_client::Ack = ack?;
                count += 1;
                match output {
                    Output::Json => print_json(
                        &json!({ "topic": &*ack.topic, "partition": ack.partition, "offset": ack.offset }),
                    )?,
                    Output::Text => outln!("{}/{} offset {}", ack.topic, ack.partition, ack.offset),
                }
            }
            value = values.recv(), if !input_done && pending.len() < UNANSWERED_MAX => {
                let Some(value) = value else {
                    input_done = true;
                    continue;
                };
                let value = value.context("reading stdin")?;
                let (key, value) = match (&args.key_separator, &args.key) {
                    (Some(sep), _) => match value.split_once(sep.as_str()) {
                        Some((k, v)) => (Some(k.to_string()), v.to_string()),
                        None => (args.key.clone(), value),
                    },
                    (None, key) => (key.clone(), value),
                };
                let mut record = Record::new(value);
                if let Some(key) = key {
                    record = record.key(key);
                }
                if let Some(p) = args.partition {
                    record = record.partition(p);
                }
                record.headers = headers.clone();
                pending.push_back(producer.send_nowait(&args.topic, record).await?);
            }
            else => break,
        }
    }
    producer.close().await?;
    if count == 0 {
        anyhow::bail!("nothing to publish: give values as arguments or on stdin");
    }
    Ok(())
}
