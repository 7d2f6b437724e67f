//! No audit, no data: when the log cannot be written the gateway answers 503 and discloses
//! nothing, and it recovers by itself once the disk has room again. The disk is made full for
//! real: the audit directory is a tiny tmpfs filled to the brim (needs root, as CI is).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use bytes::Bytes;
use common::{AppOptions, RedisServer, Tmpfs, WITNESS_KEY, fill, spawn_app_with};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

#[tokio::test]
async fn a_full_disk_means_503_and_no_data_then_recovery_without_restart() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("audit");
    let Some(_tmpfs) = Tmpfs::mount_or_skip(&mount, "256k") else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        audit_dir: Some(mount.clone()),
        ..Default::default()
    })
    .await;
    let token = app.token("councillor");

    let ok = app
        .get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(ok.status, 200);
    let surname = ok.json()["records"][0]["surname"]
        .as_str()
        .unwrap()
        .to_owned();

    fill(&mount);
    // The segment's last page may still have room for a record or two: those requests are
    // audited and may be answered. Once a write needs space there is none, and from then on
    // every answer is 503.
    let mut answered_after_fill = 0;
    loop {
        let r = app
            .get(
                "/voter/electors?per_page=5",
                Some(&token),
                Some("canvassing"),
            )
            .await;
        if r.status == 503 {
            break;
        }
        assert_eq!(r.status, 200);
        answered_after_fill += 1;
        assert!(
            answered_after_fill < 8,
            "a full disk should stop answers within a page of records"
        );
    }
    let mut refused = 0;
    for _ in 0..5 {
        let r = app
            .get(
                "/voter/electors?per_page=5",
                Some(&token),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert_eq!(r.json()["type"], "urn:wardgate:problem:audit-unavailable");
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains(&surname) && !text.contains("records"),
            "data leaked without audit: {text}"
        );
        refused += 1;
    }
    assert_eq!(
        app.admin_get("/readyz").await.status,
        503,
        "not ready while the log cannot be written"
    );

    std::fs::remove_file(mount.join("filler")).unwrap();
    let r = app
        .get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, 200, "recovers by itself once the disk has room");
    assert_eq!(app.admin_get("/readyz").await.status, 200);

    // What is on disk is a valid chain, holds both successful responses, and none of the refused.
    let report = wardgate::audit::verify_dir(&mount).unwrap();
    let records = common::read_audit(&mount);
    assert_eq!(report.records as usize, records.len());
    assert_eq!(
        records.iter().filter(|r| r["status"] == 200).count(),
        2 + answered_after_fill
    );
    assert!(
        records.iter().all(|r| r["status"] != 503),
        "refused requests left no durable record"
    );
    assert_eq!(refused, 5);
    app.stop().await;
}

