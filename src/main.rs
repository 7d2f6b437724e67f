//! The `wardgate` command: argument parsing and dispatch only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use wardgate::auth::Claims;
use wardgate::config::Config;
use wardgate::token::Signer;
use wardgate::{audit, demo, startup};

/// mimalloc rather than glibc's malloc: a request's buffers and its audit record are made on a
/// runtime worker and freed on the audit writer's thread, and glibc serialises such frees on
/// the allocating arena's lock (futex waits and context switches in the load test's profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wardgate",
    version,
    about = "A purpose-limiting, auditing gateway for voter and membership data"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the data and admin planes with a configuration file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the embedded demo: synthetic datastores, personas and tokens, no external services.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Where the demo writes its configuration, keys, policies (replacing `policies/tests`
        /// with this build's), registers and audit log.
        #[arg(long, default_value = "wardgate-demo")]
        data_dir: PathBuf,
        /// How many synthetic electors to generate.
        #[arg(long, default_value_t = 4000)]
        electors: usize,
    },
    /// Check configuration, keys, area and asset registers, Cedar schema and policies, and that
    /// every field each datastore returns is in the asset register; serve nothing.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
        /// Do not contact the datastores (skips the unclassified-field check).
        #[arg(long)]
        offline: bool,
    },
    /// Mint a signed token with the configuration's `[signing]` key (demos, tests, tooling).
    Token {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        sub: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        unit: String,
        /// Comma-separated area ids (GSS codes, `LA/PD`, party units).
        #[arg(long, value_delimiter = ',')]
        areas: Vec<String>,
        /// Comma-separated purposes.
        #[arg(long, value_delimiter = ',')]
        purposes: Vec<String>,
        /// Lifetime, e.g. `8h`.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
    /// Subject access report (§10.2): every disclosure of SUBJECT, as JSON and HTML files.
    Sar {
        subject: String,
        #[arg(long, short)]
        config: PathBuf,
        /// Where to write `sar-SUBJECT.json` and `sar-SUBJECT.html`.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// The request's reference (e.g. `SAR-2026-0142`), recorded with the retrieval.
        #[arg(long)]
        reference: Option<String>,
        /// An audit log to search, repeated for each replica's (each replica keeps its own
        /// log, and a report from fewer than all of them is incomplete). Default: the
        /// configuration's `audit.dir`.
        #[arg(long = "audit-dir")]
        audit_dirs: Vec<PathBuf>,
    },
    /// Work with the audit log on disk.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Remove sealed segments older than `audit.retention`, recording the prune in the log.
    /// Runs inside `serve` on its own schedule; use this when the gateway is stopped.
    Prune {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the last records and follow the log as it grows (Ctrl-C to stop).
    Tail {
        /// The audit directory (default: the one the configuration names).
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How many existing records to print first.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        /// Print what is there and stop instead of following.
        #[arg(long)]
        no_follow: bool,
        /// Print the log's own JSON lines instead of one-line summaries.
        #[arg(long)]
        json: bool,
        /// Only this principal (token subject).
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        dataset: Option<String>,
        #[arg(long)]
        purpose: Option<String>,
        /// allow, deny or error.
        #[arg(long)]
        decision: Option<String>,
    },
    /// Verify the hash chain of every segment; report the first broken record. With a witness
    /// (`--witness-url` and `--witness-key`), also check every head it saw: records cut from
    /// the log's end show only there. The witness is named here, by the auditor, and never
    /// taken from the gateway's configuration: that is on the host being checked.
    Verify {
        /// The audit directory (default: the one the configuration names).
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The witness's Redis URL, with the auditor's read-only credentials (better given in
        /// the environment than on the command line).
        #[arg(
            long,
            env = "WARDGATE_WITNESS_URL",
            hide_env_values = true,
            requires = "witness_key"
        )]
        witness_url: Option<String>,
        /// This log's list on the witness.
        #[arg(long, requires = "witness_url")]
        witness_key: Option<String>,
        /// How long the log is kept (`audit.retention`, e.g. 7years): witnessed records the log
        /// no longer holds must be older than this.
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<std::time::Duration>,
    },
}

