"""tritonbits.integrations.bitsandbytes: enable/disable/enabled() put tritonbits behind bnb's 4-bit ops and
functions and give bnb its own back; results equal bnb CUDA's (on the GPU: bnb itself; under the interpreter:
the numpy oracle of bnb CUDA), bnb's matmul fallback bit for bit, linear_4bit within the matmul policy; an
end-to-end tiny Llama loaded through transformers' BitsAndBytesConfig equals bnb's logits, loss and LoRA grads."""

import contextlib
import gc
import sys
import types

import pytest
import torch

import tritonbits
import tritonbits_reference as R
from tritonbits_harness.tolerance import assert_exact, assert_matmul

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional
import tritonbits.integrations.bitsandbytes as tb_bnb  # noqa: E402

needs_linear_4bit = pytest.mark.skipif(not hasattr(tritonbits, "linear_4bit"), reason="linear_4bit not merged")


@pytest.fixture
def served(device):
    """The devices to serve: cuda on the GPU; under the interpreter cpu as well (the CI flow)."""
    return ("cuda",) if device.type == "cuda" else ("cuda", "cpu")


@pytest.fixture
def integration(served):
    """Enabled for the test, disabled after it whatever happens."""
    tb_bnb.enable(served)
    yield tb_bnb
    tb_bnb.disable()


@pytest.fixture(autouse=True)
def _always_disabled_after():
    yield
    tb_bnb.disable()


class Calls:
    """Counts calls of the tritonbits public functions the integration routes to."""

    NAMES = ("dequantize_4bit", "quantize_4bit", "quantize_blockwise", "dequantize_blockwise", "linear_4bit")

    def __init__(self, monkeypatch):
        self.n = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            fn = getattr(tritonbits, name, None)
            if fn is not None:
                monkeypatch.setattr(tritonbits, name, self._spy(name, fn))

    def _spy(self, name, fn):
        def spy(*args, **kwargs):
            self.n[name] += 1
            return fn(*args, **kwargs)

        return spy

    def total(self) -> int:
        return sum(self.n.values())


@pytest.fixture
def calls(monkeypatch):
    return Calls(monkeypatch)


def weight(gen, device, dtype, shape=(96, 128)):
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(device)


def expected_quantize_4bit(x, quant_type, nested):
    """bnb CUDA on the GPU (the integration disabled), the oracle of bnb CUDA under the interpreter."""
    assert not tb_bnb.is_enabled()
    if x.device.type == "cuda":
        q, s = F.quantize_4bit(x, quant_type=quant_type, compress_statistics=nested)
        return q, s.absmax, s.offset, s.state2.absmax if nested else None
    q, s = R.quantize_4bit_cuda(x, quant_type=quant_type, compress_statistics=nested)
    return q, s.absmax, s.offset, s.state2.absmax if nested else None


def expected_dequantize_4bit(q, state):
    assert not tb_bnb.is_enabled()
    return F.dequantize_4bit(q, state) if q.device.type == "cuda" else R.dequantize_4bit(q, state)


# --- enable / disable / enabled() ------------------------------------------------------------------------


# `import tritonbits` importing neither bnb nor this module: the kernels-alone nox session (a fresh venv).


def test_enable_disable_idempotent_and_reversible(served, calls, device, gen):
    bnb_deq, bnb_q = F.dequantize_4bit, F.quantize_4bit
    x = weight(gen, device, torch.bfloat16)
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    assert calls.total() == 0
    tb_bnb.enable(served)
    tb_bnb.enable(served)  # idempotent
    assert tb_bnb.is_enabled() and tb_bnb.served_devices() == served
    assert F.dequantize_4bit is not bnb_deq and F.quantize_4bit is not bnb_q
    got = F.dequantize_4bit(q, s)
    assert calls.n["dequantize_4bit"] == 1
    torch.ops.bitsandbytes.dequantize_4bit(q, s.state2.absmax.new_ones(s.absmax.shape), 64, "nf4", [96, 128],
                                           torch.bfloat16)  # fmt: skip
    assert calls.n["dequantize_4bit"] == 2
    tb_bnb.disable()
    tb_bnb.disable()  # idempotent
    assert not tb_bnb.is_enabled() and tb_bnb.served_devices() == ()
    assert F.dequantize_4bit is bnb_deq and F.quantize_4bit is bnb_q
    before = calls.total()
    assert_exact(F.dequantize_4bit(q, s), got) if device.type == "cuda" else F.dequantize_4bit(q, s)
    F.quantize_4bit(x, quant_type="nf4")
    torch.ops.bitsandbytes.dequantize_4bit(q, s.state2.absmax.new_ones(s.absmax.shape), 64, "nf4", [96, 128],
                                           torch.bfloat16)  # fmt: skip
    assert calls.total() == before, "bnb's kernels must run again after disable()"
    tb_bnb.enable(served)  # enable again after disable
    F.dequantize_4bit(q, s)
    assert calls.total() == before + 1


def test_context_manager_restores_the_state_before(served, calls, device, gen):
    x = weight(gen, device, torch.float16)
    with tb_bnb.enabled(served):
        assert tb_bnb.is_enabled()
        F.quantize_4bit(x, quant_type="fp4")
        assert calls.n["quantize_4bit"] == 1
    assert not tb_bnb.is_enabled()
    F.quantize_4bit(x, quant_type="fp4")
    assert calls.n["quantize_4bit"] == 1
    tb_bnb.enable(served)
    with tb_bnb.enabled(served):
        pass
    assert tb_bnb.is_enabled() and tb_bnb.served_devices() == served  # enabled before: still enabled
    with pytest.raises(KeyError), tb_bnb.enabled(served):
        raise KeyError("inside")
    assert tb_bnb.is_enabled()


def test_stale_reference_calls_bnb(served, calls, device, gen):
    """A reference to the replaced function kept past disable() runs bnb's."""
    x = weight(gen, device, torch.bfloat16)
    q, s = F.quantize_4bit(x, quant_type="nf4")
    tb_bnb.enable(served)
    kept = F.dequantize_4bit
    tb_bnb.disable()
    kept(q, s)
    assert calls.total() == 0


