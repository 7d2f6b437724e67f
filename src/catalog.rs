//! The information asset register (seeds §11) and the purpose catalogue, as configuration.
//!
//! For each dataset: its owner and source, the collection it serves, which field identifies the
//! data subject, how a record's area is found, and the category of every field. For each
//! category: its lawful basis and retention. For each purpose: its lawful basis. This module
//! only describes data; which purpose may see which category is decided by Cedar policies over
//! these categories (`policies/`), never here. A field the register does not classify is never
//! disclosed: the filter strips it and counts it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    /// UK GDPR Article 6 basis: `public_task`, `consent`, `contract`, `legal_obligation`,
    /// `legitimate_interests`.
    pub lawful_basis: String,
    pub basis_detail: String,
    #[serde(default)]
    pub special_category_condition: Option<String>,
    pub description: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    pub description: String,
    pub lawful_basis: String,
    pub retention: String,
    #[serde(default)]
    pub special: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WriteRoute {
    pub description: String,
    /// Field name -> category; a body may carry only these keys.
    pub fields: BTreeMap<String, String>,
    /// Field name -> the only strings it may carry (the field a string, or a list of
    /// strings, each one of these). Where a category is too coarse for the write, e.g. a
    /// canvasser may add `do_not_contact` to `flags` but no restriction the DPO places.
    #[serde(default)]
    pub values: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub description: String,
    pub owner: String,
    pub source: String,
    /// The path segment after the dataset name, e.g. `electors` in `/voter/electors`.
    pub collection: String,
    pub subject_field: String,
    /// How a record's area id is built from its fields, e.g. `{local_authority}/{polling_district}`.
    pub area: String,
    pub markers_field: Option<String>,
    pub flags_field: Option<String>,
    pub consents_field: Option<String>,
    /// The date a phone number was last screened against the Telephone Preference Service.
    pub tps_field: Option<String>,
    /// How old a TPS check may be before live calls stop (28 days is the usual screening cycle).
    #[serde(default = "default_tps_days")]
    pub tps_max_age_days: u32,
    /// The day an elector turns 18 (an attainer; `null` for most). One more than two years
    /// away is an under-16's: the record is never disclosed, whatever its flags say.
    pub attainer_field: Option<String>,
    /// Query parameters a caller may use to narrow a listing.
    #[serde(default)]
    pub filters: Vec<String>,
    #[serde(default = "default_per_page")]
    pub max_per_page: u32,
    pub fields: BTreeMap<String, String>,
    /// Fields whose values hold objects, or arrays of them (a member's `roles`, equality
    /// monitoring answers). Every other field's value must be a scalar or an array of scalars
    /// (the consents field aside, read as consents), or its record is withheld as malformed:
    /// a datastore's nested object (a joined row, a label expansion) would otherwise leave
    /// whole under the outer field's category, whatever it carries.
    #[serde(default)]
    pub structured: Vec<String>,
    #[serde(default)]
    pub writes: BTreeMap<String, WriteRoute>,
    /// The flags a record may carry (the rights register's kinds, `under_16`, the catalogue's
    /// `[words] flags` and a withdrawal of each of its `consent_channels`), filled in by
    /// `Catalog::parse`: a record carrying any other word is held back as restricted
    /// (`filter::attrs`), since no policy can mean it.
    #[serde(skip)]
    pub known_flags: BTreeSet<String>,
}

impl Dataset {
    /// Whether field `name`'s value may be an object, or an array holding arrays or objects:
    /// a field named `structured`, or the consents field. Any other field holding one makes
    /// its record malformed (`filter`), and a write may not put one there (`writes`).
    pub fn may_nest(&self, name: &str) -> bool {
        self.structured.iter().any(|s| s == name) || self.consents_field.as_deref() == Some(name)
    }

