"""Find weight files inside installed packages and cache their conversions as safetensors.

The ported trunks read their original files (dlib's ``.dat``, OpenCV's ONNX) from the packages that
ship them; converting them takes seconds, so the result is cached once per source file in
``$FROMFACE_CACHE`` (default ``~/.cache/fromface``), keyed by the source file's content hash.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fromface.errors import ConfigError

# Bump when a converter changes what it writes, so stale caches are not reused.
CACHE_FORMAT = "1"


def package_file(package: str, relative: str, install_hint: str = "") -> Path:
    """Path of a data file shipped inside an installed package (never downloaded).

    The package is located without importing it: ``face_recognition_models`` imports the removed
    ``pkg_resources`` at import time, but its files are all we need.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        hint = f" (install it: {install_hint})" if install_hint else ""
        raise ConfigError(f"package {package!r} is not installed{hint}")
    for root in roots:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise ConfigError(f"{Path(roots[0]) / relative}: weight file missing from the installed package {package!r}")


def state_digest(module: torch.nn.Module) -> str:
    """Short hash of a module's weights: cache keys that notice when a package ships new ones."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where converted weights live: ``$FROMFACE_CACHE`` or ``~/.cache/fromface``."""
    env = os.environ.get("FROMFACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fromface"


def file_digest(path: Path, length: int = 64) -> str:
    """sha256 of a file's bytes (hex, ``length`` characters): the cache key, so an updated package is re-converted."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def cached_path(name: str, source: Path, digest: str | None = None) -> Path:
    digest = (digest or file_digest(source))[:16]
    return cache_dir() / f"{name}-{digest}-v{CACHE_FORMAT}.safetensors"


def load_converted(
    name: str,
    source: Path,
    convert: Callable[[Path], dict[str, torch.Tensor]],
    use_cache: bool = True,
    expected_sha256: str | None = None,
) -> dict[str, torch.Tensor]:
    """State dict converted from ``source``, from the safetensors cache when present.

    A broken cache file is ignored and rewritten; an unwritable cache directory only costs the
    conversion on every load (with a warning), never an error. A source whose sha256 differs from
    ``expected_sha256`` (the file parity was measured on) still loads, with a warning.
    """
    from safetensors.torch import load_file, save_file

    digest = file_digest(source)
    if expected_sha256 and digest != expected_sha256:
        warnings.warn(f"{source}: sha256 {digest[:16]}... differs from the file the port was checked against "
                      f"({expected_sha256[:16]}...); its parity is unverified", stacklevel=2)
    if not use_cache:
        return convert(source)
    target = cached_path(name, source, digest)
    if target.is_file():
        try:
            return load_file(str(target))
        except Exception:  # noqa: BLE001 - any damage to a cache file means: convert again
            warnings.warn(f"{target}: unreadable cache file, converting {source} again", stacklevel=2)
    state = convert(source)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"source": str(source)})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, target)  # atomic: concurrent loaders never see half a file
    except OSError as exc:
        warnings.warn(f"cannot cache converted weights in {target.parent}: {exc}", stacklevel=2)
    return state


def crops_to_tensor(crops: np.ndarray, mean: tuple, std: tuple, channel_order: str = "RGB") -> torch.Tensor:
    """uint8 RGB crops (N, H, W, 3) or (H, W, 3) -> normalised float NCHW, as a model's Preprocess says.

    ``mean``/``std`` are in [0, 1] pixel units, so ``x = (pixel / 255 - mean) / std``.
    """
    arr = np.asarray(crops)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ConfigError(f"crops must be (N, H, W, 3) RGB, got shape {arr.shape}")
    if channel_order.upper() == "BGR":
        arr = arr[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    m = np.asarray(mean, dtype=np.float32) * 255.0
    s = np.asarray(std, dtype=np.float32) * 255.0
    if channel_order.upper() == "BGR":  # mean/std are given in RGB order
        m, s = m[::-1].copy(), s[::-1].copy()
    m, s = torch.from_numpy(m).view(1, 3, 1, 1), torch.from_numpy(s).view(1, 3, 1, 1)
    return (x - m) / s
