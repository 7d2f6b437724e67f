//! Cedar: load and validate the policy pack at start, then answer decisions on the request path.
//!
//! At start every `policies/*.cedar` file is parsed, every policy must carry a unique `@id`
//! (that id, not Cedar's generated one, is what 403 bodies and audit records name), and the
//! whole set is validated in strict mode against `policies/*.cedarschema`. Any failure stops
//! the gateway with `file:line:col` and the problem. Then the ids and words policies name are
//! checked against the registers (entities here, strings in `vocabulary`): a failure names
//! the file and the policy. On the request path a decision is allowed
//! only if Cedar says Allow *and* evaluation raised no error: an erroring `forbid` is skipped by
//! Cedar, and skipping a forbid must never let data out. This module decides; it does not know
//! about HTTP, records on the wire or the audit log.

pub mod fixtures;
mod scope;
mod vocabulary;
pub use vocabulary::{is_marker, may_be_anonymous};

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use anyhow::{Context as _, bail};
use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::catalog::Catalog;
use crate::geography::Geography;

/// Reported when nothing permitted a request (Cedar's default deny has no policy id).
pub const DEFAULT_DENY: &str = "default-deny";

/// What the log says of a policy request the schema refused (Cedar's own message prints the
/// request's context, a record's attributes, and is not logged): the pack's schema and the
/// context the gateway builds disagree, which the pack's tests (`policies/tests/`) show.
const CONTEXT_REFUSED: &str = "policy request could not be built: the pack's schema refuses \
     the context the gateway builds (`wardgate validate` runs the pack's tests, which show where)";

/// Reported when evaluating a policy raised an error, which denies.
pub const POLICY_ERROR: &str = "policy-error";

/// The request-level actions, one per kind of route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestAction {
    List,
    Read,
    Write,
    Export,
    /// Counts per group over every matching record; no record leaves (`aggregate.rs`).
    Aggregate,
}

impl RequestAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestAction::List => "list",
            RequestAction::Read => "read",
            RequestAction::Write => "write",
            RequestAction::Export => "export",
            RequestAction::Aggregate => "aggregate",
        }
    }
}

/// A decision and the ids of the policies that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub policy_ids: Vec<String>,
}

/// The policy-relevant attributes of one record, after merging the rights register.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordAttrs {
    pub area: String,
    pub markers: BTreeSet<String>,
    pub flags: BTreeSet<String>,
    pub consented: BTreeSet<String>,
    pub tps_fresh: bool,
}

impl RecordAttrs {
    /// An entry DOMAIN.md says is never disclosed in any form: an anonymous elector (marker
    /// `N`) or an under-16 (flag `under_16`). The policies forbid them (`markers.cedar`); this
    /// names them for what is not a decision: why a read was refused (breach detection) and
    /// whether a datastore sent one it was asked to leave out.
    pub fn never_disclosed(&self) -> bool {
        self.markers.contains("N") || self.flags.contains("under_16")
    }
}

/// Who is asking and why, for every decision of one request. The Cedar side of it (the
/// context's caller and purpose, built as Cedar expressions directly: parsing a JSON context
/// was most of a decision's cost) is built on the first decision that needs it, and most
/// requests need none: their request and record decisions are all memoised (`decisions`),
/// and building and dropping those expressions on every request was 2.5% of a 100-record
/// request's CPU.
pub struct Ask {
    principal: Arc<Principal>,
    purpose: String,
    lawful_basis: String,
    cedar: OnceLock<Result<CedarAsk, String>>,
    /// Whether an evaluation error is logged (`unlogged`).
    logged: bool,
}

/// The Cedar expressions of an `Ask`.
struct CedarAsk {
    caller: RestrictedExpression,
    purpose: RestrictedExpression,
    user: EntityUid,
}

