//! Tests of the demo datastore over a real socket on 127.0.0.1:0, with hyper's client.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::super::data::{DemoData, ELECTOR_KEYS, GenSettings, generate};
use super::{Datastore, serve};

const AREAS: &str = include_str!("../../../config/areas.toml");

struct Running {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    data: DemoData,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn start() -> Running {
    let settings = GenSettings {
        electors: 1500,
        members: 300,
        ..GenSettings::default()
    };
    let data = generate(&settings, AREAS).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let store = Datastore::new(data.clone());
    let task = tokio::spawn(serve(listener, store, async move {
        let _ = stopped.await;
    }));
    let client = Client::builder(TokioExecutor::new()).build_http();
    Running {
        base,
        client,
        data,
        stop,
        task,
    }
}

impl Running {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        let resp = self
            .client
            .request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let content_type = resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            content_type,
            body,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    /// Every record of a listing, following `next_page`.
    async fn all(&self, path: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut page = 1;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let reply = self
                .get(&format!("{path}{sep}per_page=1000&page={page}"))
                .await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&reply.body)
            );
            let body = reply.json();
            out.extend(body["records"].as_array().unwrap().iter().cloned());
            match body["next_page"].as_u64() {
                Some(next) => page = next,
                None => return out,
            }
        }
    }

    fn electors_where(&self, keep: impl Fn(&Value) -> bool) -> Vec<&Value> {
        self.data.electors.iter().filter(|r| keep(r)).collect()
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        let done = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        done.unwrap().unwrap().unwrap();
    }
}

fn ids(records: &[Value], key: &str) -> Vec<String> {
    records
        .iter()
        .map(|r| r[key].as_str().unwrap().to_owned())
        .collect()
}

fn assert_problem(reply: &Reply, status: StatusCode) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.content_type, "application/problem+json");
    let body = reply.json();
    assert_eq!(body["type"], "about:blank");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

#[tokio::test]
async fn pages_walk_every_record_once_in_id_order() {
    let s = start().await;
    let first = s.get("/electors").await;
    assert_eq!(
        (first.status, first.content_type.as_str()),
        (StatusCode::OK, "application/json")
    );
    let first = first.json();
    assert_eq!(first["records"].as_array().unwrap().len(), 100);
    assert_eq!(
        (
            first["page"].clone(),
            first["per_page"].clone(),
            first["next_page"].clone()
        ),
        (json!(1), json!(100), json!(2))
    );
    let every = s.all("/electors").await;
    let got = ids(&every, "elector_id");
    let mut want = ids(&s.data.electors, "elector_id");
    want.sort();
    assert_eq!(got, want);
    let third = s.get("/electors?page=3&per_page=7").await.json();
    assert_eq!(
        ids(third["records"].as_array().unwrap(), "elector_id"),
        want[14..21]
    );
    let past = s.get("/electors?page=99&per_page=1000").await.json();
    assert_eq!(
        (past["records"].clone(), past["next_page"].clone()),
        (json!([]), Value::Null)
    );
    s.stop().await;
}

#[tokio::test]
async fn areas_and_filters_narrow_to_the_scope() {
    let s = start().await;
    let scope = ["E08000035/CGW1", "E08000035/KSC4"];
    let got = s.all(&format!("/electors?areas={}", scope.join(","))).await;
    let want = s.electors_where(|r| {
        let id = format!(
            "{}/{}",
            r["local_authority"].as_str().unwrap(),
            r["polling_district"].as_str().unwrap()
        );
        scope.contains(&id.as_str())
    });
    assert!(!want.is_empty());
    assert_eq!(got.len(), want.len());
    assert!(
        got.windows(2)
            .all(|w| w[0]["elector_id"].as_str() < w[1]["elector_id"].as_str())
    );
    // Scope and filter combine; an empty scope matches nothing; unknown districts match nothing.
    let east = s
        .all("/electors?areas=E08000035/CGW1,E08000035/KSC4&constituency=E14001320")
        .await;
    assert!(!east.is_empty() && east.iter().all(|r| r["polling_district"] == "CGW1"));
    assert!(s.all("/electors?areas=").await.is_empty());
    assert!(s.all("/electors?areas=E05011391").await.is_empty());
    let ward = s.all("/electors?ward=E05999001").await;
    assert_eq!(
        ward.len(),
        s.electors_where(|r| r["ward"] == "E05999001").len()
    );
    let pd = s
        .all("/electors?local_authority=E09000025&polling_district=FGN2")
        .await;
    assert!(!pd.is_empty() && pd.iter().all(|r| r["polling_district"] == "FGN2"));
    let postcode = s.all("/electors?postcode=ls%2015").await;
    assert!(!postcode.is_empty());
    assert!(
        postcode
            .iter()
            .all(|r| r["postcode"].as_str().unwrap().starts_with("LS15 "))
    );
    s.stop().await;
}

