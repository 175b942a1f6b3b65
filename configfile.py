"""Live reconfiguration: re-read the --config file when it changes or on SIGHUP, and apply it without a restart."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import gevent
import gevent.event

import config as config_module
from config import Config, ConfigError
from logs import set_log_level

POLL_INTERVAL = 2.0  # seconds between two looks at the file's metadata (no inotify dependency)

# Settings a running proxy takes over at once. Every other one (listen addresses, interception,
# HTTP, cache size and file, pool sizes, and any setting added later until it is listed here)
# needs a restart: a reload logs it and keeps the running value.
LIVE_FIELDS = frozenset(
    {
        "upstreams",
        "resolv_conf",
        "forward",
        "min_ttl",
        "max_ttl",
        "max_negative_ttl",
        "stale_ttl",
        "max_stale",
        "stale_answer_timeout",
        "failure_recheck",
        "down_probe_interval",
        "recovery_refresh_rate",
        "upstream_timeout",
        "deadline",
        "force_tcp",
        "prefetch",
        "prefetch_percent",
        "prefer_positive",
        "prefer_positive_grace",
        "autopath",
        "autopath_timeout",
        "cluster_domain",
        "search",
        "log_level",
        "log_queries",
        "allow",
        "grace",
        "sync_interval",
        "summary_interval",
    }
)


class Reconfigurable(Protocol):
    """What the reloader needs of the running proxy."""

    config: Config

    def reconfigure(self, config: Config) -> None: ...


class ConfigReloader:
    """Rebuilds the Config from the same flags, file and environment, and hands the live part to the proxy.

    The new Config goes through config.build_config, so a reload validates exactly as a start does;
    a file that does not pass is rejected with one `config_rejected` line and the running settings stay.
    """

    def __init__(
        self,
        argv: Sequence[str],
        proxy: Reconfigurable,
        log: Any,
        environ: Mapping[str, str] | None = None,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.argv = list(argv)
        self.proxy = proxy
        self.log = log
        self.environ = os.environ if environ is None else environ
        self.interval = interval
        self.path = proxy.config.config
        self.signature = self._signature()
        self.sighup = False
        self.wake = gevent.event.Event()
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Watch the file (if any) and take SIGHUP as a request to reload (instead of its default: exit)."""
        gevent.signal_handler(signal.SIGHUP, self.request_reload)
        self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=True, timeout=1)

    def request_reload(self) -> None:
        self.sighup = True
        self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait(self.interval if self.path else None)
            self.wake.clear()
            sighup, self.sighup = self.sighup, False
            signature = self._signature()
            if not sighup and signature == self.signature:
                continue
            self.signature = signature
            try:
                self.reload("sighup" if sighup else "file_changed")
            except Exception as exc:  # the boundary of a greenlet: the watcher must keep running
                self.log.error("config_reload_failed", error=repr(exc))

    def _signature(self) -> tuple[int, int, int, int] | None:
        """What tells a changed file: a ConfigMap update swaps a symlink (new inode), an edit moves mtime."""
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self, trigger: str) -> bool:
        """Build the new Config and apply what can change live; False when it was rejected."""
        old: Config = self.proxy.config
        try:
            new = config_module.build_config(self.argv, self.environ)
        except ConfigError as exc:
            self.log.error("config_rejected", reason=str(exc), trigger=trigger)
            return False
        changed = [f.name for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(new, f.name)]
        needs_restart = [name for name in changed if name not in LIVE_FIELDS]
        if needs_restart:
            self.log.warning("config_change_needs_restart", settings=needs_restart)
        applied = dataclasses.replace(new, **{name: getattr(old, name) for name in needs_restart})
        if applied.log_level != old.log_level:
            set_log_level(applied.log_level)
        self.proxy.reconfigure(applied)
        described = config_module.describe(applied)
        live = {name: described[name] for name in changed if name in LIVE_FIELDS}
        self.log.info("config_reloaded", trigger=trigger, changed=live)
        return True
