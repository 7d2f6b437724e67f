//! Following the shared Redis stream: publish local events, read everyone's, resynchronise.
//!
//! One background task per replica blocks on `XREAD` for new entries, so an event published by
//! any replica reaches this mirror within one blocking-read round trip; every successful read
//! (even an empty one) proves the mirror current and resets the staleness clock. A full
//! resynchronisation (`XRANGE` of the whole stream, in pages) runs at start, after any error,
//! after a change made here could not be published, and every `resync_interval`; it also
//! republishes any journalled event the stream does not hold (after a Redis restart without
//! persistence, `FLUSHALL`, or a failed publish). The request path never waits on Redis.
//!
//! Every entry carries an HMAC-SHA256 of the stream's name and its event under a key the
//! replicas share (`redis.key_file`), and an entry without a valid one is refused (logged and
//! counted once): who can write to Redis but does not hold the key cannot lift a restriction
//! or revoke anyone.

use std::collections::HashSet;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// The secret the replicas sign and check the stream's entries with (at least 32 bytes).
    pub key_file: std::path::PathBuf,
}

/// The key file's shortest acceptable content.
const MIN_KEY_BYTES: usize = 32;

/// The HMAC of `text` under the shared key, in hex: how what replicas share in Redis is
/// signed (controls events here, accesses for cross-replica detection).
pub(crate) fn mac_hex(key: &ring::hmac::Key, text: &[u8]) -> String {
    hex::encode(ring::hmac::sign(key, text))
}

/// Whether `mac` (hex) is `text`'s HMAC under the shared key (compared in constant time).
pub(crate) fn mac_holds(key: &ring::hmac::Key, text: &[u8], mac: &str) -> bool {
    hex::decode(mac).is_ok_and(|m| ring::hmac::verify(key, text, &m).is_ok())
}

/// The shared controls' signing key from `redis.key_file` (its content, surrounding
/// whitespace trimmed): an error naming the file when it cannot be read or is too short.
pub fn load_key(settings: &RedisSettings) -> anyhow::Result<ring::hmac::Key> {
    let file = &settings.key_file;
    let text = std::fs::read(file)
        .with_context(|| format!("cannot read `redis.key_file` `{}`", file.display()))?;
    crate::config::warn_if_others_may_read(file, "redis.key_file");
    let secret = text.trim_ascii();
    if secret.len() < MIN_KEY_BYTES {
        anyhow::bail!(
            "`redis.key_file` `{}` holds {} bytes; the shared controls' key needs at least \
             {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32 > {}`)",
            file.display(),
            secret.len(),
            file.display()
        );
    }
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
}

pub struct Redis {
    client: redis::Client,
    settings: RedisSettings,
    key: ring::hmac::Key,
    /// Stream entries already refused: a full resynchronisation reads them again, and
    /// logging and counting each once keeps the count an alarm (bounded: past it, once more).
    refused: std::sync::Mutex<HashSet<String>>,
    /// The mark of the store's life last read (`check_key`).
    store_mark: std::sync::Mutex<Option<String>>,
    publisher: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// A change journalled here could not be added to the stream (`publish` failed): the
    /// sync task resynchronises at its next step, which republishes it over the reading
    /// connection, rather than at the next `resync_interval` (up to an hour), while the other
    /// replicas, reading on, stay fresh without it.
    unpublished: AtomicBool,
}

const BLOCK_MS: u64 = 500;
/// How soon journalled changes Redis refused are offered again, doubling up to the most.
const REPUBLISH_AFTER: Duration = Duration::from_secs(1);
const REPUBLISH_AT_MOST: Duration = Duration::from_secs(30);
/// The publishing connection's name in Redis's `CLIENT LIST`.
pub const PUBLISHER_NAME: &str = "wardgate-controls-publisher";
/// How long a replica's key check counts after it last added it (`check_key`): a replica that
/// stopped, or was given the right key, no longer counts a minute later.
const KEY_SEEN_FOR: Duration = Duration::from_secs(60);
/// Stream entries a resynchronisation reads per `XRANGE`.
const RESYNC_PAGE: usize = 10_000;

fn config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_millis(BLOCK_MS + 2000))
}

