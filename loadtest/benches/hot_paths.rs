//! Micro-benchmarks of the request path's hot parts (issue 7): token verification, one Cedar
//! decision, the row and field filter against the naive `serde_json::Value` round trip, and an
//! audit commit in both durability modes.
//!
//! Run: `cargo bench --bench hot_paths` (a criterion filter narrows it, e.g. `-- filter/`).
//! Everything runs on the shipped policy pack, registers and synthetic demo data, materialised
//! into a temp dir exactly as `wardgate demo` does, and loaded through the same start-up checks
//! as `wardgate serve`. Audit benchmarks write under `$TMPDIR` (default `/tmp`): set `TMPDIR` to
//! put them on the disk whose fsync you want to price.
//!
//! After criterion's own report, a real bench run (`cargo bench`, not `cargo test`) prints a
//! short summary with the filter's speed-up over the naive approach, measured back to back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark harness: a broken fixture should stop the run loudly"
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use serde_json::Value;
use wardgate::audit::{
    AuditLog, AuditRecord, AuditSettings, Caller, Decision, Durability, RecordKind,
};
use wardgate::auth::{KnownNames, Principal, Verifier};
use wardgate::catalog::{Catalog, Dataset};
use wardgate::config::{AuthConfig, Config};
use wardgate::decisions::{Decider, DecisionCache, asker_key};
use wardgate::demo::{self, data};
use wardgate::filter::{self, FilterContext, RecordDecision, RegisterFlags};
use wardgate::policy::{Ask, PolicyEngine, RecordAttrs, RequestAction};
use wardgate::token::Signer;

const DATASET: &str = "voter";
/// The councillor persona's ward (`demo::PERSONAS`).
const HOME_WARD: &str = "E05011391";
const PAGE_SIZES: [usize; 2] = [100, 1000];

/// Who asks, and the pages they get: one per page size, every record inside their areas.
struct Asker {
    label: &'static str,
    purpose: &'static str,
    principal: std::sync::Arc<Principal>,
    lawful_basis: String,
    ask: Ask,
    pages: Vec<(usize, Vec<u8>)>,
}

struct Fixture {
    _dir: tempfile::TempDir,
    verifier: Verifier,
    /// To build a verifier with an empty token cache: the "cold" case.
    auth: AuthConfig,
    known: KnownNames,
    policy: PolicyEngine,
    catalog: Catalog,
    categories: BTreeSet<String>,
    tokens: BTreeMap<String, String>,
    callers: Vec<Asker>,
    /// The rights register the filter reads (`register`).
    register: RegisterFlags,
}

impl Fixture {
    fn dataset(&self) -> &Dataset {
        &self.catalog.datasets[DATASET]
    }

    /// `c`'s decisions through the real engine, in front of `cache`.
    fn decider<'a>(&'a self, c: &'a Asker, cache: &'a DecisionCache) -> Decider<'a> {
        let asker = asker_key(&c.principal, c.purpose, &c.lawful_basis);
        Decider::new(
            &self.policy,
            cache,
            &c.ask,
            asker,
            DATASET,
            &self.categories,
        )
    }

    /// The filter's context for the dataset today, with the fixture's rights register.
    fn filter_context(&self) -> FilterContext<'_> {
        FilterContext::new(self.dataset(), &self.register)
    }
}

/// A rights register of `REGISTER_SUBJECTS` flagged electors, none of them on the benchmark's
/// pages: what every record pays to be looked up in a register of a realistic size (a few per
/// cent of a constituency's electors carry an objection, a restriction or a withdrawn
/// consent), while the pages' decisions, and so the output, stay the naive approach's.
fn register() -> RegisterFlags {
    (0..REGISTER_SUBJECTS)
        .map(|i| {
            let kind = wardgate::controls::KINDS[i % wardgate::controls::KINDS.len()];
            (format!("VF-{:07}", 9_000_000 + i), vec![kind.to_owned()])
        })
        .collect()
}

