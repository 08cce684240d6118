"""Which image URLs a request may name, and how their bytes are obtained.

* `data:image/...;base64,...` URLs: always.
* Local files (`file:///abs/path.png`, or a plain path; relative paths are taken under the allowed
  directory): only when the server was started with `--allow-local-images DIR`, and only files
  inside DIR once symlinks and `..` are resolved. Containment is checked before the file's
  existence, so a client cannot probe for files outside DIR.
* `http(s)://` URLs: only with `--allow-remote-images`; the download is capped at the image byte
  limit (checked from Content-Length first, then while reading) and at `remote_timeout_s` in
  total (a slow trickle cannot hold a worker), and redirects may only go to http(s).

The bytes are then decoded by `dvlm.data.images.load_image` under the model's `ImageLimits`, the
same checks every other dvlm entry point applies. Refusals are `APIError`s: too many bytes is 413,
anything else 400; each names the request part it is about.
"""

from __future__ import annotations

import errno
import http.client
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dvlm.data.images import (
    DEFAULT_LIMITS,
    MIB,
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    base64_size,
    load_image,
)
from dvlm.serve.errors import APIError, bad_request, too_large

READ_CHUNK = 64 * 1024
REMOTE_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class ImagePolicy:
    """What the server may open for a request's `image_url` parts."""

    local_root: Path | None = None
    """Directory local image paths must resolve into (None: local paths are refused)."""
    allow_remote: bool = False
    """Fetch http(s) URLs (the server then fetches whatever URL a client names)."""
    remote_timeout_s: float = 10.0
    """Wall-clock limit of one download, connection included."""
    limits: ImageLimits = field(default=DEFAULT_LIMITS)
    """Byte, pixel and format limits (the model's processor's)."""

    def __post_init__(self) -> None:
        if self.local_root is not None:
            # Resolved once: containment is then a plain prefix test on resolved paths.
            object.__setattr__(self, "local_root", Path(self.local_root).resolve(strict=True))
        if not self.remote_timeout_s > 0:
            raise ValueError(f"remote_timeout_s must be > 0, got {self.remote_timeout_s}")


def load_image_url(url: str, policy: ImagePolicy, where: str) -> Image.Image:
    """The decoded RGB image an `image_url` names, or an APIError naming `where` (e.g.
    `messages[0].content[1].image_url`). Blocking: call it from a worker thread."""
    if "\x00" in url:
        raise bad_request(f"{where}: the image URL contains a NUL character", param=where)
    scheme = _scheme(url, where)
    if url.startswith("data:"):
        _check_data_url_size(url, policy.limits, where)
        return _decode(url, where, policy.limits)
    if scheme in REMOTE_SCHEMES:
        if not policy.allow_remote:
            raise bad_request(f"{where}: remote image URLs are disabled on this server (start it with "
                              "--allow-remote-images, or send the image as a data: URL)",
                              code="image_not_allowed", param=where)
        return _decode(_fetch(url, policy, where), where, policy.limits)
    if scheme in ("", "file"):
        return _decode(_read_local(_local_path(url, scheme, where), policy, where), where, policy.limits)
    raise bad_request(f"{where}: unsupported image URL scheme {scheme!r} (use a data: URL"
                      + (", a local path" if policy.local_root else "")
                      + (" or http(s)" if policy.allow_remote else "") + ")", param=where)


def _scheme(url: str, where: str) -> str:
    """The URL's scheme ("" for a plain path)."""
    if "://" not in url:
        return ""
    try:
        return urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as err:  # e.g. an unclosed IPv6 bracket
        raise bad_request(f"{where}: not a valid URL ({err})", param=where) from err


def _decode(source: str | bytes, where: str, limits: ImageLimits) -> Image.Image:
    try:
        return load_image(source, limits=limits)
    except ImageTooLargeError as err:
        raise too_large(f"{where}: cannot load the image: {err.reason}", param=where) from err
    except ImageError as err:
        raise bad_request(f"{where}: cannot load the image: {err.reason}", code="invalid_image", param=where) from err


