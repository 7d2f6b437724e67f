//! Streamed exports end to end: the export discloses exactly what paging would, chunk by
//! chunk audited with exactly the subjects each chunk carried, only to national roles, and a
//! datastore that sends something that is not a record gets nothing through.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use bytes::Bytes;
use common::{AppOptions, TestApp, Tmpfs, fill, read_audit, spawn_app_with};
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::net::TcpListener;

/// Every byte of a body that arrived, frame by frame, and the error that cut it short.
async fn read_all(mut body: hyper::body::Incoming) -> (Vec<u8>, Result<(), String>) {
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => got.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            Err(e) => return (got, Err(e.to_string())),
        }
    }
    (got, Ok(()))
}

/// The export's body, or the error that cut it short (saying how many bytes had arrived).
async fn export(
    app: &TestApp,
    token: &str,
    query: &str,
) -> (StatusCode, Result<Vec<Value>, String>) {
    let resp = open_export(app.addr, token, query).await;
    let status = resp.status();
    let (bytes, ended) = read_all(resp.into_body()).await;
    if let Err(e) = ended {
        return (
            status,
            Err(format!("body cut short after {} bytes: {e}", bytes.len())),
        );
    }
    if status != StatusCode::OK {
        return (status, Err(String::from_utf8_lossy(&bytes).into_owned()));
    }
    let lines = std::str::from_utf8(&bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (status, Ok(lines))
}

/// `GET /voter/electors/export{query}` under `profiling` with `token`, over HTTP/1.1: the
/// answer, its body still to read.
async fn open_export(
    addr: std::net::SocketAddr,
    token: &str,
    query: &str,
) -> Response<hyper::body::Incoming> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{addr}/voter/electors/export{query}"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-purpose", "profiling")
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.request(req).await.unwrap()
}

/// The ids of the demo datastore's entries that must never leave (anonymous electors,
/// under-16s), by the rules worked out here (`common::never_disclosed`), not by the gateway's
/// code: and the datastore's `exclude=protected` leaves out exactly those.
async fn protected_ids(datastore: std::net::SocketAddr) -> std::collections::BTreeSet<String> {
    let records = |bytes: Bytes| -> Vec<Value> {
        (std::str::from_utf8(&bytes).unwrap().lines())
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect()
    };
    let id = |r: &Value| r["elector_id"].as_str().unwrap().to_owned();
    let everyone = records(common::datastore_body(datastore, "/electors/export").await);
    let protected: std::collections::BTreeSet<String> = (everyone.iter())
        .filter(|r| common::never_disclosed(r))
        .map(id)
        .collect();
    let open: std::collections::BTreeSet<String> =
        (records(common::datastore_body(datastore, "/electors/export?exclude=protected").await)
            .iter())
        .map(id)
        .collect();
    let all: std::collections::BTreeSet<String> = everyone.iter().map(id).collect();
    assert_eq!(
        all.difference(&open)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        protected,
        "the datastore's exclude=protected leaves out exactly the entries never disclosed"
    );
    protected
}