def test_other_devices_stay_bnb(calls, gen):
    """Enabled for CUDA only: CPU tensors are bnb's (its functions and kernels run)."""
    x = weight(gen, torch.device("cpu"), torch.bfloat16)
    tb_bnb.enable(("cuda",))
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    F.dequantize_4bit(q, s)
    torch.ops.bitsandbytes.dequantize_4bit(q, s.state2.absmax.new_ones(s.absmax.shape), 64, "nf4", list(x.shape),
                                           torch.bfloat16)  # fmt: skip
    assert calls.total() == 0


@pytest.mark.parametrize("version", ["0.49.2", "0.51.0", "1.0.0"])
def test_version_outside_tested_range(monkeypatch, served, version):
    monkeypatch.setattr(bnb, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"bitsandbytes {version} is installed.*{tb_bnb.TESTED_RANGE}"):
        tb_bnb.enable(served)
    assert not tb_bnb.is_enabled()


def test_missing_bitsandbytes(monkeypatch, served):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"tritonbits\[bnb\]"):
        tb_bnb.enable(served)
    assert not tb_bnb.is_enabled()


@pytest.mark.parametrize("devices", [(), ("tpu",), ("cuda", "xpu")])
def test_bad_devices(devices):
    with pytest.raises(ValueError, match="devices"):
        tb_bnb.enable(devices)


@pytest.mark.parametrize("devices", [None, 3, {"cuda": 1}])
def test_devices_of_another_type(devices):
    with pytest.raises(TypeError, match="devices"):
        tb_bnb.enable(devices)
    assert not tb_bnb.is_enabled()


def test_cpu_needs_the_interpreter(monkeypatch):
    from tritonbits import _runtime

    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tb_bnb.enable(("cpu",))


# --- results --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_functional_quantize_4bit(integration, calls, quant_type, nested, out_dtype, device, gen):
    if out_dtype == torch.float32:
        pytest.skip("fp32 input is bnb's (test_functional_quantize_4bit_fp32_falls_back)")
    x = weight(gen, device, out_dtype)
    q, s = F.quantize_4bit(x, quant_type=quant_type, compress_statistics=nested)
    assert calls.n["quantize_4bit"] == 1
    assert isinstance(s, F.QuantState) and s.nested == nested and s.quant_type == quant_type
    assert tuple(s.shape) == tuple(x.shape) and s.dtype == out_dtype and s.blocksize == 64
    tb_bnb.disable()
    want_q, want_absmax, want_offset, want_absmax2 = expected_quantize_4bit(x, quant_type, nested)
    assert_exact(q, want_q.to(device))
    assert_exact(s.absmax, want_absmax.to(device))
    assert_exact(s.code, F.get_4bit_type(quant_type, device=device))
    if nested:
        assert_exact(s.offset.reshape(()), want_offset.reshape(()).to(device))
        assert_exact(s.state2.absmax, want_absmax2.to(device))
        assert s.state2.blocksize == 256 and s.state2.dtype == torch.float32
    # bnb's own functions read the state tritonbits made
    assert_exact(F.dequantize_4bit(q, s), expected_dequantize_4bit(q, s).to(device))


def test_functional_quantize_4bit_fp32_falls_back(integration, calls, device, gen):
    """fp32 input is not byte-equal with bnb CUDA everywhere (near ties): bnb quantizes it."""
    x = weight(gen, device, torch.float32)
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    assert calls.n["quantize_4bit"] == 0
    tb_bnb.disable()
    want_q, want_s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    assert_exact(q, want_q)
    assert_exact(s.absmax, want_s.absmax)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_functional_dequantize_4bit_one_call(integration, calls, nested, out_dtype, device, gen):
    x = weight(gen, device, out_dtype, (33, 128))
    tb_bnb.disable()
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=nested)
    want = expected_dequantize_4bit(q, s).to(device)
    tb_bnb.enable(("cuda",) if device.type == "cuda" else ("cuda", "cpu"))
    got = F.dequantize_4bit(q, s)
    assert calls.n["dequantize_4bit"] == 1 and calls.n["dequantize_blockwise"] == 0  # nested in the one launch
    assert_exact(got, want)
    out = torch.full_like(want, float("nan"))
    assert F.dequantize_4bit(q, s, out=out) is out
    assert_exact(out, want)
    assert_exact(F.dequantize_nf4(q, s), want)  # bnb's wrappers reach the replaced function


def has_out_variants(device) -> bool:
    """bnb 0.50.2 defines the .out overloads' kernels for CUDA only (the CPU backend has none to replace)."""
    return device.type == "cuda"


def test_ops_4bit(integration, calls, out_dtype, device, gen):
    x = weight(gen, device, out_dtype)
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit(x, 64, "nf4", torch.uint8)
    # fp32 input is quantized by bnb (near ties, docs/kernels/quantize_4bit.md)
    assert calls.n["quantize_4bit"] == (0 if out_dtype == torch.float32 else 1)
    deq = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", list(x.shape), out_dtype)
    out = torch.full_like(deq, float("nan"))
    if has_out_variants(device):
        torch.ops.bitsandbytes.dequantize_4bit.out(packed, absmax, 64, "nf4", list(x.shape), out_dtype, out=out)
    assert calls.n["dequantize_4bit"] == (2 if has_out_variants(device) else 1)
    tb_bnb.disable()
    if out_dtype == torch.float32:
        want_q, want_absmax = torch.ops.bitsandbytes.quantize_4bit(x, 64, "nf4", torch.uint8)
    else:
        want_q, want_absmax, _, _ = expected_quantize_4bit(x, "nf4", False)
    assert_exact(packed, want_q.to(device))
    assert_exact(absmax, want_absmax.to(device))
    want = expected_dequantize_4bit(packed, F.QuantState(absmax=absmax, shape=x.shape, dtype=out_dtype,
                                                         blocksize=64, quant_type="nf4")).to(device)  # fmt: skip
    assert_exact(deq, want)
    if has_out_variants(device):
        assert_exact(out, want)


