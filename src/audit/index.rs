//! Sealing a finished segment: its seal (first and last hash, sequence range, record count and
//! last record's time, all checked by `verify`) and its subject
//! index, so one subject's disclosures are found without reading years of log.
//!
//! The index `seg-N.idx` is a sorted array of fixed-width entries `(subject key, byte offset)`,
//! 16 bytes each, where the subject key is the 64-bit FNV-1a hash of the subject id (indexes
//! written before version 2 of the format used the first 8 bytes of SHA-256; both are read).
//! The key only spreads ids over the array; it protects nothing (an id is a short string that
//! any hash of it gives away), so it is the cheapest well-defined hash: hashing millions of
//! mentions with SHA-256 was 40% of sealing a segment. A lookup is a binary search with
//! `pread` (about 23 reads for 5 million entries) and then one read per matching record; a key
//! collision only costs reading a line whose `subjects` do not contain the id, which the
//! reader checks. Why a sorted array rather than a Bloom filter: a filter only says "maybe
//! here" and still forces a scan of the segment, while the array gives the offsets directly,
//! at a size (16 bytes per subject mention) that is small next to the records themselves. The seal `seg-N.seal.json` lets verification start at any segment and
//! detect a changed boundary. Both are written to a temporary name, synced and renamed, so a
//! crash leaves either a whole file or none (and the segment is sealed again on the next open).

use std::borrow::Cow;
use std::fs::File;
use std::hash::Hasher;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::segment::{read_line, segment_name};
use crate::filter::scan::Scan;

/// The current format: FNV-1a keys.
const MAGIC: &[u8; 8] = b"WGIDX002";
/// The first format: SHA-256 keys. Still read, never written.
const MAGIC_SHA256: &[u8; 8] = b"WGIDX001";
const ENTRY: u64 = 16;
/// The index goes to disk 1 MiB at a time, each sync followed by a pause as long as it took.
/// Written and synced at once, an index (tens of MB) queued that much ahead of the audit
/// writer's `fdatasync` on the same disk: off-CPU traces of the load test showed the writer's
/// sync waiting 80-130 ms while a segment was sealed, and every request in its batch with it.
/// Paced, the load test's p99.9 at a fixed rate went from 15-19 ms to 7-9 ms (two runs each).
const SYNC_EVERY_ENTRIES: usize = (1 << 20) / ENTRY as usize;

/// What a sealed segment holds, written beside it as `seg-N.seal.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub segment: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The hash the first record links back to (the previous segment's last hash).
    pub first_prev: String,
    pub last_hash: String,
    /// The newest record's time: what retention compares against.
    #[serde(default)]
    pub last_ts: String,
    pub records: u64,
    pub subject_mentions: u64,
    pub sealed_at: String,
}

pub fn seal_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!(
        "{}.seal.json",
        segment_name(n).trim_end_matches(".jsonl")
    ))
}

pub fn index_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!(
        "{}.idx",
        segment_name(n).trim_end_matches(".jsonl")
    ))
}

/// The 8-byte key a subject id is indexed under: FNV-1a over its UTF-8 bytes.
pub fn subject_key(subject: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(subject.as_bytes());
    h.finish()
}

/// The key under the first format (`WGIDX001`): the first 8 bytes of SHA-256.
fn subject_key_sha256(subject: &str) -> u64 {
    let digest = Sha256::digest(subject.as_bytes());
    let mut k = [0u8; 8];
    k.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(k)
}

/// What sealing reads of a record, borrowed from the line: a segment holds millions of subject
/// mentions, and reading each line into owned values was most of the seal's time.
struct Head<'a> {
    ts: Cow<'a, str>,
    seq: u64,
    prev: Cow<'a, str>,
    hash: Cow<'a, str>,
    subjects: Vec<Cow<'a, str>>,
}

