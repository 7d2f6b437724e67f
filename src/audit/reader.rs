//! Finding one subject's records: through the seal indexes where a segment has one, by a
//! scan of the (at most one, current) segment that has none.
//!
//! Used by subject access requests. [`scan_all`] reads every byte instead; it exists as the
//! baseline the benchmark compares against and as the fallback for a damaged index.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;

use serde_json::Value;

use super::index;
use super::segment::{list_segments, read_line};

/// How a lookup went, for the report and the benchmark.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LookupStats {
    pub segments: u64,
    pub segments_indexed: u64,
    pub segments_scanned: u64,
    pub lines_read: u64,
    /// Lines that may be about the subject (the index points at them, or they hold the id)
    /// and cannot be read as records: a damaged log, which a report must not pass over in
    /// silence (`wardgate audit verify` says where).
    pub lines_unreadable: u64,
    /// Lines naming the subject in copies crash recovery set aside (`seg-N.jsonl.cut-T`):
    /// records after a damaged page, possibly acknowledged, not in the chain until an
    /// operator settles them, so a report must say it may be missing them.
    pub lines_set_aside: u64,
}

fn mentions(record: &Value, subject: &str) -> bool {
    record["subjects"]
        .as_array()
        .is_some_and(|s| s.iter().any(|v| v.as_str() == Some(subject)))
}

/// Every record whose `subjects` contain `subject`, in log order.
pub fn records_mentioning(dir: &Path, subject: &str) -> io::Result<(Vec<Value>, LookupStats)> {
    let mut out = Vec::new();
    let stats = each_record_mentioning(dir, subject, &mut |v| out.push(v))?;
    Ok((out, stats))
}

/// `records_mentioning`, handing each record to `each` as it is read, so that a caller keeping
/// only part of each (a subject access report: an export chunk's record names thousands of
/// people) never holds them whole.
pub fn each_record_mentioning(
    dir: &Path,
    subject: &str,
    each: &mut dyn FnMut(Value),
) -> io::Result<LookupStats> {
    let mut stats = LookupStats::default();
    let segments = list_segments(dir)?;
    let newest = segments.last().map(|(n, _)| *n);
    let mut before: Option<u64> = None;
    for (n, path) in segments {
        stats.segments += 1;
        let offsets = index::read_seal(dir, n).and_then(|_| index::lookup(dir, n, subject));
        // A segment a prune removed since the listing: its records are no longer held (the
        // report's coverage, read after this, says what was pruned).
        let Some(file) = open_listed(dir, n, &path)? else {
            before = None;
            continue;
        };
        // Segments are numbered one after another, and prunes take the oldest: one missing
        // between two opened here is damage, whose records may have named the subject.
        if let Some(b) = before {
            stats.lines_unreadable += n.saturating_sub(b + 1);
        }
        before = Some(n);
        match offsets {
            Some(offsets) => {
                stats.segments_indexed += 1;
                let mut reader = BufReader::new(file);
                let mut line = Vec::new();
                for off in offsets {
                    reader.seek(SeekFrom::Start(off))?;
                    line.clear();
                    reader.read_until(b'\n', &mut line)?;
                    stats.lines_read += 1;
                    match serde_json::from_slice::<Value>(&line) {
                        Ok(v) if mentions(&v, subject) => each(v),
                        Ok(_) => {}
                        Err(_) => stats.lines_unreadable += 1,
                    }
                }
            }
            None => {
                stats.segments_scanned += 1;
                scan_segment(file, subject, each, &mut stats, Some(n) != newest)?;
            }
        }
    }
    stats.lines_set_aside = set_aside_naming(dir, subject)?;
    Ok(stats)
}

/// How many lines of the copies crash recovery set aside name `subject` (`LookupStats::
/// lines_set_aside`).
fn set_aside_naming(dir: &Path, subject: &str) -> io::Result<u64> {
    let needle = format!("\"{subject}\"");
    let needle = memchr::memmem::Finder::new(needle.as_bytes());
    let mut naming = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.contains(".jsonl.cut-") || name.ends_with(".pending") || name.ends_with(".tmp") {
            continue;
        }
        // One an operator settled and removed since the listing is passed over.
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if needle.find(&line).is_some() {
                naming += 1;
            }
        }
    }
    Ok(naming)
}

