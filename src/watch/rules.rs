//! The detection rules: a pure state machine over durable audit records.
//!
//! [`Detector::observe`] takes one record (with its sequence number, the evidence an alert
//! cites) and returns the rules it made match. Time is the record's own timestamp, never the
//! wall clock, so a replay of the log or a test script gives the same findings. Each rule keeps
//! a sliding window per principal (or per client address when the caller is unknown); once a
//! rule matches for someone it stays quiet for them for the cooldown, then counts afresh.

use std::collections::{HashMap, VecDeque};

use crate::audit::{AuditRecord, Caller, Decision, RecordKind};

use super::settings::{Mode, Rule, RuleSettings, WatchSettings, Zone};

/// An alert cites at most this many audit records (the most recent).
const MAX_EVIDENCE: usize = 500;
/// Sweep idle windows after this many observations, so memory follows the active principals.
const SWEEP_EVERY: u64 = 10_000;
/// How far ahead of the detector's clock a record's own time is taken as it is
/// (`Detector::observe_access`).
const AHEAD_TAKEN_MS: i64 = 2_000;

/// What the rules read from one audit record: small enough to share between replicas (no
/// subject ids, only how many were disclosed).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Observation {
    pub ts: String,
    pub caller: Option<Caller>,
    pub client_addr: Option<String>,
    pub decision: Decision,
    pub disclosed: u64,
    pub withheld_target: Option<String>,
    pub reason: Option<String>,
    pub route: Option<String>,
    /// The number the path's last segment ends in (`/voter/electors/VF-0000012`: 12), for
    /// `enumeration`, which looks for runs of neighbouring ids; never the path itself, which
    /// names the subject. Shared between replicas shifted by a secret offset per principal and
    /// route (`shared`), which keeps the distances and hides the ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_number: Option<u64>,
    /// Always empty, and ignored: replicas of before 2026-12-06 read an entry only with a
    /// `path` (they dropped, and acknowledged, any without), so that through a rolling upgrade
    /// a replica of before that leads cross-replica detection and still counts the new ones'
    /// accesses. Remove once no such replica runs.
    #[serde(default)]
    pub path: String,
    /// The export this record is part of (its request id): an export is audited as one record
    /// per chunk of about a MiB, and `large_export` counts its chunks together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// This is the export's closing record: its count can be forgotten.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export_ended: bool,
}

impl Observation {
    /// `None` for records that are not data access (admin actions, system events), except
    /// the admin plane's refusals: probing `/rights` or `/sar` with a stolen or ended token is
    /// refused access as much as probing a dataset is (`denied_burst`, `ended_grant`). A write's
    /// record made before it is forwarded (`AuditRecord::is_write_intent`) is an access that
    /// discloses nothing (the answer's record counts what the write disclosed), so that a
    /// caller who goes away before the answer is still seen acting.
    pub fn of(rec: &AuditRecord) -> Option<Observation> {
        let refused_admin = rec.kind == RecordKind::Admin && rec.decision == Decision::Deny;
        (rec.kind == RecordKind::Access || refused_admin).then(|| Observation {
            ts: rec.ts.clone(),
            caller: rec.caller.clone(),
            client_addr: rec.client_addr.clone(),
            decision: rec.decision,
            disclosed: rec.disclosed_count(),
            withheld_target: rec.withheld_target.clone(),
            reason: rec.reason.clone(),
            route: rec.route.clone(),
            // Reads by id only: what `enumeration` looks at (an admin route's subject, say,
            // is not shared even as a number).
            id_number: (rec.route.as_deref().is_some_and(|r| r.ends_with(".read")))
                .then(|| trailing_number(&rec.path))
                .flatten(),
            path: String::new(),
            export: rec
                .detail
                .as_ref()
                .is_some_and(|d| {
                    ["export_chunk", "export_complete", "export_aborted"]
                        .iter()
                        .any(|k| d.get(k).is_some())
                })
                .then(|| rec.request_id.clone()),
            export_ended: rec.detail.as_ref().is_some_and(|d| {
                d.get("export_complete").is_some() || d.get("export_aborted").is_some()
            }),
        })
    }
}

/// What one export has disclosed so far.
#[derive(Default)]
struct ExportSeen {
    total: u64,
    /// Its chunk records, the most recent `MAX_EVIDENCE`.
    seqs: VecDeque<u64>,
    last_at: i64,
    /// The bar its last chunk was judged against (`Detector::bar`): one lower now (the
    /// cooldown over, or an alert not acted on forgotten) is reached by what the export
    /// holds already.
    bar: u64,
}

