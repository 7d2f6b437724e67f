//! Policy tests, data first: one request per file under `policies/tests/{allow,deny}/`, each
//! checked for its decision and for the policy ids that decided it. Plus start-up refusals.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::*;
use crate::auth::Principal;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn shipped_engine() -> (PolicyEngine, Catalog, Geography) {
    let catalog = Catalog::load(&repo().join("config/catalog.toml")).unwrap();
    let geography = Geography::load(&repo().join("config/areas.toml")).unwrap();
    let engine = PolicyEngine::load(&repo().join("policies"), &catalog, &geography).unwrap();
    (engine, catalog, geography)
}

fn run_fixture(engine: &PolicyEngine, path: &Path) -> Result<Verdict, String> {
    static REGISTERS: std::sync::OnceLock<(Catalog, Geography)> = std::sync::OnceLock::new();
    let (catalog, geography) = REGISTERS.get_or_init(|| {
        let (_, catalog, geography) = shipped_engine();
        (catalog, geography)
    });
    let registers = fixtures::Registers { catalog, geography };
    let kind = if path.parent().is_some_and(|p| p.ends_with("deny")) {
        "deny"
    } else {
        "allow"
    };
    let o = fixtures::run(engine, &registers, path, kind)?;
    if !o.missing.is_empty() {
        return Err(format!(
            "expected among {:?}: {:?}",
            o.verdict.policy_ids, o.missing
        ));
    }
    Ok(o.verdict)
}

fn fixture_files(kind: &str) -> Vec<PathBuf> {
    fixtures::files(&repo().join("policies/tests"), kind).unwrap()
}

#[test]
fn every_fixture_gets_its_expected_decision() {
    let (engine, catalog, geography) = shipped_engine();
    let registers = fixtures::Registers {
        catalog: &catalog,
        geography: &geography,
    };
    let count = fixtures::run_all(&engine, &registers, &repo().join("policies/tests")).unwrap();
    assert_eq!(
        count,
        fixture_files("allow").len() + fixture_files("deny").len()
    );
    assert!(count > 100, "only {count} policy fixtures");
}

/// A file in a fixture directory that would not run is refused, not skipped.
#[test]
fn a_file_that_is_not_a_fixture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("deny")).unwrap();
    std::fs::write(dir.path().join("deny/a.json"), "{}").unwrap();
    assert_eq!(fixtures::files(dir.path(), "deny").unwrap().len(), 1);
    std::fs::write(dir.path().join("deny/b.JSON"), "{}").unwrap();
    let err = fixtures::files(dir.path(), "deny").unwrap_err().to_string();
    assert!(
        err.contains("b.JSON") && err.contains("is not a policy test"),
        "{err}"
    );
}