/// Opens segment `n`, listed a moment ago; `None` when it is gone because a prune removed it
/// meanwhile (prunes remove the oldest first, so every segment still there is newer). Any
/// other segment missing is an error, not a gap passed over.
fn open_listed(dir: &Path, n: u64, path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && list_segments(dir)?
                    .first()
                    .is_none_or(|(first, _)| *first > n) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The same answer by reading every line of every segment.
pub fn scan_all(dir: &Path, subject: &str) -> io::Result<(Vec<Value>, LookupStats)> {
    let mut out = Vec::new();
    let mut stats = LookupStats::default();
    let segments = list_segments(dir)?;
    let last = segments.len();
    for (i, (_, path)) in segments.into_iter().enumerate() {
        stats.segments += 1;
        stats.segments_scanned += 1;
        let finished = i + 1 < last;
        scan_segment(
            File::open(path)?,
            subject,
            &mut |v| out.push(v),
            &mut stats,
            finished,
        )?;
    }
    Ok((out, stats))
}

/// Reads the records of one segment naming `subject`. A segment is whole lines and then zero
/// bytes (made-ready space) or its end: anything written after a line cut short or after zero
/// bytes is damage (a page zeroed or torn by the disk), counted as a line that may have been
/// about the subject, and the records after it are read all the same, in the newest segment
/// as in any other. `finished`: a segment no longer written (not the newest), whose last line
/// cut short is damage too (the newest one's may be a record still being written).
fn scan_segment(
    file: File,
    subject: &str,
    each: &mut dyn FnMut(Value),
    stats: &mut LookupStats,
    finished: bool,
) -> io::Result<()> {
    let needle = format!("\"{subject}\"");
    let needle = memchr::memmem::Finder::new(needle.as_bytes());
    let mut reader = BufReader::new(file);
    // Bytes, not text: the current segment's last line may be cut inside a character.
    let mut line = Vec::new();
    // Where the next line starts.
    let mut at = 0u64;
    loop {
        line.clear();
        // Nothing read (the end, or a zero byte) is a line without its newline, below.
        let start = at;
        at += read_line(&mut reader, &mut line)? as u64;
        // A line without its newline is a record still being written (or torn by a crash
        // and trimmed at the next start), or the segment's made-ready space begins: no
        // record.
        if line.last() != Some(&b'\n') {
            // A segment ends with its last whole line (the newest one's may be still being
            // written), or zero bytes after it.
            let torn = !line.is_empty();
            if past_zeros(&mut reader)? {
                stats.lines_unreadable += u64::from(torn && finished);
                break;
            }
            // In the segment being written, zero bytes read a moment ago may have been
            // written over since (the writer fills the space made ready ahead of it, in
            // order): the bytes after them, read later, are the records that followed, no
            // damage. Read again from the line's start.
            if !finished && written_over(reader.get_ref(), at)? {
                reader.seek(SeekFrom::Start(start))?;
                at = start;
                continue;
            }
            // Written after zero bytes: a damaged page, whose records may have named the
            // subject. Read on from the first byte written (a record's tail, read as a line
            // that is no record, or the next record whole).
            stats.lines_unreadable += 1;
            at = reader.stream_position()?;
            continue;
        }
        stats.lines_read += 1;
        // Cheap substring test first; parse only lines that can match.
        if needle.find(&line).is_some() {
            match serde_json::from_slice::<Value>(&line) {
                Ok(v) if mentions(&v, subject) => each(v),
                Ok(_) => {}
                Err(_) => stats.lines_unreadable += 1,
            }
        }
    }
    Ok(())
}

/// Whether the byte at `at` of `file`, read as zero, is something else now.
fn written_over(file: &File, at: u64) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut byte = [0];
    Ok(file.read_at(&mut byte, at)? == 1 && byte[0] != 0)
}

