"""Every public op as data for the reliability tests: a small valid call with fresh inputs per variant, the
tensors it returns, and its bad-input table (each invalid argument, the exception type, the argument name its
message must contain).

Adding an op is one `OpCase` in `CASES`: the bad-input table (packages/kernels/tests/test_bad_inputs.py), the
stream, CUDA-graph, thread and device tests (test_reliability_gpu.py) and the sanitizer session pick it up.
A call is a dict of keyword arguments (every public op takes its arguments by name); a bad row edits that dict
or the objects in it IN PLACE (a quant state's field reassigned on the same object, as users do), so that a
row run after a good call primed an op's caches exercises the cached path with the same bad input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import tritonbits

Call = dict[str, Any]


@dataclass(frozen=True)
class Bad:
    """One invalid argument: `edit` makes the call invalid in place; the op must raise `exc` (not a subclass
    of another row's type: exactly this type or a subclass of it) with `name` in its message, before any
    kernel launch. `when(variant)` limits the row to the variants it applies to."""

    id: str
    edit: Callable[[Call, torch.device], Any]
    exc: type[Exception]
    name: str
    when: Callable[[dict], bool] = lambda variant: True


@dataclass(frozen=True)
class OpCase:
    name: str
    fn: Callable
    make: Callable[..., Call]  # make(device, gen, dtype, **variant) -> a valid call with fresh inputs
    outputs: Callable[[Any], tuple[torch.Tensor, ...]]  # the tensors a result holds
    variants: dict[str, dict] = field(default_factory=dict)
    bad: tuple[Bad, ...] = ()


# --- helpers --------------------------------------------------------------------------------------------


def elsewhere(device: torch.device) -> torch.device:
    """A device no argument of this run may be on: cpu in a GPU session, meta under the interpreter."""
    return torch.device("cpu") if device.type == "cuda" else torch.device("meta")


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a non-contiguous view (every other element of a buffer twice as wide)."""
    buf = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    view = buf[..., ::2]
    view.copy_(t)
    return view


def overlapping(t: torch.Tensor, shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t's values moved into a new buffer, a tensor of `shape`/`dtype` in the same buffer 16 bytes further
    on): the second overlaps the first whenever t holds more than 16 bytes."""
    n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    t_bytes = t.numel() * t.element_size()
    buf = torch.zeros(32 + max(t_bytes, n), dtype=torch.uint8, device=t.device)
    moved = buf[:t_bytes].view(t.dtype).view(t.shape)
    moved.copy_(t)
    return moved, buf[16 : 16 + n].view(dtype).view(shape)


def _overlap(inp: str, out: str, shape: Callable[[Call], Any], dtype: Callable[[Call], torch.dtype]):
    """Make kw[out] overlap kw[inp] in memory (kw[inp] keeps its values, moved into the shared buffer)."""

    def edit(kw: Call, device: torch.device) -> None:
        kw[inp], kw[out] = overlapping(kw[inp], shape(kw), dtype(kw))

    return edit


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor of a call or result, in a fixed order (quant states' fields included)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in tensors(x)]
    if hasattr(obj, "absmax"):  # a quant state (bnb's or tritonbits')
        found = [f for f in ("absmax", "code", "offset") if isinstance(getattr(obj, f, None), torch.Tensor)]
        out = [getattr(obj, f) for f in found]
        s2 = getattr(obj, "state2", None)
        return out + (tensors(s2) if s2 is not None else [])
    return []


def _set(key: str, value: Callable[[Call, torch.device], Any]):
    def edit(kw: Call, device: torch.device) -> None:
        kw[key] = value(kw, device)

    return edit


def _pop(key: str):
    return lambda kw, device: kw.pop(key, None)


def _state(path: str, value: Callable[[Call, torch.device], Any]):
    """Reassign quant_state.<path> (e.g. "state2.absmax") on the very object the call holds."""

    def edit(kw: Call, device: torch.device) -> None:
        obj = kw["quant_state"]
        *parents, last = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value(kw, device))

    return edit


def _qs(kw: Call, path: str):
    obj = kw["quant_state"]
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


def _nested(v: dict) -> bool:
    return bool(v.get("nested"))


def _plain(v: dict) -> bool:
    return not v.get("nested")


def _with_out(v: dict) -> bool:
    return bool(v.get("out"))


# --- dequantize_4bit ------------------------------------------------------------------------------------

SHAPE_4BIT = (33, 70)  # 2310 values: a tail block for every blocksize, an even count


def make_dequantize_4bit(
    device, gen, dtype, *, quant_type="nf4", blocksize=64, nested=True, out=False, shape=SHAPE_4BIT, tb_state=False
) -> Call:
    """A bnb QuantState (the object users pass) of a fresh weight, quantized by the oracle; `tb_state`: the same
    fields in a tritonbits QuantState (which QuantState.from_any returns as it is, not read field by field)."""
    import tritonbits_reference as R
    from tritonbits_reference.bnb import to_bnb_quant_state

    w = (torch.randn(shape, generator=gen) * 3).to(dtype)
    q, state = R.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    quant_state: Any = to_bnb_quant_state(state, device)
    if tb_state:
        quant_state = tritonbits.QuantState.from_any(quant_state)
    call: Call = {"A": q.to(device), "quant_state": quant_state}
    if out:
        call["out"] = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return call


def _zero_d_A(kw: Call, device) -> None:
    """A 0-d packed tensor (one byte for two values) with a plain state that matches it in size."""
    kw["A"] = kw["A"].reshape(-1)[0].clone()
    dtype = kw["quant_state"].dtype
    kw["quant_state"] = tritonbits.QuantState(
        absmax=torch.ones(1, device=device), shape=torch.Size([2]), dtype=dtype, blocksize=64, quant_type="nf4"
    )
    kw.pop("out", None)


def _row_A_3d_shape(kw: Call, device) -> None:
    """A in bnb's transposed [1, n/2] layout (its result is transposed back) with a 3-D shape of the same numel."""
    kw["A"] = kw["A"].reshape(1, -1)
    kw["quant_state"].shape = (3, 11, 70)  # SHAPE_4BIT's 2310 values
    kw.pop("out", None)


def _out_over_A(kw: Call, device) -> None:
    qs = kw["quant_state"]
    kw["A"], kw["out"] = overlapping(kw["A"], qs.shape, qs.dtype)


class _NoFields:
    absmax = None  # has some of bnb's fields, not all


DEQUANTIZE_4BIT_BAD = (
    Bad("A-list", _set("A", lambda kw, d: kw["A"].tolist()), TypeError, "A"),
    Bad("A-int64", _set("A", lambda kw, d: kw["A"].to(torch.int64)), TypeError, "A"),
    Bad("A-short", _set("A", lambda kw, d: kw["A"][:-1]), ValueError, "A"),
    Bad("A-long", _set("A", lambda kw, d: torch.cat([kw["A"], kw["A"][:1]])), ValueError, "A"),
    Bad("A-strided", _set("A", lambda kw, d: strided(kw["A"])), ValueError, "A"),
    Bad("A-device", _set("A", lambda kw, d: kw["A"].to(elsewhere(d))), ValueError, "A"),
    Bad("A-0d", _zero_d_A, ValueError, "A"),
    Bad("A-row-with-3d-shape", _row_A_3d_shape, ValueError, "A"),
    Bad("quant_state-missing", _pop("quant_state"), ValueError, "quant_state"),
    Bad("quant_state-dict", _set("quant_state", lambda kw, d: {"absmax": _qs(kw, "absmax")}), TypeError, "quant_state"),
    Bad("quant_state-no-fields", _set("quant_state", lambda kw, d: _NoFields()), TypeError, "quant_state"),
    Bad("blocksize-7", _state("blocksize", lambda kw, d: 7), ValueError, "quant_state.blocksize"),
    Bad("blocksize-8192", _state("blocksize", lambda kw, d: 8192), ValueError, "quant_state.blocksize"),
    Bad("blocksize-None", _state("blocksize", lambda kw, d: None), TypeError, "quant_state.blocksize"),
    # its own value as a float: equal to the cached int, but refused by a fresh check (and a crash in the kernel)
    Bad(
        "blocksize-float",
        _state("blocksize", lambda kw, d: float(_qs(kw, "blocksize"))),
        TypeError,
        "quant_state.blocksize",
    ),
    Bad("quant_type", _state("quant_type", lambda kw, d: "int4"), ValueError, "quant_state.quant_type"),
    Bad("dtype-int8", _state("dtype", lambda kw, d: torch.int8), TypeError, "quant_state.dtype"),
    Bad("dtype-str", _state("dtype", lambda kw, d: "bfloat16"), TypeError, "quant_state.dtype"),
    Bad("shape-larger", _state("shape", lambda kw, d: torch.Size([34, 70])), ValueError, "quant_state.shape"),
    Bad("shape-str", _state("shape", lambda kw, d: "33x70"), TypeError, "quant_state.shape"),
    Bad("shape-negative", _state("shape", lambda kw, d: (-33, -70)), TypeError, "quant_state.shape"),
    Bad("shape-None", _state("shape", lambda kw, d: None), TypeError, "quant_state.shape"),
    Bad(
        "shape-float-dims",
        _state("shape", lambda kw, d: tuple(float(n) for n in _qs(kw, "shape"))),
        TypeError,
        "quant_state.shape",
    ),
    Bad("absmax-f16", _state("absmax", lambda kw, d: _qs(kw, "absmax").half()), TypeError, "quant_state.absmax"),
    Bad("absmax-short", _state("absmax", lambda kw, d: _qs(kw, "absmax")[:-1]), ValueError, "quant_state.absmax"),
    Bad("absmax-strided", _state("absmax", lambda kw, d: strided(_qs(kw, "absmax"))), ValueError, "quant_state.absmax"),
    Bad("absmax-list", _state("absmax", lambda kw, d: _qs(kw, "absmax").tolist()), TypeError, "quant_state.absmax"),
    Bad(
        "absmax-device",
        _state("absmax", lambda kw, d: _qs(kw, "absmax").to(elsewhere(d))),
        ValueError,
        "quant_state.absmax",
    ),
    Bad(
        "absmax-f32-nested",
        _state("absmax", lambda kw, d: _qs(kw, "absmax").float()),
        TypeError,
        "quant_state.absmax",
        _nested,
    ),
    Bad(
        "state2.absmax-f16",
        _state("state2.absmax", lambda kw, d: _qs(kw, "state2.absmax").half()),
        TypeError,
        "quant_state.state2.absmax",
        _nested,
    ),
    Bad(
        "state2.absmax-long",
        _state("state2.absmax", lambda kw, d: _qs(kw, "state2.absmax").repeat(2)),
        ValueError,
        "quant_state.state2.absmax",
        _nested,
    ),
    Bad(
        "state2.code-255",
        _state("state2.code", lambda kw, d: _qs(kw, "state2.code")[:255]),
        ValueError,
        "quant_state.state2.code",
        _nested,
    ),
    Bad(
        "state2.code-f64",
        _state("state2.code", lambda kw, d: _qs(kw, "state2.code").double()),
        TypeError,
        "quant_state.state2.code",
        _nested,
    ),
    Bad(
        "state2.blocksize",
        _state("state2.blocksize", lambda kw, d: 3),
        ValueError,
        "quant_state.state2.blocksize",
        _nested,
    ),
    Bad(
        "state2.blocksize-float",
        _state("state2.blocksize", lambda kw, d: float(_qs(kw, "state2.blocksize"))),
        TypeError,
        "quant_state.state2.blocksize",
        _nested,
    ),
    Bad("offset-None", _state("offset", lambda kw, d: None), ValueError, "quant_state.offset", _nested),
    Bad("state2-no-fields", _state("state2", lambda kw, d: _NoFields()), TypeError, "quant_state.state2", _nested),
    Bad(
        "offset-f64",
        _state("offset", lambda kw, d: _qs(kw, "offset").double()),
        TypeError,
        "quant_state.offset",
        _nested,
    ),
    Bad(
        "offset-2",
        _state("offset", lambda kw, d: _qs(kw, "offset").reshape(1).repeat(2)),
        ValueError,
        "quant_state.offset",
        _nested,
    ),
    Bad(
        "offset-device",
        _state("offset", lambda kw, d: _qs(kw, "offset").to(elsewhere(d))),
        ValueError,
        "quant_state.offset",
        _nested,
    ),
    Bad(
        "out-dtype",
        _set("out", lambda kw, d: torch.empty(_qs(kw, "shape"), dtype=torch.float64, device=d)),
        TypeError,
        "out",
    ),
    Bad(
        "out-shape",
        _set("out", lambda kw, d: torch.empty(tuple(_qs(kw, "shape"))[::-1], dtype=_qs(kw, "dtype"), device=d)),
        ValueError,
        "out",
    ),
    Bad(
        "out-strided",
        _set("out", lambda kw, d: strided(torch.empty(_qs(kw, "shape"), dtype=_qs(kw, "dtype"), device=d))),
        ValueError,
        "out",
    ),
    Bad("out-list", _set("out", lambda kw, d: [0.0]), TypeError, "out"),
    Bad(
        "out-requires-grad",
        _set("out", lambda kw, d: torch.empty(_qs(kw, "shape"), dtype=_qs(kw, "dtype"), device=d, requires_grad=True)),
        ValueError,
        "out",
    ),
    Bad(
        "out-device",
        _set("out", lambda kw, d: torch.empty(_qs(kw, "shape"), dtype=_qs(kw, "dtype"), device=elsewhere(d))),
        ValueError,
        "out",
    ),
    Bad("out-overlaps-A", _out_over_A, ValueError, "out"),
)


# --- dequant_bias ---------------------------------------------------------------------------------------

SHAPE_EPILOGUE = (37, 70)


def make_dequant_bias(device, gen, dtype, *, acc_dtype=torch.int32, bias=True, out=False, shape=SHAPE_EPILOGUE) -> Call:
    m, n = shape
    if acc_dtype == torch.int32:
        acc = torch.randint(-(2**20), 2**20, shape, generator=gen, dtype=torch.int32)
    else:
        acc = (torch.randn(shape, generator=gen) * 30).to(acc_dtype)
    call: Call = {
        "acc": acc.to(device),
        "scale_a": ((torch.rand(m, 1, generator=gen) + 0.5) * 1e-3).to(device),
        "scale_b": (torch.rand(1, n, generator=gen) + 0.5).to(device),
        "bias": torch.randn(n, generator=gen).to(device) if bias else None,
        "out_dtype": dtype,
    }
    if out:
        call["out"] = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return call


def _empty_out(kw: Call, device, *, shape=None, dtype=None, **kwargs) -> torch.Tensor:
    return torch.empty(shape or tuple(kw["acc"].shape), dtype=dtype or kw["out_dtype"], device=device, **kwargs)


def _bias(kw: Call) -> torch.Tensor:
    """The call's bias, or a valid one where the variant has none."""
    return kw["bias"] if kw["bias"] is not None else torch.ones(kw["acc"].shape[1], device=kw["acc"].device)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


DEQUANT_BIAS_BAD = (
    Bad("acc-list", _set("acc", lambda kw, d: kw["acc"].tolist()), TypeError, "acc"),
    Bad("acc-int8", _set("acc", lambda kw, d: kw["acc"].to(torch.int8)), TypeError, "acc"),
    Bad("acc-3d", _set("acc", lambda kw, d: kw["acc"].unsqueeze(0)), ValueError, "acc"),
    Bad("acc-column-major", _set("acc", lambda kw, d: _column_major(kw["acc"])), ValueError, "acc"),
    Bad("acc-device", _set("acc", lambda kw, d: kw["acc"].to(elsewhere(d))), ValueError, "acc"),
    Bad("acc-requires-grad", _set("acc", lambda kw, d: kw["acc"].float().requires_grad_()), ValueError, "acc"),
    Bad("scale_a-int32", _set("scale_a", lambda kw, d: kw["scale_a"].to(torch.int32)), TypeError, "scale_a"),
    Bad(
        "scale_a-long",
        _set("scale_a", lambda kw, d: torch.cat([kw["scale_a"], kw["scale_a"][:1]])),
        ValueError,
        "scale_a",
    ),
    Bad("scale_a-row", _set("scale_a", lambda kw, d: kw["scale_a"].reshape(1, -1)), ValueError, "scale_a"),
    Bad("scale_a-list", _set("scale_a", lambda kw, d: kw["scale_a"].tolist()), TypeError, "scale_a"),
    Bad("scale_a-device", _set("scale_a", lambda kw, d: kw["scale_a"].to(elsewhere(d))), ValueError, "scale_a"),
    Bad("scale_b-int32", _set("scale_b", lambda kw, d: kw["scale_b"].to(torch.int32)), TypeError, "scale_b"),
    Bad("scale_b-column", _set("scale_b", lambda kw, d: kw["scale_b"].reshape(-1, 1)), ValueError, "scale_b"),
    Bad("scale_b-short", _set("scale_b", lambda kw, d: kw["scale_b"][:, :-1]), ValueError, "scale_b"),
    Bad("scale_b-device", _set("scale_b", lambda kw, d: kw["scale_b"].to(elsewhere(d))), ValueError, "scale_b"),
    Bad("bias-long", _set("bias", lambda kw, d: torch.cat([_bias(kw), _bias(kw)[:1]])), ValueError, "bias"),
    Bad("bias-scalar", _set("bias", lambda kw, d: _bias(kw)[:1]), ValueError, "bias"),
    Bad("bias-int", _set("bias", lambda kw, d: _bias(kw).to(torch.int32)), TypeError, "bias"),
    Bad("bias-device", _set("bias", lambda kw, d: _bias(kw).to(elsewhere(d))), ValueError, "bias"),
    Bad("out_dtype-int8", _set("out_dtype", lambda kw, d: torch.int8), TypeError, "out_dtype"),
    Bad("out_dtype-str", _set("out_dtype", lambda kw, d: "bfloat16"), TypeError, "out_dtype"),
    Bad("out-dtype-mismatch", _set("out", lambda kw, d: _empty_out(kw, d, dtype=torch.float64)), TypeError, "out"),
    Bad(
        "out-shape", _set("out", lambda kw, d: _empty_out(kw, d, shape=tuple(kw["acc"].shape)[::-1])), ValueError, "out"
    ),
    Bad("out-list", _set("out", lambda kw, d: [0.0]), TypeError, "out"),
    Bad("out-column-major", _set("out", lambda kw, d: _column_major(_empty_out(kw, d))), ValueError, "out"),
    Bad(
        "out-expanded",
        _set("out", lambda kw, d: _empty_out(kw, d, shape=(1, kw["acc"].shape[1])).expand(kw["acc"].shape)),
        ValueError,
        "out",
    ),
    Bad("out-requires-grad", _set("out", lambda kw, d: _empty_out(kw, d, requires_grad=True)), ValueError, "out"),
    Bad("out-device", _set("out", lambda kw, d: _empty_out(kw, elsewhere(d))), ValueError, "out"),
    Bad(
        "out-overlaps-scale_b",
        _overlap("scale_b", "out", lambda kw: kw["acc"].shape, lambda kw: kw["out_dtype"]),
        ValueError,
        "out",
    ),
)


# --- quantize_4bit --------------------------------------------------------------------------------------


def make_quantize_4bit(
    device,
    gen,
    dtype,
    *,
    quant_type="nf4",
    blocksize=64,
    nested=True,
    out=False,
    quant_storage=torch.uint8,
    shape=SHAPE_4BIT,
) -> Call:
    A = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    call: Call = {
        "A": A,
        "blocksize": blocksize,
        "quant_type": quant_type,
        "compress_statistics": nested,
        "quant_storage": quant_storage,
    }
    if out:
        n = A.numel()
        size = torch.empty((), dtype=quant_storage).element_size()
        call["out"] = torch.full((-(-((n + 1) // 2) // size), 1), 77, dtype=torch.uint8, device=device)
        call["out"] = (
            call["out"] if quant_storage == torch.uint8 else torch.empty_like(call["out"], dtype=quant_storage)
        )
        call["absmax"] = torch.full(
            (-(-n // blocksize),),
            77 if nested else float("nan"),
            dtype=torch.uint8 if nested else torch.float32,
            device=device,
        )
    return call


def quantize_outputs(result) -> tuple[torch.Tensor, ...]:
    packed, state = result
    outs = [packed, state.absmax]
    if state.state2 is not None:
        outs += [state.state2.absmax, state.offset]
    return tuple(outs)


def _packed_len(kw: Call) -> int:
    n = kw["A"].numel()
    size = torch.empty((), dtype=kw.get("quant_storage", torch.uint8)).element_size()
    return -(-((n + 1) // 2) // size)


def _blocks(kw: Call) -> int:
    return -(-kw["A"].numel() // kw.get("blocksize", 64))


def _q4_out(kw: Call, device, *, n=None, dtype=None) -> torch.Tensor:
    return torch.empty((n if n is not None else _packed_len(kw), 1), dtype=dtype or kw["quant_storage"], device=device)


def _absmax_dtype(kw: Call) -> torch.dtype:
    return torch.uint8 if kw.get("compress_statistics", kw.get("nested")) else torch.float32


def _absmax_over_out(kw: Call, device) -> None:
    kw["out"] = _q4_out(kw, device)
    kw["out"], kw["absmax"] = overlapping(kw["out"], (_blocks(kw),), _absmax_dtype(kw))


QUANTIZE_4BIT_BAD = (
    Bad("A-list", _set("A", lambda kw, d: kw["A"].tolist()), TypeError, "A"),
    Bad("A-int32", _set("A", lambda kw, d: kw["A"].to(torch.int32)), TypeError, "A"),
    Bad("A-device", _set("A", lambda kw, d: kw["A"].to(elsewhere(d))), ValueError, "A"),
    Bad("blocksize-7", _set("blocksize", lambda kw, d: 7), ValueError, "blocksize"),
    Bad("blocksize-True", _set("blocksize", lambda kw, d: True), ValueError, "blocksize"),
    Bad("blocksize-float", _set("blocksize", lambda kw, d: 64.0), ValueError, "blocksize"),
    Bad("quant_type", _set("quant_type", lambda kw, d: "int4"), ValueError, "quant_type"),
    Bad("compress_statistics-int", _set("compress_statistics", lambda kw, d: 1), TypeError, "compress_statistics"),
    Bad("quant_storage-int64", _set("quant_storage", lambda kw, d: torch.int64), TypeError, "quant_storage"),
    Bad("quant_storage-str", _set("quant_storage", lambda kw, d: "uint8"), TypeError, "quant_storage"),
    Bad("out-dtype", _set("out", lambda kw, d: _q4_out(kw, d, dtype=torch.int16)), TypeError, "out"),
    Bad("out-short", _set("out", lambda kw, d: _q4_out(kw, d, n=_packed_len(kw) - 1)), ValueError, "out"),
    Bad("out-strided", _set("out", lambda kw, d: strided(_q4_out(kw, d).reshape(-1))), ValueError, "out"),
    Bad("out-list", _set("out", lambda kw, d: [0]), TypeError, "out"),
    Bad("out-device", _set("out", lambda kw, d: _q4_out(kw, elsewhere(d))), ValueError, "out"),
    Bad(
        "out-overlaps-A",
        _overlap("A", "out", lambda kw: (_packed_len(kw), 1), lambda kw: kw["quant_storage"]),
        ValueError,
        "out",
    ),
    Bad(
        "absmax-f16",
        _set("absmax", lambda kw, d: torch.empty(_blocks(kw), dtype=torch.float16, device=d)),
        TypeError,
        "absmax",
    ),
    Bad(
        "absmax-wrong-kind",
        _set(
            "absmax",
            lambda kw, d: torch.empty(
                _blocks(kw), device=d, dtype=torch.uint8 if _absmax_dtype(kw) == torch.float32 else torch.float32
            ),
        ),
        TypeError,
        "absmax",
    ),
    Bad(
        "absmax-short",
        _set("absmax", lambda kw, d: torch.empty(_blocks(kw) - 1, dtype=_absmax_dtype(kw), device=d)),
        ValueError,
        "absmax",
    ),
    Bad("absmax-overlaps-out", _absmax_over_out, ValueError, "absmax"),
)


# --- quantize_blockwise / dequantize_blockwise -----------------------------------------------------------

SHAPE_8BIT = (33, 70)


def make_quantize_blockwise(device, gen, dtype, *, blocksize=256, nested=False, out=False, shape=SHAPE_8BIT) -> Call:
    A = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    call: Call = {"A": A, "blocksize": blocksize, "nested": nested}
    if out:
        call["out"] = torch.full(shape, 77, dtype=torch.uint8, device=device)
        call["absmax"] = torch.full(
            (-(-A.numel() // blocksize),),
            77 if nested else float("nan"),
            dtype=torch.uint8 if nested else torch.float32,
            device=device,
        )
    return call


def _q8_absmax(kw: Call, device, *, n=None, dtype=None) -> torch.Tensor:
    return torch.empty(n if n is not None else _blocks(kw), dtype=dtype or _absmax_dtype(kw), device=device)


QUANTIZE_BLOCKWISE_BAD = (
    Bad("A-list", _set("A", lambda kw, d: kw["A"].tolist()), TypeError, "A"),
    Bad("A-int32", _set("A", lambda kw, d: kw["A"].to(torch.int32)), TypeError, "A"),
    Bad("A-device", _set("A", lambda kw, d: kw["A"].to(elsewhere(d))), ValueError, "A"),
    Bad("blocksize-32", _set("blocksize", lambda kw, d: 32), ValueError, "blocksize"),
    Bad("blocksize-None", _set("blocksize", lambda kw, d: None), ValueError, "blocksize"),
    Bad("nested-int", _set("nested", lambda kw, d: 1), TypeError, "nested"),
    Bad("code-f16", _set("code", lambda kw, d: tritonbits.formats.dynamic_code().half().to(d)), TypeError, "code"),
    Bad("code-255", _set("code", lambda kw, d: tritonbits.formats.dynamic_code()[:255].to(d)), ValueError, "code"),
    Bad("code-list", _set("code", lambda kw, d: tritonbits.formats.dynamic_code().tolist()), TypeError, "code"),
    Bad(
        "code-device",
        _set("code", lambda kw, d: tritonbits.formats.dynamic_code().to(elsewhere(d))),
        ValueError,
        "code",
    ),
    Bad(
        "out-dtype", _set("out", lambda kw, d: torch.empty(kw["A"].shape, dtype=torch.int8, device=d)), TypeError, "out"
    ),
    Bad(
        "out-short",
        _set("out", lambda kw, d: torch.empty(kw["A"].numel() - 1, dtype=torch.uint8, device=d)),
        ValueError,
        "out",
    ),
    Bad(
        "out-strided",
        _set("out", lambda kw, d: strided(torch.empty(kw["A"].shape, dtype=torch.uint8, device=d))),
        ValueError,
        "out",
    ),
    Bad("out-overlaps-A", _overlap("A", "out", lambda kw: kw["A"].shape, lambda kw: torch.uint8), ValueError, "out"),
    Bad(
        "out-device",
        _set("out", lambda kw, d: torch.empty(kw["A"].shape, dtype=torch.uint8, device=elsewhere(d))),
        ValueError,
        "out",
    ),
    Bad("absmax-f16", _set("absmax", lambda kw, d: _q8_absmax(kw, d, dtype=torch.float16)), TypeError, "absmax"),
    Bad("absmax-short", _set("absmax", lambda kw, d: _q8_absmax(kw, d, n=_blocks(kw) - 1)), ValueError, "absmax"),
    Bad("absmax-overlaps-A", _overlap("A", "absmax", lambda kw: (_blocks(kw),), _absmax_dtype), ValueError, "absmax"),
)


def make_dequantize_blockwise(
    device, gen, dtype, *, blocksize=256, nested=False, form="state", out=False, shape=SHAPE_8BIT
) -> Call:
    """A quantize_blockwise result: its QuantState (form="state") or bnb's absmax/code/blocksize form."""
    import tritonbits_reference as R

    A = (torch.randn(shape, generator=gen) * 3).to(dtype)
    q, s = R.quantize_blockwise_cuda(A, blocksize=blocksize, nested=nested)
    call: Call = {"A": q.to(device)}
    if form == "state":
        state = tritonbits.QuantState(
            absmax=s["absmax"].to(device),
            shape=A.shape,
            dtype=dtype,
            blocksize=blocksize,
            quant_type=None,  # type: ignore[arg-type]  # bnb's 8-bit states carry None here
            code=s["code"].to(device),
        )
        if nested:
            state.offset = s["offset"].to(device)
            state.state2 = tritonbits.quant_state.NestedState(
                absmax=s["absmax2"].to(device), code=s["code2"].to(device), blocksize=blocksize
            )
        call["quant_state"] = state
        out_dtype = dtype
    else:
        call.update(absmax=s["absmax"].to(device), code=s["code"].to(device), blocksize=blocksize)
        out_dtype = torch.float32
    if out:
        call["out"] = torch.full(shape, float("nan"), dtype=out_dtype, device=device)
    return call


def _state_form(v: dict) -> bool:
    return v.get("form", "state") == "state"


def _absmax_form(v: dict) -> bool:
    return v.get("form") == "absmax"


def _dq8_dtype(kw: Call) -> torch.dtype:
    return kw["quant_state"].dtype if "quant_state" in kw else torch.float32


def _dq8_out_over_A(kw: Call, device) -> None:
    kw["A"], kw["out"] = overlapping(kw["A"], kw["A"].shape, _dq8_dtype(kw))


DEQUANTIZE_BLOCKWISE_BAD = (
    Bad(
        "no-state-no-absmax",
        lambda kw, d: (kw.pop("quant_state", None), kw.pop("absmax", None)),
        ValueError,
        "quant_state",
    ),
    Bad("A-list", _set("A", lambda kw, d: kw["A"].tolist()), TypeError, "A"),
    Bad("A-float", _set("A", lambda kw, d: kw["A"].float()), TypeError, "A"),
    Bad("A-device", _set("A", lambda kw, d: kw["A"].to(elsewhere(d))), ValueError, "A"),
    Bad(
        "A-long",
        _set("A", lambda kw, d: torch.cat([kw["A"].reshape(-1), kw["A"].reshape(-1)])),
        ValueError,
        "absmax",
        lambda v: not v.get("out"),
    ),
    Bad("quant_state-no-fields", _set("quant_state", lambda kw, d: _NoFields()), TypeError, "quant_state", _state_form),
    Bad(
        "quant_state.code-255",
        _state("code", lambda kw, d: _qs(kw, "code")[:255]),
        ValueError,
        "quant_state.code",
        _state_form,
    ),
    Bad("quant_state.code-None", _state("code", lambda kw, d: None), TypeError, "quant_state.code", _state_form),
    Bad("quant_state.dtype", _state("dtype", lambda kw, d: torch.int8), TypeError, "quant_state.dtype", _state_form),
    Bad("quant_state.blocksize", _state("blocksize", lambda kw, d: 7), ValueError, "blocksize", _state_form),
    Bad(
        "quant_state.absmax-f16",
        _state("absmax", lambda kw, d: _qs(kw, "absmax").half()),
        TypeError,
        "quant_state.absmax",
        _state_form,
    ),
    Bad(
        "quant_state.absmax-short",
        _state("absmax", lambda kw, d: _qs(kw, "absmax")[:-1]),
        ValueError,
        "quant_state.absmax",
        _state_form,
    ),
    Bad(
        "quant_state.offset-None",
        _state("offset", lambda kw, d: None),
        TypeError,
        "quant_state.offset",
        lambda v: _state_form(v) and _nested(v),
    ),
    Bad(
        "quant_state.state2.absmax-long",
        _state("state2.absmax", lambda kw, d: _qs(kw, "state2.absmax").repeat(2)),
        ValueError,
        "quant_state.state2.absmax",
        lambda v: _state_form(v) and _nested(v),
    ),
    Bad(
        "quant_state.state2.blocksize-64.5",
        _state("state2.blocksize", lambda kw, d: _qs(kw, "state2.blocksize") + 0.5),
        TypeError,
        "quant_state.state2.blocksize",
        lambda v: _state_form(v) and _nested(v),
    ),
    Bad(
        "quant_state.state2.blocksize-None",
        _state("state2.blocksize", lambda kw, d: None),
        TypeError,
        "quant_state.state2.blocksize",
        lambda v: _state_form(v) and _nested(v),
    ),
    Bad(
        "quant_state.state2-no-fields",
        _state("state2", lambda kw, d: _NoFields()),
        TypeError,
        "quant_state.state2",
        lambda v: _state_form(v) and _nested(v),
    ),
    Bad("absmax-f16", _set("absmax", lambda kw, d: kw["absmax"].half()), TypeError, "absmax", _absmax_form),
    Bad("absmax-short", _set("absmax", lambda kw, d: kw["absmax"][:-1]), ValueError, "absmax", _absmax_form),
    Bad("code-255", _set("code", lambda kw, d: kw["code"][:255]), ValueError, "code", _absmax_form),
    Bad("blocksize-7", _set("blocksize", lambda kw, d: 7), ValueError, "blocksize", _absmax_form),
    Bad(
        "out-dtype",
        _set("out", lambda kw, d: torch.empty(kw["A"].shape, dtype=torch.float64, device=d)),
        TypeError,
        "out",
    ),
    Bad(
        "out-shape",
        _set("out", lambda kw, d: torch.empty(kw["A"].shape[::-1], dtype=_dq8_dtype(kw), device=d)),
        ValueError,
        "out",
    ),
    Bad(
        "out-requires-grad",
        _set("out", lambda kw, d: torch.empty(kw["A"].shape, dtype=_dq8_dtype(kw), device=d, requires_grad=True)),
        ValueError,
        "out",
    ),
    Bad(
        "out-device",
        _set("out", lambda kw, d: torch.empty(kw["A"].shape, dtype=_dq8_dtype(kw), device=elsewhere(d))),
        ValueError,
        "out",
    ),
    Bad("out-overlaps-A", _dq8_out_over_A, ValueError, "out"),
)


# --- the registry -----------------------------------------------------------------------------------------

# --- linear_4bit ----------------------------------------------------------------------------------------

SHAPE_LINEAR = (3, 128, 48)  # M, K, N


def make_linear_4bit(device, gen, dtype, *, quant_type="nf4", nested=True, bias=True, shape=SHAPE_LINEAR) -> Call:
    """x [M, K] and a bnb-quantized weight [N, K] (packed tensor + QuantState), as F.linear takes them."""
    m, k, n = shape
    w = make_dequantize_4bit(device, gen, dtype, quant_type=quant_type, nested=nested, shape=(n, k))
    return {
        "x": torch.randn(m, k, generator=gen).to(dtype).to(device),
        "weight": w["A"],
        "quant_state": w["quant_state"],
        "bias": torch.randn(n, generator=gen).to(dtype).to(device) if bias else None,
    }


def _lin_bias(kw: Call) -> torch.Tensor:
    n, x = kw["quant_state"].shape[0], kw["x"]
    return kw["bias"] if kw["bias"] is not None else torch.ones(n, dtype=x.dtype, device=x.device)


LINEAR_4BIT_BAD = (
    Bad("x-list", _set("x", lambda kw, d: kw["x"].tolist()), TypeError, "x"),
    Bad("x-int32", _set("x", lambda kw, d: kw["x"].to(torch.int32)), TypeError, "x"),
    Bad("x-K-mismatch", _set("x", lambda kw, d: kw["x"][:, :-2]), ValueError, "x"),
    Bad("x-device", _set("x", lambda kw, d: kw["x"].to(elsewhere(d))), ValueError, "x"),
    Bad("quant_state-missing", _set("quant_state", lambda kw, d: None), ValueError, "quant_state"),
    Bad("blocksize-float", _state("blocksize", lambda kw, d: float(_qs(kw, "blocksize"))), TypeError, "blocksize"),
    Bad("bias-long", _set("bias", lambda kw, d: torch.cat([_lin_bias(kw), _lin_bias(kw)[:1]])), ValueError, "bias"),
    Bad("bias-int", _set("bias", lambda kw, d: _lin_bias(kw).to(torch.int32)), TypeError, "bias"),
    Bad("bias-device", _set("bias", lambda kw, d: _lin_bias(kw).to(elsewhere(d))), ValueError, "bias"),
    # what the eager plan cache keys on (x's shape, bias's dtype and shape; the prepared weight's fields): each
    # row also runs after a good call planned these very objects
    Bad("x-0d", _set("x", lambda kw, d: kw["x"][0, 0]), ValueError, "x"),
    Bad("x-3d-K-mismatch", _set("x", lambda kw, d: kw["x"].unsqueeze(0)[..., :-2]), ValueError, "x"),
    Bad("bias-2d", _set("bias", lambda kw, d: _lin_bias(kw).reshape(1, -1)), ValueError, "bias"),
    Bad("bias-fp32", _set("bias", lambda kw, d: _lin_bias(kw).float()), TypeError, "bias"),
    Bad("x-fp16-bias-bf16", _set("x", lambda kw, d: kw["x"].half()), TypeError, "bias", lambda v: v.get("bias", True)),
    Bad(
        "weight-requires-grad",
        _set("weight", lambda kw, d: torch.nn.Parameter(kw["weight"].float())),
        ValueError,
        "weight",
    ),
    Bad("weight-short", _set("weight", lambda kw, d: kw["weight"][:-1]), ValueError, "weight"),
    Bad(
        "quant_state.shape-1d",
        _state("shape", lambda kw, d: torch.Size([_qs(kw, "shape").numel()])),
        ValueError,
        "quant_state.shape",
    ),
    Bad(
        "quant_state.shape-transposed",
        _state("shape", lambda kw, d: torch.Size(tuple(_qs(kw, "shape"))[::-1])),
        ValueError,
        "x",
    ),
    Bad("quant_state.dtype-int8", _state("dtype", lambda kw, d: torch.int8), TypeError, "quant_state.dtype"),
    Bad(
        "quant_state.absmax-f16",
        _state("absmax", lambda kw, d: _qs(kw, "absmax").half()),
        TypeError,
        "quant_state.absmax",
    ),
)


CASES: dict[str, OpCase] = {
    case.name: case
    for case in (
        OpCase(
            "dequantize_4bit",
            tritonbits.dequantize_4bit,
            make_dequantize_4bit,
            lambda r: (r,),
            {
                # "nested" spelled out: the nested-only rows (`_nested`) read it from the variant
                "nf4-nested-bs64": {"nested": True},
                "fp4-plain-bs128": {"quant_type": "fp4", "nested": False, "blocksize": 128},
                "nf4-nested-bs256-out": {"blocksize": 256, "nested": True, "out": True},
                "nf4-nested-bs64-tb-state": {"nested": True, "tb_state": True},
            },
            DEQUANTIZE_4BIT_BAD,
        ),
        OpCase(
            "dequant_bias",
            tritonbits.dequant_bias,
            make_dequant_bias,
            lambda r: (r,),
            {"int32-bias": {}, "bf16-nobias-out": {"acc_dtype": torch.bfloat16, "bias": False, "out": True}},
            DEQUANT_BIAS_BAD,
        ),
        OpCase(
            "quantize_4bit",
            tritonbits.quantize_4bit,
            make_quantize_4bit,
            quantize_outputs,
            {
                "nf4-nested-bs64": {"nested": True},  # spelled out: the _nested/_plain filters read this dict
                "fp4-plain-bs128-out": {"quant_type": "fp4", "nested": False, "blocksize": 128, "out": True},
            },
            QUANTIZE_4BIT_BAD,
        ),
        OpCase(
            "quantize_blockwise",
            tritonbits.quantize_blockwise,
            make_quantize_blockwise,
            quantize_outputs,
            {"bs256": {}, "bs64-nested-out": {"blocksize": 64, "nested": True, "out": True}},
            QUANTIZE_BLOCKWISE_BAD,
        ),
        OpCase(
            "dequantize_blockwise",
            tritonbits.dequantize_blockwise,
            make_dequantize_blockwise,
            lambda r: (r,),
            {
                "state-bs256": {},
                "state-nested-bs64": {"blocksize": 64, "nested": True},
                "absmax-bs256-out": {"form": "absmax", "out": True},
            },
            DEQUANTIZE_BLOCKWISE_BAD,
        ),
        OpCase(
            "linear_4bit",
            tritonbits.linear_4bit,
            make_linear_4bit,
            lambda r: (r,),
            {
                "nf4-nested-bias": {"nested": True},  # M=3: the tensor-core gemm
                "fp4-plain-nobias": {"quant_type": "fp4", "nested": False, "bias": False},
                "nf4-nested-m1": {"nested": True, "shape": (1, 128, 48)},  # gemv2
                "nf4-nested-m300": {"nested": True, "shape": (300, 128, 48)},  # dequantize + matmul
            },
            LINEAR_4BIT_BAD,
        ),
    )
}


def variants() -> list[tuple[str, str]]:
    """Every (op, variant) pair, for parametrizing."""
    return [(name, v) for name, case in CASES.items() for v in case.variants]


def bad_rows() -> list[tuple[str, str, Bad]]:
    """Every (op, variant, row) where the row applies to the variant."""
    return [
        (name, v, row)
        for name, case in CASES.items()
        for v, cfg in case.variants.items()
        for row in case.bad
        if row.when(cfg)
    ]


def make(name: str, variant: str, device: torch.device, gen: torch.Generator, dtype: torch.dtype) -> Call:
    case = CASES[name]
    return case.make(device, gen, dtype, **case.variants[variant])


def call(name: str, kw: Call):
    return CASES[name].fn(**kw)


def outputs(name: str, result) -> tuple[torch.Tensor, ...]:
    return CASES[name].outputs(result)
