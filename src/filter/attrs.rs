//! A record's policy attributes, read from its raw fields without building a document tree.
//!
//! `record_attrs` is the one reading of what policies decide on: the area (from the dataset's
//! template), markers, flags (with the rights register's, and `under_16` where the attainer
//! date says so whatever the flags say), consented channels and TPS freshness. `fingerprint`
//! writes down exactly the inputs that reading depends on, byte for byte where they repeat
//! across records (area fields, marker and flag arrays, register flags) and as what is read
//! where they do not (consents carry per-record timestamps: each channel and its state, in
//! wire order; the TPS check and the attainer date are per-record dates: fresh or not, under
//! 16 or not). Two records with the same fingerprint therefore have the same attributes, so a
//! decision made for one is the decision for the other; that is what lets the memo skip the
//! reading for every record but the first of each kind.

use std::borrow::Cow;
use std::collections::BTreeSet;

use super::scan::{self, Gap, Scan, ScanError, Written};
use super::{FilterContext, RawRecord};
use crate::catalog::{Dataset, area_template_fields};
use crate::policy::RecordAttrs;

/// Where a record's policy fields are: the index in its field list of each (the first field
/// of the name; `None` when absent). The same for every record with the same field names in
/// the same order, so the memo finds them once per layout.
#[derive(Debug, Clone, Default)]
pub(super) struct Roles {
    subject: Option<usize>,
    /// One per field of the area template, in order.
    area: Vec<Option<usize>>,
    markers: Option<usize>,
    flags: Option<usize>,
    pub(super) consents: Option<usize>,
    tps: Option<usize>,
    attainer: Option<usize>,
}

impl Roles {
    pub(super) fn find(rec: &RawRecord, ds: &Dataset) -> Roles {
        let at = |field: &Option<String>| rec.position(field.as_deref()?);
        Roles {
            subject: rec.position(&ds.subject_field),
            // The catalog checked the template at start; were it unreadable, no area could be
            // built and every record would be withheld.
            area: (area_template_fields(&ds.area).unwrap_or_default().iter())
                .map(|name| rec.position(name))
                .collect(),
            markers: at(&ds.markers_field),
            flags: at(&ds.flags_field),
            consents: at(&ds.consents_field),
            tps: at(&ds.tps_field),
            attainer: at(&ds.attainer_field),
        }
    }
}

/// The record's subject id, or `None` if it is missing or not a non-empty string or a number.
pub(super) fn subject<'a>(rec: &RawRecord<'a>, at: &Roles) -> Option<Cow<'a, str>> {
    // Only an id a subject access request or a rights request can name (`routes::subject_id`:
    // letters, digits, `-` and `_`, at most 64): a person disclosed under any other id could
    // never be found in the log, restricted or erased, so their record is withheld.
    scalar(rec.value(at.subject)?).filter(|s| crate::routes::subject_id(s))
}

/// The attributes policies decide on, or `None` if any is missing or malformed.
pub fn record_attrs(rec: &RawRecord, cx: &FilterContext) -> Option<(String, RecordAttrs)> {
    read(rec, &Roles::find(rec, cx.dataset), cx)
}

