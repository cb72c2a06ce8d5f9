//! Creates a topic, publishes records with keys and a trace header, and reads them back as a
//! consumer-group member. Run a broker first (`cargo run --release --bin weft-broker`), then:
//!
//! ```sh
//! cargo run --example quickstart [-- 127.0.0.1:7400]
//! ```

use std::time::Duration;

use weft_client::{Client, ConsumerConfig, ProducerConfig, Record, StartFrom};

#[tokio::main]
async fn main() -> Result<(), weft_client::Error> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7400".into());
    let client = Client::connect([address.as_str()]).await?;
    let topic = format!("quickstart-{}", std::process::id());
    client.admin().create_topic(&topic, 3).await?;

    let producer = client.producer(ProducerConfig::default());
    for i in 0..10 {
        let record = Record::new(format!("order {i}"))
            .key(format!("customer-{}", i % 3))
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            );
        let ack = producer.send(&topic, record).await?;
        println!(
            "stored order {i} at partition {} offset {}",
            ack.partition, ack.offset
        );
    }
    producer.close().await?;

    let config = ConsumerConfig::new(&topic)
        .group("quickstart")
        .start(StartFrom::Earliest);
    let mut consumer = client.consumer(config).await?;
    let mut read = 0;
    while read < 10 {
        let Some(message) = consumer.next_timeout(Duration::from_secs(10)).await? else {
            break;
        };
        println!(
            "partition {} offset {}: {}",
            message.partition,
            message.offset,
            String::from_utf8_lossy(&message.value)
        );
        read += 1;
    }
    consumer.close().await?;
    client.admin().delete_topic(&topic).await?;
    println!("read {read} records");
    Ok(())
}
