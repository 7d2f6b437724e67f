//! The admin plane: health, readiness and Prometheus metrics, on its own listener.
//!
//! It listens separately from the data plane (loopback by default) so that probes and scrapes
//! never share a port, a TLS setup or a failure mode with callers' data. `/readyz` is ready only
//! when the policies and keys are loaded (they are, or the gateway would not have started) and
//! the audit log's last write succeeded: a gateway that cannot audit is not ready for traffic.
//! Rights requests and revocation (`rights.rs`) and the security console (`watch/console.rs`)
//! mount here too.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::GatewayError;
use crate::gateway::{Gateway, problem_response};
use crate::watch::console::boxed;
use crate::watch::feed::FeedBody;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide metrics recorder once; later calls reuse it.
pub fn metrics_handle() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ])
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

tokio::task_local! {
    /// The client of the admin-plane request being answered, for its audit records (sealed
    /// as the data plane's are) and breach detection's per-address windows. Set around each
    /// request by the admin listener (`startup`).
    pub static PEER: std::net::SocketAddr;
}

/// The admin-plane client's address, as audit records hold addresses; `None` outside a
/// request.
pub fn peer() -> Option<String> {
    PEER.try_with(|p| p.ip().to_string()).ok()
}

/// Answers one admin-plane request.
pub async fn handle<B>(gw: Arc<Gateway>, req: Request<B>) -> Response<FeedBody>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let rid = crate::gateway::new_request_id();
    if let Err(e) = crate::request_head::check(&req) {
        return boxed(problem_response(&e, &rid));
    }
    if crate::watch::console::owns(req.uri().path()) {
        return crate::watch::console::handle(&gw, req, &rid).await;
    }
    boxed(plain(gw, req, rid).await)
}

/// Everything but the console, whose live feed is the one streamed body.
async fn plain<B>(gw: Arc<Gateway>, req: Request<B>, rid: String) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if crate::rights::owns(req.uri().path()) {
        return crate::rights::handle(&gw, req, &rid).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(
            StatusCode::OK,
            "application/json",
            "{\"status\":\"ok\"}".into(),
        ),
        (&Method::GET, "/readyz") => {
            // Not ready says why: the log, the shared controls, or no key to verify a token.
            let keys = match gw.verifier.trusts_any_key() {
                true => Ok(()),
                false => Err(GatewayError::KeysUnavailable),
            };
            match (gw.audit.is_healthy(), gw.controls.check_fresh().and(keys)) {
                (true, Ok(())) => {
                    // Stale quota counts refuse limited roles only, and usually on every
                    // replica at once: said here, not failed on (`Controls::quotas_fresh`).
                    let quotas = if gw.controls.quotas_fresh() {
                        "current"
                    } else {
                        "stale"
                    };
                    let body = format!(
                        "{{\"status\":\"ready\",\"policies\":{},\"quota_counts\":\"{quotas}\"}}",
                        gw.policies().engine.policy_count()
                    );
                    text(StatusCode::OK, "application/json", body)
                }
                (false, _) => problem_response(&GatewayError::AuditUnavailable, &rid),
                (true, Err(e)) => problem_response(&e, &rid),
            }
        }
        (&Method::GET, "/metrics") => match metrics_handle() {
            Some(h) => {
                metrics::gauge!("wardgate_quota_counts_stale").set(if gw.controls.quotas_fresh() {
                    0.0
                } else {
                    1.0
                });
                // When the chain offered now ends (its soonest certificate): alert well before
                // (a renewal is taken up on `SIGHUP`).
                if let Some(cert) = &gw.server_cert {
                    metrics::gauge!("wardgate_server_certificate_not_after_seconds")
                        .set(cert.about().chain_ends as f64);
                }
                text(StatusCode::OK, "text/plain; version=0.0.4", h.render())
            }
            None => problem_response(&GatewayError::Internal("no metrics recorder".into()), &rid),
        },
        (_, "/healthz" | "/readyz" | "/metrics") => {
            problem_response(&GatewayError::MethodNotAllowed("GET"), &rid)
        }
        _ => problem_response(&GatewayError::RouteNotFound, &rid),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}
