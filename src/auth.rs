//! Authentication: a bearer JWT becomes a validated [`Principal`], or an [`AuthFailure`].
//!
//! Keys are loaded at start from PEM files and a JWK set (a file, or fetched from the identity
//! provider's URL by `rekey::jwks`); a key that cannot be read or parsed stops the gateway, and
//! the keys are swapped whole when they are read again (`rekey`). Each key is pinned to one asymmetric algorithm, and a token must name
//! its key by `kid` and use exactly that key's algorithm, which closes algorithm confusion (an
//! HS256 token "signed" with a public key's bytes) and `alg: none` before any crypto runs.
//! Each key also answers for one issuer: a token's `iss` must be the issuer of the key that
//! signed it, so one trusted identity provider cannot sign as another, and each issuer but
//! one names its callers and token ids behind its own prefix (`auth.subject_prefixes`), so
//! none can name another's (unless given an empty prefix, to share on purpose).
//! `iss`, `aud`, `sub`, `exp`, `nbf` and `iat` are required, numeric where they are times, with a bounded
//! leeway. This module knows nothing of purposes or policies beyond checking that a token's
//! role, areas and purposes name things the catalogue and area register define.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::error::AuthFailure;

/// A caller whose token verified and whose claims make sense.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Principal {
    pub subject: String,
    pub token_id: String,
    pub role: String,
    pub unit: String,
    /// Area ids (GSS codes, polling districts `LA/PD`, party units) the caller may work in.
    pub areas: Vec<String>,
    pub purposes: Vec<String>,
    pub expires_at: i64,
    /// The earliest the token may have been issued: `iat` less the leeway allowed for the
    /// issuer's clock. Revoking a subject revokes every token issued up to that moment, so an
    /// issuer whose clock runs ahead (by up to the leeway) cannot mint one that escapes.
    pub issued_at: i64,
    /// When the role or grant behind the token ends, if the issuer says so.
    pub grant_expires_at: Option<i64>,
    /// The key that verified the token: its id and its fingerprint (`fingerprint`). A
    /// request or stream still going when the keys are read again stands only while that key
    /// is still trusted (`Verifier::still_trusts`).
    pub key_id: String,
    pub key_sha256: String,
}

/// The claims wardgate reads. `exp`/`nbf` are checked by jsonwebtoken and read again here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: Audience,
    pub sub: String,
    pub jti: String,
    pub exp: i64,
    pub nbf: i64,
    /// Required: revoking a subject revokes the tokens issued before it, which a token
    /// without an issue time (or with one in the future) would slip past.
    pub iat: i64,
    pub role: String,
    pub org_unit: String,
    pub areas: Vec<String>,
    pub purposes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_expires: Option<i64>,
}

/// `aud`: one audience, or several (RFC 7519 §4.1.3; Keycloak names `account` beside the
/// client). jsonwebtoken checks that `auth.audience` is among them; one is written as a
/// string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience(pub Vec<String>);

impl From<&str> for Audience {
    fn from(one: &str) -> Self {
        Audience(vec![one.to_owned()])
    }
}

impl From<String> for Audience {
    fn from(one: String) -> Self {
        Audience(vec![one])
    }
}

impl Serialize for Audience {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(one) => Audience(vec![one]),
            OneOrMany::Many(many) => Audience(many),
        })
    }
}

/// The prefix of the gateway's own callers (an operator's `wardgate sar` on the host is
/// `local:USER`): no token names one.
pub const LOCAL_PREFIX: &str = "local:";

/// What a token's claims may name; anything else is refused.
#[derive(Debug, Clone, Default)]
pub struct KnownNames {
    pub roles: HashSet<String>,
    pub areas: HashSet<String>,
    pub purposes: HashSet<String>,
}

#[derive(Clone)]
struct TrustedKey {
    /// From the JWK set fetched from `auth.jwks_url` (not from a file).
    fetched: bool,
    algorithm: Algorithm,
    key: DecodingKey,
    /// The one issuer whose tokens this key verifies.
    issuer: String,
    /// The SHA-256 of the algorithm's name and the key's material, hex (`fingerprint`).
    sha256: String,
}

/// What tells one key from another under the same id: the SHA-256, hex, of the algorithm's
/// name, a newline and the key: an RSA key's modulus and exponent (each as its length in eight
/// bytes, then its big-endian bytes without leading zeros, so that one key reads the same
/// from a PEM file and from a JWK), a P-256 key's point uncompressed (a PEM file may hold it
/// compressed, a JWK never does), or an Ed25519 public key's bytes.
fn fingerprint(algorithm: Algorithm, key: &DecodingKey) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("{algorithm:?}\n"));
    match rsa_public(key) {
        Some(Ok(public)) => {
            use rsa::traits::PublicKeyParts;
            for part in [public.n().to_bytes_be(), public.e().to_bytes_be()] {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part);
            }
        }
        _ => {
            if let jsonwebtoken::DecodingKeyKind::SecretOrDer(der) = key.kind() {
                let point = (key.family() == jsonwebtoken::AlgorithmFamily::Ec)
                    .then(|| p256::ecdsa::VerifyingKey::from_sec1_bytes(der).ok())
                    .flatten()
                    .map(|k| k.to_encoded_point(false));
                h.update(point.as_ref().map_or(&der[..], |p| p.as_bytes()));
            }
        }
    }
    hex::encode(h.finalize())
}

/// An RSA key as the `rsa` crate reads it (`None` for a key of another family): jsonwebtoken
/// holds a PEM key as PKCS#1 DER and a JWK as its modulus and exponent.
fn rsa_public(key: &DecodingKey) -> Option<Result<rsa::RsaPublicKey, String>> {
    use jsonwebtoken::DecodingKeyKind;
    use rsa::pkcs1::DecodeRsaPublicKey;
    if key.family() != jsonwebtoken::AlgorithmFamily::Rsa {
        return None;
    }
    Some(match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => {
            rsa::RsaPublicKey::from_pkcs1_der(der).map_err(|e| e.to_string())
        }
        DecodingKeyKind::RsaModulusExponent { n, e } => rsa::RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(n),
            rsa::BigUint::from_bytes_be(e),
        )
        .map_err(|e| e.to_string()),
    })
}

