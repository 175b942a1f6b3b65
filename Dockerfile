# syntax=docker/dockerfile:1
# kube-dns-proxy: the per-node DNS cache (proxy.py) and its crash watchdog (watchdog.py).
# The base image is pinned by the digest of its multi-architecture index (one digest for amd64, arm64,
# ...): every rebuild starts from the same Python and Debian release, whatever the tag is moved to
# later.  With a digest the tag is ignored; it stays for readers and must name the same image.
# Update both together on purpose (a Python or Debian security release): the "Digest:" line of
# `docker buildx imagetools inspect python:3.11.14-slim-bookworm` is the index digest.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# PYTHONUNBUFFERED: JSON log lines reach the kubelet at once and survive a kill.
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in the pod (bytecode is built below).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# iptables: both the legacy and the nft binaries (netsetup.py picks kube-proxy's backend);
# nftables: nft, to inspect the nft backend on the node; iproute2: ip, for the /32 addresses;
# conntrack: flushes stale UDP flows in dnat mode; procps: sysctl, for route_localnet.
# No "=version" pins (DL3008 off for this line): a Debian suite keeps only the current version of a
# package, so a pin such as iptables=1.8.9-2 fails to install after the next point or security
# release.  The digest above fixes the base image and its suite (bookworm); apt installs that suite's
# current, patched packages.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        conntrack \
        iproute2 \
        iptables \
        nftables \
        procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Python packages pinned by version in requirements.txt (tests/test_manifests.py checks it).
COPY requirements.txt ./
# Wheels only: gevent, greenlet, zope.interface and PyYAML ship manylinux wheels, so no
# compiler is needed now and none is left in the image.
RUN pip install --no-cache-dir --only-binary=:all: -r requirements.txt
COPY *.py ./
RUN python -m compileall -q /app

# Documentation only: the pod uses the host network.
EXPOSE 53/udp 53/tcp 9254/tcp
# Exec form: python is PID 1 and gets SIGTERM itself (proxy.py handles it and tears down).
# No HEALTHCHECK: Kubernetes ignores it; the DaemonSet's probes use /health and /ready.
ENTRYPOINT ["python", "proxy.py"]
