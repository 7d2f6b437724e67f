//! Header peeking and claim checks; the full matrix of token failures runs end to end in
//! `tests/auth_e2e.rs`.

use super::*;

#[test]
fn peek_reads_alg_and_kid_without_trusting_them() {
    let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k"}"#);
    let head = peek_header(&format!("{h}.e30.")).unwrap();
    assert_eq!(head.alg.as_deref(), Some("none"));
    assert_eq!(head.kid.as_deref(), Some("k"));
    for bad in ["", "a.b", "a.b.c.d", "!!!.e30.x"] {
        assert!(peek_header(bad).is_err(), "{bad}");
    }
}

/// A verifier with no keys (claims are checked directly) that knows one role, area and
/// purpose.
fn verifier(leeway_secs: u64) -> Verifier {
    Verifier {
        keys: Default::default(),
        key_sources: crate::config::AuthConfig {
            issuers: vec![],
            audience: "a".into(),
            leeway: std::time::Duration::from_secs(leeway_secs),
            max_token_lifetime: std::time::Duration::from_secs(86_400),
            algorithms: vec![Algorithm::ES256],
            keys: vec![],
            jwks_file: None,
            jwks_url: None,
            jwks_issuer: String::new(),
            issuer_roles: Default::default(),
            subject_prefixes: Default::default(),
        },
        jwks: Default::default(),
        jwks_wanted: Default::default(),
        jwks_signalled: Default::default(),
        jwks_fetched_at: std::time::Instant::now(),
        allowed: vec![Algorithm::ES256],
        audience: "a".into(),
        leeway_secs,
        max_lifetime_secs: 86_400,
        issuer_roles: HashMap::new(),
        subject_prefix: HashMap::new(),
        prefixes: Vec::new(),
        cache: TokenCache::default(),
        leaked: Default::default(),
        known: KnownNames {
            roles: ["canvasser".to_owned()].into(),
            areas: ["E05011391".to_owned()].into(),
            purposes: ["canvassing".to_owned()].into(),
        },
    }
}

/// Claims naming these, issued at 0 and valid until 10,000.
fn claims(role: &str, area: &str, purpose: &str) -> Claims {
    Claims {
        iss: "i".into(),
        aud: "a".into(),
        sub: "s".into(),
        jti: "j".into(),
        exp: 10_000,
        nbf: 0,
        iat: 0,
        role: role.into(),
        org_unit: "u".into(),
        areas: vec![area.into()],
        purposes: vec![purpose.into()],
        grant_expires: None,
    }
}

/// A canvasser's claims from `iss` for audience `wardgate`, valid for a minute from `now`.
fn live_claims(iss: &str, sub: &str, now: i64) -> Claims {
    Claims {
        iss: iss.into(),
        aud: "wardgate".into(),
        sub: sub.into(),
        exp: now + 60,
        nbf: now - 1,
        iat: now,
        ..claims("canvasser", "E05011391", "canvassing")
    }
}

#[test]
fn claims_naming_unknown_things_are_refused() {
    let v = verifier(0);
    assert!(
        v.principal(claims("canvasser", "E05011391", "canvassing"), "i", 5,)
            .is_ok()
    );
    assert_eq!(
        v.principal(claims("admin", "E05011391", "canvassing"), "i", 5,),
        Err(AuthFailure::UnknownName)
    );
    assert_eq!(
        v.principal(claims("canvasser", "E92000001", "canvassing"), "i", 5,),
        Err(AuthFailure::UnknownName)
    );
    assert_eq!(
        v.principal(claims("canvasser", "E05011391", "sale"), "i", 5,),
        Err(AuthFailure::UnknownName)
    );
    // A grant that ended: the claims are read (whose token it is), the end is judged after.
    let mut c = claims("canvasser", "E05011391", "canvassing");
    c.grant_expires = Some(4);
    let p = v.principal(c, "i", 5).unwrap();
    assert!(v.ends_at(&p) < 5);
    // The breach detector's name in the controls journal is no caller's.
    let mut c = claims("canvasser", "E05011391", "canvassing");
    c.sub = crate::watch::ACTOR.into();
    assert_eq!(v.principal(c, "i", 5), Err(AuthFailure::InvalidClaims));
    // Nor the names breach detection counts callers it does not know under: such a token
    // would share an address's windows and alert marks.
    for name in ["addr:203.0.113.5", "unknown"] {
        let mut c = claims("canvasser", "E05011391", "canvassing");
        c.sub = name.into();
        assert_eq!(
            v.principal(c, "i", 5),
            Err(AuthFailure::InvalidClaims),
            "{name}"
        );
    }
    // Issued after `now`: a revocation of the subject placed now would not reach it.
    let mut c = claims("canvasser", "E05011391", "canvassing");
    c.iat = 6;
    assert_eq!(v.principal(c, "i", 5), Err(AuthFailure::IssuedInFuture));
    let mut c = claims("canvasser", "E05011391", "canvassing");
    c.sub = " ".into();
    assert_eq!(v.principal(c, "i", 5), Err(AuthFailure::InvalidClaims));
    // Made to last longer than `auth.max_token_lifetime` (a day here): refused; a day is not.
    let mut c = claims("canvasser", "E05011391", "canvassing");
    c.exp = 86_401;
    assert_eq!(v.principal(c, "i", 5), Err(AuthFailure::LifetimeTooLong));
    let mut c = claims("canvasser", "E05011391", "canvassing");
    c.exp = 86_400;
    assert!(v.principal(c, "i", 5).is_ok());
}

/// A verifier reading one ES256 key from a JWKS file (issuer `https://idp`, audience
/// `wardgate`), its configuration, the signer for that key, and the directory holding it.
fn jwks_verifier() -> (
    tempfile::TempDir,
    crate::config::AuthConfig,
    Verifier,
    crate::token::Signer,
) {
    let dir = tempfile::tempdir().unwrap();
    let kp = crate::token::generate_es256().unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.private_pem.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("idp-1".into());
    jwk.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::ES256);
    let set = serde_json::json!({ "keys": [jwk] });
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_vec(&set).unwrap()).unwrap();
    let cfg = crate::config::AuthConfig {
        issuers: vec!["https://idp".into()],
        audience: "wardgate".into(),
        leeway: std::time::Duration::from_secs(0),
        max_token_lifetime: std::time::Duration::from_secs(86_400),
        algorithms: vec![Algorithm::ES256],
        keys: vec![],
        jwks_file: Some(path),
        jwks_url: None,
        jwks_issuer: "https://idp".into(),
        issuer_roles: Default::default(),
        subject_prefixes: Default::default(),
    };
    let known = KnownNames {
        roles: ["canvasser".to_owned()].into(),
        areas: ["E05011391".to_owned()].into(),
        purposes: ["canvassing".to_owned()].into(),
    };
    let v = Verifier::from_config(&cfg, known, None).unwrap();
    let signer = crate::token::Signer::from_pem(
        "idp-1",
        Algorithm::ES256,
        kp.private_pem.as_bytes(),
        "https://idp",
    )
    .unwrap();
    (dir, cfg, v, signer)
}

