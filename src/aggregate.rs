//! Aggregates: how many matching records share each combination of a few fields' values, with
//! small cells suppressed. No record leaves; this is the only output the `research` purpose
//! gets, and only it gets one (DOMAIN.md §5: aggregate output only;
//! `purpose.research-aggregate-only`, `purpose.aggregate-research-only`).
//!
//! `GET /{dataset}/{collection}/aggregate?by=ward,voting_intention` reads the datastore's
//! NDJSON export (the listing's filters, narrowed to the caller's scope, anonymous electors and
//! under-16s left out by the datastore) and puts every line through the filter exactly as an
//! export would. So a record the policies withhold from the purpose (out of scope,
//! restricted, erasure requested, anonymous, under 16) counts nowhere, and a record counts in
//! a cell only if every grouping field survives the field policies for it: a para 22 notice
//! keeps that person's voting intention out of every count, as it keeps it out of every row.
//!
//! A cell of fewer than `min_cell` records is left out of the answer, and the others' counts
//! are rounded down to a multiple of `round_to`, of which `min_cell` is one (`config`): a
//! count shown as N stands for N to N + `round_to` - 1 records, the smallest cells shown too
//! (rounded to the nearest, a cell at the threshold stood for fewer: with `min_cell` 12 and
//! `round_to` 5, a 10 could only be 12). The answer says nothing of the cells left out, nor
//! how many records were withheld or could not be grouped: any of those could be one person,
//! and rounding keeps two answers (grouped by a field, then by it and another) from being
//! subtracted to learn their size (with `round_to` above 1), though not from showing that
//! something was left out. Filters are by area only
//! (`routes.rs`), so no population filtered is smaller than a polling district; cells are
//! smaller groups, of at least `min_cell`.
//!
//! The answer is one small JSON document. It leaves like any other answer, after its audit
//! record is durable. That record names the grouping fields and filters, and the exact
//! figures: records counted, cells shown and left out. It lists no subject: none is
//! disclosed, and the log is personal data to be kept minimal.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use serde_json::{Value, json};

use crate::catalog::Dataset;
use crate::controls::Controls;
use crate::error::GatewayError;
use crate::export::{Lines, LinesError};
use crate::filter::{self, Disclosure, FilterContext, RawRecord};
use crate::policy::RecordAttrs;
use crate::routes::{Route, RouteKind};

/// The operator's limits on aggregates (`[aggregates]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Cells of fewer records than this are suppressed (at least 2: a cell of one is one
    /// person's values).
    pub min_cell: u64,
    /// An aggregate that would make more groups than this is refused: past it the grouping
    /// is too fine to be an aggregate, and memory is bounded by it (with `MAX_VALUE`).
    pub max_groups: usize,
    /// Counts shown are rounded down to a multiple of this (1: exact); `min_cell` is one.
    pub round_to: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            min_cell: 10,
            max_groups: 10_000,
            round_to: 5,
        }
    }
}

/// A value longer than this (as canonical JSON, quotes included) is not something to group
/// by: its record counts nowhere, like one without the field (refusing the whole aggregate
/// would tell that one record holds such a value).
const MAX_VALUE: usize = 256;

/// What an aggregate found, for the answer and the audit record.
pub struct Counted {
    /// The answer: `{"by", "min_cell", "rounded_to", "cells": [{"group": {...}, "records": n}]}`.
    pub body: Bytes,
    /// Some cell was shown: the grouping fields left, in aggregate.
    pub shown: bool,
    /// Records the filter withheld (counted nowhere).
    pub rows_withheld: u64,
    /// The policies behind the record and field decisions.
    pub policy_ids: BTreeSet<String>,
    /// For the audit record's `detail`.
    pub summary: Value,
}

