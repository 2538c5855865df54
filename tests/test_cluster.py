"""`fromface cluster` and fromface.inference.clustering: real LFW people (clean and masked) end up in their own
clusters; the CSV, the link folders, skipped and multi-face images; bad folders; and the sparse, blocked clustering
against dense references on random data."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES, SHARED_DATA
from fromface.cli.main import main
from fromface.errors import DataError
from fromface.inference import clustering
from fromface.inference.clustering import ALONE, bcubed, cluster_embeddings, margin_graph, pair_counts

#: LFW people with three single-face photos each (checked: YuNet finds one face in each).
PEOPLE = ("Aaron_Peirsol", "Dick_Clark", "Franz_Muentefering", "Nathalie_Baye")
MASKED = "Franz_Muentefering"


def occluded_copy(src: Path, dst: Path, index: int) -> None:
    """A surgical-mask-style occluder put on the photo by the project's synthesiser (seeded)."""
    from fromface.faces.aligner import FaceAligner
    from fromface.occlusion.occluders import OccluderLibrary
    from fromface.occlusion.synth import Synthesizer

    library = OccluderLibrary.from_folder(SHARED_DATA / "occluders", categories=["mouth_mask"])
    synth = Synthesizer(library, preset="face", clean_prob=0.0)
    image = np.asarray(Image.open(src).convert("RGB"))
    aligner = FaceAligner("arcface112", select="central")
    faces, _ = aligner.detect(image)
    face = aligner.choose(faces, *image.shape[:2])[0]
    result = synth.occlude_seeded(image, 100, index, face_box=face.box, landmarks=face.landmarks)
    Image.fromarray(result.image).save(dst)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A folder of 4 people x 3 photos, 2 masked copies of one of them, a photo of two people side by side, a
    blank image and a text file; clustered once through the CLI."""
    base = tmp_path_factory.mktemp("cluster")
    photos = base / "photos"
    truth: dict[str, str] = {}
    for person in PEOPLE:
        (photos / person).mkdir(parents=True)
        for src in sorted((LFW_IMAGES / person).glob("*.jpg"))[:3]:
            (photos / person / src.name).write_bytes(src.read_bytes())
            truth[f"{person}/{src.name}"] = person
    (photos / "masked").mkdir()
    for k, src in enumerate(sorted((LFW_IMAGES / MASKED).glob("*.jpg"))[:2]):
        occluded_copy(src, photos / "masked" / f"{src.stem}_masked.png", k)
        truth[f"masked/{src.stem}_masked.png"] = MASKED
    left, right = (Image.open(sorted((LFW_IMAGES / p).glob("*.jpg"))[0]) for p in ("Dick_Clark", "Aaron_Peirsol"))
    pair = Image.new("RGB", (500, 250))
    pair.paste(left, (0, 0))
    pair.paste(right, (250, 0))
    pair.save(photos / "two_people.jpg")
    Image.new("RGB", (200, 200), (128, 128, 128)).save(photos / "blank.jpg")
    (photos / "notes.txt").write_text("not a photo")
    out, links = base / "clusters.csv", base / "links"
    code = main(["cluster", str(photos), "--out", str(out), "--link-to", str(links)])
    return {"base": base, "photos": photos, "csv": out, "links": links, "code": code, "truth": truth}


@pytest.fixture(scope="module")
def rows(collection):
    with open(collection["csv"], newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.data("lfw/images", "occluders")
def test_people_clean_and_masked_land_in_their_own_clusters(collection, rows):
    assert collection["code"] == 0
    labelled = [(int(r["cluster"]), collection["truth"][r["file"]]) for r in rows if r["file"] in collection["truth"]]
    assert len(labelled) == len(collection["truth"]) == 14
    labels, people = zip(*labelled)
    precision, recall = pair_counts(labels, people)
    assert precision == 1.0  # different people never merged
    assert recall >= 0.8
    masked = [r for r in rows if r["file"].startswith("masked/")]
    assert "true" in {r["occluded"] for r in masked}  # the mask is seen (on one of the two, at least) ...
    person = {int(r["cluster"]) for r in rows if r["file"].startswith(f"{MASKED}/")}
    assert len(person) == 1 and ALONE not in person
    assert {int(r["cluster"]) for r in masked} == person  # ... and the masked copies join the clean photos


@pytest.mark.data("lfw/images", "occluders")
def test_csv_rows_and_multi_face_image(collection, rows):
    assert list(rows[0]) == list(clustering.CSV_COLUMNS)
    files = {r["file"] for r in rows}
    assert "blank.jpg" not in files and "notes.txt" not in files
    two = sorted((r for r in rows if r["file"] == "two_people.jpg"), key=lambda r: float(r["x1"]))
    assert sorted(r["face"] for r in two) == ["0", "1"]
    assert all(r["faces_in_image"] == "2" for r in two)
    assert float(two[0]["x2"]) <= 260 and float(two[1]["x1"]) >= 240  # one face in each half
    cluster_of = {r["file"]: r["cluster"] for r in rows if r["faces_in_image"] == "1"}
    first = {p: sorted((LFW_IMAGES / p).glob("*.jpg"))[0].name for p in ("Dick_Clark", "Aaron_Peirsol")}
    assert "-1" not in (two[0]["cluster"], two[1]["cluster"])
    assert two[0]["cluster"] == cluster_of[f"Dick_Clark/{first['Dick_Clark']}"]
    assert two[1]["cluster"] == cluster_of[f"Aaron_Peirsol/{first['Aaron_Peirsol']}"]
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["cluster"]] = sizes.get(r["cluster"], 0) + 1
    assert all(int(r["cluster_size"]) == (1 if r["cluster"] == "-1" else sizes[r["cluster"]]) for r in rows)
    assert all(0 < float(r["detection_score"]) <= 1 and float(r["x2"]) > float(r["x1"]) for r in rows)


@pytest.mark.data("lfw/images", "occluders")
def test_summary_reports_skipped_and_multi_face_images(collection, capsys):
    # The module fixture's output went to an earlier capture; rerun the summary on a fresh, cheap command instead:
    # a no-face image and a text file in a folder of their own.
    folder = collection["base"] / "noface"
    folder.mkdir()
    Image.new("RGB", (200, 200), (128, 128, 128)).save(folder / "blank.jpg")
    two = collection["photos"] / "two_people.jpg"
    (folder / "two_people.jpg").write_bytes(two.read_bytes())
    (folder / "notes.txt").write_text("x")
    assert main(["cluster", str(folder), "--out", str(collection["base"] / "noface.csv")]) == 0
    out = capsys.readouterr().out
    assert "2 faces from 1 images" in out
    assert "1 images had several faces; every face was clustered" in out and "two_people.jpg: 2 faces" in out
    assert "2 files skipped" in out and "blank.jpg: no face found" in out and "notes.txt: not an image file" in out


@pytest.mark.data("lfw/images", "occluders")
def test_link_folders_and_refusal_to_overwrite(collection, rows, capsys):
    links = collection["links"]
    clusters = {r["cluster"] for r in rows}
    expected = {clustering.folder_name(int(c)) for c in clusters}
    assert {p.name for p in links.iterdir()} == expected
    for r in rows:
        link = links / clustering.folder_name(int(r["cluster"])) / r["file"].replace("/", "__")
        assert link.is_symlink() and link.resolve() == (collection["photos"] / r["file"]).resolve()
    before = sorted(str(p) for p in links.rglob("*"))
    args = ["cluster", str(collection["photos"]), "--out", str(collection["base"] / "again.csv"),
            "--link-to", str(links)]
    assert main(args) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert main(["cluster", str(collection["photos"]), "--out", str(collection["csv"])]) == 2
    assert "already exists; use --force" in capsys.readouterr().err
    inside = ["cluster", str(collection["photos"]), "--out", str(collection["base"] / "x.csv"),
              "--link-to", str(collection["photos"] / "links")]
    assert main(inside) == 2 and "inside" in capsys.readouterr().err
    assert sorted(str(p) for p in links.rglob("*")) == before and not (collection["base"] / "again.csv").exists()


def test_force_replaces_only_earlier_links(tmp_path):
    """clear_links removes person-*/alone folders of links and keeps everything else; a real file stops it."""
    out = tmp_path / "links"
    (out / "person-0000").mkdir(parents=True)
    (out / "person-0000" / "a.jpg").symlink_to(tmp_path)
    (out / "alone").mkdir()
    (out / "mine.txt").write_text("keep")
    clustering.clear_links(out)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    (out / "person-0001").mkdir()
    (out / "person-0001" / "real.jpg").write_text("a user's file")
    with pytest.raises(DataError, match="not a link"):
        clustering.clear_links(out)
    assert (out / "person-0001" / "real.jpg").read_text() == "a user's file"


def test_bad_folders_give_one_line_errors(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "c.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {str(empty): "no images found", str(tmp_path / "missing"): "no such folder"}
    (tmp_path / "file.jpg").write_bytes(b"x")
    cases[str(tmp_path / "file.jpg")] = "not a folder"
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    cases[str(texts)] = "no images found (1 other files or folders)"
    for folder, message in cases.items():
        assert main(["cluster", folder, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fromface cluster: error: ") and message in err and len(err.strip().splitlines()) == 1
    # Tests run as root here, where permission bits do not stop reading: make the folder unreadable to Python.
    class RefusingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def scandir(path):
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(clustering, "os", RefusingOs())
    assert main(["cluster", str(texts), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "cannot read the folder (Permission denied)" in err and len(err.strip().splitlines()) == 1
    assert not Path(out).exists()


def test_corrupt_images_only_is_one_line(tmp_path, capsys):
    """Images that are all unreadable: one line, after each was tried."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (folder / "b.png").write_bytes(b"")
    assert main(["cluster", str(folder), "--out", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("fromface cluster: error: ") and "no face found in any of 2 images" in last
    assert "Traceback" not in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["cluster", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--link-to", "--force", "--linkage", "--batch", "--model", "--select", "--fallback",
                   "--threshold", "--backend"):
        assert option in text
    assert "'all' (default)" in text


# ---------------------------------------------------------------------------------------------- the algorithm
def planted(seed: int, n: int = 60, dim: int = 8, people: int = 6, noise: float = 0.5):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, people, n)
    emb = rng.normal(size=(people, dim))[ids] + noise * rng.normal(size=(n, dim))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), rng.random(n) < 0.3, ids


