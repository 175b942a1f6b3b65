# syntax=docker/dockerfile:1
# kube-dns-proxy: the per-node DNS cache (proxy.py) and its crash watchdog (watchdog.py).
# Pinned by version; pin by digest too (python:3.11.14-slim-bookworm@sha256:...) in your registry.
FROM python:3.11.14-slim-bookworm

# PYTHONUNBUFFERED: JSON log lines reach the kubelet at once and survive a kill.
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in the pod (bytecode is built below).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# iptables: both the legacy and the nft binaries (netsetup.py picks kube-proxy's backend);
# nftables: nft, to inspect the nft backend on the node; iproute2: ip, for the /32 addresses;
# conntrack: flushes stale UDP flows in dnat mode; procps: sysctl, for route_localnet.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        conntrack=1:1.4.7-1+b2 \
        iproute2=6.1.0-3 \
        iptables=1.8.9-2 \
        nftables=1.0.6-2+deb12u2 \
        procps=2:4.0.2-3 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
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
