//! Shared controls across replicas, against a real `redis-server` started on a free port:
//! a restriction or revocation placed on one replica is enforced by another; a restriction
//! survives FLUSHALL and a replica restart; with Redis down, replicas serve within the staleness
//! bound, then answer 503 without data, then recover by themselves. Latencies are measured and
//! printed, not asserted (the deadlines below only stop a broken test from hanging).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::time::{Duration, Instant};

use common::{AppOptions, RedisServer, TestApp, spawn_app_with};

/// Polls until `check` holds; returns how long it took. The bound only ends a wait that
/// would never end: a replica reading 10,050 events took 5-13 s here, and over 20 s with a
/// build running beside it.
async fn until<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

async fn replica(
    upstream: std::net::SocketAddr,
    redis: &RedisServer,
    keys_from: Option<&TestApp>,
) -> TestApp {
    spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        keys_from: keys_from.map(|a| a.dir.path().to_path_buf()),
        ..Default::default()
    })
    .await
}

/// An ordinary elector in the councillor's ward.
/// Waits until `app` answers `/readyz` with 200 (its shared controls caught up).
async fn until_ready(what: &str, app: &TestApp) {
    until(what, || async {
        app.admin_get("/readyz").await.status == 200
    })
    .await;
}

/// Waits until the councillor's canvassing read of `path` on `app` is 404: a restriction
/// placed elsewhere has reached it.
async fn until_withheld(what: &str, app: &TestApp, path: &str) {
    until(what, || async {
        app.get(path, Some(&app.token("councillor")), Some("canvassing"))
            .await
            .status
            == 404
    })
    .await;
}

