//! Each rule against a scripted sequence of audit records: it matches the misuse it describes,
//! stays quiet for normal traffic just under its threshold, and respects its mode and cooldown.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::audit::record::tests::sample;

/// 2026-06-10 (BST) 10:00 UTC = 11:00 in London.
const SUMMER_MORNING: i64 = 1_781_085_600_000;

fn detector() -> Detector {
    Detector::new(WatchSettings::defaults(Path::new("/tmp")))
}

fn with(f: impl FnOnce(&mut WatchSettings)) -> Detector {
    let mut s = WatchSettings::defaults(Path::new("/tmp"));
    f(&mut s);
    Detector::new(s)
}

pub(crate) fn ts(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
    AuditRecord::ts_of(t)
}

/// A listing by `who` (a councillor) at `ms` that disclosed `n` records.
pub(crate) fn listing(who: &str, ms: i64, n: usize) -> AuditRecord {
    let mut r = sample(0);
    r.ts = ts(ms);
    if let Some(c) = r.caller.as_mut() {
        c.subject = who.to_owned();
        c.role = "councillor".to_owned();
        c.token_id = format!("tok-{who}");
    }
    r.client_addr = Some("10.0.0.1".into());
    r.subjects = (0..n).map(|i| format!("E{i:06}")).collect();
    r
}

fn read(who: &str, ms: i64, id: &str, withheld: Option<&str>) -> AuditRecord {
    let mut r = listing(who, ms, usize::from(withheld.is_none()));
    r.route = Some("voter.read".into());
    r.path = format!("/voter/electors/{id}");
    if let Some(w) = withheld {
        r.withheld_target = Some(w.to_owned());
        r.status = 404;
        r.decision = Decision::Error;
        r.reason = Some("not_found".into());
    }
    r
}

fn denied(who: Option<&str>, ms: i64, reason: &str) -> AuditRecord {
    let mut r = listing(who.unwrap_or("x"), ms, 0);
    if who.is_none() {
        r.caller = None;
    }
    r.decision = Decision::Deny;
    r.status = if reason.starts_with("token") {
        401
    } else {
        403
    };
    r.reason = Some(reason.to_owned());
    r
}

fn run(d: &mut Detector, records: Vec<AuditRecord>) -> Vec<Finding> {
    records
        .iter()
        .enumerate()
        .flat_map(|(i, r)| d.observe(i as u64 + 1, r))
        .collect()
}

fn rules(f: &[Finding]) -> Vec<Rule> {
    f.iter().map(|f| f.rule).collect()
}

#[test]
fn scraping_a_ward_is_a_volume_alert_naming_the_records() {
    let mut d = detector();
    // 25 pages of 100 in 25 seconds: far faster and further than a walk sheet.
    let pages = (0..25)
        .map(|i| listing("cllr", SUMMER_MORNING + i * 1000, 100))
        .collect();
    let f = run(&mut d, pages);
    assert_eq!(rules(&f), vec![Rule::Volume]);
    assert_eq!(f[0].key, "cllr");
    assert_eq!(f[0].evidence, (1..=20).collect::<Vec<u64>>());
    assert!(f[0].summary.contains("2000 records"), "{}", f[0].summary);
    assert_eq!(f[0].caller.as_ref().unwrap().token_id, "tok-cllr");
}

#[test]
fn a_canvassing_day_stays_quiet() {
    let mut d = detector();
    let mut day = Vec::new();
    // Twenty canvassers, each with a 150-elector walk sheet every 20 minutes for eight hours,
    // reading back a few electors by id (not in order) and recording doorstep results.
    for minute in (0..480).step_by(20) {
        for c in 0..20 {
            let who = format!("canvasser-{c}");
            let at = SUMMER_MORNING + (minute * 60 + c) * 1000;
            day.push(listing(&who, at, 150));
            for k in [7, 3, 11] {
                day.push(read(
                    &who,
                    at + k * 1000,
                    &format!("E{:06}", k * 37 + c),
                    None,
                ));
            }
        }
    }
    assert_eq!(run(&mut d, day), vec![]);
}

#[test]
fn volume_is_per_principal_and_per_window() {
    let mut d = detector();
    // Two principals at 1,500 each: neither over 2,000.
    let mut recs = Vec::new();
    for i in 0..15 {
        recs.push(listing("a", SUMMER_MORNING + i * 1000, 100));
        recs.push(listing("b", SUMMER_MORNING + i * 1000, 100));
    }
    // 1,500 more for `a`, but eleven minutes later: the first 1,500 have left the window.
    for i in 0..15 {
        recs.push(listing("a", SUMMER_MORNING + 660_000 + i * 1000, 100));
    }
    assert_eq!(run(&mut d, recs), vec![]);
}

