"""Active learning on real CT: label the most uncertain pseudo-study (the app's `uncertainty` strategy) vs a random
one, on pseudo-studies cut from ct_abdomen_totalseg, with the app's cheap training mode warm-started every round.

    python bench/active_ct.py [--quick] [--preset litemedsam] [--out docs] [--work runs/bench] [--workers 2]

Pool: the few-shot benchmark's training slices (bench/fewshot.py's slab split; the test slabs and their guard
slices never enter the pool) cut into pseudo-studies of 3-4 consecutive axial slices. Test set: the few-shot test
slabs, scored with the same metrics. Each seed starts both strategies from the same random pseudo-study; after every
round one more is labelled: `uncertainty` = the highest `segment_volume(...).mean_entropy` (what the app's scoring
stores for its strategy), `random` = a uniform choice. The model is SAMora's cheap mode (frozen encoder with SSL
experts, cached embeddings, heads and prompt path trained); every round continues the previous round's model, as the
app's trainer continues the served version. Writes OUT/results/active_ct.json and OUT/active_ct.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import active_learning
import numpy as np
from cli import add_common_args, preset_for, with_overrides
from fewshot import load_case, score, segment_test_slabs, slab_volume, split_slabs, test_embeddings, window_for
from jobs import Job, open_journal, peak_rss_mb, reset_peak_rss, run_jobs
from methods import METHODS, build_model, finetune_config
from paths import DATA
from plots import plot_lines
from records import run_header, write_json
from report import PSEUDO_LABEL_NOTE, RANDOM_BACKBONE_NOTE, header_lines
from ssl_runs import SSLSpec, build_ssl_cache, spec_dict, ssl_dir, ssl_job, ssl_spec_for, without_missing_experts

METHOD = "samora_cached"
STRATEGIES = active_learning.STRATEGIES
STUDY_SLICES = 4  # the longest pseudo-study; a run of training slices that does not divide evenly gets shorter ones
DEFAULTS = {
    "seeds": [0, 1, 2],
    "max_labeled": 6,
    "steps": 100,
    "batch_size": 2,
    "lr": 3e-4,
    "image_size": 256,
    "experts_seed": 0,
    "ssl_steps": 20,
    "ssl_batch_size": 4,
}
QUICK = {**DEFAULTS, "seeds": [0], "max_labeled": 2, "steps": 3, "lr": 3e-3, "image_size": 64, "ssl_steps": 2}


def pool_studies(train: Sequence[int], length: int = STUDY_SLICES) -> list[tuple[int, ...]]:
    """The training slices as pseudo-studies: each unbroken run of consecutive slices is cut into the fewest
    studies of (nearly) equal size with at most `length` slices each."""
    runs: list[list[int]] = []
    for z in sorted(train):
        if runs and runs[-1][-1] == z - 1:
            runs[-1].append(z)
        else:
            runs.append([z])
    studies = []
    for run in runs:
        for part in np.array_split(np.array(run), math.ceil(len(run) / length)):
            studies.append(tuple(int(z) for z in part))
    return studies


def run_trajectory(seed: int, strategy: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One strategy, one seed: rounds of train (warm) -> score the test slabs -> acquire one pseudo-study."""
    reset_peak_rss()
    start = time.perf_counter()
    case = load_case(settings["data"], tuple(settings["window_hu"]))
    split = split_slabs(case.labels.shape[case.axis])
    studies = pool_studies(split.train)
    size = settings["image_size"]
    model = build_model(
        method=METHODS[METHOD],
        labels=case.label_map,
        image_size=size,
        seed=seed,
        preset=settings["preset"],
        checkpoint=settings["checkpoint"],
        experts_dir=settings["experts"],
    )
    embeddings = test_embeddings(model, settings)  # the frozen encoder: every slice is encoded once, on disk
    labeled = [int(np.random.default_rng([seed, 42]).integers(len(studies)))]  # same first study, both strategies
    pick_rng = np.random.default_rng([seed, 43])
    rounds = []
    while True:
        indices = sorted(z for i in labeled for z in studies[i])
        history = train_round(model, case, indices, settings, seed=seed + len(labeled))
        pred = segment_test_slabs(
            model=model, case=case, split=split, image_size=size, embeddings=embeddings, device=settings["device"]
        )
        scores = score(pred, case, split)
        entry: dict[str, Any] = {
            "labeled": len(labeled),
            "labeled_slices": len(indices),
            "studies": [list(studies[i]) for i in labeled],
            "test_dice": scores["large_mean_dice"],
            "test_mean_dice_all": scores["mean_dice"],
            "test_dice_per_organ": {name: m["dice"] for name, m in scores["organs"].items()},
            "train_seconds": history["total_time"],
        }
        rounds.append(entry)
        if len(labeled) >= settings["max_labeled"]:
            break
        unlabeled = [i for i in range(len(studies)) if i not in labeled]
        if strategy == "uncertainty":
            entropy = {i: study_entropy(model, case, studies[i], embeddings, settings) for i in unlabeled}
            pick = max(entropy, key=lambda i: entropy[i])
            entry["entropy"] = {str(i): e for i, e in entropy.items()}
        else:
            pick = int(pick_rng.choice(unlabeled))
        entry["picked"] = list(studies[pick])
        labeled.append(pick)
    return {
        "seed": seed,
        "strategy": strategy,
        "rounds": rounds,
        "pool_size": len(studies),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def train_round(model: Any, case: Any, indices: Sequence[int], settings: dict[str, Any], seed: int) -> dict:
    """Continue training `model` in the cheap mode on the labelled slices `indices`; returns finetune's history."""
    from samora.engine.train import finetune, slices_from_arrays

    train = slices_from_arrays(
        volume01=case.v01,
        labels=case.labels,
        axis=case.axis,
        size=settings["image_size"],
        context="single",
        case_id="pool",
        empty_fraction=1.0,
        rng=np.random.default_rng(seed),
        indices=indices,
    )
    config = finetune_config(
        steps=settings["steps"],
        n_slices=len(train),
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        seed=seed,
        mode="cached",
        embedding_dir=settings["embedding_dir"],
        device=settings["device"],
    )
    return finetune(model, train, config)


def study_entropy(model: Any, case: Any, study: Sequence[int], embeddings: Any, settings: dict[str, Any]) -> float:
    """The app's uncertainty score of one pseudo-study: mean predictive entropy over its body voxels."""
    from samora.engine.inference import segment_volume

    volume, _ = slab_volume(case, study[0], study[-1] + 1)
    return segment_volume(model, volume, case.window, device=settings["device"], embeddings=embeddings).mean_entropy


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The SSL experts (reused from bench/fewshot.py when it trained them) and every trajectory."""
    wall = time.perf_counter()
    settings = with_overrides(QUICK if args.quick else DEFAULTS, args, ("seeds", "steps", "max_labeled"))
    # real weights by default (the question is about them); the quick smoke run stays on the tiny random backbone
    preset = preset_for(args.checkpoint, args.preset or (None if args.quick else "litemedsam"))
    work, data = Path(args.work), str(Path(args.data))
    pool = checked_pool(data, preset=preset, max_labeled=settings["max_labeled"])
    spec = ssl_spec_for(settings, preset=preset, checkpoint=args.checkpoint, data=data, window_hu=window_for(preset))
    build_ssl_cache(work, spec)
    job_settings = trajectory_settings(args, settings=settings, preset=preset, spec=spec)
    results = run_journalled(args, jobs=active_ct_jobs(work, spec, job_settings), job_settings=job_settings)
    return {
        **run_header("active_ct", args),
        "settings": {
            **settings,
            "preset": preset,
            "checkpoint": args.checkpoint,
            "method": METHODS[METHOD].title,
            "pool": [list(s) for s in pool],
            "ssl": spec_dict(spec),
        },
        "ssl_run": results["ssl"],
        "trajectories": sorted((r for k, r in results.items() if k != "ssl"), key=lambda r: (r["strategy"], r["seed"])),
        "wall_s": time.perf_counter() - wall,
    }


def checked_pool(data: str, *, preset: str, max_labeled: int) -> list[tuple[int, ...]]:
    """The pseudo-studies of the CT's training slices; refused unless more than `max_labeled` of them."""
    case = load_case(data, window_for(preset))
    pool = pool_studies(split_slabs(case.labels.shape[case.axis]).train)
    if len(pool) <= max_labeled:
        raise SystemExit(f"--max-labeled must be below the pool size ({len(pool)} pseudo-studies)")
    return pool


def trajectory_settings(
    args: argparse.Namespace, *, settings: dict[str, Any], preset: str, spec: SSLSpec
) -> dict[str, Any]:
    """What every trajectory job reads: the run's settings, where the data and embeddings lie, the experts' seed."""
    work = Path(args.work)
    return {
        **settings,
        "data": str(Path(args.data)),
        "window_hu": list(window_for(preset)),
        "embedding_dir": str(work / "embeddings"),
        "device": args.device,
        "preset": preset,
        "checkpoint": args.checkpoint,
        "experts": str(ssl_dir(work, spec, settings["experts_seed"])),
    }


def active_ct_jobs(work: Path, spec: SSLSpec, job_settings: dict[str, Any]) -> list[Job]:
    """The SSL job (one seed's experts serve every trajectory), then one trajectory per seed and strategy."""
    jobs = [ssl_job(key="ssl", work=work, spec=spec, seed=job_settings["experts_seed"])]
    for seed in job_settings["seeds"]:
        for strategy in STRATEGIES:
            kwargs = {"seed": seed, "strategy": strategy, "settings": job_settings}
            jobs.append(Job(key=f"{strategy}/{seed}", fn=run_trajectory, kwargs=kwargs, after=("ssl",)))
    return jobs


def run_journalled(args: argparse.Namespace, *, jobs: list[Job], job_settings: dict[str, Any]) -> dict[str, dict]:
    """Run the jobs the journal does not hold yet, journalling each result; returns every job's result."""
    # finished trajectories are journalled beside the results: an interrupted run (or a clone) resumes from them
    recipe = {k: v for k, v in job_settings.items() if k not in ("seeds", "data", "embedding_dir", "experts")}
    journal_path = Path(args.out) / "results" / "active_ct_jobs.jsonl"
    journal, done = open_journal(path=journal_path, settings=recipe, jobs=jobs, fresh=args.fresh)
    print(f"active learning on CT: {len(jobs)} jobs ({len(done)} journalled) on {args.workers} workers x "
          f"{args.threads} thread(s)", flush=True)  # fmt: skip

    def on_result(job: Job, result: dict) -> None:
        active_learning.report_progress(job, result)
        journal.record(job.key, result)

    done = without_missing_experts(done, jobs, {"ssl": job_settings["experts"]})
    return run_jobs(jobs, workers=args.workers, threads=args.threads, on_result=on_result, done=done)


def plot(record: dict, out: Path) -> Path:
    """Large-organ test Dice vs labelled pseudo-studies, both strategies."""
    needed = active_learning.labels_needed(record)
    return plot_lines(
        series=active_learning.curves(record),
        out_png=out / "active_ct.png",
        title="Active learning on real CT: large-organ Dice on the test slabs (mean ± std over seeds)",
        xlabel="labelled pseudo-studies",
        ylabel="mean Dice, 8 large organs",
        hlines={"random's final Dice": needed["random_final_mean_dice"]} if needed else None,
    )


def render_markdown(record: dict) -> str:
    """The real-CT active-learning section of docs/benchmarks.md."""
    s = record["settings"]
    sizes = sorted({len(study) for study in s["pool"]})
    out = [
        "## Active learning on real CT",
        "",
        f"- Pool: {len(s['pool'])} pseudo-studies of {'-'.join(map(str, sizes))} consecutive axial slices cut from "
        "the training slices of ct_abdomen_totalseg (the few-shot slab split; test slabs and their guard slices "
        "never in the pool). Test set: the few-shot test slabs. The other CTs in the shared data carry no "
        "abdominal labels (hand-drawn liver/spine/heart on 3 slices, one lesion, or none), so they are not in the "
        "pool.",
        f"- Seeds {s['seeds']}: both strategies start from the same random pseudo-study; one more is labelled per "
        "round: `uncertainty` = highest mean predictive entropy (`segment_volume(...).mean_entropy`, the app's "
        "scoring), `random` = uniform choice.",
        f"- Model: {s['method']}, backbone `{s['preset']}`, SSL experts of seed {s['experts_seed']} "
        f"({s['ssl']['steps']} steps per expert), input {s['image_size']}; each round continues the previous "
        f"round's model for {s['steps']} optimiser steps of batch {s['batch_size']}, lr {s['lr']}.",
        "- Test Dice = mean over the 8 large organs on the test slabs. " + PSEUDO_LABEL_NOTE,
        "",
    ]
    out += active_learning.results_lines(record, unit="pseudo-studies", metric="large-organ Dice")
    out += ["", "![active learning on CT](active_ct.png)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--data", default=str(DATA), help="the shared data folder")
    parser.add_argument("--device", default="cpu", help="torch device of training and inference (e.g. cuda)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per round")
    parser.add_argument("--max-labeled", type=int, default=None, help="stop when this many pseudo-studies are labelled")
    parser.add_argument("--fresh", action="store_true", help="ignore the journal of an earlier run")
    args = parser.parse_args(argv)
    record = run(args)
    out = Path(args.out)
    path = write_json(out / "results" / "active_ct.json", record)
    plot(record, out)
    print(render_markdown(record))
    print("\n".join(header_lines(record)))
    print(f"wrote {path} and {out / 'active_ct.png'}")
    if not record["settings"]["checkpoint"] and record["settings"]["preset"] == "tiny":
        print(RANDOM_BACKBONE_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