#[test]
fn keys_from_a_jwks_file_verify_tokens() {
    let (dir, cfg, v, signer) = jwks_verifier();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = signer.sign(&live_claims("https://idp", "s", now)).unwrap();
    assert_eq!(v.verify(&token, now).unwrap().subject, "s");

    // A JWKS key with an algorithm the configuration does not allow stops start-up.
    let mut cfg2 = cfg.clone();
    cfg2.algorithms = vec![Algorithm::RS256];
    assert!(Verifier::from_config(&cfg2, KnownNames::default(), None).is_err());

    // So does a JWKS file with no keys (and no PEM keys beside it): it says which file.
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys":[]}"#).unwrap();
    let mut cfg3 = cfg.clone();
    cfg3.jwks_file = Some(empty.clone());
    let err = Verifier::from_config(&cfg3, KnownNames::default(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("holds no keys") && err.contains(&empty.display().to_string()),
        "{err}"
    );
}

/// The scheme's name is read in any case (RFC 9110: `BEARER` is `Bearer`), and nothing
/// else is taken for it.
#[test]
fn the_bearer_scheme_is_read_in_any_case() {
    let (_dir, _cfg, v, signer) = jwks_verifier();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = signer.sign(&live_claims("https://idp", "s", now)).unwrap();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let h = format!("{scheme} {token}").into_bytes();
        assert_eq!(
            v.verify_header(Some(&h), now).unwrap().subject,
            "s",
            "{scheme}"
        );
    }
    for bad in [
        format!("Bearer{token}"),
        format!("Basic {token}"),
        format!("Bearerx {token}"),
        format!("é {token}"),
        "Bear".to_owned(),
    ] {
        assert_eq!(
            v.verify_header(Some(bad.as_bytes()), now).err(),
            Some(AuthFailure::MalformedHeader),
            "{bad}"
        );
    }
}

