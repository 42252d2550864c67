"""The connector's configuration: one typed object, validated once at start.

Sources, lowest to highest priority (as in LMCache):
  1. built-in defaults;
  2. the YAML file named by ``LMCACHE_CONFIG_FILE`` (keys are the lower-case names, e.g. ``chunk_size``);
  3. ``LMCACHE_*`` environment variables (``LMCACHE_CHUNK_SIZE``, ...);
  4. vLLM's ``kv_connector_extra_config`` (keys with or without an ``lmcache.`` prefix).

Every invalid value is a :class:`ConfigError` that names where the value came from, the bad value and
what is accepted. All errors are collected, so one start shows every mistake at once. Unknown
``LMCACHE_*`` variables and unknown keys are warnings that suggest the closest known name.

URLs are checked by the grammar in :mod:`lmcache_connector.urls` and kept as the text given; a
password in one never reaches a message, a log line or ``lmcache-connector config``
(:meth:`LMCacheConfig.redacted_dict`, ``repr()``).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from lmcache_connector.urls import (
    DEFAULT_SERVICE_NAME,
    RemoteUrl,
    is_service_name,
    parse_redis_url,
    parse_remote_url,
    redacted_url,
)

logger = logging.getLogger("lmcache_connector")

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
EXTRA_CONFIG_PREFIX = "lmcache."

# Variables LMCache users set that are not settings of ours: accepted silently.
_IGNORED_ENV = {
    CONFIG_FILE_ENV,
    "LMCACHE_USE_EXPERIMENTAL",  # a v0.x leftover that charts still set
    "LMCACHE_TRACK_USAGE",  # we never send telemetry, so there is nothing to turn off
}

GB = 1024**3
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")

# Settings whose values may carry a password (user:password@host): shown through redacted_url().
URL_SETTINGS = ("remote_url", "lookup_url", "distributed_url")
LOOKUP_TIMEOUT_S = 0.1  # LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS unset: Redis, lmcache_server
S3_LOOKUP_TIMEOUT_S = 1.0  # ... and on S3
# Settings that are secrets as a whole: never shown, not even in an error about their value.
SECRET_SETTINGS = ("p2p_auth_token",)
HIDDEN = "***"
MIN_TOKEN_CHARS = 16
WILDCARD_HOSTS = ("0.0.0.0", "::")
SERVED_REMOTE_KINDS = ("redis", "s3", "lm")  # LMCACHE_REMOTE_URL kinds with a client (tiers/remote/client.py)


class ConfigError(ValueError):
    """One or more invalid settings; the message lists each with its source and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid lmcache_connector configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class LMCacheConfig:
    """The effective configuration. Sizes are in GB (GiB, as LMCache counts them)."""

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    remote_url: str | None = None
    remote_serde: str = "naive"
    enable_p2p: bool = False
    lookup_url: str | None = None
    distributed_url: str | None = None
    p2p_advertise_host: str | None = None
    p2p_auth_token: str | None = None
    p2p_auth_token_file: str | None = None
    save_unfull_chunk: bool = True
    blocking_timeout_secs: float = 10.0
    log_level: str = "INFO"
    model_name: str | None = None
    load_failure_policy: str = "recompute"
    disk_flush_timeout_secs: float = 10.0
    disk_rescan_interval_secs: float = 10.0
    disk_async_fills: bool | str = "auto"  # True, False or "auto" (by page cache)
    extra_tiers: str | None = None
    # Remote tier (Redis): how to reach it and how values are kept there.
    remote_password_file: str | None = None
    remote_sentinel_password_file: str | None = None
    remote_service_name: str | None = None
    remote_tls: bool = False
    remote_tls_ca_file: str | None = None
    remote_tls_cert_file: str | None = None
    remote_tls_key_file: str | None = None
    remote_tls_check_hostname: bool = True
    remote_ttl_secs: int | None = None
    remote_lookup_timeout_ms: float | None = None  # unset: the store's own default (remote_lookup_timeout_s)
    remote_key_prefix: str = "lmc:"
    # Remote tier (S3): endpoint, region and credentials come from the standard AWS environment.
    s3_addressing_style: str = "auto"
    s3_list_interval_secs: int | None = None

    @property
    def remote_lookup_timeout_s(self) -> float:
        """``LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS`` in seconds, or the store's default: 100 ms, and 1 s
        on S3, where a request takes tens of milliseconds and a lookup is two rounds of them."""
        if self.remote_lookup_timeout_ms is not None:
            return self.remote_lookup_timeout_ms / 1000
        url = self.parsed_remote_url
        return S3_LOOKUP_TIMEOUT_S if url is not None and url.kind == "s3" else LOOKUP_TIMEOUT_S

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB) if self.local_cpu else 0

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GB) if self.local_disk else 0

    @property
    def parsed_remote_url(self) -> RemoteUrl | None:
        return parse_remote_url(self.remote_url) if self.remote_url else None

    @property
    def parsed_lookup_url(self) -> RemoteUrl | None:
        return parse_redis_url(self.lookup_url) if self.lookup_url else None

    @property
    def distributed_host_port(self) -> tuple[str, int] | None:
        """``LMCACHE_DISTRIBUTED_URL`` as ``(host, port)``: where rank 0 of this instance serves peers."""
        if not self.distributed_url:
            return None
        parsed = urlparse("//" + self.distributed_url.split("://", 1)[-1])
        return parsed.hostname, parsed.port

    def p2p_token(self) -> bytes | None:
        """The shared P2P token (``LMCACHE_P2P_AUTH_TOKEN``, or the file ``LMCACHE_P2P_AUTH_TOKEN_FILE``
        names, without its trailing line break), or None. Never print it."""
        if self.p2p_auth_token:
            return self.p2p_auth_token.encode()
        if self.p2p_auth_token_file:
            return _read_token_file(self.p2p_auth_token_file).encode()
        return None

    def as_dict(self) -> dict[str, Any]:
        """Every setting, passwords included: never print this; print :meth:`redacted_dict`."""
        return dataclasses.asdict(self)

    def redacted_dict(self) -> dict[str, Any]:
        """Every setting, with any password in a URL shown as ``***``: what may be printed or logged."""
        values = self.as_dict()
        for key in URL_SETTINGS:
            if values[key] is not None:
                values[key] = redacted_url(values[key])
        for key in SECRET_SETTINGS:
            if values[key] is not None:
                values[key] = HIDDEN
        return values

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.redacted_dict().items())
        return f"LMCacheConfig({shown})"

    def unavailable_tiers(self) -> list[str]:
        """Settings that name a tier this version cannot serve yet (logged once at start)."""
        tiers = []
        if self.remote_url and self.parsed_remote_url.kind not in SERVED_REMOTE_KINDS:
            tiers.append(f"remote tier (LMCACHE_REMOTE_URL={redacted_url(self.remote_url)})")
        return tiers