/// The DPO places a `restricted` flag on `id` under `reference`.
async fn restrict(app: &TestApp, id: &str, reference: &str) -> common::Resp {
    let body = format!(r#"{{"kind":"restricted","reference":"{reference}","reason":"Art 18"}}"#);
    app.admin_post(&format!("/rights/{id}"), &app.token("dpo"), &body)
        .await
}

async fn visible_elector(app: &TestApp) -> String {
    visible_elector_and_postcode(app).await.0
}

/// The same elector and their postcode, as a read under a look-up purpose (casework) names it.
async fn visible_elector_and_postcode(app: &TestApp) -> (String, String) {
    let r = app
        .get(
            "/voter/electors?per_page=50",
            Some(&app.token("councillor")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let record = &r.json()["records"][0];
    let text = |f: &str| record[f].as_str().unwrap().to_owned();
    (text("elector_id"), text("postcode"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restriction_placed_on_one_replica_is_enforced_by_the_other() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let a = replica(upstream, &redis, None).await;
    let b = replica(upstream, &redis, Some(&a)).await;
    until_ready("replica b ready", &b).await;
    let id = visible_elector(&b).await;
    let path = format!("/voter/electors/{id}");
    assert_eq!(
        b.get(&path, Some(&b.token("councillor")), Some("canvassing"))
            .await
            .status,
        200
    );

    let placed = a
        .admin_post(&format!("/rights/{id}"), &a.token("dpo"), r#"{"kind":"restricted","reference":"RR-2026-0042","reason":"Art 18 request by letter"}"#)
        .await;
    assert_eq!(placed.status, 200, "{:?}", placed.body);
    let took = until("restriction enforced on b", || async {
        b.get(&path, Some(&b.token("councillor")), Some("canvassing"))
            .await
            .status
            == 404
    })
    .await;
    eprintln!(
        "restriction placed on replica a enforced on replica b after {} ms",
        took.as_millis()
    );
    // Rights handling still sees the record, and the register says who placed it and why.
    assert_eq!(
        b.get(&path, Some(&b.token("dpo")), Some("sar_fulfilment"))
            .await
            .status,
        200
    );
    let reg = b
        .admin_get_with(&format!("/rights/{id}"), &b.token("dpo"))
        .await;
    assert_eq!(reg.json()["restrictions"][0]["reference"], "RR-2026-0042");
    assert_eq!(reg.json()["restrictions"][0]["placed_by"], "demo-dpo");
    // The change is in a's audit log with who and why.
    let change = a
        .audit_records()
        .into_iter()
        .find(|r| r["kind"] == "admin" && r["path"] == format!("/rights/{id}"))
        .unwrap();
    assert_eq!(change["caller"]["role"], "dpo");
    assert_eq!(change["detail"]["reason"], "Art 18 request by letter");

    // Only the DPO may place or lift restrictions, and a refusal is audited too.
    for path in [format!("/rights/{id}"), format!("/rights/{id}/lift")] {
        let denied = a
            .admin_post(
                &path,
                &a.token("security"),
                r#"{"kind":"restricted","reference":"x","reason":"y"}"#,
            )
            .await;
        assert_eq!(denied.status, 403, "{path}: {:?}", denied.body);
        let refused = a.audit_for(&denied);
        assert_eq!(refused["decision"], "deny", "{refused}");
        assert_eq!(refused["caller"]["role"], "security", "{refused}");
        assert_eq!(refused["path"], path.as_str(), "{refused}");
    }
    // A second request of the same kind (an objection pending) is its own placement: lifting
    // the first (its dispute settled) leaves the second in force, on every replica.
    let second = a
        .admin_post(&format!("/rights/{id}"), &a.token("dpo"), r#"{"kind":"restricted","reference":"RR-2026-0050","reason":"Art 21 objection pending"}"#)
        .await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    let references = |r: &common::Resp| -> Vec<String> {
        (r.json()["restrictions"].as_array().unwrap().iter())
            .map(|p| p["reference"].as_str().unwrap().to_owned())
            .collect()
    };
    until("the second placement reaches b", || async {
        references(
            &b.admin_get_with(&format!("/rights/{id}"), &b.token("dpo"))
                .await,
        ) == ["RR-2026-0042", "RR-2026-0050"]
    })
    .await;
    let first_lifted = b
        .admin_post(
            &format!("/rights/{id}/lift"),
            &b.token("dpo"),
            r#"{"kind":"restricted","reference":"RR-2026-0042","reason":"accuracy dispute settled"}"#,
        )
        .await;
    assert_eq!(first_lifted.status, 200, "{:?}", first_lifted.body);
    until("the first lift reaches a", || async {
        references(
            &a.admin_get_with(&format!("/rights/{id}"), &a.token("dpo"))
                .await,
        ) == ["RR-2026-0050"]
    })
    .await;
    for app in [&a, &b] {
        let r = app
            .get(&path, Some(&app.token("councillor")), Some("canvassing"))
            .await;
        assert_eq!(r.status, 404, "the second request still holds");
    }
    // A lift must name a request in force: one naming another, or one lifted, is refused
    // (409) and says which are in force.
    for reference in ["RR-2026-0042", "RR-1999-0001"] {
        let wrong = a
            .admin_post(
                &format!("/rights/{id}/lift"),
                &a.token("dpo"),
                &format!(r#"{{"kind":"restricted","reference":"{reference}","reason":"x"}}"#),
            )
            .await;
        assert_eq!(wrong.status, 409, "{:?}", wrong.body);
        assert_eq!(wrong.json()["type"], "urn:wardgate:problem:not-in-force");
        assert!(
            wrong.json()["detail"]
                .as_str()
                .unwrap()
                .contains("`RR-2026-0050`"),
            "{:?}",
            wrong.body
        );
        assert_eq!(a.audit_for(&wrong)["reason"], "not_in_force");
    }
    // Lifting the last restores it everywhere.
    let lifted = a
        .admin_post(
            &format!("/rights/{id}/lift"),
            &a.token("dpo"),
            r#"{"kind":"restricted","reference":"RR-2026-0050","reason":"objection withdrawn"}"#,
        )
        .await;
    assert_eq!(lifted.status, 200);
    until("lift reaches b", || async {
        b.get(&path, Some(&b.token("councillor")), Some("canvassing"))
            .await
            .status
            == 200
    })
    .await;

    // Revocation: the security team revokes the councillor everywhere.
    let revoked = a
        .admin_post(
            "/revocations",
            &a.token("security"),
            r#"{"subject":"demo-councillor","reason":"laptop stolen"}"#,
        )
        .await;
    assert_eq!(revoked.status, 200, "{:?}", revoked.body);
    let took = until("revocation enforced on b", || async {
        b.get(
            "/voter/electors",
            Some(&a.token("councillor")),
            Some("canvassing"),
        )
        .await
        .status
            == 401
    })
    .await;
    eprintln!(
        "revocation placed on replica a enforced on replica b after {} ms",
        took.as_millis()
    );
    let r = b
        .get(
            "/voter/electors",
            Some(&a.token("councillor")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.json()["type"], "urn:wardgate:problem:token-revoked");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restriction_survives_flushall_and_a_replica_restart() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let a = replica(upstream, &redis, None).await;
    until_ready("a ready", &a).await;
    let id = visible_elector(&a).await;
    let path = format!("/voter/electors/{id}");
    let read = (a.get(&path, Some(&a.token("councillor")), Some("canvassing"))).await;
    assert_eq!(read.status, 200, "readable before the restriction");
    let placed = restrict(&a, &id, "RR-1").await;
    assert_eq!(placed.status, 200);
    redis.flushall();
    let a = a.restart().await;
    until_ready("a ready after restart", &a).await;
    assert_eq!(
        a.get(&path, Some(&a.token("councillor")), Some("canvassing"))
            .await
            .status,
        404,
        "the journal restored the restriction"
    );
    // A brand-new replica (empty data dir) learns it from the stream a republished.
    let c = replica(upstream, &redis, Some(&a)).await;
    until_withheld("c learns the restriction", &c, &path).await;
    a.stop().await;
    c.stop().await;
}

/// A replica whose `redis.key_file` is not the others' would refuse, as unsigned, every change
/// they publish (and they its), while reading the stream kept it fresh: all go stale instead,
/// refusing data, whichever started first, until the other key is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_two_keys_go_stale_rather_than_miss_each_others_changes() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let a = replica(upstream, &redis, None).await;
    until_ready("a ready", &a).await;
    let other = tempfile::tempdir().unwrap();
    let other_key = other.path().join("controls.key");
    std::fs::write(&other_key, hex::encode(rand::random::<[u8; 32]>())).unwrap();
    let b = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        keys_from: Some(a.dir.path().to_path_buf()),
        edit: Some(Box::new(move |c| {
            c.redis.as_mut().unwrap().key_file = other_key;
        })),
        ..Default::default()
    })
    .await;
    // B is never ready; A, which was, goes stale within the bound (2 s).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let ready = b.admin_get("/readyz").await;
        assert_eq!(ready.status, 503, "b is ready: {:?}", ready.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for app in [&a, &b] {
        let r = app
            .get(
                "/voter/electors?per_page=5",
                Some(&app.token("councillor")),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert_eq!(r.json()["type"], "urn:wardgate:problem:controls-stale");
    }
    // The replica with the other key gone, and its key check with it: A serves again.
    b.stop().await;
    // Deleted at each look: a sync of B's under way as it stopped may put its key back once.
    until("a ready again", || async {
        let _: () = redis::cmd("DEL")
            .arg("wardgate:controls:keys")
            .query(&mut redis.connection())
            .unwrap();
        a.admin_get("/readyz").await.status == 200
    })
    .await;
    a.stop().await;
}

/// Key checks are scored and forgotten by Redis's clock (`TIME`), not each replica's: by its
/// own, a replica whose clock ran a minute ahead of the others would forget their checks as it
/// added its own and, holding another key, stay fresh while refusing every change they
/// publish. A replica whose user may not ask Redis the time cannot check, and is never ready
/// until it may. (Both share this machine's clock here: the test shows that the check asks
/// Redis, not what a replica running fast would have done.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_checks_are_scored_by_the_stores_clock() {
    let redis = RedisServer::start();
    let mut admin = redis.connection();
    let acl = |rule: &str| {
        let mut acl = redis::cmd("ACL");
        acl.arg("SETUSER").arg("gateway");
        for word in rule.split(' ') {
            acl.arg(word);
        }
        acl
    };
    let _: () = acl("on >gateway-pw resetkeys ~* resetchannels +@all -time")
        .query(&mut admin)
        .unwrap();
    let (upstream, _store) = common::start_datastore(800).await;
    let a = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(format!(
            "redis://gateway:gateway-pw@127.0.0.1:{}/",
            redis.port
        )),
        ..Default::default()
    })
    .await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let ready = a.admin_get("/readyz").await;
        assert_eq!(ready.status, 503, "ready without TIME: {:?}", ready.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: () = acl("+time").query(&mut admin).unwrap();
    until_ready("a ready once it may ask the time", &a).await;
    a.stop().await;
}

/// A replica on `redis` in front of `upstream` whose full resynchronisation comes only every
/// ten minutes (beyond any test), so that what reaches it sooner came some other way; with
/// `keys_from`'s signing key.
fn slow_resync(
    upstream: std::net::SocketAddr,
    redis: &RedisServer,
    keys_from: Option<&TestApp>,
) -> AppOptions {
    AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        keys_from: keys_from.map(|a| a.dir.path().to_path_buf()),
        edit: Some(Box::new(|c| {
            c.redis.as_mut().unwrap().resync_interval = Duration::from_secs(600);
        })),
        ..Default::default()
    }
}

/// A `FLUSHALL` ends no connection and leaves a read of the stream only empty: the replicas
/// notice the store's new life at their next read, not at their next full resynchronisation
/// (ten minutes here), and republish what it lost, so a replica started meanwhile with an
/// empty journal learns a restriction placed before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_store_is_given_its_events_back_before_the_next_resync() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let slow_resync = |keys_from| slow_resync(upstream, &redis, keys_from);
    let a = spawn_app_with(slow_resync(None)).await;
    until_ready("a ready", &a).await;
    let id = visible_elector(&a).await;
    assert_eq!(restrict(&a, &id, "RR-9").await.status, 200);
    redis.flushall();
    let c = spawn_app_with(slow_resync(Some(&a))).await;
    let path = format!("/voter/electors/{id}");
    until_withheld("c learns the restriction", &c, &path).await;
    a.stop().await;
    c.stop().await;
}

/// Two replicas sharing `redis` (resynchronising only every ten minutes: `slow_resync`), both
/// ready, a first restriction placed on the first and learnt by the second (which opens the
/// first's publishing connection), and another elector the councillor's canvassing read on
/// the second shows.
async fn two_slow_replicas(
    upstream: std::net::SocketAddr,
    redis: &RedisServer,
) -> (TestApp, TestApp, String) {
    let a = spawn_app_with(slow_resync(upstream, redis, None)).await;
    until_ready("a ready", &a).await;
    let b = spawn_app_with(slow_resync(upstream, redis, Some(&a))).await;
    until_ready("b ready", &b).await;
    let r = b
        .get(
            "/voter/electors?per_page=2",
            Some(&b.token("councillor")),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = |n: usize| {
        r.json()["records"][n]["elector_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (first, second) = (id(0), id(1));
    assert_eq!(restrict(&a, &first, "RR-1").await.status, 200);
    until_withheld(
        "b learns the first restriction",
        &b,
        &format!("/voter/electors/{first}"),
    )
    .await;
    (a, b, second)
}

/// A replica keeps its publishing connection between changes, which may be hours apart; Redis
/// (its `timeout`, a restart) or a proxy closing it meanwhile must not keep the next change
/// from the other replicas until the next full resynchronisation (ten minutes here), nor
/// refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_after_the_publishing_connection_died_reaches_the_other_replica() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let (a, b, second) = two_slow_replicas(upstream, &redis).await;
    // Every client connection is closed, as Redis's `timeout` closes an idle one (the
    // replicas' readers reconnect of their own accord; `a`'s publisher is met only at its
    // next change).
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut redis.connection())
        .unwrap();
    assert!(killed >= 2, "{killed} connections closed");
    until_ready("a ready again", &a).await;
    until_ready("b ready again", &b).await;
    let placed = restrict(&a, &second, "RR-2").await;
    assert_eq!(placed.status, 200, "{:?}", placed.body);
    until_withheld(
        "b learns the second restriction",
        &b,
        &format!("/voter/electors/{second}"),
    )
    .await;
    a.stop().await;
    b.stop().await;
}

/// A change whose publishing fails while the replicas' reading connections hold (here the
/// publishing connection closed, and Redis at `maxclients`, refusing a new one) is answered
/// 503 `controls-not-shared` and holds at once where it was made; the other replica, fresh all
/// the while, learns it from the republishing that failure starts, not at the next full
/// resynchronisation (ten minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_could_not_be_published_reaches_the_other_replica_before_the_next_resync() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let (a, b, second) = two_slow_replicas(upstream, &redis).await;
    let mut admin = redis.connection();
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
    let publisher = (clients.lines())
        .find(|l| l.contains(&format!(" name={} ", wardgate::controls::PUBLISHER_NAME)))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("no publishing connection in {clients}"))
        .to_owned();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(1)
        .query(&mut admin)
        .unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&publisher)
        .query(&mut admin)
        .unwrap();
    assert_eq!(killed, 1);
    let placed = restrict(&a, &second, "RR-2").await;
    assert_eq!(placed.status, 503, "{:?}", placed.body);
    assert_eq!(
        placed.json()["type"],
        "urn:wardgate:problem:controls-not-shared"
    );
    let path = format!("/voter/electors/{second}");
    until_withheld("a holds the second restriction at once", &a, &path).await;
    until_withheld("b learns the second restriction", &b, &path).await;
    // Both stayed fresh: their reading connections held throughout.
    assert_eq!(b.admin_get("/readyz").await.status, 200);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(10_000)
        .query(&mut admin)
        .unwrap();
    a.stop().await;
    b.stop().await;
}

/// A replica whose changes Redis refuses to add to the stream while it reads it still (here
/// an ACL without `XADD`) holds them itself and stays fresh past the staleness bound: its
/// mirror is current, and going stale would protect nobody. It offers them again, waiting
/// longer each time, and the other replica learns them once Redis takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_redis_refuses_are_offered_again_and_the_replica_stays_fresh() {
    let redis = RedisServer::start();
    let mut admin = redis.connection();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("noxadd")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-xadd")
        .query(&mut admin)
        .unwrap();
    let (upstream, _store) = common::start_datastore(800).await;
    let short_bound = |url: String, keys_from: Option<&TestApp>| AppOptions {
        upstream: Some(upstream),
        redis: Some(url),
        keys_from: keys_from.map(|a| a.dir.path().to_path_buf()),
        edit: Some(Box::new(|c| {
            let r = c.redis.as_mut().unwrap();
            r.staleness_bound = Duration::from_secs(2);
            r.resync_interval = Duration::from_secs(600);
        })),
        ..Default::default()
    };
    let url = redis.url().replace("redis://", "redis://noxadd:pw@");
    let a = spawn_app_with(short_bound(url, None)).await;
    until_ready("a ready", &a).await;
    let b = spawn_app_with(short_bound(redis.url(), Some(&a))).await;
    until_ready("b ready", &b).await;
    let id = visible_elector(&b).await;
    let placed = restrict(&a, &id, "RR-1").await;
    assert_eq!(placed.status, 503, "{:?}", placed.body);
    assert_eq!(
        placed.json()["type"],
        "urn:wardgate:problem:controls-not-shared"
    );
    let path = format!("/voter/electors/{id}");
    until_withheld("a holds it at once", &a, &path).await;
    // Three bounds on, with its republishing refused all the while: still fresh.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(a.admin_get("/readyz").await.status, 200);
    let r = b
        .get(&path, Some(&b.token("councillor")), Some("canvassing"))
        .await;
    assert_eq!(r.status, 200, "b cannot have heard of it: {:?}", r.body);
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("noxadd")
        .arg("+xadd")
        .query(&mut admin)
        .unwrap();
    until_withheld("b learns it once Redis takes it", &b, &path).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_replicas_serve_then_fail_closed_then_recover() {
    let mut redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let a = replica(upstream, &redis, None).await;
    until_ready("a ready", &a).await;
    let token = a.token("councillor");
    redis.stop();
    let down = Instant::now();
    // Within the staleness bound (2 s here) the mirror still serves.
    let r = a
        .get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, 200);
    // Past the bound (and a second's margin for the last sync before Redis went) it has
    // failed closed already: the next request is refused, without waiting for it to be.
    tokio::time::sleep_until((down + Duration::from_secs(3)).into()).await;
    let stale_after = down.elapsed();
    let r = a
        .get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.json()["type"], "urn:wardgate:problem:controls-stale");
    assert!(!String::from_utf8_lossy(&r.body).contains("records"));
    let ready = a.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    // Not ready says why: the controls, not the log.
    assert_eq!(ready.json()["type"], "urn:wardgate:problem:controls-stale");
    eprintln!(
        "redis down: the mirror served for {} ms, then 503 (bound 2000 ms); {} ms since redis stopped",
        stale_after.as_millis(),
        down.elapsed().as_millis()
    );
    let _again = RedisServer::start_on(redis.port);
    let recovered = until("recover", || async {
        a.get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await
        .status
            == 200
    })
    .await;
    eprintln!(
        "redis back: replica recovered after {} ms without a restart",
        recovered.as_millis()
    );
    a.stop().await;
}

