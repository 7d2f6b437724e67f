//! The datastore's in-memory tables and the query language over them: parameter parsing,
//! record filters (including `areas=` scope narrowing) and field projection.

use std::collections::{HashMap, HashSet};

use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use super::super::data::{ELECTOR_KEYS, MEMBER_KEYS};
use super::Problem;

/// Area and status values a request can filter on, held interned per row.
const UNITS: [&str; 7] = [
    "local_authority",
    "polling_district",
    "ward",
    "constituency",
    "branch",
    "clp",
    "status",
];
const LA: usize = 0;
const PD: usize = 1;
const BRANCH: usize = 4;

/// One record: its JSON text, kept serialised (a few times smaller than a `Value`, and a page
/// of whole records is then a copy), plus the values filters look at.
pub(super) struct Row {
    pub json: Box<str>,
    units: [u32; UNITS.len()],
    /// Postcode upper-cased without spaces, for prefix matching.
    postcode: Box<str>,
    district: u32,
    /// An entry never disclosed (marker `N`, flag `under_16`), left out where a request says
    /// `exclude=protected`.
    pub protected: bool,
}

/// One dataset: rows in id order, with an id index and a polling-district index.
pub(super) struct Table {
    pub id_key: &'static str,
    pub rows: Vec<Row>,
    pub by_id: HashMap<Box<str>, usize>,
    /// Interned filter values.
    names: HashMap<Box<str>, u32>,
    /// `(local authority, polling district)` -> district number, and each district's rows.
    districts: HashMap<(u32, u32), usize>,
    in_district: Vec<Vec<usize>>,
}

fn text<'a>(record: &'a Value, key: &str) -> &'a str {
    record.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Whether a record is an entry the gateway never discloses, read as the gateway reads it: an
/// anonymous elector (marker `N`, or any marker not of a marker's form, `n` say), or an
/// under-16 (flag `under_16` however spelt, `UNDER_16` or `under-16`, or an attainer date more
/// than two years away: `filter::under_16_on`).
pub(super) fn protected(record: &Value) -> bool {
    let any = |list: &str, test: &dyn Fn(&str) -> bool| {
        record
            .get(list)
            .and_then(Value::as_array)
            .is_some_and(|l| l.iter().any(|x| x.as_str().is_some_and(test)))
    };
    let anonymous = any("markers", &crate::policy::may_be_anonymous);
    let under_16 = any("flags", &crate::filter::may_be_under_16);
    // A date that cannot be read is left out too: the gateway withholds it.
    let young = match record.get("attainer_date") {
        None | Some(Value::Null) => false,
        Some(Value::String(d)) => {
            crate::filter::under_16_on(d, crate::filter::today()) != Some(false)
        }
        Some(_) => true,
    };
    anonymous || under_16 || young
}

fn normalise_postcode(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_uppercase()
}

impl Table {
    /// Builds a table one record at a time, so a streamed dataset is never held as `Value`s.
    pub fn new(id_key: &'static str, records: impl IntoIterator<Item = Value>) -> Table {
        let mut names: HashMap<Box<str>, u32> = HashMap::new();
        let mut keyed: Vec<(Box<str>, Row)> = Vec::new();
        for record in records {
            let Ok(json) = serde_json::to_string(&record) else {
                continue;
            };
            let units = UNITS.map(|key| {
                let next = u32::try_from(names.len()).unwrap_or(u32::MAX);
                *names.entry(text(&record, key).into()).or_insert(next)
            });
            let row = Row {
                json: json.into(),
                units,
                postcode: normalise_postcode(text(&record, "postcode")).into(),
                district: 0,
                protected: protected(&record),
            };
            keyed.push((text(&record, id_key).into(), row));
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let mut table = Table {
            id_key,
            rows: Vec::with_capacity(keyed.len()),
            by_id: HashMap::with_capacity(keyed.len()),
            names,
            districts: HashMap::new(),
            in_district: Vec::new(),
        };
        for (pos, (id, mut row)) in keyed.into_iter().enumerate() {
            let next = table.districts.len();
            let d = *table
                .districts
                .entry((row.units[LA], row.units[PD]))
                .or_insert(next);
            if d == table.in_district.len() {
                table.in_district.push(Vec::new());
            }
            if let Some(list) = table.in_district.get_mut(d) {
                list.push(pos);
            }
            row.district = u32::try_from(d).unwrap_or(u32::MAX);
            table.by_id.insert(id, pos);
            table.rows.push(row);
        }
        table
    }

    fn name(&self, value: &str) -> Option<u32> {
        self.names.get(value).copied()
    }

    /// The district number of an `LA/PD` id.
    fn district(&self, id: &str) -> Option<usize> {
        let (la, pd) = id.split_once('/')?;
        self.districts
            .get(&(self.name(la)?, self.name(pd)?))
            .copied()
    }
}

/// Appends a row's record, whole or only the `fields` keys (its id always kept), as JSON.
pub(super) fn write_record(
    out: &mut Vec<u8>,
    row: &Row,
    fields: Option<&HashSet<String>>,
    id_key: &str,
) {
    let Some(fields) = fields else {
        out.extend_from_slice(row.json.as_bytes());
        return;
    };
    let record: Map<String, Value> = serde_json::from_str(&row.json).unwrap_or_default();
    let kept: Map<String, Value> = record
        .into_iter()
        .filter(|(k, _)| k == id_key || fields.contains(k))
        .collect();
    if serde_json::to_writer(&mut *out, &kept).is_err() {
        out.extend_from_slice(b"{}");
    }
}

/// Which dataset a request is about.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Electors,
    Members,
}

