//! The `[watch]` section: which detection rules run, in which mode, with which thresholds.
//!
//! Every rule has a default that lets a normal canvassing day through and catches the misuse
//! DOMAIN.md §8 describes; `[watch.rules.NAME]` overrides any of its keys. A rule given a key
//! it does not use, an unknown rule, an unknown role or a malformed duration is refused at start.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Not evaluated.
    Off,
    /// Counted in metrics and the server log and shown in the live feed; no breach log entry.
    Monitor,
    /// An alert in the breach log, metrics and the live feed.
    Alert,
    /// An alert, and the offending token is revoked through the shared controls.
    Contain,
}

/// The detection rules (DOMAIN.md §8; seeds §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Records disclosed to one principal in a window, far above their role's norm (scraping).
    Volume,
    /// One response larger than a walk sheet (an export).
    LargeExport,
    /// Many refused requests from one principal or address (probing scope).
    DeniedBurst,
    /// Records asked for by id outside the caller's areas.
    OutOfArea,
    /// Records asked for by id of anonymous electors, under-16s or restricted subjects.
    ProtectedSubject,
    /// Requests with a token that is revoked or whose token or grant has ended.
    EndedGrant,
    /// One token used from many client addresses.
    ManyAddresses,
    /// Records disclosed outside working hours.
    UnusualHours,
    /// Records read one by one in sequential id order.
    Enumeration,
    /// Many aggregates from one principal: answers that could be set against each other to
    /// narrow a small group's count (differencing).
    AggregateSeries,
    /// A token signed by a trusted issuer for a role that issuer may not issue
    /// (`auth.issuer_roles`): a partner's identity provider minting a DPO, say; or naming a
    /// caller or token id in another issuer's namespace (`auth.subject_prefixes`).
    IssuerOverreach,
}

