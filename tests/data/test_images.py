import base64
import http.server
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dvlm.data.images import MAX_IMAGE_PIXELS, ImageError, ImageLimits, load_image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_loads_path_str_path_and_file_url(tmp_path, make_png):
    file = tmp_path / "red.png"
    file.write_bytes(make_png((30, 20), (255, 0, 0)))
    for source in (file, str(file), f"file://{file}"):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (30, 20)
        assert image.getpixel((0, 0)) == (255, 0, 0)


def test_loads_bytes_data_url_and_pil(make_png):
    data = make_png((8, 9), (0, 0, 255))
    assert load_image(data).getpixel((3, 3)) == (0, 0, 255)
    assert load_image(bytearray(data)).size == (8, 9)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert load_image(url).getpixel((0, 0)) == (0, 0, 255)
    assert load_image(Image.new("RGB", (5, 5), (1, 2, 3))).getpixel((4, 4)) == (1, 2, 3)


def test_converts_modes_to_rgb_with_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    palette = Image.new("RGB", (4, 4), (0, 255, 0)).convert("P")
    assert load_image(palette).getpixel((1, 1)) == (0, 255, 0)
    assert load_image(Image.new("LA", (4, 4), (0, 255))).getpixel((0, 0)) == (0, 0, 0)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png.*file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(str(tmp_path))


def test_corrupt_empty_and_truncated_bytes(make_png):
    with pytest.raises(ImageError, match=r"<bytes>.*unreadable or corrupt"):
        load_image(b"this is not an image")
    with pytest.raises(ImageError, match=r"<bytes>: empty data"):
        load_image(b"")
    truncated = make_png((64, 64), (10, 20, 30))[:60]
    with pytest.raises(ImageError, match=r"<bytes>.*unreadable or corrupt"):
        load_image(truncated)


def test_corrupt_file_names_the_path(tmp_path):
    file = tmp_path / "bad.jpg"
    file.write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(ImageError, match=r"bad\.jpg.*unreadable or corrupt"):
        load_image(file)


