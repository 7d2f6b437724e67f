//! Row and field filtering over an upstream body, without building a document tree.
//!
//! A page is read as records of `(field name, raw JSON value)` pairs borrowed from the body:
//! only the handful of policy-relevant fields (area, markers, flags, consents, TPS date,
//! subject id) are parsed. Each record's attributes are handed to `decide`, which the gateway
//! memoises per distinct combination; kept fields are copied out byte for byte. A field the
//! asset register does not classify is never written out. A record whose policy attributes are
//! missing or malformed is withheld (fail closed) and counted. This module is pure: bytes and a
//! decision function in, bytes and a disclosure summary out; it knows nothing of Cedar or HTTP.

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
                while let Some((k, v)) = m.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    out.push((k, v));
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
    let page: Page =
        serde_json::from_slice(body).map_err(|e| FilterError::Malformed(e.to_string()))?;
    let records = match envelope {
        Envelope::Records => page
            .records
            .as_ref()
            .ok_or_else(|| malformed("`records`"))?,
        Envelope::Rows { .. } => page.rows.as_ref().ok_or_else(|| malformed("`rows`"))?,
    };
    let mut out = Vec::with_capacity(body.len());
    let mut d = Disclosure::default();
    let mut plan = FieldPlan::default();
    out.extend_from_slice(b"{\"records\":[");
    let mut first = true;
    for rec in records {
        let start = out.len();
        if !first {
            out.push(b',');
        }
        if write_record(rec, cx, decide, &mut plan, &mut out, &mut d) {
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
    let single: Single =
        serde_json::from_slice(body).map_err(|e| FilterError::Malformed(e.to_string()))?;
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
    if !write_record(
        record,
        cx,
        decide,
        &mut FieldPlan::default(),
        &mut out,
        &mut d,
    ) {
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
    plan: &mut FieldPlan,
    out: &mut Vec<u8>,
    d: &mut Disclosure,
) -> Result<(), FilterError> {
    let record: RawRecord =
        serde_json::from_slice(line).map_err(|e| FilterError::Malformed(e.to_string()))?;
    if write_record(&record, cx, decide, plan, out, d) {
        out.push(b'\n');
    }
    Ok(())
}

/// The attributes policies decide on, or `None` if any is missing or malformed.
pub fn record_attrs(rec: &RawRecord, cx: &FilterContext) -> Option<(String, RecordAttrs)> {
    let ds = cx.dataset;
    let subject = scalar(rec.get(&ds.subject_field)?)?;
    let area = area_of(rec, &ds.area)?;
    let strings = |field: &Option<String>| -> Option<BTreeSet<String>> {
        match field {
            None => Some(BTreeSet::new()),
            Some(f) => serde_json::from_str::<Vec<String>>(rec.get(f)?.get())
                .ok()
                .map(|v| v.into_iter().collect()),
        }
    };
    let markers = strings(&ds.markers_field)?;
    let mut flags = strings(&ds.flags_field)?;
    if let Some(extra) = (cx.register_flags)(&subject) {
        flags.extend(extra);
    }
    let mut consented = match &ds.consents_field {
        None => BTreeSet::new(),
        Some(f) => consented_channels(rec.get(f)?)?,
    };
    // A withdrawal in the rights register outranks a consent still on the record (§10.3.7).
    for f in &flags {
        if let Some(channel) = f.strip_prefix("consent_withdrawn_") {
            consented.remove(channel);
        }
    }
    let tps_fresh = match &ds.tps_field {
        None => false,
        Some(f) => tps_fresh(rec.get(f)?, cx.today, ds.tps_max_age_days)?,
    };
    Some((
        subject,
        RecordAttrs {
            area,
            markers,
            flags,
            consented,
            tps_fresh,
        },
    ))
}

/// Which of a record's fields leave, remembered per decision and field layout: a page or an
/// export has a handful of distinct decisions and (nearly always) one layout, so the
/// per-field register and category lookups run once per decision instead of once per record.
#[derive(Default)]
pub struct FieldPlan {
    plans: Vec<Plan>,
}

/// Past this many plans (distinct decisions) start again: bounded, and far above real pages.
const MAX_PLANS: usize = 64;

struct Plan {
    decision: Arc<RecordDecision>,
    names: Vec<String>,
    keep: Vec<bool>,
    /// Fields of this layout the asset register does not classify (never written out).
    unclassified: u64,
}

impl Plan {
    fn fits(&self, rec: &RawRecord) -> bool {
        self.names.len() == rec.0.len() && self.names.iter().zip(&rec.0).all(|(a, (b, _))| a == b)
    }
}

impl FieldPlan {
    /// The plan for this record under this decision, made (and its field names added to the
    /// disclosure) the first time the pair is seen.
    fn get(
        &mut self,
        rec: &RawRecord,
        cx: &FilterContext,
        verdict: &Arc<RecordDecision>,
        d: &mut Disclosure,
    ) -> &Plan {
        let found = self
            .plans
            .iter()
            .position(|p| Arc::ptr_eq(&p.decision, verdict) && p.fits(rec));
        let i = match found {
            Some(i) => i,
            None => {
                if self.plans.len() >= MAX_PLANS {
                    self.plans.clear();
                }
                self.plans.push(Self::make(rec, cx, verdict, d));
                self.plans.len() - 1
            }
        };
        &self.plans[i]
    }

    fn make(
        rec: &RawRecord,
        cx: &FilterContext,
        verdict: &Arc<RecordDecision>,
        d: &mut Disclosure,
    ) -> Plan {
        let mut plan = Plan {
            decision: Arc::clone(verdict),
            names: Vec::with_capacity(rec.0.len()),
            keep: Vec::with_capacity(rec.0.len()),
            unclassified: 0,
        };
        for (name, _) in &rec.0 {
            let keep = match cx.dataset.fields.get(name.as_ref()) {
                Some(category) => verdict.categories.contains(category),
                None => {
                    plan.unclassified += 1;
                    false
                }
            };
            if keep && !d.fields.contains(name.as_ref()) {
                d.fields.insert(name.to_string());
            }
            plan.names.push(name.to_string());
            plan.keep.push(keep);
        }
        plan
    }
}

fn write_record(
    rec: &RawRecord,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    plan: &mut FieldPlan,
    out: &mut Vec<u8>,
    d: &mut Disclosure,
) -> bool {
    let Some((subject, attrs)) = record_attrs(rec, cx) else {
        d.rows_withheld += 1;
        d.malformed_rows += 1;
        return false;
    };
    let verdict = decide(&attrs);
    if !verdict.allowed {
        d.rows_withheld += 1;
        return false;
    }
    let plan = plan.get(rec, cx, &verdict, d);
    d.unclassified_fields += plan.unclassified;
    out.push(b'{');
    let mut first = true;
    for ((name, value), keep) in rec.0.iter().zip(&plan.keep) {
        if !keep {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        // Keys come from the register, so they need no escaping beyond what serde does.
        if serde_json::to_writer(&mut *out, name.as_ref()).is_err() {
            return false;
        }
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    out.push(b'}');
    d.subjects.push(subject);
    true
}

fn scalar(v: &RawValue) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(v.get()).ok()? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn area_of(rec: &RawRecord, template: &str) -> Option<String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let end = start + rest[start..].find('}')?;
        out.push_str(&rest[..start]);
        out.push_str(&scalar(rec.get(&rest[start + 1..end])?)?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[derive(Deserialize)]
struct Consent {
    given_at: Option<String>,
    #[serde(default)]
    withdrawn_at: Option<String>,
}

/// Channels with consent given and not withdrawn (§5.2.1, §10.3.7).
fn consented_channels(v: &RawValue) -> Option<BTreeSet<String>> {
    // `null` means no consent recorded on any channel.
    let map: Option<std::collections::BTreeMap<String, Option<Consent>>> =
        serde_json::from_str(v.get()).ok()?;
    let map = map.unwrap_or_default();
    Some(
        map.into_iter()
            .filter(|(_, c)| {
                c.as_ref()
                    .is_some_and(|c| c.given_at.is_some() && c.withdrawn_at.is_none())
            })
            .map(|(k, _)| k)
            .collect(),
    )
}

fn tps_fresh(v: &RawValue, today: i64, max_age_days: u32) -> Option<bool> {
    let checked: Option<String> = serde_json::from_str(v.get()).ok()?;
    let Some(checked) = checked else {
        return Some(false);
    };
    let days = days_from_iso_date(&checked)?;
    Some(today - days <= i64::from(max_age_days) && days <= today)
}

/// Days since 1970-01-01 for `YYYY-MM-DD`.
pub fn days_from_iso_date(s: &str) -> Option<i64> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(s, &fmt).ok()?;
    Some(
        i64::from(date.to_julian_day())
            - i64::from(time::macros::date!(1970 - 01 - 01).to_julian_day()),
    )
}

/// Days since 1970-01-01 now.
pub fn today() -> i64 {
    let now = time::OffsetDateTime::now_utc().date();
    i64::from(now.to_julian_day()) - i64::from(time::macros::date!(1970 - 01 - 01).to_julian_day())
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
