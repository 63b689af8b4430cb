"""Run the GPU tests marked `sanitize` under NVIDIA compute-sanitizer, one process per tool (a record and a log each).

The tests (`TESTS`): every op and variant on small shapes, and linear_4bit's Gluon kernels under forced configs that
reach each of their pipelines. A JSON record and the full log per tool go under the record directory.

    python -m tritonbits_harness.sanitize --gpu h100 --record-dir docs/gpu-runs [--tools memcheck,initcheck]
        [--dtypes bf16] [-- extra pytest args]

Tools: memcheck (out-of-bounds and misaligned accesses), initcheck (a read of device memory nothing wrote:
an output element an op left unwritten is read back by the test), racecheck (shared-memory hazards: Triton
stages reductions and layout changes through shared memory). Every tool runs with --error-exitcode 1 and
PYTORCH_NO_CUDA_MEMORY_CACHING=1: with torch's caching allocator, a tensor sits inside a larger cached
block, so an access past its end stays inside allocated memory (memcheck sees nothing) and a fresh
torch.empty is memory an earlier tensor wrote (initcheck sees nothing). The run passes only when pytest
passed, at least one test ran, and the tool reports 0 errors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import records

TOOLS = {
    "memcheck": ["--tool", "memcheck", "--leak-check", "no"],
    "initcheck": ["--tool", "initcheck"],
    "racecheck": ["--tool", "racecheck", "--racecheck-report", "all"],
}
# every op and variant on small shapes, and the Gluon kernels (linear_4bit's mma and wgmma: inline PTX, cp.async
# pipelines, warpgroup products) under forced configs that reach each of their pipelines
TESTS = (
    "packages/kernels/tests/test_reliability_gpu.py",
    "packages/kernels/tests/test_linear_4bit_mma.py",
    "packages/kernels/tests/test_linear_4bit_wgmma.py",
)


def summary(log: str) -> tuple[int | None, dict[str, int]]:
    """(errors the sanitizer reported, pytest's outcome counts) read from a run's output."""
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", log)]
    hazards = [int(n) for n in re.findall(r"RACECHECK SUMMARY: (\d+) hazard", log)]
    total = sum(errors) + sum(hazards) if errors or hazards else None
    counts: dict[str, int] = {}
    finals = [line for line in log.splitlines() if re.search(r"\b(passed|failed|no tests ran)\b.* in [\d.]+s", line)]
    for n, outcome in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)\b", finals[-1] if finals else ""):
        counts[outcome.rstrip("s") if outcome == "errors" else outcome] = int(n)
    return total, counts


def plant(kind: str) -> None:
    """Run under the sanitizer by the self-check: a kernel error the tools must report."""
    import torch

    import tritonbits
    from tritonbits.ops import dequantize_4bit as dq
    from tritonbits.quant_state import PreparedWeight

    n = 4096
    q = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, device="cuda")
    state = tritonbits.QuantState(absmax=torch.rand(n // 64, device="cuda") + 0.5, shape=torch.Size([n]),
                                  dtype=torch.float16)  # fmt: skip
    w = PreparedWeight.build(q, state)
    full = torch.empty(n, dtype=torch.float16, device="cuda")
    if kind == "oob":  # the launch planned for n outputs, given a buffer of n / 2
        grid, args, constexprs, options = dq.plan(w.A, w.absmax, None, None, None, full, 64, 0, "nf4")
        small = torch.empty(n // 2, dtype=torch.float16, device="cuda")
        dq._launcher(grid, (*args[:3], small, *args[4:]), constexprs, options, small.device)
        out = small
    else:  # n / 2 outputs written into the first half of a fresh buffer; the whole buffer read back
        dq.launch_weight(w, full[: n // 2])
        out = full
    torch.cuda.synchronize()
    print(f"planted {kind}: sum {out.float().sum().item()}")


def self_check(sanitizer: str) -> dict[str, dict]:
    """{tool: {planted, errors, ok}}: ok when the tool reported errors on its planted case."""
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    results = {}
    for tool, kind in (("memcheck", "oob"), ("initcheck", "unwritten")):
        cmd = [sanitizer, *TOOLS[tool], "--error-exitcode", "1", "--print-limit", "5",
               sys.executable, "-m", "tritonbits_harness.sanitize", "--plant", kind]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        errors, _ = summary(proc.stdout + proc.stderr)
        results[tool] = {"planted": kind, "errors": errors, "returncode": proc.returncode,
                         "ok": proc.returncode == 1 and bool(errors)}  # fmt: skip
        print(f"sanitize self-check: {tool} on a planted {kind}: {errors} errors "
              f"({'detected' if results[tool]['ok'] else 'NOT DETECTED'})", flush=True)  # fmt: skip
    return results


def run_tool(tool: str, gpu: str, dtypes: str, record_dir: Path, sanitizer: str, extra: list[str],
             check: dict | None) -> bool:  # fmt: skip
    cmd = [sanitizer, *TOOLS[tool], "--error-exitcode", "1", "--print-limit", "100",
           sys.executable, "-m", "pytest", *TESTS, "-m", "sanitize", f"--gpu-profile={gpu}", f"--dtypes={dtypes}",
           "-p", "no:cacheprovider", "-q", *extra]  # fmt: skip
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PYTHONUNBUFFERED": "1"}
    print(f"sanitize: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    log = proc.stdout + proc.stderr
    errors, counts = summary(log)
    ok = proc.returncode == 0 and errors == 0 and counts.get("passed", 0) > 0 and not counts.get("failed")
    ok = ok and (check is None or check["ok"])
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    log_path = record_dir / "logs" / f"{stamp}-{gpu}-sanitize-{tool}.txt"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(cmd)}\n\n{log}")
    path = records.write(record_dir, "sanitize", f"{gpu}-{dtypes}-{tool}", {
        "tool": tool, "ok": ok, "errors": errors, "returncode": proc.returncode, "counts": counts,
        "seconds": round(seconds, 1), "log": str(log_path), "args": cmd[1:], "self_check": check,
    })  # fmt: skip
    tail = "\n".join(log.strip().splitlines()[-5:])
    print(f"{tail}\nsanitize {tool}: {'OK' if ok else 'FAILED'} ({errors} errors, {counts}, {seconds:.0f} s); "
          f"record {path}, log {log_path}", flush=True)  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", help="GPU profile (h100, h200, ...); required")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="output dtypes of the tests (all by default)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--record-dir", default="docs/gpu-runs")
    parser.add_argument("--no-self-check", action="store_true", help="skip the planted-error check")
    parser.add_argument("--plant", choices=["oob", "unwritten"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plant:
        plant(args.plant)
        return 0
    if not args.gpu:
        parser.error("--gpu is required")
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(sanitizer).exists():
        print("sanitize: compute-sanitizer not found (PATH or /usr/local/cuda/bin)", file=sys.stderr)
        return 2
    tools = args.tools.split(",")
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from {sorted(TOOLS)}")
    checks = {} if args.no_self_check else self_check(sanitizer)
    results = {tool: run_tool(tool, args.gpu, args.dtypes, Path(args.record_dir), sanitizer, extra, checks.get(tool))
               for tool in tools}  # fmt: skip
    print("sanitize: " + ", ".join(f"{t} {'OK' if ok else 'FAILED'}" for t, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