def test_ops_blockwise_8bit(integration, calls, out_dtype, device, gen):
    x = weight(gen, device, out_dtype, (5, 1000))
    code = F.create_dynamic_map().to(device)
    q, absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, 256)
    deq = torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, 256, out_dtype)
    out = torch.full_like(deq, float("nan"))
    if has_out_variants(device):
        torch.ops.bitsandbytes.dequantize_blockwise.out(q, absmax, code, 256, out_dtype, out=out)
    assert calls.n["quantize_blockwise"] == (0 if out_dtype == torch.float32 else 1)  # fp32: bnb's
    assert calls.n["dequantize_blockwise"] == (2 if has_out_variants(device) else 1)
    tb_bnb.disable()
    if out_dtype == torch.float32:
        want_q, want_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, 256)
        want = (torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, 256, out_dtype) if device.type == "cuda"
                else R.dequantize_blockwise_cuda(q, absmax, code, 256, out_dtype))  # fmt: skip
    elif device.type == "cuda":
        want_q, want_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, 256)
        want = torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, 256, out_dtype)
    else:
        want_q, st = R.quantize_blockwise_cuda(x, code, blocksize=256)
        want_absmax = st["absmax"]
        want = R.dequantize_blockwise_cuda(q, absmax, code, 256, out_dtype)
    assert_exact(q, want_q.to(device))
    assert_exact(absmax, want_absmax.to(device))
    assert_exact(deq, want.to(device))
    if has_out_variants(device):
        assert_exact(out, want.to(device))


def gemm_args(q, s, bias=None):
    return ((q, list(s.shape), s.state2.absmax, s.blocksize, s.quant_type),
            dict(bias=bias, absmax_8bit=s.absmax, absmax_code=s.state2.code, absmax_offset=s.offset))  # fmt: skip


@pytest.mark.parametrize("m", [1, 3, 64, 2048])
def test_gemm_4bit(integration, calls, m, out_dtype, device, gen):
    """matmul_4bit's op. decode="auto": where bnb runs its fused kernel it is kept up to AUTO_BNB_DECODE_MAX_M
    rows; linear_4bit serves AUTO_BNB_DECODE_MAX_M < M <= AUTO_LINEAR_MAX_M on CUDA (judged by the matmul
    policy); elsewhere tritonbits dequantizes (one launch, nested absmax in-kernel) and calls F.linear as bnb
    does: equal to bnb bit for bit where bnb dequantizes too, else judged by the matmul policy."""
    if device.type == "cpu" and m > 3:
        pytest.skip("large M: GPU only (the interpreter is slow)")
    x = weight(gen, device, out_dtype, (256, 128))
    tb_bnb.disable()
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    A = torch.randn(m, 128, generator=gen).to(out_dtype).to(device)
    bias = torch.randn(256, generator=gen).to(out_dtype).to(device)
    args, kwargs = gemm_args(q, s, bias)
    if device.type == "cuda":
        want = torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs)
    else:  # bnb's own fallback, dequantize then F.linear, with the oracle's dequantize (bnb CUDA's bytes)
        w = R.dequantize_4bit(
            q,
            F.QuantState(
                absmax=F.dequantize_blockwise(s.absmax, s.state2) + s.offset,
                shape=s.shape,
                dtype=out_dtype,
                blocksize=64,
                quant_type="nf4",
            ),
        )
        want = torch.nn.functional.linear(A, w, bias)
    tb_bnb.enable(("cuda",) if device.type == "cuda" else ("cuda", "cpu"))
    got = torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs)
    bnb_fused = device.type == "cuda" and tb_bnb._bnb_takes_fused_cuda(A, s.shape, 64)
    linear = device.type == "cuda" and tb_bnb.AUTO_BNB_DECODE_MAX_M < m <= tb_bnb.AUTO_LINEAR_MAX_M
    if bnb_fused and m <= tb_bnb.AUTO_BNB_DECODE_MAX_M:
        # decode="auto" keeps bnb's fused kernel at M=1 (and runs linear_4bit once, unused: _warm)
        assert calls.n["dequantize_4bit"] == 0 and calls.n["linear_4bit"] == 1
    elif linear:
        assert calls.n["linear_4bit"] == 1 and calls.n["dequantize_4bit"] == 0
    else:
        assert calls.n["dequantize_4bit"] == 1 and calls.n["linear_4bit"] == 0
    if linear or (bnb_fused and m > tb_bnb.AUTO_BNB_DECODE_MAX_M):  # not bnb's own arithmetic: the policy
        tb_bnb.disable()
        assert_matmul(got, A, F.dequantize_4bit(q, s).to(out_dtype), bias)
        return
    assert_exact(got, want)


@needs_linear_4bit
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 100, 2048])
def test_gemm_4bit_linear_4bit(served, calls, m, out_dtype, device, gen):
    """decode="tritonbits": linear_4bit serves every M, bnb's fused kernel's range included."""
    tb_bnb.enable(served, decode="tritonbits")
    x = weight(gen, device, out_dtype, (512, 256))
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    A = torch.randn(m, 256, generator=gen).to(out_dtype).to(device)
    args, kwargs = gemm_args(q, s)
    got = torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs)
    assert calls.n["linear_4bit"] == 1
    tb_bnb.disable()
    assert_matmul(got, A, F.dequantize_4bit(q, s).to(out_dtype))


@needs_linear_4bit
@pytest.mark.gpu
def test_gemv_4bit_linear_4bit(served, calls, out_dtype, device, gen):
    tb_bnb.enable(served, decode="tritonbits")
    x = weight(gen, device, out_dtype, (512, 256))
    q, s = F.quantize_4bit(x, quant_type="nf4")
    A = torch.randn(1, 1, 256, generator=gen).to(out_dtype).to(device)
    got = torch.ops.bitsandbytes.gemv_4bit(A, q, list(s.shape), s.absmax, s.code, 64)
    assert calls.n["linear_4bit"] == 1
    tb_bnb.disable()
    assert_matmul(got.reshape(1, -1), A.reshape(1, -1), F.dequantize_4bit(q, s).to(out_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["auto", "bnb"])
def test_decode_keeps_bnb_fused_kernel(served, calls, decode, device, gen):
    """decode="bnb" (any M) and "auto" (M <= AUTO_BNB_DECODE_MAX_M): where bnb runs its fused kernel, its kernel
    runs, bit for bit; gemv_4bit likewise."""
    x = weight(gen, device, torch.bfloat16, (512, 256))
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    A = torch.randn(1, 256, generator=gen).to(torch.bfloat16).to(device)
    assert tb_bnb._bnb_takes_fused_cuda(A, s.shape, 64)  # the case this test is about
    args, kwargs = gemm_args(q, s)
    want = torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs)
    q1, s1 = F.quantize_4bit(x, quant_type="nf4")
    want_v = torch.ops.bitsandbytes.gemv_4bit(A, q1, list(s1.shape), s1.absmax, s1.code, 64)
    tb_bnb.enable(served, decode=decode)
    for _ in range(2):
        assert_exact(torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs), want)
        assert_exact(torch.ops.bitsandbytes.gemv_4bit(A, q1, list(s1.shape), s1.absmax, s1.code, 64), want_v)
    # "auto" runs linear_4bit once per layer beside bnb's gemm_4bit kernel (unused: _warm), "bnb" never
    assert calls.total() == calls.n["linear_4bit"] == (1 if decode == "auto" else 0)