/// Reads the datastore's export `body` through the filter and counts its records per group.
/// `stands` is asked before each batch: a caller revoked or ended meanwhile (or a mirror gone
/// stale) stops the reading there, as an export stops at its next chunk, rather than keep the
/// datastore reading a whole scope for an answer nobody may have.
pub async fn count(
    mut lines: Lines<hyper::body::Incoming>,
    route: &Route,
    dataset: &Dataset,
    controls: &Controls,
    settings: Settings,
    decide: &mut (dyn FnMut(&RecordAttrs) -> std::sync::Arc<filter::RecordDecision> + Send),
    stands: &(dyn Fn() -> Result<(), GatewayError> + Send + Sync),
) -> Result<Counted, GatewayError> {
    let RouteKind::Aggregate { by } = &route.kind else {
        return Err(GatewayError::Internal(
            "an aggregate of another route".to_owned(),
        ));
    };
    let filtered_on = route.filtered_categories(dataset);
    let mut memo = filter::Memo::default();
    let mut groups = Groups::new(by, settings.max_groups);
    let mut out = Vec::new();
    let (mut rows_withheld, mut never_disclosed) = (0u64, 0u64);
    let mut policy_ids = BTreeSet::new();
    while let Some(batch) = lines.next().await.map_err(|e| match e {
        LinesError::Upstream(e) => {
            tracing::warn!(error = %e, "upstream failed mid-aggregate");
            GatewayError::UpstreamUnavailable
        }
        // A longer upstream line is not a record, as for exports.
        LinesError::TooLong => GatewayError::UpstreamMalformed(e.to_string()),
        LinesError::Idle(_) => {
            tracing::warn!(error = %e, "upstream stalled mid-aggregate");
            GatewayError::UpstreamTimeout
        }
    })? {
        stands()?;
        let flags = controls.register_flags()?;
        let cx = FilterContext {
            dataset,
            // Read for each batch: an aggregate running past midnight judges TPS checks and
            // ages by the day its records are read on.
            today: filter::today(),
            register: &flags,
            filtered_on: &filtered_on,
            // Lines, not a page; and no look-up purpose exports or counts (their rules ask
            // for a listing or a read), so no record must meet a postcode filter.
            paging: None,
            must_match: None,
        };
        // A disclosure of its own per batch, so the memo starts a chunk for it too.
        let mut d = Disclosure::default();
        memo.new_chunk();
        filter::filter_lines(batch, &cx, decide, &mut memo, &mut out, &mut d)
            .map_err(|e| GatewayError::UpstreamMalformed(e.to_string()))?;
        rows_withheld += d.rows_withheld;
        never_disclosed += d.never_disclosed_rows;
        policy_ids.extend(d.policy_ids);
        // The filter's own output: one record per line, every value checked.
        for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            groups.add(line)?;
        }
        out.clear();
    }
    crate::gateway::never_disclosed_sent(&route.dataset, never_disclosed);
    let (body, shown, summary) = groups.answer(settings.min_cell, settings.round_to);
    Ok(Counted {
        body,
        shown,
        rows_withheld,
        policy_ids,
        summary,
    })
}

/// Records counted per combination of the grouping fields' values.
struct Groups<'b> {
    by: &'b [String],
    max: usize,
    /// Each key: the values as canonical JSON text (`serde_json`'s), in `by`'s order.
    counts: HashMap<Vec<String>, u64>,
    /// Records let out by the filter with no value to group by (field stripped or absent,
    /// or a value too long): for the log only.
    ungrouped: u64,
}

impl<'b> Groups<'b> {
    fn new(by: &'b [String], max: usize) -> Self {
        Groups {
            by,
            max,
            counts: HashMap::new(),
            ungrouped: 0,
        }
    }

    /// Counts one filtered record, if every grouping field left with it.
    fn add(&mut self, line: &[u8]) -> Result<(), GatewayError> {
        let bad = |e: &dyn std::fmt::Display| GatewayError::Internal(format!("filter output: {e}"));
        let text = std::str::from_utf8(line).map_err(|e| bad(&e))?;
        let record = RawRecord::parse(text).map_err(|e| bad(&e))?;
        let mut key = Vec::with_capacity(self.by.len());
        for name in self.by {
            let Some(raw) = record.field(name) else {
                self.ungrouped += 1;
                return Ok(());
            };
            // Canonical, so that `"a"` and `"\u0061"` are one group. A value the scanner
            // passes (it checks JSON's grammar) and `serde_json` will not read (a lone
            // surrogate, a number out of range) is no group, as a long one is: refusing the
            // whole aggregate would tell where one record holds it.
            let Ok(value) = serde_json::from_str::<Value>(raw) else {
                self.ungrouped += 1;
                return Ok(());
            };
            let value = value.to_string();
            if value.len() > MAX_VALUE {
                self.ungrouped += 1;
                return Ok(());
            }
            key.push(value);
        }
        if let Some(n) = self.counts.get_mut(&key) {
            *n += 1;
        } else if self.counts.len() >= self.max {
            return Err(GatewayError::TooManyGroups(format!(
                "grouping by {} makes more than {} groups; group by fewer or coarser fields, or \
                 filter the records first",
                self.by.join(","),
                self.max
            )));
        } else {
            self.counts.insert(key, 1);
        }
        Ok(())
    }

