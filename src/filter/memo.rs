//! What the filter remembers between records, and between pages for the same caller, purpose
//! and dataset, so that the per-record work is a parse, a fingerprint, two lookups and a copy.
//!
//! - **Decisions per fingerprint.** A page of 100 electors from one district has a handful of
//!   distinct attribute fingerprints (see `attrs::fingerprint`); the attributes are read and
//!   `decide` is asked once per fingerprint, and every other record with that fingerprint gets
//!   the same answer, including "malformed" (withheld, fail closed).
//! - **Field plans per decision and layout.** Which of a record's fields leave depends only on
//!   the decision and the field names in order, so the register and category lookups run once
//!   per pair, and each kept field's name is written out as JSON once.
//!
//! A memo is only ever used for one caller, purpose and dataset (the gateway keeps one per
//! triple, `decisions::MemoPool`), and the policies are fixed for its life, so a fingerprint
//! is everything else a decision depends on. Both maps are bounded. What a memo hit must
//! still report is reported per *chunk* (a page, or an export's audited chunk): the first time
//! a chunk uses a decision its policy ids join the disclosure, and the first time it uses a
//! plan its field names do, so each audit record names exactly what its own records carried.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Disclosure, FilterContext, RawRecord, RecordDecision, attrs};
use crate::policy::RecordAttrs;

/// Past this many fingerprints the decision memo starts again (a whole constituency's export
/// has a few thousand).
const MAX_DECISIONS: usize = 65_536;
/// For memos kept between pages (many of them are kept at once).
pub const MAX_KEPT_DECISIONS: usize = 4_096;
/// Past this many plans (distinct decisions and layouts) start again: far above real pages.
const MAX_PLANS: usize = 64;

pub struct Memo {
    decisions: HashMap<Box<[u8]>, Entry, foldhash::fast::RandomState>,
    max_decisions: usize,
    /// One `Arc` per distinct decision value, so that plans can be found by pointer.
    distinct: Vec<Arc<RecordDecision>>,
    key: Vec<u8>,
    plans: Vec<Plan>,
    /// The current chunk's number; entries and plans note the last chunk that used them.
    chunk: u64,
}

struct Entry {
    /// `None`: records with this fingerprint are malformed.
    decision: Option<Arc<RecordDecision>>,
    used: u64,
}

pub(super) struct Plan {
    decision: Arc<RecordDecision>,
    used: u64,
    names: Vec<String>,
    /// Per field in layout order: its name as a JSON key with the colon (`"name":`) when it
    /// leaves, `None` when it does not.
    pub(super) keys: Vec<Option<Box<[u8]>>>,
    /// Fields of this layout the asset register does not classify (never written out).
    pub(super) unclassified: u64,
    /// The layout names a field twice: its records are malformed, never written out (the
    /// attributes were read from the first, a reader of the output might take the second).
    pub(super) duplicate_names: bool,
}

impl Default for Memo {
    fn default() -> Self {
        Memo::with_limit(MAX_DECISIONS)
    }
}

impl Memo {
    /// A memo that remembers at most `max_decisions` fingerprints.
    pub fn with_limit(max_decisions: usize) -> Self {
        Memo {
            decisions: HashMap::default(),
            max_decisions,
            distinct: Vec::new(),
            key: Vec::new(),
            plans: Vec::new(),
            // Above every `used` a new entry or plan starts with.
            chunk: 1,
        }
    }

    /// Starts a chunk: the next records report their decisions' policy ids and their plans'
    /// field names to the disclosure again. What the memo knows is kept.
    pub fn new_chunk(&mut self) {
        self.chunk += 1;
    }

