//! Offline verification of an audit directory: walks every segment in order, line by line, and
//! reports the first place where the hash chain shows a record altered, deleted, inserted or
//! reordered; given the heads a witness saw ([`super::witness`]), also a witnessed record
//! whose hash differs and records cut from the log's end. It only reports; repairing a torn
//! tail is the writer's job on open.

use std::fs::File;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::ops::Bound;
use std::path::Path;
use std::time::Duration;

use super::record::{GENESIS_HASH, LineError, decode_line};
use super::segment::{list_segments, only_unwritten_after, read_line};
use super::witness::Heads;

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    /// 0 for an empty log.
    pub last_seq: u64,
    /// The genesis hash (64 zeros) for an empty log.
    pub last_hash: String,
    /// The newest segment ends in a line with no newline: a write cut short by a crash. It
    /// was never acknowledged, so no response depended on it; the writer trims it on open.
    pub torn_tail: bool,
    /// Witnessed heads found in the log with the witnessed hash ([`verify_against`]).
    pub witnessed: u64,
    /// Witnessed heads older than the log's oldest record (pruned), which cannot be checked.
    pub witnessed_pruned: u64,
    /// The prune anchor's seq where the log was pruned and, of the heads given, none with a
    /// time is at or below it: whether the pruned records were older than the retention is
    /// then not checked (the witness never saw them, or their heads were trimmed from it).
    pub pruned_unwitnessed: Option<u64>,
    /// Copies of what start-up recovery cut from a segment (`seg-N.jsonl.cut-T`), which the
    /// chain passes by: an operator settles each and removes it (README: The audit log).
    pub kept_aside: Vec<String>,
    /// Their `.pending` notes: a cut the chain does not yet say was made (the next start
    /// records it).
    pub cuts_unrecorded: Vec<String>,
    /// Sealed segments wholly at or below the prune anchor: a prune wrote its anchor and
    /// stopped before removing them (a crash, a failed removal). The anchor already counts
    /// them as pruned; they are verified like the rest, as one chain that must end at the
    /// anchor; the next prune removes them once they are past the retention.
    pub left_behind: Vec<String>,
}

/// Where and how the chain breaks. `line` is 1-based within `segment`; `seq` is the sequence
/// number the chain expects at that position (the line's own may be the damaged part).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("`{segment}` line {line} (seq {seq}): hash mismatch (record altered)")]
    HashMismatch {
        segment: String,
        line: u64,
        seq: u64,
    },
    #[error(
        "`{segment}` line {line} (seq {seq}): prev does not match the previous record's hash \
         (record deleted, inserted or reordered)"
    )]
    BrokenLink {
        segment: String,
        line: u64,
        seq: u64,
    },
    #[error("`{segment}` line {line} (seq {seq}): sequence gap, the line says seq {found}")]
    SequenceGap {
        segment: String,
        line: u64,
        seq: u64,
        found: u64,
    },
    #[error(
        "`{segment}` is the last segment behind the prune anchor (seq {anchor}) but its records \
         end at seq {last_seq}, or with another hash: what a prune leaves behind ends at its \
         anchor (a segment or seal planted or rewritten, or `pruned.json` altered)"
    )]
    LeftBehindOffAnchor {
        segment: String,
        last_seq: u64,
        anchor: u64,
    },
    #[error(
        "`{segment}` is behind the prune anchor, yet its last record ({ts}) is within the \
         retention of {retention} (since {cutoff}): the anchor was moved past records that \
         should still be kept, or the retention was lengthened after a prune stopped short \
         (the prune keeps such a segment until it ages past it)"
    )]
    LeftBehindTooRecent {
        segment: String,
        ts: String,
        retention: String,
        cutoff: String,
    },
    #[error(
        "`{segment}` begins the log at seq {first}, not 1, and there is no `pruned.json`: the \
         log was pruned and its anchor lost (restore `pruned.json` from a backup of this \
         directory), or its first records were deleted"
    )]
    NoAnchor { segment: String, first: u64 },
    #[error("`{segment}` line {line} (seq {seq}): malformed record: {reason}")]
    Malformed {
        segment: String,
        line: u64,
        seq: u64,
        reason: String,
    },
    #[error(
        "`{segment}`: its seal says {sealed}, the segment says {found} (segment replaced or truncated)"
    )]
    SealMismatch {
        segment: String,
        sealed: String,
        found: String,
    },
    #[error(
        "`{segment}`: its subject index does not list the subjects the segment holds (index \
         edited or replaced; subject access reads it). Delete `{index}` and the seal beside it: \
         the next start seals the segment again"
    )]
    IndexMismatch { segment: String, index: String },
    #[error(
        "`{segment}` line {line} (seq {seq}): the witness saw this record with another hash \
         at {at} (record altered or replaced since)"
    )]
    WitnessMismatch {
        segment: String,
        line: u64,
        seq: u64,
        at: String,
    },
    #[error(
        "the log ends at seq {last_seq}, but the witness saw seq {seq} at {at} (records cut \
         from the end of the log)"
    )]
    CutFromEnd { last_seq: u64, seq: u64, at: String },
    #[error(
        "the witness saw seq {seq} (published at {at}) with another hash than the prune anchor \
         `pruned.json` gives it (anchor rewritten)"
    )]
    AnchorMismatch { seq: u64, at: String },
    #[error(
        "{count} witnessed heads lie in the pruned part of the log (seq {anchor} and before): give \
         the retention the log is kept for (`--retention`, e.g. 7years) to check that they were \
         old enough to be pruned"
    )]
    RetentionNeeded { count: u64, anchor: u64 },
    #[error(
        "the witness saw seq {seq}, a record of {ts}, which the log no longer holds, though a \
         retention of {retention} keeps every record since {cutoff} (records removed, and the \
         prune anchor rewritten to match)"
    )]
    PrunedTooEarly {
        seq: u64,
        ts: String,
        retention: String,
        cutoff: String,
    },
    #[error(
        "the log was pruned up to seq {anchor}, but no witnessed head at or after it is of a \
         record older than {cutoff} ({next}): records within the retention of {retention} may \
         have been removed with the anchor moved up (a log pruned within the last witness \
         interval can show this: run again shortly)"
    )]
    UnprovenPrune {
        anchor: u64,
        next: String,
        retention: String,
        cutoff: String,
    },
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// How often, and after how long, the newest segment is read again from its last whole line
/// when bytes follow zeros in it (a batch being written meanwhile) before that counts as
/// damage.
const LIVE_REREADS: u32 = 5;
const LIVE_REREAD_PAUSE: Duration = Duration::from_millis(50);