fn ids(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_discloses_what_paging_would_audited_chunk_by_chunk() {
    let app = spawn_app_with(AppOptions {
        electors: Some(20_000),
        ..AppOptions::default()
    })
    .await;
    let analyst = app.token("analyst");
    let (status, body) = export(&app, &analyst, "").await;
    assert_eq!(status, StatusCode::OK);
    let exported = body.unwrap();
    assert!(exported.len() > 15_000, "{} records", exported.len());

    // The same principal paging through the same listing sees exactly the same records, with
    // exactly the same fields.
    let mut paged = Vec::new();
    for page in 1.. {
        let r = app
            .get(
                &format!("/voter/electors?per_page=1000&page={page}"),
                Some(&analyst),
                Some("profiling"),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let records = r.json()["records"].as_array().unwrap().clone();
        if records.is_empty() {
            break;
        }
        paged.extend(records);
    }
    assert_eq!(exported, paged);
    // Nothing about an anonymous elector or an under-16: none of the register's protected
    // entries (profiling sees neither markers nor flags, so they are found in the register
    // itself). The datastore left them out when asked; that the gateway withholds them when
    // it does not is `an_export_from_a_datastore_that_ignores_exclude_...`.
    let protected = protected_ids(app.upstream).await;
    assert!(
        !protected.is_empty(),
        "the register holds protected entries"
    );
    let leaked: Vec<String> = (ids(&exported).into_iter())
        .filter(|id| protected.contains(id))
        .collect();
    assert!(leaked.is_empty(), "protected entries left: {leaked:?}");

    // The log: a start, chunks whose subjects are exactly what left, and an end.
    let records: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["route"] == "voter.export")
        .collect();
    assert_eq!(records[0]["detail"]["export"], "started");
    assert_eq!(records[0]["subjects"].as_array().unwrap().len(), 0);
    let chunks: Vec<&Value> = records
        .iter()
        .filter(|r| r["detail"]["export_chunk"].is_u64())
        .collect();
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    let audited: Vec<String> = chunks
        .iter()
        .flat_map(|r| r["subjects"].as_array().unwrap())
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(audited, ids(&exported));
    // Each chunk's record names exactly the fields its records carried.
    let mut offset = 0;
    for chunk in &chunks {
        let n = chunk["subjects"].as_array().unwrap().len();
        let mut carried: Vec<String> = exported[offset..offset + n]
            .iter()
            .flat_map(|r| r.as_object().unwrap().keys().cloned())
            .collect();
        carried.sort();
        carried.dedup();
        let named: Vec<String> = chunk["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(named, carried);
        offset += n;
    }
    let last = records.last().unwrap();
    assert_eq!(
        last["detail"]["export_complete"]["records"].as_u64(),
        Some(exported.len() as u64)
    );
    assert!(
        chunks
            .iter()
            .all(|r| r["request_id"] == records[0]["request_id"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_for_national_roles_and_take_no_paging() {
    let app = spawn_app_with(AppOptions::default()).await;
    let councillor = app.token("councillor");
    let r = app
        .get(
            "/voter/electors/export",
            Some(&councillor),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.json()["policy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "dataset.export-national-roles-only")
    );
    let r = app
        .get(
            "/voter/electors/export?per_page=10",
            Some(&app.token("analyst")),
            Some("profiling"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Filters narrow an export as they narrow a listing.
    let (status, body) = export(&app, &app.token("analyst"), "?ward=E05011391").await;
    assert_eq!(status, StatusCode::OK);
    let body = body.unwrap();
    assert!(!body.is_empty());
    assert!(body.iter().all(|r| r["ward"] == "E05011391"));
}

/// HTTP/1.0 ends a body by closing the connection, so an export cut short (a revocation, a
/// bad line, the audit log failing) would reach an HTTP/1.0 client, or a proxy speaking
/// HTTP/1.0 to the gateway (nginx's default), as a whole one: it is refused before the
/// datastore is asked, and the refusal says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_over_http_1_0_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(AppOptions::default()).await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let ask = format!(
        "GET /voter/electors/export?ward=E05011391 HTTP/1.0\r\nHost: wardgate\r\n\
         Authorization: Bearer {}\r\nX-Purpose: profiling\r\n\r\n",
        app.token("analyst")
    );
    stream.write_all(ask.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert_eq!(head.split(' ').nth(1), Some("505"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{head}"
    );
    let problem: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        problem["type"],
        "urn:wardgate:problem:http-version-not-supported"
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("HTTP/1.1"),
        "{problem}"
    );
    assert!(!body.contains("elector_id"), "{body}");
    let records: Vec<Value> = (app.audit_records().into_iter())
        .filter(|r| r["route"] == "voter.export")
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["reason"], "http_version_not_supported");
    assert_eq!(
        records[0]["detail"]["filters"]["ward"], "E05011391",
        "{records:?}"
    );
    assert_eq!(records[0]["subjects"], serde_json::json!([]));
    // The same export over HTTP/1.1 streams.
    let (status, body) = export(&app, &app.token("analyst"), "?ward=E05011391").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.unwrap().is_empty());
}

/// A datastore that answers an export with `lines` in a body that ends where the connection
/// closes (no length, no chunks): as a datastore that crashed mid-export would look.
async fn datastore_closing_after(lines: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                     connection: close\r\n\r\n{lines}"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// NDJSON has no end marker: a datastore's body that ends where its connection closes
/// cannot be told whole from cut short, so neither an export nor a count is made of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_body_ended_by_the_connection_closing_is_refused() {
    let real = spawn_app_with(AppOptions::default()).await;
    let lines = String::from_utf8(
        common::datastore_body(real.upstream, "/electors/export?ward=E05011391")
            .await
            .to_vec(),
    )
    .unwrap();
    let some: String = lines.lines().take(3).map(|l| format!("{l}\n")).collect();
    assert_eq!(some.lines().count(), 3);
    let upstream = datastore_closing_after(some).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..AppOptions::default()
    })
    .await;
    let (status, body) = export(&app, &app.token("analyst"), "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");
    assert!(body.unwrap_err().contains("upstream-response-malformed"));
    let r = app
        .get(
            "/voter/electors/aggregate?local_authority=E08000035&ward=E05011391&by=polling_district",
            Some(&app.token("analyst")),
            Some("research"),
        )
        .await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let records: Vec<Value> = (app.audit_records().into_iter())
        .filter(|r| r["route"] == "voter.export")
        .collect();
    assert!(
        records
            .iter()
            .all(|r| r["subjects"].as_array().unwrap().is_empty()
                && r["reason"] != "export_complete"),
        "{records:?}"
    );
}

/// A datastore whose export turns into garbage after `good` records.
async fn bad_datastore(good: String) -> std::net::SocketAddr {
    fixed_datastore(format!("{good}this is not a record\n{good}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_that_is_not_a_record_stops_the_export_and_nothing_after_it_leaves() {
    // Real records to start with, taken from the demo datastore through the analyst's export.
    let real = spawn_app_with(AppOptions::default()).await;
    let (_, body) = export(&real, &real.token("analyst"), "?ward=E05011391").await;
    let upstream_lines: String = {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let uri = format!("http://{}/electors/export?ward=E05011391", real.upstream);
        let resp = client.get(uri.parse().unwrap()).await.unwrap();
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    };
    assert!(!body.unwrap().is_empty());
    let upstream = bad_datastore(upstream_lines).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..AppOptions::default()
    })
    .await;
    let (status, body) = export(&app, &app.token("analyst"), "").await;
    assert_eq!(status, StatusCode::OK);
    let err = body.unwrap_err();
    // Not a byte of a record reached the client.
    assert!(err.contains("cut short after 0 bytes"), "{err}");
    // The bad line came before the first chunk was full: nothing was released, nothing audited
    // as disclosed, and the log says why the export ended.
    let records: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["route"] == "voter.export")
        .collect();
    let disclosed: usize = records
        .iter()
        .map(|r| r["subjects"].as_array().unwrap().len())
        .sum();
    assert_eq!(disclosed, 0);
    let last = records.last().unwrap();
    assert_eq!(last["reason"], "export_aborted");
    assert_eq!(last["decision"], "error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_that_fills_mid_export_cuts_it_after_the_last_durable_chunk() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("audit");
    let Some(_tmpfs) = Tmpfs::mount_or_skip(&mount, "2m") else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        electors: Some(20_000),
        audit_dir: Some(mount.clone()),
        ..AppOptions::default()
    })
    .await;
    // Room for the export's first record and about three chunks' (each lists some 2,400
    // subjects, about 35 KB), of the seven or so the whole export takes.
    fill(&mount);
    let filler = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.join("filler"))
        .unwrap();
    let full = filler.metadata().unwrap().len();
    filler.set_len(full.saturating_sub(100 << 10)).unwrap();
    drop(filler);

    let resp = open_export(app.addr, &app.token("analyst"), "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = Vec::new();
    let cut = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    received.extend_from_slice(data);
                }
            }
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(cut, "the export must be cut short when its log is full");
    let received: Vec<Value> = std::str::from_utf8(&received)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !received.is_empty() && received.len() < 15_000,
        "{} records arrived: the room left should take some chunks, not all",
        received.len()
    );

    // Exactly the records whose chunk records are durable arrived, in order: none before its
    // record, none after the first record that could not be written.
    std::fs::remove_file(mount.join("filler")).unwrap();
    let report = wardgate::audit::verify_dir(&mount).unwrap();
    let records = read_audit(&mount);
    assert_eq!(report.records as usize, records.len());
    let audited: Vec<String> = records
        .iter()
        .filter(|r| r["route"] == "voter.export" && r["detail"]["export_chunk"].is_u64())
        .flat_map(|r| r["subjects"].as_array().unwrap())
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(audited, ids(&received));
}

