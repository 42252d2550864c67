"""The URL grammar of ``LMCACHE_REMOTE_URL``, and of the Redis addresses in ``LMCACHE_LOOKUP_URL``.

One parser, :func:`parse_remote_url`, turns the text into a :class:`RemoteUrl`; whatever connects to
a remote store reads that object, never the text. The accepted forms (defaults in brackets):

  redis://[USER:PASSWORD@]HOST[:PORT][/DB]            Redis [port 6379, database 0]
  rediss://[USER:PASSWORD@]HOST[:PORT][/DB]           Redis over TLS [port 6379, database 0]
  unix://[USER:PASSWORD@]/PATH/TO/redis.sock[?db=N]   Redis on a local socket [database 0]
  redis-sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/SERVICE_NAME][?db=N]
                                                      Redis behind Sentinels [port 26379, service
                                                      mymaster]; the credentials are the master's
  redis-cluster://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]
                                                      Redis Cluster [port 6379]; database 0 only
  s3://BUCKET[/PREFIX]                                an S3-compatible object store; its endpoint and
                                                      credentials come from the AWS environment
  lm://HOST:PORT                                      LMCache's cache server; the port is required

Credentials are ``USER:PASSWORD@`` or ``:PASSWORD@`` (Redis's default user), percent-encoded
(``%40`` for ``@``, ``%3A`` for ``:``, ``%2F`` for ``/``). A host is a name, an IPv4 address or an
IPv6 address in brackets (``[::1]:6379``). ``?db=N`` is the only query option; anything else is an
error, so a typo never passes unnoticed.

A password is never printed: ``str()`` and ``repr()`` of a :class:`RemoteUrl` show ``***`` in its
place, and :func:`redacted_url` does the same to any text (a valid URL or not) for logs and for
``lmcache-connector config``. Error messages never quote the credentials.

Standard library only: the configuration loader and the CLI import this without vLLM or torch.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis-sentinel", "redis-cluster")
SCHEMES = (*REDIS_SCHEMES, "s3", "lm")

DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "redis-sentinel": 26379, "redis-cluster": 6379}
DEFAULT_SERVICE_NAME = "mymaster"
HIDDEN = "***"

FORMS = {
    "redis": "redis://[USER:PASSWORD@]HOST[:PORT][/DB]",
    "rediss": "rediss://[USER:PASSWORD@]HOST[:PORT][/DB] (TLS)",
    "unix": "unix:///PATH/TO/redis.sock[?db=N]",
    "redis-sentinel": "redis-sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/SERVICE_NAME]",
    "redis-cluster": "redis-cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]",
    "s3": "s3://BUCKET[/PREFIX]",
    "lm": "lm://HOST:PORT",
}

# Schemes people bring from elsewhere, with what to write instead.
_INSTEAD = {
    "valkey": "Valkey speaks the Redis protocol: write redis://HOST[:PORT]",
    "valkeys": "Valkey speaks the Redis protocol: write rediss://HOST[:PORT] for TLS",
    "resp": "write redis://HOST[:PORT] for any server that speaks the Redis protocol",
    "http": "an S3 endpoint goes in AWS_ENDPOINT_URL; the URL here is s3://BUCKET[/PREFIX]",
    "https": "an S3 endpoint goes in AWS_ENDPOINT_URL; the URL here is s3://BUCKET[/PREFIX]",
    "file": "a local folder is the disk tier: LMCACHE_LOCAL_DISK",
}

_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


@dataclass(frozen=True)
class RemoteUrl:
    """A parsed remote-store URL. ``hosts`` holds ``(host, port)`` pairs with default ports filled in."""

    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    db: int | None = None  # Redis forms only (0 unless given)
    socket_path: str | None = None  # unix:// only
    service_name: str | None = None  # redis-sentinel:// only
    bucket: str | None = None  # s3:// only
    prefix: str | None = None  # s3:// only: the key prefix without leading or trailing '/'

    @property
    def kind(self) -> str:
        """The client that serves it: ``redis`` (every Redis form), ``s3`` or ``lm``."""
        return "redis" if self.scheme in REDIS_SCHEMES else self.scheme

    @property
    def tls(self) -> bool:
        """TLS named by the URL itself (``rediss://``); other forms turn it on by a setting of their own."""
        return self.scheme == "rediss"

    def redacted(self) -> str:
        """The URL in its canonical form (default ports written out), the password as ``***``."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        credentials = ""
        if self.username is not None or self.password is not None:
            user = quote(self.username or "", safe="")
            credentials = (f"{user}:{HIDDEN}" if self.password is not None else user) + "@"
        hosts = ",".join(f"{_bracket(host)}:{port}" for host, port in self.hosts)
        db = self.db or 0
        if self.scheme == "unix":
            return f"unix://{credentials}{self.socket_path}" + (f"?db={db}" if db else "")
        if self.scheme == "redis-sentinel":
            return f"redis-sentinel://{credentials}{hosts}/{self.service_name}" + (f"?db={db}" if db else "")
        if self.scheme in ("redis", "rediss"):
            return f"{self.scheme}://{credentials}{hosts}" + (f"/{db}" if db else "")
        return f"{self.scheme}://{credentials}{hosts}"

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        if fields["password"] is not None:
            fields["password"] = HIDDEN
        shown = ", ".join(f"{name}={value!r}" for name, value in fields.items() if value not in (None, ()))
        return f"RemoteUrl({shown})"


def parse_remote_url(text: str) -> RemoteUrl:
    """Parse ``text`` as one of the accepted forms; raise ValueError saying what is wrong and what is accepted."""
    scheme, rest = _split_scheme(text)
    if scheme not in SCHEMES:
        instead = f" ({_INSTEAD[scheme]})" if scheme in _INSTEAD else ""
        raise ValueError(
            f"{scheme}:// is not a remote store here{instead}; expected one of these schemes: "
            + ("; ".join(FORMS.values()))
        )
    authority, path, query = _split_rest(rest, scheme)
    username, password, hostports = _split_credentials(authority, scheme)
    options = _parse_query(query, scheme)

    if scheme == "s3":
        return _s3(hostports, path)
    if scheme == "unix":
        if hostports:
            raise ValueError(f"expected {FORMS['unix']}: the socket path must be absolute (three slashes)")
        if path in ("", "/"):
            raise ValueError(f"expected {FORMS['unix']}: the socket path is missing")
        return RemoteUrl(
            "unix", username=username, password=password, db=options.get("db", 0), socket_path=unquote(path)
        )

    hosts = _parse_hosts(hostports, scheme)
    if scheme == "lm":
        if path not in ("", "/"):
            raise ValueError(f"expected {FORMS['lm']}: nothing may follow the port")
        return RemoteUrl("lm", hosts)
    if scheme == "redis-cluster":
        if path not in ("", "/") or "db" in options:
            raise ValueError(f"expected {FORMS['redis-cluster']}: Redis Cluster has only database 0")
        return RemoteUrl(scheme, hosts, username, password, db=0)
    if scheme == "redis-sentinel":
        service_name = unquote(path[1:]) if path not in ("", "/") else DEFAULT_SERVICE_NAME
        if not _SERVICE_NAME.fullmatch(service_name):
            raise ValueError(
                f"expected {FORMS['redis-sentinel']}: the service name {service_name!r} may hold letters, "
                "digits and '_.:-' only (the database is ?db=N)"
            )
        return RemoteUrl(scheme, hosts, username, password, options.get("db", 0), service_name=service_name)
    return RemoteUrl(scheme, hosts, username, password, _redis_db(path, options, scheme))


def parse_redis_url(text: str) -> RemoteUrl:
    """A Redis address (``LMCACHE_LOOKUP_URL``): any Redis form, or plain ``HOST[:PORT]`` for ``redis://HOST[:PORT]``."""
    accepted = "HOST:PORT, " + ", ".join(FORMS[scheme] for scheme in REDIS_SCHEMES)
    if "://" not in text:
        text = "redis://" + text
    scheme, _ = _split_scheme(text)
    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"expected a Redis address: {accepted}")
    return parse_remote_url(text)


