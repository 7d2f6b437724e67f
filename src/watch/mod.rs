//! Breach detection and the security console: the security team sees misuse as it happens.
//!
//! Owns: the detection rules over durable audit records ([`rules`], configured by
//! [`settings`]), the breach log of alerts and classifications ([`breach`]), the live feed of
//! access events and alerts ([`feed`]), containment (revoking the offending token through the
//! shared controls) and the console's admin-plane endpoints ([`console`]).
//!
//! The detector reads the audit writer's stream of acknowledged records, so it sees exactly
//! what the log holds, after it is durable, and never delays a response. Each replica watches
//! its own records; with Redis, one replica at a time also watches all replicas' accesses
//! through a shared stream ([`shared`]), and each alert is raised once for the deployment.
//!
//! Does not own: what is audited (the request pipeline), revocation itself (`controls`), or
//! authenticating the console's callers (`gateway::authenticate`).

mod acting;
pub mod breach;
pub mod console;
pub mod feed;
pub mod replay;
pub mod rules;
pub mod settings;
pub mod shared;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;
use tokio::sync::{broadcast, watch};

use crate::audit::{AuditRecord, Caller, Decision, Logged};
use crate::controls::{Change, Event};
use crate::gateway::Gateway;

use breach::{Alert, BreachLog, Containment};
use feed::FeedEvent;
use rules::{Detector, Finding};
use settings::{Mode, WatchSettings};

/// Events a slow feed subscriber may fall behind by before it is told it missed some.
const FEED_CAPACITY: usize = 4096;
/// Minutes of per-principal volume the console charts.
const VOLUME_MINUTES: i64 = 60;

/// Detection state shared by the detector task and the admin plane.
pub struct Watch {
    pub settings: WatchSettings,
    pub breach: Arc<BreachLog>,
    feed: broadcast::Sender<Arc<FeedEvent>>,
    /// Taken by the detector task when it starts; subscribed at build so nothing is missed.
    records: Mutex<Option<broadcast::Receiver<Arc<Logged>>>>,
    /// The shared stream, when Redis is configured.
    pub shared: Option<Arc<shared::Shared>>,
    volumes: Mutex<Volumes>,
    /// Ends live feeds (`stop`).
    stopping: watch::Sender<bool>,
    /// Ends detection (`stop_detection`).
    detecting: watch::Sender<bool>,
}

impl Watch {
    /// Opens the breach log and subscribes to the audit log's acknowledged records.
    pub fn open(
        settings: WatchSettings,
        audit: &crate::audit::AuditLog,
        redis: Option<&crate::controls::RedisSettings>,
    ) -> anyhow::Result<Watch> {
        let breach = Arc::new(BreachLog::open(&settings.breach_log)?);
        let shared = match redis {
            Some(r) if settings.shared => Some(Arc::new(shared::Shared::new(
                &r.url,
                &settings.shared_stream,
                crate::controls::load_key(r)?,
            )?)),
            _ => None,
        };
        Ok(Watch {
            shared,
            settings,
            breach,
            feed: broadcast::channel(FEED_CAPACITY).0,
            records: Mutex::new(Some(audit.subscribe())),
            volumes: Mutex::new(Volumes::default()),
            stopping: watch::channel(false).0,
            detecting: watch::channel(false).0,
        })
    }

    /// A new live-feed subscription and the signal that ends it.
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<FeedEvent>>, watch::Receiver<bool>) {
        (self.feed.subscribe(), self.stopping.subscribe())
    }

    /// Ends live feeds (at shutdown, before connections drain: a feed would hold the admin
    /// plane's drain open).
    pub fn stop(&self) {
        let _ = self.stopping.send(true);
    }

    /// Ends detection, this replica's and its part in cross-replica detection, once every
    /// record is in the log (at shutdown, after the drain): what is still on its way to the
    /// detector is examined first, so the requests that finished while the planes drained
    /// (an export's last chunks, a scrape's last pages) are examined like any others.
    pub fn stop_detection(&self) {
        let _ = self.detecting.send(true);
    }

    fn publish(&self, e: FeedEvent) {
        // Err only when nobody is watching.
        let _ = self.feed.send(Arc::new(e));
    }

    /// Records per principal per minute over the last hour, busiest first.
    pub fn volumes(&self) -> serde_json::Value {
        let now = rules::now_millis() / 60_000;
        lock(&self.volumes).snapshot(now)
    }
}