/// Verifies tokens against the configured keys. Built at start; its keys are swapped whole by
/// `trust` when they are read again (`rekey`).
pub struct Verifier {
    /// The trusted keys by id, swapped whole by `trust`.
    keys: std::sync::RwLock<Arc<HashMap<String, TrustedKey>>>,
    /// Where the keys come from (`[[auth.keys]]` files, `auth.jwks_file`, `auth.jwks_url`), to
    /// read again.
    key_sources: AuthConfig,
    /// The JWK set fetched from `auth.jwks_url` whose keys are trusted (`None` without one, or
    /// once they have been dropped as stale), swapped with the keys by `trust`.
    jwks: std::sync::Mutex<Option<Arc<str>>>,
    /// Asked when a token names a key not trusted: with `auth.jwks_url`, the fetcher
    /// (`rekey::jwks`) fetches the set early, in case the provider has published a new key.
    jwks_wanted: tokio::sync::Notify,
    /// Told on `SIGHUP`: the fetcher fetches the set at once.
    jwks_signalled: tokio::sync::Notify,
    /// When the set was fetched at start (`auth.jwks_max_stale` counts from it).
    jwks_fetched_at: std::time::Instant,
    allowed: Vec<Algorithm>,
    audience: String,
    leeway_secs: u64,
    /// `auth.max_token_lifetime`, in seconds.
    max_lifetime_secs: i64,
    known: KnownNames,
    /// The roles each listed issuer may issue (`auth.issuer_roles`); others issue any.
    issuer_roles: HashMap<String, HashSet<String>>,
    /// Each prefixed issuer's prefix (`auth.subject_prefixes`), and every non-empty one: a
    /// subject named without a prefix may not begin with any of them.
    subject_prefix: HashMap<String, String>,
    prefixes: Vec<String>,
    cache: TokenCache,
    /// Fingerprints of keys a JWK set (fetched, or `auth.jwks_file` read again) published with
    /// their private half (`LeakedKey`): dropped from the keys in use, and passed over in any
    /// key file or set read later in this run, without it too.
    leaked: std::sync::Mutex<HashSet<String>>,
}

/// Keys read again (`Verifier::reread_keys`), not yet trusted, and how they differ from the
/// keys in use, by key id.
pub struct NewKeys {
    keys: HashMap<String, TrustedKey>,
    /// The fetched JWK set they hold keys of (`Verifier::jwks`).
    jwks: Option<Arc<str>>,
    /// Every key id, with its fingerprint (`fingerprint`).
    pub all: BTreeMap<String, String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Ids kept whose key material is not the same.
    pub changed: Vec<String>,
}

/// Tokens that verified recently: a caller sends the same token with every request, and an
/// ES256 verification costs more than the rest of a small request. An entry is used only while
/// the token itself is valid (before `exp` and `grant_expires`, without leeway) and for at most
/// [`CACHE_FOR`]; the key is the whole token, so nothing but the same bytes can hit it.
/// Revocation is checked on every request regardless (`controls`). A hit hands out the same
/// `Principal` (no copy of its strings per request), and tokens are hashed with foldhash: a
/// token is some hundreds of bytes, and SipHash over it was a visible share of a small
/// request. Only verified tokens are ever inserted, so a caller cannot choose the keys.
#[derive(Default)]
pub struct TokenCache {
    entries: std::sync::Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    tokens: HashMap<String, (Arc<Principal>, i64), foldhash::fast::RandomState>,
    /// Which set of keys the tokens were verified with: `Verifier::trust` moves it on
    /// and empties the cache, and a token verified with the keys before is not put in after.
    generation: u64,
}

const CACHE_FOR: i64 = 300;
const CACHE_MAX: usize = 20_000;

impl TokenCache {
    fn get(&self, token: &str, now: i64) -> Option<Arc<Principal>> {
        let entries = self.entries.lock().ok()?;
        let (p, until) = entries.tokens.get(token)?;
        (now < *until).then(|| Arc::clone(p))
    }

    /// The generation of keys a verification starting now uses (`put`'s `generation`).
    fn generation(&self) -> u64 {
        self.entries.lock().map_or(u64::MAX, |e| e.generation)
    }

    /// Forgets every token, and every verification under way: the keys have changed.
    fn next_generation(&self) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.generation += 1;
        entries.tokens.clear();
    }

    /// Keeps a token verified with the keys of `generation`, unless they have changed since.
    fn put(&self, token: &str, p: &Arc<Principal>, now: i64, generation: u64) {
        let until = [
            p.expires_at,
            p.grant_expires_at.unwrap_or(i64::MAX),
            now + CACHE_FOR,
        ]
        .into_iter()
        .min()
        .unwrap_or(now);
        if let Ok(mut entries) = self.entries.lock() {
            if entries.generation != generation {
                return;
            }
            let tokens = &mut entries.tokens;
            if tokens.len() >= CACHE_MAX {
                tokens.retain(|_, (_, u)| *u > now);
                if tokens.len() >= CACHE_MAX {
                    tokens.clear();
                }
            }
            tokens.insert(token.to_owned(), (Arc::clone(p), until));
        }
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
}

