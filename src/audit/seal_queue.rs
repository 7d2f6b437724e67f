//! Finished segments wait here to be sealed (read once, indexed and sealed: [`index::seal`]),
//! one at a time in the order they finished, on one thread of their own that runs at a lower
//! CPU priority than the request path.
//!
//! Why the priority: sealing a 64 MiB segment reads every line and sorts a few million index
//! entries, some hundreds of milliseconds of CPU. A gateway given one core (as in the load test)
//! shared it with the seal, and requests that arrived during one of the seal's time slices
//! waited for the slice to end: at half of the saturation rate, 100-record pages, the load
//! test's page-cache p99 was 1.4 ms when no segment filled during the run and 4.2 ms when one
//! did. A nice value of +10 did not help (2.1-4.8 ms): the scheduler picked the seal less often
//! but still let each slice run 1-4 ms (seen in `perf sched timehist`). Under `SCHED_IDLE` the
//! seal runs only when nothing else wants the core and a request's wakeup takes the core back
//! at once: 1.4-1.6 ms with seals during the run (two runs each, alternating). The cost: a
//! gateway saturated for long seals slowly (it gets a fraction of a percent of a busy core),
//! and lookups scan the segments still waiting here until it catches up ([`BACKLOG_GAUGE`]
//! counts them). The index's disk writes are paced for the same reason (see `index::seal`).
//!
//! Does not own: when a segment is finished (the writer says) or what sealing writes
//! ([`index`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::index;

/// A segment whose seal failed is tried again after this, then after twice as long each time
/// up to [`RETRY_AT_MOST`]: a passing fault (a full disk, an I/O error) otherwise left it
/// unsealed, and retention stopped at it, until a restart.
const RETRY_FIRST: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(60)
};
const RETRY_AT_MOST: Duration = Duration::from_secs(3600);

/// The queue of segments to seal, and the thread that seals them. Dropping it lets the thread
/// finish what is queued and end.
pub struct SealQueue {
    tx: mpsc::Sender<u64>,
    /// Segments queued and not yet sealed (or failed), also the gauge [`BACKLOG_GAUGE`].
    backlog: Arc<AtomicUsize>,
}

/// How many finished segments wait to be sealed: near zero unless the gateway has been kept
/// at full CPU (then seals wait for a moment of idle, and lookups scan the waiting segments).
pub const BACKLOG_GAUGE: &str = "wardgate_audit_seal_backlog";

impl SealQueue {
    pub fn start(dir: PathBuf) -> io::Result<SealQueue> {
        Self::start_named(dir, "wardgate-seal")
    }

    fn start_named(dir: PathBuf, thread: &str) -> io::Result<SealQueue> {
        let (tx, rx) = mpsc::channel::<u64>();
        let backlog = Arc::new(AtomicUsize::new(0));
        let left = Arc::clone(&backlog);
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                lower_priority();
                // Segments whose seal failed: when each is tried again, and the wait after that.
                let mut failed: Vec<(u64, Instant, Duration)> = Vec::new();
                loop {
                    let due = failed.iter().map(|f| f.1).min();
                    let next = match due {
                        None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                        Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                    };
                    match next {
                        Ok(n) => {
                            if !seal(&dir, n) {
                                failed.push((n, Instant::now() + RETRY_FIRST, RETRY_FIRST));
                            }
                            let now = left.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
                            metrics::gauge!(BACKLOG_GAUGE).set(now as f64);
                        }
                        // Shut: what failed is tried again at the next start.
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let now = Instant::now();
                            failed.retain_mut(|(n, at, wait)| {
                                if *at > now || seal(&dir, *n) {
                                    return *at > now;
                                }
                                *wait = (*wait * 2).min(RETRY_AT_MOST);
                                *at = now + *wait;
                                true
                            });
                        }
                    }
                }
            })?;
        Ok(SealQueue { tx, backlog })
    }

    /// Queues segment `n`, which will not be written again.
    pub fn push(&self, n: u64) {
        let now = self.backlog.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(BACKLOG_GAUGE).set(now as f64);
        if self.tx.send(n).is_err() {
            // Only if the thread panicked: the segment is sealed on the next start.
            tracing::error!(
                segment = n,
                "the sealing thread has ended; the segment stays unsealed until restart"
            );
        }
    }
}

