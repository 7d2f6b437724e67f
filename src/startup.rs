//! Start-up: turn a validated [`Config`] into a running gateway, or refuse to start.
//!
//! [`build`] loads everything the request path needs (area register, asset register, keys,
//! Cedar schema and policies, the audit log) and fails with a message naming the file and the
//! problem if any of it is wrong; `wardgate validate` runs its [`check`] of every file the
//! configuration names, without serving, and not the state a running gateway opens after it
//! (the audit log, the controls journal, the breach log), whose faults only a start meets.
//! [`run`] takes its listeners and shutdown signal as inputs, so a test can start the whole
//! gateway on port 0, and flushes the audit log only after the last connection has drained.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::audit::{AuditLog, AuditSettings};
use crate::auth::{KnownNames, Verifier};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::geography::Geography;
use crate::policy::PolicyEngine;
use crate::proxy::Upstreams;
use crate::server_cert::ServerCert;
use crate::{admin, gateway, server};

/// Everything loaded and checked except the audit log, which `validate` must not open.
pub struct Checked {
    pub catalog: Catalog,
    pub geography: Geography,
    pub verifier: Verifier,
    pub policy: PolicyEngine,
    /// What the pack was read from, as `PolicySource::digests` gives it.
    pub policy_digest: Option<PackDigests>,
    /// How many of the pack's own tests it passed (none when it has none).
    pub policy_tests: usize,
    pub upstreams: Upstreams,
    /// The data plane's certificate (renewed on `SIGHUP`) and its acceptor, when it is TLS.
    pub server_cert: Option<Arc<ServerCert>>,
    pub tls: Option<TlsAcceptor>,
}

/// Loads and validates every file the configuration names; an error says which
/// configuration it was checking (each message names the key or the file it is about).
pub fn check(cfg: &Config) -> anyhow::Result<Checked> {
    check_files(cfg).with_context(|| {
        format!(
            "checking the configuration `{}` and the files it names",
            cfg.file.display()
        )
    })
}

fn check_files(cfg: &Config) -> anyhow::Result<Checked> {
    let geography = Geography::load(&cfg.areas_file)?;
    let catalog = Catalog::load(&cfg.catalog_file)?;
    for name in catalog.datasets.keys() {
        if !cfg.datasets.contains_key(name) {
            anyhow::bail!(
                "the asset register `{}` describes dataset `{name}`, but `datasets.{name}` \
                 gives no upstream",
                cfg.catalog_file.display()
            );
        }
    }
    for name in cfg.datasets.keys() {
        if !catalog.datasets.contains_key(name) {
            anyhow::bail!(
                "`datasets.{name}` is not in the asset register `{}`",
                cfg.catalog_file.display()
            );
        }
    }
    for purpose in crate::rights::ADMIN_PURPOSES {
        if !catalog.purposes.contains_key(purpose) {
            anyhow::bail!(
                "the admin plane acts under the purpose `{purpose}`, which the purpose catalogue `{}` does not define",
                cfg.catalog_file.display()
            );
        }
    }
    for role in crate::rights::ADMIN_ROLES {
        if !catalog.roles.contains_key(role) {
            anyhow::bail!(
                "the admin plane answers to the role `{role}` (rights requests, the security \
                 console), which the asset register `{}` does not define: no one could act on \
                 a rights request or an alert",
                cfg.catalog_file.display()
            );
        }
    }
    for role in cfg.quotas.keys() {
        if !catalog.roles.contains_key(role) {
            anyhow::bail!(
                "`quotas.{role}` names a role the asset register `{}` does not define",
                cfg.catalog_file.display()
            );
        }
    }
    for (rule, role) in cfg.watch.roles() {
        if !catalog.roles.contains_key(role) {
            anyhow::bail!(
                "`watch.rules.{rule}.limits.{role}` names a role the asset register `{}` does \
                 not define",
                cfg.catalog_file.display()
            );
        }
    }
    let known = KnownNames {
        roles: catalog.roles.keys().cloned().collect(),
        areas: geography.areas().map(|a| a.id.clone()).collect(),
        purposes: catalog.purposes.keys().cloned().collect(),
    };
    let jwks = match &cfg.auth.jwks_url {
        Some(url) => Some(crate::rekey::jwks::fetch_at_start(url)?),
        None => None,
    };
    let verifier = Verifier::from_config(&cfg.auth, known, jwks.as_deref())?;
    if let Some(signing) = &cfg.signing {
        check_signing(signing, &cfg.auth, &verifier)?;
    }
    let (policy, policy_tests, policy_digest) =
        PolicySource::of(cfg).load_digested(&catalog, &geography)?;
    if policy_digest.is_none() {
        tracing::warn!(policy_dir = %cfg.policy_dir.display(),
            "the policy pack changed while it was read (or a file of it cannot be read again): \
             the pack read is in force; once it is whole it is read again (on a change or SIGHUP)");
    }
    let upstreams = Upstreams::new(&cfg.datasets, cfg.server.max_response_bytes)?;
    if let Some(r) = &cfg.redis {
        crate::controls::load_key(r)?;
    }
    let server_cert = match &cfg.server.tls {
        Some(t) => Some(Arc::new(ServerCert::load(&t.cert_file, &t.key_file)?)),
        None => None,
    };
    let tls = server_cert.clone().map(server::tls_acceptor).transpose()?;
    Ok(Checked {
        catalog,
        geography,
        verifier,
        policy,
        policy_digest,
        policy_tests,
        upstreams,
        server_cert,
        tls,
    })
}

