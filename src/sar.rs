//! The subject access report (seeds §10.2): every disclosure of one person's data, when, to
//! whom, why, under which lawful basis, which fields, from which dataset, with the supplementary
//! information the asset register holds (purposes, recipients, retention, sources).
//!
//! The disclosures come from the audit log through its subject index (`audit::reader`); the
//! rest from the catalogue. This module assembles and renders (JSON and a readable HTML page);
//! it neither reads configuration nor decides who may ask (the CLI and the admin plane do).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::audit::reader::{LookupStats, each_record_mentioning};
use crate::catalog::Catalog;
use crate::controls::Placement;

#[derive(Debug, Serialize)]
pub struct Report {
    pub subject: String,
    pub generated_at: String,
    pub disclosures: Vec<Disclosure>,
    /// What was recorded about the person through the gateway (canvass returns, "do not
    /// knock"): each write logged before it was forwarded. Its `fields` are those written.
    pub writes: Vec<Disclosure>,
    pub purposes: Vec<PurposeUse>,
    pub recipients: Vec<Recipient>,
    pub datasets: Vec<Source>,
    pub retention: Vec<Retention>,
    pub restrictions: Vec<Placement>,
    /// The data held now, per dataset, as the DPO sees it under `sar_fulfilment` (filled by the
    /// admin plane, which fetches it through the gateway; empty from the offline CLI).
    pub current_data: BTreeMap<String, Value>,
    /// Per dataset asked and not in `current_data`, why: `nothing held` (no record by that id),
    /// `held, withheld (...)` (one the gateway never discloses, even here: an anonymous
    /// elector's or an under-16's, or one it cannot read), or why it could not be fetched
    /// (`quota-exceeded`, `controls-stale`, `upstream-unavailable`...: ask again). Empty from
    /// the offline CLI, which fetches nothing.
    pub current_data_missing: BTreeMap<String, String>,
    /// The audit logs searched: one per replica. A deployment of several replicas keeps one
    /// log each, and a report from fewer than all of them is not complete.
    pub logs: Vec<String>,
    /// Built from one replica's own log, of several sharing their controls through Redis (the
    /// admin plane's report, or the CLI's without `--audit-dir`): the others' disclosures are
    /// not in it, and the page says so.
    pub other_replicas_not_searched: bool,
    /// How far back the log reaches, when older records have been pruned: a disclosure
    /// before `held_from` is not in the report because the log no longer holds it.
    pub coverage: Option<Coverage>,
    pub lookup: LookupStats,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Coverage {
    /// Records removed under the retention policy (`audit prune`).
    pub pruned_records: u64,
    /// The time of the oldest record the log still holds (empty when it holds none it can
    /// read).
    pub held_from: String,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Disclosure {
    pub ts: String,
    pub request_id: String,
    pub recipient_subject: String,
    pub recipient_role: String,
    pub recipient_unit: String,
    pub purpose: String,
    pub lawful_basis: String,
    pub dataset: String,
    pub route: String,
    pub fields: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PurposeUse {
    pub purpose: String,
    pub description: String,
    pub lawful_basis: String,
    pub basis_detail: String,
    pub special_category_condition: Option<String>,
    pub disclosures: usize,
}

#[derive(Debug, Serialize)]
pub struct Recipient {
    pub role: String,
    pub description: String,
    pub disclosures: usize,
}

#[derive(Debug, Serialize)]
pub struct Source {
    pub dataset: String,
    pub description: String,
    pub owner: String,
    pub source: String,
}

#[derive(Debug, Serialize)]
pub struct Retention {
    pub category: String,
    pub description: String,
    /// Whether it is special category data (Art 9). (No lawful basis here: the asset
    /// register gives each category one, but a category spans datasets held on different
    /// bases, a member's name on contract, an elector's on public task; each use's basis is
    /// its purpose's, in `purposes`.)
    pub special: bool,
    pub retention: String,
}

impl Retention {
    fn of(name: &str, cat: &crate::catalog::Category) -> Retention {
        Retention {
            category: name.to_owned(),
            description: cat.description.clone(),
            special: cat.special,
            retention: cat.retention.clone(),
        }
    }
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

impl Report {
    /// Adds the sources and retention of the data held now (`current_data`, once the admin
    /// plane has fetched it): Art 15 asks them of the data held, not only of what was
    /// disclosed, and a person nobody has looked up would otherwise be told nothing of either.
    pub fn add_held(&mut self, catalog: &Catalog) {
        for (name, record) in &self.current_data {
            let Some(ds) = catalog.datasets.get(name) else {
                continue;
            };
            if !self.datasets.iter().any(|s| s.dataset == *name) {
                self.datasets.push(Source {
                    dataset: name.clone(),
                    description: ds.description.clone(),
                    owner: ds.owner.clone(),
                    source: ds.source.clone(),
                });
            }
            // A field with no value (`null`, empty) holds nothing of its category: an elector
            // never canvassed has a `voting_intention` of null, and no political opinion kept.
            let fields = record.as_object().into_iter().flatten();
            let held = fields.filter(|(_, v)| match v {
                Value::Null => false,
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            });
            for category in held.filter_map(|(f, _)| ds.fields.get(f)) {
                if self.retention.iter().any(|r| r.category == *category) {
                    continue;
                }
                if let Some(cat) = catalog.categories.get(category) {
                    self.retention.push(Retention::of(category, cat));
                }
            }
        }
        self.datasets.sort_by(|a, b| a.dataset.cmp(&b.dataset));
        self.retention.sort_by(|a, b| a.category.cmp(&b.category));
    }
}

/// Builds the report for `subject` from the audit log in `audit_dir`.
pub fn build(
    audit_dir: &Path,
    catalog: &Catalog,
    subject: &str,
    restrictions: Vec<Placement>,
) -> std::io::Result<Report> {
    build_from(&[audit_dir], catalog, subject, restrictions)
}

/// Builds the report for `subject` from several audit logs (each replica keeps its own), their
/// records merged in time order.
pub fn build_from(
    audit_dirs: &[&Path],
    catalog: &Catalog,
    subject: &str,
    restrictions: Vec<Placement>,
) -> std::io::Result<Report> {
    let mut records = Vec::new();
    let mut lookup = LookupStats::default();
    for dir in audit_dirs {
        // Each record kept as far as this person goes: an export chunk's names thousands of
        // people and what each left with, and a report over years of them would otherwise
        // hold them all.
        let stats =
            each_record_mentioning(dir, subject, &mut |r| records.push(own_part(r, subject)))?;
        lookup.segments += stats.segments;
        lookup.segments_indexed += stats.segments_indexed;
        lookup.segments_scanned += stats.segments_scanned;
        lookup.lines_read += stats.lines_read;
        lookup.lines_unreadable += stats.lines_unreadable;
        lookup.lines_set_aside += stats.lines_set_aside;
    }
    // Stable: one log's records keep their order.
    records.sort_by(|a, b| a["ts"].as_str().cmp(&b["ts"].as_str()));
    // Answers recorded as disclosed and then held back (`gateway::held_back`): a second
    // record under the same request id says they did not leave.
    let held_back: BTreeSet<&str> = (records.iter())
        .filter(|r| r["detail"]["withheld_after_recording"].is_string())
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    // An export's chunks recorded and never sent (`export::Run::finish`): its closing record
    // names them and their subjects.
    let mut chunks_not_sent: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for r in &records {
        if let (Some(id), Some(numbers)) = (
            r["request_id"].as_str(),
            r["detail"]["chunks_not_sent"].as_array(),
        ) {
            (chunks_not_sent.entry(id).or_default())
                .extend(numbers.iter().filter_map(Value::as_u64));
        }
    }
    let sent = |r: &Value| match r["request_id"].as_str() {
        None => true,
        Some(id) if held_back.contains(id) => false,
        Some(id) => !(r["detail"]["export_chunk"].as_u64())
            .is_some_and(|n| chunks_not_sent.get(id).is_some_and(|not| not.contains(&n))),
    };
    let disclosures: Vec<Disclosure> = records
        .iter()
        .filter(|r| r["decision"] == "allow" && r["status"] == 200)
        .filter(|r| sent(r))
        .map(|r| entry(r, &subjects_fields(r, subject)))
        .collect();
    // A write's own record, made before it is forwarded (`gateway::log_intent`): what the
    // datastore was asked to record, whatever it answered (its answer may not name the
    // person at all, when the record written is one the caller may no longer see).
    // Less those whose answer's record says they were stopped before the datastore.
    let not_sent: BTreeSet<&str> = (records.iter())
        .filter(|r| r["detail"]["write"] == "not_sent")
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    let writes: Vec<Disclosure> = records
        .iter()
        .filter(|r| r["decision"] == "allow" && r["detail"]["write"] == "intended")
        .filter(|r| (r["request_id"].as_str()).is_none_or(|id| !not_sent.contains(id)))
        .map(|r| entry(r, &r["detail"]["written"]))
        .collect();
    // By purpose and the lawful basis each disclosure was recorded under: a basis the
    // catalogue has changed since is reported as it was then.
    let mut by_purpose: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut by_role: BTreeMap<&str, usize> = BTreeMap::new();
    let mut datasets: BTreeSet<&str> = BTreeSet::new();
    let mut categories: BTreeSet<String> = BTreeSet::new();
    // A disclosure recorded with no basis counts under the catalogue's.
    let key = |d: &Disclosure| -> (String, String) {
        let basis = match (d.lawful_basis.is_empty(), catalog.purposes.get(&d.purpose)) {
            (true, Some(p)) => p.lawful_basis.clone(),
            _ => d.lawful_basis.clone(),
        };
        (d.purpose.clone(), basis)
    };
    for d in &disclosures {
        *by_purpose.entry(key(d)).or_default() += 1;
        *by_role.entry(&d.recipient_role).or_default() += 1;
    }
    for d in &disclosures {
        datasets.insert(&d.dataset);
        if let Some(ds) = catalog.datasets.get(&d.dataset) {
            categories.extend(d.fields.iter().filter_map(|f| ds.fields.get(f).cloned()));
        }
    }
    for d in &writes {
        by_purpose.entry(key(d)).or_default();
        datasets.insert(&d.dataset);
        // A written field's category is its write's (`{dataset}.write.{write}`).
        let write = catalog.datasets.get(&d.dataset).and_then(|ds| {
            let name = d.route.strip_prefix(&format!("{}.write.", d.dataset))?;
            ds.writes.get(name)
        });
        if let Some(w) = write {
            categories.extend(d.fields.iter().filter_map(|f| w.fields.get(f).cloned()));
        }
    }
    let purposes = by_purpose
        .into_iter()
        .map(|((p, recorded), n)| {
            let entry = catalog.purposes.get(&p);
            // The catalogue's detail only where its basis is still the one recorded.
            let current = entry.filter(|e| e.lawful_basis == recorded);
            PurposeUse {
                description: entry.map(|e| e.description.clone()).unwrap_or_default(),
                purpose: p,
                lawful_basis: recorded,
                basis_detail: current.map(|e| e.basis_detail.clone()).unwrap_or_default(),
                // Art 9's condition does not turn on the Art 6 basis: as catalogued.
                special_category_condition: entry
                    .and_then(|e| e.special_category_condition.clone()),
                disclosures: n,
            }
        })
        .collect();
    let recipients = by_role
        .into_iter()
        .map(|(r, n)| Recipient {
            role: r.to_owned(),
            description: catalog.roles.get(r).cloned().unwrap_or_default(),
            disclosures: n,
        })
        .collect();
    let datasets = datasets
        .into_iter()
        .map(|d| match catalog.datasets.get(d) {
            Some(ds) => Source {
                dataset: d.to_owned(),
                description: ds.description.clone(),
                owner: ds.owner.clone(),
                source: ds.source.clone(),
            },
            // Named all the same: the person was disclosed data from it.
            None => Source {
                dataset: d.to_owned(),
                description: "no longer in the asset register".to_owned(),
                owner: String::new(),
                source: String::new(),
            },
        })
        .collect();
    let retention = categories
        .into_iter()
        .filter_map(|c| (catalog.categories.get(&c)).map(|cat| Retention::of(&c, cat)))
        .collect();
    Ok(Report {
        subject: subject.to_owned(),
        generated_at: crate::audit::AuditRecord::now_ts(),
        disclosures,
        writes,
        purposes,
        recipients,
        datasets,
        retention,
        restrictions,
        current_data: BTreeMap::new(),
        current_data_missing: BTreeMap::new(),
        other_replicas_not_searched: false,
        logs: (audit_dirs.iter())
            .map(|d| d.display().to_string())
            .collect(),
        coverage: (audit_dirs.iter().map(|d| coverage(d)))
            .collect::<std::io::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .reduce(|a, b| Coverage {
                pruned_records: a.pruned_records + b.pruned_records,
                // Complete only from the latest of the logs' oldest records; a log pruned of
                // everything (`""`) is complete from no time at all, and says so.
                held_from: if a.held_from.is_empty() || b.held_from.is_empty() {
                    String::new()
                } else {
                    a.held_from.max(b.held_from)
                },
            }),
        lookup,
    })
}

/// `Some` once records have been pruned: how many, and from when the log holds the rest.
fn coverage(audit_dir: &Path) -> std::io::Result<Option<Coverage>> {
    // (A damaged anchor fails the report: without it, it would not say that records were
    // removed, and "no disclosures" would read as "none ever".)
    let Some(anchor) = crate::audit::prune::read_anchor(audit_dir)? else {
        // Nor does a missing one: a log that was never pruned starts at its first record.
        // (Read again before failing: the first prune may have landed meanwhile.)
        // Less the damaged lines before it, each a record once: a log whose very first line
        // is torn starts at record 1 all the same.
        let oldest_seq = oldest_record(audit_dir)
            .and_then(|(r, damaged)| r["seq"].as_u64().map(|seq| seq.saturating_sub(damaged)));
        if let Some(seq) = oldest_seq.filter(|seq| *seq > 1) {
            if crate::audit::prune::read_anchor(audit_dir)?.is_some() {
                return coverage(audit_dir);
            }
            return Err(std::io::Error::other(format!(
                "the access log starts at record {seq} and has no `pruned.json` saying that \
                 the records before it were pruned: they are missing (a copy without it, or \
                 removed); run `wardgate audit verify` and restore it before a report"
            )));
        }
        return Ok(None);
    };
    let oldest = oldest_record(audit_dir);
    // The log must go on from where the anchor says records were pruned to (a segment an
    // interrupted prune left behind starts before it): a later start is records missing,
    // not records pruned, and the report would say nothing of what they held.
    let oldest_seq = (oldest.as_ref())
        .and_then(|(r, damaged)| r["seq"].as_u64().map(|seq| seq.saturating_sub(*damaged)));
    if let Some(seq) = oldest_seq.filter(|seq| *seq > anchor.last_pruned_seq + 1) {
        // (Read again before failing: a prune may have landed meanwhile.)
        if crate::audit::prune::read_anchor(audit_dir)?
            .is_some_and(|now| now.last_pruned_seq != anchor.last_pruned_seq)
        {
            return coverage(audit_dir);
        }
        return Err(std::io::Error::other(format!(
            "the access log starts at record {seq}, but `pruned.json` says records were pruned \
             only to record {}: records {} to {} are missing (a segment lost or removed); run \
             `wardgate audit verify` and restore them before a report",
            anchor.last_pruned_seq,
            anchor.last_pruned_seq + 1,
            seq - 1
        )));
    }
    let held_from = oldest
        .map(|(first, _)| text(&first, "ts"))
        .unwrap_or_default();
    Ok(Some(Coverage {
        pruned_records: anchor.pruned_records,
        held_from,
    }))
}

/// The oldest record the log holds, and how many damaged lines came before it in its segment:
/// the first readable line of the first segment that has one (a segment may be empty, or
/// pruned since it was listed; a line may be torn or damaged, which `wardgate audit verify`
/// reports).
fn oldest_record(audit_dir: &Path) -> Option<(Value, u64)> {
    use std::io::BufRead;
    crate::audit::segment::list_segments(audit_dir)
        .ok()?
        .into_iter()
        .find_map(|(_, path)| {
            let mut reader = std::io::BufReader::new(std::fs::File::open(path).ok()?);
            let mut line = Vec::new();
            let mut damaged = 0;
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line).ok()? == 0 || line.starts_with(b"\0") {
                    return None;
                }
                match serde_json::from_slice::<Value>(&line) {
                    Ok(record) => return Some((record, damaged)),
                    Err(_) => damaged += 1,
                }
            }
        })
}

/// The fields `subject` left with in record `r`: its own sets where the record says which set
/// each subject left with (`AuditRecord::fields_by_subject`; all of them, where the id came
/// twice), else the record's fields.
fn subjects_fields(r: &Value, subject: &str) -> Value {
    // A record without it, or with one that does not read: the record's fields, all of them.
    let by = r
        .get("fields_by_subject")
        .cloned()
        .map(serde_json::from_value);
    let Some(Ok(by)) = by else {
        return r["fields"].clone();
    };
    let by: crate::audit::FieldsBySubject = by;
    let mut own = BTreeSet::new();
    let positions = (r["subjects"].as_array().into_iter().flatten().enumerate())
        .filter(|(_, s)| *s == subject)
        .map(|(n, _)| n);
    for n in positions {
        own.extend(by.of_subject(n).iter().cloned());
    }
    Value::from(own.into_iter().collect::<Vec<_>>())
}

/// A record of the log as far as `subject` goes: `subjects` only them, `fields` what they left
/// with (`subjects_fields`), and no other person's fields.
fn own_part(mut r: Value, subject: &str) -> Value {
    let own = subjects_fields(&r, subject);
    if let Some(o) = r.as_object_mut() {
        o.remove("fields_by_subject");
        o.insert("fields".to_owned(), own);
        o.insert("subjects".to_owned(), Value::from(vec![subject]));
    }
    r
}

/// One logged access to the person's data, with `fields` read from the record's `fields`
/// (a disclosure) or its `detail.written` (a write).
fn entry(r: &Value, fields: &Value) -> Disclosure {
    Disclosure {
        ts: text(r, "ts"),
        request_id: text(r, "request_id"),
        recipient_subject: text(&r["caller"], "subject"),
        recipient_role: text(&r["caller"], "role"),
        recipient_unit: text(&r["caller"], "unit"),
        purpose: text(r, "purpose"),
        lawful_basis: text(r, "lawful_basis"),
        dataset: text(r, "dataset"),
        route: text(r, "route"),
        fields: fields
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// `Report::current_data_missing` for a dataset with no record by that id the DPO may see.
pub const NOTHING_HELD: &str = "nothing held";

/// `Report::current_data_missing` for a dataset whose datastore answered the read by id with
/// another person's record: nothing read, and nothing of that record for this report (the
/// DPO finds this person's entry, if any, by other means; the datastore needs mending).
pub const NOT_READ_ANOTHER_ID: &str =
    "not read: the datastore answered with a record under another reference";

/// A placement's time (Unix milliseconds) as the log writes times, for people to read.
fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_or_else(|_| ms.to_string(), crate::audit::AuditRecord::ts_of)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A self-contained HTML page a data protection officer can send or print. Recipients appear
/// by role and organisation unit, as §10.2 asks, never as the individual volunteer or member of
/// staff (their identity is theirs, and stays in the JSON report for the DPO's own inquiries).
pub fn html(r: &Report) -> String {
    let table = |entries: &[Disclosure]| {
        let mut rows = String::new();
        for d in entries {
            rows.push_str(&format!(
                "<tr><td>{}</td><td>{} ({})</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&d.ts),
                esc(&d.recipient_role),
                esc(&d.recipient_unit),
                esc(&d.purpose),
                esc(&d.lawful_basis),
                esc(&d.dataset),
                esc(&d.fields.join(", ")),
            ));
        }
        rows
    };
    let rows = table(&r.disclosures);
    let written = table(&r.writes);
    let list = |items: Vec<String>| {
        items
            .into_iter()
            .map(|i| format!("<li>{i}</li>"))
            .collect::<String>()
    };
    let purposes = list(
        r.purposes
            .iter()
            .map(|p| {
                format!(
                    "<b>{}</b>: {} &mdash; {} ({}){}; {} disclosure(s)",
                    esc(&p.purpose),
                    esc(&p.description),
                    esc(&p.lawful_basis),
                    esc(&p.basis_detail),
                    p.special_category_condition
                        .as_deref()
                        .map(|c| format!("; special category condition: {}", esc(c)))
                        .unwrap_or_default(),
                    p.disclosures
                )
            })
            .collect(),
    );
    let recipients = list(
        r.recipients
            .iter()
            .map(|x| {
                format!(
                    "<b>{}</b>: {}; {} disclosure(s)",
                    esc(&x.role),
                    esc(&x.description),
                    x.disclosures
                )
            })
            .collect(),
    );
    let sources = list(
        r.datasets
            .iter()
            .map(|s| {
                format!(
                    "<b>{}</b>: {}; owner: {}; source: {}",
                    esc(&s.dataset),
                    esc(&s.description),
                    esc(&s.owner),
                    esc(&s.source)
                )
            })
            .collect(),
    );
    let retention = list(
        r.retention
            .iter()
            .map(|c| {
                format!(
                    "<b>{}</b> ({}{}): kept {}",
                    esc(&c.description),
                    esc(&c.category),
                    if c.special {
                        ", special category data"
                    } else {
                        ""
                    },
                    esc(&c.retention)
                )
            })
            .collect(),
    );
    let restrictions = if r.restrictions.is_empty() {
        "<li>none</li>".to_owned()
    } else {
        list(
            r.restrictions
                .iter()
                .map(|p| {
                    format!(
                        "<b>{}</b> since {} (reference {})",
                        esc(&p.kind),
                        when(p.placed_at),
                        esc(&p.reference),
                    )
                })
                .collect(),
        )
    };
    let current = if r.current_data.is_empty() && r.current_data_missing.is_empty() {
        "<p>Not included in this report (fetch it through the admin plane).</p>".to_owned()
    } else {
        let held = r.current_data.iter().map(|(d, v)| {
            format!(
                "<h3>{}</h3><pre>{}</pre>",
                esc(d),
                esc(&serde_json::to_string_pretty(v).unwrap_or_default())
            )
        });
        let missing = r.current_data_missing.iter().map(|(d, why)| {
            let text = if why == NOTHING_HELD {
                "nothing held under this reference".to_owned()
            } else {
                format!("<b>not included in this report</b> ({})", esc(why))
            };
            format!("<h3>{}</h3><p>{text}</p>", esc(d))
        });
        held.chain(missing).collect()
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Subject access report: {subject}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}}table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #bbb;padding:.3rem .5rem;vertical-align:top;text-align:left}}th{{background:#eee}}</style>
</head><body>
<h1>Subject access report</h1>
<p>Data subject: <b>{subject}</b>. Generated {generated} from the access log (Information Governance Policy §10.2).</p>
{coverage}{unreadable}{replicas}
<h2>Disclosures ({count})</h2>
<table><thead><tr><th>When</th><th>To whom</th><th>Purpose</th><th>Lawful basis</th><th>Dataset</th><th>Fields</th></tr></thead>
<tbody>
{rows}</tbody></table>
<h2>Writes about you ({written_count})</h2>
<p>What tools sent through the gateway to be recorded about you (canvass returns, "do not knock"), each logged before the datastore received it; the datastore may have refused some.</p>
<table><thead><tr><th>When</th><th>By whom</th><th>Purpose</th><th>Lawful basis</th><th>Dataset</th><th>Fields recorded</th></tr></thead>
<tbody>
{written}</tbody></table>
<h2>Purposes and lawful bases</h2><ul>{purposes}</ul>
<h2>Recipients</h2><ul>{recipients}</ul>
<h2>Where the data came from</h2><ul>{sources}</ul>
<h2>What is held, and for how long</h2><ul>{retention}</ul>
<h2>Restrictions in force from your rights requests</h2><ul>{restrictions}</ul>
<p>Restrictions recorded on your records themselves (their flags: an objection, a restriction, a request not to be contacted) are not listed here; they show in the records under Data held now.</p>
<h2>Data held now</h2>{current}
</body></html>
"#,
        subject = esc(&r.subject),
        generated = esc(&r.generated_at),
        count = r.disclosures.len(),
        written_count = r.writes.len(),
        replicas = if r.other_replicas_not_searched {
            "<p><b>Incomplete:</b> this report searched the access log of one gateway \
             replica of several, and each keeps its own: disclosures made through the others \
             are not listed. Build it over every replica's log (<code>wardgate sar \
             --audit-dir</code>, once for each; it does not fetch the data held now, which \
             the admin plane's report gives, with its sources and retention) before sending \
             it.</p>"
        } else {
            ""
        },
        unreadable = match (r.lookup.lines_unreadable, r.lookup.lines_set_aside) {
            (0, 0) => String::new(),
            (n, 0) => format!(
                "<p><b>Incomplete:</b> {n} line(s) of the access log that may be about this \
                 person could not be read (the log is damaged: run <code>wardgate audit \
                 verify</code>); what they recorded is not listed.</p>"
            ),
            (n, m) => format!(
                "<p><b>Incomplete:</b> {n} line(s) of the access log that may be about this \
                 person could not be read, and {m} set aside by crash recovery \
                 (<code>seg-…jsonl.cut-…</code> beside the log) name them; what they recorded \
                 is not listed. Settle them (run <code>wardgate audit verify</code>) before \
                 sending this report.</p>"
            ),
        },
        coverage = r.coverage.as_ref().map_or_else(String::new, |c| {
            let held = if c.held_from.is_empty() {
                "The access log holds no records now".to_owned()
            } else {
                format!("The access log holds records from {} on", esc(&c.held_from))
            };
            format!(
                "<p>{held}: {} older records were removed under the retention policy, so \
                 anything disclosed or recorded before then is not listed.</p>",
                c.pruned_records
            )
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::encode_line;
    use crate::audit::record::tests::sample;
    use crate::audit::segment::segment_name;

    /// A page whose subjects left with different fields (a phone number with consent, none
    /// without) is reported to each with the fields that were theirs, not the page's.
    #[test]
    fn each_subject_is_told_the_fields_that_were_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::parse(crate::demo::CATALOG).unwrap();
        let mut page = sample(1);
        page.subjects = vec!["subj-a".to_owned(), "subj-b".to_owned()].into();
        page.fields = vec!["mobile".into(), "name".into(), "ward".into()];
        page.fields_by_subject = Some(crate::audit::FieldsBySubject {
            most: vec!["name".into(), "ward".into()],
            others: vec![crate::audit::OtherFields {
                fields: vec!["mobile".into(), "name".into(), "ward".into()],
                subjects: vec![0],
            }],
        });
        let mut one = sample(2);
        one.subjects = vec!["subj-b".to_owned()].into();
        let first = encode_line(1, crate::audit::record::GENESIS_HASH, &page).unwrap();
        let second = encode_line(2, &first.hash, &one).unwrap();
        let lines = [first.bytes, second.bytes].concat();
        std::fs::write(dir.path().join(segment_name(1)), lines).unwrap();
        let fields = |subject: &str| -> Vec<Vec<String>> {
            let report = build(dir.path(), &catalog, subject, Vec::new()).unwrap();
            report.disclosures.into_iter().map(|d| d.fields).collect()
        };
        assert_eq!(fields("subj-a"), [vec!["mobile", "name", "ward"]]);
        assert_eq!(
            fields("subj-b"),
            [vec!["name", "ward"], vec!["name", "ward"]]
        );
    }

    /// An export's chunk recorded and then not handed on (the caller revoked, restricted
    /// subjects, the client gone) is named by the export's closing record: the report leaves
    /// that chunk out, and only that chunk of that export.
    #[test]
    fn an_export_chunk_recorded_and_never_sent_is_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::parse(crate::demo::CATALOG).unwrap();
        let chunk = |request: &str, n: u64, subject: &str| {
            let mut r = sample(0);
            r.request_id = request.into();
            r.subjects = vec![subject.to_owned()].into();
            r.detail = Some(serde_json::json!({ "export_chunk": n }));
            r
        };
        let mut closing = sample(0);
        closing.request_id = "export-1".into();
        (closing.decision, closing.status) = (crate::audit::Decision::Error, 200);
        closing.subjects = vec!["subj-x".to_owned()].into();
        closing.detail = Some(serde_json::json!({
            "export_aborted": "rights_register_changed",
            "before": { "chunks": 1, "records": 1, "chunks_recorded": 2 },
            "chunks_not_sent": [2],
        }));
        let records = [
            chunk("export-1", 1, "subj-a"),
            chunk("export-1", 2, "subj-x"),
            closing,
            // Another export's second chunk, sent.
            chunk("export-2", 2, "subj-x"),
        ];
        let mut lines = Vec::new();
        let mut prev = crate::audit::record::GENESIS_HASH.to_owned();
        for (i, r) in records.iter().enumerate() {
            let line = encode_line(i as u64 + 1, &prev, r).unwrap();
            prev = line.hash.clone();
            lines.extend(line.bytes);
        }
        std::fs::write(dir.path().join(segment_name(1)), lines).unwrap();
        let told = |subject: &str| -> Vec<String> {
            let report = build(dir.path(), &catalog, subject, Vec::new()).unwrap();
            report
                .disclosures
                .into_iter()
                .map(|d| d.request_id)
                .collect()
        };
        assert_eq!(told("subj-x"), ["export-2"]);
        assert_eq!(told("subj-a"), ["export-1"]);
    }

    /// A log whose very first line is damaged still starts at record 1: its report is made
    /// (not refused as missing the records before), while one whose first readable record
    /// comes later than the damaged lines account for is refused.
    #[test]
    fn a_damaged_first_line_is_not_taken_for_missing_records() {
        let catalog = Catalog::parse(crate::demo::CATALOG).unwrap();
        let log = |first_seq: u64| {
            let dir = tempfile::tempdir().unwrap();
            let mut r = sample(first_seq);
            r.subjects = vec!["subj-a".to_owned()].into();
            let line = encode_line(first_seq, crate::audit::record::GENESIS_HASH, &r).unwrap();
            let text = [b"{\"seq\":1,\"torn".to_vec(), b"\n".to_vec(), line.bytes].concat();
            std::fs::write(dir.path().join(segment_name(1)), text).unwrap();
            dir
        };
        let whole = log(2);
        let report = build(whole.path(), &catalog, "subj-a", Vec::new()).unwrap();
        assert_eq!(report.disclosures.len(), 1);
        let short = log(3);
        let err = build(short.path(), &catalog, "subj-a", Vec::new())
            .err()
            .unwrap();
        assert!(err.to_string().contains("starts at record 2"), "{err}");
    }

    /// What a report keeps of each record is its person's part: not the others it names (an
    /// export chunk's thousands), nor what they left with.
    #[test]
    fn a_record_is_kept_as_far_as_its_person_goes() {
        let r = serde_json::json!({
            "ts": "t",
            "subjects": ["a", "b", "c"],
            "fields": ["x", "y"],
            "fields_by_subject": {
                "most": ["x"],
                "others": [{ "fields": ["x", "y"], "subjects": [1] }]
            }
        });
        let b = own_part(r.clone(), "b");
        assert_eq!(b["subjects"], serde_json::json!(["b"]));
        assert_eq!(b["fields"], serde_json::json!(["x", "y"]));
        assert!(b.get("fields_by_subject").is_none());
        assert_eq!(b["ts"], "t");
        assert_eq!(own_part(r, "c")["fields"], serde_json::json!(["x"]));
    }

    /// A purpose whose lawful basis the catalogue has changed since is reported under the
    /// basis each disclosure was recorded under, and a dataset since removed from the
    /// catalogue is still named.
    #[test]
    fn purposes_and_sources_are_reported_as_they_were_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::parse(crate::demo::CATALOG).unwrap();
        let mut then = sample(1);
        (then.purpose, then.lawful_basis) = (Some("canvassing".into()), Some("consent".into()));
        then.dataset = Some("old_register".into());
        let mut now = sample(2);
        now.subjects = then.subjects.clone();
        (now.purpose, now.lawful_basis) = (Some("canvassing".into()), Some("public_task".into()));
        let first = encode_line(1, crate::audit::record::GENESIS_HASH, &then).unwrap();
        let second = encode_line(2, &first.hash, &now).unwrap();
        std::fs::write(
            dir.path().join(segment_name(1)),
            [first.bytes.clone(), second.bytes.clone()].concat(),
        )
        .unwrap();
        let report = build(dir.path(), &catalog, "subj-1", Vec::new()).unwrap();
        let bases: Vec<(&str, &str, bool)> = (report.purposes.iter())
            .map(|p| {
                (
                    p.purpose.as_str(),
                    p.lawful_basis.as_str(),
                    p.basis_detail.is_empty(),
                )
            })
            .collect();
        assert_eq!(
            bases,
            [
                ("canvassing", "consent", true),
                ("canvassing", "public_task", false)
            ]
        );
        let sources: Vec<&str> = report.datasets.iter().map(|d| d.dataset.as_str()).collect();
        assert_eq!(sources, ["old_register", "voter"]);
        // Each category disclosed, and whether it is special.
        let mut opinion = now.clone();
        opinion.fields = vec!["voting_intention".into(), "ward".into()];
        let third = encode_line(3, &second.hash, &opinion).unwrap();
        std::fs::write(
            dir.path().join(segment_name(1)),
            [first.bytes, second.bytes, third.bytes].concat(),
        )
        .unwrap();
        let report = build(dir.path(), &catalog, "subj-1", Vec::new()).unwrap();
        let kept: Vec<(&str, bool)> = (report.retention.iter())
            .map(|c| (c.category.as_str(), c.special))
            .collect();
        assert_eq!(kept, [("area", false), ("political_opinion", true)]);
        assert!(html(&report).contains("(political_opinion, special category data): kept 4 years"));
    }

    /// A restriction's time reads as a time, not as milliseconds.
    #[test]
    fn restrictions_say_since_when_as_a_date() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::parse(crate::demo::CATALOG).unwrap();
        let placement = Placement {
            kind: "restricted".into(),
            reference: "R1".into(),
            placed_by: "dpo".into(),
            placed_at: 1_767_225_600_000,
            reason: "Art 18".into(),
        };
        let report = build(dir.path(), &catalog, "subj-1", vec![placement]).unwrap();
        assert!(html(&report).contains("since 2026-01-01T00:00:00.000Z"));
    }

    /// Once records have been pruned the report says from when the log holds the rest, so
    /// that "no disclosures" is not read as "never disclosed".
    #[test]
    fn after_a_prune_the_report_says_how_far_back_the_log_reaches() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::parse(crate::demo::CATALOG).unwrap();
        let mut oldest = sample(41);
        oldest.ts = "2026-01-02T03:04:05.678Z".into();
        let line = encode_line(41, &"ab".repeat(32), &oldest).unwrap();
        std::fs::write(dir.path().join(segment_name(7)), &line.bytes).unwrap();
        // A log starting at record 41 with no anchor saying the forty before were pruned is
        // missing them (a copy without `pruned.json`): no report reads it as never pruned.
        let e = build(dir.path(), &catalog, "subj-41", Vec::new())
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("pruned.json"), "{e:#}");

