"""KServe's own CRD schemas as strict validators, for tests/test_kserve_examples.py.

Each CustomResourceDefinition of KServe (v0.20) carries an OpenAPI v3 schema per version
(``spec.versions[].schema.openAPIV3Schema``). The API server *prunes* a field that schema does not
declare, silently, so a misplaced field (KServe's own sample with ``spec.workload.kvCacheOffloading``)
applies cleanly and does nothing. Here every object the schema declares is closed instead
(``additionalProperties: false``), except where the schema keeps unknown fields on purpose
(``x-kubernetes-preserve-unknown-fields``, e.g. the router's inline EPP configuration): an unknown
field is an error. ``x-kubernetes-validations`` (CEL rules) are not evaluated.

The CRDs are test data beside the checkout (``../shared/reference/kserve-crds``), or wherever
``KSERVE_CRD_DIR`` points; :func:`crd_dir` is None when neither exists.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CRD_DIR = REPO.parent / "shared" / "reference" / "kserve-crds"
CRD_DIR_ENV = "KSERVE_CRD_DIR"

# What the API server accepts in metadata (ObjectMeta); the CRDs leave it to the server.
_OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def crd_dir() -> Path | None:
    """The folder of KServe's CRDs: $KSERVE_CRD_DIR, else ../shared/reference/kserve-crds; None if absent."""
    configured = os.environ.get(CRD_DIR_ENV)
    folder = Path(configured) if configured else DEFAULT_CRD_DIR
    return folder if folder.is_dir() else None


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which every declared object rejects undeclared fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    is_object = out.get("type") == "object" or "properties" in out
    if out.get("x-kubernetes-embedded-resource"):
        embedded = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": _OBJECT_META}
        out["properties"] = {**embedded, **out.get("properties", {})}
    if is_object and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def load_validators(folder: Path, kinds: set[str]) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """A strict validator per (apiVersion, kind) for the given kinds, every version their CRDs serve.

    Only those CRDs are parsed (megabytes of YAML each): controller-gen names the file of a kind
    ``<group>_<plural>.yaml``, and KServe's plurals are the lower-case kind plus "s".
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ten times faster on these files
    plurals = {kind.lower() + "s" for kind in kinds}
    validators = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.stem.split("_", 1)[-1] not in plurals:
            continue
        crd = yaml.load(path.read_text(), Loader=loader)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema.setdefault("properties", {})["metadata"] = _OBJECT_META
            schema = strict(schema)
            jsonschema.Draft7Validator.check_schema(schema)
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def problems(validators: dict[tuple[str, str], jsonschema.protocols.Validator], doc: dict[str, Any]) -> list[str]:
    """Every way doc breaks its CRD's schema, as "path: message" lines; [] when it is valid."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key not in validators:
        return [f"{key[1]} {key[0]}: no KServe CRD serves this kind and version"]
    errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message}" for e in errors]
