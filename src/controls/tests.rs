//! Folding events: order-independent, idempotent, lifts and revocations.

use super::*;

fn ev(id: &str, at: i64, change: Change) -> Event {
    Event {
        id: id.into(),
        at,
        by: "dpo".into(),
        reason: "test".into(),
        change,
    }
}

fn place(id: &str, at: i64, kind: &str) -> Event {
    ev(
        id,
        at,
        Change::Place {
            subject: "VF-1".into(),
            kind: kind.into(),
            reference: "R1".into(),
        },
    )
}

/// A lift as an older journal holds it (not marked `exact`): it lifts every placement of its
/// kind made before it.
fn lift(id: &str, at: i64, kind: &str) -> Event {
    ev(
        id,
        at,
        Change::Lift {
            subject: "VF-1".into(),
            kind: kind.into(),
            reference: "R2".into(),
            exact: false,
        },
    )
}

/// A lift of the placement under `reference` only, as the admin plane makes them.
fn exact_lift(id: &str, at: i64, reference: &str) -> Event {
    ev(
        id,
        at,
        Change::Lift {
            subject: "VF-1".into(),
            kind: "restricted".into(),
            reference: reference.into(),
            exact: true,
        },
    )
}

#[test]
fn the_latest_event_wins_whatever_the_arrival_order() {
    let events = [
        place("a", 1, "restricted"),
        lift("b", 2, "restricted"),
        place("c", 3, "objects_profiling"),
    ];
    let mut forward = Snapshot::default();
    let mut backward = Snapshot::default();
    for e in &events {
        forward.apply(e);
    }
    for e in events.iter().rev() {
        backward.apply(e);
    }
    assert_eq!(forward.placements("VF-1"), backward.placements("VF-1"));
    let kinds: Vec<String> = forward
        .placements("VF-1")
        .into_iter()
        .map(|p| p.kind)
        .collect();
    assert_eq!(kinds, vec!["objects_profiling".to_owned()]);
}

/// A subject id is one whatever its ASCII case (as the register matches it): a restriction
/// placed on `VF-1` is read back under `vf-1` and lifted by a lift naming `vf-1`.
#[test]
fn a_subject_is_one_whatever_its_case() {
    let mut s = Snapshot::default();
    s.apply(&place("a", 1, "restricted"));
    assert_eq!(s.placements("vf-1").len(), 1);
    assert_eq!(s.placements("VF-1").len(), 1);
    let mut lower = lift("b", 2, "restricted");
    if let Change::Lift { subject, .. } = &mut lower.change {
        *subject = "vf-1".into();
    }
    s.apply(&lower);
    assert!(
        s.placements("VF-1").is_empty(),
        "the lift in lower case lifted it"
    );
}

fn with_reference(mut e: Event, r: &str) -> Event {
    if let Change::Place { reference, .. } | Change::Lift { reference, .. } = &mut e.change {
        *reference = r.into();
    }
    e
}

/// The references in force for `restricted` on VF-1 after `events`, in every order they could
/// arrive in (here all rotations and the reverse of each).
fn in_force_every_way(events: &[Event]) -> Vec<String> {
    let fold = |order: Vec<&Event>| {
        let mut s = Snapshot::default();
        for e in order {
            s.apply(e);
        }
        (s.placements("VF-1").into_iter())
            .filter(|p| p.kind == "restricted")
            .map(|p| p.reference)
            .collect::<Vec<_>>()
    };
    let first = fold(events.iter().collect());
    for k in 0..events.len() {
        let mut order: Vec<&Event> = events.iter().collect();
        order.rotate_left(k);
        assert_eq!(fold(order.clone()), first, "rotated by {k}");
        order.reverse();
        assert_eq!(fold(order), first, "rotated by {k}, reversed");
    }
    first
}

