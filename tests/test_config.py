"""The LMCACHE_* configuration: LMCache's names and value forms, priorities, and clear errors."""

from __future__ import annotations

import logging
import os

import pytest

from lmcache_connector import cli
from lmcache_connector.config import ConfigError, LMCacheConfig, check_chunk_size, describe, load_config
from lmcache_connector.urls import parse_remote_url

SECRET = "s3cr3t-pw"


def test_defaults_match_lmcache_except_save_unfull_chunk():
    config = load_config(env={})
    assert config == LMCacheConfig()
    assert (config.chunk_size, config.local_cpu, config.max_local_cpu_size) == (256, True, 5.0)
    assert config.save_unfull_chunk is True  # LMCache's default is False; documented in the README
    assert config.load_failure_policy == "recompute"


@pytest.mark.parametrize(
    "raw,expected", [("True", True), ("true", True), ("1", True), ("False", False), ("false", False), ("0", False)]
)
def test_booleans_accept_lmcache_forms(raw, expected):
    assert load_config(env={"LMCACHE_LOCAL_CPU": raw}).local_cpu is expected


def test_every_documented_variable_is_read_from_the_environment():
    env = {
        "LMCACHE_CHUNK_SIZE": "512",
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "2.5",
        "LMCACHE_LOCAL_DISK": "file:///tmp/lmcache/",
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "10.0",
        "LMCACHE_REMOTE_URL": "redis://cache:6379",
        "LMCACHE_REMOTE_SERDE": "naive",
        "LMCACHE_ENABLE_P2P": "True",
        "LMCACHE_LOOKUP_URL": "redis://cache:6379",
        "LMCACHE_DISTRIBUTED_URL": "10.0.0.5:8200",
        "LMCACHE_SAVE_UNFULL_CHUNK": "False",
        "LMCACHE_BLOCKING_TIMEOUT_SECS": "3",
        "LMCACHE_LOG_LEVEL": "debug",
        "LMCACHE_MODEL_NAME": "meta-llama/Llama-3-8B",
    }
    config = load_config(env=env)
    assert config.chunk_size == 512 and config.local_cpu is True and config.max_local_cpu_size == 2.5
    assert config.local_disk == "/tmp/lmcache" and config.max_local_disk_size == 10.0
    assert config.remote_url == "redis://cache:6379" and config.enable_p2p is True
    assert config.lookup_url == "redis://cache:6379" and config.distributed_url == "10.0.0.5:8200"
    assert config.save_unfull_chunk is False and config.blocking_timeout_secs == 3.0
    assert config.log_level == "DEBUG" and config.model_name == "meta-llama/Llama-3-8B"
    assert config.max_local_cpu_bytes == int(2.5 * 1024**3)
    assert load_config(env={"LMCACHE_LOCAL_CPU": "0"}).max_local_cpu_bytes == 0  # the memory tier off
    assert config.unavailable_tiers() == []  # the Redis remote tier and P2P are served


def test_priority_is_file_then_env_then_extra_config(tmp_path):
    config_file = tmp_path / "lmcache.yaml"
    config_file.write_text("chunk_size: 128\nmax_local_cpu_size: 1.5\nsave_unfull_chunk: false\n")
    env = {"LMCACHE_CONFIG_FILE": str(config_file), "LMCACHE_MAX_LOCAL_CPU_SIZE": "3"}
    config = load_config(env=env, extra_config={"lmcache.save_unfull_chunk": True})
    assert config.chunk_size == 128  # from the file
    assert config.max_local_cpu_size == 3.0  # env overrides the file
    assert config.save_unfull_chunk is True  # extra_config overrides both
    assert load_config(env=env, extra_config={"chunk_size": 64}).chunk_size == 64  # no prefix needed


