//! Row and field filtering over an upstream body, without building a document tree.
//!
//! A page is filtered as it is parsed, record by record, each read as `(field name, raw JSON
//! value)` pairs borrowed from the body: only the handful of policy-relevant fields (area,
//! markers, flags, consents, TPS date, subject id) are parsed (`attrs`). `decide` is asked once
//! per distinct attribute fingerprint and field plans are made once per decision (`memo`, which
//! a caller's pages share); kept fields are copied out byte for byte. Nothing is written out
//! unless the whole body parses. A field the asset register does not classify is never written out. A record whose
//! policy attributes are missing or malformed is withheld (fail closed) and counted. This
//! module is pure: bytes and a decision function in, bytes and a disclosure summary out; it
//! knows nothing of Cedar or HTTP.

mod attrs;
mod memo;

pub use attrs::{days_from_iso_date, record_attrs, today};
pub use memo::{MAX_KEPT_DECISIONS, Memo};

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::catalog::Dataset;
use crate::policy::RecordAttrs;

/// What policy decided for one distinct combination of record attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordDecision {
    pub allowed: bool,
    /// Field categories this record may disclose.
    pub categories: HashSet<String>,
    /// The policies that decided (for the audit record), sorted.
    pub policy_ids: Vec<String>,
}

/// What left, for the audit log and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Disclosure {
    pub subjects: Vec<String>,
    pub fields: BTreeSet<String>,
    /// The policies behind the decisions applied, whether the record left or not.
    pub policy_ids: BTreeSet<String>,
    pub rows_withheld: u64,
    pub malformed_rows: u64,
    pub unclassified_fields: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("upstream body is not the expected JSON: {0}")]
    Malformed(String),
}

/// Per-request inputs that are not in the record itself.
pub struct FilterContext<'a> {
    pub dataset: &'a Dataset,
    /// Days since 1970-01-01 today, for the TPS freshness check.
    pub today: i64,
    /// Extra flags per subject id, from the rights register.
    pub register_flags: &'a (dyn Fn(&str) -> Option<Vec<String>> + Sync),
}

/// One record as `(name, raw value)` pairs in wire order, borrowed from the body.
pub struct RawRecord<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawRecord<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut fields = Vec::with_capacity(32);
        serde::de::DeserializeSeed::deserialize(FieldsSeed(&mut fields), d)?;
        Ok(RawRecord(fields))
    }
}

impl<'a> RawRecord<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

/// How an upstream wraps the records it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// wardgate's own datastore API: `{"records": [...], "page", "per_page", "next_page"}` and
    /// `{"record": {...}}`.
    Records,
    /// Datasette: `{"rows": [...], ...}` for pages and single rows. Paging is by limit and
    /// offset, so the page numbers come from the request.
    Rows { page: u32, per_page: u32 },
}

#[derive(Deserialize)]
struct Single<'a> {
    #[serde(borrow, default)]
    record: Option<RawRecord<'a>>,
    #[serde(borrow, default)]
    rows: Option<Vec<RawRecord<'a>>>,
}

/// Parses JSON after checking the bytes are UTF-8 once, up front (parsing from bytes would
/// check every raw value again as it is borrowed).
fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, FilterError> {
    let text = std::str::from_utf8(bytes).map_err(|e| FilterError::Malformed(e.to_string()))?;
    serde_json::from_str(text).map_err(|e| FilterError::Malformed(e.to_string()))
}

fn malformed(what: &str) -> FilterError {
    FilterError::Malformed(format!("no {what} in the body"))
}