fn main() -> ExitCode {
    // What the gateway writes (audit segments, the address keys, the controls journal, the
    // breach log, reports) holds personal data or secrets: none of it readable by other
    // accounts on the host, whatever umask the shell or the unit file left. The group may
    // read (a log shipper), not write.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o027));
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => serve(config).await,
        Command::Demo {
            listen,
            admin,
            data_dir,
            electors,
        } => {
            demo::run(
                demo::DemoOptions {
                    listen,
                    admin,
                    data_dir,
                    electors,
                },
                shutdown_signal(),
            )
            .await
        }
        Command::Validate { config, offline } => {
            let cfg = Config::load(&config)?;
            let checked = startup::check(&cfg)?;
            if !offline {
                let unknown = startup::probe_upstreams(&checked).await?;
                if !unknown.is_empty() {
                    anyhow::bail!(
                        "the datastores return fields the asset register `{}` does not classify: `{}` (they are stripped at run time; classify them)",
                        cfg.catalog_file.display(),
                        unknown.join("`, `")
                    );
                }
            }
            let tests = match checked.policy_tests {
                0 => "no policy tests".to_owned(),
                n => format!("{n} policy tests passed"),
            };
            println!(
                "ok: `{}` is valid: {} policies ({tests}), {} datasets, {} areas",
                config.display(),
                checked.policy.policy_count(),
                checked.catalog.datasets.len(),
                checked.geography.areas().count()
            );
            Ok(())
        }
        Command::Token {
            config,
            sub,
            role,
            unit,
            areas,
            purposes,
            ttl,
        } => {
            let cfg = Config::load(&config)?;
            let signing = cfg
                .signing
                .as_ref()
                .context("the configuration has no `[signing]` key")?;
            let signer = Signer::from_config(signing)?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if *ttl > cfg.auth.max_token_lifetime {
                anyhow::bail!(
                    "`--ttl {ttl}` is longer than `auth.max_token_lifetime` ({}): the gateway \
                     would refuse the token",
                    humantime::format_duration(cfg.auth.max_token_lifetime)
                );
            }
            let ttl = i64::try_from(ttl.as_secs()).context("`--ttl` is too long")?;
            let claims = Claims {
                iss: signer.issuer.clone(),
                aud: cfg.auth.audience.clone().into(),
                sub,
                jti: format!("{:032x}", rand::random::<u128>()),
                exp: now + ttl,
                nbf: now,
                iat: now,
                role,
                org_unit: unit,
                areas,
                purposes,
                grant_expires: None,
            };
            println!("{}", signer.sign(&claims)?);
            Ok(())
        }
        Command::Sar {
            subject,
            config,
            out,
            reference,
            audit_dirs,
        } => {
            if !wardgate::routes::subject_id(&subject) {
                anyhow::bail!(
                    "`{subject}` is not a subject id (letters, digits, `-`, `_`; not `export` or \
                     `aggregate`)"
                );
            }
            let cfg = Config::load(&config)?;
            let catalog = wardgate::catalog::Catalog::load(&cfg.catalog_file)?;
            // The log first: a running gateway owns it (and refuses it here), and owns the
            // controls' journal too, which opening mends (a torn last line) by writing.
            let log = open_cli_log(&cfg, &subject)?;
            let controls =
                wardgate::controls::Controls::open(&cfg.server.data_dir, None, Default::default())?;
            let dirs: Vec<&std::path::Path> = if audit_dirs.is_empty() {
                vec![cfg.audit.dir.as_path()]
            } else {
                audit_dirs.iter().map(PathBuf::as_path).collect()
            };
            let mut report =
                wardgate::sar::build_from(&dirs, &catalog, &subject, controls.placements(&subject))
                    .with_context(|| {
                        let all: Vec<String> =
                            dirs.iter().map(|d| d.display().to_string()).collect();
                        format!("cannot read the audit logs in `{}`", all.join("`, `"))
                    })?;
            // One replica's own log, of a deployment sharing its controls: the others' are not
            // in it, unless named with `--audit-dir`.
            report.other_replicas_not_searched = cfg.redis.is_some() && audit_dirs.is_empty();
            // The report is itself a disclosure: it is audited before it is written out.
            let basis = catalog
                .purposes
                .get("sar_fulfilment")
                .map(|p| p.lawful_basis.clone());
            audit_cli_report(log, &subject, report.disclosures.len(), reference, basis).await?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create `{}`", out.display()))?;
            let json = out.join(format!("sar-{subject}.json"));
            let html = out.join(format!("sar-{subject}.html"));
            std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("cannot write `{}`", json.display()))?;
            std::fs::write(&html, wardgate::sar::html(&report))
                .with_context(|| format!("cannot write `{}`", html.display()))?;
            println!(
                "{} disclosures of `{subject}` in {} log(s) ({} segments: {} through their index, {} scanned); wrote `{}` and `{}`",
                report.disclosures.len(),
                dirs.len(),
                report.lookup.segments,
                report.lookup.segments_indexed,
                report.lookup.segments_scanned,
                json.display(),
                html.display()
            );
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Prune { config },
        } => {
            let cfg = Config::load(&config)?;
            let keep = cfg
                .audit
                .retention
                .context("`audit.retention` is not set: nothing is ever pruned")?;
            let log = audit::AuditLog::open(audit::AuditSettings {
                dir: cfg.audit.dir.clone(),
                durability: cfg.audit.durability,
                max_batch: cfg.audit.max_batch,
                commit_window: cfg.audit.commit_window,
                segment_max_bytes: cfg.audit.segment_max_bytes,
                seal_client_addr: false,
            })?;
            let pruned = audit::prune::prune_and_record(&log, &cfg.audit.dir, keep).await;
            log.shutdown().await;
            match pruned? {
                Some(p) => println!(
                    "pruned segments {}..={} ({} records, through seq {}); the log records the prune",
                    p.first_segment, p.last_segment, p.records, p.last_pruned_seq
                ),
                None => println!("nothing older than the retention period"),
            }
            Ok(())
        }
        Command::Audit {
            command:
                AuditCommand::Tail {
                    dir,
                    config,
                    lines,
                    no_follow,
                    json,
                    principal,
                    dataset,
                    purpose,
                    decision,
                },
        } => {
            let dir = audit_dir(dir, config)?;
            let query: Vec<String> = [
                ("principal", principal),
                ("dataset", dataset),
                ("purpose", purpose),
                ("decision", decision),
            ]
            .into_iter()
            .filter_map(|(k, v)| {
                v.map(|v| {
                    format!(
                        "{k}={}",
                        percent_encoding::utf8_percent_encode(
                            &v,
                            percent_encoding::NON_ALPHANUMERIC
                        )
                    )
                })
            })
            .collect();
            let filter = wardgate::watch::feed::Filter::parse(Some(&query.join("&")))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut print = |l: &str| println!("{l}");
            audit::tail::tail(&dir, lines, !no_follow, &filter, json, &mut print, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    dir,
                    config,
                    witness_url,
                    witness_key,
                    retention,
                },
        } => {
            let dir = audit_dir(dir, config)?;
            let witness = witness_url.zip(witness_key);
            // The witness first: every head it holds was durable before the log is read.
            let heard = match &witness {
                Some((url, key)) => Some(audit::witness::read_all(url, key)?),
                None => None,
            };
            if let (Some((_, key)), Some(heard)) = (&witness, &heard) {
                if !heard.unreadable.is_empty() {
                    eprintln!(
                        "warning: witness entries {:?} of `{key}` are not chain heads (not written by a gateway); passed over",
                        heard.unreadable
                    );
                }
                if let Some((place, seq, before)) = heard.out_of_order.first() {
                    anyhow::bail!(
                        "witness entry {place} of `{key}` says seq {seq} after an entry that said seq {before}: one log's heads only rise, so it was not written by this log's gateway (or the log was restored from an older copy); {} such entries",
                        heard.out_of_order.len()
                    );
                }
            }
            let heads = heard.as_ref().map(|h| h.heads.clone()).unwrap_or_default();
            let report = audit::verify_against(&dir, &heads, retention)?;
            println!(
                "ok: {} records in {} segments verify; last seq {}, last hash {}",
                report.records, report.segments, report.last_seq, report.last_hash
            );
            match (&witness, &heard) {
                (Some((_, key)), Some(heard)) => {
                    if heard.heads.is_empty() && report.last_seq > 0 {
                        anyhow::bail!(
                            "the witness holds no head in `{key}`, though the log holds records up to seq {}: a wrong key, or a gateway that never published",
                            report.last_seq
                        );
                    }
                    println!(
                        "witness `{key}`: {} heads found in the log with their hashes, {} in its pruned part, none past its end; it vouches from seq {} on (records before it are not vouched for: never witnessed, or their heads trimmed from the list); the newest published at {} (by its writer's word)",
                        report.witnessed,
                        report.witnessed_pruned,
                        heard.heads.keys().next().copied().unwrap_or(0),
                        heard.last_published.as_deref().unwrap_or("-")
                    );
                    if let Some(anchor) = report.pruned_unwitnessed {
                        eprintln!(
                            "warning: the log was pruned up to seq {anchor} and the witness holds no head at or below it: whether the records pruned were older than the retention is not checked (the witness never saw them, or their heads were trimmed; keep the newest head at or below the prune anchor when trimming)"
                        );
                    }
                }
                _ => println!(
                    "note: no witness given; records cut from the end of the log would not show (README: The audit log)"
                ),
            }
            if !report.cuts_unrecorded.is_empty() {
                eprintln!(
                    "warning: recovery cut bytes from the log that no record says yet ({}): the gateway's next start records each; until then read the copy beside each note",
                    report.cuts_unrecorded.join(", ")
                );
            }
            if !report.kept_aside.is_empty() {
                println!(
                    "note: {} cop{} of bytes recovery cut from the log kept aside ({}), each named by a `segment_cut` record once recorded (or by its `.pending` note until then; a copy named by neither was made by a start that stopped before its note); whole lines in one may be acknowledged records the chain no longer holds, and are in no subject access report: settle each and remove it (README: The audit log)",
                    report.kept_aside.len(),
                    if report.kept_aside.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    report.kept_aside.join(", ")
                );
            }
            if !report.left_behind.is_empty() {
                println!(
                    "note: {} left behind the prune anchor by a prune that stopped before removing {} ({}): verified up to the anchor and already counted as pruned; the next prune removes {} once past the retention (give `--retention` to check that now)",
                    report.left_behind.len(),
                    if report.left_behind.len() == 1 {
                        "it"
                    } else {
                        "them"
                    },
                    report.left_behind.join(", "),
                    if report.left_behind.len() == 1 {
                        "it"
                    } else {
                        "them"
                    },
                );
            }
            if report.torn_tail {
                println!(
                    "note: the newest segment ends in a torn line (a write cut short by a crash, never acknowledged); the gateway trims it on start"
                );
            }
            Ok(())
        }
    }
}

