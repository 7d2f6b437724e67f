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
//! | `context.record.flags` | a kind the rights register takes (`controls::KINDS`, not the consent withdrawals) or `under_16` (the filter's, from the attainer date) |
//! | `context.record.consented` | a channel the register can withdraw consent for (`email`, `sms`, `phone`) |
//! | `context.record.markers` | a register marker's form: one or two capital letters (`N`, `F`, `L`, `G`, `B`, `M`...) |
//!
//! "Compared" is `==`, `!=`, `contains`, `containsAll` and `containsAny`, either way round for
//! the first two. Other strings (units, lawful bases, area kinds) are not checked.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cedar_policy::PolicySet;
use serde_json::Value;

use crate::catalog::Catalog;

/// What each checked attribute may be compared with.
pub struct Vocabulary {
    roles: BTreeSet<String>,
    flags: BTreeSet<String>,
    channels: BTreeSet<String>,
}

/// The attributes whose literals are checked.
#[derive(Clone, Copy)]
enum Word {
    Role,
    Flag,
    Channel,
    Marker,
}

impl Word {
    fn path(self) -> &'static str {
        match self {
            Word::Role => "context.caller.role",
            Word::Flag => "context.record.flags",
            Word::Channel => "context.record.consented",
            Word::Marker => "context.record.markers",
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
                .collect(),
            channels: kinds
                .filter_map(|k| k.strip_prefix("consent_withdrawn_"))
                .map(str::to_owned)
                .collect(),
        }
    }

    /// Why `literal` is not a word `word` may be compared with, if it is not.
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
            Word::Marker => {
                let form = (1..=2).contains(&literal.len())
                    && literal.bytes().all(|b| b.is_ascii_uppercase());
                (!form).then(|| "not a register marker (one or two capital letters)".to_owned())
            }
        }
    }
}

/// Every string a policy compares a checked attribute with is one the gateway knows; the
/// error lists each that is not, with its file and policy.
pub fn literals_known(
    policies: &PolicySet,
    vocabulary: &Vocabulary,
    sources: &[(PathBuf, String)],
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
            if let Some(why) = vocabulary.refuse(word, &literal) {
                problems.push(format!(
                    "{}: policy `{id}` compares {} with \"{}\", {why}",
                    super::source_of(&id, sources),
                    word.path(),
                    literal.escape_debug()
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

/// Collects `(attribute, literal)` for every comparison of a checked attribute with string
/// literals in a condition in Cedar's JSON form (EST): `{"contains": {"left": …, "right":
/// {"Value": "x"}}}`, `{"==": …}` either way round, and sets (`{"Set": [{"Value": "x"}]}`).
fn visit(e: &Value, found: &mut Vec<(Word, String)>) {
    match e {
        Value::Object(map) => {
            for op in ["==", "!=", "contains", "containsAll", "containsAny"] {
                if let Some(args) = map.get(op) {
                    let (left, right) = (&args["left"], &args["right"]);
                    let either_way = matches!(op, "==" | "!=");
                    for (attr, other) in [(left, right), (right, left)] {
                        if let Some(word) = word_at(attr) {
                            literals(other, &mut |s| found.push((word, s.to_owned())));
                        }
                        if !either_way {
                            break;
                        }
                    }
                }
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

/// The string literals `e` is: one (`{"Value": "x"}`), or a set's.
fn literals(e: &Value, each: &mut dyn FnMut(&str)) {
    if let Some(s) = e.get("Value").and_then(Value::as_str) {
        each(s);
    }
    for item in e.get("Set").and_then(Value::as_array).into_iter().flatten() {
        literals(item, each);
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
        found.into_iter().map(|(w, s)| (w.path(), s)).collect()
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
        ] {
            assert!(v.refuse(word, bad).is_some(), "{bad}");
        }
    }
}
