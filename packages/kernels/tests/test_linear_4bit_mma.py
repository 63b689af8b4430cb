"""linear_4bit's "mma" kernel: its PTX (the per-block table and the byte-permute decode) run by a small PTX
emulator on the CPU, so the selector arithmetic is checked where the kernel cannot run (Gluon has no
interpreter); the GPU sessions run the kernel itself through test_linear_4bit (the op's heuristic takes it for M <= 16,
the tables up to M = 32) and the forced configs below (M up to 64)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton

from tritonbits import _runtime, formats
from tritonbits.ops import linear_4bit as L
from tritonbits.ops import linear_4bit_mma as mma4
from tritonbits.quant_state import prepare

MASK = 0xFFFFFFFF
FLT_MIN = 2.0**-126


def _f32(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _bits(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def _ftz(value: float) -> float:
    return 0.0 * np.sign(value) if abs(value) < FLT_MIN else value


def _mul_rn_ftz(a: int, b: int) -> int:
    exact = _ftz(_f32(a)) * _ftz(_f32(b))  # exact in fp64 (24 x 24 bits), flushed below 2**-126 before rounding
    return _bits(float(np.float32(_ftz(exact))))


def _to16(bits: int, bf16: bool) -> int:
    if bf16:  # round to nearest even on the fp32 bits (no NaN here)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return int(np.array([_f32(bits)], dtype=np.float32).astype(np.float16).view(np.uint16)[0])


def _prmt(a: int, b: int, c: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = src[sel & 7]
        if sel & 8:  # sign replicate
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Run the straight-line PTX subset the mma kernel's table and decode use; operands $i -> 32-bit values."""
    regs: dict[str, int] = {f"${i}": v & MASK for i, v in operands.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if tok.startswith("0f"):
            return int(tok[2:], 16)
        return int(tok, 0) & MASK

    for stmt in asm.replace("{", ";").replace("}", ";").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        d, srcs = args[0], [val(t) for t in args[1:]]
        if op == "mul.rn.ftz.f32":
            regs[d] = _mul_rn_ftz(*srcs)
        elif op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
            bf16 = "bf16" in op
            regs[d] = (_to16(srcs[0], bf16) << 16) | _to16(srcs[1], bf16)  # a to the upper half, b the lower
        elif op == "prmt.b32":
            regs[d] = _prmt(*srcs)
        elif op == "xor.b32":
            regs[d] = srcs[0] ^ srcs[1]
        elif op == "and.b32":
            regs[d] = srcs[0] & srcs[1]
        elif op == "or.b32":
            regs[d] = srcs[0] | srcs[1]
        elif op == "shr.u32":
            regs[d] = srcs[0] >> srcs[1]
        else:
            raise AssertionError(f"the emulator has no {op!r}")
    return regs


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bf16", [True, False])
def test_table_and_decode_give_dequantize_4bits_weights(quant_type, bf16):
    """table_asm + decode_asm on random words and absmax (a tiny one too: the flushed products) give, pair by
    pair in K order, to_wdtype(ftz(fl32(code[q] * absmax))) of each element (bnb: byte j holds element 2j in its
    high nibble)."""
    code = formats.code_values(quant_type).tolist()
    table, decode = mma4.table_asm(code, bf16), mma4.decode_asm()
    rng = np.random.default_rng(7)
    absmaxes = [float(v) for v in rng.uniform(1e-3, 4.0, 6).astype(np.float32)] + [1.5e-38, 3e-39]
    for absmax in absmaxes:
        t = run_ptx(table, {8: _bits(absmax)})
        planes = {5 + i: t[f"${i}"] for i in range(8)}
        want = [_to16(_mul_rn_ftz(_bits(c), _bits(absmax)), bf16) for c in code]
        words = [int(v) for v in rng.integers(0, 2**32, 64, dtype=np.uint64)] + [0, MASK, 0x01234567, 0xFEDCBA98]
        # every pattern of the eight nibbles' bit 3 (which picks the plane half: the selector arithmetic), rest random
        low = rng.integers(0, 2**32, 256, dtype=np.uint64)
        words += [(int(v) & 0x77777777) | sum(((b >> i) & 1) << (4 * i + 3) for i in range(8))
                  for b, v in enumerate(low)]  # fmt: skip
        for word in words:
            out = run_ptx(decode, {4: word, **planes})
            nib = []
            for j in range(4):  # byte j: element 2j (high nibble), 2j + 1 (low)
                byte = (word >> (8 * j)) & 0xFF
                nib += [byte >> 4, byte & 15]
            for p in range(4):
                got = out[f"${p}"]
                assert got & 0xFFFF == want[nib[2 * p]], (absmax, hex(word), p)
                assert got >> 16 == want[nib[2 * p + 1]], (absmax, hex(word), p)


def test_mma_asm_names_the_operand_dtype():
    for bf16, name in ((True, "bf16"), (False, "f16")):
        asm = mma4.mma_asm(bf16)
        assert f".m16n8k16.row.col.f32.{name}.{name}.f32" in asm
        assert sorted(int(v) for v in re.findall(r"\$(\d+)", asm)) == list(range(14))


def _prepared(device, n: int, k: int, blocksize: int = 64, dtype=torch.bfloat16, nested: bool = True):
    import tritonbits

    w = torch.randn(n, k, device=device, dtype=dtype)
    packed, qs = tritonbits.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    return packed, qs, prepare(packed, qs)


def test_mma_problem_ok_refuses_what_the_kernel_does_not_cover(device):
    """mma_problem_ok (the contract, checked on any machine) takes x and W of one 16-bit dtype, 1 <= M <= 64, K a
    multiple of 256 and of the blocksize (a multiple of 64), x 16-byte aligned, contiguous along K with an even
    row stride; each refusal below breaks exactly one of these."""
    _, _, pw = _prepared(device, 64, 512)
    x = torch.randn(16, 512, device=device, dtype=torch.bfloat16)
    assert L.mma_problem_ok(pw, x) and L.mma_problem_ok(pw, x[:1]) and L.mma_problem_ok(pw, x[3:5])
    assert L.mma_problem_ok(pw, torch.randn(64, 512, device=device, dtype=torch.bfloat16))
    buf = torch.randn(2, 1024 + 8, device=device, dtype=torch.bfloat16)
    assert L.mma_problem_ok(pw, buf[:, 8:520])  # a row stride of 1032 elements, 16 bytes in
    refused = {
        "fp32 x": x.float(),
        "fp16 x, bf16 W": x.half(),
        "M=65": torch.randn(65, 512, device=device, dtype=torch.bfloat16),
        "M=0": x[:0],
        "strided along K": torch.randn(2, 1024, device=device, dtype=torch.bfloat16)[:, ::2],
        "odd row stride": torch.randn(2, 1025, device=device, dtype=torch.bfloat16)[:, :512],
        "8 bytes in": buf[:, 4:516],
    }
    for name, bad in refused.items():
        assert not L.mma_problem_ok(pw, bad), name
        assert not L.mma_ok(pw, bad, bad.device), name
    # the weight's side: K not a multiple of 256, a blocksize below 64, K not a multiple of the blocksize
    for n, k, bs in ((64, 384, 128), (64, 512, 32), (8, 768, 512)):
        _, _, other = _prepared(device, n, k, bs)
        assert not L.mma_problem_ok(other, torch.randn(2, k, device=device, dtype=torch.bfloat16)), (k, bs)
    _, _, ok512 = _prepared(device, 8, 1024, 512)
    assert L.mma_problem_ok(ok512, torch.randn(2, 1024, device=device, dtype=torch.bfloat16))


def test_mma_is_never_taken_where_it_cannot_run(device):
    """mma_ok also needs the machine (a Triton its Gluon kernel ran on, CUDA sm80+, no interpreter); an mma config
    it refuses becomes the heuristic's pre-mma choice (aligned_config, and without an x), so the op's CPU results
    are gemv2's / the gemm's; launch_fused refuses to hand the Gluon kernel to wrap_triton."""
    _, _, pw = _prepared(device, 64, 512)
    x = torch.randn(2, 512, device=device, dtype=torch.bfloat16)
    cfg = L.heuristic_mma_config(2, 64, 512)
    fallback = L.heuristic_config(x.dtype, 2, 64, 512, L._sm_count(device), mma=False)
    if device.type != "cuda" or not mma4.AVAILABLE:
        assert not L.mma_ok(pw, x, device)
        assert L.aligned_config(cfg, pw, x.dtype, 2, 64, 512, device, x) == fallback
    else:
        assert L.mma_ok(pw, x, device)
    assert L.aligned_config(cfg, pw, x.dtype, 2, 64, 512, device) == fallback
    out = torch.empty(2, 64, device=device, dtype=x.dtype)
    with pytest.raises(ValueError, match="wrap_triton"):
        L.launch_fused(
            x, pw, None, out, cfg, kernel_wrap=lambda fn: fn, use_asm=True if device.type == "cuda" else None
        )


def test_mma_launch_plan_with_k_warps(device):
    """The launches an mma config makes (planned only, no kernel runs): K warps (`kwarps`) shrink a program's W rows
    to 16 * warps / kwarps; one split is one launch writing out itself (no workspace, no reduction); the masked
    steps are on exactly where a split's 256-column segments are not a multiple of the K warps; a kwarps that does
    not divide the warps is refused by name."""
    n, k = 1000, 1280  # 5 segments
    _, _, pw = _prepared(device, n, k, 64)
    x = torch.randn(3, k, device=device, dtype=torch.bfloat16)
    out = torch.empty(3, n, device=device, dtype=torch.bfloat16)
    for warps, split, kwarps, grid, masked in ((4, 1, 1, (16, 1, 1), False), (4, 1, 4, (63, 1, 1), True),
                                               (8, 1, 8, (63, 1, 1), True), (8, 5, 2, (16, 5, 1), True),
                                               (2, 5, 1, (32, 5, 1), False), (8, 1, 2, (16, 1, 1), True),
                                               (4, 3, 2, (32, 3, 1), True)):  # fmt: skip  # 2, 2, 1 segments
        cfg = {"path": "mma", "warps": warps, "split_k": split, "kwarps": kwarps, "prefetch": True}
        launches, ws = L._mma_launches(x, pw, None, out, cfg)
        assert launches[0].grid == grid, cfg
        assert launches[0].constexprs["KWARPS"] == kwarps and launches[0].constexprs["MASKED"] is masked, cfg
        assert (len(launches), ws is None) == ((1, True) if split == 1 else (2, False)), cfg
        assert launches[0].constexprs["SPLIT"] is (split > 1), cfg
    for bad in (3, 0, 16, -2, 2.0, True):
        with pytest.raises(ValueError, match="kwarps"):
            L._mma_launches(x, pw, None, out, {"path": "mma", "warps": 8, "split_k": 1, "kwarps": bad})
    for bad in (3, 6, 0, 4.0):
        with pytest.raises(ValueError, match="warps"):
            L._mma_launches(x, pw, None, out, {"path": "mma", "warps": bad, "split_k": 1, "kwarps": 1})


GPU_FORCED = [  # (M, blocksize, nested, warps, split, K warps, K, prefetch): M up to 64 (eight n tiles; above 8 x is
    # read from its lane-order copy), blocksizes up to
    # the whole K; K warps (the program's warps splitting its K range) in one split or several, dividing a split's
    # 256-column segments or not (K = 4096: 16 segments, 3 splits of 6, 6, 4; K = 768: 2 splits of 2 and 1, only the
    # last split uneven; K = 256: one segment for 8 K warps, 7 of them with none)
    (1, 64, True, 4, 8, 1, 4096, True), (3, 64, False, 2, 1, 1, 4096, False), (8, 128, True, 8, 3, 1, 4096, False),
    (9, 64, True, 4, 2, 1, 4096, True), (16, 256, False, 2, 4, 1, 4096, True), (16, 512, True, 4, 1, 1, 4096, False),
    (5, 4096, True, 1, 16, 1, 4096, True), (12, 1024, False, 8, 5, 1, 4096, False),
    (1, 64, True, 4, 1, 4, 4096, False), (8, 64, False, 8, 1, 8, 4096, True), (2, 128, True, 2, 1, 2, 4096, True),
    (16, 64, True, 4, 1, 2, 4096, True), (7, 256, True, 8, 3, 4, 4096, False), (4, 64, False, 8, 3, 8, 4096, True),
    (13, 1024, True, 4, 3, 4, 4096, False), (6, 64, True, 4, 1, 4, 4096, True), (11, 64, True, 4, 3, 4, 4096, True),
    (3, 64, True, 4, 2, 2, 768, True), (10, 128, False, 4, 2, 2, 768, False), (1, 64, True, 8, 1, 8, 256, True),
    (9, 256, True, 8, 1, 8, 256, False), (17, 64, True, 4, 2, 1, 4096, True), (32, 64, True, 4, 1, 4, 4096, True),
    (33, 128, False, 8, 3, 1, 4096, False), (64, 64, True, 4, 8, 1, 4096, True), (64, 64, True, 8, 1, 8, 4096, True),
    (48, 256, True, 4, 2, 2, 768, True), (61, 64, False, 8, 1, 8, 256, False), (40, 64, True, 2, 1, 1, 768, False),
]  # fmt: skip


# the cases whose launch has masked steps, worked out by hand (segments a split vs K warps)
MASKED_CASES = [c for c in GPU_FORCED if (c[5], c[6], c[4]) in {(4, 4096, 3), (8, 4096, 3), (2, 768, 2), (8, 256, 1)}]


# the cases `nox -s sanitize-<gpu>` runs under compute-sanitizer (marker `sanitize`): x read directly (M <= 8) and
# through its lane-order copy, splits, K warps with masked steps and with idle warps, prefetch on and off
# (test_sanitize_cases_reach_what_they_claim checks this list)
SANITIZE = {GPU_FORCED[i] for i in (0, 6, 12, 17, 18, 19, 26, 27)}


def test_sanitize_cases_reach_what_they_claim():
    """The sanitizer's mma cases cover what SANITIZE's comment says (so that a change to GPU_FORCED cannot quietly
    take a path out of the sanitizer's reach)."""
    cases = sorted(SANITIZE)
    assert len(cases) == 8 and SANITIZE.issubset(GPU_FORCED)
    m, split, kwarps, k, prefetch = (np.array([c[i] for c in cases]) for i in (0, 4, 5, 6, 7))
    assert (m <= mma4.DIRECT_MAX_M).any() and (m > mma4.DIRECT_MAX_M).any()  # x direct and through its copy
    assert (split > 1).any()
    assert any(c in MASKED_CASES for c in cases)  # K warps with masked steps
    per_split = np.array([L.mma_splits({"split_k": int(s)}, int(kk))[1] for s, kk in zip(split, k, strict=True)])
    assert (kwarps > per_split).any()  # K warps with no segment at all
    assert set(prefetch.tolist()) == {False, True}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.sanitize) if c in SANITIZE else c for c in GPU_FORCED],
    ids=lambda c: "m{}-bs{}-nested{}-w{}-s{}-kw{}-k{}-pf{}".format(*c),
)
def test_forced_mma_configs_against_the_policy(device, dtype, case):
    """The mma kernel itself (forced configs, not the table's) on fresh random problems: N not a multiple of a
    program's rows, a bias, x rows inside a wider buffer; every result within the K-aware policy, out poisoned."""
    if device.type != "cuda" or not mma4.AVAILABLE or not _runtime.native_bf16_conversion(device):
        pytest.skip("needs an sm80+ CUDA device with the Triton the Gluon kernel ran on (runs in the GPU sessions)")
    import tritonbits
    from tritonbits_harness.tolerance import assert_matmul

    m, bs, nested, warps, split, kwarps, k, prefetch = case
    n = 1000
    packed, qs, pw = _prepared(device, n, k, bs, dtype, nested)
    wd = tritonbits.dequantize_4bit(packed, qs)
    x = torch.randn(m, k + 128, device=device, dtype=dtype)[:, 64 : 64 + k]
    bias = torch.randn(n, device=device, dtype=dtype)
    assert L.mma_ok(pw, x, device)
    cfg = {"path": "mma", "warps": warps, "split_k": split, "kwarps": kwarps, "prefetch": prefetch}
    launches = L._mma_launches(x, pw, bias, torch.empty(m, n, device=device, dtype=dtype), cfg)[0]
    launch = next(la for la in launches if la.fn is mma4.linear_4bit_mma_kernel)
    assert launch.constexprs["MASKED"] is (case in MASKED_CASES), case
    out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
    L.launch_fused(x, pw, bias, out, cfg)
    assert_matmul(out, x, wd, bias)


