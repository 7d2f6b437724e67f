//! The data plane's pipeline, top to bottom: authenticate, route, purpose, authorize, forward,
//! filter, audit, answer.
//!
//! [`handle`] is the outer handler: it always answers, and it is the only place a response
//! leaves. It runs [`process`], which does the steps and records what it learns in a
//! [`Trail`]; then it writes the audit record built from that trail and waits until the record
//! is durable. Only then is the response released; if the record cannot be written the caller
//! gets 503 and none of the data (no audit, no data). Errors become problem documents through
//! `error.rs`, in one place.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::audit::{AuditLog, AuditRecord, Caller, Decision, RecordKind};
use crate::auth::{Principal, Verifier};
use crate::catalog::{Catalog, Dataset};
use crate::controls::Controls;
use crate::decisions::{Decider, InForce, asker_key};
use crate::dialect::{self, Narrowing};
use crate::error::GatewayError;
use crate::filter::{self, FilterContext};
use crate::geography::Geography;
use crate::proxy::{Upstream, Upstreams};
use crate::routes::{self, RouteKind};

/// Above this many polling districts the narrowing list would cost more than it saves.
const MAX_NARROWING_AREAS: usize = 500;

/// Everything the request path needs, built once at start and shared.
pub struct Gateway {
    pub catalog: Catalog,
    pub geography: Geography,
    pub verifier: Verifier,
    /// The policy pack in force and its decisions (`policies`), replaced by a reload.
    pub policies: std::sync::RwLock<Arc<InForce>>,
    /// Where the pack is read from, for a reload, and what the last refused reload read (a
    /// pack refused as it is is not read and recorded again at every signal).
    pub policy_source: crate::startup::PolicySource,
    pub policy_refused: std::sync::Mutex<Option<crate::startup::PackDigests>>,
    pub upstreams: Upstreams,
    /// The data plane's TLS certificate, for `SIGHUP` to renew (`None` without TLS).
    pub server_cert: Option<Arc<crate::server_cert::ServerCert>>,
    pub audit: AuditLog,
    /// Where the audit log lives, for subject access reports.
    pub audit_dir: std::path::PathBuf,
    /// Where the log's chain head is published, off the host (`[audit.witness]`).
    pub witness: Option<Arc<crate::audit::witness::Witness>>,
    /// (audit dir, retention, prune interval) when the log has a retention period.
    pub retention: Option<(std::path::PathBuf, std::time::Duration, std::time::Duration)>,
    /// (audit dir, client address retention, prune interval) when addresses are sealed.
    pub addr_retention: Option<(std::path::PathBuf, std::time::Duration, std::time::Duration)>,
    pub controls: Controls,
    /// Breach detection, the breach log and the live feed.
    pub watch: crate::watch::Watch,
    pub narrowings: dialect::Narrowings,
    /// Field categories per dataset: what field decisions are asked about.
    pub categories: std::collections::BTreeMap<String, BTreeSet<String>>,
    pub max_request_bytes: usize,
    /// `server.header_read_timeout`, for the listeners (`server::serve`).
    pub header_read_timeout: std::time::Duration,
    /// `server.client_stall_timeout`: how long an export waits for its client to take a chunk.
    pub client_stall_timeout: std::time::Duration,
    /// `server.max_connections`: how many connections each listener holds at once.
    pub max_connections: usize,
    /// `server.trusted_proxies`: whose `X-Forwarded-For` names the client.
    pub trusted_proxies: crate::client_addr::TrustedProxies,
    /// Small-cell suppression and the group limit for aggregates.
    pub aggregates: crate::aggregate::Settings,
    /// Exports and aggregates under way, per caller (`server.max_bulk_reads_per_caller`).
    pub bulk_reads: crate::bulk::BulkReads,
}