/// `record_attrs` with the fields found.
pub(super) fn read(
    rec: &RawRecord,
    at: &Roles,
    cx: &FilterContext,
) -> Option<(String, RecordAttrs)> {
    let ds = cx.dataset;
    let subject = subject(rec, at)?.into_owned();
    let area = area_of(rec, at, &ds.area)?;
    let strings = |field: &Option<String>, at: Option<usize>| -> Option<BTreeSet<String>> {
        match field {
            None => Some(BTreeSet::new()),
            Some(_) => serde_json::from_str::<Vec<String>>(rec.value(at)?)
                .ok()
                .map(|v| v.into_iter().collect()),
        }
    };
    let mut markers = strings(&ds.markers_field, at.markers)?;
    let mut flags = strings(&ds.flags_field, at.flags)?;
    // A word the gateway does not know is one no policy can have meant (`RESTRICTED`,
    // `objects-profiling`, a marker `n` for `N`): such a record would otherwise go out as if
    // unflagged. It is held back as far as the word could mean: a marker not of a marker's
    // form (one or two capital letters) as an anonymous elector's, never disclosed; a flag
    // the gateway does not know as a restriction, so that rights handling still sees it, and
    // as every known flag it is a spelling of (`UNDER_16`, `under-16` and `Under16` are
    // `under_16`, which nobody sees, not even rights handling: `spelt_as`).
    if !markers.iter().all(|m| crate::policy::is_marker(m)) {
        metrics::counter!("wardgate_unknown_record_words_total", "kind" => "marker").increment(1);
    }
    // (`NF`, two markers written as one, is taken as anonymous too.)
    if markers.iter().any(|m| crate::policy::may_be_anonymous(m)) {
        markers.insert(ANONYMOUS.to_owned());
    }
    if !flags.iter().all(|f| ds.known_flags.contains(f)) {
        metrics::counter!("wardgate_unknown_record_words_total", "kind" => "flag").increment(1);
        let meant: Vec<String> = (flags.iter())
            .filter(|f| !ds.known_flags.contains(*f))
            .flat_map(|f| spelt_as(f, &ds.known_flags))
            .collect();
        flags.extend(meant);
        flags.insert(RESTRICTED.to_owned());
    }
    if let Some(extra) = cx.register.get(&subject) {
        flags.extend(extra.iter().cloned());
    }
    // DOMAIN.md: under-16s are never disclosed. The flag is the datastore's word for it; an
    // attainer date more than two years away (`under_16_on`) says it too, and a record that
    // lacks the flag is withheld all the same (as one whose date cannot be read is).
    if ds.attainer_field.is_some() && under_16_by_attainer(rec.value(at.attainer)?, cx.today)? {
        flags.insert(UNDER_16.to_owned());
    }
    let mut consented = match &ds.consents_field {
        None => BTreeSet::new(),
        Some(_) => consented_channels(rec.value(at.consents)?, cx.today)?,
    };
    // A withdrawal in the rights register outranks a consent still on the record (§10.3.7).
    for f in &flags {
        if let Some(channel) = f.strip_prefix("consent_withdrawn_") {
            consented.remove(channel);
        }
    }
    let tps_fresh = match &ds.tps_field {
        None => false,
        Some(_) => tps_fresh(rec.value(at.tps)?, cx.today, ds.tps_max_age_days)?,
    };
    Some((
        subject,
        RecordAttrs {
            area,
            markers,
            flags,
            consented,
            tps_fresh,
        },
    ))
}

/// Whether a record's flag may say its elector or member is under 16, taken so as far as it
/// could mean: its letters and digits, whatever their case, hold `under16` or `undersixteen`
/// (`UNDER_16`, `under-16`, `age_under_16`, `Under Sixteen`). Never disclosed, not even to
/// rights handling; the demo datastore leaves such a record out as protected.
pub fn may_be_under_16(flag: &str) -> bool {
    let folded = fold(flag);
    folded.contains("under16") || folded.contains("undersixteen")
}

/// (Cold: met only on a word the catalogue does not know, and kept out of `read`'s inlining.)
/// The known flags `word` is another spelling of: the same letters and digits, whatever their
/// case and whatever stands between them (`under_16` for `UNDER_16`, `under-16` or `Under 16`).
#[cold]
#[inline(never)]
fn spelt_as(word: &str, known: &BTreeSet<String>) -> Vec<String> {
    let folded = fold(word);
    let mut meant: Vec<String> = (known.iter())
        .filter(|k| fold(k) == folded)
        .cloned()
        .collect();
    // Whatever the catalogue knows, a word that may say under 16 is `under_16`
    // (`age_under_16`, `under_sixteen`): `may_be_under_16`.
    if may_be_under_16(word) {
        meant.push(UNDER_16.to_owned());
    }
    meant
}

