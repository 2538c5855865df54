"""Find weight files inside installed packages and cache their conversions as safetensors.

The ported trunks read their original files (dlib's ``.dat``, OpenCV's ONNX) from the packages that
ship them; converting them takes seconds, so the result is cached once per source file in
``$FROMFACE_CACHE`` (default ``~/.cache/fromface``), keyed by the source file's content hash.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fromface.data.files import atomic_write, file_sha256, package_file  # noqa: F401  (package_file: re-exported)
from fromface.errors import ConfigError

# Bump when a converter changes what it writes, so stale caches are not reused.
CACHE_FORMAT = "1"


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


def cached_path(name: str, source: Path, digest: str | None = None) -> Path:
    digest = (digest or file_sha256(source))[:16]
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

    digest = file_sha256(source)
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
        with atomic_write(target) as tmp:  # concurrent loaders never see half a file
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"source": str(source)})
    except OSError as exc:
        warnings.warn(f"cannot cache converted weights in {target.parent}: {exc}", stacklevel=2)
    return state


def load_tag_state(model: torch.nn.Module, name: str, tag: str, info: dict[str, Any]) -> None:
    """Load a shipped tag's trained parts after checking the file's checksum; the rest must be the trunk's."""

    path = Path(info["file"])
    if not path.is_file():
        raise ConfigError(f"{name}:{tag}: weights file {path} is missing; reinstall fromface")
    if info.get("sha256") and file_sha256(path) != info["sha256"]:
        raise ConfigError(f"{name}:{tag}: {path} fails its sha256 check (corrupt or replaced); reinstall fromface")
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    trunk = tuple(info.get("trunk_prefixes", ("backbone.", "head.")))
    untrained = [k for k in result.missing_keys if not k.startswith(trunk)]
    if result.unexpected_keys or untrained:
        raise ConfigError(f"{name}:{tag}: {path} does not fit the model "
                          f"(unexpected {result.unexpected_keys[:3]}, missing {untrained[:3]})")