def dense_margins(emb, occ, clean, occluded):
    return emb @ emb.T - np.where(occ[:, None] | occ[None, :], occluded, clean)


def same_partition(a, b) -> bool:
    a, b = (np.where(np.asarray(x) == ALONE, -1 - np.arange(len(x)), x) for x in (a, b))
    return all(len(set(b[a == v])) == 1 for v in set(a)) and all(len(set(a[b == v])) == 1 for v in set(b))


@pytest.mark.parametrize("seed", range(8))
def test_blocked_graph_is_the_dense_threshold(seed):
    emb, occ, _ = planted(seed)
    margins = dense_margins(emb, occ, 0.3, 0.5)
    np.fill_diagonal(margins, -np.inf)
    for block in (1, 7, 1000):
        graph = margin_graph(emb, occ, 0.3, 0.5, slack=0.1, neighbours=None, block=block).toarray()
        assert np.array_equal(graph != 0, margins > -0.1)
        assert np.allclose(graph[margins > -0.1], margins[margins > -0.1], atol=1e-5)
    capped = margin_graph(emb, occ, 0.3, 0.5, slack=0.1, neighbours=3)
    best = np.sort(np.where(margins > -0.1, margins, -np.inf), axis=1)[:, -3:]
    for i in range(len(emb)):  # each face keeps at least its own 3 best candidates (more through the union)
        kept = capped[i].toarray().ravel()
        assert all(np.abs(kept - v).min() < 1e-5 for v in best[i][np.isfinite(best[i])])


