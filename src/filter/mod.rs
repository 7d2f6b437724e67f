//! Row and field filtering over an upstream body, without building a document tree.
//!
//! A page is filtered as it is scanned (`scan`: a validating JSON scanner), record by record,
//! each read as its field names and where each raw JSON value lies in the body: only the
//! handful of policy-relevant fields (area, markers, flags, consents, TPS date, subject id) are
//! parsed (`attrs`). A record that repeats the keys of the one before it (as a page's records
//! do) is read by comparing each key's bytes with that one's, and where its policy fields are
//! is known from its layout.
//! `decide` is asked once per distinct attribute fingerprint and field plans are made once per
//! decision and layout (`memo`, which a caller's pages share); kept fields are copied out byte
//! for byte. Nothing is written out unless the whole body is valid JSON. A field the
//! asset register does not classify is never written out. A record whose policy attributes are
//! missing or malformed, or that names a field twice, is withheld (fail closed) and counted.
//! This module is pure: bytes and a decision function in, bytes and a disclosure summary out;
//! it knows nothing of Cedar or HTTP.

mod attrs;
mod memo;
mod register;
pub(crate) mod scan;
mod subjects;

pub use attrs::{
    UNDER_16, days_from_iso_date, fold as fold_word, may_be_under_16, record_attrs, today,
    under_16_on,
};
use memo::Judged;
pub use memo::{MAX_KEPT_DECISIONS, Memo};
pub use register::RegisterFlags;
pub use subjects::Subjects;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::catalog::Dataset;
use crate::policy::RecordAttrs;
use scan::{Gap, Scan, ScanError, Written};

/// What policy decided for one distinct combination of record attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordDecision {
    pub allowed: bool,
    /// Field categories this record may disclose.
    pub categories: HashSet<String>,
    /// The policies that decided (for the audit record), sorted.
    pub policy_ids: Vec<String>,
}

/// What left, for the audit log and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Disclosure {
    pub subjects: Subjects,
    /// Every field that left, for any subject.
    pub fields: BTreeSet<String>,
    /// Each distinct set of fields a subject left with, once (records of one kind under one
    /// decision leave with one set; a page nearly always has one), and for each subject, in
    /// `subjects` order, the index of its set here: what a subject access report says was
    /// disclosed about that person, not about the page (`AuditRecord::fields_by_subject`).
    pub field_sets: Vec<Arc<BTreeSet<String>>>,
    pub subject_sets: Vec<u32>,
    /// The policies behind the decisions applied, whether the record left or not.
    pub policy_ids: BTreeSet<String>,
    pub rows_withheld: u64,
    /// Of those, entries never disclosed in any form (`RecordAttrs::never_disclosed`): a
    /// datastore asked to leave them out of listings and exports should have sent none.
    pub never_disclosed_rows: u64,
    pub malformed_rows: u64,
    /// Of `rows_withheld`, records that did not meet the listing's filter
    /// (`FilterContext::must_match`): the datastore ignored it.
    pub mismatched_rows: u64,
    pub unclassified_fields: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("upstream body is not the expected JSON: {0}")]
    Malformed(String),
}

/// A test a record's field must pass (`FilterContext::must_match`).
pub type Meets<'a> = dyn Fn(&str) -> bool + Sync + 'a;

/// Per-request inputs that are not in the record itself.
pub struct FilterContext<'a> {
    pub dataset: &'a Dataset,
    /// Days since 1970-01-01 today, for the TPS freshness check.
    pub today: i64,
    /// Extra flags per subject id, from the rights register (asked about every record).
    pub register: &'a RegisterFlags,
    /// The categories of the fields the request filtered on: a record leaves (or is counted)
    /// only where its decision lets the caller see every one of them, so that a filter is
    /// never an oracle for a field the purpose may not see (profiling narrowing by postcode
    /// prefix, an email round by membership status).
    pub filtered_on: &'a [String],
    /// For a listing in the wardgate API: the page and page size it asked the datastore for.
    /// The answer's paging values are then written from them (`next_page` only `null` or the
    /// page after), not passed on as they came: bytes no filter judged, which a datastore
    /// could fill with a record's id (a cursor) or anything else of ten digits.
    pub paging: Option<(u32, u32)>,
    /// A field every record of a listing must meet a filter on, and the test: a look-up
    /// purpose's listing names a postcode, and a datastore that ignored it would hand the
    /// look-up a whole area's list, page by page. A record that does not meet it (or has no
    /// such field) is withheld and counted (`Disclosure::mismatched_rows`).
    pub must_match: Option<(&'a str, &'a Meets<'a>)>,
}

