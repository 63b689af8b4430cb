"""tritonbits behind bitsandbytes' own 4-bit entry points, so that a model loaded with transformers'
``BitsAndBytesConfig(load_in_4bit=True)`` (and trained with PEFT) runs tritonbits without a code change.

    import tritonbits.integrations.bitsandbytes as tb_bnb
    tb_bnb.enable()                       # or: with tb_bnb.enabled(): ...
    model = AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))

How bnb 0.50.2 dispatches (read from the installed package): its kernels are ``torch.library`` ops
(``bitsandbytes::dequantize_4bit``, ``::quantize_4bit``, ``::gemm_4bit``, ...) defined in ``bitsandbytes/_ops.py``,
with one kernel per device registered by ``torch.library.register_kernel`` in ``bitsandbytes/backends/<device>/``
(CUDA: ``backends/cuda/ops.py``; CPU: ``backends/cpu`` plus the ``default`` CompositeExplicitAutograd kernels).
``Linear4bit.forward`` -> ``bnb.matmul_4bit`` -> ``torch.ops.bitsandbytes.gemm_4bit`` (nested absmax passed as
``absmax_8bit``/``absmax_code``/``absmax_offset``) for inference and for the training forward; the backward and
PEFT's merges call the Python function ``bitsandbytes.functional.dequantize_4bit``, which launches the nested
path as three kernels (8-bit dequantize, add offset, 4-bit dequantize); loading quantizes through
``bitsandbytes.functional.quantize_4bit`` (the op, then a mean and ``quantize_blockwise`` of the absmax).

``enable()`` registers tritonbits kernels for those ops on the chosen devices' dispatch keys in a private
``torch.library.Library`` fragment, and replaces ``bitsandbytes.functional.dequantize_4bit`` and
``quantize_4bit`` by functions that run tritonbits in one launch (two and a mean for the nested quantize).
bnb's own kernel for each op and key is captured first (``torch.library.get_kernel``) and called for every
case tritonbits does not serve. Where bnb's CUDA ``gemm_4bit`` would run its fused kernel (small M: decode),
``enable(decode=...)`` chooses: "bnb" keeps bnb's kernel (called directly, ``_gemm_4bit_kernel_impl``, behind
the same heuristic bnb applies), "tritonbits" runs ``tritonbits.linear_4bit`` (for every product),
"auto" (the default) keeps bnb's kernel up to ``AUTO_BNB_DECODE_MAX_M`` rows (except while a CUDA graph is being
captured) and runs ``linear_4bit`` from there to ``AUTO_LINEAR_MAX_M`` rows (on CUDA), whoever bnb would have
picked. Every other product (bnb's own dequantize + F.linear fallback) is tritonbits' one-launch dequantize +
F.linear.
``disable()`` destroys the fragment (the dispatcher goes back to bnb's registrations) and puts bnb's functions
back. Served, and what falls back: docs/integrations.md.

CPU: the "cpu" device is served only under the Triton interpreter (TRITON_INTERPRET=1), where tritonbits runs
on CPU tensors, and only when asked for (``enable(devices=("cuda", "cpu"))``): it exists so that CI runs the
same flow. There tritonbits computes bnb CUDA's bytes; bnb's CPU backend agrees on NF4 with fp16/bf16 input
when every row is a whole number of blocks, and differs elsewhere (its FP4 quantizer, its C++ dequantize when
a row ends mid-block).
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

import tritonbits

from .. import _runtime, formats
from ..quant_state import NestedState, QuantState

# bnb versions this module is tested against: [TESTED_MIN, TESTED_BELOW). The gemm_4bit schema with the nested
# absmax arguments and the functional.dequantize_4bit / quantize_4bit bodies replaced here are 0.50's.
TESTED_MIN = (0, 50, 0)
TESTED_BELOW = (0, 51, 0)
TESTED_RANGE = ">=0.50.0,<0.51"

DEVICES = ("cuda", "cpu")
_KEYS = {"cuda": "CUDA", "cpu": "CPU"}
# NOTE: fp32 input is quantized by bnb: tritonbits' fp32 quantize differs from bnb CUDA in 5 of 29.4M NF4
# bytes (near ties, docs/kernels/quantize_4bit.md); fp16/bf16 are byte-equal.
_QUANTIZE_DTYPES = (torch.float16, torch.bfloat16)

_lock = threading.Lock()
_active: _Enabled | None = None


def _parse_version(text: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        raise RuntimeError(f"cannot read the bitsandbytes version {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _import_bnb():
    """bitsandbytes, imported now (never by ``import tritonbits``), with its version checked."""
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as e:
        raise ImportError(
            "tritonbits.integrations.bitsandbytes needs bitsandbytes: pip install 'tritonbits[bnb]' "
            f"(tested with bitsandbytes {TESTED_RANGE}); importing it failed: {e}"
        ) from e
    version = getattr(bitsandbytes, "__version__", "unknown")
    if not TESTED_MIN <= _parse_version(version) < TESTED_BELOW:
        raise RuntimeError(
            f"bitsandbytes {version} is installed, but tritonbits.integrations.bitsandbytes is tested with "
            f"bitsandbytes {TESTED_RANGE} (it replaces kernels behind bnb's own ops and functions, whose "
            "signatures change between releases); install a tested version or leave the integration disabled"
        )
    return bitsandbytes


# ---------------------------------------------------------------------------------------------------
# What tritonbits serves. Everything here is called by the dispatcher with bnb's op arguments.


def _get_kernel(qualname: str, key: str):
    """The kernel the dispatcher runs now for (op, dispatch key): torch.library.get_kernel (its documented use:
    keep the original, register another that calls it), or the same dispatcher query in a torch without it."""
    get = getattr(torch.library, "get_kernel", None)
    if get is not None:
        return get(qualname, key)
    query = getattr(torch._C, "_dispatch_get_computed_kernel_for_dispatch_key", None)
    if query is None:
        raise RuntimeError(f"torch {torch.__version__} cannot return a registered kernel (no "
                           "torch.library.get_kernel), which tritonbits.integrations.bitsandbytes needs to fall back "
                           "to bnb; upgrade torch")  # fmt: skip
    return query(qualname, key)


class _Enabled:
    """One enable(): the library fragment holding the overrides, bnb's kernels they fall back to, and the
    functional attributes replaced."""

    def __init__(self, bnb, devices: tuple[str, ...], decode: str):
        self.bnb = bnb
        self.devices = devices
        self.decode = decode
        self.lib = torch.library.Library("bitsandbytes", "FRAGMENT")
        self.originals: dict[tuple[str, str], object] = {}
        self.functional: dict[str, object] = {}
        self.states = _STATES  # op arguments -> QuantState, so prepare()'s cache hits (shared by every enable())

    # -- bnb's own kernel for (op, device) ---------------------------------------------------------------
    def original(self, op: str, device: torch.device):
        """bnb's kernel for `op` on `device`'s dispatch key, as it was before enable() (a boxed call)."""
        return self.originals[(op, _KEYS[device.type])]

    def register(self, op: str, fn) -> None:
        qualname = f"bitsandbytes::{op}"
        for device in self.devices:
            key = _KEYS[device]
            if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(qualname, key):
                continue  # bnb has no kernel for this device: nothing to serve or fall back to
            kernel = _get_kernel(qualname, key)
            keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
            self.originals[(op, key)] = functools.partial(kernel.call_boxed, keyset)  # type: ignore[attr-defined]
            # allow_override: bnb registered its CUDA kernels from Python, and torch 2.11 refuses a second Python
            # registration for the same key unless asked (later torch allows it by default); destroying the
            # fragment (disable) restores bnb's kernel underneath.
            self.lib.impl(op, fn, key, allow_override=True)

    def served(self, t: torch.Tensor) -> bool:
        return t.device.type in self.devices

    # -- a QuantState per distinct set of op arguments -------------------------------------------------------
    def state(self, absmax, shape, dtype, blocksize, quant_type, absmax_8bit=None, absmax_code=None,
              absmax_offset=None, blocksize2: int = formats.NESTED_BLOCKSIZE) -> QuantState:  # fmt: skip
        """The tritonbits QuantState for bnb's op arguments. One object per distinct argument set is kept, so
        tritonbits' per-quant-state cache (validated arguments, bound launch) serves every call of the same
        layer. The entry holds views of the tensors (their storage stays alive, so an equal address is the same
        storage; prepare() re-checks every field it validated) and dies with the caller's per-block scales
        tensor (bnb's quant_state.absmax): a freed model leaves nothing behind."""
        sig = (
            tuple(shape), dtype, blocksize, quant_type, blocksize2,
            *(_sig(t) for t in (absmax, absmax_8bit, absmax_code, absmax_offset)),
        )  # fmt: skip
        state = self.states.get(sig)
        if state is not None:
            return state
        if absmax_8bit is None:
            state = QuantState(absmax=absmax.detach(), shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                               quant_type=quant_type)  # fmt: skip
        else:
            state = QuantState(
                absmax=absmax_8bit.detach(), shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                quant_type=quant_type, offset=absmax_offset.detach(),
                state2=NestedState(absmax=absmax.detach(), code=absmax_code.detach(), blocksize=blocksize2),
            )  # fmt: skip
        try:
            weakref.finalize(absmax if absmax_8bit is None else absmax_8bit, self.states.pop, sig, None)
        except TypeError:  # takes no weak reference: not cached
            return state
        if len(self.states) >= _STATE_CACHE:
            self.states.pop(next(iter(self.states)))
        self.states[sig] = state
        return state


# NOTE: a bound besides the finalizers: a Llama-3-8B has 7 Linear4bit x 32 layers = 224 weights.
_STATE_CACHE = 4096
# One cache for every enable(), so that a model switched between bnb and tritonbits (a `with enabled():` per call,
# as the e2e benchmark interleaves) keeps its QuantStates and with them tritonbits' validated, bound launches: a
# fresh cache per enable() re-prepared every layer on the first call after each switch (helper-27's review: 7
# PreparedWeight builds, 21.6 against 3.7 us a call, CPU). Entries die with bnb's scales tensor, as before.
_STATES: dict[tuple, QuantState] = {}


def _sig(t) -> tuple | None:
    if t is None:
        return None
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device)