/// A restriction the DPO places while Redis is away is journalled, so it takes effect on that
/// replica at once (as it would after a restart), not when Redis comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restriction_placed_while_redis_is_away_holds_at_once_on_its_replica() {
    // A bound no slow machine reaches while the test reads: what holds the record back is the
    // journalled placement, not a mirror gone stale.
    fn long_bound(c: &mut wardgate::config::Config) {
        if let Some(r) = c.redis.as_mut() {
            r.staleness_bound = Duration::from_secs(600);
        }
    }
    let mut redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let a = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        tweak: Some(long_bound),
        ..Default::default()
    })
    .await;
    until_ready("a ready", &a).await;
    let id = visible_elector(&a).await;
    let path = format!("/voter/electors/{id}");
    let token = a.token("councillor");
    let read = || a.get(&path, Some(&token), Some("canvassing"));
    assert_eq!(read().await.status, 200);

    redis.stop();
    let placed = restrict(&a, &id, "SAR-away").await;
    // Not on every replica yet: the DPO is told so, and told not to place it again.
    assert_eq!(placed.status, 503, "{:?}", placed.body);
    assert_eq!(
        placed.json()["type"],
        "urn:wardgate:problem:controls-not-shared"
    );
    assert!(
        a.audit_records()
            .iter()
            .any(|r| r["reason"] == "controls_not_shared" && r["status"] == 503),
        "the placement's outcome is in the log as it is"
    );
    let r = read().await;
    assert_eq!(r.status, 404, "{:?}", String::from_utf8_lossy(&r.body));
    // Not a stale mirror's 503: the placement, held without Redis.
    assert_eq!(r.json()["type"], "urn:wardgate:problem:not-found");
    assert!(!String::from_utf8_lossy(&r.body).contains(&id));

    // Once Redis is back the placement is republished and stays.
    let _again = RedisServer::start_on(redis.port);
    until_ready("a caught up", &a).await;
    assert_eq!(read().await.status, 404);
    a.stop().await;
}

/// Past the staleness bound of a Redis outage, the admin plane still takes a restriction and
/// a token's revocation, which hold on the replica at once and are republished when Redis is
/// back; a lift, a subject's revocation, a read of the register and the console wait for a
/// fresh mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_restrictions_and_revocations_are_still_taken() {
    let mut redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let a = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        ..Default::default()
    })
    .await;
    until_ready("a ready", &a).await;
    let (id, postcode) = visible_elector_and_postcode(&a).await;
    let claims = a.claims("councillor", &["E05011391"], &["canvassing"]);
    let councillor = a.sign(&claims);
    let (caseworker, path) = (
        a.token("mp_caseworker"),
        format!(
            "/voter/electors/{id}?postcode={}",
            postcode.replace(' ', "+")
        ),
    );
    let r = a.get(&path, Some(&caseworker), Some("casework")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    redis.stop();
    until("stale", || async {
        a.admin_get("/readyz").await.status == 503
    })
    .await;
    let dpo = a.token("dpo");
    let placed = restrict(&a, &id, "SAR-stale").await;
    assert_eq!(placed.status, 503, "{:?}", placed.body);
    assert_eq!(
        placed.json()["type"],
        "urn:wardgate:problem:controls-not-shared",
        "taken here, not refused as stale"
    );
    // This replica's copy is stale: a reference it holds as in force may have been lifted on
    // another meanwhile, so the DPO is not told it is in force; the placement is taken.
    let again = restrict(&a, &id, "SAR-stale").await;
    assert_eq!(
        again.json()["type"],
        "urn:wardgate:problem:controls-not-shared",
        "{:?}",
        again.body
    );
    let revoke = |what: serde_json::Value| {
        let (a, security) = (&a, a.token("security"));
        async move {
            a.admin_post("/revocations", &security, &what.to_string())
                .await
        }
    };
    let revoked =
        revoke(serde_json::json!({ "token_id": claims["jti"], "reason": "laptop stolen" })).await;
    assert_eq!(
        revoked.json()["type"],
        "urn:wardgate:problem:controls-not-shared",
        "{:?}",
        revoked.body
    );
    let stale = |r: &common::Resp| {
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert_eq!(r.json()["type"], "urn:wardgate:problem:controls-stale");
    };
    let lift = r#"{"kind":"restricted","reference":"SAR-stale","reason":"lifted"}"#;
    stale(
        &a.admin_post(&format!("/rights/{id}/lift"), &dpo, lift)
            .await,
    );
    stale(&a.admin_get_with(&format!("/rights/{id}"), &dpo).await);
    stale(&a.admin_get_with("/alerts", &a.token("security")).await);
    let contain = r#"{"reason":"scraping"}"#;
    stale(
        &a.admin_post("/alerts/A-1/contain", &a.token("security"), contain)
            .await,
    );
    // A subject's revocation, made with an admin token whose own revocation this replica may
    // not have heard of, could lock out those who would answer it: it waits too.
    stale(&revoke(serde_json::json!({ "subject": "demo-dpo", "reason": "x" })).await);

    // Back: both held, and reached Redis.
    let _again = RedisServer::start_on(redis.port);
    until_ready("a caught up", &a).await;
    let read = || a.get(&path, Some(&caseworker), Some("casework"));
    // A role with a quota waits for its counts to reach Redis again too.
    until("quota counts shared again", || async {
        read().await.status != 503
    })
    .await;
    let r = read().await;
    assert_eq!(r.status, 404, "the restriction held: {:?}", r.body);
    let r = a
        .get(
            "/voter/electors?per_page=5",
            Some(&councillor),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.json()["type"], "urn:wardgate:problem:token-revoked");
    let mut conn = redis.connection();
    let entries: usize = redis::cmd("XLEN")
        .arg("wardgate:controls")
        .query(&mut conn)
        .unwrap();
    assert!(entries >= 2, "republished: {entries} entries");
    a.stop().await;
}

/// A stream longer than one page of `XRANGE` is read whole: a replica joining a stream of
/// 10,050 events knows the last of them. Replica `a` republishes them from its journal (the
/// way a stream lost to a Redis restart is restored); `b` reads them from Redis alone. (This
/// shows the paging is right, not that it was needed: a local Redis answers one `XRANGE` of
/// 10,050 entries well within the timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_is_read_whole() {
    const EVENTS: usize = 10_050;
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(200).await;
    let journal_dir = tempfile::tempdir().unwrap();
    let mut journal = String::new();
    for i in 0..EVENTS {
        let subject = if i + 1 == EVENTS {
            "VF-0000001".to_owned()
        } else {
            format!("VF-9{i:06}")
        };
        let event = serde_json::json!({
            "id": format!("{i:032x}"), "at": 1_700_000_000_000_i64 + i as i64,
            "by": "demo-dpo", "reason": "Art 18", "change": "place",
            "subject": subject, "kind": "restricted", "reference": format!("SAR-{i}"),
        });
        journal.push_str(&event.to_string());
        journal.push('\n');
    }
    std::fs::write(journal_dir.path().join("controls.jsonl"), journal).unwrap();
    let a = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        data_dir: Some(journal_dir.path().to_path_buf()),
        ..Default::default()
    })
    .await;
    let mut conn = redis.connection();
    until("the journal republished", || {
        let n: usize = redis::cmd("XLEN")
            .arg("wardgate:controls")
            .query(&mut conn)
            .unwrap();
        async move { n >= EVENTS }
    })
    .await;
    let b = replica(upstream, &redis, Some(&a)).await;
    until_ready("b read the stream", &b).await;
    let r = b
        .admin_get_with("/rights/VF-0000001", &b.token("dpo"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.json()["restrictions"][0]["reference"],
        format!("SAR-{}", EVENTS - 1),
        "the last event, past the first page"
    );
    b.stop().await;
    a.stop().await;
}

