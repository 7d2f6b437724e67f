//! The words a policy compares strings with, checked at start against what the gateway knows.
//!
//! Strict validation checks that `context.record.flags.contains("…")` compares a set of strings
//! with a string, not which string. A flag misspelt in a `forbid` (`"objects_profilng"`) would
//! load and never match: the objectors it was written for would be profiled, and nothing would
//! say so. So every string literal a policy compares with one of these is checked:
//!
//! | compared with | must be |
//! | --- | --- |
//! | `context.caller.role` | a role the catalogue defines |
//! | `context.record.flags` | a kind the rights register takes (`controls::KINDS`, not the consent withdrawals), `under_16` (the filter's, from the attainer date), or one the catalogue's `[words] flags` adds |
//! | `context.record.consented` | a channel the register can withdraw consent for (`email`, `sms`, `phone`), or one `[words] consent_channels` adds |
//! | `context.record.markers` | a register marker's form: one or two capital letters (`N`, `F`, `L`, `G`, `B`, `M`...) |
//! | `context.filters` | a filter some dataset of the catalogue takes (`postcode`, `ward`...) |
//!
//! "Compared" is `==`, `!=`, `contains`, `containsAll` and `containsAny`, either way round
//! (`["dpo", "security"].contains(context.caller.role)` too, and the attribute in a set
//! literal), with each branch of an
//! `if`-`then`-`else` that gives the literal; and `like`, whose pattern must match a known
//! word. Other strings (units, lawful bases, area kinds) are not checked.

use std::collections::BTreeSet;

use cedar_policy::PolicySet;
use serde_json::Value;

use crate::catalog::Catalog;

/// Whether `word` has a register marker's form: one or two capital letters (`N`, `F`, `L`,
/// `G`, `B`, `M`...). Policies are checked against it at start, and records as they are read
/// (`filter::attrs`).
pub fn is_marker(word: &str) -> bool {
    (1..=2).contains(&word.len()) && word.bytes().all(|b| b.is_ascii_uppercase())
}

/// Whether a record's marker may mean an anonymous elector's entry, taken so as far as it
/// could mean: `N`, a word not of a marker's form (`n`, `NNN`), or two letters with an `N`
/// among them (`NF`: anonymous and overseas written as one). The gateway never discloses such
/// a record (`filter::attrs`), and the demo datastore leaves it out as protected.
pub fn may_be_anonymous(marker: &str) -> bool {
    !is_marker(marker) || marker.contains('N')
}

/// What each checked attribute may be compared with.
pub struct Vocabulary {
    roles: BTreeSet<String>,
    flags: BTreeSet<String>,
    channels: BTreeSet<String>,
    filters: BTreeSet<String>,
}

/// The attributes whose literals are checked.
#[derive(Clone, Copy)]
enum Word {
    Role,
    Flag,
    Channel,
    Marker,
    Filter,
}

impl Word {
    fn path(self) -> &'static str {
        match self {
            Word::Role => "context.caller.role",
            Word::Flag => "context.record.flags",
            Word::Channel => "context.record.consented",
            Word::Marker => "context.record.markers",
            Word::Filter => "context.filters",
        }
    }
}

impl Vocabulary {
    pub fn new(catalog: &Catalog) -> Vocabulary {
        let withdrawn = |k: &&str| k.starts_with("consent_withdrawn_");
        let kinds = crate::controls::KINDS.iter();
        Vocabulary {
            roles: catalog.roles.keys().cloned().collect(),
            flags: (kinds.clone().filter(|k| !withdrawn(k)))
                .chain(["under_16"].iter())
                .map(|k| (*k).to_owned())
                .chain(catalog.words.flags.iter().cloned())
                .collect(),
            channels: kinds
                .filter_map(|k| k.strip_prefix("consent_withdrawn_"))
                .map(str::to_owned)
                .chain(catalog.words.consent_channels.iter().cloned())
                .collect(),
            filters: (catalog.datasets.values())
                .flat_map(|d| d.filters.iter().cloned())
                .collect(),
        }
    }

    /// The words `word` may be, where there is a list (markers are checked by form).
    fn words(&self, word: Word) -> Option<&BTreeSet<String>> {
        match word {
            Word::Role => Some(&self.roles),
            Word::Flag => Some(&self.flags),
            Word::Channel => Some(&self.channels),
            Word::Filter => Some(&self.filters),
            Word::Marker => None,
        }
    }