    /// The answer, cells in the order of their values; whether it shows any cell; and the
    /// audit record's summary (with the exact figures).
    fn answer(self, min_cell: u64, round_to: u64) -> (Bytes, bool, Value) {
        let mut shown: Vec<(Vec<String>, u64)> = Vec::new();
        let mut suppressed = 0u64;
        let mut counted = 0u64;
        for (key, n) in self.counts {
            counted += n;
            if n >= min_cell {
                shown.push((key, n));
            } else {
                suppressed += 1;
            }
        }
        shown.sort();
        let in_cells: u64 = shown.iter().map(|(_, n)| n).sum();
        let cells: Vec<Value> = shown
            .iter()
            .map(|(key, n)| {
                let group: serde_json::Map<String, Value> = self
                    .by
                    .iter()
                    .zip(key)
                    .map(|(name, v)| (name.clone(), serde_json::from_str(v).unwrap_or(Value::Null)))
                    .collect();
                json!({ "group": group, "records": round(*n, round_to) })
            })
            .collect();
        let body = json!({
            "by": self.by,
            "min_cell": min_cell,
            "rounded_to": round_to,
            "cells": cells,
        });
        let summary = json!({ "aggregate": {
            "by": self.by,
            "min_cell": min_cell,
            "records_counted": counted,
            "records_in_cells": in_cells,
            "records_ungrouped": self.ungrouped,
            "rounded_to": round_to,
            "cells": shown.len(),
            "suppressed_cells": suppressed,
        }});
        (Bytes::from(body.to_string()), !shown.is_empty(), summary)
    }
}