def test_zero_sized_image():
    with pytest.raises(ImageError, match=r"<PIL image>.*zero-sized image \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))


def test_huge_image_is_refused_from_its_header_before_decoding():
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    with pytest.raises(ImageError, match=r"<bytes>.*too large"):
        load_image(png_header_only(side, side))


def test_extreme_aspect_ratio():
    with pytest.raises(ImageError, match="aspect ratio 201.0"):
        load_image(Image.new("RGB", (402, 2)))
    assert load_image(Image.new("RGB", (400, 2))).size == (400, 2)


def test_remote_url_is_refused_by_default():
    with pytest.raises(ImageError, match=r"http://example\.com/a\.png.*remote fetching is disabled"):
        load_image("http://example.com/a.png")
    with pytest.raises(ImageError, match="remote fetching is disabled"):
        load_image("https://example.com/a.png")


def test_remote_url_with_allow_remote_fetches_from_a_local_server(make_png):
    data = make_png((6, 7), (9, 9, 9))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        image = load_image(f"http://127.0.0.1:{server.server_port}/x.png", allow_remote=True)
    finally:
        thread.join(timeout=5)
        server.server_close()
    assert image.size == (6, 7)


def test_bad_data_urls_and_types():
    with pytest.raises(ImageError, match=r"<data URL>.*expected 'data:image"):
        load_image("data:text/plain,hello")
    with pytest.raises(ImageError, match=r"<data URL>.*invalid base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match=r"<int>.*unsupported image source type"):
        load_image(42)


def test_image_error_is_a_value_error_with_fields():
    with pytest.raises(ValueError) as info:
        load_image(Path("/no/such/file.png"))
    assert info.value.source == "/no/such/file.png"
    assert info.value.reason == "file not found"
    assert isinstance(info.value, ImageError)


def test_only_common_raster_formats_are_opened():
    """D22: EPS (rendered by Ghostscript when installed) and other exotic formats are refused."""
    import io

    eps = io.BytesIO()
    Image.new("RGB", (4, 4)).save(eps, format="EPS")
    with pytest.raises(ImageError, match=r"not one of the accepted formats \(PNG, JPEG"):
        load_image(eps.getvalue())
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        data = io.BytesIO()
        Image.new("RGB", (4, 4), (0, 0, 200)).save(data, format=fmt)
        assert load_image(data.getvalue()).size == (4, 4), fmt


def test_file_size_is_checked_before_reading(tmp_path):
    """D21: a 1 GiB file is refused from its size, without reading it (sparse: costs no disk)."""
    import resource

    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(2**30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match=r"big\.png.*1073741824 bytes, more than the limit"):
        load_image(big)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing read


def test_limits_are_settable(make_png):
    from dvlm.data.images import ImageLimits

    data = make_png((40, 40))
    with pytest.raises(ImageError, match="too large .*limit 1000"):
        load_image(data, limits=ImageLimits(max_pixels=1000))
    with pytest.raises(ImageError, match="more than the limit of 100 "):
        load_image(data, limits=ImageLimits(max_bytes=100))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    with pytest.raises(ImageError, match=r"<data URL>.*more than the limit"):
        load_image(url, limits=ImageLimits(max_bytes=100))
    with pytest.raises(ValueError, match="must be positive"):
        ImageLimits(max_pixels=0)


def test_wide_grey_modes_are_rescaled_not_clipped():
    """D5: 16-bit grey became white and [0, 1] floats black; both are rescaled to 8 bits."""
    import io

    import numpy as np

    sixteen = np.full((4, 4), 40000, dtype=np.uint16)  # 40000 / 257 = 155.6
    png = io.BytesIO()
    Image.fromarray(sixteen).save(png, format="PNG")
    assert load_image(png.getvalue()).getpixel((0, 0)) == (156, 156, 156)
    assert load_image(Image.fromarray(sixteen)).getpixel((0, 0)) == (156, 156, 156)
    floats = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert load_image(floats).getpixel((0, 0)) == (128, 128, 128)
    wide = Image.fromarray(np.array([[-5.0, 5.0]], dtype=np.float32))  # outside [0, 255]: stretched
    assert load_image(wide).getpixel((0, 0)) == (0, 0, 0) and load_image(wide).getpixel((1, 0)) == (255, 255, 255)
    assert load_image(Image.fromarray(np.full((4, 4), 3000, dtype=np.int32))).getpixel((0, 0)) == (12, 12, 12)


# -- each limit exactly at the limit, and one past it ------------------------------------------------


def test_an_image_of_exactly_max_pixels_is_accepted():
    """The README: "at most 25 MP (width x height)". 5000 x 5000 = 25,000,000 pixels loads;
    5000 x 5001 is refused from its header. With a set limit of 1000: 40 x 25 loads, 7 x 143 = 1001 not."""
    assert MAX_IMAGE_PIXELS == 25_000_000
    assert load_image(Image.new("L", (5000, 5000))).size == (5000, 5000)
    with pytest.raises(ImageError, match=r"too large \(5000x5001 = 25005000 pixels, limit 25000000\)"):
        load_image(png_header_only(5000, 5001))
    limits = ImageLimits(max_pixels=1000)
    assert load_image(Image.new("RGB", (40, 25)), limits=limits).size == (40, 25)
    with pytest.raises(ImageError, match=r"too large \(7x143 = 1001 pixels, limit 1000\)"):
        load_image(Image.new("RGB", (7, 143)), limits=limits)


def test_an_aspect_ratio_of_exactly_the_limit_is_accepted():
    """At most 200: 2000 x 10 (200.0) loads, 2001 x 10 (200.1) does not, either way round."""
    assert load_image(Image.new("RGB", (2000, 10))).size == (2000, 10)
    assert load_image(Image.new("RGB", (10, 2000))).size == (10, 2000)
    for size in ((2001, 10), (10, 2001)):
        with pytest.raises(ImageError, match="aspect ratio 200.1 "):
            load_image(Image.new("RGB", size))


@pytest.mark.parametrize("source", ["path", "bytes", "data URL"])
def test_an_image_of_exactly_max_bytes_is_accepted(tmp_path, make_png, source):
    """"At most max_bytes encoded": an image of exactly that many bytes loads from a file, bytes or
    a data URL (its base64 padding not counted as data), one byte less of limit refuses it."""
    data = make_png((29, 20))
    assert len(data) % 3 != 0  # the data URL's payload ends in padding (89 bytes: 120 characters, one "=")
    file = tmp_path / "image.png"
    file.write_bytes(data)
    given = {"path": file, "bytes": data, "data URL": "data:image/png;base64," + base64.b64encode(data).decode()}
    assert load_image(given[source], limits=ImageLimits(max_bytes=len(data))).size == (29, 20)
    with pytest.raises(ImageError, match=f"{len(data)} bytes, more than the limit of {len(data) - 1} "):
        load_image(given[source], limits=ImageLimits(max_bytes=len(data) - 1))