def _packed_ok(A: torch.Tensor) -> bool:
    """Packed storage tritonbits reads as flat bytes, passed as `_packed(A)`: a single byte goes to bnb."""
    return A.dtype in formats.PACKED_DTYPES and A.is_contiguous() and A.numel() > 1


def _packed(A: torch.Tensor) -> torch.Tensor:
    """The packed weight as every served op hands it to tritonbits: [n, 1] (bnb's own layout; more than one
    byte, so tritonbits' [1, n] transpose shim, bnb's in its Python function, never applies).
    NOTE: one view for every op, because tritonbits keeps one validated entry per quant state, keyed on the
    weight's shape and strides too (quant_state.prepare), and linear_4bit's plans live in that entry: a
    dequantize given the flat view (a prefill above AUTO_LINEAR_MAX_M rows did) replaced it, the plans went with
    it, and a CUDA-graph capture after that found linear_4bit not ready and ran bnb's kernel (e2e-h100 record
    20261125T064005Z: every one-row product of the compiled decode on bnb's kernel)."""
    return A.reshape(-1).view(-1, 1)  # strides (1, 1) whatever A's (a transposed [1, n] keeps (1, n) otherwise)


def _rows(A: torch.Tensor) -> torch.Tensor:
    """A contiguous x as [M, K] with the standard strides; any other x as it is. linear_4bit keys its plans on
    x's shape and strides, and a one-row x from a compiled graph may be [1, 1, K] with strides (K, 128, 1) where
    the eager call's were (K, K, 1): the same rows, but a capture would find no plan for them."""
    return A.view(-1, A.shape[-1]) if A.is_contiguous() else A


