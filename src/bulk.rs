//! How many bulk reads each principal has under way on this replica, against
//! `server.max_bulk_reads_per_caller`. An export or an aggregate has the datastore stream the
//! whole of the caller's scope (national, for an analyst), holds memory for its chunks and an
//! upstream connection for as long as its client takes, and counts against no quota before its
//! first chunk: without a bound, one token opening a hundred HTTP/2 connections of 32 streams
//! each could hold gigabytes and every datastore connection, for every other caller.
//!
//! A slot is taken when the request is checked and held until the export's last chunk or the
//! aggregate's answer (dropped with it however it ends). Slots are this replica's own: with
//! several replicas behind a balancer, a caller may hold as many on each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::GatewayError;

pub struct BulkReads {
    inner: Arc<Inner>,
}

struct Inner {
    limit: usize,
    under_way: Mutex<HashMap<String, usize>>,
}

/// One bulk read under way: the slot is given back when this is dropped.
pub struct BulkRead {
    inner: Arc<Inner>,
    subject: String,
}

impl BulkReads {
    pub fn new(limit: usize) -> BulkReads {
        BulkReads {
            inner: Arc::new(Inner {
                limit,
                under_way: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A slot for `subject`, or 429 `too-many-at-once` when they hold every one.
    pub fn take(&self, subject: &str) -> Result<BulkRead, GatewayError> {
        let mut under_way = (self.inner.under_way.lock()).unwrap_or_else(PoisonError::into_inner);
        let held = under_way.entry(subject.to_owned()).or_default();
        if *held >= self.inner.limit {
            return Err(GatewayError::TooManyAtOnce(self.inner.limit));
        }
        *held += 1;
        Ok(BulkRead {
            inner: Arc::clone(&self.inner),
            subject: subject.to_owned(),
        })
    }
}

impl Drop for BulkRead {
    fn drop(&mut self) {
        let mut under_way = (self.inner.under_way.lock()).unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = under_way.get_mut(&self.subject) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                under_way.remove(&self.subject);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_holds_at_most_the_limit_and_a_slot_comes_back_when_dropped() {
        let bulk = BulkReads::new(2);
        let a1 = bulk.take("a").unwrap();
        let _a2 = bulk.take("a").unwrap();
        assert!(matches!(
            bulk.take("a"),
            Err(GatewayError::TooManyAtOnce(2))
        ));
        // Another caller is not held back by them.
        let _b = bulk.take("b").unwrap();
        drop(a1);
        let _a3 = bulk.take("a").unwrap();
        assert!(bulk.take("a").is_err());
    }

    #[test]
    fn nothing_is_kept_of_a_caller_with_none_under_way() {
        let bulk = BulkReads::new(1);
        drop(bulk.take("a").unwrap());
        assert!(bulk.inner.under_way.lock().unwrap().is_empty());
    }
}
