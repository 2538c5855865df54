"""fromface: occlusion-robust face recognition (FROM, Qiu et al., TPAMI 2021)."""

from fromface.errors import FromfaceError, ImageError

__version__ = "0.1.0"

__all__ = ["FaceRecognizer", "FromfaceError", "Gallery", "ImageError", "__version__"]

# Imported on first use so `import fromface` stays light (no torch until a model is needed).
_LAZY = {"FaceRecognizer": "fromface.inference.recognizer", "Gallery": "fromface.inference.gallery"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fromface' has no attribute {name!r}")
