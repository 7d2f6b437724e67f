//! wardgate in front of a real third-party datastore: Datasette (from PyPI) serving the same
//! synthetic voter file from SQLite, with narrowing in Datasette's own query parameters. The
//! same policies must give the same disclosures as against the demo datastore.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{AppOptions, TestApp, spawn_app_with};
use wardgate::config::{DatasetteApi, Dialect};

const ELECTORS: usize = 900;

struct Datasette(Child);

impl Drop for Datasette {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo's synthetic voter file, as the demo datastore holds it.
fn electors() -> Vec<serde_json::Value> {
    let settings = wardgate::demo::data::GenSettings {
        electors: ELECTORS,
        ..Default::default()
    };
    wardgate::demo::data::generate(&settings, wardgate::demo::AREAS)
        .unwrap()
        .electors
}

/// Datasette serving `electors` with `tests/datasette/metadata.json`, or `None` when it is not
/// installed.
fn start_datasette(
    dir: &Path,
    electors: &[serde_json::Value],
) -> Option<(Datasette, std::net::SocketAddr)> {
    let metadata = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/datasette/metadata.json");
    start_datasette_with(dir, electors, &metadata)
}

/// `start_datasette` with another metadata file.
fn start_datasette_with(
    dir: &Path,
    electors: &[serde_json::Value],
    metadata: &Path,
) -> Option<(Datasette, std::net::SocketAddr)> {
    let jsonl = dir.join("electors.jsonl");
    let mut f = std::fs::File::create(&jsonl).unwrap();
    for r in electors {
        writeln!(f, "{r}").unwrap();
    }
    drop(f);
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/datasette");
    let db = dir.join("voter.db");
    let loaded = Command::new("python3")
        .arg(here.join("load.py"))
        .arg(&jsonl)
        .arg(&db)
        .status()
        .unwrap();
    assert!(loaded.success(), "loading SQLite failed");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = Command::new("datasette")
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            &addr.port().to_string(),
            "--metadata",
        ])
        .arg(metadata)
        .args([
            "--setting",
            "max_returned_rows",
            "1000",
            "--setting",
            "sql_time_limit_ms",
            "10000",
        ])
        .arg(&db)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let guard = Datasette(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "datasette did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some((guard, addr))
}

fn use_datasette(c: &mut wardgate::config::Config) {
    c.datasets.get_mut("voter").unwrap().dialect = Dialect::Datasette(DatasetteApi {
        database: "voter".into(),
        table: "electors".into(),
        list_query: "electors_page".into(),
        json_columns: ["markers", "flags", "turnout", "canvass_issues", "consents"]
            .map(String::from)
            .to_vec(),
    });
}