/// `[signing]` (what `wardgate token` signs with: demos, tooling, break-glass) is checked with
/// the rest, so that the key is not found unreadable, or its tokens refused, only when it is
/// needed: it must load, sign for an issuer the gateway trusts with an algorithm it accepts,
/// and match a trusted key of the same id, if one is configured in a file.
fn check_signing(
    signing: &crate::config::SigningConfig,
    auth: &crate::config::AuthConfig,
    verifier: &Verifier,
) -> anyhow::Result<()> {
    let signer = crate::token::Signer::from_config(signing).context("`[signing]`")?;
    if !auth.issuers.contains(&signing.issuer) {
        anyhow::bail!(
            "`signing.issuer` `{}` is not one of `auth.issuers` ({}): the gateway would refuse \
             every token it signs",
            signing.issuer,
            auth.issuers.join(", ")
        );
    }
    if !auth.algorithms.contains(&signing.algorithm) {
        anyhow::bail!(
            "`signing.algorithm` {:?} is not one of `auth.algorithms`: the gateway would \
             refuse every token it signs",
            signing.algorithm
        );
    }
    if let Some(key) = auth.keys.iter().find(|k| k.kid == signing.kid)
        && (key.algorithm != signing.algorithm || key.issuer != signing.issuer)
    {
        anyhow::bail!(
            "`signing.kid` `{}` is the id of the trusted key `{}`, which verifies {:?} tokens \
             of `{}`, not {:?} tokens of `{}`",
            signing.kid,
            key.public_key_file.display(),
            key.algorithm,
            key.issuer,
            signing.algorithm,
            signing.issuer
        );
    }
    // The key pair must be one: a token it signs must verify under the trusted key of its
    // id (a private key rotated without its public half would sign tokens all refused).
    let probe = crate::auth::Claims {
        iss: signing.issuer.clone(),
        aud: auth.audience.clone().into(),
        sub: "wardgate-start-probe".to_owned(),
        jti: "probe".to_owned(),
        exp: 0,
        nbf: 0,
        iat: 0,
        role: String::new(),
        org_unit: String::new(),
        areas: Vec::new(),
        purposes: Vec::new(),
        grant_expires: None,
    };
    let token = signer.sign(&probe).context("`[signing]`")?;
    verifier
        .key_verifies(&signing.kid, &signing.issuer, &token)
        .with_context(|| format!("`signing.kid` `{}`", signing.kid))
}