@pytest.mark.parametrize("capturing", [False, True])
@pytest.mark.parametrize("decode", tb_bnb.DECODE_CHOICES)
def test_who_serves_each_m(decode, capturing, monkeypatch):
    """The routing rules at their boundaries: bnb's fused kernel steps aside (_linear_decodes) and linear_4bit
    serves (_linear_serves) per decode choice and M (rows of A, any leading dims); while a CUDA graph is being
    captured "auto" gives linear_4bit the rows it leaves to bnb otherwise."""
    monkeypatch.setattr(tb_bnb, "_capturing", lambda A: capturing)
    e = types.SimpleNamespace(decode=decode)
    lo, hi = tb_bnb.AUTO_BNB_DECODE_MAX_M, tb_bnb.AUTO_LINEAR_MAX_M
    for m in (1, lo, lo + 1, hi, hi + 1, 4096):
        A = torch.empty(1, m, 8)
        steps_aside = {"bnb": False, "tritonbits": True, "auto": m > lo or capturing}[decode]
        serves = {"bnb": False, "tritonbits": True, "auto": (lo < m or capturing) and m <= hi}[decode]
        assert tb_bnb._linear_decodes(e, A) == steps_aside, m
        assert tb_bnb._linear_serves(e, A) == serves, m


def test_quant_type_of_remembers_and_rechecks(monkeypatch, device):
    """gemv_4bit's code tensor: matched once (a host read), remembered, matched again after an in-place change;
    inside a capture an unmatched code gives None without a host read (bnb's kernel then serves the call)."""
    monkeypatch.setattr(tb_bnb, "_CODE_TYPES", {})
    code = F.get_4bit_type("nf4", device=device)
    assert tb_bnb._quant_type_of(code) == "nf4"
    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: reads.append(1) or real_cpu(t, *a, **k))
    assert tb_bnb._quant_type_of(code) == "nf4" and tb_bnb._quant_type_of(code[:]) == "nf4" and not reads
    code[3] += 0.25  # no longer NF4's values
    assert tb_bnb._quant_type_of(code) is None and len(reads) == 1
    code[3] -= 0.25
    assert tb_bnb._quant_type_of(code) == "nf4" and len(reads) == 2
    monkeypatch.setattr(tb_bnb, "_capturing", lambda A: True)
    fp4 = F.get_4bit_type("fp4", device=device)
    assert tb_bnb._quant_type_of(fp4) is None and len(reads) == 2
    assert tb_bnb._quant_type_of(code) == "nf4"  # remembered: no read needed
    monkeypatch.setattr(tb_bnb, "_capturing", lambda A: False)
    assert tb_bnb._quant_type_of(fp4) == "fp4" and len(reads) == 3
    with torch.inference_mode():  # no version counter: matched on every call, never kept
        inf = F.get_4bit_type("nf4", device=device)
    assert tb_bnb._quant_type_of(inf) == "nf4" and tb_bnb._quant_type_of(inf) == "nf4" and len(reads) == 5
    assert len(tb_bnb._CODE_TYPES) == 2


def test_capturing_asks_cuda_only(monkeypatch):
    """_capturing is False for a tensor off CUDA whatever the CUDA stream does (the query is not even asked)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: pytest.fail("asked"))
    assert tb_bnb._capturing(torch.empty(1, 8)) is False


def _captured(run, warm: bool):
    """run() captured in a CUDA graph, after an eager call on a side stream (the warm-up torch.cuda.graph's docs
    ask for) when `warm`; the graph and its output."""
    if warm:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run()
    return graph, got


def _replayed(graph, got, A, gen):
    A.copy_(torch.randn(A.shape, generator=gen).to(A.dtype))
    got.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return got


@needs_linear_4bit
@pytest.mark.gpu
@pytest.mark.parametrize("warm", ["auto", "tritonbits", None])
@pytest.mark.parametrize("op", ["gemm_4bit", "gemv_4bit"])
def test_auto_one_row_in_graph_capture(served, calls, op, warm, device, gen):
    """decode="auto" at one row: bnb's fused kernel eagerly (gemm_4bit also runs linear_4bit once, unused, so that
    a capture finds it compiled); inside a capture linear_4bit where its launches are ready, bnb's kernel where
    they are not (a capture refuses a kernel load). Warm-ups: "auto" (the capture's eager warm-up under auto),
    "tritonbits" (an eager decode="tritonbits" call first), None (captured cold: a fresh weight, no eager call).
    The replay, on fresh input, gives the very bits of the same kernel's eager call."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs")
    x = weight(gen, device, torch.bfloat16, (512, 256))
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=op == "gemm_4bit")
    A = torch.randn(1, 256, generator=gen).to(torch.bfloat16).to(device)

    def run():
        if op == "gemm_4bit":
            args, kwargs = gemm_args(q, s)
            return torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs)
        return torch.ops.bitsandbytes.gemv_4bit(A, q, list(s.shape), s.absmax, s.code, 64)

    before = 0
    if warm == "tritonbits":
        tb_bnb.enable(served, decode="tritonbits")
        run()
        before = 1
    tb_bnb.enable(served, decode="auto")
    # gemv_4bit under "auto" never runs linear_4bit eagerly at one row: ready only after decode="tritonbits"
    linear = warm == "tritonbits" or (warm == "auto" and op == "gemm_4bit")
    graph, got = _captured(run, warm == "auto")
    assert calls.n["linear_4bit"] == before + (2 if linear and warm == "auto" else 1 if linear else 0)
    got = _replayed(graph, got, A, gen)
    calls.n["linear_4bit"] = 0
    tb_bnb.enable(served, decode="tritonbits" if linear else "bnb")
    assert_exact(got, run())  # the same kernel eagerly
    assert calls.n["linear_4bit"] == (1 if linear else 0)