/// A disk that stops without failing in the middle of an export (frozen, as one retrying for
/// minutes), while other requests fill the log's queue, cuts the export within the stalled
/// log's bound rather than holding the client, its slot and the datastore's stream until the
/// disk moves; the closing record, which names what was recorded and never sent, lands once
/// it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_audit_disk_stalls_is_cut_and_says_so_once_it_moves() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("disk");
    let Some(disk) = common::FreezableDisk::mount_or_skip(&mount) else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        electors: Some(20_000),
        audit_dir: Some(mount.join("log")),
        // A queue of four records: the requests below fill it.
        edit: Some(Box::new(|c| c.audit.max_batch = 1)),
        ..AppOptions::default()
    })
    .await;
    let resp = open_export(app.addr, &app.token("analyst"), "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    disk.freeze();
    let token = app.token("canvasser");
    let pages = futures_util::future::join_all((0..8).map(|_| {
        app.get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
    }));
    let rest = async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(_)) => break true,
                None => break false,
            }
        }
    };
    let (pages, cut) = tokio::time::timeout(std::time::Duration::from_secs(90), async {
        tokio::join!(pages, rest)
    })
    .await
    .expect("an export waiting for a stalled log was never cut");
    assert!(cut, "an export whose log stalled must not end as complete");
    assert!(pages.iter().all(|r| r.status == 503));
    disk.thaw();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let closing = export_records(&app)
            .0
            .into_iter()
            .find(|r| r["detail"]["export_aborted"].is_string());
        if let Some(closing) = closing {
            assert_eq!(closing["detail"]["export_aborted"], "audit_unavailable");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no closing record");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// A datastore whose export sends `first`, then waits for `go` before sending `rest`.
async fn paused_datastore(
    first: String,
    rest: String,
    go: std::sync::Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    paused_datastore_telling(first, rest, go, std::sync::Arc::default()).await
}

/// `paused_datastore`, which also says (`arrived`) when the request has come.
async fn paused_datastore_telling(
    first: String,
    rest: String,
    go: std::sync::Arc<tokio::sync::Notify>,
    arrived: std::sync::Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    datastore_sending(first, rest, go, arrived, false).await
}

/// `paused_datastore_telling`; with `hang`, the body never ends after `rest`.
async fn datastore_sending(
    first: String,
    rest: String,
    go: std::sync::Arc<tokio::sync::Notify>,
    arrived: std::sync::Arc<tokio::sync::Notify>,
    hang: bool,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |_req| {
            arrived.notify_one();
            let parts = [(first.clone(), None), (rest.clone(), Some(go.clone()))];
            let tail = if hang {
                futures_util::stream::pending().boxed()
            } else {
                futures_util::stream::empty().boxed()
            };
            let frames = futures_util::stream::iter(parts)
                .then(|(text, wait)| async move {
                    if let Some(go) = wait {
                        go.notified().await;
                    }
                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(text)))
                })
                .chain(tail);
            async move {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .header("content-type", "application/x-ndjson")
                        .body(http_body_util::StreamBody::new(frames))
                        .unwrap(),
                )
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
    addr
}

/// An analyst's export through a datastore that pauses after three quarters of 10,000
/// electors (two chunks or more of output: the first goes once the second is queued), read
/// until the first chunk has begun to arrive. Returns the app, what to notify to let the
/// datastore go on, the body still to read and what has arrived.
async fn paused_export() -> (
    TestApp,
    std::sync::Arc<tokio::sync::Notify>,
    hyper::body::Incoming,
    Vec<u8>,
) {
    let (real, stop) = common::start_datastore(10_000).await;
    let all = common::datastore_body(real, "/electors/export").await;
    drop(stop);
    let lines: Vec<&str> = std::str::from_utf8(&all).unwrap().lines().collect();
    assert_eq!(lines.len(), 10_000);
    let cut = lines.len() * 3 / 4;
    let join = |ls: &[&str]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let upstream = paused_datastore(join(&lines[..cut]), join(&lines[cut..]), go.clone()).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..AppOptions::default()
    })
    .await;
    let resp = open_export(app.addr, &app.token("analyst"), "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = Vec::new();
    while !received.ends_with(b"\n") || received.is_empty() {
        let frame = body.frame().await.unwrap().unwrap();
        received.extend_from_slice(frame.data_ref().unwrap());
    }
    (app, go, body, received)
}

