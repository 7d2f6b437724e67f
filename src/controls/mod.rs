//! Shared controls: the rights register and token revocations, the same on every replica.
//!
//! A rights request (restriction, erasure, objection, consent withdrawal: seeds §10.3) or a
//! revocation is an [`Event`]. Events are kept three ways: in this replica's in-memory mirror
//! ([`Snapshot`], read on the request path without any I/O), in a local append-only journal
//! (`DATA_DIR/controls.jsonl`, fsynced: survives a Redis restart or `FLUSHALL`), and, when Redis
//! is configured, in a Redis Stream that every replica follows, so an event placed on one
//! replica reaches the others within the stream's blocking-read latency. Folding the same
//! events in any order gives the same state: per (subject, kind) the latest event wins, by
//! time and then id. Only this module and its children talk to Redis.
//!
//! Fail closed: with Redis configured, a replica that has not heard from Redis for longer than
//! the staleness bound answers data requests with 503 until it has resynchronised.

mod journal;
mod quota;
mod sync;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::error::GatewayError;
pub use crate::filter::RegisterFlags;

pub use quota::Limits;
pub use sync::{PUBLISHER_NAME, RedisSettings, load_key};
pub(crate) use sync::{mac_hex, mac_holds};

/// Restriction kinds the register accepts (DOMAIN.md §6). `consent_withdrawn_<channel>` strips
/// that channel's contact field; the others are flags policies read.
pub const KINDS: &[&str] = &[
    "restricted",
    "erasure_requested",
    "objects_direct_marketing",
    "objects_profiling",
    "para22_notice",
    "deceased",
    "do_not_contact",
    "consent_withdrawn_email",
    "consent_withdrawn_sms",
    "consent_withdrawn_phone",
];

/// One change to the shared controls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Random, unique: replays and re-publications are recognised by it.
    pub id: String,
    /// Unix milliseconds when it was made.
    pub at: i64,
    /// Who made it (subject of the admin's token) and why.
    pub by: String,
    pub reason: String,
    #[serde(flatten)]
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Place {
        subject: String,
        kind: String,
        reference: String,
    },
    Lift {
        subject: String,
        kind: String,
        reference: String,
        /// Lifts only the placement under `reference` (every lift made since lifts must name
        /// one in force). A lift without it, from an older journal or replica, lifts every
        /// placement of its kind made before it, as lifts did then. Marked, not guessed from
        /// whether its placement has been seen: a lift can reach a replica before the
        /// placement it names, and must not sweep the others meanwhile.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        exact: bool,
    },
    RevokeToken {
        token_id: String,
    },
    /// Every token of `subject` issued at or before `at` stops working.
    RevokeSubject {
        subject: String,
    },
}

impl Change {
    /// Whether the admin plane takes the change on a mirror past its staleness bound: a
    /// restriction placed, or one token revoked, can disclose nothing and locks out at most
    /// the one token named. A
    /// lift could disclose what another replica restricted meanwhile, and a subject's
    /// revocation, made with an admin token whose own revocation this replica has not heard
    /// of, could lock out the very people who would answer it.
    pub fn taken_on_a_stale_mirror(&self) -> bool {
        matches!(self, Change::Place { .. } | Change::RevokeToken { .. })
    }
}

/// An active restriction, as the DPO sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub kind: String,
    pub reference: String,
    pub placed_by: String,
    pub placed_at: i64,
    pub reason: String,
}

/// The folded state of every event seen.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// (subject, kind) -> reference -> the latest event naming it (`References`).
    latest: HashMap<(String, String), References>,
    revoked_tokens: HashSet<String>,
    /// subject -> tokens issued at or before this (unix seconds) are revoked.
    revoked_subjects: HashMap<String, i64>,
    seen: HashSet<String>,
}

/// The placements and lifts of one kind on one subject, by reference: each request (a
/// disputed accuracy, a pending objection) is placed and lifted on its own, so lifting one
/// leaves another of the same kind in force. A lift not marked `exact` (made before lifts had
/// to name one in force, in an older journal or by an older replica) lifts every placement of
/// the kind made before it, as every lift did then.
#[derive(Debug, Default)]
struct References {
    /// The latest event naming each reference.
    latest: HashMap<String, Event>,
    /// The latest lift not marked `exact` (time, id).
    sweep: Option<(i64, String)>,
}

