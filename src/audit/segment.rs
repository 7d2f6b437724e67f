//! The on-disk layout: segment file names, finding the segments of a directory, reading a
//! segment's lines up to the space made ready for records not yet written, and repairing the
//! tail of a segment that an interrupted write left behind.
//!
//! Under fsync durability the segment being written usually ends in zero bytes: space made
//! ready ahead of the writer (`prepare`), which records overwrite in place. A record never
//! holds a NUL byte (JSON escapes control characters), so the first NUL is where the written
//! records end, for every reader.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};

use super::record::{GENESIS_HASH, LineHead, decode_line};

/// File name of segment number `n`.
pub(crate) fn segment_name(n: u64) -> String {
    format!("seg-{n:08}.jsonl")
}

/// File name of the space made ready for segment `n` (zero bytes, synced; `prepare`): not a
/// segment, so `list_segments` and every reader pass it by until the writer renames it to
/// segment `n`.
pub(crate) fn prepared_name(n: u64) -> String {
    format!("prep-{n:08}.zeroed")
}

/// Reads the next line of a segment onto `line`: through its `\n`, or up to the end of the
/// file or the first NUL byte (the space made ready for records not yet written), whichever
/// comes first. Returns how many bytes it read; a line that does not end in `\n` is no
/// whole record (one being written, or torn by a crash). Once at a NUL it reads nothing more.
pub(crate) fn read_line(r: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<usize> {
    let mut read = 0;
    loop {
        let buf = match r.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let Some(i) = memchr::memchr2(b'\n', 0, buf) else {
            let n = buf.len();
            if n == 0 {
                return Ok(read);
            }
            line.extend_from_slice(buf);
            r.consume(n);
            read += n;
            continue;
        };
        // Through the newline; up to (not past) a NUL, so that the next call stops there too.
        let take = if buf[i] == b'\n' { i + 1 } else { i };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        return Ok(read + take);
    }
}

/// What follows where `read_line` stopped: `Ok(true)` when it is nothing or zero bytes only
/// (unwritten space), `Ok(false)` when something was written after a NUL, which no writer
/// does: bytes a crash tore from a batch never acknowledged (cut at the next start), or
/// damage.
pub(crate) fn only_unwritten_after(r: &mut impl BufRead) -> io::Result<bool> {
    loop {
        let buf = match r.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(true);
        }
        if buf.iter().any(|&b| b != 0) {
            return Ok(false);
        }
        let n = buf.len();
        r.consume(n);
    }
}

/// The bytes of `file` from `from` up to its end or its first NUL byte (see `read_line`).
pub(crate) fn read_written(file: &mut File, from: u64) -> io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(from))?;
    let mut out = Vec::new();
    BufReader::with_capacity(64 * 1024, file).read_until(0, &mut out)?;
    if out.last() == Some(&0) {
        out.pop();
    }
    Ok(out)
}

/// The segment number of `name`, or `None` if `name` is not a segment file.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
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
    /// The last record's time (empty after everything was pruned, or for a new log).
    pub last_ts: String,
    /// What recovery cut from a segment and kept aside (`recover_segment`): each is recorded
    /// in the log as it resumes, so the chain itself says so.
    pub cuts: Vec<Cut>,
}

/// Bytes cut from a segment at its first zero byte, with records after it, and kept aside.
/// Before the segment is cut, what is cut is written beside the copy (`KEPT.pending`),
/// durably; the writer records it in the log at open and only then removes that file
/// (`Writer::open`). A start that fails in between finds the file at the next start and
/// records it then: the chain always comes to say what was cut.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Cut {
    pub segment: String,
    pub from_byte: u64,
    pub bytes: u64,
    /// Lines ended in what was cut: records a crash tore from a batch never acknowledged, or
    /// records acknowledged and damaged.
    pub whole_lines: u64,
    pub kept_aside: String,
    /// The file saying so until it is recorded.
    #[serde(skip)]
    pub pending: PathBuf,
}

/// What `.pending` files say was cut before and is not yet recorded, oldest first.
fn cuts_pending(dir: &Path) -> anyhow::Result<Vec<Cut>> {
    let mut pending = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("cannot list audit directory `{}`", dir.display()))?
    {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.contains(".jsonl.cut-") && name.ends_with(".pending") {
            let text = std::fs::read(&path)
                .with_context(|| format!("cannot read `{}`", path.display()))?;
            let mut cut: Cut = serde_json::from_slice(&text).with_context(|| {
                format!(
                    "`{}` does not say what recovery cut: read it and its copy beside it, record \
                     what was cut by hand, and remove it",
                    path.display()
                )
            })?;
            cut.pending = path;
            pending.push(cut);
        }
    }
    pending.sort_by(|a, b| a.kept_aside.cmp(&b.kept_aside));
    Ok(pending)
}

