//! Research aggregates end to end: the research purpose gets counts per group and never a row,
//! counts match the register read independently (without the entries the policies withhold
//! from research), small cells never show, and a restriction takes a person out of every
//! count at once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::BTreeMap;

use common::{TestApp, datastore_body, spawn_app};
use http::StatusCode;
use serde_json::Value;

/// The defaults of `aggregates.min_cell` and `aggregates.round_to`.
const MIN_CELL: u64 = 10;
const ROUND_TO: u64 = 5;

async fn aggregate(app: &TestApp, query: &str) -> common::Resp {
    app.get(
        &format!("/voter/electors/aggregate?{query}"),
        Some(&app.token("analyst")),
        Some("research"),
    )
    .await
}

/// `{group value: records}` from an answer grouped by one field.
fn cells(resp: &common::Resp, field: &str) -> BTreeMap<String, u64> {
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.body);
    resp.json()["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["group"][field].to_string(),
                c["records"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn has(r: &Value, field: &str, value: &str) -> bool {
    r[field]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == value))
}

/// The datastore's whole register, every entry, as the gateway never shows it.
async fn register(app: &TestApp) -> Vec<Value> {
    let body = datastore_body(app.upstream, "/electors/export").await;
    std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What research may count, read off the register by DOMAIN.md's rules rather than the
/// gateway's policies: never an anonymous elector or an under-16, nor anyone restricted or
/// who asked for erasure (§6); with `opinion`, nor anyone whose para 22 notice stops the
/// processing of their political opinions. Every group, exactly.
fn counted(register: &[Value], field: &str, opinion: bool) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for r in register {
        let never = has(r, "markers", "N") || has(r, "flags", "under_16");
        let withheld = has(r, "flags", "restricted") || has(r, "flags", "erasure_requested");
        if never || withheld || (opinion && has(r, "flags", "para22_notice")) {
            continue;
        }
        if r.get(field).is_none() {
            continue;
        }
        *counts.entry(r[field].to_string()).or_insert(0) += 1;
    }
    counts
}

