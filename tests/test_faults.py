"""Upstream fault matrix: with a warm cache, every kind of kube-dns failure leaves clients answered in time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import dns.exception
import dns.rcode
import pytest

from conftest import query
from servers import FakeUpstream

TTL = 1  # cached entries go stale one second after warming, so the fault is met stale too
DEADLINE = 1.0
MARGIN = 0.5  # scheduling and a loaded CI machine
FAILURE_RECHECK = 1.0
FAULT_SECONDS = 2.5
RECOVERY_SECONDS = FAILURE_RECHECK + DEADLINE + 3.0
PROXY_ARGS = (
    "--upstream-timeout",
    "0.5",
    "--deadline",
    str(DEADLINE),
    "--stale-answer-timeout",
    "0.4",
    "--failure-recheck",
    str(FAILURE_RECHECK),
)
CACHED = [f"c{i}.fault.test" for i in range(4)]
OLD_ADDRESS = "192.0.2.1"
NEW_ADDRESS = "192.0.2.2"  # what the upstream answers after the fault: proof of a fresh answer

# fault -> (FakeUpstream mode, extra proxy flags, rcodes an uncached name may get during the fault)
FAULTS = {
    "down": ("down", (), {dns.rcode.SERVFAIL}),
    "hang": ("hang", (), {dns.rcode.SERVFAIL}),
    "slow": ("slow", (), {dns.rcode.SERVFAIL}),  # answers 2 s late, past the 1 s deadline
    "servfail": ("servfail", (), {dns.rcode.SERVFAIL}),
    "refused": ("refused", (), {dns.rcode.SERVFAIL}),
    # TC=1 over UDP sends the proxy to TCP, where this upstream answers in full.
    "truncated": ("truncated", (), {dns.rcode.NOERROR, dns.rcode.SERVFAIL}),
    "garbage": ("garbage", (), {dns.rcode.SERVFAIL}),
    "tcp_close_midway": ("tcp_close_midway", ("--force-tcp",), {dns.rcode.SERVFAIL}),
    "flapping": ("flapping", (), {dns.rcode.NOERROR, dns.rcode.SERVFAIL}),
}


def addresses(reply) -> set[str]:
    return {rd.to_text() for rrset in reply.answer for rd in rrset}


def set_mode(upstream: FakeUpstream, mode: str) -> None:
    """Switch the upstream's mode, retrying for up to 5 s: leaving "down" rebinds its port, which a short-lived
    ephemeral socket may hold for a moment (seen once in a soak: EADDRINUSE)."""
    for _ in range(50):
        try:
            upstream.mode = mode
            return
        except OSError:
            upstream.mode = "down"  # a consistent state again, so the next try rebinds
            time.sleep(0.1)
    upstream.mode = mode


@contextmanager
def fault(upstream: FakeUpstream, mode: str) -> Iterator[None]:
    """Put the upstream in a fault mode; "flapping" switches between down and answer every second."""
    if mode != "flapping":
        set_mode(upstream, mode)
        yield
        return
    stop = threading.Event()

    def flap() -> None:
        modes = ["down", "answer"]
        index = 0
        while not stop.is_set():
            set_mode(upstream, modes[index % 2])
            index += 1
            stop.wait(1.0)

    thread = threading.Thread(target=flap, name="flapper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def timed_query(address: str, qname: str) -> tuple[float, object]:
    """(seconds taken, reply or the exception) of one UDP query with a client timeout well past the deadline."""
    started = time.monotonic()
    try:
        reply = query(address, qname, timeout=DEADLINE + 2.0)
    except dns.exception.Timeout as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, reply


@pytest.mark.parametrize("name", list(FAULTS))
def test_upstream_fault(proxy_factory, name):
    """During the fault no query waits past the deadline, cached names are always answered, uncached ones get
    SERVFAIL rather than silence; after it, fresh answers come back within a few failure-recheck periods."""
    mode, extra, uncached_rcodes = FAULTS[name]
    with FakeUpstream(ttl=TTL, delay=2 * DEADLINE) as upstream:
        proxy = proxy_factory("--upstream", upstream.address, *PROXY_ARGS, *extra)
        for qname in CACHED:
            assert addresses(query(proxy.address, qname)) == {OLD_ADDRESS}
        upstream.default_address = NEW_ADDRESS
        problems: list[str] = []
        slowest = 0.0
        answered = 0
        with fault(upstream, mode):
            end = time.monotonic() + FAULT_SECONDS
            round_number = 0
            while time.monotonic() < end:
                round_number += 1
                for qname in [*CACHED, f"u{round_number}-{time.monotonic_ns()}.fault.test"]:
                    took, reply = timed_query(proxy.address, qname)
                    slowest = max(slowest, took)
                    if took > DEADLINE + MARGIN:
                        problems.append(f"{qname}: {took:.2f} s")
                    if isinstance(reply, Exception):
                        problems.append(f"{qname}: no answer")
                        continue
                    answered += 1
                    if qname in CACHED:
                        if reply.rcode() != dns.rcode.NOERROR or not addresses(reply) <= {OLD_ADDRESS, NEW_ADDRESS}:
                            problems.append(f"cached {qname}: {dns.rcode.to_text(reply.rcode())} {addresses(reply)}")
                        elif not reply.answer:
                            problems.append(f"cached {qname}: empty answer")
                    elif reply.rcode() not in uncached_rcodes:
                        problems.append(f"uncached {qname}: {dns.rcode.to_text(reply.rcode())}")
        set_mode(upstream, "answer")
        recovered_after = None
        started = time.monotonic()
        while time.monotonic() - started < RECOVERY_SECONDS:
            fresh = [
                addresses(query(proxy.address, qname, timeout=DEADLINE + 2.0)) == {NEW_ADDRESS} for qname in CACHED
            ]
            uncached = query(proxy.address, f"after-{time.monotonic_ns()}.fault.test", timeout=DEADLINE + 2.0)
            if all(fresh) and uncached.rcode() == dns.rcode.NOERROR:
                recovered_after = time.monotonic() - started
                break
            time.sleep(0.2)
    print(
        f"\n{name}: {answered} answers during the fault, slowest {slowest:.2f} s, recovered after {recovered_after} s"
    )
    assert not problems, problems
    assert recovered_after is not None, f"no fresh answers within {RECOVERY_SECONDS} s after the fault ended"
    assert "Traceback" not in proxy.stdout() + proxy.stderr()
