//! Breach detection picks up where the last run left off: at start, before it examines a new
//! record, the detector reads back the newest part of the audit log.
//!
//! The rules keep their windows and cooldowns in memory, so without this a restart (a deploy,
//! a crash) would forget them: 900 records read before a deploy and 900 after would raise no
//! `volume` alert, and every principal alerted on in the last hour could be alerted on again
//! at once. The log holds everything the detector saw, in order and with its own timestamps
//! (the rules read the wall clock only to take a record dated ahead of it as made just
//! after now), so reading it again rebuilds the same state:
//!
//! - every access of the last `reach` (the longest rule window and the cooldown: with the
//!   defaults, two hours) is examined again, filling the windows and the console's volume
//!   chart, with its client address unsealed while its day's key exists;
//! - each of this replica's alerts in the breach log whose cooldown reaches into the reach
//!   puts its rule back in its cooldown for its principal, after the last record of its
//!   evidence (`Recalling`): the breach log reaches back past the byte bound below;
//! - each `breach_alert` record of this replica's own detector does the same, from when it
//!   was detected (`Detector::raised_before`), and so does each `alerted_elsewhere` record
//!   (a finding of this replica's that another detector had raised first, `watch::act`);
//!   the cross-replica detector's (`evidence_refs`) never quieted this replica's rules;
//! - a finding the replay makes puts its rule in its cooldown for the principal, as it did
//!   in the run that made it, and waits (`Replayed::pending`). An alert on that rule and
//!   principal (in either log) detected within the rule's window after it was made, or
//!   within a cooldown before it, stands for it (`Alerted::settle`). One without (the run ended between the finding and
//!   its alert, had no room for it, or the rules were made stricter for this run: a lower
//!   limit, a rule turned on) is raised by this run (`watch::run`), in `alert` and `contain`
//!   modes; a `monitor` finding only ever showed, and is not shown twice.
//!
//! Reading is bounded by `MAX_BYTES` (the newest bytes of the log), which bounds how long
//! the start takes; a log busier than that over `reach` is read back from where the bound
//! falls, and the server log says from when. The run then skips the records it has read
//! back as they arrive live (`Replayed::through`). A record dated ahead of this host's clock
//! (by more than `MAX_AHEAD`: the clock was set back since) is not read back: the windows
//! would hold it until the clock caught up, and count it against every record until then.
//!
//! What it does not rebuild: the cross-replica detector's state (`shared`), which lives in
//! the leading replica's memory and in Redis.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::addr::Revealer;
use crate::audit::segment::{first_ts, list_segments, read_line};
use crate::audit::{AuditRecord, RecordKind};

use super::breach::Alert;
use super::rules::{self, Detector, Finding, Observation};
use super::settings::{Mode, Rule, WatchSettings};

/// The newest bytes of the log read back at most.
pub const MAX_BYTES: u64 = 256 * 1024 * 1024;

/// How far ahead of this host's clock a record may be dated and still be read back.
pub const MAX_AHEAD: Duration = Duration::from_secs(5 * 60);

/// Findings kept waiting for their `breach_alert` record at most; past it the oldest are let
/// go (`Replayed::let_go`).
const MAX_PENDING: usize = 10_000;

/// What reading back the log found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Replayed {
    /// The newest record read back: a live record up to it has been examined already.
    pub through: u64,
    /// Accesses examined again.
    pub accesses: u64,
    /// Alerts whose cooldowns were put back.
    pub alerts: u64,
    /// Lines that could not be read as records (a damaged log; `wardgate audit verify` says
    /// where).
    pub unreadable: u64,
    /// The byte bound cut the reading short of `reach`: what came before `first` in the reach
    /// was not read back.
    pub cut_short: bool,
    /// The time of the first record read back.
    pub first: Option<String>,
    /// Records dated more than `MAX_AHEAD` ahead of the clock, not read back.
    pub ahead: u64,
    /// Findings in `alert` or `contain` mode that no alert in either log stands for
    /// (`settle`): this run raises them.
    pub pending: Vec<Finding>,
    /// Findings without an alert not raised at start: past `MAX_PENDING`, the oldest first.
    pub let_go: u64,
    /// Alerts this replica raised (its `breach_alert` records) that the breach log passed to
    /// `replay` does not hold, oldest first (at most `breach::ALERTS_KEPT`, the newest): an
    /// append that failed and was still being tried again when the process stopped, or a
    /// crash between the two writes. Read back as the audit copy has them, the address put
    /// back where its day's key still reveals it (the `addresses` of a `many_addresses`
    /// alert are not in the copy), and with the containment the log records for each. An
    /// alert a `breach_logged` record says the breach log took is not one of them: pruned
    /// or rotated out of it since, it must not come back open.
    pub unlogged: Vec<Alert>,
    /// Of those, the oldest let go past the most kept.
    pub unlogged_let_go: u64,
}

/// How far back the detector's state reaches: its longest rule window, then the cooldown of
/// an alert raised at that window's start.
pub fn reach(settings: &WatchSettings) -> Duration {
    let longest = (Rule::ALL.iter())
        .map(|r| settings.rule(*r).window)
        .max()
        .unwrap_or_default();
    longest.saturating_add(settings.cooldown)
}

/// The part of a `breach_alert` record's alert that names its rule and principal.
#[derive(Deserialize)]
struct RaisedAlert {
    rule: Rule,
    key: String,
    detected_at: String,
    /// The caller, when known (`null` for an alert keyed on an address).
    #[serde(default)]
    principal: Option<serde::de::IgnoredAny>,
    /// The cross-replica detector's evidence (none for a replica's own alert).
    #[serde(default)]
    evidence_refs: Vec<serde::de::IgnoredAny>,
}

