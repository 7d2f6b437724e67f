//! Deterministic synthetic voter-file and membership data for the demo, tests and load tests.
//!
//! Every record comes from its own ChaCha8 stream (`seed`, record kind, index), so any record
//! can be produced on its own: [`stream_electors`] and [`stream_members`] yield millions without
//! holding them, and [`generate`] collects the default-sized dataset. Same seed, same output.
//! The voter record lives in `data/voter.rs`, the member record in `data/membership.rs`, and
//! names, addresses and phone numbers in `data/people.rs`.

mod membership;
mod people;
mod voter;

use std::collections::HashMap;

use anyhow::{Context, bail};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::Value;
use time::{Date, Duration};

pub use membership::{MEMBER_KEYS, member};
pub use voter::{ELECTOR_KEYS, INTENTION_CODES, ISSUES, elector};

/// The generated datastores: one voter file, one membership list.
#[derive(Debug, Clone, Default)]
pub struct DemoData {
    pub electors: Vec<Value>,
    pub members: Vec<Value>,
}

/// How much to generate, from which seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenSettings {
    pub seed: u64,
    pub electors: usize,
    pub members: usize,
}

impl Default for GenSettings {
    fn default() -> Self {
        GenSettings {
            seed: 2026,
            electors: 4000,
            members: 800,
        }
    }
}

/// One polling district with every unit it belongs to, as read from `config/areas.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistrictInfo {
    /// `LA/PD`, the area id.
    pub id: String,
    /// Local authority GSS code.
    pub la: String,
    /// Polling district code, unique only within the local authority.
    pub pd: String,
    pub ward: String,
    pub constituency: String,
    pub branch: String,
    pub clp: String,
    /// Position of this district among its ward's districts (spreads streets between them).
    pub index_in_ward: usize,
}

#[derive(Deserialize)]
struct AreasFile {
    #[serde(default)]
    area: Vec<AreaRow>,
}

#[derive(Deserialize)]
struct AreaRow {
    id: String,
    kind: String,
    #[serde(default)]
    parents: Vec<String>,
}

/// Reads the polling districts out of the area register, in file order.
pub fn polling_districts(areas_toml: &str) -> anyhow::Result<Vec<DistrictInfo>> {
    let file: AreasFile = toml::from_str(areas_toml).context("area register is not valid TOML")?;
    let rows: HashMap<&str, &AreaRow> = file.area.iter().map(|a| (a.id.as_str(), a)).collect();
    let parent_of = |row: &AreaRow, kind: &str| -> anyhow::Result<String> {
        let mut found = row
            .parents
            .iter()
            .filter(|p| rows.get(p.as_str()).is_some_and(|a| a.kind == kind));
        match (found.next(), found.next()) {
            (Some(p), None) => Ok(p.clone()),
            (None, _) => bail!("area `{}` has no {kind} parent", row.id),
            (Some(_), Some(_)) => bail!("area `{}` has more than one {kind} parent", row.id),
        }
    };
    let mut per_ward: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for row in file.area.iter().filter(|a| a.kind == "polling_district") {
        let Some((la, pd)) = row.id.split_once('/') else {
            bail!(
                "polling district `{}` must be identified as `LA/PD`",
                row.id
            );
        };
        let branch = parent_of(row, "branch")?;
        let clp = match rows.get(branch.as_str()) {
            Some(b) => parent_of(b, "clp")?,
            None => bail!("branch `{branch}` is not defined"),
        };
        let ward = parent_of(row, "ward")?;
        let seen = per_ward.entry(ward.clone()).or_default();
        let index_in_ward = *seen;
        *seen += 1;
        let info = DistrictInfo {
            id: row.id.clone(),
            la: la.to_owned(),
            pd: pd.to_owned(),
            ward,
            constituency: parent_of(row, "constituency")?,
            branch,
            clp,
            index_in_ward,
        };
        if parent_of(row, "local_authority")? != info.la {
            bail!(
                "polling district `{}` is not under local authority `{}`",
                row.id,
                info.la
            );
        }
        out.push(info);
    }
    Ok(out)
}

/// Generates the whole dataset in memory.
pub fn generate(settings: &GenSettings, areas_toml: &str) -> anyhow::Result<DemoData> {
    let districts = polling_districts(areas_toml)?;
    if districts.is_empty() {
        bail!("the area register defines no polling districts to put electors in");
    }
    Ok(DemoData {
        electors: stream_electors(settings, &districts).collect(),
        members: stream_members(settings, &districts).collect(),
    })
}

/// Electors one at a time (`settings.members` is ignored), for datasets too large to hold.
pub fn stream_electors<'a>(
    settings: &GenSettings,
    districts: &'a [DistrictInfo],
) -> impl Iterator<Item = Value> + 'a {
    let seed = settings.seed;
    (0..settings.electors).filter_map(move |i| elector_at(seed, districts, i))
}