        let anchor = serde_json::json!({
            "last_pruned_seq": 40, "last_pruned_hash": "ab".repeat(32),
            "pruned_segments": 6, "pruned_records": 40,
        });
        std::fs::write(dir.path().join("pruned.json"), anchor.to_string()).unwrap();
        let report = build(dir.path(), &catalog, "subj-41", Vec::new()).unwrap();
        let coverage = report.coverage.as_ref().unwrap();
        assert_eq!(coverage.held_from, "2026-01-02T03:04:05.678Z");
        assert_eq!(coverage.pruned_records, 40);
        let page = html(&report);
        assert!(
            page.contains("holds records from 2026-01-02T03:04:05.678Z on: 40 older records"),
            "{page}"
        );
        // An anchor that ends before the log starts: the records between are missing (the
        // oldest segments lost after a prune), not pruned, and the report is refused.
        let short = serde_json::json!({
            "last_pruned_seq": 30, "last_pruned_hash": "ab".repeat(32),
            "pruned_segments": 5, "pruned_records": 30,
        });
        std::fs::write(dir.path().join("pruned.json"), short.to_string()).unwrap();
        let e = build(dir.path(), &catalog, "subj-41", Vec::new())
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("records 31 to 40 are missing"),
            "{e:#}"
        );
    }
}