/// The security team revokes the analyst whose export is under way.
async fn revoke_the_analyst(app: &TestApp) {
    let revoked = app
        .admin_post(
            "/revocations",
            &app.token("security"),
            r#"{"subject":"demo-analyst","reason":"bulk export under investigation"}"#,
        )
        .await;
    assert_eq!(revoked.status, 200, "{:?}", revoked.body);
}

/// Reads the rest of an export's body: whether it was cut short, and every record received.
async fn rest_of(mut body: hyper::body::Incoming, mut received: Vec<u8>) -> (bool, Vec<Value>) {
    let cut_short = loop {
        match body.frame().await {
            Some(Ok(frame)) => received.extend_from_slice(frame.data_ref().unwrap()),
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    let received = std::str::from_utf8(&received)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (cut_short, received)
}

/// The export's audit records: all of them, and its chunk records.
fn export_records(app: &TestApp) -> (Vec<Value>, Vec<Value>) {
    let records: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["route"] == "voter.export")
        .collect();
    let chunks = records
        .iter()
        .filter(|r| r["detail"]["export_chunk"].is_u64())
        .cloned()
        .collect();
    (records, chunks)
}

/// Containment must reach an export already under way: once the caller is revoked, not one
/// more chunk leaves, not even the one whose record was written before the revocation was
/// seen, and the log says how the export ended and how much had gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_stops_an_export_under_way_at_the_next_chunk() {
    let (app, go, body, received) = paused_export().await;
    revoke_the_analyst(&app).await;
    go.notify_one();
    let (cut_short, received) = rest_of(body, received).await;
    assert!(
        cut_short,
        "a revoked caller's export must not end as complete"
    );
    let (records, chunks) = export_records(&app);
    // The chunks that went are the first ones, exactly as received; at least one chunk
    // recorded before the revocation was seen did not go, and nothing after it did.
    let last = records.last().unwrap();
    let before = &last["detail"]["before"];
    let went = before["chunks"].as_u64().unwrap() as usize;
    assert!(went >= 1 && went < chunks.len(), "{last}");
    assert_eq!(
        before["chunks_recorded"].as_u64().unwrap() as usize,
        chunks.len()
    );
    let first: Vec<String> = chunks[..went]
        .iter()
        .flat_map(|c| c["subjects"].as_array().unwrap())
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids(&received), first);
    assert_eq!(before["records"], received.len() as u64, "{last}");
    not_sent_named(last, &chunks[went..]);
    // Refused as a request with the revoked token would be (breach detection reads it).
    assert_eq!(last["decision"], "deny", "{last}");
    assert_eq!(last["reason"], "token_revoked", "{last}");
    assert_eq!(last["detail"]["export_aborted"], "token_revoked", "{last}");
}

