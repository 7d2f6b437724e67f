//! Acting on findings, off the detection loop: an alert waits for the breach log's fsync, a
//! durable audit record and perhaps Redis, and an alert storm handled inline would leave the
//! records behind it unexamined (the audit broadcast drops what a slow reader misses).
//!
//! Findings go to a task of their own through a bounded queue. What does not fit is owed, one
//! finding per rule and principal (the newest), and offered again as the queue drains, those
//! about named principals first (an insider's finding does not wait behind a storm of
//! unauthenticated addresses' findings owed before it): a
//! finding's rule is already quiet for its principal and its evidence spent, so a finding
//! dropped would not be raised again. Owed findings are bounded too: past [`MAX_OWED`], those
//! about callers nobody could name (keyed on an address, which an attacker can multiply) give
//! way to those about principals, and are counted as dropped
//! (`wardgate_watch_findings_dropped_total`). A finding whose alert the breach log could not
//! take ([`super::act`] hands it back) is tried again after a pause ([`Again`]). At stop, what
//! is queued, owed or to be tried again is acted on for [`FINISH_WITHIN`]; after that the rest
//! is logged and counted, never cut off half done.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;

use super::rules::{Detector, Finding};
use super::settings::Rule;
use crate::gateway::Gateway;

/// Findings queued for the acting task.
const QUEUE: usize = 4096;
/// Findings owed (one per rule and principal) beyond the queue.
const MAX_OWED: usize = 65_536;
/// How long stopping acts on what is queued and owed before only counting it.
pub(super) const FINISH_WITHIN: Duration = Duration::from_secs(10);
/// How long past that stopping waits for a finding already being acted on (its Redis and
/// audit waits are bounded) before abandoning it.
pub(super) const BACKSTOP: Duration = Duration::from_secs(20);

pub struct Acting {
    tx: mpsc::Sender<Finding>,
    task: JoinHandle<()>,
    /// Set at the end of `FINISH_WITHIN` after stop: the task counts what is left.
    give_up: Arc<AtomicBool>,
    owed: Owed,
}

impl Acting {
    pub fn start(gw: Arc<Gateway>) -> Acting {
        let (tx, mut rx) = mpsc::channel::<Finding>(QUEUE);
        let give_up = Arc::new(AtomicBool::new(false));
        let giving_up = Arc::clone(&give_up);
        let task = tokio::spawn(async move {
            // Findings not acted on, and alerts raised that the breach log never took.
            let (mut left, mut unrecorded) = (Left::default(), Left::default());
            let mut again = Again::default();
            loop {
                // A finding the breach log could not take comes first once its time is due:
                // there are few, and an alert storm must not hold them back.
                let f = tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(again.at), if !again.is_empty() => {
                        match again.pop() {
                            Some(f) => f,
                            None => continue,
                        }
                    }
                    f = rx.recv() => match f {
                        Some(f) => f,
                        // Stopping: what is still to be tried again is, until given up
                        // (looked at every second).
                        None if !again.is_empty() && !giving_up.load(Ordering::Relaxed) => {
                            again.stopping();
                            let soon = tokio::time::Instant::now() + Duration::from_secs(1);
                            tokio::time::sleep_until(again.at.min(soon)).await;
                            continue;
                        }
                        None => break,
                    },
                };
                if giving_up.load(Ordering::Relaxed) {
                    match f.unrecorded {
                        Some(_) => unrecorded.count(&f),
                        None => left.count(&f),
                    }
                    continue;
                }
                // One finding's panic must not end alerting for the rest of the process.
                let (rule, key) = (f.rule, f.key.clone());
                let acted = std::panic::AssertUnwindSafe(super::act(&gw, f, "local"))
                    .catch_unwind()
                    .await;
                match acted {
                    Ok(None) => again.recorded(),
                    Ok(Some(f)) => again.push(f),
                    Err(_) => {
                        metrics::counter!("wardgate_watch_findings_dropped_total", "rule" => rule.name())
                            .increment(1);
                        tracing::error!(%rule, principal = super::rules::logged_key(&key), "breach detection: acting on a finding panicked");
                    }
                }
            }
            while let Some(f) = again.pop() {
                unrecorded.count(&f);
            }
            left.log("detection stopped before they were acted on");
            unrecorded.log(
                "detection stopped before the breach log took these alerts (each is in the \
                 audit log as a `breach_alert` record, and was acted on)",
            );
        });
        Acting {
            tx,
            task,
            give_up,
            owed: Owed::default(),
        }
    }

    /// Hands a finding on, or owes it.
    pub fn offer(&mut self, f: Finding, detector: &mut Detector) {
        self.flush();
        if !self.owed.is_empty() {
            self.owed.push(f, detector);
            return;
        }
        match self.tx.try_send(f) {
            Ok(()) => {}
            Err(TrySendError::Full(f)) => self.owed.push(f, detector),
            Err(TrySendError::Closed(f)) => dropped(&f, "the acting task has ended"),
        }
    }

    /// Whether findings are owed (the caller offers them again soon: `flush`).
    pub fn owing(&self) -> bool {
        !self.owed.is_empty()
    }

    /// Hands on as many owed findings as the queue takes, oldest first.
    pub fn flush(&mut self) {
        while let Some(f) = self.owed.pop() {
            match self.tx.try_send(f) {
                Ok(()) => {}
                Err(TrySendError::Full(f)) => {
                    self.owed.unpop(f);
                    return;
                }
                Err(TrySendError::Closed(f)) => dropped(&f, "the acting task has ended"),
            }
        }
    }

    /// Acts on what is queued and owed, for `FINISH_WITHIN`; then counts the rest.
    pub async fn finish(mut self) {
        let deadline = tokio::time::Instant::now() + FINISH_WITHIN;
        let mut left = Left::default();
        while let Some(f) = self.owed.pop() {
            match tokio::time::timeout_at(deadline, self.tx.reserve()).await {
                Ok(Ok(permit)) => permit.send(f),
                _ => {
                    left.count(&f);
                    while let Some(f) = self.owed.pop() {
                        left.count(&f);
                    }
                }
            }
        }
        left.log("detection stopped before they could be queued");
        drop(self.tx);
        let give_up = Arc::clone(&self.give_up);
        let mut task = self.task;
        tokio::select! {
            _ = &mut task => {}
            () = tokio::time::sleep_until(deadline) => {
                give_up.store(true, Ordering::Relaxed);
                if tokio::time::timeout(BACKSTOP, &mut task).await.is_err() {
                    task.abort();
                    tracing::error!("breach detection stopped in the middle of acting on a finding");
                }
            }
        }
    }
}