def _linear(A: torch.Tensor, B: torch.Tensor, state: QuantState, bias=None) -> torch.Tensor:
    """tritonbits.linear_4bit on (_rows(A), _packed(B)), shaped as A's rows."""
    out = tritonbits.linear_4bit(_rows(A), _packed(_frozen(B)), state, bias)  # type: ignore[attr-defined]
    return out.view(*A.shape[:-1], out.shape[-1])


def _op_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    e = _require_active()
    if not (_packed_ok(A) and absmax.dtype == torch.float32 and absmax.is_contiguous()):
        return e.original("dequantize_4bit", A.device)(A, absmax, blocksize, quant_type, shape, dtype)
    return tritonbits.dequantize_4bit(_packed(A), e.state(absmax, shape, dtype, blocksize, quant_type))


def _op_dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out):
    e = _require_active()
    if not (_packed_ok(A) and absmax.dtype == torch.float32 and absmax.is_contiguous() and out.is_contiguous()
            and tuple(out.shape) == tuple(shape) and out.dtype == dtype):  # fmt: skip
        e.original("dequantize_4bit.out", A.device)(A, absmax, blocksize, quant_type, shape, dtype, out)
        return
    state = e.state(absmax, shape, dtype, blocksize, quant_type)
    tritonbits.dequantize_4bit(_packed(A), state, out=out)


def _op_quantize_4bit(A, blocksize, quant_type, quant_storage):
    e = _require_active()
    size = torch.empty((), dtype=quant_storage).element_size()
    if (
        A.dtype not in _QUANTIZE_DTYPES or quant_storage not in formats.PACKED_DTYPES or ((A.numel() + 1) // 2) % size
    ):  # bnb's buffer is floor-sized there; tritonbits' rounds up
        return e.original("quantize_4bit", A.device)(A, blocksize, quant_type, quant_storage)  # fmt: skip
    packed, state = tritonbits.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type,
                                             quant_storage=quant_storage)  # fmt: skip
    return packed, state.absmax


def _op_quantize_blockwise(A, code, blocksize):
    e = _require_active()
    if (A.dtype not in _QUANTIZE_DTYPES or blocksize not in formats.BLOCKSIZES_8BIT
            or code.dtype != torch.float32 or code.numel() != 256):  # fmt: skip
        return e.original("quantize_blockwise", A.device)(A, code, blocksize)
    code_arg = None if code.device == A.device and _is_dynamic_code(code) else code.contiguous()
    out, state = tritonbits.quantize_blockwise(A, code=code_arg, blocksize=blocksize)
    return out, state.absmax


# id(code tensor) -> (a weak reference to it, its _version, its data_ptr, whether it holds the dynamic code);
# an entry goes when its tensor dies (tensors compare element-wise, so no WeakKeyDictionary)
_dynamic_codes: dict[int, tuple] = {}


def _is_dynamic_code(code: torch.Tensor) -> bool:
    """Whether `code` holds the dynamic 8-bit code. bnb passes its own tensor of that map, never tritonbits'
    table object, and only for that object does quantize_blockwise take its bucket-table encoder ("table"; else
    the binary search, ~3x the instructions per value): the values are compared once per tensor (a device sync),
    again after an in-place change or a `.data` swap, never while a CUDA graph is being captured."""
    if code.is_inference():  # no version counter: compared on every call
        if code.is_cuda and _capturing(code):
            return False
        return bool(torch.equal(code, formats.code_table("dynamic", code.device)))
    key = (code._version, code.data_ptr())
    hit = _dynamic_codes.get(id(code))
    if hit is not None and hit[0]() is code and hit[1:3] == key:
        return hit[3]
    if code.is_cuda and _capturing(code):
        return False
    equal = bool(torch.equal(code, formats.code_table("dynamic", code.device)))
    ident = id(code)
    _dynamic_codes[ident] = (weakref.ref(code, functools.partial(_forget_code, ident)), *key, equal)
    return equal