/// Runs the rules over this replica's records until the gateway stops.
pub async fn run(gw: Arc<Gateway>) {
    let Some(mut rx) = lock(&gw.watch.records).take() else {
        return;
    };
    let mut stop = gw.watch.detecting.subscribe();
    let (mut detector, through, pending) = resume(&gw).await;
    let mut acting = acting::Acting::start(gw.clone());
    // Findings of the last run that no alert record follows: raised now, oldest first.
    for finding in pending {
        acting.offer(finding, &mut detector);
    }
    // Owed findings are offered again this often while any are owed, however busy the log.
    let mut retry = tokio::time::interval(std::time::Duration::from_millis(50));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let leading = gw.watch.shared.as_ref().map(|sh| {
        tokio::spawn(shared::publish_loop(
            sh.clone(),
            gw.watch.detecting.subscribe(),
        ));
        tokio::spawn(shared::lead_loop(
            gw.clone(),
            sh.clone(),
            gw.watch.detecting.subscribe(),
        ))
    });
    loop {
        // In this order: records still to be examined go before the stop.
        let logged = tokio::select! {
            biased;
            _ = retry.tick(), if acting.owing() => {
                acting.flush();
                continue;
            }
            r = rx.recv() => r,
            _ = stop.changed() => break,
        };
        let logged = match logged {
            Ok(l) => l,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                metrics::counter!("wardgate_watch_missed_records_total").increment(n);
                tracing::error!(
                    missed = n,
                    "breach detection fell behind the audit log; {n} records were not examined"
                );
                gw.watch.publish(FeedEvent::detection_lagged(n));
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        // Read back from the log already (`resume`): a record of this run's, made while the
        // log was read back. The live feed and the replicas' shared stream take it as any
        // other (nothing but this run's records comes here); this replica's rules and volume
        // chart have counted it.
        let read_back = logged.seq <= through;
        // The feed's summary is built only while someone is watching.
        if gw.watch.feed.receiver_count() > 0 {
            gw.watch.publish(feed::access_event(&logged));
        }
        if !read_back {
            lock(&gw.watch.volumes).observe(&logged.record);
        }
        let Some(observation) = rules::Observation::of(&logged.record) else {
            continue;
        };
        if let Some(sh) = &gw.watch.shared {
            sh.publish(logged.seq, &observation);
        }
        if read_back {
            continue;
        }
        for finding in detector.observe_access(logged.seq, &observation) {
            acting.offer(finding, &mut detector);
        }
    }
    // The findings already made are acted on before detection stops (for a while: shutdown
    // waits for this), and the leader's alerts still waiting for the breach log are tried.
    acting.finish().await;
    // Bounded as the acting task is: a step under way (a batch of findings, each waiting on
    // Redis and the disk) finishes first, and a leader still busy past it is abandoned.
    if let Some(mut leading) = leading {
        let bound = acting::FINISH_WITHIN + acting::BACKSTOP;
        if tokio::time::timeout(bound, &mut leading).await.is_err() {
            leading.abort();
            tracing::error!("cross-replica breach detection stopped in the middle of its work");
        }
    }
}

/// A detector holding what the log's newest records say (`replay`) and the breach log's
/// alerts in their cooldown (`replay::recall`), the newest record it read back, and the
/// findings read back that no alert followed: read off the runtime's threads, before the
/// first live record is examined (those that arrive meanwhile wait in the audit log's
/// channel). A log that cannot be read leaves the detector holding the breach log's
/// cooldowns only, and the server log says so.
async fn resume(gw: &Arc<Gateway>) -> (Detector, u64, Vec<rules::Finding>) {
    let settings = gw.watch.settings.clone();
    let dir = gw.audit_dir.clone();
    let breach = gw.watch.breach.clone();
    // What is durable now: a line past it may be of a batch whose sync fails, cut and its
    // numbers used again; it comes live once acknowledged.
    let durable = gw.audit.head().map_or(0, |h| h.seq);
    let read = tokio::task::spawn_blocking(move || {
        let mut detector = Detector::new(settings.clone());
        let mut volumes = Volumes::default();
        let now = rules::now_millis();
        let (alerts, older) = breach.alerts();
        let mut replayed = replay::replay(
            &dir,
            &settings,
            &mut detector,
            (now, durable),
            replay::MAX_BYTES,
            &alerts,
            &mut |r| volumes.observe(r),
        );
        // Half read: nothing of it is kept (this run's records read back would be counted
        // again as they come live); the breach log's cooldowns are, whatever the audit log.
        if replayed.is_err() {
            detector = Detector::new(settings);
            replay::recall(&mut detector, &alerts, now);
        }
        let (mut logged, mut untaken) = (Vec::new(), Vec::new());
        if let Ok(r) = &mut replayed {
            let unlogged = std::mem::take(&mut r.unlogged);
            (logged, untaken) = log_unlogged(&breach, unlogged, older, r.unlogged_let_go);
        }
        (detector, volumes, replayed, logged, untaken)
    })
    .await;
    // Alerts the breach log could not take now are offered to it again as this run goes on,
    // as a live one it refused is (`act`), oldest first.
    let mut untaken_findings = Vec::new();
    let read = match read {
        Ok((detector, volumes, replayed, logged, untaken)) => {
            note_logged(gw, &logged).await;
            untaken_findings = untaken.into_iter().map(untaken_finding).collect();
            Ok((detector, volumes, replayed))
        }
        Err(e) => Err(e),
    };
    let (detector, volumes, replayed) = match read {
        Ok(read) => read,
        Err(e) => {
            tracing::error!(error = %e, "breach detection could not read back the audit log; it starts with the breach log's cooldowns only");
            let mut detector = Detector::new(gw.watch.settings.clone());
            let alerts = gw.watch.breach.alerts().0;
            replay::recall(&mut detector, &alerts, rules::now_millis());
            return (detector, 0, Vec::new());
        }
    };
    match replayed {
        Ok(r) => {
            tracing::info!(
                accesses = r.accesses,
                alerts = r.alerts,
                through = r.through,
                unreadable = r.unreadable,
                unraised = r.pending.len(),
                "breach detection resumed from the audit log"
            );
            if r.cut_short {
                let from = r.first.as_deref().unwrap_or("nothing read");
                tracing::warn!(
                    from,
                    "breach detection read back the audit log's newest {} MiB only, from {from}: \
                     older accesses within the rules' windows were not counted again",
                    replay::MAX_BYTES >> 20
                );
            }
            if r.ahead > 0 {
                tracing::warn!(
                    records = r.ahead,
                    "breach detection did not read back {} records dated more than {} minutes \
                     ahead of this host's clock (was the clock set back?)",
                    r.ahead,
                    replay::MAX_AHEAD.as_secs() / 60
                );
            }
            if r.let_go > 0 {
                tracing::warn!(
                    findings = r.let_go,
                    "breach detection read back more findings without an alert than it raises \
                     at start; the oldest {} were let go",
                    r.let_go
                );
            }
            *lock(&gw.watch.volumes) = volumes;
            untaken_findings.extend(r.pending);
            (detector, r.through, untaken_findings)
        }
        Err(e) => {
            tracing::error!(error = %e, "breach detection could not read back the audit log; it starts with the breach log's cooldowns only");
            (detector, 0, Vec::new())
        }
    }
}

/// Appends to the breach log the alerts read back from the audit log that it does not hold
/// (`Replayed::unlogged`): raised, written to the audit chain and acted on, but not yet in the
/// breach log when the process stopped (its append failing, or a crash between the two), they
/// would otherwise be in the chain only, where the console cannot list, classify or count
/// down the 72 hours on them. `older`: how many alerts the breach log's file alone holds
/// (beyond those in memory, which `replay` was given): the file's are then read for their
/// ids, so that none is added twice. One the breach log still cannot take is offered to it again in
/// this run, as a live alert the breach log refused is (`untaken_finding`). `let_go`: those
/// past the most read back (`Replayed::unlogged_let_go`). Returns the ids added, and the
/// alerts not.
fn log_unlogged(
    breach: &BreachLog,
    unlogged: Vec<Alert>,
    older: u64,
    let_go: u64,
) -> (Vec<String>, Vec<Alert>) {
    let in_file = if older > 0 && !unlogged.is_empty() {
        match breach.ids_in_file() {
            Ok(ids) => ids,
            // Not offered again: one may be in the file already, and nothing after this reads
            // the file's ids before appending.
            Err(e) => {
                tracing::error!(error = %e, alerts = unlogged.len(), "the breach log's file could not be read for the ids it holds; the alerts only the audit log holds are tried again at the next start");
                return (Vec::new(), Vec::new());
            }
        }
    } else {
        std::collections::HashSet::new()
    };
    let (mut added, mut untaken) = (Vec::new(), Vec::new());
    let (mut logged, mut failed) = (0u64, 0u64);
    for alert in unlogged {
        if in_file.contains(&alert.id) {
            continue;
        }
        let id = alert.id.clone();
        match breach.add(alert.clone()) {
            Ok(()) => {
                logged += 1;
                added.push(id);
            }
            Err(e) => {
                failed += 1;
                metrics::counter!("wardgate_breach_log_failures_total").increment(1);
                tracing::error!(error = %e, alert = %id, "an alert only the audit log holds could not be added to the breach log; offered to it again as this run goes on");
                untaken.push(alert);
            }
        }
    }
    if let_go > 0 {
        tracing::error!(
            let_go,
            "breach detection found more alerts in the audit log that the breach log did not \
             hold than it adds at once; the oldest were let go (they are in the audit log)"
        );
    }
    if logged + failed > 0 {
        tracing::warn!(
            logged,
            failed,
            "breach detection found alerts in the audit log that the breach log did not hold \
             (an append failing, or a crash, before the last stop); those logged are now listed"
        );
    }
    (added, untaken)
}

/// A finding for an alert raised in an earlier run that the breach log has not taken: all
/// `act` does with it is offer the breach log the alert again (`Finding::unrecorded`).
fn untaken_finding(alert: Alert) -> Finding {
    Finding {
        rule: alert.rule,
        mode: alert.mode,
        key: alert.key.clone(),
        caller: alert.principal.clone(),
        client_addr: alert.client_addr.clone(),
        evidence: alert.evidence.clone(),
        summary: alert.summary.clone(),
        addresses: alert.addresses.clone(),
        at_ms: rules::ts_millis(&alert.detected_at).unwrap_or_default(),
        refs: alert.evidence_refs.clone(),
        escalation: 0,
        read_back: true,
        under_own_mark: false,
        unrecorded: Some(Box::new(alert)),
    }
}

/// How long a finding read back at start marks its alert in Redis at least (`act`): long
/// enough for the other replicas of a rolling deploy to read their logs back and find their
/// own findings on the same principal raised.
pub const READ_BACK_MARK: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Who the controls journal and the audit log say revoked a token in containment: a name no
/// token may carry (`auth`), so that no caller's revocation reads as the detector's.
pub const ACTOR: &str = "wardgate-watch";

/// Does what a finding's mode says: count it, alert on it, or alert and contain.
///
/// An alert is raised whatever the breach log can take: it is written to the audit chain and
/// its caller contained (in `contain` mode) first, then appended to the breach log with the
/// containment in it, and only then shown (live feed, console). One the breach log cannot
/// take (a full disk, an I/O error) is handed back (`Some`, the alert in `unrecorded`) for
/// the caller to offer again, and only the breach log's append is tried again: its rule is
/// already quiet for the principal and its evidence spent, and the console finds an alert by
/// the breach log, so letting it go would leave an alert nobody can classify or report.
#[must_use = "a finding handed back was not recorded in the breach log and must be offered again"]
pub async fn act(gw: &Gateway, mut f: Finding, scope: &'static str) -> Option<Finding> {
    if let Some(alert) = f.unrecorded.take() {
        return match add_to_breach_log(gw, &alert).await {
            Ok(()) => None,
            Err(()) => {
                f.unrecorded = Some(alert);
                Some(f)
            }
        };
    }
    metrics::counter!("wardgate_watch_findings_total",
        "rule" => f.rule.name(), "mode" => mode_name(f.mode), "scope" => scope)
    .increment(1);
    if f.mode == Mode::Off {
        return None;
    }
    if f.mode == Mode::Monitor {
        tracing::info!(rule = %f.rule, principal = rules::logged_key(&f.key), summary = %f.summary, scope, "rule matched (monitor only)");
        let data = json!({ "rule": f.rule, "principal": f.key, "summary": f.summary, "evidence": f.evidence, "scope": scope });
        gw.watch
            .publish(alert_event("match", &f.key, data.to_string()));
        return None;
    }
    // Awareness is when the finding was made (its last record's time), not when it is acted
    // on: a queue behind an alert storm, or the breach log's retries, must not move the
    // 72-hour clock later.
    let now = time::OffsetDateTime::now_utc();
    let detected = (f.at_ms > 0)
        .then(|| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(f.at_ms) * 1_000_000))
        .and_then(Result::ok)
        .filter(|t| *t <= now)
        .unwrap_or(now);
    // A finding read back at start marks the rest of its cooldown from when it was made, as
    // it would have then, and `READ_BACK_MARK` at least, so that replicas reading their logs
    // back after the same change of rules raise one alert on the principal, not one each.
    let cooldown = gw.watch.settings.cooldown;
    let lasts = if f.read_back {
        (time::Duration::try_from(cooldown).ok())
            .and_then(|c| detected.checked_add(c))
            .and_then(|end| std::time::Duration::try_from(end - now).ok())
            .map_or(READ_BACK_MARK, |rest| rest.max(READ_BACK_MARK))
    } else {
        cooldown
    };
    // A replica whose breach log or audit log is failing takes no mark: its alert would wait
    // in memory only, or its containment could not be recorded and so not made, and the mark
    // would silence the detectors that could (as a leader that cannot record gives up its
    // lease, `shared::lead`).
    let mut marked = match &gw.watch.shared {
        // Read back with an alert of this replica's own since, whose mark may still stand:
        // raised without a mark (the mark's holder is named afresh at each start, so it
        // could not be told from another detector's).
        Some(_) if f.under_own_mark => false,
        Some(sh) if gw.watch.breach.is_healthy() && gw.audit.is_healthy() => {
            let first = (sh.first_to_alert(f.rule, &f.key, f.escalation, lasts)).await;
            // Another of this start's read-back findings took it: a finding of this
            // replica's own a cooldown before or after that one (two first alerts are a
            // cooldown apart), which its mark of `READ_BACK_MARK` would otherwise silence.
            let own = !first && f.read_back && sh.holds_mark(f.rule, &f.key, f.escalation).await;
            if own {
                false
            } else if !first {
                tracing::debug!(rule = %f.rule, principal = rules::logged_key(&f.key), scope, "already alerted by another detector");
                // Said in this replica's log, where reading it back at start finds its
                // finding again (`replay`): nothing else here says it was raised, and the
                // mark in Redis is gone after a cooldown.
                if scope == "local" {
                    let mut record = system_record("alerted_elsewhere");
                    record.client_addr = f.client_addr.clone();
                    record.detail = Some(json!({
                        "rule": f.rule,
                        "key": logged_alert_key(&f.key, f.caller.is_some()),
                        "principal": f.caller,
                        "evidence": f.evidence,
                        "detected_at": AuditRecord::ts_of(detected),
                    }));
                    if let Err(e) = gw.audit.append(record).await {
                        tracing::error!(error = %e, "a finding another detector raised was not written to the audit log");
                    }
                }
                return None;
            } else {
                true
            }
        }
        _ => false,
    };
    let report_by = detected + time::Duration::hours(breach::REPORT_WITHIN_HOURS);
    let mut alert = Alert {
        // 64 random bits: an alert storm must not give two alerts one id (containment and
        // classification find an alert by it), across replicas too.
        id: format!(
            "A-{}-{:016x}",
            detected.unix_timestamp(),
            rand::random::<u64>()
        ),
        rule: f.rule,
        mode: f.mode,
        summary: if scope == "shared" {
            format!("{} (across replicas)", f.summary)
        } else {
            f.summary.clone()
        },
        principal: f.caller.clone(),
        key: f.key.clone(),
        client_addr: f.client_addr.clone(),
        addresses: f.addresses.clone(),
        evidence: if f.refs.is_empty() {
            f.evidence.clone()
        } else {
            Vec::new()
        },
        evidence_refs: f.refs.clone(),
        detected_at: AuditRecord::ts_of(detected),
        report_by: AuditRecord::ts_of(report_by),
        containment: None,
        classification: None,
        history: Vec::new(),
    };
    tracing::warn!(alert = %alert.id, rule = %f.rule, principal = rules::logged_key(&f.key), summary = %alert.summary, "breach alert");
    // The audit log's copy leaves client addresses where the writer seals them (the record's
    // own `client_addr`, shredded with its day's key) or to the evidence records: the chain
    // keeps its records for the whole retention and none can be edited out of it.
    let mut record = system_record("breach_alert");
    let mut copy = alert.clone();
    record.client_addr = copy.client_addr.take();
    copy.addresses.clear();
    copy.key = logged_alert_key(&copy.key, copy.principal.is_some());
    record.detail = serde_json::to_value(&copy).ok();
    if let Err(e) = gw.audit.append(record).await {
        tracing::error!(error = %e, alert = %alert.id, "alert not written to the audit log");
    }
    if f.mode == Mode::Contain {
        alert.containment = contain(gw, &alert).await;
        // Not made here (its record or the control journal failed): the mark goes back, so
        // that another replica's detector, finding the same, raises it and contains.
        let failed =
            (alert.containment.as_ref()).is_some_and(|c| c.outcome.starts_with("not revoked"));
        if let (true, true, Some(sh)) = (failed, marked, &gw.watch.shared) {
            sh.release_alert(f.rule, &f.key, f.escalation).await;
            marked = false;
        }
    }
    match add_to_breach_log(gw, &alert).await {
        Ok(()) => None,
        Err(()) => {
            if let (true, Some(sh)) = (marked, &gw.watch.shared) {
                sh.release_alert(f.rule, &f.key, f.escalation).await;
            }
            f.unrecorded = Some(Box::new(alert));
            Some(f)
        }
    }
}

