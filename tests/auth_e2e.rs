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
        "token_claims_invalid",
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
        "token_claims_invalid",
    )
    .await;
    let mut c = claims.clone();
    c["role"] = json!("superuser");
    expect_401(
        &app,
        app.get(LIST, Some(&app.sign(&c)), Some("canvassing")).await,
        "token_claims_invalid",
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

#[tokio::test]
async fn refusals_never_say_which_keys_exist() {
    let app = spawn_app().await;
    let claims = app.claims("councillor", &["E05011391"], &["canvassing"]);
    let resp = app
        .get(
            LIST,
            Some(&app.sign_raw(&claims, "no-such-key")),
            Some("canvassing"),
        )
        .await;
    let text = String::from_utf8_lossy(&resp.body).to_string();
    assert!(!text.contains(wardgate::demo::KID), "{text}");
    app.stop().await;
}