impl References {
    /// The placements in force: those whose reference's latest event places it, made after
    /// the latest lift not marked `exact`. A function of the events seen, whatever their
    /// order.
    fn in_force(&self) -> impl Iterator<Item = &Event> {
        let sweep = self.sweep.as_ref().map(|(at, id)| (*at, id.as_str()));
        (self.latest.values()).filter(move |e| {
            matches!(e.change, Change::Place { .. })
                && sweep.is_none_or(|w| (e.at, e.id.as_str()) > w)
        })
    }

    /// The time of the latest event of any reference.
    fn latest_at(&self) -> Option<i64> {
        (self.latest.values().map(|e| e.at))
            .chain(self.sweep.as_ref().map(|(at, _)| *at))
            .max()
    }
}

impl Snapshot {
    /// Applies one event; false if it was already applied.
    pub fn apply(&mut self, e: &Event) -> bool {
        if !self.seen.insert(e.id.clone()) {
            return false;
        }
        match &e.change {
            Change::Place {
                subject,
                kind,
                reference,
            }
            | Change::Lift {
                subject,
                kind,
                reference,
                ..
            } => {
                // Subject ids are one whatever their ASCII case, as the register matches
                // them (`RegisterFlags::get`): a restriction placed on `VF-1` is lifted by a
                // lift naming `vf-1`, and read back by either.
                let key = (subject.to_ascii_lowercase(), kind.clone());
                let refs = self.latest.entry(key).or_default();
                if matches!(e.change, Change::Lift { exact: false, .. })
                    && refs
                        .sweep
                        .as_ref()
                        .is_none_or(|(at, id)| (e.at, &e.id) > (*at, id))
                {
                    refs.sweep = Some((e.at, e.id.clone()));
                }
                let newer = (refs.latest.get(reference))
                    .is_none_or(|old| (e.at, &e.id) > (old.at, &old.id));
                if newer {
                    refs.latest.insert(reference.clone(), e.clone());
                }
            }
            Change::RevokeToken { token_id } => {
                self.revoked_tokens.insert(token_id.clone());
            }
            Change::RevokeSubject { subject } => {
                let secs = e.at.div_euclid(1000);
                let entry = self.revoked_subjects.entry(subject.clone()).or_insert(secs);
                *entry = (*entry).max(secs);
            }
        }
        true
    }

    /// The time of the latest placement or lift of `kind` on `subject` (ASCII case folded).
    fn latest_at(&self, subject: &str, kind: &str) -> Option<i64> {
        let key = (subject.to_ascii_lowercase(), kind.to_owned());
        self.latest.get(&key).and_then(References::latest_at)
    }

    /// Every restriction in force on `subject` (ASCII case folded), one per kind and
    /// reference, by kind and then reference.
    pub fn placements(&self, subject: &str) -> Vec<Placement> {
        let mut out: Vec<Placement> = (self.latest.iter())
            .filter(|((s, _), _)| s.eq_ignore_ascii_case(subject))
            .flat_map(|((_, kind), refs)| refs.in_force().map(move |e| (kind, e)))
            .filter_map(|(kind, e)| match &e.change {
                Change::Place { reference, .. } => Some(Placement {
                    kind: kind.clone(),
                    reference: reference.clone(),
                    placed_by: e.by.clone(),
                    placed_at: e.at,
                    reason: e.reason.clone(),
                }),
                Change::Lift { .. } | Change::RevokeToken { .. } | Change::RevokeSubject { .. } => {
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.kind, &a.reference).cmp(&(&b.kind, &b.reference)));
        out
    }
}

/// The controls a replica enforces: a mirror, a journal, and optionally Redis.
#[derive(Clone)]
pub struct Controls {
    inner: Arc<Inner>,
}

/// Records reserved for a request under way (`Controls::check_quota`), given back when dropped.
#[derive(Default)]
pub struct QuotaHold(Option<(Arc<Inner>, quota::Held)>);

impl QuotaHold {
    /// How many records it holds (0 for a role without limits).
    pub fn records(&self) -> u64 {
        self.0.as_ref().map_or(0, |(_, h)| h.records())
    }