/// Two requests of one kind (a disputed accuracy, then a pending objection) are placed and
/// lifted apart: lifting the first leaves the second in force, whatever order the events
/// reach a replica in, even a lift stamped after the second's placement by another replica.
#[test]
fn lifting_one_request_leaves_another_of_the_same_kind_in_force() {
    let r1 = with_reference(place("a", 1, "restricted"), "RR-1");
    let r2 = with_reference(place("b", 2, "restricted"), "RR-2");
    let lift_r1 = exact_lift("c", 3, "RR-1");
    assert_eq!(
        in_force_every_way(&[r1.clone(), r2.clone()]),
        ["RR-1", "RR-2"]
    );
    assert_eq!(
        in_force_every_way(&[r1.clone(), r2.clone(), lift_r1.clone()]),
        ["RR-2"]
    );
    let lift_r2 = exact_lift("d", 4, "RR-2");
    assert!(
        in_force_every_way(&[r1.clone(), r2.clone(), lift_r1.clone(), lift_r2.clone()]).is_empty()
    );
    // Placed again under its reference after its lift: in force again.
    let again = with_reference(place("e", 5, "restricted"), "RR-1");
    assert_eq!(
        in_force_every_way(&[r1.clone(), r2.clone(), lift_r1, again]),
        ["RR-1", "RR-2"]
    );
    // A lift that reaches a replica before the placement it names (published from a replica
    // whose placement did not reach Redis) lifts nothing else meanwhile, nor after.
    assert_eq!(in_force_every_way(&[r1.clone(), lift_r2.clone()]), ["RR-1"]);
    assert_eq!(in_force_every_way(&[r1, lift_r2, r2]), ["RR-1"]);
}

/// A lift not marked `exact` (as an older journal or replica holds them) lifts every
/// placement of its kind made before it, whatever reference it names, placed or not, as
/// lifts did before each request was its own; a placement made after it stands.
#[test]
fn a_lift_not_marked_exact_lifts_every_placement_before_it() {
    let r0 = with_reference(place("a", 1, "restricted"), "RR-0");
    let r1 = with_reference(place("b", 2, "restricted"), "RR-1");
    for named in ["RR-1", "OLD-LIFT"] {
        let sweep = with_reference(lift("c", 3, "restricted"), named);
        assert!(
            in_force_every_way(&[r0.clone(), r1.clone(), sweep.clone()]).is_empty(),
            "{named}"
        );
        let r3 = with_reference(place("d", 4, "restricted"), "RR-3");
        assert_eq!(
            in_force_every_way(&[r0.clone(), r1.clone(), sweep, r3]),
            ["RR-3"],
            "{named}"
        );
    }
}

#[test]
fn replays_are_ignored() {
    let mut s = Snapshot::default();
    assert!(s.apply(&place("a", 1, "restricted")));
    assert!(!s.apply(&place("a", 1, "restricted")));
}

#[tokio::test]
async fn the_journal_survives_a_restart_and_revocations_apply() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controls::open(dir.path(), None, Default::default()).unwrap();
    c.record(place("a", 1, "restricted")).await.unwrap();
    c.record(ev(
        "t",
        2_000,
        Change::RevokeToken {
            token_id: "tok-1".into(),
        },
    ))
    .await
    .unwrap();
    c.record(ev(
        "s",
        10_000,
        Change::RevokeSubject {
            subject: "alice".into(),
        },
    ))
    .await
    .unwrap();
    drop(c);
    let c = Controls::open(dir.path(), None, Default::default()).unwrap();
    assert_eq!(
        c.register_flags()
            .unwrap()
            .get("VF-1")
            .map(<[String]>::to_vec),
        Some(vec!["restricted".to_owned()])
    );
    let p = |token: &str, sub: &str, iat: i64| Principal {
        subject: sub.into(),
        token_id: token.into(),
        role: "r".into(),
        unit: "u".into(),
        areas: vec![],
        purposes: vec![],
        expires_at: 0,
        issued_at: iat,
        grant_expires_at: None,
        key_id: String::new(),
        key_sha256: String::new(),
    };
    assert!(c.is_revoked(&p("tok-1", "bob", 0)));
    assert!(
        c.is_revoked(&p("tok-2", "alice", 9)),
        "issued before the subject's revocation"
    );
    assert!(!c.is_revoked(&p("tok-3", "alice", 11)), "issued after it");
    assert!(c.check_fresh().is_ok(), "no Redis: nothing can be stale");
}

