"""Quant states shared by every 4-bit op: tritonbits' QuantState, its validation, bnb's serialized form, and
`prepare()`, the per-quant-state cache of validated kernel arguments.

tritonbits never imports bitsandbytes: `QuantState.from_any` reads bnb's fields by name (duck typing), so a
bnb QuantState, a bnb Params4bit's `.quant_state`, or any look-alike works; `from_dict` / `as_dict` speak
bnb's serialized form (`QuantState.as_dict(packed=True)`, the form Linear4bit state dicts and Hub
checkpoints use). Format facts: docs/format.md. Where a new op's pieces go: docs/architecture.md.
"""

from __future__ import annotations

import copy
import json
import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _runtime, formats


@dataclass
class NestedState:
    """bnb's `state2`: the 8-bit blockwise state that quantizes a nested 4-bit absmax."""

    absmax: torch.Tensor  # float32, one per `blocksize` 4-bit absmax values
    code: torch.Tensor  # float32[256], the 8-bit dynamic code
    blocksize: int = formats.NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32
    nested = False  # bnb's state2 is a QuantState whose `nested` is False; bnb's code reads it


@dataclass
class QuantState:
    """Everything a 4-bit (de)quantization needs, with bnb's field names."""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"  # bnb's 8-bit blockwise states carry None here
    offset: torch.Tensor | None = None
    state2: NestedState | None = None
    code: torch.Tensor | None = None  # bnb's copy of the 16 code values; kernels use the format's table

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_any(cls, obj) -> QuantState:
        """Read bnb's fields off `obj` (bnb QuantState, tritonbits QuantState or a look-alike)."""
        if isinstance(obj, QuantState):
            s2 = obj.state2
            _check_state2_fields(s2)
            if type(obj.blocksize) is int and (s2 is None or type(s2.blocksize) is int):
                return obj
            # an integer field held as a float, a numpy or a 0-d tensor: read by name as a look-alike's (64.0
            # refused, np.int64(64) taken as 64), in a copy: the kernels take plain ints as constexprs
            _check_shape(obj.shape)
            state = copy.copy(obj)
            state.shape = torch.Size(obj.shape)
            state.blocksize = _int("quant_state.blocksize", obj.blocksize)
            if s2 is not None:
                state.state2 = NestedState(absmax=s2.absmax, code=s2.code, dtype=getattr(s2, "dtype", torch.float32),
                                           blocksize=_int("quant_state.state2.blocksize", s2.blocksize))  # fmt: skip
            return state
        if isinstance(obj, dict):
            raise TypeError("quant_state is a dict; if it is bnb's serialized form (QuantState.as_dict()), load it "
                            "with tritonbits.QuantState.from_dict(d, device)")  # fmt: skip
        missing = [f for f in ("absmax", "shape", "dtype", "blocksize", "quant_type") if not hasattr(obj, f)]
        if missing:
            raise TypeError(f"quant_state has no {', '.join(missing)}: pass a bitsandbytes QuantState or an "
                            "object with its fields")  # fmt: skip
        _check_shape(obj.shape)
        state2 = None
        s2 = getattr(obj, "state2", None)
        _check_state2_fields(s2)
        if s2 is not None:
            state2 = NestedState(absmax=s2.absmax, code=s2.code, blocksize=_int("quant_state.state2.blocksize",
                                                                                 s2.blocksize))  # fmt: skip
        offset = getattr(obj, "offset", None)
        if offset is not None and not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=obj.absmax.device)
        return cls(
            absmax=obj.absmax,
            shape=torch.Size(obj.shape),
            dtype=obj.dtype,
            blocksize=_int("quant_state.blocksize", obj.blocksize),
            quant_type=obj.quant_type,
            offset=offset,
            state2=state2,
            code=getattr(obj, "code", None),
        )

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str | None = None) -> QuantState:
        """Load bnb's serialized form: `as_dict()` or `as_dict(packed=True)` (keys may carry a state-dict
        prefix such as ``weight.``), as bnb's `QuantState.from_dict` does."""
        items = dict(qs_dict)
        packed = [k for k, v in items.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        unpacked = "quant_type" in {k.split(".")[-1] for k in items}
        if not unpacked and (len(packed) != 1 or not packed[0].split(".")[-1].startswith("bitsandbytes__")):
            raise ValueError("qs_dict holds neither bnb's unpacked quant-state keys nor exactly one packed "
                                 f"'quant_state.bitsandbytes__<nf4|fp4>' tensor; keys: {sorted(items)}")  # fmt: skip
        if len(packed) == 1:
            key = packed[0]
            try:
                meta = json.loads(bytes(items.pop(key).cpu().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"qs_dict[{key!r}] is not bnb's packed quant state (UTF-8 JSON bytes): {exc}"
                ) from None
            if not isinstance(meta, dict):
                raise ValueError(f"qs_dict[{key!r}] holds JSON {type(meta).__name__}, not bnb's dict of fields")
            items.update(meta)
        d = {k.split(".")[-1]: v for k, v in items.items()}
        required = ["absmax", "shape", "dtype", "blocksize", "quant_type"]
        if "nested_absmax" in d:
            required += ["nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"qs_dict has no {', '.join(missing)} (keys of bnb's QuantState.as_dict()); keys: "
                             f"{sorted(items)}")  # fmt: skip
        to = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        state2, offset = None, None
        if "nested_absmax" in d:
            nested_absmax = to(d["nested_absmax"])
            offset = torch.tensor(float(d["nested_offset"]), dtype=torch.float32, device=nested_absmax.device)
            state2 = NestedState(
                absmax=nested_absmax,
                code=to(d["nested_quant_map"]),
                blocksize=_int("qs_dict['nested_blocksize']", d["nested_blocksize"]),
                dtype=_dtype_named("qs_dict['nested_dtype']", d["nested_dtype"]),
            )
        return cls(
            absmax=to(d["absmax"]),
            shape=torch.Size(d["shape"]),
            dtype=_dtype_named("qs_dict['dtype']", d["dtype"]),
            blocksize=_int("qs_dict['blocksize']", d["blocksize"]),
            quant_type=d["quant_type"],
            offset=offset,
            state2=state2,
            code=to(d["quant_map"]) if "quant_map" in d else None,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bnb's serialized form (what bnb's `QuantState.as_dict(packed)` returns for the same state)."""
        code = self.code if self.code is not None else formats.code_values(self.quant_type).to(self.absmax.device)
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": code,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": tuple(self.shape),
        }
        if self.state2 is not None:
            if self.offset is None:
                raise ValueError("quant_state.offset is missing; a nested quant_state needs it")
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": str(self.state2.dtype).removeprefix("torch."),
                "nested_offset": float(self.offset.item()),
            })  # fmt: skip
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        text = json.dumps(rest).encode("utf-8")
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(text), dtype=torch.uint8)
        return tensors


# ---------------------------------------------------------------------------------------------------
# Validation: every tensor field's type, dtype, size, layout and device.


def check_tensor(name: str, t, dtypes: tuple[torch.dtype, ...], numel: int | None, device) -> None:
    """A kernel operand read as a flat, contiguous array: refuse anything else, naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()}); pass {name.split('.')[-1]}.contiguous()")
    _runtime.check_device(name, t, device)


def _int(name: str, value) -> int:
    """An integer field (int, numpy or 0-d integer tensor), refused by name otherwise: int() would truncate
    64.5 and fail on None without naming the field."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _check_state2_fields(s2) -> None:
    """A nested state's state2 must carry bnb's fields (read next by name)."""
    if s2 is None:
        return
    missing = [f for f in ("absmax", "code", "blocksize") if not hasattr(s2, f)]
    if missing:
        raise TypeError(f"quant_state.state2 has no {', '.join(missing)}: pass a nested QuantState (bnb's or "
                        "tritonbits') whose state2 has absmax, code and blocksize")  # fmt: skip


def _dtype_named(name: str, text) -> torch.dtype:
    """A dtype as bnb serializes it ("bfloat16"), refused by name when it names none (getattr(torch, "nope")
    raised AttributeError, and "Tensor" gave a class)."""
    dtype = getattr(torch, text, None) if isinstance(text, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name} must name a torch dtype (bnb writes e.g. 'bfloat16'), got {text!r}")
    return dtype


def _check_shape(shape) -> None:
    if shape is None or isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"quant_state.shape must be a sequence of ints (the weight's shape), got {shape!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TypeError(f"quant_state.shape must be a sequence of non-negative ints, got {shape!r}")


def validate(A, state: QuantState) -> torch.device:
    """Check the packed tensor and every quant-state field against the format; return the device. The state's
    own `code` is not read: like bnb's CUDA kernels, tritonbits decodes with the format's table."""
    _check_shape(state.shape)
    if state.quant_type not in formats.QUANT_TYPES:
        raise ValueError(f"quant_state.quant_type must be one of {formats.QUANT_TYPES}, got {state.quant_type!r}")
    if state.blocksize not in formats.BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize must be one of {formats.BLOCKSIZES}, got {state.blocksize}")
    if state.dtype not in formats.FLOAT_DTYPES:
        raise TypeError(f"quant_state.dtype must be float16, bfloat16 or float32, got {state.dtype}")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    device = _runtime.check_device("A", A)
    if A.dtype not in formats.PACKED_DTYPES:
        raise TypeError(f"A (packed 4-bit storage) has dtype {A.dtype}; expected uint8 or a quant_storage "
                        f"dtype bnb uses ({', '.join(map(str, formats.PACKED_DTYPES[1:]))})")  # fmt: skip
    if not A.is_contiguous():
        raise ValueError(f"A must be contiguous (its bytes are read in order); got strides {A.stride()}")
    n = state.numel
    need = (n + 1) // 2
    have = A.numel() * A.element_size()
    if not need <= have < need + A.element_size():
        raise ValueError(f"A holds {have} packed bytes but quant_state.shape {tuple(state.shape)} needs {need}")
    blocks = -(-n // state.blocksize)
    s2 = state.state2
    if s2 is not None:
        check_tensor("quant_state.absmax", state.absmax, (torch.uint8,), blocks, device)
        if s2.blocksize not in formats.BLOCKSIZES:
            raise ValueError(f"quant_state.state2.blocksize must be one of {formats.BLOCKSIZES}, got {s2.blocksize}")
        check_tensor("quant_state.state2.absmax", s2.absmax, (torch.float32,), -(-blocks // s2.blocksize), device)
        check_tensor("quant_state.state2.code", s2.code, (torch.float32,), 256, device)
        if state.offset is None:
            raise ValueError("quant_state.offset is missing; a nested quant_state needs it")
        if not isinstance(state.offset, torch.Tensor) or state.offset.dtype != torch.float32:
            raise TypeError(f"quant_state.offset must be a float32 tensor, got {state.offset!r}")
        if state.offset.numel() != 1:
            raise ValueError(f"quant_state.offset has {state.offset.numel()} elements, expected 1")
        _runtime.check_device("quant_state.offset", state.offset, device)
    else:
        check_tensor("quant_state.absmax", state.absmax, (torch.float32,), blocks, device)
    return device


# ---------------------------------------------------------------------------------------------------
# prepare(): validated kernel arguments per quant state, cached.


@dataclass(eq=False)
class PreparedWeight:
    """A validated 4-bit weight: a private QuantState copy and the kernel's fields; `launches` keeps one bound
    launch per op (tritonbits._launcher.BoundLaunch) once that op has launched on this weight."""

    key: tuple | None
    state: QuantState
    A: torch.Tensor  # the packed bytes as uint8
    absmax: torch.Tensor
    code2: torch.Tensor | None  # nested only: state2.code, state2.absmax, a 0-d offset, state2.blocksize
    absmax2: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize2: int
    launches: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, A: torch.Tensor, state: QuantState, key: tuple | None = None) -> PreparedWeight:
        packed = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        s2 = state.state2
        if s2 is None:
            return cls(key, state, packed, state.absmax, None, None, None, 0)
        assert state.offset is not None  # validated
        return cls(key, state, packed, state.absmax, s2.code, s2.absmax, state.offset.reshape(()), s2.blocksize)


def _signature(t) -> tuple:
    """Everything validation reads of a tensor field (and a bound launch holds: its address)."""
    if isinstance(t, torch.Tensor):
        return (t.data_ptr(), t.dtype, t.shape, t.stride(), t.device)
    return (type(t), t) if isinstance(t, (int, float, type(None))) else (type(t), id(t))


def _typed(value) -> tuple:
    """An integer field with its type: 64.0 or np.int64(64) equals 64 but is not read as 64 by a fresh check
    (refused, or normalized), so it must not match a cached 64. A tensor never matches (its value can change
    in place at the same address)."""
    return (type(value), object() if isinstance(value, torch.Tensor) else value)


def _identity(A: torch.Tensor, qs) -> tuple:
    """What must not have changed for a cached validation to hold: every input `validate` reads, integer fields
    with their types. Shape is copied into a tuple (a list shape changed in place must not compare equal to
    itself), with its dims' types (torch.Size keeps an np.int64 dim, which equals an int); a tensor dim never
    passes validation, so it is never cached. Plain ints skip _typed (the common case, every eager call)."""
    s2 = getattr(qs, "state2", None)
    nested = None
    if s2 is not None:
        b2 = s2.blocksize
        nested = (id(s2), _signature(s2.absmax), _signature(s2.code), b2 if type(b2) is int else _typed(b2),
                  _signature(qs.offset))  # fmt: skip
    shape = qs.shape
    if shape is not None:
        shape = tuple(shape)
        shape = (shape, tuple(map(type, shape)))
    b = qs.blocksize
    return (_signature(A), _signature(qs.absmax), b if type(b) is int else _typed(b), qs.quant_type, qs.dtype,
            shape, nested)  # fmt: skip


# id(quant_state) -> PreparedWeight; an entry dies with its quant_state
_PREPARED: dict[int, PreparedWeight] = {}


def _lookup(A: torch.Tensor, quant_state) -> tuple[tuple | None, PreparedWeight | None]:
    """(A, quant_state)'s identity key (None: not a quant state) and prepare's entry for it while current."""
    try:
        key = _identity(A, quant_state)
    except (AttributeError, TypeError):  # not a quant state: from_any says what is missing
        return None, None
    entry = _PREPARED.get(id(quant_state))
    return key, (entry if entry is not None and entry.key == key else None)


def prepared_entry(A: torch.Tensor, quant_state) -> PreparedWeight | None:
    """prepare's cached entry for (A, quant_state) while it is current; None where prepare would validate and
    build (nothing is validated, built or cached here: a CUDA-graph capture may ask)."""
    return _lookup(A, quant_state)[1]


def prepare(A: torch.Tensor, quant_state) -> PreparedWeight:
    """Validate (A, quant_state) once and cache the kernel arguments per quant state. A later call with the
    same quant state is served from the cache only while every field `validate` reads is unchanged (same
    tensors, addresses, dtypes, shapes, strides; same blocksize, quant_type, dtype and shape)."""
    key, current = _lookup(A, quant_state)
    if current is not None:
        return current
    entry = _PREPARED.get(id(quant_state))
    state = QuantState.from_any(quant_state)
    validate(A, state)
    if state is quant_state:  # the entry must not keep the quant_state itself alive, nor follow its edits
        state = copy.copy(state)
        state.shape = torch.Size(state.shape)
    prepared = PreparedWeight.build(A, state, key)
    if key is None:
        return prepared
    try:
        if entry is None:
            weakref.finalize(quant_state, _PREPARED.pop, id(quant_state), None)
        _PREPARED[id(quant_state)] = prepared
    except TypeError:  # an object that takes no weak references is validated on every call
        pass
    return prepared