/// `--dir`, or the audit directory `--config` names.
fn audit_dir(dir: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match (dir, config) {
        (Some(d), _) => Ok(d),
        (None, Some(c)) => Ok(Config::load(&c)?.audit.dir),
        (None, None) => anyhow::bail!("give `--dir DIR` or `--config FILE`"),
    }
}

/// The audit log, for the offline subject access report's record. Only a stopped gateway's
/// log can be appended to (one writer per log); while the gateway runs, the admin plane's
/// `GET /sar/{subject}` produces and audits the same report.
fn open_cli_log(cfg: &Config, subject: &str) -> anyhow::Result<audit::AuditLog> {
    audit::AuditLog::open(audit::AuditSettings {
        dir: cfg.audit.dir.clone(),
        durability: audit::Durability::Fsync,
        max_batch: 1,
        commit_window: std::time::Duration::ZERO,
        segment_max_bytes: cfg.audit.segment_max_bytes,
        seal_client_addr: false,
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\nthe report must be audited, and the running gateway owns the log: ask its admin plane instead \
             (`curl -H \"Authorization: Bearer $DPO_TOKEN\" http://ADMIN/sar/{subject}?format=html`)"
        )
    })
}

/// Appends the audit record of a subject access report produced on the command line.
async fn audit_cli_report(
    log: audit::AuditLog,
    subject: &str,
    disclosures: usize,
    reference: Option<String>,
    lawful_basis: Option<String>,
) -> anyhow::Result<()> {
    let operator = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    let mut record = audit::AuditRecord::system("cli.sar", "subject_access_report");
    record.kind = audit::RecordKind::Admin;
    record.caller = Some(audit::Caller {
        subject: format!("{}{operator}", wardgate::auth::LOCAL_PREFIX),
        role: "operator".to_owned(),
        unit: "-".to_owned(),
        token_id: "-".to_owned(),
    });
    record.purpose = Some("sar_fulfilment".to_owned());
    record.lawful_basis = lawful_basis;
    record.detail = Some(serde_json::json!({
        "subject_access_report_for": subject,
        "disclosures": disclosures,
        "reference": reference,
        "via": "wardgate sar",
    }));
    let appended = log.append(record).await;
    log.shutdown().await;
    appended
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("the report's audit record could not be written: {e}"))
}

