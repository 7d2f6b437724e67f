//! Filter tests over bytes: what leaves, what is counted, and fail-closed parsing.

use std::collections::HashMap;

use super::*;
use crate::catalog::Catalog;

fn dataset() -> Dataset {
    Catalog::parse(include_str!("../../config/catalog.toml"))
        .unwrap()
        .datasets["voter"]
        .clone()
}

fn cx(ds: &Dataset) -> FilterContext<'_> {
    FilterContext {
        dataset: ds,
        today: days_from_iso_date("2026-11-23").unwrap(),
        register: &RegisterFlags::EMPTY,
        filtered_on: &[],
        paging: None,
        must_match: None,
    }
}

/// A register that restricts `subjects`.
fn restricted(subjects: &[&str]) -> RegisterFlags {
    (subjects.iter())
        .map(|s| (s.to_string(), vec!["restricted".to_owned()]))
        .collect()
}

fn record(id: &str, pd: &str, extra: &str) -> String {
    format!(
        r#"{{"elector_id":"{id}","local_authority":"E08000035","polling_district":"{pd}","first_name":"Ann","surname":"Lee","email":"a@example.org","markers":[],"flags":[],"consents":{{"email":{{"given_at":"2025-01-01T00:00:00Z","source":"web_form","withdrawn_at":null}},"sms":null}},"tps_checked_at":"2026-11-01","attainer_date":null{extra}}}"#
    )
}

/// `filter_page` with a memo of its own.
fn page(
    body: &[u8],
    envelope: Envelope,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
) -> Result<(Vec<u8>, Disclosure), FilterError> {
    filter_page(body, envelope, cx, decide, &mut Memo::default())
}

/// `filter_page` of a wardgate envelope through `memo` (as the gateway's pooled memo).
fn page_through(
    body: &str,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    memo: &mut Memo,
) -> (Vec<u8>, Disclosure) {
    filter_page(body.as_bytes(), Envelope::Records, cx, decide, memo).unwrap()
}

/// A decision with no policy ids.
fn verdict(allowed: bool, categories: &[&str]) -> Arc<RecordDecision> {
    Arc::new(RecordDecision {
        allowed,
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        policy_ids: Vec::new(),
    })
}