/// Appends a raised alert to the breach log, then shows it (feed, console); on failure, says
/// so and counts it (`wardgate_breach_log_failures_total`).
async fn add_to_breach_log(gw: &Gateway, alert: &Alert) -> Result<(), ()> {
    let log = gw.watch.breach.clone();
    let stored = alert.clone();
    let failed = match tokio::task::spawn_blocking(move || log.add(stored)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(format!("the breach log writer task failed: {e}")),
    };
    if let Some(e) = failed {
        metrics::counter!("wardgate_breach_log_failures_total").increment(1);
        tracing::error!(error = %e, alert = %alert.id,
            "alert not written to the breach log (it is in the audit log, and acted on); tried again");
        return Err(());
    }
    note_logged(gw, std::slice::from_ref(&alert.id)).await;
    gw.watch.publish(alert_event(
        "alert",
        &alert.key,
        serde_json::to_string(alert).unwrap_or_default(),
    ));
    Ok(())
}

/// Records in the audit log that the breach log took these alerts (`watch.breach_logged`):
/// what tells the next start (`Replayed::unlogged`) an alert the breach log never took from
/// one it took and that has since been pruned or rotated out of it by hand, which must not
/// come back open. Without the record (the audit log failing meanwhile), an alert still in
/// the breach log is not added twice all the same.
async fn note_logged(gw: &Gateway, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let mut record = system_record("breach_logged");
    record.detail = Some(json!({ "alerts": ids }));
    if let Err(e) = gw.audit.append(record).await {
        tracing::warn!(error = %e, alerts = ids.len(), "the breach log's taking of alerts was not recorded in the audit log");
    }
}