/// A fixture that could pass for the wrong reason is refused, not passed.
#[test]
fn a_fixture_that_could_pass_vacuously_is_refused() {
    let (engine, catalog, geography) = shipped_engine();
    let registers = fixtures::Registers {
        catalog: &catalog,
        geography: &geography,
    };
    let shipped = repo().join("policies/tests/deny/restricted-addressed-mail.json");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let mut fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(fixtures::run(&engine, &registers, &shipped, "deny").is_ok());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.json");
    let refused = |edit: &dyn Fn(&mut serde_json::Value), kind: &str, why: &str| {
        let mut f = fixture.clone();
        edit(&mut f);
        std::fs::write(&path, f.to_string()).unwrap();
        match fixtures::run(&engine, &registers, &path, kind) {
            Err(e) => assert!(e.contains(why), "{e}"),
            Ok(o) => panic!("passed ({:?}), expected: {why}", o.verdict),
        }
    };
    // A deny test naming nothing it expects would pass on a typo anywhere.
    refused(
        &|f| f["expect_policies"] = json!([]),
        "deny",
        "must name the policies",
    );
    // A record given to a request-level action is not what is tested.
    refused(
        &|f| f["action"] = json!("list"),
        "deny",
        "reads no `record`",
    );
    refused(
        &|f| f["category"] = json!("contact"),
        "deny",
        "reads no `category`",
    );
    refused(
        &|f| f["dataset"] = json!("votr"),
        "deny",
        "unknown dataset `votr`",
    );
    refused(
        &|f| f["caller"]["role"] = json!("canvaser"),
        "deny",
        "unknown role",
    );
    refused(
        &|f| f["record"]["flags"] = json!(["restriced"]),
        "deny",
        "`restriced`",
    );
    refused(
        &|f| f["record"]["markers"] = json!(["n"]),
        "deny",
        "not a register marker",
    );
    refused(
        &|f| f["record"]["consented"] = json!(["mail"]),
        "deny",
        "`mail`",
    );
    // A typo in a name nobody checks would be denied by default, for the wrong reason.
    refused(
        &|f| f["record"]["area"] = json!("E08000035/CGW22"),
        "deny",
        "`record.area`: `E08000035/CGW22` is not in the registers",
    );
    refused(
        &|f| f["purpose"] = json!("adressed_mail"),
        "deny",
        "`purpose`: `adressed_mail`",
    );
    refused(
        &|f| f["caller"]["areas"] = json!(["E0501139"]),
        "deny",
        "`caller.areas`",
    );
    // Saying so makes it a test of the unknown name; saying so of a known one is refused.
    refused(
        &|f| f["unregistered"] = json!(["record.area"]),
        "deny",
        "the registers hold all it gives",
    );
    refused(
        &|f| f["unregistered"] = json!(["record.area"]),
        "allow",
        "only a deny test",
    );
    refused(
        &|f| f["unregistered"] = json!(["dataset"]),
        "deny",
        "malformed",
    );
    // Saying so covers the one unknown name, not a typo beside it.
    refused(
        &|f| {
            f["purpose"] = json!("internal_selection");
            f["caller"]["purposes"] = json!(["internal_selection", "adressed_mail"]);
            f["unregistered"] = json!(["purpose"]);
        },
        "deny",
        "are all unknown",
    );
    // A lawful basis of its own is for a deny test of the basis, and must be one there is.
    refused(
        &|f| f["lawful_basis"] = json!("consent"),
        "allow",
        "only a deny test may give a `lawful_basis`",
    );
    refused(
        &|f| f["lawful_basis"] = json!("public_task"),
        "deny",
        "`public_task` is the catalogue's own for `addressed_mail`",
    );
    refused(
        &|f| {
            f["purpose"] = json!("internal_selection");
            f["caller"]["purposes"] = json!(["internal_selection"]);
            f["unregistered"] = json!(["purpose"]);
            f["lawful_basis"] = json!("consent");
        },
        "deny",
        "only for a catalogued purpose",
    );
    refused(
        &|f| f["lawful_basis"] = json!("legitimate_interest"),
        "deny",
        "`legitimate_interest` is not one of",
    );
    let mut unknown_area = fixture.clone();
    unknown_area["record"]["area"] = json!("E08000035/CGW22");
    unknown_area["unregistered"] = json!(["record.area"]);
    std::fs::write(&path, unknown_area.to_string()).unwrap();
    assert!(
        !fixtures::run(&engine, &registers, &path, "deny")
            .unwrap()
            .verdict
            .allowed
    );
    // Denied, but not by the policy the test says: reported, so that it fails.
    fixture["expect_policies"] = json!(["default-deny"]);
    std::fs::write(&path, fixture.to_string()).unwrap();
    let o = fixtures::run(&engine, &registers, &path, "deny").unwrap();
    assert!(
        !o.verdict.allowed && !o.missing.is_empty(),
        "{:?}",
        o.verdict
    );
}

