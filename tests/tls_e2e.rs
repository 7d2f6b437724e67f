//! TLS on both sides (rustls). The data plane: a real handshake against a certificate from
//! files, and no plaintext fallback on the TLS port. A datastore over https://: trusted only
//! through the configured CA and for the host its URL names, with the gateway's own
//! certificate where the datastore asks for one; any failure discloses nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::{AppOptions, spawn_app_with};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn with_tls(c: &mut wardgate::config::Config) {
    let dir = c.server.data_dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = wardgate::token::self_signed_cert(&["localhost"]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    c.server.tls = Some(wardgate::config::TlsFiles {
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
    });
}

#[tokio::test]
async fn tls_serves_data_and_refuses_plaintext() {
    let app = spawn_app_with(AppOptions {
        tweak: Some(with_tls),
        ..Default::default()
    })
    .await;
    let cert_pem = std::fs::read_to_string(app.dir.path().join("tls/cert.pem")).unwrap();
    let (_, mut sender) = connect_tls(app.addr, &cert_pem).await;
    assert_eq!(canvass_on(&app, &mut sender).await, 200);

    // Plain HTTP on the TLS port, with a good token, gets no HTTP answer at all (not even a
    // refusal), and is counted: no audit record holds a connection that never got past TLS.
    let tls_errors = || async {
        let metrics = app.admin_get("/metrics").await;
        (String::from_utf8_lossy(&metrics.body).lines())
            .find_map(|l| {
                l.strip_prefix("wardgate_connection_errors_total{kind=\"tls\"} ")
                    .and_then(|n| n.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let before = tls_errors().await;
    let mut plain = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let token = app.token("canvasser");
    let request = format!(
        "GET /voter/electors HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         x-purpose: canvassing\r\n\r\n"
    );
    plain.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        plain.read_to_end(&mut buf),
    )
    .await;
    assert!(
        !buf.starts_with(b"HTTP/"),
        "plaintext answered on the TLS port: {}",
        String::from_utf8_lossy(&buf)
    );
    // (Other gateways of this test binary may count theirs too: it rose, at least by this.)
    assert!(tls_errors().await > before, "not counted");
    app.stop().await;
}

fn certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .map(Result::unwrap)
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS front for the demo datastore (as a sidecar or a TLS-terminating proxy would be):
/// it presents `cert`, asks for a client certificate issued by `clients` if given, and passes
/// each connection's bytes to `backend`, counting the connections it took and the handshakes
/// that completed.
struct Front {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
}

async fn tls_datastore(
    backend: std::net::SocketAddr,
    (cert, key): (String, String),
    clients: Option<&common::Ca>,
) -> Front {
    let key = rustls_pemfile::private_key(&mut key.as_bytes())
        .unwrap()
        .unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(certs(&ca.pem).remove(0)).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs(&cert), key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let (taken, done) = (connections.clone(), handshakes.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            taken.fetch_add(1, Ordering::SeqCst);
            let (acceptor, done) = (acceptor.clone(), done.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                done.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut up) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    Front {
        addr,
        connections,
        handshakes,
    }
}

impl Front {
    /// `resp` is one the TLS between the gateway and this front refused: the gateway got
    /// here (one more connection than `before`), no handshake completed, and the answer says
    /// so.
    fn refused(&self, resp: &common::Resp, before: usize) {
        refused_by_tls(resp);
        assert!(self.connections.load(Ordering::SeqCst) > before);
        assert_eq!(self.handshakes.load(Ordering::SeqCst), 0);
    }
}

/// The answer of a request the datastore's TLS refused: 502, the datastore unreachable, and
/// nothing of a record in it.
fn refused_by_tls(resp: &common::Resp) {
    assert_eq!(resp.status, 502, "{:?}", resp.body);
    assert_eq!(
        resp.headers["content-type"], "application/problem+json",
        "{:?}",
        resp.headers
    );
    assert_eq!(
        resp.json()["type"],
        "urn:wardgate:problem:upstream-unavailable",
        "{:?}",
        resp.body
    );
    assert!(!String::from_utf8_lossy(&resp.body).contains("elector_id"));
}

/// The gateway with its `voter` dataset read from `front` as `https://localhost:PORT`,
/// trusting `ca`, showing `client` (cert and key PEM) if given; its `membership` dataset stays
/// on the plain datastore.
async fn app_over_tls(
    backend: std::net::SocketAddr,
    front: std::net::SocketAddr,
    ca: &common::Ca,
    client: Option<(String, String)>,
) -> common::TestApp {
    // The files are read at start: the directory may go once the gateway is up.
    let files = tempfile::tempdir().unwrap();
    app_over_tls_in(files.path(), backend, front, ca, client, None).await
}

/// `app_over_tls`, its TLS files (`ca.pem`, `client.pem`, `client.key`) written in `files`,
/// and `voter`'s `connect_timeout` set if given (its `response_timeout` then ten seconds).
async fn app_over_tls_in(
    files: &std::path::Path,
    backend: std::net::SocketAddr,
    front: std::net::SocketAddr,
    ca: &common::Ca,
    client: Option<(String, String)>,
    connect_timeout: Option<std::time::Duration>,
) -> common::TestApp {
    let dir = files.to_owned();
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let client_cert = client.map(|(cert, key)| {
        std::fs::write(dir.join("client.pem"), cert).unwrap();
        std::fs::write(dir.join("client.key"), key).unwrap();
        (dir.join("client.pem"), dir.join("client.key"))
    });
    spawn_app_with(AppOptions {
        upstream: Some(backend),
        edit: Some(Box::new(move |c: &mut wardgate::config::Config| {
            let voter = c.datasets.get_mut("voter").unwrap();
            voter.base = format!("https://localhost:{}", front.port())
                .parse()
                .unwrap();
            voter.tls = Some(wardgate::config::UpstreamTls {
                ca_file: dir.join("ca.pem"),
                client_cert,
            });
            if let Some(within) = connect_timeout {
                voter.connect_timeout = within;
                voter.response_timeout = std::time::Duration::from_secs(10);
            }
        })),
        ..Default::default()
    })
    .await
}

async fn canvass_page(app: &common::TestApp) -> common::Resp {
    app.get(
        "/voter/electors?per_page=5",
        Some(&app.token("councillor")),
        Some("canvassing"),
    )
    .await
}

#[tokio::test]
async fn a_datastore_over_tls_is_read_through_the_configured_ca_and_filtered() {
    let (backend, _stop) = common::start_datastore(300).await;
    let ca = common::Ca::new("Datastore CA");
    let front = tls_datastore(backend, ca.issue(&["localhost"]), None).await;
    let app = app_over_tls(backend, front.addr, &ca, None).await;
    let resp = canvass_page(&app).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    let records = resp.json()["records"].as_array().unwrap().clone();
    assert!(!records.is_empty());
    // Filtered as ever: canvassing never sees the profiling scores.
    assert!(records.iter().all(|r| r.get("support_score").is_none()));
    assert!(front.handshakes.load(Ordering::SeqCst) >= 1);
    app.stop().await;
}

#[tokio::test]
async fn a_datastore_certificate_not_from_the_configured_ca_or_for_another_host_discloses_nothing()
{
    let (backend, _stop) = common::start_datastore(300).await;
    let ca = common::Ca::new("Datastore CA");
    // Another CA's certificate for the right name: an interceptor's.
    let rogue = common::Ca::new("Rogue CA");
    let front = tls_datastore(backend, rogue.issue(&["localhost"]), None).await;
    let app = app_over_tls(backend, front.addr, &ca, None).await;
    let (guard, logs) = common::capture_logs();
    // It gets as far as the datastore's door, and no further; the log says why.
    front.refused(&canvass_page(&app).await, 0);
    drop(guard);
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("upstream request failed") && logs.contains("UnknownIssuer"),
        "{logs}"
    );
    app.stop().await;

    // The configured CA's certificate, but for another host than the URL names.
    let front = tls_datastore(backend, ca.issue(&["datastore.example"]), None).await;
    let app = app_over_tls(backend, front.addr, &ca, None).await;
    front.refused(&canvass_page(&app).await, 0);
    // The plain-http dataset beside it is unaffected.
    let members = app
        .get(
            "/membership/members?per_page=2",
            Some(&app.token("clp_secretary")),
            Some("membership_admin"),
        )
        .await;
    assert_eq!(members.status, 200, "{:?}", members.body);
    app.stop().await;
}

#[tokio::test]
async fn an_https_datastore_that_speaks_plain_http_is_sent_nothing_in_plain_text() {
    let (backend, _stop) = common::start_datastore(300).await;
    // What arrives at a port that does not speak TLS, kept.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = received.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = vec![0; 4096];
            if let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), tcp.read(&mut buf)).await
            {
                kept.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            // As a plain HTTP server answers what it cannot parse (a ClientHello).
            let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let ca = common::Ca::new("Datastore CA");
    let app = app_over_tls(backend, addr, &ca, None).await;
    refused_by_tls(&canvass_page(&app).await);
    let got = received.lock().unwrap().clone();
    // A TLS handshake record (0x16), and no request line, credential or path in the clear.
    assert_eq!(got.first(), Some(&0x16), "{got:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("GET ") && !text.contains("electors"),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_datastore_that_asks_for_the_gateways_certificate_gets_it_when_configured() {
    let (backend, _stop) = common::start_datastore(300).await;
    let ca = common::Ca::new("Datastore CA");
    let gateways = common::Ca::new("Gateway clients CA");
    let front = tls_datastore(backend, ca.issue(&["localhost"]), Some(&gateways)).await;
    // Without a client certificate the datastore refuses the handshake.
    let app = app_over_tls(backend, front.addr, &ca, None).await;
    front.refused(&canvass_page(&app).await, 0);
    app.stop().await;
    // One its CA did not issue is refused too.
    let app = app_over_tls(
        backend,
        front.addr,
        &ca,
        Some(common::Ca::new("Other clients CA").issue(&["wardgate"])),
    )
    .await;
    let before = front.connections.load(Ordering::SeqCst);
    front.refused(&canvass_page(&app).await, before);
    app.stop().await;
    // With one its CA issued, it serves.
    let app = app_over_tls(
        backend,
        front.addr,
        &ca,
        Some(gateways.issue(&["wardgate"])),
    )
    .await;
    let resp = canvass_page(&app).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert!(!resp.json()["records"].as_array().unwrap().is_empty());
    assert!(front.handshakes.load(Ordering::SeqCst) >= 1);
    app.stop().await;
}

#[tokio::test]
async fn a_datastore_that_stalls_its_handshake_answers_502_at_the_connect_timeout() {
    let (backend, _stop) = common::start_datastore(300).await;
    // Takes the connection and never answers the ClientHello that comes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let ca = common::Ca::new("Datastore CA");
    let files = tempfile::tempdir().unwrap();
    let within = Some(std::time::Duration::from_millis(200));
    let app = app_over_tls_in(files.path(), backend, addr, &ca, None, within).await;
    // 502 from the connect deadline; without it, 504 from the response deadline (10 s).
    refused_by_tls(&canvass_page(&app).await);
    app.stop().await;
}

#[tokio::test]
async fn an_export_and_an_aggregate_read_over_tls_answer_as_over_plain_http() {
    let (backend, _stop) = common::start_datastore(300).await;
    let ca = common::Ca::new("Datastore CA");
    let front = tls_datastore(backend, ca.issue(&["localhost"]), None).await;
    let app = app_over_tls(backend, front.addr, &ca, None).await;
    let analyst = app.token("analyst");
    let export = app
        .get("/voter/electors/export", Some(&analyst), Some("profiling"))
        .await;
    assert_eq!(export.status, 200, "{:?}", export.body);
    let exported: Vec<serde_json::Value> = std::str::from_utf8(&export.body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!exported.is_empty());
    // Paging the same listing through the same TLS client: the same records, field for field.
    let paged = app
        .get(
            "/voter/electors?per_page=1000",
            Some(&analyst),
            Some("profiling"),
        )
        .await;
    assert_eq!(paged.status, 200, "{:?}", paged.body);
    assert_eq!(
        &exported,
        paged.json()["records"].as_array().unwrap(),
        "the export and the page differ"
    );
    assert!(front.handshakes.load(Ordering::SeqCst) >= 1);
    // An aggregate (a streamed export of the register underneath) counts what the same
    // datastore counts over plain HTTP, cell for cell.
    let plain = spawn_app_with(AppOptions {
        upstream: Some(backend),
        ..Default::default()
    })
    .await;
    let by = "/voter/electors/aggregate?by=ward";
    let over_tls = app.get(by, Some(&analyst), Some("research")).await;
    let over_plain = plain
        .get(by, Some(&plain.token("analyst")), Some("research"))
        .await;
    assert_eq!(over_tls.status, 200, "{:?}", over_tls.body);
    assert_eq!(over_plain.status, 200, "{:?}", over_plain.body);
    assert!(!over_tls.json()["cells"].as_array().unwrap().is_empty());
    assert_eq!(over_tls.json()["cells"], over_plain.json()["cells"]);
    plain.stop().await;
    app.stop().await;
}

/// `SIGHUP` (here `rekey::reload_datastore_tls`, which it runs) reads the datastores' TLS
/// files again: the next connection shows the certificate now on disk. A set that fails the
/// start's checks is refused and the files in use stay. Each is audited.
#[tokio::test]
async fn a_reload_reads_the_datastore_tls_files_again_and_refuses_a_broken_set() {
    let (backend, _stop) = common::start_datastore(300).await;
    let ca = common::Ca::new("Datastore CA");
    let gateways = common::Ca::new("Gateway clients CA");
    let front = tls_datastore(backend, ca.issue(&["localhost"]), Some(&gateways)).await;
    let files = tempfile::tempdir().unwrap();
    let client = gateways.issue(&["wardgate"]);
    let app = app_over_tls_in(files.path(), backend, front.addr, &ca, Some(client), None).await;
    assert_eq!(canvass_page(&app).await.status, 200);
    let put = |(cert, key): (String, String)| {
        std::fs::write(files.path().join("client.pem"), cert).unwrap();
        std::fs::write(files.path().join("client.key"), key).unwrap();
    };
    let reloaded = |reason: &str| {
        (app.audit_records().into_iter())
            .filter(|r| r["reason"] == reason)
            .collect::<Vec<_>>()
    };

    // Replaced by one the datastore does not accept: taken, and the next connection shows it.
    put(common::Ca::new("Other clients CA").issue(&["wardgate"]));
    wardgate::rekey::reload_datastore_tls(&app.gw)
        .await
        .unwrap();
    let before = front.connections.load(Ordering::SeqCst);
    refused_by_tls(&canvass_page(&app).await);
    assert!(front.connections.load(Ordering::SeqCst) > before);
    // Renewed by the datastore's clients CA: served again.
    put(gateways.issue(&["wardgate"]));
    wardgate::rekey::reload_datastore_tls(&app.gw)
        .await
        .unwrap();
    assert_eq!(canvass_page(&app).await.status, 200);
    let taken = reloaded("datastore_tls_reloaded");
    assert_eq!(taken.len(), 2, "{taken:?}");
    assert_eq!(taken[0]["detail"]["datasets"], serde_json::json!(["voter"]));
    // A reload with the files as they were (a token key rotation's signal) changes nothing
    // and records nothing: the pooled connection is used again.
    wardgate::rekey::reload_datastore_tls(&app.gw)
        .await
        .unwrap();
    let before = front.connections.load(Ordering::SeqCst);
    assert_eq!(canvass_page(&app).await.status, 200);
    assert_eq!(front.connections.load(Ordering::SeqCst), before);
    assert_eq!(reloaded("datastore_tls_reloaded").len(), 2);

    // A key that is not the certificate's: refused, and what is in use stays.
    let (cert, _) = gateways.issue(&["wardgate"]);
    let (_, other_key) = gateways.issue(&["wardgate"]);
    put((cert, other_key));
    let e = wardgate::rekey::reload_datastore_tls(&app.gw)
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("does not match"), "{e:#}");
    // New connections (three requests at once, one pooled connection) are still made with
    // the files in use.
    let before = front.connections.load(Ordering::SeqCst);
    let (a, b, c) = tokio::join!(canvass_page(&app), canvass_page(&app), canvass_page(&app));
    assert!([a, b, c].iter().all(|r| r.status == 200));
    assert!(front.connections.load(Ordering::SeqCst) > before);
    let refused = reloaded("datastore_tls_reload_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0]["detail"]["error"]
            .as_str()
            .unwrap()
            .contains("`datasets.voter.client_key_file`"),
        "{refused:?}"
    );
    app.stop().await;
}

/// A TLS connection to the gateway trusting only `ca_pem`: the SHA-256 (hex) of the
/// certificate it was offered, and a sender for requests on that connection.
async fn connect_tls(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> (String, hyper::client::conn::http1::SendRequest<Full<Bytes>>) {
    use sha2::Digest as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem) {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let offered = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (hex::encode(sha2::Sha256::digest(offered.as_ref())), sender)
}

/// A canvassing page asked on `sender`'s connection: its status.
async fn canvass_on(
    app: &common::TestApp,
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) -> http::StatusCode {
    let req = http::Request::get("/voter/electors?per_page=3")
        .header("host", "localhost")
        .header(
            "authorization",
            format!("Bearer {}", app.token("councillor")),
        )
        .header("x-purpose", "canvassing")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

fn sha256_of_pem(pem: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(certs(pem)[0].as_ref()))
}

/// `SIGHUP` (here `rekey::reload_server_tls`, which it runs) reads the gateway's own
/// certificate and key again: the next handshake is offered the renewed certificate, a
/// connection already open goes on serving, and the change is audited first. A pair that fails
/// the start's checks (a key not the certificate's, an expired certificate) is refused and
/// recorded, and the certificate in use stays.
#[tokio::test]
async fn a_reload_offers_a_renewed_server_certificate_from_the_next_handshake() {
    let ca = common::Ca::new("Gateway CA");
    let files = tempfile::tempdir().unwrap();
    let dir = files.path().to_owned();
    let put = {
        let dir = dir.clone();
        move |(cert, key): &(String, String)| {
            std::fs::write(dir.join("cert.pem"), cert).unwrap();
            std::fs::write(dir.join("key.pem"), key).unwrap();
        }
    };
    let first = ca.issue(&["localhost"]);
    put(&first);
    let app = spawn_app_with(AppOptions {
        edit: Some(Box::new(move |c: &mut wardgate::config::Config| {
            c.server.tls = Some(wardgate::config::TlsFiles {
                cert_file: dir.join("cert.pem"),
                key_file: dir.join("key.pem"),
            });
        })),
        ..Default::default()
    })
    .await;
    let records = |reason: &str| {
        (app.audit_records().into_iter())
            .filter(|r| r["reason"] == reason)
            .collect::<Vec<_>>()
    };
    let (offered, mut open) = connect_tls(app.addr, &ca.pem).await;
    assert_eq!(offered, sha256_of_pem(&first.0));
    assert_eq!(canvass_on(&app, &mut open).await, 200);

    // Renewed: the next handshake gets the new certificate; the open connection serves on.
    let renewed = ca.issue_until(&["localhost"], 2040);
    put(&renewed);
    wardgate::rekey::reload_server_tls(&app.gw).await.unwrap();
    let (offered, mut next) = connect_tls(app.addr, &ca.pem).await;
    assert_eq!(offered, sha256_of_pem(&renewed.0));
    assert_eq!(canvass_on(&app, &mut next).await, 200);
    assert_eq!(canvass_on(&app, &mut open).await, 200);
    let taken = records("server_tls_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["route"], "server.tls");
    assert_eq!(
        taken[0]["detail"]["certificate"]["sha256"],
        sha256_of_pem(&renewed.0)
    );
    assert_eq!(
        taken[0]["detail"]["replaces"]["sha256"],
        sha256_of_pem(&first.0)
    );
    assert_eq!(
        taken[0]["detail"]["certificate"]["names"],
        serde_json::json!(["localhost"])
    );
    assert_eq!(
        taken[0]["detail"]["certificate"]["not_after"],
        "2040-01-01T00:00:00Z"
    );
    // The metric says when the certificate offered now ends.
    let metrics = app.admin_get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    // (2040-01-01: the renewed certificate's end, not the first one's.)
    assert!(
        text.lines()
            .any(|l| l == "wardgate_server_certificate_not_after_seconds 2208988800"),
        "{text}"
    );

    // Unchanged (a token key rotation's signal): nothing recorded, nothing changes.
    wardgate::rekey::reload_server_tls(&app.gw).await.unwrap();
    assert_eq!(records("server_tls_reloaded").len(), 1);

    // A key that is not the certificate's, then an expired certificate: each refused and
    // recorded, and the renewed certificate is still the one offered.
    let (cert, _) = ca.issue(&["localhost"]);
    let (_, other_key) = ca.issue(&["localhost"]);
    put(&(cert, other_key));
    let e = wardgate::rekey::reload_server_tls(&app.gw)
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("does not match"), "{e:#}");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let expired = params.signed_by(&key, &ca.issuer).unwrap();
    put(&(expired.pem(), key.serialize_pem()));
    let e = wardgate::rekey::reload_server_tls(&app.gw)
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("expired"), "{e:#}");
    let refused = records("server_tls_reload_refused");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0]["detail"]["error"]
            .as_str()
            .unwrap()
            .contains("key.pem"),
        "{refused:?}"
    );
    let (offered, mut after) = connect_tls(app.addr, &ca.pem).await;
    assert_eq!(offered, sha256_of_pem(&renewed.0));
    assert_eq!(canvass_on(&app, &mut after).await, 200);
    assert_eq!(records("server_tls_reloaded").len(), 1);
    app.stop().await;
}