    /// The decision for this record of `subject`, or `None` when its attributes are missing or
    /// malformed.
    pub(super) fn decision(
        &mut self,
        rec: &RawRecord,
        cx: &FilterContext,
        subject: &str,
        decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
        d: &mut Disclosure,
    ) -> Option<Arc<RecordDecision>> {
        attrs::fingerprint(rec, cx, subject, &mut self.key);
        if let Some(known) = self.decisions.get_mut(self.key.as_slice()) {
            if known.used != self.chunk {
                known.used = self.chunk;
                report_ids(known.decision.as_deref(), d);
            }
            return known.decision.clone();
        }
        let decision = attrs::record_attrs(rec, cx).map(|(_, a)| self.same(decide(&a)));
        report_ids(decision.as_deref(), d);
        if self.decisions.len() >= self.max_decisions {
            self.decisions.clear();
        }
        let entry = Entry {
            decision: decision.clone(),
            used: self.chunk,
        };
        self.decisions.insert(self.key.as_slice().into(), entry);
        decision
    }

    /// The one `Arc` for this decision's value: different attributes often get the same
    /// decision (a handful per page), and they should share their field plans.
    fn same(&mut self, decision: Arc<RecordDecision>) -> Arc<RecordDecision> {
        let known = (self.distinct.iter().find(|d| Arc::ptr_eq(d, &decision)))
            .or_else(|| self.distinct.iter().find(|d| *d == &decision));
        if let Some(known) = known {
            return Arc::clone(known);
        }
        if self.distinct.len() >= MAX_PLANS {
            self.distinct.clear();
        }
        self.distinct.push(Arc::clone(&decision));
        decision
    }

    /// The plan for this record under this decision, made (and its field names added to the
    /// disclosure) the first time the pair is seen.
    pub(super) fn plan(
        &mut self,
        rec: &RawRecord,
        cx: &FilterContext,
        verdict: &Arc<RecordDecision>,
        d: &mut Disclosure,
    ) -> &Plan {
        let found = self
            .plans
            .iter()
            .position(|p| Arc::ptr_eq(&p.decision, verdict) && p.fits(rec));
        let i = match found {
            Some(i) => i,
            None => {
                if self.plans.len() >= MAX_PLANS {
                    self.plans.clear();
                }
                self.plans.push(Plan::make(rec, cx, verdict));
                self.plans.len() - 1
            }
        };
        let plan = &mut self.plans[i];
        if plan.used != self.chunk {
            plan.used = self.chunk;
            let kept = plan.names.iter().zip(&plan.keys);
            for (name, _) in kept.filter(|(_, key)| key.is_some()) {
                if !d.fields.contains(name) {
                    d.fields.insert(name.clone());
                }
            }
        }
        plan
    }
}

fn report_ids(decision: Option<&RecordDecision>, d: &mut Disclosure) {
    for id in decision.map_or(&[][..], |v| &v.policy_ids) {
        if !d.policy_ids.contains(id) {
            d.policy_ids.insert(id.clone());
        }
    }
}

impl Plan {
    fn fits(&self, rec: &RawRecord) -> bool {
        self.names.len() == rec.0.len()
            && (self.names.iter().zip(&rec.0)).all(|(a, (b, _))| super::same_name(a, b))
    }

    fn make(rec: &RawRecord, cx: &FilterContext, verdict: &Arc<RecordDecision>) -> Plan {
        let mut plan = Plan {
            decision: Arc::clone(verdict),
            used: 0,
            names: Vec::with_capacity(rec.0.len()),
            keys: Vec::with_capacity(rec.0.len()),
            unclassified: 0,
            duplicate_names: rec.has_duplicate_names(),
        };
        for (name, _) in &rec.0 {
            let keep = match cx.dataset.fields.get(name.as_ref()) {
                Some(category) => verdict.categories.contains(category),
                None => {
                    plan.unclassified += 1;
                    false
                }
            };
            plan.names.push(name.to_string());
            plan.keys.push(keep.then(|| json_key(name)).flatten());
        }
        plan
    }
}

/// `"name":`, escaped as JSON.
fn json_key(name: &str) -> Option<Box<[u8]>> {
    let mut out = serde_json::to_vec(name).ok()?;
    out.push(b':');
    Some(out.into_boxed_slice())
}