    /// Why `literal` is not a word `word` may be compared with, if it is not.
    fn refuse_literal(&self, literal: &Literal, word: Word) -> Option<String> {
        match literal {
            Literal::Exact(text) => self.refuse(word, text),
            Literal::Like(pattern) if pattern.iter().all(Option::is_some) => {
                self.refuse(word, &pattern.iter().flatten().cloned().collect::<String>())
            }
            Literal::Like(pattern) => {
                let words = self.words(word)?;
                (!words.iter().any(|w| glob(pattern, w))).then(|| {
                    let all: Vec<&str> = words.iter().map(String::as_str).collect();
                    format!("a pattern no known word matches ({})", all.join(", "))
                })
            }
        }
    }

    fn refuse(&self, word: Word, literal: &str) -> Option<String> {
        let known = |set: &BTreeSet<String>, what: &str| {
            (!set.contains(literal)).then(|| {
                let all: Vec<&str> = set.iter().map(String::as_str).collect();
                format!("not {what} ({})", all.join(", "))
            })
        };
        match word {
            Word::Role => known(&self.roles, "a role the catalogue defines"),
            Word::Flag => known(&self.flags, "a flag the gateway knows"),
            Word::Channel => known(&self.channels, "a consent channel"),
            Word::Filter => known(&self.filters, "a filter of any dataset"),
            Word::Marker => (!is_marker(literal))
                .then(|| "not a register marker (one or two capital letters)".to_owned()),
        }
    }
}

impl Vocabulary {
    /// Why a policy test's record carries a marker or consent channel no record can, if it
    /// does (`fixtures`): a typo there would test a record that cannot occur.
    pub(super) fn refuse_words(
        &self,
        markers: &BTreeSet<String>,
        consented: &BTreeSet<String>,
    ) -> Option<String> {
        let words = (markers.iter().map(|m| (Word::Marker, m.as_str())))
            .chain(consented.iter().map(|c| (Word::Channel, c.as_str())));
        for (word, text) in words {
            if let Some(why) = self.refuse(word, text) {
                return Some(format!("`{}` `{text}` is {why}", word.path()));
            }
        }
        None
    }
}

/// Every string a policy compares a checked attribute with is one the gateway knows; the
/// error lists each that is not, with its file and policy.
pub fn literals_known(
    policies: &PolicySet,
    vocabulary: &Vocabulary,
    sources: &super::Sources,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for policy in policies.policies() {
        let mut found = Vec::new();
        let est = policy.to_json()?;
        for condition in est["conditions"].as_array().into_iter().flatten() {
            visit(&condition["body"], &mut found);
        }
        let id = policy.id().to_string();
        for (word, literal) in found {
            if let Some(why) = vocabulary.refuse_literal(&literal, word) {
                problems.push(format!(
                    "{}: policy `{id}` compares {} with \"{}\", {why}",
                    super::source_of(&id, sources),
                    word.path(),
                    literal.to_string().escape_debug()
                ));
            }
        }
    }
    problems.sort();
    problems.dedup();
    if !problems.is_empty() {
        anyhow::bail!(
            "policies compare attributes with words the gateway does not know, so those \
             comparisons could never hold:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// A string a checked attribute is compared with: a literal, or a `like` pattern (its
/// pieces; `None` a wildcard).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Literal {
    Exact(String),
    Like(Vec<Option<String>>),
}

impl std::fmt::Display for Literal {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Literal::Exact(s) => f.write_str(s),
            // As written: a star that is a character, not a wildcard, escaped.
            Literal::Like(pattern) => pattern.iter().try_for_each(|p| match p {
                Some(text) => f.write_str(&text.replace('*', "\\*")),
                None => f.write_str("*"),
            }),
        }
    }
}

