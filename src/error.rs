//! The request path's one error type and its one mapping to HTTP.
//!
//! Every way a data request can fail is a variant of [`GatewayError`]; [`GatewayError::status`]
//! and [`GatewayError::problem`] are the only places that turn one into a status code and an
//! `application/problem+json` body (RFC 9457). The mapping is an exhaustive `match` with no
//! wildcard arm, so a new failure cannot reach a caller without someone deciding what it says.
//! Internal detail (file paths, upstream addresses, parser positions) is logged by the caller of
//! this module and never put in a body.

use http::StatusCode;
use serde::Serialize;

/// Why a bearer token was refused. The text names the check that failed, never which keys exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    MissingToken,
    MalformedHeader,
    MalformedToken,
    DisallowedAlgorithm,
    UnknownKey,
    BadSignature,
    WrongIssuer,
    WrongAudience,
    Expired,
    NotYetValid,
    InvalidClaims,
    /// A role, area or purpose the registers do not hold (a renamed one, another
    /// deployment's).
    UnknownName,
    /// Issued later than now, past the leeway: a revocation placed now would not cover it.
    IssuedInFuture,
    /// Made to last longer than `auth.max_token_lifetime`.
    LifetimeTooLong,
    /// The token's issuer is not trusted to issue its role (`auth.issuer_roles`).
    RoleNotFromIssuer,
    /// The token's `sub` or `jti`, given bare, lies in another issuer's namespace (or the
    /// gateway's own): `auth.subject_prefixes`.
    NameNotFromIssuer,
    Revoked,
}

impl AuthFailure {
    /// Stable machine-readable reason, used in the audit log and the problem `type`.
    pub fn code(self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "token_missing",
            AuthFailure::MalformedHeader => "authorization_header_malformed",
            AuthFailure::MalformedToken => "token_malformed",
            AuthFailure::DisallowedAlgorithm => "token_algorithm_not_allowed",
            AuthFailure::UnknownKey => "token_key_unknown",
            AuthFailure::BadSignature => "token_signature_invalid",
            AuthFailure::WrongIssuer => "token_issuer_invalid",
            AuthFailure::WrongAudience => "token_audience_invalid",
            AuthFailure::Expired => "token_expired",
            AuthFailure::NotYetValid => "token_not_yet_valid",
            AuthFailure::InvalidClaims => "token_claims_invalid",
            AuthFailure::UnknownName => "token_names_unknown",
            AuthFailure::IssuedInFuture => "token_issued_in_future",
            AuthFailure::LifetimeTooLong => "token_lifetime_too_long",
            AuthFailure::RoleNotFromIssuer => "token_role_not_from_issuer",
            AuthFailure::NameNotFromIssuer => "token_name_not_from_issuer",
            AuthFailure::Revoked => "token_revoked",
        }
    }

    fn detail(self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "the request carries no `Authorization: Bearer` token",
            AuthFailure::MalformedHeader => {
                "the `Authorization` header is not one `Bearer <token>`"
            }
            AuthFailure::MalformedToken => "the bearer token is not a well-formed JWT",
            AuthFailure::DisallowedAlgorithm => {
                "the token's signing algorithm is not one this gateway accepts"
            }
            AuthFailure::UnknownKey => "the token names no signing key this gateway trusts",
            AuthFailure::BadSignature => "the token's signature does not verify",
            AuthFailure::WrongIssuer => "the token was not issued by a trusted issuer",
            AuthFailure::WrongAudience => "the token is not meant for this gateway",
            AuthFailure::Expired => "the token has expired",
            AuthFailure::NotYetValid => "the token is not valid yet",
            AuthFailure::InvalidClaims => {
                "the token's claims are missing or malformed (sub, jti, exp, nbf, iat, role, \
                 org_unit, areas, purposes)"
            }
            AuthFailure::UnknownName => {
                "the token names a role, area or purpose this gateway does not know"
            }
            AuthFailure::IssuedInFuture => {
                "the token's issue time (`iat`) is in the future, past the allowed clock skew"
            }
            AuthFailure::LifetimeTooLong => {
                "the token was made to last longer than this gateway accepts \
                 (`auth.max_token_lifetime`)"
            }
            AuthFailure::RoleNotFromIssuer => "the token's issuer is not trusted to issue its role",
            AuthFailure::NameNotFromIssuer => {
                "the token names a caller or token id in another issuer's namespace"
            }
            AuthFailure::Revoked => "the token has been revoked",
        }
    }
}

