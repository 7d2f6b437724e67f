//! The data plane end to end over real sockets: allow, strip, withhold, deny, and every error
//! mapping, each checked against what the audit log says was disclosed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use common::{AppOptions, Resp, spawn_app, spawn_app_with};
use http::Method;
use http_body_util::Full;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const CONTACT: [&str; 5] = ["email", "mobile", "landline", "consents", "tps_checked_at"];

/// The audit record lists exactly the subjects and fields the body carries.
fn assert_audit_matches_body(record: &Value, body: &Value) {
    let records: Vec<&Value> = match body.get("records") {
        Some(Value::Array(rs)) => rs.iter().collect(),
        _ => vec![&body["record"]],
    };
    let ids: Vec<String> = records
        .iter()
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect();
    let logged: Vec<String> = serde_json::from_value(record["subjects"].clone()).unwrap();
    assert_eq!(logged, ids, "audit subjects differ from the body");
    let fields: BTreeSet<String> = records
        .iter()
        .flat_map(|r| r.as_object().unwrap().keys().cloned())
        .collect();
    let logged: BTreeSet<String> = serde_json::from_value(record["fields"].clone()).unwrap();
    assert_eq!(logged, fields, "audit fields differ from the body");
}

/// An elector in the demo canvasser's polling district with no marker or flag: one they may
/// read and write to.
fn canvassable(truth: &[Value]) -> &Value {
    truth
        .iter()
        .find(|r| {
            r["polling_district"] == "CGW1" && r["markers"] == json!([]) && r["flags"] == json!([])
        })
        .unwrap()
}

/// Every record straight from the datastore, bypassing the gateway (the test's ground truth).
async fn upstream_all(addr: SocketAddr) -> Vec<Value> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut out = Vec::new();
    for page in 1.. {
        let uri = format!("http://{addr}/electors?per_page=1000&page={page}");
        let resp = client.get(uri.parse().unwrap()).await.unwrap();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        out.extend(v["records"].as_array().unwrap().iter().cloned());
        if v["next_page"].is_null() {
            break;
        }
    }
    out
}

async fn all_pages(app: &common::TestApp, token: &str, purpose: &str, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for page in 1.. {
        let resp = app
            .get(
                &format!("/voter/electors?per_page=1000&page={page}{query}"),
                Some(token),
                Some(purpose),
            )
            .await;
        assert_eq!(resp.status, 200, "{:?}", resp.body);
        let v = resp.json();
        assert_audit_matches_body(&app.audit_for(&resp), &v);
        out.extend(v["records"].as_array().unwrap().iter().cloned());
        if v["next_page"].is_null() {
            break;
        }
    }
    out
}

#[tokio::test]
async fn a_canvasser_sees_their_districts_without_contact_details() {
    let app = spawn_app().await;
    let token = app.token("canvasser");
    let got = all_pages(&app, &token, "canvassing", "").await;
    assert!(!got.is_empty());
    for r in &got {
        let pd = r["polling_district"].as_str().unwrap();
        assert!(pd == "CGW1" || pd == "CGW2", "out of scope: {r}");
        for f in CONTACT {
            assert!(r.get(f).is_none(), "canvasser received `{f}`: {r}");
        }
        assert!(r.get("support_score").is_none() && r.get("flags").is_none());
    }
    app.stop().await;
}

#[tokio::test]
async fn a_councillor_gets_nothing_from_another_ward() {
    let app = spawn_app().await;
    let token = app.token("councillor");
    let resp = app
        .get(
            "/voter/electors?ward=E05013911",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["records"], json!([]));
    assert_audit_matches_body(&app.audit_for(&resp), &resp.json());

    // And fetching an out-of-ward elector by id discloses nothing either.
    let all = upstream_all(app.upstream).await;
    let stranger = all
        .iter()
        .find(|r| r["ward"] == "E05013911" && r["markers"] == json!([]))
        .unwrap();
    let path = format!(
        "/voter/electors/{}",
        stranger["elector_id"].as_str().unwrap()
    );
    let resp = app.get(&path, Some(&token), Some("canvassing")).await;
    assert_eq!(resp.status, 404);
    assert!(!String::from_utf8_lossy(&resp.body).contains(stranger["surname"].as_str().unwrap()));
    let record = app.audit_for(&resp);
    assert_eq!(record["subjects"], json!([]));
    assert_eq!(record["rows_withheld"], 1);
    app.stop().await;
}

#[tokio::test]
async fn anonymous_electors_and_under_16s_never_appear_for_anyone() {
    let app = spawn_app().await;
    let truth = upstream_all(app.upstream).await;
    // By the rules worked out in the test (markers, flags and attainer dates), not the
    // gateway's code.
    let hidden: BTreeSet<String> = truth
        .iter()
        .filter(|r| common::never_disclosed(r))
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !hidden.is_empty(),
        "the synthetic data should contain anonymous electors and under-16s"
    );
    for (persona, purpose) in [
        ("dpo", "sar_fulfilment"),
        ("analyst", "profiling"),
        ("councillor", "canvassing"),
        ("candidate", "gotv"),
    ] {
        let got = all_pages(&app, &app.token(persona), purpose, "").await;
        for r in &got {
            assert!(
                !hidden.contains(r["elector_id"].as_str().unwrap()),
                "{persona}/{purpose} received {r}"
            );
        }
        for id in &hidden {
            let resp = app
                .get(
                    &format!("/voter/electors/{id}"),
                    Some(&app.token(persona)),
                    Some(purpose),
                )
                .await;
            assert_eq!(resp.status, 404, "{persona} fetched hidden {id}");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn email_sms_returns_an_email_only_with_live_consent() {
    let app = spawn_app().await;
    let truth: std::collections::HashMap<String, Value> = upstream_all(app.upstream)
        .await
        .into_iter()
        .map(|r| (r["elector_id"].as_str().unwrap().to_owned(), r))
        .collect();
    let got = all_pages(&app, &app.token("councillor"), "email_sms", "").await;
    let mut emails = 0;
    for r in &got {
        let src = &truth[r["elector_id"].as_str().unwrap()];
        let live = |channel: &str| {
            let c = &src["consents"][channel];
            c.is_object() && !c["given_at"].is_null() && c["withdrawn_at"].is_null()
        };
        assert!(
            live("email") || live("sms"),
            "a campaign resting on consent named someone who gave none: {src}"
        );
        if r.get("email").is_some() {
            emails += 1;
            let c = &src["consents"]["email"];
            assert!(
                c.is_object() && !c["given_at"].is_null() && c["withdrawn_at"].is_null(),
                "email without live consent: {src}"
            );
        }
        assert!(r.get("address_line1").is_none() && r.get("voting_intention").is_none());
    }
    assert!(emails > 0, "some consented emails should come back");
    app.stop().await;
}

#[tokio::test]
async fn a_restricted_subject_appears_only_for_rights_handling() {
    let app = spawn_app().await;
    let truth = upstream_all(app.upstream).await;
    let restricted: Vec<String> = truth
        .iter()
        .filter(|r| {
            r["flags"]
                .as_array()
                .unwrap()
                .contains(&json!("restricted"))
        })
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!restricted.is_empty());
    for (persona, purpose) in [
        ("analyst", "profiling"),
        ("candidate", "canvassing"),
        ("candidate", "addressed_mail"),
        ("dpo", "breach_investigation"),
    ] {
        let got: BTreeSet<String> = all_pages(&app, &app.token(persona), purpose, "")
            .await
            .iter()
            .map(|r| r["elector_id"].as_str().unwrap().to_owned())
            .collect();
        for id in &restricted {
            assert!(!got.contains(id), "{persona}/{purpose} saw restricted {id}");
        }
    }
    let dpo: BTreeSet<String> = all_pages(&app, &app.token("dpo"), "sar_fulfilment", "")
        .await
        .iter()
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        restricted.iter().any(|id| dpo.contains(id)),
        "the DPO answering a SAR sees restricted records"
    );
    app.stop().await;
}

