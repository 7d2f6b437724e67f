//! Streamed exports: a whole constituency (or more) through the filter, in bounded memory.
//!
//! `GET /{dataset}/{collection}/export` asks the datastore for NDJSON and answers NDJSON. Each
//! upstream line is one record; it is filtered as it arrives (geography, flags, markers,
//! fields) and appended to the current chunk. A chunk (about [`CHUNK_BYTES`]) is released
//! only after an audit record listing exactly its subjects and fields is durable: no audit,
//! no data, chunk by chunk. That record is queued as soon as the chunk is full, and the next
//! chunk is filtered while the log writes and syncs it (the sync would otherwise leave the
//! core idle between chunks). The request's own record (written before the headers) says the
//! export started; the last one says how it ended. Memory is a chunk being filled, one
//! waiting for its record to be durable, one waiting for the client (and the one its
//! connection holds), and one partial line, whatever the size of the export.
//!
//! Before each chunk's record is written, before the chunk is queued, and again as the
//! client's connection takes it (`Recheck`: a client that stops reading leaves a queued chunk
//! waiting for as long as it likes), the caller must still stand (`gateway::standing`): a
//! revocation (containment's included), the token or its grant ending, or the shared-state
//! mirror going stale stops the export at the next chunk.
//! A chunk whose record was already written when that is seen does not go; the closing
//! record (a `deny` with the token's reason) counts the chunks that went, always the first ones, and
//! the chunk records written, so the log never says less than was disclosed. So does a flag
//! placed on one of a chunk's subjects after the chunk was filtered (a client that stops
//! reading holds a filtered chunk for as long as it likes): the rights register is read again
//! as the chunk goes, and a new flag on any of its subjects ends the export
//! (`rights_register_changed`). So does a policy pack put in force since the export began
//! whose policies or schema differ (`policy_reloaded`): the new pack may forbid what it
//! carries.
//!
//! Once the headers have gone a failure cannot become a problem document, so it ends the
//! stream abruptly (the chunked encoding is not terminated, which every HTTP client reports
//! as an error) after an audit record of why: a line that is not a record, the upstream
//! failing, the audit log failing, the caller no longer standing, or the caller's quota
//! running out. Nothing after the failure is disclosed. The quota runs out exactly: no more
//! lines are filtered at once than the caller may still be disclosed records, so the last
//! chunk is cut at their allowance rather than leaving whole past it.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};

use crate::audit::{Ack, AuditRecord, Decision};
use crate::auth::Principal;
use crate::decisions::Decider;
use crate::error::GatewayError;
use crate::filter::{self, Disclosure, FilterContext, RegisterFlags, Subjects};
use crate::gateway::{DataBody, Gateway};
use crate::policy::Ask;

/// Release (and audit) the filtered output in chunks of about this size.
pub const CHUNK_BYTES: usize = 1 << 20;
/// A longer upstream line is not a record.
pub(crate) const MAX_LINE: usize = 1 << 20;
/// Whole lines are filtered once at least this much has arrived (or at the end), not frame
/// by frame: each call of the filter starts its field list afresh, so the first record of
/// each call has its keys scanned and its layout found again, and upstream frames can be
/// as small as a few records.
const FILTER_BATCH: usize = 256 << 10;

/// Where the first `lines` lines of `text` end (just past the newline of the last), or its
/// end if it has no more than that.
fn lines_end(text: &[u8], lines: u64) -> usize {
    match usize::try_from(lines) {
        Ok(0) => 0,
        // A line is a byte at least: no more lines than that.
        Ok(n) if n < text.len() => memchr::memchr_iter(b'\n', text)
            .nth(n - 1)
            .map_or(text.len(), |at| at + 1),
        _ => text.len(),
    }
}

/// An upstream NDJSON body in batches of whole lines, for the filter: once `FILTER_BATCH`
/// has gathered, its whole lines in one go; at the end, the rest. What is kept between
/// batches is at most one partial line, which `MAX_LINE` bounds. Exports and aggregates
/// read their upstream with it.
pub struct Lines<B> {
    body: B,
    /// How long the body may send nothing before it counts as failed (`idle`).
    idle: Option<std::time::Duration>,
    /// Gathered and not yet handed out, after the `taken` bytes of the last batch.
    partial: Vec<u8>,
    /// The last batch and its newline, dropped at the next call.
    taken: usize,
    done: bool,
}

