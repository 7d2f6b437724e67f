//! The connections under each datastore's pooled client (`proxy`): TCP, or TLS for an
//! `https://` datastore, trusting only the CA certificates its `ca_file` names and showing
//! the gateway's own certificate where one is configured (rustls, under hyper-rustls's
//! connector); and one deadline over making a connection, name lookup, TCP and handshake
//! together. A plain `http://` datastore's connections pass through the same connector,
//! which cannot make a TLS one for it (no roots) and is never asked to (its URL is fixed by
//! the configuration). This module makes connections; it sends nothing over them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{UpstreamConfig, UpstreamTls};

/// What a datastore's client connects with.
pub type Connector = ConnectWithin<HttpsConnector<HttpConnector>>;

/// The connector for datastore `name`: its TLS files read and checked here, at start, so
/// that a problem stops the start naming the key and the file.
pub fn connector(name: &str, u: &UpstreamConfig) -> anyhow::Result<Connector> {
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(u.connect_timeout));
    tcp.set_nodelay(true);
    let connector = match &u.tls {
        // Only TLS, with only the roots configured for this datastore: its scheme is fixed by
        // the configuration, so no request can go to it in plain text.
        Some(tls) => {
            tcp.enforce_http(false);
            HttpsConnectorBuilder::new()
                .with_tls_config(client_tls(name, tls)?)
                .https_only()
                .enable_http1()
                .wrap_connector(tcp)
        }
        // Plain http:// (the configuration allows nothing else here): the connector passes
        // the connection through, and its TLS settings (no roots, so no server could be
        // trusted) are never used.
        None => HttpsConnectorBuilder::new()
            .with_tls_config(no_tls()?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp),
    };
    Ok(ConnectWithin {
        inner: connector,
        within: u.connect_timeout,
        dataset: name.into(),
    })
}

/// A connector whose connections must be made, TCP and any TLS handshake both, within
/// `connect_timeout`: `HttpConnector`'s own timeout covers the TCP connect only, and a
/// datastore that accepts and then stalls its handshake would otherwise hold a request until
/// `response_timeout` (a 504 where a 502 is meant).
#[derive(Clone)]
pub struct ConnectWithin<C> {
    inner: C,
    within: Duration,
    /// Whose connections, for the error.
    dataset: Arc<str>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower::Service<http::Uri> for ConnectWithin<C>
where
    C: tower::Service<http::Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (connecting, within) = (self.inner.call(uri), self.within);
        let dataset = Arc::clone(&self.dataset);
        Box::pin(async move {
            match tokio::time::timeout(within, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(format!(
                    "no connection within `datasets.{dataset}.connect_timeout` ({within:?}): \
                     name lookup, TCP connect and any TLS handshake"
                )
                .into()),
            }
        })
    }
}

/// rustls with the ring provider and its safe protocol versions (TLS 1.2 and 1.3).
pub(crate) fn tls_builder()
-> anyhow::Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")
}

/// The TLS settings for an https:// datastore: its certificate must chain to one of the CA
/// certificates in `ca_file` and name the host of its URL (rustls's WebPKI verification);
/// the gateway shows its own certificate where one is configured. Errors name the key and the
/// file.
fn client_tls(name: &str, tls: &UpstreamTls) -> anyhow::Result<rustls::ClientConfig> {
    let roots = roots(&tls.ca_file, &format!("datasets.{name}.ca_file"))?;
    let builder = tls_builder()?.with_root_certificates(roots);
    match &tls.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let then = "then put the renewed files in place (read again on a change or SIGHUP)";
            let (certs, private) = crate::server::certificate_and_key(cert, key, "client", then)
                .with_context(|| {
                    format!("`datasets.{name}.client_cert_file` and `client_key_file`")
                })?;
            let key_key = format!("datasets.{name}.client_key_file");
            builder
                .with_client_auth_cert(certs, private)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => anyhow::anyhow!(
                        "`{key_key}` `{}` does not match `{}`",
                        key.display(),
                        cert.display()
                    ),
                    other => anyhow::anyhow!("`{key_key}` `{}`: {other}", key.display()),
                })
        }
    }
}