/// A disk that stops without failing (frozen: as one retrying for minutes, or a hung network
/// mount) is answered as a failed one once a commit has taken ten seconds: every request
/// waiting for the log, with room in its queue or not, and a write waiting for its intent's
/// record, gets 503 and nothing of its data; `/readyz` fails until the disk moves again, and
/// the gateway then goes on by itself. Records that land late say nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_answers_503_and_fails_readiness_until_it_moves() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("disk");
    let Some(disk) = common::FreezableDisk::mount_or_skip(&mount) else {
        return;
    };
    let log = mount.join("log");
    let app = spawn_app_with(AppOptions {
        audit_dir: Some(log.clone()),
        // A queue of four records: most of the requests below find it full.
        edit: Some(Box::new(|c| c.audit.max_batch = 1)),
        ..Default::default()
    })
    .await;
    let token = app.token("canvasser");
    let list = || {
        app.get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
    };
    let page = list().await;
    assert_eq!(page.status, 200);
    let id = page.json()["records"][0]["elector_id"]
        .as_str()
        .unwrap()
        .to_owned();

    disk.freeze();
    // The write first, so that its intent's record finds room in the queue, and the pages
    // then fill it: the write's answer then finds none.
    let write = app.canvass(
        &id,
        &token,
        "canvassing",
        r#"{"last_canvassed":"2026-11-30"}"#,
    );
    let pages = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        futures_util::future::join_all((0..8).map(|_| list())).await
    };
    // The admin plane's reads and refusals too, the console's among them (its changes wait:
    // one must not be logged and then not made).
    let admin = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (path, dpo, security) = (
            format!("/rights/{id}"),
            app.token("dpo"),
            app.token("security"),
        );
        tokio::join!(
            app.admin_get_with(&path, &dpo),
            app.admin_get_with(&path, &token),
            app.admin_get_with("/alerts", &security)
        )
    };
    // (Bounded: an answer that waited for the disk would never come while it is frozen.)
    let answered = tokio::time::timeout(std::time::Duration::from_secs(90), async {
        tokio::join!(pages, write, admin)
    });
    let (pages, write, (read, refused, console)) = answered
        .await
        .expect("requests waiting for a stalled log were never answered");
    for r in [&read, &refused, &console] {
        assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["type"], "urn:wardgate:problem:audit-unavailable");
    }
    for r in pages.iter().chain([&write]) {
        assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["type"], "urn:wardgate:problem:audit-unavailable");
        assert!(!String::from_utf8_lossy(&r.body).contains(&id));
    }
    // Ten seconds and more into a commit that has not ended.
    assert_eq!(app.admin_get("/readyz").await.status, 503);

    disk.thaw();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while app.admin_get("/readyz").await.status != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(list().await.status, 200, "goes on by itself");
    // Whatever of the refused requests' records landed late says that nothing left: no
    // disclosure stands alone, and the write was not sent.
    for r in pages.iter().chain([&write]) {
        let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
        let records = app.audit_records_of(&rid, 1).await;
        assert!(!records.is_empty(), "{rid}: no record");
        let corrected = records
            .iter()
            .any(|r| r["detail"]["withheld_after_recording"] == "audit_stalled");
        for rec in &records {
            let disclosed = rec["decision"] == "allow" && rec["status"] == 200;
            assert!(!disclosed || corrected, "{rid}: {records:?}");
        }
    }
    let rid = write.headers["x-request-id"].to_str().unwrap().to_owned();
    let answer = app.audit_records_of(&rid, 2).await;
    assert!(
        answer.iter().any(|r| r["detail"]["write"] == "not_sent"),
        "{answer:?}"
    );
    // Which a subject access report finds: it does not list the write as made.
    let sar = app
        .admin_get_with(&format!("/sar/{id}"), &app.token("dpo"))
        .await;
    assert_eq!(sar.status, 200, "{:?}", sar.body);
    let writes = sar.json()["writes"].clone();
    assert!(
        !(writes.as_array().unwrap().iter()).any(|w| w["request_id"] == rid.as_str()),
        "{writes}"
    );
    // The datastore never had it.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let uri = format!("http://{}/electors/{id}", app.upstream);
    let resp = client.get(uri.parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let stored = serde_json::from_slice::<Value>(&body).unwrap();
    assert_ne!(stored["record"]["last_canvassed"], json!("2026-11-30"));
    // And the chain is whole.
    wardgate::audit::verify_dir(&log).unwrap();
    app.stop().await;
}