impl<'a> FilterContext<'a> {
    /// Records of `dataset`, judged today against `register`.
    pub fn new(dataset: &'a Dataset, register: &'a RegisterFlags) -> Self {
        FilterContext {
            dataset,
            today: today(),
            register,
            filtered_on: &[],
            paging: None,
            must_match: None,
        }
    }

    /// The same, for a listing that asked for `page` of `per_page` records.
    pub fn paged(self, page: u32, per_page: u32) -> Self {
        FilterContext {
            paging: Some((page, per_page)),
            ..self
        }
    }

    /// The same, for a listing whose records must each have a `field` that `meets` passes.
    pub fn must_match(self, field: &'a str, meets: &'a Meets<'a>) -> Self {
        FilterContext {
            must_match: Some((field, meets)),
            ..self
        }
    }

    /// The same, for a request that filtered on fields of these categories.
    pub fn filtered_on(self, categories: &'a [String]) -> Self {
        FilterContext {
            filtered_on: categories,
            ..self
        }
    }
}

/// One record as its field names (decoded) and where each field is in the text it was read
/// from, borrowed from the body. Every value has been checked as JSON (`scan`). One list is
/// reused for a body's records, and it remembers how the last one wrote its keys: records of a
/// page almost always repeat them, and such a record is read by comparing each key's bytes with
/// the last one's (`read_again`), its names left as they were.
pub struct RawRecord<'a> {
    /// The field names in wire order, decoded; left from the record before where its keys
    /// repeat (`read_again`).
    names: Vec<Cow<'a, str>>,
    /// The text the record was read from, and per field where it is in that text:
    /// consecutive fields that leave are copied out as one run of bytes.
    text: &'a str,
    spans: Vec<Span>,
    /// Each key of the last record as written, where it had no escapes.
    written: Vec<Option<Written<'a>>>,
    /// And each with its separator and whitespace: what lay between the value before it (or
    /// the record's opening) and its own value.
    gaps: Vec<Option<Gap<'a>>>,
    /// Every key had no escapes (and there is at least one): the next record may be read by
    /// comparison alone (`read_again`).
    comparable: bool,
    /// The keys are, in order, exactly those of the record read before into this list.
    repeats: bool,
    /// This list (unique in the process) and how many records have been read into it: a memo
    /// trusts `repeats` only for the record right after the one it last placed.
    list: u64,
    count: u64,
    /// The dataset's consents field, whose channel states are read as it is scanned
    /// (`attrs::take_consents`): every record's fingerprint needs them, and reading them
    /// apart scans the value a second time (a tenth of a page's instructions).
    consents_field: Option<Box<str>>,
    /// Where this record's first field of that name is, whether its states could be read,
    /// and the states as the fingerprint writes them.
    consents: Option<(usize, bool)>,
    consent_states: Vec<u8>,
    /// The keys of the last consents value read, as written.
    consent_keys: attrs::ConsentKeys<'a>,
    /// Where the last record had it.
    consents_before: Option<usize>,
    /// The day consents are read on (`FilterContext::today`): a consent dated later is not
    /// yet given.
    today: i64,
    /// For `nests`: the fields of this layout that may not hold nested values (classified,
    /// and neither `structured` nor the consents field), by index, worked out at the first
    /// record of a layout (`read_any` forgets them): looking each name up in the asset
    /// register at every record was a twentieth of a page's filter.
    flat_fields: std::cell::RefCell<Option<Vec<usize>>>,
}

/// Where one field of a record is in its text: its key's opening quote, its value's first
/// byte, and the byte after its value; and whether the value nests.
#[derive(Debug, Clone, Copy)]
struct Span {
    key: usize,
    value: usize,
    end: usize,
    /// The value is an object or an array holding an object or an array, as the scanner found
    /// it (`Scan::nested_values`); for the consents field, read apart, any object or array.
    nests: bool,
}

impl<'a> RawRecord<'a> {
    /// A list for records of `ds` (`None`: of no dataset in particular), read on `today`.
    fn new(ds: Option<&Dataset>, today: i64) -> Self {
        static LISTS: AtomicU64 = AtomicU64::new(0);
        RawRecord {
            names: Vec::with_capacity(32),
            text: "",
            spans: Vec::with_capacity(32),
            written: Vec::with_capacity(32),
            gaps: Vec::with_capacity(32),
            comparable: false,
            repeats: false,
            list: LISTS.fetch_add(1, Ordering::Relaxed),
            count: 0,
            consents_field: ds.and_then(|ds| ds.consents_field.as_deref().map(Box::from)),
            consents: None,
            consent_states: Vec::new(),
            consent_keys: attrs::ConsentKeys::default(),
            consents_before: None,
            today,
            flat_fields: std::cell::RefCell::new(None),
        }
    }

