//! The outbox relay: publishes the record store's outbox events to the Redis stream and marks
//! them sent. At least once: an event published by a relay that dies before marking it, or by
//! two nodes' relays at once, is published again; consumers deduplicate by the event's `id`.
//!
//! A node without Redis (`serve --store memory`) has no stream to feed: its relay writes each
//! event to the log (at debug level) and counts it instead, and marks it sent all the same, so
//! that the memory store can forget sent events and its outbox stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{RecordStore, RedisStore, StoreError};

/// How much the relay moves per pass, and how often it looks.
#[derive(Debug, Clone, Copy)]
pub struct OutboxRelayConfig {
    /// The most events one pass publishes.
    pub batch_max: u32,
    /// The pause between passes that found nothing to publish.
    pub idle_interval: Duration,
}

impl Default for OutboxRelayConfig {
    fn default() -> Self {
        Self { batch_max: 500, idle_interval: Duration::from_millis(200) }
    }
}

/// Publishes the outbox of `record` to the stream of `redis`, or to the log.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    record: Arc<dyn RecordStore>,
    sink: Sink,
    config: OutboxRelayConfig,
}

/// Where the relay publishes.
#[derive(Debug, Clone)]
enum Sink {
    Stream(RedisStore),
    /// The log, with how many events went there.
    Log(Arc<AtomicU64>),
}

impl OutboxRelay {
    /// A relay between the two stores.
    pub fn new(record: Arc<dyn RecordStore>, redis: RedisStore, config: OutboxRelayConfig) -> Self {
        Self { record, sink: Sink::Stream(redis), config }
    }

    /// A relay that drains `record`'s outbox to the log, for a node without a stream.
    pub fn to_log(record: Arc<dyn RecordStore>, config: OutboxRelayConfig) -> Self {
        Self { record, sink: Sink::Log(Arc::new(AtomicU64::new(0))), config }
    }

    /// How many events this relay wrote to the log (0 for a relay to a stream).
    pub fn logged(&self) -> u64 {
        match &self.sink {
            Sink::Stream(_) => 0,
            Sink::Log(logged) => logged.load(Ordering::Relaxed),
        }
    }

    /// One pass: publishes up to `batch_max` pending events, then marks them sent. Returns how
    /// many were published.
    pub async fn relay_once(&self) -> Result<usize, StoreError> {
        let events = self.record.outbox_pending(self.config.batch_max).await?;
        if events.is_empty() {
            return Ok(0);
        }
        match &self.sink {
            Sink::Stream(redis) => redis.publish_outbox(&events).await?,
            Sink::Log(logged) => {
                for event in &events {
                    tracing::debug!(id = event.id, kind = super::outbox_kind_name(event.kind), user_id = event.user_id,
                        reservation_id = ?event.reservation_id, at_ms = event.at_ms, "outbox event");
                }
                logged.fetch_add(events.len() as u64, Ordering::Relaxed);
            }
        }
        self.record.outbox_mark_sent(events.iter().map(|event| event.id).collect()).await?;
        Ok(events.len())
    }

    /// Relays until the task is dropped; a full batch is followed at once by the next pass.
    pub async fn run(self) {
        loop {
            match self.relay_once().await {
                Ok(published) if published >= self.config.batch_max as usize => continue,
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "outbox relay pass failed; retrying"),
            }
            tokio::time::sleep(self.config.idle_interval).await;
        }
    }
}
