"""load_image: every input mode becomes HxWx3 uint8 RGB; every bad file fails with an ImageError naming it."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fromface.data.images import load_image
from fromface.errors import FromfaceError, ImageError


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size but carries no pixel data: what a decompression bomb looks like to open()."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _check_rgb(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert arr.shape == (*shape, 3) and arr.dtype == np.uint8 and arr.flags.c_contiguous


def test_grayscale_becomes_three_equal_channels():
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (7, 1))
    arr = load_image(_encode(Image.fromarray(gray, "L")))
    _check_rgb(arr, gray.shape)
    assert (arr[:, :, 0] == gray).all() and (arr[:, :, 1] == gray).all() and (arr[:, :, 2] == gray).all()


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (255, 0, 0, 255)  # opaque red
    rgba[:, 3:] = (0, 0, 255, 0)  # fully transparent blue -> white
    arr = load_image(_encode(Image.fromarray(rgba, "RGBA")))
    _check_rgb(arr, (4, 6))
    assert (arr[:, :3] == (255, 0, 0)).all() and (arr[:, 3:] == (255, 255, 255)).all()


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (5, 5), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert (load_image(_encode(pal)) == (10, 200, 30)).all()
    pal.info["transparency"] = 1
    assert (load_image(_encode(pal, transparency=1)) == 255).all()


def test_16bit_grayscale_scaled_to_8bit():
    ramp = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I")
    arr = load_image(_encode(img))
    _check_rgb(arr, (1, 3))
    assert arr[0, :, 0].tolist() == [0, 100, 255]


def test_cmyk_jpeg_converted():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    arr = load_image(_encode(cmyk, "JPEG", quality=100))
    _check_rgb(arr, (8, 8))
    r, g, b = arr.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red, right half blue
    rgb[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    arr = load_image(_encode(Image.fromarray(rgb), "JPEG", quality=100, exif=exif.tobytes()))
    _check_rgb(arr, (40, 20))
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60  # former left (red) half is now on top
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


def test_arrays_and_pil_images_pass_through(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (load_image(arr) == arr).all()
    assert (load_image(Image.fromarray(arr)) == arr).all()
    assert load_image(arr[:, :, 0]).shape == (5, 7, 3)
    assert load_image(np.ones((5, 7, 3), np.float32)).max() == 255
    assert load_image(np.full((2, 2, 4), 65535, np.uint16)).tolist() == np.full((2, 2, 3), 255).tolist()
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    assert (load_image(path) == arr).all() and (load_image(str(path)) == arr).all()


@pytest.mark.parametrize("bad", [np.zeros((3, 3, 2), np.uint8), np.zeros((0, 4, 3), np.uint8),
                                 np.zeros((3, 3, 3), np.int64), np.full((2, 2, 3), np.nan, np.float32)])
def test_bad_arrays_rejected(bad):
    with pytest.raises(ImageError):
        load_image(bad)


def test_missing_path_and_directory_named(tmp_path):
    with pytest.raises(ImageError, match="no such file") as err:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(err.value)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_empty_corrupt_and_truncated_files_named(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as err:
        load_image(empty)
    assert str(empty) in str(err.value)

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="not a recognised image") as err:
        load_image(junk)
    assert str(junk) in str(err.value)

    noisy = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG"):
        data = _encode(Image.fromarray(noisy), fmt)
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError, match="truncated or corrupt") as err:
            load_image(cut)
        assert str(cut) in str(err.value)


def test_wrong_type_rejected():
    with pytest.raises(ImageError, match="expected a path"):
        load_image(12345)  # type: ignore[arg-type]


def test_decompression_bombs_refused():
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_png_header_only(9000, 8000))  # 72 Mpx > 64 Mpx default
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_header_only(20000, 20000))  # so big that PIL itself refuses to open it
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_encode(Image.new("RGB", (100, 100))), max_pixels=5000)


def test_errors_are_fromface_errors():
    assert issubclass(ImageError, FromfaceError)


def test_truncated_file_rejected_even_when_pillow_is_lenient(tmp_path, monkeypatch):
    """face_recognition turns on Pillow's global LOAD_TRUNCATED_IMAGES; our loader must stay strict."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    noisy = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noisy), "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


@pytest.mark.parametrize("mode,fmt", [("P", "GIF"), ("1", "PNG"), ("LA", "PNG"), ("RGB", "BMP"), ("RGB", "TIFF"),
                                      ("LAB", "TIFF"), ("F", "TIFF"), ("I;16", "TIFF"), ("CMYK", "TIFF"),
                                      ("RGBA", "WEBP"), ("RGB", "PPM"), ("RGB", "TGA"), ("RGB", "PCX"), ("RGB", "SGI"),
                                      ("RGB", "ICO"), ("RGBA", "QOI"), ("L", "SPIDER")])
def test_every_mode_and_format_pillow_writes_becomes_rgb(mode: str, fmt: str):
    """The loader's contract for whatever Pillow can open: (H, W, 3) uint8, the size of the file's image."""
    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 256, (7, 9, 3), dtype=np.uint8))
    try:
        data = _encode(rgb.convert(mode), fmt)
    except (OSError, KeyError, ValueError):
        pytest.skip(f"this Pillow cannot write {mode} as {fmt}")
    _check_rgb(load_image(data), (7, 9) if fmt != "ICO" else Image.open(io.BytesIO(data)).size[::-1])


@pytest.mark.parametrize("width,height", [(8001, 8000), (65535, 65535), (2**31 - 1, 1), (1, 2**31 - 1)])
def test_huge_declared_sizes_refused_from_the_header(width: int, height: int):
    with pytest.raises(ImageError, match="over the limit|decompression bomb") as err:
        load_image(_png_header_only(width, height))
    assert "\n" not in str(err.value)
