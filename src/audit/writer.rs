//! The audit writer: appends records to the current segment with group commit, acknowledges
//! each record only once it is durable, and turns disk failures into refusals (never into
//! silently lost records) until the disk is writable again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::prepare::{self, Preparer};
use super::record::{AuditRecord, encode_line};
use super::seal_queue::SealQueue;
use super::segment::{first_ts, resume, segment_name, sync_dir};

/// When a batch counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// `fdatasync` before the batch is acknowledged: survives power loss.
    Fsync,
    /// Acknowledged after `write(2)` only: survives a gateway crash, not a kernel crash.
    PageCache,
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub dir: PathBuf,
    pub durability: Durability,
    /// Most records per group commit.
    pub max_batch: usize,
    /// How long a group commit may wait for the records the recent arrival rate says are
    /// coming (zero: never wait; `page-cache` mode waits only when saturated). See
    /// `Writer::gather`.
    pub commit_window: Duration,
    /// Roll to a new segment once the current one has grown past this size.
    pub segment_max_bytes: u64,
    /// Write client addresses sealed under a per-day key (see `addr.rs`), so they can be
    /// shredded before the rest of the record.
    pub seal_client_addr: bool,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum AuditError {
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    #[error("audit log is shut down")]
    Closed,
}

type Reply = oneshot::Sender<Result<u64, AuditError>>;

/// The newest durable record of the chain: its sequence number, hash and time (the time is
/// empty where it is not known: after everything was pruned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
    pub ts: String,
}

/// A record that is now durable, with its sequence number: what the breach detector and the
/// live feed read. Only acknowledged records are published, so nothing is seen that the log
/// does not hold.
#[derive(Debug)]
pub struct Logged {
    pub seq: u64,
    pub record: AuditRecord,
}

/// How many durable records a slow subscriber may fall behind before it misses some (and is
/// told how many, see [`broadcast::error::RecvError::Lagged`]).
const PUBLISH_CAPACITY: usize = 65_536;
/// A segment is finished once its first record is this old, whatever its size: retention
/// removes whole finished segments, so a quiet log (a standby replica, a few requests a day)
/// that filled its 64 MiB over years would otherwise keep its oldest records that much past
/// the retention, and for ever while they are in the segment being written. With this, a
/// record is kept at most the retention and a day (and an hour, the prune's interval).
pub const SEGMENT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Records waiting, each in a task of its own, for room in a full queue (`queue_detached`).
const MAX_DETACHED: usize = 4_096;

/// The shortest nap of a group commit waiting for records.
const GATHER_MIN_NAP: Duration = Duration::from_micros(20);
/// With this many requests on their way to the log the gateway is saturated: there are then
/// as many as connections, while at half of the saturation rate bursts rarely reach a few.
/// (With 4, 1,000-record pages at half the saturation rate waited too, and their p99 doubled.
/// A slow datastore also keeps requests on their way; their records are coming too.)
const SATURATED_SIBLINGS: usize = 16;
/// Then a commit waits for at least this many records, for up to `SATURATED_WINDOWS` commit
/// windows, where the window alone would not wait: large pages arrive under two per window.
const SATURATED_BATCH: usize = 8;
const SATURATED_WINDOWS: u32 = 4;

struct Pending {
    record: AuditRecord,
    reply: Reply,
    /// Synced to disk whatever the durability mode (`AuditLog::append_synced`).
    sync: bool,
}

/// Room for one record in the audit queue (`AuditLog::reserve`).
pub struct Room(mpsc::OwnedPermit<Pending>);

impl Room {
    /// Queues the record, at once: its acknowledgement to wait on, as `AuditLog::submit`'s.
    pub fn submit(self, record: AuditRecord) -> Ack {
        let (reply, done) = oneshot::channel();
        self.0.send(Pending {
            record,
            reply,
            sync: false,
        });
        Ack(done)
    }
}

/// A record queued with `AuditLog::submit`: `durable` says when (and whether) it is.
#[must_use = "a submitted record is not known to be durable until its Ack says so"]
pub struct Ack(oneshot::Receiver<Result<u64, AuditError>>);

impl Ack {
    /// Resolves when the record is durable per the durability mode, with its sequence number;
    /// `Err(Unavailable)` if the batch containing it could not be written.
    pub async fn durable(self) -> Result<u64, AuditError> {
        self.0.await.unwrap_or(Err(AuditError::Closed))
    }
}

/// Handle to the audit log; cheap to clone, all clones feed the same writer thread.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

/// `wait`, taken for a failure after [`STALLED_AFTER`].
pub async fn within<T>(
    wait: impl std::future::Future<Output = Result<T, AuditError>>,
) -> Result<T, AuditError> {
    tokio::time::timeout(STALLED_AFTER, wait)
        .await
        .unwrap_or_else(|_| {
            Err(AuditError::Unavailable(format!(
                "no commit within {STALLED_AFTER:?}"
            )))
        })
}

/// How long a commit may take before the log counts as stalled: `/readyz` says not ready, and
/// a request waiting for its record is answered 503 (`gateway::handle`). A disk retrying for
/// minutes, or a hung network mount, has not failed, and would otherwise hold every request.
/// While the log is unhealthy and no record comes, the writer tries the disk again this often
/// with a record of its own (`Writer::next`): a load balancer sends no traffic to a replica
/// whose `/readyz` fails, so waiting for a request's record to try again would wait for ever.
const RETRY_EVERY: Duration = if cfg!(test) {
    Duration::from_millis(200)
} else {
    Duration::from_secs(5)
};

pub const STALLED_AFTER: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(10)
};

