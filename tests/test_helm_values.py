"""The Helm chart refuses bad values at render time, and documents every value it has."""

from __future__ import annotations

import re
from pathlib import Path

import helm_tools as ht
import pytest
import yaml


@pytest.fixture(scope="module")
def helm() -> str:
    return ht.require_helm()


def values_yaml() -> dict:
    return yaml.safe_load((ht.CHART / "values.yaml").read_text())


# ---------------------------------------------------------------- bad values fail at render time


@pytest.mark.parametrize(
    ("set_string", "set_values", "message"),
    [
        ({"lmcache.chunkSize": "big"}, {}, "/lmcache/chunkSize"),
        ({}, {"lmcache.chunkSize": "512"}, "got number, want string"),
        ({"lmcache.chunksize": "512"}, {}, "additional properties 'chunksize' not allowed"),
        ({}, {"deployment.replicas": "2"}, "additional properties 'replicas' not allowed"),
        ({"lmcache.localCpu": "maybe"}, {}, "/lmcache/localCpu"),
        ({"service.type": "Public"}, {}, "/service/type"),
        ({}, {"autoscaling.enabled": "true", "autoscaling.minReplicas": "5", "autoscaling.maxReplicas": "2"},
         "autoscaling.minReplicas (5) is greater than autoscaling.maxReplicas (2)"),
        ({"lmcache.localDisk": "/data/lmcache", "lmcache.maxLocalDiskSize": "60.0", "persistence.size": "50Gi"},
         {"persistence.enabled": "true"}, "lmcache.maxLocalDiskSize (60.0 GB) does not fit the disk-tier volume"),
        ({"lmcache.localDisk": "/data/lmcache", "lmcache.maxLocalDiskSize": "8",
          "persistence.emptyDir.sizeLimit": "8Gi"}, {}, "persistence.emptyDir.sizeLimit = 8Gi"),
        ({"lmcache.localDisk": "/data/lmcache"}, {}, "lmcache.maxLocalDiskSize is not set"),
        ({"lmcache.maxLocalCpuSize": "8.0"}, {}, "lmcache.maxLocalCpuSize (8.0 GB) is not below"),
        ({"lmcache.maxLocalCpuSize": "4", "deployment.resources.limits.memory": "4096Mi"}, {}, "is not below"),
        ({"lmcache.maxLocalCpuSize": "", "deployment.resources.limits.memory": "4Gi"}, {},
         "lmcache.maxLocalCpuSize (5.0 GB) is not below"),
        ({"lmcache.enableP2P": "True"}, {}, "no lookup registry"),
        ({}, {"persistence.enabled": "true"}, "lmcache.localDisk is empty"),
        ({"connectorInstall.package": "x", "connectorInstall.wheelUrl": "https://x/y.whl"}, {}, "both set"),
        ({"deployment.env.LMCACHE_CHUNK_SIZE": "512"}, {}, "set by the chart from lmcache.chunkSize"),
        ({"lmcache.maxLocalCpuSize": "4.0"}, {"deployment.tensorParallelSize": "2",
         "deployment.resources.limits.nvidia\\.com/gpu": "2"}, "each of the 2 vLLM workers"),
        ({}, {"deployment.tensorParallelSize": "2"}, "fewer than the 2 GPUs"),
        ({"deployment.extraArgs[0]": "--tensor-parallel-size=2"}, {}, "set it there instead"),
        ({"lmcache.remoteUrl": "redis://default:hunter2@cache:6379"}, {}, "lmcache.remoteUrl carries a password"),
        ({"lmcache.remoteUrl": "valkey://cache:6379"}, {}, "/lmcache/remoteUrl"),
        ({"remoteSecrets.password.secretName": "redis"}, {}, "there is no remote tier"),
        ({"remoteSecrets.password.secretName": "redis"}, {"redis.enabled": "true"}, "has its own password"),
        ({"lmcache.remoteUrl": "redis://cache:6379", "remoteSecrets.sentinelPassword.secretName": "s"}, {},
         "the Sentinels' password is for Sentinel only"),
        ({"lmcache.remoteUrl": "redis://cache:6379", "lmcache.remoteServiceName": "mymaster"}, {},
         "a service name is for Sentinel only"),
        ({"lmcache.remoteUrl": "rediss://cache:6380", "remoteSecrets.tls.secretName": "tls",
          "remoteSecrets.tls.certKey": "tls.crt"}, {}, "certKey and remoteSecrets.tls.keyKey go together"),
        ({"redis.maxMemory": "2gb"}, {"redis.enabled": "true"}, "is not below redis.resources.limits.memory"),
        ({"redis.maxMemory": "1gb", "redis.persistence.size": "1Gi"},
         {"redis.enabled": "true", "redis.persistence.enabled": "true"}, "less than twice redis.maxMemory"),
        ({"redis.maxMemoryPolicy": "volatile-lru"}, {"redis.enabled": "true"}, "lmcache.remoteTtlSecs is empty"),
        ({"redis.maxMemoryPolicy": "noeviction"}, {"redis.enabled": "true"}, "/redis/maxMemoryPolicy"),
        ({"lmcache.chunkSize": "96"}, {"kvEvents.enabled": "true"}, "not a multiple of kvEvents.blockSize (64"),
        ({"deployment.extraArgs[0]": "--block-size"}, {"kvEvents.enabled": "true"}, "from kvEvents.blockSize"),
        ({"deployment.env.PYTHONHASHSEED": "0"}, {"kvEvents.enabled": "true"}, "kvEvents.pythonHashSeed"),
        ({"kvEvents.pythonHashSeed": "random"}, {"kvEvents.enabled": "true"}, "/kvEvents/pythonHashSeed"),
        ({"lmcache.distributedUrl": "peer:9000"}, {}, "additional properties 'distributedUrl' not allowed"),
        ({"lmcache.lookupUrl": "valkey://registry:6379"}, {}, "/lmcache/lookupUrl"),
        ({"lmcache.enableP2P": "True", "lmcache.lookupUrl": "redis://:hunter2@registry:6379"}, {},
         "lmcache.lookupUrl carries a password"),
        ({"p2p.authToken.secretName": "lmcache-p2p"}, {"redis.enabled": "true"}, "lmcache.enableP2P is off"),
        ({"lmcache.enableP2P": "True", "p2p.registryPassword.secretName": "reg"}, {"redis.enabled": "true"},
         "the lookup registry is the chart's Redis, which has its own password"),
        ({"lmcache.enableP2P": "True", "lmcache.remoteUrl": "redis://cache:6379",
          "remoteSecrets.password.secretName": "cache-pw"}, {"redis.enabled": "true"},
         "but the library reads one password, LMCACHE_REMOTE_PASSWORD_FILE"),
        ({"lmcache.enableP2P": "True", "lmcache.remoteUrl": "redis://cache:6379",
          "lmcache.lookupUrl": "redis://registry:6379", "remoteSecrets.password.secretName": "cache-pw",
          "p2p.registryPassword.secretName": "registry-pw"}, {}, "give both the same Secret"),
        ({"lmcache.enableP2P": "True", "lmcache.remoteUrl": "redis://cache:6379"}, {"redis.enabled": "true"},
         "the remote Redis would be sent a password it refuses"),
        ({"lmcache.enableP2P": "True", "lmcache.remoteUrl": "s3://kv-cache/llm"}, {"redis.enabled": "true"},
         "an s3:// remote tier refuses that setting"),
        ({"lmcache.enableP2P": "True", "lmcache.remoteUrl": "redis://cache:6379",
          "remoteSecrets.password.secretName": "cache-pw"}, {"redis.enabled": "true", "redis.auth.enabled": "false"},
         "has no password (redis.auth.enabled=false)"),
        ({"lmcache.enableP2P": "True", "lmcache.remoteUrl": "redis://cache:6379", "lmcache.remoteTls": "True"},
         {"redis.enabled": "true", "redis.auth.enabled": "false"}, "which has no TLS"),
        ({"lmcache.enableP2P": "True"}, {"redis.enabled": "true", "lmcache.p2pPort": "8000"},
         "include 8000, which is deployment.containerPort"),
        ({"lmcache.enableP2P": "True"}, {"redis.enabled": "true", "lmcache.p2pPort": "65535",
         "deployment.tensorParallelSize": "2", "deployment.resources.limits.nvidia\\.com/gpu": "2",
         "deployment.resources.limits.memory": "16Gi"}, "run past port 65535"),
        ({"lmcache.enableP2P": "True", "deployment.env.LMCACHE_P2P_ADVERTISE_HOST": "10.0.0.1"},
         {"redis.enabled": "true"}, "set by the chart from lmcache.enableP2P"),
    ],
    ids=["chunk-size-not-a-number", "chunk-size-not-a-string", "typo-in-lmcache-key", "unknown-deployment-key",
         "local-cpu-not-boolean", "unknown-service-type", "min-replicas-above-max", "disk-tier-larger-than-claim",
         "disk-tier-fills-empty-dir", "disk-tier-without-size", "cpu-tier-not-below-memory-limit",
         "cpu-tier-equals-limit-in-mi", "library-default-cpu-tier-above-limit",
         "p2p-without-registry", "volume-without-disk-tier", "two-connector-sources",
         "variable-set-twice", "cpu-tier-per-tensor-parallel-worker", "fewer-gpus-than-workers",
         "chart-flag-in-extra-args", "password-in-remote-url", "unknown-url-scheme", "secret-without-remote-tier",
         "remote-password-for-chart-redis", "sentinel-password-without-sentinel", "service-name-without-sentinel",
         "client-cert-without-key", "redis-maxmemory-above-limit", "redis-claim-too-small",
         "volatile-policy-without-ttl", "noeviction-policy", "chunk-not-whole-blocks", "block-size-in-extra-args",
         "hash-seed-set-twice", "random-hash-seed", "distributed-url-is-the-charts", "unknown-lookup-scheme",
         "password-in-lookup-url", "p2p-token-without-p2p", "registry-password-for-chart-redis",
         "chart-registry-and-remote-passwords-differ", "external-registry-and-remote-passwords-differ",
         "chart-registry-password-sent-to-open-remote", "chart-registry-password-with-s3-remote",
         "remote-password-sent-to-open-chart-registry", "remote-tls-with-chart-registry",
         "peer-port-is-vllm-port", "peer-ports-past-65535", "advertise-host-set-twice"],
)  # fmt: skip
def test_bad_values_fail_with_a_clear_message(helm, set_string, set_values, message):
    with pytest.raises(ht.HelmFailed) as failure:
        ht.template(helm, set_string=set_string, set_values=set_values)
    assert message in str(failure.value)


# ---------------------------------------------------------------- documentation


def test_every_value_has_a_comment():
    assert ht.uncommented_keys((ht.CHART / "values.yaml").read_text()) == []


def test_readme_table_documents_every_value():
    readme = (ht.CHART / "README.md").read_text()
    table_keys = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    values = set(ht.flatten(values_yaml()))
    assert values - table_keys == set(), "values missing from the README table"
    assert table_keys - values == set(), "README table rows for values that do not exist"


def test_readme_explains_both_ways_to_get_the_connector_into_the_pod():
    readme = (ht.CHART / "README.md").read_text()
    assert "docker/Dockerfile" in readme
    assert "connectorInstall.enabled=false" in readme
    assert Path(ht.REPO / "docker" / "Dockerfile").is_file()
