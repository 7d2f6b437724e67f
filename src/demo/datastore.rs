//! The demo upstream: a small HTTP/1.1 JSON datastore serving [`DemoData`] over a real socket.
//!
//! It stands in for the party's voter-file and membership systems behind wardgate: filtering,
//! field projection, paging, an NDJSON export streamed through a bounded channel, and canvass
//! write-back. It enforces no policy; that is the gateway's job.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::data::{
    DemoData, GenSettings, INTENTION_CODES, ISSUES, polling_districts, stream_electors,
    stream_members,
};

mod table;
#[cfg(test)]
mod tests;

use table::{Filter, Kind, Query, Table, write_record};

type ResponseBody = BoxBody<Bytes, Infallible>;

/// The in-memory datastore; cheap to clone, all clones share the same records.
#[derive(Clone)]
pub struct Datastore {
    electors: Arc<RwLock<Table>>,
    members: Arc<RwLock<Table>>,
}

impl Datastore {
    pub fn new(data: DemoData) -> Self {
        Datastore::from_records(data.electors, data.members)
    }

    /// Builds the store one record at a time: with [`stream_electors`] and [`stream_members`]
    /// no more than one generated `Value` is alive at once, which is how to serve millions.
    pub fn from_records(
        electors: impl IntoIterator<Item = Value>,
        members: impl IntoIterator<Item = Value>,
    ) -> Self {
        Datastore {
            electors: Arc::new(RwLock::new(Table::new("elector_id", electors))),
            members: Arc::new(RwLock::new(Table::new("membership_number", members))),
        }
    }

    /// Generates the synthetic dataset straight into a store (see [`Datastore::from_records`]).
    pub fn generate(settings: &GenSettings, areas_toml: &str) -> anyhow::Result<Self> {
        let districts = polling_districts(areas_toml)?;
        if districts.is_empty() {
            anyhow::bail!("the area register defines no polling districts to put electors in");
        }
        Ok(Datastore::from_records(
            stream_electors(settings, &districts),
            stream_members(settings, &districts),
        ))
    }
}

/// A poisoned lock only means a writer panicked mid-update; the records are still usable.
fn read(t: &RwLock<Table>) -> RwLockReadGuard<'_, Table> {
    t.read().unwrap_or_else(|e| e.into_inner())
}

fn write(t: &RwLock<Table>) -> RwLockWriteGuard<'_, Table> {
    t.write().unwrap_or_else(|e| e.into_inner())
}

/// Serves until `shutdown` resolves, then lets open requests finish (for up to ten seconds).
pub async fn serve(
    listener: TcpListener,
    store: Datastore,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "demo datastore: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Latency only: a failure leaves Nagle on, which is harmless.
                let _ = stream.set_nodelay(true);
                let store = store.clone();
                let service = service_fn(move |req| {
                    let store = store.clone();
                    async move { Ok::<_, Infallible>(route(req, store).await) }
                });
                let conn = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "demo datastore: connection error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("demo datastore: connections still open after 10s; stopping anyway");
    }
    Ok(())
}

async fn route(req: Request<Incoming>, store: Datastore) -> Response<ResponseBody> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let segments: Vec<String> = path
        .strip_prefix('/')
        .unwrap_or(&path)
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let get = req.method() == Method::GET;
    let result = match segs.as_slice() {
        ["healthz"] if get => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        ["electors"] if get => list(&store.electors, &query, Kind::Electors),
        ["electors", "export"] if get => export(&store.electors, &query, Kind::Electors),
        ["members", "export"] if get => export(&store.members, &query, Kind::Members),
        ["electors", id] if get => one(&store.electors, id, &query, Kind::Electors),
        ["members"] if get => list(&store.members, &query, Kind::Members),
        ["members", id] if get => one(&store.members, id, &query, Kind::Members),
        ["electors", id, "canvass"] if req.method() == Method::POST => {
            let id = (*id).to_owned();
            canvass(&store.electors, &id, &query, req.into_body()).await
        }
        ["healthz"] | ["electors"] | ["electors", _] | ["members"] | ["members", _] => Err(
            Problem::new(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported here").allow("GET"),
        ),
        ["electors", _, "canvass"] => Err(Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "only POST is supported here",
        )
        .allow("POST")),
        _ => Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("no resource at `{path}`"),
        )),
    };
    result.unwrap_or_else(Problem::into_response)
}