#[tokio::test]
async fn quotas_count_per_principal_and_refuse_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = [(
        "councillor".to_owned(),
        Limits {
            per_hour: 60,
            per_day: 1000,
        },
    )]
    .into_iter()
    .collect();
    let c = Controls::open(dir.path(), None, limits).unwrap();
    let p = |sub: &str, role: &str| Principal {
        subject: sub.into(),
        token_id: "t".into(),
        role: role.into(),
        unit: "u".into(),
        areas: vec![],
        purposes: vec![],
        expires_at: 0,
        issued_at: 0,
        grant_expires_at: None,
        key_id: String::new(),
        key_sha256: String::new(),
    };
    let alice = p("alice", "councillor");
    assert!(c.check_quota(&alice, 0).await.is_ok());
    c.count(&alice, 50);
    assert!(c.check_quota(&alice, 0).await.is_ok(), "50 of 60");
    c.count(&alice, 50);
    assert!(matches!(
        c.check_quota(&alice, 0).await,
        Err(GatewayError::QuotaExceeded)
    ));
    assert!(
        c.check_quota(&p("bob", "councillor"), 0).await.is_ok(),
        "per principal"
    );
    c.count(&p("dana", "dpo"), 1_000_000);
    assert!(
        c.check_quota(&p("dana", "dpo"), 1_000).await.is_ok(),
        "roles without limits are unlimited"
    );
    // Requests under way hold what they may disclose: two pages of 25 in flight at once
    // leave bob 10 of 60, a third is refused before either has counted a record; as they
    // end (having disclosed less) the rest is free again.
    let bob = p("bob", "councillor");
    let first = c.check_quota(&bob, 25).await.unwrap();
    let second = c.check_quota(&bob, 25).await.unwrap();
    assert!(c.check_quota(&bob, 25).await.is_ok(), "50 held of 60");
    let third = c.check_quota(&bob, 25).await;
    assert!(third.is_ok());
    assert!(
        matches!(
            c.check_quota(&bob, 25).await,
            Err(GatewayError::QuotaExceeded)
        ),
        "75 held of 60: refused though nothing is counted yet"
    );
    for hold in [first, second, third.unwrap()] {
        c.count(&bob, 5);
        drop(hold);
    }
    assert!(c.check_quota(&bob, 25).await.is_ok(), "15 disclosed of 60");
}

/// Placements arriving at once on several threads (the Redis follower and local `POST
/// /rights` calls) are each in force in the register the filter reads as soon as they are
/// placed, and stay so: a rebuild from an older state of the register must never be
/// installed over a newer one.
#[test]
fn concurrent_placements_all_take_effect() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controls::open(dir.path(), None, Default::default()).unwrap();
    let (threads, each) = (8, 200);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let c = &c;
            scope.spawn(move || {
                for i in 0..each {
                    let subject = format!("VF-{t}-{i}");
                    let e = ev(
                        &format!("{t}-{i}"),
                        1,
                        Change::Place {
                            subject: subject.clone(),
                            kind: "restricted".into(),
                            reference: "R".into(),
                        },
                    );
                    // What `absorb` does but the journal's fsync, which would keep most
                    // rebuilds from overlapping: the mirror, then the register rebuilt.
                    c.inner.snapshot.write().unwrap().apply(&e);
                    c.rebuild_flags();
                    // In force once placed, whatever the other threads' rebuilds do.
                    assert!(
                        c.register_flags().unwrap().get(&subject).is_some(),
                        "{subject}"
                    );
                }
            });
        }
    });
    let register = c.register_flags().unwrap();
    assert_eq!(register.len(), threads * each);
    for t in 0..threads {
        for i in 0..each {
            let flags = register.get(&format!("VF-{t}-{i}"));
            assert_eq!(flags, Some(&["restricted".to_owned()][..]), "VF-{t}-{i}");
        }
    }
}