/// Verifies every segment in `dir`, streaming, so memory stays bounded by the longest line
/// and, for a sealed segment, its subject index's entries rebuilt to check the index.
pub fn verify_dir(dir: &Path) -> Result<VerifyReport, VerifyError> {
    verify_against(dir, &Heads::new(), None)
}

/// The first twelve characters of a hash, for messages (all of it when shorter, or when the
/// twelfth byte is inside a character: a damaged seal is still reported, never a panic).
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Heads at or before the prune anchor (`anchor_seq`, `anchor_hash`): the log no longer holds
/// them, and `pruned.json` is the host's word. The one at the anchor must carry its hash, and
/// each must be of a record older than the retention, or an anchor written past records still
/// within it (and those records deleted) would count them as pruned. Returns how many there
/// are.
fn check_pruned_heads(
    heads: &Heads,
    anchor_seq: u64,
    anchor_hash: &str,
    retention: Option<Duration>,
) -> Result<u64, VerifyError> {
    let pruned: Vec<_> = heads.range(..=anchor_seq).flat_map(|(_, w)| w).collect();
    if let Some(w) = pruned
        .iter()
        .find(|w| w.seq == anchor_seq && w.hash != anchor_hash)
    {
        return Err(VerifyError::AnchorMismatch {
            seq: w.seq,
            at: w.at.clone(),
        });
    }
    // The anchor's own head with no time (published after everything was pruned) is the
    // anchor, already compared above.
    let dated: Vec<_> = pruned
        .iter()
        .filter(|w| !(w.seq == anchor_seq && w.ts.is_empty()))
        .collect();
    let Some(newest) = dated.iter().max_by(|a, b| a.ts.cmp(&b.ts)) else {
        return Ok(pruned.len() as u64);
    };
    let Some(retention) = retention else {
        return Err(VerifyError::RetentionNeeded {
            count: pruned.len() as u64,
            anchor: anchor_seq,
        });
    };
    let cutoff = time::OffsetDateTime::now_utc()
        .checked_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX))
        .map_or_else(String::new, super::AuditRecord::ts_of);
    let too_early = |seq: u64, ts: &str| VerifyError::PrunedTooEarly {
        seq,
        ts: if ts.is_empty() {
            "an unknown time".into()
        } else {
            ts.to_owned()
        },
        retention: humantime::format_duration(retention).to_string(),
        cutoff: cutoff.clone(),
    };
    // Every pruned record was older than its prune's cutoff, which is older than today's.
    if newest.ts.is_empty() || newest.ts >= cutoff {
        return Err(too_early(newest.seq, &newest.ts));
    }
    // The records between the newest head below the anchor and the anchor have no head of
    // their own: some head at or past the anchor must be older than the cutoff too, or an
    // anchor moved up to just below the first recent head would prune them unseen. (Pruned
    // within the last interval, an honest log can fail this: run again a little later.)
    let proven = heads
        .iter()
        .filter(|(_, w)| w.iter().any(|w| !w.ts.is_empty() && w.ts < cutoff))
        .map(|(seq, _)| *seq)
        .next_back()
        .unwrap_or(0);
    if proven < anchor_seq {
        let next = heads
            .range((Bound::Excluded(anchor_seq), Bound::Unbounded))
            .next();
        return Err(VerifyError::UnprovenPrune {
            anchor: anchor_seq,
            next: next.map_or_else(
                || "no later head".to_owned(),
                |(s, w)| format!("the next, seq {s}, is of {}", w[0].ts),
            ),
            retention: humantime::format_duration(retention).to_string(),
            cutoff,
        });
    }
    Ok(pruned.len() as u64)
}

