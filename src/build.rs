//! Build script: embeds the shipped policy tests (`policies/tests/{allow,deny}/*.json`) for the
//! demo, which writes them beside its policies, so that its start runs them as a deployment's
//! does (`policy::fixtures`). Generates `$OUT_DIR/policy_tests.rs`: `POLICY_TESTS`, each file's
//! path under `tests/` and its text. It takes the files `policy::fixtures::files` runs: hidden
//! entries are skipped (an editor's swap file, `.gitkeep`), and anything else that is not a
//! `*.json` file fails the build, as it would fail the start.

use std::io::{Error, Result};
use std::path::Path;

fn main() -> Result<()> {
    let out = std::env::var_os("OUT_DIR")
        .ok_or_else(|| Error::other("cargo sets OUT_DIR for build scripts"))?;
    // Read when the script runs, not when it was compiled: a target directory shared by two
    // checkouts (the load test's A/B builds) reuses one compiled script for both.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .ok_or_else(|| Error::other("cargo sets CARGO_MANIFEST_DIR for build scripts"))?;
    let root = Path::new(&manifest).join("policies/tests");
    let mut code = String::from("pub const POLICY_TESTS: &[(&str, &str)] = &[\n");
    for kind in ["allow", "deny"] {
        let dir = root.join(kind);
        // (Cargo checks every file under a directory named here.)
        // Relative to the package: a target directory shared by two checkouts then watches
        // the one being built, not the one built last.
        println!("cargo:rerun-if-changed=policies/tests/{kind}");
        let mut files = Vec::new();
        let entries =
            std::fs::read_dir(&dir).map_err(|e| Error::other(format!("{}: {e}", dir.display())))?;
        for entry in entries {
            let path = entry
                .map_err(|e| Error::other(format!("{}: {e}", dir.display())))?
                .path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::other(format!("{}: not a UTF-8 name", path.display())))?
                .to_owned();
            if name.starts_with('.') {
                continue;
            }
            if !(path.is_file() && name.ends_with(".json")) {
                return Err(Error::other(format!(
                    "{} is not a policy test (`*.json`)",
                    path.display()
                )));
            }
            files.push((name, path));
        }
        files.sort();
        for (name, _) in files {
            // The file of the checkout being compiled, by the same token.
            code.push_str(&format!(
                "    ({:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {:?}))),\n",
                format!("{kind}/{name}"),
                format!("/policies/tests/{kind}/{name}")
            ));
        }
    }
    code.push_str("];\n");
    std::fs::write(Path::new(&out).join("policy_tests.rs"), code)
}
