//! The security console's admin-plane endpoints.
//!
//! - `GET /console`, `/console.js`, `/console.css`: the page itself. It carries no data, so it
//!   needs no token; everything it shows comes from the endpoints below, which it calls with
//!   the bearer token the officer pastes in (held in the page's memory only, never a cookie,
//!   so no other site can make the browser act with it).
//! - `GET /alerts`: the breach log, newest first.
//! - `POST /alerts/{id}/classify` `{"class": "reportable"|"near_miss", "note": "..."}`.
//! - `POST /alerts/{id}/contain` `{"reason": "..."}`: revoke the alert's token on every replica
//!   and record the containment against the alert (a change that did not take, or took here
//!   only, answers as the rights endpoint answers it; both are recorded).
//! - `GET /events?principal=&dataset=&purpose=&decision=&kind=`: the live feed (SSE).
//! - `GET /volumes`: records per principal per minute over the last hour.
//!
//! All but the page need a token with the `security` or `dpo` role that grants the
//! `breach_investigation` purpose, and every call is audited under it (a classification before
//! it is written). Revocation is `POST /revocations` (`rights.rs`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;

use crate::error::GatewayError;
use crate::gateway::{Gateway, problem_response};
use crate::rights::{Under, need_text, read_json, record, refuse};

use super::breach::{BreachError, Class, Classification};
use super::feed::{self, FeedBody};