/// A word as its spelling is compared (`spelt_as`; the catalogue refuses a `[words]` entry
/// that is another spelling of a word already known): its letters and digits, lower case.
pub fn fold(word: &str) -> String {
    (word.chars())
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Writes onto `key` every input `record_attrs` reads for a record of `subject` (the subject
/// id itself is not an input of the attributes, only of the register lookup). Each part is
/// tagged and length-prefixed, so no two different inputs write the same bytes.
pub(super) fn fingerprint(
    rec: &RawRecord,
    at: &Roles,
    cx: &FilterContext,
    subject: &str,
    key: &mut Vec<u8>,
) {
    let ds = cx.dataset;
    key.clear();
    for &field in &at.area {
        put(key, rec.value(field));
    }
    for (field, at) in [(&ds.markers_field, at.markers), (&ds.flags_field, at.flags)] {
        if field.is_some() {
            put(key, rec.value(at));
        }
    }
    match cx.register.get(subject) {
        None => key.push(0),
        Some(extra) => {
            head(key, 1, extra.len());
            for f in extra {
                put(key, Some(f));
            }
        }
    }
    if ds.consents_field.is_some() {
        // Every channel in wire order with its state (the reading is a function of that):
        // each as 1, name, state; then 0.
        match (rec.value(at.consents), rec.consents_taken(at.consents)) {
            (None, _) => key.push(0),
            // Read as the record was scanned (`take_consents`): the same bytes.
            (Some(_), Some(Some(states))) => {
                key.push(1);
                key.extend_from_slice(states);
            }
            (Some(_), Some(None)) => key.push(2),
            (Some(v), None) => {
                let mark = key.len();
                key.push(1);
                let read = channel_states(v, cx.today, |channel, live| {
                    put_channel(key, &channel, live)
                });
                if read.is_some() {
                    key.push(0);
                } else {
                    key.truncate(mark);
                    key.push(2);
                }
            }
        }
    }
    if ds.tps_field.is_some() {
        key.push(match rec.value(at.tps) {
            None => 0,
            Some(v) => match tps_fresh(v, cx.today, ds.tps_max_age_days) {
                None => 2,
                Some(false) => 3,
                Some(true) => 4,
            },
        });
    }
    if ds.attainer_field.is_some() {
        key.push(match rec.value(at.attainer) {
            None => 0,
            Some(v) => match under_16_by_attainer(v, cx.today) {
                None => 2,
                Some(false) => 3,
                Some(true) => 4,
            },
        });
    }
}

#[inline]
fn put(key: &mut Vec<u8>, part: Option<&str>) {
    match part {
        None => key.push(0),
        Some(s) => {
            head(key, 1, s.len());
            key.extend_from_slice(s.as_bytes());
        }
    }
}

/// A part's `tag` and then `n` (its length, or how many parts follow) in LEB128: seven bits a
/// byte, low first, the high bit set on every byte but the last. No such encoding is the start
/// of another, so lengths written this way keep the parts apart as fixed-width ones would, in
/// one byte for any part under 128 bytes: the key is hashed and compared for every record, and
/// fixed eight-byte lengths were most of it. Pushed byte by byte: copying a two-byte array of
/// variable length called `memcpy`, over a hundredth of a page.
#[inline]
fn head(key: &mut Vec<u8>, tag: u8, mut n: usize) {
    key.push(tag);
    while n >= 0x80 {
        key.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    key.push(n as u8);
}

/// A non-empty string, or an integer written plainly (`0`, `-12`, at most 20 digits), as its
/// own text; anything else is `None`. A number written another way (`1e2`, `100.0`, `-0`, or
/// too long for an integer) is not an id: read through a float it would become another text
/// (`100.0`) or another number, and then miss the rights register's flags under `100` and the
/// audit's subject searches.
fn scalar(raw: &str) -> Option<Cow<'_, str>> {
    match raw.as_bytes().first()? {
        b'"' => string(raw).filter(|s| !s.is_empty()),
        b'-' | b'0'..=b'9' => {
            let digits = raw.strip_prefix('-').unwrap_or(raw).as_bytes();
            let plain = match digits {
                [b'0'] => raw == "0",
                [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
                _ => false,
            };
            (plain && digits.len() <= 20).then_some(Cow::Borrowed(raw))
        }
        _ => None,
    }
}

/// A raw value that is one JSON string, decoded (borrowed when it has no escapes).
pub(super) fn string(raw: &str) -> Option<Cow<'_, str>> {
    // Quotes around text with no quote, backslash or control character: a string that is
    // its own text (every subject id and date, read once per record).
    if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"'))
        && scan::special(inner.as_bytes(), 0) == inner.len()
    {
        return Some(Cow::Borrowed(inner));
    }
    string_scanned(raw)
}

fn string_scanned(raw: &str) -> Option<Cow<'_, str>> {
    let mut scan = Scan::new(raw);
    let text = scan.text().ok()?;
    scan.end().ok()?;
    Some(text)
}

fn area_of(rec: &RawRecord, at: &Roles, template: &str) -> Option<String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    let mut fields = at.area.iter();
    while let Some(start) = rest.find('{') {
        let end = start + rest[start..].find('}')?;
        out.push_str(&rest[..start]);
        out.push_str(&scalar(rec.value(*fields.next()?)?)?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// Each channel of a consents value in wire order, with whether consent was given there and
/// not withdrawn (§5.2.1, §10.3.7); `None` when the value is not `null` (no consent on any
/// channel) or an object of channels, none named twice, each `null` or `{"given_at",
/// "withdrawn_at", ...}` with those two `null` or a string, neither named twice. Consent is
/// given from `given_at`'s date (UK days since 1970, `today`) on: one dated later is not yet
/// given.
fn channel_states<'a>(v: &'a str, today: i64, each: impl FnMut(Cow<'a, str>, bool)) -> Option<()> {
    let mut scan = Scan::new(v);
    channel_states_at(&mut scan, &mut ConsentKeys::default(), today, each)?;
    scan.end().ok()
}

/// The keys of the last consents value read, as written: its channels' in order, and those of
/// their consent objects (the same few in the same order on every channel), each with which
/// of the two read it is. The next record's consents almost always repeat them, and a key
/// that repeats is taken by comparing bytes (`Scan::next_key_as`), its name not compared
/// again: without this, reading consents was a sixth of a page's instructions. Each is noted
/// with its separator and whitespace too (`Gap`), which is how `channel_states_again` takes
/// a whole value written as the last one was.
#[derive(Debug, Default)]
pub(super) struct ConsentKeys<'a> {
    channels: Vec<Option<Written<'a>>>,
    channel_gaps: Vec<Option<Gap<'a>>>,
    inner: Vec<Option<(Written<'a>, Slot)>>,
    inner_gaps: Vec<Option<(Gap<'a>, Slot)>>,
}

/// What a key of a consent object is to `consent_live`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Given,
    Withdrawn,
    Other,
    /// Any other key: another spelling of `given_at` or `withdrawn_at` (`Withdrawn_At`,
    /// `withdrawnAt`), or a key of its own that may speak of a withdrawal (`withdrawn`,
    /// `revoked_at`, `unsubscribed_at`, `opted_out`, `status`), which this reading would skip
    /// and a reader would take for one. A consent record holds `given_at`, `withdrawn_at`,
    /// `source` and `channel` (DOMAIN.md); a key outside those makes the consents unreadable,
    /// and the record is withheld.
    Unknown,
}

impl Slot {
    fn of(name: &str) -> Slot {
        match name {
            "given_at" => Slot::Given,
            "withdrawn_at" => Slot::Withdrawn,
            "source" | "channel" => Slot::Other,
            _ => Slot::Unknown,
        }
    }
}

/// Whether two words are spellings of one (`fold`), without building either.
fn same_word(a: &str, b: &str) -> bool {
    fn folded(w: &str) -> impl Iterator<Item = u8> + '_ {
        (w.bytes().filter(u8::is_ascii_alphanumeric)).map(|c| c.to_ascii_lowercase())
    }
    folded(a).eq(folded(b))
}

/// A word that is its own fold (lower-case letters and digits only): two such words are
/// spellings of one only where they are the same.
fn folded_already(w: &str) -> bool {
    w.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `channel_states` of the value that comes next in `scan`, which it takes; `keys` are those
/// of the consents read before (a hint: a key is only taken as expected where its bytes are
/// the same) and are replaced with this value's. A value that cannot be read leaves no keys
/// noted (a half-noted layout, this value's first keys and the last one's rest, could let
/// `channel_states_again` take a value this reading refuses, such as one naming a channel
/// twice).
fn channel_states_at<'a>(
    scan: &mut Scan<'a>,
    keys: &mut ConsentKeys<'a>,
    today: i64,
    each: impl FnMut(Cow<'a, str>, bool),
) -> Option<()> {
    let read = channel_states_noting(scan, keys, today, each);
    if read.is_none() {
        keys.channel_gaps.clear();
        keys.inner_gaps.clear();
    }
    read
}

fn channel_states_noting<'a>(
    scan: &mut Scan<'a>,
    keys: &mut ConsentKeys<'a>,
    today: i64,
    mut each: impl FnMut(Cow<'a, str>, bool),
) -> Option<()> {
    if !scan.null().ok()? {
        scan.begin_object().ok()?;
        let mut first = true;
        let mut i = 0;
        let mut named: Vec<Cow<'a, str>> = Vec::new();
        // Whether a channel named so far is not its own fold (`Email`, `e_mail`).
        let mut respelt_named = false;
        loop {
            let expected = keys.channels.get(i).copied().flatten();
            let Some((channel, gap)) = scan.next_key_gap(&mut first, expected).ok()? else {
                break;
            };
            // (Compared letter by letter only where a spelling could differ: `email` beside
            // `email`, `sms` and `phone` is compared whole.)
            let plain = folded_already(&channel.name);
            let twice = if plain && !respelt_named {
                named.contains(&channel.name)
            } else {
                named.iter().any(|n| same_word(n, &channel.name))
            };
            respelt_named |= !plain;
            if twice {
                // A channel named twice (or as another spelling of one: `Email` beside
                // `email`) is no more readable than a record's field named twice (one reader
                // takes the first, another the last): the record is withheld.
                return None;
            }
            named.push(channel.name.clone());
            if !channel.expected {
                super::note(&mut keys.channels, i, channel.written);
            }
            super::note(&mut keys.channel_gaps, i, gap);
            i += 1;
            let live = !scan.null().ok()? && consent_live(scan, keys, today)?;
            each(channel.name, live);
        }
        // A value with fewer channels than the last: the next is compared with this one's.
        keys.channel_gaps.truncate(i);
    }
    Some(())
}

/// The consents value that comes next in `scan`, taken, with its channel states written onto
/// `states` as `fingerprint` writes them (whether they could be read: `false` leaves `states`
/// empty). The record reader reads a consents field this way as it scans it, so that the
/// fingerprint does not scan the value a second time. `today`: as in `channel_states`.
pub(super) fn take_consents<'a>(
    scan: &mut Scan<'a>,
    keys: &mut ConsentKeys<'a>,
    states: &mut Vec<u8>,
    today: i64,
) -> Result<(&'a str, bool), ScanError> {
    states.clear();
    let (value, read) = scan.value_read(|scan| {
        // Nearly always the last record's keys, written the same way.
        let mark = scan.mark();
        if channel_states_again(scan, keys, states, today).is_some() {
            return Some(());
        }
        scan.reset(mark);
        states.clear();
        channel_states_at(scan, keys, today, |channel, live| {
            put_channel(states, &channel, live)
        })
    })?;
    if read.is_some() {
        states.push(0);
    } else {
        states.clear();
    }
    Ok((value, read.is_some()))
}

/// `channel_states_at` for a consents value whose keys (its channels', and those of every
/// consent object in it) are, in order, those of the last one read, written the same way:
/// each is taken by comparing its bytes, and the keys noted stay as they are. `None` at the
/// first difference and at anything malformed (the caller then reads the value from its
/// start with `channel_states_at`, which notes its keys or refuses it).
fn channel_states_again<'a>(
    scan: &mut Scan<'a>,
    keys: &ConsentKeys<'a>,
    states: &mut Vec<u8>,
    today: i64,
) -> Option<()> {
    if scan.null().ok()? {
        return Some(());
    }
    scan.begin_object().ok()?;
    for channel in &keys.channel_gaps {
        let channel = (*channel)?;
        scan.gap_written(channel)?;
        let live = if scan.null().ok()? {
            false
        } else {
            let (mut given, mut withdrawn) = (None, None);
            scan.begin_object().ok()?;
            for inner in &keys.inner_gaps {
                let (key, slot) = (*inner)?;
                scan.gap_written(key)?;
                take_slot(scan, slot, today, &mut given, &mut withdrawn)?;
            }
            scan.end_object().then_some(())?;
            live(given, withdrawn)
        };
        put_channel(states, channel.name(), live);
    }
    scan.end_object().then_some(())
}

/// One channel and its state, as the fingerprint writes it.
fn put_channel(key: &mut Vec<u8>, channel: &str, live: bool) {
    key.push(1);
    put(key, Some(channel));
    key.push(u8::from(live));
}

/// One channel's consent object: given (`given_at` a date no later than `today`) and not
/// withdrawn (`withdrawn_at` absent or `null`). `keys`: as in `channel_states_at` (its consent
/// objects' keys).
fn consent_live<'a>(scan: &mut Scan<'a>, keys: &mut ConsentKeys<'a>, today: i64) -> Option<bool> {
    let (mut given, mut withdrawn) = (None, None);
    scan.begin_object().ok()?;
    let mut first = true;
    let mut i = 0;
    loop {
        let expected = keys.inner.get(i).copied().flatten();
        let Some((key, gap)) = scan
            .next_key_gap(&mut first, expected.map(|(w, _)| w))
            .ok()?
        else {
            break;
        };
        let slot = match expected {
            Some((_, slot)) if key.expected => slot,
            _ => Slot::of(&key.name),
        };
        if !key.expected {
            super::note(&mut keys.inner, i, key.written.map(|w| (w, slot)));
        }
        super::note(&mut keys.inner_gaps, i, gap.map(|g| (g, slot)));
        i += 1;
        take_slot(scan, slot, today, &mut given, &mut withdrawn)?;
    }
    keys.inner_gaps.truncate(i);
    Some(live(given, withdrawn))
}