/// Records from a replica whose clock runs an hour ahead (the leader reads every replica's)
/// evict no one else's from the principal's window: 3,100 records in half a minute alert.
#[test]
fn a_record_dated_ahead_does_not_shorten_the_window() {
    // (Whatever the hour the test runs at.)
    let mut d = with(|s| {
        if let Some(r) = s.rules.get_mut(&Rule::UnusualHours) {
            r.mode = Mode::Off;
        }
    });
    let now = now_millis();
    let mut recs: Vec<AuditRecord> = (0..15)
        .map(|i| listing("a", now - 60_000 + i * 1000, 100))
        .collect();
    recs.push(listing("a", now + 3_600_000, 100));
    recs.extend((0..15).map(|i| listing("a", now - 30_000 + i * 1000, 100)));
    assert_eq!(rules(&run(&mut d, recs)), vec![Rule::Volume]);
}

#[test]
fn large_export_matches_on_one_response() {
    let mut d = detector();
    let f = run(
        &mut d,
        vec![
            listing("c", SUMMER_MORNING, 499),
            listing("c", SUMMER_MORNING + 1, 500),
        ],
    );
    assert_eq!(rules(&f), vec![Rule::LargeExport]);
    assert_eq!(f[0].evidence, vec![2]);
}

/// One chunk record of the export `request`, disclosing `n` records.
fn chunk(who: &str, ms: i64, request: &str, n: usize, chunk: u64) -> AuditRecord {
    let mut r = listing(who, ms, n);
    r.request_id = request.to_owned();
    r.route = Some("voter.export".into());
    r.path = "/voter/electors/export".into();
    r.detail = Some(serde_json::json!({ "export_chunk": chunk }));
    r
}

/// An export is audited a chunk at a time: its chunks count together as the one response it
/// is, raised once when their sum reaches the threshold, and two exports never add up.
#[test]
fn large_export_counts_an_exports_chunks_together() {
    let mut d = detector();
    let f = run(
        &mut d,
        vec![
            chunk("c", SUMMER_MORNING, "r1", 300, 1),
            chunk("c", SUMMER_MORNING + 1, "r1", 300, 2),
            chunk("c", SUMMER_MORNING + 2, "r1", 300, 3),
        ],
    );
    assert_eq!(rules(&f), vec![Rule::LargeExport]);
    assert_eq!(f[0].evidence, vec![1, 2]);
    assert!(f[0].summary.contains("600 records"), "{}", f[0].summary);

    let mut d = detector();
    let mut closing = chunk("e", SUMMER_MORNING + 1, "r2", 0, 0);
    closing.detail = Some(serde_json::json!({ "export_complete": { "chunks": 1 } }));
    let f = run(
        &mut d,
        vec![
            chunk("e", SUMMER_MORNING, "r2", 300, 1),
            closing,
            chunk("e", SUMMER_MORNING + 2, "r3", 300, 1),
        ],
    );
    assert_eq!(rules(&f), vec![]);
    assert!(
        !d.exports.contains_key("r2"),
        "forgotten at its closing record"
    );
}

fn escalations(f: &[Finding]) -> Vec<(Rule, u32)> {
    f.iter().map(|f| (f.rule, f.escalation)).collect()
}

/// An alert quiets its rule for the principal for the cooldown, but not whatever follows:
/// disclosing twice the threshold past the alert's own size raises an escalation, and the
/// bar doubles, so half an hour's scraping after a small alert is seen, in a handful of
/// alerts. Rules that count one refusal or withheld target at a time do not escalate.
#[test]
fn scraping_on_after_a_volume_alert_escalates() {
    let mut d = with(|s| {
        if let Some(r) = s.rules.get_mut(&Rule::LargeExport) {
            r.mode = Mode::Off;
        }
    });
    // 2,500 at once (the councillor's norm is under 2,000 in ten minutes), then a page of 500
    // every 30 s for half an hour: 1,000 a minute, within the hour's cooldown.
    let mut records = vec![listing("cllr", SUMMER_MORNING, 2500)];
    records.extend((1..=60).map(|i| listing("cllr", SUMMER_MORNING + i * 30_000, 500)));
    let f = run(&mut d, records);
    // The bar: 4,000 (pages 1-8), then 8,000 (pages 9-24, eight minutes' worth); then
    // 16,000, which ten minutes at this rate never reach.
    assert_eq!(
        escalations(&f),
        vec![(Rule::Volume, 0), (Rule::Volume, 1), (Rule::Volume, 2)]
    );
    assert_eq!(f[1].evidence, (2..=9).collect::<Vec<u64>>());
    assert!(f[1].summary.contains("4000 records"), "{}", f[1].summary);
    assert!(
        f[1].summary.contains("an escalation (2 times"),
        "{}",
        f[1].summary
    );
    assert_eq!(f[2].evidence, (10..=25).collect::<Vec<u64>>());
    assert!(f[2].summary.contains("(4 times"), "{}", f[2].summary);

    // Three reads outside the caller's areas make an alert; nine more in the cooldown, none.
    let mut d = detector();
    let reads = (0..12)
        .map(|i| {
            let id = format!("E{:06}", 9000 + i * 100);
            read("far", SUMMER_MORNING + i * 1000, &id, Some("out_of_area"))
        })
        .collect();
    assert_eq!(escalations(&run(&mut d, reads)), vec![(Rule::OutOfArea, 0)]);
}

