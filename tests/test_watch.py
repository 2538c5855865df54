"""``fromface watch``: faces in a video followed, identified per track, drawn and written; and bad video input.

The video is built here from LFW photos: David Beckham enters at frame 3 wearing a mouth mask put on by fromface's
own synthesiser, Jean Chretien is there throughout, clean; both are enrolled from *other* photos of them. The tracker's
association and aggregation are also tested alone, on made-up embeddings, without a model.
"""

from __future__ import annotations

import csv
import os

import cv2
import numpy as np
import pytest

from conftest import LFW_IMAGES, SHARED_DATA
from fromface.cli.main import main

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines about the broken files made below

FPS, FRAMES, ENTERS, SIZE = 4, 12, 3, (640, 480)
MASKED, CLEAN = "David_Beckham", "Jean_Chretien"


def lfw(name: str, number: int):
    return LFW_IMAGES / name / f"{name}_{number:04d}.jpg"


def write_video(path, frames: list[np.ndarray], fourcc: str) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, SIZE)
    assert writer.isOpened(), f"this OpenCV cannot write {fourcc}"
    for frame in frames:
        writer.write(frame)
    writer.release()


def count_frames(path) -> int:
    capture = cv2.VideoCapture(str(path))
    n = 0
    while capture.read()[0]:
        n += 1
    capture.release()
    return n


def scene(masked_rgb: np.ndarray, clean_rgb: np.ndarray) -> list[np.ndarray]:
    """BGR frames: the clean face drifting left on the right half, the masked one walking in from frame ENTERS."""
    background = np.repeat(np.linspace(90, 170, SIZE[1], dtype=np.uint8)[:, None, None], SIZE[0], 1).repeat(3, 2)
    frames = []
    for k in range(FRAMES):
        frame = background.copy()
        x = 370 - 2 * k
        frame[130:380, x:x + 250] = clean_rgb
        if k >= ENTERS:
            x = 10 + 6 * (k - ENTERS)
            frame[100:350, x:x + 250] = masked_rgb
        frames.append(np.ascontiguousarray(frame[..., ::-1]))
    return frames


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The video (.mp4 and .avi), a gallery of both people and one of the masked person only."""
    from fromface import FaceRecognizer, Gallery
    from fromface.data.images import load_image
    from fromface.occlusion.occluders import OccluderLibrary
    from fromface.occlusion.synth import Synthesizer, rng_for

    root = tmp_path_factory.mktemp("watch")
    rec = FaceRecognizer()
    photo = load_image(lfw(MASKED, 1))
    face = rec.embed(photo)[0]
    masks = Synthesizer(OccluderLibrary.from_folder(SHARED_DATA / "occluders", categories=["mouth_mask"]), "face",
                        coverage=(0.4, 0.45))
    masked = masks.occlude(photo, rng_for(0, 1), face_box=face.box, landmarks=face.landmarks)
    assert masked.covered_fraction > 0.3 and rec.embed(masked.image)[0].occluded is True
    frames = scene(masked.image, load_image(lfw(CLEAN, 2)))
    write_video(root / "scene.mp4", frames, "mp4v")
    write_video(root / "scene.avi", frames, "MJPG")
    with Gallery(root / "both.db", recognizer=rec) as g:
        g.enroll(MASKED, [lfw(MASKED, 9), lfw(MASKED, 11)])
        g.enroll(CLEAN, [lfw(CLEAN, 6), lfw(CLEAN, 8)])
    with Gallery(root / "masked-only.db", recognizer=rec) as g:
        g.enroll(MASKED, [lfw(MASKED, 9), lfw(MASKED, 11)])
    return {"root": root, "frames": frames, "thresholds": rec.thresholds, "far": rec.far}


def read_rows(path) -> list[dict[str, str]]:
    """The tracks CSV's rows in the order the tracks started."""
    with open(path, newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: (int(r["start_frame"]), int(r["track"])))