impl Gateway {
    /// The policy pack in force now, with its decisions: a request takes it once and keeps it.
    pub fn policies(&self) -> Arc<InForce> {
        let held = self.policies.read();
        Arc::clone(&held.unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Puts a reloaded pack in force: requests already under way finish under the one they
    /// began with.
    pub fn put_policies(&self, policies: InForce) {
        let mut held = (self.policies.write()).unwrap_or_else(std::sync::PoisonError::into_inner);
        *held = Arc::new(policies);
    }
}

/// What the pipeline learnt about a request, whether it succeeded or not: the audit record's source.
#[derive(Default)]
pub struct Trail {
    /// The caller's own `X-Request-Id`, if it sent a plain one (`request_ids`).
    client_request_id: Option<String>,
    caller: Option<Arc<Principal>>,
    purpose: Option<String>,
    lawful_basis: Option<String>,
    dataset: Option<String>,
    route: Option<String>,
    policy_ids: BTreeSet<String>,
    subjects: filter::Subjects,
    fields: BTreeSet<String>,
    /// Which fields each subject left with, where not all the same.
    fields_by_subject: Option<crate::audit::FieldsBySubject>,
    rows_withheld: u64,
    /// Why the one record asked for by id was withheld, for breach detection.
    withheld_target: Option<&'static str>,
    /// A subject access report's own read of its subject (`SubjectAccessFetch`).
    subject_access: bool,
    written: Vec<String>,
    /// A write was sent to its datastore: done, or as good as (the datastore finishes what
    /// it was sent whoever waits for the answer), so it counts against the caller's quota
    /// whatever becomes of the answer: an error (a 5xx, a timeout, a dropped connection) or
    /// the datastore's refusal, whose 502 against the 404 of a target that may not be
    /// written tells the caller what a read by id would (the record exists, in their scope).
    forwarded: bool,
    /// A write whose intent is recorded and which has not been sent: its target, which the
    /// answer's record then names (`"write": "not_sent"`), so that a subject access report
    /// does not list as sent a write stopped before its datastore (a restriction placed
    /// meanwhile, the caller revoked or gone).
    unsent: Option<String>,
    /// The policy pack an aggregate was counted under: one put in force since, deciding
    /// otherwise, holds the answer back once its record is durable (as it stops an export).
    counted_under: Option<std::sync::Arc<crate::decisions::InForce>>,
    /// The audit record's `detail`, where the route has one (an aggregate's summary).
    detail: Option<serde_json::Value>,
    /// Records held against the caller's quota until the request ends.
    quota: crate::controls::QuotaHold,
    /// The rights register a page, a read or a write was judged on: one placed on its subject
    /// while the audit record was made durable stops the answer (or the write) there.
    pub(crate) judged_on: Option<filter::RegisterFlags>,
}

/// A data-plane response body: buffered, or an export's stream of audited chunks.
pub type DataBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// What a successful request discloses.
enum Reply {
    Body(Bytes),
    Export(Box<crate::export::Plan>),
}

/// Whether an aggregate under way may go on: its caller still stands, and the policy pack
/// it began under still decides (a reload may forbid what it counts, as for an export).
fn aggregate_stands(
    gw: &Gateway,
    principal: &Principal,
    began_under: &std::sync::Arc<crate::decisions::InForce>,
) -> Result<(), GatewayError> {
    standing(
        gw,
        principal,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )?;
    match began_under.decides_as(&gw.policies()) {
        true => Ok(()),
        false => Err(GatewayError::PolicyReloaded),
    }
}

/// The outer handler: always answers, and never before the audit record is durable.
pub async fn handle<B>(
    gw: &std::sync::Arc<Gateway>,
    req: Request<B>,
    client: SocketAddr,
) -> Response<DataBody>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let coming = gw.audit.expect();
    let (mut request_id, client_request_id) = request_ids(req.headers());
    let fetch = req.extensions().get::<SubjectAccessFetch>();
    if let Some(f) = fetch {
        request_id.clone_from(&f.request_id);
    }
    let subject_access = fetch.is_some();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut unanswered = Unanswered {
        gw,
        request_id: &request_id,
        client,
        method: &method,
        path: &path,
        started,
        trail: Trail {
            client_request_id,
            subject_access,
            ..Trail::default()
        },
        armed: true,
    };
    let result = process(gw, req, &request_id, client, &mut unanswered.trail).await;
    // Room in the audit queue first: waiting for it (the queue full) is where a client that
    // hangs up cancels this handler, and `Unanswered` then makes the `client_closed` record
    // from a trail nothing has been taken from yet. Once there is room, the record is built
    // and queued without another wait.
    // Bounded (a stalled log): a request that found no room is answered 503 and its record
    // queued apart, as soon as there is room.
    let room = tokio::time::timeout(crate::audit::STALLED_AFTER, gw.audit.reserve()).await;
    let trail = &mut unanswered.trail;
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status(),
    };
    // A write sent counts as one record at least, whatever its answer shows: one that leaves
    // the record withheld (a `do_not_contact` added, which canvassing then hides) would
    // otherwise count nothing, and a caller could write to a whole ward uncounted; so would
    // one answered with an error, done or not (`Trail::forwarded`). It is counted now,
    // before its answer's record is made durable: a caller who hangs up while it is has
    // written all the same (as one who hangs up before the answer: `Unanswered`).
    let wrote = trail.forwarded;
    let disclosed = (trail.subjects.len() as u64).max(u64::from(wrote));
    if wrote && let Some(p) = &trail.caller {
        gw.controls.count(p, disclosed);
        trail.forwarded = false;
    }
    // What an answer was judged on, kept past the record (which takes the subjects).
    let judged = Judged {
        then: trail.judged_on.take(),
        subjects: trail.subjects.clone(),
        route: trail.route.clone(),
        lawful_basis: trail.lawful_basis.clone(),
        wrote: !trail.written.is_empty(),
        counted_under: trail.counted_under.take(),
    };
    let mut record = audit_record(
        trail,
        result.as_ref().err(),
        &request_id,
        client,
        &method,
        &path,
        status,
        started,
    );
    let dataset = trail.dataset.clone().unwrap_or_else(|| "none".to_owned());
    let purpose = trail.purpose.clone().unwrap_or_else(|| "none".to_owned());
    let template = matches!(result, Ok(Reply::Export(_))).then(|| {
        match &mut record.detail {
            Some(serde_json::Value::Object(detail)) => {
                detail.insert("export".to_owned(), "started".into());
            }
            _ => record.detail = Some(serde_json::json!({ "export": "started" })),
        }
        record.clone()
    });
    // Queued before the request stops counting as on its way, so that a group commit napping
    // for records wakes when the last one is in the queue (`Writer::gather`).
    let queued = match room {
        Ok(room) => room.map(|room| room.submit(record)),
        Err(_) => {
            // An answer that would have disclosed is said as answered: nothing left (a done
            // write's shows nothing of the record, and names it still). A refusal or an error
            // keeps what it says (breach detection counts refusals; a write not sent names its
            // target, which subject access reads), and says how it was answered.
            let mut detail = match record.detail.take() {
                Some(serde_json::Value::Object(d)) => d,
                _ => serde_json::Map::new(),
            };
            detail.insert("audit".to_owned(), "stalled".into());
            if result.is_ok() {
                let done = wrote && matches!(result, Ok(Reply::Body(_)));
                // (As `withheld_after_recording` says it: an error, whatever the status.)
                record.status = if done { 200 } else { 503 };
                record.decision = Decision::Error;
                record.reason = Some(GatewayError::AuditUnavailable.code().to_owned());
                if !done {
                    record.subjects = Default::default();
                }
                (record.fields, record.fields_by_subject) = (Vec::new(), None);
                detail.insert("shown".to_owned(), "nothing".into());
            } else {
                detail.insert("answered".to_owned(), 503.into());
            }
            record.detail = Some(serde_json::Value::Object(detail));
            gw.audit.queue_detached(record);
            Err(stalled_log())
        }
    };
    unanswered.armed = false;
    drop(coming);
    // A commit that does not end (a disk retrying for minutes, a hung mount) is answered as
    // one that failed, rather than holding every request until its caller gives up; the
    // record may still land later, and a further record then says nothing left.
    let mut stalled = false;
    let appended = match queued {
        Ok(ack) => match tokio::time::timeout(crate::audit::STALLED_AFTER, ack.durable()).await {
            Ok(durable) => durable,
            Err(_) => {
                stalled = true;
                Err(stalled_log())
            }
        },
        Err(e) => Err(e),
    };
    // Said whether or not the answer can be given (an audit failure replaces it).
    if let Err(e) = &result {
        log_unexplained(e, &request_id);
    }
    // Looked at once the record is durable: a revocation or a rights change made meanwhile
    // holds it back.
    let held = match (&appended, &result) {
        (Ok(_), Ok(Reply::Body(_))) => held_back(gw, &judged, trail.caller.as_deref()),
        _ => None,
    };
    let response = match appended {
        Ok(_) => match (result, template) {
            (Ok(Reply::Body(body)), _) => match held {
                Some((e, why)) => {
                    // Recorded as disclosed, and not sent: a further record says why.
                    let at = (&request_id[..], client, &method, &path[..]);
                    let after = withheld_after_recording(trail, judged, &e, why, at);
                    // Appended in a task of its own that shutdown waits for (a caller hanging
                    // up must not cancel it), and not waited for here: an await at this point
                    // made every request's state larger, and moving it cost every request.
                    let (log, appending) = (gw.audit.clone(), gw.audit.appender());
                    let request = request_id.clone();
                    tokio::spawn(async move {
                        let _appending = appending;
                        if let Err(e) = log.append(after).await {
                            tracing::error!(error = %e, request_id = request, "the record of an answer held back was not written");
                        }
                    });
                    if wrote {
                        // The write is done (and counted): shown nothing of, not an error
                        // that would have it sent again.
                        let nothing = Bytes::from_static(b"{\"record\":null}");
                        boxed(json_response(StatusCode::OK, nothing, &request_id))
                    } else {
                        boxed(problem_response(&e, &request_id))
                    }
                }
                None => {
                    if !wrote && let Some(p) = &trail.caller {
                        gw.controls.count(p, disclosed);
                    }
                    boxed(json_response(StatusCode::OK, body, &request_id))
                }
            },
            (Ok(Reply::Export(plan)), Some(template)) => {
                let body = crate::export::start(gw.clone(), *plan, template);
                let mut resp = Response::new(body);
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                h.insert(
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                );
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    h.insert("x-request-id", v);
                }
                resp
            }
            (Ok(Reply::Export(_)), None) => {
                let e = GatewayError::Internal("export without its audit template".to_owned());
                log_unexplained(&e, &request_id);
                boxed(problem_response(&e, &request_id))
            }
            (Err(e), _) => {
                let mut resp = boxed(problem_response(&e, &request_id));
                // For the admin plane's own fetches (`rights::current_data`): a 404 for a
                // record held but withheld is not one for a record not held. An extension
                // never leaves the process.
                if let Some(why) = trail.withheld_target {
                    resp.extensions_mut().insert(Withheld(why));
                }
                resp
            }
        },
        Err(e) => {
            tracing::error!(error = %e, request_id, "audit record not durable; withholding response");
            let done = wrote && matches!(result, Ok(Reply::Body(_)));
            if stalled {
                // Queued, not waited for (the log is stalled): once it commits, a subject
                // access report reads this beside the answer's record and leaves it out. It
                // says what the caller was answered: a write sent and answered with an error
                // gets that error (below), not a 503.
                let at = (&request_id[..], client, &method, &path[..]);
                let answered = match &result {
                    Err(e) if wrote => e,
                    _ => &GatewayError::AuditUnavailable,
                };
                let after = withheld_after_recording(
                    trail,
                    Judged {
                        wrote: done,
                        ..judged
                    },
                    answered,
                    "audit_stalled",
                    at,
                );
                gw.audit.queue_detached(after);
            }
            match &result {
                // The datastore took the write (and it is counted): shown nothing of, not an
                // error that would have it sent again. Its intent's record is durable.
                _ if done => {
                    let nothing = Bytes::from_static(b"{\"record\":null}");
                    boxed(json_response(StatusCode::OK, nothing, &request_id))
                }
                // A write sent and answered with an error (or none in time, when it may have
                // been done): that error, which discloses nothing, not a 503 saying it was
                // not sent and to try again.
                Err(e) if wrote => boxed(problem_response(e, &request_id)),
                _ => boxed(problem_response(
                    &GatewayError::AuditUnavailable,
                    &request_id,
                )),
            }
        }
    };
    let decision = match response.status() {
        StatusCode::OK => "allow",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => "deny",
        _ => "error",
    };
    let labels = [
        ("dataset", dataset.clone()),
        ("purpose", purpose),
        ("decision", decision.to_owned()),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("wardgate_requests_total", &labels).increment(1);
    metrics::histogram!("wardgate_request_duration_seconds", "dataset" => dataset.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("wardgate_rows_withheld_total", "dataset" => dataset)
        .increment(trail.rows_withheld);
    response
}

/// A request whose audit record is not yet queued. Dropped so, its caller hung up (or the
/// server ended the connection past the shutdown grace period): the server drops the handler
/// with the connection, mid-pipeline (waiting on the datastore, say), and the record the
/// pipeline would have written is written here instead: an error, `client_closed` (or
/// `internal_error` when a panic drops it), disclosing nothing (nothing left), with what the
/// trail knew: who, why, which dataset and route, the fields a write named. So every request
/// leaves a record, and a write forwarded before its caller went has one after its intent.
/// Queued without waiting (a drop cannot wait; `AuditLog::queue_detached`); shutdown waits for
/// it (`AuditLog::settle`) before it closes the log.
struct Unanswered<'a> {
    gw: &'a Gateway,
    request_id: &'a str,
    client: SocketAddr,
    method: &'a Method,
    path: &'a str,
    started: Instant,
    trail: Trail,
    /// Cleared once the request's own record is queued (or failed to be).
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Dropped by a panic in the pipeline rather than by the connection going.
        let gone = if std::thread::panicking() {
            GatewayError::Internal("the request's handler panicked".to_owned())
        } else {
            GatewayError::ClientClosed
        };
        // A write sent to its datastore is done whoever waits for its answer: counted.
        if self.trail.forwarded
            && let Some(p) = &self.trail.caller
        {
            self.gw.controls.count(p, 1);
        }
        let record = audit_record(
            &mut self.trail,
            Some(&gone),
            self.request_id,
            self.client,
            self.method,
            self.path,
            gone.status(),
            self.started,
        );
        self.gw.audit.queue_detached(record);
    }
}

