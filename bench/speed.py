"""Speed and memory on this machine: auto-segmentation per volume, prompt latency, SSL and fine-tuning steps/s.

Backbones are random-initialised unless --checkpoint is given (no weights can be downloaded here); speed does not
depend on the weights' values. Writes a JSON file and prints a markdown table.

    python bench/speed.py --volume ../shared/data/ct_abdomen_totalseg/image.nii.gz --out docs/speed.json [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import DATA, command_line

from samora.config import EXPERTS, ModelConfig
from samora.data import SliceCache, load_volume
from samora.engine.inference import segment_volume
from samora.engine.losses import SegmentationLoss
from samora.model import SamoraModel
from samora.serving.interactive import Prompt, decode_slice_prompt, slice_letterbox, slice_prompts
from samora.ssl import train_expert
from samora.ssl.trainer import SSLSettings


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int = 1) -> float:
    """Mean wall seconds of `repeat` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def segresnet_seconds(volume) -> float:
    """MONAI SegResNet (radiology sample app's `segmentation` network size) on the same volume, sliding window."""
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SegResNet

    net = SegResNet(
        spatial_dims=3, in_channels=1, out_channels=9, init_filters=32, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)
    ).eval()
    x = torch.as_tensor(np.clip((volume.array + 125) / 400, 0, 1), dtype=torch.float32)[None, None]
    with torch.no_grad():
        return timed(lambda: sliding_window_inference(x, (96, 96, 96), 1, net, overlap=0.25))


def ssl_slices_per_second(model: SamoraModel, volume_path: str, steps: int, batch_size: int) -> dict[str, float]:
    """Slices/s of each real stage-1 objective (its expert, head and loss), from `steps` steps after the first one."""
    rates = {}
    with tempfile.TemporaryDirectory(prefix="samora-speed-") as tmp:
        cache = SliceCache.build([volume_path], Path(tmp) / "cache", model.config.image_size, progress=False)
        for level in EXPERTS:
            settings = SSLSettings(batch_size=batch_size, num_workers=0)
            # one warm-up step (allocator, first-call overheads), then the timed run resumes from its checkpoint
            train_expert(model, level, cache, Path(tmp) / level, 1, settings, progress=False)
            summary = train_expert(model, level, cache, Path(tmp) / level, 1 + steps, settings, progress=False)
            rates[level] = summary["slices_per_second"]
    return rates


def bench_model(preset: str, size: int, volume, checkpoint: str | None, quick: bool) -> dict:
    """All timings for one backbone preset and input size."""
    model = SamoraModel(ModelConfig(preset=preset, image_size=size, checkpoint=checkpoint)).eval()
    row = {"preset": preset, "image_size": size}
    seg_volume = volume
    slab = 8 if quick else (16 if preset != "tiny" else None)  # a central slab keeps big presets inside the budget
    if slab:
        mid = volume.shape[2] // 2
        part = volume.array[:, :, mid - slab // 2 : mid + slab // 2].copy()
        seg_volume = type(volume)(part, volume.affine, volume.path, volume.modality)
    start = time.perf_counter()
    result = segment_volume(model, seg_volume, batch_size=4)
    seconds = time.perf_counter() - start
    slices = seg_volume.shape[seg_volume.axial_axis]
    row["autoseg_s_per_volume"] = seconds * volume.shape[volume.axial_axis] / slices
    row["autoseg_slices_measured"] = slices
    assert result.labels.shape == seg_volume.shape
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        emb = model.encode(x)
        prompt = slice_prompts(Prompt("liver", foreground=[(60, 50, 0)]), 2, (122, 101, 1), size)[0]
        letterbox = slice_letterbox((122, 101, 1), 2, size)
        row["prompt_cached_ms"] = 1000 * timed(lambda: decode_slice_prompt(model, emb, prompt, letterbox), 5)
        row["prompt_reencode_ms"] = 1000 * timed(
            lambda: decode_slice_prompt(model, model.encode(x), prompt, letterbox), 2
        )
    model.set_stage("ssl-pixel")
    batch = torch.rand(2, 3, size, size)

    def ssl_step():
        model.encode(batch).pow(2).mean().backward()

    row["ssl_encoder_steps_per_s_batch2"] = 1 / timed(ssl_step, 1 if quick else 3)
    ssl_steps = 2 if quick or preset != "tiny" else 20
    row["ssl_slices_per_s_batch2"] = ssl_slices_per_second(model, str(volume.path), ssl_steps, batch_size=2)
    model.set_stage("finetune")
    loss = SegmentationLoss()
    labels = torch.randint(0, model.config.num_classes, (2, size, size))

    def finetune_step():
        loss(model(batch), labels, 0, False).backward()

    row["finetune_steps_per_s_batch2"] = 1 / timed(finetune_step, 1 if quick else 3)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", default=str(DATA / "ct_abdomen_totalseg" / "image.nii.gz"))
    parser.add_argument("--out", default="docs/speed.json")
    parser.add_argument("--checkpoint", default=None, help="official SAM checkpoint for vit_b (optional)")
    parser.add_argument("--quick", action="store_true", help="tiny only, an 8-slice slab: CI smoke")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    volume = load_volume(args.volume)
    configs = [("tiny", 128)] if args.quick else [("tiny", 128), ("vit_b", 512)]
    rows = [bench_model(p, s, volume, args.checkpoint if p == "vit_b" else None, args.quick) for p, s in configs]
    segresnet = None if args.quick else segresnet_seconds(volume)
    report = {
        "command": command_line(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": "not measured (no GPU lent)",
        },
        "volume": {"path": args.volume, "shape": list(volume.shape)},
        "weights": "random-initialised backbones" if not args.checkpoint else args.checkpoint,
        "rows": rows,
        "segresnet_s_per_volume": segresnet,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "| preset | S | auto-seg s/volume | prompt cached ms | prompt re-encode ms | SSL steps/s | "
        "fine-tune steps/s | peak RSS MB |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['preset']} | {r['image_size']} | {r['autoseg_s_per_volume']:.2f} | {r['prompt_cached_ms']:.1f} | "
            f"{r['prompt_reencode_ms']:.1f} | {r['ssl_encoder_steps_per_s_batch2']:.2f} | "
            f"{r['finetune_steps_per_s_batch2']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    print("\n| preset | S | " + " | ".join(f"SSL {lv} slices/s" for lv in EXPERTS) + " |")
    print("|---|---|" + "---|" * len(EXPERTS))
    for r in rows:
        rates = " | ".join(f"{r['ssl_slices_per_s_batch2'][lv]:.2f}" for lv in EXPERTS)
        print(f"| {r['preset']} | {r['image_size']} | {rates} |")
    if segresnet is not None:
        print(f"MONAI SegResNet sliding-window on the same volume: {segresnet:.2f} s")
    print(f"wrote {out}; command: {report['command']}; machine: {report['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
