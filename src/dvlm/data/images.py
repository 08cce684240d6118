"""Load one image from whatever a user or a data file hands us, into a checked RGB PIL image.

Accepted sources: a path (``str`` / ``Path``, optionally ``file://``), raw ``bytes``, a
``data:image/...;base64,...`` URL, or a ``PIL.Image.Image``. ``http(s)://`` URLs are refused
unless ``allow_remote=True`` is passed explicitly (a training set or a server should never
fetch silently). Every failure is an :class:`ImageError` naming the source and the reason.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]

# Qwen's smart_resize rejects aspect ratios above 200; 64 MP is far above any useful input
# and keeps a malicious header from allocating gigabytes before the resize shrinks it.
MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 200
# Cap on bytes read from a remote URL (only with allow_remote=True).
MAX_REMOTE_BYTES = 64 * 1024 * 1024
REMOTE_TIMEOUT_S = 10.0


class ImageError(ValueError):
    """An image could not be loaded or is unusable; the message names the source and reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot load image {source}: {reason}")
        self.source = source
        self.reason = reason


def load_image(source: ImageSource, *, allow_remote: bool = False) -> Image.Image:
    """Load ``source`` as a fully decoded RGB image (transparency composited onto white).

    Raises:
        ImageError: missing file, corrupt or unidentified data, zero or absurd size,
            remote URL without ``allow_remote``, unsupported source type.
    """
    if isinstance(source, Image.Image):
        return _finish(source, "<PIL image>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "<bytes>")
    if isinstance(source, Path):
        return _load_path(source)
    if isinstance(source, str):
        return _load_string(source, allow_remote=allow_remote)
    raise ImageError(f"<{type(source).__name__}>", "unsupported image source type "
                     "(expected a path, bytes, a data: URL or a PIL image)")


def _load_string(source: str, *, allow_remote: bool) -> Image.Image:
    """Dispatch a string source: data URL, http(s) URL, file:// URL or plain path."""
    if source.startswith("data:"):
        return _decode(_data_url_bytes(source), "<data URL>")
    if source.startswith(("http://", "https://")):
        if not allow_remote:
            raise ImageError(source, "remote fetching is disabled (pass allow_remote=True, "
                                     "or download the image and pass a path)")
        return _decode(_fetch(source), source)
    if source.startswith("file://"):
        return _load_path(Path(source[len("file://"):]))
    return _load_path(Path(source))


def _load_path(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageError(str(path), "file not found" if not path.exists() else "not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(str(path), f"cannot read file ({err})") from err
    return _decode(data, str(path))


def _data_url_bytes(url: str) -> bytes:
    """Payload of ``data:image/<fmt>;base64,<payload>``."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError("<data URL>", "expected 'data:image/<format>;base64,<payload>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError("<data URL>", f"invalid base64 payload ({err})") from err


def _fetch(url: str) -> bytes:
    """Fetch at most MAX_REMOTE_BYTES from ``url`` (only reached with allow_remote=True)."""
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:
            data = response.read(MAX_REMOTE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ImageError(url, f"download failed ({err})") from err
    if len(data) > MAX_REMOTE_BYTES:
        raise ImageError(url, f"more than {MAX_REMOTE_BYTES} bytes")
    return data


def _decode(data: bytes, name: str) -> Image.Image:
    """Open and fully decode ``data``; the size is checked from the header before decoding."""
    if not data:
        raise ImageError(name, "empty data")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(name, f"unreadable or corrupt image data ({err})") from err
    return _finish(image, name)


def _finish(image: Image.Image, name: str) -> Image.Image:
    """Check the size, force decoding (lazy PIL images fail late otherwise) and convert to RGB."""
    _check_size(image.width, image.height, name)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(name, f"unreadable or corrupt image data ({err})") from err
    return _to_rgb(image)


def _check_size(width: int, height: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(name, f"zero-sized image ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(name, f"too large ({width}x{height} = {width * height} pixels, "
                               f"limit {MAX_IMAGE_PIXELS})")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(name, f"aspect ratio {ratio:.1f} of {width}x{height} exceeds "
                               f"{MAX_ASPECT_RATIO} (the Qwen resize rejects it)")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparency is composited onto white as transformers' convert_to_rgb does."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image
