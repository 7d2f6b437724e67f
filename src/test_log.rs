//! What the server log was given while a test ran: a `tracing` subscriber writing to memory,
//! the default on this thread while its guard lives (a current-thread runtime runs the
//! gateway's tasks there too). For tests that check what reaches the log, and what must not.

use std::sync::{Arc, Mutex};

/// The log's text so far.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub(crate) fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut held = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A second dispatcher alive for the whole run, which takes nothing. With one alone (a
/// capture), `tracing` asks only the registering thread's default whether a log line is
/// wanted, and caches the answer for every thread: a line first reached by a test on
/// another thread, without a capture, would be cached as unwanted, and missing from the
/// capture. With two, it asks both.
pub(crate) fn keep_callsites_open() {
    static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

/// Captures this thread's log until the guard is dropped.
pub(crate) fn capture() -> (tracing::subscriber::DefaultGuard, Captured) {
    keep_callsites_open();
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (tracing::subscriber::set_default(subscriber), logs)
}

#[cfg(test)]
mod tests {
    /// One log line, for two threads to reach.
    fn say() {
        tracing::warn!("a line reached from two threads");
    }

    /// A log line reached first on a thread without a capture is still captured on the
    /// thread with one (it was cached as unwanted for every thread: `keep_callsites_open`).
    #[test]
    fn a_line_first_reached_on_another_thread_is_captured() {
        let (guard, logs) = super::capture();
        std::thread::spawn(say).join().unwrap();
        say();
        drop(guard);
        assert!(
            logs.text().contains("a line reached from two threads"),
            "{}",
            logs.text()
        );
    }
}