/// One rule matching for one principal.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub rule: Rule,
    pub mode: Mode,
    /// The principal's subject, or `addr:IP` when the caller is not known.
    pub key: String,
    pub caller: Option<Caller>,
    pub client_addr: Option<String>,
    /// Sequence numbers of the audit records that make the case.
    pub evidence: Vec<u64>,
    pub summary: String,
    /// The client addresses the case rests on (`many_addresses`; IPv6 ones as their /64,
    /// `counted_as`), kept out of `summary` so
    /// that the audit log's copy of the alert can leave them to the evidence records, where
    /// they are sealed (`audit.client_addr_retention`).
    pub addresses: Vec<String>,
    /// When the last piece of evidence was recorded, Unix milliseconds.
    pub at_ms: i64,
    /// Its alert, raised (in the audit log, its caller contained) but not yet taken by the
    /// breach log: what the next attempt appends, and all it does (`watch::act`).
    pub unrecorded: Option<Box<super::breach::Alert>>,
    /// The evidence as `REPLICA#SEQ`, when it spans replicas (the shared detector fills it
    /// in; `evidence` is then its own numbering).
    pub refs: Vec<String>,
    /// 0 for a first alert; for an escalation within the cooldown (`Quiet`), how far past
    /// the threshold its amount went, in doublings (`n`: at least 2^n times it), the same
    /// for every detector that counts as much (it names the escalation's mark in Redis).
    pub escalation: u32,
    /// Made again reading the log back at start, no alert in either log standing for it
    /// (`replay`): its mark in Redis lasts the rest of its cooldown from when it was made, or
    /// `watch::READ_BACK_MARK` at least (`watch::act`).
    pub read_back: bool,
    /// Read back, and an alert of this replica's own on its rule and principal since (of
    /// another case) may still hold their mark in Redis: raised without one (`watch::act`).
    pub under_own_mark: bool,
}

/// A finding's principal as the server log may show it: a caller's subject, or `addr` for
/// one keyed on a client address, which the log must not hold in the clear (the audit log
/// keeps addresses sealed, shredded after `audit.client_addr_retention`).
pub fn logged_key(key: &str) -> &str {
    if key.starts_with("addr:") {
        "addr"
    } else {
        key
    }
}

/// A rule's cooldown for one principal after an alert: nothing more is raised before
/// `until`, except, for the rules that count records disclosed (`escalates`), an escalation
/// once what it counts since reaches the threshold times 2^(`level` + 1), `level` being the
/// last alert's size in doublings of the threshold; the escalation's own size becomes the
/// level. A small alert must not buy an hour in which any amount can be taken unseen, and an
/// hour's scraping raises a handful of alerts, not hundreds.
#[derive(Clone, Copy, Debug)]
struct Quiet {
    until: i64,
    level: u32,
    /// The level and end before the last escalation (`None` after a first alert): what an
    /// escalation that was not acted on (`forget_cooldown`) goes back to.
    before: Option<(u32, i64)>,
}

/// The rules that escalate within their cooldown: those that count records disclosed, and
/// aggregates (a series of 30 in an hour is already far from a study's few; after its alert
/// the next hour's hundreds would otherwise go unseen, no other rule counting them).
/// (Refusals, withheld targets and ended tokens come one at a time from thresholds of 1 to
/// 20: doubling from those would alert on ordinary traffic, and in `contain` mode revoke
/// the caller again and again.)
fn escalates(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::Volume | Rule::LargeExport | Rule::UnusualHours | Rule::AggregateSeries
    )
}

/// `amount`'s size in doublings of `threshold`: ⌊log2(amount / threshold)⌋.
fn doublings(amount: u64, threshold: u64) -> u32 {
    (amount / threshold.max(1)).max(1).ilog2().min(62)
}

#[derive(Default)]
struct Window {
    items: VecDeque<(i64, u64, u64)>,
    total: u64,
}

impl Window {
    fn push(&mut self, at: i64, seq: u64, weight: u64, span_ms: i64) -> u64 {
        self.items.push_back((at, seq, weight));
        self.total += weight;
        self.evict(at - span_ms);
        self.total
    }

    fn evict(&mut self, before: i64) {
        while let Some(&(t, _, w)) = self.items.front() {
            if t >= before {
                break;
            }
            self.items.pop_front();
            self.total -= w;
        }
    }

    fn evidence(&self) -> Vec<u64> {
        let skip = self.items.len().saturating_sub(MAX_EVIDENCE);
        self.items.iter().skip(skip).map(|(_, s, _)| *s).collect()
    }
}

