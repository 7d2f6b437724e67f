#!/usr/bin/env python3
"""The load-test harness behind loadtest/run.sh (issue 7). Run through run.sh, which installs
nginx and wrk and builds wardgate first; this file only measures.

1. Synthetic data: starts `wardgate demo` briefly, asks its datastore (the upstream its config
   names) for pages of 10, 100 and 1,000 electors in the caller's scope, saves them as files.
2. Starts, on loopback only: nginx serving those files as the upstream (`/electors?per_page=N`
   answers with the N-record page), nginx `proxy_pass` in front of it (upstream keepalive), and
   `wardgate serve` in front of it with the demo's config (token, Cedar, filtering, audit with
   `durability = "fsync"`, then `"page-cache"`).
3. Per page size and target: wrk saturation run (after a warm-up) for requests/s and latency,
   CPU time per request of the server under test from /proc/PID/stat, in `--rounds` rounds
   that alternate the targets (medians; ratios to nginx per round); then a fixed-rate run at
   half of nginx proxy_pass's saturation rate (loadtest/fixedrate.rs, compiled) for latency.
   `--compare-bin` adds a second wardgate build as one more target per audit mode, for A/B
   comparisons.
4. Prints the table and writes JSON.

Core pinning: the server under test on core 1 (the upstream nginx itself when it is the target),
everything else (upstream nginx, wrk, the fixed-rate generator) on core 0.
Every process started here is stopped here (by its pid), also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOME_WARD = "E05011391"  # the councillor persona's ward (src/demo/personas.rs)
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = ["direct", "nginx_proxy", "passthrough", "wardgate_fsync", "wardgate_page_cache", "compare_fsync",
           "compare_page_cache"]
# Measured only beside `--compare-bin`.
COMPARE_TARGETS = ("compare_fsync", "compare_page_cache")
# The fixed-rate test runs a target at half of nginx's saturation rate only when that is at
# most this share of the target's own: saturation moves by a quarter between runs on a shared
# machine, and at 0.85 of it a run on a slower minute queued (p50 0.5 s): a queue's length,
# not a latency. Above it, the target runs at half its own rate instead (marked `*`).
FIXED_RATE_MAX_SHARE = 0.6
LABELS = {
    "direct": "upstream direct (nginx static)",
    "nginx_proxy": "nginx proxy_pass",
    "passthrough": "wardgate's stack, no checks",
    "wardgate_fsync": "wardgate, fsync audit",
    "wardgate_page_cache": "wardgate, page-cache audit",
    "compare_fsync": "--compare-bin, fsync audit",
    "compare_page_cache": "--compare-bin, page-cache",
}
# The wardgate targets: (durability, which binary).
WARDGATES = {
    "wardgate_fsync": ("fsync", "bin"),
    "wardgate_page_cache": ("page-cache", "bin"),
    "compare_fsync": ("fsync", "compare_bin"),
    "compare_page_cache": ("page-cache", "compare_bin"),
}


def log(msg: str) -> None:
    print(f"[loadtest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Every child process this run started, stopped by pid at the end."""

    def __init__(self, pidfile: Path) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.pidfile = pidfile

    def start(self, name: str, argv: list[str], core: int | None, logfile: Path, env=None) -> subprocess.Popen:
        if core is not None:
            argv = ["taskset", "-c", str(core)] + argv
        out = open(logfile, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()
        self.procs[name] = p
        self._write_pids()
        return p

    def _write_pids(self) -> None:
        # Only live children: run.sh's exit trap kills what is listed here, and nothing else.
        self.pidfile.write_text("".join(f"{p.pid}\n" for p in self.procs.values()))

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is not None:
            self._write_pids()
            return
        p.send_signal(sig)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {p.pid}) did not stop in {timeout:.0f}s; killing it")
            p.kill()
            p.wait(timeout=10)
        self._write_pids()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def wait_http(url: str, timeout: float = 60.0, headers: dict | None = None,
              process: subprocess.Popen | None = None) -> None:
    """Waits until `url` answers; gives up early if `process` (the server) has exited."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited (status {process.returncode})")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                r.read()
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s: {last}")


def fetch(url: str, headers: dict | None = None, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads, live and exited), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the comm field: state is fields[0]; utime and stime are stat fields 14 and 15
    return int(fields[11]) + int(fields[12])


def machine_busy_ticks() -> int:
    """Busy clock ticks of all CPUs together since boot (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def repin(pid: int, core: int) -> None:
    # -a: every thread of the process, not only the main one.
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------------
# setup


def make_pages(args, procs: Procs, work: Path) -> tuple[dict, Path, dict]:
    """Runs `wardgate demo` just long enough to take pages from its datastore and its files."""
    demo_dir = work / "demo"
    listen, admin = free_port(), free_port()
    log(f"generating {args.electors} synthetic electors with `wardgate demo`")
    procs.start(
        "demo",
        [args.bin, "demo", "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
         "--data-dir", str(demo_dir), "--electors", str(args.electors)],
        None,
        work / "demo.log",
        env={**os.environ, "RUST_LOG": "warn"},
    )
    wait_http(f"http://127.0.0.1:{admin}/healthz", timeout=120)
    cfg_text = (demo_dir / "wardgate.toml").read_text()
    upstream = re.search(r'^upstream = "http://([^"]+)"', cfg_text, re.M)
    if not upstream:
        raise RuntimeError("demo config names no upstream")
    upstream = upstream.group(1)
    www = work / "www"
    www.mkdir()
    pages = {}
    for n in args.sizes:
        # As a datastore answers wardgate (which asks every listing to leave out the entries
        # it never discloses, `exclude=protected`), so the pages hold none of them.
        query = f"per_page={n}&page=1&exclude=protected"
        if args.persona == "councillor":
            query += f"&ward={HOME_WARD}"
        status, headers, body = fetch(f"http://{upstream}/electors?{query}")
        doc = json.loads(body)
        got = len(doc["records"])
        if status != 200 or got != n:
            raise RuntimeError(f"demo datastore gave {got} records (status {status}) for {query}; "
                               f"raise --electors")
        (www / f"electors-{n}.json").write_bytes(body)
        pages[n] = {"records": n, "bytes": len(body)}
        log(f"page of {n} records: {len(body)} bytes")
    tokens = json.loads((demo_dir / "tokens.json").read_text())
    procs.stop("demo")
    return pages, www, tokens


def nginx_conf(prefix: Path, body: str, cork: bool = False) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""# written by loadtest/harness.py
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    sendfile on;
    tcp_nopush {"on" if cork else "off"};
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
{body}
}}
""")
    return conf


def start_upstream(procs: Procs, work: Path, www: Path, port: int, sizes: list[int],
                   cork: bool) -> subprocess.Popen:
    """The upstream: nginx serving the pages as a datastore API would, each response sent as it
    is written (`tcp_nodelay`, no `tcp_nopush`). With `cork` (`--upstream-cork`) it holds partial
    frames back as a static-file server does (`tcp_nopush`, TCP_CORK): then about one in a
    hundred answers at saturation waits for the reader's delayed-ACK timer (40 ms; the kernel's
    `TcpExtDelayedACKs` counts them), read by wardgate or by wrk (direct) alike, though not by
    nginx proxy_pass."""
    mapping = "\n".join(f"        {n} /electors-{n}.json;" for n in sizes)
    conf = nginx_conf(work / "nginx-upstream", f"""
    # `/electors?per_page=N&...` answers with the N-record page; other parameters are ignored.
    map $arg_per_page $page_file {{
        default /electors-100.json;
{mapping}
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = /electors {{
            types {{ }}
            default_type application/json;
            try_files $page_file =404;
        }}
        location / {{ return 404; }}
    }}""", cork=cork)
    p = procs.start("upstream", ["nginx", "-c", str(conf), "-p", str(work / "nginx-upstream")], 0,
                    work / "nginx-upstream.log")
    wait_http(f"http://127.0.0.1:{port}/electors?per_page={sizes[0]}", timeout=20)
    return p


def start_nginx_proxy(procs: Procs, work: Path, port: int, upstream_port: int,
                      connections: int = 128) -> subprocess.Popen:
    # Idle upstream connections kept: at least as many as the clients' (wardgate keeps up to
    # 1,024), or nginx alone would open and close connections to the upstream under load.
    conf = nginx_conf(work / "nginx-proxy", f"""
    upstream store {{
        server 127.0.0.1:{upstream_port};
        keepalive {max(128, connections)};
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://store;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Enough memory buffers to hold a 1,000-record page: no temp files on disk.
            proxy_buffer_size 16k;
            proxy_buffers 128 16k;
            proxy_busy_buffers_size 256k;
            proxy_max_temp_file_size 0;
        }}
    }}""")
    p = procs.start("nginx_proxy", ["nginx", "-c", str(conf), "-p", str(work / "nginx-proxy")], 1,
                    work / "nginx-proxy.log")
    return p


def wardgate_config(work: Path, durability: str, port: int, admin: int, upstream_port: int, tag: str,
                    commit_window: str | None = None) -> Path:
    demo_dir = work / "demo"
    text = (demo_dir / "wardgate.toml").read_text()
    text = re.sub(r'^listen = ".*"$', f'listen = "127.0.0.1:{port}"', text, flags=re.M)
    text = re.sub(r'^admin_listen = ".*"$', f'admin_listen = "127.0.0.1:{admin}"', text, flags=re.M)
    text = re.sub(r'^upstream = ".*"$', f'upstream = "http://127.0.0.1:{upstream_port}"', text, flags=re.M)
    text, n = re.subn(r'^dir = "audit"$', f'dir = "audit-{tag}"', text, flags=re.M)
    if n != 1:
        raise RuntimeError("demo config: cannot find the audit dir line")
    window = f'\ncommit_window = "{commit_window}"' if commit_window else ""
    text, n = re.subn(r'^durability = ".*"$', f'durability = "{durability}"{window}', text, flags=re.M)
    if n != 1:
        raise RuntimeError("demo config: cannot find the durability line")
    # One token at thousands of requests per second is far over any role's record quota (the
    # councillor's is 5,000 records an hour): raise the limits so the load is answered, not
    # refused with 429. The quota check itself still runs on every request.
    text = re.sub(r"^per_(hour|day) = \d+$", r"per_\1 = 1000000000000", text, flags=re.M)
    path = demo_dir / f"wardgate-{tag}.toml"
    path.write_text(text)
    return path


def start_passthrough(args, procs: Procs, work: Path, port: int, upstream_port: int) -> subprocess.Popen:
    """examples/passthrough: wardgate's listener, upstream client and runtime with nothing
    checked, so the table separates the HTTP stack's cost from enforcement's."""
    return procs.start("passthrough", [args.passthrough, "--listen", f"127.0.0.1:{port}",
                                       "--upstream", f"http://127.0.0.1:{upstream_port}"], 1,
                       work / "passthrough.log", env={**os.environ, "RUST_LOG": "warn"})


def start_wardgate(args, procs: Procs, work: Path, name: str, durability: str,
                   upstream_port: int, binary: str) -> tuple[subprocess.Popen, int, int]:
    port, admin = free_port(), free_port()
    cfg = wardgate_config(work, durability, port, admin, upstream_port, name,
                          getattr(args, "commit_window", None))
    log_file = work / f"{name}.log"
    p = procs.start(name, [binary, "serve", "--config", str(cfg)], 1, log_file,
                    env={**os.environ, "RUST_LOG": "warn"})
    try:
        wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=60, process=p)
    except RuntimeError as e:
        # Say why: a `--compare-bin` older than the demo's policy tests, say, refuses them.
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:]) \
            if log_file.exists() else "(no log)"
        raise RuntimeError(f"{name} ({binary}) did not become ready: {e}\n"
                           f"--- the end of {log_file} ---\n{tail}") from None
    return p, port, admin


# Restriction kinds the rights register is loaded with (`--register`), in turn.
REGISTER_KINDS = ["objects_profiling", "consent_withdrawn_email", "restricted", "do_not_contact",
                  "objects_direct_marketing", "consent_withdrawn_sms", "deceased"]


def register_subjects(args) -> list[str]:
    """`--register` subjects for the rights register: one in 40 of the synthetic electors,
    from the 7th (VF-0000007, VF-0000047, ...: one record of a 10-record analyst page, 3 of
    100, 25 of 1,000), the rest ids no page holds; a register's size is what its lookup
    costs, a page's flagged share what its decisions do."""
    on_pages = [f"VF-{i:07d}" for i in range(7, args.electors + 1, 40)][:args.register]
    return on_pages + [f"VF-{9_000_000 + i:07d}" for i in range(args.register - len(on_pages))]