impl Rule {
    pub const ALL: [Rule; 11] = [
        Rule::Volume,
        Rule::LargeExport,
        Rule::DeniedBurst,
        Rule::OutOfArea,
        Rule::ProtectedSubject,
        Rule::EndedGrant,
        Rule::ManyAddresses,
        Rule::UnusualHours,
        Rule::Enumeration,
        Rule::AggregateSeries,
        Rule::IssuerOverreach,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::Volume => "volume",
            Rule::LargeExport => "large_export",
            Rule::DeniedBurst => "denied_burst",
            Rule::OutOfArea => "out_of_area",
            Rule::ProtectedSubject => "protected_subject",
            Rule::EndedGrant => "ended_grant",
            Rule::ManyAddresses => "many_addresses",
            Rule::UnusualHours => "unusual_hours",
            Rule::Enumeration => "enumeration",
            Rule::AggregateSeries => "aggregate_series",
            Rule::IssuerOverreach => "issuer_overreach",
        }
    }

    fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Which keys of `[watch.rules.NAME]` mean something for this rule.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Rule::Volume => &["mode", "window", "threshold", "limits"],
            Rule::LargeExport => &["mode", "threshold", "limits"],
            Rule::UnusualHours => &["mode", "window", "threshold", "hours"],
            _ => &["mode", "window", "threshold"],
        }
    }

    /// The defaults: thresholds a normal canvassing day stays well under.
    fn defaults(self) -> RuleSettings {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        let (window, threshold, limits): (_, _, &[(&str, u64)]) = match self {
            // A walk sheet is a few hundred electors; a canvasser works one or two an hour.
            Rule::Volume => (
                minutes(10),
                1_000,
                &[
                    ("councillor", 2_000),
                    ("council_candidate", 2_000),
                    ("candidate", 5_000),
                    ("clp_secretary", 3_000),
                    ("analyst", 200_000),
                ],
            ),
            Rule::LargeExport => (
                Duration::ZERO,
                500,
                &[("candidate", 2_000), ("analyst", 200_000)],
            ),
            Rule::DeniedBurst => (minutes(1), 20, &[]),
            Rule::OutOfArea => (minutes(10), 3, &[]),
            Rule::ProtectedSubject => (minutes(60), 1, &[]),
            Rule::EndedGrant => (minutes(10), 5, &[]),
            Rule::ManyAddresses => (minutes(60), 4, &[]),
            Rule::UnusualHours => (minutes(60), 100, &[]),
            Rule::Enumeration => (minutes(10), 20, &[]),
            // A study asks for a handful of tables; differencing needs many overlapping ones.
            Rule::AggregateSeries => (minutes(60), 30, &[]),
            // Never a mistake a caller makes: the issuer itself signed it.
            Rule::IssuerOverreach => (minutes(60), 1, &[]),
        };
        RuleSettings {
            mode: Mode::Alert,
            window,
            threshold,
            limits: limits.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect(),
            limits_given: Default::default(),
            hours: (7 * 60, 21 * 60),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One rule's effective settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSettings {
    pub mode: Mode,
    /// The sliding window counts are taken over.
    pub window: Duration,
    /// At this count the rule matches.
    pub threshold: u64,
    /// Per-role thresholds replacing `threshold` (volume rules only).
    pub limits: HashMap<String, u64>,
    /// The roles of `limits` the configuration gave, which must be roles the asset register
    /// defines (`WatchSettings::roles`); a default for a role it does not define matches no
    /// caller, whom no token can give it.
    pub limits_given: std::collections::BTreeSet<String>,
    /// Working hours as minutes after local midnight, `[start, end)` (unusual_hours only).
    pub hours: (u32, u32),
}

impl RuleSettings {
    /// The threshold for a caller of `role` (`None`: unauthenticated).
    pub fn threshold_for(&self, role: Option<&str>) -> u64 {
        role.and_then(|r| self.limits.get(r))
            .copied()
            .unwrap_or(self.threshold)
            .max(1)
    }
}

/// The time zone working hours are read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    Utc,
    /// GMT, and BST from 01:00 UTC on the last Sunday of March to 01:00 UTC on the last
    /// Sunday of October.
    EuropeLondon,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WatchSettings {
    /// Where alerts and their classifications are appended.
    pub breach_log: PathBuf,
    /// After a rule matches for one principal, it stays quiet for them this long.
    pub cooldown: Duration,
    pub zone: Zone,
    pub rules: BTreeMap<Rule, RuleSettings>,
    /// With Redis: also detect over every replica's accesses (see `shared.rs`).
    pub shared: bool,
    /// The Redis stream the replicas share accesses through.
    pub shared_stream: String,
}

impl WatchSettings {
    /// Every rule at its defaults; the breach log in `data_dir`.
    pub fn defaults(data_dir: &Path) -> WatchSettings {
        WatchSettings {
            breach_log: data_dir.join("breach-log.jsonl"),
            cooldown: Duration::from_secs(3600),
            zone: Zone::EuropeLondon,
            rules: Rule::ALL.into_iter().map(|r| (r, r.defaults())).collect(),
            shared: true,
            shared_stream: "wardgate:access".to_owned(),
        }
    }

    /// Every role the configuration names in a rule's `limits`, for checking against the
    /// asset register (the defaults' roles are not the operator's to answer for).
    pub fn roles(&self) -> impl Iterator<Item = (Rule, &str)> {
        self.rules
            .iter()
            .flat_map(|(r, s)| s.limits_given.iter().map(move |role| (*r, role.as_str())))
    }

    pub fn rule(&self, r: Rule) -> &RuleSettings {
        // Every rule is present: `defaults` inserts them all and parsing only overrides.
        self.rules.get(&r).unwrap_or_else(|| unreachable_rule(r))
    }
}

#[expect(clippy::panic, reason = "WatchSettings always holds every rule")]
fn unreachable_rule(r: Rule) -> ! {
    panic!("rule `{r}` missing from the watch settings")
}

/// `[watch]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    breach_log: Option<PathBuf>,
    cooldown: Option<String>,
    timezone: Option<String>,
    shared: Option<bool>,
    shared_stream: Option<String>,
    #[serde(default)]
    rules: BTreeMap<String, toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    mode: Option<Mode>,
    window: Option<String>,
    threshold: Option<u64>,
    limits: Option<HashMap<String, u64>>,
    hours: Option<String>,
}

impl RawWatch {
    /// Applies the file's overrides to the defaults. `at` resolves relative paths. Role names
    /// in `limits` are checked against the asset register at start ([`WatchSettings::roles`]).
    pub fn resolve(
        self,
        data_dir: &Path,
        at: &dyn Fn(&Path) -> PathBuf,
    ) -> anyhow::Result<WatchSettings> {
        let mut s = WatchSettings::defaults(data_dir);
        if let Some(p) = self.breach_log {
            s.breach_log = at(&p);
        }
        if let Some(c) = self.cooldown {
            s.cooldown = duration(&c).context("`watch.cooldown`")?;
        }
        if let Some(b) = self.shared {
            s.shared = b;
        }
        if let Some(k) = self.shared_stream {
            if k.trim().is_empty() {
                bail!("`watch.shared_stream` is empty");
            }
            s.shared_stream = k;
        }
        s.zone = match self.timezone.as_deref() {
            None | Some("Europe/London") => Zone::EuropeLondon,
            Some("UTC") => Zone::Utc,
            Some(other) => {
                bail!("`watch.timezone` is `{other}`; use `Europe/London` or `UTC`")
            }
        };
        for (name, table) in self.rules {
            let rule = Rule::from_name(&name).with_context(|| {
                let known: Vec<_> = Rule::ALL.iter().map(|r| r.name()).collect();
                format!(
                    "`watch.rules.{name}` is not a rule; the rules are {}",
                    known.join(", ")
                )
            })?;
            for key in table.keys() {
                if !rule.keys().contains(&key.as_str()) {
                    bail!(
                        "`watch.rules.{name}.{key}` is not a setting of this rule (it takes {})",
                        rule.keys().join(", ")
                    );
                }
            }
            let raw: RawRule = table
                .try_into()
                .with_context(|| format!("in `watch.rules.{name}`"))?;
            let r = s.rules.entry(rule).or_insert_with(|| rule.defaults());
            if let Some(m) = raw.mode {
                r.mode = m;
            }
            if let Some(w) = raw.window {
                r.window = duration(&w).with_context(|| format!("`watch.rules.{name}.window`"))?;
            }
            if let Some(t) = raw.threshold {
                if t == 0 {
                    bail!("`watch.rules.{name}.threshold` must be at least 1");
                }
                r.threshold = t;
            }
            if let Some(limits) = raw.limits {
                // Not "no limit": a role at 0 would match on its first record.
                if let Some((role, _)) = limits.iter().find(|(_, n)| **n == 0) {
                    bail!("`watch.rules.{name}.limits.{role}` must be at least 1");
                }
                r.limits_given.extend(limits.keys().cloned());
                r.limits.extend(limits);
            }
            if let Some(h) = raw.hours {
                r.hours = hours(&h).with_context(|| format!("`watch.rules.{name}.hours`"))?;
            }
        }
        Ok(s)
    }
}

