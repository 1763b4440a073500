"""Storage: every path is a URL resolved once through fsspec.

A local folder, ``file://``, ``memory://`` and ``s3://`` all go the same way:
``resolve(url, storage_options)`` gives an fsspec filesystem and a path on it.
Writes that readers must never see half-done go through ``write_atomic``: the
bytes land under a temporary name first, then move to the final name (a rename
on local disks, a server-side copy on S3, both all-or-nothing for readers).

Failures are sorted once, here. Transient ones (a 5xx or SlowDown answer, a
connection dropped or reset mid-request, a read timeout) are retried a few
times with exponential backoff and, if they persist, raised as
``TransientStorageError`` so a caller (a Ray task) may retry the whole unit.
Everything else (no such bucket, access denied, an endpoint that cannot be
reached at all) is raised at once as one ``StorageError`` that names the URL
and the fix. Messages never hold credentials.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec

from scribeline.platform.errors import StorageError

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"

# Attempts of one storage operation when it fails transiently. Each attempt is
# itself retried by botocore (S3_CLIENT_RETRIES below), so 3 here means up to 9
# requests over ~2 s of our backoff: enough for a load balancer blip or a
# throttled prefix, short enough that a sick endpoint fails the task quickly
# and Ray can retry it elsewhere.
ATTEMPTS = 3
BACKOFF_SECONDS = 0.25  # first wait; doubles each attempt (0.25, 0.5)

# S3 client defaults applied where the user set none. botocore's own defaults
# (legacy mode, 5 attempts, 60 s connect timeout without s3fs) spend seconds to
# minutes on an endpoint that is simply not there; 3 attempts in standard mode
# cost ~1.5 s against a closed port and still absorb one dropped connection.
S3_CLIENT_RETRIES = {"max_attempts": 2, "mode": "standard"}  # 2 retries, 3 tries
S3_CONNECT_TIMEOUT = 5  # s; a loopback or in-region endpoint answers in ms

# The standard AWS environment variables, resolved into explicit s3fs options
# by ``explicit_storage_options`` (processes started before they were set, such
# as Ray workers, never see them).
AWS_ENV_OPTIONS = (
    ("AWS_ACCESS_KEY_ID", ("key",)),
    ("AWS_SECRET_ACCESS_KEY", ("secret",)),
    ("AWS_SESSION_TOKEN", ("token",)),
    ("AWS_ENDPOINT_URL_S3", ("client_kwargs", "endpoint_url")),
    ("AWS_ENDPOINT_URL", ("client_kwargs", "endpoint_url")),
    ("AWS_REGION", ("client_kwargs", "region_name")),
    ("AWS_DEFAULT_REGION", ("client_kwargs", "region_name")),
)
S3_PROTOCOLS = ("s3", "s3a")
# Object stores have no folders: creating one is a no-op at best and, on S3,
# s3fs would create a missing *bucket* instead of reporting it.
OBJECT_STORE_PROTOCOLS = (*S3_PROTOCOLS, "gs", "gcs", "az", "abfs", "abfss")

# S3 error codes that mean "try again later".
TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "OperationAborted",
    }
)

T = TypeVar("T")


class TransientStorageError(StorageError):
    """A storage operation kept failing on errors that may pass (5xx, dropped
    connections, timeouts). Retrying the whole unit of work later may succeed."""


@dataclass(frozen=True)
class Location:
    """A URL resolved to a filesystem and a path on it."""

    fs: fsspec.AbstractFileSystem
    path: str
    url: str

    def child(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        url = self.url.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, url)

    def exists(self) -> bool:
        try:
            return _retrying(self, "check", lambda: self.fs.exists(self.path))
        except FileNotFoundError:
            return False

    def read_bytes(self) -> bytes:
        """The object's bytes; ``FileNotFoundError`` if there is none."""
        return _retrying(self, "read", lambda: self.fs.cat_file(self.path))


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve ``url`` (a folder path or any fsspec URL) to a ``Location``."""
    if not url:
        raise StorageError("an empty URL was given; pass a folder path or s3://...")
    options = dict(storage_options or {})
    if fsspec.utils.get_protocol(url) in S3_PROTOCOLS:
        options = _with_s3_defaults(options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise StorageError(
            f"cannot open {url!r}: {err}. Use a local folder, file://, memory:// "
            "or s3://bucket/prefix."
        ) from err
    return Location(fs, path.rstrip("/") or path, url)


def _with_s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """Cap botocore's connect timeout and retries unless the user set them."""
    config = dict(options.get("config_kwargs") or {})
    # A fresh dict each time: botocore rewrites the retries dict it is given.
    config.setdefault("retries", dict(S3_CLIENT_RETRIES))
    config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT)
    return {**options, "config_kwargs": config}


