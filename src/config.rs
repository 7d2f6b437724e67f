//! The gateway's configuration: one TOML file, parsed once at the edge into typed values.
//!
//! This is the only module that reads the configuration file. Every string that means
//! something (an address, a duration, a URL, a path) becomes its typed form here, so the rest of
//! the crate never parses configuration again. Unknown keys are errors (`deny_unknown_fields`):
//! a misspelt `durabilty` must stop the gateway, not silently fall back to a default. Relative
//! paths are resolved against the directory of the configuration file. Reading the files those
//! paths name (keys, policies, catalogue) belongs to the modules that own them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::audit::Durability;

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub signing: Option<SigningConfig>,
    pub policy_dir: PathBuf,
    /// The policy pack's tests (`policy.tests`), run at start; unset: `policy_dir/tests`
    /// (`startup::check`; with neither, see `policy_allow_untested`).
    pub policy_tests: Option<PathBuf>,
    /// Start with no policy tests at all (`policy.allow_untested`, default false: a pack
    /// without tests stops the start).
    pub policy_allow_untested: bool,
    /// The file this configuration was read from (`load`; empty when parsed from text).
    pub file: PathBuf,
    pub catalog_file: PathBuf,
    pub areas_file: PathBuf,
    pub audit: AuditConfig,
    pub redis: Option<crate::controls::RedisSettings>,
    /// Records per principal per hour and per day, by role; roles not listed are unlimited.
    pub quotas: std::collections::HashMap<String, crate::controls::Limits>,
    pub datasets: BTreeMap<String, UpstreamConfig>,
    /// Breach detection rules and the breach log.
    pub watch: crate::watch::settings::WatchSettings,
    /// Small-cell suppression and the group limit for aggregates.
    pub aggregates: crate::aggregate::Settings,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `None` only when the file says `plaintext = true`.
    pub tls: Option<TlsFiles>,
    pub data_dir: PathBuf,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    pub shutdown_grace: Duration,
    /// How long a client has to send a request's headers (and, kept alive, the next
    /// request's); then its connection is closed.
    pub header_read_timeout: Duration,
    /// How long a streamed answer (an export) waits for its client to take the next chunk:
    /// past it the answer is cut (`client_stalled`), and its datastore connection let go. Twice
    /// it (a minute more at least), how long any write to a client may wait for it to take a
    /// byte (`server::Limits`).
    pub client_stall_timeout: Duration,
    /// How many connections each listener (data plane, admin plane) holds open at once.
    pub max_connections: usize,
    /// How many exports and aggregates one caller may have under way at once (`bulk`).
    pub max_bulk_reads_per_caller: usize,
    /// Load balancers whose `X-Forwarded-For` names the client (`client_addr`).
    pub trusted_proxies: crate::client_addr::TrustedProxies,
    /// How often the files `SIGHUP` reads again (keys, certificates, the policy pack) are
    /// checked for a change, which is then read as a signal would have it (`rekey`); `None`
    /// (`"off"`): only on `SIGHUP`.
    pub file_check_interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub issuers: Vec<String>,
    pub audience: String,
    pub leeway: Duration,
    /// The longest a token may live (`exp` less `iat`): a longer one is refused.
    pub max_token_lifetime: Duration,
    pub algorithms: Vec<Algorithm>,
    pub keys: Vec<KeyFile>,
    pub jwks_file: Option<PathBuf>,
    /// A JWK set fetched from the identity provider instead (`auth.jwks_url`).
    pub jwks_url: Option<JwksUrl>,
    /// The issuer whose tokens the JWK set's keys verify (one of `issuers`), from the file or
    /// the URL.
    pub jwks_issuer: String,
    /// The roles an issuer may issue, for the issuers listed; an issuer not listed may issue
    /// any role the catalogue defines. (Role names are checked against the catalogue by
    /// `auth::Verifier`, which knows it.)
    pub issuer_roles: BTreeMap<String, Vec<String>>,
    /// Each listed issuer's subjects are its `sub` behind this prefix (`auth.subject_prefixes`),
    /// so that no two identity providers can name the same caller. At most one issuer has
    /// none; an empty prefix shares that issuer's namespace on purpose.
    pub subject_prefixes: BTreeMap<String, String>,
}

/// `auth.jwks_url`: the identity provider's published JWK set, fetched over TLS only, at
/// start and then every `refresh` (`rekey::jwks`).
#[derive(Debug, Clone)]
pub struct JwksUrl {
    /// An `https://` URL.
    pub url: http::Uri,
    /// The CA certificates the identity provider's certificate must chain to
    /// (`auth.jwks_ca_file`; the system's bundle for a public provider).
    pub ca_file: PathBuf,
    /// How often the set is fetched (`auth.jwks_refresh`).
    pub refresh: Duration,
    /// How long the set's keys are trusted after the last fetch that brought a set the gateway
    /// took (`auth.jwks_max_stale`): past it they are dropped, and their tokens refused.
    pub max_stale: Duration,
}

#[derive(Debug, Clone)]
pub struct KeyFile {
    pub kid: String,
    pub algorithm: Algorithm,
    pub public_key_file: PathBuf,
    /// The one issuer (of `AuthConfig::issuers`) whose tokens this key verifies: another
    /// issuer's key cannot sign for it.
    pub issuer: String,
}

