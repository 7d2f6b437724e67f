//! The scanner against `serde_json`, the reading it replaces: the same texts are accepted and
//! refused, and an accepted record reads as the same keys and raw values. Generated objects are
//! valid JSON with every kind of token and whitespace, then mutated byte by byte.

use std::fmt;

use proptest::prelude::*;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Scan, special};
use crate::filter::RawRecord;

/// An object's keys and raw values, in order.
type KeyValues = Vec<(String, String)>;

/// What `serde_json` makes of a text that should be one object: its keys and raw values.
fn reference(text: &str) -> Option<KeyValues> {
    struct Fields;
    impl<'de> Visitor<'de> for Fields {
        type Value = KeyValues;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                out.push((k, v.get().to_owned()));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = (&mut de).deserialize_map(Fields).ok()?;
    de.end().ok()?;
    Some(fields)
}

fn scanned(text: &str) -> Option<KeyValues> {
    let mut scan = Scan::new(text);
    let mut out = Vec::new();
    scan.begin_object().ok()?;
    let mut first = true;
    while let Some(k) = scan.next_key(&mut first).ok()? {
        out.push((k.into_owned(), scan.value().ok()?.to_owned()));
    }
    scan.end().ok()?;
    Some(out)
}

/// `scanned` for `second`, read right after `first` (both in one text, as a page's records
/// are) with the keys `first` wrote as the ones expected (`next_key_as`).
fn scanned_expecting(first: &str, second: &str) -> Option<KeyValues> {
    let text = format!("{first} {second}");
    let mut scan = Scan::new(&text);
    let mut written = Vec::new();
    scan.begin_object().ok()?;
    let mut more = true;
    while let Some(k) = scan.next_key_as(&mut more, None).ok()? {
        written.push(k.written);
        scan.value().ok()?;
    }
    let mut out = Vec::new();
    let mut expected = 0;
    scan.begin_object().ok()?;
    let mut more = true;
    while let Some(k) =
        (scan.next_key_as(&mut more, written.get(out.len()).copied().flatten())).ok()?
    {
        expected += usize::from(k.expected);
        out.push((k.name.into_owned(), scan.value().ok()?.to_owned()));
    }
    scan.end().ok()?;
    // The keys that were taken as expected are the ones `first` wrote there.
    assert!(expected <= written.len());
    Some(out)
}

/// `scanned_expecting` for keys taken with their separators (`Scan::gap_written`), as
/// `RawRecord::read_again` takes them: the second object read by the first one's gaps where
/// every one of them is there, and in full from its start where not.
fn scanned_gapped(first: &str, second: &str) -> Option<KeyValues> {
    let text = format!("{first} {second}");
    let mut scan = Scan::new(&text);
    let mut gaps = Vec::new();
    scan.begin_object().ok()?;
    let mut more = true;
    while let Some((_, gap)) = scan.next_key_gap(&mut more, None).ok()? {
        gaps.push(gap);
        scan.value().ok()?;
    }
    let start = scan.clone();
    let again = (|| {
        let mut out = Vec::new();
        scan.begin_object().ok()?;
        for gap in &gaps {
            let gap = (*gap)?;
            scan.gap_written(gap)?;
            out.push((gap.name().to_owned(), scan.value().ok()?.to_owned()));
        }
        scan.end_object().then_some(out)
    })();
    let out = match again {
        Some(out) => out,
        None => {
            scan = start;
            let mut out = Vec::new();
            scan.begin_object().ok()?;
            let mut more = true;
            while let Some((k, _)) = scan.next_key_gap(&mut more, None).ok()? {
                out.push((k.name.into_owned(), scan.value().ok()?.to_owned()));
            }
            out
        }
    };
    scan.end().ok()?;
    Some(out)
}

/// `scanned` for `second`, read by the filter's record reader right after `first` (both in
/// one text, as a page's records are): by its keys compared with `first`'s, with their
/// separators, where they repeat them (`RawRecord::read_again`), in full from its start where
/// not.
fn read_after(first: &str, second: &str) -> Option<KeyValues> {
    read_second(first, second, |rec| {
        (0..rec.names.len())
            .map(|i| Some((rec.names[i].to_string(), rec.value(Some(i))?.to_owned())))
            .collect()
    })
}

/// For each field of `second`, read after `first` as `read_after` reads it, whether the
/// record reader took its value as nesting (`Span::nests`, from the scanner's count).
fn nests_after(first: &str, second: &str) -> Option<Vec<bool>> {
    read_second(first, second, |rec| {
        Some(rec.spans.iter().map(|span| span.nests).collect())
    })
}

/// `second` read by the record reader right after `first`, in one text, and what `look`
/// makes of it; `None` where either is refused.
fn read_second<T>(
    first: &str,
    second: &str,
    look: impl FnOnce(&RawRecord) -> Option<T>,
) -> Option<T> {
    let text = format!("{first} {second}");
    let mut scan = Scan::new(&text);
    let mut rec = RawRecord::new(None, crate::filter::today());
    rec.read(&mut scan).ok()?;
    rec.read(&mut scan).ok()?;
    scan.end().ok()?;
    look(&rec)
}

/// For each field of the object `text`, as `serde_json` reads it, whether its value nests:
/// an object, or an array holding an object or an array. (Elements are read as raw values:
/// decoding them would refuse a lone surrogate that the object as a whole may hold.)
fn nests_reference(text: &str) -> Option<Vec<bool>> {
    let fields = reference(text)?;
    let opens = |raw: &str| raw.trim_start().starts_with(['{', '[']);
    let nests = |raw: &str| match raw.trim_start().as_bytes().first() {
        Some(b'{') => true,
        Some(b'[') => (serde_json::from_str::<Vec<&RawValue>>(raw).expect("an array"))
            .iter()
            .any(|item| opens(item.get())),
        _ => false,
    };
    Some(fields.iter().map(|(_, raw)| nests(raw)).collect())
}

fn ws() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        1 => "[ \t\n\r]{1,3}",
    ]
}