/// As [`verify_dir`], and every head in `heads` (read from the witness *before* the log, so
/// that each was durable before the log is read) must be in the log with its hash, or, where
/// the log was pruned past it, be of a record older than `retention` (the auditor's word for
/// how long the log is kept, not the host's configuration).
pub fn verify_against(
    dir: &Path,
    heads: &Heads,
    retention: Option<Duration>,
) -> Result<VerifyReport, VerifyError> {
    // A running gateway may prune while this reads: segments listed then gone, or a chain
    // that now starts past the anchor read (a prune writes its anchor, then removes its
    // segments). Either fails this pass; when the anchor or the segments moved meanwhile,
    // the failure may be the prune's, and the log is read again from its new start (every
    // pass checks everything: a tampered log fails each).
    let state = || {
        (
            super::prune::read_anchor(dir).ok(),
            (list_segments(dir).ok()).map(|l| l.into_iter().map(|(n, _)| n).collect::<Vec<_>>()),
        )
    };
    let mut passes = 0;
    loop {
        let before = state();
        let verdict = verify_once(dir, heads, retention);
        passes += 1;
        match verdict {
            Err(_) if passes < 3 && state() != before => continue,
            verdict => return verdict,
        }
    }
}

/// One reading of the whole log, for [`verify_against`].
fn verify_once(
    dir: &Path,
    heads: &Heads,
    retention: Option<Duration>,
) -> Result<VerifyReport, VerifyError> {
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| VerifyError::Io { path, source }
    };
    let segments = list_segments(dir).map_err(io_err(dir))?;
    let mut records = 0;
    // After pruning, the chain resumes from the anchor rather than from genesis.
    let anchor = super::prune::read_anchor(dir).map_err(io_err(&dir.join("pruned.json")))?;
    let anchor_seq = anchor.as_ref().map(|a| a.last_pruned_seq);
    let (anchor_seq_or_0, anchor_hash) = match &anchor {
        Some(a) => (a.last_pruned_seq, a.last_pruned_hash.clone()),
        None => (0, GENESIS_HASH.to_owned()),
    };
    let witnessed_pruned = check_pruned_heads(heads, anchor_seq_or_0, &anchor_hash, retention)?;
    // Segments a prune left behind its anchor (`VerifyReport::left_behind`): a prune writes
    // its anchor, then removes its segments oldest first, and may stop between; what it
    // leaves is one unbroken run ending at the anchor. Such segments are sealed, never the one
    // being written, and their seals end at or below the anchor. They are verified as one
    // chain like any other (records, links, seals, indexes), from where the first one's seal
    // says it starts, and the last must end at the anchor's seq and hash. A seal planted to
    // say "already pruned", a segment planted below the oldest, or a left-behind segment
    // rewritten with fresh hashes thus hides nothing: each still has to match its seal, link
    // to the next, and meet the anchor.
    let behind = (segments[..segments.len().saturating_sub(1)].iter())
        .take_while(|(n, _)| {
            anchor_seq_or_0 > 0
                && super::index::read_seal(dir, *n).is_some_and(|s| s.last_seq <= anchor_seq_or_0)
        })
        .count();
    let left_behind: Vec<String> = (segments[..behind].iter())
        .map(|(_, path)| {
            path.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        })
        .collect();
    let (mut last_seq, mut last_hash) = (anchor_seq_or_0, anchor_hash.clone());
    // With a retention given, each must also be past it (a prune removes only those; one
    // still within it is an anchor moved past records that should still be here).
    let cutoff = retention.map(|retention| {
        let cutoff = time::OffsetDateTime::now_utc()
            .checked_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX))
            .map_or_else(String::new, super::AuditRecord::ts_of);
        (cutoff, humantime::format_duration(retention).to_string())
    });
    let dated_below = |seq| {
        heads
            .range(..=seq)
            .flat_map(|(_, w)| w)
            .any(|w| !w.ts.is_empty())
    };
    let pruned_unwitnessed = anchor_seq.filter(|&a| !heads.is_empty() && !dated_below(a));
    let mut witnessed = 0;
    let mut buf = Vec::new();
    let mut torn_tail = false;
    for (index, (number, path)) in segments.iter().enumerate() {
        let segment = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        if index == 0
            && behind > 0
            && let Some(seal) = super::index::read_seal(dir, *number)
        {
            (last_seq, last_hash) = (seal.first_seq.saturating_sub(1), seal.first_prev);
        }
        let (seq_before, hash_before) = (last_seq, last_hash.clone());
        let mut last_ts = String::new();
        let newest = index + 1 == segments.len();
        let mut reader = BufReader::new(File::open(path).map_err(io_err(path))?);
        // Where the whole lines read so far end, and how often the newest segment has been
        // read again from there (see below).
        let (mut line, mut at, mut rereads, mut reread_at): (u64, u64, u32, u64) = (0, 0, 0, 0);
        loop {
            buf.clear();
            let read = read_line(&mut reader, &mut buf).map_err(io_err(path))?;
            let seq = last_seq.saturating_add(1);
            let malformed = |line: u64, reason: String| VerifyError::Malformed {
                segment: segment.clone(),
                line,
                seq,
                reason,
            };
            let Some(text) = buf.strip_suffix(b"\n") else {
                // The records end here: at the end of the file, or where zero bytes begin
                // (space made ready for records not yet written), which must then be all
                // that is left. Anything after them was written over a record's place.
                if !only_unwritten_after(&mut reader).map_err(io_err(path))? {
                    // A running writer copies a batch into the newest segment's zeros while
                    // this reads it: the bytes after the zeros may be that batch, arrived
                    // between two reads. Read on from the last whole line a moment later.
                    if newest && at > reread_at {
                        // Past where the last reread began: the writer had moved on.
                        rereads = 0;
                    }
                    if newest && rereads < LIVE_REREADS {
                        rereads += 1;
                        reread_at = at;
                        std::thread::sleep(LIVE_REREAD_PAUSE);
                        let mut file = File::open(path).map_err(io_err(path))?;
                        file.seek(SeekFrom::Start(at)).map_err(io_err(path))?;
                        reader = BufReader::new(file);
                        continue;
                    }
                    return Err(malformed(
                        line + 1,
                        "bytes after unwritten (zero) space: records overwritten with zeros, \
                         or a crash's torn batch that the gateway's next start would cut"
                            .into(),
                    ));
                }
                if read == 0 {
                    break;
                }
                // Only the newest segment may end mid-line: the chain continues past older ones.
                if newest {
                    torn_tail = true;
                    break;
                }
                return Err(malformed(
                    line + 1,
                    "torn final line (no trailing newline)".into(),
                ));
            };
            line += 1;
            at += read as u64;
            let malformed = |reason: String| malformed(line, reason);
            let head = match decode_line(text) {
                Ok(head) => head,
                Err(LineError::Malformed(reason)) => return Err(malformed(reason)),
                Err(LineError::HashMismatch) => {
                    return Err(VerifyError::HashMismatch { segment, line, seq });
                }
            };
            // A log that starts past seq 1 with no anchor to say why: the anchor lost, more
            // likely than a forged start, and the operator is told where to look.
            if anchor_seq.is_none() && records == 0 && head.seq > 1 && head.prev != last_hash {
                return Err(VerifyError::NoAnchor {
                    segment,
                    first: head.seq,
                });
            }
            // Link before sequence: a deleted or moved record shows as a broken link, which
            // names the real problem better than the gap it also leaves.
            if head.prev != last_hash {
                return Err(VerifyError::BrokenLink { segment, line, seq });
            }
            if head.seq != seq {
                let found = head.seq;
                return Err(VerifyError::SequenceGap {
                    segment,
                    line,
                    seq,
                    found,
                });
            }
            if let Some(seen) = heads.get(&head.seq) {
                // The time too: the pruning check takes a head's time as proof of a record's
                // age, and a head appended with the right hash and an old time would otherwise
                // "prove" records still within the retention old enough to have gone.
                let differs = |w: &&crate::audit::witness::Witnessed| {
                    w.hash != head.hash || (!w.ts.is_empty() && w.ts != head.ts)
                };
                if let Some(other) = seen.iter().find(differs) {
                    return Err(VerifyError::WitnessMismatch {
                        segment,
                        line,
                        seq,
                        at: other.at.clone(),
                    });
                }
                // (Heads behind the anchor are counted as pruned: `check_pruned_heads`.)
                if index >= behind {
                    witnessed += seen.len() as u64;
                }
            }
            (records, last_seq, last_hash, last_ts) = (records + 1, head.seq, head.hash, head.ts);
        }
        // A sealed segment must still span exactly what its seal recorded.
        if let Some(seal) = super::index::read_seal(dir, *number) {
            // The time and count too: retention deletes a sealed segment by its seal's time,
            // so a seal made to say "old" would have the gateway itself prune records still
            // within the retention period, and write an anchor that vouches for it. (Seals
            // from before retention have no time; retention never deletes by one of those.)
            let in_segment = last_seq.saturating_sub(seq_before);
            let found = format!(
                "seq {}..={} from {} to {}, {in_segment} records, the last at {}",
                seq_before + 1,
                last_seq,
                short(&hash_before),
                short(&last_hash),
                or_none(&last_ts),
            );
            let sealed = format!(
                "seq {}..={} from {} to {}, {} records, the last at {}",
                seal.first_seq,
                seal.last_seq,
                short(&seal.first_prev),
                short(&seal.last_hash),
                seal.records,
                or_none(&seal.last_ts),
            );
            // Compared whole; shown short.
            let same = (
                seq_before + 1,
                last_seq,
                hash_before.as_str(),
                last_hash.as_str(),
                in_segment,
            ) == (
                seal.first_seq,
                seal.last_seq,
                seal.first_prev.as_str(),
                seal.last_hash.as_str(),
                seal.records,
            ) && (seal.last_ts.is_empty() || seal.last_ts == last_ts);
            if !same {
                return Err(VerifyError::SealMismatch {
                    segment,
                    sealed,
                    found,
                });
            }
            let index = super::index::index_path(dir, *number);
            if !super::index::index_matches(dir, *number).map_err(io_err(&index))? {
                let index = index
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                return Err(VerifyError::IndexMismatch { segment, index });
            }
        }
        if index < behind {
            if let Some((cutoff, retention)) = &cutoff
                && (last_ts.is_empty() || last_ts >= *cutoff)
            {
                return Err(VerifyError::LeftBehindTooRecent {
                    segment,
                    ts: or_none(&last_ts).to_owned(),
                    retention: retention.clone(),
                    cutoff: cutoff.clone(),
                });
            }
            // The last of them ends where the anchor says the prune ended.
            if index + 1 == behind && (last_seq, &last_hash) != (anchor_seq_or_0, &anchor_hash) {
                return Err(VerifyError::LeftBehindOffAnchor {
                    segment,
                    last_seq,
                    anchor: anchor_seq_or_0,
                });
            }
        }
    }
    let past_the_end = (Bound::Excluded(last_seq), Bound::Unbounded);
    if let Some((&seq, seen)) = heads.range(past_the_end).next() {
        return Err(VerifyError::CutFromEnd {
            last_seq,
            seq,
            at: seen.first().map(|w| w.at.clone()).unwrap_or_default(),
        });
    }
    let (mut kept_aside, mut cuts_unrecorded) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let name = entry.map_err(io_err(dir))?.file_name();
        let name = name.to_string_lossy();
        // (A `.tmp` is a note a start stopped writing: what was cut, no records; the next
        // start makes a copy and note of its own.)
        if name.contains(".jsonl.cut-") && !name.ends_with(".tmp") {
            match name.ends_with(".pending") {
                true => cuts_unrecorded.push(name.into_owned()),
                false => kept_aside.push(name.into_owned()),
            }
        }
    }
    kept_aside.sort();
    cuts_unrecorded.sort();
    Ok(VerifyReport {
        kept_aside,
        cuts_unrecorded,
        left_behind,
        segments: segments.len(),
        records,
        witnessed,
        witnessed_pruned,
        pruned_unwitnessed,
        last_seq,
        last_hash,
        torn_tail,
    })
}

