//! The admin plane's rights and revocation endpoints: who may change the shared controls, and
//! the audit record of every change.
//!
//! `GET /rights/{subject}` and `POST /rights/{subject}` (place) and `POST /rights/{subject}/lift`
//! are the data protection officer's; `POST /revocations` is the DPO's and the security team's.
//! Callers authenticate with the same bearer tokens as the data plane. Every change is written
//! to the audit log, with who made it and why, *before* it takes effect: if the log cannot be
//! written the change is refused (503), so no change is ever unlogged. Reads of the register are
//! audited too (the register is itself personal data).
//!
//! Each action also serves one purpose of the catalogue (`ADMIN_PURPOSES`), which the caller's
//! token must grant, as on the data plane: a subject access report `sar_fulfilment`, placing or
//! lifting an erasure request `erasure`, any other flag (and reading the register)
//! `restriction`, a revocation `breach_investigation`. Its audit records name that purpose and
//! its lawful basis: reading the log and the register is processing personal data too.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;

use crate::audit::{AuditRecord, Caller, Decision, RecordKind};
use crate::auth::Principal;
use crate::controls::{Change, Event, KINDS, stamp};
use crate::error::GatewayError;
use crate::gateway::{Gateway, problem_response};
use crate::routes::subject_id;

/// Subject access reports are built one at a time (`Action::Report`).
static ONE_REPORT_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Changes to the shared controls made through this module, one at a time (`handle`).
static ONE_CHANGE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MAX_BODY: usize = 16 * 1024;

/// The purposes the admin plane acts under; the catalogue must define them (`startup::check`).
pub const ADMIN_PURPOSES: [&str; 4] = [
    "sar_fulfilment",
    "erasure",
    "restriction",
    "breach_investigation",
];

/// The roles the admin plane answers to: the DPO (rights requests, subject access, the
/// console) and the security team (the console); the catalogue must define them
/// (`startup::check`).
pub const ADMIN_ROLES: [&str; 2] = ["dpo", "security"];

/// The purpose an admin action serves and its lawful basis, once the caller's token is known
/// to grant it: stamped on the action's audit records.
pub(crate) struct Under {
    purpose: &'static str,
    lawful_basis: Option<String>,
}

impl Under {
    /// Checks that `p`'s token grants `purpose` (403 `purpose_not_granted` otherwise).
    pub(crate) fn purpose(
        gw: &Gateway,
        p: &Principal,
        purpose: &'static str,
    ) -> Result<Under, GatewayError> {
        if !p.purposes.iter().any(|g| g == purpose) {
            return Err(GatewayError::PurposeNotGranted(purpose.to_owned()));
        }
        Ok(Under {
            purpose,
            lawful_basis: lawful_basis(gw, purpose),
        })
    }

    pub(crate) fn mark(&self, r: &mut AuditRecord) {
        r.purpose = Some(self.purpose.to_owned());
        r.lawful_basis.clone_from(&self.lawful_basis);
    }
}