/// Revokes, on every replica, every token the alert's caller holds (`containment`), logging
/// the change before it takes effect: what was done, for the alert's breach log entry (`None`
/// when there is no caller to contain).
async fn contain(gw: &Gateway, alert: &Alert) -> Option<Containment> {
    let Some(caller) = alert.principal.clone() else {
        tracing::warn!(alert = %alert.id, "nothing to contain: the caller was not authenticated");
        return None;
    };
    let reason = format!("containment for alert {}: {}", alert.id, alert.summary);
    let event = containment(&caller, ACTOR, &reason);
    let mut record = system_record("breach_containment");
    record.detail = serde_json::to_value(&event).ok();
    // Synced whatever `audit.durability` says, as every control change's record is.
    let event_id = event.id.clone();
    let outcome = match gw.audit.append_synced(record).await {
        Err(e) => format!("not revoked: the audit log is unavailable ({e})"),
        Ok(_) => {
            let done = gw.controls.record(event).await;
            // The record above says the revocation was made: one that did not take (nowhere,
            // or here only) is said in the log too, not only in the breach log.
            if let Err(e) = &done {
                let answer = e.answer();
                let mut failed = system_record("breach_containment_failed");
                (failed.decision, failed.status) = (Decision::Error, answer.status().as_u16());
                failed.reason = Some(answer.code().to_owned());
                failed.detail = Some(serde_json::json!({
                    "alert": alert.id,
                    "containment": event_id,
                    "subject": caller.subject,
                    "outcome": outcome(&done),
                }));
                if let Err(e) = gw.audit.append_synced(failed).await {
                    tracing::error!(error = %e, alert = %alert.id, "the failed containment's record was not written");
                }
            }
            outcome(&done)
        }
    };
    tracing::warn!(alert = %alert.id, subject = caller.subject, outcome, "containment");
    Some(Containment {
        subject: caller.subject.clone(),
        token_id: caller.token_id.clone(),
        at: AuditRecord::now_ts(),
        outcome,
    })
}

