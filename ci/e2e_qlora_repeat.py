"""Do two QLoRA runs of the same model in the same mode give the same losses? (run on a GPU machine)

The e2e benchmark's QLoRA phase (tritonbits_harness.e2e, docs/integrations.md) finds bnb's and the enabled
model's losses equal at the first step(s) and a few 1e-4 apart after. This trains pairs of identical models side by
side on the same batches (e2e.qlora_steps: same LoRA init, same data, each its own AdamW): bnb against bnb, enabled
against enabled, bnb against enabled; then the same three pairs again under
``torch.use_deterministic_algorithms(True)``. Where a same-mode pair drifts apart as far as the mixed pair does,
the drift is the stack's own run-to-run nondeterminism, not tritonbits. Prints each pair's per-step loss
differences. Usage: PYTHONPATH=<the three src/ trees> python ci/e2e_qlora_repeat.py [--layers 2] [--steps 6]
"""

import argparse
import functools
import os
import tempfile

import torch

from tritonbits_harness import e2e

PAIRS = (("bnb", "bnb"), ("tritonbits", "tritonbits"), ("bnb", "tritonbits"))


def train_pair(path, device, modes, args) -> list[float]:
    """The per-step loss differences of two freshly loaded models, modes[0] against modes[1]."""
    runs = {}
    for i, mode in enumerate(modes):
        with e2e._mode(mode, (device.type,)):
            model = e2e.load_4bit(path, device)
        runs[f"{mode}{i}"] = (e2e.add_lora(model, r=16, seed=0), functools.partial(e2e._mode, mode, (device.type,)))
    out = e2e.qlora_steps(runs, args.batch, args.seq, args.steps, 0, device)
    ra, rb = out.values()
    del runs, out
    e2e._free()
    return [x - y for x, y in zip(ra["losses"], rb["losses"], strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--deterministic-first", action="store_true", help="the deterministic block first")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS asks for
    device = torch.device("cuda")
    cfg = e2e.llama_config(layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="tritonbits-qlora-repeat-") as tmp:
        e2e.save_random_model(cfg, tmp, seed=0, device=device)
        e2e._free()
        print(f"{torch.cuda.get_device_name()}, {args.layers} layers, batch {args.batch} x {args.seq}, "
              f"{args.steps} steps; loss differences per step (first minus second)")  # fmt: skip
        for deterministic in (True, False) if args.deterministic_first else (False, True):
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            for modes in PAIRS:
                diffs = train_pair(tmp, device, modes, args)
                worst = max(abs(d) for d in diffs)
                print(f"deterministic={deterministic!s:5} {modes[0]:>10} vs {modes[1]:<10} max |diff| {worst:.2e}: "
                      + " ".join(f"{d:+.1e}" for d in diffs))  # fmt: skip
        torch.use_deterministic_algorithms(False)


if __name__ == "__main__":
    main()