def _check_data_url_size(url: str, limits: ImageLimits, where: str) -> None:
    _check_size(base64_size(url, url.find(",") + 1), limits, where)


def _check_size(size: int, limits: ImageLimits, where: str) -> None:
    if size > limits.max_bytes:
        raise too_large(f"{where}: the image has {size} bytes, more than the server's limit of "
                        f"{limits.max_bytes} ({limits.max_bytes / MIB:g} MiB)", param=where)


# -- local files ---------------------------------------------------------------------------------
def _local_path(url: str, scheme: str, where: str) -> str:
    if scheme == "":
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise bad_request(f"{where}: file URLs must name a local path (file:///path), got host {parts.netloc!r}",
                          param=where)
    return urllib.parse.unquote(parts.path)


def _read_local(raw: str, policy: ImagePolicy, where: str) -> bytes:
    root = policy.local_root
    if root is None:
        raise bad_request(f"{where}: local image paths are disabled on this server (start it with "
                          "--allow-local-images DIR, or send the image as a data: URL)",
                          code="image_not_allowed", param=where)
    path = Path(raw) if Path(raw).is_absolute() else root / raw
    try:
        resolved = path.resolve(strict=False)  # symlinks and '..' of the existing part are resolved
    except (OSError, RuntimeError) as err:  # a symlink loop (RuntimeError before Python 3.13), ...
        reason = "a symlink loop" if isinstance(err, RuntimeError) or err.errno == errno.ELOOP else err.strerror
        raise bad_request(f"{where}: {raw!r} cannot be resolved ({reason})", code="invalid_image",
                          param=where) from err
    if not resolved.is_relative_to(root):
        raise bad_request(f"{where}: {raw!r} is outside the directory this server may read images from",
                          code="image_not_allowed", param=where)
    return _read_file(resolved, raw, policy.limits, where)


def _read_file(path: Path, shown: str, limits: ImageLimits, where: str) -> bytes:
    """Read a regular file of at most the byte limit. O_NOFOLLOW: a symlink swapped in after the
    containment check is not followed; O_NONBLOCK: opening a FIFO does not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        reason = "file not found" if isinstance(err, FileNotFoundError) else f"cannot open it ({err.strerror})"
        raise bad_request(f"{where}: {shown!r}: {reason}", code="invalid_image", param=where) from err
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise bad_request(f"{where}: {shown!r} is not a regular file", code="invalid_image", param=where)
    with os.fdopen(fd, "rb") as f:
        _check_size(info.st_size, limits, where)
        data = f.read(limits.max_bytes + 1)
    _check_size(len(data), limits, where)  # the file grew while we read it
    return data


# -- remote URLs ---------------------------------------------------------------------------------
class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; a fetched image may only move to another http(s) URL."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if urllib.parse.urlsplit(newurl).scheme.lower() not in REMOTE_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: ImagePolicy, where: str) -> bytes:
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    deadline = time.monotonic() + policy.remote_timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "dvlm-serve"})
    try:
        with opener.open(request, timeout=policy.remote_timeout_s) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit():
                _check_size(int(length), policy.limits, where)
            return _read_until(response, deadline, policy, where)
    except APIError:
        raise
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        raise bad_request(f"{where}: downloading {url!r} failed ({getattr(err, 'reason', err)})",
                          code="invalid_image", param=where) from err


def _read_until(response, deadline: float, policy: ImagePolicy, where: str) -> bytes:  # noqa: ANN001
    data = bytearray()
    # read1, not read: read(n) waits for all n bytes, so a trickling server would never reach the deadline check.
    while chunk := response.read1(READ_CHUNK):
        data += chunk
        _check_size(len(data), policy.limits, where)
        if time.monotonic() > deadline:
            raise bad_request(f"{where}: the download took longer than {policy.remote_timeout_s:g} s",
                              code="invalid_image", param=where)
    return bytes(data)
