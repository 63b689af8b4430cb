"""Launch a jitted kernel without paying JITFunction.run's per-call binding once it is compiled.

JITFunction.run binds and specializes every argument on every call (~15-20 us of host time on the H200
machine for our kernels, measured with ci/host_overhead.py). Here the first launch of each
specialization goes through Triton as usual; later launches with the same specialization call the
compiled kernel's launcher directly, with tensor addresses as ints. The key holds everything Triton
specializes on: constexprs and options, tensor dtypes and 16-byte alignment, and for integers ``== 1``,
``% 16 == 0`` and 32/64-bit width. Launch hooks, the interpreter and wrap_triton always take Triton's own path.
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
    """Whether anyone registered a launch hook (Triton >= 3.5 keeps an always-present, empty HookChain)."""
    if _knobs is not None:
        hooks = (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook)
    else:
        ck = triton.compiler.CompiledKernel
        hooks = (getattr(ck, "launch_enter_hook", None), getattr(ck, "launch_exit_hook", None))
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)


def _arg_key(x):
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.data_ptr() % 16 == 0)
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return (x == 1, x % 16 == 0, -(2**31) <= x < 2**31)
    return (type(x), x)


def _pointer(x):
    """What the compiled launcher gets for an argument: a tensor's address as an int. Triton's launcher
    would call data_ptr() and ask the driver to check every pointer (cuPointerGetAttribute) on each launch;
    the arguments of a cached specialization were validated by the op before its first launch."""
    return x.data_ptr() if isinstance(x, torch.Tensor) else x


class CachedLauncher:
    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict[tuple, Any] = {}
        self.enabled = not _runtime.INTERPRET

    @staticmethod
    def key(args: tuple, constexprs: dict, options: dict, device: torch.device) -> tuple:
        return (device.index, tuple(map(_arg_key, args)), tuple(constexprs.values()), tuple(options.items()))

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, options: dict, device: torch.device) -> None:
        key = self.key(args, constexprs, options, device)
        kernel = self.compiled.get(key) if self.enabled else None
        if kernel is not None and not _hooks_set():
            stream = torch._C._cuda_getCurrentRawStream(device.index)
            try:  # the launcher JITFunction.run calls, with every parameter in signature order, no hooks
                kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None,
                           None, *map(_pointer, args), *constexprs.values())  # fmt: skip
                return
            except (AttributeError, TypeError):  # another Triton's CompiledKernel: use Triton's path from now on
                self.enabled = False
                self.compiled.clear()
        kernel = self.fn[grid](*args, **constexprs, **options)
        if self.enabled and kernel is not None and hasattr(kernel, "packed_metadata"):
            if not self.compiled:
                self.check_order(len(args), constexprs)
            self.compiled[key] = kernel

    def bind(self, grid: tuple, args: tuple, constexprs: dict, options: dict, device: torch.device,
             slot: int) -> BoundLaunch | None:  # fmt: skip
        """A launch of an already compiled specialization with every argument fixed but args[slot], which
        each call passes (a tensor with the same dtype and 16-byte alignment as args[slot]); None until
        this specialization has been launched once through __call__."""
        kernel = self.compiled.get(self.key(args, constexprs, options, device)) if self.enabled else None
        if kernel is None:
            return None
        return BoundLaunch(self, kernel, grid, [*map(_pointer, args), *constexprs.values()], slot, device.index)

    def check_order(self, n_args: int, constexprs: dict) -> None:
        """The fast path passes constexprs positionally: they must follow the runtime args in order."""
        names = list(self.fn.arg_names)
        if names[n_args:] != list(constexprs):
            raise AssertionError(f"{self.fn.__name__}: constexprs {list(constexprs)} != {names[n_args:]}")


class BoundLaunch:
    """One fixed launch (see CachedLauncher.bind): per call only the stream and one tensor address are looked
    up. Calling it returns False, launching nothing, when a launch hook is registered or Triton's launcher
    refused the call; the caller then goes through CachedLauncher.__call__."""

    def __init__(self, owner: CachedLauncher, kernel, grid: tuple, args: list, slot: int, device_index: int):
        self.owner, self.device_index = owner, device_index
        self.prefix = (grid[0], grid[1], grid[2])
        self.kernel_args = (kernel.function, kernel.packed_metadata, None, None, None)
        self.head, self.tail = tuple(args[:slot]), tuple(args[slot + 1 :])
        self.run = kernel.run

    def __call__(self, tensor: torch.Tensor) -> bool:
        if not self.owner.enabled or _hooks_set():
            return False
        stream = torch._C._cuda_getCurrentRawStream(self.device_index)
        try:
            self.run(*self.prefix, stream, *self.kernel_args, *self.head, tensor.data_ptr(), *self.tail)
        except (AttributeError, TypeError):  # as in CachedLauncher.__call__: Triton's own path from now on
            self.owner.enabled = False
            self.owner.compiled.clear()
            return False
        return True
