"""tritonbits.quantize_4bit: byte-equal with bitsandbytes CUDA (GPU) and with the numpy oracle of bnb CUDA's
quantizer (interpreter): packed bytes, absmax, and the nested state (uint8 absmax, offset, state2)."""

import math

import numpy as np
import pytest
import torch

import tritonbits
import tritonbits_reference as R
from tritonbits import formats
from tritonbits.ops import quantize_4bit as q4
from tritonbits_harness import tolerance
from tritonbits_harness.pytest_plugin import examples
from tritonbits_harness.tolerance import assert_exact

SHAPES_CPU = [(64,), (5,), (33, 7), (3, 1025)]
SHAPES_GPU = [*SHAPES_CPU, (4096, 1024), (1000, 4097), (11008, 4096 + 64)]


def shapes(device):
    return SHAPES_GPU if device.type == "cuda" else SHAPES_CPU


def expected(x, device, blocksize=64, quant_type="fp4", compress_statistics=False):
    """bnb CUDA on the GPU; the numpy oracle of bnb CUDA under the interpreter."""
    if device.type == "cuda":
        import bitsandbytes.functional as F

        return F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics)
    return R.quantize_4bit_cuda(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics)


def assert_same_state(packed, state, want_packed, want, x=None):
    """Byte-equal with bnb; for fp32 input on CUDA, the packed codes under the harness policy (a neighbouring
    code at a near tie, measured at 5 in 29.4M bytes)."""
    if x is not None and x.device.type == "cuda":
        absmax32 = block_absmax(x, want.blocksize)
        code = torch.from_numpy(R.NF4_CODE if want.quant_type == "nf4" else R.FP4_CODE)
        tolerance.assert_packed_4bit(packed, want_packed, x, absmax32, want.blocksize, code)
    else:
        assert_exact(packed, want_packed.to(packed.device))
    assert_exact(state.absmax, want.absmax.to(packed.device))
    assert_exact(state.code, want.code.to(packed.device))
    assert tuple(state.shape) == tuple(want.shape) and state.dtype == want.dtype
    assert state.blocksize == want.blocksize and state.quant_type == want.quant_type
    assert (state.state2 is None) == (want.state2 is None)
    if want.state2 is not None:
        assert_exact(state.offset.reshape(()), want.offset.reshape(()).to(packed.device))
        assert_exact(state.state2.absmax, want.state2.absmax.to(packed.device))
        assert_exact(state.state2.code, want.state2.code.to(packed.device))
        assert state.state2.blocksize == want.state2.blocksize == 256