/// Reads back the records of the last `reach(settings)` before `now_ms` (at most
/// `max_bytes`, the newest), up to the record `durable` (the chain head when reading began:
/// a line after it may be of a batch not acknowledged yet, whose failed sync would cut it and
/// give its numbers to other records), from the log in `dir`, into `detector` (with the
/// cooldowns of `alerts`, the breach log's, put back among them: `Recalling`) and to
/// `volume` (each access, for the console's chart).
pub fn replay(
    dir: &Path,
    settings: &WatchSettings,
    detector: &mut Detector,
    (now_ms, durable): (i64, u64),
    max_bytes: u64,
    alerts: &[Alert],
    volume: &mut dyn FnMut(&AuditRecord),
) -> io::Result<Replayed> {
    let reach_ms = i64::try_from(reach(settings).as_millis()).unwrap_or(i64::MAX);
    let from_ms = now_ms.saturating_sub(reach_ms);
    let until_ms = now_ms.saturating_add(MAX_AHEAD.as_millis() as i64);
    let mut out = Replayed::default();
    let mut recalling = Recalling::new(detector, alerts, (now_ms, durable));
    let cooldown_ms = i64::try_from(settings.cooldown.as_millis()).unwrap_or(i64::MAX);
    let read_back_mark_ms = i64::try_from(super::READ_BACK_MARK.as_millis()).unwrap_or(i64::MAX);
    // Every alert on each principal, from both logs (`settle`).
    let mut alerted = Alerted::default();
    for a in alerts {
        if let Some(at) = rules::ts_millis(&a.detected_at) {
            // A live alert's mark was taken for a cooldown from when it was raised (its
            // finding's time, give or take the queue); a read-back one's record says more.
            let mark_until = (a.evidence_refs.is_empty()).then(|| at.saturating_add(cooldown_ms));
            alerted.note(a.rule, &a.key, at, mark_until);
        }
    }
    let logged: HashSet<&str> = alerts.iter().map(|a| a.id.as_str()).collect();
    let mut unlogged = Unlogged::default();
    let mut contained = Contained::default();
    let mut revealer = Revealer::new(dir);
    let mut line = Vec::new();
    let (segments, cut_short) = to_read(dir, from_ms, max_bytes)?;
    out.cut_short = cut_short;
    'segments: for (path, start) in segments {
        let cut = start > 0;
        let file = match File::open(&path) {
            Ok(f) => f,
            // Pruned since it was listed: older than anything the reach needs.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        if cut {
            // Into the middle of a line: from the next one on.
            reader.seek(SeekFrom::Start(start - 1))?;
            line.clear();
            read_line(&mut reader, &mut line)?;
        }
        loop {
            line.clear();
            if read_line(&mut reader, &mut line)? == 0 {
                break;
            }
            // A line without its newline is one being written (or torn): not durable yet.
            if line.pop() != Some(b'\n') {
                break;
            }
            let Some((seq, mut record)) = read_record(&line) else {
                out.unreadable += 1;
                continue;
            };
            if seq > durable {
                break 'segments;
            }
            let Some(at) = rules::ts_millis(&record.ts) else {
                out.unreadable += 1;
                continue;
            };
            if at < from_ms {
                continue;
            }
            if at > until_ms {
                out.ahead += 1;
                continue;
            }
            recalling.before(detector, seq);
            if out.first.is_none() {
                out.first = Some(record.ts.clone());
            }
            out.through = out.through.max(seq);
            if record.kind == RecordKind::System {
                if record.route.as_deref() == Some("watch.breach_alert")
                    && let Some(alert) = not_logged(&record, &logged, &mut revealer)
                {
                    unlogged.push(alert);
                }
                unlogged.note(&record);
                contained.note(&record);
                // An alert this replica raised, or one another detector raised first (its
                // finding was this replica's too: `watch::act`).
                if let Some(route @ ("watch.breach_alert" | "watch.alerted_elsewhere")) =
                    record.route.as_deref()
                    && let Some(r) = raised(&record, &mut revealer)
                {
                    // The cross-replica detector's alerts never quieted this replica's rules
                    // (its own finding on those records, if any, was `alerted_elsewhere`).
                    if r.own {
                        detector.raised_before(r.rule, &r.key, r.at);
                    }
                    // Its mark in Redis, taken when this record was made, lasts a cooldown
                    // (`READ_BACK_MARK` at least, for one raised when a log was read back).
                    let mark_until = (r.own && route == "watch.breach_alert")
                        .then(|| at.saturating_add(cooldown_ms.max(read_back_mark_ms)));
                    alerted.note(r.rule, &r.key, r.at, mark_until);
                    out.alerts += 1;
                }
                continue;
            }
            record.client_addr = (record.client_addr.take()).and_then(|a| revealer.reveal(&a));
            volume(&record);
            let Some(observation) = Observation::of(&record) else {
                continue;
            };
            out.accesses += 1;
            for f in detector.observe_access(seq, &observation) {
                // Shown by the run that made it, if it ran in this mode: nothing records it.
                if matches!(f.mode, Mode::Alert | Mode::Contain) {
                    out.pending.push(Finding {
                        read_back: true,
                        ..f
                    });
                }
            }
            // Trimmed now and then, not at each finding, and with room left for findings whose
            // alert records are still to come: what alerts stand for is let go first, then
            // the oldest.
            if out.pending.len() >= 3 * MAX_PENDING {
                alerted.settle(&mut out.pending, settings);
                let over = out.pending.len().saturating_sub(2 * MAX_PENDING);
                out.pending.drain(..over);
                out.let_go += over as u64;
            }
        }
    }
    recalling.before(detector, u64::MAX);
    (out.unlogged, out.unlogged_let_go) = unlogged.into_oldest_first();
    for alert in &mut out.unlogged {
        alert.containment = contained.of(alert);
    }
    alerted.settle(&mut out.pending, settings);
    alerted.mark_under_own(&mut out.pending, now_ms);
    let over = out.pending.len().saturating_sub(MAX_PENDING);
    out.pending.drain(..over);
    out.let_go += over as u64;
    Ok(out)
}

/// How long after a finding an alert on its rule and principal may be detected and still be
/// its own, for a rule without a window (or a shorter one): `watch::act` dates an alert when
/// its finding was made, so this is room for another detector's alert on the same records
/// (the cross-replica one's, from the same records as they reached it) and for logs written
/// before `alerted_elsewhere` records were.
const ALERTED_WITHIN: i64 = 60_000;

/// When each principal was alerted on, by rule, and for an alert raised by this replica's
/// own detector, until when its mark in Redis may stand: from both logs.
#[derive(Default)]
struct Alerted(HashMap<String, Vec<(Rule, i64, Option<i64>)>>);

impl Alerted {
    fn note(&mut self, rule: Rule, key: &str, at: i64, mark_until: Option<i64>) {
        (self.0.entry(key.to_owned()).or_default()).push((rule, at, mark_until));
    }

    /// Notes the findings on whose rule and principal an alert of this replica's own (a run
    /// before this one's: its holder's name is new at each start) may still hold the mark in
    /// Redis at `now_ms`: another case's (`settle` left them), raised without a mark
    /// (`Finding::under_own_mark`).
    fn mark_under_own(&self, pending: &mut [Finding], now_ms: i64) {
        for f in pending {
            let on = self.0.get(f.key.as_str()).map_or(&[][..], Vec::as_slice);
            f.under_own_mark = (on.iter())
                .any(|&(rule, _, until)| rule == f.rule && until.is_some_and(|u| u > now_ms));
        }
    }

    /// Lets go of the findings an alert on their rule and principal stands for: one detected
    /// within the rule's window after the finding was made (it counted the finding's last
    /// record: the same case, the run before raised it, or another detector did,
    /// `alerted_elsewhere`; with a lower limit, say, the finding is made again at an earlier
    /// record of the alert's), or within a cooldown before it. The run before was quiet for
    /// that principal then, and a finding made again within that cooldown is one the replay
    /// made where it did not: its level of escalation (in neither log) or the finding that
    /// began the cooldown (before what was read back) was not known to it. Any other alert
    /// is another case's, and does not stand for this one.
    fn settle(&self, pending: &mut Vec<Finding>, s: &WatchSettings) {
        let cooldown = i64::try_from(s.cooldown.as_millis()).unwrap_or(i64::MAX);
        pending.retain(|f| {
            let window = i64::try_from(s.rule(f.rule).window.as_millis()).unwrap_or(i64::MAX);
            let from = f.at_ms.saturating_sub(cooldown);
            let to = f.at_ms.saturating_add(window.max(ALERTED_WITHIN));
            let on = self.0.get(f.key.as_str()).map_or(&[][..], Vec::as_slice);
            !on.iter()
                .any(|&(rule, at, _)| rule == f.rule && (from..=to).contains(&at))
        });
    }
}