@pytest.mark.parametrize(
    "name,value,accepted",
    [
        ("LMCACHE_CHUNK_SIZE", "abc", "whole number"),
        ("LMCACHE_CHUNK_SIZE", "0", "greater than 0"),
        ("LMCACHE_CHUNK_SIZE", "25.5", "whole number"),
        ("LMCACHE_LOCAL_CPU", "maybe", "True/true/1"),
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", "ten", "number of GB"),
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", "-1", "number of GB"),
        ("LMCACHE_LOCAL_DISK", "relative/path", "absolute path"),
        ("LMCACHE_LOCAL_DISK", "s3://bucket", "local folder"),
        ("LMCACHE_MAX_LOCAL_DISK_SIZE", "lots", "number of GB"),
        ("LMCACHE_REMOTE_URL", "ftp://host", "expected one of these schemes: redis://"),
        ("LMCACHE_REMOTE_URL", "redis://", "host is missing"),
        ("LMCACHE_REMOTE_URL", "lm://cache", "port of cache is required"),
        ("LMCACHE_REMOTE_URL", "valkey://cache", "write redis://"),
        ("LMCACHE_REMOTE_SERDE", "zip", "naive"),
        ("LMCACHE_ENABLE_P2P", "sometimes", "True/true/1"),
        ("LMCACHE_LOOKUP_URL", "http://x:1", "expected a Redis address: HOST:PORT, redis://"),
        ("LMCACHE_LOOKUP_URL", "s3://bucket", "expected a Redis address"),
        ("LMCACHE_LOOKUP_URL", "registry:99999", "from 1 to 65535"),
        ("LMCACHE_DISTRIBUTED_URL", "nohostport", "HOST:PORT"),
        ("LMCACHE_DISTRIBUTED_URL", "host:99999", "port"),
        ("LMCACHE_SAVE_UNFULL_CHUNK", "2", "True/true/1"),
        ("LMCACHE_BLOCKING_TIMEOUT_SECS", "0", "seconds"),
        ("LMCACHE_LOG_LEVEL", "LOUD", "DEBUG"),
        ("LMCACHE_LOAD_FAILURE_POLICY", "ignore", "recompute"),
    ],
)
def test_each_invalid_value_names_the_variable_the_value_and_what_is_accepted(name, value, accepted):
    with pytest.raises(ConfigError) as err:
        load_config(env={name: value})
    message = str(err.value)
    assert name in message and repr(value) in message and accepted in message


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(env={"LMCACHE_CHUNK_SIZE": "x", "LMCACHE_LOCAL_CPU": "y"})
    assert len(err.value.problems) == 2


def test_disk_path_without_size_is_an_error_not_a_silently_disabled_tier():
    with pytest.raises(ConfigError, match="LMCACHE_MAX_LOCAL_DISK_SIZE"):
        load_config(env={"LMCACHE_LOCAL_DISK": "/var/cache/lmcache"})


def test_disk_tier_needs_the_memory_tier_as_staging():
    with pytest.raises(ConfigError, match="LMCACHE_LOCAL_CPU=True"):
        load_config(env={"LMCACHE_LOCAL_DISK": "/d", "LMCACHE_MAX_LOCAL_DISK_SIZE": "1", "LMCACHE_LOCAL_CPU": "false"})


def test_p2p_needs_lookup_and_distributed_urls():
    with pytest.raises(ConfigError) as err:
        load_config(env={"LMCACHE_ENABLE_P2P": "true"})
    assert "LMCACHE_LOOKUP_URL" in str(err.value) and "LMCACHE_DISTRIBUTED_URL" in str(err.value)


P2P = {"LMCACHE_ENABLE_P2P": "True", "LMCACHE_LOOKUP_URL": "redis://registry:6379"}
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "name,value,accepted",
    [
        ("LMCACHE_P2P_ADVERTISE_HOST", "0.0.0.0", "names no interface a peer could dial"),
        ("LMCACHE_P2P_ADVERTISE_HOST", "10.0.0.5:8200", "without a port"),
        ("LMCACHE_P2P_ADVERTISE_HOST", "http://pod", "host name or IP address"),
        ("LMCACHE_P2P_AUTH_TOKEN_FILE", "/no/such/token", "readable file"),
        ("LMCACHE_DISTRIBUTED_URL", "10.0.0.5:0", "from 1 to 65535"),
    ],
)
def test_each_invalid_p2p_value_names_the_variable_and_what_is_accepted(name, value, accepted):
    with pytest.raises(ConfigError) as err:
        load_config(env={name: value})
    assert name in str(err.value) and repr(value) in str(err.value) and accepted in str(err.value)