struct Inner {
    /// Requests that will append a record and have not yet (see `AuditLog::expect`).
    coming: Arc<Inflight>,
    /// `None` once shut down. Appends clone the sender so none is held across an await here.
    tx: Mutex<Option<mpsc::Sender<Pending>>>,
    /// Tasks that will append records (`appender`), and records waiting for room in the
    /// queue (`queue_detached`): `settle` waits for both.
    appenders: AtomicUsize,
    detached: AtomicUsize,
    healthy: Arc<AtomicBool>,
    /// When the commit under way began (`Committing`).
    committing: Arc<Committing>,
    /// The chain head: the newest durable record's sequence number and hash.
    head: Arc<Mutex<Option<ChainHead>>>,
    /// The newest record synced to disk (`synced_through`).
    synced: Arc<AtomicU64>,
    thread: Mutex<Option<JoinHandle<()>>>,
    published: broadcast::Sender<Arc<Logged>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (creating if needed) the directory, finds the newest segment, reads its last line to
    /// recover the chain head (last hash and next sequence number); a torn final line left by a
    /// crash is truncated away (and logged) so appends continue a valid chain. Spawns the writer
    /// on a dedicated thread because blocking file IO must not run on tokio workers.
    pub fn open(settings: AuditSettings) -> anyhow::Result<AuditLog> {
        let healthy = Arc::new(AtomicBool::new(true));
        // Bounded so a stalled disk pushes back on callers instead of queueing without limit.
        let (tx, rx) = mpsc::channel(settings.max_batch.max(1).saturating_mul(4));
        let (published, _) = broadcast::channel(PUBLISH_CAPACITY);
        let writer = Writer::open(settings, Arc::clone(&healthy), published.clone())?;
        let coming = Arc::clone(&writer.coming);
        let committing = Arc::clone(&writer.committing);
        let head = Arc::clone(&writer.head);
        let synced = Arc::clone(&writer.synced);
        let thread = std::thread::Builder::new()
            .name("wardgate-audit".into())
            .spawn(move || writer.run(rx))
            .context("cannot start the audit writer thread")?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                coming,
                tx: Mutex::new(Some(tx)),
                appenders: AtomicUsize::new(0),
                detached: AtomicUsize::new(0),
                healthy,
                committing,
                head,
                synced,
                thread: Mutex::new(Some(thread)),
                published,
            }),
        })
    }

    /// Says a record is on its way: a request is being processed and will append one. Hold
    /// the guard until the record is queued (or will not be): a group commit under load waits
    /// for such records, and only while there are some (`Writer::gather`); dropping the last
    /// guard wakes it.
    pub fn expect(&self) -> Coming {
        Coming::new(&self.inner.coming)
    }

    /// Queues one record and resolves when it is durable per the durability mode, returning its
    /// sequence number; `Err(Unavailable)` if the batch containing it could not be written.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        self.submit(record).await?.durable().await
    }

    /// `append`, taken for a failure once it has waited [`STALLED_AFTER`] (a stalled log):
    /// for a record whose answer may as well be 503 as wait for a disk that hangs (a read
    /// or a refusal; not a change, which must not be logged and then not made). The record
    /// may still be written once the disk comes back: the log then says more than was
    /// answered, never less.
    pub async fn append_within(&self, record: AuditRecord) -> Result<u64, AuditError> {
        within(self.append(record)).await
    }

    /// Queues one record and resolves as soon as the writer has it, with the acknowledgement
    /// to wait on before disclosing what the record lists: a caller with other work to do
    /// meanwhile (an export filtering its next chunk) overlaps it with the write and sync.
    pub async fn submit(&self, record: AuditRecord) -> Result<Ack, AuditError> {
        self.submit_as(record, false).await
    }

    /// Waits for room for one record in the writer's queue: the record is then queued
    /// without another wait (`Room::submit`), so that a caller cancelled while it waits has
    /// queued nothing, and one that got room cannot be cancelled half-way.
    pub async fn reserve(&self) -> Result<Room, AuditError> {
        let tx = lock(&self.inner.tx).clone().ok_or(AuditError::Closed)?;
        tx.reserve_owned()
            .await
            .map(Room)
            .map_err(|_| AuditError::Closed)
    }

    /// `append`, synced to disk whatever `audit.durability` says: for a record of something
    /// about to be done that a power cut would not undo (segments deleted by a prune, address
    /// keys shredded), which must not be lost while what it records is not.
    pub async fn append_synced(&self, record: AuditRecord) -> Result<u64, AuditError> {
        self.submit_as(record, true).await?.durable().await
    }

    async fn submit_as(&self, record: AuditRecord, sync: bool) -> Result<Ack, AuditError> {
        let tx = lock(&self.inner.tx).clone().ok_or(AuditError::Closed)?;
        let (reply, done) = oneshot::channel();
        tx.send(Pending {
            record,
            reply,
            sync,
        })
        .await
        .map_err(|_| AuditError::Closed)?;
        Ok(Ack(done))
    }

    /// Says a task will append records until the returned guard is dropped (an export):
    /// `settle` waits for it before the log is shut down.
    pub fn appender(&self) -> Appender {
        Appender::counting(&self.inner, |i| &i.appenders)
    }

    /// Waits, at most `within`, until no request's record is still on its way (`expect`), no
    /// appender is running and no detached record is waiting for room: what shutdown waits
    /// for before it closes the queue, so that the connections it has just ended (their
    /// handlers recording what they leave unanswered, HTTP/2 requests in tasks of their own,
    /// exports writing their closing records) are in the log. False if time ran out.
    pub async fn settle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let busy = self.inner.coming.count.load(Ordering::Acquire)
                + self.inner.appenders.load(Ordering::Acquire)
                + self.inner.detached.load(Ordering::Acquire);
            if busy == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Queues one record without waiting, for a caller that cannot wait (a drop): at once
    /// when the queue has room, else from a task of its own, at most `MAX_DETACHED` of them
    /// at a time (a stalled disk must not turn hung-up requests into unbounded memory): past
    /// that the record is lost, logged and counted (`wardgate_audit_failures_total`). Whether
    /// it becomes durable is not reported.
    pub fn queue_detached(&self, record: AuditRecord) {
        let Some(tx) = lock(&self.inner.tx).clone() else {
            metrics::counter!("wardgate_audit_failures_total").increment(1);
            tracing::error!(
                request_id = record.request_id,
                "audit log closed; record lost"
            );
            return;
        };
        let (reply, _) = oneshot::channel();
        match tx.try_send(Pending {
            record,
            reply,
            sync: false,
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(pending)) => {
                let runtime = tokio::runtime::Handle::try_current();
                let waiting = Appender::counting(&self.inner, |i| &i.detached);
                let room = self.inner.detached.load(Ordering::Acquire) <= MAX_DETACHED;
                match runtime {
                    Ok(runtime) if room => {
                        runtime.spawn(async move {
                            let _waiting = waiting;
                            if tx.send(pending).await.is_err() {
                                metrics::counter!("wardgate_audit_failures_total").increment(1);
                                tracing::error!("audit log closed; record lost");
                            }
                        });
                    }
                    _ => {
                        drop(waiting);
                        metrics::counter!("wardgate_audit_failures_total").increment(1);
                        tracing::error!(
                            request_id = pending.record.request_id,
                            "audit queue full and too many records waiting for room; a record queued apart (a request left unanswered, refused for a stalled log, or a correction) is lost"
                        );
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::counter!("wardgate_audit_failures_total").increment(1);
                tracing::error!("audit log closed; record lost");
            }
        }
    }

    /// Every record acknowledged from now on, in sequence order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Logged>> {
        self.inner.published.subscribe()
    }

    /// True when the last write attempt succeeded (or nothing has been attempted yet), and
    /// the writer is still running: a writer thread gone (a panic) answers every append
    /// `Closed`, and `/readyz` must say so rather than keep traffic coming.
    /// The sequence number of the newest record a commit synced to disk (0: none since the
    /// log was opened). With `fsync` durability, every record's; with `page-cache`, those
    /// `append_synced` asked for and the records before them.
    pub fn synced_through(&self) -> u64 {
        self.inner.synced.load(Ordering::Acquire)
    }

    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
            && !self.inner.committing.stalled()
            && lock(&self.inner.thread)
                .as_ref()
                .is_some_and(|t| !t.is_finished())
    }

    /// The chain head: the newest durable record's sequence number and hash (after pruning
    /// everything, the last pruned one's); `None` for a log that never held a record.
    pub fn head(&self) -> Option<ChainHead> {
        lock(&self.inner.head).clone()
    }

    /// Stops accepting, writes and syncs everything queued, joins the writer thread.
    pub async fn shutdown(&self) {
        // The writer drains the queue and exits once the last sender is gone.
        drop(lock(&self.inner.tx).take());
        let Some(thread) = lock(&self.inner.thread).take() else {
            return;
        };
        if !matches!(
            tokio::task::spawn_blocking(move || thread.join()).await,
            Ok(Ok(()))
        ) {
            tracing::error!("audit writer thread ended abnormally");
        }
    }
}

/// Requests on their way to the log (`AuditLog::expect`), and the writer thread, woken by the
/// last of them from a group commit's nap (`Writer::gather`): once nothing is on its way,
/// waiting on would only be for requests that have not arrived.
#[derive(Default)]
struct Inflight {
    count: AtomicUsize,
    /// The writer is napping for records.
    napping: AtomicBool,
    writer: OnceLock<Thread>,
}

/// A task that will append records (`AuditLog::appender`), or a record waiting for room
/// (`queue_detached`), counted until dropped.
pub struct Appender(Arc<Inner>, fn(&Inner) -> &AtomicUsize);

impl Appender {
    fn counting(inner: &Arc<Inner>, counter: fn(&Inner) -> &AtomicUsize) -> Appender {
        counter(inner).fetch_add(1, Ordering::AcqRel);
        Appender(Arc::clone(inner), counter)
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::AcqRel);
    }
}

/// A record on its way (`AuditLog::expect`); dropping it says it is no longer coming.
pub struct Coming(Arc<Inflight>);

impl Coming {
    fn new(inflight: &Arc<Inflight>) -> Coming {
        inflight.count.fetch_add(1, Ordering::Relaxed);
        Coming(Arc::clone(inflight))
    }
}

