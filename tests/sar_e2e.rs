//! Subject access: after traffic that disclosed a subject in a known set of responses, the
//! report lists exactly those disclosures, found through the sealed segments' subject index;
//! and tampering with a sealed segment is reported with the segment and record.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{AppOptions, spawn_app_with};
use serde_json::Value;

fn small_segments(c: &mut wardgate::config::Config) {
    c.audit.segment_max_bytes = 24 * 1024;
}

fn ids_in(body: &Value) -> Vec<String> {
    match body.get("records") {
        Some(Value::Array(rs)) => rs
            .iter()
            .filter_map(|r| r["elector_id"].as_str().map(str::to_owned))
            .collect(),
        _ => body["record"]["elector_id"]
            .as_str()
            .map(str::to_owned)
            .into_iter()
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_lists_exactly_the_disclosures_of_a_subject() {
    let mut app = spawn_app_with(AppOptions {
        tweak: Some(small_segments),
        electors: Some(1200),
        ..Default::default()
    })
    .await;
    // The subject: an ordinary elector in the councillor's ward.
    let first = app
        .get(
            "/voter/electors?per_page=10",
            Some(&app.token("councillor")),
            Some("canvassing"),
        )
        .await;
    let subject = ids_in(&first.json())[3].clone();
    // A read by id under casework names the constituent's postcode (the look-up rule).
    let postcode = first.json()["records"][3]["postcode"]
        .as_str()
        .unwrap()
        .replace(' ', "+");
    // That first page disclosed the subject too.
    let mut expected = BTreeSet::from([first.headers["x-request-id"].to_str().unwrap().to_owned()]);
    let mut requests = 0;
    // A mixed load: pages and reads by several personas and purposes, some of which disclose
    // the subject and many of which do not.
    let traffic: &[(&str, &str, &str)] = &[
        (
            "councillor",
            "canvassing",
            "/voter/electors?per_page=25&page={p}",
        ),
        (
            "canvasser",
            "canvassing",
            "/voter/electors?per_page=25&page={p}",
        ),
        ("candidate", "gotv", "/voter/electors?per_page=50&page={p}"),
        (
            "analyst",
            "profiling",
            "/voter/electors?per_page=100&page={p}",
        ),
        (
            "councillor",
            "email_sms",
            "/voter/electors?per_page=40&page={p}",
        ),
        ("dpo", "sar_fulfilment", "/voter/electors/{s}"),
        (
            "mp_caseworker",
            "casework",
            "/voter/electors/{s}?postcode={pc}",
        ),
        ("councillor", "canvassing", "/voter/electors?ward=E05013911"),
    ];
    for round in 0..3 {
        for (persona, purpose, template) in traffic {
            for p in 1..=4 {
                let path = template
                    .replace("{p}", &p.to_string())
                    .replace("{s}", &subject)
                    .replace("{pc}", &postcode);
                let r = app
                    .get(&path, Some(&app.token(persona)), Some(purpose))
                    .await;
                requests += 1;
                if r.status == 200 && ids_in(&r.json()).contains(&subject) {
                    expected.insert(r.headers["x-request-id"].to_str().unwrap().to_owned());
                }
                if template.contains("{s}") && p > 1 + round {
                    break;
                }
            }
        }
    }
    assert!(
        expected.len() >= 5,
        "the load should disclose the subject several times, got {}",
        expected.len()
    );

    // Wait for the finished segments to be sealed (it happens off the writer thread, under
    // SCHED_IDLE: only when the machine has a moment, which on a busy CI machine can be late).
    let deadline = Instant::now() + Duration::from_secs(60);
    let dir = app.audit_dir.clone();
    loop {
        let segs = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            .count();
        let seals = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seal.json"))
            .count();
        if segs > 2 && seals + 1 >= segs {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "segments were not sealed ({segs} segments, {seals} seals)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let catalog = wardgate::catalog::Catalog::load(&app.dir.path().join("catalog.toml")).unwrap();
    let report = wardgate::sar::build(&dir, &catalog, &subject, vec![]).unwrap();
    let listed: BTreeSet<String> = report
        .disclosures
        .iter()
        .map(|d| d.request_id.clone())
        .collect();
    assert_eq!(
        listed, expected,
        "the report must list exactly the responses that disclosed {subject}"
    );
    assert!(report.lookup.segments_indexed >= 2, "{:?}", report.lookup);
    let scanned = wardgate::audit::reader::scan_all(&dir, &subject).unwrap();
    assert!(
        report.lookup.lines_read < scanned.1.lines_read,
        "the index reads only matching lines of sealed segments: {:?} vs {:?}",
        report.lookup,
        scanned.1
    );
    assert_eq!(
        scanned.0.len(),
        report.disclosures.len() + scanned.0.iter().filter(|r| r["status"] != 200).count()
    );
    eprintln!(
        "{requests} requests, {} disclosed {subject}; lookup {:?}; full scan read {} lines",
        expected.len(),
        report.lookup,
        scanned.1.lines_read
    );
    assert!(
        report
            .purposes
            .iter()
            .any(|p| p.purpose == "canvassing" && p.basis_detail.contains("democratic engagement"))
    );
    assert!(report.recipients.iter().any(|r| r.role == "councillor"));
    assert!(report.retention.iter().any(|r| r.category == "identity"));
    let page = wardgate::sar::html(&report);
    assert!(page.contains(&subject));
    // To whom by role and unit, never the individual (their identity is theirs).
    assert!(page.contains("councillor"));
    for d in &report.disclosures {
        assert!(!d.recipient_subject.is_empty());
        assert!(
            !page.contains(&d.recipient_subject),
            "{}",
            d.recipient_subject
        );
    }

    // The same report from the admin plane, to the DPO only, and the retrieval is audited.
    let denied = app
        .admin_get_with(&format!("/sar/{subject}"), &app.token("security"))
        .await;
    assert_eq!(denied.status, 403);
    let resp = app
        .admin_get_with(&format!("/sar/{subject}"), &app.token("dpo"))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json()["current_data"]["voter"]["elector_id"],
        subject.as_str(),
        "the data held now, under sar_fulfilment"
    );
    // An elector is not a member: the membership store was asked and holds nothing.
    assert_eq!(
        resp.json()["current_data_missing"],
        serde_json::json!({ "membership": wardgate::sar::NOTHING_HELD })
    );
    let via_admin: BTreeSet<String> = resp.json()["disclosures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(via_admin, expected);
    let html = app
        .admin_get_with(&format!("/sar/{subject}?format=html"), &app.token("dpo"))
        .await;
    assert!(String::from_utf8_lossy(&html.body).contains("<table>"));
    // A datastore's values are in it: should one reach the page unescaped, it runs nothing.
    let header = |name: &str| html.headers.get(name).and_then(|v| v.to_str().ok());
    let csp = header("content-security-policy").expect("a Content-Security-Policy");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(header("x-content-type-options"), Some("nosniff"));
    let audited = app
        .audit_records()
        .into_iter()
        .filter(|r| r["detail"]["subject_access_report_for"] == subject.as_str())
        .count();
    assert_eq!(audited, 2);
    // A format it does not come in, or another query, is 400, never the JSON report.
    for query in ["format=xml", "format=html&x=1", "fields=all"] {
        let r = app
            .admin_get_with(&format!("/sar/{subject}?{query}"), &app.token("dpo"))
            .await;
        assert_eq!(r.status, 400, "{query}: {:?}", r.body);
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{query}"
        );
        assert!(
            String::from_utf8_lossy(&r.body).contains("format=html"),
            "{query}"
        );
    }

    // A route word is not a subject: `/sar/export` must not fetch "the subject's current data"
    // as a whole export (every record disclosed to the DPO), nor `/sar/aggregate` count them.
    let before = app.audit_records().len();
    for word in ["export", "aggregate"] {
        let r = app
            .admin_get_with(&format!("/sar/{word}"), &app.token("dpo"))
            .await;
        assert_eq!(r.status, 400, "{word}: {:?}", r.body);
        let r = app
            .admin_post(
                &format!("/rights/{word}"),
                &app.token("dpo"),
                r#"{"kind":"objects_profiling","reference":"R-1","reason":"by letter"}"#,
            )
            .await;
        assert_eq!(r.status, 400, "{word}: {:?}", r.body);
    }
    let after = app.audit_records();
    // Refused, and recorded with where they came from, as the data plane's are.
    let refusals: Vec<&Value> = after[before..]
        .iter()
        .filter(|r| r["kind"] == "admin" && r["status"] == 400)
        .collect();
    assert_eq!(refusals.len(), 4, "{refusals:?}");
    assert!(
        refusals.iter().all(|r| r["client_addr"].is_string()),
        "{refusals:?}"
    );
    assert!(
        after[before..]
            .iter()
            .all(|r| r["subjects"].as_array().is_none_or(|s| s.is_empty())
                && !r["route"].as_str().unwrap_or("").ends_with(".export")),
        "{:?}",
        &after[before..]
    );
    // Fetching the current data went through the data plane, so it is audited like any access.
    assert!(
        app.audit_records()
            .iter()
            .any(|r| r["purpose"] == "sar_fulfilment"
                && r["route"] == "voter.read"
                && r["subjects"][0] == subject.as_str())
    );

    // And the CLI agrees. While the gateway runs it owns the log, so the CLI (which must audit
    // the retrieval) refuses and points at the admin plane; once stopped, the CLI works.
    let out = tempfile::tempdir().unwrap();
    let config_path = app.config_path.clone();
    let cli = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_wardgate"))
            .args(["sar", &subject, "--reference", "SAR-2026-0142", "--config"])
            .arg(&config_path)
            .arg("--out")
            .arg(out.path())
            .output()
            .unwrap()
    };
    // The running gateway owns the controls' journal too: a CLI refused leaves it as it is,
    // a last line being written (here, torn) included, rather than mending it under the
    // gateway.
    let journal = (wardgate::config::Config::load(&config_path).unwrap())
        .server
        .data_dir
        .join("controls.jsonl");
    let mut torn = std::fs::read(&journal).unwrap_or_default();
    torn.extend_from_slice(br#"{"id":"being-written","#);
    std::fs::write(&journal, &torn).unwrap();
    let refused = cli();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("/sar/"));
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        torn,
        "the journal was written to"
    );
    // (Mended, as the gateway would on its next start.)
    std::fs::write(
        &journal,
        &torn[..torn.len() - br#"{"id":"being-written","#.len()],
    )
    .unwrap();
    assert!(!out.path().join(format!("sar-{subject}.json")).exists());
    let audit_dir = app.audit_dir.clone();
    let records_before = app.audit_records();
    app.halt().await;
    let status = cli();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let cli_record = common::read_audit(&audit_dir).pop().unwrap();
    assert_eq!(cli_record["route"], "cli.sar");
    assert_eq!(
        cli_record["detail"]["subject_access_report_for"],
        subject.as_str()
    );
    assert_eq!(cli_record["detail"]["reference"], "SAR-2026-0142");
    let json: Value = serde_json::from_slice(
        &std::fs::read(out.path().join(format!("sar-{subject}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(json["other_replicas_not_searched"], false);
    // The same configuration sharing its controls through Redis (one replica of several): its
    // own log alone is said to be one of several, unless the logs are named.
    let key = config_path.with_file_name("controls-shared.key");
    std::fs::write(&key, hex::encode([7u8; 32])).unwrap();
    let shared = config_path.with_file_name("wardgate-shared.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &shared,
        format!(
            "{text}\n[redis]\nurl = \"redis://127.0.0.1:1/\"\nkey_file = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    for (dirs, said) in [(None, true), (Some(&audit_dir), false)] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wardgate"));
        cmd.args(["sar", &subject, "--reference", "SAR-2026-0143", "--config"])
            .arg(&shared)
            .arg("--out")
            .arg(out.path());
        if let Some(d) = dirs {
            cmd.arg("--audit-dir").arg(d);
        }
        let done = cmd.output().unwrap();
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        let again: Value = serde_json::from_slice(
            &std::fs::read(out.path().join(format!("sar-{subject}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(again["other_replicas_not_searched"], said);
    }
    let via_cli: BTreeSet<String> = json["disclosures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["request_id"].as_str().unwrap().to_owned())
        .collect();
    // The CLI reads the log after the two admin retrievals, whose fetches of the data held now
    // were themselves disclosures to the DPO under sar_fulfilment: exactly those are added.
    let sar_fetches: BTreeSet<String> = records_before
        .into_iter()
        .filter(|r| {
            // The report's fetch names the admin request it serves (`{id}-{dataset}`) as its
            // caller's request id; its own id is the gateway's.
            r["purpose"] == "sar_fulfilment"
                && r["client_request_id"]
                    .as_str()
                    .is_some_and(|id| id.ends_with("-voter"))
                && r["status"] == 200
        })
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sar_fetches.len(), 2);
    assert_eq!(
        via_cli,
        expected
            .union(&sar_fetches)
            .cloned()
            .collect::<BTreeSet<_>>()
    );

    // Tampering with a sealed segment: one changed byte is found, with segment and line.
    let seg = dir.join("seg-00000002.jsonl");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.iter().position(|b| *b == b'"').unwrap() + 1 + bytes.len() / 2 % 50;
    bytes[at] = if bytes[at] == b'a' { b'b' } else { b'a' };
    std::fs::write(&seg, &bytes).unwrap();
    let err = wardgate::audit::verify_dir(&dir).unwrap_err().to_string();
    assert!(
        err.contains("seg-00000002.jsonl") && err.contains("line"),
        "{err}"
    );
    app.stop().await;
}

/// What was recorded about the person (canvass returns, "do not knock") is in the report,
/// from each write's own record, whether or not its answer named them.
#[tokio::test]
async fn the_report_lists_what_was_recorded_about_the_subject() {
    let app = spawn_app_with(AppOptions::default()).await;
    let t = app.token("canvasser");
    let page = app
        .get("/voter/electors?per_page=20", Some(&t), Some("canvassing"))
        .await;
    let subject = page.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["markers"] == serde_json::json!([]))
        .and_then(|r| r["elector_id"].as_str())
        .unwrap()
        .to_owned();
    for body in [
        r#"{"voting_intention":"LAB"}"#,
        r#"{"flags_add":["do_not_contact"]}"#,
    ] {
        let r = app.canvass(&subject, &t, "canvassing", body).await;
        assert_eq!(r.status, 200, "{body}: {:?}", r.body);
    }

    let dpo = app.token("dpo");
    let placed = app
        .admin_post(
            &format!("/rights/{subject}"),
            &dpo,
            r#"{"kind":"objects_profiling","reference":"R-7","reason":"by letter"}"#,
        )
        .await;
    assert_eq!(placed.status, 200, "{:?}", placed.body);
    let r = app.admin_get_with(&format!("/sar/{subject}"), &dpo).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let placed_by = r.json()["restrictions"][0]["placed_by"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!placed_by.is_empty());
    let writes = r.json()["writes"].as_array().unwrap().clone();
    let fields: Vec<&Value> = writes.iter().map(|w| &w["fields"]).collect();
    assert_eq!(
        fields,
        [
            &serde_json::json!(["voting_intention"]),
            &serde_json::json!(["flags_add"])
        ]
    );
    for w in &writes {
        assert_eq!(w["purpose"], "canvassing");
        assert_eq!(w["recipient_role"], "canvasser");
        assert_eq!(w["dataset"], "voter");
    }
    let html = app
        .admin_get_with(&format!("/sar/{subject}?format=html"), &dpo)
        .await;
    let page = String::from_utf8_lossy(&html.body);
    assert!(page.contains("Writes about you (2)"), "{page}");
    assert!(page.contains("voting_intention") && page.contains("flags_add"));
    // The restriction is on the page, not who placed it (their identity is theirs).
    assert!(page.contains("objects_profiling") && page.contains("R-7"));
    assert!(!page.contains(&placed_by), "{placed_by}");
    app.stop().await;
}

/// Each subject of a page is told the fields that left about them, not every field the page
/// carried: a councillor's email and text campaign page has an email only for electors who
/// consented to email and a mobile only for those who consented to texts, and a report to
/// anyone else on that page must not say theirs went. The truth is the page itself: what
/// each record carried.
#[tokio::test]
async fn each_subject_is_reported_the_fields_that_left_about_them() {
    let app = spawn_app_with(AppOptions::default()).await;
    let r = app
        .get(
            "/voter/electors?per_page=200",
            Some(&app.token("councillor")),
            Some("email_sms"),
        )
        .await;
    assert_eq!(r.status, 200);
    let request = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let records = r.json()["records"].as_array().unwrap().clone();
    let keys = |rec: &Value| -> Vec<String> {
        let mut k: Vec<String> = rec.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let all: BTreeSet<String> = records.iter().flat_map(keys).collect();
    let fewer: Vec<&Value> = records
        .iter()
        .filter(|rec| keys(rec).len() < all.len())
        .collect();
    assert!(
        !fewer.is_empty() && fewer.len() < records.len(),
        "a page whose records carry different fields: {} of {}",
        fewer.len(),
        records.len()
    );
    let catalog = wardgate::catalog::Catalog::load(&app.dir.path().join("catalog.toml")).unwrap();
    for rec in fewer.iter().copied().take(3).chain(records.iter().take(3)) {
        let subject = rec["elector_id"].as_str().unwrap();
        let report = wardgate::sar::build(&app.audit_dir, &catalog, subject, vec![]).unwrap();
        let disclosed: Vec<&Vec<String>> = (report.disclosures.iter())
            .filter(|d| d.request_id == request)
            .map(|d| &d.fields)
            .collect();
        assert_eq!(disclosed, [&keys(rec)], "{subject}");
    }
    app.stop().await;
}

/// A datastore that cannot be reached is said to be so in the report, not left out as if it
/// held nothing about the person.
#[tokio::test]
async fn data_that_could_not_be_fetched_is_said_to_be_missing() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let app = spawn_app_with(AppOptions {
        upstream: Some(dead),
        ..Default::default()
    })
    .await;
    let r = app
        .admin_get_with("/sar/VF-0000001", &app.token("dpo"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let missing = &r.json()["current_data_missing"];
    assert_eq!(r.json()["current_data"], serde_json::json!({}));
    for dataset in ["voter", "membership"] {
        let why = missing[dataset].as_str().unwrap_or_default();
        assert!(
            !why.is_empty() && why != wardgate::sar::NOTHING_HELD,
            "{dataset}: {missing}"
        );
    }
    let html = app
        .admin_get_with("/sar/VF-0000001?format=html", &app.token("dpo"))
        .await;
    assert!(String::from_utf8_lossy(&html.body).contains("not included in this report"));
    app.stop().await;
}

/// One replica of several (its controls shared through Redis) reads only its own log, and
/// the page to be sent says so; a lone gateway's page does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_from_one_replica_of_several_says_it_is_incomplete() {
    const SAID: &str = "searched the access log of one gateway replica of several";
    let redis = common::RedisServer::start();
    for shared in [false, true] {
        let app = spawn_app_with(AppOptions {
            redis: shared.then(|| redis.url()),
            ..Default::default()
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while app.admin_get("/readyz").await.status != 200 {
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let json = app
            .admin_get_with("/sar/VF-0000001", &app.token("dpo"))
            .await;
        assert_eq!(json.json()["other_replicas_not_searched"], shared);
        let html = app
            .admin_get_with("/sar/VF-0000001?format=html", &app.token("dpo"))
            .await;
        assert_eq!(html.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&html.body).contains(SAID),
            shared,
            "shared controls: {shared}"
        );
        app.stop().await;
    }
}

/// An anonymous elector's entry is held but never disclosed, even to the DPO: the report says
/// it is held and withheld, not that nothing is held.
#[tokio::test]
async fn an_entry_held_but_never_disclosed_is_not_reported_as_nothing_held() {
    let app = spawn_app_with(AppOptions::default()).await;
    let page = common::datastore_body(app.upstream, "/electors?per_page=1000").await;
    let page: Value = serde_json::from_slice(&page).unwrap();
    let anonymous = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["markers"].as_array().unwrap().contains(&Value::from("N")))
        .and_then(|r| r["elector_id"].as_str())
        .expect("the demo register holds anonymous electors")
        .to_owned();
    // An elector nobody has looked up: what is held of them, where it came from and how
    // long it is kept, though nothing was ever disclosed.
    let unseen = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["markers"].as_array().unwrap().is_empty())
        // Never canvassed, and no attainer: fields present with no value.
        .filter(|r| {
            r["voting_intention"].is_null()
                && r["last_canvassed"].is_null()
                && r["canvass_issues"] == serde_json::json!([])
                && r["attainer_date"].is_null()
        })
        .find_map(|r| r["elector_id"].as_str())
        .expect("the demo register holds electors never canvassed")
        .to_owned();
    let r = app
        .admin_get_with(&format!("/sar/{unseen}"), &app.token("dpo"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = r.json();
    assert_eq!(r["disclosures"], serde_json::json!([]));
    assert_eq!(r["current_data"]["voter"]["elector_id"], unseen.as_str());
    assert_eq!(r["datasets"][0]["dataset"], "voter", "{r}");
    let kept: Vec<&str> = (r["retention"].as_array().unwrap().iter())
        .filter_map(|c| c["category"].as_str())
        .collect();
    assert!(
        kept.contains(&"identity") && kept.contains(&"address"),
        "{kept:?}"
    );
    // Each saying whether it is special category data.
    let identity = (r["retention"].as_array().unwrap().iter())
        .find(|c| c["category"] == "identity")
        .unwrap();
    assert_eq!(identity["special"], false, "{identity}");
    // A field with no value holds nothing of its category: no political opinion is kept of
    // someone never canvassed, though the record has the fields.
    let held = &r["current_data"]["voter"];
    assert_eq!(held.get("voting_intention"), Some(&Value::Null), "{held}");
    assert!(
        !kept.contains(&"political_opinion") && !kept.contains(&"attainer"),
        "{kept:?}"
    );
    let r = app
        .admin_get_with(&format!("/sar/{anonymous}"), &app.token("dpo"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["current_data"], serde_json::json!({}));
    // Nothing held that may be said is nothing to source.
    assert_eq!(r.json()["datasets"], serde_json::json!([]));
    assert_eq!(
        r.json()["current_data_missing"]["voter"],
        "held, withheld (protected)"
    );
    // The report's own read of the entry is no attempt on an anonymous elector: recorded as
    // what it is, and not counted by `protected_subject` (a threshold of one, whose alert
    // the DPO could not even classify, being its subject). The DPO's own read of it on the
    // data plane is counted, as anyone's.
    let read = format!("/voter/electors/{anonymous}");
    let fetch = (app.audit_records().into_iter())
        .find(|x| x["path"] == read.as_str())
        .expect("the report's read of the voter file");
    assert_eq!(
        fetch["withheld_target"], "protected_in_subject_access",
        "{fetch}"
    );
    let own = app
        .get(&read, Some(&app.token("dpo")), Some("sar_fulfilment"))
        .await;
    assert_eq!(own.status, 404, "{:?}", own.body);
    let own = app.audit_for(&own);
    assert_eq!(own["withheld_target"], "protected", "{own}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let alert = loop {
        let alerts = app
            .admin_get_with("/alerts", &app.token("security"))
            .await
            .json()["alerts"]
            .clone();
        if let Some(a) =
            (alerts.as_array().unwrap().iter()).find(|a| a["rule"] == "protected_subject")
        {
            break a.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no protected_subject alert: {alerts}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // Raised on the data plane's read, not the report's (a threshold of one: had the
    // report's counted, it would cite that, and the cooldown would keep this one quiet).
    assert_eq!(
        alert["evidence"],
        serde_json::json!([own["seq"]]),
        "{alert}"
    );
    app.stop().await;
}

/// A datastore whose first request is never answered (after saying it arrived) and whose
/// later ones are answered 404.
async fn datastore_hanging_once(
    arrived: std::sync::Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (arrived, first) = (arrived.clone(), first.clone());
            let svc = hyper::service::service_fn(move |_req| {
                let hang = first.swap(false, std::sync::atomic::Ordering::SeqCst);
                let arrived = arrived.clone();
                async move {
                    if hang {
                        arrived.notify_one();
                        std::future::pending::<()>().await;
                    }
                    http::Response::builder()
                        .status(404)
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(
                            br#"{"error":"not found"}"#,
                        )))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

/// Whether an audit record is a report's fetch of member `id`'s record, recorded as disclosed
/// to the DPO.
fn membership_fetch_of(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |r| {
        r["purpose"] == "sar_fulfilment"
            && r["dataset"] == "membership"
            && r["subjects"] == serde_json::json!([id])
            && r["status"] == 200
    }
}

/// The records of a report's fetch `rid`: its own, and a second saying it never left.
async fn said_not_sent(app: &common::TestApp, rid: &str) -> Vec<Value> {
    let records = app.audit_records_of(rid, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[1]["detail"]["withheld_after_recording"], "subject_access_report_not_sent",
        "{records:?}"
    );
    records
}

/// A datastore that answers every request with `body` (200, JSON), once `release` is
/// notified after each request's arrival (`arrived`).
async fn datastore_answering_when_released(
    body: bytes::Bytes,
    arrived: std::sync::Arc<tokio::sync::Notify>,
    release: std::sync::Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (body, arrived, release) = (body.clone(), arrived.clone(), release.clone());
            let svc = hyper::service::service_fn(move |_req| {
                let (body, arrived, release) = (body.clone(), arrived.clone(), release.clone());
                async move {
                    arrived.notify_one();
                    release.notified().await;
                    http::Response::builder()
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

/// A report whose caller hangs up while a fetch of its current data waits for that fetch's
/// own record (a disk that has stopped): the record lands once the disk moves, as a
/// disclosure to the DPO, and the fetch still gets the record saying it never left, so the
/// next report does not list it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_whose_report_is_dropped_while_its_record_waits_is_not_listed() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("disk");
    let Some(disk) = common::FreezableDisk::mount_or_skip(&mount) else {
        return;
    };
    let id = "M-000002";
    let (real, _stop) = common::start_datastore(100).await;
    let member = common::datastore_body(real, &format!("/members/{id}")).await;
    assert!(String::from_utf8_lossy(&member).contains(id), "{member:?}");
    let (arrived, release): (std::sync::Arc<tokio::sync::Notify>, _) = Default::default();
    let held = datastore_answering_when_released(
        member,
        std::sync::Arc::clone(&arrived),
        std::sync::Arc::clone(&release),
    )
    .await;
    let app = spawn_app_with(AppOptions {
        audit_dir: Some(mount.join("log")),
        edit: Some(Box::new(move |c: &mut wardgate::config::Config| {
            let m = c.datasets.get_mut("membership").unwrap();
            m.base = format!("http://{held}").parse().unwrap();
        })),
        ..Default::default()
    })
    .await;
    let (path, dpo) = (format!("/sar/{id}"), app.token("dpo"));
    // Boxed, so that dropping it drops the request (the caller hanging up).
    let mut report = Box::pin(app.admin_get_with(&path, &dpo));
    // Membership is asked first (datasets in name order): the disk stops before its answer.
    tokio::select! {
        r = &mut report => panic!("the report was answered: {:?}", r.body),
        () = arrived.notified() => {}
    }
    disk.freeze();
    release.notify_one();
    // The answer is filtered and its record queued behind the stopped disk (well within the
    // ten seconds after which a commit counts as stalled and the fetch fails); then the
    // caller hangs up.
    tokio::select! {
        r = &mut report => panic!("the report was answered: {:?}", r.body),
        () = tokio::time::sleep(Duration::from_secs(2)) => {}
    }
    drop(report);
    disk.thaw();
    let fetched = membership_fetch_of(id);
    let deadline = Instant::now() + Duration::from_secs(30);
    let fetch = loop {
        if let Some(r) = app.audit_records().into_iter().find(&fetched) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the membership fetch never recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(fetch["decision"], "allow", "{fetch}");
    let rid = fetch["request_id"].as_str().unwrap().to_owned();
    said_not_sent(&app, &rid).await;
    // The next report (the datastore answering at once) does not list it.
    let answering = async {
        loop {
            release.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let sar = tokio::select! {
        r = app.admin_get_with(&path, &dpo) => r,
        () = answering => unreachable!(),
    };
    assert_eq!(sar.status, 200, "{:?}", sar.body);
    let disclosures = sar.json()["disclosures"].clone();
    assert!(
        !(disclosures.as_array().unwrap().iter()).any(|d| d["request_id"] == rid.as_str()),
        "{disclosures}"
    );
    app.stop().await;
}

/// A report whose caller hangs up after its current data was fetched from one datastore
/// (recorded as disclosed to the DPO) and while another is still asked: the fetch that was
/// recorded gets a second record saying it never left, and the next report does not list it
/// as a disclosure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_not_sent_does_not_leave_its_fetches_listed_as_disclosed() {
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let voter = datastore_hanging_once(arrived.clone()).await;
    let app = spawn_app_with(AppOptions {
        edit: Some(Box::new(move |c: &mut wardgate::config::Config| {
            let v = c.datasets.get_mut("voter").unwrap();
            v.base = format!("http://{voter}").parse().unwrap();
            v.response_timeout = Duration::from_secs(120);
        })),
        ..Default::default()
    })
    .await;
    let (id, dpo) = ("M-000002", app.token("dpo"));
    let path = format!("/sar/{id}");
    // Membership is asked first (datasets in name order) and answers; the voter file hangs.
    tokio::select! {
        r = app.admin_get_with(&path, &dpo) => panic!("the report was answered: {:?}", r.body),
        () = arrived.notified() => {}
    }
    // The caller has gone. The membership fetch was recorded as disclosed...
    let fetched = membership_fetch_of(id);
    let fetch = (app.audit_records().into_iter())
        .find(&fetched)
        .expect("the membership fetch recorded");
    let rid = fetch["request_id"].as_str().unwrap().to_owned();
    // ...and is then said not to have left.
    let records = said_not_sent(&app, &rid).await;
    assert_eq!(records[1]["subjects"], serde_json::json!([id]));
    assert_eq!(records[1]["status"], 499, "{records:?}");
    // The next report (the voter file now answers) does not list it.
    let sar = app.admin_get_with(&path, &dpo).await;
    assert_eq!(sar.status, 200, "{:?}", sar.body);
    let disclosures = sar.json()["disclosures"].clone();
    assert!(
        !(disclosures.as_array().unwrap().iter()).any(|d| d["request_id"] == rid.as_str()),
        "{disclosures}"
    );
    // Its own fetch of the member's record, once it left, is listed by the one after.
    let later = app.admin_get_with(&path, &dpo).await;
    let listed = later.json()["disclosures"].as_array().unwrap().len();
    assert!(listed >= 1, "{}", later.json());
    app.stop().await;
}