class _Views:
    """Records the (shape, strides) of the weight and x each served op hands tritonbits."""

    def __init__(self, monkeypatch):
        self.weights: set = set()
        self.xs: set = set()
        for name in ("dequantize_4bit", "linear_4bit"):
            fn = getattr(tritonbits, name, None)
            if fn is not None:
                monkeypatch.setattr(tritonbits, name, self._spy(name, fn))

    def _spy(self, name, fn):
        def spy(A, *args, **kwargs):
            if name == "linear_4bit":
                self.xs.add((tuple(A.shape), A.stride()))
                w = args[0]
            else:
                w = A
            self.weights.add((w.dim(), w.shape[-1], w.stride()))
            return fn(A, *args, **kwargs)

        return spy


def test_every_served_op_hands_one_weight_view(served, device, gen, monkeypatch):
    """tritonbits keeps one validated entry per quant state, keyed on the weight's shape and strides too, and
    linear_4bit's plans live in it: the dequantize path (a prefill above AUTO_LINEAR_MAX_M rows, the op,
    its .out) and linear_4bit must get the same view of the packed weight, or each call replaces the entry and
    its plans (a capture then finds linear_4bit not ready: e2e-h100 record 20261125T064005Z)."""
    views = _Views(monkeypatch)
    x = weight(gen, device, torch.bfloat16, (64, 128))
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    args, kwargs = gemm_args(q, s)
    tb_bnb.enable(served, decode="auto")
    torch.ops.bitsandbytes.gemm_4bit(torch.randn(1, 2, 128, generator=gen).to(torch.bfloat16).to(device), *args,
                                     **kwargs)  # fmt: skip
    rows = 3 if device.type == "cpu" else tb_bnb.AUTO_LINEAR_MAX_M + 1  # CPU: the dequantize path at any M
    torch.ops.bitsandbytes.gemm_4bit(torch.randn(rows, 128, generator=gen).to(torch.bfloat16).to(device), *args,
                                     **kwargs)  # fmt: skip
    out = torch.empty(64, 128, dtype=torch.bfloat16, device=device)
    ops = torch.ops.bitsandbytes
    q1, s1 = F.quantize_4bit(x, quant_type="nf4")  # the ops take per-block float scales
    ops.dequantize_4bit(q1, s1.absmax, s1.blocksize, s1.quant_type, list(s1.shape), torch.bfloat16)
    if device.type == "cuda":  # bnb 0.50 has no CPU kernel for the .out overloads
        ops.dequantize_4bit.out(q1, s1.absmax, s1.blocksize, s1.quant_type, list(s1.shape), torch.bfloat16, out=out)
    # a transposed [1, n] view of the same bytes (what bnb's B.t() gives): the same view again
    torch.ops.bitsandbytes.dequantize_4bit(q1.t(), s1.absmax, s1.blocksize, s1.quant_type, list(s1.shape),
                                           torch.bfloat16)  # fmt: skip
    if device.type == "cuda":  # gemv_4bit (linear_4bit at 2 rows under auto), x with leading dims
        ops.gemv_4bit(torch.randn(2, 1, 128, generator=gen).to(torch.bfloat16).to(device), q1, list(s1.shape),
                      s1.absmax, s1.code, 64)  # fmt: skip
    assert views.weights == {(2, 1, (1, 1))}
    if device.type == "cuda":  # linear_4bit served the 2-row products (auto), their x as [M, K] rows
        assert views.xs == {((2, 128), (128, 1))}


@needs_linear_4bit
@pytest.mark.gpu
def test_capture_finds_linear_4bit_ready_after_a_prefill_and_other_strides(served, calls, device, gen):
    """The calls a compiled generate() makes: eager one-row and 8-row products ("auto": bnb's kernel with
    linear_4bit warmed beside it; linear_4bit), a prefill above AUTO_LINEAR_MAX_M rows (the dequantize path), then
    a capture whose x have other strides in their size-1 dims (Inductor's [1, 1, K] with strides (K, 16, 1)):
    linear_4bit serves both captured products (e2e-h100 record 20261125T064005Z: bnb's kernel ran every one-row
    product of the compiled decode, the plans gone with the prefill's dequantize or keyed on the other strides).
    The replay on fresh input gives the bits of the same kernel's eager call."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs")
    x = weight(gen, device, torch.bfloat16, (512, 256))
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    args, kwargs = gemm_args(q, s)
    op = torch.ops.bitsandbytes.gemm_4bit

    def fresh(*shape):
        return torch.randn(shape, generator=gen).to(torch.bfloat16).to(device)

    tb_bnb.enable(served, decode="auto")
    for rows in (1, 8, tb_bnb.AUTO_LINEAR_MAX_M + 1):
        op(fresh(rows, 1, 256), *args, **kwargs)
    odd = [fresh(rows * 256).as_strided((rows, 1, 256), (256, 16, 1)) for rows in (1, 8)]
    calls.n["linear_4bit"] = 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = [op(a, *args, **kwargs) for a in odd]
    assert calls.n["linear_4bit"] == 2
    for a, g in zip(odd, got, strict=True):
        a.copy_(fresh(*a.shape))
        g.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    tb_bnb.enable(served, decode="tritonbits")
    for a, g in zip(odd, got, strict=True):
        assert_exact(g, op(a, *args, **kwargs))


@needs_linear_4bit
@pytest.mark.gpu
def test_auto_warm_refused_keeps_bnbs_result(served, device, gen, monkeypatch):
    """ "auto"'s one-time linear_4bit call beside bnb's one-row kernel (_warm) is optional: where linear_4bit
    refuses the arguments, the call still returns bnb's result, bit for bit."""
    x = weight(gen, device, torch.bfloat16, (512, 256))
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    A = torch.randn(1, 256, generator=gen).to(torch.bfloat16).to(device)
    args, kwargs = gemm_args(q, s)
    want = torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs)
    refused = []

    def refuse(*a, **k):
        refused.append(1)
        raise ValueError("x: refused")

    monkeypatch.setattr(tritonbits, "linear_4bit", refuse)
    tb_bnb.enable(served, decode="auto")
    assert_exact(torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs), want)
    assert refused == [1]


@needs_linear_4bit
def test_launches_ready(served, device, gen):
    """linear_4bit.launches_ready: False before a call, True after it (its steps bound; the interpreter binds
    nothing), False for another x layout and after the quant state changed; it validates and builds nothing."""
    from tritonbits.ops.linear_4bit import launches_ready

    x = weight(gen, device, torch.bfloat16, (512, 256))
    q, s = tritonbits.quantize_4bit(x, quant_type="nf4")
    A = torch.randn(1, 256, generator=gen).to(torch.bfloat16).to(device)
    w = q.reshape(-1, 1)
    assert not launches_ready(A, w, s)
    tritonbits.linear_4bit(A, w, s)
    assert launches_ready(A, w, s) == (device.type == "cuda")
    assert not launches_ready(A.reshape(1, 1, 256), w, s) and not launches_ready(A, w, s, torch.zeros_like(A[0]))
    s.blocksize = 128
    assert not launches_ready(A, w, s)


