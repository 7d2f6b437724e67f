//! `wardgate audit tail`: the log as it grows, one line per record, in the terminal.
//!
//! It reads the segment files directly (no gateway credentials needed, only read access to
//! the log's directory, which an operator on the host has anyway), prints the last records,
//! then follows the newest segment and moves on when the writer rolls to a new one. Filters
//! are the live feed's, so the terminal and the console agree on what a filter means.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::segment::list_segments;
use super::writer::Logged;
use super::{AuditRecord, Decision};
use crate::watch::feed::{Filter, access_event};

const POLL: Duration = Duration::from_millis(200);

/// One record as a terminal line: time, sequence, decision, who, why, what, how many.
pub fn format(seq: u64, r: &AuditRecord) -> String {
    let decision = match r.decision {
        Decision::Allow => "allow",
        Decision::Deny => "DENY ",
        Decision::Error => "ERROR",
    };
    let who = match &r.caller {
        Some(c) => format!("{} ({})", c.subject, c.role),
        None => format!(
            "<unauthenticated {}>",
            r.client_addr.as_deref().unwrap_or("?")
        ),
    };
    let mut line = format!(
        "{} #{seq:<8} {decision} {:>3}  {who}  {}  {}",
        r.ts,
        r.status,
        r.purpose.as_deref().unwrap_or("-"),
        r.route.as_deref().unwrap_or(&r.path),
    );
    if !r.subjects.is_empty() {
        line.push_str(&format!("  records={}", r.subjects.len()));
    }
    if r.rows_withheld > 0 {
        line.push_str(&format!("  withheld={}", r.rows_withheld));
    }
    if let Some(why) = &r.reason {
        line.push_str(&format!("  [{why}]"));
    }
    line
}

/// Prints the last `last` matching records, then (with `follow`) new ones until `stop`.
/// `raw` prints the log's own JSON lines instead of the summary.
pub async fn tail(
    dir: &Path,
    last: usize,
    follow: bool,
    filter: &Filter,
    raw: bool,
    out: &mut (dyn FnMut(&str) + Send),
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let segments = list_segments(dir)
        .with_context(|| format!("cannot read the audit directory `{}`", dir.display()))?;
    let Some((mut segment, _)) = segments.last().cloned() else {
        anyhow::bail!("`{}` holds no audit segments", dir.display());
    };
    // The backlog: newest segments first, until `last` matching records are found.
    let mut offset = 0u64;
    let mut matching: Vec<String> = Vec::new();
    for (n, _) in segments.iter().rev() {
        let (mut off, mut lines) = (0u64, Vec::new());
        read_new(dir, *n, &mut off, &mut |l| lines.push(l.to_owned()))?;
        if *n == segment {
            offset = off;
        }
        let mut older: Vec<String> = lines
            .iter()
            .filter_map(|l| render(dir, l, filter, raw))
            .collect();
        older.append(&mut matching);
        matching = older;
        if matching.len() >= last {
            break;
        }
    }
    for text in &matching[matching.len().saturating_sub(last)..] {
        out(text);
    }
    let mut show = |line: &str| {
        if let Some(text) = render(dir, line, filter, raw) {
            out(&text);
        }
    };
    if !follow {
        return Ok(());
    }
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(POLL) => {}
        }
        read_new(dir, segment, &mut offset, &mut show)?;
        // The writer rolled (perhaps several times): finish each segment, then the next.
        loop {
            let next = list_segments(dir)?
                .into_iter()
                .map(|(n, _)| n)
                .find(|n| *n > segment);
            let Some(n) = next else { break };
            read_new(dir, segment, &mut offset, &mut show)?;
            (segment, offset) = (n, 0);
            read_new(dir, segment, &mut offset, &mut show)?;
        }
    }
}

/// Reads the complete lines written to `segment` from `offset` on, and moves `offset` to the
/// start of the first line not yet complete (read again, whole, at the next poll: bytes are
/// never carried from one poll to the next, so a line is shown once, whole, or not at all).
fn read_new(
    dir: &Path,
    segment: u64,
    offset: &mut u64,
    each: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let path = dir.join(super::segment::segment_name(segment));
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        // Pruned or not created yet: nothing to read.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read `{}`", path.display())),
    };
    // Cut back under us (a failed batch discarded, a torn tail trimmed at start), always to
    // the end of a line: what was cut was never acknowledged. Go on from where it now ends.
    *offset = (*offset).min(f.metadata()?.len());
    // Up to the segment's made-ready space, if it has some. Bytes, not text: a read can end
    // inside a character the writer has not finished.
    let buf = super::segment::read_written(&mut f, *offset)?;
    let mut start = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[start..]) {
        // Only a damaged line is not UTF-8; it is no record to show.
        if let Ok(line) = std::str::from_utf8(&buf[start..start + i]) {
            each(line.trim_end());
        }
        start += i + 1;
    }
    *offset += start as u64;
    Ok(())
}

