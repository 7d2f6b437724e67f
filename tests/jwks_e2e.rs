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

use http_body_util::Full;
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
/// `url` (its certificate from `ca_file`) with `settings`, and no checks of its files. Its
/// `[signing]` goes too: the demo's key is no longer trusted (the start would refuse it).
/// Tokens are signed with the provider's keys (`token`).
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
    let signing = format!(
        "[signing]\nkid = \"{kid}\"\nalgorithm = \"ES256\"\nprivate_key_file = \"keys/{kid}.key.pem\"\nissuer = \"{issuer}\"\n",
        kid = wardgate::demo::KID,
        issuer = wardgate::demo::ISSUER,
    );
    assert!(text.contains(&signing), "the demo's signing entry moved");
    let text = text.replacen(&signing, "", 1);
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
        &config.auth.jwks_issuer,
    )
    .unwrap();
    wardgate::demo::mint_tokens(&signer, common::now()).unwrap()["councillor"].clone()
}

/// A provider publishing one key (`idp-a`, `a`), and a `wardgate serve` fetching its set with
/// `settings`, in front of a demo datastore.
struct Setup {
    _dir: tempfile::TempDir,
    idp: Provider,
    gw_dir: PathBuf,
    cfg: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    gateway: Child,
    client: Client,
    a: KeyPairPem,
    _store: tokio::sync::oneshot::Sender<()>,
}

impl Setup {
    async fn start(settings: &str) -> Setup {
        Setup::start_with(settings, false).await
    }