/// Filters a page; the answer is always `{"records": [...], "page", "per_page", "next_page"}`.
/// `memo` may come from earlier pages for the same caller, purpose and dataset (see `Memo`).
/// Records are filtered as the page is parsed, through one reused field list.
pub fn filter_page(
    body: &[u8],
    envelope: Envelope,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    memo: &mut Memo,
) -> Result<(Vec<u8>, Disclosure), FilterError> {
    let text = std::str::from_utf8(body).map_err(|e| FilterError::Malformed(e.to_string()))?;
    let mut run = PageRun {
        envelope,
        cx,
        decide,
        memo,
        out: Vec::with_capacity(body.len()),
        d: Disclosure::default(),
        records: None,
        paging: [None; 3],
    };
    run.memo.new_chunk();
    run.out.extend_from_slice(b"{\"records\":[");
    let mut de = serde_json::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(&mut run, &mut de)
        .and_then(|()| de.end())
        .map_err(|e| FilterError::Malformed(e.to_string()))?;
    let (records, paging) = (run.records, run.paging);
    let (mut out, d) = (run.out, run.d);
    let records = records.ok_or_else(|| {
        malformed(match envelope {
            Envelope::Records => "`records`",
            Envelope::Rows { .. } => "`rows`",
        })
    })?;
    out.push(b']');
    match envelope {
        Envelope::Records => {
            for (name, v) in ["page", "per_page", "next_page"].iter().zip(paging) {
                if let Some(v) = v {
                    out.extend_from_slice(format!(",\"{name}\":").as_bytes());
                    out.extend_from_slice(v.get().as_bytes());
                }
            }
        }
        Envelope::Rows { page, per_page } => {
            // A full page may have a successor; a short one is the last.
            let full = u32::try_from(records).is_ok_and(|n| n >= per_page);
            let next = if full {
                (page + 1).to_string()
            } else {
                "null".to_owned()
            };
            out.extend_from_slice(
                format!(",\"page\":{page},\"per_page\":{per_page},\"next_page\":{next}").as_bytes(),
            );
        }
    }
    out.push(b'}');
    Ok((out, d))
}

