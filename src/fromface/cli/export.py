"""``fromface export onnx OUT.onnx``: the model as ONNX (dynamic batch; embedding, mask, pattern_logits)."""

from __future__ import annotations

import argparse

from fromface.cli._output import check_output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX",
                       description="Export a model with a dynamic batch axis. Outputs: embedding and, for FROM "
                       "models, mask and pattern_logits. Preprocessing and thresholds go into the file's metadata, "
                       "so `FaceRecognizer(\"OUT.onnx\")` and `--model OUT.onnx` use it directly.")
    p.add_argument("format", choices=("onnx",))
    p.add_argument("output", metavar="OUT.onnx")
    p.add_argument("--model", default=None,
                   help="'default', a registered model name (name:tag) or a training checkpoint (default model)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.onnx if it exists")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch comparison")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fromface.inference.onnx_backend import OnnxFaceModel, export_onnx
    from fromface.inference.recognizer import FaceRecognizer

    check_output_file(args.output, force=args.force)
    rec = FaceRecognizer(args.model)
    net = rec.torch_model
    path = export_onnx(net, args.output, rec.tag, rec.thresholds)  # thresholds only for a tag's own weights
    print(f"{path}: {getattr(net, 'model_name', '?')} exported (dynamic batch, {path.stat().st_size / 1e6:.1f} MB)")
    if args.no_check:
        return 0
    h, w = net.preprocess.size
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(x).embedding.numpy()
    got = OnnxFaceModel(path)(x.numpy())[0]
    diff = float(np.abs(got - want).max())
    print(f"onnxruntime vs PyTorch on a batch of 3: max abs embedding difference {diff:.2e}")
    return 0 if diff <= 1e-4 else 1