/// How long `slow_datastore` holds an answer back.
#[derive(Clone)]
enum Hold {
    For(Duration),
    /// Until the test says (one answer per notification).
    Until(std::sync::Arc<tokio::sync::Notify>),
}

/// A datastore that holds back every answer (or, with `posts_only`, every answer to a POST):
/// a TCP relay to `real` that holds back the first bytes answering each request it passes on.
async fn slow_datastore(
    real: std::net::SocketAddr,
    hold: Hold,
    posts_only: bool,
) -> std::net::SocketAddr {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let hold = hold.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(real).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let asked = Arc::new(AtomicBool::new(false));
                let asking = Arc::clone(&asked);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                        if !posts_only || buf[..n].starts_with(b"POST ") {
                            asking.store(true, Ordering::SeqCst);
                        }
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                    if asked.swap(false, Ordering::SeqCst) {
                        match &hold {
                            Hold::For(delay) => tokio::time::sleep(*delay).await,
                            Hold::Until(release) => release.notified().await,
                        }
                    }
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The mirror must be within its staleness bound when an answer is judged, not only when the
/// request arrived: a datastore slower than the bound cannot carry a stale mirror's verdicts
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_slower_than_the_staleness_bound_is_judged_on_a_fresh_mirror_or_not_at_all() {
    let mut redis = RedisServer::start();
    let (real, _store) = common::start_datastore(800).await;
    let slow = slow_datastore(real, Hold::For(Duration::from_secs(3)), false).await;
    let a = replica(slow, &redis, None).await;
    until_ready("a ready", &a).await;
    let token = a.token("councillor");
    let list = || {
        a.get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
    };

    let r = list().await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));

    redis.stop();
    // Asked within the bound (2 s here), answered by the datastore after it.
    let asked = Instant::now();
    let r = list().await;
    assert!(asked.elapsed() >= Duration::from_secs(3));
    assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["type"], "urn:wardgate:problem:controls-stale");
    assert!(!String::from_utf8_lossy(&r.body).contains("records"));
    a.stop().await;
}

/// A change this replica's journal cannot take is in effect nowhere, and the answer says so
/// (503 `controls-not-recorded`, not a stale store). The part of its line the full disk took
/// is cut off, so the change made again once there is room is journalled whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_journal_cannot_take_is_in_effect_nowhere_and_leaves_it_whole() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let Some(_tmpfs) = common::Tmpfs::mount_or_skip(&data, "64k") else {
        return;
    };
    // Blank lines (which the journal skips) to six bytes short of a page: the next event's
    // line begins in a page the disk already holds and needs another.
    let page = std::process::Command::new("getconf")
        .arg("PAGESIZE")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8(o.stdout)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(4096);
    let padded = page as u64 - 6;
    let journal = data.join("controls.jsonl");
    std::fs::write(&journal, " ".repeat(page - 7) + "\n").unwrap();
    let app = spawn_app_with(AppOptions {
        data_dir: Some(data.clone()),
        ..Default::default()
    })
    .await;
    let id = visible_elector(&app).await;
    let token = app.token("councillor");
    let path = format!("/voter/electors/{id}");
    let read = || app.get(&path, Some(&token), Some("canvassing"));
    assert_eq!(read().await.status, 200);

    common::fill(&data);
    let r = restrict(&app, &id, "SAR-2026-0117").await;
    assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["type"],
        "urn:wardgate:problem:controls-not-recorded"
    );
    let audit = app.audit_for(&r);
    assert_eq!(audit["reason"], "controls_not_recorded", "{audit}");
    assert_eq!(read().await.status, 200, "not in effect here either");
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), padded);

    std::fs::remove_file(data.join("filler")).unwrap();
    assert_eq!(restrict(&app, &id, "SAR-2026-0117").await.status, 200);
    assert_eq!(read().await.status, 404);
    let text = std::fs::read_to_string(&journal).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{text}");
    app.stop().await;
}

/// A caller revoked while the datastore is taking its write gets the write's answer as done
/// (it was: an error would have it sent again) with nothing of the record shown, and the
/// record says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_revoked_during_a_write_sees_nothing_of_the_record_written() {
    let (real, _store) = common::start_datastore(800).await;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let slow = slow_datastore(real, Hold::Until(release.clone()), true).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(slow),
        ..Default::default()
    })
    .await;
    let token = app.token("canvasser");
    let walk = app
        .get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(
        walk.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&walk.body)
    );
    let id = walk.json()["records"][0]["elector_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let write = {
        let (app, token, id) = (&app, token.clone(), id.clone());
        async move {
            app.canvass(&id, &token, "canvassing", r#"{"voting_intention":"LAB"}"#)
                .await
        }
    };
    let revoke = async {
        // Once the write's intent is on record it is on its way to the datastore, which
        // holds its answer until the revocation has been made.
        until("write intended", || async {
            app.audit_records()
                .iter()
                .any(|r| r["detail"]["write"] == "intended")
        })
        .await;
        let revoked = app
            .admin_post(
                "/revocations",
                &app.token("security"),
                r#"{"subject":"demo-canvasser","reason":"phone stolen on the doorstep"}"#,
            )
            .await;
        release.notify_one();
        revoked
    };
    let (r, revoked) = tokio::join!(write, revoke);
    assert_eq!(revoked.status, 200, "{:?}", revoked.body);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), serde_json::json!({ "record": null }));
    let audit = app.audit_for(&r);
    assert_eq!(audit["detail"]["because"], "token_revoked", "{audit}");
    assert_eq!(audit["detail"]["shown"], "nothing", "{audit}");
    assert_eq!(
        audit["detail"]["written"],
        serde_json::json!(["voting_intention"]),
        "{audit}"
    );
    assert_eq!(audit["fields"], serde_json::json!([]), "{audit}");
    // The datastore took it.
    let stored = common::datastore_body(real, &format!("/electors/{id}")).await;
    let stored: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(stored["record"]["voting_intention"], "LAB", "{stored}");
    // And the revoked caller gets no further.
    let again = app
        .get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(again.status, 401);
    app.stop().await;
}

/// Whatever token id an identity provider uses, a token the gateway accepts is one the
/// security team can revoke by its id; an id too long to revoke is refused up front.
#[tokio::test]
async fn every_token_accepted_can_be_revoked_by_its_id() {
    let app = spawn_app_with(AppOptions::default()).await;
    let mut claims = app.claims("councillor", &["E05011391"], &["canvassing"]);
    claims["jti"] = serde_json::json!("AT.2026-12-05:7f3a/9b+c==");
    let token = app.sign(&claims);
    let list = || {
        app.get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
    };
    assert_eq!(list().await.status, 200);
    let revoke = serde_json::json!({"token_id": claims["jti"], "reason": "lost phone"});
    let r = app
        .admin_post("/revocations", &app.token("security"), &revoke.to_string())
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let r = list().await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "urn:wardgate:problem:token-revoked");

    claims["jti"] = serde_json::json!("x".repeat(257));
    let r = app
        .get(
            "/voter/electors?per_page=5",
            Some(&app.sign(&claims)),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, 401, "{:?}", String::from_utf8_lossy(&r.body));
    app.stop().await;
}

fn small_quota(c: &mut wardgate::config::Config) {
    c.quotas.insert(
        "councillor".into(),
        wardgate::controls::Limits {
            per_hour: 60,
            per_day: 1000,
        },
    );
}