/// Why an answer whose record is durable may not leave now: its caller no longer stands (a
/// revocation, containment's included, placed while the record was made durable: the
/// revoker was told it holds at once; or the token ended), or, for one judged on a rights
/// register (`Trail::judged_on`), a flag placed on one of its subjects since (restriction,
/// objection, erasure request: the DPO was told it holds) or a register that can no longer
/// be read (stale), or, for an aggregate, a policy pack put in force since that decides
/// otherwise (`Judged::counted_under`) or any flag placed since it began counting (its counts
/// name no one, so a flag placed since may be on someone counted). `None` when it may. The register is rebuilt whole on each change, so an
/// unchanged one costs one comparison.
fn held_back(
    gw: &Gateway,
    judged: &Judged,
    caller: Option<&Principal>,
) -> Option<(GatewayError, &'static str)> {
    // A done write that shows nothing of its record (its record says why) has nothing to
    // hold back.
    if judged.wrote && judged.subjects.is_empty() {
        return None;
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(Err(e)) = caller.map(|p| holds(gw, p, now)) {
        let why = e.code();
        return Some((e, why));
    }
    if let Some(pack) = &judged.counted_under
        && !pack.decides_as(&gw.policies())
    {
        let e = GatewayError::PolicyReloaded;
        let why = e.code();
        return Some((e, why));
    }
    let Judged {
        then: Some(then),
        subjects,
        ..
    } = judged
    else {
        return None;
    };
    match gw.controls.register_flags() {
        Ok(now) if now.same_as(then) => None,
        // An aggregate's counts name no one: any flag placed since it began counting may be
        // on someone it counted (one asking again is counted on the register as it is).
        Ok(now) if judged.counted_under.is_some() => (now.gained_any_since(then))
            .then_some((GatewayError::ControlsStale, "rights_register_changed")),
        Ok(now) => (subjects.iter())
            .any(|s| now.gained_since(then, s))
            .then_some((GatewayError::ControlsStale, "rights_register_changed")),
        Err(e) => {
            let why = e.code();
            Some((e, why))
        }
    }
}

/// What an answer was judged on (`Trail::judged_on`, where it was judged on the rights
/// register), kept past its audit record for `held_back` and the record that says it was
/// held back.
struct Judged {
    then: Option<filter::RegisterFlags>,
    subjects: filter::Subjects,
    route: Option<String>,
    lawful_basis: Option<String>,
    /// A write's answer (the write is done).
    wrote: bool,
    /// An aggregate's pack (`Trail::counted_under`).
    counted_under: Option<std::sync::Arc<crate::decisions::InForce>>,
}

/// The record of an answer recorded as disclosed and then held back (`held_back`): the
/// request's own record names what it would have disclosed; this one, under the same request
/// id and naming the same subjects (a subject access report leaves the answer out), says it
/// did not leave and why.
fn withheld_after_recording(
    trail: &mut Trail,
    judged: Judged,
    e: &GatewayError,
    why: &str,
    (request_id, client, method, path): (&str, SocketAddr, &Method, &str),
) -> AuditRecord {
    // A done write's answer is 200 with nothing of the record; anything else is the error.
    let (status, detail) = if judged.wrote {
        let detail = serde_json::json!({ "withheld_after_recording": why, "shown": "nothing" });
        (StatusCode::OK, detail)
    } else {
        (
            e.status(),
            serde_json::json!({ "withheld_after_recording": why }),
        )
    };
    let mut after = Trail {
        client_request_id: trail.client_request_id.clone(),
        caller: trail.caller.clone(),
        purpose: trail.purpose.clone(),
        lawful_basis: judged.lawful_basis,
        dataset: trail.dataset.clone(),
        route: judged.route,
        detail: Some(detail),
        ..Trail::default()
    };
    let mut record = audit_record(
        &mut after,
        Some(e),
        request_id,
        client,
        method,
        path,
        status,
        Instant::now(),
    );
    // Named, though nothing left (a refusal names none): a subject access search finds it
    // beside the record it corrects.
    record.subjects = judged.subjects;
    record
}

/// A buffered response as a data-plane body.
pub fn boxed(resp: Response<Full<Bytes>>) -> Response<DataBody> {
    use http_body_util::BodyExt;
    resp.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

/// The inner handler: the steps, in order. Returns what to disclose.
async fn process<B>(
    gw: &Gateway,
    req: Request<B>,
    request_id: &str,
    client: SocketAddr,
    trail: &mut Trail,
) -> Result<Reply, GatewayError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // 0. A head the gateway takes at all (hyper bounds it too, at twice the size).
    crate::request_head::check(&req)?;

    // 1. Who is asking.
    let principal = authenticate(gw, req.headers(), trail)?;

    // 2. What they ask for: only routes the register declares.
    let route = routes::resolve(
        &gw.catalog,
        req.method(),
        req.uri().path(),
        req.uri().query(),
    )
    .map_err(|e| match e {
        // A write route on a read-only datastore (Datasette) accepts no method at all, not
        // the POST the register declares for it (`dialect::write` refuses that too).
        GatewayError::MethodNotAllowed("POST") if read_only(gw, req.uri().path()) => {
            GatewayError::MethodNotAllowed("")
        }
        e => e,
    })?;
    trail.dataset = Some(route.dataset.clone());
    trail.route = Some(route.id());
    // What was asked, in the record whatever the outcome (a record's `path` has no query):
    // aggregates that could be set against each other, and what a listing or an export was
    // narrowed by, show in the log.
    if let RouteKind::Aggregate { by } = &route.kind {
        trail.detail = Some(serde_json::json!({
            "aggregate": { "by": by, "filters": route.filters }
        }));
    } else if !route.filters.is_empty() {
        trail.detail = Some(serde_json::json!({ "filters": route.filters }));
    }
    // An export's only sign of being cut short is its framing (no last chunk, a reset
    // stream); an HTTP/1.0 body ends by the connection closing, which looks the same whole.
    if route.kind == RouteKind::Export && req.version() < http::Version::HTTP_11 {
        return Err(GatewayError::ExportNeedsHttp11);
    }
    let dataset = gw
        .catalog
        .datasets
        .get(&route.dataset)
        .ok_or(GatewayError::RouteNotFound)?;

    // 3. Why: one declared purpose, known to the catalogue and granted to the token.
    let purpose = declared_purpose(req.headers())?;
    let entry = gw
        .catalog
        .purposes
        .get(&purpose)
        .ok_or_else(|| GatewayError::PurposeUnknown(purpose.clone()))?;
    trail.purpose = Some(purpose.clone());
    trail.lawful_basis = Some(entry.lawful_basis.clone());
    if !principal.purposes.contains(&purpose) {
        return Err(GatewayError::PurposeNotGranted(purpose));
    }

    // 4. May this request happen at all (under the pack in force now, to the request's end).
    let policies = gw.policies();
    let ask = policies
        .engine
        .ask(Arc::clone(&principal), &purpose, &entry.lawful_basis);
    let verdict = policies.decisions.request(
        &policies.engine,
        &ask,
        &principal,
        &purpose,
        &entry.lawful_basis,
        route.action(),
        &route.dataset,
        route.narrowing(),
    );
    trail.policy_ids.extend(verdict.policy_ids.iter().cloned());
    if !verdict.allowed {
        return Err(GatewayError::Forbidden {
            policy_ids: verdict.policy_ids,
        });
    }
    filters_visible(&policies, &ask, &route, dataset, trail)?;
    // A principal past their role's allowance gets nothing more this window; as many records
    // as this request may disclose are held for it meanwhile (parallel requests see them).
    let may_disclose = match &route.kind {
        RouteKind::List => dialect::per_page(dataset, &route),
        RouteKind::Read { .. } | RouteKind::Write { .. } => 1,
        // Each chunk is checked and held on its own.
        RouteKind::Export => 0,
        // No record leaves.
        RouteKind::Aggregate { .. } => 0,
    };
    trail.quota = gw
        .controls
        .check_quota(&principal, u64::from(may_disclose))
        .await?;
    // An export or aggregate streams the caller's whole scope: a caller has only so many
    // under way at once, held to the export's end or the aggregate's answer.
    let bulk_read = match route.kind {
        RouteKind::Export | RouteKind::Aggregate { .. } => {
            Some(gw.bulk_reads.take(&principal.subject)?)
        }
        RouteKind::List | RouteKind::Read { .. } | RouteKind::Write { .. } => None,
    };

    // 5. Forward, then filter what comes back.
    let upstream = gw
        .upstreams
        .get(&route.dataset)
        .ok_or(GatewayError::RouteNotFound)?;
    let categories = gw
        .categories
        .get(&route.dataset)
        .ok_or(GatewayError::RouteNotFound)?;
    let asker = asker_key(&principal, &purpose, &entry.lawful_basis);
    if route.kind == RouteKind::Export {
        let areas = narrowing(gw, &principal);
        let path = dialect::export(&upstream.dialect, dataset, &route, areas.as_deref())
            .ok_or_else(|| {
                GatewayError::BadRequest("this dataset's datastore offers no export".to_owned())
            })?;
        let body = upstream.open_stream(&path, request_id).await?;
        return Ok(Reply::Export(Box::new(crate::export::Plan {
            body: crate::export::Lines::new(body).idle(upstream.response_timeout()),
            principal,
            ask,
            asker,
            dataset: route.dataset.clone(),
            filtered_on: route.filtered_categories(dataset),
            policies,
            bulk_read,
        })));
    }
    let decider = Decider::new(
        &policies.engine,
        &policies.decisions,
        &ask,
        asker.clone(),
        &route.dataset,
        categories,
    );
    match &route.kind {
        RouteKind::List => {
            let areas = narrowing(gw, &principal);
            let (path, envelope) =
                dialect::list(&upstream.dialect, dataset, &route, areas.as_deref());
            let resp = upstream.send(Method::GET, &path, None, request_id).await?;
            let body = expect_json(resp.status, resp.json, resp.body)?;
            let register = register_now(gw, &principal)?;
            trail.judged_on = Some(register.clone());
            let filtered_on = route.filtered_categories(dataset);
            // (Datasette's paging values are the request's already: `Envelope::Rows`.)
            let mut cx = FilterContext::new(dataset, &register)
                .filtered_on(&filtered_on)
                .paged(route.page.unwrap_or(1), dialect::per_page(dataset, &route));
            // A postcode the listing names is each record's, as for a read by id: a look-up
            // purpose's rule is met by naming one, and a datastore that ignored it would
            // hand the look-up the whole area.
            let at_postcode = |p: &str| {
                (route.filters.get(routes::READ_FILTER))
                    .is_some_and(|wanted| routes::postcode_matches(p, wanted))
            };
            if route.filters.contains_key(routes::READ_FILTER) {
                cx = cx.must_match(routes::READ_FILTER, &at_postcode);
            }
            let mut memo = policies.decisions.memos.take(asker, &route.dataset);
            let decide = &mut |a: &_| decider.decide(a);
            let (out, d) =
                filter::filter_page(&body, envelope, &cx, decide, &mut memo).map_err(malformed)?;
            // A datastore that sends more records than the page asked for would disclose past
            // the quota held for this request (the count comes after): nothing leaves.
            let rows = d.subjects.len() as u64 + d.rows_withheld;
            if rows > u64::from(may_disclose) {
                return Err(malformed(filter::FilterError::Malformed(format!(
                    "{rows} records for a page of {may_disclose}: the datastore must honour \
                     `per_page`"
                ))));
            }
            never_disclosed_sent(&route.dataset, d.never_disclosed_rows);
            filter_ignored(&route.dataset, d.mismatched_rows);
            trail.absorb(d);
            Ok(Reply::Body(Bytes::from(out)))
        }
        RouteKind::Export => Err(GatewayError::RouteNotFound),
        RouteKind::Aggregate { by } => {
            let areas = narrowing(gw, &principal);
            let path = dialect::export(&upstream.dialect, dataset, &route, areas.as_deref())
                .ok_or_else(|| {
                    GatewayError::BadRequest(
                        "this dataset's datastore offers no export, which aggregates read"
                            .to_owned(),
                    )
                })?;
            let body = upstream.open_stream(&path, request_id).await?;
            // The register the count begins on: an aggregate names no subjects, so any flag
            // placed from now until its answer leaves may be on someone counted in an earlier
            // batch (`held_back`).
            trail.judged_on = Some(register_now(gw, &principal)?);
            let counted = crate::aggregate::count(
                crate::export::Lines::new(body).idle(upstream.response_timeout()),
                &route,
                dataset,
                &gw.controls,
                gw.aggregates,
                &mut |a| decider.decide(a),
                &|| aggregate_stands(gw, &principal, &policies),
            )
            .await?;
            // Reading a whole register takes a while: the caller must still stand when the
            // answer is ready, as before each part of an export (and once its record is
            // durable: `held_back`).
            aggregate_stands(gw, &principal, &policies)?;
            trail.counted_under = Some(std::sync::Arc::clone(&policies));
            if counted.shown {
                trail.fields = by.iter().cloned().collect();
            }
            trail.rows_withheld = counted.rows_withheld;
            trail.policy_ids.extend(counted.policy_ids);
            let mut summary = counted.summary;
            summary["aggregate"]["filters"] = serde_json::json!(route.filters);
            trail.detail = Some(summary);
            drop(bulk_read);
            Ok(Reply::Body(counted.body))
        }
        RouteKind::Read { id } => {
            let (body, envelope) = fetch_one(upstream, dataset, id, request_id, trail).await?;
            let register = register_now(gw, &principal)?;
            trail.judged_on = Some(register.clone());
            // A postcode the read names is the record's, or nothing of it leaves: the
            // datastore answers a read by id whatever the postcode, and a look-up purpose's
            // rule is met only by a caller who knew where the person lives. (Judged below,
            // after the policies.)
            let mismatch = route
                .filters
                .get(routes::READ_FILTER)
                .is_some_and(|wanted| {
                    let held = filter::single_text(&body, envelope, routes::READ_FILTER);
                    !held.is_some_and(|p| routes::postcode_matches(&p, wanted))
                });
            let filtered_on = route.filtered_categories(dataset);
            let cx = FilterContext::new(dataset, &register).filtered_on(&filtered_on);
            let mut refused = None;
            let (out, d) = filter::filter_single(&body, envelope, &cx, &mut |a| {
                let verdict = decider.decide(a);
                if !verdict.allowed || a.never_disclosed() {
                    refused = Some(a.clone());
                }
                verdict
            })
            .map_err(malformed)?;
            // A record the datastore answers under another id (a Datasette table without a
            // primary key looked up by rowid, an id normalised) is not the one asked for:
            // nothing of it leaves and the caller is given no reason for it, as for a write's
            // target, so that no answer (a subject access report's above all) speaks of
            // another person as this id. The log says why: a subject access report must not
            // read it as a record held under this id that the DPO should fetch.
            let other = match d.subjects.iter().next() {
                Some(subject) => d.subjects.len() != 1 || subject != id,
                None => matches!(filter::single_attrs(&body, envelope, &cx),
                    Ok(Some(Some((subject, _)))) if subject != *id),
            };
            if other {
                static LAST: std::sync::atomic::AtomicI64 =
                    std::sync::atomic::AtomicI64::new(i64::MIN);
                if once_a_minute(&LAST) {
                    tracing::warn!(dataset = %route.dataset, "the datastore answered a read by id \
                        with a record under another id: withheld (is the table's primary key the \
                        subject id? logged at most once a minute)");
                }
                trail.withhold_target("answered_under_another_id", Vec::new());
                return Err(GatewayError::NotFound);
            }
            // After the policies: a record they withhold (an anonymous elector's, one out of
            // the caller's area) read with a wrong postcode is logged as what it is, for breach
            // detection to count (`protected_subject`, `out_of_area`); one they would let out is
            // not disclosed, and is logged as the postcode's mismatch.
            if mismatch {
                match &refused {
                    Some(attrs) => {
                        trail.withheld_target = Some(withheld_why(gw, &principal, attrs));
                        trail.absorb(d);
                    }
                    None => trail.withhold_target("filter_mismatch", Vec::new()),
                }
                return Err(GatewayError::NotFound);
            }
            if out.is_none() && d.rows_withheld > 0 {
                trail.withheld_target = Some(match &refused {
                    Some(attrs) => withheld_why(gw, &principal, attrs),
                    None if d.malformed_rows > 0 => "malformed",
                    // Allowed, but its decision hides a field the read named (its postcode),
                    // which its presence would give away (`FilterContext::filtered_on`).
                    None => "filter_hidden",
                });
            }
            trail.absorb(d);
            out.map(|o| Reply::Body(Bytes::from(o)))
                .ok_or(GatewayError::NotFound)
        }
        RouteKind::Write { id, write } => {
            let (path, envelope) = dialect::write(&upstream.dialect, dataset, id, write)?;
            let asked = req.uri().path().to_owned();
            if !crate::writes::says_json(req.headers()) {
                return Err(GatewayError::UnsupportedMediaType);
            }
            let body = crate::writes::read_body(req, gw.max_request_bytes).await?;
            let written = crate::writes::check_write(
                gw,
                &policies.engine,
                &ask,
                dataset,
                &route,
                write,
                id,
                &body,
                &principal,
                upstream,
                request_id,
                trail,
            )
            .await?;
            trail.written = written;
            log_intent(gw, trail, request_id, client, &asked, id).await?;
            // A rights request placed on the record while its intent was made durable (a
            // restriction, a para 22 notice, an erasure request) stops the write here.
            if let Some(then) = trail.judged_on.take() {
                let now = register_now(gw, &principal)?;
                if !now.same_as(&then) && now.gained_since(&then, id) {
                    trail.withhold_target("rights_register_changed", Vec::new());
                    return Err(GatewayError::NotFound);
                }
            }
            trail.forwarded = true;
            trail.unsent = None;
            let resp = upstream
                .send(Method::POST, &path, Some(body), request_id)
                .await?;
            if !resp.status.is_success() {
                // Counted all the same (`Trail::forwarded`): a 5xx (a proxy's 502 or 504) may
                // have been done, and a refusal (4xx) answers 502 where a target that may not
                // be written answers 404.
                tracing::warn!(status = resp.status.as_u16(), "upstream refused the write");
                return Err(GatewayError::UpstreamStatus(resp.status.as_u16()));
            }
            // The write is done (any 2xx: 200, 201 Created, 204 No Content). What follows only
            // decides what of the record is shown back: when nothing may be (no record in the
            // answer, an answer that cannot be read, the caller no longer stands, the mirror
            // went stale during the round trip), the caller sees nothing of it, not an error
            // that would have the write sent again; the record says why.
            let nothing = |trail: &mut Trail, why: &str| {
                trail.detail = Some(serde_json::json!({
                    "written": trail.written, "shown": "nothing", "because": why
                }));
                Ok(Reply::Body(Bytes::from_static(b"{\"record\":null}")))
            };
            let body = match (resp.json, resp.body) {
                (_, Err(e)) => return nothing(trail, e.code()),
                (true, Ok(body)) if !body.is_empty() => body,
                _ => return nothing(trail, "upstream_answer_holds_no_record"),
            };
            let register = match register_now(gw, &principal) {
                Ok(r) => r,
                Err(e) => return nothing(trail, e.code()),
            };
            // What of the record is shown is held back too if a flag comes while its record
            // is made durable (`held_back`).
            trail.judged_on = Some(register.clone());
            let cx = FilterContext::new(dataset, &register);
            match filter::filter_single(&body, envelope, &cx, &mut |a| decider.decide(a)) {
                // A record answered under another id (a write resolving ids otherwise than
                // its read: an upsert answering with the record it merged into) is not the
                // one written: nothing of it is shown, as for a read.
                Ok((_, d)) if d.subjects.iter().any(|s| s != id) => {
                    nothing(trail, "answered_under_another_id")
                }
                Ok((out, d)) => {
                    trail.absorb(d);
                    Ok(Reply::Body(out.map(Bytes::from).unwrap_or_else(|| {
                        Bytes::from_static(b"{\"record\":null}")
                    })))
                }
                Err(e) => {
                    tracing::warn!(error = %e, request_id,
                        "a written record's answer could not be read; nothing of it shown");
                    metrics::counter!("wardgate_malformed_records_total").increment(1);
                    nothing(trail, "upstream_response_malformed")
                }
            }
        }
    }
}

impl Trail {
    /// The authenticated caller, once known.
    pub fn caller(&self) -> Option<&Principal> {
        self.caller.as_deref()
    }

    /// A write refused for what it would write (fields its purpose may not write, or values
    /// a field may not carry): which fields, in the audit record. Never the values, which
    /// the caller chose and could fill with anything (the log keeps field names only).
    /// The record names what refused (`policy_ids`: none for values the asset register
    /// refused), not what had let the request through.
    pub(crate) fn refuse_write(&mut self, fields: &[String], policy_ids: &[String]) {
        self.detail = Some(serde_json::json!({ "write": "refused", "refused": fields }));
        self.policy_ids = policy_ids.iter().cloned().collect();
    }

    /// The one record a read or a write named was withheld: why (what breach detection keys
    /// on) and the policies that decided.
    pub(crate) fn withhold_target(
        &mut self,
        why: &'static str,
        policy_ids: impl IntoIterator<Item = String>,
    ) {
        self.withheld_target = Some(why);
        self.policy_ids.extend(policy_ids);
    }

    /// The policies that let a write through (its target's, and each written category's).
    pub(crate) fn decided_by(&mut self, policy_ids: impl IntoIterator<Item = String>) {
        self.policy_ids.extend(policy_ids);
    }

    fn absorb(&mut self, d: filter::Disclosure) {
        self.fields_by_subject = d.fields_by_subject();
        self.subjects = d.subjects;
        self.fields = d.fields;
        self.rows_withheld = d.rows_withheld;
        self.policy_ids.extend(d.policy_ids);
        count_unread(d.unclassified_fields, d.malformed_rows);
    }
}

/// What the filter could not read of a page or an export's chunk, counted: a datastore sending
/// records it cannot read raises the same alarm whichever route reads them.
pub(crate) fn count_unread(unclassified_fields: u64, malformed_rows: u64) {
    if unclassified_fields > 0 {
        metrics::counter!("wardgate_unclassified_fields_total").increment(unclassified_fields);
    }
    if malformed_rows > 0 {
        metrics::counter!("wardgate_malformed_records_total").increment(malformed_rows);
    }
}

/// A verified, unrevoked caller, for the data and the admin plane alike. Revocations are only
/// as good as the mirror holding them, so a stale mirror answers 503 before anything else.
pub fn authenticate(
    gw: &Gateway,
    headers: &HeaderMap,
    trail: &mut Trail,
) -> Result<Arc<Principal>, GatewayError> {
    let principal = authenticate_on_mirror(gw, headers, trail)?;
    gw.controls.check_fresh()?;
    Ok(principal)
}

/// `authenticate` without the staleness bound: the token checked against the revocations
/// this replica's mirror holds, however old. Only for the changes the admin plane must be able
/// to make while Redis is away (`Change::taken_on_a_stale_mirror`: a restriction, a token's
/// revocation); everything else asks `check_fresh` too.
pub fn authenticate_on_mirror(
    gw: &Gateway,
    headers: &HeaderMap,
    trail: &mut Trail,
) -> Result<Arc<Principal>, GatewayError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // One credential: with two, a proxy in front and the gateway could each take another.
    let mut given = headers.get_all(header::AUTHORIZATION).iter();
    let presented = given.next().map(|v| v.as_bytes());
    if given.next().is_some() {
        return Err(GatewayError::Unauthenticated(
            crate::error::AuthFailure::MalformedHeader,
        ));
    }
    let principal =
        gw.verifier
            .verify_header_naming(presented, now)
            .map_err(|(failure, ended)| {
                // A leaver's token, its signature good: refused, but recorded as theirs.
                trail.caller = ended;
                GatewayError::Unauthenticated(failure)
            })?;
    trail.caller = Some(Arc::clone(&principal));
    gw.controls
        .holds(&principal, gw.verifier.ends_at(&principal), now)?;
    Ok(principal)
}