/// Consent given and not withdrawn (§5.2.1, §10.3.7), from what `take_slot` noted.
fn live(given: Option<bool>, withdrawn: Option<bool>) -> bool {
    given == Some(true) && withdrawn != Some(true)
}

/// The value of a consent object's key read as `slot`: whether `given_at` or `withdrawn_at`
/// is a string (`null`: not), noted once (`None`, malformed, for a second or any other kind of
/// value); any other key's value is skipped. A `given_at` string must be a date (`YYYY-MM-DD`,
/// alone or starting a timestamp): `""`, `"null"` or `"never"` from a datastore that
/// writes missing values as text are not consent, and make the consents unreadable (the record
/// is withheld). A `given_at` dated after `today` (the UK's, days since 1970) is consent not
/// yet given: noted as `null` is. Any `withdrawn_at` string counts as withdrawn, the safe
/// reading.
#[inline(always)]
fn take_slot(
    scan: &mut Scan,
    slot: Slot,
    today: i64,
    given: &mut Option<bool>,
    withdrawn: &mut Option<bool>,
) -> Option<()> {
    let slot_kind = slot;
    let slot = match slot {
        Slot::Given => given,
        Slot::Withdrawn => withdrawn,
        Slot::Other => {
            scan.value_start().ok()?;
            return Some(());
        }
        Slot::Unknown => return None,
    };
    if slot.is_some() {
        return None;
    }
    let given_at = matches!(slot_kind, Slot::Given);
    let at = scan.value_start().ok()?;
    let text = scan.text_scanned();
    *slot = match text.as_bytes().get(at) {
        Some(b'n') => Some(false),
        Some(b'"') if !given_at => Some(true),
        Some(b'"') => Some(given_by(text.get(at + 1..)?, today)?),
        _ => return None,
    };
    Some(())
}

