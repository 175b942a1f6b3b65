"""Benchmark of cache persistence: save and load time, file size, and the longest event-loop pause during a save.

Run by hand from the repository root: `python bench/persist_bench.py [--entries 100000] [--runs 3] [--dir DIR]`.
No network: the cache is filled with built answers (Kubernetes-style names: A, AAAA and NXDOMAIN
with SOA, as a node's cache holds them), then saved with the proxy's own CachePersister while a
greenlet ticks every millisecond and records the longest gap between two ticks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import gevent
import structlog

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cache import AnswerCache, TtlPolicy, entry_from_reply  # noqa: E402
from persist import CachePersister  # noqa: E402

TICK = 0.001
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHHIH")  # compression pointer, type, class, ttl, rdlength


def qname_wire(name: str) -> bytes:
    return b"".join(bytes((len(label),)) + label.encode() for label in name.rstrip(".").split(".")) + b"\x00"


def build_reply(index: int) -> tuple[bytes, bytes]:
    """(cache key, upstream reply) number index: 80 % A, 10 % AAAA, 10 % NXDOMAIN with an SOA."""
    kind = index % 10
    name = f"svc-{index}.ns-{index % 200}.svc.cluster.local"
    qtype = 28 if kind == 8 else 1
    question = qname_wire(name) + struct.pack("!HH", qtype, 1)
    ttl = 5 + index % 60  # some of them are stale when the save runs
    if kind == 9:
        soa = (
            qname_wire("ns.dns.cluster.local")
            + qname_wire("hostmaster.cluster.local")
            + struct.pack("!IIIII", 1, 7200, 1800, 86400, 5)
        )
        zone = qname_wire("cluster.local")
        records = zone + struct.pack("!HHIH", 6, 1, 5, len(soa)) + soa
        header = _HEADER.pack(index & 0xFFFF, 0x8183, 1, 0, 1, 0)
    elif qtype == 28:
        records = _RR.pack(0xC00C, 28, 1, ttl, 16) + bytes(14) + struct.pack("!H", index & 0xFFFF)
        header = _HEADER.pack(index & 0xFFFF, 0x8180, 1, 1, 0, 0)
    else:
        records = _RR.pack(0xC00C, 1, 1, ttl, 4) + struct.pack("!I", 0x0A600000 + index)
        header = _HEADER.pack(index & 0xFFFF, 0x8180, 1, 1, 0, 0)
    # Cache key as wire.parse_query makes it: lower-cased qname, qtype, qclass, DO/CD byte.
    return question + b"\x00", header + question + records


def fill(entries: int) -> AnswerCache:
    cache = AnswerCache(entries)
    policy = TtlPolicy()
    base = time.monotonic() - 30  # stored 30 s ago: a mix of fresh and stale entries
    for index in range(entries):
        key, reply = build_reply(index)
        entry, cacheable = entry_from_reply(reply, policy, base)
        assert cacheable
        cache.store(key, entry)
    return cache


def longest_pause_during(action) -> tuple[float, float, float, object]:
    """(longest wall-clock gap between 1 ms ticks, the longest in this thread's CPU time, wall time of action,
    its result) while action runs.

    The CPU-time gap is the loop's own stall; the wall-clock gap adds whatever the OS scheduler took
    away (on a busy machine, other processes), so both are reported.
    """
    gaps = []
    cpu_gaps = []
    running = True

    def ticker() -> None:
        last = time.perf_counter()
        last_cpu = time.thread_time()
        while running:
            gevent.sleep(TICK)
            now = time.perf_counter()
            now_cpu = time.thread_time()
            gaps.append(now - last)
            cpu_gaps.append(now_cpu - last_cpu)
            last, last_cpu = now, now_cpu

    greenlet = gevent.spawn(ticker)
    gevent.sleep(0.02)  # the ticker is running before the action starts
    gaps.clear()
    cpu_gaps.clear()
    started = time.perf_counter()
    result = action()
    took = time.perf_counter() - started
    gevent.sleep(2 * TICK)
    running = False
    greenlet.join()
    return max(gaps, default=took), max(cpu_gaps, default=took), took, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="directory of the cache file (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    log = structlog.get_logger()

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="persist-bench-"))
    path = str(workdir / "cache.bin")
    cache = fill(args.entries)
    idle_pause, _, _, _ = longest_pause_during(lambda: gevent.sleep(0.2))
    saves, pauses, cpu_pauses, loads = [], [], [], []
    size = 0
    for _ in range(args.runs):
        persister = CachePersister(path, cache, float("inf"), log)
        pause, cpu_pause, took, ok = longest_pause_during(persister.save)
        assert ok, "save failed"
        saves.append(took)
        pauses.append(pause)
        cpu_pauses.append(cpu_pause)
        size = os.path.getsize(path)
        fresh = AnswerCache(args.entries)
        loader = CachePersister(path, fresh, float("inf"), log)
        started = time.perf_counter()
        result = loader.load()
        loads.append(time.perf_counter() - started)
        assert result.entries == persister.last_save_entries == args.entries, result
    report = {
        "entries": args.entries,
        "runs": args.runs,
        "file_bytes": size,
        "save_seconds_median": round(statistics.median(saves), 3),
        "save_seconds_max": round(max(saves), 3),
        "load_seconds_median": round(statistics.median(loads), 3),
        "load_seconds_max": round(max(loads), 3),
        "longest_pause_ms_during_save": round(max(pauses) * 1000, 1),
        "longest_pause_ms_per_run": [round(p * 1000, 1) for p in pauses],
        "longest_pause_cpu_ms_during_save": round(max(cpu_pauses) * 1000, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "longest_pause_ms_idle": round(idle_pause * 1000, 1),
        "cache_file": path,
        "python": sys.version.split()[0],
        "gevent": gevent.__version__,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for name, value in report.items():
            print(f"{name:32} {value}")
    if args.dir is None:
        os.unlink(path)
        workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
