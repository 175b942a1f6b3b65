"""Autopath (--autopath): the rest of a pod's ndots:5 search path, walked at the node when its first try is NXDOMAIN.

A pod's resolver (ClusterFirst: `search <ns>.svc.<domain> svc.<domain> <domain> <node domains>`,
`options ndots:5`) turns one lookup of `www.example.com` into a query per candidate until one
exists, A and AAAA each: 8 queries for an external name. When the first candidate,
`<base>.<ns>.svc.<domain>`, is NXDOMAIN, the proxy asks the later candidates itself, in the
pod's order, through the cache (coalesced like any fetch), and answers the first that exists with
a CNAME to it: the pod's resolver follows the CNAME and stops there. CoreDNS's autopath plugin
does the same at kube-dns, where it needs the pod's IP to know its namespace; here the namespace
is the label before `svc.<domain>` in the query.

The plain key of such a question holds what the pod is answered (the walk's CNAME answer, or the
first candidate's own answer), so a repeated query is a plain cache hit on the untouched hot path;
the upstream's own answers for names of that shape are kept under their raw keys (wire.raw_key).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Protocol

import wire
from cache import AnswerCache, Entry
from config import Config
from metrics import Stats

NDOTS = 5  # the kubelet's ClusterFirst resolv.conf: `options ndots:5`
MAX_SEARCH_DOMAINS = 32  # the kubelet keeps at most 32 search domains (MaxDNSSearchPaths, Kubernetes 1.28)
QTYPE_A = 1
QTYPE_AAAA = 28
CLASS_IN = 1
# A pod that got anything but a walk's answer for its first candidate goes on with its own search:
# its later candidates must then be answered as they are, not read as first candidates of a
# shorter base (`www.example.com.svc.cluster.local` is also the first candidate of `www.example` in
# a namespace `com`). Remembered this long at least, at most this many names.
CONTINUING_SECONDS = 30.0
CONTINUING_NAMES = 10_000
_SVC = b"\x03svc"
_NAMESPACE = re.compile(rb"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace (RFC 1123 label)


class Engine(Protocol):
    """What the walk needs of the query engine (resolver.Resolver)."""

    cache: AnswerCache
    stats: Stats
    timer: Callable[[], float]

    def resolve_plain(self, query: wire.Query, max_size: int) -> tuple[bytes, str]: ...

    def fresh_entry(self, key: bytes, deadline: float) -> Entry | None: ...


class Plan:
    """The walk for one query: the first candidate's raw key, the later candidates, the names to remember."""

    __slots__ = ("candidates", "later", "question", "raw_query")

    def __init__(
        self,
        raw_query: wire.Query,
        question: bytes,
        candidates: list[tuple[bytes, bytes]],
        later: list[bytes],
    ) -> None:
        self.raw_query = raw_query  # the client's query, keyed to the first candidate's own answer
        self.question = question  # lower-cased qname, qtype, qclass: the question of the answer made
        self.candidates = candidates  # (name in wire form, cache key) after the first, in the pod's order
        self.later = later  # those names that are shaped like a first candidate


class SearchPath:
    """A pod's search list as the kubelet writes it (ClusterFirst), and which names are its first candidate."""

    def __init__(self, cluster_domain: str, node_search: tuple[str, ...]) -> None:
        domain = wire.name_to_wire(cluster_domain)
        self.svc_suffix = _SVC + domain
        # After `<ns>.svc.<domain>`: `svc.<domain>`, `<domain>`, then the node's domains, duplicates
        # left out and at most MAX_SEARCH_DOMAINS in all (the kubelet's omitDuplicates and limit).
        suffixes = [self.svc_suffix, domain]
        for name in node_search:
            suffix = wire.name_to_wire(name)
            if suffix not in suffixes and suffix != b"\x00":
                suffixes.append(suffix)
        self.suffixes = suffixes[: MAX_SEARCH_DOMAINS - 1]

    def split(self, qname: bytes) -> tuple[bytes, int] | None:
        """(base without the root label, its number of dots) when qname reads `<base>.<ns>.svc.<domain>.`."""
        if not qname.endswith(self.svc_suffix):
            return None
        head = qname[: len(qname) - len(self.svc_suffix)]
        starts = []
        pos = 0
        while pos < len(head):
            starts.append(pos)
            pos += head[pos] + 1
        if pos != len(head) or len(starts) < 2:
            return None  # the suffix began inside a label, or no base before the namespace
        namespace = head[starts[-1] + 1 :]
        if _NAMESPACE.fullmatch(namespace) is None:
            return None
        return head[: starts[-1]], len(starts) - 2

    def later_candidates(self, qname: bytes, base: bytes, dots: int) -> list[bytes] | None:
        """The candidates a pod tries after qname, in its order; None if one is too long to be a name.

        The bare `<base>.` comes last when base has fewer than ndots dots. With more it was tried
        first, before the search list, and was NXDOMAIN or the pod would not have asked qname.
        Clients differ on a candidate over 255 octets (glibc stops, Go skips it): no walk then.
        """
        own = qname[len(base) :]
        names = [base + suffix for suffix in self.suffixes if suffix != own]
        if dots < NDOTS:
            names.append(base + b"\x00")
        if any(len(name) > 255 for name in names):
            return None
        return names


