//! The identity provider's JWK set fetched from its URL (`auth.jwks_url`), served over TLS by
//! a real nginx, to a real `wardgate serve`: taken at start (or the start refused, saying
//! why), a rotation taken up at the refresh or as soon as a token names the new key (with
//! the provider asked at most once however many such tokens come), a set that would not
//! start the gateway refused once with the keys in use staying, and the keys dropped, their
//! tokens refused, once no set has been taken for `auth.jwks_max_stale`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use jsonwebtoken::Algorithm;
use serde_json::json;
use wardgate::token::KeyPairPem;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<bytes::Bytes>,
>;

/// nginx, which `scripts/test.sh` installs.
fn nginx_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    (on_path.into_iter().chain([PathBuf::from("/usr/sbin")]))
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .expect("nginx is needed: `bash scripts/test.sh` installs it (Debian's `nginx`)")
}

/// An identity provider's key publication: nginx serving `www/jwks.json` over TLS with a
/// certificate for `localhost` from `ca`, `/moved` redirecting to it, and an access log.
struct Provider {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Provider {
    fn start(dir: &Path, ca: &common::Ca) -> Provider {
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let (cert, key) = ca.issue(&["localhost"]);
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let port = common::free_addr().port();
        let d = dir.display();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\nhttp {{\n\
                 access_log {d}/access.log;\nclient_body_temp_path {d}/body;\n\
                 proxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\nserver {{\n\
                 listen 127.0.0.1:{port} ssl;\nssl_certificate {d}/cert.pem;\n\
                 ssl_certificate_key {d}/key.pem;\nroot {d}/www;\n\
                 default_type application/json;\n\
                 location = /moved {{ return 302 /jwks.json; }}\n}}\n}}\n"
            ),
        )
        .unwrap();
        let mut p = Provider {
            dir: dir.to_owned(),
            port,
            child: None,
        };
        p.resume();
        p
    }

    /// Starts nginx (again), and waits until it accepts connections.
    fn resume(&mut self) {
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// Publishes `text` as `/<name>`, written elsewhere and renamed into place.
    fn publish(&self, name: &str, text: &str) {
        let staged = self.dir.join("staged");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, self.dir.join("www").join(name)).unwrap();
    }

    /// Requests for `path` in the access log so far.
    fn requests_for(&self, path: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let wanted = format!("\"GET {path} ");
        log.lines().filter(|l| l.contains(&wanted)).count()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A JWK set holding the public halves of `keys`, each ES256 under its id.
fn set_of(keys: &[(&str, &KeyPairPem)]) -> String {
    let keys: Vec<_> = (keys.iter())
        .map(|(kid, pair)| {
            let enc = jsonwebtoken::EncodingKey::from_ec_pem(pair.private_pem.as_bytes()).unwrap();
            let mut jwk =
                jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
            jwk.common.key_id = Some((*kid).to_owned());
            jwk.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::ES256);
            jwk
        })
        .collect();
    serde_json::to_string(&json!({ "keys": keys })).unwrap()
}

