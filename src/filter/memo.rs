//! What the filter remembers between the records of one page or export, so that the per-record
//! work is a parse, a fingerprint, two lookups and a copy.
//!
//! - **Decisions per fingerprint.** A page of 100 electors from one district has a handful of
//!   distinct attribute fingerprints (see `attrs::fingerprint`); the attributes are read and
//!   `decide` is asked once per fingerprint, and every other record with that fingerprint gets
//!   the same answer, including "malformed" (withheld, fail closed).
//! - **Field plans per decision and layout.** Which of a record's fields leave depends only on
//!   the decision and the field names in order, so the register and category lookups run once
//!   per pair, and each kept field's name is written out as JSON once.
//!
//! Both are bounded; an export starts its field plans afresh at each audited chunk (so that each
//! chunk's audit record names the fields that chunk carried) but keeps its decisions.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Disclosure, FilterContext, RawRecord, RecordDecision, attrs};
use crate::policy::RecordAttrs;

/// Past this many fingerprints the decision memo starts again (a whole constituency's export
/// has a few thousand).
const MAX_DECISIONS: usize = 65_536;
/// Past this many plans (distinct decisions and layouts) start again: far above real pages.
const MAX_PLANS: usize = 64;

#[derive(Default)]
pub struct Memo {
    /// `None`: records with this fingerprint are malformed.
    decisions: HashMap<Box<[u8]>, Option<Arc<RecordDecision>>, foldhash::fast::RandomState>,
    /// One `Arc` per distinct decision value, so that plans can be found by pointer.
    distinct: Vec<Arc<RecordDecision>>,
    key: Vec<u8>,
    plans: Vec<Plan>,
}

pub(super) struct Plan {
    decision: Arc<RecordDecision>,
    names: Vec<String>,
    /// Per field in layout order: its name as a JSON key with the colon (`"name":`) when it
    /// leaves, `None` when it does not.
    pub(super) keys: Vec<Option<Box<[u8]>>>,
    /// Fields of this layout the asset register does not classify (never written out).
    pub(super) unclassified: u64,
}

impl Memo {
    /// Forgets the field plans, so that the next records add their field names to the
    /// disclosure again; decisions are kept.
    pub fn new_chunk(&mut self) {
        self.plans.clear();
    }

    /// The decision for this record of `subject`, or `None` when its attributes are missing or
    /// malformed.
    pub(super) fn decision(
        &mut self,
        rec: &RawRecord,
        cx: &FilterContext,
        subject: &str,
        decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    ) -> Option<Arc<RecordDecision>> {
        attrs::fingerprint(rec, cx, subject, &mut self.key);
        if let Some(known) = self.decisions.get(self.key.as_slice()) {
            return known.clone();
        }
        let decision = attrs::record_attrs(rec, cx).map(|(_, a)| self.same(decide(&a)));
        if self.decisions.len() >= MAX_DECISIONS {
            self.decisions.clear();
        }
        self.decisions
            .insert(self.key.as_slice().into(), decision.clone());
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
                self.plans.push(Plan::make(rec, cx, verdict, d));
                self.plans.len() - 1
            }
        };
        &self.plans[i]
    }
}

impl Plan {
    fn fits(&self, rec: &RawRecord) -> bool {
        self.names.len() == rec.0.len() && self.names.iter().zip(&rec.0).all(|(a, (b, _))| a == b)
    }

    fn make(
        rec: &RawRecord,
        cx: &FilterContext,
        verdict: &Arc<RecordDecision>,
        d: &mut Disclosure,
    ) -> Plan {
        let mut plan = Plan {
            decision: Arc::clone(verdict),
            names: Vec::with_capacity(rec.0.len()),
            keys: Vec::with_capacity(rec.0.len()),
            unclassified: 0,
        };
        for (name, _) in &rec.0 {
            let keep = match cx.dataset.fields.get(name.as_ref()) {
                Some(category) => verdict.categories.contains(category),
                None => {
                    plan.unclassified += 1;
                    false
                }
            };
            let key = keep.then(|| json_key(name)).flatten();
            if key.is_some() && !d.fields.contains(name.as_ref()) {
                d.fields.insert(name.to_string());
            }
            plan.names.push(name.to_string());
            plan.keys.push(key);
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