/// A record line's top-level `seq`, `prev`, `hash`, `ts` and `subjects` (the last two may be
/// absent), read with the filter's scanner: every other field is checked as JSON and skipped.
fn head(line: &str) -> Result<Head<'_>, String> {
    let mut scan = Scan::new(line);
    let (mut ts, mut seq, mut prev, mut hash, mut subjects) = (None, None, None, None, None);
    let e = |e: crate::filter::scan::ScanError| e.to_string();
    scan.begin_object().map_err(e)?;
    let mut first = true;
    while let Some(key) = scan.next_key(&mut first).map_err(e)? {
        let twice = match key.as_ref() {
            "ts" => ts.replace(scan.text().map_err(e)?).is_some(),
            "prev" => prev.replace(scan.text().map_err(e)?).is_some(),
            "hash" => hash.replace(scan.text().map_err(e)?).is_some(),
            "seq" => {
                let n = scan.value().map_err(e)?;
                let n = n
                    .parse::<u64>()
                    .map_err(|_| format!("`seq` is not a count: {n}"))?;
                seq.replace(n).is_some()
            }
            "subjects" => {
                let mut all = Vec::new();
                let mut first = true;
                scan.begin_array().map_err(e)?;
                while scan.next_element(&mut first).map_err(e)? {
                    all.push(scan.text().map_err(e)?);
                }
                subjects.replace(all).is_some()
            }
            _ => {
                scan.value().map_err(e)?;
                false
            }
        };
        if twice {
            return Err(format!("`{key}` twice in a record"));
        }
    }
    scan.end().map_err(e)?;
    let missing = |what: &str| format!("a record without `{what}`");
    Ok(Head {
        ts: ts.unwrap_or_default(),
        seq: seq.ok_or_else(|| missing("seq"))?,
        prev: prev.ok_or_else(|| missing("prev"))?,
        hash: hash.ok_or_else(|| missing("hash"))?,
        subjects: subjects.unwrap_or_default(),
    })
}

/// Reads segment `n` once and writes its index and seal. Idempotent.
pub fn seal(dir: &Path, n: u64) -> io::Result<Seal> {
    let (seal, entries) = derive(dir, n, subject_key)?;
    write_atomically(&index_path(dir, n), |out| {
        out.write_all(MAGIC)?;
        out.write_all(&(entries.len() as u64).to_le_bytes())?;
        for (i, e) in entries.iter().enumerate() {
            if i % SYNC_EVERY_ENTRIES == SYNC_EVERY_ENTRIES - 1 {
                out.flush()?;
                let started = std::time::Instant::now();
                out.get_ref().sync_data()?;
                // Leave the disk to the audit writer for as long again (see the constant).
                std::thread::sleep(started.elapsed());
            }
            out.write_all(&entry_bytes(*e))?;
        }
        Ok(())
    })?;
    let seal_json = serde_json::to_vec_pretty(&seal).map_err(io::Error::other)?;
    write_atomically(&seal_path(dir, n), |out| out.write_all(&seal_json))?;
    Ok(seal)
}

/// Whether segment `n`'s index lists exactly the subject mentions the segment holds, in
/// whichever format it was written: once a segment is sealed, subject access reads only the
/// records its index points at, so an index with an entry removed would hide a disclosure.
/// `Ok(true)` when there is no index (lookups then read the whole segment). The file is read
/// as it is compared, so memory is the rebuilt entries' (as when sealing), not twice more.
pub fn index_matches(dir: &Path, n: u64) -> io::Result<bool> {
    let file = match File::open(index_path(dir, n)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    let mut written = BufReader::with_capacity(1 << 16, file);
    // A file too short is a mismatch; a disk that cannot be read is an error, not tampering.
    let short = |r: io::Result<()>| match r {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(true),
        Err(e) => Err(e),
    };
    let mut head = [0u8; 16];
    if short(written.read_exact(&mut head))? {
        return Ok(false);
    }
    let (_, entries) = match &head[..8] {
        m if m == MAGIC => derive(dir, n, subject_key)?,
        m if m == MAGIC_SHA256 => derive(dir, n, subject_key_sha256)?,
        _ => return Ok(false),
    };
    if head[8..] != (entries.len() as u64).to_le_bytes() {
        return Ok(false);
    }
    let mut entry = [0u8; 16];
    for e in entries {
        if short(written.read_exact(&mut entry))? || entry != entry_bytes(e) {
            return Ok(false);
        }
    }
    // Nothing after the last entry.
    Ok(written.read(&mut entry)? == 0)
}

/// One index entry as written: the key big-endian (so entries sort as bytes too), then the
/// offset.
fn entry_bytes(e: u128) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&((e >> 64) as u64).to_be_bytes());
    b[8..].copy_from_slice(&(e as u64).to_le_bytes());
    b
}

