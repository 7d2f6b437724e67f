//! Retention: whole sealed segments older than the retention period are removed, leaving an
//! anchor so the chain that remains still verifies.
//!
//! The log is personal data, so it is kept for a defined period and no longer (seeds §9). Only
//! sealed segments whose newest record is older than the cut-off go, oldest first and without
//! gaps, never the segment being written. Before anything is deleted the anchor
//! `pruned.json` (the last pruned sequence number and hash, and what was pruned) is written and
//! synced; verification then starts the chain from the anchor instead of from genesis. The
//! prune is recorded in the log itself before anything is removed (`prune_and_record`), so
//! the log says what it no longer holds, and a prune whose record cannot be written removes
//! nothing. So is a shredding of client-address keys (`shred_and_record`).

use std::path::Path;

use anyhow::Context as _;

use serde::{Deserialize, Serialize};

use super::index::{index_path, read_seal, seal_path};
use super::segment::list_segments;

/// Where the remaining chain starts, and the history of what was pruned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub last_pruned_seq: u64,
    pub last_pruned_hash: String,
    pub pruned_segments: u64,
    pub pruned_records: u64,
}

/// What one prune removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub first_segment: u64,
    pub last_segment: u64,
    pub records: u64,
    pub last_pruned_seq: u64,
    pub last_pruned_hash: String,
}

/// The prune anchor, `None` when nothing was ever pruned (no `pruned.json`). One that cannot be
/// read is an error, never taken for none: the chain would restart from genesis, later prunes
/// would count from nothing, and a subject access report would stop saying that older
/// records were removed.
pub fn read_anchor(dir: &Path) -> std::io::Result<Option<Anchor>> {
    let path = dir.join("pruned.json");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the prune anchor `{}` is damaged ({e}): restore it from a backup or another copy of the log",
                path.display()
            ),
        )
    })
}

/// Removes sealed segments whose last record is older than `cutoff` (RFC 3339, compared as
/// text: the log writes one fixed UTC format). `None` when nothing was old enough.
pub fn prune(dir: &Path, cutoff: &str) -> anyhow::Result<Option<Pruned>> {
    match plan(dir, cutoff)? {
        Some(plan) => carry_out(dir, plan).map(Some),
        None => Ok(None),
    }
}

/// What a prune will remove, and the anchor it leaves (`plan`).
pub struct Plan {
    doomed: Vec<super::index::Seal>,
    anchor: Anchor,
    pruned: Pruned,
}