/// What a principal was disclosed just before a replica stops reaches Redis with the stop,
/// not at a flush the process would not live to make (`quota::FLUSH_EVERY` later): the other
/// replicas count it. Read from Redis the moment the stop returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopping_flushes_what_it_counted() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        tweak: Some(small_quota),
        ..Default::default()
    })
    .await;
    until("ready", || async {
        app.admin_get("/readyz").await.status == 200
    })
    .await;
    let token = app.token("councillor");
    let r = app
        .get(
            "/voter/electors?per_page=20",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let disclosed = r.json()["records"].as_array().unwrap().len() as u64;
    assert!(disclosed > 0);
    app.stop().await;
    let mut conn = redis.connection();
    let keys: Vec<String> = (redis::cmd("KEYS").arg("wardgate:quota:*:h:*"))
        .query(&mut conn)
        .unwrap();
    let counted: u64 = (keys.iter())
        .map(|k| redis::cmd("GET").arg(k).query::<u64>(&mut conn).unwrap())
        .sum();
    assert_eq!(counted, disclosed, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_over_quota_gets_429_on_every_replica() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let opts = |keys: Option<std::path::PathBuf>| AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        keys_from: keys,
        tweak: Some(small_quota),
        ..Default::default()
    };
    let a = spawn_app_with(opts(None)).await;
    let b = spawn_app_with(opts(Some(a.dir.path().to_path_buf()))).await;
    until("ready", || async {
        a.admin_get("/readyz").await.status == 200 && b.admin_get("/readyz").await.status == 200
    })
    .await;
    let token = a.token("councillor");
    let mut disclosed = 0;
    let mut page = 1;
    loop {
        let r = a
            .get(
                &format!("/voter/electors?per_page=50&page={page}"),
                Some(&token),
                Some("canvassing"),
            )
            .await;
        if r.status == 429 {
            assert_eq!(r.json()["type"], "urn:wardgate:problem:quota-exceeded");
            let audit = a.audit_for(&r);
            assert_eq!(
                (audit["status"].as_u64(), audit["decision"].as_str()),
                (Some(429), Some("deny"))
            );
            break;
        }
        assert_eq!(r.status, 200);
        disclosed += r.json()["records"].as_array().unwrap().len();
        page += 1;
        assert!(page < 20, "quota never reached");
    }
    // Refused only once the allowance was used, and then at once: the page that crossed it
    // is the most that goes past.
    assert!(
        (60..60 + 50).contains(&disclosed),
        "refused only once the allowance was used, and no later: {disclosed}"
    );
    // The other replica refuses too: it has never served this principal, so it asks Redis once.
    let took = until("b refuses", || async {
        b.get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await
        .status
            == 429
    })
    .await;
    eprintln!(
        "over quota on replica a after {disclosed} records; replica b refused after {} ms",
        took.as_millis()
    );
    // Redis loses its counts (restarted without persistence, flushed, keys evicted): the
    // replicas keep what they knew, refuse still, and tell Redis again.
    redis.flushall();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    for (name, app) in [("a", &a), ("b", &b)] {
        let r = app
            .get(
                "/voter/electors?per_page=5",
                Some(&token),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, 429, "replica {name} after FLUSHALL: {:?}", r.body);
    }
    // Put back within a few of the quota flushes (every 200 ms).
    until("the counts are in Redis again", || async {
        let keys: Vec<String> = (redis::cmd("KEYS").arg("*quota*"))
            .query(&mut redis.connection())
            .unwrap();
        !keys.is_empty()
    })
    .await;
    // Another councillor (same role, so the same quota, but another subject) is unaffected on
    // both replicas: the counts are per principal, not per role.
    let councillor = (wardgate::demo::PERSONAS.iter())
        .find(|p| p.name == "councillor")
        .unwrap();
    let mut claims = b.claims("councillor", councillor.areas, councillor.purposes);
    claims["sub"] = serde_json::json!("another-councillor");
    let another = b.sign(&claims);
    for (name, app) in [("a", &a), ("b", &b)] {
        let r = app
            .get(
                "/voter/electors?per_page=5",
                Some(&another),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, 200, "replica {name}: {:?}", r.body);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_spread_over_two_replicas_is_seen_across_them_and_alerted_once() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(6000).await;
    let a = replica(upstream, &redis, None).await;
    let b = replica(upstream, &redis, Some(&a)).await;
    // A replica answers 503 (controls stale) until it has read the shared controls once.
    until_ready("a ready", &a).await;
    until_ready("b ready", &b).await;
    let token = a.token("councillor");
    // A load balancer alternates the pages: each replica alone sees about 1,200 records,
    // under the councillor's norm of 2,000 in ten minutes; together they see 2,400.
    let mut per_replica = [0usize; 2];
    for page in 0..24 {
        let app = if page % 2 == 0 { &a } else { &b };
        let r = app
            .get(
                &format!("/voter/electors?per_page=100&page={}", page / 2 % 8 + 1),
                Some(&token),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        per_replica[page % 2] += r.json()["records"].as_array().unwrap().len();
    }
    assert!(per_replica.iter().all(|n| *n < 2000) && per_replica.iter().sum::<usize>() >= 2000);
    let took = until("a cross-replica volume alert", || async {
        !volume_alerts(&a).await.is_empty() || !volume_alerts(&b).await.is_empty()
    })
    .await;
    println!(
        "cross-replica scraping alert {} ms after the last page ({per_replica:?} records per replica)",
        took.as_millis()
    );
    // Give a second detector every chance to raise a duplicate, then count.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut all = volume_alerts(&a).await;
    all.extend(volume_alerts(&b).await);
    assert_eq!(all.len(), 1, "{all:#?}");
    let alert = &all[0];
    assert!(
        alert["summary"]
            .as_str()
            .unwrap()
            .contains("across replicas")
    );
    assert_eq!(alert["key"], "demo-councillor");
    // The evidence names records in both replicas' logs.
    let replicas: std::collections::BTreeSet<&str> = alert["evidence_refs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().rsplit_once('#').unwrap().0)
        .collect();
    assert_eq!(replicas.len(), 2, "{alert:#}");
}

/// Reading ids one after another over two replicas is seen across them (each alone sees
/// fewer reads than the rule's 20), and what the replicas share in Redis to see it names no
/// subject: no path, no id, the id numbers shifted by an offset only the key gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_ids_in_order_over_two_replicas_is_seen_without_sharing_the_ids() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(200).await;
    let a = replica(upstream, &redis, None).await;
    let b = replica(upstream, &redis, Some(&a)).await;
    // A replica answers 503 (controls stale) until it has read the shared controls once.
    until_ready("a ready", &a).await;
    until_ready("b ready", &b).await;
    let token = a.token("councillor");
    for i in 1..=30 {
        let app = if i % 2 == 0 { &a } else { &b };
        let r = app
            .get(
                &format!("/voter/electors/VF-{i:07}"),
                Some(&token),
                Some("canvassing"),
            )
            .await;
        assert!(r.status == 200 || r.status == 404, "{:?}", r.body);
    }
    until("a cross-replica enumeration alert", || async {
        !enumeration_alerts(&a).await.is_empty() || !enumeration_alerts(&b).await.is_empty()
    })
    .await;
    let mut all = enumeration_alerts(&a).await;
    all.extend(enumeration_alerts(&b).await);
    assert!(
        all.iter()
            .any(|x| x["summary"].as_str().unwrap().contains("across replicas")),
        "{all:#?}"
    );

    // What is in Redis for the leader to read.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("wardgate:access")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let texts: Vec<String> = (entries.ids.iter())
        .map(|e| e.get::<String>("e").unwrap())
        .collect();
    assert!(texts.len() >= 30, "{}", texts.len());
    for text in &texts {
        assert!(
            !text.contains("VF-") && !text.contains("/electors/"),
            "{text}"
        );
    }
    let numbers: Vec<u64> = (texts.iter())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .filter_map(|e| e["o"]["id_number"].as_u64())
        .collect();
    assert!(numbers.len() >= 30, "{numbers:?}");
    assert!(numbers.iter().all(|n| *n > 30), "{numbers:?}");
    a.stop().await;
    b.stop().await;
}

/// A replica whose audit log cannot be written gives up leading cross-replica detection: as
/// leader it would mark the alerts it found as raised, silencing the other replicas'
/// detectors, and record none. Another replica takes the lease. (The log is made full for
/// real: a tiny tmpfs filled to the brim, as root.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_record_gives_detection_up_to_another_replica() {
    let base = tempfile::tempdir().unwrap();
    let mount = base.path().join("audit");
    let Some(_tmpfs) = common::Tmpfs::mount_or_skip(&mount, "256k") else {
        return;
    };
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(200).await;
    let a = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(redis.url()),
        audit_dir: Some(mount.clone()),
        ..Default::default()
    })
    .await;
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let holder = || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("GET")
                .arg("wardgate:access:leader")
                .query_async::<Option<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    until("the first replica leading", || async {
        holder().await.is_some()
    })
    .await;
    let first = holder().await.unwrap();
    let b = replica(upstream, &redis, Some(&a)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        holder().await.as_deref(),
        Some(first.as_str()),
        "a lease is kept"
    );

    common::fill(&mount);
    let token = a.token("councillor");
    until("the first replica's log failing", || async {
        a.get(
            "/voter/electors?per_page=5",
            Some(&token),
            Some("canvassing"),
        )
        .await
        .status
            == 503
    })
    .await;
    until("another replica leading", || async {
        holder().await.is_some_and(|h| h != first)
    })
    .await;
    drop(conn);
    a.stop().await;
    b.stop().await;
}

async fn enumeration_alerts(app: &TestApp) -> Vec<serde_json::Value> {
    let r = app.admin_get_with("/alerts", &app.token("security")).await;
    (r.json()["alerts"].as_array().unwrap().iter())
        .filter(|x| x["rule"] == "enumeration")
        .cloned()
        .collect()
}