/// The rights register's flags as they stand now, read once the caller is known still to
/// stand: what a datastore's answer is judged against. Asked after the answer arrives, not
/// when the request did, so that a slow datastore (or a wait for the quota) can neither carry
/// a mirror past its staleness bound nor let a revocation or a flag placed meanwhile through.
pub(crate) fn register_now(
    gw: &Gateway,
    principal: &Principal,
) -> Result<filter::RegisterFlags, GatewayError> {
    standing(
        gw,
        principal,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )?;
    gw.controls.register_flags()
}

/// Whether a verified caller may still be answered at `now`: the mirror holding revocations
/// is within its staleness bound, the token is not revoked, neither it nor its grant has
/// ended, and the key that verified it is still trusted (`holds`). Asked on every request, and again before each part of an export leaves, so that a
/// revocation (containment's included), a token's end or a stale mirror stops an export
/// already under way.
pub fn standing(gw: &Gateway, principal: &Principal, now: i64) -> Result<(), GatewayError> {
    gw.controls.check_fresh()?;
    holds(gw, principal, now)
}

/// `standing` on the mirror as it is, however stale: the token neither revoked here nor ended,
/// and the key that verified it still trusted (not dropped or replaced since by `rekey`). The
/// admin plane asks it after a request's body has arrived and before a subject access report
/// leaves, as the data plane asks `standing`.
pub fn holds(gw: &Gateway, principal: &Principal, now: i64) -> Result<(), GatewayError> {
    gw.controls
        .holds(principal, gw.verifier.ends_at(principal), now)?;
    if !gw.verifier.still_trusts(principal) {
        return Err(GatewayError::Unauthenticated(
            crate::error::AuthFailure::UnknownKey,
        ));
    }
    Ok(())
}