def test_the_p2p_settings_are_read_and_the_advertise_host_is_kept_bare():
    env = {
        **P2P,
        "LMCACHE_DISTRIBUTED_URL": "0.0.0.0:8200",
        "LMCACHE_P2P_ADVERTISE_HOST": "[fd00::5]",
        "LMCACHE_P2P_AUTH_TOKEN": TOKEN,
    }
    config = load_config(env=env)
    assert config.distributed_host_port == ("0.0.0.0", 8200) and config.p2p_advertise_host == "fd00::5"
    assert config.p2p_token() == TOKEN.encode()
    assert load_config(env={}).p2p_token() is None


@pytest.mark.parametrize("wildcard", ["0.0.0.0:8200", "[::]:8200"])
def test_a_wildcard_distributed_url_needs_the_advertise_host(wildcard):
    with pytest.raises(ConfigError) as err:
        load_config(env={**P2P, "LMCACHE_DISTRIBUTED_URL": wildcard})
    assert "binds every interface" in str(err.value) and "set LMCACHE_P2P_ADVERTISE_HOST" in str(err.value)
    assert load_config(env={**P2P, "LMCACHE_DISTRIBUTED_URL": wildcard, "LMCACHE_P2P_ADVERTISE_HOST": "pod-a"})


def test_the_p2p_token_is_never_shown():
    config = load_config(env={"LMCACHE_P2P_AUTH_TOKEN": TOKEN})
    assert TOKEN not in repr(config) and config.redacted_dict()["p2p_auth_token"] == "***"
    short = "short-" + "x" * 5
    with pytest.raises(ConfigError) as err:
        load_config(env={"LMCACHE_P2P_AUTH_TOKEN": short})
    assert "LMCACHE_P2P_AUTH_TOKEN='***'" in str(err.value) and "at least 16" in str(err.value)
    assert short not in str(err.value)


