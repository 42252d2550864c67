"""``lmcache-connector``: the operator's command-line tool.

* ``config`` prints the configuration an engine started here would use (defaults, the file named by
  ``LMCACHE_CONFIG_FILE``, ``LMCACHE_*`` variables) and fails on any invalid setting, so a Helm init
  container or a CI job can check a deployment before it starts; ``--check-remote`` also pings the
  remote store and the P2P lookup registry;
* ``disk stats|verify|clear`` inspect and clean a disk-tier folder offline (:mod:`lmcache_connector.tiers.disk.folder`).

It works without vLLM, torch or a GPU: it imports only the configuration loader and the disk
tier's file format (and its lock-file name; the Redis client only for ``--check-remote``). Exit
codes: 0 all good; 1 a check found a problem (damaged chunk files left in place, a removal refused
or failed, a remote store unreachable); 2 invalid configuration or
command line (bad setting, missing folder, ``--yes`` needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from lmcache_connector._version import __version__
from lmcache_connector.config import (
    CONFIG_FILE_ENV,
    EXTRA_CONFIG_PREFIX,
    SETTINGS,
    ConfigError,
    LMCacheConfig,
    check_chunk_size,
    describe,
    env_name,
    load_config,
)
from lmcache_connector.tiers.disk import folder as disk_folder

OK, FOUND_PROBLEMS, INVALID = 0, 1, 2

EXIT_CODES = """exit codes:
  0  all good
  1  a check found a problem: damaged chunk files left in place, a removal declined or failed,
     a remote store that does not answer (--check-remote)
  2  invalid configuration or command line: a bad setting, a missing folder, --yes needed"""


class _UsageError(Exception):
    """Bad input from the user: printed as ``lmcache-connector: error: ...``, exit code 2."""


# ---------------------------------------------------------------- config


def _settings_help() -> str:
    lines = ["settings (environment variable, or the lower-case key in the LMCACHE_CONFIG_FILE YAML):"]
    for key, setting in SETTINGS.items():
        lines.append(f"  {env_name(key):32} {setting.help}")
    return "\n".join(lines) + "\n\n" + EXIT_CODES


class _Collect(logging.Handler):
    """Keeps the loader's warnings (unknown variables, with the closest known name) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_with_warnings(env: dict[str, str], extra: dict[str, Any]) -> tuple[Any, list[str], list[str]]:
    """``(config or None, problems, warnings)``."""
    logger = logging.getLogger("lmcache_connector")
    collect = _Collect()
    logger.addHandler(collect)
    propagate, logger.propagate = logger.propagate, False
    try:
        return load_config(env, extra), [], collect.messages
    except ConfigError as exc:
        return None, exc.problems, collect.messages
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate


def _sources(env: dict[str, str], extra: dict[str, Any]) -> dict[str, str]:
    """Where each setting's value came from, highest priority first (as the loader applies them)."""
    in_file: set[str] = set()
    path = env.get(CONFIG_FILE_ENV)
    if path:
        try:
            import yaml

            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
            in_file = {str(k) for k in data} if isinstance(data, dict) else set()
        except Exception:
            pass  # the loader has already reported why the file is unusable
    extra_keys = {k[len(EXTRA_CONFIG_PREFIX) :] if k.startswith(EXTRA_CONFIG_PREFIX) else k for k in extra}
    sources = {}
    for key in SETTINGS:
        if key in extra_keys:
            sources[key] = "kv_connector_extra_config"
        elif env_name(key) in env:
            sources[key] = "environment"
        elif key in in_file:
            sources[key] = f"file {path}"
        else:
            sources[key] = "default"
    return sources


def _show(key: str, value: Any, config: LMCacheConfig) -> str:
    if key == "remote_lookup_timeout_ms" and value is None and (config.parsed_remote_url or config.enable_p2p):
        # Unset picks the store's own default: show the one the remote tier (and P2P registry) get.
        return f"{config.remote_lookup_timeout_s * 1000:g} (this store's default)"
    if value is None:
        return "(unset)"
    if key.startswith("max_") and key.endswith("_size"):
        return f"{value:g} GB"
    return str(value)


