"""Cache persistence: snapshot the cache to disk and load it back."""

from __future__ import annotations

import fcntl
import gc
import hashlib
import math
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import gevent
import gevent.event
import gevent.lock

import wire
from cache import AnswerCache, Entry

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

# File layout (all integers big-endian):
#   header  magic "KDPCACHE" | version u16 | reserved u16 | entry count u32 | body length u64 | sha256(body)
#   body    saved_at f64 (wall clock) | entries, least recently used first
#   entry   key length u16 | wire length u16 | TTL offset count u16 | ttl u32 | expires_at f64 (wall clock)
#           | hits u32 | key | wire | TTL offsets (u16 each)
# A compact struct framing, never pickle: reading a file must not be able to run code.
MAGIC = b"KDPCACHE"
VERSION = 1
HEADER = struct.Struct("!8sHHIQ32s")
RECORD = struct.Struct("!HHHIdI")
SAVED_AT = struct.Struct("!d")
MAX_TTL = 2**31 - 1  # RFC 2181 §8
MAX_U32 = 2**32 - 1
# Clock jitter allowed between an entry's expiry and the save time (float rounding of wall + monotonic).
EXPIRY_SLACK = 0.01
SLICE = 2000  # entries serialised between two yields to the event loop (about 2 ms of work)
# A yield with a timer, not sleep(0): sleep(0) only runs other callbacks, and the loop does not poll
# sockets or fire timers until the whole chain of sleep(0) yields ends (measured: a 200 ms stall).
SLICE_PAUSE = 0.001
SET_ASIDE_TRIES = 100

_OFFSETS: dict[int, struct.Struct] = {}


class CacheFileError(ValueError):
    """A cache file cannot be used; the message is the reason, for the `cache_file_rejected` log line."""


class Record(NamedTuple):
    """One cache entry as stored on disk: its expiry in wall-clock time, so it survives a restart."""

    key: bytes
    wire: bytes
    ttl_offsets: tuple[int, ...]
    ttl: int
    expires_wall: float
    hits: int = 0


@dataclass
class LoadResult:
    """What a load put in the cache and what it left out."""

    entries: int = 0  # inserted
    stale: int = 0  # inserted, already past their TTL
    dropped: int = 0  # stale for longer than max_stale
    over_capacity: int = 0  # least recently used entries beyond the cache size


def _offsets_struct(count: int) -> struct.Struct:
    packer = _OFFSETS.get(count)
    if packer is None:
        packer = _OFFSETS[count] = struct.Struct(f"!{count}H")
    return packer


def pack_record(
    key: bytes, reply: bytes, ttl_offsets: tuple[int, ...], ttl: int, expires_wall: float, hits: int
) -> bytes:
    """The bytes of one entry in the body."""
    count = len(ttl_offsets)
    head = RECORD.pack(len(key), len(reply), count, ttl, expires_wall, min(hits, MAX_U32))
    if count:
        return head + key + reply + _offsets_struct(count).pack(*ttl_offsets)
    return head + key + reply


def header(count: int, body_length: int, digest: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, count, body_length, digest)


def encode(saved_wall: float, records: Iterable[Record]) -> bytes:
    """A whole file in one piece (tests and tools; the proxy saves in slices with CachePersister.save)."""
    parts = [SAVED_AT.pack(saved_wall)]
    count = 0
    for r in records:
        parts.append(pack_record(r.key, r.wire, r.ttl_offsets, r.ttl, r.expires_wall, r.hits))
        count += 1
    body = b"".join(parts)
    return header(count, len(body), hashlib.sha256(body).digest()) + body