# Every wardgate of a run keeps its rights register in the same journal (the demo directory's
# `controls.jsonl`, its `data_dir`), and reads it at start: the flags are placed once, through
# the first wardgate started, and every later one starts with them.
REGISTER_PLACED = False


def place_register(args, admin: int, dpo_token: str) -> None:
    """Loads the rights register through a wardgate's admin API as a DPO places flags (`POST
    /rights/{subject}`: journalled and audited, like any placement), eight at a time; once a
    run (`REGISTER_PLACED`). Each placement rebuilds the register's map, so loading is
    quadratic in `--register`: fine for thousands, slow for hundreds of thousands."""
    global REGISTER_PLACED
    subjects = register_subjects(args)
    if REGISTER_PLACED or not subjects:
        return
    t0 = time.monotonic()
    local = threading.local()

    def place(k: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=60)
        body = json.dumps({"kind": REGISTER_KINDS[k % len(REGISTER_KINDS)], "reference": f"LT-{k}",
                           "reason": "load test: a register of realistic size"})
        local.conn.request("POST", f"/rights/{subjects[k]}", body=body,
                           headers={"Authorization": f"Bearer {dpo_token}",
                                    "Content-Type": "application/json"})
        r = local.conn.getresponse()
        r.read()
        if r.status // 100 != 2:
            raise RuntimeError(f"placing a flag on {subjects[k]}: HTTP {r.status}")

    place(0)  # one first: a refusal stops the run here, not after every other placement
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(place, range(1, len(subjects))))
    REGISTER_PLACED = True
    log(f"  rights register: {len(subjects)} subjects flagged in {time.monotonic() - t0:.1f}s")


