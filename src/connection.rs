//! One accepted connection's life after its handshake: which requests are under way on it,
//! and when it is closed gracefully (hyper's `graceful_shutdown`: no new requests, those
//! under way finish, then it closes): at the server's shutdown, or, for HTTP/2, once it has
//! carried no request for the idle bound.
//!
//! hyper bounds an idle HTTP/1 connection (its header timeout covers the wait for the next
//! request, and is left to do so) but not an HTTP/2 one: past its preface, one stays open
//! while its peer answers keep-alive pings, idle or with a request's headers unfinished, and
//! would hold one of the listener's `max_connections` for ever. A request is under way from
//! the moment its headers are read until its response body's last frame has been handed to
//! hyper, or the body dropped (a streamed export counts throughout); an answer's bytes going
//! to the client count as activity too (`server::FirstBytes`). An HTTP/2 connection closed
//! for idleness that has not ended one more bound later (a peer that stops reading) is
//! dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

/// The requests under way on one connection, and when it last had none.
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    /// A request has begun on it.
    served: AtomicBool,
    /// It began with HTTP/2's connection preface (`mark_http2`).
    http2: AtomicBool,
    /// When a request last began or ended, or an answer's bytes last went to the client
    /// (`server::FirstBytes`), in milliseconds since `start`.
    last: AtomicU64,
    start: Instant,
    /// The request id of the problem document written in place of hyper's bare answer to a
    /// head it could not read (`server::FirstBytes`), for the server log's line.
    refused: std::sync::OnceLock<String>,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            last: AtomicU64::new(0),
            start: Instant::now(),
            refused: std::sync::OnceLock::new(),
        })
    }

    /// A head on it could not be read, and was answered under `request_id`.
    pub(crate) fn refused(&self, request_id: String) {
        let _ = self.refused.set(request_id);
    }

    pub(crate) fn refusal(&self) -> Option<&str> {
        self.refused.get().map(String::as_str)
    }

    /// Notes now as the last time it was busy (a request ended, its TLS handshake did, or an
    /// answer's bytes went to the client).
    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// A request begins: under way until the guard is dropped (which notes the time: while
    /// it is under way the connection is not idle whatever `last` says).
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Whether a request has begun on it: a timeout after one is an idle kept-alive
    /// connection closed, not a client that never finished its headers.
    pub(crate) fn served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
    }

    /// The connection began with HTTP/2's preface: it is closed when idle.
    pub(crate) fn mark_http2(&self) {
        self.http2.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// Resolves once the connection, known to be HTTP/2, has had no request under way for
    /// `idle`. (One not known to be HTTP/2 is left to hyper's own header timeout.)
    async fn idle_for(&self, idle: Duration) {
        loop {
            let wait = if !self.is_http2() || self.in_flight.load(Ordering::Relaxed) > 0 {
                idle
            } else {
                let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
                let quiet = self.start.elapsed().saturating_sub(last);
                match idle.checked_sub(quiet) {
                    Some(left) if !left.is_zero() => left,
                    _ => return,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One request under way; it ends when this is dropped.
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The time first: `idle_for` must never see none under way with the time before.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request under way until its last frame has been handed to
/// hyper (or it is dropped). Not until that frame has been sent: an HTTP/2 client may keep
/// its window shut and never take it, and a connection whose every response is written but
/// not taken is idle, closed and then dropped (`drive`), not held for ever by a client with
/// no token. A slow client still taking a large last frame is not idle: the answer's bytes
/// going to it (HTTP/2 `DATA` frames written) count as activity (`server::FirstBytes`).
pub(crate) struct Tracked<B> {
    inner: B,
    request: Option<InFlight>,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, request: InFlight) -> Self {
        Tracked {
            inner,
            request: Some(request),
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None | Some(Err(_))) => this.request = None,
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.request = None,
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Drives `conn` to its end, closing it gracefully (`close`) when `stop` turns true (or its
/// sender is gone), or when, HTTP/2, it has carried no request for `idle`: then, once it has
/// again had none under way for a whole `idle` (a request whose headers crossed the GOAWAY is
/// still served, however long), it is dropped. (After `stop` the server's grace period
/// bounds it.) `None`: dropped so.
pub(crate) async fn drive<C, E>(
    conn: C,
    close: impl Fn(Pin<&mut C>),
    mut stop: watch::Receiver<bool>,
    activity: &Activity,
    idle: Duration,
) -> Option<Result<(), E>>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    let mut closed_idle = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => return Some(done),
            _ = stop.wait_for(|stopped| *stopped), if !closing => {
                close(conn.as_mut());
                closing = true;
            }
            () = activity.idle_for(idle), if !closing => {
                tracing::debug!("closing an HTTP/2 connection idle for {idle:?}");
                close(conn.as_mut());
                closing = true;
                closed_idle = true;
                // The bound runs again from the close.
                activity.touch();
            }
            () = activity.idle_for(idle), if closed_idle => {
                tracing::debug!("dropping an idle HTTP/2 connection that did not close");
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const IDLE: Duration = Duration::from_secs(30);

    /// (The clock is tokio's, paused: it moves only when every task waits.)
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_request_under_way_for_the_whole_bound() {
        let activity = Activity::new();
        activity.mark_http2();
        let started = Instant::now();
        activity.idle_for(IDLE).await;
        assert_eq!(started.elapsed(), IDLE);

        // A request under way, however long, is not idleness.
        let request = activity.begin();
        let waited = tokio::time::timeout(IDLE * 10, activity.idle_for(IDLE)).await;
        assert!(waited.is_err(), "idle with a request under way");
        // Once it ends, the whole bound runs again from then.
        drop(request);
        let ended = Instant::now();
        activity.idle_for(IDLE).await;
        assert_eq!(ended.elapsed(), IDLE);
    }

    /// A response body keeps its request under way until its last frame is handed on (a
    /// streamed export outlives its handler), or until it is dropped unsent.
    #[tokio::test(start_paused = true)]
    async fn a_request_is_under_way_until_its_body_is_sent_or_dropped() {
        let activity = Activity::new();
        activity.mark_http2();
        let body = Tracked::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"records")),
            activity.begin(),
        );
        let waited = tokio::time::timeout(IDLE * 2, activity.idle_for(IDLE)).await;
        assert!(waited.is_err(), "idle before the body was sent");
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], b"records");
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);

        // Its one frame handed on, a whole answer no longer holds the connection busy, though
        // the client never takes it (an HTTP/2 window kept shut): nothing polls it again.
        let mut whole = Tracked::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"401")),
            activity.begin(),
        );
        assert!(whole.frame().await.unwrap().is_ok());
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
        // A stream's frames before its last do.
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, std::convert::Infallible>>(2);
        let mut streamed = Tracked::new(
            http_body_util::StreamBody::new(Box::pin(futures_util::stream::unfold(
                rx,
                |mut rx| async { rx.recv().await.map(|f| (f, rx)) },
            ))),
            activity.begin(),
        );
        tx.send(Ok(Frame::data(bytes::Bytes::from_static(b"chunk"))))
            .await
            .unwrap();
        assert!(streamed.frame().await.unwrap().is_ok());
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 1);
        drop(tx);
        assert!(streamed.frame().await.is_none());
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);

        let unsent = Tracked::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
            activity.begin(),
        );
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 1);
        drop(unsent);
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
    }

    /// Drives a stand-in connection (it ends once closed, as hyper's graceful shutdown ends
    /// an idle one), stopping it after `stop_after` if given: how many times it was closed,
    /// and when it ended.
    async fn driven(activity: &Activity, stop_after: Option<Duration>) -> (usize, Duration) {
        use std::sync::atomic::AtomicUsize;
        let closes = AtomicUsize::new(0);
        let (stop, stopping) = watch::channel(false);
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
        let ended_tx = std::sync::Mutex::new(Some(ended_tx));
        let conn = async move {
            let _ = ended_rx.await;
            Ok::<(), ()>(())
        };
        let close = |_: Pin<&mut _>| {
            closes.fetch_add(1, Ordering::Relaxed);
            if let Some(tx) = ended_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
        };
        let started = Instant::now();
        let stopper = async {
            if let Some(after) = stop_after {
                tokio::time::sleep(after).await;
                let _ = stop.send(true);
            }
        };
        let (done, ()) = tokio::join!(drive(conn, close, stopping, activity, IDLE), stopper);
        assert_eq!(done, Some(Ok(())));
        (closes.load(Ordering::Relaxed), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn drive_closes_an_idle_http2_connection_once_after_the_bound() {
        let activity = Activity::new();
        activity.mark_http2();
        assert_eq!(driven(&activity, None).await, (1, IDLE));
    }

    /// HTTP/1's idle time is hyper's header timeout's to bound, not this.
    #[tokio::test(start_paused = true)]
    async fn drive_leaves_an_idle_http1_connection_to_hyper() {
        assert_eq!(
            driven(&Activity::new(), Some(IDLE * 5)).await,
            (1, IDLE * 5)
        );
    }

    /// An HTTP/2 connection closed for idleness that does not end (its peer stops reading)
    /// is dropped one bound later.
    #[tokio::test(start_paused = true)]
    async fn an_idle_http2_connection_that_does_not_close_is_dropped() {
        let activity = Activity::new();
        activity.mark_http2();
        let (_stop, stopping) = watch::channel(false);
        let never = std::future::pending::<Result<(), ()>>();
        let started = Instant::now();
        let done =
            tokio::time::timeout(IDLE * 10, drive(never, |_| {}, stopping, &activity, IDLE)).await;
        assert_eq!(done, Ok(None), "not dropped");
        assert_eq!(started.elapsed(), IDLE * 2);
    }

    /// A request accepted after the idle close (its headers crossed the GOAWAY) is served to
    /// its end, however long: the connection is dropped only a whole bound after it ends.
    #[tokio::test(start_paused = true)]
    async fn a_request_under_way_after_an_idle_close_is_not_cut() {
        let activity = Activity::new();
        activity.mark_http2();
        let (_stop, stopping) = watch::channel(false);
        let never = std::future::pending::<Result<(), ()>>();
        let started = Instant::now();
        let late = async {
            tokio::time::sleep(IDLE + Duration::from_millis(1)).await;
            let request = activity.begin();
            tokio::time::sleep(IDLE * 5).await;
            drop(request);
        };
        let (done, ()) = tokio::join!(
            tokio::time::timeout(IDLE * 20, drive(never, |_| {}, stopping, &activity, IDLE)),
            late
        );
        assert_eq!(done, Ok(None), "not dropped");
        assert_eq!(
            started.elapsed(),
            IDLE + Duration::from_millis(1) + IDLE * 5 + IDLE
        );
    }

    /// A connection with a request under way is not idle, and closes when told to stop.
    #[tokio::test(start_paused = true)]
    async fn drive_closes_a_busy_connection_once_at_stop() {
        let activity = Activity::new();
        activity.mark_http2();
        let _request = activity.begin();
        assert_eq!(driven(&activity, Some(IDLE * 3)).await, (1, IDLE * 3));
    }
}