/// Seals segment `n`, saying how it went; false if it failed.
fn seal(dir: &Path, n: u64) -> bool {
    match index::seal(dir, n) {
        Ok(s) => {
            tracing::info!(segment = n, records = s.records, "audit segment sealed");
            true
        }
        Err(e) => {
            metrics::counter!("wardgate_audit_seal_failures_total").increment(1);
            tracing::error!(segment = n, error = %e,
                "cannot seal audit segment; lookups will scan it, and retention stops at it \
                 until it is sealed (it is tried again, after a minute and then less often; a \
                 damaged segment, which `wardgate audit verify` names, must be settled first)");
            false
        }
    }
}

/// Puts this thread under `SCHED_IDLE`, which needs no privilege. If that fails anyway, sealing
/// still works, only at the request path's priority.
fn lower_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, thread_native_id,
        unix::set_thread_priority_and_policy,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
        tracing::warn!(error = %e, "cannot put the sealing thread under SCHED_IDLE");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The scheduling policy in a `/proc/.../stat` text (field 41; state is field 3, the first
    /// after the command's closing parenthesis).
    fn policy_in(stat: &str) -> u32 {
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(41 - 3).unwrap().parse().unwrap()
    }

    /// The scheduling policies of this process's threads named `name`.
    fn policy_of_threads(name: &str) -> Vec<u32> {
        let mut found = vec![];
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            // A thread of another test may end between listing and reading: skip it.
            if comm.trim_end() == name
                && let Ok(stat) = std::fs::read_to_string(task.path().join("stat"))
            {
                found.push(policy_in(&stat));
            }
        }
        found
    }

    /// `SCHED_IDLE` in `<linux/sched.h>`.
    const SCHED_IDLE: u32 = 5;

    /// A seal that failed (a passing fault: here the index's temporary file cannot be made)
    /// is tried again by itself, not left until a restart with retention stopped at it.
    #[tokio::test]
    async fn a_seal_that_failed_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = crate::audit::AuditLog::open(crate::audit::AuditSettings {
            dir: dir.path().to_owned(),
            durability: crate::audit::Durability::Fsync,
            max_batch: 64,
            commit_window: Duration::ZERO,
            segment_max_bytes: 1 << 20,
            seal_client_addr: false,
        })
        .unwrap();
        log.append(crate::audit::record::tests::sample(1))
            .await
            .unwrap();
        log.shutdown().await;
        let sealed = index::seal_path(dir.path(), 1);
        assert!(
            !sealed.exists(),
            "the open segment is not sealed at shutdown"
        );
        let blocker = index::index_path(dir.path(), 1).with_extension("tmp");
        std::fs::create_dir(&blocker).unwrap();
        let queue = SealQueue::start_named(dir.path().to_path_buf(), "seal-retry").unwrap();
        queue.push(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while queue.backlog.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "the first try never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!sealed.exists(), "the first try failed");
        std::fs::remove_dir(&blocker).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sealed.exists() {
            assert!(Instant::now() < deadline, "never tried again");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(index::index_matches(dir.path(), 1).unwrap());
    }

    #[test]
    fn seals_queued_segments_on_a_thread_that_yields_to_requests() {
        let dir = tempfile::tempdir().unwrap();
        // Named apart from the seal threads of other tests' writers running alongside.
        let name = "seal-test";
        let queue = SealQueue::start_named(dir.path().to_path_buf(), name).unwrap();
        // Segment 1 does not exist: the seal fails, is logged, and the thread goes on.
        queue.push(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let policy = loop {
            let seen = policy_of_threads(name);
            if seen == [SCHED_IDLE] || Instant::now() > deadline {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(policy, [SCHED_IDLE]);
        // The failed seal is no longer waiting; nor are two more once they are done (a count
        // that missed either side would never come back to zero).
        let deadline = Instant::now() + Duration::from_secs(10);
        while queue.backlog.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "the backlog never emptied");
            std::thread::sleep(Duration::from_millis(5));
        }
        queue.push(2);
        queue.push(3);
        let deadline = Instant::now() + Duration::from_secs(10);
        while queue.backlog.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "the backlog never emptied");
            std::thread::sleep(Duration::from_millis(5));
        }
        // This thread (the request path's stand-in) keeps the ordinary policy.
        let own = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        assert_eq!(policy_in(&own), 0);
        // The thread ends once the queue is dropped.
        drop(queue);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !policy_of_threads(name).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(policy_of_threads(name).is_empty());
    }
}
