"""Launch a jitted kernel without paying JITFunction.run's per-call binding once it is compiled.

JITFunction.run binds and specializes every argument on every call (~15-20 us of host time on the H200
machine for our kernels, measured with ci/host_overhead.py). Here the first launch of each
specialization goes through Triton as usual; later launches with the same specialization call the
compiled kernel's launcher directly, with tensor addresses as ints. The key holds everything Triton
specializes on: constexprs and options, tensor dtypes and 16-byte alignment, and for integers ``== 1``,
``% 16 == 0`` and 32/64-bit width. Launch hooks, the interpreter and wrap_triton always take Triton's own path.

What is cached is a `Compiled`: the kernel's launch callable and the arguments that precede the kernel's own
(`_compiled`). Where Triton's launcher has the convention of Triton 3.6 (`CudaLauncher.__call__(gridX, gridY,
gridZ, stream, function, *args)`, no global or profile scratch), the callable is its C `launch` itself and
`CudaLauncher.__call__`'s Python frame (two scratch allocations of size 0, a closure) is skipped; anything else
calls the CompiledKernel's launcher as JITFunction.run does.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import triton

from . import _runtime

try:
    from triton import knobs as _knobs
except ImportError:  # triton < 3.4: no knobs, launch hooks live on CompiledKernel
    _knobs = None


def _hooked(hook) -> bool:
    """Whether a launch-hook slot holds a hook (Triton >= 3.5 keeps an always-present, maybe empty HookChain)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    """Whether anyone registered a launch hook. NOTE: read on every direct launch; this form measured 0.15 us on
    the shared CPU against 0.27-0.5 us for the any() over a tuple it replaced (timeit, this venv's Triton knobs)."""
    if _knobs is not None:
        runtime = _knobs.runtime
        return _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook)
    ck = triton.compiler.CompiledKernel
    return _hooked(getattr(ck, "launch_enter_hook", None)) or _hooked(getattr(ck, "launch_exit_hook", None))


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


_log = logging.getLogger("tritonbits")


def _other_device(device: torch.device | int | None) -> bool:
    """Whether a launch on `device` must first make it the current device. Triton (its own launcher and the
    compiled kernel's) launches in the CURRENT device's context and stream: tensors on cuda:1 while cuda:0 is
    current would be read by a kernel running on cuda:0 (an illegal address, or a launch error)."""
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return False
        device = device.index
    # NOTE: torch.cuda.current_device() is this plus a Python frame and the lazy-init check (done: a CUDA tensor
    # exists); this runs on every direct launch
    return device is not None and device != torch._C._cuda_getDevice()


class Compiled(NamedTuple):
    """A compiled specialization as the direct path launches it: launch(gridX, gridY, gridZ, stream, *head,
    *kernel_args); `kernel` is the CompiledKernel (or the launch stub's stand-in)."""

    launch: Any
    head: tuple
    kernel: Any


def _triton36_launch(run) -> bool:
    """Whether `run` (CompiledKernel.run) is Triton 3.6's CudaLauncher: `__call__(gridX, gridY, gridZ, stream,
    function, *args)` passing `launch(gridX, gridY, gridZ, stream, function, cooperative, pdl, global_scratch,
    profile_scratch, *args)`, with both scratch sizes 0 (the tritonbits kernels use none: nothing to allocate)."""
    call = vars(type(run)).get("__call__")  # the class's own __call__ (a Python function there), not a builtin's
    code = getattr(call, "__code__", None)
    if code is None or not callable(getattr(run, "launch", None)):
        return False
    names = code.co_varnames[: code.co_argcount]
    # NVIDIA's launcher only: AMD's HIPLauncher of 3.6 has the same __call__ and another launch order
    return (type(run).__module__ == "triton.backends.nvidia.driver"
            and names == ("self", "gridX", "gridY", "gridZ", "stream", "function") and bool(code.co_flags & 0x04)
            and getattr(run, "global_scratch_size", None) == 0 and getattr(run, "profile_scratch_size", None) == 0
            and hasattr(run, "launch_cooperative_grid") and hasattr(run, "launch_pdl"))  # fmt: skip


def _compiled(kernel) -> Compiled:
    """The direct launch of a CompiledKernel that has run once (its handles are loaded). NOTE: skipping
    CudaLauncher.__call__ (Triton 3.6) saves its Python frame on every direct launch: H100, ci/host_overhead.py,
    interleaved rounds (mins), the tree before -> this one, two runs each in one call: a bound launch 7.4 / 7.5 ->
    6.4 / 6.7 us, dequant_bias M=16 14.6 / 14.5 -> 12.9 / 14.1 us (log docs/gpu-runs/logs/20261124T0215Z-...)."""
    run = kernel.run
    if _triton36_launch(run):
        head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata,
                None, None, None)  # fmt: skip
        return Compiled(run.launch, head, kernel)
    return Compiled(run, (kernel.function, kernel.packed_metadata, None, None, None), kernel)


