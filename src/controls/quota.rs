//! Record quotas: how many records a principal may be disclosed per hour and per day, by role.
//!
//! A canvasser needs walk sheets, not the register: a principal over their role's limit gets
//! 429 until the window turns. Counts are per subject and per window (the hour, the day). On one
//! replica they are plain counters; with Redis they are shared: each replica batches its own
//! increments and flushes them every [`FLUSH_EVERY`] with `INCRBY`, and reads back the global
//! totals of every principal it has served recently, so an over-quota principal is refused on
//! every replica. The only requests that wait on Redis are those from a principal a replica
//! has not seen in a while, until one of them has read their totals; the steady state reads
//! memory.
//!
//! A request reserves, when it is checked, as many records as it may disclose (its page size),
//! and gives them back when it ends, its disclosure counted by then: requests sent in parallel
//! each see the others' reservations, so together they cannot pass the check on a total none
//! of them has added to yet. A principal may still go over by one request's worth, as one
//! request alone always could. Reservations are this replica's own: replicas learn each
//! other's counts every flush, not each other's requests under way.
//!
//! Shared totals are only as good as the last flush that reached Redis: when flushes have
//! failed for longer than the controls' staleness bound (Redis away, or refusing the quota
//! commands while the stream works: an ACL, a cluster's slots), a role with limits is
//! answered 503 `controls-stale` rather than granted this replica's own allowance, as every
//! replica would. A principal idle for [`ACTIVE_FOR`] is no longer refreshed here, and their
//! totals are read again from Redis when they return (meanwhile they may have spent their
//! allowance elsewhere); what this replica knew of them stays until their window ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::GatewayError;

pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A principal not seen for this long is no longer refreshed from Redis.
const ACTIVE_FOR: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub per_hour: u64,
    pub per_day: u64,
}

/// (subject, window) -> counts.
#[derive(Default)]
struct Counts {
    /// The best known total: the last global total read, plus what this replica added since.
    totals: HashMap<String, u64>,
    /// Added here and not yet flushed to Redis.
    pending: HashMap<String, u64>,
    /// Keys to refresh from Redis, with when they were last used.
    active: HashMap<String, Instant>,
    /// Records reserved by requests under way on this replica, per subject (never flushed):
    /// counted against whichever window is current, so a request checked just before the
    /// hour turns still holds against the next one, where its records will be counted.
    reserved: HashMap<String, u64>,
    /// The hour whose windows `totals` were last cut to (`drop_ended`).
    hour: i64,
}

impl Counts {
    /// Takes Redis's total for window `k` (`None`: it holds none), plus what this replica has
    /// added since it was read. Never lower than what this replica already knew: Redis may
    /// have lost the key (restarted without persistence, flushed, or evicted it: quota keys
    /// are its only ones with a time to live, the first a `volatile-*` policy takes), and a
    /// total that fell to nothing would give every principal their allowance again.
    ///
    /// With `restore` (a flush's read, sent after its own increments on the same connection,
    /// so that Redis's answer includes them), what Redis lost is added again at the next
    /// flush, so the other replicas learn it too. Not from a request's read: it may be
    /// answered before a flush's increments under way, and would add them a second time.
    fn take_shared(&mut self, k: String, shared: Option<u64>, restore: bool) {
        let local = self.pending.get(&k).copied().unwrap_or(0);
        let told = shared.unwrap_or(0) + local;
        let known = self.totals.get(&k).copied().unwrap_or(0);
        if restore && known > told {
            *self.pending.entry(k.clone()).or_default() += known - told;
        }
        self.totals.insert(k, known.max(told));
    }

    /// Notes the principal's windows as in use: the flushes keep their totals read.
    fn mark_active(&mut self, hour: &str, day: &str) {
        let t = Instant::now();
        for k in [hour, day] {
            match self.active.get_mut(k) {
                Some(seen) => *seen = t,
                None => {
                    self.active.insert(k.to_owned(), t);
                }
            }
        }
    }

    /// Drops every total and activity of a window that has ended, once an hour: what is known
    /// of a principal stays (a floor, should Redis be unable to say) until their hour or day
    /// is over, and no longer.
    fn drop_ended(&mut self, now: i64) {
        let hour = now.div_euclid(3600);
        // Never back to an hour already cut from (a clock read just before another call's,
        // or stepped back), which would drop the current window's totals.
        if hour <= self.hour {
            return;
        }
        self.hour = hour;
        let (h, d) = (
            format!(":h:{hour}"),
            format!(":d:{}", now.div_euclid(86_400)),
        );
        let current = |k: &String| k.ends_with(&h) || k.ends_with(&d);
        self.totals.retain(|k, _| current(k));
        self.active.retain(|k, _| current(k));
    }
}