/// A JSON string with every kind of escape but a lone surrogate (which `serde_json` refuses in
/// a key: the mutations make those).
fn string() -> impl Strategy<Value = String> {
    r#""([a-zA-Z0-9 éß€_-]|\\["\\/bfnrt]|\\u00[0-9a-fA-F]{2}|\\u[0-9a-cA-C][0-9a-fA-F]{3}|\\u[dD][89abAB][0-9a-f]{2}\\u[dD][c-fC-F][0-9a-f]{2}){0,12}""#
}

fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?",
        string(),
    ]
}

fn value() -> impl Strategy<Value = String> {
    leaf().prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                let items: Vec<String> = items.into_iter().map(|(a, v, b)| a + &v + &b).collect();
                format!("[{}]", items.join(","))
            }),
            prop::collection::vec((ws(), string(), ws(), inner, ws()), 0..5).prop_map(|items| {
                let items: Vec<String> = (items.into_iter())
                    .map(|(a, k, b, v, c)| format!("{a}{k}{b}:{v}{c}"))
                    .collect();
                format!("{{{}}}", items.join(","))
            }),
        ]
    })
}

fn object() -> impl Strategy<Value = String> {
    object_keyed(string())
}

/// An object whose keys are mostly plain names, as records' are (a record with an escaped key
/// is never read by comparison).
fn record() -> impl Strategy<Value = String> {
    object_keyed(prop_oneof![4 => "\"[a-z_]{1,10}\"", 1 => string()])
}

fn object_keyed(key: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (
        ws(),
        prop::collection::vec((ws(), key, ws(), ws(), value(), ws()), 0..8),
        ws(),
    )
        .prop_map(|(lead, fields, trail)| {
            let fields: Vec<String> = (fields.into_iter())
                .map(|(a, k, b, c, v, d)| format!("{a}{k}{b}:{c}{v}{d}"))
                .collect();
            format!("{lead}{{{}}}{trail}", fields.join(","))
        })
}

/// Characters a mutation puts in: JSON's structure, escapes, number parts, whitespace JSON
/// does and does not allow, and control characters.
const PIECES: &[&str] = &[
    "\"", "\\", "{", "}", "[", "]", ",", ":", "0", "1", "-", "+", ".", "e", "E", "u", "n", "t",
    "f", " ", "\t", "\n", "\r", "\u{0b}", "\u{0c}", "\u{a0}", "\u{1}", "\u{1f}", "\u{7f}", "é",
    "null", "true", "\\u", "\\ud800",
];

