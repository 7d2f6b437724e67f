//! The local, durable copy of every control event: one JSON line each, fsynced.
//!
//! It is what lets a restriction survive a Redis restart or `FLUSHALL`: on start the mirror is
//! rebuilt from it, and the sync task republishes to Redis whatever the stream has lost. Every
//! replica journals every event it learns, its own and others', so any one of them can restore
//! the shared stream.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::Context;

use super::Event;

pub struct Journal {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: File,
    events: Vec<Event>,
    ids: HashSet<String>,
}

impl Journal {
    pub fn open(path: &Path) -> anyhow::Result<Journal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
        }
        let mut events = Vec::new();
        if path.exists() {
            let f =
                File::open(path).with_context(|| format!("cannot read `{}`", path.display()))?;
            for (n, line) in BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("cannot read `{}`", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Event>(&line) {
                    Ok(e) => events.push(e),
                    // A torn last line is a write cut by a crash; anything else is damage.
                    Err(e) => {
                        tracing::warn!(file = %path.display(), line = n + 1, error = %e, "skipping unreadable control event")
                    }
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open `{}` for appending", path.display()))?;
        let ids = events.iter().map(|e| e.id.clone()).collect();
        Ok(Journal {
            path: path.to_owned(),
            state: Mutex::new(State { file, events, ids }),
        })
    }

    /// Every event journalled. A poisoned lock still gives them all: an empty list would have
    /// the sync task republish nothing the shared stream has lost.
    pub fn events(&self) -> Vec<Event> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.events.clone()
    }

    /// Appends and syncs; an event already journalled is not written twice.
    pub fn append(&self, e: &Event) -> anyhow::Result<()> {
        self.append_if_new(e).map(|_| ())
    }

    pub fn append_if_new(&self, e: &Event) -> anyhow::Result<bool> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
        if s.ids.contains(&e.id) {
            return Ok(false);
        }
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        s.file
            .write_all(&line)
            .and_then(|()| s.file.sync_data())
            .with_context(|| format!("cannot append to `{}`", self.path.display()))?;
        s.ids.insert(e.id.clone());
        s.events.push(e.clone());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_every_event() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("controls.jsonl")).unwrap();
        let event = Event {
            id: "e1".to_owned(),
            at: 1,
            by: "dpo".to_owned(),
            reason: "objection".to_owned(),
            change: super::super::Change::Place {
                subject: "VF-1".to_owned(),
                kind: "objects_profiling".to_owned(),
                reference: "R-1".to_owned(),
            },
        };
        journal.append(&event).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _held = journal.state.lock().unwrap();
                panic!("poison the journal's lock");
            })
            .join()
            .unwrap_err();
        });
        assert!(journal.state.is_poisoned());
        assert_eq!(journal.events(), vec![event]);
    }
}