fn duration(text: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(text)
        .with_context(|| format!("`{text}` is not a duration like `10m` or `1h`"))?;
    if d.is_zero() {
        bail!("must be longer than zero");
    }
    Ok(d)
}

/// `"07:00-21:00"` as minutes after midnight.
fn hours(text: &str) -> anyhow::Result<(u32, u32)> {
    let parse = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
    };
    let (a, b) = text
        .split_once('-')
        .and_then(|(a, b)| Some((parse(a)?, parse(b)?)))
        .with_context(|| format!("`{text}` is not a range like `07:00-21:00`"))?;
    if a == b {
        bail!("`{text}` is an empty range");
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<WatchSettings> {
        let raw: RawWatch = toml::from_str(text)?;
        raw.resolve(Path::new("/data"), &|p| Path::new("/cfg").join(p))
    }

    #[test]
    fn defaults_cover_every_rule_and_overrides_apply() {
        let s = parse(
            r#"
            cooldown = "30m"
            [rules.volume]
            mode = "contain"
            window = "5m"
            limits = { councillor = 400 }
            [rules.unusual_hours]
            hours = "08:30-20:00"
            "#,
        )
        .unwrap();
        assert_eq!(s.rules.len(), Rule::ALL.len());
        assert_eq!(s.breach_log, Path::new("/data/breach-log.jsonl"));
        let v = s.rule(Rule::Volume);
        assert_eq!(v.mode, Mode::Contain);
        assert_eq!(v.window, Duration::from_secs(300));
        assert_eq!(v.threshold_for(Some("councillor")), 400);
        assert_eq!(v.threshold_for(Some("canvasser")), 1_000);
        assert_eq!(v.threshold_for(None), 1_000);
        assert_eq!(s.rule(Rule::UnusualHours).hours, (510, 1200));
        assert_eq!(s.cooldown, Duration::from_secs(1800));
        // The roles to check against the asset register: those the file names, not the
        // defaults' (a register without `analyst` needs no `[watch]` to start).
        let named: Vec<(Rule, &str)> = s.roles().collect();
        assert_eq!(named, [(Rule::Volume, "councillor")]);
        assert_eq!(parse("").unwrap().roles().count(), 0);
        assert_eq!(
            parse("")
                .unwrap()
                .rule(Rule::Volume)
                .threshold_for(Some("analyst")),
            200_000
        );
    }

    #[test]
    fn mistakes_are_refused_with_the_key_named() {
        for (text, expect) in [
            (
                "[rules.scraping]\nmode = \"alert\"",
                "`watch.rules.scraping` is not a rule",
            ),
            (
                "[rules.volume]\nhours = \"07:00-21:00\"",
                "`watch.rules.volume.hours`",
            ),
            (
                "[rules.enumeration]\nwindow = \"soon\"",
                "`watch.rules.enumeration.window`",
            ),
            ("[rules.enumeration]\nthreshold = 0", "at least 1"),
            // Not "no limit" (it would match on the role's first record).
            (
                "[rules.volume]\nlimits = { analyst = 0 }",
                "`watch.rules.volume.limits.analyst` must be at least 1",
            ),
            (
                "[rules.enumeration]\nmode = \"shout\"",
                "in `watch.rules.enumeration`",
            ),
            (
                "[rules.unusual_hours]\nhours = \"25:00-26:00\"",
                "`watch.rules.unusual_hours.hours`",
            ),
            ("timezone = \"Mars/Olympus\"", "`watch.timezone`"),
            ("colour = \"red\"", "unknown field `colour`"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }
}
