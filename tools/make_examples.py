"""Make `examples/person_a_2_occluded.png`: the second example photo with a surgical mask put on by
fromface's own synthesiser (placed from the detected face's five landmarks).

    python tools/make_examples.py [--occluders ../shared/data/occluders]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from fromface.data.images import load_image
from fromface.faces.aligner import FaceAligner
from fromface.occlusion import OccluderLibrary, Synthesizer, rng_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--occluders", default=str(Path(__file__).resolve().parents[2] / "shared/data/occluders"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    image = load_image(EXAMPLES / "person_a_2.jpg")
    aligner = FaceAligner("arcface112", select="central")
    faces, _ = aligner.detect(image)
    face = aligner.choose(faces, *image.shape[:2])[0]
    library = OccluderLibrary.from_folder(args.occluders, categories=["mouth_mask"])
    library = OccluderLibrary([o for o in library if o.file.endswith("surgical_blue.png")] or list(library))
    result = Synthesizer(library, preset="face").occlude(image, rng_for(args.seed, 0), face_box=face.box,
                                                          landmarks=face.landmarks)
    out = EXAMPLES / "person_a_2_occluded.png"
    Image.fromarray(result.image).save(out)
    print(f"wrote {out}: {result.record['occluder']}, covers {result.covered_fraction:.0%} of the face box")


if __name__ == "__main__":
    main()
