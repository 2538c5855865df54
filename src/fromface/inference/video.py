"""Faces in video: follow each face across frames and identify it from all of its frames, not frame by frame.

Why tracks: one frame's embedding of a moving, turning or masked face is noisy, and identifying every frame on its
own makes names flicker. A :class:`Track` links the detector's boxes from frame to frame (overlap or centre distance
to where the face was heading) and sums the unit embeddings of its face; the normalised mean is a steadier probe than
any one frame. The gallery then applies the same rule as for a photo (:meth:`Gallery.identify`: the threshold
calibrated for the clean or occluded condition, ``score > threshold``), the track's condition being occluded when most
of its frames were. Only the detector and the embedding run per frame, and only on every ``every``-th one; boxes carry
over the frames in between.

Video comes from OpenCV (FFmpeg for files, V4L2 and the like for cameras), frames as BGR; the recognizer takes RGB.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fromface.errors import DataError, NoFaceError
from fromface.inference.gallery import Gallery, Match
from fromface.inference.recognizer import FaceEmbedding, FaceRecognizer

#: Container of the annotated video by file name ending, and the codec written into it (both written and read back
#: by OpenCV's own FFmpeg; H.264 needs an encoder the pip wheels do not ship).
WRITE_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
#: Frame rate written for a camera that does not report one.
CAMERA_FPS = 25.0
#: A track whose occluded frames are at least this fraction of its frames is identified under the occluded condition.
OCCLUDED_TRACK = 0.5
#: Columns of the tracks CSV, one row per track (see :func:`track_row`).
TRACK_FIELDS = ("track", "identity", "score", "threshold", "condition", "best_match", "start_s", "end_s",
                "start_frame", "end_frame", "frames", "detections", "occluded_fraction")
#: File signatures of video containers, to tell "a video OpenCV cannot decode" from "not a video at all".
_CONTAINERS = ((4, b"ftyp", "MP4/QuickTime"), (0, b"RIFF", "AVI"), (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
               (0, b"\x00\x00\x01\xba", "MPEG program stream"), (0, b"G", "MPEG transport stream"),
               (0, b"FLV", "FLV"), (0, b"OggS", "Ogg"), (0, b"0&\xb2u", "ASF/WMV"))


def quiet_decoder_logs() -> None:
    """Silence OpenCV's and FFmpeg's own log lines (``moov atom not found``, ``can't open camera by index``) for the
    whole process: the errors raised here say the same in one line. FFmpeg reads its level once, when OpenCV first
    uses it, so call this before the first capture; an ``OPENCV_FFMPEG_LOGLEVEL`` already set is kept."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def camera_index(source: str | int) -> int | None:
    """The camera index a SOURCE names (an int, or a string of digits such as ``"0"``), else None (a file)."""
    if isinstance(source, int):
        return source
    text = str(source).strip()
    return int(text) if text.isdigit() else None


def _container(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(16)
    return next((name for offset, magic, name in _CONTAINERS if head[offset:offset + len(magic)] == magic), None)


class VideoSource:
    """An opened video file or camera whose first frame has been decoded (so a file OpenCV cannot read fails when it
    is opened, before any model work). Iterate :meth:`frames`; afterwards :attr:`ended_early` says whether the stream
    stopped before its end (a truncated file, a camera that went away)."""

    def __init__(self, capture: Any, name: str, camera: bool, first: np.ndarray):
        self.capture, self.name, self.camera = capture, name, camera
        self._first: np.ndarray | None = first
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if math.isfinite(fps) and 0 < fps < 1000 else 0.0
        count = 0 if camera else int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count: int | None = count if count > 0 else None
        self.size = (int(first.shape[1]), int(first.shape[0]))  # (width, height)
        self.frames_read = 0
        self.ended_early: str | None = None
        self._opened = time.monotonic()

    def frames(self, max_frames: int | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
        """(index from 0, time in seconds, BGR frame), until the stream ends or ``max_frames`` were read. Time is
        ``index / fps`` for a file and the wall clock since opening for a camera."""
        while max_frames is None or self.frames_read < max_frames:
            frame = self._first if self._first is not None else self._read()
            self._first = None
            if frame is None:
                self.ended_early = self._why_ended()
                return
            index = self.frames_read
            self.frames_read += 1
            yield index, self._time(index), frame

    def _read(self) -> np.ndarray | None:
        try:
            ok, frame = self.capture.read()
        except cv2.error:
            return None
        return frame if ok and frame is not None and frame.size else None

    def _time(self, index: int) -> float:
        if self.camera:
            return time.monotonic() - self._opened
        if self.fps:
            return index / self.fps
        return float(self.capture.get(cv2.CAP_PROP_POS_MSEC) or 0.0) / 1000.0

    def _why_ended(self) -> str | None:
        if self.camera:
            return f"the camera stopped giving frames after {self.frames_read}"
        if self.frame_count is not None and self.frames_read < self.frame_count:
            return (f"the file ended after {self.frames_read} of the {self.frame_count} frames its header announces "
                    "(truncated or damaged)")
        return None

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(source: str | int | os.PathLike) -> VideoSource:
    """Open a video file or a camera index and decode its first frame; a missing file, a file OpenCV cannot decode
    (not a video, an unsupported codec, truncated) or a camera that cannot be opened raises :class:`DataError`."""
    index = camera_index(source) if not isinstance(source, os.PathLike) else None
    if index is not None:
        capture = cv2.VideoCapture(index)
        name = f"camera {index}"
        if not capture.isOpened():
            raise DataError(f"{name}: cannot be opened (no such camera, it is in use, or access is not permitted)")
        return _with_first_frame(capture, name, True, "opened but gave no frame")
    path = Path(source)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a video file")
    if not path.is_file():
        raise DataError(f"{path}: no such file (a camera is named by its index, e.g. 0)")
    try:
        kind = _container(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        if kind is None:
            raise DataError(f"{path}: not a video this OpenCV can read (unknown format)")
        raise DataError(f"{path}: {kind} file that OpenCV cannot open: truncated or damaged, or its codec is not "
                        "supported by this OpenCV build")
    fourcc = int(capture.get(cv2.CAP_PROP_FOURCC) or 0)
    codec = "".join(chr((fourcc >> 8 * k) & 0xFF) for k in range(4)).strip("\x00 ") if fourcc else "?"
    return _with_first_frame(capture, str(path), False,
                             f"no frame could be decoded (codec {codec!r}: not supported by this OpenCV build, "
                             "or the file is damaged)")


def _with_first_frame(capture: Any, name: str, camera: bool, problem: str) -> VideoSource:
    try:
        ok, frame = capture.read()
    except cv2.error:
        ok, frame = False, None
    if not ok or frame is None or not frame.size:
        capture.release()
        raise DataError(f"{name}: {problem}")
    return VideoSource(capture, name, camera, frame)


def writer_codec(path: str | os.PathLike) -> str:
    """The codec :class:`AnnotatedWriter` writes into ``path`` (from its ending); DataError for an ending it cannot."""
    codec = WRITE_CODECS.get(Path(path).suffix.lower())
    if codec is None:
        raise DataError(f"{path}: cannot write this kind of video; end the name in {', '.join(WRITE_CODECS)}")
    return codec


class AnnotatedWriter:
    """The annotated video: frames of the source's size at its frame rate, codec chosen by the file ending."""

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        codec = writer_codec(self.path)
        self.size, self.frames = size, 0
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*codec), float(fps or CAMERA_FPS), size)
        if not self._writer.isOpened():
            raise DataError(f"{self.path}: OpenCV cannot write a {codec} video here")

    def write(self, frame_bgr: np.ndarray) -> None:
        self._writer.write(frame_bgr)
        self.frames += 1

    def close(self) -> None:
        self._writer.release()


# ---------------------------------------------------------------------------------------------------------- tracks
class TrackProbe(FaceEmbedding):
    """A track's aggregate as a gallery probe: the mean of its unit embeddings, occluded when most of its frames
    were. A :class:`FaceEmbedding`, so :meth:`Gallery.identify` thresholds it exactly like a face from a photo."""

    def __init__(self, embedding: np.ndarray, occluded: bool | None, last: FaceEmbedding):
        super().__init__(embedding=embedding, box=last.box, landmarks=last.landmarks, method="track",
                         score=last.score, crop=last.crop, source=last.source)
        self.track_occluded = occluded

    @property
    def occluded(self) -> bool | None:
        return self.track_occluded


@dataclass
class Track:
    """One face followed across frames: where and when it was seen, the sum of its unit embeddings, how many of its
    detections the model saw as occluded, and its identification from all of them so far (``match``)."""

    track_id: int
    start_frame: int
    start_time: float
    last_frame: int = -1
    last_time: float = 0.0
    box: np.ndarray = field(default_factory=lambda: np.zeros(4))
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # box centre, pixels per frame
    detections: int = 0
    occluded_count: int = 0
    estimated: int = 0  # detections with an occlusion estimate
    missed: int = 0  # processed frames in a row without this face
    current: FaceEmbedding | None = None  # the latest detection
    match: Match | None = None
    _sum: np.ndarray | None = None

    def add(self, face: FaceEmbedding, frame: int, seconds: float) -> None:
        """Extend the track with a detection in ``frame``."""
        box = np.asarray(face.box, dtype=np.float64)
        if self.detections:
            step = (_centre(box) - _centre(self.box)) / max(frame - self.last_frame, 1)
            self.velocity = 0.5 * self.velocity + 0.5 * step
        self.box, self.last_frame, self.last_time, self.current, self.missed = box, frame, seconds, face, 0
        unit = np.asarray(face.embedding, dtype=np.float64)
        unit = unit / max(float(np.linalg.norm(unit)), 1e-12)
        self._sum = unit if self._sum is None else self._sum + unit
        self.detections += 1
        if face.occluded is not None:
            self.estimated += 1
            self.occluded_count += int(face.occluded)

    @property
    def embedding(self) -> np.ndarray:
        """The normalised mean of the track's unit embeddings (float32)."""
        if self._sum is None:
            raise ValueError("an empty track has no embedding")
        return (self._sum / max(float(np.linalg.norm(self._sum)), 1e-12)).astype(np.float32)

    @property
    def occluded_fraction(self) -> float | None:
        """Fraction of the detections with an occlusion estimate that the model saw as occluded."""
        return self.occluded_count / self.estimated if self.estimated else None

    @property
    def occluded(self) -> bool | None:
        fraction = self.occluded_fraction
        return None if fraction is None else fraction >= OCCLUDED_TRACK

    @property
    def frames(self) -> int:
        """Frames from the first detection to the last, both included."""
        return self.last_frame - self.start_frame + 1

    def probe(self) -> TrackProbe:
        if self.current is None:
            raise ValueError("an empty track has no probe")
        return TrackProbe(self.embedding, self.occluded, self.current)

    def predicted_box(self, frame: int) -> np.ndarray:
        """The last box moved on by the track's velocity to ``frame``."""
        shift = self.velocity * (frame - self.last_frame)
        return self.box + np.concatenate([shift, shift])

    @property
    def identity(self) -> str:
        """The matched name, or "unknown" when no enrolled identity passes its threshold."""
        return self.match.name if self.match is not None and self.match.same else "unknown"


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class FaceTracker:
    """Links each processed frame's faces to the tracks of the frames before and identifies every track from all of
    its faces so far (``gallery.identify`` on the track's mean embedding).

    A face joins the track whose predicted box it overlaps by ``min_iou`` or whose centre lies within
    ``max_distance`` box sizes of its own (greedy, best pairs first, one face per track); other faces start tracks.
    A track unseen in ``max_missed`` processed frames in a row ends (:attr:`finished`).
    """

    def __init__(self, gallery: Gallery | None, max_missed: int = 5, min_iou: float = 0.3,
                 max_distance: float = 0.6):
        self.gallery, self.max_missed = gallery, int(max_missed)
        self.min_iou, self.max_distance = float(min_iou), float(max_distance)
        self.active: list[Track] = []
        self.finished: list[Track] = []
        self._next_id = 1

    def update(self, frame: int, seconds: float, faces: list[FaceEmbedding]) -> None:
        """Add the faces found in ``frame`` (a processed frame): extend, start and end tracks."""
        pairs = self._associate(frame, faces)
        taken = {j for _, j in pairs}
        for i, j in pairs:
            self._extend(self.active[i], faces[j], frame, seconds)
        matched = {i for i, _ in pairs}
        for i, track in enumerate(self.active):
            if i not in matched:
                track.missed += 1
        for j, face in enumerate(faces):
            if j not in taken:
                track = Track(self._next_id, frame, seconds)
                self._next_id += 1
                self._extend(track, face, frame, seconds)
                self.active.append(track)
        self.finished += [t for t in self.active if t.missed >= self.max_missed]
        self.active = [t for t in self.active if t.missed < self.max_missed]

    def _associate(self, frame: int, faces: list[FaceEmbedding]) -> list[tuple[int, int]]:
        candidates = []
        for i, track in enumerate(self.active):
            predicted = track.predicted_box(frame)
            size = math.sqrt(max((track.box[2] - track.box[0]) * (track.box[3] - track.box[1]), 1.0))
            for j, face in enumerate(faces):
                box = np.asarray(face.box, dtype=np.float64)
                iou = box_iou(predicted, box)
                distance = float(np.linalg.norm(_centre(predicted) - _centre(box))) / size
                if iou >= self.min_iou or distance <= self.max_distance:
                    candidates.append((iou - distance, i, j))
        pairs, used_tracks, used_faces = [], set(), set()
        for _, i, j in sorted(candidates, reverse=True):
            if i not in used_tracks and j not in used_faces:
                pairs.append((i, j))
                used_tracks.add(i)
                used_faces.add(j)
        return pairs

    def _extend(self, track: Track, face: FaceEmbedding, frame: int, seconds: float) -> None:
        track.add(face, frame, seconds)
        if self.gallery is not None:
            matches = self.gallery.identify(track.probe(), top_k=1)
            track.match = matches[0] if matches else None

    def visible(self) -> list[Track]:
        """Tracks whose face was found in the latest processed frame (drawn until the next one)."""
        return [t for t in self.active if t.missed == 0]

    def finish(self) -> list[Track]:
        """End every track (the stream is over); all tracks in the order they started."""
        self.finished += self.active
        self.active = []
        return sorted(self.finished, key=lambda t: t.track_id)


def frame_faces(recognizer: FaceRecognizer, frame_bgr: np.ndarray) -> list[FaceEmbedding]:
    """The detected faces of one BGR frame, embedded (none when there is no face; centre-crop fallbacks dropped)."""
    try:
        faces = recognizer.embed(np.ascontiguousarray(frame_bgr[..., ::-1]))
    except NoFaceError:
        return []
    return [f for f in faces if f.method != "fallback"]


# ---------------------------------------------------------------------------------------------------------- output
def _label(track: Track) -> tuple[str, str]:
    if track.match is None:
        name = "?"
    else:
        name = f"{track.identity} {track.match.score:.2f}"
    face = track.current
    if face is None or face.occluded is None:
        state = "no occlusion estimate"
    else:
        state = f"{'occluded' if face.occluded else 'clean'}, visible {face.visible_fraction:.0%}"
    return f"#{track.track_id} {name}", state


def draw_tracks(frame_bgr: np.ndarray, tracks: list[Track]) -> np.ndarray:
    """A copy of the frame with each track's box, its name (or "unknown") and score, and its face's occlusion state:
    green for an identified face, red for an unknown one; the box is thick while the face is seen as occluded."""
    out = frame_bgr.copy()
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    for track in tracks:
        x1, y1, x2, y2 = (int(round(v)) for v in track.box)
        colour = (0, 170, 0) if track.identity != "unknown" else (0, 0, 220)
        occluded = bool(track.current is not None and track.current.occluded)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 4 if occluded else 2)
        lines = _label(track)
        y = max(y1 - 6 - 18 * (len(lines) - 1), 14)
        for text in lines:
            (w, h), _ = cv2.getTextSize(text, font, scale, 1)
            cv2.rectangle(out, (x1, y - h - 4), (x1 + w + 4, y + 4), colour, -1)
            cv2.putText(out, text, (x1 + 2, y), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
            y += 18
    return out


def track_row(track: Track) -> dict[str, Any]:
    """One CSV row: identity ("unknown" when no enrolled identity passes), the best score and its threshold and
    condition, the nearest enrolled name, when (seconds and frame numbers of the first and last detection), frames
    spanned, frames detected and embedded, and the fraction of those the model saw as occluded."""
    m = track.match
    fraction = track.occluded_fraction
    return {"track": track.track_id, "identity": track.identity,
            "score": "" if m is None else round(m.score, 4),
            "threshold": "" if m is None or m.threshold is None else round(m.threshold, 4),
            "condition": "" if m is None else m.condition, "best_match": "" if m is None else m.name,
            "start_s": round(track.start_time, 3), "end_s": round(track.last_time, 3),
            "start_frame": track.start_frame, "end_frame": track.last_frame, "frames": track.frames,
            "detections": track.detections, "occluded_fraction": "" if fraction is None else round(fraction, 4)}


def write_tracks_csv(path: str | os.PathLike, tracks: list[Track]) -> Path:
    """Write one :func:`track_row` per track (columns :data:`TRACK_FIELDS`)."""
    path = Path(path)
    try:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TRACK_FIELDS)
            writer.writeheader()
            writer.writerows(track_row(t) for t in tracks)
    except OSError as exc:
        raise DataError(f"{path}: cannot write the tracks ({exc.strerror or exc})") from None
    return path


# ---------------------------------------------------------------------------------------------------------- the loop
@dataclass
class WatchResult:
    """What a watch did: frames read (and written) and processed, the tracks, wall time, why the stream ended early
    (None when it was read to its end or to ``max_frames``), and whether Ctrl-C stopped it."""

    source: str
    frames_read: int
    frames_processed: int
    tracks: list[Track]
    seconds: float
    ended_early: str | None = None
    interrupted: bool = False

    @property
    def fps(self) -> float:
        """Frames read (and written) per second of wall time."""
        return self.frames_read / self.seconds if self.seconds > 0 else 0.0


def watch(video: VideoSource, gallery: Gallery | None, recognizer: FaceRecognizer | None = None, every: int = 1,
          writer: AnnotatedWriter | None = None, max_frames: int | None = None, max_missed: int = 5,
          on_frame: Callable[[int], None] | None = None) -> WatchResult:
    """Detect and embed faces on every ``every``-th frame of ``video``, track and identify them, draw each frame to
    ``writer``. ``recognizer`` defaults to the gallery's; make it with ``select="all"`` to follow every face (the
    default ``"largest"`` follows one face per frame). Ctrl-C stops the loop and keeps what was processed
    (``interrupted``). ``on_frame(index)`` is called after each frame (a progress bar)."""
    if int(every) < 1:
        raise DataError(f"every must be at least 1, got {every}")
    if recognizer is None:
        if gallery is None:
            raise DataError("watch needs a gallery or a recognizer")
        recognizer = gallery.recognizer
    tracker = FaceTracker(gallery, max_missed=max_missed)
    start, done, processed, interrupted = time.perf_counter(), 0, 0, False
    try:
        for index, seconds, frame in video.frames(max_frames):
            if index % every == 0:
                tracker.update(index, seconds, frame_faces(recognizer, frame))
                processed += 1
            if writer is not None:
                writer.write(draw_tracks(frame, tracker.visible()))
            done += 1
            if on_frame is not None:
                on_frame(index)
    except KeyboardInterrupt:  # the frame in hand is dropped; every frame before it is in the tracks and the video
        interrupted = True
    tracks = tracker.finish()
    return WatchResult(video.name, done, processed, tracks, time.perf_counter() - start,
                       ended_early=video.ended_early, interrupted=interrupted)


__all__ = ["AnnotatedWriter", "FaceTracker", "TRACK_FIELDS", "Track", "TrackProbe", "VideoSource", "WatchResult",
           "box_iou", "camera_index", "draw_tracks", "frame_faces", "open_video", "quiet_decoder_logs", "track_row",
           "watch", "write_tracks_csv", "writer_codec"]