/// An escalation that was not acted on (no room to queue it) is undone: the next amount
/// that reaches its bar raises it again, rather than the bar it set.
#[test]
fn an_escalation_not_acted_on_is_raised_again() {
    let mut d = with(|s| {
        if let Some(r) = s.rules.get_mut(&Rule::LargeExport) {
            r.mode = Mode::Off;
        }
    });
    let mut records = vec![listing("cllr", SUMMER_MORNING, 2500)];
    records.extend((1..=8).map(|i| listing("cllr", SUMMER_MORNING + i * 30_000, 500)));
    let f = run(&mut d, records);
    assert_eq!(escalations(&f), vec![(Rule::Volume, 0), (Rule::Volume, 1)]);
    d.forget_cooldown(Rule::Volume, "cllr", 1);
    let again = (9..=16)
        .map(|i| listing("cllr", SUMMER_MORNING + i * 30_000, 500))
        .enumerate()
        .flat_map(|(n, r)| d.observe(100 + n as u64, &r))
        .collect::<Vec<_>>();
    assert_eq!(escalations(&again), vec![(Rule::Volume, 1)]);
}

/// The same for exports: a small one alerted, a whole constituency's a few minutes later is
/// not silenced by it.
#[test]
fn a_large_export_after_a_small_alert_escalates() {
    let mut d = with(|s| {
        if let Some(r) = s.rules.get_mut(&Rule::Volume) {
            r.mode = Mode::Off;
        }
    });
    let mut records = vec![
        chunk("c", SUMMER_MORNING, "r1", 300, 1),
        chunk("c", SUMMER_MORNING + 1, "r1", 300, 2),
    ];
    let later = SUMMER_MORNING + 300_000;
    records.extend((1..=20).map(|i| chunk("c", later + i, "r2", 500, i as u64)));
    let f = run(&mut d, records);
    // Raised at 600 (the threshold 500); the bar then 1,000 (r2's second chunk), 2,000 (its
    // fourth), 4,000 (its eighth), 8,000 (its sixteenth); r2's 10,000 stop short of 16,000.
    assert_eq!(
        escalations(&f),
        vec![
            (Rule::LargeExport, 0),
            (Rule::LargeExport, 1),
            (Rule::LargeExport, 2),
            (Rule::LargeExport, 3),
            (Rule::LargeExport, 4)
        ]
    );
    assert!(f[1].summary.contains("1000 records"), "{}", f[1].summary);
    assert!(f[4].summary.contains("8000 records"), "{}", f[4].summary);
    // The norm the summary quotes is the threshold, not the bar.
    assert!(f[4].summary.contains("under 500"), "{}", f[4].summary);
}

/// An export that outlives its alert's cooldown counts afresh, as any other record does: its
/// next chunk after the cooldown, over the threshold with what it holds already, raises a new
/// alert. Before, an export raised only as its sum crossed a bar, and after the cooldown
/// (the bar back at the threshold, which the sum had crossed long before) it never raised
/// again, however much more it took.
#[test]
fn an_export_outliving_its_alerts_cooldown_is_alerted_on_again() {
    let mut d = with(|s| {
        if let Some(r) = s.rules.get_mut(&Rule::Volume) {
            r.mode = Mode::Off;
        }
    });
    let cooldown = i64::try_from(d.settings.cooldown.as_millis()).unwrap();
    let after = SUMMER_MORNING + cooldown + 1;
    // The chunk after the alert's comes once its cooldown is over.
    let f = run(
        &mut d,
        vec![
            chunk("c", SUMMER_MORNING, "r1", 300, 1),
            chunk("c", SUMMER_MORNING + 1, "r1", 300, 2),
            chunk("c", after, "r1", 10, 3),
            chunk("c", after + 1, "r1", 10, 4),
        ],
    );
    assert_eq!(
        escalations(&f),
        vec![(Rule::LargeExport, 0), (Rule::LargeExport, 0)]
    );
    assert_eq!(f[1].at_ms, after);
    assert!(f[1].summary.contains("610 records"), "{}", f[1].summary);

    // An alert not acted on (no room for it: `forget_cooldown`) is raised again by the
    // export's next chunk.
    let mut d = with(|s| {
        if let Some(r) = s.rules.get_mut(&Rule::Volume) {
            r.mode = Mode::Off;
        }
    });
    let f = run(
        &mut d,
        vec![
            chunk("c", SUMMER_MORNING, "r1", 300, 1),
            chunk("c", SUMMER_MORNING + 1, "r1", 300, 2),
        ],
    );
    assert_eq!(escalations(&f), vec![(Rule::LargeExport, 0)]);
    d.forget_cooldown(Rule::LargeExport, &f[0].key, 0);
    let f = run(&mut d, vec![chunk("c", SUMMER_MORNING + 2, "r1", 10, 3)]);
    assert_eq!(escalations(&f), vec![(Rule::LargeExport, 0)]);
    assert!(f[0].summary.contains("610 records"), "{}", f[0].summary);
}

