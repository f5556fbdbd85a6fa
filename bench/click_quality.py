"""What one click answers on real scans with LiteMedSAM, before any training: SAM's own answer to the click against
the served one (boxes around the click, samora.serving.click_boxes), with the truth's box as the reference.

For every labelled structure present on at least 3 axial slices, 3 slices (30/50/70% of its z-range) get one click
at the point deepest inside the structure's largest part on that slice. Each answer is the clicked slice's mask (no
propagation), scored by Dice against the structure on that slice; the decoder's time per answer is recorded (the
slice's embedding is computed once beforehand and not counted). ct_abdomen_totalseg is the scan the candidate box
sizes were chosen on; mr_abdomen_totalseg (MR) did not take part in that choice.

Corrections: from the served answer to each of those clicks, --corrections more clicks, each at the point deepest
inside the largest error region of the current answer (positive where it misses the structure, negative where it
spills over), as an annotator corrects; the served answer's Dice after each click (the same protocol as the
interactive-segmentation literature's clicks-to-Dice curves). The same from the truth's box (a drawn box corrected
by clicks) under `box_corrections`.

Then, in 3D: one click in the middle of each large organ on its largest slice, answered by the served prompt path
with propagation (samora.serving.interactive.refine), once per --spread-confidence (the conf key
click_spread_confidence: how sure the model must be of the clicked slice's mask to propagate from it). Scored by
the organ's 3D Dice; the time includes encoding the slices no earlier answer had encoded.

    python bench/click_quality.py [--out docs/results/click_quality.json] [--cases ct_abdomen_totalseg ...]
                                  [--corrections 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from paths import DATA
from records import command_line, machine_info, now_utc, write_json
from report import md_table
from scipy import ndimage

from samora.data import load_label
from samora.serving import interactive
from samora.serving.runtime import ModelRuntime
from samora.serving.settings import AppSettings

CASES = ("ct_abdomen_totalseg", "mr_abdomen_totalseg")
LARGE = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas")
ANSWERS = ("sam_points", "served", "truth_box")
CORRECTED = {"corrections": "served", "box_corrections": "truth_box"}  # record key: the answer corrected


def structure_names(case: Path) -> dict[int, str]:
    """Label value -> name from a shared-data case's labels.json (with or without its "labels" wrapper)."""
    names = json.loads((case / "labels.json").read_text())
    names = names.get("labels", names)
    return {int(v): n for v, n in names.items() if int(v) != 0}


def deepest_point(truth: np.ndarray) -> tuple[int, int]:
    """The voxel deepest inside the largest connected part of a 2D mask: where an annotator clicks."""
    parts, n = ndimage.label(truth)
    largest = parts == 1 + int(np.argmax(ndimage.sum(truth, parts, range(1, n + 1))))
    i, j = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(largest))), truth.shape)
    return int(i), int(j)


def correction_click(mask: np.ndarray, truth: np.ndarray) -> tuple[tuple[int, int], bool] | None:
    """Where an annotator corrects a slice's answer: the point deepest inside its largest error region, and whether
    the click is positive there (the answer missed the structure); None where the answer is perfect."""
    errors = mask != truth
    if not errors.any():
        return None
    i, j = deepest_point(errors)
    return (i, j), bool(truth[i, j])


@contextlib.contextmanager
def prompt_path_trained_on(model, what: str):
    """Temporarily tell the router what the prompt path learned from ("points and boxes": SAM answers clicks)."""
    before = model.backbone.prompt_path_trained_on
    model.backbone.prompt_path_trained_on = what
    try:
        yield
    finally:
        model.backbone.prompt_path_trained_on = before


def answer(decoder, model, k: int, prompt: interactive.Prompt, volume, kind: str) -> tuple[np.ndarray, float]:
    """(mask on slice k, decoder seconds) of one answer kind."""
    (seed,) = interactive.slice_prompts(prompt, 2, volume.shape, model.config.image_size, volume.affine).values()
    embedding = decoder.runtime.slice_embedding(decoder.path, k)
    with prompt_path_trained_on(model, "points and boxes" if kind == "sam_points" else "boxes"):
        start = time.perf_counter()
        # the server's memo of the answers after each click: a correction decodes only its own edit
        decoded = interactive.decode_mask(model, embedding, seed, decoder.letterbox, decoder.click_memo(k))
        return decoded.mask, time.perf_counter() - start


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    return 2 * float((mask & truth).sum()) / max(float(mask.sum() + truth.sum()), 1.0)


