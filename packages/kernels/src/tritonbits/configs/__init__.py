"""Checked-in tuned configs: one JSON table per op (`<op>.json` beside this file), regenerated on a GPU by
`nox -s tune-<gpu> -- --op <op>`. Nothing is tuned at call time.

A table maps GPU family -> key -> config. The op owns its key function (shape buckets, dtype names) and
both the tuner and the op's lookup call that one function, so every tuned entry is reachable.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .. import _runtime

_DTYPE_NAMES = {torch.int32: "int32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.uint8: "uint8", torch.int8: "int8"}  # fmt: skip


def dtype_key(dtype: torch.dtype) -> str:
    """The short name a table uses for a dtype ('bf16', 'fp32', 'int32', ...)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"no config key for dtype {dtype}") from None


def table_path(op: str) -> Path:
    """Where `op`'s table lives: next to this module in the installed (or source) package."""
    return Path(str(resources.files(__name__).joinpath(f"{op}.json")))


@functools.cache
def table(op: str) -> dict[str, dict[str, Any]]:
    """{family: {key: config}} of `op` ({} when it has no table)."""
    path = table_path(op)
    return json.loads(path.read_text()) if path.exists() else {}


# A family without a table of its own for an op takes this family's table: the same architecture and SM count
# (H200 and H100 SXM: sm90, 132 SMs; only the memory differs), so the tiles and split-K of its configs fit.
# NOTE: linear_4bit on the H200, H100 table vs heuristic side by side (ci/linear4bit_family_probe.py, log
# docs/gpu-runs/logs/20261123T1811Z-nvidia-h200-linear4bit-family-probe.txt): the table 1.17-1.54x faster at
# M = 1, 2, 4, equal elsewhere (docs/kernels/linear_4bit.md, "The H200").
FALLBACK_FAMILY = {"h200": "h100"}


def family_table(op: str, family: str) -> dict[str, Any]:
    """`op`'s entries for `family`: its own, else FALLBACK_FAMILY's, else {}."""
    tables = table(op)
    if family in tables:
        return tables[family]
    return tables.get(FALLBACK_FAMILY.get(family, ""), {})


def lookup(op: str, device: torch.device, key: str) -> Any | None:
    """The tuned config of `op` for `key` on `device`'s GPU family (or its FALLBACK_FAMILY), or None."""
    return family_table(op, _runtime.gpu_family(device)).get(key)


def write(op: str, family: str, entries: dict[str, Any], path: Path | None = None) -> Path:
    """Replace `family`'s entries in `op`'s table (the tuner's only way to write one)."""
    path = path or table_path(op)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[family] = dict(sorted(entries.items()))
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    table.cache_clear()
    return path
