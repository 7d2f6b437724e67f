//! What the filter remembers between records, and between pages for the same caller, purpose
//! and dataset, so that the per-record work is a parse, a fingerprint, two lookups and a copy.
//!
//! - **Decisions per fingerprint.** A page of 100 electors from one district has a handful of
//!   distinct attribute fingerprints (see `attrs::fingerprint`); the attributes are read and
//!   `decide` is asked once per fingerprint, and every other record with that fingerprint gets
//!   the same answer, including "malformed" (withheld, fail closed).
//! - **Layouts.** A record's field names in order are its layout; records of a page almost
//!   always share one. Where the policy fields are, which fields the asset register classifies
//!   and whether a name repeats are found once per layout; a record read right after one of
//!   the same layout (`RawRecord::repeats`) is placed without comparing its names again.
//! - **Field plans per decision and layout.** Which of a record's fields leave depends only on
//!   the decision and the layout, so the category lookups run once per pair, and the fields
//!   that leave are found as runs of consecutive fields, each copied out in one piece.
//!
//! A memo is only ever used for one caller, purpose and dataset (the gateway keeps one per
//! triple, `decisions::MemoPool`), and the policies are fixed for its life, so a fingerprint
//! is everything else a decision depends on. Both maps are bounded. What a memo hit must
//! still report is reported per *chunk* (a page, or an export's audited chunk): the first time
//! a chunk uses a decision its policy ids join the disclosure, and the first time it uses a
//! plan its field names do, so each audit record names exactly what its own records carried.
//! Both are marked on the decision and the plan, not on the fingerprint: a page has dozens of
//! fingerprints and a handful of decisions.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::attrs::{self, Roles};
use super::{Disclosure, FilterContext, RawRecord, RecordDecision};
use crate::policy::RecordAttrs;

/// Past this many fingerprints the decision memo starts again (a whole constituency's export
/// has a few thousand).
const MAX_DECISIONS: usize = 65_536;
/// For memos kept between pages (many of them are kept at once).
pub const MAX_KEPT_DECISIONS: usize = 4_096;
/// A fingerprint longer than this is decided for each record and not kept: it holds a
/// record's raw area, marker and flag values, and memos are bounded by how many they keep,
/// not by bytes, so a datastore sending records with long distinct ones (kilobytes of flags
/// each) would fill a pooled memo with gigabytes before it started again. Real fingerprints
/// are a few dozen bytes.
const MAX_KEPT_KEY: usize = 4096;
/// Past this many layouts, or plans for one layout, start again: far above real pages.
pub(super) const MAX_PLANS: usize = 64;

pub struct Memo {
    /// Per fingerprint, its decision; `None`: records with this fingerprint are malformed.
    decisions: HashMap<Key, Option<Decided>, foldhash::fast::RandomState>,
    max_decisions: usize,
    /// Each distinct decision value once: entries and plans name a decision by its index
    /// here, so that plans are found by a comparison of numbers, and a record's decision is
    /// looked at where it is kept rather than an `Arc` cloned and dropped for it (two atomic
    /// operations a record). Cleared only with every entry and plan that indexes it.
    distinct: Vec<Distinct>,
    key: Vec<u8>,
    layouts: Vec<Layout>,
    /// The layout of the last record placed, and which record that was (its list, and its
    /// number in the list).
    last: Option<(usize, u64, u64)>,
    /// The current chunk's number; decisions and plans note the last chunk that reported them.
    chunk: u64,
}

/// A fingerprint as the decision map keeps it: in the map's own storage when it is short, as
/// nearly all are (a few dozen bytes), so that a lookup reads the table and not then a
/// separate allocation too. In an export, whose stream pushes the map out of the cache,
/// comparing the key in that allocation was 3.5% of the profile.
enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

/// Fingerprints up to this many bytes are kept inline.
const INLINE_KEY: usize = 86;

impl Key {
    fn new(key: &[u8]) -> Key {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes[..key.len()].copy_from_slice(key);
                Key::Inline { len, bytes }
            }
            _ => Key::Heap(key.into()),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(bytes) => bytes,
        }
    }
}

// Hashed and compared as the bytes they hold, so that the map can be asked with a `&[u8]`.
impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Key {}

/// What a fingerprint was decided: the decision's index in `Memo::distinct`, and whether its
/// records are ones never disclosed (`RecordAttrs::never_disclosed`), which a datastore asked
/// to leave them out should not have sent.
#[derive(Clone, Copy)]
struct Decided {
    decision: usize,
    never_disclosed: bool,
}

/// One distinct decision value, and the last chunk that reported its policy ids.
struct Distinct {
    decision: Arc<RecordDecision>,
    reported: u64,
}

/// What the memo knows of one layout.
struct Layout {
    names: Vec<String>,
    roles: Roles,
    /// Per field, its category in the asset register; `None` for a field it does not classify
    /// (never written out).
    categories: Vec<Option<String>>,
    unclassified: u64,
    /// The layout names a field twice: its records are malformed, never written out (the
    /// attributes were read from the first, a reader of the output might take the second).
    duplicate_names: bool,
    plans: Vec<Plan>,
}