/// Whether a minute has passed since `last` (unix seconds) said yes, saying yes to one caller
/// only: for warnings written at most once a minute however often their cause recurs.
pub(crate) fn once_a_minute(last: &std::sync::atomic::AtomicI64) -> bool {
    use std::sync::atomic::Ordering;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let then = last.load(Ordering::Relaxed);
    now.saturating_sub(then) >= 60
        && (last.compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)).is_ok()
}

/// A datastore asked to leave out the entries never disclosed (`exclude=protected`, or a
/// Datasette canned query that should) sent `n` of them in a listing or an export. The filter
/// withheld them, but a page's length and `next_page` then count them (DOMAIN.md: not even
/// that an anonymous entry exists). The datastore breaks its contract, and the operator is
/// told: always by a metric, and by an error in the log at most once a minute (a datastore
/// that ignores the parameter would otherwise write one a request).
pub(crate) fn never_disclosed_sent(dataset: &str, n: u64) {
    static LOGGED: AtomicI64 = AtomicI64::new(i64::MIN);
    datastore_fault(
        "wardgate_upstream_never_disclosed_total",
        &LOGGED,
        dataset,
        n,
        "the datastore sent anonymous electors or under-16s in a listing or export it was \
         asked to leave them out of: they were withheld, but paging can count them \
         (README: Datastores)",
    );
}

