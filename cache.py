"""The answer cache: keys, entries in wire form, the what-and-how-long-to-cache policy, and the LRU store.

Entries are never evicted for age: past its TTL an entry is stale (its remaining TTL is negative)
and stays until capacity pushes it out, so it can be served while the upstream is unreachable
(RFC 8767). No sockets here.
"""

from __future__ import annotations

import itertools
import math
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cachetools import Cache

import wire

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_OFFSET_LAYOUTS: dict[tuple[int, ...], tuple[int, ...]] = {}
_OPT_PLAIN = wire.opt_record(False)
_OPT_DO = wire.opt_record(True)
_OPT_STALE = wire.opt_record(False, wire.EDE_STALE_ANSWER)
_OPT_STALE_DO = wire.opt_record(True, wire.EDE_STALE_ANSWER)


@dataclass(frozen=True)
class TtlPolicy:
    """The TTL clamps of the cache (seconds)."""

    min_ttl: int = 0
    max_ttl: int = 3600
    max_negative_ttl: int = 1800


class Entry:
    """One cached answer: the reply's wire form without OPT, where its TTLs sit, and when it expires.

    `expires_at` is monotonic time (the store time plus `ttl`, how long the entry is fresh). The
    remaining TTL is computed when read and goes negative once the entry is stale.
    """

    __slots__ = ("expires_at", "hits", "rcode", "rendered", "retry_after", "ttl", "ttl_offsets", "wire")

    def __init__(self, reply: bytes, ttl_offsets: tuple[int, ...], ttl: int, stored_at: float) -> None:
        self.wire = reply
        # Most answers share a layout: one tuple object per layout, not one per entry (memory).
        self.ttl_offsets = _OFFSET_LAYOUTS.setdefault(ttl_offsets, ttl_offsets)
        self.ttl = ttl
        self.expires_at = stored_at + ttl
        self.rcode = reply[3] & 0xF
        self.hits = 0
        # Monotonic time before which a stale entry is served at once, without waiting on the
        # upstream: set after a failed refresh (RFC 8767 §5 failure recheck timer).
        self.retry_after = 0.0
        # UDP answers already rendered, by the client query less its ID: (ttl, answer). Clients
        # repeat byte-identical queries, so a hit usually only swaps in the ID. Made on
        # the first hit: most entries of a large cache are never hit twice.
        self.rendered: dict[bytes, tuple[int, bytes]] | None = None

    def remaining_ttl(self, now: float) -> float:
        """Seconds of freshness left; zero or less means stale."""
        return self.expires_at - now

    def is_stale(self, now: float) -> bool:
        return self.expires_at <= now

    def stale_for(self, now: float) -> float:
        """Seconds since the entry went stale (negative while fresh)."""
        return now - self.expires_at

    def render(
        self, query: wire.Query, ttl: int, max_size: int, stale: bool = False, qid: bytes | None = None
    ) -> bytes:
        """The answer to `query`: its ID, its question bytes (case as asked), TTLs set to `ttl`.

        An answer larger than `max_size` becomes an empty one with TC=1 (RFC 1035 §4.2.1, RFC 6891 §7).
        """
        out = bytearray(self.wire)
        out[0:2] = query.wire[0:2] if qid is None else qid
        cflags = query.flags
        # QR, RA; AA is never ours to set; RD and CD echo the client; AD only if the client can use it.
        flags = (
            0x8080
            | (cflags & (wire.FLAG_RD | wire.FLAG_CD))
            | (_U16.unpack_from(self.wire, 2)[0] & (0x000F | (wire.FLAG_AD if query.do else 0)))
        )
        out[2:4] = _U16.pack(flags)
        question = query.question
        out[12 : 12 + len(question)] = question
        if self.ttl_offsets:
            ttl_bytes = _U32.pack(ttl)
            for offset in self.ttl_offsets:
                out[offset : offset + 4] = ttl_bytes
        if query.edns:
            # OPT is hop-by-hop: never cached, made anew for each client (RFC 6891 §6.1.1).
            if stale:
                out += _OPT_STALE_DO if query.do else _OPT_STALE
            else:
                out += _OPT_DO if query.do else _OPT_PLAIN
            out[10:12] = _U16.pack(_U16.unpack_from(out, 10)[0] + 1)
        if len(out) > max_size:
            return self.truncated(query, stale, bytes(out[0:2]))
        return bytes(out)

    def truncated(self, query: wire.Query, stale: bool, qid: bytes) -> bytes:
        """Header and question only, TC=1: the client retries over TCP."""
        flags = 0x8080 | wire.FLAG_TC | (query.flags & (wire.FLAG_RD | wire.FLAG_CD)) | self.rcode
        tail = b""
        if query.edns:
            tail = wire.opt_record(query.do, wire.EDE_STALE_ANSWER if stale else None)
        header = bytes(qid) + _U16.pack(flags) + struct.pack("!HHHH", 1, 0, 0, 1 if tail else 0)
        return header + query.question + tail


