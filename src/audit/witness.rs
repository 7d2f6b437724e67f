//! The chain head kept off the host: what lets `audit verify` see records cut from the log's end.
//!
//! The hash chain shows an edit, a deletion inside it and a reordering, but not the newest
//! records removed whole, nor the newest segments removed with their seals: what is left is
//! still a valid chain. So `serve`, every `audit.witness.interval` in which the log has grown
//! (and every tenth interval even when it has not, and once more when it stops), appends the
//! chain head (`seq`, `hash`, the record's time `ts`, and when it was published, `at`, as one
//! JSON value) to a Redis list of that log's own (`audit.witness.key`), and `wardgate audit
//! verify` with the witness reads every entry back: each witnessed record the log still holds
//! must carry the witnessed hash, none may lie past the log's end, and one the log no longer
//! holds must be older than the retention the auditor says the log is kept for
//! ([`super::verify`]).
//!
//! The list is a witness only as far as the host cannot rewrite it. Give the gateway a Redis
//! user that may run `RPUSH` on that key and nothing else (README: The audit log): `RPUSH`
//! only appends, while a stream's `XADD` can also trim (`MAXLEN`), which no ACL can forbid
//! apart from `XADD` itself. A host that can only append can add a false head, which
//! verification reports as a mismatch or a cut, but cannot remove a true one.
//!
//! Not on the request path, and not a condition of disclosure: the audit record's durability is
//! the log's. A head that cannot be published is logged and counted
//! (`wardgate_audit_witness_failures_total`) and the newer head goes at the next interval.
//!
//! Does not own: the chain itself (`record`, `writer`) or how a log is checked against what
//! was witnessed (`verify`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use tokio::sync::Mutex;

use std::time::Instant;

use super::AuditLog;

/// Where and how often the chain head is witnessed (`[audit.witness]`).
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// The witness's Redis (`redis://` or `rediss://`, credentials included).
    pub url: String,
    /// The list this log's heads are appended to: one list per log.
    pub key: String,
    /// How often the head is published when the log has grown.
    pub interval: Duration,
}

/// One head as witnessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witnessed {
    pub seq: u64,
    pub hash: String,
    /// The record's own time, as the log writes it (empty where the gateway did not know it).
    pub ts: String,
    /// When the gateway published it, as the gateway said.
    pub at: String,
    /// Its place in the list, from 0.
    pub index: u64,
}

/// One head as appended: `{"seq":N,"hash":"...","ts":"...","at":"..."}`.
#[derive(Deserialize)]
struct Entry {
    seq: u64,
    hash: String,
    #[serde(default)]
    ts: String,
    at: String,
}

/// An unchanged head is published again after this many intervals, so that a witness that
/// hears nothing for longer tells of a gateway that stopped publishing, not of an idle log.
const HEARTBEAT_INTERVALS: u32 = 10;

/// Every witnessed head by sequence number (several heads for one number must all agree with
/// the log).
pub type Heads = BTreeMap<u64, Vec<Witnessed>>;

/// Entries read from the list at a time.
const PAGE: usize = 1_000;

/// Publishes a log's head to its witness.
pub struct Witness {
    client: redis::Client,
    config: WitnessConfig,
    /// The connection, opened when first needed and again after a failure; the last sequence
    /// number published, and when.
    state: Mutex<(Option<MultiplexedConnection>, u64, Option<Instant>)>,
}

impl Witness {
    /// A witness for `config` (the URL is checked here; nothing is connected yet).
    pub fn new(config: WitnessConfig) -> anyhow::Result<Witness> {
        let client = redis::Client::open(config.url.as_str())
            .context("audit.witness.url is not a Redis URL")?;
        Ok(Witness {
            client,
            config,
            state: Mutex::new((None, 0, None)),
        })
    }

