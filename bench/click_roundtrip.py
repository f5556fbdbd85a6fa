"""A click on a 512x512x100 CT through the real server, timed by MONAILabelClient (issue 13, round trips).

The default server (LiteMedSAM, bundled weights, no training) serves a study made from ct_abdomen_totalseg's CT
resampled onto a 512x512x100 grid. A point on the liver of the slice with the most liver is sent as a `samora_prompt`
infer request: once on a cold slice (encoded on demand), then --clicks times with the point moved a few voxels while
the server encodes the rest of the study in the background (an annotator's next clicks), then --clicks times once
that background work is done (the server's CPU time stops growing), each click a new point; then those last clicks
again (answered from the server's decode cache); then --clicks correction clicks after the first of those, each at
the point deepest inside the largest error region of the last answer on the slice (positive where it misses the
liver, negative where it spills over), as an annotator corrects. Each click records the round trip seen by the
client, the server's own time for the request, the slices it encoded, and the Dice of the answer's mask against the
liver on that slice (so that a fast but wrong answer shows).

    python bench/click_roundtrip.py [--out docs/results/click_roundtrip.json] [--clicks 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
from click_quality import correction_click
from grid import label_value, on_grid
from paths import DATA
from records import command_line, machine_info, now_utc, write_json
from report import md_table

from samora.data.volumes import save_image
from samora.server_process import start_server, stop_server

SHAPE = (512, 512, 100)
TARGET_ROUND_TRIP_S = 0.5


def liver_point(liver: np.ndarray) -> tuple[int, tuple[int, int]]:
    """The axial slice with the most liver and the liver voxel nearest that slice's liver centroid."""
    k = int(np.argmax(liver.sum(axis=(0, 1))))
    ij = np.argwhere(liver[:, :, k])
    centre = ij.mean(axis=0)
    i, j = ij[np.argmin(((ij - centre) ** 2).sum(axis=1))]
    return k, (int(i), int(j))


def settle(pid: int, quiet_cpu_s: float = 0.2, timeout: float = 600) -> float:
    """Wait until the server's process tree uses under `quiet_cpu_s` CPU seconds per second; returns the wait."""
    start = time.monotonic()
    proc = psutil.Process(pid)

    def cpu() -> float:
        procs = [proc, *proc.children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())

    before = cpu()
    while time.monotonic() - start < timeout:
        time.sleep(2)
        now = cpu()
        if (now - before) / 2 < quiet_cpu_s:
            break
        before = now
    return time.monotonic() - start


def click(client, image_id: str, k: int, point: tuple[int, int], liver: np.ndarray) -> dict:
    """One prompt request: round trip, server time, slices encoded, Dice of the mask on slice k."""
    return request(client, image_id, k, [[point[0], point[1], k]], [], liver)[1]


def request(client, image_id: str, k: int, foreground: list, background: list, liver: np.ndarray):
    """(the answer's mask on slice k, its row: round trip, server time, slices encoded, slices the answer labels
    (more than one where the click spread through z), Dice on slice k)."""
    params = {"label": "liver", "foreground": foreground, "background": background, "roi": [], "slice": k}
    start = time.perf_counter()
    label_path, result = client.infer("samora_prompt", image_id, params)
    round_trip = time.perf_counter() - start
    label = np.asarray(nib.load(label_path).dataobj) > 0
    mask = label[:, :, k]
    Path(label_path).unlink(missing_ok=True)
    truth = liver[:, :, k]
    dice = 2 * float((mask & truth).sum()) / max(1.0, float(mask.sum() + truth.sum()))
    return mask, {
        "round_trip_s": round(round_trip, 4),
        "server_s": result.get("latencies", {}).get("total"),
        "encoded_slices": result.get("encoded_slices"),
        "labelled_slices": int(label.any(axis=(0, 1)).sum()),
        "dice_on_slice": round(dice, 4),
        "clicks": len(foreground) + len(background),
    }


def corrections(client, image_id: str, k: int, point: tuple[int, int], liver: np.ndarray, count: int) -> list:
    """Up to `count` correction clicks after a click at `point`, each at the deepest point of the last answer's
    largest error region on slice k; one row per corrected answer."""
    foreground, background, rows = [[point[0], point[1], k]], [], []
    mask = request(client, image_id, k, foreground, background, liver)[0]
    for _ in range(count):
        correction = correction_click(mask, liver[:, :, k])
        if correction is None:
            break
        (i, j), positive = correction
        (foreground if positive else background).append([i, j, k])
        mask, row = request(client, image_id, k, foreground, background, liver)
        rows.append(row)
    return rows