/// Raises the process's soft limit on open files towards what the listeners could need at
/// `max_connections` each, as far as the hard limit allows: the connection limit to use, lower
/// (and warned of) where the files allowed fall short. Each connection takes a descriptor,
/// and each data-plane request under way may hold another to its datastore: at the limit on
/// files `accept` fails (logged, retried) and datastores cannot be reached, so the connection
/// limit must be the bound that holds. (A soft limit of 1,024 is still common, and raising it
/// to the hard limit is what servers are expected to do.)
fn open_files_for(max_connections: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // Data plane and its datastore connections, admin plane, and a margin for the log's
    // segments, Redis and the listeners.
    const PER_CONNECTION: u64 = 3;
    const MARGIN: u64 = 256;
    let wanted = (max_connections as u64)
        .saturating_mul(PER_CONNECTION)
        .saturating_add(MARGIN);
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= wanted {
        return max_connections;
    }
    let raised = limit.maximum.map_or(wanted, |hard| hard.min(wanted));
    let now = if raised > soft {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(raised),
                maximum: limit.maximum,
            },
        ) {
            Ok(()) => raised,
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the limit on open files");
                soft
            }
        }
    } else {
        soft
    };
    if now >= wanted {
        return max_connections;
    }
    let fits = usize::try_from(now.saturating_sub(MARGIN) / PER_CONNECTION)
        .unwrap_or(max_connections)
        .clamp(1, max_connections);
    tracing::warn!(
        open_files = now,
        wanted,
        configured = max_connections,
        used = fits,
        "the process may open too few files for `server.max_connections`: each listener holds \
         at most {fits} connections; raise the limit on open files (systemd `LimitNOFILE=`, \
         `ulimit -n`) or lower `server.max_connections`"
    );
    fits
}

/// What a policy pack was read from (`PolicySource::digests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackDigests {
    /// The policies and schema: what decides.
    pub rules: [u8; 32],
    /// Those and the tests.
    pub all: [u8; 32],
}

/// A digest of the files, names and contents, in the order given; `None` when one cannot be
/// read.
pub(crate) fn digest_files_named(files: &[PathBuf]) -> Option<[u8; 32]> {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    for file in files {
        let name = file.to_string_lossy();
        let bytes = std::fs::read(file).ok()?;
        digest.update((name.len() as u64).to_be_bytes());
        digest.update(name.as_bytes());
        digest.update((bytes.len() as u64).to_be_bytes());
        digest.update(&bytes);
    }
    Some(digest.finalize().into())
}

/// Where the policy pack and its tests are, and whether a pack without tests may start: what
/// the start reads, and a reload (`rekey::reload_policy`) reads again.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub dir: PathBuf,
    /// `policy.tests`; `None`: `dir/tests`.
    pub tests: Option<PathBuf>,
    pub allow_untested: bool,
}

impl PolicySource {
    pub fn of(cfg: &Config) -> PolicySource {
        PolicySource {
            dir: cfg.policy_dir.clone(),
            tests: cfg.policy_tests.clone(),
            allow_untested: cfg.policy_allow_untested,
        }
    }

    /// Loads and validates the pack, then runs its tests: the engine and how many passed,
    /// or why it must not be used.
    pub fn load(
        &self,
        catalog: &Catalog,
        geography: &Geography,
    ) -> anyhow::Result<(PolicyEngine, usize)> {
        let engine = PolicyEngine::load(&self.dir, catalog, geography)?;
        let tests = self.run_tests(&engine, catalog, geography)?;
        Ok((engine, tests))
    }

    /// Digests of the files the pack is read from, names and contents: the policies and
    /// schema (`policy.dir`'s `*.cedar` and `*.cedarschema`), as the loader lists them, and
    /// those with the tests (`allow/*.json`, `deny/*.json`), as the fixtures list them. What
    /// tells a reload whether there is anything to do, and an export whether what decides it
    /// changed. `None` when one cannot be listed or read (the reload then reads the pack, to
    /// say why).
    pub fn digests(&self) -> Option<PackDigests> {
        let tests = (self.tests.clone()).unwrap_or_else(|| self.dir.join("tests"));
        let mut files = crate::policy::pack_files(&self.dir).ok()?;
        let rules = digest_files_named(&files)?;
        for kind in ["allow", "deny"] {
            files.extend(crate::policy::fixtures::files(&tests, kind).ok()?);
        }
        Some(PackDigests {
            rules,
            all: digest_files_named(&files)?,
        })
    }

