"""The command line: flags and their environment variables, bad input, signals, logs, resolv.conf default."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.rcode
import pytest

import config
from conftest import REPO_ROOT, query


def run_proxy(*args: str, env: dict[str, str] | None = None, timeout: float = 10) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE_DNS_PROXY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "proxy.py", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class TestConfig:
    """build_config: flags, environment variables and validation in one place."""

    def test_defaults(self, tmp_path):
        """The defaults are the documented ones; upstreams come from resolv.conf."""
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("search svc.cluster.local\nnameserver 127.0.0.53\nnameserver ::1\n")
        cfg = config.build_config(["--resolv-conf", str(resolv)], environ={})
        assert [str(e) for e in cfg.listen] == ["127.0.0.1:53"]
        assert [str(e) for e in cfg.upstreams] == ["127.0.0.53:53", "[::1]:53"]
        assert cfg.cache_size == 10000 and cfg.stale_ttl == 30 and cfg.max_stale == math.inf
        assert cfg.stale_answer_timeout == 1.8 and cfg.failure_recheck == 30

    def test_resolv_conf_skips_own_listen_address(self, tmp_path):
        """A resolv.conf nameserver that is one of our listen addresses is skipped (no loop)."""
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\nnameserver 127.0.0.2\n")
        cfg = config.build_config(["--resolv-conf", str(resolv), "--listen", "127.0.0.1:53"], environ={})
        assert [str(e) for e in cfg.upstreams] == ["127.0.0.2:53"]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1", "127.0.0.1:53"),
            ("127.0.0.1:5353", "127.0.0.1:5353"),
            ("[::1]:53", "[::1]:53"),
            ("::1", "[::1]:53"),
        ],
    )
    def test_endpoint_forms(self, text, expected):
        """HOST, HOST:PORT, [V6]:PORT and bare V6 are accepted; the port defaults to 53."""
        assert str(config.parse_endpoint(text)) == expected

    def test_environment_variables(self):
        """Every setting can come from a KUBE_DNS_PROXY_* variable; flags win over them."""
        env = {
            "KUBE_DNS_PROXY_UPSTREAM": "127.0.0.2:53,127.0.0.3",
            "KUBE_DNS_PROXY_CACHE_SIZE": "42",
            "KUBE_DNS_PROXY_FORCE_TCP": "true",
            "KUBE_DNS_PROXY_MAX_STALE": "unlimited",
            "KUBE_DNS_PROXY_STALE_TTL": "9",
        }
        cfg = config.build_config(["--stale-ttl", "11"], environ=env)
        assert [str(e) for e in cfg.upstreams] == ["127.0.0.2:53", "127.0.0.3:53"]
        assert cfg.cache_size == 42 and cfg.force_tcp and cfg.stale_ttl == 11

    @pytest.mark.e2e  # runs proxy.py
    def test_every_flag_has_an_environment_variable_in_help(self):
        """--help names an environment variable for every flag."""
        result = run_proxy("--help")
        assert result.returncode == 0
        for flag in config.FLAGS:
            assert flag.option in result.stdout and flag.env in result.stdout

    @pytest.mark.e2e  # runs proxy.py
    @pytest.mark.parametrize(
        "args",
        [
            ["--cache-size", "0"],
            ["--cache-size", "many"],
            ["--listen", "not-an-ip:53"],
            ["--upstream", "127.0.0.1:99999"],
            ["--no-such-flag"],
            ["--max-stale", "-1"],
            ["--min-ttl", "100", "--max-ttl", "10"],
            ["--listen", "127.0.0.1:5300", "--upstream", "127.0.0.1:5300"],
            ["--log-level", "loud"],
        ],
    )
    def test_bad_flag_one_line_exit_2(self, args):
        """A bad flag or value prints one error line on stderr and exits with code 2."""
        result = run_proxy(*args, "--upstream", "127.0.0.9:53") if "--upstream" not in args else run_proxy(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("proxy.py: error:")
        assert "Traceback" not in result.stderr

    @pytest.mark.e2e  # runs proxy.py
    def test_bad_environment_variable_exit_2(self):
        """A bad value in an environment variable names the variable and exits with code 2."""
        result = run_proxy("--upstream", "127.0.0.9:53", env={"KUBE_DNS_PROXY_DEADLINE": "soon"})
        assert result.returncode == 2 and "KUBE_DNS_PROXY_DEADLINE" in result.stderr

    @pytest.mark.e2e  # runs proxy.py
    def test_no_nameserver_anywhere_exit_2(self, tmp_path):
        """No --upstream and no nameserver in resolv.conf is a configuration error."""
        empty = tmp_path / "resolv.conf"
        empty.write_text("search cluster.local\n")
        result = run_proxy("--resolv-conf", str(empty))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


class TestProcess:
    """The running process: resolv.conf default, logs, SIGTERM."""

    def test_forwards_to_resolv_conf_nameserver_by_default(self, fake_upstream, proxy_factory, tmp_path: Path):
        """With no --upstream the proxy forwards to the nameserver lines of resolv.conf."""
        resolv = tmp_path / "resolv.conf"
        resolv.write_text(f"nameserver {fake_upstream.host}\n")
        # resolv.conf nameservers are on port 53; point one at the fake upstream via the env form instead.
        proxy = proxy_factory(env={"KUBE_DNS_PROXY_RESOLV_CONF": str(resolv), "KUBE_DNS_PROXY_UPSTREAM": ""})
        started = [line for line in proxy.logs() if line.get("event") == "starting"]
        assert started and started[0]["config"]["upstreams"] == [f"{fake_upstream.host}:53"]

    def test_logs_are_json_lines_with_utc_timestamps(self, fake_upstream, proxy_factory):
        """Every stdout line is one JSON object with event, level and an ISO UTC timestamp."""
        proxy = proxy_factory("--upstream", fake_upstream.address)
        query(proxy.address, "log.default.svc.cluster.local")
        proxy.stop()
        lines = [line for line in proxy.stdout().splitlines() if line.strip()]
        assert lines
        for line in lines:
            record = json.loads(line)
            assert {"event", "level", "timestamp"} <= set(record)
            assert record["timestamp"].endswith("Z")
        events = [json.loads(line)["event"] for line in lines]
        assert events[:2] == ["starting", "listening"] and events[-1] == "stopped"

    def test_no_per_query_lines_at_info(self, fake_upstream, proxy_factory):
        """At the default level, queries produce no log lines; --log-queries adds debug lines."""
        quiet = proxy_factory("--upstream", fake_upstream.address)
        loud = proxy_factory("--upstream", fake_upstream.address, "--log-level", "debug", "--log-queries")
        for proxy in (quiet, loud):
            for i in range(5):
                query(proxy.address, f"q{i}.default.svc.cluster.local")
                query(proxy.address, f"q{i}.default.svc.cluster.local")
        assert not [line for line in quiet.logs() if line.get("event") == "query"]
        assert len([line for line in loud.logs() if line.get("event") == "query"]) == 10

    def test_sigterm_lets_inflight_query_finish_and_exits_0(self, fake_upstream, proxy_factory):
        """SIGTERM: the query in flight is still answered, then the process exits 0."""
        fake_upstream.mode = "slow"
        fake_upstream.delay = 0.6
        proxy = proxy_factory("--upstream", fake_upstream.address)
        result = {}

        def ask() -> None:
            result["reply"] = query(proxy.address, "inflight.default.svc.cluster.local", timeout=5)

        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(0.2)
        os.kill(proxy.pid, signal.SIGTERM)
        thread.join(5)
        assert result["reply"].rcode() == dns.rcode.NOERROR
        assert proxy.proc.wait(5) == 0

    def test_sigterm_with_idle_tcp_client_exits_promptly(self, fake_upstream, proxy_factory):
        """An idle TCP client does not hold up shutdown."""
        import socket

        proxy = proxy_factory("--upstream", fake_upstream.address, "--tcp-idle-timeout", "30")
        with socket.create_connection(("127.0.0.1", proxy.port)):
            time.sleep(0.1)
            started = time.monotonic()
            os.kill(proxy.pid, signal.SIGTERM)
            assert proxy.proc.wait(5) == 0
            assert time.monotonic() - started < 1.5

    def test_port_held_by_another_program_fails_clearly(self, fake_upstream):
        """A port held by a socket without SO_REUSEPORT (another program) makes the proxy exit 1 with bind_failed."""
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
            holder.bind(("127.0.0.1", 0))
            port = holder.getsockname()[1]
            result = run_proxy("--listen", f"127.0.0.1:{port}", "--upstream", fake_upstream.address)
        assert result.returncode == 1
        assert any(json.loads(line).get("event") == "bind_failed" for line in result.stdout.splitlines())

    def test_second_proxy_shares_the_port_and_says_so(self, fake_upstream, proxy_factory, tmp_path):
        """A second proxy on the same port (SO_REUSEPORT, for takeovers) starts, answers, logs listen_address_shared."""
        first = proxy_factory("--upstream", fake_upstream.address)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE_DNS_PROXY_")}
        log_path = tmp_path / "second.stdout"
        with log_path.open("wb") as out:
            second = subprocess.Popen(
                [sys.executable, "proxy.py", "--listen", first.address, "--upstream", fake_upstream.address],
                cwd=REPO_ROOT,
                env={**env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 10
            while '"serving"' not in log_path.read_text() and time.monotonic() < deadline:
                assert second.poll() is None, log_path.read_text()
                time.sleep(0.05)
            answers = [query(first.address, f"shared{i}.default.svc.cluster.local").rcode() for i in range(10)]
        finally:
            second.send_signal(signal.SIGTERM)
            code = second.wait(10)
        events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        shared = [e for e in events if e["event"] == "listen_address_shared"]
        assert (code, set(answers), [e["other_sockets"] for e in shared]) == (0, {dns.rcode.NOERROR}, [1])