def _raw_launch(compiled: Compiled, grid: tuple, device_index: int, args) -> None:
    """The one touch of private internals: torch's raw current stream, and the compiled kernel's launch with the
    arguments JITFunction.run passes (grid, stream, function, metadata, the hooks as None, every parameter)."""
    stream = torch._C._cuda_getCurrentRawStream(device_index)
    compiled.launch(grid[0], grid[1], grid[2], stream, *compiled.head, *args)


class CachedLauncher:
    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict[tuple, Compiled] = {}
        self.enabled = not _runtime.INTERPRET

    @staticmethod
    def key(args: tuple, constexprs: dict, options: dict, device: torch.device) -> tuple:
        return (device.index, tuple(map(_arg_key, args)), tuple(constexprs.values()), tuple(options.items()))

    def fall_back(self, exc: Exception) -> None:
        """Another Triton's CompiledKernel refused the direct call: use Triton's own path from now on."""
        if self.enabled:
            message = "tritonbits: direct launch of %s failed (%s: %s); Triton's own launcher from now on"
            _log.warning(message, self.fn.__name__, type(exc).__name__, exc)
        self.enabled = False
        self.compiled.clear()

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, options: dict, device: torch.device) -> None:
        if _other_device(device):
            with torch.cuda.device(device):
                return self(grid, args, constexprs, options, device)
        key = self.key(args, constexprs, options, device)
        kernel = self.compiled.get(key) if self.enabled else None
        if kernel is not None and not _hooks_set():
            try:
                _raw_launch(kernel, grid, device.index, (*map(_pointer, args), *constexprs.values()))
                return
            except (AttributeError, TypeError) as exc:
                self.fall_back(exc)
        kernel = self.fn[grid](*args, **constexprs, **options)
        if self.enabled and kernel is not None and hasattr(kernel, "packed_metadata"):
            if not self.compiled:
                self.check_order(len(args), constexprs)
            try:
                self.compiled[key] = _compiled(kernel)
            except Exception as exc:  # another Triton's CompiledKernel; the kernel has run: only bookkeeping failed
                self.fall_back(exc)

    def bind(self, grid: tuple, args: tuple, constexprs: dict, options: dict, device: torch.device,
             slots: tuple[int, ...]) -> BoundLaunch | None:  # fmt: skip
        """A launch of an already compiled specialization with every argument fixed but args[slots], which
        each call passes in that order (tensors with the same dtype and 16-byte alignment, ints with the same
        ==1 / %16 / 32-bit class as the ones bound here); None until this specialization has been launched
        once through __call__."""
        kernel = self.compiled.get(self.key(args, constexprs, options, device)) if self.enabled else None
        if kernel is None:
            return None
        return BoundLaunch(self, kernel, grid, [*map(_pointer, args), *constexprs.values()], slots, device.index)

    def check_order(self, n_args: int, constexprs: dict) -> None:
        """The fast path passes constexprs positionally: they must follow the runtime args in order."""
        names = list(self.fn.arg_names)
        if names[n_args:] != list(constexprs):
            raise AssertionError(f"{self.fn.__name__}: constexprs {list(constexprs)} != {names[n_args:]}")


class BoundLaunch:
    """One fixed launch (see CachedLauncher.bind): per call only the stream and the slot values are looked
    up. Calling it returns False, launching nothing, when a launch hook is registered or Triton's launcher
    refused the call; the caller then goes through CachedLauncher.__call__."""

    def __init__(self, owner: CachedLauncher, kernel: Compiled, grid: tuple, args: list, slots: tuple[int, ...],
                 device_index: int):  # fmt: skip
        self.owner, self.kernel, self.grid, self.device_index = owner, kernel, grid, device_index
        self.args, self.slots = list(args), tuple(slots)
        # slots that are the leading arguments (dequant_bias's five tensors): one list display per call instead of
        # a copy and a loop. NOTE: 0.9 -> 0.7 us for five slots (CPU timeit of the argument building alone).
        leading = self.slots == tuple(range(len(self.slots)))
        self.tail = self.args[len(self.slots) :] if leading else None
        self.compiled = owner.compiled  # a launcher whose cache was replaced (launch_stub) voids its binds

    def __call__(self, *values, grid: tuple | None = None) -> bool:
        if not self.owner.enabled or self.owner.compiled is not self.compiled or _hooks_set():
            return False
        if _other_device(self.device_index):
            with torch.cuda.device(self.device_index):
                return self(*values, grid=grid)
        if self.tail is not None and len(values) == len(self.slots):
            args = [*map(_pointer, values), *self.tail]
        else:
            args = self.args.copy()
            for slot, value in zip(self.slots, values, strict=True):
                args[slot] = _pointer(value)
        try:
            _raw_launch(self.kernel, grid or self.grid, self.device_index, args)
        except (AttributeError, TypeError) as exc:
            self.owner.fall_back(exc)
            return False
        return True
