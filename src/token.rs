//! Minting tokens and making keys: what an identity provider does, for demos, tests and tooling.
//!
//! Production tokens come from the party's identity provider; wardgate only verifies them
//! (`auth.rs`). This module signs tokens with a configured private key (`wardgate token`) and
//! generates fresh key pairs for the demo, so that nothing secret ships in the repository.

use std::path::Path;

use anyhow::Context;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::auth::Claims;
use crate::config::SigningConfig;

/// A private key plus the identity it signs as.
pub struct Signer {
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
    pub issuer: String,
}

impl Signer {
    pub fn from_config(cfg: &SigningConfig) -> anyhow::Result<Signer> {
        let pem = std::fs::read(&cfg.private_key_file).with_context(|| {
            format!(
                "signing key `{}`: cannot read `{}`",
                cfg.kid,
                cfg.private_key_file.display()
            )
        })?;
        crate::config::warn_if_others_may_read(&cfg.private_key_file, "signing.private_key_file");
        Signer::from_pem(&cfg.kid, cfg.algorithm, &pem, &cfg.issuer)
    }

    pub fn from_pem(
        kid: &str,
        algorithm: Algorithm,
        pem: &[u8],
        issuer: &str,
    ) -> anyhow::Result<Signer> {
        let key = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .with_context(|| {
            format!("signing key `{kid}` is not a {algorithm:?} private key in PEM form")
        })?;
        Ok(Signer {
            kid: kid.to_owned(),
            algorithm,
            key,
            issuer: issuer.to_owned(),
        })
    }

    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).context("cannot sign token")
    }
}

/// A freshly generated ES256 key pair in PEM form (PKCS#8 private, SPKI public).
pub struct KeyPairPem {
    pub private_pem: String,
    pub public_pem: String,
}

pub fn generate_es256() -> anyhow::Result<KeyPairPem> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate an ES256 key pair")?;
    Ok(KeyPairPem {
        private_pem: kp.serialize_pem(),
        public_pem: kp.public_key_pem(),
    })
}

/// Writes a key pair as `<stem>.key.pem` and `<stem>.pub.pem` in `dir`.
pub fn write_key_pair(dir: &Path, stem: &str, kp: &KeyPairPem) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let private = dir.join(format!("{stem}.key.pem"));
    std::fs::write(&private, &kp.private_pem)
        .with_context(|| format!("cannot write `{}`", private.display()))?;
    restrict_permissions(&private)?;
    let public = dir.join(format!("{stem}.pub.pem"));
    std::fs::write(&public, &kp.public_pem)
        .with_context(|| format!("cannot write `{}`", public.display()))
}

fn restrict_permissions(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict permissions of `{}`", path.display()))
}

/// A self-signed certificate for `names`, for the demo's optional TLS and for tests.
pub fn self_signed_cert(names: &[&str]) -> anyhow::Result<(String, String)> {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let cert = rcgen::generate_simple_self_signed(names).context("cannot make a certificate")?;
    Ok((cert.cert.pem(), cert.signing_key.serialize_pem()))
}
