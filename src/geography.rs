//! The area register: polling districts and every unit they belong to, as a DAG.
//!
//! Since the 2024 boundaries a polling district has several parents (ward, constituency, local
//! authority, party branch), and a ward may straddle two constituencies, so scope is a DAG, not a
//! tree. This module loads `config/areas.toml`, refuses unknown parents and cycles, and answers
//! two questions: which polling districts lie under a set of grants (for query narrowing), and
//! what the areas look like as Cedar entities (so policies can write `area in grants`).
//! It does not decide anything: policies do.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

/// The kinds of area, from the atomic polling district upwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AreaKind {
    Nation,
    Region,
    LocalAuthority,
    Constituency,
    Ward,
    PollingDistrict,
    Clp,
    Branch,
}

impl AreaKind {
    /// The kinds an area of this kind may lie in: those it always lies wholly within. A
    /// polling district lies in one of each; a ward in its authority; a branch in its CLP;
    /// an authority in a county's; everything in its region and nation. A ward does not
    /// always lie in one constituency (since 2024), nor a constituency or a CLP in one
    /// authority: a grant of such a parent would cover the whole child, and so districts it
    /// does not hold. That membership is the polling districts' own (each names its
    /// constituency, its CLP's branch, and so on).
    pub fn may_lie_in(self) -> &'static [AreaKind] {
        use AreaKind::*;
        match self {
            PollingDistrict => &[
                Ward,
                LocalAuthority,
                Constituency,
                Branch,
                Clp,
                Region,
                Nation,
            ],
            Ward => &[LocalAuthority, Region, Nation],
            Branch => &[Clp, Region, Nation],
            LocalAuthority => &[LocalAuthority, Region, Nation],
            Constituency | Clp => &[Region, Nation],
            Region => &[Region, Nation],
            Nation => &[Nation],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AreaKind::Nation => "nation",
            AreaKind::Region => "region",
            AreaKind::LocalAuthority => "local_authority",
            AreaKind::Constituency => "constituency",
            AreaKind::Ward => "ward",
            AreaKind::PollingDistrict => "polling_district",
            AreaKind::Clp => "clp",
            AreaKind::Branch => "branch",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Area {
    pub id: String,
    pub kind: AreaKind,
    pub name: String,
    #[serde(default)]
    pub parents: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AreasFile {
    area: Vec<Area>,
}

/// The validated area DAG.
#[derive(Debug, Clone)]
pub struct Geography {
    areas: BTreeMap<String, Area>,
    /// Every area id -> every area under it, itself included.
    under: HashMap<String, BTreeSet<String>>,
}

impl Geography {
    pub fn load(path: &Path) -> anyhow::Result<Geography> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read area register `{}`", path.display()))?;
        Geography::parse(&text).with_context(|| format!("in area register `{}`", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Geography> {
        let file: AreasFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut areas = BTreeMap::new();
        for a in file.area {
            if a.id.trim().is_empty() {
                bail!("an area has an empty `id`");
            }
            if let Some(prev) = areas.insert(a.id.clone(), a) {
                bail!("area `{}` is defined twice", prev.id);
            }
        }
        for a in areas.values() {
            for p in &a.parents {
                let Some(parent) = areas.get(p) else {
                    bail!("area `{}` names parent `{p}`, which is not defined", a.id);
                };
                let within = a.kind.may_lie_in();
                if !within.contains(&parent.kind) {
                    bail!(
                        "area `{}` ({}) names parent `{p}` ({}): a {} may only lie in a {}, \
                         the kinds it always lies wholly within; a parent of another kind may hold \
                         part of it only, and every grant of the parent would cover the whole \
                         (give its polling districts the parent instead)",
                        a.id,
                        a.kind.as_str(),
                        parent.kind.as_str(),
                        a.kind.as_str(),
                        (within.iter().map(|k| k.as_str()))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    );
                }
            }
            if a.kind == AreaKind::PollingDistrict && !a.id.contains('/') {
                bail!("polling district `{}` must be identified as `LA/PD`", a.id);
            }
        }
        let under = index_descendants(&areas)?;
        check_districts_in_their_authority(&areas, &under)?;
        Ok(Geography { areas, under })
    }

    pub fn contains(&self, id: &str) -> bool {
        self.areas.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&Area> {
        self.areas.get(id)
    }

    pub fn areas(&self) -> impl Iterator<Item = &Area> {
        self.areas.values()
    }

    /// Every area under any of `grants`, the grants included: what a caller's scope covers.
    /// This is what narrowing sends upstream; policies still decide every record.
    pub fn areas_under<'a>(
        &self,
        grants: impl IntoIterator<Item = &'a String>,
    ) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for g in grants {
            if let Some(ds) = self.under.get(g) {
                out.extend(ds.iter().cloned());
            }
        }
        out
    }

    /// The areas a caller's listing is narrowed to upstream: the polling districts and party
    /// units (branches, CLPs) of the caller's scope, the areas a record is in (a ward, an
    /// authority or a constituency is named by the districts under it), unless there are more
    /// than `max` (the list would cost more than it saves) or the grants cover the whole register
    /// (a national role's: it would exclude nothing the filter lets out; on the demo's register
    /// that was 1.1 KB of query on every request). An empty scope (no known area granted)
    /// narrows to `none`, nothing at all, never to everything. `None`: not narrowed. Policies
    /// decide every record either way. (Naming every kind of area, a regional officer's
    /// scope passed `max` on the wards and authorities alone, and went unnarrowed: paging
    /// then counted the records of areas outside it.)
    pub fn narrowing<'a>(
        &self,
        grants: impl IntoIterator<Item = &'a String>,
        max: usize,
    ) -> Option<BTreeSet<String>> {
        let recorded = |id: &String| {
            self.areas.get(id).is_some_and(|a| {
                matches!(
                    a.kind,
                    AreaKind::PollingDistrict | AreaKind::Branch | AreaKind::Clp
                )
            })
        };
        let mut areas = self.areas_under(grants);
        // The whole register (every area, national roles'), not merely every district and
        // unit: a record whose area the register lacks is then still left out upstream.
        let everything = areas.len() == self.areas.len();
        areas.retain(recorded);
        if areas.is_empty() {
            // First: an empty register's whole is empty too, and must not read as everything.
            return Some(BTreeSet::from(["none".to_owned()]));
        }
        if areas.len() > max || everything {
            return None;
        }
        Some(areas)
    }

    /// The polling districts under any of `grants`.
    pub fn districts_under<'a>(
        &self,
        grants: impl IntoIterator<Item = &'a String>,
    ) -> BTreeSet<String> {
        let mut out = self.areas_under(grants);
        out.retain(|id| {
            self.areas
                .get(id)
                .is_some_and(|a| a.kind == AreaKind::PollingDistrict)
        });
        out
    }

    /// The areas as Cedar entities (`Wardgate::Area`), parents included, in Cedar's JSON form.
    pub fn cedar_entities(&self) -> Vec<serde_json::Value> {
        self.areas
            .values()
            .map(|a| {
                serde_json::json!({
                    "uid": { "type": "Wardgate::Area", "id": a.id },
                    "attrs": { "kind": a.kind.as_str(), "name": a.name },
                    "parents": a.parents.iter()
                        .map(|p| serde_json::json!({ "type": "Wardgate::Area", "id": p }))
                        .collect::<Vec<_>>(),
                })
            })
            .collect()
    }
}

/// A polling district's code is unique only within its authority (`LA/PD`): no authority
/// but that one, or one around it (a county around its district), may hold the district.
/// Filed under another authority's ward, a grant of that authority would cover it, for
/// policies (`in`) and for narrowing.
fn check_districts_in_their_authority(
    areas: &BTreeMap<String, Area>,
    under: &HashMap<String, BTreeSet<String>>,
) -> anyhow::Result<()> {
    let holds = |outer: &str, inner: &str| under.get(outer).is_some_and(|d| d.contains(inner));
    for a in areas.values() {
        if a.kind != AreaKind::LocalAuthority {
            continue;
        }
        let districts = (under.get(&a.id).into_iter().flatten()).filter(|d| {
            areas
                .get(*d)
                .is_some_and(|x| x.kind == AreaKind::PollingDistrict)
        });
        for d in districts {
            let la = d.split_once('/').map_or("", |(la, _)| la);
            if la != a.id && !holds(&a.id, la) {
                bail!(
                    "polling district `{d}` lies in authority `{}`, though its code is \
                     `{la}`'s: a grant of `{}` would cover another authority's district; fix \
                     its parents and its ward's (only if `{la}` is a predecessor or a district \
                     council of `{}`, define it as a local_authority inside it)",
                    a.id,
                    a.id,
                    a.id
                );
            }
        }
    }
    Ok(())
}

/// Walks up from every area, which also proves the graph has no cycle.
fn index_descendants(
    areas: &BTreeMap<String, Area>,
) -> anyhow::Result<HashMap<String, BTreeSet<String>>> {
    let mut under: HashMap<String, BTreeSet<String>> = HashMap::new();
    for pd in areas.values() {
        let mut stack: Vec<(&str, usize)> = vec![(pd.id.as_str(), 0)];
        while let Some((id, depth)) = stack.pop() {
            if depth > areas.len() {
                bail!("the area register has a cycle through `{id}`");
            }
            under
                .entry(id.to_owned())
                .or_default()
                .insert(pd.id.clone());
            if let Some(a) = areas.get(id) {
                stack.extend(a.parents.iter().map(|p| (p.as_str(), depth + 1)));
            }
        }
    }
    Ok(under)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
        [[area]]
        id = "E08000035"
        kind = "local_authority"
        name = "Leeds"
        [[area]]
        id = "E05011391"
        kind = "ward"
        name = "Cross Gates & Whinmoor"
        parents = ["E08000035"]
        [[area]]
        id = "E14001320"
        kind = "constituency"
        name = "Leeds East"
        [[area]]
        id = "E14999001"
        kind = "constituency"
        name = "Illustrative"
        [[area]]
        id = "E08000035/CGW1"
        kind = "polling_district"
        name = "CGW1"
        parents = ["E05011391", "E14001320"]
        [[area]]
        id = "E08000035/CGW2"
        kind = "polling_district"
        name = "CGW2"
        parents = ["E05011391", "E14999001"]
    "#;

    #[test]
    fn a_straddling_ward_covers_districts_in_both_constituencies() {
        let g = Geography::parse(SAMPLE).unwrap();
        let ward = g.districts_under([&"E05011391".to_owned()]);
        assert_eq!(ward.len(), 2);
        let east = g.districts_under([&"E14001320".to_owned()]);
        assert_eq!(
            east.into_iter().collect::<Vec<_>>(),
            vec!["E08000035/CGW1".to_owned()]
        );
        assert_eq!(g.districts_under([&"E08000035".to_owned()]).len(), 2);
    }

    /// A district filed under another authority's ward (or under two authorities) is
    /// refused: a grant of that authority would cover it.
    #[test]
    fn a_district_lies_in_the_authority_its_code_names() {
        let gateshead = "[[area]]\nid = \"E08000037\"\nkind = \"local_authority\"\nname = \"Gateshead\"\n\
            [[area]]\nid = \"E05001000\"\nkind = \"ward\"\nname = \"Bridges\"\nparents = [\"E08000037\"]\n";
        for (from, to) in [
            // Under a Gateshead ward besides its own.
            (
                "parents = [\"E05011391\", \"E14001320\"]",
                "parents = [\"E05011391\", \"E14001320\", \"E05001000\"]",
            ),
            // Under a Gateshead ward alone.
            (
                "parents = [\"E05011391\", \"E14001320\"]",
                "parents = [\"E05001000\", \"E14001320\"]",
            ),
            // Named for an authority the register does not hold, in Leeds.
            ("id = \"E08000035/CGW1\"", "id = \"E08000099/CGW1\""),
        ] {
            assert!(SAMPLE.contains(from), "{from}");
            let bad = format!("{}\n{gateshead}", SAMPLE.replacen(from, to, 1));
            let err = Geography::parse(&bad).unwrap_err().to_string();
            assert!(
                err.contains("CGW1") && err.contains("another authority's district"),
                "{err}"
            );
        }
        // A county around its district is no other authority.
        let county = SAMPLE.replace(
            "name = \"Leeds\"",
            "name = \"Leeds\"\n        parents = [\"E10000001\"]\n        [[area]]\n        \
             id = \"E10000001\"\n        kind = \"local_authority\"\n        name = \"County\"",
        );
        assert!(Geography::parse(&county).is_ok());
        assert!(Geography::parse(&format!("{SAMPLE}\n{gateshead}")).is_ok());
    }

    #[test]
    fn unknown_parent_is_refused_with_its_name() {
        let bad = SAMPLE.replace("\"E14999001\"]", "\"E14000000\"]");
        let err = Geography::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("E14000000"), "{err}");
    }

    #[test]
    fn cycles_are_refused() {
        // Two authorities, each in the other (an authority may lie in one: a county's).
        let bad = SAMPLE.replace(
            "name = \"Leeds\"",
            "name = \"Leeds\"\n        parents = [\"E10000001\"]\n        [[area]]\n        \
             id = \"E10000001\"\n        kind = \"local_authority\"\n        name = \"County\"\n        \
             parents = [\"E08000035\"]",
        );
        let err = Geography::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    /// A parent is a kind of area its child always lies wholly within: a ward put under one
    /// of its polling districts (a district's id pasted where its authority's belonged), or
    /// under a constituency it straddles, would let a grant of that parent cover the whole
    /// ward, for policies (`in`) and for narrowing. Before, only that parents exist and make
    /// no cycle was checked, and such a register started.
    #[test]
    fn a_parent_of_a_kind_no_larger_is_refused() {
        let register = |child: &str, parent: &str| {
            format!(
                "[[area]]\nid = \"P/1\"\nkind = \"{parent}\"\nname = \"P\"\n\
                 [[area]]\nid = \"C/1\"\nkind = \"{child}\"\nname = \"C\"\nparents = [\"P/1\"]\n"
            )
        };
        for (child, parent) in [
            ("ward", "polling_district"),
            ("polling_district", "polling_district"),
            ("constituency", "ward"),
            ("local_authority", "constituency"),
            ("clp", "branch"),
            ("ward", "ward"),
            ("nation", "region"),
            // Not always wholly within: a ward straddling two constituencies, a
            // constituency across authorities, a CLP's constituency.
            ("ward", "constituency"),
            ("constituency", "local_authority"),
            ("constituency", "clp"),
            ("clp", "local_authority"),
        ] {
            let err = Geography::parse(&register(child, parent))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`C/1` (") && err.contains("may only lie in a"),
                "{child} in {parent}: {err}"
            );
        }
        for (child, parent) in [
            ("polling_district", "ward"),
            ("ward", "local_authority"),
            ("polling_district", "constituency"),
            ("branch", "clp"),
            ("local_authority", "local_authority"),
            ("region", "region"),
            ("region", "nation"),
            ("nation", "nation"),
        ] {
            Geography::parse(&register(child, parent))
                .unwrap_or_else(|e| panic!("{child} in {parent}: {e:#}"));
        }
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/areas.toml");
        Geography::load(Path::new(shipped)).unwrap();
    }

    #[test]
    fn narrowing_names_the_scope_unless_it_is_everything_or_too_wide() {
        // With a district outside the ward, so that the ward's are not the whole register's.
        let g = Geography::parse(&format!(
            "{SAMPLE}\n[[area]]\nid = \"E08000035/XYZ1\"\nkind = \"polling_district\"\n\
             name = \"XYZ1\"\nparents = [\"E14999001\"]\n"
        ))
        .unwrap();
        let grant = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let ward = g.narrowing(&grant(&["E05011391"]), 500).unwrap();
        // The districts a record can be in, not the ward itself or its parents.
        assert_eq!(ward, g.districts_under(&grant(&["E05011391"])));
        assert!(ward.len() > 1 && ward.len() < g.areas.len());
        // Counted as districts: the ward and its parents do not push a scope past `max`.
        assert_eq!(
            g.narrowing(&grant(&["E08000035"]), ward.len()),
            Some(ward.clone())
        );
        // A party unit's members are named by the unit too.
        let full = Geography::parse(include_str!("../config/areas.toml")).unwrap();
        let clp = full.narrowing(&grant(&["CLP-LEEDS-EAST"]), 500).unwrap();
        assert!(clp.contains("CLP-LEEDS-EAST"), "{clp:?}");
        assert!(clp.iter().any(|id| id.starts_with("E08000035/")), "{clp:?}");
        // Too wide to be worth sending.
        assert_eq!(g.narrowing(&grant(&["E05011391"]), ward.len() - 1), None);
        // The whole register: every area without a parent granted.
        let roots: Vec<String> = (g.areas.values())
            .filter(|a| a.parents.is_empty())
            .map(|a| a.id.clone())
            .collect();
        assert!(roots.len() > 1);
        assert_eq!(g.areas_under(&roots).len(), g.areas.len());
        assert_eq!(g.narrowing(&roots, 500), None);
        // A root short of the whole: narrowed to its districts alone.
        let one = g.narrowing(&grant(&["E14001320"]), 500).unwrap();
        assert_eq!(one, BTreeSet::from(["E08000035/CGW1".to_owned()]));
        // Nothing known granted: narrowed to nothing, not to everything.
        let none = g.narrowing(&grant(&["E05000000"]), 500).unwrap();
        assert_eq!(none, BTreeSet::from(["none".to_owned()]));
        // An empty register: nothing is everything, and still narrows to nothing.
        let empty = Geography::parse("area = []").unwrap();
        assert_eq!(empty.narrowing(&grant(&["E05000000"]), 500), Some(none));
    }

    #[test]
    fn unknown_grants_cover_nothing() {
        let g = Geography::parse(SAMPLE).unwrap();
        assert!(g.districts_under([&"E05000000".to_owned()]).is_empty());
    }
}