/// The sealed segments older than `cutoff` that a prune would remove, and what it would
/// record; `None` when there are none. It first finishes an earlier prune cut short after its
/// anchor: the segments left behind that anchor go, recorded by that prune already.
pub fn plan(dir: &Path, cutoff: &str) -> anyhow::Result<Option<Plan>> {
    let segments = list_segments(dir)?;
    let newest = segments.last().map(|(n, _)| *n);
    let mut anchor = read_anchor(dir)?.unwrap_or_default();
    let (mut doomed, mut leftover) = (Vec::new(), Vec::new());
    for (n, _) in &segments {
        if Some(*n) == newest {
            break;
        }
        // Stop at the first segment that is unsealed or still within retention: no gaps.
        match read_seal(dir, *n).map(|seal| timed(dir, seal)) {
            // Already behind the anchor: a prune stopped after writing it and before removing
            // these. They go now, counted once already; only if past the retention too (a
            // genuine leftover always is): an anchor restored or rewritten past records still
            // within it must not have the gateway delete them.
            Some(seal)
                if anchor.last_pruned_seq > 0
                    && seal.last_seq <= anchor.last_pruned_seq
                    && !seal.last_ts.is_empty()
                    && seal.last_ts.as_str() < cutoff =>
            {
                tracing::warn!(
                    segment = seal.segment,
                    "removing a segment an earlier prune left behind its anchor"
                );
                leftover.push(seal)
            }
            Some(seal) if !seal.last_ts.is_empty() && seal.last_ts.as_str() < cutoff => {
                doomed.push(seal)
            }
            Some(seal)
                if anchor.last_pruned_seq > 0
                    && seal.records > 0
                    && seal.last_seq <= anchor.last_pruned_seq =>
            {
                tracing::error!(
                    segment = seal.segment,
                    "a segment behind the prune anchor is still within the retention and is \
                     kept until it ages past it; `wardgate audit verify --retention` reports \
                     it (was the retention lengthened after an interrupted prune, or the anchor \
                     moved?)"
                );
                break;
            }
            _ => break,
        }
    }
    remove_segments(dir, &leftover)?;
    if let Some((oldest, _)) = segments.first() {
        remove_orphans(dir, *oldest, anchor.last_pruned_seq)?;
    }
    let (Some(first), Some(last)) = (doomed.first(), doomed.last()) else {
        if !leftover.is_empty() {
            super::segment::sync_dir(dir)?;
        }
        return Ok(None);
    };
    // What goes must continue the chain from the anchor, whole: a log whose `pruned.json` was
    // lost (copied without it, deleted) or rolled back, or one missing a segment, would
    // otherwise have this prune write an anchor that vouches for the gap, after which
    // verification passes and the count of records pruned is short for good.
    let (mut seq, mut hash) = match anchor.last_pruned_seq {
        0 => (0, super::record::GENESIS_HASH.to_owned()),
        n => (n, anchor.last_pruned_hash.clone()),
    };
    for seal in &doomed {
        if seal.first_seq != seq + 1 || seal.first_prev != hash {
            anyhow::bail!(
                "audit segment {} does not continue the chain from {} (it starts at seq {}, \
                 after seq {seq}): records are missing, or `pruned.json` was lost or replaced; \
                 nothing is pruned until `wardgate audit verify` passes",
                seal.segment,
                if seq == 0 {
                    "its start"
                } else {
                    "the prune anchor"
                },
                seal.first_seq,
            );
        }
        (seq, hash) = (seal.last_seq, seal.last_hash.clone());
    }
    let records: u64 = doomed.iter().map(|s| s.records).sum();
    anchor.last_pruned_seq = last.last_seq;
    anchor.last_pruned_hash = last.last_hash.clone();
    anchor.pruned_segments += doomed.len() as u64;
    anchor.pruned_records += records;
    let pruned = Pruned {
        first_segment: first.segment,
        last_segment: last.segment,
        records,
        last_pruned_seq: last.last_seq,
        last_pruned_hash: last.last_hash.clone(),
    };
    Ok(Some(Plan {
        doomed,
        anchor,
        pruned,
    }))
}

/// A seal with its last record's time. Seals written before retention have none (and are
/// never written again: the writer seals only segments without a seal), and one without a
/// time would stop every prune at it for good, keeping the log past its retention without a
/// word: the time is read from the segment's last record, where that record is the one the
/// seal names (its seq and hash). Otherwise the seal is left without, and the prune stops
/// there, saying why.
fn timed(dir: &Path, mut seal: super::index::Seal) -> super::index::Seal {
    if !seal.last_ts.is_empty() {
        return seal;
    }
    let path = dir.join(super::segment::segment_name(seal.segment));
    match last_record(&path) {
        Some(head) if head.seq == seal.last_seq && head.hash == seal.last_hash => {
            seal.last_ts = head.ts;
        }
        _ => tracing::warn!(
            segment = seal.segment,
            "an audit segment's seal has no time and its last record is not the one the seal \
             names: retention stops here until `wardgate audit verify` passes"
        ),
    }
    seal
}

/// The chain fields of a segment's last whole record.
fn last_record(path: &Path) -> Option<super::record::LineHead> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).ok()?);
    let (mut buf, mut last) = (Vec::new(), None);
    loop {
        buf.clear();
        super::segment::read_line(&mut reader, &mut buf).ok()?;
        let Some(text) = buf.strip_suffix(b"\n") else {
            return last;
        };
        last = Some(super::record::decode_line(text).ok()?);
    }
}

