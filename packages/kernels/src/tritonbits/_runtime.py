"""Where kernels run: the Triton interpreter or a CUDA device, and what that device can do.

tritonbits picks its own code paths from the device capability (it must work without the harness).
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, read when kernels are decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpreting()


def require_interpreter() -> None:
    """Triton's interpreter needs numpy, which triton does not declare: say how to get it."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise ImportError(
            "TRITON_INTERPRET=1 runs tritonbits through Triton's interpreter, which needs numpy: "
            "install tritonbits[cpu] (pip install 'tritonbits[cpu]')"
        ) from None


if INTERPRET:
    require_interpreter()


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def put_bounded(cache: dict, key, value, limit: int):
    """cache[key] = value, first dropping the oldest entry (insertion order) when a new key would exceed `limit`;
    returns value. For the eager plan caches, bounded so that a stream of new shapes cannot grow them."""
    if key not in cache and len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints with b > 0: triton.cdiv's value, for host code. NOTE: triton.cdiv is a
    constexpr_function since Triton 3.5 (argument unwrapping on every call): 2.2 us a call against 0.015 us for
    this expression inline (CPU, timeit, Triton 3.9), and the nested quantize_4bit planned 8 of them a call."""
    return -(-a // b)


def native_bf16_conversion(device: torch.device) -> bool:
    """Whether Triton can round fp32 to bf16 itself: sm80+ (it does not compile on sm75) and not the
    interpreter (which truncates instead of rounding to nearest even)."""
    if device.type != "cuda":
        return False
    return capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0)


def ftz_mode(device: torch.device) -> str:
    """How a kernel spells bnb's fast-math multiply (`_triton_helpers.mul_ftz`): "ptx" (mul.rn.ftz.f32, one
    instruction) on a CUDA device, "emulate" (explicit flushes) in the interpreter, which runs no PTX."""
    return "ptx" if device.type == "cuda" and not INTERPRET else "emulate"


def check_device(name: str, t: torch.Tensor, device: torch.device | None = None) -> torch.device:
    """The device a kernel argument lives on, refusing what no kernel can run on."""
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other arguments")
    if t.device.type == "cuda":
        return t.device
    if t.device.type == "cpu" and INTERPRET:
        return t.device
    if t.device.type == "cpu":
        raise ValueError(
            f"{name} is a CPU tensor; tritonbits kernels need a CUDA tensor, or TRITON_INTERPRET=1 set "
            "before importing tritonbits to run them through the Triton interpreter"
        )
    raise ValueError(f"{name} is on {t.device}; tritonbits kernels run on CUDA devices")


FAMILIES = ("H200", "H100", "A100", "L4", "T4")  # H200 before H100: names are matched as substrings


def family_of(device_name: str, capability_: tuple[int, int]) -> str:
    """'h100', 'h200', 'a100', 'l4', 't4' from a CUDA device name, else 'sm<major><minor>'."""
    for family in FAMILIES:
        if family in device_name:
            return family.lower()
    return f"sm{capability_[0]}{capability_[1]}"


@functools.cache
def _family(device_index: int) -> str:
    return family_of(torch.cuda.get_device_name(device_index), capability(device_index))


def gpu_family(device: torch.device) -> str:
    """The GPU family that names a device's tuned configs ('interpreter' for CPU tensors)."""
    if device.type != "cuda":
        return "interpreter"
    return _family(device.index if device.index is not None else torch.cuda.current_device())


def outside_fake(fn, *args):
    """fn(*args) with every active dispatch mode (fake, proxy, functional) set aside. For the per-device tables
    the kernels read (code tables, encoder tables): each triton_op body builds the ones it uses through this
    before anything else, since torch.compile runs the body under FakeTensorMode when it traces the op (and
    under proxy/functional modes when it decomposes it), where a table built for the first time would fail (a
    data-dependent step of its construction), be fake and then be cached, or be recorded into the graph. Called
    in triton_op bodies (which dynamo does not trace: they run as Python under those modes), by table builders
    that a body may reach, and by formats.code_table's constant for dynamo (run eagerly while dynamo traces)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return fn(*args)


def address_aligned(t: torch.Tensor, nbytes: int) -> bool | None:
    """Whether t's first element sits at an address that is a multiple of nbytes; None for a tensor without an
    address (torch.compile traces a triton_op's body with fake tensors)."""
    try:
        return t.data_ptr() % nbytes == 0
    except RuntimeError:
        return None


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """The byte interval [first, last + 1) that a tensor's elements occupy (None when empty)."""
    if t.numel() == 0:
        return None
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _layout(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, t.shape, t.stride()


def check_out(out: torch.Tensor, inputs: dict[str, torch.Tensor | None], *, may_alias: str | None = None,
              name: str = "out") -> None:  # fmt: skip
    """Refuse an `out=` that no kernel can write correctly: one that requires grad, or whose memory overlaps an
    input's (the kernel would read what it already overwrote). `may_alias` names the one input `out` may be
    exactly (same address, dtype, shape and strides): an elementwise op reads each element before writing it.
    `name`: the argument `out` is (an op may write several, e.g. quantize's absmax)."""
    if out.requires_grad:
        raise ValueError(f"{name} requires grad; {name}= is not differentiable: pass a tensor that does not require "
                         "grad")  # fmt: skip
    span = _span(out)
    if span is None:
        return
    for input_name, t in inputs.items():
        if t is None or t.device != out.device:
            continue
        other = _span(t)
        if other is None or other[1] <= span[0] or span[1] <= other[0]:
            continue
        if input_name == may_alias and _layout(t) == _layout(out):
            continue
        alias = f" (only exactly {name}={may_alias} is allowed)" if input_name == may_alias else ""
        raise ValueError(f"{name} overlaps {input_name} in memory{alias}; pass a separate output tensor")
