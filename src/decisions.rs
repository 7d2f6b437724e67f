//! Memoised record decisions: Cedar runs once per distinct combination of who is asking, why,
//! which dataset and the record's policy-relevant attributes, not once per record.
//!
//! A page of 500 electors from one ward has a handful of distinct attribute combinations, so
//! it needs a handful of evaluations. Decisions are shared across requests in a bounded cache
//! keyed by everything a decision depends on: the caller's id, role, unit, grants and purposes, the
//! purpose and its basis, the dataset, and the record's area, markers, flags (including the
//! rights register's), consents and TPS freshness. A change to any of those is a different key,
//! so a memoised decision cannot outlive a change of the record's flags; the policies are fixed
//! for the life of the process (a reload builds a new engine and so a new cache). Request-level
//! decisions (may this caller list this dataset for this purpose at all?) are memoised the same
//! way, keyed by every claim and the purpose. The filter's own memos (`MemoPool`), which map a
//! record's attribute fingerprint straight to its decision, are kept here too, per caller,
//! purpose and dataset.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;

use crate::auth::Principal;
use crate::filter::MAX_KEPT_DECISIONS;
use crate::filter::{Memo, RecordDecision};
use crate::policy::{Ask, PolicyEngine, RecordAttrs, RequestAction, Verdict};

/// Past this many entries the cache starts again: simple, bounded, and still near-perfect for
/// the few thousand combinations real traffic produces.
const MAX_ENTRIES: usize = 100_000;

/// A record decision's inputs; for field categories, `attrs` is the engine's projection
/// (only what field policies read).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    asker: Asker,
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
    filters: Vec<String>,
}

/// The policy pack in force and the decisions memoised under it, replaced together by a
/// reload (`rekey::reload_policy`): no decision of one pack is ever taken for another's, and a
/// request keeps the pair it began with (`Gateway::policies`) to its end.
pub struct InForce {
    pub engine: PolicyEngine,
    pub decisions: DecisionCache,
    /// What the pack was read from (`startup::PolicySource::digests`).
    pub digest: Option<crate::startup::PackDigests>,
}

impl InForce {
    /// Whether `now` decides as this pack did: the same pack, or one read from the same
    /// policies and schema (a reload that changed only the pack's tests changes nothing that
    /// decides). A long read (an export, an aggregate) begun under this pack stops when not.
    pub fn decides_as(self: &Arc<Self>, now: &Arc<InForce>) -> bool {
        let rules = |p: &InForce| p.digest.map(|d| d.rules);
        Arc::ptr_eq(self, now) || (rules(self).is_some() && rules(self) == rules(now))
    }
}

/// The shared cache; lives beside the policy engine whose answers it holds.
#[derive(Default)]
pub struct DecisionCache {
    entries: Mutex<HashMap<Key, Arc<RecordDecision>, RandomState>>,
    categories: Mutex<HashMap<Key, HashSet<String>, RandomState>>,
    requests: Mutex<HashMap<RequestKey, Verdict, RandomState>>,
    /// The filter's memos, kept between pages.
    pub memos: MemoPool,
}

impl DecisionCache {
    /// The request-level decision, evaluated once per distinct caller, purpose, action,
    /// dataset and filters named. Keyed by the exact values (not a hash of them), so two callers never share
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
        filters: Vec<String>,
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
            filters,
        };
        if let Some(v) = self.requests.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return v;
        }
        let verdict = engine.decide_request(ask, action, dataset, &key.filters);
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

/// One request's view of the shared cache, for one caller, purpose and dataset.
pub struct Decider<'a> {
    engine: &'a PolicyEngine,
    cache: &'a DecisionCache,
    ask: &'a Ask,
    asker: Asker,
    dataset: &'a str,
    categories: &'a BTreeSet<String>,
}

/// Everything about the caller and purpose a decision can depend on, as the record caches
/// and the memo pool key it: the subject (the Cedar principal, which a policy may name),
/// every claim policies see, the purpose and its lawful basis. Hashed once, when made; two
/// are equal only if all of it is (not merely their hashes), so no two callers ever share a
/// decision, however their hashes fall.
#[derive(Clone)]
pub struct Asker(Arc<AskerKey>);

