//! The datastore's in-memory tables and the query language over them: parameter parsing,
//! record filters (including `areas=` scope narrowing) and field projection.

use std::collections::{HashMap, HashSet};

use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;

use super::super::data::{ELECTOR_KEYS, MEMBER_KEYS};
use super::Problem;

/// One dataset: records in id order, with an id index and a polling-district index.
pub(super) struct Table {
    pub id_key: &'static str,
    pub records: Vec<Value>,
    pub by_id: HashMap<String, usize>,
    /// Every `LA/PD` seen, and which of them each record is in.
    districts: HashMap<String, usize>,
    district_of: Vec<usize>,
    /// Per district: positions of its records, ascending.
    in_district: Vec<Vec<usize>>,
}

pub(super) fn text<'a>(record: &'a Value, key: &str) -> &'a str {
    record.get(key).and_then(Value::as_str).unwrap_or_default()
}

impl Table {
    pub fn new(id_key: &'static str, mut records: Vec<Value>) -> Table {
        records.sort_by(|a, b| text(a, id_key).cmp(text(b, id_key)));
        let mut table = Table {
            id_key,
            by_id: HashMap::with_capacity(records.len()),
            districts: HashMap::new(),
            district_of: Vec::with_capacity(records.len()),
            in_district: Vec::new(),
            records: Vec::new(),
        };
        for (pos, r) in records.iter().enumerate() {
            table.by_id.insert(text(r, id_key).to_owned(), pos);
            let key = format!(
                "{}/{}",
                text(r, "local_authority"),
                text(r, "polling_district")
            );
            let next = table.districts.len();
            let d = *table.districts.entry(key).or_insert(next);
            if d == table.in_district.len() {
                table.in_district.push(Vec::new());
            }
            table.district_of.push(d);
            if let Some(list) = table.in_district.get_mut(d) {
                list.push(pos);
            }
        }
        table.records = records;
        table
    }
}

/// A record, or only the requested keys of it (plus its id), without copying it.
pub(super) struct Projected<'a> {
    pub record: &'a Value,
    pub fields: Option<&'a HashSet<String>>,
    pub id_key: &'static str,
}

impl Serialize for Projected<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self.fields, self.record.as_object()) {
            (Some(fields), Some(obj)) => {
                let mut map = s.serialize_map(None)?;
                for (k, v) in obj
                    .iter()
                    .filter(|(k, _)| *k == self.id_key || fields.contains(*k))
                {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
            _ => self.record.serialize(s),
        }
    }
}

/// Which dataset a request is about.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Electors,
    Members,
}

impl Kind {
    fn filters(self) -> &'static [&'static str] {
        match self {
            Kind::Electors => &[
                "ward",
                "constituency",
                "local_authority",
                "polling_district",
            ],
            Kind::Members => &["branch", "clp", "status"],
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::Electors => ELECTOR_KEYS,
            Kind::Members => MEMBER_KEYS,
        }
    }
}

/// A request's query parameters, checked against what the endpoint accepts.
pub(super) struct Query(HashMap<String, String>);

impl Query {
    /// Decodes a query string, refusing unknown, repeated and (but for `areas`) empty
    /// parameters. An empty `areas=` is a scope with nothing in it, so it matches nothing.
    pub fn parse(query: &str, allowed: &[&str]) -> Result<Query, Problem> {
        let mut out = HashMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode_str(&s.replace('+', " "))
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| Problem::bad("query is not valid UTF-8"))
            };
            let (k, v) = (decode(k)?, decode(v)?);
            if !allowed.contains(&k.as_str()) {
                return Err(Problem::bad(format!("unknown query parameter `{k}`")));
            }
            if v.is_empty() && k != "areas" {
                return Err(Problem::bad(format!("query parameter `{k}` is empty")));
            }
            if out.insert(k.clone(), v).is_some() {
                return Err(Problem::bad(format!("query parameter `{k}` is repeated")));
            }
        }
        Ok(Query(out))
    }

    /// `fields=`: the keys to keep (the id is always kept); `None` keeps every key.
    pub fn fields(&self, kind: Kind) -> Result<Option<HashSet<String>>, Problem> {
        let Some(list) = self.0.get("fields") else {
            return Ok(None);
        };
        let mut out = HashSet::new();
        for f in comma_list(list) {
            if !kind.keys().contains(&f) {
                return Err(Problem::bad(format!("unknown field `{f}`")));
            }
            out.insert(f.to_owned());
        }
        Ok(Some(out))
    }

    /// A positive whole-number parameter up to `max`.
    pub fn number(&self, key: &str, default: usize, max: usize) -> Result<usize, Problem> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(Problem::bad(format!(
                    "`{key}` must be a whole number from 1 to {max}"
                ))),
            },
        }
    }
}

