"""``fromface verify A B``: same person or not, with the score, the threshold and why, and the occlusion seen.

Also holds the recognizer options shared by the other product commands (enroll, identify, embed, serve).
"""

from __future__ import annotations

import argparse
import json


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options that choose the model, its engine and its threshold."""
    p.add_argument("--model", default=None,
                   help="'default', a registered model name (name:tag), a training checkpoint (.pt) or an exported "
                   ".onnx (default: the default model; with --db, the registered model the gallery was made with)")
    p.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto",
                   help="inference engine: 'auto' (default) runs a registered model's pretrained weights with "
                   "onnxruntime and checkpoints with PyTorch")
    p.add_argument("--threshold", type=float, default=None, help="cosine threshold overriding the calibrated one")


def add_recognizer_args(p: argparse.ArgumentParser, select: str = "largest") -> None:
    """Options that choose and configure the FaceRecognizer: the model's, and which face of a photo is used."""
    add_model_args(p)
    p.add_argument("--select", choices=("largest", "central", "single"), default=select,
                   help=f"which face of a photo to use; 'single' refuses photos with several faces (default {select})")
    p.add_argument("--fallback", action="store_true",
                   help="centre-crop photos where no face is detected (for photos already cropped to one face)")


def recognizer_from_args(args: argparse.Namespace):
    from fromface.inference.recognizer import FaceRecognizer

    return FaceRecognizer(args.model, backend=args.backend, select=args.select, fallback=args.fallback,
                          threshold=args.threshold)


def recognizer_for_gallery(args: argparse.Namespace, gallery) -> None:
    """Give ``gallery`` the recognizer ``--model`` names or, without it, the registered model the gallery was enrolled
    with (a gallery made with a model file needs --model: nothing is loaded because a database names it). Another
    model than the gallery's is refused by the gallery."""
    if args.model is None:
        args.model = gallery.model_spec()  # None for an empty gallery: the default model
    gallery.recognizer = recognizer_from_args(args)


def describe_face(label: str, face) -> str:
    """One line on what the model saw of a face."""
    where = f"{label}: {face.source} face at {[round(float(v)) for v in face.box]} ({face.method})"
    if face.visible_fraction is None:
        return where + ", model gives no occlusion estimate"
    state = "occluded" if face.occluded else "clean"
    words = f"; {face.occlusion_report['summary']}" if face.occlusion_report else ""
    return (f"{where}, {state}: pattern {face.pattern} (p={face.pattern_probability:.2f}), "
            f"visible {face.visible_fraction:.0%}{words}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="are two photos the same person?",
                       description="Compare the faces of two photos; print the verdict, cosine score, the threshold "
                       "used and the calibration condition (clean/occluded) it came from.")
    p.add_argument("a", help="first image")
    p.add_argument("b", help="second image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show", metavar="OUT.png", default=None,
                   help="write a picture: both faces, their occlusion heat maps and the verdict")
    add_recognizer_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    recognizer = recognizer_from_args(args)
    result = recognizer.verify(args.a, args.b)
    if args.show:
        from fromface.inference.drawing import save_verification

        save_verification(result, args.show)
    if args.json:
        out = result.to_dict()
        out["model"] = recognizer.model_name
        if args.show:
            out["picture"] = args.show
        print(json.dumps(out, indent=2))
    else:
        verdict = "same person" if result.same else "different people"
        print(f"{verdict}: score {result.score:.4f} {'>=' if result.same else '<'} threshold {result.threshold:.4f} "
              f"({result.condition}; {result.reason}; model {recognizer.model_name})")
        for label, face in zip(("A", "B"), result.faces):
            print("  " + describe_face(label, face))
        if args.show:
            print(f"  picture written to {args.show}")
    return 0
