"""Run records under docs/gpu-runs/: one JSON file per test or benchmark run, with the environment."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def git_sha() -> str:
    """TRITONBITS_GIT_SHA (set by whoever copied the tree to a GPU machine without .git), else git."""
    sha = os.environ.get("TRITONBITS_GIT_SHA")
    if sha:
        return sha
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=20)  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment() -> dict:
    env: dict[str, object] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "bitsandbytes": _module_version("bitsandbytes"),
        "tritonbits": _module_version("tritonbits"),
        "tritonbits_reference": _module_version("tritonbits_reference"),
        "tritonbits_harness": _version("tritonbits-harness") or _module_version("tritonbits_harness"),
        "device": "cpu (Triton interpreter)",
        "capability": None,
        "driver": None,
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        env["driver"] = _driver()
        env["cuda"] = torch.version.cuda
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write(record_dir: str | os.PathLike, kind: str, name: str, payload: dict) -> Path:
    """Write {environment, kind, name, **payload} to <dir>/<date>-<device>-<kind>-<name>.json."""
    env = environment()
    record = {"kind": kind, "name": name, "environment": env, **payload}
    stamp = str(env["date"]).replace(":", "").replace("-", "")
    path = Path(record_dir) / f"{stamp}-{slug(str(env['device']))}-{kind}-{slug(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path


def load(record_dir: str | os.PathLike) -> list[dict]:
    records = []
    for path in sorted(Path(record_dir).glob("*.json")):
        rec = json.loads(path.read_text())
        rec["_path"] = str(path)
        records.append(rec)
    return records
