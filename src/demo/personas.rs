//! The demo's personas: one caller of each kind in DOMAIN.md §2, with realistic grants.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use crate::auth::Claims;
use crate::token::Signer;

pub struct Persona {
    pub name: &'static str,
    pub role: &'static str,
    pub unit: &'static str,
    pub areas: &'static [&'static str],
    pub purposes: &'static [&'static str],
}

/// Cross Gates & Whinmoor (`E05011391`, Leeds) is the demo's home ward; Leeds East
/// (`E14001320`) its constituency.
pub const PERSONAS: &[Persona] = &[
    Persona {
        name: "canvasser",
        role: "canvasser",
        unit: "BR-CROSS-GATES-WHINMOOR",
        areas: &["E08000035/CGW1", "E08000035/CGW2"],
        purposes: &["canvassing", "gotv"],
    },
    Persona {
        name: "councillor",
        role: "councillor",
        unit: "BR-CROSS-GATES-WHINMOOR",
        // Members sit at branch level, so engaging them needs the branch as well as the ward.
        areas: &["E05011391", "BR-CROSS-GATES-WHINMOOR"],
        purposes: &[
            "canvassing",
            "gotv",
            "addressed_mail",
            "email_sms",
            "casework",
            "local_engagement",
        ],
    },
    Persona {
        name: "candidate",
        role: "candidate",
        unit: "CLP-LEEDS-EAST",
        areas: &["E14001320"],
        purposes: &["canvassing", "gotv", "addressed_mail", "email_sms"],
    },
    Persona {
        name: "mp_caseworker",
        role: "mp_caseworker",
        unit: "CLP-LEEDS-EAST",
        areas: &["E05011391", "E05999001"],
        purposes: &["casework"],
    },
    Persona {
        name: "clp_secretary",
        role: "clp_secretary",
        unit: "CLP-LEEDS-EAST",
        areas: &["CLP-LEEDS-EAST"],
        purposes: &[
            "membership_admin",
            "local_engagement",
            "fundraising",
            "email_sms",
        ],
    },
    Persona {
        name: "analyst",
        role: "analyst",
        unit: "NATIONAL-DATA",
        areas: &["E92000001"],
        purposes: &["profiling", "research"],
    },
    Persona {
        name: "dpo",
        role: "dpo",
        unit: "GOVERNANCE-LEGAL",
        areas: &["E92000001"],
        purposes: &[
            "sar_fulfilment",
            "erasure",
            "restriction",
            "legal_claims",
            "breach_investigation",
        ],
    },
    Persona {
        name: "security",
        role: "security",
        unit: "SECURITY",
        areas: &["E92000001"],
        purposes: &["breach_investigation"],
    },
];

/// Signs an eight-hour token for every persona: `{"persona": "token"}`.
pub fn mint_tokens(signer: &Signer, now: i64) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in PERSONAS {
        let claims = Claims {
            iss: signer.issuer.clone(),
            aud: super::AUDIENCE.into(),
            sub: format!("demo-{}", p.name.replace('_', "-")),
            jti: format!("{:032x}", rand::random::<u128>()),
            exp: now + 8 * 3600,
            nbf: now - 5,
            iat: now,
            role: p.role.to_owned(),
            org_unit: p.unit.to_owned(),
            areas: p.areas.iter().map(|s| (*s).to_owned()).collect(),
            purposes: p.purposes.iter().map(|s| (*s).to_owned()).collect(),
            grant_expires: None,
        };
        out.insert(p.name.to_owned(), signer.sign(&claims)?);
    }
    Ok(out)
}

/// What `wardgate demo` prints: copy-paste commands showing allow, strip, withhold and deny.
pub fn instructions(listen: SocketAddr, admin: SocketAddr, dir: &Path) -> String {
    let t = dir.join("tokens.json").display().to_string();
    let tok = |p: &str| format!("$(jq -r .{p} {t})");
    let base = format!("http://{listen}");
    format!(
        r#"wardgate demo is running.
  data plane  {base}
  admin plane http://{admin}   (/healthz /readyz /metrics)
  console     http://{admin}/console   (paste the `security` or `dpo` token)
  tokens      {t}   (personas: canvasser councillor candidate mp_caseworker clp_secretary analyst dpo security)
  audit log   {audit}   (verify: wardgate audit verify --dir {audit})

Allow, with fields stripped: a canvasser's walk sheet has names and addresses, never contact details
  curl -s -H "Authorization: Bearer {canvasser}" -H "X-Purpose: canvassing" "{base}/voter/electors?per_page=5" | jq .

Withheld: a councillor asks for another ward and gets nothing from it
  curl -s -H "Authorization: Bearer {councillor}" -H "X-Purpose: canvassing" "{base}/voter/electors?ward=E05013911" | jq .

Consent decides: email_sms lists only people who consented to email or SMS, with an email only where that consent is live
  curl -s -H "Authorization: Bearer {councillor}" -H "X-Purpose: email_sms" "{base}/voter/electors?per_page=10" | jq .

Deny: a purpose the token does not grant (403), and a purpose that does not exist (400)
  curl -s -H "Authorization: Bearer {canvasser}" -H "X-Purpose: profiling" "{base}/voter/electors" | jq .
  curl -s -H "Authorization: Bearer {canvasser}" -H "X-Purpose: party_discipline" "{base}/voter/electors" | jq .

A doorstep write, and one that tries to set a field canvassing may not write (403)
  curl -s -H "Authorization: Bearer {canvasser}" -H "X-Purpose: canvassing" -H "Content-Type: application/json" \
       -d '{{"voting_intention":"LAB","canvass_issues":["housing"]}}' "{base}/voter/electors/ID/canvass" | jq .
  curl -s -H "Authorization: Bearer {canvasser}" -H "X-Purpose: gotv" -H "Content-Type: application/json" \
       -d '{{"flags_add":["do_not_contact"]}}' "{base}/voter/electors/ID/canvass" | jq .
  (take an ID from the first listing; polling day's `gotv` records turnout and opinions, not flags)

Then look at what was recorded:  wardgate audit tail --dir {audit}
(or: cargo run --release -- audit tail --dir {audit})

Breach detection: page through the ward far faster than canvassing needs, and watch the console
  for p in $(seq 1 30); do curl -s -o /dev/null -H "Authorization: Bearer {councillor}" -H "X-Purpose: canvassing" "{base}/voter/electors?per_page=100&page=$(( p % 4 + 1 ))"; done
"#,
        canvasser = tok("canvasser"),
        councillor = tok("councillor"),
        audit = dir.join("audit").display(),
    )
}