/// Where one token has been used from within the window: per address, when it was last seen
/// and its latest requests (the evidence). Memory follows the addresses, not the requests: a
/// token sending thousands of requests a second from one address holds one entry.
#[derive(Default)]
struct Seen {
    by_addr: HashMap<String, (i64, VecDeque<u64>)>,
    /// (last seen, address): which leaves the window first.
    by_time: std::collections::BTreeSet<(i64, String)>,
    last_at: i64,
}

/// Requests kept as evidence per address; the alert cites at most `MAX_EVIDENCE` in all.
const EVIDENCE_PER_ADDRESS: usize = 32;
/// Addresses kept per token: far above any threshold worth setting, a bound on what one token
/// from a rotating address range can make the detector hold.
const MAX_ADDRESSES_PER_TOKEN: usize = 1024;

impl Seen {
    fn push(&mut self, at: i64, addr: &str, seq: u64, span_ms: i64) {
        self.last_at = self.last_at.max(at);
        while let Some((t, _)) = self.by_time.first() {
            if *t >= at - span_ms {
                break;
            }
            if let Some((_, old)) = self.by_time.pop_first() {
                self.by_addr.remove(&old);
            }
        }
        if !self.by_addr.contains_key(addr) && self.by_addr.len() >= MAX_ADDRESSES_PER_TOKEN {
            return;
        }
        let (t, seqs) =
            (self.by_addr.entry(addr.to_owned())).or_insert_with(|| (at, VecDeque::new()));
        self.by_time.remove(&(*t, addr.to_owned()));
        *t = (*t).max(at);
        self.by_time.insert((*t, addr.to_owned()));
        seqs.push_back(seq);
        if seqs.len() > EVIDENCE_PER_ADDRESS {
            seqs.pop_front();
        }
    }

    /// The latest requests from every address, oldest first, at most `MAX_EVIDENCE`.
    fn evidence(&self) -> Vec<u64> {
        let mut all: Vec<u64> = (self.by_addr.values())
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        all.sort_unstable();
        let skip = all.len().saturating_sub(MAX_EVIDENCE);
        all.split_off(skip)
    }
}

/// Ids further apart than this are not one sweep through the register (past withheld ids a
/// sweep skips a few).
const ENUMERATION_GAP: u64 = 3;

/// A sweep that leaves wider gaps now and then (nineteen ids read, four skipped), or reads
/// every few ids, still crowds its reads into a short run of ids: the threshold's reads
/// within a run this many times the threshold wide is one too (twenty within 160 ids,
/// where reads spread over a ward's thousands put a handful).
const ENUMERATION_SPREAD: u64 = 2 * (ENUMERATION_GAP + 1);

/// One principal's reads by id on one route (`voter.read`), within the enumeration window: a
/// sweep through the register shows as ids close to one another, whatever the order they
/// were read in, however often each, whatever else was read between. One entry per id, not
/// per read, at most `MAX_READ_IDS` of them.
#[derive(Default)]
struct Reads {
    /// Id -> when it was last read, and that read's audit record.
    by_id: std::collections::BTreeMap<u64, (i64, u64)>,
    /// (last read, id): which leaves the window first.
    by_time: std::collections::BTreeSet<(i64, u64)>,
}

/// Ids kept per principal and route: a sweep shows long before this many.
const MAX_READ_IDS: usize = 4096;

impl Reads {
    fn push(&mut self, at: i64, id: u64, seq: u64, span_ms: i64) {
        while let Some(&(t, old)) = self.by_time.first() {
            if t >= at - span_ms && self.by_id.len() < MAX_READ_IDS {
                break;
            }
            self.by_time.pop_first();
            self.by_id.remove(&old);
        }
        let at = match self.by_id.insert(id, (at, seq)) {
            Some((before, _)) => {
                self.by_time.remove(&(before, id));
                let latest = before.max(at);
                self.by_id.insert(id, (latest, seq));
                latest
            }
            None => at,
        };
        self.by_time.insert((at, id));
    }

    /// The audit records of the reads in the fullest run of ids at most `width` wide that
    /// holds `id`, at most `limit` of them.
    fn densest(&self, id: u64, width: u64, limit: usize) -> Vec<u64> {
        let near: Vec<(u64, u64)> = (self.by_id)
            .range(id.saturating_sub(width)..=id.saturating_add(width))
            .map(|(&k, &(_, s))| (k, s))
            .collect();
        let (mut best, mut end) = ((0, 0), 0);
        for (start, &(from, _)) in near.iter().enumerate() {
            if from > id {
                break;
            }
            end = end.max(start);
            while end < near.len() && near[end].0 - from < width {
                end += 1;
            }
            if id - from < width && end - start > best.1 - best.0 {
                best = (start, end);
            }
        }
        (near[best.0..best.1].iter())
            .take(limit)
            .map(|&(_, s)| s)
            .collect()
    }