/// Counts and logs (at most once a minute) the records of a listing that did not meet its
/// postcode filter (`FilterContext::must_match`): withheld, but the datastore ignored the
/// filter, and each page's length and next page can count them.
fn filter_ignored(dataset: &str, n: u64) {
    static LOGGED: AtomicI64 = AtomicI64::new(i64::MIN);
    datastore_fault(
        "wardgate_upstream_filter_ignored_total",
        &LOGGED,
        dataset,
        n,
        "the datastore answered a listing with records its postcode filter does not pick: \
         they were withheld; fix the datastore (README: Datastores)",
    );
}

/// `n` records a datastore should not have sent: counted in `counter` by dataset, and `what`
/// logged as an error at most once a minute (`logged`: when it last was), since a datastore
/// breaking its contract would otherwise write one a request.
fn datastore_fault(counter: &'static str, logged: &AtomicI64, dataset: &str, n: u64, what: &str) {
    if n == 0 {
        return;
    }
    metrics::counter!(counter, "dataset" => dataset.to_owned()).increment(n);
    if once_a_minute(logged) {
        tracing::error!(dataset, records = n, "{what}");
    }
}

/// Refuses a filter on a field the purpose may not see even on a record with nothing against
/// it (no marker or flag, every consent given, the TPS check fresh): the records it picks
/// would give the field's value away by being picked, and withholding them
/// (`FilterContext::filtered_on`, which still applies where a record's own flags hide the
/// field) would leave paging to count them.
fn filters_visible(
    policies: &InForce,
    ask: &crate::policy::Ask,
    route: &routes::Route,
    dataset: &crate::catalog::Dataset,
    trail: &mut Trail,
) -> Result<(), GatewayError> {
    // An aggregate's groups too: grouping by a field the purpose may never see would answer
    // no cells, as if every one were too small, rather than say why.
    let by: &[String] = match &route.kind {
        routes::RouteKind::Aggregate { by } => by,
        _ => &[],
    };
    if route.filters.is_empty() && by.is_empty() {
        return Ok(());
    }
    // The best a record of this dataset can be (no consents where it keeps none, no TPS check
    // where it records none): the shipped field policies only ever take a field away for a
    // flag, a missing consent or a stale TPS check.
    let clean = crate::policy::RecordAttrs {
        area: String::new(),
        markers: Default::default(),
        flags: Default::default(),
        consented: match dataset.consents_field {
            Some(_) => (dataset.known_flags.iter())
                .filter_map(|f| f.strip_prefix("consent_withdrawn_"))
                .map(str::to_owned)
                .collect(),
            None => Default::default(),
        },
        tps_fresh: dataset.tps_field.is_some(),
    };
    let asked = (route.filters.keys().map(|f| (f, "filter", "picks")))
        .chain(by.iter().map(|f| (f, "grouping", "groups")));
    for (field, what, does) in asked {
        // (Every filter and grouping is a classified field: the catalogue refuses another
        // filter at start, the route another grouping; an empty category is one no policy
        // lets through.)
        let category = dataset.fields.get(field).map_or("", String::as_str);
        let verdict = (policies.engine).decide_field(ask, &route.dataset, &clean, category, false);
        if !verdict.allowed {
            // The record names what refused, not what had let the request through.
            trail.policy_ids = verdict.policy_ids.iter().cloned().collect();
            return Err(GatewayError::FilterForbidden(
                format!(
                    "{what} `{field}` {does} by a field (category `{category}`) this purpose and role may not see"
                ),
                verdict.policy_ids,
            ));
        }
    }
    Ok(())
}