/// The loaded, validated policy pack and the static entities it reasons over.
pub struct PolicyEngine {
    schema: Schema,
    policies: PolicySet,
    /// The same policies split by the action and resource they can apply to.
    scoped: scope::Scoped,
    /// What the field policies read of a record: `[disclose_field, write_field]`.
    field_reads: [scope::RecordReads; 2],
    entities: Entities,
    authorizer: Authorizer,
    /// Each policy's id and the file it came from, in load order (for the start's own checks).
    origins: Vec<(String, PathBuf)>,
    /// Special categories (`special` in the catalogue), and the purposes the catalogue gives
    /// no Art 9 condition (`special_category_condition`): under those, no special category
    /// is disclosed or written, whatever the policies say (`ART9_MISSING`).
    special: HashSet<String>,
    no_art9_condition: HashSet<String>,
}

/// The id a field refused for want of an Art 9 condition is recorded under: not a policy of
/// the pack, but the gateway's own rule (UK GDPR Art 9(1): special category data is processed
/// only under a condition of Art 9(2), which the catalogue names per purpose).
pub const ART9_MISSING: &str = "wardgate.no-art9-condition";

impl PolicyEngine {
    /// Loads `dir/*.cedarschema` and `dir/*.cedar`; refuses to start on any problem.
    pub fn load(
        dir: &Path,
        catalog: &Catalog,
        geography: &Geography,
    ) -> anyhow::Result<PolicyEngine> {
        let schema = load_schema(dir)?;
        let files = cedar_files(dir, "cedar")?;
        if files.is_empty() {
            bail!("no `*.cedar` policy files in `{}`", dir.display());
        }
        let mut policies = PolicySet::new();
        let mut sources = Sources::default();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read policy file `{}`", file.display()))?;
            let ids = add_file(&mut policies, file, &text)?;
            (sources.origins).extend(ids.into_iter().map(|id| (id, file.clone())));
            sources.files.push((file.clone(), text));
        }
        validate(&schema, &policies, &sources)?;
        let entities = static_entities(catalog, geography, &schema)?;
        names_known(&policies, &entities, &sources)?;
        vocabulary::literals_known(&policies, &vocabulary::Vocabulary::new(catalog), &sources)?;
        let scoped = scope::Scoped::build(&policies, schema.actions(), &entities)?;
        let reads = |action| -> anyhow::Result<scope::RecordReads> {
            scope::RecordReads::of(&policies, &uid("Wardgate::Action", action)?, &entities)
        };
        let field_reads = [reads("disclose_field")?, reads("write_field")?];
        Ok(PolicyEngine {
            schema,
            policies,
            scoped,
            field_reads,
            entities,
            authorizer: Authorizer::new(),
            origins: sources.origins,
            special: (catalog.categories.iter())
                .filter(|(_, c)| c.special)
                .map(|(name, _)| name.clone())
                .collect(),
            no_art9_condition: (catalog.purposes.iter())
                .filter(|(_, p)| {
                    (p.special_category_condition.as_deref()).is_none_or(|c| c.trim().is_empty())
                })
                .map(|(name, _)| name.clone())
                .collect(),
        })
    }

    /// Whether `category` is special and `ask`'s purpose has no Art 9 condition: refused
    /// before any policy is asked.
    fn without_art9(&self, ask: &Ask, category: &str) -> bool {
        self.special.contains(category) && self.no_art9_condition.contains(&ask.purpose)
    }

    pub fn policy_count(&self) -> usize {
        self.policies.policies().count()
    }

    /// Each policy's id and the file it was read from.
    pub(crate) fn policy_origins(&self) -> impl Iterator<Item = (&str, &Path)> {
        (self.origins.iter()).map(|(id, file)| (id.as_str(), file.as_path()))
    }

    /// Who is asking and why: the per-request part of every context (built on first use).
    pub fn ask(&self, principal: Arc<Principal>, purpose: &str, lawful_basis: &str) -> Ask {
        Ask {
            principal,
            purpose: purpose.to_owned(),
            lawful_basis: lawful_basis.to_owned(),
            cedar: OnceLock::new(),
            logged: true,
        }
    }

    /// May this request happen at all, narrowed by the filters named `filters`?
    pub fn decide_request(
        &self,
        ask: &Ask,
        action: RequestAction,
        dataset: &str,
        filters: &[String],
    ) -> Verdict {
        self.decide(ask, || {
            let resource = uid("Wardgate::Dataset", dataset)?;
            let filters = RestrictedExpression::new_set(
                filters
                    .iter()
                    .map(|f| RestrictedExpression::new_string(f.clone())),
            );
            let context = ask.context([("filters", filters)])?;
            self.authorize(
                ask,
                uid("Wardgate::Action", action.as_str())?,
                resource,
                context,
            )
        })
    }

    /// May this record leave (or, with `write`, be written)?
    pub fn decide_record(
        &self,
        ask: &Ask,
        dataset: &str,
        record: &RecordAttrs,
        write: bool,
    ) -> Verdict {
        let action = if write {
            "write_record"
        } else {
            "disclose_record"
        };
        self.decide(ask, || {
            let resource = uid("Wardgate::Dataset", dataset)?;
            let context = ask.context([("record", record_expr(record)?)])?;
            self.authorize(ask, uid("Wardgate::Action", action)?, resource, context)
        })
    }

    /// May this record disclose (or, with `write`, have written) this field category? With
    /// the deciding policies, for the policy tests; the request path asks for all categories
    /// at once with `allowed_categories`. A special category under a purpose without an Art 9
    /// condition never may (`ART9_MISSING`).
    pub fn decide_field(
        &self,
        ask: &Ask,
        dataset: &str,
        record: &RecordAttrs,
        category: &str,
        write: bool,
    ) -> Verdict {
        if self.without_art9(ask, category) {
            return Verdict {
                allowed: false,
                policy_ids: vec![ART9_MISSING.to_owned()],
            };
        }
        self.decide(ask, || {
            let (action, context) = self.field_request(ask, dataset, record, write)?;
            self.authorize(
                ask,
                action,
                uid("Wardgate::FieldCategory", category)?,
                context,
            )
        })
    }

    /// Which of `categories` may this record disclose (or, with `write`, have written)? None
    /// that is special under a purpose without an Art 9 condition.
    pub fn allowed_categories<'a>(
        &self,
        ask: &Ask,
        dataset: &str,
        record: &RecordAttrs,
        categories: impl IntoIterator<Item = &'a String>,
        write: bool,
    ) -> HashSet<String> {
        // One context for every category, checked against the schema once.
        let (action, context) =
            match self
                .field_request(ask, dataset, record, write)
                .and_then(|(action, context)| {
                    context.validate(&self.schema, &action)?;
                    Ok((action, context))
                }) {
                Ok(p) => p,
                Err(_) => {
                    // No field leaves on a request the schema rejects (fail closed). Cedar's
                    // message would print the context, a record's attributes: not logged.
                    if ask.logged {
                        tracing::error!("{CONTEXT_REFUSED}: field policies; denying");
                    }
                    return HashSet::new();
                }
            };
        categories
            .into_iter()
            .filter(|cat| !self.without_art9(ask, cat))
            .filter(|cat| {
                let verdict = uid("Wardgate::FieldCategory", cat).and_then(|resource| {
                    self.authorize_checked(ask, action.clone(), resource, context.clone(), None)
                });
                match verdict {
                    Ok(v) => v.allowed,
                    Err(_) => {
                        if ask.logged {
                            tracing::error!("{CONTEXT_REFUSED}: field category; denying");
                        }
                        false
                    }
                }
            })
            .cloned()
            .collect()
    }

    /// The part of a record's attributes that field policies read (the rest emptied): records
    /// with the same projection get the same field decisions from `allowed_categories`.
    pub fn field_projection(&self, record: &RecordAttrs, write: bool) -> RecordAttrs {
        let reads = &self.field_reads[usize::from(write)];
        fn kept<T: Clone + Default>(read: bool, value: &T) -> T {
            if read { value.clone() } else { T::default() }
        }
        RecordAttrs {
            area: kept(reads.reads("area"), &record.area),
            markers: kept(reads.reads("markers"), &record.markers),
            flags: kept(reads.reads("flags"), &record.flags),
            consented: kept(reads.reads("consented"), &record.consented),
            tps_fresh: reads.reads("tps_fresh") && record.tps_fresh,
        }
    }

    fn field_request(
        &self,
        ask: &Ask,
        dataset: &str,
        record: &RecordAttrs,
        write: bool,
    ) -> anyhow::Result<(EntityUid, Context)> {
        let action = if write {
            "write_field"
        } else {
            "disclose_field"
        };
        let context = ask.context([
            (
                "dataset",
                RestrictedExpression::new_entity_uid(uid("Wardgate::Dataset", dataset)?),
            ),
            ("record", record_expr(record)?),
        ])?;
        Ok((uid("Wardgate::Action", action)?, context))
    }

    /// Runs a decision; a request that cannot be built denies (logged without Cedar's message,
    /// which prints the request's context: a record's area, markers and flags).
    fn decide(&self, ask: &Ask, decision: impl FnOnce() -> anyhow::Result<Verdict>) -> Verdict {
        match decision() {
            Ok(v) => v,
            Err(_) => {
                // A request the schema rejects is a bug or an attack; either way, deny.
                if ask.logged {
                    tracing::error!("{CONTEXT_REFUSED}; denying");
                }
                Verdict {
                    allowed: false,
                    policy_ids: vec![POLICY_ERROR.to_owned()],
                }
            }
        }
    }

    /// One Cedar decision on a request checked against the schema; any evaluation error denies.
    fn authorize(
        &self,
        ask: &Ask,
        action: EntityUid,
        resource: EntityUid,
        context: Context,
    ) -> anyhow::Result<Verdict> {
        self.authorize_checked(ask, action, resource, context, Some(&self.schema))
    }

    /// One Cedar decision; `schema: None` only for a context already checked against it.
    fn authorize_checked(
        &self,
        ask: &Ask,
        action: EntityUid,
        resource: EntityUid,
        context: Context,
        schema: Option<&Schema>,
    ) -> anyhow::Result<Verdict> {
        let policies = self
            .scoped
            .get(&action, &resource)
            .unwrap_or(&self.policies);
        let request = Request::new(ask.user()?, action, resource, context, schema)?;
        let response = self
            .authorizer
            .is_authorized(&request, policies, &self.entities);
        let mut policy_ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        if !errors.is_empty() {
            if ask.logged {
                tracing::error!(?errors, "policy evaluation error; denying");
            }
            policy_ids.push(POLICY_ERROR.to_owned());
            return Ok(Verdict {
                allowed: false,
                policy_ids,
            });
        }
        let allowed = response.decision() == CedarDecision::Allow;
        if !allowed && policy_ids.is_empty() {
            policy_ids.push(DEFAULT_DENY.to_owned());
        }
        policy_ids.sort();
        Ok(Verdict {
            allowed,
            policy_ids,
        })
    }
}