    /// The audit records of the reads around `id` whose ids follow one another with gaps of
    /// at most `ENUMERATION_GAP`, at most `limit` of them.
    fn around(&self, id: u64, limit: usize) -> Vec<u64> {
        let mut seqs: Vec<u64> = self.by_id.get(&id).map(|(_, s)| *s).into_iter().collect();
        let mut edge = id;
        for (&k, &(_, s)) in self.by_id.range(..id).rev() {
            if edge - k > ENUMERATION_GAP || seqs.len() >= limit {
                break;
            }
            seqs.push(s);
            edge = k;
        }
        edge = id;
        for (&k, &(_, s)) in self.by_id.range(id.saturating_add(1)..) {
            if k - edge > ENUMERATION_GAP || seqs.len() >= limit {
                break;
            }
            seqs.push(s);
            edge = k;
        }
        seqs.sort_unstable();
        seqs
    }
}

pub struct Detector {
    settings: WatchSettings,
    windows: HashMap<(Rule, String), Window>,
    quiet_until: HashMap<(Rule, String), Quiet>,
    /// Per token id: when it was seen from which address.
    addresses: HashMap<String, Seen>,
    /// Reads by id, per principal and route.
    reads: HashMap<(String, String), Reads>,
    /// Exports under way, by request id.
    exports: HashMap<String, ExportSeen>,
    observed: u64,
}

impl Detector {
    pub fn new(settings: WatchSettings) -> Detector {
        Detector {
            settings,
            windows: HashMap::new(),
            quiet_until: HashMap::new(),
            addresses: HashMap::new(),
            reads: HashMap::new(),
            exports: HashMap::new(),
            observed: 0,
        }
    }

    /// The settings it judges by.
    pub fn settings(&self) -> &WatchSettings {
        &self.settings
    }

    /// Feeds one durable record; returns what it made match.
    pub fn observe(&mut self, seq: u64, rec: &AuditRecord) -> Vec<Finding> {
        match Observation::of(rec) {
            Some(o) => self.observe_access(seq, &o),
            None => Vec::new(),
        }
    }

