//! One synthetic voter-file record: register entry, canvass, profiling scores, contacts.

use rand::Rng;
use serde_json::{Value, json};

use super::people::{Person, consents, email, landline, mobile};
use super::{DistrictInfo, day_between, flags, round3, some_of, weighted, ymd};

pub(super) const REGISTER_EDITION: &str = "2026-12";

/// The keys of a voter record, in order.
pub const ELECTOR_KEYS: &[&str] = &[
    "elector_id",
    "elector_number",
    "register_edition",
    "local_authority",
    "polling_district",
    "ward",
    "constituency",
    "first_name",
    "surname",
    "address_line1",
    "address_line2",
    "town",
    "postcode",
    "markers",
    "attainer_date",
    "postal_voter",
    "proxy_voter",
    "turnout",
    "voting_intention",
    "canvass_issues",
    "last_canvassed",
    "support_score",
    "turnout_likelihood",
    "persuadability",
    "support_decile",
    "email",
    "mobile",
    "landline",
    "consents",
    "tps_checked_at",
    "flags",
];

/// Voting intention codes a canvass may record.
pub const INTENTION_CODES: &[&str] = &["LAB", "CON", "LD", "GRN", "REF", "OTH", "DK", "WNV"];

/// Canvass issues a canvass may record.
pub const ISSUES: &[&str] = &[
    "housing",
    "nhs",
    "cost_of_living",
    "transport",
    "environment",
    "crime",
    "schools",
];

/// Restriction flags with their probability; about 85% of electors have none.
pub(super) const FLAGS: &[(&str, f64)] = &[
    ("restricted", 0.010),
    ("erasure_requested", 0.008),
    ("objects_direct_marketing", 0.050),
    ("objects_profiling", 0.040),
    ("para22_notice", 0.020),
    ("deceased", 0.010),
    ("do_not_contact", 0.030),
    ("under_16", 0.005),
];

/// Franchise markers (no `M`: no Scottish electors here); the rest have none.
const MARKERS: &[(&str, u32)] = &[
    ("F", 15),
    ("L", 5),
    ("G", 20),
    ("B", 7),
    ("E", 7),
    ("", 946),
];

const GENERAL: &[&str] = &["GE2024", "GE2019"];
const LOCAL: &[&str] = &["LE2024", "LE2023", "LE2022"];

const INTENTIONS: &[(&str, u32)] = &[
    ("LAB", 30),
    ("CON", 17),
    ("LD", 8),
    ("GRN", 8),
    ("REF", 12),
    ("OTH", 3),
    ("DK", 16),
    ("WNV", 6),
];