/// A private key that `wardgate token` may sign with (demos, tests, break-glass tooling).
#[derive(Debug, Clone)]
pub struct SigningConfig {
    pub kid: String,
    pub algorithm: Algorithm,
    pub private_key_file: PathBuf,
    pub issuer: String,
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub durability: Durability,
    pub max_batch: usize,
    /// How long a group commit may wait for more records under load (page-cache mode: only
    /// when saturated).
    pub commit_window: Duration,
    pub segment_max_bytes: u64,
    /// Sealed segments whose newest record is older than this are pruned (none: keep all).
    pub retention: Option<Duration>,
    /// How long client addresses stay readable (`None`: as long as the record).
    pub client_addr_retention: Option<Duration>,
    /// How often `serve` prunes.
    pub prune_interval: Duration,
    /// Where the chain head is kept off the host (`[audit.witness]`; none: nowhere).
    pub witness: Option<crate::audit::witness::WitnessConfig>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub base: http::Uri,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Idle keep-alive connections kept open to the datastore: at least as many as requests
    /// to it run at once at peak, or the pool closes connections it will need a moment
    /// later and opens new ones (a TCP handshake and a lingering socket per request).
    pub idle_connections: usize,
    /// Sent upstream as `Authorization`; the caller's own header never is.
    pub authorization: Option<String>,
    /// For an `https://` datastore: whom to trust and, where the datastore asks, who the
    /// gateway is. `None` for `http://`.
    pub tls: Option<UpstreamTls>,
    /// Which API the datastore speaks.
    pub dialect: Dialect,
}

/// TLS to a datastore (`datasets.*.ca_file`, `client_cert_file`, `client_key_file`); the
/// files are read when the upstream clients are built (`connector::connector`).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The CA certificates (PEM) the datastore's certificate must chain to: only these, never
    /// the system's roots.
    pub ca_file: PathBuf,
    /// The gateway's certificate chain and key (PEM), for a datastore that authenticates it.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// The datastore APIs wardgate knows how to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dialect {
    /// wardgate's datastore API (the demo datastore): `/{collection}`, `/{collection}/{id}`.
    Wardgate,
    /// Datasette serving SQLite: a canned query for listings, the row API for reads; read-only.
    Datasette(DatasetteApi),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetteApi {
    pub database: String,
    pub table: String,
    /// A canned query taking `:limit`, `:offset`, `:areas` (a JSON array of area ids, or empty)
    /// and one parameter per filter the asset register declares.
    pub list_query: String,
    /// Columns holding JSON text that Datasette should return as JSON (`_json=`).
    #[serde(default)]
    pub json_columns: Vec<String>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file `{}`", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut cfg = Config::parse(&text, &base)
            .with_context(|| format!("in config file `{}`", path.display()))?;
        cfg.file = path.to_path_buf();
        Ok(cfg)
    }

    /// Parses configuration text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        raw.resolve(base)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    auth: RawAuth,
    signing: Option<RawSigning>,
    policy: RawPolicy,
    catalog: RawFile,
    geography: RawFile,
    audit: RawAudit,
    redis: Option<RawRedis>,
    #[serde(default)]
    quotas: std::collections::HashMap<String, crate::controls::Limits>,
    datasets: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    watch: crate::watch::settings::RawWatch,
    #[serde(default)]
    aggregates: RawAggregates,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAggregates {
    min_cell: Option<u64>,
    max_groups: Option<usize>,
    round_to: Option<u64>,
}

