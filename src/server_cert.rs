//! The gateway's own TLS certificate, renewable without a restart. The data plane's TLS
//! configuration asks `ServerCert` for the certificate at every handshake, so one renewed on
//! disk and read on `SIGHUP` (`rekey::reload_server_tls`) is offered from the next handshake
//! on; connections already open keep the one they were made with.
//!
//! A renewal is read and checked as at start (`server::certificate_and_key`: a chain in the
//! right order, valid now, and a key that is its certificate's); a pair that fails is
//! refused whole and the certificate in use stays. Nothing is renewed (or recorded) when the
//! two files are as they were: the same signal carries token key rotations.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::server;

pub struct ServerCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    /// What is offered now, with what it was read from: replaced together.
    current: RwLock<Current>,
}

#[derive(Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    /// A digest of the two files as they were read (`None` when one could not be read again
    /// for the digest: the next reload then reads them whatever they hold).
    files: Option<[u8; 32]>,
    about: About,
}

/// What the audit record and the log say of a certificate: its subject, the names it is for,
/// when it ends, and the SHA-256 of its DER (what `openssl x509 -fingerprint -sha256` prints,
/// without colons).
#[derive(Clone, Debug, serde::Serialize)]
pub struct About {
    pub subject: String,
    /// Its subject alternative names (DNS names and IP addresses).
    pub names: Vec<String>,
    pub not_after: String,
    pub sha256: String,
    /// When the chain stops being usable, in seconds since 1970: the soonest end of the
    /// certificate and its intermediates (a self-signed root sent last does not count, as for
    /// the 30-day warning). For the metric.
    #[serde(skip)]
    pub chain_ends: i64,
}

/// How a renewed certificate is taken up, for the 30-day warning.
const THEN: &str = "then put the renewed files in place (read again on a change or SIGHUP)";

impl ServerCert {
    /// Reads and checks the certificate chain and key; errors name the file and what is wrong.
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<ServerCert> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // The digest first: files renewed while they are read are taken up by the next
        // reload, not taken for the ones in use.
        let files = digest(cert_file, key_file);
        let (key, about) = read(cert_file, key_file, &provider)?;
        Ok(ServerCert {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            current: RwLock::new(Current {
                key: Arc::new(key),
                files,
                about,
            }),
        })
    }

    /// The certificate offered now.
    pub fn about(&self) -> About {
        self.now().about
    }

    fn now(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A digest of the certificate and key files as they are now (`None` when one cannot be
    /// read), for noticing that they changed (`rekey::changes`).
    pub fn files_now(&self) -> Option<[u8; 32]> {
        digest(&self.cert_file, &self.key_file)
    }

    /// Reads the two files again: `None` when they are as they were, else the renewed
    /// certificate, checked as at start and not yet offered (`Renewal::apply`), or why not.
    pub fn renew(&self) -> anyhow::Result<Option<Renewal<'_>>> {
        let files = digest(&self.cert_file, &self.key_file);
        let now = self.now();
        if files.is_some() && files == now.files {
            return Ok(None);
        }
        // Unreadable files (no digest) are read here again, to say why.
        let (key, about) = read(&self.cert_file, &self.key_file, &self.provider)?;
        let chain = |k: &CertifiedKey| k.cert.len();
        if about.names != now.about.names {
            tracing::warn!(file = %self.cert_file.display(), renewed = ?about.names,
                in_use = ?now.about.names, "the renewed TLS certificate is for other names");
        }
        if chain(&key) < chain(&now.key) {
            tracing::warn!(file = %self.cert_file.display(), renewed = chain(&key),
                in_use = chain(&now.key), "the renewed TLS chain has fewer certificates than \
                the one in use: if its file was still being written, write it elsewhere and \
                rename it into place");
        }
        Ok(Some(Renewal {
            cert: self,
            next: Current {
                key: Arc::new(key),
                files,
                about,
            },
            replaces: now.about,
        }))
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        Arc::clone(&self.provider)
    }
}

/// A certificate read again and checked, not yet offered.
pub struct Renewal<'a> {
    cert: &'a ServerCert,
    next: Current,
    replaces: About,
}