/// Puts back the cooldowns of this replica's alerts in the breach log (`alerts`, any order)
/// that reach into the rules' reach before `now_ms`. The breach log keeps its newest alerts
/// (`breach::ALERTS_KEPT`) whatever the audit log's byte bound (`MAX_BYTES`) cut off, and
/// keys them as raised (an address in the clear, not sealed).
pub fn recall(detector: &mut Detector, alerts: &[Alert], now_ms: i64) {
    Recalling::new(detector, alerts, (now_ms, u64::MAX)).before(detector, u64::MAX);
}

/// This replica's alerts in the breach log that reach into the rules' reach, put back as the
/// log is read, each after the last record of its evidence (the record that made its finding,
/// by its number: records are not always written in the order of their times), so that the
/// records that made its finding are judged as the run before judged them (the finding made
/// again where they are read back) and those after it within its cooldown. Alerts of the
/// cross-replica detector (`evidence_refs`) never put this replica's rules in a cooldown, and
/// are not put back; their findings here were recorded as `alerted_elsewhere`.
struct Recalling<'a> {
    /// By the number of their last record, lowest first.
    alerts: Vec<(u64, i64, &'a Alert)>,
    next: usize,
}

impl<'a> Recalling<'a> {
    /// `durable`: the log's newest record; an alert citing records past it cites those of a
    /// log since set aside (a new audit directory), and is put back before the first record.
    fn new(detector: &Detector, alerts: &'a [Alert], (now_ms, durable): (i64, u64)) -> Self {
        let settings = detector.settings();
        let cooldown = i64::try_from(settings.cooldown.as_millis()).unwrap_or(i64::MAX);
        let reach_ms = i64::try_from(reach(settings).as_millis()).unwrap_or(i64::MAX);
        let from_ms = now_ms.saturating_sub(reach_ms);
        let mut alerts: Vec<(u64, i64, &Alert)> = (alerts.iter())
            .filter(|a| a.evidence_refs.is_empty())
            .filter_map(|a| {
                let last = *a.evidence.iter().max()?;
                let last = if last > durable { 0 } else { last };
                Some((last, rules::ts_millis(&a.detected_at)?, a))
            })
            .filter(|(_, at, _)| at.saturating_add(cooldown) > from_ms)
            .collect();
        alerts.sort_by_key(|(last, _, _)| *last);
        Recalling { alerts, next: 0 }
    }

    /// Puts back those whose last record came before the record `seq`.
    fn before(&mut self, detector: &mut Detector, seq: u64) {
        while let Some(&(last, at, alert)) = self.alerts.get(self.next)
            && last < seq
        {
            detector.raised_before(alert.rule, &alert.key, at);
            self.next += 1;
        }
    }
}

