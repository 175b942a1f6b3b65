"""The README documents every flag with its environment variable: the docs cannot drift from config.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import config

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("flag", config.FLAGS, ids=lambda f: f.option)
def test_every_flag_and_variable_in_readme(flag):
    """Each flag and its KUBE_DNS_PROXY_* variable appear in README.md."""
    assert f"`{flag.option}" in README
    assert f"`{flag.env}`" in README