/// Why policy withheld a record the caller named by id, most serious first. Only breach
/// detection reads this; the policies alone decide what is withheld. The markers are the ones
/// DOMAIN.md says are never disclosed (`N`, anonymous; `under_16`).
pub(crate) fn withheld_why(
    gw: &Gateway,
    principal: &Principal,
    attrs: &crate::policy::RecordAttrs,
) -> &'static str {
    if attrs.never_disclosed() {
        "protected"
    } else if !gw
        .geography
        .areas_under(&principal.areas)
        .contains(&attrs.area)
    {
        "out_of_area"
    } else if ["restricted", "erasure_requested"]
        .iter()
        .any(|f| attrs.flags.contains(*f))
    {
        // Held back from everything but rights handling. Other flags (an objection, a
        // withdrawn consent, `deceased`) withhold a record from some purposes only, which a
        // legitimate caller meets in the course of their work: not an attempt on anyone.
        "restricted"
    } else {
        "policy"
    }
}

/// The areas to narrow a listing to (`Geography::narrowing`), rendered once per grant set.
fn narrowing(gw: &Gateway, principal: &Principal) -> Option<Arc<Narrowing>> {
    gw.narrowings.get(&principal.areas, || {
        let areas = gw
            .geography
            .narrowing(&principal.areas, MAX_NARROWING_AREAS)?;
        Some(Narrowing::new(&areas))
    })
}

pub(crate) async fn fetch_one(
    upstream: &Upstream,
    dataset: &Dataset,
    id: &str,
    request_id: &str,
    trail: &mut Trail,
) -> Result<(Bytes, filter::Envelope), GatewayError> {
    let (path, envelope) = dialect::read(&upstream.dialect, dataset, id);
    let resp = upstream.send(Method::GET, &path, None, request_id).await?;
    // Before any scope check: what the datastore may say of one id short of its record (404,
    // or a 403, 410 or 451 that would tell of a rights request) answers as an id the caller
    // may not see, the status in the log only. Other errors (its credentials refused, its
    // limits reached) are the datastore's failures and answer 502, as anywhere else.
    // Datasette's 403 is the gateway's credential refused (it has no rights requests to tell
    // of): as not found, a subject access report would say "nothing held" of everyone.
    let datasette = matches!(upstream.dialect, crate::config::Dialect::Datasette(_));
    if resp.status == StatusCode::FORBIDDEN && datasette {
        return Err(GatewayError::UpstreamStatus(403));
    }
    if matches!(resp.status.as_u16(), 403 | 404 | 410 | 451) {
        if resp.status != StatusCode::NOT_FOUND {
            tracing::warn!(status = resp.status.as_u16(), request_id, collection = %dataset.collection,
                "the datastore refused a read by id; answered as not found");
            // In the log, and for a subject access report's own read (`Withheld`), which
            // must not say "nothing held" of a record the datastore keeps and will not give.
            trail.withheld_target = Some(match resp.status.as_u16() {
                403 => REFUSED_403,
                410 => REFUSED_410,
                _ => REFUSED_451,
            });
        }
        return Err(GatewayError::NotFound);
    }
    Ok((expect_json(resp.status, resp.json, resp.body)?, envelope))
}

/// `Trail::withheld_target` for a read by id the datastore refused with that status.
pub(crate) const REFUSED_403: &str = "refused_by_datastore_403";
pub(crate) const REFUSED_410: &str = "refused_by_datastore_410";
pub(crate) const REFUSED_451: &str = "refused_by_datastore_451";

/// A request extension marking a subject access report's own read of its subject through
/// the data plane (`rights::current_data`), with the request id its record is made under:
/// chosen by the report before it asks, so that a report whose caller leaves while the read
/// waits for its record can still correct that record (`rights::Unsent`). An extension never
/// comes from outside the process.
#[derive(Debug, Clone)]
pub struct SubjectAccessFetch {
    pub request_id: String,
}

/// On a 404 for one record asked for by id, why the record the datastore holds was withheld
/// (`Trail::withheld_target`): a response extension, for in-process callers only.
#[derive(Debug, Clone, Copy)]
pub struct Withheld(pub &'static str);

/// Whether the dataset `path` names is served by a datastore that takes no writes.
fn read_only(gw: &Gateway, path: &str) -> bool {
    let dataset = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    (gw.upstreams.get(dataset))
        .is_some_and(|u| matches!(u.dialect, crate::config::Dialect::Datasette(_)))
}

/// A datastore's answer to a read: its body when it is a 200 in JSON, else the error that
/// answers the caller (nothing of any other answer is disclosed).
pub(crate) fn expect_json(
    status: StatusCode,
    json: bool,
    body: Result<Bytes, GatewayError>,
) -> Result<Bytes, GatewayError> {
    if status != StatusCode::OK {
        tracing::warn!(status = status.as_u16(), "upstream answered with an error");
        return Err(GatewayError::UpstreamStatus(status.as_u16()));
    }
    if !json {
        return Err(GatewayError::UpstreamMalformed(
            "response is not application/json".to_owned(),
        ));
    }
    body
}

/// A body the filter could not read, as the caller's error (logged by `log_unexplained`).
pub(crate) fn malformed(e: filter::FilterError) -> GatewayError {
    GatewayError::UpstreamMalformed(e.to_string())
}

/// Logs, under the request id, the failures whose cause the caller is not told: a 500, and an
/// upstream answer that could not be read. Their messages name positions, keys and the
/// gateway's own state, never a value of a record, so the log may carry them.
fn log_unexplained(e: &GatewayError, request_id: &str) {
    match e {
        GatewayError::Internal(_) => tracing::error!(error = %e, request_id, "request failed"),
        GatewayError::UpstreamMalformed(_) => {
            tracing::warn!(error = %e, request_id, "upstream answer unreadable; disclosing nothing");
        }
        _ => {}
    }
}

fn declared_purpose(headers: &HeaderMap) -> Result<String, GatewayError> {
    let mut values = headers.get_all("x-purpose").iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(if headers.contains_key("x-purpose") {
            GatewayError::BadRequest(
                "declare exactly one purpose: `X-Purpose` is given more than once".to_owned(),
            )
        } else {
            GatewayError::PurposeMissing
        });
    };
    let v = v
        .to_str()
        .map_err(|_| GatewayError::PurposeUnknown("<not text>".to_owned()))?
        .trim();
    if v.is_empty() {
        return Err(GatewayError::PurposeMissing);
    }
    Ok(v.to_owned())
}