def clicks(client, image_id: str, k: int, point: tuple[int, int], liver: np.ndarray, offsets: range) -> list[dict]:
    """One click per offset, the point moved diagonally by that many voxels: every click is a new prompt (a repeated
    one would be answered from the server's decode cache)."""
    return [click(client, image_id, k, (point[0] + d, point[1] - d), liver) for d in offsets]


def summary(rows: list[dict]) -> dict:
    return {
        "clicks": len(rows),
        "round_trip_median_s": round(statistics.median(r["round_trip_s"] for r in rows), 4),
        "round_trip_max_s": round(max(r["round_trip_s"] for r in rows), 4),
        "server_median_s": round(statistics.median(r["server_s"] for r in rows), 4),
        "encoded_slices": sum(r["encoded_slices"] or 0 for r in rows),
        "labelled_slices_max": max(r["labelled_slices"] for r in rows),
        "dice_on_slice_min": min(r["dice_on_slice"] for r in rows),
    }


def run(args: argparse.Namespace) -> dict:
    data = Path(args.data) / "ct_abdomen_totalseg"
    image, affine = on_grid(data / "image.nii.gz", SHAPE)
    liver = on_grid(data / "label.nii.gz", SHAPE)[0].round() == label_value(data, "liver")
    k, point = liver_point(liver)
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        save_image(image.astype(np.int16), affine, studies / "ct512.nii.gz")
        conf = {"labels": "liver=1", "bootstrap": "off", "train_every": "0", "threads": str(args.threads)}
        server = start_server(studies, conf, Path(tmp) / "work", timeout=600)
        try:
            client = server.client
            cold = click(client, "ct512", k, point, liver)
            during = clicks(client, "ct512", k, point, liver, range(1, args.clicks + 1))
            waited = settle(server.proc.pid)
            idle = clicks(client, "ct512", k, point, liver, range(args.clicks + 1, 2 * args.clicks + 1))
            repeated = clicks(client, "ct512", k, point, liver, range(args.clicks + 1, 2 * args.clicks + 1))
            first = (point[0] + args.clicks + 1, point[1] - args.clicks - 1)  # the first idle click: warm
            corrected = corrections(client, "ct512", k, first, liver, args.clicks)
            tree = [psutil.Process(server.proc.pid), *server.remember_children()]
            rss_mb = sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20
        finally:
            stop_server(server)
    return {
        "benchmark": "click_roundtrip",
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(1, args.threads),
        "study": {"source": "ct_abdomen_totalseg resampled (nearest)", "shape": list(SHAPE), "slice": k},
        "target_round_trip_s": TARGET_ROUND_TRIP_S,
        "cold": cold,
        "warm_during_background_encoding": {**summary(during), "rows": during},
        "background_settled_after_s": round(waited, 1),
        "warm_idle": {**summary(idle), "rows": idle},
        "warm_idle_repeated_clicks": {**summary(repeated), "rows": repeated},
        "warm_idle_corrections": {**summary(corrected), "rows": corrected} if corrected else None,
        "server_rss_mb_at_end": round(rss_mb),
    }


def render(record: dict) -> str:
    cold = record["cold"]
    rows = [["cold slice", cold["round_trip_s"], cold["server_s"], 1, cold["encoded_slices"],
             cold.get("labelled_slices"), cold["dice_on_slice"]]]  # fmt: skip
    conditions = (("warm, background encoding", "warm_during_background_encoding"), ("warm, idle", "warm_idle"),
                  ("warm, idle, the same clicks again (decode cache)", "warm_idle_repeated_clicks"),
                  ("warm, idle, correction clicks after the first idle one", "warm_idle_corrections"))  # fmt: skip
    for name, key in conditions:
        s = record.get(key)
        if s is None:  # no such clicks (a perfect first answer), or a record from before the row existed
            continue
        trip = f"{s['round_trip_median_s']} (max {s['round_trip_max_s']})"
        rows.append([name, trip, s["server_median_s"], s["clicks"], s["encoded_slices"], s.get("labelled_slices_max"),
                     s["dice_on_slice_min"]])  # fmt: skip
    headers = ["click", "round trip s (median)", "server s", "clicks", "slices encoded", "slices labelled (max)",
               "liver Dice on slice (min)"]  # fmt: skip
    return md_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="the shared data folder")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/results/click_roundtrip.json"))
    parser.add_argument("--clicks", type=int, default=5, help="clicks per warm condition")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    args = parser.parse_args(argv)
    record = run(args)
    print(render(record))
    print(f"server RSS at the end {record['server_rss_mb_at_end']} MB; background settled after "
          f"{record['background_settled_after_s']} s")  # fmt: skip
    print(f"command: {record['command']}\nmachine: {record['machine']['cpu']}; wrote {write_json(args.out, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
