//! `auth.jwks_url`: the identity provider's published JWK set, fetched at start (the gateway
//! does not start without it), then every `auth.jwks_refresh`, and early when a token names a
//! key not trusted (at most once every 30 s, or `jwks_refresh` if shorter), so that a key the
//! provider publishes and signs with at once is taken up within seconds, not at the next
//! refresh. `SIGHUP` fetches it at once (an operator's, so not held to that limit).
//!
//! A set fetched is read as strictly as at start and goes through the same reload as the key
//! files (`rekey::keys`): a change of keys is recorded first (`trigger: fetched`) and then
//! trusted, and every cached token is forgotten; a set the same as the one in force is not
//! recorded. A set that would not start the gateway (not a JWK set, a key that cannot verify
//! its algorithm, none at all) is refused and recorded once, not at every fetch, and the
//! keys in use stay.
//!
//! Fetching is over TLS only, trusting the certificates in `auth.jwks_ca_file` alone (read
//! at each fetch, so a renewed bundle is taken up), within 10 s, one answer of at most 1 MiB
//! with status 200; a redirect is not followed.
//!
//! When no set has been taken for longer than `auth.jwks_max_stale` (the provider cannot be
//! reached, or answers with sets that are refused), the set's keys are dropped, recorded
//! (`trigger: jwks_stale`), and their tokens refused until a fetch brings a set again: a key
//! the provider withdrew because it leaked cannot be kept in use by cutting the gateway off
//! from the provider.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::{Jwks, Trigger, Unlogged};
use crate::config::JwksUrl;
use crate::gateway::Gateway;

/// The whole exchange, connection and answer.
const FETCH_WITHIN: Duration = Duration::from_secs(10);
/// The largest answer read: providers publish a handful of keys, a few KiB.
const MAX_BYTES: usize = 1 << 20;
/// The most often a fetch is made outside the refresh (a key not trusted, a signal, a failed
/// or refused fetch tried again).
const EARLY_EVERY: Duration = Duration::from_secs(30);

/// Fetches the set once: its text, or why not (naming the URL).
pub async fn fetch(src: &JwksUrl) -> anyhow::Result<String> {
    fetch_set(src)
        .await
        .with_context(|| format!("cannot fetch the JWK set `auth.jwks_url` = `{}`", src.url))
}

async fn fetch_set(src: &JwksUrl) -> anyhow::Result<String> {
    let roots = crate::connector::roots(&src.ca_file, "auth.jwks_ca_file")?;
    let tls = crate::connector::tls_builder()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(FETCH_WITHIN));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(tcp);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(https);
    let req = http::Request::get(src.url.clone())
        .header(
            http::header::ACCEPT,
            "application/jwk-set+json, application/json",
        )
        // Past any cache between: a key withdrawn is gone at the next fetch.
        .header(http::header::CACHE_CONTROL, "no-cache")
        .header(
            http::header::USER_AGENT,
            concat!("wardgate/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())?;
    let exchange = async {
        let resp = (client.request(req).await)
            .map_err(|e| anyhow::anyhow!("{}", crate::proxy::causes(&e)))?;
        let status = resp.status();
        if status.is_redirection() {
            anyhow::bail!(
                "it answered {status}: redirects are not followed (give the set's own URL)"
            );
        }
        if status != http::StatusCode::OK {
            anyhow::bail!("it answered {status}");
        }
        let body = Limited::new(resp.into_body(), MAX_BYTES)
            .collect()
            .await
            .map_err(
                |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                    Some(_) => anyhow::anyhow!("its answer is longer than {MAX_BYTES} bytes"),
                    None => anyhow::anyhow!("reading its answer: {e}"),
                },
            )?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| anyhow::anyhow!("its answer is not UTF-8"))
    };
    match tokio::time::timeout(FETCH_WITHIN, exchange).await {
        Ok(fetched) => fetched,
        Err(_) => anyhow::bail!("no whole answer within {FETCH_WITHIN:?}"),
    }
}

/// `fetch`, for the checks at start, which are not async: on a thread of its own with its own
/// runtime, so it works on any runtime (or none) and whatever its flavour.
pub fn fetch_at_start(src: &JwksUrl) -> anyhow::Result<String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a runtime to fetch `auth.jwks_url` on")?
                .block_on(fetch(src))
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("fetching `auth.jwks_url` panicked")))
    })
}