#[test]
fn denied_burst_counts_refusals_by_address_when_unauthenticated() {
    let mut d = detector();
    let f = run(
        &mut d,
        (0..20)
            .map(|i| denied(None, SUMMER_MORNING + i * 100, "token_signature_invalid"))
            .collect(),
    );
    assert_eq!(rules(&f), vec![Rule::DeniedBurst]);
    assert_eq!(f[0].key, "addr:10.0.0.1");
    let mut d = detector();
    let quiet = (0..19)
        .map(|i| denied(Some("p"), SUMMER_MORNING + i * 100, "forbidden_by_policy"))
        .collect();
    assert_eq!(run(&mut d, quiet), vec![]);
    // Purposes the catalogue does not know (`sale`), answered 400, are refusals too; other
    // errors are not.
    for (reason, burst) in [("purpose_unknown", true), ("upstream_timeout", false)] {
        let mut d = detector();
        let asked = (0..20)
            .map(|i| {
                let mut r = denied(Some("p"), SUMMER_MORNING + i * 100, reason);
                r.decision = Decision::Error;
                r.status = 400;
                r
            })
            .collect();
        let f = run(&mut d, asked);
        assert_eq!(
            rules(&f) == vec![Rule::DeniedBurst],
            burst,
            "{reason}: {f:?}"
        );
    }
}

#[test]
fn an_ipv6_client_rotating_through_its_own_64_is_one_client() {
    // Twenty refusals, each from a new address of one /64: one burst.
    let mut d = detector();
    let recs = (0..20)
        .map(|i| {
            let mut r = denied(None, SUMMER_MORNING + i * 100, "token_signature_invalid");
            r.client_addr = Some(format!(
                "2001:db8:7:1:{i:x}:99ff:fe00:{:x}",
                i * 7919 % 0x10000
            ));
            r
        })
        .collect();
    let f = run(&mut d, recs);
    assert_eq!(rules(&f), vec![Rule::DeniedBurst]);
    assert_eq!(f[0].key, "addr:2001:db8:7:1::/64");
    // The finding names the address that tipped it, not the network.
    assert_eq!(
        f[0].client_addr.as_deref(),
        Some("2001:db8:7:1:13:99ff:fe00:4bbd")
    );
    // The same twenty from twenty /64s are twenty clients, and IPv4 addresses stay apart.
    for addr in [
        |i: i64| format!("2001:db8:7:{i:x}::1"),
        |i: i64| format!("192.0.2.{i}"),
    ] {
        let mut d = detector();
        let recs = (0..20)
            .map(|i| {
                let mut r = denied(None, SUMMER_MORNING + i * 100, "token_signature_invalid");
                r.client_addr = Some(addr(i));
                r
            })
            .collect();
        assert_eq!(run(&mut d, recs), vec![]);
    }
    // A token used from privacy addresses of one home is used from one place.
    let mut d = detector();
    let recs = (0..8)
        .map(|i| {
            let mut r = listing("home", SUMMER_MORNING + i * 60_000, 10);
            r.client_addr = Some(format!("2001:db8:7:1::{:x}", i + 1));
            r
        })
        .collect();
    assert_eq!(run(&mut d, recs), vec![]);
}

#[test]
fn out_of_area_and_protected_targets_match() {
    let mut d = detector();
    let f = run(
        &mut d,
        vec![
            read("p", SUMMER_MORNING, "E000001", Some("out_of_area")),
            read("p", SUMMER_MORNING + 1000, "E000500", Some("out_of_area")),
            read("p", SUMMER_MORNING + 2000, "E000900", Some("out_of_area")),
        ],
    );
    assert_eq!(rules(&f), vec![Rule::OutOfArea]);
    let mut d = detector();
    let f = run(
        &mut d,
        vec![read("q", SUMMER_MORNING, "E000042", Some("protected"))],
    );
    assert_eq!(rules(&f), vec![Rule::ProtectedSubject]);
    let mut d = detector();
    let f = run(
        &mut d,
        vec![read("q", SUMMER_MORNING, "E000042", Some("policy"))],
    );
    assert_eq!(f, vec![]);
}