impl Renewal<'_> {
    /// The certificate to be offered.
    pub fn about(&self) -> &About {
        &self.next.about
    }

    /// The certificate it replaces.
    pub fn replaces(&self) -> &About {
        &self.replaces
    }

    /// Offers the renewed certificate from the next handshake on.
    pub fn apply(self) {
        *self
            .cert
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = self.next;
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Some(Arc::clone(&current.key))
    }
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// The chain and key, checked, and what to say of the certificate.
fn read(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<(CertifiedKey, About)> {
    let (certs, key) = server::certificate_and_key(cert_file, key_file, "TLS", THEN)?;
    let about = about(&certs)?;
    let key = CertifiedKey::from_der(certs, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => anyhow::anyhow!(
            "TLS key `{}` does not match its certificate `{}`",
            key_file.display(),
            cert_file.display()
        ),
        e => anyhow::anyhow!("TLS key `{}` cannot be used: {e}", key_file.display()),
    })?;
    Ok((key, about))
}

/// What to say of a chain (`certificate_and_key` has parsed and checked every certificate).
fn about(chain: &[rustls::pki_types::CertificateDer]) -> anyhow::Result<About> {
    use sha2::Digest as _;
    fn parse(der: &[u8]) -> anyhow::Result<x509_parser::certificate::X509Certificate<'_>> {
        x509_parser::parse_x509_certificate(der)
            .map(|(_, cert)| cert)
            .map_err(|e| anyhow::anyhow!("a TLS certificate cannot be read: {e}"))
    }
    let leaf = parse(chain[0].as_ref())?;
    let mut chain_ends = leaf.validity().not_after.timestamp();
    for (i, der) in chain.iter().enumerate().skip(1) {
        let cert = parse(der.as_ref())?;
        let root_last = i == chain.len() - 1 && cert.subject() == cert.issuer();
        if !root_last {
            chain_ends = chain_ends.min(cert.validity().not_after.timestamp());
        }
    }
    let names = match leaf.subject_alternative_name() {
        Ok(Some(san)) => (san.value.general_names.iter())
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => <[u8; 4]>::try_from(*ip)
                        .ok()
                        .map(|a| std::net::IpAddr::from(a).to_string()),
                    16 => <[u8; 16]>::try_from(*ip)
                        .ok()
                        .map(|a| std::net::IpAddr::from(a).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let not_after = leaf.validity().not_after;
    Ok(About {
        subject: leaf.subject().to_string(),
        names,
        not_after: (not_after.to_datetime())
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| not_after.to_string()),
        sha256: hex::encode(sha2::Sha256::digest(chain[0].as_ref())),
        chain_ends,
    })
}

/// A digest of the files as they are now, `None` when one cannot be read.
fn digest(cert_file: &Path, key_file: &Path) -> Option<[u8; 32]> {
    server::digest_files([cert_file, key_file])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` and its key, written in `dir` under `name`.
    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = (rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap())
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn a_key_not_the_certificates_or_a_missing_file_stops_the_start_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = pair(dir.path(), "a");
        let (_, other) = pair(dir.path(), "b");
        let e = format!("{:#}", ServerCert::load(&cert, &other).unwrap_err());
        assert!(e.contains("does not match") && e.contains("b.key"), "{e}");
        let e = format!(
            "{:#}",
            ServerCert::load(&dir.path().join("gone.pem"), &other).unwrap_err()
        );
        assert!(
            e.contains("cannot read TLS certificate") && e.contains("gone.pem"),
            "{e}"
        );
    }

    #[test]
    fn files_as_they_were_renew_nothing_and_changed_ones_are_offered_only_once_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), "a");
        let server = ServerCert::load(&cert, &key).unwrap();
        let first = server.about();
        assert!(server.renew().unwrap().is_none());
        pair(dir.path(), "a");
        let renewal = server.renew().unwrap().unwrap();
        assert_eq!(renewal.replaces().sha256, first.sha256);
        let next = renewal.about().clone();
        assert_ne!(next.sha256, first.sha256);
        // Read, not yet offered.
        assert_eq!(server.about().sha256, first.sha256);
        renewal.apply();
        assert_eq!(server.about().sha256, next.sha256);
        assert!(server.renew().unwrap().is_none());
        assert!(
            next.chain_ends > 0 && next.subject.contains("rcgen") && next.names == ["localhost"],
            "{next:?}"
        );
    }
}