def wardgate_metrics(admin: int) -> dict[str, float]:
    """wardgate's own metrics (its admin `/metrics`, Prometheus text), unlabelled samples by
    name; empty if they cannot be read (figures we can do without)."""
    try:
        _, _, body = fetch(f"http://127.0.0.1:{admin}/metrics")
    except Exception:  # noqa: BLE001 - a figure we can do without
        return {}
    got = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name and not name.startswith("#") and "{" not in name:
            try:
                got[name] = float(value.split()[0])
            except (ValueError, IndexError):
                pass
    return got


def audit_commits(admin: int | None) -> tuple[float, float] | None:
    """(records, commits) so far, from wardgate's own metrics (the batch-size histogram)."""
    if admin is None:
        return None
    m = wardgate_metrics(admin)
    records, commits = m.get("wardgate_audit_batch_records_sum"), m.get("wardgate_audit_batch_records_count")
    return None if records is None or commits is None else (records, commits)


def settle(admins: list[int], timeout: float = 120.0) -> None:
    """What one run leaves behind must not be charged to the next, which shares its core: the
    page-cache target's dirty audit pages (written back by the kernel some seconds later) and
    finished segments still being sealed by an idle wardgate. Flushes the first, waits for the
    second."""
    os.sync()
    end = time.monotonic() + timeout
    for admin in admins:
        while wardgate_metrics(admin).get("wardgate_audit_seal_backlog", 0) > 0 \
                and time.monotonic() < end:
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# measurement


def preflight(url: str, headers: dict, expect_records: int | None) -> dict:
    status, h, body = fetch(url, headers)
    ctype = h.get("content-type", "")
    if status != 200 or not ctype.startswith("application/json"):
        raise RuntimeError(f"{url}: status {status}, content-type {ctype!r}: {body[:300]!r}")
    doc = json.loads(body)
    kept = len(doc["records"])
    if expect_records is not None and kept != expect_records:
        raise RuntimeError(f"{url}: {kept} records, expected {expect_records}")
    return {"response_bytes": len(body), "records_out": kept}


def same_answer(answered: dict, target: str, n: int, pre: dict) -> None:
    """A wardgate target's page: at least one record out (a build refusing every record, a
    policy error say, still answers 200), and the same records and bytes as the first wardgate
    target measured at that size, or the run stops saying which differ."""
    if pre["records_out"] == 0:
        raise RuntimeError(f"{target}, {n} records: the page came back with no record; "
                           "a run that withholds everything measures nothing")
    mine = (pre["records_out"], pre["response_bytes"])
    first = answered.setdefault(n, (target, *mine))
    if first[1:] != mine:
        raise RuntimeError(f"{target}, {n} records: {mine[0]} records in {mine[1]} bytes, "
                           f"where {first[0]} answered {first[1]} in {first[2]}: the two "
                           "do different work, and their figures would not compare")


def run_wrk(args, work: Path, url: str, env: dict, seconds: float, out: Path) -> dict:
    argv = ["taskset", "-c", "0", "wrk", "-t", str(args.wrk_threads), "-c", str(args.connections),
            "-d", f"{seconds:g}s", "--timeout", "10s", "--latency", "-s", str(HERE / "wrk_report.lua"), url]
    e = {**os.environ, **env, "WRK_OUT": str(out)}
    r = subprocess.run(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=seconds + 60)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout.decode(errors='replace')}")
    return json.loads(out.read_text())


def wait_quiet(args) -> None:
    """On a shared machine: wait (at most --wait-quiet seconds) until other processes leave the
    cores alone, judged over one-second windows while nothing of ours is under load."""
    if args.wait_quiet <= 0:
        return
    end = time.monotonic() + args.wait_quiet
    while True:
        m0 = machine_busy_ticks()
        time.sleep(1.0)
        busy = (machine_busy_ticks() - m0) / CLK_TCK
        if busy <= args.max_other_load or time.monotonic() >= end:
            if busy > args.max_other_load:
                log(f"  machine still busy ({busy:.2f} cores) after {args.wait_quiet:g}s; measuring anyway")
            return
        log(f"  machine busy ({busy:.2f} cores used by others); waiting")


def saturation(args, work: Path, target: str, n: int, url: str, env: dict, server: subprocess.Popen,
               upstream: subprocess.Popen, admin: int | None = None) -> dict:
    wait_quiet(args)
    log(f"{target:<20} {n:>5} records: warm-up {args.warmup:g}s, measure {args.duration:g}s")
    if args.warmup > 0:  # wrk refuses `-d 0s`
        run_wrk(args, work, url, env, args.warmup, work / f"wrk-warm-{target}-{n}.json")
    up_same = upstream.pid == server.pid
    a0 = audit_commits(admin)
    m0 = machine_busy_ticks()
    c0, u0, ch0, t0 = cpu_ticks(server.pid), cpu_ticks(upstream.pid), children_cpu(), time.monotonic()
    w = run_wrk(args, work, url, env, args.duration, work / f"wrk-{target}-{n}.json")
    c1, u1, ch1, t1 = cpu_ticks(server.pid), cpu_ticks(upstream.pid), children_cpu(), time.monotonic()
    m1 = machine_busy_ticks()
    a1 = audit_commits(admin)
    wall = t1 - t0
    ours = (c1 - c0) / CLK_TCK + (0 if up_same else (u1 - u0) / CLK_TCK) + (ch1 - ch0)
    # Whatever else kept the two cores busy meanwhile (other builds; also loopback softirq time
    # the kernel charges to no process, so a few percent is normal).
    other = max(0.0, (m1 - m0) / CLK_TCK - ours) / wall
    reqs = max(1, w["requests"])
    cpu = (c1 - c0) / CLK_TCK
    secs = w["duration_us"] / 1e6
    errors = sum(w["errors"].values())
    if errors:
        log(f"  !! {errors} errors: {w['errors']}")
    res = {
        "requests": w["requests"],
        "rps": w["requests"] / secs,
        "latency_us": w["latency_us"],
        "errors": w["errors"],
        "proxy_cpu_s": cpu,
        "cpu_us_per_req": cpu / reqs * 1e6,
        "proxy_core_util": cpu / wall,
        "upstream_cpu_us_per_req": None if up_same else (u1 - u0) / CLK_TCK / reqs * 1e6,
        "wrk_cpu_s": ch1 - ch0,
        "load_core_util": ((0 if up_same else (u1 - u0) / CLK_TCK) + (ch1 - ch0)) / wall,
        "mb_per_s_out": w["bytes"] / secs / 1e6,
        "other_load_cores": other,
        # Audit records per group commit (one write, and in fsync mode one fdatasync, each).
        "audit_records_per_commit": (a1[0] - a0[0]) / (a1[1] - a0[1]) if a0 and a1 and a1[1] > a0[1] else None,
    }
    if other > args.max_other_load:
        log(f"  !! other processes kept {other:.2f} cores busy during this run: figures are disturbed")
    log(f"  {res['rps']:9.0f} req/s  p50 {res['latency_us']['p50'] / 1000:7.2f} ms  "
        f"p99 {res['latency_us']['p99'] / 1000:7.2f} ms  {res['cpu_us_per_req']:7.1f} us CPU/req  "
        f"core1 {res['proxy_core_util']:.0%} core0 {res['load_core_util']:.0%} other {other:.2f}"
        + (f"  audit {res['audit_records_per_commit']:.1f} records/commit" if res["audit_records_per_commit"] else ""))
    return res