/// Flagged subjects in the benchmark's rights register.
const REGISTER_SUBJECTS: usize = 2_000;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let path = demo::materialise(dir.path(), addr, addr, addr).unwrap();
    let cfg = Config::load(&path).unwrap();
    let checked = wardgate::startup::check(&cfg).unwrap();
    let signer = Signer::from_config(cfg.signing.as_ref().unwrap()).unwrap();
    let tokens = demo::mint_tokens(&signer, now()).unwrap();
    let known = KnownNames {
        roles: checked.catalog.roles.keys().cloned().collect(),
        areas: checked.geography.areas().map(|a| a.id.clone()).collect(),
        purposes: checked.catalog.purposes.keys().cloned().collect(),
    };
    let catalog = checked.catalog;
    let dataset = &catalog.datasets[DATASET];
    let categories: BTreeSet<String> = dataset.fields.values().cloned().collect();

    // 36 polling districts, 5 of them in the home ward: 7,500 electors give the councillor a
    // full 1,000-record page from their own ward.
    let settings = data::GenSettings {
        electors: 7_500,
        ..data::GenSettings::default()
    };
    let generated = data::generate(&settings, demo::AREAS).unwrap();
    let ward: Vec<&Value> = generated
        .electors
        .iter()
        .filter(|r| r["ward"] == HOME_WARD)
        .collect();
    let nation: Vec<&Value> = generated.electors.iter().collect();

    let mut callers = Vec::new();
    for (label, persona, purpose, pool) in [
        ("analyst_profiling", "analyst", "profiling", &nation),
        ("councillor_canvassing", "councillor", "canvassing", &ward),
    ] {
        let principal = checked.verifier.verify(&tokens[persona], now()).unwrap();
        let lawful_basis = catalog.purposes[purpose].lawful_basis.clone();
        let ask = checked
            .policy
            .ask(Arc::clone(&principal), purpose, &lawful_basis);
        let pages = PAGE_SIZES
            .iter()
            .map(|&n| {
                assert!(pool.len() >= n, "only {} records for {label}", pool.len());
                (n, page_body(&pool[..n]))
            })
            .collect();
        callers.push(Asker {
            label,
            purpose,
            principal,
            lawful_basis,
            ask,
            pages,
        });
    }
    Fixture {
        _dir: dir,
        verifier: checked.verifier,
        auth: cfg.auth.clone(),
        known,
        policy: checked.policy,
        catalog,
        categories,
        tokens,
        callers,
        register: register(),
    }
}

/// The upstream's page shape: `{"records":[...],"page":1,"per_page":N,"next_page":2}`.
fn page_body(records: &[&Value]) -> Vec<u8> {
    let mut out = b"{\"records\":[".to_vec();
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, r).unwrap();
    }
    out.extend_from_slice(
        format!(
            "],\"page\":1,\"per_page\":{},\"next_page\":2}}",
            records.len()
        )
        .as_bytes(),
    );
    out
}

// ---- the two filters under comparison ----

/// What the gateway does per list request: the caller's memo from the pool (warm after the
/// first page) in front of the shared decision cache, then `filter_page` over the raw bytes.
#[inline(never)] // a symbol of its own, for `instructions.sh`
fn wardgate_filter(fx: &Fixture, c: &Asker, cache: &DecisionCache, body: &[u8]) -> Vec<u8> {
    let decider = fx.decider(c, cache);
    let cx = fx.filter_context();
    let asker = asker_key(&c.principal, c.purpose, &c.lawful_basis);
    let mut memo = cache.memos.take(asker, DATASET);
    let decide = &mut |a: &_| decider.decide(a);
    let (out, d) =
        filter::filter_page(body, filter::Envelope::Records, &cx, decide, &mut memo).unwrap();
    black_box(d);
    out
}