@pytest.mark.parametrize("seed", range(8))
def test_sparse_clustering_matches_dense_references(seed):
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    emb, occ, _ = planted(seed, noise=0.35)
    distance = 1 - dense_margins(emb, occ, 0.3, 0.5)
    np.fill_diagonal(distance, 0)
    condensed = squareform(np.maximum(distance, 0), checks=False)
    for method, kwargs in (("average", {"slack": 10.0}), ("single", {})):
        reference = fcluster(linkage(condensed, method), 1.0, "distance")
        got = cluster_embeddings(emb, occ, 0.3, 0.5, linkage=method, neighbours=None, block=7, **kwargs)
        assert same_partition(got, reference), method
    # Singletons are ALONE and ids run 0.. by decreasing size.
    counts = np.bincount(got[got != ALONE])
    assert (counts >= 2).all() and (np.diff(counts) <= 0).all()


def test_condition_threshold_decides_a_pair():
    """A masked and a clean face at cosine 0.45: together at an occluded threshold of 0.4, apart at 0.5; the clean
    threshold does not apply to a pair with an occluded face."""
    a = np.array([1.0, 0.0])
    b = np.array([0.45, np.sqrt(1 - 0.45 ** 2)])
    emb = np.stack([a, b])
    assert list(cluster_embeddings(emb, [False, True], 0.9, 0.4)) == [0, 0]
    assert list(cluster_embeddings(emb, [False, True], 0.1, 0.5)) == [ALONE, ALONE]
    assert list(cluster_embeddings(emb, [False, None], 0.4, 0.9)) == [0, 0]  # None (no estimate) is clean