@pytest.mark.parametrize("decode", ["fast", None, 1, "BNB"])
def test_enable_refuses_unknown_decode(decode):
    with pytest.raises(ValueError, match="decode"):
        tb_bnb.enable(("cuda",), decode=decode)
    assert not tb_bnb.is_enabled()


def test_enabled_restores_decode_choice(served):
    tb_bnb.enable(served, decode="bnb")
    with tb_bnb.enabled(served, decode="tritonbits"):
        assert tb_bnb._active.decode == "tritonbits"
    e = tb_bnb._active
    assert e is not None and e.decode == "bnb"
    tb_bnb.enable(served, decode="bnb")  # idempotent: the same fragment stays
    assert tb_bnb._active is e


def test_gemm_4bit_falls_back_on_what_tritonbits_refuses(served, calls, device, gen):
    """A non-contiguous packed weight is bnb's to handle (or refuse): tritonbits' 4-bit paths never see it."""
    x = weight(gen, device, torch.bfloat16, (64, 128))
    q, s = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    A = torch.randn(2, 128, generator=gen).to(torch.bfloat16).to(device)
    q2 = torch.stack([q.view(-1), q.view(-1)], 1)[:, 0:1]  # same bytes, stride 2
    args, kwargs = gemm_args(q2, s)
    tb_bnb.enable(served)
    got = torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs)
    assert calls.n["dequantize_4bit"] == calls.n["linear_4bit"] == 0
    tb_bnb.disable()
    assert_exact(got, torch.ops.bitsandbytes.gemm_4bit(A, *args, **kwargs))


def test_state_cache_follows_the_weight(integration, device, gen):
    """One QuantState per layer's op arguments (tritonbits' prepared-weight cache then hits), released when
    bnb's per-block scales tensor dies: a freed model leaves no entry (and no GPU memory) behind."""
    x = weight(gen, device, torch.bfloat16)
    q, s = F.quantize_4bit(x, quant_type="nf4")
    e = tb_bnb._active
    gc.collect()  # what an earlier test left for the collector goes now, not inside this count
    before = len(e.states)
    absmax = s.absmax
    first = torch.ops.bitsandbytes.dequantize_4bit(q, absmax, 64, "nf4", list(x.shape), torch.bfloat16)
    again = torch.ops.bitsandbytes.dequantize_4bit(q, absmax, 64, "nf4", list(x.shape), torch.bfloat16)
    assert len(e.states) == before + 1
    assert_exact(again, first)
    del absmax, s
    gc.collect()
    assert len(e.states) == before


def test_state_cache_outlives_a_disable(integration, served, device, gen):
    """A model switched off and on again (`with enabled():` per call) keeps its QuantState, and with it
    tritonbits' prepared weight: no re-validation after each switch."""
    x = weight(gen, device, torch.bfloat16)
    q, s = F.quantize_4bit(x, quant_type="nf4")
    args = (q, s.absmax, 64, "nf4", list(x.shape), torch.bfloat16)
    first = torch.ops.bitsandbytes.dequantize_4bit(*args)
    key = next(k for k, v in tb_bnb._active.states.items() if v.shape == x.shape)
    state = tb_bnb._active.states[key]
    tb_bnb.disable()
    tb_bnb.enable(served)
    assert_exact(torch.ops.bitsandbytes.dequantize_4bit(*args), first)
    assert tb_bnb._active.states.get(key) is state


# --- Linear4bit.forward --------------------------------------------------------------------------------------


def linear4bit(device, gen, *, bias=True, nested=True, compute_dtype=torch.bfloat16, k=128, n=96):
    """A bnb Linear4bit quantized by bnb (or its CUDA oracle under the interpreter), as transformers builds one."""
    assert not tb_bnb.is_enabled()
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, compress_statistics=nested,
                              quant_type="nf4")  # fmt: skip
    w = weight(gen, device, torch.bfloat16, (n, k))
    if device.type == "cuda":
        q, s = F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    else:
        q, s = R.quantize_4bit_cuda(w, quant_type="nf4", compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(q, requires_grad=False, quant_state=s, quant_type="nf4", bnb_quantized=True,
                                     module=layer)  # fmt: skip
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, generator=gen).to(torch.bfloat16).to(device))
    layer.support_avx512bf16_for_cpu = False  # bnb's CPU repacking would skip the 4-bit ops (docs/integrations.md)
    return layer


@pytest.fixture
def bnb_forward(monkeypatch):
    """bnb's own Linear4bit.forward, counted: installed as the class's forward, which enable() keeps as the one
    its forward hands calls on to."""
    assert not tb_bnb.is_enabled()
    real = bnb.nn.Linear4bit.forward
    assert real is not tb_bnb._linear4bit_forward
    counted = types.SimpleNamespace(n=0, real=real)

    def spy(self, x):
        counted.n += 1
        return real(self, x)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", spy)  # put back after the test, whatever it enabled
    return counted


@pytest.mark.parametrize("decode", tb_bnb.DECODE_CHOICES)
@pytest.mark.parametrize(("m", "bias", "nested"), [(1, True, True), (3, False, True), (2, True, False)])
def test_linear4bit_forward_is_the_op_path(served, calls, bnb_forward, decode, m, bias, nested, device, gen):
    """Enabled, Linear4bit.forward skips bnb's host path and calls the served gemm_4bit with bnb's arguments:
    the same kernels, bit for bit what bnb's forward returns through the op (enabled too)."""
    layer = linear4bit(device, gen, bias=bias, nested=nested)
    x = torch.randn(m, 1, 128, generator=gen).to(torch.bfloat16).to(device)
    tb_bnb.enable(served, decode=decode)
    assert bnb.nn.Linear4bit.forward is tb_bnb._linear4bit_forward
    with torch.no_grad():
        layer(x)  # "auto" at one row runs linear_4bit once per layer beside bnb's kernel (_warm): not counted
        calls.n.update(dict.fromkeys(calls.n, 0))
        got = layer(x)
        assert bnb_forward.n == 0
        served_calls = dict(calls.n)
        want = bnb_forward.real(layer, x)  # bnb's forward, through the dispatcher to the served op
    assert dict(calls.n) == {name: 2 * v for name, v in served_calls.items()}  # the same tritonbits calls
    assert got.shape == (m, 1, 96) and got.dtype == torch.bfloat16
    assert_exact(got, want)


