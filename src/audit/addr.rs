//! Client addresses on a shorter retention than the rest of the log, by crypto-shredding.
//!
//! A client address is needed to investigate a breach (seeds §13), not to answer a subject
//! access request, so it is kept for `audit.client_addr_retention` (default 90 days) while the
//! record around it stays for the whole retention period. Deleting bytes from the middle of a
//! hash-chained log would break the chain, so instead each address is written encrypted
//! (ChaCha20-Poly1305) under a key for its UTC day, kept in `AUDIT_DIR/addr-keys/DAY.key`.
//! When a day passes the address retention its key file is deleted: the ciphertext stays, the
//! chain still verifies, and the addresses can no longer be read by anyone.
//!
//! On disk an address reads `sealed:v1:DAY:HEX(nonce || ciphertext)`. The breach detector and
//! the live feed see the plain address (they read records in memory, before they are written);
//! `wardgate audit tail` shows it while its day's key exists.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const PREFIX: &str = "sealed:v1:";
const KEY_DIR: &str = "addr-keys";

/// Seals addresses for the writer; holds today's key.
pub struct Sealer {
    dir: PathBuf,
    keys: HashMap<String, LessSafeKey>,
}

impl Sealer {
    pub fn new(audit_dir: &Path) -> Sealer {
        Sealer {
            dir: audit_dir.join(KEY_DIR),
            keys: HashMap::new(),
        }
    }

    /// Reads (or creates) `day`'s key now: at open, so that a key folder the gateway cannot
    /// write, or a damaged key, stops the start rather than every request after it.
    pub fn ready(&mut self, day: &str) -> std::io::Result<()> {
        self.key(day).map(drop)
    }

    fn key(&mut self, day: &str) -> std::io::Result<&LessSafeKey> {
        if !self.keys.contains_key(day) {
            let key = load_or_create(&self.dir, day)?;
            // One day's key at a time is enough for a writer that moves forward in time.
            self.keys.clear();
            self.keys.insert(day.to_owned(), key);
        }
        self.keys
            .get(day)
            .ok_or_else(|| std::io::Error::other("address key vanished"))
    }

    /// `addr` encrypted under the key of `day` (`YYYY-MM-DD`), creating that key if needed.
    pub fn seal(&mut self, addr: &str, day: &str) -> std::io::Result<String> {
        let key = self.key(day)?;
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buf = addr.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(day.as_bytes()),
            &mut buf,
        )
        .map_err(|_| std::io::Error::other("cannot seal a client address"))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{PREFIX}{day}:{}", hex::encode(out)))
    }
}

/// The plain address of a sealed one, while its day's key exists; plain text passes through.
pub fn reveal(audit_dir: &Path, stored: &str) -> Option<String> {
    Revealer::new(audit_dir).reveal(stored)
}

/// What to show for a sealed address `reveal` could not open: `<shredded>` only where its
/// day's key is gone; where the key is there but cannot be read (another account's, as the
/// log-shipping group reading the segments would be) or does not open it (damaged, or a
/// stored value altered), says so, so that nobody investigating takes a readable day's
/// addresses for destroyed.
pub fn unrevealed(audit_dir: &Path, stored: &str) -> String {
    let day = (stored.strip_prefix(PREFIX))
        .and_then(|rest| rest.split_once(':'))
        .map(|(day, _)| day);
    let Some(path) = day.and_then(|day| key_path(&audit_dir.join(KEY_DIR), day)) else {
        return "<unreadable: not a sealed address>".to_owned();
    };
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "<shredded>".to_owned(),
        Err(e) => format!("<key unreadable: {e}>"),
        Ok(_) => "<key does not open it: damaged key or address>".to_owned(),
    }
}

/// `reveal` for many addresses (breach detection reading back the log at start): each day's
/// key file is read once, not once an address.
pub struct Revealer {
    dir: PathBuf,
    /// By day; `None` for a day whose key is gone (shredded) or unreadable.
    keys: HashMap<String, Option<LessSafeKey>>,
}

impl Revealer {
    pub fn new(audit_dir: &Path) -> Revealer {
        Revealer {
            dir: audit_dir.join(KEY_DIR),
            keys: HashMap::new(),
        }
    }

    /// The plain address of a sealed one, while its day's key exists; plain text passes
    /// through.
    pub fn reveal(&mut self, stored: &str) -> Option<String> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Some(stored.to_owned());
        };
        let (day, hexed) = rest.split_once(':')?;
        if !self.keys.contains_key(day) {
            let key = key_path(&self.dir, day)
                .and_then(|path| std::fs::read(path).ok())
                .and_then(|raw| UnboundKey::new(&CHACHA20_POLY1305, &raw).ok())
                .map(LessSafeKey::new);
            self.keys.insert(day.to_owned(), key);
        }
        let key = self.keys.get(day)?.as_ref()?;
        let bytes = hex::decode(hexed).ok()?;
        let (nonce, sealed) = bytes.split_at_checked(NONCE_LEN)?;
        let mut sealed = sealed.to_vec();
        let plain = key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(day.as_bytes()),
                &mut sealed,
            )
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

