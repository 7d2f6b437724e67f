//! Cross-replica detection over a shared Redis stream.
//!
//! Behind a load balancer a scraper's pages are spread over every replica, and each replica's
//! own detector may see too little to match. So, when Redis is configured, every replica also
//! appends a compact [`Observation`] of each access (who, decision, how many records; never
//! subject ids) to the stream `watch.shared_stream`, capped at about a million entries. One
//! replica at a time holds a lease (`STREAM:leader`, renewed every second, lost after five) and
//! reads the stream through the consumer group `detect`, runs the same rules over every
//! replica's accesses and acknowledges each entry once examined. A new leader first claims
//! what its predecessor read but never acknowledged, so a leader that dies mid-batch loses
//! nothing. Its detector starts with empty windows. Each entry is signed with the shared
//! controls' key, and the leader examines only signed entries, each once (`Leader::admit`):
//! whoever can write to Redis cannot feed it accesses.
//!
//! An alert for one rule and principal is raised once for the whole deployment: whichever
//! detector (a replica's own or the shared one) first sets `STREAM:alerted:RULE:PRINCIPAL`
//! (`NX`, expiring after the cooldown) raises it. If Redis cannot be asked, the alert is
//! raised anyway: a duplicate is better than a miss.
//!
//! The request path never waits on any of this: publishing is a bounded queue drained by a
//! background task, and entries that do not fit while Redis is away are dropped and counted
//! (`wardgate_watch_shared_dropped_total`); each replica's own detector still sees them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamReadReply};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::gateway::Gateway;

use super::acting::Again;
use super::rules::{Detector, Observation};
use super::settings::Rule;

const QUEUE: usize = 16_384;
const BATCH: usize = 512;
const STREAM_MAX_LEN: u64 = 1_000_000;
const LEASE_MS: u64 = 5_000;
const GROUP: &str = "detect";
/// Evidence references kept for the shared detector's windows.
const MAX_REFS: usize = 1_000_000;
/// How long alerts raise without asking Redis after a failed connect, before trying again.
const RECONNECT_AFTER: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct Entry {
    /// The replica whose audit log holds the record.
    r: String,
    /// Its sequence number there.
    s: u64,
    o: Observation,
}

pub struct Shared {
    client: redis::Client,
    stream: String,
    pub replica: String,
    tx: mpsc::Sender<String>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<String>>>,
    /// The connection alerts ask `first_to_alert` over, kept (a new one per alert was a
    /// connect, up to its 2 s timeout with Redis away, for every alert of a storm), and when
    /// connecting last failed: not tried again for `RECONNECT_AFTER`.
    alerting: tokio::sync::Mutex<(Option<MultiplexedConnection>, Option<std::time::Instant>)>,
    /// The shared controls' key (`redis.key_file`): each principal's and route's id numbers
    /// are shifted by an offset made with it (`publish`), and each entry is signed with it
    /// (`entry_mac`).
    key: ring::hmac::Key,
}

/// Replicas whose entries the leader remembers (`Leader::seen`): more than a deployment
/// runs at once, counting those a rolling restart replaces.
const MAX_REPLICAS: usize = 1024;
/// The sequence numbers remembered per replica (`Seen`): more than the entries that may come
/// out of order, two publishing batches' worth (a batch whose pipeline timed out may still
/// reach Redis after the next).
const RECENT: usize = 1024;

