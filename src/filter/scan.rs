//! A validating JSON scanner for the filter: it walks a body token by token and hands out
//! object keys (decoded) and values as raw JSON text borrowed from the body, without building
//! anything. Everything it hands out has been checked against RFC 8259's grammar first, the
//! way `serde_json` checks what it skips: strings without control characters and with valid
//! escapes, numbers in JSON's own form, the three literals. Nesting is limited to 127 levels
//! (`serde_json` refuses the 128th when it builds values, though it skips raw values at any
//! depth; a body nested deeper is refused here, never passed on). The caller walks objects and arrays with `next_key` and
//! `next_element`; a value it does not look into is skipped with `value`, which is where almost
//! every byte of a page goes, sixteen bytes at a time inside strings.
//!
//! The small steps (whitespace, a string, a scalar, the next key) are inlined into their
//! callers: each runs about thirty times per record, and a call's register saving and
//! restoring cost more than most steps (a fifth of a page's instructions before they were).
//!
//! Keys are decoded as `serde_json` decodes them (a key with escapes goes through it); values
//! are not, unless asked for as a string (`text`). The audit log's seal reads its lines with it
//! too. The text is already UTF-8 (`&str`), and every position the scanner
//! stops at is an ASCII byte, so every slice it hands out is whole characters.

use std::borrow::Cow;
use std::fmt;

use wide::u8x16;

/// The 128th level of nesting is refused.
const MAX_DEPTH: u32 = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanError {
    what: &'static str,
    at: usize,
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

type Result<T> = std::result::Result<T, ScanError>;

/// An object key as `next_key_as` hands it out.
pub struct Key<'a> {
    pub name: Cow<'a, str>,
    /// How it was written, when it had no escapes: what the next record's key may be expected
    /// to be (`next_key_as`).
    pub written: Option<Written<'a>>,
    /// It was the key expected.
    pub expected: bool,
    /// Where it starts in the text (its opening quote).
    pub at: usize,
}

/// A key as written in the body from its opening quote through its colon (`"name":`, with
/// whatever whitespace came before the colon), that the scanner has read as one whole string
/// without escapes. Only the scanner makes one, which is what lets `next_key_as` take a key and
/// its colon by comparing bytes.
#[derive(Debug, Clone, Copy)]
pub struct Written<'a> {
    text: &'a str,
    /// The key itself, between the quotes.
    name: &'a str,
}

/// What lies between one value of an object and the next (or the object's opening and its
/// first value): the comma unless it is the first, the key and its colon, and the whitespace
/// around them, as `next_key_gap` took it with a key written without escapes. Only the scanner
/// makes one: the same bytes at the same place in another object of the same kind are the same
/// separator and key, which is what lets `gap_written` take them by comparing bytes.
#[derive(Debug, Clone, Copy)]
pub struct Gap<'a> {
    text: &'a str,
    /// Where the key's opening quote is in `text`.
    key: usize,
    /// The key itself, between the quotes.
    name: &'a str,
}

impl<'a> Gap<'a> {
    /// The key itself.
    pub fn name(&self) -> &'a str {
        self.name
    }
}

/// Where a scan is, to go back to it (`Scan::reset`) after a trial read that did not take:
/// everything a read changes. Taken field by field rather than by cloning the scanner, whose
/// copy loaded its fields in 16-byte pieces that the processor could not forward from the
/// narrower stores just made to them (a stall at every record; an eighth of the record
/// reader's time in the load test's profile).
#[derive(Clone, Copy)]
pub struct Mark {
    pos: usize,
    depth: u32,
    nested: u32,
    objects: u128,
}

#[derive(Clone)]
pub struct Scan<'a> {
    text: &'a str,
    pos: usize,
    depth: u32,
    /// One bit per open level, set for an object (levels below `MAX_DEPTH`).
    objects: u128,
    /// How many values have been read whole as nested (`nested`: an object, or an array
    /// holding an object or an array), so that a reader of records can tell which of their
    /// values nest without scanning them again (`RawRecord::nests`).
    nested: u32,
}

impl<'a> Scan<'a> {
    pub fn new(text: &'a str) -> Self {
        Scan {
            text,
            pos: 0,
            depth: 0,
            objects: 0,
            nested: 0,
        }
    }

