//! Open-loop, fixed-rate HTTP/1.1 load generator for the load test (issue 7), compiled because
//! Debian packages no `wrk2` and a Python generator cost tens to hundreds of microseconds of CPU
//! per request and woke on a millisecond timer.
//!
//! Requests are scheduled at fixed instants (`start + i / rate`) regardless of how fast answers
//! come back, and each latency is measured from the request's *scheduled* instant (as wrk2 does:
//! a stalled server cannot hide its stall by slowing the generator down, no coordinated
//! omission) and also from the instant it was actually written. Keep-alive connections, at most
//! one request in flight per connection, no pipelining; a request whose instant has come while
//! every connection is busy waits in a queue, and that wait counts in its scheduled latency.
//!
//! Two threads: the *scheduler* sleeps until each instant (`nanosleep`, so tens of
//! microseconds late rather than a millisecond) and sends on an idle connection; the *reader*
//! waits on every connection with epoll (mio), frames the answers by `Content-Length`, records
//! the latencies and hands the freed connection the oldest queued request at once.
//!
//! Bounded in count and time: exactly `round(rate * (warmup + duration))` requests are
//! scheduled, and the run ends at `warmup + duration + grace` seconds whatever happens; answers
//! still missing then are counted as unfinished. Only loopback targets are accepted; only
//! `Content-Length` framed answers are understood (no chunked encoding).
//!
//! Prints one JSON object on stdout (the fields `loadtest/harness.py` reads):
//! `cargo run --release --example fixedrate -- --url http://127.0.0.1:8080/x --rate 1000`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

#[derive(Parser, Debug, Clone)]
#[command(about = "Open-loop, fixed-rate HTTP/1.1 load generator (loopback only)")]
struct Args {
    /// http://HOST:PORT/PATH on a loopback address.
    #[arg(long)]
    url: String,
    /// Requests per second.
    #[arg(long)]
    rate: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds at the same rate before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Keep-alive connections (each carries at most one request at a time).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to wait for stragglers after the last instant.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// `Name: value`, repeatable.
    #[arg(long)]
    header: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let result = run(&args)?;
    println!("{result}");
    Ok(())
}

/// Where to connect and the bytes of the one request sent over and over.
struct Target {
    addr: SocketAddr,
    request: Vec<u8>,
}