impl Drop for Coming {
    fn drop(&mut self) {
        // Sequentially consistent with the writer's `napping` then `count`: either it sees
        // the count at zero and does not nap, or this sees it napping and wakes it.
        let inflight = &self.0;
        if inflight.count.fetch_sub(1, Ordering::SeqCst) == 1
            && inflight.napping.load(Ordering::SeqCst)
            && let Some(writer) = inflight.writer.get()
        {
            writer.unpark();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State owned by the writer thread.
struct Writer {
    /// What recovery cut at start and kept aside, for `AuditLog::open` to record.
    cuts: Vec<super::segment::Cut>,
    dir: PathBuf,
    durability: Durability,
    max_batch: usize,
    commit_window: Duration,
    /// Records per second arriving, smoothed over recent commits.
    arrival_rate: f64,
    /// When the last commit began.
    last_commit: Option<Instant>,
    /// Records on their way (`AuditLog::expect`).
    coming: Arc<Inflight>,
    segment_max_bytes: u64,
    sealer: Option<super::addr::Sealer>,
    /// The day whose address key could not be made or read, since the last record sealed:
    /// a batch with no address to seal (the writer's own retry, an admin record) does not
    /// make the log healthy again until that day's key can be had, or, once that day is
    /// over, the key of the batch's own day (the next records').
    seal_failed: Option<String>,
    /// Finished segments go here to be sealed off this thread.
    seal_queue: SealQueue,
    /// Makes the next segment's space ready (fsync durability only: see `prepare`).
    preparer: Option<Preparer>,
    /// The last segment whose space was asked for (each is asked for once the segment before
    /// it is half full).
    asked_to_prepare: u64,
    segment: u64,
    /// Closed after a failure so the next batch reopens the segment by path.
    file: Option<File>,
    /// Bytes of the current segment holding acknowledged records; anything beyond is debris,
    /// or the zero bytes of made-ready space (`preallocated`).
    len: u64,
    /// The current segment's file was made ready ahead (`prepare`) and still holds zero
    /// bytes past `len`, released when the segment is finished.
    preallocated: bool,
    /// The current segment's directory entry may not be durable yet.
    dir_dirty: bool,
    /// Why a sync failed in `page-cache` durability, after which nothing more is written:
    /// the records acknowledged since the last sync may be lost (Linux marks pages whose
    /// writeback failed clean and reports the error once), and a sync that then succeeds
    /// would vouch for them (`synced_through`, the witness's head) all the same.
    sync_failed: Option<String>,
    /// When the current segment is finished by age, [`SEGMENT_MAX_AGE`] after its first
    /// record (`None`: it holds none, or its first line cannot be read). Worked out once a
    /// segment: each commit compares the clock with it, no more.
    finish_at: Option<std::time::SystemTime>,
    next_seq: u64,
    last_hash: String,
    healthy: Arc<AtomicBool>,
    committing: Arc<Committing>,
    /// The chain head as `AuditLog::head` tells it, set after each commit.
    head: Arc<Mutex<Option<ChainHead>>>,
    /// The newest record synced to disk by a commit (with `page-cache` durability, only those
    /// `append_synced` asked for).
    synced: Arc<AtomicU64>,
    published: broadcast::Sender<Arc<Logged>>,
    /// Held for the writer's life: two processes appending to one log would fork the chain.
    _lock: File,
}

/// When the commit under way began, in milliseconds on the process's clock (0: none under
/// way): a commit older than [`STALLED_AFTER`] is a stalled log.
#[derive(Debug, Default)]
struct Committing(AtomicU64);

impl Committing {
    fn millis() -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        // (At least 1: 0 says no commit is under way.)
        START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    fn begin(&self) {
        self.0.store(Self::millis(), Ordering::Release);
    }

    fn end(&self) {
        self.0.store(0, Ordering::Release);
    }

    fn stalled(&self) -> bool {
        let since = self.0.load(Ordering::Acquire);
        since != 0 && Self::millis().saturating_sub(since) > STALLED_AFTER.as_millis() as u64
    }
}

/// `fdatasync` of a segment. (A test can make it fail once, as a disk's failed writeback
/// makes it fail: `tests::fail_next_sync`.)
fn sync_data(file: &File) -> io::Result<()> {
    #[cfg(test)]
    if tests::failing_sync(file) {
        return Err(io::Error::from_raw_os_error(5)); // EIO
    }
    #[cfg(test)]
    tests::stalling_sync(file);
    file.sync_data()
}

/// Refuses one record the writer could not seal or encode. The log is marked unhealthy
/// before its writer hears: whoever is refused, and then asks `/readyz`, is told not ready.
fn refuse(healthy: &AtomicBool, reply: Reply, why: String) {
    metrics::counter!("wardgate_audit_failures_total").increment(1);
    if healthy.swap(false, Ordering::AcqRel) {
        tracing::error!(%why, "an audit record could not be sealed or encoded; not ready");
    }
    let _ = reply.send(Err(AuditError::Unavailable(why)));
}

/// [`SEGMENT_MAX_AGE`] after the record time `ts` (`None` if it does not read as one).
fn a_day_after(ts: &str) -> Option<std::time::SystemTime> {
    let at =
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()?;
    Some(std::time::SystemTime::from(at) + SEGMENT_MAX_AGE)
}

impl Writer {
    fn open(
        settings: AuditSettings,
        healthy: Arc<AtomicBool>,
        published: broadcast::Sender<Arc<Logged>>,
    ) -> anyhow::Result<Writer> {
        let dir = settings.dir;
        super::segment::create_dir_synced(&dir)
            .with_context(|| format!("cannot create audit directory `{}`", dir.display()))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .with_context(|| format!("cannot open the lock file in `{}`", dir.display()))?;
        // A writer of this process that is shutting down releases the lock when its thread ends;
        // wait a moment for that, but not for another process that holds it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while lock.try_lock().is_err() {
            if Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            anyhow::bail!(
                "the audit log `{}` is in use by another wardgate process (one writer per log)",
                dir.display()
            );
        }
        let mut resume = resume(&dir, settings.segment_max_bytes)?;
        let cuts = std::mem::take(&mut resume.cuts);
        // Space made ready by an earlier run is made again: a crash may have left records
        // in it (a rename to the segment's name lost), and nothing says it is all zeros.
        prepare::remove_all(&dir);
        let sealer = match settings.seal_client_addr {
            true => {
                let mut sealer = super::addr::Sealer::new(&dir);
                let today = super::AuditRecord::now_ts();
                let day = today.get(..10).unwrap_or("0000-00-00");
                sealer.ready(day).with_context(|| {
                    format!(
                        "cannot read or create today's client-address key in `{}` (the \
                         audit log seals each record's address with it)",
                        dir.join("addr-keys").display()
                    )
                })?;
                Some(sealer)
            }
            false => None,
        };
        let seal_queue = SealQueue::start(dir.clone())
            .context("cannot start the audit segment sealing thread")?;
        // Page-cache mode has no sync for made-ready space to make cheaper.
        let preparer = (settings.durability == Durability::Fsync)
            .then(|| Preparer::start(dir.clone(), settings.segment_max_bytes))
            .transpose()
            .with_context(|| {
                format!(
                    "cannot start making audit segments ready in `{}`",
                    dir.display()
                )
            })?;
        let finish_at = (resume.len > 0)
            .then(|| first_ts(&dir.join(segment_name(resume.segment))))
            .flatten()
            .and_then(|t| a_day_after(&t));
        let mut writer = Writer {
            cuts,
            dir,
            durability: settings.durability,
            max_batch: settings.max_batch.max(1),
            commit_window: settings.commit_window,
            arrival_rate: 0.0,
            last_commit: None,
            coming: Arc::default(),
            segment_max_bytes: settings.segment_max_bytes,
            sealer,
            seal_failed: None,
            seal_queue,
            preparer,
            asked_to_prepare: 0,
            segment: resume.segment,
            file: None,
            len: resume.len,
            preallocated: false,
            sync_failed: None,
            dir_dirty: resume.new_segment,
            finish_at,
            head: Arc::new(Mutex::new((resume.next_seq > 1).then(|| ChainHead {
                seq: resume.next_seq - 1,
                hash: resume.last_hash.clone(),
                ts: resume.last_ts.clone(),
            }))),
            next_seq: resume.next_seq,
            last_hash: resume.last_hash,
            healthy,
            committing: Arc::default(),
            synced: Arc::new(AtomicU64::new(0)),
            published,
            _lock: lock,
        };
        // Fail at startup, not on the first request, if the segment cannot be opened.
        writer
            .ensure_open()
            .context("cannot open the current audit segment")?;
        // Always, once: the segment continued may be one the last run created (or adopted by
        // rename) and died or failed before syncing its directory entry, and records about to
        // be acknowledged in it must not vanish with that entry at a power cut.
        sync_dir(&writer.dir).context("cannot sync the audit directory")?;
        writer.dir_dirty = false;
        tracing::info!(dir = %writer.dir.display(), segment = writer.segment,
            next_seq = writer.next_seq, "audit log opened");
        // Segments finished before a crash may lack their seal. (Listed before the cuts are
        // recorded: a segment their records finish is queued by that, once.)
        let unsealed: Vec<u64> = super::segment::list_segments(&writer.dir)
            .unwrap_or_default()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| *n < writer.segment && super::index::read_seal(&writer.dir, *n).is_none())
            .collect();
        writer.record_cuts().context(
            "cannot record in the audit log what recovery cut from it (the next start tries again)",
        )?;
        for n in unsealed {
            writer.seal_queue.push(n);
        }
        Ok(writer)
    }

    /// The first records of this run, durable before the log takes any other: what recovery
    /// cut and kept aside (records torn from a batch never acknowledged, or acknowledged ones
    /// damaged, which the chain no longer holds and a subject access search no longer finds).
    /// Each cut's `.pending` note goes once its record is durable.
    fn record_cuts(&mut self) -> anyhow::Result<()> {
        let cuts = std::mem::take(&mut self.cuts);
        if cuts.is_empty() {
            return Ok(());
        }
        let mut replies = Vec::new();
        let mut batch = Vec::new();
        for cut in &cuts {
            let mut record = AuditRecord::system("audit.recovery", "segment_cut");
            record.decision = super::record::Decision::Error;
            record.detail = Some(serde_json::to_value(cut)?);
            let (reply, done) = oneshot::channel();
            batch.push(Pending {
                record,
                reply,
                sync: true,
            });
            replies.push(done);
        }
        // Synced whatever the durability mode (and before a roll the batch may cause): the
        // notes go only once their records are on disk.
        self.commit(batch);
        for mut done in replies {
            match done.try_recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("{e}"),
                Err(_) => anyhow::bail!("the record was not written"),
            }
        }
        for cut in &cuts {
            std::fs::remove_file(&cut.pending)
                .with_context(|| format!("cannot remove `{}`", cut.pending.display()))?;
        }
        sync_dir(&self.dir)?;
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        while let Some(first) = self.next(&mut rx) {
            let mut batch = vec![first];
            self.drain(&mut rx, &mut batch);
            self.gather(&mut rx, &mut batch);
            let now = Instant::now();
            if let Some(last) = self.last_commit.replace(now) {
                let seconds = now.duration_since(last).as_secs_f64().max(1e-6);
                let sample = batch.len() as f64 / seconds;
                self.arrival_rate += (sample - self.arrival_rate) * 0.25;
            }
            self.commit(batch);
        }
        if self.durability == Durability::PageCache
            && let Err(e) = self.sync_all()
        {
            tracing::error!(error = %e, "cannot sync the audit log at shutdown");
        }
        // Leave the segment as long as its records (the next start would cut it back anyway).
        if let Err(e) = self.release_preallocated() {
            tracing::warn!(error = %e, "cannot release the audit segment's made-ready space");
        }
        tracing::info!(next_seq = self.next_seq, "audit writer stopped");
    }