/// The signal itself, to a running `wardgate serve`: `SIGHUP` takes up a renewed server
/// certificate (the in-process test above covers what a reload checks and records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_to_a_running_gateway_offers_its_renewed_certificate() {
    a_running_gateway_offers_its_renewed_certificate(true).await;
}

/// And with no signal at all: the gateway's own check for changed files
/// (`server.file_check_interval`) takes it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_gateway_takes_up_a_renewed_certificate_by_itself() {
    a_running_gateway_offers_its_renewed_certificate(false).await;
}

/// `signal`: renewed, then `SIGHUP` (the check for changed files off); else renewed only.
async fn a_running_gateway_offers_its_renewed_certificate(signal: bool) {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin, upstream) = (
        common::free_addr(),
        common::free_addr(),
        common::free_addr(),
    );
    let cfg = wardgate::demo::materialise(dir.path(), listen, admin, upstream).unwrap();
    let ca = common::Ca::new("Gateway CA");
    // Each file written elsewhere and renamed into place, as the README asks.
    let put = |(cert, key): &(String, String)| {
        for (name, text) in [("cert.pem", cert), ("key.pem", key)] {
            let staged = dir.path().join(format!("{name}.new"));
            std::fs::write(&staged, text).unwrap();
            std::fs::rename(&staged, dir.path().join(name)).unwrap();
        }
    };
    let first = ca.issue(&["localhost"]);
    put(&first);
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("plaintext = true\n") && text.contains("\n[auth]\n"));
    let check = if signal { "off" } else { "200ms" };
    let text = text
        .replace(
            "plaintext = true\n",
            &format!("file_check_interval = \"{check}\"\n"),
        )
        .replacen(
            "\n[auth]\n",
            "\n[server.tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n\n[auth]\n",
            1,
        );
    std::fs::write(&cfg, text).unwrap();
    let mut child = common::serve_process(&cfg);
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        connect_tls(listen, &ca.pem).await.0,
        sha256_of_pem(&first.0)
    );

    let renewed = ca.issue(&["localhost"]);
    put(&renewed);
    if signal {
        common::hangup(&child);
    }
    let reloaded = || {
        common::read_audit(&dir.path().join("audit"))
            .into_iter()
            .filter(|r| r["reason"] == "server_tls_reloaded")
            .collect::<Vec<_>>()
    };
    // The record is in the file before it is durable, and the certificate changes once it
    // is: the renewed one is waited for, not asked for once.
    while reloaded().is_empty() || connect_tls(listen, &ca.pem).await.0 != sha256_of_pem(&renewed.0)
    {
        assert!(
            Instant::now() < deadline,
            "no reload recorded and in effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken = reloaded();
    assert_eq!(taken.len(), 1, "{taken:?}");
    let trigger = if signal { "signal" } else { "files_changed" };
    assert_eq!(taken[0]["detail"]["trigger"], trigger, "{taken:?}");
    assert_eq!(
        taken[0]["detail"]["certificate"]["sha256"],
        sha256_of_pem(&renewed.0)
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