def decode(data: bytes) -> tuple[float, list[Record]]:
    """(saved_at, records least recently used first) of a file's bytes; CacheFileError if the framing is wrong."""
    if len(data) < HEADER.size:
        raise CacheFileError("empty" if not data else "shorter than the header")
    magic, version, _reserved, count, body_length, digest = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise CacheFileError("not a cache file (bad magic)")
    if version != VERSION:
        raise CacheFileError(f"unsupported version {version}")
    body = memoryview(data)[HEADER.size :]
    if len(body) != body_length:
        raise CacheFileError(f"body is {len(body)} bytes, header says {body_length} (truncated?)")
    if hashlib.sha256(body).digest() != digest:
        raise CacheFileError("checksum mismatch")
    if body_length < SAVED_AT.size:
        raise CacheFileError("body too short")
    saved_wall = SAVED_AT.unpack_from(body, 0)[0]
    if not math.isfinite(saved_wall):
        raise CacheFileError("save time is not a finite time")
    records = []
    pos = SAVED_AT.size
    end = len(body)
    unpack = RECORD.unpack_from
    for _ in range(count):
        if pos + RECORD.size > end:
            raise CacheFileError("entry runs past the end")
        key_length, wire_length, offset_count, ttl, expires_wall, hits = unpack(body, pos)
        pos += RECORD.size
        key_end = pos + key_length
        wire_end = key_end + wire_length
        offsets_end = wire_end + 2 * offset_count
        if offsets_end > end:
            raise CacheFileError("entry runs past the end")
        offsets = _offsets_struct(offset_count).unpack_from(body, wire_end) if offset_count else ()
        records.append(
            Record(bytes(body[pos:key_end]), bytes(body[key_end:wire_end]), offsets, ttl, expires_wall, hits)
        )
        pos = offsets_end
    if pos != end:
        raise CacheFileError("trailing bytes after the last entry")
    return saved_wall, records


def check_record(record: Record, saved_wall: float) -> None:
    """Raise CacheFileError unless the record is an entry the cache itself could have stored."""
    if record.ttl > MAX_TTL:
        raise CacheFileError(f"ttl {record.ttl} out of range")
    if not math.isfinite(record.expires_wall):
        raise CacheFileError("expiry is not a finite time")
    # At save time an entry is at most `ttl` seconds from expiry; more would extend its TTL.
    if record.expires_wall - saved_wall > record.ttl + EXPIRY_SLACK:
        raise CacheFileError("expiry further away than the ttl")
    reply = record.wire
    try:
        scan = wire.scan_reply(reply)
    except (wire.WireError, struct.error, IndexError) as exc:
        raise CacheFileError(f"stored answer does not parse: {exc}") from None
    if scan.opt_start is not None or scan.flags & wire.FLAG_TC or scan.rcode not in (wire.NOERROR, wire.NXDOMAIN):
        raise CacheFileError("stored answer is not one the cache keeps")
    if tuple(scan.ttl_offsets) != tuple(record.ttl_offsets):
        raise CacheFileError("ttl offsets do not match the stored answer")
    key = record.key
    # The key must be the one the stored answer's question makes, with some DO and CD bits (and
    # maybe the raw mark of an upstream answer kept apart by autopath).
    if not key:
        raise CacheFileError("key does not match the stored answer")
    do, cd = wire.key_flags(key)
    if wire.plain_key(key) != wire.cache_key(reply[12 : scan.question_end], do, cd):
        raise CacheFileError("key does not match the stored answer")


def restore(
    cache: AnswerCache,
    saved_wall: float,
    records: list[Record],
    max_stale: float,
    wall_now: float,
) -> LoadResult:
    """Check every record, then insert them least recently used first; CacheFileError before any insert.

    The remaining freshness of an entry is its wall-clock expiry less the current wall-clock time, so
    the time the proxy was down counts. If the clock went back since the save, the save time is used
    instead: a restart never extends a TTL.
    """
    keys = set()
    for record in records:
        check_record(record, saved_wall)
        keys.add(record.key)
    if len(keys) != len(records):
        raise CacheFileError("duplicate keys")
    result = LoadResult()
    now_wall = max(wall_now, saved_wall)
    now = cache.timer()
    kept = []
    for record in records:
        remaining = record.expires_wall - now_wall
        # Past max_stale the entry could never be served again (RFC 8767 §5 max stale timer).
        if remaining <= 0 and (max_stale <= 0 or -remaining > max_stale):
            result.dropped += 1
            continue
        kept.append((record, remaining))
    if len(kept) > cache.maxsize:
        result.over_capacity = len(kept) - int(cache.maxsize)
        kept = kept[result.over_capacity :]  # the most recently used are last
    for record, remaining in kept:
        entry = Entry(record.wire, record.ttl_offsets, record.ttl, now + remaining - record.ttl)
        entry.expires_at = now + remaining
        entry.hits = record.hits
        cache.store(record.key, entry)
        result.entries += 1
        if remaining <= 0:
            result.stale += 1
    return result