class _Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


LEFT_TO_BNB = ["x requires grad", "bias requires grad", "weight requires grad", "x in another dtype",
               "bias in another dtype", "compute dtype not set yet", "no rows", "dispatch mode", "autocast", "vmap",
               "jit trace", "x a tensor subclass", "[K, N] quant state", "nested blocksize 128", "device not served",
               "CPU layer with bnb's AVX512-BF16 path", "disabled"]  # fmt: skip


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("case", LEFT_TO_BNB)
def test_linear4bit_forward_leaves_the_rest_to_bnb(served, bnb_forward, case, device, gen):
    """Training, a cast, bnb's first call (it sets the compute dtype), an empty input, a dispatch mode, autocast,
    functorch and jit transforms, a tensor subclass, a weight that requires grad, a quant state bnb handles
    differently ([K, N]) or refuses (nested blocksize 128), a device not served, bnb's CPU repacking path, and a
    forward bound while enabled but called after disable(): bnb's own forward runs, once."""
    if case == "CPU layer with bnb's AVX512-BF16 path" and device.type == "cuda":
        pytest.skip("the CPU is served only under the Triton interpreter (the CPU test session)")
    if case in ("device not served", "CPU layer with bnb's AVX512-BF16 path"):
        device = torch.device("cpu")  # a CPU layer; "cuda" alone served, or the CPU with bnb's repacking on
        served = ("cuda",) if case == "device not served" else served
    # no bias where x's dtype is the case (a bias in the compute dtype would hand the call on by itself)
    layer = linear4bit(device, gen, bias=case != "x in another dtype",
                       compute_dtype=None if case == "compute dtype not set yet" else torch.bfloat16)  # fmt: skip
    if case == "compute dtype not set yet":  # bnb sets compute_type_is_set at its first call; here only that differs
        layer.compute_dtype = torch.bfloat16
    x = torch.randn(0 if case == "no rows" else 2, 128, generator=gen).to(torch.bfloat16).to(device)
    if case == "x a tensor subclass":
        x = x.as_subclass(_Sub)
    if case == "[K, N] quant state":  # bnb's deprecated orientation: it dequantizes and multiplies by the transpose
        layer.weight.quant_state.shape = torch.Size([128, 96])
    if case == "nested blocksize 128":
        layer.weight.quant_state.state2.blocksize = 128
    if case == "CPU layer with bnb's AVX512-BF16 path":
        layer.support_avx512bf16_for_cpu = True
    if layer.bias is not None:
        layer.bias.requires_grad_(case == "bias requires grad")
    if case == "x in another dtype":
        x = x.half()
    if case == "bias in another dtype":
        layer.bias = torch.nn.Parameter(layer.bias.float(), requires_grad=False)
    if case == "x requires grad":
        x.requires_grad_(True)
    if case == "weight requires grad":  # a float quant_storage holds the packed bytes; bnb lets it require grad
        w = layer.weight
        packed = w.data.reshape(-1).view(torch.float32)[:, None]
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=True, quant_state=w.quant_state, quant_type="nf4",
                                         quant_storage=torch.float32, bnb_quantized=True, module=layer)  # fmt: skip
    tb_bnb.enable(served)
    forward = layer.forward
    if case == "disabled":
        tb_bnb.disable()
    contexts = {"dispatch mode": _Passthrough, "autocast": lambda: torch.autocast(device.type, dtype=torch.bfloat16)}
    with contexts.get(case, contextlib.nullcontext)():
        if case == "vmap":
            out = torch.func.vmap(forward)(x.unsqueeze(1))
        elif case == "jit trace":
            out = torch.jit.trace(layer, x, check_trace=False)(x)
        elif case == "nested blocksize 128":
            with pytest.raises(NotImplementedError, match="blocksize"):  # bnb's error, not a silent other scale
                forward(x)
            out = x.new_empty(2, 96)
        else:
            out = forward(x)
    assert bnb_forward.n == 1, case
    assert out.shape[0] == x.shape[0] and out.shape[-1] == 96
    assert layer.compute_type_is_set


def test_linear4bit_forward_under_torch_compile(served, device, gen):
    """torch.compile(fullgraph=True) of an enabled layer traces bnb's own forward (no graph break in ours) and
    returns what the eager layer does."""
    layer = linear4bit(device, gen)
    x = torch.randn(2, 128, generator=gen).to(torch.bfloat16).to(device)
    tb_bnb.enable(served)
    with torch.no_grad():
        want = layer(x)
        torch._dynamo.reset()
        got = torch.compile(layer, backend="eager", fullgraph=True)(x)
    assert_exact(got, want)


def test_disable_gives_linear4bit_forward_back(served, monkeypatch, device, gen):
    """disable() puts back the forward enable() found (bnb's, or another library's patch of it, which ours calls
    for what it hands on); a patch installed over ours while enabled stays."""
    original = bnb.nn.Linear4bit.forward
    tb_bnb.enable(served)
    tb_bnb.enable(served, decode="bnb")  # re-enabled with other arguments: bnb's forward stays the one kept
    assert bnb.nn.Linear4bit.forward is tb_bnb._linear4bit_forward
    tb_bnb.disable()
    assert bnb.nn.Linear4bit.forward is original
    with tb_bnb.enabled(served):
        assert bnb.nn.Linear4bit.forward is tb_bnb._linear4bit_forward
    assert bnb.nn.Linear4bit.forward is original
    seen = []

    def theirs(self, x):
        seen.append(x.shape)
        return original(self, x)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", theirs)
    layer = linear4bit(device, gen)
    x = torch.randn(2, 128, generator=gen).to(torch.bfloat16).to(device)
    with tb_bnb.enabled(served):
        layer(x.float())  # a cast: handed on, to their patch
        assert seen == [(2, 128)]
    assert bnb.nn.Linear4bit.forward is theirs

    def over_ours(self, x):
        return tb_bnb._linear4bit_forward(self, x)

    tb_bnb.enable(served)
    bnb.nn.Linear4bit.forward = over_ours
    tb_bnb.disable()
    assert bnb.nn.Linear4bit.forward is over_ours


