//! The upstream side: one pooled HTTP client per datastore (over `connector`'s connections:
//! TCP, or TLS to an `https://` one), with hygiene and hard limits.
//!
//! Requests to a datastore are built here from scratch rather than copied from the caller's:
//! only the path and query the route table produced, `Accept`, `Content-Type` for writes, the
//! request id, and the datastore's own credential from config. The caller's `Authorization`,
//! cookies and hop-by-hop headers therefore never reach a datastore. Connect and response
//! timeouts map to 502/504, and a body over the configured size is refused (502) rather than
//! buffered without bound. This module forwards bytes; it does not look inside them.
//!
//! What it logs of a failed exchange names the datastore and the request id, never the path
//! or query: those hold subject ids and the caller's filters (postcodes), which the server
//! log, unsealed and kept without a retention rule, must not carry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{Dialect, UpstreamConfig};
use crate::connector::Connector;
use crate::error::GatewayError;

/// What came back from a datastore: its status and whether it said JSON, and the body, read
/// and size-checked when it was a success in JSON (otherwise empty). A body that failed after
/// a success status is an `Err` here, not of `send`: a write the datastore answered 2xx was
/// taken, however its body then went.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub json: bool,
    pub body: Result<Bytes, GatewayError>,
}

/// A datastore's pooled client.
type Pooled = Client<Connector, Full<Bytes>>;

pub struct Upstream {
    pub dialect: Dialect,
    base: String,
    /// Replaced whole when the TLS files are read again (`Upstreams::renew_tls`): requests
    /// under way keep the client they took, and its pool, until they end.
    client: RwLock<Arc<Pooled>>,
    /// What the client is built from, for a renewal, and (for an `https://` datastore) a
    /// digest of the TLS files it was built with: a renewal rebuilds only what changed.
    config: UpstreamConfig,
    tls_files: Mutex<Option<[u8; 32]>>,
    response_timeout: Duration,
    authorization: Option<HeaderValue>,
    max_response_bytes: usize,
}

/// Every configured datastore by dataset name.
pub struct Upstreams {
    by_dataset: BTreeMap<String, Upstream>,
}

impl Upstreams {
    pub fn new(
        cfg: &BTreeMap<String, UpstreamConfig>,
        max_response_bytes: usize,
    ) -> anyhow::Result<Upstreams> {
        let mut by_dataset = BTreeMap::new();
        for (name, u) in cfg {
            // The digest first: files renewed while the client is built are taken up by the
            // next reload, not taken for the ones in use.
            let tls_files = tls_files(u);
            let client = pooled(name, u)?;
            let authorization = match &u.authorization {
                Some(v) => Some(HeaderValue::from_str(v).map_err(|_| {
                    anyhow::anyhow!(
                        "`datasets.{name}.authorization_file` is not a valid header value"
                    )
                })?),
                None => None,
            };
            let base = u.base.to_string().trim_end_matches('/').to_owned();
            by_dataset.insert(
                name.clone(),
                Upstream {
                    dialect: u.dialect.clone(),
                    base,
                    client: RwLock::new(Arc::new(client)),
                    config: u.clone(),
                    tls_files: Mutex::new(tls_files),
                    response_timeout: u.response_timeout,
                    authorization,
                    max_response_bytes,
                },
            );
        }
        Ok(Upstreams { by_dataset })
    }

    /// A digest of each `https://` datastore's TLS files as they are now (`None` for one that
    /// cannot be read), for noticing that they changed (`rekey::changes`).
    pub fn tls_files_now(&self) -> Vec<Option<[u8; 32]>> {
        (self.by_dataset.values())
            .filter(|up| up.config.tls.is_some())
            .map(|up| tls_files(&up.config))
            .collect()
    }

    pub fn get(&self, dataset: &str) -> Option<&Upstream> {
        self.by_dataset.get(dataset)
    }

