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


def test_flag_table_is_generated_from_flags():
    """The README's table between the flag-table markers is exactly config.flag_table()."""
    start, end = "<!-- flag-table:start -->\n", "<!-- flag-table:end -->"
    assert README.count(start) == 1 and README.count(end) == 1, "README.md needs the flag-table marker comments"
    table = README.split(start)[1].split(end)[0]
    assert table == config.flag_table(), "README.md's flag table is out of date: run ./dev.sh docs"
