//! Space for the next segment, made ready before the writer needs it: under fsync durability a
//! file of zero bytes, written and synced on a thread of its own, which the writer renames to
//! the next segment when it rolls and then overwrites in place (PostgreSQL's `wal_init_zero`).
//!
//! Why: a record appended past the end of a file grows it, and `fdatasync` must then commit
//! the file's new size and blocks to the filesystem journal as well as write the data.
//! Overwriting blocks that are already there needs the data written and nothing more. On the
//! load test's disk a sync of 30 KB appended cost 74-76 us of CPU and 0.21-0.22 ms, the same
//! written over zeros 48 us and 0.14 ms (`loadtest/README.md`, 2026-12-05, third session).
//! The price: each segment's bytes reach the disk twice (zeros, then records), and one
//! segment's worth of disk is held ahead.
//!
//! Does not own: when a segment is finished or which file is written (the writer), or where
//! written records end in a file that still holds made-ready space (`segment`: at the first
//! NUL byte).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use super::segment::{prepared_name, segment_name};

/// Zero bytes written per `write` and synced at a time: each sync is followed by a pause as
/// long as it took, so that the writer's own syncs on the same disk do not queue behind a
/// whole segment of zeros (see `index::SYNC_EVERY_ENTRIES` for what an unpaced write did).
const CHUNK: usize = 1 << 20;

/// Room made past `segment_max_bytes`, at most: the batch that crosses the limit is still
/// written in the segment, and it mostly fits in this (a sixteenth of the segment, for small
/// ones).
const SLACK: u64 = 1 << 20;

/// The thread that makes segments ready, one at a time, in the order asked. Dropping it stops
/// the thread (a file half made is removed) and waits for it, so that it never outlives the
/// writer's hold on the log.
pub struct Preparer {
    tx: Option<mpsc::Sender<u64>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Preparer {
    /// Starts the thread for segments of `segment_max_bytes` in `dir`.
    pub fn start(dir: PathBuf, segment_max_bytes: u64) -> io::Result<Preparer> {
        let size = segment_max_bytes.saturating_add(SLACK.min(segment_max_bytes / 16));
        let (tx, rx) = mpsc::channel::<u64>();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("wardgate-prep".into())
            .spawn(move || {
                for n in rx {
                    if stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    match make_ready(&dir, n, size, &stopping) {
                        Ok(()) => tracing::debug!(segment = n, "audit segment space made ready"),
                        // The writer then grows the segment as it goes, as it always can.
                        Err(e) => tracing::warn!(segment = n, error = %e,
                            "cannot make space ready for the next audit segment; it will be \
                             grown as it is written"),
                    }
                }
            })?;
        Ok(Preparer {
            tx: Some(tx),
            stop,
            thread: Some(thread),
        })
    }

    /// Asks for segment `n`'s space (nothing happens when it is already there).
    pub fn prepare(&self, n: u64) {
        // Err only when the thread has ended (a panic): segments are then grown as written.
        if let Some(tx) = &self.tx {
            let _ = tx.send(n);
        }
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            // Out of its pause at once; a sync under way is waited for.
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// The made-ready file for segment `n`, if there is one, for the writer to rename into place.
pub fn ready(dir: &Path, n: u64) -> Option<PathBuf> {
    let path = dir.join(prepared_name(n));
    path.is_file().then_some(path)
}

/// Removes segment `n`'s made-ready file, if there is one (the segment began without it).
pub fn discard(dir: &Path, n: u64) {
    match std::fs::remove_file(dir.join(prepared_name(n))) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(segment = n, error = %e, "cannot remove unused made-ready audit space");
        }
        _ => {}
    }
}

/// Writes `size` zero bytes to a file of its own, synced a chunk at a time, and renames it to
/// segment `n`'s made-ready name, unless the segment has begun meanwhile. Not when the disk
/// has less than twice that free: the log's own records need the room more. A stop (`stop`)
/// abandons it.
fn make_ready(dir: &Path, n: u64, size: u64, stop: &AtomicBool) -> io::Result<()> {
    let done = dir.join(prepared_name(n));
    let begun = || dir.join(segment_name(n)).exists();
    if done.exists() || begun() {
        return Ok(());
    }
    let stat = rustix::fs::statvfs(dir)?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < size.saturating_mul(2) {
        return Err(io::Error::other(format!(
            "{free} bytes free, and {size} would leave less than as much again"
        )));
    }
    // Named for this attempt alone, so that no two writers of one file can meet.
    let tmp = dir.join(format!(
        "{}.{:08x}.zeroing",
        prepared_name(n),
        rand::random::<u32>()
    ));
    let write = || -> io::Result<bool> {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let zeros = vec![0u8; CHUNK];
        let mut left = size;
        while left > 0 {
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
            file.write_all(&zeros[..n])?;
            let started = Instant::now();
            file.sync_data()?;
            left -= n as u64;
            // The pause; a stop cuts it short (`Drop` unparks), and may come early.
            let pause = started.elapsed();
            let resting = Instant::now();
            while !stop.load(Ordering::Relaxed) && resting.elapsed() < pause {
                std::thread::park_timeout(pause.saturating_sub(resting.elapsed()));
            }
        }
        Ok(true)
    };
    match write() {
        Ok(true) => {}
        finished => {
            let _ = std::fs::remove_file(&tmp);
            return finished.map(|_| ());
        }
    }
    std::fs::rename(&tmp, &done)?;
    // The roll came while it was being made: the segment began without it. (Not found: the
    // writer took it meanwhile.)
    if begun() {
        match std::fs::remove_file(&done) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Removes every made-ready file, and every one left half made, from `dir` (at the writer's
/// start). A file that cannot be removed is reported and left: it only takes disk.
pub fn remove_all(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let ours = name.to_str().is_some_and(|name| {
            name.starts_with("prep-") && (name.ends_with(".zeroed") || name.ends_with(".zeroing"))
        });
        if ours && let Err(e) = std::fs::remove_file(entry.path()) {
            tracing::warn!(file = %entry.path().display(), error = %e,
                "cannot remove made-ready audit space left by an earlier run");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_is_made_ready_once_and_removed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let go = AtomicBool::new(false);
        make_ready(dir.path(), 3, 3 * CHUNK as u64 + 5, &go).unwrap();
        let path = ready(dir.path(), 3).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 3 * CHUNK + 5);
        assert!(bytes.iter().all(|&b| b == 0));
        assert!(ready(dir.path(), 4).is_none());

        // Not for a segment that has begun; abandoned at a stop, leaving nothing.
        std::fs::write(dir.path().join(segment_name(4)), b"").unwrap();
        make_ready(dir.path(), 4, 10, &go).unwrap();
        assert!(ready(dir.path(), 4).is_none());
        make_ready(dir.path(), 5, 10, &AtomicBool::new(true)).unwrap();
        let names = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(), ["prep-00000003.zeroed", "seg-00000004.jsonl"]);

        std::fs::write(
            dir.path().join("prep-00000006.zeroed.0000abcd.zeroing"),
            b"\0",
        )
        .unwrap();
        remove_all(dir.path());
        assert_eq!(names(), ["seg-00000004.jsonl"]);
    }
}
