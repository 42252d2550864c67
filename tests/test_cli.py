"""``lmcache-connector``, run as the installed console script, the way an operator or an init container runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache_connector.tiers.disk import format as disk_format
from lmcache_connector.tiers.disk.folder import write_chunk
from lmcache_connector.tiers.disk.format import ChunkHeader

SCRIPT = Path(sys.executable).with_name("lmcache-connector")
NS_A, NS_B = "ab" * 16, "cd" * 16


def run(*args: str, env: dict[str, str] | None = None, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """The console script with only the given LMCACHE_* variables set (none of the caller's)."""
    assert SCRIPT.exists(), f"{SCRIPT} is missing: pip install -e . creates it"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    return subprocess.run(
        [str(SCRIPT), *args], env={**clean, **(env or {})}, stdin=stdin, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command", [[], ["config"], ["disk"], ["disk", "stats"], ["disk", "verify"], ["disk", "clear"]], ids=" ".join
)
def test_every_command_has_help_with_its_exit_codes(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: lmcache-connector" in result.stdout
    assert "exit codes:" in result.stdout


def test_config_help_lists_every_setting():
    out = run("config", "--help").stdout
    for variable in ("LMCACHE_CHUNK_SIZE", "LMCACHE_MAX_LOCAL_CPU_SIZE", "LMCACHE_LOCAL_DISK", "LMCACHE_REMOTE_URL"):
        assert variable in out


# ---------------------------------------------------------------- config


def test_config_prints_the_effective_configuration_and_where_each_value_came_from(tmp_path):
    config_file = tmp_path / "lmcache.yaml"
    config_file.write_text("chunk_size: 128\nmax_local_cpu_size: 2\n")
    env = {"LMCACHE_CONFIG_FILE": str(config_file), "LMCACHE_CHUNK_SIZE": "512"}  # env overrides the file

    result = run("config", env=env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith("LMCACHE_")}
    assert rows["LMCACHE_CHUNK_SIZE"] == ["512", "environment"]
    assert rows["LMCACHE_MAX_LOCAL_CPU_SIZE"] == ["2", "GB", "file", str(config_file)]
    assert rows["LMCACHE_LOCAL_CPU"] == ["True", "default"]
    assert "tiers: memory 2 GB; chunk_size=512" in result.stdout

    # A setting whose default depends on the store shows the value that store gets.
    for url, shown in (("s3://bucket/cache", "1000"), ("redis://127.0.0.1:6379", "100")):
        out = run("config", env={**env, "LMCACHE_REMOTE_URL": url}).stdout
        timeout = next(line for line in out.splitlines() if line.startswith("LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS"))
        assert timeout.split()[1:] == [shown, "(this", "store's", "default)", "default"], timeout

    report = json.loads(run("config", "--json", env=env).stdout)
    assert report["valid"] is True
    assert report["config"]["chunk_size"] == 512
    assert report["config"]["max_local_cpu_size"] == 2.0
    assert report["sources"]["chunk_size"] == "environment"


def test_config_checks_vllms_extra_config_and_block_size_too():
    extra = json.dumps({"kv_connector": "LMCacheConnector", "kv_connector_extra_config": {"lmcache.chunk_size": 96}})
    result = run("config", "--json", "--kv-transfer-config", extra, "--block-size", "32")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["config"]["chunk_size"] == 96
    assert report["sources"]["chunk_size"] == "kv_connector_extra_config"

    result = run("config", "--block-size", "64", env={"LMCACHE_CHUNK_SIZE": "96"})
    assert result.returncode == 2
    assert "LMCACHE_CHUNK_SIZE=96: expected a multiple of vLLM's block size 64" in result.stderr


BAD_VALUES = {
    "not a number": ("LMCACHE_CHUNK_SIZE", "abc"),
    "zero tokens": ("LMCACHE_CHUNK_SIZE", "0"),
    "not a boolean": ("LMCACHE_LOCAL_CPU", "maybe"),
    "not a size": ("LMCACHE_MAX_LOCAL_CPU_SIZE", "ten"),
    "negative size": ("LMCACHE_MAX_LOCAL_DISK_SIZE", "-1"),
    "relative folder": ("LMCACHE_LOCAL_DISK", "cache/here"),
    "remote scheme": ("LMCACHE_REMOTE_URL", "http://cache:80"),
    "unknown choice": ("LMCACHE_REMOTE_SERDE", "zip"),
    "port out of range": ("LMCACHE_LOOKUP_URL", "redis://registry:99999"),
    "no port": ("LMCACHE_DISTRIBUTED_URL", "10.0.0.5"),
    "zero seconds": ("LMCACHE_BLOCKING_TIMEOUT_SECS", "0"),
    "log level": ("LMCACHE_LOG_LEVEL", "LOUD"),
    "policy": ("LMCACHE_LOAD_FAILURE_POLICY", "retry"),
}


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_config_rejects_a_bad_value_naming_its_variable(kind):
    variable, bad = BAD_VALUES[kind]
    result = run("config", env={variable: bad})
    assert result.returncode == 2
    assert f"{variable}={bad!r}: " in result.stderr  # the variable, the value, then what is accepted
    assert result.stdout == ""  # no table that could pass for a valid configuration

    report = json.loads(run("config", "--json", env={variable: bad}).stdout)
    assert report["valid"] is False and report["problems"][0].startswith(f"{variable}=")


def test_config_rejects_settings_that_need_another_one():
    result = run("config", env={"LMCACHE_LOCAL_DISK": "/var/cache/lmcache", "LMCACHE_ENABLE_P2P": "true"})
    assert result.returncode == 2
    assert "LMCACHE_LOCAL_DISK='/var/cache/lmcache' needs LMCACHE_MAX_LOCAL_DISK_SIZE" in result.stderr
    assert "LMCACHE_ENABLE_P2P=True needs LMCACHE_LOOKUP_URL" in result.stderr
    assert "LMCACHE_ENABLE_P2P=True needs LMCACHE_DISTRIBUTED_URL" in result.stderr


def test_config_lists_every_problem_at_once():
    result = run("config", env={"LMCACHE_CHUNK_SIZE": "-5", "LMCACHE_LOCAL_CPU": "perhaps"})
    assert result.returncode == 2
    assert "2 problem(s)" in result.stderr
    assert "LMCACHE_CHUNK_SIZE" in result.stderr and "LMCACHE_LOCAL_CPU" in result.stderr


def test_config_rejects_a_bad_config_file(tmp_path):
    missing = run("config", env={"LMCACHE_CONFIG_FILE": str(tmp_path / "nope.yaml")})
    assert missing.returncode == 2 and "LMCACHE_CONFIG_FILE=" in missing.stderr and "cannot read" in missing.stderr

    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("chunk_size: lots\n")
    result = run("config", env={"LMCACHE_CONFIG_FILE": str(bad_value)})
    assert result.returncode == 2 and f"chunk_size in {bad_value}='lots'" in result.stderr


def test_config_warns_about_a_misspelled_variable_and_suggests_the_right_one():
    result = run("config", env={"LMCACHE_CHUNK_SZIE": "512"})
    assert result.returncode == 0
    assert "LMCACHE_CHUNK_SZIE" in result.stderr and "did you mean LMCACHE_CHUNK_SIZE?" in result.stderr


def test_the_tool_runs_without_vllm_or_torch():
    code = (
        "import sys; sys.modules['vllm'] = None; sys.modules['torch'] = None\n"
        "from lmcache_connector.cli import main; sys.exit(main(['config', '--json']))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    result = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["valid"] is True


# ---------------------------------------------------------------- disk


def _chunk(folder: Path, namespace: str, key: int, rank: str = "tp0pp0", info: dict | None = None) -> Path:
    header = ChunkHeader(
        key=f"{key:032x}",
        namespace=namespace,
        rank=rank,
        block_fps=(f"{key:032x}",),
        shape=(2, 2, 256),
        namespace_info=json.dumps(info or {"model": "tiny-llama", "kv_dtype": "bfloat16", "chunk_size": 64}),
    )
    write_chunk(str(folder), header, [memoryview(os.urandom(512)), memoryview(os.urandom(512))], fsync=False)
    return folder / header.file_name


FOREIGN = ["notes.txt", "model.safetensors", "backup.lmc.safetensors", "subfolder"]


@pytest.fixture
def cache_folder(tmp_path, monkeypatch) -> dict:
    """A disk-tier folder: healthy chunks of two namespaces, one corrupt, one truncated, one written
    by another format version, a temporary file, and files that are not ours (one named like a chunk)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    good = [_chunk(folder, NS_A, i) for i in range(3)] + [_chunk(folder, NS_B, 9, rank="tp1pp0")]
    corrupt = _chunk(folder, NS_A, 10)
    data = bytearray(corrupt.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit pattern in the KV bytes: only the checksum can tell
    corrupt.write_bytes(bytes(data))
    truncated = _chunk(folder, NS_A, 11)
    os.truncate(truncated, truncated.stat().st_size - 300)
    with monkeypatch.context() as patch:
        patch.setattr(disk_format, "FORMAT_VERSION", "99")
        other_version = _chunk(folder, NS_A, 13)
    temp = folder / f"{NS_A[:16]}-tp0pp0-{12:032x}.4242.deadbeef.lmc.tmp"
    temp.write_bytes(b"partial")
    (folder / "notes.txt").write_text("keep me")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "backup.lmc.safetensors").write_bytes(b"not a chunk name")
    (folder / "subfolder").mkdir()
    (folder / ".lmc.lock").touch()  # the disk tier's writers lock the folder with it
    return {
        "folder": folder,
        "good": good,
        "corrupt": corrupt,
        "truncated": truncated,
        "other_version": other_version,
        "temp": temp,
    }


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_disk_stats_counts_chunks_namespaces_and_other_files(cache_folder):
    folder = cache_folder["folder"]
    result = run("disk", "stats", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    # The corrupt file's header is fine (only verify reads the bytes); the truncated one's size is not.
    assert stats["chunk_files"] == 5
    by_ns = {ns["namespace"]: ns for ns in stats["namespaces"]}
    assert by_ns[NS_A[:16]]["chunk_files"] == 4 and by_ns[NS_B[:16]]["chunk_files"] == 1
    assert by_ns[NS_B[:16]]["ranks"] == ["tp1pp0"]
    assert by_ns[NS_A[:16]]["description"]["model"] == "tiny-llama"
    assert stats["chunk_bytes"] == sum(ns["bytes"] for ns in stats["namespaces"])
    assert stats["temp_files"] == 1
    assert stats["other_version_files"] == 1
    assert [b["name"] for b in stats["unreadable_files"]] == [cache_folder["truncated"].name]
    assert stats["other_files"] == len(FOREIGN)

    text = run("disk", "stats", str(folder)).stdout
    assert f"{folder}: 5 chunk files" in text
    assert "model=tiny-llama" in text and "other files: 4" in text


def test_disk_verify_finds_the_planted_corrupt_and_truncated_files(cache_folder):
    folder = cache_folder["folder"]
    result = run("disk", "verify", str(folder))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "checked 6 chunk files: 4 intact" in lines[0] and "2 damaged" in lines[0]
    assert any(cache_folder["corrupt"].name in line and "checksum" in line for line in lines)
    assert any(cache_folder["truncated"].name in line and "truncated" in line for line in lines)
    for good in [*cache_folder["good"], cache_folder["other_version"]]:
        assert good.name not in result.stdout
    assert "not checked: 1 chunk files of another format version" in result.stdout
    for foreign in FOREIGN:
        assert foreign not in result.stdout
    assert _names(folder) >= {cache_folder["corrupt"].name, cache_folder["truncated"].name}  # nothing removed

    report = json.loads(run("disk", "verify", str(folder), "--json").stdout)
    assert {b["name"]: b["problem"] for b in report["bad"]} == {
        cache_folder["corrupt"].name: "corrupt",
        cache_folder["truncated"].name: "truncated",
    }


def test_disk_verify_delete_removes_only_the_damaged_files(cache_folder):
    folder = cache_folder["folder"]
    before = _names(folder)
    result = run("disk", "verify", str(folder), "--delete")
    assert result.returncode == 0, result.stdout  # repaired: an init container may go on
    assert result.stdout.count("[deleted]") == 2
    # Another version's file is not damage: an engine of that version may be using it.
    assert _names(folder) == before - {cache_folder["corrupt"].name, cache_folder["truncated"].name}
    assert run("disk", "verify", str(folder)).returncode == 0


def test_disk_verify_passes_a_healthy_folder(tmp_path):
    for i in range(3):
        _chunk(tmp_path, NS_A, i)
    result = run("disk", "verify", str(tmp_path))
    assert result.returncode == 0
    assert "checked 3 chunk files: 3 intact" in result.stdout


def test_disk_clear_removes_only_this_librarys_files(cache_folder):
    folder = cache_folder["folder"]
    result = run("disk", "clear", str(folder), "--yes")
    assert result.returncode == 0, result.stderr
    assert "removed 8 files" in result.stdout
    assert _names(folder) == {*FOREIGN, ".lmc.lock"}  # an engine may hold the lock: it stays too
    assert (folder / "notes.txt").read_text() == "keep me"


def test_disk_clear_one_namespace(cache_folder):
    folder = cache_folder["folder"]
    result = run("disk", "clear", str(folder), "--namespace", NS_B[:12], "--yes")
    assert result.returncode == 0
    assert "removed 1 file " in result.stdout
    assert not any(name.startswith(NS_B[:16]) for name in _names(folder))
    assert all(good.exists() for good in cache_folder["good"] if good.name.startswith(NS_A[:16]))

    result = run("disk", "clear", str(folder), "--namespace", "not-hex", "--yes")
    assert result.returncode == 2 and "--namespace 'not-hex': expected up to 16 hex digits" in result.stderr


def test_disk_clear_needs_yes_when_it_cannot_ask(cache_folder):
    folder = cache_folder["folder"]
    before = _names(folder)
    result = run("disk", "clear", str(folder))  # stdin is not a terminal
    assert result.returncode == 2
    assert "add --yes" in result.stderr
    assert _names(folder) == before


def test_disk_commands_default_to_the_configured_folder_and_name_a_missing_one(cache_folder, tmp_path):
    env = {"LMCACHE_LOCAL_DISK": str(cache_folder["folder"]), "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}
    assert json.loads(run("disk", "stats", "--json", env=env).stdout)["folder"] == str(cache_folder["folder"])

    missing = tmp_path / "gone"
    for command in ("stats", "verify", "clear"):
        result = run("disk", command, str(missing))
        assert result.returncode == 2
        assert f"PATH {str(missing)!r}: no such folder" in result.stderr

    result = run("disk", "stats")
    assert result.returncode == 2 and "give PATH, or set LMCACHE_LOCAL_DISK" in result.stderr


def test_the_console_script_is_installed():
    assert shutil.which("lmcache-connector", path=str(SCRIPT.parent)) == str(SCRIPT)


# ---------------------------------------------------------------- config --check-remote


def test_check_remote_passes_a_reachable_store_and_fails_an_unreachable_one(tmp_path):
    import redis_servers as rs

    secret = "s3cret-pass"
    (tmp_path / "password").write_text(secret + "\n")
    with rs.redis_server(tmp_path / "redis", password=secret) as server:
        env = {"LMCACHE_REMOTE_URL": f"redis://127.0.0.1:{server.port}"}
        good = run("config", "--check-remote", env={**env, "LMCACHE_REMOTE_PASSWORD_FILE": str(tmp_path / "password")})
        assert good.returncode == 0, good.stderr
        assert "remote tier (LMCACHE_REMOTE_URL) redis://127.0.0.1" in good.stdout and "answers" in good.stdout

        (tmp_path / "wrong").write_text("not-it")
        refused = run("config", "--check-remote", env={**env, "LMCACHE_REMOTE_PASSWORD_FILE": str(tmp_path / "wrong")})
        assert refused.returncode == 1
        assert "LMCACHE_REMOTE_PASSWORD_FILE" in refused.stderr

        port = server.port
    gone = run("config", "--check-remote", "--json", env={"LMCACHE_REMOTE_URL": f"redis://:{secret}@127.0.0.1:{port}"})
    assert gone.returncode == 1
    report = json.loads(gone.stdout)
    assert report["valid"] and not report["stores"][0]["reachable"]
    assert secret not in gone.stdout + gone.stderr  # the password in the URL is never shown


def test_without_check_remote_the_store_is_not_contacted():
    result = run("config", env={"LMCACHE_REMOTE_URL": "redis://127.0.0.1:1"})
    assert result.returncode == 0 and "check-remote" not in result.stdout + result.stderr


def test_check_remote_pings_the_p2p_lookup_registry(tmp_path):
    import redis_servers as rs

    with rs.redis_server(tmp_path / "registry") as server:
        env = {
            "LMCACHE_ENABLE_P2P": "True",
            "LMCACHE_LOOKUP_URL": f"redis://127.0.0.1:{server.port}",
            "LMCACHE_DISTRIBUTED_URL": "127.0.0.1:8200",
        }
        good = run("config", "--check-remote", env=env)
        assert good.returncode == 0, good.stderr
        assert "P2P lookup registry (LMCACHE_LOOKUP_URL)" in good.stdout and "answers" in good.stdout
        assert "not available in this version" not in good.stdout + good.stderr
    gone = run("config", "--check-remote", env=env)
    assert gone.returncode == 1
    assert "P2P lookup registry (LMCACHE_LOOKUP_URL)" in gone.stderr and "not usable" in gone.stderr