    /// The fields the gateway reads a record's area, id and protection from (its area
    /// template's, the subject id, markers, flags, attainer date, consents and TPS check).
    pub fn policy_fields(&self) -> Vec<String> {
        (area_template_fields(&self.area)
            .unwrap_or_default()
            .into_iter())
        .chain([self.subject_field.clone()])
        .chain(
            [
                &self.markers_field,
                &self.flags_field,
                &self.attainer_field,
                &self.consents_field,
                &self.tps_field,
            ]
            .into_iter()
            .flatten()
            .cloned(),
        )
        .collect()
    }
}

fn default_per_page() -> u32 {
    1000
}

fn default_tps_days() -> u32 {
    28
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub roles: BTreeMap<String, String>,
    pub purposes: BTreeMap<String, Purpose>,
    pub categories: BTreeMap<String, Category>,
    pub datasets: BTreeMap<String, Dataset>,
    /// Words policies may compare records' flags and consent channels with beyond the
    /// gateway's own (`policy::vocabulary`): those a datastore's records carry that the
    /// rights register does not take.
    #[serde(default)]
    pub words: Words,
}

/// `[words]`: flags and consent channels known beyond the rights register's.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Words {
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub consent_channels: Vec<String>,
}

/// The lawful bases of UK GDPR Art 6(1) a purpose or category may rest on: five of its six
/// (vital interests has no place in a party's processing).
pub const LAWFUL_BASES: [&str; 5] = [
    "public_task",
    "consent",
    "contract",
    "legal_obligation",
    "legitimate_interests",
];

/// Query parameters the gateway sends a datastore itself, in either dialect (`dialect`).
const RESERVED_PARAMS: [&str; 6] = ["areas", "exclude", "page", "per_page", "limit", "offset"];

/// A name used in a path or a query: lower-case letters, digits, `_` and `-`, starting with a
/// letter.
fn plain(word: &str, what: &str) -> anyhow::Result<()> {
    let mut bytes = word.bytes();
    let ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        bail!(
            "{what}: `{word}` is not a plain name (lower-case letters, digits, `_`, `-`, starting with a letter)"
        );
    }
    Ok(())
}

