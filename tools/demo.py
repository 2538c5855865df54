"""What `make demo` runs until a trained default model ships: the most useful real job available.

It builds the paper's FROM model, runs one forward pass on a face-shaped input and prints what the
network returns (embedding, soft occlusion mask, pattern logits) and the pattern vocabulary size, so a
fresh install is proven end to end. The product-surface issue replaces it with `fromface verify`.
"""

from __future__ import annotations

import time

import torch

from fromface.models import create_model, list_models
from fromface.occlusion import PatternVocabulary


def main() -> None:
    print("fromface demo: no trained default model ships yet, so this builds the paper's FROM network")
    print(f"registered models: {', '.join(list_models())}\n")
    torch.manual_seed(0)
    model = create_model("from_lresnet50e_ir", grid=5).eval()
    height, width = model.preprocess.size
    start = time.perf_counter()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    elapsed = time.perf_counter() - start
    vocab = PatternVocabulary(height, width, model.grid)
    print(f"from_lresnet50e_ir: input {height}x{width}, template {model.preprocess.template}")
    print(f"  embedding {tuple(out.embedding.shape)}, mask {tuple(out.mask.shape)}, "
          f"pattern logits {tuple(out.pattern_logits.shape)} ({len(vocab)} patterns on a 5x5 grid)")
    print(f"  forward of 2 images on CPU: {elapsed * 1000:.0f} ms")


if __name__ == "__main__":
    main()
