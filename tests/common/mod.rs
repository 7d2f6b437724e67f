//! Test harness: the whole gateway on port 0 in front of a real upstream, plus a tiny client.
//!
//! `spawn_app` goes through the same start-up path as `wardgate serve` (config file, keys,
//! registers, policies, audit log), using the demo's materialised files in a temp dir. Tests
//! build their configuration in code and never touch the process environment.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use wardgate::config::Config;
use wardgate::demo::{self, data, datastore};
use wardgate::token::Signer;

/// A real `redis-server` of the test's own on a free port, nothing kept on disk; killed on
/// drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start_on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            port,
            child: Some(child),
        }
    }

    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer::start_on(port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A plain connection, for a test to look at (or change) what the gateways keep there.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub fn flushall(&self) {
        let _: () = redis::cmd("FLUSHALL")
            .query(&mut self.connection())
            .unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: SocketAddr,
    pub dir: tempfile::TempDir,
    pub audit_dir: PathBuf,
    pub config_path: PathBuf,
    pub signer: Signer,
    pub private_pem: String,
    pub tokens: std::collections::BTreeMap<String, String>,
    pub redis: Option<wardgate::controls::RedisSettings>,
    pub witness: Option<wardgate::audit::witness::WitnessConfig>,
    /// The breach log, kept by `restart` (an `AppOptions::edit` may have moved it).
    pub breach_log: PathBuf,
    /// The start-up edit (`AppOptions::tweak`), made again by `restart`.
    pub tweak: Option<fn(&mut Config)>,
    /// The running gateway, for tests that call what a signal would (`rekey`).
    pub gw: std::sync::Arc<wardgate::gateway::Gateway>,
    client: Client<HttpConnector, Full<Bytes>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    store_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// An edit of the configuration that carries values of its own (`AppOptions::edit`).
pub type ConfigEdit = Box<dyn FnOnce(&mut Config) + Send>;

#[derive(Default)]
pub struct AppOptions {
    /// Use this upstream instead of starting the synthetic datastore.
    pub upstream: Option<SocketAddr>,
    /// Put the audit log here (e.g. a tiny tmpfs) instead of in the temp dir.
    pub audit_dir: Option<PathBuf>,
    /// Put the control journal here (`server.data_dir`, set after the rest of the
    /// configuration has been resolved, so the audit log and breach log stay where they
    /// were); `restart` does not keep it.
    pub data_dir: Option<PathBuf>,
    pub electors: Option<usize>,
    /// Edit the configuration before start-up.
    pub tweak: Option<fn(&mut Config)>,
    /// The same, for an edit that needs values of the test's own (after `tweak`).
    pub edit: Option<ConfigEdit>,
    /// Share controls through this Redis (with a short staleness bound and resync interval).
    pub redis: Option<String>,
    /// Use another app's signing keys, so tokens work on both (replicas of one deployment).
    pub keys_from: Option<PathBuf>,
    /// Publish the audit chain head to this Redis (list `WITNESS_KEY`, every 100ms).
    pub witness: Option<String>,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn start_datastore(electors: usize) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let settings = data::GenSettings {
        electors,
        ..data::GenSettings::default()
    };
    let generated = data::generate(&settings, demo::AREAS).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(datastore::serve(
        listener,
        datastore::Datastore::new(generated),
        async {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}

/// The witness list `AppOptions::witness` publishes to.
pub const WITNESS_KEY: &str = "wardgate:audit-heads:test";

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(opts: AppOptions) -> TestApp {
    let (upstream, store_stop) = match opts.upstream {
        Some(u) => (u, None),
        None => {
            let (a, s) = start_datastore(opts.electors.unwrap_or(1500)).await;
            (a, Some(s))
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (data.local_addr().unwrap(), admin.local_addr().unwrap());
    let config_path = demo::materialise(dir.path(), addr, admin_addr, upstream).unwrap();
    if let Some(from) = &opts.keys_from {
        for f in std::fs::read_dir(from.join("keys")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join("keys").join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut cfg = Config::load(&config_path).unwrap();
    if let Some(url) = &opts.redis {
        // Replicas share it as they share signing keys (`keys_from` copies `keys/`).
        let key_file = dir.path().join("keys").join("controls.key");
        if !key_file.exists() {
            let key: [u8; 32] = rand::random();
            std::fs::write(&key_file, hex::encode(key)).unwrap();
        }
        cfg.redis = Some(wardgate::controls::RedisSettings {
            key_file,
            url: url.clone(),
            staleness_bound: std::time::Duration::from_secs(2),
            resync_interval: std::time::Duration::from_secs(1),
            stream: "wardgate:controls".to_owned(),
        });
    }
    if let Some(a) = &opts.audit_dir {
        cfg.audit.dir = a.clone();
    }
    if let Some(url) = &opts.witness {
        cfg.audit.witness = Some(wardgate::audit::witness::WitnessConfig {
            url: url.clone(),
            key: WITNESS_KEY.to_owned(),
            interval: Duration::from_millis(100),
        });
    }
    if let Some(d) = &opts.data_dir {
        cfg.server.data_dir = d.clone();
    }
    cfg.server.shutdown_grace = std::time::Duration::from_secs(5);
    if let Some(t) = opts.tweak {
        t(&mut cfg);
    }
    if let Some(edit) = opts.edit {
        edit(&mut cfg);
    }
    let audit_dir = cfg.audit.dir.clone();
    let redis = cfg.redis.clone();
    let witness = cfg.audit.witness.clone();
    let breach_log = cfg.watch.breach_log.clone();
    let (gw, tls) = wardgate::startup::build(&cfg).unwrap();
    let signer = Signer::from_config(cfg.signing.as_ref().unwrap()).unwrap();
    let private_pem =
        std::fs::read_to_string(&cfg.signing.as_ref().unwrap().private_key_file).unwrap();
    let tokens = demo::mint_tokens(&signer, now()).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(wardgate::startup::run(
        gw.clone(),
        data,
        admin,
        tls,
        async {
            let _ = rx.await;
        },
        cfg.server.shutdown_grace,
    ));
    let client = Client::builder(TokioExecutor::new()).build_http();
    TestApp {
        addr,
        admin: admin_addr,
        upstream,
        dir,
        audit_dir,
        config_path,
        signer,
        private_pem,
        tokens,
        redis,
        witness,
        breach_log,
        tweak: opts.tweak,
        gw,
        client,
        stop: Some(tx),
        task: Some(task),
        store_stop,
    }
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl TestApp {
    pub fn token(&self, persona: &str) -> String {
        self.tokens
            .get(persona)
            .unwrap_or_else(|| panic!("no persona `{persona}`"))
            .clone()
    }

    /// Claims a valid demo token would carry, for tests that then break one thing.
    pub fn claims(&self, role: &str, areas: &[&str], purposes: &[&str]) -> Value {
        let now = now();
        json!({
            "iss": demo::ISSUER, "aud": demo::AUDIENCE, "sub": format!("test-{role}"),
            "jti": format!("{:032x}", rand::random::<u128>()),
            "exp": now + 600, "nbf": now - 5, "iat": now,
            "role": role, "org_unit": "TEST-UNIT", "areas": areas, "purposes": purposes,
        })
    }

    /// Signs arbitrary claims with the demo key (ES256) under `kid`.
    pub fn sign_raw(&self, claims: &Value, kid: &str) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.private_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_raw(claims, demo::KID)
    }

    pub fn public_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join(format!("keys/{}.pub.pem", demo::KID))).unwrap()
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>, purpose: Option<&str>) -> Resp {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        if let Some(p) = purpose {
            headers.push(("x-purpose", p));
        }
        self.request(Method::GET, path, &headers, None).await
    }

    /// A doorstep write (`POST /voter/electors/{id}/canvass`) of `body` for `purpose`.
    pub async fn canvass(&self, id: &str, token: &str, purpose: &str, body: &str) -> Resp {
        let path = format!("/voter/electors/{id}/canvass");
        self.post(&path, token, purpose, body).await
    }

    pub async fn post(&self, path: &str, token: &str, purpose: &str, body: &str) -> Resp {
        let auth = format!("Bearer {token}");
        let headers = [
            ("authorization", auth.as_str()),
            ("x-purpose", purpose),
            ("content-type", "application/json"),
        ];
        self.request(Method::POST, path, &headers, Some(body)).await
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        let req = Request::builder()
            .uri(format!("http://{}{path}", self.admin))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// Every audit record on disk, in order.
    pub fn audit_records(&self) -> Vec<Value> {
        read_audit(&self.audit_dir)
    }

    /// The audit records of one request id, waiting (at most ten seconds) until there are at
    /// least `at_least` of them: a record queued without waiting (`queue_detached`) reaches
    /// the disk after the answer does.
    pub async fn audit_records_of(&self, request_id: &str, at_least: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records: Vec<Value> = (self.audit_records().into_iter())
                .filter(|r| r["request_id"] == request_id)
                .collect();
            if records.len() >= at_least || Instant::now() >= deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The audit record of one request id, its last if it has several (a write's record
    /// before forwarding, then the answer's; panics if absent).
    pub fn audit_for(&self, resp: &Resp) -> Value {
        let rid = resp
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("response has x-request-id")
            .to_owned();
        self.audit_records()
            .into_iter()
            .rfind(|r| r["request_id"] == rid.as_str())
            .unwrap_or_else(|| panic!("no audit record for request `{rid}`"))
    }

    pub async fn admin_post(&self, path: &str, token: &str, body: &str) -> Resp {
        self.admin_post_as(path, token, "application/json", body)
            .await
    }

    /// `admin_post` with the body said to be `content_type`.
    pub async fn admin_post_as(
        &self,
        path: &str,
        token: &str,
        content_type: &str,
        body: &str,
    ) -> Resp {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{path}", self.admin))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub async fn admin_get_with(&self, path: &str, token: &str) -> Resp {
        let req = Request::builder()
            .uri(format!("http://{}{path}", self.admin))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// Stops the gateway and starts it again on the same data directory and configuration.
    pub async fn restart(mut self) -> TestApp {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
        let mut cfg = Config::load(&self.config_path).unwrap();
        cfg.audit.dir = self.audit_dir.clone();
        cfg.redis = self.redis.clone();
        cfg.audit.witness = self.witness.clone();
        cfg.watch.breach_log = self.breach_log.clone();
        if let Some(t) = self.tweak {
            t(&mut cfg);
        }
        let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = data.local_addr().unwrap();
        self.admin = admin.local_addr().unwrap();
        let (gw, tls) = wardgate::startup::build(&cfg).unwrap();
        self.gw = gw.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.task = Some(tokio::spawn(wardgate::startup::run(
            gw,
            data,
            admin,
            tls,
            async {
                let _ = rx.await;
            },
            std::time::Duration::from_secs(5),
        )));
        self.stop = Some(tx);
        self
    }

    pub async fn stop(mut self) {
        self.halt().await;
        if let Some(s) = self.store_stop.take() {
            let _ = s.send(());
        }
    }

    /// Stops the gateway (draining, flushing the log) but keeps its files for inspection.
    pub async fn halt(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

pub fn read_audit(dir: &Path) -> Vec<Value> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    segs.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".jsonl"))
    });
    segs.sort();
    let mut out = Vec::new();
    for s in segs {
        for line in std::fs::read_to_string(&s).unwrap().lines() {
            if let Ok(v) = serde_json::from_str(line) {
                out.push(v);
            }
        }
    }
    out
}

// ---- breach detection scenarios (watch_e2e, console_browser)

/// Working hours from an hour ago to two hours ahead: the scenario happens in the daytime.
pub fn daytime(cfg: &mut Config) {
    let now =
        wardgate::watch::rules::local_minute(wardgate::watch::rules::now_millis(), cfg.watch.zone);
    set_hours(cfg, (now + 1440 - 60) % 1440, (now + 120) % 1440);
}

pub fn set_hours(cfg: &mut Config, start: u32, end: u32) {
    cfg.watch
        .rules
        .get_mut(&wardgate::watch::settings::Rule::UnusualHours)
        .unwrap()
        .hours = (start, end);
}

/// Pages through the caller's area 100 records at a time, starting again at the end, until
/// `records` have been disclosed. Returns the request ids of the pages.
pub async fn scrape(app: &TestApp, token: &str, records: usize) -> Vec<String> {
    let (mut seen, mut page, mut ids) = (0, 1, Vec::new());
    while seen < records {
        let r = app
            .get(
                &format!("/voter/electors?per_page=100&page={page}"),
                Some(token),
                Some("canvassing"),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let n = r.json()["records"].as_array().unwrap().len();
        ids.push(r.headers["x-request-id"].to_str().unwrap().to_owned());
        seen += n;
        page = if n < 100 { 1 } else { page + 1 };
    }
    ids
}

/// A tmpfs mounted at a directory (root only), unmounted when dropped: a small disk that
/// really fills up.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    /// `mount`, or `None` with a note that the test skipped; mounting needs root. Under CI,
    /// and under `scripts/test.sh` where it could mount one (`WARDGATE_NO_SKIP`), a failure
    /// to mount fails the test instead of skipping it.
    pub fn mount_or_skip(dir: &Path, size: &str) -> Option<Tmpfs> {
        let mounted = Tmpfs::mount(dir, size);
        if mounted.is_none() {
            assert!(
                std::env::var_os("CI").is_none() && std::env::var_os("WARDGATE_NO_SKIP").is_none(),
                "cannot mount a tmpfs at {} (CI, or scripts/test.sh as root)",
                dir.display()
            );
            eprintln!("skipping: cannot mount a tmpfs (not root)");
        }
        mounted
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A small ext4 filesystem on a loop device mounted at a directory (root only), which can be
/// frozen (`fsfreeze`): every write to it then waits, as on a disk retrying for minutes or a
/// hung mount, until it is thawed. Thawed and unmounted when dropped.
pub struct FreezableDisk {
    dir: std::path::PathBuf,
    _image: tempfile::TempDir,
}

impl FreezableDisk {
    /// Mounted at `dir`, or `None` with a note that the test skipped (as `Tmpfs::mount_or_skip`:
    /// under CI or `WARDGATE_NO_SKIP`, a failure to mount fails the test).
    pub fn mount_or_skip(dir: &Path) -> Option<FreezableDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("disk.img");
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
            std::process::Command::new(cmd)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let ok = std::fs::File::create(&file)
            .and_then(|f| f.set_len(64 << 20))
            .is_ok()
            && run(
                "mkfs.ext4",
                &["-q".as_ref(), "-F".as_ref(), file.as_os_str()],
            )
            && run(
                "mount",
                &[
                    "-o".as_ref(),
                    "loop".as_ref(),
                    file.as_os_str(),
                    dir.as_os_str(),
                ],
            );
        if !ok {
            assert!(
                std::env::var_os("CI").is_none() && std::env::var_os("WARDGATE_NO_SKIP").is_none(),
                "cannot mount a loop device at {} (CI, or scripts/test.sh as root)",
                dir.display()
            );
            eprintln!("skipping: cannot mount a loop device (not root)");
            return None;
        }
        Some(FreezableDisk {
            dir: dir.to_path_buf(),
            _image: image,
        })
    }

    fn fsfreeze(&self, how: &str) {
        let ok = std::process::Command::new("fsfreeze")
            .arg(how)
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok || how == "-u", "fsfreeze {how} {}", self.dir.display());
    }

    pub fn freeze(&self) {
        self.fsfreeze("-f");
    }

    pub fn thaw(&self) {
        self.fsfreeze("-u");
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        self.thaw();
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Writes until the filesystem is full.
pub fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() && f.sync_all().is_ok() {}
}

/// A datastore that answers every request with `body` (a 200 JSON page) after `delay`.
pub async fn delayed_upstream(body: Bytes, delay: std::time::Duration) -> SocketAddr {
    fixed_upstream(body, "application/json", delay).await
}

/// A gateway in front of a datastore answering every request with `page` (JSON).
pub async fn app_serving(page: &Value) -> TestApp {
    let upstream = delayed_upstream(Bytes::from(page.to_string()), std::time::Duration::ZERO).await;
    spawn_app_with(AppOptions {
        upstream: Some(upstream),
        ..AppOptions::default()
    })
    .await
}

/// A datastore that answers every request, whatever it asks, with 200, `content_type` and
/// `body`, after `delay`.
pub async fn fixed_upstream(
    body: Bytes,
    content_type: &'static str,
    delay: std::time::Duration,
) -> SocketAddr {
    upstream_answering(move |_| body.clone(), content_type, delay).await
}

/// A datastore that answers every request with 200, `content_type` and what `answer` gives for
/// its method, after `delay`.
pub async fn upstream_answering(
    answer: impl Fn(&http::Method) -> Bytes + Clone + Send + Sync + 'static,
    content_type: &'static str,
    delay: std::time::Duration,
) -> SocketAddr {
    upstream_with(http::StatusCode::OK, answer, content_type, delay).await
}

/// A datastore that answers every request with 200 and the JSON `body`, and the count of the
/// writes (POSTs) it was sent: for tests that a refused write never reached it.
pub async fn counting_upstream(
    body: Bytes,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let posts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = posts.clone();
    let answer = move |method: &Method| {
        if method == Method::POST {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        body.clone()
    };
    let addr = upstream_answering(answer, "application/json", Duration::ZERO).await;
    (addr, posts)
}

/// `upstream_answering` with `status` instead of 200.
async fn upstream_with(
    status: http::StatusCode,
    answer: impl Fn(&http::Method) -> Bytes + Clone + Send + Sync + 'static,
    content_type: &'static str,
    delay: std::time::Duration,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let body = answer(req.method());
                    async move {
                        tokio::time::sleep(delay).await;
                        let mut resp = http::Response::new(Full::new(body));
                        *resp.status_mut() = status;
                        resp.headers_mut()
                            .insert("content-type", http::HeaderValue::from_static(content_type));
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A datastore that answers every request with `status` and an empty JSON object.
pub async fn upstream_refusing(status: u16) -> SocketAddr {
    let status = http::StatusCode::from_u16(status).unwrap();
    upstream_with(
        status,
        |_| Bytes::from_static(b"{}"),
        "application/json",
        Duration::ZERO,
    )
    .await
}

/// A datastore's answer to `GET path` as bytes (a page to serve again from a fake datastore).
pub async fn datastore_body(addr: SocketAddr, path: &str) -> Bytes {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let uri = format!("http://{addr}{path}");
    let resp = client.get(uri.parse().unwrap()).await.unwrap();
    resp.into_body().collect().await.unwrap().to_bytes()
}

/// A loopback address nothing listens on yet (for a `wardgate serve` process's listeners).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `wardgate serve --config cfg` as a process of its own, its output discarded: for what only
/// a real process shows (signals, a crash).
pub fn serve_process(cfg: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wardgate"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Adds `setting` (a TOML line) to the `[server]` section of the configuration file `cfg`.
pub fn server_setting(cfg: &Path, setting: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    assert!(
        text.contains("[server]\n"),
        "no [server] section in `{}`",
        cfg.display()
    );
    let text = text.replacen("[server]\n", &format!("[server]\n{setting}\n"), 1);
    std::fs::write(cfg, text).unwrap();
}

/// The status a gateway process at `listen` answers a canvassing listing (five records)
/// with, for `token`; 0 when it cannot be reached. (`client`: one per test, so that its
/// connections are reused.)
pub async fn listing_status(
    client: &Client<HttpConnector, Full<Bytes>>,
    listen: SocketAddr,
    token: &str,
) -> u16 {
    let req = Request::get(format!("http://{listen}/voter/electors?per_page=5"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-purpose", "canvassing")
        .body(Full::new(Bytes::new()))
        .unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let s = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            s
        }
        Err(_) => 0,
    }
}

/// Sends `SIGHUP` to the process: read the keys, TLS files and policy pack again.
pub fn hangup(child: &Child) {
    let sent = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// The audit records under `dir/audit` whose `reason` is `reason`.
pub fn audited(dir: &Path, reason: &str) -> Vec<Value> {
    (read_audit(&dir.join("audit")).into_iter())
        .filter(|r| r["reason"] == reason)
        .collect()
}

/// One sample of a gateway process's `/metrics` on its admin plane (`series` with its labels
/// as written), 0 when absent or unreachable.
pub async fn metric(
    client: &Client<HttpConnector, Full<Bytes>>,
    admin: SocketAddr,
    series: &str,
) -> u64 {
    let req = Request::get(format!("http://{admin}/metrics"))
        .body(Full::new(Bytes::new()))
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

/// An HTTP/2 connection (prior knowledge, plain) to `addr` whose streams' receive window is
/// `window` bytes and stays so (0: the client never takes an answer's body), driven in the
/// background: its sender, and the task that ends when the connection does.
pub async fn http2_with_window(
    addr: SocketAddr,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .adaptive_window(false)
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

/// A certificate authority of the test's own.
pub struct Ca {
    pub pem: String,
    pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.clone().self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names` issued by this CA, and its key: (cert PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        self.issue_with(rcgen::CertificateParams::new(names).unwrap())
    }

    /// The same, valid until the first day of `year`.
    pub fn issue_until(&self, names: &[&str], year: i32) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        self.issue_with(params)
    }

    pub fn issue_with(&self, params: rcgen::CertificateParams) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Everything logged on this thread while the guard lives (a current-thread test runtime
/// runs the gateway's tasks here too).
pub fn capture_logs() -> (
    tracing::subscriber::DefaultGuard,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    #[derive(Clone)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // A second dispatcher alive for the whole run, which takes nothing. With one alone (the
    // capture), `tracing` asks only the registering thread's default whether a log line is
    // wanted and caches the answer for every thread: a line first reached by a test on
    // another thread would be cached as unwanted, and missing from the capture.
    static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = Captured(logs.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (tracing::subscriber::set_default(subscriber), logs)
}

/// Whether a datastore record must never leave the gateway (DOMAIN.md: anonymous electors and
/// under-16s), worked out here from the record as the rules say, not by the gateway's code nor
/// by the demo datastore's `exclude=protected` (which uses it): a test that took either as the
/// truth would shrink its expectation with any regression of that code. An `N` in a marker,
/// or a marker not of one or two capital letters; a flag whose letters and digits hold
/// `under16` or `undersixteen`; an attainer date (the day the elector turns 18) on which they
/// are under 16 today (a birthday on 29 February counting as had on 1 March), or one that is
/// not a date.
#[allow(dead_code, reason = "not every test binary checks records")]
pub fn never_disclosed(r: &Value) -> bool {
    let words = |field: &str| -> Vec<String> {
        (r[field].as_array().into_iter().flatten())
            .map(|w| w.as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let anonymous = words("markers").iter().any(|m| {
        let form = (1..=2).contains(&m.len()) && m.bytes().all(|b| b.is_ascii_uppercase());
        m.contains('N') || !form
    });
    let under_16_flag = words("flags").iter().any(|f| {
        let folded: String = (f.chars().filter(char::is_ascii_alphanumeric))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        folded.contains("under16") || folded.contains("undersixteen")
    });
    let young = match &r["attainer_date"] {
        Value::Null => false,
        Value::String(s) => {
            let fmt = time::macros::format_description!("[year]-[month]-[day]");
            match time::Date::parse(s, &fmt) {
                Err(_) => true,
                Ok(turns_18) => {
                    let today = wardgate::uk_time::uk_date(time::OffsetDateTime::now_utc());
                    let birthday = (u8::from(turns_18.month()), turns_18.day());
                    let before = (u8::from(today.month()), today.day()) < birthday;
                    today.year() - (turns_18.year() - 18) - i32::from(before) < 16
                }
            }
        }
        _ => true,
    };
    anonymous || under_16_flag || young
}
