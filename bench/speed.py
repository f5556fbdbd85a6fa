"""Interactive speed of the default LiteMedSAM server on this machine, in one run (issue 13).

Measures: each encoder inference path (s/slice, GFLOP/s achieved, and that as a fraction of this machine's own
measured matmul peak for the same dtype); prompt round trips through the in-process runtime (a click on a cold slice,
the same click on a warm one, a 3D box over --box-slices slices cold and repeated with a changed click);
auto-segmentation of the whole volume end to end; peak RSS. Prints the command, the machine and the tables, and
writes --out (JSON). The machine may be shared: the 1-min load average is recorded beside every figure.

    python bench/speed.py [--device cpu|cuda] [--out docs/results/speed.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from jobs import peak_rss_mb
from paths import DATA
from records import command_line, machine_info, now_utc, write_json
from report import md_table
from torch.utils.flop_counter import FlopCounterMode

from samora.data import load_volume
from samora.data.intensity import set_ct_window
from samora.engine.encoder_path import PATHS, PathEncoder, benchmarked, candidates
from samora.engine.inference import segment_volume
from samora.serving.interactive import Prompt, refine
from samora.serving.runtime import ModelRuntime
from samora.serving.settings import AppSettings


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n matmul in `dtype` on this device: the machine's own reference peak."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def encoder_gflop(runtime: ModelRuntime, image: torch.Tensor) -> float:
    """GFLOP of one slice's encoding (matmuls and convolutions, torch's flop counter)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        PathEncoder(runtime.model()[1], PATHS["fp32"], runtime.settings.device)(image)
    return counter.get_total_flops() / 1e9