/// An export whose records are all withheld fills no chunk: a revocation must still stop it
/// at the datastore's next batch, not when the datastore's body ends (here it never does),
/// so that it does not hold the caller's slot and the datastore's stream meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_stops_an_export_that_fills_no_chunk() {
    let real = spawn_app_with(AppOptions::default()).await;
    let everyone = common::datastore_body(real.upstream, "/electors/export").await;
    let protected = protected_ids(real.upstream).await;
    real.stop().await;
    // Only entries never disclosed, from a datastore that ignores `exclude`.
    let withheld: String = (std::str::from_utf8(&everyone).unwrap().lines())
        .filter(|l| {
            let id = serde_json::from_str::<Value>(l).unwrap()["elector_id"].clone();
            protected.contains(id.as_str().unwrap())
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!withheld.is_empty());
    // Each part more than one batch the filter takes at once (256 KiB), so that each is read
    // as it comes.
    let part = withheld.repeat((300 << 10) / withheld.len() + 1);
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let upstream = datastore_sending(part.clone(), part, go.clone(), arrived.clone(), true).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..AppOptions::default()
    })
    .await;
    let (analyst, addr) = (app.token("analyst"), app.addr);
    let client = tokio::spawn(async move {
        let resp = open_export(addr, &analyst, "").await;
        read_all(resp.into_body()).await
    });
    arrived.notified().await;
    revoke_the_analyst(&app).await;
    go.notify_one();
    // Well within the datastore's idle timeout (30 s), which would otherwise end it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let last = loop {
        let (records, _) = export_records(&app);
        if let Some(last) = records
            .iter()
            .find(|r| !r["detail"]["export_aborted"].is_null())
        {
            break last.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the export went on after the revocation: {records:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(last["detail"]["export_aborted"], "token_revoked", "{last}");
    assert_eq!(last["detail"]["before"]["records"], 0, "{last}");
    // Nothing left, and the body did not end as a whole export.
    let (got, ended) = tokio::time::timeout(std::time::Duration::from_secs(10), client)
        .await
        .unwrap()
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    app.stop().await;
}

/// The closing record `last` names the chunks recorded and never sent (`unsent`), by number
/// and by their subjects, so that a subject access search finds it beside them.
fn not_sent_named(last: &Value, unsent: &[Value]) {
    let numbers: Vec<&Value> = unsent
        .iter()
        .map(|c| &c["detail"]["export_chunk"])
        .collect();
    assert!(!numbers.is_empty());
    assert_eq!(
        last["detail"]["chunks_not_sent"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        numbers,
        "{last}"
    );
    let subjects: Vec<&Value> = (unsent.iter())
        .flat_map(|c| c["subjects"].as_array().unwrap())
        .collect();
    assert_eq!(
        last["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        subjects,
        "{last}"
    );
}

/// Reads the rest of a paused export let go after something that must stop it: it ends cut
/// short, after its first chunk and before its last, having sent exactly the records its
/// closing record counts. That record.
async fn cut_after_a_chunk(
    app: &TestApp,
    body: hyper::body::Incoming,
    received: Vec<u8>,
) -> serde_json::Value {
    let (cut_short, received) = rest_of(body, received).await;
    assert!(cut_short, "the export must not end as complete");
    let (records, chunks) = export_records(app);
    let last = records.last().unwrap().clone();
    let before = &last["detail"]["before"];
    let went = before["chunks"].as_u64().unwrap() as usize;
    assert!(went >= 1 && went < chunks.len(), "{last}");
    assert_eq!(before["records"], received.len() as u64, "{last}");
    last
}

/// A key replaced by a reload (`SIGHUP`, here `rekey::reload_keys`, which it runs) stops an
/// export its tokens opened at the next chunk, as a revocation does: no chunk recorded after
/// the reload goes, and the export's closing record says `token_key_unknown` (as an error, not
/// a refusal: the caller did nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_replaced_by_a_reload_stops_an_export_under_way() {
    let (app, go, body, received) = paused_export().await;
    // The identity provider rotated the key under the same id.
    let rotated = wardgate::token::generate_es256().unwrap();
    let key_file = (app.dir.path()).join(format!("keys/{}.pub.pem", wardgate::demo::KID));
    std::fs::write(key_file, &rotated.public_pem).unwrap();
    wardgate::rekey::reload_keys(&app.gw).await.unwrap();
    go.notify_one();
    let last = cut_after_a_chunk(&app, body, received).await;
    // A rotation is no act of the caller's: an error, not a refusal breach detection counts.
    assert_eq!(last["decision"], "error", "{last}");
    assert_eq!(last["reason"], "export_aborted", "{last}");
    assert_eq!(
        last["detail"]["export_aborted"], "token_key_unknown",
        "{last}"
    );
}

/// A policy pack put in force by a reload (`rekey::reload_policy`) stops an export begun under
/// the one before at its next chunk: the new pack may forbid what the export carries.
/// Adds a policy (and its fixture) to the app's pack and reloads it: a pack whose policies
/// differ, so one that may forbid what a long read under way carries.
async fn reload_a_pack_that_decides_otherwise(app: &TestApp) {
    let pack = app.dir.path().join("policies");
    std::fs::write(
        pack.join("suspensions.cedar"),
        "@id(\"test.branch-suspended\")\nforbid (principal, action, resource)\nwhen { context.caller.unit == \"SUSPENDED-BRANCH\" };\n",
    )
    .unwrap();
    std::fs::write(
        pack.join("tests/deny/branch-suspended.json"),
        r#"{"description": "a suspended branch lists nothing", "caller": {"role": "councillor", "unit": "SUSPENDED-BRANCH", "areas": ["E05011391"], "purposes": ["canvassing"]}, "purpose": "canvassing", "action": "list", "dataset": "voter", "expect_policies": ["test.branch-suspended"]}"#,
    )
    .unwrap();
    wardgate::rekey::reload_policy(&app.gw).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_stops_an_export_under_way() {
    let (app, go, body, received) = paused_export().await;
    reload_a_pack_that_decides_otherwise(&app).await;
    go.notify_one();
    let last = cut_after_a_chunk(&app, body, received).await;
    assert_eq!(last["decision"], "error", "{last}");
    assert_eq!(last["reason"], "export_aborted", "{last}");
    assert_eq!(
        last["detail"]["export_aborted"], "policy_reloaded",
        "{last}"
    );
}

/// An aggregate reads the whole register as an export does, so a pack put in force meanwhile
/// that decides otherwise stops it too: 503 `policy-reloaded`, and nothing counted is shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_stops_an_aggregate_under_way() {
    let (real, stop) = common::start_datastore(2_000).await;
    let all = common::datastore_body(real, "/electors/export").await;
    drop(stop);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let text = std::str::from_utf8(&all).unwrap();
    let cut = text.len() / 2 + text[text.len() / 2..].find('\n').unwrap() + 1;
    let (go, arrived) = (std::sync::Arc::default(), std::sync::Arc::default());
    let upstream = paused_datastore_telling(
        text[..cut].to_owned(),
        text[cut..].to_owned(),
        std::sync::Arc::clone(&go),
        std::sync::Arc::clone(&arrived),
    )
    .await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..AppOptions::default()
    })
    .await;
    let asked = {
        let (addr, token) = (app.addr, app.token("analyst"));
        tokio::spawn(async move {
            let req = Request::get(format!(
                "http://{addr}/voter/electors/aggregate?by=constituency"
            ))
            .header("authorization", format!("Bearer {token}"))
            .header("x-purpose", "research")
            .body(Full::new(Bytes::new()))
            .unwrap();
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            (status, resp.into_body().collect().await.unwrap().to_bytes())
        })
    };
    arrived.notified().await;
    reload_a_pack_that_decides_otherwise(&app).await;
    go.notify_one();
    let (status, body) = asked.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:wardgate:problem:policy-reloaded");
    assert!(problem.get("cells").is_none());
    let last = (app.audit_records().into_iter())
        .rfind(|r| r["route"] == "voter.aggregate")
        .unwrap();
    assert_eq!(last["reason"], "policy_reloaded", "{last}");
    assert_eq!(last["fields"].as_array().unwrap().len(), 0, "{last}");
}

/// A reload that changed only the pack's tests changes nothing that decides: an export under
/// way runs to its end (the reload is in force and recorded all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_the_tests_alone_leaves_an_export_running() {
    let (app, go, body, received) = paused_export().await;
    let tests = app.dir.path().join("policies/tests/allow");
    let copy = std::fs::read(tests.join("analyst-profiling-export-national.json")).unwrap();
    std::fs::write(tests.join("analyst-profiling-export-again.json"), copy).unwrap();
    wardgate::rekey::reload_policy(&app.gw).await.unwrap();
    let reloaded = (app.audit_records().into_iter())
        .filter(|r| r["reason"] == "policy_reloaded")
        .count();
    assert_eq!(reloaded, 1);
    go.notify_one();
    let (cut_short, _) = rest_of(body, received).await;
    assert!(
        !cut_short,
        "an export stopped by a reload of the tests alone"
    );
    let (records, _) = export_records(&app);
    let last = records.last().unwrap();
    assert!(last["detail"]["export_complete"].is_object(), "{last}");
}