    /// Gives back all but `n` of what it holds.
    pub fn keep_only(&mut self, n: u64) {
        if let Some((inner, held)) = &mut self.0 {
            inner.quotas.keep_only(held, n);
        }
    }

    /// Takes over what `other` holds: one hold for a chunk filled a few lines at a time.
    pub fn absorb(&mut self, mut other: QuotaHold) {
        match (&mut self.0, other.0.take()) {
            (Some((_, mine)), Some((_, theirs))) => mine.absorb(theirs),
            (None, theirs) => self.0 = theirs,
            (Some(_), None) => {}
        }
    }
}

impl Drop for QuotaHold {
    fn drop(&mut self) {
        if let Some((inner, held)) = &self.0 {
            inner.quotas.release(held);
        }
    }
}

struct Inner {
    snapshot: RwLock<Snapshot>,
    /// Flags per subject, rebuilt (and replaced whole) on change so the request path reads a
    /// ready answer.
    flags: RwLock<RegisterFlags>,
    journal: journal::Journal,
    redis: Option<sync::Redis>,
    staleness_bound: Duration,
    quotas: quota::Quotas,
    /// The quota flush task's connection, for the rare look-up on the request path (a
    /// principal this replica has not seen); `None` while Redis is away.
    quota_conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// When the mirror last heard from Redis; `None` until the first full resynchronisation.
    last_synced: RwLock<Option<Instant>>,
    /// Set by `stop`: the tasks that follow Redis end at their next step.
    stopped: std::sync::atomic::AtomicBool,
}

/// Why a change did not reach every replica.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not journalled: it took effect nowhere.
    #[error("not recorded: {0:#}")]
    NotRecorded(anyhow::Error),
    /// Journalled, so in effect on this replica (and republished to the others at the next
    /// resynchronisation), but the others have not heard of it yet.
    #[error("recorded on this replica only, until the shared store hears of it: {0:#}")]
    NotShared(anyhow::Error),
}

impl RecordError {
    /// How the caller who made the change is answered (503 either way): not to repeat one in
    /// effect here, to make again one in effect nowhere.
    pub fn answer(&self) -> GatewayError {
        match self {
            RecordError::NotShared(_) => GatewayError::ControlsNotShared,
            RecordError::NotRecorded(_) => GatewayError::ControlsNotRecorded,
        }
    }
}

impl Controls {
    /// Opens the journal under `data_dir` and, if configured, joins the shared Redis stream.
    /// Must run inside a tokio runtime when Redis is configured (it spawns the sync task).
    pub fn open(
        data_dir: &Path,
        redis: Option<RedisSettings>,
        quotas: HashMap<String, Limits>,
    ) -> anyhow::Result<Controls> {
        let journal = journal::Journal::open(&data_dir.join("controls.jsonl"))?;
        let mut snapshot = Snapshot::default();
        for e in &journal.events() {
            snapshot.apply(e);
        }
        let staleness_bound = redis
            .as_ref()
            .map(|r| r.staleness_bound)
            .unwrap_or(Duration::MAX);
        let quotas = quota::Quotas::new(quotas, redis.as_ref().map(|r| r.staleness_bound));
        let redis = match redis {
            Some(settings) => Some(sync::Redis::connect(settings)?),
            None => None,
        };
        let controls = Controls {
            inner: Arc::new(Inner {
                snapshot: RwLock::new(snapshot),
                flags: RwLock::new(RegisterFlags::default()),
                journal,
                redis,
                staleness_bound,
                quotas,
                quota_conn: Mutex::new(None),
                last_synced: RwLock::new(None),
                stopped: Default::default(),
            }),
        };
        controls.rebuild_flags();
        if controls.inner.redis.is_some() {
            sync::spawn(controls.clone());
            sync::spawn_quota_flush(controls.clone());
        }
        Ok(controls)
    }

    /// Ends the tasks that follow Redis (at their next step, within a blocking read): at a
    /// gateway's stop, so that one stopped does not go on speaking for it (its key check
    /// among them) in a process that lives on.
    pub fn stop(&self) {
        (self.inner.stopped).store(true, std::sync::atomic::Ordering::Release);
    }

