//! Memoised record decisions: Cedar runs once per distinct combination of who is asking, why,
//! which dataset and the record's policy-relevant attributes, not once per record.
//!
//! A page of 500 electors from one ward has a handful of distinct attribute combinations, so
//! it needs a handful of evaluations. Decisions are shared across requests in a bounded cache
//! keyed by everything a decision depends on: the caller's role, unit, grants and purposes, the
//! purpose and its basis, the dataset, and the record's area, markers, flags (including the
//! rights register's), consents and TPS freshness. A change to any of those is a different key,
//! so a memoised decision cannot outlive a change of the record's flags; the policies are fixed
//! for the life of the process (a reload builds a new engine and so a new cache).

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::auth::Principal;
use crate::filter::RecordDecision;
use crate::policy::{Ask, PolicyEngine, RecordAttrs};

/// Past this many entries the cache starts again: simple, bounded, and still near-perfect for
/// the few thousand combinations real traffic produces.
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    asker: u64,
    dataset: String,
    attrs: RecordAttrs,
}

/// The shared cache; lives beside the policy engine whose answers it holds.
#[derive(Default)]
pub struct DecisionCache {
    entries: Mutex<HashMap<Key, Arc<Cached>>>,
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
    local: HashMap<RecordAttrs, Arc<RecordDecision>>,
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
            local: HashMap::new(),
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
                if let Ok(mut m) = self.cache.entries.lock() {
                    if m.len() >= MAX_ENTRIES {
                        m.clear();
                    }
                    m.insert(key, c.clone());
                }
                c
            }
        };
        self.policy_ids.extend(cached.policy_ids.iter().cloned());
        self.local.insert(attrs.clone(), cached.decision.clone());
        cached.decision.clone()
    }

    fn evaluate(&self, attrs: &RecordAttrs) -> Cached {
        let verdict = self
            .engine
            .decide_record(self.ask, self.dataset, attrs, false);
        let categories = if verdict.allowed {
            self.engine
                .allowed_categories(self.ask, self.dataset, attrs, self.categories, false)
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