def test_average_linkage_resists_one_chance_match():
    """Two tight groups and one stray pair across them that passes the threshold: single linkage chains the two
    people into one cluster, average linkage keeps them apart (the stray pair's other scores vote against it)."""
    rng = np.random.default_rng(0)
    c0, c1 = np.eye(16)[:2]
    emb = np.concatenate([c0 + 0.05 * rng.normal(size=(10, 16)), c1 + 0.05 * rng.normal(size=(10, 16))])
    emb[9], emb[10] = c0 + 0.6 * c1, c1 + 0.6 * c0  # cosine 0.88 to each other, 0.51 to the other person
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    truth = [0] * 10 + [1] * 10
    single = cluster_embeddings(emb, np.zeros(20, bool), 0.7, 0.7, linkage="single")
    average = cluster_embeddings(emb, np.zeros(20, bool), 0.7, 0.7, slack=1.0)
    assert len(set(single)) == 1
    assert not set(average[:9]) & set(average[11:])
    assert pair_counts(average, truth)[0] > 0.95 > pair_counts(single, truth)[0]


def test_pair_and_bcubed_scores_on_a_hand_example():
    labels, truth = [0, 0, 1, 1, ALONE], ["a", "a", "a", "b", "b"]
    assert pair_counts(labels, truth) == pytest.approx((1 / 2, 1 / 4))
    p, r, f = bcubed(labels, truth)
    assert (p, r) == pytest.approx((0.8, (2 / 3 + 2 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 5))
    assert f == pytest.approx(2 * p * r / (p + r))
    assert pair_counts([0, 0, 1], ["x", "x", "y"]) == (1.0, 1.0) and bcubed([0, 0, 1], ["x", "x", "y"])[2] == 1.0


def test_no_quadratic_blocks(monkeypatch):
    """Scores are computed ``block`` rows at a time: the largest score array margin_graph makes is block x n."""
    emb, occ, _ = planted(0, n=300)
    shapes = []
    real = np.ndarray.__matmul__

    class Spy(np.ndarray):
        def __matmul__(self, other):
            out = real(np.asarray(self), np.asarray(other))
            shapes.append(out.shape)
            return out

    monkeypatch.setattr(clustering, "_prepared", lambda e, o: (np.asarray(e, np.float32).view(Spy), np.asarray(o)))
    margin_graph(emb, occ, 0.3, 0.5, block=64)
    assert sorted(shapes) == sorted([(64, 300)] * 4 + [(44, 300)])