/// One elector. `index` is 0-based (`elector_id` is `VF-{index + 1}`); `number` is the
/// 1-based elector number within `district`, which also fixes the address.
pub fn elector<R: Rng + ?Sized>(
    rng: &mut R,
    district: &DistrictInfo,
    index: usize,
    number: usize,
) -> Value {
    let suffix = weighted(rng, &[(0u8, 90), (1, 8), (2, 2)]);
    let elector_id = format!("VF-{:07}", index + 1);
    let elector_number = format!("{}-{number:04}/{suffix}", district.pd);
    if rng.random_bool(0.005) {
        return anonymous(district, elector_id, elector_number);
    }
    let marker = weighted(rng, MARKERS);
    let overseas = marker == "F";
    let mut person = Person::fresh(rng, district, number);
    if overseas {
        person.address_line1.clear();
        person.address_line2.clear();
        person.town.clear();
        person.postcode.clear();
    }
    let flags = flags(rng, FLAGS);
    let under_16 = flags.contains(&"under_16");
    let attainer = !under_16 && !overseas && rng.random_bool(0.02);
    let attainer_date =
        attainer.then(|| day_between(rng, ymd(2027, 1, 1), ymd(2027, 11, 30)).to_string());
    let (postal, proxy) = match rng.random::<f64>() {
        _ if under_16 => (false, false),
        r if overseas => (r < 0.7, (0.7..0.95).contains(&r)),
        r => (r < 0.2, (0.2..0.21).contains(&r)),
    };

    // Who may vote where: overseas electors only at Westminster, peers and EU citizens only
    // at local elections, attainers and under-16s not yet.
    let propensity: f64 = rng.random();
    let mut turnout = Vec::new();
    let mut eligible = 0u32;
    for id in GENERAL.iter().chain(LOCAL) {
        let general = GENERAL.contains(id);
        let may = !under_16
            && !attainer
            && if general {
                marker.is_empty() || overseas
            } else {
                !overseas
            };
        if may {
            eligible += 1;
            let p = if general {
                0.25 + 0.65 * propensity
            } else {
                0.08 + 0.55 * propensity
            };
            if rng.random_bool(p) {
                turnout.push(*id);
            }
        }
    }
    let voted_share = if eligible == 0 {
        0.0
    } else {
        turnout.len() as f64 / f64::from(eligible)
    };

    let canvassed = rng.random_bool(0.6);
    let intention = canvassed.then(|| weighted(rng, INTENTIONS));
    let issues = if canvassed {
        some_of(rng, ISSUES, 3)
    } else {
        Vec::new()
    };
    let last_canvassed =
        canvassed.then(|| day_between(rng, ymd(2023, 3, 1), ymd(2026, 11, 30)).to_string());
    let noise = rng.random_range(-0.1..0.1);
    let (support, persuade) = match intention {
        Some("LAB") => (0.75 + noise * 2.0, 0.15 + noise),
        Some("DK") => (0.5 + noise * 2.0, 0.75 + noise * 2.0),
        Some("WNV") => (0.2 + noise, 0.1 + noise),
        Some("GRN" | "LD") => (0.4 + noise * 2.0, 0.5 + noise * 2.0),
        Some(_) => (0.15 + noise, 0.3 + noise * 2.0),
        None => (rng.random_range(0.2..0.8), rng.random_range(0.2..0.7)),
    };
    let support = round3(support);
    let likelihood = round3(0.1 + 0.55 * propensity + 0.3 * voted_share + noise / 2.0);
    let decile = ((support * 10.0).floor() as u8 + 1).min(10);

    let email = rng
        .random_bool(0.5)
        .then(|| email(rng, &person.first_name, &person.surname));
    let mobile = rng.random_bool(0.6).then(|| mobile(rng));
    let landline = (!overseas && rng.random_bool(0.7)).then(|| landline(rng, &district.ward));
    let phone = mobile.is_some() || landline.is_some();
    let consents = consents(
        rng,
        &[
            ("email", email.is_some()),
            ("sms", mobile.is_some()),
            ("phone", phone),
        ],
    );
    let tps = (phone && rng.random_bool(0.6))
        .then(|| day_between(rng, ymd(2025, 6, 1), ymd(2026, 11, 30)).to_string());
    let markers: Vec<&str> = if marker.is_empty() {
        Vec::new()
    } else {
        vec![marker]
    };

    json!({
        "elector_id": elector_id,
        "elector_number": elector_number,
        "register_edition": REGISTER_EDITION,
        "local_authority": district.la,
        "polling_district": district.pd,
        "ward": district.ward,
        "constituency": district.constituency,
        "first_name": person.first_name,
        "surname": person.surname,
        "address_line1": person.address_line1,
        "address_line2": person.address_line2,
        "town": person.town,
        "postcode": person.postcode,
        "markers": markers,
        "attainer_date": attainer_date,
        "postal_voter": postal,
        "proxy_voter": proxy,
        "turnout": turnout,
        "voting_intention": intention,
        "canvass_issues": issues,
        "last_canvassed": last_canvassed,
        "support_score": support,
        "turnout_likelihood": likelihood,
        "persuadability": round3(persuade),
        "support_decile": decile,
        "email": email,
        "mobile": mobile,
        "landline": landline,
        "consents": consents,
        "tps_checked_at": tps,
        "flags": flags,
    })
}

/// An anonymous entry (`N`): the party gets the number and nothing else, so every other key
/// is present but blank.
fn anonymous(district: &DistrictInfo, elector_id: String, elector_number: String) -> Value {
    json!({
        "elector_id": elector_id,
        "elector_number": elector_number,
        "register_edition": REGISTER_EDITION,
        "local_authority": district.la,
        "polling_district": district.pd,
        "ward": district.ward,
        "constituency": district.constituency,
        "first_name": "",
        "surname": "",
        "address_line1": "",
        "address_line2": "",
        "town": "",
        "postcode": "",
        "markers": ["N"],
        "attainer_date": null,
        "postal_voter": null,
        "proxy_voter": null,
        "turnout": [],
        "voting_intention": null,
        "canvass_issues": [],
        "last_canvassed": null,
        "support_score": null,
        "turnout_likelihood": null,
        "persuadability": null,
        "support_decile": null,
        "email": null,
        "mobile": null,
        "landline": null,
        "consents": null,
        "tps_checked_at": null,
        "flags": [],
    })
}
