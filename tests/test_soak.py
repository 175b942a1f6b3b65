"""The short soak (bench/soak.py --short): 20 s of load while the upstream flaps, no failure for cached names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.e2e  # bench/soak.py runs proxy.py and an upstream


def test_short_soak_cached_names_never_fail():
    """Under a flapping upstream (answer, down, hang) every query for a name cached beforehand is answered."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "soak.py"), "--short", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    print(result.stdout, result.stderr)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["cached_failures"] == 0, summary["cached"]
    assert summary["cached"]["sent"] > 0 and summary["uncached"]["answers_by_rcode"].get("SERVFAIL", 0) > 0
    assert len(summary["flaps"]) >= 9 and not summary["flapper_failed"], "the upstream did not flap every 2 s"
    assert summary["tracebacks_logged"] == 0
    assert result.returncode == 0