    /// Where the scan is now.
    #[inline(always)]
    pub fn mark(&self) -> Mark {
        Mark {
            pos: self.pos,
            depth: self.depth,
            nested: self.nested,
            objects: self.objects,
        }
    }

    /// Back to `mark`, taken on this scan.
    #[inline(always)]
    pub fn reset(&mut self, mark: Mark) {
        self.pos = mark.pos;
        self.depth = mark.depth;
        self.nested = mark.nested;
        self.objects = mark.objects;
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn fail<T>(&self, what: &'static str) -> Result<T> {
        Err(ScanError { what, at: self.pos })
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    #[inline(always)]
    fn ws(&mut self) {
        let b = self.bytes();
        // Most of the time there is none: one comparison says so.
        if b.get(self.pos).is_some_and(|&c| c > b' ') {
            return;
        }
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = b.get(self.pos) {
            self.pos += 1;
        }
    }

    /// Skips whitespace and takes `byte`, or fails with `what`.
    fn expect(&mut self, byte: u8, what: &'static str) -> Result<()> {
        self.ws();
        if self.peek() != Some(byte) {
            return self.fail(what);
        }
        self.pos += 1;
        Ok(())
    }

    fn open(&mut self, object: bool) -> Result<()> {
        if self.depth + 1 >= MAX_DEPTH {
            return self.fail("nesting too deep");
        }
        if object {
            self.objects |= 1 << self.depth;
        } else {
            self.objects &= !(1 << self.depth);
        }
        self.depth += 1;
        self.pos += 1;
        Ok(())
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && self.objects & (1 << (self.depth - 1)) != 0
    }

    /// Enters the object that must come next.
    pub fn begin_object(&mut self) -> Result<()> {
        self.ws();
        if self.peek() != Some(b'{') {
            return self.fail("expected an object");
        }
        self.open(true)
    }

    /// Enters the array that must come next.
    pub fn begin_array(&mut self) -> Result<()> {
        self.ws();
        if self.peek() != Some(b'[') {
            return self.fail("expected an array");
        }
        self.open(false)
    }

    /// The next key of the object just entered, its colon taken; `None` (the object left) at
    /// its end. `first` is the caller's: true until the first call for this object.
    pub fn next_key(&mut self, first: &mut bool) -> Result<Option<Cow<'a, str>>> {
        Ok(self.next_key_as(first, None)?.map(|k| k.name))
    }

    /// `next_key`, expecting the key and its colon to be written as `expected` (a key read
    /// before, from the same kind of record): when the body's next bytes are exactly those, the
    /// key is taken without scanning it again.
    #[inline(always)]
    pub fn next_key_as(
        &mut self,
        first: &mut bool,
        expected: Option<Written<'a>>,
    ) -> Result<Option<Key<'a>>> {
        if !self.more(b'}', first)? {
            return Ok(None);
        }
        self.ws();
        let start = self.pos;
        // `w` was scanned as a whole string without escapes and then its colon (only `Scan`
        // makes a `Written`): the same bytes here are the same key and colon.
        if let Some(w) = expected
            && prefix(&self.bytes()[start..], w.text.as_bytes())
        {
            self.pos += w.text.len();
            return Ok(Some(Key {
                name: Cow::Borrowed(w.name),
                written: Some(w),
                expected: true,
                at: start,
            }));
        }
        let name = self.key()?;
        self.expect(b':', "expected `:` after an object key")?;
        let written = match name {
            Cow::Borrowed(name) => Some(Written {
                text: &self.text[start..self.pos],
                name,
            }),
            Cow::Owned(_) => None,
        };
        Ok(Some(Key {
            name,
            written,
            expected: false,
            at: start,
        }))
    }

    /// `next_key_as`, then the whitespace after the colon, with what was taken from where the
    /// scanner was (just after the last value, or the object's opening) up to the value: a
    /// `Gap` where the key had no escapes, for `gap_written` to take in the next object.
    #[inline(always)]
    pub fn next_key_gap(
        &mut self,
        first: &mut bool,
        expected: Option<Written<'a>>,
    ) -> Result<Option<(Key<'a>, Option<Gap<'a>>)>> {
        let from = self.pos;
        let Some(key) = self.next_key_as(first, expected)? else {
            return Ok(None);
        };
        self.ws();
        let gap = key.written.map(|w| Gap {
            text: &self.text[from..self.pos],
            key: key.at - from,
            name: w.name,
        });
        Ok(Some((key, gap)))
    }