/// The trust anchors in `ca_file` (the configuration's `key`, for errors): at least one.
pub(crate) fn roots(ca_file: &std::path::Path, key: &str) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        crate::server::read_certificates(ca_file, "CA").with_context(|| format!("`{key}`"))?;
    // A system bundle may hold a certificate or two that WebPKI cannot take as a trust
    // anchor; the rest still serve. None at all is a mistake.
    let (added, skipped) = roots.add_parsable_certificates(certs);
    if added == 0 {
        anyhow::bail!(
            "`{key}`: no certificate in `{}` can be a trust anchor",
            ca_file.display()
        );
    }
    if skipped > 0 {
        tracing::warn!(
            file = %ca_file.display(),
            added,
            skipped,
            "`{key}`: some certificates cannot be trust anchors and are left out"
        );
    }
    Ok(roots)
}

/// TLS settings trusting nobody, for a connector that only ever makes plain connections.
fn no_tls() -> anyhow::Result<rustls::ClientConfig> {
    Ok(tls_builder()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Dialect;

    /// The TLS files of an https:// datastore are read when the clients are built, and a
    /// problem stops the start naming the key and the file.
    #[test]
    fn unusable_tls_files_stop_the_start_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let build = |tls: UpstreamTls| {
            let cfg = UpstreamConfig {
                base: "https://localhost:7001".parse().unwrap(),
                connect_timeout: Duration::from_secs(5),
                response_timeout: Duration::from_secs(30),
                idle_connections: 1,
                authorization: None,
                tls: Some(tls),
                dialect: Dialect::Wardgate,
            };
            connector("voter", &cfg).map(drop)
        };
        let refused = |ca_file: std::path::PathBuf| {
            let tls = UpstreamTls {
                ca_file,
                client_cert: None,
            };
            format!("{:#}", build(tls).unwrap_err())
        };
        let missing = dir.path().join("no-such-ca.pem");
        let e = refused(missing.clone());
        assert!(
            e.contains("`datasets.voter.ca_file`") && e.contains(&missing.display().to_string()),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = refused(empty);
        assert!(e.contains("holds no certificate"), "{e}");
        // A PEM certificate block that is no certificate: nothing to trust.
        let junk = dir.path().join("junk.pem");
        let block = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(&junk, block).unwrap();
        let e = refused(junk);
        assert!(e.contains("can be a trust anchor"), "{e}");

        let (ca_pem, _) = crate::token::self_signed_cert(&["ca"]).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &ca_pem).unwrap();
        build(UpstreamTls {
            ca_file: ca.clone(),
            client_cert: None,
        })
        .unwrap();
        // A client certificate with another certificate's key.
        let (cert, _) = crate::token::self_signed_cert(&["wardgate"]).unwrap();
        let (_, other_key) = crate::token::self_signed_cert(&["wardgate"]).unwrap();
        let (cert_file, key_file) = (dir.path().join("gw.pem"), dir.path().join("gw.key"));
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, other_key).unwrap();
        let e = format!(
            "{:#}",
            build(UpstreamTls {
                ca_file: ca,
                client_cert: Some((cert_file.clone(), key_file.clone())),
            })
            .unwrap_err()
        );
        assert!(
            e.contains("`datasets.voter.client_key_file`") && e.contains("does not match"),
            "{e}"
        );
        // A client certificate that has expired: every handshake would fail.
        let mut params = rcgen::CertificateParams::new(vec!["wardgate".to_owned()]).unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(1_600_000_000).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&cert_file, params.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let e = format!(
            "{:#}",
            build(UpstreamTls {
                ca_file: dir.path().join("ca.pem"),
                client_cert: Some((cert_file.clone(), key_file)),
            })
            .unwrap_err()
        );
        assert!(
            e.contains("`datasets.voter.client_cert_file` and `client_key_file`")
                && e.contains(&cert_file.display().to_string())
                && e.contains("expired on 2023-11-14"),
            "{e}"
        );
    }
}
