//! Breach detection end to end against the demo: each rule raised by a scripted scenario of
//! real requests, none by a normal canvassing day, containment revoking the caller's tokens, the live
//! feed, and classification. Working hours are set around "now" (or away from it) so the
//! outcome does not depend on when the suite runs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{AppOptions, TestApp, daytime, scrape, set_hours, spawn_app_with};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use wardgate::config::Config;
use wardgate::watch::rules::{local_minute, now_millis};
use wardgate::watch::settings::{Mode, Rule};

const WARD: &str = "E05011391";

/// Working hours that start in two hours and end ten hours later: now is after hours.
fn night(cfg: &mut Config) {
    let now = local_minute(now_millis(), cfg.watch.zone);
    set_hours(cfg, (now + 120) % 1440, (now + 720) % 1440);
}

fn contain_scrapers(cfg: &mut Config) {
    daytime(cfg);
    cfg.watch.rules.get_mut(&Rule::Volume).unwrap().mode = Mode::Contain;
}

/// Daytime, and a councillor's `volume` norm of 20 records.
fn low_volume(cfg: &mut Config) {
    daytime(cfg);
    let volume = cfg.watch.rules.get_mut(&Rule::Volume).unwrap();
    volume.limits.insert("councillor".to_owned(), 20);
}

async fn app(tweak: fn(&mut Config)) -> TestApp {
    spawn_app_with(AppOptions {
        electors: Some(6000),
        tweak: Some(tweak),
        ..AppOptions::default()
    })
    .await
}

