//! The breach log: every alert, its containment and each classification the security team
//! gives it, appended as JSON lines and synced before the action counts.
//!
//! Seeds §13.4 asks for a log of every potential breach, reportable or near miss; §13.8-13.9
//! give 72 hours from awareness to report. An alert is "awareness": its `report_by` is
//! `detected_at` plus 72 hours. Nothing is rewritten: a reclassification is a new line, and
//! the file read from the top gives each alert's current state and its whole history (but
//! for a failed containment after one that took, which is not written: `contain`). Each
//! alert is also written to the audit log as a system record, so its existence is covered by
//! the audit chain.
//!
//! Memory holds the newest `ALERTS_KEPT` alerts, for the console; an older one is read from
//! the file when it is acted on (`alert`), so an alert storm (a `denied_burst` an hour from
//! each of thousands of addresses) fills the disk at the rate the log is synced, not the heap.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::audit::Caller;

use super::settings::{Mode, Rule};

/// How long the party has from awareness to report (§13.8).
pub const REPORT_WITHIN_HOURS: i64 = 72;

/// How many of the newest alerts memory holds (and the console lists).
pub const ALERTS_KEPT: usize = 10_000;

/// How long after a failed append the log is taken as unable to record (`is_healthy`), unless
/// an append succeeds meanwhile.
pub const UNHEALTHY_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Alert {
    pub id: String,
    pub rule: Rule,
    pub mode: Mode,
    pub summary: String,
    /// Who the alert is about, when the caller was authenticated.
    pub principal: Option<Caller>,
    /// The principal's subject, or `addr:IP`.
    pub key: String,
    pub client_addr: Option<String>,
    /// The addresses a `many_addresses` alert rests on (IPv6 ones as their /64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Audit record sequence numbers in this replica's log.
    pub evidence: Vec<u64>,
    /// Evidence across replicas, as `REPLICA#SEQ` (alerts of the shared detector).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence_refs: Vec<String>,
    /// When the gateway became aware: the reporting clock starts here.
    pub detected_at: String,
    pub report_by: String,
    #[serde(default)]
    pub containment: Option<Containment>,
    /// The latest classification; the file keeps every one.
    #[serde(default)]
    pub classification: Option<Classification>,
    #[serde(default)]
    pub history: Vec<Classification>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Containment {
    /// The caller whose every token issued until then was revoked (empty in entries written
    /// before containment revoked callers rather than tokens).
    #[serde(default)]
    pub subject: String,
    /// The token the alert saw.
    pub token_id: String,
    pub at: String,
    /// `revoked`; `revoked: …` when in effect on this replica but not yet shared (the others
    /// learn of it when the shared store is back); `not revoked: …` and why otherwise.
    pub outcome: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Likely to result in a risk to people's rights and freedoms: report to the ICO.
    Reportable,
    /// Logged, not reported.
    NearMiss,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Classification {
    pub class: Class,
    pub note: String,
    pub by: String,
    pub role: String,
    pub at: String,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
enum Entry {
    Alert(Box<Alert>),
    Contained {
        alert_id: String,
        containment: Containment,
    },
    Classified {
        alert_id: String,
        classification: Classification,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BreachError {
    #[error("no alert `{0}`")]
    NotFound(String),
    #[error("the breach log cannot be written: {0}")]
    Io(#[from] std::io::Error),
}

pub struct BreachLog {
    path: PathBuf,
    state: Mutex<State>,
    /// `State`'s `broken` (whether set) and `failed_at`, copied after each append: what
    /// `is_healthy` reads, under a lock never held across a write or sync (the state's is, and
    /// asked on the async workers it would stall one for as long as a slow disk's sync).
    health: Mutex<(bool, Option<Instant>)>,
}

struct State {
    file: File,
    /// The newest `keep`, in detection order.
    alerts: VecDeque<Alert>,
    keep: usize,
    /// How many older ones only the file holds.
    older: u64,
    /// A failed append could not be cut off: the length to cut the file back to before
    /// anything more is appended (the next line would be joined to the torn one), tried
    /// again at each append (a restart cuts it too).
    broken: Option<u64>,
    /// When the last append failed, unless one has succeeded since (`is_healthy`).
    failed_at: Option<Instant>,
}

impl BreachLog {
    /// Opens (creating) the log and reads it back. A torn last line (a crash mid-append) is
    /// cut off; any other line that does not parse stops the start, naming the line.
    pub fn open(path: &Path) -> anyhow::Result<BreachLog> {
        Self::open_keeping(path, ALERTS_KEPT)
    }

    /// `open`, holding the newest `keep` alerts in memory.
    fn open_keeping(path: &Path, keep: usize) -> anyhow::Result<BreachLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
        }
        let mut alerts = VecDeque::new();
        let mut older = 0;
        let mut good_len = 0u64;
        if path.exists() {
            let f = File::open(path)
                .with_context(|| format!("cannot read the breach log `{}`", path.display()))?;
            let mut reader = BufReader::new(f);
            // Bytes, not text: a line torn inside a character (a note or unit with an accent)
            // is still a torn line, cut off, not a log that stops the start.
            let mut line = Vec::new();
            let mut n = 0;
            loop {
                line.clear();
                let read = reader.read_until(b'\n', &mut line)?;
                if read == 0 {
                    break;
                }
                n += 1;
                if !line.ends_with(b"\n") {
                    tracing::warn!(line = n, "breach log ends with a torn line; cutting it off");
                    break;
                }
                let entry: Entry = serde_json::from_slice(&line).with_context(|| {
                    format!("breach log `{}` line {n} is not an entry", path.display())
                })?;
                apply(&mut alerts, entry);
                older += forget_beyond(&mut alerts, keep);
                good_len += read as u64;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the breach log `{}`", path.display()))?;
        file.set_len(good_len)?;
        Ok(BreachLog {
            path: path.to_owned(),
            state: Mutex::new(State {
                file,
                alerts,
                keep,
                older,
                broken: None,
                failed_at: None,
            }),
            health: Mutex::new((false, None)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether alerts can be expected to be recorded: no append has failed in the last
    /// [`UNHEALTHY_FOR`] without one succeeding since, and none is stuck unmended. The
    /// cross-replica leader asks before it marks alerts as raised for every replica.
    pub fn is_healthy(&self) -> bool {
        let (broken, failed_at) = *self.health.lock().unwrap_or_else(PoisonError::into_inner);
        !broken && failed_at.is_none_or(|t| t.elapsed() >= UNHEALTHY_FOR)
    }

    /// Appends a new alert (blocking: call off the async workers).
    pub fn add(&self, alert: Alert) -> Result<(), BreachError> {
        self.append(Entry::Alert(Box::new(alert)))
    }

    /// Records an attempt to contain the alert. One that did not take never replaces one
    /// that did (`revoked`, or `revoked: …`): the alert is left as it is.
    pub fn contain(&self, alert_id: &str, containment: Containment) -> Result<Alert, BreachError> {
        let took = |c: &Containment| c.outcome.starts_with("revoked");
        self.append_for(alert_id, |alert| {
            let keep = !took(&containment) && alert.containment.as_ref().is_some_and(took);
            (!keep).then(|| Entry::Contained {
                alert_id: alert.id.clone(),
                containment,
            })
        })
    }

    pub fn classify(
        &self,
        alert_id: &str,
        classification: Classification,
    ) -> Result<Alert, BreachError> {
        self.append_for(alert_id, |alert| {
            Some(Entry::Classified {
                alert_id: alert.id.clone(),
                classification,
            })
        })
    }

    /// The newest alerts (at most `ALERTS_KEPT`), newest first, and how many older ones only
    /// the file holds.
    pub fn alerts(&self) -> (Vec<Alert>, u64) {
        let s = self.lock();
        (s.alerts.iter().rev().cloned().collect(), s.older)
    }

    /// The id of every alert the file holds (blocking: the whole file is read, without the
    /// lock, as far as it went when asked). A line that does not parse says nothing.
    pub fn ids_in_file(&self) -> Result<std::collections::HashSet<String>, BreachError> {
        #[derive(Deserialize)]
        struct Head {
            entry: String,
            id: Option<String>,
        }
        use std::io::Read;
        let to = self.lock().file.metadata()?.len();
        let mut reader = BufReader::new(File::open(&self.path)?.take(to));
        let mut ids = std::collections::HashSet::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if let Ok(Head {
                entry,
                id: Some(id),
            }) = serde_json::from_slice::<Head>(&line)
                && entry == "alert"
            {
                ids.insert(id);
            }
        }
        Ok(ids)
    }

    /// The alert `alert_id` as it stands, held in memory or (older) read from the file.
    pub fn alert(&self, alert_id: &str) -> Result<Option<Alert>, BreachError> {
        let (s, found) = self.current(alert_id)?;
        drop(s);
        Ok(found.map(|(alert, _)| alert))
    }

    /// The alert as it stands and whether memory holds it, with the lock held: an older one
    /// is read from the file as far as it went when asked without the lock (a scan of a large
    /// file must not hold up new alerts), then, under the lock, what was written since.
    fn current(&self, alert_id: &str) -> Result<Current<'_>, BreachError> {
        let s = self.lock();
        if let Some(a) = s.alerts.iter().find(|a| a.id == alert_id) {
            let a = a.clone();
            return Ok((s, Some((a, true))));
        }
        // Memory holds every alert newer than the oldest it forgot: one it does not hold now
        // it will never hold again.
        if s.older == 0 {
            return Ok((s, None));
        }
        let read = s.file.metadata()?.len();
        drop(s);
        let mut alert = None;
        read_back(&self.path, alert_id, 0, read, &mut alert)?;
        let s = self.lock();
        let now = s.file.metadata()?.len();
        read_back(&self.path, alert_id, read, now, &mut alert)?;
        Ok((s, alert.map(|a| (a, false))))
    }

    /// Writes the entry `entry` makes of the alert (none: the alert stays as it is), deciding
    /// under the lock the write is made under, and returns the alert as it then stands.
    fn append_for(
        &self,
        alert_id: &str,
        entry: impl FnOnce(&Alert) -> Option<Entry>,
    ) -> Result<Alert, BreachError> {
        let (mut s, found) = self.current(alert_id)?;
        let Some((mut alert, held)) = found else {
            return Err(BreachError::NotFound(alert_id.to_owned()));
        };
        let Some(entry) = entry(&alert) else {
            return Ok(alert);
        };
        if held {
            // Applied to the one memory holds by `write`.
            self.write(&mut s, entry)?;
            let held = s.alerts.iter().find(|a| a.id == alert_id);
            return held
                .cloned()
                .ok_or_else(|| BreachError::NotFound(alert_id.to_owned()));
        }
        self.write(&mut s, entry.clone())?;
        apply_to(&mut alert, entry);
        Ok(alert)
    }

    fn append(&self, entry: Entry) -> Result<(), BreachError> {
        let mut s = self.lock();
        self.write(&mut s, entry)?;
        let keep = s.keep;
        s.older += forget_beyond(&mut s.alerts, keep);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `write`, with its outcome noted where `is_healthy` reads it.
    fn write(&self, s: &mut State, entry: Entry) -> Result<(), BreachError> {
        let written = write(s, entry);
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) =
            (s.broken.is_some(), s.failed_at);
        written
    }
}

/// Writes and syncs the line, then applies it: state never runs ahead of the file. A failed
/// write is cut back off the file: part of its line (a full disk took the rest) would join the
/// next entry into a line that does not parse, which stops the next start.
fn write(s: &mut State, entry: Entry) -> Result<(), BreachError> {
    if let Some(len) = s.broken {
        if let Err(e) = s.file.set_len(len).and_then(|()| s.file.sync_data()) {
            s.failed_at = Some(Instant::now());
            return Err(BreachError::Io(std::io::Error::other(format!(
                "a failed append could not be cut off the breach log yet ({e}); nothing is \
                 appended until it is"
            ))));
        }
        tracing::warn!("a failed append is cut off the breach log at last; appending again");
        s.broken = None;
    }
    let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let before = s.file.metadata()?.len();
    if let Err(e) = s.file.write_all(&line).and_then(|()| s.file.sync_data()) {
        s.failed_at = Some(Instant::now());
        if let Err(cut) = s.file.set_len(before).and_then(|()| s.file.sync_data()) {
            tracing::error!(error = %cut,
                "cannot cut a failed entry off the breach log; it is tried again before the next append");
            s.broken = Some(before);
        }
        return Err(e.into());
    }
    s.failed_at = None;
    apply(&mut s.alerts, entry);
    Ok(())
}

/// Forgets the oldest alerts past `keep` (the file keeps them): how many.
fn forget_beyond(alerts: &mut VecDeque<Alert>, keep: usize) -> u64 {
    let mut forgotten = 0;
    while alerts.len() > keep {
        alerts.pop_front();
        forgotten += 1;
    }
    forgotten
}

/// The log locked, and an alert as it stands with whether memory holds it.
type Current<'a> = (std::sync::MutexGuard<'a, State>, Option<(Alert, bool)>);

/// Reads the entries about `alert_id` between bytes `from` and `to` of the file (whole lines,
/// as written under the lock), applying them to `alert` (its own entry starts it). A line that
/// does not parse, or is not UTF-8, was not written by the log and says nothing of it.
fn read_back(
    path: &Path,
    alert_id: &str,
    from: u64,
    to: u64,
    alert: &mut Option<Alert>,
) -> Result<(), BreachError> {
    use std::io::{Read, Seek, SeekFrom};
    if from >= to {
        return Ok(());
    }
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = BufReader::new(file.take(to - from));
    // The id as the file writes it: a quoted JSON string.
    let quoted = serde_json::to_vec(alert_id).map_err(std::io::Error::other)?;
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line)? > 0 {
        if memchr::memmem::find(&line, &quoted).is_some()
            && let Ok(entry) = serde_json::from_slice::<Entry>(&line)
        {
            match (alert.as_mut(), entry) {
                (None, Entry::Alert(a)) if a.id == alert_id => *alert = Some(*a),
                (Some(a), entry) => apply_to(a, entry),
                _ => {}
            }
        }
        line.clear();
    }
    Ok(())
}

fn apply(alerts: &mut VecDeque<Alert>, entry: Entry) {
    match entry {
        Entry::Alert(a) => alerts.push_back(*a),
        entry => {
            let id = match &entry {
                Entry::Contained { alert_id, .. } | Entry::Classified { alert_id, .. } => alert_id,
                Entry::Alert(_) => return,
            };
            if let Some(a) = alerts.iter_mut().find(|a| &a.id == id) {
                apply_to(a, entry);
            }
        }
    }
}

/// An entry about `alert` applied to it (an entry about another alert, or a new alert,
/// changes nothing).
fn apply_to(alert: &mut Alert, entry: Entry) {
    match entry {
        Entry::Alert(_) => {}
        Entry::Contained {
            alert_id,
            containment,
        } => {
            if alert.id == alert_id {
                alert.containment = Some(containment);
            }
        }
        Entry::Classified {
            alert_id,
            classification,
        } => {
            if alert.id == alert_id {
                alert.history.push(classification.clone());
                alert.classification = Some(classification);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the log is healthy is answered while an append holds the log (a sync on a
    /// slow disk): it is asked on the async workers. Checked for liveness only: the hold ends
    /// after a minute whatever happens, and the test fails if that is what ended it.
    #[test]
    fn health_is_answered_while_an_append_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let log = BreachLog::open(&dir.path().join("breach.jsonl")).unwrap();
        let (answered, heard) = std::sync::mpsc::channel::<bool>();
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let held_too_long = std::thread::scope(|scope| {
            let held = &log;
            let holder = scope.spawn(move || {
                let guard = held.lock();
                held_tx.send(()).unwrap();
                let healthy = heard.recv_timeout(std::time::Duration::from_secs(60));
                drop(guard);
                healthy
            });
            held_rx.recv().unwrap();
            answered.send(log.is_healthy()).unwrap();
            holder.join().unwrap()
        });
        assert_eq!(held_too_long, Ok(true));
    }

    fn alert(id: &str) -> Alert {
        Alert {
            id: id.to_owned(),
            rule: Rule::Volume,
            mode: Mode::Alert,
            summary: "2000 records".into(),
            principal: None,
            key: "cllr".into(),
            client_addr: None,
            addresses: Vec::new(),
            evidence: vec![1, 2],
            evidence_refs: Vec::new(),
            detected_at: "2026-01-01T00:00:00.000Z".into(),
            report_by: "2026-01-04T00:00:00.000Z".into(),
            containment: None,
            classification: None,
            history: Vec::new(),
        }
    }

    fn class(c: Class, note: &str) -> Classification {
        Classification {
            class: c,
            note: note.into(),
            by: "sec".into(),
            role: "security".into(),
            at: "2026-01-01T01:00:00.000Z".into(),
        }
    }

    #[test]
    fn survives_reopen_keeps_history_and_cuts_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.jsonl");
        {
            let log = BreachLog::open(&path).unwrap();
            log.add(alert("A1")).unwrap();
            log.add(alert("A2")).unwrap();
            log.classify("A1", class(Class::NearMiss, "testing"))
                .unwrap();
            let a = log
                .classify("A1", class(Class::Reportable, "on reflection"))
                .unwrap();
            assert_eq!(a.history.len(), 2);
            assert!(matches!(
                log.classify("A9", class(Class::NearMiss, "x")),
                Err(BreachError::NotFound(_))
            ));
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"entry\":\"alert\",\"id\":").unwrap();
        drop(f);
        let log = BreachLog::open(&path).unwrap();
        let (alerts, _) = log.alerts();
        assert_eq!(
            alerts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["A2", "A1"]
        );
        let a1 = &alerts[1];
        assert_eq!(a1.classification.as_ref().unwrap().class, Class::Reportable);
        assert_eq!(a1.history[0].class, Class::NearMiss);
        log.add(alert("A3")).unwrap();
        assert_eq!(BreachLog::open(&path).unwrap().alerts().0.len(), 3);

        // Torn inside a character (a note's accent: `é` is two bytes, and the crash came
        // after the first): still a torn line, cut off, and the log opens.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"entry\":\"alert\",\"note\":\"caf\xC3")
            .unwrap();
        drop(f);
        let log = BreachLog::open(&path).unwrap();
        assert_eq!(log.alerts().0.len(), 3);
        log.add(alert("A4")).unwrap();
        assert_eq!(BreachLog::open(&path).unwrap().alerts().0.len(), 4);
    }

    /// A containment that did not take never hides one that did: two operators, or an
    /// automatic containment and an operator, may both try. The same for an alert memory no
    /// longer holds (read back from the file).
    #[test]
    fn a_failed_containment_never_replaces_one_that_took() {
        for keep in [ALERTS_KEPT, 1] {
            failed_containment_never_replaces_one_that_took(keep);
        }
    }

    fn failed_containment_never_replaces_one_that_took(keep: usize) {
        let dir = tempfile::tempdir().unwrap();
        let log = BreachLog::open_keeping(&dir.path().join("b.jsonl"), keep).unwrap();
        log.add(alert("A1")).unwrap();
        // With `keep` 1, A1 is now only in the file.
        log.add(alert("A2")).unwrap();
        let tried = |outcome: &str| Containment {
            subject: "demo-canvasser".into(),
            token_id: "t-1".into(),
            at: "2026-01-01T01:00:00.000Z".into(),
            outcome: outcome.into(),
        };
        let outcome = |a: Alert| a.containment.unwrap().outcome;
        let a = log.contain("A1", tried("not revoked: disk full")).unwrap();
        assert_eq!(outcome(a), "not revoked: disk full");
        let a = log.contain("A1", tried("revoked: not yet shared")).unwrap();
        assert_eq!(outcome(a), "revoked: not yet shared");
        let a = log.contain("A1", tried("not revoked: disk full")).unwrap();
        assert_eq!(outcome(a), "revoked: not yet shared");
        let a = log.contain("A1", tried("revoked")).unwrap();
        assert_eq!(outcome(a), "revoked");
        let lines = std::fs::read_to_string(dir.path().join("b.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 5, "{lines}");
        assert_eq!(log.alerts().1, if keep == 1 { 1 } else { 0 });
        assert!(matches!(
            log.contain("A9", tried("revoked")),
            Err(BreachError::NotFound(_))
        ));
    }

    /// Memory holds the newest alerts only (an alert storm fills the file, not the heap); an
    /// older one is still found, classified and contained by its id, from the file, and the
    /// state read back at the next start is the same.
    #[test]
    fn only_the_newest_alerts_are_held_and_older_ones_are_acted_on_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.jsonl");
        let log = BreachLog::open_keeping(&path, 3).unwrap();
        for id in ["A1", "A2", "A3", "A4", "A5"] {
            log.add(alert(id)).unwrap();
        }
        let ids = |(alerts, older): (Vec<Alert>, u64)| {
            let ids: Vec<String> = alerts.into_iter().map(|a| a.id).collect();
            (ids, older)
        };
        assert_eq!(
            ids(log.alerts()),
            (vec!["A5".into(), "A4".into(), "A3".into()], 2)
        );
        // The file's ids are every alert's, those only the file holds among them.
        let in_file = log.ids_in_file().unwrap();
        let mut in_file: Vec<&str> = in_file.iter().map(String::as_str).collect();
        in_file.sort_unstable();
        assert_eq!(in_file, ["A1", "A2", "A3", "A4", "A5"]);
        // A1 is only in the file: found, classified twice, contained.
        assert_eq!(log.alert("A1").unwrap().unwrap(), alert("A1"));
        log.classify("A1", class(Class::NearMiss, "first look"))
            .unwrap();
        let a = log
            .classify("A1", class(Class::Reportable, "on reflection"))
            .unwrap();
        assert_eq!(a.history.len(), 2);
        assert_eq!(a.classification.as_ref().unwrap().class, Class::Reportable);
        let contained = Containment {
            subject: "cllr".into(),
            token_id: "t-1".into(),
            at: "2026-01-01T02:00:00.000Z".into(),
            outcome: "revoked".into(),
        };
        let a = log.contain("A1", contained.clone()).unwrap();
        assert_eq!(a.containment.as_ref(), Some(&contained));
        assert_eq!(log.alert("A1").unwrap().unwrap(), a);
        // Still not held, and an id never raised is none, from memory or file.
        assert_eq!(ids(log.alerts()).1, 2);
        assert!(log.alert("A9").unwrap().is_none());
        assert!(matches!(
            log.classify("A9", class(Class::NearMiss, "x")),
            Err(BreachError::NotFound(_))
        ));
        // A held alert's entries are applied in memory too.
        let a3 = log.classify("A3", class(Class::NearMiss, "test")).unwrap();
        assert_eq!(ids(log.alerts()).0[2], "A3");
        assert_eq!(log.alerts().0[2], a3);
        drop(log);
        let reopened = BreachLog::open_keeping(&path, 3).unwrap();
        assert_eq!(
            ids(reopened.alerts()),
            (vec!["A5".into(), "A4".into(), "A3".into()], 2)
        );
        assert_eq!(reopened.alerts().0[2], a3);
        assert_eq!(reopened.alert("A1").unwrap().unwrap(), a);
        let all = BreachLog::open(&path).unwrap();
        assert_eq!(ids(all.alerts()).1, 0);
        assert_eq!(all.alerts().0[4], a);
    }

    #[test]
    fn a_corrupt_line_in_the_middle_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.jsonl");
        std::fs::write(&path, "not json\n{}\n").unwrap();
        let err = format!("{:#}", BreachLog::open(&path).err().unwrap());
        assert!(err.contains("line 1"), "{err}");
    }
}