    fn stopped(&self) -> bool {
        (self.inner.stopped).load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sends Redis what the quotas counted since their last flush, once, at a stop (after the
    /// last request has ended): the process ends before the flush task's next turn
    /// (`quota::FLUSH_EVERY`), and what a principal was disclosed in the last moments would
    /// be lost to the other replicas' totals. Bounded: a Redis that does not answer holds the
    /// stop two seconds at most.
    pub async fn flush_quotas(&self) {
        let conn = self.inner.quota_conn.lock().ok().and_then(|c| c.clone());
        let Some(mut conn) = conn else {
            return;
        };
        let flush = self.inner.quotas.flush(&mut conn);
        match tokio::time::timeout(std::time::Duration::from_secs(2), flush).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "quota counts not flushed at the stop"),
            Err(_) => tracing::warn!("quota counts not flushed at the stop: Redis did not answer"),
        }
    }

    /// Whether the shared quota counts reached Redis within the staleness bound. Past it
    /// every quota-limited caller is answered 503 (an ACL without `wardgate:quota:*`, a
    /// cluster refusing the keys' slots) while the controls stream, and so `/readyz`, is
    /// well: the admin plane reports it (`/readyz`'s body, a gauge) rather than failing
    /// readiness, since the cause is usually every replica's at once, and taking them all out
    /// would refuse the roles without limits too.
    pub fn quotas_fresh(&self) -> bool {
        self.inner.quotas.is_fresh()
    }

    /// Whether the controls are shared with other replicas (`[redis]`): a deployment of
    /// several, each keeping its own audit log.
    pub fn shared(&self) -> bool {
        self.inner.redis.is_some()
    }

    /// Fail closed: with Redis, a mirror older than the staleness bound serves no data.
    pub fn check_fresh(&self) -> Result<(), GatewayError> {
        if self.inner.redis.is_none() {
            return Ok(());
        }
        let last = self
            .inner
            .last_synced
            .read()
            .map(|t| *t)
            .map_err(|_| GatewayError::ControlsStale)?;
        match last {
            Some(t) if t.elapsed() <= self.inner.staleness_bound => Ok(()),
            _ => Err(GatewayError::ControlsStale),
        }
    }

    /// Moves a placement or a lift made here to just after the latest one this replica knows
    /// of for the same subject and kind, where its clock would put it before: the latest by
    /// time wins everywhere (`Snapshot::apply`), so a change stamped by a clock behind the
    /// one that made the last would be outranked on every replica while its maker was told
    /// it was recorded.
    pub fn order_after_latest(&self, e: &mut Event) {
        let (Change::Place { subject, kind, .. } | Change::Lift { subject, kind, .. }) = &e.change
        else {
            return;
        };
        let Ok(s) = self.inner.snapshot.read() else {
            return;
        };
        if let Some(latest) = s.latest_at(subject, kind) {
            e.at = e.at.max(latest.saturating_add(1));
        }
    }

    /// The references of the restrictions of `kind` in force on `subject` on this replica's
    /// mirror: what a lift may name.
    pub fn references_in_force(&self, subject: &str, kind: &str) -> Vec<String> {
        let s = self
            .inner
            .snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut refs: Vec<String> = (s.placements(subject).into_iter())
            .filter(|p| p.kind == kind)
            .map(|p| p.reference)
            .collect();
        refs.sort();
        refs
    }

    /// Whether a verified caller's token holds on the mirror as it is, however stale: neither
    /// revoked here nor past `ends_at` (`Verifier::ends_at`). `gateway::standing` asks it with
    /// the staleness bound and the token's key.
    pub fn holds(&self, p: &Principal, ends_at: i64, now: i64) -> Result<(), GatewayError> {
        use crate::error::AuthFailure;
        if self.is_revoked(p) {
            return Err(GatewayError::Unauthenticated(AuthFailure::Revoked));
        }
        if now > ends_at {
            return Err(GatewayError::Unauthenticated(AuthFailure::Expired));
        }
        Ok(())
    }

    pub fn is_revoked(&self, p: &Principal) -> bool {
        let Ok(s) = self.inner.snapshot.read() else {
            return true;
        };
        s.revoked_tokens.contains(&p.token_id)
            || s.revoked_subjects
                .get(&p.subject)
                .is_some_and(|&before| p.issued_at <= before)
    }