def write_atomic(path: str, chunks: list[bytes]) -> int:
    """Replace the file at path by chunks, atomically: a crash leaves the old file or the new one, never a mix.

    Blocking; the proxy runs it in gevent's thread pool. Returns the bytes written.
    """
    tmp = path + ".tmp"
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        # During a takeover two proxies share the file: a flock on the directory makes
        # their saves take turns, else both would write the one temporary file at once.
        fcntl.flock(directory, fcntl.LOCK_EX)
        # O_NOFOLLOW: a symlink planted at the temporary name must not make us truncate another file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover temporary file may have had another mode
            with os.fdopen(fd, "wb", closefd=False) as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        # The rename itself is durable only once the directory is synced.
        os.fsync(directory)
    finally:
        os.close(directory)  # releases the flock
    return sum(len(chunk) for chunk in chunks)


class CachePersister:
    """Loads the cache file at start, saves the whole cache every interval and once more at shutdown."""

    def __init__(
        self,
        path: str,
        cache: AnswerCache,
        max_stale: float,
        log: FilteringBoundLogger,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.cache = cache
        self.max_stale = max_stale
        self.log = log
        self.wall = wall
        self.lock = gevent.lock.Semaphore()
        self.stopping = gevent.event.Event()
        self.greenlet: gevent.Greenlet | None = None
        # For logs and metrics.
        self.saves = 0
        self.save_failures = 0
        self.last_save_entries = 0
        self.last_save_bytes = 0
        self.last_save_seconds = 0.0
        self.loaded: LoadResult | None = None

    # -- load --

    def load(self) -> LoadResult:
        """Fill the cache from the file; a missing file is normal, a bad one is set aside. Never raises."""
        started = time.monotonic()
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.log.info("cache_file_missing", path=self.path)
            return LoadResult()
        except OSError as exc:
            self._reject(f"unreadable: {exc.strerror or exc}")
            return LoadResult()
        # No cycles are made here, and the collector would rescan the growing cache again and again
        # (a third of the load time for 100,000 entries); the loop does not serve yet.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            saved_wall, records = decode(data)
            result = restore(self.cache, saved_wall, records, self.max_stale, self.wall())
        except CacheFileError as exc:
            self._reject(str(exc))
            return LoadResult()
        except Exception as exc:  # never a traceback, never a refusal to start
            self.cache.clear()
            self._reject(f"unexpected error: {exc!r}")
            return LoadResult()
        finally:
            if gc_was_enabled:
                gc.enable()
        self.loaded = result
        self.log.info(
            "cache_loaded",
            path=self.path,
            entries=result.entries,
            stale=result.stale,
            dropped=result.dropped,
            over_capacity=result.over_capacity,
            seconds=round(time.monotonic() - started, 3),
            bytes=len(data),
        )
        return result

    def _reject(self, reason: str) -> None:
        """Move the bad file aside, for a human to look at, and say so in one warning line."""
        set_aside = None
        error = None
        stamp = int(self.wall())
        for attempt in range(SET_ASIDE_TRIES):
            candidate = f"{self.path}.corrupt-{stamp}" + (f"-{attempt}" if attempt else "")
            if os.path.lexists(candidate):
                continue
            try:
                os.rename(self.path, candidate)
                set_aside = candidate
            except OSError as exc:
                error = exc.strerror or str(exc)
            break
        fields = {"path": self.path, "reason": reason, "set_aside": set_aside}
        if error is not None:
            fields["rename_error"] = error
        self.log.warning("cache_file_rejected", **fields)

    # -- save --

    def serialise(self) -> tuple[list[bytes], int]:
        """The file as chunks, and its entry count; yields to the event loop every SLICE entries.

        The cache keeps changing meanwhile: an entry evicted before its slice is left out, one
        replaced is saved in its new form. The order is the LRU order when the save began.

        The snapshot is of keys only, in the cache's own order (AnswerCache keeps its dict in LRU
        order, least recently used first), not of cache.entries(): that makes a (key, entry) tuple
        per entry at once, 100,000 GC-tracked tuples alive across the whole save, and the
        collections they set off stalled the loop for 60 ms (bench/persist_bench.py).
        """
        now = self.cache.timer()
        wall_now = self.wall()
        to_wall = wall_now - now
        max_stale = self.max_stale
        first = SAVED_AT.pack(wall_now)
        digest = hashlib.sha256(first)
        chunks = [b"", first]
        body_length = len(first)
        count = 0
        cache = self.cache
        keys = list(cache)  # bytes only, not tracked by the collector: under 1 ms for 100,000
        for start in range(0, len(keys), SLICE):
            parts = []
            for key in keys[start : start + SLICE]:
                entry = cache.get(key)  # Cache.get: no LRU touch
                if entry is None:
                    continue  # evicted since the save began
                stale_for = now - entry.expires_at
                if stale_for >= 0 and (max_stale <= 0 or stale_for > max_stale):
                    continue  # could never be served again: not worth the disk
                parts.append(
                    pack_record(key, entry.wire, entry.ttl_offsets, entry.ttl, entry.expires_at + to_wall, entry.hits)
                )
            count += len(parts)
            chunk = b"".join(parts)
            digest.update(chunk)
            chunks.append(chunk)
            body_length += len(chunk)
            gevent.sleep(SLICE_PAUSE)
        chunks[0] = header(count, body_length, digest.digest())
        return chunks, count

    def save(self, reason: str = "periodic") -> bool:
        """Write the whole cache to the file without stalling queries; log and return False on failure."""
        with self.lock:
            started = time.monotonic()
            try:
                chunks, count = self.serialise()
                # write + fsync in a thread: the event loop keeps serving while the disk works.
                size = gevent.get_hub().threadpool.apply(write_atomic, (self.path, chunks))
            except OSError as exc:
                self.save_failures += 1
                self.log.warning("cache_save_failed", path=self.path, error=exc.strerror or str(exc))
                return False
            seconds = time.monotonic() - started
            self.saves += 1
            self.last_save_entries = count
            self.last_save_bytes = size
            self.last_save_seconds = seconds
            # A save every interval is routine: info for the first one (it works) and the last one
            # (what the next start will load), debug otherwise.
            emit = self.log.info if reason != "periodic" or self.saves == 1 else self.log.debug
            emit("cache_saved", path=self.path, reason=reason, entries=count, seconds=round(seconds, 3), bytes=size)
            return True

    def _run(self, interval: float) -> None:
        while not self.stopping.wait(interval):
            try:
                self.save()
            except Exception as exc:  # the boundary of a greenlet: nothing escapes to the hub
                self.save_failures += 1
                self.log.error("cache_save_failed", path=self.path, error=repr(exc))

    def start(self, interval: float) -> None:
        """Save every interval seconds from now on."""
        self.greenlet = gevent.spawn(self._run, interval)

    def stop(self) -> None:
        """Stop the periodic saves and write the final snapshot (waits for a save in progress)."""
        self.stopping.set()
        try:
            self.save("shutdown")
        except Exception as exc:  # shutdown must go on
            self.log.error("cache_save_failed", path=self.path, error=repr(exc))
        if self.greenlet is not None:
            self.greenlet.join(timeout=1)