/// A write the datastore answers with an error while the log has stopped: the caller gets
/// that error (the write may have been made; a 503 would say it was not sent, to send it
/// again), and the record that follows the answer's, once the disk moves, says the same
/// status and reason, not a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failing_while_the_log_is_stalled_is_recorded_as_it_was_answered() {
    use std::sync::Arc;
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("disk");
    let Some(disk) = common::FreezableDisk::mount_or_skip(&mount) else {
        return;
    };
    // Reads go to the demo datastore; a write is answered 500 once released.
    let (real, _stop) = common::start_datastore(200).await;
    let (arrived, release) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (a, r) = (arrived.clone(), release.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (arrived, release) = (a.clone(), r.clone());
            let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                let (arrived, release) = (arrived.clone(), release.clone());
                async move {
                    let (status, body) = if req.method() == http::Method::GET {
                        let path = req.uri().path_and_query().unwrap().as_str();
                        (200, common::datastore_body(real, path).await)
                    } else {
                        arrived.notify_one();
                        release.notified().await;
                        (500, Bytes::from_static(b"{}"))
                    };
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        audit_dir: Some(mount.join("log")),
        ..Default::default()
    })
    .await;
    let token = app.token("canvasser");
    let page = app
        .get(
            "/voter/electors?per_page=1",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(
        page.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&page.body)
    );
    let id = page.json()["records"][0]["elector_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut write = Box::pin(app.canvass(
        &id,
        &token,
        "canvassing",
        r#"{"last_canvassed":"2026-11-30"}"#,
    ));
    // The write reaches the datastore (its intent's record durable); the disk stops before
    // the datastore answers.
    tokio::select! {
        r = &mut write => panic!("answered before it was sent: {:?}", r.body),
        () = arrived.notified() => {}
    }
    disk.freeze();
    release.notify_one();
    // Bounded: the answer's record counts as stalled after ten seconds.
    let write = tokio::time::timeout(std::time::Duration::from_secs(90), write)
        .await
        .expect("a write waiting for a stalled log was never answered");
    assert_eq!(
        write.status,
        502,
        "{:?}",
        String::from_utf8_lossy(&write.body)
    );
    assert_eq!(write.json()["type"], "urn:wardgate:problem:upstream-error");
    disk.thaw();
    let rid = write.headers["x-request-id"].to_str().unwrap().to_owned();
    // The intent's, the answer's and the one that follows it.
    let records = app.audit_records_of(&rid, 3).await;
    let after = (records.iter())
        .find(|r| r["detail"]["withheld_after_recording"] == "audit_stalled")
        .unwrap_or_else(|| panic!("no record follows the answer's: {records:?}"));
    assert_eq!(after["status"], 502, "{records:?}");
    assert_eq!(after["reason"], "upstream_error", "{records:?}");
    app.stop().await;
}

/// A reload's refusal that the log cannot hold is not forgotten: a refused pack is remembered
/// (so that it is not recorded again at every signal) only once its refusal is recorded, so
/// once the log has room the same files are read again and the refusal recorded.
#[tokio::test]
async fn a_reload_the_log_cannot_hold_changes_nothing_and_is_recorded_later() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("audit");
    let Some(_tmpfs) = Tmpfs::mount_or_skip(&mount, "256k") else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        audit_dir: Some(mount.clone()),
        ..Default::default()
    })
    .await;
    let token = app.token("councillor");
    let list = || {
        app.get(
            "/voter/electors?per_page=2",
            Some(&token),
            Some("canvassing"),
        )
    };
    assert_eq!(list().await.status, 200);

    fill(&mount);
    while list().await.status != 503 {}
    // A small record may still fit in the segment's last block: packs broken in new ways are
    // refused (and recorded) until one's refusal cannot be.
    let broken = app.dir.path().join("policies").join("broken.cedar");
    let mut attempts = 0;
    let e = loop {
        attempts += 1;
        assert!(attempts < 100, "every refusal was recorded on a full disk");
        let text = format!("permit (principal, action, resource) when {{ // {attempts}\n");
        std::fs::write(&broken, text).unwrap();
        let e = wardgate::rekey::reload_policy(&app.gw).await.unwrap_err();
        if format!("{e:#}").contains("audit record could not be written") {
            break e;
        }
    };
    assert!(format!("{e:#}").contains("broken.cedar"), "{e:#}");

    std::fs::remove_file(mount.join("filler")).unwrap();
    assert_eq!(list().await.status, 200, "the pack in force still decides");
    let refusals = || {
        (common::read_audit(&mount).into_iter())
            .filter(|r| r["reason"] == "policy_reload_refused")
            .count()
    };
    assert_eq!(refusals(), attempts - 1);
    // The same files, read again now that the log has room: refused, and recorded.
    let e = wardgate::rekey::reload_policy(&app.gw).await.unwrap_err();
    assert!(
        !format!("{e:#}").contains("audit record could not be written"),
        "{e:#}"
    );
    assert_eq!(refusals(), attempts);
    // And once recorded, remembered: the next signal records nothing more.
    wardgate::rekey::reload_policy(&app.gw).await.unwrap();
    assert_eq!(refusals(), attempts);
    app.stop().await;
}