# ---------------------------------------------------------------- value parsers
# Each takes the raw value (a string from env, or a YAML / JSON scalar) and returns the typed value,
# or raises ValueError with the accepted forms; the loader adds where the value came from.

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    text = str(raw).strip().strip("\"'").lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected a boolean: True/true/1 or False/false/0")


def _parse_bool_or_auto(raw: Any) -> bool | str:
    if str(raw).strip().strip("\"'").lower() == "auto":
        return "auto"
    try:
        return _parse_bool(raw)
    except ValueError:
        raise ValueError("expected auto, or a boolean: True/true/1 or False/false/0") from None


def _parse_positive_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number of tokens greater than 0")
    try:
        value = int(str(raw).strip().strip("\"'"))
    except ValueError:
        raise ValueError("expected a whole number of tokens greater than 0") from None
    if value <= 0:
        raise ValueError("expected a whole number of tokens greater than 0")
    return value


def _parse_gb(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number of GB (e.g. 5 or 2.5), 0 or more")
    try:
        value = float(str(raw).strip().strip("\"'"))
    except ValueError:
        raise ValueError("expected a number of GB (e.g. 5 or 2.5), 0 or more") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a number of GB (e.g. 5 or 2.5), 0 or more")
    return value


def _parse_seconds(raw: Any) -> float:
    try:
        value = float(str(raw).strip().strip("\"'"))
    except ValueError:
        raise ValueError("expected a number of seconds greater than 0") from None
    if not value > 0:
        raise ValueError("expected a number of seconds greater than 0")
    return value


def _parse_optional_seconds(raw: Any) -> int | None:
    text = _parse_optional_text(raw)
    if text is None:
        return None
    problem = "expected a whole number of seconds greater than 0 (unset: values never expire)"
    if isinstance(raw, bool) or not text.isdigit() or int(text) <= 0:
        raise ValueError(problem)
    return int(text)


def _parse_list_interval(raw: Any) -> int | None:
    text = _parse_optional_text(raw)
    if text is None:
        return None
    if isinstance(raw, bool) or not text.isdigit() or int(text) <= 0:
        raise ValueError("expected a whole number of seconds greater than 0 (unset: the bucket is never listed)")
    return int(text)


def _parse_milliseconds(raw: Any) -> float:
    problem = "expected a number of milliseconds greater than 0 (e.g. 100)"
    if isinstance(raw, bool):
        raise ValueError(problem)
    try:
        value = float(str(raw).strip().strip("\"'"))
    except ValueError:
        raise ValueError(problem) from None
    if not 0 < value < float("inf"):
        raise ValueError(problem)
    return value


def _parse_readable_file(raw: Any) -> str | None:
    """A file the process must read at start (a mounted Secret, a certificate): checked now, so a
    missing mount is a start-up error naming the variable, not a connection failure later."""
    text = _parse_optional_text(raw)
    if text is None:
        return None
    if not os.path.isfile(text):
        raise ValueError("expected a readable file: there is no file at this path")
    if not os.access(text, os.R_OK):
        raise ValueError("expected a readable file: this process may not read it")
    return text


def _parse_service_name(raw: Any) -> str | None:
    text = _parse_optional_text(raw)
    if text is not None and not is_service_name(text):
        raise ValueError("expected a Sentinel service name: letters, digits and '_.:-' only (e.g. mymaster)")
    return text


def _parse_key_prefix(raw: Any) -> str:
    text = str(raw).strip().strip("\"'")
    # Braces would make a Redis Cluster hash tag: every key with the prefix would land in one slot,
    # so the cache would stop spreading over the cluster's nodes.
    if not text or len(text) > 64 or not all(33 <= ord(c) < 127 for c in text) or "{" in text or "}" in text:
        raise ValueError(
            "expected 1 to 64 printable ASCII characters without spaces or braces (e.g. lmc: or team-a:lmc:)"
        )
    return text


def _parse_advertise_host(raw: Any) -> str | None:
    text = _parse_optional_text(raw)
    if text is None:
        return None
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    problem = "expected the host name or IP address peers dial (e.g. 10.0.0.5, the pod IP), without a port"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(problem) from None
        return host
    if address.is_unspecified:
        raise ValueError(f"{host} names no interface a peer could dial; " + problem)
    return str(address)


def _check_token(text: str) -> str:
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(
            f"expected at least {MIN_TOKEN_CHARS} printable characters without spaces "
            "(e.g. the output of: openssl rand -hex 32)"
        )
    return text


def _parse_token(raw: Any) -> str | None:
    text = "" if raw is None else str(raw).strip()
    return _check_token(text) if text else None


def _read_token_file(path: str) -> str:
    """The token in ``path``, without the line break a Secret or ``echo`` leaves at its end."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the token ({type(exc).__name__})") from None
    return _check_token(text)


def _parse_optional_text(raw: Any) -> str | None:
    text = "" if raw is None else str(raw).strip().strip("\"'")
    return text or None


def _parse_disk_path(raw: Any) -> str | None:
    text = _parse_optional_text(raw)
    if text is None:
        return None
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ValueError("expected a local folder: a path such as /var/cache/lmcache or a file:// URL")
    if not text.startswith("/"):
        raise ValueError("expected an absolute path (/...) or a file:///... URL")
    return os.path.normpath(text)


def _parse_remote_url(raw: Any) -> str | None:
    text = _parse_optional_text(raw)
    if text is None:
        return None
    parse_remote_url(text)  # the grammar's ValueError says what is wrong and lists the accepted forms
    return text


def _parse_lookup_url(raw: Any) -> str | None:
    """A Redis URL of any form; plain HOST[:PORT] is kept as redis://HOST[:PORT]."""
    text = _parse_optional_text(raw)
    if text is None:
        return None
    parse_redis_url(text)
    return text if "://" in text else "redis://" + text


def _parse_remote_serde(raw: Any) -> str:
    # LMCache's kivi and cachegen are lossy KV codecs; this connector has none, and accepting their
    # names would make a user believe their values are compressed.
    text = str(raw).strip().strip("\"'").lower()
    if text == "naive":
        return text
    if text in ("kivi", "cachegen"):
        raise ValueError(
            f"{text} is not available: this connector stores raw bytes (naive) only; "
            "set naive or leave the setting unset"
        )
    raise ValueError("expected naive (raw bytes, the only encoding this connector stores)")


def _parse_host_port(raw: Any) -> str | None:
    text = _parse_optional_text(raw)
    if text is None:
        return None
    parsed = urlparse("//" + text.split("://", 1)[-1])
    _check_port(parsed)
    if not parsed.hostname or parsed.port is None:
        raise ValueError("expected HOST:PORT, e.g. 10.0.0.5:8200")
    if parsed.port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    return text


def _check_port(parsed) -> None:
    try:
        _ = parsed.port  # urllib raises here for a port outside 0-65535
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None


def _choice(*choices: str, case: Callable[[str], str] = str.lower) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = case(str(raw).strip().strip("\"'"))
        if text not in choices:
            raise ValueError("expected one of: " + ", ".join(choices))
        return text

    return parse


@dataclass(frozen=True)
class _Setting:
    parse: Callable[[Any], Any]
    help: str


SETTINGS: dict[str, _Setting] = {
    "chunk_size": _Setting(_parse_positive_int, "Tokens per stored chunk; a whole number of vLLM blocks."),
    "local_cpu": _Setting(_parse_bool, "Keep chunks in a CPU-memory tier."),
    "max_local_cpu_size": _Setting(_parse_gb, "Size of the CPU-memory tier in GB; it never grows past this."),
    "local_disk": _Setting(_parse_disk_path, "Folder of the local disk tier (a path or file:// URL)."),
    "max_local_disk_size": _Setting(_parse_gb, "Size bound of the disk tier in GB; required when local_disk is set."),
    "remote_url": _Setting(
        _parse_remote_url,
        "Remote tier URL: redis://, rediss://, unix://, redis-sentinel://, redis-cluster://, s3:// or lm://.",
    ),
    "remote_serde": _Setting(_parse_remote_serde, "Encoding of remote values: naive (raw bytes), the only one."),
    "enable_p2p": _Setting(_parse_bool, "Share chunks with peer instances found through the lookup registry."),
    "lookup_url": _Setting(
        _parse_lookup_url, "Lookup registry for P2P: a Redis URL (redis://HOST:PORT, rediss://, ...) or HOST:PORT."
    ),
    "distributed_url": _Setting(
        _parse_host_port,
        "This instance's HOST:PORT that peers fetch chunks from; the worker of rank r (tp_rank + tp_size * "
        "pp_rank) serves on PORT + r. HOST 0.0.0.0 binds every interface (needs p2p_advertise_host).",
    ),
    "p2p_advertise_host": _Setting(
        _parse_advertise_host,
        "The host peers dial for this instance (e.g. the pod IP), when distributed_url binds 0.0.0.0.",
    ),
    "p2p_auth_token": _Setting(
        _parse_token, "Shared token peers prove with an HMAC challenge (never sent); unset: no authentication."
    ),
    "p2p_auth_token_file": _Setting(
        _parse_readable_file, "File holding the shared P2P token (a mounted Secret), instead of p2p_auth_token."
    ),
    "save_unfull_chunk": _Setting(_parse_bool, "Also store the last, partial chunk of a prompt (LMCache: False)."),
    "blocking_timeout_secs": _Setting(_parse_seconds, "Timeout of a blocking remote read, in seconds."),
    "log_level": _Setting(
        _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", case=str.upper), "Log level of this library."
    ),
    "model_name": _Setting(
        _parse_optional_text,
        "Model identity in cache keys; defaults to the model name vLLM was given. "
        "Set it when pods mount the same model at different paths.",
    ),
    "load_failure_policy": _Setting(
        _choice("recompute", "fail"), "What vLLM does when a load fails: recompute the blocks, or fail the request."
    ),
    "disk_flush_timeout_secs": _Setting(
        _parse_seconds, "At shutdown, how long queued disk writes may take before they are dropped."
    ),
    "disk_rescan_interval_secs": _Setting(
        _parse_seconds, "How often the disk folder is rescanned for chunks other engines wrote or evicted."
    ),
    "disk_async_fills": _Setting(
        _parse_bool_or_auto,
        "How disk chunks are read into memory: auto (in the background through vLLM's asynchronous-load "
        "path when a file is not in the page cache, on the model thread when it is), True (always in the "
        "background) or False (always on the model thread, before the step's forward).",
    ),
    "extra_tiers": _Setting(
        _parse_optional_text,
        "Secondary media to load from outside the package: module:factory[,module:factory...].",
    ),
    "remote_password_file": _Setting(
        _parse_readable_file,
        "File holding the remote store's password (a mounted Secret), instead of a password in the URL.",
    ),
    "remote_sentinel_password_file": _Setting(
        _parse_readable_file, "File holding the Sentinels' own password (redis-sentinel:// only)."
    ),
    "remote_service_name": _Setting(
        _parse_service_name, "Sentinel service name of the master (redis-sentinel:// only); default mymaster."
    ),
    "remote_tls": _Setting(
        _parse_bool, "TLS to the remote store (Sentinel, Cluster, standalone); rediss:// implies it."
    ),
    "remote_tls_ca_file": _Setting(_parse_readable_file, "CA certificate(s) that sign the remote store's certificate."),
    "remote_tls_cert_file": _Setting(_parse_readable_file, "Client certificate, when the server checks clients."),
    "remote_tls_key_file": _Setting(_parse_readable_file, "Private key of the client certificate."),
    "remote_tls_check_hostname": _Setting(
        _parse_bool, "Check that the server's certificate names the host in the URL."
    ),
    "remote_ttl_secs": _Setting(
        _parse_optional_seconds, "Expiry of remote values in seconds, refreshed by every hit; unset: none."
    ),
    "remote_lookup_timeout_ms": _Setting(
        _parse_milliseconds,
        "How long a lookup may wait for the remote store before it counts as a miss (unset: 100, 1000 on s3://).",
    ),
    "remote_key_prefix": _Setting(_parse_key_prefix, "Prefix of every key this library writes to the remote store."),
    "s3_addressing_style": _Setting(
        _choice("auto", "path", "virtual"),
        "S3 addressing (s3:// only): auto (path-style on a custom AWS_ENDPOINT_URL, virtual-hosted on AWS), "
        "path or virtual.",
    ),
    "s3_list_interval_secs": _Setting(
        _parse_list_interval,
        "s3:// only: list this namespace's objects every so many seconds (ListObjectsV2) to learn the "
        "chunks in the bucket without a HEAD each; unset: never listed.",
    ),
}


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


# ---------------------------------------------------------------- loading


def load_config(
    env: Mapping[str, str] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> LMCacheConfig:
    """Build the effective configuration; raise :class:`ConfigError` listing every invalid setting."""
    env = os.environ if env is None else env
    problems: list[str] = []
    values: dict[str, Any] = {}

    config_file = env.get(CONFIG_FILE_ENV)
    if config_file:
        for key, raw in _read_yaml(config_file, problems).items():
            _apply(values, problems, key, raw, f"{key} in {config_file}")

    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in _IGNORED_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in SETTINGS:
            _warn_unknown(name, [env_name(k) for k in SETTINGS], "environment variable")
            continue
        _apply(values, problems, key, raw, name)

    for raw_key, raw in (extra_config or {}).items():
        key = raw_key[len(EXTRA_CONFIG_PREFIX) :] if raw_key.startswith(EXTRA_CONFIG_PREFIX) else raw_key
        if key not in SETTINGS:
            _warn_unknown(raw_key, list(SETTINGS), "kv_connector_extra_config key")
            continue
        _apply(values, problems, key, raw, f'kv_connector_extra_config["{raw_key}"]')

    if not problems:
        config = LMCacheConfig(**values)
        problems.extend(_cross_checks(config))
    if problems:
        raise ConfigError(problems)
    return config


def _apply(values: dict[str, Any], problems: list[str], key: str, raw: Any, source: str) -> None:
    try:
        values[key] = SETTINGS[key].parse(raw)
    except ValueError as exc:
        shown = redacted_url(raw) if key in URL_SETTINGS and isinstance(raw, str) else raw
        if key in SECRET_SETTINGS:
            shown = HIDDEN
        problems.append(f"{source}={shown!r}: {exc}")


def _read_yaml(path: str, problems: list[str]) -> dict[str, Any]:
    import yaml  # deferred: only needed when a file is configured

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        problems.append(f"{CONFIG_FILE_ENV}={path!r}: cannot read the file ({exc.strerror})")
        return {}
    except yaml.YAMLError as exc:
        problems.append(f"{CONFIG_FILE_ENV}={path!r}: not valid YAML ({exc})")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{CONFIG_FILE_ENV}={path!r}: expected a mapping of settings, e.g. 'chunk_size: 256'")
        return {}
    known = {}
    for key, raw in data.items():
        key = str(key)
        if key not in SETTINGS:
            _warn_unknown(key, list(SETTINGS), f"key in {path}")
            continue
        known[key] = raw
    return known


def _cross_checks(config: LMCacheConfig) -> list[str]:
    problems = []
    if config.local_disk and not (config.local_cpu and config.max_local_cpu_size > 0):
        problems.append(
            f"LMCACHE_LOCAL_DISK={config.local_disk!r} needs the CPU-memory tier as its staging area: "
            "set LMCACHE_LOCAL_CPU=True and LMCACHE_MAX_LOCAL_CPU_SIZE greater than 0"
        )
    if config.local_disk and config.max_local_disk_size <= 0:
        problems.append(
            f"LMCACHE_LOCAL_DISK={config.local_disk!r} needs LMCACHE_MAX_LOCAL_DISK_SIZE: "
            "expected a size in GB greater than 0 (e.g. 10.0)"
        )
    problems.extend(_remote_cross_checks(config))
    problems.extend(_p2p_cross_checks(config))
    return problems


def _p2p_cross_checks(config: LMCacheConfig) -> list[str]:
    problems = []
    if config.p2p_auth_token and config.p2p_auth_token_file:
        problems.append(
            "LMCACHE_P2P_AUTH_TOKEN and LMCACHE_P2P_AUTH_TOKEN_FILE both give the token: keep one "
            "(the file keeps it out of the environment)"
        )
    elif config.p2p_auth_token_file:
        try:
            config.p2p_token()
        except ValueError as exc:
            problems.append(f"LMCACHE_P2P_AUTH_TOKEN_FILE={config.p2p_auth_token_file!r}: {exc}")
    if not config.enable_p2p:
        return problems
    if not config.lookup_url:
        problems.append("LMCACHE_ENABLE_P2P=True needs LMCACHE_LOOKUP_URL: expected redis://HOST:PORT")
    if not config.distributed_url:
        problems.append("LMCACHE_ENABLE_P2P=True needs LMCACHE_DISTRIBUTED_URL: expected HOST:PORT")
    elif config.distributed_host_port[0] in WILDCARD_HOSTS and not config.p2p_advertise_host:
        problems.append(
            f"LMCACHE_DISTRIBUTED_URL={config.distributed_url!r} binds every interface, which peers cannot dial: "
            "set LMCACHE_P2P_ADVERTISE_HOST to the address they should use (e.g. the pod IP)"
        )
    url = config.parsed_lookup_url
    if url is not None:
        shown = f"LMCACHE_LOOKUP_URL={url.redacted()!r}"
        if url.password is not None and config.remote_password_file:
            problems.append(
                f"{shown} and LMCACHE_REMOTE_PASSWORD_FILE (which the registry uses too) both give a password: keep one"
            )
        if url.scheme == "unix" and config.remote_tls:
            problems.append(
                f"LMCACHE_REMOTE_TLS=True (which the registry uses too) with {shown}: a unix socket carries no TLS"
            )
    return problems


def _remote_cross_checks(config: LMCacheConfig) -> list[str]:
    """Remote settings that contradict each other or the URL; silent otherwise (none is required)."""
    problems = []
    if bool(config.remote_tls_cert_file) != bool(config.remote_tls_key_file):
        problems.append(
            "LMCACHE_REMOTE_TLS_CERT_FILE and LMCACHE_REMOTE_TLS_KEY_FILE go together: "
            "a client certificate needs its key; set both or neither"
        )
    url = config.parsed_remote_url
    if url is not None:
        problems.extend(_s3_cross_checks(config, url))
    if url is None or url.kind != "redis":
        return problems
    shown = f"LMCACHE_REMOTE_URL={url.redacted()!r}"
    if url.scheme == "unix" and config.remote_tls:
        problems.append(f"LMCACHE_REMOTE_TLS=True with {shown}: a unix socket carries no TLS; use rediss://HOST:PORT")
    if url.password is not None and config.remote_password_file:
        problems.append(
            f"{shown} and LMCACHE_REMOTE_PASSWORD_FILE both give a password: "
            "keep one (the file keeps it out of the URL)"
        )
    if url.scheme != "redis-sentinel":
        for key in ("remote_sentinel_password_file", "remote_service_name"):
            if getattr(config, key):
                problems.append(f"{env_name(key)} applies to redis-sentinel:// only, not to {shown}")
    elif (
        config.remote_service_name
        and url.service_name != DEFAULT_SERVICE_NAME
        and url.service_name != config.remote_service_name
    ):
        problems.append(
            f"{shown} names service {url.service_name!r} and LMCACHE_REMOTE_SERVICE_NAME names "
            f"{config.remote_service_name!r}: keep one"
        )
    return problems


# Redis settings that an s3:// store does not use, and what does the same there.
_NOT_FOR_S3 = {
    "remote_password_file": "credentials come from the AWS environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, a role)",
    "remote_sentinel_password_file": "it is for redis-sentinel:// only",
    "remote_service_name": "it is for redis-sentinel:// only",
    "remote_tls": "the scheme of AWS_ENDPOINT_URL (https://) decides TLS",
    "remote_tls_ca_file": "a private CA goes in AWS_CA_BUNDLE",
    "remote_tls_cert_file": "S3 stores take no client certificate",
    "remote_tls_key_file": "S3 stores take no client certificate",
    "remote_ttl_secs": "S3 has no TTL: expire objects with a bucket lifecycle rule on the prefix",
}


def _s3_cross_checks(config: LMCacheConfig, url: RemoteUrl) -> list[str]:
    """Settings that say something the S3 client would silently ignore."""
    shown = f"LMCACHE_REMOTE_URL={url.redacted()!r}"
    if url.kind != "s3":
        problems = []
        if config.s3_addressing_style != "auto":
            problems.append(f"LMCACHE_S3_ADDRESSING_STYLE applies to s3:// only, not to {shown}")
        if config.s3_list_interval_secs is not None:
            problems.append(f"LMCACHE_S3_LIST_INTERVAL_SECS applies to s3:// only, not to {shown}")
        return problems
    return [
        f"{env_name(key)} does not apply to {shown}: {instead}"
        for key, instead in _NOT_FOR_S3.items()
        if getattr(config, key)
    ]


def _warn_unknown(name: str, known: list[str], what: str) -> None:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    logger.warning("Unknown %s %s is ignored%s", what, name, hint)


def check_chunk_size(config: LMCacheConfig, block_size: int) -> None:
    """The chunk must be a whole number of vLLM blocks: chunks are stored and loaded as whole blocks."""
    if config.chunk_size % block_size:
        lower = max(block_size, config.chunk_size // block_size * block_size)
        raise ConfigError(
            [
                f"LMCACHE_CHUNK_SIZE={config.chunk_size}: expected a multiple of vLLM's block size "
                f"{block_size} (e.g. {lower} or {lower + block_size})"
            ]
        )


def describe(config: LMCacheConfig) -> str:
    """One line summarising the effective configuration, for the start-up log."""
    tiers = []
    if config.local_cpu and config.max_local_cpu_size > 0:
        tiers.append(f"memory {config.max_local_cpu_size:g} GB")
    if config.local_disk:
        tiers.append(f"disk {config.local_disk} {config.max_local_disk_size:g} GB")
    if config.remote_url and config.parsed_remote_url.kind in SERVED_REMOTE_KINDS:
        ttl = f"TTL {config.remote_ttl_secs} s" if config.remote_ttl_secs else "no TTL"
        tiers.append(f"remote {redacted_url(config.remote_url)} ({ttl})")
    if config.enable_p2p and config.lookup_url:
        auth = "token" if config.p2p_auth_token or config.p2p_auth_token_file else "no token"
        tiers.append(f"peer {config.distributed_url} via {redacted_url(config.lookup_url)} ({auth})")
    return (
        f"tiers: {', '.join(tiers) or 'none'}; chunk_size={config.chunk_size}; "
        f"save_unfull_chunk={config.save_unfull_chunk}; load_failure_policy={config.load_failure_policy}"
    )
