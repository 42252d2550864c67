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
    ],
    ids=["chunk-size-not-a-number", "chunk-size-not-a-string", "typo-in-lmcache-key", "unknown-deployment-key",
         "local-cpu-not-boolean", "unknown-service-type", "min-replicas-above-max", "disk-tier-larger-than-claim",
         "disk-tier-fills-empty-dir", "disk-tier-without-size", "cpu-tier-not-below-memory-limit",
         "cpu-tier-equals-limit-in-mi", "library-default-cpu-tier-above-limit",
         "p2p-without-registry", "volume-without-disk-tier", "two-connector-sources",
         "variable-set-twice"],
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