/// Whether a `given_at` string's text (after its opening quote) dates a consent given by the
/// end of `today` (the UK's day, since 1970): its date, or for a timestamp with a zone (`Z`,
/// `+02:00`) the UK's date at that instant. A zone moves a date by a day at most, so only a
/// date of today or tomorrow is read whole. `None` for text that is not a date (`dated`).
#[inline]
fn given_by(rest: &str, today: i64) -> Option<bool> {
    let day = dated(rest)?;
    if day < today || day > today + 1 || rest.as_bytes()[10] == b'"' {
        return Some(day <= today);
    }
    let text = &rest[..memchr::memchr(b'"', rest.as_bytes())?];
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339);
    Some(match at {
        Ok(at) => {
            let utc = at.to_offset(time::UtcOffset::UTC);
            days_since_epoch(crate::uk_time::uk_date(utc)) <= today
        }
        // No zone (a local time as written, or SQL's form): its date.
        Err(_) => day <= today,
    })
}

/// The day (since 1970) of a JSON string's text (after its opening quote) that is a date,
/// `YYYY-MM-DD`, alone or followed by a time (`T...`, or `' '...` as SQL databases write
/// timestamps); `None` for any other text.
fn dated(rest: &str) -> Option<i64> {
    let (year, month, day) = rest.get(..10).and_then(civil)?;
    matches!(rest.as_bytes().get(10), Some(b'"' | b'T' | b' '))
        .then(|| days_from_civil(year, month, day))
}