/// Findings whose alert the breach log could not take, tried again (the newest per rule and
/// principal, at most [`MAX_AGAIN`]) after a pause that doubles from [`AGAIN_AFTER`] to
/// [`AGAIN_AT_MOST`] while the log keeps failing, and starts again once an alert is recorded.
/// The log fails for everyone at once (a full disk, an I/O error), so one pause serves all.
pub(super) struct Again {
    owed: Owed,
    at: tokio::time::Instant,
    pause: Duration,
    /// Detection is stopping: what is left is tried at once, then every [`AGAIN_AFTER`],
    /// for as long as stopping allows.
    stopping: bool,
}

const AGAIN_AFTER: Duration = Duration::from_secs(1);
const AGAIN_AT_MOST: Duration = Duration::from_secs(30);
const MAX_AGAIN: usize = 4096;

impl Default for Again {
    fn default() -> Self {
        Again {
            owed: Owed::default(),
            at: tokio::time::Instant::now(),
            pause: AGAIN_AFTER,
            stopping: false,
        }
    }
}

impl Again {
    pub(super) fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }

    /// Whether a finding is to be tried again now.
    pub(super) fn is_due(&self) -> bool {
        !self.is_empty() && tokio::time::Instant::now() >= self.at
    }

    pub(super) fn pop(&mut self) -> Option<Finding> {
        self.owed.pop()
    }

    pub(super) fn push(&mut self, f: Finding) {
        self.at = tokio::time::Instant::now() + self.pause;
        if !self.stopping {
            self.pause = (self.pause * 2).min(AGAIN_AT_MOST);
        }
        if self.owed.by_key.len() >= MAX_AGAIN && !self.owed.by_key.contains_key(&Owed::key_of(&f))
        {
            // As `Owed::push`: alerts about an address (which an attacker can multiply) give
            // way to one about a named principal. Either way the one let go is in the audit
            // log, and the next start adds it to the breach log (`watch::resume`).
            let room = (f.caller.is_some())
                .then(|| self.owed.unnamed.pop_front())
                .flatten()
                .and_then(|key| self.owed.by_key.remove(&key));
            let Some(old) = room else {
                dropped(
                    &f,
                    "too many alerts the breach log could not take (this one is in the audit \
                     log, and the next start adds it to the breach log)",
                );
                return;
            };
            dropped(
                &old,
                "too many alerts the breach log could not take; one about a named principal \
                 came (this one is in the audit log, and the next start adds it to the breach \
                 log)",
            );
        }
        self.owed.push_back(f);
    }

    /// Detection is stopping: what is left is due now, and then every [`AGAIN_AFTER`].
    pub(super) fn stopping(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.pause = AGAIN_AFTER;
            self.at = tokio::time::Instant::now();
        }
    }

    pub(super) fn recorded(&mut self) {
        self.pause = AGAIN_AFTER;
    }
}

/// Findings not acted on at stop, counted per rule and logged once.
#[derive(Default)]
struct Left(HashMap<Rule, u64>);

