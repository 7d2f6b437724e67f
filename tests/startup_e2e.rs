//! The binary refuses to start on bad policies, schema violations, missing keys and unknown
//! config keys, naming the file and the problem; `validate` checks the same without serving.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_wardgate")
}

/// A complete, valid configuration directory (the demo's files), with a free port.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let addr = "127.0.0.1:0".parse().unwrap();
    let upstream = "127.0.0.1:9".parse().unwrap();
    let cfg = wardgate::demo::materialise(dir.path(), addr, addr, upstream).unwrap();
    (dir, cfg)
}

fn run(args: &[&str], cfg: &Path) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn validate_accepts_the_shipped_files() {
    let (_d, cfg) = setup();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(ok, "{out}");
    assert!(out.contains("ok:"), "{out}");
    // Without --offline it probes the datastores, and there is none at 127.0.0.1:9.
    let (ok, out) = run(&["validate"], &cfg);
    assert!(!ok && out.contains("cannot probe datastore"), "{out}");
}

/// The demo served off loopback (`--listen 0.0.0.0:8080 --admin 0.0.0.0:9901`) says that plain
/// HTTP is meant on both planes, as a deployment must: its synthetic data are for showing.
#[test]
fn the_demo_off_loopback_is_valid_on_both_planes() {
    let dir = tempfile::tempdir().unwrap();
    let any = "0.0.0.0:0".parse().unwrap();
    let upstream = "127.0.0.1:9".parse().unwrap();
    let cfg = wardgate::demo::materialise(dir.path(), any, any, upstream).unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(ok, "{out}");
}

/// The demo writes its own pack at each start: a policy saved beside it (the tour's), whose
/// fixture the demo clears, does not stop the next start as untested.
#[test]
fn the_demo_starts_again_after_a_policy_was_added_to_its_pack() {
    let dir = tempfile::tempdir().unwrap();
    let addr = "127.0.0.1:0".parse().unwrap();
    let upstream = "127.0.0.1:9".parse().unwrap();
    wardgate::demo::materialise(dir.path(), addr, addr, upstream).unwrap();
    let extra = dir.path().join("policies/extra.cedar");
    std::fs::write(
        &extra,
        "@id(\"extra.untested\")\nforbid (principal, action == Wardgate::Action::\"export\", resource)\n\
         when { context.purpose in [Wardgate::Purpose::\"legal_claims\"] };\n",
    )
    .unwrap();
    let cfg = wardgate::demo::materialise(dir.path(), addr, addr, upstream).unwrap();
    assert!(!extra.exists());
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(ok, "{out}");
}

