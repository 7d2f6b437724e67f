//! The route table: which paths and query strings may reach a datastore at all.
//!
//! Routes come from the asset register: for a dataset `voter` with collection `electors`,
//! `GET /voter/electors` lists, `GET /voter/electors/export` streams every matching record,
//! `GET /voter/electors/aggregate?by=ward` counts them per group, `GET /voter/electors/{id}`
//! reads one record and `POST /voter/electors/{id}/{write}` records a write the register
//! declares. Nothing else is forwarded: an unknown path is 404,
//! a known path with the wrong method is 405. Query parameters are parsed here, once: only the
//! dataset's declared filters plus paging, each at most once, with values from a small
//! alphabet, so that no operator syntax, list or encoded trick can widen what a caller asks
//! for. The gateway adds its own narrowing parameters after this, which callers cannot send.

use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;

use crate::catalog::{Catalog, Dataset};
use crate::error::GatewayError;
use crate::policy::RequestAction;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteKind {
    List,
    /// `GET /{dataset}/{collection}/export`: every matching record, streamed.
    Export,
    /// `GET /{dataset}/{collection}/aggregate?by=f[,g[,h]]`: how many matching records share
    /// each combination of those fields' values; no record leaves (`aggregate.rs`).
    Aggregate {
        by: Vec<String>,
    },
    Read {
        id: String,
    },
    Write {
        id: String,
        write: String,
    },
}