/// The catalogue's lawful basis for `purpose`.
fn lawful_basis(gw: &Gateway, purpose: &str) -> Option<String> {
    gw.catalog
        .purposes
        .get(purpose)
        .map(|p| p.lawful_basis.clone())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Placement {
    kind: String,
    reference: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revocation {
    token_id: Option<String>,
    subject: Option<String>,
    reason: String,
}

/// True if this module answers `path`.
pub fn owns(path: &str) -> bool {
    path.starts_with("/rights/") || path.starts_with("/sar/") || path == "/revocations"
}

pub async fn handle<B>(
    gw: &std::sync::Arc<Gateway>,
    req: Request<B>,
    request_id: &str,
) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let authorization = req.headers().get(header::AUTHORIZATION).cloned();
    let mut trail = crate::gateway::Trail::default();
    let principal = match crate::gateway::authenticate_on_mirror(gw, req.headers(), &mut trail) {
        Ok(p) => p,
        Err(e) => return refuse(gw, trail.caller(), None, &method, &path, e, request_id).await,
    };
    let channels = &gw.catalog.words.consent_channels;
    let query = req
        .uri()
        .query()
        .filter(|q| !q.is_empty())
        .map(str::to_owned);
    let routed = route(&principal, req, &method, &path, channels).await;
    // Whom a placement holds (`held_by`), asked before the checks below: the caller's
    // standing and the register must hold when the change is made, and nothing slow may
    // come between them and it.
    let held = match &routed {
        Ok((
            Action::Change(Event {
                change: Change::Place { subject, .. },
                ..
            }),
            purpose,
        )) if query.is_none() && Under::purpose(gw, &principal, purpose).is_ok() => {
            Some((subject.clone(), held_by(gw, subject, request_id).await))
        }
        _ => None,
    };
    // One change at a time on this replica, from its checks (the caller still stands, a
    // reference is or is not in force) until it is made: two placements under one reference
    // sent at once would otherwise both pass the check, and merge.
    let _changing = match &routed {
        Ok((Action::Change(_), _)) => Some(ONE_CHANGE_AT_A_TIME.lock().await),
        _ => None,
    };
    let outcome = routed.and_then(|(action, purpose)| {
        // Only a subject access report takes a query (`format`): any other is a mistake
        // (a filter its caller thinks applies, a format the answer does not come in),
        // refused, not passed over. Asked once the route's role is (a caller without it
        // is refused access, as breach detection counts).
        if let Some(q) = query
            .as_deref()
            .filter(|_| !matches!(action, Action::Report { .. }))
        {
            return Err(GatewayError::BadRequest(format!(
                "`?{q}`: `{path}` takes no query"
            )));
        }
        // The body may have been slow to come: the caller must still stand (not revoked,
        // not ended, its key still trusted) when the change is made.
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        crate::gateway::holds(gw, &principal, now)?;
        // A restriction or a token's revocation holds here at once, and reaches the other
        // replicas when Redis is back (README: Shared controls); anything else waits for
        // a fresh mirror (`Change::taken_on_a_stale_mirror`).
        if !matches!(&action, Action::Change(e) if e.change.taken_on_a_stale_mirror()) {
            gw.controls.check_fresh()?;
        }
        // The purpose first: a lift's refusal names the references in force, which only
        // a caller who may read the register (`restriction`) is told.
        let under = Under::purpose(gw, &principal, purpose)?;
        // A lift ends one request: it must name one in force, by its reference, so that
        // lifting one (a settled dispute) never lifts another of the same kind (a pending
        // objection).
        // A placement under a reference in force for that subject and kind would merge
        // two requests into one, both ended by one lift. Asked of a fresh mirror only: a
        // stale one may hold as in force a restriction another replica has lifted
        // meanwhile, and the DPO, told it is in force, would not place it again while every
        // other replica disclosed the record (a placement is taken on a stale mirror).
        if let Action::Change(Event {
            change:
                Change::Place {
                    subject,
                    kind,
                    reference,
                },
            ..
        }) = &action
            && gw.controls.check_fresh().is_ok()
            && (gw.controls.references_in_force(subject, kind)).contains(reference)
        {
            return Err(GatewayError::AlreadyInForce(format!(
                "a `{kind}` restriction on `{subject}` with the reference `{reference}` is \
                     in force already: give a new request its own reference"
            )));
        }
        if let Action::Change(Event {
            change:
                Change::Lift {
                    subject,
                    kind,
                    reference,
                    ..
                },
            ..
        }) = &action
        {
            let in_force = gw.controls.references_in_force(subject, kind);
            if !in_force.contains(reference) {
                // The references in force are the register's, which only a caller who
                // may read it is told (an erasure's lift is under `erasure`).
                let may_read = principal.purposes.iter().any(|p| p == "restriction");
                return Err(GatewayError::NotInForce(match in_force.is_empty() {
                    // Whether any is in force at all is the register's too.
                    _ if !may_read => format!(
                        "no `{kind}` restriction on `{subject}` has the reference \
                             `{reference}`"
                    ),
                    true => format!("no `{kind}` restriction is in force on `{subject}`"),
                    false => format!(
                        "no `{kind}` restriction on `{subject}` has the reference \
                             `{reference}`; those in force: `{}`",
                        in_force.join("`, `")
                    ),
                }));
            }
        }
        Ok((action, under))
    });
    let (action, under) = match outcome {
        Ok(acting) => acting,
        Err(e) => {
            return refuse(gw, Some(&principal), None, &method, &path, e, request_id).await;
        }
    };
    let at = Place {
        gw,
        p: &principal,
        method: &method,
        path: &path,
        request_id,
        under: &under,
    };
    match action {
        Action::Read(subject) => {
            let body = serde_json::json!({ "subject": subject, "restrictions": gw.controls.placements(&subject) });
            let detail = serde_json::json!({ "read_register_of": subject });
            respond(&at, detail, None, body).await
        }
        Action::Report { subject, html } => {
            let fail = |e| {
                refuse(
                    gw,
                    Some(&principal),
                    Some(&under),
                    &method,
                    &path,
                    e,
                    request_id,
                )
            };
            // Reading the log is file work that can take a while over years of it: off the
            // async workers, which serve the data plane too, and one report at a time (a
            // second waits its turn), so that a double click or a client's retries cannot
            // take the gateway's cores or memory from its callers.
            let built = {
                // The turn goes with the build, not with this handler: a client that hangs up
                // and asks again waits for the build it left behind.
                let turn = ONE_REPORT_AT_A_TIME.acquire().await;
                let (at, who) = (std::sync::Arc::clone(gw), subject.clone());
                let placements = gw.controls.placements(&subject);
                tokio::task::spawn_blocking(move || {
                    let _turn = turn;
                    crate::sar::build(&at.audit_dir, &at.catalog, &who, placements)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            };
            // Each fetch of the current data is recorded as disclosed to the DPO: should the
            // report not leave, `Unsent` says so of each (the caller gone included).
            let mut unsent = Unsent {
                gw,
                principal: &principal,
                under: &under,
                subject: &subject,
                fetches: Vec::new(),
                why: GatewayError::ClientClosed,
            };
            let report = match built {
                Ok(mut r) => {
                    (r.current_data, r.current_data_missing) = current_data(
                        gw,
                        &subject,
                        authorization.as_ref(),
                        request_id,
                        &mut unsent.fetches,
                    )
                    .await;
                    r.add_held(&gw.catalog);
                    r.other_replicas_not_searched = gw.controls.shared();
                    r
                }
                Err(e) => {
                    tracing::error!(error = %e, "subject access report failed");
                    return fail(GatewayError::Internal(e.to_string())).await;
                }
            };
            // Building it read the whole log and every datastore: the caller must still stand,
            // as the mirror that says so must still be fresh (a revocation on another replica
            // meanwhile).
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if let Err(e) =
                crate::gateway::holds(gw, &principal, now).and_then(|()| gw.controls.check_fresh())
            {
                unsent.why = e.clone();
                return fail(e).await;
            }
            let detail = serde_json::json!({ "subject_access_report_for": subject, "disclosures": report.disclosures.len() });
            let mut r = record(Some(&principal), &method, &path, request_id);
            under.mark(&mut r);
            r.detail = Some(detail);
            if gw.audit.append_within(r).await.is_err() {
                unsent.why = GatewayError::AuditUnavailable;
                return problem_response(&GatewayError::AuditUnavailable, request_id);
            }
            // It leaves (a client gone now has had its record made: the report is its).
            unsent.fetches.clear();
            let (body, ct) = if html {
                (
                    crate::sar::html(&report).into_bytes(),
                    "text/html; charset=utf-8",
                )
            } else {
                (
                    serde_json::to_vec_pretty(&report).unwrap_or_default(),
                    "application/json",
                )
            };
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
            h.insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            // The report carries a datastore's values: should one ever reach the page
            // unescaped, it runs nothing, loads nothing and is framed nowhere.
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                http::HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; \
                     base-uri 'none'; form-action 'none'",
                ),
            );
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                http::HeaderValue::from_static("nosniff"),
            );
            h.insert(
                header::REFERRER_POLICY,
                http::HeaderValue::from_static("no-referrer"),
            );
            resp
        }
        Action::Change(mut event) => {
            gw.controls.order_after_latest(&mut event);
            let mut detail = serde_json::to_value(&event).unwrap_or_default();
            // The event's id only: who it is about and why are in the audit record, not in a
            // server log without its retention or protection.
            tracing::info!(by = %principal.subject, event = %event.id, "shared controls change requested");
            let mut body = serde_json::json!({ "recorded": event });
            // Whom a placement holds: an id no datastore holds (`VF-1` for `VF-0000001`)
            // holds nobody, and the DPO must be told so, not left to think the person's
            // processing restricted. It is placed all the same (the record may come).
            if let Some((subject, held)) = held {
                if held.values().all(|h| h == crate::sar::NOTHING_HELD) {
                    body["warning"] = serde_json::Value::from(format!(
                        "no datastore holds a record under `{subject}`: the placement holds \
                         nobody until one does (is the id right?)"
                    ));
                }
                detail["held"] = serde_json::json!(held);
                body["held"] = serde_json::json!(held);
            }
            respond(&at, detail, Some(event), body).await
        }
    }
}

