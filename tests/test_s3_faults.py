"""S3 faults: 5xx answers, dropped uploads, missing bucket, bad credentials,
an unreachable endpoint. Retried where transient, one clear error otherwise,
and never an object at a final shard name that is not a complete shard.

A small HTTP proxy on 127.0.0.1 sits in front of the session's moto server and
fails a chosen sequence of requests; the rest pass through unchanged.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from scribeline.platform import dataset, storage
from scribeline.platform.errors import StorageError
from scribeline.platform.settings import GenerateSettings
from scribeline.platform.storage import TransientStorageError

SECRET = "s3cr3t-never-printed"

# --------------------------------------------------------------------------
# A fault-injecting proxy
# --------------------------------------------------------------------------

S3_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Fault:
    """Answer the next ``times`` requests matching ``method`` and ``path``
    (a regex) with ``action``: an S3 error (``500``, ``503``, ``slowdown``) or
    ``drop`` (read part of the upload, then reset the connection)."""

    action: str
    path: str = r"/shards/\.tmp-"
    method: str = "PUT"
    times: int = 1


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that injects faults.

    Faults are consumed in order, each a bounded number of times; the proxy
    also stops itself after ``lifetime`` seconds.
    """

    def __init__(self, upstream: str, faults: list[Fault], lifetime: float = 60):
        self.upstream = upstream.removeprefix("http://")
        self.faults = faults
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def handle_one(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever)
        self._timer = threading.Timer(lifetime, self._server.shutdown)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def injected(self) -> list[str]:
        return [action for _, _, action in self.log if action != "pass"]

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            for fault in self.faults:
                if (
                    fault.times
                    and fault.method == method
                    and re.search(fault.path, path)
                ):
                    fault.times -= 1
                    self.log.append((method, path, fault.action))
                    return fault.action
            self.log.append((method, path, "pass"))
            return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        action = self._decide(h.command, h.path)
        length = int(h.headers.get("Content-Length") or 0)
        if action == "drop":
            h.rfile.read(min(length, 4096))  # part of the upload, then a reset
            h.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            h.close_connection = True
            return
        body = h.rfile.read(length) if length else None
        if action is not None:
            status, code, message = S3_ERRORS[action]
            xml = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                f"<Message>{message}</Message><RequestId>fault</RequestId></Error>"
            ).encode()
            self._reply(h, status, [("Content-Type", "application/xml")], xml)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() != "connection"}
            conn.request(h.command, h.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        skip = {"transfer-encoding", "connection", "content-length", "date", "server"}
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in skip]
        self._reply(h, response.status, kept, data)

    @staticmethod
    def _reply(h, status: int, headers: list, data: bytes) -> None:
        h.send_response(status)
        for key, value in headers:
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def settings_for(output: str, **overrides) -> GenerateSettings:
    values = {"output": output, "lines": 240, "shard_size": 100, "seed": 3}
    values.update(overrides)
    return GenerateSettings(**values)


def options_for(endpoint: str, **extra) -> dict:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        # A new client per test: fsspec would reuse a cached one otherwise.
        "skip_instance_cache": True,
        **extra,
    }


def objects(s3_server, bucket_url: str) -> dict[str, bytes]:
    """Every object in the bucket, read directly from the server."""
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    bucket = bucket_url.removeprefix("s3://")
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {
        o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
    }


def assert_no_partial_shard(found: dict[str, bytes], reference: Path) -> list[str]:
    """Every object at a final shard name is the complete shard; returns them."""
    expected = {
        s["name"]: s["sha256"] for s in dataset.read_manifest(str(reference))["shards"]
    }
    final = []
    for key, data in found.items():
        name = "shards/" + key.rsplit("/shards/", 1)[-1]
        if "/shards/" not in key or dataset.is_temporary(name):
            continue
        assert hashlib.sha256(data).hexdigest() == expected[name], key
        final.append(name)
    return final


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "ds"
    dataset.generate(settings_for(str(out)))
    return out


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------
# Transient faults: retried, same bytes
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_5xx_and_dropped_uploads_are_retried_and_bytes_are_identical(
    s3_server, s3_bucket, reference
):
    faults = [
        Fault("503", times=2),
        Fault("drop", times=2),  # connection reset mid-upload
        Fault("slowdown"),
        Fault("500", path=r"/shards/train-00001\.parquet$"),  # the move (a copy)
    ]
    url = f"{s3_bucket}/ds"
    with FaultProxy(s3_server.endpoint, faults) as proxy:
        s = settings_for(url, storage_options=options_for(proxy.endpoint))
        manifest = dataset.generate(s)
    assert sorted(proxy.injected()) == sorted(
        ["503", "503", "drop", "drop", "slowdown", "500"]
    )
    local = dataset.read_manifest(str(reference))
    assert manifest["shards"] == local["shards"]
    found = objects(s3_server, s3_bucket)
    assert sorted(assert_no_partial_shard(found, reference)) == sorted(
        s["name"] for s in local["shards"]
    )
    assert not [k for k in found if dataset.is_temporary(k)]