def _forget_code(ident: int, _ref: object) -> None:
    _dynamic_codes.pop(ident, None)


class _BlockwiseState(NamedTuple):
    """The fields tritonbits.dequantize_blockwise reads off a quant state (the output dtype among them)."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype


def _blockwise_ok(A, absmax, code, blocksize) -> bool:
    return (A.dtype == torch.uint8 and blocksize in formats.BLOCKSIZES and absmax.dtype == torch.float32
            and absmax.is_contiguous() and code.dtype == torch.float32 and code.numel() == 256
            and code.is_contiguous())  # fmt: skip


def _op_dequantize_blockwise(A, absmax, code, blocksize, dtype):
    e = _require_active()
    if not _blockwise_ok(A, absmax, code, blocksize):
        return e.original("dequantize_blockwise", A.device)(A, absmax, code, blocksize, dtype)
    return tritonbits.dequantize_blockwise(A, _BlockwiseState(absmax, code, blocksize, dtype))


def _op_dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
    e = _require_active()
    if not (_blockwise_ok(A, absmax, code, blocksize) and out.dtype == dtype and out.shape == A.shape):
        e.original("dequantize_blockwise.out", A.device)(A, absmax, code, blocksize, dtype, out)
        return
    tritonbits.dequantize_blockwise(A, _BlockwiseState(absmax, code, blocksize, dtype), out=out)


def _has_linear_4bit() -> bool:
    return hasattr(tritonbits, "linear_4bit")


# NOTE: "auto" keeps bnb's fused kernel at M=1 (decode at batch 1): there linear_4bit's gemv2 measured 0.79-1.10x
# bnb's kernel (H100 bench record 20261123T220535Z; 1.02-1.10x at the Llama-3-8B MLP shapes) and its host path
# costs more in a host-bound generate() loop (e2e-h100 201753Z: decode="tritonbits" 0.71x bnb at batch 1). From
# M=2 to AUTO_LINEAR_MAX_M it runs linear_4bit whichever kernel bnb would pick: its tensor-core gemm beats both
# bnb's fused kernel and dequantize + cuBLAS there (H100, bf16, CUDA graphs, ci/linear4bit_gemm_probe.py log
# 20261123T2145Z; K=4096 N=14336 / K=14336 N=4096): M=8 36.1 / 31.5 us vs bnb 66.3 / 124.0 and dequantize +
# cuBLAS 99.9 / 100.0; M=128 58.5 / 55.1 vs 124.3 / 130.1 and 99.2 / 106.0. Above AUTO_LINEAR_MAX_M, bnb's
# fallback with tritonbits' one-launch dequantize + cuBLAS (M=256: 105.8 / 112.1 vs bnb 133.1 / 139.1), equal to
# bnb's bit for bit where bnb dequantizes too.
AUTO_BNB_DECODE_MAX_M = 1
AUTO_LINEAR_MAX_M = 128
DECODE_CHOICES = ("auto", "bnb", "tritonbits")
# NOTE: ...except while a CUDA graph is being captured (torch.compile's "reduce-overhead", transformers' compiled
# static-cache decode, a hand-made torch.cuda.graph): a replay runs the kernels without the host code around them,
# so only the kernels' speed counts, and at one row linear_4bit's mma kernel is the faster one (1.20-1.41x bnb's
# fused kernel, bench-h100 records 20261124T190854Z / 191025Z, CUDA graphs). The capture query (`_capturing`) is
# asked by "auto" at M <= AUTO_BNB_DECODE_MAX_M and before every product linear_4bit serves (`_ready`); its host
# time was not measured.


def _capturing(A: torch.Tensor) -> bool:
    """Whether A's CUDA device's current stream is capturing a graph (False off CUDA)."""
    if A.device.type != "cuda":
        return False
    index = A.device.index
    if index is None or index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(index):
        return torch.cuda.is_current_stream_capturing()


def _ready(A: torch.Tensor, B: torch.Tensor, state: QuantState, bias) -> bool:
    """Whether linear_4bit can take this product now: always outside a capture; inside one only when the call's
    launches are compiled and bound already (a capture refuses a kernel compile or module load: the product then
    goes where an eager call of this M would go)."""
    if not _capturing(A):
        return True
    from ..ops.linear_4bit import launches_ready

    return launches_ready(_rows(A), _packed(_frozen(B)), state, bias)


# NOTE: ...and so that a capture finds linear_4bit ready at one row, "auto"'s eager one-row calls (bnb's kernel)
# run linear_4bit once per layer too, result unused (its compile and first launch, once; _WARMED by id of bnb's
# per-block scales tensor, an entry dying with it), since a capture's own eager warm-up runs those calls.
_WARMED: dict[int, None] = {}


def _warm(e: _Enabled, A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
          absmax_offset) -> None:  # fmt: skip
    scales = absmax if absmax_8bit is None else absmax_8bit
    ident = id(scales)
    if ident in _WARMED or not _servable(A, B, shapeB, absmax, absmax_8bit, absmax_code, absmax_offset):
        return
    try:
        weakref.finalize(scales, _WARMED.pop, ident, None)
    except TypeError:  # takes no weak reference: never warmed
        return
    _WARMED[ident] = None
    state = e.state(absmax, shapeB, A.dtype, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset)
    with contextlib.suppress(TypeError, ValueError):  # an argument linear_4bit refuses: bnb's kernel serves anyway
        _linear(A, B, state, bias)


def _bnb_fused(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset):
    """bnb's fused small-M kernel, called directly as bnb's own gemm_4bit kernel does."""
    from bitsandbytes.backends.cuda import ops as cuda_ops

    return cuda_ops._gemm_4bit_kernel_impl(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit,
                                           absmax_code, absmax_offset)  # fmt: skip


def _linear_decodes(e: _Enabled, A: torch.Tensor) -> bool:
    """Whether bnb's fused small-M kernel steps aside for tritonbits where bnb would run it (enable's decode)."""
    if e.decode == "auto":
        return A.numel() // A.shape[-1] > AUTO_BNB_DECODE_MAX_M or _capturing(A)
    return e.decode == "tritonbits"


def _linear_serves(e: _Enabled, A: torch.Tensor) -> bool:
    """Whether tritonbits.linear_4bit runs this product: every M with decode="tritonbits"; with "auto" the rows
    between AUTO_BNB_DECODE_MAX_M and AUTO_LINEAR_MAX_M, and those up to AUTO_BNB_DECODE_MAX_M too while a CUDA
    graph is being captured."""
    if e.decode == "auto":
        m = A.numel() // A.shape[-1]
        return AUTO_BNB_DECODE_MAX_M < m <= AUTO_LINEAR_MAX_M or (m <= AUTO_BNB_DECODE_MAX_M and _capturing(A))
    return e.decode == "tritonbits"


def _bnb_decodes(e: _Enabled, A: torch.Tensor, shapeB, blocksize: int) -> bool:
    """Whether bnb's own fused kernel runs this gemm_4bit: bnb would pick it, and the decode choice keeps it."""
    if A.device.type != "cuda" or not A.numel() or not _bnb_takes_fused_cuda(A, shapeB, blocksize):
        return False
    return not (_has_linear_4bit() and _linear_decodes(e, A))