#[tokio::test]
async fn fields_project_each_record_and_unknown_fields_are_refused() {
    let s = start().await;
    let page = s
        .get("/electors?fields=surname,postcode&per_page=5")
        .await
        .json();
    for r in page["records"].as_array().unwrap() {
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["elector_id", "surname", "postcode"]);
    }
    let one = s.get("/electors/VF-0000003?fields=ward").await.json();
    assert_eq!(one["record"].as_object().unwrap().len(), 2);
    let member = s.get("/members/M-000001?fields=branch").await.json();
    assert_eq!(
        member["record"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["membership_number", "branch"]
    );
    assert_problem(
        &s.get("/electors?fields=surname,shoe_size").await,
        StatusCode::BAD_REQUEST,
    );
    assert_problem(
        &s.get("/members?fields=markers").await,
        StatusCode::BAD_REQUEST,
    );
    s.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_problem_documents() {
    let s = start().await;
    let repeated = s.get("/electors?ward=E05011391&ward=E05013911").await;
    assert_problem(&repeated, StatusCode::BAD_REQUEST);
    assert_eq!(repeated.json()["title"], "bad request");
    for bad in [
        "/electors?colour=red",
        "/electors?polling_district=CGW1",
        "/electors?per_page=1001",
        "/electors?page=0",
        "/electors?ward=",
        "/electors/export?page=2",
        "/members?ward=E05011391",
        "/electors/VF-0000001?ward=E05011391",
    ] {
        assert_problem(&s.get(bad).await, StatusCode::BAD_REQUEST);
    }
    assert_problem(&s.get("/electors/VF-9999999").await, StatusCode::NOT_FOUND);
    assert_problem(&s.get("/voters").await, StatusCode::NOT_FOUND);
    let wrong = s.call(Method::DELETE, "/electors", None).await;
    assert_problem(&wrong, StatusCode::METHOD_NOT_ALLOWED);
    assert_problem(
        &s.get("/electors/VF-0000001/canvass").await,
        StatusCode::METHOD_NOT_ALLOWED,
    );
    let health = s.get("/healthz").await;
    assert_eq!(
        (health.status, health.json()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    s.stop().await;
}

#[tokio::test]
async fn canvass_writes_are_read_back() {
    let s = start().await;
    let target =
        s.electors_where(|r| r["markers"] == json!([]) && r["flags"] == json!([]))[0]["elector_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let path = format!("/electors/{target}/canvass");
    let update = json!({
        "voting_intention": "DK",
        "canvass_issues": ["housing", "transport"],
        "last_canvassed": "2026-12-02",
        "flags_add": ["do_not_contact"],
    });
    let written = s.call(Method::POST, &path, Some(update)).await;
    assert_eq!(written.status, StatusCode::OK);
    assert_eq!(written.json()["record"]["voting_intention"], "DK");
    let read = s.get(&format!("/electors/{target}")).await.json()["record"].clone();
    assert_eq!(read, written.json()["record"]);
    assert_eq!(read["canvass_issues"], json!(["housing", "transport"]));
    assert_eq!(read["last_canvassed"], "2026-12-02");
    assert_eq!(read["flags"], json!(["do_not_contact"]));
    for bad in [
        json!({"voting_intention": "MAYBE"}),
        json!({"flags_add": ["deceased"]}),
        json!({"last_canvassed": "2 December"}),
        json!({"surname": "Changed"}),
        json!(["not", "an", "object"]),
    ] {
        assert_problem(
            &s.call(Method::POST, &path, Some(bad)).await,
            StatusCode::BAD_REQUEST,
        );
    }
    let anonymous = s.electors_where(|r| r["markers"] == json!(["N"]))[0]["elector_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let anonymous = format!("/electors/{anonymous}/canvass");
    let refused = s
        .call(
            Method::POST,
            &anonymous,
            Some(json!({"voting_intention": "LAB"})),
        )
        .await;
    assert_problem(&refused, StatusCode::CONFLICT);
    let missing = s
        .call(
            Method::POST,
            "/electors/VF-9999999/canvass",
            Some(json!({})),
        )
        .await;
    assert_problem(&missing, StatusCode::NOT_FOUND);
    s.stop().await;
}

/// `exclude=protected` leaves anonymous electors and under-16s out before paging, in
/// listings and exports alike: pages count only the others. Anything but `protected` is a 400.
#[tokio::test]
async fn exclude_protected_leaves_the_never_disclosed_out_before_paging() {
    let s = start().await;
    let ward = |r: &Value| r["ward"] == "E05011391";
    let protected = |r: &Value| {
        r["markers"].as_array().unwrap().contains(&json!("N"))
            || r["flags"].as_array().unwrap().contains(&json!("under_16"))
    };
    let ids = |rs: &[Value]| -> Vec<String> {
        rs.iter()
            .map(|r| r["elector_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut want: Vec<String> = s
        .electors_where(|r| ward(r) && !protected(r))
        .iter()
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .collect();
    want.sort();
    let hidden = s.electors_where(|r| ward(r) && protected(r)).len();
    assert!(
        hidden > 0,
        "the ward holds no protected entry: this proves nothing"
    );
    let listed = s.all("/electors?ward=E05011391&exclude=protected").await;
    assert_eq!(ids(&listed), want);
    assert_eq!(
        s.all("/electors?ward=E05011391").await.len(),
        want.len() + hidden
    );
    // Paged one by one, no page is spent on a protected entry.
    let last = s
        .get(&format!(
            "/electors?ward=E05011391&exclude=protected&per_page=1&page={}",
            want.len()
        ))
        .await
        .json();
    assert_eq!(
        ids(last["records"].as_array().unwrap()),
        [want[want.len() - 1].clone()]
    );
    assert!(last["next_page"].is_null());
    let reply = s
        .get("/electors/export?ward=E05011391&exclude=protected")
        .await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ids(&lines), want);
    for path in ["/electors?exclude=anonymous", "/electors/export?exclude="] {
        assert_eq!(s.get(path).await.status, StatusCode::BAD_REQUEST, "{path}");
    }
    s.stop().await;
}

#[tokio::test]
async fn export_streams_exactly_the_filtered_records() {
    let s = start().await;
    for (query, want) in [
        (
            "ward=E05999001",
            s.electors_where(|r| r["ward"] == "E05999001").len(),
        ),
        (
            "areas=E09000025/FGN1,E06000060/IVR2&fields=surname",
            s.all("/electors?areas=E09000025/FGN1,E06000060/IVR2")
                .await
                .len(),
        ),
        ("", s.data.electors.len()),
    ] {
        let reply = s.get(&format!("/electors/export?{query}")).await;
        assert_eq!(
            (reply.status, reply.content_type.as_str()),
            (StatusCode::OK, "application/x-ndjson")
        );
        let text = String::from_utf8(reply.body.to_vec()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), want, "export?{query}");
        assert!(
            lines
                .windows(2)
                .all(|w| w[0]["elector_id"].as_str() < w[1]["elector_id"].as_str())
        );
    }
    s.stop().await;
}

/// A member's area is their branch (the catalogue's `area` template for members): naming
/// the district they live in, or their CLP, does not bring them in, since the gateway would
/// withhold them and the page would count them.
#[tokio::test]
async fn members_narrow_by_their_branch_alone() {
    let s = start().await;
    let elsewhere = (s.data.members.iter())
        .find(|m| m["branch"] != "BR-IVER")
        .unwrap();
    let text = |k: &str| elsewhere[k].as_str().unwrap().to_owned();
    let areas = format!(
        "{}/{},{},BR-IVER",
        text("local_authority"),
        text("polling_district"),
        text("clp")
    );
    let got = s.all(&format!("/members?areas={areas}")).await;
    let want = (s.data.members.iter())
        .filter(|m| m["branch"] == "BR-IVER")
        .count();
    assert!(want > 0, "no member of BR-IVER: this proves nothing");
    assert_eq!(got.len(), want);
    assert!(got.iter().all(|m| m["branch"] == "BR-IVER"));
    let branch = s.all("/members?branch=BR-IVER&status=active").await;
    assert!(
        branch
            .iter()
            .all(|m| m["branch"] == "BR-IVER" && m["status"] == "active")
    );
    let one = s.get("/members/M-000002").await.json();
    assert_eq!(one["record"]["membership_number"], "M-000002");
    s.stop().await;
}

#[tokio::test]
async fn a_streamed_store_serves_the_same_records_in_the_same_key_order() {
    let s = start().await;
    let settings = GenSettings {
        electors: 1500,
        members: 300,
        ..GenSettings::default()
    };
    let streamed = Datastore::generate(&settings, AREAS).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, streamed, async move {
        let _ = stopped.await;
    }));
    let other = Running {
        base,
        client: s.client.clone(),
        data: s.data.clone(),
        stop,
        task,
    };
    for path in [
        "/electors/export",
        "/members?per_page=1000",
        "/electors/VF-0001234",
    ] {
        assert_eq!(s.get(path).await.body, other.get(path).await.body, "{path}");
    }
    let text =
        String::from_utf8(s.get("/electors/export?ward=E05013911").await.body.to_vec()).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ELECTOR_KEYS);
    other.stop().await;
    s.stop().await;
}

/// An attainer date that makes an under-16 (`filter::under_16_on`) is as protected as the
/// flag, and one that is no date is left out too (the gateway withholds it as malformed).
#[test]
fn an_attainer_date_under_16_or_unreadable_is_protected() {
    use super::table::protected;
    let today = time::OffsetDateTime::now_utc().date();
    let with = |v: Value| json!({"markers": [], "flags": [], "attainer_date": v});
    let in_days = |n: i64| json!((today + time::Duration::days(n)).to_string());
    assert!(!protected(&json!({"markers": [], "flags": []})));
    assert!(!protected(&with(Value::Null)));
    assert!(!protected(&with(in_days(300))));
    assert!(protected(&with(in_days(3 * 365))));
    assert!(protected(&with(json!("soon"))));
    assert!(protected(&with(json!(20301124))));
}

/// `exclude=protected` leaves out what the gateway never discloses, read as the gateway reads
/// it: a marker not of a marker's form is an anonymous elector's, and `under_16` however spelt
/// is an under-16's. Else such an entry, withheld by the gateway, would still count in a page.
#[test]
fn protected_entries_are_read_as_the_gateway_reads_them() {
    use super::table::protected;
    let with = |markers: Value, flags: Value| json!({ "markers": markers, "flags": flags, "attainer_date": null });
    for (markers, flags) in [
        (json!(["N"]), json!([])),
        (json!(["n"]), json!([])),
        (json!(["NNN"]), json!([])),
        (json!([]), json!(["under_16"])),
        (json!([]), json!(["UNDER_16"])),
        (json!([]), json!(["under-16"])),
        (json!(["F"]), json!(["Under 16"])),
    ] {
        assert!(
            protected(&with(markers.clone(), flags.clone())),
            "{markers} {flags}"
        );
    }
    for (markers, flags) in [
        (json!([]), json!([])),
        (json!(["F", "G"]), json!(["deceased"])),
        (json!(["E"]), json!(["under_18"])),
    ] {
        assert!(
            !protected(&with(markers.clone(), flags.clone())),
            "{markers} {flags}"
        );
    }
}
