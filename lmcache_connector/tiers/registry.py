"""Which secondary media exist: the built-in ones, and media registered from outside the package.

A medium is a :class:`~lmcache_connector.tiers.base.Medium`; each engine process (the scheduler
and every worker) builds the same list and asks each medium for its catalog or store, which is
``None`` when the configuration does not enable it. Two ways to add one without editing this
package, both imported in every engine process like the built-in media:

* an entry point in the group ``lmcache_connector.tiers`` whose object is a ``Medium`` class or a
  zero-argument factory returning a ``Medium``;
* ``LMCACHE_EXTRA_TIERS=module:factory[,module:factory...]``, the same objects named by import path.

A medium that fails to load is a start-up error naming it (a tier the operator asked for must not
silently vanish).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from lmcache_connector.tiers.base import Medium

ENTRY_POINT_GROUP = "lmcache_connector.tiers"
EXTRA_TIERS_ENV = "LMCACHE_EXTRA_TIERS"


def builtin_media() -> list[Medium]:
    from lmcache_connector.tiers.disk.medium import DiskMedium
    from lmcache_connector.tiers.peer.medium import PeerMedium
    from lmcache_connector.tiers.remote.medium import RemoteMedium

    return [DiskMedium(), PeerMedium(), RemoteMedium()]


def media(extra_tiers: str | None = None) -> list[Medium]:
    """Every medium: built-in, then entry points, then ``extra_tiers`` (the ``LMCACHE_EXTRA_TIERS``
    setting); names are unique."""
    found = builtin_media()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.append(_instantiate(ep.load(), f"entry point {ep.name} ({ep.value})"))
    for spec in filter(None, (s.strip() for s in (extra_tiers or "").split(","))):
        found.append(_instantiate(_import(spec), f"{EXTRA_TIERS_ENV}={spec}"))
    names = [m.name for m in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two tiers are named {', '.join(duplicates)}: each medium needs its own name")
    return found


def _import(spec: str):
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{EXTRA_TIERS_ENV}={spec!r}: expected module:factory, e.g. my_tiers:make_medium")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{EXTRA_TIERS_ENV}={spec!r}: cannot import it ({exc})") from exc


def _instantiate(obj, source: str) -> Medium:
    medium = obj() if callable(obj) and not isinstance(obj, Medium) else obj
    if not isinstance(medium, Medium):
        raise ValueError(f"{source} gave {medium!r}, not a lmcache_connector.tiers.base.Medium")
    return medium