/// The shared-controls event that contains `caller`: every token issued to them so far stops
/// working, not only the one the alert saw. A scraper whose app refreshes its token, or who
/// holds a second one on another device, would otherwise go on with it (and the rule, in its
/// cooldown for them, would not fire again). A token issued after it works: stopping the
/// account for good is the identity provider's part.
pub(crate) fn containment(caller: &Caller, by: &str, reason: &str) -> Event {
    let (id, at) = crate::controls::stamp();
    Event {
        id,
        at,
        by: by.to_owned(),
        reason: reason.to_owned(),
        change: Change::RevokeSubject {
            subject: caller.subject.clone(),
        },
    }
}

/// A revocation's outcome, as the breach log gives it.
pub(crate) fn outcome(done: &Result<(), crate::controls::RecordError>) -> String {
    match done {
        Ok(()) => "revoked".to_owned(),
        Err(e @ crate::controls::RecordError::NotShared(_)) => format!("revoked: {e}"),
        Err(e) => format!("not revoked: {e}"),
    }
}

/// Adds the containment to the alert in the breach log and shows it in the live feed.
pub(crate) async fn record_containment(
    gw: &Gateway,
    alert_id: &str,
    caller: &Caller,
    outcome: String,
) -> Option<Alert> {
    let containment = Containment {
        subject: caller.subject.clone(),
        token_id: caller.token_id.clone(),
        at: AuditRecord::now_ts(),
        outcome,
    };
    let log = gw.watch.breach.clone();
    let id = alert_id.to_owned();
    match tokio::task::spawn_blocking(move || log.contain(&id, containment)).await {
        Ok(Ok(updated)) => {
            gw.watch.publish(alert_event(
                "alert",
                &updated.key,
                serde_json::to_string(&updated).unwrap_or_default(),
            ));
            Some(updated)
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, alert = alert_id, "containment not written to the breach log");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "breach log writer task failed");
            None
        }
    }
}

