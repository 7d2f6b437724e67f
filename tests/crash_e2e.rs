//! SIGKILL under load loses no audit record of a response that was sent: every 200 a client
//! received has its record on disk, and what is on disk verifies.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_audit_record_of_a_sent_response() {
    let (upstream, _store) = common::start_datastore(1500).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = wardgate::demo::materialise(dir.path(), listen, admin, upstream).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wardgate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let config = wardgate::config::Config::load(&cfg).unwrap();
    let signer = wardgate::token::Signer::from_config(config.signing.as_ref().unwrap()).unwrap();
    let token = wardgate::demo::mint_tokens(&signer, common::now()).unwrap()["councillor"].clone();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();

    // Wait until ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = client
            .get(format!("http://{admin}/readyz").parse().unwrap())
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "gateway did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let received: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, token, received, stop) = (
            client.clone(),
            token.clone(),
            received.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 5000 {
                n += 1;
                let req = http::Request::get(format!(
                    "http://{listen}/voter/electors?per_page=20&page={}",
                    1 + n % 10
                ))
                .header("authorization", format!("Bearer {token}"))
                .header("x-purpose", "canvassing")
                .body(Full::new(Bytes::new()))
                .unwrap();
                let Ok(resp) = client.request(req).await else {
                    break;
                };
                let status = resp.status();
                let rid = resp
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // A response counts as received only once its body has fully arrived.
                if resp.into_body().collect().await.is_ok() && status == 200 {
                    received.lock().unwrap().insert(rid.unwrap());
                }
            }
        }));
    }
    // Kill while requests are in flight, once a fair number have completed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.lock().unwrap().len() < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let received = received.lock().unwrap().clone();
    assert!(
        received.len() > 20,
        "the load should have produced responses, got {}",
        received.len()
    );
    let records = common::read_audit(&config.audit.dir);
    let on_disk: BTreeSet<String> = records
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<&String> = received.difference(&on_disk).collect();
    assert!(
        lost.is_empty(),
        "{} responses were sent without a durable audit record: {lost:?}",
        lost.len()
    );
    let report = wardgate::audit::verify_dir(&config.audit.dir).unwrap();
    assert!(report.records as usize >= received.len());
    eprintln!(
        "responses received: {}, audit records on disk: {}, torn tail: {}",
        received.len(),
        report.records,
        report.torn_tail
    );

    // And the CLI agrees.
    let out = Command::new(env!("CARGO_BIN_EXE_wardgate"))
        .args(["audit", "verify", "--dir"])
        .arg(&config.audit.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