/// Creates `dir` and any parent missing, each new directory's entry synced in its parent: the
/// log's directory made at a first start (or `addr-keys/` beside it) must not vanish at a
/// power cut with the records acknowledged in it (a filesystem need not write a new entry
/// before a file under it is synced).
pub(crate) fn create_dir_synced(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        at = d.parent();
    }
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        let parent = d.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(parent.unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(())
}

/// The sequence number of a segment's first whole record, if it has one that reads.
fn first_seq(path: &Path) -> Option<u64> {
    let mut reader = BufReader::new(File::open(path).ok()?);
    let mut line = Vec::new();
    read_line(&mut reader, &mut line).ok()?;
    let text = line.strip_suffix(b"\n")?;
    decode_line(text).ok().map(|head| head.seq)
}

/// Creates `dir` if needed and recovers the chain head from the newest records in it,
/// repairing torn tails on the way.
pub(crate) fn resume(dir: &Path, segment_max_bytes: u64) -> anyhow::Result<Resume> {
    create_dir_synced(dir)
        .with_context(|| format!("cannot create audit directory `{}`", dir.display()))?;
    let segments = list_segments(dir)
        .with_context(|| format!("cannot list audit directory `{}`", dir.display()))?;
    let (mut next_seq, mut last_hash, mut len) = (1, GENESIS_HASH.to_owned(), 0);
    let mut last_ts = String::new();
    // Cuts of an earlier start whose record was never written, then this start's.
    let mut cuts = cuts_pending(dir)?;
    // The newest segment may be empty (created just before a failed batch), so the chain head
    // can sit in an older one.
    for (i, (_, path)) in segments.iter().enumerate().rev() {
        let (seg_len, last) = recover_segment(path, &mut cuts)?;
        if i + 1 == segments.len() {
            len = seg_len;
        }
        if let Some(head) = last {
            (next_seq, last_hash, last_ts) = (head.seq + 1, head.hash, head.ts);
            break;
        }
    }
    // Read whatever the segments hold: a damaged anchor stops the start, rather than be
    // taken for none by a later prune or verification.
    let anchor = super::prune::read_anchor(dir)?;
    // A log whose oldest record is past the first, with no anchor to say those before were
    // pruned: they are missing (or `pruned.json` was lost), and the writer would otherwise
    // carry on a chain nothing can verify from its start.
    if anchor.is_none()
        && let Some((_, oldest)) = segments.first()
        && let Some(first) = first_seq(oldest)
        && first > 1
    {
        bail!(
            "the audit log in `{}` begins at seq {first}, not 1, and there is no `pruned.json`: \
             the log was pruned and its anchor lost (restore `pruned.json` from a backup of \
             this directory), or its first records were deleted; `wardgate audit verify` says \
             which",
            dir.display()
        );
    }
    // Everything before the oldest remaining segment may have been pruned: resume from the anchor.
    if next_seq == 1
        && let Some(anchor) = anchor
    {
        next_seq = anchor.last_pruned_seq.checked_add(1).ok_or_else(|| {
            anyhow!(
                "`pruned.json` in `{}` names no sequence number a log can have",
                dir.display()
            )
        })?;
        last_hash = anchor.last_pruned_hash;
    }
    let segment = segments.last().map_or(1, |(n, _)| *n);
    let new_segment = segments.is_empty();
    let resume = Resume {
        segment,
        len,
        new_segment,
        next_seq,
        last_hash,
        last_ts,
        cuts,
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

/// Cuts `path` back to its last whole record, removing a torn final line and any space made
/// ready for records not yet written, and returns the segment's remaining length and its last
/// record, if any.
///
/// The records end at the first NUL byte (see the module doc): a batch that was being written
/// into made-ready space when the machine stopped may have reached the disk in pieces, some
/// pages written and some still zero, and nothing from the first zero on was acknowledged.
fn recover_segment(path: &Path, cuts: &mut Vec<Cut>) -> anyhow::Result<(u64, Option<LineHead>)> {
    let name = path.display();
    // Read-only unless a repair is needed: older segments may be sealed read-only later.
    let mut file =
        File::open(path).with_context(|| format!("cannot open audit segment `{name}`"))?;
    let len = file.metadata()?.len();
    let (written, last_byte_end) = first_nul(&mut file)
        .with_context(|| format!("cannot read audit segment `{name}`"))?
        .unwrap_or((len, len));
    let torn_after = last_byte_end > written;
    let end = last_newline(&mut file, written)?.map_or(0, |p| p + 1);
    if end < len {
        let torn = written - end;
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let noted =
            (cuts.iter()).any(|c| Some(&c.segment) == file_name.as_ref() && c.from_byte == end);
        if torn_after && noted {
            // Kept aside and noted by a start that stopped before cutting: cut now, recorded
            // once, from that note.
            tracing::error!(segment = %name, from_byte = end,
                "cutting an audit segment as an earlier start noted it would");
        } else if torn_after {
            // A batch torn over made-ready space looks like this, and so does a page of
            // acknowledged records zeroed by a fault or by hand: what is cut is kept aside.
            let (kept, whole_lines) =
                keep_cut(path, &mut file, end, last_byte_end).with_context(|| {
                    format!("cannot keep aside what follows the records of `{name}`")
                })?;
            tracing::error!(segment = %name, from_byte = end, kept = %kept.display(), whole_lines,
                "cut an audit segment at its first zero byte with records after it: a batch \
                 torn by a crash (never acknowledged), or damage; the bytes cut are kept aside");
            let mut pending = kept.clone().into_os_string();
            pending.push(".pending");
            let cut = Cut {
                segment: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                from_byte: end,
                bytes: last_byte_end - end,
                whole_lines,
                kept_aside: kept
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                pending: PathBuf::from(pending),
            };
            // Durably and whole (written aside, then renamed), before the segment is cut
            // (below).
            let note = serde_json::to_vec(&cut)?;
            super::index::write_atomically(&cut.pending, |w| w.write_all(&note))
                .and_then(|()| sync_dir(path.parent().unwrap_or(Path::new("."))))
                .with_context(|| format!("cannot note what is cut from `{name}`"))?;
            cuts.push(cut);
        } else if torn > 0 {
            tracing::warn!(segment = %name, torn_bytes = torn,
                "truncating a torn final line left by an interrupted write");
        } else {
            tracing::debug!(segment = %name, bytes = len - end,
                "releasing the space made ready for records not written");
        }
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

/// Copies bytes `from..to` of the segment at `path` to a new file beside it
/// (`seg-NNNNNNNN.jsonl.cut-UNIXTIME`, `-2` and on after it if that is taken; no reader takes
/// it for a segment), durably (its contents and its name), and returns its path and how many
/// lines end in it.
fn keep_cut(path: &Path, file: &mut File, from: u64, to: u64) -> io::Result<(PathBuf, u64)> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut attempt = 1;
    let (kept, mut out) = loop {
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".cut-{secs}"));
        if attempt > 1 {
            name.push(format!("-{attempt}"));
        }
        let kept = path.with_file_name(name);
        match OpenOptions::new().write(true).create_new(true).open(&kept) {
            Ok(out) => break (kept, out),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 1_000 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    file.seek(SeekFrom::Start(from))?;
    // Copied a piece at a time (a segment may be large), counting the lines that end in it.
    let mut lines = 0;
    let mut piece = vec![0; 1 << 20];
    let mut left = to - from;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(piece.len());
        file.read_exact(&mut piece[..n])?;
        out.write_all(&piece[..n])?;
        lines += memchr::memchr_iter(b'\n', &piece[..n]).count() as u64;
        left -= n as u64;
    }
    out.sync_all()?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    Ok((kept, lines))
}

/// Where the first NUL byte of `file` is, if it has one, and where its last byte that is not
/// zero ends (at or before the NUL when only zeros follow it). Reads the whole file forwards
/// (once, at start): pieces of a torn batch can follow a zero page, so the end of the records
/// cannot be found from the back.
fn first_nul(file: &mut File) -> io::Result<Option<(u64, u64)>> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(1 << 20, &mut *file);
    let (mut at, mut first, mut last) = (0u64, None, 0u64);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(first.map(|first| (first, last)));
        }
        if first.is_none() {
            first = memchr::memchr(0, buf).map(|i| at + i as u64);
        }
        if let Some(i) = buf.iter().rposition(|&b| b != 0) {
            last = at + i as u64 + 1;
        }
        let n = buf.len();
        at += n as u64;
        reader.consume(n);
    }
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

