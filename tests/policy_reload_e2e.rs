//! `SIGHUP` reads the policy pack again (here `rekey::reload_policy`, which it runs): a pack
//! that loads, validates and passes its own tests (every policy named by one) is put in force,
//! audited first; any other is refused, audited, and the pack in force stays.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use common::{TestApp, spawn_app};

const SUSPENDED: &str = r#"// A branch whose access is suspended while it is investigated.
@id("test.branch-suspended")
forbid (principal, action, resource)
when { context.caller.unit == "SUSPENDED-BRANCH" };
"#;

const SUSPENDED_TEST: &str = r#"{
  "description": "a suspended branch's councillor lists nothing (test.branch-suspended)",
  "caller": { "role": "councillor", "unit": "SUSPENDED-BRANCH", "areas": ["E05011391"], "purposes": ["canvassing"] },
  "purpose": "canvassing",
  "action": "list",
  "dataset": "voter",
  "expect_policies": ["test.branch-suspended"]
}
"#;

/// A token for a councillor of `unit` never seen before (so that no decision the gateway
/// memoised for another answers for them).
fn councillor_of(app: &TestApp, unit: &str) -> String {
    let mut claims = app.claims("councillor", &["E05011391"], &["canvassing"]);
    claims["org_unit"] = unit.into();
    claims["sub"] = format!("cllr-{:016x}", rand::random::<u64>()).into();
    app.sign(&claims)
}

async fn list(app: &TestApp, token: &str) -> common::Resp {
    app.get(
        "/voter/electors?per_page=2",
        Some(token),
        Some("canvassing"),
    )
    .await
}

#[tokio::test]
async fn a_reload_puts_a_tested_pack_in_force_and_refuses_any_other() {
    let app = spawn_app().await;
    let pack = app.dir.path().join("policies");
    let suspended = councillor_of(&app, "SUSPENDED-BRANCH");
    let other = councillor_of(&app, "OTHER-BRANCH");
    let records = |reason: &str| {
        (app.audit_records().into_iter())
            .filter(|r| r["reason"] == reason)
            .collect::<Vec<_>>()
    };
    assert_eq!(list(&app, &suspended).await.status, 200);

    // A new forbid with its test: in force for the next request.
    std::fs::write(pack.join("suspensions.cedar"), SUSPENDED).unwrap();
    std::fs::write(
        pack.join("tests/deny/branch-suspended.json"),
        SUSPENDED_TEST,
    )
    .unwrap();
    wardgate::rekey::reload_policy(&app.gw).await.unwrap();
    let refused = list(&app, &suspended).await;
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    let last = app.audit_records().pop().unwrap();
    assert!(
        (last["policy_ids"].as_array().unwrap()).contains(&"test.branch-suspended".into()),
        "{last}"
    );
    assert_eq!(list(&app, &other).await.status, 200);
    let taken = records("policy_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["route"], "policy");
    assert_eq!(
        taken[0]["detail"]["added"],
        serde_json::json!(["test.branch-suspended"])
    );
    assert_eq!(taken[0]["detail"]["removed"], serde_json::json!([]));
    assert!(taken[0]["detail"]["tests"].as_u64().unwrap() > 200);
    // Nothing changed since: nothing recorded.
    wardgate::rekey::reload_policy(&app.gw).await.unwrap();
    assert_eq!(records("policy_reloaded").len(), 1);

    // A policy no test names: refused, and the pack in force stays (the other branch is not
    // suspended, the suspended one still is).
    let untested = SUSPENDED
        .replace("test.branch-suspended", "test.untested")
        .replace("SUSPENDED-BRANCH", "OTHER-BRANCH");
    std::fs::write(pack.join("untested.cedar"), untested).unwrap();
    let e = wardgate::rekey::reload_policy(&app.gw).await.unwrap_err();
    assert!(format!("{e:#}").contains("test.untested"), "{e:#}");
    let fresh = |unit| councillor_of(&app, unit);
    assert_eq!(list(&app, &fresh("OTHER-BRANCH")).await.status, 200);
    assert_eq!(list(&app, &fresh("SUSPENDED-BRANCH")).await.status, 403);
    std::fs::remove_file(pack.join("untested.cedar")).unwrap();

    // A test that no longer passes (its policy removed): refused.
    std::fs::remove_file(pack.join("suspensions.cedar")).unwrap();
    let e = wardgate::rekey::reload_policy(&app.gw).await.unwrap_err();
    assert!(format!("{e:#}").contains("branch-suspended"), "{e:#}");
    assert_eq!(list(&app, &fresh("SUSPENDED-BRANCH")).await.status, 403);

    // A policy that does not parse: refused, naming its file.
    std::fs::write(pack.join("suspensions.cedar"), "forbid (principal,").unwrap();
    let e = wardgate::rekey::reload_policy(&app.gw).await.unwrap_err();
    assert!(format!("{e:#}").contains("suspensions.cedar"), "{e:#}");
    assert_eq!(list(&app, &fresh("SUSPENDED-BRANCH")).await.status, 403);
    // Signalled again with the pack as it was refused (a key rotation's signal): nothing more
    // is recorded, and the pack in force stays.
    wardgate::rekey::reload_policy(&app.gw).await.unwrap();
    assert_eq!(list(&app, &fresh("SUSPENDED-BRANCH")).await.status, 403);
    let refusals = records("policy_reload_refused");
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    assert!(refusals.iter().all(|r| r["decision"] == "error"));

    // Put back as it was in force: nothing to do, nothing recorded.
    std::fs::write(pack.join("suspensions.cedar"), SUSPENDED).unwrap();
    wardgate::rekey::reload_policy(&app.gw).await.unwrap();
    assert_eq!(records("policy_reloaded").len(), 1);
    assert_eq!(list(&app, &fresh("SUSPENDED-BRANCH")).await.status, 403);
    app.stop().await;
}