/// A time as shown in a mismatch: `none` for a record without one.
fn or_none(ts: &str) -> &str {
    if ts.is_empty() { "none" } else { ts }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::encode_line;
    use crate::audit::record::tests::sample;
    use crate::audit::segment::segment_name;

    /// Writes a valid chain directly, `per_segment[i]` records into segment `i + 1`.
    fn write_chain(dir: &Path, per_segment: &[usize]) -> Vec<Vec<String>> {
        let (mut seq, mut prev) = (1, GENESIS_HASH.to_owned());
        let mut all = Vec::new();
        for (i, &n) in per_segment.iter().enumerate() {
            let mut lines = Vec::new();
            for _ in 0..n {
                let line = encode_line(seq, &prev, &sample(seq)).unwrap();
                lines.push(String::from_utf8(line.bytes).unwrap());
                (seq, prev) = (seq + 1, line.hash);
            }
            std::fs::write(dir.join(segment_name(i as u64 + 1)), lines.concat()).unwrap();
            all.push(lines);
        }
        all
    }

    fn rewrite(dir: &Path, segment: u64, lines: &[String]) {
        std::fs::write(dir.join(segment_name(segment)), lines.concat()).unwrap();
    }

    /// Heads as a witness holds them, without the records' times (the pruning tests give
    /// those).
    fn heads(seen: &[(u64, &str)]) -> Heads {
        heads_of(&seen.iter().map(|(s, h)| (*s, *h, "")).collect::<Vec<_>>())
    }

    /// Heads of records written at the times given.
    fn heads_of(seen: &[(u64, &str, &str)]) -> Heads {
        let mut heads = Heads::new();
        for (i, (seq, hash, ts)) in seen.iter().enumerate() {
            heads
                .entry(*seq)
                .or_default()
                .push(crate::audit::witness::Witnessed {
                    seq: *seq,
                    hash: (*hash).to_owned(),
                    ts: (*ts).to_owned(),
                    at: (*ts).to_owned(),
                    index: i as u64,
                });
        }
        heads
    }

    fn hash_of(line: &str) -> String {
        decode_line(line.trim_end().as_bytes()).unwrap().hash
    }

    fn ts_of(line: &str) -> String {
        decode_line(line.trim_end().as_bytes()).unwrap().ts
    }

    /// Without a witness, the newest records cut away leave a valid chain; with one, the cut
    /// shows, whichever segments went, and a false head added to the witness shows too.
    #[test]
    fn a_witness_shows_records_cut_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let lines = write_chain(dir.path(), &[3, 3]);
        let (third, sixth) = (hash_of(&lines[0][2]), hash_of(&lines[1][2]));
        let seen = heads(&[(3, &third), (6, &sixth)]);
        let whole = verify_against(dir.path(), &seen, None).unwrap();
        assert_eq!((whole.witnessed, whole.witnessed_pruned), (2, 0));

        rewrite(dir.path(), 2, &lines[1][..1]);
        let cut = verify_dir(dir.path()).unwrap();
        assert_eq!(cut.last_seq, 4, "a valid chain without the witness");
        let err = verify_against(dir.path(), &seen, None).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::CutFromEnd {
                    last_seq: 4,
                    seq: 6,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("cut from the end"), "{err}");

        std::fs::remove_file(dir.path().join(segment_name(2))).unwrap();
        let err = verify_against(dir.path(), &seen, None).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::CutFromEnd {
                    last_seq: 3,
                    seq: 6,
                    ..
                }
            ),
            "{err}"
        );

        // A head appended by someone who cannot remove the true ones: a mismatch, not cover.
        rewrite(dir.path(), 2, &lines[1]);
        let forged = heads(&[(3, &third), (3, &"0".repeat(64)), (6, &sixth)]);
        let err = verify_against(dir.path(), &forged, None).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::WitnessMismatch {
                    seq: 3,
                    line: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// A record the witness saw, rewritten along with everything after it so that the chain
    /// holds again (the whole tail re-hashed), still differs from what was witnessed.
    #[test]
    fn a_witness_shows_a_rewritten_tail() {
        let dir = tempfile::tempdir().unwrap();
        let lines = write_chain(dir.path(), &[4]);
        let seen = heads(&[(2, &hash_of(&lines[0][1])), (4, &hash_of(&lines[0][3]))]);
        let mut prev = hash_of(&lines[0][0]);
        let mut rewritten = vec![lines[0][0].clone()];
        for seq in 2..=4 {
            let mut other = sample(seq);
            other.path = "/somewhere/else".into();
            let line = encode_line(seq, &prev, &other).unwrap();
            rewritten.push(String::from_utf8(line.bytes).unwrap());
            prev = line.hash;
        }
        rewrite(dir.path(), 1, &rewritten);
        assert_eq!(verify_dir(dir.path()).unwrap().records, 4);
        let err = verify_against(dir.path(), &seen, None).unwrap_err();
        assert!(
            matches!(err, VerifyError::WitnessMismatch { seq: 2, .. }),
            "{err}"
        );
    }

    /// Heads the log no longer holds (pruned) are only as good as `pruned.json`, the host's
    /// word: the one at the anchor must carry the anchor's hash, and each must be of a record
    /// older than the retention the auditor gives. An anchor written past records still within
    /// it (those records deleted) shows, and so does an anchor with another hash.
    #[test]
    fn heads_in_the_pruned_part_must_be_older_than_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let lines = write_chain(dir.path(), &[2, 2]);
        std::fs::remove_file(dir.path().join(segment_name(1))).unwrap();
        let anchor = |seq: u64, hash: String| {
            let anchor = crate::audit::prune::Anchor {
                last_pruned_seq: seq,
                last_pruned_hash: hash,
                pruned_segments: 1,
                pruned_records: seq,
            };
            std::fs::write(
                dir.path().join("pruned.json"),
                serde_json::to_vec(&anchor).unwrap(),
            )
            .unwrap();
        };
        anchor(2, hash_of(&lines[0][1]));
        let year = Duration::from_secs(365 * 24 * 3600);
        let (first, second, fourth) = (
            hash_of(&lines[0][0]),
            hash_of(&lines[0][1]),
            hash_of(&lines[1][1]),
        );
        let old = "2019-01-01T00:00:00.000Z";
        let now = ts_of(&lines[1][1]);
        let honest = heads_of(&[(1, &first, old), (2, &second, old), (4, &fourth, &now)]);
        let report = verify_against(dir.path(), &honest, Some(year)).unwrap();
        assert_eq!(
            (report.records, report.witnessed, report.witnessed_pruned),
            (2, 1, 2)
        );
        let err = verify_against(dir.path(), &honest, None).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::RetentionNeeded {
                    count: 2,
                    anchor: 2
                }
            ),
            "{err}"
        );

        // Records of this year gone below the anchor: pruned years early, so removed.
        let recent = heads_of(&[(1, &first, &now), (2, &second, &now), (4, &fourth, &now)]);
        let err = verify_against(dir.path(), &recent, Some(year)).unwrap_err();
        assert!(
            matches!(err, VerifyError::PrunedTooEarly { seq: 2, .. }),
            "{err}"
        );

        // Everything deleted, and the anchor moved past the newest head.
        std::fs::remove_file(dir.path().join(segment_name(2))).unwrap();
        anchor(9, "0".repeat(64));
        assert_eq!(verify_dir(dir.path()).unwrap().records, 0);
        let err = verify_against(dir.path(), &honest, Some(year)).unwrap_err();
        assert!(
            matches!(err, VerifyError::PrunedTooEarly { seq: 4, .. }),
            "{err}"
        );

        // Records just inside the retention, deleted with the anchor moved up to just below
        // the first recent head: no head of theirs is in the pruned part, and none at or past
        // the anchor is old enough to prove them old.
        std::fs::write(dir.path().join(segment_name(2)), lines[1].concat()).unwrap();
        let gap = heads_of(&[(1, &first, old), (4, &fourth, &now)]);
        anchor(2, second.clone());
        let err = verify_against(dir.path(), &gap, Some(year)).unwrap_err();
        assert!(
            matches!(err, VerifyError::UnprovenPrune { anchor: 2, .. }),
            "{err}"
        );
        // The heads below the anchor trimmed from the witness: nothing to check them by, and
        // the report says so rather than passing them as checked.
        let trimmed = heads_of(&[(4, &fourth, &now)]);
        let report = verify_against(dir.path(), &trimmed, Some(year)).unwrap();
        assert_eq!(
            (report.witnessed_pruned, report.pruned_unwitnessed),
            (0, Some(2))
        );
        let report = verify_against(dir.path(), &gap, None);
        assert!(report.is_err(), "a head below the anchor wants a retention");
        assert_eq!(verify_dir(dir.path()).unwrap().pruned_unwitnessed, None);
        // Nor does a head appended with record 4's true hash and an old time prove them old:
        // the record's own time is not that.
        let forged = heads_of(&[(1, &first, old), (4, &fourth, &now), (4, &fourth, old)]);
        let err = verify_against(dir.path(), &forged, Some(year)).unwrap_err();
        assert!(
            matches!(err, VerifyError::WitnessMismatch { seq: 4, .. }),
            "{err}"
        );
        std::fs::remove_file(dir.path().join(segment_name(2))).unwrap();

        // The anchor's hash is the witnessed one's, or the anchor was rewritten.
        anchor(2, "0".repeat(64));
        let err = verify_against(dir.path(), &honest, Some(year)).unwrap_err();
        assert!(
            matches!(err, VerifyError::AnchorMismatch { seq: 2, .. }),
            "{err}"
        );
    }

    /// A verified chain of two segments, the first sealed, with its seal then edited by `edit`.
    fn with_seal_edited(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), &[3, 1]);
        crate::audit::index::seal(dir.path(), 1).unwrap();
        verify_dir(dir.path()).unwrap();
        let path = crate::audit::index::seal_path(dir.path(), 1);
        let mut seal: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut seal);
        std::fs::write(&path, serde_json::to_vec(&seal).unwrap()).unwrap();
        dir
    }

    /// A seal is compared with its segment in full: one whose last hash differs from the
    /// segment's past the twelve characters a message shows is a mismatch all the same.
    #[test]
    fn a_seal_differing_past_what_is_shown_fails_verification() {
        let dir = with_seal_edited(|seal| {
            let hash = seal["last_hash"].as_str().unwrap().to_owned();
            let last = if hash.ends_with('0') { "1" } else { "0" };
            seal["last_hash"] = format!("{}{last}", &hash[..hash.len() - 1]).into();
        });
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(matches!(err, VerifyError::SealMismatch { .. }), "{err}");
    }

    /// Retention deletes a sealed segment by its seal's time: a seal made to say its records
    /// are old (or fewer) is a mismatch, not a licence for the gateway to prune them.
    #[test]
    fn a_seal_with_another_time_or_count_fails_verification() {
        for (field, forged) in [
            ("last_ts", serde_json::json!("2000-01-01T00:00:00.000000Z")),
            ("records", serde_json::json!(2)),
        ] {
            let dir = with_seal_edited(|seal| {
                assert_ne!(seal[field], forged);
                seal[field] = forged;
            });
            let err = verify_dir(dir.path()).unwrap_err();
            assert!(
                matches!(err, VerifyError::SealMismatch { .. }),
                "{field}: {err}"
            );
        }
        // A seal from before retention has no time at all, and is honest.
        let dir = with_seal_edited(|seal| {
            seal.as_object_mut().unwrap().remove("last_ts").unwrap();
        });
        verify_dir(dir.path()).unwrap();
    }

    /// Subject access trusts a sealed segment's index: one with a subject's entry taken out
    /// (the count mended to match) must fail verification, not hide the disclosure.
    #[test]
    fn an_index_with_a_subject_taken_out_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), &[3, 1]);
        crate::audit::index::seal(dir.path(), 1).unwrap();
        verify_dir(dir.path()).unwrap();
        let found = crate::audit::reader::records_mentioning(dir.path(), "subj-2").unwrap();
        assert_eq!(found.0.len(), 1);

        let path = crate::audit::index::index_path(dir.path(), 1);
        let idx = std::fs::read(&path).unwrap();
        let key = crate::audit::index::subject_key("subj-2").to_be_bytes();
        let entries: Vec<&[u8]> = idx[16..].chunks(16).filter(|e| e[..8] != key[..]).collect();
        assert_eq!(entries.len(), 2);
        let mut forged = idx[..8].to_vec();
        forged.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        forged.extend(entries.concat());
        std::fs::write(&path, forged).unwrap();
        // The forgery works on lookups...
        let found = crate::audit::reader::records_mentioning(dir.path(), "subj-2").unwrap();
        assert!(found.0.is_empty());
        // ...and verification names it.
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(matches!(err, VerifyError::IndexMismatch { .. }), "{err}");
        assert!(err.to_string().contains("seg-00000001.idx"), "{err}");
    }

    #[test]
    fn empty_and_valid_directories_pass() {
        let dir = tempfile::tempdir().unwrap();
        let report = verify_dir(dir.path()).unwrap();
        assert_eq!(
            (report.segments, report.records, report.last_seq),
            (0, 0, 0)
        );
        assert_eq!(report.last_hash, GENESIS_HASH);

        write_chain(dir.path(), &[3, 0, 4]);
        std::fs::write(dir.path().join("notes.txt"), "not a segment").unwrap();
        let report = verify_dir(dir.path()).unwrap();
        assert_eq!(
            (report.segments, report.records, report.last_seq),
            (3, 7, 7)
        );
    }

    #[test]
    fn changed_byte_is_a_hash_mismatch_naming_segment_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = write_chain(dir.path(), &[2, 3]);
        lines[1][1] = lines[1][1].replace("subj-4", "subj-5");
        rewrite(dir.path(), 2, &lines[1]);
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::HashMismatch { segment, line: 2, seq: 4 }
                if segment == "seg-00000002.jsonl"),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("`seg-00000002.jsonl` line 2"),
            "{err}"
        );
    }

    #[test]
    fn deleted_line_is_a_broken_link() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = write_chain(dir.path(), &[4]);
        lines[0].remove(1);
        rewrite(dir.path(), 1, &lines[0]);
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BrokenLink {
                    line: 2,
                    seq: 2,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn deleted_first_line_and_missing_segment_are_broken_links() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = write_chain(dir.path(), &[2, 2, 2]);
        std::fs::remove_file(dir.path().join(segment_name(2))).unwrap();
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::BrokenLink { segment, line: 1, seq: 3 }
                if segment == "seg-00000003.jsonl"),
            "{err:?}"
        );
        // The log's very first record deleted: it begins past seq 1 with no anchor to say
        // why, and is reported so (the anchor lost, or records deleted).
        lines[0].remove(0);
        rewrite(dir.path(), 1, &lines[0]);
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::NoAnchor { segment, first: 2 }
                if segment == "seg-00000001.jsonl"),
            "{err:?}"
        );
    }

    #[test]
    fn swapped_lines_are_caught_at_the_first_moved_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = write_chain(dir.path(), &[5]);
        lines[0].swap(2, 3);
        rewrite(dir.path(), 1, &lines[0]);
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BrokenLink {
                    line: 3,
                    seq: 3,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn renumbered_but_linked_line_is_a_sequence_gap() {
        let dir = tempfile::tempdir().unwrap();
        let first = encode_line(1, GENESIS_HASH, &sample(1)).unwrap();
        let second = encode_line(3, &first.hash, &sample(2)).unwrap();
        std::fs::write(
            dir.path().join(segment_name(1)),
            [first.bytes, second.bytes].concat(),
        )
        .unwrap();
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::SequenceGap {
                    line: 2,
                    seq: 2,
                    found: 3,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn truncated_and_garbage_lines_are_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = write_chain(dir.path(), &[3, 1]);
        let torn = lines[0][2][..40].to_owned();
        lines[0][2] = torn;
        rewrite(dir.path(), 1, &lines[0]);
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Malformed { line: 3, seq: 3, reason, .. }
                if reason.contains("torn")),
            "{err:?}"
        );

        // At the very end of the log a torn line is a crash's unacknowledged write: reported,
        // not an error, and the records before it still verify.
        let tail = tempfile::tempdir().unwrap();
        let mut lines = write_chain(tail.path(), &[3]);
        lines[0][2] = lines[0][2][..40].to_owned();
        rewrite(tail.path(), 1, &lines[0]);
        let report = verify_dir(tail.path()).unwrap();
        assert!(report.torn_tail);
        assert_eq!(report.records, 2);

        lines[0][2] = "not json at all\n".into();
        rewrite(dir.path(), 1, &lines[0]);
        let err = verify_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, VerifyError::Malformed { line: 3, .. }),
            "{err:?}"
        );
    }
}