enum Action {
    Read(String),
    Report { subject: String, html: bool },
    Change(Event),
}

/// The action asked for and the purpose it serves.
/// Whether the register takes `kind`: one of its own, or the withdrawal of consent on a
/// channel the asset register adds (`[words] consent_channels`), which the filter honours as
/// it does the register's own (§10.3.7).
fn kind_known(kind: &str, channels: &[String]) -> bool {
    KINDS.contains(&kind)
        || (kind.strip_prefix("consent_withdrawn_"))
            .is_some_and(|ch| channels.iter().any(|c| c == ch))
}

async fn route<B>(
    p: &Principal,
    req: Request<B>,
    method: &Method,
    path: &str,
    channels: &[String],
) -> Result<(Action, &'static str), GatewayError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let forbidden = |id: &str| GatewayError::Forbidden {
        policy_ids: vec![id.to_owned()],
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["rights", subject]) if subject_id(subject) => {
            if p.role != "dpo" {
                return Err(forbidden("admin.rights-dpo-only"));
            }
            Ok((Action::Read((*subject).to_owned()), "restriction"))
        }
        (&Method::GET, ["sar", subject]) if subject_id(subject) => {
            if p.role != "dpo" {
                return Err(forbidden("admin.sar-dpo-only"));
            }
            // One query only, said exactly: a report asked for in a format it does not come in
            // (`?format=xml`) is an error, not the JSON one.
            let html = match req.uri().query() {
                None | Some("" | "format=json") => false,
                Some("format=html") => true,
                Some(q) => {
                    return Err(GatewayError::BadRequest(format!(
                        "`?{q}`: a subject access report takes `format=html` or \
                         `format=json` (the default), and nothing else"
                    )));
                }
            };
            Ok((
                Action::Report {
                    subject: (*subject).to_owned(),
                    html,
                },
                "sar_fulfilment",
            ))
        }
        (&Method::POST, ["rights", subject, rest @ ..])
            if subject_id(subject) && matches!(rest, [] | ["lift"]) =>
        {
            if p.role != "dpo" {
                return Err(forbidden("admin.rights-dpo-only"));
            }
            let b: Placement = read_json(req).await?;
            if !kind_known(&b.kind, channels) {
                let withdrawals = channels.iter().map(|ch| format!("consent_withdrawn_{ch}"));
                let kinds: Vec<String> = (KINDS.iter().map(|k| (*k).to_owned()))
                    .chain(withdrawals)
                    .collect();
                return Err(GatewayError::BadRequest(format!(
                    "`{}` is not a restriction kind; use one of {kinds:?}",
                    b.kind
                )));
            }
            need_text("reference", &b.reference)?;
            need_text("reason", &b.reason)?;
            let purpose = if b.kind == "erasure_requested" {
                "erasure"
            } else {
                "restriction"
            };
            let subject = (*subject).to_owned();
            let change = if rest.is_empty() {
                Change::Place {
                    subject,
                    kind: b.kind,
                    reference: b.reference,
                }
            } else {
                Change::Lift {
                    subject,
                    kind: b.kind,
                    reference: b.reference,
                    exact: true,
                }
            };
            Ok((Action::Change(event(p, b.reason, change)), purpose))
        }
        (&Method::POST, ["revocations"]) => {
            if p.role != "dpo" && p.role != "security" {
                return Err(forbidden("admin.revocation-dpo-or-security"));
            }
            let b: Revocation = read_json(req).await?;
            need_text("reason", &b.reason)?;
            let change = match (b.token_id, b.subject) {
                (Some(t), None) if crate::auth::revocable_id(&t) => {
                    Change::RevokeToken { token_id: t }
                }
                (None, Some(s)) if crate::auth::revocable_id(&s) => {
                    Change::RevokeSubject { subject: s }
                }
                _ => {
                    return Err(GatewayError::BadRequest(
                        "give exactly one of `token_id` or `subject` (not blank, at most 256 \
                         bytes, as the audit record's `caller` names them: with the issuer's \
                         subject prefix, if it has one)"
                            .to_owned(),
                    ));
                }
            };
            Ok((
                Action::Change(event(p, b.reason, change)),
                "breach_investigation",
            ))
        }
        (_, ["rights" | "sar", subject, ..]) if !subject_id(subject) => {
            Err(GatewayError::BadRequest(
                "not a subject id: letters, digits, `-` and `_`, at most 64, and not `export` \
                 or `aggregate`"
                    .to_owned(),
            ))
        }
        (_, ["rights", _]) => Err(GatewayError::MethodNotAllowed("GET, POST")),
        (_, ["sar", _]) => Err(GatewayError::MethodNotAllowed("GET")),
        (_, ["rights", _, "lift"] | ["revocations"]) => Err(GatewayError::MethodNotAllowed("POST")),
        (_, ["rights" | "sar", ..]) => Err(GatewayError::RouteNotFound),
        _ => Err(GatewayError::RouteNotFound),
    }
}