/// The channels with live consent.
fn consented_channels(v: &str, today: i64) -> Option<BTreeSet<String>> {
    let mut consented = BTreeSet::new();
    channel_states(v, today, |channel, live| {
        if live {
            consented.insert(channel.into_owned());
        }
    })?;
    Some(consented)
}

fn tps_fresh(v: &str, today: i64, max_age_days: u32) -> Option<bool> {
    if v == "null" {
        return Some(false);
    }
    let days = days_from_iso_date(&string(v)?)?;
    Some(today - days <= i64::from(max_age_days) && days <= today)
}

/// The flag DOMAIN.md's never-disclosed under-16s carry (`RecordAttrs::never_disclosed`).
pub const UNDER_16: &str = "under_16";

/// The register marker of an anonymous elector, never disclosed (`RecordAttrs::never_disclosed`).
const ANONYMOUS: &str = "N";

/// The rights register's Art 18 restriction: withheld from all but rights handling.
const RESTRICTED: &str = "restricted";

/// Whether a raw attainer date (`null`, or the day the elector turns 18) is an under-16's;
/// `None` when it is neither `null` nor a date.
#[inline]
fn under_16_by_attainer(v: &str, today: i64) -> Option<bool> {
    if v == "null" {
        return Some(false);
    }
    under_16_on(&string(v)?, today)
}