/// The answer those counts make: cells of at least `MIN_CELL`, rounded down to a multiple of
/// `ROUND_TO`.
fn shown(counts: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    counts
        .iter()
        .filter(|(_, n)| **n >= MIN_CELL)
        .map(|(k, n)| (k.clone(), n / ROUND_TO * ROUND_TO))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn research_gets_counts_never_rows() {
    let app = spawn_app().await;
    let analyst = app.token("analyst");
    // Row-level routes refuse the purpose, whoever asks.
    let some_id = register(&app).await[0]["elector_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        "/voter/electors".to_owned(),
        "/voter/electors/export".to_owned(),
        format!("/voter/electors/{some_id}"),
    ] {
        let r = app.get(&path, Some(&analyst), Some("research")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {:?}", r.body);
        assert!(
            r.json()["policy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "purpose.research-aggregate-only"),
            "{path}: {:?}",
            r.body
        );
    }

    // Counts per polling district: exactly the register's, less what research may not count.
    let reg = register(&app).await;
    let r = aggregate(&app, "by=local_authority,polling_district").await;
    let got = cells(&r, "polling_district");
    let exact = counted(&reg, "polling_district", false);
    assert!(got.len() > 10, "{got:?}");
    assert_eq!(got, shown(&exact));
    let body = r.json();
    assert_eq!(
        body["by"],
        serde_json::json!(["local_authority", "polling_district"])
    );
    assert_eq!(body["min_cell"], MIN_CELL);
    assert_eq!(body["rounded_to"], ROUND_TO);
    // Nothing else: no word of the cells left out or of the records withheld.
    let mut keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["by", "cells", "min_cell", "rounded_to"]);
    // The answer carries nothing but the groups and their counts.
    for cell in body["cells"].as_array().unwrap() {
        assert_eq!(cell.as_object().unwrap().len(), 2, "{cell}");
        assert_eq!(cell["group"].as_object().unwrap().len(), 2, "{cell}");
    }

    // Voting intention: a para 22 notice keeps a person out of any count of it.
    let r = aggregate(&app, "by=voting_intention").await;
    let exact = counted(&reg, "voting_intention", true);
    assert_eq!(cells(&r, "voting_intention"), shown(&exact));

    // Modelled support likewise: a score is a political opinion inferred. (An objection to
    // profiling strips the scores too.)
    let scores = aggregate(&app, "by=support_decile").await;
    let scored: Vec<Value> = (reg.iter())
        .filter(|r| !has(r, "flags", "objects_profiling"))
        .cloned()
        .collect();
    let exact_scores = counted(&scored, "support_decile", true);
    assert!(
        exact_scores.values().sum::<u64>()
            < counted(&scored, "support_decile", false)
                .values()
                .sum::<u64>(),
        "no para 22 notice among the scored"
    );
    assert_eq!(cells(&scores, "support_decile"), shown(&exact_scores));
    assert_eq!(
        app.audit_for(&scores)["detail"]["aggregate"]["records_counted"],
        exact_scores.values().sum::<u64>()
    );

    // The audit record: research under its lawful basis, the grouping field, no subject.
    let rec = app.audit_for(&r);
    assert_eq!(rec["route"], "voter.aggregate");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["purpose"], "research");
    assert_eq!(rec["lawful_basis"], "legitimate_interests");
    assert_eq!(rec["subjects"], serde_json::json!([]));
    assert_eq!(rec["fields"], serde_json::json!(["voting_intention"]));
    // The log keeps the exact figures the answer rounds.
    let summary = &rec["detail"]["aggregate"];
    assert_eq!(summary["records_counted"], exact.values().sum::<u64>());
    let in_cells: u64 = exact.values().filter(|n| **n >= MIN_CELL).sum();
    assert_eq!(summary["records_in_cells"], in_cells);
    assert_eq!(summary["filters"], serde_json::json!({}));
    assert!(rec["rows_withheld"].as_u64().unwrap() > 0, "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cell_small_enough_to_single_anyone_out_ever_shows() {
    let app = spawn_app().await;
    // Fields research may not see are no grouping: no person key or name leaves even as a
    // group, and the refusal says why (an answer with no cells would read as every cell
    // too small).
    for field in ["elector_id", "surname", "email", "postcode"] {
        let r = aggregate(&app, &format!("by={field}")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{field}: {:?}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(
            detail.contains(&format!("grouping `{field}`")) && detail.contains("may not see"),
            "{field}: {detail}"
        );
        let record = app.audit_for(&r);
        assert_eq!(record["decision"], "deny", "{field}");
        assert_eq!(record["subjects"], serde_json::json!([]), "{field}");
        assert!(
            !record["policy_ids"].as_array().unwrap().is_empty(),
            "{field}: {record}"
        );
    }
    // A score research may see, nearly one value per person: the cells of a few are
    // suppressed.
    let r = aggregate(&app, "ward=E05011391&by=support_score").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        app.audit_for(&r)["detail"]["aggregate"]["filters"],
        serde_json::json!({"ward": "E05011391"})
    );
    let summary = &app.audit_for(&r)["detail"]["aggregate"];
    assert!(
        summary["suppressed_cells"].as_u64().unwrap() > 10,
        "{summary}"
    );
    assert_eq!(r.json()["cells"], serde_json::json!([]));
    // Split two ways within one ward: some cells show, some are left out, and every one
    // shown holds at least `min_cell` records, its count rounded.
    let r = aggregate(
        &app,
        "local_authority=E08000035&ward=E05011391&by=polling_district,voting_intention",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let body = r.json();
    let summary = &app.audit_for(&r)["detail"]["aggregate"];
    assert!(
        summary["suppressed_cells"].as_u64().unwrap() > 0,
        "{summary}"
    );
    let shown = body["cells"].as_array().unwrap();
    assert!(!shown.is_empty(), "{body}");
    for cell in shown {
        let n = cell["records"].as_u64().unwrap();
        assert!(n >= MIN_CELL && n % ROUND_TO == 0, "{cell}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restriction_takes_a_person_out_of_every_count_at_once() {
    let app = spawn_app().await;
    let first = aggregate(&app, "by=local_authority,polling_district").await;
    let before = cells(&first, "polling_district");
    // Someone in the largest district, so that the cell stays above the threshold.
    let (district, n) = before.iter().max_by_key(|(_, n)| **n).unwrap();
    let reg = register(&app).await;
    let person = reg
        .iter()
        .find(|r| {
            r["polling_district"] == serde_json::from_str::<Value>(district).unwrap()
                && r["flags"].as_array().unwrap().is_empty()
                && r["markers"].as_array().unwrap().is_empty()
        })
        .unwrap();
    let body = r#"{"kind":"restricted","reference":"AGG-1","reason":"Art 18"}"#;
    let placed = app
        .admin_post(
            &format!("/rights/{}", person["elector_id"].as_str().unwrap()),
            &app.token("dpo"),
            body,
        )
        .await;
    assert!(placed.status.is_success(), "{:?}", placed.body);
    let r = aggregate(&app, "by=local_authority,polling_district").await;
    let after = cells(&r, "polling_district");
    // The answer rounds: the district's cell drops by a step or not at all; the log's exact
    // count drops by one.
    assert!(
        after[district] == *n || after[district] == n - ROUND_TO,
        "{n} then {}",
        after[district]
    );
    let exact = |r: &common::Resp| {
        app.audit_for(r)["detail"]["aggregate"]["records_counted"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(exact(&r), exact(&first) - 1);
    let others = |m: &BTreeMap<String, u64>| {
        m.iter()
            .filter(|(k, _)| *k != district)
            .map(|(k, v)| (k.clone(), *v))
            .collect::<Vec<_>>()
    };
    assert_eq!(others(&after), others(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_aggregate_requests_get_clear_errors() {
    let app = spawn_app().await;
    for (query, says) in [
        ("", "needs `by`"),
        ("by=", "not a field"),
        ("by=shoe_size", "not a field"),
        ("by=ward,ward", "twice"),
        // A district code is an authority's: alone, several districts would be one group.
        ("by=polling_district", "needs `local_authority`"),
        (
            "ward=E05011391&by=polling_district",
            "needs `local_authority`",
        ),
        (
            "by=ward,constituency,polling_district,postcode",
            "at most 3",
        ),
        ("by=ward&by=constituency", "more than once"),
        ("by=ward&page=2", "not accepted"),
        ("by=ward&ward=%3Bdrop", "must be"),
        // Area filters only: a postcode is a few households.
        ("by=ward&postcode=LS15+8AB", "not accepted"),
    ] {
        let r = aggregate(&app, query).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {:?}", r.body);
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{query}"
        );
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(says), "{query}: {detail}");
    }
    // Nor a membership status: the membership store aggregates by branch or CLP only.
    let r = app
        .get(
            "/membership/members/aggregate?by=branch&status=active",
            Some(&app.token("analyst")),
            Some("research"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    // The membership store keys its records by branch, and holds district codes all the same:
    // grouped by them alone, several authorities' districts would be one group there too.
    let r = app
        .get(
            "/membership/members/aggregate?by=polling_district",
            Some(&app.token("analyst")),
            Some("research"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("needs `local_authority`"), "{detail}");
    // Research's alone: not the analyst's profiling, not a councillor's canvassing.
    for (persona, purpose) in [("analyst", "profiling"), ("councillor", "canvassing")] {
        let r = app
            .get(
                "/voter/electors/aggregate?by=ward",
                Some(&app.token(persona)),
                Some(purpose),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{persona}: {:?}", r.body);
        // The refusal's record says what was asked.
        assert_eq!(
            app.audit_for(&r)["detail"]["aggregate"]["by"],
            serde_json::json!(["ward"]),
            "{persona}"
        );
        let ids = r.json()["policy_ids"].clone();
        assert!(
            ids.as_array()
                .unwrap()
                .iter()
                .any(|p| p == "purpose.aggregate-research-only"),
            "{persona}: {ids}"
        );
    }
}

/// The counts leave out anonymous electors and under-16s because the gateway does, not only
/// because the datastore was asked to: a datastore that ignores `exclude=protected` and sends
/// the whole register gets exactly the counts an honest one does (rounded in the answer, exact
/// in the audit record), and the record says how many rows were withheld.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datastore_that_sends_the_protected_changes_no_count() {
    let real = spawn_app().await;
    let everyone = datastore_body(real.upstream, "/electors/export").await;
    let open = datastore_body(real.upstream, "/electors/export?exclude=protected").await;
    let lines = |b: &bytes::Bytes| b.iter().filter(|c| **c == b'\n').count() as u64;
    let protected = lines(&everyone) - lines(&open);
    // Counted by the rules worked out in the test, not by the gateway's code (which the demo
    // datastore's `exclude=protected` uses): the datastore leaves out exactly those.
    let never = (std::str::from_utf8(&everyone).unwrap().lines())
        .filter(|l| common::never_disclosed(&serde_json::from_str(l).unwrap()))
        .count() as u64;
    assert_eq!(
        protected, never,
        "exclude=protected leaves out exactly those"
    );
    assert!(protected > 0, "the register holds protected entries");
    let upstream =
        common::fixed_upstream(everyone, "application/x-ndjson", std::time::Duration::ZERO).await;
    let app = common::spawn_app_with(common::AppOptions {
        upstream: Some(upstream),
        ..common::AppOptions::default()
    })
    .await;
    for by in ["constituency", "ward"] {
        let honest = aggregate(&real, &format!("by={by}")).await;
        let told = aggregate(&app, &format!("by={by}")).await;
        assert_eq!(cells(&told, by), cells(&honest, by), "by {by}");
        let logged = app.audit_for(&told);
        // Exactly: the answer's cells are rounded, the record's figures are not.
        let counted = |r: &Value| r["detail"]["aggregate"]["records_counted"].clone();
        assert_eq!(
            counted(&logged),
            counted(&real.audit_for(&honest)),
            "by {by}"
        );
        let withheld = logged["rows_withheld"].as_u64().unwrap();
        assert!(withheld >= protected, "{withheld} < {protected}: {logged}");
    }
    app.stop().await;
    real.stop().await;
}