/// subject id -> sorted field names, over every page.
async fn disclosed(
    app: &TestApp,
    persona: &str,
    purpose: &str,
    query: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for page in 1.. {
        let resp = app
            .get(
                &format!("/voter/electors?per_page=250&page={page}{query}"),
                Some(&app.token(persona)),
                Some(purpose),
            )
            .await;
        assert_eq!(resp.status, 200, "{persona}/{purpose}: {:?}", resp.body);
        let v = resp.json();
        let audit = app.audit_for(&resp);
        let ids: Vec<String> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["elector_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            audit["subjects"],
            serde_json::json!(ids),
            "audit lists exactly the disclosed subjects"
        );
        for r in v["records"].as_array().unwrap() {
            let mut fields: Vec<String> = r.as_object().unwrap().keys().cloned().collect();
            fields.sort();
            out.insert(r["elector_id"].as_str().unwrap().to_owned(), fields);
        }
        if v["next_page"].is_null() {
            break;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_policies_give_the_same_disclosures_through_datasette() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_datasette, addr)) = start_datasette(dir.path(), &electors()) else {
        not_installed();
        return;
    };
    let demo = spawn_app_with(AppOptions {
        electors: Some(ELECTORS),
        ..Default::default()
    })
    .await;
    let ds = spawn_app_with(AppOptions {
        upstream: Some(addr),
        tweak: Some(use_datasette),
        ..Default::default()
    })
    .await;
    // Same personas and keys are not shared between the two apps; each mints its own tokens.
    let cases = [
        ("canvasser", "canvassing", ""),
        ("councillor", "email_sms", ""),
        (
            "councillor",
            "canvassing",
            "&polling_district=CGW3&local_authority=E08000035",
        ),
        ("candidate", "gotv", "&postcode=LS15"),
        ("analyst", "profiling", ""),
        ("dpo", "sar_fulfilment", "&ward=E05013911"),
        ("mp_caseworker", "casework", "&postcode=LS15+1A"),
    ];
    let mut total = 0;
    for (persona, purpose, query) in cases {
        let a = disclosed(&demo, persona, purpose, query).await;
        let b = disclosed(&ds, persona, purpose, query).await;
        assert!(
            !a.is_empty(),
            "{persona}/{purpose}{query} discloses something"
        );
        assert_eq!(
            a, b,
            "{persona}/{purpose}{query}: demo datastore and Datasette disagree"
        );
        total += a.len();
    }
    // Single reads agree too, including the ones that must not be found: an anonymous
    // elector, an under-16 (a handful of each in the register; the DPO's scope is national,
    // so theirs is no out-of-area 404) and an id nobody holds, each 404 through both.
    let sample: Vec<String> = disclosed(&demo, "dpo", "sar_fulfilment", "")
        .await
        .keys()
        .take(5)
        .cloned()
        .collect();
    let everyone = electors();
    let protected_id = |protected: &dyn Fn(&serde_json::Value) -> bool| {
        let found = (everyone.iter())
            .find(|r| protected(r))
            .expect("the synthetic register holds one");
        found["elector_id"].as_str().unwrap().to_owned()
    };
    let anonymous = protected_id(&|r| r["markers"].as_array().unwrap().contains(&"N".into()));
    let under_16 = protected_id(&|r| {
        (r["flags"].as_array().unwrap().iter())
            .any(|f| wardgate::filter::may_be_under_16(f.as_str().unwrap()))
    });
    let never_found = [anonymous.as_str(), under_16.as_str(), "VF-9999999"];
    for id in sample.iter().map(String::as_str).chain(never_found) {
        for (persona, purpose) in [("councillor", "canvassing"), ("dpo", "sar_fulfilment")] {
            let ra = demo
                .get(
                    &format!("/voter/electors/{id}"),
                    Some(&demo.token(persona)),
                    Some(purpose),
                )
                .await;
            let rb = ds
                .get(
                    &format!("/voter/electors/{id}"),
                    Some(&ds.token(persona)),
                    Some(purpose),
                )
                .await;
            assert_eq!(ra.status, rb.status, "{persona} reading {id}");
            if never_found.contains(&id) {
                assert_eq!(ra.status, 404, "{persona} reading {id}: {:?}", ra.body);
            }
            if ra.status == 200 {
                let keys = |r: &common::Resp| {
                    r.json()["record"]
                        .as_object()
                        .unwrap()
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                };
                assert_eq!(keys(&ra), keys(&rb));
            }
        }
    }
    // Datasette deployments are read-only through the gateway.
    let w = ds
        .canvass(
            &sample[0],
            &ds.token("canvasser"),
            "canvassing",
            r#"{"voting_intention":"LAB"}"#,
        )
        .await;
    assert_eq!(w.status, 405);
    // It accepts no method there: the `Allow` header lists none, whichever method asked.
    assert_eq!(w.headers["allow"], "");
    let r = ds
        .get(
            &format!("/voter/electors/{}/canvass", sample[0]),
            Some(&ds.token("canvasser")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), &r.headers["allow"]),
        (405, &w.headers["allow"])
    );
    eprintln!("{total} disclosures compared across {} cases", cases.len());
    demo.stop().await;
    ds.stop().await;
}

/// Datasette refusing the gateway the table (403) on a read by id is the datastore's failure
/// (502), not a record the caller may not see (404): a subject access report would otherwise
/// say "nothing held" of everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_datasette_refuses_is_the_datastores_failure() {
    let dir = tempfile::tempdir().unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/datasette/metadata.json");
    let mut metadata: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(here).unwrap()).unwrap();
    metadata["databases"]["voter"]["tables"] =
        serde_json::json!({ "electors": { "allow": false } });
    let refusing = dir.path().join("refusing.json");
    std::fs::write(&refusing, metadata.to_string()).unwrap();
    let Some((_datasette, addr)) = start_datasette_with(dir.path(), &electors(), &refusing) else {
        not_installed();
        return;
    };
    let app = spawn_app_with(AppOptions {
        upstream: Some(addr),
        tweak: Some(use_datasette),
        ..Default::default()
    })
    .await;
    let id = electors()[0]["elector_id"].as_str().unwrap().to_owned();
    let r = app
        .get(
            &format!("/voter/electors/{id}"),
            Some(&app.token("dpo")),
            Some("sar_fulfilment"),
        )
        .await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let report = app
        .admin_get_with(&format!("/sar/{id}"), &app.token("dpo"))
        .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    let missing = &report.json()["current_data_missing"]["voter"];
    assert!(
        missing.as_str().is_some_and(|m| m != "nothing held"),
        "{missing}"
    );
    app.stop().await;
}