/// The demo's configuration at `dir`, its `[[auth.keys]]` replaced by `auth.jwks_url` =
/// `url` (its certificate from `ca_file`) with `settings`, and no checks of its files.
fn configured(
    dir: &Path,
    upstream: SocketAddr,
    listen: SocketAddr,
    admin: SocketAddr,
    url: &str,
    ca_file: &Path,
    settings: &str,
) -> PathBuf {
    let cfg = wardgate::demo::materialise(dir, listen, admin, upstream).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let keys = format!(
        "[[auth.keys]]\nkid = \"{kid}\"\nalgorithm = \"ES256\"\npublic_key_file = \"keys/{kid}.pub.pem\"\n",
        kid = wardgate::demo::KID
    );
    assert!(text.contains(&keys), "the demo's key entry moved");
    let text = text.replacen(
        &keys,
        &format!(
            "jwks_url = \"{url}\"\njwks_ca_file = \"{}\"\n{settings}\n",
            ca_file.display()
        ),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    common::server_setting(&cfg, "file_check_interval = \"off\"");
    cfg
}

/// A councillor's token signed with `pair` under `kid`.
fn token(cfg: &Path, kid: &str, pair: &KeyPairPem) -> String {
    let config = wardgate::config::Config::load(cfg).unwrap();
    let signer = wardgate::token::Signer::from_pem(
        kid,
        Algorithm::ES256,
        pair.private_pem.as_bytes(),
        &config.signing.unwrap().issuer,
    )
    .unwrap();
    wardgate::demo::mint_tokens(&signer, common::now()).unwrap()["councillor"].clone()
}

fn audited(dir: &Path, reason: &str) -> Vec<serde_json::Value> {
    (common::read_audit(&dir.join("audit")).into_iter())
        .filter(|r| r["reason"] == reason)
        .collect()
}

/// One sample of the admin plane's `/metrics` (`series` with its labels as written), 0 when
/// absent.
async fn metric(client: &Client, admin: SocketAddr, series: &str) -> u64 {
    let req = http::Request::get(format!("http://{admin}/metrics"))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let Ok(resp) = client.request(req).await else {
        return 0;
    };
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    (text.lines())
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Waits (a minute at most) until `status` gives `want`.
async fn until_status<F, Fut>(what: &str, want: u16, status: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = status().await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got}, not {want}, after a minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_set_is_refused_once_rotated_and_dropped_when_the_provider_is_gone_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::Ca::new("IdP CA");
    let ca_file = dir.path().join("idp-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let idp_dir = dir.path().join("idp");
    std::fs::create_dir_all(&idp_dir).unwrap();
    let (a, b) = (
        wardgate::token::generate_es256().unwrap(),
        wardgate::token::generate_es256().unwrap(),
    );
    let mut idp = Provider::start(&idp_dir, &ca);
    idp.publish("jwks.json", &set_of(&[("idp-a", &a)]));

    let gw_dir = dir.path().join("gw");
    let (upstream, _store) = common::start_datastore(200).await;
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let cfg = configured(
        &gw_dir,
        upstream,
        listen,
        admin,
        &idp.url("/jwks.json"),
        &ca_file,
        "jwks_refresh = \"1s\"\njwks_max_stale = \"10s\"",
    );
    let mut gateway = common::serve_process(&cfg);
    let (token_a, token_b) = (token(&cfg, "idp-a", &a), token(&cfg, "idp-b", &b));
    let client = client();
    let status = |token: &String| {
        let (client, token) = (client.clone(), token.clone());
        move || {
            let (client, token) = (client.clone(), token.clone());
            async move { common::listing_status(&client, listen, &token).await }
        }
    };
    until_status("serving with the fetched key", 200, status(&token_a)).await;

    // The provider publishes a set that would not start the gateway: refused once, however
    // many fetches bring it, and the key in use stays.
    idp.publish("jwks.json", r#"{"keys": []}"#);
    let refused = || audited(&gw_dir, "keys_reload_refused");
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused().is_empty() {
        assert!(Instant::now() < deadline, "the empty set not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fetched = idp.requests_for("/jwks.json");
    while idp.requests_for("/jwks.json") < fetched + 2 {
        assert!(Instant::now() < deadline, "no more fetches");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refusals = refused();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["route"], "auth.keys");
    assert_eq!(refusals[0]["detail"]["trigger"], "fetched");
    let why = refusals[0]["detail"]["error"].as_str().unwrap();
    assert!(
        why.contains("holds no keys") && why.contains(&idp.url("/jwks.json")),
        "{why}"
    );
    assert_eq!(status(&token_a)().await, 200, "the key in use stays");
    assert!(audited(&gw_dir, "keys_reloaded").is_empty());

    // The provider rotates: the new key is taken up, and the old one's tokens stop (cached or
    // not).
    idp.publish("jwks.json", &set_of(&[("idp-b", &b)]));
    until_status("the rotated key taken up", 200, status(&token_b)).await;
    assert_eq!(status(&token_a)().await, 401);
    let taken = audited(&gw_dir, "keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["detail"]["trigger"], "fetched");
    assert_eq!(taken[0]["detail"]["added"], json!(["idp-b"]));
    assert_eq!(taken[0]["detail"]["removed"], json!(["idp-a"]));

    // The provider cannot be reached: the key in use stays until `jwks_max_stale`, and is
    // then dropped, recorded, and its tokens refused.
    idp.stop();
    until_status("the stale key dropped", 401, status(&token_b)).await;
    let taken = audited(&gw_dir, "keys_reloaded");
    assert_eq!(taken.len(), 2, "{taken:?}");
    assert_eq!(taken[1]["detail"]["trigger"], "jwks_stale");
    assert_eq!(taken[1]["detail"]["removed"], json!(["idp-b"]));
    assert_eq!(taken[1]["detail"]["keys"], json!({}));
    assert!(
        metric(
            &client,
            admin,
            "wardgate_jwks_fetches_total{outcome=\"failed\"}"
        )
        .await
            > 0
    );

    // Back: its set is taken again.
    idp.resume();
    until_status("the key taken again", 200, status(&token_b)).await;
    let taken = audited(&gw_dir, "keys_reloaded");
    assert_eq!(taken.len(), 3, "{taken:?}");
    assert_eq!(taken[2]["detail"]["trigger"], "fetched");
    assert_eq!(taken[2]["detail"]["added"], json!(["idp-b"]));

    gateway.kill().unwrap();
    gateway.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_naming_a_new_key_fetches_the_set_early_and_a_flood_of_them_asks_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::Ca::new("IdP CA");
    let ca_file = dir.path().join("idp-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let idp_dir = dir.path().join("idp");
    std::fs::create_dir_all(&idp_dir).unwrap();
    let (a, b) = (
        wardgate::token::generate_es256().unwrap(),
        wardgate::token::generate_es256().unwrap(),
    );
    let idp = Provider::start(&idp_dir, &ca);
    idp.publish("jwks.json", &set_of(&[("idp-a", &a)]));
    let gw_dir = dir.path().join("gw");
    let (upstream, _store) = common::start_datastore(200).await;
    let (listen, admin) = (common::free_addr(), common::free_addr());
    // Fetched every hour: only a token naming a key not trusted fetches it sooner.
    let cfg = configured(
        &gw_dir,
        upstream,
        listen,
        admin,
        &idp.url("/jwks.json"),
        &ca_file,
        "jwks_refresh = \"1h\"",
    );
    let mut gateway = common::serve_process(&cfg);
    let (token_a, token_b) = (token(&cfg, "idp-a", &a), token(&cfg, "idp-b", &b));
    let client = client();
    let status = |token: &String| {
        let (client, token) = (client.clone(), token.clone());
        move || {
            let (client, token) = (client.clone(), token.clone());
            async move { common::listing_status(&client, listen, &token).await }
        }
    };
    until_status("serving with the fetched key", 200, status(&token_a)).await;
    assert_eq!(idp.requests_for("/jwks.json"), 1, "fetched once, at start");

    // The provider publishes a new key and signs with it at once.
    idp.publish("jwks.json", &set_of(&[("idp-a", &a), ("idp-b", &b)]));
    until_status("the new key taken up", 200, status(&token_b)).await;
    assert_eq!(status(&token_a)().await, 200);
    let taken = audited(&gw_dir, "keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["detail"]["trigger"], "fetched");
    assert_eq!(taken[0]["detail"]["added"], json!(["idp-b"]));
    assert_eq!(taken[0]["detail"]["removed"], json!([]));

    // Anyone may send tokens naming keys nobody publishes: the provider is not asked for
    // each (at most once every 30 s).
    let asked = idp.requests_for("/jwks.json");
    let forged = token(&cfg, "idp-c", &wardgate::token::generate_es256().unwrap());
    for _ in 0..50 {
        assert_eq!(status(&forged)().await, 401);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = idp.requests_for("/jwks.json");
    assert!(after <= asked + 1, "{asked} fetches before, {after} after");
    assert_eq!(status(&token_b)().await, 200);

    gateway.kill().unwrap();
    gateway.wait().unwrap();
}

/// `wardgate serve`'s exit and what it said, for a configuration that should not start.
fn refused_start(cfg: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wardgate"))
        .args(["serve", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "it started");
    String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
}

#[test]
fn a_set_that_cannot_be_fetched_or_taken_stops_the_start_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::Ca::new("IdP CA");
    let ca_file = dir.path().join("idp-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let rogue_file = dir.path().join("rogue-ca.pem");
    std::fs::write(&rogue_file, common::Ca::new("Rogue CA").pem).unwrap();
    let idp_dir = dir.path().join("idp");
    std::fs::create_dir_all(&idp_dir).unwrap();
    let idp = Provider::start(&idp_dir, &ca);
    let a = wardgate::token::generate_es256().unwrap();
    idp.publish("jwks.json", &set_of(&[("idp-a", &a)]));
    idp.publish("empty.json", r#"{"keys": []}"#);
    let nobody = format!("https://localhost:{}/jwks.json", common::free_addr().port());

    for (n, (url, ca_file, says)) in [
        (
            nobody.clone(),
            &ca_file,
            vec![nobody.as_str(), "cannot fetch the JWK set"],
        ),
        // A provider whose certificate the configured CA did not issue is not believed.
        (
            idp.url("/jwks.json"),
            &rogue_file,
            vec!["cannot fetch the JWK set", "certificate"],
        ),
        (
            idp.url("/moved"),
            &ca_file,
            vec!["302", "redirects are not followed"],
        ),
        (idp.url("/missing.json"), &ca_file, vec!["404"]),
        (idp.url("/empty.json"), &ca_file, vec!["holds no keys"]),
    ]
    .into_iter()
    .enumerate()
    {
        let gw_dir = dir.path().join(format!("gw-{n}"));
        let addr = "127.0.0.1:0".parse().unwrap();
        let cfg = configured(
            &gw_dir,
            "127.0.0.1:9".parse().unwrap(),
            addr,
            addr,
            &url,
            ca_file,
            "",
        );
        let said = refused_start(&cfg);
        for s in says {
            assert!(said.contains(s), "{url}: `{s}` not in: {said}");
        }
    }
    // And the same set, trusted, starts (checked by `validate`, which fetches it too).
    let gw_dir = dir.path().join("gw-ok");
    let addr = "127.0.0.1:0".parse().unwrap();
    let cfg = configured(
        &gw_dir,
        "127.0.0.1:9".parse().unwrap(),
        addr,
        addr,
        &idp.url("/jwks.json"),
        &ca_file,
        "",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_wardgate"))
        .args(["validate", "--offline", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
