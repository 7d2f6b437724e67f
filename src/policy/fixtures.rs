//! The policy pack's own tests, run at start: one request per JSON file under `TESTS/allow/`
//! and `TESTS/deny/` (a caller, a purpose, an action on a dataset, and the record and field
//! category the action needs), each expected to get that decision from the policies it names.
//! Schema validation says every policy is well formed; only these say the pack still decides
//! what it is meant to. A pack that lost `restrictions.cedar`, or a forbid edited into a permit,
//! validates, and fails here: the gateway does not start on it (`startup::check`, so
//! `wardgate validate` too), naming each fixture that failed and why. `cargo test` runs the
//! shipped fixtures through the same code.
//!
//! A fixture is refused as malformed, rather than passed, where it could pass for the wrong
//! reason: a deny test that names no policy expected to deny it (a typo anywhere would be
//! denied by default), a record or category given to an action that does not read it (the
//! fixture tests something other than it says), a name the registers do not hold (dataset,
//! role, purpose, area, field category), or a flag, consent channel or marker no record can
//! carry. A deny test may use an unknown purpose, area or category on purpose, to test that
//! the pack denies it too, by saying so (`unregistered`); it must then be unknown.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::{PolicyEngine, RecordAttrs, RequestAction, Verdict, vocabulary::Vocabulary};
use crate::auth::Principal;
use crate::catalog::Catalog;
use crate::geography::Geography;

/// How many failures a refusal to start lists (it says how many more there were).
const LISTED: usize = 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    description: String,
    caller: Caller,
    purpose: String,
    action: Action,
    dataset: String,
    /// For `disclose_field` and `write_field`.
    #[serde(default)]
    category: Option<String>,
    /// For the record and field actions.
    #[serde(default)]
    record: Option<Record>,
    /// Every id here must be among the deciding policies (`default-deny` when no policy
    /// decided: none permitted and none forbade).
    #[serde(default)]
    expect_policies: Vec<String>,
    /// The names a deny test leaves out of the registers on purpose.
    #[serde(default)]
    unregistered: BTreeSet<Unregistered>,
    /// The lawful basis the request is evaluated under, where a deny test of a catalogued
    /// purpose gives one of the bases other than the catalogue's for it (the gateway always
    /// passes the catalogue's): to test that the pack refuses a request whose basis is not
    /// its purpose's.
    #[serde(default)]
    lawful_basis: Option<String>,
    /// For the request actions: the names of the filters the request narrows by (each one of
    /// the dataset's catalogued `filters`), as `context.filters` gives them.
    #[serde(default)]
    filters: Vec<String>,
}

impl Unregistered {
    /// As a fixture writes it.
    fn name(self) -> &'static str {
        match self {
            Unregistered::Purpose => "purpose",
            Unregistered::CallerAreas => "caller.areas",
            Unregistered::RecordArea => "record.area",
            Unregistered::Category => "category",
        }
    }
}

/// A name a deny test may leave unknown on purpose.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Unregistered {
    /// `purpose` or one of `caller.purposes`.
    #[serde(rename = "purpose")]
    Purpose,
    /// One of `caller.areas`.
    #[serde(rename = "caller.areas")]
    CallerAreas,
    /// `record.area` (a record's area is read from its own fields, never checked against the
    /// register: an unknown district does occur).
    #[serde(rename = "record.area")]
    RecordArea,
    /// `category`.
    #[serde(rename = "category")]
    Category,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Caller {
    role: String,
    #[serde(default = "default_unit")]
    unit: String,
    areas: Vec<String>,
    purposes: Vec<String>,
}

fn default_unit() -> String {
    "TEST-UNIT".to_owned()
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Action {
    List,
    Read,
    Write,
    Export,
    Aggregate,
    DiscloseRecord,
    WriteRecord,
    DiscloseField,
    WriteField,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    area: String,
    #[serde(default)]
    markers: BTreeSet<String>,
    #[serde(default)]
    flags: BTreeSet<String>,
    #[serde(default)]
    consented: BTreeSet<String>,
    #[serde(default)]
    tps_fresh: bool,
}

/// The registers a fixture's names are checked against.
pub struct Registers<'a> {
    pub catalog: &'a Catalog,
    pub geography: &'a Geography,
}