struct Plan {
    /// The decision's index in `Memo::distinct`.
    decision: usize,
    used: u64,
    /// The fields that leave as runs of consecutive fields, `(first, last)` indexes.
    runs: Vec<(usize, usize)>,
    /// Their names, as the disclosure reports them.
    fields: Arc<BTreeSet<String>>,
    /// Its field set's index in this chunk's `Disclosure::field_sets` (set when `used` is).
    set: u32,
}

/// What becomes of one record.
pub(super) enum Judged<'m, 'a> {
    /// Its policy attributes are missing or malformed, or it names a field twice: withheld.
    Malformed,
    /// Policy refuses it; `never_disclosed`: it is an entry never disclosed in any form.
    Refused { never_disclosed: bool },
    /// It leaves with these runs of consecutive fields (`(first, last)` indexes, in order).
    Leaves {
        subject: Cow<'a, str>,
        runs: &'m [(usize, usize)],
        /// Its fields the asset register does not classify (never written out).
        unclassified: u64,
        /// Its field set's index in `Disclosure::field_sets`.
        set: u32,
    },
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
            layouts: Vec::new(),
            last: None,
            // Above every chunk a new decision or plan is marked as last reported in.
            chunk: 1,
        }
    }

    /// Starts a chunk: the next records report their decisions' policy ids and their plans'
    /// field names to the disclosure again. What the memo knows is kept.
    pub fn new_chunk(&mut self) {
        self.chunk += 1;
    }

    /// Decides what becomes of `rec`: its layout, subject, decision and plan.
    pub(super) fn judge<'a>(
        &mut self,
        rec: &RawRecord<'a>,
        cx: &FilterContext,
        decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
        d: &mut Disclosure,
    ) -> Judged<'_, 'a> {
        let layout = self.place(rec, cx);
        let Some(subject) = attrs::subject(rec, &self.layouts[layout].roles) else {
            return Judged::Malformed;
        };
        let Some(Decided {
            decision: decided,
            never_disclosed,
        }) = self.decision(layout, rec, cx, &subject, decide, d)
        else {
            return Judged::Malformed;
        };
        let Some(verdict) = self.distinct.get(decided).map(|k| &k.decision) else {
            // An index always names a kept decision (they are cleared together); were it
            // not so, the record is withheld.
            return Judged::Malformed;
        };
        // Anonymous electors and under-16s are withheld here whatever the policies say: the
        // policies forbid them too (`markers.cedar`), but an edit that dropped those forbids
        // must not be all that stands between them and a caller.
        if never_disclosed || !verdict.allowed {
            return Judged::Refused { never_disclosed };
        }
        // A record whose decision hides a field the request filtered on is withheld: the
        // datastore chose it by that field's value, which its presence would give away.
        if !(cx.filtered_on.iter()).all(|c| verdict.categories.contains(c)) {
            return Judged::Refused {
                never_disclosed: false,
            };
        }
        if self.layouts[layout].duplicate_names {
            return Judged::Malformed;
        }
        let chunk = self.chunk;
        let l = &mut self.layouts[layout];
        let found = l.plans.iter().position(|p| p.decision == decided);
        let i = match found {
            Some(i) => i,
            None => {
                if l.plans.len() >= MAX_PLANS {
                    l.plans.clear();
                }
                let plan = l.plan(decided, verdict);
                l.plans.push(plan);
                l.plans.len() - 1
            }
        };
        let plan = &mut l.plans[i];
        if plan.used != chunk {
            plan.used = chunk;
            plan.set = d.field_set(&plan.fields);
            if d.fields.is_empty() {
                // A chunk's first plan, and nearly always its only one: a copy of the tree
                // rather than a search and an insert per name (4% of a 10-record request).
                d.fields = (*plan.fields).clone();
            } else {
                for name in plan.fields.iter() {
                    if !d.fields.contains(name) {
                        d.fields.insert(name.clone());
                    }
                }
            }
        }
        Judged::Leaves {
            subject,
            runs: &plan.runs,
            unclassified: l.unclassified,
            set: plan.set,
        }
    }

    /// The index of `rec`'s layout, made the first time it is seen.
    fn place(&mut self, rec: &RawRecord, cx: &FilterContext) -> usize {
        let layout = match self.last {
            Some((l, list, n)) if rec.repeats && rec.list == list && rec.count == n + 1 => l,
            _ => match self.layouts.iter().position(|l| l.fits(rec)) {
                Some(l) => l,
                None => {
                    if self.layouts.len() >= MAX_PLANS {
                        self.layouts.clear();
                    }
                    self.layouts.push(Layout::make(rec, cx));
                    self.layouts.len() - 1
                }
            },
        };
        self.last = Some((layout, rec.list, rec.count));
        layout
    }

    /// The decision for this record of `subject`, or `None` when its attributes are missing
    /// or malformed.
    fn decision(
        &mut self,
        layout: usize,
        rec: &RawRecord,
        cx: &FilterContext,
        subject: &str,
        decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
        d: &mut Disclosure,
    ) -> Option<Decided> {
        let roles = &self.layouts[layout].roles;
        attrs::fingerprint(rec, roles, cx, subject, &mut self.key);
        let decision = match self.decisions.get(self.key.as_slice()) {
            Some(&known) => known,
            None => {
                let read = attrs::read(rec, roles, cx);
                let decision = read.map(|(_, a)| Decided {
                    decision: self.same(decide(&a)),
                    never_disclosed: a.never_disclosed(),
                });
                if self.key.len() <= MAX_KEPT_KEY {
                    if self.decisions.len() >= self.max_decisions {
                        self.decisions.clear();
                    }
                    self.decisions.insert(Key::new(&self.key), decision);
                }
                decision
            }
        };
        if let Some(decided) = decision {
            self.report(decided.decision, d);
        }
        decision
    }

    /// Adds the policy ids of the decision at `i` in `distinct` to the disclosure, unless
    /// this chunk has already.
    fn report(&mut self, i: usize, d: &mut Disclosure) {
        let Some(kept) = self.distinct.get_mut(i) else {
            return;
        };
        if kept.reported == self.chunk {
            return;
        }
        kept.reported = self.chunk;
        for id in &kept.decision.policy_ids {
            if !d.policy_ids.contains(id) {
                d.policy_ids.insert(id.clone());
            }
        }
    }

    /// The index in `distinct` of this decision's value: different attributes often get the
    /// same decision (a handful per page), and they should share their field plans. Past
    /// `MAX_PLANS` values the memo starts again, entries and plans with them, so that no index
    /// outlives what it names.
    fn same(&mut self, decision: Arc<RecordDecision>) -> usize {
        let known = (self.distinct.iter())
            .position(|k| Arc::ptr_eq(&k.decision, &decision))
            .or_else(|| self.distinct.iter().position(|k| k.decision == decision));
        if let Some(known) = known {
            return known;
        }
        if self.distinct.len() >= MAX_PLANS {
            self.distinct.clear();
            self.decisions.clear();
            for layout in &mut self.layouts {
                layout.plans.clear();
            }
        }
        self.distinct.push(Distinct {
            decision,
            // Never reported: every chunk is above 0.
            reported: 0,
        });
        self.distinct.len() - 1
    }
}