/// Returns once the app is ready: with Redis, once the shared controls have been read, so
/// that requests are served.
async fn ready(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.admin_get("/readyz").await.status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A token for `sub` with the given role, areas and purposes.
fn token(app: &TestApp, sub: &str, role: &str, areas: &[&str], purposes: &[&str]) -> String {
    let mut c = app.claims(role, areas, purposes);
    c["sub"] = json!(sub);
    app.sign(&c)
}

async fn alerts(app: &TestApp) -> Vec<Value> {
    let r = app.admin_get_with("/alerts", &app.token("security")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.json()["alerts"].as_array().unwrap().clone()
}

/// Returns once every record made before it has been examined: the detector handles records
/// in log order, so once a later request (a marker's) shows in the live feed, everything
/// before it has been.
async fn all_examined(app: &TestApp) {
    let marker = token(
        app,
        "marker",
        "canvasser",
        &["E08000035/CGW1"],
        &["canvassing"],
    );
    feed_until(
        app,
        "?principal=marker",
        &app.token("security"),
        async {
            app.get(
                "/voter/electors?per_page=1",
                Some(&marker),
                Some("canvassing"),
            )
            .await;
        },
        |t| t.contains("\"principal\":\"marker\""),
    )
    .await;
}

/// Polls the breach log until `rule` fires for `principal`; returns the alert and how long it took.
async fn wait_for_alert(app: &TestApp, rule: &str, principal: &str) -> (Value, Duration) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Some(a) = alerts(app)
            .await
            .into_iter()
            .find(|a| a["rule"] == rule && a["key"] == principal)
        {
            return (a, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "no `{rule}` alert for `{principal}`; alerts: {:#}",
        json!(alerts(app).await)
    );
}

/// Every elector in the upstream, straight from the datastore.
async fn upstream_electors(app: &TestApp) -> Vec<Value> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut out = Vec::new();
    for page in 1.. {
        let uri = format!("http://{}/electors?per_page=1000&page={page}", app.upstream);
        let resp = client.get(uri.parse().unwrap()).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        let records = v["records"].as_array().unwrap();
        if records.is_empty() {
            break;
        }
        out.extend(records.iter().cloned());
    }
    out
}

/// One page of 200 records, which must be answered: enough after hours for `unusual_hours`.
async fn a_big_page(app: &TestApp, token: &str, purpose: &str) -> Value {
    let r = app
        .get("/voter/electors?per_page=200", Some(token), Some(purpose))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.json()
}

fn breach_log(app: &TestApp) -> Vec<Value> {
    std::fs::read_to_string(&app.breach_log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraping_a_ward_raises_an_alert_citing_the_pages() {
    let app = app(daytime).await;
    let councillor = app.token("councillor");
    let pages = scrape(&app, &councillor, 3000).await;
    let last_page = Instant::now();
    let (alert, _) = wait_for_alert(&app, "volume", "demo-councillor").await;
    let latency = last_page.elapsed();
    println!(
        "scraping alert visible {} ms after the last page ({} pages)",
        latency.as_millis(),
        pages.len()
    );
    assert_eq!(alert["principal"]["role"], "councillor");
    assert_eq!(alert["mode"], "alert");
    assert!(alert["classification"].is_null());
    // Detected now, to be reported within 72 hours.
    let detected = time::OffsetDateTime::parse(
        alert["detected_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let report_by = time::OffsetDateTime::parse(
        alert["report_by"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(report_by - detected, time::Duration::hours(72));
    // The evidence is exactly audit records of this councillor's pages.
    let records = app.audit_records();
    let evidence: Vec<u64> = alert["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(evidence.len() >= 20, "{evidence:?}");
    for seq in &evidence {
        let r = records.iter().find(|r| r["seq"] == *seq).unwrap();
        assert_eq!(r["caller"]["subject"], "demo-councillor");
        assert!(pages.contains(&r["request_id"].as_str().unwrap().to_owned()));
    }
    // In the breach log on disk, and in the audit chain as a system record.
    let log = breach_log(&app);
    assert!(
        log.iter()
            .any(|e| e["entry"] == "alert" && e["id"] == alert["id"])
    );
    assert!(
        records
            .iter()
            .any(|r| r["reason"] == "breach_alert" && r["detail"]["id"] == alert["id"])
    );
    // One alert per cooldown, however long the scrape goes on.
    scrape(&app, &councillor, 1500).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let volume_alerts = alerts(&app)
        .await
        .into_iter()
        .filter(|a| a["rule"] == "volume")
        .count();
    assert_eq!(volume_alerts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_canvassing_day_raises_no_alert() {
    let app = app(daytime).await;
    let electors = upstream_electors(&app).await;
    let in_ward: Vec<&Value> = electors
        .iter()
        .filter(|e| {
            ["CGW1", "CGW2"].contains(&e["polling_district"].as_str().unwrap_or(""))
                && e["markers"].as_array().is_some_and(|m| m.is_empty())
                && e["flags"].as_array().is_some_and(|f| f.is_empty())
        })
        .collect();
    assert!(in_ward.len() > 100, "{} electors to canvass", in_ward.len());
    // Twelve canvassers: two walk sheets each, a few electors looked up, doorstep results.
    for c in 0..12 {
        let t = token(
            &app,
            &format!("canvasser-{c}"),
            "canvasser",
            &["E08000035/CGW1", "E08000035/CGW2"],
            &["canvassing", "gotv"],
        );
        for page in [c % 3 + 1, c % 3 + 2] {
            let r = app
                .get(
                    &format!("/voter/electors?per_page=80&page={page}"),
                    Some(&t),
                    Some("canvassing"),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK);
        }
        for k in 0..5 {
            let e = in_ward[(c * 7 + k * 13) % in_ward.len()];
            let id = e["elector_id"].as_str().unwrap();
            if k < 3 {
                let r = app
                    .get(
                        &format!("/voter/electors/{id}"),
                        Some(&t),
                        Some("canvassing"),
                    )
                    .await;
                // Chosen to be canvassable: in the districts, no markers, no flags.
                assert_eq!(r.status, StatusCode::OK, "{id}");
            }
            let r = app
                .canvass(
                    id,
                    &t,
                    "canvassing",
                    r#"{"voting_intention":"LAB","canvass_issues":["housing"]}"#,
                )
                .await;
            assert!(r.status == StatusCode::OK, "{id}: {:?}", r.body);
        }
    }
    // The councillor's casework and a walk sheet of their own.
    let cllr = app.token("councillor");
    a_big_page(&app, &cllr, "canvassing").await;
    // A barrier: an analyst asks for an anonymous elector by id, which `protected_subject`
    // alerts on at once. Findings are acted on in turn, so once its alert is out, any the
    // day raised would be too: the barrier's is the only one.
    let anonymous = (electors.iter())
        .find(|e| (e["markers"].as_array()).is_some_and(|m| m.contains(&json!("N"))))
        .expect("an anonymous elector");
    let barrier = token(&app, "barrier", "analyst", &["E92000001"], &["profiling"]);
    let id = anonymous["elector_id"].as_str().unwrap();
    let r = (app.get(
        &format!("/voter/electors/{id}"),
        Some(&barrier),
        Some("profiling"),
    ))
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    wait_for_alert(&app, "protected_subject", "barrier").await;
    let raised: Vec<Value> = alerts(&app).await;
    assert_eq!(raised.len(), 1, "{raised:#?}");
    let logged = breach_log(&app);
    assert!(!logged.is_empty());
    assert!(logged.iter().all(|e| e["key"] == "barrier"), "{logged:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_fires_on_its_scenario() {
    let app = app(daytime).await;
    let electors = upstream_electors(&app).await;
    let local = ["E08000035/CGW1", "E08000035/CGW2"];
    let canvasser = |sub: &str| token(&app, sub, "canvasser", &local, &["canvassing"]);

    // An export larger than a walk sheet.
    let t = token(
        &app,
        "exporter",
        "councillor",
        &["E14001320"],
        &["canvassing"],
    );
    let r = app
        .get(
            "/voter/electors?per_page=1000",
            Some(&t),
            Some("canvassing"),
        )
        .await;
    let n = r.json()["records"].as_array().unwrap().len();
    assert!(n >= 500, "the constituency page held only {n} records");
    wait_for_alert(&app, "large_export", "exporter").await;

    // Probing: twenty requests for a purpose the token does not grant.
    let t = canvasser("prober");
    for _ in 0..20 {
        let r = app
            .get("/voter/electors", Some(&t), Some("profiling"))
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }
    wait_for_alert(&app, "denied_burst", "prober").await;

    // Reading electors of another ward by id: withheld (404), and noticed.
    let t = canvasser("wanderer");
    let elsewhere: Vec<&str> = electors
        .iter()
        .filter(|e| e["ward"] != WARD && e["markers"].as_array().is_some_and(|m| m.is_empty()))
        .take(3)
        .map(|e| e["elector_id"].as_str().unwrap())
        .collect();
    for id in &elsewhere {
        let r = app
            .get(
                &format!("/voter/electors/{id}"),
                Some(&t),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    wait_for_alert(&app, "out_of_area", "wanderer").await;
    // Writing to them is the same attempt, and noticed the same way.
    let t = canvasser("far-writer");
    for id in &elsewhere {
        let r = app
            .canvass(id, &t, "canvassing", r#"{"voting_intention":"LAB"}"#)
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    wait_for_alert(&app, "out_of_area", "far-writer").await;

    // Asking for an anonymous elector by id: 404 to the caller, an alert for the team.
    let anonymous = electors
        .iter()
        .find(|e| e["markers"].as_array().unwrap().iter().any(|m| m == "N"))
        .expect("the demo register has anonymous electors");
    let t = canvasser("curious");
    let r = app
        .get(
            &format!(
                "/voter/electors/{}",
                anonymous["elector_id"].as_str().unwrap()
            ),
            Some(&t),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!String::from_utf8_lossy(&r.body).contains("anonymous"));
    wait_for_alert(&app, "protected_subject", "curious").await;

    // A revoked token that keeps trying.
    let claims = {
        let mut c = app.claims("canvasser", &local, &["canvassing"]);
        c["sub"] = json!("revoked-user");
        c
    };
    let t = app.sign(&claims);
    let r = app
        .admin_post(
            "/revocations",
            &app.token("security"),
            &json!({ "token_id": claims["jti"], "reason": "laptop stolen" }).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for _ in 0..5 {
        let r = app
            .get("/voter/electors", Some(&t), Some("canvassing"))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    wait_for_alert(&app, "ended_grant", "revoked-user").await;

    // One token from four addresses within the hour.
    let t = canvasser("roamer");
    for host in 2..=5u8 {
        let status = get_from(&app, IpAddr::from([127, 0, 0, host]), &t).await;
        assert_eq!(status, StatusCode::OK);
    }
    wait_for_alert(&app, "many_addresses", "roamer").await;
    // On disk the addresses are sealed (shredded after audit.client_addr_retention); the
    // detector saw them in the clear, and they read back while their day's key exists.
    let sealed: Vec<String> = app
        .audit_records()
        .iter()
        .filter(|r| r["caller"]["subject"] == "roamer")
        .map(|r| r["client_addr"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sealed.len(), 4);
    for (i, s) in sealed.iter().enumerate() {
        assert!(
            s.starts_with("sealed:v1:") && !s.contains("127.0.0."),
            "{s}"
        );
        assert_eq!(
            wardgate::audit::addr::reveal(&app.audit_dir, s).as_deref(),
            Some(format!("127.0.0.{}", i + 2).as_str())
        );
    }
    // Twenty refusals of a forged token from one address: an alert keyed on the address.
    for _ in 0..20 {
        let status = get_from(&app, IpAddr::from([127, 0, 0, 9]), "not.a.token").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    wait_for_alert(&app, "denied_burst", "addr:127.0.0.9").await;
    // Nor does the audit log's copy of the alerts hold them in the clear (the chain keeps its
    // records for the whole retention); the breach log, the security team's, does.
    for r in app.audit_records() {
        let text = r.to_string();
        assert!(
            [2, 3, 4, 5, 9]
                .iter()
                .all(|h| !text.contains(&format!("127.0.0.{h}"))),
            "{text}"
        );
        // An alert about an unknown caller is keyed on their address: not in the clear here.
        if r["reason"] == "breach_alert" {
            let key = r["detail"]["key"].as_str().unwrap();
            assert!(!key.starts_with("addr:"), "{r}");
        }
    }
    let logged = breach_log(&app);
    let roamer = logged
        .iter()
        .find(|e| e["rule"] == "many_addresses")
        .unwrap();
    assert_eq!(roamer["addresses"].as_array().unwrap().len(), 4, "{roamer}");

    // Reading the register one id after another.
    let t = token(
        &app,
        "enumerator",
        "councillor",
        &["E08000035"],
        &["canvassing"],
    );
    for i in 1..=20 {
        let r = app
            .get(
                &format!("/voter/electors/VF-{i:07}"),
                Some(&t),
                Some("canvassing"),
            )
            .await;
        assert!(r.status == StatusCode::OK || r.status == StatusCode::NOT_FOUND);
    }
    wait_for_alert(&app, "enumeration", "enumerator").await;

    // Nothing fired for anyone else, and each scenario fired only its own rule.
    let by: Vec<(String, String)> = alerts(&app)
        .await
        .iter()
        .map(|a| {
            (
                a["rule"].as_str().unwrap().to_owned(),
                a["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (rule, who) in &by {
        let expected = match who.as_str() {
            "exporter" => "large_export",
            "prober" | "addr:127.0.0.9" => "denied_burst",
            "wanderer" | "far-writer" => "out_of_area",
            "curious" => "protected_subject",
            "revoked-user" => "ended_grant",
            "roamer" => "many_addresses",
            // Reading ids in order also reaches other areas' and protected electors.
            "enumerator" if rule == "out_of_area" || rule == "protected_subject" => rule,
            "enumerator" => "enumeration",
            other => panic!("unexpected alert for `{other}`: {rule}"),
        };
        assert_eq!(rule, expected, "{by:?}");
    }
}

/// A data-plane GET from a given local address (loopback has all of 127/8).
async fn get_from(app: &TestApp, local: IpAddr, token: &str) -> StatusCode {
    let mut http = HttpConnector::new();
    http.set_local_address(Some(local));
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(http);
    let req = Request::get(format!("http://{}/voter/electors?per_page=10", app.addr))
        .header("authorization", format!("Bearer {token}"))
        .header("x-purpose", "canvassing")
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.request(req).await.unwrap().status()
}

/// An alert about a caller not known is keyed on their address, which the server log does
/// not hold (the audit log keeps it sealed, shredded after `audit.client_addr_retention`):
/// the log names the principal `addr`. (A current-thread runtime, so that the gateway's
/// tasks log where the capture listens.)
#[tokio::test]
async fn an_alert_keyed_on_an_address_does_not_log_it() {
    let (guard, logs) = common::capture_logs();
    let app = app(daytime).await;
    for _ in 0..20 {
        let status = get_from(&app, IpAddr::from([127, 0, 0, 9]), "not.a.token").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    wait_for_alert(&app, "denied_burst", "addr:127.0.0.9").await;
    drop(guard);
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("breach alert"), "{logs}");
    assert!(!logs.contains("127.0.0.9"), "{logs}");
    app.stop().await;
}

/// Behind a load balancer (`server.trusted_proxies`, here the loopback address the test
/// connects from) the client is the address the balancer forwards: the audit log records it,
/// and `many_addresses` sees one token used from four places. A peer that is not trusted is
/// recorded as itself whatever `X-Forwarded-For` it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_balancer_the_forwarded_client_is_recorded() {
    fn behind_balancer(cfg: &mut Config) {
        daytime(cfg);
        cfg.server.trusted_proxies = wardgate::client_addr::TrustedProxies::new(vec![
            wardgate::client_addr::Net::parse("127.0.0.1").unwrap(),
        ]);
    }
    let app = app(behind_balancer).await;
    let t = token(
        &app,
        "roamer",
        "canvasser",
        &["E08000035/CGW1"],
        &["canvassing"],
    );
    for host in 1..=4u8 {
        let client = format!("203.0.113.{host}");
        let r = app
            .request(
                http::Method::GET,
                "/voter/electors?per_page=10",
                &[
                    ("authorization", &format!("Bearer {t}")),
                    ("x-purpose", "canvassing"),
                    // What the client claimed, then what the balancer appended.
                    ("x-forwarded-for", &format!("198.51.100.77, {client}")),
                ],
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let sealed = app.audit_for(&r)["client_addr"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            wardgate::audit::addr::reveal(&app.audit_dir, &sealed).as_deref(),
            Some(client.as_str())
        );
    }
    wait_for_alert(&app, "many_addresses", "roamer").await;

    // From an address the balancer list does not hold: itself.
    let mut http = HttpConnector::new();
    http.set_local_address(Some(IpAddr::from([127, 0, 0, 9])));
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(http);
    let req = Request::get(format!("http://{}/voter/electors?per_page=10", app.addr))
        .header("authorization", format!("Bearer {t}"))
        .header("x-purpose", "canvassing")
        .header("x-forwarded-for", "203.0.113.1")
        .header("x-request-id", "spoofed-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), StatusCode::OK);
    let record = app
        .audit_records()
        .into_iter()
        .find(|r| r["client_request_id"] == "spoofed-1")
        .unwrap();
    assert_eq!(
        wardgate::audit::addr::reveal(&app.audit_dir, record["client_addr"].as_str().unwrap())
            .as_deref(),
        Some("127.0.0.9")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disclosures_after_hours_are_noticed() {
    let app = app(night).await;
    let page = a_big_page(&app, &app.token("councillor"), "canvassing").await;
    assert!(page["records"].as_array().unwrap().len() >= 100);
    let (alert, _) = wait_for_alert(&app, "unusual_hours", "demo-councillor").await;
    assert!(
        alert["summary"]
            .as_str()
            .unwrap()
            .contains("outside working hours")
    );
}

/// An automatic containment whose revocation the control journal cannot take (its disk
/// full) is in effect nowhere, and the audit log says so after the record of the change, not
/// only the breach log: the chain must not read as the caller revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containment_that_did_not_take_is_recorded_as_failed() {
    containment_that_did_not_take(None).await;
}

/// The same with Redis: the alert's mark is taken back, so that another replica's detector
/// finding the same raises it and contains, rather than staying quiet on it for the cooldown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containment_that_did_not_take_gives_its_mark_back() {
    containment_that_did_not_take(Some(common::RedisServer::start())).await;
}

async fn containment_that_did_not_take(redis: Option<common::RedisServer>) {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let Some(_tmpfs) = common::Tmpfs::mount_or_skip(&data, "64k") else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        electors: Some(6000),
        tweak: Some(contain_scrapers),
        data_dir: Some(data.clone()),
        redis: redis.as_ref().map(common::RedisServer::url),
        ..AppOptions::default()
    })
    .await;
    // (With Redis, nothing is served until the first sync of the shared controls.)
    ready(&app).await;
    common::fill(&data);
    let councillor = app.token("councillor");
    let failed = |app: &TestApp| {
        app.audit_records().into_iter().find(|r| {
            r["reason"] == "controls_not_recorded"
                && r["route"] == "watch.breach_containment_failed"
        })
    };
    let mut found = None;
    for page in 1..=400 {
        let r = app
            .get(
                &format!("/voter/electors?per_page=100&page={}", page % 15 + 1),
                Some(&councillor),
                Some("canvassing"),
            )
            .await;
        // Not revoked: the change took nowhere (past the role's quota, refused for that).
        assert!(
            [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS].contains(&r.status),
            "page {page}: {:?}",
            r.body
        );
        found = failed(&app);
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = found.expect("no record of the failed containment");
    assert_eq!(failed["decision"], "error", "{failed}");
    assert_eq!(failed["status"], 503, "{failed}");
    assert_eq!(failed["detail"]["subject"], "demo-councillor", "{failed}");
    assert!(
        failed["detail"]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("not revoked"),
        "{failed}"
    );
    // After the record of the change it answers.
    let records = app.audit_records();
    let at = |reason: &str| records.iter().position(|r| r["reason"] == reason).unwrap();
    assert!(at("breach_containment") < at("controls_not_recorded"));
    let change = &records[at("breach_containment")];
    assert_eq!(
        failed["detail"]["containment"], change["detail"]["id"],
        "{change}"
    );
    if let Some(redis) = &redis {
        // Taken when the alert was raised, back once its containment failed.
        let mark = format!(
            "{}:alerted:volume:demo-councillor",
            app.gw.watch.settings.shared_stream
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let held: Option<String> = (redis::cmd("GET").arg(&mark))
                .query(&mut redis.connection())
                .unwrap();
            if held.is_none() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the mark is still held: {held:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containment_revokes_every_token_the_scraper_holds() {
    let app = app(contain_scrapers).await;
    let councillor = app.token("councillor");
    // The token the scraper's app would refresh to (or hold on a second device): the same
    // caller, another token id.
    let mut claims = app.claims(
        "councillor",
        &["E05011391", "BR-CROSS-GATES-WHINMOOR"],
        &["canvassing"],
    );
    claims["sub"] = "demo-councillor".into();
    let refreshed = app.sign(&claims);
    let with_refreshed = || {
        app.get(
            "/voter/electors?per_page=10",
            Some(&refreshed),
            Some("canvassing"),
        )
    };
    let r = with_refreshed().await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // Page on as a scraper would; the token stops working part way.
    let mut refused = None;
    for page in 1..=60 {
        let r = app
            .get(
                &format!("/voter/electors?per_page=100&page={}", page % 15 + 1),
                Some(&councillor),
                Some("canvassing"),
            )
            .await;
        if r.status != StatusCode::OK {
            refused = Some((page, r));
            break;
        }
        // Slow enough for detection to overtake the scraper, as it would over a network.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (page, r) = refused.expect("the scraper was never stopped");
    println!("containment stopped the scraper at page {page}");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["type"], "urn:wardgate:problem:token-revoked");
    let (alert, _) = wait_for_alert(&app, "volume", "demo-councillor").await;
    assert_eq!(alert["mode"], "contain");
    let r = with_refreshed().await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the refreshed token scrapes on"
    );
    assert_eq!(r.json()["type"], "urn:wardgate:problem:token-revoked");
    // Other callers are untouched.
    let r = app
        .get(
            "/voter/electors?per_page=10",
            Some(&app.token("canvasser")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // The breach log and the audit log both say what was done and why.
    let contained = alerts(&app)
        .await
        .into_iter()
        .find(|a| a["id"] == alert["id"])
        .unwrap();
    assert_eq!(contained["containment"]["outcome"], "revoked");
    assert_eq!(contained["containment"]["subject"], "demo-councillor");
    let records = app.audit_records();
    let change = records
        .iter()
        .find(|r| r["reason"] == "breach_containment")
        .unwrap();
    assert_eq!(change["detail"]["by"], "wardgate-watch");
    assert!(
        change["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains(alert["id"].as_str().unwrap())
    );
}

/// Reads SSE frames from the admin plane until `until` holds for the text so far.
async fn feed_until(
    app: &TestApp,
    query: &str,
    token: &str,
    trigger: impl std::future::Future<Output = ()>,
    until: impl Fn(&str) -> bool,
) -> String {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{}/events{query}", app.admin))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The first frame is the greeting: the subscription exists before the trigger runs.
    let hello = body.frame().await.unwrap().unwrap();
    assert!(hello.data_ref().is_some());
    trigger.await;
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !until(&text) {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, body.frame())
            .await
            .unwrap_or_else(|_| panic!("feed never showed it; got {text}"))
            .unwrap()
            .unwrap();
        if let Some(d) = frame.data_ref() {
            text.push_str(std::str::from_utf8(d).unwrap());
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_streams_filtered_access_events_without_subject_ids() {
    let app = app(daytime).await;
    let canvasser = app.token("canvasser");
    let councillor = app.token("councillor");
    let text = feed_until(
        &app,
        "?principal=demo-canvasser",
        &app.token("security"),
        async {
            let r = app
                .get(
                    "/voter/electors?per_page=5",
                    Some(&councillor),
                    Some("canvassing"),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK);
            let r = app
                .get(
                    "/voter/electors?per_page=5",
                    Some(&canvasser),
                    Some("canvassing"),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK);
        },
        |t| t.contains("\"principal\":\"demo-canvasser\""),
    )
    .await;
    assert!(text.contains("event: access"), "{text}");
    assert!(!text.contains("demo-councillor"), "{text}");
    assert!(text.contains("\"records\":5"), "{text}");
    assert!(
        !text.contains("VF-"),
        "the feed must not carry subject ids: {text}"
    );

    // Denials only.
    let text = feed_until(
        &app,
        "?decision=deny",
        &app.token("dpo"),
        async {
            app.get("/voter/electors", Some(&canvasser), Some("canvassing"))
                .await;
            app.get("/voter/electors", Some(&canvasser), Some("profiling"))
                .await;
        },
        |t| t.contains("\"decision\":\"deny\""),
    )
    .await;
    assert!(!text.contains("\"decision\":\"allow\""), "{text}");

    // Opening the feed is itself audited.
    assert!(
        app.audit_records()
            .iter()
            .any(|r| r["detail"]["opened_live_feed"] == "decision=deny")
    );
}

/// A revoked reader's live feed ends: the next event (or heartbeat) finds the reader no
/// longer standing, and the stream closes instead of carrying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_readers_live_feed_ends() {
    let app = app(daytime).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{}/events", app.admin))
        .header("authorization", format!("Bearer {}", app.token("dpo")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    assert!(body.frame().await.unwrap().unwrap().data_ref().is_some());
    let revoked = app
        .admin_post(
            "/revocations",
            &app.token("security"),
            r#"{"subject":"demo-dpo","reason":"device lost"}"#,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    let councillor = app.token("councillor");
    let r = app
        .get(
            "/voter/electors?per_page=5",
            Some(&councillor),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let mut after = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.unwrap().data_ref() {
                after.push_str(std::str::from_utf8(d).unwrap());
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the feed went on after its reader was revoked: {after}"
    );
    // Events recorded before the revocation took effect (the feed's opening, the revocation's
    // own record) may have gone; the councillor's request after it did not.
    assert!(!after.contains("demo-councillor"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_for_security_and_dpo_only_and_classification_is_kept() {
    let app = app(daytime).await;
    // The page itself carries no data and a strict content security policy.
    let page = app.admin_get("/console").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    // Its data needs a security or DPO token.
    assert_eq!(
        app.admin_get("/alerts").await.status,
        StatusCode::UNAUTHORIZED
    );
    for who in ["canvasser", "councillor", "analyst"] {
        let r = app.admin_get_with("/alerts", &app.token(who)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{who}");
        let r = app.admin_get_with("/events", &app.token(who)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{who}");
    }
    let r = app
        .admin_get_with("/events?colour=red", &app.token("security"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    scrape(&app, &app.token("councillor"), 2100).await;
    let (alert, _) = wait_for_alert(&app, "volume", "demo-councillor").await;
    let id = alert["id"].as_str().unwrap();
    let sec = app.token("security");
    let path = format!("/alerts/{id}/classify");
    for (body, status) in [
        (r#"{"class":"reportable"}"#, StatusCode::BAD_REQUEST),
        (r#"{"class":"maybe","note":"x"}"#, StatusCode::BAD_REQUEST),
        (
            r#"{"class":"near_miss","note":"  "}"#,
            StatusCode::BAD_REQUEST,
        ),
    ] {
        assert_eq!(
            app.admin_post(&path, &sec, body).await.status,
            status,
            "{body}"
        );
    }
    let r = app
        .admin_post(
            "/alerts/A-0-0000/classify",
            &sec,
            r#"{"class":"near_miss","note":"x"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .admin_post(
            &path,
            &app.token("canvasser"),
            r#"{"class":"near_miss","note":"x"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .admin_post(
            &path,
            &sec,
            r#"{"class":"near_miss","note":"load test by the councillor's office"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = app
        .admin_post(
            &path,
            &app.token("dpo"),
            r#"{"class":"reportable","note":"no load test was booked"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let a = r.json();
    assert_eq!(a["classification"]["class"], "reportable");
    assert_eq!(a["classification"]["by"], "demo-dpo");
    assert_eq!(a["history"].as_array().unwrap().len(), 2);
    // Both judgements are in the breach log and the audit log.
    let classified: Vec<Value> = breach_log(&app)
        .into_iter()
        .filter(|e| e["entry"] == "classified")
        .collect();
    assert_eq!(classified.len(), 2);
    let audited = app
        .audit_records()
        .into_iter()
        .filter(|r| r["detail"]["classified_alert"] == id)
        .count();
    assert_eq!(audited, 2);
    // Containment from the console: audited, applied on every replica, kept with the alert.
    let contain = format!("/alerts/{id}/contain");
    assert_eq!(
        app.admin_post(&contain, &sec, r#"{"reason":""}"#)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.admin_post(&contain, &app.token("canvasser"), r#"{"reason":"x"}"#)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let r = app
        .admin_post(
            &contain,
            &sec,
            r#"{"reason":"the councillor's office cannot explain it"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["containment"]["outcome"], "revoked");
    let r = app
        .get(
            "/voter/electors?per_page=5",
            Some(&app.token("councillor")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        breach_log(&app)
            .iter()
            .any(|e| e["entry"] == "contained" && e["alert_id"] == id)
    );
    assert!(
        app.audit_records()
            .iter()
            .any(|r| r["detail"]["contained_alert"] == id
                && r["caller"]["subject"] == "demo-security")
    );
    // And they survive a restart.
    let app = app.restart().await;
    let a = alerts(&app)
        .await
        .into_iter()
        .find(|a| a["id"] == id)
        .unwrap();
    assert_eq!(a["classification"]["class"], "reportable");
}

/// A containment this replica cannot journal is in effect nowhere: the console says so (503
/// `controls-not-recorded`, not a stale store), the breach log shows the attempt as not
/// revoked and the token still works; made again once the journal can be written, it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containment_that_cannot_be_journalled_says_so_and_can_be_made_again() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let Some(_tmpfs) = common::Tmpfs::mount_or_skip(&data, "64k") else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        tweak: Some(night),
        data_dir: Some(data.clone()),
        ..AppOptions::default()
    })
    .await;
    let token = app.token("councillor");
    let list = || {
        app.get(
            "/voter/electors?per_page=20",
            Some(&token),
            Some("canvassing"),
        )
    };
    // Enough records after hours for the rule.
    a_big_page(&app, &token, "canvassing").await;
    let (alert, _) = wait_for_alert(&app, "unusual_hours", "demo-councillor").await;
    let contain = format!("/alerts/{}/contain", alert["id"].as_str().unwrap());
    let sec = app.token("security");
    let body = r#"{"reason":"nobody canvasses at this hour"}"#;

    common::fill(&data);
    let r = app.admin_post(&contain, &sec, body).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(
        r.json()["type"],
        "urn:wardgate:problem:controls-not-recorded"
    );
    // The attempt is in the breach log, as not taken.
    let tried: Vec<Value> = breach_log(&app)
        .into_iter()
        .filter(|e| e["entry"] == "contained")
        .collect();
    assert_eq!(tried.len(), 1, "{tried:?}");
    let outcome = tried[0]["containment"]["outcome"].as_str().unwrap();
    assert!(outcome.starts_with("not revoked"), "{outcome}");
    assert_eq!(list().await.status, StatusCode::OK, "nothing took");

    std::fs::remove_file(data.join("filler")).unwrap();
    let r = app.admin_post(&contain, &sec, body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["containment"]["outcome"], "revoked");
    assert_eq!(list().await.status, StatusCode::UNAUTHORIZED);
    let a = alerts(&app)
        .await
        .into_iter()
        .find(|a| a["id"] == alert["id"])
        .unwrap();
    assert_eq!(a["containment"]["outcome"], "revoked", "{a}");
}

/// A page answered while the gateway shuts down is examined like any other: detection stops
/// only once the log has every record of the drain, so a scrape whose last page finished
/// during it still raises its alert (recorded in the breach log the next start reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_requests_finished_during_shutdown_are_examined() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let real = common::spawn_app().await;
    let page = common::datastore_body(real.upstream, "/electors?per_page=200").await;
    let upstream = common::delayed_upstream(page, Duration::from_millis(1500)).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        tweak: Some(low_volume),
        ..AppOptions::default()
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /voter/electors?per_page=200 HTTP/1.1\r\nhost: wardgate\r\nconnection: close\r\n\
         authorization: Bearer {}\r\nx-purpose: canvassing\r\n\r\n",
        app.token("councillor")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // The request waits on the datastore while the gateway is told to stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Stopped, not restarted: a start reads the log back and would raise the alert itself.
    let mut app = app;
    app.halt().await;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.matches("\"elector_id\"").count() >= 20,
        "enough records for the rule"
    );
    // On disk before anything starts again: the alert in the breach log, its record in the
    // audit chain.
    let logged = breach_log(&app);
    let alert = (logged.iter())
        .find(|e| e["entry"] == "alert" && e["rule"] == "volume" && e["key"] == "demo-councillor")
        .unwrap_or_else(|| {
            panic!("no volume alert for the page answered during shutdown: {logged:#?}")
        });
    assert!(
        (app.audit_records().iter())
            .any(|r| r["reason"] == "breach_alert" && r["detail"]["id"] == alert["id"]),
        "{alert}"
    );
    real.stop().await;
}

/// Nobody classifies an alert about themselves: the DPO, whose own reading after hours raised
/// `unusual_hours`, cannot call it a near miss (403, recorded), and the alert stays open; the
/// security team, another person, can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_classifies_an_alert_about_themselves() {
    let app = app(night).await;
    let dpo = app.token("dpo");
    a_big_page(&app, &dpo, "breach_investigation").await;
    let (alert, _) = wait_for_alert(&app, "unusual_hours", "demo-dpo").await;
    let path = format!("/alerts/{}/classify", alert["id"].as_str().unwrap());
    let body = r#"{"class":"near_miss","note":"only me, working late"}"#;
    let r = app.admin_post(&path, &dpo, body).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    let record = app.audit_for(&r);
    assert_eq!(
        record["policy_ids"],
        json!(["admin.console-not-own-alert"]),
        "{record}"
    );
    let open = alerts(&app)
        .await
        .into_iter()
        .find(|a| a["id"] == alert["id"])
        .unwrap();
    assert!(open["classification"].is_null(), "{open}");
    let r = app.admin_post(&path, &app.token("security"), body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["classification"]["by"], "demo-security");
}

/// A gateway alerting at night whose breach log is on a full 64 KiB tmpfs (`watch`), once a
/// big page at night has raised an alert the breach log could not take; the alert's record
/// in the audit chain, written once. `None` where the tmpfs cannot be mounted (the test
/// skips).
struct Untaken {
    app: TestApp,
    watch: std::path::PathBuf,
    in_chain: Value,
    _tmpfs: common::Tmpfs,
    _scratch: tempfile::TempDir,
}

async fn an_untaken_alert() -> Option<Untaken> {
    let scratch = tempfile::tempdir().unwrap();
    let watch = scratch.path().join("watch");
    let tmpfs = common::Tmpfs::mount_or_skip(&watch, "64k")?;
    let at = watch.join("breach-log.jsonl");
    let app = spawn_app_with(AppOptions {
        tweak: Some(night),
        edit: Some(Box::new(move |cfg: &mut Config| cfg.watch.breach_log = at)),
        ..AppOptions::default()
    })
    .await;
    common::fill(&watch);
    let token = app.token("councillor");
    a_big_page(&app, &token, "canvassing").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.gw.watch.breach.is_healthy() {
        assert!(Instant::now() < deadline, "the alert was never tried");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut in_chain: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["reason"] == "breach_alert")
        .collect();
    assert_eq!(
        in_chain.len(),
        1,
        "written to the audit log once: {in_chain:?}"
    );
    Some(Untaken {
        app,
        watch,
        in_chain: in_chain.remove(0),
        _tmpfs: tmpfs,
        _scratch: scratch,
    })
}

/// The console's actions when the breach log cannot take them (its disk full): a
/// classification is not made, and a second audit record under its request id says so rather
/// than leave the first standing alone; a containment is made (the caller revoked) and the
/// answer says it was, not that it was refused for want of the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_actions_the_breach_log_cannot_take_say_what_was_made() {
    let scratch = tempfile::tempdir().unwrap();
    let watch = scratch.path().join("watch");
    let Some(_tmpfs) = common::Tmpfs::mount_or_skip(&watch, "64k") else {
        return;
    };
    let at = watch.join("breach-log.jsonl");
    let app = spawn_app_with(AppOptions {
        tweak: Some(night),
        edit: Some(Box::new(move |cfg: &mut Config| cfg.watch.breach_log = at)),
        ..AppOptions::default()
    })
    .await;
    let councillor = app.token("councillor");
    a_big_page(&app, &councillor, "canvassing").await;
    let (alert, _) = wait_for_alert(&app, "unusual_hours", "demo-councillor").await;
    let id = alert["id"].as_str().unwrap().to_owned();
    common::fill(&watch);
    let security = app.token("security");

    // The breach log's last page may still have room for an entry or two (the disk is full
    // of pages): classified, each with a note of 2,000 characters, until one does not fit.
    // Each action is asked up to `times` times, until one is not answered 200.
    let until_refused = |action: &'static str, body: String, times: usize| {
        let (app, path, security) = (&app, format!("/alerts/{id}/{action}"), &security);
        async move {
            for _ in 0..times {
                let r = app.admin_post(&path, security, &body).await;
                if r.status != StatusCode::OK {
                    return r;
                }
            }
            panic!("the full disk took every {action}");
        }
    };
    let body = json!({ "class": "near_miss", "note": "n".repeat(2000) }).to_string();
    let r = until_refused("classify", body, 4).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(
        r.json()["type"],
        "urn:wardgate:problem:breach-log-unavailable"
    );
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let records = app.audit_records_of(&rid, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["detail"]["classified_alert"], id.as_str());
    assert_eq!(records[1]["detail"]["not_made"], "breach_log_unavailable");
    assert_eq!(records[1]["decision"], "error");

    // So with containments, whose entries are short.
    let r = until_refused("contain", r#"{"reason":"late bulk read"}"#.to_owned(), 40).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(
        r.json()["type"],
        "urn:wardgate:problem:breach-log-unavailable"
    );
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("the change was made"),
        "{:?}",
        r.body
    );
    // Made: the councillor's token no longer serves.
    let after = app
        .get(
            "/voter/electors?per_page=5",
            Some(&councillor),
            Some("canvassing"),
        )
        .await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED, "{:?}", after.body);
    app.stop().await;
}

/// Stops `app`, empties its breach log (pruned by hand, its alerts closed) and starts it
/// again: once it has read the audit log back, the breach log is still empty, since the
/// audit log says the breach log took what it held (`watch.breach_logged`).
async fn pruned_by_hand_adds_nothing(mut app: TestApp) {
    app.halt().await;
    std::fs::write(&app.breach_log, b"").unwrap();
    let app = app.restart().await;
    ready(&app).await;
    all_examined(&app).await;
    assert_eq!(breach_log(&app), Vec::<Value>::new());
    app.stop().await;
}

/// An alert the breach log cannot take is not lost: it is in the audit log at once, not shown
/// meanwhile (no alert the console could not act on), tried again, and once the disk has room
/// it is recorded with the time it was detected, not the time it could be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_the_breach_log_cannot_take_is_recorded_once_it_can() {
    // (Each part held to the test's end: the tmpfs is unmounted when its guard drops.)
    let Some(Untaken {
        app,
        watch,
        in_chain,
        _tmpfs,
        _scratch,
    }) = an_untaken_alert().await
    else {
        return;
    };
    // A few retries' worth of failing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !alerts(&app)
            .await
            .iter()
            .any(|a| a["rule"] == "unusual_hours"),
        "an alert the breach log did not take is not shown"
    );
    assert_eq!(in_chain["detail"]["rule"], "unusual_hours");
    let freed = time::OffsetDateTime::now_utc();
    std::fs::remove_file(watch.join("filler")).unwrap();
    let (alert, _) = wait_for_alert(&app, "unusual_hours", "demo-councillor").await;
    let detected = time::OffsetDateTime::parse(
        alert["detected_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        detected + time::Duration::seconds(2) < freed,
        "detected at {detected}, recorded after {freed}"
    );
    assert_eq!(alert["id"], in_chain["detail"]["id"], "the same alert");
    // Taken, it is not added again at a start after the breach log is pruned by hand: the
    // audit log says the breach log took it.
    pruned_by_hand_adds_nothing(app).await;
}

/// An alert the breach log still could not take when the gateway stopped is not lost with the
/// memory that was trying it again: the next start finds it in the audit log and adds it to
/// the breach log, the same alert (its id, its detection time), listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_the_breach_log_had_not_taken_at_a_stop_is_in_it_after_the_restart() {
    // (Each part held to the test's end: the tmpfs is unmounted when its guard drops.)
    let Some(Untaken {
        app,
        watch,
        in_chain,
        _tmpfs,
        _scratch,
    }) = an_untaken_alert().await
    else {
        return;
    };
    let mut app = app;
    app.halt().await;
    assert!(
        !breach_log(&app)
            .iter()
            .any(|e| e["id"] == in_chain["detail"]["id"]),
        "the breach log took it before the stop"
    );
    std::fs::remove_file(watch.join("filler")).unwrap();
    let app = app.restart().await;
    let (alert, _) = wait_for_alert(&app, "unusual_hours", "demo-councillor").await;
    assert_eq!(alert["id"], in_chain["detail"]["id"], "the same alert");
    assert_eq!(alert["detected_at"], in_chain["detail"]["detected_at"]);
    let listed = alerts(&app).await;
    assert_eq!(
        (listed.iter())
            .filter(|a| a["rule"] == "unusual_hours")
            .count(),
        1,
        "{listed:?}"
    );
    // And a start after that adds it no second time (its reading back done once a request
    // after it is examined).
    let app = app.restart().await;
    ready(&app).await;
    all_examined(&app).await;
    let logged = breach_log(&app);
    assert_eq!(
        (logged.iter())
            .filter(|e| e["id"] == in_chain["detail"]["id"])
            .count(),
        1,
        "{logged:?}"
    );
    // Nor after the breach log is pruned by hand (its alerts closed): the audit log says the
    // breach log took it.
    pruned_by_hand_adds_nothing(app).await;
}

/// An alert the breach log still cannot take when the next start reads it back is not left
/// for the start after (by which time it may be past what is read back): it is offered to the
/// breach log again as the run goes on, and listed once the disk has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_the_breach_log_cannot_take_at_a_start_is_taken_later_in_that_run() {
    // (Each part held to the test's end: the tmpfs is unmounted when its guard drops.)
    let Some(Untaken {
        app,
        watch,
        in_chain,
        _tmpfs,
        _scratch,
    }) = an_untaken_alert().await
    else {
        return;
    };
    // Started again with the disk still full: the start's own attempt fails.
    let app = app.restart().await;
    ready(&app).await;
    all_examined(&app).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.gw.watch.breach.is_healthy() {
        assert!(Instant::now() < deadline, "the start never tried the alert");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    std::fs::remove_file(watch.join("filler")).unwrap();
    let (alert, _) = wait_for_alert(&app, "unusual_hours", "demo-councillor").await;
    assert_eq!(alert["id"], in_chain["detail"]["id"], "the same alert");
    app.stop().await;
}

/// A replica whose breach log cannot take an alert keeps no "already alerted" mark in the
/// shared store: the alert waits in its memory only (a restart loses it), and the mark would
/// silence every other replica's detector, the leader's cross-replica one among them, for the
/// whole cooldown.
#[tokio::test]
async fn an_alert_the_breach_log_cannot_take_leaves_no_mark_in_the_shared_store() {
    let scratch = tempfile::tempdir().unwrap();
    let watch = scratch.path().join("watch");
    let Some(_tmpfs) = common::Tmpfs::mount_or_skip(&watch, "64k") else {
        return;
    };
    let redis = common::RedisServer::start();
    let at = watch.join("breach-log.jsonl");
    let app = spawn_app_with(AppOptions {
        tweak: Some(night),
        redis: Some(redis.url()),
        edit: Some(Box::new(move |cfg: &mut Config| cfg.watch.breach_log = at)),
        ..AppOptions::default()
    })
    .await;
    let marks = || {
        let mut conn = redis.connection();
        redis::cmd("KEYS")
            .arg("*:alerted:*")
            .query::<Vec<String>>(&mut conn)
            .unwrap()
    };
    // The shared controls read once, so that requests are served.
    ready(&app).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    common::fill(&watch);
    let token = app.token("councillor");
    a_big_page(&app, &token, "canvassing").await;
    while app.gw.watch.breach.is_healthy() {
        assert!(Instant::now() < deadline, "the alert was never tried");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Its retries, and another finding while the log is failing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    a_big_page(&app, &app.token("canvasser"), "canvassing").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(marks(), Vec::<String>::new());
    // Once the log can take it, the alert is recorded all the same.
    std::fs::remove_file(watch.join("filler")).unwrap();
    wait_for_alert(&app, "unusual_hours", "demo-councillor").await;
    app.stop().await;
}

/// An alert the disk can take only part of is cut back off the breach log, so the next one is
/// written whole and the log still opens at the next start (a joined line would stop it).
#[test]
fn an_alert_the_disk_cannot_take_leaves_the_breach_log_whole() {
    use wardgate::watch::breach::{Alert, BreachLog};
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("watch");
    let Some(_tmpfs) = common::Tmpfs::mount_or_skip(&dir, "64k") else {
        return;
    };
    let path = dir.join("breach-log.jsonl");
    let alert = |id: &str, summary: String| Alert {
        id: id.to_owned(),
        rule: Rule::Volume,
        mode: Mode::Alert,
        summary,
        principal: None,
        key: "cllr".into(),
        client_addr: None,
        addresses: Vec::new(),
        evidence: vec![1],
        evidence_refs: Vec::new(),
        detected_at: "2026-01-01T00:00:00.000Z".into(),
        report_by: "2026-01-04T00:00:00.000Z".into(),
        containment: None,
        classification: None,
        history: Vec::new(),
    };
    // A first alert sized to leave the log six bytes short of a page: the next line begins in
    // a page the disk already holds and needs another.
    let page = 4096u64;
    let log = BreachLog::open(&path).unwrap();
    log.add(alert("A-1", "x".into())).unwrap();
    let one = std::fs::metadata(&path).unwrap().len();
    drop(log);
    std::fs::remove_file(&path).unwrap();
    let log = BreachLog::open(&path).unwrap();
    let pad = "x".repeat((1 + page - 6 - one) as usize);
    log.add(alert("A-1", pad)).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), page - 6);
    common::fill(&dir);
    assert!(log.add(alert("A-2", "y".repeat(200))).is_err());
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        page - 6,
        "the part written is cut off"
    );
    std::fs::remove_file(dir.join("filler")).unwrap();
    log.add(alert("A-3", "z".into())).unwrap();
    drop(log);
    let reopened = BreachLog::open(&path).unwrap();
    let mut ids: Vec<String> = reopened.alerts().0.into_iter().map(|a| a.id).collect();
    ids.sort();
    assert_eq!(ids, ["A-1", "A-3"]);
}

/// Returns once the cross-replica leader has examined every entry of `stream` (all
/// delivered to its group, and each acknowledged, which it does once it has acted on them).
fn shared_examined(redis: &common::RedisServer, stream: &str) {
    let mut conn = redis.connection();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last: redis::streams::StreamInfoStreamReply = (redis::cmd("XINFO").arg("STREAM"))
            .arg(stream)
            .query(&mut conn)
            .unwrap();
        let groups: redis::streams::StreamInfoGroupsReply = (redis::cmd("XINFO").arg("GROUPS"))
            .arg(stream)
            .query(&mut conn)
            .unwrap();
        if (groups.groups.iter()).any(|g| {
            g.name == "detect" && g.pending == 0 && g.last_delivered_id == last.last_generated_id
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the leader never examined the stream"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Whoever can write to Redis cannot feed cross-replica detection: an entry naming a
/// councillor with 100,000 records, unsigned or under another entry's signature, and
/// copies of a real entry of theirs, raise nothing (with `volume` in `contain` mode they
/// would have revoked the councillor, by a revocation the leader signs). Before, the leader
/// examined whatever the stream held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_added_to_the_shared_stream_by_another_hand_raise_nothing() {
    fn contain_low_volume(cfg: &mut Config) {
        low_volume(cfg);
        cfg.watch.rules.get_mut(&Rule::Volume).unwrap().mode = Mode::Contain;
    }
    let redis = common::RedisServer::start();
    let app = spawn_app_with(AppOptions {
        tweak: Some(contain_low_volume),
        redis: Some(redis.url()),
        ..AppOptions::default()
    })
    .await;
    ready(&app).await;
    // Under the councillor's norm of 20.
    let page = councillor_page(&app, 15).await;
    let n = page["subjects"].as_array().unwrap().len();
    assert!((1..20).contains(&n), "{page}");
    let stream = app.gw.watch.settings.shared_stream.clone();
    let mut conn = redis.connection();
    // Published a moment after the answer (a background task's queue).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (e, m) = loop {
        let newest: redis::streams::StreamRangeReply = (redis::cmd("XREVRANGE").arg(&stream))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(&mut conn)
            .unwrap();
        if let Some(real) = newest.ids.first() {
            let (e, m): (String, String) = (real.get("e").unwrap(), real.get("m").unwrap());
            assert!(e.contains("demo-councillor"), "{e}");
            break (e, m);
        }
        assert!(
            Instant::now() < deadline,
            "the page never reached the stream"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    shared_examined(&redis, &stream);
    let disclosed = format!("\"disclosed\":{n},");
    assert!(e.contains(&disclosed), "{e}");
    // Numbered after the real one, as if another replica's.
    let forged = (e.replace(&disclosed, "\"disclosed\":100000,")).replacen(
        "{\"r\":\"",
        "{\"r\":\"forged-",
        1,
    );
    assert!(forged.starts_with("{\"r\":\"forged-"), "{forged}");
    let add = |conn: &mut redis::Connection, fields: &[(&str, &str)]| {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&stream).arg("*");
        for (k, v) in fields {
            xadd.arg(*k).arg(*v);
        }
        xadd.query::<String>(conn).unwrap();
    };
    add(&mut conn, &[("e", &forged)]);
    add(&mut conn, &[("e", &forged), ("m", &m)]);
    for _ in 0..5 {
        add(&mut conn, &[("e", &e), ("m", &m)]);
    }
    shared_examined(&redis, &stream);
    assert_eq!(alerts(&app).await, Vec::<Value>::new());
    let again = councillor_page(&app, 1).await;
    assert_eq!(again["decision"], "allow", "{again}");
    app.stop().await;
}

/// A councillor's page of `n` records: its audit record (how many it disclosed is what the
/// rules count).
async fn councillor_page(app: &TestApp, n: usize) -> Value {
    let path = format!("/voter/electors?per_page={n}");
    let r = app
        .get(&path, Some(&app.token("councillor")), Some("canvassing"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    app.audit_for(&r)
}

/// A restart does not split a scrape in two: breach detection reads back the audit log's
/// newest records at start, so two pages under the councillor's norm of 20, one before the
/// restart and one after, raise the `volume` alert together, and it cites both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_split_by_a_restart_still_raises_its_alert() {
    let app = spawn_app_with(AppOptions {
        tweak: Some(low_volume),
        ..AppOptions::default()
    })
    .await;
    let before = councillor_page(&app, 15).await;
    let app = app.restart().await;
    let after = councillor_page(&app, 15).await;
    let counted = |r: &Value| r["subjects"].as_array().unwrap().len();
    assert!(counted(&before) < 20 && counted(&after) < 20);
    assert!(counted(&before) + counted(&after) >= 20);
    let (alert, _) = wait_for_alert(&app, "volume", "demo-councillor").await;
    let evidence = alert["evidence"].as_array().unwrap();
    assert!(evidence.contains(&before["seq"]), "{alert}");
    assert!(evidence.contains(&after["seq"]), "{alert}");
    app.stop().await;
}

/// The norm of 40 for councillors (`low_volume`'s twice over): a run under it raises nothing
/// where `low_volume` would.
fn norm_of_40(cfg: &mut Config) {
    low_volume(cfg);
    let volume = cfg.watch.rules.get_mut(&Rule::Volume).unwrap();
    volume.limits.insert("councillor".to_owned(), 40);
}

/// Returns once every finding made at start (read back) has been acted on: the acting task
/// takes findings in turn, and those read back first, so once a councillor's page over
/// `low_volume`'s norm (another principal's) has raised its alert, they have been.
async fn all_acted_on(app: &TestApp) {
    let mut claims = app.claims("councillor", &["E05011391"], &["canvassing"]);
    claims["sub"] = json!("barrier");
    let barrier = app.sign(&claims);
    let r = (app.get(
        "/voter/electors?per_page=25",
        Some(&barrier),
        Some("canvassing"),
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    wait_for_alert(app, "volume", "barrier").await;
}

/// A norm lowered across a restart applies to the records read back: what now reaches it is
/// raised at start, citing the records of the run before, with no request after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_norm_lowered_across_a_restart_raises_what_now_reaches_it() {
    norm_lowered_across_a_restart(None).await;
}

/// The same with Redis, where another detector has marked an alert on the principal within
/// its cooldown (another replica, say, reading its own log back after the same change of
/// rules): the finding read back is that alert's, as a live one would be, recorded as
/// `alerted_elsewhere` and not raised again, and the other's mark is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finding_read_back_that_another_detector_marked_is_not_raised_twice() {
    norm_lowered_across_a_restart(Some(common::RedisServer::start())).await;
}

async fn norm_lowered_across_a_restart(redis: Option<common::RedisServer>) {
    let mut app = spawn_app_with(AppOptions {
        tweak: Some(norm_of_40),
        redis: redis.as_ref().map(common::RedisServer::url),
        ..AppOptions::default()
    })
    .await;
    ready(&app).await;
    let before = councillor_page(&app, 30).await;
    assert!((20..40).contains(&before["subjects"].as_array().unwrap().len()));
    all_examined(&app).await;
    assert!(alerts(&app).await.is_empty());
    let stream = &app.gw.watch.settings.shared_stream;
    let mark = format!("{stream}:alerted:volume:demo-councillor");
    if let Some(redis) = &redis {
        redis::cmd("SET")
            .arg(&mark)
            .arg("another-replica")
            .arg("PX")
            .arg(3_600_000)
            .query::<()>(&mut redis.connection())
            .unwrap();
    }
    app.tweak = Some(low_volume);
    let app = app.restart().await;
    let Some(redis) = &redis else {
        let (alert, _) = wait_for_alert(&app, "volume", "demo-councillor").await;
        assert_eq!(alert["evidence"], json!([before["seq"]]), "{alert}");
        app.stop().await;
        return;
    };
    all_acted_on(&app).await;
    let own: Vec<Value> = (alerts(&app).await.into_iter())
        .filter(|a| a["rule"] == "volume" && a["key"] == "demo-councillor")
        .filter(|a| a["evidence_refs"].is_null())
        .collect();
    assert_eq!(own, Vec::<Value>::new());
    let elsewhere: Vec<Value> = (app.audit_records().into_iter())
        .filter(|r| r["route"] == "watch.alerted_elsewhere")
        .collect();
    assert_eq!(elsewhere.len(), 1, "{elsewhere:#?}");
    assert_eq!(elsewhere[0]["detail"]["evidence"], json!([before["seq"]]));
    let held: String = (redis::cmd("GET").arg(&mark))
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(held, "another-replica");
    app.stop().await;
}

/// `low_volume` with a cooldown of three seconds.
fn low_volume_quick(cfg: &mut Config) {
    low_volume(cfg);
    cfg.watch.cooldown = Duration::from_secs(3);
}

/// The same with a norm of 100: two pages of 30 raise nothing.
fn norm_of_100_quick(cfg: &mut Config) {
    low_volume_quick(cfg);
    let volume = cfg.watch.rules.get_mut(&Rule::Volume).unwrap();
    volume.limits.insert("councillor".to_owned(), 100);
}

/// Two findings on one principal read back at start, a cooldown apart, are two alerts: the
/// second meets the mark the first just took in Redis (at least `READ_BACK_MARK`, though
/// the first's cooldown is long over), which is this replica's own, and is raised all the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_findings_read_back_on_one_principal_are_two_alerts() {
    let redis = common::RedisServer::start();
    let mut app = spawn_app_with(AppOptions {
        tweak: Some(norm_of_100_quick),
        redis: Some(redis.url()),
        ..AppOptions::default()
    })
    .await;
    ready(&app).await;
    let first = councillor_page(&app, 30).await;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let second = councillor_page(&app, 30).await;
    all_examined(&app).await;
    assert!(alerts(&app).await.is_empty());
    app.tweak = Some(low_volume_quick);
    let app = app.restart().await;
    all_acted_on(&app).await;
    let mut cited: Vec<Value> = (alerts(&app).await.into_iter())
        .filter(|a| a["rule"] == "volume" && a["key"] == "demo-councillor")
        .map(|a| a["evidence"].clone())
        .collect();
    cited.sort_by_key(|e| e[0].as_u64());
    assert_eq!(cited, [json!([first["seq"]]), json!([second["seq"]])]);
    app.stop().await;
}

/// A finding another detector raised first (its mark in Redis) is written to this replica's
/// audit log (`alerted_elsewhere`), so reading the log back at a restart, the mark gone by
/// then, does not raise it again: nothing else here says it was raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finding_another_detector_raised_is_not_raised_after_a_restart() {
    let redis = common::RedisServer::start();
    let app = spawn_app_with(AppOptions {
        tweak: Some(low_volume),
        redis: Some(redis.url()),
        ..AppOptions::default()
    })
    .await;
    ready(&app).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = &app.gw.watch.settings.shared_stream;
    let mark = format!("{stream}:alerted:volume:demo-councillor");
    let mut conn = redis.connection();
    redis::cmd("SET")
        .arg(&mark)
        .arg("another-replica")
        .arg("PX")
        .arg(3_600_000)
        .query::<()>(&mut conn)
        .unwrap();
    let page = councillor_page(&app, 25).await;
    assert!(page["subjects"].as_array().unwrap().len() >= 20);
    let elsewhere = loop {
        let found =
            (app.audit_records().into_iter()).find(|r| r["route"] == "watch.alerted_elsewhere");
        if let Some(r) = found {
            break r;
        }
        assert!(Instant::now() < deadline, "no `alerted_elsewhere` record");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(elsewhere["detail"]["key"], "demo-councillor", "{elsewhere}");
    assert_eq!(elsewhere["detail"]["rule"], "volume", "{elsewhere}");
    redis::cmd("DEL").arg(&mark).query::<()>(&mut conn).unwrap();
    let app = app.restart().await;
    all_acted_on(&app).await;
    // This replica's own (the cross-replica detector's, `evidence_refs`, may take the mark
    // once it is gone, from the records it was sent before the restart).
    let volume: Vec<Value> = (alerts(&app).await.into_iter())
        .filter(|a| a["rule"] == "volume" && a["key"] == "demo-councillor")
        .filter(|a| a["evidence_refs"].is_null())
        .collect();
    assert_eq!(volume, Vec::<Value>::new());
    app.stop().await;
}

/// An alert raised before a restart keeps its rule quiet for the principal after it: the
/// same amount again within the cooldown (under the escalation's twice the norm) raises no
/// second alert, where a detector starting empty raised it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_raised_before_a_restart_is_not_raised_again_after_it() {
    let app = spawn_app_with(AppOptions {
        tweak: Some(low_volume),
        ..AppOptions::default()
    })
    .await;
    let first = councillor_page(&app, 25).await;
    assert!(first["subjects"].as_array().unwrap().len() >= 20);
    wait_for_alert(&app, "volume", "demo-councillor").await;
    let app = app.restart().await;
    let again = councillor_page(&app, 25).await;
    assert!(again["subjects"].as_array().unwrap().len() < 40);
    // Once examined, an alert on it would be on its way.
    all_examined(&app).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let volume: Vec<Value> = (alerts(&app).await.into_iter())
        .filter(|a| a["rule"] == "volume" && a["key"] == "demo-councillor")
        .collect();
    assert_eq!(volume.len(), 1, "{volume:#?}");
    app.stop().await;
}