    /// Feeds one access; `seq` is what the findings cite as evidence.
    pub fn observe_access(&mut self, seq: u64, rec: &Observation) -> Vec<Finding> {
        // A record dated ahead of this detector's clock (another replica's, running fast)
        // counts as made two seconds from now at most: by its own time it would evict the others' records from the
        // principal's windows early, each window shorter by the difference.
        let now = now_millis();
        let at = ts_millis(&rec.ts).map_or(now, |t| t.min(now.saturating_add(AHEAD_TAKEN_MS)));
        self.observed += 1;
        if self.observed.is_multiple_of(SWEEP_EVERY) {
            self.sweep(at);
        }
        let ev = Event::of(seq, rec, at);
        let mut out = Vec::new();
        let disclosed = rec.disclosed;
        if disclosed > 0 {
            self.count(Rule::Volume, &ev, disclosed, &mut out, |n, t, w| {
                format!("{n} records disclosed within {w} (the role's norm is under {t})")
            });
            let large = self.settings.rule(Rule::LargeExport);
            let mode = large.mode;
            let threshold = large.threshold_for(ev.role());
            // The threshold, or within a cooldown the escalation's bar.
            let bar = self.bar(Rule::LargeExport, &ev, threshold);
            match &rec.export {
                // An export's chunks are one response: counted together, raised once, when
                // their sum first reaches the threshold.
                Some(id) => {
                    let seen = self.exports.entry(id.clone()).or_default();
                    let before = seen.total;
                    seen.total += disclosed;
                    seen.last_at = at;
                    seen.seqs.push_back(seq);
                    if seen.seqs.len() > MAX_EVIDENCE {
                        seen.seqs.pop_front();
                    }
                    // Raised when the sum reaches the bar, or is over a bar lowered since the
                    // chunk before (the cooldown over, or an alert not acted on forgotten): an
                    // export outliving its alert's cooldown counts afresh, as any other
                    // record does.
                    let lowered = bar < seen.bar;
                    seen.bar = bar;
                    if mode != Mode::Off && (before < bar || lowered) && seen.total >= bar {
                        let summary = format!(
                            "one export disclosed {} records so far (a walk sheet is under \
                             {threshold})",
                            seen.total
                        );
                        let (evidence, total) = (seen.seqs.iter().copied().collect(), seen.total);
                        let amount = (total, threshold);
                        if self.raise(Rule::LargeExport, &ev, evidence, summary, &mut out, amount) {
                            // The bar this alert set, which its cooldown's end lowers.
                            let raised = self.bar(Rule::LargeExport, &ev, threshold);
                            if let Some(seen) = self.exports.get_mut(id) {
                                seen.bar = raised;
                            }
                        }
                    }
                }
                None if mode != Mode::Off && disclosed >= bar => {
                    let summary = format!(
                        "one response disclosed {disclosed} records (a walk sheet is under \
                         {threshold})"
                    );
                    self.raise(
                        Rule::LargeExport,
                        &ev,
                        vec![seq],
                        summary,
                        &mut out,
                        (disclosed, threshold),
                    );
                }
                None => {}
            }
            if self.outside_hours(at) {
                self.count(Rule::UnusualHours, &ev, disclosed, &mut out, |n, _, w| {
                    format!("{n} records disclosed outside working hours within {w}")
                });
            }
        }
        if rec.export_ended
            && let Some(id) = &rec.export
        {
            self.exports.remove(id);
        }
        // A purpose the catalogue does not know is an error (400), not a policy's refusal,
        // but asking for `sale` or `commercial` use again and again is probing all the same.
        if rec.decision == Decision::Deny || rec.reason.as_deref() == Some("purpose_unknown") {
            self.count(Rule::DeniedBurst, &ev, 1, &mut out, |n, _, w| {
                format!("{n} refused requests within {w}")
            });
        }
        match rec.withheld_target.as_deref() {
            Some("out_of_area") => self.count(Rule::OutOfArea, &ev, 1, &mut out, |n, _, w| {
                format!("{n} records outside the caller's areas asked for by id within {w}")
            }),
            Some("protected" | "restricted") => {
                self.count(Rule::ProtectedSubject, &ev, 1, &mut out, |n, _, w| {
                    format!("{n} attempts on anonymous, under-16 or restricted subjects within {w}")
                })
            }
            _ => {}
        }
        if matches!(
            rec.reason.as_deref(),
            Some("token_role_not_from_issuer" | "token_name_not_from_issuer")
        ) {
            self.count(Rule::IssuerOverreach, &ev, 1, &mut out, |n, _, w| {
                format!(
                    "{n} tokens within {w} signed by a trusted issuer for a role it may not \
                     issue or a caller it may not name"
                )
            });
        }
        if matches!(
            rec.reason.as_deref(),
            Some("token_revoked" | "token_expired")
        ) {
            self.count(Rule::EndedGrant, &ev, 1, &mut out, |n, _, w| {
                format!("{n} requests with a revoked or ended token within {w}")
            });
        }
        // An aggregate refused for its groups (`too_many_groups`) was counted all the same:
        // whether it was says how many distinct values the scope holds.
        if (rec.decision == Decision::Allow || rec.reason.as_deref() == Some("too_many_groups"))
            && rec
                .route
                .as_deref()
                .is_some_and(|r| matches!(r.split('.').collect::<Vec<_>>()[..], [_, "aggregate"]))
        {
            self.count(Rule::AggregateSeries, &ev, 1, &mut out, |n, _, w| {
                format!("{n} aggregates within {w}: answers that could be set against each other")
            });
        }
        self.addresses(&ev, &mut out);
        self.enumeration(rec, &ev, &mut out);
        out
    }

    /// Adds `weight` to the rule's window for this principal; matches at the threshold.
    fn count(
        &mut self,
        rule: Rule,
        ev: &Event,
        weight: u64,
        out: &mut Vec<Finding>,
        describe: impl Fn(u64, u64, String) -> String,
    ) {
        let s = self.settings.rule(rule);
        if s.mode == Mode::Off {
            return;
        }
        let threshold = s.threshold_for(ev.role());
        let span = millis(s);
        let key = (rule, ev.key.clone());
        let bar = self.bar(rule, ev, threshold);
        let window = self.windows.entry(key.clone()).or_default();
        let total = window.push(ev.at, ev.seq, weight, span);
        if total < bar {
            return;
        }
        let evidence = window.evidence();
        let summary = describe(
            total,
            threshold,
            humantime::format_duration(s.window).to_string(),
        );
        if self.raise(rule, ev, evidence, summary, out, (total, threshold)) {
            self.windows.remove(&key);
        }
    }

