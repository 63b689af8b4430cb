"""Host time of one 4-bit layer call as transformers makes it, `layer(x)` at decode (run on a GPU machine), and
its synced latency (host + GPU): a bf16 `nn.Linear`, bnb's `Linear4bit` (integration disabled), and enabled with each
decode choice, through bnb's own `Linear4bit.forward` (the op path) and through the integration's
`Linear4bit.forward` (`tritonbits.integrations.bitsandbytes._linear4bit_forward`). Outputs of the two enabled
paths are compared with `torch.equal` first. Modes are timed in blocks (enable/disable between them), the blocks
repeated `--reps` times in turn; each block is `timing.host_us_rounds` over `timing.issue_us` (the clock stops
before the synchronize, so a call whose GPU work is longer still shows its host time), and the figure is the least
disturbed round over all blocks. "synced" is one call and a synchronize, back to back (host + GPU latency).

    PYTHONPATH=packages/kernels/src:packages/harness/src:packages/reference/src python ci/linear4bit_module_probe.py
"""

from __future__ import annotations

import argparse

import bitsandbytes as bnb
import torch

import tritonbits.integrations.bitsandbytes as tb_bnb
from tritonbits_harness import timing
from tritonbits_reference import bnb as RB

SHAPES = {
    "q_proj 4096->4096": (4096, 4096),
    "up_proj 4096->14336": (4096, 14336),
    "down_proj 14336->4096": (14336, 4096),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    bnb_forward = bnb.nn.Linear4bit.forward
    modes = {  # name -> (decode or None for disabled, whether the integration's forward is used)
        "bnb": (None, False),
        "enabled auto, bnb's forward": ("auto", False),
        "enabled auto": ("auto", True),
        "enabled tritonbits, bnb's forward": ("tritonbits", False),
        "enabled tritonbits": ("tritonbits", True),
    }

    def set_mode(mode: str) -> None:
        decode, ours = modes[mode]
        tb_bnb.disable()  # enable() with the same arguments again would do nothing
        if decode is None:
            return
        tb_bnb.enable(("cuda",), decode=decode)
        if not ours:
            bnb.nn.Linear4bit.forward = bnb_forward  # the op path alone (disable() puts it back either way)

    with torch.no_grad():
        for label, (k, n) in SHAPES.items():
            dense = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            q = RB.linear4bit(k, n, dtype=torch.bfloat16, device="cuda")
            for m in args.ms:
                x = torch.randn(m, 1, k, device="cuda", dtype=torch.bfloat16)
                for decode in ("auto", "tritonbits"):  # the integration's forward returns the op path's bits
                    set_mode(f"enabled {decode}")
                    ours = q(x)
                    set_mode(f"enabled {decode}, bnb's forward")
                    theirs = q(x)
                    print(f"{label} M={m} decode={decode}: forward == op path: {torch.equal(ours, theirs)}")
                layers = {"bf16 nn.Linear": dense, **dict.fromkeys(modes, q)}
                host: dict[str, list[float]] = {name: [] for name in layers}
                for _ in range(args.reps):
                    for mode, layer in layers.items():
                        set_mode(mode if mode in modes else "bnb")
                        took = timing.host_us_rounds({mode: lambda layer=layer, x=x: layer(x)}, rounds=args.rounds,
                                                     timer=timing.issue_us)  # fmt: skip
                        host[mode].append(took[mode][0])
                synced = {}
                for mode, layer in layers.items():
                    set_mode(mode if mode in modes else "bnb")
                    synced[mode] = timing.host_us(lambda layer=layer, x=x: (layer(x), torch.cuda.synchronize()), n=200)
                tb_bnb.disable()
                base = min(host["bnb"])
                print(
                    f"== {label}, x [{m}, 1, {k}] bf16: host us per call (min over {args.reps} blocks x "
                    f"{args.rounds} rounds of 200) | x bnb's host time | synced us per call"
                )
                for mode, values in host.items():
                    print(f"  {mode:38s} {min(values):7.1f}  {base / min(values):5.2f}x  {synced[mode]:8.1f}")
    bnb.nn.Linear4bit.forward = bnb_forward


if __name__ == "__main__":
    main()
