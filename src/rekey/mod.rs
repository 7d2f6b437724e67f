//! What is read again without a restart, on `SIGHUP` and when its files change
//! (`changes`, every `server.file_check_interval`): the token keys, the gateway's own TLS
//! certificate, the datastores' TLS files and the policy pack. Each is read and checked as at
//! start; a set that fails the checks is refused whole, recorded, and what is in use stays.
//! One that passes is recorded in the audit log first (with what set it off, `trigger`) and
//! then used: a change that cannot be recorded is not made. Nothing is recorded for TLS files
//! or a pack that did not change (a key reload a signal asks for is recorded each time; one
//! a file change, a fetch or a stale set sets off, only when a key changed). Reloads run one
//! at a time (`RELOADS`), so an older reading can never replace a newer one.
//!
//! - The key files the configuration named at start (`[[auth.keys]]`' PEM files,
//!   `auth.jwks_file`), and the JWK set fetched from `auth.jwks_url` (`jwks`: every
//!   `auth.jwks_refresh`, early for a key not trusted, and at once on a signal; dropped past
//!   `auth.jwks_max_stale`): the record says which keys (id and fingerprint) are new, gone or
//!   replaced, and every cached token is forgotten, so a key removed or replaced stops its
//!   tokens at once; requests and streams under way stop at their next check
//!   (`Verifier::still_trusts`).
//! - `server.tls`' certificate and key (`server_cert`): offered from the next handshake on;
//!   connections already open keep theirs.
//! - The TLS files of every `https://` datastore (`ca_file`, the gateway's client certificate
//!   and key), of the datastores whose files changed: new connections are made with the new
//!   files; requests under way finish on the old ones.
//! - The policy pack (`policy.dir`, with its schema and tests): loaded, validated and tested as
//!   at start (every fixture passing, every policy named by one), then put in force with a new
//!   decision cache; requests and exports under way finish under the pack they began with.

mod changes;
pub mod jwks;

use changes::Part;

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, MissedTickBehavior};

use crate::audit::record::{AuditRecord, Decision};
use crate::gateway::Gateway;
use crate::startup::PackDigests;

/// Listens for `SIGHUP`: called first thing in `wardgate serve`, so that one sent while the
/// gateway is still starting is a reload waiting, not the end of the process (its default).
/// `None`, logged, where it cannot.
pub fn listen() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the keys, TLS files and policy pack are read again only by the check for changed files (`server.file_check_interval`), if it is on");
            None
        }
    }
}

/// Starts the tasks that read keys, TLS files and the policy pack again: `run` (on `SIGHUP` and
/// every `check`), and `jwks::run` with a fetched set. The future answered resolves, with what
/// happened, only if one of them ends: none does while the gateway runs, so one that did (a
/// panic) would leave every later reload undone, and a key its provider withdrew trusted past
/// `auth.jwks_max_stale`, with nothing but a line on stderr to say so. The caller stops the
/// gateway on it, for its supervisor to start it again.
pub fn start(
    gw: &Arc<Gateway>,
    hangups: Option<Signal>,
    check: Option<Duration>,
) -> impl std::future::Future<Output = String> + Send + 'static {
    // Each task watched by one of its own, which says when it ends: dropping the future this
    // answers (at a normal shutdown) leaves the tasks running through the drain, rather than
    // aborting a reload between its audit record and the change it records.
    let (ended, mut heard) = tokio::sync::mpsc::channel::<String>(2);
    let watch = |name: &'static str, task: tokio::task::JoinHandle<()>| {
        let ended = ended.clone();
        tokio::spawn(async move {
            let why = match task.await {
                Ok(()) => format!("{name} ended"),
                Err(e) => format!("{name} failed: {e}"),
            };
            let _ = ended.send(why).await;
        });
    };
    if hangups.is_some() || check.is_some() {
        let task = tokio::spawn(run(gw.clone(), hangups, check));
        watch("the reload task (SIGHUP and file checks)", task);
    }
    if gw.verifier.jwks_url().is_some() {
        let task = tokio::spawn(jwks::run(gw.clone()));
        watch("the task that fetches `auth.jwks_url`", task);
    }
    drop(ended);
    async move {
        match heard.recv().await {
            Some(why) => why,
            // No task to watch.
            None => std::future::pending().await,
        }
    }
}

