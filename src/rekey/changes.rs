//! Noticing that the files `SIGHUP` reads again have changed, so that a renewed certificate, a
//! rotated key or a new policy pack is taken up without a signal (`server.file_check_interval`).
//!
//! Each check digests every file a reload reads, names and contents, part by part (`Part`):
//! the token key files, the server's certificate and key, the `https://` datastores' TLS
//! files, and the policy pack with its schema and tests (a file added to the pack counts). A
//! part's change is acted on once it has held still from one check to the next, so that files
//! put in place one by one (a certificate, then its key) are read together rather than
//! half-way. That part is then read as a signal reads it, and its reload checks, records and
//! refuses as it does for a signal. A change refused is not read again until its files change
//! again; one that could not be audited is read again at the next checks.

use std::sync::Arc;

use sha2::Digest as _;

use crate::gateway::Gateway;

/// A digest of one part's files.
pub type Digest = [u8; 32];

/// What a reload reads, each part with its own files, checked and read apart: a part whose
/// files never hold still (a fetcher that rewrites them at every check) holds back no other,
/// and a change to one never reads another again (and records again a refusal that stands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The token key files (`[[auth.keys]]`' PEM files, `auth.jwks_file`).
    Keys,
    /// `server.tls`' certificate and key.
    ServerTls,
    /// Every `https://` datastore's TLS files.
    DatastoreTls,
    /// The policy pack with its schema and tests (a file added to it counts).
    Policy,
}

pub const PARTS: [Part; 4] = [
    Part::Keys,
    Part::ServerTls,
    Part::DatastoreTls,
    Part::Policy,
];

/// Each part's files as they are now, in the order of `PARTS`. (A part with a file that
/// cannot be read has a digest of its own, which the reload it leads to reports.)
pub async fn now(gw: &Arc<Gateway>) -> [Digest; 4] {
    let gw = Arc::clone(gw);
    // File reads, the policy pack's hundreds of fixtures among them: off the async workers.
    tokio::task::spawn_blocking(move || PARTS.map(|part| digest(&gw, part)))
        .await
        .unwrap_or_else(|e| {
            // A check that could not be made reads as a change: the reloads it leads to say
            // what is wrong, if anything is.
            tracing::error!(error = %e, "checking the reloadable files failed");
            [[0; 32]; 4]
        })
}

fn digest(gw: &Gateway, part: Part) -> Digest {
    const UNREADABLE: Digest = [0xff; 32];
    match part {
        Part::Keys => crate::startup::digest_files_named(&gw.verifier.key_files()),
        Part::ServerTls => gw
            .server_cert
            .as_ref()
            .map_or(Some([0; 32]), |c| c.files_now()),
        Part::DatastoreTls => {
            let mut all = sha2::Sha256::new();
            for files in gw.upstreams.tls_files_now() {
                all.update(files.unwrap_or(UNREADABLE));
            }
            Some(all.finalize().into())
        }
        Part::Policy => gw.policy_source.digests().map(|d| d.all),
    }
    .unwrap_or(UNREADABLE)
}

/// Every part's `Changes`.
#[derive(Debug, Default)]
pub struct Checks {
    parts: [Changes; 4],
}

impl Checks {
    /// Every part was read (by a signal) as it was at `now`.
    pub fn read(&mut self, now: [Digest; 4]) {
        for (changes, now) in self.parts.iter_mut().zip(now) {
            changes.read(now);
        }
    }

    /// The parts to read again now (`Changes::settled`).
    pub fn settled(&mut self, now: [Digest; 4]) -> Vec<Part> {
        (PARTS.iter().zip(self.parts.iter_mut()).zip(now))
            .filter_map(|((part, changes), now)| changes.settled(now).then_some(*part))
            .collect()
    }

    /// `part` was not read after all (its change could not be audited): the next checks read
    /// it again.
    pub fn retry(&mut self, part: Part) {
        if let Some(i) = PARTS.iter().position(|p| *p == part) {
            self.parts[i] = Changes::default();
        }
    }
}