/// Whether a key that parsed can verify its algorithm's signatures. A P-384 key named ES256,
/// a JWK whose `kty` is not its `alg`'s, or an RSA modulus past 4,096 bits loads, and then
/// refuses every token as malformed or badly signed, which points at the callers rather
/// than at the key. RSA moduli under 2,048 bits are refused as too weak (NIST SP 800-131A).
fn fits(algorithm: Algorithm, key: &DecodingKey) -> Result<(), String> {
    // An Ed25519 public key is 32 bytes; jsonwebtoken reads the first 32 of whatever it was
    // given, and panics on fewer (a JWK's `x` of 3 bytes stopped the start with a panic, and
    // at a reload ended the task that reloads, silently).
    if key.family() == jsonwebtoken::AlgorithmFamily::Ed {
        let bytes: &[u8] = match key.kind() {
            jsonwebtoken::DecodingKeyKind::SecretOrDer(b) => b,
            jsonwebtoken::DecodingKeyKind::RsaModulusExponent { .. } => &[],
        };
        let Ok(bytes) = <[u8; 32]>::try_from(bytes) else {
            return Err(format!(
                "an Ed25519 public key is 32 bytes; this one is {}",
                bytes.len()
            ));
        };
        // A point of small order (the identity, say) verifies a made-up signature of any
        // message under jsonwebtoken's check, which is not `verify_strict`: whoever wrote
        // such a key into a set or a file could sign any token.
        match ed25519_dalek::VerifyingKey::from_bytes(&bytes) {
            Err(_) => return Err("it is not a point on the Ed25519 curve".to_owned()),
            Ok(k) if k.is_weak() => {
                return Err(
                    "it is a weak Ed25519 key (of small order): with it a signature \
                     made without any private key verifies"
                        .to_owned(),
                );
            }
            Ok(_) => {}
        }
    }
    // A verifier is made for the key before the (made-up) signature is looked at: that is
    // where a key of the wrong kind or curve is found.
    jsonwebtoken::crypto::verify("AA", b"probe", key, algorithm).map_err(|e| e.to_string())?;
    // (An RSA verifier reads its key only when it verifies, and says no more than "invalid".)
    let Some(public) = rsa_public(key) else {
        return Ok(());
    };
    let public = public?;
    let bits = rsa::traits::PublicKeyParts::n(&public).bits();
    if !(2048..=4096).contains(&bits) {
        return Err(format!(
            "its RSA modulus is {bits} bits; 2048 to 4096 are accepted"
        ));
    }
    Ok(())
}

/// Reads and checks every key `cfg` names, with `jwks` the JWK set fetched from
/// `auth.jwks_url` (`None`: none, so none of its keys): a missing or malformed key file or set,
/// a key that cannot verify its algorithm's signatures, or an empty set is an error naming
/// the file or URL.
fn load_keys(
    cfg: &AuthConfig,
    jwks: Option<&str>,
    leaked: &HashSet<String>,
) -> anyhow::Result<HashMap<String, TrustedKey>> {
    let mut keys = file_keys(cfg, leaked)?;
    if let (Some(u), Some(text)) = (&cfg.jwks_url, jwks) {
        add_set(
            cfg,
            &mut keys,
            &format!("the JWKS from `{}`", u.url),
            text,
            true,
            leaked,
        )?;
    }
    Ok(keys)
}

/// A JWK set refused for publishing a private key: its publisher has leaked a signing key. A
/// set fetched so drops the fetched keys at once (`rekey::jwks`), not after
/// `auth.jwks_max_stale`; a key file read again so drops that key (`rekey::keys`); and a
/// key file holding the same key (pinned as `[[auth.keys]]`) goes with it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct LeakedKey {
    message: String,
    /// The fingerprints (`fingerprint`) of the public halves of the keys leaked: not trusted
    /// again in this run (`Verifier::leaked`), though published later without the private half.
    prints: Vec<String>,
}

/// The keys of the files `cfg` names: `[[auth.keys]]`' PEM files and `auth.jwks_file`; those
/// whose fingerprints are in `leaked` (published with their private half earlier in this run)
/// passed over.
fn file_keys(
    cfg: &AuthConfig,
    leaked: &HashSet<String>,
) -> anyhow::Result<HashMap<String, TrustedKey>> {
    // A private key published in the JWKS file is looked for first: a PEM file that cannot
    // be read must not keep a leak from being seen (and the leaked key dropped).
    let jwks = match &cfg.jwks_file {
        Some(path) => {
            let text = fs::read_to_string(path);
            let source = format!("JWKS file `{}`", path.display());
            if let Ok(text) = &text
                && let Some(leak) = leak_in(&source, text)
            {
                return Err(leak.into());
            }
            let text =
                text.with_context(|| format!("cannot read JWKS file `{}`", path.display()))?;
            Some((source, text))
        }
        None => None,
    };
    let mut keys = HashMap::new();
    for k in &cfg.keys {
        let pem = fs::read(&k.public_key_file).with_context(|| {
            format!(
                "key `{}`: cannot read `{}`",
                k.kid,
                k.public_key_file.display()
            )
        })?;
        // jsonwebtoken would take the public key out of a certificate and pass its dates
        // over: an expired signing certificate would be trusted without a word.
        if pem
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            bail!(
                "key `{}`: `{}` is a certificate, whose dates would not be checked: give its \
                 public key (`openssl x509 -pubkey -noout -in CERT`)",
                k.kid,
                k.public_key_file.display()
            );
        }
        // jsonwebtoken reads the first block alone: a key appended for a rotation would be
        // passed over in silence, and a private key beside the public one left unremarked.
        let blocks = memchr::memmem::find_iter(&pem, b"-----BEGIN ").count();
        if blocks > 1 {
            bail!(
                "key `{}`: `{}` holds {blocks} PEM blocks: a key file holds one public key (give \
                 another key its own `[[auth.keys]]` entry, and keep private keys elsewhere)",
                k.kid,
                k.public_key_file.display()
            );
        }
        let key = match k.algorithm {
            Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
            _ => DecodingKey::from_rsa_pem(&pem),
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "key `{}`: `{}` is not a {:?} public key in PEM form: {e}",
                k.kid,
                k.public_key_file.display(),
                k.algorithm
            )
        })?;
        fits(k.algorithm, &key).map_err(|e| {
            anyhow::anyhow!(
                "key `{}`: `{}` cannot verify {:?} signatures: {e}",
                k.kid,
                k.public_key_file.display(),
                k.algorithm
            )
        })?;
        let sha256 = fingerprint(k.algorithm, &key);
        if leaked.contains(&sha256) {
            tracing::warn!(
                "key `{}`: `{}` is a key published with its private half earlier in this run: \
                 not trusted again until the gateway restarts; tokens naming it are refused",
                k.kid,
                k.public_key_file.display()
            );
            continue;
        }
        if keys
            .insert(
                k.kid.clone(),
                TrustedKey {
                    fetched: false,
                    algorithm: k.algorithm,
                    sha256,
                    key,
                    issuer: k.issuer.clone(),
                },
            )
            .is_some()
        {
            bail!(
                "key id `{}` is configured twice (again in `{}`): each trusted key needs an id \
                 of its own",
                k.kid,
                k.public_key_file.display()
            );
        }
    }
    if let Some((source, text)) = jwks {
        add_set(cfg, &mut keys, &source, &text, false, leaked)?;
    }
    Ok(keys)
}

