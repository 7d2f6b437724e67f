//! The local, durable copy of every control event: one JSON line each, fsynced.
//!
//! It is what lets a restriction survive a Redis restart or `FLUSHALL`: on start the mirror is
//! rebuilt from it, and the sync task republishes to Redis whatever the stream has lost. Every
//! replica journals every event it learns, its own and others', so any one of them can restore
//! the shared stream.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::Context;

use super::Event;

pub struct Journal {
    path: PathBuf,
    state: Mutex<State>,
}

#[cfg(test)]
impl Journal {
    /// Holds the journal as an append does while it syncs (for tests of what waits on it).
    pub(super) fn hold(&self) -> std::sync::MutexGuard<'_, impl Sized> {
        self.state.lock().unwrap()
    }
}

struct State {
    file: File,
    events: Vec<Event>,
    ids: HashSet<String>,
    /// A failed append could not be cut off: what follows would be glued onto it, so
    /// nothing more is appended until a restart has mended the file.
    broken: bool,
}

impl Journal {
    /// Reads every event journalled. A last line without its newline is a write cut short by
    /// a crash, cut off so the next event starts a line of its own, unless it reads as a
    /// whole event (a line mended by hand, say), which is kept and given its newline. Any
    /// other line that does not read as an event stops the start: a restriction lost to a
    /// damaged line would otherwise be lifted without anyone saying so.
    pub fn open(path: &Path) -> anyhow::Result<Journal> {
        // Folders made here are made durable in their parents, as the audit log's are.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            crate::audit::segment::create_dir_synced(dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
        }
        let mut created = false;
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                created = true;
                Vec::new()
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read `{}`", path.display())),
        };
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut events = Vec::new();
        for (n, line) in text[..whole].split(|&b| b == b'\n').enumerate() {
            if line.trim_ascii().is_empty() {
                continue;
            }
            let event = serde_json::from_slice::<Event>(line).with_context(|| {
                format!(
                    "control journal `{}`, line {}, is damaged; the restrictions and revocations \
                     it held cannot be trusted. Mend or remove that line (another replica's \
                     journal, or the Redis stream, holds the same events) and start again",
                    path.display(),
                    n + 1
                )
            })?;
            events.push(event);
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open `{}` for appending", path.display()))?;
        // A journal made now has its name in its folder made durable: an append's
        // `sync_data` covers the file's bytes, not the entry that names it, and a placement
        // answered 200 could go with an entry lost to a crash.
        if created {
            let dir = dir.unwrap_or(Path::new("."));
            File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync the folder `{}`", dir.display()))?;
        }
        let tail = &text[whole..];
        if let Ok(last) = serde_json::from_slice::<Event>(tail) {
            file.write_all(b"\n")
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot repair `{}`", path.display()))?;
            events.push(last);
        } else if !tail.is_empty() {
            tracing::warn!(file = %path.display(), torn_bytes = tail.len(),
                "cutting off a control event torn by an interrupted write");
            file.set_len(whole as u64)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot repair `{}`", path.display()))?;
        }
        let ids = events.iter().map(|e| e.id.clone()).collect();
        Ok(Journal {
            path: path.to_owned(),
            state: Mutex::new(State {
                file,
                events,
                ids,
                broken: false,
            }),
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
        if s.broken {
            anyhow::bail!(
                "`{}` holds a failed append that could not be cut off; restart to mend it",
                self.path.display()
            );
        }
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        let before = s.file.metadata()?.len();
        let written = s.file.write_all(&line).and_then(|()| s.file.sync_data());
        if let Err(e) = written {
            // Part of the line may be in the file: cut it off, or the next event would be
            // written onto the end of it and both would be lost to the next start.
            if let Err(cut) = s.file.set_len(before) {
                tracing::error!(file = %self.path.display(), error = %cut,
                    "cannot cut off a failed control event; no more are journalled until a restart");
                s.broken = true;
            }
            return Err(e).with_context(|| format!("cannot append to `{}`", self.path.display()));
        }
        s.ids.insert(e.id.clone());
        s.events.push(e.clone());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Event {
        Event {
            id: id.to_owned(),
            at: 1,
            by: "dpo".to_owned(),
            reason: "objection".to_owned(),
            change: super::super::Change::Place {
                subject: "VF-1".to_owned(),
                kind: "objects_profiling".to_owned(),
                reference: "R-1".to_owned(),
            },
        }
    }

    /// The ids of the events a start reads from `path`.
    fn ids_at_start(path: &Path) -> Vec<String> {
        let journal = Journal::open(path).unwrap();
        journal.events().into_iter().map(|e| e.id).collect()
    }

    fn line(e: &Event) -> String {
        serde_json::to_string(e).unwrap() + "\n"
    }

    #[test]
    fn a_torn_last_event_is_cut_off_so_the_next_one_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controls.jsonl");
        let torn = &line(&event("e2"))[..20];
        std::fs::write(&path, line(&event("e1")) + torn).unwrap();

        let journal = Journal::open(&path).unwrap();
        assert_eq!(journal.events(), vec![event("e1")]);
        journal.append(&event("e3")).unwrap();
        drop(journal);

        assert_eq!(ids_at_start(&path), ["e1", "e3"]);
    }

    #[test]
    fn a_whole_last_event_without_its_newline_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controls.jsonl");
        let mended = line(&event("e2"));
        std::fs::write(&path, line(&event("e1")) + mended.trim_end()).unwrap();

        let journal = Journal::open(&path).unwrap();
        journal.append(&event("e3")).unwrap();
        drop(journal);
        assert_eq!(ids_at_start(&path), ["e1", "e2", "e3"]);
    }

    #[test]
    fn a_damaged_event_before_the_last_stops_the_start_and_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controls.jsonl");
        let glued = format!("{}{}", &line(&event("e2"))[..20], line(&event("e3")));
        std::fs::write(&path, line(&event("e1")) + &glued + &line(&event("e4"))).unwrap();

        let err = format!("{:#}", Journal::open(&path).err().unwrap());
        assert!(
            err.contains("line 2") && err.contains("controls.jsonl"),
            "{err}"
        );
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn a_poisoned_lock_still_gives_every_event() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("controls.jsonl")).unwrap();
        let event = event("e1");
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
