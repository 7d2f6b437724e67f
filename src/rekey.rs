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

/// Reads the keys again, records the change, then trusts the new keys; or says why not.
pub async fn reload_keys(gw: &Gateway) -> anyhow::Result<()> {
    let mut record = AuditRecord::system("auth.keys", "keys_reloaded");
    let new = match gw.verifier.reread_keys() {
        Ok(new) => new,
        Err(e) => {
            let why = format!("{e:#}");
            tracing::error!(error = %why, "keys not reloaded: the keys in use stay");
            metrics::counter!("wardgate_key_reloads_total", "outcome" => "refused").increment(1);
            record.reason = Some("keys_reload_refused".to_owned());
            record.decision = Decision::Error;
            record.detail = Some(serde_json::json!({ "error": why }));
            if let Err(e) = gw.audit.append(record).await {
                tracing::error!(error = %e, "the refused key reload's audit record was not written");
            }
            return Err(e);
        }
    };
    record.detail = Some(serde_json::json!({
        "keys": new.all,
        "added": new.added,
        "removed": new.removed,
        "changed": new.changed,
    }));
    if let Err(e) = gw.audit.append(record).await {
        tracing::error!(error = %e, "keys not reloaded: the change could not be audited");
        metrics::counter!("wardgate_key_reloads_total", "outcome" => "unlogged").increment(1);
        anyhow::bail!("the key change could not be audited: {e}");
    }
    tracing::info!(keys = ?new.all.keys(), added = ?new.added, removed = ?new.removed,
        changed = ?new.changed, "keys reloaded");
    metrics::counter!("wardgate_key_reloads_total", "outcome" => "reloaded").increment(1);
    gw.verifier.trust(new);
    Ok(())
}

/// Reads the TLS files of the `https://` datastores again, records the change, then uses the
/// new files for new connections; or says why not. Nothing to do (and nothing recorded) when
/// no datastore is reached over TLS.
pub async fn reload_datastore_tls(gw: &Gateway) -> anyhow::Result<()> {
    let Some(renewal) = gw.upstreams.renew_tls() else {
        return Ok(());
    };
    let mut record = AuditRecord::system("datasets.tls", "datastore_tls_reloaded");
    let renewal = match renewal {
        Ok(renewal) => renewal,
        Err(e) => {
            let why = format!("{e:#}");
            tracing::error!(error = %why, "datastore TLS files not reloaded: the ones in use stay");
            metrics::counter!("wardgate_datastore_tls_reloads_total", "outcome" => "refused")
                .increment(1);
            record.reason = Some("datastore_tls_reload_refused".to_owned());
            record.decision = Decision::Error;
            record.detail = Some(serde_json::json!({ "error": why }));
            if let Err(e) = gw.audit.append(record).await {
                tracing::error!(error = %e, "the refused reload's audit record was not written");
            }
            return Err(e);
        }
    };
    let datasets = renewal.changed();
    if datasets.is_empty() {
        // Nothing the gateway trusts or shows changes: no record, and the pools stay.
        tracing::info!(unchanged = ?renewal.unchanged(), "datastore TLS files unchanged");
        metrics::counter!("wardgate_datastore_tls_reloads_total", "outcome" => "unchanged")
            .increment(1);
        return Ok(());
    }
    record.detail = Some(serde_json::json!({
        "datasets": datasets,
        "unchanged": renewal.unchanged(),
    }));
    if let Err(e) = gw.audit.append(record).await {
        tracing::error!(error = %e, "datastore TLS files not reloaded: the change could not be audited");
        metrics::counter!("wardgate_datastore_tls_reloads_total", "outcome" => "unlogged")
            .increment(1);
        anyhow::bail!("the datastore TLS change could not be audited: {e}");
    }
    renewal.apply();
    tracing::info!(?datasets, "datastore TLS files reloaded");
    metrics::counter!("wardgate_datastore_tls_reloads_total", "outcome" => "reloaded").increment(1);
    Ok(())
}