impl Left {
    fn count(&mut self, f: &Finding) {
        metrics::counter!("wardgate_watch_findings_dropped_total", "rule" => f.rule.name())
            .increment(1);
        *self.0.entry(f.rule).or_default() += 1;
    }

    fn log(&self, why: &str) {
        if !self.0.is_empty() {
            let by_rule: Vec<String> = (self.0.iter()).map(|(r, n)| format!("{r}: {n}")).collect();
            tracing::error!(dropped = %by_rule.join(", "), "breach detection: findings dropped: {why}");
        }
    }
}

fn dropped(f: &Finding, why: &str) {
    metrics::counter!("wardgate_watch_findings_dropped_total", "rule" => f.rule.name())
        .increment(1);
    tracing::error!(rule = %f.rule, principal = super::rules::logged_key(&f.key), summary = %f.summary, "breach detection: finding dropped: {why}");
}

/// Findings waiting for room in the queue: the newest per rule and principal, those about
/// named principals first (an insider's `volume` must not wait behind an outsiders' storm of
/// `denied_burst`s), each kind in the order first owed.
#[derive(Default)]
struct Owed {
    /// Findings about a verified caller.
    named: VecDeque<(Rule, String)>,
    /// Findings about callers nobody could name (keyed on an address).
    unnamed: VecDeque<(Rule, String)>,
    by_key: HashMap<(Rule, String), Finding>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// What a finding is held under: its rule and principal (the newest replaces an older
    /// one, not yet raised), or, once its alert is raised and waits for the breach log, that
    /// alert too, so that a later alert about the same principal never takes its place.
    fn key_of(f: &Finding) -> (Rule, String) {
        match &f.unrecorded {
            Some(alert) => (f.rule, format!("{}\n{}", f.key, alert.id)),
            // An escalation is held apart from the alert before it, which it must not replace
            // (its evidence and its time start the 72-hour clock).
            None if f.escalation > 0 => (f.rule, format!("{}\n^{}", f.key, f.escalation)),
            None => (f.rule, f.key.clone()),
        }
    }

    fn line(&mut self, f: &Finding) -> &mut VecDeque<(Rule, String)> {
        if f.caller.is_some() {
            &mut self.named
        } else {
            &mut self.unnamed
        }
    }

    fn push(&mut self, f: Finding, detector: &mut Detector) {
        let key = Self::key_of(&f);
        if let Some(held) = self.by_key.get_mut(&key) {
            *held = f;
            return;
        }
        if self.by_key.len() >= MAX_OWED {
            // Callers nobody could name (no verified caller: keyed on an address, which an
            // attacker can multiply) give way to principals.
            let make_room = if f.caller.is_some() {
                self.unnamed.pop_front()
            } else {
                None
            };
            let Some(old_key) = make_room else {
                // Not raised, so not quiet either: a new case against them can be.
                detector.forget_cooldown(f.rule, &f.key, f.escalation);
                dropped(&f, "too many findings waiting");
                return;
            };
            if let Some(old) = self.by_key.remove(&old_key) {
                detector.forget_cooldown(old.rule, &old.key, old.escalation);
                dropped(
                    &old,
                    "too many findings waiting; one about a named principal came",
                );
            }
        }
        self.push_back(f);
    }

    fn pop(&mut self) -> Option<Finding> {
        let key = match self.named.pop_front() {
            Some(key) => key,
            None => self.unnamed.pop_front()?,
        };
        self.by_key.remove(&key)
    }

    /// Holds `f` (the newest per rule and principal), last in its line, without a bound.
    fn push_back(&mut self, f: Finding) {
        let key = Self::key_of(&f);
        if !self.by_key.contains_key(&key) {
            self.line(&f).push_back(key.clone());
        }
        self.by_key.insert(key, f);
    }