/// Removes what `plan` found: the anchor first, durable, then the segments.
pub fn carry_out(dir: &Path, plan: Plan) -> anyhow::Result<Pruned> {
    let Plan {
        doomed,
        anchor,
        pruned,
    } = plan;
    let tmp = dir.join("pruned.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&anchor)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join("pruned.json"))?;
    // The anchor's new name durable before any segment goes: a power cut between the two
    // must not leave the segments gone and no anchor saying where the chain resumes.
    super::segment::sync_dir(dir)?;
    remove_segments(dir, &doomed)?;
    super::segment::sync_dir(dir)?;
    Ok(pruned)
}

/// Removes the indexes and seals of segments older than the oldest there is, and their
/// temporary files: what a prune that removed the segment first (before this order) left
/// when cut short, or a sealing cut short before its rename (`index::write_atomically`).
fn remove_orphans(dir: &Path, oldest: u64, pruned_to: u64) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let stem = [".seal.json", ".seal.tmp", ".idx", ".tmp"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix));
        let Some(n) = stem.and_then(|s| super::segment::parse_segment_name(&format!("{s}.jsonl")))
        else {
            continue;
        };
        // A seal of records the anchor does not say were pruned is of a segment that went
        // some other way (deleted by mistake or by an intruder): it is the only statement of
        // what went missing, and stays, with its index, for whoever investigates (the chain
        // does not verify, and nothing is pruned, until then).
        if let Some(seal) = super::index::read_seal(dir, n)
            && n < oldest
            && seal.last_seq > pruned_to
        {
            tracing::error!(
                segment = n,
                first_seq = seal.first_seq,
                last_seq = seal.last_seq,
                "an audit segment is missing that no prune removed: its seal and index are kept"
            );
            continue;
        }
        if n < oldest {
            tracing::warn!(
                segment = n,
                "removing the index or seal of a pruned segment"
            );
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::anyhow!("cannot remove `{name}`: {e}")),
            }
        }
    }
    Ok(())
}

/// Removes each sealed segment's index, file and seal, in that order (those already gone are
/// fine). Stopped between, by a crash or a failed removal, it never leaves an index (subject
/// ids, hashed: personal data) whose segment is gone and which nothing would look at again;
/// a segment left keeps its seal, so the next prune (in this run, not only after a restart
/// that seals it again) removes it as left behind its anchor; a seal left without its
/// segment goes with the orphans (`remove_orphans`).
fn remove_segments(dir: &Path, seals: &[super::index::Seal]) -> anyhow::Result<()> {
    for s in seals {
        for p in [
            index_path(dir, s.segment),
            dir.join(super::segment::segment_name(s.segment)),
            seal_path(dir, s.segment),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::anyhow!("cannot remove `{}`: {e}", p.display())),
            }
        }
    }
    Ok(())
}

/// Prunes what is older than `retention`, recording the prune in the log itself first: a
/// prune whose record cannot be written removes nothing it has not recorded. (A prune recorded
/// and then cut short, by a failure or a shutdown, leaves its anchor or nothing: after its
/// anchor the next one removes what it left without recording it again; before, the next
/// one records the same segments again, a second record of one prune, counted once in
/// `pruned.json`.)
pub async fn prune_and_record(
    log: &super::AuditLog,
    dir: &Path,
    retention: std::time::Duration,
) -> anyhow::Result<Option<Pruned>> {
    let cutoff = time::OffsetDateTime::now_utc() - retention;
    let cutoff = super::AuditRecord::ts_of(cutoff);
    let (dir_owned, cut) = (dir.to_path_buf(), cutoff.clone());
    let Some(plan) = tokio::task::spawn_blocking(move || plan(&dir_owned, &cut)).await?? else {
        // A quiet log may hold records past the retention in the segment being written, which
        // no prune removes: a record of this makes the writer finish it (its first record is
        // more than `SEGMENT_MAX_AGE` old), and the next prune, once it is sealed, removes it.
        let dir_owned = dir.to_path_buf();
        let held = tokio::task::spawn_blocking(move || {
            let segments = list_segments(&dir_owned)?;
            anyhow::Ok(segments.last().and_then(|(n, path)| {
                super::segment::first_ts(path)
                    .filter(|t| t.as_str() < cutoff.as_str())
                    .map(|_| *n)
            }))
        })
        .await??;
        if let Some(n) = held {
            let mut record = system_record("audit.retention", "retention");
            record.detail = Some(serde_json::json!({ "finishes_segment": n }));
            log.append(record).await.map_err(|e| {
                anyhow::anyhow!(
                    "the segment being written holds records past the retention, and the record \
                     that finishes it could not be written: {e}"
                )
            })?;
        }
        return Ok(None);
    };
    let mut record = system_record("audit.prune", "retention");
    record.detail = Some(serde_json::to_value(&plan.pruned)?);
    // Synced whatever `audit.durability` says: the segments go for good, and their record
    // must not be lost to a power cut that their deletion survives.
    log.append_synced(record).await.map_err(|e| {
        anyhow::anyhow!("nothing more pruned: the prune's record could not be written first: {e}")
    })?;
    let dir_owned = dir.to_path_buf();
    let pruned = tokio::task::spawn_blocking(move || carry_out(&dir_owned, plan))
        .await?
        .context("the prune was recorded but not carried out (the next prune finishes it)")?;
    Ok(Some(pruned))
}