/// Records a request reserved at its check (`Quotas::check`), to give back with
/// `Quotas::release` when it ends.
#[derive(Debug)]
pub struct Held {
    subject: String,
    n: u64,
}

impl Held {
    /// How many records it holds.
    pub fn records(&self) -> u64 {
        self.n
    }

    /// Takes over what `other` (the same principal's) holds.
    pub fn absorb(&mut self, other: Held) {
        debug_assert_eq!(self.subject, other.subject);
        self.n += other.n;
    }
}

pub struct Quotas {
    limits: HashMap<String, Limits>,
    counts: Mutex<Counts>,
    /// With Redis: the staleness bound, and when a flush last reached it.
    shared: Option<(Duration, Mutex<Instant>)>,
}

/// A quota key's time to live: twice its window, the window read from the key's end (its last
/// two parts are always the window's, whatever the subject holds).
fn ttl_of(key: &str) -> u64 {
    match key.rsplit(':').nth(1) {
        Some("h") => 7200,
        _ => 172_800,
    }
}

fn keys(subject: &str, now: i64) -> [(String, u64); 2] {
    [
        (
            format!("wardgate:quota:{subject}:h:{}", now.div_euclid(3600)),
            7200,
        ),
        (
            format!("wardgate:quota:{subject}:d:{}", now.div_euclid(86_400)),
            172_800,
        ),
    ]
}

impl Quotas {
    /// `shared`: the staleness bound, when the totals are shared through Redis.
    pub fn new(limits: HashMap<String, Limits>, shared: Option<Duration>) -> Quotas {
        Quotas {
            limits,
            counts: Mutex::new(Counts::default()),
            // Counted from start: a replica gets one bound to reach Redis.
            shared: shared.map(|bound| (bound, Mutex::new(Instant::now()))),
        }
    }

    /// Whether the shared counts were flushed to Redis within the staleness bound (always, with
    /// no Redis or no role limited): past it every quota-limited caller is answered 503.
    pub fn is_fresh(&self) -> bool {
        match &self.shared {
            Some((bound, flushed)) if !self.limits.is_empty() => {
                flushed.lock().is_ok_and(|last| last.elapsed() <= *bound)
            }
            _ => true,
        }
    }

    /// Whether the principal may be disclosed more records now, counting what requests under
    /// way have reserved; if so, `reserve` more are reserved for this one (`None`: its role
    /// has no limits, or nothing was reserved). With `own` (what the asker itself holds
    /// already: an export's chunk, held while it filled), whether that still fits beside what
    /// has been counted (other replicas' flushes arrive there): the other holds are not
    /// counted, since it was granted beside them. With `conn`, totals this replica has never
    /// seen are fetched once from Redis.
    pub async fn check(
        &self,
        p: &Principal,
        now: i64,
        conn: Option<&mut MultiplexedConnection>,
        reserve: u64,
        own: u64,
    ) -> Result<Option<Held>, GatewayError> {
        let Some(limits) = self.limits.get(&p.role).copied() else {
            return Ok(None);
        };
        self.fresh()?;
        let [(hour, _), (day, _)] = keys(&p.subject, now);
        let unknown = {
            let mut c = self
                .counts
                .lock()
                .map_err(|_| GatewayError::Internal("quota lock".into()))?;
            if self.shared.is_none() {
                // Nothing to refresh: the totals here are the only ones.
                false
            } else {
                // Not refreshed while idle: what is held for them may be old. Marked active
                // again only once read (below): a request checked while this one waits for
                // Redis reads too, rather than judge on the old figure (a caller back after
                // spending their allowance on another replica, with pages in parallel).
                let was_active = c
                    .active
                    .get(&hour)
                    .is_some_and(|s| s.elapsed() < ACTIVE_FOR);
                let unknown = !was_active || !c.totals.contains_key(&hour);
                if !unknown {
                    c.mark_active(&hour, &day);
                }
                unknown
            }
        };
        // Their totals as Redis holds them. If it cannot say, what this replica last knew
        // (kept while idle) stands, within the staleness bound checked above: past it,
        // nothing is answered.
        let read = match conn {
            Some(conn) if unknown => redis::cmd("MGET")
                .arg(&hour)
                .arg(&day)
                .query_async::<(Option<u64>, Option<u64>)>(conn)
                .await
                .ok(),
            _ => None,
        };
        let mut c = self
            .counts
            .lock()
            .map_err(|_| GatewayError::Internal("quota lock".into()))?;
        if let Some((h, d)) = read {
            c.take_shared(hour.clone(), h, false);
            c.take_shared(day.clone(), d, false);
        }
        if unknown && self.shared.is_some() {
            // Read, or Redis could not say (then the flushes read them from now on).
            c.mark_active(&hour, &day);
        }
        let held = c.reserved.get(&p.subject).copied().unwrap_or(0);
        let counted = |k: &str| c.totals.get(k).copied().unwrap_or(0);
        // What the asker holds must itself fit beside what has been counted: other
        // replicas' counts may have arrived since it was held. Not beside this replica's
        // other holds, which its own hold was granted beside already (a page checked since
        // may overbook by its own worth, as any page may).
        let past = |k: &str, limit: u64| match own {
            0 => counted(k) + held >= limit,
            own => counted(k) + own > limit,
        };
        if past(&hour, limits.per_hour) || past(&day, limits.per_day) {
            return Err(GatewayError::QuotaExceeded);
        }
        if reserve == 0 {
            return Ok(None);
        }
        *c.reserved.entry(p.subject.clone()).or_default() += reserve;
        Ok(Some(Held {
            subject: p.subject.clone(),
            n: reserve,
        }))
    }