/// The naive approach with the same decisions: parse into a `Value` tree, read the policy
/// attributes out of it, drop and strip, serialise the tree again. Decisions are memoised
/// per distinct attributes within the page, in front of the same shared cache.
#[inline(never)] // a symbol of its own, for `instructions.sh`
fn naive_filter(fx: &Fixture, c: &Asker, cache: &DecisionCache, body: &[u8]) -> Vec<u8> {
    let decider = fx.decider(c, cache);
    let mut local: HashMap<RecordAttrs, Arc<RecordDecision>> = HashMap::new();
    let ds = fx.dataset();
    let today = filter::today();
    let mut page: Value = serde_json::from_slice(body).unwrap();
    let mut subjects = Vec::new();
    let mut fields = BTreeSet::new();
    let records = page
        .get_mut("records")
        .and_then(Value::as_array_mut)
        .unwrap();
    records.retain_mut(|rec| {
        let Some((subject, attrs)) = value_attrs(rec, ds, today) else {
            return false;
        };
        let verdict = local
            .entry(attrs)
            .or_insert_with_key(|a| decider.decide(a))
            .clone();
        if !verdict.allowed {
            return false;
        }
        let Some(obj) = rec.as_object_mut() else {
            return false;
        };
        obj.retain(|k, _| {
            ds.fields
                .get(k)
                .is_some_and(|cat| verdict.categories.contains(cat))
        });
        for k in obj.keys() {
            if !fields.contains(k) {
                fields.insert(k.clone());
            }
        }
        subjects.push(subject);
        true
    });
    black_box((subjects, fields));
    serde_json::to_vec(&page).unwrap()
}

/// `filter::record_attrs`, over a `Value` instead of raw bytes.
fn value_attrs(rec: &Value, ds: &Dataset, today: i64) -> Option<(String, RecordAttrs)> {
    let scalar = |v: &Value| match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let subject = scalar(rec.get(&ds.subject_field)?)?;
    let mut area = String::new();
    let mut rest = ds.area.as_str();
    while let Some(start) = rest.find('{') {
        let end = start + rest[start..].find('}')?;
        area.push_str(&rest[..start]);
        area.push_str(&scalar(rec.get(&rest[start + 1..end])?)?);
        rest = &rest[end + 1..];
    }
    area.push_str(rest);
    let strings = |field: &Option<String>| -> Option<BTreeSet<String>> {
        match field {
            None => Some(BTreeSet::new()),
            Some(f) => rec
                .get(f)?
                .as_array()?
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect(),
        }
    };
    let markers = strings(&ds.markers_field)?;
    let mut flags = strings(&ds.flags_field)?;
    if let Some(f) = &ds.attainer_field {
        let under_16 = match rec.get(f)? {
            Value::Null => false,
            Value::String(s) => filter::under_16_on(s, today)?,
            _ => return None,
        };
        if under_16 {
            flags.insert("under_16".to_owned());
        }
    }
    let consented = match &ds.consents_field {
        None => BTreeSet::new(),
        Some(f) => rec
            .get(f)?
            .as_object()?
            .iter()
            .filter(|(_, c)| {
                c.get("given_at").is_some_and(|g| !g.is_null())
                    && c.get("withdrawn_at").is_none_or(Value::is_null)
            })
            .map(|(k, _)| k.clone())
            .collect(),
    };
    let tps_fresh = match &ds.tps_field {
        None => false,
        Some(f) => match rec.get(f)? {
            Value::Null => false,
            Value::String(s) => {
                let days = filter::days_from_iso_date(s)?;
                today - days <= i64::from(ds.tps_max_age_days) && days <= today
            }
            _ => return None,
        },
    };
    Some((
        subject,
        RecordAttrs {
            area,
            markers,
            flags,
            consented,
            tps_fresh,
        },
    ))
}

/// Both filters must disclose exactly the same thing, or the comparison means nothing.
fn check_same_output(fx: &Fixture, cache: &DecisionCache) {
    for c in &fx.callers {
        for (n, body) in &c.pages {
            let fast: Value = serde_json::from_slice(&wardgate_filter(fx, c, cache, body)).unwrap();
            let naive: Value = serde_json::from_slice(&naive_filter(fx, c, cache, body)).unwrap();
            assert_eq!(
                fast, naive,
                "{}: the naive baseline disagrees with filter_page on {n} records",
                c.label
            );
            let kept = fast["records"].as_array().map_or(0, Vec::len);
            eprintln!(
                "fixture {}/{n}: {} bytes in, {} records kept, {} bytes out",
                c.label,
                body.len(),
                kept,
                serde_json::to_vec(&fast).unwrap().len()
            );
        }
    }
}