/// A leaver's token (its `exp` or `grant_expires` past, everything else good) is refused,
/// and says whose it is; a token that fails anything else says nothing.
#[test]
fn an_ended_token_is_refused_but_names_its_caller() {
    let (_dir, _cfg, v, signer) = jwks_verifier();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let header = |token: &str| format!("Bearer {token}").into_bytes();
    let mut expired = live_claims("https://idp", "leaver", now - 600);
    expired.exp = now - 60;
    let mut grant_ended = live_claims("https://idp", "leaver", now);
    grant_ended.grant_expires = Some(now - 1);
    for claims in [expired, grant_ended] {
        let h = header(&signer.sign(&claims).unwrap());
        assert_eq!(
            v.verify_header(Some(&h), now).err(),
            Some(AuthFailure::Expired)
        );
        let (failure, caller) = v.verify_header_naming(Some(&h), now).unwrap_err();
        assert_eq!(failure, AuthFailure::Expired);
        let caller = caller.unwrap();
        assert_eq!(
            (caller.subject.as_str(), caller.role.as_str()),
            ("leaver", "canvasser")
        );
    }
    // Expired and for another audience, or tampered with: nobody is named.
    let mut elsewhere = live_claims("https://idp", "leaver", now - 600);
    elsewhere.exp = now - 60;
    elsewhere.aud = "another-service".into();
    let h = header(&signer.sign(&elsewhere).unwrap());
    let (failure, caller) = v.verify_header_naming(Some(&h), now).unwrap_err();
    assert_eq!(failure, AuthFailure::WrongAudience);
    assert!(caller.is_none());
    // Several audiences (RFC 7519 allows an array; Keycloak sends one): taken when the
    // gateway's is among them, refused as another audience's when it is not.
    let mut several = live_claims("https://idp", "s", now);
    several.aud = Audience(vec!["account".into(), "wardgate".into()]);
    assert_eq!(
        v.verify(&signer.sign(&several).unwrap(), now)
            .unwrap()
            .subject,
        "s"
    );
    several.aud = Audience(vec!["account".into(), "another-service".into()]);
    assert_eq!(
        v.verify(&signer.sign(&several).unwrap(), now).err(),
        Some(AuthFailure::WrongAudience)
    );
    let mut expired = live_claims("https://idp", "leaver", now - 600);
    expired.exp = now - 60;
    let token = signer.sign(&expired).unwrap();
    // The leaver's claims under the signature of someone else's token.
    let mut other = expired.clone();
    other.sub = "someone-else".into();
    let signed_for_other = signer.sign(&other).unwrap();
    let (_, sig) = signed_for_other.rsplit_once('.').unwrap();
    let (rest, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{rest}.{sig}");
    let (failure, caller) = v
        .verify_header_naming(Some(&header(&forged)), now)
        .unwrap_err();
    assert_eq!(failure, AuthFailure::BadSignature);
    assert!(caller.is_none());
}

#[test]
fn the_token_cache_never_outlives_the_token() {
    let cache = TokenCache::default();
    let p = std::sync::Arc::new(Principal {
        subject: "s".into(),
        token_id: "t".into(),
        role: "r".into(),
        unit: "u".into(),
        areas: vec![],
        purposes: vec![],
        expires_at: 1_000,
        issued_at: 0,
        grant_expires_at: Some(900),
        key_id: String::new(),
        key_sha256: String::new(),
    });
    cache.put("tok", &p, 100, 0);
    let hit = cache.get("tok", 101);
    assert_eq!(hit.as_ref().map(|p| p.subject.as_str()), Some("s"));
    assert!(
        hit.is_some_and(|hit| std::sync::Arc::ptr_eq(&hit, &p)),
        "a hit is the principal cached, not a copy"
    );
    assert!(cache.get("tok", 400).is_none(), "at most CACHE_FOR seconds");
    cache.put("tok", &p, 800, 0);
    assert!(cache.get("tok", 850).is_some());
    assert!(
        cache.get("tok", 900).is_none(),
        "not past the end of the grant"
    );
    assert!(cache.get("tok2", 101).is_none(), "only the same bytes hit");
}

#[test]
fn a_token_ends_where_verification_would_refuse_it() {
    let v = verifier(30);
    let mut p = Principal {
        subject: "s".into(),
        token_id: "t".into(),
        role: "r".into(),
        unit: "u".into(),
        areas: vec![],
        purposes: vec![],
        expires_at: 1_000,
        issued_at: 0,
        grant_expires_at: None,
        key_id: String::new(),
        key_sha256: String::new(),
    };
    // `exp` with the leeway, as jsonwebtoken accepts it (refused once `exp < now - leeway`).
    assert_eq!(v.ends_at(&p), 1_030);
    // `grant_expires` without: refused from that second on.
    p.grant_expires_at = Some(900);
    assert_eq!(v.ends_at(&p), 899);
    p.grant_expires_at = Some(5_000);
    assert_eq!(v.ends_at(&p), 1_030);
}

#[test]
fn an_issue_time_counts_from_the_earliest_the_leeway_allows() {
    let v = verifier(30);
    let claims = |iat: i64| Claims {
        iat,
        ..claims("canvasser", "E05011391", "canvassing")
    };
    // An issuer 20 s ahead: accepted, and issued no later than a revocation placed now
    // (`issued_at <= now`) would need.
    let p = v.principal(claims(1_020), "i", 1_000).unwrap();
    assert_eq!(p.issued_at, 990);
    // Beyond the leeway: refused.
    assert_eq!(
        v.principal(claims(1_031), "i", 1_000),
        Err(AuthFailure::IssuedInFuture)
    );
}

const PARTY: &str = "https://sso.party";
const PARTNER: &str = "https://sso.partner";

/// Two trusted identity providers, the party's and a partner's, each with its own ES256 key
/// (`party-1`, `partner-1`): their configuration, with no roles limited and no prefixes, and a
/// signer per key id.
fn two_issuers(
    dir: &std::path::Path,
) -> (
    crate::config::AuthConfig,
    HashMap<&'static str, crate::token::Signer>,
) {
    let mut keys = Vec::new();
    let mut signers = HashMap::new();
    for (kid, issuer) in [("party-1", PARTY), ("partner-1", PARTNER)] {
        let kp = crate::token::generate_es256().unwrap();
        let path = dir.join(format!("{kid}.pem"));
        std::fs::write(&path, &kp.public_pem).unwrap();
        keys.push(crate::config::KeyFile {
            kid: kid.into(),
            algorithm: Algorithm::ES256,
            public_key_file: path,
            issuer: issuer.into(),
        });
        let signer = crate::token::Signer::from_pem(
            kid,
            Algorithm::ES256,
            kp.private_pem.as_bytes(),
            issuer,
        )
        .unwrap();
        signers.insert(kid, signer);
    }
    let cfg = crate::config::AuthConfig {
        issuers: vec![PARTY.into(), PARTNER.into()],
        audience: "wardgate".into(),
        leeway: std::time::Duration::from_secs(0),
        max_token_lifetime: std::time::Duration::from_secs(86_400),
        algorithms: vec![Algorithm::ES256],
        keys,
        jwks_file: None,
        jwks_url: None,
        jwks_issuer: String::new(),
        issuer_roles: Default::default(),
        subject_prefixes: Default::default(),
    };
    (cfg, signers)
}

/// Two trusted identity providers, each with its own key: a token verifies only under the
/// issuer of the key that signed it, so the partner's key cannot mint the party's own tokens.
#[test]
fn a_key_signs_only_for_its_own_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (party, partner) = (PARTY, PARTNER);
    let (cfg, signers) = two_issuers(dir.path());
    let known = || KnownNames {
        roles: ["canvasser".to_owned(), "dpo".to_owned()].into(),
        areas: ["E05011391".to_owned()].into(),
        purposes: ["canvassing".to_owned()].into(),
    };
    let v = Verifier::from_config(&cfg, known(), None).unwrap();
    let token = |kid: &str, iss: &str| {
        signers[kid]
            .sign(&live_claims(iss, &format!("{kid} as {iss}"), now))
            .unwrap()
    };
    assert!(v.verify(&token("party-1", party), now).is_ok());
    assert!(v.verify(&token("partner-1", partner), now).is_ok());
    // Both issuers are trusted, but neither key answers for the other's.
    assert_eq!(
        v.verify(&token("partner-1", party), now).err(),
        Some(AuthFailure::WrongIssuer)
    );
    assert_eq!(
        v.verify(&token("party-1", partner), now).err(),
        Some(AuthFailure::WrongIssuer)
    );

    // Trusted for canvassers only, the partner cannot mint a DPO; the party still can.
    let limited = crate::config::AuthConfig {
        issuer_roles: [(partner.to_owned(), vec!["canvasser".to_owned()])].into(),
        ..cfg.clone()
    };
    let v = Verifier::from_config(&limited, known(), None).unwrap();
    let as_role = |kid: &str, iss: &str, role: &str| {
        let claims = Claims {
            role: role.into(),
            ..live_claims(iss, &format!("{role} from {kid}"), now)
        };
        signers[kid].sign(&claims).unwrap()
    };
    assert!(
        v.verify(&as_role("partner-1", partner, "canvasser"), now)
            .is_ok()
    );
    assert_eq!(
        v.verify(&as_role("partner-1", partner, "dpo"), now).err(),
        Some(AuthFailure::RoleNotFromIssuer)
    );
    assert!(v.verify(&as_role("party-1", party, "dpo"), now).is_ok());
    // A role the catalogue does not define stops the start, naming it.
    let unknown = crate::config::AuthConfig {
        issuer_roles: [(partner.to_owned(), vec!["admiral".to_owned()])].into(),
        ..cfg
    };
    let e = Verifier::from_config(&unknown, known(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`admiral`") && e.contains(partner), "{e}");
}

/// A partner's identity provider names its callers behind its own prefix, so it cannot sign
/// as one of the party's own (audited, revoked and counted as them); nor can the party's
/// provider name a subject in the partner's namespace.
#[test]
fn each_issuer_names_its_own_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (party, partner) = (PARTY, PARTNER);
    let (cfg, by_kid) = two_issuers(dir.path());
    let cfg = crate::config::AuthConfig {
        subject_prefixes: [(partner.to_owned(), "partner:".to_owned())].into(),
        ..cfg
    };
    let signers: HashMap<&str, _> =
        [(party, &by_kid["party-1"]), (partner, &by_kid["partner-1"])].into();
    let known = KnownNames {
        roles: ["canvasser".to_owned()].into(),
        areas: ["E05011391".to_owned()].into(),
        purposes: ["canvassing".to_owned()].into(),
    };
    let v = Verifier::from_config(&cfg, known, None).unwrap();
    let verified = |iss: &str, sub: &str, jti: &str| {
        let claims = Claims {
            jti: jti.into(),
            ..live_claims(iss, sub, now)
        };
        v.verify(&signers[iss].sign(&claims).unwrap(), now)
    };
    let from = |iss: &str, sub: &str| verified(iss, sub, "t-1").map(|p| p.subject.clone());
    // The same `sub` from each provider is two callers.
    assert_eq!(from(party, "alice").unwrap(), "alice");
    assert_eq!(from(partner, "alice").unwrap(), "partner:alice");
    // The party's provider cannot name the partner's callers, nor the gateway's own...
    for theirs in ["partner:alice", "local:root"] {
        assert_eq!(
            from(party, theirs).err(),
            Some(AuthFailure::NameNotFromIssuer),
            "{theirs}"
        );
    }
    // ...and token ids are kept apart the same way: revoking the partner's token `t-1`
    // cannot revoke the party's, nor the other way round.
    assert_eq!(verified(party, "alice", "t-1").unwrap().token_id, "t-1");
    assert_eq!(
        verified(partner, "alice", "t-1").unwrap().token_id,
        "partner:t-1"
    );
    assert_eq!(
        verified(party, "alice", "partner:t-1").err(),
        Some(AuthFailure::NameNotFromIssuer)
    );
    // ...and the partner's cannot step out of its namespace by naming a prefixed one.
    assert_eq!(
        from(partner, "partner:alice").unwrap(),
        "partner:partner:alice"
    );
    // A prefixed subject must still be one `/revocations` can name (256 bytes at most).
    let long = "b".repeat(256 - "partner:".len());
    assert_eq!(from(partner, &long).unwrap(), format!("partner:{long}"));
    assert_eq!(
        from(partner, &format!("{long}b")).err(),
        Some(AuthFailure::InvalidClaims)
    );
    assert!(from(party, &format!("{long}bbbbbbbb")).is_ok());
}

/// A key that parses but cannot verify its algorithm's signatures stops the start, naming
/// the key and its file: a P-384 key configured as ES256, and RSA moduli out of 2048..=4096
/// bits (which would load, then refuse every token as malformed or badly signed).
#[test]
fn keys_that_cannot_verify_their_algorithm_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = two_issuers(dir.path());
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    std::fs::write(&cfg.keys[0].public_key_file, p384.public_key_pem()).unwrap();
    let err = Verifier::from_config(&cfg, KnownNames::default(), None)
        .err()
        .unwrap()
        .to_string();
    let file = cfg.keys[0].public_key_file.display().to_string();
    assert!(
        err.contains("party-1") && err.contains(&file) && err.contains("cannot verify ES256"),
        "{err}"
    );

    use base64::Engine;
    let jwks = dir.path().join("rsa.json");
    let rsa = |bytes: usize| {
        // A modulus of exactly `bytes * 8` bits (odd, top bit set): its size is what is
        // judged, as a verifier would meet it.
        let mut n = vec![0x5a_u8; bytes];
        n[0] = 0xc1;
        n[bytes - 1] = 0x01;
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n);
        let set = serde_json::json!({ "keys": [
            { "kty": "RSA", "kid": "idp-rsa", "alg": "RS256", "n": n, "e": "AQAB" }
        ] });
        std::fs::write(&jwks, serde_json::to_vec(&set).unwrap()).unwrap();
        let cfg = jwks_only(&cfg, &jwks, &[Algorithm::RS256]);
        Verifier::from_config(&cfg, KnownNames::default(), None).map(drop)
    };
    assert!(rsa(256).is_ok(), "2048 bits");
    assert!(rsa(512).is_ok(), "4096 bits");
    for (bytes, says) in [(128, "1024 bits"), (1024, "")] {
        let err = rsa(bytes).err().unwrap().to_string();
        assert!(
            err.contains("idp-rsa") && err.contains("cannot verify RS256") && err.contains(says),
            "{bytes} bytes: {err}"
        );
    }

    // An Ed25519 key is 32 bytes: a shorter one panicked inside jsonwebtoken (at start, and
    // in the task that reloads), a longer one was read as its first 32.
    let ed = |bytes: usize| {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(vec![7u8; bytes]);
        let set = serde_json::json!({ "keys": [
            { "kty": "OKP", "crv": "Ed25519", "kid": "idp-ed", "alg": "EdDSA", "x": x }
        ] });
        std::fs::write(&jwks, serde_json::to_vec(&set).unwrap()).unwrap();
        let cfg = jwks_only(&cfg, &jwks, &[Algorithm::ES256, Algorithm::EdDSA]);
        std::panic::catch_unwind(|| Verifier::from_config(&cfg, KnownNames::default(), None))
            .expect("no panic")
            .map(drop)
    };
    for bytes in [3, 31, 33, 64] {
        let err = ed(bytes).err().unwrap().to_string();
        assert!(
            err.contains("idp-ed") && err.contains(&jwks.display().to_string()),
            "{bytes} bytes: {err}"
        );
    }
    // A key of small order verifies a signature made without any private key (the identity
    // point: R the identity and s zero, for any message), under the check jsonwebtoken makes:
    // refused, saying so. The identity, and the point of order two.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut order_two = [0xff_u8; 32];
    (order_two[0], order_two[31]) = (0xec, 0x7f);
    for weak in [identity, order_two] {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(weak);
        let set = serde_json::json!({ "keys": [
            { "kty": "OKP", "crv": "Ed25519", "kid": "idp-ed", "alg": "EdDSA", "x": x }
        ] });
        std::fs::write(&jwks, serde_json::to_vec(&set).unwrap()).unwrap();
        let cfg = jwks_only(&cfg, &jwks, &[Algorithm::EdDSA]);
        let err = format!(
            "{:#}",
            Verifier::from_config(&cfg, KnownNames::default(), None)
                .err()
                .expect("a weak key refused")
        );
        assert!(err.contains("idp-ed") && err.contains("weak"), "{err}");
    }
    let good = ed25519_public_key();
    let set = serde_json::json!({ "keys": [
        { "kty": "OKP", "crv": "Ed25519", "kid": "idp-ed", "alg": "EdDSA", "x": good }
    ] });
    std::fs::write(&jwks, serde_json::to_vec(&set).unwrap()).unwrap();
    let ok = jwks_only(&cfg, &jwks, &[Algorithm::EdDSA]);
    let v = Verifier::from_config(&ok, KnownNames::default(), None).unwrap();
    // Read again with a short key in the file (`ed` writes it): refused, not a panic.
    ed(3).unwrap_err();
    let reread = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| v.reread_keys()))
        .expect("no panic");
    assert!(reread.is_err());
}

