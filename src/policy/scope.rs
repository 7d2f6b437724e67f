//! The policy pack indexed by the action and resource each policy can apply to.
//!
//! Cedar evaluates every policy in the set it is given, building each one's condition afresh,
//! and only then finds that most of them are for another action. A policy whose scope says
//! `action == A` (or `action in [...]` without A or a group of A) can never be satisfied, nor
//! raise an error, on a request for another action; the same holds for a resource scope. So at
//! start the pack is split, per action and per resource wardgate asks about (datasets and field
//! categories), into the policies whose scope can match; a request is evaluated against its
//! part only. The decision and the deciding policies are the same as against the whole pack
//! (the policy tests check exactly that); a request for a pair not in the index uses the whole
//! pack.
//!
//! The same scope test tells which attributes of `context.record` the policies for an action
//! read at all (`RecordReads`): a field category's decision cannot depend on an attribute no
//! field policy reads, so field decisions are memoised without it (the area, today).

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use cedar_policy::{ActionConstraint, Entities, EntityUid, Policy, PolicySet, ResourceConstraint};

/// Resource types wardgate's requests name.
const RESOURCE_TYPES: [&str; 2] = ["Wardgate::Dataset", "Wardgate::FieldCategory"];

#[derive(Default)]
pub struct Scoped {
    by_action: HashMap<EntityUid, HashMap<EntityUid, PolicySet>>,
}

impl Scoped {
    /// Splits `policies` for every action in `actions` and every known resource.
    pub fn build<'a>(
        policies: &PolicySet,
        actions: impl IntoIterator<Item = &'a EntityUid>,
        entities: &Entities,
    ) -> anyhow::Result<Scoped> {
        let resources: Vec<EntityUid> = entities
            .iter()
            .map(|e| e.uid())
            .filter(|uid| RESOURCE_TYPES.contains(&uid.type_name().to_string().as_str()))
            .collect();
        let mut by_action = HashMap::new();
        for action in actions {
            let mut by_resource = HashMap::new();
            for resource in &resources {
                let part = policies
                    .policies()
                    .filter(|p| may_apply(p, action, resource, entities))
                    .cloned();
                by_resource.insert(resource.clone(), PolicySet::from_policies(part)?);
            }
            by_action.insert(action.clone(), by_resource);
        }
        Ok(Scoped { by_action })
    }

    /// The policies that can apply to this action on this resource, if indexed.
    pub fn get(&self, action: &EntityUid, resource: &EntityUid) -> Option<&PolicySet> {
        self.by_action.get(action)?.get(resource)
    }
}

/// The attributes of `context.record` some policy that may apply to an action reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordReads {
    /// Only these attributes, each by name (`context.record.x`, `context.record has x`).
    Only(BTreeSet<String>),
    /// The record or the whole context is used some other way: assume everything is read.
    All,
}

impl RecordReads {
    pub fn of(
        policies: &PolicySet,
        action: &EntityUid,
        entities: &Entities,
    ) -> anyhow::Result<RecordReads> {
        let mut reads = Reads::default();
        for p in policies.policies() {
            let action_ok = match p.action_constraint() {
                ActionConstraint::Any => true,
                ActionConstraint::Eq(a) => &a == action,
                ActionConstraint::In(groups) => groups
                    .iter()
                    .any(|g| g == action || entities.is_ancestor_of(g, action)),
            };
            if action_ok {
                for condition in p.to_json()?["conditions"].as_array().into_iter().flatten() {
                    reads.visit(&condition["body"]);
                }
            }
        }
        Ok(if reads.whole {
            RecordReads::All
        } else {
            RecordReads::Only(reads.attrs)
        })
    }

    pub fn reads(&self, attr: &str) -> bool {
        match self {
            RecordReads::Only(attrs) => attrs.contains(attr),
            RecordReads::All => true,
        }
    }
}

#[derive(Default)]
struct Reads {
    attrs: BTreeSet<String>,
    whole: bool,
}