def bench_paths(runtime: ModelRuntime, image: torch.Tensor, names: list[str], repeats: int) -> list[dict]:
    """s/slice, GFLOP/s and fraction of the dtype's matmul peak of each path, on a real CT slice."""
    device = runtime.settings.device
    gflop = encoder_gflop(runtime, image)
    # only the dtypes of the paths measured: where bf16 is emulated (no bf16 path is offered), its 2048^3 matmul
    # alone took 64 s on an AVX2 CPU
    dtypes = {PATHS[name].dtype for name in names} - {None}
    peaks = {None: matmul_peak(device, torch.float32)} | {dtype: matmul_peak(device, dtype) for dtype in dtypes}
    rows, reference = [], None
    for name in names:
        start = time.perf_counter()
        encoder = PathEncoder(runtime.model()[1], PATHS[name], device)
        prepare_seconds = time.perf_counter() - start  # BN folding, or the ONNX export
        out = encoder(image)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            out = encoder(image)
        sync(device)
        seconds = (time.perf_counter() - start) / repeats
        reference = out if reference is None else reference
        peak = peaks.get(PATHS[name].dtype, peaks[None])
        rows.append(
            {
                "path": name,
                "s_per_slice": seconds,
                "prepare_s": prepare_seconds,
                "gflop_per_slice": gflop,
                "gflops": gflop / seconds,
                "fraction_of_matmul_peak": gflop / seconds / peak,
                "matmul_peak_gflops": peak,
                "relative_error_vs_fp32": float((out - reference).norm() / reference.norm()),
                "load1": load1(),
            }
        )
        print(f"  {name}: {seconds:.3f} s/slice ({gflop / seconds:.0f} GFLOP/s), load {load1()}", flush=True)
    return rows


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_prompts(runtime: ModelRuntime, path: str, box_slices: int) -> dict:
    """Round trips through refine() on a fresh cache: cold click, warm click, 3D box cold and repeated."""
    volume, _ = runtime.volume(path)
    shape = volume.shape
    i, j, mid = shape[0] // 2, shape[1] // 2, shape[2] // 2
    click = Prompt("liver", foreground=[(i, j, mid)])
    moved = Prompt("liver", foreground=[(i + 2, j, mid)])
    k0, k1 = max(0, mid - box_slices // 2), min(shape[2] - 1, mid + box_slices // 2 - 1)
    box = Prompt("liver", roi=(i - 15, i + 15, j - 15, j + 15, k0, k1))
    box_moved = Prompt("liver", foreground=[(i + 2, j, mid)], roi=box.roi)
    calls, answered = runtime.encoder_calls, []
    row = {"click_cold_s": timed(lambda: answered.append(refine(runtime, path, click)))}
    row["click_cold_encoded"] = runtime.encoder_calls - calls
    row["click_slices"] = len(answered[0][1]["slices"])  # a click the model is sure of propagates through z
    row["click_warm_s"] = timed(lambda: refine(runtime, path, moved))
    runtime.embeddings.clear()  # the box starts cold: the click may have encoded its slices
    runtime.decodes.clear()
    calls = runtime.encoder_calls
    row["box3d_cold_s"] = timed(lambda: refine(runtime, path, box))
    row["box3d_slices_encoded"] = runtime.encoder_calls - calls
    decoded = runtime.decodes.decoded
    row["box3d_repeat_changed_click_s"] = timed(lambda: refine(runtime, path, box_moved))
    row["box3d_repeat_decodes"] = runtime.decodes.decoded - decoded
    # the same request with warm embeddings but no decoded masks kept: what the decode cache saves
    runtime.decodes.clear()
    decoded = runtime.decodes.decoded
    row["box3d_changed_click_no_decode_cache_s"] = timed(lambda: refine(runtime, path, box_moved))
    row["box3d_no_decode_cache_decodes"] = runtime.decodes.decoded - decoded
    row["box_slices"] = k1 - k0 + 1
    row["load1"] = load1()
    return row


def bench_autoseg(runtime: ModelRuntime, path: str) -> dict:
    """Auto-segmentation end to end (load, every slice encoded through the shared cache, decode), cold cache."""
    runtime.embeddings.clear()
    _, model = runtime.model()
    start = time.perf_counter()
    volume = load_volume(path)
    # as the app's auto-segmentation calls it: the encoder's batch from the conf, the decoders' batch by default
    encode_batch = runtime.settings.infer_batch_size
    result = segment_volume(
        model,
        volume,
        encode_batch_size=encode_batch,
        device=runtime.settings.device,
        embeddings=runtime.embedding_store(model),
    )
    seconds = time.perf_counter() - start
    slices = volume.shape[volume.axial_axis]
    assert result.labels.shape == volume.shape
    # again with every embedding cached: what the decoders, the volume load and the rest cost beside the encoder
    start = time.perf_counter()
    store = runtime.embedding_store(model)
    segment_volume(
        model, load_volume(path), encode_batch_size=encode_batch, device=runtime.settings.device, embeddings=store
    )
    warm = time.perf_counter() - start
    return {
        "seconds": seconds,
        "slices": slices,
        "s_per_slice": seconds / slices,
        "warm_seconds": warm,
        "load1": load1(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--volume", default=str(DATA / "ct_abdomen_totalseg" / "image.nii.gz"))
    parser.add_argument("--out", default="docs/results/speed.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed encodes per path (after one warm-up)")
    parser.add_argument("--path", default="auto", help="encoder path of the prompt and auto-segmentation rows")
    parser.add_argument("--box-slices", type=int, default=40)
    parser.add_argument("--checkpoint", default=None, help="a LiteMedSAM-layout checkpoint instead of the bundled one")
    parser.add_argument("--quick", action="store_true", help="1 repeat, an 8-slice box, no auto-segmentation")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: this machine has no CUDA GPU; nothing measured (run it on a GPU machine)")
        return 2
    torch.set_num_threads(args.threads)
    settings = AppSettings(
        device=args.device, encoder_path=args.path, embedding_cache_gb=0.0, checkpoint=args.checkpoint
    )
    set_ct_window(settings.window())
    record = {"benchmark": "speed", "command": command_line(), "date": now_utc(), "load1_start": load1()}
    record["machine"] = machine_info(1, args.threads) | {"device": args.device}
    print(f"command: {record['command']}\nmachine: {record['machine']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="samora-speed-") as model_dir:
        runtime = ModelRuntime(settings, model_dir)
        image = runtime.slice_input(args.volume, load_volume(args.volume).shape[2] // 2).to(args.device)
        # --quick (a smoke run) times the probe's candidates only: each exported path costs an export and a compile
        names = candidates(args.device) if args.quick else benchmarked(args.device)
        record["paths"] = bench_paths(runtime, image, names, 1 if args.quick else args.repeats)
        record["chosen_path"] = runtime.encoder_info()
        record["prompts"] = bench_prompts(runtime, args.volume, 8 if args.quick else args.box_slices)
        record["autoseg"] = None if args.quick else bench_autoseg(runtime, args.volume)
    record["peak_rss_mb"] = peak_rss_mb()
    record["load1_end"] = load1()
    write_json(Path(args.out), record)
    print(markdown(record))
    return 0


def markdown(record: dict) -> str:
    """The tables of one run."""
    base = record["paths"][0]["s_per_slice"]
    rows = [
        [
            r["path"],
            f"{r['s_per_slice']:.3f}",
            f"{base / r['s_per_slice']:.2f}x",
            f"{r['gflops']:.0f}",
            f"{r['fraction_of_matmul_peak']:.2f} of {r['matmul_peak_gflops']:.0f}",
            f"{r['relative_error_vs_fp32']:.4f}",
            f"{r.get('prepare_s', 0.0):.1f}",
            r["load1"],
        ]
        for r in record["paths"]
    ]
    head = ["path", "s/slice", "vs fp32", "GFLOP/s", "fraction of matmul peak (GFLOP/s)", "rel. error"]
    head += ["prepare s", "load"]
    text = md_table(head, rows)
    text += f"\n\nEncoder: {record['paths'][0]['gflop_per_slice']:.1f} GFLOP per slice. "
    text += f"Chosen path: {record['chosen_path']['chosen']}.\n\n"
    p = record["prompts"]
    text += md_table(
        ["click cold s", "click warm s", f"3D box ({p['box_slices']} slices) cold s", "3D box repeated s"]
        + ["repeated, no decode cache s", "load"],
        [
            [f"{p['click_cold_s']:.2f} ({p.get('click_slices', 1)} slices, {p['click_cold_encoded']} encoded)"]
            + [f"{p['click_warm_s']:.3f}", f"{p['box3d_cold_s']:.1f} ({p['box3d_slices_encoded']} encoded)"]
            + [f"{p['box3d_repeat_changed_click_s']:.2f} ({p['box3d_repeat_decodes']} decodes)"]
            + [f"{p['box3d_changed_click_no_decode_cache_s']:.2f} ({p['box3d_no_decode_cache_decodes']} decodes)"]
            + [p["load1"]]
        ],
    )
    a = record["autoseg"]
    if a:
        text += (
            f"\n\nAuto-segmentation end to end: {a['seconds']:.1f} s for {a['slices']} slices (load {a['load1']}); "
            f"{a['warm_seconds']:.1f} s again with every embedding cached."
        )
    text += f"\n\nPeak RSS {record['peak_rss_mb']:.0f} MB; load {record['load1_start']} -> {record['load1_end']}."
    return text


if __name__ == "__main__":
    sys.exit(main())