def is_service_name(text: str) -> bool:
    """Whether ``text`` may name a Sentinel service (the URL's /SERVICE_NAME, or a setting of its own)."""
    return bool(_SERVICE_NAME.fullmatch(text))


def redacted_url(text: str) -> str:
    """``text`` with its password replaced by ``***``: what logs and printed configuration show.

    Works on any text: a valid URL keeps its form (only the password changes); in anything else,
    everything after the first ``:`` of whatever precedes the last ``@`` is hidden, so that a
    malformed URL in an error message does not print a password either.
    """
    scheme_end = text.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    rest = text[start:]
    if "@" not in rest:
        return text
    try:
        parsed = parse_remote_url(text)
    except ValueError:
        at = rest.rfind("@")
    else:
        if parsed.password is None:
            return text  # an '@' in an S3 prefix, or a user name alone: nothing secret
        at = rest[: _authority_end(rest)].rfind("@")
    user, colon, _ = rest[:at].partition(":")
    return text[:start] + (f"{user}:{HIDDEN}" if colon else HIDDEN) + rest[at:]


# ---------------------------------------------------------------- pieces


def _split_scheme(text: str) -> tuple[str, str]:
    scheme, sep, rest = text.strip().partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError("expected a URL: one of " + "; ".join(FORMS.values()))
    return scheme.lower(), rest