fn not_installed() {
    assert!(
        std::env::var_os("CI").is_none() && std::env::var_os("WARDGATE_NO_SKIP").is_none(),
        "datasette is not installed under CI or scripts/test.sh (which installs it)"
    );
    eprintln!("skipping: datasette not installed (pip install datasette)");
}

/// The shipped canned query leaves out, before it pages, exactly the entries the gateway
/// never discloses by their attainer date (`filter::under_16_on`, on today's UTC date): dates
/// around the sixteenth birthday, the 28 and 29 February cases, and values that are no date.
#[tokio::test]
async fn the_canned_query_leaves_out_whom_the_attainer_date_says_is_under_16() {
    // The canned query reads SQLite's `date('now')`, the UTC date (the gateway reads the
    // UK's, an hour later in summer: the datastore then leaves out more, never less).
    let today = time::OffsetDateTime::now_utc().date();
    let days = i64::from(today.to_julian_day())
        - i64::from(time::macros::date!(1970 - 01 - 01).to_julian_day());
    let open = electors()
        .into_iter()
        .find(|r| r["markers"] == serde_json::json!([]) && r["flags"] == serde_json::json!([]))
        .unwrap();
    let mut values: Vec<serde_json::Value> = (-3..=3)
        .map(|k| serde_json::json!((today + time::Duration::days(730 + k)).to_string()))
        .collect();
    for year in [today.year() + 1, today.year() + 2, today.year() + 3] {
        for md in ["02-28", "02-29", "03-01"] {
            values.push(serde_json::json!(format!("{year}-{md}")));
        }
    }
    for junk in [
        "",
        "soon",
        "-2030-11-24",
        "2030-11-31",
        "2030-02-29",
        "20301124",
    ] {
        values.push(serde_json::json!(junk));
    }
    values.extend([serde_json::json!(20301124), serde_json::Value::Null]);
    let rows: Vec<serde_json::Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut r = open.clone();
            r["elector_id"] = serde_json::json!(format!("VF-T{i:03}"));
            r["attainer_date"] = v.clone();
            r
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let Some((_datasette, addr)) = start_datasette(dir.path(), &rows) else {
        not_installed();
        return;
    };
    let listed = canned_ids(addr).await;
    let expected: Vec<String> = rows
        .iter()
        .filter(|r| match &r["attainer_date"] {
            serde_json::Value::Null => true,
            serde_json::Value::String(d) => wardgate::filter::under_16_on(d, days) == Some(false),
            _ => false,
        })
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        expected.len() > 3 && expected.len() < rows.len() - 3,
        "the dates straddle the boundary: {expected:?}"
    );
    assert_eq!(listed, expected, "attainer dates {values:?}");
}

/// The subject ids the shipped canned query lists, asked directly (not through the gateway)
/// with nothing filtered, on one page.
async fn canned_ids(addr: std::net::SocketAddr) -> Vec<String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let uri = format!(
        "http://{addr}/voter/electors_page.json?_shape=array&ward=&constituency=\
         &local_authority=&polling_district=&postcode=&areas=&limit=1000&offset=0"
    );
    let resp = client.get(uri.parse().unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    (listed.iter())
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The shipped canned query leaves out, before it pages, every entry with a flag the gateway
/// reads as under 16 (`filter::may_be_under_16`: its ASCII letters and digits hold `under16`
/// or `undersixteen`), however it is spelt; one it listed would be withheld by the gateway
/// but counted in the page's length and `next_page`. Flags that do not say so are listed.
#[tokio::test]
async fn the_canned_query_leaves_out_every_spelling_of_under_16() {
    let open = electors()
        .into_iter()
        .find(|r| r["markers"] == serde_json::json!([]) && r["flags"] == serde_json::json!([]))
        .unwrap();
    let flags = [
        "under_16",
        "UNDER-16",
        "age.under 16",
        "under\u{2013}16",
        "Under (16)",
        "under/sixteen",
        "u n d e r\t1\u{a0}6",
        "Under Sixteen",
        "do_not_contact",
        "thunder",
        "under_18",
        "\u{fa}nder16",
    ];
    let rows: Vec<serde_json::Value> = (flags.iter().enumerate())
        .map(|(i, flag)| {
            let mut r = open.clone();
            r["elector_id"] = serde_json::json!(format!("VF-F{i:03}"));
            r["flags"] = serde_json::json!(["do_not_contact", flag]);
            r
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let Some((_datasette, addr)) = start_datasette(dir.path(), &rows) else {
        not_installed();
        return;
    };
    let expected: Vec<String> = (flags.iter().zip(&rows))
        .filter(|(flag, _)| !wardgate::filter::may_be_under_16(flag))
        .map(|(_, r)| r["elector_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(expected.len(), 4, "{expected:?}");
    assert_eq!(canned_ids(addr).await, expected, "flags {flags:?}");
}