// ---- responses ----

struct Problem {
    status: StatusCode,
    detail: String,
    allow: Option<&'static str>,
}

impl Problem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            detail: detail.into(),
            allow: None,
        }
    }

    fn bad(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    fn allow(mut self, methods: &'static str) -> Problem {
        self.allow = Some(methods);
        self
    }

    fn into_response(self) -> Response<ResponseBody> {
        let title = self
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_lowercase();
        let body = json!({
            "type": "about:blank",
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let body = Full::new(Bytes::from(body)).boxed();
        let mut resp = respond(self.status, "application/problem+json", body);
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        resp
    }
}

/// A `200 OK` with a JSON body already written out.
fn json_ok(body: Vec<u8>) -> Response<ResponseBody> {
    respond(
        StatusCode::OK,
        "application/json",
        Full::new(Bytes::from(body)).boxed(),
    )
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: ResponseBody,
) -> Response<ResponseBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<ResponseBody> {
    let body = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    respond(
        status,
        "application/json",
        Full::new(Bytes::from(body)).boxed(),
    )
}

/// Filters `/electors` and `/electors/export` accept.
const ELECTOR_FILTERS: &[&str] = &[
    "ward",
    "constituency",
    "local_authority",
    "polling_district",
    "areas",
    "postcode",
];

/// The filters a listing or export of `kind` takes.
fn filters_of(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Electors => ELECTOR_FILTERS,
        Kind::Members => &["branch", "clp", "status", "areas"],
    }
}

fn list(lock: &RwLock<Table>, query: &str, kind: Kind) -> Result<Response<ResponseBody>, Problem> {
    let filters = filters_of(kind);
    let q = Query::parse(
        query,
        &[filters, &["fields", "page", "per_page", "exclude"]].concat(),
    )?;
    let (page, per_page) = (
        q.number("page", 1, 10_000_000)?,
        q.number("per_page", 100, 1000)?,
    );
    let fields = q.fields(kind)?;
    let table = read(lock);
    let filter = Filter::new(&q, kind, &table)?;
    let skip = (page - 1).saturating_mul(per_page);
    let mut hits = filter
        .candidates(&table)
        .filter(|&pos| filter.matches(&table, pos))
        .skip(skip);
    let mut out = b"{\"records\":[".to_vec();
    for (n, row) in hits
        .by_ref()
        .take(per_page)
        .filter_map(|pos| table.rows.get(pos))
        .enumerate()
    {
        if n > 0 {
            out.push(b',');
        }
        write_record(&mut out, row, fields.as_ref(), table.id_key);
    }
    let next_page = match hits.next() {
        Some(_) => (page + 1).to_string(),
        None => "null".to_owned(),
    };
    let tail = format!("],\"page\":{page},\"per_page\":{per_page},\"next_page\":{next_page}}}");
    out.extend_from_slice(tail.as_bytes());
    Ok(json_ok(out))
}

fn one(
    lock: &RwLock<Table>,
    id: &str,
    query: &str,
    kind: Kind,
) -> Result<Response<ResponseBody>, Problem> {
    let fields = Query::parse(query, &["fields"])?.fields(kind)?;
    let table = read(lock);
    let Some(row) = table.by_id.get(id).and_then(|&pos| table.rows.get(pos)) else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("no record `{id}`"),
        ));
    };
    let mut out = b"{\"record\":".to_vec();
    write_record(&mut out, row, fields.as_ref(), table.id_key);
    out.push(b'}');
    Ok(json_ok(out))
}

/// The body of an export: NDJSON chunks arriving through a bounded channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

const EXPORT_CHUNK: usize = 64 * 1024;