/// Members one at a time; about a fifth reuse the name and address of one of the
/// `settings.electors` electors, which are regenerated on demand rather than held.
pub fn stream_members<'a>(
    settings: &GenSettings,
    districts: &'a [DistrictInfo],
) -> impl Iterator<Item = Value> + 'a {
    let (seed, electors) = (settings.seed, settings.electors);
    (0..settings.members).filter_map(move |i| member_at(seed, districts, electors, i))
}

const ELECTOR_STREAM: u64 = 1;
const MEMBER_STREAM: u64 = 2;

fn record_rng(seed: u64, kind: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((kind << 56) ^ index as u64);
    rng
}

/// Elector number `index` (0-based) of a dataset: districts are filled round-robin, so the
/// elector number within the district is `index / districts.len() + 1`. `None` without districts.
pub fn elector_at(seed: u64, districts: &[DistrictInfo], index: usize) -> Option<Value> {
    let district = districts.get(index.checked_rem(districts.len())?)?;
    let mut rng = record_rng(seed, ELECTOR_STREAM, index);
    Some(elector(
        &mut rng,
        district,
        index,
        index / districts.len() + 1,
    ))
}

/// Member `index` (0-based) of a dataset whose voter file has `electors` electors.
pub fn member_at(
    seed: u64,
    districts: &[DistrictInfo],
    electors: usize,
    index: usize,
) -> Option<Value> {
    let mut rng = record_rng(seed, MEMBER_STREAM, index);
    let mut reused = None;
    if electors > 0 && rng.random_bool(0.2) {
        for _ in 0..8 {
            let j = rng.random_range(0..electors);
            if let Some(e) = elector_at(seed, districts, j)
                && can_be_member(&e)
            {
                reused = districts.get(j % districts.len()).map(|d| (d, e));
                break;
            }
        }
    }
    match reused {
        Some((district, person)) => Some(member(&mut rng, district, index, Some(&person))),
        None => {
            let district = districts.choose(&mut rng)?;
            Some(member(&mut rng, district, index, None))
        }
    }
}

/// Anonymous, overseas, under-16 and deceased electors are not reused as members.
fn can_be_member(elector: &Value) -> bool {
    let empty = |key: &str| {
        elector
            .get(key)
            .and_then(Value::as_array)
            .is_some_and(|a| a.is_empty())
    };
    empty("markers") && empty("flags")
}

// ---- helpers shared by the voter and membership generators ----