    /// The next key of the object being walked, taken with its separator and the whitespace
    /// around it when the bytes here are exactly `g`'s (`g` is from the same place in an
    /// object of the same kind: the first key's only for a first key): where the key starts.
    /// `None` otherwise, the scanner where it was. One comparison for what took five steps
    /// when the key alone was compared (whitespace, the comma, whitespace, the key and its
    /// colon, whitespace), in records and in consents values: a 100-record page's filter went
    /// from 726k instructions to 686k.
    #[inline(always)]
    pub fn gap_written(&mut self, g: Gap<'a>) -> Option<usize> {
        let at = self.pos;
        if !prefix(&self.bytes()[at..], g.text.as_bytes()) {
            return None;
        }
        self.pos += g.text.len();
        Some(at + g.key)
    }

    /// Leaves the object being walked if it ends here (its `}` next, after whitespace).
    pub fn end_object(&mut self) -> bool {
        self.ws();
        if self.peek() != Some(b'}') || !self.in_object() {
            return false;
        }
        self.pos += 1;
        self.depth -= 1;
        true
    }

    /// The text being scanned.
    pub fn text_scanned(&self) -> &'a str {
        self.text
    }

    /// How far the scan has got: the byte after the last thing taken.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Whether the array just entered has another element; at its end it is left.
    pub fn next_element(&mut self, first: &mut bool) -> Result<bool> {
        self.more(b']', first)
    }

    /// After an item (or at the start): a comma means another, the closing byte the end.
    #[inline(always)]
    fn more(&mut self, close: u8, first: &mut bool) -> Result<bool> {
        self.ws();
        match self.peek() {
            Some(b) if b == close => {
                self.pos += 1;
                self.depth -= 1;
                Ok(false)
            }
            Some(b',') if !*first => {
                self.pos += 1;
                Ok(true)
            }
            _ if *first => {
                *first = false;
                Ok(true)
            }
            _ => self.fail(if close == b'}' {
                "expected `,` or `}` in an object"
            } else {
                "expected `,` or `]` in an array"
            }),
        }
    }

    /// The next value as raw JSON text, checked and skipped.
    #[inline(always)]
    pub fn value(&mut self) -> Result<&'a str> {
        let start = self.value_start()?;
        Ok(&self.text[start..self.pos])
    }

    /// The next value, checked and skipped: where it starts (it ends where the scanner now
    /// is). For a caller that keeps positions, not text: slicing a `str` checks both ends.
    #[inline(always)]
    pub fn value_start(&mut self) -> Result<usize> {
        self.ws();
        let start = self.pos;
        match self.peek() {
            Some(b'[') if self.flat_array().is_some() => {}
            Some(b'{' | b'[') => {
                self.nested(start)?;
            }
            // Most values are scalars: no levels to keep.
            _ => self.scalar()?,
        }
        Ok(start)
    }

    /// An array of scalars, taken whole (a record's arrays are almost all lists of codes:
    /// markers, flags, elections voted in), without `nested`'s bookkeeping of levels; `None`,
    /// the scanner where it was, for anything else (an element that is an object or an
    /// array, a malformed one), which `nested` then reads or refuses.
    #[inline(always)]
    fn flat_array(&mut self) -> Option<()> {
        let start = self.pos;
        let taken = (|| {
            if self.depth + 1 >= MAX_DEPTH {
                return None;
            }
            self.pos += 1;
            self.ws();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Some(());
            }
            loop {
                if let Some(b'{' | b'[') = self.peek() {
                    return None;
                }
                self.scalar().ok()?;
                self.ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.ws();
                    }
                    Some(b']') => {
                        self.pos += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        })();
        if taken.is_none() {
            self.pos = start;
        }
        taken
    }

    /// The next value as raw JSON text, checked and skipped, and what `read` makes of it:
    /// `read` walks the value with this scanner's own methods (so every byte it takes is
    /// checked) and answers `None` where the value is not in the shape it reads. Unless it
    /// took exactly one whole value (it answered, and left the scanner at the level it
    /// started), the scanner goes back to where it was (`mark`), the value is skipped as
    /// `value` does and `read`'s answer is `None`.
    pub fn value_read<T>(
        &mut self,
        read: impl FnOnce(&mut Scan<'a>) -> Option<T>,
    ) -> Result<(&'a str, Option<T>)> {
        self.ws();
        let start = self.pos;
        let mark = self.mark();
        match read(self) {
            Some(t) if self.depth == mark.depth && self.pos > start => {
                Ok((&self.text[start..self.pos], Some(t)))
            }
            _ => {
                self.reset(mark);
                Ok((self.value()?, None))
            }
        }
    }

    /// How many values `value` and `value_start` have taken as nested so far (wrapping): an
    /// object, or an array holding an object or an array. A value read between two askings
    /// nests where the count moved.
    pub fn nested_values(&self) -> u32 {
        self.nested
    }

    /// An object or array value from `start` (its opening byte) to its end.
    fn nested(&mut self, start: usize) -> Result<&'a str> {
        self.nested = self.nested.wrapping_add(1);
        let base = self.depth;
        loop {
            // At a value.
            match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    let object = open == b'{';
                    self.open(object)?;
                    self.ws();
                    if self.peek() == Some(if object { b'}' } else { b']' }) {
                        self.pos += 1;
                        self.depth -= 1;
                    } else {
                        if object {
                            self.nested_key()?;
                        }
                        continue;
                    }
                }
                _ => self.scalar()?,
            }
            // After a value: close what ends here, until the next value or the start level.
            loop {
                if self.depth == base {
                    return Ok(&self.text[start..self.pos]);
                }
                self.ws();
                let object = self.in_object();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.ws();
                        if object {
                            self.nested_key()?;
                        }
                        break;
                    }
                    Some(b'}') if object => {
                        self.pos += 1;
                        self.depth -= 1;
                    }
                    Some(b']') if !object => {
                        self.pos += 1;
                        self.depth -= 1;
                    }
                    _ => {
                        return self.fail(if object {
                            "expected `,` or `}` in an object"
                        } else {
                            "expected `,` or `]` in an array"
                        });
                    }
                }
            }
            self.ws();
        }
    }

    /// A key inside a skipped value (checked, not decoded) and its colon.
    fn nested_key(&mut self) -> Result<()> {
        if self.peek() != Some(b'"') {
            return self.fail("expected an object key");
        }
        self.string()?;
        self.expect(b':', "expected `:` after an object key")?;
        self.ws();
        Ok(())
    }

    /// Takes a `null` if one comes next.
    pub fn null(&mut self) -> Result<bool> {
        self.ws();
        let null = prefix(&self.bytes()[self.pos..], b"null");
        if null {
            self.pos += 4;
        }
        Ok(null)
    }

    /// The end of the body: nothing but whitespace may follow.
    pub fn end(&mut self) -> Result<()> {
        self.ws();
        if self.pos != self.text.len() {
            return self.fail("trailing characters");
        }
        Ok(())
    }

    #[inline(always)]
    fn scalar(&mut self) -> Result<()> {
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            None => self.fail("unexpected end of the body"),
            Some(_) => self.fail("expected a value"),
        }
    }

    /// `true`, `false` or `null` (compared as whole words, `prefix`: a call into `memcmp`
    /// for four bytes cost more than the comparison).
    fn literal(&mut self, word: &[u8]) -> Result<()> {
        if !prefix(&self.bytes()[self.pos..], word) {
            return self.fail("expected a value");
        }
        self.pos += word.len();
        Ok(())
    }

    fn number(&mut self) -> Result<()> {
        let b = self.bytes();
        let digits = |mut at: usize| {
            while b.get(at).is_some_and(u8::is_ascii_digit) {
                at += 1;
            }
            at
        };
        let mut at = self.pos;
        if b.get(at) == Some(&b'-') {
            at += 1;
        }
        match b.get(at) {
            Some(b'0') => at += 1,
            Some(b'1'..=b'9') => at = digits(at + 1),
            _ => {
                return Err(ScanError {
                    what: "invalid number",
                    at,
                });
            }
        }
        if b.get(at) == Some(&b'.') {
            let end = digits(at + 1);
            if end == at + 1 {
                return Err(ScanError {
                    what: "invalid number",
                    at: end,
                });
            }
            at = end;
        }
        if let Some(b'e' | b'E') = b.get(at) {
            at += 1;
            if let Some(b'+' | b'-') = b.get(at) {
                at += 1;
            }
            let end = digits(at);
            if end == at {
                return Err(ScanError {
                    what: "invalid number",
                    at,
                });
            }
            at = end;
        }
        self.pos = at;
        Ok(())
    }

    /// A string value, decoded as keys are.
    pub fn text(&mut self) -> Result<Cow<'a, str>> {
        self.ws();
        if self.peek() != Some(b'"') {
            return self.fail("expected a string");
        }
        self.key()
    }

    /// A key of an object being walked (or a string value, `text`): borrowed when it has no
    /// escapes, decoded (as `serde_json` decodes keys, refusing lone surrogates) when it has.
    fn key(&mut self) -> Result<Cow<'a, str>> {
        let start = self.pos;
        if self.peek() != Some(b'"') {
            return self.fail("expected an object key");
        }
        let escaped = self.string()?;
        let raw = &self.text[start..self.pos];
        if !escaped {
            return Ok(Cow::Borrowed(&raw[1..raw.len() - 1]));
        }
        serde_json::from_str::<String>(raw)
            .map(Cow::Owned)
            .map_err(|_| ScanError {
                what: "invalid escape in a string",
                at: start,
            })
    }

    /// A string from its opening quote to past its closing one; whether it has escapes.
    #[inline(always)]
    fn string(&mut self) -> Result<bool> {
        let b = self.bytes();
        let mut at = self.pos + 1;
        let mut escaped = false;
        loop {
            at = special(b, at);
            match b.get(at) {
                Some(b'"') => {
                    self.pos = at + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    match b.get(at + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => at += 2,
                        Some(b'u') => {
                            let hex = b.get(at + 2..at + 6);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return Err(ScanError {
                                    what: "invalid escape in a string",
                                    at,
                                });
                            }
                            at += 6;
                        }
                        _ => {
                            return Err(ScanError {
                                what: "invalid escape in a string",
                                at,
                            });
                        }
                    }
                }
                Some(_) => {
                    return Err(ScanError {
                        what: "control character in a string",
                        at,
                    });
                }
                None => {
                    return Err(ScanError {
                        what: "unterminated string",
                        at,
                    });
                }
            }
        }
    }
}