/// `n` rounded down to a multiple of `to`: every count shown stands for `to` counts, and for
/// `n` at least `min_cell` (a multiple of `to`) it is at least `min_cell`.
fn round(n: u64, to: u64) -> u64 {
    let to = to.max(1);
    n / to * to
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn groups_of(by: &[&str], lines: &[&str], max: usize) -> Result<Value, GatewayError> {
        let by: Vec<String> = by.iter().map(|s| (*s).to_owned()).collect();
        let mut g = Groups::new(&by, max);
        for l in lines {
            g.add(l.as_bytes())?;
        }
        let (body, _, _) = g.answer(2, 1);
        Ok(serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn small_cells_are_suppressed_and_their_size_is_never_told() {
        let lines = [
            r#"{"ward":"A","vi":"lab"}"#,
            r#"{"ward":"A","vi":"lab"}"#,
            r#"{"ward":"A","vi":"con"}"#,
            r#"{"ward":"B","vi":"lab"}"#,
            r#"{"ward":"B","vi":"lab"}"#,
            r#"{"ward":"B","vi":"lab"}"#,
        ];
        let v = groups_of(&["ward", "vi"], &lines, 100).unwrap();
        assert_eq!(
            v["cells"],
            json!([
                {"group": {"ward": "A", "vi": "lab"}, "records": 2},
                {"group": {"ward": "B", "vi": "lab"}, "records": 3},
            ])
        );
        // Nothing in the answer tells of the suppressed cell.
        let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["by", "cells", "min_cell", "rounded_to"]);
    }

    /// A value the filter passes and `serde_json` cannot read counts nowhere, and fails
    /// nothing: an aggregate refused for it would say where one record holds it.
    #[test]
    fn a_value_serde_cannot_read_counts_nowhere() {
        let lines = [
            r#"{"vi":"\ud800"}"#,
            r#"{"vi":1e400}"#,
            r#"{"vi":"lab"}"#,
            r#"{"vi":"lab"}"#,
        ];
        let v = groups_of(&["vi"], &lines, 100).unwrap();
        assert_eq!(v["cells"], json!([{"group": {"vi": "lab"}, "records": 2}]));
    }

    #[test]
    fn a_record_without_a_grouping_field_counts_nowhere() {
        // As the filter leaves a record whose voting intention its field policies stripped.
        let lines = [
            r#"{"ward":"A"}"#,
            r#"{"ward":"A","vi":"lab"}"#,
            r#"{"ward":"A","vi":"lab"}"#,
        ];
        let v = groups_of(&["ward", "vi"], &lines, 100).unwrap();
        assert_eq!(
            v["cells"],
            json!([{"group": {"ward": "A", "vi": "lab"}, "records": 2}])
        );
    }

    #[test]
    fn values_written_differently_are_one_group() {
        let lines = [
            r#"{"vi":"lab"}"#,
            r#"{"vi":"l\u0061b"}"#,
            r#"{"vi" : "lab" }"#,
        ];
        let v = groups_of(&["vi"], &lines, 100).unwrap();
        assert_eq!(v["cells"], json!([{"group": {"vi": "lab"}, "records": 3}]));
    }

    #[test]
    fn counts_are_rounded_after_suppression() {
        let by = vec!["w".to_owned()];
        let mut g = Groups::new(&by, 100);
        for (w, n) in [
            ("a", 9),
            ("b", 10),
            ("c", 12),
            ("d", 13),
            ("e", 17),
            ("f", 18),
        ] {
            for _ in 0..n {
                g.add(format!(r#"{{"w":"{w}"}}"#).as_bytes()).unwrap();
            }
        }
        let (body, shown, summary) = g.answer(10, 5);
        let v: Value = serde_json::from_slice(&body).unwrap();
        let got: Vec<(String, u64)> = v["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let w = c["group"]["w"].as_str().unwrap().to_owned();
                (w, c["records"].as_u64().unwrap())
            })
            .collect();
        let want = [("b", 10), ("c", 10), ("d", 10), ("e", 15), ("f", 15)];
        assert_eq!(got, want.map(|(w, n)| (w.to_owned(), n)));
        assert!(shown);
        // The log keeps the exact figures.
        assert_eq!(summary["aggregate"]["records_counted"], 79);
        assert_eq!(summary["aggregate"]["records_in_cells"], 70);
        assert_eq!(summary["aggregate"]["suppressed_cells"], 1);
    }

    /// Each count shown stands for as many cell sizes as any other, the smallest shown too:
    /// no shown figure narrows a cell to fewer than `round_to` sizes (rounded to the nearest,
    /// a cell at the threshold was one of fewer, with `round_to` 2 exactly one), and none is
    /// below `min_cell`.
    #[test]
    fn every_count_shown_stands_for_round_to_sizes() {
        for (min_cell, round_to) in [(10, 5), (10, 2), (12, 3), (12, 4), (12, 12), (2, 1)] {
            let mut sizes: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
            for n in min_cell..min_cell + 20 * round_to {
                sizes.entry(round(n, round_to)).or_default().push(n);
            }
            for (shown, ns) in &sizes {
                assert!(*shown >= min_cell, "{min_cell}/{round_to}: {shown}");
                assert_eq!(
                    *ns,
                    (*shown..*shown + round_to).collect::<Vec<_>>(),
                    "{min_cell}/{round_to}"
                );
            }
        }
    }

    #[test]
    fn a_value_too_long_to_group_by_counts_nowhere_and_fails_nothing() {
        let long = "x".repeat(MAX_VALUE);
        let lines = [
            format!(r#"{{"vi":"{long}"}}"#),
            r#"{"vi":"lab"}"#.to_owned(),
            r#"{"vi":"lab"}"#.to_owned(),
        ];
        let by = vec!["vi".to_owned()];
        let mut g = Groups::new(&by, 100);
        for l in &lines {
            g.add(l.as_bytes()).unwrap();
        }
        let (body, _, summary) = g.answer(2, 1);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["cells"], json!([{"group": {"vi": "lab"}, "records": 2}]));
        assert_eq!(summary["aggregate"]["records_ungrouped"], 1);
    }

    #[test]
    fn too_many_groups_are_refused() {
        let lines = [r#"{"id":"1"}"#, r#"{"id":"2"}"#, r#"{"id":"3"}"#];
        let err = groups_of(&["id"], &lines, 2).err().unwrap();
        assert!(matches!(err, GatewayError::TooManyGroups(m) if m.contains("more than 2 groups")));
    }
}