/// The decision for a page's first record, through the real engine.
fn first_decision(
    fx: &Fixture,
    c: &Asker,
    cache: &DecisionCache,
    body: &[u8],
) -> Arc<RecordDecision> {
    let page: Value = serde_json::from_slice(body).unwrap();
    let (_, attrs) = value_attrs(&page["records"][0], fx.dataset(), filter::today()).unwrap();
    fx.decider(c, cache).decide(&attrs)
}

// ---- benchmark groups ----

fn bench_token(c: &mut Criterion, fx: &Fixture) {
    let mut g = c.benchmark_group("token");
    let token = &fx.tokens["analyst"];
    let header = format!("Bearer {token}");
    let t = now();
    // Cold: a verifier whose token cache is empty, so a full ES256 verification (building the
    // verifier is set-up, not timed).
    g.bench_function("verify_es256_cold", |b| {
        b.iter_batched_ref(
            || Verifier::from_config(&fx.auth, fx.known.clone(), None).unwrap(),
            |v| v.verify(black_box(token), t).unwrap(),
            criterion::BatchSize::PerIteration,
        )
    });
    // Cached: the same token again, as a caller sends it with every request.
    fx.verifier.verify(token, t).unwrap();
    g.bench_function("verify_es256_cached", |b| {
        b.iter(|| fx.verifier.verify(black_box(token), t).unwrap())
    });
    g.bench_function("verify_header_es256_cached", |b| {
        b.iter(|| {
            fx.verifier
                .verify_header(Some(black_box(header.as_bytes())), t)
                .unwrap()
        })
    });
    g.finish();
}

