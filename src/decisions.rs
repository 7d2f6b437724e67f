//! Memoised record decisions: Cedar runs once per distinct combination of who is asking, why,
//! which dataset and the record's policy-relevant attributes, not once per record.
//!
//! A page of 500 electors from one ward has a handful of distinct attribute combinations, so
//! it needs a handful of evaluations. Decisions are shared across requests in a bounded cache
//! keyed by everything a decision depends on: the caller's role, unit, grants and purposes, the
//! purpose and its basis, the dataset, and the record's area, markers, flags (including the
//! rights register's), consents and TPS freshness. A change to any of those is a different key,
//! so a memoised decision cannot outlive a change of the record's flags; the policies are fixed
//! for the life of the process (a reload builds a new engine and so a new cache). Request-level
//! decisions (may this caller list this dataset for this purpose at all?) are memoised the same
//! way, keyed by every claim and the purpose.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;

use crate::auth::Principal;
use crate::filter::RecordDecision;
use crate::policy::{Ask, PolicyEngine, RecordAttrs, RequestAction, Verdict};

/// Past this many entries the cache starts again: simple, bounded, and still near-perfect for
/// the few thousand combinations real traffic produces.
const MAX_ENTRIES: usize = 100_000;

/// A record decision's inputs; for field categories, `attrs` is the engine's projection
/// (only what field policies read).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    asker: u64,
    dataset: String,
    attrs: RecordAttrs,
}

/// Everything a request-level decision reads: who (the principal's subject and every claim
/// policies see), why, the action and the dataset. No time, no record.
#[derive(Clone, PartialEq, Eq, Hash)]
struct RequestKey {
    subject: String,
    role: String,
    unit: String,
    areas: Vec<String>,
    purposes: Vec<String>,
    purpose: String,
    lawful_basis: String,
    action: RequestAction,
    dataset: String,
}

/// The shared cache; lives beside the policy engine whose answers it holds.
#[derive(Default)]
pub struct DecisionCache {
    entries: Mutex<HashMap<Key, Arc<Cached>, RandomState>>,
    categories: Mutex<HashMap<Key, HashSet<String>, RandomState>>,
    requests: Mutex<HashMap<RequestKey, Verdict, RandomState>>,
}

impl DecisionCache {
    /// The request-level decision, evaluated once per distinct caller, purpose, action and
    /// dataset. Keyed by the exact values (not a hash of them), so two callers never share
    /// an answer by accident; bounded like the record cache.
    #[expect(
        clippy::too_many_arguments,
        reason = "the decision's inputs, spelled out"
    )]
    pub fn request(
        &self,
        engine: &PolicyEngine,
        ask: &Ask,
        p: &Principal,
        purpose: &str,
        lawful_basis: &str,
        action: RequestAction,
        dataset: &str,
    ) -> Verdict {
        let key = RequestKey {
            subject: p.subject.clone(),
            role: p.role.clone(),
            unit: p.unit.clone(),
            areas: p.areas.clone(),
            purposes: p.purposes.clone(),
            purpose: purpose.to_owned(),
            lawful_basis: lawful_basis.to_owned(),
            action,
            dataset: dataset.to_owned(),
        };
        if let Some(v) = self.requests.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return v;
        }
        let verdict = engine.decide_request(ask, action, dataset);
        remember(&self.requests, key, verdict.clone());
        verdict
    }
}

/// Inserts into a bounded shared map (a poisoned lock only costs the memo).
fn remember<K: Eq + Hash, V>(map: &Mutex<HashMap<K, V, RandomState>>, key: K, value: V) {
    if let Ok(mut m) = map.lock() {
        if m.len() >= MAX_ENTRIES {
            m.clear();
        }
        m.insert(key, value);
    }
}

struct Cached {
    decision: Arc<RecordDecision>,
    policy_ids: Vec<String>,
}

/// One request's view: a local memo in front of the shared cache, collecting deciding policy ids.
pub struct Decider<'a> {
    engine: &'a PolicyEngine,
    cache: &'a DecisionCache,
    ask: &'a Ask,
    asker: u64,
    dataset: &'a str,
    categories: &'a BTreeSet<String>,
    local: HashMap<RecordAttrs, Arc<RecordDecision>, RandomState>,
    pub policy_ids: BTreeSet<String>,
}

