//! One synthetic membership record: who, where, standing, roles, contacts, special category.

use rand::Rng;
use serde_json::{Value, json};
use time::{Date, Duration};

use super::people::{Person, consents, email, mobile};
use super::{DistrictInfo, day_between, flags, pick, weighted, ymd};

/// The keys of a membership record, in order.
pub const MEMBER_KEYS: &[&str] = &[
    "membership_number",
    "first_name",
    "surname",
    "address_line1",
    "address_line2",
    "town",
    "postcode",
    "local_authority",
    "polling_district",
    "ward",
    "constituency",
    "clp",
    "branch",
    "status",
    "joined_on",
    "paid_to",
    "left_on",
    "roles",
    "email",
    "mobile",
    "consents",
    "payment_method",
    "trade_union",
    "equality_monitoring",
    "flags",
];

/// Restriction flags with their probability; about 85% of members have none.
pub(super) const FLAGS: &[(&str, f64)] = &[
    ("restricted", 0.010),
    ("erasure_requested", 0.010),
    ("objects_direct_marketing", 0.080),
    ("deceased", 0.010),
    ("do_not_contact", 0.050),
];

const STATUS: &[(&str, u32)] = &[
    ("active", 75),
    ("in_arrears", 8),
    ("lapsed", 9),
    ("resigned", 5),
    ("suspended", 2),
    ("expelled", 1),
];

const ROLES: &[(&str, u32)] = &[
    ("branch_secretary", 3),
    ("clp_secretary", 1),
    ("membership_officer", 2),
    ("treasurer", 2),
    ("councillor", 2),
    ("ward_organiser", 4),
];

const PAYMENT: &[(&str, u32)] = &[
    ("direct_debit", 60),
    ("card", 22),
    ("paypal", 12),
    ("cash", 6),
];

const UNIONS: &[&str] = &["UNISON", "Unite", "GMB", "USDAW", "CWU"];

/// The ONS 2021 census ethnic groups (a selection), with rough weights.
const ETHNICITY: &[(&str, u32)] = &[
    (
        "White: English, Welsh, Scottish, Northern Irish or British",
        55,
    ),
    ("White: Irish", 3),
    ("White: Other White", 6),
    ("White: Roma", 1),
    ("Asian, Asian British or Asian Welsh: Indian", 5),
    ("Asian, Asian British or Asian Welsh: Pakistani", 5),
    ("Asian, Asian British or Asian Welsh: Bangladeshi", 4),
    ("Asian, Asian British or Asian Welsh: Chinese", 2),
    (
        "Black, Black British, Black Welsh, Caribbean or African: African",
        5,
    ),
    (
        "Black, Black British, Black Welsh, Caribbean or African: Caribbean",
        3,
    ),
    (
        "Mixed or Multiple ethnic groups: White and Black Caribbean",
        2,
    ),
    ("Mixed or Multiple ethnic groups: White and Asian", 2),
    ("Other ethnic group: Arab", 1),
    ("Other ethnic group: Any other ethnic group", 1),
    ("Prefer not to say", 5),
];

/// The ONS 2021 census sexual orientation categories.
const ORIENTATION: &[(&str, u32)] = &[
    ("Straight or Heterosexual", 84),
    ("Gay or Lesbian", 5),
    ("Bisexual", 4),
    ("All other sexual orientations", 1),
    ("Prefer not to say", 6),
];

/// The demo's "today": the register edition is 2026-12.
fn today() -> Date {
    ymd(2026, 11, 30)
}

/// One member. `index` is 0-based (`membership_number` is `M-{index + 1}`); `person`, when
/// given, is an elector record whose name, address and email this member shares.
pub fn member<R: Rng + ?Sized>(
    rng: &mut R,
    district: &DistrictInfo,
    index: usize,
    person: Option<&Value>,
) -> Value {
    let who = match person {
        Some(record) => Person::from_record(record),
        None => {
            let number = rng.random_range(1..=200);
            Person::fresh(rng, district, number)
        }
    };
    let status = weighted(rng, STATUS);
    let joined = if rng.random_bool(0.45) {
        day_between(rng, ymd(2015, 6, 1), ymd(2020, 12, 31))
    } else {
        day_between(rng, ymd(1985, 1, 1), ymd(2026, 10, 31))
    };
    let gone = matches!(status, "lapsed" | "resigned" | "expelled");
    let left = gone.then(|| day_between(rng, joined + Duration::days(30), today()));
    let paid_to = match (status, left) {
        (_, Some(left)) => (left - Duration::days(rng.random_range(0..180))).max(joined),
        ("in_arrears", None) => day_between(rng, ymd(2026, 5, 1), ymd(2026, 11, 29)),
        _ => day_between(rng, ymd(2026, 12, 1), ymd(2027, 12, 31)),
    };
    let roles = roles(rng, joined, status, left);

    let known_email = person
        .and_then(|p| p.get("email"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let email = match known_email {
        Some(e) => Some(e),
        None => rng
            .random_bool(0.85)
            .then(|| email(rng, &who.first_name, &who.surname)),
    };
    let mobile = rng.random_bool(0.65).then(|| mobile(rng));
    let consents = consents(
        rng,
        &[("email", email.is_some()), ("sms", mobile.is_some())],
    );
    let payment = if gone && rng.random_bool(0.5) {
        None
    } else {
        Some(weighted(rng, PAYMENT))
    };
    let union = rng.random_bool(0.35).then(|| pick(rng, UNIONS));
    let equality = rng.random_bool(0.3).then(|| {
        json!({
            "ethnicity": weighted(rng, ETHNICITY),
            "disability": rng.random_bool(0.18),
            "sexual_orientation": weighted(rng, ORIENTATION),
        })
    });
    let flags = flags(rng, FLAGS);

    json!({
        "membership_number": format!("M-{:06}", index + 1),
        "first_name": who.first_name,
        "surname": who.surname,
        "address_line1": who.address_line1,
        "address_line2": who.address_line2,
        "town": who.town,
        "postcode": who.postcode,
        "local_authority": district.la,
        "polling_district": district.pd,
        "ward": district.ward,
        "constituency": district.constituency,
        "clp": district.clp,
        "branch": district.branch,
        "status": status,
        "joined_on": joined.to_string(),
        "paid_to": paid_to.to_string(),
        "left_on": left.map(|d| d.to_string()),
        "roles": roles,
        "email": email,
        "mobile": mobile,
        "consents": consents,
        "payment_method": payment,
        "trade_union": union,
        "equality_monitoring": equality,
        "flags": flags,
    })
}

/// Most members hold no office; current offices only for active members, and a former
/// member's offices ended by the time they left.
fn roles<R: Rng + ?Sized>(
    rng: &mut R,
    joined: Date,
    status: &str,
    left: Option<Date>,
) -> Vec<Value> {
    let odds = match status {
        "active" => 0.12,
        "in_arrears" | "suspended" => 0.06,
        _ => 0.04,
    };
    if !rng.random_bool(odds) {
        return Vec::new();
    }
    let until = left.unwrap_or_else(today);
    let count = weighted(rng, &[(1usize, 80), (2, 20)]);
    (0..count)
        .map(|_| {
            let start = day_between(rng, joined.max(ymd(2012, 1, 1)).min(until), until);
            let current = status == "active" && rng.random_bool(0.7);
            let end = (!current).then(|| day_between(rng, start, until).to_string());
            json!({ "role": weighted(rng, ROLES), "start": start.to_string(), "end": end })
        })
        .collect()
}