struct AskerKey {
    hash: u64,
    principal: Arc<Principal>,
    purpose: String,
    lawful_basis: String,
}

impl PartialEq for Asker {
    fn eq(&self, other: &Asker) -> bool {
        let (a, b) = (&*self.0, &*other.0);
        let (p, q) = (&*a.principal, &*b.principal);
        Arc::ptr_eq(&self.0, &other.0)
            || (a.hash == b.hash
                && p.subject == q.subject
                && p.role == q.role
                && p.unit == q.unit
                && p.areas == q.areas
                && p.purposes == q.purposes
                && a.purpose == b.purpose
                && a.lawful_basis == b.lawful_basis)
    }
}

impl Eq for Asker {}

impl Hash for Asker {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

/// The `Asker` of this caller under this purpose. The hash is keyed at random per process.
pub fn asker_key(p: &Arc<Principal>, purpose: &str, lawful_basis: &str) -> Asker {
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let hash = KEYS.get_or_init(Default::default).hash_one((
        &p.subject,
        &p.role,
        &p.unit,
        &p.areas,
        &p.purposes,
        purpose,
        lawful_basis,
    ));
    Asker(Arc::new(AskerKey {
        hash,
        principal: Arc::clone(p),
        purpose: purpose.to_owned(),
        lawful_basis: lawful_basis.to_owned(),
    }))
}

impl<'a> Decider<'a> {
    pub fn new(
        engine: &'a PolicyEngine,
        cache: &'a DecisionCache,
        ask: &'a Ask,
        asker: Asker,
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
        }
    }

    /// The decision for a record with these attributes (its `policy_ids` name the policies
    /// that made it). The filter's memo asks once per distinct fingerprint.
    pub fn decide(&self, attrs: &RecordAttrs) -> Arc<RecordDecision> {
        let key = Key {
            asker: self.asker.clone(),
            dataset: self.dataset.to_owned(),
            attrs: attrs.clone(),
        };
        let cached = self
            .cache
            .entries
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned());
        cached.unwrap_or_else(|| {
            let decision = Arc::new(self.evaluate(attrs));
            remember(&self.cache.entries, key, decision.clone());
            decision
        })
    }

    /// The categories this record may disclose, shared by every record whose attributes the
    /// field policies cannot tell apart (most often: the same record in another area).
    fn categories(&self, attrs: &RecordAttrs) -> HashSet<String> {
        let key = Key {
            asker: self.asker.clone(),
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

    fn evaluate(&self, attrs: &RecordAttrs) -> RecordDecision {
        let verdict = self
            .engine
            .decide_record(self.ask, self.dataset, attrs, false);
        let categories = if verdict.allowed {
            self.categories(attrs)
        } else {
            Default::default()
        };
        RecordDecision {
            allowed: verdict.allowed,
            categories,
            policy_ids: verdict.policy_ids,
        }
    }
}

/// Filter memos kept between pages, one per (caller, purpose, dataset), so that a caller's
/// second page of the same streets costs a fingerprint and a lookup per record. A memo is
/// taken out for one page (no lock while filtering) and put back after; a caller paging in
/// parallel gets a second memo. Bounded in number, each bounded in size.
#[derive(Default)]
pub struct MemoPool {
    kept: Mutex<HashMap<(Asker, String), Vec<Memo>, RandomState>>,
}

/// Memos kept at once, across all callers (each at most `MAX_KEPT_DECISIONS` fingerprints).
const MAX_KEPT_MEMOS: usize = 64;

impl MemoPool {
    /// This caller's memo for this dataset, or a new one.
    pub fn take(&self, asker: Asker, dataset: &str) -> Lease<'_> {
        let key = (asker, dataset.to_owned());
        // A caller's last memo taken leaves no entry behind: an empty one would be what
        // `put_back` forgets to make room, freeing nothing, and the pool would outgrow its
        // bound by as many memos as are out.
        let kept = self.kept.lock().ok().and_then(|mut m| {
            let memos = m.get_mut(&key)?;
            let memo = memos.pop();
            if memos.is_empty() {
                m.remove(&key);
            }
            memo
        });
        Lease {
            pool: self,
            memo: kept.unwrap_or_else(|| Memo::with_limit(MAX_KEPT_DECISIONS)),
            key: Some(key),
        }
    }

    fn put_back(&self, key: (Asker, String), memo: Memo) {
        let Ok(mut m) = self.kept.lock() else {
            return;
        };
        if m.values().map(Vec::len).sum::<usize>() >= MAX_KEPT_MEMOS {
            // Make room by forgetting some other caller's memos (whichever the map yields).
            if let Some(other) = m.keys().find(|k| **k != key).cloned() {
                m.remove(&other);
            } else {
                return;
            }
        }
        m.entry(key).or_default().push(memo);
    }
}