    fn addresses(&mut self, ev: &Event, out: &mut Vec<Finding>) {
        let s = self.settings.rule(Rule::ManyAddresses);
        let (Some(caller), Some(addr)) = (&ev.caller, &ev.addr) else {
            return;
        };
        if s.mode == Mode::Off {
            return;
        }
        let (span, threshold) = (millis(s), s.threshold_for(None));
        let quiet = self.quiet(Rule::ManyAddresses, ev);
        let seen = self.addresses.entry(caller.token_id.clone()).or_default();
        seen.push(ev.at, addr, ev.seq, span);
        if (seen.by_addr.len() as u64) < threshold || quiet {
            // (Nothing to build while the rule is quiet for them: a token spread over many
            // addresses would otherwise cost a sort of its evidence on every request.)
            return;
        }
        let mut addrs: Vec<String> = seen.by_addr.keys().cloned().collect();
        addrs.sort_unstable();
        let summary = format!(
            "one token used from {} addresses within {}",
            addrs.len(),
            humantime::format_duration(s.window),
        );
        let evidence = seen.evidence();
        if self.raise(Rule::ManyAddresses, ev, evidence, summary, out, (0, 1)) {
            self.addresses.remove(&caller.token_id);
            if let Some(f) = out.last_mut() {
                f.addresses = addrs;
            }
        }
    }

    /// Reads by id whose numeric part goes up one (or a few, past withheld ids) at a time.
    fn enumeration(&mut self, rec: &Observation, ev: &Event, out: &mut Vec<Finding>) {
        let s = self.settings.rule(Rule::Enumeration);
        if s.mode == Mode::Off || !rec.route.as_deref().is_some_and(|r| r.ends_with(".read")) {
            return;
        }
        let (Some(route), Some(n)) = (&rec.route, rec.id_number) else {
            return;
        };
        // A read of an id that holds no record discloses nothing, and would take the place
        // of a sweep's reads among the ids kept (`MAX_READ_IDS`): thousands of them between
        // a sweep's reads would otherwise push its start out before it showed. (One withheld
        // as protected or out of the caller's area is a record, and is kept.)
        if rec.disclosed == 0 && rec.withheld_target.is_none() {
            return;
        }
        let (span, threshold) = (millis(s), s.threshold_for(None));
        let key = (ev.key.clone(), route.clone());
        let quiet = self.quiet(Rule::Enumeration, ev);
        let reads = self.reads.entry(key.clone()).or_default();
        reads.push(ev.at, n, ev.seq, span);
        if quiet {
            return;
        }
        let limit = usize::try_from(threshold)
            .unwrap_or(usize::MAX)
            .max(MAX_EVIDENCE);
        let mut evidence = reads.around(n, limit);
        let mut summary = "records read one by one through a run of neighbouring ids";
        if (evidence.len() as u64) < threshold {
            let width = threshold.saturating_mul(ENUMERATION_SPREAD);
            evidence = reads.densest(n, width, limit);
            if (evidence.len() as u64) < threshold {
                return;
            }
            summary = "records read one by one within a short run of ids";
        }
        let summary = format!("{} {summary}", evidence.len());
        evidence.drain(..evidence.len().saturating_sub(MAX_EVIDENCE));
        if self.raise(Rule::Enumeration, ev, evidence, summary, out, (0, 1)) {
            self.reads.remove(&key);
        }
    }

    /// What `rule` must count for this principal to raise now: `threshold`, or within a
    /// cooldown the escalation's bar (`Quiet`; nothing, for a rule that does not escalate).
    fn bar(&self, rule: Rule, ev: &Event, threshold: u64) -> u64 {
        match self.quiet_until.get(&(rule, ev.key.clone())) {
            Some(q) if ev.at < q.until && escalates(rule) => {
                threshold.saturating_mul(1 << (q.level + 1).min(63))
            }
            Some(q) if ev.at < q.until => u64::MAX,
            _ => threshold,
        }
    }