/// A JWK set publishing a private key's parameters (`d`, an RSA key's primes) is refused
/// whole, and a certificate given as a key file is refused (its dates would pass
/// unchecked).
#[test]
fn private_keys_in_a_jwk_set_and_certificates_as_keys_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = two_issuers(dir.path());
    let jwks = dir.path().join("leaked.json");
    let good = ed25519_public_key();
    let with = |extra: serde_json::Value| {
        let mut key = serde_json::json!(
            { "kty": "OKP", "crv": "Ed25519", "kid": "idp-ed", "alg": "EdDSA", "x": good }
        );
        if let (Some(k), Some(e)) = (key.as_object_mut(), extra.as_object()) {
            k.extend(e.clone());
        }
        let set = serde_json::json!({ "keys": [key] });
        std::fs::write(&jwks, serde_json::to_vec(&set).unwrap()).unwrap();
        let cfg = jwks_only(&cfg, &jwks, &[Algorithm::EdDSA]);
        Verifier::from_config(&cfg, KnownNames::default(), None).map(drop)
    };
    assert!(with(serde_json::json!({})).is_ok());
    // An optional member written out empty is no key material.
    assert!(with(serde_json::json!({ "d": null, "p": "" })).is_ok());
    // Found behind a key that would refuse the set for another reason (an EC key without
    // `y`): the leak is what the refusal says, so that it is acted on as one.
    let set = serde_json::json!({ "keys": [
        { "kty": "EC", "crv": "P-256", "kid": "broken", "alg": "ES256", "x": good },
        { "kty": "OKP", "crv": "Ed25519", "kid": "idp-ed", "alg": "EdDSA", "x": good, "d": good }
    ] });
    std::fs::write(&jwks, serde_json::to_vec(&set).unwrap()).unwrap();
    let both = jwks_only(&cfg, &jwks, &[Algorithm::ES256, Algorithm::EdDSA]);
    let err = Verifier::from_config(&both, KnownNames::default(), None)
        .err()
        .unwrap();
    assert!(
        err.downcast_ref::<crate::auth::LeakedKey>().is_some(),
        "{err:#}"
    );
    for leaked in [
        serde_json::json!({ "d": good }),
        serde_json::json!({ "p": good }),
    ] {
        let err = with(leaked.clone()).err().unwrap().to_string();
        assert!(
            err.contains("idp-ed") && err.contains("private key material"),
            "{leaked}: {err}"
        );
    }

    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["idp".to_owned()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    std::fs::write(&cfg.keys[0].public_key_file, cert.pem()).unwrap();
    let err = Verifier::from_config(&cfg, KnownNames::default(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("party-1") && err.contains("is a certificate"),
        "{err}"
    );
    std::fs::write(&cfg.keys[0].public_key_file, kp.public_key_pem()).unwrap();
    assert!(Verifier::from_config(&cfg, KnownNames::default(), None).is_ok());
    // A second key appended to the file (a rotation by `cat >>`), or the private key beside
    // the public one: refused, not the first block taken alone.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    for second in [other.public_key_pem(), kp.serialize_pem()] {
        let both = format!("{}{second}", kp.public_key_pem());
        std::fs::write(&cfg.keys[0].public_key_file, both).unwrap();
        let err = Verifier::from_config(&cfg, KnownNames::default(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("party-1") && err.contains("holds 2 PEM blocks"),
            "{err}"
        );
    }
}

/// A private key published in `auth.jwks_file` is seen as a leak whatever else is wrong with
/// the key files: a PEM file that cannot be read no longer hides it (the read failed on the
/// PEM file first, and the leaked key stayed in use), nor does the key written alone, not
/// as a set.
#[test]
fn a_leak_in_the_jwks_file_is_seen_whatever_the_pem_files() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = two_issuers(dir.path());
    let kp = crate::token::generate_es256().unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.private_pem.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("idp-j".into());
    let jwk = serde_json::to_value(jwk).unwrap();
    let path = dir.path().join("jwks.json");
    let write = |v: serde_json::Value| std::fs::write(&path, v.to_string()).unwrap();
    write(serde_json::json!({ "keys": [jwk] }));
    cfg.jwks_file = Some(path.clone());
    cfg.jwks_issuer = PARTY.into();
    let v = Verifier::from_config(&cfg, KnownNames::default(), None).unwrap();
    assert!(!v.uses_leaked());
    std::fs::remove_file(&cfg.keys[0].public_key_file).unwrap();
    let mut leaked = jwk.clone();
    leaked["d"] = "c2VjcmV0LWhhbGY".into();
    for published in [serde_json::json!({ "keys": [leaked] }), leaked.clone()] {
        write(published.clone());
        let err = v.reread_keys().err().unwrap();
        assert!(
            err.downcast_ref::<LeakedKey>().is_some(),
            "{published}: {err:#}"
        );
        assert!(v.uses_leaked());
    }
    assert!(v.without_leaked().removed.contains(&"idp-j".to_owned()));
}

