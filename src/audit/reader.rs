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
use super::segment::list_segments;

/// How a lookup went, for the report and the benchmark.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LookupStats {
    pub segments: u64,
    pub segments_indexed: u64,
    pub segments_scanned: u64,
    pub lines_read: u64,
}

fn mentions(record: &Value, subject: &str) -> bool {
    record["subjects"]
        .as_array()
        .is_some_and(|s| s.iter().any(|v| v.as_str() == Some(subject)))
}

/// Every record whose `subjects` contain `subject`, in log order.
pub fn records_mentioning(dir: &Path, subject: &str) -> io::Result<(Vec<Value>, LookupStats)> {
    let mut out = Vec::new();
    let mut stats = LookupStats::default();
    for (n, path) in list_segments(dir)? {
        stats.segments += 1;
        let offsets = index::read_seal(dir, n).and_then(|_| index::lookup(dir, n, subject));
        match offsets {
            Some(offsets) => {
                stats.segments_indexed += 1;
                let mut reader = BufReader::new(File::open(&path)?);
                let mut line = Vec::new();
                for off in offsets {
                    reader.seek(SeekFrom::Start(off))?;
                    line.clear();
                    reader.read_until(b'\n', &mut line)?;
                    stats.lines_read += 1;
                    if let Ok(v) = serde_json::from_slice::<Value>(&line)
                        && mentions(&v, subject)
                    {
                        out.push(v);
                    }
                }
            }
            None => {
                stats.segments_scanned += 1;
                scan_segment(&path, subject, &mut out, &mut stats)?;
            }
        }
    }
    Ok((out, stats))
}

/// The same answer by reading every line of every segment.
pub fn scan_all(dir: &Path, subject: &str) -> io::Result<(Vec<Value>, LookupStats)> {
    let mut out = Vec::new();
    let mut stats = LookupStats::default();
    for (_, path) in list_segments(dir)? {
        stats.segments += 1;
        stats.segments_scanned += 1;
        scan_segment(&path, subject, &mut out, &mut stats)?;
    }
    Ok((out, stats))
}

fn scan_segment(
    path: &Path,
    subject: &str,
    out: &mut Vec<Value>,
    stats: &mut LookupStats,
) -> io::Result<()> {
    let needle = format!("\"{subject}\"");
    let mut reader = BufReader::new(File::open(path)?);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        stats.lines_read += 1;
        // Cheap substring test first; parse only lines that can match.
        if line.contains(&needle)
            && let Ok(v) = serde_json::from_str::<Value>(&line)
            && mentions(&v, subject)
        {
            out.push(v);
        }
    }
    Ok(())
}