/// How long `held_by` waits for each datastore.
const HELD_BY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether each datastore holds a record under `subject`: a read by id asked of the
/// datastore directly, of which nothing is kept or shown but whether it answered a record
/// under that id (`held`), none (`nothing held`), or why that could not be told.
async fn held_by(
    gw: &Gateway,
    subject: &str,
    request_id: &str,
) -> std::collections::BTreeMap<String, String> {
    let asks = (gw.catalog.datasets.iter()).filter_map(|(name, dataset)| {
        let upstream = gw.upstreams.get(name)?;
        let (path, envelope) = crate::dialect::read(&upstream.dialect, dataset, subject);
        Some(async move {
            // A datastore slow to answer holds the placement up this long at most (all are
            // asked at once).
            let asked = upstream.send(Method::GET, &path, None, request_id);
            let answer = tokio::time::timeout(HELD_BY_WITHIN, asked)
                .await
                .unwrap_or(Err(GatewayError::UpstreamTimeout));
            let said = match answer {
                Ok(r) if r.status == StatusCode::NOT_FOUND => crate::sar::NOTHING_HELD.to_owned(),
                Ok(r) if r.status == StatusCode::OK => {
                    let id =
                        (r.body.ok()).and_then(|b| crate::filter::single_id(&b, envelope, dataset));
                    match id {
                        // Ids are matched as the register matches them: a datastore that
                        // ignores case answers `VF-0000001` for `vf-0000001`.
                        Some(id) if id.eq_ignore_ascii_case(subject) => "held".to_owned(),
                        Some(_) => crate::sar::NOTHING_HELD.to_owned(),
                        None => "not told: the answer holds no record under an id".to_owned(),
                    }
                }
                Ok(r) => format!("not told: status {}", r.status.as_u16()),
                Err(e) => format!("not told: {}", e.code()),
            };
            (name.clone(), said)
        })
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .collect()
}

/// The subject's records as held now, fetched through the data plane's own pipeline with the
/// DPO's token under `sar_fulfilment`, so each fetch is authorized and audited like any other.
async fn current_data(
    gw: &std::sync::Arc<Gateway>,
    subject: &str,
    authorization: Option<&http::HeaderValue>,
    request_id: &str,
    fetched: &mut Vec<Fetch>,
) -> (
    std::collections::BTreeMap<String, serde_json::Value>,
    std::collections::BTreeMap<String, String>,
) {
    let (mut out, mut missing) = Default::default();
    let Some(auth) = authorization else {
        return (out, missing);
    };
    for (name, dataset) in &gw.catalog.datasets {
        // Sent as a caller's request id: the fetch's record keeps it (`client_request_id`),
        // naming the admin request it serves (dataset names are short, so it stays within
        // the 64 characters kept).
        let path = format!("/{name}/{}/{subject}", dataset.collection);
        // Only ever a read of that one record (`routes::subject_id` keeps route words out).
        let read = crate::routes::resolve(&gw.catalog, &Method::GET, &path, None);
        if !matches!(read, Ok(r) if matches!(r.kind, crate::routes::RouteKind::Read { .. })) {
            continue;
        }
        let req = Request::get(&path)
            .header(header::AUTHORIZATION, auth.clone())
            .header("x-purpose", "sar_fulfilment")
            .header("x-request-id", format!("{request_id}-{name}"))
            .body(http_body_util::Empty::<Bytes>::new());
        let Ok(mut req) = req else { continue };
        // Noted before it is asked: a caller who leaves while the read waits for its record
        // (durable then, as disclosed) drops this report there, and `Unsent` must know of it.
        // One that ends in anything but the record is not a disclosure, and is forgotten.
        let fetch_id = crate::gateway::new_request_id();
        req.extensions_mut()
            .insert(crate::gateway::SubjectAccessFetch {
                request_id: fetch_id.clone(),
            });
        fetched.push(Fetch {
            request_id: fetch_id,
            path: path.clone(),
            dataset: name.clone(),
        });
        // The DPO's own address (the admin request's), not the loopback.
        let peer = crate::admin::PEER
            .try_with(|p| *p)
            .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let resp = crate::gateway::handle(gw, req, peer).await;
        let status = resp.status();
        if status != StatusCode::OK {
            fetched.pop();
        }
        let withheld = resp.extensions().get::<crate::gateway::Withheld>().copied();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        let v = body
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        match (status, v, withheld) {
            (StatusCode::OK, Some(v), _) => {
                out.insert(name.clone(), v["record"].clone());
            }
            // The datastore answered with another person's record: nothing is known to be
            // held under this id, and what it answered is not this person's to be sent.
            (
                StatusCode::NOT_FOUND,
                _,
                Some(crate::gateway::Withheld("answered_under_another_id")),
            ) => {
                missing.insert(name.clone(), crate::sar::NOT_READ_ANOTHER_ID.to_owned());
            }
            // The datastore would not answer for the id (a record it keeps under a rights
            // request, or the gateway's credential refused): not known to be held or not.
            (
                StatusCode::NOT_FOUND,
                _,
                Some(crate::gateway::Withheld(
                    why @ (crate::gateway::REFUSED_403
                    | crate::gateway::REFUSED_410
                    | crate::gateway::REFUSED_451),
                )),
            ) => {
                let status = why.trim_start_matches("refused_by_datastore_");
                missing.insert(
                    name.clone(),
                    format!("not told: the datastore refused the read (status {status}); ask it"),
                );
            }
            // Held, but not disclosed even here: an anonymous elector's or an under-16's
            // entry, or one the filter cannot read (the datastore has it; fetch it there).
            (StatusCode::NOT_FOUND, _, Some(crate::gateway::Withheld(why))) => {
                missing.insert(name.clone(), format!("held, withheld ({why})"));
            }
            (StatusCode::NOT_FOUND, _, None) => {
                missing.insert(name.clone(), crate::sar::NOTHING_HELD.to_owned());
            }
            // Refused or failed: said, so that the report is not read as "nothing held".
            (_, v, _) => {
                let why = v
                    .as_ref()
                    .and_then(|v| v["type"].as_str())
                    .and_then(|t| t.strip_prefix("urn:wardgate:problem:"))
                    .map_or_else(|| format!("status {}", status.as_u16()), str::to_owned);
                missing.insert(name.clone(), why);
            }
        }
    }
    (out, missing)
}

fn event(p: &Principal, reason: String, change: Change) -> Event {
    let (id, at) = stamp();
    Event {
        id,
        at,
        by: p.subject.clone(),
        reason,
        change,
    }
}

pub(crate) fn need_text(name: &str, v: &str) -> Result<(), GatewayError> {
    if v.trim().is_empty() || v.len() > 2000 {
        return Err(GatewayError::BadRequest(format!(
            "`{name}` is required (at most 2000 characters)"
        )));
    }
    Ok(())
}

pub(crate) async fn read_json<T: serde::de::DeserializeOwned, B>(
    req: Request<B>,
) -> Result<T, GatewayError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // JSON only, said so (415 otherwise), as on the data plane: a browser sends a cross-site
    // form or a `text/plain` fetch without asking first, and a proxy that turns a session
    // cookie into the bearer token would then let any page revoke the security team.
    if !crate::writes::says_json(req.headers()) {
        return Err(GatewayError::UnsupportedMediaType);
    }
    // The data plane's reader: the same size refusal, and the same deadline.
    let bytes = crate::writes::read_body(req, MAX_BODY).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::BadRequest(format!("the body is not the expected JSON: {e}")))
}