    /// A whole text that is one JSON object.
    pub fn parse(text: &'a str) -> Result<Self, FilterError> {
        let mut scan = Scan::new(text);
        let mut rec = RawRecord::new(None, today());
        rec.read(&mut scan)?;
        scan.end()?;
        Ok(rec)
    }

    /// Reads the object that comes next in place of the record before.
    fn read(&mut self, scan: &mut Scan<'a>) -> Result<(), ScanError> {
        self.text = scan.text_scanned();
        self.count += 1;
        // Nearly every record of a page: its keys written as the last one's, byte for byte.
        if self.comparable {
            let start = scan.mark();
            if self.read_again(scan).is_some() {
                self.repeats = true;
                return Ok(());
            }
            scan.reset(start);
        }
        self.read_any(scan)
    }

    /// Reads a record whose keys are, in order, the last record's written the same way: each
    /// key is taken by comparing its bytes, with its comma, its colon and the whitespace around
    /// them, with the last one's (`Scan::gap_written`), and the names stay as they are. `None`
    /// at the first difference and at anything malformed: the caller then reads the record
    /// again from its start with `read_any`, which says what is wrong.
    /// (Consents keys noted meanwhile are only hints, checked byte for byte where used.)
    fn read_again(&mut self, scan: &mut Scan<'a>) -> Option<()> {
        self.spans.clear();
        self.consents = None;
        scan.begin_object().ok()?;
        for (i, gap) in self.gaps.iter().enumerate() {
            let key = scan.gap_written((*gap)?)?;
            let nested = scan.nested_values();
            let (value, nests) = if self.consents_before == Some(i) {
                let (value, read) = attrs::take_consents(
                    scan,
                    &mut self.consent_keys,
                    &mut self.consent_states,
                    self.today,
                )
                .ok()?;
                self.consents = Some((i, read));
                (scan.pos() - value.len(), may_nest(value))
            } else {
                let value = scan.value_start().ok()?;
                (value, scan.nested_values() != nested)
            };
            self.spans.push(Span {
                key,
                value,
                end: scan.pos(),
                nests,
            });
        }
        scan.end_object().then_some(())
    }

    /// Reads any object, noting how its keys are written for the next.
    fn read_any(&mut self, scan: &mut Scan<'a>) -> Result<(), ScanError> {
        self.names.clear();
        *self.flat_fields.get_mut() = None;
        self.spans.clear();
        self.repeats = false;
        let mut repeats = true;
        scan.begin_object()?;
        let mut first = true;
        let mut i = 0;
        self.consents = None;
        while let Some((key, gap)) =
            scan.next_key_gap(&mut first, self.written.get(i).copied().flatten())?
        {
            // The consents field (its first key of that name): a key written as the last
            // record's at this place is it only where that record's was (a key repeated
            // further on makes the record malformed, and the fingerprint then reads the value
            // apart); any other key, by its name.
            let consents = self.consents.is_none()
                && match &self.consents_field {
                    None => false,
                    Some(_) if key.expected => self.consents_before == Some(i),
                    Some(name) => same_name(&key.name, name),
                };
            let nested = scan.nested_values();
            let (value, nests) = if consents {
                let (value, read) = attrs::take_consents(
                    scan,
                    &mut self.consent_keys,
                    &mut self.consent_states,
                    self.today,
                )?;
                self.consents = Some((i, read));
                (value, may_nest(value))
            } else {
                let value = scan.value()?;
                (value, scan.nested_values() != nested)
            };
            repeats &= key.expected;
            // A key taken as expected is written as the one noted (the same bytes).
            if !key.expected {
                note(&mut self.written, i, key.written);
            }
            note(&mut self.gaps, i, gap);
            self.names.push(key.name);
            let end = scan.pos();
            self.spans.push(Span {
                key: key.at,
                value: end - value.len(),
                end,
                nests,
            });
            i += 1;
        }
        repeats &= i == self.written.len();
        self.written.truncate(i);
        self.gaps.truncate(i);
        self.comparable = i > 0 && self.gaps.iter().all(Option::is_some);
        self.repeats = repeats;
        self.consents_before = self.consents.map(|(at, _)| at);
        Ok(())
    }