fn target(args: &Args) -> anyhow::Result<Target> {
    let Some(rest) = args.url.strip_prefix("http://") else {
        bail!(
            "fixedrate: only http://HOST:PORT/... URLs, not {}",
            args.url
        );
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .with_context(|| format!("fixedrate: cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("fixedrate: {authority} has no address"))?;
    if !addr.ip().is_loopback() {
        bail!("fixedrate: refusing a non-loopback target ({addr})");
    }
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\n");
    for h in &args.header {
        if h.contains(['\r', '\n']) || !h.contains(':') {
            bail!("fixedrate: a header is `Name: value` on one line, not {h:?}");
        }
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Ok(Target {
        addr,
        request: head.into_bytes(),
    })
}

/// What one connection is doing, as both threads see it.
#[derive(Clone, Copy)]
struct Slot {
    /// The scheduled and the actual send instant of the request in flight, if any.
    in_flight: Option<(Instant, Instant)>,
    closed: bool,
}

/// The state both threads share, behind one lock.
struct Shared {
    slots: Vec<Slot>,
    idle: Vec<usize>,
    /// Scheduled instants whose time has come and that no connection was free to carry yet.
    queue: VecDeque<Instant>,
    measure_from: Instant,
    sent: u64,
    completed: u64,
    completed_measured: u64,
    non2xx: u64,
    errors: u64,
    bytes: u64,
    /// Per measured request, microseconds: scheduled→done, sent→done, scheduled→sent.
    sched_lat: Vec<f64>,
    send_lat: Vec<f64>,
    send_lag: Vec<f64>,
}

impl Shared {
    /// Sends queued requests on idle connections, oldest first, for as long as both last.
    fn dispatch(&mut self, streams: &[TcpStream], request: &[u8]) {
        while !self.queue.is_empty() {
            let Some(i) = self.idle.pop() else { return };
            if self.slots[i].closed {
                continue;
            }
            let Some(sched) = self.queue.pop_front() else {
                return;
            };
            self.slots[i].in_flight = Some((sched, Instant::now()));
            self.sent += 1;
            if write_all(&streams[i], request).is_err() {
                self.slots[i] = Slot {
                    in_flight: None,
                    closed: true,
                };
                self.errors += 1;
            }
        }
    }

    fn finished(&mut self, i: usize, status: u16, nbytes: u64, now: Instant) {
        let Some((sched, sent)) = self.slots[i].in_flight.take() else {
            // An answer nobody asked for: the connection is out of step, stop using it.
            self.slots[i].closed = true;
            self.errors += 1;
            return;
        };
        self.completed += 1;
        self.bytes += nbytes;
        if !(200..300).contains(&status) {
            self.non2xx += 1;
        }
        if sched >= self.measure_from {
            self.completed_measured += 1;
            self.sched_lat.push(micros(now - sched));
            self.send_lat.push(micros(now - sent));
            self.send_lag
                .push(micros(sent.saturating_duration_since(sched)));
        }
        self.idle.push(i);
    }

    fn failed(&mut self, i: usize) {
        if self.slots[i].in_flight.take().is_some() {
            self.errors += 1;
        }
        self.slots[i].closed = true;
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Writes the whole request on a non-blocking socket. Its send buffer is empty (one request in
/// flight at most), so a short write is all but impossible; it is waited out if it happens.
fn write_all(mut stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::yield_now(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A poisoned lock means the other thread panicked; its figures are still the best we have.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reading one answer: its head is gathered until the blank line, the body only counted.
#[derive(Debug, Default)]
struct Framer {
    head: Vec<u8>,
    /// Status and total length (head and body) once the head is complete.
    answer: Option<(u16, u64)>,
    seen: u64,
}

/// What a chunk of bytes did to the answer being read.
#[derive(Debug, PartialEq)]
enum Framed {
    More,
    /// The answer is complete: status, bytes in all.
    Done(u16, u64),
}

impl Framer {
    fn feed(&mut self, data: &[u8]) -> Result<Framed, String> {
        if self.answer.is_none() {
            let before = self.head.len();
            self.head.extend_from_slice(data);
            let from = before.saturating_sub(3);
            let Some(end) = self.head[from..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| from + p + 4)
            else {
                if self.head.len() > 64 * 1024 {
                    return Err("an answer's head is over 64 KiB".into());
                }
                return Ok(Framed::More);
            };
            let (status, length) = parse_head(&self.head[..end])?;
            self.answer = Some((status, end as u64 + length));
            self.seen = end as u64;
            let rest = (self.head.len() - end) as u64;
            self.head.clear();
            return self.count(rest);
        }
        self.count(data.len() as u64)
    }

    fn count(&mut self, n: u64) -> Result<Framed, String> {
        self.seen += n;
        let Some((status, total)) = self.answer else {
            return Ok(Framed::More);
        };
        if self.seen < total {
            return Ok(Framed::More);
        }
        if self.seen > total {
            return Err(format!(
                "{} bytes past the end of an answer (nothing was asked for)",
                self.seen - total
            ));
        }
        self.answer = None;
        self.seen = 0;
        Ok(Framed::Done(status, total))
    }
}

/// Status and `Content-Length` of a response head (ending in the blank line).
fn parse_head(head: &[u8]) -> Result<(u16, u64), String> {
    let text = std::str::from_utf8(head).map_err(|_| "an answer's head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            return value
                .trim()
                .parse::<u64>()
                .map(|n| (status, n))
                .map_err(|_| format!("a Content-Length that is not a number: {value:?}"));
        }
    }
    Err("an answer without Content-Length (chunked encoding is not supported)".into())
}

/// Percentiles as `loadtest/harness.py` reads them (the nearest-rank method).
fn percentiles(values: &mut [f64]) -> serde_json::Value {
    if values.is_empty() {
        return json!({});
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    // The smallest value with at least q% of the values at or below it (the epsilon keeps
    // 99.9% of 1000 at rank 999 despite binary fractions).
    let p = |q: f64| {
        let rank = (q * n as f64 / 100.0 - 1e-9).ceil() as usize;
        values[rank.clamp(1, n) - 1]
    };
    json!({
        "p50": p(50.0),
        "p90": p(90.0),
        "p99": p(99.0),
        "p999": p(99.9),
        "max": values[n - 1],
        "mean": values.iter().sum::<f64>() / n as f64,
    })
}

fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
    // Written so that NaN is out of bounds too.
    let within = |x: f64, lo: f64, hi: f64| x >= lo && x <= hi;
    if !within(args.rate, 1e-3, 200_000.0)
        || !within(args.duration, 1e-3, 600.0)
        || !within(args.warmup, 0.0, 600.0)
        || !within(args.grace, 0.0, 600.0)
        || !(1..=4096).contains(&args.connections)
    {
        bail!("fixedrate: rate, duration, warmup, grace or connections out of bounds");
    }
    let target = target(args)?;
    let total = (args.rate * (args.warmup + args.duration)).round() as u64;

    let poll = Poll::new().context("fixedrate: epoll")?;
    let mut streams = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let std = StdStream::connect(target.addr)
            .with_context(|| format!("fixedrate: connecting to {}", target.addr))?;
        std.set_nodelay(true)?;
        std.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)?;
        streams.push(stream);
    }
    let request = target.request;

    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let t0 = Instant::now() + Duration::from_millis(50);
    let measure_from = t0 + Duration::from_secs_f64(args.warmup);
    let last_instant = t0 + Duration::from_secs_f64(args.warmup + args.duration);
    let deadline = last_instant + Duration::from_secs_f64(args.grace);
    let measured_total = (args.rate * args.duration).round() as u64;
    let shared = Mutex::new(Shared {
        slots: vec![
            Slot {
                in_flight: None,
                closed: false
            };
            args.connections
        ],
        idle: (0..args.connections).rev().collect(),
        queue: VecDeque::new(),
        measure_from,
        sent: 0,
        completed: 0,
        completed_measured: 0,
        non2xx: 0,
        errors: 0,
        bytes: 0,
        sched_lat: Vec::with_capacity(measured_total as usize + 16),
        send_lat: Vec::with_capacity(measured_total as usize + 16),
        send_lag: Vec::with_capacity(measured_total as usize + 16),
    });
    let stop = AtomicBool::new(false);

    // The reader lives only as long as this scope: it borrows what the scheduler uses.
    let framing = thread::scope(|scope| -> anyhow::Result<Option<String>> {
        let reader = thread::Builder::new()
            .name("fixedrate-reader".into())
            .spawn_scoped(scope, || {
                read_answers(poll, &shared, &streams, &request, &stop)
            })?;
        schedule(&shared, &streams, &request, total, t0, interval, deadline);
        stop.store(true, Ordering::Relaxed);
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("fixedrate: the reader thread panicked"))
    })?;

    let mut s = lock(&shared);
    let unfinished = total.saturating_sub(s.completed + s.errors);
    let mut out = json!({
        "target_rate": args.rate,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "connections": args.connections,
        "scheduled": total,
        "sent": s.sent,
        "completed": s.completed,
        "completed_measured": s.completed_measured,
        "measured_scheduled": measured_total,
        "unfinished": unfinished,
        "achieved_rate": s.completed_measured as f64 / args.duration,
        "non2xx": s.non2xx,
        "errors": s.errors,
        "bytes": s.bytes,
        "latency_us": percentiles(&mut s.sched_lat),
        "service_latency_us": percentiles(&mut s.send_lat),
        "send_lag_us": percentiles(&mut s.send_lag),
        "generator": "loadtest/fixedrate.rs (scheduler thread with nanosleep, reader thread on epoll)",
    });
    if let Some(problem) = framing {
        out["framing_error"] = json!(problem);
    }
    Ok(out)
}

/// The scheduler: each instant in turn, slept to, queued and sent if a connection is free;
/// then the stragglers, until every request sent is answered or failed, or the deadline.
fn schedule(
    shared: &Mutex<Shared>,
    streams: &[TcpStream],
    request: &[u8],
    total: u64,
    t0: Instant,
    interval: Duration,
    deadline: Instant,
) {
    let mut scheduled = 0;
    while scheduled < total {
        let at = t0 + interval.mul_f64(scheduled as f64);
        let now = Instant::now();
        if now > deadline {
            break;
        }
        if at > now {
            thread::sleep(at - now);
        }
        let mut s = lock(shared);
        s.queue.push_back(at);
        s.dispatch(streams, request);
        scheduled += 1;
    }
    while Instant::now() < deadline {
        let s = lock(shared);
        if s.completed + s.errors >= scheduled {
            break;
        }
        drop(s);
        thread::sleep(Duration::from_millis(2));
    }
}

/// The reader thread: answers in, latencies recorded, freed connections handed the queue.
/// Returns the first framing problem seen, if any (its connection is dropped from the run).
fn read_answers(
    mut poll: Poll,
    shared: &Mutex<Shared>,
    streams: &[TcpStream],
    request: &[u8],
    stop: &AtomicBool,
) -> Option<String> {
    let mut events = Events::with_capacity(1024);
    let mut framers: Vec<Framer> = (0..streams.len()).map(|_| Framer::default()).collect();
    let mut buf = vec![0u8; 256 * 1024];
    let mut problem = None;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(20))) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            problem.get_or_insert_with(|| format!("epoll: {e}"));
            break;
        }
        for event in &events {
            let i = event.token().0;
            let Some(mut stream) = streams.get(i) else {
                continue;
            };
            // Edge-triggered: read until the socket is empty.
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        lock(shared).failed(i);
                        break;
                    }
                    Ok(n) => match framers[i].feed(&buf[..n]) {
                        Ok(Framed::More) => {}
                        Ok(Framed::Done(status, total)) => {
                            let now = Instant::now();
                            let mut s = lock(shared);
                            s.finished(i, status, total, now);
                            s.dispatch(streams, request);
                        }
                        Err(e) => {
                            problem.get_or_insert(e);
                            lock(shared).failed(i);
                            break;
                        }
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        lock(shared).failed(i);
                        break;
                    }
                }
            }
        }
    }
    problem
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn answer(status: u16, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn an_answer_is_framed_however_it_is_split() {
        let bytes = answer(200, "hello, world");
        for cut1 in 0..bytes.len() {
            for cut2 in cut1..bytes.len() {
                let mut f = Framer::default();
                let mut got = vec![];
                for part in [&bytes[..cut1], &bytes[cut1..cut2], &bytes[cut2..]] {
                    got.push(f.feed(part).expect("frames"));
                }
                let done: Vec<_> = got.iter().filter(|g| **g != Framed::More).collect();
                assert_eq!(
                    done,
                    [&Framed::Done(200, bytes.len() as u64)],
                    "{cut1} {cut2}"
                );
                assert_eq!(got.last(), Some(&Framed::Done(200, bytes.len() as u64)));
            }
        }
    }

    #[test]
    fn answers_follow_one_another_on_a_connection() {
        let mut f = Framer::default();
        let first = answer(404, "");
        assert_eq!(f.feed(&first), Ok(Framed::Done(404, first.len() as u64)));
        let second = answer(200, "ok");
        assert_eq!(f.feed(&second), Ok(Framed::Done(200, second.len() as u64)));
    }

    #[test]
    fn heads_it_cannot_frame_are_errors() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(Framer::default().feed(chunked).is_err());
        assert!(Framer::default().feed(b"SSH-2.0 hi\r\n\r\n").is_err());
        let bad_len = b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n";
        assert!(Framer::default().feed(bad_len).is_err());
        let mut extra = answer(200, "ok");
        extra.extend_from_slice(b"surplus");
        assert!(Framer::default().feed(&extra).is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let p = percentiles(&mut v);
        assert_eq!(p["p50"], 500.0);
        assert_eq!(p["p99"], 990.0);
        assert_eq!(p["p999"], 999.0);
        assert_eq!(p["max"], 1000.0);
        assert_eq!(p["mean"], 500.5);
        assert_eq!(percentiles(&mut []), json!({}));
    }

    #[test]
    fn only_loopback_http_targets_are_accepted() {
        let args = |url: &str| Args {
            url: url.into(),
            rate: 1.0,
            duration: 1.0,
            warmup: 0.0,
            connections: 1,
            grace: 1.0,
            header: vec![],
        };
        assert!(target(&args("https://127.0.0.1:1/")).is_err());
        assert!(target(&args("http://192.0.2.1:80/")).is_err());
        let t = target(&args("http://127.0.0.1:9/x?y=1")).expect("loopback");
        assert!(
            t.request
                .starts_with(b"GET /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n")
        );
        let mut bad = args("http://127.0.0.1:9/");
        bad.header = vec!["X-A: 1\r\nX-B: 2".into()];
        assert!(target(&bad).is_err());
    }

    /// A server that holds its first answer back: the requests scheduled meanwhile queue behind
    /// the single connection, and their latency must count that wait (measured from their
    /// scheduled instant), not just the time from their late send.
    #[test]
    fn a_stall_counts_in_the_latency_of_requests_scheduled_during_it() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stall = Duration::from_millis(300);
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 4096];
            let mut first = true;
            let mut pending = Vec::new();
            loop {
                let n = match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    pending.drain(..end + 4);
                    if first {
                        thread::sleep(stall);
                        first = false;
                    }
                    if conn.write_all(&answer(200, "{}")).is_err() {
                        return;
                    }
                }
            }
        });
        let args = Args {
            url: format!("http://127.0.0.1:{port}/"),
            rate: 100.0,
            duration: 1.0,
            warmup: 0.0,
            connections: 1,
            grace: 2.0,
            header: vec!["X-Test: stall".into()],
        };
        let out = run(&args).expect("runs");
        drop(server);
        assert_eq!(out["scheduled"], 100);
        assert_eq!(out["completed"], 100, "{out}");
        assert_eq!(out["errors"], 0);
        // The first request waited the whole stall; about 30 more were scheduled during it.
        let max = out["latency_us"]["max"].as_f64().expect("max");
        assert!(max >= micros(stall), "{out}");
        // About 30 of the 100 queued behind the stall, the k-th for (300 - 10k) ms; the 90th
        // percentile is among them, when measured from the schedule (or from when the request
        // was due to when it could be sent), but not when measured from the late send.
        let p90 = |key: &str| out[key]["p90"].as_f64().expect("p90");
        assert!(p90("latency_us") >= micros(stall) / 10.0, "{out}");
        assert!(p90("send_lag_us") >= micros(stall) / 10.0, "{out}");
    }
}