    /// Puts back a finding `pop` gave, first in its line.
    fn unpop(&mut self, f: Finding) {
        let key = Self::key_of(&f);
        self.line(&f).push_front(key.clone());
        self.by_key.insert(key, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::settings::{Mode, WatchSettings};

    fn finding(rule: Rule, key: &str, summary: &str) -> Finding {
        Finding {
            rule,
            mode: Mode::Alert,
            key: key.to_owned(),
            caller: None,
            client_addr: None,
            evidence: vec![1],
            summary: summary.to_owned(),
            addresses: Vec::new(),
            at_ms: 0,
            unrecorded: None,
            read_back: false,
            under_own_mark: false,
            refs: Vec::new(),
            escalation: 0,
        }
    }

    /// A `volume` finding about a verified caller.
    fn insider() -> Finding {
        let mut f = finding(Rule::Volume, "insider", "");
        f.caller = Some(crate::audit::Caller {
            subject: "insider".into(),
            role: "councillor".into(),
            unit: "u".into(),
            token_id: "t".into(),
        });
        f
    }

    /// A raised alert waiting for the breach log is never replaced by a later alert about the
    /// same principal (each is in the audit log under its own id): both are tried again.
    #[test]
    fn alerts_waiting_for_the_breach_log_are_kept_one_by_one() {
        let raised = |id: &str| {
            let mut f = finding(Rule::Volume, "insider", id);
            f.unrecorded = Some(Box::new(crate::watch::breach::Alert {
                id: id.to_owned(),
                rule: Rule::Volume,
                mode: Mode::Alert,
                summary: String::new(),
                principal: None,
                key: "insider".into(),
                client_addr: None,
                addresses: Vec::new(),
                evidence: vec![1],
                evidence_refs: Vec::new(),
                detected_at: String::new(),
                report_by: String::new(),
                containment: None,
                classification: None,
                history: Vec::new(),
            }));
            f
        };
        let mut again = Again::default();
        again.push(raised("A-1"));
        again.push(raised("A-2"));
        let ids: Vec<String> = std::iter::from_fn(|| again.pop())
            .map(|f| f.unrecorded.unwrap().id)
            .collect();
        assert_eq!(ids, ["A-1", "A-2"]);
    }

    #[test]
    fn owed_findings_keep_one_per_rule_and_principal_in_order() {
        let mut d = Detector::new(WatchSettings::defaults(std::path::Path::new("/tmp")));
        let mut owed = Owed::default();
        owed.push(finding(Rule::Volume, "a", "first"), &mut d);
        owed.push(finding(Rule::Enumeration, "b", "b"), &mut d);
        owed.push(finding(Rule::Volume, "a", "newer"), &mut d);
        let a = owed.pop().unwrap();
        assert_eq!((a.key.as_str(), a.summary.as_str()), ("a", "newer"));
        owed.unpop(a);
        let order: Vec<String> = std::iter::from_fn(|| owed.pop()).map(|f| f.key).collect();
        assert_eq!(order, ["a", "b"]);
        // An escalation is held beside the alert before it, not in its place: that alert's
        // evidence and time start the 72-hour clock.
        owed.push(finding(Rule::Volume, "a", "first"), &mut d);
        let mut escalation = finding(Rule::Volume, "a", "escalation");
        escalation.escalation = 1;
        owed.push(escalation, &mut d);
        let order: Vec<String> = std::iter::from_fn(|| owed.pop())
            .map(|f| f.summary)
            .collect();
        assert_eq!(order, ["first", "escalation"]);
    }

    #[test]
    fn when_full_unnamed_callers_give_way_to_principals() {
        let mut d = Detector::new(WatchSettings::defaults(std::path::Path::new("/tmp")));
        let mut owed = Owed::default();
        for i in 0..MAX_OWED {
            owed.push(
                finding(Rule::DeniedBurst, &format!("addr:10.0.{i}"), ""),
                &mut d,
            );
        }
        // Another address: no room.
        owed.push(finding(Rule::DeniedBurst, "addr:192.0.2.1", ""), &mut d);
        assert!(
            !owed
                .by_key
                .contains_key(&(Rule::DeniedBurst, "addr:192.0.2.1".into()))
        );
        // An insider (a verified caller): the oldest address makes room.
        let insider = insider();
        owed.push(insider, &mut d);
        assert_eq!(owed.by_key.len(), MAX_OWED);
        assert!(owed.by_key.contains_key(&(Rule::Volume, "insider".into())));
        assert!(
            !owed
                .by_key
                .contains_key(&(Rule::DeniedBurst, "addr:10.0.0".into()))
        );
        // And it is handed on first, ahead of the storm owed before it.
        assert_eq!(owed.pop().unwrap().key, "insider");
        assert_eq!(owed.pop().unwrap().key, "addr:10.0.1");
    }

    /// The same rule for raised alerts waiting for the breach log: a storm of address-keyed
    /// ones does not keep out an insider's.
    #[test]
    fn alerts_waiting_about_addresses_give_way_to_principals() {
        let mut again = Again::default();
        for i in 0..MAX_AGAIN {
            again.push(finding(Rule::DeniedBurst, &format!("addr:10.0.{i}"), ""));
        }
        again.push(finding(Rule::DeniedBurst, "addr:192.0.2.1", ""));
        assert_eq!(again.owed.by_key.len(), MAX_AGAIN);
        assert!(
            !again
                .owed
                .by_key
                .contains_key(&(Rule::DeniedBurst, "addr:192.0.2.1".into()))
        );
        let insider = insider();
        again.push(insider);
        assert_eq!(again.owed.by_key.len(), MAX_AGAIN);
        assert_eq!(again.pop().unwrap().key, "insider");
        assert_eq!(again.pop().unwrap().key, "addr:10.0.1");
    }
}