async fn volume_alerts(app: &TestApp) -> Vec<serde_json::Value> {
    let r = app.admin_get_with("/alerts", &app.token("security")).await;
    r.json()["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["rule"] == "volume")
        .cloned()
        .collect()
}

/// A scraper cannot outrun its quota by asking in parallel: each request holds as many records
/// as it may disclose from its check until it ends, so requests sent at once see each other.
/// Six 50-record pages at once against an allowance of 60 an hour, the datastore slow enough
/// that none has ended before the last is checked: two may go (the second starts at 50 held,
/// under 60), the other four get 429. Before, all six passed the check on a count of nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_requests_cannot_outrun_the_quota() {
    let (store, _stop) = common::start_datastore(800).await;
    let page = common::datastore_body(store, "/electors?per_page=50&ward=E05011391").await;
    let upstream = common::delayed_upstream(page, std::time::Duration::from_millis(1500)).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        tweak: Some(small_quota),
        ..Default::default()
    })
    .await;
    let token = app.token("councillor");
    let asks = (0..6).map(|_| {
        app.get(
            "/voter/electors?per_page=50",
            Some(&token),
            Some("canvassing"),
        )
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status.as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429]);
    let disclosed: usize = answers
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.json()["records"].as_array().unwrap().len())
        .sum();
    assert!(disclosed > 0 && disclosed <= 100, "{disclosed}");
    app.stop().await;
}

/// Who can write to Redis but does not hold `redis.key_file` cannot lift a restriction: a
/// lift forged from the placement's own entry (a newer time, a new id), once without a
/// signature and once with a wrong one, is refused and counted, and the record stays
/// withheld. Before entries were signed, the lift applied on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_entry_written_without_the_key_is_refused() {
    let redis = RedisServer::start();
    let (upstream, _store) = common::start_datastore(800).await;
    let a = replica(upstream, &redis, None).await;
    until_ready("a ready", &a).await;
    let id = visible_elector(&a).await;
    let placed = restrict(&a, &id, "RR-7").await;
    assert_eq!(placed.status, 200, "{:?}", placed.body);
    let path = format!("/voter/electors/{id}");
    let councillor = |app: &TestApp| app.token("councillor");
    assert_eq!(
        a.get(&path, Some(&councillor(&a)), Some("canvassing"))
            .await
            .status,
        404
    );
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let stream: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("wardgate:controls")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let placement: serde_json::Value = serde_json::from_str(
        &stream
            .ids
            .iter()
            .filter_map(|e| e.get::<String>("event"))
            .find(|json| json.contains(&id))
            .expect("the placement is in the stream"),
    )
    .unwrap();
    for (n, mac) in [(1, None), (2, Some("00".repeat(32)))] {
        let mut lift = placement.clone();
        lift["change"] = "lift".into();
        lift["id"] = format!("forged-{n}").into();
        lift["at"] = (placement["at"].as_i64().unwrap() + 1000 * n).into();
        let mut add = redis::cmd("XADD");
        add.arg("wardgate:controls")
            .arg("*")
            .arg("event")
            .arg(lift.to_string());
        if let Some(mac) = &mac {
            add.arg("mac").arg(mac);
        }
        let _: String = add.query(&mut conn).unwrap();
    }
    let refused = || async {
        let m = a.admin_get("/metrics").await;
        String::from_utf8_lossy(&m.body)
            .lines()
            .find(|l| l.starts_with("wardgate_controls_unsigned_entries_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    until("both forgeries refused", || async {
        refused().await >= 2.0
    })
    .await;
    // Each is counted once, though every full resynchronisation (each second here) reads it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(refused().await, 2.0);
    assert_eq!(
        a.get(&path, Some(&councillor(&a)), Some("canvassing"))
            .await
            .status,
        404,
        "a forged lift took effect"
    );
    // A replica starting now reads the whole stream: the placement, not the forgeries.
    let b = replica(upstream, &redis, Some(&a)).await;
    until_withheld("b learns the restriction", &b, &path).await;
    a.stop().await;
    b.stop().await;
}

/// The admin plane acts under purposes as the data plane does: the DPO's and the security
/// team's roles are not enough without the purpose each action serves in the token, and the
/// records of what they did name that purpose and its lawful basis.
#[tokio::test]
async fn admin_actions_need_the_purpose_they_serve() {
    let app = spawn_app_with(AppOptions::default()).await;
    let id = "VF-0000001";
    let place = |kind: &str| {
        format!(r#"{{"kind":"{kind}","reference":"RR-1","reason":"request by letter"}}"#)
    };
    let revoke = r#"{"subject":"demo-canvasser","reason":"lost laptop"}"#;
    // A DPO whose token grants only legal claims, and a security officer granted nothing.
    let dpo = app.sign(&app.claims("dpo", &["E92000001"], &["legal_claims"]));
    let security = app.sign(&app.claims("security", &["E92000001"], &[]));
    let refused = [
        app.admin_get_with(&format!("/sar/{id}"), &dpo).await,
        app.admin_get_with(&format!("/rights/{id}"), &dpo).await,
        app.admin_post(&format!("/rights/{id}"), &dpo, &place("restricted"))
            .await,
        // A lift naming no request in force: refused for its purpose, before a refusal that
        // would name the references in force.
        app.admin_post(
            &format!("/rights/{id}/lift"),
            &dpo,
            r#"{"kind":"restricted","reference":"RR-0","reason":"settled"}"#,
        )
        .await,
        app.admin_post("/revocations", &dpo, revoke).await,
        app.admin_get_with("/alerts", &security).await,
        app.admin_get_with("/volumes", &security).await,
        app.admin_post("/revocations", &security, revoke).await,
    ];
    for r in &refused {
        assert_eq!(r.status, 403, "{:?}", r.body);
        assert_eq!(
            r.json()["type"],
            "urn:wardgate:problem:purpose-not-granted",
            "{:?}",
            r.body
        );
    }
    // A change said to be anything but JSON (a cross-site form, a `text/plain` fetch, which a
    // browser sends without asking first) is refused, and changes nothing.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = app
            .admin_post_as(
                "/revocations",
                &app.token("dpo"),
                content_type,
                r#"{"subject":"demo-security","reason":"x="}"#,
            )
            .await;
        assert_eq!(r.status, 415, "{content_type}: {:?}", r.body);
    }
    let security = app.token("security");
    assert_eq!(app.admin_get_with("/alerts", &security).await.status, 200);
    // Granted restriction but not erasure: an erasure request is out of reach, a restriction
    // is not.
    let restricting = app.sign(&app.claims("dpo", &["E92000001"], &["restriction"]));
    let r = app
        .admin_post(
            &format!("/rights/{id}"),
            &restricting,
            &place("erasure_requested"),
        )
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    let r = app
        .admin_post(&format!("/rights/{id}"), &restricting, &place("restricted"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        app.admin_get_with("/alerts", &app.token("security"))
            .await
            .status,
        200
    );
    let records = app.audit_records();
    let admin: Vec<&serde_json::Value> = records.iter().filter(|r| r["kind"] == "admin").collect();
    let denied: Vec<_> = admin
        .iter()
        .filter(|r| r["reason"] == "purpose_not_granted")
        .collect();
    assert_eq!(denied.len(), refused.len() + 1, "{admin:?}");
    assert!(denied.iter().all(|r| r["decision"] == "deny"), "{denied:?}");
    // Each refusal names the purpose the token did not grant.
    let missing: Vec<&str> = denied
        .iter()
        .map(|r| r["purpose"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        missing,
        [
            "sar_fulfilment",
            "restriction",
            "restriction",
            "restriction",
            "breach_investigation",
            "breach_investigation",
            "breach_investigation",
            "breach_investigation",
            "erasure",
        ],
        "{denied:?}"
    );
    let placed = admin
        .iter()
        .find(|r| r["status"] == 200 && r["method"] == "POST")
        .expect("the placement's record");
    assert_eq!(placed["purpose"], "restriction", "{placed}");
    assert_eq!(placed["lawful_basis"], "legal_obligation", "{placed}");
    let watched = admin
        .iter()
        .find(|r| r["status"] == 200 && r["path"] == "/alerts")
        .expect("the breach log read's record");
    assert_eq!(watched["purpose"], "breach_investigation", "{watched}");
    app.stop().await;
}

/// Quota totals are only shared while they reach Redis. A replica whose quota commands Redis
/// refuses (an ACL that lets it use the controls stream but not `wardgate:quota:*`) answers the
/// roles with limits 503 once the staleness bound has passed, rather than granting its own
/// allowance as if it were the only replica, while the shared controls themselves stay fresh
/// and roles without limits are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_totals_redis_refuses_stop_limited_roles_past_the_bound() {
    let redis = RedisServer::start();
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut admin = admin.get_connection().unwrap();
    let mut acl = redis::cmd("ACL");
    acl.arg("SETUSER");
    for word in
        "gateway on >gateway-pw resetkeys ~wardgate:controls* resetchannels +@all".split(' ')
    {
        acl.arg(word);
    }
    let _: () = acl.query(&mut admin).unwrap();
    let url = format!("redis://gateway:gateway-pw@127.0.0.1:{}/", redis.port);
    let (upstream, _store) = common::start_datastore(800).await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        redis: Some(url),
        ..Default::default()
    })
    .await;
    until_ready("ready", &app).await;
    let councillor = app.token("councillor");
    let list = |token: String, purpose: &'static str| {
        let app = &app;
        async move {
            app.get("/voter/electors?per_page=5", Some(&token), Some(purpose))
                .await
        }
    };
    let refused_after = until("limited role refused", || async {
        list(councillor.clone(), "canvassing").await.status == 503
    })
    .await;
    let r = list(councillor.clone(), "canvassing").await;
    assert_eq!(r.json()["type"], "urn:wardgate:problem:controls-stale");
    assert!(!String::from_utf8_lossy(&r.body).contains("records"));
    // The controls' stream is fresh, and a role without limits is served. The replica stays
    // ready (every replica has the same ACL: failing readiness would take them all out),
    // and says what is wrong: in `/readyz` and in a gauge.
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert_eq!(ready.json()["quota_counts"], "stale");
    let metrics = app.admin_get("/metrics").await;
    assert!(
        String::from_utf8_lossy(&metrics.body).contains("wardgate_quota_counts_stale 1"),
        "{:?}",
        metrics.body
    );
    let r = list(app.token("analyst"), "profiling").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    eprintln!(
        "quota commands refused: limited roles refused after {} ms (bound 2000 ms)",
        refused_after.as_millis()
    );
    app.stop().await;
}