def explicit_storage_options(
    url: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``storage_options`` with the standard AWS environment variables folded in.

    For ``s3://`` URLs, each of ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` that is set here fills the matching
    s3fs option the caller left unset. Call it in the process that has the
    environment (a Ray driver) and ship the result with the work: workers
    started before the variables were set do not see them. Other URLs are
    returned unchanged. The result holds secrets: never log it.
    """
    options = dict(storage_options or {})
    if fsspec.utils.get_protocol(url) not in S3_PROTOCOLS:
        return options
    options["client_kwargs"] = dict(options.get("client_kwargs") or {})
    for var, where in AWS_ENV_OPTIONS:
        value = os.environ.get(var)
        if not value:
            continue
        target = options
        for key in where[:-1]:
            target = target[key]
        target.setdefault(where[-1], value)
    if not options["client_kwargs"]:
        del options["client_kwargs"]
    return options


def write_atomic(loc: Location, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that readers see all of it or nothing.

    The bytes go to ``.tmp-<name>-<random>`` in the same folder, then move to the
    final name. A transient failure is retried with a fresh temporary name; on
    every failure the temporary object is removed (best effort: a leftover one
    is never taken for the final object, see ``is_temporary`` in the dataset).
    Raises ``TransientStorageError`` when transient failures persist, otherwise
    ``StorageError`` naming the URL and the fix.
    """
    folder, name = posixpath.split(loc.path)
    fs = loc.fs
    object_store = _is_object_store(fs)

    def attempt() -> None:
        tmp = posixpath.join(folder, f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
        try:
            if object_store:
                # Server-side copy, then delete: 3 requests a shard. fs.mv
                # would first list both names to expand them (3 more).
                fs.pipe_file(tmp, data)
                fs.cp_file(tmp, loc.path)
                fs.rm_file(tmp)
            else:
                fs.makedirs(folder, exist_ok=True)
                fs.pipe_file(tmp, data)
                fs.mv(tmp, loc.path)  # a rename
        except BaseException:
            _remove_quietly(fs, tmp)
            raise

    _retrying(loc, "write", attempt)


def _retrying(loc: Location, action: str, op: Callable[[], T]) -> T:
    """Run ``op``, retrying transient failures; translate every failure."""
    for attempt in range(ATTEMPTS):
        try:
            return op()
        except FileNotFoundError as err:
            # A missing object is an answer for a read; for a write, or from a
            # missing bucket, it is a problem to report.
            if action == "write" or _s3_code(err) == "NoSuchBucket":
                raise _fatal(loc, action, err) from err
            raise
        except Exception as err:
            if not is_transient(err):
                raise _fatal(loc, action, err) from err
            if attempt + 1 == ATTEMPTS:
                raise TransientStorageError(
                    _redact(
                        loc,
                        f"cannot {action} {loc.url} after {ATTEMPTS} attempts: "
                        f"{_describe(err)}. The storage endpoint keeps failing "
                        "(server errors or dropped connections); retry later or "
                        "check its health.",
                    )
                ) from err
            delay = BACKOFF_SECONDS * 2**attempt
            logger.warning(
                "%s %s failed transiently (%s); attempt %d of %d in %.2f s",
                action,
                loc.url,
                type(err).__name__,
                attempt + 2,
                ATTEMPTS,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _fatal(loc: Location, action: str, err: BaseException) -> StorageError:
    """One clear error for a failure that retrying will not fix."""
    code = _s3_code(err)
    bucket = _bucket(loc)
    if code == "NoSuchBucket" or (bucket and isinstance(err, FileNotFoundError)):
        hint = (
            f"bucket {bucket!r} does not exist at {_endpoint(loc)}. Create it "
            f"(e.g. `aws s3 mb s3://{bucket}`) or fix the bucket name in the URL."
        )
    elif isinstance(err, PermissionError) and not bucket:
        hint = (
            f"permission denied ({_describe(err)}). Choose a folder this user may "
            f"{'write to' if action == 'write' else 'read'}."
        )
    elif isinstance(err, PermissionError) or code in (
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
    ):
        hint = (
            f"access denied ({code or 'permission error'}). Check the credentials "
            "(storage option key/secret, or AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY) and that they may "
            f"{'write to' if action == 'write' else 'read'} this location."
        )
    elif _unreachable(err):
        hint = (
            f"cannot connect to the storage endpoint {_endpoint(loc)}. Check "
            "endpoint_url (or AWS_ENDPOINT_URL) and that the server is running "
            "and reachable from this machine."
        )
    elif _name_in_mro(err, "NoCredentialsError"):
        hint = (
            "no credentials were found. Pass storage options key/secret or set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
        )
    elif isinstance(err, NotADirectoryError | FileExistsError):
        hint = f"{_describe(err)}. A file is in the way: the path must be a folder."
    else:
        hint = (
            f"{_describe(err)}. Check that the location exists and is "
            f"{'writable' if action == 'write' else 'readable'}."
        )
    return StorageError(_redact(loc, f"cannot {action} {loc.url}: {hint}"))


# --------------------------------------------------------------------------
# Sorting errors: transient or not
# --------------------------------------------------------------------------


def is_transient(err: BaseException) -> bool:
    """Whether a storage error may pass if retried: 5xx and throttling answers,
    connections dropped or reset mid-request, read timeouts. Not: missing
    objects or buckets, denied access, an endpoint that refuses connections."""
    for exc in _chain(err):
        if isinstance(exc, FileNotFoundError | PermissionError):
            return False
        code, status = _s3_code(exc), _s3_status(exc)
        if code is not None or status is not None:
            return code in TRANSIENT_S3_CODES or (status or 0) >= 500
        if _unreachable(exc):
            return False
        if isinstance(exc, _transient_types()):
            return True
        if "EndpointConnectionError" in _mro_names(exc):
            return True  # connected, then reset mid-request (see _unreachable)
        if isinstance(exc, ConnectionRefusedError):
            return False
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
    return False


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types of the S3 stack that mean a request was cut short.

    botocore wraps aiohttp's errors: ``ConnectionClosedError`` (server hung up
    mid-request), ``ReadTimeoutError``, ``ResponseStreamingError``; fsspec adds
    ``FSTimeoutError``. Imported lazily: local-only use never loads botocore.
    """
    types: list[type[BaseException]] = []
    try:
        from botocore import exceptions as boto

        types += [
            boto.ConnectionClosedError,
            boto.ReadTimeoutError,
            boto.ResponseStreamingError,
            boto.IncompleteReadError,
        ]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError]
    except ImportError:  # pragma: no cover
        pass
    from fsspec.exceptions import FSTimeoutError

    types.append(FSTimeoutError)
    return tuple(types)


def _unreachable(err: BaseException) -> bool:
    """No connection could be made at all (refused, DNS, connect timeout).

    botocore already retried it (S3_CLIENT_RETRIES); retrying more would only
    delay the error. aiobotocore also reports a connection *reset* mid-request
    as ``EndpointConnectionError``: that one is transient, told apart by the
    aiohttp error it wraps.
    """
    names = _mro_names(err)
    if "ConnectTimeoutError" in names:
        return True
    if "EndpointConnectionError" not in names:
        return False
    inner = _wrapped_error(err)
    return inner is None or "ClientConnectorError" in _mro_names(inner)


def _wrapped_error(err: BaseException) -> BaseException | None:
    """The lower-level error a botocore exception was raised for, if any."""
    inner = getattr(err, "kwargs", {}).get("error")
    return inner if isinstance(inner, BaseException) else None


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes, outermost first (bounded: causes can loop)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )


def _s3_response(err: BaseException) -> dict[str, Any] | None:
    for exc in _chain(err):
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and (
            "Error" in response or "ResponseMetadata" in response
        ):
            return response
    return None


def _s3_code(err: BaseException) -> str | None:
    response = _s3_response(err)
    code = (response or {}).get("Error", {}).get("Code")
    return str(code) if code else None


def _s3_status(err: BaseException) -> int | None:
    response = _s3_response(err)
    status = (response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _mro_names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__}


def _name_in_mro(err: BaseException, name: str) -> bool:
    return any(name in _mro_names(exc) for exc in _chain(err))


# --------------------------------------------------------------------------
# Messages: name the URL and the endpoint, never a credential
# --------------------------------------------------------------------------


def _describe(err: BaseException) -> str:
    text = str(err).strip().rstrip(".") or "no detail"
    return f"{type(err).__name__}: {text}"


def _bucket(loc: Location) -> str | None:
    if not _is_s3(loc.fs):
        return None
    return loc.path.split("/", 1)[0] or None


def _endpoint(loc: Location) -> str:
    options = getattr(loc.fs, "storage_options", {}) or {}
    url = (options.get("client_kwargs") or {}).get("endpoint_url") or options.get(
        "endpoint_url"
    )
    if not url:
        return "the default AWS endpoint"
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host  # drop any user:pass@
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _redact(loc: Location, message: str) -> str:
    """Blank out credentials the filesystem holds, should an error echo one."""
    options = getattr(loc.fs, "storage_options", {}) or {}
    for name, shortest in (("secret", 4), ("token", 4), ("key", 16)):
        # A short key id ("testing") would blank innocent words; real ones are 20.
        value = options.get(name)
        if isinstance(value, str) and len(value) >= shortest:
            message = message.replace(value, "***")
    return message


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in S3_PROTOCOLS for p in protocols)


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in OBJECT_STORE_PROTOCOLS for p in protocols)


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except Exception:  # the original error is the one to report
        logger.debug("could not remove %s after a failed write", path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
