//! One audit record and its line encoding: how a record becomes one hash-chained JSON line on
//! disk and how such a line is checked again. The writer and the verifier share this code so
//! they can never disagree about the format.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::format_description;

/// `prev` of the very first record of a log.
pub(crate) const GENESIS_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// What a line ends with: `,"hash":"` + 64 hex digits + `"}`.
const HASH_PREFIX: &[u8] = br#","hash":""#;
const HASH_SUFFIX_LEN: usize = HASH_PREFIX.len() + 64 + 2;

/// The fields each subject of a record left with, where not all the same: the set most left
/// with, and each other set with the subjects (their places in the record's `subjects`, from
/// 0) that left with it. Names sorted. A page with a few exceptions costs a few numbers, not
/// one per subject.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FieldsBySubject {
    pub most: Vec<String>,
    pub others: Vec<OtherFields>,
}

/// A set of fields some subjects of a record left with, and which (`FieldsBySubject`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OtherFields {
    pub fields: Vec<String>,
    pub subjects: Vec<u32>,
}

impl FieldsBySubject {
    /// The fields the `n`th subject left with.
    pub fn of_subject(&self, n: usize) -> &[String] {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        (self.others.iter())
            .find(|o| o.subjects.binary_search(&n).is_ok())
            .map_or(&self.most, |o| &o.fields)
    }
}

/// One audited event: a data access, an administrative action or a system event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// RFC 3339 UTC with millisecond precision, see [`AuditRecord::now_ts`]. Set by the caller
    /// so it reflects when the request was handled, not when the writer got to it.
    pub ts: String,
    /// The gateway's own id for the request, unique: sent back in `X-Request-Id` and to the
    /// datastore.
    pub request_id: String,
    /// The `X-Request-Id` the caller sent, when short and plain: to find a request from the
    /// caller's own logs. Never the record's id: a caller could repeat another's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    pub kind: RecordKind,
    /// `None` when authentication failed.
    pub caller: Option<Caller>,
    pub client_addr: Option<String>,
    pub purpose: Option<String>,
    pub lawful_basis: Option<String>,
    pub dataset: Option<String>,
    /// Route id, e.g. `voter.electors.list`.
    pub route: Option<String>,
    pub method: String,
    /// Path only, never the query string: queries can carry personal data themselves.
    pub path: String,
    pub decision: Decision,
    pub policy_ids: Vec<String>,
    /// Short machine-readable reason for a deny or an error, e.g. `token_expired`.
    pub reason: Option<String>,
    pub status: u16,
    /// Subject ids disclosed (or written).
    pub subjects: crate::filter::Subjects,
    /// Field names disclosed (or written), sorted and deduplicated by the caller.
    pub fields: Vec<String>,
    /// Where the subjects did not all leave with the same fields, which each did (`None`:
    /// every subject left with `fields`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields_by_subject: Option<FieldsBySubject>,
    pub rows_withheld: u64,
    /// When the one record a caller asked for by id was withheld, why: `protected` (anonymous
    /// elector or under-16), `restricted` (a restriction flag), `out_of_area`, `policy`,
    /// `filter_mismatch` (the postcode the read named is not the record's),
    /// `answered_under_another_id` (the datastore answered with another record), `malformed`,
    /// or `protected_in_subject_access` (a subject access report's own read of its subject,
    /// an anonymous elector or an under-16, which `protected_subject` does not count).
    /// Breach detection reads it; the caller only ever sees 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld_target: Option<String>,
    pub latency_us: u64,
    /// Admin actions: what changed and why.
    pub detail: Option<serde_json::Value>,
}

impl AuditRecord {
    /// A write's record made before it is forwarded (`gateway::log_intent`): it names the
    /// target and the fields to be written, and discloses nothing.
    pub fn is_write_intent(&self) -> bool {
        self.detail
            .as_ref()
            .is_some_and(|d| d.get("write").and_then(|w| w.as_str()) == Some("intended"))
    }

    /// How many records this one says were disclosed: its subjects where it allowed them out
    /// and is not a write's intent; none for a refusal or an error, even one that names a
    /// target (a write not sent, an answer held back).
    pub fn disclosed_count(&self) -> u64 {
        match self.decision == Decision::Allow && !self.is_write_intent() {
            true => self.subjects.len() as u64,
            false => 0,
        }
    }
}

/// The authenticated caller, as named by its token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Caller {
    pub subject: String,
    pub role: String,
    pub unit: String,
    pub token_id: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Access,
    Admin,
    System,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    Error,
}

/// The most of a request's path a record keeps. Every route's path, with the longest subject
/// id a record can hold, is far shorter; a longer one is a caller's own text, and an
/// unauthenticated caller could otherwise make every refusal a record of tens of kilobytes
/// and fill the log's disk.
pub const MAX_RECORDED_PATH: usize = 512;

/// A request's path as its record keeps it: whole up to `MAX_RECORDED_PATH` bytes, else cut
/// there and marked with its length (`…[N bytes]`).
pub fn recorded_path(path: &str) -> String {
    if path.len() <= MAX_RECORDED_PATH {
        return path.to_owned();
    }
    let mut cut = MAX_RECORDED_PATH;
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…[{} bytes]", &path[..cut], path.len())
}