def _bnb_takes_fused_cuda(A: torch.Tensor, shapeB, blocksize: int) -> bool:
    """bnb 0.50.2's own choice in its CUDA gemm_4bit between its fused kernel and dequantize + F.linear."""
    from bitsandbytes.backends.cuda import ops as cuda_ops

    K = A.shape[-1]
    M = A.numel() // K
    if cuda_ops._gemm_4bit_custom_max_m < M or K % blocksize != 0:
        return False
    return bool(cuda_ops._gemm_4bit_use_custom_fn(A.device.index, A.dtype, M, shapeB[0], K))


def _op_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
                  absmax_offset=None):  # fmt: skip
    return _gemm_4bit(_require_active(), A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                      absmax_offset)  # fmt: skip


def _gemm_4bit(e: _Enabled, A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
               absmax_offset):  # fmt: skip
    """bnb's gemm_4bit as served (the op's kernel, and Linear4bit.forward's shortcut to it)."""
    linear = A.device.type == "cuda" and _has_linear_4bit()
    # checked first, before anything else costs host time: where bnb's fused decode kernel stays (enable's
    # `decode`), it is called directly, as bnb's own gemm_4bit kernel does
    if _bnb_decodes(e, A, shapeB, blocksize):
        if linear and e.decode == "auto":
            _warm(e, A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
        return _bnb_fused(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
    if not _servable(A, B, shapeB, absmax, absmax_8bit, absmax_code, absmax_offset):
        return e.original("gemm_4bit", A.device)(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit,
                                                 absmax_code, absmax_offset)  # fmt: skip
    state = e.state(absmax, shapeB, A.dtype, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset)
    if linear and _linear_serves(e, A):
        if _ready(A, B, state, bias):
            return _linear(A, B, state, bias)
        if _bnb_takes_fused_cuda(A, shapeB, blocksize):  # captured, linear_4bit not ready: as an eager call
            return _bnb_fused(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                              absmax_offset)  # fmt: skip
    # bnb's own fallback (dequantize, then F.linear), with the nested dequantize in one launch: equal results
    return torch.nn.functional.linear(A, tritonbits.dequantize_4bit(_packed(B), state), bias)


def _servable(A, B, shapeB, absmax, absmax_8bit, absmax_code, absmax_offset) -> bool:
    """The arguments tritonbits takes for gemm_4bit (anything else goes to bnb's own kernel)."""
    return (A.numel() > 0 and A.dtype in formats.FLOAT_DTYPES and _packed_ok(B) and len(shapeB) == 2
            and absmax.dtype == torch.float32 and absmax.is_contiguous()
            and (absmax_8bit is None or (absmax_8bit.dtype == torch.uint8 and absmax_8bit.is_contiguous()
                                         and absmax_code is not None and absmax_offset is not None)))  # fmt: skip


def _op_gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    e = _require_active()
    if not (A.device.type == "cuda" and _has_linear_4bit() and A.dtype in formats.FLOAT_DTYPES and _packed_ok(B)
            and absmax.dtype == torch.float32 and absmax.is_contiguous() and len(shapeB) == 2 and A.numel()
            and _linear_serves(e, A)):  # fmt: skip
        return e.original("gemv_4bit", A.device)(A, B, shapeB, absmax, code, blocksize)
    quant_type = _quant_type_of(code)
    if quant_type is None:
        return e.original("gemv_4bit", A.device)(A, B, shapeB, absmax, code, blocksize)
    state = e.state(absmax, shapeB, A.dtype, blocksize, quant_type)
    if not _ready(A, B, state, None):  # captured, linear_4bit not ready: bnb's kernel (a one-row gemv)
        return e.original("gemv_4bit", A.device)(A, B, shapeB, absmax, code, blocksize)
    return _linear(A, B, state)


def _frozen(B: torch.Tensor) -> torch.Tensor:
    """The packed weight as a kernel below autograd gets it: bnb lets a float quant_storage weight require grad
    (its ops then run under the autograd fallback, grad flowing nowhere), where linear_4bit refuses such a weight
    (found on the H100, tests record 20261124T151619Z: the op served with linear_4bit raised, bnb's kernel ran)."""
    return B.detach() if B.requires_grad else B


def _op_gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out):
    e = _require_active()
    if not (A.device.type == "cuda" and _has_linear_4bit()):
        e.original("gemv_4bit.out", A.device)(A, B, shapeB, absmax, code, blocksize, out)
        return
    out.copy_(_op_gemv_4bit(A, B, shapeB, absmax, code, blocksize))


def _quant_type_of(code: torch.Tensor) -> str | None:
    """gemv_4bit gets the 16 code values, not the type's name: match them, a host read of 16 floats the first
    time a code tensor is seen (bnb 0.50.2 no longer calls gemv_4bit on CUDA from matmul_4bit, so this is off
    its hot path), remembered in _CODE_TYPES. Inside a CUDA-graph capture a host read is not allowed: a code
    tensor not matched before gives None there (bnb's kernel serves that call)."""
    cacheable = not code.is_inference()  # an inference tensor has no version counter: matched every call
    key = (code.data_ptr(), code.device, code.dtype, tuple(code.shape), code.stride())
    hit = _CODE_TYPES.get(key) if cacheable else None
    if hit is not None and hit[0]._version == hit[1] == code._version:
        return hit[2]
    if _capturing(code):
        return None
    values = code.detach().float().cpu()
    name = None
    for candidate in formats.QUANT_TYPES:
        if values.numel() == 16 and torch.equal(values, formats.code_values(candidate).float()):
            name = candidate
    if cacheable:
        if len(_CODE_TYPES) >= _CODE_TYPES_MAX:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # another thread may be evicting too
                del _CODE_TYPES[next(iter(_CODE_TYPES))]
        _CODE_TYPES[key] = (code.detach(), code._version, name)
    return name


# code tensors matched by _quant_type_of: (address, device, dtype, shape, strides) -> (the tensor, its version
# counter at the match, the type). The entry holds the tensor, so no other storage can take its address while it
# lives; an in-place change of the values bumps the version and the next call matches again (not a change made
# through `.data` or another alias with a counter of its own: not seen). FIFO, bounded.
_CODE_TYPES: dict[tuple, tuple[torch.Tensor, int, str | None]] = {}
_CODE_TYPES_MAX = 256


_OPS = {
    "dequantize_4bit": _op_dequantize_4bit,
    "dequantize_4bit.out": _op_dequantize_4bit_out,
    "quantize_4bit": _op_quantize_4bit,
    "quantize_blockwise": _op_quantize_blockwise,
    "dequantize_blockwise": _op_dequantize_blockwise,
    "dequantize_blockwise.out": _op_dequantize_blockwise_out,
    "gemm_4bit": _op_gemm_4bit,
    "gemv_4bit": _op_gemv_4bit,
    "gemv_4bit.out": _op_gemv_4bit_out,
}


# ---------------------------------------------------------------------------------------------------
# bitsandbytes.functional: the Python functions that launch more than one kernel in bnb.


def _state_ok(qs) -> bool:
    """Fields tritonbits validates the same way bnb does; anything else goes to bnb (and its errors)."""
    try:
        ok = (qs.blocksize in formats.BLOCKSIZES and qs.quant_type in formats.QUANT_TYPES
              and qs.dtype in formats.FLOAT_DTYPES and qs.shape is not None)  # fmt: skip
        s2 = getattr(qs, "state2", None)
        return bool(ok and (s2 is None or s2.blocksize in formats.BLOCKSIZES))
    except AttributeError:
        return False


def _functional_dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
    """bitsandbytes.functional.dequantize_4bit, one tritonbits launch (nested absmax in-kernel) where served."""
    e, orig = _active, _BNB_FUNCTIONAL["dequantize_4bit"]
    served = e is not None and isinstance(A, torch.Tensor) and e.served(A) and _packed_ok(A)
    if served and quant_state is not None:
        served = _state_ok(quant_state)
    elif served:
        served = absmax is not None and out is not None and (blocksize or 64) in formats.BLOCKSIZES
    if not served:
        return orig(A, quant_state, absmax, out, blocksize, quant_type)  # type: ignore[operator]
    return tritonbits.dequantize_4bit(A, quant_state, absmax, out, blocksize, quant_type)


def _functional_quantize_4bit(A, absmax=None, out=None, blocksize=None, compress_statistics=False,
                              quant_type="fp4", quant_storage=torch.uint8):  # fmt: skip
    """bitsandbytes.functional.quantize_4bit through tritonbits (one launch; nested: two and a mean), returning
    bnb's QuantState, where served: fp16/bf16 input, no deprecated absmax=/out= buffers."""
    e, orig = _active, _BNB_FUNCTIONAL["quantize_4bit"]
    bs = 64 if blocksize is None else blocksize
    size = torch.empty((), dtype=quant_storage).element_size() if isinstance(quant_storage, torch.dtype) else 0
    served = (e is not None and isinstance(A, torch.Tensor) and e.served(A) and A.dtype in _QUANTIZE_DTYPES
              and absmax is None and out is None and bs in formats.BLOCKSIZES and quant_type in formats.QUANT_TYPES
              and quant_storage in formats.PACKED_DTYPES and isinstance(compress_statistics, bool)
              and ((A.numel() + 1) // 2) % size == 0)  # fmt: skip
    if not served:
        return orig(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage)  # type: ignore[operator]
    assert e is not None
    packed, s = tritonbits.quantize_4bit(A, blocksize=bs, compress_statistics=compress_statistics,
                                         quant_type=quant_type, quant_storage=quant_storage)  # fmt: skip
    F = e.bnb.functional
    state2 = None
    if s.state2 is not None:
        state2 = F.QuantState(absmax=s.state2.absmax, code=s.state2.code, blocksize=s.state2.blocksize,
                              dtype=torch.float32)  # fmt: skip
    state = F.QuantState(absmax=s.absmax, shape=A.shape, dtype=A.dtype, blocksize=bs,
                         code=F.get_4bit_type(quant_type, device=A.device), quant_type=quant_type,
                         offset=s.offset.reshape(()) if s.offset is not None else None, state2=state2)  # fmt: skip
    return packed, state


_FUNCTIONAL = {"dequantize_4bit": _functional_dequantize_4bit, "quantize_4bit": _functional_quantize_4bit}
# bnb's own functions, captured at the first enable(): a reference to a wrapper kept past disable() calls them
_BNB_FUNCTIONAL: dict[str, object] = {}


# ---------------------------------------------------------------------------------------------------
# bitsandbytes.nn.Linear4bit.forward: the entry point of every transformers / PEFT 4-bit layer.


def _linear4bit_forward(self, x):
    """``Linear4bit.forward`` while enabled: where bnb's forward would reach ``gemm_4bit`` with nothing to cast
    (inference: no grad; x in the layer's compute dtype, as is the bias; no autocast), it calls the served
    ``gemm_4bit`` (``_gemm_4bit``) with bnb's own arguments, so the result is the op path's, bit for bit; everything
    else runs bnb's forward: training, a cast, a first call that sets the compute dtype, an empty x, bnb's [K, N]
    orientation or nested blocksize other than 256, a device not served, torch.compile, torch.jit tracing,
    functorch transforms (vmap, grad), autocast, tensor subclasses (x or the packed weight), dispatch modes, a
    weight that requires grad, and on the CPU any layer with bnb's AVX512-BF16 path on.

    NOTE: why: a decode step is host-bound and bnb's forward costs host time around its one kernel: it reads the
    ``Params4bit`` weight through its ``__torch_function__`` (1.3-2.6 us a read or a view, CPU timeit), casts,
    checks, views the weight and calls the op through the dispatcher's boxed Python kernel. Measured on the GPU
    in docs/integrations.md ("Linear4bit.forward")."""
    e = _active
    # is_compiling first: Dynamo then traces bnb's forward, never a query it cannot trace
    if (e is None or torch.compiler.is_compiling() or type(x) is not torch.Tensor or _functorch_active()
            or torch._C._len_torch_dispatch_stack() or torch.jit.is_tracing()):  # fmt: skip
        return _BNB_FORWARD["forward"](self, x)  # type: ignore[operator]
    bias, w = self.bias, self.weight
    device = x.device.type
    if ((torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)))
            or not self.compute_type_is_set or self.compute_dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype) or torch.is_autocast_enabled(device)):  # fmt: skip
        return _BNB_FORWARD["forward"](self, x)  # type: ignore[operator]
    qs = getattr(w, "quant_state", None)
    if (qs is None or ("gemm_4bit", _KEYS.get(device)) not in e.originals or not x.numel()
            or getattr(qs, "packing_format_for_cpu", False)
            or (device == "cpu" and getattr(self, "support_avx512bf16_for_cpu", False))):  # fmt: skip
        return _BNB_FORWARD["forward"](self, x)  # type: ignore[operator]
    shape, k = qs.shape, x.shape[-1]
    state2 = qs.state2 if qs.nested else None
    if (len(shape) != 2 or (k == shape[0] and k != shape[1])
            or (state2 is not None and state2.blocksize != formats.NESTED_BLOCKSIZE)):  # fmt: skip
        return _BNB_FORWARD["forward"](self, x)  # type: ignore[operator]  # bnb's warning or error
    with torch._C.DisableTorchFunctionSubclass():  # the plain tensor bnb's op receives (B.view(-1, 1))
        B = w.view(-1, 1)
    if type(B) is not torch.Tensor:  # a __torch_dispatch__ weight (a DTensor, say): bnb's op path handles it
        return _BNB_FORWARD["forward"](self, x)  # type: ignore[operator]
    if state2 is None:
        return _gemm_4bit(e, x, B, shape, qs.absmax, qs.blocksize, qs.quant_type, bias, None, None, None)
    return _gemm_4bit(e, x, B, shape, state2.absmax, qs.blocksize, qs.quant_type, bias, qs.absmax, state2.code,
                      qs.offset)  # fmt: skip