/// A private key's parameters published in the JWK set `text` (from `source`): whoever reads
/// the set can sign tokens with it. Looked for in every entry before anything else refuses
/// the set (and in a lone JWK given where a set belongs), so that the set is refused whole
/// as a leak: the identity provider that published it has leaked a signing key. (A shared
/// secret, `oct`'s `k`, is for an algorithm the gateway never accepts, and is passed over.)
/// An optional member written out empty is no key material.
fn leak_in(source: &str, text: &str) -> Option<LeakedKey> {
    let parsed: serde_json::Value = serde_json::from_str(text).ok()?;
    let entries = match parsed.get("keys").and_then(serde_json::Value::as_array) {
        Some(keys) => keys.clone(),
        None if parsed.is_object() => vec![parsed],
        None => return None,
    };
    let private = ["d", "p", "q", "dp", "dq", "qi", "oth"];
    let given = |v: &serde_json::Value| !(v.is_null() || v.as_str() == Some(""));
    let mut leak: Option<LeakedKey> = None;
    for (n, entry) in entries.iter().enumerate() {
        let Some(member) = private.iter().find(|m| entry.get(**m).is_some_and(given)) else {
            continue;
        };
        let name = entry
            .get("kid")
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| format!("#{n}"), |k| format!("`{k}`"));
        let leak = leak.get_or_insert_with(|| LeakedKey {
            message: format!(
                "{source}: key {name} holds private key material (`{member}`): a JWK set \
                 publishes public keys only, and anyone who can read this one can sign tokens \
                 with it; replace that key at the identity provider"
            ),
            prints: Vec::new(),
        });
        // Its public half, under the one algorithm its type allows (whatever `alg` it was
        // given), as it would be fingerprinted were it published again.
        let mut public = entry.clone();
        if let Some(o) = public.as_object_mut() {
            for m in private.iter().chain(&["alg"]) {
                o.remove(*m);
            }
        }
        let print = serde_json::from_value::<Jwk>(public).ok().and_then(|jwk| {
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some(fingerprint(jwk_algorithm(&jwk)?, &key))
        });
        leak.prints.extend(print);
    }
    leak
}

/// Adds the keys of the JWK set `text` (from `source`, for errors; `fetched` from
/// `auth.jwks_url`) to `keys`.
fn add_set(
    cfg: &AuthConfig,
    keys: &mut HashMap<String, TrustedKey>,
    source: &str,
    text: &str,
    fetched: bool,
    leaked: &HashSet<String>,
) -> anyhow::Result<()> {
    /// A set as published: its entries are read one by one, so that one of a kind the
    /// gateway does not read (an encryption key, another algorithm's) is passed over, not a
    /// reason to refuse the rest.
    #[derive(Deserialize)]
    struct Published {
        keys: Vec<serde_json::Value>,
    }
    if let Some(leak) = leak_in(source, text) {
        return Err(leak.into());
    }
    let set: Published =
        serde_json::from_str(text).with_context(|| format!("{source} is not a JWK set"))?;
    let mut passed_over = Vec::new();
    let mut taken = 0;
    let mut leaked_only = 0;
    for (n, entry) in set.keys.into_iter().enumerate() {
        let name = entry
            .get("kid")
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| format!("#{n}"), |k| format!("`{k}`"));
        let would_use = would_use(&entry, &cfg.algorithms);
        let jwk: Jwk = match serde_json::from_value(entry) {
            Ok(jwk) => jwk,
            // A key the gateway would use must be whole, as below: a malformed one (a number
            // for `e`, an EC key without `y`) passed over would make a broken rotation look
            // like one that worked, every token it signs refused.
            Err(e) if would_use => bail!("{source}: key {name} is malformed: {e}"),
            Err(e) => {
                passed_over.push(format!("{name} (not a key the gateway reads: {e})"));
                continue;
            }
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            passed_over.push(format!("{name} (no `kid`, so no token can name it)"));
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            passed_over.push(format!("{name} (not for signatures: `use`)"));
            continue;
        }
        let algorithm = match jwk_algorithm(&jwk) {
            Some(a) if cfg.algorithms.contains(&a) => a,
            Some(a) => {
                passed_over.push(format!(
                    "{name} ({a:?}, which `auth.algorithms` does not allow)"
                ));
                continue;
            }
            None => {
                passed_over.push(format!("{name} (an algorithm the gateway does not accept)"));
                continue;
            }
        };
        // A key the gateway would use must be whole: one that is not stops the set.
        let key = DecodingKey::from_jwk(&jwk).with_context(|| format!("{source}: key `{kid}`"))?;
        fits(algorithm, &key).map_err(|e| {
            anyhow::anyhow!("{source}: key `{kid}` cannot verify {algorithm:?} signatures: {e}")
        })?;
        let sha256 = fingerprint(algorithm, &key);
        if leaked.contains(&sha256) {
            // Its public half only, now: passed over (a provider keeps an old key in its set
            // a while after rotating), never a reason to refuse the rest or to drop the keys
            // in use.
            leaked_only += 1;
            passed_over.push(format!(
                "`{kid}` (published with its private half earlier in this run: not trusted \
                 again until the gateway restarts)"
            ));
            continue;
        }
        if keys
            .insert(
                kid.clone(),
                TrustedKey {
                    fetched,
                    algorithm,
                    sha256,
                    key,
                    issuer: cfg.jwks_issuer.clone(),
                },
            )
            .is_some()
        {
            bail!(
                "{source}: key id `{kid}` is configured twice (in this set, or in an \
                 `[[auth.keys]]` file too): each trusted key needs an id of its own"
            );
        }
        taken += 1;
    }
    // An empty set is more likely a failed fetch than a choice, and would drop every key of
    // the identity provider's at a reload (`rekey`): stop and say where.
    if taken == 0 && leaked_only > 0 {
        bail!(
            "{source} holds no keys the gateway can use: {} published with its private half \
             earlier in this run (passed over: {}); publish a new signing key there, or \
             remove the set and restart",
            if leaked_only == 1 {
                "its key was"
            } else {
                "its keys were"
            },
            passed_over.join("; ")
        );
    }
    if taken == 0 {
        let why = match passed_over.is_empty() {
            true => String::new(),
            false => format!(" (passed over: {})", passed_over.join("; ")),
        };
        bail!(
            "{source} holds no keys the gateway can use{why}: an identity provider's published \
             set always holds its signing keys (a failed fetch?); leave `auth.jwks_file` and \
             `auth.jwks_url` out to trust no key from it"
        );
    }
    if !passed_over.is_empty() {
        tracing::warn!(passed_over = %passed_over.join("; "),
            "{source}: keys passed over, not trusted: tokens naming them are refused");
    }
    Ok(())
}

