//! The on-disk layout: segment file names, finding the segments of a directory, and repairing
//! the tail of a segment that an interrupted write left behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

use super::record::{GENESIS_HASH, LineHead, decode_line};

/// File name of segment number `n`.
pub(crate) fn segment_name(n: u64) -> String {
    format!("seg-{n:08}.jsonl")
}

/// The segment number of `name`, or `None` if `name` is not a segment file.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".jsonl")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `dir`, oldest first. Other files are ignored so operators and later
/// features (indexes, seals) can keep their own files alongside.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_segment_name) {
            if entry.file_type()?.is_dir() {
                continue;
            }
            segments.push((n, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(n, _)| *n);
    Ok(segments)
}

/// Where appending resumes after a restart.
#[derive(Debug)]
pub(crate) struct Resume {
    pub segment: u64,
    /// Length of that segment; 0 when it does not exist yet.
    pub len: u64,
    /// The segment does not exist yet, so its directory entry will need a sync.
    pub new_segment: bool,
    pub next_seq: u64,
    pub last_hash: String,
}

/// Creates `dir` if needed and recovers the chain head from the newest records in it,
/// repairing torn tails on the way.
pub(crate) fn resume(dir: &Path, segment_max_bytes: u64) -> anyhow::Result<Resume> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create audit directory `{}`", dir.display()))?;
    let segments = list_segments(dir)
        .with_context(|| format!("cannot list audit directory `{}`", dir.display()))?;
    let (mut next_seq, mut last_hash, mut len) = (1, GENESIS_HASH.to_owned(), 0);
    // The newest segment may be empty (created just before a failed batch), so the chain head
    // can sit in an older one.
    for (i, (_, path)) in segments.iter().enumerate().rev() {
        let (seg_len, last) = recover_segment(path)?;
        if i + 1 == segments.len() {
            len = seg_len;
        }
        if let Some(head) = last {
            (next_seq, last_hash) = (head.seq + 1, head.hash);
            break;
        }
    }
    // Everything before the oldest remaining segment may have been pruned: resume from the anchor.
    if next_seq == 1
        && let Some(anchor) = super::prune::read_anchor(dir)
    {
        (next_seq, last_hash) = (anchor.last_pruned_seq + 1, anchor.last_pruned_hash);
    }
    let segment = segments.last().map_or(1, |(n, _)| *n);
    let new_segment = segments.is_empty();
    let resume = Resume {
        segment,
        len,
        new_segment,
        next_seq,
        last_hash,
    };
    // A sealed segment is finished whatever its size: its index lists every record in it,
    // so appending would hide the new ones from lookups (a restart with a larger
    // `segment_max_bytes`, after a roll whose next segment was not yet created).
    let sealed = segments
        .last()
        .is_some_and(|(n, _)| super::index::seal_path(dir, *n).exists());
    if sealed || (len > 0 && len >= segment_max_bytes) {
        return Ok(Resume {
            segment: segment + 1,
            len: 0,
            new_segment: true,
            ..resume
        });
    }
    Ok(resume)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Truncates a torn final line from `path` and returns the segment's remaining length and its
/// last record, if any.
fn recover_segment(path: &Path) -> anyhow::Result<(u64, Option<LineHead>)> {
    let name = path.display();
    // Read-only unless a repair is needed: older segments may be sealed read-only later.
    let mut file =
        File::open(path).with_context(|| format!("cannot open audit segment `{name}`"))?;
    let len = file.metadata()?.len();
    let end = last_newline(&mut file, len)?.map_or(0, |p| p + 1);
    if end < len {
        tracing::warn!(segment = %name, torn_bytes = len - end,
            "truncating a torn final line left by an interrupted write");
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(end).and_then(|()| f.sync_all()))
            .with_context(|| format!("cannot repair audit segment `{name}`"))?;
    }
    if end == 0 {
        return Ok((0, None));
    }
    let start = last_newline(&mut file, end - 1)?.map_or(0, |p| p + 1);
    let mut line = vec![0; usize::try_from(end - 1 - start)?];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    let head = decode_line(&line).map_err(|e| {
        anyhow!("the last record of audit segment `{name}` is damaged ({e}); run the verifier")
    })?;
    Ok((end, Some(head)))
}

/// Position of the last `\n` before byte `before`, reading backwards so a large segment costs
/// only its tail.
fn last_newline(file: &mut File, before: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut end = before;
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::tests::sample;
    use crate::audit::record::{GENESIS_HASH, encode_line};

    #[test]
    fn segment_names_round_trip_and_sort_numerically() {
        assert_eq!(segment_name(1), "seg-00000001.jsonl");
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("seg-123456789.jsonl"), Some(123_456_789));
        assert_eq!(parse_segment_name("seg-1.jsonl"), None);
        assert_eq!(parse_segment_name("seg-0000000x.jsonl"), None);
        assert_eq!(parse_segment_name("seg-00000001.jsonl.tmp"), None);
    }

    #[test]
    fn torn_tail_is_cut_and_the_last_record_found_across_read_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let first = encode_line(1, GENESIS_HASH, &sample(1)).unwrap();
        // Longer than one backwards read, so the scan has to cross chunk boundaries.
        let mut big = sample(2);
        big.detail = Some(serde_json::Value::String("x".repeat(200_000)));
        let second = encode_line(2, &first.hash, &big).unwrap();
        let good = [first.bytes, second.bytes].concat();
        let torn = &second_line_prefix(&good)[..];
        std::fs::write(&path, [&good[..], torn].concat()).unwrap();

        let (len, head) = recover_segment(&path).unwrap();
        assert_eq!(len, good.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), good);
        let head = head.unwrap();
        assert_eq!((head.seq, head.prev), (2, first.hash));
        assert_eq!(head.hash, second.hash);

        std::fs::write(&path, torn).unwrap();
        assert_eq!(recover_segment(&path).unwrap(), (0, None));
        assert!(std::fs::read(&path).unwrap().is_empty());
    }

    /// The start of a record cut off mid-line, as a crash during `write(2)` leaves it.
    fn second_line_prefix(lines: &[u8]) -> Vec<u8> {
        let start = lines.iter().position(|&b| b == b'\n').unwrap() + 1;
        lines[start..start + 70_000].to_vec()
    }

    #[test]
    fn a_sealed_segment_is_never_appended_to_whatever_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let line = encode_line(1, GENESIS_HASH, &sample(1)).unwrap();
        std::fs::write(dir.path().join(segment_name(1)), &line.bytes).unwrap();
        let r = resume(dir.path(), 1 << 20).unwrap();
        assert_eq!((r.segment, r.next_seq, r.new_segment), (1, 2, false));

        std::fs::write(super::super::index::seal_path(dir.path(), 1), b"{}").unwrap();
        let r = resume(dir.path(), 1 << 20).unwrap();
        assert_eq!((r.segment, r.len, r.new_segment), (2, 0, true));
        assert_eq!((r.next_seq, r.last_hash), (2, line.hash));
    }

    #[test]
    fn damaged_last_record_refuses_to_resume() {
        let dir = tempfile::tempdir().unwrap();
        let line = encode_line(1, GENESIS_HASH, &sample(1)).unwrap();
        let text = String::from_utf8(line.bytes)
            .unwrap()
            .replace("req-1", "req-9");
        std::fs::write(dir.path().join(segment_name(1)), text).unwrap();
        let err = resume(dir.path(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