/// A read of a subject's current data made for their report, recorded as disclosed.
struct Fetch {
    request_id: String,
    path: String,
    dataset: String,
}

/// The fetches of a report's current data (`current_data`) whose report has not left: each
/// was recorded as disclosed to the DPO, so each gets, when this is dropped, a second record
/// under its request id saying it did not leave and why (as `gateway::held_back`'s do, which
/// a subject access report reads), rather than be listed as a disclosure in the next report.
/// Queued without waiting, as a drop must (`AuditLog::queue_detached`); emptied once the
/// report's own record is durable.
struct Unsent<'a> {
    gw: &'a Gateway,
    principal: &'a Principal,
    under: &'a Under,
    subject: &'a str,
    fetches: Vec<Fetch>,
    /// Why it did not leave (the caller gone, unless a check or the log failed).
    why: GatewayError,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        for fetch in self.fetches.drain(..) {
            let mut r = record(
                Some(self.principal),
                &Method::GET,
                &fetch.path,
                &fetch.request_id,
            );
            self.under.mark(&mut r);
            r.kind = RecordKind::Access;
            r.route = None;
            r.dataset = Some(fetch.dataset);
            r.decision = Decision::Error;
            r.status = self.why.status().as_u16();
            r.reason = Some(self.why.code().to_owned());
            r.detail = Some(serde_json::json!({
                "withheld_after_recording": "subject_access_report_not_sent",
            }));
            r.subjects.push(self.subject);
            self.gw.audit.queue_detached(r);
        }
    }
}

