//! The rights register's flags per subject at one moment, as the filter reads them: every
//! record's subject is looked up, flagged or not, so the lookup is a foldhash probe answered
//! with the list the map holds (std's SipHash map, cloning a flagged subject's list, cost 232
//! instructions a record with a 2,000-subject register; this, 63: `loadtest/instructions.sh`).
//! `Controls` builds one whenever the register changes and hands each request a clone (an
//! `Arc`), so a page is filtered against one state of the register throughout.

use std::collections::HashMap;
use std::sync::Arc;

/// `None`: no subject carries a flag (`EMPTY`).
#[derive(Clone, Default)]
pub struct RegisterFlags(Option<Arc<Flags>>);

/// Keyed by the id's bytes, folded to lower case: a lookup folds the id asked about into a
/// buffer and asks with its bytes as they are (asking with a `str` checked them as UTF-8
/// again: a lookup took 237 instructions in the gateway, `loadtest/run.sh --instructions`,
/// and takes 143).
type Flags = HashMap<Box<[u8]>, Box<[String]>, foldhash::fast::RandomState>;

impl RegisterFlags {
    /// No flags on anyone.
    pub const EMPTY: RegisterFlags = RegisterFlags(None);

    /// The flags on `subject`, if any. Ids are matched without regard to ASCII case: a
    /// datastore whose collation ignores case (MySQL's, SQL Server's) answers `VF-1` for
    /// `vf-1`, and a flag placed on one must hold the other back too (matching more withholds
    /// more, never less).
    #[inline]
    pub fn get(&self, subject: &str) -> Option<&[String]> {
        let map = self.0.as_ref()?;
        let mut buf = [0u8; 64];
        let found = match buf.get_mut(..subject.len()) {
            Some(folded) => {
                folded.copy_from_slice(subject.as_bytes());
                folded.make_ascii_lowercase();
                map.get(&folded[..])
            }
            None => map.get(subject.to_ascii_lowercase().as_bytes()),
        };
        found.map(|flags| &flags[..])
    }

    /// How many subjects carry a flag.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |flags| flags.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `subject` carries a flag in this register that it did not in `then`: a
    /// restriction, objection or erasure request placed since an answer was judged on `then`
    /// (a flag lifted meanwhile discloses nothing more).
    pub fn gained_since(&self, then: &RegisterFlags, subject: &str) -> bool {
        self.get(subject).is_some_and(|flags| {
            let before = then.get(subject).unwrap_or_default();
            flags.iter().any(|f| !before.contains(f))
        })
    }

    /// Whether any subject carries a flag in this register that it did not in `then` (an
    /// answer naming no one, an aggregate, judged on `then`). A register rebuilt with the
    /// same flags (`Controls` rebuilds it for any control event, a revocation too) gained none.
    pub fn gained_any_since(&self, then: &RegisterFlags) -> bool {
        if self.same_as(then) {
            return false;
        }
        let Some(now) = &self.0 else {
            return false;
        };
        let before = then.0.as_deref();
        now.iter().any(|(subject, flags)| {
            let had = before
                .and_then(|b| b.get(subject))
                .map_or(&[][..], |f| &f[..]);
            flags.iter().any(|f| !had.contains(f))
        })
    }