/// No audit, no write either: a write is logged before the datastore sees it, so once the log
/// cannot be written a write answers 503 and the datastore's record is as it was.
#[tokio::test]
async fn a_write_the_log_cannot_hold_never_reaches_the_datastore() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("audit");
    let Some(_tmpfs) = Tmpfs::mount_or_skip(&mount, "256k") else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        audit_dir: Some(mount.clone()),
        ..Default::default()
    })
    .await;
    let token = app.token("canvasser");
    let page = app
        .get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(page.status, 200);
    let id = page.json()["records"][0]["elector_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let write = |day: u32| {
        let (app, token, id) = (&app, &token, &id);
        async move {
            app.canvass(
                id,
                token,
                "canvassing",
                &format!(r#"{{"last_canvassed":"2026-11-{day:02}"}}"#),
            )
            .await
        }
    };
    let stored = || async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let uri = format!("http://{}/electors/{id}", app.upstream);
        let resp = client.get(uri.parse().unwrap()).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<Value>(&body).unwrap()["record"]["last_canvassed"].clone()
    };
    let ok = write(1).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(stored().await, json!("2026-11-01"));
    // The write's record made before forwarding, and the answer's, both name the target and
    // the field written.
    let rid = ok.headers["x-request-id"].to_str().unwrap().to_owned();
    let both: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["request_id"] == rid.as_str())
        .collect();
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(
        both[0]["detail"],
        json!({"write": "intended", "written": ["last_canvassed"]})
    );
    for r in &both {
        assert_eq!(r["subjects"], json!([id]));
        assert_eq!(r["decision"], "allow");
    }
    assert_eq!(both[0]["fields"], json!([]));
    assert_eq!(both[1]["detail"], json!({"written": ["last_canvassed"]}));

    fill(&mount);
    // The segment's last page may hold a few more records. A write whose record before
    // forwarding was durable may reach the datastore even if the answer's record then is not
    // (503, and the log still names it); once the log holds nothing more, no write does.
    let (mut stored_day, mut refused_unwritten) = (1, 0);
    for day in 2..=28 {
        let r = write(day).await;
        let now = stored().await;
        if r.status == 200 {
            assert_eq!(now, json!(format!("2026-11-{day:02}")));
            stored_day = day;
            continue;
        }
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert_eq!(r.json()["type"], "urn:wardgate:problem:audit-unavailable");
        let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
        let intent_logged = app
            .audit_records()
            .iter()
            .any(|a| a["request_id"] == rid.as_str() && a["detail"]["write"] == "intended");
        if now == json!(format!("2026-11-{day:02}")) {
            assert!(
                intent_logged,
                "a write reached the datastore with no durable record of it"
            );
            stored_day = day;
        } else {
            assert_eq!(now, json!(format!("2026-11-{stored_day:02}")));
            refused_unwritten += 1;
            if refused_unwritten == 3 {
                break;
            }
        }
    }
    assert_eq!(
        refused_unwritten, 3,
        "a full disk should stop writes within a page of records"
    );
    app.stop().await;
}