# whether a functorch transform (vmap, grad, jvp) is active; a torch without the query never takes the shortcut
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


# the Linear4bit.forward found at the last enable() (bnb's, or another library's patch of it): what ours hands
# calls on to, and what disable() puts back
_BNB_FORWARD: dict[str, object] = {}


# ---------------------------------------------------------------------------------------------------
# Public API


def _require_active() -> _Enabled:
    e = _active
    if e is None:  # a kernel of a destroyed fragment cannot run; this guards a stale reference
        raise RuntimeError("tritonbits.integrations.bitsandbytes is not enabled")
    return e


def _check_devices(devices) -> tuple[str, ...]:
    if isinstance(devices, str):
        devices = (devices,)
    if not isinstance(devices, (tuple, list)):
        raise TypeError(f"devices must be a device name or a sequence of them, got {type(devices).__name__}")
    devices = tuple(devices)
    bad = [d for d in devices if d not in DEVICES]
    if bad or not devices:
        raise ValueError(f"devices must be a non-empty subset of {DEVICES}, got {devices!r}")
    if "cpu" in devices and not _runtime.interpreting():
        raise ValueError("devices: 'cpu' is served only under the Triton interpreter (TRITON_INTERPRET=1 set "
                         "before importing tritonbits), where tritonbits runs on CPU tensors; it is a test mode, "
                         "not a fast path")  # fmt: skip
    return tuple(dict.fromkeys(devices))