fn alert_event(kind: &'static str, principal: &str, data: String) -> FeedEvent {
    FeedEvent {
        kind,
        id: 0,
        principal: Some(principal.to_owned()),
        dataset: None,
        purpose: None,
        decision: None,
        data,
    }
}

/// An alert's key as the audit log keeps it: `addr` for one keyed on the address of a caller
/// not known (the address is in the record's `client_addr`, sealed); a caller's subject as it
/// is, whatever it looks like (`replay` reads it so).
fn logged_alert_key(key: &str, known: bool) -> String {
    if !known && key.starts_with("addr:") {
        "addr".to_owned()
    } else {
        key.to_owned()
    }
}

/// A record of something the detector did.
fn system_record(what: &str) -> AuditRecord {
    AuditRecord::system(&format!("watch.{what}"), what)
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Off => "off",
        Mode::Monitor => "monitor",
        Mode::Alert => "alert",
        Mode::Contain => "contain",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records disclosed per principal per minute.
#[derive(Default)]
struct Volumes {
    by: HashMap<String, (String, VecDeque<(i64, u64)>)>,
    /// The minute principals idle for the chart's hour were last swept out.
    swept: i64,
}

impl Volumes {
    fn observe(&mut self, r: &AuditRecord) {
        // (A write's record before forwarding discloses nothing; its answer's record counts.)
        let (Some(c), n @ 1..) = (&r.caller, r.disclosed_count()) else {
            return;
        };
        let minute = rules::ts_millis(&r.ts).unwrap_or_else(rules::now_millis) / 60_000;
        if !self.by.contains_key(&c.subject) {
            self.by
                .insert(c.subject.clone(), (c.role.clone(), VecDeque::new()));
        }
        let Some((_, buckets)) = self.by.get_mut(&c.subject) else {
            return;
        };
        match buckets.back_mut() {
            Some((m, count)) if *m == minute => *count += n,
            _ => buckets.push_back((minute, n)),
        }
        while buckets
            .front()
            .is_some_and(|(m, _)| *m <= minute - VOLUME_MINUTES)
        {
            buckets.pop_front();
        }
        // At most once a minute: with more principals than that active within the hour,
        // a sweep on every record would visit them all and remove none.
        if self.by.len() > 10_000 && self.swept != minute {
            self.swept = minute;
            self.by
                .retain(|_, (_, b)| b.back().is_some_and(|(m, _)| *m > minute - VOLUME_MINUTES));
        }
    }

    fn snapshot(&self, now_minute: i64) -> serde_json::Value {
        let first = now_minute - VOLUME_MINUTES + 1;
        let mut series: Vec<(u64, serde_json::Value)> = self
            .by
            .iter()
            .filter_map(|(who, (role, buckets))| {
                let mut counts = vec![0u64; VOLUME_MINUTES as usize];
                for (m, n) in buckets {
                    if let Some(slot) = usize::try_from(m - first)
                        .ok()
                        .and_then(|i| counts.get_mut(i))
                    {
                        *slot += n;
                    }
                }
                let total: u64 = counts.iter().sum();
                (total > 0).then(|| {
                    (
                        total,
                        json!({ "principal": who, "role": role, "total": total, "counts": counts }),
                    )
                })
            })
            .collect();
        series.sort_by_key(|s| std::cmp::Reverse(s.0));
        series.truncate(10);
        json!({
            "first_minute": AuditRecord::ts_of(
                time::OffsetDateTime::from_unix_timestamp(first * 60)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
            ),
            "minutes": VOLUME_MINUTES,
            "principals": series.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disclosing(subject: &str, minute: i64) -> AuditRecord {
        let mut r = AuditRecord::system("voter.electors.list", "page");
        r.reason = None;
        r.ts = AuditRecord::ts_of(time::OffsetDateTime::from_unix_timestamp(minute * 60).unwrap());
        r.caller = Some(Caller {
            subject: subject.to_owned(),
            role: "councillor".to_owned(),
            unit: String::new(),
            token_id: "t".to_owned(),
        });
        r.subjects.push("VF-1");
        r
    }

    /// Past 10,000 principals in the chart, those idle for its hour are swept out, once a
    /// minute (not on every record, which would visit them all each time).
    #[test]
    fn principals_idle_for_the_hour_are_swept_out_once_a_minute() {
        let mut v = Volumes::default();
        let start = 30_000_000;
        for n in 0..10_001 {
            v.observe(&disclosing(&format!("p{n}"), start));
        }
        assert_eq!(v.by.len(), 10_001);
        // An hour on: the first record of the minute sweeps the idle ones out.
        let later = start + VOLUME_MINUTES;
        v.observe(&disclosing("late", later));
        assert_eq!(v.by.len(), 1);
        for n in 0..10_001 {
            v.observe(&disclosing(&format!("q{n}"), later + 1));
        }
        // No sweep again within that minute, though over the bound.
        v.observe(&disclosing("again", later + 1));
        assert_eq!(v.by.len(), 10_003);
        assert_eq!(v.swept, later + 1);
    }
}
