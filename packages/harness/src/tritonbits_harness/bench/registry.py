"""The benchmark registry: each benchmark names its kernel, its baselines, its cases and its bytes model.

A benchmark's `setup(case, device)` returns {provider: thunk}; the runner times every thunk in every
mode, and turns times into GB/s with the bytes model, % of the copy roofline measured in the same run
and % of the benchmark's pattern roofline (provider "pattern"), case by case.

Everything about one benchmark lives in its registration: `quick` thins its GPU case list for `--quick`,
`section` renders its part of docs/benchmarks.md (without one, the report's generic section does). A
module added to this package registers itself and is found by `load_all`; nothing else names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

Thunk = Callable[[], object]


@dataclass
class Benchmark:
    name: str
    kernel: str
    description: str
    cases: Callable[[bool], list[dict]]  # cpu=True -> tiny cases for the interpreter
    bytes_model: Callable[[dict], int] | None
    setup: Callable[[dict, torch.device], dict[str, Thunk]]
    baselines: tuple[str, ...]  # providers the subject row is compared against
    modes: tuple[str, ...] = ("launch", "graph")
    runner: Callable | None = None  # custom runner (wall-clock benchmarks)
    subject: str = "tritonbits"  # the provider whose speed-up over each baseline is reported
    quick: Callable[[dict], bool] | None = None  # keep this GPU case under --quick (None: keep all)
    section: Callable[[SectionInput], list[str]] | None = None  # markdown for the report (None: generic)


@dataclass(frozen=True)
class SectionInput:
    """What a report section gets: the record its rows come from, the rows of this benchmark, and where
    its plots go (a section writes PNGs into `plot_dir` and links them as `plots/<file name>`)."""

    name: str
    record: dict
    rows: list[dict]
    plot_dir: Path
    device: str
    subject: str = "tritonbits"

    @property
    def slug(self) -> str:
        from ..records import slug

        return slug(self.device)


REGISTRY: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    if bench.name in REGISTRY:
        raise ValueError(f"benchmark {bench.name!r} registered twice")
    REGISTRY[bench.name] = bench
    return bench


def case_label(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())
