//! The embedded demo: synthetic datastores, personas and their tokens, no external services.
//!
//! `wardgate demo` writes the shipped policies, registers and a freshly generated signing key
//! into its data directory, starts the synthetic datastore in-process on a free loopback port,
//! writes a configuration that points at it (so `wardgate serve --config DATA_DIR/wardgate.toml`
//! and `wardgate token` work on the same files), mints one token per persona into
//! `DATA_DIR/tokens.json`, prints curl commands, and serves the real gateway through the same
//! start-up path as production. Nothing here is a stand-in: only the data is synthetic.

pub mod data;
pub mod datastore;
mod personas;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::startup;
use crate::token::{self, Signer};

pub use personas::{PERSONAS, Persona, mint_tokens};

/// The shipped policy pack and registers, embedded so the demo runs from any directory.
pub const POLICY_FILES: &[(&str, &str)] = &[
    (
        "wardgate.cedarschema",
        include_str!("../../policies/wardgate.cedarschema"),
    ),
    (
        "datasets.cedar",
        include_str!("../../policies/datasets.cedar"),
    ),
    ("fields.cedar", include_str!("../../policies/fields.cedar")),
    (
        "geography.cedar",
        include_str!("../../policies/geography.cedar"),
    ),
    (
        "markers.cedar",
        include_str!("../../policies/markers.cedar"),
    ),
    (
        "purpose.cedar",
        include_str!("../../policies/purpose.cedar"),
    ),
    (
        "restrictions.cedar",
        include_str!("../../policies/restrictions.cedar"),
    ),
    ("writes.cedar", include_str!("../../policies/writes.cedar")),
];
// The shipped policy tests (`POLICY_TESTS`: each file's path under `policies/tests/` and its
// text), embedded by the build script (`src/build.rs`) so that the demo's start runs them.
include!(concat!(env!("OUT_DIR"), "/policy_tests.rs"));
pub const CATALOG: &str = include_str!("../../config/catalog.toml");
pub const AREAS: &str = include_str!("../../config/areas.toml");

pub const ISSUER: &str = "https://sso.demo.wardgate.invalid";
pub const AUDIENCE: &str = "wardgate";
pub const KID: &str = "demo-es256";

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub electors: usize,
}