impl Redis {
    pub fn connect(settings: RedisSettings) -> anyhow::Result<Redis> {
        // (Not the URL itself: it may hold a password.)
        let client =
            redis::Client::open(settings.url.as_str()).context("`redis.url` is not a Redis URL")?;
        let key = load_key(&settings)?;
        Ok(Redis {
            client,
            settings,
            key,
            refused: Default::default(),
            store_mark: Default::default(),
            publisher: tokio::sync::Mutex::new(None),
            unpublished: AtomicBool::new(false),
        })
    }

    pub async fn connection(&self) -> anyhow::Result<MultiplexedConnection> {
        self.client
            .get_multiplexed_async_connection_with_config(&config())
            .await
            .context("cannot reach Redis")
    }

    /// What is signed: the stream's name and the event, so that an entry cannot be replayed
    /// into another deployment's stream that happens to share the key.
    fn signed_text(&self, json: &str) -> Vec<u8> {
        [self.settings.stream.as_bytes(), b"\n", json.as_bytes()].concat()
    }

    /// An event's signature, as its stream entry carries it (`mac`).
    fn sign(&self, json: &str) -> String {
        mac_hex(&self.key, &self.signed_text(json))
    }

    /// Whether `mac` is `json`'s signature.
    fn signed(&self, json: &str, mac: &str) -> bool {
        mac_holds(&self.key, &self.signed_text(json), mac)
    }

    /// This replica's key check: an HMAC of the stream's name under its key, which only a
    /// replica holding the same key writes the same (no event is signed over the same text:
    /// an event's is the stream's name, a newline, then a JSON object).
    fn key_check_value(&self) -> String {
        let text = [b"wardgate key check\n", self.settings.stream.as_bytes()].concat();
        mac_hex(&self.key, &text)
    }

    /// An error of the key check's, saying what an ACL refusing it must allow.
    fn refused_check(&self, e: redis::RedisError, keys: &str, mark_key: &str) -> anyhow::Error {
        match e.code() {
            Some("NOPERM") => anyhow::anyhow!(
                "Redis refuses the key check ({e}): the replicas' user needs `TIME`, `ZADD`, \
                 `ZREMRANGEBYSCORE` and `ZRANGE` on `{keys}`, and `SET` and `GET` on \
                 `{mark_key}` (README: Shared controls)"
            ),
            _ => e.into(),
        }
    }