def fixed_rate(args, work: Path, target: str, n: int, url: str, headers: dict, rate: float,
               server: subprocess.Popen) -> dict:
    wait_quiet(args)
    log(f"{target:<20} {n:>5} records: fixed rate {rate:.0f}/s for {args.fixed_duration:g}s")
    argv = ["taskset", "-c", "0", args.fixedrate, "--url", url,
            "--rate", f"{rate:.3f}", "--duration", f"{args.fixed_duration:g}", "--warmup", "2",
            "--connections", str(args.fixed_connections)]
    for k, v in headers.items():
        argv += ["--header", f"{k}: {v}"]
    c0, g0, t0 = cpu_ticks(server.pid), children_cpu(), time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=args.fixed_duration + 60)
    c1, g1, t1 = cpu_ticks(server.pid), children_cpu(), time.monotonic()
    if r.returncode != 0:
        raise RuntimeError(f"fixedrate failed: {r.stderr.decode(errors='replace')}")
    res = json.loads(r.stdout)
    res["proxy_core_util"] = (c1 - c0) / CLK_TCK / (t1 - t0)
    # The generator's own CPU per request it completed: its limit on core 0.
    res["generator_cpu_us_per_req"] = (g1 - g0) / max(1, res["completed"]) * 1e6
    lat = res["latency_us"]
    log(f"  achieved {res['achieved_rate']:.0f}/s  p50 {lat.get('p50', 0) / 1000:.2f} ms  "
        f"p99 {lat.get('p99', 0) / 1000:.2f} ms  p99.9 {lat.get('p999', 0) / 1000:.2f} ms  "
        f"send lag p99 {res['send_lag_us'].get('p99', 0) / 1000:.2f} ms  non2xx {res['non2xx']}  "
        f"unfinished {res['unfinished']}")
    return res


# What a request costs the kernel and the scheduler, counted by `perf stat` (`--profile`): the
# socket calls any proxy makes, the audit commit's, and the wake-ups between threads.
STAT_EVENTS = [f"syscalls:sys_enter_{call}" for call in
               ("recvfrom", "writev", "write", "fdatasync", "futex", "epoll_wait", "epoll_pwait",
                "clock_nanosleep", "sched_yield")] + ["context-switches", "cpu-migrations"]