/// A request's method as its record keeps it: an extension method longer than 16 bytes (any
/// length parses) is `OTHER`.
pub fn recorded_method(method: &http::Method) -> String {
    match method.as_str() {
        m if m.len() <= 16 => m.to_owned(),
        _ => "OTHER".to_owned(),
    }
}

impl AuditRecord {
    /// A record of something wardgate itself did (pruning, an alert, a containment): no caller,
    /// no request; the caller fills in `detail` and anything else it knows.
    pub fn system(route: &str, reason: &str) -> AuditRecord {
        AuditRecord {
            ts: AuditRecord::now_ts(),
            request_id: format!("{:032x}", rand::random::<u128>()),
            client_request_id: None,
            kind: RecordKind::System,
            caller: None,
            client_addr: None,
            purpose: None,
            lawful_basis: None,
            dataset: None,
            route: Some(route.to_owned()),
            method: "-".to_owned(),
            path: String::new(),
            decision: Decision::Allow,
            policy_ids: Vec::new(),
            reason: Some(reason.to_owned()),
            status: 0,
            subjects: Default::default(),
            fields: Vec::new(),
            fields_by_subject: None,
            rows_withheld: 0,
            withheld_target: None,
            latency_us: 0,
            detail: None,
        }
    }

    /// The current time as RFC 3339 UTC with millisecond precision, e.g. `2025-01-31T09:15:02.123Z`.
    pub fn now_ts() -> String {
        Self::ts_of(OffsetDateTime::now_utc())
    }

    /// `at` in the log's one timestamp format (so timestamps compare correctly as text).
    pub fn ts_of(now: OffsetDateTime) -> String {
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        // Only years outside 0..=9999 can fail to format; a clock that far off still must not
        // stop the audit trail, so fall back to the full RFC 3339 form.
        now.format(format)
            .or_else(|_| now.format(&time::format_description::well_known::Rfc3339))
            .unwrap_or_else(|_| now.unix_timestamp().to_string())
    }
}

/// A record encoded as one line, ready to append.
pub(crate) struct EncodedLine {
    /// The full line including its trailing `\n`.
    pub bytes: Vec<u8>,
    /// Hex SHA-256 of the body; the next record's `prev`.
    pub hash: String,
}

