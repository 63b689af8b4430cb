"""Did the GPU slow its clocks during a run? nvidia-smi's clock-event counters, read before and after.

A GPU that overheats lowers its SM clock (SW/HW thermal slowdown) and every timing taken meanwhile is slow by
an amount that has nothing to do with the kernel. A tuner that sweeps candidates one after another then picks
whichever ran while the GPU was cool. NOTE: in session 14 an H100 of the device pool ran a 1 GiB copy at
3020 GB/s for 7 s, then at 2190-2500 GB/s with "SW Thermal Slowdown: Active" (memory at 93-96 C, SM clock
510-990 MHz); its 3-minute tune sweep timed the same kernel up to 2x apart (log
docs/gpu-runs/logs/20261124T0400Z-nvidia-h100-throttled-tune.txt). So benchmark and tune records carry the
counters' increase over the run, the report flags a throttled record, the tuner refuses to write a table the
GPU throttled through, and `python -m tritonbits_harness.throttle` checks a machine before a long run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass

# The reasons that slow a kernel down; the others (idle, sync boost, applications/display clock settings) are
# not a slowdown of running work.
SLOWDOWNS = ("sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown", "hw_power_braking", "sw_power_capping")
_HEADER = re.compile(r"^(?P<indent>\s*)Clocks? (?:Event|Throttle) Reasons Counters\s*$")
_LINE = re.compile(r"^\s*(?P<name>[A-Za-z ]+?)\s*:\s*(?P<us>\d+)\s*us\s*$")


def parse_counters(text: str) -> dict[str, float]:
    """The first counters section of `nvidia-smi -q -d PERFORMANCE` as {reason: seconds} (snake_case names).
    The section is the lines indented deeper than its header; a value that is not "<n> us" (N/A) is skipped."""
    out: dict[str, float] = {}
    indent: int | None = None
    for line in text.splitlines():
        if indent is None:
            header = _HEADER.match(line)
            if header:
                indent = len(header["indent"])
            continue
        if not line.strip():
            continue
        if len(line) - len(line.lstrip()) <= indent:
            break
        m = _LINE.match(line)
        if m:
            out[m["name"].strip().lower().replace(" ", "_")] = int(m["us"]) / 1e6
    return out


def smi_id(index: int) -> str:
    """nvidia-smi's `-i` for torch's CUDA device `index`: its UUID (torch's ordinal need not be nvidia-smi's
    under CUDA_VISIBLE_DEVICES), else the ordinal."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # no torch CUDA, no uuid attribute: the ordinal is the best left
        return str(index)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def counters(index: int = 0) -> dict[str, float] | None:
    """The cumulative clock-event counters (seconds) of CUDA device `index`, or None where nvidia-smi cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "-q", "-d", "PERFORMANCE", "-i", smi_id(index)], capture_output=True,
                             text=True, check=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_counters(out.stdout) or None


def slowdown(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Seconds each slowdown reason was engaged between two readings ({} if none), None if unknown."""
    if before is None or after is None:
        return None
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in SLOWDOWNS if after.get(k, 0.0) > before.get(k, 0.0)}


@dataclass
class Watch:
    """`with Watch() as w:` ... then `w.record()`: the run's seconds and its slowdown seconds per reason.
    `enabled=False` (a CPU run) reads no counters."""

    index: int = 0
    enabled: bool = True
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    t0: float = 0.0
    seconds: float = 0.0

    def __enter__(self) -> Watch:
        self.before = counters(self.index) if self.enabled else None
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.after = counters(self.index) if self.enabled else None

    @property
    def slowdown(self) -> dict[str, float] | None:
        return slowdown(self.before, self.after)

    @property
    def thermal_s(self) -> float:
        """Seconds of thermal slowdown (SW or HW) or power braking over the run (0 where unknown)."""
        return thermal_seconds(self.record())

    def record(self) -> dict:
        return {"seconds": round(self.seconds, 1), "slowdown_s": self.slowdown}

    def warning(self) -> str | None:
        """A line for the console and the record's notes when the GPU slowed down for thermal reasons."""
        if self.thermal_s <= 0:
            return None
        return (f"the GPU slowed its clocks for {self.thermal_s:.1f} s of this {self.seconds:.0f} s run "
                f"({self.slowdown}): its timings are not comparable with a cool GPU's")  # fmt: skip


def combine(entries: list[dict | None]) -> dict | None:
    """The `throttle` entries of several records (a sharded run) as one: seconds and slowdowns summed over the
    entries that have one, `partial` when some record has none (older records); None if none has one."""
    known = [e for e in entries if e is not None]
    if not known:
        return None
    total: dict[str, float] = {}
    for e in known:
        for k, v in (e.get("slowdown_s") or {}).items():
            total[k] = round(total.get(k, 0.0) + v, 3)
    out = {"seconds": round(sum(e["seconds"] for e in known), 1), "slowdown_s": total}
    return {**out, "partial": True} if len(known) < len(entries) else out


def thermal_seconds(entry: dict | None) -> float:
    """Seconds of thermal slowdown or power braking in a record's `throttle` entry (0 if none or unknown)."""
    s = (entry or {}).get("slowdown_s") or {}
    return round(sum(v for k, v in s.items() if k != "sw_power_capping"), 3)


def is_throttled(record: dict) -> bool:
    """Whether a bench/tune/e2e record's `throttle` entry shows thermal slowdown or power braking."""
    return thermal_seconds(record.get("throttle")) > 0


def main(argv: list[str] | None = None) -> int:
    """A sustained 1 GiB copy (timing.copy_gbps) for --seconds, its GB/s after each measurement and the slowdown
    counters: exit 3 if the GPU throttled (a machine to hand back before a long benchmark), 2 without a GPU."""
    parser = argparse.ArgumentParser(prog="python -m tritonbits_harness.throttle", description=main.__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    import torch

    from . import timing  # torch and triton: imported here so that records and the report need neither

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    rates = []
    with Watch(torch.cuda.current_device()) as w:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            rates.append(timing.copy_gbps(1 << 30))
            print(f"{time.perf_counter() - t0:6.1f} s  copy {rates[-1]:.0f} GB/s", flush=True)
    print(f"slowdown over {w.seconds:.0f} s: {w.slowdown}")
    drop = min(rates) / max(rates)
    if w.thermal_s > 0 or drop < 0.95:
        print(f"THROTTLED: thermal slowdown {w.thermal_s:.1f} s, slowest copy {drop:.0%} of the fastest")
        return 3
    print(f"ok: no thermal slowdown; slowest copy {drop:.1%} of the fastest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