async fn serve(config: PathBuf) -> anyhow::Result<()> {
    let hangups = wardgate::rekey::listen();
    let cfg = Config::load(&config)?;
    let (gw, tls) = startup::build(&cfg)?;
    let reloads = wardgate::rekey::start(&gw, hangups, cfg.server.file_check_interval);
    let data = TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", cfg.server.listen))?;
    let admin = TcpListener::bind(cfg.server.admin_listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", cfg.server.admin_listen))?;
    tracing::info!(data = %cfg.server.listen, admin = %cfg.server.admin_listen, tls = tls.is_some(), "wardgate serving");
    // A reload task that ends stops the gateway (exit status 1), for its supervisor to start it
    // again with reloads working (`rekey::start`).
    let broken = Arc::new(std::sync::OnceLock::new());
    let stop = {
        let broken = Arc::clone(&broken);
        async move {
            tokio::select! {
                () = shutdown_signal() => {}
                why = reloads => {
                    tracing::error!(%why, "stopping: nothing would be reloaded any more");
                    let _ = broken.set(why);
                }
            }
        }
    };
    startup::run(gw, data, admin, tls, stop, cfg.server.shutdown_grace).await?;
    match broken.get() {
        Some(why) => anyhow::bail!("stopped: {why}"),
        None => Ok(()),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