/// Why an upstream body stopped short of its end.
#[derive(Debug, thiserror::Error)]
pub enum LinesError {
    #[error("upstream failed mid-stream: {0}")]
    Upstream(BoxError),
    #[error("an upstream line is longer than any record")]
    TooLong,
    #[error("the upstream sent nothing for {0:?}")]
    Idle(std::time::Duration),
}

impl<B> Lines<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(body: B) -> Self {
        Lines {
            body,
            idle: None,
            partial: Vec::new(),
            taken: 0,
            done: false,
        }
    }

    /// The same, failing once the body sends nothing for `idle`: a datastore stalled mid-body
    /// (a lock, a dead peer the kernel has not noticed) would otherwise hold the export or the
    /// aggregate, and its closing record, for ever.
    pub fn idle(mut self, idle: std::time::Duration) -> Self {
        self.idle = Some(idle);
        self
    }

    /// The next batch of whole lines (without the last newline; at the end, whatever was
    /// left, which may be empty), or `None` once the body has been handed out.
    pub async fn next(&mut self) -> Result<Option<&[u8]>, LinesError> {
        self.partial.drain(..self.taken);
        self.taken = 0;
        loop {
            if self.done {
                return Ok(None);
            }
            if self.partial.len() > MAX_LINE {
                return Err(LinesError::TooLong);
            }
            let frame = match self.idle {
                Some(idle) => tokio::time::timeout(idle, self.body.frame())
                    .await
                    .map_err(|_| LinesError::Idle(idle))?,
                None => self.body.frame().await,
            };
            self.done = frame.is_none();
            if let Some(frame) = frame
                && let Some(data) = frame
                    .map_err(|e| LinesError::Upstream(e.into()))?
                    .data_ref()
            {
                self.partial.extend_from_slice(data);
            }
            if let Some(end) = ready(&self.partial, self.done) {
                self.taken = (end + 1).min(self.partial.len());
                return Ok(Some(&self.partial[..end]));
            }
        }
    }
}

/// How much of `partial` to hand out now: once a batch has gathered, its whole lines; at the
/// end (`done`), all of it; otherwise nothing yet. Public for the export benchmark, which
/// batches frames without a network.
pub fn ready(partial: &[u8], done: bool) -> Option<usize> {
    if done {
        Some(partial.len())
    } else if partial.len() >= FILTER_BATCH {
        memchr::memrchr(b'\n', partial)
    } else {
        None
    }
}

/// Everything the export needs once the request has been authorized and the upstream has
/// answered 200.
pub struct Plan {
    pub body: Lines<hyper::body::Incoming>,
    pub principal: Arc<Principal>,
    pub ask: Ask,
    pub asker: crate::decisions::Asker,
    pub dataset: String,
    /// The categories of the fields the caller filtered on (`Route::filtered_categories`).
    pub filtered_on: Vec<String>,
    /// The policy pack the request began under, kept to the export's end.
    pub policies: Arc<crate::decisions::InForce>,
    /// The caller's slot for a bulk read, held to the export's end (`bulk`).
    pub bulk_read: Option<crate::bulk::BulkRead>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the export task hands the response body: a chunk, or the error that cuts it.
enum Item {
    Chunk(Handoff),
    Cut(BoxError),
}

/// A chunk whose record is durable, for the body to send once its client takes it, if the
/// check made then (`Recheck`) passes: it tells the task which (`taken`). A chunk may wait
/// for a slow client far longer than the caller stands or its subjects stay unflagged, and
/// what is checked when it is queued says nothing of when it goes.
struct Handoff {
    chunk: Bytes,
    recheck: Recheck,
    taken: oneshot::Sender<Result<(), String>>,
}

/// The checks a chunk passes again as it goes: the caller standing under the export's
/// policy pack, and none of its subjects flagged since they were filtered.
struct Recheck {
    gw: Arc<Gateway>,
    principal: Arc<Principal>,
    policies: Arc<crate::decisions::InForce>,
    subjects: Subjects,
    filtered_with: Vec<(usize, RegisterFlags)>,
}

impl Recheck {
    fn holds(&self) -> Result<(), String> {
        standing_under(&self.gw, &self.principal, &self.policies)?;
        let now = (self.gw.controls.register_flags()).map_err(|e| e.code().to_owned())?;
        if newly_flagged(&self.filtered_with, &now, &self.subjects) {
            return Err("rights_register_changed".to_owned());
        }
        Ok(())
    }
}

/// Whether the caller may still be answered (`gateway::standing`) under `policies`, the pack
/// the export began with: a revocation, the token's end, a stale mirror or a policy pack
/// reloaded since (which may forbid what the export carries) stops it.
fn standing_under(
    gw: &Gateway,
    principal: &Principal,
    policies: &Arc<crate::decisions::InForce>,
) -> Result<(), String> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    crate::gateway::standing(gw, principal, now).map_err(|e| e.code().to_owned())?;
    if !policies.decides_as(&gw.policies()) {
        return Err(GatewayError::PolicyReloaded.code().to_owned());
    }
    Ok(())
}