impl Shared {
    pub fn new(url: &str, stream: &str, key: ring::hmac::Key) -> anyhow::Result<Shared> {
        let client = redis::Client::open(url)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "wardgate".to_owned());
        let (tx, rx) = mpsc::channel(QUEUE);
        Ok(Shared {
            client,
            stream: stream.to_owned(),
            replica: format!(
                "{host}-{}-{:04x}",
                std::process::id(),
                rand::random::<u16>()
            ),
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            alerting: tokio::sync::Mutex::new((None, None)),
            key,
        })
    }

    /// What a replica puts in the stream for `o`: its id number (`Observation::id_number`)
    /// shifted by an offset secret to those without the key, the same for every access of
    /// one principal to one route on every replica. `enumeration` needs only the distances
    /// between one principal's reads, which the shift keeps, so what Redis holds does not
    /// say which subjects were read (nor which were withheld, and why) to whoever reads it
    /// without the key. (Whoever also knows one id a principal read, and when, can work out
    /// that principal's offset, and so the rest of their reads of that route.)
    fn shared(&self, o: &Observation) -> Observation {
        let mut o = o.clone();
        if let Some(n) = o.id_number {
            let who = o.principal_key();
            let route = o.route.as_deref().unwrap_or("");
            let mut tag = ring::hmac::Context::with_key(&self.key);
            for part in ["wardgate enumeration offset", who.as_str(), route] {
                tag.update(&(part.len() as u64).to_be_bytes());
                tag.update(part.as_bytes());
            }
            let mut offset = [0; 8];
            offset.copy_from_slice(&tag.sign().as_ref()[..8]);
            // Under 2^63, and id numbers are under 10^18 (`trailing_number`), so the sum
            // never wraps: a run of neighbouring ids stays one run.
            o.id_number = Some(n.saturating_add(u64::from_be_bytes(offset) >> 1));
        }
        o
    }

    /// What an entry is signed over: who signs and in which stream, then the entry (so a
    /// signature is not one of the shared controls', made with the same key over the
    /// controls' stream and an event).
    fn signed_text(&self, json: &str) -> Vec<u8> {
        [
            b"wardgate access\n",
            self.stream.as_bytes(),
            b"\n",
            json.as_bytes(),
        ]
        .concat()
    }

    /// An entry's signature, as the stream carries it (`m`, beside the entry's `e`): the
    /// leader examines only entries a replica holding the key wrote, so that whoever can
    /// write to Redis cannot feed it accesses (a `contain` rule would revoke whoever they
    /// named, with a signed revocation).
    fn entry_mac(&self, json: &str) -> String {
        crate::controls::mac_hex(&self.key, &self.signed_text(json))
    }

    /// Whether `mac` is `json`'s signature.
    fn signed(&self, json: &str, mac: &str) -> bool {
        crate::controls::mac_holds(&self.key, &self.signed_text(json), mac)
    }

    /// Queues one access for the shared stream; never waits.
    pub fn publish(&self, seq: u64, o: &Observation) {
        let entry = Entry {
            r: self.replica.clone(),
            s: seq,
            o: self.shared(o),
        };
        let Ok(json) = serde_json::to_string(&entry) else {
            return;
        };
        if self.tx.try_send(json).is_err() {
            metrics::counter!("wardgate_watch_shared_dropped_total").increment(1);
        }
    }

    /// The mark that an alert (`escalation` 0) or an escalation of it was raised, by any
    /// replica. Escalations have their own marks, or the first alert's would silence them.
    fn alert_mark(&self, rule: Rule, key: &str, escalation: u32) -> String {
        match escalation {
            0 => format!("{}:alerted:{rule}:{key}", self.stream),
            n => format!("{}:escalated:{n}:{rule}:{key}", self.stream),
        }
    }

    /// True if this caller should raise the alert (the first across replicas, or Redis away):
    /// it holds the mark for `cooldown`.
    pub async fn first_to_alert(
        &self,
        rule: Rule,
        key: &str,
        escalation: u32,
        cooldown: Duration,
    ) -> bool {
        let mut conn = {
            let mut held = self.alerting.lock().await;
            let (conn, failed) = &mut *held;
            if conn.is_none() && failed.is_none_or(|t| t.elapsed() >= RECONNECT_AFTER) {
                *conn = self.connection().await.ok();
                *failed = conn.is_none().then(std::time::Instant::now);
            }
            match conn.clone() {
                Some(conn) => conn,
                None => return true,
            }
        };
        let flag = self.alert_mark(rule, key, escalation);
        let set: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&flag)
            .arg(&self.replica)
            .arg("NX")
            .arg("PX")
            .arg(
                u64::try_from(cooldown.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .query_async(&mut conn)
            .await;
        if set.is_err() {
            // Connected afresh for the next alert.
            self.alerting.lock().await.0 = None;
        }
        !matches!(set, Ok(None))
    }

    /// Whether this replica holds the mark of an alert on `rule` for `key` (this process set
    /// it: `first_to_alert`); false if another does, or Redis cannot be asked.
    pub async fn holds_mark(&self, rule: Rule, key: &str, escalation: u32) -> bool {
        let Some(mut conn) = self.alerting.lock().await.0.clone() else {
            return false;
        };
        let held: redis::RedisResult<Option<String>> = redis::cmd("GET")
            .arg(self.alert_mark(rule, key, escalation))
            .query_async(&mut conn)
            .await;
        matches!(held, Ok(Some(v)) if v == self.replica)
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(3));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

/// Drains the publish queue into the stream in pipelined batches until `stop`.
pub async fn publish_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(mut rx) = shared.rx.lock().ok().and_then(|mut r| r.take()) else {
        return;
    };
    let mut conn: Option<MultiplexedConnection> = None;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // Accesses still queued go before the stop.
        tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
            _ = stop.changed() => return,
        }
        if conn.is_none() {
            conn = shared.connection().await.ok();
        }
        let Some(c) = conn.as_mut() else {
            metrics::counter!("wardgate_watch_shared_dropped_total").increment(batch.len() as u64);
            batch.clear();
            continue;
        };
        let mut pipe = redis::pipe();
        let n = batch.len() as u64;
        for json in batch.drain(..) {
            let mac = shared.entry_mac(&json);
            pipe.cmd("XADD")
                .arg(&shared.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_MAX_LEN)
                .arg("*")
                .arg("e")
                .arg(json)
                .arg("m")
                .arg(mac)
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(c).await {
            tracing::warn!(error = %e, "cannot publish accesses to the shared stream");
            metrics::counter!("wardgate_watch_shared_dropped_total").increment(n);
            conn = None;
        }
    }
}