    /// Checks that every replica sharing the stream signs with this replica's key, and that
    /// the store is the one it knew. Each replica adds its key check to `<stream>:keys` (a
    /// sorted set, scored by when it was last added) at each read of the stream, and one
    /// added by any replica within `KEY_SEEN_FOR` that is not this replica's fails the step,
    /// on every replica, so that all go stale (503 `controls-stale`): a replica with another
    /// key would refuse, as unsigned, every change the others publish, and they its, while
    /// reading the stream kept it fresh. Whichever replica came first, none serves on.
    /// `<stream>:mark` holds a random mark of the store's life, placed by the first replica to
    /// find none: `Ok(false)` when it is not the one this replica last saw (the store is new,
    /// or lost its keys: restarted without persistence, flushed), so that what it lost is
    /// republished at once, whichever replica placed the new one.
    async fn check_key(&self, c: &mut MultiplexedConnection) -> anyhow::Result<bool> {
        let stream = &self.settings.stream;
        let (keys, mark_key) = (format!("{stream}:keys"), format!("{stream}:mark"));
        let mine = self.key_check_value();
        // Redis's clock, not this replica's: every replica's checks are then scored and
        // forgotten by one clock. By its own, a replica whose clock ran a minute ahead would
        // forget the others' checks as it added its own, and, holding another key, find only
        // its own and stay fresh while refusing every change they publish.
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(c)
            .await
            .map_err(|e| self.refused_check(e, &keys, &mark_key))?;
        let now = secs * 1000 + micros / 1000;
        let forgotten = now - KEY_SEEN_FOR.as_millis() as i64;
        let new_mark = format!("{:016x}", rand::random::<u64>());
        let (checks, mark): (Vec<String>, Option<String>) = redis::pipe()
            .cmd("ZADD")
            .arg(&keys)
            .arg(now)
            .arg(&mine)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&keys)
            .arg("-inf")
            .arg(format!("({forgotten}"))
            .ignore()
            .cmd("ZRANGE")
            .arg(&keys)
            .arg(0)
            .arg(-1)
            .cmd("SET")
            .arg(&mark_key)
            .arg(&new_mark)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&mark_key)
            .query_async(c)
            .await
            .map_err(|e| self.refused_check(e, &keys, &mark_key))?;
        if checks.iter().any(|k| *k != mine) {
            anyhow::bail!(
                "a replica sharing `{stream}` signs with another key than this one's \
                 `redis.key_file` (Redis's `{keys}` holds both): each would refuse the other's \
                 changes, so none serves. Give every replica the same file; once the other key \
                 has not been seen for {} (or after `DEL {keys}`), the replicas sync again",
                humantime::format_duration(KEY_SEEN_FOR)
            );
        }
        let mark = mark.unwrap_or_default();
        let mut seen = self
            .store_mark
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let same = seen.as_deref() == Some(mark.as_str());
        if !same {
            *seen = Some(mark);
        }
        Ok(same)
    }

    /// Notes a refused entry; true the first time.
    fn first_refusal(&self, entry: &str) -> bool {
        const MAX_REMEMBERED: usize = 100_000;
        let Ok(mut refused) = self.refused.lock() else {
            return true;
        };
        if refused.len() >= MAX_REMEMBERED {
            refused.clear();
        }
        refused.insert(entry.to_owned())
    }

    /// Adds one event to the shared stream, signed. On failure the sync task is told to
    /// republish it (`unpublished`).
    pub async fn publish(&self, e: &Event) -> anyhow::Result<()> {
        let published = self.publish_now(e).await;
        if published.is_err() {
            self.unpublished.store(true, Ordering::SeqCst);
        }
        published
    }

    async fn publish_now(&self, e: &Event) -> anyhow::Result<()> {
        let json = serde_json::to_string(e)?;
        let mac = self.sign(&json);
        let mut guard = self.publisher.lock().await;
        // The connection is kept between changes, which may be hours apart: Redis's `timeout`,
        // a proxy or NAT closing idle connections, or a restart leaves it dead, and the change
        // would reach the other replicas only at this one's next full resynchronisation. One
        // more try on a fresh connection; an event that did land the first time is applied
        // once all the same (by its id).
        let mut tries = if guard.is_some() { 2 } else { 1 };
        loop {
            tries -= 1;
            if guard.is_none() {
                let mut conn = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config())
                    .await
                    .context("cannot reach Redis")?;
                // Named for `CLIENT LIST` (an ACL that refuses the name refuses nothing else).
                let _: redis::RedisResult<()> = redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(PUBLISHER_NAME)
                    .query_async(&mut conn)
                    .await;
                *guard = Some(conn);
            }
            let Some(conn) = guard.as_mut() else {
                anyhow::bail!("no Redis connection")
            };
            let added: redis::RedisResult<String> = redis::cmd("XADD")
                .arg(&self.settings.stream)
                .arg("*")
                .arg("event")
                .arg(&json)
                .arg("mac")
                .arg(&mac)
                .query_async(conn)
                .await;
            match added {
                Ok(_) => return Ok(()),
                Err(e) => {
                    *guard = None;
                    if tries == 0 {
                        return Err(anyhow::anyhow!("cannot publish to Redis: {e}"));
                    }
                    tracing::info!(error = %e, "controls: the publishing connection failed; publishing on a fresh one");
                }
            }
        }
    }
}

