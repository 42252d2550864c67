"""Real S3 endpoints on loopback for the tests: ``moto_server`` (the ``moto[server]`` test extra).

``moto_server(folder)`` starts one on a free port, waits until it answers, and kills it when the
context manager exits (or with the test process: ``PR_SET_PDEATHSIG``, as for the Redis servers).
The handle gives what a client needs: ``endpoint`` and :meth:`MotoServer.env` (the ``AWS_*``
variables of a client that talks to it, with the machine's own AWS files and the instance-metadata
lookup shut out), and ``admin()``, a plain boto3 client for inspecting and planting objects behind
the client under test.

moto accepts any credentials until told otherwise: :meth:`MotoServer.require_credentials` creates
an IAM user allowed every S3 action, then turns authentication on for every later request (moto's
``/moto-api/reset-auth`` with 0, the server-mode form of ``INITIAL_NO_AUTH_ACTION_COUNT=0``), and
returns that user's key pair. A server never goes back to accepting anything: use a server of its
own for that test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis_servers import _die_with_parent, free_port

INSTALL = "pip install -e '.[test]' (moto[server] gives moto_server)"
START_TIMEOUT = 20.0
REGION = "us-east-1"
# moto checks nothing until require_credentials; these are what any client signs with before that.
OPEN_KEY_ID = "testing-key-id"
OPEN_SECRET = "testing-secret"


def moto_binary() -> str:
    """``moto_server`` beside this interpreter (the venv's), else on PATH; a test failure otherwise."""
    here = Path(sys.executable).parent / "moto_server"
    path = str(here) if here.exists() else shutil.which("moto_server")
    if path is None:
        pytest.fail(f"moto_server is not installed; the S3 tests need a real S3 endpoint: {INSTALL}")
    return path


class MotoServer:
    """One ``moto_server`` process started by a test."""

    def __init__(self, folder: Path, port: int):
        self.folder = folder
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = folder / "moto.log"
        self.key_id = OPEN_KEY_ID
        self.secret = OPEN_SECRET
        self._process: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [moto_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **isolated_aws_env()},
                preexec_fn=_die_with_parent,
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=0.5):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer within {timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def env(self, key_id: str | None = None, secret: str | None = None) -> dict[str, str]:
        """The ``AWS_*`` environment of a client of this server (this server's credentials by default)."""
        return {
            **isolated_aws_env(),
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": key_id or self.key_id,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
        }

    def admin(self):
        """A plain boto3 client for this server (not the client under test)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def create_bucket(self, bucket: str) -> None:
        self.admin().create_bucket(Bucket=bucket)

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.admin().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))

    def require_credentials(self) -> tuple[str, str]:
        """Create a user allowed every S3 action, then check every later request's signature
        against moto's IAM; the user's ``(access key id, secret)``. Becomes this server's own."""
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=OPEN_KEY_ID,
            aws_secret_access_key=OPEN_SECRET,
        )
        iam.create_user(UserName="lmcache")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="lmcache", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="lmcache")["AccessKey"]
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form body would hide the number from moto
        )
        with urllib.request.urlopen(request, timeout=5):
            pass
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        return self.key_id, self.secret

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def isolated_aws_env() -> dict[str, str]:
    """Keep the machine's AWS files and the instance-metadata service out of a test's client."""
    return {
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextmanager
def moto_server(folder: Path, port: int | None = None) -> Iterator[MotoServer]:
    server = MotoServer(folder, port or free_port()).start()
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def aws_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[None]:
    """This process's ``AWS_*`` variables set to ``env`` (every other ``AWS_*`` one removed) inside the block."""
    with monkeypatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        yield
