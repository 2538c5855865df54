"""``fromface watch SOURCE --db gallery.db``: find, follow and identify faces in a video file or a camera.

The work is in :mod:`fromface.inference.video`; this command checks every output before the model loads, drives the
loop with a progress bar, writes the tracks CSV and prints the summary. A stream that ends early (a truncated file, a
camera that goes away) or a Ctrl-C keeps what was processed: the CSV and the annotated video hold those frames.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fromface.cli._output import check_output_file
from fromface.cli.verify import add_model_args, positive_int
from fromface.errors import DataError

#: Exit status when the stream ended before its end (what was read is written), and after Ctrl-C.
ENDED_EARLY, INTERRUPTED = 1, 130


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch", help="find, track and identify faces in a video file or camera",
        description="Detect the faces of a video file or camera, follow each across frames, and identify each "
        "followed face (track) from the mean of its frames' embeddings against an enrolled gallery, with the "
        "threshold calibrated for clean or occluded faces. Prints one line per track and the frames/s. Exit status: "
        f"0 done, {ENDED_EARLY} the stream ended early (what was read is kept and written), {INTERRUPTED} stopped "
        "by Ctrl-C (likewise), 2 bad input.")
    p.add_argument("source", metavar="SOURCE",
                   help="a video file (anything this OpenCV's FFmpeg decodes: .mp4, .avi, .mkv, ...) or a camera "
                   "index (0 = the first camera; runs until Ctrl-C or --max-frames)")
    p.add_argument("--db", required=True,
                   help="the gallery to identify against (a path or URL, as for `fromface enroll`)")
    p.add_argument("--out", metavar="ANNOTATED.mp4", default=None,
                   help="write the video with a box per tracked face: track number, name or 'unknown', score, and "
                   "clean/occluded with the visible fraction (green: identified, red: unknown, thick: occluded); "
                   ".mp4/.m4v/.mov/.mkv (mp4v) or .avi (MJPG)")
    p.add_argument("--csv", metavar="TRACKS.csv", default=None,
                   help="write one row per track: identity (or 'unknown'), score, threshold, condition, nearest "
                   "enrolled name, start and end (seconds and frame numbers), frames spanned, frames detected, and "
                   "the fraction of those seen as occluded")
    p.add_argument("--every", metavar="N", type=positive_int, default=1,
                   help="detect and embed every Nth frame only; tracks keep their boxes over the frames in between "
                   "(default 1: every frame; 3 is nearly three times as fast)")
    p.add_argument("--max-missed", metavar="N", type=positive_int, default=5,
                   help="a track ends when its face is not found in N processed frames in a row (default 5)")
    p.add_argument("--max-frames", metavar="N", type=positive_int, default=None,
                   help="stop after reading N frames (default: the whole file; a camera until Ctrl-C)")
    p.add_argument("--force", action="store_true", help="overwrite --out and --csv if they exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=run, select="all", fallback=False)  # every face of a frame; never a centre crop


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output that exists (without --force), cannot be written, or is named twice -- before any work."""
    from fromface.inference.video import writer_codec

    if args.out is not None:
        writer_codec(args.out)
        check_output_file(args.out, force=args.force)
    if args.csv is not None:
        check_output_file(args.csv, force=args.force)
    if args.out is not None and args.csv is not None and Path(args.out).resolve() == Path(args.csv).resolve():
        raise DataError(f"{args.out}: --out and --csv name the same file")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fromface.cli.verify import recognizer_for_gallery
    from fromface.inference.gallery import Gallery
    from fromface.inference.video import AnnotatedWriter, open_video, quiet_decoder_logs, watch, write_tracks_csv

    _check_outputs(args)
    quiet_decoder_logs()
    with Gallery(args.db, read_only=True) as gallery, open_video(args.source) as video:
        recognizer_for_gallery(args, gallery)
        writer = AnnotatedWriter(args.out, video.fps, video.size) if args.out is not None else None
        total = video.frame_count  # None for a camera: the bar counts frames without an end
        if args.max_frames is not None:
            total = min(total or args.max_frames, args.max_frames)
        bar = tqdm(total=total, desc="watch", unit="frame", file=sys.stderr, dynamic_ncols=True, disable=args.quiet)
        try:
            result = watch(video, gallery, gallery.recognizer, every=args.every, writer=writer,
                           max_frames=args.max_frames, max_missed=args.max_missed, on_frame=lambda _: bar.update())
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        empty = gallery.location if len(gallery) == 0 else None
    if args.csv is not None:
        write_tracks_csv(args.csv, result.tracks)
    _print_summary(args, result, video.fps, writer, empty)
    return INTERRUPTED if result.interrupted else ENDED_EARLY if result.ended_early else 0


def _print_summary(args: argparse.Namespace, result, fps: float, writer, empty: str | None) -> None:
    duration = f" ({result.frames_read / fps:.1f} s of video)" if fps else ""
    nth = "every frame" if args.every == 1 else f"one frame in {args.every}"
    print(f"{result.source}: {result.frames_read} frames{duration} in {result.seconds:.1f} s, {result.fps:.1f} "
          f"frames/s ({result.frames_processed} processed: {nth}); {len(result.tracks)} track(s)")
    if result.interrupted:
        print("  stopped by Ctrl-C: the frames read so far are kept")
    if result.ended_early:
        print(f"  ended early: {result.ended_early}; the {result.frames_read} frames read are kept")
    if empty:
        print(f"  {empty} is empty: every track is unknown (enrol people first)")
    for t in result.tracks:
        m = t.match
        score = "" if m is None else f" {m.score:.3f} (threshold {m.threshold:.3f}, {m.condition})"
        occluded = "no estimate" if t.occluded_fraction is None else f"{t.occluded_fraction:.0%}"
        print(f"  track {t.track_id}: {t.identity}{score}, {t.start_time:.2f}-{t.last_time:.2f} s "
              f"(frames {t.start_frame}-{t.last_frame}, {t.detections} detected), occluded {occluded}")
    if writer is not None:
        print(f"  annotated video: {writer.path} ({writer.frames} frames)")
    if args.csv is not None:
        print(f"  tracks: {args.csv}")