/// Everything that can go wrong between accepting a data request and answering it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("unauthenticated: {}", .0.code())]
    Unauthenticated(AuthFailure),
    #[error("no purpose declared")]
    PurposeMissing,
    #[error("unknown purpose `{0}`")]
    PurposeUnknown(String),
    #[error("purpose `{0}` not granted to this token")]
    PurposeNotGranted(String),
    #[error("no such route")]
    RouteNotFound,
    /// The methods the route does accept, as the `Allow` header lists them (RFC 9110
    /// §15.5.6; empty: none).
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An aggregate whose grouping makes more groups than `aggregates.max_groups`: refused
    /// while the records are read, so it says something of them (how many distinct values
    /// the scope holds), and breach detection counts it with the aggregates answered.
    #[error("too many groups: {0}")]
    TooManyGroups(String),
    #[error("forbidden by policy")]
    Forbidden { policy_ids: Vec<String> },
    /// A write would write what its caller may not: fields of a category the declared
    /// purpose may not write (Cedar `write_field`), or values the asset register does not allow
    /// a field. Carries the detail, which names them (the policies that refused are in the
    /// audit record only: `Trail::refuse_write`).
    #[error("write forbidden: {0}")]
    WriteForbidden(String),
    /// A listing, export or aggregate filtered on a field the declared purpose and role may
    /// not see: the records
    /// it picked would show the field's value by being picked (withheld, paging would still
    /// count them). Carries the detail, which names the filter, and the policies that refused.
    #[error("filter forbidden: {0}")]
    FilterForbidden(String, Vec<String>),
    #[error("not found")]
    NotFound,
    /// A lift naming no restriction in force: the detail says which are.
    #[error("not in force: {0}")]
    NotInForce(String),
    /// A placement whose reference is already in force for that subject and kind: two
    /// requests under one reference would be ended by one lift.
    #[error("already in force: {0}")]
    AlreadyInForce(String),
    #[error("request body too large")]
    PayloadTooLarge,
    /// A request body that did not arrive within the deadline (its seconds): a caller
    /// trickling one out would otherwise hold a connection and a task for as long as it liked.
    #[error("request body not received within {0} s")]
    BodyTimeout(u64),
    /// A request target longer than the gateway takes (`request_head::MAX_URI_BYTES`).
    #[error("request target longer than {0} bytes")]
    UriTooLong(usize),
    /// A request line and headers past the gateway's bounds (`request_head`): the detail says
    /// which.
    #[error("request head too large: {0}")]
    HeadTooLarge(String),
    /// An export asked over HTTP/1.0, whose body ends by closing the connection: an export
    /// cut short there would look whole to the client.
    #[error("an export needs HTTP/1.1 or later")]
    ExportNeedsHttp11,
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("upstream response too large")]
    UpstreamTooLarge,
    #[error("upstream response malformed: {0}")]
    UpstreamMalformed(String),
    #[error("upstream answered {0}")]
    UpstreamStatus(u16),
    #[error("audit log unavailable")]
    AuditUnavailable,
    #[error("quota exceeded")]
    QuotaExceeded,
    /// The caller already has this many exports and aggregates under way on this replica
    /// (`server.max_bulk_reads_per_caller`).
    #[error("too many exports and aggregates at once (at most {0})")]
    TooManyAtOnce(usize),
    #[error("shared controls are stale")]
    ControlsStale,
    /// A policy pack that decides otherwise was put in force while a long read (an
    /// aggregate) was under way: it may forbid what the read was counting.
    #[error("the policies changed while the answer was prepared")]
    PolicyReloaded,
    /// No token key is trusted (a fetched set dropped as stale, with no other key): every
    /// caller would be refused. Said by `/readyz` only.
    #[error("no token key is trusted")]
    KeysUnavailable,
    /// A rights change or revocation is journalled and in effect on this replica, but the
    /// shared store could not be told: the other replicas learn of it when it is back.
    #[error("control change not yet shared")]
    ControlsNotShared,
    /// A rights change or revocation that this replica's journal could not take: it is in
    /// effect nowhere, and may be made again once the journal's disk is writable.
    #[error("control change not recorded")]
    ControlsNotRecorded,
    /// The breach log could not take a console action: with `made`, the change (a
    /// containment's revocation) is in effect and only its note on the alert is missing;
    /// without, the action (a classification) was not made.
    #[error("breach log unavailable")]
    BreachLogUnavailable { made: bool },
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller closed the connection before the answer (only ever audited: there is no one
    /// to send it to).
    #[error("the caller closed the connection")]
    ClientClosed,
}

