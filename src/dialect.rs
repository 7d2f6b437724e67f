//! How each kind of datastore is asked: the upstream path and parameters for a resolved route,
//! and the envelope its answer comes in.
//!
//! Everything sent upstream is built here from validated values (the route's filters and
//! paging, the ids the route table accepted, and the gateway's own narrowing set), each
//! percent-encoded; nothing of the caller's query string is copied. This module builds
//! requests; it neither sends them (`proxy.rs`) nor reads answers (`filter/`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::catalog::Dataset;
use crate::config::Dialect;
use crate::error::GatewayError;
use crate::filter::Envelope;
use crate::routes::Route;

/// Asks a wardgate-API datastore to leave out, before it pages, the entries the gateway never
/// discloses (marker `N`, flag `under_16`, an attainer date more than two years away): the filter would withhold them anyway, but a page
/// the datastore counted them in says by its length and `next_page` that they are there.
/// Datasette's canned query must leave them out itself (README: Datastores). Either way the
/// gateway still withholds any that come, and says so (`gateway::never_disclosed_sent`).
pub const EXCLUDE_PROTECTED: &str = "exclude=protected";

/// The page size a listing gets when the caller names none.
pub const DEFAULT_PER_PAGE: u32 = 100;

/// Everything but RFC 3986's unreserved characters is escaped (Datasette redirects a path
/// whose unreserved characters arrive escaped).
const ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn enc(s: &str) -> String {
    utf8_percent_encode(s, ESCAPE).to_string()
}

/// A caller's narrowing set, rendered once as each dialect's query parameter (the gateway
/// keeps one per grant set in `Narrowings`, so a request does not render it again).
#[derive(Debug)]
pub struct Narrowing {
    /// `areas=a,b,...` for wardgate's API.
    wardgate: String,
    /// `areas=<JSON array>` for a Datasette canned query.
    datasette: String,
}

impl Narrowing {
    pub fn new(areas: &BTreeSet<String>) -> Self {
        let list: Vec<String> = areas.iter().map(|a| enc(a)).collect();
        let json = serde_json::to_string(areas).unwrap_or_default();
        Narrowing {
            wardgate: format!("areas={}", list.join(",")),
            datasette: format!("areas={}", enc(&json)),
        }
    }
}

/// Narrowings by grant set (the areas a token names, as it names them), made once: the
/// geography is fixed for the process's life. Bounded; past the bound it starts again.
#[derive(Default)]
pub struct Narrowings(Mutex<HashMap<Vec<String>, Option<Arc<Narrowing>>>>);

const MAX_NARROWINGS: usize = 4096;

