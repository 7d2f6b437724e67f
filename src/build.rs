//! Build script: embeds the shipped policy tests (`policies/tests/{allow,deny}/*.json`) for the
//! demo, which writes them beside its policies, so that its start runs them as a deployment's
//! does (`policy::fixtures`). Generates `$OUT_DIR/policy_tests.rs`: `POLICY_TESTS`, each file's
//! path under `tests/` and its text.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let out = Path::new(
        &std::env::var_os("OUT_DIR")
            .ok_or_else(|| std::io::Error::other("cargo sets OUT_DIR for build scripts"))?,
    )
    .join("policy_tests.rs");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tests");
    let mut code = String::from("pub const POLICY_TESTS: &[(&str, &str)] = &[\n");
    for kind in ["allow", "deny"] {
        let dir = root.join(kind);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            println!("cargo:rerun-if-changed={}", path.display());
            files.push(path);
        }
        files.sort();
        for path in files {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            code.push_str(&format!(
                "    ({:?}, include_str!({:?})),\n",
                format!("{kind}/{name}"),
                path.display().to_string()
            ));
        }
    }
    code.push_str("];\n");
    std::fs::write(out, code)
}
