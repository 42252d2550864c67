"""The KServe examples (examples/kserve/): what KServe v0.20 accepts, and what the connector needs.

Every KServe object is validated against KServe's own CRD schemas with unknown fields rejected
(tests/kserve_schemas.py: the API server would silently prune them), the plain Kubernetes objects
with ``kubernetes-validate --strict``. Then each example is read as its pod would get it: the
connector JSON reaching vLLM parses and names this connector, the LMCACHE_* settings load with the
library's loader, the memory limit, /dev/shm and the disk tier's emptyDir are sized for the tiers,
and the KV events agree with llm-d's precise prefix-cache scorer.

The CRD checks skip, saying why, where KServe's CRDs are not beside the checkout
(``../shared/reference/kserve-crds``, or ``$KSERVE_CRD_DIR``); the other checks always run.
"""

from __future__ import annotations

import json
import logging
import re
import shlex

import helm_tools as ht
import kserve_schemas as ks
import pytest
import yaml

from lmcache_connector.config import LMCacheConfig, load_config

EXAMPLES = ht.REPO / "examples" / "kserve"
ISVC = "inferenceservice.yaml"
LLMISVC = "llminferenceservice.yaml"
POD_IP = "10.1.2.3"
KSERVE_SHM_CAP_GIB = 1.0  # the /dev/shm of KServe's LLMInferenceService template
VLLM_GIB_PER_WORKER = 4.0  # the chart's rule of thumb for vLLM's own host memory


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc]