    /// Publishes the head of `log` every interval until `stop` turns true.
    pub async fn run(&self, log: &AuditLog, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.publish(log).await;
        }
    }

    /// Appends the head of `log` to the list if it moved since the last one published (or that
    /// was `HEARTBEAT_INTERVALS` ago). Returns whether a head was appended; a failure is logged
    /// and counted.
    pub async fn publish(&self, log: &AuditLog) -> bool {
        let Some(head) = log.head() else {
            return false;
        };
        let mut state = self.state.lock().await;
        let heartbeat = self.config.interval * HEARTBEAT_INTERVALS;
        if state.1 == head.seq && state.2.is_some_and(|at| at.elapsed() < heartbeat) {
            return false;
        }
        let seq = head.seq;
        match self.append(&mut state.0, &head).await {
            Ok(()) => {
                (state.1, state.2) = (seq, Some(Instant::now()));
                metrics::gauge!("wardgate_audit_witnessed_seq").set(seq as f64);
                true
            }
            Err(e) => {
                state.0 = None;
                metrics::counter!("wardgate_audit_witness_failures_total").increment(1);
                tracing::warn!(error = %e, key = %self.config.key, seq,
                    "cannot publish the audit chain head to its witness; trying again next interval");
                false
            }
        }
    }

    async fn append(
        &self,
        conn: &mut Option<MultiplexedConnection>,
        head: &super::ChainHead,
    ) -> redis::RedisResult<()> {
        let conn = match conn {
            Some(c) => c,
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(Duration::from_secs(3));
                conn.insert(
                    self.client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
        };
        let at = super::AuditRecord::now_ts();
        let json = serde_json::json!({
            "seq": head.seq,
            "hash": head.hash,
            "ts": head.ts,
            "at": at,
        })
        .to_string();
        redis::cmd("RPUSH")
            .arg(&self.config.key)
            .arg(json)
            .query_async::<u64>(conn)
            .await
            .map(|_| ())
    }
}

/// What a witness holds for one log.
#[derive(Debug, Clone, Default)]
pub struct Heard {
    pub heads: Heads,
    /// When the newest entry was published, as its writer says (a gateway that stopped
    /// publishing shows here: even an idle one publishes every `HEARTBEAT_INTERVALS`
    /// intervals; a hostile host can write this too).
    pub last_published: Option<String>,
    /// Entries that are not heads (their places in the list): not the gateway's, and passed
    /// over so that one such entry cannot keep every later check from running.
    pub unreadable: Vec<u64>,
    /// Heads whose sequence number is below an earlier entry's (place, seq, the earlier seq):
    /// one log's heads only rise, so these were not written by its gateway.
    pub out_of_order: Vec<(u64, u64, u64)>,
}

/// Reads every head witnessed in the list `key` at `url`, oldest first, for verification.
/// Entries that are not heads, and heads out of order, are noted for the caller to report.
pub fn read_all(url: &str, key: &str) -> anyhow::Result<Heard> {
    let client = redis::Client::open(url).context("the witness URL is not a Redis URL")?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .with_context(|| format!("cannot connect to the witness at {}", redact(url)))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut heard = Heard::default();
    let mut highest = 0u64;
    let mut from = 0u64;
    loop {
        let page: Vec<String> = redis::cmd("LRANGE")
            .arg(key)
            .arg(from)
            .arg(from + PAGE as u64 - 1)
            .query(&mut conn)
            .with_context(|| format!("cannot read the witness list `{key}`"))?;
        for (i, json) in page.iter().enumerate() {
            let index = from + i as u64;
            let Ok(entry) = serde_json::from_str::<Entry>(json) else {
                heard.unreadable.push(index);
                continue;
            };
            if entry.seq < highest {
                heard.out_of_order.push((index, entry.seq, highest));
            }
            highest = highest.max(entry.seq);
            heard.last_published = Some(entry.at.clone());
            // The same head published again (a heartbeat, a restart) says nothing new.
            let seen = heard.heads.entry(entry.seq).or_default();
            if !seen
                .iter()
                .any(|w| w.hash == entry.hash && w.ts == entry.ts)
            {
                seen.push(Witnessed {
                    seq: entry.seq,
                    hash: entry.hash,
                    ts: entry.ts,
                    at: entry.at,
                    index,
                });
            }
        }
        if page.len() < PAGE {
            return Ok(heard);
        }
        from += PAGE as u64;
    }
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((scheme_user, host)) => match scheme_user.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***@{host}"),
            None => format!("***@{host}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_witness_url_is_never_printed_with_its_password() {
        assert_eq!(
            redact("redis://wardgate:s3cret@witness:6379/0"),
            "redis://***@witness:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://w:p@ss@witness"), "redis://***@witness");
    }
}