/// Fetches `auth.jwks_url` for as long as the process runs (nothing to do without one): see
/// the module's documentation.
pub async fn run(gw: Arc<Gateway>) {
    let Some(src) = gw.verifier.jwks_url().cloned() else {
        return;
    };
    let early = src.refresh.min(EARLY_EVERY);
    // The set in force was taken at start, when it was fetched.
    let mut taken_at = Instant::from_std(gw.verifier.jwks_fetched_at());
    taken_now();
    // The last refusal recorded, and the keys in use it was made against (`key_generation`):
    // a set refused for the same reason is not recorded again, however its bytes differ,
    // until the keys in use change (a key file's key that a fetched key clashed with, gone).
    let mut refused: Option<(String, u64)> = None;
    // A set published a private key and the fetched keys are not yet dropped (the drop could
    // not be recorded): tried again after every fetch, whatever it brings.
    let mut leak_pending = false;
    let mut next = Instant::now() + src.refresh;
    // A key published while the gateway started is fetched at once.
    let mut early_from = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = async {
                tokio::time::sleep_until(early_from).await;
                gw.verifier.jwks_wanted().notified().await;
            } => {
                tracing::debug!("a token named a key not trusted: fetching the JWK set early");
            }
            () = gw.verifier.jwks_signalled().notified() => {
                tracing::info!("SIGHUP: fetching the JWK set");
            }
        }
        let fetched = fetch(&src).await;
        let now = Instant::now();
        early_from = now + early;
        next = now + early;
        if leak_pending {
            leak_pending = drop_leaked(&gw).await;
        }
        let doc = match fetched {
            Ok(doc) => doc,
            Err(e) => {
                metrics::counter!("wardgate_jwks_fetches_total", "outcome" => "failed")
                    .increment(1);
                tracing::warn!(error = %format!("{e:#}"), stale_for = ?now.duration_since(taken_at),
                    "the JWK set was not fetched: the keys in use stay until `auth.jwks_max_stale`");
                drop_if_stale(&gw, &src, now.duration_since(taken_at)).await;
                continue;
            }
        };
        // (Not while a leak's drop is owed: the set in force holds the leaked key.)
        let outcome = if !leak_pending
            && gw.verifier.jwks_in_force().as_deref() == Some(doc.as_str())
        {
            // The same text: the same keys.
            super::KEYS.count("unchanged");
            Ok(())
        } else {
            let generation = gw.verifier.key_generation();
            let doc: Arc<str> = Arc::from(doc);
            let read = gw.verifier.read_keys(Some(Arc::clone(&doc)));
            let read = match read {
                Err(e) if e.downcast_ref::<crate::auth::LeakedKey>().is_some() => {
                    // Whoever reads the set can sign with that key: said in the log once (which
                    // key, which member), and the keys fetched before go now, not after
                    // `auth.jwks_max_stale` (the key files stay). The key is not trusted again
                    // in this run, published without its private half too (`auth::Verifier`).
                    metrics::counter!("wardgate_jwks_fetches_total", "outcome" => "leaked")
                        .increment(1);
                    let why = format!("{e:#}");
                    if refused.as_ref().map(|(m, _)| m) != Some(&why) {
                        let e = super::KEYS.refuse(&gw, Trigger::Leaked, e).await;
                        if e.downcast_ref::<Unlogged>().is_none() {
                            refused = Some((why, generation));
                        }
                    }
                    leak_pending = drop_leaked(&gw).await;
                    continue;
                }
                other => other,
            };
            if let Err(e) = read
                && refused.as_ref() == Some(&(format!("{e:#}"), generation))
            {
                metrics::counter!("wardgate_jwks_fetches_total", "outcome" => "refused")
                    .increment(1);
                tracing::warn!(error = %format!("{e:#}"),
                    "the identity provider still publishes a JWK set refused for this before: the keys in use stay until `auth.jwks_max_stale`");
                drop_if_stale(&gw, &src, now.duration_since(taken_at)).await;
                continue;
            }
            match super::keys(&gw, Trigger::Fetched, Jwks::Fetched(doc)).await {
                Err(e) if e.downcast_ref::<Unlogged>().is_none() => {
                    refused = Some((format!("{e:#}"), generation));
                    Err(e)
                }
                other => other,
            }
        };
        match outcome {
            Ok(()) => {
                metrics::counter!("wardgate_jwks_fetches_total", "outcome" => "taken").increment(1);
                taken_at = now;
                taken_now();
                refused = None;
                // A set taken has passed the leaked keys' check: no drop is owed any more.
                leak_pending = false;
                next = now + src.refresh;
            }
            Err(e) if e.downcast_ref::<Unlogged>().is_some() => {
                // Not made, or its refusal not recorded: fetched and tried again.
                metrics::counter!("wardgate_jwks_fetches_total", "outcome" => "unlogged")
                    .increment(1);
            }
            Err(_) => {
                metrics::counter!("wardgate_jwks_fetches_total", "outcome" => "refused")
                    .increment(1);
            }
        }
        drop_if_stale(&gw, &src, now.duration_since(taken_at)).await;
    }
}

/// Drops the fetched keys after a set published a private key, and any key file's copy of
/// the leaked key, recorded inside; whether a drop is still owed (one that cannot be recorded
/// is not made, and is tried again after the next fetch, whatever it brings).
async fn drop_leaked(gw: &Arc<Gateway>) -> bool {
    let owed = || gw.verifier.jwks_in_force().is_some() || gw.verifier.uses_leaked();
    if owed() {
        tracing::error!(
            "the identity provider published a private key: dropping the fetched keys; their tokens are refused until it publishes a set with a new key"
        );
        let _ = super::keys(gw, Trigger::Leaked, Jwks::Dropped).await;
    }
    owed()
}

/// Drops the fetched set's keys once no set has been taken for longer than
/// `auth.jwks_max_stale` (after a fetch, which is tried at least every 30 s while none is
/// taken). Logged, counted and recorded inside; a drop that cannot be recorded is not made,
/// and is tried again after the next fetch: meanwhile nothing is disclosed to anyone, since
/// no answer leaves without its record.
async fn drop_if_stale(gw: &Arc<Gateway>, src: &JwksUrl, stale_for: Duration) {
    if stale_for > src.max_stale && gw.verifier.jwks_in_force().is_some() {
        tracing::error!(?stale_for, max_stale = ?src.max_stale,
            "no JWK set taken within `auth.jwks_max_stale`: dropping its keys; their tokens are refused until a fetch brings a set");
        let _ = super::keys(gw, Trigger::Stale, Jwks::Dropped).await;
    }
}

/// `wardgate_jwks_taken_timestamp_seconds`: when a set was last taken (fetched and trusted,
/// or found the same as the one in force), for an alert well before `auth.jwks_max_stale`.
fn taken_now() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!("wardgate_jwks_taken_timestamp_seconds").set(now.as_secs_f64());
}