pub(crate) fn record(
    p: Option<&Principal>,
    method: &Method,
    path: &str,
    request_id: &str,
) -> AuditRecord {
    AuditRecord {
        ts: AuditRecord::now_ts(),
        request_id: request_id.to_owned(),
        client_request_id: None,
        kind: RecordKind::Admin,
        caller: p.map(|p| Caller {
            subject: p.subject.clone(),
            role: p.role.clone(),
            unit: p.unit.clone(),
            token_id: p.token_id.clone(),
        }),
        client_addr: crate::admin::peer(),
        purpose: None,
        lawful_basis: None,
        dataset: None,
        route: Some(format!(
            "admin{}",
            path.split('/').take(2).collect::<Vec<_>>().join(".")
        )),
        method: crate::audit::record::recorded_method(method),
        path: crate::audit::record::recorded_path(path),
        decision: Decision::Allow,
        policy_ids: Vec::new(),
        reason: None,
        status: 200,
        subjects: Default::default(),
        fields: Vec::new(),
        fields_by_subject: None,
        rows_withheld: 0,
        withheld_target: None,
        latency_us: 0,
        detail: None,
    }
}

/// Records and answers a refusal or failure: under the action's purpose once it is granted
/// (`under`), or naming the purpose the token did not grant.
pub(crate) async fn refuse(
    gw: &Gateway,
    p: Option<&Principal>,
    under: Option<&Under>,
    method: &Method,
    path: &str,
    e: GatewayError,
    request_id: &str,
) -> Response<Full<Bytes>> {
    let mut r = record(p, method, path, request_id);
    match (under, &e) {
        (Some(under), _) => under.mark(&mut r),
        (None, GatewayError::PurposeNotGranted(purpose)) => {
            r.lawful_basis = lawful_basis(gw, purpose);
            r.purpose = Some(purpose.clone());
        }
        (None, _) => {}
    }
    r.decision = match e {
        GatewayError::Unauthenticated(_)
        | GatewayError::Forbidden { .. }
        | GatewayError::PurposeNotGranted(_) => Decision::Deny,
        _ => Decision::Error,
    };
    r.reason = Some(e.code().to_owned());
    r.status = e.status().as_u16();
    if let GatewayError::Forbidden { policy_ids } = &e {
        r.policy_ids = policy_ids.clone();
    }
    // Bounded (a stalled disk), but for the answer to a change that was made here or not at
    // all (`controls-not-shared`, `controls-not-recorded`): that answer waits as the change's
    // own record did, rather than read as if nothing had been done.
    let appended = match e {
        GatewayError::ControlsNotShared | GatewayError::ControlsNotRecorded => {
            gw.audit.append(r).await
        }
        _ => gw.audit.append_within(r).await,
    };
    match appended {
        Ok(_) => problem_response(&e, request_id),
        Err(_) => problem_response(&GatewayError::AuditUnavailable, request_id),
    }
}

