"""Cache introspection and purge: the HTTP pages (loopback clients only) and the `proxy.py cache` command.

As pdnsd's control tool did, for `kubectl exec`: `python proxy.py cache show NAME`,
`python proxy.py cache list`, `python proxy.py cache purge NAME`, `python proxy.py cache purge --all`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import wire
from cache import AnswerCache, Entry
from metrics import qtype_name

MAX_LISTED = 1000


def _describe(key: bytes, entry: Entry, now: float) -> dict[str, object]:
    qtype, qclass = wire.key_question(key)
    do, cd = wire.key_flags(key)
    remaining = entry.remaining_ttl(now)
    return {
        "name": wire.name_to_text(wire.key_qname(key), 0),
        "type": qtype_name(qtype) if qtype_name(qtype) != "other" else f"TYPE{qtype}",
        "class": qclass,
        "do": do,
        "cd": cd,
        "rcode": entry.rcode,
        "state": "fresh" if remaining > 0 else "stale",
        "remaining_ttl": max(0, int(remaining)),
        "stale_seconds": round(-remaining, 1) if remaining <= 0 else 0,
        "hits": entry.hits,
    }


class CacheControl:
    """The /cache pages over a running proxy's AnswerCache."""

    def __init__(self, cache: AnswerCache, timer: Callable[[], float], log: Any) -> None:
        self.cache = cache
        self.timer = timer
        self.log = log

    def matching(self, name: str | None) -> list[tuple[bytes, Entry]]:
        if name is None:
            return list(self.cache.entries())
        qname = wire.name_to_wire(name)
        return [(key, entry) for key, entry in self.cache.entries() if wire.key_qname(key) == qname]

    def show(self, environ: dict) -> tuple[str, str, bytes]:
        params = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        name = params.get("name", [None])[0]
        limit = min(int(params.get("limit", [MAX_LISTED])[0]), MAX_LISTED)
        now = self.timer()
        try:
            found = self.matching(name)
        except ValueError as exc:
            return _json("400 Bad Request", {"error": str(exc)})
        entries = [_describe(key, entry, now) for key, entry in reversed(found[-limit:])]
        return _json("200 OK", {"entries": entries, "total": len(found), "capacity": self.cache.maxsize})

    def purge(self, environ: dict) -> tuple[str, str, bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return _json("405 Method Not Allowed", {"error": "use POST"})
        params = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if params.get("all", ["0"])[0] in ("1", "true", "yes"):
            purged = len(self.cache)
            self.cache.clear()
            self.log.info("cache_purged", entries=purged, name="*")
            return _json("200 OK", {"purged": purged})
        name = params.get("name", [None])[0]
        if not name:
            return _json("400 Bad Request", {"error": "give name=NAME or all=1"})
        try:
            keys = [key for key, _ in self.matching(name)]
        except ValueError as exc:
            return _json("400 Bad Request", {"error": str(exc)})
        for key in keys:
            self.cache.pop(key, None)
        self.log.info("cache_purged", entries=len(keys), name=name)
        return _json("200 OK", {"purged": len(keys)})


def loopback_only(page: Callable[[dict], tuple[str, str, bytes]]) -> Callable[[dict], tuple[str, str, bytes]]:
    """Cache pages answer loopback clients only: the HTTP address may be reachable by every pod."""

    def guarded(environ: dict) -> tuple[str, str, bytes]:
        try:
            remote = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
        except ValueError:
            remote = None
        if remote is None or not remote.is_loopback:
            return _json("403 Forbidden", {"error": "cache control is for loopback clients only"})
        return page(environ)

    return guarded


def _json(status: str, payload: dict) -> tuple[str, str, bytes]:
    return status, "application/json", (json.dumps(payload, indent=1) + "\n").encode()


def cli(argv: list[str], environ: Mapping[str, str] = os.environ) -> int:
    """`proxy.py cache …`: talk to the running proxy's HTTP address on loopback."""
    parser = argparse.ArgumentParser(prog="proxy.py cache", description="Look into or purge a running proxy's cache.")
    parser.add_argument(
        "--http",
        default=environ.get("KUBE_DNS_PROXY_HTTP", ""),
        help="the proxy's --http address [KUBE_DNS_PROXY_HTTP]; its port is used on 127.0.0.1",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # --http is also accepted after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--http", dest="http_after", default=None, help=argparse.SUPPRESS)
    show = sub.add_parser("show", help="entries of one name", parents=[common])
    show.add_argument("name")
    sub.add_parser("list", help="the most recently used entries", parents=[common])
    purge = sub.add_parser("purge", help="drop one name (all types) or everything", parents=[common])
    purge.add_argument("name", nargs="?")
    purge.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    args.http = args.http_after or args.http
    if not args.http:
        print("proxy.py cache: error: no --http address (and KUBE_DNS_PROXY_HTTP unset)", file=sys.stderr)
        return 2
    port = args.http.rsplit(":", 1)[-1]
    base = f"http://127.0.0.1:{port}"
    if args.command == "show":
        url, data = f"{base}/cache?" + urllib.parse.urlencode({"name": args.name}), None
    elif args.command == "list":
        url, data = f"{base}/cache?limit=100", None
    else:
        if not args.all and not args.name:
            print("proxy.py cache: error: purge needs NAME or --all", file=sys.stderr)
            return 2
        query = {"all": "1"} if args.all else {"name": args.name}
        url, data = f"{base}/cache/purge?" + urllib.parse.urlencode(query), b""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as response:
            sys.stdout.write(response.read().decode())
    except urllib.error.HTTPError as exc:
        sys.stdout.write(exc.read().decode())
        return 1
    except OSError as exc:
        print(f"proxy.py cache: error: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    return 0