def test_the_p2p_token_file_is_read_without_its_line_break_and_checked_at_start(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    assert load_config(env={"LMCACHE_P2P_AUTH_TOKEN_FILE": str(secret)}).p2p_token() == TOKEN.encode()
    with pytest.raises(ConfigError, match="both give the token: keep one"):
        load_config(env={"LMCACHE_P2P_AUTH_TOKEN_FILE": str(secret), "LMCACHE_P2P_AUTH_TOKEN": TOKEN})
    secret.write_text("tiny\n")
    with pytest.raises(ConfigError) as err:
        load_config(env={"LMCACHE_P2P_AUTH_TOKEN_FILE": str(secret)})
    assert f"LMCACHE_P2P_AUTH_TOKEN_FILE={str(secret)!r}: expected at least 16" in str(err.value)
    assert "tiny" not in str(err.value)


def test_the_registry_takes_the_remote_password_settings(tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text("pw")
    env = {
        **P2P,
        "LMCACHE_LOOKUP_URL": f"redis://:{SECRET}@registry:6379",
        "LMCACHE_DISTRIBUTED_URL": "10.0.0.5:8200",
        "LMCACHE_REMOTE_PASSWORD_FILE": str(password_file),
    }
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert "LMCACHE_LOOKUP_URL='redis://:***@registry:6379' and LMCACHE_REMOTE_PASSWORD_FILE" in str(err.value)
    assert SECRET not in str(err.value)


def test_errors_from_file_and_extra_config_name_their_source(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("chunk_size: big\n")
    with pytest.raises(ConfigError, match=f"chunk_size in {config_file}"):
        load_config(env={"LMCACHE_CONFIG_FILE": str(config_file)})
    with pytest.raises(ConfigError, match=r'kv_connector_extra_config\["lmcache.chunk_size"\]'):
        load_config(env={}, extra_config={"lmcache.chunk_size": -4})


def test_unreadable_or_malformed_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={"LMCACHE_CONFIG_FILE": str(tmp_path / "missing.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(env={"LMCACHE_CONFIG_FILE": str(bad)})


def test_unknown_variable_warns_with_the_closest_name(caplog):
    with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
        load_config(env={"LMCACHE_CHUNKSIZE": "128", "LMCACHE_TRACK_USAGE": "false"})
    assert "LMCACHE_CHUNKSIZE" in caplog.text and "did you mean LMCACHE_CHUNK_SIZE" in caplog.text
    assert "TRACK_USAGE" not in caplog.text  # known LMCache variable with nothing to configure here


def test_unknown_extra_config_key_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
        load_config(env={}, extra_config={"lmcache.chunk_sise": 128})
    assert "did you mean chunk_size" in caplog.text


def test_chunk_must_be_whole_vllm_blocks():
    check_chunk_size(LMCacheConfig(chunk_size=256), 32)
    with pytest.raises(ConfigError, match="multiple of vLLM's block size 96"):
        check_chunk_size(LMCacheConfig(chunk_size=256), 96)


# ---------------------------------------------------------------- remote URLs and their encoding


@pytest.mark.parametrize(
    "url",
    [
        "redis://cache:6379",
        "rediss://app:pw@cache:6380/1",
        "unix:///run/redis/redis.sock?db=2",
        "redis-sentinel://s1:26379,s2:26379/mymaster",
        "redis-cluster://n1:7000,n2:7001,n3:7002",
        "s3://kv-cache/team-a",
        "lm://cache-server:65432",
    ],
)
def test_every_remote_url_form_is_accepted_and_kept_as_given(url):
    config = load_config(env={"LMCACHE_REMOTE_URL": url})
    assert config.remote_url == url
    assert config.parsed_remote_url == parse_remote_url(url)


@pytest.mark.parametrize(
    "given,kept",
    [
        ("registry:6380", "redis://registry:6380"),  # plain HOST:PORT, as LMCache accepts it
        ("redis://registry:6380", "redis://registry:6380"),
        ("rediss://registry", "rediss://registry"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("redis-sentinel://s1,s2/registry", "redis-sentinel://s1,s2/registry"),
        ("redis-cluster://n1:7000,n2:7001", "redis-cluster://n1:7000,n2:7001"),
    ],
)
def test_the_lookup_registry_accepts_every_redis_form(given, kept):
    config = load_config(env={"LMCACHE_LOOKUP_URL": given})
    assert config.lookup_url == kept and config.parsed_lookup_url.kind == "redis"


@pytest.mark.parametrize("serde", ["kivi", "cachegen", "CacheGen"])
def test_serde_values_that_nothing_implements_are_an_error_not_silently_accepted(serde):
    with pytest.raises(ConfigError) as err:
        load_config(env={"LMCACHE_REMOTE_SERDE": serde})
    message = str(err.value)
    assert f"LMCACHE_REMOTE_SERDE={serde!r}" in message
    assert "is not available: this connector stores raw bytes (naive) only" in message


def test_naive_is_the_only_serde():
    assert load_config(env={}).remote_serde == "naive"
    assert load_config(env={"LMCACHE_REMOTE_SERDE": "Naive"}).remote_serde == "naive"
    assert load_config(env={}, extra_config={"lmcache.remote_serde": "naive"}).remote_serde == "naive"


def test_a_bad_remote_url_from_the_file_names_its_source(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("remote_url: redis-cluster://n1/3\n")
    with pytest.raises(ConfigError, match=f"remote_url in {config_file}='redis-cluster://n1/3': .*only database 0"):
        load_config(env={"LMCACHE_CONFIG_FILE": str(config_file)})


def test_a_password_in_a_url_never_reaches_an_error_the_summary_or_repr():
    env = {"LMCACHE_REMOTE_URL": f"redis://app:{SECRET}@cache:6379", "LMCACHE_LOOKUP_URL": f":{SECRET}@registry:1"}
    config = load_config(env=env)
    assert config.parsed_remote_url.password == SECRET  # the client gets it
    shown = [repr(config), str(config), describe(config), *config.unavailable_tiers(), str(config.redacted_dict())]
    assert not [text for text in shown if SECRET in text]
    assert config.redacted_dict()["remote_url"] == "redis://app:***@cache:6379"
    assert config.redacted_dict()["lookup_url"] == "redis://:***@registry:1"

    for bad in (f"redis://app:{SECRET}@cache:99999", f"redis://app:{SECRET}@a,b", f"redis://app:pa/{SECRET}@cache"):
        with pytest.raises(ConfigError) as err:
            load_config(env={"LMCACHE_REMOTE_URL": bad, "LMCACHE_LOOKUP_URL": bad})
        assert len(err.value.problems) == 2 and SECRET not in str(err.value)
        assert "LMCACHE_REMOTE_URL='redis://app:***@" in str(err.value)


@pytest.mark.parametrize("args", [["config"], ["config", "--json"]], ids=" ".join)
def test_lmcache_connector_config_never_prints_a_password(monkeypatch, capsys, args):
    for name in [n for n in os.environ if n.startswith("LMCACHE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LMCACHE_REMOTE_URL", f"rediss://app:{SECRET}@cache:6380/1")
    monkeypatch.setenv("LMCACHE_LOOKUP_URL", f"redis-sentinel://:{SECRET}@s1,s2")
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert "rediss://app:***@cache:6380/1" in out.out

    monkeypatch.setenv("LMCACHE_REMOTE_URL", f"rediss://app:{SECRET}@cache:0")
    assert cli.main(args) == 2
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and "LMCACHE_REMOTE_URL='rediss://app:***@cache:0'" in out.out + out.err


@pytest.mark.parametrize(("raw", "expected"), [("auto", "auto"), ("AUTO", "auto"), ("True", True), ("0", False)])
def test_disk_fills_are_auto_by_default_or_forced_either_way(raw, expected):
    assert load_config(env={}).disk_async_fills == "auto"
    assert load_config(env={"LMCACHE_DISK_ASYNC_FILLS": raw}).disk_async_fills == expected
    with pytest.raises(ConfigError, match="LMCACHE_DISK_ASYNC_FILLS.*expected auto, or a boolean"):
        load_config(env={"LMCACHE_DISK_ASYNC_FILLS": "sometimes"})


# ---------------------------------------------------------------- remote tier settings


def test_remote_settings_default_to_no_tls_no_expiry_and_a_100_ms_lookup():
    config = load_config(env={})
    assert (config.remote_tls, config.remote_tls_check_hostname) == (False, True)
    assert config.remote_ttl_secs is None and config.remote_lookup_timeout_s == 0.1
    # S3 answers a request in tens of milliseconds: its lookups get a second unless told otherwise.
    assert load_config(env={"LMCACHE_REMOTE_URL": "s3://kv-cache"}).remote_lookup_timeout_s == 1.0
    env = {"LMCACHE_REMOTE_URL": "s3://kv-cache", "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "250"}
    assert load_config(env=env).remote_lookup_timeout_s == 0.25
    assert config.remote_key_prefix == "lmc:" and config.remote_service_name is None
    assert config.remote_password_file is None and config.remote_sentinel_password_file is None


def _secret_file(tmp_path, name: str, text: str = SECRET) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_remote_variable_is_read_from_the_environment(tmp_path):
    env = {
        "LMCACHE_REMOTE_URL": "redis-sentinel://s1:26379,s2:26379",
        "LMCACHE_REMOTE_PASSWORD_FILE": _secret_file(tmp_path, "password"),
        "LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE": _secret_file(tmp_path, "sentinel-password"),
        "LMCACHE_REMOTE_SERVICE_NAME": "kv-cache",
        "LMCACHE_REMOTE_TLS": "true",
        "LMCACHE_REMOTE_TLS_CA_FILE": _secret_file(tmp_path, "ca.pem", "CA"),
        "LMCACHE_REMOTE_TLS_CERT_FILE": _secret_file(tmp_path, "cert.pem", "CERT"),
        "LMCACHE_REMOTE_TLS_KEY_FILE": _secret_file(tmp_path, "key.pem", "KEY"),
        "LMCACHE_REMOTE_TLS_CHECK_HOSTNAME": "False",
        "LMCACHE_REMOTE_TTL_SECS": "3600",
        "LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS": "250",
        "LMCACHE_REMOTE_KEY_PREFIX": "team-a:lmc:",
    }
    config = load_config(env=env)
    assert config.remote_password_file == str(tmp_path / "password")
    assert config.remote_sentinel_password_file == str(tmp_path / "sentinel-password")
    assert config.remote_service_name == "kv-cache" and config.remote_tls is True
    assert config.remote_tls_ca_file.endswith("ca.pem") and config.remote_tls_cert_file.endswith("cert.pem")
    assert config.remote_tls_key_file.endswith("key.pem") and config.remote_tls_check_hostname is False
    assert config.remote_ttl_secs == 3600 and config.remote_lookup_timeout_ms == 250.0
    assert config.remote_key_prefix == "team-a:lmc:"


@pytest.mark.parametrize(
    "name,raw,accepted",
    [
        ("LMCACHE_REMOTE_TTL_SECS", "ten", "whole number of seconds greater than 0"),
        ("LMCACHE_REMOTE_TTL_SECS", "0", "whole number of seconds greater than 0"),
        ("LMCACHE_REMOTE_TTL_SECS", "1.5", "whole number of seconds greater than 0"),
        ("LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS", "0", "milliseconds greater than 0"),
        ("LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS", "fast", "milliseconds greater than 0"),
        ("LMCACHE_REMOTE_KEY_PREFIX", "{lmc}:", "without spaces or braces"),
        ("LMCACHE_REMOTE_KEY_PREFIX", "my cache:", "without spaces or braces"),
        ("LMCACHE_REMOTE_SERVICE_NAME", "my/master", "letters, digits and '_.:-' only"),
        ("LMCACHE_REMOTE_TLS", "maybe", "expected a boolean"),
        ("LMCACHE_REMOTE_TLS_CHECK_HOSTNAME", "sometimes", "expected a boolean"),
        ("LMCACHE_REMOTE_PASSWORD_FILE", "/no/such/secret", "there is no file at this path"),
        ("LMCACHE_REMOTE_TLS_CA_FILE", "/no/such/ca.pem", "there is no file at this path"),
    ],
)
def test_a_bad_remote_setting_is_an_error_naming_the_variable(name, raw, accepted):
    with pytest.raises(ConfigError) as err:
        load_config(env={name: raw})
    assert f"{name}={raw!r}" in str(err.value) and accepted in str(err.value)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"LMCACHE_REMOTE_TLS_CERT_FILE": "{cert}"}, "LMCACHE_REMOTE_TLS_CERT_FILE and LMCACHE_REMOTE_TLS_KEY_FILE go"),
        (
            {"LMCACHE_REMOTE_URL": "unix:///run/redis.sock", "LMCACHE_REMOTE_TLS": "True"},
            "a unix socket carries no TLS",
        ),
        (
            {"LMCACHE_REMOTE_URL": f"redis://:{SECRET}@cache", "LMCACHE_REMOTE_PASSWORD_FILE": "{cert}"},
            "both give a password",
        ),
        (
            {"LMCACHE_REMOTE_URL": "redis://cache", "LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE": "{cert}"},
            "LMCACHE_REMOTE_SENTINEL_PASSWORD_FILE applies to redis-sentinel:// only",
        ),
        (
            {"LMCACHE_REMOTE_URL": "redis-cluster://n1,n2", "LMCACHE_REMOTE_SERVICE_NAME": "kv"},
            "LMCACHE_REMOTE_SERVICE_NAME applies to redis-sentinel:// only",
        ),
        (
            {"LMCACHE_REMOTE_URL": "redis-sentinel://s1/kv", "LMCACHE_REMOTE_SERVICE_NAME": "other"},
            "names service 'kv' and LMCACHE_REMOTE_SERVICE_NAME names 'other': keep one",
        ),
    ],
    ids=["cert-without-key", "tls-on-unix", "two-passwords", "sentinel-password", "service-name", "two-services"],
)
def test_remote_settings_that_contradict_each_other_are_an_error(tmp_path, env, message):
    cert = _secret_file(tmp_path, "cert.pem", "CERT")
    with pytest.raises(ConfigError) as err:
        load_config(env={name: value.replace("{cert}", cert) for name, value in env.items()})
    assert message in str(err.value) and SECRET not in str(err.value)


def test_the_service_name_setting_agrees_with_a_url_naming_the_same_one():
    env = {"LMCACHE_REMOTE_URL": "redis-sentinel://s1/kv", "LMCACHE_REMOTE_SERVICE_NAME": "kv"}
    assert load_config(env=env).remote_service_name == "kv"


@pytest.mark.parametrize("args", [["config"], ["config", "--json"]], ids=" ".join)
def test_lmcache_connector_config_shows_password_files_but_never_their_contents(monkeypatch, capsys, tmp_path, args):
    for name in [n for n in os.environ if n.startswith("LMCACHE_")]:
        monkeypatch.delenv(name)
    password_file = _secret_file(tmp_path, "password")
    monkeypatch.setenv("LMCACHE_REMOTE_URL", "redis://cache:6379")
    monkeypatch.setenv("LMCACHE_REMOTE_PASSWORD_FILE", password_file)
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert password_file in out.out  # where the password is, for an operator checking the mount


@pytest.mark.parametrize("style", ["auto", "path", "virtual", "PATH"])
def test_the_s3_addressing_style_is_one_of_three(style):
    env = {"LMCACHE_REMOTE_URL": "s3://kv-cache/team-a", "LMCACHE_S3_ADDRESSING_STYLE": style}
    assert load_config(env=env).s3_addressing_style == style.lower()
    assert load_config(env={}).s3_addressing_style == "auto"


def test_the_s3_listing_is_off_unless_an_interval_is_set():
    assert load_config(env={"LMCACHE_REMOTE_URL": "s3://kv-cache"}).s3_list_interval_secs is None
    env = {"LMCACHE_REMOTE_URL": "s3://kv-cache", "LMCACHE_S3_LIST_INTERVAL_SECS": "60"}
    assert load_config(env=env).s3_list_interval_secs == 60


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"LMCACHE_REMOTE_URL": "s3://kv-cache", "LMCACHE_S3_ADDRESSING_STYLE": "dns"},
            "LMCACHE_S3_ADDRESSING_STYLE='dns': expected one of: auto, path, virtual",
        ),
        (
            {"LMCACHE_REMOTE_URL": "redis://cache", "LMCACHE_S3_ADDRESSING_STYLE": "path"},
            "LMCACHE_S3_ADDRESSING_STYLE applies to s3:// only",
        ),
        (
            {"LMCACHE_REMOTE_URL": "s3://kv-cache", "LMCACHE_S3_LIST_INTERVAL_SECS": "0.5"},
            "LMCACHE_S3_LIST_INTERVAL_SECS='0.5': expected a whole number of seconds greater than 0",
        ),
        (
            {"LMCACHE_REMOTE_URL": "lm://cache:65432", "LMCACHE_S3_LIST_INTERVAL_SECS": "60"},
            "LMCACHE_S3_LIST_INTERVAL_SECS applies to s3:// only",
        ),
        (
            {"LMCACHE_REMOTE_URL": "s3://kv-cache", "LMCACHE_REMOTE_TTL_SECS": "3600"},
            "LMCACHE_REMOTE_TTL_SECS does not apply to LMCACHE_REMOTE_URL='s3://kv-cache': S3 has no TTL",
        ),
        (
            {"LMCACHE_REMOTE_URL": "s3://kv-cache", "LMCACHE_REMOTE_TLS_CA_FILE": "{cert}"},
            "a private CA goes in AWS_CA_BUNDLE",
        ),
    ],
    ids=[
        "unknown-style",
        "style-without-s3",
        "fractional-list-interval",
        "list-without-s3",
        "ttl-on-s3",
        "redis-ca-on-s3",
    ],
)
def test_s3_settings_that_would_be_ignored_are_an_error(tmp_path, env, message):
    cert = _secret_file(tmp_path, "cert.pem", "CERT")
    with pytest.raises(ConfigError) as err:
        load_config(env={name: value.replace("{cert}", cert) for name, value in env.items()})
    assert message in str(err.value)