impl Kind {
    /// Parameters that must equal a record's value of the same name.
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
    /// Unit slot and interned value; `None` is a value no record has.
    equal: Vec<(usize, Option<u32>)>,
    /// Normalised postcode prefix.
    postcode: Option<String>,
    /// `areas=`: the table's districts it names, and the party units it names. A record is in
    /// scope when its area is named, the area the gateway judges it by (the catalogue's
    /// `area` template): an elector's district, a member's branch. Not a member's district
    /// (where they live) nor CLP: a member matched so and judged by a branch outside the
    /// scope is withheld, and still counted by the page, so paging would count the members of
    /// districts the caller may see of another branch.
    areas: Option<(Vec<bool>, HashSet<u32>)>,
    /// `exclude=protected`: leave out the entries the gateway never discloses, before paging.
    exclude_protected: bool,
}

impl Filter {
    pub fn new(q: &Query, kind: Kind, table: &Table) -> Result<Filter, Problem> {
        let p = &q.0;
        if p.contains_key("polling_district") && !p.contains_key("local_authority") {
            return Err(Problem::bad(
                "`polling_district` needs `local_authority`: codes are only unique within one",
            ));
        }
        let slot = |key: &str| UNITS.iter().position(|u| *u == key).unwrap_or_default();
        let equal = kind
            .filters()
            .iter()
            .filter_map(|k| p.get(*k).map(|v| (slot(k), table.name(v))))
            .collect();
        let areas = p.get("areas").map(|list| {
            let mut named = vec![false; table.in_district.len()];
            let mut units = HashSet::new();
            for id in comma_list(list) {
                if let Some(d) = table.district(id)
                    && let Some(on) = named.get_mut(d)
                {
                    *on = true;
                }
                units.extend(table.name(id));
            }
            (named, units)
        });
        let postcode = p.get("postcode").map(|v| normalise_postcode(v));
        let exclude_protected = match p.get("exclude").map(String::as_str) {
            None => false,
            Some("protected") => true,
            Some(other) => {
                return Err(Problem::bad(format!(
                    "`exclude` knows only `protected`, not `{other}`"
                )));
            }
        };
        Ok(Filter {
            kind,
            equal,
            postcode,
            areas,
            exclude_protected,
        })
    }

    pub fn matches(&self, table: &Table, pos: usize) -> bool {
        let Some(row) = table.rows.get(pos) else {
            return false;
        };
        if self.exclude_protected && row.protected {
            return false;
        }
        let unit = |slot: usize| row.units.get(slot).copied();
        if !self
            .equal
            .iter()
            .all(|(slot, want)| want.is_some() && unit(*slot) == *want)
        {
            return false;
        }
        if let Some(prefix) = &self.postcode
            && !row.postcode.starts_with(prefix.as_str())
        {
            return false;
        }
        match &self.areas {
            None => true,
            Some((named, units)) => match self.kind {
                Kind::Electors => named.get(row.district as usize).copied().unwrap_or(false),
                Kind::Members => unit(BRANCH).is_some_and(|u| units.contains(&u)),
            },
        }
    }

    /// Row positions worth testing, in id order: only the named districts' rows when
    /// `areas=` narrows by district alone (electors), else every row.
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
            _ => Box::new(0..table.rows.len()),
        }
    }
}