def one(name: str, kind: str) -> dict:
    found = [doc for doc in documents(name) if doc["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}"
    return found[0]


def is_kserve(doc: dict) -> bool:
    return doc["apiVersion"].startswith("serving.kserve.io/")


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi|Ti)", quantity).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1.0, "Ti": 1024.0}[unit]


def flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times in {args}"
    return args[args.index(flag) + 1]


# ---------------------------------------------------------------- how each example reaches vLLM


def runtime_container() -> dict:
    return one(ISVC, "ServingRuntime")["spec"]["containers"][0]


def main_container() -> dict:
    containers = one(LLMISVC, "LLMInferenceService")["spec"]["template"]["containers"]
    return next(c for c in containers if c["name"] == "main")


def main_env() -> dict[str, str]:
    """The main container's environment as the kubelet builds it (POD_IP resolved, $(VAR) expanded)."""
    return ht.resolved_env(main_container(), POD_IP)


def vllm_args(example: str) -> list[str]:
    """The arguments vLLM receives: the runtime's args, or VLLM_ADDITIONAL_ARGS as KServe's template
    passes them (``eval "exec vllm serve ... ${VLLM_ADDITIONAL_ARGS}"``: shell words, quotes removed)."""
    if example == ISVC:
        return list(runtime_container()["args"])
    return shlex.split(main_env()["VLLM_ADDITIONAL_ARGS"])


def lmcache_env(example: str) -> dict[str, str]:
    if example == ISVC:
        return dict(one(ISVC, "ConfigMap")["data"])
    return {k: v for k, v in main_env().items() if k.startswith("LMCACHE_")}


def pod_volumes(example: str) -> tuple[dict[str, dict], dict[str, str]]:
    """(volumes by name, volume name by mount path) of the vLLM container."""
    if example == ISVC:
        spec, container = one(ISVC, "ServingRuntime")["spec"], runtime_container()
    else:
        spec, container = one(LLMISVC, "LLMInferenceService")["spec"]["template"], main_container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    return volumes, {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def resources(example: str) -> dict:
    if example == ISVC:
        return one(ISVC, "InferenceService")["spec"]["predictor"]["model"]["resources"]
    return main_container()["resources"]


def tensor_parallel(example: str) -> int:
    if example == ISVC:
        args = vllm_args(ISVC)
        return int(flag_value(args, "--tensor-parallel-size")) if "--tensor-parallel-size" in args else 1
    return one(LLMISVC, "LLMInferenceService")["spec"].get("parallelism", {}).get("tensor", 1)


# ---------------------------------------------------------------- KServe's schemas


@pytest.fixture(scope="module")
def validators():
    folder = ks.crd_dir()
    if folder is None:
        pytest.skip(
            f"KServe's CRDs are not here: set {ks.CRD_DIR_ENV} or put them at {ks.DEFAULT_CRD_DIR} "
            "(CI has them beside the checkout)"
        )
    kinds = {doc["kind"] for name in (ISVC, LLMISVC) for doc in documents(name) if is_kserve(doc)}
    return ks.load_validators(folder, kinds)


@pytest.mark.parametrize(
    ("example", "kind"),
    [(ISVC, "ServingRuntime"), (ISVC, "InferenceService"), (LLMISVC, "LLMInferenceService")],
)
def test_every_kserve_object_is_valid_against_kserve_crds_with_unknown_fields_rejected(validators, example, kind):
    assert ks.problems(validators, one(example, kind)) == []


def test_every_kserve_object_in_the_examples_is_checked():
    checked = {(ISVC, "ServingRuntime"), (ISVC, "InferenceService"), (LLMISVC, "LLMInferenceService")}
    present = {(name, doc["kind"]) for name in (ISVC, LLMISVC) for doc in documents(name) if is_kserve(doc)}
    assert present == checked
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted([ISVC, LLMISVC])


def test_the_strict_check_rejects_what_kserve_would_silently_prune(validators):
    """KServe's own sample nests kvCacheOffloading under spec.workload, which does not exist."""
    service = one(LLMISVC, "LLMInferenceService")
    service["spec"]["workload"] = {"kvCacheOffloading": {"cpu": "10Gi"}}
    pruned = "$.spec: Additional properties are not allowed ('workload' was unexpected)"
    assert ks.problems(validators, service) == [pruned]
    runtime = one(ISVC, "ServingRuntime")
    runtime["spec"]["containers"][0]["envfrom"] = []
    assert "'envfrom' was unexpected" in " ".join(ks.problems(validators, runtime))


def test_plain_kubernetes_objects_are_valid_kubernetes_1_32():
    plain = [doc for name in (ISVC, LLMISVC) for doc in documents(name) if not is_kserve(doc)]
    assert plain, "the ConfigMap of the InferenceService example"
    result = ht.kubernetes_validate(yaml.safe_dump_all(plain))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the connector


@pytest.mark.parametrize("example", [ISVC, LLMISVC])
def test_each_example_passes_this_connector_to_vllm(example):
    config = json.loads(flag_value(vllm_args(example), "--kv-transfer-config"))
    assert config["kv_connector"] == "LMCacheConnector"
    assert config["kv_connector_module_path"] == "lmcache_connector"
    assert config["kv_role"] == "kv_both"


def test_llm_inference_service_leaves_kserve_kv_offloading_unset():
    """With kvCacheOffloading unset KServe injects no --kv-transfer-config: ours is the only one."""
    spec = one(LLMISVC, "LLMInferenceService")["spec"]
    assert "kvCacheOffloading" not in spec
    assert "kvCacheOffloading" not in spec.get("prefill", {})
    assert "args" not in main_container()  # args would replace the template's own `vllm serve` script


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        (ISVC, LMCacheConfig(max_local_cpu_size=10.0, local_disk="/var/cache/lmcache", max_local_disk_size=50.0)),
        (LLMISVC, LMCacheConfig(max_local_cpu_size=20.0, local_disk="/var/cache/lmcache", max_local_disk_size=100.0)),
    ],
)
def test_the_library_reads_each_examples_settings(example, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
        config = load_config(env=lmcache_env(example))
    assert config == expected
    assert not caplog.records, [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("example", [ISVC, LLMISVC])
def test_disk_tier_empty_dir_is_larger_than_the_tier(example):
    """Our tier is bounded; an emptyDir past its sizeLimit gets the pod evicted, so the limit is above the bound."""
    env = lmcache_env(example)
    volumes, mounts = pod_volumes(example)
    volume = volumes[mounts[env["LMCACHE_LOCAL_DISK"].removeprefix("file://")]]
    assert gib(volume["emptyDir"]["sizeLimit"]) > float(env["LMCACHE_MAX_LOCAL_DISK_SIZE"])
    assert "medium" not in volume["emptyDir"]  # disk, not memory


@pytest.mark.parametrize("example", [ISVC, LLMISVC])
def test_memory_limit_holds_a_cpu_tier_per_worker_and_shm(example):
    env = lmcache_env(example)
    volumes, mounts = pod_volumes(example)
    shm = volumes[mounts.get("/dev/shm", "dshm")]["emptyDir"]
    assert shm["medium"] == "Memory"
    workers = tensor_parallel(example)
    needed = workers * (float(env["LMCACHE_MAX_LOCAL_CPU_SIZE"]) + VLLM_GIB_PER_WORKER) + gib(shm["sizeLimit"])
    limits = resources(example)["limits"]
    assert needed <= gib(limits["memory"])
    assert int(limits["nvidia.com/gpu"]) == workers


def test_llm_inference_service_replaces_kserve_1gi_shm():
    """The template's /dev/shm volume is named dshm and capped at 1Gi; a volume of the same name replaces it."""
    volumes, _ = pod_volumes(LLMISVC)
    assert gib(volumes["dshm"]["emptyDir"]["sizeLimit"]) > KSERVE_SHM_CAP_GIB


# ---------------------------------------------------------------- KV events for llm-d


def test_kv_events_match_llm_d_precise_prefix_scorer():
    service = one(LLMISVC, "LLMInferenceService")
    plugins = service["spec"]["router"]["scheduler"]["config"]["inline"]["plugins"]
    producer = next(p for p in plugins if p["type"] == "precise-prefix-cache-producer")["parameters"]
    args = vllm_args(LLMISVC)
    events = json.loads(flag_value(args, "--kv-events-config"))
    assert events["enable_kv_cache_events"] is True and events["publisher"] == "zmq"
    assert events["topic"] == f"kv@{POD_IP}@{service['spec']['model']['name']}"
    assert events["topic"].startswith(producer["kvEventsConfig"]["topicFilter"])
    port = int(re.fullmatch(r"tcp://\*:([0-9]+)", events["endpoint"]).group(1))  # binds: the EPP discovers pods
    assert producer["kvEventsConfig"]["discoverPods"] is True
    assert port == producer["kvEventsConfig"]["podDiscoveryConfig"]["socketPort"]
    assert {"containerPort": port, "name": "kv-events", "protocol": "TCP"} in main_container()["ports"]
    assert int(flag_value(args, "--block-size")) == producer["tokenProcessorConfig"]["blockSize"]
    assert main_env()["PYTHONHASHSEED"] == producer["tokenProcessorConfig"]["hashSeed"]
    assert flag_value(args, "--prefix-caching-hash-algo") == "sha256_cbor"
    assert int(main_env()["LMCACHE_CHUNK_SIZE"]) % int(flag_value(args, "--block-size")) == 0
    # The kubelet expands $(POD_IP) only from a variable defined before the one using it.
    names = [e["name"] for e in main_container()["env"]]
    assert names.index("POD_IP") < names.index("VLLM_ADDITIONAL_ARGS")


# ---------------------------------------------------------------- the image


def test_examples_run_the_derived_image_as_a_non_root_user():
    image = runtime_container()["image"]
    assert main_container()["image"] == image
    for container in (runtime_container(), main_container()):
        assert container["securityContext"]["runAsNonRoot"] is True
    users = re.findall(r"^USER\s+(\S+)\s*$", (ht.REPO / "docker" / "Dockerfile").read_text(), re.M)
    assert users, "docker/Dockerfile sets no USER"
    # Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
    assert users[-1].isdigit() and int(users[-1]) != 0