@pytest.mark.parametrize("lanes", [False, True])
def test_x_strides_address_the_lanes_pairs(lanes):
    """The kernel's x address, n x_sn + 4 (t x_st4 + s x_ss4 + i x_si4) + p (in 4-byte pairs), reads pair p of word i
    of lane t's 64 columns of segment s of batch row n, from x in place (rows inside a wider buffer) and from
    `lane_order`'s copy alike (checked on the CPU with the kernel's formula over every index)."""
    m, k = 11, 768
    buf = torch.randint(-(2**15), 2**15, (m, k + 64), dtype=torch.int16)
    x = buf[:, 32 : 32 + k]
    src = mma4.lane_order(x) if lanes else x
    assert not lanes or src.is_contiguous()
    pairs = src.view(torch.int32).flatten() if lanes else buf.view(torch.int32).flatten()[16:]  # x: 32 elements in
    x_sn, x_st4, x_ss4, x_si4 = mma4.x_strides(m, x.stride(0), lanes)
    n, s, t, i, p = torch.meshgrid(*(torch.arange(v) for v in (m, k // 256, 4, 8, 4)), indexing="ij")
    got = pairs[n * x_sn + 4 * (t * x_st4 + s * x_ss4 + i * x_si4) + p]
    want = x.contiguous().view(torch.int32)[n, 128 * s + 32 * t + 4 * i + p]
    assert torch.equal(got, want)


def test_lane_order_plan_reads_each_calls_x(device):
    """An eager call above DIRECT_MAX_M through the op's plan (its bound launch after the first call) copies each
    call's own x into lane order: a second x through the same plan gets its own product."""
    if device.type != "cuda" or not mma4.AVAILABLE:
        pytest.skip("needs a CUDA device with the Triton the Gluon kernel ran on (runs in the GPU sessions)")
    import tritonbits
    from tritonbits_harness.tolerance import assert_matmul

    m, n, k = 24, 1000, 1024
    packed, qs, _pw = _prepared(device, n, k)
    wd = tritonbits.dequantize_4bit(packed, qs)
    cfg = {"path": "mma", "warps": 4, "split_k": 1, "kwarps": 2, "prefetch": True}
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    xs = {  # x as a caller may hand it: contiguous, [2, 12, K], rows K + 4 apart (the copy kernel's unaligned rows)
        "2-D": lambda: torch.randn(m, k, device=device, dtype=torch.bfloat16),
        "3-D": lambda: torch.randn(2, m // 2, k, device=device, dtype=torch.bfloat16),
        "row stride K + 4": lambda: torch.randn(m, k + 4, device=device, dtype=torch.bfloat16)[:, :k],
    }
    config_for = L.config_for
    L.config_for = lambda *a: dict(cfg)
    try:
        for name, make in xs.items():
            for _ in range(3):
                x = make()
                y = tritonbits.linear_4bit(x, packed, qs, bias)
                assert y.shape == (*x.shape[:-1], n), name
                assert_matmul(y.reshape(m, n), x.reshape(m, k), wd, bias)
    finally:
        L.config_for = config_for
    plans = list(L._prepare(packed, qs).launches.get("linear_4bit", {}).values())
    assert len(plans) == len(xs) and all(p.lanes for p in plans)
    assert all(step.bound is not None for p in plans for step in p.steps)


def test_lane_order_kernel_copies_as_lane_order(device):
    """_lane_order_kernel (the op's copy of x above DIRECT_MAX_M) writes exactly lane_order's layout, from x rows
    inside a wider buffer, odd M, a partial last program (runs in the interpreter on the CPU)."""
    for m, k in ((11, 768), (1, 256), (64, 512)):
        x = torch.randn(m, k + 64, device=device, dtype=torch.bfloat16)[:, 32 : 32 + k]
        xl = torch.full((m * k,), float("nan"), device=device, dtype=torch.bfloat16)
        units = m * k // 8
        mma4._lane_order_kernel[(triton.cdiv(units, mma4.LANE_BLOCK),)](x, xl, m, x.stride(0), units,
                                                                       BLOCK=mma4.LANE_BLOCK)  # fmt: skip
        assert torch.equal(xl, mma4.lane_order(x).flatten()), (m, k)