    /// Reads every `https://` datastore's TLS files again and, for each whose files changed,
    /// builds its client anew, checked as at start: all of them, or the first error (then
    /// nothing changes). `None` when no datastore is reached over TLS. Nothing is in use
    /// until `TlsRenewal::apply`. (A datastore whose files are as they were keeps its client
    /// and its pooled connections: the same signal reloads token keys, which may come often.)
    pub fn renew_tls(&self) -> Option<anyhow::Result<TlsRenewal<'_>>> {
        let over_tls: Vec<(&String, &Upstream)> = (self.by_dataset.iter())
            .filter(|(_, up)| up.config.tls.is_some())
            .collect();
        if over_tls.is_empty() {
            return None;
        }
        let mut renewal = TlsRenewal {
            clients: Vec::new(),
            unchanged: Vec::new(),
        };
        for (name, up) in over_tls {
            let files = tls_files(&up.config);
            let in_use = *up.tls_files.lock().unwrap_or_else(PoisonError::into_inner);
            if files.is_some() && files == in_use {
                renewal.unchanged.push(name.clone());
                continue;
            }
            // Unreadable files (no digest) are read here again, to say why.
            match pooled(name, &up.config) {
                Ok(client) => renewal.clients.push((name.as_str(), up, client, files)),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(renewal))
    }
}

/// A digest of an `https://` datastore's TLS files as they are now (`None` for `http://`, or
/// when one cannot be read).
fn tls_files(u: &UpstreamConfig) -> Option<[u8; 32]> {
    let tls = u.tls.as_ref()?;
    let client = tls.client_cert.as_ref();
    let files = std::iter::once(&tls.ca_file).chain(client.into_iter().flat_map(|(c, k)| [c, k]));
    crate::server::digest_files(files.map(std::path::PathBuf::as_path))
}

/// New clients for the datastores reached over TLS, their files read and checked, not yet in
/// use.
pub struct TlsRenewal<'a> {
    clients: Vec<(&'a str, &'a Upstream, Pooled, Option<[u8; 32]>)>,
    unchanged: Vec<String>,
}

impl TlsRenewal<'_> {
    /// The datastores whose files changed, to be renewed.
    pub fn changed(&self) -> Vec<String> {
        (self.clients.iter())
            .map(|(n, _, _, _)| (*n).to_owned())
            .collect()
    }

    /// The datastores whose files are as they were.
    pub fn unchanged(&self) -> &[String] {
        &self.unchanged
    }

    /// Puts the new clients in place: the next connection to each datastore is made with
    /// the files just read (the old pools close as their last requests end).
    pub fn apply(self) {
        for (_, up, client, files) in self.clients {
            *up.client.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(client);
            *up.tls_files.lock().unwrap_or_else(PoisonError::into_inner) = files;
        }
    }
}

/// A datastore's pooled client, over `connector`'s connections.
fn pooled(name: &str, u: &UpstreamConfig) -> anyhow::Result<Pooled> {
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(u.idle_connections)
        .build(crate::connector::connector(name, u)?))
}

/// An error and every cause under it, for the log: hyper-util's client error says only
/// `client error (Connect)`, and the reason (a refused connection, a certificate from an
/// unknown CA or for another name) is in its sources.
pub(crate) fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let all: Vec<String> = std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect();
    all.join(": ")
}