/// What sealing segment `n` derives from it: its seal (stamped now), and its index entries
/// (`key << 64 | offset`, keys by `key_of`), sorted, each once.
fn derive(dir: &Path, n: u64, key_of: impl Fn(&str) -> u64) -> io::Result<(Seal, Vec<u128>)> {
    let path = dir.join(segment_name(n));
    let mut reader = BufReader::new(File::open(&path)?);
    // `key << 64 | offset`: one integer compare per step of the sort.
    let mut entries: Vec<u128> = Vec::new();
    let (mut offset, mut line) = (0u64, Vec::new());
    let mut first: Option<(u64, String)> = None;
    let (mut last_seq, mut last_hash, mut records, mut last_ts) =
        (0, String::new(), 0, String::new());
    loop {
        line.clear();
        let read = read_line(&mut reader, &mut line)?;
        if read == 0 || !line.ends_with(b"\n") {
            // A finished segment is whole lines to its end, zero bytes aside: a seal and index
            // stopping at damage would have every later lookup miss the records after it.
            // Unsealed, it is scanned, damage and all (`reader`), and verify says where.
            if !line.is_empty() || !super::segment::only_unwritten_after(&mut reader)? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "segment {n} is damaged at byte {offset} (a line cut short, or bytes \
                         after zero bytes): not sealed; `wardgate audit verify` says more"
                    ),
                ));
            }
            break;
        }
        let text = std::str::from_utf8(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let head = head(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if first.is_none() {
            first = Some((head.seq, head.prev.into_owned()));
        }
        let at = u128::from(offset);
        entries.extend(
            head.subjects
                .iter()
                .map(|s| u128::from(key_of(s)) << 64 | at),
        );
        last_hash.clear();
        last_hash.push_str(&head.hash);
        last_ts.clear();
        last_ts.push_str(&head.ts);
        (last_seq, records) = (head.seq, records + 1);
        offset += read as u64;
    }
    entries.sort_unstable();
    entries.dedup();
    let (first_seq, first_prev) = first.unwrap_or((0, String::new()));
    let seal = Seal {
        segment: n,
        first_seq,
        last_seq,
        first_prev,
        last_hash,
        last_ts,
        records,
        subject_mentions: entries.len() as u64,
        sealed_at: super::AuditRecord::now_ts(),
    };
    Ok((seal, entries))
}

