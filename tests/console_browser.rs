//! The security console in a real browser: headless Debian Chromium driven through
//! ChromeDriver (WebDriver). An officer pastes a token, a scripted scraping burst makes an
//! alert appear live with its 72-hour countdown, the officer revokes the token from the page
//! (and the scraper is refused), then classifies the alert, which moves to the breach log.
//!
//! `scripts/test.sh` installs `chromium` and `chromium-driver`. Outside CI, a machine without
//! them skips this test with a message; under `CI=true` their absence fails it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{AppOptions, daytime, scrape, spawn_app_with};
use fantoccini::{Client, ClientBuilder, Locator};
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Kills ChromeDriver (and so the browser) however the test ends; removes the profile.
struct Driver(
    Child,
    #[allow(dead_code, reason = "held for its Drop")] tempfile::TempDir,
);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser() -> Option<(Driver, Client)> {
    if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var("CI").is_err() && std::env::var("WARDGATE_NO_SKIP").is_err(),
            "CI and scripts/test.sh need {CHROMIUM} and {CHROMEDRIVER} (the script installs them)"
        );
        eprintln!(
            "skipped: {CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)"
        );
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let profile = tempfile::tempdir().unwrap();
    let caps_dir = profile.path().display().to_string();
    let driver = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        profile,
    );
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                format!("--user-data-dir={caps_dir}"),
            ],
        }
    });
    let started = Instant::now();
    loop {
        let attempt = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps.as_object().unwrap().clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        match attempt {
            Ok(c) => return Some((driver, c)),
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot start a browser session: {e}"),
        }
    }
}

/// Waits until the page has an element matching `css` whose text contains `text`.
async fn wait_text(c: &Client, css: &str, text: &str) -> String {
    let started = Instant::now();
    loop {
        for e in c.find_all(Locator::Css(css)).await.unwrap() {
            let t = e.text().await.unwrap_or_default();
            if t.contains(text) {
                return t;
            }
        }
        if started.elapsed() > Duration::from_secs(20) {
            let page = c.source().await.unwrap_or_default();
            panic!("no `{css}` containing {text:?} on the page:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens the console served at `admin`, pastes `token` and connects; waits until it is
/// connected and lists no open alert.
async fn open_console(c: &Client, admin: std::net::SocketAddr, token: &str) {
    c.goto(&format!("http://{admin}/console")).await.unwrap();
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    c.find(Locator::Css("#connect"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(c, "#status", "Connected").await;
    wait_text(c, "#alerts", "No open alerts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_appears_live_and_is_contained_and_classified_in_the_browser() {
    let Some((_driver, c)) = browser().await else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        electors: Some(6000),
        tweak: Some(daytime),
        ..AppOptions::default()
    })
    .await;
    open_console(&c, app.admin, &app.token("security")).await;

    // A councillor scrapes their ward; the alert arrives over the live feed, no reload.
    let councillor = app.token("councillor");
    let burst = Instant::now();
    scrape(&app, &councillor, 2500).await;
    let row = wait_text(&c, "#alerts tr.alert", "volume").await;
    println!(
        "alert visible in the browser {} ms after the burst began",
        burst.elapsed().as_millis()
    );
    assert!(row.contains("demo-councillor"), "{row}");
    assert!(
        row.contains("71h"),
        "the 72-hour countdown is running: {row}"
    );
    wait_text(&c, "#feed tr", "demo-councillor").await;
    wait_text(&c, "#legend li", "demo-councillor").await;
    assert!(
        !c.find_all(Locator::Css(
            "#chart polyline[data-principal='demo-councillor']"
        ))
        .await
        .unwrap()
        .is_empty()
    );

    // Contain from the page: the councillor's token stops working.
    c.find(Locator::Css("#alerts tr.alert button.revoke"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The page asks whom the button is for (rows move as alerts arrive).
    let asked = c.get_alert_text().await.unwrap();
    assert!(asked.contains("demo-councillor"), "{asked}");
    c.accept_alert().await.unwrap();
    wait_text(&c, "#status", "revoked on every replica").await;
    let r = app
        .get(
            "/voter/electors?per_page=5",
            Some(&councillor),
            Some("canvassing"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Classify: a near miss, with a note. It leaves the open alerts for the breach log.
    let alert_row = c.find(Locator::Css("#alerts tr.alert")).await.unwrap();
    let id = alert_row.attr("data-id").await.unwrap().unwrap();
    alert_row
        .find(Locator::Css("select.classify-class"))
        .await
        .unwrap()
        .select_by_value("near_miss")
        .await
        .unwrap();
    alert_row
        .find(Locator::Css("input.classify-note"))
        .await
        .unwrap()
        .send_keys("councillor's office confirmed a mistaken bulk download; deleted")
        .await
        .unwrap();
    alert_row
        .find(Locator::Css("button.classify"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let logged = wait_text(&c, &format!("#log tr[data-id='{id}']"), "near miss").await;
    assert!(logged.contains("demo-security"), "{logged}");
    wait_text(&c, "#alerts", "No open alerts").await;

    // The breach log on disk holds the alert, the classification and who made it.
    let log = std::fs::read_to_string(app.dir.path().join("breach-log.jsonl")).unwrap();
    let classified = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["entry"] == "classified" && e["alert_id"] == id.as_str())
        .expect("classification in the breach log");
    assert_eq!(classified["classification"]["class"], "near_miss");
    assert_eq!(classified["classification"]["by"], "demo-security");
    assert!(
        log.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .any(|e| e["entry"] == "contained" && e["alert_id"] == id.as_str()),
        "the console's revocation is recorded against the alert"
    );
    c.close().await.unwrap();
}

/// A TCP relay to the admin plane that can be cut: while cut, it drops the connections it
/// holds and every new one at once (a replica restarting, a network blip, as the page sees
/// it), and once restored relays again.
async fn relay(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut cut = cut_rx.clone();
            if *cut.borrow() {
                continue;
            }
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = cut.wait_for(|cut| *cut) => {}
                }
            });
        }
    });
    (addr, cut)
}

/// An alert raised while the console's live feed is down is on the page once the feed is
/// back: alerts reach the page over the feed only while it is open, so the page reads the
/// alert list again whenever the feed opens, not only when the officer connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_raised_while_the_feed_was_down_is_shown_once_it_is_back() {
    let Some((_driver, c)) = browser().await else {
        return;
    };
    let app = spawn_app_with(AppOptions {
        electors: Some(6000),
        tweak: Some(daytime),
        ..AppOptions::default()
    })
    .await;
    let (admin, cut) = relay(app.admin).await;
    open_console(&c, admin, &app.token("security")).await;

    cut.send_replace(true);
    wait_text(&c, "#status", "reconnecting").await;
    // A councillor scrapes their ward while the page cannot hear of it; the alert is in the
    // breach log before the feed comes back.
    scrape(&app, &app.token("councillor"), 2500).await;
    let breach_log = app.dir.path().join("breach-log.jsonl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&breach_log).is_ok_and(|log| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| e["entry"] == "alert")
    }) {
        assert!(Instant::now() < deadline, "no alert in the breach log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cut.send_replace(false);
    let row = wait_text(&c, "#alerts tr.alert", "volume").await;
    assert!(row.contains("demo-councillor"), "{row}");
    wait_text(&c, "#status", "Watching live").await;
    c.close().await.unwrap();
}