/// The segments to read, oldest first, each with where to start in it: from the newest back
/// to the one holding `from_ms`, or as far as `max_bytes` of them reach (then `true`: the
/// reading falls short of `from_ms`, or may).
fn to_read(dir: &Path, from_ms: i64, max_bytes: u64) -> io::Result<(Vec<(PathBuf, u64)>, bool)> {
    let mut chosen = Vec::new();
    let mut budget = max_bytes;
    let mut short = false;
    for (_, path) in list_segments(dir)?.into_iter().rev() {
        if budget == 0 {
            short = true;
            break;
        }
        let len = match File::open(&path) {
            Ok(mut f) => {
                let len = f.metadata()?.len();
                written_len(&mut f, len)?
            }
            // Pruned since it was listed: older than anything the reach needs.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let start = len.saturating_sub(budget);
        budget -= len - start;
        let covers = first_ts(&path)
            .and_then(|ts| rules::ts_millis(&ts))
            .is_some_and(|first| first <= from_ms);
        chosen.push((path, start));
        if start > 0 {
            short = true;
            break;
        }
        if covers {
            break;
        }
    }
    chosen.reverse();
    Ok((chosen, short))
}

/// Where a segment's written records end: at its first NUL byte (the space made ready for
/// records not yet written is zeros, and no record holds one), found by bisection, so that
/// the byte bound counts records, not the space made ready after them.
fn written_len(file: &mut (impl Read + Seek), len: u64) -> io::Result<u64> {
    let (mut lo, mut hi) = (0u64, len);
    let mut byte = [0u8; 1];
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        file.seek(SeekFrom::Start(mid))?;
        // Shorter than it was (the writer gave back the space made ready past a finished
        // segment's records): that is past the records too.
        let past = match file.read_exact(&mut byte) {
            Ok(()) => byte[0] == 0,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(e),
        };
        if past {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// A log line's sequence number and record.
fn read_record(line: &[u8]) -> Option<(u64, AuditRecord)> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    // Every line starts with its sequence number (`{"seq":N,`): read without a second parse.
    let seq = line
        .strip_prefix(b"{\"seq\":")
        .map(|rest| {
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
        })
        .unwrap_or_else(|| Some(serde_json::from_slice::<Seq>(line).ok()?.seq))?;
    Some((seq, serde_json::from_slice(line).ok()?))
}

/// What a `breach_alert` or `alerted_elsewhere` record says was raised.
struct Raised {
    rule: Rule,
    key: String,
    at: i64,
    /// This replica's own detector's (not the cross-replica one's).
    own: bool,
}

/// What a `breach_alert` or `alerted_elsewhere` record says was raised. Its alert keys a
/// caller not known by `addr` alone (the address is the record's, sealed): unsealed, it
/// gives the principal back while its day's key exists.
/// Alerts read back that the breach log may not hold, in the order of their records: at most
/// `breach::ALERTS_KEPT`, the oldest let go past it; one a `breach_logged` record names is
/// dropped.
#[derive(Default)]
struct Unlogged {
    by_id: HashMap<String, Alert>,
    order: std::collections::VecDeque<String>,
    let_go: u64,
}

impl Unlogged {
    fn push(&mut self, alert: Alert) {
        while self.by_id.len() >= super::breach::ALERTS_KEPT {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.let_go += u64::from(self.by_id.remove(&oldest).is_some());
        }
        self.order.push_back(alert.id.clone());
        self.by_id.insert(alert.id.clone(), alert);
    }

    /// Lets go of the alerts a `breach_logged` record says the breach log took.
    fn note(&mut self, record: &AuditRecord) {
        if record.route.as_deref() != Some("watch.breach_logged") {
            return;
        }
        let ids = (record.detail.as_ref())
            .and_then(|d| d.get("alerts"))
            .and_then(|a| a.as_array());
        for id in ids.into_iter().flatten().filter_map(|id| id.as_str()) {
            self.by_id.remove(id);
        }
    }

    fn into_oldest_first(mut self) -> (Vec<Alert>, u64) {
        let alerts = (self.order.into_iter())
            .filter_map(|id| self.by_id.remove(&id))
            .collect();
        (alerts, self.let_go)
    }
}

/// The alert of a `breach_alert` record, when `logged` (the breach log's) does not hold it.
fn not_logged(
    record: &AuditRecord,
    logged: &HashSet<&str>,
    revealer: &mut Revealer,
) -> Option<Alert> {
    let mut alert = Alert::deserialize(record.detail.as_ref()?).ok()?;
    if logged.contains(alert.id.as_str()) {
        return None;
    }
    // The copy's address is the record's own, sealed with its day's key (`watch::act`).
    alert.client_addr = (record.client_addr.as_deref()).and_then(|a| revealer.reveal(a));
    if alert.key == "addr"
        && alert.principal.is_none()
        && let Some(addr) = &alert.client_addr
    {
        alert.key = rules::address_key(addr);
    }
    Some(alert)
}

/// What the log says of each alert's containment (`watch::contain`): its
/// `breach_containment` record (the revocation made), and a `breach_containment_failed` one
/// when it did not take everywhere.
#[derive(Default)]
struct Contained(HashMap<String, super::breach::Containment>);

impl Contained {
    fn note(&mut self, record: &AuditRecord) {
        let Some(detail) = record.detail.as_ref() else {
            return;
        };
        match record.route.as_deref() {
            Some("watch.breach_containment") => {
                let Ok(event) = crate::controls::Event::deserialize(detail) else {
                    return;
                };
                let crate::controls::Change::RevokeSubject { subject } = event.change else {
                    return;
                };
                let alert = (event.reason.strip_prefix("containment for alert "))
                    .and_then(|r| r.split_once(':'))
                    .map(|(id, _)| id.to_owned());
                if let Some(alert) = alert {
                    let made = super::breach::Containment {
                        subject,
                        token_id: String::new(),
                        at: record.ts.clone(),
                        outcome: "revoked".to_owned(),
                    };
                    self.0.insert(alert, made);
                }
            }
            Some("watch.breach_containment_failed") => {
                let (Some(alert), Some(outcome)) = (
                    detail.get("alert").and_then(|a| a.as_str()),
                    detail.get("outcome").and_then(|o| o.as_str()),
                ) else {
                    return;
                };
                if let Some(made) = self.0.get_mut(alert) {
                    made.outcome = outcome.to_owned();
                }
            }
            _ => {}
        }
    }

    /// The containment of `alert`, with the token the alert saw (as `watch::contain` says).
    fn of(&self, alert: &Alert) -> Option<super::breach::Containment> {
        let mut made = self.0.get(&alert.id)?.clone();
        made.token_id = (alert.principal.as_ref()).map_or_else(String::new, |p| p.token_id.clone());
        Some(made)
    }
}

fn raised(record: &AuditRecord, revealer: &mut Revealer) -> Option<Raised> {
    let alert = RaisedAlert::deserialize(record.detail.as_ref()?).ok()?;
    let at = rules::ts_millis(&alert.detected_at)?;
    // A subject named `addr` is a principal's key, as written.
    let key = if alert.key == "addr" && alert.principal.is_none() {
        let addr = revealer.reveal(record.client_addr.as_deref()?)?;
        rules::address_key(&addr)
    } else {
        alert.key
    };
    Some(Raised {
        rule: alert.rule,
        key,
        at,
        own: alert.evidence_refs.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::{AuditLog, AuditSettings, Decision, Durability};
    use crate::watch::rules::now_millis;
    use crate::watch::rules::tests::{listing, ts};

    /// Half an hour ago: inside every default window.
    fn base() -> i64 {
        now_millis() - 30 * 60 * 1000
    }

    /// A refusal of a caller not known, from `addr`.
    fn refused(addr: &str, ms: i64) -> AuditRecord {
        let mut r = listing("x", ms, 0);
        (r.caller, r.client_addr) = (None, Some(addr.to_owned()));
        (r.decision, r.status, r.reason) = (Decision::Deny, 401, Some("token_missing".into()));
        r
    }

    /// The `breach_alert` record `watch::act` writes for an alert on `rule` keyed `key`.
    fn alert_record(rule: &str, key: &str, client_addr: Option<&str>, ms: i64) -> AuditRecord {
        let mut r = AuditRecord::system("watch.breach_alert", "breach_alert");
        r.ts = ts(ms);
        r.client_addr = client_addr.map(str::to_owned);
        r.detail = Some(serde_json::json!({
            "id": "A-1", "rule": rule, "mode": "alert", "summary": "s", "principal": null,
            "key": key, "client_addr": null, "evidence": [1], "detected_at": ts(ms),
            "report_by": ts(ms), "containment": null, "classification": null, "history": [],
        }));
        r
    }

    async fn log_of(records: Vec<AuditRecord>, segment_max_bytes: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(AuditSettings {
            dir: dir.path().to_owned(),
            durability: Durability::PageCache,
            max_batch: 1,
            commit_window: Duration::ZERO,
            segment_max_bytes,
            seal_client_addr: true,
        })
        .unwrap();
        for r in records {
            log.append(r).await.unwrap();
        }
        log.shutdown().await;
        dir
    }

    /// The defaults, but for the rules these tests do not look at that the same records
    /// would raise too: one response's size, and (when the suite runs at night) the hours.
    fn settings() -> WatchSettings {
        let mut s = WatchSettings::defaults(Path::new("/tmp"));
        for rule in [Rule::LargeExport, Rule::UnusualHours] {
            s.rules.get_mut(&rule).unwrap().mode = crate::watch::settings::Mode::Off;
        }
        s
    }

    /// A detector holding what `dir`'s log says, and what reading it found.
    fn replayed(dir: &Path, max_bytes: u64) -> (Detector, Replayed, u64) {
        let mut d = Detector::new(settings());
        let mut seen = 0;
        let r = replay(
            dir,
            &settings(),
            &mut d,
            (now_millis(), u64::MAX),
            max_bytes,
            &[],
            &mut |_| {
                seen += 1;
            },
        )
        .unwrap();
        (d, r, seen)
    }

    /// `settings`, with the councillor's volume limit lowered to 1,000: rules made stricter
    /// across a restart.
    fn stricter() -> WatchSettings {
        let mut s = settings();
        let volume = s.rules.get_mut(&Rule::Volume).unwrap();
        volume.limits.insert("councillor".to_owned(), 1_000);
        s
    }

    /// A detector holding what `dir`'s log says under `s`, with the breach log's `alerts`
    /// put back, and what reading it found.
    fn replayed_with(dir: &Path, s: &WatchSettings, alerts: &[Alert]) -> (Detector, Replayed) {
        let mut d = Detector::new(s.clone());
        let at = (now_millis(), u64::MAX);
        let r = replay(dir, s, &mut d, at, MAX_BYTES, alerts, &mut |_| {}).unwrap();
        (d, r)
    }

    fn rules(f: &[Finding]) -> Vec<Rule> {
        f.iter().map(|f| f.rule).collect()
    }

    /// Alerts in the audit log that the breach log passed in does not hold come back
    /// (`unlogged`, for `watch::resume` to add): an address-keyed one with its address
    /// revealed and keyed as raised, a contained one with the containment the log records and
    /// the outcome its failure says; one the breach log holds does not.
    #[tokio::test]
    async fn alerts_the_breach_log_does_not_hold_are_read_back_whole() {
        let b = base();
        let by_addr = alert_record("denied_burst", "addr", Some("203.0.113.9"), b);
        let caller = crate::audit::Caller {
            subject: "alice".into(),
            role: "councillor".into(),
            unit: "E05001".into(),
            token_id: "t-1".into(),
        };
        let mut contained = alert_record("volume", "alice", None, b + 1_000);
        let detail = contained.detail.as_mut().unwrap();
        detail["id"] = "A-2".into();
        detail["principal"] = serde_json::to_value(&caller).unwrap();
        let event =
            crate::watch::containment(&caller, crate::watch::ACTOR, "containment for alert A-2: s");
        let mut made = AuditRecord::system("watch.breach_containment", "breach_containment");
        made.detail = serde_json::to_value(&event).ok();
        let mut failed = AuditRecord::system(
            "watch.breach_containment_failed",
            "breach_containment_failed",
        );
        failed.detail = Some(serde_json::json!({
            "alert": "A-2", "containment": event.id, "subject": "alice",
            "outcome": "revoked: on this replica only",
        }));
        let mut held = alert_record("volume", "bob", None, b + 2_000);
        held.detail.as_mut().unwrap()["id"] = "A-3".into();
        let held_alert = Alert::deserialize(held.detail.as_ref().unwrap()).unwrap();
        // One the breach log took, and that has since been pruned out of it.
        let mut pruned = alert_record("volume", "carol", None, b + 3_000);
        pruned.detail.as_mut().unwrap()["id"] = "A-4".into();
        let mut took = AuditRecord::system("watch.breach_logged", "breach_logged");
        took.detail = Some(serde_json::json!({ "alerts": ["A-4"] }));
        let records = vec![by_addr, contained, made, failed, held, pruned, took];
        let dir = log_of(records, 1 << 20).await;
        let (_, r) = replayed_with(dir.path(), &settings(), &[held_alert]);
        let ids: Vec<&str> = r.unlogged.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["A-1", "A-2"]);
        assert_eq!(r.unlogged[0].client_addr.as_deref(), Some("203.0.113.9"));
        assert_eq!(r.unlogged[0].key, rules::address_key("203.0.113.9"));
        assert_eq!(r.unlogged[0].containment, None);
        let c = r.unlogged[1].containment.as_ref().expect("its containment");
        assert_eq!((c.subject.as_str(), c.token_id.as_str()), ("alice", "t-1"));
        assert_eq!(c.outcome, "revoked: on this replica only");
        assert_eq!(r.unlogged[1].key, "alice");
    }

    /// 1,500 records before the restart and 600 after reach the councillor's 2,000: the alert
    /// cites the records of both runs. Neither run alone raises it.
    #[tokio::test]
    async fn a_scrape_split_by_a_restart_is_counted_whole() {
        let b = base();
        let dir = log_of(
            vec![listing("alice", b, 900), listing("alice", b + 60_000, 600)],
            1 << 20,
        )
        .await;
        let (mut d, r, seen) = replayed(dir.path(), MAX_BYTES);
        assert_eq!(
            (r.through, r.accesses, r.alerts, r.unreadable, seen),
            (2, 2, 0, 0, 2)
        );
        assert!(!r.cut_short);
        let after = listing("alice", b + 120_000, 600);
        let f = d.observe(3, &after);
        assert_eq!(rules(&f), [Rule::Volume], "{f:?}");
        assert_eq!(f[0].evidence, [1, 2, 3]);
        // Without the log read back: nothing.
        assert_eq!(
            Detector::new(settings()).observe(3, &after),
            Vec::<Finding>::new()
        );
    }

    /// A finding the replay makes is not raised again (the run that made it acted on it), and
    /// the alert's record keeps its rule quiet for the principal for the rest of the cooldown:
    /// as much again raises nothing, twice the threshold an escalation.
    #[tokio::test]
    async fn an_alert_before_the_restart_keeps_its_cooldown() {
        let b = base();
        let records = vec![
            listing("alice", b, 2_100),
            alert_record("volume", "alice", None, b),
        ];
        let dir = log_of(records, 1 << 20).await;
        let (mut d, r, _) = replayed(dir.path(), MAX_BYTES);
        assert_eq!((r.through, r.accesses, r.alerts), (2, 1, 1));
        assert_eq!(
            r.pending,
            Vec::<Finding>::new(),
            "its alert record follows it"
        );
        let again = listing("alice", b + 11 * 60_000, 2_100);
        assert_eq!(d.observe(3, &again), Vec::<Finding>::new());
        assert_eq!(
            rules(&Detector::new(settings()).observe(3, &again)),
            [Rule::Volume]
        );
        let more = listing("alice", b + 12 * 60_000, 2_000);
        let f = d.observe(4, &more);
        assert_eq!(rules(&f), [Rule::Volume]);
        assert!(f[0].escalation > 0, "{f:?}");
    }

    /// A finding no `breach_alert` record follows (the run ended between the two) is
    /// handed back to be raised, citing its records; one its record follows is not.
    #[tokio::test]
    async fn a_finding_without_its_alert_record_is_raised_at_start() {
        let b = base();
        let records = vec![
            listing("alice", b, 2_100),
            listing("bob", b + 1, 2_100),
            alert_record("volume", "bob", None, b + 1),
        ];
        let dir = log_of(records, 1 << 20).await;
        let (mut d, r, _) = replayed(dir.path(), MAX_BYTES);
        assert_eq!(rules(&r.pending), [Rule::Volume], "{:?}", r.pending);
        let (f, at) = (&r.pending[0], rules::ts_millis(&ts(b)).unwrap());
        assert_eq!(
            (f.key.as_str(), &f.evidence[..], f.at_ms),
            ("alice", &[1][..], at)
        );
        // Raised, its rule is quiet for alice as it would have been.
        let again = listing("alice", b + 60_000, 2_100);
        assert_eq!(d.observe(4, &again), Vec::<Finding>::new());
    }

    /// Rules made stricter for this run (a lower limit) apply to what was read back: what
    /// now reaches a limit is raised, where the run before had nothing to raise.
    #[tokio::test]
    async fn a_limit_lowered_across_a_restart_raises_what_now_reaches_it() {
        let b = base();
        let dir = log_of(vec![listing("alice", b, 1_500)], 1 << 20).await;
        let (_, r) = replayed_with(dir.path(), &stricter(), &[]);
        assert_eq!(rules(&r.pending), [Rule::Volume], "{:?}", r.pending);
        assert_eq!(
            replayed(dir.path(), MAX_BYTES).1.pending,
            Vec::<Finding>::new()
        );
    }

    /// A `monitor` finding showed when it was made and nothing records it: it is not shown
    /// again, and its rule stays quiet for the principal.
    #[tokio::test]
    async fn a_monitor_finding_is_not_shown_again() {
        let b = base();
        let dir = log_of(vec![listing("alice", b, 2_100)], 1 << 20).await;
        let mut watching = settings();
        watching.rules.get_mut(&Rule::Volume).unwrap().mode = Mode::Monitor;
        let (mut d, r) = replayed_with(dir.path(), &watching, &[]);
        assert_eq!((r.accesses, r.pending.len()), (1, 0));
        let again = listing("alice", b + 60_000, 2_100);
        assert_eq!(d.observe(2, &again), Vec::<Finding>::new());
    }

    /// The breach log's alert on `rule` keyed `key`, detected at `ms`, whose evidence ends
    /// with the record `last` (0: one before what the log holds).
    fn logged_alert(rule: &str, key: &str, ms: i64, last: u64) -> Alert {
        let mut alert: Alert =
            serde_json::from_value(alert_record(rule, key, None, ms).detail.unwrap()).unwrap();
        alert.evidence = vec![last];
        alert
    }

    /// The breach log's alerts keep their rule quiet for their principal (an address in the
    /// clear) wherever their cooldown reaches into what is read back, though their records
    /// are not read back (before the reach, as here, or the byte bound); older ones do
    /// nothing. Alice's 2,100 records 110 minutes ago came within the cooldown of an alert
    /// five minutes before the reach: the run before made no finding of them, nor does this.
    #[tokio::test]
    async fn the_breach_logs_alerts_keep_their_cooldowns() {
        let now = now_millis();
        let minutes = |m: i64| now - m * 60_000;
        let dir = log_of(
            vec![
                listing("alice", minutes(110), 2_100),
                listing("dave", minutes(20), 2_100),
            ],
            1 << 20,
        )
        .await;
        let addr = "203.0.113.9";
        let alerts = [
            logged_alert("volume", "alice", minutes(125), 0),
            logged_alert("denied_burst", &format!("addr:{addr}"), minutes(10), 0),
            logged_alert("volume", "carol", minutes(180), 0),
        ];
        let (mut d, r) = replayed_with(dir.path(), &settings(), &alerts);
        let pending = r.pending;
        assert_eq!(rules(&pending), [Rule::Volume], "{pending:?}");
        assert_eq!(pending[0].key, "dave");
        let burst: Vec<AuditRecord> = (0..25).map(|i| refused(addr, now + i)).collect();
        let f: Vec<Finding> = (burst.iter().enumerate())
            .flat_map(|(i, r)| d.observe(10 + i as u64, r))
            .collect();
        assert_eq!(f, Vec::<Finding>::new());
        // Carol's cooldown ended two hours ago.
        let f = d.observe(40, &listing("carol", now, 2_100));
        assert_eq!(rules(&f), [Rule::Volume]);
    }

    /// An alert only the breach log holds (its audit record was not written) stands for its
    /// finding as its record would.
    #[tokio::test]
    async fn an_alert_only_the_breach_log_holds_stands_for_its_finding() {
        let b = base();
        let dir = log_of(vec![listing("alice", b, 2_100)], 1 << 20).await;
        let alerts = [logged_alert("volume", "alice", b, 1)];
        let (mut d, r) = replayed_with(dir.path(), &settings(), &alerts);
        assert_eq!(r.pending, Vec::<Finding>::new());
        // Put back after its finding's records, not before them: the finding was made again
        // and emptied the window, as it did in the run before, so as much again is no
        // escalation (4,200 would be, counted with the 2,100 before).
        let again = listing("alice", b + 60_000, 2_100);
        assert_eq!(d.observe(2, &again), Vec::<Finding>::new());
    }

    /// An alert whose finding was not read back leaves its size unknown: within its cooldown,
    /// an escalation at twice the threshold is made on the way back, which the run before
    /// (its bar perhaps four times the threshold) may not have made. It is not raised.
    #[tokio::test]
    async fn an_escalation_made_only_on_the_way_back_is_not_raised() {
        let b = base();
        let records = vec![
            alert_record("volume", "alice", None, b),
            listing("alice", b + 10 * 60_000, 4_100),
        ];
        let dir = log_of(records, 1 << 20).await;
        let (mut d, r) = replayed_with(dir.path(), &settings(), &[]);
        assert_eq!((r.accesses, r.alerts, r.pending.len()), (1, 1, 0), "{r:?}");
        // It was made on the way back (the detector holds its cooldown).
        let more = listing("alice", b + 11 * 60_000, 4_100);
        assert_eq!(d.observe(3, &more), Vec::<Finding>::new());
    }

    /// Records are written in the order they finish, not always of their times: an alert of
    /// the breach log is put back after the last record of its evidence, so that record still
    /// makes its finding again (and empties the window, as in the run before) though a record
    /// before it is dated after the alert.
    #[tokio::test]
    async fn an_alert_is_put_back_after_its_last_record_whatever_the_times() {
        let b = base();
        let records = vec![listing("bob", b + 1, 10), listing("alice", b, 2_100)];
        let dir = log_of(records, 1 << 20).await;
        let alerts = [logged_alert("volume", "alice", b, 2)];
        let (mut d, r) = replayed_with(dir.path(), &settings(), &alerts);
        assert_eq!(r.pending, Vec::<Finding>::new());
        let again = listing("alice", b + 60_000, 2_100);
        assert_eq!(d.observe(3, &again), Vec::<Finding>::new());
    }

    /// An alert stands for a finding made within the rule's window before it, or within a
    /// cooldown after it: not for one made long before it. With the limit lowered to 1,000,
    /// 1,500 records 100 minutes ago (never alerted on) are raised though the run before
    /// raised an alert on 2,100 records 70 minutes later.
    #[tokio::test]
    async fn a_later_alert_does_not_stand_for_an_earlier_finding() {
        let now = now_millis();
        let (t0, t1) = (now - 100 * 60_000, now - 30 * 60_000);
        // Citing the record of its own window only.
        let mut alert = alert_record("volume", "alice", None, t1);
        alert.detail.as_mut().unwrap()["evidence"] = serde_json::json!([2]);
        let records = vec![
            listing("alice", t0, 1_500),
            listing("alice", t1, 2_100),
            alert,
        ];
        let dir = log_of(records, 1 << 20).await;
        let (_, r) = replayed_with(dir.path(), &stricter(), &[]);
        let pending = r.pending;
        assert_eq!(rules(&pending), [Rule::Volume], "{pending:?}");
        assert_eq!(pending[0].at_ms, rules::ts_millis(&ts(t0)).unwrap());
    }

    /// An alert within the rule's window after a finding counted its records and stands for
    /// it: with the limit lowered to 1,000, the 1,500 records of the alert the run before
    /// raised on 2,100 (five minutes later, citing both) make the finding again, the same
    /// case.
    #[tokio::test]
    async fn an_alert_within_the_window_after_a_finding_stands_for_it() {
        let b = base();
        let mut alert = alert_record("volume", "alice", None, b + 5 * 60_000);
        alert.detail.as_mut().unwrap()["evidence"] = serde_json::json!([1, 2]);
        let records = vec![
            listing("alice", b, 1_500),
            listing("alice", b + 5 * 60_000, 600),
            alert,
        ];
        let dir = log_of(records, 1 << 20).await;
        let (_, r) = replayed_with(dir.path(), &stricter(), &[]);
        assert_eq!(r.pending, Vec::<Finding>::new());
    }

    /// A finding read back that an alert of this replica's own came after (another case: 30
    /// minutes later, past the window) is raised without a mark, which that alert may still
    /// hold in Redis; an alert another detector raised (`alerted_elsewhere`) holds its own.
    #[tokio::test]
    async fn a_finding_before_an_alert_of_this_replicas_own_is_raised_without_a_mark() {
        let now = now_millis();
        let (t0, t1) = (now - 40 * 60_000, now - 10 * 60_000);
        for (route, under_own_mark) in [
            ("watch.breach_alert", true),
            ("watch.alerted_elsewhere", false),
        ] {
            let mut alert = alert_record("volume", "alice", None, t1);
            alert.route = Some(route.to_owned());
            let records = vec![
                listing("alice", t0, 1_500),
                listing("alice", t1, 2_100),
                alert,
            ];
            let dir = log_of(records, 1 << 20).await;
            let (_, r) = replayed_with(dir.path(), &stricter(), &[]);
            assert_eq!(
                rules(&r.pending),
                [Rule::Volume],
                "{route}: {:?}",
                r.pending
            );
            assert_eq!(r.pending[0].at_ms, rules::ts_millis(&ts(t0)).unwrap());
            assert_eq!(r.pending[0].under_own_mark, under_own_mark, "{route}");
        }
    }

    /// An alert raised when the log was read back at an earlier start (of a finding long
    /// before: its cooldown over) holds its mark for `READ_BACK_MARK` from when it was
    /// raised: another case on the principal, read back at this start, is raised without a
    /// mark rather than meet it.
    #[tokio::test]
    async fn a_mark_taken_at_an_earlier_start_is_known_as_this_replicas_own() {
        let now = now_millis();
        let (t0, t2) = (now - 100 * 60_000, now - 30 * 60_000);
        let mut raised_at_start = alert_record("volume", "alice", None, t0);
        raised_at_start.ts = ts(now - 5 * 60_000);
        let records = vec![
            listing("alice", t0, 1_500),
            listing("alice", t2, 1_500),
            raised_at_start,
        ];
        let dir = log_of(records, 1 << 20).await;
        let (_, r) = replayed_with(dir.path(), &stricter(), &[]);
        assert_eq!(rules(&r.pending), [Rule::Volume], "{:?}", r.pending);
        assert_eq!(r.pending[0].at_ms, rules::ts_millis(&ts(t2)).unwrap());
        assert!(r.pending[0].under_own_mark, "{:?}", r.pending);
    }

    /// A finding another detector raised first (`alerted_elsewhere`, written by
    /// `watch::act`) is not raised again.
    #[tokio::test]
    async fn a_finding_another_detector_raised_is_not_raised_again() {
        let b = base();
        let mut elsewhere = alert_record("volume", "alice", None, b);
        elsewhere.route = Some("watch.alerted_elsewhere".to_owned());
        let records = vec![listing("alice", b, 2_100), elsewhere];
        let dir = log_of(records, 1 << 20).await;
        let (_, r, _) = replayed(dir.path(), MAX_BYTES);
        assert_eq!((r.alerts, r.pending.len()), (1, 0), "{r:?}");
    }

    /// An alert citing records past the log's newest (a log since set aside for a new audit
    /// directory) is put back before the first record read: alice's 2,100 records came
    /// within its cooldown, as for the run before, which made no finding of them and kept
    /// them in the window, so 2,100 more are an escalation.
    #[tokio::test]
    async fn an_alert_citing_records_of_another_log_is_put_back_first() {
        let b = base();
        let dir = log_of(vec![listing("alice", b, 2_100)], 1 << 20).await;
        let alerts = [logged_alert("volume", "alice", b - 10 * 60_000, 999)];
        let mut d = Detector::new(settings());
        let at = (now_millis(), 1);
        let r = replay(
            dir.path(),
            &settings(),
            &mut d,
            at,
            MAX_BYTES,
            &alerts,
            &mut |_| {},
        );
        assert_eq!(r.unwrap().pending, Vec::<Finding>::new());
        let f = d.observe(2, &listing("alice", b + 60_000, 2_100));
        assert_eq!(rules(&f), [Rule::Volume], "{f:?}");
        assert!(f[0].escalation > 0, "{f:?}");
    }

    /// The cross-replica detector's alerts (`evidence_refs`) never quieted this replica's
    /// rules: read back, they do not either. Alice's 2,100 records after one made this
    /// replica's own finding (another detector had raised it: `alerted_elsewhere`), which
    /// emptied the window, so 2,000 more are no escalation.
    #[tokio::test]
    async fn the_cross_replica_detectors_alerts_do_not_quiet_this_replicas_rules() {
        let b = base();
        let mut shared = alert_record("volume", "alice", None, b);
        shared.detail.as_mut().unwrap()["evidence_refs"] = serde_json::json!(["B#1"]);
        let mut elsewhere = alert_record("volume", "alice", None, b + 60_000);
        elsewhere.route = Some("watch.alerted_elsewhere".to_owned());
        let records = vec![shared, listing("alice", b + 60_000, 2_100), elsewhere];
        let dir = log_of(records, 1 << 20).await;
        let (mut d, r, _) = replayed(dir.path(), MAX_BYTES);
        assert_eq!((r.alerts, r.pending.len()), (2, 0), "{r:?}");
        let more = listing("alice", b + 120_000, 2_000);
        assert_eq!(d.observe(4, &more), Vec::<Finding>::new());
    }

    /// An alert put back after a cooldown of the same rule ended (not swept yet) starts its
    /// own at the first level: its size is not known, and the old one's says nothing of it.
    #[test]
    fn an_alert_put_back_after_a_cooldown_ended_starts_at_the_first_level() {
        let b = base() - 30 * 60_000;
        let mut d = Detector::new(settings());
        let first = d.observe(1, &listing("alice", b, 8_100));
        assert_eq!(rules(&first), [Rule::Volume]);
        d.raised_before(Rule::Volume, "alice", b + 70 * 60_000);
        let f = d.observe(2, &listing("alice", b + 71 * 60_000, 4_100));
        assert_eq!(rules(&f), [Rule::Volume], "twice the threshold escalates");
        assert!(f[0].escalation > 0, "{f:?}");
    }

    /// Records dated ahead of the clock (set back since they were written) are not read
    /// back: a window would hold them until the clock caught up.
    #[tokio::test]
    async fn records_dated_ahead_of_the_clock_are_not_read_back() {
        let now = now_millis();
        let records = vec![
            listing("alice", now - 60_000, 10),
            listing("alice", now + 3 * 3_600_000, 2_100),
        ];
        let dir = log_of(records, 1 << 20).await;
        let (mut d, r, seen) = replayed(dir.path(), MAX_BYTES);
        assert_eq!((r.accesses, r.ahead, r.pending.len(), seen), (1, 1, 0, 1));
        assert_eq!(
            d.observe(3, &listing("alice", now, 1_900)),
            Vec::<Finding>::new()
        );
    }

    /// A principal whose subject is `addr` is not read as an alert keyed on an address: its
    /// cooldown is its own, and the address's is untouched.
    #[tokio::test]
    async fn a_subject_named_addr_keeps_its_own_cooldown() {
        let b = base();
        let addr = "203.0.113.9";
        let mut alert = alert_record("denied_burst", "addr", Some(addr), b);
        alert.detail.as_mut().unwrap()["principal"] = serde_json::json!({ "subject": "addr" });
        let dir = log_of(vec![alert], 1 << 20).await;
        let (mut d, r, _) = replayed(dir.path(), MAX_BYTES);
        assert_eq!(r.alerts, 1);
        let mut burst = |who: Option<&str>| -> Vec<Finding> {
            let records = (0..25).map(|i| {
                let mut r = refused(addr, b + 60_000 + i);
                if let Some(who) = who {
                    r.caller = listing(who, 0, 0).caller;
                }
                r
            });
            let records: Vec<AuditRecord> = records.collect();
            (records.iter().enumerate())
                .flat_map(|(i, r)| d.observe(10 + i as u64, r))
                .collect()
        };
        assert_eq!(burst(Some("addr")), Vec::<Finding>::new());
        assert_eq!(rules(&burst(None)), [Rule::DeniedBurst]);
    }

    /// An alert on a caller not known names them `addr` in the log, their address sealed in
    /// the record: read back, the address is unsealed and the cooldown is theirs.
    #[tokio::test]
    async fn an_alert_on_an_address_is_put_back_on_that_address() {
        let b = base();
        let addr = "203.0.113.9";
        let dir = log_of(
            vec![alert_record("denied_burst", "addr", Some(addr), b)],
            1 << 20,
        )
        .await;
        let sealed = std::fs::read_to_string(dir.path().join("seg-00000001.jsonl")).unwrap();
        assert!(!sealed.contains(addr), "the address is sealed on disk");
        let (mut d, r, _) = replayed(dir.path(), MAX_BYTES);
        assert_eq!(r.alerts, 1);
        let burst: Vec<AuditRecord> = (0..25).map(|i| refused(addr, b + 60_000 + i)).collect();
        let f: Vec<Finding> = (burst.iter().enumerate())
            .flat_map(|(i, r)| d.observe(10 + i as u64, r))
            .collect();
        assert_eq!(f, Vec::<Finding>::new());
        let mut fresh = Detector::new(settings());
        let f: Vec<Finding> = (burst.iter().enumerate())
            .flat_map(|(i, r)| fresh.observe(10 + i as u64, r))
            .collect();
        assert_eq!(rules(&f), [Rule::DeniedBurst]);
        assert_eq!(f[0].key, format!("addr:{addr}"));
    }

    /// Records older than the rules' reach are not counted; the newest `max_bytes` are read
    /// when the reach holds more, and the start of what was read is reported.
    #[tokio::test]
    async fn reading_back_stops_at_the_reach_and_at_the_byte_bound() {
        let now = now_millis();
        let old = listing("alice", now - 3 * 3_600_000, 1_900);
        let recent: Vec<AuditRecord> = (0..40)
            .map(|i| listing("bob", now - 60_000 + i, 10))
            .collect();
        let mut records = vec![old];
        records.extend(recent);
        // Small segments: the reading goes back through several.
        let dir = log_of(records, 4_096).await;
        let segments = list_segments(dir.path()).unwrap().len();
        assert!(segments > 3, "{segments} segments");
        let (mut d, r, _) = replayed(dir.path(), MAX_BYTES);
        assert_eq!((r.through, r.accesses, r.cut_short), (41, 40, false));
        // The old listing was not counted: 1,900 and 200 stay under 2,000.
        assert_eq!(
            d.observe(42, &listing("alice", now, 200)),
            Vec::<Finding>::new()
        );

        let (_, r, _) = replayed(dir.path(), 6_000);
        assert_eq!(r.through, 41);
        assert!(r.accesses > 0 && r.accesses < 40, "{r:?}");
        assert!(r.cut_short, "{r:?}");
        let first = r.first.expect("something was read");
        assert!(first.as_str() > ts(now - 60_000).as_str(), "{first}");
    }

    /// A damaged line is counted and passed over; the lines after it are read.
    #[tokio::test]
    async fn a_damaged_line_is_counted_and_passed_over() {
        let b = base();
        let dir = log_of(
            vec![listing("alice", b, 900), listing("alice", b + 1, 900)],
            1 << 20,
        )
        .await;
        let path = dir.path().join("seg-00000001.jsonl");
        let mut text = std::fs::read(&path).unwrap();
        // The first line no longer reads as JSON.
        text[0] = b'#';
        std::fs::write(&path, &text).unwrap();
        let (_, r, _) = replayed(dir.path(), MAX_BYTES);
        assert_eq!((r.through, r.accesses, r.unreadable), (2, 1, 1));
    }

    /// Lines after the record durable when reading began are not read back: they may be of a
    /// batch whose sync fails, cut from the log and its numbers given to other records.
    #[tokio::test]
    async fn lines_past_the_durable_head_are_left_to_come_live() {
        let b = base();
        let records = (0..4).map(|i| listing("alice", b + i, 10)).collect();
        let dir = log_of(records, 1 << 20).await;
        let mut d = Detector::new(settings());
        let at = (now_millis(), 2);
        let r = replay(
            dir.path(),
            &settings(),
            &mut d,
            at,
            MAX_BYTES,
            &[],
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((r.through, r.accesses), (2, 2));
    }

    /// A segment shorter than when its length was read (the space made ready past a finished
    /// segment's records given back) ends where it now ends; made-ready zeros are not records.
    #[test]
    fn a_segments_records_end_at_its_first_nul_or_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let mut padded = b"{\"a\":1}\n".to_vec();
        padded.resize(4096, 0);
        std::fs::write(&path, &padded).unwrap();
        let mut f = File::open(&path).unwrap();
        assert_eq!(written_len(&mut f, 4096).unwrap(), 8);
        // Cut back between the length read and the bisection's reads.
        std::fs::write(&path, b"{\"a\":1}\n").unwrap();
        let mut f = File::open(&path).unwrap();
        assert_eq!(written_len(&mut f, 4096).unwrap(), 8);
    }
}