/// Takes the lease when it is free and, while holding it, runs the rules over every
/// replica's accesses.
pub async fn lead_loop(gw: Arc<Gateway>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut leading: Option<Leader> = None;
    // Findings whose alert the breach log could not take, tried again whether or not this
    // replica still leads: any replica may record an alert, and the mark was taken back.
    let mut again = Again::default();
    loop {
        if *stop.borrow() {
            break;
        }
        retry_due(&gw, &mut again).await;
        let step = async {
            let mut conn = shared.connection().await?;
            if !gw.audit.is_healthy() || !gw.watch.breach.is_healthy() {
                // A leader that cannot record would still mark the alerts it finds as raised
                // (`first_to_alert`), silencing every other replica's detector, and record
                // none: it gives the lease up, and what it read and did not acknowledge goes
                // to the next leader (`XAUTOCLAIM`).
                if leading.take().is_some() {
                    tracing::warn!(replica = %shared.replica,
                        "the audit log or the breach log cannot be written: giving up cross-replica breach detection");
                }
                give_up_lease(&shared, &mut conn).await?;
                return Ok(false);
            }
            if !hold_lease(&shared, &mut conn).await? {
                leading = None;
                return Ok::<_, redis::RedisError>(false);
            }
            let leader = match leading.as_mut() {
                Some(l) => l,
                None => {
                    tracing::info!(replica = %shared.replica, "leading cross-replica breach detection");
                    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(&shared.stream)
                        .arg(GROUP)
                        .arg("$")
                        .arg("MKSTREAM")
                        .query_async(&mut conn)
                        .await;
                    let mut l = Leader::new(&gw);
                    // What the previous leader read but never acknowledged comes first.
                    let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                        .arg(&shared.stream)
                        .arg(GROUP)
                        .arg(&shared.replica)
                        .arg(0)
                        .arg("0-0")
                        .arg("COUNT")
                        .arg(10_000)
                        .query_async(&mut conn)
                        .await?;
                    l.examine(&gw, &shared, &mut conn, claimed.claimed, &mut again)
                        .await?;
                    leading.insert(l)
                }
            };
            let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&shared.replica)
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(&shared.stream)
                .arg(">")
                .query_async(&mut conn)
                .await?;
            let ids = read
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            leader
                .examine(&gw, &shared, &mut conn, ids, &mut again)
                .await?;
            Ok(true)
        };
        let pause = match step.await {
            Ok(true) => Duration::ZERO,
            Ok(false) => Duration::from_secs(1),
            Err(e) => {
                // Said, not at debug: a Redis that refuses the lease's script (an ACL without
                // scripting) would otherwise leave no replica leading, and nothing to show it.
                static LAST: std::sync::atomic::AtomicI64 =
                    std::sync::atomic::AtomicI64::new(i64::MIN);
                if crate::gateway::once_a_minute(&LAST) {
                    tracing::warn!(error = %e, replica = %shared.replica,
                        "cross-replica detection: cannot lead or take part (logged at most once a minute)");
                }
                leading = None;
                Duration::from_secs(1)
            }
        };
        metrics::gauge!("wardgate_watch_shared_leading")
            .set(f64::from(u8::from(leading.is_some())));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => break,
        }
    }
    // Stopping: the alerts the breach log has yet to take (each is in the audit log already,
    // and acted on) are tried at once and then every second, for as long as detection's
    // stop allows (`acting::FINISH_WITHIN`; shutdown waits for this task).
    again.stopping();
    let deadline = tokio::time::Instant::now() + super::acting::FINISH_WITHIN;
    while !again.is_empty() && tokio::time::Instant::now() < deadline {
        retry_due(&gw, &mut again).await;
        if !again.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    while let Some(f) = again.pop() {
        tracing::error!(rule = %f.rule, principal = super::rules::logged_key(&f.key), summary = %f.summary,
            "cross-replica breach detection stopped before the breach log could take this \
             alert (it is in the audit log as a `breach_alert` record, and was acted on)");
        metrics::counter!("wardgate_watch_findings_dropped_total", "rule" => f.rule.name())
            .increment(1);
    }
}

