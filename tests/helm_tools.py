"""The real tools behind tests/test_helm_chart.py: helm (lint, template, install --dry-run) and
kubernetes-validate, run offline on helm/lmcache, plus what the tests need to read the result.

helm comes from ``.venv/bin/helm`` (put there by ``python scripts/install_helm.py``) or PATH.
Every helm call runs with ``KUBECONFIG=/dev/null`` and private config/cache folders, so no cluster
and no user setting can change a result.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "lmcache"
KUBE_VERSION = "1.32.0"
RELEASE = "lmcache"
NAMESPACE = "llm"
_HELM_HOME = Path(tempfile.mkdtemp(prefix="helm-home-"))
STAND_IN_TOKEN = "0123456789abcdef" * 2  # what load_pod_config puts in a mounted P2P token file


class HelmFailed(Exception):
    """helm exited non-zero; the message is its stderr."""


def find_tool(name: str) -> str | None:
    """A tool next to this Python (the venv), in the repo's .venv, or on PATH."""
    for folder in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return str(folder / name)
    return shutil.which(name)


def require_helm() -> str:
    """The helm binary, or a test failure that says how to get it (chart tests never skip)."""
    import pytest

    path = find_tool("helm")
    if path is None:
        pytest.fail("helm not found in .venv/bin or on PATH: run `python scripts/install_helm.py` first")
    return path


def _helm(helm: str, *args: str) -> str:
    env = {
        **os.environ,
        "KUBECONFIG": "/dev/null",
        "HELM_CONFIG_HOME": str(_HELM_HOME / "config"),
        "HELM_CACHE_HOME": str(_HELM_HOME / "cache"),
        "HELM_DATA_HOME": str(_HELM_HOME / "data"),
    }
    done = subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=60)
    if done.returncode != 0:
        raise HelmFailed(done.stderr.strip() or done.stdout.strip())
    return done.stdout


def _value_args(
    values_files: Iterable[Path], set_string: Mapping[str, str], set_values: Mapping[str, str]
) -> list[str]:
    args = []
    for path in values_files:
        args += ["-f", str(path)]
    for key, value in set_string.items():
        args += ["--set-string", f"{key}={value}"]
    for key, value in set_values.items():
        args += ["--set", f"{key}={value}"]
    return args


def template(
    helm: str,
    values_files: Iterable[Path] = (),
    set_string: Mapping[str, str] | None = None,
    set_values: Mapping[str, str] | None = None,
    values: Mapping[str, Any] | None = None,
) -> str:
    """``helm template`` of the chart: the manifest text, or HelmFailed with helm's message.
    ``values`` is a nested mapping passed as one more values file (no --set quoting rules)."""
    files = list(values_files)
    if values is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=_HELM_HOME, delete=False) as f:
            yaml.safe_dump(dict(values), f)
        files.append(Path(f.name))
    return _helm(
        helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
        *_value_args(files, set_string or {}, set_values or {}),
    )  # fmt: skip


def lint(helm: str, values_files: Iterable[Path] = ()) -> str:
    """``helm lint --strict``: its report, or HelmFailed."""
    return _helm(
        helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *_value_args(values_files, {}, {})
    )


def notes(helm: str, values_files: Iterable[Path] = ()) -> str:
    """NOTES.txt as ``helm install`` prints it (``--dry-run=client`` needs no cluster)."""
    out = _helm(
        helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        *_value_args(values_files, {}, {}),
    )  # fmt: skip
    return out.split("\nNOTES:\n", 1)[1]


def kubernetes_validate(manifest: str) -> subprocess.CompletedProcess:
    """``kubernetes-validate --strict`` of a whole rendering against Kubernetes 1.32."""
    tool = find_tool("kubernetes-validate")
    if tool is None:
        raise FileNotFoundError("kubernetes-validate not found: pip install kubernetes-validate==1.37.0")
    return subprocess.run(
        [tool, "--strict", "--quiet", "-k", KUBE_VERSION, "-"], input=manifest, capture_output=True, text=True
    )


def objects(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of this kind (and name); fails listing what there is."""
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, got {[(o['kind'], o['metadata']['name']) for o in objs]}"
    )
    return found[0]


def kinds(objs: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objs}


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    pod = deployment["spec"]["template"]["spec"]
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in {deployment['metadata']['name']}")


def volume_at(deployment: dict[str, Any], container_name: str, mount_path: str) -> dict[str, Any]:
    """The pod volume that the container mounts at mount_path."""
    mounts = [m for m in container(deployment, container_name).get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert mounts, f"nothing is mounted at {mount_path} in container {container_name}"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return volumes[mounts[0]["name"]]


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def resolved_env(container_spec: dict[str, Any], pod_ip: str) -> dict[str, str]:
    """The container's environment as the kubelet would build it: plain values, ``status.podIP``
    field refs resolved to pod_ip, and ``$(VAR)`` expanded from variables defined earlier.
    Secret and other field refs are left out (the tests do not need them)."""
    env: dict[str, str] = {}
    for entry in container_spec.get("env", []):
        if "value" in entry:
            env[entry["name"]] = _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), str(entry["value"]))
        elif entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[entry["name"]] = pod_ip
    return env


def expand(text: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` in a container's command or args, expanded from its environment as the kubelet does."""
    return _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def load_pod_config(env: Mapping[str, str], scratch: Path):
    """The connector's configuration from a rendered pod environment, as the library loads it.

    Files the pod reads from mounted Secrets (``LMCACHE_*_FILE``) do not exist here: while loading,
    each is stood in for by a file under ``scratch`` (empty, or a valid token for the P2P token, which
    the loader reads and checks), and the result names the in-pod paths again.
    """
    import dataclasses

    from lmcache_connector.config import ENV_PREFIX, load_config

    stand_ins: dict[str, str] = {}
    local = dict(env)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name.endswith("_FILE"):
            stand_in = scratch / name.lower()
            stand_in.write_text(STAND_IN_TOKEN if name == "LMCACHE_P2P_AUTH_TOKEN_FILE" else "")
            stand_ins[str(stand_in)] = value
            local[name] = str(stand_in)
    config = load_config(env=local)
    in_pod = {
        field.name: stand_ins[getattr(config, field.name)]
        for field in dataclasses.fields(config)
        if getattr(config, field.name) in stand_ins
    }
    return dataclasses.replace(config, **in_pod)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted path ("deployment.image.tag"); lists and empty maps are leaves."""
    leaves: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves.update(flatten(value, path + "."))
        else:
            leaves[path] = value
    return leaves


def uncommented_keys(values_yaml: str) -> list[str]:
    """Lines of values.yaml that define a key with no comment line right above it.
    Keys inside list items (e.g. an example host) belong to that value and are not checked."""
    lines = values_yaml.splitlines()
    missing = []
    list_indent: int | None = None
    for number, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped or stripped.startswith("#"):
            continue
        if list_indent is not None and (indent > list_indent or (indent == list_indent and stripped.startswith("- "))):
            continue
        list_indent = indent if stripped.startswith("- ") else None
        if list_indent is not None or not re.match(r"[A-Za-z][\w./-]*:", stripped):
            continue
        above = number - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        if above < 0 or not lines[above].lstrip().startswith("#"):
            missing.append(f"line {number + 1}: {stripped}")
    return missing
