"""linear_4bit's eager plans (ops/linear_4bit.py, the NOTE on eager plans): a call with a new key is validated and
planned, a call with a seen key reuses the plan; each key component makes a new plan; the plans per weight are
bounded; a quant-state change drops them; a plan keeps no call's tensors. `stubbed_launches(execute=True)` runs
the bound-launch path on the CPU (everything but the raw launch: see tritonbits_harness.launch_stub), with every
result checked against the exact weight's product."""

import gc
import weakref

import pytest
import torch

import tritonbits
from tritonbits import _launcher
from tritonbits.ops import dequantize_4bit as dq
from tritonbits.ops import linear_4bit as L
from tritonbits_harness.launch_stub import stubbed_launches
from tritonbits_harness.tolerance import assert_matmul

N, K = 40, 1024  # under the interpreter's heuristic (4 SMs) the split-K reduce runs for gemv2 at M=1 (8 chunks of
# 128) and M=2 (2 chunks; fp32 x at M=3: 4) and for the gemm at M=3 (2 splits of 4 chunks); dequantize + matmul from
# M=129; the "gemv2-one-chunk" case below gives M=1 a BLOCK_K of K (no workspace: out and bias written directly)


def weight_of(dtype, gen, quantize, **kwargs):
    w = (torch.randn(N, K, generator=gen) * 0.5).to(dtype)
    kwargs = {"blocksize": 64, "quant_type": "nf4", "compress_statistics": True, **kwargs}
    return quantize(w, **kwargs)


@pytest.fixture
def layer(out_dtype, gen, quantize, bnb_dequantize):
    """(packed weight, quant state, the exact dequantized weight)."""
    q, state = weight_of(out_dtype, gen, quantize)
    return q, state, bnb_dequantize(q, state).reshape(N, K)


def fresh(shape, dtype, gen, device):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def plans_of(q, state) -> dict:
    return L._prepare(q, state).launches.get("linear_4bit", {})


@pytest.fixture
def counts(monkeypatch):
    """How often a call was validated (`_check_x_bias`) and planned (`_Plan`)."""
    seen = {"validated": 0, "planned": 0}
    check, plan_init = L._check_x_bias, L._Plan.__init__

    def counted_check(*args):
        seen["validated"] += 1
        return check(*args)

    def counted_plan(self, *args):
        seen["planned"] += 1
        return plan_init(self, *args)

    monkeypatch.setattr(L, "_check_x_bias", counted_check)
    monkeypatch.setattr(L._Plan, "__init__", counted_plan)
    return seen


def checked(x, q, state, w, bias=None):
    out = tritonbits.linear_4bit(x, q, state, bias)
    assert out.shape == (*x.shape[:-1], N) and out.dtype == x.dtype
    assert_matmul(out.reshape(-1, N), x.reshape(-1, K), w, bias)
    return out


@pytest.mark.parametrize("m", [1, 2, 3, 300], ids=["gemv2", "gemv2-splitk", "gemm-splitk", "dequant"])
def test_a_seen_key_reuses_its_plan(m, out_dtype, layer, gen, device, counts):
    q, state, w = layer
    bias = fresh((N,), out_dtype, gen, device)
    checked(fresh((m, K), out_dtype, gen, device), q, state, w, bias)
    assert counts == {"validated": 1, "planned": 1}
    (plan,) = plans_of(q, state).values()
    for _ in range(2):  # new values, same key
        checked(fresh((m, K), out_dtype, gen, device), q, state, w, bias)
    assert counts == {"validated": 1, "planned": 1}
    assert list(plans_of(q, state).values()) == [plan]
    assert plan.dequant == (m == 300)


