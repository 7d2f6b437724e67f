//! Following the shared Redis stream: publish local events, read everyone's, resynchronise.
//!
//! One background task per replica blocks on `XREAD` for new entries, so an event published by
//! any replica reaches this mirror within one blocking-read round trip; every successful read
//! (even an empty one) proves the mirror current and resets the staleness clock. A full
//! resynchronisation (`XRANGE` of the whole stream) runs at start, after any error, and every
//! `resync_interval`; it also republishes any journalled event the stream has lost (after a
//! Redis restart without persistence, or `FLUSHALL`). The request path never waits on Redis.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadReply};

use super::{Controls, Event};

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    /// How long a replica may serve from its mirror without hearing from Redis.
    pub staleness_bound: Duration,
    pub resync_interval: Duration,
    /// The stream's key; replicas sharing controls must share it.
    pub stream: String,
}

pub struct Redis {
    client: redis::Client,
    settings: RedisSettings,
    publisher: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

const BLOCK_MS: u64 = 500;

fn config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_millis(BLOCK_MS + 2000))
}

impl Redis {
    pub fn connect(settings: RedisSettings) -> anyhow::Result<Redis> {
        let client = redis::Client::open(settings.url.as_str())
            .with_context(|| format!("`redis.url` = `{}` is not a Redis URL", settings.url))?;
        Ok(Redis {
            client,
            settings,
            publisher: tokio::sync::Mutex::new(None),
        })
    }

    pub async fn connection(&self) -> anyhow::Result<MultiplexedConnection> {
        self.client
            .get_multiplexed_async_connection_with_config(&config())
            .await
            .context("cannot reach Redis")
    }

    /// Adds one event to the shared stream.
    pub async fn publish(&self, e: &Event) -> anyhow::Result<()> {
        let json = serde_json::to_string(e)?;
        let mut guard = self.publisher.lock().await;
        if guard.is_none() {
            *guard = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&config())
                    .await
                    .context("cannot reach Redis")?,
            );
        }
        let Some(conn) = guard.as_mut() else {
            anyhow::bail!("no Redis connection")
        };
        let added: redis::RedisResult<String> = redis::cmd("XADD")
            .arg(&self.settings.stream)
            .arg("*")
            .arg("event")
            .arg(&json)
            .query_async(conn)
            .await;
        if let Err(e) = added {
            *guard = None;
            return Err(anyhow::anyhow!("cannot publish to Redis: {e}"));
        }
        Ok(())
    }
}

pub fn spawn(controls: Controls) {
    tokio::spawn(async move {
        let mut last_id = "0-0".to_owned();
        let mut conn: Option<MultiplexedConnection> = None;
        let mut next_full = Instant::now();
        loop {
            let Some(redis) = controls.inner.redis.as_ref() else {
                return;
            };
            if conn.is_none() {
                match redis
                    .client
                    .get_multiplexed_async_connection_with_config(&config())
                    .await
                {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "controls: Redis unreachable; serving from the mirror within the staleness bound");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let step = if Instant::now() >= next_full {
                full_resync(&controls, redis, c).await.map(|id| {
                    last_id = id;
                    next_full = Instant::now() + redis.settings.resync_interval;
                })
            } else {
                follow(&controls, redis, c, &mut last_id).await
            };
            match step {
                Ok(()) => controls.mark_synced(),
                Err(e) => {
                    tracing::warn!(error = %e, "controls: Redis sync failed; will resynchronise");
                    conn = None;
                    next_full = Instant::now();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    });
}

/// Flushes quota increments and refreshes shared totals every `quota::FLUSH_EVERY`.
pub fn spawn_quota_flush(controls: Controls) {
    tokio::spawn(async move {
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            tokio::time::sleep(super::quota::FLUSH_EVERY).await;
            let Some(redis) = controls.inner.redis.as_ref() else {
                return;
            };
            if conn.is_none() {
                conn = redis.connection().await.ok();
            }
            if let Some(c) = conn.as_mut()
                && let Err(e) = controls.inner.quotas.flush(c).await
            {
                tracing::warn!(error = %e, "quota flush failed; will retry");
                conn = None;
            }
        }
    });
}

fn decode(ids: &[redis::streams::StreamId]) -> Vec<Event> {
    ids.iter()
        .filter_map(|s| s.get::<String>("event"))
        .filter_map(|json| match serde_json::from_str::<Event>(&json) {
            Ok(e) => Some(e),
            Err(err) => {
                tracing::warn!(error = %err, "controls: ignoring an unreadable stream entry");
                None
            }
        })
        .collect()
}

/// Reads the whole stream, absorbs it, republishes what it lacks; returns the last entry id.
async fn full_resync(
    controls: &Controls,
    redis: &Redis,
    c: &mut MultiplexedConnection,
) -> anyhow::Result<String> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(&redis.settings.stream)
        .arg("-")
        .arg("+")
        .query_async(c)
        .await?;
    let events = decode(&reply.ids);
    let mut last = reply
        .ids
        .last()
        .map(|s| s.id.clone())
        .unwrap_or_else(|| "0-0".to_owned());
    controls.absorb(&events)?;
    let in_stream: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let missing: Vec<Event> = controls
        .journal_events()
        .into_iter()
        .filter(|e| !in_stream.contains(e.id.as_str()))
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            count = missing.len(),
            "controls: the shared stream lost events; republishing from the journal"
        );
        for e in &missing {
            last = redis::cmd("XADD")
                .arg(&redis.settings.stream)
                .arg("*")
                .arg("event")
                .arg(serde_json::to_string(e)?)
                .query_async(c)
                .await?;
        }
    }
    Ok(last)
}

/// Blocks for new entries after `last_id` and absorbs them.
async fn follow(
    controls: &Controls,
    redis: &Redis,
    c: &mut MultiplexedConnection,
    last_id: &mut String,
) -> anyhow::Result<()> {
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(BLOCK_MS)
        .arg("STREAMS")
        .arg(&redis.settings.stream)
        .arg(last_id.as_str())
        .query_async(c)
        .await?;
    for key in reply.map(|r| r.keys).unwrap_or_default() {
        if let Some(last) = key.ids.last() {
            *last_id = last.id.clone();
        }
        controls.absorb(&decode(&key.ids))?;
    }
    Ok(())
}