impl Verifier {
    /// Loads every configured key, with `jwks` the set fetched from `auth.jwks_url` at start
    /// (`rekey::jwks::fetch_at_start`); a missing or malformed key file or set is a start-up
    /// error naming it.
    pub fn from_config(
        cfg: &AuthConfig,
        known: KnownNames,
        jwks: Option<&str>,
    ) -> anyhow::Result<Verifier> {
        if cfg.jwks_url.is_some() != jwks.is_some() {
            bail!(
                "`auth.jwks_url`'s set must be fetched before the keys are loaded, and only then"
            );
        }
        let keys = load_keys(cfg, jwks, &HashSet::new())?;
        let mut issuer_roles = HashMap::new();
        for (issuer, roles) in &cfg.issuer_roles {
            if let Some(role) = roles.iter().find(|r| !known.roles.contains(*r)) {
                bail!(
                    "`auth.issuer_roles`: `{issuer}` is given role `{role}`, which the catalogue \
                     does not define"
                );
            }
            issuer_roles.insert(issuer.clone(), roles.iter().cloned().collect());
        }
        Ok(Verifier {
            keys: std::sync::RwLock::new(Arc::new(keys)),
            key_sources: cfg.clone(),
            jwks: std::sync::Mutex::new(jwks.map(Arc::from)),
            jwks_wanted: tokio::sync::Notify::new(),
            jwks_signalled: tokio::sync::Notify::new(),
            jwks_fetched_at: std::time::Instant::now(),
            issuer_roles,
            subject_prefix: cfg.subject_prefixes.clone().into_iter().collect(),
            prefixes: (cfg.subject_prefixes.values())
                .filter(|p| !p.is_empty())
                .cloned()
                .collect(),
            allowed: cfg.algorithms.clone(),
            audience: cfg.audience.clone(),
            leeway_secs: cfg.leeway.as_secs(),
            max_lifetime_secs: i64::try_from(cfg.max_token_lifetime.as_secs()).unwrap_or(i64::MAX),
            known,
            cache: TokenCache::default(),
            leaked: Default::default(),
        })
    }

    /// The key files the configuration named (`[[auth.keys]]`' PEM files, then
    /// `auth.jwks_file`): what `reread_keys` reads.
    pub fn key_files(&self) -> Vec<std::path::PathBuf> {
        let pems = self
            .key_sources
            .keys
            .iter()
            .map(|k| k.public_key_file.clone());
        pems.chain(self.key_sources.jwks_file.clone()).collect()
    }

    /// `auth.jwks_url`, where the configuration gives one.
    pub fn jwks_url(&self) -> Option<&crate::config::JwksUrl> {
        self.key_sources.jwks_url.as_ref()
    }

