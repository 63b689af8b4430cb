"""The benchmark registry: each benchmark names its kernel, its baselines, its cases and its bytes model.

A benchmark's `setup(case, device)` returns {provider: thunk}; the runner times every thunk in every
mode, and turns times into GB/s with the bytes model, % of the copy roofline measured in the same run
and % of the benchmark's pattern roofline (provider "pattern"), case by case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


REGISTRY: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    if bench.name in REGISTRY:
        raise ValueError(f"benchmark {bench.name!r} registered twice")
    REGISTRY[bench.name] = bench
    return bench


def case_label(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())
