"""Drive tritonbits' direct-launch machinery (`tritonbits._launcher`: CachedLauncher's compiled-kernel cache,
`bind`, BoundLaunch) on a machine without a GPU, under the Triton interpreter.

Under TRITON_INTERPRET=1 every CachedLauncher is disabled (`enabled` is False: Triton's interpreter returns no
CompiledKernel), so the fast path that a GPU takes on every cached call never runs on the CPU. `stubbed_launches`
turns it on for the duration of a `with` block:

- each launcher's JIT entry (`launcher.fn[grid](...)`: Triton's compile + launch) is wrapped so that it returns
  a `FakeKernel` standing in for the CompiledKernel (what `CachedLauncher.__call__` caches, as a
  `_launcher.Compiled`, and `bind` binds);
- `tritonbits._launcher._raw_launch` (the one line that touches the driver: the raw stream and
  `CompiledKernel.run`) is replaced.

`execute=True` (tests): the JIT entry still runs the kernel through the interpreter, `_pointer` passes tensors
through unchanged (the interpreter cannot read an address given as an int) and the replaced raw launch runs the
kernel with exactly the argument list the fast path passes (runtime args with its slot values, then the
constexprs in order): a wrong slot or a stale bound argument gives a wrong answer. `execute=False` (host-cost
probes on real shapes): nothing runs; the JIT entry and the raw launch return at once, `_pointer` is the real
one (tensors become addresses, as on a GPU).

What this cannot check: the raw launch itself (`torch._C._cuda_getCurrentRawStream`, the argument convention of
`CompiledKernel.run` or of the C launch that `_launcher._compiled` calls directly under Triton 3.6) and Triton's
specialization rules on a real compile: a GPU session verifies those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tritonbits import _launcher


@dataclass
class FakeKernel:
    """Stands in for a CompiledKernel: has `packed_metadata` (what CachedLauncher checks before caching) and
    replays a launch through the interpreted function."""

    fn: Any
    n_args: int
    options: dict
    execute: bool
    packed_metadata: tuple = ()
    function: None = None

    def run(self, *args) -> None:
        """What `_launcher._compiled` takes as the launch callable; the replaced raw launch calls `replay`."""
        raise AssertionError("a stubbed launch replays through the launch stub's raw launch")

    def replay(self, grid: tuple, args: list) -> None:
        if not self.execute:
            return
        names = self.fn.arg_names
        constexprs = dict(zip(names[self.n_args :], args[self.n_args :], strict=True))
        self.fn[grid](*args[: self.n_args], **constexprs, **self.options)


@dataclass
class LaunchLog:
    """Counts what ran: `raw` direct launches (the fast path), `jit` launches through the JIT entry."""

    raw: int = 0
    jit: int = 0


class _Entry:
    """A launcher's JIT entry: the interpreted function (execute), or a stub that only builds the FakeKernel."""

    def __init__(self, real: Any, execute: bool, log: LaunchLog) -> None:
        self.real, self.execute, self.log = real, execute, log
        self.arg_names = list(real.arg_names)
        self.__name__ = real.__name__

    def __getitem__(self, grid: tuple):
        def run(*args, **kwargs):
            self.log.jit += 1
            constexpr_names = set(self.arg_names[len(args) :])
            options = {k: v for k, v in kwargs.items() if k not in constexpr_names}
            if self.execute:
                self.real[grid](*args, **kwargs)
            return FakeKernel(self.real, len(args), options, self.execute)

        return run


def _raw_launch(log: LaunchLog):
    def launch(compiled: _launcher.Compiled, grid: tuple, device_index: int | None, args) -> None:
        log.raw += 1
        compiled.kernel.replay(grid, list(args))

    return launch


@contextlib.contextmanager
def stubbed_launches(launchers: Iterable[_launcher.CachedLauncher], *, execute: bool) -> Iterator[LaunchLog]:
    """Enable `launchers` with a fake compiled-kernel cache and a replaced raw launch (see the module doc);
    restore everything on exit (the launchers' compiled caches are emptied on the way in and out)."""
    launchers = list(launchers)
    log = LaunchLog()
    saved = [(lc, lc.fn, lc.enabled, lc.compiled) for lc in launchers]
    saved_raw, saved_pointer = _launcher._raw_launch, _launcher._pointer
    try:
        for lc in launchers:
            lc.fn = _Entry(lc.fn, execute, log)
            lc.enabled = True
            lc.compiled = {}
        _launcher._raw_launch = _raw_launch(log)  # type: ignore[assignment]
        if execute:
            _launcher._pointer = lambda x: x  # type: ignore[assignment]
        yield log
    finally:
        _launcher._raw_launch = saved_raw  # type: ignore[assignment]
        _launcher._pointer = saved_pointer  # type: ignore[assignment]
        for lc, fn, enabled, _compiled in saved:
            lc.fn, lc.enabled, lc.compiled = fn, enabled, {}