#[test]
fn ended_tokens_match() {
    let mut d = detector();
    let f = run(
        &mut d,
        (0..5)
            .map(|i| denied(Some("gone"), SUMMER_MORNING + i * 1000, "token_revoked"))
            .collect(),
    );
    assert_eq!(rules(&f), vec![Rule::EndedGrant]);
}

/// An aggregate every ten seconds: the series' alert at the 30th does not buy the rest of the
/// hour unseen. Sixty more (twice the threshold) raise an escalation; the next bar, 120 more,
/// is past the 150 sent.
#[test]
fn aggregates_on_after_a_series_alert_escalate() {
    let aggregate = |i: i64| {
        let mut r = listing("analyst-1", SUMMER_MORNING + i * 10_000, 0);
        r.route = Some("voter.aggregate".into());
        r.path = "/voter/electors/aggregate".into();
        r
    };
    let mut d = detector();
    let f = run(&mut d, (0..150).map(aggregate).collect());
    assert_eq!(
        escalations(&f),
        vec![(Rule::AggregateSeries, 0), (Rule::AggregateSeries, 1)]
    );
    assert_eq!(f[1].evidence.len(), 60, "{:?}", f[1]);
    assert!(f[1].summary.contains("60 aggregates"), "{}", f[1].summary);
}

#[test]
fn a_series_of_aggregates_matches_and_a_study_s_few_do_not() {
    let aggregate = |i: i64| {
        let mut r = listing("analyst-1", SUMMER_MORNING + i * 60_000, 0);
        r.route = Some("voter.aggregate".into());
        r.path = "/voter/electors/aggregate".into();
        r
    };
    let mut d = detector();
    assert_eq!(run(&mut d, (0..29).map(aggregate).collect()), vec![]);
    let mut d = detector();
    let f = run(&mut d, (0..30).map(aggregate).collect());
    assert_eq!(rules(&f), vec![Rule::AggregateSeries]);
    // Refused aggregates are the denied-burst rule's, and listings are not aggregates.
    let mut d = detector();
    let refused = (0..30).map(|i| {
        let mut r = aggregate(i);
        r.decision = Decision::Deny;
        r
    });
    assert!(!rules(&run(&mut d, refused.collect())).contains(&Rule::AggregateSeries));
    // But one refused for making too many groups was counted, and says something by being
    // refused or not: a series of those is a series.
    let mut d = detector();
    let too_many = (0..30).map(|i| {
        let mut r = aggregate(i);
        r.decision = Decision::Error;
        r.reason = Some("too_many_groups".into());
        r
    });
    assert_eq!(
        rules(&run(&mut d, too_many.collect())),
        vec![Rule::AggregateSeries]
    );
    let mut d = detector();
    let lists = (0..30).map(|i| listing("analyst-1", SUMMER_MORNING + i * 60_000, 0));
    assert_eq!(run(&mut d, lists.collect()), vec![]);
    // Nor is a write a dataset happens to call `aggregate`.
    let mut d = detector();
    let writes = (0..30).map(|i| {
        let mut r = aggregate(i);
        r.route = Some("voter.write.aggregate".into());
        r
    });
    assert_eq!(run(&mut d, writes.collect()), vec![]);
}

#[test]
fn one_token_minted_beyond_its_issuer_s_roles_matches_at_once() {
    let mut d = detector();
    let f = run(
        &mut d,
        vec![denied(None, SUMMER_MORNING, "token_role_not_from_issuer")],
    );
    assert_eq!(rules(&f), vec![Rule::IssuerOverreach]);
    // Nor may it name another issuer's callers.
    let mut d = detector();
    let f = run(
        &mut d,
        vec![denied(None, SUMMER_MORNING, "token_name_not_from_issuer")],
    );
    assert_eq!(rules(&f), vec![Rule::IssuerOverreach]);
    // Other refused tokens are not it.
    let mut d = detector();
    let f = run(
        &mut d,
        vec![denied(None, SUMMER_MORNING, "token_signature_invalid")],
    );
    assert_eq!(f, vec![]);
}