/// A P-256 key pinned as a PEM file whose point is written compressed (`openssl ec -pubout
/// -conv_form compressed`) is the same key as its JWK, whose point never is: published with
/// its private half under another id, the PEM copy goes too. (Its fingerprint was of the
/// bytes as written, so the copy stayed trusted.)
#[test]
fn a_leaked_key_pinned_with_its_point_compressed_goes_with_it() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = two_issuers(dir.path());
    let kp = crate::token::generate_es256().unwrap();
    let der = base64::engine::general_purpose::STANDARD
        .decode(
            (kp.public_pem.lines())
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let point = &der[der.len() - 65..];
    let compressed = p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
        .unwrap()
        .to_encoded_point(true);
    // SubjectPublicKeyInfo: id-ecPublicKey on prime256v1, then the 33-byte point.
    let mut spki = hex::decode("3039301306072a8648ce3d020106082a8648ce3d030107032200").unwrap();
    spki.extend_from_slice(compressed.as_bytes());
    let body = base64::engine::general_purpose::STANDARD.encode(&spki);
    let pem = format!("-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n");
    std::fs::write(&cfg.keys[0].public_key_file, pem).unwrap();

    let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.private_pem.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("idp-j".into());
    let jwk = serde_json::to_value(jwk).unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
    cfg.jwks_file = Some(path.clone());
    cfg.jwks_issuer = PARTY.into();
    let known = KnownNames {
        roles: ["canvasser".to_owned()].into(),
        areas: ["E05011391".to_owned()].into(),
        purposes: ["canvassing".to_owned()].into(),
    };
    let v = Verifier::from_config(&cfg, known, None).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signer = crate::token::Signer::from_pem(
        "party-1",
        Algorithm::ES256,
        kp.private_pem.as_bytes(),
        PARTY,
    )
    .unwrap();
    let token = signer.sign(&live_claims(PARTY, "s", now)).unwrap();
    let verified = v.verify(&token, now);
    assert!(
        verified.is_ok(),
        "the compressed key verifies: {:?}",
        verified.err()
    );
    assert!(!v.uses_leaked());

    let mut leaked = jwk.clone();
    leaked["d"] = "c2VjcmV0LWhhbGY".into();
    std::fs::write(&path, serde_json::json!({ "keys": [leaked] }).to_string()).unwrap();
    let err = v.reread_keys().err().unwrap();
    assert!(err.downcast_ref::<LeakedKey>().is_some(), "{err:#}");
    let dropped = v.without_leaked();
    assert_eq!(
        dropped
            .removed
            .iter()
            .collect::<std::collections::BTreeSet<_>>(),
        std::collections::BTreeSet::from([&"idp-j".to_owned(), &"party-1".to_owned()])
    );
    v.trust(dropped);
    assert!(!v.uses_leaked());
    assert_eq!(v.verify(&token, now).err(), Some(AuthFailure::UnknownKey));
}

