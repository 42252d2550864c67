"""Where peers listen and how the registry names them.

* A worker's **rank** among an instance's workers is ``tp_rank + tp_size * pp_rank``
  (:func:`worker_rank`); the worker of rank *r* serves peers on the port of
  ``LMCACHE_DISTRIBUTED_URL`` plus *r*, so an instance of *W* workers uses *W* consecutive ports.
  A rank fetches from the same rank of a peer: the namespace covers TP and PP size, so two
  instances that share chunks have the same ranks.
* An instance is **advertised** at the address of its rank 0: the host of
  ``LMCACHE_DISTRIBUTED_URL``, or ``LMCACHE_P2P_ADVERTISE_HOST`` when that host is a wildcard
  (``0.0.0.0``, ``::``), which binds every interface but names none a peer could dial.
* In the registry an instance is an :class:`InstanceId`, ``HOST:PORT/INCARNATION``: the advertised
  address and eight random hex digits drawn when the instance starts, so an instance restarted at
  the same address never inherits the entries of the one that died there.

Everything read back from the registry is parsed with :meth:`InstanceId.parse`, which returns
``None`` for anything it did not write (a planted or truncated member is ignored, never dialled).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]"})
MAX_PORT = 65535
MAX_INSTANCE_ID_CHARS = 300  # a host name (253) with port and incarnation; longer members are not ours

_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
_INCARNATION = re.compile(r"[0-9a-f]{8}")


def worker_rank(tp_rank: int, tp_size: int, pp_rank: int = 0) -> int:
    """The rank of a worker among its instance's workers; its peer server listens on port + this."""
    if not (0 <= tp_rank < tp_size and pp_rank >= 0):
        raise ValueError(f"tp_rank {tp_rank} of tp_size {tp_size}, pp_rank {pp_rank}: not a worker")
    return tp_rank + tp_size * pp_rank


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` means every interface (no peer can dial it)."""
    return host in WILDCARD_HOSTS


@dataclass(frozen=True)
class PeerAddress:
    """A host (a name, an IPv4 or a bare IPv6 address) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def for_rank(self, rank: int) -> PeerAddress:
        """The address of the worker of ``rank`` of the instance whose rank 0 is here."""
        port = self.port + rank
        if rank < 0 or port > MAX_PORT:
            raise ValueError(
                f"LMCACHE_DISTRIBUTED_URL port {self.port} + worker rank {rank} = {port}: past {MAX_PORT}; "
                "choose a port that leaves room for every worker"
            )
        return PeerAddress(self.host, port)


def parse_address(text: str) -> PeerAddress:
    """``HOST:PORT`` (an IPv6 address in brackets) as a :class:`PeerAddress`; ``ValueError`` otherwise."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not _HOST_NAME.fullmatch(host):
            raise ValueError(f"{text!r}: expected HOST:PORT")
    if not port_text.isdigit() or not 1 <= int(port_text) <= MAX_PORT:
        raise ValueError(f"{text!r}: the port must be a number from 1 to {MAX_PORT}")
    return PeerAddress(host, int(port_text))


def bind_address(distributed_url: str, rank: int) -> PeerAddress:
    """Where the worker of ``rank`` listens: ``LMCACHE_DISTRIBUTED_URL`` (a wildcard host included) + rank."""
    return parse_address(distributed_url.split("://", 1)[-1]).for_rank(rank)


def advertised_address(distributed_url: str, advertise_host: str | None) -> PeerAddress:
    """The address peers dial for this instance's rank 0."""
    bound = parse_address(distributed_url.split("://", 1)[-1])
    host = advertise_host or bound.host
    if is_wildcard(host):
        raise ValueError(
            f"LMCACHE_DISTRIBUTED_URL={distributed_url!r} binds every interface: set LMCACHE_P2P_ADVERTISE_HOST "
            "to the address peers should dial (e.g. the pod IP)"
        )
    return PeerAddress(host.strip("[]"), bound.port)


@dataclass(frozen=True)
class InstanceId:
    """One running instance in the registry: its advertised address and the incarnation it drew at start."""

    address: PeerAddress
    incarnation: str

    def __str__(self) -> str:
        return f"{self.address}/{self.incarnation}"

    @classmethod
    def new(cls, address: PeerAddress) -> InstanceId:
        return cls(address, secrets.token_hex(4))

    @classmethod
    def parse(cls, text: str | bytes) -> InstanceId | None:
        """The instance a registry member names, or ``None`` for anything this library did not write."""
        try:
            text = text.decode("ascii") if isinstance(text, bytes) else text
        except UnicodeDecodeError:
            return None
        if len(text) > MAX_INSTANCE_ID_CHARS:
            return None
        address, slash, incarnation = text.rpartition("/")
        if not slash or not _INCARNATION.fullmatch(incarnation):
            return None
        try:
            return cls(parse_address(address), incarnation)
        except ValueError:
            return None
