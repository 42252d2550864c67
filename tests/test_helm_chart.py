"""The Helm chart (helm/lmcache), checked with a real helm and Kubernetes 1.32 schemas.

Each values file is rendered once per module; the tests then read the rendered objects as a user's
cluster would get them. helm comes from ``python scripts/install_helm.py``; without it these tests
fail (they never skip), saying how to get it.
"""

from __future__ import annotations

import json
import logging
import re

import helm_tools as ht
import pytest
import yaml

from lmcache_connector._version import __version__
from lmcache_connector.config import LMCacheConfig

CI = ht.CHART / "ci"
CI_FILES = sorted(CI.glob("*-values.yaml"))
RENDERINGS = ["defaults"] + [p.name for p in CI_FILES]
FULLNAME = ht.RELEASE  # the release name contains the chart name, so it is the object prefix
POD_IP = "10.1.2.3"
GiB = 1024**3
REDIS_URL = f"redis://{FULLNAME}-redis:6379"
PASSWORD_FILE = "/etc/lmcache/remote-password/password"  # where the pod mounts the remote store's password
SENTINELS = ",".join(f"redis-node-{i}.redis-headless.cache.svc:26379" for i in range(3))


@pytest.fixture(scope="module")
def helm() -> str:
    return ht.require_helm()


@pytest.fixture(scope="module")
def manifests(helm) -> dict[str, str]:
    """The rendering of the defaults and of every ci/*-values.yaml, by name."""
    rendered = {"defaults": ht.template(helm)}
    for path in CI_FILES:
        rendered[path.name] = ht.template(helm, [path])
    return rendered


@pytest.fixture(scope="module")
def rendered(manifests) -> dict[str, list[dict]]:
    return {name: ht.objects(text) for name, text in manifests.items()}


def deployment(objs: list[dict]) -> dict:
    return ht.one(objs, "Deployment", FULLNAME)


def vllm(objs: list[dict]) -> dict:
    return ht.container(deployment(objs), "vllm")


def env_of(objs: list[dict]) -> dict[str, str]:
    return ht.resolved_env(vllm(objs), POD_IP)


def values_yaml() -> dict:
    return yaml.safe_load((ht.CHART / "values.yaml").read_text())