def block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| per block of the flattened x (fp32, exact: the value both quantizers scale by)."""
    flat = x.reshape(-1).float().abs()
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize).amax(dim=1)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", R.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", R.BLOCKSIZES_4BIT)
def test_equals_bnb_cuda(blocksize, quant_type, nested, out_dtype, device, gen):
    for shape in shapes(device):
        x = (torch.randn(shape, generator=gen) * 3).to(out_dtype).to(device)
        packed, state = tritonbits.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)  # fmt: skip
        assert packed.shape == ((x.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
        assert_same_state(packed, state, *expected(x, device, blocksize, quant_type, nested), x=x)


def adversarial(device) -> torch.Tensor:
    """Blocks of 64 whose absmax is exactly 1 (so the scaled value is x itself): every threshold, its fp32
    neighbours, the code values, zeros of both signs, tiny values, NaN, and values just above 1."""
    thresholds = torch.tensor(formats.NF4_THRESHOLDS + formats.FP4_THRESHOLDS, dtype=torch.float32)
    thresholds = torch.cat([thresholds, -thresholds])
    near = torch.cat([thresholds, torch.nextafter(thresholds, torch.tensor(2.0)),
                      torch.nextafter(thresholds, torch.tensor(-2.0))])  # fmt: skip
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, float("nan"), 1.0, -1.0], dtype=torch.float32)
    values = torch.cat([near, formats.code_values("nf4"), formats.code_values("fp4"), special])
    per_block = 63
    blocks = -(-values.numel() // per_block)
    padded = torch.cat([values, torch.zeros(blocks * per_block - values.numel())]).reshape(blocks, per_block)
    return torch.cat([torch.ones(blocks, 1), padded], dim=1).reshape(-1).to(device)


@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "split"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("encoder", q4.ENCODERS)
@pytest.mark.parametrize("quant_type", R.QUANT_TYPES)
def test_encoders_on_thresholds(encoder, quant_type, in_dtype, pairs, device):
    """Every encoder (round table, bucket table, 15/7 compares), reading pairs as words or splitting a tile,
    gives bnb's decision-tree code on every threshold and its fp32 neighbours, signed zeros, tiny values and
    NaN (16-bit input: those values rounded to the dtype)."""
    x = adversarial(device).to(in_dtype)
    n = x.numel()
    packed = torch.full(((n + 1) // 2,), 0xAB, dtype=torch.uint8, device=device)
    absmax = torch.full((n // 64,), float("nan"), device=device)
    q4.launch(x, packed, absmax, 64, quant_type, encoder=encoder, pairs=pairs)
    want_packed, want = R.quantize_4bit_cuda(x.cpu(), blocksize=64, quant_type=quant_type)
    assert_exact(absmax.cpu(), want.absmax)
    assert_exact(packed.cpu(), want_packed.reshape(-1))


def _blocks_of_absmax_one(values: torch.Tensor) -> torch.Tensor:
    """Blocks of 64: 1.0, then 63 of `values` (zero-padded): absmax 1, so each scaled value is the value."""
    per_block = 63
    blocks = -(-values.numel() // per_block)
    padded = torch.cat([values, values.new_zeros(blocks * per_block - values.numel())]).reshape(blocks, per_block)
    return torch.cat([values.new_ones(blocks, 1), padded], dim=1).reshape(-1)


def sweep_values() -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32, bf16) scaled values for the encoder sweep. bf16: every bit pattern of magnitude <= 1 and every NaN
    pattern, both signs (exhaustive for 16-bit input at absmax 1). fp32: those as fp32, every 4099th fp32 bit
    pattern of [0, 1] with both signs, the bucket edges of round/lean (s = 1 - (b + 1/2) / 16) with 4 fp32
    neighbours each side, and NaN bit patterns of both signs."""
    bf = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    bf = torch.cat([bf[bf.float().abs() <= 1], _nan_apart(bf[bf.isnan()])])
    dense = torch.arange(0, 0x3F800001, 4099, dtype=torch.int32).view(torch.float32)
    edges = 1.0 - (torch.arange(-1, 34, dtype=torch.float32) + 0.5) / q4.BUCKETS_PER_UNIT
    near = [edges]
    for direction in (2.0, -2.0):
        e = edges
        for _ in range(4):
            e = torch.nextafter(e, torch.tensor(direction))
            near.append(e)
    edges = torch.cat(near)
    edges = edges[edges.abs() <= 1]
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, -0x400000, -0x7FFFFF, -1], dtype=torch.int32)
    fp32 = torch.cat([bf.float(), dense, -dense, edges, _nan_apart(nans.view(torch.float32))])
    return fp32, bf


def _nan_apart(nans: torch.Tensor) -> torch.Tensor:
    """Each NaN followed by 0.5: no element pair is two NaN. (The interpreter's tl.max propagates NaN where the
    GPU's ignores it, so a pair read of two NaN would give the block absmax NaN there; the encoder is the
    subject here.)"""
    return torch.stack([nans, torch.full_like(nans, 0.5)], dim=1).reshape(-1)


