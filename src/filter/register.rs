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

type Flags = HashMap<Box<str>, Box<[String]>, foldhash::fast::RandomState>;

impl RegisterFlags {
    /// No flags on anyone.
    pub const EMPTY: RegisterFlags = RegisterFlags(None);

    /// The flags on `subject`, if any.
    #[inline]
    pub fn get(&self, subject: &str) -> Option<&[String]> {
        self.0.as_ref()?.get(subject).map(|flags| &flags[..])
    }

    /// How many subjects carry a flag.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |flags| flags.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

/// Subjects and their flags (a subject named twice keeps its last list).
impl FromIterator<(String, Vec<String>)> for RegisterFlags {
    fn from_iter<I: IntoIterator<Item = (String, Vec<String>)>>(pairs: I) -> Self {
        let map: Flags = (pairs.into_iter())
            .map(|(subject, flags)| (subject.into_boxed_str(), flags.into_boxed_slice()))
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
        // Named twice: the last list.
        assert_eq!(
            register.get("VF-0000001"),
            Some(&flags(&["objects_profiling"])[..])
        );
        assert_eq!(
            register.get("VF-0000002"),
            Some(&flags(&["deceased", "do_not_contact"])[..])
        );
        for other in ["VF-000000", "VF-00000010", "vf-0000001", "", "VF-0000003"] {
            assert_eq!(register.get(other), None, "{other}");
        }
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