/// Allows records in CGW1 only, and the identity + identifier categories.
fn decide(a: &RecordAttrs) -> Arc<RecordDecision> {
    Arc::new(RecordDecision {
        allowed: a.area == "E08000035/CGW1" && !a.markers.contains("N"),
        categories: ["identifier", "identity"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        policy_ids: vec![format!("area-{}", a.area)],
    })
}

#[test]
fn rows_out_of_scope_are_dropped_and_fields_stripped() {
    let ds = dataset();
    let body = format!(
        r#"{{"records":[{},{}],"page":1,"per_page":2,"next_page":null}}"#,
        record("VF-1", "CGW1", ""),
        record("VF-2", "CGW9", "")
    );
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["records"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["records"][0],
        serde_json::json!({"elector_id":"VF-1","first_name":"Ann","surname":"Lee"})
    );
    assert_eq!(v["page"], 1);
    assert_eq!(d.subjects, vec!["VF-1".to_owned()]);
    assert_eq!(
        d.fields.iter().cloned().collect::<Vec<_>>(),
        vec!["elector_id", "first_name", "surname"]
    );
    assert_eq!(d.rows_withheld, 1);
}

#[test]
fn unclassified_fields_never_leave() {
    let ds = dataset();
    let body = format!(
        r#"{{"records":[{}]}}"#,
        record("VF-1", "CGW1", r#","shadow_notes":"secret""#)
    );
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut |_| {
        Arc::new(RecordDecision {
            allowed: true,
            categories: ds.fields.values().cloned().collect(),
            policy_ids: Vec::new(),
        })
    })
    .unwrap();
    assert!(!String::from_utf8_lossy(&out).contains("secret"));
    assert_eq!(d.unclassified_fields, 1);
}

#[test]
fn a_record_missing_a_policy_attribute_is_withheld() {
    let ds = dataset();
    let no_flags = record("VF-1", "CGW1", "").replace(r#""flags":[],"#, "");
    let bad_markers = record("VF-2", "CGW1", "").replace(r#""markers":[]"#, r#""markers":"N""#);
    let no_area = record("VF-3", "CGW1", "").replace(r#""polling_district":"CGW1","#, "");
    let body = format!(r#"{{"records":[{no_flags},{bad_markers},{no_area}]}}"#);
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), r#"{"records":[]}"#);
    assert_eq!((d.rows_withheld, d.malformed_rows), (3, 3));
}

#[test]
fn a_record_naming_a_field_twice_is_withheld() {
    // An anonymous elector whose flags or markers come twice: a reader of the output would
    // take the last, the attributes were read from the first. Neither may leave, whichever
    // copy is the restrictive one, and neither spoils its well-formed lookalike.
    let ds = dataset();
    let twice = [
        record("VF-1", "CGW1", r#","markers":["N"]"#),
        record("VF-2", "CGW1", r#","flags":["anonymous"]"#),
        record("VF-3", "CGW1", r#","surname":"Other""#),
        record("VF-4", "CGW1", r#","polling_district":"CGW2""#),
        record("VF-5", "CGW1", "").replace(r#""markers":[]"#, r#""markers":["N"],"markers":[]"#),
    ];
    let fine = record("VF-6", "CGW1", "");
    let body = format!(r#"{{"records":[{},{fine}]}}"#, twice.join(","));
    let mut memo = Memo::default();
    for _ in 0..2 {
        let (out, d) = page_through(&body, &cx(&ds), &mut decide, &mut memo);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(d.subjects, ["VF-6"], "{out}");
        // VF-5's first copy already refuses it: withheld by policy, not as malformed.
        assert_eq!((d.rows_withheld, d.malformed_rows), (5, 4));
        assert!(!out.contains("VF-1") && !out.contains("Other"), "{out}");
    }
    let single = format!(r#"{{"record":{}}}"#, twice[1]);
    let (out, d) =
        filter_single(single.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    assert!(out.is_none());
    assert_eq!(d.malformed_rows, 1);
}

#[test]
fn malformed_bodies_are_errors_not_pass_through() {
    let ds = dataset();
    for body in [
        &b"{"[..],
        b"[]",
        b"{\"rows\":[]}",
        b"{\"records\":{}}",
        b"not json",
        b"{\"records\":[1]}",
        b"{\"records\":null}",
        b"{\"records\":[],\"records\":[]}",
        b"{\"records\":[],\"page\":1,\"page\":2}",
        b"{\"records\":[]} trailing",
        b"{\"records\":[{\"a\":1},]}",
        b"{\"records\":[{\"a\":1}]",
        b"{\"records\":[],\"other\":[1,}",
        b"{\"records\":[{\"a\":\"\xff\"}]}",
        // Paging values pass on as they come, so only whole numbers (and a last page's
        // `null`) may: a cursor could spell out a withheld record's values.
        b"{\"records\":[],\"next_page\":{\"after\":\"Lee\",\"id\":\"VF-9\"}}",
        b"{\"records\":[],\"next_page\":\"Lee|VF-9\"}",
        b"{\"records\":[],\"next_page\":[2]}",
        b"{\"records\":[],\"next_page\":1.5}",
        b"{\"records\":[],\"page\":-1}",
        b"{\"records\":[],\"page\":null}",
        b"{\"records\":[],\"per_page\":\"50\"}",
        b"{\"records\":[],\"per_page\":1e3}",
    ] {
        assert!(
            page(body, Envelope::Records, &cx(&ds), &mut decide).is_err(),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    assert!(
        filter_single(
            b"{\"records\":[]}",
            Envelope::Records,
            &cx(&ds),
            &mut decide
        )
        .is_err()
    );
}

#[test]
fn consent_and_tps_are_read_from_the_record() {
    let ds = dataset();
    let withdrawn = record("VF-1", "CGW1", "").replace(
        r#""withdrawn_at":null"#,
        r#""withdrawn_at":"2026-01-01T00:00:00Z""#,
    );
    let stale_tps = record("VF-2", "CGW1", "").replace("2026-11-01", "2026-01-01");
    let mut seen = HashMap::new();
    for (id, r) in [
        ("VF-1", withdrawn),
        ("VF-2", stale_tps),
        ("VF-3", record("VF-3", "CGW1", "")),
    ] {
        let rec = RawRecord::parse(&r).unwrap();
        let (_, attrs) = record_attrs(&rec, &cx(&ds)).unwrap();
        seen.insert(id, attrs);
    }
    assert!(seen["VF-1"].consented.is_empty());
    assert!(seen["VF-2"].consented.contains("email") && !seen["VF-2"].tps_fresh);
    assert!(seen["VF-3"].tps_fresh);
}

/// `record` with its attainer date (the day the elector turns 18) written as `raw`.
fn attainer(id: &str, raw: &str) -> String {
    record(id, "CGW1", "").replace(
        r#""attainer_date":null"#,
        &format!(r#""attainer_date":{raw}"#),
    )
}

#[test]
fn an_attainer_date_more_than_two_years_away_is_an_under_16s() {
    // `cx`'s today is 2026-11-23.
    let ds = dataset();
    for (raw, under_16) in [
        ("null", false),
        (r#""2027-05-01""#, false),
        // Sixteen today, and sixteen tomorrow.
        (r#""2028-11-23""#, false),
        (r#""2028-11-24""#, true),
        (r#""2031-01-01""#, true),
    ] {
        let text = attainer("VF-1", raw);
        let rec = RawRecord::parse(&text).unwrap();
        let (_, attrs) = record_attrs(&rec, &cx(&ds)).unwrap();
        assert_eq!(attrs.flags.contains("under_16"), under_16, "{raw}");
        assert_eq!(attrs.never_disclosed(), under_16, "{raw}");
    }
    // Where the day is in doubt it goes to the child: an eighteenth birthday on 29 February
    // puts the sixteenth on 1 March; one on 28 February (where a child born on 29 February
    // may be put) puts it on 29 February in a leap year, and leaves it in a common one.
    let day = |s: &str| days_from_iso_date(s).unwrap();
    assert_eq!(under_16_on("2028-02-29", day("2026-02-28")), Some(true));
    assert_eq!(under_16_on("2028-02-29", day("2026-03-01")), Some(false));
    assert_eq!(under_16_on("2028-03-01", day("2026-02-28")), Some(true));
    assert_eq!(under_16_on("2030-02-28", day("2028-02-28")), Some(true));
    assert_eq!(under_16_on("2030-02-28", day("2028-02-29")), Some(false));
    assert_eq!(under_16_on("2029-02-28", day("2027-02-27")), Some(true));
    assert_eq!(under_16_on("2029-02-28", day("2027-02-28")), Some(false));
    // Only a date written exactly `YYYY-MM-DD` is one: no sign, no time, no other calendar.
    for not_a_date in [
        "-2030-11-24",
        "+2030-11-24",
        "2030-11-24T00:00:00Z",
        "2030-11-31",
        "30-11-24",
        "",
    ] {
        assert_eq!(
            under_16_on(not_a_date, day("2026-11-23")),
            None,
            "{not_a_date}"
        );
    }
}

#[test]
fn an_unreadable_or_missing_attainer_date_withholds_the_record() {
    let ds = dataset();
    let missing = record("VF-5", "CGW1", "").replace(r#","attainer_date":null"#, "");
    // Each after a readable one of the same layout: an unreadable date must not share its
    // remembered decision.
    let body = format!(
        r#"{{"records":[{},{},{},{},{},{},{missing}]}}"#,
        attainer("VF-0", r#""2027-05-01""#),
        attainer("VF-1", r#""2028-02-30""#),
        attainer("VF-2", r#""soon""#),
        attainer("VF-3", "20281124"),
        attainer("VF-4", r#"["2028-11-24"]"#),
        attainer("VF-6", r#""-2030-11-24""#),
    );
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let kept: Vec<&str> = (v["records"].as_array().unwrap().iter())
        .map(|r| r["elector_id"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["VF-0"]);
    assert_eq!((d.rows_withheld, d.malformed_rows), (6, 6));
}

#[test]
fn an_under_16_by_attainer_date_is_counted_as_never_disclosed() {
    // What breach detection and the datastore-contract metric read: the flag the datastore
    // left off is put on, and the decision is asked with it.
    let ds = dataset();
    let body = format!(
        r#"{{"records":[{},{}]}}"#,
        attainer("VF-1", r#""2030-06-01""#),
        attainer("VF-2", "null"),
    );
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut |a| {
        verdict(!a.flags.contains("under_16"), &["identifier"])
    })
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["records"], serde_json::json!([{"elector_id": "VF-2"}]));
    assert_eq!((d.rows_withheld, d.never_disclosed_rows), (1, 1));
}

/// Policies that allowed every record and field would still not let an anonymous elector or
/// an under-16 out, on a page, alone or in an export's lines: the filter withholds them itself.
#[test]
fn anonymous_electors_and_under_16s_leave_whatever_the_policies_say() {
    let ds = dataset();
    let anonymous = record("VF-1", "CGW1", "").replace(r#""markers":[]"#, r#""markers":["N"]"#);
    let flagged = record("VF-2", "CGW1", "").replace(r#""flags":[]"#, r#""flags":["under_16"]"#);
    let attained = attainer("VF-3", r#""2030-06-01""#);
    let plain = record("VF-4", "CGW1", "");
    let mut allow_all = |_: &RecordAttrs| verdict(true, &["identifier", "identity", "contact"]);
    let body = format!(r#"{{"records":[{anonymous},{flagged},{attained},{plain}]}}"#);
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut allow_all).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let kept: Vec<&str> = (v["records"].as_array().unwrap().iter())
        .map(|r| r["elector_id"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["VF-4"]);
    assert_eq!((d.rows_withheld, d.never_disclosed_rows), (3, 3));
    assert_eq!(d.subjects.len(), 1);
    for one in [&anonymous, &flagged, &attained] {
        let single = format!(r#"{{"record":{one}}}"#);
        let (out, d) = filter_single(
            single.as_bytes(),
            Envelope::Records,
            &cx(&ds),
            &mut allow_all,
        )
        .unwrap();
        assert!(out.is_none(), "{one}");
        assert_eq!(d.never_disclosed_rows, 1);
        let (mut lines, mut d) = (Vec::new(), Disclosure::default());
        filter_lines(
            format!("{one}\n{plain}\n").as_bytes(),
            &cx(&ds),
            &mut allow_all,
            &mut Memo::default(),
            &mut lines,
            &mut d,
        )
        .unwrap();
        let lines = String::from_utf8(lines).unwrap();
        assert_eq!(lines.lines().count(), 1, "{lines}");
        assert!(lines.contains(r#""VF-4""#), "{lines}");
        assert_eq!((d.rows_withheld, d.never_disclosed_rows), (1, 1), "{one}");
    }
}

/// An export's line is one line for every NDJSON reader: a carriage return between an
/// upstream record's fields (JSON whitespace) is written out as a space, the record otherwise
/// byte for byte, and one in a string (escaped, `\r`) is left as it is.
#[test]
fn carriage_returns_between_fields_do_not_split_an_export_line() {
    let ds = dataset();
    let plain = record("VF-4", "CGW1", "");
    // A raw carriage return between two fields that leave, and an escaped one (`\r`) in a
    // string.
    let with_returns = plain.replacen(r#","surname":"Lee""#, ",\r\"surname\":\"O\\rLee\"", 1);
    assert!(with_returns.contains('\r') && with_returns.contains(r"O\rLee"));
    let (mut out, mut d) = (Vec::new(), Disclosure::default());
    filter_lines(
        format!("{with_returns}\r\n{plain}\n").as_bytes(),
        &cx(&ds),
        &mut decide,
        &mut Memo::default(),
        &mut out,
        &mut d,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains('\r'), "{text:?}");
    let lines: Vec<serde_json::Value> = (text.lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["surname"], "O\rLee", "{text}");
    assert_eq!(d.subjects.len(), 2);
}

/// A numeric id is kept as written when it is a plain integer, so the register's flags under
/// `100` find it; written any other way it is not an id, and the record is withheld.
#[test]
fn numeric_subject_ids_are_plain_integers_or_malformed() {
    let ds = dataset();
    let register = restricted(&["100"]);
    let cx = FilterContext {
        register: &register,
        ..cx(&ds)
    };
    let with_id = |raw: &str| record("X", "CGW1", "").replace(r#""X""#, raw);
    for raw in ["7", "0", "-12", "100"] {
        let body = format!(r#"{{"records":[{}]}}"#, with_id(raw));
        let mut restricted = None;
        let (_, d) = page(body.as_bytes(), Envelope::Records, &cx, &mut |a| {
            restricted = Some(a.flags.contains("restricted"));
            decide(a)
        })
        .unwrap();
        assert_eq!(restricted, Some(raw == "100"), "{raw}");
        assert_eq!(d.subjects, [raw], "{raw}");
    }
    for raw in ["1e2", "100.0", "-0", "123456789012345678901"] {
        let body = format!(r#"{{"records":[{}]}}"#, with_id(raw));
        let (out, d) = page(body.as_bytes(), Envelope::Records, &cx, &mut decide).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"records":[]}"#,
            "{raw}"
        );
        assert_eq!(d.malformed_rows, 1, "{raw}");
    }
}

#[test]
fn register_flags_are_merged_into_the_record_flags() {
    let ds = dataset();
    // Placed as the DPO typed it; the datastore answers in its own case.
    let register = restricted(&["vf-1"]);
    let cx = FilterContext {
        dataset: &ds,
        today: 0,
        register: &register,
        filtered_on: &[],
        paging: None,
        must_match: None,
    };
    for id in ["VF-1", "vf-1"] {
        let text = record(id, "CGW1", "");
        let rec = RawRecord::parse(&text).unwrap();
        assert!(
            record_attrs(&rec, &cx)
                .unwrap()
                .1
                .flags
                .contains("restricted"),
            "{id}"
        );
    }
    let text = record("VF-11", "CGW1", "");
    let rec = RawRecord::parse(&text).unwrap();
    assert!(record_attrs(&rec, &cx).unwrap().1.flags.is_empty());
}

#[test]
fn escaped_keys_and_values_survive_byte_for_byte() {
    let ds = dataset();
    let body = r#"{"record":{"elector_id":"VF-1","local_authority":"E08000035","polling_district":"CGW1","surname":"O\"Neil \u00e9","markers":[],"flags":[],"consents":{},"tps_checked_at":null,"attainer_date":null}}"#;
    let (out, _) =
        filter_single(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.unwrap()).unwrap();
    assert_eq!(v["record"]["surname"], "O\"Neil é");
}

#[test]
fn datasette_rows_become_the_same_envelope() {
    let ds = dataset();
    let body = format!(
        r#"{{"ok":true,"rows":[{},{}],"truncated":false}}"#,
        record("VF-1", "CGW1", ""),
        record("VF-2", "CGW1", "")
    );
    let (out, d) = page(
        body.as_bytes(),
        Envelope::Rows {
            page: 3,
            per_page: 2,
        },
        &cx(&ds),
        &mut decide,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        (
            v["page"].as_u64(),
            v["per_page"].as_u64(),
            v["next_page"].as_u64()
        ),
        (Some(3), Some(2), Some(4))
    );
    assert_eq!(d.subjects.len(), 2);
    let (out, _) = page(
        body.as_bytes(),
        Envelope::Rows {
            page: 1,
            per_page: 5,
        },
        &cx(&ds),
        &mut decide,
    )
    .unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&out).unwrap()["next_page"].is_null());
    // A page the datastore cut short, or one longer than asked for, is refused: its length
    // is how the caller learns where the list ends.
    let rows = |per_page: u32, body: &str| {
        page(
            body.as_bytes(),
            Envelope::Rows { page: 1, per_page },
            &cx(&ds),
            &mut decide,
        )
    };
    let cut = body.replace(r#""truncated":false"#, r#""truncated":true"#);
    let e = rows(5, &cut).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    let e = rows(1, &body).unwrap_err().to_string();
    assert!(e.contains("2 rows for a page of 1"), "{e}");
    assert!(rows(2, &body).is_ok());
    // `truncated` named twice (a last `false` would pass a page cut short as the last) is
    // malformed.
    let twice = body.replace(
        r#""truncated":false"#,
        r#""truncated":true,"truncated":false"#,
    );
    let e = rows(5, &twice).unwrap_err().to_string();
    assert!(e.contains("`truncated` twice"), "{e}");
    // A full page at the last page number a `u32` holds has no next one to name.
    let (out, _) = page(
        body.as_bytes(),
        Envelope::Rows {
            page: u32::MAX,
            per_page: 2,
        },
        &cx(&ds),
        &mut decide,
    )
    .unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&out).unwrap()["next_page"].is_null());
    // A wardgate envelope where rows were expected is malformed, not an empty page.
    assert!(
        page(
            b"{\"records\":[]}",
            Envelope::Rows {
                page: 1,
                per_page: 5
            },
            &cx(&ds),
            &mut decide
        )
        .is_err()
    );
    let (none, _) = filter_single(
        b"{\"rows\":[]}",
        Envelope::Rows {
            page: 1,
            per_page: 1,
        },
        &cx(&ds),
        &mut decide,
    )
    .unwrap();
    assert!(none.is_none());
}

#[test]
fn records_alike_in_every_policy_input_share_one_decision() {
    let ds = dataset();
    // Different subjects, consent timestamps and TPS dates, same attributes: one decision.
    let alike = [
        record("VF-1", "CGW1", ""),
        record("VF-2", "CGW1", "").replace("2025-01-01T00:00:00Z", "2024-06-30T09:15:00Z"),
        record("VF-3", "CGW1", "").replace("2026-11-01", "2026-11-20"),
    ];
    // A different district, a stale TPS check, a withdrawn consent: one decision each.
    let different = [
        record("VF-4", "CGW9", ""),
        record("VF-5", "CGW1", "").replace("2026-11-01", "2026-01-01"),
        record("VF-6", "CGW1", "").replace(
            r#""withdrawn_at":null"#,
            r#""withdrawn_at":"2026-01-01T00:00:00Z""#,
        ),
    ];
    let body = format!(
        r#"{{"records":[{}]}}"#,
        alike
            .iter()
            .chain(&different)
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut asked = Vec::new();
    let (_, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut |a| {
        asked.push(a.clone());
        decide(a)
    })
    .unwrap();
    assert_eq!(asked.len(), 4, "{asked:#?}");
    assert_eq!(d.subjects, ["VF-1", "VF-2", "VF-3", "VF-5", "VF-6"]);
}

/// A fingerprint too long to keep (kilobytes of flags on each record, from a datastore gone
/// wrong) is decided afresh for every record instead of filling the memo, and decided the
/// same; records with short ones still share one decision.
#[test]
fn records_whose_fingerprints_are_too_long_to_keep_are_decided_each_time() {
    let ds = dataset();
    let many: Vec<String> = (0..700).map(|i| format!(r#""x{i:04}""#)).collect();
    let flags = format!(r#""flags":[{}]"#, many.join(","));
    for (flags, asked_for_three) in [(flags.as_str(), 3), (r#""flags":["x0001"]"#, 1)] {
        let records: Vec<String> = (1..=3)
            .map(|i| record(&format!("VF-{i}"), "CGW1", "").replace(r#""flags":[]"#, flags))
            .collect();
        let body = format!(r#"{{"records":[{}]}}"#, records.join(","));
        let mut asked = 0;
        let (_, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut |a| {
            asked += 1;
            decide(a)
        })
        .unwrap();
        assert_eq!(asked, asked_for_three, "{}", &flags[..40]);
        assert_eq!(d.subjects, ["VF-1", "VF-2", "VF-3"]);
    }
}

#[test]
fn a_register_flag_on_one_subject_never_reaches_its_lookalike() {
    let ds = dataset();
    let register = restricted(&["VF-2"]);
    let cx = FilterContext {
        dataset: &ds,
        today: days_from_iso_date("2026-11-23").unwrap(),
        register: &register,
        filtered_on: &[],
        paging: None,
        must_match: None,
    };
    let body = format!(
        r#"{{"records":[{},{},{}]}}"#,
        record("VF-1", "CGW1", ""),
        record("VF-2", "CGW1", ""),
        record("VF-3", "CGW1", "")
    );
    let (_, d) = page(body.as_bytes(), Envelope::Records, &cx, &mut |a| {
        verdict(!a.flags.contains("restricted"), &[])
    })
    .unwrap();
    assert_eq!(d.subjects, ["VF-1", "VF-3"]);
    assert_eq!(d.rows_withheld, 1);
}

#[test]
fn a_malformed_record_does_not_spoil_its_well_formed_lookalikes() {
    let ds = dataset();
    // Same fingerprint inputs, but one subject id is unusable: only that record is withheld.
    let body = format!(
        r#"{{"records":[{},{},{}]}}"#,
        record("VF-1", "CGW1", ""),
        record("", "CGW1", ""),
        record("VF-3", "CGW1", "")
    );
    let (_, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    assert_eq!(d.subjects, ["VF-1", "VF-3"]);
    assert_eq!((d.rows_withheld, d.malformed_rows), (1, 1));
    // And the other way round: a malformed fingerprint is remembered as malformed.
    let bad = record("VF-4", "CGW1", "")
        .replace(r#""tps_checked_at":"2026-11-01""#, r#""tps_checked_at":7"#);
    let body = format!(r#"{{"records":[{bad},{}]}}"#, bad.replace("VF-4", "VF-5"));
    let (_, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    assert!(d.subjects.is_empty());
    assert_eq!(d.malformed_rows, 2);
}

#[test]
fn subject_ids_read_as_before() {
    let ds = dataset();
    for (raw, want) in [
        (r#""VF-1""#, Some("VF-1")),
        (r#""V\u0046-1""#, Some("VF-1")),
        ("42", Some("42")),
        ("-7", Some("-7")),
        // A number that is not a plain integer is no id (`attrs::scalar`).
        ("1.5", None),
        (r#""""#, None),
        ("null", None),
        ("true", None),
        ("[1]", None),
        // Not an id a subject access or rights request could name: withheld.
        (r#""VF.1""#, None),
        (r#""VF 1""#, None),
        (r#""VF/1""#, None),
        (r#""Zoë""#, None),
        (r#""export""#, None),
        (&format!(r#""{}""#, "V".repeat(65)), None),
        (&format!(r#""{}""#, "V".repeat(64)), Some(&*"V".repeat(64))),
    ] {
        let text = format!(
            r#"{{"elector_id":{raw},"local_authority":"E08000035","polling_district":"CGW1","markers":[],"flags":[],"consents":null,"tps_checked_at":null,"attainer_date":null}}"#
        );
        let rec = RawRecord::parse(&text).unwrap();
        assert_eq!(
            record_attrs(&rec, &cx(&ds)).map(|(s, _)| s).as_deref(),
            want,
            "{raw}"
        );
    }
}

/// A memo kept between pages, as the gateway keeps one per caller, purpose and dataset.
mod kept_between_pages {
    use super::*;

    fn two_districts() -> String {
        format!(
            r#"{{"records":[{},{},{}]}}"#,
            record("VF-1", "CGW1", ""),
            record("VF-2", "CGW9", ""),
            record("VF-3", "CGW1", "")
        )
    }

    #[test]
    fn a_second_page_reports_the_same_fields_and_policies_without_asking_again() {
        let ds = dataset();
        let mut memo = Memo::default();
        let mut asked = 0;
        let mut counted = |a: &RecordAttrs| {
            asked += 1;
            decide(a)
        };
        let body = two_districts();
        let (out1, d1) = page_through(&body, &cx(&ds), &mut counted, &mut memo);
        let (out2, d2) = page_through(&body, &cx(&ds), &mut counted, &mut memo);
        assert_eq!(asked, 2, "one decision per fingerprint, then none");
        assert_eq!(out1, out2);
        assert_eq!(d1, d2);
        assert_eq!(
            d2.fields.iter().collect::<Vec<_>>(),
            ["elector_id", "first_name", "surname"]
        );
        // The withheld record's deciding policy is named too: it decided what did not leave.
        assert_eq!(
            d2.policy_ids.iter().collect::<Vec<_>>(),
            ["area-E08000035/CGW1", "area-E08000035/CGW9"]
        );
    }

    #[test]
    fn a_page_names_only_what_its_own_records_used() {
        let ds = dataset();
        let mut memo = Memo::default();
        let only_cgw9 = format!(r#"{{"records":[{}]}}"#, record("VF-2", "CGW9", ""));
        page_through(&two_districts(), &cx(&ds), &mut decide, &mut memo);
        let (out, d) = page_through(&only_cgw9, &cx(&ds), &mut decide, &mut memo);
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"records":[]}"#);
        assert!(d.fields.is_empty(), "{d:?}");
        assert_eq!(
            d.policy_ids.iter().collect::<Vec<_>>(),
            ["area-E08000035/CGW9"]
        );
    }

    #[test]
    fn a_register_flag_added_between_pages_withholds_the_record_at_once() {
        let ds = dataset();
        // The register as each page reads it (`Controls::register_flags`): empty, then VF-3's.
        let (before, after) = (RegisterFlags::EMPTY, restricted(&["VF-3"]));
        let cx = |register| FilterContext {
            dataset: &ds,
            today: days_from_iso_date("2026-11-23").unwrap(),
            register,
            filtered_on: &[],
            paging: None,
            must_match: None,
        };
        let mut by_flags =
            |a: &RecordAttrs| verdict(!a.flags.contains("restricted"), &["identifier"]);
        let mut memo = Memo::default();
        let body = two_districts();
        let (_, d) = page_through(&body, &cx(&before), &mut by_flags, &mut memo);
        assert_eq!(d.subjects, ["VF-1", "VF-2", "VF-3"]);
        let (out, d) = page_through(&body, &cx(&after), &mut by_flags, &mut memo);
        assert_eq!(d.subjects, ["VF-1", "VF-2"]);
        assert!(!String::from_utf8(out).unwrap().contains("VF-3"));
    }

    #[test]
    fn a_stale_tps_check_tomorrow_is_a_different_fingerprint() {
        let ds = dataset();
        // Checked 28 days before "today": fresh today, stale once today moves on.
        let rec = record("VF-1", "CGW1", "").replace("2026-11-01", "2026-10-26");
        let body = format!(r#"{{"records":[{rec}]}}"#);
        let mut memo = Memo::default();
        let mut tps = Vec::new();
        for today in ["2026-11-23", "2027-01-23"] {
            let cx = FilterContext {
                dataset: &ds,
                today: days_from_iso_date(today).unwrap(),
                register: &RegisterFlags::EMPTY,
                filtered_on: &[],
                paging: None,
                must_match: None,
            };
            filter_page(
                body.as_bytes(),
                Envelope::Records,
                &cx,
                &mut |a| {
                    tps.push(a.tps_fresh);
                    decide(a)
                },
                &mut memo,
            )
            .unwrap();
        }
        assert_eq!(tps, [true, false]);
    }
}

#[test]
fn a_channel_named_twice_withholds_the_record() {
    let ds = dataset();
    let given = r#"{"given_at":"2025-01-01T00:00:00Z","withdrawn_at":null}"#;
    let withdrawn = r#"{"given_at":"2025-01-01T00:00:00Z","withdrawn_at":"2026-01-01T00:00:00Z"}"#;
    let consents = |id: &str, c: &str| {
        record(id, "CGW1", "").replace(
            r#""consents":{"email":{"given_at":"2025-01-01T00:00:00Z","source":"web_form","withdrawn_at":null},"sms":null}"#,
            &format!(r#""consents":{c}"#),
        )
    };
    let twice = [
        format!(r#"{{"email":{given},"email":{withdrawn}}}"#),
        format!(r#"{{"email":{withdrawn},"email":{given}}}"#),
        format!(r#"{{"sms":{given},"email":{withdrawn},"post":{given},"email":null}}"#),
        r#"{"email":null,"\u0065mail":null}"#.to_owned(),
    ];
    let once = format!(r#"{{"email":{given},"sms":{withdrawn}}}"#);
    for c in &twice {
        // Alone, twice in a row (the second read as the first was written), and after a
        // record whose channels it starts with.
        for ids in [&["VF-1"][..], &["VF-1", "VF-2"], &["VF-3", "VF-1", "VF-2"]] {
            let recs: Vec<String> = ids
                .iter()
                .map(|id| consents(id, if *id == "VF-3" { &once } else { c }))
                .collect();
            let body = format!(r#"{{"records":[{}]}}"#, recs.join(","));
            let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let out_ids: Vec<&str> = v["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["elector_id"].as_str().unwrap())
                .collect();
            let expected: Vec<&str> = ids.iter().copied().filter(|i| *i == "VF-3").collect();
            assert_eq!(out_ids, expected, "{c} {ids:?}");
            assert_eq!(d.malformed_rows, (ids.len() - expected.len()) as u64, "{c}");
        }
    }
    // Named once, each channel reads as written.
    let body = format!(r#"{{"records":[{}]}}"#, consents("VF-1", &once));
    let mut seen = Vec::new();
    page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut |a| {
        seen.push(a.consented.iter().cloned().collect::<Vec<_>>());
        decide(a)
    })
    .unwrap();
    assert_eq!(seen, [vec!["email".to_owned()]]);
}

#[test]
fn consents_that_cannot_be_read_withhold_the_record() {
    let ds = dataset();
    let with = |c: &str| {
        record("VF-1", "CGW1", "").replace(
            r#""consents":{"email":{"given_at":"2025-01-01T00:00:00Z","source":"web_form","withdrawn_at":null},"sms":null}"#,
            &format!(r#""consents":{c}"#),
        )
    };
    for bad in [
        r#"{"email":{"given_at":"2025-01-01","given_at":null}}"#,
        r#"{"email":{"given_at":null,"withdrawn_at":null,"withdrawn_at":"2026-01-01"}}"#,
        r#"{"email":{"given_at":1}}"#,
        r#"{"email":{"given_at":"2025-01-01","withdrawn_at":true}}"#,
        r#"{"email":["2025-01-01",null]}"#,
        // `given_at` text that is not a date is not consent.
        r#"{"email":{"given_at":"","withdrawn_at":null}}"#,
        r#"{"email":{"given_at":"null","withdrawn_at":null}}"#,
        r#"{"email":{"given_at":"never"}}"#,
        r#"{"email":{"given_at":"2025-13-01T00:00:00Z"}}"#,
        r#"{"email":{"given_at":"2025-01-011"}}"#,
        r#"{"email":{"given_at":"\u0032025-01-01"}}"#,
        r#"{"email":"yes"}"#,
        // A withdrawal under another spelling of its key is not skipped as another key, nor
        // a channel named again under another spelling taken as another channel.
        r#"{"email":{"given_at":"2024-01-01","Withdrawn_At":"2024-06-01"}}"#,
        r#"{"email":{"given_at":"2024-01-01","withdrawnAt":"2024-06-01"}}"#,
        r#"{"email":{"GIVEN_AT":"2024-01-01"}}"#,
        // Nor a withdrawal under a key of its own.
        r#"{"email":{"given_at":"2024-01-01","withdrawn":"2024-06-01"}}"#,
        r#"{"email":{"given_at":"2024-01-01","withdrawal_date":"2024-06-01"}}"#,
        r#"{"email":{"given_at":"2024-01-01","revoked_at":"2024-06-01"}}"#,
        // Nor under any key a consent record does not hold: a deny-list of the words that
        // mean withdrawn would miss these.
        r#"{"email":{"given_at":"2024-01-01","unsubscribed_at":"2024-06-01"}}"#,
        r#"{"email":{"given_at":"2024-01-01","opted_out":true}}"#,
        r#"{"email":{"given_at":"2024-01-01","status":"ended"}}"#,
        r#"{"email":{"given_at":"2024-01-01"},"Email":{"given_at":"2024-01-01","withdrawn_at":"2024-06-01"}}"#,
        r#"{"E-mail":{"given_at":"2024-01-01","withdrawn_at":"2024-06-01"},"sms":null,"email":{"given_at":"2024-01-01"}}"#,
        r#"{"email":{"given_at":"2024-01-01","givenAt":"2024-01-02"}}"#,
        r#"["email"]"#,
        r#""email""#,
        "true",
    ] {
        let body = format!(r#"{{"records":[{}]}}"#, with(bad));
        let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"records":[]}"#,
            "{bad}"
        );
        assert_eq!(d.malformed_rows, 1, "{bad}");
    }
    // Read again in a layout the page has seen (`channel_states_again`): the same rule.
    let good = with(r#"{"email":{"given_at":"2025-01-01T00:00:00Z","withdrawn_at":null}}"#);
    let blank = with(r#"{"email":{"given_at":"","withdrawn_at":null}}"#).replace("VF-1", "VF-2");
    let body = format!(r#"{{"records":[{good},{blank}]}}"#);
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["records"].as_array().unwrap().len(), 1);
    assert_eq!(v["records"][0]["elector_id"], "VF-1");
    assert_eq!(d.malformed_rows, 1);
    // Other keys of a consent are not read, and a consent without `given_at` is none; a date
    // alone or a timestamp as SQL writes it is a date.
    let fine = r#"{"email":{"source":{"nested":[1]},"given_at":"2025-01-01"},"sms":{"withdrawn_at":null},"post":{"given_at":"2025-01-01 10:00:00"}}"#;
    let body = format!(r#"{{"records":[{}]}}"#, with(fine));
    let mut seen = Vec::new();
    page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut |a| {
        seen.push(a.consented.iter().cloned().collect::<Vec<_>>());
        decide(a)
    })
    .unwrap();
    assert_eq!(seen, [vec!["email", "post"]]);
}

/// Consent is given from `given_at`'s date on (the UK's day, as the TPS window is judged):
/// one dated tomorrow, or stamped a minute into tomorrow in the UK (in summer, 23:30 UTC is
/// tomorrow), is not consent yet, and nothing is withheld for it; one stamped in another zone
/// counts from the UK's date at that instant. The same on a record read alone, on a page's
/// first record and on those read again in its layout (`channel_states_again`).
#[test]
fn consent_dated_after_today_is_not_yet_given() {
    let ds = dataset();
    let usual = r#"{"email":{"given_at":"2025-01-01T00:00:00Z","source":"web_form","withdrawn_at":null},"sms":null}"#;
    let winter = [
        ("2026-11-22T23:59:00Z", true),
        ("2026-11-23", true),
        ("2026-11-23T23:59:59Z", true),
        ("2026-11-24T00:30:00+01:00", true),
        ("2026-11-23T23:30:00-01:00", false),
        ("2026-11-24", false),
        ("2026-11-24T00:01:00Z", false),
        ("2027-01-01 09:00:00", false),
    ];
    let summer = [
        ("2026-06-10T22:59:00Z", true),
        ("2026-06-10T23:30:00Z", false),
        ("2026-06-11T00:30:00+02:00", true),
        ("2026-06-10T23:30:00", true),
        ("2026-06-11 00:10:00", false),
    ];
    for (today, cases) in [("2026-11-23", &winter[..]), ("2026-06-10", &summer[..])] {
        let cx = FilterContext {
            today: days_from_iso_date(today).unwrap(),
            ..cx(&ds)
        };
        let with = |id: &str, given: &str| {
            let v = usual.replace("2025-01-01T00:00:00Z", given);
            record(id, "CGW1", "").replace(usual, &v)
        };
        let records: Vec<String> = (cases.iter().enumerate())
            .map(|(n, (given, _))| with(&format!("VF-{n}"), given))
            .collect();
        let email = |a: &RecordAttrs| a.consented.contains("email");
        // A page whose first record is each case in turn: read whole, then again in its
        // layout.
        for first in 0..cases.len() {
            let order: Vec<usize> = (first..cases.len()).chain(0..first).collect();
            let body = format!(
                r#"{{"records":[{}]}}"#,
                (order.iter().map(|&n| records[n].as_str()))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            // The address leaves only where consent is live, as a policy for emailing says.
            let (out, d) = page(body.as_bytes(), Envelope::Records, &cx, &mut |a| {
                let mut categories = vec!["identifier"];
                categories.extend(email(a).then_some("contact_email"));
                verdict(true, &categories)
            })
            .unwrap();
            assert_eq!(d.malformed_rows, 0);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let left = v["records"].as_array().unwrap();
            assert_eq!(left.len(), cases.len());
            for r in left {
                let n: usize = r["elector_id"].as_str().unwrap()["VF-".len()..]
                    .parse()
                    .unwrap();
                assert_eq!(
                    r.get("email").is_some(),
                    cases[n].1,
                    "today {today}, consent given {} (page from case {first})",
                    cases[n].0
                );
            }
        }
        for (given, live) in cases {
            let text = with("VF-1", given);
            let rec = RawRecord::parse(&text).unwrap();
            let (_, a) = record_attrs(&rec, &cx).unwrap();
            assert_eq!(email(&a), *live, "today {today}, consent given {given}");
        }
    }
}

/// A page's records have their consents read as they are scanned (`attrs::take_consents`);
/// the fingerprint is then exactly the one read from the value apart (a record parsed alone
/// reads it so), whatever the value, wherever the field and however its key is written.
#[test]
fn consents_read_while_scanning_fingerprint_as_read_apart() {
    let ds = dataset();
    let cx = cx(&ds);
    let usual = r#""consents":{"email":{"given_at":"2025-01-01T00:00:00Z","source":"web_form","withdrawn_at":null},"sms":null}"#;
    let given = r#"{"given_at":"2025-01-01","withdrawn_at":null}"#;
    let values = [
        format!(r#"{{"email":{given},"sms":null}}"#),
        format!(r#"{{"email":{given},"email":null}}"#),
        format!(
            r#"{{"sms":{given},"post":{{"given_at":"2025-01-01","withdrawn_at":"2026-01-01"}}}}"#
        ),
        format!(r#" {{ "email" : {given} , "sms" : null }} "#),
        // The keys of the value before in another order, spacing or spelling: each is read
        // by its name, not as the one expected at its place (`attrs::ConsentKeys`).
        r#"{"email":{"withdrawn_at":"2026-01-01","given_at":"2025-01-01"},"sms":null}"#.to_owned(),
        r#"{"sms":null,"email":{"given_at" : "2025-01-01","withdrawn_at" :null}}"#.to_owned(),
        r#"{"sms":{"given_atx":"2025-01-01","given_at":null},"email":{"withdrawn_at":null}}"#
            .to_owned(),
        r#"{"sms":{"given_at":null,"withdrawn_at":"2025-01-01","given_at":"2025-01-01"}}"#
            .to_owned(),
        "null".to_owned(),
        "{}".to_owned(),
        // Not in the shape of consents: valid JSON all the same.
        r#"{"email":{"given_at":1}}"#.to_owned(),
        r#"{"email":{"given_at":"2025-01-01","given_at":null}}"#.to_owned(),
        r#"{"email":["2025-01-01",null]}"#.to_owned(),
        r#"["email"]"#.to_owned(),
        "true".to_owned(),
        r#""email""#.to_owned(),
    ];
    let mut records = Vec::new();
    for v in &values {
        let here = record("VF-1", "CGW1", "");
        records.push(here.replace(usual, &format!(r#""consents":{v}"#)));
        // The same value again (the key now expected where it was), then elsewhere in the
        // record, then under an escaped key, then named twice.
        records.push(here.replace(usual, &format!(r#""consents":{v}"#)));
        records.push(here.replace(&format!(",{usual}"), "").replacen(
            '{',
            &format!(r#"{{"consents":{v},"#),
            1,
        ));
        records.push(here.replace(usual, &format!(r#""cons\u0065nts":{v}"#)));
        records.push(here.replace(usual, &format!(r#""consents":{v},"consents":null"#)));
    }
    let text = format!("[{}]", records.join(","));
    let mut scan = Scan::new(&text);
    let mut rec = RawRecord::new(Some(&ds), cx.today);
    scan.begin_array().unwrap();
    let (mut first, mut n, mut taken) = (true, 0, 0);
    while scan.next_element(&mut first).unwrap() {
        rec.read(&mut scan).unwrap();
        let roles = attrs::Roles::find(&rec, &ds);
        taken += usize::from(rec.consents_taken(roles.consents).is_some());
        let mut key = Vec::new();
        attrs::fingerprint(&rec, &roles, &cx, "VF-1", &mut key);
        let alone = RawRecord::parse(&records[n]).unwrap();
        assert!(alone.consents_taken(roles.consents).is_none());
        let mut apart = Vec::new();
        attrs::fingerprint(
            &alone,
            &attrs::Roles::find(&alone, &ds),
            &cx,
            "VF-1",
            &mut apart,
        );
        assert_eq!(key, apart, "{}", records[n]);
        n += 1;
    }
    assert_eq!(n, records.len());
    // Every record had its consents read as it was scanned.
    assert_eq!(taken, records.len());
}

#[test]
fn dates_read_directly_read_as_the_date_parser_reads_them() {
    let parse = |s: &str| {
        let fmt = time::macros::format_description!("[year]-[month]-[day]");
        time::Date::parse(s, &fmt).ok().map(|d| {
            i64::from(d.to_julian_day())
                - i64::from(time::macros::date!(1970 - 01 - 01).to_julian_day())
        })
    };
    let mut cases = vec![
        "2026-11-23",
        "1970-01-01",
        "0000-01-01",
        "9999-12-31",
        "2024-02-29",
        "2023-02-29",
        "2026-00-10",
        "2026-13-01",
        "2026-04-31",
        "2026-04-00",
        "2026-1-01",
        "2026/11/23",
        "+2026-11-23",
        "2026-11-23T00:00:00Z",
        "",
        "abcd-ef-gh",
        "2026-11-2٣",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    for y in [
        0, 1, 4, 100, 399, 400, 1600, 1900, 1969, 1970, 2000, 2023, 2024, 2100, 9999,
    ] {
        for m in 0..=13 {
            for d in 0..=32 {
                cases.push(format!("{y:04}-{m:02}-{d:02}"));
            }
        }
    }
    for s in &cases {
        assert_eq!(days_from_iso_date(s), parse(s), "{s:?}");
    }
}

#[test]
fn field_names_compare_as_strings_do() {
    let names = [
        "",
        "a",
        "b",
        "ab",
        "ba",
        "elector_id",
        "elector_ie",
        "flags",
        "flagz",
        "12345678",
        "12345679",
        "123456789",
        "123456788",
        "consents_é",
        "consents_e",
        "markers",
    ];
    for a in names {
        for b in names {
            assert_eq!(same_name(a, b), a == b, "{a:?} {b:?}");
        }
    }
    // Every length up to five words, with one byte changed at every position.
    for n in 0..40 {
        let a: String = ('a'..='z').cycle().take(n).collect();
        assert!(same_name(&a, &a.clone()));
        for at in 0..n {
            let mut b = a.clone().into_bytes();
            b[at] = b'_';
            assert!(!same_name(&a, std::str::from_utf8(&b).unwrap()), "{n} {at}");
        }
    }
}

#[test]
fn export_lines_are_filtered_one_by_one_and_a_bad_one_fails_them_all() {
    let ds = dataset();
    let (a, b) = (record("VF-1", "CGW1", ""), record("VF-2", "CGW2", ""));
    let c = record("VF-3", "CGW1", "").replace("Ann", "Zoë");
    // Blank lines, a CRLF line ending and a last line without its newline.
    let text = format!("{a}\n\n  \n{b}\r\n{c}");
    let mut memo = Memo::default();
    let mut lines = |text: &str| {
        let (mut out, mut d) = (Vec::new(), Disclosure::default());
        let cx = cx(&ds);
        filter_lines(
            text.as_bytes(),
            &cx,
            &mut decide,
            &mut memo,
            &mut out,
            &mut d,
        )
        .map(|()| (String::from_utf8(out).unwrap(), d))
    };
    let (out, d) = lines(&text).unwrap();
    assert_eq!(d.subjects, ["VF-1", "VF-3"]);
    assert_eq!(d.rows_withheld, 1);
    assert_eq!(out.lines().count(), 2);
    assert!(out.ends_with('\n') && out.contains("Zoë") && !out.contains("VF-2"));
    for bad in ["[1]", "{\"a\":1} {}", "{\"a\":", "not json", "{\"a\":1},"] {
        assert!(lines(&format!("{a}\n{bad}\n{c}\n")).is_err(), "{bad}");
    }
}

/// A record's keys are taken by comparison with the record before only when they repeat it in
/// full; the memo places a record by that alone, so a near miss must not count.
#[test]
fn a_record_repeats_the_one_before_only_with_the_same_keys_in_order() {
    let text = r#"[{"a":1,"b":"x"},{"a":2,"b":"y"},{"a":3,"c":1},{"a":3,"c":1,"d":2},{"a":3,"c":1},
        {"a":1},{"\u0061":1},{"a":1,"a":2},{"a":1,"a":2},{}]"#;
    let mut scan = Scan::new(text);
    let mut rec = RawRecord::new(None, today());
    scan.begin_array().unwrap();
    let mut first = true;
    let mut got = vec![];
    while scan.next_element(&mut first).unwrap() {
        rec.read(&mut scan).unwrap();
        got.push(rec.repeats);
    }
    let want = [
        false, true, false, false, false, false, false, false, true, false,
    ];
    assert_eq!(got, want);
}

/// A record whose keys are written as the last one's is read by comparing bytes alone
/// (`RawRecord::read_again`: each key with its comma, colon and whitespace), falling back to a
/// full read at the first difference. Whatever follows a record, and whatever follows that
/// again, must read exactly as it reads alone: the same names, values and fingerprint, or an
/// error where alone it is one. Each pair is read compact and again written out with a newline
/// and a space around its keys (where it is JSON), so that the separators compared carry
/// whitespace.
#[test]
fn a_record_read_after_another_reads_as_it_does_alone() {
    let ds = dataset();
    let cx = cx(&ds);
    // Numbers and literals end where the byte after them says: a record that repeats one up to
    // its last digit or letter must not be read as repeating it.
    let base = record(
        "VF-1",
        "CGW1",
        r#","support_score":0.5,"postal_voter":true,"support_decile":5"#,
    );
    let sub = |from: &str, to: &str| {
        assert!(base.contains(from), "{from}");
        base.replacen(from, to, 1)
    };
    let variants = [
        base.clone(),
        record("VF-22", "CGW2", ""),
        record("VF-3", "CGW1", r#","ward":"E05011391""#),
        sub(r#","tps_checked_at":"2026-11-01""#, ""),
        sub(r#"{"elector_id":"VF-1","#, "{"),
        sub(r#""surname":"Lee","#, ""),
        sub(r#""surname":"Lee""#, r#""surname" :"Lee""#),
        sub(r#""surname":"Lee""#, r#""surname": "Lee""#),
        sub(r#","surname""#, r#", "surname""#),
        sub(r#","surname":"#, r#","surname":  "#),
        sub(r#","surname""#, "\n,\"surname\""),
        sub(r#","surname":"Lee""#, r#","surname":"Lee" "#),
        sub(r#""sms":null"#, r#""sms": null"#),
        sub(r#","sms""#, r#" ,"sms""#),
        sub(r#","source""#, r#", "source""#),
        sub(r#""source":"#, r#""source" : "#),
        sub(r#""surname""#, r#""surnamf""#),
        sub(r#""surname""#, r#""surnam""#),
        sub(r#""surname""#, r#""s\u0075rname""#),
        sub(r#""markers":[]"#, r#""markers":["N",["x",{"y":null}]]"#),
        sub(r#""markers":[]"#, r#""markers":{}"#),
        sub("}", " }"),
        sub(r#""given_at""#, r#""given_at" "#),
        sub(r#""source":"web_form","#, ""),
        sub(
            r#""source":"web_form""#,
            r#""source":"web_form","given_at":null"#,
        ),
        sub(r#""withdrawn_at":null"#, r#""withdrawn_at":"2026-01-01""#),
        sub(r#""withdrawn_at":null"#, r#""withdrawn_at":1"#),
        sub(
            r#""withdrawn_at":null"#,
            r#""withdrawn_at":null,"given_at":null"#,
        ),
        sub(
            r#""withdrawn_at":null"#,
            r#""withdrawn_at":null,"note":"x""#,
        ),
        sub(r#""sms":null"#, r#""sms":null,"post":null"#),
        sub(r#""sms":null"#, r#""sms":{"given_at":"2025-01-01"}"#),
        sub(r#""sms":null"#, r#""sms":true"#),
        sub(r#","sms":null"#, ""),
        // Not JSON: an error after a record as alone.
        sub(r#""surname":"Lee","#, r#""surname":"Lee",}"#),
        sub(r#""surname":"Lee","#, r#""surname":"Lee" "#),
        sub(r#""Lee""#, "Lee"),
        sub(r#""sms":null"#, r#""sms":nul"#),
        sub("0.5,", "0.55,"),
        sub("0.5,", "0.5e1,"),
        sub("0.5,", "0.5 ,"),
        sub("0.5,", "0.,"),
        sub(":5}", ":50}"),
        sub(":5}", ":5 }"),
        sub(":5}", ":5.0}"),
        sub(":5}", ":5"),
        sub(":true,", ":truex,"),
        sub(":true,", ":true1,"),
        sub(r#""markers":[]"#, r#""markers":[] "#),
        sub(r#""markers":[]"#, r#""markers":[],"#),
        sub(r#"{"email":{"given"#, r#"{"email":{"given_at":null,"given"#),
        sub(r#""VF-1""#, r#""VF-1"""#),
        sub(r#""sms":null"#, r#""sms":null,"#),
        format!("{base},"),
        base[..base.len() - 1].to_owned(),
        base[..base.len() / 2].to_owned(),
    ];
    struct Read {
        names: Vec<String>,
        values: Vec<Option<String>>,
        fingerprint: Vec<u8>,
    }
    let seen = |rec: &RawRecord| {
        let roles = attrs::Roles::find(rec, &ds);
        let mut fingerprint = Vec::new();
        attrs::fingerprint(rec, &roles, &cx, "VF-1", &mut fingerprint);
        Read {
            names: rec.names.iter().map(|n| n.to_string()).collect(),
            values: (0..rec.names.len() + 1)
                .map(|i| rec.value(Some(i)).map(str::to_owned))
                .collect(),
            fingerprint,
        }
    };
    let pretty = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let mut out = Vec::new();
        let indent = serde_json::ser::PrettyFormatter::with_indent(b" ");
        serde::Serialize::serialize(
            &v,
            &mut serde_json::Serializer::with_formatter(&mut out, indent),
        )
        .ok()?;
        String::from_utf8(out).ok()
    };
    let spaced_base = pretty(&base).unwrap();
    let spaced: Vec<(&str, String)> = (variants.iter())
        .filter_map(|v| Some((spaced_base.as_str(), pretty(v)?)))
        .collect();
    let pairs = (variants.iter().map(|v| (base.as_str(), v.clone()))).chain(spaced);
    let (mut fast, mut pairs_read) = (0, 0);
    for (before, v) in pairs {
        let v = &v;
        pairs_read += 1;
        let alone = RawRecord::parse(v).map(|r| seen(&r));
        // The variant after the base record, and then after itself, each its own text (as
        // export lines are; a page's records share one).
        let mut rec = RawRecord::new(Some(&ds), today());
        rec.read(&mut Scan::new(before)).unwrap();
        for _ in 0..2 {
            let mut scan = Scan::new(v);
            fast += usize::from(rec.read_again(&mut scan.clone()).is_some());
            let read = (rec.read(&mut scan).and_then(|()| scan.end())).map(|()| seen(&rec));
            match (&alone, &read) {
                (Ok(a), Ok(r)) => {
                    assert_eq!(a.names, r.names, "{v}");
                    assert_eq!(a.values, r.values, "{v}");
                    assert_eq!(a.fingerprint, r.fingerprint, "{v}");
                }
                (Err(_), Err(_)) => break,
                _ => panic!(
                    "{v}: alone {:?}, after another {:?}",
                    alone.is_ok(),
                    read.is_ok()
                ),
            }
        }
    }
    // The comparison alone read most of them.
    assert!(fast > pairs_read, "{fast} of {pairs_read}");
}

/// The memo places records by layout and takes repeated keys by comparing bytes: a page of
/// records in many layouts (fields moved, added, missing, a name escaped, a name twice), in
/// any order and through a kept memo, must leave exactly as each record does alone.
#[test]
fn records_of_many_layouts_filter_as_each_does_alone() {
    let ds = dataset();
    let moved = |id: &str, pd: &str| {
        let r = record(id, pd, "").replace(&format!(r#""polling_district":"{pd}","#), "");
        format!(r#"{},"polling_district":"{pd}"}}"#, &r[..r.len() - 1])
    };
    let records = [
        record("VF-1", "CGW1", ""),
        record("VF-2", "CGW1", ""),
        record("VF-3", "CGW1", r#","ward":"E05011391""#),
        record("VF-4", "CGW1", "").replace(r#""surname":"#, r#""\u0073urname":"#),
        moved("VF-5", "CGW1"),
        moved("VF-6", "CGW2"),
        moved("VF-7", "CGW1").replace(r#""markers":[]"#, r#""markers":["N"]"#),
        record("VF-8", "CGW1", r#","surname":"Twice""#),
        record("VF-9", "CGW1", r#","unlisted":1"#),
        record("VF-10", "CGW1", "").replace(r#""elector_id":"VF-10","#, ""),
    ];
    let alone: Vec<Option<String>> = (records.iter())
        .map(|r| {
            let body = format!(r#"{{"record":{r}}}"#);
            let (out, _) =
                filter_single(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
            out.map(|o| String::from_utf8(o[10..o.len() - 1].to_vec()).unwrap())
        })
        .collect();
    assert_eq!(alone.iter().flatten().count(), 6, "{alone:?}");
    let n = records.len();
    let orders: [Vec<usize>; 4] = [
        (0..n).collect(),
        (0..n).rev().collect(),
        (0..n).flat_map(|i| [i, i, (i + 3) % n]).collect(),
        (0..3 * n).map(|i| (i * 7) % n).collect(),
    ];
    let envelope = |items: Vec<&str>| format!(r#"{{"records":[{}]}}"#, items.join(","));
    let mut kept = Memo::default();
    for order in &orders {
        let body = envelope(order.iter().map(|&i| records[i].as_str()).collect());
        let want = envelope(order.iter().filter_map(|&i| alone[i].as_deref()).collect());
        for memo in [&mut Memo::default(), &mut kept] {
            let (out, d) = page_through(&body, &cx(&ds), &mut decide, memo);
            assert_eq!(String::from_utf8(out).unwrap(), want, "order {order:?}");
            assert_eq!(d.subjects.len(), want.matches("elector_id").count());
        }
    }
}

/// Consecutive fields that leave are copied as one run of the record's own bytes: whitespace,
/// escaped names and stripped neighbours that look like kept fields must not change what
/// leaves, and nothing between two runs may leak.
#[test]
fn runs_of_kept_fields_leave_whole_and_nothing_between_them() {
    let ds = dataset();
    let body = "{\"records\":[ {\n  \"elector_id\" : \"VF-1\" ,\t\"local_authority\":\"E08000035\",\
        \"polling_district\":\"CGW1\", \"first_name\"  :  \"Ann\" ,\
        \"email\":\"\\\"surname\\\":\\\"leak\\\"\",\
        \"\\u0073urname\":\"Lee\",\"markers\":[],\"flags\":[],\
        \"address_note\":{\"first_name\":\"leak\"},\"consents\":{},\"tps_checked_at\":null,\"attainer_date\":null,\
        \"first_name_note\":\"leak\" } ]}";
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains("leak"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["records"],
        serde_json::json!([{"elector_id":"VF-1","first_name":"Ann","surname":"Lee"}])
    );
    assert_eq!(d.subjects, vec!["VF-1".to_owned()]);
    // Written as the upstream wrote them: two runs, and the second keeps its spacing.
    assert!(text.contains(r#""elector_id" : "VF-1","#), "{text}");
    assert!(text.contains(r#""first_name"  :  "Ann""#), "{text}");
}

/// The body's text is checked as `std` checks it, and refused with `std`'s account of where.
#[test]
fn bodies_are_utf8_exactly_as_std_reads_it() {
    let mut cases: Vec<Vec<u8>> = [
        &b"{\"a\":\"plain\"}"[..],
        "{\"a\":\"Zoë, Łódź, 東京, 🗳\"}".as_bytes(),
        b"\xff",
        b"\xc0\xaf",             // overlong
        b"\xe0\x80\xaf",         // overlong
        b"\xed\xa0\x80",         // a surrogate
        b"\xf4\x90\x80\x80",     // above U+10FFFF
        b"\xe6\x9d\xb1\xe4\xba", // cut short
        b"",
    ]
    .iter()
    .map(|c| c.to_vec())
    .collect();
    // Each one at every offset of a long ASCII run (the vector path works in blocks).
    for c in cases.clone() {
        for at in [0, 1, 15, 31, 63, 64, 65, 100] {
            let mut long = vec![b'x'; 130];
            long.splice(at..at, c.iter().copied());
            cases.push(long);
        }
    }
    for c in &cases {
        match std::str::from_utf8(c) {
            Ok(s) => assert_eq!(utf8(c), Ok(s)),
            Err(e) => assert_eq!(utf8(c), Err(FilterError::Malformed(e.to_string()))),
        }
    }
}

/// Field names and keys are compared a word or sixteen bytes at a time: every length up to 40
/// with a difference at each position (and in the last byte of each step) is told apart.
#[test]
fn names_differing_anywhere_are_told_apart() {
    for len in 0..=40usize {
        let a: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        assert!(same_bytes(&a, &a.clone()), "{len}");
        for at in 0..len {
            for delta in [1u8, 0x80] {
                let mut b = a.clone();
                b[at] ^= delta;
                assert!(!same_bytes(&a, &b), "{len} differing at {at}");
            }
        }
        let mut longer = a.clone();
        longer.push(b'z');
        assert!(!same_bytes(&a, &longer), "{len} against one longer");
    }
}

/// The memo keeps each distinct decision once and names it by its place; past its bound it
/// starts again, and a record must then never be judged by a decision or a plan made for
/// another. A page with many more distinct decisions than the bound, through a fresh and a
/// kept memo, in several orders, must leave and report exactly what its records do alone.
#[test]
fn more_distinct_decisions_than_the_memo_keeps_filter_as_each_does_alone() {
    let ds = dataset();
    // One decision per district: its own policy id, and one of three outcomes.
    let decide = |a: &RecordAttrs| {
        let n: usize = a.area.trim_start_matches("E08000035/D").parse().unwrap();
        Arc::new(RecordDecision {
            allowed: !n.is_multiple_of(3),
            categories: match n % 2 {
                0 => vec!["identifier".to_owned()],
                _ => vec!["identifier".to_owned(), "identity".to_owned()],
            }
            .into_iter()
            .collect(),
            policy_ids: vec![format!("district-{n}")],
        })
    };
    let n = 3 * super::memo::MAX_PLANS + 7;
    let records: Vec<String> = (0..n)
        .map(|i| record(&format!("VF-{i}"), &format!("D{i}"), ""))
        .collect();
    let alone: Vec<(Option<String>, Disclosure)> = (records.iter())
        .map(|r| {
            let body = format!(r#"{{"record":{r}}}"#);
            let (out, d) = filter_single(body.as_bytes(), Envelope::Records, &cx(&ds), &mut {
                decide
            })
            .unwrap();
            (
                out.map(|o| String::from_utf8(o[10..o.len() - 1].to_vec()).unwrap()),
                d,
            )
        })
        .collect();
    assert_eq!(alone.iter().filter(|(o, _)| o.is_some()).count(), 2 * n / 3);
    let orders: [Vec<usize>; 3] = [
        (0..n).collect(),
        (0..n).rev().collect(),
        (0..2 * n).map(|i| (i * 7) % n).collect(),
    ];
    let envelope = |items: Vec<&str>| format!(r#"{{"records":[{}]}}"#, items.join(","));
    let mut kept = Memo::default();
    for order in &orders {
        let body = envelope(order.iter().map(|&i| records[i].as_str()).collect());
        let want = envelope(
            order
                .iter()
                .filter_map(|&i| alone[i].0.as_deref())
                .collect(),
        );
        let fields: BTreeSet<String> = (order.iter())
            .flat_map(|&i| alone[i].1.fields.iter().cloned())
            .collect();
        let ids: BTreeSet<String> = (order.iter())
            .flat_map(|&i| alone[i].1.policy_ids.iter().cloned())
            .collect();
        for memo in [&mut Memo::default(), &mut kept] {
            let (out, d) = page_through(&body, &cx(&ds), &mut { decide }, memo);
            assert_eq!(String::from_utf8(out).unwrap(), want, "order {order:?}");
            assert_eq!(d.fields, fields);
            assert_eq!(d.policy_ids, ids);
            assert_eq!(
                d.rows_withheld,
                order.iter().filter(|&&i| i.is_multiple_of(3)).count() as u64
            );
            // Each subject's own fields, as it left alone: through plans made and cleared
            // again, and a memo kept from the page before.
            let left: Vec<usize> = (order.iter().copied())
                .filter(|&i| alone[i].0.is_some())
                .collect();
            assert_eq!(d.subject_sets.len(), d.subjects.len());
            assert_eq!(d.subjects.len(), left.len());
            for ((k, subject), &i) in d.subjects.iter().enumerate().zip(&left) {
                assert_eq!(subject, format!("VF-{i}"));
                let set = &d.field_sets[d.subject_sets[k] as usize];
                assert_eq!(**set, alone[i].1.fields, "VF-{i}");
            }
        }
    }
}

#[test]
fn a_single_records_attributes_are_read_as_the_filter_reads_it() {
    let ds = dataset();
    let one = record("VF-1", "CGW1", "");
    let (subject, attrs) = single_attrs(
        format!(r#"{{"record":{one}}}"#).as_bytes(),
        Envelope::Records,
        &cx(&ds),
    )
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(subject, "VF-1");
    assert_eq!(attrs.area, "E08000035/CGW1");
    assert!(attrs.markers.is_empty());
    // Named twice, anonymous first: withheld by the filter, so no attributes to write by
    // (a record there, malformed); and no record at all.
    let twice = one.replace(r#""markers":[]"#, r#""markers":["N"],"markers":[]"#);
    assert_ne!(twice, one);
    let body = format!(r#"{{"record":{twice}}}"#);
    assert_eq!(
        single_attrs(body.as_bytes(), Envelope::Records, &cx(&ds)).unwrap(),
        Some(None)
    );
    let rows = Envelope::Rows {
        page: 1,
        per_page: 1,
    };
    assert_eq!(
        single_attrs(br#"{"rows":[]}"#, rows, &cx(&ds)).unwrap(),
        None
    );
    for bad in [
        r#"{"record":null}"#,
        r#"{"other":1}"#,
        r#"{"record":{},"record":{}}"#,
    ] {
        assert!(
            single_attrs(bad.as_bytes(), Envelope::Records, &cx(&ds)).is_err(),
            "{bad}"
        );
    }
}

/// A consents value that cannot be read leaves no half-noted layout behind: the fast path
/// (`channel_states_again`, taking a value written as the last one was) must not then accept
/// a value naming a channel twice by matching this value's first keys and the one before's
/// rest.
#[test]
fn a_consents_value_that_cannot_be_read_leaves_no_layout_to_take_the_next_by() {
    let given = r#"{"given_at":"2025-01-01T00:00:00Z","withdrawn_at":null}"#;
    let withdrawn = r#"{"given_at":"2025-01-01T00:00:00Z","withdrawn_at":"2026-01-01T00:00:00Z"}"#;
    let a = format!(r#"{{"email":{given},"sms":{given}}}"#);
    let b = r#"{"sms":{"given_at":1}}"#.to_owned();
    let c = format!(r#"{{"sms":{withdrawn},"sms":{given}}}"#);
    let mut keys = attrs::ConsentKeys::default();
    let mut states = Vec::new();
    let mut read = |v: &'static str| {
        let mut scan = Scan::new(v);
        attrs::take_consents(&mut scan, &mut keys, &mut states, today())
            .unwrap()
            .1
    };
    let (a, b, c): (&'static str, &'static str, &'static str) = (
        Box::leak(a.into_boxed_str()),
        Box::leak(b.into_boxed_str()),
        Box::leak(c.into_boxed_str()),
    );
    assert!(read(a));
    assert!(!read(b));
    assert!(
        !read(c),
        "a channel named twice was taken by a half-noted layout"
    );
    // And after a value read whole, the same holds.
    assert!(read(a));
    assert!(!read(c));
}

/// A flag or marker the gateway does not know cannot be one a policy meant: `RESTRICTED` is
/// not `restricted`, `n` is not `N`. Each is held back as far as it could mean: a marker not
/// of a marker's form as an anonymous elector's (never disclosed, whatever the policies say),
/// an unknown flag as a restriction (withheld but from rights handling). A flag the
/// catalogue's `[words]` adds is known.
#[test]
fn records_with_words_the_gateway_does_not_know_are_held_back() {
    let mut ds = dataset();
    let with = |id: &str, field: &str, words: &str| {
        record(id, "CGW1", "").replace(
            &format!(r#""{field}":[]"#),
            &format!(r#""{field}":{words}"#),
        )
    };
    let records = [
        with("VF-1", "flags", r#"["RESTRICTED"]"#),
        with("VF-2", "flags", r#"["objects-profiling"]"#),
        with("VF-3", "markers", r#"["n"]"#),
        with("VF-4", "markers", r#"["NNN"]"#),
        with("VF-5", "flags", r#"["moved_away"]"#),
        with("VF-6", "flags", r#"["deceased"]"#),
        with("VF-7", "markers", r#"["F","G"]"#),
        // Another spelling of `under_16` is `under_16`: not even rights handling sees it.
        with("VF-8", "flags", r#"["UNDER_16"]"#),
        with("VF-9", "flags", r#"["under-16"]"#),
        with("VF-10", "flags", r#"["Under 16","moved_away"]"#),
        // Two markers written as one, one of them anonymous.
        with("VF-11", "markers", r#"["NF"]"#),
        with("VF-12", "markers", r#"["G","FN"]"#),
        // Other words for under 16.
        with("VF-13", "flags", r#"["age_under_16"]"#),
        with("VF-14", "flags", r#"["Under Sixteen"]"#),
    ];
    let body = format!(r#"{{"records":[{}]}}"#, records.join(","));
    // As the shipped policies: a restriction withholds; rights handling allows everything.
    let mut campaign = |a: &RecordAttrs| verdict(!a.flags.contains("restricted"), &["identifier"]);
    let mut rights = |_: &RecordAttrs| verdict(true, &["identifier"]);
    let kept = |ds: &Dataset, decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>| {
        let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(ds), decide).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let ids: Vec<String> = (v["records"].as_array().unwrap().iter())
            .map(|r| r["elector_id"].as_str().unwrap().to_owned())
            .collect();
        (ids, d.never_disclosed_rows)
    };
    let ids = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(kept(&ds, &mut campaign), (ids(&["VF-6", "VF-7"]), 9));
    assert_eq!(
        kept(&ds, &mut rights),
        (ids(&["VF-1", "VF-2", "VF-5", "VF-6", "VF-7"]), 9)
    );
    for r in records[..4].iter().chain(&records[7..]) {
        let single = format!(r#"{{"record":{r}}}"#);
        let (out, _) = filter_single(
            single.as_bytes(),
            Envelope::Records,
            &cx(&ds),
            &mut campaign,
        )
        .unwrap();
        assert!(out.is_none(), "{r}");
    }
    let catalog = include_str!("../../config/catalog.toml").replace(
        "# [words]\n# flags = [\"moved_away\"]",
        "[words]\nflags = [\"moved_away\"]",
    );
    ds = Catalog::parse(&catalog).unwrap().datasets["voter"].clone();
    assert_eq!(
        kept(&ds, &mut campaign),
        (ids(&["VF-5", "VF-6", "VF-7"]), 9)
    );
}

/// A page whose records left with different fields says which left with which: the set most
/// left with, and each other set with the places of the subjects that left with it; a page
/// whose records all left alike says nothing more than its fields.
#[test]
fn which_subject_left_with_which_fields() {
    let ds = dataset();
    let mut decide = |a: &RecordAttrs| match a.area.as_str() {
        "E08000035/CGW2" => verdict(true, &["identifier"]),
        _ => verdict(true, &["identifier", "identity"]),
    };
    let body = format!(
        r#"{{"records":[{},{},{},{}]}}"#,
        record("VF-1", "CGW1", ""),
        record("VF-2", "CGW2", ""),
        record("VF-3", "CGW1", ""),
        record("VF-4", "CGW2", ""),
    );
    let (_, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    let by = d.fields_by_subject().expect("two sets");
    let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let wide = names(&["elector_id", "first_name", "surname"]);
    let narrow = names(&["elector_id"]);
    // Two and two: the first set met is the one named `most` on a tie.
    assert_eq!(by.most, wide);
    assert_eq!(by.others.len(), 1);
    assert_eq!(
        (&by.others[0].fields, &by.others[0].subjects),
        (&narrow, &vec![1, 3])
    );
    for (n, want) in [&wide, &narrow, &wide, &narrow].into_iter().enumerate() {
        assert_eq!(by.of_subject(n), &want[..], "subject {n}");
    }
    let alike = format!(
        r#"{{"records":[{},{}]}}"#,
        record("VF-1", "CGW1", ""),
        record("VF-3", "CGW1", "")
    );
    let (_, d) = page(alike.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    assert!(d.fields_by_subject().is_none());
}

/// A record leaves only where its decision shows every field the request filtered on: a
/// record whose own flags hide the filtered field (here its email, for an objection) is
/// withheld, not sent without it, since being picked would give the value away. The check
/// is per record, through a memo kept between requests that filtered differently.
#[test]
fn a_record_hiding_a_filtered_field_is_withheld() {
    let ds = dataset();
    let body = format!(
        r#"{{"records":[{},{}]}}"#,
        record("VF-1", "CGW1", ""),
        record("VF-2", "CGW1", "")
            .replace(r#""flags":[]"#, r#""flags":["objects_direct_marketing"]"#)
    );
    let mut decide = |a: &RecordAttrs| {
        let objects = a.flags.contains("objects_direct_marketing");
        verdict(
            true,
            if objects {
                &["identifier", "identity"]
            } else {
                &["identifier", "identity", "contact_email"]
            },
        )
    };
    let email = ["contact_email".to_owned()];
    let mut memo = Memo::default();
    let ids = |out: &[u8]| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(out).unwrap();
        (v["records"].as_array().unwrap().iter())
            .map(|r| r["elector_id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Unfiltered: both leave, one without its email.
    let (out, d) = page_through(&body, &cx(&ds), &mut decide, &mut memo);
    assert_eq!(ids(&out), ["VF-1", "VF-2"]);
    assert_eq!(d.rows_withheld, 0);
    // Filtered on email, through the same memo: the objector is withheld.
    let filtered = FilterContext {
        filtered_on: &email,
        ..cx(&ds)
    };
    let (out, d) = page_through(&body, &filtered, &mut decide, &mut memo);
    assert_eq!(ids(&out), ["VF-1"]);
    assert_eq!(d.rows_withheld, 1);
    assert_eq!(d.subjects, vec!["VF-1".to_owned()]);
}

/// A subject id read from one record for a rights placement's `held` is read as the filter
/// reads it: a string, or a plain integer as its digits; no float, no other value.
#[test]
fn a_single_records_id_may_be_a_plain_integer() {
    let ds = dataset();
    let id = |body: &str| single_id(body.as_bytes(), Envelope::Records, &ds);
    assert_eq!(
        id(r#"{"record":{"elector_id":"VF-1"}}"#).as_deref(),
        Some("VF-1")
    );
    assert_eq!(
        id(r#"{"record":{"elector_id":1234}}"#).as_deref(),
        Some("1234")
    );
    assert_eq!(id(r#"{"record":{"elector_id":1e2}}"#), None);
    assert_eq!(id(r#"{"record":{"elector_id":[1]}}"#), None);
    assert_eq!(id(r#"{"record":null}"#), None);
    // Named twice: `serde_json` would take the last, the filter refuses the record.
    assert_eq!(
        id(r#"{"record":{"elector_id":"VF-1","elector_id":"VF-2"}}"#),
        None
    );
    let rows = |body: &str| {
        single_id(
            body.as_bytes(),
            Envelope::Rows {
                page: 1,
                per_page: 2,
            },
            &ds,
        )
    };
    assert_eq!(rows(r#"{"rows":[{"elector_id":7}]}"#).as_deref(), Some("7"));
    assert_eq!(
        rows(r#"{"rows":[{"elector_id":7},{"elector_id":8}]}"#),
        None
    );
    // The postcode a read names stays a string's.
    let text = |body: &str| single_text(body.as_bytes(), Envelope::Records, "postcode");
    assert_eq!(text(r#"{"record":{"postcode":12345}}"#), None);
}

/// A field the gateway reads a record's protection, area or id from, also named under another
/// spelling (`Markers` beside `markers`): the policies would be asked about one while a
/// reader, or a datastore that ignores case, took the other. The record is withheld, whichever
/// of the two says what, as one naming a field twice is.
#[test]
fn a_policy_field_named_again_under_another_spelling_withholds_the_record() {
    let ds = dataset();
    let mut decide = |_: &RecordAttrs| verdict(true, &["identifier", "identity"]);
    let plain = record("VF-1", "CGW1", "");
    for (field, extra) in [
        ("markers", r#""Markers":["N"]"#),
        ("flags", r#""FLAGS":["restricted"]"#),
        ("attainer_date", r#""Attainer_Date":"2031-01-01""#),
        ("polling_district", r#""pollingDistrict":"CGW9""#),
        ("elector_id", r#""Elector_ID":"VF-9""#),
    ] {
        assert!(plain.contains(&format!(r#""{field}":"#)), "{field}");
        let respelt = plain.replacen('{', &format!("{{{extra},"), 1);
        let body = format!(
            r#"{{"records":[{respelt},{}]}}"#,
            record("VF-2", "CGW1", "")
        );
        let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let ids: Vec<&str> = (v["records"].as_array().unwrap().iter())
            .map(|r| r["elector_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["VF-2"], "{extra}");
        assert_eq!(d.malformed_rows, 1, "{extra}");
        let single = format!(r#"{{"record":{respelt}}}"#);
        let (one, _) =
            filter_single(single.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
        assert!(one.is_none(), "{extra}");
    }
    // An unclassified field of another name is stripped, and the record leaves.
    let other = plain.replacen('{', r#"{"marker_notes":"x","#, 1);
    let body = format!(r#"{{"records":[{other}]}}"#);
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    assert!(String::from_utf8(out).unwrap().contains("VF-1"));
    assert_eq!((d.malformed_rows, d.unclassified_fields), (0, 1));
}

/// A value nested where the asset register expects a scalar or a list of scalars (a joined
/// row, a label expansion) withholds its record: it would leave whole under its field's
/// category, an email inside a name; nor is anything of it reported. Not read as a nesting:
/// braces inside a string, the consents field's object, a field the asset register does not
/// classify (never written). A field the register names `structured` may nest.
#[test]
fn a_value_nested_where_a_scalar_belongs_withholds_the_record() {
    let ds = dataset();
    let mut decide = |_: &RecordAttrs| {
        verdict(
            true,
            &[
                "identifier",
                "identity",
                "turnout_history",
                "consent_record",
            ],
        )
    };
    let nested = record("VF-1", "CGW1", "").replace(
        r#""first_name":"Ann""#,
        r#""first_name":{"given":"Ann","email":"ann@x.org"}"#,
    );
    for bad in [
        nested,
        record("VF-1", "CGW1", r#","turnout":[["GE2024"]]"#),
        record(
            "VF-1",
            "CGW1",
            r#","turnout":["GE2024",{"mobile":"07700900000"}]"#,
        ),
    ] {
        let body = format!(r#"{{"records":[{bad}]}}"#);
        let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"records":[]}"#,
            "{bad}"
        );
        assert_eq!((d.rows_withheld, d.malformed_rows), (1, 1), "{bad}");
        assert!(
            d.fields.is_empty() && d.field_sets.is_empty(),
            "{bad}: {d:?}"
        );
    }
    // Read again in a layout the page has seen: the same rule, record by record.
    let fine = record("VF-1", "CGW1", r#","turnout":["GE2024","{[\"x"]"#);
    let again = record("VF-2", "CGW1", r#","turnout":[{"e":"GE2024"}]"#);
    let body = format!(r#"{{"records":[{fine},{again},{fine}]}}"#);
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut decide).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["records"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(
        v["records"][0]["turnout"],
        serde_json::json!(["GE2024", "{[\"x"])
    );
    assert!(v["records"][0]["consents"].is_object(), "{v}");
    assert_eq!(d.malformed_rows, 1);
    // Nested in a field that is not kept: the record is malformed all the same (whether a
    // record is well formed does not depend on who asks), and nothing of it is reported.
    let mut narrow = |_: &RecordAttrs| verdict(true, &["identifier"]);
    let body = format!(r#"{{"records":[{again}]}}"#);
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx(&ds), &mut narrow).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), r#"{"records":[]}"#);
    assert_eq!(d.malformed_rows, 1);
    assert!(d.fields.is_empty() && d.field_sets.is_empty(), "{d:?}");
    // Unclassified: never written, not looked at.
    let odd = record("VF-3", "CGW1", r#","scratch":{"e":1}"#);
    let odd_body = format!(r#"{{"records":[{odd}]}}"#);
    let (_, d) = page(
        odd_body.as_bytes(),
        Envelope::Records,
        &cx(&ds),
        &mut narrow,
    )
    .unwrap();
    assert_eq!((d.malformed_rows, d.unclassified_fields), (0, 1));
    // Named `structured`: may nest.
    let mut structured = ds.clone();
    structured.structured = vec!["turnout".to_owned()];
    let (out, _) = page(
        body.as_bytes(),
        Envelope::Records,
        &cx(&structured),
        &mut decide,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["records"][0]["turnout"],
        serde_json::json!([{ "e": "GE2024" }])
    );
}

/// A listing's records must each meet its postcode filter (`FilterContext::must_match`): one
/// that does not is withheld unjudged and counted as mismatched, and still as an entry never
/// disclosed where it is one (the datastore ignored `exclude=protected` as well).
#[test]
fn records_a_listing_filter_does_not_pick_are_withheld_and_counted() {
    let ds = dataset();
    let at = |postcode: &str| format!(r#","postcode":"{postcode}""#);
    let body = format!(
        r#"{{"records":[{},{},{},{}]}}"#,
        record("VF-1", "CGW1", &at("LS15 8AB")),
        record("VF-2", "CGW1", &at("LS15 9ZZ")),
        record("VF-3", "CGW1", "").replace(r#""markers":[]"#, r#""markers":["N"]"#),
        record("VF-4", "CGW1", ""),
    );
    // VF-3 (anonymous) and VF-4 have no postcode at all.
    let meets = |p: &str| p.starts_with("LS15 8");
    let cx = cx(&ds).must_match("postcode", &meets);
    let mut asked = 0;
    let (out, d) = page(body.as_bytes(), Envelope::Records, &cx, &mut |a| {
        asked += 1;
        decide(a)
    })
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("VF-1") && !out.contains("VF-2") && !out.contains("VF-4"),
        "{out}"
    );
    assert_eq!((d.rows_withheld, d.mismatched_rows), (3, 3));
    assert_eq!(d.never_disclosed_rows, 1, "VF-3 is anonymous");
    assert_eq!(asked, 1, "only the record that meets the filter is judged");
}
