//! The subject ids one response discloses, in the order they left, kept in one buffer: a
//! page's hundred ids as a hundred `String`s were a hundred allocations on the request's
//! thread and a hundred frees on the audit writer's. On the wire (the audit line) they are a
//! JSON array of strings, as a `Vec<String>` would be.

use std::fmt;

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeSeq, Serializer};

#[derive(Default, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// Every id, one after another.
    text: String,
    /// Where each id ends in `text`.
    ends: Vec<usize>,
}

impl Subjects {
    pub fn push(&mut self, id: &str) {
        self.text.push_str(id);
        self.ends.push(self.text.len());
    }

    /// Makes room for `n` more ids, each as long as the last one pushed (with none pushed,
    /// nothing to go by: no room is made). A page's ids grown one push at a time were a
    /// dozen reallocations a page.
    pub fn reserve_like_last(&mut self, n: usize) {
        let last = match self.ends.as_slice() {
            [.., before, end] => end - before,
            [end] => *end,
            [] => return,
        };
        self.ends.reserve(n);
        self.text.reserve(n.saturating_mul(last));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The ids in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            text: &self.text,
            ends: self.ends.iter(),
            start: 0,
        }
    }
}

/// The ids of a `Subjects`, in order.
pub struct Iter<'a> {
    text: &'a str,
    ends: std::slice::Iter<'a, usize>,
    /// Where the next id starts: the end of the one before.
    start: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let end = *self.ends.next()?;
        let id = self.text.get(self.start..end);
        self.start = end;
        id
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.ends.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Subjects {
    type Item = &'a str;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Subjects {
    fn from_iter<I: IntoIterator<Item = S>>(ids: I) -> Self {
        let mut all = Subjects::default();
        for id in ids {
            all.push(id.as_ref());
        }
        all
    }
}

impl<S: AsRef<str>> From<Vec<S>> for Subjects {
    fn from(ids: Vec<S>) -> Self {
        ids.into_iter().collect()
    }
}

impl<S: AsRef<str>> PartialEq<[S]> for Subjects {
    fn eq(&self, other: &[S]) -> bool {
        self.len() == other.len() && self.iter().zip(other).all(|(a, b)| a == b.as_ref())
    }
}

impl<S: AsRef<str>, const N: usize> PartialEq<[S; N]> for Subjects {
    fn eq(&self, other: &[S; N]) -> bool {
        *self == other[..]
    }
}

impl<S: AsRef<str>> PartialEq<Vec<S>> for Subjects {
    fn eq(&self, other: &Vec<S>) -> bool {
        *self == other[..]
    }
}

impl fmt::Debug for Subjects {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Subjects {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for id in self {
            seq.serialize_element(id)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Subjects {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Ids;
        impl<'de> Visitor<'de> for Ids {
            type Value = Subjects;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of subject ids")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Subjects, A::Error> {
                let mut all = Subjects::default();
                while let Some(id) = seq.next_element::<std::borrow::Cow<'de, str>>()? {
                    all.push(&id);
                }
                Ok(all)
            }
        }
        d.deserialize_seq(Ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_made_for_ids_as_long_as_the_last_and_nothing_else_changes() {
        let mut none = Subjects::default();
        none.reserve_like_last(100);
        assert_eq!((none.text.capacity(), none.ends.capacity()), (0, 0));
        let mut all: Subjects = ["VF-1", "VF-22"].iter().collect();
        all.reserve_like_last(10);
        assert!(all.ends.capacity() >= 12, "{}", all.ends.capacity());
        assert!(all.text.capacity() >= 9 + 10 * 5, "{}", all.text.capacity());
        assert_eq!(all, ["VF-1", "VF-22"]);
        let mut one: Subjects = ["VF-333"].iter().collect();
        one.reserve_like_last(3);
        assert!(one.text.capacity() >= 6 + 3 * 6, "{}", one.text.capacity());
        let (text, ends) = (one.text.capacity(), one.ends.capacity());
        for id in ["VF-1", "VF-2", "VF-3"] {
            one.push(id);
        }
        assert_eq!((one.text.capacity(), one.ends.capacity()), (text, ends));
        assert_eq!(one, ["VF-333", "VF-1", "VF-2", "VF-3"]);
    }

    #[test]
    fn ids_read_back_in_order_and_encode_as_a_list_of_strings() {
        let ids = ["VF-1", "", "VF-22", "é\"q", "VF-1"];
        let all: Subjects = ids.iter().collect();
        assert_eq!(all.len(), 5);
        assert_eq!(all.iter().collect::<Vec<_>>(), ids);
        assert_eq!(all, ids);
        assert_ne!(all, ids[..4]);
        let json = serde_json::to_string(&all).unwrap();
        assert_eq!(json, serde_json::to_string(&ids).unwrap());
        let back: Subjects = serde_json::from_str(&json).unwrap();
        assert_eq!(back, all);
        assert_eq!(format!("{all:?}"), format!("{ids:?}"));
        assert!(serde_json::from_str::<Subjects>(r#"["a",1]"#).is_err());
        let empty = Subjects::default();
        assert!(empty.is_empty());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "[]");
        let joined: Subjects = all.iter().chain(&empty).chain(&all).collect();
        assert_eq!(joined.len(), 10);
        assert_eq!(joined.iter().nth(7), Some("VF-22"));
    }
}