/// Writes `path` through a temporary file that is synced and renamed into place.
pub(super) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
    write(&mut out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn read_seal(dir: &Path, n: u64) -> Option<Seal> {
    let bytes = std::fs::read(seal_path(dir, n)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Byte offsets in segment `n` of records that may mention `subject` (by key), or `None` if
/// the segment has no usable index.
pub fn lookup(dir: &Path, n: u64, subject: &str) -> Option<Vec<u64>> {
    let f = File::open(index_path(dir, n)).ok()?;
    let mut head = [0u8; 16];
    (&f).read_exact(&mut head).ok()?;
    let key = match &head[..8] {
        m if m == MAGIC => subject_key(subject),
        m if m == MAGIC_SHA256 => subject_key_sha256(subject),
        _ => return None,
    };
    let count = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let entry = |i: u64| -> Option<(u64, u64)> {
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, 16 + i * ENTRY).ok()?;
        Some((
            u64::from_be_bytes(b[..8].try_into().ok()?),
            u64::from_le_bytes(b[8..].try_into().ok()?),
        ))
    };
    // The first entry with this key.
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if entry(mid)?.0 < key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut out = Vec::new();
    let mut i = lo;
    while i < count {
        let (k, off) = entry(i)?;
        if k != key {
            break;
        }
        out.push(off);
        i += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{encode_line, tests::sample};

    #[test]
    fn a_line_reads_as_serde_json_reads_it() {
        let mut record = sample(7);
        record.subjects = ["VF-1", "quote \" and \\ and \u{1}", "Zoë"]
            .into_iter()
            .collect();
        record.detail = Some(serde_json::json!({ "export": { "chunks": [1, 2], "seq": "x" } }));
        let line = encode_line(42, &"ab".repeat(32), &record).unwrap();
        let text = std::str::from_utf8(&line.bytes).unwrap();
        let want: serde_json::Value = serde_json::from_str(text).unwrap();
        let got = head(text).unwrap();
        assert_eq!(got.seq, 42);
        assert_eq!(got.prev, want["prev"].as_str().unwrap());
        assert_eq!(got.hash, want["hash"].as_str().unwrap());
        assert_eq!(got.ts, want["ts"].as_str().unwrap());
        assert_eq!(record.subjects, got.subjects[..]);
        // Broken, incomplete or doubled lines are refused, not half read.
        for bad in [
            &text[..text.len() - 3],
            r#"{"seq":1,"prev":"a"}"#,
            r#"{"seq":-1,"prev":"a","hash":"b"}"#,
            r#"{"seq":1.5,"prev":"a","hash":"b"}"#,
            r#"{"seq":1,"prev":"a","hash":"b","subjects":["x",1]}"#,
            r#"{"seq":1,"prev":"a","hash":"b","hash":"c"}"#,
            r#"{"seq":1,"prev":"a","hash":"b"} x"#,
        ] {
            assert!(head(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_lookup_finds_every_record_of_a_subject_in_either_format() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = Vec::new();
        let mut hash = "0".repeat(64);
        let mut offsets = Vec::new();
        for seq in 1..=40u64 {
            let mut record = sample(seq);
            record.subjects = vec![format!("VF-{}", seq % 7), format!("VF-{}", seq % 5)].into();
            if record.subjects.iter().any(|s| s == "VF-3") {
                offsets.push(text.len() as u64);
            }
            let line = encode_line(seq, &hash, &record).unwrap();
            text.extend_from_slice(&line.bytes);
            hash = line.hash;
        }
        std::fs::write(dir.path().join(segment_name(1)), &text).unwrap();
        let sealed = seal(dir.path(), 1).unwrap();
        assert_eq!((sealed.records, sealed.last_seq), (40, 40));
        assert_eq!(lookup(dir.path(), 1, "VF-3").unwrap(), offsets);
        assert_eq!(lookup(dir.path(), 1, "VF-9").unwrap(), Vec::<u64>::new());
        assert!(index_matches(dir.path(), 1).unwrap());

        // An index sealed by an earlier version (SHA-256 keys) is still read as written.
        let index = std::fs::read(index_path(dir.path(), 1)).unwrap();
        let mut old: Vec<(u64, u64)> = index[16..]
            .chunks(16)
            .map(|e| {
                (
                    u64::from_be_bytes(e[..8].try_into().unwrap()),
                    u64::from_le_bytes(e[8..].try_into().unwrap()),
                )
            })
            .collect();
        let by_key: std::collections::HashMap<u64, &str> =
            ["VF-0", "VF-1", "VF-2", "VF-3", "VF-4", "VF-5", "VF-6"]
                .into_iter()
                .map(|s| (subject_key(s), s))
                .collect();
        for e in &mut old {
            e.0 = subject_key_sha256(by_key[&e.0]);
        }
        old.sort_unstable();
        let mut bytes = MAGIC_SHA256.to_vec();
        bytes.extend_from_slice(&index[8..16]);
        for (k, off) in &old {
            bytes.extend_from_slice(&k.to_be_bytes());
            bytes.extend_from_slice(&off.to_le_bytes());
        }
        std::fs::write(index_path(dir.path(), 1), &bytes).unwrap();
        assert_eq!(lookup(dir.path(), 1, "VF-3").unwrap(), offsets);
        // Verification rebuilds it in its own format.
        assert!(index_matches(dir.path(), 1).unwrap());
        let mut extra = bytes.clone();
        extra.extend_from_slice(&[0; 16]);
        std::fs::write(index_path(dir.path(), 1), &extra).unwrap();
        assert!(!index_matches(dir.path(), 1).unwrap());

        // A file that is not an index is no index: the reader falls back to scanning.
        bytes[..8].copy_from_slice(b"WGIDX999");
        std::fs::write(index_path(dir.path(), 1), &bytes).unwrap();
        assert_eq!(lookup(dir.path(), 1, "VF-3"), None);
        assert!(!index_matches(dir.path(), 1).unwrap());
    }
}
