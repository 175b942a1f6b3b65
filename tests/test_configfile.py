"""The --config file: read at start like the flags, re-read on change and on SIGHUP, applied without a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dns.rcode
import pytest

import config
from conftest import REPO_ROOT, query
from servers import FakeUpstream

NO_RESOLV = ("--resolv-conf", "/nonexistent/resolv.conf")  # upstreams come from the file only


def write(path: Path, text: str, size: int = 0) -> None:
    """Write the file in place (same inode), padded with spaces to `size` bytes when given."""
    path.write_text(text.ljust(size) if size else text)


def events(proxy, name: str) -> list[dict]:
    return [e for e in proxy.logs() if e.get("event") == name]


def wait_event(proxy, name: str, count: int = 1, timeout: float = 6.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(proxy, name)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    pytest.fail(f"no {name!r} log line within {timeout} s:\n{proxy.stdout()}")


def addresses(reply) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


class TestReading:
    """At start the file is one more source of the same settings, between the flags and the environment."""

    def test_keys_with_dashes_or_underscores_and_yaml_values(self, tmp_path):
        """Keys are flag names with dashes or underscores; values are YAML scalars or lists."""
        path = tmp_path / "proxy.yaml"
        write(
            path,
            "upstream: [127.0.0.1:5300, '127.0.0.2']\n"
            "max-ttl: 600\n"
            "stale_answer_timeout: 0.5\n"
            "force-tcp: yes\n"
            "max-stale: unlimited\n"
            "prefetch: 3\n"
            "forward:\n"
            "  - cluster.local=10.96.0.10 force_tcp max_ttl=30\n"
            "  - ip6.arpa=10.96.0.10\n",
        )
        built = config.build_config(["--config", str(path)], environ={})
        assert [str(u) for u in built.upstreams] == ["127.0.0.1:5300", "127.0.0.2:53"]
        assert (built.max_ttl, built.stale_answer_timeout, built.force_tcp, built.prefetch) == (600, 0.5, True, 3)
        assert [f.zone for f in built.forward] == ["cluster.local.", "ip6.arpa."]
        assert built.forward[0].max_ttl == 30

    def test_forward_as_a_mapping(self, tmp_path):
        """forward may also be a mapping of zone to servers and options."""
        path = tmp_path / "proxy.yaml"
        write(path, "upstream: 127.0.0.1:5300\nforward:\n  cluster.local: 10.96.0.10 force_tcp\n")
        built = config.build_config(["--config", str(path)], environ={})
        assert (built.forward[0].zone, built.forward[0].force_tcp) == ("cluster.local.", True)

    def test_flags_win_over_file_and_file_over_environment(self, tmp_path):
        """A flag beats the file, and the file beats the environment; the environment still fills the rest."""
        path = tmp_path / "proxy.yaml"
        write(path, "upstream: 127.0.0.1:5300\nmax-ttl: 600\nmin-ttl: 5\n")
        environ = {"KUBE_DNS_PROXY_MIN_TTL": "7", "KUBE_DNS_PROXY_STALE_TTL": "9", "KUBE_DNS_PROXY_CONFIG": str(path)}
        built = config.build_config(["--max-ttl", "300"], environ=environ)
        assert (built.max_ttl, built.min_ttl, built.stale_ttl) == (300, 5, 9)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("upstream: [127.0.0.1\n", "not valid YAML at line"),
            ("- just\n- a list\n", "must be a mapping"),
            ("upstream: 127.0.0.1:5300\nbogus-setting: 1\n", "unknown setting 'bogus-setting'"),
            ("upstream: 127.0.0.1:5300\nmax-ttl: soon\n", "max-ttl 'soon'"),
            ("upstream: 127.0.0.1:5300\nmin-ttl: 100\nmax-ttl: 10\n", "--min-ttl must not exceed --max-ttl"),
            ("upstream: 127.0.0.1:5300\nconfig: other.yaml\n", "unknown setting 'config'"),
        ],
    )
    def test_bad_file_is_one_config_error(self, tmp_path, text, message):
        """A file that cannot be used is refused with one line naming the problem."""
        path = tmp_path / "proxy.yaml"
        write(path, text)
        with pytest.raises(config.ConfigError, match=message) as caught:
            config.build_config(["--config", str(path)], environ={})
        assert "\n" not in str(caught.value)

    @pytest.mark.e2e  # runs proxy.py
    def test_bad_file_at_start_exits_2(self, tmp_path):
        """A broken --config file at start is exit code 2 with one line on stderr, like a bad flag."""
        path = tmp_path / "proxy.yaml"
        write(path, "upstream: 127.0.0.1:5300\nmax-ttl: [\n")
        result = subprocess.run(
            [sys.executable, "proxy.py", "--listen", "127.0.0.1:0", "--config", str(path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 2
        assert result.stderr.startswith("proxy.py: error: --config") and result.stderr.count("\n") == 1

    def test_missing_file_at_start_exits_2(self, tmp_path):
        """A --config path that does not exist is refused at start."""
        with pytest.raises(config.ConfigError, match="cannot read"):
            config.build_config(["--config", str(tmp_path / "absent.yaml")], environ={})


class TestReload:
    """A running proxy applies a changed file at once, keeps its cache, and keeps old settings on a bad file."""

    def test_change_on_disk_applies_and_cache_stays(self, fake_upstream, proxy_factory, tmp_path):
        """A new upstream in the file serves new names; an entry cached before is still answered from the cache."""
        path = tmp_path / "proxy.yaml"
        write(path, f"upstream: {fake_upstream.address}\n")
        proxy = proxy_factory("--config", str(path), *NO_RESOLV)
        assert addresses(query(proxy.address, "before.example")) == ["192.0.2.1"]
        with FakeUpstream() as second:
            second.default_address = "192.0.2.2"
            write(path, f"upstream: {second.address}\n")
            reloaded = wait_event(proxy, "config_reloaded")
            assert reloaded[0]["trigger"] == "file_changed" and "upstreams" in reloaded[0]["changed"]
            assert addresses(query(proxy.address, "before.example")) == ["192.0.2.1"]
            assert addresses(query(proxy.address, "after.example")) == ["192.0.2.2"]
            assert (fake_upstream.count(), second.count()) == (1, 1)

    @pytest.mark.parametrize(
        "broken",
        ["upstream: [\n", "upstream: 127.0.0.1:5300\nmin-ttl: 100\nmax-ttl: 10\n", "bogus: 1\n"],
    )
    def test_broken_file_rejected_old_settings_keep_serving(self, fake_upstream, proxy_factory, tmp_path, broken):
        """A broken file logs config_rejected with the reason; cached and new names are served as before."""
        path = tmp_path / "proxy.yaml"
        write(path, f"upstream: {fake_upstream.address}\n")
        proxy = proxy_factory("--config", str(path), *NO_RESOLV)
        assert query(proxy.address, "cached.example").rcode() == dns.rcode.NOERROR
        write(path, broken)
        rejected = wait_event(proxy, "config_rejected")
        assert rejected[0]["reason"].startswith(("--config", "--min-ttl")) and rejected[0]["level"] == "error"
        assert addresses(query(proxy.address, "cached.example")) == ["192.0.2.1"]
        assert addresses(query(proxy.address, "new.example")) == ["192.0.2.1"]
        assert fake_upstream.count() == 2 and not events(proxy, "config_reloaded")

    def test_sighup_reloads(self, fake_upstream, proxy_factory, tmp_path):
        """SIGHUP reloads a change the metadata poll cannot see (same size, same mtime)."""
        path = tmp_path / "proxy.yaml"
        write(path, f"upstream: {fake_upstream.address}\n", size=100)
        proxy = proxy_factory("--config", str(path), *NO_RESOLV)
        with FakeUpstream() as second:
            second.default_address = "192.0.2.2"
            before = path.stat()
            write(path, f"upstream: {second.address}\n", size=100)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            time.sleep(2.5)  # longer than the poll interval: the poll does not see this change
            assert not events(proxy, "config_reloaded")
            assert addresses(query(proxy.address, "one.example")) == ["192.0.2.1"]
            os.kill(proxy.pid, signal.SIGHUP)
            assert wait_event(proxy, "config_reloaded")[0]["trigger"] == "sighup"
            assert addresses(query(proxy.address, "two.example")) == ["192.0.2.2"]
            assert proxy.proc.poll() is None

    def test_restart_only_setting_logged_and_kept(self, fake_upstream, proxy_factory, tmp_path):
        """A setting that cannot change live is logged as config_change_needs_restart; the live ones still apply."""
        path = tmp_path / "proxy.yaml"
        write(path, f"upstream: {fake_upstream.address}\nmax-ttl: 3600\n")
        proxy = proxy_factory("--config", str(path), *NO_RESOLV)
        fake_upstream.ttl = 300
        write(path, f"upstream: {fake_upstream.address}\nmax-ttl: 60\ncache-size: 5\ntcp-idle-timeout: 1\n")
        needs_restart = wait_event(proxy, "config_change_needs_restart")
        assert sorted(needs_restart[0]["settings"]) == ["cache_size", "tcp_idle_timeout"]
        assert wait_event(proxy, "config_reloaded")[0]["changed"] == {"max_ttl": 60}
        assert query(proxy.address, "capped.example").answer[0].ttl == 60

    def test_log_level_changes_live(self, fake_upstream, proxy_factory, tmp_path):
        """Switching the file to log-level debug with log-queries makes per-query debug lines appear."""
        path = tmp_path / "proxy.yaml"
        write(path, f"upstream: {fake_upstream.address}\n")
        proxy = proxy_factory("--config", str(path), *NO_RESOLV)
        query(proxy.address, "quiet.example")
        assert not events(proxy, "query")
        write(path, f"upstream: {fake_upstream.address}\nlog-level: debug\nlog-queries: true\n")
        wait_event(proxy, "config_reloaded")
        query(proxy.address, "loud.example")
        assert wait_event(proxy, "query")[0]["level"] == "debug"