/// The days whose address keys are older than `keep_from` (`YYYY-MM-DD`), oldest first: what
/// `shred_days` would remove.
pub fn shreddable(audit_dir: &Path, keep_from: &str) -> std::io::Result<Vec<String>> {
    let dir = audit_dir.join(KEY_DIR);
    let mut days = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(days),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(day) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".key"))
            .filter(|d| valid_day(d))
        else {
            continue;
        };
        if day < keep_from {
            days.push(day.to_owned());
        }
    }
    days.sort();
    Ok(days)
}

/// Removes the address keys of `days` (those already gone are fine), durably: every address
/// sealed under them is unreadable from then on.
pub fn shred_days(audit_dir: &Path, days: &[String]) -> std::io::Result<()> {
    let dir = audit_dir.join(KEY_DIR);
    for day in days {
        if let Some(p) = key_path(&dir, day) {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    if !days.is_empty() {
        std::fs::File::open(&dir)?.sync_all()?;
    }
    Ok(())
}

/// Shreds the keys of days older than `keep_from`: the days shredded.
pub fn shred(audit_dir: &Path, keep_from: &str) -> std::io::Result<Vec<String>> {
    let days = shreddable(audit_dir, keep_from)?;
    shred_days(audit_dir, &days)?;
    Ok(days)
}

fn valid_day(d: &str) -> bool {
    d.len() == 10
        && d.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

fn key_path(dir: &Path, day: &str) -> Option<PathBuf> {
    valid_day(day).then(|| dir.join(format!("{day}.key")))
}

fn load_or_create(dir: &Path, day: &str) -> std::io::Result<LessSafeKey> {
    let path = key_path(dir, day).ok_or_else(|| std::io::Error::other("bad day"))?;
    let raw = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The new directory's own entry, in the log's directory, is synced too: else a
            // power cut could take the directory, and the key, with it.
            super::segment::create_dir_synced(dir)?;
            let raw: [u8; 32] = rand::random();
            let tmp = dir.join(format!(".{day}.key.tmp"));
            // The owner's alone, whatever the process's umask: it unseals a day's addresses.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&raw)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            raw.to_vec()
        }
        Err(e) => return Err(e),
    };
    UnboundKey::new(&CHACHA20_POLY1305, &raw)
        .map(LessSafeKey::new)
        .map_err(|_| std::io::Error::other(format!("`{}` is not a key", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_addresses_read_back_until_their_day_is_shredded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sealer::new(dir.path());
        let a = s.seal("192.0.2.7", "2026-01-01").unwrap();
        let b = s.seal("192.0.2.7", "2026-01-02").unwrap();
        assert!(a.starts_with("sealed:v1:2026-01-01:") && !a.contains("192.0.2.7"));
        // Fresh nonce each time: the same address does not give the same text.
        assert_ne!(s.seal("192.0.2.7", "2026-01-02").unwrap(), b);
        assert_eq!(reveal(dir.path(), &a).as_deref(), Some("192.0.2.7"));
        assert_eq!(reveal(dir.path(), "10.0.0.1").as_deref(), Some("10.0.0.1"));
        // A different day's key, or a changed byte, does not open it.
        let moved = a.replace("2026-01-01", "2026-01-02");
        assert_eq!(reveal(dir.path(), &moved), None);
        assert_eq!(shred(dir.path(), "2026-01-02").unwrap(), vec!["2026-01-01"]);
        assert_eq!(reveal(dir.path(), &a), None);
        assert_eq!(reveal(dir.path(), &b).as_deref(), Some("192.0.2.7"));
        assert!(shred(dir.path(), "2026-01-02").unwrap().is_empty());
        // A writer restarted the same day reuses that day's key.
        let mut again = Sealer::new(dir.path());
        let c = again.seal("198.51.100.1", "2026-01-02").unwrap();
        assert_eq!(reveal(dir.path(), &c).as_deref(), Some("198.51.100.1"));
    }

    /// An address that cannot be opened shows as shredded only when its day's key is gone:
    /// a key there that cannot be read, or that does not open it, says so instead.
    #[test]
    fn only_a_gone_key_shows_as_shredded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sealer::new(dir.path());
        let a = s.seal("192.0.2.7", "2026-01-01").unwrap();
        let key = dir.path().join(KEY_DIR).join("2026-01-01.key");
        let raw = std::fs::read(&key).unwrap();
        // Damaged: not a key.
        std::fs::write(&key, b"short").unwrap();
        assert_eq!(reveal(dir.path(), &a), None);
        assert!(unrevealed(dir.path(), &a).contains("does not open"));
        // Unreadable (a directory where the file was: the test runs as root, whom a mode
        // would not stop).
        std::fs::remove_file(&key).unwrap();
        std::fs::create_dir(&key).unwrap();
        assert!(unrevealed(dir.path(), &a).starts_with("<key unreadable: "));
        // Gone: shredded.
        std::fs::remove_dir(&key).unwrap();
        assert_eq!(unrevealed(dir.path(), &a), "<shredded>");
        // Back, it opens again.
        std::fs::write(&key, raw).unwrap();
        assert_eq!(reveal(dir.path(), &a).as_deref(), Some("192.0.2.7"));
    }
}