/// The fixture files of one kind (`allow` or `deny`) under `dir`, sorted; none when the
/// directory is absent.
pub fn files(dir: &Path, kind: &str) -> anyhow::Result<Vec<PathBuf>> {
    let dir = dir.join(kind);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading `{}`", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading `{}`", dir.display()))?
            .path();
        // A hidden entry is a tool's (`.gitkeep`, an editor's swap file, a ConfigMap's
        // `..data`); anything else is a test that would silently not run (`x.JSON`, a folder).
        if path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
        {
            continue;
        }
        if !(path.is_file() && path.extension().is_some_and(|e| e == "json")) {
            bail!(
                "`{}` is not a policy test (`*.json`): move it out of `{}`",
                path.display(),
                dir.display()
            );
        }
        out.push(path);
    }
    out.sort();
    Ok(out)
}

/// What one fixture got: the verdict, and the policies it expected among the deciding ones
/// that were not.
pub struct Outcome {
    pub verdict: Verdict,
    pub missing: Vec<String>,
    /// The policies the fixture names (`expect_policies`) that decided it: what it tests.
    pub tested: Vec<String>,
    /// Evaluation raised an error the fixture did not expect: its decision says nothing of
    /// what the pack decides.
    pub unexpected_error: bool,
    /// What the fixture says it tests, for the failure's message.
    pub description: String,
}

/// Runs one fixture, `kind` being `allow` or `deny`: what it got, or why the fixture itself is
/// malformed (unreadable, not a fixture, or one that could pass for the wrong reason).
/// Whether the verdict is the one expected is the caller's to say (`run_all`).
pub fn run(
    engine: &PolicyEngine,
    registers: &Registers,
    path: &Path,
    kind: &str,
) -> Result<Outcome, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let f: Fixture = serde_json::from_str(&text).map_err(|e| format!("malformed: {e}"))?;
    well_formed(&f, registers, kind)?;
    // An unknown purpose has no lawful basis: the pack must deny it all the same.
    let basis = match &f.lawful_basis {
        Some(basis) => basis.clone(),
        None => (registers.catalog.purposes.get(&f.purpose))
            .map(|p| p.lawful_basis.clone())
            .unwrap_or_default(),
    };
    let principal = Principal {
        subject: "policy-test".into(),
        token_id: "policy-test".into(),
        role: f.caller.role,
        unit: f.caller.unit,
        areas: f.caller.areas,
        purposes: f.caller.purposes,
        expires_at: i64::MAX,
        issued_at: 0,
        grant_expires_at: None,
        key_id: String::new(),
        key_sha256: String::new(),
    };
    let ask = engine.ask(Arc::new(principal), &f.purpose, &basis);
    // An evaluation error the fixture expects is its outcome, not the gateway's to log; one
    // it does not expect is logged, with what failed, beside the failure (`run_all`).
    let ask = if f.expect_policies.iter().any(|p| p == super::POLICY_ERROR) {
        ask.unlogged()
    } else {
        ask
    };
    let record = f.record.map(|r| RecordAttrs {
        area: r.area,
        markers: r.markers,
        flags: r.flags,
        consented: r.consented,
        tps_fresh: r.tps_fresh,
    });
    let record = || record.as_ref().ok_or("this action needs a `record`");
    let request = |action| engine.decide_request(&ask, action, &f.dataset, &f.filters);
    let verdict = match f.action {
        Action::List => request(RequestAction::List),
        Action::Read => request(RequestAction::Read),
        Action::Write => request(RequestAction::Write),
        Action::Export => request(RequestAction::Export),
        Action::Aggregate => request(RequestAction::Aggregate),
        Action::DiscloseRecord => engine.decide_record(&ask, &f.dataset, record()?, false),
        Action::WriteRecord => engine.decide_record(&ask, &f.dataset, record()?, true),
        a @ (Action::DiscloseField | Action::WriteField) => {
            let category = (f.category.as_deref()).ok_or("a field action needs a `category`")?;
            let write = matches!(a, Action::WriteField);
            engine.decide_field(&ask, &f.dataset, record()?, category, write)
        }
    };
    let missing: Vec<String> = (f.expect_policies.iter())
        .filter(|id| !verdict.policy_ids.contains(id))
        .cloned()
        .collect();
    // An evaluation error denies, and says nothing of what the pack decides: unless the
    // fixture expects one, it is a failure whatever the kind.
    let error = super::POLICY_ERROR.to_owned();
    let errored = verdict.policy_ids.contains(&error);
    let unexpected_error = errored && !f.expect_policies.contains(&error);
    // An evaluation that raised an error tests no policy, whatever else it found satisfied.
    let tested = match errored {
        true => Vec::new(),
        false => (f.expect_policies.iter())
            .filter(|id| verdict.policy_ids.contains(id))
            .cloned()
            .collect(),
    };
    Ok(Outcome {
        verdict,
        missing,
        tested,
        unexpected_error,
        description: f.description,
    })
}