/// An RFC 9457 problem document, plus the two extensions wardgate always adds.
#[derive(Debug, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub request_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
}

/// What a caller sent, as an error's detail repeats it: at most 64 characters (a header or a
/// query parameter's name may be tens of kilobytes), marked `…` when cut.
pub(crate) fn echoed(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            GatewayError::PurposeMissing
            | GatewayError::PurposeUnknown(_)
            | GatewayError::BadRequest(_)
            | GatewayError::TooManyGroups(_) => StatusCode::BAD_REQUEST,
            GatewayError::PurposeNotGranted(_)
            | GatewayError::Forbidden { .. }
            | GatewayError::WriteForbidden(_)
            | GatewayError::FilterForbidden(..) => StatusCode::FORBIDDEN,
            GatewayError::RouteNotFound | GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::NotInForce(_) | GatewayError::AlreadyInForce(_) => StatusCode::CONFLICT,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            GatewayError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::ExportNeedsHttp11 => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamTooLarge
            | GatewayError::UpstreamMalformed(_)
            | GatewayError::UpstreamStatus(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::AuditUnavailable
            | GatewayError::ControlsStale
            | GatewayError::PolicyReloaded
            | GatewayError::KeysUnavailable
            | GatewayError::ControlsNotShared
            | GatewayError::ControlsNotRecorded
            | GatewayError::BreachLogUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::QuotaExceeded | GatewayError::TooManyAtOnce(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // nginx's "client closed request": no standard status says it.
            GatewayError::ClientClosed => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    /// Stable machine-readable reason: the audit log's `reason` and the problem `type` suffix.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::Unauthenticated(f) => f.code(),
            GatewayError::PurposeMissing => "purpose_missing",
            GatewayError::PurposeUnknown(_) => "purpose_unknown",
            GatewayError::PurposeNotGranted(_) => "purpose_not_granted",
            GatewayError::RouteNotFound => "route_not_found",
            GatewayError::MethodNotAllowed(_) => "method_not_allowed",
            GatewayError::UnsupportedMediaType => "unsupported_media_type",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::TooManyGroups(_) => "too_many_groups",
            GatewayError::Forbidden { .. } => "forbidden_by_policy",
            GatewayError::WriteForbidden(_) => "write_forbidden",
            GatewayError::FilterForbidden(..) => "filter_forbidden",
            GatewayError::NotFound => "not_found",
            GatewayError::NotInForce(_) => "not_in_force",
            GatewayError::AlreadyInForce(_) => "already_in_force",
            GatewayError::PayloadTooLarge => "payload_too_large",
            GatewayError::BodyTimeout(_) => "body_timeout",
            GatewayError::UriTooLong(_) => "uri_too_long",
            GatewayError::HeadTooLarge(_) => "request_head_too_large",
            GatewayError::ExportNeedsHttp11 => "http_version_not_supported",
            GatewayError::UpstreamUnavailable => "upstream_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamTooLarge => "upstream_response_too_large",
            GatewayError::UpstreamMalformed(_) => "upstream_response_malformed",
            GatewayError::UpstreamStatus(_) => "upstream_error",
            GatewayError::AuditUnavailable => "audit_unavailable",
            GatewayError::QuotaExceeded => "quota_exceeded",
            GatewayError::TooManyAtOnce(_) => "too_many_at_once",
            GatewayError::ControlsStale => "controls_stale",
            GatewayError::PolicyReloaded => "policy_reloaded",
            GatewayError::KeysUnavailable => "keys_unavailable",
            GatewayError::ControlsNotShared => "controls_not_shared",
            GatewayError::ControlsNotRecorded => "controls_not_recorded",
            GatewayError::BreachLogUnavailable { .. } => "breach_log_unavailable",
            GatewayError::Internal(_) => "internal_error",
            GatewayError::ClientClosed => "client_closed",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            GatewayError::Unauthenticated(_) => "unauthenticated",
            GatewayError::PurposeMissing
            | GatewayError::PurposeUnknown(_)
            | GatewayError::BadRequest(_)
            | GatewayError::TooManyGroups(_) => "bad request",
            GatewayError::PurposeNotGranted(_)
            | GatewayError::Forbidden { .. }
            | GatewayError::WriteForbidden(_)
            | GatewayError::FilterForbidden(..) => "forbidden",
            GatewayError::RouteNotFound | GatewayError::NotFound => "not found",
            GatewayError::NotInForce(_) => "not in force",
            GatewayError::AlreadyInForce(_) => "already in force",
            GatewayError::MethodNotAllowed(_) => "method not allowed",
            GatewayError::UnsupportedMediaType => "unsupported media type",
            GatewayError::PayloadTooLarge => "payload too large",
            GatewayError::BodyTimeout(_) => "request timeout",
            GatewayError::UriTooLong(_) => "URI too long",
            GatewayError::HeadTooLarge(_) => "request header fields too large",
            GatewayError::ExportNeedsHttp11 => "HTTP version not supported",
            GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamTooLarge
            | GatewayError::UpstreamMalformed(_)
            | GatewayError::UpstreamStatus(_) => "bad gateway",
            GatewayError::UpstreamTimeout => "gateway timeout",
            GatewayError::AuditUnavailable
            | GatewayError::ControlsStale
            | GatewayError::PolicyReloaded
            | GatewayError::KeysUnavailable
            | GatewayError::ControlsNotShared
            | GatewayError::ControlsNotRecorded
            | GatewayError::BreachLogUnavailable { .. } => "service unavailable",
            GatewayError::QuotaExceeded => "too many records",
            GatewayError::TooManyAtOnce(_) => "too many requests",
            GatewayError::Internal(_) => "internal error",
            GatewayError::ClientClosed => "client closed request",
        }
    }

    /// What the caller is told. Upstream and internal detail stays in the server log.
    fn detail(&self) -> String {
        match self {
            GatewayError::Unauthenticated(f) => f.detail().to_owned(),
            GatewayError::PurposeMissing => {
                "every data request must declare one purpose in the `X-Purpose` header".to_owned()
            }
            GatewayError::PurposeUnknown(p) => {
                format!("`{}` is not a purpose in the catalogue", echoed(p))
            }
            GatewayError::PurposeNotGranted(p) => {
                format!("this token does not grant the purpose `{p}`")
            }
            GatewayError::RouteNotFound => "no route matches this path".to_owned(),
            GatewayError::MethodNotAllowed("") => "this route accepts no method here".to_owned(),
            GatewayError::MethodNotAllowed(allow) => {
                format!("this route does not accept that method; it accepts {allow}")
            }
            GatewayError::UnsupportedMediaType => {
                "a write's body must be JSON, sent as `Content-Type: application/json`".to_owned()
            }
            GatewayError::BadRequest(why) | GatewayError::TooManyGroups(why) => why.clone(),
            GatewayError::Forbidden { .. } => {
                "the policies in force do not permit this request for the declared purpose"
                    .to_owned()
            }
            GatewayError::WriteForbidden(why)
            | GatewayError::FilterForbidden(why, _)
            | GatewayError::NotInForce(why)
            | GatewayError::AlreadyInForce(why) => why.clone(),
            GatewayError::NotFound => "no record you may see has that id".to_owned(),
            GatewayError::PayloadTooLarge => {
                "the request body exceeds the configured limit".to_owned()
            }
            GatewayError::BodyTimeout(secs) => {
                format!("the request body did not arrive within {secs} s")
            }
            GatewayError::UriTooLong(max) => {
                format!("the request's path and query exceed {max} bytes")
            }
            GatewayError::HeadTooLarge(why) => why.clone(),
            GatewayError::ExportNeedsHttp11 => {
                "an export is cut short by ending its body without its last chunk, which \
                 HTTP/1.0 cannot tell from its end: ask over HTTP/1.1 or HTTP/2 (behind a \
                 proxy, nginx's `proxy_http_version 1.1`)"
                    .to_owned()
            }
            GatewayError::UpstreamUnavailable => "the datastore could not be reached".to_owned(),
            GatewayError::UpstreamTimeout => "the datastore did not answer in time".to_owned(),
            GatewayError::UpstreamTooLarge => {
                "the datastore's answer exceeds the configured limit".to_owned()
            }
            GatewayError::UpstreamMalformed(_) => {
                "the datastore's answer could not be checked, so nothing of it is disclosed"
                    .to_owned()
            }
            // Not the status itself: before any scope check, a datastore's 410 or 451 for one
            // id would tell any caller that this person exists and has exercised a right. The
            // gateway's log has it (`upstream answered with an error`).
            GatewayError::UpstreamStatus(_) => {
                "the datastore could not answer; the gateway's log says how".to_owned()
            }
            GatewayError::AuditUnavailable => {
                "the access log cannot be written, so no data is disclosed; retry shortly"
                    .to_owned()
            }
            GatewayError::QuotaExceeded => {
                "you have been disclosed more records than your role allows in this period"
                    .to_owned()
            }
            GatewayError::TooManyAtOnce(n) => format!(
                "you already have {n} exports and aggregates under way, the most a caller may \
                 have at once; ask again once one has ended"
            ),
            GatewayError::ControlsStale => {
                "rights requests and revocations cannot be confirmed current; retry shortly"
                    .to_owned()
            }
            GatewayError::PolicyReloaded => {
                "the policies in force changed while the answer was prepared, so it is not \
                 given; ask again"
                    .to_owned()
            }
            GatewayError::KeysUnavailable => {
                "no token signing key is trusted (a fetched key set was dropped as stale): \
                 every caller would be refused"
                    .to_owned()
            }
            GatewayError::ControlsNotShared => {
                "the change is recorded and in effect on this replica, but the shared store \
                 could not be told; the other replicas learn of it when the store is back. Do \
                 not repeat it"
                    .to_owned()
            }
            GatewayError::ControlsNotRecorded => {
                "the change could not be recorded (this replica cannot write its control \
                 journal) and is in effect nowhere; make it again once the journal can be \
                 written (the gateway's log says why; one it could not mend needs a restart)"
                    .to_owned()
            }
            GatewayError::BreachLogUnavailable { made: true } => {
                "the change was made (the caller's tokens are revoked on every replica), but the \
                 breach log could not note it on the alert, which still shows it open: do not \
                 make it again (the gateway's log says why)"
                    .to_owned()
            }
            GatewayError::BreachLogUnavailable { made: false } => {
                "the breach log cannot be written, so the change was not made (the audit log \
                 says so); make it again once it can (the gateway's log says why)"
                    .to_owned()
            }
            GatewayError::Internal(_) => "the gateway failed; the error has been logged".to_owned(),
            GatewayError::ClientClosed => "the connection was closed before the answer".to_owned(),
        }
    }

    pub fn problem(&self, request_id: &str) -> Problem {
        Problem {
            kind: format!("urn:wardgate:problem:{}", self.code().replace('_', "-")),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.detail(),
            request_id: request_id.to_owned(),
            // Policies that depend on no record: the request's, and a filter's (judged on a
            // record without flags). A write's may be a forbid on its target's own flags
            // (`restrict.para22-opinions`), which would tell the caller that person's
            // restriction: its audit record keeps them.
            policy_ids: match self {
                GatewayError::Forbidden { policy_ids }
                | GatewayError::FilterForbidden(_, policy_ids) => policy_ids.clone(),
                _ => Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_never_carry_internal_detail() {
        let err = GatewayError::UpstreamMalformed("expected `,` at line 3 of 10.0.0.7".into());
        let p = err.problem("r1");
        assert!(!p.detail.contains("10.0.0.7"));
        assert_eq!(p.status, 502);
        assert_eq!(p.kind, "urn:wardgate:problem:upstream-response-malformed");
    }

    /// One of every variant. The match below has no wildcard, so a variant added to
    /// `GatewayError` does not compile until it is added here too, and checked.
    fn every_variant() -> Vec<GatewayError> {
        let secret = "10.0.0.7:5432 said: relation \"electors\" does not exist".to_owned();
        let all = vec![
            GatewayError::Unauthenticated(AuthFailure::Expired),
            GatewayError::PurposeMissing,
            GatewayError::PurposeUnknown("p".into()),
            GatewayError::PurposeNotGranted("p".into()),
            GatewayError::RouteNotFound,
            GatewayError::MethodNotAllowed("GET"),
            GatewayError::UnsupportedMediaType,
            GatewayError::BadRequest("b".into()),
            GatewayError::TooManyGroups("g".into()),
            GatewayError::Forbidden { policy_ids: vec![] },
            GatewayError::WriteForbidden("w".into()),
            GatewayError::FilterForbidden("f".into(), vec![]),
            GatewayError::NotFound,
            GatewayError::PayloadTooLarge,
            GatewayError::BodyTimeout(30),
            GatewayError::UriTooLong(8192),
            GatewayError::HeadTooLarge("h".into()),
            GatewayError::ExportNeedsHttp11,
            GatewayError::UpstreamUnavailable,
            GatewayError::UpstreamTimeout,
            GatewayError::UpstreamTooLarge,
            GatewayError::UpstreamMalformed(secret.clone()),
            GatewayError::UpstreamStatus(451),
            GatewayError::AuditUnavailable,
            GatewayError::QuotaExceeded,
            GatewayError::TooManyAtOnce(2),
            GatewayError::ControlsStale,
            GatewayError::PolicyReloaded,
            GatewayError::KeysUnavailable,
            GatewayError::ControlsNotShared,
            GatewayError::ControlsNotRecorded,
            GatewayError::BreachLogUnavailable { made: true },
            GatewayError::NotInForce("n".into()),
            GatewayError::AlreadyInForce("a".into()),
            GatewayError::Internal(secret),
            GatewayError::ClientClosed,
        ];
        for e in &all {
            match e {
                GatewayError::Unauthenticated(_)
                | GatewayError::PurposeMissing
                | GatewayError::PurposeUnknown(_)
                | GatewayError::PurposeNotGranted(_)
                | GatewayError::RouteNotFound
                | GatewayError::MethodNotAllowed(_)
                | GatewayError::UnsupportedMediaType
                | GatewayError::BadRequest(_)
                | GatewayError::TooManyGroups(_)
                | GatewayError::Forbidden { .. }
                | GatewayError::WriteForbidden(_)
                | GatewayError::FilterForbidden(..)
                | GatewayError::NotFound
                | GatewayError::NotInForce(_)
                | GatewayError::AlreadyInForce(_)
                | GatewayError::PayloadTooLarge
                | GatewayError::BodyTimeout(_)
                | GatewayError::UriTooLong(_)
                | GatewayError::HeadTooLarge(_)
                | GatewayError::ExportNeedsHttp11
                | GatewayError::UpstreamUnavailable
                | GatewayError::UpstreamTimeout
                | GatewayError::UpstreamTooLarge
                | GatewayError::UpstreamMalformed(_)
                | GatewayError::UpstreamStatus(_)
                | GatewayError::AuditUnavailable
                | GatewayError::QuotaExceeded
                | GatewayError::TooManyAtOnce(_)
                | GatewayError::ControlsStale
                | GatewayError::PolicyReloaded
                | GatewayError::KeysUnavailable
                | GatewayError::ControlsNotShared
                | GatewayError::ControlsNotRecorded
                | GatewayError::BreachLogUnavailable { .. }
                | GatewayError::Internal(_)
                | GatewayError::ClientClosed => {}
            }
        }
        all
    }

    /// Every error a caller can receive is a problem document whose `type` is its own
    /// (no two errors share one), whose status the README's Errors table explains, and whose
    /// detail carries nothing of the datastore's or the gateway's internals.
    #[test]
    fn every_error_is_a_distinct_documented_problem_without_internals() {
        let readme = include_str!("../README.md");
        let errors = readme
            .split("### Errors")
            .nth(1)
            .and_then(|rest| rest.split("\n### ").next())
            .expect("README has an Errors section");
        let mut kinds = std::collections::HashSet::new();
        for err in every_variant() {
            let p = err.problem("r");
            assert_eq!(p.status, err.status().as_u16(), "{err:?}");
            assert_eq!(
                p.kind,
                format!("urn:wardgate:problem:{}", err.code().replace('_', "-"))
            );
            assert!(kinds.insert(p.kind.clone()), "{} twice", p.kind);
            assert!(!p.title.is_empty() && !p.detail.is_empty(), "{err:?}");
            assert!(
                !p.detail.contains("10.0.0.7") && !p.detail.contains("electors"),
                "{err:?}: {}",
                p.detail
            );
            // 499 is only ever audited: the caller has gone.
            if !matches!(err, GatewayError::ClientClosed) {
                assert!(
                    errors.contains(&format!("| {} |", p.status)),
                    "README's Errors table has no row for {} ({err:?})",
                    p.status
                );
            }
        }
    }

    #[test]
    fn forbidden_names_policy_ids() {
        let err = GatewayError::Forbidden {
            policy_ids: vec!["geo.out-of-area".into()],
        };
        let p = err.problem("r2");
        assert_eq!(p.policy_ids, vec!["geo.out-of-area".to_owned()]);
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
    }

    /// A caller's own text comes back in an error's detail at most 64 characters long.
    #[test]
    fn what_a_caller_sent_is_echoed_short() {
        assert_eq!(echoed("canvassing"), "canvassing");
        let long = "é".repeat(10_000);
        let shown = echoed(&long);
        assert_eq!(shown, format!("{}…", "é".repeat(64)));
        let p = GatewayError::PurposeUnknown(long).problem("r");
        assert!(p.detail.len() < 200, "{}", p.detail);
    }
}
