"""fromface: occlusion-robust face recognition (FROM, Qiu et al., TPAMI 2021)."""

from fromface.errors import FromfaceError, ImageError

__version__ = "0.1.0"

__all__ = ["FromfaceError", "ImageError", "__version__"]