impl Upstream {
    /// The client in use now.
    fn client(&self) -> Arc<Pooled> {
        Arc::clone(&self.client.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// An upstream request built from scratch: the caller's headers never reach a datastore,
    /// only `Accept`, the request id, the configured credential and, with a body, its type.
    fn request(
        &self,
        method: Method,
        uri: &str,
        accept: &'static str,
        body: Option<Bytes>,
        request_id: &str,
    ) -> Result<Request<Full<Bytes>>, GatewayError> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::ACCEPT, accept)
            .header("x-request-id", request_id);
        if let Some(auth) = &self.authorization {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        req.body(Full::new(body.unwrap_or_default())).map_err(|e| {
            GatewayError::Internal(format!("cannot build a request to `{}`: {e}", self.base))
        })
    }

    /// How long the datastore may take to answer (`response_timeout`): its headers and a
    /// buffered body in all, or a streamed body between one frame and the next.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Sends `method path_and_query` (with an optional JSON body) and reads the answer.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        request_id: &str,
    ) -> Result<UpstreamResponse, GatewayError> {
        let uri = format!("{}{path_and_query}", self.base);
        let req = self.request(method, &uri, "application/json", body, request_id)?;
        // One deadline for the whole exchange, headers and body: one timer, polled by both.
        let deadline = tokio::time::sleep(self.response_timeout);
        tokio::pin!(deadline);
        let resp = tokio::select! {
            biased;
            resp = self.client().request(req) => resp.map_err(|e| {
                tracing::warn!(error = causes(&e), datastore = %self.base, request_id, "upstream request failed");
                GatewayError::UpstreamUnavailable
            })?,
            () = &mut deadline => return Err(GatewayError::UpstreamTimeout),
        };
        let status = resp.status();
        let json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.starts_with("application/json") || ct.starts_with("application/problem+json")
            });
        // Only a success in JSON is ever read (`gateway::expect_json` refuses the rest by
        // status and type alone): anything else is neither waited for nor buffered (its
        // connection is dropped rather than drained).
        if !status.is_success() || !json {
            return Ok(UpstreamResponse {
                status,
                json,
                body: Ok(Bytes::new()),
            });
        }
        let body = if resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n > self.max_response_bytes)
        {
            Err(GatewayError::UpstreamTooLarge)
        } else {
            let read = Limited::new(resp.into_body(), self.max_response_bytes).collect();
            tokio::select! {
                biased;
                read = read => match read {
                    Ok(all) => Ok(all.to_bytes()),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                        Err(GatewayError::UpstreamTooLarge)
                    }
                    Err(e) => {
                        tracing::warn!(error = causes(&*e), datastore = %self.base, request_id, "upstream body failed");
                        Err(GatewayError::UpstreamUnavailable)
                    }
                },
                () = &mut deadline => Err(GatewayError::UpstreamTimeout),
            }
        };
        Ok(UpstreamResponse { status, json, body })
    }

    /// Asks for a streamed NDJSON answer; returns its body once the headers say 200 and
    /// `application/x-ndjson`. The response timeout covers the headers; the body is read by
    /// the caller, a line at a time, with no size limit (that is the point of an export).
    pub async fn open_stream(
        &self,
        path_and_query: &str,
        request_id: &str,
    ) -> Result<hyper::body::Incoming, GatewayError> {
        let uri = format!("{}{path_and_query}", self.base);
        let req = self.request(Method::GET, &uri, "application/x-ndjson", None, request_id)?;
        let resp = tokio::time::timeout(self.response_timeout, self.client().request(req))
            .await
            .map_err(|_| GatewayError::UpstreamTimeout)?
            .map_err(|e| {
                tracing::warn!(error = causes(&e), datastore = %self.base, request_id, "upstream request failed");
                GatewayError::UpstreamUnavailable
            })?;
        if resp.status() != StatusCode::OK {
            tracing::warn!(
                status = resp.status().as_u16(),
                datastore = %self.base,
                request_id,
                "upstream export refused"
            );
            return Err(GatewayError::UpstreamStatus(resp.status().as_u16()));
        }
        let ndjson = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/x-ndjson"));
        if !ndjson {
            return Err(GatewayError::UpstreamMalformed(
                "export is not application/x-ndjson".to_owned(),
            ));
        }
        // NDJSON has no end marker: only the body's framing tells a datastore that reached
        // its last record from one that stopped (a crash, a dropped connection). HTTP/1.0, or
        // HTTP/1.1 with neither a length nor chunks, ends the body by closing the connection,
        // which looks the same either way, so an export or a count could be taken as whole
        // when it is not.
        let headers = resp.headers();
        // Chunked is the last coding named, if it is there at all (RFC 9112 6.1).
        let chunked = (headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back())
        .and_then(|v| v.to_str().ok()?.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        // A length frames the body only where no transfer coding is named (RFC 9112 6.3:
        // a coding list not ending in chunked runs to the connection's close).
        let coded = headers.contains_key(header::TRANSFER_ENCODING);
        let framed = resp.version() >= http::Version::HTTP_2
            || (!coded && headers.contains_key(header::CONTENT_LENGTH))
            || (resp.version() == http::Version::HTTP_11 && chunked);
        if !framed {
            return Err(GatewayError::UpstreamMalformed(
                "export ends where the connection closes (HTTP/1.0, or neither a length nor \
                 chunks): an early end could not be told from the end"
                    .to_owned(),
            ));
        }
        Ok(resp.into_body())
    }
}