#[derive(Debug, Clone)]
enum Mutation {
    Insert(prop::sample::Index, usize),
    Delete(prop::sample::Index),
    Replace(prop::sample::Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let piece = 0..PIECES.len();
    prop_oneof![
        (any::<prop::sample::Index>(), piece.clone()).prop_map(|(i, p)| Mutation::Insert(i, p)),
        any::<prop::sample::Index>().prop_map(Mutation::Delete),
        (any::<prop::sample::Index>(), piece).prop_map(|(i, p)| Mutation::Replace(i, p)),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut chars: Vec<String> = text.chars().map(String::from).collect();
    for m in mutations {
        let len = chars.len();
        match m {
            Mutation::Insert(i, p) => chars.insert(i.index(len + 1), PIECES[*p].to_owned()),
            Mutation::Delete(i) if len > 0 => {
                chars.remove(i.index(len));
            }
            Mutation::Replace(i, p) if len > 0 => chars[i.index(len)] = PIECES[*p].to_owned(),
            _ => {}
        }
    }
    chars.concat()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn valid_objects_read_as_serde_json_reads_them(text in object()) {
        let want = reference(&text);
        prop_assert!(want.is_some(), "the generator made invalid JSON: {text}");
        prop_assert_eq!(scanned(&text), want, "{}", text);
    }

    #[test]
    fn mutated_objects_are_accepted_and_refused_as_serde_json_does(
        text in object(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let text = mutate(&text, &mutations);
        prop_assert_eq!(scanned(&text), reference(&text), "{:?}", text);
    }
}

/// `second` (`first` mutated) read after `first` by `read` as `serde_json` reads it alone:
/// the same keys and raw values, accepted and refused alike.
fn reads_after_as_serde_json(
    read: fn(&str, &str) -> Option<KeyValues>,
    first: &str,
    mutations: &[Mutation],
) -> Result<(), TestCaseError> {
    prop_assume!(reference(first).is_some());
    let second = mutate(first, mutations);
    prop_assert_eq!(
        read(first, &second),
        reference(&second),
        "{:?} after {:?}",
        second,
        first
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A record after another reads its keys by comparing bytes with the ones before where it
    /// can: what it reads, accepts and refuses must not change.
    #[test]
    fn expected_keys_read_as_serde_json_reads_them(
        first in object(),
        mutations in prop::collection::vec(mutation(), 0..4),
    ) {
        reads_after_as_serde_json(scanned_expecting, &first, &mutations)?;
    }

    /// The same with each key taken with its comma, colon and whitespace (`gap_written`).
    #[test]
    fn keys_taken_with_their_separators_read_as_serde_json_reads_them(
        first in object(),
        mutations in prop::collection::vec(mutation(), 0..4),
    ) {
        reads_after_as_serde_json(scanned_gapped, &first, &mutations)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The record reader itself, a record after another: a digit more after a number, a
    /// letter after a literal, a byte changed anywhere in a separator, a key or a value, must
    /// read (or be refused) as `serde_json` reads the record alone. (Keys are mostly plain
    /// names, as records' are: a record with an escaped key is never read by comparison.)
    #[test]
    fn records_read_after_another_read_as_serde_json_reads_them(
        first in record(),
        mutations in prop::collection::vec(mutation(), 0..3),
    ) {
        reads_after_as_serde_json(read_after, &first, &mutations)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Which of a record's values nest, as the record reader notes it while it scans (the
    /// filter withholds a record nesting where the asset register wants a scalar, and no
    /// longer reads the values again to find out): as `serde_json` sees the values, for a
    /// record read by comparison with the one before and for one read in full.
    #[test]
    fn nesting_is_noted_as_serde_json_sees_it(
        first in record(),
        mutations in prop::collection::vec(mutation(), 0..3),
    ) {
        prop_assume!(reference(&first).is_some());
        let second = mutate(&first, &mutations);
        let want = nests_reference(&second);
        prop_assert_eq!(nests_after(&first, &second), want, "{:?} after {:?}", second, first);
    }
}

/// A key's gap (its comma, the key, its colon and the whitespace around them) is taken only
/// where every one of its bytes is there again: a key of the same length differing in one
/// byte, a space more or less anywhere, another separator, an escape, each is refused, and
/// the key is then read as written.
#[test]
fn gaps_are_taken_only_when_written_the_same() {
    // Each pair: the second field as written before, and now.
    let cases = [
        (r#","ward":"#, r#","ward":"#, true),
        (r#", "ward": "#, r#", "ward": "#, true),
        (" ,\n\"ward\" :\t", " ,\n\"ward\" :\t", true),
        (r#","ward":"#, r#","wars":"#, false),
        (r#","ward":"#, r#","Ward":"#, false),
        (r#","ward":"#, r#","waxd":"#, false),
        (r#","ward":"#, r#","ward2":"#, false),
        (r#","ward":"#, r#","war\u0064":"#, false),
        (r#","ward":"#, r#", "ward":"#, false),
        (r#","ward":"#, r#","ward" :"#, false),
        // More whitespace after the gap is whitespace before the value, which takes it.
        (r#","ward":"#, r#","ward": "#, true),
        (r#", "ward": "#, r#","ward":"#, false),
        (r#", "ward": "#, r#", "ward":"#, false),
        (r#", "ward": "#, r#",  "ward": "#, false),
    ];
    for (before, now, taken) in cases {
        let text = format!(r#"{{"a":1{before}1}} {{"a":2{now}2}}"#);
        let mut scan = Scan::new(&text);
        scan.begin_object().unwrap();
        let mut more = true;
        let mut gaps = vec![];
        while let Some((_, gap)) = scan.next_key_gap(&mut more, None).unwrap() {
            gaps.push(gap.unwrap());
            scan.value().unwrap();
        }
        scan.begin_object().unwrap();
        // Where the key starts (its opening quote).
        let second = text.rfind(r#"{"a""#).unwrap() + 1;
        assert_eq!(scan.gap_written(gaps[0]), Some(second), "{text}");
        assert_eq!(scan.value().unwrap(), "2");
        let at = scan.pos();
        assert_eq!(
            scan.gap_written(gaps[1]).is_some(),
            taken,
            "{now} after {before}"
        );
        if !taken {
            assert_eq!(scan.pos(), at, "refused, the scanner stays where it was");
            let mut more = false;
            let (key, _) = scan.next_key_gap(&mut more, None).unwrap().unwrap();
            assert_eq!(
                key.name,
                serde_json::from_str::<String>(now.trim_matches([',', ':', ' ', '\n', '\t']))
                    .unwrap()
            );
        }
        assert_eq!(scan.value().unwrap(), "2");
        assert!(scan.end_object());
    }
}

#[test]
fn expected_keys_are_taken_only_when_written_the_same() {
    // Each pair: the key before, the key now; the same name may be written differently.
    let cases = [
        (r#""ward""#, r#""ward""#, true),
        (r#""ward""#, r#""ward2""#, false),
        (r#""ward2""#, r#""ward""#, false),
        (r#""ward""#, r#""war\u0064""#, false),
        (r#""war\u0064""#, r#""ward""#, false),
        // The colon is part of what is compared.
        (r#""ward""#, r#""ward" "#, false),
        (r#""ward" "#, r#""ward" "#, true),
        (r#""ward" "#, r#""ward""#, false),
    ];
    for (before, now, taken) in cases {
        let text = format!("{{{before}:1}} {{{now}:2}}");
        let mut scan = Scan::new(&text);
        scan.begin_object().unwrap();
        let mut more = true;
        let written = scan.next_key_as(&mut more, None).unwrap().unwrap().written;
        scan.value().unwrap();
        assert!(scan.next_key(&mut more).unwrap().is_none());
        scan.begin_object().unwrap();
        let mut more = true;
        let key = scan.next_key_as(&mut more, written).unwrap().unwrap();
        assert_eq!(key.expected, taken, "{now} after {before}");
        assert_eq!(
            key.name,
            serde_json::from_str::<String>(now.trim()).unwrap()
        );
        assert_eq!(scan.value().unwrap(), "2");
    }
}

#[test]
fn nesting_is_limited_to_127_levels() {
    // The object itself is one level; its value adds the rest. `serde_json` skips a raw value
    // at any depth; the scanner refuses the 128th level (what `serde_json` refuses when it
    // builds values), so a body nested deeper is an error, never passed on.
    let nested = |depth: usize, open: &str, close: &str| {
        format!("{{\"a\":{}1{}}}", open.repeat(depth), close.repeat(depth))
    };
    for (open, close) in [("[", "]"), ("{\"k\":", "}")] {
        for depth in [1, 2, 100, 125, 126] {
            let text = nested(depth, open, close);
            assert!(scanned(&text).is_some(), "{open} x {depth}");
            assert_eq!(scanned(&text), reference(&text), "{open} x {depth}");
        }
        for depth in [127, 128, 200, 100_000] {
            let text = nested(depth, open, close);
            assert!(scanned(&text).is_none(), "{open} x {depth}");
        }
    }
}

#[test]
fn corner_cases_read_as_serde_json_reads_them() {
    let cases = [
        r#"{}"#,
        r#" { } "#,
        r#"{"a":1}"#,
        r#"{"a":-0}"#,
        r#"{"a":01}"#,
        r#"{"a":1.}"#,
        r#"{"a":.5}"#,
        r#"{"a":1e}"#,
        r#"{"a":1e+}"#,
        r#"{"a":1E-7}"#,
        r#"{"a":-}"#,
        r#"{"a":+1}"#,
        r#"{"a":1e999999}"#,
        r#"{"a":123456789012345678901234567890}"#,
        r#"{"a":tru}"#,
        r#"{"a":nul}"#,
        r#"{"a":nulll}"#,
        r#"{"a":"\u00e9\n\/"}"#,
        r#"{"a":"\ud800"}"#,
        r#"{"\ud800":1}"#,
        r#"{"\ud83d\ude00":1}"#,
        r#"{"a\"b":1}"#,
        r#"{"a":"\x"}"#,
        r#"{"a":"\u12"}"#,
        "{\"a\":\"\t\"}",
        "{\"a\":\"\u{7f}\"}",
        r#"{"a":1,}"#,
        r#"{,"a":1}"#,
        r#"{"a" 1}"#,
        r#"{"a":1 "b":2}"#,
        r#"{"a":[1,]}"#,
        r#"{"a":[,1]}"#,
        r#"{"a":{"b":1,}}"#,
        r#"{"a":{"b"}}"#,
        r#"{"a":{1:2}}"#,
        r#"{"a":1}x"#,
        r#"{"a":1}}"#,
        r#"{"a":1"#,
        r#"{"a":"#,
        r#"{"a""#,
        r#"{"a"#,
        r#"{"#,
        "",
        "[]",
        "null",
        r#"{"a":1,"a":2}"#,
        "{\"a\":1}\u{a0}",
        "{\"a\":\u{0c}1}",
        r#"{"a":"12345678\"9"}"#,
        r#"{"a":"12345678901234567890\\"}"#,
    ];
    for text in cases {
        assert_eq!(scanned(text), reference(text), "{text:?}");
    }
}

/// Every byte that ends a string's plain run (a quote, a backslash, a control character), and
/// bytes either side of the control range, at every position of strings up to 40 bytes long:
/// the scanner looks sixteen bytes at a time, so the ends and the edges of each step matter.
#[test]
fn every_special_byte_is_found_wherever_it_falls() {
    let specials = ["\\\"", "\\n", "\\u0041", "\u{1}", "\u{1f}", "\"", "\\"];
    let plain = [" ", "\u{7f}", "é", "€", "~"];
    for len in 0..40 {
        for at in 0..=len {
            for insert in specials.iter().chain(&plain) {
                let mut s = "a".repeat(len);
                s.insert_str(at, insert);
                let text = format!(r#"{{"k":"{s}","after":1}}"#);
                assert_eq!(scanned(&text), reference(&text), "{text:?}");
                let key = format!(r#"{{"{s}":1}}"#);
                assert_eq!(scanned(&key), reference(&key), "{key:?}");
            }
        }
        // Unterminated at each length: the end of the body comes first.
        let text = format!(r#"{{"k":"{}"#, "a".repeat(len));
        assert_eq!(scanned(&text), None, "{text:?}");
    }
}

/// `special` on a text that ends where its search does (the audit line's strings, each a text
/// of its own): every byte at every position of texts up to 40 bytes, searched from every
/// start, found where a byte-at-a-time search finds it; none, the end.
#[test]
fn special_finds_what_a_byte_at_a_time_search_finds_up_to_the_end() {
    let naive = |b: &[u8], from: usize| {
        (from..b.len())
            .find(|&i| b[i] == b'"' || b[i] == b'\\' || b[i] < 0x20)
            .unwrap_or(b.len().max(from))
    };
    for len in 0..40 {
        for at in 0..len {
            for byte in 0..=0xffu8 {
                let mut b = vec![b'a'; len];
                b[at] = byte;
                for from in 0..=len {
                    assert_eq!(special(&b, from), naive(&b, from), "{b:?} from {from}");
                }
            }
        }
    }
}