/// Refuses a fixture that could pass for the wrong reason (the module's doc says which).
fn well_formed(f: &Fixture, r: &Registers, kind: &str) -> Result<(), String> {
    if kind == "deny" && f.expect_policies.is_empty() {
        return Err("a deny test must name the policies expected to deny it \
                    (`expect_policies`; `default-deny` when no policy decides it)"
            .to_owned());
    }
    let (needs_record, needs_category) = match f.action {
        Action::List | Action::Read | Action::Write | Action::Export | Action::Aggregate => {
            (false, false)
        }
        Action::DiscloseRecord | Action::WriteRecord => (true, false),
        Action::DiscloseField | Action::WriteField => (true, true),
    };
    if f.record.is_some() && !needs_record {
        return Err("this action reads no `record`".to_owned());
    }
    if f.category.is_some() && !needs_category {
        return Err("this action reads no `category`".to_owned());
    }
    let Some(dataset) = r.catalog.datasets.get(&f.dataset) else {
        return Err(format!("unknown dataset `{}`", f.dataset));
    };
    if !f.filters.is_empty() && (needs_record || needs_category) {
        return Err("only a request action (list, read, ...) takes `filters`".to_owned());
    }
    if let Some(unknown) = f.filters.iter().find(|n| !dataset.filters.contains(n)) {
        return Err(format!(
            "`filters`: `{unknown}` is not one of the `{}` dataset's filters ({})",
            f.dataset,
            dataset.filters.join(", ")
        ));
    }
    if !r.catalog.roles.contains_key(&f.caller.role) {
        return Err(format!("`caller.role`: unknown role `{}`", f.caller.role));
    }
    if kind != "deny" && !f.unregistered.is_empty() {
        return Err("only a deny test may use `unregistered` names".to_owned());
    }
    if let Some(basis) = &f.lawful_basis {
        if kind != "deny" {
            return Err(
                "only a deny test may give a `lawful_basis` (the gateway always \
                        passes the catalogue's)"
                    .to_owned(),
            );
        }
        if !crate::catalog::LAWFUL_BASES.contains(&basis.as_str()) {
            return Err(format!(
                "`lawful_basis`: `{basis}` is not one of {:?}",
                crate::catalog::LAWFUL_BASES
            ));
        }
        let Some(catalogued) = r.catalog.purposes.get(&f.purpose) else {
            return Err(format!(
                "`lawful_basis` is only for a catalogued purpose; `{}` is not in the catalogue",
                f.purpose
            ));
        };
        if &catalogued.lawful_basis == basis {
            return Err(format!(
                "`lawful_basis`: `{basis}` is the catalogue's own for `{}`, which changes \
                 nothing: give another of the bases, or none",
                f.purpose
            ));
        }
    }
    // Each name that may be unregistered: the values the registers lack, with where each is.
    let purpose = |p: &&String| !r.catalog.purposes.contains_key(*p);
    let area = |a: &&String| !r.geography.contains(a);
    let names: [(Unregistered, Vec<(&str, &String)>); 4] = [
        (
            Unregistered::Purpose,
            (std::iter::once(&f.purpose)
                .filter(purpose)
                .map(|p| ("purpose", p)))
            .chain((f.caller.purposes.iter().filter(purpose)).map(|p| ("caller.purposes", p)))
            .collect(),
        ),
        (
            Unregistered::CallerAreas,
            (f.caller.areas.iter().filter(area))
                .map(|a| ("caller.areas", a))
                .collect(),
        ),
        (
            Unregistered::RecordArea,
            (f.record.iter().map(|rec| &rec.area).filter(area))
                .map(|a| ("record.area", a))
                .collect(),
        ),
        (
            Unregistered::Category,
            (f.category.iter())
                .filter(|c| !r.catalog.categories.contains_key(*c))
                .map(|c| ("category", c))
                .collect(),
        ),
    ];
    for (which, unknown) in names {
        let distinct: BTreeSet<&String> = unknown.iter().map(|(_, v)| *v).collect();
        let declared = f.unregistered.contains(&which);
        match unknown.first() {
            // Declared: exactly one unknown name (which may stand in two places, a purpose
            // asked for and granted), so that a typo beside it still fails.
            Some(_) if declared && distinct.len() == 1 => {}
            Some((field, v)) if !declared => {
                return Err(format!(
                    "`{field}`: `{v}` is not in the registers (a deny test that means it says \
                     so: `\"unregistered\": [\"{}\"]`)",
                    which.name()
                ));
            }
            Some(_) => {
                let all: Vec<&str> = distinct.iter().map(|v| v.as_str()).collect();
                return Err(format!(
                    "`unregistered` names `{}` for one unknown name, but `{}` are all unknown",
                    which.name(),
                    all.join("`, `")
                ));
            }
            None if declared => {
                return Err(format!(
                    "`unregistered` names `{}`, but the registers hold all it gives",
                    which.name()
                ));
            }
            None => {}
        }
    }
    let Some(rec) = &f.record else {
        return Ok(());
    };
    if let Some(flag) = rec.flags.iter().find(|x| !dataset.known_flags.contains(*x)) {
        return Err(format!(
            "`record.flags`: `{flag}` is not a flag a record can carry"
        ));
    }
    let channels = Vocabulary::new(r.catalog);
    if let Some(why) = channels.refuse_words(&rec.markers, &rec.consented) {
        return Err(why);
    }
    Ok(())
}