impl Narrowings {
    pub fn get(
        &self,
        grants: &[String],
        make: impl FnOnce() -> Option<Narrowing>,
    ) -> Option<Arc<Narrowing>> {
        if let Some(known) = self.lock().get(grants) {
            return known.clone();
        }
        let made = make().map(Arc::new);
        let mut map = self.lock();
        if map.len() >= MAX_NARROWINGS {
            map.clear();
        }
        map.insert(grants.to_vec(), made.clone());
        made
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<String>, Option<Arc<Narrowing>>>> {
        // The map is only ever a cache of pure results: a poisoned one is still right.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A listing's page size: the caller's, else the default within the dataset's maximum.
pub fn per_page(dataset: &Dataset, route: &Route) -> u32 {
    route
        .per_page
        .unwrap_or(DEFAULT_PER_PAGE.min(dataset.max_per_page))
}

/// The caller's validated filters as wardgate-API query parameters, in a stable order.
fn filter_params(route: &Route) -> Vec<String> {
    route
        .filters
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect()
}

/// The upstream request for a streamed export (NDJSON, one record per line), or `None` when
/// the datastore has no such API (Datasette's row API pages; export through it is refused).
/// `narrowing` narrows to the caller's scope (`None`: too wide to be worth sending).
pub fn export(
    dialect: &Dialect,
    dataset: &Dataset,
    route: &Route,
    narrowing: Option<&Narrowing>,
) -> Option<String> {
    match dialect {
        Dialect::Wardgate => {
            let mut parts = filter_params(route);
            parts.extend(narrowing.map(|n| n.wardgate.clone()));
            parts.push(EXCLUDE_PROTECTED.to_owned());
            Some(format!(
                "/{}/export?{}",
                dataset.collection,
                parts.join("&")
            ))
        }
        Dialect::Datasette(_) => None,
    }
}

/// The upstream path and query for a listing; `narrowing` narrows to the caller's scope
/// (`None`: too wide to be worth sending).
pub fn list(
    dialect: &Dialect,
    dataset: &Dataset,
    route: &Route,
    narrowing: Option<&Narrowing>,
) -> (String, Envelope) {
    match dialect {
        Dialect::Wardgate => {
            let mut parts = filter_params(route);
            if let Some(p) = route.page {
                parts.push(format!("page={p}"));
            }
            // Always named: the quota holds this many for the request, whatever the
            // datastore's own default.
            parts.push(format!("per_page={}", per_page(dataset, route)));
            parts.extend(narrowing.map(|n| n.wardgate.clone()));
            parts.push(EXCLUDE_PROTECTED.to_owned());
            (
                format!("/{}?{}", dataset.collection, parts.join("&")),
                Envelope::Records,
            )
        }
        Dialect::Datasette(api) => {
            let page = route.page.unwrap_or(1);
            let per_page = per_page(dataset, route);
            let offset = u64::from(page - 1) * u64::from(per_page);
            let mut parts = vec![
                "_shape=objects".to_owned(),
                format!("limit={per_page}"),
                format!("offset={offset}"),
            ];
            parts.extend(api.json_columns.iter().map(|c| format!("_json={}", enc(c))));
            // A canned query needs every named parameter; an empty one means "not filtered".
            for f in &dataset.filters {
                parts.push(format!(
                    "{f}={}",
                    enc(route.filters.get(f).map(String::as_str).unwrap_or(""))
                ));
            }
            parts.push(narrowing.map_or_else(|| "areas=".to_owned(), |n| n.datasette.clone()));
            let path = format!(
                "/{}/{}.json?{}",
                enc(&api.database),
                enc(&api.list_query),
                parts.join("&")
            );
            (path, Envelope::Rows { page, per_page })
        }
    }
}

/// The upstream path for one record by id (ids are plain: `routes::valid_id`).
pub fn read(dialect: &Dialect, dataset: &Dataset, id: &str) -> (String, Envelope) {
    match dialect {
        Dialect::Wardgate => (format!("/{}/{id}", dataset.collection), Envelope::Records),
        Dialect::Datasette(api) => {
            let json: Vec<String> = api
                .json_columns
                .iter()
                .map(|c| format!("&_json={}", enc(c)))
                .collect();
            let path = format!(
                "/{}/{}/{id}.json?_shape=objects{}",
                enc(&api.database),
                enc(&api.table),
                json.concat()
            );
            (
                path,
                Envelope::Rows {
                    page: 1,
                    per_page: 1,
                },
            )
        }
    }
}

/// The upstream path for a declared write.
pub fn write(
    dialect: &Dialect,
    dataset: &Dataset,
    id: &str,
    write: &str,
) -> Result<(String, Envelope), GatewayError> {
    match dialect {
        Dialect::Wardgate => Ok((
            format!("/{}/{id}/{write}", dataset.collection),
            Envelope::Records,
        )),
        // Datasette deployments here are read-only replicas of the register.
        Dialect::Datasette(_) => Err(GatewayError::MethodNotAllowed("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_set_is_narrowed_once_and_rendered_for_each_dialect() {
        let cache = Narrowings::default();
        let mut made = 0;
        let areas: BTreeSet<String> = ["E08000035/CGW1".to_owned(), "E05011391".to_owned()].into();
        let grants = ["E05011391".to_owned()];
        for _ in 0..3 {
            let got = cache.get(&grants, || {
                made += 1;
                Some(Narrowing::new(&areas))
            });
            let got = got.unwrap();
            assert_eq!(got.wardgate, "areas=E05011391,E08000035%2FCGW1");
            assert_eq!(
                got.datasette,
                format!("areas={}", enc(r#"["E05011391","E08000035/CGW1"]"#))
            );
        }
        assert_eq!(made, 1);
        // Another grant set is its own entry; too wide a scope is remembered as no narrowing.
        let wide = ["E92000001".to_owned()];
        assert!(cache.get(&wide, || None).is_none());
        assert!(cache.get(&wide, || panic!("made again")).is_none());
    }
}