/// Whether `word` matches a `like` pattern's pieces (`None`: any run of characters), as
/// Cedar matches: greedily, going back only to the last wildcard, so any pattern takes time
/// in proportion to the pattern times the word.
fn glob(pattern: &[Option<String>], word: &str) -> bool {
    let pat: Vec<Option<char>> = pattern
        .iter()
        .flat_map(|piece| match piece {
            Some(text) => text.chars().map(Some).collect::<Vec<_>>(),
            None => vec![None],
        })
        .collect();
    let word: Vec<char> = word.chars().collect();
    let (mut p, mut w) = (0, 0);
    // The last wildcard seen, and where in the word it was last made to end.
    let mut back: Option<(usize, usize)> = None;
    while w < word.len() {
        match pat.get(p) {
            Some(None) => {
                back = Some((p, w));
                p += 1;
            }
            Some(Some(c)) if *c == word[w] => {
                p += 1;
                w += 1;
            }
            _ => match back {
                Some((star, at)) => {
                    back = Some((star, at + 1));
                    p = star + 1;
                    w = at + 1;
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(Option::is_none)
}

/// Collects `(attribute, literal)` for every comparison of a checked attribute with string
/// literals in a condition in Cedar's JSON form (EST): `{"contains": {"left": …, "right":
/// {"Value": "x"}}}` and the other operators, either way round; sets (`{"Set": [{"Value":
/// "x"}]}`); the branches of `{"if-then-else": …}`; and `{"like": {"left": …, "pattern":
/// […]}}`.
fn visit(e: &Value, found: &mut Vec<(Word, Literal)>) {
    match e {
        Value::Object(map) => {
            for op in ["==", "!=", "contains", "containsAll", "containsAny"] {
                if let Some(args) = map.get(op) {
                    let (left, right) = (&args["left"], &args["right"]);
                    for (attr, other) in [(left, right), (right, left)] {
                        if let Some(word) = word_in(attr) {
                            literals(other, &mut |s| {
                                found.push((word, Literal::Exact(s.to_owned())));
                            });
                        }
                    }
                }
            }
            if let Some(like) = map.get("like")
                && let Some(word) = word_at(&like["left"])
            {
                let pieces = like["pattern"].as_array().into_iter().flatten();
                let pattern = pieces
                    .map(|p| p.get("Literal").and_then(Value::as_str).map(str::to_owned))
                    .collect();
                found.push((word, Literal::Like(pattern)));
            }
            map.values().for_each(|v| visit(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| visit(v, found)),
        _ => {}
    }
}

/// The checked attribute `e` reads, if it is one: `context.<a>.<b>`.
fn word_at(e: &Value) -> Option<Word> {
    let outer = e.get(".")?;
    if outer["left"].get("Var").and_then(Value::as_str) == Some("context") {
        return (outer["attr"].as_str()? == "filters").then_some(Word::Filter);
    }
    let inner = outer["left"].get(".")?;
    if inner["left"].get("Var").and_then(Value::as_str) != Some("context") {
        return None;
    }
    match (inner["attr"].as_str()?, outer["attr"].as_str()?) {
        ("caller", "role") => Some(Word::Role),
        ("record", "flags") => Some(Word::Flag),
        ("record", "consented") => Some(Word::Channel),
        ("record", "markers") => Some(Word::Marker),
        _ => None,
    }
}

/// The checked attribute `e` reads, or a set literal holding it reads
/// (`[context.caller.role].containsAny(["dpo"])`).
fn word_in(e: &Value) -> Option<Word> {
    word_at(e).or_else(|| {
        let items = e.get("Set")?.as_array()?;
        items.iter().find_map(word_at)
    })
}

/// The string literals `e` is: one (`{"Value": "x"}`), a set's, or either branch's of an
/// `if`-`then`-`else`.
fn literals(e: &Value, each: &mut dyn FnMut(&str)) {
    if let Some(s) = e.get("Value").and_then(Value::as_str) {
        each(s);
    }
    for item in e.get("Set").and_then(Value::as_array).into_iter().flatten() {
        literals(item, each);
    }
    if let Some(branches) = e.get("if-then-else") {
        literals(&branches["then"], each);
        literals(&branches["else"], each);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(condition: &str) -> Vec<(&'static str, String)> {
        let text =
            format!("@id(\"p\")\nforbid (principal, action, resource)\nwhen {{ {condition} }};");
        let set: PolicySet = text.parse().unwrap();
        let mut found = Vec::new();
        for p in set.policies() {
            for c in p.to_json().unwrap()["conditions"].as_array().unwrap() {
                visit(&c["body"], &mut found);
            }
        }
        found
            .into_iter()
            .map(|(w, s)| (w.path(), s.to_string()))
            .collect()
    }

    #[test]
    fn comparisons_with_checked_attributes_are_found_whichever_way_round() {
        let owned = |v: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
            v.iter().map(|(w, s)| (*w, (*s).to_owned())).collect()
        };
        assert_eq!(
            found(r#"context.record.flags.contains("restricted")"#),
            owned(&[("context.record.flags", "restricted")])
        );
        assert_eq!(
            found(r#""dpo" == context.caller.role || context.caller.role != "security""#),
            owned(&[
                ("context.caller.role", "dpo"),
                ("context.caller.role", "security")
            ])
        );
        assert_eq!(
            found(r#"context.record.consented.containsAny(["sms", "phone"])"#),
            owned(&[
                ("context.record.consented", "sms"),
                ("context.record.consented", "phone")
            ])
        );
        assert_eq!(
            found(r#"!context.record.markers.containsAll(["N"])"#),
            owned(&[("context.record.markers", "N")])
        );
        // A set literal holding the attribute, as the shipped pack writes role lists.
        assert_eq!(
            found(r#"["canvaser", "dpo"].contains(context.caller.role)"#),
            owned(&[
                ("context.caller.role", "canvaser"),
                ("context.caller.role", "dpo")
            ])
        );
        assert_eq!(
            found(r#"["restricted", "erasure_requestd"].containsAny(context.record.flags)"#),
            owned(&[
                ("context.record.flags", "restricted"),
                ("context.record.flags", "erasure_requestd")
            ])
        );
        // The request's filters, one level down.
        assert_eq!(
            found(r#"context.filters.contains("post_code")"#),
            owned(&[("context.filters", "post_code")])
        );
        // The attribute inside a set literal.
        assert_eq!(
            found(r#"[context.caller.role].containsAny(["secuirty"])"#),
            owned(&[("context.caller.role", "secuirty")])
        );
        // Each branch that gives the literal, and a `like` pattern.
        assert_eq!(
            found(
                r#"context.caller.role == (if context.record.tps_fresh then "dpo" else "secuirty")"#
            ),
            owned(&[
                ("context.caller.role", "dpo"),
                ("context.caller.role", "secuirty")
            ])
        );
        assert_eq!(
            found(r#"context.caller.role like "mp_*""#),
            owned(&[("context.caller.role", "mp_*")])
        );
        // Nested inside other expressions, and only the checked attributes.
        assert_eq!(
            found(
                r#"context.caller.unit == "BR-X" && (if context.record.tps_fresh then context.record.flags.contains("deceased") else false)"#
            ),
            owned(&[("context.record.flags", "deceased")])
        );
    }

    #[test]
    fn words_are_checked_against_what_the_gateway_knows() {
        let catalog = Catalog::parse(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/catalog.toml"),
            )
            .unwrap(),
        )
        .unwrap();
        let v = Vocabulary::new(&catalog);
        for (word, ok) in [
            (Word::Role, "councillor"),
            (Word::Flag, "objects_profiling"),
            (Word::Flag, "under_16"),
            (Word::Channel, "email"),
            (Word::Marker, "N"),
            (Word::Marker, "G"),
            (Word::Filter, "postcode"),
            (Word::Filter, "branch"),
        ] {
            assert_eq!(v.refuse(word, ok), None, "{ok}");
        }
        for (word, bad) in [
            (Word::Role, "counciller"),
            (Word::Flag, "objects_profilng"),
            (Word::Flag, "consent_withdrawn_email"),
            (Word::Channel, "text"),
            (Word::Marker, "n"),
            (Word::Marker, "anonymous"),
            (Word::Marker, ""),
            (Word::Filter, "post_code"),
        ] {
            assert!(v.refuse(word, bad).is_some(), "{bad}");
        }
        // A `like` pattern must match some role; without a wildcard it is a literal.
        let like =
            |p: &[Option<&str>]| Literal::Like(p.iter().map(|s| s.map(str::to_owned)).collect());
        assert_eq!(
            v.refuse_literal(&like(&[Some("mp_"), None]), Word::Role),
            None
        );
        assert_eq!(
            v.refuse_literal(&like(&[None, Some("officer")]), Word::Role),
            None
        );
        assert!(
            v.refuse_literal(&like(&[Some("mp-"), None]), Word::Role)
                .is_some()
        );
        assert!(
            v.refuse_literal(&like(&[Some("counciler")]), Word::Role)
                .is_some()
        );
        // The catalogue can add flags and channels its datastores carry.
        let mut more = catalog.clone();
        more.words.flags.push("moved_away".into());
        more.words.consent_channels.push("post".into());
        let v = Vocabulary::new(&more);
        assert_eq!(v.refuse(Word::Flag, "moved_away"), None);
        assert_eq!(v.refuse(Word::Channel, "post"), None);
    }

    #[test]
    fn like_patterns_match_as_cedar_matches_them() {
        let p = |s: &[Option<&str>]| s.iter().map(|x| x.map(str::to_owned)).collect::<Vec<_>>();
        assert!(glob(&p(&[Some("mp_"), None]), "mp_caseworker"));
        assert!(glob(&p(&[None]), ""));
        assert!(glob(
            &p(&[None, Some("er"), None, Some("r")]),
            "membership_officer"
        ));
        assert!(!glob(&p(&[Some("mp_")]), "mp_caseworker"));
        assert!(!glob(&p(&[None, Some("x")]), "dpo"));
        assert!(glob(&p(&[Some("dpo")]), "dpo"));
        assert!(glob(&p(&[None, None, Some("ö"), None]), "außer-ö-x"));
        assert!(!glob(&p(&[Some("*")]), "x"));
        assert!(glob(&p(&[Some("*")]), "*"));
        // Many wildcards in a row cost no more than one.
        let stars: Vec<Option<String>> = (0..40).map(|_| None).chain([Some("x".into())]).collect();
        assert!(!glob(&stars, &"a".repeat(60)));
        assert_eq!(Literal::Like(p(&[Some("a*b"), None])).to_string(), "a\\*b*");
    }
}