/// Encodes `record` as line number `seq` of the chain whose previous hash is `prev`.
///
/// The body is `{"seq":..,"prev":"..",<record fields>}` and the hash covers exactly those bytes,
/// so a verifier can recompute it from the line alone without re-serialising anything.
pub(crate) fn encode_line(
    seq: u64,
    prev: &str,
    record: &AuditRecord,
) -> serde_json::Result<EncodedLine> {
    // `seq` and `prev` first, then the record's fields as `serde_json` writes them (`json`).
    let mut body = Vec::with_capacity(1024 + 16 * record.subjects.len());
    body.extend_from_slice(br#"{"seq":"#);
    body.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    body.extend_from_slice(br#","prev":""#);
    body.extend_from_slice(prev.as_bytes());
    body.extend_from_slice(br#"","#);
    super::json::fields(&mut body, record)?;
    let hash = hex::encode(Sha256::digest(&body));
    body.pop(); // the closing `}`, re-added after the hash
    body.extend_from_slice(HASH_PREFIX);
    body.extend_from_slice(hash.as_bytes());
    body.extend_from_slice(b"\"}\n");
    Ok(EncodedLine { bytes: body, hash })
}

/// The chain fields of a line whose hash has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LineHead {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    /// The record's time (empty if it has none).
    pub ts: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineError {
    /// Not a line this format can produce; the string says why.
    Malformed(String),
    /// Well-formed, but the bytes are not the ones that were hashed.
    HashMismatch,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::Malformed(why) => f.write_str(why),
            LineError::HashMismatch => f.write_str("hash mismatch (record altered)"),
        }
    }
}

#[derive(Deserialize)]
struct Head {
    seq: u64,
    prev: String,
    #[serde(default)]
    ts: String,
}

/// Checks one line (without its trailing `\n`) against its own hash and returns its chain fields.
pub(crate) fn decode_line(line: &[u8]) -> Result<LineHead, LineError> {
    let Some(split) = line.len().checked_sub(HASH_SUFFIX_LEN) else {
        return Err(LineError::Malformed(
            "line too short to end with a hash".into(),
        ));
    };
    let (head, suffix) = line.split_at(split);
    let hash = suffix
        .strip_prefix(HASH_PREFIX)
        .and_then(|s| s.strip_suffix(b"\"}"))
        .filter(|h| {
            h.iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        })
        .ok_or_else(|| LineError::Malformed("line does not end with a `hash` field".into()))?;
    let mut body = Vec::with_capacity(head.len() + 1);
    body.extend_from_slice(head);
    body.push(b'}');
    if hex::encode(Sha256::digest(&body)).as_bytes() != hash {
        return Err(LineError::HashMismatch);
    }
    let parsed: Head = serde_json::from_slice(&body)
        .map_err(|e| LineError::Malformed(format!("not a record: {e}")))?;
    let is_hash = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hash(&parsed.prev) {
        return Err(LineError::Malformed(
            "`prev` is not a sha-256 hex digest".into(),
        ));
    }
    Ok(LineHead {
        seq: parsed.seq,
        prev: parsed.prev,
        hash: String::from_utf8_lossy(hash).into_owned(),
        ts: parsed.ts,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn long_paths_and_methods_are_kept_short() {
        assert_eq!(
            recorded_path("/voter/electors/VF-1"),
            "/voter/electors/VF-1"
        );
        let exact = "a".repeat(MAX_RECORDED_PATH);
        assert_eq!(recorded_path(&exact), exact);
        // Cut on a character's boundary (a two-byte `é` straddles byte 512 here).
        let long = format!("/{}", "é".repeat(400));
        let kept = recorded_path(&long);
        assert_eq!(kept, format!("/{}…[801 bytes]", "é".repeat(255)));
        assert_eq!(recorded_method(&http::Method::GET), "GET");
        let custom = http::Method::from_bytes(&[b'X'; 17]).unwrap();
        assert_eq!(recorded_method(&custom), "OTHER");
    }

    pub(crate) fn sample(n: u64) -> AuditRecord {
        AuditRecord {
            ts: AuditRecord::now_ts(),
            request_id: format!("req-{n}"),
            client_request_id: None,
            kind: RecordKind::Access,
            caller: Some(Caller {
                subject: "alice".into(),
                role: "clerk".into(),
                unit: "north".into(),
                token_id: "tok-1".into(),
            }),
            client_addr: Some("10.0.0.1:5000".into()),
            purpose: Some("canvass".into()),
            lawful_basis: None,
            dataset: Some("voter".into()),
            route: Some("voter.electors.list".into()),
            method: "GET".into(),
            path: "/voter/electors".into(),
            decision: Decision::Allow,
            policy_ids: vec!["p1".into()],
            reason: None,
            status: 200,
            subjects: vec![format!("subj-{n}")].into(),
            fields: vec!["name".into(), "ward".into()],
            fields_by_subject: None,
            rows_withheld: 0,
            withheld_target: None,
            latency_us: 1234,
            detail: None,
        }
    }

    #[test]
    fn timestamp_is_rfc3339_utc_millis() {
        let ts = AuditRecord::now_ts();
        assert_eq!(ts.len(), "2025-01-31T09:15:02.123Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
        let parsed =
            OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339).unwrap();
        assert_eq!(parsed.offset(), time::UtcOffset::UTC);
    }

    #[test]
    fn line_keeps_field_order_and_writes_every_key() {
        let line = encode_line(7, GENESIS_HASH, &sample(1)).unwrap();
        let text = std::str::from_utf8(&line.bytes).unwrap();
        assert!(text.ends_with("\"}\n"));
        let keys = "seq prev ts request_id kind caller client_addr purpose lawful_basis dataset \
            route method path decision policy_ids reason status subjects fields rows_withheld \
            latency_us detail hash";
        let mut at = 0;
        for key in keys.split_whitespace() {
            let found = text[at..].find(&format!("\"{key}\":")).unwrap();
            at += found;
        }
        assert!(text.contains(r#""lawful_basis":null"#));
        assert!(text.contains(r#""kind":"access""#));
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(value["hash"], line.hash.as_str());
        let back: AuditRecord = serde_json::from_value(value).unwrap();
        assert_eq!(back, sample(1).clone_with_ts(&back.ts));
    }

    impl AuditRecord {
        fn clone_with_ts(mut self, ts: &str) -> Self {
            ts.clone_into(&mut self.ts);
            self
        }
    }

    proptest! {
        // Free text in any field (newlines, quotes, unicode) must neither break line framing
        // nor the hash, and any single changed byte of the body must be caught.
        #[test]
        fn any_record_round_trips_and_tampering_is_caught(
            path in ".*", reason in proptest::option::of(".*"), seq in 1u64..u64::MAX,
            flip in any::<prop::sample::Index>(), mask in 1u8..=255,
        ) {
            let mut record = sample(seq);
            record.path = path;
            record.reason = reason;
            let line = encode_line(seq, GENESIS_HASH, &record).unwrap();
            let body = &line.bytes[..line.bytes.len() - 1];
            prop_assert!(!body.contains(&b'\n'));
            let head = decode_line(body).unwrap();
            prop_assert_eq!(head.seq, seq);
            prop_assert_eq!(&head.hash, &line.hash);
            // What was written reads back as it was, free text included.
            let back: AuditRecord = serde_json::from_slice(body).unwrap();
            prop_assert_eq!(back, record);
            let mut tampered = body.to_vec();
            let i = flip.index(body.len() - HASH_SUFFIX_LEN);
            tampered[i] ^= mask;
            prop_assert!(decode_line(&tampered).is_err());
        }
    }
}