/// Shreds the address keys of days older than `keep` and records that it did. `None` when no
/// day was old enough.
pub async fn shred_and_record(
    log: &super::AuditLog,
    dir: &Path,
    keep: std::time::Duration,
) -> anyhow::Result<Option<Vec<String>>> {
    let keep_from = super::AuditRecord::ts_of(time::OffsetDateTime::now_utc() - keep);
    let keep_from = keep_from.get(..10).unwrap_or_default().to_owned();
    let dir_owned = dir.to_path_buf();
    let days = tokio::task::spawn_blocking(move || super::addr::shreddable(&dir_owned, &keep_from))
        .await??;
    if days.is_empty() {
        return Ok(None);
    }
    let mut record = system_record("audit.shred_client_addrs", "client_addr_retention");
    record.detail = Some(serde_json::json!({ "client_addresses_unreadable_for_days": days }));
    // Synced, as a prune's record is.
    log.append_synced(record).await.map_err(|e| {
        anyhow::anyhow!("nothing shredded: the shredding's record could not be written first: {e}")
    })?;
    let (dir_owned, shredding) = (dir.to_path_buf(), days.clone());
    tokio::task::spawn_blocking(move || super::addr::shred_days(&dir_owned, &shredding))
        .await?
        .context("the shredding was recorded but not done (the next one does it)")?;
    Ok(Some(days))
}

