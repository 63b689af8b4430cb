"""Benchmark registry and runner (`python -m tritonbits_harness.bench`, or `nox -s bench-<gpu>`)."""

from __future__ import annotations

import importlib
import pkgutil

from .registry import REGISTRY, Benchmark, SectionInput, register

__all__ = ["NOT_BENCHMARKS", "REGISTRY", "Benchmark", "SectionInput", "benchmark_modules", "load_all", "register"]

NOT_BENCHMARKS = frozenset({"registry", "runner", "cli", "__main__"})  # the machinery, not benchmarks


def benchmark_modules() -> list[str]:
    """Every module of this package that holds benchmarks (all but the machinery), sorted by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_BENCHMARKS)


def load_all() -> dict[str, Benchmark]:
    """Import every benchmark module (each registers itself) and return the registry."""
    for name in benchmark_modules():
        importlib.import_module(f"{__name__}.{name}")
    return REGISTRY
