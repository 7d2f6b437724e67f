//! A record's policy attributes, read from its raw fields without building a document tree.
//!
//! `record_attrs` is the one reading of what policies decide on: the area (from the dataset's
//! template), markers, flags (with the rights register's), consented channels and TPS
//! freshness. `fingerprint` writes down exactly the inputs that reading depends on, byte for
//! byte where they repeat across records (area fields, marker and flag arrays, register flags)
//! and as the canonical reading where they do not (consents carry per-record timestamps, the
//! TPS check a per-record date). Two records with the same fingerprint therefore have the same
//! attributes, so a decision made for one is the decision for the other; that is what lets the
//! memo skip the reading for every record but the first of each kind.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{FilterContext, RawRecord};
use crate::policy::RecordAttrs;

/// A JSON string borrowed from the body when it has no escapes, owned when it has.
/// (serde's own `Cow<str>` always allocates.)
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(s))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(s))
            }
        }
        d.deserialize_str(V).map(Text)
    }
}

/// The record's subject id, or `None` if it is missing or not a non-empty string or a number.
pub fn subject<'a>(rec: &RawRecord<'a>, cx: &FilterContext) -> Option<Cow<'a, str>> {
    scalar(rec.get(&cx.dataset.subject_field)?)
}

/// The attributes policies decide on, or `None` if any is missing or malformed.
pub fn record_attrs(rec: &RawRecord, cx: &FilterContext) -> Option<(String, RecordAttrs)> {
    let ds = cx.dataset;
    let subject = subject(rec, cx)?.into_owned();
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
    let mut consented: BTreeSet<String> = match &ds.consents_field {
        None => BTreeSet::new(),
        Some(f) => consented_channels(rec.get(f)?)?
            .into_iter()
            .map(Cow::into_owned)
            .collect(),
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

/// Writes onto `key` every input `record_attrs` reads for a record of `subject` (the subject
/// id itself is not an input of the attributes, only of the register lookup). Each part is
/// tagged and length-prefixed, so no two different inputs write the same bytes.
pub fn fingerprint(rec: &RawRecord, cx: &FilterContext, subject: &str, key: &mut Vec<u8>) {
    let ds = cx.dataset;
    key.clear();
    let mut rest = ds.area.as_str();
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}').map(|e| start + e) else {
            break;
        };
        put(key, rec.get(&rest[start + 1..end]).map(|v| v.get()));
        rest = &rest[end + 1..];
    }
    for field in [&ds.markers_field, &ds.flags_field].into_iter().flatten() {
        put(key, rec.get(field).map(|v| v.get()));
    }
    match (cx.register_flags)(subject) {
        None => key.push(0),
        Some(extra) => {
            key.push(1);
            count(key, extra.len());
            for f in &extra {
                put(key, Some(f));
            }
        }
    }
    if let Some(field) = &ds.consents_field {
        match rec.get(field).map(consented_channels) {
            None => key.push(0),
            Some(None) => key.push(2),
            Some(Some(channels)) => {
                key.push(1);
                count(key, channels.len());
                for c in &channels {
                    put(key, Some(c));
                }
            }
        }
    }
    if let Some(field) = &ds.tps_field {
        key.push(match rec.get(field) {
            None => 0,
            Some(v) => match tps_fresh(v, cx.today, ds.tps_max_age_days) {
                None => 2,
                Some(false) => 3,
                Some(true) => 4,
            },
        });
    }
}

fn put(key: &mut Vec<u8>, part: Option<&str>) {
    match part {
        None => key.push(0),
        Some(s) => {
            key.push(1);
            count(key, s.len());
            key.extend_from_slice(s.as_bytes());
        }
    }
}

fn count(key: &mut Vec<u8>, n: usize) {
    key.extend_from_slice(&(n as u64).to_le_bytes());
}

/// A non-empty string or a number, as text; anything else is `None`.
fn scalar(v: &RawValue) -> Option<Cow<'_, str>> {
    let raw = v.get().trim_start();
    match raw.as_bytes().first()? {
        b'"' => serde_json::from_str::<Text>(raw)
            .ok()
            .map(|t| t.0)
            .filter(|s| !s.is_empty()),
        b'-' | b'0'..=b'9' => serde_json::from_str::<serde_json::Number>(raw)
            .ok()
            .map(|n| Cow::Owned(n.to_string())),
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
struct Consent<'a> {
    #[serde(borrow)]
    given_at: Option<Text<'a>>,
    #[serde(borrow, default)]
    withdrawn_at: Option<Text<'a>>,
}

/// A consents object as `(channel, consent given and not withdrawn)` in wire order.
struct Channels<'a>(Vec<(Cow<'a, str>, bool)>);

impl<'de: 'a, 'a> Deserialize<'de> for Channels<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Channels<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("consents by channel")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                let mut out = Vec::new();
                while let Some((k, c)) = m.next_entry::<Text<'de>, Option<Consent<'de>>>()? {
                    let live = c.is_some_and(|c| c.given_at.is_some() && c.withdrawn_at.is_none());
                    out.push((k.0, live));
                }
                Ok(Channels(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Channels with consent given and not withdrawn (§5.2.1, §10.3.7), in order.
fn consented_channels(v: &RawValue) -> Option<Vec<Cow<'_, str>>> {
    // `null` means no consent recorded on any channel; a channel named twice keeps its last.
    let channels: Option<Channels> = serde_json::from_str(v.get()).ok()?;
    let mut all = channels.map_or_else(Vec::new, |c| c.0);
    all.sort_by(|a, b| a.0.cmp(&b.0)); // stable: a repeated channel's last stays last
    let mut out = Vec::with_capacity(all.len());
    let mut rest = all.into_iter().peekable();
    while let Some((channel, live)) = rest.next() {
        let repeated = rest.peek().is_some_and(|(next, _)| *next == channel);
        if live && !repeated {
            out.push(channel);
        }
    }
    Some(out)
}

fn tps_fresh(v: &RawValue, today: i64, max_age_days: u32) -> Option<bool> {
    let checked: Option<Text> = serde_json::from_str(v.get()).ok()?;
    let Some(checked) = checked else {
        return Some(false);
    };
    let days = days_from_iso_date(&checked.0)?;
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
