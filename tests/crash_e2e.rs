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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_audit_record_of_a_sent_response() {
    let (upstream, _store) = common::start_datastore(1500).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let cfg = wardgate::demo::materialise(dir.path(), listen, admin, upstream).unwrap();
    let mut child = common::serve_process(&cfg);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_flushes_the_log() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (real, _store) = common::start_datastore(500).await;
    let page = common::datastore_body(real, "/electors?per_page=1000").await;
    // A datastore slow enough that SIGTERM finds requests under way, counting what reaches it.
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let upstream = common::upstream_answering(
        move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            page.clone()
        },
        "application/json",
        Duration::from_millis(500),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let cfg = wardgate::demo::materialise(dir.path(), listen, admin, upstream).unwrap();
    // page-cache durability: records are acknowledged before fsync, so only a clean shutdown
    // syncing the log proves the flush.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("durability = \"fsync\"", "durability = \"page-cache\"");
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wardgate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let config = wardgate::config::Config::load(&cfg).unwrap();
    let signer = wardgate::token::Signer::from_config(config.signing.as_ref().unwrap()).unwrap();
    let token = wardgate::demo::mint_tokens(&signer, common::now()).unwrap()["analyst"].clone();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client
        .get(format!("http://{admin}/readyz").parse().unwrap())
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "gateway did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Requests in flight when SIGTERM arrives.
    let mut inflight = Vec::new();
    // (Each is the first page: the datastore answers every request with it, and a page other
    // than the one asked for is refused.)
    for _ in 0..6 {
        let (client, token) = (client.clone(), token.clone());
        inflight.push(tokio::spawn(async move {
            let req = http::Request::get(format!("http://{listen}/voter/electors?per_page=1000"))
                .header("authorization", format!("Bearer {token}"))
                .header("x-purpose", "profiling")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = client.request(req).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
        }));
    }
    while asked.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no request reached the datastore"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "wardgate exited with {status}");
    let mut answered = 0;
    for t in inflight {
        if let Ok(Ok(s)) = t.await {
            assert_eq!(s, 200);
            answered += 1;
        }
    }
    // Every request that reached the datastore was finished, not dropped (one the gateway had
    // not read when the signal came may be refused with its connection, never half done).
    let reached = asked.load(Ordering::SeqCst);
    assert!(
        answered > 0 && answered == reached,
        "requests in flight at SIGTERM should be finished, not dropped: {answered} answered, \
         {reached} reached the datastore"
    );
    let records = common::read_audit(&config.audit.dir);
    assert_eq!(
        records.iter().filter(|r| r["status"] == 200).count(),
        answered,
        "every answered request is on disk"
    );
    let report = wardgate::audit::verify_dir(&config.audit.dir).unwrap();
    assert!(!report.torn_tail);
    // What the gateway wrote is no other account's to read (the process's umask), and the
    // keys that unseal client addresses its owner's alone.
    let mut written = vec![config.watch.breach_log.clone()];
    let keys = config.audit.dir.join("addr-keys");
    for dir in [&config.audit.dir, &keys] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                written.push(path);
            }
        }
    }
    assert!(written.iter().any(|p| p.starts_with(&keys)), "{written:?}");
    for path in &written {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        let closed = if path.starts_with(&keys) {
            0o077
        } else {
            0o007
        };
        assert_eq!(mode & closed, 0, "{} is {mode:o}", path.display());
    }
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(listen).await.is_err());
}