def cmd_config(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    extra = _extra_config(args.kv_transfer_config)
    config, problems, warnings = _load_with_warnings(env, extra)
    if config is not None and args.block_size is not None:
        try:
            check_chunk_size(config, args.block_size)
        except ConfigError as exc:
            problems = exc.problems

    checks = _check_stores(config) if args.check_remote and not problems else []
    unreachable = [line for ok, line in checks if not ok]

    if args.json:
        report: dict[str, Any] = {"valid": not problems, "problems": problems, "warnings": warnings}
        if not problems:
            report.update(config=config.redacted_dict(), sources=_sources(env, extra), summary=describe(config))
        if args.check_remote:
            report["stores"] = [{"reachable": ok, "message": line} for ok, line in checks]
        print(json.dumps(report, indent=2))
        return INVALID if problems else FOUND_PROBLEMS if unreachable else OK

    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    if problems:
        print(f"invalid lmcache_connector configuration ({len(problems)} problem(s)):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return INVALID

    sources = _sources(env, extra)
    rows = [(env_name(key), _show(key, value, config), sources[key]) for key, value in config.redacted_dict().items()]
    widths = [max(len(row[i]) for row in [("VARIABLE", "VALUE", "SOURCE"), *rows]) for i in range(3)]
    for row in [("VARIABLE", "VALUE", "SOURCE"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print()
    print(describe(config))
    for tier in config.unavailable_tiers():
        print(f"note: {tier} is not available in this version; an engine runs without it")
    for ok, line in checks:
        print(line, file=sys.stdout if ok else sys.stderr)
    return FOUND_PROBLEMS if unreachable else OK


def _check_stores(config) -> list[tuple[bool, str]]:
    """``--check-remote``: ping the remote store and the P2P lookup registry (Redis) once each.
    ``(reachable, line)`` per store; the lines never show a password."""
    from lmcache_connector.tiers.remote.client import RemoteError, connect_remote, served

    stores = []
    if config.remote_url:
        stores.append(("remote tier (LMCACHE_REMOTE_URL)", config.parsed_remote_url))
    if config.enable_p2p and config.lookup_url:
        stores.append(("P2P lookup registry (LMCACHE_LOOKUP_URL)", config.parsed_lookup_url))
    if not stores:
        return [(True, "check-remote: no remote store or lookup registry is configured")]
    results = []
    for what, url in stores:
        if not served(url):
            results.append((True, f"check-remote: {what} {url}: not checked (not served in this version)"))
            continue
        try:
            client = connect_remote(url, config)
            try:
                client.ping()
                used, bound = client.memory()
            finally:
                client.close()
        except (RemoteError, ImportError, ValueError) as exc:
            results.append((False, f"check-remote: {what} {url} is not usable: {exc}"))
            continue
        room = f" ({_human(used)} used of {_human(bound)})" if bound else f" ({_human(used)} used)" if used else ""
        results.append((True, f"check-remote: {what} {url} answers{room}"))
    return results


def _extra_config(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise _UsageError(f"--kv-transfer-config: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _UsageError("--kv-transfer-config: expected a JSON object, as given to vLLM") from None
    extra = value.get("kv_connector_extra_config") or {}
    if not isinstance(extra, dict):
        raise _UsageError("--kv-transfer-config: kv_connector_extra_config must be a JSON object")
    return extra


# ---------------------------------------------------------------- disk


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _folder(path: str | None) -> str:
    """The folder to work on: PATH, or the configured LMCACHE_LOCAL_DISK."""
    if path is None:
        config, problems, _ = _load_with_warnings(dict(os.environ), {})
        if problems:
            raise _UsageError("cannot read LMCACHE_LOCAL_DISK from the configuration:\n  - " + "\n  - ".join(problems))
        if not config.local_disk:
            raise _UsageError("no folder: give PATH, or set LMCACHE_LOCAL_DISK")
        path = config.local_disk
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not os.path.exists(path):
        raise _UsageError(f"PATH {path!r}: no such folder")
    if not os.path.isdir(path):
        raise _UsageError(f"PATH {path!r}: not a folder (expected the disk tier's folder, LMCACHE_LOCAL_DISK)")
    return path


def cmd_disk_stats(args: argparse.Namespace) -> int:
    stats = disk_folder.folder_stats(_folder(args.path))
    if args.json:
        report = {
            "folder": stats.folder,
            "chunk_files": stats.chunk_files,
            "chunk_bytes": stats.chunk_bytes,
            "namespaces": [
                {**vars(ns), "ranks": sorted(ns.ranks)}
                for ns in sorted(stats.namespaces.values(), key=lambda n: -n.bytes)
            ],
            "temp_files": stats.temp_files,
            "temp_bytes": stats.temp_bytes,
            "unreadable_files": [vars(b) for b in stats.unreadable],
            "other_version_files": stats.other_version_files,
            "other_version_bytes": stats.other_version_bytes,
            "other_files": stats.other_files,
            "other_bytes": stats.other_bytes,
        }
        print(json.dumps(report, indent=2))
        return OK

    print(f"{stats.folder}: {stats.chunk_files} chunk files, {_human(stats.chunk_bytes)}")
    if stats.namespaces:
        print(f"  {'namespace':16}  {'chunks':>7}  {'size':>10}  ranks, model")
        for ns in sorted(stats.namespaces.values(), key=lambda n: -n.bytes):
            print(f"  {ns.namespace:16}  {ns.chunk_files:7}  {_human(ns.bytes):>10}  {_namespace_line(ns)}")
    print(f"temporary files: {stats.temp_files} ({_human(stats.temp_bytes)}): writes in progress or left by a crash")
    if stats.unreadable:
        print(f"unreadable chunk files: {len(stats.unreadable)} (header or size wrong; see `disk verify`)")
        for bad in stats.unreadable:
            print(f"  {bad.problem:9}  {bad.name}: {bad.reason}")
    if stats.other_version_files:
        print(
            f"chunk files of another format version: {stats.other_version_files} "
            f"({_human(stats.other_version_bytes)}): not read by this version"
        )
    print(f"other files: {stats.other_files} ({_human(stats.other_bytes)}): not this library's, never touched")
    return OK


def _namespace_line(ns: disk_folder.NamespaceSummary) -> str:
    ranks = ",".join(sorted(ns.ranks))
    info = ns.description
    if isinstance(info, dict):
        keys = ("model", "kv_dtype", "kv_layout", "chunk_size")
        info = " ".join(f"{k}={info[k]}" for k in keys if k in info)
    return f"{ranks}  {info}".rstrip()


def cmd_disk_verify(args: argparse.Namespace) -> int:
    result = disk_folder.verify_folder(_folder(args.path), delete=args.delete)
    if args.json:
        report = {**vars(result), "bad": [vars(b) for b in result.bad], "remaining_bad": result.remaining_bad}
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{result.folder}: checked {result.checked} chunk files: {result.intact} intact "
            f"({_human(result.intact_bytes)}), {len(result.bad)} damaged"
        )
        for bad in result.bad:
            note = "  [deleted]" if bad.deleted else ("  [could not delete]" if args.delete else "")
            print(f"  {bad.problem:9}  {bad.name}: {bad.reason}{note}")
        if result.temp_files:
            print(f"not checked: {result.temp_files} temporary files (writes in progress or left by a crash)")
        if result.other_version_files:
            print(f"not checked: {result.other_version_files} chunk files of another format version")
        if result.remaining_bad and not args.delete:
            print("an engine treats damaged files as misses; `--delete` removes them")
    return FOUND_PROBLEMS if result.remaining_bad else OK


def cmd_disk_clear(args: argparse.Namespace) -> int:
    folder = _folder(args.path)
    namespace = (args.namespace or "").lower()
    if namespace and (len(namespace) > 16 or any(c not in "0123456789abcdef" for c in namespace)):
        raise _UsageError(
            f"--namespace {args.namespace!r}: expected up to 16 hex digits, the start of the chunk file names "
            "(`disk stats` lists them; the engine's start-up log shows the first 12)"
        )
    entries = disk_folder.files_to_clear(folder, namespace or None)
    scope = f" of namespace {namespace}" if namespace else ""
    if not entries:
        print(f"nothing to remove: no files of lmcache_connector{scope} in {folder}")
        return OK
    what = f"{_files(len(entries))} of lmcache_connector{scope} ({_human(sum(e.size for e in entries))}) from {folder}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise _UsageError(f"would remove {what}; add --yes to confirm (no terminal to ask on)")
        answer = input(f"remove {what}? other files stay. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return FOUND_PROBLEMS
    removed, removed_bytes, errors = disk_folder.remove_files(entries)
    print(f"removed {_files(removed)} ({_human(removed_bytes)}) from {folder}; other files were left alone")
    for error in errors:
        print(f"could not remove {error}", file=sys.stderr)
    return FOUND_PROBLEMS if errors else OK


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lmcache-connector",
        description="Check the configuration of lmcache_connector and look after its disk-tier folder. "
        "Needs neither vLLM nor a GPU.",
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"lmcache-connector {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser(
        "config",
        help="print the effective configuration; exit 2 on any invalid setting",
        description="Print the configuration an engine started with this environment would use: built-in "
        f"defaults < the YAML file named by {CONFIG_FILE_ENV} < LMCACHE_* variables < vLLM's "
        "kv_connector_extra_config. Every invalid setting is listed with its variable and the fix, and the "
        "exit code is 2, so an init container or a CI job can stop a bad deployment before it starts.",
        epilog=_settings_help(),
        formatter_class=fmt,
    )
    config.add_argument("--json", action="store_true", help="print a JSON report instead of a table")
    config.add_argument(
        "--kv-transfer-config",
        metavar="JSON",
        help="the JSON given to vLLM's --kv-transfer-config, to check its kv_connector_extra_config too",
    )
    config.add_argument(
        "--block-size", type=int, metavar="N", help="vLLM's --block-size, to check that the chunk size is a multiple"
    )
    config.add_argument(
        "--check-remote",
        action="store_true",
        help="also connect to the remote store and the P2P lookup registry; exit 1 when one is unreachable "
        "or refuses the credentials (for an init container)",
    )
    config.set_defaults(run=cmd_config)

    disk = commands.add_parser(
        "disk",
        help="inspect, verify or clear a disk-tier folder",
        description="Work on a disk-tier folder offline or next to a running engine. Only this library's "
        "files (*.lmc.safetensors chunks, *.lmc.tmp temporary files) are ever read or removed; other files "
        "in the folder are counted and left alone. PATH defaults to LMCACHE_LOCAL_DISK.",
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    disk_commands = disk.add_subparsers(dest="disk_command", metavar="COMMAND", required=True)
    path_help = "the disk tier's folder (a path or file:// URL); default: LMCACHE_LOCAL_DISK"

    stats = disk_commands.add_parser(
        "stats",
        help="chunk files, bytes, namespaces, temporary and other files",
        description="Count chunk files and bytes, per namespace (with the model they belong to), temporary "
        "files, chunk files whose header or size is wrong, and other files. Reads headers only.",
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    stats.add_argument("path", nargs="?", metavar="PATH", help=path_help)
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    stats.set_defaults(run=cmd_disk_stats)

    verify = disk_commands.add_parser(
        "verify",
        help="read every chunk and check it; exit 1 if any is damaged",
        description="Read every chunk file in full and check its header, its size and its checksum. "
        "Lists each corrupt or truncated file. Exit 1 if damaged files remain (with --delete: if any "
        "could not be removed).",
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    verify.add_argument("path", nargs="?", metavar="PATH", help=path_help)
    verify.add_argument("--delete", action="store_true", help="remove the damaged files")
    verify.add_argument("--json", action="store_true", help="print JSON instead of text")
    verify.set_defaults(run=cmd_disk_verify)

    clear = disk_commands.add_parser(
        "clear",
        help="remove this library's files (never other files)",
        description="Remove this library's chunk and temporary files from the folder; other files stay. "
        "Asks first on a terminal; elsewhere it needs --yes. An engine using the folder treats removed "
        "chunks as misses.",
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    clear.add_argument("path", nargs="?", metavar="PATH", help=path_help)
    clear.add_argument(
        "--namespace",
        metavar="HEX",
        help="only files of this namespace: the first hex digits of the file names, as `disk stats` lists them",
    )
    clear.add_argument("--yes", "-y", action="store_true", help="do not ask")
    clear.set_defaults(run=cmd_disk_clear)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except _UsageError as exc:
        parser.exit(INVALID, f"{parser.prog}: error: {exc}\n")
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        parser.exit(INVALID, f"{parser.prog}: error: {where}{exc.strerror or exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
