"""Models: one factory (:func:`create_model`) builds every registered network by name."""

from fromface.models import dlib_resnet, iresnet, mobilefacenet, sface  # noqa: F401  (registers models)
from fromface.models.from_net import FROM, register_from_variant
from fromface.models.outputs import FaceOutput
from fromface.models.registry import (
    Preprocess,
    create_model,
    get_spec,
    list_models,
    register_model,
    register_pretrained,
)

for _name in ("lresnet50e_ir", "iresnet18", "iresnet50", "mobilefacenet", "sface_net", "dlib_resnet"):
    register_from_variant(_name)

from fromface.models.pretrained import register_shipped_tags  # noqa: E402  (after every model exists)

register_shipped_tags()

__all__ = [
    "FROM",
    "FaceOutput",
    "Preprocess",
    "create_model",
    "get_spec",
    "list_models",
    "register_from_variant",
    "register_model",
    "register_pretrained",
]
