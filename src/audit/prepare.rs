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

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use super::segment::prepared_name;

/// Zero bytes written per `write` and synced at a time: each sync is followed by a pause as
/// long as it took, so that the writer's own syncs on the same disk do not queue behind a
/// whole segment of zeros (see `index::SYNC_EVERY_ENTRIES` for what an unpaced write did).
const CHUNK: usize = 1 << 20;

/// Room made past `segment_max_bytes`, at most: the batch that crosses the limit is still
/// written in the segment, and it mostly fits in this (a sixteenth of the segment, for small
/// ones).
const SLACK: u64 = 1 << 20;

/// The thread that makes segments ready, one at a time, in the order asked. Dropping it lets
/// the thread finish what is queued and end.
pub struct Preparer {
    tx: mpsc::Sender<u64>,
}

impl Preparer {
    /// Starts the thread for segments of `segment_max_bytes` in `dir`, first removing what an
    /// earlier run left that will never be used: space for segments that already exist (or
    /// are older), and files a stop interrupted while being made ready.
    pub fn start(dir: PathBuf, segment_max_bytes: u64, current: u64) -> io::Result<Preparer> {
        remove_stale(&dir, current)?;
        let size = segment_max_bytes.saturating_add(SLACK.min(segment_max_bytes / 16));
        let (tx, rx) = mpsc::channel::<u64>();
        std::thread::Builder::new()
            .name("wardgate-prep".into())
            .spawn(move || {
                for n in rx {
                    match make_ready(&dir, n, size) {
                        Ok(()) => tracing::debug!(segment = n, "audit segment space made ready"),
                        // The writer then grows the segment as it goes, as it always can.
                        Err(e) => tracing::warn!(segment = n, error = %e,
                            "cannot make space ready for the next audit segment; it will be \
                             grown as it is written"),
                    }
                }
            })?;
        Ok(Preparer { tx })
    }

    /// Asks for segment `n`'s space (nothing happens when it is already there).
    pub fn prepare(&self, n: u64) {
        // Err only when the thread has ended (a panic): segments are then grown as written.
        let _ = self.tx.send(n);
    }
}

/// The made-ready file for segment `n`, if there is one, for the writer to rename into place.
pub fn ready(dir: &Path, n: u64) -> Option<PathBuf> {
    let path = dir.join(prepared_name(n));
    path.is_file().then_some(path)
}

/// Writes `size` zero bytes to a temporary file, synced a chunk at a time, and renames it to
/// segment `n`'s made-ready name. The writer renames it again (and syncs the directory) when
/// it takes it, so the rename here needs no directory sync of its own: lost in a crash, the
/// space is made again.
fn make_ready(dir: &Path, n: u64, size: u64) -> io::Result<()> {
    let done = dir.join(prepared_name(n));
    if done.exists() || dir.join(super::segment::segment_name(n)).exists() {
        return Ok(());
    }
    let tmp = done.with_extension("zeroing");
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        let zeros = vec![0u8; CHUNK];
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
            file.write_all(&zeros[..n])?;
            let started = Instant::now();
            file.sync_data()?;
            std::thread::sleep(started.elapsed());
            left -= n as u64;
        }
        std::fs::rename(&tmp, &done)
    };
    // A full disk keeps none of it: the log's own records need the room more.
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Removes made-ready files for segments before `current` or that exist already, and any
/// interrupted while being written.
fn remove_stale(dir: &Path, current: u64) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("prep-") else {
            continue;
        };
        let stale = match rest.strip_suffix(".zeroed") {
            Some(digits) => digits.parse::<u64>().map_or(true, |n| {
                n < current || dir.join(super::segment::segment_name(n)).exists()
            }),
            None => rest.ends_with(".zeroing"),
        };
        if stale {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_is_made_ready_once_and_stale_space_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        make_ready(dir.path(), 3, 3 * CHUNK as u64 + 5).unwrap();
        let path = ready(dir.path(), 3).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 3 * CHUNK + 5);
        assert!(bytes.iter().all(|&b| b == 0));
        assert!(ready(dir.path(), 4).is_none());

        // An interrupted one, and one for a segment that now exists, go at the next start;
        // the one for the segment after the current stays.
        std::fs::write(dir.path().join("prep-00000004.zeroing"), b"\0").unwrap();
        make_ready(dir.path(), 2, 10).unwrap();
        remove_stale(dir.path(), 3).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["prep-00000003.zeroed"]);
        remove_stale(dir.path(), 4).unwrap();
        assert!(ready(dir.path(), 3).is_none());
    }
}