@pytest.mark.slow
def test_persistent_5xx_is_one_clear_error_and_leaves_no_partial_shard(
    s3_server, s3_bucket, reference
):
    url = f"{s3_bucket}/ds"
    faults = [Fault("500", path=r"/shards/\.tmp-val-", times=100)]
    # botocore's retries off: our own attempts are what is counted here.
    options = options_for("", config_kwargs={"retries": {"max_attempts": 0}})
    with FaultProxy(s3_server.endpoint, faults) as proxy:
        options["client_kwargs"]["endpoint_url"] = proxy.endpoint
        s = settings_for(url, storage_options=options)
        started = time.monotonic()
        with pytest.raises(TransientStorageError) as caught:
            dataset.generate(s)
        elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "cannot write s3://" in message and "val-00000.parquet" in message
    assert "keeps failing" in message
    assert proxy.injected() == ["500"] * storage.ATTEMPTS
    assert elapsed < 10
    found = objects(s3_server, s3_bucket)
    names = assert_no_partial_shard(found, reference)
    assert "shards/val-00000.parquet" not in names
    assert not [k for k in found if dataset.is_temporary(k)]
    assert f"{s3_bucket.removeprefix('s3://')}/ds/manifest.json" not in {
        f"{s3_bucket.removeprefix('s3://')}/{k}" for k in found
    }


def test_dropped_copy_leaves_no_object_at_the_final_name(
    s3_server, s3_bucket, reference, monkeypatch
):
    """The upload lands, the move into place keeps failing: nothing is listed."""
    import s3fs

    # Fail fast: this is about what is left behind, not about patience.
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.01)
    url = f"{s3_bucket}/ds"
    faults = [Fault("drop", path=r"/shards/test-00000\.parquet$", times=100)]
    options = options_for("", config_kwargs={"retries": {"max_attempts": 0}})
    with FaultProxy(s3_server.endpoint, faults) as proxy:
        options["client_kwargs"]["endpoint_url"] = proxy.endpoint
        with pytest.raises(TransientStorageError, match=r"test-00000\.parquet"):
            dataset.generate(settings_for(url, storage_options=options))
    # aiohttp retries a request once on a reset pooled connection.
    drops = proxy.injected()
    assert set(drops) == {"drop"} and storage.ATTEMPTS <= len(drops) <= 6
    found = objects(s3_server, s3_bucket)
    assert "shards/test-00000.parquet" not in assert_no_partial_shard(found, reference)
    assert not [k for k in found if dataset.is_temporary(k)]


@pytest.mark.slow
def test_transient_failure_on_a_ray_worker_retries_the_task(
    ray_cluster, s3_server, s3_bucket, reference
):
    """Storage retries run out in the worker; Ray reruns the whole shard."""
    from scribeline.workers.generate import RayRunner

    url = f"{s3_bucket}/ds"
    # One try per storage attempt (no botocore retries): the first task attempt
    # fails after storage.ATTEMPTS uploads, the rerun succeeds.
    faults = [Fault("503", path=r"/shards/\.tmp-train-00001", times=storage.ATTEMPTS)]
    options = options_for("", config_kwargs={"retries": {"max_attempts": 0}})
    with FaultProxy(s3_server.endpoint, faults) as proxy:
        options["client_kwargs"]["endpoint_url"] = proxy.endpoint
        s = settings_for(url, storage_options=options)
        manifest = dataset.generate(s, runner=RayRunner(max_retries=2))
    assert proxy.injected() == ["503"] * storage.ATTEMPTS
    assert manifest["shards"] == dataset.read_manifest(str(reference))["shards"]


# --------------------------------------------------------------------------
# Permanent faults: one clear error, quickly
# --------------------------------------------------------------------------


def test_missing_bucket_is_one_clear_error(s3_server):
    s = settings_for(
        "s3://no-such-bucket-x/ds", storage_options=options_for(s3_server.endpoint)
    )
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        dataset.generate(s)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "bucket 'no-such-bucket-x' does not exist" in message
    assert s3_server.endpoint in message and "Create it" in message
    assert not isinstance(caught.value, TransientStorageError)
    # And it was not created on the way (s3fs would, given makedirs).
    names = [
        b["Name"]
        for b in boto3.client(
            "s3",
            endpoint_url=s3_server.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).list_buckets()["Buckets"]
    ]
    assert "no-such-bucket-x" not in names