/// `auth.jwks_file` read again publishing a key's private half: refused, the key noted as
/// leaked and dropped from those in use by `without_leaked` (nothing changes before `trust`),
/// and passed over when the file publishes it again without its private half, beside a new
/// key that is taken.
#[test]
fn a_key_file_publishing_a_private_key_drops_that_key() {
    let (dir, cfg, v, signer) = jwks_verifier();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = signer.sign(&live_claims("https://idp", "s", now)).unwrap();
    let path = cfg.jwks_file.clone().unwrap();
    let published: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let first = published["keys"][0].clone();
    let kp = crate::token::generate_es256().unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.private_pem.as_bytes()).unwrap();
    let mut second = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    second.common.key_id = Some("idp-2".into());
    let second = serde_json::to_value(second).unwrap();
    let write = |keys: serde_json::Value| {
        std::fs::write(&path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    };
    assert!(!v.uses_leaked());

    let mut leaked = first.clone();
    leaked["d"] = "c2VjcmV0LWhhbGY".into();
    write(serde_json::json!([leaked, second]));
    let err = v.reread_keys().err().unwrap();
    assert!(err.downcast_ref::<LeakedKey>().is_some(), "{err:#}");
    assert!(v.uses_leaked());
    assert!(
        v.verify(&token, now).is_ok(),
        "nothing changes before `trust`"
    );
    let dropped = v.without_leaked();
    assert_eq!(dropped.removed, vec!["idp-1".to_owned()]);
    assert!(dropped.all.is_empty());
    v.trust(dropped);
    assert!(!v.uses_leaked());
    assert_eq!(v.verify(&token, now).err(), Some(AuthFailure::UnknownKey));

    write(serde_json::json!([first, second]));
    let taken = v.reread_keys().unwrap();
    assert_eq!(
        taken.all.keys().cloned().collect::<Vec<_>>(),
        vec!["idp-2".to_owned()]
    );
    v.trust(taken);
    assert_eq!(v.verify(&token, now).err(), Some(AuthFailure::UnknownKey));
    let signer2 = crate::token::Signer::from_pem(
        "idp-2",
        Algorithm::ES256,
        kp.private_pem.as_bytes(),
        "https://idp",
    )
    .unwrap();
    let token2 = signer2.sign(&live_claims("https://idp", "s", now)).unwrap();
    assert!(v.verify(&token2, now).is_ok());
    drop(dir);
}

/// `cfg` trusting the JWK set in `jwks` alone (no key files), for the party's issuer and
/// `algorithms`.
fn jwks_only(
    cfg: &crate::config::AuthConfig,
    jwks: &std::path::Path,
    algorithms: &[Algorithm],
) -> crate::config::AuthConfig {
    let mut cfg = cfg.clone();
    cfg.keys.clear();
    cfg.algorithms = algorithms.to_vec();
    cfg.issuers = vec![PARTY.into()];
    cfg.jwks_file = Some(jwks.to_owned());
    cfg.jwks_issuer = PARTY.into();
    cfg
}

/// A real Ed25519 public key, base64url: the one rcgen makes for a fresh key pair.
fn ed25519_public_key() -> String {
    use base64::Engine;
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw())
}

/// Keys read again are trusted only when `trust` is given them; a cached token signed by a
/// key gone stops at once, and a verification under way when the keys change does not put
/// its token in the cache.
#[test]
fn keys_read_again_replace_the_old_ones_and_their_cached_tokens() {
    let (dir, cfg, v, signer) = jwks_verifier();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = signer.sign(&live_claims("https://idp", "s", now)).unwrap();
    assert!(v.verify(&token, now).is_ok());

    // The identity provider rotates: its JWKS now holds another key under another id.
    let kp = crate::token::generate_es256().unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.private_pem.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("idp-2".into());
    jwk.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::ES256);
    let path = cfg.jwks_file.clone().unwrap();
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({ "keys": [jwk] })).unwrap(),
    )
    .unwrap();
    let rotated = crate::token::Signer::from_pem(
        "idp-2",
        Algorithm::ES256,
        kp.private_pem.as_bytes(),
        "https://idp",
    )
    .unwrap();
    let new_token = rotated.sign(&live_claims("https://idp", "s", now)).unwrap();

    let new = v.reread_keys().unwrap();
    assert_eq!(
        new.all.keys().cloned().collect::<Vec<_>>(),
        vec!["idp-2".to_owned()]
    );
    assert_eq!(
        (new.added.clone(), new.removed.clone(), new.changed.clone()),
        (vec!["idp-2".to_owned()], vec!["idp-1".to_owned()], vec![])
    );
    // Read, not yet trusted: nothing has changed.
    assert!(v.verify(&token, now).is_ok());
    assert_eq!(
        v.verify(&new_token, now).err(),
        Some(AuthFailure::UnknownKey)
    );
    // A verification that began with the old keys ends after the change: not cached.
    let generation = v.cache.generation();
    let principal = Arc::new(v.check(&token, now).unwrap());
    assert!(v.still_trusts(&principal));
    v.trust(new);
    v.cache.put(&token, &principal, now, generation);
    assert_eq!(v.verify(&token, now).err(), Some(AuthFailure::UnknownKey));
    // A request or stream its token began stops at its next check.
    assert!(!v.still_trusts(&principal));
    let current = v.verify(&new_token, now).unwrap();
    assert_eq!(current.subject, "s");
    assert!(v.still_trusts(&current));

    // The same id, other material: reported as changed, and the old key's callers stop.
    let kp3 = crate::token::generate_es256().unwrap();
    let enc3 = jsonwebtoken::EncodingKey::from_ec_pem(kp3.private_pem.as_bytes()).unwrap();
    let mut jwk3 = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc3, Algorithm::ES256).unwrap();
    jwk3.common.key_id = Some("idp-2".into());
    jwk3.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::ES256);
    let set = serde_json::json!({ "keys": [jwk3] });
    std::fs::write(&path, serde_json::to_vec(&set).unwrap()).unwrap();
    let replaced = v.reread_keys().unwrap();
    assert_eq!(replaced.changed, vec!["idp-2".to_owned()]);
    assert!(replaced.added.is_empty() && replaced.removed.is_empty());
    v.trust(replaced);
    assert!(!v.still_trusts(&current));
    assert!(v.verify(&new_token, now).is_err());
    let signer3 = crate::token::Signer::from_pem(
        "idp-2",
        Algorithm::ES256,
        kp3.private_pem.as_bytes(),
        "https://idp",
    )
    .unwrap();
    let token3 = signer3.sign(&live_claims("https://idp", "s", now)).unwrap();
    assert!(v.verify(&token3, now).is_ok());

    // A file that would not start the gateway is refused, naming it; the keys stay.
    std::fs::write(&path, r#"{"keys":[]}"#).unwrap();
    let err = v.reread_keys().err().unwrap().to_string();
    assert!(
        err.contains("holds no keys") && err.contains("jwks.json"),
        "{err}"
    );
    assert!(v.verify(&token3, now).is_ok());
    drop(dir);
}