/// A lift's refusal names the references in force only to a caller who may read the register
/// (`restriction`): a DPO token granting `erasure` alone learns, by lifting with a guess,
/// neither the pending erasure's reference nor whether one is pending at all. And a second
/// placement under a reference in force is refused, not merged with the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_in_force_is_neither_placed_twice_nor_told_to_a_caller_who_may_not_read_it() {
    let app = spawn_app_with(AppOptions::default()).await;
    let id = visible_elector(&app).await;
    let placed = app
        .admin_post(
            &format!("/rights/{id}"),
            &app.token("dpo"),
            r#"{"kind":"erasure_requested","reference":"ER-2026-0007","reason":"Art 17"}"#,
        )
        .await;
    assert_eq!(placed.status, 200, "{:?}", placed.body);
    let erasure_only = app.sign(&app.claims("dpo", &["E92000001"], &["erasure"]));
    let lift = |token: String, subject: String| {
        let app = &app;
        async move {
            app.admin_post(
                &format!("/rights/{subject}/lift"),
                &token,
                r#"{"kind":"erasure_requested","reference":"ER-GUESS","reason":"x"}"#,
            )
            .await
        }
    };
    let other = "VF-0000002".to_owned();
    let with_one = lift(erasure_only.clone(), id.clone()).await;
    let with_none = lift(erasure_only, other.clone()).await;
    for r in [&with_one, &with_none] {
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert_eq!(r.json()["type"], "urn:wardgate:problem:not-in-force");
    }
    let detail = |r: &common::Resp, subject: &str| {
        r.json()["detail"]
            .as_str()
            .unwrap()
            .replace(subject, "SUBJECT")
    };
    assert!(!detail(&with_one, &id).contains("ER-2026-0007"));
    assert_eq!(detail(&with_one, &id), detail(&with_none, &other));
    // A second request under the same reference is refused, not merged into the first
    // (one lift would end both).
    let again = app
        .admin_post(
            &format!("/rights/{id}"),
            &app.token("dpo"),
            r#"{"kind":"erasure_requested","reference":"ER-2026-0007","reason":"another letter"}"#,
        )
        .await;
    assert_eq!(again.status, 409, "{:?}", again.body);
    assert_eq!(
        again.json()["type"],
        "urn:wardgate:problem:already-in-force"
    );
    let held = app
        .admin_get_with(&format!("/rights/{id}"), &app.token("dpo"))
        .await;
    let held = String::from_utf8_lossy(&held.body).into_owned();
    assert!(held.contains("Art 17"), "{held}");
    assert!(!held.contains("another letter"), "{held}");
    // The full DPO token is told.
    let told = lift(app.token("dpo"), id.clone()).await;
    assert!(
        told.json()["detail"]
            .as_str()
            .unwrap()
            .contains("`ER-2026-0007`"),
        "{:?}",
        told.body
    );
    app.stop().await;
}

/// Every place in the audit writer's queue, taken: requests then wait for room after they
/// have been judged, until the rooms are dropped.
async fn hold_the_audit_queue(app: &TestApp) -> Vec<wardgate::audit::Room> {
    let mut rooms = Vec::new();
    while let Ok(room) =
        tokio::time::timeout(Duration::from_millis(50), app.gw.audit.reserve()).await
    {
        rooms.push(room.unwrap());
    }
    assert!(!rooms.is_empty());
    rooms
}

/// Places a restriction straight into the controls (journal and mirror), as the admin plane
/// does once its own audit record is durable: here, with the audit queue held full.
async fn place_directly(app: &TestApp, subject: &str, kind: &str, reference: &str) {
    let (id, at) = wardgate::controls::stamp();
    let change = wardgate::controls::Change::Place {
        subject: subject.to_owned(),
        kind: kind.to_owned(),
        reference: reference.to_owned(),
    };
    let by = "test-dpo".to_owned();
    let event = wardgate::controls::Event {
        id,
        at,
        by,
        reason: "a rights request".into(),
        change,
    };
    app.gw.controls.record(event).await.unwrap();
}

/// Revokes `subject` straight into the controls, as the security console does once its own
/// audit record is durable: here, with the audit queue held full.
async fn revoke_directly(app: &TestApp, subject: &str) {
    let (id, at) = wardgate::controls::stamp();
    let event = wardgate::controls::Event {
        id,
        at,
        by: "test-security".to_owned(),
        reason: "containment".into(),
        change: wardgate::controls::Change::RevokeSubject {
            subject: subject.to_owned(),
        },
    };
    app.gw.controls.record(event).await.unwrap();
}

/// A restriction placed while an answer's audit record waits to be made durable holds that
/// answer back: the DPO was told the restriction is in force, and the page or record judged
/// just before it must not leave after. (The audit queue is held full here, so that the read,
/// judged on the register before the restriction, waits for room while it is placed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restriction_placed_while_an_answer_is_recorded_holds_it_back() {
    let app = spawn_app_with(AppOptions::default()).await;
    let id = visible_elector(&app).await;
    let path = format!("/voter/electors/{id}");
    let rooms = hold_the_audit_queue(&app).await;
    let token = app.token("councillor");
    let read = app.get(&path, Some(&token), Some("canvassing"));
    let restrict = async {
        // The read has judged its record on the register by now, and waits for room.
        tokio::time::sleep(Duration::from_secs(2)).await;
        place_directly(&app, &id, "restricted", "RR-RACE").await;
        drop(rooms);
    };
    let (r, ()) = tokio::join!(read, restrict);
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(
        !String::from_utf8_lossy(&r.body).contains("surname"),
        "{:?}",
        r.body
    );
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    // The second record is queued without waiting, and may reach the disk after the answer.
    let records = app.audit_records_of(&rid, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[1]["detail"]["withheld_after_recording"],
        "rights_register_changed"
    );
    // The second record is the first's in all but the outcome.
    for field in [
        "subjects",
        "route",
        "lawful_basis",
        "purpose",
        "caller",
        "dataset",
    ] {
        assert_eq!(records[1][field], records[0][field], "{field}: {records:?}");
    }
    assert_eq!(records[1]["subjects"], serde_json::json!([id]));
    assert_eq!(records[1]["decision"], "error");
    // A subject access report does not list it as a disclosure.
    let sar = app
        .admin_get_with(&format!("/sar/{id}"), &app.token("dpo"))
        .await;
    assert_eq!(sar.status, 200, "{:?}", sar.body);
    let disclosures = sar.json()["disclosures"].clone();
    assert!(
        !(disclosures.as_array().unwrap().iter()).any(|d| d["request_id"] == rid.as_str()),
        "{disclosures}"
    );
    // Asked again, the record is withheld as restricted.
    let again = app.get(&path, Some(&token), Some("canvassing")).await;
    assert_eq!(again.status, 404);

    // A write judged before a restriction placed while its intent waits to be recorded is
    // not forwarded: the datastore keeps the record as it was. Its target is one the
    // councillor is shown when canvassing (so writable), and not the one restricted above.
    let listed = app
        .get(
            "/voter/electors?per_page=50",
            Some(&token),
            Some("canvassing"),
        )
        .await;
    let other = (listed.json()["records"].as_array().unwrap().iter())
        .map(|r| r["elector_id"].as_str().unwrap().to_owned())
        .find(|e| *e != id)
        .expect("another elector in the councillor's ward");
    let before = common::datastore_body(app.upstream, &format!("/electors/{other}")).await;
    let rooms = hold_the_audit_queue(&app).await;
    let write = app.canvass(
        &other,
        &token,
        "canvassing",
        r#"{"voting_intention":"LAB"}"#,
    );
    let restrict = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        place_directly(&app, &other, "para22_notice", "P22-RACE").await;
        drop(rooms);
    };
    let (w, ()) = tokio::join!(write, restrict);
    assert_eq!(w.status, 404, "{:?}", w.body);
    let after = common::datastore_body(app.upstream, &format!("/electors/{other}")).await;
    assert_eq!(before, after, "the write reached the datastore");
    // Refused for the restriction, after its intent was recorded: not for want of a target.
    let rid = w.headers["x-request-id"].to_str().unwrap().to_owned();
    let records = app.audit_records_of(&rid, 2).await;
    assert_eq!(records[0]["detail"]["write"], "intended", "{records:?}");
    assert_eq!(
        records[1]["withheld_target"], "rights_register_changed",
        "{records:?}"
    );
    // Which the answer's record says, naming the target, so that a subject access report
    // does not list the write as sent to the datastore.
    assert_eq!(records[1]["detail"]["write"], "not_sent", "{records:?}");
    assert_eq!(records[1]["subjects"], serde_json::json!([other]));
    let sar = app
        .admin_get_with(&format!("/sar/{other}"), &app.token("dpo"))
        .await;
    assert_eq!(sar.status, 200, "{:?}", sar.body);
    let writes = sar.json()["writes"].clone();
    assert!(
        !(writes.as_array().unwrap().iter()).any(|w| w["request_id"] == rid.as_str()),
        "{writes}"
    );
    app.stop().await;
}