/// A request that matched a route, with its validated query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dataset: String,
    pub kind: RouteKind,
    /// Validated caller filters, in a stable order.
    pub filters: BTreeMap<String, String>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Route {
    /// The asset-register categories of the fields the caller filtered on, each once: a
    /// record leaves only where its decision shows them all (`FilterContext::filtered_on`).
    /// A filter the register does not classify (the catalogue refuses one at start) stands
    /// for a category no decision lets through.
    pub fn filtered_categories(&self, dataset: &Dataset) -> Vec<String> {
        let mut categories: Vec<String> = (self.filters.keys())
            .map(|f| match dataset.fields.get(f) {
                Some(category) => category.clone(),
                None => format!("unclassified filter {f}"),
            })
            .collect();
        categories.sort();
        categories.dedup();
        categories
    }

    /// The names of the filters that narrow the request, as its policies see them
    /// (`context.filters`): each filter given, but `postcode` only down to part of a sector
    /// (`LS15 8A`, `LS15 8AB`; `postcode_sector`): a district or area (`LS15`, `L`) is a prefix
    /// of tens of thousands of addresses, and a look-up rule (`purpose.casework-looks-up`)
    /// must not be met by one.
    pub fn narrowing(&self) -> Vec<String> {
        (self.filters.iter())
            .filter(|(name, value)| name.as_str() != "postcode" || postcode_sector(value))
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn action(&self) -> RequestAction {
        match self.kind {
            RouteKind::List => RequestAction::List,
            RouteKind::Export => RequestAction::Export,
            RouteKind::Aggregate { .. } => RequestAction::Aggregate,
            RouteKind::Read { .. } => RequestAction::Read,
            RouteKind::Write { .. } => RequestAction::Write,
        }
    }

    /// The id the audit log and metrics use, e.g. `voter.list` or `voter.write.canvass`.
    pub fn id(&self) -> String {
        match &self.kind {
            RouteKind::List => format!("{}.list", self.dataset),
            RouteKind::Export => format!("{}.export", self.dataset),
            RouteKind::Aggregate { .. } => format!("{}.aggregate", self.dataset),
            RouteKind::Read { .. } => format!("{}.read", self.dataset),
            RouteKind::Write { write, .. } => format!("{}.write.{write}", self.dataset),
        }
    }
}

const MAX_VALUE_LEN: usize = 64;
/// The one filter a read by id takes (`postcode_matches`).
pub const READ_FILTER: &str = "postcode";
/// An aggregate groups by at most this many fields: each one more splits the cells finer,
/// and suppression hides more of them.
pub const MAX_GROUP_FIELDS: usize = 3;
/// The asset register's category of area fields, the only ones an aggregate filters by.
const AREA_CATEGORY: &str = "area";

/// Matches `method path?query` against the register's routes.
pub fn resolve(
    catalog: &Catalog,
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> Result<Route, GatewayError> {
    // Percent-escapes in a path are never needed for our ids, and are how `..` gets smuggled.
    if path.contains('%') || path.contains("//") {
        return Err(GatewayError::RouteNotFound);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (dataset_name, rest) = match segments.as_slice() {
        [d, rest @ ..] if !rest.is_empty() => (*d, rest),
        _ => return Err(GatewayError::RouteNotFound),
    };
    let dataset = catalog
        .datasets
        .get(dataset_name)
        .ok_or(GatewayError::RouteNotFound)?;
    let kind = match rest {
        [c] if *c == dataset.collection => RouteKind::List,
        // `export` and `aggregate` are routes, so no record with either id can be read or
        // written (a write's check reads its target: `export` would ask the datastore for a
        // whole export).
        [c, "export"] if *c == dataset.collection => RouteKind::Export,
        [c, "aggregate"] if *c == dataset.collection => RouteKind::Aggregate { by: Vec::new() },
        [c, id] if *c == dataset.collection && valid_id(id) => RouteKind::Read {
            id: (*id).to_owned(),
        },
        [c, id, w]
            if *c == dataset.collection && subject_id(id) && dataset.writes.contains_key(*w) =>
        {
            RouteKind::Write {
                id: (*id).to_owned(),
                write: (*w).to_owned(),
            }
        }
        _ => return Err(GatewayError::RouteNotFound),
    };
    let (wanted, allow) = match kind {
        RouteKind::Write { .. } => (http::Method::POST, "POST"),
        RouteKind::List
        | RouteKind::Export
        | RouteKind::Aggregate { .. }
        | RouteKind::Read { .. } => (http::Method::GET, "GET"),
    };
    if *method != wanted {
        return Err(GatewayError::MethodNotAllowed(allow));
    }
    let mut route = Route {
        dataset: dataset_name.to_owned(),
        kind,
        filters: BTreeMap::new(),
        page: None,
        per_page: None,
    };
    let allowed_filters: Vec<&String> = match route.kind {
        RouteKind::List | RouteKind::Export => dataset.filters.iter().collect(),
        // An aggregate narrows only by area: a filter on anything finer (a postcode is a few
        // households) would make a population small enough to learn about its members from
        // the counts.
        RouteKind::Aggregate { .. } => dataset
            .filters
            .iter()
            .filter(|f| dataset.fields.get(*f).is_some_and(|c| c == AREA_CATEGORY))
            .collect(),
        // A read names the record by id, and may name its postcode as the caller was given it
        // (a look-up purpose must: `purpose.casework-looks-up`), which the record must match.
        RouteKind::Read { .. } => (dataset.filters.iter())
            .filter(|f| *f == READ_FILTER)
            .collect(),
        RouteKind::Write { .. } => Vec::new(),
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(raw_name)?;
        let value = decode(raw_value)?;
        let duplicate = || {
            GatewayError::BadRequest(format!("query parameter `{name}` is given more than once"))
        };
        match name.as_str() {
            "page" if route.kind == RouteKind::List => {
                if route
                    .page
                    .replace(number(&name, &value, u32::MAX)?)
                    .is_some()
                {
                    return Err(duplicate());
                }
            }
            "per_page" if route.kind == RouteKind::List => {
                if route
                    .per_page
                    .replace(number(&name, &value, dataset.max_per_page)?)
                    .is_some()
                {
                    return Err(duplicate());
                }
            }
            "by" if matches!(route.kind, RouteKind::Aggregate { .. }) => {
                let fields = group_fields(&value, dataset)?;
                if let RouteKind::Aggregate { by } = &mut route.kind {
                    if !by.is_empty() {
                        return Err(duplicate());
                    }
                    *by = fields;
                }
            }
            f if allowed_filters.iter().any(|a| *a == f) => {
                check_value(&name, &value)?;
                if route.filters.insert(name.clone(), value).is_some() {
                    return Err(duplicate());
                }
            }
            _ => {
                return Err(GatewayError::BadRequest(format!(
                    "query parameter `{}` is not accepted on this route",
                    crate::error::echoed(&name)
                )));
            }
        }
    }
    if matches!(&route.kind, RouteKind::Aggregate { by } if by.is_empty()) {
        return Err(GatewayError::BadRequest(format!(
            "an aggregate needs `by`: 1 to {MAX_GROUP_FIELDS} comma-separated fields to group by"
        )));
    }
    within_its_area(&route, catalog, dataset)?;
    Ok(route)
}

/// A filter on a later field of the dataset's area key (`{local_authority}/{polling_district}`)
/// needs the fields before it: a polling-district code names a district only within its local
/// authority, so alone it picks districts of several (and the datastore refuses it, which
/// would reach the caller as the datastore's failure, 502, rather than their request's).
///
/// An aggregate's `by` likewise: grouped by district code alone, the districts of every
/// authority that uses a code would be counted as one, under that one code. The fields before
/// it are grouped by too, or fixed by a filter. (By every dataset's area key: the membership
/// store keys its records by branch, and holds district codes all the same.)
fn within_its_area(
    route: &Route,
    catalog: &Catalog,
    dataset: &Dataset,
) -> Result<(), GatewayError> {
    let by: &[String] = match &route.kind {
        RouteKind::Aggregate { by } => by,
        _ => &[],
    };
    // Most requests filter on nothing: no template to read for them.
    if route.filters.is_empty() && by.is_empty() {
        return Ok(());
    }
    let keys = (catalog.datasets.values())
        .map(|d| crate::catalog::area_template_fields(&d.area).unwrap_or_default());
    for key in keys {
        within_its_key(route, by, dataset, &key)?;
    }
    Ok(())
}

/// `within_its_area` for one area key: its fields this dataset holds.
fn within_its_key(
    route: &Route,
    by: &[String],
    dataset: &Dataset,
    key: &[String],
) -> Result<(), GatewayError> {
    let held: Vec<&String> = key
        .iter()
        .filter(|f| dataset.fields.contains_key(*f))
        .collect();
    let filtered = |f: &String| route.filters.contains_key(f);
    for (i, field) in held.iter().enumerate() {
        if filtered(field)
            && let Some(missing) = held[..i].iter().find(|f| !filtered(f))
        {
            return Err(GatewayError::BadRequest(format!(
                "`{field}` needs `{missing}`: a {field} code is unique only within its {missing}"
            )));
        }
        if by.contains(field)
            && let Some(missing) = held[..i].iter().find(|f| !filtered(f) && !by.contains(f))
        {
            return Err(GatewayError::BadRequest(format!(
                "`by={field}` needs `{missing}` in `by` too, or a `{missing}` filter: a {field} \
                 code is unique only within its {missing}, and its groups would count several \
                 as one"
            )));
        }
    }
    Ok(())
}

/// The fields an aggregate groups by: 1 to `MAX_GROUP_FIELDS` distinct names, each one the
/// asset register lists for the dataset (whether the caller's purpose may use a field is the
/// policies' to say, record by record).
fn group_fields(
    value: &str,
    dataset: &crate::catalog::Dataset,
) -> Result<Vec<String>, GatewayError> {
    let names: Vec<String> = value.split(',').map(str::to_owned).collect();
    if names.len() > MAX_GROUP_FIELDS {
        return Err(GatewayError::BadRequest(format!(
            "`by` names at most {MAX_GROUP_FIELDS} fields"
        )));
    }
    for (i, name) in names.iter().enumerate() {
        if !dataset.fields.contains_key(name) {
            return Err(GatewayError::BadRequest(format!(
                "`by`: `{}` is not a field of this dataset",
                name.chars().take(MAX_VALUE_LEN).collect::<String>()
            )));
        }
        if names[..i].contains(name) {
            return Err(GatewayError::BadRequest(format!(
                "`by` names `{name}` twice"
            )));
        }
    }
    Ok(names)
}

/// The words a collection's routes take after it, which are therefore never a record's id.
const ROUTE_WORDS: [&str; 2] = ["export", "aggregate"];

/// A subject id that names one record: plain (`valid_id`) and not one of the collection's
/// route words. A path built from it is a read of that record, never an export or an aggregate
/// (`GET /sar/export` would otherwise fetch the subject's current data as a whole export).
pub fn subject_id(id: &str) -> bool {
    valid_id(id) && !ROUTE_WORDS.contains(&id)
}

/// Ids: letters, digits, `-` and `_`; nothing that could become a path or a query.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_VALUE_LEN && id.bytes().all(|b| ID_BYTES[usize::from(b)])
}

/// The bytes an id may hold, by value: one load a byte (the filter asks about every record's
/// id; four range comparisons a byte were most of that question's cost).
const ID_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        b += 1;
    }
    table
};