/// One part's files as last read, and a change seen at the last check that has yet to hold
/// still. Until they are first read, any files count as a change: the first checks read every
/// part again, so that files changed while the gateway started are taken up (a reload finds
/// files as they are in use unchanged, and records nothing).
#[derive(Debug, Default)]
pub struct Changes {
    read: Option<Digest>,
    seen: Option<Digest>,
}

impl Changes {
    /// The files were read as they were at `now`.
    pub fn read(&mut self, now: Digest) {
        self.read = Some(now);
        self.seen = None;
    }

    /// Whether files that hold `now` at this check are to be read again: they differ from
    /// those last read and held the same at the check before. (They then count as read.)
    pub fn settled(&mut self, now: Digest) -> bool {
        if self.read == Some(now) {
            self.seen = None;
            return false;
        }
        if self.seen == Some(now) {
            self.read(now);
            return true;
        }
        self.seen = Some(now);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Digest = [1; 32];
    const B: Digest = [2; 32];
    const C: Digest = [3; 32];

    #[test]
    fn a_change_is_read_once_it_has_held_still_for_one_check() {
        let mut c = Changes::default();
        c.read(A);
        assert!(!c.settled(A), "nothing changed");
        assert!(
            !c.settled(B),
            "changed at this check: it may still be changing"
        );
        assert!(c.settled(B), "held still");
        assert!(!c.settled(B), "read once, not at every check after");
    }

    #[test]
    fn files_still_changing_are_not_read_until_they_hold_still() {
        let mut c = Changes::default();
        c.read(A);
        assert!(!c.settled(B));
        assert!(!c.settled(C), "changed again since the last check");
        assert!(!c.settled(B));
        assert!(c.settled(B));
    }

    #[test]
    fn files_put_back_as_they_were_are_not_read_again() {
        let mut c = Changes::default();
        c.read(A);
        assert!(!c.settled(B));
        assert!(!c.settled(A), "back as read: nothing to do");
        assert!(!c.settled(A));
    }

    #[test]
    fn a_signal_reading_the_files_leaves_no_change_for_the_next_check() {
        let mut c = Changes::default();
        c.read(A);
        assert!(!c.settled(B), "seen once");
        // SIGHUP reads them meanwhile.
        c.read(B);
        assert!(!c.settled(B), "already read");
    }

    #[test]
    fn files_are_read_again_once_they_have_held_still_after_start() {
        let mut c = Changes::default();
        assert!(!c.settled(A), "first seen");
        assert!(c.settled(A), "read once at start, whatever the files hold");
        assert!(!c.settled(A));
    }

    #[test]
    fn a_part_that_never_holds_still_holds_back_no_other() {
        let mut checks = Checks::default();
        checks.read([A; 4]);
        assert!(checks.settled([B, A, A, A]).is_empty());
        assert!(checks.settled([C, B, A, A]).is_empty());
        assert_eq!(checks.settled([B, B, A, A]), [Part::ServerTls]);
        assert!(
            checks.settled([C, B, A, A]).is_empty(),
            "keys still changing"
        );
        assert!(checks.settled([B, B, A, A]).is_empty());
        assert_eq!(checks.settled([B, B, A, A]), [Part::Keys]);
    }

    #[test]
    fn a_part_retried_is_read_again_at_the_next_checks() {
        let mut checks = Checks::default();
        checks.read([A; 4]);
        assert!(checks.settled([A, A, A, B]).is_empty());
        assert_eq!(checks.settled([A, A, A, B]), [Part::Policy]);
        checks.retry(Part::Policy);
        assert!(checks.settled([A, A, A, B]).is_empty());
        assert_eq!(checks.settled([A, A, A, B]), [Part::Policy], "read again");
        assert!(checks.settled([A, A, A, B]).is_empty(), "and then not");
    }

    #[test]
    fn a_change_refused_is_not_read_again_until_the_files_change_again() {
        let mut c = Changes::default();
        c.read(A);
        assert!(!c.settled(B));
        assert!(c.settled(B), "read (and, say, refused)");
        for _ in 0..3 {
            assert!(!c.settled(B), "the same files: not read and refused again");
        }
        assert!(!c.settled(C));
        assert!(c.settled(C), "mended");
    }
}