    /// Whether both are the one state of the register (`Controls` builds one per change).
    pub fn same_as(&self, other: &RegisterFlags) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Subjects and their flags. Ids are kept folded to lower case (`get`); a subject named
/// twice, in whatever case, carries every flag either list names, sorted, each once.
impl FromIterator<(String, Vec<String>)> for RegisterFlags {
    fn from_iter<I: IntoIterator<Item = (String, Vec<String>)>>(pairs: I) -> Self {
        let mut merged: HashMap<String, Vec<String>> = HashMap::new();
        for (subject, flags) in pairs {
            merged
                .entry(subject.to_ascii_lowercase())
                .or_default()
                .extend(flags);
        }
        let map: Flags = (merged.into_iter())
            .map(|(subject, mut flags)| {
                flags.sort_unstable();
                flags.dedup();
                (
                    subject.into_bytes().into_boxed_slice(),
                    flags.into_boxed_slice(),
                )
            })
            .collect();
        RegisterFlags((!map.is_empty()).then(|| Arc::new(map)))
    }
}

impl std::fmt::Debug for RegisterFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterFlags")
            .field("subjects", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::RegisterFlags;

    /// Rebuilt with the same flags, a register has gained none; a flag placed, or added to
    /// a subject's, is gained; a flag lifted is not.
    #[test]
    fn a_register_gains_only_flags_it_did_not_hold() {
        let of = |pairs: &[(&str, &[&str])]| -> RegisterFlags {
            (pairs.iter())
                .map(|(s, f)| (s.to_string(), flags(f)))
                .collect()
        };
        let then = of(&[("VF-1", &["restricted"])]);
        assert!(!of(&[("vf-1", &["restricted"])]).gained_any_since(&then));
        assert!(!RegisterFlags::EMPTY.gained_any_since(&then));
        assert!(of(&[("VF-1", &["restricted", "objects_profiling"])]).gained_any_since(&then));
        assert!(
            of(&[("VF-1", &["restricted"]), ("VF-2", &["restricted"])]).gained_any_since(&then)
        );
        assert!(of(&[("VF-2", &["restricted"])]).gained_any_since(&RegisterFlags::EMPTY));
    }

    fn flags(list: &[&str]) -> Vec<String> {
        list.iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn a_subject_gets_its_own_flags_and_no_one_else_does() {
        let register: RegisterFlags = [
            ("VF-0000001".to_owned(), flags(&["restricted"])),
            (
                "VF-0000002".to_owned(),
                flags(&["deceased", "do_not_contact"]),
            ),
            ("VF-0000001".to_owned(), flags(&["objects_profiling"])),
        ]
        .into_iter()
        .collect();
        assert_eq!(register.len(), 2);
        // Named twice: both lists.
        assert_eq!(
            register.get("VF-0000001"),
            Some(&flags(&["objects_profiling", "restricted"])[..])
        );
        assert_eq!(
            register.get("VF-0000002"),
            Some(&flags(&["deceased", "do_not_contact"])[..])
        );
        for other in ["VF-000000", "VF-00000010", "", "VF-0000003", "VF-0000001-"] {
            assert_eq!(register.get(other), None, "{other}");
        }
    }

    /// A datastore that ignores case answers `VF-1` for `vf-1`: a flag placed on either
    /// holds back both, and two placements in different cases add up.
    #[test]
    fn ids_match_whatever_their_ascii_case() {
        let register: RegisterFlags = [
            ("vf-0000001".to_owned(), flags(&["restricted"])),
            ("VF-0000002".to_owned(), flags(&["deceased"])),
            (
                "Vf-0000002".to_owned(),
                flags(&["do_not_contact", "deceased"]),
            ),
        ]
        .into_iter()
        .collect();
        for id in ["vf-0000001", "VF-0000001", "vF-0000001"] {
            assert_eq!(register.get(id), Some(&flags(&["restricted"])[..]), "{id}");
        }
        assert_eq!(
            register.get("vf-0000002"),
            Some(&flags(&["deceased", "do_not_contact"])[..])
        );
        // Longer than the stack buffer: the same answer.
        let long = "x".repeat(100);
        let register: RegisterFlags = [(long.to_uppercase(), flags(&["restricted"]))]
            .into_iter()
            .collect();
        assert_eq!(register.get(&long), Some(&flags(&["restricted"])[..]));
        assert_eq!(register.get(&long[1..]), None);
    }

    #[test]
    fn a_state_of_the_register_is_itself_and_no_other() {
        let build = || -> RegisterFlags {
            [("VF-1".to_owned(), flags(&["restricted"]))]
                .into_iter()
                .collect()
        };
        let one = build();
        assert!(one.same_as(&one.clone()));
        assert!(!one.same_as(&build()), "the same flags, built again");
        assert!(!one.same_as(&RegisterFlags::EMPTY));
        assert!(RegisterFlags::EMPTY.same_as(&RegisterFlags::default()));
    }

    #[test]
    fn an_empty_register_flags_no_one() {
        let none: RegisterFlags = std::iter::empty().collect();
        for register in [RegisterFlags::EMPTY, RegisterFlags::default(), none] {
            assert!(register.is_empty());
            assert_eq!(register.get("VF-0000001"), None);
        }
    }
}
