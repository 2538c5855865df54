"""``fromface export onnx OUT.onnx``: the model as ONNX (dynamic batch; embedding, mask, pattern_logits), and for a
FROM model with an align head its second graph, ``OUT.align.onnx`` (landmark_shift)."""

from __future__ import annotations

import argparse

from fromface.cli._output import check_output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX",
                       description="Export a model with a dynamic batch axis. Outputs: embedding and, for FROM "
                       "models, mask and pattern_logits. A model with an align head also gets OUT.align.onnx (its "
                       "first look at a face: landmark_shift); keep the two files together. Preprocessing and "
                       "thresholds go into the file's metadata, so `FaceRecognizer(\"OUT.onnx\")` and "
                       "`--model OUT.onnx` use it directly, without torch.")
    p.add_argument("format", choices=("onnx",))
    p.add_argument("output", metavar="OUT.onnx")
    p.add_argument("--model", default=None,
                   help="'default', a registered model name (name:tag) or a training checkpoint (default model)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.onnx (and OUT.align.onnx) if they exist")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch comparison")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fromface.inference.onnx_backend import OnnxFaceModel, align_path, export_onnx
    from fromface.inference.recognizer import FaceRecognizer

    check_output_file(args.output, force=args.force)
    rec = FaceRecognizer(args.model, backend="torch")
    net = rec.torch_model
    if getattr(net, "align_head", None) is not None:
        check_output_file(align_path(args.output), force=args.force)
    path = export_onnx(net, args.output, rec.tag, rec.thresholds)  # thresholds only for a tag's own weights
    print(f"{path}: {getattr(net, 'model_name', '?')} exported (dynamic batch, {path.stat().st_size / 1e6:.1f} MB)")
    side = align_path(path)
    if getattr(net, "align_head", None) is not None:
        print(f"{side}: its align head ({side.stat().st_size / 1e6:.1f} MB); keep it beside {path.name}")
    if args.no_check:
        return 0
    h, w = net.preprocess.size
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    exported = OnnxFaceModel(path)
    with torch.no_grad():
        want = net(x)
    diff = float(np.abs(exported(x.numpy())[0] - want.embedding.numpy()).max())
    if exported.align_session is not None:
        diff = max(diff, float(np.abs(exported.landmark_shift(x.numpy()) - want.landmark_shift.numpy()).max()))
    print(f"onnxruntime vs PyTorch on a batch of 3: max abs difference {diff:.2e} (embedding, align head's shift)")
    return 0 if diff <= 1e-4 else 1