    /// The consents states read as the field at `at` was scanned (`take_consents`): `None`
    /// when that field was not read so; `Some(None)` when its value is not in the shape of
    /// consents.
    fn consents_taken(&self, at: Option<usize>) -> Option<Option<&[u8]>> {
        match self.consents {
            Some((taken, read)) if Some(taken) == at => {
                Some(read.then_some(self.consent_states.as_slice()))
            }
            _ => None,
        }
    }

    /// The value of the first field named `name`, as written.
    pub fn field(&self, name: &str) -> Option<&'a str> {
        self.value(self.position(name))
    }

    /// The index of the first field named `name`. (A record that names a field twice is never
    /// written out: see `memo::Layout`.)
    fn position(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|k| same_name(k, name))
    }

    /// The value of the field at `at`.
    fn value(&self, at: Option<usize>) -> Option<&'a str> {
        let span = self.spans.get(at?)?;
        self.text.get(span.value..span.end)
    }

    /// Whether some field is named twice, or a field the gateway reads a record's area, id or
    /// protection from is also named otherwise (`Markers`, `ATTAINER_DATE`: the same letters
    /// and digits): such a record is malformed (which of the two would a reader take? the
    /// policies would be asked about one while a reader of the output, or a datastore that
    /// ignores case, took the other). Asked once per layout.
    fn has_duplicate_names(&self, ds: &Dataset) -> bool {
        let mut seen = HashSet::with_capacity(self.names.len());
        if !self.names.iter().all(|k| seen.insert(k.as_ref())) {
            return true;
        }
        let policy: Vec<(String, String)> = (ds.policy_fields().into_iter())
            .map(|f| (attrs::fold(&f), f))
            .collect();
        self.names.iter().any(|name| {
            let folded = attrs::fold(name);
            (policy.iter()).any(|(p, exact)| *p == folded && exact.as_str() != name.as_ref())
        })
    }
}

/// Notes how the key at `i` of a record (or of its consents) was written, for the next one.
fn note<T>(list: &mut Vec<Option<T>>, i: usize, written: Option<T>) {
    match list.get_mut(i) {
        Some(w) => *w = written,
        None => list.push(written),
    }
}

/// Field-name equality, inlined: names are short, and a call into `memcmp` for each of a
/// record's names (plan and attribute lookups) was a twentieth of a page's time.
#[inline]
fn same_name(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    // Whole words, the last one overlapping the one before where the length is not a
    // multiple of the word: two loads for a field name (or a key written with its quotes
    // and colon, up to 32 bytes, in vector registers).
    if (16..=32).contains(&n) {
        let word = |s: &[u8], at: usize| {
            let mut w = [0; 16];
            w.copy_from_slice(&s[at..at + 16]);
            wide::u8x16::new(w)
        };
        let same = word(a, 0).cmp_eq(word(b, 0)) & word(a, n - 16).cmp_eq(word(b, n - 16));
        return same.move_mask() == 0xffff;
    }
    if n >= 8 {
        let word = |s: &[u8], at: usize| {
            let mut w = [0; 8];
            w.copy_from_slice(&s[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let mut at = 0;
        while at + 8 < n {
            if word(a, at) != word(b, at) {
                return false;
            }
            at += 8;
        }
        return word(a, n - 8) == word(b, n - 8);
    }
    if n >= 4 {
        let word = |s: &[u8], at: usize| {
            let mut w = [0; 4];
            w.copy_from_slice(&s[at..at + 4]);
            u32::from_le_bytes(w)
        };
        return word(a, 0) == word(b, 0) && word(a, n - 4) == word(b, n - 4);
    }
    a.iter().zip(b).all(|(p, q)| p == q)
}

/// How an upstream wraps the records it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// wardgate's own datastore API: `{"records": [...], "page", "per_page", "next_page"}` and
    /// `{"record": {...}}`.
    Records,
    /// Datasette: `{"rows": [...], ...}` for pages and single rows. Paging is by limit and
    /// offset, so the page numbers come from the request.
    Rows { page: u32, per_page: u32 },
}

impl From<ScanError> for FilterError {
    fn from(e: ScanError) -> Self {
        FilterError::Malformed(e.to_string())
    }
}

/// The body as text: checked with vector instructions (`simdutf8`, several times `std`'s
/// speed; the check was 3% of a page), and again with `std` only to say where it fails.
fn utf8(body: &[u8]) -> Result<&str, FilterError> {
    simdutf8::basic::from_utf8(body)
        .or_else(|_| std::str::from_utf8(body).map_err(|e| FilterError::Malformed(e.to_string())))
}

fn malformed(what: &str) -> FilterError {
    FilterError::Malformed(format!("no {what} in the body"))
}

fn duplicate(what: &str) -> FilterError {
    FilterError::Malformed(format!("`{what}` twice in the body"))
}

/// A paging value as the datastore API gives it: a whole number, or `null` for the last
/// page's `next_page`. It is passed on as it came, so anything else (an object, or a string
/// cursor that could spell out a record's values) would leave unfiltered: the page is refused.
fn paging_value<'a>(name: &str, v: &'a str) -> Result<&'a str, FilterError> {
    let whole = (1..=10).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit());
    if whole || (name == "next_page" && v == "null") {
        Ok(v)
    } else {
        Err(FilterError::Malformed(format!(
            "`{name}` is not a whole number{}",
            if name == "next_page" { " or null" } else { "" }
        )))
    }
}