/// Whether whoever turns 18 on `attainer` (exactly `YYYY-MM-DD`) is under 16 on `today` (days
/// since 1970-01-01): their sixteenth birthday, two years before, is still to come. Where
/// the day is in doubt it goes to the child: an eighteenth birthday on 29 February (a date
/// no birth gives) puts the sixteenth on 1 March, and one on 28 February (where a child born
/// on 29 February may be put) puts it on 29 February when that year has one. `None` when
/// `attainer` is not a date.
pub fn under_16_on(attainer: &str, today: i64) -> Option<bool> {
    let (year, month, day) = civil(attainer)?;
    let year = year - 2;
    let (month, day) = match (month, day) {
        (2, 29) => (3, 1),
        (2, 28) if leap(year) => (2, 29),
        other => other,
    };
    Some(today < days_from_civil(year, month, day))
}

/// Days since 1970-01-01 for `YYYY-MM-DD`.
pub fn days_from_iso_date(s: &str) -> Option<i64> {
    // `YYYY-MM-DD` exactly, read directly; anything else goes through `time`'s parser.
    if let Some((year, month, day)) = civil(s) {
        return Some(days_from_civil(year, month, day));
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Some(days_since_epoch(time::Date::parse(s, &fmt).ok()?))
}

/// Year, month and day of a date written exactly `YYYY-MM-DD` (four digits, no sign), if it is
/// one.
#[inline]
fn civil(s: &str) -> Option<(i64, i64, i64)> {
    let [y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1] = *s.as_bytes() else {
        return None;
    };
    let digits = [y0, y1, y2, y3, m0, m1, d0, d1];
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = |ds: &[u8]| ds.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    let (year, month, day) = (n(&digits[..4]), n(&digits[4..6]), n(&digits[6..]));
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap(year) => 29,
        2 => 28,
        _ => return None,
    };
    (1..=month_days)
        .contains(&day)
        .then_some((year, month, day))
}

