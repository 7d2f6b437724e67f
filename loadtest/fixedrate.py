#!/usr/bin/env python3
"""Open-loop, fixed-rate HTTP/1.1 load generator (Debian packages no wrk2).

Requests are scheduled at fixed instants (start + i / rate) regardless of how fast answers come
back, and each latency is measured from the request's *scheduled* instant (as wrk2 does, so a
stalled server cannot hide its stall by slowing the generator down: no coordinated omission)
and also from the instant it was actually written. Keep-alive connections, at most one request
in flight per connection, no pipelining; a request whose instant has come while every
connection is busy waits in a queue, and that wait counts in its scheduled latency.

Bounded in count and time: exactly round(rate * (warmup + duration)) requests are scheduled,
and the run ends at warmup + duration + grace seconds whatever happens; answers still missing
then are counted as unfinished. Only loopback targets are accepted.

Limits (measured and reported in the output, see README): the event loop (uvloop if installed,
else asyncio) wakes on a millisecond timer,
so sends go out in small bursts up to ~1 ms after their instant (`send_lag_us`); one Python
process tops out at roughly 10-20k requests/s of small responses on one core, less for large
bodies; only `Content-Length` framed responses are understood (no chunked encoding).

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from urllib.parse import urlsplit


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    n = len(v)

    def p(q: float) -> float:
        return v[min(n - 1, max(0, int(round(q / 100.0 * n + 0.5)) - 1))]

    return {
        "p50": p(50),
        "p90": p(90),
        "p99": p(99),
        "p999": p(99.9),
        "max": v[-1],
        "mean": sum(v) / n,
    }


class Gen:
    def __init__(self, args: argparse.Namespace) -> None:
        url = urlsplit(args.url)
        if url.scheme != "http" or not url.hostname:
            sys.exit("fixedrate: only http://HOST:PORT/... URLs")
        if not ipaddress.ip_address(socket.gethostbyname(url.hostname)).is_loopback:
            sys.exit("fixedrate: refusing a non-loopback target")
        self.host = url.hostname
        self.port = url.port or 80
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        head = [f"GET {path} HTTP/1.1", f"Host: {url.netloc}"]
        for h in args.header:
            head.append(h)
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode()
        self.rate = args.rate
        self.warmup = args.warmup
        self.duration = args.duration
        self.total = int(round(args.rate * (args.warmup + args.duration)))
        self.conns_wanted = args.connections
        self.grace = args.grace
        self.idle: list[Conn] = []
        self.queue: list[float] = []  # scheduled instants not yet sent (a FIFO, drained in order)
        self.qhead = 0
        self.t0 = 0.0
        self.measure_from = 0.0
        # per measured request: (scheduled, sent, done)
        self.sched_lat: list[float] = []
        self.send_lat: list[float] = []
        self.send_lag: list[float] = []
        self.completed = 0
        self.completed_measured = 0
        self.sent = 0
        self.non2xx = 0
        self.errors = 0
        self.bytes = 0
        self.all_done: asyncio.Future[None] | None = None

    def dispatch(self, now: float) -> None:
        q = self.queue
        while self.qhead < len(q) and self.idle:
            conn = self.idle.pop()
            if conn.closed:
                continue
            sched = q[self.qhead]
            self.qhead += 1
            conn.send(sched, now)
            self.sent += 1
        if self.qhead > 4096 and self.qhead * 2 > len(q):
            del q[: self.qhead]
            self.qhead = 0

    def finished(self, conn: "Conn", status: int, nbytes: int, sched: float, sent: float) -> None:
        now = time.perf_counter()
        self.completed += 1
        self.bytes += nbytes
        if not 200 <= status < 300:
            self.non2xx += 1
        if sched >= self.measure_from:
            self.completed_measured += 1
            self.sched_lat.append((now - sched) * 1e6)
            self.send_lat.append((now - sent) * 1e6)
            self.send_lag.append((sent - sched) * 1e6)
        self.idle.append(conn)
        self.dispatch(now)
        if self.completed + self.errors >= self.total and self.all_done and not self.all_done.done():
            self.all_done.set_result(None)

    def failed(self, conn: "Conn") -> None:
        self.errors += 1
        if self.completed + self.errors >= self.total and self.all_done and not self.all_done.done():
            self.all_done.set_result(None)

    async def run(self) -> dict:
        loop = asyncio.get_running_loop()
        self.all_done = loop.create_future()
        conns = []
        for _ in range(self.conns_wanted):
            _, c = await loop.create_connection(lambda: Conn(self), self.host, self.port)
            conns.append(c)
            self.idle.append(c)
        interval = 1.0 / self.rate
        self.t0 = time.perf_counter() + 0.05
        self.measure_from = self.t0 + self.warmup
        deadline = self.t0 + self.warmup + self.duration + self.grace
        i = 0
        while i < self.total:
            now = time.perf_counter()
            if now > deadline:
                break
            while i < self.total and self.t0 + i * interval <= now:
                self.queue.append(self.t0 + i * interval)
                i += 1
            self.dispatch(now)
            if i < self.total:
                delay = self.t0 + i * interval - time.perf_counter()
                await asyncio.sleep(max(0.0, delay))
        try:
            await asyncio.wait_for(
                asyncio.shield(self.all_done), timeout=max(0.0, deadline - time.perf_counter())
            )
        except asyncio.TimeoutError:
            pass
        for c in conns:
            c.close()
        measured_total = int(round(self.rate * self.duration))
        return {
            "target_rate": self.rate,
            "warmup_s": self.warmup,
            "duration_s": self.duration,
            "connections": self.conns_wanted,
            "scheduled": self.total,
            "sent": self.sent,
            "completed": self.completed,
            "completed_measured": self.completed_measured,
            "measured_scheduled": measured_total,
            "unfinished": self.total - self.completed - self.errors,
            "achieved_rate": self.completed_measured / self.duration,
            "non2xx": self.non2xx,
            "errors": self.errors,
            "bytes": self.bytes,
            "latency_us": percentiles(self.sched_lat),
            "service_latency_us": percentiles(self.send_lat),
            "send_lag_us": percentiles(self.send_lag),
        }


class Conn(asyncio.Protocol):
    def __init__(self, gen: Gen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1
        self.remaining = 0
        self.status = 0
        self.sched = 0.0
        self.sent = 0.0
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, sched: float, now: float) -> None:
        self.sched = sched
        self.sent = time.perf_counter()
        self.busy = True
        assert self.transport is not None
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        # Only the head is kept; the body is counted, not stored (pages can be ~1 MB).
        if self.need < 0:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                sys.exit("fixedrate: response without Content-Length (chunked is not supported)")
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)].strip())
            self.need = end + 4 + length
            self.remaining = self.need - len(self.buf)
            self.buf.clear()
        else:
            self.remaining -= len(data)
        if self.remaining <= 0:
            nbytes = self.need
            self.need = -1
            self.busy = False
            self.gen.finished(self, self.status, nbytes, self.sched, self.sent)

    def connection_lost(self, exc: Exception | None) -> None:
        was_busy = self.busy
        self.closed = True
        self.busy = False
        if was_busy:
            self.gen.failed(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds at the same rate, not measured")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--grace", type=float, default=5.0, help="seconds to wait for stragglers")
    ap.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    args = ap.parse_args()
    if not 0 < args.rate <= 200_000 or not 0 < args.duration <= 600 or not 0 < args.connections <= 4096:
        sys.exit("fixedrate: rate, duration or connections out of bounds")
    gen = Gen(args)
    try:
        import uvloop  # optional: run.sh installs it; about halves the generator's own CPU per request

        result = uvloop.run(gen.run())
        result["event_loop"] = "uvloop " + uvloop.__version__
    except ImportError:
        result = asyncio.run(gen.run())
        result["event_loop"] = "asyncio"
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