    /// The next record to commit, waited for (`None` once the log is shut). While the log is
    /// unhealthy (a failed write or sync) and nothing comes, every `RETRY_EVERY` a record of
    /// its own (`audit.writer`, `retry`) tries the disk again: committed, the log is healthy
    /// again and `/readyz` with it, without a request to try it. (Page-cache durability's
    /// failed sync still refuses every record until a restart: `synced_through`.)
    fn next(&mut self, rx: &mut mpsc::Receiver<Pending>) -> Option<Pending> {
        let since = Instant::now();
        loop {
            if self.healthy.load(Ordering::Acquire) {
                return rx.blocking_recv();
            }
            match rx.try_recv() {
                Ok(pending) => return Some(pending),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if since.elapsed() >= RETRY_EVERY {
                let mut record = AuditRecord::system("audit.writer", "retry");
                record.decision = super::record::Decision::Error;
                record.detail = Some(serde_json::json!({
                    "retry": "the last commit failed; this record tries the disk again"
                }));
                // Nobody waits for it: the health flag says how it went.
                let (reply, _) = oneshot::channel();
                return Some(Pending {
                    record,
                    reply,
                    sync: true,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes whatever is queued, up to `max_batch`.
    fn drain(&self, rx: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
        while batch.len() < self.max_batch {
            match rx.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
    }

    /// Group commit sized to the load (PostgreSQL's `commit_delay` with `commit_siblings`).
    /// Each `fdatasync` costs about the same whatever it carries, so when records are arriving
    /// at two or more per `commit_window` and other requests are still on their way
    /// (`AuditLog::expect`), a commit waits, at most the window, for as many records as the
    /// arrival rate says the window brings, napping for as long as the missing ones should take
    /// (or, below saturation, until nothing is on its way any more) and looking again (until
    /// the window closes) if some are late. Saturated with large requests
    /// (`SATURATED_SIBLINGS` on their way, too few per window), it waits up to
    /// `SATURATED_WINDOWS` windows for `SATURATED_BATCH` records; saturated, it never waits for
    /// more than half of the requests in flight, so that the rest keep the core busy while the
    /// batch syncs. Under light load, or with nothing else coming, nobody waits. Page-cache
    /// mode waits only saturated, and then only within the window: it has no sync to share,
    /// but a commit per record (a `write` and the wake-ups on both sides) cost more of a
    /// saturated core than fsync mode's batches did.
    fn gather(&self, rx: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
        if self.commit_window.is_zero() {
            return;
        }
        let mut window = self.commit_window;
        let mut want = (self.arrival_rate * window.as_secs_f64()) as usize;
        let coming = self.coming.count.load(Ordering::Relaxed);
        let saturated = coming >= SATURATED_SIBLINGS;
        let fsync = self.durability == Durability::Fsync;
        if !fsync && !saturated {
            // Page-cache mode has no sync to share: a commit is one `write`, and waiting for
            // company only pays where the core is short of time. (In flight counts requests
            // still waiting on their datastore too: behind a slow one, a commit may nap up to
            // a window while the core has time. The wait is bounded by the window either way.)
            return;
        }
        if want < SATURATED_BATCH && saturated && fsync {
            // Many requests coming, but too slowly for the window (1,000-record pages at
            // saturation: about 600 a second). Waiting costs the waiting requests some latency
            // and the core nothing, while a sync per record or two cost 11-15% of the
            // throughput: wait, a few windows at most, for a few records.
            let needed = Duration::try_from_secs_f64(SATURATED_BATCH as f64 / self.arrival_rate)
                .unwrap_or(Duration::MAX);
            window = needed
                .min(self.commit_window * SATURATED_WINDOWS)
                .max(window);
            // Rounded: `needed` is the time for exactly `SATURATED_BATCH` at this rate.
            want = (self.arrival_rate * window.as_secs_f64()).round() as usize;
        }
        // Saturated, never wait for more than half of the requests in flight: the other half
        // keeps the core busy while this batch syncs. (Waiting for nearly all of them, 10-record
        // pages left the core idle for each `fdatasync`, 31% of the time.)
        if saturated {
            want = want.min((batch.len() + coming) / 2);
        }
        let want = want.min(self.max_batch);
        let deadline = Instant::now() + window;
        while batch.len() < want && self.coming.count.load(Ordering::Relaxed) > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // One nap for as long as the missing records should take (a nap per expected gap
            // was a wake-up and two context switches per record, 3% of a saturated core).
            let missing = (want - batch.len()) as f64;
            let nap = Duration::try_from_secs_f64(missing / self.arrival_rate)
                .unwrap_or(left)
                .max(GATHER_MIN_NAP)
                .min(left);
            if saturated {
                // The clients whose answers just went are about to send again: the forecast
                // holds even while none is in flight. (Woken then, commits carried 15 records
                // instead of 22 at 100-record pages.)
                std::thread::sleep(nap);
            } else {
                self.nap_while_coming(nap);
            }
            self.drain(rx, batch);
        }
    }

    /// Naps for `nap`, or until the last request on its way has queued its record: below
    /// saturation the rest of the forecast is of requests that have not arrived, and sleeping
    /// on held every record of the batch for most of a window (the fixed-rate p50 at 10-record
    /// pages was 3.4 ms, 1.1 ms woken).
    fn nap_while_coming(&self, nap: Duration) {
        let inflight = &self.coming;
        inflight.writer.get_or_init(std::thread::current);
        inflight.napping.store(true, Ordering::SeqCst);
        if inflight.count.load(Ordering::SeqCst) > 0 {
            // May return early (a wake-up meant for an earlier nap): the caller looks again.
            std::thread::park_timeout(nap);
        }
        inflight.napping.store(false, Ordering::Relaxed);
    }

    /// Writes one batch with a single write and a single sync, then answers every waiter.
    /// `commit_batch`, timed for `/readyz` (`Committing`): all of its disk work, the day's
    /// roll and the finishing of a full segment as well as the batch's write and sync.
    fn commit(&mut self, batch: Vec<Pending>) {
        self.committing.begin();
        self.commit_batch(batch);
        self.committing.end();
    }

    fn commit_batch(&mut self, batch: Vec<Pending>) {
        let mut buf = Vec::new();
        let mut waiting = Vec::with_capacity(batch.len());
        // A record of the batch that could not be sealed or encoded: the batch's success does
        // not make the log healthy again (`/readyz`), since requests are being refused.
        let mut refused = false;
        let mut sealed = false;
        let (mut seq, mut hash) = (self.next_seq, self.last_hash.clone());
        let sync = batch.iter().any(|p| p.sync);
        for Pending {
            mut record, reply, ..
        } in batch
        {
            // On disk the address is sealed; subscribers keep the plain one.
            let plain = match (&mut self.sealer, record.client_addr.take()) {
                (Some(sealer), Some(addr)) => {
                    let day = record.ts.get(..10).unwrap_or("0000-00-00").to_owned();
                    match sealer.seal(&addr, &day) {
                        Ok(text) => {
                            record.client_addr = Some(text);
                            sealed = true;
                            Some(addr)
                        }
                        Err(e) => {
                            self.seal_failed = Some(day);
                            let why = format!("client address cannot be sealed: {e}");
                            refused = true;
                            refuse(&self.healthy, reply, why);
                            continue;
                        }
                    }
                }
                (_, addr) => {
                    record.client_addr = addr;
                    None
                }
            };
            let encoded = encode_line(seq, &hash, &record);
            if plain.is_some() {
                record.client_addr = plain;
            }
            match encoded {
                Ok(line) => {
                    buf.extend_from_slice(&line.bytes);
                    waiting.push((reply, seq, record));
                    (seq, hash) = (seq + 1, line.hash);
                }
                Err(e) => {
                    refused = true;
                    refuse(
                        &self.healthy,
                        reply,
                        format!("record cannot be encoded: {e}"),
                    );
                }
            }
        }
        if waiting.is_empty() {
            return;
        }
        // A segment whose first record is a day old is finished before this batch, which
        // begins the next (`SEGMENT_MAX_AGE`). Opened first if a failed batch closed it: its
        // bytes past `len` are cut then (`ensure_open`), and a segment finished with them
        // would be sealed with records never acknowledged; if they cannot be cut yet, it is
        // not finished yet.
        if self.len > 0
            && self
                .finish_at
                .is_some_and(|at| std::time::SystemTime::now() >= at)
            && self.ensure_open().is_ok()
        {
            self.finish_segment();
        }
        let finish_at = (self.len == 0)
            .then(|| waiting.first().and_then(|(_, _, r)| a_day_after(&r.ts)))
            .flatten();
        let started = Instant::now();
        match self.write_batch(&buf, sync) {
            Ok(()) => {
                metrics::histogram!("wardgate_audit_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("wardgate_audit_batch_records").record(waiting.len() as f64);
                self.len += buf.len() as u64;
                if sync || self.durability == Durability::Fsync {
                    self.synced.store(seq - 1, Ordering::Release);
                }
                if finish_at.is_some() {
                    self.finish_at = finish_at;
                }
                *lock(&self.head) = Some(ChainHead {
                    seq: seq - 1,
                    hash: hash.clone(),
                    ts: waiting
                        .last()
                        .map(|(_, _, r)| r.ts.clone())
                        .unwrap_or_default(),
                });
                (self.next_seq, self.last_hash) = (seq, hash);
                // Half way through a segment, the next one's space is made ready: a log that
                // fills segments gets it in time, and one that never fills its first (tests,
                // quiet gateways) holds no disk for it.
                if let Some(preparer) = &self.preparer
                    && self.asked_to_prepare <= self.segment
                    && self.len >= self.segment_max_bytes / 2
                {
                    preparer.prepare(self.segment + 1);
                    self.asked_to_prepare = self.segment + 1;
                }
                // After a sealing failure, a batch that sealed nothing says nothing of the
                // sealer: the failed day's key is tried (the retry record carries no address,
                // and made the log ready again while every request was still refused).
                if !refused && let Some(failed) = &self.seal_failed {
                    let now = (waiting.last()).and_then(|(_, _, r)| r.ts.get(..10));
                    let works = sealed
                        || (self.sealer.as_mut()).is_some_and(|s| {
                            s.ready(failed).is_ok()
                                || now.is_some_and(|day| day != failed && s.ready(day).is_ok())
                        });
                    if works {
                        self.seal_failed = None;
                    }
                }
                if !refused
                    && self.seal_failed.is_none()
                    && !self.healthy.swap(true, Ordering::AcqRel)
                {
                    tracing::warn!(segment = self.segment, "audit log writable again");
                }
                let publish = self.published.receiver_count() > 0;
                for (reply, seq, record) in waiting {
                    // Published before its writer hears it is durable: whatever a request
                    // waited for is already on its way to breach detection, which shutdown
                    // stops only once every request has had its answer (`startup::run`).
                    if publish {
                        // Err only when nobody listens any more.
                        let _ = self.published.send(Arc::new(Logged { seq, record }));
                    }
                    let _ = reply.send(Ok(seq));
                }
                if self.len >= self.segment_max_bytes {
                    self.finish_segment();
                }
            }
            Err(e) => {
                metrics::counter!("wardgate_audit_failures_total").increment(waiting.len() as u64);
                self.discard_failed_batch();
                if self.healthy.swap(false, Ordering::AcqRel) {
                    tracing::error!(error = %e, segment = self.segment,
                        "audit log write failed; refusing audited requests until it recovers");
                } else {
                    tracing::debug!(error = %e, "audit log write failed again");
                }
                let why = e.to_string();
                for (reply, _, _) in waiting {
                    let _ = reply.send(Err(AuditError::Unavailable(why.clone())));
                }
            }
        }
    }

    /// Writes a batch at the end of the records, synced in `fsync` durability or when `sync`
    /// asks.
    fn write_batch(&mut self, buf: &[u8], sync: bool) -> io::Result<()> {
        if let Some(why) = &self.sync_failed {
            return Err(io::Error::other(format!(
                "a sync of the audit log failed ({why}) in page-cache durability: records \
                 acknowledged before it may not be on disk; restart wardgate once the disk is \
                 sound, after `wardgate audit verify --dir DIR`"
            )));
        }
        let fsync = sync || self.durability == Durability::Fsync;
        let at = self.len;
        let file = self.ensure_open()?;
        // At the end of the records: into made-ready space, or growing the file.
        file.write_all_at(buf, at)?;
        if fsync {
            if let Err(e) = sync_data(file) {
                // In fsync durability every acknowledged batch was synced, and this one is
                // cut and written again; in page-cache durability, those before it may be
                // lost with it. (A directory's sync failing loses nothing a power cut would
                // not, which page-cache durability does not claim to survive: its batch
                // alone is refused, below.)
                if self.durability == Durability::PageCache {
                    self.latch_sync_failure(&e, "since the last sync");
                }
                return Err(e);
            }
            if self.dir_dirty {
                sync_dir(&self.dir)?;
                self.dir_dirty = false;
            }
        }
        Ok(())
    }

    /// Finishes the current segment: the next batch begins the next. Lazily: the new file is
    /// created by the next batch, so a roll costs nothing until there is something to write.
    /// The finished segment is sealed off the writer thread: sealing reads it once, and
    /// appends must not wait for that. Its made-ready space goes first, so that a finished
    /// segment at rest is its records alone (readers stop at the zeros either way).
    fn finish_segment(&mut self) {
        if let Err(e) = self.release_preallocated() {
            tracing::warn!(error = %e, segment = self.segment,
                "cannot release a finished audit segment's made-ready space");
        }
        // In page-cache durability a finished segment is synced once, as it is left: a
        // later synced record (in the next segment) vouches for every record before it
        // (`synced_through`), and a failed writeback of this one's must show here.
        if self.durability == Durability::PageCache
            && let Some(file) = &self.file
            && let Err(e) = sync_data(file)
        {
            self.latch_sync_failure(&e, "in this finished segment");
        }
        self.seal_queue.push(self.segment);
        self.file = None;
        (self.segment, self.len, self.dir_dirty) = (self.segment + 1, 0, true);
        self.finish_at = None;
    }

    /// A sync failed in page-cache durability: the records `acknowledged` there may not be on
    /// disk, and nothing more is written until restart (`sync_failed`).
    fn latch_sync_failure(&mut self, e: &io::Error, acknowledged: &str) {
        tracing::error!(error = %e, segment = self.segment,
            "a sync of the audit log failed in page-cache durability: records acknowledged \
             {acknowledged} may not be on disk; refusing audited requests until restarted");
        self.sync_failed = Some(e.to_string());
    }

    /// Makes a failed batch count as never written, so the chain continues from the last
    /// acknowledged record. (The segment's made-ready space goes with it: the batch may have
    /// left bytes in it, and the rest of the segment is grown as it is written.)
    fn discard_failed_batch(&mut self) {
        self.preallocated = false;
        if let Some(file) = self.file.take()
            && let Err(e) = file.set_len(self.len)
        {
            // `ensure_open` retries the truncation before anything else is written.
            tracing::debug!(error = %e, "cannot truncate a failed audit batch yet");
        }
    }

    /// Cuts the current segment back to its records where it still holds made-ready space,
    /// durably. (Where that fails the zeros stay, and every reader stops at them.)
    fn release_preallocated(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.preallocated) {
            return Ok(());
        }
        if let Some(file) = &self.file {
            file.set_len(self.len)?;
            file.sync_all()?;
        }
        Ok(())
    }

    fn ensure_open(&mut self) -> io::Result<&mut File> {
        if let Some(ref mut file) = self.file {
            return Ok(file);
        }
        let path = self.dir.join(segment_name(self.segment));
        // A segment about to be begun takes the space made ready for it, if there is some,
        // and the rename is made durable before anything is written over it: a write over
        // existing blocks does not make `fdatasync` commit the directory, and a rename lost
        // in a crash would leave records in a file under the made-ready name.
        let new = self.len == 0 && !path.exists();
        let adopted = match prepare::ready(&self.dir, self.segment) {
            Some(ready) if new && self.preparer.is_some() => {
                std::fs::rename(&ready, &path)?;
                self.dir_dirty = true;
                sync_dir(&self.dir)?;
                self.dir_dirty = false;
                true
            }
            _ => false,
        };
        if new && self.segment > 1 {
            // Made ready for the segment before, too late for it (the roll came first).
            prepare::discard(&self.dir, self.segment - 1);
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)?;
        let actual = file.metadata()?.len();
        if adopted {
            self.preallocated = true;
        } else if actual > self.len {
            file.set_len(self.len)?;
        } else if actual < self.len {
            // Appending now would hide the loss behind a valid-looking chain.
            return Err(io::Error::other(format!(
                "`{}` is shorter than its acknowledged records ({actual} < {} bytes)",
                path.display(),
                self.len
            )));
        }
        Ok(self.file.insert(file))
    }

    fn sync_all(&mut self) -> io::Result<()> {
        if let Some(file) = &self.file {
            file.sync_data()?;
        }
        sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::tests::sample;
    use crate::audit::segment::list_segments;
    use crate::audit::verify_dir;
    use std::io::Write;
    use std::path::Path;

    fn settings(dir: &Path, durability: Durability, segment_max_bytes: u64) -> AuditSettings {
        AuditSettings {
            dir: dir.to_owned(),
            durability,
            max_batch: 64,
            commit_window: Duration::ZERO,
            segment_max_bytes,
            seal_client_addr: false,
        }
    }

    /// Today's client-address key is read (or made) at open: a damaged one stops the open,
    /// naming the key folder, rather than every request that carries an address after it.
    #[tokio::test]
    async fn a_damaged_address_key_stops_the_open() {
        let open = |dir: &Path| {
            let mut s = settings(dir, Durability::Fsync, 1 << 20);
            s.seal_client_addr = true;
            AuditLog::open(s)
        };
        // Today's, or a day either side should the day turn while the test runs.
        let days = || {
            let now = time::OffsetDateTime::now_utc();
            let day = time::Duration::days(1);
            [now - day, now, now + day].map(|t| AuditRecord::ts_of(t)[..10].to_owned())
        };
        let keys = |dir: &Path| days().map(|d| dir.join("addr-keys").join(format!("{d}.key")));
        let made = tempfile::tempdir().unwrap();
        let log = open(made.path()).unwrap();
        assert!(keys(made.path()).iter().any(|k| k.exists()), "made at open");
        log.shutdown().await;
        let damaged = tempfile::tempdir().unwrap();
        std::fs::create_dir(damaged.path().join("addr-keys")).unwrap();
        for key in keys(damaged.path()) {
            std::fs::write(key, b"short").unwrap();
        }
        let err = format!("{:#}", open(damaged.path()).err().unwrap());
        assert!(
            err.contains("client-address key") && err.contains("addr-keys"),
            "{err}"
        );
    }

    /// Segments (by inode) whose next sync fails (`sync_data`).
    static FAILING: Mutex<Vec<u64>> = Mutex::new(Vec::new());

    fn fail_next_sync(path: &Path) {
        use std::os::unix::fs::MetadataExt;
        lock(&FAILING).push(std::fs::metadata(path).unwrap().ino());
    }

    /// Segments (by inode) whose next sync takes this long first (`sync_data`), as a disk
    /// retrying would.
    static STALLING: Mutex<Vec<(u64, Duration)>> = Mutex::new(Vec::new());

    fn stall_next_sync(path: &Path, how_long: Duration) {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(path).unwrap().ino();
        lock(&STALLING).push((ino, how_long));
    }

    pub(super) fn stalling_sync(file: &File) {
        use std::os::unix::fs::MetadataExt;
        let Ok(ino) = file.metadata().map(|m| m.ino()) else {
            return;
        };
        let stall = {
            let mut stalling = lock(&STALLING);
            let at = stalling.iter().position(|(i, _)| *i == ino);
            at.map(|at| stalling.remove(at).1)
        };
        if let Some(how_long) = stall {
            std::thread::sleep(how_long);
        }
    }

    /// A commit that does not end (the disk retrying) makes the log unhealthy for `/readyz`
    /// once it is older than `STALLED_AFTER`, and healthy again when it ends.
    #[tokio::test]
    async fn a_commit_that_does_not_end_is_a_stalled_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 1 << 20)).unwrap();
        log.append(sample(1)).await.unwrap();
        assert!(log.is_healthy());
        stall_next_sync(
            &dir.path().join(segment_name(1)),
            STALLED_AFTER + Duration::from_secs(2),
        );
        let ack = log.submit(sample(2)).await.unwrap();
        let waited = tokio::time::timeout(STALLED_AFTER, ack.durable()).await;
        assert!(waited.is_err(), "the commit stalled");
        let deadline = Instant::now() + Duration::from_secs(1);
        while log.is_healthy() {
            assert!(
                Instant::now() < deadline,
                "a stalled log still says it is healthy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The commit ends: the record is durable and the log healthy again.
        let later = log.append(sample(3)).await.unwrap();
        assert_eq!(later, 3);
        assert!(log.is_healthy());
    }

    /// So does the finishing of a full segment, after its batch was acknowledged (in
    /// page-cache durability its one sync): the writer is as stuck there as in a commit.
    #[tokio::test]
    async fn a_segment_whose_finishing_does_not_end_is_a_stalled_log() {
        let dir = tempfile::tempdir().unwrap();
        // Every record fills its segment.
        let log = AuditLog::open(settings(dir.path(), Durability::PageCache, 1)).unwrap();
        stall_next_sync(
            &dir.path().join(segment_name(1)),
            STALLED_AFTER + Duration::from_secs(2),
        );
        log.append(sample(1)).await.unwrap();
        let deadline = Instant::now() + STALLED_AFTER + Duration::from_secs(1);
        while log.is_healthy() {
            assert!(
                Instant::now() < deadline,
                "a stalled log still says it is healthy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.is_healthy() {
            assert!(
                Instant::now() < deadline,
                "healthy again once the sync ends"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) fn failing_sync(file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(ino) = file.metadata().map(|m| m.ino()) else {
            return false;
        };
        let mut failing = lock(&FAILING);
        let before = failing.len();
        failing.retain(|i| *i != ino);
        failing.len() < before
    }

    fn lines(dir: &Path) -> Vec<String> {
        let mut all = Vec::new();
        for (_, path) in list_segments(dir).unwrap() {
            let text = std::fs::read_to_string(path).unwrap();
            // Up to made-ready space, if the segment has some.
            let written = text.split('\0').next().unwrap_or_default();
            all.extend(written.lines().map(str::to_owned));
        }
        all
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_form_one_gapless_chain() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).unwrap();
        assert!(log.is_healthy());
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(sample(i)).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        log.shutdown().await;
        assert_eq!(lines(dir.path()).len(), 200);
        let report = verify_dir(dir.path()).unwrap();
        assert_eq!(
            (report.segments, report.records, report.last_seq),
            (1, 200, 200)
        );
        assert!(matches!(
            log.append(sample(0)).await,
            Err(AuditError::Closed)
        ));
    }

    fn pending(i: u64) -> Pending {
        Pending {
            record: sample(i),
            reply: oneshot::channel().0,
            sync: false,
        }
    }

    /// A writer with `arrival_rate` records per second behind it, and a feeder thread that
    /// queues `later` records, 5 ms apart, once `gather` has started waiting; `siblings`: how
    /// many other requests say records are coming until the feeder is done.
    fn gathered(durability: Durability, arrival_rate: f64, later: u64, siblings: usize) -> usize {
        gathered_with(durability, arrival_rate, 1, later, siblings)
    }

    /// `gathered` with `in_hand` records already in the batch when `gather` starts.
    fn gathered_with(
        durability: Durability,
        arrival_rate: f64,
        in_hand: u64,
        later: u64,
        siblings: usize,
    ) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), durability, 64 << 20);
        s.commit_window = Duration::from_secs(1);
        let published = broadcast::channel(16).0;
        let mut writer = Writer::open(s, Arc::new(AtomicBool::new(true)), published).unwrap();
        writer.arrival_rate = arrival_rate;
        // Others on their way until the feeder has queued its records.
        let others: Vec<Coming> = (0..siblings).map(|_| Coming::new(&writer.coming)).collect();
        let (tx, mut rx) = mpsc::channel(16);
        let feeder = std::thread::spawn(move || {
            for i in 0..later {
                std::thread::sleep(Duration::from_millis(5));
                tx.blocking_send(pending(in_hand + i + 1)).unwrap();
            }
            drop(others);
        });
        let mut batch: Vec<Pending> = (1..=in_hand).map(pending).collect();
        writer.gather(&mut rx, &mut batch);
        feeder.join().unwrap();
        batch.len()
    }

    #[test]
    fn a_commit_under_load_waits_for_the_records_the_rate_says_are_coming() {
        // Four records per second over a 1 s window: four expected, the one in hand and three
        // that arrive while it waits (it stops once they are in, not at the deadline).
        assert_eq!(gathered(Durability::Fsync, 4.0, 3, 1), 4);
        // Under two records per window nobody waits: the later records go in the next commit.
        assert_eq!(gathered(Durability::Fsync, 1.5, 3, 1), 1);
        // Nor with no other request on its way, whatever the rate.
        assert_eq!(gathered(Durability::Fsync, 4.0, 3, 0), 1);
        // But with many requests on their way it waits, up to four windows, for a few records
        // even below two per window: here the three that come (then nothing else is coming).
        assert_eq!(gathered(Durability::Fsync, 1.5, 3, SATURATED_SIBLINGS), 4);
        // Saturated, it waits for half of the requests in flight at most: with twenty in hand
        // and twenty more coming it does not wait, though the rate says forty are due in the
        // window (the records that come are left for the next commit).
        assert_eq!(gathered_with(Durability::Fsync, 40.0, 20, 5, 20), 20);
        // Below that it waits as before: with eighteen in hand and twenty coming, for the
        // nineteenth at least.
        assert!(gathered_with(Durability::Fsync, 40.0, 18, 5, 20) >= 19);
        // Page-cache mode has no fsync to share: it does not wait below saturation...
        assert_eq!(gathered(Durability::PageCache, 4.0, 3, 1), 1);
        // ...nor past the window for a few records, saturated, as fsync mode does...
        assert_eq!(
            gathered(Durability::PageCache, 1.5, 3, SATURATED_SIBLINGS),
            1
        );
        // ...but saturated, within the window, it waits as fsync mode does.
        assert_eq!(
            gathered(Durability::PageCache, 4.0, 3, SATURATED_SIBLINGS),
            4
        );
    }

    #[test]
    fn a_commit_stops_waiting_once_nothing_is_on_its_way() {
        // One record a second over a one-minute window: sixty expected, so the commit naps for
        // the fifty-nine missing, with one other request on its way. Once that one has handed
        // in its record nothing else is coming, and the commit goes with the two instead of
        // sleeping out the minute (before, every record of a batch below saturation waited
        // for requests that had not arrived).
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), Durability::Fsync, 64 << 20);
        s.commit_window = Duration::from_secs(60);
        let published = broadcast::channel(16).0;
        let mut writer = Writer::open(s, Arc::new(AtomicBool::new(true)), published).unwrap();
        writer.arrival_rate = 1.0;
        let inflight = Arc::clone(&writer.coming);
        let other = Coming::new(&inflight);
        let (tx, mut rx) = mpsc::channel(16);
        let (gathered, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut batch = vec![pending(1)];
            writer.gather(&mut rx, &mut batch);
            gathered.send(batch.len()).unwrap();
        });
        while !inflight.napping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        tx.blocking_send(pending(2)).unwrap();
        drop(other);
        // A bound on liveness, not a timing: the wake-up takes microseconds, the nap a minute.
        assert_eq!(done.recv_timeout(Duration::from_secs(20)), Ok(2));
        drop(tx);
    }

    #[tokio::test]
    async fn a_second_writer_on_the_same_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).unwrap();
        let second = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20));
        assert!(second.unwrap_err().to_string().contains("in use"));
        first.shutdown().await;
        assert!(AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).is_ok());
    }

    #[tokio::test]
    async fn reopen_continues_the_chain_and_repairs_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).unwrap();
        for i in 1..=3 {
            assert_eq!(log.append(sample(i)).await.unwrap(), i);
        }
        let before = verify_dir(dir.path()).unwrap();
        log.shutdown().await;
        drop(log);
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).unwrap();
        assert_eq!(log.append(sample(4)).await.unwrap(), 4);
        log.shutdown().await;
        let fourth: serde_json::Value = serde_json::from_str(&lines(dir.path())[3]).unwrap();
        assert_eq!(fourth["prev"], before.last_hash.as_str());

        // A crash in the middle of `write(2)` leaves a line without its newline.
        let path = dir.path().join(segment_name(1));
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"seq":5,"prev":"00"#).unwrap();
        drop(file);
        assert!(verify_dir(dir.path()).unwrap().torn_tail);
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).unwrap();
        assert_eq!(log.append(sample(5)).await.unwrap(), 5);
        log.shutdown().await;
        assert_eq!(verify_dir(dir.path()).unwrap().records, 5);
    }

    /// A log of three records in its first segment whose second and third records' first
    /// bytes are then zeroed (the third's line survives after the zeros): the segment as it
    /// was, as it is, and where the zeros begin.
    async fn three_records_then_a_zero_page(dir: &Path) -> (Vec<u8>, Vec<u8>, usize) {
        let log = AuditLog::open(settings(dir, Durability::Fsync, 64 << 20)).unwrap();
        for i in 1..=3 {
            log.append(sample(i)).await.unwrap();
        }
        log.shutdown().await;
        drop(log);
        let path = dir.join(segment_name(1));
        let text = std::fs::read(&path).unwrap();
        let second = text.iter().position(|b| *b == b'\n').unwrap() + 1;
        let mut damaged = text.clone();
        damaged[second..second + 40].fill(0);
        std::fs::write(&path, &damaged).unwrap();
        (text, damaged, second)
    }

    /// Records after a zero page (acknowledged ones damaged, or a torn batch's) are cut at the
    /// next start and kept aside, and the chain says so: the first record the log then takes
    /// names the segment, the bytes and the whole lines cut, and where they were kept.
    #[tokio::test]
    async fn a_recovery_cut_is_the_first_record_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (text, damaged, second) = three_records_then_a_zero_page(dir.path()).await;

        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).unwrap();
        log.append(sample(9)).await.unwrap();
        log.shutdown().await;
        let kept: Vec<serde_json::Value> = lines(dir.path())
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(kept.len(), 3, "{kept:?}");
        let cut = &kept[1];
        assert_eq!(cut["seq"], 2);
        assert_eq!(cut["reason"], "segment_cut");
        assert_eq!(cut["route"], "audit.recovery");
        assert_eq!(cut["decision"], "error");
        assert_eq!(cut["detail"]["segment"], segment_name(1));
        assert_eq!(cut["detail"]["from_byte"], second);
        assert_eq!(cut["detail"]["bytes"], text.len() - second);
        assert_eq!(cut["detail"]["whole_lines"], 2);
        let aside = dir
            .path()
            .join(cut["detail"]["kept_aside"].as_str().unwrap());
        assert_eq!(std::fs::read(&aside).unwrap(), &damaged[second..]);
        assert_eq!(verify_dir(dir.path()).unwrap().records, 3);
        // Recorded, its note is gone: the next start records nothing more.
        let mut note = aside.into_os_string();
        note.push(".pending");
        assert!(!std::path::Path::new(&note).exists());
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).unwrap();
        log.shutdown().await;
        assert_eq!(lines(dir.path()).len(), 3);
    }

    /// A start that noted a cut and stopped before making it: the next start makes it and
    /// records it once, from that note, keeping no second copy.
    #[tokio::test]
    async fn a_cut_noted_but_not_made_is_made_and_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_, text, second) = three_records_then_a_zero_page(dir.path()).await;
        let copy = format!("{}.cut-1700000000", segment_name(1));
        std::fs::write(dir.path().join(&copy), &text[second..]).unwrap();
        let said = serde_json::json!({
            "segment": segment_name(1), "from_byte": second, "bytes": text.len() - second,
            "whole_lines": 2, "kept_aside": copy,
        });
        let note = dir.path().join(format!("{copy}.pending"));
        std::fs::write(&note, said.to_string()).unwrap();

        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 64 << 20)).unwrap();
        log.shutdown().await;
        let kept: Vec<serde_json::Value> = lines(dir.path())
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert_eq!(kept[1]["detail"], said);
        let copies = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().contains(".cut-")
            })
            .count();
        assert_eq!(copies, 1, "one copy, no note left");
        assert_eq!(verify_dir(dir.path()).unwrap().records, 2);
    }

    /// A start that cut a segment and failed before recording it leaves its note: the next
    /// start records the cut then, first, and removes the note.
    #[tokio::test]
    async fn a_cut_not_yet_recorded_is_recorded_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Durability::PageCache, 64 << 20)).unwrap();
        log.append(sample(1)).await.unwrap();
        log.shutdown().await;
        drop(log);
        let note = dir
            .path()
            .join(format!("{}.cut-1700000000.pending", segment_name(1)));
        let said = serde_json::json!({
            "segment": segment_name(1), "from_byte": 400, "bytes": 900, "whole_lines": 2,
            "kept_aside": format!("{}.cut-1700000000", segment_name(1)),
        });
        std::fs::write(&note, said.to_string()).unwrap();
        let log = AuditLog::open(settings(dir.path(), Durability::PageCache, 64 << 20)).unwrap();
        log.append(sample(2)).await.unwrap();
        log.shutdown().await;
        let kept: Vec<serde_json::Value> = lines(dir.path())
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[1]["reason"], "segment_cut");
        assert_eq!(kept[1]["detail"], said);
        assert!(!note.exists());
        // A note that says nothing readable stops the start, naming it.
        std::fs::write(&note, "{").unwrap();
        let e = AuditLog::open(settings(dir.path(), Durability::PageCache, 64 << 20))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains(".pending"), "{e:#}");
    }

    #[tokio::test]
    async fn rolling_spreads_the_chain_over_segments() {
        let dir = tempfile::tempdir().unwrap();
        // One at a time, so batches stay small and several segments fill up.
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 2000)).unwrap();
        for i in 1..=40 {
            log.append(sample(i)).await.unwrap();
        }
        log.shutdown().await;
        let report = verify_dir(dir.path()).unwrap();
        assert!(report.segments > 2, "{report:?}");
        assert_eq!(report.records, 40);

        // A restart lands in the newest segment (or a fresh one) and keeps the chain.
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 2000)).unwrap();
        assert_eq!(log.append(sample(41)).await.unwrap(), 41);
        log.shutdown().await;
        assert_eq!(verify_dir(dir.path()).unwrap().last_seq, 41);
    }

    /// Under fsync durability the next segment's space is made ready (zero bytes, synced) while
    /// the current one fills and is taken at the roll. Every reader stops where the records
    /// end, a finished segment is cut back to its records, and a stop that left made-ready
    /// space, even with a torn batch in it, resumes the chain where the acknowledged records end.
    #[tokio::test]
    async fn made_ready_space_is_taken_at_the_roll_and_never_read_as_records() {
        let dir = tempfile::tempdir().unwrap();
        let max = 4_000;
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, max)).unwrap();
        let seg = |dir: &Path, n| dir.join(segment_name(n));
        let size = |path: PathBuf| std::fs::metadata(path).map_or(0, |m| m.len());
        let mut seq = 0;
        while size(seg(dir.path(), 1)) < max / 2 {
            seq += 1;
            log.append(sample(seq)).await.unwrap();
        }
        // Asked for once the first segment is half full; made on its own thread.
        let asked = Instant::now();
        while prepare::ready(dir.path(), 2).is_none() {
            assert!(
                asked.elapsed() < Duration::from_secs(30),
                "no space made ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while !seg(dir.path(), 2).exists() {
            seq += 1;
            log.append(sample(seq)).await.unwrap();
        }
        seq += 1;
        log.append(sample(seq)).await.unwrap();
        assert!(
            prepare::ready(dir.path(), 2).is_none(),
            "renamed, not copied"
        );
        assert!(
            size(seg(dir.path(), 2)) > max,
            "segment 2 is written over its made-ready space"
        );
        let finished = std::fs::read(seg(dir.path(), 1)).unwrap();
        assert!(!finished.contains(&0) && finished.ends_with(b"\n"));

        let report = verify_dir(dir.path()).unwrap();
        assert_eq!((report.records, report.torn_tail), (seq, false));
        // The newest segment has no index: the lookup reads it line by line.
        let (found, _) =
            crate::audit::reader::records_mentioning(dir.path(), &format!("subj-{seq}")).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["seq"], seq);
        assert_eq!(lines(dir.path()).len() as u64, seq);

        // The log as a stop leaves it, with a batch never acknowledged torn over the space: its
        // first line cut short, then, past a zero page, a whole line of it.
        let crashed = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                // The sealing thread's temporary files come and go meanwhile.
                match std::fs::copy(entry.path(), crashed.path().join(entry.file_name())) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    copied => {
                        copied.unwrap();
                    }
                }
            }
        }
        let path = seg(crashed.path(), 2);
        let mut bytes = std::fs::read(&path).unwrap();
        let end = bytes.iter().position(|&b| b == 0).unwrap();
        let torn = encode_line(seq + 1, "00", &sample(seq + 1)).unwrap().bytes;
        bytes[end..end + 20].copy_from_slice(&torn[..20]);
        let later = (end / 4096 + 2) * 4096;
        bytes.resize(bytes.len().max(later + torn.len() + 10), 0);
        bytes[later..later + torn.len()].copy_from_slice(&torn);
        std::fs::write(&path, &bytes).unwrap();
        let err = verify_dir(crashed.path()).unwrap_err();
        assert!(err.to_string().contains("zero"), "{err}");
        let reopened = AuditLog::open(settings(crashed.path(), Durability::Fsync, max)).unwrap();
        // The cut is the first record after it (one whole line of the torn batch was cut).
        assert_eq!(reopened.append(sample(seq + 1)).await.unwrap(), seq + 2);
        reopened.shutdown().await;
        assert_eq!(verify_dir(crashed.path()).unwrap().records, seq + 2);
        let cut: serde_json::Value =
            serde_json::from_str(&lines(crashed.path())[seq as usize]).unwrap();
        assert_eq!(cut["reason"], "segment_cut");
        assert_eq!(cut["detail"]["whole_lines"], 1);

        // A clean stop releases the space too.
        log.shutdown().await;
        let current = std::fs::read(seg(dir.path(), 2)).unwrap();
        assert!(!current.contains(&0) && current.ends_with(b"\n"));
        assert_eq!(verify_dir(dir.path()).unwrap().records, seq);
    }

    /// Space made ready by an earlier run is never taken: a stop can leave records in it (a
    /// rename to the segment's name that did not reach the disk), and the segment begun after
    /// the start must hold its own records only.
    #[tokio::test]
    async fn made_ready_space_left_by_an_earlier_run_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let max = 2_000;
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, max)).unwrap();
        let mut seq = 0;
        while std::fs::metadata(dir.path().join(segment_name(1))).map_or(0, |m| m.len()) < max {
            seq += 1;
            log.append(sample(seq)).await.unwrap();
        }
        log.shutdown().await;
        drop(log);
        let head = verify_dir(dir.path()).unwrap();
        let lost = encode_line(seq + 1, &head.last_hash, &sample(seq + 1)).unwrap();
        let lost2 = encode_line(seq + 2, &lost.hash, &sample(seq + 2)).unwrap();
        let mut stale = [lost.bytes, lost2.bytes].concat();
        stale.resize(3 * max as usize, 0);
        let prepared = dir.path().join(crate::audit::segment::prepared_name(2));
        std::fs::write(&prepared, &stale).unwrap();

        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, max)).unwrap();
        assert!(!prepared.exists());
        let mut record = sample(seq + 1);
        record.path = "/after/the/restart".into();
        assert_eq!(log.append(record).await.unwrap(), seq + 1);
        // Before the stop, which would cut made-ready space back to the records.
        let second = std::fs::read_to_string(dir.path().join(segment_name(2))).unwrap();
        assert_eq!(second.lines().count(), 1, "{second}");
        assert!(second.contains("/after/the/restart") && !second.contains('\0'));
        log.shutdown().await;
        assert_eq!(verify_dir(dir.path()).unwrap().records, seq + 1);
    }

    #[tokio::test]
    async fn page_cache_mode_writes_the_same_format() {
        let (fast, safe) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let records: Vec<_> = (1..=5).map(sample).collect();
        for (dir, durability) in [(&fast, Durability::PageCache), (&safe, Durability::Fsync)] {
            let log = AuditLog::open(settings(dir.path(), durability, 64 << 20)).unwrap();
            for record in &records {
                log.append(record.clone()).await.unwrap();
            }
            log.shutdown().await;
        }
        assert_eq!(verify_dir(fast.path()).unwrap().records, 5);
        assert_eq!(lines(fast.path()), lines(safe.path()));
    }

    /// A sync that fails in page-cache durability refuses every batch after it until the
    /// log is opened again: the records acknowledged before it were written and not synced,
    /// and a failed writeback may have lost them (Linux marks such pages clean and reports
    /// the error once), so a sync that then succeeds must not vouch for them
    /// (`synced_through`). In fsync durability every acknowledged record was synced: the
    /// failed batch alone is refused, and the log goes on.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_failed_sync_in_page_cache_durability_refuses_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let segment = dir.path().join(segment_name(1));
        let log = AuditLog::open(settings(dir.path(), Durability::PageCache, 1 << 20)).unwrap();
        assert_eq!(log.append(sample(1)).await.unwrap(), 1);
        assert_eq!(log.append(sample(2)).await.unwrap(), 2);
        fail_next_sync(&segment);
        let err = log.append_synced(sample(3)).await.unwrap_err();
        assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
        // The disk answers again, and a sync would succeed.
        for i in 4..=5 {
            let err = log.append_synced(sample(i)).await.unwrap_err();
            assert!(
                matches!(&err, AuditError::Unavailable(why) if why.contains("restart")),
                "{err:?}"
            );
            let err = log.append(sample(i)).await.unwrap_err();
            assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
            assert!(!log.is_healthy());
        }
        assert_eq!(log.synced_through(), 0);
        log.shutdown().await;
        let log = AuditLog::open(settings(dir.path(), Durability::PageCache, 1 << 20)).unwrap();
        assert_eq!(log.append_synced(sample(6)).await.unwrap(), 3);
        assert!(log.is_healthy());
        log.shutdown().await;
        assert_eq!(verify_dir(dir.path()).unwrap().records, 3);

        // So with a finished segment's sync (one a segment, as it is left): the next segment's
        // synced records would vouch for it.
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Durability::PageCache, 1 << 20)).unwrap();
        assert_eq!(log.append(sample(1)).await.unwrap(), 1);
        log.shutdown().await;
        // Reopened with segments a byte longer than the first holds: the next record
        // finishes it.
        let first = dir.path().join(segment_name(1));
        let size = std::fs::metadata(&first).unwrap().len() + 1;
        let log = AuditLog::open(settings(dir.path(), Durability::PageCache, size)).unwrap();
        fail_next_sync(&first);
        assert_eq!(log.append(sample(2)).await.unwrap(), 2);
        let err = log.append_synced(sample(3)).await.unwrap_err();
        assert!(
            matches!(&err, AuditError::Unavailable(why) if why.contains("restart")),
            "{err:?}"
        );
        assert_eq!(log.synced_through(), 0);
        log.shutdown().await;

        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 1 << 20)).unwrap();
        assert_eq!(log.append(sample(1)).await.unwrap(), 1);
        fail_next_sync(&dir.path().join(segment_name(1)));
        let err = log.append(sample(2)).await.unwrap_err();
        assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
        assert_eq!(log.append(sample(3)).await.unwrap(), 2);
        assert!(log.is_healthy());
        log.shutdown().await;
        assert_eq!(verify_dir(dir.path()).unwrap().records, 2);
    }

    /// A segment that cannot be written must refuse the batch, leave no trace of it in the
    /// chain, and recover on its own once the path is writable again.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn write_failure_refuses_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        // One record per segment, so every append opens the next segment by path.
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 1)).unwrap();
        assert_eq!(log.append(sample(1)).await.unwrap(), 1);
        let next = dir.path().join(segment_name(2));
        std::os::unix::fs::symlink("/dev/full", &next).unwrap();

        for i in 2..=3 {
            let err = log.append(sample(i)).await.unwrap_err();
            assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
            assert!(!log.is_healthy());
        }

        std::fs::remove_file(&next).unwrap();
        assert_eq!(log.append(sample(4)).await.unwrap(), 2);
        assert!(log.is_healthy());
        assert_eq!(log.append(sample(5)).await.unwrap(), 3);
        log.shutdown().await;
        let report = verify_dir(dir.path()).unwrap();
        assert_eq!((report.records, report.last_seq), (3, 3));
        assert!(!lines(dir.path()).iter().any(|l| l.contains("req-2")));
    }

    /// A log made unhealthy because a client address could not be sealed (the day's key
    /// cannot be made: its folder unwritable, the disk full) stays unhealthy while that goes
    /// on, though its own retry records, which carry no address, are written: it was made
    /// ready again by them, and every request was refused once the load balancer sent them
    /// back. Once the key can be made, the retry makes it healthy by itself.
    #[tokio::test]
    async fn a_log_that_cannot_seal_addresses_stays_unhealthy_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), Durability::Fsync, 1 << 20);
        s.seal_client_addr = true;
        let log = AuditLog::open(s).unwrap();
        assert_eq!(log.append(sample(1)).await.unwrap(), 1);
        // Another day's record, whose key the sealer now holds in place of today's...
        let mut other_day = sample(2);
        other_day.ts = "2099-01-01T00:00:00.000Z".into();
        assert_eq!(log.append(other_day).await.unwrap(), 2);
        // ... and a key folder that cannot be read: today's key cannot be had.
        let keys = dir.path().join("addr-keys");
        let aside = dir.path().join("addr-keys.aside");
        std::fs::rename(&keys, &aside).unwrap();
        std::fs::write(&keys, b"not a folder").unwrap();
        let err = log.append(sample(3)).await.err().unwrap();
        assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
        assert!(!log.is_healthy());
        tokio::time::sleep(RETRY_EVERY * 2 + Duration::from_secs(1)).await;
        assert!(
            lines(dir.path())
                .iter()
                .any(|l| l.contains(r#""reason":"retry""#)),
            "the retries were written"
        );
        assert!(
            !log.is_healthy(),
            "ready again while addresses cannot be sealed"
        );

        std::fs::remove_file(&keys).unwrap();
        std::fs::rename(&aside, &keys).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !log.is_healthy() {
            assert!(Instant::now() < deadline, "never healthy again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(log.append(sample(4)).await.is_ok());
        log.shutdown().await;
        assert!(verify_dir(dir.path()).is_ok());
    }

    /// A key that cannot be had for one day (its file damaged) holds the log unready only
    /// while records are stamped that day: the retry, stamped with another, makes it healthy
    /// once that day's key can be had, rather than until a restart.
    #[tokio::test]
    async fn a_day_whose_key_failed_does_not_hold_the_log_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), Durability::Fsync, 1 << 20);
        s.seal_client_addr = true;
        let log = AuditLog::open(s).unwrap();
        assert_eq!(log.append(sample(1)).await.unwrap(), 1);
        std::fs::create_dir(dir.path().join("addr-keys").join("2099-01-01.key")).unwrap();
        let mut record = sample(2);
        record.ts = "2099-01-01T00:00:00.000Z".into();
        assert!(log.append(record).await.is_err());
        assert!(!log.is_healthy());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !log.is_healthy() {
            assert!(
                Instant::now() < deadline,
                "held unready by another day's key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(log.append(sample(3)).await.is_ok());
        log.shutdown().await;
    }

    /// A log made unhealthy by a failed write is healthy again by itself once the disk is,
    /// with no record asked for: a replica out of its load balancer's rotation (its `/readyz`
    /// failing) is sent none. Its own retry record says why it was written.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_failed_log_retries_by_itself_without_traffic() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Durability::Fsync, 1)).unwrap();
        assert_eq!(log.append(sample(1)).await.unwrap(), 1);
        let next = dir.path().join(segment_name(2));
        std::os::unix::fs::symlink("/dev/full", &next).unwrap();
        assert!(log.append(sample(2)).await.is_err());
        assert!(!log.is_healthy());
        // Still failing: the retries fail too, and nothing is acknowledged.
        tokio::time::sleep(RETRY_EVERY * 3).await;
        assert!(!log.is_healthy());
        std::fs::remove_file(&next).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !log.is_healthy() {
            assert!(
                Instant::now() < deadline,
                "never healthy again without traffic"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(log.append(sample(3)).await.unwrap(), 3);
        log.shutdown().await;
        let written = lines(dir.path());
        assert!(
            written.iter().any(|l| l.contains(r#""reason":"retry""#)),
            "{written:?}"
        );
        assert_eq!(verify_dir(dir.path()).unwrap().records, 3);
    }
}