/// Tries again the alerts whose time has come that the breach log has yet to take, until one
/// fails again (the log is failing for all of them: the rest wait their next turn).
async fn retry_due(gw: &Gateway, again: &mut Again) {
    while again.is_due() {
        let Some(f) = again.pop() else { break };
        match super::act(gw, f, "shared").await {
            None => again.recorded(),
            Some(f) => {
                again.push(f);
                break;
            }
        }
    }
}

impl Shared {
    /// Takes back this replica's "already alerted" mark for `rule` and `key` (`first_to_alert`)
    /// when its breach log could not take the alert: the alert waits in this replica's memory,
    /// which a restart loses, and the mark would silence every other detector (the leader's
    /// cross-replica finding among them) for the whole cooldown. Compared and deleted in one
    /// step, so another replica's mark is never taken away; best effort (Redis may be away,
    /// and then no mark was taken).
    pub async fn release_alert(&self, rule: Rule, key: &str, escalation: u32) {
        const IF_MINE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
        // Dropped after an error since the mark was taken (or never made: Redis away, and
        // then no mark was taken): not connected afresh here, which would hold up the acting
        // task for as long as Redis takes to refuse, finding after finding.
        let Some(mut conn) = self.alerting.lock().await.0.clone() else {
            tracing::warn!(%rule,
                "cannot take back the alert's mark (no connection to the shared store): other \
                 replicas may stay quiet on it for the cooldown");
            return;
        };
        let released: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(IF_MINE)
            .arg(1)
            .arg(self.alert_mark(rule, key, escalation))
            .arg(&self.replica)
            .query_async(&mut conn)
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, %rule,
                "cannot take back the alert's mark: other replicas stay quiet on it for the cooldown");
        }
    }
}