/// A subject's flags read in one order whatever order they were placed in (the filter's memo
/// keys on them).
#[test]
fn a_subjects_flags_read_in_one_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controls::open(dir.path(), None, Default::default()).unwrap();
    for (id, kind) in [
        ("a", "restricted"),
        ("b", "deceased"),
        ("c", "objects_profiling"),
    ] {
        c.absorb(&[place(id, 1, kind)]).unwrap();
    }
    let sorted = ["deceased", "objects_profiling", "restricted"].map(str::to_owned);
    assert_eq!(c.register_flags().unwrap().get("VF-1"), Some(&sorted[..]));
}

/// A mirror that has not heard from Redis within its bound gives no register at all, so that
/// an export's or aggregate's next batch stops rather than be judged without a newer flag.
#[tokio::test]
async fn a_stale_mirror_gives_no_register() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("controls.key");
    std::fs::write(&key_file, "k".repeat(48)).unwrap();
    // A port nothing listens on: the mirror never syncs.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = RedisSettings {
        url: format!("redis://127.0.0.1:{port}"),
        staleness_bound: Duration::from_secs(1),
        resync_interval: Duration::from_secs(60),
        stream: "wardgate:controls".into(),
        key_file,
    };
    let c = Controls::open(dir.path(), Some(redis), Default::default()).unwrap();
    assert!(matches!(
        c.register_flags(),
        Err(GatewayError::ControlsStale)
    ));
}

/// A placement made on a replica whose clock is behind the one that made the last lift is
/// moved to just after it, so it wins everywhere instead of being outranked while its maker
/// is told it was recorded. A revocation keeps its own time.
#[tokio::test]
async fn a_change_made_behind_the_latest_is_ordered_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controls::open(dir.path(), None, Default::default()).unwrap();
    // The lift, by a replica whose clock is two seconds ahead.
    c.record(lift("a", 10_000, "restricted")).await.unwrap();
    let mut placed = place("b", 8_000, "restricted");
    c.order_after_latest(&mut placed);
    assert_eq!(placed.at, 10_001);
    c.record(placed).await.unwrap();
    assert_eq!(c.placements("vf-1").len(), 1, "the placement holds");
    // Ahead of the latest already: as it was.
    let mut later = lift("c", 20_000, "restricted");
    c.order_after_latest(&mut later);
    assert_eq!(later.at, 20_000);
    // Another kind has no latest to follow.
    let mut other = place("d", 5, "objects_profiling");
    c.order_after_latest(&mut other);
    assert_eq!(other.at, 5);
    let mut revocation = ev(
        "e",
        5,
        Change::RevokeSubject {
            subject: "VF-1".into(),
        },
    );
    c.order_after_latest(&mut revocation);
    assert_eq!(revocation.at, 5);
}

/// A change's journal sync is made off the runtime's workers: while the journal is held (a
/// sync on a slow or stalled disk), the worker of a one-thread runtime still runs its other
/// tasks, where a sync made on it would hold them all (every connection, `/readyz`) for as
/// long. Checked for liveness only: the hold ends after a minute whatever happens, and the
/// test fails if that is what ended it.
#[test]
fn a_change_waiting_for_its_journal_holds_no_worker() {
    let dir = tempfile::tempdir().unwrap();
    let c = Controls::open(dir.path(), None, Default::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (progressed, heard) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let held_too_long = std::thread::scope(|scope| {
        let journal = &c.inner.journal;
        let holder = scope.spawn(move || {
            let guard = journal.hold();
            held_tx.send(()).unwrap();
            let timed_out = heard.recv_timeout(Duration::from_secs(60)).is_err();
            drop(guard);
            timed_out
        });
        held_rx.recv().unwrap();
        rt.block_on(async {
            let change = tokio::spawn({
                let c = c.clone();
                async move { c.record(place("j1", 1, "restricted")).await }
            });
            // The change is under way, waiting for the journal...
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            // ... and this task still runs meanwhile.
            let _ = progressed.send(());
            change.await.unwrap().unwrap();
        });
        holder.join().unwrap()
    });
    assert!(
        !held_too_long,
        "the change held the only worker while it waited"
    );
    assert!(c.register_flags().unwrap().get("VF-1").is_some());
}