class Autopath:
    """Walks the search path of pods' first candidates that are NXDOMAIN; one per Resolver and Config."""

    def __init__(self, config: Config, engine: Engine, previous: Autopath | None = None) -> None:
        self.search = SearchPath(config.cluster_domain, config.search or ())
        self.timeout = config.autopath_timeout
        self.engine = engine
        # qname -> monotonic time until which a pod may be continuing its own search through it.
        self.continuing: dict[bytes, float] = previous.continuing if previous is not None else {}

    def plan(self, query: wire.Query) -> Plan | None:
        """The walk for an A or AAAA query (class IN) of a pod's first search candidate; None for any other."""
        if query.qtype not in (QTYPE_A, QTYPE_AAAA) or query.qclass != CLASS_IN:
            return None
        key = query.key
        qname = wire.key_qname(key)
        split = self.search.split(qname)
        if split is None:
            return None
        base, dots = split
        names = self.search.later_candidates(qname, base, dots)
        if names is None:
            return None
        tail = key[-wire.KEY_TAIL :]  # qtype, qclass and the client's DO and CD
        candidates = []
        later = []
        for name in names:
            candidate_key = name + tail
            if self.search.split(name) is not None:
                candidate_key = wire.raw_key(candidate_key)  # its plain key holds what autopath answers
                later.append(name)
            candidates.append((name, candidate_key))
        raw = wire.Query(
            query.wire,
            query.flags,
            query.question,
            query.qtype,
            query.qclass,
            wire.raw_key(key),
            query.edns,
            query.do,
            query.cd,
            query.max_udp,
        )
        return Plan(raw, wire.key_question_wire(key), candidates, later)

    def resolve(self, query: wire.Query, plan: Plan, max_size: int) -> tuple[bytes, str]:
        """The answer to a first candidate: what an earlier walk answered while fresh, else its own answer
        unless that is a fresh NXDOMAIN, else the walk's. Outcomes as Resolver.resolve's, plus autopath."""
        engine = self.engine
        cache = engine.cache
        started = engine.timer()
        held = cache.lookup(query.key)
        if held is not None and held.expires_at > started:
            return engine.resolve_plain(query, max_size)  # a fresh hit, as the hot path would have served it
        qname = wire.key_qname(query.key)
        until = self.continuing.get(qname)
        if until is not None and until > started:
            # A pod going on with its own search: the name's own answer, never a walk.
            return engine.resolve_plain(plan.raw_query, max_size)
        answer, outcome = engine.resolve_plain(plan.raw_query, max_size)
        first = cache.get(plan.raw_query.key)  # Cache.get: no LRU touch
        now = engine.timer()
        rcode = answer[3] & 0xF
        if first is None or first.expires_at <= now or first.rcode != rcode:
            # Stale (an outage), not cacheable, or SERVFAIL: the pod walks on by itself, as without autopath.
            self._remember(plan, now, 0.0)
            return answer, outcome
        if rcode == wire.NOERROR:
            cache.store(query.key, first)  # the first candidate exists: repeated queries are plain hits
            return answer, outcome
        if rcode != wire.NXDOMAIN:
            self._remember(plan, now, 0.0)
            return answer, outcome
        return self._walk(query, plan, first, answer, outcome, started + self.timeout, max_size)

    def _walk(
        self,
        query: wire.Query,
        plan: Plan,
        first: Entry,
        plain: bytes,
        outcome: str,
        deadline: float,
        max_size: int,
    ) -> tuple[bytes, str]:
        """Ask the later candidates in order until one exists; the CNAME answer, or the plain NXDOMAIN."""
        engine = self.engine
        stats = engine.stats
        expires_at = first.expires_at  # the answer lives no longer than any entry it stands on
        for name, key in plan.candidates:
            entry = engine.fresh_entry(key, deadline) if engine.timer() < deadline else None
            if entry is None:
                # SERVFAIL, REFUSED, no reply within the budget, upstream down: the pod walks on by
                # itself and meets the failure with its own rules (glibc and Go go on past a
                # SERVFAIL, musl stops): the plain NXDOMAIN leaves that choice to it.
                stats.autopath_abandoned += 1
                self._remember(plan, engine.timer(), 0.0)
                return plain, outcome
            expires_at = min(expires_at, entry.expires_at)
            if entry.rcode == wire.NXDOMAIN:
                stats.autopath_skipped += 1
                continue
            try:
                made = wire.cname_answer(plan.question, name, entry.wire)
                offsets = tuple(wire.scan_reply(made).ttl_offsets)
            except wire.WireError:
                stats.autopath_abandoned += 1
                self._remember(plan, engine.timer(), 0.0)
                return plain, outcome
            now = engine.timer()
            ttl = max(0, math.ceil(expires_at - now))
            answer = Entry(made, offsets, ttl, now)
            answer.expires_at = expires_at
            answer.retry_after = expires_at  # never prefetched: no upstream question of its own
            if ttl > 0:
                engine.cache.store(query.key, answer)
            stats.autopath_answers += 1
            return answer.render(query, ttl, max_size), "autopath"
        # Nothing exists: the plain NXDOMAIN, held for the shortest negative TTL of the walk.
        now = engine.timer()
        if expires_at > now:
            held = Entry(first.wire, first.ttl_offsets, math.ceil(expires_at - now), now)
            held.expires_at = expires_at
            engine.cache.store(query.key, held)
        self._remember(plan, now, expires_at - now)
        return plain, outcome

    def _remember(self, plan: Plan, now: float, held_for: float) -> None:
        """Note the later candidates of a pod that will walk on by itself (for as long as its answer is held)."""
        if not plan.later:
            return
        continuing = self.continuing
        until = now + max(CONTINUING_SECONDS, held_for)
        for name in plan.later:
            if name not in continuing and len(continuing) >= CONTINUING_NAMES:
                del continuing[next(iter(continuing))]  # the oldest
            continuing.pop(name, None)
            continuing[name] = until