def nested(dotted: dict[str, object]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: values written the --set way, passed as a file."""
    values: dict = {}
    for path, value in dotted.items():
        *parents, leaf = path.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return values


def readme_example() -> str:
    """The example configuration in the chart README (the yaml block after its heading)."""
    text = (ht.CHART / "README.md").read_text()
    match = re.search(r"## Example configuration.*?```yaml\n(.*?)```", text, re.S)
    assert match, "the chart README has no '## Example configuration' section with a yaml block"
    return match.group(1)


# ---------------------------------------------------------------- the chart as a whole


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((ht.CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


@pytest.mark.parametrize("values", RENDERINGS)
def test_chart_lints_strictly(helm, values):
    files = [] if values == "defaults" else [CI / values]
    assert "0 chart(s) failed" in ht.lint(helm, files)


@pytest.mark.parametrize("values", RENDERINGS)
def test_rendering_is_valid_kubernetes_1_32(manifests, values):
    result = ht.kubernetes_validate(manifests[values])
    assert result.returncode == 0, result.stdout + result.stderr
    # The only thing without a bundled schema is the Prometheus Operator's ServiceMonitor.
    for line in (result.stdout + result.stderr).splitlines():
        assert "ServiceMonitor" in line, line


def test_ci_values_cover_the_documented_scenarios():
    names = {p.name for p in CI_FILES}
    assert {
        "example-values.yaml",
        "disk-pvc-values.yaml",
        "redis-p2p-values.yaml",
        "ingress-autoscaling-values.yaml",
        "prebuilt-image-values.yaml",
        "redis-shared-values.yaml",
        "external-sentinel-values.yaml",
        "kv-events-values.yaml",
    } <= names


def test_readme_example_is_the_ci_example_and_renders(helm, tmp_path):
    assert yaml.safe_load(readme_example()) == yaml.safe_load((CI / "example-values.yaml").read_text())
    path = tmp_path / "readme-example.yaml"
    path.write_text(readme_example())
    manifest = ht.template(helm, [path])
    result = ht.kubernetes_validate(manifest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ht.one(ht.objects(manifest), "Service")["spec"]["type"] == "LoadBalancer"


@pytest.mark.parametrize("values", RENDERINGS)
def test_every_object_has_the_standard_labels(rendered, values):
    for obj in rendered[values]:
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by", "component"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], obj["metadata"]["name"], key)
        assert labels["app.kubernetes.io/instance"] == ht.RELEASE
        assert labels["helm.sh/chart"].startswith("lmcache-")


@pytest.mark.parametrize("values", RENDERINGS)
def test_services_select_their_own_pods_only(rendered, values):
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in rendered[values]
            if d["kind"] == "Deployment"}  # fmt: skip
    for service in (o for o in rendered[values] if o["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        matched = [name for name, labels in pods.items() if selector <= labels.items()]
        assert matched == [service["metadata"]["name"]]


# ---------------------------------------------------------------- vLLM and the connector


def test_vllm_serves_the_model_with_this_connector(rendered):
    c = vllm(rendered["defaults"])
    assert c["command"] == ["vllm", "serve"]
    assert c["args"][0] == values_yaml()["deployment"]["model"]
    config = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
    assert config == {
        "kv_connector": "LMCacheConnector",
        "kv_connector_module_path": "lmcache_connector",
        "kv_role": "kv_both",
    }
    port = c["args"][c["args"].index("--port") + 1]
    assert {"name": "http", "containerPort": int(port), "protocol": "TCP"} in c["ports"]


def test_extra_vllm_arguments_follow_the_connector_line(rendered):
    args = vllm(rendered["ingress-autoscaling-values.yaml"])["args"]
    assert args[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args[-4:] == ["--max-model-len", "16384", "--gpu-memory-utilization", "0.9"]


def test_default_install_puts_the_matching_connector_on_pythonpath(rendered):
    dep = deployment(rendered["defaults"])
    init = ht.container(dep, "install-connector")
    target = values_yaml()["connectorInstall"]["target"]
    # The same image as vLLM, so the same Python; only the connector, so torch and vLLM stay as they are.
    assert init["image"] == vllm(rendered["defaults"])["image"] == "lmcache/vllm-openai:latest"
    assert init["command"] == ["python3", "-m", "pip", "install"]
    assert init["args"][:5] == ["--no-deps", "--no-cache-dir", "--disable-pip-version-check", "--target", target]
    assert init["args"][5:] == [f"lmcache-connector=={__version__}"]
    shared = {"name": "connector", "emptyDir": {}}  # written by the init container, read by vLLM
    assert ht.volume_at(dep, "install-connector", target) == shared
    assert ht.volume_at(dep, "vllm", target) == shared
    assert env_of(rendered["defaults"])["PYTHONPATH"] == target


@pytest.mark.parametrize(
    ("source", "expected_args"),
    [
        ({"connectorInstall.indexUrl": "https://pypi.internal/simple"},
         ["--index-url", "https://pypi.internal/simple", f"lmcache-connector=={__version__}"]),
        ({"connectorInstall.wheelUrl": "https://files.internal/lmcache_connector-0.1.0-py3-none-any.whl"},
         ["https://files.internal/lmcache_connector-0.1.0-py3-none-any.whl"]),
        ({"connectorInstall.package": "lmcache-connector>=0.1,<0.2", "connectorInstall.extraPackages": ["xxhash>=3"]},
         ["lmcache-connector>=0.1,<0.2", "xxhash>=3"]),
    ],
    ids=["index", "wheel-url", "package-spec"],
)  # fmt: skip
def test_connector_source_is_configurable(helm, source, expected_args):
    objs = ht.objects(ht.template(helm, values=nested(source)))
    args = ht.container(deployment(objs), "install-connector")["args"]
    assert args[:2] == ["--no-deps", "--no-cache-dir"]
    assert args[5:] == expected_args


def test_image_with_the_connector_built_in_needs_no_init_container(rendered):
    objs = rendered["prebuilt-image-values.yaml"]
    pod = deployment(objs)["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert vllm(objs)["image"] == "registry.example.com/vllm-lmcache:0.1.0"
    assert "PYTHONPATH" not in env_of(objs)
    assert "connector" not in {v["name"] for v in pod["volumes"]}


# ---------------------------------------------------------------- LMCACHE_* settings


def test_lmcache_values_become_lmcache_variables(rendered):
    env = env_of(rendered["example-values.yaml"])
    assert {k: v for k, v in env.items() if k.startswith("LMCACHE_")} == {
        "LMCACHE_CHUNK_SIZE": "512",
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "2.0",
        "LMCACHE_LOCAL_DISK": "file:///tmp/lmcache",
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "10.0",  # a string in values.yaml, so not "10"
        "LMCACHE_ENABLE_P2P": "False",  # no LMCACHE_MODEL_NAME: the connector fingerprints the checkpoint
    }


def test_each_lmcache_value_sets_its_variable(helm):
    given = {
        "chunkSize": ("LMCACHE_CHUNK_SIZE", "1024"),
        "localCpu": ("LMCACHE_LOCAL_CPU", "False"),
        "maxLocalCpuSize": ("LMCACHE_MAX_LOCAL_CPU_SIZE", "1.5"),
        "localDisk": ("LMCACHE_LOCAL_DISK", "/var/cache/lmcache"),
        "maxLocalDiskSize": ("LMCACHE_MAX_LOCAL_DISK_SIZE", "5.0"),
        "remoteUrl": ("LMCACHE_REMOTE_URL", "redis://cache.example:6379"),
        "enableP2P": ("LMCACHE_ENABLE_P2P", "True"),
        "lookupUrl": ("LMCACHE_LOOKUP_URL", "redis://registry.example:6379"),
        "p2pPort": ("LMCACHE_DISTRIBUTED_URL", "0.0.0.0:9000"),  # the port each worker binds from
        "modelName": ("LMCACHE_MODEL_NAME", "llama-3.1-8b"),
    }
    set_string = {f"lmcache.{k}": v for k, (_, v) in given.items() if k != "p2pPort"}
    objs = ht.objects(ht.template(helm, set_string=set_string, set_values={"lmcache.p2pPort": "9000"}))
    env = env_of(objs)
    expected = dict(given.values()) | {"LMCACHE_P2P_ADVERTISE_HOST": POD_IP}
    assert {k: v for k, v in env.items() if k.startswith("LMCACHE_")} == expected


def test_unset_lmcache_values_set_no_variable(rendered):
    env = env_of(rendered["defaults"])
    for name in ("LMCACHE_LOCAL_DISK", "LMCACHE_MAX_LOCAL_DISK_SIZE", "LMCACHE_REMOTE_URL", "LMCACHE_LOOKUP_URL",
                 "LMCACHE_DISTRIBUTED_URL"):  # fmt: skip
        assert name not in env


def test_values_that_become_variables_are_strings_in_values_yaml():
    values = values_yaml()
    not_env = {"kvRole", "p2pPort"}  # a --kv-transfer-config field and a container port
    for key, value in values["lmcache"].items():
        if key not in not_env:
            assert isinstance(value, str), f"lmcache.{key} is {value!r}: quote it"
    assert values["lmcache"]["chunkSize"] == "256"
    assert values["lmcache"]["localCpu"] == "True"


@pytest.mark.parametrize(
    ("values", "expected"),
    # No LMCACHE_MODEL_NAME unless lmcache.modelName is set: the connector fingerprints the checkpoint.
    [
        ("defaults", LMCacheConfig(max_local_cpu_size=2.0)),
        ("example-values.yaml", LMCacheConfig(
            chunk_size=512, max_local_cpu_size=2.0, local_disk="/tmp/lmcache", max_local_disk_size=10.0)),
        ("disk-pvc-values.yaml", LMCacheConfig(
            max_local_cpu_size=2.0, local_disk="/data/lmcache", max_local_disk_size=40.0)),
        ("redis-p2p-values.yaml", LMCacheConfig(
            max_local_cpu_size=3.0, remote_url=REDIS_URL, remote_password_file=PASSWORD_FILE, enable_p2p=True,
            lookup_url=REDIS_URL, distributed_url="0.0.0.0:8200", p2p_advertise_host=POD_IP,
            p2p_auth_token_file="/etc/lmcache/p2p-auth-token/token")),
        ("ingress-autoscaling-values.yaml", LMCacheConfig(
            max_local_cpu_size=20.0)),
        ("redis-shared-values.yaml", LMCacheConfig(
            max_local_cpu_size=3.0, remote_url=REDIS_URL, remote_password_file=PASSWORD_FILE)),
        ("external-sentinel-values.yaml", LMCacheConfig(
            max_local_cpu_size=10.0, remote_url=f"redis-sentinel://{SENTINELS}/mymaster",
            remote_password_file=PASSWORD_FILE,
            remote_sentinel_password_file="/etc/lmcache/remote-sentinel-password/password",
            remote_tls=True, remote_tls_ca_file="/etc/lmcache/remote-tls/ca.crt", remote_key_prefix="chat-prod:lmc:")),
        ("kv-events-values.yaml", LMCacheConfig(
            max_local_cpu_size=8.0)),
    ],
)  # fmt: skip
def test_the_library_reads_the_configuration_the_values_describe(rendered, values, expected, caplog, tmp_path):
    """The chart and the library agree: the pod's environment loads, with no unknown variable."""
    with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
        config = ht.load_pod_config(env_of(rendered[values]), tmp_path)
    assert config == expected
    assert not caplog.records, [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------- resources and the pod


def test_gpu_cpu_and_memory_are_requested_and_limited(rendered):
    resources = vllm(rendered["defaults"])["resources"]
    assert resources["requests"] == {"memory": "4Gi", "cpu": "2000m", "nvidia.com/gpu": "1"}
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert set(resources["limits"]) == {"memory", "cpu", "nvidia.com/gpu"}
    example = vllm(rendered["example-values.yaml"])["resources"]
    assert example["limits"] == {"memory": "8Gi", "cpu": "4000m", "nvidia.com/gpu": "1"}


@pytest.mark.parametrize("values", ["defaults", "example-values.yaml"])
def test_cpu_tier_leaves_room_for_vllm_inside_the_memory_limit(rendered, values):
    """The documented rule: CPU tier + about 4 GiB for vLLM + /dev/shm fit in the memory limit."""
    objs = rendered[values]
    limit = _gib(vllm(objs)["resources"]["limits"]["memory"])
    shm = _gib(ht.volume_at(deployment(objs), "vllm", "/dev/shm")["emptyDir"]["sizeLimit"])
    cpu_tier = float(env_of(objs)["LMCACHE_MAX_LOCAL_CPU_SIZE"])
    assert cpu_tier + 4 + shm <= limit


def _gib(quantity: str) -> float:
    units = {"Mi": 1 / 1024, "Gi": 1.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_pod_has_memory_backed_shm_and_a_model_cache(rendered):
    dep = deployment(rendered["defaults"])
    assert ht.volume_at(dep, "vllm", "/dev/shm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert "emptyDir" in ht.volume_at(dep, "vllm", "/cache")
    env = env_of(rendered["defaults"])
    assert env["HF_HOME"] == "/cache/huggingface"
    assert env["VLLM_CACHE_ROOT"] == "/cache/vllm"


def test_model_cache_can_be_a_claim(helm):
    objs = ht.objects(ht.template(helm, set_string={"deployment.modelCache.existingClaim": "models"}))
    volume = ht.volume_at(deployment(objs), "vllm", "/cache")
    assert volume["persistentVolumeClaim"] == {"claimName": "models"}


def test_hugging_face_token_comes_from_a_secret_when_named(rendered):
    assert "HF_TOKEN" not in {e["name"] for e in vllm(rendered["defaults"])["env"]}
    token = [e for e in vllm(rendered["ingress-autoscaling-values.yaml"])["env"] if e["name"] == "HF_TOKEN"]
    assert token == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}]


def test_extra_env_pod_placement_and_security_contexts_pass_through(rendered):
    objs = rendered["ingress-autoscaling-values.yaml"]
    pod = deployment(objs)["spec"]["template"]["spec"]
    names = [e["name"] for e in vllm(objs)["env"]]
    assert names[-2:] == ["VLLM_LOGGING_LEVEL", "NODE_NAME"]  # deployment.env, then extraEnv
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["securityContext"] == {"fsGroup": 1000}
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


# ---------------------------------------------------------------- the disk tier


def test_disk_tier_volume_is_mounted_at_the_disk_path(rendered):
    volume = ht.volume_at(deployment(rendered["example-values.yaml"]), "vllm", "/tmp/lmcache")
    assert volume == {"name": "lmcache-disk", "emptyDir": {}}
    assert "lmcache-disk" not in {
        v["name"] for v in deployment(rendered["defaults"])["spec"]["template"]["spec"]["volumes"]
    }


def test_disk_tier_on_a_persistent_volume_claim(rendered):
    objs = rendered["disk-pvc-values.yaml"]
    volume = ht.volume_at(deployment(objs), "vllm", "/data/lmcache")
    assert volume["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-disk"}
    claim = ht.one(objs, "PersistentVolumeClaim", f"{FULLNAME}-disk")["spec"]
    assert claim == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast-ssd",
        "resources": {"requests": {"storage": "50Gi"}},
    }


def test_disk_tier_on_an_existing_claim_or_a_host_path(helm):
    disk = {"lmcache.localDisk": "/data/lmcache", "lmcache.maxLocalDiskSize": "100"}
    objs = ht.objects(ht.template(helm, set_string=disk | {"persistence.existingClaim": "nvme"},
                                  set_values={"persistence.enabled": "true"}))  # fmt: skip
    assert "PersistentVolumeClaim" not in ht.kinds(objs)  # its size is unknown here, so not checked
    assert ht.volume_at(deployment(objs), "vllm", "/data/lmcache")["persistentVolumeClaim"] == {"claimName": "nvme"}
    objs = ht.objects(ht.template(helm, set_string=disk | {"persistence.hostPath.path": "/mnt/nvme/lmcache"}))
    volume = ht.volume_at(deployment(objs), "vllm", "/data/lmcache")
    assert volume["hostPath"] == {"path": "/mnt/nvme/lmcache", "type": "DirectoryOrCreate"}


# ---------------------------------------------------------------- Redis and P2P


def test_redis_is_off_by_default(rendered):
    assert [o["metadata"]["name"] for o in rendered["defaults"] if "redis" in o["metadata"]["name"]] == []


def test_chart_redis_is_the_remote_tier_and_the_lookup_registry(rendered):
    objs = rendered["redis-p2p-values.yaml"]
    service = ht.one(objs, "Service", f"{FULLNAME}-redis")
    assert service["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}]
    redis = ht.container(ht.one(objs, "Deployment", f"{FULLNAME}-redis"), "redis")
    assert redis["args"][redis["args"].index("--maxmemory") + 1] == "2gb"
    env = env_of(objs)
    assert env["LMCACHE_REMOTE_URL"] == env["LMCACHE_LOOKUP_URL"] == REDIS_URL


def test_explicit_urls_win_over_the_chart_redis(helm):
    # The chart's Redis without a password: the remote store's password (none) is the registry's too.
    objs = ht.objects(ht.template(helm, set_string={"lmcache.remoteUrl": "redis://big-redis:6379",
                                                    "lmcache.enableP2P": "True"},
                                  set_values={"redis.enabled": "true", "redis.auth.enabled": "false"}))  # fmt: skip
    env = env_of(objs)
    assert env["LMCACHE_REMOTE_URL"] == "redis://big-redis:6379"
    assert env["LMCACHE_LOOKUP_URL"] == f"redis://{FULLNAME}-redis:6379"
    objs = ht.objects(ht.template(helm, set_string={"lmcache.lookupUrl": "redis://registry:6379",
                                                    "lmcache.enableP2P": "True"},
                                  set_values={"redis.enabled": "true"}))  # fmt: skip
    assert (env_of(objs)["LMCACHE_REMOTE_URL"], env_of(objs)["LMCACHE_LOOKUP_URL"]) == (
        REDIS_URL,
        "redis://registry:6379",
    )


def test_p2p_binds_every_interface_and_advertises_the_pod_ip(rendered):
    c = vllm(rendered["redis-p2p-values.yaml"])
    names = [e["name"] for e in c["env"]]
    # POD_IP must come first: Kubernetes expands $(POD_IP) only from variables defined before.
    assert names.index("POD_IP") < names.index("LMCACHE_P2P_ADVERTISE_HOST")
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    assert {"name": "LMCACHE_DISTRIBUTED_URL", "value": "0.0.0.0:8200"} in c["env"]
    assert env_of(rendered["redis-p2p-values.yaml"])["LMCACHE_P2P_ADVERTISE_HOST"] == POD_IP
    assert {"name": "lmcache-p2p-0", "containerPort": 8200, "protocol": "TCP"} in c["ports"]
    assert deployment(rendered["redis-p2p-values.yaml"])["spec"]["replicas"] == 2
    assert not [p for p in vllm(rendered["defaults"])["ports"] if p["name"].startswith("lmcache-p2p")]


# ---------------------------------------------------------------- reaching vLLM


def test_service_forwards_its_port_to_vllm(rendered):
    spec = ht.one(rendered["defaults"], "Service", FULLNAME)["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert ht.one(rendered["example-values.yaml"], "Service", FULLNAME)["spec"]["type"] == "LoadBalancer"


def test_probes_query_health_on_the_vllm_port(rendered):
    c = vllm(rendered["defaults"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    # Model loading takes minutes: the startup probe allows at least ten before a restart.
    assert startup["initialDelaySeconds"] + startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_autoscaler_scales_the_vllm_deployment(rendered):
    objs = rendered["ingress-autoscaling-values.yaml"]
    hpa = ht.one(objs, "HorizontalPodAutoscaler", FULLNAME)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 70},
    }
    assert "replicas" not in deployment(objs)["spec"]  # the HPA owns it
    assert "HorizontalPodAutoscaler" not in ht.kinds(rendered["defaults"])
    assert values_yaml()["autoscaling"] == {
        "enabled": False,
        "minReplicas": 1,
        "maxReplicas": 10,
        "targetCPUUtilizationPercentage": 80,
        "targetMemoryUtilizationPercentage": 0,
    }


def test_ingress_routes_hosts_and_tls_to_the_service(rendered):
    spec = ht.one(rendered["ingress-autoscaling-values.yaml"], "Ingress", FULLNAME)["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "llm-example-tls", "hosts": ["llm.example.com"]}]
    assert spec["rules"] == [{
        "host": "llm.example.com",
        "http": {"paths": [{"path": "/", "pathType": "Prefix",
                            "backend": {"service": {"name": FULLNAME, "port": {"name": "http"}}}}]},
    }]  # fmt: skip


def test_service_monitor_scrapes_vllm_metrics(rendered):
    objs = rendered["ingress-autoscaling-values.yaml"]
    monitor = ht.one(objs, "ServiceMonitor", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    service_labels = ht.one(objs, "Service", FULLNAME)["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert "ServiceMonitor" not in ht.kinds(rendered["defaults"])


def test_service_account_and_rbac(rendered):
    defaults = rendered["defaults"]
    assert ht.one(defaults, "ServiceAccount", FULLNAME)["automountServiceAccountToken"] is False
    assert deployment(defaults)["spec"]["template"]["spec"]["serviceAccountName"] == FULLNAME
    assert not {"Role", "RoleBinding"} & ht.kinds(defaults)
    objs = rendered["ingress-autoscaling-values.yaml"]
    binding = ht.one(objs, "RoleBinding", FULLNAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": ht.NAMESPACE}]
    assert ht.one(objs, "Role", FULLNAME)["rules"] == values_yaml()["rbac"]["rules"]
    assert deployment(objs)["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


def test_helm_test_pod_queries_health_through_the_service(rendered):
    pod = ht.one(rendered["defaults"], "Pod", f"{FULLNAME}-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["containers"][0]["command"][-1] == f"http://{FULLNAME}:80/health"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "test"  # not behind the Service


@pytest.mark.parametrize(
    ("values", "how_to_reach"),
    [("defaults", "port-forward service/lmcache 8000:80"), ("example-values.yaml", "loadBalancer.ingress"),
     ("ingress-autoscaling-values.yaml", "curl https://llm.example.com/v1/models")],
)  # fmt: skip
def test_notes_tell_how_to_reach_the_service_and_check_the_cache(helm, values, how_to_reach):
    text = ht.notes(helm, [] if values == "defaults" else [CI / values])
    assert how_to_reach in text
    assert "external_prefix_cache" in text
    assert f"helm test {ht.RELEASE}" in text