pub fn spawn(controls: Controls) {
    tokio::spawn(async move {
        let mut last_id = "0-0".to_owned();
        let mut conn: Option<MultiplexedConnection> = None;
        let mut next_full = Instant::now();
        // Journalled changes the stream lacks, which a resynchronisation could not add:
        // when to try again, and how long to wait after that.
        let mut republish_at: Option<Instant> = None;
        let mut republish_pause = REPUBLISH_AFTER;
        loop {
            let Some(redis) = controls.inner.redis.as_ref() else {
                return;
            };
            if controls.stopped() {
                return;
            }
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
            // A change this replica could not publish is republished now (`unpublished`).
            if redis.unpublished.swap(false, Ordering::SeqCst) {
                republish_at = Some(Instant::now());
            }
            let republish = republish_at.is_some_and(|at| Instant::now() >= at);
            let step = if republish || Instant::now() >= next_full {
                full_resync(&controls, redis, c).await.map(|(id, read_at, unshared)| {
                    last_id = id;
                    next_full = Instant::now() + redis.settings.resync_interval;
                    match unshared {
                        None => {
                            republish_at = None;
                            republish_pause = REPUBLISH_AFTER;
                        }
                        // The mirror is as current as the read (this replica stays fresh:
                        // it holds its own changes); the other replicas lack these until
                        // Redis takes them.
                        Some(e) => {
                            static WARNED: std::sync::atomic::AtomicI64 =
                                std::sync::atomic::AtomicI64::new(i64::MIN);
                            if crate::gateway::once_a_minute(&WARNED) {
                                tracing::error!(error = %format!("{e:#}"),
                                    "controls: Redis refuses changes this replica made; the other replicas do not have them yet (tried again, logged at most once a minute)");
                            }
                            republish_at = Some(Instant::now() + republish_pause);
                            republish_pause = (republish_pause * 2).min(REPUBLISH_AT_MOST);
                        }
                    }
                    Some(read_at)
                })
            } else {
                follow(&controls, redis, c, &mut last_id)
                    .await
                    .map(|(lost, read_at)| {
                        if lost {
                            tracing::warn!(
                                "controls: Redis lost its keys (restarted without persistence, \
                                 or flushed); resynchronising to republish the journal"
                            );
                            next_full = Instant::now();
                        }
                        // A read of a stream that is gone proves nothing: fresh once resynced.
                        (!lost).then_some(read_at)
                    })
            };
            match step {
                Ok(Some(read_at)) => controls.mark_synced(read_at),
                Ok(None) => {}
                Err(e) => {
                    // Once a minute: a step is tried again every quarter of a second.
                    static WARNED: std::sync::atomic::AtomicI64 =
                        std::sync::atomic::AtomicI64::new(i64::MIN);
                    if crate::gateway::once_a_minute(&WARNED) {
                        tracing::warn!(error = %format!("{e:#}"),
                            "controls: Redis sync failed; will resynchronise (logged at most once a minute)");
                    } else {
                        tracing::debug!(error = %format!("{e:#}"), "controls: Redis sync failed again");
                    }
                    conn = None;
                    next_full = Instant::now();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    });
}

/// Flushes quota increments and refreshes shared totals every `quota::FLUSH_EVERY`, over the
/// one connection quota checks also fetch a new principal's totals over (so no request ever
/// waits for a connection to Redis).
pub fn spawn_quota_flush(controls: Controls) {
    tokio::spawn(async move {
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            let Some(redis) = controls.inner.redis.as_ref() else {
                return;
            };
            if controls.stopped() {
                return;
            }
            if conn.is_none() {
                conn = redis.connection().await.ok();
                controls.share_quota_conn(conn.clone());
            }
            tokio::time::sleep(super::quota::FLUSH_EVERY).await;
            if let Some(c) = conn.as_mut()
                && let Err(e) = controls.inner.quotas.flush(c).await
            {
                tracing::warn!(error = %e, "quota flush failed; will retry");
                conn = None;
                controls.share_quota_conn(None);
            }
        }
    });
}

/// The stream entries' events, those with a valid signature only.
fn decode(redis: &Redis, ids: &[redis::streams::StreamId]) -> Vec<Event> {
    let mut out = Vec::with_capacity(ids.len());
    for entry in ids {
        let json = entry.get::<String>("event").unwrap_or_default();
        let mac = entry.get::<String>("mac").unwrap_or_default();
        if !redis.signed(&json, &mac) {
            if redis.first_refusal(&entry.id) {
                metrics::counter!("wardgate_controls_unsigned_entries_total").increment(1);
                tracing::error!(
                    entry = entry.id,
                    "controls: refusing a stream entry without a valid signature (written by \
                     something that does not hold `redis.key_file`, or signed with another key)"
                );
            }
            continue;
        }
        match serde_json::from_str::<Event>(&json) {
            Ok(e) => out.push(e),
            Err(err) => {
                tracing::warn!(error = %err, "controls: ignoring an unreadable stream entry");
            }
        }
    }
    out
}

/// Reads the whole stream, absorbs it, republishes what it lacks; returns the last entry id
/// and when the stream was read: what the mirror knows dates from then, however long the
/// republishing takes (a revocation placed meanwhile is after what was read, and read by the
/// next `follow`).
async fn full_resync(
    controls: &Controls,
    redis: &Redis,
    c: &mut MultiplexedConnection,
) -> anyhow::Result<(String, Instant, Option<anyhow::Error>)> {
    // In pages: a stream of a few hundred thousand events (every unsubscribe is one) read in
    // one reply would outlast the response timeout, and every resynchronisation after it, so
    // that the replica stayed stale. Entries are only ever appended with larger ids, so the
    // pages together are the whole stream as of the last one read.
    redis.check_key(c).await?;
    let mut entries = Vec::new();
    let mut from = "-".to_owned();
    let read_at = loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&redis.settings.stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(RESYNC_PAGE)
            .query_async(c)
            .await?;
        let read_at = Instant::now();
        let more = page.ids.len() >= RESYNC_PAGE;
        if let Some(last) = page.ids.last() {
            // Exclusive of the last one read (Redis 6.2 and later).
            from = format!("({}", last.id);
        }
        entries.extend(page.ids);
        if !more {
            break read_at;
        }
    };
    let events = controls.absorb_off_workers(decode(redis, &entries)).await?;
    // Following resumes after what this read saw, not after what it republishes: entries
    // other replicas add meanwhile, and the republished ones, are then read like any other
    // (the ones already applied change nothing).
    let last = entries
        .last()
        .map(|s| s.id.clone())
        .unwrap_or_else(|| "0-0".to_owned());
    let in_stream: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let missing: Vec<Event> = controls
        .journal_events()
        .into_iter()
        .filter(|e| !in_stream.contains(e.id.as_str()))
        .collect();
    let unshared = republish(redis, c, &missing).await.err();
    metrics::gauge!("wardgate_controls_unshared_changes").set(if unshared.is_some() {
        missing.len() as f64
    } else {
        0.0
    });
    Ok((last, read_at, unshared))
}

/// Adds journalled events the stream lacks (Redis lost them, or their publishing failed).
async fn republish(
    redis: &Redis,
    c: &mut MultiplexedConnection,
    missing: &[Event],
) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        count = missing.len(),
        "controls: the shared stream lacks journalled changes (lost by Redis, or not \
         published); republishing them from the journal"
    );
    for e in missing {
        let json = serde_json::to_string(e)?;
        let _: String = redis::cmd("XADD")
            .arg(&redis.settings.stream)
            .arg("*")
            .arg("event")
            .arg(&json)
            .arg("mac")
            .arg(redis.sign(&json))
            .query_async(c)
            .await
            .context("Redis refused a journalled change")?;
    }
    Ok(())
}

/// Blocks for new entries after `last_id` and absorbs them, then checks the key (`check_key`):
/// true when Redis has lost its keys since, and so the stream (a `FLUSHALL` ends no
/// connection, and a read of a stream that is gone is only empty), for the journal to be
/// republished at once rather than at the next `resync_interval`, while a replica started
/// meanwhile with an empty journal would serve without what was lost. With when the stream
/// was read: what the mirror knows is what Redis held then, not once the key was checked.
async fn follow(
    controls: &Controls,
    redis: &Redis,
    c: &mut MultiplexedConnection,
    last_id: &mut String,
) -> anyhow::Result<(bool, Instant)> {
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(BLOCK_MS)
        .arg("STREAMS")
        .arg(&redis.settings.stream)
        .arg(last_id.as_str())
        .query_async(c)
        .await?;
    let read_at = Instant::now();
    for key in reply.map(|r| r.keys).unwrap_or_default() {
        if let Some(last) = key.ids.last() {
            *last_id = last.id.clone();
        }
        controls.absorb_off_workers(decode(redis, &key.ids)).await?;
    }
    Ok((!redis.check_key(c).await?, read_at))
}