/// At most this many subject ids are made room for ahead of a page's records (past it, the
/// list grows as it fills).
const MAX_IDS_RESERVED: usize = 4_096;

/// Filters a page; the answer is always `{"records": [...], "page", "per_page", "next_page"}`,
/// the paging values whole numbers (`next_page` may be `null`) or the page is refused.
/// `memo` may come from earlier pages for the same caller, purpose and dataset (see `Memo`).
/// Records are filtered as the page is scanned, each read into one reused field list; nothing
/// is returned unless the whole body is valid JSON.
pub fn filter_page(
    body: &[u8],
    envelope: Envelope,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    memo: &mut Memo,
) -> Result<(Vec<u8>, Disclosure), FilterError> {
    let (records_key, paging_keys) = match envelope {
        Envelope::Records => ("records", &["page", "per_page", "next_page"][..]),
        Envelope::Rows { .. } => ("rows", &[][..]),
    };
    let mut scan = Scan::new(utf8(body)?);
    let mut out = Vec::with_capacity(body.len());
    let mut d = Disclosure::default();
    let mut records = None;
    let mut paging = [None; 3];
    // Datasette's mark of a page cut short at its `max_returned_rows`.
    let mut truncated = None;
    memo.new_chunk();
    out.extend_from_slice(b"{\"records\":[");
    scan.begin_object()?;
    let mut first_key = true;
    while let Some(key) = scan.next_key(&mut first_key)? {
        if key == records_key {
            if records.is_some() {
                return Err(duplicate(records_key));
            }
            let mut rec = RawRecord::new(Some(cx.dataset), cx.today);
            let (mut n, mut first, mut none_out) = (0, true, true);
            scan.begin_array()?;
            while scan.next_element(&mut first)? {
                let at = scan.pos();
                rec.read(&mut scan)?;
                n += 1;
                let start = out.len();
                if !none_out {
                    out.push(b',');
                }
                if write_record(&rec, cx, decide, memo, &mut out, &mut d) {
                    if none_out {
                        // Room for the ids of as many more records as the rest of the
                        // body would hold were they all this one's size.
                        let each = (scan.pos() - at).max(1);
                        let rest = (body.len() - scan.pos()) / each;
                        d.subjects.reserve_like_last(rest.min(MAX_IDS_RESERVED));
                    }
                    none_out = false;
                } else {
                    out.truncate(start);
                }
            }
            records = Some(n);
        } else if let Some(i) = paging_keys.iter().position(|p| *p == key) {
            if paging[i].is_some() {
                return Err(duplicate(paging_keys[i]));
            }
            paging[i] = Some(paging_value(paging_keys[i], scan.value()?)?);
        } else if matches!(envelope, Envelope::Rows { .. }) && key == "truncated" {
            // Named twice, which would a reader take? (The last `false` would pass a page cut
            // short as the last one.)
            if truncated.is_some() {
                return Err(duplicate("truncated"));
            }
            truncated = Some(scan.value()? != "false");
        } else {
            scan.value()?;
        }
    }
    scan.end()?;
    let records = records.ok_or_else(|| malformed(&format!("`{records_key}`")))?;
    out.push(b']');
    match envelope {
        Envelope::Records => match cx.paging {
            Some((page, per_page)) => {
                let [said, _, next] = paging;
                if said.is_some_and(|p| p != page.to_string()) {
                    return Err(FilterError::Malformed(format!(
                        "the datastore answered page {} for page {page}",
                        said.unwrap_or_default()
                    )));
                }
                let next = match next {
                    None | Some("null") => "null".to_owned(),
                    Some(n) if page.checked_add(1).is_some_and(|p| n == p.to_string()) => {
                        n.to_owned()
                    }
                    Some(n) => {
                        return Err(FilterError::Malformed(format!(
                            "`next_page` {n} is not the page after {page} (nor null)"
                        )));
                    }
                };
                out.extend_from_slice(
                    format!(",\"page\":{page},\"per_page\":{per_page},\"next_page\":{next}")
                        .as_bytes(),
                );
            }
            None => {
                for (name, v) in paging_keys.iter().zip(paging) {
                    if let Some(v) = v {
                        out.extend_from_slice(format!(",\"{name}\":").as_bytes());
                        out.extend_from_slice(v.as_bytes());
                    }
                }
            }
        },
        Envelope::Rows { page, per_page } => {
            // The page's length is how the caller learns it was the last: a page the
            // datastore cut short would end a walk list early without a word, and one longer
            // than asked for (a canned query ignoring `:limit`) would page for ever, past the
            // quota held for it.
            if truncated == Some(true) {
                return Err(FilterError::Malformed(
                    "the datastore cut the page short (`truncated`): its `max_returned_rows` \
                     must be at least the dataset's `max_per_page`"
                        .to_owned(),
                ));
            }
            if u32::try_from(records).map_or(true, |n| n > per_page) {
                return Err(FilterError::Malformed(format!(
                    "{records} rows for a page of {per_page}: the canned query must honour \
                     `:limit` and `:offset`"
                )));
            }
            // A full page may have a successor; a short one is the last.
            let full = u32::try_from(records).is_ok_and(|n| n >= per_page);
            // (No page follows the last a `u32` can number.)
            let next = match page.checked_add(1) {
                Some(next) if full => next.to_string(),
                _ => "null".to_owned(),
            };
            out.extend_from_slice(
                format!(",\"page\":{page},\"per_page\":{per_page},\"next_page\":{next}").as_bytes(),
            );
        }
    }
    out.push(b'}');
    Ok((out, d))
}

