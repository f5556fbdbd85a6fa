"""Active-learning simulation: label the most uncertain study (highest mean predictive entropy from
samora.engine.inference.segment_volume) vs a random study, retrain, score a fixed test set.

    python bench/active_learning.py [--quick] [--out docs] [--work runs/bench]

Pool: 12 synthetic abdominal CT phantoms (samora.data.make_phantom, seeds 1000-1011, 96x96x24 voxels at
3x3x6 mm, 5 labels); test set: 4 more phantoms (seeds 2000-2003). Each seed starts from the same random labelled
study for both strategies, fine-tunes the previous round's model further after every acquisition (as the app's
trainer continues the served version; --cold-start retrains from scratch) with a fixed step budget per round and
scores mean Dice on the test phantoms. The model is the app's default on a random backbone: SAMora HL-Attn
(reduced) with the experts also fine-tuned, starting from the seed's SSL experts (trained on the real CT images by
bench/fewshot.py, or here if missing). Writes OUT/results/active_learning.json and OUT/active_learning.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from cli import add_common_args, preset_for, with_overrides
from jobs import Job, run_jobs
from methods import METHODS, build_model, finetune_config
from paths import DATA
from plots import plot_lines
from records import run_header, write_json
from report import RANDOM_BACKBONE_NOTE, fmt_ms, header_lines, md_table
from ssl_runs import SSLSpec, build_ssl_cache, spec_dict, ssl_dir, ssl_job, ssl_spec_for
from stats import mean_std

METHOD = "samora_ft"
STRATEGIES = ("uncertainty", "random")
POOL_SEED0 = 1000
TEST_SEED0 = 2000
DEFAULTS = {
    "seeds": [0, 1, 2],
    "pool": 12,
    "test": 4,
    "max_labeled": 6,
    "steps": 150,
    "batch_size": 2,
    "lr": 3e-3,
    "image_size": 128,
    "shape": [96, 96, 24],
    "spacing": [3.0, 3.0, 6.0],
    "ssl_steps": 200,
    "ssl_batch_size": 8,
}
QUICK = {
    **DEFAULTS,
    "seeds": [0],
    "pool": 3,
    "test": 1,
    "max_labeled": 2,
    "steps": 4,
    "image_size": 64,
    "shape": [48, 48, 8],
    "spacing": [6.0, 6.0, 18.0],
    "ssl_steps": 2,
    "ssl_batch_size": 4,
}


def phantom_file(work: Path, settings: dict[str, Any]) -> Path:
    """Where the generated pool and test phantoms are stored (generated once, read by every worker)."""
    shape = "x".join(str(s) for s in settings["shape"])
    return Path(work) / f"al_phantoms_{settings['pool']}p{settings['test']}t_{shape}.npz"


def make_phantoms(work: Path, settings: dict[str, Any]) -> Path:
    """Generate the pool and test phantoms (int16 HU images, labels, affines) into one .npz."""
    from samora.data import make_phantom

    path = phantom_file(work, settings)
    if path.exists():
        return path
    seeds = [POOL_SEED0 + i for i in range(settings["pool"])] + [TEST_SEED0 + i for i in range(settings["test"])]
    made = [make_phantom(s, shape=tuple(settings["shape"]), spacing=tuple(settings["spacing"])) for s in seeds]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(
        tmp,
        images=np.stack([m[0] for m in made]),
        labels=np.stack([m[1] for m in made]),
        affines=np.stack([m[2] for m in made]),
        seeds=np.array(seeds),
    )
    tmp.replace(path)
    return path


def run_trajectory(seed: int, strategy: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One strategy, one seed: rounds of train -> score test -> acquire one study."""
    from samora.engine.train import finetune

    start = time.perf_counter()
    phantoms = load_phantoms(settings)
    # the same first study for both strategies
    labeled = [int(np.random.default_rng([seed, 42]).integers(phantoms.pool))]
    pick_rng = np.random.default_rng([seed, 43])
    rounds = []
    model = None
    while True:
        # Warm start (default) continues from the previous round's model, as the app's trainer fine-tunes the served
        # version; cold start rebuilds it, which made every round's Dice depend on one short run from scratch.
        if model is None or not settings.get("warm_start", True):
            model = trajectory_model(seed, settings)
        train = labeled_slices(phantoms, labeled=labeled, seed=seed, size=settings["image_size"])
        config = finetune_config(
            steps=settings["steps"],
            n_slices=len(train),
            batch_size=settings["batch_size"],
            lr=settings["lr"],
            seed=seed,
        )
        history = finetune(model, train, config)
        test_scores = score_test_phantoms(model, phantoms, n_test=settings["test"])
        entry: dict[str, Any] = {
            "labeled": len(labeled),
            "studies": [f"pool_{i}" for i in labeled],
            "train_slices": len(train),
            "test_dice": float(np.mean(test_scores)),
            "test_dice_per_study": test_scores,
            "train_seconds": history["total_time"],
        }
        rounds.append(entry)
        if len(labeled) >= settings["max_labeled"]:
            break
        pick, entropy = acquire(model, phantoms, strategy=strategy, labeled=labeled, pick_rng=pick_rng)
        if entropy is not None:
            entry["entropy"] = entropy
        entry["picked"] = f"pool_{pick}"
        labeled.append(pick)
    return {"seed": seed, "strategy": strategy, "rounds": rounds, "seconds": time.perf_counter() - start}