    /// Records a finding unless the rule is quiet for this principal, or, within its
    /// cooldown, an escalation when `amount` (what the rule counted, and its threshold)
    /// reached the bar (`bar`); true if raised.
    fn raise(
        &mut self,
        rule: Rule,
        ev: &Event,
        evidence: Vec<u64>,
        summary: String,
        out: &mut Vec<Finding>,
        (amount, threshold): (u64, u64),
    ) -> bool {
        let key = (rule, ev.key.clone());
        let size = doublings(amount, threshold);
        let (escalation, before) = match self.quiet_until.get(&key) {
            Some(q) if ev.at < q.until => {
                if amount < self.bar(rule, ev, threshold) {
                    return false;
                }
                (size, Some((q.level, q.until)))
            }
            _ => (0, None),
        };
        let cooldown = i64::try_from(self.settings.cooldown.as_millis()).unwrap_or(i64::MAX);
        let quiet = Quiet {
            until: ev.at.saturating_add(cooldown),
            level: size,
            before,
        };
        self.quiet_until.insert(key, quiet);
        let summary = if escalation == 0 {
            summary
        } else {
            format!(
                "{summary}: an escalation ({} times the threshold or more), after an alert on \
                 the same rule within the cooldown",
                1u64 << escalation
            )
        };
        out.push(Finding {
            rule,
            mode: self.settings.rule(rule).mode,
            key: ev.key.clone(),
            caller: ev.caller.clone(),
            client_addr: ev.client_addr.clone(),
            evidence,
            summary,
            addresses: Vec::new(),
            at_ms: ev.at,
            unrecorded: None,
            read_back: false,
            under_own_mark: false,
            refs: Vec::new(),
            escalation,
        });
        true
    }

    /// Ends `rule`'s cooldown for `key`, or, for an escalation, takes the cooldown back to
    /// where it was before it: its finding was not acted on (`watch::run` had no room for
    /// it), so the next record that matches must raise it again.
    pub fn forget_cooldown(&mut self, rule: Rule, key: &str, escalation: u32) {
        let key = (rule, key.to_owned());
        match self.quiet_until.get_mut(&key) {
            // Only the latest escalation is undone (an older one was superseded already).
            Some(q) if escalation > 0 => {
                if q.level == escalation
                    && let Some((level, until)) = q.before.take()
                {
                    (q.level, q.until) = (level, until);
                }
            }
            // A first alert's: not if an escalation since still waits to be acted on (its
            // cooldown is that escalation's).
            Some(q) if q.before.is_some() => {}
            _ => {
                self.quiet_until.remove(&key);
            }
        }
    }

    /// An alert raised before this run, read back at start from the audit log or the breach
    /// log (`replay`, `replay::recall`): `rule` is quiet for `key` for the cooldown from
    /// `at_ms` (when it was detected), as it was for the run that raised it. How far past its
    /// threshold the alert went is not in either log: where the replay did not make the
    /// finding again itself (its records were past what was read back), an escalation's bar
    /// within that cooldown starts at the first doubling (twice the threshold), never above
    /// the bar the run before had.
    pub fn raised_before(&mut self, rule: Rule, key: &str, at_ms: i64) {
        let cooldown = i64::try_from(self.settings.cooldown.as_millis()).unwrap_or(i64::MAX);
        let until = at_ms.saturating_add(cooldown);
        let fresh = Quiet {
            until,
            level: 0,
            before: None,
        };
        let quiet = (self.quiet_until)
            .entry((rule, key.to_owned()))
            .or_insert(fresh);
        // A cooldown over before this alert (not swept yet) says nothing of its size.
        if quiet.until <= at_ms {
            *quiet = fresh;
        }
        quiet.until = quiet.until.max(until);
    }

    /// Whether `rule` is in its cooldown for the event's principal (`raise` would refuse).
    fn quiet(&self, rule: Rule, ev: &Event) -> bool {
        (self.quiet_until.get(&(rule, ev.key.clone()))).is_some_and(|q| ev.at < q.until)
    }

    fn outside_hours(&self, at: i64) -> bool {
        let (start, end) = self.settings.rule(Rule::UnusualHours).hours;
        let m = local_minute(at, self.settings.zone);
        let inside = if start < end {
            start <= m && m < end
        } else {
            m >= start || m < end
        };
        !inside
    }

    fn sweep(&mut self, now: i64) {
        let longest = self.settings.rules.values().map(millis).max().unwrap_or(0);
        let horizon = now - longest;
        // Each window by its own rule's span: a minute's refusals per address are gone a
        // minute later, however long the longest rule looks back (addresses are the
        // attacker's to choose).
        let settings = &self.settings;
        self.windows.retain(|(rule, _), w| {
            w.evict(now - millis(settings.rule(*rule)));
            !w.items.is_empty()
        });
        self.quiet_until.retain(|_, q| q.until > now);
        self.addresses.retain(|_, seen| seen.last_at >= horizon);
        let reads_from = now - millis(self.settings.rule(Rule::Enumeration));
        self.reads
            .retain(|_, r| r.by_time.last().is_some_and(|(t, _)| *t >= reads_from));
        // An export whose closing record never came (a crash) is forgotten once idle as long.
        self.exports.retain(|_, e| e.last_at >= horizon);
    }
}