impl Layout {
    fn fits(&self, rec: &RawRecord) -> bool {
        self.names.len() == rec.names.len()
            && (self.names.iter().zip(&rec.names)).all(|(a, b)| super::same_name(a, b))
    }

    fn make(rec: &RawRecord, cx: &FilterContext) -> Layout {
        let categories: Vec<_> = (rec.names.iter())
            .map(|name| cx.dataset.fields.get(name.as_ref()).cloned())
            .collect();
        Layout {
            names: rec.names.iter().map(|name| name.to_string()).collect(),
            roles: Roles::find(rec, cx.dataset),
            unclassified: categories.iter().filter(|c| c.is_none()).count() as u64,
            categories,
            duplicate_names: rec.has_duplicate_names(cx.dataset),
            plans: Vec::new(),
        }
    }

    fn plan(&self, decision: usize, verdict: &RecordDecision) -> Plan {
        let kept = (self.categories.iter().enumerate()).filter(|(_, category)| {
            category
                .as_ref()
                .is_some_and(|c| verdict.categories.contains(c))
        });
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, _) in kept {
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == i => *last = i,
                _ => runs.push((i, i)),
            }
        }
        let fields = (runs.iter())
            .flat_map(|&(first, last)| self.names.get(first..=last).unwrap_or_default())
            .cloned()
            .collect();
        Plan {
            decision,
            used: 0,
            runs,
            fields: Arc::new(fields),
            set: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{INLINE_KEY, Key};
    use std::collections::HashMap;

    /// A key is found by its bytes whether it is kept inline or not, and only by them.
    #[test]
    fn keys_inline_or_not_are_their_bytes() {
        let lens = [0, 1, INLINE_KEY - 1, INLINE_KEY, INLINE_KEY + 1, 300];
        let keys: Vec<Vec<u8>> = (lens.iter())
            .map(|&n| (0..n).map(|i| (i % 251) as u8).collect())
            .collect();
        let mut map = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            let key = Key::new(k);
            assert_eq!(key.bytes(), &k[..]);
            assert_eq!(matches!(key, Key::Inline { .. }), k.len() <= INLINE_KEY);
            map.insert(key, i);
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.get(&k[..]), Some(&i));
            // The same bytes but one: another key.
            if let Some((last, rest)) = k.split_last() {
                let mut near = rest.to_vec();
                near.push(last.wrapping_add(1));
                assert_eq!(map.get(&near[..]), None);
            }
        }
        // A shorter key that is the start of a longer one is not it (the padding is not read).
        assert_eq!(map.get(&keys[3][..INLINE_KEY - 2]), None);
    }
}
