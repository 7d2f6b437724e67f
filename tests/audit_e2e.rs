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

use common::{AppOptions, Tmpfs, fill, spawn_app_with};

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