    /// With `pin`, `a`'s public key is also pinned as a key file, `[[auth.keys]]` `pinned-a`.
    async fn start_with(settings: &str, pin: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = common::Ca::new("IdP CA");
        let ca_file = dir.path().join("idp-ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let idp_dir = dir.path().join("idp");
        std::fs::create_dir_all(&idp_dir).unwrap();
        let a = wardgate::token::generate_es256().unwrap();
        let idp = Provider::start(&idp_dir, &ca);
        idp.publish("jwks.json", &set_of(&[("idp-a", &a)]));
        let gw_dir = dir.path().join("gw");
        let (upstream, store) = common::start_datastore(200).await;
        let (listen, admin) = (common::free_addr(), common::free_addr());
        let url = idp.url("/jwks.json");
        let pinned = "\n[[auth.keys]]\nkid = \"pinned-a\"\nalgorithm = \"ES256\"\n\
                      public_key_file = \"keys/pinned-a.pub.pem\"\n";
        let settings = format!("{settings}{}", if pin { pinned } else { "" });
        let cfg = configured(&gw_dir, upstream, listen, admin, &url, &ca_file, &settings);
        std::fs::write(gw_dir.join("keys/pinned-a.pub.pem"), &a.public_pem).unwrap();
        let gateway = common::serve_process(&cfg);
        let s = Setup {
            _dir: dir,
            idp,
            gw_dir,
            cfg,
            listen,
            admin,
            gateway,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
            a,
            _store: store,
        };
        let token_a = s.token("idp-a", &s.a);
        s.until(&token_a, 200, "serving with the fetched key").await;
        s
    }

    fn token(&self, kid: &str, pair: &KeyPairPem) -> String {
        token(&self.cfg, kid, pair)
    }

    async fn status(&self, token: &str) -> u16 {
        common::listing_status(&self.client, self.listen, token).await
    }

    /// `/readyz`'s status and body.
    async fn readyz(&self) -> (u16, serde_json::Value) {
        use http_body_util::BodyExt;
        let req = hyper::Request::get(format!("http://{}/readyz", self.admin))
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// Waits (`within` at most) until `token` gets `want`.
    async fn until_within(&self, token: &str, want: u16, what: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.status(token).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still {got}, not {want}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn until(&self, token: &str, want: u16, what: &str) {
        self.until_within(token, want, what, Duration::from_secs(60))
            .await;
    }

    fn audited(&self, reason: &str) -> Vec<serde_json::Value> {
        common::audited(&self.gw_dir, reason)
    }

    fn fetches(&self) -> usize {
        self.idp.requests_for("/jwks.json")
    }

    /// Waits until the provider has been asked `n` more times than `from`.
    async fn after_fetches(&self, from: usize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.fetches() < from + n {
            assert!(Instant::now() < deadline, "not fetched {n} more times");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.gateway.kill();
        let _ = self.gateway.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_set_that_would_not_start_the_gateway_is_refused_once_and_a_rotation_taken() {
    let s = Setup::start("jwks_refresh = \"1s\"").await;
    let token_a = s.token("idp-a", &s.a);
    // The provider publishes a set that would not start the gateway: refused once, however
    // many fetches bring it (the same refusal, though its bytes differ), and the key in use
    // stays.
    s.idp.publish("jwks.json", r#"{"keys": []}"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.audited("keys_reload_refused").is_empty() {
        assert!(Instant::now() < deadline, "the empty set not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.after_fetches(s.fetches(), 2).await;
    s.idp
        .publish("jwks.json", r#"{"keys": [], "note": "still none"}"#);
    s.after_fetches(s.fetches(), 2).await;
    let refusals = s.audited("keys_reload_refused");
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["route"], "auth.keys");
    assert_eq!(refusals[0]["detail"]["trigger"], "fetched");
    let why = refusals[0]["detail"]["error"].as_str().unwrap();
    assert!(
        why.contains("holds no keys") && why.contains(&s.idp.url("/jwks.json")),
        "{why}"
    );
    assert_eq!(s.status(&token_a).await, 200, "the key in use stays");
    assert!(s.audited("keys_reloaded").is_empty());

    // The provider rotates: the new key is taken up, and the old one's tokens stop (cached or
    // not).
    let b = wardgate::token::generate_es256().unwrap();
    let token_b = s.token("idp-b", &b);
    s.idp.publish("jwks.json", &set_of(&[("idp-b", &b)]));
    s.until(&token_b, 200, "the rotated key taken up").await;
    assert_eq!(s.status(&token_a).await, 401);
    let taken = s.audited("keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["route"], "auth.keys");
    assert_eq!(taken[0]["detail"]["trigger"], "fetched");
    assert_eq!(taken[0]["detail"]["added"], json!(["idp-b"]));
    assert_eq!(taken[0]["detail"]["removed"], json!(["idp-a"]));
    // Fetched again and again, the same set records nothing more.
    s.after_fetches(s.fetches(), 2).await;
    assert_eq!(s.audited("keys_reloaded").len(), 1);
}

/// The provider publishes its signing key's private half: the fetched keys are dropped at
/// once (not after `jwks_max_stale`, an hour here), recorded with the key named, and that key
/// is not trusted again in this run, published without its private half too; a new key is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_set_publishing_a_private_key_drops_the_fetched_keys_at_once() {
    let s = Setup::start("jwks_refresh = \"1s\"\njwks_max_stale = \"1h\"").await;
    let token_a = s.token("idp-a", &s.a);
    let good = set_of(&[("idp-a", &s.a)]);
    let mut leaked: serde_json::Value = serde_json::from_str(&good).unwrap();
    leaked["keys"][0]["d"] = "c2VjcmV0LWhhbGY".into();
    s.idp.publish("jwks.json", &leaked.to_string());
    s.until(&token_a, 401, "the leaked key dropped").await;
    let taken = s.audited("keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["detail"]["trigger"], "leaked_key");
    assert_eq!(taken[0]["detail"]["removed"], json!(["idp-a"]));
    let said = s.audited("keys_reload_refused");
    assert!(
        said.iter().any(|r| r["detail"]["trigger"] == "leaked_key"
            && r["detail"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("idp-a") && e.contains("(`d`)"))),
        "{said:?}"
    );
    // Published again without its private half (a serializer mended, the key pair kept):
    // still not trusted. A new key is.
    s.idp.publish("jwks.json", &good);
    s.after_fetches(s.fetches(), 2).await;
    assert_eq!(
        s.status(&token_a).await,
        401,
        "the leaked key trusted again"
    );
    // A rotation keeping the old key's public half beside the new one, as providers do for
    // a while: the new key is taken, the leaked one passed over.
    let b = wardgate::token::generate_es256().unwrap();
    let token_b = s.token("idp-b", &b);
    s.idp
        .publish("jwks.json", &set_of(&[("idp-a", &s.a), ("idp-b", &b)]));
    s.until(&token_b, 200, "a new key taken").await;
    assert_eq!(s.status(&token_a).await, 401);
    // And a set holding the leaked key's public half alone, later (a stale cache), drops
    // nothing in use.
    s.idp.publish("jwks.json", &good);
    s.after_fetches(s.fetches(), 2).await;
    assert_eq!(s.status(&token_b).await, 200, "the key in use dropped");
}

/// A fetched set publishing a key's private half drops, with the fetched keys, a copy of that
/// key pinned as a key file, under another id; and a later set does not bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_leak_drops_a_pinned_copy_of_the_key_too() {
    let s = Setup::start_with("jwks_refresh = \"1s\"\njwks_max_stale = \"1h\"", true).await;
    let pinned = s.token("pinned-a", &s.a);
    assert_eq!(s.status(&pinned).await, 200);
    let mut leaked: serde_json::Value = serde_json::from_str(&set_of(&[("idp-a", &s.a)])).unwrap();
    leaked["keys"][0]["d"] = "c2VjcmV0LWhhbGY".into();
    s.idp.publish("jwks.json", &leaked.to_string());
    s.until(&pinned, 401, "the pinned copy dropped").await;
    let taken = s.audited("keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["detail"]["trigger"], "leaked_key");
    assert_eq!(taken[0]["detail"]["removed"], json!(["idp-a", "pinned-a"]));
    // A new key taken later keeps the key files' keys as in use: not the pinned copy.
    let b = wardgate::token::generate_es256().unwrap();
    let token_b = s.token("idp-b", &b);
    s.idp.publish("jwks.json", &set_of(&[("idp-b", &b)]));
    s.until(&token_b, 200, "a new key taken").await;
    assert_eq!(s.status(&pinned).await, 401);
    // And nothing is dropped again at every fetch.
    s.after_fetches(s.fetches(), 2).await;
    let leaked_drops = (s.audited("keys_reloaded").iter())
        .filter(|r| r["detail"]["trigger"] == "leaked_key")
        .count();
    assert_eq!(leaked_drops, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_no_fetch_has_confirmed_within_max_stale_are_dropped_until_one_does() {
    let s = Setup::start("jwks_refresh = \"1s\"\njwks_max_stale = \"3s\"").await;
    let token_a = s.token("idp-a", &s.a);
    // The provider cannot be reached (or the gateway is cut off from it): the key in use
    // stays until `jwks_max_stale`, and is then dropped, recorded, and its tokens refused.
    let mut s = s;
    s.idp.stop();
    s.until(&token_a, 401, "the stale key dropped").await;
    let taken = s.audited("keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["detail"]["trigger"], "jwks_stale");
    assert_eq!(taken[0]["detail"]["removed"], json!(["idp-a"]));
    assert_eq!(taken[0]["detail"]["keys"], json!({}));
    // No key is trusted: the replica says it is not ready, and why.
    let (status, body) = s.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:wardgate:problem:keys-unavailable");
    assert!(
        common::metric(
            &s.client,
            s.admin,
            "wardgate_jwks_fetches_total{outcome=\"failed\"}"
        )
        .await
            > 0
    );
    // Back: its set is taken again, recorded.
    s.idp.resume();
    s.until(&token_a, 200, "the key taken again").await;
    assert_eq!(s.readyz().await.0, 200);
    let taken = s.audited("keys_reloaded");
    assert_eq!(taken.len(), 2, "{taken:?}");
    assert_eq!(taken[1]["detail"]["trigger"], "fetched");
    assert_eq!(taken[1]["detail"]["added"], json!(["idp-a"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_naming_a_new_key_fetches_early_a_flood_asks_once_and_sighup_at_once() {
    // Fetched every hour: only a token naming a key not trusted, or a signal, fetches sooner.
    let s = Setup::start("jwks_refresh = \"1h\"").await;
    let token_a = s.token("idp-a", &s.a);
    assert_eq!(s.fetches(), 1, "fetched once, at start");

    // The provider publishes a new key and signs with it at once.
    let b = wardgate::token::generate_es256().unwrap();
    let token_b = s.token("idp-b", &b);
    s.idp
        .publish("jwks.json", &set_of(&[("idp-a", &s.a), ("idp-b", &b)]));
    s.until(&token_b, 200, "the new key taken up").await;
    assert_eq!(s.status(&token_a).await, 200);
    let taken = s.audited("keys_reloaded");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["detail"]["trigger"], "fetched");
    assert_eq!(taken[0]["detail"]["added"], json!(["idp-b"]));
    assert_eq!(taken[0]["detail"]["removed"], json!([]));

    // Anyone may send tokens naming keys nobody publishes: the provider is not asked for
    // each (at most once every 30 s), here over five seconds of them.
    let asked = s.fetches();
    let forged = s.token("idp-c", &wardgate::token::generate_es256().unwrap());
    let flood = Instant::now();
    while flood.elapsed() < Duration::from_secs(5) {
        assert_eq!(s.status(&forged).await, 401);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = s.fetches();
    assert!(after <= asked + 1, "{asked} fetches before, {after} after");
    assert_eq!(s.status(&token_b).await, 200);

    // An operator's SIGHUP is not held to that limit: a key published now is taken up at
    // once, well before the 30 s are over.
    let c = wardgate::token::generate_es256().unwrap();
    let token_c = s.token("idp-c2", &c);
    s.idp.publish(
        "jwks.json",
        &set_of(&[("idp-a", &s.a), ("idp-b", &b), ("idp-c2", &c)]),
    );
    common::hangup(&s.gateway);
    s.until_within(&token_c, 200, "taken up on SIGHUP", Duration::from_secs(15))
        .await;
    let taken = s.audited("keys_reloaded");
    let fetched: Vec<_> = (taken.iter())
        .filter(|r| r["detail"]["trigger"] == "fetched")
        .collect();
    assert_eq!(fetched.len(), 2, "{taken:?}");
    assert_eq!(fetched[1]["detail"]["added"], json!(["idp-c2"]));
}

/// `wardgate serve`'s output, for a configuration that must not start (a minute at most: one
/// that starts is killed and fails the test).
fn refused_start(cfg: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wardgate"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("`{}` started", cfg.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "it started and stopped cleanly");
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