fn pick<R: Rng + ?Sized>(rng: &mut R, items: &[&'static str]) -> &'static str {
    items.choose(rng).copied().unwrap_or_default()
}

fn weighted<R: Rng + ?Sized, T: Copy + Default>(rng: &mut R, items: &[(T, u32)]) -> T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut roll = rng.random_range(0..total.max(1));
    for &(item, w) in items {
        if roll < w {
            return item;
        }
        roll -= w;
    }
    T::default()
}

/// Each flag independently with its probability, in table order.
fn flags<R: Rng + ?Sized>(rng: &mut R, table: &[(&'static str, f64)]) -> Vec<&'static str> {
    table
        .iter()
        .filter(|(_, p)| rng.random_bool(*p))
        .map(|(f, _)| *f)
        .collect()
}

/// Up to `max` distinct items, in table order.
fn some_of<R: Rng + ?Sized>(rng: &mut R, items: &[&'static str], max: usize) -> Vec<&'static str> {
    let n = rng.random_range(0..=max.min(items.len()));
    let mut chosen: Vec<&'static str> = items.choose_multiple(rng, n).copied().collect();
    chosen.sort_by_key(|c| items.iter().position(|i| i == c));
    chosen
}

fn ymd(y: i32, m: u8, d: u8) -> Date {
    time::Month::try_from(m)
        .ok()
        .and_then(|m| Date::from_calendar_date(y, m, d).ok())
        .unwrap_or(Date::MIN)
}

/// A uniformly random day in `from..=to`.
fn day_between<R: Rng + ?Sized>(rng: &mut R, from: Date, to: Date) -> Date {
    let span = (to - from).whole_days().max(0);
    from + Duration::days(rng.random_range(0..=span))
}

fn round3(x: f64) -> f64 {
    (x.clamp(0.0, 1.0) * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AREAS: &str = include_str!("../../config/areas.toml");

    fn data() -> DemoData {
        generate(&GenSettings::default(), AREAS).unwrap()
    }

    fn has(records: &[Value], key: &str, value: &str) -> usize {
        let hit = |r: &&Value| r[key].as_array().unwrap().iter().any(|v| v == value);
        records.iter().filter(hit).count()
    }

    #[test]
    fn reads_every_polling_district_with_its_units() {
        let ds = polling_districts(AREAS).unwrap();
        assert!((35..=45).contains(&ds.len()), "{} districts", ds.len());
        let cgw1 = ds.iter().find(|d| d.id == "E08000035/CGW1").unwrap();
        assert_eq!(
            (cgw1.ward.as_str(), cgw1.constituency.as_str()),
            ("E05011391", "E14001320")
        );
        assert_eq!(
            (cgw1.branch.as_str(), cgw1.clp.as_str()),
            ("BR-CROSS-GATES-WHINMOOR", "CLP-LEEDS-EAST")
        );
        let straddling: std::collections::BTreeSet<&str> = ds
            .iter()
            .filter(|d| d.ward == "E05999001")
            .map(|d| d.constituency.as_str())
            .collect();
        assert_eq!(
            straddling.len(),
            2,
            "Killingbeck & Seacroft straddles two constituencies"
        );
    }

    /// Party units must not make a district transitively part of another constituency.
    #[test]
    fn every_district_lies_in_exactly_its_own_constituency() {
        let file: AreasFile = toml::from_str(AREAS).unwrap();
        let rows: HashMap<&str, &AreaRow> = file.area.iter().map(|a| (a.id.as_str(), a)).collect();
        for d in polling_districts(AREAS).unwrap() {
            let (mut stack, mut found) = (vec![d.id.as_str()], Vec::new());
            while let Some(id) = stack.pop() {
                let row = rows[id];
                if row.kind == "constituency" && !found.contains(&id) {
                    found.push(id);
                }
                stack.extend(row.parents.iter().map(String::as_str));
            }
            assert_eq!(found, [d.constituency.as_str()], "{}", d.id);
        }
    }

    #[test]
    fn same_seed_same_output_and_other_seed_differs() {
        let a = data();
        let b = data();
        assert_eq!(
            serde_json::to_string(&a.electors).unwrap(),
            serde_json::to_string(&b.electors).unwrap()
        );
        assert_eq!(
            serde_json::to_string(&a.members).unwrap(),
            serde_json::to_string(&b.members).unwrap()
        );
        let other = generate(
            &GenSettings {
                seed: 7,
                ..GenSettings::default()
            },
            AREAS,
        )
        .unwrap();
        assert_ne!(a.electors, other.electors);
        assert_eq!((a.electors.len(), a.members.len()), (4000, 800));
    }

    #[test]
    fn every_flag_and_marker_appears_in_the_default_dataset() {
        let d = data();
        for marker in ["N", "F", "L", "G", "B", "E"] {
            assert!(has(&d.electors, "markers", marker) >= 3, "marker {marker}");
        }
        assert_eq!(
            has(&d.electors, "markers", "M"),
            0,
            "no Scottish electors here"
        );
        for flag in voter::FLAGS.iter().map(|(f, _)| *f) {
            assert!(has(&d.electors, "flags", flag) >= 3, "voter flag {flag}");
        }
        for flag in membership::FLAGS.iter().map(|(f, _)| *f) {
            assert!(has(&d.members, "flags", flag) >= 1, "member flag {flag}");
        }
        let clean = d
            .electors
            .iter()
            .filter(|r| r["flags"].as_array().unwrap().is_empty())
            .count();
        assert!(
            (3200..3600).contains(&clean),
            "{clean} electors without flags"
        );
    }

    #[test]
    fn anonymous_electors_carry_only_the_number() {
        let d = data();
        let kept = [
            "elector_id",
            "elector_number",
            "register_edition",
            "local_authority",
            "polling_district",
            "ward",
            "constituency",
            "markers",
        ];
        let anonymous: Vec<&Value> = d
            .electors
            .iter()
            .filter(|r| r["markers"] == json!(["N"]))
            .collect();
        assert!(!anonymous.is_empty());
        for r in anonymous {
            for (key, value) in r.as_object().unwrap() {
                let blank = value.is_null() || *value == json!("") || *value == json!([]);
                assert!(
                    kept.contains(&key.as_str()) || blank,
                    "{key} = {value} on {}",
                    r["elector_id"]
                );
            }
        }
    }

    #[test]
    fn records_keep_the_documented_key_order() {
        // Order relies on serde_json's `preserve_order`, which the crate gets through cedar-policy.
        let d = data();
        let keys = |r: &Value| r.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        for r in d.electors.iter().step_by(97) {
            assert_eq!(keys(r), ELECTOR_KEYS);
        }
        for r in d.members.iter().step_by(13) {
            assert_eq!(keys(r), MEMBER_KEYS);
        }
    }

    #[test]
    fn some_members_are_also_electors_and_units_match_the_district() {
        let d = data();
        let districts = polling_districts(AREAS).unwrap();
        let homes: std::collections::HashSet<(String, String)> = d
            .electors
            .iter()
            .map(|e| (e["surname"].to_string(), e["address_line1"].to_string()))
            .collect();
        let shared = d
            .members
            .iter()
            .filter(|m| homes.contains(&(m["surname"].to_string(), m["address_line1"].to_string())))
            .count();
        assert!(
            (100..=250).contains(&shared),
            "{shared} members are electors"
        );
        for m in &d.members {
            let id = format!(
                "{}/{}",
                m["local_authority"].as_str().unwrap(),
                m["polling_district"].as_str().unwrap()
            );
            let pd = districts.iter().find(|p| p.id == id).unwrap();
            assert_eq!(
                (m["branch"].as_str(), m["clp"].as_str()),
                (Some(pd.branch.as_str()), Some(pd.clp.as_str()))
            );
        }
    }
}