const PAGE: &str = include_str!("console.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainBody {
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyBody {
    class: Class,
    note: String,
}

/// True if this module answers `path`.
pub fn owns(path: &str) -> bool {
    matches!(
        path,
        "/console" | "/console.js" | "/console.css" | "/alerts" | "/events" | "/volumes"
    ) || path.starts_with("/alerts/")
}

pub async fn handle<B>(gw: &Arc<Gateway>, req: Request<B>, request_id: &str) -> Response<FeedBody>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match (&method, path.as_str()) {
        (&Method::GET, "/console") => return asset(PAGE, "text/html; charset=utf-8"),
        (&Method::GET, "/console.js") => return asset(SCRIPT, "text/javascript; charset=utf-8"),
        (&Method::GET, "/console.css") => return asset(STYLE, "text/css; charset=utf-8"),
        (_, "/console" | "/console.js" | "/console.css") => {
            return boxed(problem_response(
                &GatewayError::MethodNotAllowed("GET"),
                request_id,
            ));
        }
        _ => {}
    }
    let mut trail = crate::gateway::Trail::default();
    // The mirror's freshness is asked once the caller's role and purpose are (a stale
    // mirror's refusal is then recorded under the purpose, and a wrong role is 403 still).
    let principal = match crate::gateway::authenticate_on_mirror(gw, req.headers(), &mut trail) {
        Ok(p) => p,
        Err(e) => {
            return boxed(refuse(gw, trail.caller(), None, &method, &path, e, request_id).await);
        }
    };
    let fail = |e| refuse(gw, Some(&principal), None, &method, &path, e, request_id);
    // Only the admin plane's roles see the console's data.
    if !crate::rights::ADMIN_ROLES.contains(&principal.role.as_str()) {
        let e = GatewayError::Forbidden {
            policy_ids: vec!["admin.console-security-or-dpo".to_owned()],
        };
        return boxed(fail(e).await);
    }
    // Watching the log, judging an alert and containing it are the breach investigation.
    let under = match Under::purpose(gw, &principal, "breach_investigation") {
        Ok(under) => under,
        Err(e) => return boxed(fail(e).await),
    };
    // From here on, failures too are recorded under the purpose.
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
    // Watching, judging and containing all wait for a fresh mirror: containing is a subject's
    // revocation (`Change::taken_on_a_stale_mirror`).
    if let Err(e) = gw.controls.check_fresh() {
        return boxed(fail(e).await);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Only the live feed takes a query (its filter): any other is refused, not passed over.
    if let Some(q) = (req.uri().query()).filter(|q| segments != ["events"] && !q.is_empty()) {
        let e = GatewayError::BadRequest(format!("`?{q}`: `{path}` takes no query"));
        return boxed(fail(e).await);
    }
    // Synced whatever `audit.durability` says: classifying and containing change what the
    // breach log and the controls journal keep through a power cut, and their records must
    // not be lost while they are not (the console's reads are few enough to sync alike). A
    // read gives up on a stalled log (`audit::within`, 503) as the data plane does; a change
    // waits for it, since it must not be logged and then not made.
    let audited = |detail: serde_json::Value| {
        let mut r = record(Some(&principal), &method, &path, request_id);
        under.mark(&mut r);
        r.detail = Some(detail);
        gw.audit.append_synced(r)
    };
    match (&method, segments.as_slice()) {
        (&Method::GET, ["events"]) => {
            let filter = match feed::Filter::parse(req.uri().query()) {
                Ok(f) => f,
                Err(e) => return boxed(fail(e).await),
            };
            let detail = serde_json::json!({ "opened_live_feed": req.uri().query().unwrap_or("") });
            if crate::audit::within(audited(detail)).await.is_err() {
                return boxed(problem_response(
                    &GatewayError::AuditUnavailable,
                    request_id,
                ));
            }
            let (rx, stop) = gw.watch.subscribe();
            let (gw, reader) = (Arc::clone(gw), Arc::clone(&principal));
            let stands: feed::Stands = Box::new(move || {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                crate::gateway::standing(&gw, &reader, now).is_ok()
            });
            let mut resp = Response::new(feed::stream(rx, filter, stop, stands));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            resp
        }
        (&Method::GET, ["alerts"]) => {
            if crate::audit::within(audited(serde_json::json!({ "read_breach_log": true })))
                .await
                .is_err()
            {
                return boxed(problem_response(
                    &GatewayError::AuditUnavailable,
                    request_id,
                ));
            }
            // Up to `ALERTS_KEPT` copied under the log's lock: off the async workers.
            let log = gw.watch.breach.clone();
            let (alerts, older) = match tokio::task::spawn_blocking(move || log.alerts()).await {
                Ok(listed) => listed,
                Err(e) => {
                    return boxed(problem_response(
                        &GatewayError::Internal(e.to_string()),
                        request_id,
                    ));
                }
            };
            json(&serde_json::json!({
                "alerts": alerts,
                "older_in_breach_log": older,
                "report_within_hours": super::breach::REPORT_WITHIN_HOURS,
            }))
        }
        (&Method::GET, ["volumes"]) => {
            if crate::audit::within(audited(serde_json::json!({ "read_volumes": true })))
                .await
                .is_err()
            {
                return boxed(problem_response(
                    &GatewayError::AuditUnavailable,
                    request_id,
                ));
            }
            json(&gw.watch.volumes())
        }
        (&Method::POST, ["alerts", id, "classify"]) => {
            let id = (*id).to_owned();
            let b: ClassifyBody = match read_json(req).await {
                Ok(b) => b,
                Err(e) => return boxed(fail(e).await),
            };
            // The body may have been slow to come: the caller must still stand (not revoked,
            // not ended, its key still trusted) when the alert is acted on, as the mirror that
            // says so must still be fresh (a revocation on another replica meanwhile).
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if let Err(e) =
                crate::gateway::holds(gw, &principal, now).and_then(|()| gw.controls.check_fresh())
            {
                return boxed(fail(e).await);
            }
            if let Err(e) = need_text("note", &b.note) {
                return boxed(fail(e).await);
            }
            match find_alert(gw, &id).await {
                // Nobody judges an alert about themselves: a security officer or the DPO who
                // set off `volume` could otherwise call it a near miss, and it would leave the
                // open list and its 72 hours unreported.
                Ok(Some(alert))
                    if alert
                        .principal
                        .as_ref()
                        .is_some_and(|c| c.subject == principal.subject) =>
                {
                    let e = GatewayError::Forbidden {
                        policy_ids: vec!["admin.console-not-own-alert".to_owned()],
                    };
                    return boxed(fail(e).await);
                }
                Ok(Some(_)) => {}
                Ok(None) => return boxed(fail(GatewayError::NotFound).await),
                Err(e) => return boxed(fail(e).await),
            }
            let classification = Classification {
                class: b.class,
                note: b.note,
                by: principal.subject.clone(),
                role: principal.role.clone(),
                at: crate::audit::AuditRecord::now_ts(),
            };
            let detail =
                serde_json::json!({ "classified_alert": id, "classification": classification });
            if audited(detail).await.is_err() {
                return boxed(problem_response(
                    &GatewayError::AuditUnavailable,
                    request_id,
                ));
            }
            let log = gw.watch.breach.clone();
            let alert_id = id.clone();
            let written =
                tokio::task::spawn_blocking(move || log.classify(&id, classification)).await;
            match written {
                Ok(Ok(alert)) => {
                    gw.watch.publish(super::alert_event(
                        "alert",
                        &alert.key,
                        serde_json::to_string(&alert).unwrap_or_default(),
                    ));
                    json(&alert)
                }
                Ok(Err(BreachError::NotFound(_))) => {
                    boxed(problem_response(&GatewayError::NotFound, request_id))
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "classification not written to the breach log");
                    // Its record stands, synced: a second under the same request id says it
                    // was not made, as a rights change that did not take is said.
                    let refused = GatewayError::BreachLogUnavailable { made: false };
                    let mut r = record(Some(&principal), &method, &path, request_id);
                    under.mark(&mut r);
                    r.decision = crate::audit::Decision::Error;
                    r.status = refused.status().as_u16();
                    r.reason = Some(refused.code().to_owned());
                    r.detail = Some(serde_json::json!({
                        "classified_alert": alert_id, "not_made": refused.code(),
                    }));
                    if gw.audit.append_synced(r).await.is_err() {
                        tracing::error!(alert = %alert_id, "the record that a classification was not made was not written");
                    }
                    boxed(problem_response(&refused, request_id))
                }
                Err(e) => boxed(problem_response(
                    &GatewayError::Internal(e.to_string()),
                    request_id,
                )),
            }
        }
        (&Method::POST, ["alerts", id, "contain"]) => {
            let id = (*id).to_owned();
            let b: ContainBody = match read_json(req).await {
                Ok(b) => b,
                Err(e) => return boxed(fail(e).await),
            };
            // The body may have been slow to come: the caller must still stand (not revoked,
            // not ended, its key still trusted) when the alert is acted on, as the mirror that
            // says so must still be fresh (a revocation on another replica meanwhile).
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if let Err(e) =
                crate::gateway::holds(gw, &principal, now).and_then(|()| gw.controls.check_fresh())
            {
                return boxed(fail(e).await);
            }
            if let Err(e) = need_text("reason", &b.reason) {
                return boxed(fail(e).await);
            }
            let alert = match find_alert(gw, &id).await {
                Ok(Some(alert)) => alert,
                Ok(None) => return boxed(fail(GatewayError::NotFound).await),
                Err(e) => return boxed(fail(e).await),
            };
            let Some(caller) = alert.principal.clone() else {
                let e = GatewayError::BadRequest(
                    "the alert names no caller (it was not authenticated)".to_owned(),
                );
                return boxed(fail(e).await);
            };
            let reason = format!("alert {id}: {}", b.reason);
            let event = super::containment(&caller, &principal.subject, &reason);
            let detail = serde_json::json!({ "contained_alert": id, "change": event });
            if audited(detail).await.is_err() {
                return boxed(problem_response(
                    &GatewayError::AuditUnavailable,
                    request_id,
                ));
            }
            let done = gw.controls.record(event).await;
            let outcome = super::outcome(&done);
            // Answered as the rights endpoint answers a change that did not take everywhere.
            if let Err(e) = &done {
                tracing::error!(alert = %id, error = %e, "containment did not reach every replica");
            }
            // The breach log shows every attempt, as it does automatic ones (one that did not
            // take never in place of one that did: `BreachLog::contain`).
            let contained = super::record_containment(gw, &id, &caller, outcome).await;
            match (done, contained) {
                (Err(e), _) => boxed(fail(e.answer()).await),
                (Ok(()), Some(alert)) => json(&alert),
                // Revoked everywhere: only the alert's note of it is missing.
                (Ok(()), None) => boxed(problem_response(
                    &GatewayError::BreachLogUnavailable { made: true },
                    request_id,
                )),
            }
        }
        (_, ["events"] | ["alerts"] | ["volumes"]) => {
            boxed(fail(GatewayError::MethodNotAllowed("GET")).await)
        }
        (_, ["alerts", _, "classify" | "contain"]) => {
            boxed(fail(GatewayError::MethodNotAllowed("POST")).await)
        }
        _ => boxed(fail(GatewayError::RouteNotFound).await),
    }
}

/// The alert `id` as it stands (an older one is read from the breach log file, off the async
/// workers); a log that cannot be read answers as one that cannot be written.
async fn find_alert(gw: &Gateway, id: &str) -> Result<Option<super::breach::Alert>, GatewayError> {
    let log = gw.watch.breach.clone();
    let id = id.to_owned();
    match tokio::task::spawn_blocking(move || log.alert(&id)).await {
        Ok(Ok(alert)) => Ok(alert),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the breach log cannot be read");
            Err(GatewayError::AuditUnavailable)
        }
        Err(e) => Err(GatewayError::Internal(e.to_string())),
    }
}

/// A buffered response as the admin plane's body type.
pub fn boxed(resp: Response<Full<Bytes>>) -> Response<FeedBody> {
    resp.map(|b| b.map_err(|never: Infallible| match never {}).boxed_unsync())
}

fn json<T: serde::Serialize>(v: &T) -> Response<FeedBody> {
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(v).unwrap_or_default(),
    )));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    boxed(resp)
}

fn asset(body: &'static str, content_type: &'static str) -> Response<FeedBody> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    boxed(resp)
}