/// A stable fingerprint of everything about the caller and purpose a decision can depend on.
pub fn asker_key(p: &Principal, purpose: &str, lawful_basis: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (
        &p.role,
        &p.unit,
        &p.areas,
        &p.purposes,
        purpose,
        lawful_basis,
    )
        .hash(&mut h);
    h.finish()
}

impl<'a> Decider<'a> {
    pub fn new(
        engine: &'a PolicyEngine,
        cache: &'a DecisionCache,
        ask: &'a Ask,
        asker: u64,
        dataset: &'a str,
        categories: &'a BTreeSet<String>,
    ) -> Self {
        Decider {
            engine,
            cache,
            ask,
            asker,
            dataset,
            categories,
            local: HashMap::default(),
            policy_ids: BTreeSet::new(),
        }
    }

    pub fn decide(&mut self, attrs: &RecordAttrs) -> Arc<RecordDecision> {
        if let Some(d) = self.local.get(attrs) {
            return d.clone();
        }
        let key = Key {
            asker: self.asker,
            dataset: self.dataset.to_owned(),
            attrs: attrs.clone(),
        };
        let cached = self
            .cache
            .entries
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned());
        let cached = match cached {
            Some(c) => c,
            None => {
                let c = Arc::new(self.evaluate(attrs));
                remember(&self.cache.entries, key, c.clone());
                c
            }
        };
        self.policy_ids.extend(cached.policy_ids.iter().cloned());
        self.local.insert(attrs.clone(), cached.decision.clone());
        cached.decision.clone()
    }

    /// The categories this record may disclose, shared by every record whose attributes the
    /// field policies cannot tell apart (most often: the same record in another area).
    fn categories(&self, attrs: &RecordAttrs) -> HashSet<String> {
        let key = Key {
            asker: self.asker,
            dataset: self.dataset.to_owned(),
            attrs: self.engine.field_projection(attrs, false),
        };
        let known = self
            .cache
            .categories
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned());
        if let Some(known) = known {
            return known;
        }
        let categories =
            self.engine
                .allowed_categories(self.ask, self.dataset, attrs, self.categories, false);
        remember(&self.cache.categories, key, categories.clone());
        categories
    }

    fn evaluate(&self, attrs: &RecordAttrs) -> Cached {
        let verdict = self
            .engine
            .decide_record(self.ask, self.dataset, attrs, false);
        let categories = if verdict.allowed {
            self.categories(attrs)
        } else {
            Default::default()
        };
        Cached {
            decision: Arc::new(RecordDecision {
                allowed: verdict.allowed,
                categories,
            }),
            policy_ids: verdict.policy_ids,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::shipped_engine;

    fn principal(role: &str, purposes: &[&str]) -> Principal {
        Principal {
            subject: format!("p-{role}"),
            token_id: "t".into(),
            role: role.into(),
            unit: "U".into(),
            areas: vec!["E05011391".into()],
            purposes: purposes.iter().map(|p| (*p).to_owned()).collect(),
            expires_at: i64::MAX,
            issued_at: 0,
            grant_expires_at: None,
        }
    }

    #[test]
    fn memoised_request_decisions_equal_fresh_ones_for_every_caller_purpose_and_action() {
        let (engine, catalog, _) = shipped_engine();
        let cache = DecisionCache::default();
        let mut allowed = 0;
        for role in ["canvasser", "councillor", "analyst", "dpo"] {
            for (purpose, entry) in &catalog.purposes {
                let p = principal(role, &[purpose.as_str()]);
                let ask = engine.ask(&p, purpose, &entry.lawful_basis).unwrap();
                for action in [
                    RequestAction::List,
                    RequestAction::Read,
                    RequestAction::Write,
                    RequestAction::Export,
                ] {
                    for dataset in ["voter", "membership"] {
                        let fresh = engine.decide_request(&ask, action, dataset);
                        for _ in 0..2 {
                            let memo = cache.request(
                                &engine,
                                &ask,
                                &p,
                                purpose,
                                &entry.lawful_basis,
                                action,
                                dataset,
                            );
                            assert_eq!(memo, fresh, "{role} {purpose} {action:?} {dataset}");
                        }
                        allowed += usize::from(fresh.allowed);
                    }
                }
            }
        }
        // Both answers occur, so the comparison means something.
        assert!(allowed > 0 && allowed < 4 * catalog.purposes.len() * 8);
        assert!(cache.requests.lock().unwrap().len() > 100);
    }
}
