//! A running gateway reads its key files and policy pack again when they change, without a
//! signal (`server.file_check_interval`): a rotated key is taken up, its record says a file
//! change set it off, files that would not start the gateway are refused once (not at every
//! check) with what is in use staying, and files put back as in use are read and found
//! unchanged, with nothing recorded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use http_body_util::Full;
use serde_json::json;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<bytes::Bytes>,
>;

/// Written elsewhere and renamed into place, as the README asks of whatever renews files.
fn put(dir: &Path, to: &Path, text: &str) {
    let staged = dir.join("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, to).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_key_files_and_policies_are_read_without_a_signal_and_bad_ones_refused_once() {
    let (upstream, _store) = common::start_datastore(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let cfg = wardgate::demo::materialise(dir.path(), listen, admin, upstream).unwrap();
    common::server_setting(&cfg, "file_check_interval = \"200ms\"");
    let mut child = common::serve_process(&cfg);

    let config = wardgate::config::Config::load(&cfg).unwrap();
    let signing = config.signing.clone().unwrap();
    let old = wardgate::token::Signer::from_config(&signing).unwrap();
    let now = common::now();
    let old_token = wardgate::demo::mint_tokens(&old, now).unwrap()["councillor"].clone();
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let status = |token: String| {
        let client = client.clone();
        async move { common::listing_status(&client, listen, &token).await }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let until = |what: &'static str| {
        move |done: bool| {
            assert!(
                done || Instant::now() < deadline,
                "{what}: not within a minute"
            );
            done
        }
    };
    while status(old_token.clone()).await != 200 {
        until("serving")(false);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checks = || common::metric(&client, admin, "wardgate_file_checks_total");
    // `n` more checks made than at `from`.
    let after_checks = |from: u64, n: u64| async move {
        while !until("the checks")(checks().await >= from + n) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // The identity provider rotates the key under the same id, and nobody signals.
    let rotated = wardgate::token::generate_es256().unwrap();
    let key_file = (dir.path().join("keys")).join(format!("{}.pub.pem", wardgate::demo::KID));
    put(dir.path(), &key_file, &rotated.public_pem);
    let new = wardgate::token::Signer::from_pem(
        wardgate::demo::KID,
        signing.algorithm,
        rotated.private_pem.as_bytes(),
        &signing.issuer,
    )
    .unwrap();
    let new_token = wardgate::demo::mint_tokens(&new, now).unwrap()["councillor"].clone();
    while !until("the rotated key taken up")(status(new_token.clone()).await == 200) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old token verified and was cached before: it stops all the same.
    assert_eq!(status(old_token.clone()).await, 401);
    let taken = common::audited(dir.path(), "keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["route"], "auth.keys");
    assert_eq!(taken[0]["detail"]["trigger"], "files_changed");
    assert_eq!(taken[0]["detail"]["changed"], json!([wardgate::demo::KID]));

    // A key file that would not start the gateway: refused once, however many checks see it.
    put(
        dir.path(),
        &key_file,
        "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
    );
    let refused = || common::audited(dir.path(), "keys_reload_refused");
    while !until("the bad key file refused")(!refused().is_empty()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    after_checks(checks().await, 5).await;
    let refusals = refused();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["detail"]["trigger"], "files_changed");
    assert!(
        (refusals[0]["detail"]["error"].as_str().unwrap()).contains(&*key_file.to_string_lossy()),
        "{refusals:?}"
    );
    assert_eq!(status(new_token.clone()).await, 200, "the keys in use stay");
    assert_eq!(status(old_token.clone()).await, 401);

    // Put back as in use: read again and found unchanged, so nothing is recorded.
    let unchanged = || {
        common::metric(
            &client,
            admin,
            "wardgate_key_reloads_total{outcome=\"unchanged\"}",
        )
    };
    let before = unchanged().await;
    put(dir.path(), &key_file, &rotated.public_pem);
    while !until("the key file read again")(unchanged().await > before) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(common::audited(dir.path(), "keys_reloaded").len(), 1);
    assert_eq!(refused().len(), 1);
    assert_eq!(status(new_token.clone()).await, 200);

    // A policy file that does not parse, added to the pack: refused once; the pack in force
    // stays and still decides.
    let broken = dir.path().join("policies").join("broken.cedar");
    put(
        dir.path(),
        &broken,
        "permit (principal, action, resource) when {",
    );
    let policy_refused = || common::audited(dir.path(), "policy_reload_refused");
    while !until("the broken pack refused")(!policy_refused().is_empty()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    after_checks(checks().await, 5).await;
    let refusals = policy_refused();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["route"], "policy");
    assert_eq!(refusals[0]["detail"]["trigger"], "files_changed");
    assert!(
        (refusals[0]["detail"]["error"].as_str().unwrap()).contains("broken.cedar"),
        "{refusals:?}"
    );
    assert_eq!(status(new_token.clone()).await, 200);
    // Taken out again: the pack is the one in force, read and found unchanged.
    let unchanged = || {
        common::metric(
            &client,
            admin,
            "wardgate_policy_reloads_total{outcome=\"unchanged\"}",
        )
    };
    let before = unchanged().await;
    std::fs::remove_file(&broken).unwrap();
    while !until("the pack read again")(unchanged().await > before) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(policy_refused().len(), 1);
    assert!(common::audited(dir.path(), "policy_reloaded").is_empty());
    assert_eq!(status(new_token).await, 200);

    child.kill().unwrap();
    child.wait().unwrap();
}