/// The time of a segment's first record, if its first line reads as one. Read as `read_line`
/// reads, up to the first NUL: a segment just begun is the space made ready for it (64 MiB of
/// zeros by default), which `read_until` took whole into memory.
pub(crate) fn first_ts(path: &Path) -> Option<String> {
    let mut line = Vec::new();
    read_line(&mut BufReader::new(File::open(path).ok()?), &mut line).ok()?;
    let record: serde_json::Value = serde_json::from_slice(&line).ok()?;
    record["ts"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::tests::sample;
    use crate::audit::record::{GENESIS_HASH, encode_line};

    /// Every missing level is made (each synced in its parent); one already there is left as
    /// it is, and a file in the way is an error, not a directory taken for made.
    #[test]
    fn a_directory_is_made_with_every_missing_parent() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("var/lib/wardgate/audit");
        create_dir_synced(&deep).unwrap();
        assert!(deep.is_dir());
        std::fs::write(deep.join("kept"), b"x").unwrap();
        create_dir_synced(&deep).unwrap();
        assert_eq!(std::fs::read(deep.join("kept")).unwrap(), b"x");
        assert!(create_dir_synced(&deep.join("kept/below")).is_err());
    }

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

        let (len, head) = recover_segment(&path, &mut Vec::new()).unwrap();
        assert_eq!(len, good.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), good);
        let head = head.unwrap();
        assert_eq!((head.seq, head.prev), (2, first.hash));
        assert_eq!(head.hash, second.hash);

        std::fs::write(&path, torn).unwrap();
        assert_eq!(recover_segment(&path, &mut Vec::new()).unwrap(), (0, None));
        assert!(std::fs::read(&path).unwrap().is_empty());
    }

    /// Lines end at `\n`; the first NUL ends the segment's records, a line cut there is no
    /// whole record, and nothing past it is read.
    #[test]
    fn lines_are_read_up_to_made_ready_space() {
        let read_all = |bytes: &[u8]| {
            let mut r = BufReader::with_capacity(4, bytes);
            let mut lines = Vec::new();
            loop {
                let mut line = Vec::new();
                if read_line(&mut r, &mut line).unwrap() == 0 {
                    break;
                }
                lines.push(String::from_utf8(line).unwrap());
            }
            (lines, only_unwritten_after(&mut r).unwrap())
        };
        let ok = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(read_all(b"ab\ncdefgh\n"), (ok(&["ab\n", "cdefgh\n"]), true));
        assert_eq!(
            read_all(b"ab\ncdefgh\n\0\0\0\0\0\0\0\0\0"),
            (ok(&["ab\n", "cdefgh\n"]), true)
        );
        assert_eq!(
            read_all(b"ab\ncdefgh\0\0\0\0\0"),
            (ok(&["ab\n", "cdefgh"]), true)
        );
        assert_eq!(read_all(b"ab\ncdefgh"), (ok(&["ab\n", "cdefgh"]), true));
        assert_eq!(
            read_all(b"ab\n\0\0\0\0\0\0\0\0\0\0x\n\0"),
            (ok(&["ab\n"]), false)
        );
    }

    /// A stop while records were written over made-ready space: whole records, then what
    /// reached the disk of a batch never acknowledged (a line cut short, a zero page, a later
    /// page that did get written), then zeros. The records end at the first NUL; all the rest
    /// goes, the made-ready space with it.
    #[test]
    fn a_segment_is_cut_back_at_its_first_zero_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let first = encode_line(1, GENESIS_HASH, &sample(1)).unwrap();
        let second = encode_line(2, &first.hash, &sample(2)).unwrap();
        let third = encode_line(3, &second.hash, &sample(3)).unwrap();
        let good = [first.bytes.clone(), second.bytes.clone()].concat();

        let mut file = vec![0u8; 3 << 20];
        file[..good.len()].copy_from_slice(&good);
        std::fs::write(&path, &file).unwrap();
        let (len, head) = recover_segment(&path, &mut Vec::new()).unwrap();
        assert_eq!(len, good.len() as u64);
        assert_eq!(head.unwrap().hash, second.hash);
        assert_eq!(std::fs::read(&path).unwrap(), good);

        // The torn batch: the third record's first half, a page of zeros, then a whole line
        // of it written to a later page (past the first read chunk).
        let at = good.len();
        file[at..at + 20].copy_from_slice(&third.bytes[..20]);
        let later = (2 << 20) + 100;
        file[later..later + third.bytes.len()].copy_from_slice(&third.bytes);
        std::fs::write(&path, &file).unwrap();
        let mut cuts = Vec::new();
        let (len, head) = recover_segment(&path, &mut cuts).unwrap();
        assert_eq!(len, good.len() as u64);
        assert_eq!(head.unwrap().seq, 2);
        assert_eq!(std::fs::read(&path).unwrap(), good);
        // What was cut after a zero is kept aside, not lost: it could have been records.
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".jsonl.cut-"))
            .filter(|p| !p.to_string_lossy().ends_with(".pending"))
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            std::fs::read(&kept[0]).unwrap(),
            file[at..later + third.bytes.len()]
        );
        // And noted, until the writer records it (the next start reads the note).
        assert_eq!(cuts.len(), 1);
        assert!(cuts[0].pending.exists());
        // Verification passes the copy by, and says it is there.
        let report = crate::audit::verify_dir(dir.path()).unwrap();
        let name = |p: &std::path::Path| p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(report.kept_aside, [name(&kept[0])]);
        assert_eq!(report.cuts_unrecorded, [name(&cuts[0].pending)]);
        assert_eq!(
            cuts_pending(dir.path()).unwrap()[0].kept_aside,
            kept[0].file_name().unwrap().to_string_lossy()
        );
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
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