#[test]
fn one_token_from_many_addresses() {
    let mut d = detector();
    let recs = (0..4)
        .map(|i| {
            let mut r = listing("roamer", SUMMER_MORNING + i * 60_000, 10);
            r.client_addr = Some(format!("192.0.2.{i}"));
            r
        })
        .collect();
    let f = run(&mut d, recs);
    assert_eq!(rules(&f), vec![Rule::ManyAddresses]);
    assert!(f[0].summary.contains("4 addresses"), "{}", f[0].summary);
    assert!(!f[0].summary.contains("192.0.2."), "{}", f[0].summary);
    assert_eq!(
        f[0].addresses,
        ["192.0.2.0", "192.0.2.1", "192.0.2.2", "192.0.2.3"]
    );
    // Three addresses, repeatedly: a phone moving between wifi and mobile data is fine.
    let mut d = detector();
    let recs = (0..30)
        .map(|i| {
            let mut r = listing("phone", SUMMER_MORNING + i * 60_000, 10);
            r.client_addr = Some(format!("192.0.2.{}", i % 3));
            r
        })
        .collect();
    assert_eq!(run(&mut d, recs), vec![]);
}

#[test]
fn unusual_hours_are_read_in_london_time() {
    // 2026-01-15 22:30 UTC is 22:30 GMT: outside 07:00-21:00.
    let winter_night = 1_768_516_200_000;
    let mut d = detector();
    let f = run(&mut d, vec![listing("owl", winter_night, 100)]);
    assert_eq!(rules(&f), vec![Rule::UnusualHours]);
    // 2026-06-10 06:30 UTC is 07:30 BST: inside.
    let summer_morning = 1_781_073_000_000;
    let mut d = detector();
    assert_eq!(
        run(&mut d, vec![listing("lark", summer_morning, 100)]),
        vec![]
    );
    // The same instant read in UTC is 06:30: outside.
    let mut d = with(|s| s.zone = crate::watch::settings::Zone::Utc);
    let f = run(&mut d, vec![listing("lark", summer_morning, 100)]);
    assert_eq!(rules(&f), vec![Rule::UnusualHours]);
}

#[test]
fn british_summer_time_changes_on_the_last_sundays() {
    // 2026: BST from 29 March 01:00 UTC to 25 October 01:00 UTC.
    let at = |s: &str| ts_millis(s).unwrap();
    let m = |s: &str| local_minute(at(s), Zone::EuropeLondon);
    assert_eq!(m("2026-03-29T00:59:00.000Z"), 59);
    assert_eq!(m("2026-03-29T01:00:00.000Z"), 120);
    assert_eq!(m("2026-10-25T00:59:00.000Z"), 119);
    assert_eq!(m("2026-10-25T01:00:00.000Z"), 60);
}

#[test]
fn sequential_reads_are_enumeration_and_shuffled_reads_are_not() {
    let mut d = detector();
    let recs = (0..20)
        .map(|i| {
            read(
                "enum",
                SUMMER_MORNING + i * 500,
                &format!("E{:06}", 1000 + i),
                None,
            )
        })
        .collect();
    let f = run(&mut d, recs);
    assert_eq!(rules(&f), vec![Rule::Enumeration]);
    assert_eq!(f[0].evidence.len(), 20);
    let mut d = detector();
    let recs = (0..40)
        .map(|i| {
            read(
                "shuffle",
                SUMMER_MORNING + i * 500,
                &format!("E{:06}", (i * 7919) % 1000),
                None,
            )
        })
        .collect();
    assert_eq!(run(&mut d, recs), vec![]);
}

/// A sweep that leaves a wider gap now and then, or reads every fifth id, shows all the
/// same (no chain of close ids reaches the threshold, but the reads crowd a short run of
/// ids); reads of ids that hold no record neither count nor push a sweep's reads out.
#[test]
fn enumeration_is_seen_through_gaps_strides_and_reads_of_nothing() {
    let id = |n: u64| format!("E{n:06}");
    // Nineteen read, four skipped, over and over.
    let blocks: Vec<u64> = (0..40).map(|i| 1000 + (i / 19) * 23 + i % 19).collect();
    // Every fifth.
    let fifths: Vec<u64> = (0..20).map(|i| 3000 + i * 5).collect();
    for (name, ids) in [("blocks", blocks), ("fifths", fifths)] {
        let recs = (ids.iter().enumerate())
            .map(|(i, n)| read(name, SUMMER_MORNING + i as i64 * 500, &id(*n), None))
            .collect();
        let f = run(&mut detector(), recs);
        assert_eq!(rules(&f), vec![Rule::Enumeration], "{name}");
        assert!(f[0].evidence.len() >= 20, "{name}: {:?}", f[0].evidence);
    }
    // Ten of a sweep, five thousand reads of ids that hold nothing, ten more of the sweep.
    let nothing = |n: u64, ms: i64| {
        let mut r = listing("flush", ms, 0);
        r.route = Some("voter.read".into());
        r.path = format!("/voter/electors/{}", id(n));
        r.status = 404;
        r.decision = Decision::Error;
        r.reason = Some("not_found".into());
        r
    };
    let mut recs: Vec<AuditRecord> = (0..10)
        .map(|i| read("flush", SUMMER_MORNING + i, &id(5000 + i as u64), None))
        .collect();
    recs.extend((0..5000).map(|i| nothing(500_000 + i * 1000, SUMMER_MORNING + 100 + i as i64)));
    recs.extend((10..20).map(|i| {
        read(
            "flush",
            SUMMER_MORNING + 6000 + i,
            &id(5000 + i as u64),
            None,
        )
    }));
    let f = run(&mut detector(), recs);
    assert_eq!(rules(&f), vec![Rule::Enumeration]);
    // The sweep's twenty reads: the first ten and the last ten.
    let sweep: Vec<u64> = (1..=10).chain(5011..=5020).collect();
    assert_eq!(f[0].evidence, sweep);
}

