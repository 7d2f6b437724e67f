//! Every way a token can be wrong gets 401, a problem body naming the failed check, and an
//! audit record, over a real socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use base64::Engine;
use common::{Resp, TestApp, spawn_app};
use serde_json::json;

const LIST: &str = "/voter/electors?per_page=5";

/// Checks the refusal and its audit record; returns the record.
async fn expect_401(app: &TestApp, resp: Resp, reason: &str) -> serde_json::Value {
    assert_eq!(resp.status, 401, "{reason}: {:?}", resp.body);
    assert_eq!(resp.headers["content-type"], "application/problem+json");
    let body = resp.json();
    assert_eq!(
        body["type"],
        format!("urn:wardgate:problem:{}", reason.replace('_', "-")),
        "{body}"
    );
    assert!(body.get("records").is_none());
    let record = app.audit_for(&resp);
    assert_eq!(record["status"], 401);
    assert_eq!(record["decision"], "deny");
    assert_eq!(record["reason"], reason);
    assert_eq!(record["subjects"], json!([]));
    record
}

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn every_token_failure_is_refused_and_audited() {
    let app = spawn_app().await;
    let claims = app.claims("councillor", &["E05011391"], &["canvassing"]);

    // A valid token works, so every failure below is about the one thing it breaks.
    let ok = app
        .get(LIST, Some(&app.sign(&claims)), Some("canvassing"))
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);

    expect_401(
        &app,
        app.get(LIST, None, Some("canvassing")).await,
        "token_missing",
    )
    .await;
    let resp = app
        .request(
            http::Method::GET,
            LIST,
            &[
                ("authorization", "Basic Zm9vOmJhcg=="),
                ("x-purpose", "canvassing"),
            ],
            None,
        )
        .await;
    expect_401(&app, resp, "authorization_header_malformed").await;
    // Two credentials, the first good: a proxy in front could take the other.
    let good = format!("Bearer {}", app.sign(&claims));
    let resp = app
        .request(
            http::Method::GET,
            LIST,
            &[
                ("authorization", good.as_str()),
                ("authorization", "Bearer junk"),
                ("x-purpose", "canvassing"),
            ],
            None,
        )
        .await;
    expect_401(&app, resp, "authorization_header_malformed").await;
    expect_401(
        &app,
        app.get(LIST, Some("not-a-jwt"), Some("canvassing")).await,
        "token_malformed",
    )
    .await;

    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": wardgate::demo::KID})),
        b64(&claims)
    );
    expect_401(
        &app,
        app.get(LIST, Some(&none), Some("canvassing")).await,
        "token_algorithm_not_allowed",
    )
    .await;

    // Algorithm confusion: HS256 "signed" with the public key's bytes.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(wardgate::demo::KID.to_owned());
    let hs = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&app.public_pem()),
    )
    .unwrap();
    expect_401(
        &app,
        app.get(LIST, Some(&hs), Some("canvassing")).await,
        "token_algorithm_not_allowed",
    )
    .await;

    let mut c = claims.clone();
    c["iss"] = json!("https://evil.example");
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_issuer_invalid",
    )
    .await;

    let mut c = claims.clone();
    c["aud"] = json!("some-other-service");
    let record = expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_audience_invalid",
    )
    .await;
    assert!(record["caller"].is_null(), "{record}");

    // An expired token, its signature good, is still its holder's: the record names them.
    let mut c = claims.clone();
    c["exp"] = json!(common::now() - 3600);
    c["nbf"] = json!(common::now() - 7200);
    let record = expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_expired",
    )
    .await;
    assert_eq!(record["caller"]["subject"], claims["sub"], "{record}");
    // Expired and for another audience: nobody is named.
    c["aud"] = json!("some-other-service");
    let record = app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await;
    assert_eq!(record.status, 401);
    assert!(app.audit_for(&record)["caller"].is_null());

    let mut c = claims.clone();
    c["nbf"] = json!(common::now() + 3600);
    c["exp"] = json!(common::now() + 7200);
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_not_yet_valid",
    )
    .await;

    let mut c = claims.clone();
    c["exp"] = json!((common::now() + 600).to_string());
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_claims_invalid",
    )
    .await;

    let mut c = claims.clone();
    c.as_object_mut().unwrap().remove("nbf");
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_claims_invalid",
    )
    .await;

    // Without an issue time, or with one in the future, revoking the subject could not
    // reach the token: refused.
    let mut c = claims.clone();
    c.as_object_mut().unwrap().remove("iat");
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_claims_invalid",
    )
    .await;

    let mut c = claims.clone();
    c["iat"] = json!(common::now() + 3600);
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_issued_in_future",
    )
    .await;

    // Made to last past `auth.max_token_lifetime` (a day): said for what it is, so that an
    // identity provider's change of lifetime shows at once.
    let mut c = claims.clone();
    c["exp"] = json!(common::now() + 2 * 86_400);
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_lifetime_too_long",
    )
    .await;

    let unknown_kid = app.sign_raw(&claims, "no-such-key");
    expect_401(
        &app,
        app.get(LIST, Some(&unknown_kid), Some("canvassing")).await,
        "token_key_unknown",
    )
    .await;

    // Tampered signature: flip one character of the signature.
    let good = app.sign(&claims);
    let (head, sig) = good.rsplit_once('.').unwrap();
    let mut sig: Vec<u8> = sig.bytes().collect();
    sig[5] = if sig[5] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{head}.{}", String::from_utf8(sig).unwrap());
    expect_401(
        &app,
        app.get(LIST, Some(&tampered), Some("canvassing")).await,
        "token_signature_invalid",
    )
    .await;

    // Tampered claims: widen the areas of a genuinely signed token.
    let (h, rest) = good.split_once('.').unwrap();
    let (_, s) = rest.split_once('.').unwrap();
    let mut wider = claims.clone();
    wider["areas"] = json!(["E92000001"]);
    let forged = format!("{h}.{}.{s}", b64(&wider));
    expect_401(
        &app,
        app.get(LIST, Some(&forged), Some("canvassing")).await,
        "token_signature_invalid",
    )
    .await;

    // Claims naming areas, roles or purposes the registers do not define.
    let mut c = claims.clone();
    c["areas"] = json!(["E05000000"]);
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_names_unknown",
    )
    .await;
    let mut c = claims.clone();
    c["role"] = json!("superuser");
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_names_unknown",
    )
    .await;

    // A grant that has ended (a leaver's token that has not expired yet).
    let mut c = claims.clone();
    c["grant_expires"] = json!(common::now() - 60);
    let record = expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_expired",
    )
    .await;
    assert_eq!(record["caller"]["subject"], claims["sub"], "{record}");

    app.stop().await;
}

