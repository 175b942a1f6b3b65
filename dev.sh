#!/usr/bin/env bash
# Developer entry point for kube-dns-proxy:
#   ./dev.sh setup            install the Debian tools the tests use and the .venv (idempotent)
#   ./dev.sh run [ARGS...]    setup, then run proxy.py ARGS in the .venv
#   ./dev.sh test [ARGS...]   setup, then pytest ARGS, ruff check, ruff format --check and mypy
#   ./dev.sh docs             rewrite README.md's flag table from config.FLAGS
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
# knotd, iptables, nft, ip, unbound and dnsmasq live in sbin, missing from some non-login PATHs.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

APT_PACKAGES=(knot knot-dnsutils bind9-dnsutils dnsperf unbound dnsmasq-base iptables nftables conntrack
  iproute2 procps python3-venv prometheus golang-go)
# One binary per package above that proves it is installed (python3-venv is checked apart);
# prometheus and promtool: tests/test_dashboard.py and tests/test_alerts.py; go: the Go stub
# resolver of tests/test_autopath_lab.py.
NEEDED_BINARIES=(knotd knotc kdig dig dnsperf unbound dnsmasq iptables nft conntrack ip ps pgrep prometheus promtool go)
VENV=.venv
REQUIREMENTS=(requirements.txt requirements-dev.txt)
STAMP="$VENV/.requirements.sha256"

say() { printf 'dev.sh: %s\n' "$*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# A Python >= 3.11 that can create a venv with pip (ensurepip), or nothing.
find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3 /usr/bin/python3; do
    [[ -n "$candidate" ]] || continue
    if "$candidate" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' \
      2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

install_debian_packages() {
  local missing=() binary
  for binary in "${NEEDED_BINARIES[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || missing+=("$binary")
  done
  find_python >/dev/null || missing+=(python3-venv)
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi
  say "missing ${missing[*]}: installing Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not start unbound or knot as services while installing: the tests run
  # their own instances, and unbound's start would fetch the root trust anchor off this machine.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    added_policy=1
  fi
  local status=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || status=$?
  if [[ $status -eq 0 ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null || status=$?
  fi
  if [[ $added_policy -eq 1 ]]; then
    as_root rm -f "$policy"
  fi
  return "$status"
}

requirements_hash() {
  local python=$1
  { cat "${REQUIREMENTS[@]}"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum |
    cut -d' ' -f1
}

setup_venv() {
  local requirement
  for requirement in "${REQUIREMENTS[@]}"; do
    [[ -f $requirement ]] || { say "$requirement is missing"; return 1; }
  done
  local python
  python=$(find_python) || { say "no Python >= 3.11 with venv/ensurepip found"; return 1; }
  if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "creating $VENV with $python"
    rm -rf "$VENV"
    "$python" -m venv "$VENV"
  fi
  local wanted
  wanted=$(requirements_hash "$VENV/bin/python")
  if [[ -f $STAMP && $(<"$STAMP") == "$wanted" ]]; then
    return 0
  fi
  say "installing ${REQUIREMENTS[*]} into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "${REQUIREMENTS[@]/#/--requirement=}"
  printf '%s\n' "$wanted" >"$STAMP"
}

setup() {
  install_debian_packages
  setup_venv
}

run_tests() {
  local status=0
  "$VENV/bin/python" -m pytest "$@" || status=$?
  # Lint, format and type checks run even when tests fail, so one run reports all of them.
  "$VENV/bin/ruff" check . || status=$?
  "$VENV/bin/ruff" format --check . || status=$?
  "$VENV/bin/mypy" || status=$?
  return "$status"
}

# README.md's flag table, between its two marker comments, becomes config.flag_table()
# (tests/test_docs.py fails while they differ).
write_docs() {
  "$VENV/bin/python" - <<'EOF'
import sys
from pathlib import Path

import config

START, END = "<!-- flag-table:start -->\n", "<!-- flag-table:end -->"
readme = Path("README.md")
text = readme.read_text()
if text.count(START) != 1 or text.count(END) != 1:
    sys.exit("dev.sh: README.md needs one <!-- flag-table:start --> line and one <!-- flag-table:end --> line")
head, rest = text.split(START)
_, tail = rest.split(END)
new = head + START + config.flag_table() + END + tail
if new != text:
    readme.write_text(new)
    print("dev.sh: rewrote the flag table in README.md", file=sys.stderr)
EOF
}

usage() {
  sed -n '2,6s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
}

command=${1:-}
[[ $# -gt 0 ]] && shift
case "$command" in
  setup) setup ;;
  run)
    setup
    exec "$VENV/bin/python" proxy.py "$@"
    ;;
  test)
    setup
    run_tests "$@"
    ;;
  docs)
    setup_venv
    write_docs
    ;;
  *)
    usage
    exit 2
    ;;
esac