/// The newest records cut from the log leave a valid chain, which verification alone cannot
/// tell from a whole one. The chain heads the gateway published meanwhile to its witness (a
/// real Redis, under the README's ACL rules: the gateway may only `RPUSH` its key, the auditor
/// only `LRANGE`) show the cut, through the command an operator runs; and the gateway's
/// credentials cannot remove a head.
#[tokio::test]
async fn records_cut_from_the_end_show_against_the_witness() {
    let redis = RedisServer::start();
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut admin = admin.get_connection().unwrap();
    for rule in [
        format!(
            "wardgate-witness on >gateway-pw resetkeys ~{WITNESS_KEY} resetchannels -@all +rpush"
        ),
        "auditor on >auditor-pw resetkeys ~wardgate:audit-heads:* resetchannels -@all +lrange"
            .to_owned(),
    ] {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER");
        for word in rule.split(' ') {
            cmd.arg(word);
        }
        let _: () = cmd.query(&mut admin).unwrap();
    }
    let as_user = |user: &str| format!("redis://{user}@127.0.0.1:{}/", redis.port);
    let (gateway_url, url) = (
        as_user("wardgate-witness:gateway-pw"),
        as_user("auditor:auditor-pw"),
    );
    let mut app = spawn_app_with(AppOptions {
        witness: Some(gateway_url.clone()),
        ..Default::default()
    })
    .await;
    let token = app.token("councillor");
    for _ in 0..3 {
        let r = app
            .get(
                "/voter/electors?per_page=5",
                Some(&token),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    // Published while serving (every 100ms here), not only at the stop.
    let start = std::time::Instant::now();
    while wardgate::audit::witness::read_all(&url, WITNESS_KEY)
        .unwrap()
        .heads
        .is_empty()
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "no head published"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The stop publishes the final head.
    app.halt().await;
    let heads = wardgate::audit::witness::read_all(&url, WITNESS_KEY)
        .unwrap()
        .heads;
    let whole = wardgate::audit::verify_dir(&app.audit_dir).unwrap();
    assert_eq!(heads.keys().last(), Some(&whole.last_seq));

    // Whoever holds the gateway's credentials (the host) can append, and nothing else.
    let gateway = redis::Client::open(gateway_url.as_str()).unwrap();
    let mut gateway = gateway.get_connection().unwrap();
    let attempts: [&[&str]; 6] = [
        &["DEL", WITNESS_KEY],
        &["LTRIM", WITNESS_KEY, "0", "0"],
        &["LPOP", WITNESS_KEY],
        &["LSET", WITNESS_KEY, "0", "{}"],
        &["XADD", WITNESS_KEY, "MAXLEN", "0", "*", "seq", "1"],
        &["RENAME", WITNESS_KEY, "elsewhere"],
    ];
    for words in attempts {
        let mut cmd = redis::cmd(words[0]);
        for w in &words[1..] {
            cmd.arg(*w);
        }
        let refused = cmd.query::<redis::Value>(&mut gateway).unwrap_err();
        assert!(
            refused.to_string().contains("NOPERM"),
            "{words:?}: {refused}"
        );
    }
    let left = wardgate::audit::witness::read_all(&url, WITNESS_KEY).unwrap();
    assert_eq!(left.heads, heads);

    let verify_at = |key: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wardgate"));
        cmd.args(["audit", "verify", "--dir"]).arg(&app.audit_dir);
        if let Some(key) = key {
            // The auditor's credentials from the environment, not the command line.
            cmd.env("WARDGATE_WITNESS_URL", &url)
                .args(["--witness-key", key]);
        }
        let out = cmd.output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout) + &text(&out.stderr))
    };
    let verify = |witness: bool| verify_at(witness.then_some(WITNESS_KEY));
    let (ok, said) = verify(true);
    assert!(
        ok && said.contains("none past its end") && said.contains("newest published at"),
        "{said}"
    );
    // A key with no heads (a typo, or one pointed elsewhere) vouches for nothing.
    let (ok, said) = verify_at(Some("wardgate:audit-heads:elsewhere"));
    assert!(!ok && said.contains("holds no head"), "{said}");

    // The newest record cut away whole.
    let newest = std::fs::read_dir(&app.audit_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .max()
        .unwrap();
    let text = std::fs::read(&newest).unwrap();
    let keep = text[..text.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    std::fs::write(&newest, &text[..keep]).unwrap();
    let (ok, said) = verify(false);
    assert!(ok, "a valid chain without the witness: {said}");
    let (ok, said) = verify(true);
    assert!(!ok, "{said}");
    assert!(
        said.contains(&format!("the witness saw seq {}", whole.last_seq))
            && said.contains("cut from the end"),
        "{said}"
    );

    // The host can append what it likes: something that is no head is passed over (and
    // reported), a head below the ones before it is not this log's gateway's.
    for junk in ["not a head", r#"{"seq":1,"hash":"00","ts":"","at":""}"#] {
        let _: u64 = redis::cmd("RPUSH")
            .arg(WITNESS_KEY)
            .arg(junk)
            .query(&mut gateway)
            .unwrap();
    }
    let (ok, said) = verify(true);
    assert!(!ok, "{said}");
    assert!(
        said.contains("not chain heads") && said.contains("only rise"),
        "{said}"
    );
    app.stop().await;
}