/// Whether `b` starts with `p` (inlined: keys are short, and a call into `memcmp` per key
/// costs more than the comparison).
#[inline]
fn prefix(b: &[u8], p: &[u8]) -> bool {
    b.get(..p.len()).is_some_and(|b| super::same_bytes(b, p))
}

/// The position of the first `"`, `\` or control character at or after `at` (or the end),
/// sixteen bytes at a time in vector registers (`wide`, without `unsafe` here: SSE2 on
/// x86-64). Most strings of a record are shorter than sixteen bytes, so one step finds their
/// end; eight bytes at a time in a `u64` took two steps, each longer (a 100-record page's
/// filter went from 823k instructions to 763k). The last bytes, fewer than sixteen, go one at
/// a time: padded to one more vector step instead, a 100-record request took 6k instructions
/// more (it is inlined into every string the filter reads), though `audit::json`'s short
/// strings took fewer.
#[inline(always)]
pub(crate) fn special(b: &[u8], mut at: usize) -> usize {
    let quote = u8x16::splat(b'"');
    let backslash = u8x16::splat(b'\\');
    let below_space = u8x16::splat(0x1f);
    while let Some(chunk) = b.get(at..at + 16) {
        let mut bytes = [0; 16];
        bytes.copy_from_slice(chunk);
        let v = u8x16::new(bytes);
        // A control character is one that the minimum with 0x1f leaves as it is.
        let hits =
            (v.cmp_eq(quote) | v.cmp_eq(backslash) | v.min(below_space).cmp_eq(v)).move_mask();
        if hits != 0 {
            return at + hits.trailing_zeros() as usize;
        }
        at += 16;
    }
    while let Some(&c) = b.get(at) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return at;
        }
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests;