    /// `load`, with the digests of what was loaded: `None` for them when the files changed
    /// while they were read (the next reload then reads them whatever they hold).
    pub fn load_digested(
        &self,
        catalog: &Catalog,
        geography: &Geography,
    ) -> anyhow::Result<(PolicyEngine, usize, Option<PackDigests>)> {
        let before = self.digests();
        let (engine, tests) = self.load(catalog, geography)?;
        let digests = before.filter(|&d| self.digests() == Some(d));
        Ok((engine, tests, digests))
    }

    /// Runs the pack's tests (`policy.tests`, else `policy.dir/tests`): how many passed, every
    /// one, or why the pack must not be used. A pack with no tests is used only where the
    /// configuration says it may (`policy.allow_untested`).
    fn run_tests(
        &self,
        policy: &PolicyEngine,
        catalog: &Catalog,
        geography: &Geography,
    ) -> anyhow::Result<usize> {
        let dir = match &self.tests {
            Some(dir) if !dir.is_dir() => anyhow::bail!(
                "`policy.tests` `{}` is not a directory of policy tests",
                dir.display()
            ),
            Some(dir) => dir.clone(),
            None => {
                let dir = self.dir.join("tests");
                if dir.is_dir() {
                    dir
                } else if self.allow_untested {
                    tracing::warn!(
                        policy_dir = %self.dir.display(),
                        "no policy tests (`policy.tests`, or `tests/` beside the policies), and \
                         `policy.allow_untested` lets the gateway start: only the schema checks \
                         the pack, not what it decides"
                    );
                    return Ok(0);
                } else {
                    anyhow::bail!(
                        "no policy tests: `policy.tests` is unset and there is no `{}`. The schema \
                         says each policy is well formed, only the tests say the pack still decides \
                         what it must (a pack without its restriction forbids validates). Ship the \
                         pack's `tests/` with it, point `policy.tests` at them, or set \
                         `policy.allow_untested = true` to start without",
                        dir.display()
                    )
                }
            }
        };
        let registers = crate::policy::fixtures::Registers { catalog, geography };
        let passed = crate::policy::fixtures::run_all(policy, &registers, &dir)?;
        tracing::info!(tests = passed, dir = %dir.display(), "policy tests passed");
        Ok(passed)
    }
}

/// Asks every datastore for one page and lists the fields it returns that the asset register
/// does not classify (`dataset.field`). Such fields are stripped at run time anyway; this makes
/// the gap visible before it is, so the register can be completed.
pub async fn probe_upstreams(c: &Checked) -> anyhow::Result<Vec<String>> {
    let mut unknown = Vec::new();
    for (name, dataset) in &c.catalog.datasets {
        let upstream = c
            .upstreams
            .get(name)
            .with_context(|| format!("no upstream for `{name}`"))?;
        let route = crate::routes::Route {
            dataset: name.clone(),
            kind: crate::routes::RouteKind::List,
            filters: Default::default(),
            page: Some(1),
            per_page: Some(50),
        };
        let (path, envelope) = crate::dialect::list(&upstream.dialect, dataset, &route, None);
        let resp = upstream
            .send(http::Method::GET, &path, None, "wardgate-validate")
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot probe datastore `{name}`: {e} (use `--offline` to skip probing)"
                )
            })?;
        if resp.status != http::StatusCode::OK {
            anyhow::bail!("probing datastore `{name}`: it answered {}", resp.status);
        }
        let body = resp
            .body
            .map_err(|e| anyhow::anyhow!("probing datastore `{name}`: {e}"))?;
        let body: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("probing datastore `{name}`: the answer is not JSON"))?;
        let key = match envelope {
            crate::filter::Envelope::Records => "records",
            crate::filter::Envelope::Rows { .. } => "rows",
        };
        let records = body[key]
            .as_array()
            .with_context(|| format!("probing datastore `{name}`: no `{key}` in the answer"))?;
        let mut seen = std::collections::BTreeSet::new();
        for r in records {
            if let Some(obj) = r.as_object() {
                seen.extend(
                    obj.keys()
                        .filter(|k| !dataset.fields.contains_key(*k))
                        .cloned(),
                );
            }
        }
        unknown.extend(seen.into_iter().map(|f| format!("{name}.{f}")));
    }
    Ok(unknown)
}