/// A restriction placed on someone in a chunk already filtered (and recorded) but not yet
/// sent, as a client that stops reading can hold one for as long as it likes: that chunk
/// never goes, and the export ends saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restriction_placed_on_a_filtered_chunk_keeps_it_back() {
    let (app, go, body, received) = paused_export().await;
    // The second chunk's record is queued before the first chunk goes.
    let mut second = None;
    for _ in 0..200 {
        let (_, chunks) = export_records(&app);
        if let Some(c) = chunks.iter().find(|c| c["detail"]["export_chunk"] == 2) {
            second = Some(c.clone());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let second = second.expect("the second chunk's record");
    let someone = second["subjects"][0].as_str().unwrap().to_owned();
    let placed = app
        .admin_post(
            &format!("/rights/{someone}"),
            &app.token("dpo"),
            r#"{"kind":"restricted","reference":"R-9","reason":"by letter"}"#,
        )
        .await;
    assert_eq!(placed.status, 200, "{:?}", placed.body);
    go.notify_one();
    let (cut_short, received) = rest_of(body, received).await;
    assert!(cut_short, "the export must not end as complete");
    assert!(
        !ids(&received).contains(&someone),
        "{someone} left after restriction"
    );
    let (records, chunks) = export_records(&app);
    let last = records.last().unwrap();
    let went = last["detail"]["before"]["chunks"].as_u64().unwrap() as usize;
    assert_eq!(went, 1, "{last}");
    let first: Vec<&str> = chunks[0]["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(ids(&received), first);
    assert_eq!(
        last["detail"]["export_aborted"], "rights_register_changed",
        "{last}"
    );
    not_sent_named(last, &chunks[went..]);
    // The person restricted is not told of a disclosure that never happened.
    let sar = app
        .admin_get_with(&format!("/sar/{someone}"), &app.token("dpo"))
        .await;
    assert_eq!(sar.status, 200, "{:?}", sar.body);
    let disclosures = sar.json()["disclosures"].clone();
    assert!(
        !(disclosures.as_array().unwrap().iter()).any(|d| d["request_id"] == last["request_id"]),
        "{disclosures}"
    );
}

/// A datastore whose export answers every request with `body`, whatever it was asked.
async fn fixed_datastore(body: String) -> std::net::SocketAddr {
    common::fixed_upstream(
        Bytes::from(body),
        "application/x-ndjson",
        std::time::Duration::ZERO,
    )
    .await
}

/// The demo datastore honours `exclude=protected`, so an export through it cannot show the
/// gateway withholding anonymous electors and under-16s. A datastore that ignores it (and the
/// area narrowing) sends the whole register, them included: none of them leaves, and no
/// chunk's record names one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_from_a_datastore_that_ignores_exclude_still_leaves_out_the_protected() {
    let real = spawn_app_with(AppOptions::default()).await;
    let everyone = common::datastore_body(real.upstream, "/electors/export").await;
    let everyone = String::from_utf8(everyone.to_vec()).unwrap();
    let protected = protected_ids(real.upstream).await;
    assert!(
        !protected.is_empty(),
        "the register holds protected entries"
    );
    real.stop().await;

    let app = spawn_app_with(AppOptions {
        upstream: Some(fixed_datastore(everyone).await),
        ..AppOptions::default()
    })
    .await;
    let (status, body) = export(&app, &app.token("analyst"), "").await;
    assert_eq!(status, StatusCode::OK);
    let out = ids(&body.unwrap());
    assert!(!out.is_empty());
    let leaked: Vec<&String> = out.iter().filter(|id| protected.contains(*id)).collect();
    assert!(leaked.is_empty(), "protected entries left: {leaked:?}");
    let named: Vec<String> = (app.audit_records().into_iter())
        .filter(|r| r["route"] == "voter.export")
        .flat_map(|r| {
            (r["subjects"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter())
            .filter_map(|s| s.as_str().map(str::to_owned))
        })
        .collect();
    assert!(named.iter().all(|id| !protected.contains(id)));
    assert_eq!(named.len(), out.len());
    app.stop().await;
}

/// A gateway whose exports are cut off once their client has taken nothing for a second,
/// over more electors than the chunks the channel and the connection hold (about 1 MiB each).
async fn app_cutting_stalls_after_a_second() -> TestApp {
    fn stall_after_a_second(c: &mut wardgate::config::Config) {
        c.server.client_stall_timeout = std::time::Duration::from_secs(1);
    }
    spawn_app_with(AppOptions {
        tweak: Some(stall_after_a_second),
        electors: Some(20_000),
        ..AppOptions::default()
    })
    .await
}

/// A client that takes no chunk for `server.client_stall_timeout` (here an HTTP/2 one that
/// keeps its window shut, as a client that stops reading does once the buffers fill) is cut
/// off: the export is aborted, recorded `client_stalled`, and its datastore connection let
/// go, rather than held for as long as the client likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_client_takes_nothing_is_cut_off() {
    let app = app_cutting_stalls_after_a_second().await;
    let (mut sender, _conn) = common::http2_with_window(app.addr, 0).await;
    let req = Request::get(format!("http://{}/voter/electors/export", app.addr))
        .header("authorization", format!("Bearer {}", app.token("analyst")))
        .header("x-purpose", "profiling")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let closing = loop {
        let (records, _) = export_records(&app);
        if let Some(last) = records
            .iter()
            .find(|r| r["detail"]["export_aborted"].is_string())
        {
            break last.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled export still running"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(closing["detail"]["export_aborted"], "client_stalled");
    assert_eq!(closing["reason"], "export_aborted");
    assert_eq!(closing["decision"], "error");
    // A chunk counts as gone once the connection has taken it, and the connection takes
    // one while its window is shut: every chunk after it is named unsent (they waited for a
    // client that took nothing, not in a queue as if sent).
    let before = &closing["detail"]["before"];
    assert_eq!(before["chunks"], 1, "{before}");
    not_sent_named(&closing, &export_records(&app).1[1..]);
    drop(resp);
}

/// An export cut off because its client took nothing does not end as if whole: a client that
/// comes back to read finds the body cut short (no last chunk), not a clean end over records
/// missing, even where the error saying why found no room to be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_export_read_later_ends_cut_short_not_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = app_cutting_stalls_after_a_second().await;
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /voter/electors/export HTTP/1.1\r\nhost: wardgate\r\nauthorization: Bearer {}\r\n\
         x-purpose: profiling\r\n\r\n",
        app.token("analyst")
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !export_records(&app)
        .0
        .iter()
        .any(|r| r["detail"]["export_aborted"] == "client_stalled")
    {
        assert!(std::time::Instant::now() < deadline, "never cut off");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Past the cut's own wait for room too.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // Everything the connection gives, until it ends or goes quiet (a whole answer would
    // leave it open, kept alive, after its last chunk).
    let mut answer = Vec::new();
    let mut buf = vec![0; 1 << 16];
    while let Ok(Ok(n @ 1..)) =
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await
    {
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert!(
        !answer.ends_with(b"\r\n0\r\n\r\n"),
        "a cut export ended as if whole ({} bytes)",
        answer.len()
    );
    app.stop().await;
}

/// A chunk waiting for a client that has stopped reading is checked again as it goes: the
/// caller revoked meanwhile, it never goes, however long ago it was recorded and queued.
/// Here an HTTP/2 client opens its stream with no window and reads nothing, so that the
/// connection takes the first chunk (held back by the window) and no more; once the caller
/// is revoked the client opens the window and reads: it gets that first chunk (gone before
/// the revocation) and then the cut, and nothing queued after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_waiting_for_a_slow_client_does_not_go_once_the_caller_is_revoked() {
    let app = spawn_app_with(AppOptions {
        electors: Some(20_000),
        ..AppOptions::default()
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut client, mut conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let (open, mut opened) = tokio::sync::oneshot::channel::<u32>();
    tokio::spawn(async move {
        let window = tokio::select! {
            _ = &mut conn => return,
            window = &mut opened => window,
        };
        if let Ok(window) = window {
            conn.set_initial_window_size(window).unwrap();
        }
        let _ = conn.await;
    });
    let req = Request::get(format!("http://{}/voter/electors/export", app.addr))
        .header("authorization", format!("Bearer {}", app.token("analyst")))
        .header("x-purpose", "profiling")
        .body(())
        .unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    // Stalled: no chunk recorded for a second and a half.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut seen = (0, std::time::Instant::now());
    loop {
        let n = export_records(&app).1.len();
        if n != seen.0 {
            seen = (n, std::time::Instant::now());
        } else if n > 0 && seen.1.elapsed() > std::time::Duration::from_millis(1500) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never stalled");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    revoke_the_analyst(&app).await;
    open.send(1 << 20).unwrap();
    let mut body = answer.into_body();
    let mut received = Vec::new();
    let cut_short = loop {
        match body.data().await {
            Some(Ok(data)) => {
                body.flow_control().release_capacity(data.len()).unwrap();
                received.extend_from_slice(&data);
            }
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(cut_short);
    let received = memchr::memmem::find_iter(&received, b"\"elector_id\"").count() as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (records, chunks) = loop {
        let (records, chunks) = export_records(&app);
        if records.last().unwrap()["detail"]["export_aborted"].is_string() {
            break (records, chunks);
        }
        assert!(std::time::Instant::now() < deadline, "no closing record");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    let last = records.last().unwrap();
    let before = &last["detail"]["before"];
    assert_eq!(
        last["detail"]["export_aborted"], "token_revoked",
        "{before}"
    );
    // Only the chunk the connection took before the revocation went (as much of it as the
    // connection sent before the cut reset the stream: the log never says less than left).
    assert_eq!(before["chunks"], 1, "{before}");
    assert!(received <= before["records"].as_u64().unwrap(), "{before}");
    not_sent_named(last, &chunks[1..]);
    app.stop().await;
}

/// A caller has at most `server.max_bulk_reads_per_caller` (2) exports and aggregates under way
/// at once: held open by a datastore that is slow to answer (or a client that reads nothing),
/// a third is 429 `too-many-at-once`, refused in the log, and the slot comes back once one of
/// them ends (here, its client hangs up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_has_only_so_many_exports_and_aggregates_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Counts what reaches it: a request under way holds its slot once the datastore has it.
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let upstream = common::upstream_answering(
        move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Bytes::from_static(b"")
        },
        "application/json",
        std::time::Duration::from_secs(60),
    )
    .await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..AppOptions::default()
    })
    .await;
    let analyst = app.token("analyst");
    let ask = |path: &str, purpose: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: wardgate\r\nauthorization: Bearer {analyst}\r\n\
             x-purpose: {purpose}\r\n\r\n"
        )
    };
    let export = ask("/voter/electors/export", "profiling");
    let aggregate = ask("/voter/electors/aggregate?by=ward", "research");
    // Sent, then answered within `wait` (the start of the answer), or still waiting.
    let send = |request: String| {
        let addr = app.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            s
        }
    };
    let answer_within = |mut s: tokio::net::TcpStream, wait: std::time::Duration| async move {
        let mut buf = vec![0; 4096];
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    };
    let answer = |s| answer_within(s, std::time::Duration::from_millis(500));
    let first = send(export.clone()).await;
    let _second = send(aggregate.clone()).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while asked.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first two never reached the datastore"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for third in [export.clone(), aggregate.clone()] {
        // Answered without the datastore (its audit record synced first).
        let wait = std::time::Duration::from_secs(10);
        let r = answer_within(send(third).await, wait)
            .await
            .expect("answered");
        assert!(r.starts_with("HTTP/1.1 429"), "{r}");
        assert!(r.contains("urn:wardgate:problem:too-many-at-once"), "{r}");
    }
    let refused = common::read_audit(&app.audit_dir)
        .into_iter()
        .filter(|r| r["reason"] == "too_many_at_once")
        .collect::<Vec<_>>();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|r| r["decision"] == "deny"));
    // One ends: the next is taken, and reaches the datastore (where it waits, unanswered).
    drop(first);
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while asked.load(Ordering::SeqCst) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        let s = send(export.clone()).await;
        match answer(s).await {
            // A 429 while the ended export's slot is still being given back: again.
            Some(r) => assert!(r.starts_with("HTTP/1.1 429"), "{r}"),
            None => held.push(()),
        }
    }
    assert!(
        !held.is_empty(),
        "the third reached the datastore unanswered"
    );
    app.stop().await;
}