fn comma_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// The record filters of one request, resolved against one table.
pub(super) struct Filter {
    kind: Kind,
    equal: Vec<(&'static str, String)>,
    /// Normalised (upper case, no spaces) postcode prefix.
    postcode: Option<String>,
    /// `areas=`: the table's districts it names, and (members only) party unit ids.
    areas: Option<(Vec<bool>, HashSet<String>)>,
}

impl Filter {
    pub fn new(q: &Query, kind: Kind, table: &Table) -> Result<Filter, Problem> {
        let p = &q.0;
        if p.contains_key("polling_district") && !p.contains_key("local_authority") {
            return Err(Problem::bad(
                "`polling_district` needs `local_authority`: codes are only unique within one",
            ));
        }
        let equal = kind
            .filters()
            .iter()
            .filter_map(|k| p.get(*k).map(|v| (*k, v.clone())))
            .collect();
        let postcode = p
            .get("postcode")
            .map(|v| v.chars().filter(|c| !c.is_whitespace()).collect::<String>());
        let areas = p.get("areas").map(|list| {
            let ids: HashSet<String> = comma_list(list).map(str::to_owned).collect();
            let mut named = vec![false; table.in_district.len()];
            for id in &ids {
                if let Some(&d) = table.districts.get(id)
                    && let Some(slot) = named.get_mut(d)
                {
                    *slot = true;
                }
            }
            (named, ids)
        });
        Ok(Filter {
            kind,
            equal,
            postcode: postcode.map(|p| p.to_uppercase()),
            areas,
        })
    }

    pub fn matches(&self, table: &Table, pos: usize) -> bool {
        let Some(r) = table.records.get(pos) else {
            return false;
        };
        if !self.equal.iter().all(|(k, v)| text(r, k) == v) {
            return false;
        }
        if let Some(prefix) = &self.postcode {
            let mut have = text(r, "postcode")
                .chars()
                .filter(|c| !c.is_whitespace())
                .map(|c| c.to_ascii_uppercase());
            if !prefix.chars().all(|c| have.next() == Some(c)) {
                return false;
            }
        }
        match &self.areas {
            None => true,
            Some((named, ids)) => {
                let in_district = table
                    .district_of
                    .get(pos)
                    .and_then(|d| named.get(*d))
                    .copied()
                    .unwrap_or(false);
                in_district
                    || (self.kind == Kind::Members
                        && (ids.contains(text(r, "branch")) || ids.contains(text(r, "clp"))))
            }
        }
    }

    /// Record positions worth testing, in id order: only the named districts' records when
    /// `areas=` can narrow by district alone (electors), else every record.
    pub fn candidates(&self, table: &Table) -> Box<dyn Iterator<Item = usize>> {
        match &self.areas {
            Some((named, _)) if self.kind == Kind::Electors => {
                let mut positions: Vec<usize> = named
                    .iter()
                    .zip(&table.in_district)
                    .filter(|(on, _)| **on)
                    .flat_map(|(_, list)| list.iter().copied())
                    .collect();
                positions.sort_unstable();
                Box::new(positions.into_iter())
            }
            _ => Box::new(0..table.records.len()),
        }
    }
}