/// A memo out of the pool; it goes back when dropped.
pub struct Lease<'a> {
    pool: &'a MemoPool,
    key: Option<(Asker, String)>,
    memo: Memo,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Memo;
    fn deref(&self) -> &Memo {
        &self.memo
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Memo {
        &mut self.memo
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.pool.put_back(key, std::mem::take(&mut self.memo));
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
            key_id: String::new(),
            key_sha256: String::new(),
        }
    }

    /// A record in Cross Gates & Whinmoor with no marker, flag, consent or TPS check.
    fn plain_record_in_the_ward() -> RecordAttrs {
        RecordAttrs {
            area: "E05011391".into(),
            markers: BTreeSet::new(),
            flags: BTreeSet::new(),
            consented: BTreeSet::new(),
            tps_fresh: false,
        }
    }

    #[test]
    fn memos_come_back_warm_per_caller_and_dataset_and_stay_bounded() {
        use crate::filter::{Envelope, FilterContext, RegisterFlags, filter_page};
        let (_, catalog, _) = shipped_engine();
        let cx = FilterContext {
            dataset: &catalog.datasets["voter"],
            today: crate::filter::today(),
            register: &RegisterFlags::EMPTY,
            filtered_on: &[],
            paging: None,
            must_match: None,
        };
        let body = br#"{"records":[{"elector_id":"VF-1","local_authority":"E08000035","polling_district":"CGW1","markers":[],"flags":[],"consents":null,"tps_checked_at":null,"attainer_date":null}]}"#;
        let pool = MemoPool::default();
        // How many decisions a page asks for through this memo.
        let asks = |memo: &mut Memo| {
            let mut asked = 0;
            let mut decide = |_: &RecordAttrs| {
                asked += 1;
                Arc::new(RecordDecision {
                    allowed: true,
                    categories: HashSet::new(),
                    policy_ids: Vec::new(),
                })
            };
            filter_page(body, Envelope::Records, &cx, &mut decide, memo).unwrap();
            asked
        };
        // Each its own caller, made afresh each time, as each request makes its own.
        let caller = |n: u64| {
            let mut p = principal("councillor", &["canvassing"]);
            p.subject = format!("p-{n}");
            asker_key(&Arc::new(p), "canvassing", "public_task")
        };
        assert_eq!(asks(&mut pool.take(caller(1), "voter")), 1);
        assert_eq!(asks(&mut pool.take(caller(1), "voter")), 0, "back warm");
        assert_eq!(
            asks(&mut pool.take(caller(2), "voter")),
            1,
            "another caller"
        );
        assert_eq!(
            asks(&mut pool.take(caller(1), "membership")),
            1,
            "another dataset"
        );
        {
            // Two pages at once for one caller: the second gets a memo of its own.
            let (mut a, mut b) = (pool.take(caller(1), "voter"), pool.take(caller(1), "voter"));
            assert_eq!((asks(&mut a), asks(&mut b)), (0, 1));
        }
        for n in 100..300 {
            drop(pool.take(caller(n), "voter"));
        }
        {
            let kept = pool.kept.lock().unwrap();
            assert!(kept.values().map(Vec::len).sum::<usize>() <= MAX_KEPT_MEMOS);
            assert!(kept.contains_key(&(caller(299), "voter".to_owned())));
        }
        // With memos out (taken from the pool, their callers' entries emptied), a wave of new
        // callers still finds the pool at its bound, and so does everything put back after.
        let out: Vec<_> = (240..300).map(|n| pool.take(caller(n), "voter")).collect();
        for n in 1000..1200 {
            drop(pool.take(caller(n), "voter"));
        }
        drop(out);
        let kept = pool.kept.lock().unwrap();
        let total = kept.values().map(Vec::len).sum::<usize>();
        assert!(total <= MAX_KEPT_MEMOS, "{total} memos kept");
        assert!(kept.values().all(|memos| !memos.is_empty()));
    }

    #[test]
    fn memoised_request_decisions_equal_fresh_ones_for_every_caller_purpose_and_action() {
        let (engine, catalog, _) = shipped_engine();
        let cache = DecisionCache::default();
        let mut allowed = 0;
        for role in ["canvasser", "councillor", "analyst", "dpo"] {
            for (purpose, entry) in &catalog.purposes {
                let p = principal(role, &[purpose.as_str()]);
                let ask = engine.ask(Arc::new(p.clone()), purpose, &entry.lawful_basis);
                for action in [
                    RequestAction::List,
                    RequestAction::Read,
                    RequestAction::Write,
                    RequestAction::Export,
                    RequestAction::Aggregate,
                ] {
                    for dataset in ["voter", "membership"] {
                        let fresh = engine.decide_request(&ask, action, dataset, &[]);
                        for _ in 0..2 {
                            let memo = cache.request(
                                &engine,
                                &ask,
                                &p,
                                purpose,
                                &entry.lawful_basis,
                                action,
                                dataset,
                                Vec::new(),
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

    /// Two callers whose keys hash alike (forced here; keyed at random, it would take about
    /// 2^32 callers to see it happen) do not share a decision: one's deny, for a record outside
    /// its grants, is not the other's answer for a record inside its own.
    #[test]
    fn callers_whose_keys_hash_alike_do_not_share_decisions() {
        let (engine, catalog, _) = shipped_engine();
        let cache = DecisionCache::default();
        let basis = &catalog.purposes["canvassing"].lawful_basis;
        let categories: BTreeSet<String> =
            catalog.datasets["voter"].fields.values().cloned().collect();
        let attrs = plain_record_in_the_ward();
        let mut outside = principal("councillor", &["canvassing"]);
        outside.areas = vec!["E05011392".into()];
        let inside = principal("councillor", &["canvassing"]);
        let decide = |p: Principal| {
            let p = Arc::new(p);
            let asker = Asker(Arc::new(AskerKey {
                hash: 7,
                principal: Arc::clone(&p),
                purpose: "canvassing".into(),
                lawful_basis: basis.clone(),
            }));
            let ask = engine.ask(p, "canvassing", basis);
            Decider::new(&engine, &cache, &ask, asker, "voter", &categories)
                .decide(&attrs)
                .allowed
        };
        assert!(!decide(outside), "outside its grants");
        assert!(decide(inside), "inside its grants");
    }

    /// A request whose decisions are all memoised never builds its Cedar request: that is
    /// what makes the `Ask` per request cheap. The answers are the ones first computed.
    #[test]
    fn memoised_decisions_leave_the_ask_unbuilt() {
        let (engine, catalog, _) = shipped_engine();
        let cache = DecisionCache::default();
        let basis = &catalog.purposes["canvassing"].lawful_basis;
        let p = principal("councillor", &["canvassing"]);
        let ask = || engine.ask(Arc::new(p.clone()), "canvassing", basis);
        let categories: BTreeSet<String> =
            catalog.datasets["voter"].fields.values().cloned().collect();
        let attrs = plain_record_in_the_ward();
        let asker = asker_key(&Arc::new(p.clone()), "canvassing", basis);
        let decide = |ask: &Ask| {
            let request = cache.request(
                &engine,
                ask,
                &p,
                "canvassing",
                basis,
                RequestAction::List,
                "voter",
                Vec::new(),
            );
            let record = Decider::new(&engine, &cache, ask, asker.clone(), "voter", &categories)
                .decide(&attrs);
            (request, record)
        };
        let first = ask();
        assert!(!first.is_built());
        let answers = decide(&first);
        assert!(first.is_built());
        // Both allowed, with fields: the memo holds a real answer, not a default.
        assert!(answers.0.allowed && answers.1.allowed && !answers.1.categories.is_empty());
        let second = ask();
        assert_eq!(decide(&second), answers);
        assert!(!second.is_built());
    }
}