/// One page being filtered as it is parsed: the envelope object's visitor.
struct PageRun<'r, 'a> {
    envelope: Envelope,
    cx: &'r FilterContext<'a>,
    decide: &'r mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    memo: &'r mut Memo,
    out: Vec<u8>,
    d: Disclosure,
    /// How many records the page held, once its record array has been read.
    records: Option<usize>,
    /// `page`, `per_page` and `next_page` as sent (wardgate's own envelope).
    paging: [Option<&'r RawValue>; 3],
}

impl<'de: 'r, 'r> serde::de::DeserializeSeed<'de> for &mut PageRun<'r, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'r, 'r> Visitor<'de> for &mut PageRun<'r, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a page of records")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<(), M::Error> {
        use serde::de::Error;
        let records_key = match self.envelope {
            Envelope::Records => "records",
            Envelope::Rows { .. } => "rows",
        };
        let paging = match self.envelope {
            Envelope::Records => &["page", "per_page", "next_page"][..],
            Envelope::Rows { .. } => &[],
        };
        while let Some(key) = m.next_key::<attrs::Text<'de>>()? {
            let key = key.0.as_ref();
            if key == records_key {
                if self.records.is_some() {
                    return Err(M::Error::duplicate_field("records"));
                }
                let mut fields = Vec::with_capacity(32);
                let n = m.next_value_seed(RecordsSeed {
                    run: &mut *self,
                    fields: &mut fields,
                })?;
                self.records = Some(n);
            } else if let Some(i) = paging.iter().position(|p| *p == key) {
                if self.paging[i].is_some() {
                    return Err(M::Error::duplicate_field("page"));
                }
                self.paging[i] = Some(m.next_value::<&'de RawValue>()?);
            } else {
                m.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// The record array: each record is read into `fields` (reused) and filtered onto the output.
struct RecordsSeed<'s, 'r, 'a, 'de> {
    run: &'s mut PageRun<'r, 'a>,
    fields: &'s mut Vec<(Cow<'de, str>, &'de RawValue)>,
}

impl<'de> serde::de::DeserializeSeed<'de> for RecordsSeed<'_, '_, '_, 'de> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed<'_, '_, '_, 'de> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of records")
    }
    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<usize, S::Error> {
        let run = self.run;
        let mut rec = RawRecord(std::mem::take(self.fields));
        let mut n = 0;
        let mut first = true;
        while seq.next_element_seed(FieldsSeed(&mut rec.0))?.is_some() {
            n += 1;
            let start = run.out.len();
            if !first {
                run.out.push(b',');
            }
            if write_record(&rec, run.cx, run.decide, run.memo, &mut run.out, &mut run.d) {
                first = false;
            } else {
                run.out.truncate(start);
            }
        }
        *self.fields = rec.0;
        Ok(n)
    }
}

/// One record's `(name, raw value)` pairs, into a reused list.
struct FieldsSeed<'f, 'de>(&'f mut Vec<(Cow<'de, str>, &'de RawValue)>);

impl<'de> serde::de::DeserializeSeed<'de> for FieldsSeed<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<(), M::Error> {
        self.0.clear();
        while let Some((k, v)) = m.next_entry::<attrs::Text<'de>, &'de RawValue>()? {
            self.0.push((k.0, v));
        }
        Ok(())
    }
}

/// Filters one record; `None` when it may not leave (or, for `rows`, there is none). `decide`
/// is always asked about the record (a fresh memo), so a caller can see why it was refused.
pub fn filter_single(
    body: &[u8],
    envelope: Envelope,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
) -> Result<(Option<Vec<u8>>, Disclosure), FilterError> {
    let single: Single = parse(body)?;
    let mut d = Disclosure::default();
    let record = match (envelope, &single.record, &single.rows) {
        (Envelope::Records, Some(r), _) => r,
        (Envelope::Records, None, _) => return Err(malformed("`record`")),
        (Envelope::Rows { .. }, _, Some(rows)) => match rows.as_slice() {
            [] => return Ok((None, d)),
            [r] => r,
            _ => return Err(FilterError::Malformed("several rows for one id".to_owned())),
        },
        (Envelope::Rows { .. }, _, None) => return Err(malformed("`rows`")),
    };
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(b"{\"record\":");
    if !write_record(record, cx, decide, &mut Memo::default(), &mut out, &mut d) {
        return Ok((None, d));
    }
    out.push(b'}');
    Ok((Some(out), d))
}

/// Filters one NDJSON line (one record) of an export onto `out`, followed by a newline when
/// it may leave. A line that is not a JSON object fails the whole export (fail closed).
pub fn filter_line(
    line: &[u8],
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    memo: &mut Memo,
    out: &mut Vec<u8>,
    d: &mut Disclosure,
) -> Result<(), FilterError> {
    let record: RawRecord = parse(line)?;
    if write_record(&record, cx, decide, memo, out, d) {
        out.push(b'\n');
    }
    Ok(())
}

fn write_record(
    rec: &RawRecord,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    memo: &mut Memo,
    out: &mut Vec<u8>,
    d: &mut Disclosure,
) -> bool {
    let decided = attrs::subject(rec, cx)
        .and_then(|subject| Some((memo.decision(rec, cx, &subject, decide, d)?, subject)));
    let Some((verdict, subject)) = decided else {
        d.rows_withheld += 1;
        d.malformed_rows += 1;
        return false;
    };
    if !verdict.allowed {
        d.rows_withheld += 1;
        return false;
    }
    let plan = memo.plan(rec, cx, &verdict, d);
    d.unclassified_fields += plan.unclassified;
    out.push(b'{');
    let mut first = true;
    for ((_, value), key) in rec.0.iter().zip(&plan.keys) {
        let Some(key) = key else {
            continue;
        };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(key);
        out.extend_from_slice(value.get().as_bytes());
    }
    out.push(b'}');
    d.subjects.push(subject.into_owned());
    true
}

#[cfg(test)]
mod tests;