/// Runs every fixture under `dir` and returns how many passed, all of them, or refuses: the
/// directory lacks its allow or deny tests, or any fixture failed (each listed with its file
/// and why).
pub fn run_all(engine: &PolicyEngine, registers: &Registers, dir: &Path) -> anyhow::Result<usize> {
    let mut failures = Vec::new();
    let mut count = 0;
    // The policies that decided a test that passed.
    let mut deciding = BTreeSet::new();
    for (kind, want) in [("allow", true), ("deny", false)] {
        let paths = files(dir, kind)?;
        if paths.is_empty() {
            // A pack tested only for what it lets through is not tested for what it must not.
            bail!(
                "the policy tests `{}` hold no `{kind}/*.json`: both what the pack allows and \
                 what it denies must be tested",
                dir.display()
            );
        }
        for path in paths {
            count += 1;
            let shown = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            // The policy engine's own log lines (an unexpected evaluation error) name the test.
            let _span = tracing::error_span!("policy_test", file = %shown).entered();
            match run(engine, registers, &path, kind) {
                Ok(o) if o.verdict.allowed != want => failures.push(format!(
                    "{shown}: expected {kind}, got {} by {:?} ({})",
                    if o.verdict.allowed { "allow" } else { "deny" },
                    o.verdict.policy_ids,
                    o.description
                )),
                Ok(o) if o.unexpected_error => failures.push(format!(
                    "{shown}: evaluating the policies raised an error (`{}`, logged above), \
                     which denies but tests nothing ({})",
                    super::POLICY_ERROR,
                    o.description
                )),
                Ok(o) if !o.missing.is_empty() => failures.push(format!(
                    "{shown}: {kind} as expected, but by {:?}, expected among them: {} ({})",
                    o.verdict.policy_ids,
                    o.missing.join(", "),
                    o.description
                )),
                // Only what the test names counts as tested: a forbid that fired beside the
                // one it names could be deleted and the test would still pass.
                Ok(o) => deciding.extend(o.tested),
                Err(e) => failures.push(format!("{shown}: {e}")),
            }
        }
    }
    if !failures.is_empty() {
        let more = failures.len().saturating_sub(LISTED);
        let mut listed = failures[..failures.len().min(LISTED)].join("\n  ");
        if more > 0 {
            listed.push_str(&format!("\n  and {more} more"));
        }
        bail!(
            "{} of {count} policy tests in `{}` failed: the pack does not decide what its tests \
             say it must\n  {listed}",
            failures.len(),
            dir.display()
        );
    }
    untested(engine, &deciding, dir)?;
    Ok(count)
}

/// Refuses a pack with a policy that no passing test names among the policies that decided
/// it (`expect_policies`): such a policy could be edited, weakened or deleted and every test
/// would still pass (a forbid added without a fixture, one that only ever fires beside the
/// forbid a test names, or one whose fixtures another policy now decides).
fn untested(engine: &PolicyEngine, deciding: &BTreeSet<String>, dir: &Path) -> anyhow::Result<()> {
    let untested: Vec<String> = engine
        .policy_origins()
        .filter(|(id, _)| !deciding.contains(*id))
        .map(|(id, file)| format!("`{id}` ({})", file.display()))
        .collect();
    if untested.is_empty() {
        return Ok(());
    }
    let more = untested.len().saturating_sub(LISTED);
    let mut listed = untested[..untested.len().min(LISTED)].join("\n  ");
    if more > 0 {
        listed.push_str(&format!("\n  and {more} more"));
    }
    bail!(
        "{} of {} policies are tested by none of the policy tests in `{}` (no passing test \
         names it in `expect_policies`): a change to such a policy would pass every test. \
         Add a fixture under `allow/` or `deny/` that each decides, and name it there\n  \
         {listed}",
        untested.len(),
        engine.policy_count(),
        dir.display()
    )
}