/// Loads everything and opens the audit log.
pub fn build(cfg: &Config) -> anyhow::Result<(Arc<Gateway>, Option<TlsAcceptor>)> {
    let c = check(cfg)?;
    if cfg.audit.durability == crate::audit::Durability::PageCache {
        tracing::warn!(
            dir = %cfg.audit.dir.display(),
            "audit.durability = \"page-cache\": answers leave once their records are in the \
             page cache, not on disk; a power cut can lose the records of answers already \
             given (writes' and control changes' records are synced whatever this says)"
        );
    }
    let audit = AuditLog::open(AuditSettings {
        dir: cfg.audit.dir.clone(),
        durability: cfg.audit.durability,
        max_batch: cfg.audit.max_batch,
        commit_window: cfg.audit.commit_window,
        segment_max_bytes: cfg.audit.segment_max_bytes,
        seal_client_addr: cfg.audit.client_addr_retention.is_some(),
    })
    .with_context(|| format!("cannot open the audit log in `{}`", cfg.audit.dir.display()))?;
    let categories = c
        .catalog
        .datasets
        .iter()
        .map(|(n, d)| (n.clone(), d.fields.values().cloned().collect()))
        .collect();
    let controls = crate::controls::Controls::open(
        &cfg.server.data_dir,
        cfg.redis.clone(),
        cfg.quotas.clone(),
    )
    .context("cannot open the shared controls")?;
    let watch = crate::watch::Watch::open(cfg.watch.clone(), &audit, cfg.redis.as_ref())
        .context("cannot open breach detection")?;
    let witness = cfg
        .audit
        .witness
        .clone()
        .map(crate::audit::witness::Witness::new)
        .transpose()
        .context("cannot set up the audit witness")?
        .map(Arc::new);
    let gw = Gateway {
        watch,
        witness,
        audit_dir: cfg.audit.dir.clone(),
        addr_retention: cfg
            .audit
            .client_addr_retention
            .map(|r| (cfg.audit.dir.clone(), r, cfg.audit.prune_interval)),
        retention: cfg
            .audit
            .retention
            .map(|r| (cfg.audit.dir.clone(), r, cfg.audit.prune_interval)),
        controls,
        narrowings: Default::default(),
        categories,
        catalog: c.catalog,
        geography: c.geography,
        verifier: c.verifier,
        policies: std::sync::RwLock::new(Arc::new(crate::decisions::InForce {
            engine: c.policy,
            decisions: Default::default(),
            digest: c.policy_digest,
        })),
        policy_source: PolicySource::of(cfg),
        policy_refused: Default::default(),
        upstreams: c.upstreams,
        server_cert: c.server_cert,
        audit,
        max_request_bytes: cfg.server.max_request_bytes,
        header_read_timeout: cfg.server.header_read_timeout,
        client_stall_timeout: cfg.server.client_stall_timeout,
        max_connections: cfg.server.max_connections,
        trusted_proxies: cfg.server.trusted_proxies.clone(),
        aggregates: cfg.aggregates,
        bulk_reads: crate::bulk::BulkReads::new(cfg.server.max_bulk_reads_per_caller),
    };
    Ok((Arc::new(gw), c.tls))
}