impl Catalog {
    pub fn load(path: &Path) -> anyhow::Result<Catalog> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read asset register `{}`", path.display()))?;
        Catalog::parse(&text).with_context(|| format!("in asset register `{}`", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Catalog> {
        let mut c: Catalog = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        c.check()?;
        let known: BTreeSet<String> = (crate::controls::KINDS.iter())
            .chain(&[crate::filter::UNDER_16])
            .map(|k| (*k).to_owned())
            .chain(c.words.flags.iter().cloned())
            // A datastore's own channel is withdrawn as the register's are (`attrs::read`).
            .chain((c.words.consent_channels.iter()).map(|ch| format!("consent_withdrawn_{ch}")))
            .collect();
        for d in c.datasets.values_mut() {
            d.known_flags = known.clone();
        }
        Ok(c)
    }

    fn check(&self) -> anyhow::Result<()> {
        self.check_words()?;
        for (id, p) in &self.purposes {
            if !LAWFUL_BASES.contains(&p.lawful_basis.as_str()) {
                bail!(
                    "purpose `{id}` has lawful basis `{}`, not one of {LAWFUL_BASES:?}",
                    p.lawful_basis
                );
            }
        }
        for (id, c) in &self.categories {
            if !LAWFUL_BASES.contains(&c.lawful_basis.as_str()) {
                bail!(
                    "category `{id}` has lawful basis `{}`, not one of {LAWFUL_BASES:?}",
                    c.lawful_basis
                );
            }
        }
        for (name, d) in &self.datasets {
            // Names become path segments and query parameters: plain words only.
            plain(name, &format!("dataset `{name}`"))?;
            plain(&d.collection, &format!("dataset `{name}`: `collection`"))?;
            for w in d.writes.keys() {
                plain(w, &format!("dataset `{name}`: write `{w}`"))?;
            }
            if d.max_per_page == 0 {
                bail!("dataset `{name}`: `max_per_page` = 0: at least 1");
            }
            let known = |f: &str, what: &str| -> anyhow::Result<()> {
                if d.fields.contains_key(f) {
                    Ok(())
                } else {
                    bail!("dataset `{name}`: {what} `{f}` is not one of its fields")
                }
            };
            for (field, cat) in &d.fields {
                if !self.categories.contains_key(cat) {
                    bail!("dataset `{name}`: field `{field}` has unknown category `{cat}`");
                }
            }
            known(&d.subject_field, "subject_field")?;
            for f in &d.structured {
                known(f, "structured field")?;
            }
            for f in area_template_fields(&d.area)? {
                known(&f, "area template field")?;
            }
            for f in [
                &d.markers_field,
                &d.flags_field,
                &d.consents_field,
                &d.tps_field,
                &d.attainer_field,
            ]
            .into_iter()
            .flatten()
            {
                known(f, "attribute field")?;
            }
            // What an anonymous elector's or an under-16's record is known by: a dataset that
            // holds such a field and does not name it would have the gateway read no markers
            // (or no attainer date, or no flags: `under_16`, `restricted`, `deceased`) from its
            // records, and disclose theirs.
            // (Every such field: a second one, beside the one named, would go unread.)
            for (category, field, key) in [
                ("register_marker", &d.markers_field, "markers_field"),
                ("attainer", &d.attainer_field, "attainer_field"),
                ("processing_flags", &d.flags_field, "flags_field"),
            ] {
                let unread = (d.fields.iter())
                    .find(|(f, c)| c.as_str() == category && field.as_ref() != Some(*f));
                if let Some((f, _)) = unread {
                    bail!(
                        "dataset `{name}`: field `{f}` is `{category}`, but `{key}` is not \
                         `{f}`: the gateway would not read it, and would disclose the records \
                         of anonymous electors or under-16s; a dataset holds one field of that \
                         category, named by `{key}`"
                    );
                }
            }
            if !(1..=28).contains(&d.tps_max_age_days) {
                bail!(
                    "dataset `{name}`: `tps_max_age_days` = {}: 1 to 28 (numbers are screened \
                     against the Telephone Preference Service every 28 days)",
                    d.tps_max_age_days
                );
            }
            for f in &d.filters {
                known(f, "filter")?;
                plain(f, &format!("dataset `{name}`: filter `{f}`"))?;
                // The gateway sends these itself (paging, narrowing, and withholding anonymous
                // electors and under-16s at the source): a caller's value must never stand
                // before or in place of the gateway's.
                if RESERVED_PARAMS.contains(&f.as_str()) {
                    bail!(
                        "dataset `{name}`: filter `{f}` is a query parameter the gateway sends \
                         itself ({}; `plain` already refuses Datasette's `_` names); give the \
                         field another name",
                        RESERVED_PARAMS.join(", ")
                    );
                }
            }
            // What the gateway reads a record's scope and protection from: a write that changed
            // one could move a record out of the caller's area (or into another's), re-key it,
            // or lift its anonymity, and the gateway checks the target before the write only.
            // Its consents and TPS check too: they decide whether contact details and
            // email/SMS may be shown, and a doorstep tool must not record consent it was given
            // no way to verify.
            // (Under any spelling: a datastore that ignores case writes `Flags` as `flags`.)
            let guarded: Vec<String> = (d.policy_fields().iter())
                .map(|f| crate::filter::fold_word(f))
                .collect();
            for (w, route) in &d.writes {
                if let Some(field) =
                    (route.fields.keys()).find(|f| guarded.contains(&crate::filter::fold_word(f)))
                {
                    bail!(
                        "dataset `{name}` write `{w}`: field `{field}` is one the gateway reads \
                         a record's area, id or protection from; no write may change it"
                    );
                }
                for (field, cat) in &route.fields {
                    if !self.categories.contains_key(cat) {
                        bail!(
                            "dataset `{name}` write `{w}`: field `{field}` has unknown category `{cat}`"
                        );
                    }
                    // A write is judged by its fields' categories: one filed under another
                    // category than the record's own field of that name would let a purpose
                    // write what it may not (a canvass overwriting `email` as an opinion).
                    // Under any spelling, as above: `Email` is `email` to such a datastore.
                    // (A name with no ASCII letter or digit folds to nothing: such names are
                    // compared as written.)
                    let folded = crate::filter::fold_word(field);
                    let same = |f: &str| match folded.as_str() {
                        "" => f == field.as_str(),
                        folded => crate::filter::fold_word(f) == folded,
                    };
                    if let Some((theirs, own)) =
                        (d.fields.iter()).find(|(f, own)| *own != cat && same(f))
                    {
                        bail!(
                            "dataset `{name}` write `{w}`: field `{field}` is `{cat}` here but \
                             `{theirs}` is `{own}` in the dataset's fields; a write's field keeps \
                             its category (names are compared by their ASCII letters and digits, \
                             ignoring case)"
                        );
                    }
                }
                for (field, allowed) in &route.values {
                    if !route.fields.contains_key(field) {
                        bail!(
                            "dataset `{name}` write `{w}`: `values` names `{field}`, which is not \
                             one of the write's `fields`"
                        );
                    }
                    if allowed.is_empty() {
                        bail!(
                            "dataset `{name}` write `{w}`: `values.{field}` is empty; remove the \
                             field from `fields` instead"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// `[words]` adds words, never spellings: the filter reads a flag it knows as written
    /// and folds only one it does not know onto the known flags it spells (`UNDER_16` is
    /// `under_16`, never disclosed). An entry that is another spelling of a word already
    /// known (`UNDER_16`, `Restricted`, a channel `Email`) would make records carrying it
    /// known and so unfolded, and the under-16 rule or a restriction would not see them.
    fn check_words(&self) -> anyhow::Result<()> {
        let fold = crate::filter::fold_word;
        let mut known: BTreeMap<String, String> = (crate::controls::KINDS.iter())
            .chain(&[crate::filter::UNDER_16])
            .map(|k| (fold(k), (*k).to_owned()))
            .collect();
        let added = (self
            .words
            .flags
            .iter()
            .map(|f| ("flags", f.clone(), f.clone())))
        .chain(self.words.consent_channels.iter().map(|c| {
            (
                "consent_channels",
                c.clone(),
                format!("consent_withdrawn_{c}"),
            )
        }));
        for (list, word, flag) in added {
            let folded = fold(&flag);
            if fold(&word).is_empty() {
                bail!("`[words] {list}`: `{word}` has no letters or digits");
            }
            // A word that may say under 16 (`age_under_16`) is read as `under_16` unless it
            // is known: it may not be made known.
            if list == "flags"
                && word != crate::filter::UNDER_16
                && crate::filter::may_be_under_16(&word)
            {
                bail!(
                    "`[words] flags`: `{word}` may say under 16, which the gateway reads as the \
                     flag `under_16` (never disclosed); remove the entry"
                );
            }
            match known.get(&folded) {
                Some(same) if *same == flag => {}
                Some(other) => {
                    let other = match list {
                        "consent_channels" => (other.strip_prefix("consent_withdrawn_"))
                            .map_or(other.clone(), |c| format!("the consent channel `{c}`")),
                        _ => format!("the flag `{other}`"),
                    };
                    bail!(
                        "`[words] {list}`: `{word}` is another spelling of {other}, which the \
                         gateway already knows; remove the entry (a record's other spellings \
                         of a known flag are read as that flag)"
                    )
                }
                None => {
                    known.insert(folded, flag);
                }
            }
        }
        Ok(())
    }

    /// Category names used by a dataset's fields and writes (what field policies decide on).
    pub fn categories_of(&self, dataset: &Dataset) -> BTreeSet<String> {
        dataset
            .fields
            .values()
            .chain(dataset.writes.values().flat_map(|w| w.fields.values()))
            .cloned()
            .collect()
    }

    /// Purposes, categories and roles as Cedar entities, in Cedar's JSON form.
    pub fn cedar_entities(&self) -> Vec<serde_json::Value> {
        let purposes = self.purposes.iter().map(|(id, p)| {
            serde_json::json!({
                "uid": { "type": "Wardgate::Purpose", "id": id },
                "attrs": { "lawful_basis": p.lawful_basis },
                "parents": [],
            })
        });
        let categories = self.categories.iter().map(|(id, c)| {
            serde_json::json!({
                "uid": { "type": "Wardgate::FieldCategory", "id": id },
                "attrs": { "special": c.special },
                "parents": [],
            })
        });
        purposes.chain(categories).collect()
    }
}

/// The field names in an area template like `{local_authority}/{polling_district}`.
pub fn area_template_fields(template: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .with_context(|| format!("area template `{template}` has an unclosed `{{`"))?;
        out.push(rest[start + 1..start + end].to_owned());
        rest = &rest[start + end + 1..];
    }
    if out.is_empty() {
        bail!("area template `{template}` names no field");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_fields_are_found_in_order() {
        assert_eq!(
            area_template_fields("{local_authority}/{polling_district}").unwrap(),
            vec!["local_authority".to_owned(), "polling_district".to_owned()]
        );
        assert!(area_template_fields("{oops").is_err());
        assert!(area_template_fields("plain").is_err());
    }

    /// A dataset holding register markers or attainer dates names the field, or the gateway
    /// would read none and disclose anonymous electors' and under-16s' records; a TPS check
    /// is at most 28 days old.
    #[test]
    fn protection_fields_are_named_and_tps_checks_bounded() {
        let shipped = include_str!("../config/catalog.toml");
        for (line, key) in [
            ("markers_field = \"markers\"\n", "markers_field"),
            ("attainer_field = \"attainer_date\"\n", "attainer_field"),
            ("flags_field = \"flags\"\n", "flags_field"),
        ] {
            assert!(shipped.contains(line), "{line}");
            let err = format!(
                "{:#}",
                Catalog::parse(&shipped.replacen(line, "", 1)).unwrap_err()
            );
            assert!(
                err.contains("dataset `voter`") && err.contains(&format!("`{key}` is not")),
                "{err}"
            );
        }
        // The membership database's flags are its only word of an under-16 member.
        let members = shipped.replacen(
            "flags_field = \"flags\"\n",
            "",
            shipped.matches("flags_field = \"flags\"\n").count(),
        );
        let members = members.replacen("flags = \"processing_flags\"\n", "", 1);
        let err = format!("{:#}", Catalog::parse(&members).unwrap_err());
        assert!(
            err.contains("dataset `membership`") && err.contains("`flags_field` is not"),
            "{err}"
        );
        // A second marker field beside the one named would go unread.
        let second = shipped.replacen(
            "markers = \"register_marker\"",
            "markers = \"register_marker\"\nmarkers_2 = \"register_marker\"",
            1,
        );
        assert_ne!(second, shipped);
        let err = format!("{:#}", Catalog::parse(&second).unwrap_err());
        assert!(err.contains("`markers_2`"), "{err}");
        let line = "tps_max_age_days = 28 ";
        assert!(shipped.contains(line));
        for days in [0, 29, 4_294_967_295_u32] {
            let with = shipped.replacen(line, &format!("tps_max_age_days = {days} "), 1);
            let err = format!("{:#}", Catalog::parse(&with).unwrap_err());
            assert!(err.contains("`tps_max_age_days`"), "{days}: {err}");
        }
    }

    #[test]
    fn the_shipped_register_is_valid() {
        let text = include_str!("../config/catalog.toml");
        let c = Catalog::parse(text).unwrap();
        assert!(c.purposes.contains_key("canvassing"));
        assert!(c.datasets.contains_key("voter"));
    }

    /// No write may change what the gateway reads a record's area, id or protection from: it
    /// checks the target before the write only.
    #[test]
    fn a_write_may_not_move_re_key_or_unprotect_a_record() {
        let shipped = include_str!("../config/catalog.toml");
        let line = "fields = { voting_intention = \"political_opinion\",";
        assert!(shipped.contains(line));
        for (field, cat) in [
            ("polling_district", "area"),
            ("Flags", "processing_flags"),
            ("ATTAINER_DATE", "register_marker"),
            ("elector_id", "identifier"),
            ("markers", "register_marker"),
            ("flags", "processing_flags"),
            ("attainer_date", "register_marker"),
            ("consents", "consent_record"),
            ("tps_checked_at", "consent_record"),
        ] {
            let with = shipped.replacen(
                line,
                &format!(
                    "fields = {{ {field} = \"{cat}\", voting_intention = \"political_opinion\","
                ),
                1,
            );
            let err = format!("{:#}", Catalog::parse(&with).unwrap_err());
            assert!(
                err.contains(&format!("`{field}`")) && err.contains("no write may change it"),
                "{field}: {err}"
            );
        }
    }

    /// A `[words]` entry that respells a word the gateway knows would make records carrying
    /// it known as written, and so not read as the flag they spell: an `UNDER_16` record
    /// would go out. The start refuses it, naming the entry and the word it respells.
    #[test]
    fn a_words_entry_may_not_respell_a_known_word() {
        let shipped = include_str!("../config/catalog.toml");
        let commented = "# [words]\n# flags = [\"moved_away\"]\n# consent_channels = [\"post\"]";
        assert!(shipped.contains(commented));
        let with = |words: &str| shipped.replacen(commented, &format!("[words]\n{words}"), 1);
        for (words, entry, respelt) in [
            (r#"flags = ["UNDER_16"]"#, "`UNDER_16`", "`under_16`"),
            (r#"flags = ["under-16"]"#, "`under-16`", "`under_16`"),
            (r#"flags = ["Restricted"]"#, "`Restricted`", "`restricted`"),
            (
                r#"flags = ["age_under_16"]"#,
                "`age_under_16`",
                "`under_16`",
            ),
            (
                r#"flags = ["do-not-contact"]"#,
                "`do-not-contact`",
                "`do_not_contact`",
            ),
            (
                r#"flags = ["moved_away", "Moved Away"]"#,
                "`Moved Away`",
                "`moved_away`",
            ),
            (
                r#"consent_channels = ["Email"]"#,
                "`Email`",
                "channel `email`",
            ),
            (r#"flags = ["--"]"#, "`--`", "no letters or digits"),
        ] {
            let err = format!("{:#}", Catalog::parse(&with(words)).unwrap_err());
            assert!(
                err.contains("[words]") && err.contains(entry) && err.contains(respelt),
                "{words}: {err}"
            );
        }
        let c = Catalog::parse(&with(
            "flags = [\"moved_away\", \"under_16\"]\nconsent_channels = [\"post\"]",
        ))
        .unwrap();
        let known = &c.datasets["voter"].known_flags;
        assert!(known.contains("moved_away") && known.contains("consent_withdrawn_post"));
    }

    #[test]
    fn write_values_must_name_a_field_of_the_write_and_allow_something() {
        let shipped = include_str!("../config/catalog.toml");
        let line = "values = { flags_add = [\"do_not_contact\"] }";
        assert!(shipped.contains(line));
        let stray = shipped.replacen(line, "values = { flags = [\"do_not_contact\"] }", 1);
        let err = format!("{:#}", Catalog::parse(&stray).unwrap_err());
        assert!(
            err.contains("write `canvass`") && err.contains("`flags`"),
            "{err}"
        );
        let empty = shipped.replacen(line, "values = { flags_add = [] }", 1);
        let err = format!("{:#}", Catalog::parse(&empty).unwrap_err());
        assert!(err.contains("`values.flags_add` is empty"), "{err}");
    }

    #[test]
    fn an_unclassified_category_is_refused_by_name() {
        let text = include_str!("../config/catalog.toml").replacen(
            "first_name = \"identity\"",
            "first_name = \"mystery\"",
            1,
        );
        let err = format!("{:#}", Catalog::parse(&text).unwrap_err());
        assert!(err.contains("mystery"), "{err}");
    }

    /// A write's field keeps the category the dataset gives that field: filed under another,
    /// a canvass could overwrite contact details under the opinion permit. Under any
    /// spelling: a datastore that ignores case writes `Email` over `email`.
    #[test]
    fn a_write_field_keeps_its_category() {
        let shipped = include_str!("../config/catalog.toml");
        let canvass = "voting_intention = \"political_opinion\", canvass_issues";
        assert!(shipped.contains(canvass));
        for (key, field) in [
            ("email", "email"),
            ("Email", "Email"),
            ("\"E-mail\"", "E-mail"),
        ] {
            let text = shipped.replacen(
                canvass,
                &format!(
                    "voting_intention = \"political_opinion\", {key} = \"political_opinion\", \
                     canvass_issues"
                ),
                1,
            );
            let err = format!("{:#}", Catalog::parse(&text).unwrap_err());
            assert!(
                err.contains(&format!(
                    "write `canvass`: field `{field}` is `political_opinion` here but `email` is \
                     `contact_email`"
                )),
                "{err}"
            );
        }
        // Names with no ASCII letter or digit are compared as written: two are two fields.
        let text = shipped
            .replacen(
                canvass,
                "voting_intention = \"political_opinion\", \"意向\" = \"political_opinion\", \
                 canvass_issues",
                1,
            )
            .replacen(
                "[datasets.voter.fields]",
                "[datasets.voter.fields]\n\"名前\" = \"identity\"",
                1,
            );
        Catalog::parse(&text).unwrap();
    }

    /// A filter named like a parameter the gateway sends itself would put the caller's value
    /// before the gateway's (`?exclude=none`, `?areas=`); names that become path segments or
    /// query parameters are plain words; a page of at most nothing is refused.
    #[test]
    fn names_the_gateway_sends_upstream_are_plain_and_unreserved() {
        let shipped = include_str!("../config/catalog.toml");
        let filters = "filters = [\"branch\", \"clp\", \"status\"]";
        assert!(shipped.contains(filters));
        for (name, why) in [
            ("exclude", "sends"),
            ("areas", "sends"),
            ("per_page", "sends"),
            ("offset", "sends"),
            ("_shape", "plain"),
            ("Status", "plain"),
            ("st atus", "plain"),
        ] {
            let text = shipped
                .replacen(filters, &format!("filters = [\"{name}\"]"), 1)
                .replacen(
                    "[datasets.membership.fields]",
                    &format!("[datasets.membership.fields]\n\"{name}\" = \"membership_status\""),
                    1,
                );
            let err = format!("{:#}", Catalog::parse(&text).unwrap_err());
            assert!(
                err.contains(&format!("filter `{name}`")) && err.contains(why),
                "{name}: {err}"
            );
        }
        let text = shipped.replacen("collection = \"members\"", "collection = \"members/x\"", 1);
        let err = format!("{:#}", Catalog::parse(&text).unwrap_err());
        assert!(err.contains("collection"), "{err}");
        assert!(shipped.contains("max_per_page = 1000"));
        let text = shipped.replacen("max_per_page = 1000", "max_per_page = 0", 1);
        let err = format!("{:#}", Catalog::parse(&text).unwrap_err());
        assert!(err.contains("max_per_page"), "{err}");
    }
}
