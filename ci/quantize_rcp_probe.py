"""Which reciprocal makes the Triton quantizers byte-equal with bnb CUDA (run on a GPU machine with the three
`src/` trees on PYTHONPATH). bnb is built with --use_fast_math, so its `1.0f / absmax` is rcp.approx.ftz.f32;
Triton's own fp32 division and the correctly rounded one are the alternatives. Prints, per input dtype and
format, how many packed bytes (4-bit) or codes (8-bit) differ from bnb for each mode."""

import bitsandbytes.functional as F
import torch

from tritonbits.ops import blockwise_8bit as b8
from tritonbits.ops import quantize_4bit as q4

torch.manual_seed(0)
rows = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.randn(14336, 4096, device="cuda").to(dtype)
    for quant_type in ("nf4", "fp4"):
        want, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
        want = want.view(-1)
        for mode in b8.RCP_MODES:
            packed = torch.empty_like(want)
            absmax = torch.empty(x.numel() // 64, dtype=torch.float32, device="cuda")
            q4.launch(x.view(-1), packed, absmax, 64, quant_type, rcp=mode)
            bad = int((packed != want).sum())
            rows.append(f"4-bit {quant_type} {dtype!s:15} rcp={mode:6}: {bad} of {want.numel()} bytes differ")
    want8, state8 = F.quantize_blockwise(x.view(-1), blocksize=4096)
    code = b8.check_code(None, x.device)
    for mode in b8.RCP_MODES:
        out = torch.empty_like(want8)
        absmax = torch.empty(x.numel() // 4096, dtype=torch.float32, device="cuda")
        b8.launch_quantize(x.view(-1), code, out, absmax, 4096, rcp=mode)
        bad = int((out != want8).sum())
        rows.append(f"8-bit dynamic {dtype!s:15} rcp={mode:6}: {bad} of {want8.numel()} codes differ")
print("\n".join(rows))

# Where fp32 NF4 input still differs from bnb: the values around each differing byte.
x = torch.randn(14336, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
want, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
packed = torch.empty_like(want.view(-1))
absmax = torch.empty(x.numel() // 64, dtype=torch.float32, device="cuda")
q4.launch(x.view(-1), packed, absmax, 64, "nf4")
thresholds = torch.tensor(q4.formats.NF4_THRESHOLDS, dtype=torch.float64)
for j in (packed != want.view(-1)).nonzero().flatten().tolist()[:8]:
    for e in (2 * j, 2 * j + 1):
        v, a = x.view(-1)[e].item(), absmax[e // 64].item()
        r = torch.tensor([a], device="cuda").reciprocal().item()
        s = torch.tensor([v], device="cuda", dtype=torch.float32) * torch.tensor([r], device="cuda")
        s = s.item()
        near = thresholds[(thresholds - s).abs().argmin()].item()
        print(
            f"byte {j} elem {e}: x={v!r} absmax={a!r} s~{s!r} nearest threshold {near!r} (s-t={s - near:.3e}) "
            f"ours {int(packed[j])} bnb {int(want.view(-1)[j])}"
        )