/// A gateway over 20,000 electors whose analysts may be disclosed `allowance` records an hour.
async fn analysts_allowed(allowance: u64) -> TestApp {
    spawn_app_with(AppOptions {
        electors: Some(20_000),
        edit: Some(Box::new(move |c: &mut wardgate::config::Config| {
            c.quotas.insert(
                "analyst".into(),
                wardgate::controls::Limits {
                    per_hour: allowance,
                    per_day: 100_000,
                },
            );
        })),
        ..AppOptions::default()
    })
    .await
}

/// An export stops at its caller's allowance, not at the end of the chunk that crosses it: a
/// role allowed 1,234 records an hour (inside the first chunk of about 1 MiB) or 5,001
/// (inside the second) gets exactly that many, the chunk records name exactly those, and the
/// export ends cut short, `export_aborted: quota_exceeded`; the next request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_stops_at_the_callers_allowance_not_a_chunk_past_it() {
    for allowance in [1_234, 5_001] {
        let app = analysts_allowed(allowance).await;
        let analyst = app.token("analyst");
        let (status, body) = export(&app, &analyst, "").await;
        assert_eq!(status, StatusCode::OK);
        let cut = body.unwrap_err();
        assert!(cut.starts_with("body cut short"), "{cut}");
        let (records, chunks) = export_records(&app);
        let counts: Vec<usize> = (chunks.iter())
            .map(|c| c["subjects"].as_array().unwrap().len())
            .collect();
        assert_eq!(
            counts.iter().sum::<usize>() as u64,
            allowance,
            "{allowance}: chunks of {counts:?}"
        );
        let last = records.last().unwrap();
        assert_eq!(last["detail"]["export_aborted"], "quota_exceeded", "{last}");
        assert_eq!(last["detail"]["before"]["records"], allowance, "{last}");
        let r = app
            .get("/voter/electors", Some(&analyst), Some("profiling"))
            .await;
        assert_eq!(r.status, 429);
        app.stop().await;
    }
}