/// Starts the export; the returned body carries each chunk once it is audited. `template` is
/// the request's audit record, which chunk records copy.
pub fn start(gw: Arc<Gateway>, plan: Plan, template: AuditRecord) -> DataBody {
    // One at a time: the task waits for each chunk to be taken (`Handoff`).
    let (tx, rx) = mpsc::channel::<Item>(1);
    // Shutdown waits for the export's last records (`AuditLog::settle`).
    let appending = gw.audit.appender();
    // Set once the export has ended whole, its closing record written: a body that ends
    // without it is cut, whether or not the error saying why reached the channel.
    let whole = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended_whole = Arc::clone(&whole);
    tokio::spawn(async move {
        let _appending = appending;
        let mut run = Run {
            gw: &gw,
            principal: Arc::clone(&plan.principal),
            template,
            tx: &tx,
            queued: 0,
            waiting: None,
            chunks: 0,
            records: 0,
            filtered_with: Vec::new(),
            policies: Arc::clone(&plan.policies),
            chunk_hold: crate::controls::QuotaHold::default(),
            unsent: Vec::new(),
        };
        let principal = Arc::clone(&plan.principal);
        // The caller's slot is held to the export's very end, its last chunk handed on and
        // its closing record written, not only while the datastore is read.
        let mut plan = plan;
        let _bulk_read = plan.bulk_read.take();
        let outcome = run.stream(plan).await;
        // A chunk part filled when the stream ended never goes: what it held against the
        // quota is given back now, not once a stalled client has been waited for.
        drop(std::mem::take(&mut run.chunk_hold));
        // The chunk queued last still goes once its record is durable, whatever ended the
        // stream after it (it came before the failure, as it would have without the
        // overlap), unless the caller no longer stands.
        let handed_on = run.hand_on(&principal).await;
        let was_whole = run.finish(outcome.and(handed_on)).await;
        ended_whole.store(was_whole, std::sync::atomic::Ordering::Release);
    });
    let frames =
        futures_util::stream::unfold((rx, whole, false), |(mut rx, whole, cut)| async move {
            match rx.recv().await {
                Some(Item::Chunk(h)) => {
                    // Checked as it goes; and it goes only if the task still waits for it
                    // (one that gave up counts it as not sent).
                    let went = h.recheck.holds();
                    let told = h.taken.send(went.clone()).is_ok();
                    let frame = match went {
                        Ok(()) if told => Ok(Frame::data(h.chunk)),
                        Ok(()) => Err("the export was cut short".into()),
                        Err(why) => Err(why.into()),
                    };
                    Some((frame, (rx, whole, cut)))
                }
                Some(Item::Cut(e)) => Some((Err(e), (rx, whole, cut))),
                None if !cut && !whole.load(std::sync::atomic::Ordering::Acquire) => {
                    let e: BoxError = "the export was cut short".into();
                    Some((Err(e), (rx, whole, true)))
                }
                None => None,
            }
        });
    StreamBody::new(frames).boxed_unsync()
}

struct Run<'a> {
    gw: &'a Arc<Gateway>,
    /// The caller, for the checks each chunk passes again as it goes (`Recheck`).
    principal: Arc<Principal>,
    template: AuditRecord,
    tx: &'a mpsc::Sender<Item>,
    /// Chunk records queued so far (each chunk's record carries its number).
    queued: u64,
    /// The chunk released last, waiting for its record to be durable before it goes.
    waiting: Option<Waiting>,
    /// Chunks (and their records) whose audit records are durable and that have gone.
    chunks: u64,
    records: u64,
    /// The rights registers the chunk being filled was filtered against: each batch's, from
    /// the index of the first subject it disclosed.
    filtered_with: Vec<(usize, RegisterFlags)>,
    /// The policy pack the export began under: one put in force since stops it.
    policies: Arc<crate::decisions::InForce>,
    /// What the quota holds for the chunk being filled: its records, until it is counted.
    chunk_hold: crate::controls::QuotaHold,
    /// Chunks recorded and never handed on (the caller stopped standing, or went, between
    /// the record and the chunk): their numbers and subjects, which the closing record names
    /// so that a subject access report leaves their records out (`sar`).
    unsent: Vec<(u64, Subjects)>,
}