/// The request's own id, always made here (random, so unique: audit records, the datastore's
/// logs and the answer's `X-Request-Id` share it), and the caller's `X-Request-Id` if it is
/// short and plain, kept beside it in the audit record. Taken as the id, a caller's could
/// repeat another request's, and a write's intent record and its answer's would no longer
/// pair one to one.
fn request_ids(headers: &HeaderMap) -> (String, Option<String>) {
    let client = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| routes::valid_id(v))
        .map(str::to_owned);
    (new_request_id(), client)
}

/// A fresh request id: 128 random bits, as 32 hex digits.
pub(crate) fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A write's record, durable before the datastore sees the body: a write the log cannot hold
/// does not happen (503), and one whose answer's record is then lost (the log failing, the
/// caller going away) is still in the log, naming its target and (in `detail.written`, as the
/// answer's record does) the fields it carried; `fields`, what was disclosed, is empty.
async fn log_intent(
    gw: &Gateway,
    trail: &mut Trail,
    request_id: &str,
    client: SocketAddr,
    path: &str,
    target: &str,
) -> Result<(), GatewayError> {
    // Reading the target took a round trip to the datastore: the caller must still stand.
    if let Some(p) = &trail.caller {
        standing(gw, p, time::OffsetDateTime::now_utc().unix_timestamp())?;
    }
    // Assembled as the answer's record is, from what the pipeline has learnt so far, with
    // the target as its one subject and nothing disclosed yet.
    let mut subjects = filter::Subjects::default();
    subjects.push(target);
    let mut so_far = Trail {
        client_request_id: trail.client_request_id.clone(),
        caller: trail.caller.clone(),
        purpose: trail.purpose.clone(),
        lawful_basis: trail.lawful_basis.clone(),
        dataset: trail.dataset.clone(),
        route: trail.route.clone(),
        policy_ids: trail.policy_ids.clone(),
        subjects,
        ..Trail::default()
    };
    let mut record = audit_record(
        &mut so_far,
        None,
        request_id,
        client,
        &Method::POST,
        path,
        StatusCode::OK,
        Instant::now(),
    );
    // Not answered yet: the answer's own record carries its status.
    record.status = 0;
    record.detail = Some(serde_json::json!({ "write": "intended", "written": trail.written }));
    // Marked before it is recorded: a caller who hangs up while it is synced (the longest
    // wait here) leaves a write recorded as intended and never sent, which the answer's
    // record then says (`Trail::unsent`).
    trail.unsent = Some(target.to_owned());
    // Synced to disk whatever `audit.durability` says: the datastore keeps the write through
    // a power cut here, and its record must not be lost while the write is not.
    // Bounded as the answer's record is (a stalled log): the write is then not forwarded.
    let synced = tokio::time::timeout(crate::audit::STALLED_AFTER, gw.audit.append_synced(record))
        .await
        .unwrap_or_else(|_| Err(stalled_log()));
    synced.map(drop).map_err(|e| {
        tracing::error!(error = %e, request_id, "write's audit record not durable; not forwarded");
        GatewayError::AuditUnavailable
    })
}

/// What a wait for the audit log longer than `audit::STALLED_AFTER` is taken for: a failure.
fn stalled_log() -> crate::audit::AuditError {
    crate::audit::AuditError::Unavailable(format!(
        "no commit within {:?}",
        crate::audit::STALLED_AFTER
    ))
}

#[expect(
    clippy::too_many_arguments,
    reason = "assembles one flat record from the request's parts"
)]
/// The request's audit record; what it lists (subjects, fields, policies, route) moves into
/// it from the trail, which keeps only what the metrics and the quota read afterwards. (Made
/// once there is room for it in the audit queue, so that it is never made and then lost to
/// a cancelled wait: `handle`.)
fn audit_record(
    trail: &mut Trail,
    error: Option<&GatewayError>,
    request_id: &str,
    client: SocketAddr,
    method: &Method,
    path: &str,
    status: StatusCode,
    started: Instant,
) -> AuditRecord {
    let (decision, reason) = match error {
        None => (Decision::Allow, None),
        Some(
            e @ (GatewayError::Unauthenticated(_)
            | GatewayError::Forbidden { .. }
            | GatewayError::WriteForbidden(_)
            | GatewayError::FilterForbidden(..)
            | GatewayError::PurposeNotGranted(_)
            | GatewayError::QuotaExceeded
            | GatewayError::TooManyAtOnce(_)),
        ) => (Decision::Deny, Some(e.code().to_owned())),
        Some(e) => (Decision::Error, Some(e.code().to_owned())),
    };
    let disclosed = error.is_none();
    let unsent = trail.unsent.take().filter(|_| !disclosed);
    AuditRecord {
        ts: AuditRecord::now_ts(),
        request_id: request_id.to_owned(),
        client_request_id: trail.client_request_id.clone(),
        kind: RecordKind::Access,
        caller: trail.caller.as_ref().map(|p| Caller {
            subject: p.subject.clone(),
            role: p.role.clone(),
            unit: p.unit.clone(),
            token_id: p.token_id.clone(),
        }),
        client_addr: Some(client.ip().to_string()),
        purpose: trail.purpose.clone(),
        lawful_basis: trail.lawful_basis.take(),
        dataset: trail.dataset.clone(),
        route: trail.route.take(),
        method: crate::audit::record::recorded_method(method),
        path: crate::audit::record::recorded_path(path),
        decision,
        policy_ids: std::mem::take(&mut trail.policy_ids).into_iter().collect(),
        reason,
        status: status.as_u16(),
        subjects: match &unsent {
            _ if disclosed => std::mem::take(&mut trail.subjects),
            // Nothing disclosed: the target of the write not sent, for the subject index.
            Some(target) => {
                let mut s = filter::Subjects::default();
                s.push(target);
                s
            }
            None => filter::Subjects::default(),
        },
        fields: if disclosed {
            std::mem::take(&mut trail.fields).into_iter().collect()
        } else {
            Vec::new()
        },
        fields_by_subject: trail.fields_by_subject.take().filter(|_| disclosed),
        rows_withheld: trail.rows_withheld,
        withheld_target: trail.withheld_target.map(|why| match why {
            // The DPO answering an anonymous elector's or an under-16's request for their
            // data is no attempt on them (`protected_subject` counts `protected`).
            "protected" if trail.subject_access => "protected_in_subject_access".to_owned(),
            why => why.to_owned(),
        }),
        latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        detail: match unsent {
            Some(_) => Some(serde_json::json!({ "write": "not_sent", "written": trail.written })),
            None => trail.detail.take().or_else(|| {
                (!trail.written.is_empty()).then(|| serde_json::json!({ "written": trail.written }))
            }),
        },
    }
}

fn json_response(status: StatusCode, body: Bytes, request_id: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // A browser never reads an answer (a problem echoing a caller's text) as anything but
    // what it says it is.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    resp
}

/// The one place an error becomes a response.
pub fn problem_response(err: &GatewayError, request_id: &str) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&err.problem(request_id)).unwrap_or_default();
    let mut resp = json_response(err.status(), Bytes::from(body), request_id);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    match err {
        GatewayError::Unauthenticated(_) => {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"wardgate\""),
            );
        }
        // RFC 9110 §15.5.6: a 405 lists what the route does accept.
        GatewayError::MethodNotAllowed(allow) => {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        _ => {}
    }
    resp
}