#[tokio::test]
async fn purpose_errors_are_400_and_403() {
    let app = spawn_app().await;
    let t = app.token("canvasser");
    let r = app.get("/voter/electors", Some(&t), None).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["type"].as_str().unwrap()),
        (400, "urn:wardgate:problem:purpose-missing")
    );
    let r = app
        .get("/voter/electors", Some(&t), Some("party_discipline"))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["type"].as_str().unwrap()),
        (400, "urn:wardgate:problem:purpose-unknown")
    );
    let r = app
        .get("/voter/electors", Some(&t), Some("profiling"))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["type"].as_str().unwrap()),
        (403, "urn:wardgate:problem:purpose-not-granted")
    );
    assert_eq!(app.audit_for(&r)["decision"], "deny");

    // A token that lists a rights-handling purpose for a canvasser is still refused, by policy.
    let forged_scope = app.sign(&app.claims("canvasser", &["E05011391"], &["sar_fulfilment"]));
    let r = app
        .get(
            "/voter/electors",
            Some(&forged_scope),
            Some("sar_fulfilment"),
        )
        .await;
    assert_eq!(r.status, 403);
    let body = r.json();
    assert!(
        body["policy_ids"]
            .as_array()
            .unwrap()
            .contains(&json!("purpose.rights-handling-dpo-only")),
        "{body}"
    );
    assert!(
        app.audit_for(&r)["policy_ids"]
            .as_array()
            .unwrap()
            .contains(&json!("purpose.rights-handling-dpo-only"))
    );
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_methods_and_query_tricks_are_refused() {
    let app = spawn_app().await;
    let t = app.token("councillor");
    let cases: &[(&str, u16)] = &[
        ("/voter/secret", 404),
        ("/voter/electors/VF-0000001/../../members", 404),
        ("/voter/electors/VF%2F..%2Fx", 404),
        ("/admin", 404),
        ("/voter/electors?areas=E92000001", 400),
        ("/voter/electors?fields=email", 400),
        ("/voter/electors?ward=E05011391&ward=E05013911", 400),
        ("/voter/electors?ward=E05011391%2CE05013911", 400),
        ("/voter/electors?ward=E05011391%26areas%3DE92000001", 400),
        ("/voter/electors?per_page=100000", 400),
        ("/voter/electors?page=0", 400),
        ("/voter/electors/VF-0000001?areas=x", 400),
    ];
    for (path, status) in cases {
        let r = app.get(path, Some(&t), Some("canvassing")).await;
        assert_eq!(r.status.as_u16(), *status, "{path}: {:?}", r.body);
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{path}"
        );
        assert!(app.audit_for(&r)["status"] == *status);
    }
    // RFC 9110 §15.5.6: a 405 says what the route accepts.
    for (method, path, allow) in [
        (Method::DELETE, "/voter/electors", "GET"),
        (Method::GET, "/voter/electors/VF-0000001/canvass", "POST"),
    ] {
        let headers = [
            ("authorization", format!("Bearer {t}")),
            ("x-purpose", "canvassing".to_owned()),
        ];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = app.request(method, path, &headers, None).await;
        assert_eq!(r.status, 405, "{path}");
        assert_eq!(r.headers["allow"], allow, "{path}");
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
    // A write's body is JSON, and says so, as sent (no content coding but `identity`):
    // anything else is refused before it is read.
    for (content_type, coding) in [
        (None, None),
        (Some("text/plain"), None),
        (Some("application/x-www-form-urlencoded"), None),
        (Some("application/json"), Some("gzip")),
        (Some("application/json"), Some("identity, br")),
    ] {
        let mut headers = vec![
            ("authorization", format!("Bearer {t}")),
            ("x-purpose", "canvassing".to_owned()),
        ];
        headers.extend(content_type.map(|c| ("content-type", c.to_owned())));
        headers.extend(coding.map(|c| ("content-encoding", c.to_owned())));
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = app
            .request(
                Method::POST,
                "/voter/electors/VF-0000001/canvass",
                &headers,
                Some(r#"{"voting_intention":"LAB"}"#),
            )
            .await;
        assert_eq!(r.status, 415, "{content_type:?} {coding:?}: {:?}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(app.audit_for(&r)["reason"], "unsupported_media_type");
    }
    app.stop().await;
}

/// A caller with no token cannot make its refusals' records large and fill the log's disk: a
/// long path is kept cut to 512 bytes and marked with its length, a long extension method is
/// kept as `OTHER`, and a request head past the gateway's bounds is refused with a problem
/// document (past twice them, by the HTTP layer, with nothing recorded).
#[tokio::test]
async fn a_refused_callers_long_path_and_method_make_no_long_record() {
    let app = spawn_app().await;
    let long = format!("/voter/{}", "a".repeat(8_000));
    let r = app.get(&long, None, None).await;
    assert_eq!(r.status, 401);
    let recorded = app.audit_for(&r);
    let path = recorded["path"].as_str().unwrap();
    let (kept, mark) = path.split_once('…').unwrap();
    assert_eq!(kept.len(), 512);
    assert!(long.starts_with(kept));
    assert_eq!(mark, format!("[{} bytes]", long.len()));

    let method = Method::from_bytes("A".repeat(300).as_bytes()).unwrap();
    let r = app.request(method, "/voter/electors", &[], None).await;
    assert_eq!(app.audit_for(&r)["method"], "OTHER");
    let r = app
        .request(
            Method::from_bytes(b"PROPFIND").unwrap(),
            "/voter/electors",
            &[],
            None,
        )
        .await;
    assert_eq!(app.audit_for(&r)["method"], "PROPFIND");

    // A target past 8 KiB, a head past 64 KiB, more than 100 headers: each refused with a
    // problem document that says which bound, on either plane, and recorded (the path cut).
    let longer = format!("/voter/{}", "a".repeat(8_200));
    let r = app.get(&longer, None, None).await;
    assert_eq!(r.status, 414);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.json()["type"], "urn:wardgate:problem:uri-too-long");
    let recorded = app.audit_for(&r);
    assert_eq!(recorded["reason"], "uri_too_long");
    assert!(recorded["path"].as_str().unwrap().len() < 600);
    let padding = "p".repeat(70_000);
    let r = app
        .request(
            Method::GET,
            "/voter/electors",
            &[("x-padding", &padding)],
            None,
        )
        .await;
    assert_eq!(r.status, 431);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let problem = r.json();
    assert_eq!(
        problem["type"],
        "urn:wardgate:problem:request-head-too-large"
    );
    assert!(problem["detail"].as_str().unwrap().contains("65536"));
    assert_eq!(app.audit_for(&r)["reason"], "request_head_too_large");
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = app
        .request(Method::GET, "/voter/electors", &many, None)
        .await;
    assert_eq!(r.status, 431);
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("151 header fields; at most 100") // and `host`
    );
    let r = app.admin_get_with("/healthz", &padding).await;
    assert_eq!(r.status, 431);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    // Never sniffed as anything else by a browser, here or on the admin plane's answers.
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    let healthz = app.admin_get("/healthz").await;
    assert_eq!(healthz.headers["x-content-type-options"], "nosniff");

    // Heads hyper cannot read: past twice that (a 140 KB header), a target over 64 KiB, a
    // malformed request line or header field. Refused before any handler, so never
    // recorded, but each told as a problem document.
    let before = app.audit_records().len();
    let addr = app.addr;
    let raw = |head: String| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Read while writing: the gateway may answer and close before it has read it all,
        // and an answer not yet read when the reset of that close comes is lost.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut rx, mut tx) = tcp.into_split();
        let mut answer = Vec::new();
        let _ = tokio::join!(tx.write_all(head.as_bytes()), rx.read_to_end(&mut answer));
        String::from_utf8_lossy(&answer).to_string()
    };
    for (head, status, kind) in [
        (
            format!(
                "GET /voter/electors HTTP/1.1\r\nhost: x\r\nx-padding: {}\r\n\r\n",
                "p".repeat(140_000)
            ),
            431,
            "request-head-too-large",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)),
            414,
            "uri-too-long",
        ),
        (
            "GET /voter/electors HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n".to_owned(),
            400,
            "bad-request",
        ),
        (
            "G@T / HTTP/1.1\r\nhost: x\r\n\r\n".to_owned(),
            400,
            "bad-request",
        ),
        (
            "GET / HTTP/9.9\r\nhost: x\r\n\r\n".to_owned(),
            400,
            "bad-request",
        ),
        // After a whole request answered on the same connection (it has no token: refused,
        // and recorded).
        (
            "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /x HTTP/1.1\r\nbad header\r\n\r\n"
                .to_owned(),
            400,
            "bad-request",
        ),
    ] {
        // A large head's answer may still be lost to the reset (sent before it is read):
        // asked again, a few times, but it must come.
        let mut answer = raw(head.clone()).await;
        for _ in 0..4 {
            if !answer.is_empty() || head.len() < 60_000 {
                break;
            }
            answer = raw(head.clone()).await;
        }
        let last = answer
            .rfind(&format!("HTTP/1.1 {status} "))
            .unwrap_or_else(|| panic!("{answer}"));
        let (last_head, body) = answer[last..].split_once("\r\n\r\n").unwrap();
        assert!(
            last_head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
        assert!(
            last_head.contains("content-type: application/problem+json"),
            "{answer}"
        );
        assert!(last_head.contains("connection: close"), "{answer}");
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            problem["type"],
            format!("urn:wardgate:problem:{kind}"),
            "{answer}"
        );
        assert_eq!(problem["status"], status);
        assert_eq!(problem["request_id"].as_str().unwrap().len(), 32);
        assert!(last_head.contains(problem["request_id"].as_str().unwrap()));
    }
    // A request after them is recorded, and is the only record since but the one answered
    // before a malformed head.
    let r = app.get("/voter/electors", None, None).await;
    assert_eq!(r.status, 401);
    let records = app.audit_records();
    assert_eq!(records.len(), before + 2);
    assert_eq!(records[before]["reason"], "token_missing");
    assert_eq!(
        records[before + 1]["request_id"],
        app.audit_for(&r)["request_id"]
    );
    app.stop().await;
}