@pytest.fixture
def moto_auth(s3_server):
    """Turn moto's IAM checks on: unknown access keys get InvalidAccessKeyId."""

    def reset_auth(count: str) -> None:
        request = urllib.request.Request(
            f"{s3_server.endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"

    reset_auth("0")
    yield
    reset_auth("inf")


def test_bad_credentials_are_one_clear_error_without_the_secret(
    s3_server, s3_bucket, moto_auth
):
    options = options_for(s3_server.endpoint, key="AKIAUNKNOWNKEY000000", secret=SECRET)
    s = settings_for(f"{s3_bucket}/ds", storage_options=options)
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        dataset.generate(s)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "access denied" in message and "credentials" in message
    assert s3_bucket in message
    assert SECRET not in message and "AKIAUNKNOWNKEY000000" not in message


def test_unreachable_endpoint_is_one_clear_error_quickly():
    endpoint = f"http://127.0.0.1:{closed_port()}"
    s = settings_for("s3://some-bucket/ds", storage_options=options_for(endpoint))
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        dataset.generate(s)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert f"cannot connect to the storage endpoint {endpoint}" in message
    assert "endpoint_url" in message


# --------------------------------------------------------------------------
# The rules, without a server
# --------------------------------------------------------------------------


def client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {
            "Error": {"Code": code, "Message": "m"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


def wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    """What s3fs does: an OSError whose cause is botocore's error."""
    outer.__cause__ = inner
    return outer


def _transient_cases():
    import aiohttp
    from botocore import exceptions as boto

    url = "http://127.0.0.1:1/b/k"
    reset = aiohttp.ClientOSError(104, "Connection reset by peer")
    refused = aiohttp.ClientConnectorError(
        connection_key=None, os_error=ConnectionRefusedError(111, "refused")
    )
    return [
        ("503", wrapped(client_error("ServiceUnavailable", 503), OSError(16, "x")), 1),
        ("500", wrapped(client_error("InternalError", 500), OSError(121, "x")), 1),
        ("slowdown", client_error("SlowDown", 503), 1),
        ("dropped", boto.ConnectionClosedError(endpoint_url=url), 1),
        ("reset", boto.EndpointConnectionError(endpoint_url=url, error=reset), 1),
        ("read timeout", boto.ReadTimeoutError(endpoint_url=url), 1),
        ("403", wrapped(client_error("AccessDenied", 403), PermissionError("x")), 0),
        ("no bucket", client_error("NoSuchBucket", 404), 0),
        ("refused", boto.EndpointConnectionError(endpoint_url=url, error=refused), 0),
        ("connect timeout", boto.ConnectTimeoutError(endpoint_url=url), 0),
        ("local disk", OSError(28, "No space left on device"), 0),
        ("not found", FileNotFoundError("k"), 0),
    ]


def test_only_named_transient_errors_are_retried():
    for label, err, transient in _transient_cases():
        assert storage.is_transient(err) == bool(transient), label


def test_aws_environment_becomes_explicit_options(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    given = {"secret": "given", "client_kwargs": {"region_name": "us-east-1"}}
    options = storage.explicit_storage_options("s3://b/p", given)
    assert options == {
        "key": "AKIAFROMENV",
        "secret": "given",  # what the caller set wins
        "client_kwargs": {
            "region_name": "us-east-1",
            "endpoint_url": "http://s3-specific:2",  # the S3-specific one first
        },
    }
    assert given == {"secret": "given", "client_kwargs": {"region_name": "us-east-1"}}
    assert storage.explicit_storage_options("/local/dir", {"a": 1}) == {"a": 1}


def test_s3_client_defaults_do_not_override_the_user(tmp_path):
    default = storage.resolve("s3://b/p", {"anon": True, "skip_instance_cache": True})
    assert default.fs.config_kwargs["connect_timeout"] == storage.S3_CONNECT_TIMEOUT
    mine = storage.resolve(
        "s3://b/p",
        {
            "anon": True,
            "skip_instance_cache": True,
            "config_kwargs": {"retries": {"max_attempts": 9}, "connect_timeout": 1},
        },
    )
    assert mine.fs.config_kwargs == {
        "retries": {"max_attempts": 9},
        "connect_timeout": 1,
    }
