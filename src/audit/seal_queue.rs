//! Finished segments wait here to be sealed (read once, indexed and sealed: [`index::seal`]),
//! one at a time in the order they finished, on one thread of their own that runs at a lower
//! CPU priority than the request path.
//!
//! Why the priority: sealing a 64 MiB segment reads every line and sorts a few million index
//! entries, some hundreds of milliseconds of CPU at once, and a gateway given one core (as in
//! the load test) shared it evenly between that and its requests. At [`NICE_OFFSET`] the
//! scheduler gives the seal about a tenth of a busy core and all of an idle one, which still
//! keeps up with a saturated gateway's segments (one every few seconds). Seals still show in
//! the tail: at half of the saturation rate, 100-record pages, the load test's page-cache p99
//! was 1.4 ms when no segment filled during the run and 2.8-4.2 ms when one did; the disk
//! writes of the index are paced for the same reason (see `index::seal`).
//!
//! Does not own: when a segment is finished (the writer says) or what sealing writes
//! ([`index`]).

use std::io;
use std::path::PathBuf;
use std::sync::mpsc;

use super::index;

/// How much nicer than the gateway the sealing thread is (the nice value rises by this much,
/// capped at 19): weight 110 against the request path's 1024 in Linux's scheduler.
pub const NICE_OFFSET: i32 = 10;

/// The queue of segments to seal, and the thread that seals them. Dropping it lets the thread
/// finish what is queued and end.
pub struct SealQueue {
    tx: mpsc::Sender<u64>,
}

impl SealQueue {
    pub fn start(dir: PathBuf) -> io::Result<SealQueue> {
        Self::start_named(dir, "wardgate-seal")
    }

    fn start_named(dir: PathBuf, thread: &str) -> io::Result<SealQueue> {
        let (tx, rx) = mpsc::channel::<u64>();
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                lower_priority();
                for n in rx {
                    match index::seal(&dir, n) {
                        Ok(s) => {
                            tracing::info!(segment = n, records = s.records, "audit segment sealed")
                        }
                        Err(e) => tracing::error!(segment = n, error = %e,
                            "cannot seal audit segment; lookups will scan it"),
                    }
                }
            })?;
        Ok(SealQueue { tx })
    }

    /// Queues segment `n`, which will not be written again.
    pub fn push(&self, n: u64) {
        if self.tx.send(n).is_err() {
            // Only if the thread panicked: the segment is sealed on the next start.
            tracing::error!(
                segment = n,
                "the sealing thread has ended; the segment stays unsealed until restart"
            );
        }
    }
}

/// Raises this thread's nice value by [`NICE_OFFSET`]. Raising it needs no privilege; if it
/// fails anyway, sealing still works, only at the request path's priority.
fn lower_priority() {
    let me = Some(rustix::thread::gettid());
    let raised = rustix::process::getpriority_process(me)
        .and_then(|now| rustix::process::setpriority_process(me, (now + NICE_OFFSET).min(19)));
    if let Err(e) = raised {
        tracing::warn!(error = %e, "cannot lower the sealing thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The nice value (field 19 of `/proc/self/task/TID/stat`) of this process's threads named
    /// `name`.
    fn nice_of_threads(name: &str) -> Vec<i32> {
        let mut found = vec![];
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            // After the command's closing parenthesis: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let nice = rest.split(' ').nth(19 - 3).unwrap().parse().unwrap();
            found.push(nice);
        }
        found
    }

    #[test]
    fn seals_queued_segments_on_a_thread_nicer_than_the_request_path() {
        let dir = tempfile::tempdir().unwrap();
        let mine = rustix::process::getpriority_process(None).unwrap();
        // Named apart from the seal threads of other tests' writers running alongside.
        let name = "seal-test";
        let queue = SealQueue::start_named(dir.path().to_path_buf(), name).unwrap();
        // Segment 1 does not exist: the seal fails, is logged, and the thread goes on.
        queue.push(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let nice = loop {
            let seen = nice_of_threads(name);
            if seen.iter().any(|n| *n != mine) || Instant::now() > deadline {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(nice, vec![(mine + NICE_OFFSET).min(19)]);
        // The thread ends once the queue is dropped.
        drop(queue);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !nice_of_threads(name).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(nice_of_threads(name).is_empty());
    }
}