/// What the rules need from one record.
struct Event {
    seq: u64,
    at: i64,
    key: String,
    caller: Option<Caller>,
    /// The client, as the rules count clients (`counted_as`).
    addr: Option<String>,
    /// The client's own address, which a finding names.
    client_addr: Option<String>,
}

/// A client address as the rules count clients: a global IPv6 unicast or unique local
/// address by its /64, the prefix one host or one home is given (privacy addresses rotate
/// within it by themselves, and a client choosing a new one for each request would otherwise
/// spread its refusals over as many `denied_burst` windows, and look like many places to
/// `many_addresses`); anything else as it is written: an IPv4 address, and IPv6 addresses whose
/// /64 is not one client's (link-local, loopback, NAT64's `64:ff9b::/96`, which embeds IPv4
/// clients, and Teredo's `2001::/32`, whose relay's prefix many share).
fn counted_as(addr: &str) -> String {
    let Ok(std::net::IpAddr::V6(v6)) = addr.parse::<std::net::IpAddr>() else {
        return addr.to_owned();
    };
    let [first, second, ..] = v6.segments();
    let global = first & 0xe000 == 0x2000;
    let unique_local = first & 0xfe00 == 0xfc00;
    let teredo = first == 0x2001 && second == 0x0000;
    if !(global || unique_local) || teredo {
        return addr.to_owned();
    }
    let prefix = u128::from(v6) & !u128::from(u64::MAX);
    format!("{}/64", std::net::Ipv6Addr::from(prefix))
}

impl Observation {
    /// Whom the rules count this access against: the principal's subject, or `addr:IP` (an
    /// IPv6 address as its /64) when the caller is not known.
    pub fn principal_key(&self) -> String {
        key_of(
            &self.caller,
            self.client_addr.as_deref().map(counted_as).as_deref(),
        )
    }
}

/// Whom the rules count an unauthenticated client's accesses against (`addr:IP`, an IPv6
/// address as its /64): what an alert about one is keyed on.
pub fn address_key(client_addr: &str) -> String {
    key_of(&None, Some(&counted_as(client_addr)))
}

/// Whether `subject` is a name the rules give accesses by no known caller (`addr:IP`,
/// `unknown`): a token naming one would share that key's windows, cooldowns and alert marks
/// (its refusals silencing alerts on the address's, and the reverse), so `auth` refuses it.
pub fn names_no_caller(subject: &str) -> bool {
    subject == "unknown" || subject.starts_with("addr:")
}

fn key_of(caller: &Option<Caller>, counted_as: Option<&str>) -> String {
    match (caller, counted_as) {
        (Some(c), _) => c.subject.clone(),
        (None, Some(a)) => format!("addr:{a}"),
        (None, None) => "unknown".to_owned(),
    }
}

impl Event {
    fn of(seq: u64, rec: &Observation, at: i64) -> Event {
        let addr = rec.client_addr.as_deref().map(counted_as);
        let key = key_of(&rec.caller, addr.as_deref());
        Event {
            seq,
            at,
            key,
            caller: rec.caller.clone(),
            addr,
            client_addr: rec.client_addr.clone(),
        }
    }

    fn role(&self) -> Option<&str> {
        self.caller.as_ref().map(|c| c.role.as_str())
    }
}

fn millis(s: &RuleSettings) -> i64 {
    i64::try_from(s.window.as_millis()).unwrap_or(i64::MAX)
}

/// The numeric end of a path's last segment: `/voter/electors/VF-0000012` is 12 (its last 18
/// digits at most, so that any id fits a `u64`).
fn trailing_number(path: &str) -> Option<u64> {
    let path = path.trim_end_matches('/');
    let digits = path.len() - path.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    path.get(path.len() - digits.min(18)..)?.parse().ok()
}

/// Unix milliseconds of a log timestamp (`2025-01-31T09:15:02.123Z`).
pub fn ts_millis(ts: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

pub fn now_millis() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}

/// Minutes after local midnight at `at_ms`.
pub fn local_minute(at_ms: i64, zone: Zone) -> u32 {
    let Ok(utc) = time::OffsetDateTime::from_unix_timestamp(at_ms.div_euclid(1000)) else {
        return 0;
    };
    let offset = match zone {
        Zone::Utc => 0,
        Zone::EuropeLondon if crate::uk_time::british_summer_time(utc) => 60,
        Zone::EuropeLondon => 0,
    };
    (u32::from(utc.hour()) * 60 + u32::from(utc.minute()) + offset) % (24 * 60)
}

#[cfg(test)]
#[path = "rules_tests.rs"]
pub(crate) mod tests;