def _check_decode(decode) -> str:
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {DECODE_CHOICES}, got {decode!r}")
    return decode


def enable(devices: Sequence[str] = ("cuda",), decode: str = "auto") -> None:
    """Serve bitsandbytes' 4-bit ops and ``bitsandbytes.functional.dequantize_4bit`` / ``quantize_4bit`` with
    tritonbits on ``devices`` ("cuda"; "cpu" only under the Triton interpreter). ``decode``: who runs the
    small-M products of ``gemm_4bit`` (and ``gemv_4bit``): "bnb" (its fused kernel where bnb would run it),
    "tritonbits" (``linear_4bit``, every M) or "auto" (the one measured faster at that M: bnb's kernel up to
    ``AUTO_BNB_DECODE_MAX_M`` rows outside CUDA-graph capture, ``linear_4bit`` up to ``AUTO_LINEAR_MAX_M``); every
    other product is tritonbits' dequantize + ``F.linear``.
    Idempotent: enabling again with the same arguments does nothing; with others, it re-enables with those.
    Raises ImportError when bitsandbytes is missing and RuntimeError when its version is outside the tested
    range."""
    global _active
    devices = _check_devices(devices)
    decode = _check_decode(decode)
    bnb = _import_bnb()
    with _lock:
        if _active is not None:
            if _active.devices == devices and _active.decode == decode:
                return
            _disable_locked()
        e = _Enabled(bnb, devices, decode)
        try:
            for op, fn in _OPS.items():
                e.register(op, fn)
            F = bnb.functional
            for name, fn in _FUNCTIONAL.items():
                current = getattr(F, name)
                if current is not fn:
                    _BNB_FUNCTIONAL.setdefault(name, current)
                e.functional[name] = _BNB_FUNCTIONAL[name]
                setattr(F, name, fn)
            cls = bnb.nn.Linear4bit
            if cls.forward is not _linear4bit_forward:  # bnb's, or another library's patch of it since
                _BNB_FORWARD["forward"] = cls.forward
            cls.forward = _linear4bit_forward
        except BaseException:
            _restore(e)
            raise
        _active = e