/// One key has one fingerprint however it is written (a reload moving a key from a PEM file
/// to the JWKS under the same id must not read as a replacement and cut its tokens off).
#[test]
fn one_key_has_one_fingerprint_from_a_pem_file_and_from_a_jwk() {
    use base64::Engine;
    let kp = crate::token::generate_es256().unwrap();
    let from_pem = DecodingKey::from_ec_pem(kp.public_pem.as_bytes()).unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.private_pem.as_bytes()).unwrap();
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    let from_jwk = DecodingKey::from_jwk(&jwk).unwrap();
    assert_eq!(
        fingerprint(Algorithm::ES256, &from_pem),
        fingerprint(Algorithm::ES256, &from_jwk)
    );
    let other = crate::token::generate_es256().unwrap();
    let other = DecodingKey::from_ec_pem(other.public_pem.as_bytes()).unwrap();
    assert_ne!(
        fingerprint(Algorithm::ES256, &from_pem),
        fingerprint(Algorithm::ES256, &other)
    );

    // RSA: PKCS#1 DER inside a PEM file, modulus and exponent in a JWK.
    use rsa::pkcs1::EncodeRsaPublicKey;
    let mut n = vec![0x5a_u8; 256];
    n[0] = 0xc1;
    n[255] = 0x01;
    let public = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&n),
        rsa::BigUint::from(65_537_u32),
    )
    .unwrap();
    let der = public.to_pkcs1_der().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_bytes());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
        lines.join("\n")
    );
    let from_pem = DecodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let n64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&n);
    let from_parts = DecodingKey::from_rsa_components(&n64, "AQAB").unwrap();
    assert_eq!(
        fingerprint(Algorithm::RS256, &from_pem),
        fingerprint(Algorithm::RS256, &from_parts)
    );
}

/// A JWK set of one ES256 key under `kid`, and a signer for it (issuer `https://idp`).
fn one_key_set(kid: &str) -> (String, crate::token::Signer) {
    let kp = crate::token::generate_es256().unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.private_pem.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.into());
    jwk.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::ES256);
    let set = serde_json::to_string(&serde_json::json!({ "keys": [jwk] })).unwrap();
    let signer = crate::token::Signer::from_pem(
        kid,
        Algorithm::ES256,
        kp.private_pem.as_bytes(),
        "https://idp",
    )
    .unwrap();
    (set, signer)
}

/// A fetched set replaces only the fetched keys, and reads no key file: a key file broken
/// meanwhile (refused by a signal's reload) neither holds back a rotation nor keeps a stale
/// set's keys trusted once they are dropped.
#[test]
fn a_fetched_set_replaces_only_the_fetched_keys_whatever_the_key_files_hold() {
    let dir = tempfile::tempdir().unwrap();
    let pem = crate::token::generate_es256().unwrap();
    let pem_file = dir.path().join("local.pem");
    std::fs::write(&pem_file, &pem.public_pem).unwrap();
    let cfg = crate::config::AuthConfig {
        issuers: vec!["https://idp".into()],
        audience: "wardgate".into(),
        leeway: std::time::Duration::from_secs(0),
        max_token_lifetime: std::time::Duration::from_secs(86_400),
        algorithms: vec![Algorithm::ES256],
        keys: vec![crate::config::KeyFile {
            kid: "local".into(),
            algorithm: Algorithm::ES256,
            public_key_file: pem_file.clone(),
            issuer: "https://idp".into(),
        }],
        jwks_file: None,
        jwks_url: Some(crate::config::JwksUrl {
            url: "https://idp.example/jwks.json".parse().unwrap(),
            ca_file: dir.path().join("ca.pem"),
            refresh: std::time::Duration::from_secs(60),
            max_stale: std::time::Duration::from_secs(3600),
        }),
        jwks_issuer: "https://idp".into(),
        issuer_roles: Default::default(),
        subject_prefixes: Default::default(),
    };
    let known = KnownNames {
        roles: ["canvasser".to_owned()].into(),
        areas: ["E05011391".to_owned()].into(),
        purposes: ["canvassing".to_owned()].into(),
    };
    let (set_a, a) = one_key_set("idp-a");
    let (set_b, b) = one_key_set("idp-b");
    // The set fetched at start is required, and only with a URL.
    assert!(Verifier::from_config(&cfg, known.clone(), None).is_err());
    let v = Verifier::from_config(&cfg, known, Some(&set_a)).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let local = crate::token::Signer::from_pem(
        "local",
        Algorithm::ES256,
        pem.private_pem.as_bytes(),
        "https://idp",
    )
    .unwrap();
    let token = |s: &crate::token::Signer| s.sign(&live_claims("https://idp", "s", now)).unwrap();
    assert!(v.verify(&token(&a), now).is_ok());
    assert!(v.verify(&token(&local), now).is_ok());

    std::fs::write(
        &pem_file,
        "-----BEGIN PUBLIC KEY-----\nbroken\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    assert!(
        v.reread_keys().is_err(),
        "a signal's reload reads the files"
    );

    let rotated = v.read_keys(Some(Arc::from(set_b.as_str()))).unwrap();
    assert_eq!(
        (rotated.added.clone(), rotated.removed.clone()),
        (vec!["idp-b".to_owned()], vec!["idp-a".to_owned()])
    );
    v.trust(rotated);
    assert_eq!(v.jwks_in_force().as_deref(), Some(set_b.as_str()));
    assert!(v.verify(&token(&b), now).is_ok());
    assert_eq!(
        v.verify(&token(&a), now).err(),
        Some(AuthFailure::UnknownKey)
    );
    assert!(
        v.verify(&token(&local), now).is_ok(),
        "the file's key stays as in use"
    );

    let dropped = v.read_keys(None).unwrap();
    assert_eq!(
        (dropped.added.clone(), dropped.removed.clone()),
        (vec![], vec!["idp-b".to_owned()])
    );
    v.trust(dropped);
    assert_eq!(v.jwks_in_force(), None);
    assert_eq!(
        v.verify(&token(&b), now).err(),
        Some(AuthFailure::UnknownKey)
    );
    assert!(v.verify(&token(&local), now).is_ok());

    // A fetched key may not take a file key's id.
    let (clash, _) = one_key_set("local");
    let e = v.read_keys(Some(Arc::from(clash.as_str()))).err().unwrap();
    // Saying where: the fetched set, by its address.
    assert!(
        format!("{e:#}").contains("key id `local` is configured twice")
            && format!("{e:#}").contains("the JWKS from `https://"),
        "{e:#}"
    );
}

