//! `weft produce`: values from arguments or stdin lines, with keys and headers.

use std::io::BufRead;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use weft_client::{Client, ProducerConfig, Record};

use super::{Output, print_json};

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
    let values: Box<dyn Iterator<Item = std::io::Result<String>>> = if args.values.is_empty() {
        Box::new(std::io::stdin().lock().lines())
    } else {
        Box::new(args.values.clone().into_iter().map(Ok))
    };
    let producer = client.producer(ProducerConfig::default());
    let mut pending = Vec::new();
    for value in values {
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
        pending.push(producer.send_nowait(&args.topic, record).await?);
    }
    let mut count = 0u64;
    for ack in pending {
        let ack = ack.await?;
        count += 1;
        match output {
            Output::Json => print_json(
                &json!({ "topic": &*ack.topic, "partition": ack.partition, "offset": ack.offset }),
            ),
            Output::Text => println!("{}/{} offset {}", ack.topic, ack.partition, ack.offset),
        }
    }
    producer.close().await?;
    if count == 0 {
        anyhow::bail!("nothing to publish: give values as arguments or on stdin");
    }
    Ok(())
}
