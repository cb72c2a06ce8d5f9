//! The bytes of publishes a broker holds at once (`publish_bytes_in_flight_max`), as Kafka's
//! `queued.max.request.bytes` or Redpanda's request memory bound: a publish takes its encoded
//! size from a budget before it is handed to its partition and gives it back once answered.
//! On a stream, the next request is not read until the one before has its bytes, so a client
//! that sends faster than the partitions commit is held back by HTTP/2 flow control instead
//! of filling the broker's memory (each stream may hold 64 publishes of up to
//! `grpc_message_bytes_max` each, and a broker's connections many streams).
//!
//! Client publishes and publishes forwarded by other brokers have a budget each: a follower's
//! client publishes hold its client budget while they wait for the leader's forward budget,
//! and a forwarded publish waits only for its partition, so no two brokers wait on each other.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::BrokerError;

/// Publish bytes a broker holds at once, on one path (`path` labels its metrics).
#[derive(Debug, Clone)]
pub struct ByteBudget {
    semaphore: Arc<Semaphore>,
    /// The budget, which also bounds what one publish takes (a publish larger than the whole
    /// budget takes all of it, so it still goes through, alone).
    max: u32,
    path: &'static str,
}

/// Bytes taken from a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: u32,
    path: &'static str,
}

impl Drop for Held {
    fn drop(&mut self) {
        metrics::gauge!("weft_publish_bytes_in_flight", "path" => self.path)
            .decrement(f64::from(self.bytes));
    }
}

impl ByteBudget {
    /// A budget of `max` bytes (at most `u32::MAX`).
    pub fn new(max: u64, path: &'static str) -> ByteBudget {
        let max = u32::try_from(max).unwrap_or(u32::MAX).max(1);
        metrics::gauge!("weft_publish_bytes_in_flight", "path" => path).set(0.0);
        ByteBudget {
            semaphore: Arc::new(Semaphore::new(max as usize)),
            max,
            path,
        }
    }

    /// Takes `bytes` (at most the whole budget), waiting until they are free.
    pub async fn take(&self, bytes: usize) -> Held {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.max);
        let permit = match self.semaphore.clone().try_acquire_many_owned(bytes) {
            Ok(permit) => Some(permit),
            Err(_) => {
                metrics::counter!("weft_publish_budget_waits_total", "path" => self.path)
                    .increment(1);
                // The semaphore is never closed: an error cannot happen, and would only let
                // this publish through unbounded.
                self.semaphore.clone().acquire_many_owned(bytes).await.ok()
            }
        };
        metrics::gauge!("weft_publish_bytes_in_flight", "path" => self.path)
            .increment(f64::from(bytes));
        Held {
            _permit: permit,
            bytes,
            path: self.path,
        }
    }

    /// [`ByteBudget::take`] within `wait`: past it, RESOURCE_EXHAUSTED (OVERLOADED, with a
    /// retry hint) for a unary call, whose request is read already.
    pub async fn take_within(&self, bytes: usize, wait: Duration) -> Result<Held, BrokerError> {
        tokio::time::timeout(wait, self.take(bytes))
            .await
            .map_err(|_| {
                BrokerError::Overloaded(format!(
                    "the broker holds publish_bytes_in_flight_max bytes of publishes ({}); \
                     this one waited {wait:?} for room",
                    self.max
                ))
            })
    }

    /// Bytes free now.
    #[cfg(test)]
    fn free(&self) -> usize {
        self.semaphore.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes taken come back when the holder is dropped; a take past the budget waits for
    /// them; one larger than the whole budget takes all of it.
    #[tokio::test]
    async fn takes_wait_for_room_and_give_it_back() {
        let budget = ByteBudget::new(100, "test");
        let first = budget.take(60).await;
        assert_eq!(budget.free(), 40);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(50).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "50 more bytes than the budget has");
        assert!(
            budget
                .take_within(50, Duration::from_millis(20))
                .await
                .is_err(),
            "a unary call waits at most its wait"
        );
        drop(first);
        let second = waiting.await.expect("taken once room is back");
        assert_eq!(budget.free(), 50);
        drop(second);
        let whole = budget.take(1_000).await;
        assert_eq!(budget.free(), 0);
        drop(whole);
        assert_eq!(budget.free(), 100);
    }
}