fn decode(raw: &str) -> Result<String, GatewayError> {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| GatewayError::BadRequest("a query parameter is not valid UTF-8".to_owned()))
}

/// Whether `value` is a UK postcode's outward code, a space, its sector's digit and at least
/// one letter of the unit (`LS15 8A`, `SW1A 1AA`), in either case: letters and digits only
/// around the one space. Not the sector alone: datastores match a postcode prefix with its
/// spaces taken out, so `LS1 5` is `LS15`, a whole district; a sector's digit followed by a
/// letter cannot be read so (no district is followed by a letter).
fn postcode_sector(value: &str) -> bool {
    let Some((outward, inward)) = value.trim().split_once(' ') else {
        return false;
    };
    let o = outward.as_bytes();
    let letters = o.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    (1..=2).contains(&letters)
        && (letters + 1..=letters + 2).contains(&o.len())
        && o[letters].is_ascii_digit()
        && o.iter().all(u8::is_ascii_alphanumeric)
        && inward.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && (2..=3).contains(&inward.len())
        && inward.bytes().skip(1).all(|b| b.is_ascii_alphabetic())
}

/// Whether a record's postcode is one a postcode filter picks, as datastores match them: with
/// the spaces (any Unicode space: a no-break space pasted from a spreadsheet) taken out and in
/// either case, the filter a prefix of the postcode (`LS15 8A` picks `LS15 8AB`). For a read
/// by id, which the datastore answers whatever it names, and each record of a listing.
pub fn postcode_matches(postcode: &str, filter: &str) -> bool {
    let squeezed = |s: &str| -> String {
        (s.chars())
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_uppercase()
    };
    let filter = squeezed(filter);
    !filter.is_empty() && squeezed(postcode).starts_with(&filter)
}

/// Filter values are codes, names and postcodes: nothing that is syntax anywhere downstream,
/// and not blank (a value of spaces alone would narrow nothing, and read as a filter given).
fn check_value(name: &str, value: &str) -> Result<(), GatewayError> {
    let ok = !value.trim().is_empty()
        && value.len() <= MAX_VALUE_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'-' | b'_' | b'/' | b'.'))
        && !value.contains("..");
    if ok {
        Ok(())
    } else {
        Err(GatewayError::BadRequest(format!(
            "query parameter `{name}` must be 1 to {MAX_VALUE_LEN} letters, digits, spaces or `-_/.`"
        )))
    }
}

fn number(name: &str, value: &str, max: u32) -> Result<u32, GatewayError> {
    match value.parse::<u32>() {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        _ => Err(GatewayError::BadRequest(format!(
            "query parameter `{name}` must be a whole number from 1 to {max}"
        ))),
    }
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
