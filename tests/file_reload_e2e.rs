//! A running gateway reads its key files and policy pack again when they change, without a
//! signal (`server.file_check_interval`): a rotated key is taken up, its record says a file
//! change set it off, and files that would not start the gateway are refused once (not at
//! every check), with what is in use staying.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use serde_json::json;

const LIST: &str = "/voter/electors?per_page=5";

/// Checks every 200 ms.
const CHECK: &str = "200ms";

/// Long enough for many checks: a change read at all has been read by then.
const SETTLE: Duration = Duration::from_secs(2);

fn audited(dir: &Path, reason: &str) -> Vec<serde_json::Value> {
    (common::read_audit(&dir.join("audit")).into_iter())
        .filter(|r| r["reason"] == reason)
        .collect()
}

async fn wait_for(what: &str, deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within the deadline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_key_files_and_policies_are_read_without_a_signal_and_bad_ones_refused_once() {
    let (upstream, _store) = common::start_datastore(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let cfg = wardgate::demo::materialise(dir.path(), listen, admin, upstream).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replacen(
        "[server]\n",
        &format!("[server]\nfile_check_interval = \"{CHECK}\"\n"),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let mut child = common::serve_process(&cfg);

    let config = wardgate::config::Config::load(&cfg).unwrap();
    let signing = config.signing.clone().unwrap();
    let old = wardgate::token::Signer::from_config(&signing).unwrap();
    let now = common::now();
    let old_token = wardgate::demo::mint_tokens(&old, now).unwrap()["councillor"].clone();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let status = |token: String| {
        let client = client.clone();
        async move {
            let req = http::Request::get(format!("http://{listen}{LIST}"))
                .header("authorization", format!("Bearer {token}"))
                .header("x-purpose", "canvassing")
                .body(Full::new(bytes::Bytes::new()))
                .unwrap();
            match client.request(req).await {
                Ok(resp) => {
                    let s = resp.status().as_u16();
                    let _ = resp.into_body().collect().await;
                    s
                }
                Err(_) => 0,
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(old_token.clone()).await != 200 {
        assert!(Instant::now() < deadline, "gateway did not serve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The identity provider rotates the key under the same id, and nobody signals.
    let rotated = wardgate::token::generate_es256().unwrap();
    let key_file = dir
        .path()
        .join("keys")
        .join(format!("{}.pub.pem", wardgate::demo::KID));
    std::fs::write(&key_file, &rotated.public_pem).unwrap();
    let new = wardgate::token::Signer::from_pem(
        wardgate::demo::KID,
        signing.algorithm,
        rotated.private_pem.as_bytes(),
        &signing.issuer,
    )
    .unwrap();
    let new_token = wardgate::demo::mint_tokens(&new, now).unwrap()["councillor"].clone();
    while status(new_token.clone()).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the rotated key was not taken up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old token verified and was cached before: it stops all the same.
    assert_eq!(status(old_token.clone()).await, 401);
    let taken = audited(dir.path(), "keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["route"], "auth.keys");
    assert_eq!(taken[0]["detail"]["trigger"], "files_changed");
    assert_eq!(taken[0]["detail"]["changed"], json!([wardgate::demo::KID]));

    // A key file that would not start the gateway: refused once, however many checks see it.
    std::fs::write(
        &key_file,
        "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let refused = || audited(dir.path(), "keys_reload_refused");
    wait_for("the bad key file's refusal", deadline, || {
        !refused().is_empty()
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    let refusals = refused();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["detail"]["trigger"], "files_changed");
    assert!(
        (refusals[0]["detail"]["error"].as_str().unwrap()).contains(&*key_file.to_string_lossy()),
        "{refusals:?}"
    );
    assert_eq!(status(new_token.clone()).await, 200, "the keys in use stay");
    assert_eq!(status(old_token.clone()).await, 401);

    // Put back as in use: read again, nothing changed, nothing recorded.
    std::fs::write(&key_file, &rotated.public_pem).unwrap();
    tokio::time::sleep(SETTLE).await;
    assert_eq!(audited(dir.path(), "keys_reloaded").len(), 1);
    assert_eq!(refused().len(), 1);

    // A policy file that does not parse, added to the pack: refused once; the pack in force
    // stays and still decides.
    let broken = dir.path().join("policies").join("broken.cedar");
    std::fs::write(&broken, "permit (principal, action, resource) when {").unwrap();
    let policy_refused = || audited(dir.path(), "policy_reload_refused");
    wait_for("the broken pack's refusal", deadline, || {
        !policy_refused().is_empty()
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    let refusals = policy_refused();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["route"], "policy");
    assert_eq!(refusals[0]["detail"]["trigger"], "files_changed");
    assert!(
        (refusals[0]["detail"]["error"].as_str().unwrap()).contains("broken.cedar"),
        "{refusals:?}"
    );
    assert_eq!(status(new_token.clone()).await, 200);
    // Taken out again: the pack is the one in force; nothing to record.
    std::fs::remove_file(&broken).unwrap();
    tokio::time::sleep(SETTLE).await;
    assert_eq!(policy_refused().len(), 1);
    assert!(audited(dir.path(), "policy_reloaded").is_empty());
    assert_eq!(status(new_token).await, 200);

    child.kill().unwrap();
    child.wait().unwrap();
}