struct Waiting {
    ack: Ack,
    /// Its record's `export_chunk`.
    number: u64,
    chunk: Bytes,
    records: u64,
    /// Its subjects, and the registers they were judged against (`Run::filtered_with`).
    subjects: Subjects,
    filtered_with: Vec<(usize, RegisterFlags)>,
}

/// Whether any of `subjects` carries a flag in `now` that it did not carry in the register it
/// was judged against (`then`: each register from the index of the first subject it judged):
/// a restriction, objection or erasure request placed after they were judged. (A flag lifted
/// meanwhile discloses nothing more.)
fn newly_flagged(
    then: &[(usize, RegisterFlags)],
    now: &RegisterFlags,
    subjects: &Subjects,
) -> bool {
    let mut judged = then.iter().peekable();
    let mut register = &RegisterFlags::EMPTY;
    subjects.iter().enumerate().any(|(i, s)| {
        while let Some((_, r)) = judged.next_if(|(from, _)| *from <= i) {
            register = r;
        }
        now.gained_since(register, s)
    })
}

impl Run<'_> {
    async fn stream(&mut self, plan: Plan) -> Result<(), String> {
        let gw = self.gw;
        let dataset = gw
            .catalog
            .datasets
            .get(&plan.dataset)
            .ok_or("unknown dataset")?;
        let categories = gw.categories.get(&plan.dataset).ok_or("unknown dataset")?;
        let decider = Decider::new(
            &plan.policies.engine,
            &plan.policies.decisions,
            &plan.ask,
            plan.asker.clone(),
            &plan.dataset,
            categories,
        );
        let mut lines = plan.body;
        let mut out = Vec::with_capacity(CHUNK_BYTES + MAX_LINE);
        let mut d = Disclosure::default();
        let mut memo = filter::Memo::default();
        while let Some(batch) = lines.next().await.map_err(|e| match e {
            LinesError::Upstream(e) => format!("upstream failed mid-export: {e}"),
            LinesError::TooLong | LinesError::Idle(_) => e.to_string(),
        })? {
            // A client that has gone, or a caller who no longer stands, ends the export at the
            // datastore's next batch, not at the next chunk: an export whose records are
            // nearly all withheld may fill none for the rest of a national register, holding
            // the caller's slot and the datastore's stream meanwhile.
            if self.tx.is_closed() {
                return Err("client_went_away".to_owned());
            }
            self.still_standing(&plan.principal)?;
            // The rights register as it stands for this batch's records.
            let register = gw
                .controls
                .register_flags()
                .map_err(|e| e.code().to_owned())?;
            let cx = FilterContext {
                dataset,
                // Read for each batch: an export running past midnight judges TPS checks and
                // ages by the day its records are read on.
                today: filter::today(),
                register: &register,
                filtered_on: &plan.filtered_on,
                // Lines, not a page; and no look-up purpose exports or counts (their rules ask
                // for a listing or a read), so no record must meet a postcode filter.
                paging: None,
                must_match: None,
            };
            let mut rest: &[u8] = batch;
            // The lines left in `rest` (at most: the last may have no newline), counted once
            // a batch under a quota.
            let mut lines_left: Option<u64> = None;
            while !rest.is_empty() {
                // Kept once per state of the register, not per batch: an export that
                // withholds nearly everything fills a chunk slowly. (Again after a chunk
                // released mid-batch, which takes them.)
                // A register no subject was judged against since its entry is replaced, not
                // kept beside the next: a register that changes with every batch of an
                // export disclosing little would otherwise keep a copy per batch.
                let from = d.subjects.len();
                match self.filtered_with.last_mut() {
                    Some((_, r)) if r.same_as(&register) => {}
                    Some((at, r)) if *at == from => *r = register.clone(),
                    _ => self.filtered_with.push((from, register.clone())),
                }
                // Under a quota, no more lines at once than the caller may still be disclosed
                // records (a line is one record at most), held against it meanwhile so that
                // their other requests see them: the chunk that reaches the allowance is
                // released, and the export ends there, rather than a whole chunk past it.
                let mut hold = None;
                let take = if gw.controls.quota_limited(&plan.principal) {
                    let lines = *lines_left
                        .get_or_insert_with(|| memchr::memchr_iter(b'\n', rest).count() as u64 + 1);
                    let held = (gw.controls.reserve_quota_up_to(&plan.principal, lines))
                        .map_err(|e| e.code().to_owned())?
                        .unwrap_or_default();
                    if held.records() == 0 {
                        let spent = d.subjects.is_empty();
                        self.release(&plan.principal, &mut out, &mut d).await?;
                        memo.new_chunk();
                        if spent {
                            return Err(GatewayError::QuotaExceeded.code().into());
                        }
                        continue;
                    }
                    let take = lines_end(rest, held.records());
                    lines_left = Some(lines.saturating_sub(held.records()));
                    hold = Some(held);
                    take
                } else {
                    rest.len()
                };
                let (now, later) = rest.split_at(take);
                rest = later;
                let before = d.subjects.len();
                filter::filter_lines(
                    now,
                    &cx,
                    &mut |a| decider.decide(a),
                    &mut memo,
                    &mut out,
                    &mut d,
                )
                .map_err(|e| e.to_string())?;
                // Held on for the records that will leave, until their chunk is counted.
                if let Some(mut held) = hold {
                    held.keep_only((d.subjects.len() - before) as u64);
                    self.chunk_hold.absorb(held);
                }
                if out.len() >= CHUNK_BYTES {
                    self.release(&plan.principal, &mut out, &mut d).await?;
                    // Each chunk's record names the fields and policies its own records used.
                    memo.new_chunk();
                }
            }
        }
        self.release(&plan.principal, &mut out, &mut d).await
    }

    /// Queues the audit record of the chunk's subjects and leaves the chunk waiting for it to
    /// be durable, once the chunk before (whose record was queued earlier) has gone.
    async fn release(
        &mut self,
        principal: &Principal,
        out: &mut Vec<u8>,
        d: &mut Disclosure,
    ) -> Result<(), String> {
        if out.is_empty() && d.rows_withheld == 0 {
            return Ok(());
        }
        // A client that has gone takes nothing more: no further chunk is recorded for it.
        if self.tx.is_closed() {
            return Err("client_went_away".to_owned());
        }
        self.still_standing(principal)?;
        // Checked again (the controls still fresh, the totals of other replicas fetched if
        // need be), keeping the chunk's own hold until it is counted: held while it filled,
        // its records were within the allowance beside this replica's other holds, and must
        // still fit beside what has been counted since (`Quotas::check`'s `own`). (A role
        // without limits holds nothing.)
        let hold = std::mem::take(&mut self.chunk_hold);
        let extra = (d.subjects.len() as u64).saturating_sub(hold.records());
        let more = self
            .gw
            .controls
            .check_quota_beside(principal, extra, &hold)
            .await
            .map_err(|e| e.code().to_owned())?;
        let hold = (hold, more);
        let disclosed = std::mem::take(d);
        let dataset = self.template.dataset.as_deref().unwrap_or("none");
        crate::gateway::never_disclosed_sent(dataset, disclosed.never_disclosed_rows);
        // Counted as a page's are (`gateway::Trail::absorb`): a datastore sending records the
        // filter cannot read during an export raises the same alarm.
        metrics::counter!("wardgate_rows_withheld_total", "dataset" => dataset.to_owned())
            .increment(disclosed.rows_withheld);
        crate::gateway::count_unread(disclosed.unclassified_fields, disclosed.malformed_rows);
        let n = disclosed.subjects.len() as u64;
        let subjects = disclosed.subjects.clone();
        let filtered_with = std::mem::take(&mut self.filtered_with);
        let mut record = self.template.clone();
        record.ts = AuditRecord::now_ts();
        record.fields_by_subject = disclosed.fields_by_subject();
        record.subjects = disclosed.subjects;
        record.fields = disclosed.fields.into_iter().collect();
        record.rows_withheld = disclosed.rows_withheld;
        let mut ids = disclosed.policy_ids;
        ids.extend(self.template.policy_ids.iter().cloned());
        record.policy_ids = ids.into_iter().collect();
        record.detail = Some(serde_json::json!({ "export_chunk": self.queued + 1 }));
        // Room in the log's queue first, bounded as the wait for the record is (a stalled
        // disk fills the queue): the chunk's record is then queued without another wait.
        let room = crate::audit::within(self.gw.audit.reserve())
            .await
            .map_err(|_| "audit_unavailable".to_owned())?;
        let ack = room.submit(record);
        // Counted once queued: the closing record's `chunks_recorded` names none not written.
        self.queued += 1;
        // Counted as queued, so that the next chunk's quota check sees these records (and
        // no longer as held: the hold is given back as they are counted).
        self.gw.controls.count(principal, n);
        drop(hold);
        let chunk = Bytes::from(std::mem::replace(
            out,
            Vec::with_capacity(CHUNK_BYTES + MAX_LINE),
        ));
        if let Err(why) = self.hand_on(principal).await {
            self.unsent.push((self.queued, subjects));
            return Err(why);
        }
        self.waiting = Some(Waiting {
            ack,
            number: self.queued,
            chunk,
            records: n,
            subjects,
            filtered_with,
        });
        Ok(())
    }

    /// Whether the caller may still be answered under the pack the export began with
    /// (`standing_under`): asked before each chunk's record is written, before it is queued,
    /// and as it goes (`Recheck`), so that a change stops the export at the next chunk.
    fn still_standing(&self, principal: &Principal) -> Result<(), String> {
        standing_under(self.gw, principal, &self.policies)
    }

    /// Hands the waiting chunk on to the client once its audit record is durable, if the
    /// caller still stands; if that record could not be written, the chunk never goes.
    async fn hand_on(&mut self, principal: &Principal) -> Result<(), String> {
        let Some(w) = self.waiting.take() else {
            return Ok(());
        };
        let (number, subjects) = (w.number, w.subjects.clone());
        let handed = self.hand_on_waiting(principal, w).await;
        if handed.is_err() {
            self.unsent.push((number, subjects));
        }
        handed
    }

    async fn hand_on_waiting(&mut self, principal: &Principal, w: Waiting) -> Result<(), String> {
        // A log whose disk hangs cuts the export, as it answers a request 503 (`gateway`),
        // rather than holding the client, its slot and the datastore's stream meanwhile.
        crate::audit::within(w.ack.durable())
            .await
            .map_err(|_| "audit_unavailable".to_owned())?;
        // A place on the connection first, then the check: waiting for a slow client must not
        // come between the caller standing and the chunk going. A client that takes nothing
        // for `server.client_stall_timeout` (one that stopped reading, or an HTTP/2 window
        // kept shut) is cut off: it would otherwise hold the datastore's export, its
        // connection and the chunks waiting for as long as it liked.
        let slot = if w.chunk.is_empty() {
            None
        } else {
            let slot = tokio::time::timeout(self.gw.client_stall_timeout, self.tx.reserve())
                .await
                .map_err(|_| "client_stalled".to_owned())?;
            Some(slot.map_err(|_| "client_went_away".to_owned())?)
        };
        self.still_standing(principal)?;
        let now = (self.gw.controls.register_flags()).map_err(|e| e.code().to_owned())?;
        if newly_flagged(&w.filtered_with, &now, &w.subjects) {
            return Err("rights_register_changed".to_owned());
        }
        if let Some(slot) = slot {
            // Gone only once the client has taken it and it passed the checks again then:
            // a client that takes nothing for `client_stall_timeout` is cut off as above.
            let (taken, mut went) = oneshot::channel();
            slot.send(Item::Chunk(Handoff {
                chunk: w.chunk,
                recheck: Recheck {
                    gw: Arc::clone(self.gw),
                    principal: Arc::clone(&self.principal),
                    policies: Arc::clone(&self.policies),
                    subjects: w.subjects,
                    filtered_with: w.filtered_with,
                },
                taken,
            }));
            let answer = match tokio::time::timeout(self.gw.client_stall_timeout, &mut went).await {
                Ok(answer) => answer.map_err(|_| "client_went_away".to_owned())?,
                // Closed first, so that the body, taking it now, sends nothing (it is told
                // nobody waits); one it took just before is read.
                Err(_) => {
                    went.close();
                    went.try_recv().map_err(|_| "client_stalled".to_owned())?
                }
            };
            answer?;
        }
        self.chunks += 1;
        self.records += w.records;
        Ok(())
    }

    /// The export's last audit record; on failure, the stream is cut after it. Whether the
    /// export ended whole (its last chunk gone and its closing record written).
    async fn finish(self, outcome: Result<(), String>) -> bool {
        let mut record = self.template.clone();
        record.ts = AuditRecord::now_ts();
        // `chunks_recorded`: chunk records written, which may exceed the chunks that went
        // when the caller stopped standing (`chunks`, always the first ones).
        let summary = serde_json::json!({
            "chunks": self.chunks,
            "records": self.records,
            "chunks_recorded": self.queued,
        });
        match &outcome {
            Ok(()) => record.detail = Some(serde_json::json!({ "export_complete": summary })),
            Err(why) => {
                // A caller who no longer stands is refused as a request would be, with the
                // same reason (breach detection's `ended_grant` reads it); anything else,
                // a stale mirror included, is an error.
                (record.decision, record.reason) = match why.as_str() {
                    "token_revoked" | "token_expired" => (Decision::Deny, Some(why.clone())),
                    "controls_stale" => (Decision::Error, Some(why.clone())),
                    _ => (Decision::Error, Some("export_aborted".to_owned())),
                };
                let mut detail = serde_json::json!({ "export_aborted": why, "before": summary });
                // Recorded as disclosed and never sent: named here, so that a subject access
                // search finds this record beside theirs, and leaves them out (`sar`).
                if !self.unsent.is_empty() {
                    let numbers: Vec<u64> = self.unsent.iter().map(|(n, _)| *n).collect();
                    detail["chunks_not_sent"] = numbers.into();
                    let mut named = Subjects::default();
                    for id in self.unsent.iter().flat_map(|(_, s)| s.iter()) {
                        named.push(id);
                    }
                    record.subjects = named;
                    record.fields_by_subject = None;
                }
                record.detail = Some(detail);
                metrics::counter!("wardgate_exports_aborted_total").increment(1);
                tracing::warn!(request_id = %record.request_id, why, "export aborted");
            }
        }
        // Bounded (a stalled disk): a closing record that found no room in time is queued
        // apart, to be written once there is (it alone names the chunks recorded and never
        // sent), and the export is cut meanwhile.
        let closed = match crate::audit::within(self.gw.audit.reserve()).await {
            Ok(room) => crate::audit::within(room.submit(record).durable()).await,
            Err(e) => {
                self.gw.audit.queue_detached(record);
                Err(e)
            }
        };
        if let Err(e) = &closed {
            tracing::error!(error = %e, "export's closing audit record not written");
        }
        // A caller must not read an export as whole when the log cannot say how it ended: it
        // is cut, as on any other failure (every chunk that went had its own record).
        let cut = match (outcome, closed) {
            (Err(why), _) => Some(why),
            (Ok(()), Err(_)) => Some("audit_unavailable".to_owned()),
            (Ok(()), Ok(_)) => None,
        };
        // Not waited for long: a client that takes nothing would hold the task (and
        // shutdown's wait for its records) for as long as its connection lived. Without it
        // the body still ends in an error (`start`), only without saying why.
        let whole = cut.is_none();
        if let Some(why) = cut {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                self.tx.send(Item::Cut(why.into())),
            )
            .await;
        }
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_cuts_after_the_nth_line_or_takes_all() {
        let text = b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}";
        assert_eq!(lines_end(text, 0), 0);
        assert_eq!(&text[..lines_end(text, 1)], b"{\"a\":1}\n");
        assert_eq!(&text[..lines_end(text, 2)], b"{\"a\":1}\n{\"a\":2}\n");
        // The last line has no newline: three lines or more take it all.
        for n in [3, 4, 1_000, u64::MAX] {
            assert_eq!(lines_end(text, n), text.len());
        }
        assert_eq!(lines_end(b"", 5), 0);
    }

    #[test]
    fn a_chunk_goes_only_if_none_of_its_subjects_was_flagged_since() {
        let register = |pairs: &[(&str, &[&str])]| -> RegisterFlags {
            (pairs.iter())
                .map(|(s, f)| (s.to_string(), f.iter().map(|f| f.to_string()).collect()))
                .collect()
        };
        let mut chunk = Subjects::default();
        chunk.push("VF-1");
        chunk.push("VF-2");
        let flagged = register(&[("VF-2", &["do_not_contact"])]);
        let then = [(0, flagged.clone())];
        // Nothing new, someone else flagged, a flag lifted: it goes.
        assert!(!newly_flagged(&then, &flagged, &chunk));
        let other = register(&[("VF-3", &["restricted"])]);
        assert!(!newly_flagged(&then, &other, &chunk));
        assert!(!newly_flagged(&then, &RegisterFlags::EMPTY, &chunk));
        // A new flag on one of its subjects, or another on one already flagged: it does not.
        let restricted = register(&[("VF-1", &["restricted"])]);
        assert!(newly_flagged(&then, &restricted, &chunk));
        let more = register(&[("VF-2", &["do_not_contact", "erasure_requested"])]);
        assert!(newly_flagged(&then, &more, &chunk));
        assert!(newly_flagged(
            &[(0, RegisterFlags::EMPTY)],
            &flagged,
            &chunk
        ));
        // Each subject against its own batch's register: VF-1 judged in a first batch before
        // its restriction, VF-2 in a second after it (it was judged restricted already).
        let both = register(&[("VF-1", &["restricted"]), ("VF-2", &["restricted"])]);
        let batches = [(0, RegisterFlags::EMPTY), (1, both.clone())];
        assert!(newly_flagged(&batches, &both, &chunk), "VF-1 is new");
        let later = [(0, restricted.clone()), (1, both.clone())];
        assert!(!newly_flagged(&later, &both, &chunk));
        // A batch that disclosed nobody leaves the next one's register to the next subject.
        let empty_batch = [
            (0, restricted),
            (1, RegisterFlags::EMPTY),
            (1, both.clone()),
        ];
        assert!(!newly_flagged(&empty_batch, &both, &chunk));
    }

    /// A body that hands out `frames` in turn.
    fn body(
        frames: Vec<Result<Bytes, BoxError>>,
    ) -> impl hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin {
        StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(|f| f.map(Frame::data)),
        ))
    }

    async fn batches(frames: Vec<Result<Bytes, BoxError>>) -> (Vec<Vec<u8>>, Option<LinesError>) {
        let mut lines = Lines::new(body(frames));
        let mut out = Vec::new();
        loop {
            match lines.next().await {
                Ok(Some(batch)) => out.push(batch.to_vec()),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn lines_come_in_batches_of_whole_lines_and_nothing_is_lost() {
        // 40,000 numbered lines of uneven length, in 1,000-byte frames that cut lines anywhere.
        let text: String = (0..40_000)
            .map(|i| format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 37)))
            .collect();
        let frames = text
            .as_bytes()
            .chunks(1000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let (got, err) = batches(frames).await;
        assert!(err.is_none(), "{err:?}");
        assert!(got.len() > 2, "{} batches", got.len());
        for batch in &got[..got.len() - 1] {
            // A whole batch, short of it by less than a line.
            assert!(batch.len() > FILTER_BATCH - 100, "{}", batch.len());
            assert!(batch.ends_with(b"}"), "a batch ends mid-line");
        }
        // Joined again with the newlines each batch ended at, they are the body (the last
        // batch is the rest, its final newline included).
        let joined = got.join(&b'\n');
        assert!(
            joined == text.as_bytes(),
            "{} bytes out of {}",
            joined.len(),
            text.len()
        );
    }

    #[tokio::test]
    async fn a_line_longer_than_any_record_stops_the_body() {
        // A line that never ends: reading stops once it is longer than any record.
        let endless = StreamBody::new(futures_util::stream::repeat_with(|| {
            Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; 65_536])))
        }));
        let mut lines = Lines::new(endless);
        let err = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next())
            .await
            .expect("reading stops");
        assert!(matches!(err, Err(LinesError::TooLong)), "{err:?}");
    }

    #[tokio::test]
    async fn an_upstream_failure_is_an_error_not_an_end() {
        let frames = vec![
            Ok(Bytes::from_static(b"{\"n\":1}\n{\"n\":")),
            Err("connection reset".into()),
        ];
        let (got, err) = batches(frames).await;
        assert!(got.is_empty());
        assert!(
            matches!(&err, Some(LinesError::Upstream(e)) if e.to_string() == "connection reset"),
            "{err:?}"
        );
    }

    /// A body that stalls after a line fails once it has sent nothing for the idle bound,
    /// rather than holding its reader for ever.
    #[tokio::test]
    async fn a_stalled_body_fails_after_the_idle_bound() {
        use futures_util::StreamExt;
        let stalled = StreamBody::new(
            futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from_static(
                b"{\"n\":1}\n",
            )))])
            .chain(futures_util::stream::pending()),
        );
        let idle = std::time::Duration::from_millis(200);
        let mut lines = Lines::new(stalled).idle(idle);
        let err = lines.next().await.map(|b| b.map(<[u8]>::to_vec));
        assert!(
            matches!(err, Err(LinesError::Idle(d)) if d == idle),
            "{err:?}"
        );
    }
}
