"""The cache survives restarts: the file format, the wall-clock conversion, bad files, and real restarts."""

from __future__ import annotations

import math
import os
import random
import signal
import struct
import time
from pathlib import Path

import dns.edns
import dns.rcode
import dnslib
import gevent
import pytest

import persist
import wire
from cache import AnswerCache, Entry, TtlPolicy, entry_from_reply
from conftest import Clock, query
from persist import CacheFileError, CachePersister, Record
from servers import KUBERNETES, WEB, free_port

FAST = ("--upstream-timeout", "0.5", "--deadline", "1.0", "--stale-answer-timeout", "0.3")
SAVED_AT = 1_000_000.0  # wall clock of the fake saves


class ListLog:
    """A logger that keeps (level, event, fields) of every call."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        def log(event: str, **fields) -> None:
            self.lines.append((level, event, fields))

        return log

    def events(self, level: str | None = None) -> list[str]:
        return [event for lvl, event, _ in self.lines if level is None or lvl == level]


def make_answer(qname: str = "web.default.svc.cluster.local", address: str = "10.96.0.20", ttl: int = 300):
    """(key, stored wire, ttl offsets) of a cacheable A answer, as the proxy would store it."""
    question = dnslib.DNSRecord.question(qname, "A")
    reply = question.reply()
    reply.add_answer(dnslib.RR(qname, dnslib.QTYPE.A, rdata=dnslib.A(address), ttl=ttl))
    entry, cacheable = entry_from_reply(bytes(reply.pack()), TtlPolicy(), 0.0)
    assert cacheable
    return wire.parse_query(bytes(question.pack())).key, entry.wire, entry.ttl_offsets


def make_record(index: int = 0, ttl: int = 300, expires_in: float = 100.0, **changes: object) -> Record:
    """A record of a valid entry saved at SAVED_AT, expiring expires_in seconds after the save."""
    key, reply, offsets = make_answer(f"svc-{index}.default.svc.cluster.local", ttl=ttl)
    record = Record(key, reply, offsets, ttl, SAVED_AT + expires_in, 0)
    return record._replace(**changes)


def records_in_order(cache: AnswerCache) -> list[bytes]:
    return [key for key, _ in cache.entries()]


class TestFormat:
    """The file format: framing, version and checksum."""

    def test_round_trip(self):
        """decode gives back what encode wrote, in order."""
        records = [make_record(i, expires_in=10.0 * i) for i in range(5)]
        saved_at, decoded = persist.decode(persist.encode(SAVED_AT, records))
        assert saved_at == SAVED_AT
        assert decoded == records

    @pytest.mark.parametrize(
        "damage, reason",
        [
            (lambda data: b"", "empty"),
            (lambda data: data[:20], "shorter than the header"),
            (lambda data: data[: len(data) - 7], "truncated"),
            (lambda data: b"NOTCACHE" + data[8:], "bad magic"),
            (lambda data: data[:8] + struct.pack("!H", 2) + data[10:], "unsupported version 2"),
            (lambda data: data[:-1] + bytes((data[-1] ^ 1,)), "checksum"),
            (lambda data: random.Random(6).randbytes(4096), "bad magic"),
        ],
        ids=["empty", "short", "truncated", "magic", "version", "checksum", "random"],
    )
    def test_damaged_file_rejected(self, damage, reason):
        """A damaged file is refused with a reason, never half read."""
        data = persist.encode(SAVED_AT, [make_record(i) for i in range(3)])
        with pytest.raises(CacheFileError, match=reason):
            persist.decode(damage(data))

    def test_checksummed_bad_framing_rejected(self):
        """A body whose entry lengths run past its end is refused even with a matching checksum."""
        data = persist.encode(SAVED_AT, [make_record()])
        count = struct.pack("!I", 2)  # claims two entries, holds one
        with pytest.raises(CacheFileError, match="runs past the end"):
            persist.decode(data[:12] + count + data[16:])

    def test_nonsense_save_time_rejected(self):
        """A save time that is not a number is refused: every expiry is measured from it."""
        with pytest.raises(CacheFileError, match="save time"):
            persist.decode(persist.encode(math.nan, [make_record()]))


class TestCheckRecord:
    """Every entry is checked before any is used: the cache itself could have stored it."""

    def test_valid_record_accepted(self):
        """A record made from a real answer passes."""
        persist.check_record(make_record(), SAVED_AT)

    @pytest.mark.parametrize(
        "changes, reason",
        [
            ({"ttl": 2**32 - 1}, "ttl"),
            ({"expires_wall": math.nan}, "finite"),
            ({"expires_wall": SAVED_AT + 10_000}, "further away than the ttl"),
            ({"wire": b"\x00" * 5, "ttl_offsets": ()}, "does not parse"),
            ({"ttl_offsets": (9999,)}, "offsets"),
            ({"ttl_offsets": ()}, "offsets"),
            ({"key": b"\x03foo\x00\x00\x01\x00\x01\x00"}, "key"),
            ({"key": make_record().key[:-1] + b"\x08"}, "key"),  # a flag bit beyond DO, CD and the raw mark
        ],
        ids=["ttl", "nan-expiry", "expiry-past-ttl", "short-wire", "offset-out", "offsets-missing", "key", "key-bits"],
    )
    def test_nonsense_record_rejected(self, changes, reason):
        """A record with a value the cache could never have stored is refused."""
        with pytest.raises(CacheFileError, match=reason):
            persist.check_record(make_record(**changes), SAVED_AT)

    def test_uncacheable_answer_rejected(self):
        """A stored SERVFAIL is refused: the cache never keeps one."""
        record = make_record()
        reply = bytearray(record.wire)
        reply[3] = (reply[3] & 0xF0) | wire.SERVFAIL
        with pytest.raises(CacheFileError, match="not one the cache keeps"):
            persist.check_record(record._replace(wire=bytes(reply)), SAVED_AT)


class TestRestore:
    """Wall-clock expiry back to monotonic time, with a fake clock for each."""

    def restore(self, records, wall_now, max_stale=math.inf, size=100, mono=5000.0):
        cache = AnswerCache(size, timer=Clock(mono))
        result = persist.restore(cache, SAVED_AT, records, max_stale, wall_now)
        return cache, result

    def test_remaining_freshness_counts_the_downtime(self):
        """An entry with 100 s left at the save, loaded 40 s later, has 60 s left."""
        record = make_record(expires_in=100.0)
        cache, result = self.restore([record], SAVED_AT + 40)
        entry = cache.lookup(record.key)
        assert entry.remaining_ttl(5000.0) == pytest.approx(60.0)
        assert entry.ttl == 300 and result.entries == 1 and result.stale == 0

    def test_expired_entry_comes_back_stale(self):
        """An entry that expired while the proxy was down comes back stale by that much."""
        record = make_record(expires_in=100.0)
        cache, result = self.restore([record], SAVED_AT + 150)
        entry = cache.lookup(record.key)
        assert entry.is_stale(5000.0)
        assert entry.stale_for(5000.0) == pytest.approx(50.0)
        assert result.stale == 1

    def test_clock_gone_back_does_not_extend_ttl(self):
        """If the wall clock is behind the save time, an entry keeps what it had left at the save."""
        record = make_record(expires_in=100.0)
        cache, _ = self.restore([record], SAVED_AT - 3600)
        assert cache.lookup(record.key).remaining_ttl(5000.0) == pytest.approx(100.0)

    def test_past_max_stale_dropped(self):
        """An entry stale for longer than max_stale is not loaded."""
        old, recent = make_record(0, expires_in=-100.0), make_record(1, expires_in=-10.0)
        cache, result = self.restore([old, recent], SAVED_AT, max_stale=30)
        assert records_in_order(cache) == [recent.key]
        assert result.dropped == 1

    def test_stale_serving_off_drops_every_stale_entry(self):
        """With max_stale 0 only fresh entries are loaded."""
        stale, fresh = make_record(0, expires_in=-1.0), make_record(1, expires_in=10.0)
        cache, result = self.restore([stale, fresh], SAVED_AT, max_stale=0)
        assert records_in_order(cache) == [fresh.key] and result.dropped == 1

    def test_lru_order_restored(self):
        """Entries come back in the least-recently-used order they were saved in."""
        records = [make_record(i) for i in (3, 1, 4, 0, 2)]
        cache, _ = self.restore(records, SAVED_AT)
        assert records_in_order(cache) == [r.key for r in records]

    def test_capacity_keeps_most_recently_used(self):
        """A smaller cache keeps the most recently used entries."""
        records = [make_record(i) for i in range(10)]
        cache, result = self.restore(records, SAVED_AT, size=4)
        assert records_in_order(cache) == [r.key for r in records[6:]]
        assert result.over_capacity == 6 and cache.evictions == 0

    def test_one_bad_record_rejects_the_whole_file(self):
        """A nonsense record anywhere means nothing is loaded."""
        records = [make_record(0), make_record(1, ttl_offsets=(9999,)), make_record(2)]
        cache = AnswerCache(100)
        with pytest.raises(CacheFileError):
            persist.restore(cache, SAVED_AT, records, math.inf, SAVED_AT)
        assert len(cache) == 0

    def test_duplicate_keys_rejected(self):
        """A snapshot of a dict cannot hold a key twice: such a file is refused."""
        with pytest.raises(CacheFileError, match="duplicate"):
            persist.restore(AnswerCache(100), SAVED_AT, [make_record(0), make_record(0)], math.inf, SAVED_AT)


class TestPersister:
    """Saving and loading through files, with fake clocks."""

    def make(self, path: Path, mono: float, wall: float, size: int = 100):
        cache = AnswerCache(size, timer=Clock(mono))
        log = ListLog()
        return CachePersister(str(path), cache, math.inf, log, wall=Clock(wall)), cache, log

    def fill(self, cache: AnswerCache, count: int, ttl: int = 300) -> list[bytes]:
        keys = []
        for index in range(count):
            key, reply, offsets = make_answer(f"svc-{index}.default.svc.cluster.local", ttl=ttl)
            cache.store(key, Entry(reply, offsets, ttl, cache.timer()))
            keys.append(key)
        return keys

    def test_save_then_load_keeps_wall_clock_freshness(self, tmp_path):
        """Saved with 300 s left, loaded 100 s of wall time later in another monotonic epoch: 200 s left."""
        saver, cache, _ = self.make(tmp_path / "cache", mono=10.0, wall=SAVED_AT)
        keys = self.fill(cache, 3)
        cache.lookup(keys[0]).hits = 7
        assert saver.save()
        loader, loaded, log = self.make(tmp_path / "cache", mono=99_999.0, wall=SAVED_AT + 100)
        assert loader.load().entries == 3
        entry = loaded.lookup(keys[0])
        assert entry.remaining_ttl(99_999.0) == pytest.approx(200.0)
        assert entry.hits == 7
        assert log.events() == ["cache_loaded"]

    def test_save_keeps_lru_order(self, tmp_path):
        """An entry looked up before the save comes back as the most recently used."""
        saver, cache, _ = self.make(tmp_path / "cache", mono=10.0, wall=SAVED_AT)
        first, second, third = self.fill(cache, 3)
        cache.lookup(first)
        assert saver.save()
        loader, loaded, _ = self.make(tmp_path / "cache", mono=10.0, wall=SAVED_AT)
        loader.load()
        assert records_in_order(loaded) == [second, third, first]

    def test_file_private_and_no_temporary_left(self, tmp_path):
        """The file is mode 0600 and the temporary file is gone after the rename."""
        saver, cache, _ = self.make(tmp_path / "cache", mono=10.0, wall=SAVED_AT)
        self.fill(cache, 2)
        assert saver.save()
        assert os.stat(tmp_path / "cache").st_mode & 0o777 == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]

    def test_save_failure_logged_not_raised(self, tmp_path):
        """A file that cannot be written gives one warning and False, never an exception."""
        saver, cache, log = self.make(tmp_path / "no-such-dir" / "cache", mono=10.0, wall=SAVED_AT)
        self.fill(cache, 1)
        assert saver.save() is False
        assert log.events("warning") == ["cache_save_failed"]

    def test_save_yields_to_other_greenlets(self, tmp_path):
        """While a large cache is serialised, other greenlets keep running."""
        saver, cache, _ = self.make(tmp_path / "cache", mono=10.0, wall=SAVED_AT, size=20_000)
        self.fill(cache, 20_000)
        ticks = 0

        def ticker() -> None:
            nonlocal ticks
            while True:
                gevent.sleep(0.001)
                ticks += 1

        greenlet = gevent.spawn(ticker)
        gevent.sleep(0)
        try:
            saver.serialise()
        finally:
            greenlet.kill()
        assert ticks >= 5

    def test_missing_file_is_normal(self, tmp_path):
        """No file: an empty cache and one info line, nothing set aside."""
        loader, cache, log = self.make(tmp_path / "cache", mono=10.0, wall=SAVED_AT)
        assert loader.load().entries == 0
        assert log.lines == [("info", "cache_file_missing", {"path": str(tmp_path / "cache")})]
        assert list(tmp_path.iterdir()) == []

    def test_bad_file_set_aside(self, tmp_path):
        """A bad file is renamed PATH.corrupt-<time> with one warning line giving the reason."""
        path = tmp_path / "cache"
        path.write_bytes(b"garbage")
        loader, cache, log = self.make(path, mono=10.0, wall=SAVED_AT)
        loader.load()
        set_aside = tmp_path / f"cache.corrupt-{int(SAVED_AT)}"
        assert set_aside.read_bytes() == b"garbage" and not path.exists()
        [(level, event, fields)] = log.lines
        assert (level, event, fields["set_aside"]) == ("warning", "cache_file_rejected", str(set_aside))
        assert len(cache) == 0


# --- real proxies -------------------------------------------------------------------------------


def events(proxy, name: str) -> list[dict]:
    return [line for line in proxy.logs() if line.get("event") == name]


def answer_ttls(reply) -> set[int]:
    return {rrset.ttl for rrset in reply.answer}


def addresses(reply) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def test_restart_with_upstream_down_answers_warmed_names_stale(knot, proxy_factory, tmp_path):
    """Warmed via Knot, SIGTERM, restarted with no upstream: warmed names come stale (TTL 30), others SERVFAIL."""
    cache_file = str(tmp_path / "cache")
    first = proxy_factory("--upstream", knot.address, "--cache-file", cache_file, "--max-ttl", "1")
    assert addresses(query(first.address, KUBERNETES)) == ["10.96.0.1"]
    assert addresses(query(first.address, WEB, "AAAA")) == ["fd00:10:96::20"]
    assert first.stop() == 0
    assert [e["entries"] for e in events(first, "cache_saved") if e["reason"] == "shutdown"] == [2]
    time.sleep(1.1)  # past the 1 s TTL: the entries are stale when loaded

    second = proxy_factory("--upstream", f"127.0.0.1:{free_port()}", "--cache-file", cache_file, *FAST)
    [loaded] = events(second, "cache_loaded")
    assert (loaded["entries"], loaded["stale"]) == (2, 2)
    reply = query(second.address, KUBERNETES, edns=1232)
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["10.96.0.1"]
    assert answer_ttls(reply) == {30}
    assert [o.code for o in reply.options if o.otype == dns.edns.OptionType.EDE] == [3]  # Stale Answer
    assert addresses(query(second.address, WEB, "AAAA")) == ["fd00:10:96::20"]
    assert query(second.address, "nothere.default.svc.cluster.local").rcode() == dns.rcode.SERVFAIL


def test_restart_keeps_remaining_ttl_of_fresh_entry(knot, proxy_factory, tmp_path):
    """A name still fresh after a restart is answered fresh with its remaining TTL, never a renewed one."""
    cache_file = str(tmp_path / "cache")
    first = proxy_factory("--upstream", knot.address, "--cache-file", cache_file)
    warmed_at = time.monotonic()
    assert answer_ttls(query(first.address, KUBERNETES)) == {30}
    first.stop()
    time.sleep(2.0)

    second = proxy_factory("--upstream", f"127.0.0.1:{free_port()}", "--cache-file", cache_file, *FAST)
    elapsed = time.monotonic() - warmed_at
    reply = query(second.address, KUBERNETES, edns=1232)
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["10.96.0.1"]
    [ttl] = answer_ttls(reply)
    assert 30 - int(elapsed) - 2 <= ttl <= 30 - int(elapsed)
    assert not [o for o in reply.options if o.otype == dns.edns.OptionType.EDE]


def test_kill9_during_saves_never_leaves_unreadable_file(fake_upstream, proxy_factory, tmp_path):
    """kill -9 at random moments while saving every 20 ms: the file always reads, and the next start loads it all."""
    cache_file = tmp_path / "cache"
    flags = ("--upstream", fake_upstream.address, "--cache-file", str(cache_file), "--save-interval", "0.02")
    proxy = proxy_factory(*flags)
    for index in range(2000):
        query(proxy.address, f"name-{index}.example")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until a save holds every name
        if cache_file.exists() and len(persist.decode(cache_file.read_bytes())[1]) == 2000:
            break
        time.sleep(0.05)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    deadline = time.monotonic() + 60
    temporary = tmp_path / "cache.tmp"
    kills = mid_write = 0
    while kills < 15 and time.monotonic() < deadline:
        if kills % 2:
            time.sleep(rng.uniform(0.0, 0.3))  # any moment
        else:
            # Aimed at the write itself: a few milliseconds after the temporary file appears.
            seen_by = time.monotonic() + 2
            while not temporary.exists() and time.monotonic() < seen_by:
                time.sleep(0.0002)
            time.sleep(rng.uniform(0.0, 0.001))
        os.kill(proxy.pid, signal.SIGKILL)
        proxy.proc.wait(timeout=10)
        kills += 1
        mid_write += temporary.exists()
        # Whatever instant the kill hit, the file is a complete snapshot (the old one or the new one).
        _, records = persist.decode(cache_file.read_bytes())
        proxy = proxy_factory(*flags)
        [loaded] = events(proxy, "cache_loaded")
        assert loaded["entries"] + loaded["dropped"] + loaded["over_capacity"] == len(records), f"seed {seed}"
        assert loaded["entries"] == 2000, f"seed {seed}"
        assert not events(proxy, "cache_file_rejected"), f"seed {seed}"
    assert kills == 15
    assert mid_write >= 1, "no kill landed inside a write: the test proved nothing"


def valid_file() -> bytes:
    return persist.encode(SAVED_AT, [make_record(0, expires_in=10.0), make_record(1, expires_in=20.0)])


def with_version(version: int) -> bytes:
    data = valid_file()
    return data[:8] + struct.pack("!H", version) + data[10:]


def with_checksum_broken() -> bytes:
    data = valid_file()
    return data[:-1] + bytes((data[-1] ^ 0xFF,))


def with_record(**changes: object) -> bytes:
    return persist.encode(SAVED_AT, [make_record(0), make_record(1, **changes)])


BAD_FILES = {
    "empty": lambda: b"",
    "truncated": lambda: valid_file()[:100],
    "random": lambda: random.Random(6).randbytes(8192),
    "wrong_version": lambda: with_version(99),
    "bad_checksum": with_checksum_broken,
    "nonsense_ttl": lambda: with_record(ttl=2**32 - 1),
    "ttl_extended": lambda: with_record(expires_wall=SAVED_AT + 10**6),
    "nonsense_offsets": lambda: with_record(ttl_offsets=(65000,)),
    "short_wire": lambda: with_record(wire=b"\x00\x01", ttl_offsets=()),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_set_aside_and_clean_start(fake_upstream, proxy_factory, tmp_path, kind):
    """A bad cache file is renamed aside with one warning line; the proxy starts empty and serves."""
    cache_file = tmp_path / "cache"
    content = BAD_FILES[kind]()
    cache_file.write_bytes(content)
    proxy = proxy_factory("--upstream", fake_upstream.address, "--cache-file", str(cache_file))
    warnings = [line for line in proxy.logs() if line.get("level") == "warning"]
    assert [w["event"] for w in warnings] == ["cache_file_rejected"]
    set_aside = Path(warnings[0]["set_aside"])
    assert set_aside.name.startswith("cache.corrupt-") and set_aside.read_bytes() == content
    assert not cache_file.exists()
    assert not events(proxy, "cache_loaded")
    assert addresses(query(proxy.address, "svc.example")) == ["192.0.2.1"]
    assert fake_upstream.count("svc.example") == 1  # from the upstream: nothing was loaded
    assert "Traceback" not in proxy.stderr()


def test_missing_file_is_a_normal_start(fake_upstream, proxy_factory, tmp_path):
    """Without a cache file the proxy starts empty with an info line and no warning."""
    proxy = proxy_factory("--upstream", fake_upstream.address, "--cache-file", str(tmp_path / "cache"))
    assert [e["level"] for e in events(proxy, "cache_file_missing")] == ["info"]
    assert not [line for line in proxy.logs() if line.get("level") == "warning"]