/// The log's own record of a retention step.
fn system_record(route: &str, reason: &str) -> super::AuditRecord {
    let mut r = super::AuditRecord::system(route, reason);
    r.lawful_basis = Some("legal_obligation".to_owned());
    r.method = "PRUNE".to_owned();
    r.status = 200;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::tests::sample;
    use crate::audit::{AuditLog, AuditRecord, AuditSettings, Durability, verify_dir};

    /// A log in `dir` synced at each commit, rolling at `segment_max_bytes`.
    fn settings(dir: &Path, segment_max_bytes: u64) -> AuditSettings {
        AuditSettings {
            dir: dir.to_owned(),
            durability: Durability::Fsync,
            max_batch: 8,
            commit_window: std::time::Duration::ZERO,
            segment_max_bytes,
            seal_client_addr: false,
        }
    }

    /// A log in `dir` of thirty records from 2018 over several segments, every segment but
    /// the one being written sealed: all but that one old enough to prune.
    async fn an_old_log(
        dir: &Path,
        durability: Durability,
    ) -> (AuditLog, Vec<(u64, std::path::PathBuf)>) {
        let mut s = settings(dir, 2048);
        s.durability = durability;
        let log = AuditLog::open(s).unwrap();
        for i in 0..30u64 {
            let mut r = sample(i + 1);
            r.ts = format!("2018-03-01T10:00:{:02}.000Z", i);
            log.append(r).await.unwrap();
        }
        let segments = list_segments(dir).unwrap();
        assert!(segments.len() > 2, "{segments:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for (n, _) in &segments[..segments.len() - 1] {
            while crate::audit::index::read_seal(dir, *n).is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "segment {n} not sealed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        (log, segments)
    }

    /// Nothing is pruned or shredded unless its record is written first: with the log closed
    /// (as when its disk fails), the old segments and the old day's address key all stay.
    #[tokio::test]
    async fn a_prune_or_shredding_whose_record_cannot_be_written_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (log, segments) = an_old_log(dir.path(), Durability::Fsync).await;
        let keys = dir.path().join("addr-keys");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(keys.join("2018-03-01.key"), [7u8; 32]).unwrap();
        let seven_years = std::time::Duration::from_secs(7 * 365 * 86_400);
        assert!(
            plan(
                dir.path(),
                &AuditRecord::ts_of(time::OffsetDateTime::now_utc() - seven_years)
            )
            .unwrap()
            .is_some(),
            "there is something to prune"
        );
        log.shutdown().await;

        let e = prune_and_record(&log, dir.path(), seven_years)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("nothing more pruned"), "{e:#}");
        assert_eq!(list_segments(dir.path()).unwrap(), segments);
        assert!(read_anchor(dir.path()).unwrap().is_none());
        let e = shred_and_record(&log, dir.path(), seven_years)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("nothing shredded"), "{e:#}");
        assert!(keys.join("2018-03-01.key").exists());
        assert!(verify_dir(dir.path()).is_ok());
    }

    /// A damaged `pruned.json` is never taken for none: the log does not start a new chain
    /// from genesis over it, verification and the next prune stop, naming it.
    #[tokio::test]
    async fn a_damaged_prune_anchor_stops_what_would_read_it_as_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pruned.json"), "{").unwrap();
        let e = AuditLog::open(settings(dir.path(), 2048)).unwrap_err();
        assert!(format!("{e:#}").contains("pruned.json"), "{e:#}");
        let e = verify_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("pruned.json"), "{e}");
        let e = plan(dir.path(), "2030-01-01T00:00:00.000Z").err().unwrap();
        assert!(format!("{e:#}").contains("damaged"), "{e:#}");
        // No anchor at all is none.
        std::fs::remove_file(dir.path().join("pruned.json")).unwrap();
        assert!(read_anchor(dir.path()).unwrap().is_none());
    }

    /// A prune continues the chain from its anchor or not at all: with `pruned.json` lost
    /// after a prune, or a segment missing from the middle, it refuses rather than write an
    /// anchor vouching for the gap (after which verification would pass).
    #[tokio::test]
    async fn a_prune_refuses_a_log_that_does_not_continue_from_its_anchor() {
        let cutoff = "2019-01-01T00:00:00.000Z";
        // A segment missing from the middle, never pruned.
        let dir = tempfile::tempdir().unwrap();
        let (log, segments) = an_old_log(dir.path(), Durability::Fsync).await;
        log.shutdown().await;
        let (n, path) = &segments[1];
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(crate::audit::index::seal_path(dir.path(), *n)).unwrap();
        let e = plan(dir.path(), cutoff).err().unwrap();
        assert!(
            format!("{e:#}").contains("does not continue the chain"),
            "{e:#}"
        );

        // Pruned once, then `pruned.json` lost, then more segments of age: the next prune
        // stops, and verification says why.
        let dir = tempfile::tempdir().unwrap();
        let (log, segments) = an_old_log(dir.path(), Durability::Fsync).await;
        log.shutdown().await;
        let first = crate::audit::index::read_seal(dir.path(), segments[0].0).unwrap();
        // Pretend the first segment alone was old enough the first time.
        let once = plan(dir.path(), cutoff).unwrap().unwrap();
        let only_first = Plan {
            doomed: vec![first.clone()],
            anchor: Anchor {
                last_pruned_seq: first.last_seq,
                last_pruned_hash: first.last_hash.clone(),
                pruned_segments: 1,
                pruned_records: first.records,
            },
            pruned: once.pruned,
        };
        carry_out(dir.path(), only_first).unwrap();
        verify_dir(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("pruned.json")).unwrap();
        let e = verify_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("there is no `pruned.json`"), "{e}");
        // Nor does the writer start on it (it would carry on a chain nothing can verify).
        let e = AuditLog::open(settings(dir.path(), 2048)).unwrap_err();
        assert!(format!("{e:#}").contains("no `pruned.json`"), "{e:#}");
        let e = plan(dir.path(), cutoff).err().unwrap();
        assert!(format!("{e:#}").contains("pruned.json"), "{e:#}");

        // The oldest segment deleted, not pruned: its seal, the only statement of what went,
        // and its index stay for whoever investigates, however often prunes refuse.
        let dir = tempfile::tempdir().unwrap();
        let (log, segments) = an_old_log(dir.path(), Durability::Fsync).await;
        log.shutdown().await;
        let (n, path) = &segments[0];
        std::fs::remove_file(path).unwrap();
        for _ in 0..2 {
            let e = plan(dir.path(), cutoff).err().unwrap();
            assert!(
                format!("{e:#}").contains("does not continue the chain"),
                "{e:#}"
            );
        }
        assert!(crate::audit::index::read_seal(dir.path(), *n).is_some());
        assert!(crate::audit::index::index_path(dir.path(), *n).exists());
    }

    /// Seals written before retention carry no time: the prune reads it from the segment's
    /// last record (the one the seal names) rather than stop at the first of them for good,
    /// and stops there only where that record is not the one named.
    #[tokio::test]
    async fn seals_without_a_time_are_pruned_by_their_last_records_time() {
        let cutoff = "2019-01-01T00:00:00.000Z";
        let dir = tempfile::tempdir().unwrap();
        let (log, segments) = an_old_log(dir.path(), Durability::Fsync).await;
        log.shutdown().await;
        let untimed = |n: u64, hash: Option<&str>| {
            let path = crate::audit::index::seal_path(dir.path(), n);
            let mut seal: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            seal.as_object_mut().unwrap().remove("last_ts");
            if let Some(hash) = hash {
                seal["last_hash"] = hash.into();
            }
            std::fs::write(&path, serde_json::to_vec(&seal).unwrap()).unwrap();
        };
        let sealed = &segments[..segments.len() - 1];
        for (n, _) in sealed {
            untimed(*n, None);
            assert!(
                crate::audit::index::read_seal(dir.path(), *n)
                    .unwrap()
                    .last_ts
                    .is_empty()
            );
        }
        let p = plan(dir.path(), cutoff)
            .unwrap()
            .expect("the old segments go");
        assert_eq!(p.doomed.len(), sealed.len());
        // A seal naming another last record than the segment's: the prune stops before it.
        untimed(sealed[1].0, Some(&"0".repeat(64)));
        let p = plan(dir.path(), cutoff).unwrap().unwrap();
        assert_eq!(p.doomed.len(), 1);
    }

    /// With `page-cache` durability, a prune's and a shredding's records are synced all the
    /// same before anything goes: a power cut would not bring the segments or the key back,
    /// and must not take their records.
    #[tokio::test]
    async fn a_prune_and_a_shredding_are_synced_before_anything_goes_in_page_cache_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = an_old_log(dir.path(), Durability::PageCache).await;
        assert_eq!(log.synced_through(), 0, "page cache: nothing synced yet");
        let seven_years = std::time::Duration::from_secs(7 * 365 * 86_400);
        let pruned = prune_and_record(&log, dir.path(), seven_years)
            .await
            .unwrap();
        assert!(pruned.is_some(), "something was pruned");
        let prune_seq = log.head().unwrap().seq;
        assert!(
            log.synced_through() >= prune_seq,
            "the prune's record was not synced"
        );
        let keys = dir.path().join("addr-keys");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(keys.join("2018-03-01.key"), [7u8; 32]).unwrap();
        assert!(
            shred_and_record(&log, dir.path(), seven_years)
                .await
                .unwrap()
                .is_some()
        );
        let shred_seq = log.head().unwrap().seq;
        assert!(shred_seq > prune_seq);
        assert_eq!(
            log.synced_through(),
            shred_seq,
            "the shredding's record was not synced"
        );
        log.shutdown().await;
    }

    /// A quiet log's records past the retention, all in the segment being written (far from
    /// full), are removed too: the prune has the writer finish the segment, and the next prune,
    /// once it is sealed, removes it. Without that they would be kept for as long as the
    /// segment took to fill, years on a standby replica.
    #[tokio::test]
    async fn a_quiet_logs_old_records_go_though_their_segment_never_fills() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), 64 << 20)).unwrap();
        let mut r = sample(1);
        r.ts = "2018-03-01T10:00:00.000Z".to_owned();
        log.append(r).await.unwrap();
        let a_year = std::time::Duration::from_secs(365 * 86_400);
        assert!(
            prune_and_record(&log, dir.path(), a_year)
                .await
                .unwrap()
                .is_none()
        );
        // The prune's own record began a segment of its own.
        let segments: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(segments, [1, 2]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while crate::audit::index::read_seal(dir.path(), 1).is_none() {
            assert!(std::time::Instant::now() < deadline, "segment 1 not sealed");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let pruned = prune_and_record(&log, dir.path(), a_year)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((pruned.first_segment, pruned.records), (1, 1));
        assert!(
            !dir.path()
                .join(crate::audit::segment::segment_name(1))
                .exists()
        );
        verify_dir(dir.path()).unwrap();
        // Nothing more is held past the retention: no more records are written for it.
        let head = log.head().unwrap().seq;
        assert!(
            prune_and_record(&log, dir.path(), a_year)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(log.head().unwrap().seq, head);
    }

    #[tokio::test]
    async fn only_sealed_segments_past_retention_go_and_the_chain_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let settings = || settings(dir.path(), 2048);
        let log = AuditLog::open(settings()).unwrap();
        // Old records first (eight years ago), then recent ones; small segments roll often.
        for i in 0..40u64 {
            let mut r = sample(i + 1);
            r.ts = if i < 20 {
                format!("2018-03-01T10:00:{:02}.000Z", i)
            } else {
                AuditRecord::now_ts()
            };
            log.append(r).await.unwrap();
        }
        let segments: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(segments.len() > 4, "{segments:?}");
        // The writer's sealing thread seals every finished segment; wait for it (sealing here
        // as well would race it for the same temporary file).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for n in &segments[..segments.len() - 1] {
            while crate::audit::index::read_seal(dir.path(), *n).is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "segment {n} not sealed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        let before = verify_dir(dir.path()).unwrap();
        // Each sealed segment as it was (its file, index and seal), to put back as a prune
        // stopped before removing it would leave it.
        type Files = Vec<(std::path::PathBuf, Vec<u8>)>;
        let files_of = |n: u64| -> Files {
            [
                dir.path().join(crate::audit::segment::segment_name(n)),
                index_path(dir.path(), n),
                seal_path(dir.path(), n),
            ]
            .into_iter()
            .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
            .collect()
        };
        let all_files: Vec<(u64, Files)> = (segments[..segments.len() - 1].iter())
            .map(|n| (*n, files_of(*n)))
            .collect();
        let first_files = all_files[0].1.clone();
        assert_eq!(first_files.len(), 3);
        let seven_years = std::time::Duration::from_secs(7 * 365 * 86_400);
        let pruned = prune_and_record(&log, dir.path(), seven_years)
            .await
            .unwrap()
            .unwrap();
        // A prune that finds nothing to record (what it removes, if anything, was recorded).
        let prunes_nothing = async || {
            prune_and_record(&log, dir.path(), seven_years)
                .await
                .unwrap()
                .is_none()
        };
        assert_eq!(pruned.first_segment, 1);
        assert!(
            pruned.records > 0 && pruned.records <= 20,
            "only old records go: {pruned:?}"
        );
        // Nothing newer than the cut-off was removed, and what remains verifies from the anchor.
        let after = verify_dir(dir.path()).unwrap();
        assert_eq!(
            after.last_seq,
            before.last_seq + 1,
            "the prune itself is recorded"
        );
        assert!(prunes_nothing().await);
        // A prune that stopped after its anchor and before removing its segments: they are
        // verified up to the anchor and named, and the next prune removes them without
        // counting them again. (A prune removes oldest first: what it leaves ends at the
        // anchor.)
        let counted = read_anchor(dir.path()).unwrap().unwrap();
        assert!(pruned.last_segment > 1, "{pruned:?}");
        let put_back = |upto: u64| {
            for (_, files) in all_files.iter().filter(|(n, _)| *n <= upto) {
                for (p, b) in files {
                    std::fs::write(p, b).unwrap();
                }
            }
        };
        // The oldest alone does not meet the anchor: not what a prune leaves, and refused.
        put_back(1);
        let e = verify_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("last segment behind the prune anchor"), "{e}");
        put_back(pruned.last_segment);
        let left = verify_dir(dir.path()).unwrap();
        let names: Vec<String> = (1..=pruned.last_segment)
            .map(crate::audit::segment::segment_name)
            .collect();
        assert_eq!(left.left_behind, names);
        assert_eq!(left.last_seq, after.last_seq);
        // One of them rewritten, its hashes made anew and its seal and index to match: it no
        // longer links to the next, or the last no longer meets the anchor.
        {
            let (p, b) = &first_files[0];
            let text = String::from_utf8(b.clone()).unwrap();
            let mut prev = crate::audit::record::GENESIS_HASH.to_owned();
            let mut lines = Vec::new();
            for line in text.lines() {
                let mut r: AuditRecord = serde_json::from_str(line).unwrap();
                let seq = serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
                    .as_u64()
                    .unwrap();
                r.purpose = Some("canvassing".to_owned());
                let line = crate::audit::record::encode_line(seq, &prev, &r).unwrap();
                lines.push(line.bytes);
                prev = line.hash;
            }
            std::fs::write(p, lines.concat()).unwrap();
            std::fs::remove_file(seal_path(dir.path(), 1)).unwrap();
            std::fs::remove_file(index_path(dir.path(), 1)).unwrap();
            crate::audit::index::seal(dir.path(), 1).unwrap();
            assert!(verify_dir(dir.path()).is_err());
            put_back(1);
            assert!(verify_dir(dir.path()).is_ok());
        }
        // Verified like the rest, against its own seal: a seal planted to say "already
        // pruned", on the segment being written or on the first one after the anchor, hides
        // nothing (the segment still has to match it).
        let live: Vec<u64> = (list_segments(dir.path()).unwrap().into_iter())
            .map(|(n, _)| n)
            .filter(|n| *n > 1)
            .collect();
        let anchor = read_anchor(dir.path()).unwrap().unwrap();
        let plant = |n: u64| {
            let path = seal_path(dir.path(), n);
            let kept = std::fs::read(&path).ok();
            let mut planted: serde_json::Value =
                serde_json::from_slice(&std::fs::read(seal_path(dir.path(), 1)).unwrap()).unwrap();
            planted["segment"] = n.into();
            planted["last_seq"] = anchor.last_pruned_seq.into();
            std::fs::write(&path, serde_json::to_vec(&planted).unwrap()).unwrap();
            (path, kept)
        };
        let put_back = |(path, kept): (std::path::PathBuf, Option<Vec<u8>>)| match kept {
            Some(kept) => std::fs::write(&path, kept).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        };
        // On the first after the anchor; on every one, the one being written too (were any
        // passed by on its seal's word, no link would be left to break).
        for planted in [&live[..1], &live[..]] {
            let kept: Vec<_> = planted.iter().map(|n| plant(*n)).collect();
            assert!(
                verify_dir(dir.path()).is_err(),
                "seals planted on {planted:?}"
            );
            kept.into_iter().for_each(put_back);
        }
        assert!(verify_dir(dir.path()).is_ok());
        // With a retention that still keeps its records, it is reported: the anchor was moved
        // past records that should be here.
        let ten_years = std::time::Duration::from_secs(10 * 365 * 86_400);
        let e = crate::audit::verify_against(dir.path(), &Default::default(), Some(ten_years))
            .unwrap_err()
            .to_string();
        assert!(e.contains("within the retention"), "{e}");
        assert!(prunes_nothing().await);
        assert!(!first_files[0].0.exists());
        let again = read_anchor(dir.path()).unwrap().unwrap();
        assert_eq!(
            (
                again.pruned_records,
                again.pruned_segments,
                again.last_pruned_seq
            ),
            (
                counted.pruned_records,
                counted.pruned_segments,
                counted.last_pruned_seq
            )
        );
        assert!(verify_dir(dir.path()).is_ok());
        // A prune cut short after removing a segment and before its index and seal (as an
        // earlier order of removal could leave them): the next prune removes those.
        for (p, b) in &first_files[1..] {
            std::fs::write(p, b).unwrap();
        }
        assert!(prunes_nothing().await);
        assert!(first_files.iter().all(|(p, _)| !p.exists()));
        // A leftover whose removal fails (the file immutable here; a disk error in earnest)
        // keeps its seal: the next prune of this same run removes it once it can.
        for (p, b) in &first_files {
            std::fs::write(p, b).unwrap();
        }
        let segment = &first_files[0].0;
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(segment)
                .status()
                .is_ok_and(|s| s.success())
        };
        if chattr("+i") {
            let failed = prune_and_record(&log, dir.path(), seven_years).await;
            assert!(chattr("-i"));
            let e = failed.expect_err("an immutable segment cannot be removed");
            assert!(e.to_string().contains("cannot remove"), "{e:#}");
            assert!(segment.exists() && first_files[2].0.exists());
            assert!(prunes_nothing().await);
            assert!(first_files.iter().all(|(p, _)| !p.exists()));
            assert!(verify_dir(dir.path()).is_ok());
        } else {
            // `chattr` needs root and a file system with the immutable flag.
            assert!(
                std::env::var_os("CI").is_none() && std::env::var_os("WARDGATE_NO_SKIP").is_none(),
                "cannot make a segment immutable with chattr"
            );
            for (p, _) in &first_files {
                std::fs::remove_file(p).unwrap();
            }
        }
        log.shutdown().await;
        drop(log);
        // A restart continues the chain past the pruned history.
        let log = AuditLog::open(settings()).unwrap();
        log.append(sample(99)).await.unwrap();
        log.shutdown().await;
        assert!(verify_dir(dir.path()).is_ok());
        let anchor = read_anchor(dir.path()).unwrap().unwrap();
        assert_eq!(anchor.last_pruned_seq, pruned.last_pruned_seq);
    }
}