/// A sweep through the register shows however it is ordered or padded: backwards, each id
/// twice, an unrelated read between, two datasets taken in turn, or spread across the ten
/// minutes so that no fixed run of them fits.
#[test]
fn enumeration_is_seen_in_any_order_and_across_the_window() {
    let reads = |who: &str, ids: Vec<(i64, String)>| -> Vec<AuditRecord> {
        (ids.into_iter())
            .map(|(ms, id)| read(who, SUMMER_MORNING + ms, &id, None))
            .collect()
    };
    let id = |n: i64| format!("E{n:06}");
    let backwards = (0..20).map(|i| (i * 500, id(2000 - i))).collect();
    let twice = (0..40).map(|i| (i * 500, id(3000 + i / 2))).collect();
    let padded = (0..40)
        .map(|i| {
            let n = if i % 2 == 0 {
                4000 + i / 2
            } else {
                900_000 + i * 97
            };
            (i * 500, id(n))
        })
        .collect();
    // Ten reads, nine more nine minutes later, eleven more two minutes after that: no ten
    // minutes from the first read hold twenty (a run counted from its start misses it),
    // but the last ten minutes do.
    let spread = (0..30)
        .map(|i| {
            let at = match i {
                0..=9 => i * 1000,
                10..=18 => 540_000 + i * 1000,
                _ => 660_000 + i * 1000,
            };
            (at, id(5000 + i))
        })
        .collect();
    for (name, ids) in [
        ("backwards", backwards),
        ("twice", twice),
        ("padded", padded),
        ("spread", spread),
    ] {
        let f = run(&mut detector(), reads(name, ids));
        assert_eq!(rules(&f), vec![Rule::Enumeration], "{name}");
    }
    // Two datasets taken in turn: each its own sweep (one alert, in the cooldown).
    let datasets = (0..40)
        .map(|i| {
            let mut r = read(
                "datasets",
                SUMMER_MORNING + i * 500,
                &id(6000 + i / 2),
                None,
            );
            if i % 2 == 1 {
                r.route = Some("membership.read".into());
                r.path = format!("/membership/members/M-{}", 6000 + i / 2);
            }
            r
        })
        .collect();
    let f = run(&mut detector(), datasets);
    assert_eq!(rules(&f), vec![Rule::Enumeration]);
    assert_eq!(f[0].evidence.len(), 20);
    // The same reads spread over more than the window: no twenty of them in any ten minutes.
    let slow = (0..40).map(|i| (i * 40_000, id(7000 + i))).collect();
    assert_eq!(run(&mut detector(), reads("slow", slow)), vec![]);
}

#[test]
fn modes_and_cooldown() {
    let mut d = with(|s| {
        if let Some(r) = s.rules.get_mut(&Rule::LargeExport) {
            r.mode = Mode::Off;
        }
        if let Some(r) = s.rules.get_mut(&Rule::Volume) {
            r.mode = Mode::Monitor;
        }
        s.cooldown = Duration::from_secs(60);
    });
    let f = run(
        &mut d,
        vec![
            listing("m", SUMMER_MORNING, 3000),
            listing("m", SUMMER_MORNING + 10_000, 3000),
            listing("m", SUMMER_MORNING + 61_000, 3000),
        ],
    );
    // Large export is off; volume reports in monitor mode, once per cooldown.
    assert_eq!(rules(&f), vec![Rule::Volume, Rule::Volume]);
    assert!(f.iter().all(|f| f.mode == Mode::Monitor));
    assert_eq!(f[1].evidence, vec![2, 3]);
}

#[test]
fn admin_records_are_not_access() {
    let mut d = detector();
    let mut r = listing("dpo", SUMMER_MORNING, 5000);
    r.kind = RecordKind::Admin;
    assert_eq!(d.observe(1, &r), vec![]);
}