impl Disclosure {
    /// The index of `fields` in `field_sets`, added if it is not there yet (asked once per
    /// plan per chunk, so the search is over the one or two sets a chunk has).
    fn field_set(&mut self, fields: &Arc<BTreeSet<String>>) -> u32 {
        let at = (self.field_sets.iter()).position(|s| Arc::ptr_eq(s, fields) || s == fields);
        let at = at.unwrap_or_else(|| {
            self.field_sets.push(Arc::clone(fields));
            self.field_sets.len() - 1
        });
        u32::try_from(at).unwrap_or(u32::MAX)
    }

    /// The fields each subject left with, for the audit record: `None` when every subject
    /// left with the same ones (then `fields` says it).
    pub fn fields_by_subject(&self) -> Option<crate::audit::FieldsBySubject> {
        if self.field_sets.len() < 2 {
            return None;
        }
        // Each set's subjects, by their places in `subjects` (in order).
        let mut members = vec![Vec::new(); self.field_sets.len()];
        for (n, &set) in self.subject_sets.iter().enumerate() {
            if let Some(m) = members.get_mut(set as usize) {
                m.push(u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
        // The set most subjects left with; of two as common, the one met first.
        let most = (members.iter().enumerate())
            .max_by(|(i, a), (j, b)| a.len().cmp(&b.len()).then(j.cmp(i)))
            .map_or(0, |(i, _)| i);
        let names = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>();
        let others: Vec<crate::audit::OtherFields> = (self.field_sets.iter().zip(members))
            .enumerate()
            .filter(|(i, (_, m))| *i != most && !m.is_empty())
            .map(|(_, (set, subjects))| crate::audit::OtherFields {
                fields: names(set),
                subjects,
            })
            .collect();
        // Only sets some subject left with: every subject with one set is no exception.
        (!others.is_empty()).then(|| crate::audit::FieldsBySubject {
            most: self
                .field_sets
                .get(most)
                .map(|s| names(s))
                .unwrap_or_default(),
            others,
        })
    }
}

/// Filters one record; `None` when it may not leave (or, for `rows`, there is none). `decide`
/// is always asked about the record (a fresh memo), so a caller can see why it was refused.
pub fn filter_single(
    body: &[u8],
    envelope: Envelope,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
) -> Result<(Option<Vec<u8>>, Disclosure), FilterError> {
    let mut d = Disclosure::default();
    let Some(record) = read_single(body, envelope, cx)? else {
        return Ok((None, d));
    };
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(b"{\"record\":");
    if !write_record(&record, cx, decide, &mut Memo::default(), &mut out, &mut d) {
        return Ok((None, d));
    }
    out.push(b'}');
    Ok((Some(out), d))
}

/// The policy attributes of the one record a body names, read as `filter_single` reads it:
/// `None` when there is none; `Some(None)` when it cannot be classified, names a field twice
/// or nests where it may not (malformed: a record the filter would withhold is not one a
/// write may target either).
pub fn single_attrs(
    body: &[u8],
    envelope: Envelope,
    cx: &FilterContext,
) -> Result<Option<Option<(String, RecordAttrs)>>, FilterError> {
    let Some(record) = read_single(body, envelope, cx)? else {
        return Ok(None);
    };
    if record.has_duplicate_names(cx.dataset) || record.nests(cx.dataset) {
        return Ok(Some(None));
    }
    Ok(Some(attrs::record_attrs(&record, cx)))
}

/// The string value of field `name` of the one record a body names, decoded; `None` when
/// there is no record, no such field, or it is not a string. Read with `serde_json` (one
/// record; off the paging path, whose scanner it leaves as it is), as `read_single` would
/// find the record: `{"record": {...}}`, or Datasette's `rows` holding one.
pub fn single_text(body: &[u8], envelope: Envelope, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let record = match envelope {
        Envelope::Records => &v["record"],
        Envelope::Rows { .. } => match v["rows"].as_array()?.as_slice() {
            [one] => one,
            _ => return None,
        },
    };
    record.get(name)?.as_str().map(str::to_owned)
}

/// The subject id of the one record a body names, read as the filter reads it (a string, or
/// a plain integer as its digits; `None` for a record the filter would not read, one naming
/// a field twice among them, where `serde_json` would take the last copy).
pub fn single_id(body: &[u8], envelope: Envelope, dataset: &Dataset) -> Option<String> {
    let cx = FilterContext::new(dataset, &RegisterFlags::EMPTY);
    let record = read_single(body, envelope, &cx).ok()??;
    if record.has_duplicate_names(dataset) {
        return None;
    }
    attrs::subject(&record, &attrs::Roles::find(&record, dataset)).map(Cow::into_owned)
}

/// The one record of a single-record body (`{"record": {...}}`, or Datasette's `rows` with at
/// most one); `None` when Datasette's `rows` is empty, its way of saying there is none. A
/// `{"record": null}` is malformed (a datastore says "none" with a 404), as is a body with
/// no `record` or `rows` at all.
fn read_single<'a>(
    body: &'a [u8],
    envelope: Envelope,
    cx: &FilterContext<'a>,
) -> Result<Option<RawRecord<'a>>, FilterError> {
    let wanted = match envelope {
        Envelope::Records => "record",
        Envelope::Rows { .. } => "rows",
    };
    let mut scan = Scan::new(utf8(body)?);
    let mut record = RawRecord::new(Some(cx.dataset), cx.today);
    // `None`: the key is absent; `Some(false)`: present, but no rows.
    let mut found = None;
    scan.begin_object()?;
    let mut first_key = true;
    while let Some(key) = scan.next_key(&mut first_key)? {
        if key != wanted {
            scan.value()?;
            continue;
        }
        if found.is_some() {
            return Err(duplicate(wanted));
        }
        if scan.null()? {
            return Err(malformed(&format!("`{wanted}`")));
        }
        match envelope {
            Envelope::Records => {
                record.read(&mut scan)?;
                found = Some(true);
            }
            Envelope::Rows { .. } => {
                let (mut n, mut first) = (0, true);
                scan.begin_array()?;
                while scan.next_element(&mut first)? {
                    if n > 0 {
                        return Err(FilterError::Malformed("several rows for one id".to_owned()));
                    }
                    record.read(&mut scan)?;
                    n += 1;
                }
                found = Some(n > 0);
            }
        }
    }
    scan.end()?;
    match found {
        None => Err(malformed(&format!("`{wanted}`"))),
        Some(found) => Ok(found.then_some(record)),
    }
}

/// Filters the NDJSON lines of an export's `text` (whole lines; the last may lack its newline;
/// blank ones are skipped) onto `out`, each followed by a newline when it may leave. One field
/// list serves every line. A line that is not a JSON object fails the whole export (fail
/// closed).
pub fn filter_lines(
    text: &[u8],
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    memo: &mut Memo,
    out: &mut Vec<u8>,
    d: &mut Disclosure,
) -> Result<(), FilterError> {
    let mut record = RawRecord::new(Some(cx.dataset), cx.today);
    let text = utf8(text)?;
    let mut start = 0;
    // Lines found with `memchr` (vector instructions; `str::split` went a word at a time,
    // 3% of an export). A newline is ASCII, so every cut is between characters.
    let ends = memchr::memchr_iter(b'\n', text.as_bytes()).chain([text.len()]);
    for end in ends {
        let line = &text[start..end];
        start = end + 1;
        if line.bytes().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let mut scan = Scan::new(line);
        record.read(&mut scan)?;
        scan.end()?;
        let mark = out.len();
        if write_record(&record, cx, decide, memo, out, d) {
            // A carriage return copied out (whitespace between fields: a string cannot hold
            // one raw) would end the line for readers that split on `\r` as well as `\n`:
            // written as a space. (Python's `splitlines` also splits on U+2028 and the like,
            // which a JSON string may hold raw: read NDJSON by `\n`.)
            if memchr::memchr(b'\r', line.as_bytes()).is_some() {
                for b in &mut out[mark..] {
                    if *b == b'\r' {
                        *b = b' ';
                    }
                }
            }
            out.push(b'\n');
        }
    }
    Ok(())
}

fn write_record(
    rec: &RawRecord,
    cx: &FilterContext,
    decide: &mut dyn FnMut(&RecordAttrs) -> Arc<RecordDecision>,
    memo: &mut Memo,
    out: &mut Vec<u8>,
    d: &mut Disclosure,
) -> bool {
    // A value nested where the asset register expects a scalar (or a list of them) would leave
    // whole under its field's category, whatever it holds: the record is malformed, before
    // anything of it is judged or reported.
    if rec.nests(cx.dataset) {
        d.rows_withheld += 1;
        d.malformed_rows += 1;
        return false;
    }
    // Not what the listing asked for: withheld unjudged, as if the datastore had not sent
    // it; but an entry never disclosed is still counted as one (the datastore ignored
    // `exclude=protected` too, which its own counter says).
    if let Some((field, meets)) = cx.must_match
        && !(rec.field(field).and_then(attrs::string)).is_some_and(|v| meets(&v))
    {
        d.rows_withheld += 1;
        d.mismatched_rows += 1;
        if record_attrs(rec, cx).is_some_and(|(_, a)| a.never_disclosed()) {
            d.never_disclosed_rows += 1;
        }
        return false;
    }
    let (subject, runs, unclassified, set) = match memo.judge(rec, cx, decide, d) {
        Judged::Malformed => {
            d.rows_withheld += 1;
            d.malformed_rows += 1;
            return false;
        }
        Judged::Refused { never_disclosed } => {
            d.rows_withheld += 1;
            d.never_disclosed_rows += u64::from(never_disclosed);
            return false;
        }
        Judged::Leaves {
            subject,
            runs,
            unclassified,
            set,
        } => (subject, runs, unclassified, set),
    };
    // Each run of consecutive fields that leave is copied as written, with the commas and
    // any whitespace between them: the scanner has checked every byte of it.
    let mark = out.len();
    out.push(b'{');
    for (n, &(first, last)) in runs.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        let run = (rec.spans.get(first).zip(rec.spans.get(last)))
            .and_then(|(a, b)| rec.text.as_bytes().get(a.key..b.end));
        let Some(run) = run else {
            // A plan that does not fit the record (it cannot happen: a record is only placed
            // in its own layout) withholds it rather than write something else.
            out.truncate(mark);
            d.rows_withheld += 1;
            d.malformed_rows += 1;
            return false;
        };
        out.extend_from_slice(run);
    }
    out.push(b'}');
    d.unclassified_fields += unclassified;
    d.subjects.push(&subject);
    d.subject_sets.push(set);
    true
}

impl RawRecord<'_> {
    /// Whether a field the asset register classifies holds more than it allows: an object,
    /// or an array holding an array or object, where the dataset does not name the field
    /// `structured` (nor is it the consents field). The scanner has said which values nest
    /// as it read them (`Span::nests`), so no value is read again here: a second pass over
    /// every array of every record was a twentieth of a page's filter.
    fn nests(&self, ds: &Dataset) -> bool {
        let mut flat_fields = self.flat_fields.borrow_mut();
        let flat_fields = flat_fields.get_or_insert_with(|| {
            (self.names.iter().enumerate())
                .filter(|(_, name)| ds.fields.contains_key(name.as_ref()) && !ds.may_nest(name))
                .map(|(i, _)| i)
                .collect()
        });
        (flat_fields.iter()).any(|&i| self.spans.get(i).is_some_and(|span| span.nests))
    }
}

/// Whether a value read apart from the scanner's count (the consents field's) is an object
/// or an array: it may nest, as far as `nests` is told (the consents field may).
fn may_nest(value: &str) -> bool {
    matches!(value.as_bytes().first(), Some(b'{' | b'['))
}

#[cfg(test)]
mod tests;