def load_phantoms(settings: dict[str, Any]) -> SimpleNamespace:
    """The generated phantoms: the pool size, labels, the pool's images scaled to [0, 1], every phantom as a Volume
    (the pool's, then the test set's), and the CT window."""
    from samora.data import IntensityWindow, Volume, normalise

    data = np.load(settings["phantoms"])
    images, labels, affines = data["images"], data["labels"], data["affines"]
    window = IntensityWindow.ct_abdomen()
    return SimpleNamespace(
        pool=settings["pool"],
        labels=labels,
        scaled=[normalise(images[i], window) for i in range(settings["pool"])],
        volumes=[Volume(images[i].astype(np.float32), affines[i], f"phantom_{i}", "CT") for i in range(len(images))],
        window=window,
    )


def trajectory_model(seed: int, settings: dict[str, Any]) -> Any:
    """A fresh model of the benchmark's method on the phantom labels, with the seed's SSL experts."""
    from samora.data import PHANTOM_LABELS

    return build_model(
        method=METHODS[METHOD],
        labels=PHANTOM_LABELS,
        image_size=settings["image_size"],
        seed=seed,
        preset=settings["preset"],
        checkpoint=settings["checkpoint"],
        experts_dir=settings["experts"],
    )


def labeled_slices(phantoms: SimpleNamespace, *, labeled: list[int], seed: int, size: int) -> Any:
    """The axial training slices of the labelled pool studies (10% of the empty ones kept), in one set."""
    from samora.engine.train import concat_slices, slices_from_arrays

    parts = [
        slices_from_arrays(
            volume01=phantoms.scaled[i],
            labels=phantoms.labels[i],
            axis=2,
            size=size,
            context="single",
            case_id=f"pool_{i}",
            empty_fraction=0.1,
            rng=np.random.default_rng([seed, i]),
        )
        for i in labeled
    ]
    return concat_slices(parts, size)


def score_test_phantoms(model: Any, phantoms: SimpleNamespace, *, n_test: int) -> list[float]:
    """Mean Dice of the model's segmentation of each of the `n_test` test phantoms (the phantoms after the pool)."""
    from samora.data import PHANTOM_LABELS
    from samora.engine.inference import segment_volume
    from samora.metrics import mean_dice

    pool, window = phantoms.pool, phantoms.window
    return [
        mean_dice(
            segment_volume(model, phantoms.volumes[pool + j], window).labels, phantoms.labels[pool + j], PHANTOM_LABELS
        )
        for j in range(n_test)
    ]


