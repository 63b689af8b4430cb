"""The eager fast paths of quantize_4bit and quantize_blockwise (the NOTEs above _EAGER in ops/quantize_4bit.py and
ops/blockwise_8bit.py): a call is validated once per argument combination and launched through bound launches,
planned once per (element count, x's address mod 16). `stubbed_launches(execute=True)` runs the bound-launch path
on the CPU (everything but the raw launch: see tritonbits_harness.launch_stub), every result checked byte for byte
against the oracle (against bnb CUDA in the GPU sessions); bad inputs are refused by name after a good call primed
the caches, with no launch."""

import pytest
import torch

import tritonbits
import tritonbits_reference as R
from tritonbits import _launcher
from tritonbits.ops import blockwise_8bit as b8
from tritonbits.ops import quantize_4bit as q4
from tritonbits_harness import op_cases
from tritonbits_harness.launch_stub import stubbed_launches
from tritonbits_harness.tolerance import assert_exact

LAUNCHERS = [q4._launcher, b8._quantize_launcher]


@pytest.fixture
def stub():
    with stubbed_launches(LAUNCHERS, execute=True) as log:
        yield log


def count_calls(monkeypatch, seen: dict, label: str, owner, name: str) -> None:
    """Replace owner.name by a wrapper that adds 1 to seen[label] per call."""
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        seen[label] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.fixture
def counts(monkeypatch):
    """How often quantize_4bit validated (_check_args), planned (_EagerPlan) and launched bound (BoundLaunch)."""
    seen = {"validated": 0, "planned": 0, "bound": 0}
    count_calls(monkeypatch, seen, "validated", q4, "_check_args")
    count_calls(monkeypatch, seen, "planned", q4._EagerPlan, "__init__")
    count_calls(monkeypatch, seen, "bound", _launcher.BoundLaunch, "__call__")
    return seen


@pytest.fixture(autouse=True)
def empty_caches():
    q4._EAGER.clear()
    b8._EAGER.clear()
    yield
    q4._EAGER.clear()
    b8._EAGER.clear()


def checked(x, **kwargs):
    """quantize_4bit(x, **kwargs), byte-equal with bnb CUDA on a GPU, with the oracle on the CPU (packed bytes,
    absmax, nested state)."""
    packed, state = tritonbits.quantize_4bit(x, **kwargs)
    kwargs = {"blocksize": 64, "quant_type": "fp4", "compress_statistics": False, **kwargs}
    storage = kwargs.pop("quant_storage", torch.uint8)
    if x.device.type == "cuda":  # the contract on a GPU is bnb CUDA's bytes (the oracle sums the mean in numpy)
        import bitsandbytes.functional as F

        want_packed, want = F.quantize_4bit(x, **kwargs)
    else:
        want_packed, want = R.quantize_4bit_cuda(x, **kwargs)
    assert packed.dtype == storage and packed.shape[1] == 1
    assert_exact(packed.reshape(-1).view(torch.uint8)[: want_packed.numel()], want_packed.reshape(-1).to(x.device))
    assert_exact(state.absmax, want.absmax.to(x.device))
    assert_exact(state.code, want.code.to(x.device))
    assert tuple(state.shape) == tuple(x.shape) and state.dtype == x.dtype
    assert (state.state2 is None) == (want.state2 is None)
    if want.state2 is not None:
        assert_exact(state.offset.reshape(()), want.offset.reshape(()).to(x.device))
        assert_exact(state.state2.absmax, want.state2.absmax.to(x.device))
        assert_exact(state.state2.code, want.state2.code.to(x.device))
    return packed, state