@pytest.mark.parametrize("quant_type", R.QUANT_TYPES)
def test_lean_encoder_sweep(quant_type, device):
    """The "lean" encoder against the oracle on a dense sweep of scaled values (sweep_values), fp32 and bf16
    input read as pairs. (Split reads run the same encoder function; not swept: the interpreter's bf16 -> fp32
    conversion flushes subnormals, the pairs' bit shifts do not, for every encoder.)"""
    fp32, bf = sweep_values()
    for x in (fp32, bf):
        x = _blocks_of_absmax_one(x).to(device)
        n = x.numel()
        packed = torch.full(((n + 1) // 2,), 0xAB, dtype=torch.uint8, device=device)
        absmax = torch.empty(n // 64, device=device)
        q4.launch(x, packed, absmax, 64, quant_type, encoder="lean", pairs=True)
        want_packed, want = R.quantize_4bit_cuda(x.cpu(), blocksize=64, quant_type=quant_type)
        assert (want.absmax == 1).all()
        assert_exact(packed.cpu(), want_packed.reshape(-1))


def test_lean_table():
    """lean_table: NF4 is round's table; FP4 is round's with bit 3 ("sign allowed") in both codes, then one
    NaN-only bucket (threshold +inf, codes 0)."""
    assert torch.equal(q4.lean_table("nf4"), q4.round_table("nf4"))
    lean, table = q4.lean_table("fp4"), q4.round_table("fp4")
    assert lean.numel() == table.numel() + 1 == q4.BUCKETS_PER_UNIT + 2
    assert torch.equal(lean[:-1] & 0xFFFFFFFF, table & 0xFFFFFFFF)
    assert torch.equal((lean[:-1] >> 32) & ~0x0808, table >> 32)
    assert ((lean[:-1] >> 32) & 0x0808 == 0x0808).all()
    assert lean[-1].item() == 0x7F800000  # +inf, codes 0


def test_round_table_holds_one_threshold_each():
    for quant_type in R.QUANT_TYPES:
        table = q4.round_table(quant_type)
        thr = (table & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
        pair = table >> 32
        want = formats.NF4_THRESHOLDS if quant_type == "nf4" else formats.FP4_THRESHOLDS
        assert torch.equal(thr[torch.isfinite(thr)].flip(0), torch.tensor(want, dtype=torch.float32))
        assert (pair & 0xFF).max() < 16 and (pair >> 8).max() < 16
        assert table.numel() == (17 if quant_type == "fp4" else 33)


def test_bucket_tables_hold_one_threshold_each():
    for quant_type in R.QUANT_TYPES:
        thr, pair = q4.bucket_tables(quant_type)
        finite = thr[torch.isfinite(thr)]
        want = formats.NF4_THRESHOLDS if quant_type == "nf4" else formats.FP4_THRESHOLDS
        assert torch.equal(finite, torch.tensor(want, dtype=torch.float32))
        assert (pair & 0xFF).max() < 16 and (pair >> 8).max() < 16


@pytest.mark.parametrize("quant_type", R.QUANT_TYPES)
def test_special_blocks(quant_type, device):
    """bnb CUDA's behaviour on whole blocks: zeros, an Inf, all NaN (documented in the op's docstring)."""
    x = torch.randn(4, 64, device=device)
    x[0] = 0.0
    x[1, 3] = float("inf")
    x[2] = float("nan")
    x[3, 7] = float("nan")
    packed, state = tritonbits.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], dim=1).reshape(4, 64).cpu()
    zero_code = 7 if quant_type == "nf4" else 0
    assert state.absmax[0].item() == 0.0 and (codes[0] == 0).all()  # 0 * (1/0) = NaN -> code 0
    assert state.absmax[1].item() == math.inf and codes[1, 3] == 0
    assert (codes[1, torch.arange(64) != 3] == zero_code).all()  # x * (1/inf) = +-0 -> the code of 0
    assert state.absmax[2].item() == -torch.finfo(torch.float32).max and (codes[2] == 0).all()
    assert math.isfinite(state.absmax[3].item()) and codes[3, 7] == 0  # NaN ignored by absmax, coded 0
    assert_same_state(packed, state, *expected(x, device, 64, quant_type, False))


@pytest.mark.parametrize("quant_storage", formats.PACKED_DTYPES, ids=str)
def test_quant_storage(quant_storage, device, gen):
    for n in (4096, 130, 7):
        x = torch.randn(n, generator=gen).to(device)
        packed, state = tritonbits.quantize_4bit(x, quant_type="nf4", quant_storage=quant_storage)
        ref, _ = tritonbits.quantize_4bit(x, quant_type="nf4")
        size = packed.element_size()
        assert packed.dtype == quant_storage and packed.shape == (-(-((n + 1) // 2) // size), 1)
        raw = packed.view(-1).view(torch.uint8)
        assert_exact(raw[: ref.numel()], ref.view(-1))
        assert (raw[ref.numel() :] == 0).all()  # padding to whole quant_storage elements is zero
        assert_exact(tritonbits.dequantize_4bit(packed, state), tritonbits.dequantize_4bit(ref, state))


def test_non_contiguous_input(out_dtype, device, gen):
    x = torch.randn(96, 130, generator=gen).to(out_dtype).to(device)
    for view in (x.t(), x[:, ::2], x[1::3]):
        for nested in (False, True):
            got = tritonbits.quantize_4bit(view, quant_type="nf4", compress_statistics=nested)
            want = tritonbits.quantize_4bit(view.contiguous(), quant_type="nf4", compress_statistics=nested)
            assert_same_state(*got, *want)
            assert got[1].shape == view.shape


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_empty_input(nested, device):
    packed, state = tritonbits.quantize_4bit(torch.empty(0, 5, device=device), compress_statistics=nested)
    assert packed.shape == (0, 1) and packed.dtype == torch.uint8
    assert state.absmax.shape == (0,) and state.shape == (0, 5)
    if nested:
        assert state.absmax.dtype == torch.uint8 and state.state2.absmax.shape == (0,)
        assert state.offset.isnan()  # the mean of no absmax, as torch (and so bnb) computes it


def test_out_and_absmax_are_written(device, gen):
    x = torch.randn(33, 64, generator=gen).to(device)
    for nested in (False, True):
        out = torch.full((33 * 32, 1), 0xAB, dtype=torch.uint8, device=device)
        absmax = (
            torch.full((33,), 0xAB, dtype=torch.uint8, device=device)
            if nested
            else torch.full((33,), float("nan"), device=device)
        )
        packed, state = tritonbits.quantize_4bit(
            x, absmax=absmax, out=out, quant_type="nf4", compress_statistics=nested
        )
        assert packed is out and state.absmax is absmax
        assert_same_state(packed, state, *tritonbits.quantize_4bit(x, quant_type="nf4", compress_statistics=nested))


def test_dequantize_of_quantize(out_dtype, device, gen, bnb_dequantize):
    """tritonbits.dequantize_4bit(*tritonbits.quantize_4bit(x)) equals bnb's (GPU) / the oracle's dequantize."""
    x = torch.randn(130, 96, generator=gen).to(out_dtype).to(device)
    for quant_type in R.QUANT_TYPES:
        for nested in (False, True):
            packed, state = tritonbits.quantize_4bit(x, quant_type=quant_type, compress_statistics=nested)
            got = tritonbits.dequantize_4bit(packed, state)
            assert_exact(got, bnb_dequantize(packed, state).reshape(x.shape).to(device))


def test_serialization_round_trip(device, gen, quantize, bnb_dequantize):
    import bitsandbytes.functional as F

    x = torch.randn(64, 96, generator=gen).to(torch.bfloat16).to(device)
    for nested in (False, True):
        packed, state = tritonbits.quantize_4bit(x, quant_type="nf4", compress_statistics=nested)
        loaded = F.QuantState.from_dict(state.as_dict(packed=True), device=device)  # bnb loads ours
        assert_exact(
            bnb_dequantize(packed, loaded).reshape(x.shape).to(device), tritonbits.dequantize_4bit(packed, state)
        )
        q, bnb_state = quantize(x, quant_type="nf4", compress_statistics=nested)  # we load bnb's
        ours = tritonbits.QuantState.from_dict(bnb_state.as_dict(packed=True), device=device)
        assert_exact(tritonbits.dequantize_4bit(q, ours), bnb_dequantize(q, bnb_state).reshape(x.shape).to(device))


BAD = [
    # (description, call kwargs builder, exception, name in message)
    ("int input", lambda d: {"A": torch.ones(64, dtype=torch.int32, device=d)}, TypeError, "A"),
    ("bool input", lambda d: {"A": torch.ones(64, dtype=torch.bool, device=d)}, TypeError, "A"),
    ("not a tensor", lambda d: {"A": [1.0, 2.0]}, TypeError, "A"),
    ("blocksize 48", lambda d: {"blocksize": 48}, ValueError, "blocksize"),
    ("blocksize True", lambda d: {"blocksize": True}, ValueError, "blocksize"),
    ("quant_type int8", lambda d: {"quant_type": "int8"}, ValueError, "quant_type"),
    ("quant_storage float64", lambda d: {"quant_storage": torch.float64}, TypeError, "quant_storage"),
    ("compress_statistics 1", lambda d: {"compress_statistics": 1}, TypeError, "compress_statistics"),
    ("out too small", lambda d: {"out": torch.empty(31, 1, dtype=torch.uint8, device=d)}, ValueError, "out"),
    ("out dtype", lambda d: {"out": torch.empty(32, 1, dtype=torch.int8, device=d)}, TypeError, "out"),
    ("out strided", lambda d: {"out": torch.empty(64, dtype=torch.uint8, device=d)[::2]}, ValueError, "out"),
    ("absmax size", lambda d: {"absmax": torch.empty(2, device=d)}, ValueError, "absmax"),
    ("absmax dtype", lambda d: {"absmax": torch.empty(1, dtype=torch.float16, device=d)}, TypeError, "absmax"),
    (
        "nested absmax fp32",
        lambda d: {"absmax": torch.empty(1, device=d), "compress_statistics": True},
        TypeError,
        "absmax",
    ),
    ("out on cpu", lambda d: {"out": torch.empty(32, 1, dtype=torch.uint8, device="meta")}, ValueError, "out"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(case, device):
    _, make, exc, name = case
    kwargs = {"A": torch.randn(64, device=device), **make(device)}
    with pytest.raises(exc, match=rf"\b{name}\b"):
        tritonbits.quantize_4bit(**kwargs)


def test_out_overlapping_input(device):
    buf = torch.randn(64, device=device)
    with pytest.raises(ValueError, match="out overlaps A"):
        tritonbits.quantize_4bit(buf, out=buf.view(torch.uint8)[:32].view(32, 1))


def test_cpu_tensor_without_interpreter(monkeypatch):
    from tritonbits import _runtime

    monkeypatch.setattr(_runtime, "INTERPRET", False)
    with pytest.raises(ValueError, match="A is a CPU tensor"):
        tritonbits.quantize_4bit(torch.randn(64))


@pytest.mark.gpu
def test_device_mismatch(device):
    with pytest.raises(ValueError, match="out is on cpu"):
        tritonbits.quantize_4bit(torch.randn(64, device=device), out=torch.empty(32, 1, dtype=torch.uint8))


def test_opcheck(device, gen):
    x = torch.randn(32, 64, generator=gen).to(device)
    for nested in (False, True):
        torch.library.opcheck(torch.ops.tritonbits.quantize_4bit.default, (x, 64, "nf4", nested))
        out = torch.empty(32 * 32, dtype=torch.uint8, device=device)
        absmax = torch.empty(32, dtype=torch.uint8 if nested else torch.float32, device=device)
        extra = (torch.empty(1, device=device), torch.empty((), device=device)) if nested else (None, None)
        torch.library.opcheck(torch.ops.tritonbits.quantize_4bit.out, (x, 64, "fp4", out, absmax, *extra))
        if device.type == "cuda":
            torch.library.opcheck(torch.ops.tritonbits.quantize_4bit_triton_op.default, (x, 64, "nf4", nested))


def _quantize_dequantize(x):
    packed, state = tritonbits.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    return tritonbits.dequantize_4bit(packed, state)


def test_compiles_fullgraph_cpu_ops(device, gen):
    """Quantize then dequantize traced by torch.compile(fullgraph=True) (aot_eager: the registered ops, no
    Inductor codegen), equal to eager."""
    x = torch.randn(64, 96, generator=gen).to(torch.bfloat16).to(device)
    torch._dynamo.reset()
    got = torch.compile(_quantize_dequantize, fullgraph=True, backend="aot_eager")(x)
    assert_exact(got, _quantize_dequantize(x))


@pytest.mark.gpu
def test_compiles_fullgraph(device, gen):
    """Inductor on CUDA: the triton_ops of quantize_4bit and dequantize_4bit in one graph, equal to eager."""
    x = torch.randn(512, 768, generator=gen).to(torch.bfloat16).to(device)
    torch._dynamo.reset()
    got = torch.compile(_quantize_dequantize, fullgraph=True)(x)
    assert_exact(got, _quantize_dequantize(x))


def _nested_state(x):
    packed, state = tritonbits.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    return packed, state.absmax, state.offset, state.state2.absmax


def test_compiled_nested_offset_is_eager_mean(device, gen):
    """Nested under torch.compile(fullgraph=True): the offset is eager torch's absmax.mean() (bnb's), so the
    codes, offset and state2.absmax equal eager's for every size; on CUDA the triton_op's body is traced by
    Inductor, which summed the mean in its own order before the mean became the opaque tritonbits::absmax_mean."""
    torch._dynamo.reset()
    compiled = torch.compile(_nested_state, fullgraph=True, dynamic=False)
    for blocks in (18, 27, 33, 60, 69, 3000):
        x = torch.randn(blocks * 64, generator=gen).to(torch.bfloat16).to(device)
        for got, want in zip(compiled(x), _nested_state(x), strict=True):
            assert_exact(got.reshape(-1), want.reshape(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("encoder", q4.ENCODERS)
def test_both_encoders_equal_bnb_on_large_inputs(encoder, device, gen):
    import bitsandbytes.functional as F

    for quant_type in R.QUANT_TYPES:
        x = (torch.randn(8192, 4096 + 64, generator=gen) * 7).to(torch.bfloat16).to(device)
        packed = torch.empty((x.numel() + 1) // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(x.numel() // 64, device=device)
        q4.launch(x.view(-1), packed, absmax, 64, quant_type, encoder=encoder)
        want_packed, want = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
        assert_exact(packed, want_packed.view(-1))
        assert_exact(absmax, want.absmax)


@pytest.mark.parametrize("pairs", [True, False])
def test_subnormal_blocks_match_bnb(pairs, device, gen):
    """A block whose absmax is below 2**-126: absmax 0, every code 0 (bnb's fast-math flush), in both reads;
    equal to bnb CUDA on the GPU (its approximate reciprocal), to the oracle under the interpreter."""
    x = torch.randn(8, 64, generator=gen) * 1e-39
    x[::3] = torch.randn(3, 64, generator=gen)
    x = x.to(torch.bfloat16).to(device)
    for quant_type in R.QUANT_TYPES:
        packed = torch.empty(x.numel() // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(x.numel() // 64, device=device)
        q4.launch(x.view(-1), packed, absmax, 64, quant_type, pairs=pairs)
        want_packed, want = expected(x, device, quant_type=quant_type)
        assert_exact(packed.cpu(), want_packed.view(-1).cpu())
        assert_exact(absmax.cpu(), want.absmax.cpu())
        assert (absmax.cpu()[1::3] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("encoder", q4.ENCODERS)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_encoders_on_subnormal_blocks(encoder, in_dtype, device, gen):
    """Blocks whose absmax is below 2**-126 (bf16) or tiny (fp16): bnb (fast math) flushes the subnormal
    absmax and values to 0, storing absmax 0 and code 0 (NaN = 0 * 1/0) for the whole block; ours the same."""
    import bitsandbytes.functional as F

    tiny = 1e-39 if in_dtype == torch.bfloat16 else 1e-7
    x = torch.randn(64, 64, generator=gen) * tiny
    x[::3] = torch.randn(22, 64, generator=gen)
    x[1, :5] = 0.0
    x = x.to(in_dtype).to(device)
    for quant_type in R.QUANT_TYPES:
        packed = torch.empty(x.numel() // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(x.numel() // 64, device=device)
        q4.launch(x.view(-1), packed, absmax, 64, quant_type, encoder=encoder)
        want_packed, want = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
        assert_exact(packed, want_packed.view(-1))
        assert_exact(absmax, want.absmax)


# --- property: the round trip error is bounded by the code's largest half gap --------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=examples(15), deadline=None)
@hypothesis.given(
    n=st.integers(1, 700),
    blocksize=st.sampled_from(R.BLOCKSIZES_4BIT),
    quant_type=st.sampled_from(R.QUANT_TYPES),
    nested=st.booleans(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_is_bounded(n, blocksize, quant_type, nested, dtype, scale, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(device)
    packed, state = tritonbits.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    got = tritonbits.dequantize_4bit(packed, state)
    block_absmax = np.abs(x.double().cpu().numpy())
    blocks = -(-n // blocksize)
    block_absmax = np.pad(block_absmax, (0, blocks * blocksize - n)).reshape(blocks, blocksize).max(axis=1)
    used = block_absmax
    if nested:  # the absmax the dequantizer uses: code2[q] * absmax2 + offset
        s2 = state.state2
        code2 = s2.code.double().cpu().numpy()[state.absmax.long().cpu().numpy()]
        used = code2 * np.repeat(s2.absmax.double().cpu().numpy(), 256)[:blocks] + state.offset.double().item()
    code = {"nf4": R.NF4_CODE, "fp4": R.FP4_CODE}[quant_type]
    nested_error = torch.from_numpy(np.abs(np.asarray(used, dtype=np.float64) - block_absmax))
    tolerance.assert_quantize_roundtrip(got.reshape(x.shape), x, torch.from_numpy(code), blocksize, nested_error)