    /// The fetched JWK set whose keys are trusted now, if any.
    pub fn jwks_in_force(&self) -> Option<Arc<str>> {
        self.jwks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Told when a token names a key not trusted (with `auth.jwks_url`; see `jwks_wanted`).
    pub fn jwks_wanted(&self) -> &tokio::sync::Notify {
        &self.jwks_wanted
    }

    /// Told on `SIGHUP`, to fetch the set at once.
    pub fn jwks_signalled(&self) -> &tokio::sync::Notify {
        &self.jwks_signalled
    }

    /// When the set in force at start was fetched.
    pub fn jwks_fetched_at(&self) -> std::time::Instant {
        self.jwks_fetched_at
    }

    /// Which keys are in use: moved on by every `trust`.
    pub fn key_generation(&self) -> u64 {
        self.cache.generation()
    }

    /// Reads the keys again from the files the configuration named at start (`[[auth.keys]]`'s
    /// PEM files and `auth.jwks_file`; the configuration file itself is not read again), with
    /// the fetched JWK set in force, as strictly as at start. Nothing changes until `trust` is
    /// given the result: the caller makes the change's audit record durable first. A key
    /// found published with its private half (`LeakedKey`) is noted, not trusted again in this
    /// run: `without_leaked` drops it from the keys in use.
    pub fn reread_keys(&self) -> anyhow::Result<NewKeys> {
        let jwks = self.jwks_in_force();
        let keys = load_keys(&self.key_sources, jwks.as_deref(), &self.leaked_prints());
        self.note_leak(&keys);
        Ok(self.differing(keys?, jwks))
    }

    /// The fingerprints of the keys published with their private half in this run.
    fn leaked_prints(&self) -> HashSet<String> {
        self.leaked.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Notes the keys a read refused for a leak found published with their private half.
    fn note_leak<T>(&self, read: &anyhow::Result<T>) {
        if let Err(e) = read
            && let Some(leak) = e.downcast_ref::<LeakedKey>()
            && let Ok(mut l) = self.leaked.lock()
        {
            l.extend(leak.prints.iter().cloned());
        }
    }

    /// Whether a key in use was published with its private half in this run (from a key file,
    /// the fetched set, or both: one key pinned as a file and also published).
    pub fn uses_leaked(&self) -> bool {
        let leaked = self.leaked_prints();
        (self.keys_in_use().values()).any(|k| leaked.contains(&k.sha256))
    }

    /// The keys in use but those published with their private half in this run, wherever
    /// from; the fetched set in force stays the one in force (its other keys are kept).
    /// Trusted only once given to `trust`.
    pub fn without_leaked(&self) -> NewKeys {
        let leaked = self.leaked_prints();
        let keys = (self.keys_in_use().iter())
            .filter(|(_, k)| !leaked.contains(&k.sha256))
            .map(|(id, k)| (id.clone(), k.clone()))
            .collect();
        self.differing(keys, self.jwks_in_force())
    }

    /// The keys in use with those of the fetched JWK set replaced by `jwks`'s (a new set, or
    /// `None` to drop them), as strictly as at start; the key files are not read (their keys
    /// stay as in use, but any published with its private half). Trusted only once given to
    /// `trust`.
    pub fn read_keys(&self, jwks: Option<Arc<str>>) -> anyhow::Result<NewKeys> {
        // (A key file's key published with its private half is not kept either.)
        let leaked = self.leaked_prints();
        let mut keys: HashMap<String, TrustedKey> = (self.keys_in_use().iter())
            .filter(|(_, k)| !k.fetched && !leaked.contains(&k.sha256))
            .map(|(id, k)| (id.clone(), k.clone()))
            .collect();
        if let (Some(u), Some(text)) = (&self.key_sources.jwks_url, &jwks) {
            let source = format!("the JWKS from `{}`", u.url);
            let added = add_set(&self.key_sources, &mut keys, &source, text, true, &leaked);
            self.note_leak(&added);
            added?;
        }
        Ok(self.differing(keys, jwks))
    }

    /// Whether `token` (signed under `kid`) would pass this verifier's key checks: a trusted
    /// key of that id, its algorithm and issuer, its signature. Its claims are not judged.
    /// For the start's check of `[signing]` (`startup`), so that break-glass minting is not
    /// found broken when it is needed.
    pub fn key_verifies(&self, kid: &str, issuer: &str, token: &str) -> anyhow::Result<()> {
        let keys = self.keys_in_use();
        let Some(trusted) = keys.get(kid) else {
            bail!("no trusted key (`[[auth.keys]]`, the JWK set) has the id `{kid}`");
        };
        if trusted.issuer != issuer {
            bail!(
                "the trusted key `{kid}` verifies tokens of `{}`, not of `{issuer}`",
                trusted.issuer
            );
        }
        let mut validation = Validation::new(trusted.algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        jsonwebtoken::decode::<serde_json::Value>(token, &trusted.key, &validation)
            .map(drop)
            .map_err(|e| {
                anyhow::anyhow!("the trusted key `{kid}` does not verify what it signs: {e}")
            })
    }

    fn keys_in_use(&self) -> Arc<HashMap<String, TrustedKey>> {
        Arc::clone(
            &self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// `keys` (with the fetched set `jwks`), and how they differ from the keys in use.
    fn differing(&self, keys: HashMap<String, TrustedKey>, jwks: Option<Arc<str>>) -> NewKeys {
        let before = self.keys_in_use();
        let ids = |m: &HashMap<String, TrustedKey>, other: &HashMap<String, TrustedKey>| {
            let mut v: Vec<String> = m
                .keys()
                .filter(|k| !other.contains_key(*k))
                .cloned()
                .collect();
            v.sort();
            v
        };
        let mut changed: Vec<String> = (keys.iter())
            .filter(|(id, k)| before.get(*id).is_some_and(|b| b.sha256 != k.sha256))
            .map(|(id, _)| id.clone())
            .collect();
        changed.sort();
        NewKeys {
            added: ids(&keys, &before),
            removed: ids(&before, &keys),
            changed,
            all: (keys.iter())
                .map(|(id, k)| (id.clone(), k.sha256.clone()))
                .collect(),
            keys,
            jwks,
        }
    }

    /// Whether the key that verified `p`'s token is still trusted, the same key under the
    /// same id: a request or stream that outlasts a reload (an export, a live feed) stops when
    /// its key is dropped or replaced, as a new request with its token would.
    pub fn still_trusts(&self, p: &Principal) -> bool {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.get(&p.key_id)
            .is_some_and(|k| k.sha256 == p.key_sha256)
    }

    /// Verifies with `new` from now on, and forgets every token verified with the keys
    /// before, so that a key removed stops its tokens at once, cached or not.
    pub fn trust(&self, new: NewKeys) {
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new.keys);
        *self
            .jwks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new.jwks;
        self.cache.next_generation();
    }

    /// Whether any key is trusted: none, once a fetched set was dropped as stale with no key
    /// file beside it, and every caller is refused (`/readyz` says so).
    pub fn trusts_any_key(&self) -> bool {
        !(self.keys.read())
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// Takes `new`, the same keys as those in use (`NewKeys` naming none added, removed or
    /// changed), as read from its JWK set: the set is the one in force from now on, and the
    /// tokens verified stay cached.
    pub fn keep(&self, new: NewKeys) {
        *self
            .jwks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new.jwks;
    }

    /// Verifies a raw `Authorization` header value (`None` if the header was absent).
    pub fn verify_header(
        &self,
        header: Option<&[u8]>,
        now: i64,
    ) -> Result<Arc<Principal>, AuthFailure> {
        self.verify(bearer(header)?, now)
    }

    /// `verify_header`, and for a token refused only because its `exp` or `grant_expires` has
    /// passed (it verifies in every other respect: signature, issuer, audience, claims), whom
    /// it names. Still refused; but the audit record can say which leaver tried, and breach
    /// detection (`ended_grant`) key on them rather than on an address they can change.
    pub fn verify_header_naming(
        &self,
        header: Option<&[u8]>,
        now: i64,
    ) -> Result<Arc<Principal>, (AuthFailure, Option<Arc<Principal>>)> {
        self.verify_naming(bearer(header).map_err(|f| (f, None))?, now)
    }

    /// The last second at which a verified caller's token is still accepted, as verification
    /// judges it (`exp` with the configured leeway, `grant_expires` without): a long answer
    /// (an export, the live feed) asks again before each part it releases.
    pub fn ends_at(&self, p: &Principal) -> i64 {
        let exp = p.expires_at.saturating_add(self.leeway_secs as i64);
        p.grant_expires_at
            .map_or(exp, |g| exp.min(g.saturating_sub(1)))
    }

    /// Verifies a compact JWT.
    pub fn verify(&self, token: &str, now: i64) -> Result<Arc<Principal>, AuthFailure> {
        self.verify_naming(token, now)
            .map_err(|(failure, _)| failure)
    }

    /// `verify`, naming the caller of a token refused only as expired (`verify_header_naming`).
    fn verify_naming(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Arc<Principal>, (AuthFailure, Option<Arc<Principal>>)> {
        if let Some(p) = self.cache.get(token, now) {
            return Ok(p);
        }
        let generation = self.cache.generation();
        let principal = self.check(token, now).map_err(|f| (f, None))?;
        if now > self.ends_at(&principal) {
            return Err((AuthFailure::Expired, Some(Arc::new(principal))));
        }
        let principal = Arc::new(principal);
        self.cache.put(token, &principal, now, generation);
        Ok(principal)
    }

    /// Verifies a token, uncached, in every respect but its end (`exp`, `grant_expires`),
    /// which `verify_naming` judges from the claims (`ends_at`): one signature check whether
    /// or not it has ended.
    fn check(&self, token: &str, now: i64) -> Result<Principal, AuthFailure> {
        let header = peek_header(token)?;
        let alg = header.alg.ok_or(AuthFailure::MalformedToken)?;
        let alg: Algorithm = alg.parse().map_err(|_| AuthFailure::DisallowedAlgorithm)?;
        if !self.allowed.contains(&alg) {
            return Err(AuthFailure::DisallowedAlgorithm);
        }
        let kid = header.kid.ok_or(AuthFailure::UnknownKey)?;
        let keys = Arc::clone(
            &self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let Some(trusted) = keys.get(&kid) else {
            if self.key_sources.jwks_url.is_some() {
                // Perhaps published since the last fetch (at most one early fetch every 30 s, or
                // `auth.jwks_refresh` if shorter, whatever callers send).
                self.jwks_wanted.notify_one();
            }
            return Err(AuthFailure::UnknownKey);
        };
        if trusted.algorithm != alg {
            return Err(AuthFailure::DisallowedAlgorithm);
        }
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        validation.validate_exp = false;
        // (`iat` is required by `Claims` itself: jsonwebtoken checks only some of these.)
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        // The signing key's own issuer, not any trusted one (`config::key_issuer`).
        validation.set_issuer(&[&trusted.issuer]);
        validation.set_audience(&[&self.audience]);
        let data = jsonwebtoken::decode::<Claims>(token, &trusted.key, &validation)
            .map_err(|e| classify(e.kind()))?;
        let mut principal = self.principal(data.claims, &trusted.issuer, now)?;
        principal.key_id = kid;
        principal.key_sha256.clone_from(&trusted.sha256);
        Ok(principal)
    }

    /// The caller the verified claims of a token from `issuer` describe.
    fn principal(&self, c: Claims, issuer: &str, now: i64) -> Result<Principal, AuthFailure> {
        let blank = |s: &str| s.trim().is_empty();
        if blank(&c.sub) || blank(&c.jti) || blank(&c.role) || blank(&c.org_unit) {
            return Err(AuthFailure::InvalidClaims);
        }
        if !self.known.roles.contains(&c.role)
            || c.areas.iter().any(|a| !self.known.areas.contains(a))
            || c.purposes.iter().any(|p| !self.known.purposes.contains(p))
        {
            return Err(AuthFailure::UnknownName);
        }
        // A partner's identity provider may be trusted for some roles only: its tokens for
        // any other (a DPO's, say) are refused whatever else they say.
        if self
            .issuer_roles
            .get(issuer)
            .is_some_and(|roles| !roles.contains(&c.role))
        {
            return Err(AuthFailure::RoleNotFromIssuer);
        }
        let subject = self.in_namespace(issuer, c.sub)?;
        let token_id = self.in_namespace(issuer, c.jti)?;
        // Only ids the revocation endpoint can name: a token it could not revoke is not one
        // to accept.
        if !revocable_id(&subject) || !revocable_id(&token_id) {
            return Err(AuthFailure::InvalidClaims);
        }
        // The detector's own name in the controls journal: no caller's actions may read as
        // its containment. Nor may a caller be counted as an address or an unknown caller.
        if subject == crate::watch::ACTOR || crate::watch::rules::names_no_caller(&subject) {
            return Err(AuthFailure::InvalidClaims);
        }
        // Issued in the future: a revocation of the subject placed now would not cover it.
        if c.iat > now.saturating_add(self.leeway_secs as i64) {
            return Err(AuthFailure::IssuedInFuture);
        }
        // Made to last past `auth.max_token_lifetime` (a misconfigured provider, a token
        // minted for ten years): access is meant to be time-limited, and a stolen token of
        // that kind is good until someone notices.
        if c.exp.saturating_sub(c.iat) > self.max_lifetime_secs {
            return Err(AuthFailure::LifetimeTooLong);
        }
        Ok(Principal {
            subject,
            token_id,
            role: c.role,
            unit: c.org_unit,
            areas: c.areas,
            purposes: c.purposes,
            expires_at: c.exp,
            issued_at: c.iat.saturating_sub(self.leeway_secs as i64),
            grant_expires_at: c.grant_expires,
            // (Set by `check`, which knows the key.)
            key_id: String::new(),
            key_sha256: String::new(),
        })
    }
}

impl Verifier {
    /// A token's `sub` or `jti` in `issuer`'s namespace: behind the issuer's prefix, if it
    /// has one (`auth.subject_prefixes`), so that the same name from two identity providers is
    /// two callers (or tokens) in the audit log, revocations, quotas and breach detection. A
    /// name given bare may not begin with another issuer's prefix, nor with the gateway's own
    /// (`local:`, its operators'), or it would be theirs.
    fn in_namespace(&self, issuer: &str, name: String) -> Result<String, AuthFailure> {
        match self.subject_prefix.get(issuer).filter(|p| !p.is_empty()) {
            Some(prefix) => Ok(format!("{prefix}{name}")),
            None if std::iter::once(LOCAL_PREFIX)
                .chain(self.prefixes.iter().map(String::as_str))
                .any(|p| name.starts_with(p)) =>
            {
                Err(AuthFailure::NameNotFromIssuer)
            }
            None => Ok(name),
        }
    }
}

/// The token of a raw `Authorization` header value (`None`: the header was absent).
fn bearer(header: Option<&[u8]>) -> Result<&str, AuthFailure> {
    let header = header.ok_or(AuthFailure::MissingToken)?;
    let header = std::str::from_utf8(header).map_err(|_| AuthFailure::MalformedHeader)?;
    // The scheme's name is case-insensitive (RFC 9110, 11.1).
    let token = (header.get(..7))
        .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
        .and_then(|_| header.get(7..))
        .ok_or(AuthFailure::MalformedHeader)?
        .trim();
    if token.is_empty() {
        return Err(AuthFailure::MissingToken);
    }
    Ok(token)
}

/// Reads the JOSE header without trusting it, so refusals can say which check failed.
fn peek_header(token: &str) -> Result<RawHeader, AuthFailure> {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthFailure::MalformedToken);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .map_err(|_| AuthFailure::MalformedToken)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthFailure::MalformedToken)
}

fn classify(kind: &ErrorKind) -> AuthFailure {
    match kind {
        ErrorKind::InvalidSignature => AuthFailure::BadSignature,
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
        ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthFailure::DisallowedAlgorithm,
        ErrorKind::MissingRequiredClaim(_)
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::InvalidSubject
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthFailure::InvalidClaims,
        // A token whose parts do not decode, or whose signature bytes are not a signature.
        _ => AuthFailure::MalformedToken,
    }
}

/// Whether a JWK set's entry, as published, is one the gateway would verify tokens with, were
/// it whole: named (`kid`), for signatures (`use` absent or `sig`), of an algorithm
/// `auth.algorithms` allows: its `alg`, or without one the algorithm its type and curve give
/// (as `jwk_algorithm`: RS256 for RSA, ES256 for P-256, EdDSA for Ed25519; a curve the
/// gateway does not read, `secp256k1` or `Ed448`, gives none, and such a key is passed over).
fn would_use(entry: &serde_json::Value, allowed: &[Algorithm]) -> bool {
    let text = |k: &str| entry.get(k).and_then(serde_json::Value::as_str);
    let named = text("kid").is_some();
    let signing = entry.get("use").is_none() || text("use") == Some("sig");
    let algorithm = match (text("alg"), text("kty"), text("crv")) {
        // EdDSA names Ed448 as well (RFC 8037): such a key is of a curve not read here.
        (Some("EdDSA"), _, Some(crv)) if crv != "Ed25519" => None,
        (Some(alg), _, _) => allowed.iter().find(|a| format!("{a:?}") == alg).copied(),
        (None, Some("RSA"), _) => Some(Algorithm::RS256),
        (None, Some("EC"), Some("P-256")) => Some(Algorithm::ES256),
        (None, Some("OKP"), Some("Ed25519")) => Some(Algorithm::EdDSA),
        _ => None,
    };
    named && signing && algorithm.is_some_and(|a| allowed.contains(&a))
}

/// The one algorithm a published key verifies: its `alg` where it names one of the three the
/// gateway accepts (`None` for any other), or, without one, the one its type and curve allow.
fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
    match jwk.common.key_algorithm {
        Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
        Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
        Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
        Some(_) => None,
        // No `alg` (Microsoft Entra ID publishes none): the one algorithm of the three the
        // key's type and curve allow, so the key is still pinned to exactly one.
        None => match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Some(Algorithm::ES256)
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Some(Algorithm::EdDSA)
            }
            _ => None,
        },
    }
}

/// A subject or token id a revocation can name (`POST /revocations`): not blank, at most 256
/// bytes, without whitespace around it or control characters in it. Tokens are accepted only
/// with such ids, so that every token accepted can be revoked, and a revocation of `"alice "`
/// (which names no token anyone holds) is refused rather than recorded as if it took.
pub fn revocable_id(id: &str) -> bool {
    !id.trim().is_empty() && id.len() <= 256 && id.trim() == id && !id.chars().any(char::is_control)
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