/// A policy that no test names among those that decided it stops the start (`run_all`): it
/// could be weakened or lost and every test would still pass. The shipped pack has none such
/// (`every_fixture_gets_its_expected_decision`). Here two more forbids, well formed and
/// validated: one decides nothing the fixtures ask; the other fires beside
/// `restrict.restricted` wherever that does, in fixtures that name only `restrict.restricted`.
#[test]
fn a_policy_no_test_names_is_refused() {
    let extra = "@id(\"extra.untested\")\n\
        forbid (principal, action == Wardgate::Action::\"disclose_record\", resource)\n\
        when { context.record.flags.contains(\"deceased\") && \
        context.record.flags.contains(\"erasure_requested\") && \
        context.purpose in [Wardgate::Purpose::\"legal_claims\"] };\n\
        @id(\"extra.beside\")\n\
        forbid (principal, action == Wardgate::Action::\"disclose_record\", resource)\n\
        when { context.record.flags.contains(\"restricted\") && \
        context.purpose in [Wardgate::Purpose::\"addressed_mail\"] };\n";
    let engine = load_with("extra.cedar", extra).unwrap();
    let (_, catalog, geography) = shipped_engine();
    let registers = fixtures::Registers {
        catalog: &catalog,
        geography: &geography,
    };
    let tests = repo().join("policies/tests");
    // It does fire, beside the policy the fixture names.
    let o = fixtures::run(
        &engine,
        &registers,
        &tests.join("deny/restricted-addressed-mail.json"),
        "deny",
    )
    .unwrap();
    assert!(
        o.verdict.policy_ids.contains(&"extra.beside".to_owned()) && o.missing.is_empty(),
        "{:?}",
        o.verdict
    );
    let err = fixtures::run_all(&engine, &registers, &tests)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "2 of {} policies are tested by none of the policy tests",
            engine.policy_count()
        )) && err.contains("`extra.untested` (")
            && err.contains("`extra.beside` (")
            && err.contains("extra.cedar)"),
        "{err}"
    );
}

fn load_with(replace_file: &str, text: &str) -> anyhow::Result<PolicyEngine> {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(repo().join("policies")).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.path().join(replace_file), text).unwrap();
    let (_, catalog, geography) = shipped_engine();
    PolicyEngine::load(dir.path(), &catalog, &geography)
}

/// A file named like a policy but left out would leave its policies out in silence: a
/// `*.Cedar`, a hidden `.x.cedar` and a link to nothing (a half-rolled release) stop the
/// load, named; an editor's hidden lock link (`.#x.cedar`) is passed over.
#[test]
fn an_entry_named_like_a_policy_that_is_not_one_is_refused() {
    let permit = "@id(\"extra\")\npermit (principal, action, resource);\n";
    let msg = format!("{:#}", load_with("Extra.Cedar", permit).err().unwrap());
    assert!(
        msg.contains("Extra.Cedar") && msg.contains("not one"),
        "{msg}"
    );
    let msg = format!("{:#}", load_with(".extra.cedar", permit).err().unwrap());
    assert!(
        msg.contains(".extra.cedar") && msg.contains("not one"),
        "{msg}"
    );
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(repo().join("policies")).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let lock = dir.path().join(".#restrictions.cedar");
    std::os::unix::fs::symlink("editor@host.1234", &lock).unwrap();
    let (_, catalog, geography) = shipped_engine();
    let refused_naming = |name: &str| {
        let err = PolicyEngine::load(dir.path(), &catalog, &geography).err();
        let msg = format!("{:#}", err.expect("the load was refused"));
        assert!(msg.contains(name) && msg.contains("not one"), "{msg}");
    };
    assert!(PolicyEngine::load(dir.path(), &catalog, &geography).is_ok());
    std::fs::remove_file(&lock).unwrap();
    // A hidden link to a policy file is no editor's lock: refused, named.
    let hidden = dir.path().join(".extra.cedar");
    std::os::unix::fs::symlink(dir.path().join("restrictions.cedar"), &hidden).unwrap();
    refused_naming(".extra.cedar");
    std::fs::remove_file(&hidden).unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone.cedar"), dir.path().join("more.cedar"))
        .unwrap();
    refused_naming("more.cedar");
}

#[test]
fn a_syntax_error_names_file_and_line() {
    let err = load_with(
        "broken.cedar",
        "@id(\"x\")\npermit (principal, action, resource)\nwhen { context.caller.role == };\n",
    )
    .err()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("broken.cedar:3:"), "{msg}");
}

#[test]
fn a_schema_violation_names_file_and_policy() {
    let err = load_with("typo.cedar", "@id(\"typo\")\npermit (principal, action, resource)\nwhen { context.caller.rolle == \"dpo\" };\n")
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("typo.cedar") && msg.contains("`typo`"),
        "{msg}"
    );
}