/// Deletes the lease if this replica holds it (compared and deleted in one step, so that
/// another replica's is never taken away).
async fn give_up_lease(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
) -> redis::RedisResult<()> {
    const IF_MINE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
    let _: i64 = redis::cmd("EVAL")
        .arg(IF_MINE)
        .arg(1)
        .arg(format!("{}:leader", shared.stream))
        .arg(&shared.replica)
        .query_async(conn)
        .await?;
    Ok(())
}

/// `SET NX PX` to take the lease, `PEXPIRE` to keep it (compared and extended in one step,
/// so that a lease another replica took meanwhile is never extended as this one's); true
/// while this replica holds it.
async fn hold_lease(shared: &Shared, conn: &mut MultiplexedConnection) -> redis::RedisResult<bool> {
    const TAKE_OR_KEEP: &str = "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) \
        then return 1 end \
        if redis.call('GET', KEYS[1]) == ARGV[1] then \
        redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end return 0";
    let held: i64 = redis::cmd("EVAL")
        .arg(TAKE_OR_KEEP)
        .arg(1)
        .arg(format!("{}:leader", shared.stream))
        .arg(&shared.replica)
        .arg(LEASE_MS)
        .query_async(conn)
        .await?;
    Ok(held == 1)
}

/// The shared detector and the evidence references its windows cite.
struct Leader {
    detector: Detector,
    next: u64,
    refs: HashMap<u64, String>,
    order: VecDeque<u64>,
    /// The entries examined of each replica: one examined again would be a copy (added by
    /// whoever can write to Redis, to count a principal's accesses twice).
    seen: HashMap<String, Seen>,
}

/// A replica's entries a leader has examined, by sequence number. A replica publishes its
/// records in the order of its log, so the stream holds them nearly in order (a publishing
/// batch that timed out may land after the next): the newest `RECENT` are remembered, and
/// any below them counts as examined, as does any more than `RECENT` below the first the
/// leader saw.
#[derive(Default)]
struct Seen {
    floor: u64,
    recent: std::collections::BTreeSet<u64>,
    /// When the replica was last heard from (`Leader::next` then).
    when: u64,
}

impl Seen {
    /// Notes `seq` as examined; false if it was (or counts as) already.
    fn first_time(&mut self, seq: u64, now: u64) -> bool {
        if seq <= self.floor || !self.recent.insert(seq) {
            return false;
        }
        if self.recent.len() > RECENT
            && let Some(oldest) = self.recent.pop_first()
        {
            self.floor = oldest;
        }
        self.when = now;
        true
    }
}

/// Why the leader passes an entry over.
#[derive(Debug, PartialEq, Eq)]
enum Passed {
    /// Not this version's entry, or not one at all.
    Unreadable,
    /// Not signed with the replicas' key.
    Unsigned,
    /// A copy of one examined (`Leader::seen`).
    Again,
}

impl Leader {
    fn new(gw: &Gateway) -> Leader {
        Leader::with(Detector::new(gw.watch.settings.clone()))
    }

    fn with(detector: Detector) -> Leader {
        Leader {
            detector,
            next: 0,
            refs: HashMap::new(),
            order: VecDeque::new(),
            seen: HashMap::new(),
        }
    }