impl RawAggregates {
    fn resolve(self) -> anyhow::Result<crate::aggregate::Settings> {
        let default = crate::aggregate::Settings::default();
        let min_cell = self.min_cell.unwrap_or(default.min_cell);
        if min_cell < 2 {
            bail!(
                "`aggregates.min_cell` is {min_cell}: it must be at least 2 (a cell of one record \
                 is that person's values; 10 is the default)"
            );
        }
        let max_groups = self.max_groups.unwrap_or(default.max_groups);
        if max_groups == 0 {
            bail!("`aggregates.max_groups` must be at least 1");
        }
        let round_to = self.round_to.unwrap_or(default.round_to);
        if round_to == 0 || round_to > min_cell {
            bail!(
                "`aggregates.round_to` is {round_to}: it must be from 1 (exact counts, which \
                 two answers can be subtracted to learn a left-out cell's size) to \
                 `aggregates.min_cell` ({min_cell}; more would round cells shown to zero)"
            );
        }
        // Counts are rounded down: were the threshold not a multiple of the step, the
        // smallest cells shown would stand for fewer sizes than the rest (with 12 and 5, a
        // 10 shown could only be 12, 13 or 14), and read below the threshold.
        if !min_cell.is_multiple_of(round_to) {
            bail!(
                "`aggregates.min_cell` ({min_cell}) must be a multiple of `aggregates.round_to` \
                 ({round_to}): counts are rounded down to a multiple of it, and a threshold \
                 between two multiples would narrow the smallest cells shown"
            );
        }
        Ok(crate::aggregate::Settings {
            min_cell,
            max_groups,
            round_to,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    admin_listen: Option<String>,
    data_dir: PathBuf,
    #[serde(default)]
    plaintext: bool,
    #[serde(default)]
    admin_plaintext_off_loopback: bool,
    #[serde(default)]
    plaintext_off_loopback: bool,
    tls: Option<RawTls>,
    max_request_bytes: Option<usize>,
    max_response_bytes: Option<usize>,
    shutdown_grace: Option<String>,
    header_read_timeout: Option<String>,
    client_stall_timeout: Option<String>,
    max_connections: Option<usize>,
    max_bulk_reads_per_caller: Option<usize>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    file_check_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    issuers: Vec<String>,
    audience: String,
    leeway: Option<String>,
    max_token_lifetime: Option<String>,
    algorithms: Vec<String>,
    #[serde(default)]
    keys: Vec<RawKey>,
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    jwks_ca_file: Option<PathBuf>,
    jwks_refresh: Option<String>,
    jwks_max_stale: Option<String>,
    jwks_issuer: Option<String>,
    #[serde(default)]
    issuer_roles: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    subject_prefixes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    kid: String,
    algorithm: String,
    public_key_file: PathBuf,
    issuer: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    kid: String,
    algorithm: String,
    private_key_file: PathBuf,
    issuer: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    dir: PathBuf,
    #[serde(default)]
    tests: Option<PathBuf>,
    #[serde(default)]
    allow_untested: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    dir: Option<PathBuf>,
    durability: Durability,
    max_batch: Option<usize>,
    commit_window: Option<String>,
    segment_max_bytes: Option<u64>,
    retention: Option<String>,
    client_addr_retention: Option<String>,
    prune_interval: Option<String>,
    witness: Option<RawWitness>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWitness {
    url: String,
    key: String,
    interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: String,
    key_file: PathBuf,
    staleness_bound: Option<String>,
    resync_interval: Option<String>,
    stream: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    upstream: String,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_connections: Option<usize>,
    authorization_file: Option<PathBuf>,
    /// For an `https://` datastore: the CA certificates (PEM) its certificate must chain to.
    ca_file: Option<PathBuf>,
    /// The gateway's own certificate chain and key (PEM), for a datastore that asks for one.
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    #[serde(default)]
    dialect: Option<String>,
    datasette: Option<DatasetteApi>,
}

/// `datasets.*.idle_connections` when not set: well above the concurrency one gateway
/// process serves a datastore at (a few hundred requests in flight at saturation).
const DEFAULT_IDLE_CONNECTIONS: usize = 1024;

/// Maximum leeway we accept: more would make `exp` meaningless.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

impl RawConfig {
    fn resolve(self, base: &Path) -> anyhow::Result<Config> {
        let at = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let server = self.server.resolve(&at)?;
        let auth = self.auth.resolve(&at)?;
        let signing = match self.signing {
            Some(s) => Some(SigningConfig {
                algorithm: parse_algorithm(&s.algorithm, "signing.algorithm")?,
                kid: s.kid,
                private_key_file: at(&s.private_key_file),
                issuer: s.issuer,
            }),
            None => None,
        };
        let audit = AuditConfig {
            dir: self
                .audit
                .dir
                .map(|d| at(&d))
                .unwrap_or_else(|| server.data_dir.join("audit")),
            durability: self.audit.durability,
            max_batch: match self.audit.max_batch.unwrap_or(1024) {
                // The queue's size too: beyond this it no longer holds requests back.
                n @ 1..=65_536 => n,
                n => bail!("`audit.max_batch` = {n}: 1 to 65536"),
            },
            commit_window: commit_window(self.audit.commit_window.as_deref())?,
            segment_max_bytes: at_least_bytes(
                self.audit.segment_max_bytes.unwrap_or(64 * 1024 * 1024),
                64 * 1024,
                "audit.segment_max_bytes",
            )?,
            // The log answers subject access requests, a month after they arrive, and breach
            // reports: a retention shorter than that (`6m` is six minutes to humantime; months
            // are `6M`) would have the next prune delete what those need.
            // Bounded above too: `now - retention` past the calendar's range panicked the
            // pruner's task, and with it address shredding, while the gateway served on.
            retention: match &self.audit.retention {
                Some(r) => Some(bounded(
                    r,
                    "audit.retention",
                    MIN_RETENTION,
                    Some(MAX_RETENTION),
                )?),
                None => None,
            },
            client_addr_retention: match self.audit.client_addr_retention.as_deref() {
                Some("off") => None,
                other => Some(bounded(
                    other.unwrap_or("90days"),
                    "audit.client_addr_retention",
                    Duration::from_secs(3600),
                    Some(MAX_RETENTION),
                )?),
            },
            prune_interval: bounded(
                self.audit.prune_interval.as_deref().unwrap_or("1h"),
                "audit.prune_interval",
                Duration::from_secs(60),
                None,
            )?,
            witness: self.audit.witness.map(witness).transpose()?,
        };
        let mut datasets = BTreeMap::new();
        for (name, raw) in self.datasets {
            let cfg = raw.resolve(&name, &at)?;
            datasets.insert(name, cfg);
        }
        if datasets.is_empty() {
            bail!("`datasets` names no upstream datastore");
        }
        let watch = self.watch.resolve(&server.data_dir, &at)?;
        let redis = match self.redis {
            Some(r) => Some(redis(r, &watch, &at)?),
            None => None,
        };
        Ok(Config {
            file: PathBuf::new(),
            watch,
            aggregates: self.aggregates.resolve()?,
            server,
            auth,
            signing,
            policy_dir: at(&self.policy.dir),
            policy_tests: self.policy.tests.as_ref().map(|t| at(t)),
            policy_allow_untested: self.policy.allow_untested,
            catalog_file: at(&self.catalog.file),
            areas_file: at(&self.geography.file),
            audit,
            redis,
            quotas: quotas(self.quotas)?,
            datasets,
        })
    }
}

impl RawServer {
    fn resolve(self, at: &dyn Fn(&Path) -> PathBuf) -> anyhow::Result<ServerConfig> {
        let listen = parse_addr(&self.listen, "server.listen")?;
        let admin_listen = parse_addr(
            self.admin_listen.as_deref().unwrap_or("127.0.0.1:9901"),
            "server.admin_listen",
        )?;
        // The admin plane speaks plain HTTP: off loopback, the DPO's token (which also works on
        // the data plane, nationally), security's and subject access reports would cross the
        // network in the clear.
        if !admin_listen.ip().is_loopback() && !self.admin_plaintext_off_loopback {
            bail!(
                "`server.admin_listen` ({admin_listen}) is not a loopback address, and the admin \
                 plane speaks plain HTTP: the DPO's and security's tokens and subject access \
                 reports would cross the network in the clear. Bind it to loopback and reach it \
                 through a TLS-terminating proxy, or, for a management network you trust, set \
                 `server.admin_plaintext_off_loopback = true`"
            );
        }
        let tls = match (self.plaintext, self.tls) {
            (false, Some(t)) => Some(TlsFiles {
                cert_file: at(&t.cert_file),
                key_file: at(&t.key_file),
            }),
            (false, None) => bail!(
                "`server.tls` is missing: give `cert_file` and `key_file`, or set `server.plaintext = true` explicitly"
            ),
            (true, Some(_)) => {
                bail!("`server.plaintext = true` and `server.tls` contradict each other")
            }
            // Plain HTTP off loopback puts callers' tokens and the records they read on the
            // network in the clear: a sidecar that terminates TLS reaches the gateway over
            // loopback, so a wildcard or routable address needs saying so.
            (true, None) if !listen.ip().is_loopback() && !self.plaintext_off_loopback => {
                bail!(
                    "`server.listen` ({listen}) is not a loopback address, and `server.plaintext \
                     = true` would serve callers' tokens and personal data on it in the clear. \
                     Give `[server.tls]`, or bind to loopback behind a TLS-terminating sidecar, or, \
                     for a network you trust, set `server.plaintext_off_loopback = true`"
                )
            }
            (true, None) => None,
        };
        Ok(ServerConfig {
            listen,
            admin_listen,
            tls,
            data_dir: at(&self.data_dir),
            max_request_bytes: at_least_bytes(
                self.max_request_bytes.unwrap_or(64 * 1024),
                1024,
                "server.max_request_bytes",
            )?,
            max_response_bytes: at_least_bytes(
                self.max_response_bytes.unwrap_or(64 * 1024 * 1024),
                64 * 1024,
                "server.max_response_bytes",
            )?,
            // ("0s" ends requests at once, each with its record.) Bounded above: a grace of
            // centuries overflowed `now + grace` and panicked the stop before the log closed.
            shutdown_grace: bounded(
                self.shutdown_grace.as_deref().unwrap_or("20s"),
                "server.shutdown_grace",
                Duration::ZERO,
                Some(Duration::from_secs(3600)),
            )?,
            header_read_timeout: bounded(
                self.header_read_timeout.as_deref().unwrap_or("30s"),
                "server.header_read_timeout",
                Duration::from_secs(1),
                Some(Duration::from_secs(600)),
            )?,
            client_stall_timeout: bounded(
                self.client_stall_timeout.as_deref().unwrap_or("5m"),
                "server.client_stall_timeout",
                Duration::from_secs(1),
                Some(Duration::from_secs(3600)),
            )?,
            max_connections: match self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS) {
                n @ 1..=MAX_MAX_CONNECTIONS => n,
                n => bail!("`server.max_connections` = {n}: 1 to {MAX_MAX_CONNECTIONS}"),
            },
            max_bulk_reads_per_caller: match self.max_bulk_reads_per_caller.unwrap_or(2) {
                n @ 1..=64 => n,
                n => bail!("`server.max_bulk_reads_per_caller` = {n}: 1 to 64"),
            },
            trusted_proxies: crate::client_addr::TrustedProxies::new(
                (self.trusted_proxies.iter())
                    .map(|n| {
                        crate::client_addr::Net::parse(n)
                            .map_err(|e| anyhow::anyhow!("`server.trusted_proxies`: {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
            ),
            file_check_interval: match self.file_check_interval.as_deref().unwrap_or("30s") {
                "off" => None,
                v => Some(bounded(
                    v,
                    "server.file_check_interval",
                    Duration::from_millis(100),
                    Some(Duration::from_secs(24 * 3600)),
                )?),
            },
        })
    }
}

impl RawAuth {
    fn resolve(self, at: &dyn Fn(&Path) -> PathBuf) -> anyhow::Result<AuthConfig> {
        if self.issuers.is_empty() {
            bail!("`auth.issuers` is empty: name at least one trusted token issuer");
        }
        if self.issuers.iter().any(|i| i.trim().is_empty()) {
            bail!("`auth.issuers` has a blank entry: a token's `iss` must name its issuer");
        }
        let leeway = parse_duration(self.leeway.as_deref().unwrap_or("30s"), "auth.leeway")?;
        if leeway > MAX_LEEWAY {
            bail!(
                "`auth.leeway` is {}s; at most {}s is allowed",
                leeway.as_secs(),
                MAX_LEEWAY.as_secs()
            );
        }
        let max_token_lifetime = bounded(
            self.max_token_lifetime.as_deref().unwrap_or("24h"),
            "auth.max_token_lifetime",
            Duration::from_secs(60),
            Some(Duration::from_secs(30 * 86_400)),
        )?;
        let algorithms = self
            .algorithms
            .iter()
            .map(|a| parse_algorithm(a, "auth.algorithms"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if algorithms.is_empty() {
            bail!("`auth.algorithms` is empty");
        }
        let mut keys = Vec::new();
        for k in self.keys {
            let algorithm = parse_algorithm(
                &k.algorithm,
                &format!("auth.keys.algorithm` of key `{}", k.kid),
            )?;
            if !algorithms.contains(&algorithm) {
                bail!(
                    "key `{}` uses `{}`, which `auth.algorithms` does not allow",
                    k.kid,
                    k.algorithm
                );
            }
            let issuer = key_issuer(&self.issuers, k.issuer, &format!("key `{}`", k.kid))?;
            keys.push(KeyFile {
                kid: k.kid,
                algorithm,
                public_key_file: at(&k.public_key_file),
                issuer,
            });
        }
        let jwks_url = match self.jwks_url {
            Some(url) => Some(jwks_url(
                &url,
                self.jwks_ca_file.map(|p| at(&p)),
                self.jwks_refresh.as_deref(),
                self.jwks_max_stale.as_deref(),
            )?),
            None => {
                let set = [
                    ("jwks_ca_file", self.jwks_ca_file.is_some()),
                    ("jwks_refresh", self.jwks_refresh.is_some()),
                    ("jwks_max_stale", self.jwks_max_stale.is_some()),
                ];
                if let Some((key, _)) = set.iter().find(|(_, given)| *given) {
                    bail!("`auth.{key}` is set but `auth.jwks_url` is not");
                }
                None
            }
        };
        let jwks = match (&self.jwks_file, &jwks_url) {
            (Some(_), Some(_)) => bail!(
                "`auth.jwks_file` and `auth.jwks_url` are both set: give one (a fetched set \
                 is kept in memory, not in the file)"
            ),
            (Some(_), None) => Some("`auth.jwks_file`"),
            (None, Some(_)) => Some("`auth.jwks_url`"),
            (None, None) => None,
        };
        if keys.is_empty() && jwks.is_none() {
            bail!(
                "no token verification keys: give `auth.keys`, `auth.jwks_file` or \
                 `auth.jwks_url`"
            );
        }
        let jwks_issuer = match jwks {
            Some(what) => key_issuer(&self.issuers, self.jwks_issuer, what)?,
            None if self.jwks_issuer.is_some() => {
                bail!(
                    "`auth.jwks_issuer` is set but neither `auth.jwks_file` nor `auth.jwks_url` is"
                )
            }
            None => String::new(),
        };
        for (issuer, roles) in &self.issuer_roles {
            if !self.issuers.contains(issuer) {
                bail!("`auth.issuer_roles` names `{issuer}`, which `auth.issuers` does not list");
            }
            if roles.is_empty() {
                bail!(
                    "`auth.issuer_roles` gives `{issuer}` no role: remove it from `auth.issuers` \
                     to stop trusting it"
                );
            }
        }
        check_subject_prefixes(&self.issuers, &self.subject_prefixes)?;
        if self.audience.trim().is_empty() {
            bail!(
                "`auth.audience` is empty: name this gateway (e.g. \"wardgate\"), so that a \
                 token minted for another service, or for none, is refused"
            );
        }
        Ok(AuthConfig {
            issuer_roles: self.issuer_roles,
            subject_prefixes: self.subject_prefixes,
            issuers: self.issuers,
            audience: self.audience,
            leeway,
            max_token_lifetime,
            algorithms,
            keys,
            jwks_file: self.jwks_file.map(|p| at(&p)),
            jwks_url,
            jwks_issuer,
        })
    }
}

/// `auth.jwks_url` and its settings: an `https://` URL naming a host, with no user name or
/// password in it (a credential in the configuration would be logged with every fetch), and
/// the CA file its certificate must chain to.
/// A URL as an error may show it: anything before its last `@` after the scheme (a user name
/// and password, `user:secret@`) as `***`, and any query or fragment (which may carry a
/// token) as `?***`, so that refusing one does not write a secret to the journal or a CI
/// log. Over-hiding an `@` in a path is harmless in a message.
fn shown(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (scheme, rest) = url.split_at(start);
    let rest = match rest.rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => rest.to_owned(),
    };
    match rest.find(['?', '#']) {
        Some(q) => format!("{scheme}{}?***", &rest[..q]),
        None => format!("{scheme}{rest}"),
    }
}

/// Whether an authority names a port that is not a number (`host:word`): `http::Uri` takes
/// it, with no port, and a connection would go to the scheme's default port instead.
fn bad_port(authority: &http::uri::Authority) -> bool {
    let s = authority.as_str();
    let host = &s[s.rfind('@').map_or(0, |i| i + 1)..];
    // After an IPv6 address's brackets.
    let rest = &host[host.rfind(']').map_or(0, |i| i + 1)..];
    rest.rfind(':')
        .is_some_and(|i| rest[i + 1..].parse::<u16>().is_err())
}

fn jwks_url(
    url: &str,
    ca_file: Option<PathBuf>,
    refresh: Option<&str>,
    max_stale: Option<&str>,
) -> anyhow::Result<JwksUrl> {
    let parsed: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("`auth.jwks_url` = `{}` is not a URL: {e}", shown(url)))?;
    // Errors name the URL without any credentials it holds (they are refused below).
    let url = shown(url);
    if parsed.scheme_str() != Some("https") {
        bail!(
            "`auth.jwks_url` = `{url}`: only `https://` is fetched (the keys that verify every \
             token must not cross the network in the clear)"
        );
    }
    match parsed.authority() {
        Some(a) if a.as_str().contains('@') => {
            bail!("`auth.jwks_url` = `{url}` holds a user name or password: a JWK set is public")
        }
        Some(a) if bad_port(a) => {
            bail!("`auth.jwks_url` = `{url}`: its port is not a number from 0 to 65535")
        }
        Some(a) if !a.host().is_empty() => {}
        _ => bail!("`auth.jwks_url` = `{url}` names no host"),
    }
    let Some(ca_file) = ca_file else {
        bail!(
            "`auth.jwks_url` is set but `auth.jwks_ca_file` is not: name the CA certificates \
             the identity provider's certificate chains to (for a public provider, the system's \
             bundle, e.g. `/etc/ssl/certs/ca-certificates.crt`)"
        );
    };
    let refresh = bounded(
        refresh.unwrap_or("5m"),
        "auth.jwks_refresh",
        Duration::from_secs(1),
        Some(Duration::from_secs(24 * 3600)),
    )?;
    let max_stale = bounded(
        max_stale.unwrap_or("24h"),
        "auth.jwks_max_stale",
        Duration::from_secs(1),
        Some(Duration::from_secs(30 * 86_400)),
    )?;
    if max_stale <= refresh {
        bail!(
            "`auth.jwks_max_stale` ({}) must be longer than `auth.jwks_refresh` ({}): the keys \
             would be dropped between two fetches",
            humantime::format_duration(max_stale),
            humantime::format_duration(refresh)
        );
    }
    Ok(JwksUrl {
        url: parsed,
        ca_file,
        refresh,
        max_stale,
    })
}

/// The longest subject prefix allowed: a prefixed subject must still fit a revocable id.
const MAX_SUBJECT_PREFIX: usize = 64;

/// `auth.subject_prefixes` gives every trusted issuer but one its own subject namespace: each
/// prefix names a trusted issuer, is printable without spaces, and none begins another (or
/// `p:` and `p:x:` would meet at `p:x:bob`). An issuer with no entry, or with an empty prefix,
/// names subjects as they are; with several issuers at most one may be left without an entry,
/// so two identity providers never share subjects unless the configuration says so.
fn check_subject_prefixes(
    issuers: &[String],
    prefixes: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    for (issuer, prefix) in prefixes {
        if !issuers.contains(issuer) {
            bail!("`auth.subject_prefixes` names `{issuer}`, which `auth.issuers` does not list");
        }
        if !prefix.is_empty()
            && (prefix.len() > MAX_SUBJECT_PREFIX
                || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
                || !prefix.ends_with([':', '/', '|', '#']))
        {
            bail!(
                "`auth.subject_prefixes`: `{issuer}`'s prefix `{}` must be at most \
                 {MAX_SUBJECT_PREFIX} bytes, without spaces or control characters, and end in \
                 `:`, `/`, `|` or `#`, which no base64url token id or UUID holds (a prefix `p` \
                 or `p_` would take the other issuers' subjects and token ids that begin so)",
                prefix.escape_debug()
            );
        }
        let local = crate::auth::LOCAL_PREFIX;
        if !prefix.is_empty() && (prefix.starts_with(local) || local.starts_with(prefix.as_str())) {
            bail!(
                "`auth.subject_prefixes`: `{issuer}`'s prefix `{prefix}` meets `{local}`, the \
                 gateway's own operators' prefix: choose another"
            );
        }
        for (other, theirs) in prefixes {
            if other != issuer && !theirs.is_empty() && prefix.starts_with(theirs.as_str()) {
                bail!(
                    "`auth.subject_prefixes`: `{issuer}`'s prefix `{prefix}` begins with \
                     `{other}`'s `{theirs}`, so their subjects could meet: give each a prefix \
                     that does not begin another"
                );
            }
        }
    }
    let bare: Vec<&String> = issuers
        .iter()
        .filter(|i| !prefixes.contains_key(*i))
        .collect();
    if bare.len() > 1 {
        let names = bare
            .iter()
            .map(|i| format!("`{i}`"))
            .collect::<Vec<_>>()
            .join(", ");
        bail!(
            "`auth.issuers` {names} have no `auth.subject_prefixes` entry, so they would share one \
             subject namespace (either could sign as the other's callers, in the audit log, \
             revocations and quotas): give all but one a prefix (an empty one shares on purpose)"
        );
    }
    Ok(())
}

/// The issuer a verification key (or the JWKS file's keys) answers for: the one it names,
/// which must be trusted, or the only trusted issuer. With several trusted issuers each key
/// must name its own: a key that verified every issuer's tokens would let one identity
/// provider (or whoever holds its key) sign as another.
fn key_issuer(issuers: &[String], named: Option<String>, what: &str) -> anyhow::Result<String> {
    match (named, issuers) {
        (Some(i), _) if issuers.contains(&i) => Ok(i),
        (Some(i), _) => bail!(
            "{what} names issuer `{i}`, which `auth.issuers` does not list ({})",
            issuers.join(", ")
        ),
        (None, [only]) => Ok(only.clone()),
        (None, _) => bail!(
            "{what} names no issuer, and `auth.issuers` lists {}: give it `{}` so that one \
             issuer's key cannot sign for another",
            issuers.len(),
            if what.starts_with("key") {
                "issuer"
            } else {
                "auth.jwks_issuer"
            }
        ),
    }
}

impl RawUpstream {
    fn resolve(self, name: &str, at: &dyn Fn(&Path) -> PathBuf) -> anyhow::Result<UpstreamConfig> {
        let key = format!("datasets.{name}.upstream");
        // Errors name the URL without any credentials it holds (they are refused below).
        let url = shown(&self.upstream);
        let base: http::Uri = self
            .upstream
            .parse()
            .map_err(|e| anyhow::anyhow!("`{key}` = `{url}`: {e}"))?;
        let https = match base.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!(
                "`{key}` = `{}` must be an absolute http:// or https:// URL",
                url
            ),
        };
        if base.authority().is_none() {
            bail!(
                "`{key}` = `{}` must be an absolute http:// or https:// URL",
                url
            );
        }
        if base.authority().is_some_and(bad_port) {
            bail!("`{key}` = `{url}`: its port is not a number from 0 to 65535");
        }
        let client_cert = match (self.client_cert_file, self.client_key_file) {
            (Some(cert), Some(key)) => Some((at(&cert), at(&key))),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => bail!(
                "`datasets.{name}.client_cert_file` and `client_key_file` go together: give \
                 both or neither"
            ),
        };
        let tls = match (https, self.ca_file) {
            (true, Some(ca)) => Some(UpstreamTls {
                ca_file: at(&ca),
                client_cert,
            }),
            (true, None) => bail!(
                "`{key}` = `{}` is https://: set `datasets.{name}.ca_file` to the CA \
                 certificates (PEM) the datastore's certificate chains to (the system's \
                 roots are never trusted implicitly; for a datastore with a public \
                 certificate, the system's bundle, e.g. `/etc/ssl/certs/ca-certificates.crt`)",
                url
            ),
            (false, ca) => {
                if ca.is_some() || client_cert.is_some() {
                    bail!(
                        "`datasets.{name}`: `ca_file`, `client_cert_file` and `client_key_file` \
                         are for an https:// datastore, and `{key}` = `{}` is plain http://",
                        url
                    );
                }
                None
            }
        };
        // The route's own path and query are appended to it: a query or credentials in the
        // base would send the datastore somewhere the route table never chose.
        if base.query().is_some() || self.upstream.contains('#') {
            bail!(
                "`{key}` = `{}`: no query or fragment; the gateway adds each route's path and query",
                url
            );
        }
        if base.authority().is_some_and(|a| a.as_str().contains('@')) {
            bail!(
                "`{key}` = `{}`: no credentials in the URL; use `datasets.{name}.authorization_file`",
                url
            );
        }
        let authorization = match self.authorization_file {
            Some(p) => {
                let p = at(&p);
                let v = std::fs::read_to_string(&p).with_context(|| {
                    format!(
                        "`datasets.{name}.authorization_file`: cannot read `{}`",
                        p.display()
                    )
                })?;
                let v = v.trim();
                // Sent as an empty `Authorization`, every request would come back refused
                // (502) with nothing at start to say why.
                if v.is_empty() {
                    bail!(
                        "`datasets.{name}.authorization_file`: `{}` is empty (it holds the \
                         `Authorization` header's value the datastore expects)",
                        p.display()
                    );
                }
                Some(v.to_owned())
            }
            None => None,
        };
        let dialect = match (
            self.dialect.as_deref().unwrap_or("wardgate"),
            self.datasette,
        ) {
            ("wardgate", None) => Dialect::Wardgate,
            ("datasette", Some(api)) => Dialect::Datasette(api),
            ("datasette", None) => bail!(
                "`datasets.{name}.dialect = \"datasette\"` needs a `[datasets.{name}.datasette]` table"
            ),
            ("wardgate", Some(_)) => {
                bail!("`datasets.{name}.datasette` is set but `dialect` is not `datasette`")
            }
            (other, _) => {
                bail!("`datasets.{name}.dialect` = `{other}`: use `wardgate` or `datasette`")
            }
        };
        let connect_timeout = bounded(
            self.connect_timeout.as_deref().unwrap_or("2s"),
            &format!("datasets.{name}.connect_timeout"),
            MIN_UPSTREAM_TIMEOUT,
            None,
        )?;
        let response_timeout = bounded(
            self.response_timeout.as_deref().unwrap_or("15s"),
            &format!("datasets.{name}.response_timeout"),
            MIN_UPSTREAM_TIMEOUT,
            None,
        )?;
        // The connection is made within the response's deadline: a connect timeout as long
        // would never fire, and a datastore that cannot be reached would answer 504, not 502.
        if connect_timeout >= response_timeout {
            bail!(
                "`datasets.{name}.connect_timeout` ({connect_timeout:?}) must be shorter than \
                 `datasets.{name}.response_timeout` ({response_timeout:?})"
            );
        }
        Ok(UpstreamConfig {
            dialect,
            tls,
            base,
            connect_timeout,
            response_timeout,
            idle_connections: match self.idle_connections {
                None => DEFAULT_IDLE_CONNECTIONS,
                Some(0) => bail!(
                    "`datasets.{name}.idle_connections` = 0: at least 1 (every request would \
                     open a new connection to the datastore)"
                ),
                Some(n) => n,
            },
            authorization,
        })
    }
}

/// Says in the server log when a file holding a secret (a private key, the shared controls'
/// key) can be read by accounts other than its owner: whoever reads it can sign as the
/// gateway (or lift a restriction through Redis). A warning, not a refusal: a secret mounted
/// by an orchestrator may be readable by a group the pod alone is in. The mode found, when
/// it is so.
pub fn warn_if_others_may_read(path: &Path, setting: &str) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        tracing::warn!(
            file = %path.display(),
            setting,
            mode = format!("{mode:o}"),
            "a secret key file other accounts can read: make it the owner's alone (`chmod 600`)"
        );
        mode
    })
}

fn parse_addr(v: &str, key: &str) -> anyhow::Result<SocketAddr> {
    v.parse()
        .map_err(|_| anyhow::anyhow!("`{key}` = `{v}` is not an address like `127.0.0.1:8443`"))
}

/// `audit.commit_window`: default 3 ms, at most 100 ms (every request under load may wait it).
fn commit_window(v: Option<&str>) -> anyhow::Result<Duration> {
    let window = parse_duration(v.unwrap_or("3ms"), "audit.commit_window")?;
    if window > Duration::from_millis(100) {
        bail!(
            "`audit.commit_window` = `{}`: at most 100ms",
            v.unwrap_or_default()
        );
    }
    Ok(window)
}

/// `[redis]`. The staleness bound is at least a second: a mirror is proved current each time
/// a blocking read of the stream returns (every half second when nothing happens) and quota
/// counts each flush (every 200 ms), so a shorter one would refuse requests with Redis well;
/// and at most ten minutes, past which a replica cut off from Redis would go on serving
/// without the changes made elsewhere for longer than anyone would call failing closed.
fn redis(
    r: RawRedis,
    watch: &crate::watch::settings::WatchSettings,
    at: &dyn Fn(&Path) -> PathBuf,
) -> anyhow::Result<crate::controls::RedisSettings> {
    redis_url(&r.url, "redis.url")?;
    let stream = r.stream.unwrap_or_else(|| "wardgate:controls".to_owned());
    if watch.shared && stream == watch.shared_stream {
        bail!(
            "`redis.stream` and `watch.shared_stream` are both `{stream}`: the controls' signed \
             events and every replica's accesses need a stream each"
        );
    }
    Ok(crate::controls::RedisSettings {
        staleness_bound: bounded(
            r.staleness_bound.as_deref().unwrap_or("10s"),
            "redis.staleness_bound",
            Duration::from_secs(1),
            Some(Duration::from_secs(600)),
        )?,
        resync_interval: bounded(
            r.resync_interval.as_deref().unwrap_or("60s"),
            "redis.resync_interval",
            Duration::from_secs(1),
            Some(Duration::from_secs(3600)),
        )?,
        stream,
        key_file: at(&r.key_file),
        url: r.url,
    })
}

/// `[quotas.<role>]`: at least one record an hour, and a day's at least an hour's.
fn quotas(
    q: std::collections::HashMap<String, crate::controls::Limits>,
) -> anyhow::Result<std::collections::HashMap<String, crate::controls::Limits>> {
    for (role, l) in &q {
        if l.per_hour == 0 || l.per_day < l.per_hour {
            bail!(
                "`quotas.{role}`: per_hour = {}, per_day = {}: per_hour at least 1 and per_day \
                 at least per_hour (a role that may see nothing has no purposes to ask under)",
                l.per_hour,
                l.per_day
            );
        }
    }
    Ok(q)
}

/// A Redis URL the client accepts, without TLS (this build has none), or an error naming `key`
/// (and not the URL, which may hold a password).
fn redis_url(url: &str, key: &str) -> anyhow::Result<()> {
    let scheme = url
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if scheme == "rediss" || scheme == "valkeys" {
        bail!(
            "`{key}`: this build speaks to Redis without TLS (`redis://`); reach Redis over a \
             private network or a TLS tunnel"
        );
    }
    redis::Client::open(url).map_err(|e| anyhow::anyhow!("`{key}`: not a Redis URL ({e})"))?;
    Ok(())
}

/// `[audit.witness]`: a Redis URL the client accepts, a key, an interval of 100ms to an hour
/// (default 10s).
fn witness(raw: RawWitness) -> anyhow::Result<crate::audit::witness::WitnessConfig> {
    redis_url(&raw.url, "audit.witness.url")?;
    let key = raw.key.trim();
    if key.is_empty() || key.chars().any(char::is_whitespace) {
        bail!(
            "`audit.witness.key` = `{}`: a Redis key, one per audit log",
            raw.key
        );
    }
    let v = raw.interval.as_deref().unwrap_or("10s");
    let interval = parse_duration(v, "audit.witness.interval")?;
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&interval) {
        bail!("`audit.witness.interval` = `{v}`: from 100ms to 1h");
    }
    Ok(crate::audit::witness::WitnessConfig {
        url: raw.url,
        key: key.to_owned(),
        interval,
    })
}

/// The shortest `audit.retention`: a month and a day, so that a subject access request
/// answered within its month finds everything disclosed in the month before it arrived.
const MIN_RETENTION: Duration = Duration::from_secs(31 * 24 * 3600);
/// The longest retention taken (a hundred years, as humantime counts one: 365.25 days, so
/// that `"100years"` itself is taken): any longer is "keep for ever", which is leaving
/// `audit.retention` unset (and `client_addr_retention = "off"`).
const MAX_RETENTION: Duration = Duration::from_secs(100 * 31_557_600);

/// The shortest datastore connect or response timeout (zero would fail every request).
const MIN_UPSTREAM_TIMEOUT: Duration = Duration::from_millis(10);

/// `v` parsed as a duration of at least `min` (and at most `max`), or an error naming `key`.
fn bounded(v: &str, key: &str, min: Duration, max: Option<Duration>) -> anyhow::Result<Duration> {
    let d = parse_duration(v, key)?;
    if d < min {
        bail!(
            "`{key}` = `{v}` is {}: at least {} (humantime: `m` is minutes, `M` months)",
            humantime::format_duration(d),
            humantime::format_duration(min)
        );
    }
    if let Some(max) = max.filter(|max| d > *max) {
        bail!(
            "`{key}` = `{v}` is {}: at most {}",
            humantime::format_duration(d),
            humantime::format_duration(max)
        );
    }
    Ok(d)
}

/// `server.max_connections` unless the file says otherwise, and the most it may say.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
const MAX_MAX_CONNECTIONS: usize = 1_000_000;

/// A size of at least `min` bytes, or an error naming `key`.
fn at_least_bytes<T: PartialOrd + std::fmt::Display>(n: T, min: T, key: &str) -> anyhow::Result<T> {
    if n < min {
        bail!("`{key}` = {n}: at least {min} bytes");
    }
    Ok(n)
}

fn parse_duration(v: &str, key: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(v).map_err(|e| anyhow::anyhow!("`{key}` = `{v}`: {e}"))
}

/// Only asymmetric algorithms: a shared secret in a gateway config is a forgery kit.
pub fn parse_algorithm(v: &str, key: &str) -> anyhow::Result<Algorithm> {
    match v {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => bail!("`{key}`: `{other}` is not allowed; use RS256, ES256 or EdDSA"),
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