def by_person(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    people = {r["best_match"]: r for r in rows}
    assert len(people) == len(rows), rows  # one track per person: no split or duplicated track
    return people


def green_pixels(frame_bgr: np.ndarray) -> int:
    b, g, r = (frame_bgr[..., k].astype(int) for k in range(3))
    return int(((g > 120) & (g - r > 60) & (g - b > 60)).sum())


@pytest.mark.slow
@pytest.mark.data("lfw/images", "occluders")
def test_watch_identifies_tracks_and_writes_csv_and_video(world, tmp_path, capsys):
    root, out, tracks = world["root"], tmp_path / "annotated.mp4", tmp_path / "tracks.csv"
    code = main(["watch", str(root / "scene.mp4"), "--db", str(root / "both.db"), "--out", str(out),
                 "--csv", str(tracks), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert f"{FRAMES} frames ({FRAMES / FPS:.1f} s of video)" in text and "frames/s" in text and "2 track(s)" in text
    rows = by_person(read_rows(tracks))
    assert set(rows) == {MASKED, CLEAN}
    masked, clean = rows[MASKED], rows[CLEAN]
    occluded = world["thresholds"]["occluded"][world["far"]]
    assert masked["identity"] == MASKED and masked["condition"] == "occluded"
    assert float(masked["threshold"]) == pytest.approx(occluded, abs=1e-4) and float(masked["score"]) > occluded
    assert float(masked["occluded_fraction"]) > 0.5
    assert int(masked["start_frame"]) in (ENTERS, ENTERS + 1) and int(masked["end_frame"]) == FRAMES - 1
    assert float(masked["start_s"]) == pytest.approx(int(masked["start_frame"]) / FPS)
    assert int(masked["detections"]) >= FRAMES - ENTERS - 2
    assert clean["identity"] == CLEAN and clean["condition"] == "clean" and float(clean["occluded_fraction"]) < 0.2
    assert [int(clean[k]) for k in ("start_frame", "end_frame", "frames", "detections")] == [0, 11, 12, 12]
    assert float(clean["end_s"]) == pytest.approx(11 / FPS)
    assert count_frames(out) == FRAMES
    capture = cv2.VideoCapture(str(out))
    ok, first = capture.read()
    assert ok and first.shape == (SIZE[1], SIZE[0], 3)
    assert green_pixels(first) > 300 and green_pixels(world["frames"][0]) < 20  # the identified face's box


@pytest.mark.slow
@pytest.mark.data("lfw/images", "occluders")
def test_every_third_frame_and_an_unknown_face(world, tmp_path, capsys):
    root, out, tracks = world["root"], tmp_path / "annotated.avi", tmp_path / "tracks.csv"
    code = main(["watch", str(root / "scene.avi"), "--db", str(root / "masked-only.db"), "--every", "3",
                 "--out", str(out), "--csv", str(tracks), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "4 processed: one frame in 3" in text
    stranger, masked = read_rows(tracks)
    assert stranger["best_match"] == masked["best_match"] == MASKED  # the one enrolled name is nearest to both...
    assert (stranger["identity"], stranger["detections"], stranger["end_frame"]) == ("unknown", "4", "9")
    assert float(stranger["score"]) < float(stranger["threshold"])  # ...but only one passes
    assert masked["identity"] == MASKED and masked["start_frame"] == str(ENTERS) and masked["detections"] == "3"
    assert count_frames(out) == FRAMES  # boxes carried over the frames in between, every frame written


def test_tracker_follows_faces_and_identifies_from_all_frames(tmp_path):
    """Two faces moving apart keep their tracks; the identity comes from the mean of a track's embeddings (one frame
    alone would be taken for the other person); an unseen face ends its track after max_missed processed frames."""
    from fromface.inference.gallery import Gallery, Template
    from fromface.inference.recognizer import FaceEmbedding
    from fromface.inference.video import FaceTracker

    class Thresholds:  # the recognizer's part in a search: its per-condition thresholds
        model_id, model_name = None, "test"

        def condition_threshold(self, occluded, estimated=True):
            return (0.3 if occluded else 0.5), ("occluded" if occluded else "clean"), "test"

    e = np.eye(8, dtype=np.float32)
    gallery = Gallery(tmp_path / "g.db", recognizer=Thresholds())
    gallery.enroll_templates("ann", [Template(e[0])])
    gallery.enroll_templates("bob", [Template(e[1])])

    def face(x, y, vec, pattern=0, w=80, h=100):
        v = np.asarray(vec, np.float32)
        return FaceEmbedding(embedding=v / np.linalg.norm(v), box=np.array([x, y, x + w, y + h], float),
                             landmarks=np.zeros((5, 2)), method="detected", score=0.9, crop=np.zeros((2, 2, 3)),
                             pattern=pattern, pattern_probability=0.9, visible_fraction=0.6 if pattern else 1.0)

    ann_a = 0.8 * e[0] + 0.2 * e[1] + 0.56 * e[2]
    ann_b = 0.5 * e[0] + 0.55 * e[1] + 0.67 * e[3]  # alone, nearer bob
    assert gallery.search(ann_b / np.linalg.norm(ann_b), 1)[0].name == "bob"
    tracker = FaceTracker(gallery, max_missed=2)
    tracker.update(0, 0.0, [face(100, 100, ann_a), face(400, 100, e[1] + 0.3 * e[4])])
    tracker.update(1, 0.2, [face(430, 102, e[1] + 0.2 * e[5]), face(70, 101, ann_b, pattern=7)])
    ann, bob = sorted(tracker.active, key=lambda t: t.track_id)
    assert (ann.detections, bob.detections, ann.box[0], bob.box[0]) == (2, 2, 70, 430)
    assert ann.identity == "ann" and bob.identity == "bob" and ann.occluded_fraction == 0.5
    assert ann.match.condition == "occluded" and ann.match.threshold == 0.3  # half its frames occluded
    tracker.update(2, 0.4, [face(460, 104, e[1])])  # ann unseen once: still a track, not drawn
    assert [t.track_id for t in tracker.visible()] == [bob.track_id] and len(tracker.active) == 2
    # bob keeps moving 30 px a frame; ann, heading left at 15 px a frame, is back at half the size (IoU 0.25 with
    # where she was heading: the centre distance links her)
    tracker.update(3, 0.6, [face(490, 106, e[1]), face(60, 126, e[0], w=40, h=50)])
    assert bob.detections == 4 and ann.detections == 3 and len(tracker.active) == 2
    tracker.update(4, 0.8, [])
    tracker.update(5, 1.0, [])
    done = tracker.finish()
    assert [(t.track_id, t.start_frame, t.last_frame, t.frames) for t in done] == [(1, 0, 3, 4), (2, 0, 3, 4)]
    gallery.close()


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["watch", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--db", "--out", "--csv", "--every", "--max-missed", "--max-frames", "--force", "--quiet",
                   "--model", "--threshold", "camera index", "one row per track", "Ctrl-C"):
        assert option in text, option


def error_of(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("fromface watch: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.data("lfw/images", "occluders")
def test_bad_video_input(world, tmp_path, capsys):
    db, video = str(world["root"] / "both.db"), world["root"] / "scene.mp4"
    tracks = tmp_path / "tracks.csv"
    assert "nope.mp4: no such file" in error_of(["watch", str(tmp_path / "nope.mp4"), "--db", db], capsys)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 50)
    assert "not a video this OpenCV can read" in error_of(["watch", str(text), "--db", db], capsys)
    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    err = error_of(["watch", str(cut), "--db", db, "--csv", str(tracks)], capsys)
    assert "cut.mp4: MP4/QuickTime file that OpenCV cannot open: truncated or damaged" in err
    codec = tmp_path / "codec.avi"
    codec.write_bytes((world["root"] / "scene.avi").read_bytes().replace(b"MJPG", b"ZQ9X"))
    assert "AVI file that OpenCV cannot open" in error_of(["watch", str(codec), "--db", db], capsys)
    assert "camera 99: cannot be opened" in error_of(["watch", "99", "--db", db], capsys)
    err = error_of(["watch", str(video), "--db", str(tmp_path / "none.db")], capsys)
    assert "none.db: gallery not found" in err
    existing = tmp_path / "annotated.mp4"
    existing.write_bytes(b"mine")
    assert "already exists; use --force" in error_of(["watch", str(video), "--db", db, "--out", str(existing)], capsys)
    assert existing.read_bytes() == b"mine"
    assert "cannot write this kind of video" in error_of(["watch", str(video), "--db", db, "--out",
                                                         str(tmp_path / "a.gif")], capsys)
    assert not tracks.exists()  # nothing is written by a run that failed at its start


@pytest.mark.slow
@pytest.mark.data("lfw/images", "occluders")
def test_a_stream_that_ends_midway_keeps_what_was_read(world, tmp_path, capsys):
    data = (world["root"] / "scene.avi").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:len(data) * 6 // 10])
    out, tracks = tmp_path / "annotated.mp4", tmp_path / "tracks.csv"
    out.write_bytes(b"old")
    code = main(["watch", str(cut), "--db", str(world["root"] / "both.db"), "--out", str(out), "--csv", str(tracks),
                 "--force", "--quiet"])
    text = capsys.readouterr().out
    read = count_frames(cut)
    assert 0 < read < FRAMES
    assert code == 1 and f"ended early: the file ended after {read} of the {FRAMES} frames" in text, text
    rows = by_person(read_rows(tracks))
    assert rows[CLEAN]["identity"] == CLEAN and rows[CLEAN]["end_frame"] == str(read - 1)
    assert count_frames(out) == read


@pytest.mark.slow
@pytest.mark.data("lfw/images", "occluders")
def test_a_camera_that_goes_away_keeps_what_was_read(world, tmp_path, capsys, monkeypatch):
    """Camera 0 stands for the video file, and stops giving frames after 5 (unplugged): tracks and video are kept."""
    real = cv2.VideoCapture

    class Camera:
        def __init__(self):
            self.capture, self.reads = real(str(world["root"] / "scene.avi")), 0

        def isOpened(self):
            return self.capture.isOpened()

        def read(self):
            self.reads += 1
            return self.capture.read() if self.reads <= 5 else (False, None)

        def get(self, prop):
            return 0.0 if prop == cv2.CAP_PROP_FRAME_COUNT else self.capture.get(prop)

        def release(self):
            self.capture.release()

    monkeypatch.setattr(cv2, "VideoCapture", lambda source, *a: Camera() if source == 0 else real(source, *a))
    out, tracks = tmp_path / "camera.avi", tmp_path / "tracks.csv"
    code = main(["watch", "0", "--db", str(world["root"] / "both.db"), "--out", str(out), "--csv", str(tracks),
                 "--quiet"])
    text = capsys.readouterr().out
    assert code == 1 and "camera 0: 5 frames" in text and "the camera stopped giving frames after 5" in text, text
    monkeypatch.undo()
    assert [r["identity"] for r in read_rows(tracks)] == [CLEAN, MASKED]
    assert count_frames(out) == 5


@pytest.mark.slow
@pytest.mark.data("lfw/images", "occluders")
def test_ctrl_c_keeps_what_was_processed(world, tmp_path, capsys, monkeypatch):
    import fromface.inference.video as video

    calls = []

    def interrupted_at_frame_4(recognizer, frame):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real(recognizer, frame)

    real = video.frame_faces
    monkeypatch.setattr(video, "frame_faces", interrupted_at_frame_4)
    out, tracks = tmp_path / "annotated.mp4", tmp_path / "tracks.csv"
    code = main(["watch", str(world["root"] / "scene.mp4"), "--db", str(world["root"] / "both.db"), "--out",
                 str(out), "--csv", str(tracks), "--quiet"])
    text = capsys.readouterr().out
    assert code == 130 and "stopped by Ctrl-C" in text and "ended early" not in text, text
    rows = read_rows(tracks)
    assert [(r["identity"], r["end_frame"]) for r in rows] == [(CLEAN, "3"), (MASKED, "3")]
    assert count_frames(out) == 4
