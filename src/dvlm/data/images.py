"""Load one image from whatever a user or a data file hands us, into a checked RGB PIL image.

Accepted sources: a path (``str`` / ``Path``, optionally ``file://``), raw ``bytes``, a
``data:image/...;base64,...`` URL, or a ``PIL.Image.Image``. ``http(s)://`` URLs are refused
unless ``allow_remote=True`` is passed explicitly (a training set or a server should never
fetch silently). Every failure is an :class:`ImageError` naming the source and the reason.

What is accepted is bounded by :class:`ImageLimits` (settable per processor): the encoded size is
checked before a byte is read, the pixel count from the header before anything is decoded, and
only common raster formats are opened (no EPS/PDF/PostScript, which PIL would hand to Ghostscript).
16-bit and floating-point images are rescaled to 8 bits rather than clipped.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]

REMOTE_TIMEOUT_S = 10.0
MIB = 2**20


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on the images dvlm opens; every image source is checked against them."""

    max_bytes: int = 32 * MIB
    """Largest encoded image (file, bytes, data URL payload or download), checked before reading."""
    max_pixels: int = 25_000_000
    """Largest width x height, read from the header before decoding. Decoding and converting a
    25 MP image costs about half a GB; image processors shrink far larger images than models read (the
    reference family's to ~12.8 MP at most)."""
    max_aspect_ratio: float = 200.0
    """Patch-grid image processors' resizing rejects aspect ratios above 200 (the reference family's does)."""
    formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
    """PIL format names that may be opened (JPEG covers cameras' multi-picture MPO files)."""

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or not self.max_aspect_ratio >= 1:
            raise ValueError(f"image limits must be positive (aspect ratio >= 1), got {self}")


DEFAULT_LIMITS = ImageLimits()
MAX_IMAGE_PIXELS = DEFAULT_LIMITS.max_pixels
MAX_ASPECT_RATIO = DEFAULT_LIMITS.max_aspect_ratio


class ImageError(ValueError):
    """An image could not be loaded or is unusable; the message names the source and reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot load image {source}: {reason}")
        self.source = source
        self.reason = reason


class ImageTooLargeError(ImageError):
    """More encoded bytes or pixels than the limits allow (a server answers 413)."""


def load_image(source: ImageSource, *, allow_remote: bool = False,
               limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Load ``source`` as a fully decoded RGB image (transparency composited onto white).

    Raises:
        ImageError: missing file, corrupt or unidentified data, a format outside
            ``limits.formats``, more bytes or pixels than ``limits`` allow, an extreme aspect
            ratio, a remote URL without ``allow_remote``, an unsupported source type.
    """
    if isinstance(source, Image.Image):
        return _finish(source, "<PIL image>", limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "<bytes>", limits)
    if isinstance(source, Path):
        return _load_path(source, limits)
    if isinstance(source, str):
        return _load_string(source, allow_remote, limits)
    raise ImageError(f"<{type(source).__name__}>", "unsupported image source type "
                     "(expected a path, bytes, a data: URL or a PIL image)")


def _load_string(source: str, allow_remote: bool, limits: ImageLimits) -> Image.Image:
    """Dispatch a string source: data URL, http(s) URL, file:// URL or plain path."""
    if source.startswith("data:"):
        return _decode(_data_url_bytes(source, limits), "<data URL>", limits)
    if source.startswith(("http://", "https://")):
        if not allow_remote:
            raise ImageError(source, "remote fetching is disabled (pass allow_remote=True, "
                                     "or download the image and pass a path)")
        return _decode(_fetch(source, limits), source, limits)
    if source.startswith("file://"):
        return _load_path(Path(source[len("file://"):]), limits)
    return _load_path(Path(source), limits)


def _load_path(path: Path, limits: ImageLimits) -> Image.Image:
    if not path.is_file():
        raise ImageError(str(path), "file not found" if not path.exists() else "not a regular file")
    try:
        with path.open("rb") as f:
            # The size is checked before reading: a huge file must not be pulled into memory.
            _check_bytes(path.stat().st_size, str(path), limits)
            data = f.read(limits.max_bytes + 1)
    except OSError as err:
        raise ImageError(str(path), f"cannot read file ({err})") from err
    _check_bytes(len(data), str(path), limits)  # the file grew while we read it
    return _decode(data, str(path), limits)


def _check_bytes(size: int, name: str, limits: ImageLimits) -> None:
    if size > limits.max_bytes:
        raise ImageTooLargeError(name, f"{size} bytes, more than the limit of {limits.max_bytes} "
                               f"({limits.max_bytes / MIB:g} MiB)")


def base64_size(text: str, start: int = 0) -> int:
    """The bytes the base64 payload `text[start:]` decodes to, without decoding (or copying) it: 3
    per 4 characters, less its '=' padding (exact for a valid payload; others fail to decode anyway)."""
    return (len(text) - start) // 4 * 3 - text[max(start, len(text) - 2):].count("=")


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    """Payload of ``data:image/<fmt>;base64,<payload>``."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError("<data URL>", "expected 'data:image/<format>;base64,<payload>'")
    _check_bytes(base64_size(payload), "<data URL>", limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError("<data URL>", f"invalid base64 payload ({err})") from err


def _fetch(url: str, limits: ImageLimits) -> bytes:
    """Fetch at most ``limits.max_bytes`` from ``url`` (only reached with allow_remote=True)."""
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:
            data = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ImageError(url, f"download failed ({err})") from err
    _check_bytes(len(data), url, limits)
    return data


def _decode(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    """Open ``data`` as one of the allowed formats; the size is checked from the header before decoding."""
    if not data:
        raise ImageError(name, "empty data")
    _check_bytes(len(data), name, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError as err:
        raise ImageError(name, "unreadable or corrupt image data, or not one of the accepted formats "
                               f"({', '.join(limits.formats)})") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(name, f"unreadable or corrupt image data ({err})") from err
    return _finish(image, name, limits)


def _finish(image: Image.Image, name: str, limits: ImageLimits) -> Image.Image:
    """Check the size, force decoding (lazy PIL images fail late otherwise) and convert to RGB."""
    _check_size(image.width, image.height, name, limits)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(name, f"unreadable or corrupt image data ({err})") from err
    return _to_rgb(image)


def _check_size(width: int, height: int, name: str, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(name, f"zero-sized image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(name, f"too large ({width}x{height} = {width * height} pixels, "
                               f"limit {limits.max_pixels})")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageError(name, f"aspect ratio {ratio:.1f} of {width}x{height} exceeds "
                               f"{limits.max_aspect_ratio:g} (image processors reject it)")


# Single-channel modes with more than 8 bits: PIL's convert("RGB") clips them (16-bit grey
# becomes white, [0, 1] floats black), so they are rescaled to 8 bits first.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparency is composited onto white as transformers' convert_to_rgb does."""
    if image.mode in _WIDE_MODES:
        image = Image.fromarray(to_8bit(np.asarray(image), image.mode), "L")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of a wide PIL mode -> uint8.

    16-bit modes (``I;16*``) map their full scale: value / 257. Otherwise by the range the values
    evidently use: floats (``F``) within [0, 1] are multiplied by 255; values within [0, 255] are
    kept; 32-bit integers (``I``) within [0, 65535] are 16-bit data (/ 257). Anything else
    (negative values, HDR) is stretched from its minimum to its maximum.
    """
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16"):
        scaled = values / 257
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    elif low >= 0 and high <= 255:
        scaled = values
    elif mode == "I" and low >= 0 and high <= 65535:
        scaled = values / 257
    else:
        scaled = (values - low) / max(high - low, 1e-12) * 255
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