/// Writes policies, registers and a new signing key under `dir`, and a config whose datasets
/// point at `upstream`. Returns the config file's path.
pub fn materialise(
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<PathBuf> {
    let write = |rel: &str, text: &str| -> anyhow::Result<()> {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create `{}`", parent.display()))?;
        }
        std::fs::write(&p, text).with_context(|| format!("cannot write `{}`", p.display()))
    };
    // The policies of this build only, as the tests below: one saved there by hand (the tour's)
    // would outlive the fixture naming it, and the next start would refuse it as untested.
    if let Ok(entries) = std::fs::read_dir(dir.join("policies")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = POLICY_FILES.iter().any(|(n, _)| *n == name);
            if !ours && (name.ends_with(".cedar") || name.ends_with(".cedarschema")) {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("cannot remove `{}`", entry.path().display()))?;
            }
        }
    }
    for (name, text) in POLICY_FILES {
        write(&format!("policies/{name}"), text)?;
    }
    // The tests of this build only: one renamed or dropped since the data directory was last
    // written must not run against policies it no longer describes.
    let tests = dir.join("policies/tests");
    if tests.exists() {
        std::fs::remove_dir_all(&tests)
            .with_context(|| format!("cannot clear `{}`", tests.display()))?;
    }
    for (name, text) in POLICY_TESTS {
        write(&format!("policies/tests/{name}"), text)?;
    }
    write("catalog.toml", CATALOG)?;
    write("areas.toml", AREAS)?;
    token::write_key_pair(&dir.join("keys"), KID, &token::generate_es256()?)?;
    // The demo's data are synthetic: served off loopback (`--listen 0.0.0.0:8080`), plain HTTP
    // is said to be meant, as a deployment must say it.
    let off_loopback = format!(
        "{}{}",
        match listen.ip().is_loopback() {
            true => "",
            false => "\nplaintext_off_loopback = true",
        },
        match admin.ip().is_loopback() {
            true => "",
            false => "\nadmin_plaintext_off_loopback = true",
        }
    );
    let config = format!(
        r#"# Written by `wardgate demo`: the demo's own configuration. See config/wardgate.toml for
# an annotated production example.
[server]
listen = "{listen}"
admin_listen = "{admin}"
data_dir = "."
plaintext = true{off_loopback}

[auth]
issuers = ["{ISSUER}"]
audience = "{AUDIENCE}"
leeway = "30s"
algorithms = ["ES256"]
[[auth.keys]]
kid = "{KID}"
algorithm = "ES256"
public_key_file = "keys/{KID}.pub.pem"

[signing]
kid = "{KID}"
algorithm = "ES256"
private_key_file = "keys/{KID}.key.pem"
issuer = "{ISSUER}"

[policy]
dir = "policies"
[catalog]
file = "catalog.toml"
[geography]
file = "areas.toml"

[audit]
dir = "audit"
durability = "fsync"

# Records per principal per hour and per day, by role: a walk sheet is a few hundred.
[quotas.canvasser]
per_hour = 2000
per_day = 8000
[quotas.councillor]
per_hour = 5000
per_day = 20000
[quotas.council_candidate]
per_hour = 5000
per_day = 20000
[quotas.candidate]
per_hour = 20000
per_day = 80000
[quotas.mp_caseworker]
per_hour = 1000
per_day = 5000
[quotas.clp_secretary]
per_hour = 5000
per_day = 20000

[datasets.voter]
upstream = "http://{upstream}"
[datasets.membership]
upstream = "http://{upstream}"
"#
    );
    write("wardgate.toml", &config)?;
    Ok(dir.join("wardgate.toml"))
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(
    opts: DemoOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let settings = data::GenSettings {
        electors: opts.electors,
        ..data::GenSettings::default()
    };
    let store_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the demo datastore")?;
    let store_addr = store_listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let store = tokio::spawn(datastore::serve(
        store_listener,
        datastore::Datastore::generate(&settings, AREAS)?,
        async {
            let _ = stop_rx.await;
        },
    ));

    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("cannot create `{}`", opts.data_dir.display()))?;
    let config_path = materialise(&opts.data_dir, opts.listen, opts.admin, store_addr)?;
    let cfg = Config::load(&config_path)?;
    let (gw, tls) = startup::build(&cfg)?;
    // As `wardgate serve` does: a policy edited in the demo's directory is put in force (or
    // refused) within two checks, with its audit record, or at once on `SIGHUP` (which
    // otherwise ends the process, undrained).
    let reloads = crate::rekey::start(&gw, crate::rekey::listen(), cfg.server.file_check_interval);
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            why = reloads => tracing::error!(%why, "stopping the demo: nothing would be reloaded any more"),
        }
    };
    let signer = Signer::from_config(
        cfg.signing
            .as_ref()
            .context("demo config has no signing key")?,
    )?;
    let tokens = mint_tokens(&signer, time::OffsetDateTime::now_utc().unix_timestamp())?;
    let tokens_path = opts.data_dir.join("tokens.json");
    std::fs::write(&tokens_path, serde_json::to_vec_pretty(&tokens)?)
        .with_context(|| format!("cannot write `{}`", tokens_path.display()))?;

    let data = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", opts.listen))?;
    let admin = TcpListener::bind(opts.admin)
        .await
        .with_context(|| format!("cannot listen on `{}`", opts.admin))?;
    println!(
        "{}",
        personas::instructions(opts.listen, opts.admin, &opts.data_dir)
    );
    let result = startup::run(gw, data, admin, tls, shutdown, cfg.server.shutdown_grace).await;
    let _ = stop_tx.send(());
    let _ = store.await;
    result
}
