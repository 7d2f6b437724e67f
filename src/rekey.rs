//! The token keys read again without a restart: on `SIGHUP`, the key files the configuration
//! named at start (`[[auth.keys]]`' PEM files, `auth.jwks_file`) are read and checked as at
//! start. A set that fails the checks is refused and the keys in use stay; one that passes is
//! recorded in the audit log (each key's id and fingerprint, which are new, gone or replaced)
//! and then trusted, and every cached token is forgotten, so a key removed or replaced stops
//! its tokens at once; requests and streams under way stop at their next check
//! (`Verifier::still_trusts`). A change that cannot be recorded is not made.
//!
//! The same signal reads the TLS files of every `https://` datastore again (`ca_file`, the
//! gateway's client certificate and key: a certificate renewed before it ends). Those of the
//! datastores whose files changed are checked as at start: all are taken, after their audit
//! record, or none (the clients in use stay). New connections are made with the new files;
//! requests under way finish on the old ones.

use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::audit::record::{AuditRecord, Decision};
use crate::gateway::Gateway;

/// Listens for `SIGHUP`: called first thing in `wardgate serve`, so that one sent while the
/// gateway is still starting is a reload waiting, not the end of the process (its default).
/// `None`, logged, where it cannot.
pub fn listen() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the keys and datastore TLS files are read at start only");
            None
        }
    }
}

/// Reads the keys again on every `SIGHUP`, for as long as the process runs. (It is not
/// stopped at shutdown: a reload cut short between its audit record and `trust` would leave a
/// record of a change not made; at exit the change no longer matters.)
pub async fn on_hangup(gw: Arc<Gateway>, mut hangups: Signal) {
    while hangups.recv().await.is_some() {
        // What each did is logged, counted and audited inside.
        let _ = reload_keys(&gw).await;
        let _ = reload_datastore_tls(&gw).await;
    }
}

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
    async fn refuse(&self, gw: &Gateway, e: anyhow::Error) -> anyhow::Error {
        let why = format!("{e:#}");
        tracing::error!(error = %why, "{} not reloaded: those in use stay", self.what);
        self.count("refused");
        let mut record = AuditRecord::system(self.route, self.refused);
        record.decision = Decision::Error;
        record.detail = Some(serde_json::json!({ "error": why }));
        if let Err(e) = gw.audit.append(record).await {
            tracing::error!(error = %e, "the refused reload's audit record was not written");
        }
        e
    }

    /// Records the change (`detail`) before it is made; an error, counted, when it cannot be
    /// recorded (the change is then not made).
    async fn record(&self, gw: &Gateway, detail: serde_json::Value) -> anyhow::Result<()> {
        let mut record = AuditRecord::system(self.route, self.reloaded);
        record.detail = Some(detail);
        if let Err(e) = gw.audit.append(record).await {
            tracing::error!(error = %e, "{} not reloaded: the change could not be audited", self.what);
            self.count("unlogged");
            anyhow::bail!("the change of {} could not be audited: {e}", self.what);
        }
        Ok(())
    }
}

/// Reads the keys again, records the change, then trusts the new keys; or says why not.
pub async fn reload_keys(gw: &Gateway) -> anyhow::Result<()> {
    let new = match gw.verifier.reread_keys() {
        Ok(new) => new,
        Err(e) => return Err(KEYS.refuse(gw, e).await),
    };
    let detail = serde_json::json!({
        "keys": new.all,
        "added": new.added,
        "removed": new.removed,
        "changed": new.changed,
    });
    KEYS.record(gw, detail).await?;
    tracing::info!(keys = ?new.all.keys(), added = ?new.added, removed = ?new.removed,
        changed = ?new.changed, "keys reloaded");
    KEYS.count("reloaded");
    gw.verifier.trust(new);
    Ok(())
}

/// Reads the TLS files of the `https://` datastores again, records the change, then uses the
/// new files for new connections; or says why not. Nothing to do (and nothing recorded) when
/// no datastore is reached over TLS, or none of their files changed.
pub async fn reload_datastore_tls(gw: &Gateway) -> anyhow::Result<()> {
    let renewal = match gw.upstreams.renew_tls() {
        None => return Ok(()),
        Some(Ok(renewal)) => renewal,
        Some(Err(e)) => return Err(DATASTORE_TLS.refuse(gw, e).await),
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
    DATASTORE_TLS.record(gw, detail).await?;
    renewal.apply();
    tracing::info!(?datasets, "datastore TLS files reloaded");
    DATASTORE_TLS.count("reloaded");
    Ok(())
}