/// A real datastore serving the synthetic data, optionally with one unclassified field added.
async fn datastore(extra_field: bool) -> std::net::SocketAddr {
    let settings = wardgate::demo::data::GenSettings {
        electors: 200,
        members: 50,
        ..Default::default()
    };
    let mut data = wardgate::demo::data::generate(&settings, wardgate::demo::AREAS).unwrap();
    if extra_field {
        data.electors[3]["shadow_notes"] =
            serde_json::json!("leans our way, ask about the divorce");
    }
    let store = wardgate::demo::datastore::Datastore::from_records(data.electors, data.members);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(wardgate::demo::datastore::serve(
        listener,
        store,
        std::future::pending(),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_fails_when_a_datastore_returns_an_unclassified_field() {
    for (extra, want_ok) in [(false, true), (true, false)] {
        let upstream = datastore(extra).await;
        let dir = tempfile::tempdir().unwrap();
        let addr = "127.0.0.1:0".parse().unwrap();
        let cfg = wardgate::demo::materialise(dir.path(), addr, addr, upstream).unwrap();
        let (ok, out) = tokio::task::spawn_blocking(move || run(&["validate"], &cfg))
            .await
            .unwrap();
        assert_eq!(ok, want_ok, "{out}");
        if !want_ok {
            assert!(
                out.contains("`voter.shadow_notes`") && out.contains("catalog.toml"),
                "{out}"
            );
        }
    }
}

#[test]
fn the_annotated_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/wardgate.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    // Its keys and TLS files are placeholders for an operator's own; check that it parses.
    let err = wardgate::config::Config::parse(&text, example.parent().unwrap());
    assert!(err.is_ok(), "{:#}", err.unwrap_err());
}

#[test]
fn an_invalid_policy_stops_serve_naming_file_and_line() {
    let (d, cfg) = setup();
    std::fs::write(
        d.path().join("policies/broken.cedar"),
        "@id(\"b\")\npermit (principal, action, resource)\nwhen { context. };\n",
    )
    .unwrap();
    for cmd in [&["serve"][..], &["validate", "--offline"][..]] {
        let (ok, out) = run(cmd, &cfg);
        assert!(!ok);
        assert!(out.contains("broken.cedar:3:"), "{cmd:?}: {out}");
    }
}

/// The shipped policy tests, which the demo writes beside its policies.
fn with_policy_tests(d: &Path) -> PathBuf {
    let tests = d.join("policies/tests");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tests");
    for kind in ["allow", "deny"] {
        let count = |dir: &Path| std::fs::read_dir(dir.join(kind)).unwrap().count();
        assert_eq!(
            count(&tests),
            count(&shipped),
            "the demo writes every {kind} test"
        );
    }
    tests
}

#[test]
fn a_pack_failing_its_own_tests_stops_the_start_naming_each_failure() {
    let (d, cfg) = setup();
    let tests = with_policy_tests(d.path());
    let shipped = std::fs::read_dir(tests.join("allow")).unwrap().count()
        + std::fs::read_dir(tests.join("deny")).unwrap().count();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("({shipped} policy tests passed)")),
        "{out}"
    );

    // The pack loses its restriction forbids: every policy left still validates.
    std::fs::remove_file(d.path().join("policies/restrictions.cedar")).unwrap();
    for cmd in [&["serve"][..], &["validate", "--offline"][..]] {
        let (ok, out) = run(cmd, &cfg);
        assert!(!ok, "{cmd:?}: {out}");
        assert!(
            out.contains("policy tests in")
                && out.contains(
                    "deny/deceased-addressed-mail.json: expected deny, got allow by [\"geo.within-grants\"]"
                )
                && out.contains("and 35 more")
                // An evaluation error a test expects is not logged as the gateway's.
                && !out.contains("policy evaluation error"),
            "{cmd:?}: {out}"
        );
    }
}

#[test]
fn a_policy_test_naming_what_the_registers_do_not_know_fails() {
    let (d, cfg) = setup();
    let tests = with_policy_tests(d.path());
    // A typo'd flag would test a record that cannot occur (and, in a deny test, pass for the
    // wrong reason: nothing permits it).
    let path = tests.join("deny/restricted-addressed-mail.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"restricted\"]", "\"restriced\"]")).unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            "deny/restricted-addressed-mail.json: `record.flags`: `restriced` is not a flag"
        ),
        "{out}"
    );
}

#[test]
fn a_policy_tests_path_that_holds_no_tests_stops_the_start() {
    let (d, cfg) = setup();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let set = |tests: &str| {
        let with = text.replace("[policy]\n", &format!("[policy]\ntests = \"{tests}\"\n"));
        std::fs::write(&cfg, with).unwrap();
    };
    set("no-such-dir");
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(
        !ok && out.contains("`policy.tests`") && out.contains("no-such-dir"),
        "{out}"
    );
    std::fs::create_dir_all(d.path().join("empty/allow")).unwrap();
    set("empty");
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(!ok && out.contains("hold no `allow/*.json`"), "{out}");
    // Allow tests alone do not test what the pack must refuse.
    let allow = d.path().join("empty/allow/one.json");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("policies/tests/allow/canvasser-walk-sheet-in-district.json"),
        &allow,
    )
    .unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(!ok && out.contains("hold no `deny/*.json`"), "{out}");
}