    /// The entry a stream entry holds, if it is one to examine: signed with the replicas'
    /// key, and not examined before (then noted as examined).
    fn admit(
        &mut self,
        shared: &Shared,
        json: Option<&str>,
        mac: Option<&str>,
    ) -> Result<Entry, Passed> {
        let json = json.ok_or(Passed::Unreadable)?;
        if !mac.is_some_and(|m| shared.signed(json, m)) {
            return Err(Passed::Unsigned);
        }
        let entry = serde_json::from_str::<Entry>(json).map_err(|_| Passed::Unreadable)?;
        if !self.seen.contains_key(&entry.r)
            && self.seen.len() >= MAX_REPLICAS
            && let Some(quiet) = (self.seen.iter())
                .min_by_key(|(_, seen)| seen.when)
                .map(|(r, _)| r.clone())
        {
            self.seen.remove(&quiet);
        }
        // What came from a replica before the first of its entries this leader sees, more
        // than the entries that may come out of order, went before it (to the leader before).
        let seen = (self.seen.entry(entry.r.clone())).or_insert_with(|| Seen {
            floor: entry.s.saturating_sub(RECENT as u64 + 1),
            ..Seen::default()
        });
        if !seen.first_time(entry.s, self.next) {
            return Err(Passed::Again);
        }
        Ok(entry)
    }

