"""The image URL policy: data URLs always; local files only inside the allowed directory (symlinks and
'..' resolved, no probing outside); http(s) only when allowed, size-capped and time-limited."""

from __future__ import annotations

import http.server
import io
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from dvlm.data.images import ImageLimits
from dvlm.serve.errors import APIError
from dvlm.serve.images import ImagePolicy, load_image_url
from tests.serve.test_app import data_url

WHERE = "messages[0].content[0].image_url"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def refused(url: str, policy: ImagePolicy) -> APIError:
    with pytest.raises(APIError) as caught:
        load_image_url(url, policy, WHERE)
    assert caught.value.message.startswith(WHERE) and caught.value.param == WHERE
    return caught.value


@pytest.fixture
def root(tmp_path, image) -> Path:
    """tmp/allowed/{cat.png, sub/dog.png, link-in.png -> cat.png, link-out.png -> ../secret.png}."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    for path in (allowed / "cat.png", allowed / "sub" / "dog.png", tmp_path / "secret.png",
                 allowed / "with space.png"):
        path.write_bytes(png_bytes(image))
    (allowed / "link-in.png").symlink_to(allowed / "cat.png")
    (allowed / "link-out.png").symlink_to(tmp_path / "secret.png")
    (allowed / "dir-out").symlink_to(tmp_path)
    return allowed


def test_data_url_always_and_capped(image):
    policy = ImagePolicy()
    assert load_image_url(data_url(image), policy, WHERE).size == image.size
    error = refused(data_url(image), ImagePolicy(limits=ImageLimits(max_bytes=100)))
    assert error.status == 413 and "more than the server's limit of 100" in error.message


def test_local_files_only_when_allowed(root):
    error = refused(str(root / "cat.png"), ImagePolicy())
    assert error.status == 400 and "local image paths are disabled" in error.message


@pytest.mark.parametrize("name", ["cat.png", "sub/dog.png", "link-in.png", "sub/../cat.png", "with space.png"])
def test_local_files_inside_the_root(root, image, name):
    policy = ImagePolicy(local_root=root)
    for url in (name, str(root / name), (root / name).as_uri()):  # relative, absolute, file:// (%20 quoted)
        assert load_image_url(url, policy, WHERE).size == image.size, url


@pytest.mark.parametrize("name", ["../secret.png", "link-out.png", "dir-out/secret.png", "sub/../../secret.png",
                                  "/etc/passwd", "../does-not-exist.png", "/nonexistent/x.png"])
def test_escapes_are_refused_without_revealing_what_exists(root, name):
    error = refused(name, ImagePolicy(local_root=root))
    assert error.status == 400 and "outside the directory this server may read images from" in error.message


def test_missing_and_unusual_files_inside_the_root(root):
    policy = ImagePolicy(local_root=root)
    assert "file not found" in refused("missing.png", policy).message
    assert "not a regular file" in refused("sub", policy).message
    os.mkfifo(root / "pipe.png")
    started = time.monotonic()
    assert "not a regular file" in refused("pipe.png", policy).message  # and opening it did not block
    assert time.monotonic() - started < 2
    assert "file URLs must name a local path" in refused("file://example.com/cat.png", policy).message


@pytest.mark.parametrize("url, message", [("cat\x00.png", "NUL character"), ("http://[::1/cat.png", "not a valid URL")])
def test_malformed_urls_are_400(root, url, message):
    error = refused(url, ImagePolicy(local_root=root, allow_remote=True))
    assert error.status == 400 and message in error.message


def test_local_file_over_the_byte_limit_is_413(root):
    error = refused("cat.png", ImagePolicy(local_root=root, limits=ImageLimits(max_bytes=64)))
    assert error.status == 413


def test_local_root_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImagePolicy(local_root=tmp_path / "missing")


# -- remote ---------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    image = b""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/cat.png":
            self._send(self.image)
        elif self.path == "/chunked.png":  # no Content-Length: the cap applies while reading
            self.send_response(200)
            self.end_headers()
            self.wfile.write(self.image)
        elif self.path == "/slow.png":  # a trickle: each byte well within a socket timeout
            self.send_response(200)
            self.end_headers()
            for byte in self.image[:40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/cat.png")
            self.end_headers()
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
        else:
            self.send_error(404)

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output clean
        pass


class _Site(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that stops reading early is expected here
        pass


@pytest.fixture(scope="module")
def site(image):
    _Handler.image = png_bytes(image)
    server = _Site(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_urls_only_when_allowed(site, image):
    error = refused(f"{site}/cat.png", ImagePolicy())
    assert error.status == 400 and "remote image URLs are disabled" in error.message
    policy = ImagePolicy(allow_remote=True)
    assert load_image_url(f"{site}/cat.png", policy, WHERE).size == image.size
    assert load_image_url(f"{site}/redirect", policy, WHERE).size == image.size


def test_remote_size_cap_timeout_and_failures(site):
    small = ImagePolicy(allow_remote=True, limits=ImageLimits(max_bytes=100))
    assert refused(f"{site}/cat.png", small).status == 413  # from Content-Length
    assert refused(f"{site}/chunked.png", small).status == 413  # while reading
    started = time.monotonic()
    error = refused(f"{site}/slow.png", ImagePolicy(allow_remote=True, remote_timeout_s=0.5))
    assert "took longer than 0.5 s" in error.message and time.monotonic() - started < 1.5
    allowed = ImagePolicy(allow_remote=True)
    assert "downloading" in refused(f"{site}/missing.png", allowed).message
    assert "non-http(s)" in refused(f"{site}/to-ftp", allowed).message  # urllib alone would follow it


def test_too_many_pixels_is_413_and_a_bad_aspect_ratio_400(image):
    error = refused(data_url(image), ImagePolicy(limits=ImageLimits(max_pixels=100)))
    assert error.status == 413 and "too large" in error.message
    error = refused(data_url(Image.new("RGB", (402, 2))), ImagePolicy())
    assert error.status == 400 and "aspect ratio" in error.message


@pytest.mark.parametrize("name", ["loop.png", "sub/loop.png/x", "a.png"])
def test_a_symlink_loop_inside_the_root_is_400_naming_the_image(root, name):
    """loop.png -> loop.png, and a.png -> b.png -> a.png: used to be a 500 "internal server error"."""
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "sub" / "loop.png").symlink_to(root / "sub" / "loop.png")
    (root / "a.png").symlink_to(root / "b.png")
    (root / "b.png").symlink_to(root / "a.png")
    error = refused(name, ImagePolicy(local_root=root))
    assert error.status == 400 and error.code == "invalid_image"
    if sys.version_info < (3, 13):  # Path.resolve raises on a loop
        assert error.message == f"{WHERE}: {name!r} cannot be resolved (a symlink loop)"
    else:  # it returns the path unresolved, whose opening fails
        assert error.message == f"{WHERE}: {name!r}: cannot open it (Too many levels of symbolic links)"
