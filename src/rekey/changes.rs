//! Noticing that the files `SIGHUP` reads again have changed, so that a renewed certificate, a
//! rotated key or a new policy pack is taken up without a signal (`server.file_check_interval`).
//!
//! Each check digests every file a reload reads, names and contents: the token key files, the
//! server's certificate and key, each `https://` datastore's TLS files, and the policy pack
//! with its schema and tests (a file added to the pack counts). A change is acted on once it
//! has held still from one check to the next, so that files put in place one by one (a
//! certificate, then its key) are read together rather than half-way. The files are then
//! read as a signal reads them, and each reload checks, records and refuses as it does for
//! a signal. A change refused is not read again until the files change again.

use std::sync::Arc;

use sha2::Digest as _;

use crate::gateway::Gateway;

/// A digest of every file a reload reads.
pub type Digest = [u8; 32];

/// Every file a reload reads, as it is now: a digest of each part (`None` where a file cannot
/// be read, which a reload then reports), in a fixed order.
pub async fn now(gw: &Arc<Gateway>) -> Digest {
    let gw = Arc::clone(gw);
    // File reads, the policy pack's hundreds of fixtures among them: off the async workers.
    tokio::task::spawn_blocking(move || digest(&gw))
        .await
        .unwrap_or_else(|e| {
            // A check that could not be made reads as a change: the reload it leads to says
            // what is wrong, if anything is.
            tracing::error!(error = %e, "checking the reloadable files failed");
            [0; 32]
        })
}

fn digest(gw: &Gateway) -> Digest {
    let mut all = sha2::Sha256::new();
    let mut part = |p: Option<Digest>| match p {
        Some(p) => {
            all.update([1]);
            all.update(p);
        }
        None => all.update([0]),
    };
    part(crate::startup::digest_files_named(&gw.verifier.key_files()));
    part(gw.server_cert.as_ref().and_then(|c| c.files_now()));
    for datastore in gw.upstreams.tls_files_now() {
        part(datastore);
    }
    part(gw.policy_source.digests().map(|d| d.all));
    all.finalize().into()
}

/// The files as last read, and a change seen at the last check that has yet to hold still.
#[derive(Debug, Default)]
pub struct Changes {
    read: Option<Digest>,
    seen: Option<Digest>,
}

impl Changes {
    /// The files were read (by a signal, or at start) as they were at `now`.
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