/// The text to print for one log line, or `None` if the filter excludes it.
fn render(dir: &Path, line: &str, filter: &Filter, raw: bool) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    let seq = serde_json::from_str::<Seq>(line).ok()?.seq;
    let mut record: AuditRecord = serde_json::from_str(line).ok()?;
    // Sealed addresses read back while their day's key exists (audit/addr.rs); a key that is
    // there and cannot be read (another account's, damaged) is not one shredded.
    record.client_addr = record
        .client_addr
        .map(|a| super::addr::reveal(dir, &a).unwrap_or_else(|| super::addr::unrevealed(dir, &a)));
    let logged = Logged { seq, record };
    if !filter.matches(&access_event(&logged)) {
        return None;
    }
    Some(if raw {
        line.to_owned()
    } else {
        format(seq, &logged.record)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::audit::record::tests::sample;
    use crate::audit::{AuditLog, AuditSettings, Durability};

    #[tokio::test]
    async fn prints_the_last_records_then_follows_across_a_segment_roll() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(AuditSettings {
            dir: dir.path().to_owned(),
            durability: Durability::PageCache,
            max_batch: 1,
            commit_window: std::time::Duration::ZERO,
            segment_max_bytes: 2_000,
            seal_client_addr: false,
        })
        .unwrap();
        for i in 0..3 {
            log.append(sample(i)).await.unwrap();
        }
        let mut denied = sample(99);
        denied.decision = Decision::Deny;
        denied.reason = Some("purpose_not_granted".into());
        log.append(denied).await.unwrap();

        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sink = seen.clone();
        let path = dir.path().to_owned();
        let follower = tokio::spawn(async move {
            let mut out = move |l: &str| sink.lock().unwrap().push(l.to_owned());
            tail(&path, 2, true, &Filter::default(), false, &mut out, async {
                let _ = stop_rx.await;
            })
            .await
        });
        // Enough records to roll over at least one segment boundary while following.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 100..110 {
            log.append(sample(i)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop_tx.send(()).unwrap();
        follower.await.unwrap().unwrap();
        let lines = seen.lock().unwrap().clone();
        assert!(list_segments(dir.path()).unwrap().len() > 1);
        assert_eq!(lines.len(), 12, "{lines:#?}");
        assert!(lines[0].contains("#3 "), "{}", lines[0]);
        assert!(lines[1].contains("DENY") && lines[1].contains("[purpose_not_granted]"));
        assert!(lines[11].contains("#14 "), "{}", lines[11]);
        log.shutdown().await;

        // Filters are the live feed's.
        let mut only = Vec::new();
        let deny = Filter::parse(Some("decision=deny")).unwrap();
        tail(
            dir.path(),
            100,
            false,
            &deny,
            true,
            &mut |l| only.push(l.to_owned()),
            async {},
        )
        .await
        .unwrap();
        assert_eq!(only.len(), 1, "{only:#?}");
        assert!(only[0].contains("\"decision\":\"deny\"") && only[0].contains("\"seq\":4"));
    }

    /// A poll can end inside a record, even inside one of its characters: the complete lines
    /// are shown, and the rest once it is whole. A segment cut back under the tail (a failed
    /// batch discarded) and written again shows its new lines once each, whole, and not the
    /// lines before the cut again.
    #[test]
    fn a_read_ending_inside_a_character_waits_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::audit::segment::segment_name(1));
        let lines = "{\"a\":1}\n{\"b\":\"Ynys Môn\"}\n".as_bytes();
        let cut = lines.iter().position(|&b| b == 0xC3).unwrap() + 1;
        std::fs::write(&path, &lines[..cut]).unwrap();
        let (mut offset, mut seen) = (0, Vec::<String>::new());
        let poll = |offset: &mut u64, seen: &mut Vec<String>| {
            read_new(dir.path(), 1, offset, &mut |l| seen.push(l.to_owned())).unwrap();
        };
        poll(&mut offset, &mut seen);
        assert_eq!(seen, ["{\"a\":1}"]);
        std::fs::write(&path, lines).unwrap();
        poll(&mut offset, &mut seen);
        assert_eq!(seen, ["{\"a\":1}", "{\"b\":\"Ynys Môn\"}"]);

        // Cut back to the first line, then written on past where it had ended.
        std::fs::write(&path, "{\"a\":1}\n").unwrap();
        poll(&mut offset, &mut seen);
        std::fs::write(&path, "{\"a\":1}\n{\"d\":4}\n{\"e\":\"a longer line\"}\n").unwrap();
        poll(&mut offset, &mut seen);
        assert_eq!(seen[2..], ["{\"d\":4}", "{\"e\":\"a longer line\"}"]);
    }

    /// A segment written over made-ready space (zero bytes) does not grow: the tail reads up to
    /// the zeros and sees the records written over them next. Bytes past the zeros (a batch
    /// being copied in as the tail reads, or torn by a crash) are never part of a line.
    #[test]
    fn a_segment_written_over_made_ready_space_is_followed_up_to_its_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::audit::segment::segment_name(1));
        let mut file = vec![0u8; 1 << 17];
        let first = b"{\"a\":1}\n{\"b\":";
        file[..first.len()].copy_from_slice(first);
        let later = b"\"x\"}\n";
        file[100_000..100_000 + later.len()].copy_from_slice(later);
        std::fs::write(&path, &file).unwrap();
        let (mut offset, mut seen) = (0, Vec::<String>::new());
        read_new(dir.path(), 1, &mut offset, &mut |l| seen.push(l.to_owned())).unwrap();
        assert_eq!(
            (seen.as_slice(), offset),
            (&["{\"a\":1}".to_owned()][..], 8)
        );

        let more = b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n";
        file[..more.len()].copy_from_slice(more);
        std::fs::write(&path, &file).unwrap();
        read_new(dir.path(), 1, &mut offset, &mut |l| seen.push(l.to_owned())).unwrap();
        assert_eq!(seen, ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
        assert_eq!(offset, more.len() as u64);
    }
}
