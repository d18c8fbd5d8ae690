//! The outbox relay: publishes the record store's outbox events to the Redis stream and marks
//! them sent. At least once: an event published by a relay that dies before marking it, or by
//! two nodes' relays at once, is published again; consumers deduplicate by the event's `id`.

use std::sync::Arc;
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

/// Publishes the outbox of `record` to the stream of `redis`.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    record: Arc<dyn RecordStore>,
    redis: RedisStore,
    config: OutboxRelayConfig,
}

impl OutboxRelay {
    /// A relay between the two stores.
    pub fn new(record: Arc<dyn RecordStore>, redis: RedisStore, config: OutboxRelayConfig) -> Self {
        Self { record, redis, config }
    }

    /// One pass: publishes up to `batch_max` pending events, then marks them sent. Returns how
    /// many were published.
    pub async fn relay_once(&self) -> Result<usize, StoreError> {
        let events = self.record.outbox_pending(self.config.batch_max).await?;
        if events.is_empty() {
            return Ok(0);
        }
        self.redis.publish_outbox(&events).await?;
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