#[tokio::test]
async fn writes_are_scoped_and_field_checked() {
    let app = spawn_app().await;
    let t = app.token("canvasser");
    let truth = upstream_all(app.upstream).await;
    let mine = canvassable(&truth);
    let id = mine["elector_id"].as_str().unwrap();
    let r = app
        .canvass(
            id,
            &t,
            "canvassing",
            r#"{"voting_intention":"LAB","canvass_issues":["housing"]}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["record"]["voting_intention"], "LAB");
    assert!(r.json()["record"].get("email").is_none());
    let audit = app.audit_for(&r);
    assert_eq!(
        audit["detail"]["written"],
        json!(["canvass_issues", "voting_intention"])
    );
    assert_eq!(audit["subjects"], json!([id]));
    // Both of its records (the intent, synced before the write is sent, and the answer's)
    // name what let it through: the target's area and the written category's permit.
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let records: Vec<Value> = (app.audit_records().into_iter())
        .filter(|a| a["request_id"] == rid.as_str())
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    for record in &records {
        let ids = record["policy_ids"].as_array().unwrap();
        for wanted in ["geo.within-grants", "writes.canvass-returns"] {
            assert!(ids.iter().any(|p| p == wanted), "{wanted}: {record}");
        }
    }

    // What the datastore holds of the target after that write: none of the refused writes
    // below may change it.
    let held = common::datastore_body(app.upstream, &format!("/electors/{id}")).await;
    // Mass assignment: a field the write does not declare is refused by name.
    let r = app
        .canvass(
            id,
            &t,
            "canvassing",
            r#"{"voting_intention":"LAB","email":"x@y.z"}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["detail"].as_str().unwrap().contains("`email`"));
    // A declared field the purpose may not write is refused by name too.
    let r = app
        .canvass(id, &t, "gotv", r#"{"flags_add":["do_not_contact"]}"#)
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.json()["type"], "urn:wardgate:problem:write-forbidden");
    assert!(r.json()["detail"].as_str().unwrap().contains("`flags_add`"));
    // Logged as a refusal by policy, naming what was refused and what refused it (no policy
    // permits it: not the policies that let the request in). The answer names no policy: a
    // write's may be a forbid on the target's own flags.
    let audit = app.audit_for(&r);
    assert_eq!(audit["decision"], "deny", "{audit}");
    assert_eq!(audit["detail"]["refused"], json!(["flags_add"]), "{audit}");
    assert_eq!(audit["policy_ids"], json!(["default-deny"]), "{audit}");
    assert!(r.json().get("policy_ids").is_none(), "{:?}", r.body);
    // A declared field carries only the values the register allows it: a canvasser may add
    // "do not knock", never a restriction, an objection or an erasure flag, which are the
    // DPO's to place. Refused by the gateway, whatever the datastore would have done.
    for body in [
        r#"{"flags_add":["restricted"]}"#,
        r#"{"flags_add":["do_not_contact","erasure_requested"]}"#,
        r#"{"flags_add":"objects_profiling"}"#,
        r#"{"flags_add":[{"kind":"restricted"}]}"#,
        r#"{"flags_add":[null]}"#,
    ] {
        let r = app.canvass(id, &t, "canvassing", body).await;
        assert_eq!(r.status, 403, "{body}: {:?}", r.body);
        assert_eq!(r.json()["type"], "urn:wardgate:problem:write-forbidden");
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(
            detail.contains("`flags_add` may carry only `do_not_contact`"),
            "{body}: {detail}"
        );
        let audit = app.audit_for(&r);
        assert_eq!(audit["decision"], "deny", "{audit}");
        assert_eq!(audit["detail"]["refused"], json!(["flags_add"]), "{audit}");
        // The asset register refused it, not a policy.
        assert_eq!(audit["policy_ids"], json!([]), "{audit}");
        // Field names only: what the caller tried to write stays out of the log.
        let logged = audit.to_string();
        assert!(
            !logged.contains("restricted") && !logged.contains("objects_profiling"),
            "{logged}"
        );
    }
    // A name written twice could have the datastore write what was never checked (its
    // parser may keep the first, serde_json keeps the last): refused, escapes decoded.
    for body in [
        r#"{"flags_add":["restricted"],"flags_add":["do_not_contact"]}"#,
        r#"{"flags_add":["do_not_contact"],"flags\u005fadd":["restricted"]}"#,
    ] {
        let r = app.canvass(id, &t, "canvassing", body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains("`flags_add` is named twice"), "{detail}");
    }
    // A value nested so deep that the record, echoed back in a page, would be deeper than any
    // page the filter reads (every caller's page holding it would fail): refused at the write.
    let deep = format!(
        r#"{{"canvass_issues":{}"x"{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let r = app.canvass(id, &t, "canvassing", &deep).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("`canvass_issues` is nested more than"),
        "{detail}"
    );
    // Nor any object, or list of lists or objects, where the asset register expects a value
    // or a list of values: once written, the filter would withhold the record from everyone.
    for body in [
        r#"{"voting_intention":{"a":1}}"#,
        r#"{"canvass_issues":[{"x":1}]}"#,
        r#"{"canvass_issues":[["x"]]}"#,
    ] {
        let r = app.canvass(id, &t, "canvassing", body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains("holds an object or a list"), "{detail}");
    }
    assert_eq!(
        common::datastore_body(app.upstream, &format!("/electors/{id}")).await,
        held,
        "a refused write reached the datastore"
    );
    // Out of scope: looks like a missing record.
    let other = truth
        .iter()
        .find(|r| r["ward"] == "E05013911" && r["markers"] == json!([]))
        .unwrap();
    let other_path = format!("/electors/{}", other["elector_id"].as_str().unwrap());
    let other_held = common::datastore_body(app.upstream, &other_path).await;
    let r = app
        .post(
            &format!(
                "/voter/electors/{}/canvass",
                other["elector_id"].as_str().unwrap()
            ),
            &t,
            "canvassing",
            r#"{"voting_intention":"LAB"}"#,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        common::datastore_body(app.upstream, &other_path).await,
        other_held,
        "a write out of scope reached the datastore"
    );
    // Logged as a refused read of it would be: why, and the policy that decided.
    let audit = app.audit_for(&r);
    assert_eq!(audit["withheld_target"], "out_of_area", "{audit}");
    assert!(
        audit["policy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p != "purpose.granted"),
        "{audit}"
    );
    // Not JSON, and too large.
    let r = app.canvass(id, &t, "canvassing", "not json").await;
    assert_eq!(r.status, 400);
    let big = format!(r#"{{"canvass_issues":["{}"]}}"#, "x".repeat(100_000));
    let r = app.canvass(id, &t, "canvassing", &big).await;
    assert_eq!(r.status, 413);
    // "Do not knock" itself goes through, and is written.
    let r = app
        .canvass(id, &t, "canvassing", r#"{"flags_add":["do_not_contact"]}"#)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(app.audit_for(&r)["detail"]["written"], json!(["flags_add"]));
    app.stop().await;
}

/// A write done counts against the caller's quota whatever its answer shows: adding
/// `do_not_contact`, which canvassing then hides (its answer is `{"record":null}`, nothing
/// disclosed), used to count nothing, so a canvasser could suppress a whole ward uncounted.
#[tokio::test]
async fn a_write_counts_against_the_quota_even_when_it_shows_nothing() {
    fn small_quota(cfg: &mut wardgate::config::Config) {
        cfg.quotas.insert(
            "canvasser".into(),
            wardgate::controls::Limits {
                per_hour: 8,
                per_day: 100,
            },
        );
    }
    let app = spawn_app_with(AppOptions {
        tweak: Some(small_quota),
        ..Default::default()
    })
    .await;
    let t = app.token("canvasser");
    let r = app
        .get("/voter/electors?per_page=6", Some(&t), Some("canvassing"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ids: Vec<String> = r.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 6);
    let mut statuses = Vec::new();
    for id in &ids {
        let r = app
            .canvass(id, &t, "canvassing", r#"{"flags_add":["do_not_contact"]}"#)
            .await;
        if r.status == 200 {
            assert_eq!(r.json(), json!({ "record": null }), "hidden once written");
        }
        statuses.push(r.status.as_u16());
    }
    // Six listed, then two writes make eight: the rest are refused.
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429], "{statuses:?}");
    app.stop().await;
}

/// With `audit.durability = "page-cache"` a write's intent is still synced to disk before the
/// write is sent: the datastore keeps the write through a power cut of the gateway's host, and
/// the record of who wrote it and why must not be lost while the write is not.
#[tokio::test]
async fn a_write_intent_is_synced_before_it_is_sent_whatever_the_durability() {
    fn page_cache(cfg: &mut wardgate::config::Config) {
        cfg.audit.durability = wardgate::audit::Durability::PageCache;
    }
    let mine = open_elector().await;
    let id = mine["elector_id"].as_str().unwrap().to_owned();
    let target = Bytes::from(format!(
        r#"{{"record":{}}}"#,
        serde_json::to_string(&mine).unwrap()
    ));
    // A datastore that says when the write arrives and never answers it: what is synced by
    // then was synced before the write was sent (page-cache durability syncs nothing else).
    let (upstream, mut posted) = upstream_answering_writes(target, None).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        tweak: Some(page_cache),
        ..Default::default()
    })
    .await;
    let t = app.token("canvasser");
    let synced_before = app.gw.audit.synced_through();
    let at_the_datastore = tokio::select! {
        r = app.canvass(&id, &t, "canvassing", r#"{"voting_intention":"LAB"}"#) => {
            panic!("answered without the datastore's answer: {:?}", r.body)
        }
        _ = posted.recv() => app.gw.audit.synced_through(),
    };
    let intent = (app.audit_records().into_iter())
        .find(|x| x["detail"]["write"] == "intended")
        .expect("the intent is written");
    let seq = intent["seq"].as_u64().unwrap();
    assert!(synced_before < seq, "{synced_before} {seq}");
    assert!(
        at_the_datastore >= seq,
        "{at_the_datastore} < {seq}: {intent}"
    );
    app.stop().await;
}

/// A write whose caller hangs up once it has been sent to the datastore still counts against
/// the caller's quota: the datastore finishes it whoever waits for the answer. Before, the
/// handler dropped with the connection counted nothing, so a canvasser hanging up after each
/// write could write to a whole ward and never reach the quota.
#[tokio::test]
async fn a_write_whose_caller_hangs_up_still_counts_against_the_quota() {
    use tokio::io::AsyncWriteExt;
    let mine = open_elector().await;
    let id = mine["elector_id"].as_str().unwrap().to_owned();
    let target = Bytes::from(format!(
        r#"{{"record":{}}}"#,
        serde_json::to_string(&mine).unwrap()
    ));
    let (upstream, mut posted) = upstream_answering_writes(target, None).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        tweak: Some(two_records_an_hour),
        ..Default::default()
    })
    .await;
    let t = app.token("canvasser");
    let body = r#"{"voting_intention":"LAB"}"#;
    for i in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let request = format!(
            "POST /voter/electors/{id}/canvass HTTP/1.1\r\nhost: wardgate\r\n\
             authorization: Bearer {t}\r\nx-purpose: canvassing\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\
             x-request-id: hung-up-write-{i}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // The write is at the datastore: the caller goes.
        posted.recv().await.unwrap();
        drop(stream);
    }
    // Each handler has gone (its record says so) before the quota is asked.
    for i in 0..2 {
        let rid = format!("hung-up-write-{i}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(app.audit_records().iter())
            .any(|r| r["client_request_id"] == rid.as_str() && r["reason"] == "client_closed")
        {
            assert!(std::time::Instant::now() < deadline, "no record of `{rid}`");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // Two writes made the two an hour: the next record is refused.
    let r = app
        .get(
            &format!("/voter/electors/{id}"),
            Some(&t),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    app.stop().await;
}

/// A write the datastore answers with an error counts against the caller's quota as one it
/// takes: a 5xx or a timeout may have been done, and a refusal's 502 (where a target that
/// may not be written answers 404) tells the caller what a read by id would. Before, only a
/// write answered 2xx, or whose caller hung up, counted: a canvasser could write past the
/// quota behind a failing datastore, or sweep a ward's ids with writes it refuses, uncounted.
#[tokio::test]
async fn a_write_answered_with_an_error_counts_against_the_quota() {
    fn two_records_and_a_short_wait(cfg: &mut wardgate::config::Config) {
        two_records_an_hour(cfg);
        for upstream in cfg.datasets.values_mut() {
            upstream.response_timeout = std::time::Duration::from_secs(1);
        }
    }
    type Tweak = fn(&mut wardgate::config::Config);
    let mine = open_elector().await;
    let id = mine["elector_id"].as_str().unwrap().to_owned();
    let target = Bytes::from(format!(
        r#"{{"record":{}}}"#,
        serde_json::to_string(&mine).unwrap()
    ));
    let cases: [(Option<u16>, Tweak, u16); 3] = [
        (Some(500), two_records_an_hour, 502),
        (Some(422), two_records_an_hour, 502),
        (None, two_records_and_a_short_wait, 504),
    ];
    for (answer, tweak, status) in cases {
        let (upstream, _posted) = upstream_answering_writes(target.clone(), answer).await;
        let app = spawn_app_with(AppOptions {
            upstream: Some(upstream),
            tweak: Some(tweak),
            ..Default::default()
        })
        .await;
        let t = app.token("canvasser");
        for _ in 0..2 {
            let r = (app.canvass(&id, &t, "canvassing", r#"{"voting_intention":"LAB"}"#)).await;
            assert_eq!(r.status, status, "{answer:?}: {:?}", r.body);
        }
        // Two writes made the two an hour: the next record is refused.
        let read = format!("/voter/electors/{id}");
        let r = app.get(&read, Some(&t), Some("canvassing")).await;
        assert_eq!(r.status, 429, "{answer:?}: {:?}", r.body);
        app.stop().await;
    }
}

/// A canvasser's quota of two records an hour.
fn two_records_an_hour(cfg: &mut wardgate::config::Config) {
    cfg.quotas.insert(
        "canvasser".into(),
        wardgate::controls::Limits {
            per_hour: 2,
            per_day: 100,
        },
    );
}

/// A datastore that answers every read with `target`, and a write with `answer` (a status
/// and a problem body), or never when it is `None`: each write it receives is said on the
/// channel.
async fn upstream_answering_writes(
    target: Bytes,
    answer: Option<u16>,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (target, tx) = (target.clone(), tx.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let (target, tx) = (target.clone(), tx.clone());
                    async move {
                        let mut resp = http::Response::new(Full::new(target));
                        if req.method() == http::Method::POST {
                            let _ = tx.send(());
                            let Some(status) = answer else {
                                return std::future::pending().await;
                            };
                            *resp.body_mut() = Full::new(Bytes::from_static(b"{\"error\":1}"));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        }
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// A one-trick upstream: answers every request with `status`, `content_type` and `body`, or
/// never answers at all when `hang` is set.
async fn fake_upstream(
    status: u16,
    content_type: &'static str,
    body: &'static str,
    hang: bool,
) -> SocketAddr {
    fake_upstream_posting(status, content_type, body, body, hang).await
}

/// `fake_upstream`, answering a POST with `posted` instead.
async fn fake_upstream_posting(
    status: u16,
    content_type: &'static str,
    body: &'static str,
    posted: &'static str,
    hang: bool,
) -> SocketAddr {
    fake_upstream_answering_writes(
        status,
        content_type,
        body,
        (status, content_type, posted),
        hang,
    )
    .await
}

/// As `fake_upstream_posting`, with a write's answer of its own: `post` is its status, type
/// and body.
async fn fake_upstream_answering_writes(
    status: u16,
    content_type: &'static str,
    body: &'static str,
    post: (u16, &'static str, &'static str),
    hang: bool,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| async move {
                    if hang {
                        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                    }
                    let (status, content_type, body) = if req.method() == http::Method::POST {
                        post
                    } else {
                        (status, content_type, body)
                    };
                    let mut resp =
                        http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    resp.headers_mut()
                        .insert("content-type", http::HeaderValue::from_static(content_type));
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A write the datastore took, but whose answer cannot be read, is answered as done with
/// nothing of the record shown: an error would have the caller send the write again. Its
/// record says what was written and why nothing was shown.
#[tokio::test]
async fn a_write_done_whose_answer_cannot_be_read_shows_nothing_and_is_no_error() {
    let mine = open_elector().await;
    let id = mine["elector_id"].as_str().unwrap().to_owned();
    let target: &'static str = Box::leak(
        format!(r#"{{"record":{}}}"#, serde_json::to_string(&mine).unwrap()).into_boxed_str(),
    );
    let upstream = fake_upstream_posting(
        200,
        "application/json",
        target,
        r#"{"record":{"elector_id":"#,
        false,
    )
    .await;
    let (app, r) = canvass_through(upstream, &id).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json(), json!({ "record": null }));
    let audit = app.audit_for(&r);
    assert_eq!(
        audit["detail"]["because"], "upstream_response_malformed",
        "{audit}"
    );
    assert_eq!(
        audit["detail"]["written"],
        json!(["voting_intention"]),
        "{audit}"
    );
    assert_eq!(audit["subjects"], json!([]), "{audit}");
    app.stop().await;
}

/// Any 2xx from the datastore means the write was taken: `201 Created` with the record shows
/// it back filtered; `204 No Content`, a 200 that is not JSON, or one with no body shows
/// nothing, as done. Only a refusal (4xx, 5xx) is an error the caller may retry.
#[tokio::test]
async fn any_success_from_the_datastore_is_a_write_done() {
    let mine = open_elector().await;
    let id = mine["elector_id"].as_str().unwrap().to_owned();
    let target: &'static str = Box::leak(
        format!(r#"{{"record":{}}}"#, serde_json::to_string(&mine).unwrap()).into_boxed_str(),
    );
    for (post, shown) in [
        ((201, "application/json", target), None),
        (
            (204, "application/json", ""),
            Some("upstream_answer_holds_no_record"),
        ),
        (
            (200, "text/plain", "ok"),
            Some("upstream_answer_holds_no_record"),
        ),
        (
            (202, "application/json", ""),
            Some("upstream_answer_holds_no_record"),
        ),
    ] {
        let upstream =
            fake_upstream_answering_writes(200, "application/json", target, post, false).await;
        let (app, r) = canvass_through(upstream, &id).await;
        assert_eq!(r.status, 200, "{post:?}: {:?}", r.body);
        let audit = app.audit_for(&r);
        match shown {
            None => {
                assert_eq!(r.json()["record"]["elector_id"], id.as_str(), "{post:?}");
                assert!(r.json()["record"].get("email").is_none(), "{post:?}");
            }
            Some(why) => {
                assert_eq!(r.json(), json!({ "record": null }), "{post:?}");
                assert_eq!(audit["detail"]["because"], why, "{post:?}: {audit}");
            }
        }
        app.stop().await;
    }
    // A refusal is not a write done.
    let upstream = fake_upstream_answering_writes(
        200,
        "application/json",
        target,
        (409, "application/problem+json", "{}"),
        false,
    )
    .await;
    let (app, r) = canvass_through(upstream, &id).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    app.stop().await;
}

/// An ordinary elector of CGW1 (the canvasser's district: a write target), as the synthetic
/// datastore holds it: no markers, no flags.
async fn open_elector() -> Value {
    let real = spawn_app().await;
    let truth = upstream_all(real.upstream).await;
    let mine = canvassable(&truth).clone();
    real.stop().await;
    mine
}

/// A write's target is read as a read of it would be: a datastore record that names
/// `markers` twice (anonymous first, then not) is one the filter withholds, so no write may
/// reach it (a reader keeping the first value would see canvass returns on an anonymous
/// elector). It answers as a missing record.
#[tokio::test]
async fn a_write_target_naming_a_field_twice_is_not_found() {
    let mine = open_elector().await;
    let id = mine["elector_id"].as_str().unwrap().to_owned();
    let text = serde_json::to_string(&mine).unwrap();
    let twice = text.replacen(r#""markers":[]"#, r#""markers":["N"],"markers":[]"#, 1);
    assert_ne!(twice, text);
    let (upstream, posts) =
        common::counting_upstream(Bytes::from(format!(r#"{{"record":{twice}}}"#))).await;
    let (app, r) = canvass_through(upstream, &id).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(
        posts.load(Ordering::SeqCst),
        0,
        "the write reached the datastore"
    );
    // Logged as a read of it would be (the datastore's fault, for whoever reads the log),
    // not as a record missing.
    let record = app.audit_for(&r);
    assert_eq!(record["withheld_target"], "malformed", "{record}");
    app.stop().await;
    // The same record named once is a target like any other.
    let (upstream, posts) =
        common::counting_upstream(Bytes::from(format!(r#"{{"record":{text}}}"#))).await;
    let (app, r) = canvass_through(upstream, &id).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(posts.load(Ordering::SeqCst), 1);
    app.stop().await;
}

/// An app in front of a datastore that answers every request with `status`, and the
/// canvasser's read of one elector by id through it.
async fn read_refused_with(status: u16) -> (common::TestApp, Resp) {
    let up = fake_upstream(status, "application/problem+json", "{}", false).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(up),
        ..Default::default()
    })
    .await;
    let resp = app
        .get(
            "/voter/electors/VF-0000001",
            Some(&app.token("canvasser")),
            Some("canvassing"),
        )
        .await;
    (app, resp)
}

/// An app in front of `upstream`, and the canvasser's doorstep write of a voting intention for
/// elector `id` through it.
async fn canvass_through(upstream: SocketAddr, id: &str) -> (common::TestApp, Resp) {
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..Default::default()
    })
    .await;
    let resp = app
        .canvass(
            id,
            &app.token("canvasser"),
            "canvassing",
            r#"{"voting_intention":"LAB"}"#,
        )
        .await;
    (app, resp)
}

async fn through(
    upstream: SocketAddr,
    tweak: Option<fn(&mut wardgate::config::Config)>,
) -> (common::TestApp, Resp) {
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        tweak,
        ..Default::default()
    })
    .await;
    let resp = app
        .get(
            "/voter/electors",
            Some(&app.token("councillor")),
            Some("canvassing"),
        )
        .await;
    (app, resp)
}

/// A datastore that sends more records than the page asked for (ignoring `per_page`) would
/// disclose past the quota held for the request: the page is refused whole, and a page of the
/// size asked for, from the same datastore, is not.
#[tokio::test]
async fn a_page_longer_than_asked_for_discloses_nothing() {
    let (store, _stop) = common::start_datastore(200).await;
    let body = common::datastore_body(
        store,
        "/electors?per_page=10&page=1&exclude=protected&ward=E05011391",
    )
    .await;
    let doc: Value = serde_json::from_slice(&body).unwrap();
    let surnames: Vec<String> = (doc["records"].as_array().unwrap().iter())
        .map(|r| r["surname"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(surnames.len(), 10, "{doc}");
    let up = common::fixed_upstream(body, "application/json", std::time::Duration::ZERO).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(up),
        ..Default::default()
    })
    .await;
    let token = app.token("councillor");
    let list = "/voter/electors?per_page=";
    let whole = app
        .get(&format!("{list}10"), Some(&token), Some("canvassing"))
        .await;
    assert_eq!(whole.status, 200, "{:?}", whole.body);
    assert!(!whole.json()["records"].as_array().unwrap().is_empty());
    let long = app
        .get(&format!("{list}5"), Some(&token), Some("canvassing"))
        .await;
    assert_eq!(long.status, 502, "{:?}", long.body);
    let text = String::from_utf8_lossy(&long.body);
    assert!(
        surnames.iter().all(|s| !text.contains(s.as_str())),
        "{text}"
    );
    let record = app.audit_for(&long);
    assert_eq!(record["reason"], "upstream_response_malformed");
    assert_eq!(record["subjects"], json!([]), "{record}");
    app.stop().await;
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504_and_disclose_nothing() {
    // Truncated JSON on a data route: nothing passes through unfiltered.
    let up = fake_upstream(
        200,
        "application/json",
        r#"{"records":[{"elector_id":"VF-1","email":"leak@example.org""#,
        false,
    )
    .await;
    let (guard, logs) = common::capture_logs();
    let (app, r) = through(up, None).await;
    drop(guard);
    assert_eq!(r.status, 502);
    assert!(!String::from_utf8_lossy(&r.body).contains("leak@"));
    assert_eq!(app.audit_for(&r)["reason"], "upstream_response_malformed");
    // The caller is told nothing of why; the server log is, under the request id, with no
    // byte of the body.
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let id = r.headers["x-request-id"].to_str().unwrap();
    let line = (logs.lines())
        .find(|l| l.contains(id) && l.contains("upstream answer unreadable"))
        .unwrap_or_else(|| panic!("no log line for {id}: {logs}"));
    assert!(
        line.contains("WARN") && line.contains("malformed"),
        "{line}"
    );
    assert!(!logs.contains("leak@"), "{logs}");
    app.stop().await;

    // Not JSON at all.
    let up = fake_upstream(200, "text/html", "<html>leak@example.org</html>", false).await;
    let (app, r) = through(up, None).await;
    assert_eq!(r.status, 502);
    assert!(!String::from_utf8_lossy(&r.body).contains("leak@"));
    app.stop().await;

    // An upstream error status.
    let up = fake_upstream(
        500,
        "application/json",
        r#"{"error":"db down at 10.0.0.7"}"#,
        false,
    )
    .await;
    let (app, r) = through(up, None).await;
    assert_eq!(r.status, 502);
    assert!(!String::from_utf8_lossy(&r.body).contains("10.0.0.7"));
    app.stop().await;

    // A datastore's refusal of one id says nothing to the caller, who may not even be allowed
    // to know the record exists: a 410 or a 451 (a rights request) answers as a 404 does.
    let mut answers = Vec::new();
    for status in [451, 410, 404] {
        let (app, r) = read_refused_with(status).await;
        let mut problem = r.json();
        problem["request_id"] = json!(null);
        answers.push((r.status, problem, app.audit_for(&r)["reason"].clone()));
        app.stop().await;
    }
    assert_eq!(answers[0].0, 404, "{answers:?}");
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    // Its own failures (credentials refused, limits reached) stay the datastore's: 502.
    let (app, r) = read_refused_with(401).await;
    assert_eq!(r.status, 502);
    assert_eq!(app.audit_for(&r)["reason"], "upstream_error");
    app.stop().await;

    // Nobody listening.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (app, r) = through(closed, None).await;
    assert_eq!(r.status, 502);
    assert_eq!(app.audit_for(&r)["reason"], "upstream_unavailable");
    app.stop().await;

    // Accepts and never answers.
    let up = fake_upstream(200, "application/json", "{}", true).await;
    let (app, r) = through(
        up,
        Some(|c| {
            for u in c.datasets.values_mut() {
                u.response_timeout = std::time::Duration::from_millis(300);
            }
        }),
    )
    .await;
    assert_eq!(r.status, 504);
    assert_eq!(app.audit_for(&r)["reason"], "upstream_timeout");
    app.stop().await;

    // An error status whose body never ends: answered by its status, the body not waited
    // for (with the timeout the test sets, waiting for it would be a 504).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n\
                          transfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n",
                    )
                    .await;
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            });
        }
    });
    let (app, r) = through(
        up,
        Some(|c| {
            for u in c.datasets.values_mut() {
                u.response_timeout = std::time::Duration::from_secs(30);
            }
        }),
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(app.audit_for(&r)["reason"], "upstream_error");
    app.stop().await;

    // Larger than the configured bound.
    let up = fake_upstream(200, "application/json", r#"{"records":[],"padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#, false).await;
    let (app, r) = through(up, Some(|c| c.server.max_response_bytes = 64)).await;
    assert_eq!(r.status, 502);
    assert_eq!(app.audit_for(&r)["reason"], "upstream_response_too_large");
    app.stop().await;
}

#[tokio::test]
async fn the_callers_authorization_never_reaches_the_datastore() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let s = s.clone();
                    async move {
                        s.lock().unwrap().extend(
                            req.headers()
                                .iter()
                                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or(""))),
                        );
                        s.lock().unwrap().push(format!("uri: {}", req.uri()));
                        let mut resp =
                            http::Response::new(Full::new(Bytes::from_static(b"{\"records\":[]}")));
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    let app = spawn_app_with(AppOptions {
        upstream: Some(addr),
        ..Default::default()
    })
    .await;
    let t = app.token("councillor");
    let r = app
        .request(
            Method::GET,
            "/voter/electors",
            &[
                ("authorization", &format!("Bearer {t}")),
                ("x-purpose", "canvassing"),
                ("cookie", "session=abc"),
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let headers = seen.lock().unwrap().clone();
    assert!(
        !headers.iter().any(|h| h.starts_with("authorization")
            || h.starts_with("cookie")
            || h.starts_with("x-secret")),
        "{headers:?}"
    );
    // Narrowing the caller did not ask for: their ward's polling districts.
    let uri = headers.iter().find(|h| h.starts_with("uri: ")).unwrap();
    assert!(
        uri.contains("areas=") && uri.contains("E08000035%2FCGW1") && !uri.contains("E09000025"),
        "{uri}"
    );
    // A national caller's scope is the whole area register: nothing to narrow, so no list of
    // every area (the filter still checks each record's area).
    seen.lock().unwrap().clear();
    let r = app
        .get(
            "/voter/electors",
            Some(&app.token("analyst")),
            Some("profiling"),
        )
        .await;
    assert_eq!(r.status, 200);
    let headers = seen.lock().unwrap().clone();
    let uri = headers.iter().find(|h| h.starts_with("uri: ")).unwrap();
    assert!(!uri.contains("areas="), "{uri}");
    app.stop().await;
}

#[tokio::test]
async fn admin_plane_reports_health_readiness_and_metrics() {
    let app = spawn_app().await;
    assert_eq!(app.admin_get("/healthz").await.status, 200);
    assert_eq!(app.admin_get("/readyz").await.status, 200);
    let _ = app
        .get(
            "/voter/electors",
            Some(&app.token("canvasser")),
            Some("canvassing"),
        )
        .await;
    let m = app.admin_get("/metrics").await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("wardgate_requests_total"), "{text}");
    assert!(text.contains("wardgate_audit_commit_seconds"), "{text}");
    assert_eq!(app.admin_get("/nope").await.status, 404);
    app.stop().await;
}

/// A caller's `X-Request-Id` is kept for correlation, never used as the record's id: two
/// requests sending the same one get ids of their own (in the answer and the log), each record
/// names the caller's id beside its own, and an id that is not short and plain is not kept.
/// Before, the caller's id was the record's, so records could share one.
#[tokio::test]
async fn a_caller_cannot_choose_the_id_its_requests_are_logged_under() {
    let app = spawn_app().await;
    let token = format!("Bearer {}", app.token("analyst"));
    let ask = |id: &'static str| {
        let headers = [
            ("authorization", token.as_str()),
            ("x-purpose", "profiling"),
            ("x-request-id", id),
        ];
        let app = &app;
        async move {
            let r = app
                .request(Method::GET, "/voter/electors?per_page=2", &headers, None)
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.headers["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    let first = ask("mine-1").await;
    let second = ask("mine-1").await;
    let odd = ask("not plain!").await;
    assert_ne!(first, "mine-1");
    assert_ne!(first, second);
    let records = app.audit_records();
    let mine: Vec<&Value> = records
        .iter()
        .filter(|r| r["client_request_id"] == "mine-1")
        .collect();
    let ids: BTreeSet<&str> = mine
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([first.as_str(), second.as_str()]),
        "{mine:?}"
    );
    let odd = records
        .iter()
        .find(|r| r["request_id"] == odd.as_str())
        .expect("a record for the request with the odd id");
    assert!(odd.get("client_request_id").is_none(), "{odd}");
    // Every request id in the log is its own.
    let all: Vec<&str> = records
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), all.len());
    app.stop().await;
}

/// A caller who hangs up before the answer does not take the request's audit record with it:
/// the server drops the handler with the connection (here while it waits on the datastore),
/// and the record is written as the handler goes: an error, `client_closed`, who asked and
/// why, nothing disclosed (nothing left). Before, such a request left no record at all.
#[tokio::test]
async fn a_caller_who_hangs_up_mid_request_still_leaves_its_record() {
    use tokio::io::AsyncWriteExt;
    let real = spawn_app().await;
    let page = common::datastore_body(real.upstream, "/electors?per_page=20").await;
    let upstream = common::delayed_upstream(page, std::time::Duration::from_millis(800)).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..Default::default()
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /voter/electors?per_page=20 HTTP/1.1\r\nhost: wardgate\r\n\
         authorization: Bearer {}\r\nx-purpose: profiling\r\nx-request-id: hung-up-1\r\n\r\n",
        app.token("analyst")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(stream);
    let mut record = None;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        record = app
            .audit_records()
            .into_iter()
            .find(|r| r["client_request_id"] == "hung-up-1");
        if record.is_some() {
            break;
        }
    }
    let record = record.expect("the hung-up request left no audit record");
    assert_eq!(record["status"], 499, "{record}");
    assert_eq!(record["decision"], "error", "{record}");
    assert_eq!(record["reason"], "client_closed", "{record}");
    assert_eq!(record["caller"]["role"], "analyst", "{record}");
    assert_eq!(record["purpose"], "profiling", "{record}");
    assert_eq!(record["subjects"], json!([]), "{record}");
    app.stop().await;
}

/// Paging one record at a time through a polling district cannot count its anonymous electors
/// or under-16s: the gateway asks the datastore to leave the entries it never discloses out
/// before it pages (`exclude=protected`), so the pages walked are exactly the district's other
/// entries (a page left empty by another withholding, which DOMAIN.md does not hide, is one of
/// them). Before, every protected entry was an empty page with a next page after it.
#[tokio::test]
async fn paging_one_by_one_cannot_count_anonymous_electors_or_under_16s() {
    let app = spawn_app_with(AppOptions {
        electors: Some(6000),
        ..Default::default()
    })
    .await;
    let truth = upstream_all(app.upstream).await;
    let has = |r: &Value, list: &str, v: &str| r[list].as_array().unwrap().contains(&json!(v));
    let protected = |r: &Value| has(r, "markers", "N") || has(r, "flags", "under_16");
    let mut districts: std::collections::BTreeMap<(String, String), (usize, Vec<String>)> =
        Default::default();
    for r in truth.iter().filter(|r| r["ward"] == "E05011391") {
        let key = (
            r["local_authority"].as_str().unwrap().to_owned(),
            r["polling_district"].as_str().unwrap().to_owned(),
        );
        let entry = districts.entry(key).or_default();
        if protected(r) {
            entry.1.push(r["elector_id"].as_str().unwrap().to_owned());
        } else {
            entry.0 += 1;
        }
    }
    let ((la, pd), (open, hidden)) = districts
        .into_iter()
        .max_by_key(|(_, (_, hidden))| hidden.len())
        .unwrap();
    assert!(
        !hidden.is_empty() && open > 0,
        "the ward's districts hold no protected entry beside others: this proves nothing"
    );
    let token = app.token("councillor");
    let mut pages = 0;
    for page in 1.. {
        let r = app
            .get(
                &format!(
                    "/voter/electors?per_page=1&page={page}&local_authority={la}&polling_district={pd}"
                ),
                Some(&token),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        pages += 1;
        let v = r.json();
        for rec in v["records"].as_array().unwrap() {
            assert!(!hidden.contains(&rec["elector_id"].as_str().unwrap().to_owned()));
        }
        if v["next_page"].is_null() {
            break;
        }
        assert!(pages <= open + hidden.len(), "paging does not end");
    }
    assert_eq!(
        pages,
        open,
        "{la}/{pd}: {open} entries may be paged, {} never disclosed",
        hidden.len()
    );
    app.stop().await;
}

/// Paging cannot count the members a local officer may not see either: a member is judged by
/// their branch (the membership dataset's `area`), so the datastore is asked for the members
/// of the branches in scope, not for those who live in its districts. An officer granted a
/// constituency, under which no branch lies, walks one empty page with none after it, though
/// the datastore holds members living there. (The datastore matched members by district too:
/// each of them was an empty page with a next page after it.)
#[tokio::test]
async fn paging_cannot_count_members_outside_the_branches_in_scope() {
    let app = spawn_app().await;
    let mut members = Vec::new();
    for page in 1.. {
        let body =
            common::datastore_body(app.upstream, &format!("/members?per_page=1000&page={page}"))
                .await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        members.extend(v["records"].as_array().unwrap().iter().cloned());
        if v["next_page"].is_null() {
            break;
        }
    }
    let constituency = "E14001320";
    let living_there = (members.iter())
        .filter(|m| m["constituency"] == constituency)
        .count();
    assert!(
        living_there > 0,
        "no member lives in {constituency}: this proves nothing"
    );
    let officer =
        |areas: &[&str]| app.sign(&app.claims("membership_officer", areas, &["fundraising"]));
    let page = |token: String, per_page: u32| {
        let app = &app;
        async move {
            let r = app
                .get(
                    &format!("/membership/members?per_page={per_page}&page=1"),
                    Some(&token),
                    Some("fundraising"),
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
            r.json()
        }
    };
    let v = page(officer(&[constituency]), 1).await;
    assert_eq!(v["records"], json!([]), "{v}");
    assert!(
        v["next_page"].is_null(),
        "{living_there} members live in {constituency}, under no branch in scope, and paging counts them: {v}"
    );
    // The same officer granted a member's branch is given its members.
    let branch = members[0]["branch"].as_str().unwrap();
    let v = page(officer(&[branch]), 1000).await;
    let got = v["records"].as_array().unwrap();
    assert!(!got.is_empty(), "{v}");
    assert!(got.iter().all(|m| m["branch"] == branch), "{v}");
    app.stop().await;
}

/// A look-up purpose's listing names a postcode (`purpose.casework-looks-up`), and a datastore
/// that ignored the filter would hand the look-up a whole area, page by page: only records at
/// that postcode leave, the rest withheld and counted. And a listing's paging values are the
/// request's, not passed on as the datastore wrote them: a `next_page` that is not the page
/// after (a cursor spelling out a record's id) or a page other than the one asked for is
/// refused whole, and `per_page` is the one asked for.
#[tokio::test]
async fn a_listing_answers_what_was_asked_whatever_the_datastore_sends() {
    let real = spawn_app().await;
    let truth = upstream_all(real.upstream).await;
    let caseworker = real.token("mp_caseworker");
    let seen = real
        .get(
            "/voter/electors?per_page=50",
            Some(&real.token("councillor")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(seen.status, 200, "{:?}", seen.body);
    let listed: Vec<Value> = (seen.json()["records"].as_array().unwrap().iter())
        .map(|r| r["elector_id"].clone())
        .collect();
    let record = |id: &Value| {
        truth
            .iter()
            .find(|r| &r["elector_id"] == id)
            .unwrap()
            .clone()
    };
    let at = (listed.iter().map(record))
        .find(|r| r["postcode"] != "")
        .unwrap();
    let postcode = at["postcode"].as_str().unwrap().to_owned();
    // (Some electors have no postcode: a declaration of local connection.)
    let elsewhere = (listed.iter().map(record))
        .find(|r| r["postcode"] != at["postcode"] && r["postcode"] != "")
        .unwrap();
    let path = format!(
        "/voter/electors?per_page=2&postcode={}",
        postcode.replace(' ', "+")
    );
    // Both leave a look-up at their own postcode, through the real datastore.
    for r in [&at, &elsewhere] {
        let p = r["postcode"].as_str().unwrap();
        let got = real
            .get(
                &format!(
                    "/voter/electors?per_page=2&postcode={}",
                    p.replace(' ', "+")
                ),
                Some(&caseworker),
                Some("casework"),
            )
            .await;
        assert_eq!(got.status, 200, "{p}: {:?}", got.body);
        let out = got.json()["records"].clone();
        assert!(
            out.as_array()
                .unwrap()
                .iter()
                .any(|x| x["elector_id"] == r["elector_id"]),
            "{out}"
        );
    }

    let ids_of = |r: &common::Resp| -> Vec<Value> {
        (r.json()["records"].as_array().unwrap().iter())
            .map(|x| x["elector_id"].clone())
            .collect()
    };
    let serving = |paging: Value| {
        let mut page = json!({ "records": [at.clone(), elsewhere.clone()] });
        for (k, v) in paging.as_object().unwrap() {
            page[k] = v.clone();
        }
        page
    };
    let app = common::app_serving(&serving(
        json!({"page": 1, "per_page": 1000, "next_page": 2}),
    ))
    .await;
    let r = app
        .get(&path, Some(&app.token("mp_caseworker")), Some("casework"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(ids_of(&r), [at["elector_id"].clone()]);
    assert_eq!(r.json()["per_page"], 2, "{:?}", r.body);
    assert_eq!(r.json()["next_page"], 2, "{:?}", r.body);
    assert_eq!(app.audit_for(&r)["rows_withheld"], 1);
    app.stop().await;

    for paging in [
        json!({"page": 1, "per_page": 2, "next_page": 1043}),
        json!({"page": 7, "per_page": 2, "next_page": 8}),
    ] {
        let app = common::app_serving(&serving(paging.clone())).await;
        let r = app
            .get(&path, Some(&app.token("mp_caseworker")), Some("casework"))
            .await;
        assert_eq!(r.status, 502, "{paging}: {:?}", r.body);
        let body = String::from_utf8_lossy(&r.body);
        assert!(!body.contains(at["elector_id"].as_str().unwrap()), "{body}");
        app.stop().await;
    }
    real.stop().await;
}

/// A datastore that ignores `exclude=protected` still has its anonymous electors withheld.
/// (The operator is told, in `wardgate_upstream_never_disclosed_total`: counted exactly in
/// `tests/never_disclosed_metric.rs`, a binary of its own, the counter being the process's.)
#[tokio::test]
async fn a_datastore_sending_never_disclosed_entries_is_caught() {
    let real = spawn_app().await;
    let truth = upstream_all(real.upstream).await;
    let anonymous = truth.iter().find(|r| r["markers"] == json!(["N"])).unwrap();
    let open = truth
        .iter()
        .find(|r| r["markers"] == json!([]) && r["flags"] == json!([]))
        .unwrap();
    let page = json!({"records": [anonymous, open], "page": 1, "per_page": 2, "next_page": null});
    let app = common::app_serving(&page).await;
    let r = app
        .get(
            "/voter/electors?per_page=2",
            Some(&app.token("analyst")),
            Some("profiling"),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ids: Vec<Value> = r.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["elector_id"].clone())
        .collect();
    assert_eq!(ids, [open["elector_id"].clone()]);
    assert_eq!(app.audit_for(&r)["rows_withheld"], 1);
    app.stop().await;
}

/// A datastore that answers a write's target under another id (it normalised the case, say):
/// the write's records would name the id asked for, which a subject access search for the
/// record's own id misses. Refused as a target the gateway cannot classify.
#[tokio::test]
async fn a_write_whose_target_answers_under_another_id_is_refused() {
    let real = spawn_app().await;
    let truth = upstream_all(real.upstream).await;
    let mine = canvassable(&truth);
    let id = mine["elector_id"].as_str().unwrap();
    let (upstream, posts) =
        common::counting_upstream(Bytes::from(json!({ "record": mine }).to_string())).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..Default::default()
    })
    .await;
    let t = app.token("canvasser");
    let body = r#"{"voting_intention":"LAB"}"#;
    let r = app
        .canvass(&id.to_lowercase(), &t, "canvassing", body)
        .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(
        posts.load(Ordering::SeqCst),
        0,
        "the write reached the datastore"
    );
    assert_eq!(
        app.audit_for(&r)["withheld_target"],
        "answered_under_another_id"
    );
    // Under its own id the same answer is the target.
    let r = app.canvass(id, &t, "canvassing", body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(posts.load(Ordering::SeqCst), 1);
    app.stop().await;
    real.stop().await;
}

/// A datastore whose write answers with another record than the one written (an upsert
/// answering with the record it merged into, ids resolved otherwise than by its read): the
/// write is done, but nothing of that record is shown and no one else is named in its audit
/// record; an empty list for a limited field writes nothing and is refused before anything
/// is read.
#[tokio::test]
async fn a_write_answered_with_another_record_shows_nothing_of_it() {
    let real = spawn_app().await;
    let truth = upstream_all(real.upstream).await;
    let mine = canvassable(&truth);
    let id = mine["elector_id"].as_str().unwrap().to_owned();
    let theirs = (truth.iter())
        .find(|r| r["elector_id"] != mine["elector_id"] && r["surname"] != mine["surname"])
        .unwrap()
        .clone();
    let surname = theirs["surname"].as_str().unwrap().to_owned();
    let (target, answer) = (
        Bytes::from(json!({ "record": mine }).to_string()),
        Bytes::from(json!({ "record": theirs }).to_string()),
    );
    let upstream = common::upstream_answering(
        move |m| match *m {
            http::Method::POST => answer.clone(),
            _ => target.clone(),
        },
        "application/json",
        std::time::Duration::ZERO,
    )
    .await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..Default::default()
    })
    .await;
    let t = app.token("canvasser");
    let r = app
        .canvass(&id, &t, "canvassing", r#"{"voting_intention":"LAB"}"#)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json(), json!({ "record": null }));
    assert!(!String::from_utf8_lossy(&r.body).contains(&surname));
    let record = app.audit_for(&r);
    assert_eq!(
        record["detail"]["because"], "answered_under_another_id",
        "{record}"
    );
    assert!(
        !record
            .to_string()
            .contains(theirs["elector_id"].as_str().unwrap())
    );
    let r = app
        .canvass(&id, &t, "canvassing", r#"{"flags_add":[]}"#)
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(
        r.json()["detail"].as_str().unwrap().contains("empty list"),
        "{:?}",
        r.body
    );
    app.stop().await;
    real.stop().await;
}

/// A read answered with another record than the one asked for (a Datasette table looked up by
/// rowid, an id normalised) discloses nothing of it, under any purpose (a subject access
/// report above all, which would hand one person's record to another), and gives no reason
/// for it: under its own id the same answer is the record.
#[tokio::test]
async fn a_read_answered_with_another_record_discloses_nothing() {
    let real = spawn_app().await;
    let truth = upstream_all(real.upstream).await;
    let theirs = canvassable(&truth);
    let id = theirs["elector_id"].as_str().unwrap();
    let surname = theirs["surname"].as_str().unwrap();
    let other = (truth.iter())
        .map(|r| r["elector_id"].as_str().unwrap())
        .find(|other| *other != id)
        .unwrap();
    let app = common::app_serving(&json!({ "record": theirs })).await;
    for (role, purpose) in [
        ("councillor", "canvassing"),
        ("dpo", "sar_fulfilment"),
        ("dpo", "legal_claims"),
    ] {
        let token = app.token(role);
        let asked = app
            .get(
                &format!("/voter/electors/{other}"),
                Some(&token),
                Some(purpose),
            )
            .await;
        assert_eq!(asked.status, 404, "{role}/{purpose}: {:?}", asked.body);
        assert!(
            !String::from_utf8_lossy(&asked.body).contains(surname),
            "{role}/{purpose}"
        );
        let record = app.audit_for(&asked);
        assert_eq!(
            record["withheld_target"], "answered_under_another_id",
            "{record}"
        );
        assert_eq!(record["subjects"], json!([]), "{record}");
        let own = app
            .get(
                &format!("/voter/electors/{id}"),
                Some(&token),
                Some(purpose),
            )
            .await;
        assert_eq!(own.status, 200, "{role}/{purpose}: {:?}", own.body);
    }
    // Nor does a subject access report say that something is held under the id asked for,
    // which would have the DPO fetch and send another person's record.
    let dpo = app.token("dpo");
    let r = app.admin_get_with(&format!("/sar/{other}"), &dpo).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let missing = r.json()["current_data_missing"]["voter"].clone();
    assert_eq!(
        missing,
        "not read: the datastore answered with a record under another reference"
    );
    let r = app
        .admin_get_with(&format!("/sar/{other}?format=html"), &dpo)
        .await;
    let html = String::from_utf8_lossy(&r.body);
    // (The fake datastore answers the membership read with the same elector, unreadable
    // there: `held, withheld (malformed)`, which is the membership store's to explain.)
    assert!(
        html.contains("<h3>voter</h3><p><b>not included in this report</b> (not read:")
            && !html.contains(surname),
        "{html}"
    );
    app.stop().await;
    real.stop().await;
}

/// A datastore that will not answer for an id (403, 410 or 451: a record it keeps under a
/// rights request, or the gateway's credential refused) is a 404 to a caller, which tells of
/// no rights request; but a subject access report does not read it as "nothing held".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_datastore_refuses_is_not_reported_as_nothing_held() {
    for status in [403, 410, 451] {
        let upstream = common::upstream_refusing(status).await;
        let app = spawn_app_with(AppOptions {
            upstream: Some(upstream),
            ..AppOptions::default()
        })
        .await;
        let asked = app
            .get(
                "/voter/electors/VF-0000001",
                Some(&app.token("councillor")),
                Some("canvassing"),
            )
            .await;
        assert_eq!(asked.status, 404, "{status}: {:?}", asked.body);
        let record = app.audit_for(&asked);
        assert_eq!(
            record["withheld_target"],
            format!("refused_by_datastore_{status}"),
            "{record}"
        );
        let r = app
            .admin_get_with("/sar/VF-0000001", &app.token("dpo"))
            .await;
        assert_eq!(r.status, 200, "{status}: {:?}", r.body);
        assert_eq!(
            r.json()["current_data_missing"]["voter"],
            format!("not told: the datastore refused the read (status {status}); ask it"),
        );
        app.stop().await;
    }
}

/// An under-16 the datastore did not flag is still never disclosed: the attainer date (the
/// day the elector turns 18) says it, for every caller, the DPO's rights purposes included
/// (the datastore is caught sending it: `tests/never_disclosed_metric.rs`).
#[tokio::test]
async fn an_under_16_known_only_by_attainer_date_never_leaves() {
    let real = spawn_app().await;
    let truth = upstream_all(real.upstream).await;
    let open = truth
        .iter()
        .find(|r| r["markers"] == json!([]) && r["flags"] == json!([]) && r["ward"] == "E05011391")
        .unwrap();
    // Fifteen: sixteen in a year, eighteen in three.
    let mut child = open.clone();
    child["elector_id"] = json!("VF-CHILD-1");
    child["first_name"] = json!("Childname");
    let today = time::OffsetDateTime::now_utc().date();
    child["attainer_date"] = json!((today + time::Duration::days(3 * 365)).to_string());
    let page = json!({"records": [child, open], "page": 1, "per_page": 2, "next_page": null});
    let app = common::app_serving(&page).await;
    for (role, purpose) in [
        ("analyst", "profiling"),
        ("dpo", "sar_fulfilment"),
        ("dpo", "legal_claims"),
        ("councillor", "canvassing"),
    ] {
        let r = app
            .get(
                "/voter/electors?per_page=2",
                Some(&app.token(role)),
                Some(purpose),
            )
            .await;
        assert_eq!(r.status, 200, "{role}/{purpose}: {:?}", r.body);
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains("VF-CHILD-1") && !text.contains("Childname"),
            "{role}/{purpose}: {text}"
        );
        let ids: Vec<Value> = r.json()["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["elector_id"].clone())
            .collect();
        assert_eq!(ids, [open["elector_id"].clone()], "{role}/{purpose}");
    }
    let logged: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["route"] == "voter.list")
        .collect();
    assert_eq!(logged.len(), 4);
    assert!(
        logged
            .iter()
            .all(|r| r["subjects"] == json!([open["elector_id"]]) && r["rows_withheld"] == 1),
        "{logged:?}"
    );
    app.stop().await;
    real.stop().await;
}

fn short_grace(c: &mut wardgate::config::Config) {
    c.server.shutdown_grace = std::time::Duration::from_millis(300);
}

/// A request still waiting on its datastore when the shutdown grace period ends is recorded
/// before the log closes: the server ends the connection, the handler's guard queues its
/// `client_closed` record, and shutdown waits for it. Before, the connection outlived the
/// flushed log and the request left no record.
#[tokio::test]
async fn a_request_cut_off_by_shutdown_is_recorded_before_the_log_closes() {
    let real = spawn_app().await;
    let page = common::datastore_body(real.upstream, "/electors?per_page=5").await;
    let upstream = common::delayed_upstream(page, std::time::Duration::from_secs(30)).await;
    let mut app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        tweak: Some(short_grace),
        ..Default::default()
    })
    .await;
    let token = app.token("analyst");
    let addr = app.addr;
    let asked = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /voter/electors?per_page=5 HTTP/1.1\r\nhost: wardgate\r\n\
             authorization: Bearer {token}\r\nx-purpose: profiling\r\nx-request-id: cut-off-1\r\n\r\n"
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer).await;
        answer
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    app.halt().await;
    let record = app
        .audit_records()
        .into_iter()
        .find(|r| r["client_request_id"] == "cut-off-1")
        .expect("the request cut off by shutdown left no record");
    assert_eq!(record["reason"], "client_closed", "{record}");
    assert_eq!(record["subjects"], json!([]), "{record}");
    // Nothing was answered: the connection ended without a response.
    let answer = asked.await.unwrap();
    assert!(!String::from_utf8_lossy(&answer).contains("elector_id"));
}

/// The gateway with `server.header_read_timeout` at its least, one second.
async fn app_with_header_timeout_of_a_second() -> common::TestApp {
    fn short(c: &mut wardgate::config::Config) {
        c.server.header_read_timeout = std::time::Duration::from_secs(1);
    }
    spawn_app_with(AppOptions {
        tweak: Some(short),
        ..Default::default()
    })
    .await
}

/// A client that opens a connection and sends half a request line holds it only until
/// `server.header_read_timeout`: then the gateway closes it (without a timer hyper enforces no
/// timeout, and thousands of such connections would exhaust the descriptors).
#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = app_with_header_timeout_of_a_second().await;
    // Half a request's headers; nothing at all; less than the bytes that tell HTTP/1 from
    // HTTP/2 (before those, hyper's own header timeout has not started).
    for sent in [
        &b"GET /voter/electors HTTP/1.1\r\nhost: wardgate\r\n"[..],
        b"",
        b"PRI * HTTP/2.0",
    ] {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let mut buf = Vec::new();
        // Far past the timeout: the read ends when the gateway closes the connection.
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            stream.read_to_end(&mut buf),
        )
        .await;
        assert!(
            closed.is_ok(),
            "{:?}: the connection was still open after 20 s",
            String::from_utf8_lossy(sent)
        );
    }
    // A client that does finish is served as ever.
    let r = app
        .get(
            "/voter/electors?per_page=1",
            Some(&app.token("canvasser")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, 200);
    app.stop().await;
}

/// An HTTP/2 connection that carries no request for `server.header_read_timeout` is closed
/// (hyper bounds only HTTP/1's idle time: an HTTP/2 peer answering keep-alive pings would
/// otherwise hold its connection, and one of `max_connections`, for ever).
#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let app = app_with_header_timeout_of_a_second().await;
    // HTTP/2 with prior knowledge (the data plane here is plain).
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/voter/electors?per_page=1", app.addr))
        .header(
            "authorization",
            format!("Bearer {}", app.token("canvasser")),
        )
        .header("x-purpose", "canvassing")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    resp.into_body().collect().await.unwrap();
    // Idle from here: the gateway closes it, long before this wait ends.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), conn).await;
    assert!(
        closed.is_ok(),
        "the idle HTTP/2 connection was still open after 20 s"
    );
    app.stop().await;
}

/// An HTTP/2 client with no token that keeps its window shut (`SETTINGS_INITIAL_WINDOW_SIZE`
/// 0, as HTTP/2 allows) never takes its 401's body: the connection is still closed once idle,
/// not held for ever by a response that cannot be sent (one per connection would hold every
/// one of `max_connections`).
#[tokio::test]
async fn an_http2_client_that_never_takes_its_answer_does_not_hold_the_connection() {
    use bytes::Bytes;
    use http_body_util::Full;
    let app = app_with_header_timeout_of_a_second().await;
    let (mut sender, conn) = common::http2_with_window(app.addr, 0).await;
    let req = http::Request::get(format!("http://{}/voter/electors", app.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 401);
    // Its body is never read (and could not come): the gateway closes the connection.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), conn).await;
    assert!(
        closed.is_ok(),
        "an HTTP/2 connection with an answer it never took was still open after 20 s"
    );
    drop(resp);
    app.stop().await;
}

/// A slow HTTP/2 client still taking a large page (its one frame handed on long before) is
/// not idle while the page's bytes go to it: it gets the whole page, though that takes many
/// times `server.header_read_timeout`.
#[tokio::test]
async fn a_slow_http2_client_gets_its_whole_page() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let app = app_with_header_timeout_of_a_second().await;
    let (mut sender, _conn) = common::http2_with_window(app.addr, 4 * 1024).await;
    let req = http::Request::get(format!("http://{}/voter/electors?per_page=1000", app.addr))
        .header("authorization", format!("Bearer {}", app.token("analyst")))
        .header("x-purpose", "profiling")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (started, mut got) = (std::time::Instant::now(), Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the page was cut off");
        if let Some(data) = frame.data_ref() {
            got.extend_from_slice(data);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let page: serde_json::Value = serde_json::from_slice(&got).unwrap();
    assert!(page["records"].as_array().unwrap().len() > 100);
    // (Slower than two idle bounds, or the test would not test it.)
    assert!(
        started.elapsed() > std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    app.stop().await;
}

/// `server.max_connections`: a client holding that many connections open (idle, sending
/// nothing) does not get the process's descriptors. The next connection waits, unaccepted,
/// until one of them closes, and is then served. The admin plane has its own limit, and it
/// counts the waits.
#[tokio::test]
async fn connections_past_the_limit_wait_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn three(c: &mut wardgate::config::Config) {
        c.server.max_connections = 3;
    }
    let app = spawn_app_with(AppOptions {
        tweak: Some(three),
        ..Default::default()
    })
    .await;
    let request = format!(
        "GET /voter/electors?per_page=1 HTTP/1.1\r\nhost: wardgate\r\nauthorization: Bearer {}\r\n\
         x-purpose: canvassing\r\nconnection: close\r\n\r\n",
        app.token("canvasser")
    );
    // One connection served, then closed: the limit counts connections open, not made.
    let ask = |request: String| async move {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    assert!(ask(request.clone()).await.starts_with("HTTP/1.1 200"));
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
    }
    let waiting = tokio::spawn(ask(request.clone()));
    // The fourth connection's request is not read while three are open.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "a fourth connection was served");
    let metrics = app.admin_get("/metrics").await;
    assert_eq!(metrics.status, 200, "the admin plane has its own limit");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let metric = |name: &str| -> f64 {
        (text.lines())
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert!(metric("wardgate_connections_limit_reached_total{plane=\"data\"}") >= 1.0);
    // (At least: the metrics are the process's, and other tests' gateways run beside this one.)
    assert!(metric("wardgate_connections_open{plane=\"data\"}") >= 3.0);
    // One closes: the fourth is accepted and served.
    drop(idle.pop());
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), waiting)
        .await
        .expect("still waiting 20 s after a connection closed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    app.stop().await;
}

/// A look-up purpose cannot be walked through by id: a read under `donation_checks` or
/// `casework` names the person's postcode, and the record must be at it. Without one it is
/// 403; with another person's it is 404 and nothing of the record leaves; with theirs (in
/// either case, with or without the inward code's last letter) the record is read.
#[tokio::test]
async fn a_look_up_purpose_reads_by_id_only_at_the_postcode_named() {
    let app = spawn_app().await;
    let canvassed = all_pages(&app, &app.token("councillor"), "canvassing", "").await;
    // Electors with a whole postcode (`LS15 8AB`): an outward code, a space, an inward one.
    let mut at = canvassed.iter().filter_map(|r| {
        let postcode = r["postcode"].as_str()?;
        let (_, inward) = postcode.split_once(' ')?;
        let id = r["elector_id"].as_str()?.to_owned();
        (inward.len() == 3).then(|| (id, postcode.to_owned()))
    });
    let (id, postcode) = at.next().expect("an elector with a postcode");
    let sector_part = |p: &str| p[..p.len() - 1].to_owned();
    let elsewhere = at
        .map(|(_, p)| p)
        .find(|p| sector_part(p) != sector_part(&postcode))
        .expect("electors at two postcodes");
    let officer = app.sign(&app.claims("clp_secretary", &["E92000001"], &["donation_checks"]));
    let caseworker = app.token("mp_caseworker");
    let served = &app;
    for (token, purpose) in [(&officer, "donation_checks"), (&caseworker, "casework")] {
        let read = |query: String| {
            let path = format!("/voter/electors/{id}{query}");
            async move { served.get(&path, Some(token), Some(purpose)).await }
        };
        let r = read(String::new()).await;
        assert_eq!(r.status, 403, "{purpose}, no postcode: {:?}", r.body);
        assert!(!String::from_utf8_lossy(&r.body).contains(&id));
        let r = read(format!("?postcode={}", elsewhere.replace(' ', "+"))).await;
        assert_eq!(r.status, 404, "{purpose}, another postcode: {:?}", r.body);
        assert!(!String::from_utf8_lossy(&r.body).contains(&id));
        let record = app.audit_for(&r);
        assert_eq!(record["withheld_target"], "filter_mismatch", "{record}");
        assert_eq!(record["subjects"], json!([]), "{record}");
        // A district alone is no look-up (`LS15` is tens of thousands of addresses).
        let district = postcode.split(' ').next().unwrap();
        let r = read(format!("?postcode={district}")).await;
        assert_eq!(r.status, 403, "{purpose}, a district: {:?}", r.body);
        for named in [
            postcode.clone(),
            postcode.to_lowercase(),
            postcode[..postcode.len() - 1].to_owned(),
        ] {
            let r = read(format!("?postcode={}", named.replace(' ', "+"))).await;
            assert_eq!(r.status, 200, "{purpose}, `{named}`: {:?}", r.body);
            assert_eq!(r.json()["record"]["elector_id"], id.as_str());
        }
    }
    // An anonymous elector's id read with a postcode (theirs is blank) is logged as an attempt
    // on a protected entry, for breach detection to count, not only as a postcode mismatch.
    let truth = upstream_all(app.upstream).await;
    let anonymous = (truth.iter())
        .find(|r| {
            r["markers"]
                .as_array()
                .is_some_and(|m| m.contains(&json!("N")))
        })
        .and_then(|r| r["elector_id"].as_str())
        .expect("an anonymous elector");
    let path = format!(
        "/voter/electors/{anonymous}?postcode={}",
        postcode.replace(' ', "+")
    );
    let r = app
        .get(&path, Some(&officer), Some("donation_checks"))
        .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let record = app.audit_for(&r);
    assert_eq!(record["withheld_target"], "protected", "{record}");
    assert_eq!(record["subjects"], json!([]), "{record}");
    app.stop().await;
}

/// A filter is no oracle for a field the purpose may not see: it is refused (403) in a listing
/// and an export alike, where a purpose that shows the field gets the records it picks; and
/// the request's audit record names the filter. (A record whose own flags hide a filtered
/// field is withheld: `filter::tests::a_record_hiding_a_filtered_field_is_withheld`.)
#[tokio::test]
async fn a_filter_on_a_field_the_purpose_hides_discloses_nothing() {
    let app = spawn_app().await;
    // A postcode district of the councillor's ward, taken from what canvassing shows them.
    let councillor = app.token("councillor");
    let canvassed = all_pages(&app, &councillor, "canvassing", "").await;
    let postcode = canvassed
        .iter()
        .find_map(|r| r["postcode"].as_str())
        .expect("canvassing shows postcodes");
    let prefix = &postcode[..postcode.len() - 1];
    let query = format!("&postcode={}", prefix.replace(' ', "+"));
    let shown = all_pages(&app, &councillor, "canvassing", &query).await;
    assert!(
        !shown.is_empty(),
        "the filter should pick electors by `{prefix}`"
    );
    for r in &shown {
        assert!(r["postcode"].as_str().unwrap().starts_with(prefix), "{r}");
    }

    // Profiling hides addresses: narrowing by postcode prefix would spell each elector's out.
    let analyst = app.token("analyst");
    let everyone = all_pages(&app, &analyst, "profiling", "").await;
    let ids = |rs: &[Value]| -> BTreeSet<String> {
        rs.iter()
            .map(|r| r["elector_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let picked = ids(&shown);
    assert!(
        ids(&everyone).intersection(&picked).next().is_some(),
        "the analyst sees some of the picked electors unfiltered"
    );
    assert!(everyone.iter().all(|r| r.get("postcode").is_none()));
    // Refused (withheld, the picked records would still be counted by paging), in a listing
    // and an export alike, and logged with the filter.
    let picked_shown = |r: &Resp| {
        let text = String::from_utf8_lossy(&r.body);
        picked.iter().any(|id| text.contains(id.as_str()))
    };
    for path in [
        format!("/voter/electors?per_page=1000{query}"),
        format!("/voter/electors/export?{}", &query[1..]),
    ] {
        let r = app.get(&path, Some(&analyst), Some("profiling")).await;
        assert_eq!(r.status, 403, "{path}: {:?}", r.body);
        assert_eq!(r.json()["type"], "urn:wardgate:problem:filter-forbidden");
        assert!(r.json()["detail"].as_str().unwrap().contains("`postcode`"));
        assert!(!picked_shown(&r));
        let record = app.audit_for(&r);
        assert_eq!(record["decision"], "deny", "{record}");
        assert_eq!(record["reason"], "filter_forbidden", "{record}");
        // Refused by the field's policies (nothing permits addresses for profiling), not
        // recorded under the ones that let the listing through.
        assert_eq!(record["policy_ids"], json!(["default-deny"]), "{record}");
        assert_eq!(
            r.json()["policy_ids"],
            json!(["default-deny"]),
            "{:?}",
            r.body
        );
        assert_eq!(record["detail"]["filters"]["postcode"], prefix, "{record}");
        assert_eq!(record["subjects"], json!([]), "{record}");
    }
    // A filter the purpose may see (profiling sees areas): an export's first record names it.
    let export = app
        .get(
            "/voter/electors/export?ward=E05011391",
            Some(&analyst),
            Some("profiling"),
        )
        .await;
    assert_eq!(export.status, 200, "{:?}", export.body);
    assert!(!export.body.is_empty());
    let rid = export.headers["x-request-id"].to_str().unwrap();
    let started = app
        .audit_records()
        .into_iter()
        .find(|r| r["request_id"] == rid && r["detail"]["export"] == "started")
        .expect("the export's first record");
    assert_eq!(
        started["detail"]["filters"]["ward"], "E05011391",
        "{started}"
    );

    // Membership status is for membership administration, not for an email round (which
    // otherwise reaches members).
    let secretary = app.token("clp_secretary");
    let path = "/membership/members?per_page=1000&status=active";
    let admin = app
        .get(path, Some(&secretary), Some("membership_admin"))
        .await;
    assert_eq!(admin.status, 200, "{:?}", admin.body);
    let members = admin.json()["records"].as_array().unwrap().clone();
    assert!(!members.is_empty());
    assert!(members.iter().all(|m| m["status"] == "active"));
    let unfiltered = app
        .get(
            "/membership/members?per_page=1000",
            Some(&secretary),
            Some("email_sms"),
        )
        .await;
    assert_eq!(unfiltered.status, 200, "{:?}", unfiltered.body);
    assert!(!unfiltered.json()["records"].as_array().unwrap().is_empty());
    let round = app.get(path, Some(&secretary), Some("email_sms")).await;
    assert_eq!(round.status, 403, "{:?}", round.body);
    assert_eq!(
        round.json()["type"],
        "urn:wardgate:problem:filter-forbidden"
    );
    app.stop().await;
}

/// Breach detection's `protected_subject` counts attempts on people held back from everyone:
/// an in-area elector withheld from canvassing because they do not want contact is the
/// canvasser's ordinary day, logged as withheld by policy; a restricted one is not.
#[tokio::test]
async fn only_restricted_subjects_named_by_id_count_as_protected() {
    let app = spawn_app().await;
    let truth = upstream_all(app.upstream).await;
    let councillor = app.token("councillor");
    let flagged = |flag: &str| {
        truth
            .iter()
            .find(|r| {
                r["ward"] == "E05011391"
                    && r["markers"] == json!([])
                    && r["flags"] == json!([flag])
                    && r["attainer_date"].is_null()
            })
            .unwrap_or_else(|| panic!("no elector of the ward flagged only `{flag}`"))
    };
    for (flag, why) in [
        ("do_not_contact", "policy"),
        ("deceased", "policy"),
        ("restricted", "restricted"),
        ("erasure_requested", "restricted"),
    ] {
        let id = flagged(flag)["elector_id"].as_str().unwrap();
        let r = app
            .get(
                &format!("/voter/electors/{id}"),
                Some(&councillor),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, 404, "{flag}: {:?}", r.body);
        let record = app.audit_for(&r);
        assert_eq!(record["withheld_target"], why, "{flag}: {record}");
    }
    app.stop().await;
}

/// The gateway's own row filter, not the datastore's narrowing, is what keeps a listing to
/// the caller's areas and free of the protected: a datastore that ignores `areas=` and
/// `exclude=protected` and sends a page holding one elector of the councillor's ward, one of
/// another ward, an anonymous elector and an under-16 gets the councillor the first alone,
/// and a national analyst the two open ones; each record says how many were withheld.
#[tokio::test]
async fn a_datastore_that_ignores_narrowing_gets_no_one_out_of_scope_or_protected_listed() {
    let real = spawn_app().await;
    let truth = upstream_all(real.upstream).await;
    let open = |r: &&Value| r["markers"] == json!([]) && r["flags"] == json!([]);
    let ward = "E05011391";
    let inside = truth.iter().find(|r| open(r) && r["ward"] == ward).unwrap();
    let outside = truth.iter().find(|r| open(r) && r["ward"] != ward).unwrap();
    let anonymous = (truth.iter())
        .find(|r| r["ward"] == ward && r["markers"].as_array().unwrap().contains(&json!("N")))
        .expect("an anonymous elector in the ward");
    let child = (truth.iter())
        .find(|r| r["ward"] == ward && r["flags"].as_array().unwrap().contains(&json!("under_16")))
        .expect("an under-16 in the ward");
    let page = json!({
        "records": [inside, outside, anonymous, child],
        "page": 1, "per_page": 4, "next_page": null
    });
    let app = common::app_serving(&page).await;
    for (role, purpose, expected, withheld) in [
        ("councillor", "canvassing", vec![inside], 3),
        ("analyst", "profiling", vec![inside, outside], 2),
    ] {
        let r = app
            .get(
                "/voter/electors?per_page=4",
                Some(&app.token(role)),
                Some(purpose),
            )
            .await;
        assert_eq!(r.status, 200, "{role}: {:?}", r.body);
        let ids: Vec<Value> = (r.json()["records"].as_array().unwrap().iter())
            .map(|x| x["elector_id"].clone())
            .collect();
        let want: Vec<Value> = expected.iter().map(|x| x["elector_id"].clone()).collect();
        assert_eq!(ids, want, "{role}/{purpose}");
        for hidden in [anonymous, child] {
            let id = hidden["elector_id"].as_str().unwrap();
            assert!(
                !String::from_utf8_lossy(&r.body).contains(id),
                "{role}: {id}"
            );
        }
        let logged = app.audit_for(&r);
        assert_eq!(logged["subjects"], json!(want), "{role}");
        assert_eq!(logged["rows_withheld"], withheld, "{role}");
    }
    app.stop().await;
    real.stop().await;
}