def _offset(t: torch.Tensor) -> torch.Tensor:
    """t's values at an address 2 bytes past a 16-byte boundary (16-byte alignment differs, strides equal)."""
    buf = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    view = buf[1 : 1 + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16
    return view


def _other_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype != torch.float32 else torch.float16


KEY_CHANGES = {  # (x, bias) -> (x, bias) differing from the base call in one key component
    "x dtype (and bias dtype)": lambda x, b: (x.to(_other_dtype(x)), b.to(_other_dtype(x))),
    "M": lambda x, b: (x[:2].clone(), b),
    "3-D x": lambda x, b: (x.reshape(1, 3, K), b),
    "x strides": lambda x, b: (torch.cat([x, x], 1)[:, ::2], b),
    "x alignment": lambda x, b: (_offset(x), b),
    "no bias": lambda x, b: (x, None),
    "bias strides": lambda x, b: (x, torch.stack([b, b], 1)[:, 0]),
    "bias alignment": lambda x, b: (x, _offset(b)),
    "grad mode": lambda x, b: (x.clone().requires_grad_(), b),
}


@pytest.mark.parametrize("change", list(KEY_CHANGES))
def test_each_key_component_makes_a_new_plan(change, out_dtype, layer, gen, device, counts):
    q, state, w = layer
    x, bias = fresh((3, K), out_dtype, gen, device), fresh((N,), out_dtype, gen, device)
    checked(x, q, state, w, bias)
    x2, bias2 = KEY_CHANGES[change](x, bias)
    assert L._plan_key(x2, bias2) != L._plan_key(x, bias)
    out = checked(x2, q, state, w, bias2)
    assert counts == {"validated": 2, "planned": 2}
    assert len(plans_of(q, state)) == 2
    assert out.requires_grad == (change == "grad mode")
    checked(x2, q, state, w, bias2)  # and the new plan is reused
    checked(x, q, state, w, bias)
    assert counts == {"validated": 2, "planned": 2}


@pytest.mark.gpu
def test_each_device_has_its_plans(gen, quantize):
    """Weights on two devices: each call plans and launches on its own tensors' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    for index in (0, 1):
        device = torch.device("cuda", index)
        q, state = quantize(torch.randn(N, K, generator=gen).to(torch.bfloat16).to(device))
        w = tritonbits.dequantize_4bit(q, state)
        with torch.cuda.device(1 - index):
            for _ in range(2):
                x = torch.randn(1, K, generator=gen).to(torch.bfloat16).to(device)
                assert_matmul(tritonbits.linear_4bit(x, q, state), x, w)
        (plan,) = plans_of(q, state).values()
        assert plan.device == device


def test_plans_per_weight_are_bounded(out_dtype, layer, gen, device):
    q, state, w = layer
    extra = 3
    for m in range(1, L.PLANS_PER_WEIGHT + extra + 1):
        checked(fresh((m, K), out_dtype, gen, device), q, state, w)
    plans = plans_of(q, state)
    assert len(plans) == L.PLANS_PER_WEIGHT
    kept_m = sorted(key[2][0] for key in plans)
    assert kept_m == list(range(extra + 1, L.PLANS_PER_WEIGHT + extra + 1))  # the oldest dropped first
    checked(fresh((1, K), out_dtype, gen, device), q, state, w)  # a dropped key is planned again
    assert len(plans_of(q, state)) == L.PLANS_PER_WEIGHT


def test_quant_state_changes_drop_the_plans(out_dtype, layer, gen, device, bnb_dequantize):
    """Values changed in place are read by the same plan; a reassigned field or another packed tensor gets a new
    prepared weight, hence new plans; answers follow each change."""
    q, state, w = layer
    x = fresh((3, K), out_dtype, gen, device)
    checked(x, q, state, w)
    plans = plans_of(q, state)
    state.absmax.copy_(state.absmax.flip(0))  # new values, same tensor: same plan
    w = bnb_dequantize(q, state).reshape(N, K)
    checked(x, q, state, w)
    assert plans_of(q, state) is plans and len(plans) == 1
    others = [d for d in (torch.float16, torch.bfloat16, torch.float32) if d != state.dtype]
    for dtype in others:  # the Unsloth harness reassigns quant_state.dtype
        state.dtype = dtype
        w = bnb_dequantize(q, state).reshape(N, K)
        checked(x, q, state, w)
        assert plans_of(q, state) is not plans
        plans = plans_of(q, state)
    moved = q.clone()  # the same bytes at another address
    checked(x, moved, state, w)
    assert plans_of(moved, state) is not plans


def test_a_plan_keeps_no_call_tensor(out_dtype, layer, gen, device):
    q, state, w = layer
    for m in (3, 300):
        x, bias = fresh((m, K), out_dtype, gen, device), fresh((N,), out_dtype, gen, device)
        out = checked(x, q, state, w, bias)
        refs = [weakref.ref(t) for t in (x, bias, out)]
        del x, bias, out
        gc.collect()
        assert all(r() is None for r in refs)
    for plan in plans_of(q, state).values():
        for step in plan.steps:
            assert all(step.args[i] is None for i in step.slots)


def test_an_empty_problem_is_not_planned(out_dtype, layer, device, counts):
    q, state, _ = layer
    for _ in range(2):
        out = tritonbits.linear_4bit(torch.empty(0, K, dtype=out_dtype, device=device), q, state)
        assert out.shape == (0, N)
    assert counts == {"validated": 2, "planned": 0}


# --- the bound-launch path on the CPU ---------------------------------------------------------------------

LAUNCHERS = [*L._LAUNCHERS.values(), dq._launcher]


@pytest.mark.parametrize("x_dtype", [None, torch.float32], ids=["x-as-W", "x-fp32"])
@pytest.mark.parametrize(("shape", "steps"), [((1, K), 1), ((1, K), 2), ((2, K), 2), ((3, K), 2), ((1, 3, K), 2),
                                              ((300, K), 1)],
                         ids=["gemv2-one-chunk", "gemv2-m1-split", "gemv2-m2-split", "gemm-splitk", "3-D-splitk",
                              "dequant"])  # fmt: skip
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_bound_launches(with_bias, shape, steps, x_dtype, out_dtype, gen, device, quantize, bnb_dequantize, request,
                        monkeypatch):  # fmt: skip
    """After the first call (which compiles and binds), calls with new tensors go through the BoundLaunches only:
    the kernels run with exactly the arguments the raw launch would get (slots filled with this call's x, bias,
    out, workspace or weight buffer) and the answers are right."""
    if device.type == "cuda":
        pytest.skip("the interpreter stands in for the raw launch (on a GPU the other tests run this path)")
    if "gemv2-one-chunk" in request.node.name:  # M=1 in one K chunk: gemv2 stores out (+ bias) itself
        monkeypatch.setitem(L.HEURISTIC_GEMV2, 1, (8, K, 4))
    x_dtype = x_dtype or out_dtype
    q, state = weight_of(out_dtype, gen, quantize)
    w = bnb_dequantize(q, state).reshape(N, K)
    with stubbed_launches(LAUNCHERS, execute=True) as log:
        bias = fresh((N,), x_dtype, gen, device) if with_bias else None
        checked(fresh(shape, x_dtype, gen, device), q, state, w, bias)
        assert (log.jit, log.raw) == (steps, 0)
        for i in range(1, 3):
            bias = fresh((N,), x_dtype, gen, device) if with_bias else None
            checked(fresh(shape, x_dtype, gen, device), q, state, w, bias)
            assert (log.jit, log.raw) == (steps, i * steps)
        (plan,) = plans_of(q, state).values()
        assert all(step.bound is not None for step in plan.steps)


def test_a_launch_hook_sends_bound_launches_through_triton(out_dtype, gen, device, quantize, bnb_dequantize,
                                                           monkeypatch):  # fmt: skip
    """With a launch hook registered a BoundLaunch launches nothing and the plan goes through the kernel's
    CachedLauncher (Triton's own launcher then): still the right answer."""
    if device.type == "cuda":
        pytest.skip("the interpreter stands in for the raw launch")
    q, state = weight_of(out_dtype, gen, quantize)
    w = bnb_dequantize(q, state).reshape(N, K)
    with stubbed_launches(LAUNCHERS, execute=True) as log:
        checked(fresh((3, K), out_dtype, gen, device), q, state, w)
        monkeypatch.setattr(_launcher, "_hooks_set", lambda: True)
        checked(fresh((3, K), out_dtype, gen, device), q, state, w)
        assert (log.jit, log.raw) == (4, 0)
        monkeypatch.setattr(_launcher, "_hooks_set", lambda: False)
        checked(fresh((3, K), out_dtype, gen, device), q, state, w)
        assert (log.jit, log.raw) == (4, 2)


def test_a_refused_direct_launch_falls_back(out_dtype, gen, device, quantize, bnb_dequantize):
    """A CompiledKernel that refuses the direct call (another Triton): the launcher falls back to Triton's own
    path for good, the plan's bound launches step aside, the answer is right."""
    if device.type == "cuda":
        pytest.skip("the interpreter stands in for the raw launch")
    q, state = weight_of(out_dtype, gen, quantize)
    w = bnb_dequantize(q, state).reshape(N, K)
    with stubbed_launches(LAUNCHERS, execute=True):

        def refuse(kernel, grid, device_index, args):
            raise TypeError("launcher signature changed")

        checked(fresh((3, K), out_dtype, gen, device), q, state, w)
        # assigned, not monkeypatched: stubbed_launches restores the real _raw_launch on exit, and monkeypatch's
        # teardown would put back the value it saw here, the stub's (leaking it into the worker's later tests)
        _launcher._raw_launch = refuse  # type: ignore[assignment]
        checked(fresh((3, K), out_dtype, gen, device), q, state, w)
        fused = L._linear_4bit_gemv2_kernel if out_dtype == torch.float32 else L._linear_4bit_gemm_kernel  # M=3
        assert not L._LAUNCHERS[fused].enabled
        checked(fresh((3, K), out_dtype, gen, device), q, state, w)
