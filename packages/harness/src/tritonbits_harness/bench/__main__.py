"""python -m tritonbits_harness.bench --gpu h100 [--any-gpu] [--only NAME ...] | --cpu"""

from __future__ import annotations

import argparse
import os
import sys

if "--cpu" in sys.argv[1:]:
    # triton.language reads this when it is first imported; set it before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from rich.console import Console

from .. import gpus, records, throttle, timing
from . import load_all
from .runner import parse_shard, progress_bar, run_benchmark, summary_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonbits-bench", description=__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--gpu", choices=sorted(gpus.PROFILES), help="the GPU profile this run is for")
    target.add_argument("--cpu", action="store_true", help="tiny shapes under the interpreter (plumbing only)")
    parser.add_argument("--any-gpu", action="store_true", help="run on a GPU other than --gpu, labelled as such")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="a thinned case list, for probing")
    parser.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition budget per timing")
    parser.add_argument(
        "--shard",
        default="1/1",
        help="I/N: every N-th case from the I-th, its own record (a long "
        "sweep over several calls; the report shows a complete set of one commit as one run)",
    )
    parser.add_argument("--record-dir", default="docs/gpu-runs")
    args = parser.parse_args(argv)
    try:
        shard = parse_shard(args.shard)
    except ValueError as exc:
        parser.error(str(exc))
    console = Console(width=None if sys.stdout.isatty() else 110)

    device_info = gpus.current_device()
    if args.cpu:
        device = torch.device("cpu")
    else:
        if device_info is None:
            console.print(f"[red]bench-{args.gpu}: no CUDA device is visible; benchmarks need a GPU "
                          "(use --cpu for the plumbing check).")  # fmt: skip
            return 2
        real = device_info.profile.name if device_info.profile else device_info.name
        if real != args.gpu and not args.any_gpu:
            console.print(f"[red]bench-{args.gpu}: this machine has a {device_info.name}, not a {args.gpu}. "
                          "Run the matching session, or pass -- --any-gpu to run anyway (labelled).")  # fmt: skip
            return 2
        device = torch.device("cuda")

    registry = load_all()
    names = args.only or list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        console.print(f"[red]unknown benchmarks {unknown}; registered: {sorted(registry)}")
        return 2

    copy = None if args.cpu else timing.copy_gbps(1 << 30, device)
    if copy:
        console.print(f"device-to-device copy: {copy:.0f} GB/s (read + write), measured in this run")
    rows: list[dict] = []
    errors: dict[str, str] = {}
    notes: list[str] = []
    gpu_index = torch.cuda.current_device() if device.type == "cuda" else 0
    with throttle.Watch(gpu_index, enabled=not args.cpu) as watch, progress_bar(console) as progress:
        for name in names:
            try:
                rows += run_benchmark(registry[name], device, cpu=args.cpu, rep_ms=args.rep_ms, copy_gbps=copy,
                                      progress=progress, quick=args.quick, notes=notes, shard=shard)  # fmt: skip
            except Exception as exc:  # record it, run the others, fail at the end
                errors[name] = f"{type(exc).__name__}: {exc}"
                console.print_exception()
    for name in names:
        console.print(summary_table(name, [r for r in rows if r["benchmark"] == name], registry[name], args.cpu))

    warning = None if args.cpu else watch.warning()
    if warning:
        notes.insert(0, warning)
    label = "cpu-interpreter" if args.cpu else args.gpu
    path = records.write(args.record_dir, "bench", label, {
        "profile": None if args.cpu else args.gpu,
        "ran_on_other_gpu": bool(not args.cpu and device_info and device_info.profile
                                 and device_info.profile.name != args.gpu),
        "meaningless": args.cpu,
        "quick": args.quick,
        "shard": list(shard) if shard != (1, 1) else None,
        "copy_gbps": copy,
        "throttle": None if args.cpu else watch.record(),
        "benchmarks": {n: {"kernel": registry[n].kernel, "description": registry[n].description,
                           "baselines": list(registry[n].baselines), "subject": registry[n].subject}
                       for n in names},
        "rows": rows,
        "errors": errors,
        "notes": notes,
    })  # fmt: skip
    for note in notes[:20]:
        console.print(f"[yellow]{note}")
    console.print(f"record written to {path}")
    for name, err in errors.items():
        console.print(f"[red]benchmark {name} failed: {err}")
    if warning:
        console.print(f"[red]{warning}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