/// A token naming a key the gateway does not trust is refused as such, and the refusal does
/// not list the keys it does trust. (Which key ids exist is no secret: an identity provider
/// publishes them in its key set, so "unknown key" against "bad signature" tells a caller
/// nothing it could not read there.)
#[tokio::test]
async fn a_token_under_an_unknown_key_is_refused_without_naming_the_trusted_ones() {
    let app = spawn_app().await;
    let claims = app.claims("councillor", &["E05011391"], &["canvassing"]);
    let resp = app
        .get(
            LIST,
            Some(&app.sign_raw(&claims, "no-such-key")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.json()["type"],
        "urn:wardgate:problem:token-key-unknown"
    );
    let text = String::from_utf8_lossy(&resp.body).to_string();
    assert!(!text.contains(wardgate::demo::KID), "{text}");
    app.stop().await;
}

/// `SIGHUP` makes a running gateway read its key files again: a key replaced at the identity
/// provider stops its tokens at once (cached ones too) and the new one's verify; a key file
/// that fails the start-up checks is refused and the keys in use stay; each is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_keys_again_and_a_bad_key_file_changes_nothing() {
    use http_body_util::Full;
    use std::time::{Duration, Instant};

    let (upstream, _store) = common::start_datastore(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let cfg = wardgate::demo::materialise(dir.path(), listen, admin, upstream).unwrap();
    // Signals only: the check for changed files would take the rotation up by itself
    // (`file_reload_e2e`).
    common::server_setting(&cfg, "file_check_interval = \"off\"");
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
        async move { common::listing_status(&client, listen, &token).await }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(old_token.clone()).await != 200 {
        assert!(Instant::now() < deadline, "gateway did not serve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hangup = || common::hangup(&child);
    let audited = |reason: &str| {
        common::read_audit(&dir.path().join("audit"))
            .into_iter()
            .filter(|r| r["reason"] == reason)
            .count()
    };

    // The identity provider rotates the key under the same id.
    let rotated = wardgate::token::generate_es256().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(
        keys.join(format!("{}.pub.pem", wardgate::demo::KID)),
        &rotated.public_pem,
    )
    .unwrap();
    let new = wardgate::token::Signer::from_pem(
        wardgate::demo::KID,
        signing.algorithm,
        rotated.private_pem.as_bytes(),
        &signing.issuer,
    )
    .unwrap();
    let new_token = wardgate::demo::mint_tokens(&new, now).unwrap()["councillor"].clone();
    assert_eq!(
        status(new_token.clone()).await,
        401,
        "not before the reload"
    );
    hangup();
    // The record is in the file before it is durable, and the keys change once it is: the
    // new token is waited for, not asked once.
    while audited("keys_reloaded") == 0 || status(new_token.clone()).await != 200 {
        assert!(
            Instant::now() < deadline,
            "no reload recorded and in effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old token verified and was cached before: it stops all the same.
    assert_eq!(status(old_token.clone()).await, 401);
    let record = common::read_audit(&dir.path().join("audit"))
        .into_iter()
        .find(|r| r["reason"] == "keys_reloaded")
        .unwrap();
    // Rotated under the same id: the record says the key was replaced.
    let ids: Vec<&String> = record["detail"]["keys"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(ids, [wardgate::demo::KID]);
    assert_eq!(record["detail"]["changed"], json!([wardgate::demo::KID]));
    assert_eq!(record["detail"]["added"], json!([]));

    // A key file that would not start the gateway is refused; the keys in use stay.
    std::fs::write(
        keys.join(format!("{}.pub.pem", wardgate::demo::KID)),
        "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    hangup();
    while audited("keys_reload_refused") == 0 {
        assert!(Instant::now() < deadline, "no refusal recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(new_token).await, 200);
    assert_eq!(status(old_token).await, 401);
    assert_eq!(audited("keys_reloaded"), 1);

    child.kill().unwrap();
    child.wait().unwrap();
}

/// An ES256 key's public JWK, under `kid`.
fn jwk_of(private_pem: &str, kid: &str) -> serde_json::Value {
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, EncodingKey};
    let enc = EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).unwrap()
}

/// Writes the JWK set `keys` to `jwks`.
fn publish(jwks: &std::path::Path, keys: &[serde_json::Value]) {
    std::fs::write(jwks, json!({ "keys": keys }).to_string()).unwrap();
}

/// An app trusting the JWK set file `jwks` (written first, holding `other`'s key as
/// `idp-other`) beside the demo's PEM key file, for the demo's issuer.
async fn app_with_jwks_file(
    jwks: &std::path::Path,
    other: &wardgate::token::KeyPairPem,
    audit_dir: Option<std::path::PathBuf>,
) -> TestApp {
    publish(jwks, &[jwk_of(&other.private_pem, "idp-other")]);
    let at = jwks.to_owned();
    common::spawn_app_with(common::AppOptions {
        edit: Some(Box::new(move |cfg: &mut wardgate::config::Config| {
            cfg.auth.jwks_file = Some(at);
            cfg.auth.jwks_issuer = cfg.auth.issuers[0].clone();
        })),
        audit_dir,
        ..Default::default()
    })
    .await
}

/// Reads the keys again (`SIGHUP`'s `rekey::reload_keys`), which must be refused, and checks
/// that `token` (the demo key's) is refused after; the refusal's error.
async fn refused_reload_cuts_off(app: &TestApp, token: &str) -> String {
    let err = format!(
        "{:#}",
        wardgate::rekey::reload_keys(&app.gw).await.unwrap_err()
    );
    expect_401(
        app,
        app.get(LIST, Some(token), Some("canvassing")).await,
        "token_key_unknown",
    )
    .await;
    err
}

/// The demo's signing key as published with its private half, under an id of its own.
fn leaked_demo_key(app: &TestApp) -> serde_json::Value {
    let mut leaked = jwk_of(&app.private_pem, "published");
    leaked["d"] = "c2VjcmV0LWhhbGY".into();
    leaked
}

/// A key file read again (`SIGHUP`, here `rekey::reload_keys`) that publishes a key's
/// private half: refused, and that key dropped at once, with the copy of it pinned as the
/// demo's PEM key file; the other keys stay. Published again without its private half, it
/// is not trusted again in this run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_publishing_a_private_key_drops_that_key_and_its_pinned_copy() {
    let other = wardgate::token::generate_es256().unwrap();
    let files = tempfile::tempdir().unwrap();
    let jwks = files.path().join("jwks.json");
    let app = app_with_jwks_file(&jwks, &other, None).await;
    let token = app.token("canvasser");
    let listed = app.get(LIST, Some(&token), Some("canvassing")).await;
    assert_eq!(listed.status, 200);

    let idp_other = jwk_of(&other.private_pem, "idp-other");
    publish(&jwks, &[idp_other.clone(), leaked_demo_key(&app)]);
    let err = refused_reload_cuts_off(&app, &token).await;
    assert!(
        err.contains("`published`") && err.contains("private key material"),
        "{err}"
    );
    let records = app.audit_records();
    let refused: Vec<_> = (records.iter())
        .filter(|r| r["reason"] == "keys_reload_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["detail"]["trigger"], "signal");
    let dropped: Vec<_> = (records.iter())
        .filter(|r| r["reason"] == "keys_reloaded")
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["detail"]["trigger"], "leaked_key");
    assert_eq!(
        dropped[0]["detail"]["removed"],
        json!([wardgate::demo::KID])
    );
    let kept: Vec<&String> = (dropped[0]["detail"]["keys"].as_object().unwrap().keys()).collect();
    assert_eq!(kept, ["idp-other"]);

    // Published again without its private half (the PEM file still holds it): passed over
    // in both, and its tokens stay refused.
    publish(&jwks, &[idp_other, jwk_of(&app.private_pem, "published")]);
    wardgate::rekey::reload_keys(&app.gw).await.unwrap();
    expect_401(
        &app,
        app.get(LIST, Some(&token), Some("canvassing")).await,
        "token_key_unknown",
    )
    .await;
    let last = (app.audit_records().into_iter())
        .rfind(|r| r["reason"] == "keys_reloaded")
        .unwrap();
    let kept: Vec<String> = (last["detail"]["keys"].as_object().unwrap().keys().cloned()).collect();
    assert_eq!(kept, ["idp-other"]);
    app.stop().await;
}

/// A leaked key's drop that the audit log could not take (a full disk) is made at the next
/// read, whatever that read finds: here the file mended to the key's public half alone, a
/// set the gateway refuses for holding no usable key. (Needs root for the tmpfs, as CI is.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_keys_drop_the_log_could_not_take_is_made_at_the_next_read() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("audit");
    let Some(_tmpfs) = common::Tmpfs::mount_or_skip(&mount, "256k") else {
        return;
    };
    let other = wardgate::token::generate_es256().unwrap();
    let jwks = base.path().join("jwks.json");
    let app = app_with_jwks_file(&jwks, &other, Some(mount.clone())).await;
    let token = app.token("canvasser");
    assert_eq!(
        app.get(LIST, Some(&token), Some("canvassing")).await.status,
        200
    );

    common::fill(&mount);
    // The segment's last page may hold a record or two more: the log fails once it is used up.
    let mut answered = 0;
    while app.get(LIST, Some(&token), Some("canvassing")).await.status != 503 {
        answered += 1;
        assert!(answered < 8, "the log never failed");
    }
    publish(&jwks, &[leaked_demo_key(&app)]);
    let err = format!(
        "{:#}",
        wardgate::rekey::reload_keys(&app.gw).await.unwrap_err()
    );
    assert!(err.contains("could not be audited"), "{err}");
    assert!(
        !(common::read_audit(&mount).iter()).any(|r| r["reason"] == "keys_reloaded"),
        "the drop was recorded on a full disk"
    );
    std::fs::remove_file(mount.join("filler")).unwrap();
    publish(&jwks, &[jwk_of(&app.private_pem, "published")]);
    let err = refused_reload_cuts_off(&app, &token).await;
    assert!(
        err.contains("holds no keys") && err.contains("private half earlier in this run"),
        "{err}"
    );
    let dropped = (app.audit_records().into_iter())
        .rfind(|r| r["reason"] == "keys_reloaded")
        .unwrap();
    assert_eq!(dropped["detail"]["trigger"], "leaked_key");
    assert_eq!(dropped["detail"]["removed"], json!([wardgate::demo::KID]));
    app.stop().await;
}