def fresh(shape, gen, device, dtype=torch.bfloat16):
    return (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_seen_call_is_validated_and_planned_once(quant_type, nested, gen, device, stub, counts):
    kw = {"blocksize": 64, "quant_type": quant_type, "compress_statistics": nested}
    checked(fresh((33, 64), gen, device), **kw)
    assert counts == {"validated": 1, "planned": 1, "bound": 0}
    (plans,) = q4._EAGER.values()
    (plan,) = plans.values()
    assert plan.q4 is not None and (plan.q8 is not None) == nested
    jit = stub.jit
    for i in range(3):  # new values, same call: bound launches only, byte-equal results
        checked(fresh((33, 64), gen, device), **kw)
        assert counts == {"validated": 1, "planned": 1, "bound": (i + 1) * (2 if nested else 1)}
    assert stub.jit == jit
    assert list(plans.values()) == [plan]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_states_code_copies_are_fresh_tensors_written_by_the_kernels(quant_type, gen, device, stub):
    """The bound launches write each state's code and state2.code (no clone): every call's are new tensors holding
    the format's values, and a state's copy edited in place changes neither the tables nor the next call's."""
    from tritonbits import formats

    kw = {"blocksize": 64, "quant_type": quant_type, "compress_statistics": True}
    tables = (formats.code_table(quant_type, device), formats.code_table("dynamic", device))
    want = [t.clone() for t in tables]
    _, first = checked(fresh((33, 64), gen, device), **kw)
    first.code.fill_(7.0)
    first.state2.code.fill_(7.0)
    for _ in range(2):  # the second and third calls take the bound launches
        _, state = checked(fresh((33, 64), gen, device), **kw)  # checked: the copies equal bnb's / the oracle's
        for got, table, values in zip((state.code, state.state2.code), tables, want, strict=True):
            assert got is not table and got.data_ptr() != table.data_ptr()
            assert got.data_ptr() not in (first.code.data_ptr(), first.state2.code.data_ptr())
            assert_exact(got, values)
            assert_exact(table, values)


@pytest.mark.parametrize(
    ("change", "validated"),
    [
        ({"blocksize": 128}, 2),
        ({"quant_type": "fp4"}, 2),
        ({"compress_statistics": False}, 2),
        ({"quant_storage": torch.float32}, 2),
        ({"dtype": torch.float16}, 2),
        ({"shape": (5, 7)}, 1),  # another element count: a new plan of the same validated combination
        ({"misaligned": True}, 1),  # x 2 bytes past a 16-byte boundary: no element pairs, a new plan
    ],
    ids=lambda v: str(v) if not isinstance(v, int) else "",
)
def test_each_key_component_makes_a_new_plan(change, validated, gen, device, stub, counts):
    base = {"blocksize": 64, "quant_type": "nf4", "compress_statistics": True}
    checked(fresh((33, 64), gen, device), **base)
    kw = {**base, **{k: v for k, v in change.items() if k not in ("dtype", "shape", "misaligned")}}
    x = fresh(change.get("shape", (33, 64)), gen, device, change.get("dtype", torch.bfloat16))
    if change.get("misaligned"):
        x = torch.cat([x.new_zeros(1), x.reshape(-1)])[1:].reshape(x.shape)
        assert x.data_ptr() % 16 == 2
    for _ in range(2):
        checked(x, **kw)
    assert counts["validated"] == validated and counts["planned"] == 2
    assert sum(map(len, q4._EAGER.values())) == 2


def test_non_contiguous_and_empty_inputs(gen, device, stub):
    x = fresh((64, 66), gen, device)[:, 1:65]
    assert not x.is_contiguous()
    for _ in range(2):
        checked(x, quant_type="nf4", compress_statistics=True)
    for _ in range(2):
        packed, state = tritonbits.quantize_4bit(torch.empty(0, 64, device=device), compress_statistics=True)
        assert packed.numel() == 0 and state.absmax.numel() == 0


def test_plans_are_bounded(gen, device, stub, monkeypatch):
    monkeypatch.setattr(q4, "EAGER_MAX", 3)
    for n in range(1, 6):
        checked(fresh((n, 64), gen, device), quant_type="nf4")
    (plans,) = q4._EAGER.values()
    assert [key[0] for key in plans] == [3 * 64, 4 * 64, 5 * 64]  # the oldest dropped first
    for blocksize in (64, 128, 256, 512, 1024):
        checked(fresh((2, 1024), gen, device), quant_type="nf4", blocksize=blocksize)
    assert len(q4._EAGER) == 3


def test_a_bind_from_another_stub_context_is_not_used(gen, device, counts):
    """A launcher's replaced compiled cache (launch_stub enters and leaves with a fresh one) voids its binds: the
    plan made under execute=False (no kernel runs) relaunches under execute=True and stays exact."""
    with stubbed_launches(LAUNCHERS, execute=False):
        tritonbits.quantize_4bit(fresh((33, 64), gen, device), quant_type="nf4", compress_statistics=True)
    with stubbed_launches(LAUNCHERS, execute=True):
        for _ in range(2):
            checked(fresh((33, 64), gen, device), quant_type="nf4", compress_statistics=True)
    assert counts["planned"] == 1


def test_a_launch_hook_takes_the_launchers_path(gen, device, stub, counts, monkeypatch):
    checked(fresh((33, 64), gen, device), quant_type="fp4", compress_statistics=True)
    monkeypatch.setattr(_launcher, "_hooks_set", lambda: True)
    raw, jit = stub.raw, stub.jit
    checked(fresh((33, 64), gen, device), quant_type="fp4", compress_statistics=True)
    assert (stub.raw, stub.jit) == (raw, jit + 2)  # both launches through Triton's own entry (the hooks'), exact


ROWS = [(op, v, row) for op, v, row in op_cases.bad_rows() if op in ("quantize_4bit", "quantize_blockwise")]


@pytest.mark.parametrize(("op", "variant", "row"), ROWS, ids=[f"{op}-{v}-{row.id}" for op, v, row in ROWS])
def test_bad_input_after_a_primed_plan_is_refused(op, variant, row, gen, device, stub):
    """test_bad_inputs.py's rows with the fast paths' caches primed and bound (the stub enables binding)."""
    kw = op_cases.make(op, variant, device, gen, torch.bfloat16)
    for _ in range(2):
        op_cases.call(op, kw)
    if "out" not in kw:
        (plans,) = (q4 if op == "quantize_4bit" else b8)._EAGER.values()  # primed and bound
        assert plans and all(p.q4 if op == "quantize_4bit" else p.first.bound for p in plans.values())
    row.edit(kw, device)
    raw, jit = stub.raw, stub.jit
    with pytest.raises(Exception) as info:
        op_cases.call(op, kw)
    assert (stub.raw, stub.jit) == (raw, jit), f"{row.id}: reached a kernel launch"
    assert isinstance(info.value, row.exc), f"{row.id}: raised {type(info.value).__name__}: {info.value}"
    assert row.name in str(info.value), f"{row.id}: message does not name {row.name!r}: {info.value}"


def test_unhashable_and_look_alike_arguments_are_refused_after_priming(gen, device, stub):
    x = fresh((33, 64), gen, device)
    checked(x, blocksize=64, quant_type="nf4")
    for kwargs, exc, name in [
        ({"quant_type": ["nf4"]}, ValueError, "quant_type"),
        ({"blocksize": 64.0}, ValueError, "blocksize"),
        ({"compress_statistics": 0}, TypeError, "compress_statistics"),
        ({"quant_storage": "uint8"}, TypeError, "quant_storage"),
    ]:
        with pytest.raises(exc, match=name):
            tritonbits.quantize_4bit(x, **{"blocksize": 64, "quant_type": "nf4", **kwargs})


def test_cpu_tensor_refused_without_the_interpreter_after_priming(gen, device, stub, monkeypatch):
    from tritonbits import _runtime

    if device.type != "cpu":
        pytest.skip("a CPU tensor is the interpreter's")
    x = fresh((33, 64), gen, device)
    checked(x, quant_type="nf4")
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    with pytest.raises(ValueError, match="A is a CPU tensor"):
        tritonbits.quantize_4bit(x, quant_type="nf4")


# --- quantize_blockwise ---------------------------------------------------------------------------------


def checked8(x, **kwargs):
    """quantize_blockwise(x, **kwargs), byte-equal with bnb CUDA on a GPU, with the oracle on the CPU (codes,
    absmax, code; nested: offset, state2)."""
    q, state = tritonbits.quantize_blockwise(x, **kwargs)
    nested = kwargs.get("nested", False)
    if x.device.type == "cuda":  # bnb CUDA's bytes on a GPU (the oracle's reciprocal and mean are not its own)
        import bitsandbytes.functional as F

        want_q, st = F.quantize_blockwise(x, blocksize=kwargs.get("blocksize", 4096), nested=nested)
        want = {"absmax": st.absmax, "code": st.code}
        if nested:
            want.update(offset=st.offset, absmax2=st.state2.absmax, code2=st.state2.code)
    else:
        want_q, want = R.quantize_blockwise_cuda(x, blocksize=kwargs.get("blocksize", 4096), nested=nested)
    assert_exact(q, want_q.to(x.device))
    assert_exact(state.absmax, want["absmax"].to(x.device))
    assert_exact(state.code, want["code"].to(x.device))
    assert tuple(state.shape) == tuple(x.shape) and state.dtype == x.dtype and (state.state2 is None) != nested
    if nested:
        assert_exact(state.offset.reshape(()), want["offset"].reshape(()).to(x.device))
        assert_exact(state.state2.absmax, want["absmax2"].to(x.device))
        assert_exact(state.state2.code, want["code2"].to(x.device))
    return q, state


@pytest.fixture
def counts8(monkeypatch):
    seen = {"validated": 0, "planned": 0}
    count_calls(monkeypatch, seen, "validated", b8, "check_input")
    count_calls(monkeypatch, seen, "planned", b8._EagerPlan, "__init__")
    return seen


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_blockwise_seen_call_is_validated_and_planned_once(blocksize, nested, gen, device, stub, counts8):
    checked8(fresh((33, 70), gen, device), blocksize=blocksize, nested=nested)
    assert counts8 == {"validated": 1, "planned": 1}
    (plans,) = b8._EAGER.values()
    (plan,) = plans.values()
    assert plan.first.bound is not None and (plan.second is not None and plan.second.bound is not None) == nested
    raw, jit = stub.raw, stub.jit
    for _ in range(3):
        checked8(fresh((33, 70), gen, device), blocksize=blocksize, nested=nested)
    launches = 3 * (2 if nested else 1)
    assert counts8 == {"validated": 1, "planned": 1} and (stub.raw, stub.jit) == (raw + launches, jit)


@pytest.mark.parametrize(
    ("change", "validated"),
    [
        ({"blocksize": 64}, 2),
        ({"nested": True}, 2),
        ({"dtype": torch.float32}, 2),
        ({"shape": (5, 7)}, 1),
        ({"misaligned": True}, 1),
    ],
    ids=lambda v: str(v) if not isinstance(v, int) else "",
)
def test_blockwise_each_key_component_makes_a_new_plan(change, validated, gen, device, stub, counts8):
    checked8(fresh((33, 70), gen, device), blocksize=256)
    x = fresh(change.get("shape", (33, 70)), gen, device, change.get("dtype", torch.bfloat16))
    if change.get("misaligned"):
        x = torch.cat([x.new_zeros(1), x.reshape(-1)])[1:].reshape(x.shape)
    for _ in range(2):
        checked8(x, blocksize=change.get("blocksize", 256), nested=change.get("nested", False))
    assert counts8 == {"validated": validated, "planned": 2}


def test_blockwise_empty_non_contiguous_and_other_paths_after_priming(gen, device, stub):
    checked8(fresh((33, 70), gen, device), blocksize=256)
    checked8(fresh((64, 66), gen, device)[:, 1:65], blocksize=256)
    q, state = tritonbits.quantize_blockwise(torch.empty(0, 8, device=device), blocksize=256)
    assert q.shape == (0, 8) and state.absmax.numel() == 0
    x = fresh((33, 70), gen, device)
    for nested in (0, 1.0):
        with pytest.raises(TypeError, match="nested"):
            tritonbits.quantize_blockwise(x, blocksize=256, nested=nested)
    for blocksize in (256.0, [256], True):
        with pytest.raises(ValueError, match="blocksize"):
            tritonbits.quantize_blockwise(x, blocksize=blocksize)