    /// Whether `role` has limits.
    pub fn has_limits(&self, role: &str) -> bool {
        self.limits.contains_key(role)
    }

    /// `ControlsStale` once the shared totals have not been flushed within the bound (Redis
    /// away): a role with limits is then refused rather than granted this replica's own
    /// allowance, as every replica would. (`is_fresh` says the same for `/readyz`.)
    fn fresh(&self) -> Result<(), GatewayError> {
        if let Some((bound, flushed)) = &self.shared {
            let last = *flushed
                .lock()
                .map_err(|_| GatewayError::Internal("quota lock".into()))?;
            if last.elapsed() > *bound {
                return Err(GatewayError::ControlsStale);
            }
        }
        Ok(())
    }

    /// Reserves as many of `want` records as the principal may still be disclosed now, this
    /// hour and today, counting what requests under way have reserved (`None`: their role has
    /// no limits). An export holds so the lines it is about to filter (a line is one record
    /// at most), never more than the allowance: parallel requests (another export) see the
    /// hold as they see a page's.
    /// Read from what this replica knows (`check`, at the request's start and each chunk's
    /// release, fetches a principal it has not seen lately).
    pub fn reserve_up_to(
        &self,
        p: &Principal,
        now: i64,
        want: u64,
    ) -> Result<Option<Held>, GatewayError> {
        let Some(limits) = self.limits.get(&p.role).copied() else {
            return Ok(None);
        };
        self.fresh()?;
        let [(hour, _), (day, _)] = keys(&p.subject, now);
        let mut c = self
            .counts
            .lock()
            .map_err(|_| GatewayError::Internal("quota lock".into()))?;
        // Still being served: their totals stay refreshed from the other replicas through
        // an export that goes minutes between chunks.
        if self.shared.is_some() {
            c.mark_active(&hour, &day);
        }
        let held = c.reserved.get(&p.subject).copied().unwrap_or(0);
        let used = |k: &str| c.totals.get(k).copied().unwrap_or(0) + held;
        let room = (limits.per_hour.saturating_sub(used(&hour)))
            .min(limits.per_day.saturating_sub(used(&day)));
        let n = want.min(room);
        if n > 0 {
            *c.reserved.entry(p.subject.clone()).or_default() += n;
        }
        Ok(Some(Held {
            subject: p.subject.clone(),
            n,
        }))
    }

    /// Gives back all but `keep` of what `held` holds.
    pub fn keep_only(&self, held: &mut Held, keep: u64) {
        let back = held.n.saturating_sub(keep);
        if back > 0 {
            self.release(&Held {
                subject: held.subject.clone(),
                n: back,
            });
            held.n -= back;
        }
    }

    /// Gives back what a request reserved.
    pub fn release(&self, held: &Held) {
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        if let Some(r) = c.reserved.get_mut(&held.subject) {
            *r = r.saturating_sub(held.n);
            if *r == 0 {
                c.reserved.remove(&held.subject);
            }
        }
    }

    /// Counts `n` records disclosed to `p`.
    pub fn add(&self, p: &Principal, n: u64, now: i64) {
        if n == 0 || !self.limits.contains_key(&p.role) {
            return;
        }
        if let Ok(mut c) = self.counts.lock() {
            c.drop_ended(now);
            let [(hour, _), (day, _)] = keys(&p.subject, now);
            for k in [hour, day] {
                *c.totals.entry(k.clone()).or_default() += n;
                if self.shared.is_some() {
                    *c.pending.entry(k).or_default() += n;
                }
            }
        }
    }

