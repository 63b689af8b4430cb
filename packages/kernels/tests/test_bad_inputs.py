"""The bad-input table of every public op (tritonbits_harness.op_cases): each invalid argument raises the row's
exception type with the argument's name in the message, and no kernel is launched. Each row runs twice: on a
fresh call, and after a good call primed the op's caches (quant_state.prepare's entry, the bound launch),
with the same objects then made invalid in place.

The per-op test files keep their own bad-argument tests (test_dequantize_4bit.py::test_bad_arguments and
the like); this table is the one place that lists every argument of every op."""

import pytest
import torch

from tritonbits._launcher import BoundLaunch, CachedLauncher
from tritonbits_harness import op_cases

ROWS = op_cases.bad_rows()


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any tritonbits kernel launches (the cached launcher, a bound launch, or Triton's own
    JIT entry point, which wrap_triton and the fallback path use)."""
    launched: list[str] = []

    def refuse(name):
        def fail(*args, **kwargs):
            launched.append(name)
            raise AssertionError(f"an invalid input reached a kernel launch ({name})")

        return fail

    monkeypatch.setattr(CachedLauncher, "__call__", refuse("CachedLauncher"))
    monkeypatch.setattr(BoundLaunch, "__call__", refuse("BoundLaunch"))
    return launched


@pytest.mark.parametrize("primed", [False, True], ids=["fresh", "primed"])
@pytest.mark.parametrize(("op", "variant", "row"), ROWS, ids=[f"{op}-{v}-{row.id}" for op, v, row in ROWS])
def test_bad_input_is_refused_by_name(op, variant, row, primed, device, gen, request):
    dtype = torch.bfloat16
    kw = op_cases.make(op, variant, device, gen, dtype)
    if primed:
        op_cases.call(op, kw)  # fills prepare()'s cache and the bound launch for these very objects
    row.edit(kw, device)
    launched = request.getfixturevalue("no_launch")
    with pytest.raises(Exception) as info:
        op_cases.call(op, kw)
    assert not launched, f"{row.id}: reached a kernel launch"
    assert isinstance(info.value, row.exc), f"{row.id}: raised {type(info.value).__name__}: {info.value}"
    assert row.name in str(info.value), f"{row.id}: message does not name {row.name!r}: {info.value}"


def test_every_op_has_a_table():
    """A public op added to tritonbits.__all__ without a registry entry fails here."""
    import tritonbits

    public = {n for n in tritonbits.__all__ if callable(getattr(tritonbits, n)) and n[0].islower()}
    assert public <= set(op_cases.CASES), f"no op_cases entry for {sorted(public - set(op_cases.CASES))}"
    for name, case in op_cases.CASES.items():
        assert case.bad, f"{name}: empty bad-input table"


@pytest.mark.parametrize(("op", "variant"), op_cases.variants())
def test_the_good_call_of_each_variant_runs(op, variant, device, gen):
    """Each variant's call is valid (so a row's error comes from its edit, not from the base call)."""
    kw = op_cases.make(op, variant, device, gen, torch.bfloat16)
    for t in op_cases.outputs(op, op_cases.call(op, kw)):
        assert isinstance(t, torch.Tensor) and t.device.type == device.type


@pytest.mark.parametrize("primed", [False, True], ids=["fresh", "primed"])
@pytest.mark.parametrize("op", list(op_cases.CASES))
def test_the_launch_spy_sees_a_valid_call(op, primed, device, gen, request):
    """The no-launch check can fail: a valid call (fresh, or served from the caches) is caught launching."""
    variant = next(iter(op_cases.CASES[op].variants))
    kw = op_cases.make(op, variant, device, gen, torch.bfloat16)
    if primed:
        op_cases.call(op, kw)
    launched = request.getfixturevalue("no_launch")
    with pytest.raises(AssertionError, match="reached a kernel launch"):
        op_cases.call(op, kw)
    assert launched