impl Reads {
    /// Walks a condition in Cedar's JSON form (EST). `context.record.x` is
    /// `{".": {"left": {".": {"left": {"Var": "context"}, "attr": "record"}}, "attr": "x"}}`.
    fn visit(&mut self, e: &Value) {
        match e {
            Value::Object(map) => {
                for op in [".", "has"] {
                    if let Some(access) = map.get(op) {
                        let left = &access["left"];
                        if is_record(left) {
                            match access["attr"].as_str() {
                                Some(attr) => {
                                    self.attrs.insert(attr.to_owned());
                                }
                                None => self.whole = true,
                            }
                            return;
                        }
                        if is_context(left) {
                            // `context.record` not under an attribute access is the whole record.
                            self.whole |= access["attr"] == "record";
                            return;
                        }
                    }
                }
                if is_context(e) {
                    self.whole = true;
                    return;
                }
                map.values().for_each(|v| self.visit(v));
            }
            Value::Array(items) => items.iter().for_each(|v| self.visit(v)),
            _ => {}
        }
    }
}

fn is_context(e: &Value) -> bool {
    e.get("Var").and_then(Value::as_str) == Some("context")
}

fn is_record(e: &Value) -> bool {
    e.get(".")
        .is_some_and(|a| is_context(&a["left"]) && a["attr"] == "record")
}

/// False only when the policy's scope rules this action or resource out (`b in a` as Cedar
/// means it: equal, or a descendant in the entity hierarchy, actions included).
fn may_apply(p: &Policy, action: &EntityUid, resource: &EntityUid, entities: &Entities) -> bool {
    let is_in = |b: &EntityUid, a: &EntityUid| a == b || entities.is_ancestor_of(a, b);
    let action_ok = match p.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(a) => &a == action,
        ActionConstraint::In(groups) => groups.iter().any(|g| is_in(action, g)),
    };
    let resource_ok = match p.resource_constraint() {
        ResourceConstraint::Any => true,
        ResourceConstraint::Eq(r) => &r == resource,
        ResourceConstraint::In(g) => is_in(resource, &g),
        ResourceConstraint::Is(t) => resource.type_name() == &t,
        ResourceConstraint::IsIn(t, g) => resource.type_name() == &t && is_in(resource, &g),
    };
    action_ok && resource_ok
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn reads(policies: &str, action: &str) -> RecordReads {
        let set = PolicySet::from_str(policies).unwrap();
        let action = EntityUid::from_str(&format!("Wardgate::Action::\"{action}\"")).unwrap();
        RecordReads::of(&set, &action, &Entities::empty()).unwrap()
    }

    fn only(attrs: &[&str]) -> RecordReads {
        RecordReads::Only(attrs.iter().map(|a| (*a).to_owned()).collect())
    }

    #[test]
    fn attribute_reads_are_collected_per_action() {
        let text = r#"
            permit (principal, action == Wardgate::Action::"disclose_field", resource)
            when { context.record.flags.contains("x") && context.caller.role == "a" };
            forbid (principal, action in [Wardgate::Action::"disclose_field"], resource)
            when { context.record has tps_fresh && context.record.tps_fresh }
            unless { context.record.consented.isEmpty() };
            permit (principal, action == Wardgate::Action::"disclose_record", resource)
            when { context.record.area in context.caller.grants };
        "#;
        assert_eq!(
            reads(text, "disclose_field"),
            only(&["consented", "flags", "tps_fresh"])
        );
        assert_eq!(reads(text, "disclose_record"), only(&["area"]));
        assert_eq!(reads(text, "write_field"), only(&[]));
    }

    #[test]
    fn a_policy_for_any_action_counts_for_every_action() {
        let text = r#"forbid (principal, action, resource) when { context.record.area == Wardgate::Area::"x" };"#;
        assert_eq!(reads(text, "disclose_field"), only(&["area"]));
    }

    #[test]
    fn using_the_record_or_context_whole_reads_everything() {
        for body in [
            r#"context.record == context.record"#,
            r#"context == context"#,
            r#"[context.record].contains(context.record)"#,
            r#"context["record"]["area"] == Wardgate::Area::"x" && context has record && context.record != {}"#,
        ] {
            let text = format!(
                r#"permit (principal, action == Wardgate::Action::"disclose_field", resource) when {{ {body} }};"#
            );
            assert_eq!(reads(&text, "disclose_field"), RecordReads::All, "{body}");
        }
    }

    #[test]
    fn nested_and_indexed_reads_name_the_attribute() {
        let text = r#"permit (principal, action == Wardgate::Action::"disclose_field", resource)
            when { context["record"]["area"].kind == "ward" && (if context.record.tps_fresh then true else false) };"#;
        assert_eq!(reads(text, "disclose_field"), only(&["area", "tps_fresh"]));
    }
}
