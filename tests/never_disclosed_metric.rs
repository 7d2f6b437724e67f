//! `wardgate_upstream_never_disclosed_total`, which tells the operator a datastore sent an
//! entry that is never disclosed (an anonymous elector, an under-16), counted exactly. The
//! counter is the process's, so this binary holds the one test that reads it: in a binary
//! of many, another test's pages would move it too, and a rise could be theirs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use common::{TestApp, spawn_app};
use serde_json::{Value, json};

async fn count(app: &TestApp) -> f64 {
    let text = String::from_utf8_lossy(&app.admin_get("/metrics").await.body).into_owned();
    text.lines()
        .find(|l| l.starts_with("wardgate_upstream_never_disclosed_total{dataset=\"voter\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Each page that brings an anonymous elector, or an under-16 the datastore did not flag
/// (known by attainer date), counts it once; a page without one counts nothing.
#[tokio::test]
async fn each_never_disclosed_entry_a_datastore_sends_is_counted_once() {
    let real = spawn_app().await;
    let truth = common::datastore_body(real.upstream, "/electors?per_page=1000").await;
    let truth: Value = serde_json::from_slice(&truth).unwrap();
    let truth = truth["records"].as_array().unwrap();
    let anonymous = truth.iter().find(|r| r["markers"] == json!(["N"])).unwrap();
    let open = (truth.iter())
        .find(|r| r["markers"] == json!([]) && r["flags"] == json!([]) && r["ward"] == "E05011391")
        .unwrap();
    let mut child = open.clone();
    child["elector_id"] = json!("VF-CHILD-1");
    let today = time::OffsetDateTime::now_utc().date();
    child["attainer_date"] = json!((today + time::Duration::days(3 * 365)).to_string());
    for (records, per_request) in [
        (vec![anonymous, open], 1.0),
        (vec![&child, open], 1.0),
        (vec![anonymous, &child, open], 2.0),
        (vec![open], 0.0),
    ] {
        let n = records.len();
        let page = json!({"records": records, "page": 1, "per_page": n, "next_page": null});
        let app = common::app_serving(&page).await;
        let before = count(&app).await;
        for (role, purpose) in [("analyst", "profiling"), ("councillor", "canvassing")] {
            let r = app
                .get(
                    &format!("/voter/electors?per_page={n}"),
                    Some(&app.token(role)),
                    Some(purpose),
                )
                .await;
            assert_eq!(r.status, 200, "{role}: {:?}", r.body);
        }
        assert_eq!(count(&app).await - before, 2.0 * per_request, "{page}");
        app.stop().await;
    }
    real.stop().await;
}