/// A caller revoked while an answer's audit record waits to be made durable gets nothing of
/// it, a record or an aggregate's counts: whoever revoked them was told the revocation holds
/// at once, and the answer judged just before it must not leave after. Before, only the
/// rights register was looked at again once the record was durable (and not at all for an
/// aggregate), and the answer left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_revoked_while_an_answer_is_recorded_gets_nothing_of_it() {
    let app = spawn_app_with(AppOptions::default()).await;
    let id = visible_elector(&app).await;
    let read = format!("/voter/electors/{id}");
    let cases = [
        (
            read.as_str(),
            "councillor",
            "canvassing",
            "demo-councillor",
            "surname",
        ),
        (
            "/voter/electors/aggregate?by=ward",
            "analyst",
            "research",
            "demo-analyst",
            "cells",
        ),
    ];
    for (path, persona, purpose, subject, shown) in cases {
        let rooms = hold_the_audit_queue(&app).await;
        let token = app.token(persona);
        let asked = app.get(path, Some(&token), Some(purpose));
        let revoke = async {
            // The answer has been judged by now, and waits for room.
            tokio::time::sleep(Duration::from_secs(2)).await;
            revoke_directly(&app, subject).await;
            drop(rooms);
        };
        let (r, ()) = tokio::join!(asked, revoke);
        assert_eq!(r.status, 401, "{path}: {:?}", r.body);
        assert!(
            !String::from_utf8_lossy(&r.body).contains(shown),
            "{path}: {:?}",
            r.body
        );
        let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
        let records = app.audit_records_of(&rid, 2).await;
        assert_eq!(records.len(), 2, "{path}: {records:?}");
        assert_eq!(records[0]["decision"], "allow", "{path}: {records:?}");
        assert_eq!(
            records[1]["detail"]["withheld_after_recording"], "token_revoked",
            "{path}: {records:?}"
        );
        assert_eq!(records[1]["decision"], "deny", "{path}");
    }
    app.stop().await;
}

/// A policy pack put in force while an aggregate's audit record waits to be made durable
/// holds its counts back, as a reload stops an export at its next chunk: the new pack may
/// forbid what was counted. (The pack is put in force directly, as a reload does once its own
/// record is durable, the audit queue being held full here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_pack_put_in_force_while_an_aggregate_is_recorded_holds_it_back() {
    let app = spawn_app_with(AppOptions::default()).await;
    let rooms = hold_the_audit_queue(&app).await;
    let token = app.token("analyst");
    let asked = app.get(
        "/voter/electors/aggregate?by=ward",
        Some(&token),
        Some("research"),
    );
    let reload = async {
        // The aggregate has been counted by now, and waits for room.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pack = app.dir.path().join("policies");
        let engine =
            wardgate::policy::PolicyEngine::load(&pack, &app.gw.catalog, &app.gw.geography)
                .unwrap();
        app.gw.put_policies(wardgate::decisions::InForce {
            engine,
            decisions: Default::default(),
            digest: None,
        });
        drop(rooms);
    };
    let (r, ()) = tokio::join!(asked, reload);
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.json()["type"], "urn:wardgate:problem:policy-reloaded");
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let records = app.audit_records_of(&rid, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["decision"], "allow", "{records:?}");
    assert_eq!(
        records[1]["detail"]["withheld_after_recording"], "policy_reloaded",
        "{records:?}"
    );
    app.stop().await;
}

/// A restriction placed while an aggregate is counted or its record made durable holds its
/// counts back: they name no one, so the person restricted may be counted in them, and the DPO
/// was told the restriction holds at once. Asked again, the count is made on the register as
/// it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restriction_placed_while_an_aggregate_is_recorded_holds_it_back() {
    let app = spawn_app_with(AppOptions::default()).await;
    let id = visible_elector(&app).await;
    let token = app.token("analyst");
    let path = "/voter/electors/aggregate?by=ward";
    // A control event that places no flag (someone else revoked) rebuilds the register, and
    // holds nothing back. (A register holding a flag already: an empty one is rebuilt as
    // the same empty one.)
    place_directly(&app, "VF-9999999", "restricted", "AGG-BEFORE").await;
    let rooms = hold_the_audit_queue(&app).await;
    let asked = app.get(path, Some(&token), Some("research"));
    let revoke = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        revoke_directly(&app, "someone-else").await;
        drop(rooms);
    };
    let (r, ()) = tokio::join!(asked, revoke);
    assert_eq!(r.status, 200, "{:?}", r.body);
    let rooms = hold_the_audit_queue(&app).await;
    let asked = app.get(path, Some(&token), Some("research"));
    let place = async {
        // The aggregate has been counted by now, and waits for room.
        tokio::time::sleep(Duration::from_secs(2)).await;
        place_directly(&app, &id, "restricted", "AGG-HELD").await;
        drop(rooms);
    };
    let (r, ()) = tokio::join!(asked, place);
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.json()["type"], "urn:wardgate:problem:controls-stale");
    assert!(!String::from_utf8_lossy(&r.body).contains("cells"));
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let records = app.audit_records_of(&rid, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[1]["detail"]["withheld_after_recording"], "rights_register_changed",
        "{records:?}"
    );
    let again = app.get(path, Some(&token), Some("research")).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    app.stop().await;
}

/// The admin plane's routes take no query but a subject access report's `format` and the live
/// feed's filter: a query anywhere else is a mistake (a filter its caller thinks applies, a
/// format the answer does not come in), refused (400, recorded), not passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_query_no_route_takes_is_refused() {
    let app = spawn_app_with(AppOptions::default()).await;
    let (dpo, security) = (app.token("dpo"), app.token("security"));
    for (path, token) in [
        ("/rights/VF-0000001?format=html", &dpo),
        ("/alerts?rule=volume", &security),
        ("/volumes?minutes=5", &dpo),
    ] {
        let r = app.admin_get_with(path, token).await;
        assert_eq!(r.status, 400, "{path}: {:?}", r.body);
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{path}"
        );
        assert!(
            r.json()["detail"]
                .as_str()
                .unwrap()
                .contains("takes no query"),
            "{path}"
        );
        assert_eq!(app.audit_for(&r)["reason"], "bad_request", "{path}");
    }
    // The queries that are a route's own still work.
    let r = app
        .admin_get_with("/sar/VF-0000001?format=html", &dpo)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.stop().await;
}

/// A placement says whom it holds: on an id no datastore holds (`VF-1` for `VF-0000001`) the
/// DPO is told it holds nobody (placed all the same: the record may come), where before it
/// was recorded in silence; on a person the voter file holds, that it is held there. The
/// audit record keeps what was found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_says_whether_any_datastore_holds_the_id() {
    let app = spawn_app_with(AppOptions::default()).await;
    let r = restrict(&app, "VF-1", "RR-TYPO").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answer = r.json();
    assert_eq!(
        answer["held"],
        serde_json::json!({ "membership": "nothing held", "voter": "nothing held" })
    );
    assert!(
        answer["warning"].as_str().unwrap().contains("`VF-1`"),
        "{answer}"
    );
    let placed = (app.audit_records().into_iter())
        .find(|x| x["kind"] == "admin" && x["detail"]["id"] == answer["recorded"]["id"])
        .unwrap();
    assert_eq!(placed["detail"]["held"], answer["held"], "{placed}");

    let id = visible_elector(&app).await;
    let r = restrict(&app, &id, "RR-REAL").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answer = r.json();
    assert_eq!(answer["held"]["voter"], "held", "{answer}");
    assert!(answer["warning"].is_null(), "{answer}");
    app.stop().await;
}

/// A query on a route whose role the caller lacks is refused for the role first (403, a
/// refusal breach detection counts), not as a bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_from_a_caller_without_the_role_is_refused_access() {
    let app = spawn_app_with(AppOptions::default()).await;
    let r = app
        .admin_get_with("/rights/VF-0000001?x=1", &app.token("canvasser"))
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    let record = app.audit_for(&r);
    assert_eq!(record["decision"], "deny", "{record}");
    assert_eq!(
        record["policy_ids"],
        serde_json::json!(["admin.rights-dpo-only"])
    );
    app.stop().await;
}

/// Two placements under one reference sent at once are one placement and one refusal (409),
/// however long the datastores take to say whom it holds: the checks and the change are
/// made one change at a time. And a datastore that ignores case holds `vf-0000001` under
/// `VF-0000001`, as the register matches ids: held, not warned of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placements_sent_at_once_under_one_reference_are_one_and_a_refusal() {
    let upstream = common::upstream_answering(
        |_| bytes::Bytes::from_static(br#"{"record":{"elector_id":"VF-0000001"}}"#),
        "application/json",
        Duration::from_millis(800),
    )
    .await;
    let app = spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..AppOptions::default()
    })
    .await;
    let (a, b) = tokio::join!(
        restrict(&app, "vf-0000001", "RR-TWICE"),
        restrict(&app, "vf-0000001", "RR-TWICE")
    );
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{:?} {:?}", a.body, b.body);
    let placed = if a.status == 200 { a } else { b };
    let answer = placed.json();
    assert_eq!(answer["held"]["voter"], "held", "{answer}");
    assert!(answer["warning"].is_null(), "{answer}");
    app.stop().await;
}
