"""Time from a server process's start to a ready encoder, first start and restarts on one model folder.

Each start is a fresh Python process that builds the server's runtime (default conf: LiteMedSAM, encoder_path
auto) on the same temporary model folder and times loading the model, getting the encoder (the first start probes
every candidate path; later ones reuse the kept choice and only build it) and encoding one slice.

    python bench/encoder_restart.py [--starts 3] [--out docs/results/encoder_restart.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from records import command_line, machine_info, now_utc, write_json

ROOT = Path(__file__).resolve().parents[1]


def one_start(model_dir: str, threads: int) -> dict:
    """In this (fresh) process: seconds to load the model, to get the encoder, and to encode one slice."""
    import torch

    from samora.serving.runtime import ModelRuntime
    from samora.serving.settings import AppSettings

    torch.set_num_threads(threads)
    runtime = ModelRuntime(AppSettings(), model_dir)
    start = time.perf_counter()
    _, model = runtime.model()
    loaded = time.perf_counter()
    encoder = runtime.encoder()
    ready = time.perf_counter()
    encoder(torch.rand(1, 3, model.config.image_size, model.config.image_size))
    encoded = time.perf_counter()
    info = runtime.encoder_info()
    return {
        "model_s": round(loaded - start, 2),
        "encoder_ready_s": round(ready - loaded, 2),
        "first_encode_s": round(encoded - ready, 3),
        "path": info["chosen"],
        "reused": info["reused"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=3, help="processes started one after another (>= 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "encoder_restart.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one start in this process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_start(args.child, args.threads)))
        return 0
    if args.starts < 2:
        parser.error("--starts must be at least 2 (a first start and a restart)")
    record = {"benchmark": "encoder_restart", "command": command_line(), "date": now_utc(),
              "machine": machine_info(1, args.threads), "starts": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="samora-restart-") as model_dir:
        for n in range(args.starts):
            cmd = [sys.executable, __file__, "--child", model_dir, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            start = {"start": n + 1, **json.loads(out.stdout.strip().splitlines()[-1])}
            record["starts"].append(start)
            print(
                f"start {n + 1}: encoder ready {start['encoder_ready_s']} s ({start['path']}, reused "
                f"{start['reused']}), model {start['model_s']} s, first encode {start['first_encode_s']} s"
            )
    write_json(args.out, record)
    print(f"command: {record['command']}\nmachine: {record['machine']['cpu']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