def _authority_end(rest: str) -> int:
    return min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))


def _split_rest(rest: str, scheme: str) -> tuple[str, str, str]:
    """``(authority, path, query)``; refuses what would make the credentials ambiguous."""
    end = _authority_end(rest)
    authority, tail = rest[:end], rest[end:]
    if "#" in tail:
        raise ValueError("a URL fragment ('#...') means nothing here; percent-encode '#' in a password as %23")
    if "@" in tail and scheme != "s3":
        raise ValueError(
            "an '@' after the host: percent-encode '/', '?', '#' and '@' in a password (%2F, %3F, %23, %40)"
        )
    path, _, query = tail.partition("?")
    return authority, path, query


def _split_credentials(authority: str, scheme: str) -> tuple[str | None, str | None, str]:
    """``(username, password, host part)``. Messages never quote the credentials."""
    userinfo, at, hostports = authority.rpartition("@")
    if not at:
        return None, None, authority
    if scheme == "s3":
        raise ValueError(
            "s3:// takes no credentials in the URL; they come from the AWS environment "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, an IAM role)"
        )
    if scheme == "lm":
        raise ValueError("lm:// takes no credentials: LMCache's cache server has no authentication")
    username, colon, password = userinfo.partition(":")
    if not colon:
        raise ValueError(
            "credentials must be USER:PASSWORD@ or :PASSWORD@ (a password for the default user); "
            "percent-encode ':' and '@' inside them"
        )
    return unquote(username) or None, unquote(password) or None, hostports


def _parse_query(query: str, scheme: str) -> dict[str, int]:
    if not query:
        return {}
    allowed = scheme in REDIS_SCHEMES  # redis-cluster too, so that its ?db=N gets its own message
    options: dict[str, int] = {}
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if name != "db" or not allowed:
            known = "db=N is the only option" if allowed else f"{scheme}:// takes no options"
            raise ValueError(f"unknown option {name!r} after '?': {known}")
        if name in options:
            raise ValueError("db is given twice")
        options[name] = _db_number(value if eq else "")
    return options


def _db_number(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the database must be a number of 0 or more (e.g. /0 or ?db=0), not {text!r}")
    return int(text)


def _redis_db(path: str, options: dict[str, int], scheme: str) -> int:
    if path in ("", "/"):
        return options.get("db", 0)
    if "db" in options:
        raise ValueError("the database is given twice: as /DB and as ?db=N")
    if not path[1:].isdigit():
        raise ValueError(f"expected {FORMS[scheme]}: the path is the database number (e.g. /0)")
    return int(path[1:])


def _parse_hosts(hostports: str, scheme: str) -> tuple[tuple[str, int], ...]:
    if not hostports:
        raise ValueError(f"expected {FORMS[scheme]}; the host is missing")
    parts = hostports.split(",")
    if len(parts) > 1 and scheme not in ("redis-sentinel", "redis-cluster"):
        raise ValueError(
            f"{scheme}:// takes one host; several are redis-sentinel://HOST:PORT,HOST:PORT or redis-cluster://..."
        )
    return tuple(_parse_host(part, scheme) for part in parts)


def _parse_host(text: str, scheme: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:6379")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        port_text = port_text[1:] if port_text else None
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
        if not host:
            raise ValueError(f"expected {FORMS[scheme]}; the host is missing")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or address (an IPv6 address goes in brackets)")
    if port_text is None:
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"expected {FORMS[scheme]}: the port of {host} is required")
        return host, DEFAULT_PORTS[scheme]
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535, not {port_text!r}")
    return host, int(port_text)


def _s3(bucket: str, path: str) -> RemoteUrl:
    if not bucket:
        raise ValueError(f"expected {FORMS['s3']}; the bucket is missing")
    if ":" in bucket:
        raise ValueError("s3:// takes a bucket, not HOST:PORT; the endpoint goes in AWS_ENDPOINT_URL")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"{bucket!r} is not an S3 bucket name: 3 to 63 lower-case letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    return RemoteUrl("s3", bucket=bucket, prefix=unquote(path).strip("/") or None)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