#[inline]
fn leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Days from the civil date (H. Hinnant's `days_from_civil`, years from March so that the
/// leap day ends one): a TPS date is read for every record, and building a `time::Date` for
/// it was a sixtieth of a page.
#[inline]
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn days_since_epoch(date: time::Date) -> i64 {
    i64::from(date.to_julian_day()) - i64::from(time::macros::date!(1970 - 01 - 01).to_julian_day())
}

/// Days since 1970-01-01 now, by the UK's date (`uk_time`): a TPS check's window and a
/// person's sixteenth birthday end at midnight in the UK.
pub fn today() -> i64 {
    days_since_epoch(crate::uk_time::uk_date(time::OffsetDateTime::now_utc()))
}

#[cfg(test)]
mod tests {
    use super::{string, string_scanned};

    /// Lengths are written so that none is the start of another (what keeps a fingerprint's
    /// parts apart).
    #[test]
    fn lengths_are_prefix_free() {
        let ns = [
            0,
            1,
            127,
            128,
            255,
            300,
            16_383,
            16_384,
            1 << 20,
            usize::MAX,
        ];
        let written: Vec<Vec<u8>> = (ns.iter())
            .map(|&n| {
                let mut v = Vec::new();
                super::head(&mut v, 1, n);
                assert_eq!(v[0], 1);
                v.split_off(1)
            })
            .collect();
        assert_eq!(written[0], [0]);
        assert_eq!(written[2], [0x7f]);
        assert_eq!(written[3], [0x80, 0x01]);
        for (i, a) in written.iter().enumerate() {
            for (j, b) in written.iter().enumerate() {
                assert!(
                    i == j || !b.starts_with(a),
                    "{} is a prefix of {}",
                    ns[i],
                    ns[j]
                );
            }
        }
    }

    /// The shortcut for strings without escapes reads every text as the scanner does.
    #[test]
    fn strings_read_directly_read_as_scanned() {
        for raw in [
            r#""VF-0000001""#,
            r#""""#,
            r#"""#,
            r#""a"b""#,
            r#""a\"b""#,
            r#""a\u0041""#,
            r#""a\x""#,
            "\"a\u{1}b\"",
            "\"a\tb\"",
            "\"caf\u{e9}\"",
            r#" "a""#,
            r#""a" "#,
            r#""a"#,
            r#"a""#,
            "1",
            "null",
        ] {
            assert_eq!(string(raw), string_scanned(raw), "{raw:?}");
        }
    }
}