/// A pack with no tests starts only where the configuration says so; a policy that decides
/// none of the tests stops the start, naming it.
#[test]
fn an_untested_pack_or_policy_stops_the_start() {
    let (d, cfg) = setup();
    let tests = with_policy_tests(d.path());
    // A forbid that decides nothing any test asks: it could be lost unnoticed.
    let extra = d.path().join("policies/extra.cedar");
    std::fs::write(
        &extra,
        "@id(\"extra.untested\")\nforbid (principal, action == Wardgate::Action::\"export\", resource)\n\
         when { context.purpose in [Wardgate::Purpose::\"legal_claims\"] && \
         context.caller.role == \"dpo\" && context.caller.grants.isEmpty() };\n",
    )
    .unwrap();
    for cmd in [&["serve"][..], &["validate", "--offline"][..]] {
        let (ok, out) = run(cmd, &cfg);
        assert!(
            !ok && out.contains("policies are tested by none of the policy tests")
                && out.contains(&format!("`extra.untested` ({})", extra.display())),
            "{cmd:?}: {out}"
        );
    }
    std::fs::remove_file(&extra).unwrap();

    // No tests anywhere: refused, unless the configuration allows it.
    std::fs::remove_dir_all(&tests).unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(
        !ok && out.contains("no policy tests") && out.contains("policy.allow_untested"),
        "{out}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    let allowed = text.replace("[policy]\n", "[policy]\nallow_untested = true\n");
    assert_ne!(allowed, text);
    std::fs::write(&cfg, allowed).unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(
        ok && out.contains("only the schema checks the pack"),
        "{out}"
    );
}

/// The message names the file and the line, however the policy's id is written (the file
/// was found by searching for `@id("...")` as written so, and a policy annotated
/// `@id ( "..." )` was reported as in `<policies>`).
#[test]
fn a_policy_failing_schema_validation_stops_serve() {
    for id in ["@id(\"typo.role\")", "@id ( \"typo.role\" )"] {
        let (d, cfg) = setup();
        std::fs::write(
            d.path().join("policies/typo.cedar"),
            format!(
                "{id}\npermit (principal, action, resource)\nwhen {{ context.caller.rol == \"dpo\" }};\n"
            ),
        )
        .unwrap();
        let (ok, out) = run(&["serve"], &cfg);
        assert!(!ok);
        assert!(
            out.contains("typo.cedar:3")
                && out.contains("typo.role")
                && out.contains("strict validation"),
            "{id}: {out}"
        );
    }
}

/// A mistake found by checking one file against another names both, and the configuration
/// being checked: `quotas.ROLE` naming a role the asset register lacks said neither file.
#[test]
fn a_quota_for_a_role_the_register_lacks_names_both_files() {
    let (_d, cfg) = setup();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let typo = text.replacen("[quotas.canvasser]", "[quotas.canvaser]", 1);
    assert_ne!(typo, text);
    std::fs::write(&cfg, typo).unwrap();
    let (ok, out) = run(&["serve"], &cfg);
    assert!(!ok);
    assert!(
        out.contains("`quotas.canvaser`")
            && out.contains("catalog.toml")
            && out.contains(&cfg.display().to_string()),
        "{out}"
    );
}

#[test]
fn a_missing_key_file_stops_serve_naming_it() {
    let (d, cfg) = setup();
    std::fs::remove_file(
        d.path()
            .join(format!("keys/{}.pub.pem", wardgate::demo::KID)),
    )
    .unwrap();
    let (ok, out) = run(&["serve"], &cfg);
    assert!(!ok);
    assert!(
        out.contains("demo-es256.pub.pem") && out.contains("cannot read"),
        "{out}"
    );
}

/// `[signing]` is checked with the rest: a key that `wardgate token` could not read, or
/// whose tokens the gateway would refuse, stops the start, not the break-glass minting later.
#[test]
fn a_signing_key_the_gateway_could_not_use_stops_the_start() {
    let (d, cfg) = setup();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let line = format!(
        "private_key_file = \"keys/{}.key.pem\"",
        wardgate::demo::KID
    );
    assert!(text.contains(&line));
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(ok, "{out}");
    std::fs::write(
        &cfg,
        text.replace(&line, "private_key_file = \"keys/gone.key.pem\""),
    )
    .unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(!ok);
    assert!(
        out.contains("[signing]") && out.contains("gone.key.pem"),
        "{out}"
    );
    let issuer = format!("issuer = \"{}\"", wardgate::demo::ISSUER);
    let signing = text.split("[signing]").nth(1).unwrap();
    assert!(signing.contains(&issuer), "{signing}");
    let other = text.replace(
        &format!("[signing]{signing}"),
        &format!(
            "[signing]{}",
            signing.replace(&issuer, "issuer = \"https://elsewhere\"")
        ),
    );
    std::fs::write(&cfg, other).unwrap();
    let (ok, out) = run(&["serve"], &cfg);
    assert!(!ok);
    assert!(
        out.contains("signing.issuer") && out.contains("https://elsewhere"),
        "{out}"
    );
    // A key id no trusted key has, and a private key that is not the trusted key's pair:
    // every token minted would be refused.
    let kid = format!("kid = \"{}\"", wardgate::demo::KID);
    let nobody = text.replace(
        &format!("[signing]{signing}"),
        &format!("[signing]{}", signing.replacen(&kid, "kid = \"nobody\"", 1)),
    );
    std::fs::write(&cfg, nobody).unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(!ok);
    assert!(
        out.contains("no trusted key") && out.contains("`nobody`"),
        "{out}"
    );
    let fresh = wardgate::token::generate_es256().unwrap();
    std::fs::write(d.path().join("keys/other.key.pem"), fresh.private_pem).unwrap();
    std::fs::write(
        &cfg,
        text.replace(&line, "private_key_file = \"keys/other.key.pem\""),
    )
    .unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(!ok);
    assert!(out.contains("does not verify what it signs"), "{out}");
    drop(d);
}

#[test]
fn a_malformed_key_file_stops_serve_naming_it() {
    let (d, cfg) = setup();
    std::fs::write(
        d.path()
            .join(format!("keys/{}.pub.pem", wardgate::demo::KID)),
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let (ok, out) = run(&["serve"], &cfg);
    assert!(!ok);
    assert!(out.contains("demo-es256.pub.pem"), "{out}");
}

/// The shared controls' signing key is checked at start: missing, or too short to be a
/// secret, stops `serve` naming the file.
#[test]
fn a_missing_or_short_controls_key_stops_serve_naming_it() {
    let (d, cfg) = setup();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[redis]\nurl = \"redis://127.0.0.1:9\"\nkey_file = \"keys/controls.key\"\n");
    std::fs::write(&cfg, text).unwrap();
    let (ok, out) = run(&["serve"], &cfg);
    assert!(!ok);
    assert!(
        out.contains("controls.key") && out.contains("cannot read"),
        "{out}"
    );
    std::fs::write(d.path().join("keys/controls.key"), "not-a-secret\n").unwrap();
    for args in [&["serve"][..], &["validate", "--offline"]] {
        let (ok, out) = run(args, &cfg);
        assert!(!ok, "{args:?}");
        assert!(
            out.contains("controls.key") && out.contains("at least 32"),
            "{args:?}: {out}"
        );
    }
}

/// The admin plane answers to the roles `dpo` and `security` by name: an asset register
/// without one would have every rights request (or alert) refused, so the start says so.
#[test]
fn an_asset_register_without_an_admin_role_stops_the_start() {
    let (d, cfg) = setup();
    let catalog = d.path().join("catalog.toml");
    let text = std::fs::read_to_string(&catalog).unwrap();
    let line = "dpo = \"Data protection officer\"\n";
    assert!(text.contains(line));
    let renamed = text.replacen(line, "data_protection_officer = \"DPO\"\n", 1);
    std::fs::write(&catalog, renamed).unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(!ok);
    assert!(
        out.contains("`dpo`") && out.contains("catalog.toml") && out.contains("admin plane"),
        "{out}"
    );
}

#[test]
fn an_unknown_config_key_stops_serve_naming_it() {
    let (_d, cfg) = setup();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("durability = \"fsync\"", "durabilty = \"fsync\"");
    std::fs::write(&cfg, text).unwrap();
    let (ok, out) = run(&["serve"], &cfg);
    assert!(!ok);
    assert!(
        out.contains("durabilty") && out.contains("wardgate.toml"),
        "{out}"
    );
}

#[test]
fn a_bad_address_and_a_missing_tls_section_are_named() {
    let (_d, cfg) = setup();
    let orig = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        orig.replace(
            "admin_listen = \"127.0.0.1:0\"",
            "admin_listen = \"localhost:ninety\"",
        ),
    )
    .unwrap();
    let (ok, out) = run(&["serve"], &cfg);
    assert!(!ok && out.contains("server.admin_listen"), "{out}");
    std::fs::write(&cfg, orig.replace("plaintext = true\n", "")).unwrap();
    let (ok, out) = run(&["serve"], &cfg);
    assert!(!ok && out.contains("server.tls"), "{out}");
}

#[test]
fn a_shared_secret_algorithm_is_refused() {
    let (_d, cfg) = setup();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "algorithms = [\"ES256\"]",
        "algorithms = [\"ES256\", \"HS256\"]",
    );
    std::fs::write(&cfg, text).unwrap();
    let (ok, out) = run(&["validate", "--offline"], &cfg);
    assert!(!ok && out.contains("HS256"), "{out}");
}
