"""Launch a jitted kernel without paying JITFunction.run's per-call binding once it is compiled.

JITFunction.run binds and specializes every argument on every call (~15-20 us of host time on the H200
machine for our kernels, measured with ci/host_overhead.py). Here the first launch of each
specialization goes through Triton as usual; later launches with the same specialization call the
compiled kernel directly (``compiled[grid](*args)``). The key holds everything Triton specializes on:
constexprs and options, tensor dtypes and 16-byte alignment, and for integers ``== 1``, ``% 16 == 0``
and 32/64-bit width. Launch hooks, the interpreter and wrap_triton always take Triton's own path.
"""

from __future__ import annotations

from typing import Any

import torch
import triton

from . import _runtime

try:
    from triton import knobs as _knobs
except ImportError:  # triton < 3.4: no knobs, launch hooks live on CompiledKernel
    _knobs = None


def _hooks_set() -> bool:
    if _knobs is None:
        return getattr(triton.compiler.CompiledKernel, "launch_enter_hook", None) is not None
    return _knobs.runtime.launch_enter_hook is not None


def _arg_key(x):
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.data_ptr() % 16 == 0)
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return (x == 1, x % 16 == 0, -(2**31) <= x < 2**31)
    return (type(x), x)


class CachedLauncher:
    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict[tuple, Any] = {}
        self.enabled = not _runtime.INTERPRET

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, options: dict, device: torch.device) -> None:
        key = (device.index, tuple(map(_arg_key, args)), tuple(constexprs.values()), tuple(options.items()))
        kernel = self.compiled.get(key) if self.enabled else None
        if kernel is not None and not _hooks_set():
            stream = torch._C._cuda_getCurrentRawStream(device.index)
            kernel[grid](*args, *constexprs.values(), stream=stream)
            return
        kernel = self.fn[grid](*args, **constexprs, **options)
        if self.enabled and kernel is not None and hasattr(kernel, "__getitem__"):
            self.compiled[key] = kernel

    def check_order(self, n_args: int, constexprs: dict) -> None:
        """The fast path passes constexprs positionally: they must follow the runtime args in order."""
        names = list(self.fn.arg_names)
        if names[n_args:] != list(constexprs):
            raise AssertionError(f"{self.fn.__name__}: constexprs {list(constexprs)} != {names[n_args:]}")
