//! Subject access at scale: generate N audit records (default 10 million) through the real
//! writer and sealing, then time one subject's lookup through the index against a full scan of
//! the same log. Run with `bash loadtest/sar_bench.sh` (release build; needs ~8 GB of disk for
//! 10 million records).
//!
//!   cargo run --release --example sar_bench -- --dir /var/tmp/wardgate-sar --records 10000000
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark tool"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use wardgate::audit::{
    AuditLog, AuditRecord, AuditSettings, Caller, Decision, Durability, RecordKind,
};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

/// A plausible access record: most are pages of a walk sheet, some reads, some refusals.
fn record(rng: &mut rand_chacha::ChaCha8Rng, n: u64, electors: u64) -> AuditRecord {
    let refused = rng.random_bool(0.15);
    let subjects: Vec<String> = if refused {
        Vec::new()
    } else {
        let page = if rng.random_bool(0.3) {
            1
        } else {
            rng.random_range(5..25)
        };
        let start = rng.random_range(0..electors);
        (0..page)
            .map(|i| format!("VF-{:07}", (start + i * 7) % electors))
            .collect()
    };
    AuditRecord {
        ts: "2026-11-23T10:00:00.000Z".to_owned(),
        request_id: format!("{n:032x}"),
        client_request_id: None,
        kind: RecordKind::Access,
        caller: Some(Caller {
            subject: format!("user-{}", rng.random_range(0..5000)),
            role: "councillor".into(),
            unit: "BR-CROSS-GATES-WHINMOOR".into(),
            token_id: format!("{:016x}", rng.random::<u64>()),
        }),
        client_addr: Some("10.1.2.3".into()),
        purpose: Some("canvassing".into()),
        lawful_basis: Some("public_task".into()),
        dataset: Some("voter".into()),
        route: Some("voter.list".into()),
        method: "GET".into(),
        path: "/voter/electors".into(),
        decision: if refused {
            Decision::Deny
        } else {
            Decision::Allow
        },
        policy_ids: vec!["geo.within-grants".into(), "purpose.granted".into()],
        reason: refused.then(|| "forbidden_by_policy".to_owned()),
        status: if refused { 403 } else { 200 },
        fields: if refused {
            vec![]
        } else {
            vec![
                "elector_id".into(),
                "first_name".into(),
                "surname".into(),
                "address_line1".into(),
                "postcode".into(),
            ]
        },
        subjects: subjects.into(),
        fields_by_subject: None,
        rows_withheld: 0,
        withheld_target: None,
        latency_us: 900,
        detail: None,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let dir = PathBuf::from(arg("--dir", "/var/tmp/wardgate-sar-bench"));
    let records: u64 = arg("--records", "10000000").parse().unwrap();
    let electors: u64 = arg("--electors", "2000000").parse().unwrap();
    let existing = wardgate::audit::verify_dir(&dir)
        .map(|r| r.records)
        .unwrap_or(0);
    if existing < records {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "generating {records} audit records in {} ...",
            dir.display()
        );
        let started = Instant::now();
        let log = AuditLog::open(AuditSettings {
            dir: dir.clone(),
            durability: Durability::PageCache,
            max_batch: 4096,
            commit_window: std::time::Duration::ZERO,
            segment_max_bytes: 64 << 20,
            seal_client_addr: false,
        })
        .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut inflight = tokio::task::JoinSet::new();
        for n in 0..records {
            let log = log.clone();
            let r = record(&mut rng, n, electors);
            inflight.spawn(async move { log.append(r).await.unwrap() });
            if inflight.len() >= 8192 {
                while inflight.len() > 4096 {
                    inflight.join_next().await;
                }
            }
        }
        while inflight.join_next().await.is_some() {}
        log.shutdown().await;
        eprintln!(
            "generated in {:.1} s; waiting for the last segments to be sealed ...",
            started.elapsed().as_secs_f64()
        );
    }
    // Seal whatever is still unsealed (the writer seals in the background).
    let segments: Vec<u64> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("seg-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect();
    let newest = segments.iter().copied().max().unwrap_or(0);
    for n in &segments {
        if *n < newest && wardgate::audit::index::read_seal(&dir, *n).is_none() {
            wardgate::audit::index::seal(&dir, *n).unwrap();
        }
    }
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "log: {records} records, {} segments, {:.2} GB on disk (segments + indexes)",
        segments.len(),
        bytes as f64 / 1e9
    );

    let subjects = ["VF-0000007", "VF-0123456", "VF-1999993"];
    for s in subjects {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let (r, _) = wardgate::audit::reader::records_mentioning(&dir, s).unwrap();
            times.push(t.elapsed());
            found = r.len();
        }
        println!(
            "indexed lookup {s}: {found} records, median {:.1} ms of 5 runs",
            median(times).as_secs_f64() * 1e3
        );
    }
    let t = Instant::now();
    let (r, stats) = wardgate::audit::reader::scan_all(&dir, subjects[0]).unwrap();
    let scan = t.elapsed();
    println!(
        "full scan {}: {} records, {:.1} s ({} lines read)",
        subjects[0],
        r.len(),
        scan.as_secs_f64(),
        stats.lines_read
    );
}