/// An admin request under way: who, what and why, for its records.
struct Place<'a> {
    gw: &'a Gateway,
    p: &'a Principal,
    method: &'a Method,
    path: &'a str,
    request_id: &'a str,
    under: &'a Under,
}

/// Audit first, then apply: a change that cannot be logged does not happen.
async fn respond(
    at: &Place<'_>,
    detail: serde_json::Value,
    change: Option<Event>,
    body: serde_json::Value,
) -> Response<Full<Bytes>> {
    let Place {
        gw,
        p,
        method,
        path,
        request_id,
        under,
    } = *at;
    let mut r = record(Some(p), method, path, request_id);
    under.mark(&mut r);
    r.detail = Some(detail);
    // A change is synced to disk whatever `audit.durability` says: the controls journal keeps
    // it through a power cut, and its record (who, why) must not be lost while it is not.
    let appended = match change {
        Some(_) => gw.audit.append_synced(r).await,
        // A read: answered 503 rather than held while the log's disk hangs.
        None => gw.audit.append_within(r).await,
    };
    if appended.is_err() {
        return problem_response(&GatewayError::AuditUnavailable, request_id);
    }
    if let Some(event) = change
        && let Err(e) = gw.controls.record(event).await
    {
        tracing::error!(error = %e, request_id, "control change did not reach every replica");
        let answer = e.answer();
        let mut failed = record(Some(p), method, path, request_id);
        under.mark(&mut failed);
        failed.decision = Decision::Error;
        failed.status = 503;
        failed.reason = Some(answer.code().to_owned());
        let _ = gw.audit.append(failed).await;
        return problem_response(&answer, request_id);
    }
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&body).unwrap_or_default(),
    )));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A channel the asset register adds is one whose consent can be withdrawn through the
    /// register, as the built-in ones are; one it does not add is not a kind.
    #[test]
    fn consent_on_a_catalogue_channel_can_be_withdrawn() {
        let post = vec!["post".to_owned()];
        assert!(kind_known("consent_withdrawn_post", &post));
        assert!(!kind_known("consent_withdrawn_post", &[]));
        assert!(!kind_known("consent_withdrawn_fax", &post));
        assert!(!kind_known("consent_withdrawn_", &post));
        for kind in KINDS {
            assert!(kind_known(kind, &[]), "{kind}");
        }
        assert!(!kind_known("post", &post));
    }
}