def correction_curve(decoder, model, k: int, truth: np.ndarray, start: interactive.Prompt, volume, clicks: int) -> dict:
    """The served answer's Dice on slice k to the `start` prompt (a click, or a box) and after each of `clicks`
    correction clicks, and the decoder's seconds per corrected answer."""
    foreground, background, dices, seconds = list(start.foreground), [], [], []
    for step in range(clicks + 1):
        prompt = interactive.Prompt(start.label, list(foreground), list(background), roi=start.roi)
        mask, spent = answer(decoder, model, k, prompt, volume, "served")
        dices.append(round(dice(mask, truth), 4))
        seconds += [spent] if step else []
        correction = correction_click(mask, truth)
        if step == clicks or correction is None:
            break
        (i, j), positive = correction
        (foreground if positive else background).append((i, j, k))
    dices += dices[-1:] * (clicks + 1 - len(dices))  # a perfect answer stays perfect
    return {"dice": dices, "decoder_s": [round(t, 4) for t in seconds]}


def run_case(runtime: ModelRuntime, model, case: Path, only: list[str] | None = None, corrections: int = 0) -> list:
    image = str(case / "image.nii.gz")
    volume, _ = runtime.volume(image)
    if volume.axial_axis != 2:
        raise SystemExit(f"{case.name}: axial axis {volume.axial_axis}, this benchmark expects 2")
    labels = load_label(str(case / "label.nii.gz"), like=volume)[0]
    letterbox = interactive.slice_letterbox(volume.shape, 2, model.config.image_size, volume.affine)
    decoder = interactive.SliceDecoder(runtime, image, model, letterbox)
    rows = []
    for value, name in structure_names(case).items():
        if only and name not in only:
            continue
        present = np.nonzero((labels == value).sum(axis=(0, 1)))[0]
        if len(present) < 3:
            continue
        for fraction in (0.3, 0.5, 0.7):
            k = int(present[int(fraction * (len(present) - 1))])
            truth = labels[:, :, k] == value
            i, j = deepest_point(truth)
            rows_, cols_ = np.nonzero(truth)
            prompts = {
                "sam_points": interactive.Prompt(name, [(i, j, k)]),
                "served": interactive.Prompt(name, [(i, j, k)]),
                "truth_box": interactive.Prompt(name, roi=(rows_.min(), rows_.max(), cols_.min(), cols_.max(), k, k)),
            }
            row = {"structure": name, "slice": k, "voxels": int(truth.sum()), "click": [i, j, k]}
            for kind, prompt in prompts.items():
                mask, seconds = answer(decoder, model, k, prompt, volume, kind)
                row[kind] = {"dice": round(dice(mask, truth), 4), "decoder_s": round(seconds, 4)}
            for key, kind in CORRECTED.items():  # the clicked answer's and the drawn box's corrections
                if corrections:
                    row[key] = correction_curve(decoder, model, k, truth, prompts[kind], volume, corrections)
            rows.append(row)
            print(f"{case.name} {name} slice {k}: " + ", ".join(f"{a} {row[a]['dice']:.3f}" for a in ANSWERS))
    return rows


def run_3d(runtime: ModelRuntime, model, case: Path, confidences: list[float], only: list[str] | None) -> list[dict]:
    """3D Dice of one click per large organ, answered with propagation, at each spread confidence."""
    image = str(case / "image.nii.gz")
    volume, _ = runtime.volume(image)
    labels = load_label(str(case / "label.nii.gz"), like=volume)[0]
    values = {name: value for value, name in structure_names(case).items()}
    rows = []
    for name in [n for n in LARGE if n in values and (not only or n in only)]:
        organ = labels == values[name]
        k = int(np.argmax(organ.sum(axis=(0, 1))))
        i, j = deepest_point(organ[:, :, k])
        row = {"structure": name, "slice": k, "organ_slices": int((organ.sum(axis=(0, 1)) > 0).sum())}
        for confidence in confidences:
            start = time.perf_counter()
            mask, info = interactive.refine(runtime, image, interactive.Prompt(name, [(i, j, k)]),
                                            click_confidence=confidence)  # fmt: skip
            seconds = time.perf_counter() - start
            row[str(confidence)] = {"dice_3d": round(dice(mask > 0, organ), 4), "slices": len(info["slices"]),
                                    "dice_on_slice": round(dice(mask[:, :, k] > 0, organ[:, :, k]), 4),
                                    "seconds": round(seconds, 2)}  # fmt: skip
        rows.append(row)
        print(f"{case.name} {name} 3D: " + ", ".join(f"{c}: {row[str(c)]['dice_3d']:.3f}" for c in confidences))
    return rows