/// Serves the data and admin planes until `shutdown` resolves, then drains and flushes the log.
pub async fn run(
    gw: Arc<Gateway>,
    data: TcpListener,
    admin_listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    let retention = gw.retention.clone();
    let addr_retention = gw.addr_retention.clone();
    admin::metrics_handle();
    let max_connections = open_files_for(gw.max_connections);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let gw_admin = gw.clone();
    let limits = |plane| server::Limits {
        plane,
        max_connections,
        header_read_timeout: gw.header_read_timeout,
        grace,
        // Twice an export's own bound (`client_stall_timeout`), and a minute more at least:
        // on HTTP/1 hyper buffers chunks while a write waits, so an export's wait for room
        // starts later than the socket's, and it must be the export that ends first,
        // recorded `client_stalled`.
        write_stall_timeout: (gw.client_stall_timeout.saturating_mul(2))
            .max(gw.client_stall_timeout + std::time::Duration::from_secs(60)),
        run_to_end: plane == "admin",
    };
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        None,
        move |req, peer| {
            let client = gw_admin.trusted_proxies.client(peer, req.headers());
            admin::PEER.scope(client, admin::handle(gw_admin.clone(), req))
        },
        stopped(stop_rx.clone()),
        limits("admin"),
    ));
    let gw_data = gw.clone();
    let data_task = tokio::spawn(server::serve(
        data,
        tls,
        move |req, peer| {
            let gw = gw_data.clone();
            let client = gw.trusted_proxies.client(peer, req.headers());
            async move { gateway::handle(&gw, req, client).await }
        },
        stopped(stop_rx),
        limits("data"),
    ));
    let pruner = (retention.is_some() || addr_retention.is_some()).then(|| {
        let log = gw.audit.clone();
        tokio::spawn(async move {
            let every = [&retention, &addr_retention]
                .into_iter()
                .flatten()
                .map(|(_, _, every)| *every)
                .min()
                .unwrap_or(std::time::Duration::from_secs(3600));
            loop {
                if let Some((dir, keep, _)) = &retention {
                    match crate::audit::prune::prune_and_record(&log, dir, *keep).await {
                        Ok(Some(p)) => tracing::info!(segments = ?(p.first_segment, p.last_segment), records = p.records, "audit log pruned"),
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "audit prune failed"),
                    }
                }
                if let Some((dir, keep, _)) = &addr_retention {
                    match crate::audit::prune::shred_and_record(&log, dir, *keep).await {
                        Ok(Some(days)) => tracing::info!(?days, "client addresses of these days are now unreadable"),
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "client address shredding failed"),
                    }
                }
                tokio::time::sleep(every).await;
            }
        })
    });
    let detector = tokio::spawn(crate::watch::run(gw.clone()));
    let witness = gw.witness.clone().map(|w| {
        let (log, stop) = (gw.audit.clone(), stop_tx.subscribe());
        tokio::spawn(async move { w.run(&log, stop).await })
    });
    shutdown.await;
    if let Some(p) = pruner {
        p.abort();
    }
    // Live feeds end first, or they would hold the admin plane's drain open.
    gw.watch.stop();
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    let _ = stop_tx.send(true);
    let data_result = data_task.await.context("data plane task failed")?;
    let admin_result = admin_task.await.context("admin plane task failed")?;
    // What the ended connections leave behind (their handlers' records, HTTP/2 requests in
    // tasks of their own, exports' closing records) goes into the log before it closes.
    if !gw.audit.settle(grace).await {
        tracing::warn!("records still on their way after the grace period; closing the log");
    }
    // Detection goes on through the drain: every record the log took is examined, and the
    // findings made are acted on (recorded in it) before it closes.
    gw.watch.stop_detection();
    let _ = detector.await;
    gw.audit.shutdown().await;
    gw.controls.stop();
    gw.controls.flush_quotas().await;
    if let Some(task) = witness {
        let _ = task.await;
    }
    // The final head, so that a witness knows where the log ended.
    if let Some(w) = &gw.witness {
        w.publish(&gw.audit).await;
    }
    tracing::info!("audit log flushed; stopped");
    data_result.and(admin_result)
}