#[cfg(test)]
mod tests {
    //! The connection pool against a real HTTP server that counts the connections it accepts.

    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::Barrier;

    use super::*;

    /// A datastore that answers `{}` once `wave` requests are in flight at once (so each wave
    /// needs that many connections), counting the connections it accepts.
    async fn datastore(wave: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(wave));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let barrier = barrier.clone();
                let service = service_fn(move |_req| {
                    let barrier = barrier.clone();
                    async move {
                        barrier.wait().await;
                        let resp = http::Response::builder()
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from_static(b"{}")))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        (base, accepted)
    }

    fn upstream(base: &str, idle_connections: usize) -> Upstreams {
        let cfg = UpstreamConfig {
            base: base.parse().unwrap(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            idle_connections,
            authorization: None,
            tls: None,
            dialect: Dialect::Wardgate,
        };
        Upstreams::new(&BTreeMap::from([("voter".to_owned(), cfg)]), 1 << 20).unwrap()
    }

    async fn wave(upstreams: &Upstreams, n: usize) {
        let up = upstreams.get("voter").unwrap();
        let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        let answers = futures_util::future::join_all(
            ids.iter()
                .map(|id| up.send(Method::GET, "/electors", None, id)),
        )
        .await;
        for a in answers {
            assert_eq!(a.unwrap().status, StatusCode::OK);
        }
        // The connections go back to the pool as their tasks see the responses end.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    #[tokio::test]
    async fn a_failed_exchange_is_logged_without_its_path_or_query() {
        // A datastore that is not there: the port was free a moment ago.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let (_log, logs) = crate::test_log::capture();
        let upstreams = upstream(&base, 1);
        let up = upstreams.get("voter").unwrap();
        let read = up
            .send(
                Method::GET,
                "/electors/VF-000123?postcode=LS15%208AB",
                None,
                "req-one",
            )
            .await;
        assert!(matches!(read, Err(GatewayError::UpstreamUnavailable)));
        let export = up
            .open_stream("/electors/export?postcode=LS15%208AB", "req-two")
            .await;
        assert!(matches!(export, Err(GatewayError::UpstreamUnavailable)));
        let text = logs.text();
        // Both failures were logged, each under its request id and the datastore's address...
        assert!(
            text.contains("req-one") && text.contains("req-two"),
            "{text}"
        );
        assert_eq!(text.matches(&base).count(), 2, "{text}");
        // ...and neither the subject nor the postcode reached the log.
        for secret in ["VF-000123", "LS15", "postcode"] {
            assert!(!text.contains(secret), "`{secret}` logged: {text}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_up_to_the_idle_limit_are_reused() {
        const CONCURRENT: usize = 100;
        let (base, accepted) = datastore(CONCURRENT).await;
        let upstreams = upstream(&base, CONCURRENT);
        wave(&upstreams, CONCURRENT).await;
        assert_eq!(accepted.load(Ordering::SeqCst), CONCURRENT);
        wave(&upstreams, CONCURRENT).await;
        wave(&upstreams, CONCURRENT).await;
        // Every later wave ran on the connections the first one opened.
        assert_eq!(accepted.load(Ordering::SeqCst), CONCURRENT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_idle_limit_connections_are_closed_and_opened_again() {
        const CONCURRENT: usize = 100;
        let (base, accepted) = datastore(CONCURRENT).await;
        let upstreams = upstream(&base, 10);
        wave(&upstreams, CONCURRENT).await;
        wave(&upstreams, CONCURRENT).await;
        // The second wave found ten connections kept and opened the other ninety again.
        assert_eq!(accepted.load(Ordering::SeqCst), 2 * CONCURRENT - 10);
    }
}