#[test]
fn a_writes_record_before_forwarding_discloses_nothing() {
    let r = listing("c", SUMMER_MORNING, 1);
    assert_eq!(Observation::of(&r).unwrap().disclosed, 1);
    let mut intent = r.clone();
    intent.detail = Some(serde_json::json!({ "write": "intended", "written": ["last_canvassed"] }));
    assert!(intent.is_write_intent());
    assert_eq!(Observation::of(&intent).unwrap().disclosed, 0);
    // Any other detail is an access like any other.
    let mut answered = r;
    answered.detail = Some(serde_json::json!({ "written": ["last_canvassed"] }));
    assert!(!answered.is_write_intent());
    assert_eq!(Observation::of(&answered).unwrap().disclosed, 1);
}

/// What the detector holds follows the principals and addresses, not the requests, and an
/// attacker's choice of addresses is gone with its rule's own window.
#[test]
fn detector_memory_is_bounded_by_addresses_and_windows() {
    let mut d = detector();
    // One token, many requests from one address: one entry.
    for i in 0..5_000 {
        let mut r = listing("busy", SUMMER_MORNING + i, 0);
        r.decision = Decision::Deny;
        r.reason = Some("quota_exceeded".into());
        d.observe(i as u64, &r);
    }
    let seen = &d.addresses["tok-busy"];
    assert_eq!(seen.by_addr.len(), 1);
    assert!(seen.evidence().len() <= EVIDENCE_PER_ADDRESS);
    // One token from a rotating range (of /64s: one /64 is one client): capped.
    for i in 0..3_000u64 {
        let mut r = listing("rotor", SUMMER_MORNING + i as i64, 0);
        r.client_addr = Some(format!("2001:db8:{i:x}::1"));
        d.observe(10_000 + i, &r);
    }
    assert_eq!(
        d.addresses["tok-rotor"].by_addr.len(),
        MAX_ADDRESSES_PER_TOKEN
    );
    // One principal reading the same few ids over and over: one entry per id.
    for i in 0..5_000u64 {
        let id = format!("E{:06}", i % 7 * 10);
        d.observe(
            20_000 + i,
            &read("rereader", SUMMER_MORNING + i as i64, &id, None),
        );
    }
    let reads = &d.reads[&("rereader".to_owned(), "voter.read".to_owned())];
    assert_eq!((reads.by_id.len(), reads.by_time.len()), (7, 7));
    // Refusals from many unauthenticated addresses: gone a minute (denied_burst's window)
    // later, though other rules look back an hour.
    let mut d = detector();
    for i in 0..1_000u64 {
        let mut r = denied(None, SUMMER_MORNING, "token_signature_invalid");
        r.client_addr = Some(format!("198.51.100.{}", i % 250));
        d.observe(i, &r);
    }
    assert!(!d.windows.is_empty());
    d.sweep(SUMMER_MORNING + 61_000);
    assert!(
        d.windows.keys().all(|(rule, _)| *rule != Rule::DeniedBurst),
        "{:?}",
        d.windows.keys().collect::<Vec<_>>()
    );
}

/// Refusals on the admin plane count as refusals: probing `/rights` or `/sar` with a stolen or
/// ended token is seen; its successful actions are not accesses.
#[test]
fn admin_refusals_are_seen_and_its_actions_are_not() {
    let mut d = detector();
    let recs = (0..20)
        .map(|i| {
            let mut r = denied(
                Some("snoop"),
                SUMMER_MORNING + i * 100,
                "forbidden_by_policy",
            );
            r.kind = RecordKind::Admin;
            r.route = Some("admin.sar".into());
            r
        })
        .collect();
    assert_eq!(rules(&run(&mut d, recs)), vec![Rule::DeniedBurst]);
    let mut allowed = listing("dpo", SUMMER_MORNING, 0);
    allowed.kind = RecordKind::Admin;
    assert!(Observation::of(&allowed).is_none());
}

/// A finding dropped for want of room is not raised, so the rule is not quiet for them: the
/// next record that matches raises it.
#[test]
fn a_forgotten_cooldown_raises_again() {
    let mut d = detector();
    let f = run(&mut d, vec![listing("c", SUMMER_MORNING, 500)]);
    assert_eq!(rules(&f), vec![Rule::LargeExport]);
    assert_eq!(d.observe(2, &listing("c", SUMMER_MORNING + 1, 500)), vec![]);
    d.forget_cooldown(Rule::LargeExport, "c", 0);
    let again = d.observe(3, &listing("c", SUMMER_MORNING + 2, 500));
    assert_eq!(rules(&again), vec![Rule::LargeExport]);
}