def entry_from_reply(reply: bytes, policy: TtlPolicy, now: float) -> tuple[Entry, bool]:
    """Turn an upstream reply into an Entry and say whether it may be cached.

    What is cached (RFC 2308, RFC 8767 §4): NOERROR with answers for the smallest TTL of its records;
    NXDOMAIN and NODATA for min(SOA TTL, SOA MINIMUM), only with an SOA; nothing with TC=1, another
    rcode, or an OPT we cannot cut off. An uncacheable reply is still returned, to answer the clients
    that asked for it, with its TTLs left as the upstream sent them.
    """
    scan = wire.scan_reply(reply)
    cacheable = True
    if scan.flags & wire.FLAG_TC or scan.ext_rcode or (scan.flags >> 11) & 0xF:
        cacheable = False
    stored = reply
    if scan.opt_start is not None:
        # Cut from the OPT on: records after it (rare) are optional additional data, and cutting
        # keeps every compression pointer before the cut valid.
        stored = reply[:10] + _U16.pack(scan.opt_index) + reply[12 : scan.opt_start]
    rcode = scan.rcode
    ttl = 0
    if rcode == wire.NOERROR and scan.ancount:
        ttl = min(scan.ttls) if scan.ttls else 0
        ttl = min(max(ttl, policy.min_ttl), policy.max_ttl)
    elif rcode in (wire.NOERROR, wire.NXDOMAIN):
        if scan.soa_ttl is None:
            cacheable = False
        else:
            ttl = min(scan.soa_ttl, scan.soa_minimum or 0, policy.max_negative_ttl)
            ttl = min(max(ttl, policy.min_ttl), policy.max_negative_ttl)
    else:
        cacheable = False
    if not cacheable:
        # Sent once, as it came, minus its OPT (ours is made for the client).
        entry = Entry(stored, (), 0, now)
        if scan.ext_rcode:
            # The OPT held the upper rcode bits (RFC 6891 §6.1.3): never pass the low bits alone
            # as NOERROR; callers answer anything but NOERROR/NXDOMAIN with SERVFAIL.
            entry.rcode = (scan.ext_rcode << 4) | scan.rcode
            servfail = bytearray(stored)
            servfail[3] = (servfail[3] & 0xF0) | wire.SERVFAIL
            entry.wire = bytes(servfail)
        return entry, False
    offsets = tuple(o for o in scan.ttl_offsets if o < len(stored))
    return Entry(stored, offsets, ttl, now), True


class AnswerCache(Cache):
    """Entries by key; capacity evicts the least recently used, age never evicts.

    Derived from cachetools.Cache, whose size accounting calls popitem() when full. The recency
    order is the insertion order of Cache's own dict (a used key is moved to its end), instead of
    LRUCache's second, OrderedDict index: about 100 bytes less per entry. `lookup` is the hot-path
    read, without the layers of Cache.__getitem__. It relies on cachetools' private storage, pinned
    in requirements.txt and checked by the tests.
    """

    def __init__(self, maxsize: int, timer: Callable[[], float] = time.monotonic) -> None:
        super().__init__(maxsize)
        self.timer = timer
        self._data: dict = self._Cache__data  # type: ignore[attr-defined]
        self.evictions = 0
        self.inserts = 0

    def lookup(self, key: bytes) -> Entry | None:
        """The entry for key (fresh or stale) marked as recently used, or None."""
        data = self._data
        entry = data.pop(key, None)
        if entry is not None:
            data[key] = entry  # re-inserted last: most recently used
        return entry

    def store(self, key: bytes, entry: Entry) -> None:
        """Insert or replace (as most recently used); a full cache drops its least recently used entry."""
        self.inserts += 1
        if key in self._data:
            del self[key]
        self[key] = entry

    def popitem(self) -> tuple[bytes, Entry]:
        """Evict the least recently used entries, the first in the dict's order, 1/256 of capacity at once.

        Finding the first live key skips the deleted slots at the front of the dict, which pile up
        between resizes; evicting a batch per scan keeps that cost per entry small.
        """
        batch = max(1, int(self.maxsize) // 256)
        data = self._data
        keys = list(itertools.islice(iter(data), batch))
        if not keys:
            raise KeyError("cache is empty")
        first = (keys[0], data[keys[0]])
        for key in keys:
            del self[key]
        self.evictions += len(keys)
        return first

    def counts(self, now: float) -> tuple[int, int]:
        """(fresh, stale) entry counts; O(n), for metrics and the control interface only."""
        stale = sum(1 for entry in self._data.values() if entry.expires_at <= now)
        return len(self._data) - stale, stale

    def retry_marked(self, now: float) -> list[tuple[bytes, Entry]]:
        """The entries whose failure recheck is pending (retry_after > now); O(n), no LRU touch."""
        return [(key, entry) for key, entry in self._data.items() if entry.retry_after > now]

    def entries(self) -> Iterator[tuple[bytes, Entry]]:
        """All (key, entry) pairs, least recently used first, without touching the LRU order."""
        data = self._data
        for key in list(data):
            entry = data.get(key)
            if entry is not None:
                yield key, entry


def answer_ttl(entry: Entry, now: float) -> int:
    """The TTL a fresh entry is served with: the stored TTL less the whole seconds since it was stored."""
    return max(0, math.ceil(entry.expires_at - now))
