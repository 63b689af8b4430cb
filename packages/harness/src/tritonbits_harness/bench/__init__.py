"""Benchmark registry and runner (`python -m tritonbits_harness.bench`, or `nox -s bench-<gpu>`)."""

from .registry import REGISTRY, Benchmark, register

__all__ = ["REGISTRY", "Benchmark", "load_all", "register"]


def load_all() -> dict[str, Benchmark]:
    """Import every benchmark module (each registers itself) and return the registry."""
    from . import dequant_bias, dequantize_4bit, quantize_4bit  # noqa: F401

    return REGISTRY