/// What set a reload off: recorded with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `SIGHUP` (or a test doing what it does).
    Signal,
    /// A change to the files, noticed by a check (`changes`).
    FilesChanged,
    /// A JWK set fetched from `auth.jwks_url` (`jwks`).
    Fetched,
    /// No JWK set taken from `auth.jwks_url` within `auth.jwks_max_stale`: its keys dropped.
    Stale,
    /// A JWK set that publishes a private key: fetched, the fetched keys dropped at once; an
    /// `auth.jwks_file` read again, that key dropped (with any key file's copy of it).
    Leaked,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::FilesChanged => "files_changed",
            Trigger::Fetched => "fetched",
            Trigger::Stale => "jwks_stale",
            Trigger::Leaked => "leaked_key",
        }
    }
}

/// Reads the keys, TLS files and policy pack again on every `SIGHUP` (`hangups`) and, checked
/// every `check` (`server.file_check_interval`), each part whose files have changed, for as
/// long as the process runs. (It is not stopped at shutdown: a reload cut short between its
/// audit record and `trust` would leave a record of a change not made; at exit the change no
/// longer matters.)
pub async fn run(gw: Arc<Gateway>, mut hangups: Option<Signal>, check: Option<Duration>) {
    let mut checks = check.map(|every| {
        let mut t = tokio::time::interval_at(Instant::now() + every, every);
        // A check that overran (a slow disk) is not made up for with a burst of checks.
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    });
    let mut files = changes::Checks::default();
    loop {
        let (parts, trigger) = tokio::select! {
            signal = async {
                match &mut hangups {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if signal.is_none() {
                    // No more signals (tokio keeps its handler for the process's life, so
                    // this is not expected).
                    hangups = None;
                    if checks.is_none() {
                        return;
                    }
                    continue;
                }
                if checks.is_some() {
                    // As they are before the reads: a change made during them is one for
                    // the next checks.
                    files.read(changes::now(&gw).await);
                }
                // And a fetch of `auth.jwks_url`'s set, if there is one.
                gw.verifier.jwks_signalled().notify_one();
                (changes::PARTS.to_vec(), Trigger::Signal)
            }
            () = async {
                match &mut checks {
                    Some(c) => drop(c.tick().await),
                    None => std::future::pending().await,
                }
            } => {
                let parts = files.settled(changes::now(&gw).await);
                metrics::counter!("wardgate_file_checks_total").increment(1);
                if parts.is_empty() {
                    continue;
                }
                tracing::info!(?parts, "files changed: reading them again");
                (parts, Trigger::FilesChanged)
            }
        };
        for part in parts {
            if let Err(e) = reload(&gw, part, trigger).await
                && e.downcast_ref::<Unlogged>().is_some()
            {
                // Not made for want of its record: tried again when the log can take it.
                files.retry(part);
            }
        }
    }
}

/// Reads one part again; what it did is logged, counted and audited inside.
async fn reload(gw: &Arc<Gateway>, part: Part, trigger: Trigger) -> anyhow::Result<()> {
    match part {
        Part::Keys => keys(gw, trigger, Jwks::InForce).await,
        Part::ServerTls => server_tls(gw, trigger).await,
        Part::DatastoreTls => datastore_tls(gw, trigger).await,
        Part::Policy => policy(gw, trigger).await,
    }
}

/// A reload, or its refusal, that could not be recorded in the audit log (the change is not
/// made; the refusal is logged).
#[derive(Debug, thiserror::Error)]
#[error("its audit record could not be written")]
struct Unlogged;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Held through each reload, from reading the files to using them.
static RELOADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One kind of reload: where its audit records go, what they and its metric are called.
struct Reload {
    route: &'static str,
    reloaded: &'static str,
    refused: &'static str,
    metric: &'static str,
    /// What is reloaded, for the log.
    what: &'static str,
}

const KEYS: Reload = Reload {
    route: "auth.keys",
    reloaded: "keys_reloaded",
    refused: "keys_reload_refused",
    metric: "wardgate_key_reloads_total",
    what: "keys",
};

const SERVER_TLS: Reload = Reload {
    route: "server.tls",
    reloaded: "server_tls_reloaded",
    refused: "server_tls_reload_refused",
    metric: "wardgate_server_tls_reloads_total",
    what: "server TLS files",
};

const POLICY: Reload = Reload {
    route: "policy",
    reloaded: "policy_reloaded",
    refused: "policy_reload_refused",
    metric: "wardgate_policy_reloads_total",
    what: "policy pack",
};

const DATASTORE_TLS: Reload = Reload {
    route: "datasets.tls",
    reloaded: "datastore_tls_reloaded",
    refused: "datastore_tls_reload_refused",
    metric: "wardgate_datastore_tls_reloads_total",
    what: "datastore TLS files",
};

impl Reload {
    fn count(&self, outcome: &'static str) {
        metrics::counter!(self.metric, "outcome" => outcome).increment(1);
    }

    /// Logs, counts and records a reload refused for `e`: what is in use stays. `e` again.
    async fn refuse(&self, gw: &Gateway, trigger: Trigger, e: anyhow::Error) -> anyhow::Error {
        let why = format!("{e:#}");
        let stay = if e.downcast_ref::<crate::auth::LeakedKey>().is_some() {
            "the leaked key goes, the rest in use stay"
        } else {
            "those in use stay"
        };
        tracing::error!(error = %why, "{} not reloaded: {stay}", self.what);
        self.count("refused");
        let mut record = AuditRecord::system(self.route, self.refused);
        record.decision = Decision::Error;
        record.detail = Some(serde_json::json!({ "error": why, "trigger": trigger.name() }));
        if let Err(log) = gw.audit.append(record).await {
            tracing::error!(error = %log, "the refused reload's audit record was not written");
            return e.context(Unlogged);
        }
        e
    }

    /// Records the change (`detail`) before it is made; an error, counted, when it cannot be
    /// recorded (the change is then not made).
    async fn record(
        &self,
        gw: &Gateway,
        trigger: Trigger,
        mut detail: serde_json::Value,
    ) -> anyhow::Result<()> {
        let mut record = AuditRecord::system(self.route, self.reloaded);
        detail["trigger"] = trigger.name().into();
        record.detail = Some(detail);
        if let Err(e) = gw.audit.append(record).await {
            tracing::error!(error = %e, "{} not reloaded: the change could not be audited", self.what);
            self.count("unlogged");
            return Err(anyhow::Error::new(Unlogged).context(format!(
                "the change of {} could not be audited: {e}",
                self.what
            )));
        }
        Ok(())
    }
}

/// Reads the keys again, records the change, then trusts the new keys; or says why not. (As
/// `SIGHUP` does: recorded even when no key changed.)
pub async fn reload_keys(gw: &Gateway) -> anyhow::Result<()> {
    keys(gw, Trigger::Signal, Jwks::InForce).await
}

/// Which JWK set from `auth.jwks_url` a key reload reads (nothing without one).
enum Jwks {
    /// The one whose keys are trusted now.
    InForce,
    /// One just fetched.
    Fetched(Arc<str>),
    /// None: its keys are dropped.
    Dropped,
}

async fn keys(gw: &Gateway, trigger: Trigger, jwks: Jwks) -> anyhow::Result<()> {
    let _one_at_a_time = RELOADS.lock().await;
    let read = match jwks {
        Jwks::InForce => gw.verifier.reread_keys(),
        Jwks::Fetched(set) => gw.verifier.read_keys(Some(set)),
        Jwks::Dropped => gw.verifier.read_keys(None),
    };
    let new = match read {
        Ok(new) => new,
        Err(e) => {
            let e = KEYS.refuse(gw, trigger, e).await;
            // A key file publishing a private key (now, or at a read whose drop could not be
            // recorded): that key goes now, and a copy of it pinned as another file with it;
            // the rest in use stay. Recorded as any change of keys; one that cannot be
            // recorded is not made, and is `Unlogged`, so that the next check reads the files
            // again (nothing is disclosed to anyone meanwhile: no answer leaves without its
            // record).
            if gw.verifier.uses_leaked() {
                tracing::error!(
                    "a key file published a private key: dropping that key; its tokens are refused until the gateway restarts"
                );
                take(gw, Trigger::Leaked, gw.verifier.without_leaked()).await?;
            }
            return Err(e);
        }
    };
    if trigger != Trigger::Signal
        && new.added.is_empty()
        && new.removed.is_empty()
        && new.changed.is_empty()
    {
        // Another file changed, or this one (or the set fetched) without a change to any key:
        // nothing to record, and the tokens verified stay cached. A fetched set written
        // otherwise is the one in force from now on.
        KEYS.count("unchanged");
        gw.verifier.keep(new);
        return Ok(());
    }
    take(gw, trigger, new).await
}

/// Records the change to `new`, then trusts it; or, when it cannot be recorded, says so.
async fn take(gw: &Gateway, trigger: Trigger, new: crate::auth::NewKeys) -> anyhow::Result<()> {
    let detail = serde_json::json!({
        "keys": new.all,
        "added": new.added,
        "removed": new.removed,
        "changed": new.changed,
    });
    KEYS.record(gw, trigger, detail).await?;
    tracing::info!(keys = ?new.all.keys(), added = ?new.added, removed = ?new.removed,
        changed = ?new.changed, "keys reloaded");
    KEYS.count("reloaded");
    gw.verifier.trust(new);
    Ok(())
}

/// Reads the server's certificate and key again, records the change, then offers the new
/// certificate from the next handshake on; or says why not. Nothing to do (and nothing
/// recorded) without `server.tls`, or when neither file changed.
pub async fn reload_server_tls(gw: &Gateway) -> anyhow::Result<()> {
    server_tls(gw, Trigger::Signal).await
}

async fn server_tls(gw: &Gateway, trigger: Trigger) -> anyhow::Result<()> {
    let Some(cert) = &gw.server_cert else {
        return Ok(());
    };
    let _one_at_a_time = RELOADS.lock().await;
    let renewal = match cert.renew() {
        Ok(Some(renewal)) => renewal,
        Ok(None) => {
            tracing::info!("server TLS files unchanged");
            SERVER_TLS.count("unchanged");
            return Ok(());
        }
        Err(e) => return Err(SERVER_TLS.refuse(gw, trigger, e).await),
    };
    let detail = serde_json::json!({
        "certificate": renewal.about(),
        "replaces": renewal.replaces(),
    });
    SERVER_TLS.record(gw, trigger, detail).await?;
    let about = renewal.about().clone();
    renewal.apply();
    tracing::info!(subject = %about.subject, not_after = %about.not_after, sha256 = %about.sha256,
        "server TLS certificate reloaded: offered from the next handshake on");
    SERVER_TLS.count("reloaded");
    Ok(())
}

/// Reads the TLS files of the `https://` datastores again, records the change, then uses the
/// new files for new connections; or says why not. Nothing to do (and nothing recorded) when
/// no datastore is reached over TLS, or none of their files changed.
pub async fn reload_datastore_tls(gw: &Gateway) -> anyhow::Result<()> {
    datastore_tls(gw, Trigger::Signal).await
}

async fn datastore_tls(gw: &Gateway, trigger: Trigger) -> anyhow::Result<()> {
    let _one_at_a_time = RELOADS.lock().await;
    let renewal = match gw.upstreams.renew_tls() {
        None => return Ok(()),
        Some(Ok(renewal)) => renewal,
        Some(Err(e)) => return Err(DATASTORE_TLS.refuse(gw, trigger, e).await),
    };
    let datasets = renewal.changed();
    if datasets.is_empty() {
        // Nothing the gateway trusts or shows changes: no record, and the pools stay.
        tracing::info!(unchanged = ?renewal.unchanged(), "datastore TLS files unchanged");
        DATASTORE_TLS.count("unchanged");
        return Ok(());
    }
    let detail = serde_json::json!({
        "datasets": datasets,
        "unchanged": renewal.unchanged(),
    });
    DATASTORE_TLS.record(gw, trigger, detail).await?;
    renewal.apply();
    tracing::info!(?datasets, "datastore TLS files reloaded");
    DATASTORE_TLS.count("reloaded");
    Ok(())
}

/// Reads the policy pack again (its policies, schema and tests), loads, validates and tests it
/// as at start, records the change, then puts it in force with a new decision cache; or says
/// why not. Nothing is recorded when no file of the pack changed.
pub async fn reload_policy(gw: &Arc<Gateway>) -> anyhow::Result<()> {
    policy(gw, Trigger::Signal).await
}

async fn policy(gw: &Arc<Gateway>, trigger: Trigger) -> anyhow::Result<()> {
    let _one_at_a_time = RELOADS.lock().await;
    let in_force = gw.policies();
    // Reading the files and hundreds of fixtures: off the async workers.
    let reading = Arc::clone(gw);
    let (known, refused) = (in_force.digest, *lock(&gw.policy_refused));
    let read = tokio::task::spawn_blocking(move || read_pack(&reading, known, refused))
        .await
        .unwrap_or_else(|e| Reading::Refused(e.into(), None));
    let (engine, tests, digest) = match read {
        Reading::Loaded(engine, tests, digest) => (*engine, tests, digest),
        Reading::Unchanged => {
            // Back as in force: a pack refused before is read again when it comes back.
            *lock(&gw.policy_refused) = None;
            tracing::info!("policy pack unchanged");
            POLICY.count("unchanged");
            return Ok(());
        }
        Reading::StillRefused => {
            tracing::warn!("policy pack unchanged since it was refused: the pack in force stays");
            POLICY.count("unchanged");
            return Ok(());
        }
        Reading::Refused(e, digest) => {
            let e = POLICY.refuse(gw, trigger, e).await;
            // Remembered (not read and recorded again) only once its refusal is recorded.
            if e.downcast_ref::<Unlogged>().is_none() {
                *lock(&gw.policy_refused) = digest;
            }
            return Err(e);
        }
    };
    *lock(&gw.policy_refused) = None;
    let digest = Some(digest);
    let ids = |e: &crate::policy::PolicyEngine| -> std::collections::BTreeSet<String> {
        e.policy_origins().map(|(id, _)| id.to_owned()).collect()
    };
    let (before, after) = (ids(&in_force.engine), ids(&engine));
    let detail = serde_json::json!({
        "policies": after.len(),
        "tests": tests,
        "added": after.difference(&before).collect::<Vec<_>>(),
        "removed": before.difference(&after).collect::<Vec<_>>(),
        "digest": digest.map(|d| hex::encode(d.all)),
    });
    POLICY.record(gw, trigger, detail).await?;
    gw.put_policies(crate::decisions::InForce {
        engine,
        decisions: Default::default(),
        digest,
    });
    tracing::info!(policies = after.len(), tests, "policy pack reloaded");
    POLICY.count("reloaded");
    Ok(())
}

/// What reading the policy pack again found.
enum Reading {
    /// Its files are those of the pack in force.
    Unchanged,
    /// Its files are those of the pack refused last (once is recorded, not every signal until
    /// it is mended).
    StillRefused,
    Loaded(Box<crate::policy::PolicyEngine>, usize, PackDigests),
    /// Why not, and what was read when it was refused.
    Refused(anyhow::Error, Option<PackDigests>),
}

/// Reads, loads and tests the pack unless its files are those of the pack in force (`known`)
/// or of the one refused last (`refused`).
fn read_pack(gw: &Gateway, known: Option<PackDigests>, refused: Option<PackDigests>) -> Reading {
    let source = &gw.policy_source;
    let digest = source.digests();
    match digest {
        Some(_) if digest == known => return Reading::Unchanged,
        Some(_) if digest == refused => return Reading::StillRefused,
        _ => {}
    }
    // A refusal is remembered against the files refused (`StillRefused`) only where they are
    // what was read: one made while they changed (a file rewritten in place, a mode being
    // fixed) says nothing of what they hold now, and remembered, it kept a good pack out
    // until some file of it changed again.
    match source.load_digested(&gw.catalog, &gw.geography) {
        Ok((engine, tests, Some(read))) => Reading::Loaded(Box::new(engine), tests, read),
        Ok((_, _, None)) => Reading::Refused(
            anyhow::anyhow!(
                "the policy pack changed while it was read (or a file of it cannot be read \
                 again): put it in place whole (it is then read again)"
            ),
            None,
        ),
        Err(e) => Reading::Refused(e, digest.filter(|&d| source.digests() == Some(d))),
    }
}

#[cfg(test)]
mod tests {
    use super::Unlogged;

    /// `run` tries a part again when its reload, or its refusal, could not be recorded: it
    /// finds out by `Unlogged` in the error, in both of the shapes `Reload` gives it.
    #[test]
    fn an_unrecorded_reload_or_refusal_is_known_by_its_error() {
        let change =
            anyhow::Error::new(Unlogged).context("the change of keys could not be audited");
        assert!(change.downcast_ref::<Unlogged>().is_some());
        let refusal = anyhow::anyhow!("`keys/a.pem` is not a PEM public key").context(Unlogged);
        assert!(refusal.downcast_ref::<Unlogged>().is_some());
        assert!(
            format!("{refusal:#}").contains("not a PEM public key"),
            "{refusal:#}"
        );
        let recorded = anyhow::anyhow!("`keys/a.pem` is not a PEM public key");
        assert!(recorded.downcast_ref::<Unlogged>().is_none());
    }
}