fn export(
    lock: &Arc<RwLock<Table>>,
    query: &str,
    kind: Kind,
) -> Result<Response<ResponseBody>, Problem> {
    let q = Query::parse(query, &[filters_of(kind), &["fields", "exclude"]].concat())?;
    let fields = q.fields(kind)?;
    let filter = Filter::new(&q, kind, &read(lock))?;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let lock = Arc::clone(lock);
    tokio::spawn(async move {
        // Scan in id order, taking the lock only while filling one chunk, so writers are
        // never starved and memory stays at a few chunks whatever the size of the export.
        let mut pos = 0;
        loop {
            let mut chunk = Vec::with_capacity(EXPORT_CHUNK + 4096);
            let done = {
                let table = read(&lock);
                while chunk.len() < EXPORT_CHUNK && pos < table.rows.len() {
                    if filter.matches(&table, pos)
                        && let Some(row) = table.rows.get(pos)
                    {
                        write_record(&mut chunk, row, fields.as_ref(), table.id_key);
                        chunk.push(b'\n');
                    }
                    pos += 1;
                }
                pos >= table.rows.len()
            };
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return; // the client went away
            }
            if done {
                return;
            }
        }
    });
    Ok(respond(
        StatusCode::OK,
        "application/x-ndjson",
        ChannelBody(rx).boxed(),
    ))
}

async fn canvass(
    lock: &RwLock<Table>,
    id: &str,
    query: &str,
    body: Incoming,
) -> Result<Response<ResponseBody>, Problem> {
    Query::parse(query, &[])?;
    let bytes = match Limited::new(body, 64 * 1024).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "canvass body over 64 KiB",
            ));
        }
    };
    let update: serde_json::Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|e| Problem::bad(format!("body must be a JSON object: {e}")))?;
    let one_of = |v: &Value, allowed: &[&str]| v.as_str().is_some_and(|s| allowed.contains(&s));
    let list_of = |v: &Value, allowed: &[&str]| {
        v.as_array()
            .is_some_and(|a| a.iter().all(|i| one_of(i, allowed)))
    };
    for (key, value) in &update {
        let ok = match key.as_str() {
            "voting_intention" => value.is_null() || one_of(value, INTENTION_CODES),
            "canvass_issues" => list_of(value, ISSUES),
            "last_canvassed" => value.is_null() || value.as_str().is_some_and(is_date),
            "flags_add" => list_of(value, &["do_not_contact"]),
            _ => return Err(Problem::bad(format!("unknown canvass key `{key}`"))),
        };
        if !ok {
            return Err(Problem::bad(format!("invalid value for `{key}`")));
        }
    }
    let mut table = write(lock);
    let pos = table.by_id.get(id).copied();
    let Some(row) = pos.and_then(|pos| table.rows.get_mut(pos)) else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("no record `{id}`"),
        ));
    };
    let mut record: serde_json::Map<String, Value> =
        serde_json::from_str(&row.json).map_err(|_| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "stored record is corrupt",
            )
        })?;
    let markers = record.get("markers").and_then(Value::as_array);
    if markers.is_some_and(|m| m.iter().any(|x| x == "N")) {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "an anonymous entry cannot hold canvass data",
        ));
    }
    for (key, value) in update {
        if key == "flags_add" {
            let flags = record.entry("flags").or_insert_with(|| json!([]));
            if let (Some(flags), Some(add)) = (flags.as_array_mut(), value.as_array()) {
                for flag in add {
                    if !flags.contains(flag) {
                        flags.push(flag.clone());
                    }
                }
            }
        } else {
            record.insert(key, value);
        }
    }
    let json = serde_json::to_string(&record)
        .map_err(|_| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the record"))?;
    let body = format!("{{\"record\":{json}}}").into_bytes();
    row.protected = table::protected(&Value::Object(record));
    row.json = json.into();
    Ok(json_ok(body))
}

fn is_date(s: &str) -> bool {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    s.len() == 10 && time::Date::parse(s, format).is_ok()
}