fn bench_cedar(c: &mut Criterion, fx: &Fixture) {
    let mut g = c.benchmark_group("cedar");
    let ds = fx.dataset();
    for caller in &fx.callers {
        let body = &caller.pages[0].1;
        let page: Value = serde_json::from_slice(body).unwrap();
        let (_, attrs) = value_attrs(&page["records"][0], ds, filter::today()).unwrap();
        // What a request whose decision is not memoised pays: a fresh ask, its Cedar side
        // built by the decision (`decide_request` below reuses one already built, so the
        // difference is the build; a memoised request builds nothing).
        g.bench_function(
            BenchmarkId::new("ask_then_decide_request", caller.label),
            |b| {
                b.iter(|| {
                    let ask = fx.policy.ask(
                        Arc::clone(&caller.principal),
                        caller.purpose,
                        &caller.lawful_basis,
                    );
                    fx.policy
                        .decide_request(&ask, RequestAction::List, DATASET, &[])
                })
            },
        );
        g.bench_function(BenchmarkId::new("decide_request", caller.label), |b| {
            b.iter(|| {
                fx.policy
                    .decide_request(&caller.ask, RequestAction::List, DATASET, &[])
            })
        });
        g.bench_function(BenchmarkId::new("decide_record", caller.label), |b| {
            b.iter(|| {
                fx.policy
                    .decide_record(&caller.ask, DATASET, black_box(&attrs), false)
            })
        });
        // One Cedar evaluation per field category of the dataset.
        let id = format!("{}/{}_categories", caller.label, fx.categories.len());
        g.bench_function(BenchmarkId::new("allowed_categories", id), |b| {
            b.iter(|| {
                fx.policy.allowed_categories(
                    &caller.ask,
                    DATASET,
                    black_box(&attrs),
                    &fx.categories,
                    false,
                )
            })
        });
        let cache = DecisionCache::default();
        g.bench_function(BenchmarkId::new("memo_shared_hit", caller.label), |b| {
            b.iter_batched_ref(
                || fx.decider(caller, &cache),
                |d| d.decide(black_box(&attrs)),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn bench_filter(c: &mut Criterion, fx: &Fixture, cache: &DecisionCache) {
    let mut g = c.benchmark_group("filter");
    for caller in &fx.callers {
        for (n, body) in &caller.pages {
            g.throughput(Throughput::Bytes(body.len() as u64));
            let id = format!("{}/{n}", caller.label);
            g.bench_with_input(BenchmarkId::new("filter_page", &id), body, |b, body| {
                b.iter(|| wardgate_filter(fx, caller, cache, black_box(body)))
            });
            g.bench_with_input(BenchmarkId::new("naive_value", &id), body, |b, body| {
                b.iter(|| naive_filter(fx, caller, cache, black_box(body)))
            });
            // The filter's first page for a caller without Cedar or the shared cache: a fresh
            // memo, and every record gets the first record's decision (so a few records more
            // are kept than really are).
            let constant = first_decision(fx, caller, cache, body);
            g.bench_with_input(
                BenchmarkId::new("filter_page_constant_decision", &id),
                body,
                |b, body| {
                    let cx = fx.filter_context();
                    b.iter(|| {
                        filter::filter_page(
                            black_box(body),
                            filter::Envelope::Records,
                            &cx,
                            &mut |_| constant.clone(),
                            &mut filter::Memo::default(),
                        )
                        .unwrap()
                    })
                },
            );
            if *n == 1000 {
                bench_export_lines(&mut g, fx, caller, cache, body, &id);
            }
        }
    }
    g.finish();
}

/// The export's path over the same records: NDJSON lines, filtered in whole lines as the
/// upstream body's frames gather (`export.rs`), with one memo for the export, warm from the
/// records before (an export of a constituency has read thousands before these). In one
/// piece, and arriving in small (16 KiB) frames filtered in batches (`export::ready`) as
/// the export does, to price the per-line and per-batch parts against `filter_page`.
fn bench_export_lines(
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    fx: &Fixture,
    caller: &Asker,
    cache: &DecisionCache,
    body: &[u8],
    id: &str,
) {
    let page: Value = serde_json::from_slice(body).unwrap();
    let mut lines = Vec::new();
    for r in page["records"].as_array().unwrap() {
        serde_json::to_writer(&mut lines, r).unwrap();
        lines.push(b'\n');
    }
    g.throughput(Throughput::Bytes(lines.len() as u64));
    for (label, frame) in [
        ("export_lines_whole", lines.len()),
        ("export_lines_16k", 16 << 10),
    ] {
        let mut memo = filter::Memo::default();
        g.bench_with_input(BenchmarkId::new(label, id), &lines, |b, lines| {
            b.iter(|| wardgate_lines(fx, caller, cache, black_box(lines), frame, &mut memo))
        });
    }
}

/// The batching of `export::Lines` (crate-private), without the network: `export::ready`
/// says what to filter when.
fn wardgate_lines(
    fx: &Fixture,
    c: &Asker,
    cache: &DecisionCache,
    lines: &[u8],
    frame: usize,
    memo: &mut filter::Memo,
) -> Vec<u8> {
    let decider = fx.decider(c, cache);
    let cx = fx.filter_context();
    memo.new_chunk();
    let mut d = filter::Disclosure::default();
    let mut out = Vec::with_capacity(lines.len());
    let mut run = |text: &[u8]| {
        filter::filter_lines(
            text,
            &cx,
            &mut |a| decider.decide(a),
            memo,
            &mut out,
            &mut d,
        )
        .unwrap()
    };
    let mut partial = Vec::new();
    for piece in lines.chunks(frame) {
        partial.extend_from_slice(piece);
        if let Some(end) = wardgate::export::ready(&partial, false) {
            run(&partial[..end]);
            partial.drain(..end + 1);
        }
    }
    if let Some(end) = wardgate::export::ready(&partial, true) {
        run(&partial[..end]);
    }
    black_box(d);
    out
}

fn audit_record(subjects: usize) -> AuditRecord {
    AuditRecord {
        ts: AuditRecord::now_ts(),
        request_id: format!("{:032x}", 0xfeed_u128),
        client_request_id: None,
        kind: RecordKind::Access,
        caller: Some(Caller {
            subject: "demo-analyst".to_owned(),
            role: "analyst".to_owned(),
            unit: "NATIONAL-DATA".to_owned(),
            token_id: format!("{:032x}", 0xbeef_u128),
        }),
        client_addr: Some("127.0.0.1".to_owned()),
        purpose: Some("profiling".to_owned()),
        lawful_basis: Some("legitimate_interests".to_owned()),
        dataset: Some(DATASET.to_owned()),
        route: Some("voter.list".to_owned()),
        method: "GET".to_owned(),
        path: "/voter/electors".to_owned(),
        decision: Decision::Allow,
        policy_ids: vec![
            "fields.profiling".to_owned(),
            "datasets.voter-list".to_owned(),
        ],
        reason: None,
        status: 200,
        subjects: (0..subjects).map(|i| format!("EL-{i:08}")).collect(),
        fields: vec!["elector_id".to_owned(), "support_score".to_owned()],
        fields_by_subject: None,
        rows_withheld: 3,
        withheld_target: None,
        latency_us: 850,
        detail: None,
    }
}

fn bench_audit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("audit");
    // One record per 100-record page: 100 subject ids.
    let record = audit_record(100);
    for (mode, durability) in [
        ("fsync", Durability::Fsync),
        ("page_cache", Durability::PageCache),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(AuditSettings {
            dir: dir.path().join("audit"),
            durability,
            max_batch: 1024,
            commit_window: std::time::Duration::ZERO,
            segment_max_bytes: 64 * 1024 * 1024,
            seal_client_addr: false,
        })
        .unwrap();
        // A lone request: its own commit (and fsync) each time.
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("append_1", mode), |b| {
            b.iter(|| rt.block_on(log.append(record.clone())).unwrap())
        });
        // 64 requests in flight at once: group commit shares writes (and fsyncs) among them.
        g.throughput(Throughput::Elements(64));
        g.bench_function(BenchmarkId::new("append_64_concurrent", mode), |b| {
            b.iter(|| {
                // Every append must have been written: a refused one is fast and not a commit.
                let done = rt.block_on(futures_util::future::join_all(
                    (0..64).map(|_| log.append(record.clone())),
                ));
                done.into_iter().for_each(|r| {
                    r.unwrap();
                })
            })
        });
        rt.block_on(log.shutdown());
    }
    g.finish();
}

// ---- the speed-up summary ----

/// Runs `f` repeatedly for about `budget`; returns seconds per call.
fn time_per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget || n < 10 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(n)
}

fn summary(fx: &Fixture, cache: &DecisionCache) {
    println!();
    println!("== filter vs naive (same decisions, same output; back to back, ~1 s each)");
    println!(
        "{:<24} {:>7} {:>10} {:>14} {:>14} {:>9}",
        "caller", "records", "bytes in", "filter MB/s", "naive MB/s", "speed-up"
    );
    for caller in &fx.callers {
        for (n, body) in &caller.pages {
            let budget = Duration::from_secs(1);
            let fast = time_per_call(budget, || {
                black_box(wardgate_filter(fx, caller, cache, body));
            });
            let naive = time_per_call(budget, || {
                black_box(naive_filter(fx, caller, cache, body));
            });
            let mbps = |s: f64| body.len() as f64 / s / 1e6;
            println!(
                "{:<24} {:>7} {:>10} {:>14.1} {:>14.1} {:>8.2}x",
                caller.label,
                n,
                body.len(),
                mbps(fast),
                mbps(naive),
                naive / fast
            );
        }
    }
    println!("(issue 7 goal: filter at least 5x the naive approach)");
}

fn main() {
    let fx = fixture();
    let cache = DecisionCache::default();
    check_same_output(&fx, &cache);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_token(&mut c, &fx);
    bench_cedar(&mut c, &fx);
    bench_filter(&mut c, &fx, &cache);
    bench_audit(&mut c);
    c.final_summary();
    // `cargo bench` passes `--bench`; `cargo test --benches` runs each benchmark once, without
    // it; `--profile-time` (as `instructions.sh` runs it) wants only the benchmark's own calls.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--profile-time") {
        summary(&fx, &cache);
    }
}
