"""A real S3-compatible server for tests: `moto_server` on a free loopback port.

moto keeps every object in memory for its whole life, so tests share one server per session, keep
their blobs small (a few MiB) and delete what they wrote. It does not check signatures: any
access key works, and presigned URLs are not verified.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from typing import Any

from services import free_port, wait_until

# Requests to the server go straight to loopback, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
LOOPBACK = ("127.0.0.1", "localhost")
# A profile named in the environment that the test machine lacks would make boto3 refuse to start;
# tests give the server's keys explicitly.
AWS_PROFILE_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def moto_server_binary() -> str:
    found = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.access(found, os.X_OK):
        raise FileNotFoundError("moto_server not found: pip install 'moto[server]'")
    return found


def no_proxy_for_loopback(environ: Any = os.environ) -> dict[str, str]:
    """NO_PROXY/no_proxy values that also name loopback (boto3 honours proxies from the environment)."""
    values = {}
    for name in ("NO_PROXY", "no_proxy"):
        current = [h.strip() for h in environ.get(name, "").split(",") if h.strip()]
        values[name] = ",".join(current + [h for h in LOOPBACK if h not in current])
    return values


class S3Endpoint:
    """What tests need from any S3 server they start: its address, keys and bucket, and a client."""

    access_key = "wharf-test"
    secret_key = "wharf-test-secret"
    region = "us-east-1"
    bucket: str

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def storage_config(self, rootdirectory: str | None = None, **overrides: Any) -> Any:
        """A `storage.s3` config section for a driver on this server, under its own root directory."""
        from node.config import S3Storage

        values: dict[str, Any] = {
            "bucket": self.bucket,
            "region": self.region,
            "regionendpoint": self.endpoint,
            "accesskey": self.access_key,
            "secretkey": self.secret_key,
            "rootdirectory": rootdirectory if rootdirectory is not None else f"/test-{uuid.uuid4().hex}",
            "forcepathstyle": True,
            "secure": False,
        }
        values.update(overrides)
        return S3Storage(**values)

    def client(self) -> Any:
        """A boto3 client for checking what is in the bucket, proxies in the environment ignored."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(proxies={}, s3={"addressing_style": "path"}),
        )

    def keys(self, prefix: str = "") -> dict[str, str]:
        """Every object under `prefix` with its ETag: a cheap fingerprint of what the bucket holds."""
        client = self.client()
        try:
            found = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                found.update({item["Key"]: item["ETag"] for item in page.get("Contents", [])})
            return found
        finally:
            client.close()

    def remove_prefix(self, prefix: str) -> None:
        """Delete every object and abort every multipart upload under `prefix` (frees the server's memory)."""
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        finally:
            client.close()

    def create_bucket(self) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=self.bucket)
        finally:
            client.close()


class S3Server(S3Endpoint):
    """One `moto_server` process with one bucket; a context manager, or `start()` and `close()`."""

    def __init__(self, *, bucket: str = "wharf-test", start_timeout: float = 30.0) -> None:
        self.bucket = bucket
        self.start_timeout = start_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log_dir: str | None = None
        self._log_file: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self._log_dir = tempfile.mkdtemp(prefix="wharf-moto-")
        try:
            # A free port can be taken between choosing and binding it: try again on another.
            for _attempt in range(3):
                self._spawn()
                try:
                    wait_until(self._answers, timeout=self.start_timeout, what=f"moto_server on {self.endpoint}")
                except _Exited:
                    self._stop()
                    continue
                self.create_bucket()
                return self
            raise RuntimeError(f"moto_server did not start after 3 attempts: {self.log_tail()}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the server (its objects go with it). Safe to call twice."""
        self._stop()
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> str:
        if self._log_dir is None:
            return ""
        try:
            with open(os.path.join(self._log_dir, "moto.log"), "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    # -- internals ------------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._log_dir is not None
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS and not k.startswith("AWS_")}
        self._log_file = open(os.path.join(self._log_dir, "moto.log"), "ab")
        self.process = subprocess.Popen(
            [moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def _answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise _Exited(self.log_tail())
        try:
            with _DIRECT.open(f"{self.endpoint}/moto-api/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except (urllib.error.URLError, OSError):
            return False

    def _stop(self) -> None:
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class _Exited(RuntimeError):
    pass
