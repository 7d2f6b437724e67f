//! Row and field filtering over an upstream body, without building a document tree.
//!
//! A page is read as records of `(field name, raw JSON value)` pairs borrowed from the body:
//! only the handful of policy-relevant fields (area, markers, flags, consents, TPS date,
//! subject id) are parsed (`attrs`). `decide` is asked once per distinct attribute fingerprint
//! and field plans are made once per decision (`memo`); kept fields are copied out byte for
//! byte. A field the asset register does not classify is never written out. A record whose
//! policy attributes are missing or malformed is withheld (fail closed) and counted. This
//! module is pure: bytes and a decision function in, bytes and a disclosure summary out; it
//! knows nothing of Cedar or HTTP.

mod attrs;
mod memo;

pub use attrs::{days_from_iso_date, record_attrs, today};
pub use memo::Memo;

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
}

/// What left, for the audit log and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Disclosure {
    pub subjects: Vec<String>,
    pub fields: BTreeSet<String>,
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
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawRecord<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(32));
                while let Some((k, v)) = m.next_entry::<attrs::Text<'de>, &'de RawValue>()? {
                    out.push((k.0, v));
                }
                Ok(RawRecord(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
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
struct Page<'a> {
    #[serde(borrow, default)]
    records: Option<Vec<RawRecord<'a>>>,
    #[serde(borrow, default)]
    rows: Option<Vec<RawRecord<'a>>>,
    #[serde(borrow, default)]
    page: Option<&'a RawValue>,
    #[serde(borrow, default)]
    per_page: Option<&'a RawValue>,
    #[serde(borrow, default)]
    next_page: Option<&'a RawValue>,
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
pub fn filter_page(
    body: &[u8],
    envelope: Envelope,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
) -> Result<(Vec<u8>, Disclosure), FilterError> {
    let page: Page = parse(body)?;
    let records = match envelope {
        Envelope::Records => page
            .records
            .as_ref()
            .ok_or_else(|| malformed("`records`"))?,
        Envelope::Rows { .. } => page.rows.as_ref().ok_or_else(|| malformed("`rows`"))?,
    };
    let mut out = Vec::with_capacity(body.len());
    let mut d = Disclosure::default();
    let mut memo = Memo::default();
    out.extend_from_slice(b"{\"records\":[");
    let mut first = true;
    for rec in records {
        let start = out.len();
        if !first {
            out.push(b',');
        }
        if write_record(rec, cx, decide, &mut memo, &mut out, &mut d) {
            first = false;
        } else {
            out.truncate(start);
        }
    }
    out.push(b']');
    match envelope {
        Envelope::Records => {
            for (name, v) in [
                ("page", page.page),
                ("per_page", page.per_page),
                ("next_page", page.next_page),
            ] {
                if let Some(v) = v {
                    out.extend_from_slice(format!(",\"{name}\":").as_bytes());
                    out.extend_from_slice(v.get().as_bytes());
                }
            }
        }
        Envelope::Rows { page, per_page } => {
            // A full page may have a successor; a short one is the last.
            let full = u32::try_from(records.len()).is_ok_and(|n| n >= per_page);
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

/// Filters one record; `None` when it may not leave (or, for `rows`, there is none).
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
        .and_then(|subject| Some((memo.decision(rec, cx, &subject, decide)?, subject)));
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