    /// 429 when the principal has already been disclosed their role's allowance, counting
    /// what their requests under way have reserved; otherwise `reserve` records (as many as
    /// the request may disclose) are held for it until the returned hold is dropped, once its
    /// disclosure is counted (`count`).
    pub async fn check_quota(
        &self,
        p: &Principal,
        reserve: u64,
    ) -> Result<QuotaHold, GatewayError> {
        self.check_quota_beside(p, reserve, &QuotaHold::default())
            .await
    }

    /// `check_quota` for an asker that holds `own` already (an export's chunk, held while it
    /// filled, checked again as it is released without giving its room up meanwhile): that
    /// hold must still fit beside what has been counted (`Quotas::check`).
    pub async fn check_quota_beside(
        &self,
        p: &Principal,
        reserve: u64,
        own: &QuotaHold,
    ) -> Result<QuotaHold, GatewayError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let own = own.records();
        let held = match &self.inner.redis {
            None => self.inner.quotas.check(p, now, None, reserve, own).await,
            Some(_) => {
                // The flush task's connection (a handle to it: multiplexed, so cloning shares
                // it). A request never connects, nor waits behind another that does: with
                // Redis away, totals are this replica's own until it is back.
                let mut conn = self.inner.quota_conn.lock().ok().and_then(|c| c.clone());
                self.inner
                    .quotas
                    .check(p, now, conn.as_mut(), reserve, own)
                    .await
            }
        }?;
        Ok(QuotaHold(held.map(|h| (Arc::clone(&self.inner), h))))
    }

    /// Whether `p`'s role has a quota.
    pub fn quota_limited(&self, p: &Principal) -> bool {
        self.inner.quotas.has_limits(&p.role)
    }

    /// Holds as many of `want` records as `p` may still be disclosed (`None`: their role has
    /// no limit), for an export to filter no more lines than that: a chunk that crossed the
    /// allowance would otherwise leave whole.
    pub fn reserve_quota_up_to(
        &self,
        p: &Principal,
        want: u64,
    ) -> Result<Option<QuotaHold>, GatewayError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let held = self.inner.quotas.reserve_up_to(p, now, want)?;
        Ok(held.map(|h| QuotaHold(Some((Arc::clone(&self.inner), h)))))
    }

    /// Counts records disclosed to `p`.
    pub fn count(&self, p: &Principal, n: u64) {
        self.inner
            .quotas
            .add(p, n, time::OffsetDateTime::now_utc().unix_timestamp());
    }

    /// The register's flags for every subject as they stand now: what a page is filtered
    /// against, read once rather than under the lock for each of its records. A flag placed
    /// after this is read applies from the next page. A mirror past its staleness bound gives
    /// none (`ControlsStale`): an export's or aggregate's next batch stops there, as a page
    /// would, rather than be judged against a register that may lack a newer restriction.
    pub fn register_flags(&self) -> Result<RegisterFlags, GatewayError> {
        self.check_fresh()?;
        // A poisoned lock still holds a whole map (it is only ever replaced whole): reading
        // it is better than reading no flags at all, which would fail open.
        let flags = self.inner.flags.read();
        Ok(flags.unwrap_or_else(PoisonError::into_inner).clone())
    }

    pub fn placements(&self, subject: &str) -> Vec<Placement> {
        self.inner
            .snapshot
            .read()
            .map(|s| s.placements(subject))
            .unwrap_or_default()
    }

    /// Records a change: journal (fsync) first, then this replica's mirror, then Redis (if
    /// configured). Once journalled the change is in effect here, as it would be after a
    /// restart (the journal is read at start): a revocation or a containment must not wait
    /// for Redis on the very replica that made it. An error after the journal means the other
    /// replicas have not heard of it yet; the next resynchronisation republishes it.
    pub async fn record(&self, event: Event) -> Result<(), RecordError> {
        // The journal's sync, off the runtime's workers (`absorb_off_workers`).
        let me = self.clone();
        let journalled = event.clone();
        let applied = tokio::task::spawn_blocking(move || {
            me.inner
                .journal
                .append(&journalled)
                .map_err(RecordError::NotRecorded)?;
            // Journalled: whatever follows, the change holds here from the next start on, so
            // it holds here now too.
            Ok(me.absorb(std::slice::from_ref(&journalled)))
        })
        .await
        .map_err(|e| {
            RecordError::NotRecorded(anyhow::anyhow!("the journal's task failed: {e}"))
        })??;
        if let Some(r) = &self.inner.redis {
            r.publish(&event).await.map_err(RecordError::NotShared)?;
        }
        applied.map_err(RecordError::NotShared)
    }

    /// `absorb`, on a thread of the blocking pool, handing the events back: the journal syncs
    /// each new one, and on the runtime's few workers (one per core) a slow or stalled disk
    /// would hold one for as long, and with it every connection it serves, `/readyz` too.
    async fn absorb_off_workers(&self, events: Vec<Event>) -> anyhow::Result<Vec<Event>> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.absorb(&events).map(|()| events))
            .await
            .map_err(|e| anyhow::anyhow!("the journal's task failed: {e}"))?
    }

    /// Applies events (learnt from Redis, or made here and journalled): journal the new ones,
    /// update the mirror.
    fn absorb(&self, events: &[Event]) -> anyhow::Result<()> {
        let mut fresh = Vec::new();
        {
            let mut s = self
                .inner
                .snapshot
                .write()
                .map_err(|_| anyhow::anyhow!("controls lock poisoned"))?;
            for e in events {
                if s.apply(e) {
                    fresh.push(e.clone());
                }
            }
        }
        // The mirror has them now, so the flags must follow even if the journal cannot take
        // them. Every event given is journalled if it is not yet (the journal knows its ids),
        // not only the fresh ones: one the journal failed to take is taken at the next
        // resynchronisation, which hands over the whole stream.
        let journalled = events
            .iter()
            .map(|e| self.inner.journal.append_if_new(e).map(drop))
            .fold(Ok(()), Result::and);
        if !fresh.is_empty() {
            self.rebuild_flags();
        }
        journalled
    }

    /// The connection quota checks fetch totals over (`None` while Redis is away).
    fn share_quota_conn(&self, conn: Option<redis::aio::MultiplexedConnection>) {
        if let Ok(mut c) = self.inner.quota_conn.lock() {
            *c = conn;
        }
    }

    /// The mirror holds what Redis held at `read_at` (never moved back by a slower step).
    fn mark_synced(&self, read_at: Instant) {
        if let Ok(mut t) = self.inner.last_synced.write() {
            *t = Some(t.map_or(read_at, |before| before.max(read_at)));
        }
    }

    fn journal_events(&self) -> Vec<Event> {
        self.inner.journal.events()
    }

    fn rebuild_flags(&self) {
        // The snapshot stays read-locked until the new map is in place: released earlier, a
        // rebuild racing another (a Redis event and a local placement at once) could install
        // its older map over the newer one, and a flag just placed would be missing until the
        // next change (fail open). Never an empty map for a poisoned lock either: that would
        // lift every flag at once.
        let s = self.inner.snapshot.read();
        let s = s.unwrap_or_else(PoisonError::into_inner);
        let mut flags: HashMap<&str, Vec<String>> = HashMap::new();
        for ((subject, kind), refs) in &s.latest {
            if refs.in_force().next().is_some() {
                flags.entry(subject).or_default().push(kind.clone());
            }
        }
        // Built before the write lock: requests read the old map meanwhile. Each subject's
        // kinds sorted, so that the same flags read the same in every rebuild (the filter's
        // memo keys on them; `latest` iterates in no fixed order).
        let register: RegisterFlags = (flags.into_iter())
            .map(|(subject, mut kinds)| {
                kinds.sort_unstable();
                (subject.to_owned(), kinds)
            })
            .collect();
        let mut f = self
            .inner
            .flags
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *f = register;
        drop(f);
        drop(s);
    }
}

/// A new event id and the current time in unix milliseconds.
pub fn stamp() -> (String, i64) {
    let ms = time::OffsetDateTime::now_utc()
        .unix_timestamp_nanos()
        .div_euclid(1_000_000);
    (
        format!("{:032x}", rand::random::<u128>()),
        i64::try_from(ms).unwrap_or(i64::MAX),
    )
}

#[cfg(test)]
mod tests;
