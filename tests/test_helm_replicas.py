"""The chart wired for many replicas (helm/lmcache): one remote tier that every replica shares — the
chart's own Redis or an existing Redis, Sentinel or Cluster — with its credentials from Secrets,
a disruption budget, the config check that fails a pod early, KV events for llm-d's precise
prefix-cache scorer, the CPU tier counted once per vLLM worker, and the peer tier between replicas
(one port per worker, the token from a Secret, the registry's password, a NetworkPolicy).

Rendered with a real helm. The rendered Redis start-up script, its readiness probe and the config
check's command are also run here, against a real ``redis-server`` (as the remote-tier tests do),
so what the pods would execute is tested, not only what the manifests say; the config check also
pings the P2P lookup registry.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import helm_tools as ht
import pytest
import redis
import redis_servers as rs
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

CI = ht.CHART / "ci"
FULLNAME = ht.RELEASE
POD_IP = "10.1.2.3"
REDIS_NAME = f"{FULLNAME}-redis"
REDIS_URL = f"redis://{REDIS_NAME}:6379"
PASSWORD_FILE = "/etc/lmcache/remote-password/password"
GiB = 1024**3
KV_TRANSFER = {"kv_connector": "LMCacheConnector", "kv_connector_module_path": "lmcache_connector",
               "kv_role": "kv_both"}  # fmt: skip


@pytest.fixture(scope="module")
def helm() -> str:
    return ht.require_helm()


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    """The ci/ files of this feature (and two older ones it changes), rendered once."""
    names = ["redis-shared-values.yaml", "external-sentinel-values.yaml", "kv-events-values.yaml",
             "redis-p2p-values.yaml", "ingress-autoscaling-values.yaml"]  # fmt: skip
    out = {name: ht.objects(ht.template(helm, [CI / name])) for name in names}
    out["defaults"] = ht.objects(ht.template(helm))
    return out


def render(helm, values: dict) -> list[dict]:
    return ht.objects(ht.template(helm, values=values))


def vllm_deployment(objs: list[dict]) -> dict:
    return ht.one(objs, "Deployment", FULLNAME)


def redis_container(objs: list[dict]) -> dict:
    return ht.container(ht.one(objs, "Deployment", REDIS_NAME), "redis")


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} not in {args}"
    return args[args.index(flag) + 1]


def secret_volume(deployment: dict, container: str, mount_path: str) -> dict:
    volume = ht.volume_at(deployment, container, mount_path)
    assert "secret" in volume, volume
    return volume["secret"]


# ---------------------------------------------------------------- the chart's Redis


def test_replicas_share_the_chart_redis_and_read_its_password_from_a_secret(rendered):
    objs = rendered["redis-shared-values.yaml"]
    dep = vllm_deployment(objs)
    assert dep["spec"]["replicas"] == 2
    env = ht.resolved_env(ht.container(dep, "vllm"), POD_IP)
    assert env["LMCACHE_REMOTE_URL"] == REDIS_URL
    assert env["LMCACHE_REMOTE_PASSWORD_FILE"] == PASSWORD_FILE
    mounted = {"secretName": REDIS_NAME, "items": [{"key": "password", "path": "password"}]}
    assert secret_volume(dep, "vllm", "/etc/lmcache/remote-password") == mounted
    # Redis reads the same Secret.
    redis_dep = ht.one(objs, "Deployment", REDIS_NAME)
    assert {"name": "REDIS_PASSWORD_FILE", "value": "/etc/redis-auth/password"} in redis_container(objs)["env"]
    assert secret_volume(redis_dep, "redis", "/etc/redis-auth") == mounted
    # A generated password, in the Secret only: never in a pod spec.
    secret = ht.one(objs, "Secret", REDIS_NAME)
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 32 and password.isalnum()
    for deployment in (dep, redis_dep):
        assert password not in yaml.safe_dump(deployment)


def test_chart_redis_password_can_come_from_an_existing_secret(helm):
    auth = {"existingSecret": "team-redis", "existingSecretKey": "pw"}
    objs = render(helm, {"redis": {"enabled": True, "auth": auth}})
    assert "Secret" not in ht.kinds(objs)
    mounted = {"secretName": "team-redis", "items": [{"key": "pw", "path": "password"}]}
    assert secret_volume(vllm_deployment(objs), "vllm", "/etc/lmcache/remote-password") == mounted
    assert secret_volume(ht.one(objs, "Deployment", REDIS_NAME), "redis", "/etc/redis-auth") == mounted


def test_chart_redis_without_a_password_is_open_inside_the_cluster_only(helm):
    objs = render(helm, {"redis": {"enabled": True, "auth": {"enabled": False}}})
    assert "Secret" not in ht.kinds(objs)
    assert "LMCACHE_REMOTE_PASSWORD_FILE" not in ht.resolved_env(ht.container(vllm_deployment(objs), "vllm"), POD_IP)
    redis = redis_container(objs)
    assert arg_after(redis["args"], "--protected-mode") == "no"
    assert "REDIS_PASSWORD_FILE" not in {e["name"] for e in redis["env"]}
    assert ht.one(objs, "Service", REDIS_NAME)["spec"]["type"] == "ClusterIP"


def test_chart_redis_is_a_bounded_evicting_cache_with_snapshots_on_a_claim(rendered):
    objs = rendered["redis-shared-values.yaml"]
    args = redis_container(objs)["args"]
    assert (arg_after(args, "--maxmemory"), arg_after(args, "--maxmemory-policy")) == ("4gb", "allkeys-lru")
    assert (arg_after(args, "--save"), arg_after(args, "--appendonly")) == ("900 1", "no")
    assert redis_container(objs)["resources"]["limits"] == {"memory": "8Gi"}
    volume = ht.volume_at(ht.one(objs, "Deployment", REDIS_NAME), "redis", "/data")
    assert volume["persistentVolumeClaim"] == {"claimName": f"{REDIS_NAME}-data"}
    claim = ht.one(objs, "PersistentVolumeClaim", f"{REDIS_NAME}-data")["spec"]
    assert claim["resources"]["requests"]["storage"] == "10Gi"
    assert claim["storageClassName"] == "fast-ssd"
    # Without persistence (the default): nothing is saved, and the data folder is an emptyDir.
    objs = rendered["redis-p2p-values.yaml"]
    assert arg_after(redis_container(objs)["args"], "--save") == ""
    assert ht.volume_at(ht.one(objs, "Deployment", REDIS_NAME), "redis", "/data")["emptyDir"] == {}
    assert "PersistentVolumeClaim" not in ht.kinds(objs)


def test_chart_redis_runs_as_a_non_root_user_with_a_read_only_root(rendered):
    redis_dep = ht.one(rendered["redis-shared-values.yaml"], "Deployment", REDIS_NAME)
    pod = redis_dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 999
    container = ht.container(redis_dep, "redis")["securityContext"]
    assert container == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    # The only things it writes: /data, and the generated config in memory.
    assert ht.volume_at(redis_dep, "redis", "/run/redis")["emptyDir"]["medium"] == "Memory"
    assert redis_dep["spec"]["strategy"] == {"type": "Recreate"}


def _with_flag(flags: list[str], flag: str, value: str) -> list[str]:
    flags = list(flags)
    flags[flags.index(flag) + 1] = value
    return flags


def _wait_for_port(process: subprocess.Popen, port: int, log: Path) -> None:
    """Until the server accepts connections (a plain socket: redis-py backs off for seconds on a refusal)."""
    deadline = time.monotonic() + rs.START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the rendered Redis exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)


def test_rendered_redis_starts_with_its_password_and_memory_bound(rendered, tmp_path):
    """The container's own script, flags and readiness probe, run with Debian's redis-server."""
    container = redis_container(rendered["redis-shared-values.yaml"])
    script, argv0, *flags = container["args"]
    port = rs.free_port()
    flags = _with_flag(_with_flag(flags, "--port", str(port)), "--dir", str(tmp_path))
    password = 'pa"ss\\word 1'  # quotes, a backslash and a space survive the config file
    (tmp_path / "password").write_text(password + "\n")  # a Secret made --from-file keeps the newline
    (tmp_path / "run").mkdir()
    rendered_env = {e["name"]: e["value"] for e in container["env"]}
    assert rendered_env == {"REDIS_CONFIG_DIR": "/run/redis", "REDIS_PASSWORD_FILE": "/etc/redis-auth/password"}
    env = {"PATH": os.environ["PATH"], "REDIS_CONFIG_DIR": str(tmp_path / "run"),
           "REDIS_PASSWORD_FILE": str(tmp_path / "password")}  # fmt: skip
    rs.binary("redis-server")
    log = tmp_path / "redis.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*container["command"], script, argv0, *flags, "--bind", "127.0.0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=rs._die_with_parent,
        )  # fmt: skip
    try:
        _wait_for_port(process, port, log)
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
        with pytest.raises(redis.AuthenticationError):
            no_retry = Retry(NoBackoff(), 0)  # redis-py retries a refused AUTH for seconds by default
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, retry=no_retry).set("lmc:x", b"1")
        assert client.config_get("maxmemory") == {"maxmemory": str(4 * GiB)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert client.config_get("save") == {"save": "900 1"}
        assert (tmp_path / "run" / "redis.conf").stat().st_mode & 0o077 == 0  # the password file is private
        probe = [part.replace("-p 6379", f"-p {port}") for part in container["readinessProbe"]["exec"]["command"]]
        assert subprocess.run(probe, env=env).returncode == 0
        assert subprocess.run(probe, env={**env, "REDIS_PASSWORD_FILE": "/dev/null"}).returncode != 0
    finally:
        process.kill()
        process.wait(timeout=10)


# ---------------------------------------------------------------- the config check


def test_config_check_runs_before_vllm_with_the_pod_settings_and_secrets(rendered):
    dep = vllm_deployment(rendered["redis-shared-values.yaml"])
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["install-connector", "check-config"]
    check, vllm = ht.container(dep, "check-config"), ht.container(dep, "vllm")
    assert check["image"] == vllm["image"]  # the same Python and packages as the engine
    assert check["args"][:2] == ["config", "--check-remote"]
    assert json.loads(arg_after(check["args"], "--kv-transfer-config")) == KV_TRANSFER

    def lmcache_env(c):
        return {k: v for k, v in ht.resolved_env(c, POD_IP).items() if k.startswith("LMCACHE_")}

    assert lmcache_env(check) == lmcache_env(vllm)
    assert ht.resolved_env(check, POD_IP)["PYTHONPATH"] == ht.resolved_env(vllm, POD_IP)["PYTHONPATH"]
    assert secret_volume(dep, "check-config", "/etc/lmcache/remote-password")["secretName"] == REDIS_NAME
    assert "check-config" not in {c["name"] for c in vllm_deployment(rendered["defaults"])["spec"]["template"]
                                  ["spec"].get("initContainers", [])}  # fmt: skip


def _run_check(check: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable if part == "python3" else part for part in check["command"]]
    return subprocess.run([*command, *check["args"]], env=env, capture_output=True, text=True, timeout=60)


def test_config_check_fails_the_pod_when_redis_is_unreachable_or_a_setting_is_invalid(rendered, tmp_path):
    """The init container's command, run as the pod would (its env, the password from a file)."""
    check = ht.container(vllm_deployment(rendered["redis-shared-values.yaml"]), "check-config")
    password = "correct-horse"
    (tmp_path / "password").write_text(password + "\n")
    (tmp_path / "wrong").write_text("battery-staple\n")
    pod_env = ht.resolved_env(check, POD_IP)
    with rs.redis_server(tmp_path / "redis", password=password) as server:
        # The Service name resolves only in the cluster: point the same URL form at the test server.
        env = {**pod_env, "PATH": os.environ["PATH"], "LMCACHE_REMOTE_URL": f"redis://127.0.0.1:{server.port}",
               "LMCACHE_REMOTE_PASSWORD_FILE": str(tmp_path / "password")}  # fmt: skip
        answered = _run_check(check, env)
        assert answered.returncode == 0, answered.stderr
        assert "answers" in answered.stdout
        refused = _run_check(check, {**env, "LMCACHE_REMOTE_PASSWORD_FILE": str(tmp_path / "wrong")})
        assert refused.returncode == 1, refused.stdout + refused.stderr
        server.kill()
        down = _run_check(check, env)
        assert down.returncode == 1
        assert "not usable" in down.stderr
        assert password not in down.stdout + down.stderr
    invalid = _run_check(check, {**env, "LMCACHE_CHUNK_SIZE": "lots"})
    assert invalid.returncode == 2
    assert "LMCACHE_CHUNK_SIZE" in invalid.stderr


