//! The load test and the export benchmark (`loadtest/`), run briefly against this build so
//! that they keep working as the gateway changes: both are how issue 7's figures are
//! reproduced, and nothing else runs them. The figures of so short a run on a debug build mean
//! nothing and are not looked at; what is checked is that each command completes, that every
//! target answered without errors, and that the export's audit check held.
//!
//! `loadtest/run.sh` installs nginx and wrk with apt-get when they are missing, which needs
//! root (CI is root); elsewhere, without them, this test says it skipped.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An example of this build (`fixedrate`, `passthrough`), beside this test's own binary
/// (`target/debug/deps/..`): the test command (`scripts/test.sh`) builds them first with
/// `cargo build --examples`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    profile_dir.join("examples").join(name)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {cmd} || test -x /usr/sbin/{cmd}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn run_sh(args: &[&str], work: &Path) -> std::process::Output {
    let out = Command::new("bash")
        .arg(repo().join("loadtest/run.sh"))
        .args(args)
        .env("WARDGATE_BIN", env!("CARGO_BIN_EXE_wardgate"))
        .env("FIXEDRATE_BIN", example("fixedrate"))
        .env("PASSTHROUGH_BIN", example("passthrough"))
        .env("TMPDIR", work)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadtest/run.sh {args:?} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    out
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_load_test_and_the_export_benchmark_run_to_completion() {
    let tools = ["nginx", "wrk", "taskset", "curl", "python3"];
    if !is_root() && !tools.iter().all(|t| have(t)) {
        assert!(
            std::env::var_os("CI").is_none() && std::env::var_os("WARDGATE_NO_SKIP").is_none(),
            "CI runs as root, so loadtest/run.sh can install {tools:?}"
        );
        eprintln!("skipped: one of {tools:?} is missing and this is not root to install it");
        return;
    }
    for name in ["fixedrate", "passthrough"] {
        assert!(
            example(name).exists(),
            "no {} (`cargo build --examples` builds it, as scripts/test.sh does)",
            example(name).display()
        );
    }
    let work = tempfile::tempdir().unwrap();

    // The side-by-side load test: every target, one page size, a second each.
    let results = work.path().join("latest.json");
    run_sh(
        &[
            "--sizes",
            "10",
            "--electors",
            "1000",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--fixed-duration",
            "1",
            "--profile",
            "--profile-seconds",
            "1",
            "--results",
            results.to_str().unwrap(),
        ],
        work.path(),
    );
    let r = json(&results);
    let saturation = &r["saturation"]["10"];
    for target in [
        "direct",
        "nginx_proxy",
        "passthrough",
        "wardgate_fsync",
        "wardgate_page_cache",
    ] {
        let run = &saturation[target];
        assert!(
            run["rps"].as_f64().is_some_and(|x| x > 0.0),
            "{target}: no requests measured: {run}"
        );
    }
    assert!(
        r["fixed_rate"]["10"]["wardgate_fsync"].is_object(),
        "no fixed-rate run: {}",
        r["fixed_rate"]
    );
    // The profiles (where perf runs): each proxy's CPU time a request, with a row for its
    // user space, from samples that were taken. Outside CI a perf that may not record (not
    // root, a container), or none at all, leaves them out; under CI `scripts/test.sh` installs
    // it, and its absence fails.
    let perf = Command::new("perf").arg("--version").output();
    let perf = perf.is_ok_and(|o| o.status.success());
    assert!(
        perf || std::env::var_os("CI").is_none(),
        "perf is not installed (scripts/test.sh installs linux-perf)"
    );
    if perf {
        for target in [
            "nginx_proxy",
            "passthrough",
            "wardgate_fsync",
            "wardgate_page_cache",
        ] {
            let Some(path) = r["profile"][target].as_str() else {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "{target}: no profile: {}",
                    r["profile"]
                );
                eprintln!("{target}: perf could not record here; no profile checked");
                continue;
            };
            let text = std::fs::read_to_string(path).unwrap();
            let samples: u64 = text
                .split(" samples over ")
                .next()
                .and_then(|head| head.rsplit(' ').next())
                .and_then(|n| n.replace(',', "").parse().ok())
                .unwrap_or(0);
            let user_space = text.lines().any(|l| {
                l.trim_end().ends_with(" user space") && l.split_whitespace().nth(2) == Some("us")
            });
            assert!(samples > 0 && user_space, "{target}: {text}");
        }
    }

    // The export benchmark: the audit check (the chunk records list exactly the records that
    // came out) is part of its exit status; the results say so too.
    let results = work.path().join("export.json");
    run_sh(
        &[
            "--export",
            "--records",
            "3000",
            "--seed",
            "500",
            "--results",
            results.to_str().unwrap(),
        ],
        work.path(),
    );
    let r = json(&results);
    assert_eq!(r["audit_matches"], true, "{r}");
    assert_eq!(r["records"], 3000, "{r}");
    let wardgate = r["rows"].as_array().and_then(|rows| {
        rows.iter().find(|row| {
            row["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("wardgate"))
        })
    });
    assert!(
        wardgate.is_some_and(|row| row["records_out"].as_u64().is_some_and(|n| n > 0)),
        "no records came out through wardgate: {r}"
    );
}