def thread_switches(pid: int) -> dict[str, list[int]]:
    """Voluntary and involuntary context switches so far, summed per thread name."""
    out: dict[str, list[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread has ended
        sums = out.setdefault(name, [0, 0])
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "voluntary_ctxt_switches":
                sums[0] += int(value)
            elif key == "nonvoluntary_ctxt_switches":
                sums[1] += int(value)
    return out


def per_request_counts(args, work: Path, pid: int, url: str, env: dict, secs: int) -> str:
    """System calls and context switches per request under wrk load: `perf stat` over `secs`
    seconds of a `secs + 2`-second wrk run (its requests in those seconds taken at its mean
    rate), and each thread's switches from /proc over the whole run. Tracepoints the kernel
    lacks are left out; without any (no tracefs, perf not permitted) only /proc's figures."""
    def counts(events: list[str]) -> bool:
        return subprocess.run(["perf", "stat", "-x", ",", "-e", ",".join(events), "--", "true"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    events = STAT_EVENTS if counts(STAT_EVENTS) else [e for e in STAT_EVENTS if counts([e])]
    before = thread_switches(pid)
    stat = subprocess.Popen(["perf", "stat", "-x", ",", "-e", ",".join(events), "-p", str(pid), "--",
                             "sleep", str(secs)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wrk = run_wrk(args, work, url, env, secs + 2, work / "wrk-counts.json")
    finally:
        _, err = stat.communicate(timeout=60)
    after = thread_switches(pid)
    requests = max(1, wrk["requests"])
    in_window = max(1.0, requests / (wrk["duration_us"] / 1e6) * secs)
    lines = [f"per request (perf stat -e ... -p PID over {secs}s of wrk -c {args.connections}, "
             f"~{in_window:,.0f} requests at wrk's mean rate):"]
    for row in err.decode(errors="replace").splitlines():
        fields = row.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit():
            lines.append(f"  {int(fields[0]) / in_window:8.2f}  {fields[2]}")
    if len(lines) == 1:
        lines.append(f"  (perf stat counted nothing: {err.decode(errors='replace')[-300:]!r})")
    lines.append(f"context switches per request per thread name (/proc, {requests:,} requests): "
                 "voluntary, involuntary")
    for name in sorted(after):
        v0, i0 = before.get(name, [0, 0])
        v1, i1 = after[name]
        lines.append(f"  {(v1 - v0) / requests:8.3f} {(i1 - i0) / requests:8.3f}  {name}")
    return "\n".join(lines) + "\n"


# Where a sample's kernel stack says its time went: the first of these functions found in it
# names the system call (or the kernel's own work) it belongs to.
KERNEL_PATHS = [
    ("socket receive", ("__sys_recvfrom", "sock_recvmsg", "tcp_recvmsg", "sock_read_iter")),
    ("socket send", ("sock_write_iter", "tcp_sendmsg", "do_sendfile")),
    ("fdatasync", ("do_fsync", "__x64_sys_fdatasync")),
    ("file write", ("ksys_write",)),
    ("futex", ("futex",)),
    ("epoll", ("epoll",)),
    ("page fault", ("exc_page_fault",)),
    ("scheduler", ("__schedule",)),
]


def kernel_path(frames: list[str]) -> str:
    for label, marks in KERNEL_PATHS:
        if any(m in f for f in frames for m in marks):
            return label
    return "other kernel"


def profile(args, work: Path, target: str, pid: int, url: str, env: dict, results: Path,
            n: int) -> str | None:
    """`perf record` (DWARF call graphs) of the server under wrk load; writes a short summary:
    CPU time a request by thread, user space against the kernel by system call (so that a
    wardgate profile can be set against nginx's); the hottest functions by self time, and
    wardgate's own functions by inclusive time; then system calls and context switches per
    request (`per_request_counts`). Returns the summary's path, or None if perf is missing or
    not permitted."""
    if not shutil.which("perf"):
        log("perf not installed; no profile")
        return None
    data = work / f"perf-{target}.data"
    secs, hz = args.profile_seconds, 499
    log(f"profiling {target} (pid {pid}) with perf for {secs}s under wrk load ({n} records)")
    rec = subprocess.Popen(["perf", "record", "-F", str(hz), "--call-graph", "dwarf,16384", "-p", str(pid),
                            "-o", str(data), "--", "sleep", str(secs)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wrk = run_wrk(args, work, url, env, secs + 2, work / "wrk-profile.json")
    finally:
        _, err = rec.communicate(timeout=60)
    if rec.returncode != 0 or not data.exists():
        log(f"perf record failed: {err.decode(errors='replace')[-500:]}")
        return None
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,ip,sym,dso"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            errors="replace", timeout=600).stdout
    # Each sample: its thread's name, then (function, in the kernel) from the leaf up.
    samples: list[tuple[str, list[tuple[str, bool]]]] = []
    cur: tuple[str, list[tuple[str, bool]]] | None = None
    for line in script.splitlines():
        if not line.strip():
            if cur:
                samples.append(cur)
            cur = None
        elif line[0] in " \t" and cur is not None:
            # `ip sym (dso)`; a symbol may hold parentheses and spaces, a dso does not. The
            # kernel's frames are those at kernel addresses (the upper half on x86-64),
            # whatever perf could name them, short of the last 4,095: the markers a call
            # chain holds between its parts (`PERF_CONTEXT_USER` and the like, and -1).
            m = re.match(r"\s*([0-9a-f]+) (.*?)(?: \([^()]*\))?\s*$", line)
            ip = int(m.group(1), 16) if m else 0
            sym, kernel = (m.group(2) if m else "?"), 1 << 63 <= ip < (1 << 64) - 4095
            cur[1].append((re.sub(r"\+0x[0-9a-f]+$", "", sym), kernel))
        elif line[0] not in " \t":
            cur = (line.split()[0], [])
    if cur:
        samples.append(cur)
    total = max(1, len(samples))
    threads, leaf, incl, where = {}, {}, {}, {}
    for comm, frames in samples:
        threads[comm] = threads.get(comm, 0) + 1
        if frames:
            leaf[frames[0][0]] = leaf.get(frames[0][0], 0) + 1
        for name in {f for f, _ in frames if f.startswith("wardgate::") or f.startswith("<wardgate::")}:
            incl[name] = incl.get(name, 0) + 1
        kernel = [f for f, k in frames if k]
        key = (comm, kernel_path(kernel) if kernel else "user space")
        where[key] = where.get(key, 0) + 1
    # Microseconds a request: samples at `hz` over the requests wrk made in the window.
    in_window = max(1.0, wrk["requests"] / (wrk["duration_us"] / 1e6) * secs)
    us = 1e6 / hz / in_window

    def top(d: dict, k: int) -> str:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return "\n".join(f"  {100 * v / total:5.1f}%  {name[:140]}" for name, v in rows)

    def spent(d: dict, k: int) -> str:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return "\n".join(f"  {100 * v / total:5.1f}%  {v * us:7.1f} us  {comm:<16} {what}"
                         for (comm, what), v in rows)

    counts = per_request_counts(args, work, pid, url, env, secs)
    ours = (f"wardgate functions, inclusive time (callees included):\n{top(incl, 30)}\n\n"
            if incl else "")
    out = results / f"profile-{target}-{n}.txt"
    out.write_text(
        f"# perf record -F {hz} --call-graph dwarf on {LABELS[target]}, {n}-record pages,\n"
        f"# wrk -c {args.connections}, {len(samples)} samples over {secs}s (~{in_window:,.0f} requests "
        f"at wrk's mean rate). Percent of all samples.\n\n"
        f"threads:\n{top(threads, 10)}\n\n"
        f"CPU time a request by thread, user space or the kernel by system call (sampled):\n"
        f"{spent(where, 16)}\n  {len(samples) * us:7.1f} us in all\n\n"
        f"self time (leaf function):\n{top(leaf, 30)}\n\n"
        f"{ours}{counts}")
    log(f"profile written to {out}")
    return str(out)


def instructions(args, procs: Procs, work: Path, up_port: int, path_of, headers: dict,
                 dpo_token: str, results: Path) -> dict:
    """User-space instructions per request of wardgate (page-cache audit, everything else on)
    under callgrind: a figure the machine's load does not move, for comparing two builds on a
    shared machine whose timings move by a third from run to run. Per page size: warm-up
    requests first (caches, memo, connection pool), then `--instructions` requests on one
    keep-alive connection with instrumentation on, dumped and divided. Every thread counts
    (the audit writer's encoding and hashing too); the kernel does not."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        log("valgrind not installed (apt-get install valgrind); no instruction counts")
        return {}
    port, admin = free_port(), free_port()
    cfg = wardgate_config(work, "page-cache", port, admin, up_port, "callgrind",
                          getattr(args, "commit_window", None))
    out = work / "callgrind.out"
    p = procs.start("wardgate_callgrind",
                    ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
                     args.bin, "serve", "--config", str(cfg)], 1, work / "wardgate_callgrind.log",
                    env={**os.environ, "RUST_LOG": "warn"})
    counts = {}
    try:
        wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=300)
        place_register(args, admin, dpo_token)

        def control(*flags: str) -> None:
            subprocess.run(["callgrind_control", *flags, str(p.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

        for n in args.sizes:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

            def get(k: int) -> None:
                for _ in range(k):
                    conn.request("GET", path_of(n), headers=headers)
                    r = conn.getresponse()
                    r.read()
                    if r.status != 200:
                        raise RuntimeError(f"callgrind run: status {r.status} at {n} records")

            get(20)
            control("--instr=on")
            get(args.instructions)
            control("--instr=off")
            before = set(work.glob(f"callgrind.out.{p.pid}*"))
            control("--dump")
            conn.close()
            # The dump's last line is `totals:` (its `summary:` line can be 0 on a dump on
            # request): read it once the new file has it, so a half-written one is not read.
            deadline, total = time.monotonic() + 60, None
            while total is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("callgrind did not write its dump")
                time.sleep(0.2)
                for dump in set(work.glob(f"callgrind.out.{p.pid}*")) - before:
                    totals = [line for line in dump.read_text().splitlines() if line.startswith("totals:")]
                    if totals:
                        total = int(totals[0].split()[1])
                        break
            kept = results / f"callgrind-wardgate-{n}.out"
            shutil.copy(dump, kept)
            counts[str(n)] = {"instructions_per_request": total // args.instructions,
                              "requests": args.instructions, "callgrind_file": str(kept)}
            log(f"wardgate (callgrind) {n:>5} records: {total // args.instructions:,} instructions/request")
    finally:
        procs.stop("wardgate_callgrind", timeout=120)
    return counts


def median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def combine(runs: list[dict], nginx_runs: list[dict]) -> dict:
    """One target's saturation runs at one page size (one per round) as one row: the median of
    each figure, and the median of the per-round ratios to nginx proxy_pass, each taken
    against the nginx run of the same round (a ratio of medians would pair a fast minute of
    one with a slow minute of the other). One run is itself."""
    if len(runs) == 1:
        return dict(runs[0])
    pct = runs[0]["latency_us"].keys()
    row = {
        "requests": median([r["requests"] for r in runs]),
        "requests_total": sum(r["requests"] for r in runs),
        "latency_us": {k: median([r["latency_us"][k] for r in runs]) for k in pct},
        "errors": {k: sum(r["errors"].get(k, 0) for r in runs) for k in runs[0]["errors"]},
    }
    for k in ("rps", "proxy_cpu_s", "cpu_us_per_req", "proxy_core_util", "upstream_cpu_us_per_req",
              "wrk_cpu_s", "load_core_util", "mb_per_s_out", "audit_records_per_commit"):
        row[k] = median([r.get(k) for r in runs])
    row["other_load_cores"] = max(r["other_load_cores"] for r in runs)
    per_round = [ratio(r["rps"], b["rps"]) for r, b in zip(runs, nginx_runs)]
    row["rps_ratio_per_round"] = per_round
    row["rps_ratio"] = median(per_round)
    row["cpu_ratio"] = median([ratio(r["cpu_us_per_req"], b["cpu_us_per_req"])
                               for r, b in zip(runs, nginx_runs)])
    row["rounds"] = runs
    return row


# ---------------------------------------------------------------------------------------------
# report


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def table(result: dict) -> str:
    lines = []
    sat = result["saturation"]
    fixed = result.get("fixed_rate", {})
    hdr = (f"{'records':>7}  {'target':<28} {'req/s':>9} {'x ngx':>6} {'p50 ms':>8} {'x ngx':>6} "
           f"{'p99 ms':>8} {'x ngx':>6} {'p99.9 ms':>9} {'x ngx':>6} {'CPU us/req':>10} {'x ngx':>6} {'core1':>6} {'core0':>6} {'other':>6} {'errors':>7} {'rec/commit':>10}")
    lines.append(f"Saturation (wrk -t{result['config']['wrk_threads']} -c{result['config']['connections']}, "
                 f"{result['config']['duration_s']:g}s after {result['config']['warmup_s']:g}s warm-up; "
                 f"'x ngx' = ratio to nginx proxy_pass; core1 = server under test busy, core0 = load side busy, "
                 f"other = cores kept busy by other processes; errors = non-2xx and socket errors, which must be 0; "
                 f"rec/commit = audit records per group commit, from wardgate's metrics)")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for n in result["config"]["sizes"]:
        base = sat.get(str(n), {}).get("nginx_proxy")
        for t in TARGETS:
            r = sat.get(str(n), {}).get(t)
            if not r:
                continue
            L, B = r["latency_us"], (base or {}).get("latency_us", {})

            def f(x, fmt):
                return "-" if x is None else format(x, fmt)

            lines.append(
                f"{n:>7}  {LABELS[t]:<28} {r['rps']:>9.0f} {f(r.get('rps_ratio', ratio(r['rps'], base and base['rps'])), '6.2f')} "
                f"{L['p50'] / 1e3:>8.2f} {f(ratio(L['p50'], B.get('p50')), '6.2f')} "
                f"{L['p99'] / 1e3:>8.2f} {f(ratio(L['p99'], B.get('p99')), '6.2f')} "
                f"{L['p999'] / 1e3:>9.2f} {f(ratio(L['p999'], B.get('p999')), '6.2f')} "
                f"{r['cpu_us_per_req']:>10.1f} {f(r.get('cpu_ratio', ratio(r['cpu_us_per_req'], base and base['cpu_us_per_req'])), '6.2f')} "
                f"{r['proxy_core_util']:>6.0%} {r['load_core_util']:>6.0%} {r.get('other_load_cores', 0):>6.2f} "
                f"{sum(r['errors'].values()):>7} {f(r.get('audit_records_per_commit'), '10.1f'):>10}")
        # nginx proxy_pass's rate is the reference of every ratio: when the load side's core
        # (wrk and the upstream) was the one at its limit, not nginx's, the reference is low
        # and every 'x ngx' of throughput flatters the others.
        if base and base["load_core_util"] >= 0.9 and base["proxy_core_util"] < 0.9:
            lines.append(f"{'':>7}  ! nginx proxy_pass at {n} records was held back by core 0 "
                         f"({base['load_core_util']:.0%} busy, nginx's own {base['proxy_core_util']:.0%}): "
                         "its rate is a floor, and the others' 'x ngx' for req/s a ceiling")
        lines.append("")
    rounds = result["config"].get("rounds", 1)
    if rounds > 1:
        lines.append(f"{rounds} rounds, the targets alternating: every figure is the median of the rounds; "
                     f"'x ngx' for req/s and CPU is the median of each round's ratio to that round's nginx "
                     f"run. req/s ratio per round:")
        for n in result["config"]["sizes"]:
            for t in TARGETS:
                r = sat.get(str(n), {}).get(t)
                if r and t != "nginx_proxy" and r.get("rps_ratio_per_round"):
                    lines.append(f"{n:>7}  {LABELS[t]:<28} "
                                 + " ".join("-" if x is None else f"{x:.2f}" for x in r["rps_ratio_per_round"]))
        lines.append("")
    if any(fixed.values()):
        lines.append(f"Fixed rate (half of nginx proxy_pass's saturation rate; fixedrate.rs, "
                     f"{result['config']['fixed_duration_s']:g}s after 2s warm-up; latency from each "
                     f"request's scheduled instant; 'added' = minus the direct upstream's)")
        hdr2 = (f"{'records':>7}  {'target':<28} {'rate/s':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} "
                f"{'p99.9 ms':>9} {'added p50':>10} {'added p99':>10} {'svc p99':>8} {'lag p99':>8} {'non2xx':>7}")
        lines.append(hdr2)
        lines.append("-" * len(hdr2))
        for n in result["config"]["sizes"]:
            direct = fixed.get(str(n), {}).get("direct")
            for t in TARGETS:
                r = fixed.get(str(n), {}).get(t)
                if not r:
                    continue
                L = r["latency_us"]
                if not L:
                    lines.append(f"{n:>7}  {LABELS[t]:<28} {r['target_rate']:>8.0f} no answers in the measured window")
                    continue
                ref = fixed.get(str(n), {}).get(f"direct_at_{t}") or direct
                D = (ref or {}).get("latency_us", {})
                same_rate = ref and abs(ref["target_rate"] - r["target_rate"]) < 1
                add50 = L["p50"] - D["p50"] if D and same_rate else None
                add99 = L["p99"] - D["p99"] if D and same_rate else None
                mark = "*" if r.get("half_nginx_rate_overloads") else " "
                lag_mark = "!" if r["send_lag_us"].get("p99", 0) > 2000 else " "
                lines.append(
                    f"{n:>7}  {LABELS[t]:<28} {r['target_rate']:>7.0f}{mark} {r['achieved_rate']:>9.0f} "
                    f"{L['p50'] / 1e3:>8.2f} {L['p99'] / 1e3:>8.2f} {L['p999'] / 1e3:>9.2f} "
                    f"{'-' if add50 is None else format(add50 / 1e3, '10.2f'):>10} "
                    f"{'-' if add99 is None else format(add99 / 1e3, '10.2f'):>10} "
                    f"{r['service_latency_us']['p99'] / 1e3:>8.2f} {r['send_lag_us']['p99'] / 1e3:>7.2f}{lag_mark} "
                    f"{r['non2xx'] + r['errors'] + r['unfinished']:>7}")
            lines.append("")
        lines.append("* half of nginx's rate is above this target's saturation rate, so it ran at half its "
                     "own saturation rate, and 'added' is against the direct upstream at that same rate. svc = latency from the "
                     "actual send; lag = how long after its instant a request went out. ! = lag p99 over 2 ms: "
                     "either every connection was held by a stalled server (then svc is high too) or core 0 "
                     "(generator and upstream) was saturated, which overstates that row's latency.")
    return "\n".join(lines)


def machine_info(args) -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    cpu = None
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "nginx": out(["nginx", "-v"]),
        "wrk": (out(["wrk", "-v"]) or "").splitlines()[0] if out(["wrk", "-v"]) else None,
        "python": platform.python_version(),
        "wardgate_commit": out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "wardgate_tree_dirty": bool(out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])),
        "wardgate_bin": args.bin,
        "audit_fs": " ".join((out(["df", "--output=fstype,source", str(args.work)]) or "").split()[2:]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description="wardgate load test (see loadtest/README.md)")
    ap.add_argument("--bin", required=True, help="the release wardgate binary")
    ap.add_argument("--fixedrate", required=True,
                    help="the fixed-rate generator (cargo build --release --example fixedrate)")
    ap.add_argument("--passthrough", default=None,
                    help="wardgate's stack without enforcement (cargo build --release --example "
                         "passthrough), for the passthrough target")
    ap.add_argument("--work", required=True, help="scratch directory (config, pages, audit logs)")
    ap.add_argument("--results", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--targets", default=",".join(t for t in TARGETS if t not in COMPARE_TARGETS))
    ap.add_argument("--persona", default="analyst", choices=["analyst", "councillor"])
    ap.add_argument("--electors", type=int, default=8000,
                    help="demo electors (the councillor's ward holds 5 of 36 districts: 8000 give "
                         "a full 1,000-record ward page)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of wrk warm-up before each")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--fixed-duration", type=float, default=10.0, help="0 skips the fixed-rate runs")
    ap.add_argument("--fixed-connections", type=int, default=64)
    ap.add_argument("--max-other-load", type=float, default=0.15,
                    help="warn when other processes use more than this many cores during a run")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="before each run, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--register", type=int, default=2000, metavar="N",
                    help="subjects flagged in the rights register every wardgate reads (placed once, "
                         "before the first is measured; one in 40 of the electors, the rest on no page; "
                         "0: an empty register)")
    ap.add_argument("--profile", action="store_true",
                    help="perf-profile every target but direct at 100 records (or the first size)")
    ap.add_argument("--profile-seconds", type=int, default=5,
                    help="how long each --profile recording (and its perf stat count) lasts")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="also count wardgate's instructions per request over N requests under "
                         "callgrind (page-cache audit), per page size; 0: not")
    ap.add_argument("--rounds", type=int, default=1,
                    help="saturation rounds, the targets alternating (order rotated each round); the "
                         "table shows medians and each round's ratio to nginx (default 1)")
    ap.add_argument("--compare-bin", default=None, metavar="PATH",
                    help="another wardgate binary, measured as one more target in each audit mode "
                         "--bin's is (fsync, page-cache) in the same rounds: an A/B of two builds on "
                         "one noisy machine")
    ap.add_argument("--upstream-cork", action="store_true",
                    help="the upstream nginx with tcp_nopush (TCP_CORK), as a static-file server; "
                         "default off, as a datastore API answers (see start_upstream)")
    ap.add_argument("--commit-window", default=None,
                    help="wardgate's audit.commit_window (default: the gateway's own default)")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t}")
    if "nginx_proxy" not in targets:
        ap.error("nginx_proxy is the reference; keep it in --targets")
    # The other build in each audit mode --bin is measured in.
    for mode, compare in (("wardgate_fsync", "compare_fsync"), ("wardgate_page_cache", "compare_page_cache")):
        if args.compare_bin and mode in targets and compare not in targets:
            targets.append(compare)
    for compare in COMPARE_TARGETS:
        if compare in targets and not args.compare_bin:
            ap.error(f"target {compare} needs --compare-bin PATH")
    if "passthrough" in targets and not (args.passthrough and os.access(args.passthrough, os.X_OK)):
        ap.error("target passthrough needs --passthrough PATH (run.sh builds it)")
    if args.compare_bin and not os.access(args.compare_bin, os.X_OK):
        ap.error(f"--compare-bin {args.compare_bin}: not an executable file")
    if not 1 <= args.rounds <= 50:
        ap.error("--rounds: 1 to 50")
    if not 0 < args.duration <= 120 or not 0 <= args.warmup <= 60 or not 0 <= args.fixed_duration <= 120:
        ap.error("durations out of bounds (each run at most 120 s)")
    if not 0 <= args.instructions <= 10_000:
        ap.error("--instructions: at most 10,000 requests (callgrind runs them ~50 times slower)")
    if not 1 <= args.profile_seconds <= 60:
        ap.error("--profile-seconds: 1 to 60")
    if (os.cpu_count() or 1) < 2:
        ap.error("needs two cores: the server under test on core 1, the load on core 0")
    purpose = {"analyst": "profiling", "councillor": "canvassing"}[args.persona]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    procs = Procs(work / "pids")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    result = {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args),
        "config": {
            "sizes": args.sizes, "persona": args.persona, "purpose": purpose, "duration_s": args.duration,
            "warmup_s": args.warmup, "connections": args.connections, "wrk_threads": args.wrk_threads,
            "fixed_duration_s": args.fixed_duration, "fixed_connections": args.fixed_connections,
            "rounds": args.rounds, "compare_bin": args.compare_bin, "upstream_cork": args.upstream_cork,
            "electors": args.electors, "register": args.register,
            "pinning": "server under test on core 1; upstream nginx, wrk and fixedrate on core 0 "
                       "(for 'direct' the upstream nginx itself is the server under test, on core 1)",
        },
        "pages": {}, "saturation": {}, "fixed_rate": {}, "profile": None, "instructions": {},
    }
    try:
        pages, www, tokens = make_pages(args, procs, work)
        result["pages"] = {str(k): v for k, v in pages.items()}
        token = tokens[args.persona]
        wg_headers = {"Authorization": f"Bearer {token}", "X-Purpose": purpose}
        env = {"WG_TOKEN": token, "WG_PURPOSE": purpose}
        up_port, px_port = free_port(), free_port()
        upstream = start_upstream(procs, work, www, up_port, args.sizes, args.upstream_cork)
        sat, fixed = result["saturation"], result["fixed_rate"]
        for n in args.sizes:
            sat[str(n)] = {}
            fixed[str(n)] = {}
        store_path = lambda n: f"/electors?per_page={n}"  # noqa: E731
        gw_path = (lambda n: f"/voter/electors?per_page={n}") if args.persona == "analyst" else \
            (lambda n: f"/voter/electors?per_page={n}&ward={HOME_WARD}")

        # Every server under test is started first and kept up, so that the rounds can
        # alternate between them; what an idle one still does (sealing, the kernel's writeback
        # of its audit pages) is settled before each run (`settle`). Per target: process,
        # base URL, path, whether every record comes back, admin port.
        servers = {}
        nginx_px = start_nginx_proxy(procs, work, px_port, up_port,
                                     max(args.connections, args.fixed_connections))
        wait_http(f"http://127.0.0.1:{px_port}{store_path(args.sizes[0])}", timeout=20)
        servers["nginx_proxy"] = (nginx_px, f"http://127.0.0.1:{px_port}", store_path, True, None)
        if "passthrough" in targets:
            pt_port = free_port()
            pt = start_passthrough(args, procs, work, pt_port, up_port)
            wait_http(f"http://127.0.0.1:{pt_port}{store_path(args.sizes[0])}", timeout=20)
            servers["passthrough"] = (pt, f"http://127.0.0.1:{pt_port}", store_path, True, None)
        if "direct" in targets:
            servers["direct"] = (upstream, f"http://127.0.0.1:{up_port}", store_path, True, None)
        for target, (durability, which) in WARDGATES.items():
            if target in targets:
                gw, port, admin = start_wardgate(args, procs, work, target, durability, up_port,
                                                 getattr(args, which))
                place_register(args, admin, tokens["dpo"])
                servers[target] = (gw, f"http://127.0.0.1:{port}", gw_path, False, admin)

        @contextlib.contextmanager
        def pinned(target: str):
            """For `direct` the upstream nginx is the server under test: on core 1 meanwhile."""
            if target != "direct":
                yield
                return
            repin(upstream.pid, 1)
            try:
                yield
            finally:
                repin(upstream.pid, 0)

        # Saturation, in rounds: each round runs every target once per page size, nginx
        # proxy_pass first in the first round and the order rotated in each later one, so that
        # a machine that slows down or speeds up meanwhile moves every target alike.
        order = ["nginx_proxy"] + [t for t in TARGETS if t in servers and t != "nginx_proxy"]
        admins = [admin for (_, _, _, _, admin) in servers.values() if admin is not None]
        runs = {str(n): {t: [] for t in order} for n in args.sizes}
        checked = set()
        # What the first wardgate target answered for each page size: every other (the other
        # durability, a --compare-bin build) must answer the same records, or its figures are
        # of other work (a build that withholds more answers faster).
        answered: dict[int, tuple[str, int, int]] = {}
        for rnd in range(args.rounds):
            turn = order[rnd % len(order):] + order[:rnd % len(order)]
            if args.rounds > 1:
                log(f"round {rnd + 1} of {args.rounds}: {', '.join(turn)}")
            for n in args.sizes:
                for target in turn:
                    server, base, path_of, expect_all, admin = servers[target]
                    url = base + path_of(n)
                    settle(admins)
                    with pinned(target):
                        if (target, n) not in checked:
                            pre = preflight(url, wg_headers, n if expect_all else None)
                            pre["response_bytes_in"] = pages[n]["bytes"]
                            if not expect_all:
                                same_answer(answered, target, n, pre)
                            checked.add((target, n))
                            runs[str(n)][target].append(pre)
                        r = saturation(args, work, target, n, url, env, server, upstream, admin)
                    runs[str(n)][target].append(r)
        for n in args.sizes:
            pre = {t: rs.pop(0) for t, rs in runs[str(n)].items()}
            for target, rs in runs[str(n)].items():
                sat[str(n)][target] = {**combine(rs, runs[str(n)]["nginx_proxy"]), **pre[target]}

        # Fixed rate: half of nginx's (median) saturation rate, per target.
        if args.fixed_duration > 0:
            for target in order:
                server, base, path_of, _, _ = servers[target]
                for n in args.sizes:
                    rate, own = sat[str(n)]["nginx_proxy"]["rps"] / 2, sat[str(n)][target]["rps"]
                    settle(admins)
                    with pinned(target):
                        if rate <= FIXED_RATE_MAX_SHARE * own:
                            r = fixed_rate(args, work, target, n, base + path_of(n), wg_headers, rate, server)
                            r["rate_basis"] = "half nginx proxy_pass saturation"
                        else:
                            # Near this target's capacity the queue grows: no latency to measure.
                            # Measure at half its own saturation rate instead, and say so.
                            log(f"{target:<20} {n:>5} records: half nginx's rate ({rate:.0f}/s) is over "
                                f"{FIXED_RATE_MAX_SHARE} of this target's saturation ({own:.0f}/s); "
                                f"fixed rate at {own / 2:.0f}/s instead")
                            r = fixed_rate(args, work, target, n, base + path_of(n), wg_headers, own / 2, server)
                            r["rate_basis"] = (f"half own saturation (half nginx's rate is above "
                                               f"{FIXED_RATE_MAX_SHARE} of it)")
                            r["half_nginx_rate_overloads"] = True
                    fixed[str(n)][target] = r

        if args.profile:
            # Every target that proxies: the two audit modes side by side, and nginx and the
            # passthrough for the kernel's share of a proxied request and the HTTP stack's.
            n = 100 if 100 in args.sizes else args.sizes[0]
            result["profile"] = {}
            for target in [t for t in servers if t != "direct"]:
                gw, base, path_of, _, _ = servers[target]
                result["profile"][target] = profile(args, work, target, gw.pid, base + path_of(n), env,
                                                    results_path.parent, n)
        for target in servers:
            if target != "direct":
                procs.stop(target)

        if args.instructions > 0:
            result["instructions"] = instructions(args, procs, work, up_port, gw_path, wg_headers,
                                                  tokens["dpo"], results_path.parent)

        # Where a target ran at its own (lower) rate, the direct upstream at that same rate, so
        # that the added latency compares like with like.
        if "direct" in targets and args.fixed_duration > 0:
            with pinned("direct"):
                for n in args.sizes:
                    for t in TARGETS:
                        r = fixed[str(n)].get(t)
                        if r and r.get("half_nginx_rate_overloads"):
                            d = fixed_rate(args, work, "direct", n, f"http://127.0.0.1:{up_port}{store_path(n)}",
                                           wg_headers, r["target_rate"], upstream)
                            d["rate_basis"] = f"same rate as {t}"
                            fixed[str(n)][f"direct_at_{t}"] = d
        procs.stop("upstream")
    except KeyboardInterrupt:
        log("interrupted; stopping everything this run started")
        procs.stop_all()
        return 130
    finally:
        procs.stop_all()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    text = table(result)
    result["table"] = text.splitlines()
    bad = [f"{n}/{t}" for n, by in result["saturation"].items() for t, r in by.items() if sum(r["errors"].values())]
    bad += [f"{n}/{t} (fixed rate)" for n, by in result["fixed_rate"].items() for t, r in by.items()
            if r["non2xx"] or r["errors"] or r["unfinished"]]
    # Said in the file too: a reader of the JSON alone must not take an invalid run's figures.
    result["invalid_runs"] = bad
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"wardgate load test: persona {args.persona}, purpose {purpose}; pages "
          + ", ".join(f"{n} records = {pages[n]['bytes']} B" for n in args.sizes))
    print(text)
    if result["instructions"]:
        print("\nInstructions per request, wardgate with page-cache audit (callgrind, user space, all threads; "
              "valgrind hides SHA-NI, so the audit chain's SHA-256 runs in software here): "
              + ", ".join(f"{n} records {r['instructions_per_request']:,}" for n, r in result["instructions"].items()))
    print(f"results: {results_path}  (took {result['elapsed_s']:.0f}s)")
    if bad:
        print(f"INVALID: these runs had errors or non-2xx answers, so their figures mean nothing: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