# --- end to end: a tiny Llama through transformers' BitsAndBytesConfig -----------------------------------------


def test_tiny_llama_end_to_end(calls, served, device, tmp_path):
    """The e2e benchmark's flow on a tiny config (hidden 64, 1 layer): load (quantize), forward, a QLoRA
    step; the enabled model equals bnb's (quantized bytes, logits, loss, LoRA grads). Where linear_4bit serves
    the matmuls (CUDA, once merged), each Linear4bit's output is judged by the matmul policy instead."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from tritonbits_harness import e2e

    cfg = e2e.llama_config(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=128)
    e2e.save_random_model(cfg, tmp_path, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    runs, seen = {}, []
    for mode in ("bnb", "tritonbits"):
        ctx = tb_bnb.enabled(served) if mode == "tritonbits" else contextlib.nullcontext()
        with ctx:
            model = e2e.load_4bit(tmp_path, device)
            hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o)))
                     for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and mode == "tritonbits"]  # fmt: skip
            with torch.no_grad():
                logits = model(ids).logits
            for h in hooks:
                h.remove()
            lora = e2e.add_lora(model, r=4, seed=0)
            loss = lora(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
        runs[mode] = (e2e.quantized_weights(model), logits, loss.detach(), grads)
        if mode == "bnb":
            assert calls.total() == 0
    assert calls.n["quantize_4bit"] == 7  # every Linear4bit quantized by tritonbits
    # both forwards' matmuls (2 x 7: M=32 rows, linear_4bit's on CUDA under decode="auto", dequantize + F.linear
    # under the interpreter) and the backward's dequantize of the 4 layers whose input requires grad (layer 0's
    # q/k/v see the frozen embedding's output: no grad there)
    forward_linear = device.type == "cuda" and tb_bnb.AUTO_BNB_DECODE_MAX_M < 32 <= tb_bnb.AUTO_LINEAR_MAX_M
    assert calls.n["linear_4bit"] == (2 * 7 if forward_linear else 0)
    assert calls.n["dequantize_4bit"] == (0 if forward_linear else 2 * 7) + 4
    (wq_b, logits_b, loss_b, grads_b), (wq_t, logits_t, loss_t, grads_t) = runs["bnb"], runs["tritonbits"]
    assert wq_b.keys() == wq_t.keys() and len(wq_b) == 7 * 4
    for name in wq_b:
        assert_exact(wq_t[name], wq_b[name])
    if device.type == "cuda":  # bnb's run may have taken its fused kernel where the enabled one dequantizes
        assert len(seen) == 7
        for mod, x, y in seen:
            w = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(x.dtype)
            assert_matmul(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), w, mod.bias)
        return
    assert_exact(logits_t, logits_b)
    assert_exact(loss_t, loss_b)
    assert grads_b.keys() == grads_t.keys() and grads_b
    for name in grads_b:
        assert_exact(grads_t[name], grads_b[name])


def test_tiny_llama_compiled_static_decode(served, device, tmp_path):
    """The e2e benchmark's compiled decode (phase 2b: StaticGenerate, transformers' static cache and compiled
    decode step; Dynamo with the eager backend here) on the tiny config: the compiled step is the one that ran,
    and the enabled model generates bnb's tokens. CPU only: there tritonbits computes bnb's bytes; on CUDA the
    one-row products differ by design (linear_4bit under capture: test_auto_serves_one_row_in_graph_capture)."""
    pytest.importorskip("transformers")
    if device.type == "cuda":
        pytest.skip("exact only under the interpreter; the CUDA route is test_auto_serves_one_row_in_graph_capture's")
    from transformers import CompileConfig

    from tritonbits_harness import e2e

    cfg = e2e.llama_config(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=128)
    e2e.save_random_model(cfg, tmp_path, seed=0)
    ids = torch.randint(3, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2)).to(device)
    tokens = {}
    for mode in ("bnb", "tritonbits"):
        ctx = tb_bnb.enabled(served) if mode == "tritonbits" else contextlib.nullcontext()
        with ctx:
            model = e2e.load_4bit(tmp_path, device)
            e2e.allow_compiled_decode(model)
            run = e2e.StaticGenerate(model, 6 + 5, CompileConfig(backend="eager", mode="default"))
            try:
                tokens[mode] = [e2e.generate(run, ids, 5) for _ in range(2)]  # the second call resets the cache
                assert hasattr(model, "_compiled_call")
            finally:
                e2e.forbid_compiled_decode(model)
                torch._dynamo.reset()
    assert_exact(tokens["bnb"][1], tokens["bnb"][0])
    for got, want in zip(tokens["tritonbits"], tokens["bnb"], strict=True):
        assert_exact(got, want)


def test_bnb_dynamic_code_takes_the_table_encoder(integration, device, gen, monkeypatch):
    """bnb passes its own tensor of the dynamic map: the op hands tritonbits code=None (its table encoder) for
    it, and the tensor itself for any other code, also after bnb's tensor is changed in place."""
    seen = []
    real = tritonbits.quantize_blockwise

    def spy(A, **kw):
        seen.append(kw["code"])
        return real(A, **kw)

    monkeypatch.setattr(tritonbits, "quantize_blockwise", spy)
    x = weight(gen, device, torch.bfloat16, (3, 700))
    code = F.create_dynamic_map().to(device)
    q_table, absmax_table = torch.ops.bitsandbytes.quantize_blockwise(x, code, 256)
    assert seen[-1] is None
    code[17] += 1e-3  # no longer the dynamic code: the search encoder on these values
    q_other, _ = torch.ops.bitsandbytes.quantize_blockwise(x, code, 256)
    assert seen[-1] is not None and torch.equal(seen[-1], code)
    want_q, st = R.quantize_blockwise_cuda(x.cpu(), code.cpu(), blocksize=256)
    assert_exact(q_other.cpu(), want_q)
    code[17] -= 1e-3
    assert torch.equal(code, F.create_dynamic_map().to(device))
    torch.ops.bitsandbytes.quantize_blockwise(x, code, 256)
    assert seen[-1] is None
    want_q, st = R.quantize_blockwise_cuda(x.cpu(), F.create_dynamic_map(), blocksize=256)
    assert_exact(q_table.cpu(), want_q)
    assert_exact(absmax_table.cpu(), st["absmax"])