def acquire(
    model: Any, phantoms: SimpleNamespace, *, strategy: str, labeled: list[int], pick_rng: Any
) -> tuple[int, dict[str, float] | None]:
    """The pool study to label next: the most uncertain one, with every unlabelled study's mean entropy, or a random
    one (entropies None)."""
    from samora.engine.inference import segment_volume

    unlabeled = [i for i in range(phantoms.pool) if i not in labeled]
    if strategy == "uncertainty":
        scores = {i: segment_volume(model, phantoms.volumes[i], phantoms.window).mean_entropy for i in unlabeled}
        return max(scores, key=lambda i: scores[i]), {f"pool_{i}": s for i, s in scores.items()}
    return int(pick_rng.choice(unlabeled)), None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """SSL experts (reused when bench/fewshot.py already trained them) and all trajectories."""
    wall = time.perf_counter()
    settings = run_settings(args)
    preset = preset_for(args.checkpoint, args.preset)
    work = Path(args.work)
    spec = ssl_spec_for(settings, preset=preset, checkpoint=args.checkpoint, data=args.data)
    build_ssl_cache(work, spec)
    phantoms = make_phantoms(work, settings)
    jobs = [ssl_job(key=f"ssl/{s}", work=work, spec=spec, seed=s) for s in settings["seeds"]]
    shared = {**settings, "phantoms": str(phantoms), "preset": preset, "checkpoint": args.checkpoint}
    jobs += trajectory_jobs(work, spec=spec, shared=shared)
    print(f"active learning: {len(jobs)} jobs on {args.workers} workers x {args.threads} thread(s)", flush=True)

    results = run_jobs(jobs, workers=args.workers, threads=args.threads, on_result=report_progress)
    return {
        **run_header("active_learning", args),
        "settings": {
            **settings,
            "preset": preset,
            "checkpoint": args.checkpoint,
            "method": METHODS[METHOD].title,
            "pool_seeds": [POOL_SEED0 + i for i in range(settings["pool"])],
            "test_seeds": [TEST_SEED0 + i for i in range(settings["test"])],
            "ssl": spec_dict(spec),
            "empty_slice_fraction": 0.1,
            "augmentation": "none",
        },
        "ssl_runs": [r for k, r in results.items() if k.startswith("ssl/")],
        "trajectories": sorted(
            (r for k, r in results.items() if not k.startswith("ssl/")), key=lambda r: (r["strategy"], r["seed"])
        ),
        "wall_s": time.perf_counter() - wall,
    }


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The profile (quick or full) with the command line's overrides and the warm/cold start; a pool smaller than
    the studies to label is refused."""
    settings = with_overrides(QUICK if args.quick else DEFAULTS, args, ("seeds", "steps", "pool", "max_labeled"))
    settings["warm_start"] = not getattr(args, "cold_start", False)
    if settings["pool"] < settings["max_labeled"]:
        raise SystemExit("--pool must be at least --max-labeled")
    return settings


def trajectory_jobs(work: Path, *, spec: SSLSpec, shared: dict[str, Any]) -> list[Job]:
    """One trajectory per seed and strategy, each after its seed's SSL job and with that seed's experts."""
    jobs = []
    for seed in shared["seeds"]:
        job_settings = {**shared, "experts": str(ssl_dir(work, spec, seed))}
        for strategy in STRATEGIES:
            kwargs = {"seed": seed, "strategy": strategy, "settings": job_settings}
            jobs.append(Job(key=f"{strategy}/{seed}", fn=run_trajectory, kwargs=kwargs, after=(f"ssl/{seed}",)))
    return jobs


def report_progress(job: Job, result: dict) -> None:
    """One line per finished job: an SSL run's time, or a trajectory's test Dice after each round."""
    if "rounds" not in result:
        print(f"  {job.key}: {result['seconds']:.0f} s", flush=True)
        return
    dice = " ".join(f"{r['test_dice']:.3f}" for r in result["rounds"])
    print(f"  {job.key}: test Dice by #labelled studies: {dice} ({result['seconds']:.0f} s)", flush=True)


def curves(record: dict) -> dict[str, tuple[list[int], list[list[float]]]]:
    """Per strategy: numbers of labelled studies and the per-seed test Dice at each."""
    out = {}
    for strategy in STRATEGIES:
        trajectories = [t for t in record["trajectories"] if t["strategy"] == strategy]
        if not trajectories:
            continue
        x = [r["labeled"] for r in trajectories[0]["rounds"]]
        out[strategy] = (x, [[r["test_dice"] for r in t["rounds"]] for t in trajectories])
    return out


def labels_needed(record: dict) -> dict[str, Any]:
    """Studies the uncertainty strategy needs to reach the random strategy's final mean Dice (mean curve)."""
    c = curves(record)
    if "random" not in c or "uncertainty" not in c:
        return {}
    x, random_ys = c["random"]
    target = float(np.mean([ys[-1] for ys in random_ys]))
    ux, uys = c["uncertainty"]
    mean_u = np.mean(np.array(uys), axis=0)
    reached = next((int(n) for n, d in zip(ux, mean_u, strict=True) if d >= target), None)
    per_seed = {}
    for t_u in (t for t in record["trajectories"] if t["strategy"] == "uncertainty"):
        t_r = next(t for t in record["trajectories"] if t["strategy"] == "random" and t["seed"] == t_u["seed"])
        goal = t_r["rounds"][-1]["test_dice"]
        per_seed[str(t_u["seed"])] = next((r["labeled"] for r in t_u["rounds"] if r["test_dice"] >= goal), None)
    return {
        "random_final_mean_dice": target,
        "random_labels": int(x[-1]),
        "uncertainty_labels_to_reach": reached,
        "per_seed": per_seed,
    }


