"""Text pieces of the benchmark reports: tables, 'mean ± std' cells, the header of a record, the shared caveats and
the fixed prose of docs/benchmarks.md (report_template.md)."""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from stats import as_float, mean_std

PSEUDO_LABEL_NOTE = (
    "The ct_abdomen_totalseg labels are TotalSegmentator PSEUDO-labels (model output, not manual annotation): "
    "every Dice/HD95 here measures agreement with that model, not with a radiologist."
)
RANDOM_BACKBONE_NOTE = (
    "The SAM backbone is the `tiny` preset (4 blocks, width 96) with RANDOM weights: no SAM checkpoint can be "
    "downloaded on this machine. Absolute numbers are therefore far below published SAM results and say nothing about "
    "a real SAM; pass --checkpoint sam_vit_b_01ec64.pth (with --preset vit_b) to run the same protocol on real weights."
)


def fmt_ms(values: Sequence[Any], digits: int = 3, missed_word: str = "missed") -> str:
    """'mean ± std' over seeds; infinite values (empty predictions) are counted and named, not averaged."""
    values = list(values)
    if not values:
        return "-"
    n_inf = sum(1 for v in values if math.isinf(as_float(v)))
    mean, std = mean_std(values)
    if math.isnan(mean):
        return f"{missed_word} ({n_inf}/{len(values)})" if n_inf else "-"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
    if n_inf:
        text += f" ({missed_word} {n_inf}/{len(values)})"
    return text


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def cpu_text(machine: dict[str, Any]) -> str:
    """The CPU and, where the record has them, its vector ISA and whether it computes bf16 natively."""
    if "cpu_capability" not in machine:  # records written before these were kept
        return machine["cpu"]
    bf16 = "native bf16" if machine["cpu_bf16_native"] else "bf16 emulated"
    return f"{machine['cpu']} [{machine['cpu_capability']}, {bf16}]"


def header_lines(record: dict[str, Any]) -> list[str]:
    """Command, machine and date lines printed by every script."""
    m = record["machine"]
    return [
        f"command: {record['command']}",
        f"date: {record['date']}",
        f"machine: {cpu_text(m)} ({m['cpu_cores_usable']} usable cores), {m['workers']} workers x "
        f"{m['torch_threads_per_worker']} torch thread(s), torch {m['torch']}, {m['platform']}; GPU: {m['gpu']}",
        f"wall time: {record.get('wall_s', math.nan):.0f} s",
    ]


TEMPLATE = Path(__file__).with_name("report_template.md")


@functools.cache
def _sections() -> dict[str, str]:
    parts = re.split(r"^<!-- section: ([\w-]+) -->$", TEMPLATE.read_text(), flags=re.M)
    return {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def fill(section: str, values: dict[str, Any] | None = None, **more: Any) -> str:
    """One `<!-- section: NAME -->` part of report_template.md with its `$placeholders` filled in (all required)."""
    return string.Template(_sections()[section]).substitute(values or {}, **more)