# ---------------------------------------------------------------- many replicas


@pytest.mark.parametrize(
    ("values", "budget"),
    [("redis-shared-values.yaml", True), ("ingress-autoscaling-values.yaml", True), ("defaults", False)],
)
def test_replicated_deployments_get_a_disruption_budget(rendered, values, budget):
    objs = rendered[values]
    if not budget:
        assert "PodDisruptionBudget" not in ht.kinds(objs)
        return
    pdb = ht.one(objs, "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = vllm_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert not [o for o in objs if o["kind"] == "PodDisruptionBudget" and "redis" in o["metadata"]["name"]]


def test_external_sentinel_passwords_and_ca_come_from_secrets(rendered):
    objs = rendered["external-sentinel-values.yaml"]
    assert not {"Secret", "PersistentVolumeClaim"} & ht.kinds(objs)
    assert REDIS_NAME not in {o["metadata"]["name"] for o in objs}  # no chart Redis
    dep = vllm_deployment(objs)
    env = ht.resolved_env(ht.container(dep, "vllm"), POD_IP)
    assert env["LMCACHE_REMOTE_URL"].startswith("redis-sentinel://redis-node-0.redis-headless.cache.svc:26379,")
    assert "@" not in env["LMCACHE_REMOTE_URL"]
    files = {
        "LMCACHE_REMOTE_PASSWORD_FILE": ("/etc/lmcache/remote-password", "redis", "redis-password", "password"),
        "LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE": (
            "/etc/lmcache/remote-sentinel-password", "redis", "sentinel-password", "password"),
        "LMCACHE_REMOTE_TLS_CA_FILE": ("/etc/lmcache/remote-tls", "redis-tls", "ca.crt", "ca.crt"),
    }  # fmt: skip
    for variable, (folder, secret, key, path) in files.items():
        assert env[variable] == f"{folder}/{path}"
        for container in ("vllm", "check-config"):
            volume = secret_volume(dep, container, folder)
            assert volume == {"secretName": secret, "items": [{"key": key, "path": path}]}
        mount = [m for m in ht.container(dep, "vllm")["volumeMounts"] if m["mountPath"] == folder]
        assert mount[0]["readOnly"] is True
    assert env["LMCACHE_REMOTE_TLS"] == "True"
    assert "LMCACHE_REMOTE_TLS_CERT_FILE" not in env


def test_each_tensor_parallel_worker_gets_its_own_cpu_tier_in_the_memory_limit(rendered):
    dep = vllm_deployment(rendered["external-sentinel-values.yaml"])
    vllm = ht.container(dep, "vllm")
    workers = int(arg_after(vllm["args"], "--tensor-parallel-size"))
    assert workers == 2
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "2"
    tier = float(ht.resolved_env(vllm, POD_IP)["LMCACHE_MAX_LOCAL_CPU_SIZE"])
    shm = float(ht.volume_at(dep, "vllm", "/dev/shm")["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    limit = float(vllm["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert workers * tier + shm + 4 <= limit  # the documented rule, with about 4 GiB for vLLM
    assert "--tensor-parallel-size" not in vllm_deployment(rendered["defaults"])["spec"]["template"]["spec"][
        "containers"][0]["args"]  # fmt: skip


# ---------------------------------------------------------------- KV events


def test_kv_events_flags_and_hash_seed_are_set_together(rendered):
    vllm = ht.container(vllm_deployment(rendered["kv-events-values.yaml"]), "vllm")
    env = ht.resolved_env(vllm, POD_IP)
    args = [ht.expand(arg, env) for arg in vllm["args"]]
    events = json.loads(arg_after(args, "--kv-events-config"))
    assert events == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "topic": f"kv@{POD_IP}@Qwen/Qwen3-8B",  # llm-d: kv@<pod IP>@<model>
    }
    assert arg_after(args, "--prefix-caching-hash-algo") == "sha256_cbor"
    block_size = int(arg_after(args, "--block-size"))
    assert block_size == 64 and int(env["LMCACHE_CHUNK_SIZE"]) % block_size == 0
    assert env["PYTHONHASHSEED"] == "42"
    # The kubelet expands $(POD_IP) only from the container's own env.
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in vllm["env"]
    assert {"name": "kv-events", "containerPort": 5557, "protocol": "TCP"} in vllm["ports"]
    defaults = ht.container(vllm_deployment(rendered["defaults"]), "vllm")
    assert "--kv-events-config" not in defaults["args"]
    assert "PYTHONHASHSEED" not in {e["name"] for e in defaults["env"]}


def test_kv_events_sent_to_one_epp_declare_no_port_and_name_the_served_model(helm):
    objs = render(helm, {"kvEvents": {"enabled": True, "endpoint": "tcp://epp.llm-d.svc:5557", "topicModel": "chat"}})
    vllm = ht.container(vllm_deployment(objs), "vllm")
    events = json.loads(arg_after([ht.expand(a, ht.resolved_env(vllm, POD_IP)) for a in vllm["args"]],
                                  "--kv-events-config"))  # fmt: skip
    assert (events["endpoint"], events["topic"]) == ("tcp://epp.llm-d.svc:5557", f"kv@{POD_IP}@chat")
    assert "kv-events" not in {p["name"] for p in vllm["ports"]}


# ---------------------------------------------------------------- the peer tier (P2P)

TOKEN_FILE = "/etc/lmcache/p2p-auth-token/token"
P2P_CHART_REDIS = {"lmcache": {"enableP2P": "True"}, "redis": {"enabled": True}}


def test_p2p_token_is_a_mounted_secret_file_never_a_value(rendered):
    dep = vllm_deployment(rendered["redis-p2p-values.yaml"])
    mounted = {"secretName": "lmcache-p2p", "items": [{"key": "token", "path": "token"}]}
    for container in ("vllm", "check-config"):
        env = ht.resolved_env(ht.container(dep, container), POD_IP)
        assert env["LMCACHE_P2P_AUTH_TOKEN_FILE"] == TOKEN_FILE
        assert "LMCACHE_P2P_AUTH_TOKEN" not in env
        assert secret_volume(dep, container, "/etc/lmcache/p2p-auth-token") == mounted
    # The registry is the chart's Redis: its password is mounted for the registry as for the remote tier.
    assert env["LMCACHE_LOOKUP_URL"] == env["LMCACHE_REMOTE_URL"] == REDIS_URL
    assert env["LMCACHE_REMOTE_PASSWORD_FILE"] == PASSWORD_FILE


def test_each_worker_gets_its_own_peer_port(helm):
    """Rank r = tp_rank + tp_size x pp_rank serves on p2pPort + r: TP 2 x PP 2 is four ports."""
    values = {
        **P2P_CHART_REDIS,
        "deployment": {
            "tensorParallelSize": 2,
            "pipelineParallelSize": 2,
            "resources": {"limits": {"memory": "32Gi", "nvidia.com/gpu": "4"}, "requests": {"nvidia.com/gpu": "4"}},
        },
    }
    objs = render(helm, values)
    vllm = ht.container(vllm_deployment(objs), "vllm")
    peers = [p for p in vllm["ports"] if p["name"].startswith("lmcache-p2p")]
    assert peers == [{"name": f"lmcache-p2p-{r}", "containerPort": 8200 + r, "protocol": "TCP"} for r in range(4)]
    assert ht.resolved_env(vllm, POD_IP)["LMCACHE_DISTRIBUTED_URL"] == "0.0.0.0:8200"
    policy = ht.one(objs, "NetworkPolicy", f"{FULLNAME}-p2p")
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == [p["name"] for p in peers]
    assert ht.kubernetes_validate(ht.template(helm, values=values)).returncode == 0


def test_network_policy_lets_only_this_releases_vllm_pods_reach_the_peer_ports(rendered, helm):
    objs = rendered["redis-p2p-values.yaml"]
    spec = ht.one(objs, "NetworkPolicy", f"{FULLNAME}-p2p")["spec"]
    pod_labels = vllm_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    redis_labels = ht.one(objs, "Deployment", REDIS_NAME)["spec"]["template"]["metadata"]["labels"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert not spec["podSelector"]["matchLabels"].items() <= redis_labels.items()  # Redis is not restricted
    peers, api = spec["ingress"]
    assert peers["ports"] == [{"protocol": "TCP", "port": "lmcache-p2p-0"}]
    [source] = peers["from"]
    assert set(source) == {"podSelector"}  # this namespace only
    assert source["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert not source["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert "app.kubernetes.io/instance" in source["podSelector"]["matchLabels"]  # this release only
    assert api == {"ports": [{"protocol": "TCP", "port": "http"}]}  # from anywhere, as before
    # KV events stay reachable; extra rules are appended; the policy can be turned off; no P2P, no policy.
    events = render(helm, {**P2P_CHART_REDIS, "kvEvents": {"enabled": True},
                           "p2p": {"networkPolicy": {"extraIngress": [{"ports": [{"port": 9090}]}]}}})  # fmt: skip
    ingress = ht.one(events, "NetworkPolicy")["spec"]["ingress"]
    assert ingress[1]["ports"] == [{"protocol": "TCP", "port": "http"}, {"protocol": "TCP", "port": "kv-events"}]
    assert ingress[2] == {"ports": [{"port": 9090}]}
    off = render(helm, {**P2P_CHART_REDIS, "p2p": {"networkPolicy": {"enabled": False}}})
    assert "NetworkPolicy" not in ht.kinds(off)
    assert "NetworkPolicy" not in ht.kinds(rendered["redis-shared-values.yaml"])


@pytest.mark.parametrize(
    ("values", "secret"),
    [
        # The chart's Redis is the registry; the lm:// remote tier takes no password: the registry's is mounted.
        ({"lmcache": {"remoteUrl": "lm://cache-server:65432"}}, {"secretName": REDIS_NAME, "key": "password"}),
        # An external remote Redis with the chart Redis's own Secret: one password for both.
        ({"lmcache": {"remoteUrl": "redis://cache:6379"}, "redis": {"auth": {"existingSecret": "shared"}},
          "remoteSecrets": {"password": {"secretName": "shared"}}}, {"secretName": "shared", "key": "password"}),
        # An external registry with its own password and no remote tier.
        ({"lmcache": {"lookupUrl": "redis-sentinel://s0:26379,s1:26379/registry"}, "redis": {"enabled": False},
          "p2p": {"registryPassword": {"secretName": "registry", "secretKey": "pw"}}},
         {"secretName": "registry", "key": "pw"}),
        # An external registry without p2p.registryPassword takes the remote store's password.
        ({"lmcache": {"remoteUrl": "redis://cache:6379", "lookupUrl": "redis://cache:6379/1"},
          "redis": {"enabled": False}, "remoteSecrets": {"password": {"secretName": "cache"}}},
         {"secretName": "cache", "key": "password"}),
    ],
    ids=["chart-registry-lm-remote", "same-secret", "external-registry-own-password", "registry-shares-remote"],
)  # fmt: skip
def test_registry_password_is_mounted_where_the_library_reads_it(helm, values, secret, tmp_path):
    merged = {key: {**P2P_CHART_REDIS.get(key, {}), **values.get(key, {})} for key in {*P2P_CHART_REDIS, *values}}
    dep = vllm_deployment(render(helm, merged))
    mounted = {"secretName": secret["secretName"], "items": [{"key": secret["key"], "path": "password"}]}
    assert secret_volume(dep, "vllm", "/etc/lmcache/remote-password") == mounted
    env = ht.resolved_env(ht.container(dep, "vllm"), POD_IP)
    assert env["LMCACHE_REMOTE_PASSWORD_FILE"] == PASSWORD_FILE
    assert ht.load_pod_config(env, tmp_path).enable_p2p


@pytest.mark.parametrize(
    "lookup_url",
    ["redis://registry:6379/2", "rediss://registry.example:6380", "unix:///run/redis/redis.sock",
     "redis-sentinel://s0:26379,s1:26379/registry", "redis-cluster://c0:6379,c1:6379", "registry:6379",
     "registry", "10.0.0.5:6379", "[fd00::5]:6379"],
)  # fmt: skip
def test_every_redis_form_the_library_accepts_is_a_lookup_url(helm, lookup_url, tmp_path):
    objs = render(helm, {"lmcache": {"enableP2P": "True", "lookupUrl": lookup_url}})
    env = ht.resolved_env(ht.container(vllm_deployment(objs), "vllm"), POD_IP)
    assert env["LMCACHE_LOOKUP_URL"] == lookup_url
    expected = lookup_url if "://" in lookup_url else f"redis://{lookup_url}"
    assert ht.load_pod_config(env, tmp_path).lookup_url == expected


def test_config_check_pings_the_lookup_registry(rendered, tmp_path):
    """The init container's command with the P2P pod's env: the registry answering is checked too."""
    check = ht.container(vllm_deployment(rendered["redis-p2p-values.yaml"]), "check-config")
    assert check["args"][:2] == ["config", "--check-remote"]
    (tmp_path / "password").write_text("correct-horse\n")
    (tmp_path / "token").write_text(ht.STAND_IN_TOKEN + "\n")
    with rs.redis_server(tmp_path / "redis", password="correct-horse") as server:
        url = f"redis://127.0.0.1:{server.port}"
        env = {**ht.resolved_env(check, POD_IP), "PATH": os.environ["PATH"], "LMCACHE_REMOTE_URL": url,
               "LMCACHE_LOOKUP_URL": url, "LMCACHE_REMOTE_PASSWORD_FILE": str(tmp_path / "password"),
               "LMCACHE_P2P_AUTH_TOKEN_FILE": str(tmp_path / "token")}  # fmt: skip
        answered = _run_check(check, env)
        assert answered.returncode == 0, answered.stdout + answered.stderr
        assert "P2P lookup registry" in answered.stdout
        down = _run_check(check, {**env, "LMCACHE_LOOKUP_URL": f"redis://127.0.0.1:{rs.free_port()}"})
        assert down.returncode == 1, down.stdout + down.stderr
        assert "P2P lookup registry" in down.stderr


def test_notes_name_the_registry_the_peer_ports_and_the_token(helm):
    text = ht.notes(helm, [CI / "redis-p2p-values.yaml"])
    assert f"registry {REDIS_URL}, peers on port 8200 at the pod IP" in text
    assert "token from Secret lmcache-p2p" in text
    assert f"NetworkPolicy {FULLNAME}-p2p" in text
    assert "reaches the remote store and the P2P lookup registry" in text