def plot(record: dict, out: Path) -> Path:
    """Test Dice vs labelled studies, both strategies."""
    needed = labels_needed(record)
    hlines = {"random's final Dice": needed["random_final_mean_dice"]} if needed else None
    return plot_lines(
        series=curves(record),
        out_png=out / "active_learning.png",
        title="Active learning on phantoms: mean test Dice (mean ± std over seeds)",
        xlabel="labelled studies",
        ylabel="mean Dice on the test phantoms",
        hlines=hlines,
    )


def results_lines(record: dict, *, unit: str, metric: str) -> list[str]:
    """The per-round table (mean ± std over seeds, one column per strategy) and the sentence on the labels the
    uncertainty strategy needs to reach random's final Dice; `unit` names what is labelled, `metric` the score."""
    c = curves(record)
    needed = labels_needed(record)
    out = []
    if c:
        x = c[next(iter(c))][0]
        rows = [[n] + [fmt_ms([ys[i] for ys in c[k][1]]) for k in c] for i, n in enumerate(x)]
        out.append(md_table([f"labelled {unit}", *[f"{k}: {metric}" for k in c]], rows))
    if needed:
        reached, total = needed["uncertainty_labels_to_reach"], needed["random_labels"]
        outcome = "**never** within the budget"
        if reached is not None:
            outcome = f"**{reached}** labelled {unit} ({reached / total:.0%} of random's labels)"
        out += [
            "",
            f"Random's final mean Dice ({total} labelled {unit}): {needed['random_final_mean_dice']:.3f}. Uncertainty "
            f"sampling reaches it (mean curve) with {outcome}; per seed: {needed['per_seed']} (None = not reached).",
        ]
    return out


def render_markdown(record: dict) -> str:
    """The active-learning section of docs/benchmarks.md."""
    s = record["settings"]
    out = [
        "## 3. Active learning (simulation)",
        "",
        f"- Pool: {s['pool']} synthetic abdominal CT phantoms (`samora.data.make_phantom`, seeds "
        f"{s['pool_seeds'][0]}-{s['pool_seeds'][-1]}, {'x'.join(map(str, s['shape']))} voxels at "
        f"{'x'.join(f'{v:g}' for v in s['spacing'])} mm, labels liver, spleen, kidneys, spine); fixed test set: "
        f"{s['test']} further phantoms (seeds {s['test_seeds'][0]}-{s['test_seeds'][-1]}). Phantoms, not real scans: "
        "their organs differ in position, size, shape and noise only, so this is a mechanics check of the strategy, "
        "not evidence about real studies.",
        f"- Each seed ({s['seeds']}) starts both strategies from the same random labelled study; after every round "
        f"one study is labelled: `uncertainty` = the unlabelled study with the highest `segment_volume(...)"
        f".mean_entropy` (mean predictive entropy over the body), `random` = uniform choice. After each acquisition "
        + (
            "the previous round's model is fine-tuned further on all labelled studies (as the app's trainer continues "
            "the served version): "
            if s.get("warm_start")
            else "the model is retrained from scratch: "
        )
        + f"{s['method']}, {s['steps']} optimiser steps of batch "
        f"{s['batch_size']}, lr {s['lr']}, input {s['image_size']}, SSL experts of the same seed (trained on the "
        f"real CT images, {s['ssl']['steps']} steps per expert). Backbone: `{s['preset']}`"
        + (", random weights." if not s["checkpoint"] else f" from {s['checkpoint']}."),
        "",
    ]
    out += results_lines(record, unit="studies", metric="test Dice")
    out += ["", "![active learning](active_learning.png)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--data", default=str(DATA), help="the shared data folder (for the SSL studies)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per round")
    parser.add_argument(
        "--cold-start", action="store_true", help="retrain from scratch every round (default: continue the last model)"
    )
    parser.add_argument("--pool", type=int, default=None, help="pool size (>= 12 for the documented run)")
    parser.add_argument("--max-labeled", type=int, default=None, help="stop when this many studies are labelled")
    args = parser.parse_args(argv)
    record = run(args)
    out = Path(args.out)
    path = write_json(out / "results" / "active_learning.json", record)
    plot(record, out)
    print(render_markdown(record))
    print("\n".join(header_lines(record)))
    print(f"wrote {path} and {out / 'active_learning.png'}")
    print(RANDOM_BACKBONE_NOTE if not record["settings"]["checkpoint"] else "")
    means = {k: mean_std([ys[-1] for ys in v[1]])[0] for k, v in curves(record).items()}
    print("final mean test Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items() if not math.isnan(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