def summarise(rows: list[dict]) -> dict:
    large = [r for r in rows if r["structure"] in LARGE]
    out = {"clicks": len(rows), "clicks_on_large_organs": len(large)}
    for kind in ANSWERS:
        out[kind] = {
            "mean_dice": round(statistics.fmean(r[kind]["dice"] for r in rows), 4),
            "mean_dice_large_organs": round(statistics.fmean(r[kind]["dice"] for r in large), 4) if large else None,
            "median_decoder_s": round(statistics.median(r[kind]["decoder_s"] for r in rows), 4),
        }
    for key in [k for k in CORRECTED if rows and k in rows[0]]:
        out[key] = {
            "mean_dice_after_clicks": np.mean([r[key]["dice"] for r in rows], axis=0).round(4).tolist(),
            "mean_dice_after_clicks_large_organs":
                np.mean([r[key]["dice"] for r in large], axis=0).round(4).tolist() if large else None,
            "median_decoder_s": round(statistics.median(t for r in rows for t in r[key]["decoder_s"]), 4),
        }  # fmt: skip
    return out


def render_3d(record: dict) -> str:
    rows = []
    for name, case in record["cases"].items():
        for confidence, mean in case["summary_3d"].items():
            rows.append([name, confidence, len(case["rows_3d"]), mean])
    return md_table(["scan", "click_spread_confidence", "organs", "mean 3D Dice"], rows)


def render_corrections(record: dict) -> str:
    rows = []
    for name, case in record["cases"].items():
        for key, kind in CORRECTED.items():
            c = case["summary"].get(key)
            if c:
                rows.append([name, kind, "all", *c["mean_dice_after_clicks"], c["median_decoder_s"]])
                if c["mean_dice_after_clicks_large_organs"]:
                    rows.append([name, kind, "8 large organs", *c["mean_dice_after_clicks_large_organs"], ""])
    if not rows:
        return ""
    clicks = len(rows[0]) - 4
    steps = ["start", *[f"+{n} click{'s' * (n > 1)}" for n in range(1, clicks)]]
    headers = ["scan", "start", "structures", *steps, "decoder s per correction (median)"]
    return md_table(headers, rows)


def render(record: dict) -> str:
    rows = []
    for name, case in record["cases"].items():
        s = case["summary"]
        for kind in ANSWERS:
            rows.append([name, kind, s["clicks"], s[kind]["mean_dice"], s[kind]["mean_dice_large_organs"],
                         s[kind]["median_decoder_s"]])  # fmt: skip
    headers = ["scan", "answer", "clicks", "mean Dice", "mean Dice, 8 large organs", "decoder s (median)"]
    return md_table(headers, rows)


def measure(args: argparse.Namespace, runtime: ModelRuntime) -> dict:
    """The record of one run: each case's click rows, their summary and the 3D part."""
    version, model = runtime.model()
    record = {
        "benchmark": "click_quality",
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(1, args.threads),
        "model": {"version": version, "backbone": model.backbone.family, "encoder_path": runtime.encoder_info()},
        "cases": {},
    }
    for name in args.cases:
        rows = run_case(runtime, model, Path(args.data) / name, args.structures, args.corrections)
        rows_3d = run_3d(runtime, model, Path(args.data) / name, args.spread_confidence, args.structures)
        summary_3d = {str(c): round(statistics.fmean(r[str(c)]["dice_3d"] for r in rows_3d), 4)
                      for c in args.spread_confidence} if rows_3d else {}  # fmt: skip
        record["cases"][name] = {"summary": summarise(rows), "rows": rows, "summary_3d": summary_3d, "rows_3d": rows_3d}
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="the shared data folder")
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/results/click_quality.json"))
    parser.add_argument("--structures", nargs="*", help="only these structures (default: every labelled one)")
    parser.add_argument("--spread-confidence", nargs="*", type=float, default=[0.8, 0.7],
                        help="click_spread_confidence values of the 3D part (none: skip it)")  # fmt: skip
    parser.add_argument("--corrections", type=int, default=5, help="correction clicks after the first (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="click-quality-") as model_dir:  # the runtime's (unused) model folder
        record = measure(args, ModelRuntime(AppSettings(), model_dir))
    print(render(record))
    print(render_corrections(record))
    print(render_3d(record))
    print(f"command: {record['command']}\nmachine: {record['machine']['cpu']}; wrote {write_json(args.out, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
