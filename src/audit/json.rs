//! An audit record's fields written as JSON directly, byte for byte as `serde_json` writes them
//! (`to_vec` of the record; a property test holds the two together): keys as constants,
//! strings escaped after the filter's sixteen-byte search for the bytes JSON escapes, numbers
//! with `itoa`. Through serde each of a line's sixty-odd strings took about 200 instructions
//! (a key, an element of a list, a value: a call, a byte-at-a-time escape loop and three
//! writes), and the line's encoding a tenth of a 10-record request's instructions. `detail`
//! (rare, free-form) still goes through `serde_json`.

use wide::u8x16;

use super::record::{AuditRecord, Caller, Decision, RecordKind};
use crate::filter::scan::special;

/// Appends `record`'s fields, from its `"ts"` key to the closing `}`, as `serde_json::to_vec`
/// writes them after the opening `{`.
pub(crate) fn fields(out: &mut Vec<u8>, record: &AuditRecord) -> serde_json::Result<()> {
    // Every field, so that one added to the record cannot be left out here.
    let AuditRecord {
        ts,
        request_id,
        client_request_id,
        kind,
        caller,
        client_addr,
        purpose,
        lawful_basis,
        dataset,
        route,
        method,
        path,
        decision,
        policy_ids,
        reason,
        status,
        subjects,
        fields,
        fields_by_subject,
        rows_withheld,
        withheld_target,
        latency_us,
        detail,
    } = record;
    out.extend_from_slice(br#""ts":"#);
    string(out, ts);
    out.extend_from_slice(br#","request_id":"#);
    string(out, request_id);
    if let Some(id) = client_request_id {
        out.extend_from_slice(br#","client_request_id":"#);
        string(out, id);
    }
    out.extend_from_slice(br#","kind":"#);
    out.extend_from_slice(match kind {
        RecordKind::Access => br#""access""#,
        RecordKind::Admin => br#""admin""#,
        RecordKind::System => br#""system""#,
    });
    out.extend_from_slice(br#","caller":"#);
    match caller {
        None => out.extend_from_slice(b"null"),
        Some(Caller {
            subject,
            role,
            unit,
            token_id,
        }) => {
            out.extend_from_slice(br#"{"subject":"#);
            string(out, subject);
            out.extend_from_slice(br#","role":"#);
            string(out, role);
            out.extend_from_slice(br#","unit":"#);
            string(out, unit);
            out.extend_from_slice(br#","token_id":"#);
            string(out, token_id);
            out.push(b'}');
        }
    }
    out.extend_from_slice(br#","client_addr":"#);
    optional(out, client_addr.as_deref());
    out.extend_from_slice(br#","purpose":"#);
    optional(out, purpose.as_deref());
    out.extend_from_slice(br#","lawful_basis":"#);
    optional(out, lawful_basis.as_deref());
    out.extend_from_slice(br#","dataset":"#);
    optional(out, dataset.as_deref());
    out.extend_from_slice(br#","route":"#);
    optional(out, route.as_deref());
    out.extend_from_slice(br#","method":"#);
    string(out, method);
    out.extend_from_slice(br#","path":"#);
    string(out, path);
    out.extend_from_slice(br#","decision":"#);
    out.extend_from_slice(match decision {
        Decision::Allow => br#""allow""#,
        Decision::Deny => br#""deny""#,
        Decision::Error => br#""error""#,
    });
    out.extend_from_slice(br#","policy_ids":"#);
    list(out, policy_ids.iter().map(String::as_str));
    out.extend_from_slice(br#","reason":"#);
    optional(out, reason.as_deref());
    out.extend_from_slice(br#","status":"#);
    number(out, u64::from(*status));
    out.extend_from_slice(br#","subjects":"#);
    list(out, subjects.iter());
    out.extend_from_slice(br#","fields":"#);
    list(out, fields.iter().map(String::as_str));
    if let Some(by) = fields_by_subject {
        out.extend_from_slice(br#","fields_by_subject":{"most":"#);
        list(out, by.most.iter().map(String::as_str));
        out.extend_from_slice(br#","others":["#);
        for (i, other) in by.others.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(br#"{"fields":"#);
            list(out, other.fields.iter().map(String::as_str));
            out.extend_from_slice(br#","subjects":["#);
            for (j, n) in other.subjects.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                number(out, u64::from(*n));
            }
            out.extend_from_slice(b"]}");
        }
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(br#","rows_withheld":"#);
    number(out, *rows_withheld);
    if let Some(target) = withheld_target {
        out.extend_from_slice(br#","withheld_target":"#);
        string(out, target);
    }
    out.extend_from_slice(br#","latency_us":"#);
    number(out, *latency_us);
    out.extend_from_slice(br#","detail":"#);
    match detail {
        None => out.extend_from_slice(b"null"),
        Some(value) => serde_json::to_writer(&mut *out, value)?,
    }
    out.push(b'}');
    Ok(())
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn optional(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(b"null"),
        Some(s) => string(out, s),
    }
}

fn list<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a str>) {
    out.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, item);
    }
    out.push(b']');
}

/// `s` as a JSON string, escaped as `serde_json` escapes it: `"` and `\` with a backslash,
/// the control characters with their short escapes where JSON has one and as `\u00XX` (lower
/// case) where not; everything else, `DEL` and all of Unicode included, as it is.
fn string(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.push(b'"');
    if short_and_plain(b) {
        // Nearly every string of a line: an id, a name, a code.
        out.extend_from_slice(b);
        out.push(b'"');
        return;
    }
    let mut from = 0;
    loop {
        let at = special(b, from);
        out.extend_from_slice(b.get(from..at).unwrap_or_default());
        let Some(&c) = b.get(at) else {
            break;
        };
        match c {
            b'"' => out.extend_from_slice(br#"\""#),
            b'\\' => out.extend_from_slice(br"\\"),
            b'\n' => out.extend_from_slice(br"\n"),
            b'\r' => out.extend_from_slice(br"\r"),
            b'\t' => out.extend_from_slice(br"\t"),
            0x08 => out.extend_from_slice(br"\b"),
            0x0c => out.extend_from_slice(br"\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(br"\u00");
                out.push(HEX[usize::from(c >> 4)]);
                out.push(HEX[usize::from(c & 0xf)]);
            }
        }
        from = at + 1;
    }
    out.push(b'"');
}

/// Whether `b` is at most sixteen bytes long and has no byte JSON escapes, in one vector step on
/// a copy padded with spaces (`special` goes a byte at a time where fewer than sixteen are
/// left, about eight instructions a byte, and is inlined in the filter, where a padded step
/// cost more than it saved).
fn short_and_plain(b: &[u8]) -> bool {
    let mut bytes = [b' '; 16];
    let Some(head) = bytes.get_mut(..b.len()) else {
        return false;
    };
    head.copy_from_slice(b);
    let v = u8x16::new(bytes);
    let hits = v.cmp_eq(u8x16::splat(b'"'))
        | v.cmp_eq(u8x16::splat(b'\\'))
        | v.min(u8x16::splat(0x1f)).cmp_eq(v);
    hits.move_mask() == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde_fields(record: &AuditRecord) -> Vec<u8> {
        let whole = serde_json::to_vec(record).unwrap();
        whole[1..].to_vec()
    }

    fn written(record: &AuditRecord) -> Vec<u8> {
        let mut out = Vec::new();
        fields(&mut out, record).unwrap();
        out
    }

    /// Every byte that JSON escapes, and the ones around them it does not.
    #[test]
    fn every_byte_is_escaped_as_serde_json_escapes_it() {
        let mut record = crate::audit::record::tests::sample(1);
        for c in (0u8..=0x7f)
            .map(char::from)
            .chain(['é', '€', '😀', '\u{2028}'])
        {
            // Alone, and at every place in a string longer than one vector step.
            record.path = c.to_string();
            assert_eq!(written(&record), serde_fields(&record), "{c:?}");
            for at in 0..20 {
                let mut s = "abcdefghijklmnopqrst".to_owned();
                s.insert(at, c);
                record.path = s;
                assert_eq!(written(&record), serde_fields(&record), "{c:?} at {at}");
            }
        }
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z\"\\\\\u{0}-\u{1f}\u{7f}é€]{0,40}",
            Just(String::new()),
        ]
    }

    fn maybe() -> impl Strategy<Value = Option<String>> {
        prop::option::of(text())
    }

    fn caller() -> impl Strategy<Value = Option<Caller>> {
        prop::option::of((text(), text(), text(), text()).prop_map(
            |(subject, role, unit, token_id)| Caller {
                subject,
                role,
                unit,
                token_id,
            },
        ))
    }

    fn detail() -> impl Strategy<Value = Option<serde_json::Value>> {
        prop_oneof![
            Just(None),
            Just(Some(
                serde_json::json!({"flag": "objects_profiling", "n": [1, 2.5, null]})
            )),
            text().prop_map(|s| Some(serde_json::json!({ s.clone(): s }))),
        ]
    }

    proptest! {
        /// Whatever a record holds, its fields are written as `serde_json` writes them.
        #[test]
        fn a_record_is_written_as_serde_json_writes_it(
            (ts, request_id, client_request_id, method, path)
                in (text(), text(), maybe(), text(), text()),
            (client_addr, purpose, lawful_basis, dataset, route, reason, withheld_target)
                in (maybe(), maybe(), maybe(), maybe(), maybe(), maybe(), maybe()),
            (kind, decision) in (0..3u8, 0..3u8),
            caller in caller(),
            (policy_ids, subjects, fields) in (
                prop::collection::vec(text(), 0..5),
                prop::collection::vec(text(), 0..12),
                prop::collection::vec(text(), 0..5),
            ),
            (status, rows_withheld, latency_us) in (any::<u16>(), any::<u64>(), any::<u64>()),
            detail in detail(),
            by in proptest::option::of((
                prop::collection::vec(text(), 0..4),
                prop::collection::vec(
                    (prop::collection::vec(text(), 0..4), prop::collection::vec(any::<u32>(), 0..5)),
                    0..3,
                ),
            )),
        ) {
            let record = AuditRecord {
                ts,
                request_id,
                client_request_id,
                kind: [RecordKind::Access, RecordKind::Admin, RecordKind::System][usize::from(kind)],
                caller,
                client_addr,
                purpose,
                lawful_basis,
                dataset,
                route,
                method,
                path,
                decision: [Decision::Allow, Decision::Deny, Decision::Error][usize::from(decision)],
                policy_ids,
                reason,
                status,
                subjects: subjects.into(),
                fields,
                fields_by_subject: by.map(|(most, others)| crate::audit::FieldsBySubject {
                    most,
                    others: (others.into_iter())
                        .map(|(fields, subjects)| crate::audit::OtherFields { fields, subjects })
                        .collect(),
                }),
                rows_withheld,
                withheld_target,
                latency_us,
                detail,
            };
            prop_assert_eq!(written(&record), serde_fields(&record));
        }
    }
}