/// Two exports by one caller at once share one allowance: what each is about to filter is
/// held against it, so together they disclose exactly 5,001 records, not a chunk each past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_exports_at_once_share_the_callers_allowance() {
    let allowance = 5_001;
    let app = analysts_allowed(allowance).await;
    let analyst = app.token("analyst");
    let (one, two) = tokio::join!(export(&app, &analyst, ""), export(&app, &analyst, ""));
    // Each is cut short at the allowance, or (begun late, the other holding it all already)
    // refused at once.
    let mut begun = 0;
    for (status, body) in [one, two] {
        match status {
            StatusCode::OK => {
                begun += 1;
                assert!(body.is_err(), "an export past the allowance ended whole");
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(body.unwrap_err().contains("quota-exceeded"));
            }
            other => panic!("{other}: {body:?}"),
        }
    }
    let (records, chunks) = export_records(&app);
    let disclosed: u64 = (chunks.iter())
        .map(|c| c["subjects"].as_array().unwrap().len() as u64)
        .sum();
    assert_eq!(disclosed, allowance);
    let ends: Vec<&Value> = (records.iter())
        .filter(|r| r["detail"]["export_aborted"].is_string())
        .collect();
    assert_eq!(ends.len(), begun);
    assert!(
        ends.iter()
            .all(|r| r["detail"]["export_aborted"] == "quota_exceeded"),
        "{ends:?}"
    );
    app.stop().await;
}

/// The DPO's breach investigation may export the membership list as it may the register: the
/// demo datastore serves both collections' exports, narrowed and filtered as the register's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dpo_exports_the_membership_list_for_a_breach_investigation() {
    let app = spawn_app_with(AppOptions::default()).await;
    let r = app
        .get(
            "/membership/members/export",
            Some(&app.token("dpo")),
            Some("breach_investigation"),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.headers["content-type"], "application/x-ndjson");
    let records: Vec<Value> = std::str::from_utf8(&r.body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!records.is_empty());
    assert!(
        records.iter().all(|m| m["membership_number"].is_string()),
        "{:?}",
        records.first()
    );
    // Audited chunk by chunk, as the register's.
    let listed: usize = (app.audit_records().iter())
        .filter(|r| r["route"] == "membership.export" && r["detail"]["export_chunk"].is_u64())
        .map(|r| r["subjects"].as_array().unwrap().len())
        .sum();
    assert_eq!(listed, records.len());
}
