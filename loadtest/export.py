#!/usr/bin/env python3
"""Streamed export benchmark: N records (default 1,000,000) as NDJSON through wardgate, with
throughput and peak memory, side by side with nginx serving the same file directly and nginx
`proxy_pass` in front of it, measured in the same run.

1. Runs `wardgate demo` briefly and takes its datastore's export (`/electors/export`) as seed
   records; writes N records to a file by repeating them with fresh elector ids.
2. nginx serves that file as the upstream's `/electors/export` (application/x-ndjson).
3. Downloads it (one client, `curl`, on core 0) from: nginx directly, nginx proxy_pass, and
   `wardgate serve` (fsync audit, on core 1) as the analyst persona under `profiling`.
4. Prints MB/s in (upstream bytes) and out, records out, and wardgate's peak resident memory
   (VmHWM from /proc, for the whole life of the process) before and after the export, and
   checks the audit log's chunk records list exactly the records that came out.

Run it through `bash loadtest/run.sh --export` (builds wardgate, installs nginx if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for {pid}")


def seed_records(args, procs: h.Procs, work: Path) -> tuple[list[bytes], dict]:
    demo_dir = work / "demo"
    listen, admin = h.free_port(), h.free_port()
    h.log(f"generating {args.seed} seed electors with `wardgate demo`")
    procs.start("demo", [args.bin, "demo", "--listen", f"127.0.0.1:{listen}", "--admin",
                         f"127.0.0.1:{admin}", "--data-dir", str(demo_dir), "--electors",
                         str(args.seed)], None, work / "demo.log")
    h.wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=120)
    cfg = (demo_dir / "wardgate.toml").read_text()
    upstream = cfg.split('upstream = "http://', 1)[1].split('"', 1)[0]
    status, _, body = h.fetch(f"http://{upstream}/electors/export", timeout=120)
    if status != 200:
        raise RuntimeError(f"demo datastore export answered {status}")
    tokens = json.loads((demo_dir / "tokens.json").read_text())
    procs.stop("demo")
    return [line for line in body.split(b"\n") if line.strip()], tokens


def write_file(seed: list[bytes], n: int, path: Path) -> int:
    written = 0
    with path.open("wb") as f:
        copy = 0
        while written < n:
            for line in seed:
                if written >= n:
                    break
                # Unique ids per copy, so the audit can be checked record for record.
                f.write(line.replace(b'"elector_id":"VF-', b'"elector_id":"VF%03d-' % copy, 1))
                f.write(b"\n")
                written += 1
            copy += 1
    return path.stat().st_size


def download(url: str, headers: dict, out: Path) -> dict:
    argv = ["taskset", "-c", "0", "curl", "-sS", "--fail", "-o", str(out), "-w",
            "%{size_download} %{time_total}"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    r = subprocess.run(argv + [url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{url}: curl {r.returncode}: {r.stderr.decode(errors='replace')}")
    size, secs = r.stdout.decode().split()
    return {"bytes_out": int(size), "seconds": float(secs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=20_000, help="demo electors to repeat")
    ap.add_argument("--results", default=str(h.HERE / "results" / "export-latest.json"))
    ap.add_argument("--profile", action="store_true",
                    help="perf-record wardgate during its export and print the top of the profile")
    args = ap.parse_args()
    work = Path(args.work)
    procs = h.Procs(work / "pids")
    try:
        seed, tokens = seed_records(args, procs, work)
        www = work / "www"
        (www / "electors").mkdir(parents=True, exist_ok=True)
        src = www / "electors" / "export"
        size_in = write_file(seed, args.records, src)
        h.log(f"{args.records} records, {size_in / 1e6:.0f} MB of NDJSON")

        up_port, proxy_port = h.free_port(), h.free_port()
        conf = h.nginx_conf(work / "nginx-upstream", f"""
    server {{
        listen 127.0.0.1:{up_port};
        root {www};
        location = /electors/export {{ types {{ }} default_type application/x-ndjson; }}
        location / {{ return 404; }}
    }}""")
        procs.start("upstream", ["nginx", "-c", str(conf), "-p", str(work / "nginx-upstream")], 0,
                    work / "nginx-upstream.log")
        h.wait_http(f"http://127.0.0.1:{up_port}/electors/export", timeout=20)
        h.start_nginx_proxy(procs, work, proxy_port, up_port)
        wg, wg_port, _ = h.start_wardgate(args, procs, work, "wardgate_fsync", "fsync", up_port, args.bin)
        rss_idle = vm(wg.pid, "VmHWM")

        auth = {"Authorization": f"Bearer {tokens['analyst']}", "X-Purpose": "profiling"}
        rows = []
        for name, url, headers in [
            ("nginx direct", f"http://127.0.0.1:{up_port}/electors/export", {}),
            ("nginx proxy_pass", f"http://127.0.0.1:{proxy_port}/electors/export", {}),
            ("wardgate (filter + fsync audit)", f"http://127.0.0.1:{wg_port}/voter/electors/export", auth),
        ]:
            out = work / f"out-{len(rows)}.ndjson"
            h.log(f"downloading through {name}")
            perf = None
            if args.profile and name.startswith("wardgate"):
                perf = subprocess.Popen(["perf", "record", "-q", "-F", "499", "-e", "cpu-clock", "--call-graph", "dwarf,32768",
                                         "-p", str(wg.pid), "-o", str(work / "perf.data")])
                time.sleep(0.5)
            ticks = h.cpu_ticks(wg.pid)
            r = download(url, headers, out)
            # How busy wardgate's core was: near 100% means wardgate was the bottleneck.
            r["wardgate_core_busy"] = (h.cpu_ticks(wg.pid) - ticks) / h.CLK_TCK / r["seconds"]
            if perf is not None:
                perf.send_signal(2)
                perf.wait(timeout=120)
            r["name"] = name
            r["records_out"] = sum(1 for _ in out.open("rb"))
            r["mb_in_per_s"] = size_in / 1e6 / r["seconds"]
            r["mb_out_per_s"] = r["bytes_out"] / 1e6 / r["seconds"]
            rows.append(r)
            if name.startswith("wardgate"):
                r["peak_rss_bytes"] = vm(wg.pid, "VmHWM")
                r["idle_peak_rss_bytes"] = rss_idle
                ids_out = [json.loads(l)["elector_id"] for l in out.open("rb")]
            out.unlink()

        # The audit log lists exactly what came out, chunk by chunk.
        time.sleep(0.5)
        audited = []
        complete = None
        for seg in sorted((work / "demo" / "audit-wardgate_fsync").glob("seg-*.jsonl")):
            for line in seg.open("rb"):
                # The segment being written is made ready as zeros and written over: its
                # records end at the first NUL, as the gateway's own readers take them.
                line = line.split(b"\0", 1)[0]
                if not line.strip():
                    continue
                rec = json.loads(line)
                if rec.get("route") != "voter.export":
                    continue
                detail = rec.get("detail") or {}
                if "export_chunk" in detail:
                    audited.extend(rec["subjects"])
                if "export_complete" in detail:
                    complete = detail["export_complete"]
        audit_ok = audited == ids_out and complete is not None
        base = rows[0]["seconds"]
        print()
        print(f"{'':34}{'seconds':>9}{'MB/s in':>9}{'MB/s out':>10}{'records out':>13}{'x direct':>10}"
              f"{'wardgate core':>15}")
        for r in rows:
            print(f"{r['name']:34}{r['seconds']:9.2f}{r['mb_in_per_s']:9.0f}{r['mb_out_per_s']:10.0f}"
                  f"{r['records_out']:13,}{base / r['seconds']:10.2f}{r['wardgate_core_busy']:14.0%}")
        wr = rows[-1]
        print(f"\nwardgate peak resident memory: {wr['peak_rss_bytes'] / 2**20:.1f} MiB over the whole run "
              f"({wr['idle_peak_rss_bytes'] / 2**20:.1f} MiB before the export)")
        print(f"audit: {len(audited):,} subjects in chunk records, "
              f"{'exactly' if audit_ok else 'NOT'} the records that left; completion record: {complete}")
        if args.profile:
            report = subprocess.run(["perf", "report", "-i", str(work / "perf.data"), "--stdio",
                                     "--no-children", "--percent-limit", "1.5", "-g", "none"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=600)
            print(report.stdout.decode(errors="replace"))
        result = {"records": args.records, "bytes_in": size_in, "rows": rows, "audit_matches": audit_ok,
                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(result, indent=2))
        h.log(f"results written to {args.results}")
        return 0 if audit_ok else 1
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