    async fn examine(
        &mut self,
        gw: &Gateway,
        shared: &Shared,
        conn: &mut MultiplexedConnection,
        ids: Vec<redis::streams::StreamId>,
        again: &mut Again,
    ) -> redis::RedisResult<()> {
        for sid in &ids {
            let (json, mac) = (sid.get::<String>("e"), sid.get::<String>("m"));
            let entry = match self.admit(shared, json.as_deref(), mac.as_deref()) {
                Ok(entry) => entry,
                Err(passed) => {
                    // Said, not skipped unseen.
                    let (counter, why) = match passed {
                        Passed::Unreadable => (
                            "wardgate_watch_shared_unreadable_total",
                            "entries it cannot read (not this version's)",
                        ),
                        Passed::Unsigned => (
                            "wardgate_watch_shared_unsigned_total",
                            "entries not signed with this replica's `redis.key_file` (written \
                             by a replica of before, or by something that does not hold the key)",
                        ),
                        Passed::Again => (
                            "wardgate_watch_shared_repeated_total",
                            "copies of entries it has examined (added to the stream again)",
                        ),
                    };
                    metrics::counter!(counter).increment(1);
                    static LAST: std::sync::atomic::AtomicI64 =
                        std::sync::atomic::AtomicI64::new(i64::MIN);
                    if crate::gateway::once_a_minute(&LAST) {
                        tracing::warn!(id = %sid.id, "cross-replica detection passes over \
                            {why} (logged at most once a minute; {counter} counts them)");
                    }
                    continue;
                }
            };
            self.next += 1;
            self.refs
                .insert(self.next, format!("{}#{}", entry.r, entry.s));
            self.order.push_back(self.next);
            if self.order.len() > MAX_REFS
                && let Some(old) = self.order.pop_front()
            {
                self.refs.remove(&old);
            }
            for mut f in self.detector.observe_access(self.next, &entry.o) {
                f.refs = f
                    .evidence
                    .iter()
                    .filter_map(|n| self.refs.get(n).cloned())
                    .collect();
                if let Some(f) = super::act(gw, f, "shared").await {
                    again.push(f);
                }
            }
        }
        if !ids.is_empty() {
            let mut ack = redis::cmd("XACK");
            ack.arg(&shared.stream).arg(GROUP);
            for sid in &ids {
                ack.arg(&sid.id);
            }
            let _: i64 = ack.query_async(conn).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Caller, Decision};

    fn read_by(subject: &str, route: &str, n: u64) -> Observation {
        Observation {
            ts: "2026-12-06T09:00:00Z".to_owned(),
            caller: Some(Caller {
                subject: subject.to_owned(),
                role: "councillor".to_owned(),
                unit: "LEEDS".to_owned(),
                token_id: "t-1".to_owned(),
            }),
            client_addr: None,
            decision: Decision::Deny,
            disclosed: 0,
            withheld_target: Some("protected".to_owned()),
            reason: Some("record_withheld".to_owned()),
            route: Some(route.to_owned()),
            id_number: Some(n),
            path: String::new(),
            export: None,
            export_ended: false,
        }
    }

    fn shared(key: &[u8]) -> Shared {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        Shared::new("redis://127.0.0.1:1/", "wardgate:access", key).unwrap()
    }

    /// What goes to Redis keeps the distances between one principal's reads of one route
    /// (what `enumeration` looks for, on the leader) and says nothing of which subjects were
    /// read: no path, and numbers shifted by an offset that only the key gives.
    #[test]
    fn the_stream_keeps_distances_between_reads_and_names_no_subject() {
        let s = shared(b"a key of at least thirty-two bytes, for the test");
        let n = |o: &Observation| s.shared(o).id_number.unwrap();
        let (a, b) = (
            read_by("cllr-1", "voter.read", 12),
            read_by("cllr-1", "voter.read", 13),
        );
        assert_eq!(n(&b) - n(&a), 1);
        assert_ne!(n(&a), 12);
        let far = read_by("cllr-1", "voter.read", 999_999_999_999_999_999);
        assert_eq!(n(&far) - n(&a), 999_999_999_999_999_999 - 12, "no wrap");
        // Another principal, another route, another key: another offset.
        assert_ne!(n(&read_by("cllr-2", "voter.read", 12)), n(&a));
        assert_ne!(n(&read_by("cllr-1", "membership.read", 12)), n(&a));
        let other = shared(b"another key of at least thirty-two bytes, for the test");
        assert_ne!(other.shared(&a).id_number, s.shared(&a).id_number);
        // The entry as written: an empty path (for replicas of before), no id.
        let json = serde_json::to_string(&s.shared(&a)).unwrap();
        assert!(
            json.contains(r#""path":"""#) && !json.contains("VF-"),
            "{json}"
        );
        assert!(!json.contains("\"id_number\":12,"), "{json}");
        // What is not a read by id goes as it is.
        let mut listing = read_by("cllr-1", "voter.list", 0);
        listing.id_number = None;
        assert_eq!(s.shared(&listing), listing);
    }

    /// The leader examines an entry only if a replica holding the key wrote it, and only
    /// once: whoever can write to Redis can neither feed it accesses (a `contain` rule would
    /// revoke whoever they named, with a signed revocation) nor add a replica's entry again
    /// to count a principal's accesses twice.
    #[test]
    fn the_leader_examines_signed_entries_once_each() {
        let key = b"a key of at least thirty-two bytes, for the test";
        let s = shared(key);
        let mut leader = Leader::with(Detector::new(
            crate::watch::settings::WatchSettings::defaults(std::path::Path::new("/tmp")),
        ));
        let entry = |r: &str, seq: u64| {
            serde_json::to_string(&Entry {
                r: r.to_owned(),
                s: seq,
                o: read_by("dpo-alice", "voter.read", 7),
            })
            .unwrap()
        };
        let mut admit =
            |json: &str, mac: Option<&str>| (leader.admit(&s, Some(json), mac)).map(|e| (e.r, e.s));
        let first = entry("replica-a", 10);
        // Unsigned, signed with another key, signed over another entry.
        assert_eq!(admit(&first, None), Err(Passed::Unsigned));
        let other = shared(b"another key of at least thirty-two bytes, for the test");
        assert_eq!(
            admit(&first, Some(&other.entry_mac(&first))),
            Err(Passed::Unsigned)
        );
        let later = entry("replica-a", 11);
        assert_eq!(
            admit(&later, Some(&s.entry_mac(&first))),
            Err(Passed::Unsigned)
        );
        // The replicas' own key over another stream's entry: the stream is signed too.
        let elsewhere = Shared::new(
            "redis://127.0.0.1:1/",
            "another:stream",
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        )
        .unwrap();
        assert_eq!(
            admit(&first, Some(&elsewhere.entry_mac(&first))),
            Err(Passed::Unsigned)
        );
        assert_eq!(
            admit("{}", Some(&s.entry_mac("{}"))),
            Err(Passed::Unreadable)
        );
        // Signed: examined once, whatever the order.
        assert_eq!(
            admit(&first, Some(&s.entry_mac(&first))),
            Ok(("replica-a".to_owned(), 10))
        );
        assert_eq!(
            admit(&first, Some(&s.entry_mac(&first))),
            Err(Passed::Again)
        );
        assert_eq!(
            admit(&later, Some(&s.entry_mac(&later))),
            Ok(("replica-a".to_owned(), 11))
        );
        let late = entry("replica-a", 9);
        assert_eq!(
            admit(&late, Some(&s.entry_mac(&late))),
            Ok(("replica-a".to_owned(), 9))
        );
        assert_eq!(admit(&late, Some(&s.entry_mac(&late))), Err(Passed::Again));
        assert_eq!(
            admit(&later, Some(&s.entry_mac(&later))),
            Err(Passed::Again)
        );
        // Another replica's numbers are its own.
        let b = entry("replica-b", 3);
        assert_eq!(
            admit(&b, Some(&s.entry_mac(&b))),
            Ok(("replica-b".to_owned(), 3))
        );
        // Long before the first of a replica's entries the leader saw: examined by the leader
        // before it, or a copy.
        let c = entry("replica-c", 5_000);
        assert_eq!(
            admit(&c, Some(&s.entry_mac(&c))),
            Ok(("replica-c".to_owned(), 5_000))
        );
        let old = entry("replica-c", 5_000 - RECENT as u64 - 1);
        assert_eq!(admit(&old, Some(&s.entry_mac(&old))), Err(Passed::Again));
        let late = entry("replica-c", 5_000 - RECENT as u64);
        assert_eq!(
            admit(&late, Some(&s.entry_mac(&late))),
            Ok(("replica-c".to_owned(), 5_000 - RECENT as u64))
        );
    }

    /// Past `MAX_REPLICAS`, the replica the leader heard from longest ago is forgotten, not
    /// the one just heard from.
    #[test]
    fn the_leader_forgets_the_quietest_replica_first() {
        let s = shared(b"a key of at least thirty-two bytes, for the test");
        let mut leader = Leader::with(Detector::new(
            crate::watch::settings::WatchSettings::defaults(std::path::Path::new("/tmp")),
        ));
        let admit = |leader: &mut Leader, r: &str, seq: u64| {
            let json = serde_json::to_string(&Entry {
                r: r.to_owned(),
                s: seq,
                o: read_by("cllr-1", "voter.read", 7),
            })
            .unwrap();
            let passed = leader.admit(&s, Some(&json), Some(&s.entry_mac(&json)));
            leader.next += 1;
            passed.map(|_| ())
        };
        for i in 0..MAX_REPLICAS {
            assert_eq!(admit(&mut leader, &format!("r{i}"), 5), Ok(()));
        }
        // The first is heard from again, so the second is now the quietest.
        assert_eq!(admit(&mut leader, "r0", 6), Ok(()));
        assert_eq!(admit(&mut leader, "one-more", 1), Ok(()));
        assert_eq!(leader.seen.len(), MAX_REPLICAS);
        assert_eq!(admit(&mut leader, "r0", 6), Err(Passed::Again));
        assert!(!leader.seen.contains_key("r1"));
    }

    /// A replica's newest `RECENT` entries are remembered one by one, and any older than
    /// those counts as examined: a copy of an old entry is not examined again however long
    /// ago it came.
    #[test]
    fn entries_older_than_those_remembered_count_as_examined() {
        let mut seen = Seen::default();
        for seq in (1..=RECENT as u64 + 1).rev() {
            assert!(seen.first_time(seq, 0), "{seq}");
        }
        // The lowest went below the floor.
        assert!(!seen.first_time(1, 0));
        assert_eq!(seen.recent.len(), RECENT);
        for seq in RECENT as u64 + 2..RECENT as u64 + 10 {
            assert!(seen.first_time(seq, 0));
        }
        assert!((1..=9).all(|seq| !seen.first_time(seq, 0)));
        assert!(seen.first_time(RECENT as u64 + 100, 0));
    }
}