    /// One batch: push pending increments, read back every active principal's totals.
    pub async fn flush(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let (pending, active) = {
            let Ok(mut c) = self.counts.lock() else {
                return Ok(());
            };
            // Their totals stay (until their window ends, `Counts::drop_ended`) as a floor
            // should Redis be unable to say when they come back; `check` reads them again then.
            c.drop_ended(time::OffsetDateTime::now_utc().unix_timestamp());
            c.active.retain(|_, seen| seen.elapsed() < ACTIVE_FOR);
            let current: Vec<String> = c.active.keys().cloned().collect();
            (std::mem::take(&mut c.pending), current)
        };
        let mut pipe = redis::pipe();
        for (k, n) in &pending {
            pipe.cmd("INCRBY").arg(k).arg(*n).ignore();
            pipe.cmd("EXPIRE").arg(k).arg(ttl_of(k)).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(conn).await {
            // Keep the increments for the next attempt rather than losing them.
            if let Ok(mut c) = self.counts.lock() {
                for (k, n) in pending {
                    *c.pending.entry(k).or_default() += n;
                }
            }
            return Err(e);
        }
        if active.is_empty() {
            // A round trip all the same, on a quota key: an empty pipeline never reaches
            // Redis, and a flush that did not cannot show the totals are still shared.
            let _: Vec<Option<u64>> = redis::cmd("MGET")
                .arg("wardgate:quota:probe")
                .query_async(conn)
                .await?;
        } else {
            let totals: Vec<Option<u64>> =
                redis::cmd("MGET").arg(&active).query_async(conn).await?;
            if let Ok(mut c) = self.counts.lock() {
                for (k, t) in active.into_iter().zip(totals) {
                    c.take_shared(k, t, true);
                }
            }
        }
        if let Some((_, flushed)) = &self.shared
            && let Ok(mut at) = flushed.lock()
        {
            *at = Instant::now();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(subject: &str) -> Principal {
        Principal {
            subject: subject.into(),
            token_id: "t".into(),
            role: "councillor".into(),
            unit: "u".into(),
            areas: vec![],
            purposes: vec![],
            expires_at: 0,
            issued_at: 0,
            grant_expires_at: None,
            key_id: String::new(),
            key_sha256: String::new(),
        }
    }

    fn limits() -> HashMap<String, Limits> {
        [(
            "councillor".to_owned(),
            Limits {
                per_hour: 60,
                per_day: 1000,
            },
        )]
        .into_iter()
        .collect()
    }

    #[test]
    fn a_key_lives_twice_its_own_window_whatever_the_subject_holds() {
        for subject in ["alice", "h:x", "partner:h:1", "d:h:"] {
            let [(hour, hour_ttl), (day, day_ttl)] = keys(subject, 1_700_000_000);
            assert_eq!(
                (ttl_of(&hour), ttl_of(&day)),
                (hour_ttl, day_ttl),
                "{subject}"
            );
        }
    }

    #[tokio::test]
    async fn shared_totals_not_flushed_within_the_bound_refuse_limited_roles() {
        let q = Quotas::new(limits(), Some(Duration::from_millis(50)));
        let alice = principal("alice");
        // Known (as a fetch leaves them) and within the bound: answered from memory.
        {
            let mut c = q.counts.lock().unwrap();
            for (k, _) in keys("alice", 0) {
                c.totals.insert(k.clone(), 10);
                c.active.insert(k, Instant::now());
            }
        }
        assert!(
            q.check(&alice, 0, None, 0, 0).await.is_ok(),
            "within the bound"
        );
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(
            q.check(&alice, 0, None, 0, 0).await,
            Err(GatewayError::ControlsStale)
        ));
        let mut dpo = principal("dana");
        dpo.role = "dpo".into();
        assert!(
            q.check(&dpo, 0, None, 0, 0).await.is_ok(),
            "no limits to share"
        );
        // Unshared, there is nothing to be stale.
        let q = Quotas::new(limits(), None);
        std::thread::sleep(Duration::from_millis(80));
        assert!(q.check(&alice, 0, None, 0, 0).await.is_ok());
    }

    /// An export's chunk, held while it filled, is checked again at its release beside what
    /// has been counted, not beside holds granted since (a page checked meanwhile may
    /// overbook by its own worth, and must not cost the chunk its place): it goes, unless
    /// counts that arrived meanwhile (another replica's) leave it no room.
    #[tokio::test]
    async fn a_held_chunk_fits_beside_the_counted_not_beside_later_holds() {
        let q = Quotas::new(limits(), None);
        let alice = principal("alice");
        let now = 0;
        let mut chunk = q.reserve_up_to(&alice, now, 55).unwrap().unwrap();
        q.keep_only(&mut chunk, 50);
        // A page of 50 checked since: 50 used of 60, so it passes, and holds 50 more.
        let page = q.check(&alice, now, None, 50, 0).await.unwrap().unwrap();
        assert!(q.check(&alice, now, None, 0, chunk.records()).await.is_ok());
        q.release(&page);
        // Ten counted meanwhile (as another replica's flush brings them): 10 + 50 fits
        // exactly; one more does not.
        q.add(&alice, 10, now);
        assert!(q.check(&alice, now, None, 0, chunk.records()).await.is_ok());
        q.add(&alice, 1, now);
        assert!(matches!(
            q.check(&alice, now, None, 0, chunk.records()).await,
            Err(GatewayError::QuotaExceeded)
        ));
        q.release(&chunk);
    }

    #[test]
    fn totals_of_ended_windows_are_dropped() {
        // Alone, and shared (where a principal's totals are also put there by the reads from
        // Redis, `check` and `flush`, not only by `add`).
        for shared in [None, Some(Duration::from_secs(10))] {
            let q = Quotas::new(limits(), shared);
            let (alice, bob) = (principal("alice"), principal("bob"));
            let now = 1_700_000_000;
            q.add(&alice, 5, now);
            q.add(&bob, 5, now);
            {
                // Bob's next hour read from Redis before anything is added to it.
                let mut c = q.counts.lock().unwrap();
                let [(next, _), _] = keys("bob", now + 3600);
                c.totals.insert(next.clone(), 0);
                c.active.insert(next, Instant::now());
                let [(alice_hour, _), _] = keys("alice", now);
                c.active.insert(alice_hour, Instant::now());
            }
            // Bob's next hour: every ended hour goes, the day (not ended) stays.
            q.add(&bob, 1, now + 3600);
            let c = q.counts.lock().unwrap();
            let mut kept: Vec<(&String, &u64)> = c.totals.iter().collect();
            kept.sort();
            let [(bob_hour, _), _] = keys("bob", now + 3600);
            let [_, (alice_day, _)] = keys("alice", now);
            let [_, (bob_day, _)] = keys("bob", now);
            let mut expected = vec![(&alice_day, &5u64), (&bob_day, &6), (&bob_hour, &1)];
            expected.sort();
            assert_eq!(kept, expected, "{shared:?}");
            let [(alice_hour, _), _] = keys("alice", now);
            assert!(!c.active.contains_key(&alice_hour));
        }
    }

    /// A real `redis-server` of the test's own on a free port, killed on drop.
    struct Redis(std::process::Child, u16);

    impl Redis {
        fn start() -> Redis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed (scripts/test.sh installs it)");
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            Redis(child, port)
        }

        async fn connection(&self) -> MultiplexedConnection {
            redis::Client::open(format!("redis://127.0.0.1:{}/", self.1))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A caller back on this replica after an idle spell, having spent their allowance on
    /// another meanwhile, sends pages in parallel: each is judged on Redis's total, not on the
    /// old one this replica kept while the first page's read was under way.
    #[tokio::test]
    async fn pages_in_parallel_from_a_returning_caller_all_wait_for_the_shared_total() {
        let redis = Redis::start();
        let q = Quotas::new(limits(), Some(Duration::from_secs(30)));
        let alice = principal("alice");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let [(hour, _), _] = keys("alice", now);
        {
            // One record served here, then idle past `ACTIVE_FOR`.
            let mut c = q.counts.lock().unwrap();
            let long_ago = Instant::now().checked_sub(ACTIVE_FOR * 2).unwrap();
            for (k, _) in keys("alice", now) {
                c.totals.insert(k.clone(), 1);
                c.active.insert(k, long_ago);
            }
        }
        // Meanwhile the other replica flushed the whole hourly allowance.
        let mut conn = redis.connection().await;
        let _: () = redis::cmd("SET")
            .arg(&hour)
            .arg(60)
            .query_async(&mut conn)
            .await
            .unwrap();
        let (mut first, mut second) = (conn.clone(), conn.clone());
        let (a, b) = tokio::join!(
            q.check(&alice, now, Some(&mut first), 10, 0),
            q.check(&alice, now, Some(&mut second), 10, 0),
        );
        for (n, answer) in [a, b].into_iter().enumerate() {
            assert!(
                matches!(answer, Err(GatewayError::QuotaExceeded)),
                "page {n}: {answer:?}"
            );
        }
    }
}