/// Consumes the zero bytes that come next; true when the end of the file follows them.
fn past_zeros(r: &mut impl BufRead) -> io::Result<bool> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(true);
        }
        let zeros = buf.iter().take_while(|&&b| b == 0).count();
        let more = zeros < buf.len();
        r.consume(zeros);
        if more {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::tests::sample;
    use crate::audit::record::{GENESIS_HASH, encode_line};
    use crate::audit::segment::segment_name;

    /// The segment being written may end inside a record, even inside one of its characters:
    /// a subject access lookup reads the records before it and leaves that one for later.
    #[test]
    fn a_record_still_being_written_is_not_read_and_does_not_fail_the_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = sample(1);
        first.path = "/voter/electors/Ynys Môn".into();
        let line = encode_line(1, GENESIS_HASH, &first).unwrap();
        let mut second = sample(1);
        second.path = "/voter/electors/Ynys Môn".into();
        let whole = encode_line(2, &line.hash, &second).unwrap().bytes;
        // Cut in the middle of the two bytes of "ô".
        let cut = whole.iter().position(|&b| b == 0xC3).unwrap() + 1;
        let text = [&line.bytes[..], &whole[..cut]].concat();
        std::fs::write(dir.path().join(segment_name(1)), &text).unwrap();

        for lookup in [records_mentioning, scan_all] {
            let (found, stats) = lookup(dir.path(), "subj-1").unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0]["seq"], 1);
            assert_eq!(stats.lines_read, 1);
            assert_eq!(stats.lines_unreadable, 0);
        }
    }

    /// A whole line naming the subject that is not a record (damage) is counted, not passed
    /// over in silence; one not naming them is not looked at.
    #[test]
    fn a_damaged_line_naming_the_subject_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let first = encode_line(1, GENESIS_HASH, &sample(1)).unwrap();
        let mut damaged = encode_line(2, &first.hash, &sample(1)).unwrap().bytes;
        damaged[0] = b'[';
        let mut other = sample(3);
        other.subjects = Default::default();
        let mut unrelated = encode_line(3, GENESIS_HASH, &other).unwrap().bytes;
        unrelated[0] = b'[';
        let text = [&first.bytes[..], &damaged[..], &unrelated[..]].concat();
        std::fs::write(dir.path().join(segment_name(1)), &text).unwrap();
        let (found, stats) = scan_all(dir.path(), "subj-1").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((stats.lines_read, stats.lines_unreadable), (3, 1));
    }

    /// A segment gone since the listing is passed over only where a prune would have taken it
    /// (older than every segment still there); one missing from the middle is an error.
    #[test]
    fn only_a_segment_a_prune_took_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let at = |n| dir.path().join(segment_name(n));
        std::fs::write(at(2), b"").unwrap();
        std::fs::write(at(4), b"").unwrap();
        assert!(open_listed(dir.path(), 1, &at(1)).unwrap().is_none());
        assert!(open_listed(dir.path(), 3, &at(3)).is_err());
        assert!(open_listed(dir.path(), 2, &at(2)).unwrap().is_some());
    }

    /// A finished segment damaged in the middle (a page of zero bytes: a disk fault, or a
    /// power cut under page-cache audit) is neither sealed, so that its index would stop at
    /// the damage, nor read only up to it: the records after it are found, and the damage is
    /// counted, since what it held may have named the subject.
    #[test]
    fn a_finished_segment_damaged_in_the_middle_is_read_past_and_not_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut prev, mut lines) = (GENESIS_HASH.to_owned(), Vec::new());
        for seq in 1..=4 {
            let line = encode_line(seq, &prev, &sample(seq)).unwrap();
            prev = line.hash.clone();
            lines.push(line.bytes);
        }
        let mut first = [&lines[0][..], &lines[1][..], &lines[2][..]].concat();
        // Record 2 and the start of record 3 zeroed; record 3's tail left.
        let from = lines[0].len();
        let to = from + lines[1].len() + 10;
        first[from..to].fill(0);
        std::fs::write(dir.path().join(segment_name(1)), &first).unwrap();
        std::fs::write(dir.path().join(segment_name(2)), &lines[3]).unwrap();
        // Record 4 is whole, after the damage: found either way; the damage counted.
        let mut whole = lines[..3].concat();
        whole[from..from + lines[1].len()].fill(0);
        for (bytes, found_third) in [(&first, false), (&whole, true)] {
            std::fs::write(dir.path().join(segment_name(1)), bytes).unwrap();
            for lookup in [records_mentioning, scan_all] {
                let (found, stats) = lookup(dir.path(), "subj-3").unwrap();
                assert_eq!(found.len(), usize::from(found_third));
                assert!(stats.lines_unreadable >= 1, "{stats:?}");
                let (found, stats) = lookup(dir.path(), "subj-1").unwrap();
                assert_eq!(found.len(), 1);
                assert!(stats.lines_unreadable >= 1, "{stats:?}");
            }
            assert!(crate::audit::index::seal(dir.path(), 1).is_err());
            assert!(crate::audit::index::read_seal(dir.path(), 1).is_none());
        }
        // The segment being written may end in zero bytes (made-ready space): no damage.
        let mut ready = lines[3].clone();
        ready.extend_from_slice(&[0; 64]);
        std::fs::write(dir.path().join(segment_name(2)), &ready).unwrap();
        std::fs::write(dir.path().join(segment_name(1)), lines[..3].concat()).unwrap();
        let (found, stats) = records_mentioning(dir.path(), "subj-4").unwrap();
        assert_eq!((found.len(), stats.lines_unreadable), (1, 0));
        // The segment being written, damaged in the middle: the records after the damage are
        // read and the damage counted (the lookup used to end at it, saying nothing).
        let fifth = encode_line(5, &prev, &sample(5)).unwrap().bytes;
        let mut newest = [&lines[3][..], &fifth[..]].concat();
        newest[..10].fill(0);
        std::fs::write(dir.path().join(segment_name(2)), &newest).unwrap();
        for lookup in [records_mentioning, scan_all] {
            let (found, stats) = lookup(dir.path(), "subj-5").unwrap();
            assert_eq!(found.len(), 1, "{stats:?}");
            assert!(stats.lines_unreadable >= 1, "{stats:?}");
        }
        std::fs::write(dir.path().join(segment_name(2)), &ready).unwrap();
        // So may a finished one, and it seals.
        let mut finished = lines[..3].concat();
        finished.extend_from_slice(&[0; 64]);
        std::fs::write(dir.path().join(segment_name(1)), &finished).unwrap();
        let (found, stats) = scan_all(dir.path(), "subj-2").unwrap();
        assert_eq!((found.len(), stats.lines_unreadable), (1, 0));
        assert_eq!(crate::audit::index::seal(dir.path(), 1).unwrap().records, 3);
    }

    /// A lookup reading the segment being written while the writer fills the space made
    /// ready ahead of it (`prepare.rs`) counts no damage: zero bytes it read a moment before
    /// and then saw written after were written over, not torn.
    #[test]
    fn records_written_while_a_lookup_reads_are_no_damage() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let mut prev = GENESIS_HASH.to_owned();
        let lines: Vec<Vec<u8>> = (1..=16_000)
            .map(|seq| {
                let line = encode_line(seq, &prev, &sample(seq)).unwrap();
                prev = line.hash;
                line.bytes
            })
            .collect();
        let total: usize = lines.iter().map(Vec::len).sum();
        let file = File::create(&path).unwrap();
        file.set_len(total as u64 + (1 << 20)).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = std::thread::spawn({
            let done = done.clone();
            move || {
                // Batches of about the reader's buffer, as group commit writes them: each
                // write crosses into the next buffer's worth.
                let mut at = 0;
                for batch in lines.chunks(16) {
                    let batch = batch.concat();
                    file.write_all_at(&batch, at).unwrap();
                    at += batch.len() as u64;
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        // (A lookup reads on as the writer writes: one may last until it stops.)
        let mut lookups = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let (_, stats) = scan_all(dir.path(), "subj-1").unwrap();
            assert_eq!(stats.lines_unreadable, 0, "lookup {lookups}: {stats:?}");
            lookups += 1;
        }
        writer.join().unwrap();
        let (found, stats) = scan_all(dir.path(), "subj-16000").unwrap();
        assert_eq!((found.len(), stats.lines_unreadable), (1, 0));
    }

    /// A segment missing between two still there (prunes take the oldest) is damage that
    /// may have named the subject: counted, not passed over.
    #[test]
    fn a_segment_missing_from_the_middle_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let first = encode_line(1, GENESIS_HASH, &sample(1)).unwrap();
        let third = encode_line(3, &"ab".repeat(32), &sample(1)).unwrap();
        std::fs::write(dir.path().join(segment_name(1)), &first.bytes).unwrap();
        std::fs::write(dir.path().join(segment_name(3)), &third.bytes).unwrap();
        let (found, stats) = records_mentioning(dir.path(), "subj-1").unwrap();
        assert_eq!((found.len(), stats.lines_unreadable), (2, 1));
        // The oldest gone (a prune) is not damage.
        std::fs::remove_file(dir.path().join(segment_name(1))).unwrap();
        let (found, stats) = records_mentioning(dir.path(), "subj-1").unwrap();
        assert_eq!((found.len(), stats.lines_unreadable), (1, 0));
    }

    /// A copy crash recovery set aside is not read as records, but a line in it naming the
    /// subject is counted: the report may be missing what it records.
    #[test]
    fn lines_set_aside_naming_the_subject_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let first = encode_line(1, GENESIS_HASH, &sample(1)).unwrap();
        std::fs::write(dir.path().join(segment_name(1)), &first.bytes).unwrap();
        let kept = encode_line(2, &first.hash, &sample(1)).unwrap();
        let cut = format!("{}.cut-1700000000", segment_name(1));
        std::fs::write(dir.path().join(&cut), &kept.bytes).unwrap();
        std::fs::write(dir.path().join(format!("{cut}.pending")), &kept.bytes).unwrap();
        let (found, stats) = records_mentioning(dir.path(), "subj-1").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(stats.lines_set_aside, 1);
        let (_, stats) = records_mentioning(dir.path(), "subj-2").unwrap();
        assert_eq!(stats.lines_set_aside, 0);
    }
}