impl Ask {
    /// The same ask, its evaluation errors not logged: for the pack's own tests at start
    /// (`fixtures`), where one may be the outcome a test expects, and a failing test is
    /// reported as such.
    pub fn unlogged(mut self) -> Ask {
        self.logged = false;
        self
    }

    /// The Cedar side, built the first time a decision needs it. A failure to build it is
    /// kept and denies every decision of the request that needs it (`PolicyEngine::decide`).
    fn cedar(&self) -> anyhow::Result<&CedarAsk> {
        self.cedar
            .get_or_init(|| {
                CedarAsk::new(&self.principal, &self.purpose).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Whether the Cedar side has been built (for tests of the memoised path).
    #[cfg(test)]
    pub(crate) fn is_built(&self) -> bool {
        self.cedar.get().is_some()
    }

    /// The principal the decisions are about.
    fn user(&self) -> anyhow::Result<EntityUid> {
        Ok(self.cedar()?.user.clone())
    }

    /// The context every action shares (caller, purpose, lawful basis) plus `extra`.
    fn context<const N: usize>(
        &self,
        extra: [(&str, RestrictedExpression); N],
    ) -> anyhow::Result<Context> {
        let cedar = self.cedar()?;
        let shared = [
            ("caller", cedar.caller.clone()),
            ("purpose", cedar.purpose.clone()),
            (
                "lawful_basis",
                RestrictedExpression::new_string(self.lawful_basis.clone()),
            ),
        ];
        Ok(Context::from_pairs(
            shared
                .into_iter()
                .chain(extra)
                .map(|(k, v)| (k.to_owned(), v)),
        )?)
    }
}

impl CedarAsk {
    /// The caller as Cedar sees them (role, unit, grants, purposes), the purpose and the user.
    fn new(principal: &Principal, purpose: &str) -> anyhow::Result<CedarAsk> {
        let entities = |t: &str, ids: &[String]| -> anyhow::Result<RestrictedExpression> {
            let uids = ids
                .iter()
                .map(|id| Ok(RestrictedExpression::new_entity_uid(uid(t, id)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(RestrictedExpression::new_set(uids))
        };
        let caller = RestrictedExpression::new_record([
            (
                "role".to_owned(),
                RestrictedExpression::new_string(principal.role.clone()),
            ),
            (
                "unit".to_owned(),
                RestrictedExpression::new_string(principal.unit.clone()),
            ),
            (
                "grants".to_owned(),
                entities("Wardgate::Area", &principal.areas)?,
            ),
            (
                "purposes".to_owned(),
                entities("Wardgate::Purpose", &principal.purposes)?,
            ),
        ])?;
        Ok(CedarAsk {
            caller,
            purpose: RestrictedExpression::new_entity_uid(uid("Wardgate::Purpose", purpose)?),
            user: uid("Wardgate::User", &principal.subject)?,
        })
    }
}

/// An entity of type `t`. Each type name is parsed once per thread: Cedar parses a name with
/// its whole grammar, and the same handful were parsed again on every request (3% of a
/// 10-record request's instructions). Callers name types by literals, so the map stays small.
fn uid(t: &str, id: &str) -> anyhow::Result<EntityUid> {
    thread_local! {
        static TYPES: RefCell<HashMap<String, EntityTypeName>> = RefCell::new(HashMap::new());
    }
    let t = TYPES.with_borrow_mut(|types| -> anyhow::Result<EntityTypeName> {
        if let Some(known) = types.get(t) {
            return Ok(known.clone());
        }
        let parsed = EntityTypeName::from_str(t)?;
        types.insert(t.to_owned(), parsed.clone());
        Ok(parsed)
    })?;
    Ok(EntityUid::from_type_name_and_id(
        t,
        cedar_policy::EntityId::new(id),
    ))
}

fn record_expr(r: &RecordAttrs) -> anyhow::Result<RestrictedExpression> {
    let strings = |set: &BTreeSet<String>| {
        RestrictedExpression::new_set(set.iter().cloned().map(RestrictedExpression::new_string))
    };
    Ok(RestrictedExpression::new_record([
        (
            "area".to_owned(),
            RestrictedExpression::new_entity_uid(uid("Wardgate::Area", &r.area)?),
        ),
        ("markers".to_owned(), strings(&r.markers)),
        ("flags".to_owned(), strings(&r.flags)),
        ("consented".to_owned(), strings(&r.consented)),
        (
            "tps_fresh".to_owned(),
            RestrictedExpression::new_bool(r.tps_fresh),
        ),
    ])?)
}

/// Every file `PolicyEngine::load` reads from `dir`: its schema and policies, sorted.
pub fn pack_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = cedar_files(dir, "cedarschema")?;
    files.extend(cedar_files(dir, "cedar")?);
    Ok(files)
}

fn cedar_files(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read policy directory `{}`", dir.display()))?;
    let mut files = Vec::new();
    for entry in rd {
        let path = entry
            .with_context(|| format!("cannot list `{}`", dir.display()))?
            .path();
        let Some(found) = path.extension() else {
            continue;
        };
        if !found.eq_ignore_ascii_case(ext) {
            continue;
        }
        // An editor's lock (Emacs's `.#x.cedar`, a link to nothing) is passed over; any other
        // hidden entry named like a pack file is refused below with the rest, not passed
        // over: a `forbid` in it would be left out in silence.
        let name = path.file_name().map(std::ffi::OsStr::as_encoded_bytes);
        let hidden = name.is_some_and(|n| n.starts_with(b"."));
        if name.is_some_and(|n| n.starts_with(b".#")) && path.is_symlink() && !path.exists() {
            continue;
        }
        // Anything else named like a pack file would be left out in silence: a policy in
        // `x.Cedar`, a link to a file a half-rolled release has not put in place yet.
        if found != ext || !path.is_file() || hidden {
            bail!(
                "`{}` is named like a policy pack file but is not one (`*.{ext}`, a regular \
                 file): rename, restore or remove it",
                path.display()
            );
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

fn load_schema(dir: &Path) -> anyhow::Result<Schema> {
    let files = cedar_files(dir, "cedarschema")?;
    let [file] = files.as_slice() else {
        bail!(
            "expected exactly one `*.cedarschema` file in `{}`, found {}",
            dir.display(),
            files.len()
        );
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read schema `{}`", file.display()))?;
    let (schema, warnings) = Schema::from_cedarschema_str(&text)
        .map_err(|e| anyhow::anyhow!("{}", locate(file, &text, &e)))?;
    for w in warnings {
        tracing::warn!(file = %file.display(), "schema warning: {w}");
    }
    Ok(schema)
}

/// Parses one file and adds its policies to `set`, each under its `@id`: the ids, in the
/// file's order. The gateway's own names for a decision no policy made (`default-deny`,
/// `policy-error`) are refused as ids: a policy under one would pass for them, in the audit
/// log and in the policy tests.
fn add_file(set: &mut PolicySet, file: &Path, text: &str) -> anyhow::Result<Vec<String>> {
    let parsed =
        PolicySet::from_str(text).map_err(|e| anyhow::anyhow!("{}", locate(file, text, &e)))?;
    if parsed.templates().next().is_some() {
        bail!("`{}`: policy templates are not supported", file.display());
    }
    let mut ids = Vec::new();
    for policy in parsed.policies() {
        let Some(id) = policy.annotation("id").filter(|s| !s.trim().is_empty()) else {
            bail!(
                "`{}`: every policy needs an `@id(\"...\")` annotation; this one has none:\n{policy}",
                file.display()
            );
        };
        if [DEFAULT_DENY, POLICY_ERROR, ART9_MISSING].contains(&id) {
            bail!(
                "`{}`: policy id `{id}` is the gateway's own name for a decision no policy \
                 made; give the policy another",
                file.display()
            );
        }
        if set.policy(&PolicyId::new(id)).is_some() {
            bail!("`{}`: policy id `{id}` is used twice", file.display());
        }
        set.add(policy.new_id(PolicyId::new(id)))
            .map_err(|e| anyhow::anyhow!("`{}`: policy `{id}`: {e}", file.display()))?;
        ids.push(id.to_owned());
    }
    Ok(ids)
}

/// The policy files as read, and which file holds each policy id: for messages that say
/// where.
#[derive(Default)]
pub(crate) struct Sources {
    files: Vec<(PathBuf, String)>,
    origins: Vec<(String, PathBuf)>,
}

impl Sources {
    /// The file that holds the policy `id`, and its text.
    fn of(&self, id: &str) -> Option<(&Path, &str)> {
        let (_, file) = self.origins.iter().find(|(i, _)| i == id)?;
        (self.files.iter())
            .find(|(f, _)| f == file)
            .map(|(f, t)| (f.as_path(), t.as_str()))
    }
}

fn validate(schema: &Schema, policies: &PolicySet, sources: &Sources) -> anyhow::Result<()> {
    let result = Validator::new(schema.clone()).validate(policies, ValidationMode::Strict);
    let mut problems = Vec::new();
    for err in result.validation_errors() {
        let id = err.policy_id().to_string();
        let (file, text) = (sources.of(&id)).unwrap_or((Path::new("<policies>"), ""));
        problems.push(format!("{} (policy `{id}`)", locate(file, text, err)));
    }
    if !problems.is_empty() {
        bail!(
            "policies fail strict validation against the schema:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Every purpose, field category, area and dataset a policy names exists in the registers.
/// Strict validation checks an entity's type, not its id, so a forbid naming a purpose renamed
/// in the catalogue, or a category misspelt, would load and never fire (fail open).
fn names_known(policies: &PolicySet, entities: &Entities, sources: &Sources) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for policy in policies.policies() {
        for named in policy.entity_literals() {
            let kind = named.type_name().to_string();
            // Actions are the schema's (validation checks them); callers are per request.
            if kind == "Wardgate::Action" || kind == "Wardgate::User" {
                continue;
            }
            if entities.get(&named).is_none() {
                let id = policy.id().to_string();
                problems.push(format!(
                    "{}: policy `{id}` names {named}, which neither the catalogue nor the area \
                     register holds",
                    source_of(&id, sources)
                ));
            }
        }
    }
    problems.sort();
    problems.dedup();
    if !problems.is_empty() {
        bail!(
            "policies name entities that do not exist, so they could never apply:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// The file that holds the policy `id`, for messages.
fn source_of(id: &str, sources: &Sources) -> String {
    (sources.of(id)).map_or_else(|| "<policies>".to_owned(), |(f, _)| f.display().to_string())
}

/// `file:line:col: message` from a Cedar diagnostic's first label.
fn locate(file: &Path, text: &str, diag: &(dyn miette::Diagnostic + Send + Sync)) -> String {
    let mut msg = diag.to_string();
    if let Some(help) = diag.help() {
        msg.push_str(&format!(" (help: {help})"));
    }
    // Parse errors nest the useful detail in related diagnostics.
    if let Some(related) = diag.related() {
        for r in related {
            msg.push_str(&format!("; {r}"));
        }
    }
    let offset = diag.labels().and_then(|mut l| l.next()).map(|l| l.offset());
    match offset {
        Some(off) if off <= text.len() => {
            let before = &text[..off];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("{}:{line}:{col}: {msg}", file.display())
        }
        _ => format!("{}: {msg}", file.display()),
    }
}

fn static_entities(
    catalog: &Catalog,
    geography: &Geography,
    schema: &Schema,
) -> anyhow::Result<Entities> {
    let mut all = geography.cedar_entities();
    all.extend(catalog.cedar_entities());
    all.extend(catalog.datasets.keys().map(
        |d| json!({ "uid": { "type": "Wardgate::Dataset", "id": d }, "attrs": {}, "parents": [] }),
    ));
    Entities::from_json_value(Value::Array(all), Some(schema))
        .context("the area register and catalogue do not fit the Cedar schema")
}

#[cfg(test)]
impl PolicyEngine {
    /// The same engine evaluating every request against the whole pack, to check the index.
    pub(crate) fn unscoped(mut self) -> PolicyEngine {
        self.scoped = scope::Scoped::default();
        self
    }

    pub(crate) fn field_reads(&self, write: bool) -> &scope::RecordReads {
        &self.field_reads[usize::from(write)]
    }
}

#[cfg(test)]
pub(crate) mod tests;
