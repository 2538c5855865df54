"""One image loader for every entry point, so bad input fails the same clear way everywhere."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fromface.errors import ImageError

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray

#: Largest image accepted (pixels). Bigger files are refused as likely decompression bombs.
MAX_PIXELS = 64_000_000

#: File name endings that folder scans (embed, enroll, align) treat as images. HEIC/HEIF is listed so that such a
#: file is reported with how to convert it, not passed over in silence.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff",
                              ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".heic", ".heif"})

_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")
HEIC_HINT = ("HEIC/HEIF images are not supported; convert it to JPEG first (e.g. `heif-convert photo.heic "
             "photo.jpg` from libheif, or export as JPEG from the phone or photo app)")


def scan_images(folder: str | os.PathLike, recursive: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files in ``folder`` (sorted; sub-folders too with ``recursive``) and, for every other file, (path,
    why it was skipped), so that nothing is passed over in silence."""
    root = Path(folder)
    found = root.rglob("*") if recursive else root.iterdir()
    images, skipped = [], []
    for path in sorted(found):
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            what = f"extension {path.suffix}" if path.suffix else "no extension"
            skipped.append((path, f"not an image file ({what}; images end in .jpg, .png, .webp, .bmp, .tif, .gif)"))
    return images, skipped


def describe_source(source: ImageSource) -> str:
    """A short printable name for an image source, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "I" and arr.max() <= 255:
            hi = 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    out = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3 or out.shape[0] == 0 or out.shape[1] == 0:
        raise ImageError(name, f"unsupported image layout {out.shape}")
    return np.ascontiguousarray(out)


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(name, f"expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(name, "array contains NaN or infinite values")
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(name, f"unsupported array dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Accepts a path, encoded bytes, a PIL image or a numpy array (assumed RGB). Raises
    :class:`ImageError` naming the source for missing, empty, corrupt, truncated or oversized files.
    """
    name = describe_source(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise ImageError(name, "no such file")
            if path.is_dir():
                raise ImageError(name, "is a directory, not an image")
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from None
        elif isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            raise ImageError(name, "expected a path, bytes, a PIL image or a numpy array")
        if not data:
            raise ImageError(name, "file is empty")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
                raise ImageError(name, HEIC_HINT) from None
            raise ImageError(name, "not a recognised image format (corrupt or not an image)") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(name, f"refused as a likely decompression bomb ({exc})") from None
        except Exception as exc:  # PIL plugins raise assorted errors (struct.error, ValueError...) on bad headers
            raise ImageError(name, f"cannot parse image header ({type(exc).__name__}: {exc}); corrupt file") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(name, f"image is {width}x{height}, over the limit of {max_pixels:,} pixels")
    # Some libraries (face_recognition among them) switch on Pillow's global "load truncated images",
    # which would turn a cut-off file into silently grey pixels: be strict while we decode.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(name, f"refused as a likely decompression bomb ({exc})") from None
    except Exception as exc:  # OSError for truncation, but plugins also raise struct.error, IndexError, ...
        raise ImageError(name, f"cannot decode image ({exc}); the file may be truncated or corrupt") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return _to_rgb(img, name)