/// An identity provider's set holds more than the gateway's signing keys: an encryption key
/// (Keycloak publishes one), a key for an algorithm not allowed, a key without an `alg`
/// (Microsoft Entra ID publishes none). The others are passed over, not a reason to refuse
/// the set; a key without `alg` takes the one algorithm its type allows; a set with nothing
/// usable is refused, saying what was passed over.
#[test]
fn keys_the_gateway_does_not_use_are_passed_over_and_a_missing_alg_follows_the_key_type() {
    let (dir, mut cfg, _, signer) = jwks_verifier();
    let path = cfg.jwks_file.clone().unwrap();
    let mut set: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    // The signing key as Entra ID would publish it: no `alg`, `use` `sig`.
    set["keys"][0].as_object_mut().unwrap().remove("alg");
    set["keys"][0]["use"] = "sig".into();
    let others = serde_json::json!([
        {"kty": "RSA", "use": "enc", "alg": "RSA-OAEP", "kid": "enc-1", "n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "alg": "PS256", "kid": "pss-1", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AQAB", "y": "AQAB"},
        {"kty": "RSA", "alg": "RS256", "n": "AQAB", "e": "AQAB"},
        {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"},
    ]);
    let mut keys = others.as_array().unwrap().clone();
    keys.push(set["keys"][0].clone());
    std::fs::write(&path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    let v = Verifier::from_config(&cfg, KnownNames::default(), None).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = signer.sign(&live_claims("https://idp", "s", now)).unwrap();
    assert_eq!(
        v.verify(&token, now).err(),
        Some(AuthFailure::UnknownName),
        "verified by the key (claims name nothing the test's registers know)"
    );
    let taken = v.reread_keys().unwrap();
    assert_eq!(taken.all.keys().collect::<Vec<_>>(), vec!["idp-1"]);

    // Only the passed-over kinds: refused, naming each.
    std::fs::write(&path, serde_json::json!({ "keys": others }).to_string()).unwrap();
    let e = format!("{:#}", v.reread_keys().err().unwrap());
    for said in [
        "holds no keys the gateway can use",
        "`enc-1` (not for signatures",
        "`pss-1` (an algorithm the gateway does not accept)",
        "`p384` (an algorithm",
        "#3 (no `kid`",
        "`shared`",
    ] {
        assert!(e.contains(said), "`{said}` not in: {e}");
    }
    // An RSA key without `alg` is RS256's, and so passed over where RS256 is not allowed.
    cfg.algorithms = vec![Algorithm::ES256];
    let rsa = serde_json::json!({ "keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}] });
    std::fs::write(&path, rsa.to_string()).unwrap();
    let e = format!(
        "{:#}",
        Verifier::from_config(&cfg, KnownNames::default(), None)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("`r` (RS256, which `auth.algorithms` does not allow)"),
        "{e}"
    );

    // A key it would use must be whole: one malformed (`e` a number, an EC key without `y`)
    // stops the set, naming it, rather than passed over beside a good one.
    cfg.algorithms = vec![Algorithm::ES256, Algorithm::RS256];
    for broken in [
        serde_json::json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "bad", "n": "AQAB", "e": 65537}),
        serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "bad", "x": "AQAB"}),
    ] {
        let set = serde_json::json!({ "keys": [broken, set["keys"][0].clone()] });
        std::fs::write(&path, set.to_string()).unwrap();
        let e = format!(
            "{:#}",
            Verifier::from_config(&cfg, KnownNames::default(), None)
                .err()
                .expect("refused")
        );
        assert!(e.contains("`bad` is malformed"), "{e}");
    }
    // One it would not use, even malformed (a curve it does not read, an algorithm not
    // allowed), is passed over, not a reason to refuse the set.
    for other in [
        serde_json::json!({"kty": "OKP", "crv": "Ed448", "kid": "ed448", "x": "AQAB"}),
        serde_json::json!({"kty": "EC", "crv": "secp256k1", "kid": "k1", "x": "AQAB"}),
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": 7}),
    ] {
        let set = serde_json::json!({ "keys": [other, set["keys"][0].clone()] });
        std::fs::write(&path, set.to_string()).unwrap();
        Verifier::from_config(&cfg, KnownNames::default(), None).expect("the good key taken");
    }
    // EdDSA names Ed448 too (RFC 8037, as Keycloak publishes it): with EdDSA allowed, an
    // Ed448 key so named is of a curve not read here, and passed over too.
    cfg.algorithms = vec![Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA];
    let ed448 = serde_json::json!(
        {"kty": "OKP", "crv": "Ed448", "alg": "EdDSA", "use": "sig", "kid": "ed448", "x": "AQAB"}
    );
    let set = serde_json::json!({ "keys": [ed448, set["keys"][0].clone()] });
    std::fs::write(&path, set.to_string()).unwrap();
    Verifier::from_config(&cfg, KnownNames::default(), None).expect("the good key taken");
    drop(dir);
}

/// Only ids a revocation can name exactly are taken, in a token or a revocation: not blank,
/// at most 256 bytes, nothing around them, no control characters.
#[test]
fn revocable_ids_are_exact() {
    for ok in [
        "alice",
        "partner:alice",
        "John Smith",
        "t-1",
        &"x".repeat(256),
    ] {
        assert!(revocable_id(ok), "{ok:?}");
    }
    for bad in [
        "",
        "   ",
        "alice ",
        " alice",
        "al\tice",
        "al\u{0}ice",
        "alice\n",
        &"x".repeat(257),
    ] {
        assert!(!revocable_id(bad), "{bad:?}");
    }
}