#[test]
fn a_policy_naming_a_category_or_purpose_no_register_holds_is_refused() {
    let shipped = std::fs::read_to_string(repo().join("policies/restrictions.cedar")).unwrap();
    let typo = shipped.replacen(
        "FieldCategory::\"political_opinion\"",
        "FieldCategory::\"political_opinions\"",
        1,
    );
    assert_ne!(typo, shipped);
    let msg = format!(
        "{:#}",
        load_with("restrictions.cedar", &typo).err().unwrap()
    );
    assert!(
        msg.contains("restrictions.cedar") && msg.contains("political_opinions"),
        "{msg}"
    );
    let stray = "@id(\"stray\")\nforbid (principal, action, resource)\nwhen { context.purpose == Wardgate::Purpose::\"canvasing\" };\n";
    let msg = format!("{:#}", load_with("stray.cedar", stray).err().unwrap());
    assert!(
        msg.contains("stray.cedar: policy `stray`") && msg.contains("canvasing"),
        "{msg}"
    );
}

/// A flag, role or channel misspelt in a forbid would load and never fire: objectors
/// profiled, with nothing to say so. Start-up refuses it, naming file, policy and word.
#[test]
fn a_policy_comparing_with_a_word_the_gateway_does_not_know_is_refused() {
    let shipped = std::fs::read_to_string(repo().join("policies/restrictions.cedar")).unwrap();
    let typo = shipped.replacen(
        "flags.contains(\"objects_profiling\")",
        "flags.contains(\"objects_profilng\")",
        1,
    );
    assert_ne!(typo, shipped);
    let msg = format!(
        "{:#}",
        load_with("restrictions.cedar", &typo).err().unwrap()
    );
    assert!(
        msg.contains("restrictions.cedar: policy `")
            && msg.contains("compares context.record.flags with \"objects_profilng\", not a flag"),
        "{msg}"
    );
    for (condition, word) in [
        (r#"context.caller.role == "councilor""#, "councilor"),
        (r#"context.record.consented.contains("text")"#, "text"),
        (r#"context.record.markers.containsAny(["n"])"#, "\"n\""),
    ] {
        let stray = format!(
            "@id(\"stray\")\nforbid (principal, action == Wardgate::Action::\"disclose_record\", resource)\nwhen {{ {condition} }};\n"
        );
        let msg = format!("{:#}", load_with("stray.cedar", &stray).err().unwrap());
        assert!(
            msg.contains("stray.cedar: policy `stray` compares") && msg.contains(word),
            "{msg}"
        );
    }
    // The shipped pack's role lists are checked too.
    let purposes = std::fs::read_to_string(repo().join("policies/purpose.cedar")).unwrap();
    let typo = purposes.replacen("\"mp_campaign_staff\"]", "\"mp_campain_staff\"]", 1);
    assert_ne!(typo, purposes);
    let msg = format!("{:#}", load_with("purpose.cedar", &typo).err().unwrap());
    assert!(
        msg.contains("purpose.cedar: policy `purpose.canvassing-campaign-roles` compares context.caller.role with \"mp_campain_staff\""),
        "{msg}"
    );
    // The shipped pack's words are all known.
    assert!(load_with("restrictions.cedar", &shipped).is_ok());
}

#[test]
fn a_policy_without_an_id_is_refused() {
    let err = load_with("anon.cedar", "permit (principal, action, resource);\n")
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("@id"));
}

#[test]
fn duplicate_ids_are_refused() {
    let err = load_with(
        "dup.cedar",
        "@id(\"purpose.granted\")\nforbid (principal, action, resource);\n",
    )
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("used twice"));
}

/// A record in `area`, with no markers, flags or consents.
fn in_area(area: &str) -> RecordAttrs {
    RecordAttrs {
        area: area.into(),
        markers: BTreeSet::new(),
        flags: BTreeSet::new(),
        consented: BTreeSet::new(),
        tps_fresh: false,
    }
}

/// A councillor granted `area`, asking under `canvassing`.
fn canvassing_councillor(engine: &PolicyEngine, catalog: &Catalog, area: &str) -> Ask {
    let p = Principal {
        subject: "s".into(),
        token_id: "t".into(),
        role: "councillor".into(),
        unit: "u".into(),
        areas: vec![area.into()],
        purposes: vec!["canvassing".into()],
        expires_at: i64::MAX,
        issued_at: 0,
        grant_expires_at: None,
        key_id: String::new(),
        key_sha256: String::new(),
    };
    let basis = &catalog.purposes["canvassing"].lawful_basis;
    engine.ask(Arc::new(p), "canvassing", basis)
}

#[test]
fn an_evaluation_error_denies_even_when_a_permit_matches() {
    // An attribute lookup on an area the entity store does not hold is an evaluation error:
    // Cedar skips the erroring forbid and would allow (the permit matches by equality); the
    // engine must deny instead.
    let engine = load_with(
        "zz_error.cedar",
        "@id(\"zz.error\")\nforbid (principal, action == Wardgate::Action::\"disclose_record\", resource)\nwhen { context.record.area.kind == \"ward\" };\n",
    )
    .unwrap();
    let (_, catalog, _) = shipped_engine();
    let ask = canvassing_councillor(&engine, &catalog, "GHOST");
    let rec = in_area("GHOST");
    let v = engine.decide_record(&ask, "voter", &rec, false);
    assert!(!v.allowed);
    assert!(v.policy_ids.contains(&"policy-error".to_owned()), "{v:?}");
}

/// A pack whose schema asks for a record attribute the gateway does not send loads (its
/// policies never read it) and denies every record and field; the log says so without
/// Cedar's message, which prints the context: a record's area, markers and flags.
#[test]
fn a_context_the_schema_refuses_denies_and_logs_no_record_attribute() {
    let schema = std::fs::read_to_string(repo().join("policies/wardgate.cedarschema")).unwrap();
    let wants_more = schema.replacen(
        "type RecordAttrs = {",
        "type RecordAttrs = {\n    age: Long,",
        1,
    );
    assert_ne!(schema, wants_more);
    let engine = load_with("wardgate.cedarschema", &wants_more).unwrap();
    let (_, catalog, _) = shipped_engine();
    let ask = canvassing_councillor(&engine, &catalog, "E08000035/CGW1");
    let rec = RecordAttrs {
        area: "E08000035/CGW1".into(),
        markers: ["Z-MARKER".to_owned()].into(),
        flags: ["deceased".to_owned()].into(),
        consented: BTreeSet::new(),
        tps_fresh: false,
    };
    let (guard, logs) = crate::test_log::capture();
    let v = engine.decide_record(&ask, "voter", &rec, false);
    let categories: Vec<String> = catalog.datasets["voter"].fields.values().cloned().collect();
    let fields = engine.allowed_categories(&ask, "voter", &rec, categories.iter(), false);
    drop(guard);
    assert!(!v.allowed);
    assert!(fields.is_empty(), "{fields:?}");
    let text = logs.text();
    assert!(text.contains("schema refuses"), "{text}");
    for attribute in ["CGW1", "Z-MARKER", "deceased", "councillor"] {
        assert!(!text.contains(attribute), "`{attribute}` logged: {text}");
    }
}

#[test]
fn the_scoped_pack_decides_exactly_as_the_whole_pack() {
    let (scoped, catalog, _) = shipped_engine();
    let whole = shipped_engine().0.unscoped();
    // Every fixture: same decision, same deciding policies.
    for kind in ["allow", "deny"] {
        for path in fixture_files(kind) {
            assert_eq!(
                run_fixture(&scoped, &path),
                run_fixture(&whole, &path),
                "{}",
                path.display()
            );
        }
    }
    // And a sweep of callers, purposes, records, actions and every field category.
    let records: Vec<RecordAttrs> = [
        ("E08000035/CGW1", &[][..], &[][..], &["email"][..], true),
        ("E08000035/CGW1", &["N"], &[], &[], false),
        ("E08000035/CGW9", &[], &["restricted"], &["sms"], false),
        (
            "E08000035/CGW1",
            &[],
            &["objects_profiling", "do_not_contact"],
            &["email", "phone"],
            true,
        ),
    ]
    .into_iter()
    .map(|(area, markers, flags, consented, tps_fresh)| {
        let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        RecordAttrs {
            area: area.into(),
            markers: set(markers),
            flags: set(flags),
            consented: set(consented),
            tps_fresh,
        }
    })
    .collect();
    let mut outcomes = [0usize; 2];
    for role in ["canvasser", "councillor", "mp_caseworker", "analyst", "dpo"] {
        for (purpose, entry) in &catalog.purposes {
            let p = Principal {
                subject: format!("p-{role}"),
                token_id: "t".into(),
                role: role.into(),
                unit: "U".into(),
                areas: vec!["E05011391".into()],
                purposes: vec![purpose.clone()],
                expires_at: i64::MAX,
                issued_at: 0,
                grant_expires_at: None,
                key_id: String::new(),
                key_sha256: String::new(),
            };
            let ask = scoped.ask(Arc::new(p.clone()), purpose, &entry.lawful_basis);
            for (dataset, ds) in &catalog.datasets {
                for action in [RequestAction::List, RequestAction::Write] {
                    for filters in [&[][..], &ds.filters[..]] {
                        let v = scoped.decide_request(&ask, action, dataset, filters);
                        assert_eq!(v, whole.decide_request(&ask, action, dataset, filters));
                        outcomes[usize::from(v.allowed)] += 1;
                    }
                }
                let categories: BTreeSet<&String> = ds.fields.values().collect();
                for rec in &records {
                    for write in [false, true] {
                        let v = scoped.decide_record(&ask, dataset, rec, write);
                        assert_eq!(v, whole.decide_record(&ask, dataset, rec, write));
                        for cat in &categories {
                            let v = scoped.decide_field(&ask, dataset, rec, cat, write);
                            let w = whole.decide_field(&ask, dataset, rec, cat, write);
                            assert_eq!(v, w, "{role} {purpose} {dataset} {cat} {rec:?}");
                            outcomes[usize::from(v.allowed)] += 1;
                        }
                    }
                }
            }
        }
    }
    // Both answers occur often, so the comparison means something.
    assert!(outcomes[0] > 100 && outcomes[1] > 100, "{outcomes:?}");
}

#[test]
fn field_policies_read_no_area_and_records_apart_only_in_area_get_the_same_fields() {
    let (engine, catalog, geography) = shipped_engine();
    // What the shipped field policies read (if a new policy reads the area, this changes,
    // and the projection keeps the area: see policy::scope).
    assert!(!engine.field_reads(false).reads("area"));
    assert!(engine.field_reads(false).reads("consented"));
    assert!(engine.field_reads(false).reads("flags"));
    let areas: Vec<String> = geography.areas().map(|a| a.id.clone()).take(12).collect();
    let mut compared = 0;
    for role in ["councillor", "analyst", "clp_secretary"] {
        for (purpose, entry) in &catalog.purposes {
            let p = Principal {
                subject: "s".into(),
                token_id: "t".into(),
                role: role.into(),
                unit: "U".into(),
                areas: areas.clone(),
                purposes: vec![purpose.clone()],
                expires_at: i64::MAX,
                issued_at: 0,
                grant_expires_at: None,
                key_id: String::new(),
                key_sha256: String::new(),
            };
            let ask = engine.ask(Arc::new(p.clone()), purpose, &entry.lawful_basis);
            let categories: BTreeSet<String> =
                catalog.datasets["voter"].fields.values().cloned().collect();
            let record = |area: &str| RecordAttrs {
                area: area.to_owned(),
                markers: BTreeSet::new(),
                flags: ["do_not_contact".to_owned()].into(),
                consented: ["email".to_owned()].into(),
                tps_fresh: true,
            };
            let first =
                engine.allowed_categories(&ask, "voter", &record(&areas[0]), &categories, false);
            for area in &areas[1..] {
                let r = record(area);
                assert_eq!(
                    engine.field_projection(&r, false),
                    engine.field_projection(&record(&areas[0]), false)
                );
                assert_eq!(
                    engine.allowed_categories(&ask, "voter", &r, &categories, false),
                    first,
                    "{role} {purpose} {area}"
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 100);
}

/// An ask whose Cedar side cannot be built denies every decision that needs it (fail closed):
/// the request, the record and every field category. The same questions with an ask that
/// builds are allowed, so the denials are the failure's.
#[test]
fn an_ask_that_cannot_be_built_denies_everything() {
    let (engine, catalog, _) = shipped_engine();
    let basis = &catalog.purposes["canvassing"].lawful_basis;
    let p = Arc::new(Principal {
        subject: "s".into(),
        token_id: "t".into(),
        role: "councillor".into(),
        unit: "U".into(),
        areas: vec!["E05011391".into()],
        purposes: vec!["canvassing".into()],
        expires_at: i64::MAX,
        issued_at: 0,
        grant_expires_at: None,
        key_id: String::new(),
        key_sha256: String::new(),
    });
    let categories: BTreeSet<String> = catalog.datasets["voter"].fields.values().cloned().collect();
    let record = in_area("E05011391");
    let working = engine.ask(Arc::clone(&p), "canvassing", basis);
    assert!(
        engine
            .decide_request(&working, RequestAction::List, "voter", &[])
            .allowed
    );
    assert!(
        engine
            .decide_record(&working, "voter", &record, false)
            .allowed
    );
    assert!(
        !engine
            .allowed_categories(&working, "voter", &record, &categories, false)
            .is_empty()
    );

    let broken = engine.ask(p, "canvassing", basis);
    assert!(broken.cedar.set(Err("cannot be built".to_owned())).is_ok());
    let request = engine.decide_request(&broken, RequestAction::List, "voter", &[]);
    assert!(!request.allowed);
    assert_eq!(request.policy_ids, ["policy-error"]);
    let rec = engine.decide_record(&broken, "voter", &record, false);
    assert!(!rec.allowed);
    assert_eq!(rec.policy_ids, ["policy-error"]);
    assert!(
        engine
            .allowed_categories(&broken, "voter", &record, &categories, false)
            .is_empty()
    );
    for category in &categories {
        let field = engine.decide_field(&broken, "voter", &record, category, false);
        assert!(
            !field.allowed && field.policy_ids == ["policy-error"],
            "{category}"
        );
    }
}

/// A purpose the catalogue gives no Art 9 condition sees and writes no special category,
/// whatever the policies allow: the same pack that lets canvassing see political opinions
/// lets it see none once canvassing's condition is gone, and says why.
#[test]
fn no_special_category_without_an_art9_condition() {
    let (engine, catalog, geography) = shipped_engine();
    let record = in_area("E05011391");
    let categories: Vec<String> = ["identity", "political_opinion"].map(str::to_owned).into();
    let ask = canvassing_councillor(&engine, &catalog, "E05011391");
    assert!(
        engine
            .decide_field(&ask, "voter", &record, "political_opinion", false)
            .allowed
    );
    let allowed = engine.allowed_categories(&ask, "voter", &record, &categories, false);
    assert!(allowed.contains("political_opinion"), "{allowed:?}");

    let mut without = catalog.clone();
    without
        .purposes
        .get_mut("canvassing")
        .unwrap()
        .special_category_condition = Some(" ".into());
    let engine = PolicyEngine::load(&repo().join("policies"), &without, &geography).unwrap();
    let ask = canvassing_councillor(&engine, &without, "E05011391");
    for write in [false, true] {
        let v = engine.decide_field(&ask, "voter", &record, "political_opinion", write);
        assert!(!v.allowed);
        assert_eq!(v.policy_ids, vec![ART9_MISSING.to_owned()]);
        let allowed = engine.allowed_categories(&ask, "voter", &record, &categories, write);
        assert!(
            !allowed.contains("political_opinion"),
            "{write}: {allowed:?}"
        );
    }
    let allowed = engine.allowed_categories(&ask, "voter", &record, &categories, false);
    assert!(allowed.contains("identity"), "{allowed:?}");
}