def _restore(e: _Enabled) -> None:
    F = e.bnb.functional
    for name, fn in e.functional.items():
        setattr(F, name, fn)
    cls = e.bnb.nn.Linear4bit
    if cls.forward is _linear4bit_forward:  # a patch installed over ours while enabled stays
        cls.forward = _BNB_FORWARD["forward"]
    e.lib._destroy()


def _disable_locked() -> None:
    global _active
    e, _active = _active, None
    if e is not None:
        _restore(e)


def disable() -> None:
    """Give bitsandbytes its own kernels and functions back. Idempotent (a no-op when not enabled)."""
    with _lock:
        _disable_locked()


def is_enabled() -> bool:
    return _active is not None


def served_devices() -> tuple[str, ...]:
    """The devices tritonbits serves now (empty when disabled)."""
    e = _active
    return () if e is None else e.devices


@contextlib.contextmanager
def enabled(devices: Sequence[str] = ("cuda",), decode: str = "auto") -> Iterator[None]:
    """``with enabled(): ...``: tritonbits serves bnb inside the block; on exit the state before it comes back
    (disabled, or enabled with the devices and decode choice it had)."""
    e = _active
    before = None if e is None else (e.devices, e.decode)
    enable(devices, decode)
    try:
        yield
    finally:
        if before:
            enable(*before)
        else:
            disable()


__all__ = [
    "AUTO_BNB_DECODE_MAX_M",
    "AUTO_LINEAR_MAX_M",
    "DECODE_CHOICES",
    "TESTED_RANGE",
    "disable",
    "enable",
    "enabled",
    "is_enabled",
    "served_devices",
]
