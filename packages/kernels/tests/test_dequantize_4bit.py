"""tritonbits.dequantize_4bit: bit-exact with bitsandbytes (CUDA) and with the numpy oracle (interpreter)."""

import json
import re

import pytest
import torch

import tritonbits
import tritonbits_reference as R
from tritonbits import _runtime
from tritonbits import quant_state as qs_module
from tritonbits.ops import dequantize_4bit as dq_module
from tritonbits.quant_state import PreparedWeight
from tritonbits_harness.tolerance import assert_exact

SHAPES_CPU = [(64,), (5,), (33, 7), (130, 64), (3, 1025)]
SHAPES_GPU = [*SHAPES_CPU, (4096, 1024), (1000, 4097), (11008, 4096 + 64)]
QUANT_STORAGE = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]


def shapes(device):
    return SHAPES_GPU if device.type == "cuda" else SHAPES_CPU


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", R.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", R.BLOCKSIZES_4BIT)
def test_equals_bnb(blocksize, quant_type, nested, out_dtype, device, gen, quantize, bnb_dequantize):
    for shape in shapes(device):
        w = (torch.randn(shape, generator=gen) * 2).to(out_dtype)
        q, state = quantize(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        want = bnb_dequantize(q, state).reshape(shape)
        got = tritonbits.dequantize_4bit(q, state)
        assert_exact(got, want.to(got.device))
        out = poisoned(shape, out_dtype, device)
        assert tritonbits.dequantize_4bit(q, state, out=out) is out
        assert_exact(out, want.to(out.device))


@pytest.mark.parametrize("quant_storage", QUANT_STORAGE, ids=str)
def test_quant_storage_dtypes(quant_storage, out_dtype, device, gen, quantize, bnb_dequantize):
    w = torch.randn(96, 128, generator=gen).to(out_dtype)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=quant_storage)
    assert q.dtype == quant_storage
    assert_exact(tritonbits.dequantize_4bit(q, state), bnb_dequantize(q, state).reshape(w.shape).to(device))


def test_params4bit_carries_its_quant_state(out_dtype, device, gen, bnb_dequantize):
    from tritonbits_reference import bnb as RB

    param = RB.params4bit(torch.randn(256, 192, generator=gen).to(out_dtype), device=device)
    got = tritonbits.dequantize_4bit(param)
    assert_exact(got, bnb_dequantize(param.data, param.quant_state).to(device))


def test_oracle_agrees_on_gpu_states(out_dtype, device, gen, quantize):
    """Where bnb quantized on the GPU, the numpy oracle still equals the kernel (and bnb)."""
    w = torch.randn(257, 320, generator=gen).to(out_dtype)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert_exact(tritonbits.dequantize_4bit(q, state).cpu(), R.dequantize_4bit(q, state))


def test_manual_bf16_rounding_path(device, gen, quantize, bnb_dequantize):
    """The integer round-to-nearest-even store (sm75, interpreter) is exact, forced on any device."""
    w = torch.randn(513, 384, generator=gen).to(torch.bfloat16)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    out = poisoned(w.shape, torch.bfloat16, device)
    dq_module.launch_weight(PreparedWeight.build(q, tritonbits.QuantState.from_any(state)), out, manual_bf16=True)
    assert_exact(out, bnb_dequantize(q, state).reshape(w.shape).to(device))


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("evict", [False, True], ids=["no-hints", "hints"])
def test_eviction_hints_on_and_off_are_exact(evict, blocksize, out_dtype, device, gen, quantize, bnb_dequantize):
    """Both settings of the eviction-hint switch (EVICT picks the default) equal bnb."""
    for quant_type in R.QUANT_TYPES:
        for shape in [(130, 64), (3, 1025), *([(4096, 1024), (1000, 4097)] if device.type == "cuda" else [])]:
            w = torch.randn(shape, generator=gen).to(out_dtype)
            q, state = quantize(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
            out = poisoned(shape, out_dtype, device)
            dq_module.launch_weight(PreparedWeight.build(q, tritonbits.QuantState.from_any(state)), out, evict=evict)
            assert_exact(out, bnb_dequantize(q, state).reshape(shape).to(device))


def test_plan_applies_overrides(device):
    """The sweep overrides reach the launch: tile, warps, register cap, eviction hints."""
    q, st = _state(device, n=4096)
    w = PreparedWeight.build(q, st)
    fields = (w.A, w.absmax, w.code2, w.absmax2, w.offset)
    out = torch.empty(4096, dtype=torch.float16, device=device)
    overrides = {"bytes_per_program": 512, "num_warps": 1, "maxnreg": 40, "evict": False}
    grid, _, constexprs, options = dq_module.plan(*fields, out, 64, w.blocksize2, "nf4", **overrides)
    assert grid == (4, 1, 1) and constexprs["ROWS"] * constexprs["COLS"] == 512
    assert options["num_warps"] == 1 and options["maxnreg"] == 40
    assert constexprs["STREAM"] == constexprs["TABLE"] == ""
    _, _, constexprs, options = dq_module.plan(*fields, out, 64, w.blocksize2, "nf4")
    assert "maxnreg" not in options and constexprs["STREAM"] == ("evict_first" if dq_module.EVICT else "")


@pytest.mark.gpu
@pytest.mark.parametrize("use_asm", [False, True], ids=["fusion-off", "ptx-rn"])
def test_nested_absmax_paths_are_exact(use_asm, out_dtype, device, gen, quantize, bnb_dequantize):
    """Both ways of forbidding the FMA (compile with fusion off / mul.rn+add.rn PTX) equal bnb."""
    w = (torch.randn(4096, 1024, generator=gen) * 5).to(out_dtype)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    out = poisoned(w.shape, out_dtype, device)
    dq_module.launch_weight(PreparedWeight.build(q, tritonbits.QuantState.from_any(state)), out, use_asm=use_asm)
    assert_exact(out, bnb_dequantize(q, state))


@pytest.mark.gpu
def test_fused_multiply_add_would_not_be_exact(device, gen, quantize):
    """The test above can fail: an FMA in the nested absmax changes outputs (so exactness is earned)."""
    w = (torch.randn(4096, 1024, generator=gen) * 5).to(torch.float32)
    _, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    code2 = state.state2.code[state.absmax.long()]
    scale = state.state2.absmax.repeat_interleave(256)[: state.absmax.numel()]
    fused = torch.addcmul(state.offset.expand_as(code2), code2, scale)  # one rounding
    two = code2 * scale + state.offset
    assert not torch.equal(fused, two)


@pytest.mark.gpu
def test_fake_sm75_takes_the_manual_bf16_path(device, fake_capability, gen, quantize, bnb_dequantize):
    fake_capability((7, 5))
    assert not _runtime.native_bf16_conversion(device)
    w = torch.randn(300, 256, generator=gen).to(torch.bfloat16)
    q, state = quantize(w, blocksize=128, quant_type="fp4", compress_statistics=True)
    assert_exact(tritonbits.dequantize_4bit(q, state), bnb_dequantize(q, state))


@pytest.mark.gpu
def test_offsets_past_2_pow_31(device):
    """2**31 + 2**20 outputs: int64 offsets. bnb's C entry points take an int count, so the oracle judges
    windows at the start, across 2**31 and at the end, each as a sub-state aligned to its blocks."""
    n = 2**31 + 2**20
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device, generator=gen)
    absmax = torch.rand(n // 64, device=device, generator=gen) + 0.5
    state = tritonbits.QuantState(absmax=absmax, shape=torch.Size([n]), dtype=torch.float16, blocksize=64)
    got = tritonbits.dequantize_4bit(q, state)
    for start in (0, 2**31 - 2**19, n - 2**20):
        window = R.ReferenceQuantState(
            absmax=absmax[start // 64 : (start + 2**20) // 64].cpu(), shape=torch.Size([2**20]),
            dtype=torch.float16, blocksize=64, quant_type="nf4", code=torch.empty(0),
        )  # fmt: skip
        want = R.dequantize_4bit(q[start // 2 : (start + 2**20) // 2].cpu(), window)
        assert_exact(got[start : start + 2**20].cpu(), want)
    del got


def test_opcheck(device, gen, quantize):
    """Every registered op passes opcheck: the custom ops on CPU (interpreter) and CUDA, the triton_op on CUDA."""
    w = torch.randn(32, 64, generator=gen).to(torch.float16)
    for nested in (False, True):
        q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        p = PreparedWeight.build(q, tritonbits.QuantState.from_any(state))
        fields = (p.A, p.absmax, p.code2, p.absmax2, p.offset, 64, p.blocksize2, "nf4")
        args = (*fields, [32, 64], torch.float16)
        torch.library.opcheck(torch.ops.tritonbits.dequantize_4bit.default, args)
        out = torch.empty(32, 64, dtype=torch.float16, device=device)
        torch.library.opcheck(torch.ops.tritonbits.dequantize_4bit.out, (*fields, out))
        if device.type == "cuda":
            torch.library.opcheck(torch.ops.tritonbits.dequantize_4bit_triton_op.default, args)


@pytest.mark.gpu
def test_compiles_fullgraph_in_an_mlp(device, gen):
    """Three bnb Linear4bit weights dequantized inside torch.compile(fullgraph=True): no graph break, the
    triton_op in the graph (Inductor launches the kernel), weights bit-exact."""
    from tritonbits_reference import bnb as RB

    layers = [RB.linear4bit(i, o, dtype=torch.bfloat16, device=device, generator=gen)
              for i, o in ((256, 512), (512, 512), (512, 256))]  # fmt: skip
    weights = [(layer.weight.data, layer.weight.quant_state) for layer in layers]

    def mlp(x):
        dequantized = [tritonbits.dequantize_4bit(packed, state) for packed, state in weights]
        for w in dequantized:
            x = torch.nn.functional.linear(x, w)
        return x, dequantized

    x = torch.randn(8, 256, dtype=torch.bfloat16, device=device)
    targets: list[str] = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(mlp, fullgraph=True, backend=record)(x)
    ours = [t for t in targets if "dequantize_4bit" in t]
    assert len(ours) == 3 and all("triton_op" in t for t in ours), targets
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    (y, got), (y_eager, want) = compiled(x), mlp(x)
    for g, w in zip(got, want, strict=True):
        assert_exact(g, w)
    torch.testing.assert_close(y, y_eager)


@pytest.mark.gpu
def test_compiled_out_variant(device, gen, quantize):
    """out= under torch.compile(fullgraph=True) goes through the .out overload and writes the buffer."""
    w = torch.randn(64, 96, generator=gen).to(torch.bfloat16)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    want = tritonbits.dequantize_4bit(q, state)

    def fn(buf):
        tritonbits.dequantize_4bit(q, state, out=buf)
        return buf * 2

    torch._dynamo.reset()
    buf = poisoned(want.shape, want.dtype, device)
    doubled = torch.compile(fn, fullgraph=True)(buf)
    assert_exact(buf, want)
    assert_exact(doubled, want * 2)


# --- bad input ----------------------------------------------------------------------------------------


def _state(device, n=256, nested=True, dtype=torch.float16):
    w = torch.randn(n)
    q, st = R.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=nested)
    st = tritonbits.QuantState.from_any(st)
    move = lambda t: t.to(device)
    st.absmax = move(st.absmax)
    if nested:
        st.offset = move(st.offset)
        st.state2.absmax, st.state2.code = move(st.state2.absmax), move(st.state2.code)
    return q.to(device), st


BAD = {
    "quant_type": (lambda q, st: setattr(st, "quant_type", "int4"), ValueError, "quant_type"),
    "blocksize": (lambda q, st: setattr(st, "blocksize", 48), ValueError, "blocksize"),
    "out dtype": (lambda q, st: setattr(st, "dtype", torch.int8), TypeError, r"quant_state\.dtype"),
    "shape": (lambda q, st: setattr(st, "shape", torch.Size([300])), ValueError, "packed bytes"),
    "absmax dtype": (lambda q, st: setattr(st, "absmax", st.absmax.float()), TypeError, r"quant_state\.absmax"),
    "absmax count": (lambda q, st: setattr(st, "absmax", st.absmax[:-1]), ValueError, r"quant_state\.absmax"),
    "absmax2": (lambda q, st: setattr(st.state2, "absmax", st.state2.absmax.half()), TypeError, "state2.absmax"),
    "code2": (lambda q, st: setattr(st.state2, "code", st.state2.code[:16]), ValueError, "state2.code"),
    "offset": (lambda q, st: setattr(st, "offset", None), ValueError, "offset"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_quant_state_is_refused(case, device):
    q, st = _state(device)
    mutate, error, match = BAD[case]
    mutate(q, st)
    with pytest.raises(error, match=match):
        tritonbits.dequantize_4bit(q, st)


def test_bad_packed_tensor_is_refused(device):
    q, st = _state(device)
    with pytest.raises(TypeError, match="A"):
        tritonbits.dequantize_4bit(q.to(torch.int64), st)
    with pytest.raises(ValueError, match="contiguous"):
        tritonbits.dequantize_4bit(torch.cat([q, q], 1)[:, :1], st)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        tritonbits.dequantize_4bit(q.tolist(), st)
    with pytest.raises(ValueError, match="quant_state is required"):
        tritonbits.dequantize_4bit(q)
    with pytest.raises(TypeError, match="quant_state has no"):
        tritonbits.dequantize_4bit(q, object())


def test_bad_out_is_refused(device):
    q, st = _state(device)
    for out, match in [
        (torch.empty(257, dtype=torch.float16, device=device), "shape"),
        (torch.empty(256, dtype=torch.float32, device=device), "out must have dtype"),
        (torch.empty(512, dtype=torch.float16, device=device)[::2], "contiguous"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            tritonbits.dequantize_4bit(q, st, out=out)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    q, st = _state(torch.device("cpu"))
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    with pytest.raises(ValueError, match="CPU tensor"):
        tritonbits.dequantize_4bit(q, st)


@pytest.mark.gpu
def test_device_mismatch_is_refused(device):
    q, st = _state(device)
    st.absmax = st.absmax.cpu()
    with pytest.raises(ValueError, match=r"quant_state\.absmax is on cpu"):
        tritonbits.dequantize_4bit(q, st)


def test_empty_weight(device):
    q, st = _state(device, n=0, nested=False)
    assert tritonbits.dequantize_4bit(q, st).shape == (0,)


def test_sweeps_hit_the_edge_cases():
    for shapes_ in (SHAPES_CPU, SHAPES_GPU):
        numels = [torch.Size(s).numel() for s in shapes_]
        assert any(n % 2 for n in numels), "an odd element count"
        assert any(n % 4096 for n in numels), "a tail block at every blocksize"


def test_cached_checks_notice_a_changed_quant_state(device):
    """The eager fast path skips re-validating a quant_state it has seen, but not one whose fields changed."""
    q, st = _state(device)
    tritonbits.dequantize_4bit(q, st)
    tritonbits.dequantize_4bit(q, st)
    st.absmax = st.absmax[:-1]
    with pytest.raises(ValueError, match=r"quant_state\.absmax"):
        tritonbits.dequantize_4bit(q, st)
    with pytest.raises(ValueError, match="packed bytes"):
        tritonbits.dequantize_4bit(q[:-1], st)


def test_cached_launch_follows_a_swapped_tensor_memory(device):
    """`absmax.data = other` keeps the tensor object but moves its memory: the next call must read the new
    values (a bound launch holds addresses), on every nested field."""
    q, st = _state(device)
    for _ in range(2):
        tritonbits.dequantize_4bit(q, st)
    for field in ("absmax", "state2.absmax", "state2.code", "offset"):
        owner = st.state2 if field.startswith("state2.") else st
        t = getattr(owner, field.split(".")[-1])
        t.data = t.data * 2 if t.is_floating_point() else t.data + 1  # new values in new memory
        want = R.dequantize_4bit(q, st)
        assert_exact(tritonbits.dequantize_4bit(q, st).cpu(), want)


def test_cache_entries_die_with_their_quant_state(device):
    import gc

    q, st = _state(device)
    tritonbits.dequantize_4bit(q, st)
    key = id(st)
    assert key in qs_module._PREPARED
    del st
    gc.collect()
    assert key not in qs_module._PREPARED


@pytest.mark.parametrize("offset", [0, 1, 16])
def test_repeated_and_misaligned_launches(offset, device, gen):
    """Later launches reuse the compiled kernel (tritonbits._launcher); a tensor that is not 16-byte
    aligned must get a kernel compiled for that, not the aligned one."""
    n = 64 * 301
    storage = torch.randint(0, 256, (n // 2 + 16,), dtype=torch.uint8, generator=gen).to(device)
    absmax = (torch.rand(n // 64, generator=gen) + 0.5).to(device)
    state = tritonbits.QuantState(absmax=absmax, shape=torch.Size([n]), dtype=torch.float16, blocksize=64)
    ref_state = R.ReferenceQuantState(absmax=absmax.cpu(), shape=state.shape, dtype=torch.float16, blocksize=64,
                                      quant_type="nf4", code=torch.empty(0))  # fmt: skip
    for packed in (storage[: n // 2], storage[offset : offset + n // 2], storage[: n // 2]):
        want = R.dequantize_4bit(packed.cpu(), ref_state)
        for _ in range(3):
            assert_exact(tritonbits.dequantize_4bit(packed, state).cpu(), want)


def test_cached_launcher_bookkeeping(device):
    """The fast path passes constexprs positionally (their order must match the kernel signature) and
    steps aside whenever a launch hook is registered."""
    from tritonbits import _launcher
    from tritonbits.ops import dequant_bias as db_module

    q, st = _state(device)
    tritonbits.dequantize_4bit(q, st)
    dq_module._launcher.check_order(9, dict.fromkeys(
        ["BYTES_PER_QBLOCK", "BLOCKSIZE2", "NESTED", "ROWS", "COLS", "MANUAL_BF16", "USE_ASM",
         "STREAM", "TABLE", "FTZ"]))  # fmt: skip
    db_module._launcher.check_order(12, dict.fromkeys(["HAS_BIAS", "MANUAL_BF16", "BLOCK_M", "BLOCK_N"]))
    with pytest.raises(AssertionError, match="constexprs"):
        db_module._launcher.check_order(12, dict.fromkeys(["MANUAL_BF16", "HAS_BIAS", "BLOCK_M", "BLOCK_N"]))
    assert bool(dq_module._launcher.compiled) == (device.type == "cuda")
    assert not _launcher._hooks_set()
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime.launch_enter_hook, "add"):
        hook = lambda metadata: None
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            assert _launcher._hooks_set()
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        assert not _launcher._hooks_set()


class _Launcher36:
    """Shaped like Triton 3.6's CudaLauncher: __call__ forwards to the C `launch` with the cooperative and PDL
    flags and the two scratch buffers (None at size 0) after `function`. (The direct path also asks for NVIDIA's
    driver module: the stand-in claims it.)"""

    __module__ = "triton.backends.nvidia.driver"

    def __init__(self, global_scratch_size=0, profile_scratch_size=0):
        self.global_scratch_size, self.profile_scratch_size = global_scratch_size, profile_scratch_size
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.calls = []

    def launch(self, *args):
        self.calls.append(args)

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl, None,
                    None, *args)  # fmt: skip


class _Launcher39(_Launcher36):
    """Shaped like Triton 3.9's: the metadata and hooks are named parameters (another convention)."""

    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata, enter, exit_, *args):
        self.launch(gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata, enter, exit_, *args)


class _LauncherHip(_Launcher36):
    """Shaped like Triton 3.6's HIPLauncher: the same __call__ signature, another module and launch order."""

    __module__ = "triton.backends.amd.driver"


class _Kernel:
    def __init__(self, run):
        self.run, self.function, self.packed_metadata = run, 0xF00, (4, 1, 0)


@pytest.mark.parametrize("make", [_Launcher36, lambda: _Launcher36(global_scratch_size=8), lambda: _Launcher36(0, 16),
                                  _Launcher39, _LauncherHip],
                         ids=["3.6", "3.6-global-scratch", "3.6-profile-scratch", "3.9", "3.6-hip"])  # fmt: skip
def test_compiled_launch_passes_what_the_launcher_would(make):
    """`_launcher._compiled` calls Triton 3.6's C launch directly only for NVIDIA's launcher of that convention
    with no scratch, and either way the C launch receives exactly what CompiledKernel.run's own __call__ would
    hand it."""
    from tritonbits import _launcher

    run = make()
    kernel = _Kernel(run)
    compiled = _launcher._compiled(kernel)
    direct = type(run) is _Launcher36 and not (run.global_scratch_size or run.profile_scratch_size)
    assert (compiled.launch == run.launch) == direct and compiled.kernel is kernel
    args = (0x1000, 0x2000, 7, 64)
    compiled.launch(3, 2, 1, 0xABC, *compiled.head, *args)
    run(3, 2, 1, 0xABC, kernel.function, kernel.packed_metadata, None, None, None, *args)
    assert len(run.calls) == 2 and run.calls[0] == run.calls[1]


@pytest.mark.gpu
def test_triton_36_launches_directly(device, gen):
    """On Triton 3.6 (the GPU machine's), a cached specialization's launch is the C launch itself."""
    import triton

    from tritonbits import _launcher

    q, st = _state(device)
    want = tritonbits.dequantize_4bit(q, st)
    assert_exact(tritonbits.dequantize_4bit(q, st), want)  # a bound launch: the direct path
    assert dq_module._launcher.enabled  # nothing fell back to Triton's own launcher
    compiled = list(dq_module._launcher.compiled.values())
    assert compiled
    if triton.__version__.startswith("3.6."):
        assert all(c.launch == c.kernel.run.launch for c in compiled)
        assert all(_launcher._triton36_launch(c.kernel.run) for c in compiled)
        # the real CudaLauncher.__call__ and the direct path hand its C launch the same arguments
        run = compiled[0].kernel.run
        seen = []
        real = run.launch  # an instance attribute (set in CudaLauncher.__init__), which __call__ reads
        run.launch = lambda *args: seen.append(args)  # nothing launches
        try:
            direct = _launcher._compiled(compiled[0].kernel)
            kernel = compiled[0].kernel
            args = (0x1000, 0x2000, 7)
            direct.launch(3, 2, 1, 0xABC, *direct.head, *args)
            run(3, 2, 1, 0xABC, kernel.function, kernel.packed_metadata, None, None, None, *args)
        finally:
            run.launch = real
        assert len(seen) == 2 and seen[0] == seen[1]


def test_eager_calls_bind_their_launch(device, gen, quantize, bnb_dequantize):
    """After the first eager call on a quant_state, later calls launch through a bound launch (every argument
    but `out` fixed, tensor addresses as ints). Still exact, on another stream too, and stepping aside for
    a launch hook. The interpreter never binds."""
    import triton

    w = torch.randn((1000, 4097) if device.type == "cuda" else (33, 130), generator=gen).to(torch.bfloat16)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    want = bnb_dequantize(q, state).reshape(w.shape).to(device)
    assert_exact(tritonbits.dequantize_4bit(q, state), want)
    entry = qs_module.prepare(q, state)
    bound = entry.launches.get("dequantize_4bit")
    assert (bound is not None) == (device.type == "cuda")
    for _ in range(3):
        assert_exact(tritonbits.dequantize_4bit(q, state), want)
    if device.type != "cuda":
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        got = tritonbits.dequantize_4bit(q, state)
    side.synchronize()
    assert_exact(got, want)
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime.launch_enter_hook, "add"):
        seen = []
        hook = lambda metadata: seen.append(metadata)
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            assert not bound(torch.empty_like(want))
            assert_exact(tritonbits.dequantize_4bit(q, state), want)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        assert seen, "with a hook registered the launch must go through Triton (which calls the hook)"


# --- regressions: inputs that once gave a wrong answer with no error ---------------------------------


def _nested_fields():
    return {
        "absmax": lambda st: st,
        "state2.absmax": lambda st: st.state2,
        "state2.code": lambda st: st.state2,
    }


@pytest.mark.parametrize("field", ["absmax", "state2.absmax", "state2.code"])
@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "after-a-good-call"])
def test_non_contiguous_fields_are_refused(field, cached, device):
    """Same values at stride 2 were read as if contiguous (~90% of outputs wrong); now refused, cached or not."""
    q, st = _state(device, n=64 * 300)
    if cached:
        tritonbits.dequantize_4bit(q, st)
    owner, name = _nested_fields()[field](st), field.split(".")[-1]
    t = getattr(owner, name)
    setattr(owner, name, torch.stack([t, t], 1)[:, 0])
    with pytest.raises(ValueError, match=rf"quant_state\.{field} must be contiguous"):
        tritonbits.dequantize_4bit(q, st)


def test_cached_check_refuses_what_a_fresh_check_refuses(device):
    """The cache key holds everything validate reads: A's strides, the absmax's dtype and size."""
    q, st = _state(device, n=64 * 64, nested=False)
    tritonbits.dequantize_4bit(q, st)
    with pytest.raises(ValueError, match="A must be contiguous"):
        tritonbits.dequantize_4bit(q.view(32, 64).t(), st)
    tritonbits.dequantize_4bit(q, st)
    st.absmax.data = st.absmax.data.view(torch.int32)
    with pytest.raises(TypeError, match=r"quant_state\.absmax must have dtype"):
        tritonbits.dequantize_4bit(q, st)
    st.absmax = st.absmax.data.view(torch.float32).clone()  # a resizable storage of its own
    tritonbits.dequantize_4bit(q, st)
    st.absmax.resize_(100)  # same address, fewer elements
    with pytest.raises(ValueError, match=r"quant_state\.absmax has 100 elements"):
        tritonbits.dequantize_4bit(q, st)


def test_a_list_shape_changed_in_place_is_followed(device):
    """A duck-typed state whose `shape` list is edited in place: the cache must not keep the old shape."""
    from types import SimpleNamespace

    q, st = _state(device, n=64 * 8, nested=False)
    duck = SimpleNamespace(absmax=st.absmax, shape=[16, 32], dtype=st.dtype, blocksize=64, quant_type="nf4")
    first = tritonbits.dequantize_4bit(q, duck)
    assert first.shape == (16, 32)
    duck.shape[0], duck.shape[1] = 32, 16
    second = tritonbits.dequantize_4bit(q, duck)
    assert second.shape == (32, 16)
    assert_exact(second.reshape(-1), first.reshape(-1))


def test_out_overlapping_an_input_is_refused(device):
    q, st = _state(device, n=512, nested=False)
    buf = torch.empty(2048, dtype=torch.uint8, device=device)
    packed = buf[:256].view(256, 1)
    packed.copy_(q.view(-1)[:256].view(256, 1))
    with pytest.raises(ValueError, match="out overlaps A"):  # out's bytes start inside A's
        tritonbits.dequantize_4bit(packed, st, out=buf[128 : 128 + 1024].view(torch.float16))
    absmax_buf = torch.empty(600, dtype=torch.float16, device=device)
    st.absmax = absmax_buf[:16].view(torch.float32)
    st.absmax.copy_(torch.rand(8, device=device) + 0.5)
    with pytest.raises(ValueError, match=r"out overlaps quant_state\.absmax"):
        tritonbits.dequantize_4bit(packed, st, out=absmax_buf[:512])
    with pytest.raises(ValueError, match="requires grad"):
        tritonbits.dequantize_4bit(packed, st, out=torch.empty(512, dtype=torch.float16, device=device,
                                                               requires_grad=True))  # fmt: skip


def test_messages_name_the_bad_field(device):
    from types import SimpleNamespace

    q, st = _state(device, nested=False)
    duck = SimpleNamespace(absmax=st.absmax, shape=None, dtype=st.dtype, blocksize=64, quant_type="nf4")
    with pytest.raises(TypeError, match=r"quant_state\.shape must be a sequence of ints"):
        tritonbits.dequantize_4bit(q, duck)
    with pytest.raises(TypeError, match=r"QuantState\.from_dict"):
        tritonbits.dequantize_4bit(q, st.as_dict())


def test_bnb_signature_without_a_quant_state(device, gen):
    """bnb's second form: absmax and out give the state (blocksize default 64, quant_type default fp4)."""
    n = 64 * 12
    packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, generator=gen).to(device)
    absmax = (torch.rand(n // 64, generator=gen) + 0.5).to(device)
    out = poisoned((n,), torch.float32, device)
    got = tritonbits.dequantize_4bit(packed, absmax=absmax, out=out)
    assert got is out
    ref = R.ReferenceQuantState(absmax=absmax.cpu(), shape=torch.Size([n]), dtype=torch.float32, blocksize=64,
                                quant_type="fp4", code=torch.empty(0))  # fmt: skip
    assert_exact(out.cpu(), R.dequantize_4bit(packed.cpu(), ref))
    with pytest.raises(ValueError, match="absmax and out"):
        tritonbits.dequantize_4bit(packed, absmax=absmax)


def test_a_one_row_packed_tensor_returns_the_transpose(device, quantize, gen):
    """bnb returns out.t() when A.shape[0] == 1 (the [1, n/2] packed layout); so does tritonbits."""
    w = torch.randn(1, 96, generator=gen)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert q.shape == (48, 1)
    got = tritonbits.dequantize_4bit(q.reshape(1, 48), state)
    assert got.shape == (96, 1)
    assert_exact(got, tritonbits.dequantize_4bit(q, state).t())


@pytest.mark.parametrize("packed_form", [False, True], ids=["as_dict", "as_dict-packed"])
def test_bnb_serialized_form_round_trips(packed_form, device, gen, quantize):
    """A state saved by bnb (as_dict) loads in tritonbits and dequantizes the same; tritonbits' as_dict
    loads back in bnb's QuantState.from_dict."""
    import bitsandbytes.functional as F

    w = torch.randn(64, 96, generator=gen).to(torch.bfloat16)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    want = tritonbits.dequantize_4bit(q, state)
    saved = {f"weight.{k}": v for k, v in state.as_dict(packed=packed_form).items()}
    ours = tritonbits.QuantState.from_dict(saved, device)
    assert_exact(tritonbits.dequantize_4bit(q, ours), want)
    theirs = F.QuantState.from_dict(ours.as_dict(packed=packed_form), device)
    assert_exact(tritonbits.dequantize_4bit(q, theirs), want)
    assert theirs.shape == state.shape and theirs.dtype == state.dtype and theirs.blocksize == state.blocksize


@pytest.mark.parametrize("packed_form", [False, True], ids=["as_dict", "as_dict-packed"])
def test_bnb_serialized_form_with_a_bad_field_is_refused_by_name(packed_form, device, gen, quantize):
    """from_dict names what is wrong with a serialized state: a missing key (was KeyError), a dtype name that is
    no dtype (was AttributeError, or a class for "Tensor"), a fractional blocksize (was truncated by int())."""
    w = torch.randn(64, 96, generator=gen).to(torch.bfloat16)
    _, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    edits = {
        **{f"no-{k}": (k, None) for k in ("absmax", "shape", "dtype", "blocksize", "nested_offset", "nested_dtype")},
        "dtype-nope": ("dtype", "nope"),
        "dtype-Tensor": ("dtype", "Tensor"),
        "nested_dtype-nope": ("nested_dtype", "nope"),
        "blocksize-64.5": ("blocksize", 64.5),
        "nested_blocksize-None": ("nested_blocksize", None),
    }
    packed_key = "quant_state.bitsandbytes__nf4"
    for what, (key, value) in edits.items():
        d = tritonbits.QuantState.from_any(state).as_dict(packed=packed_form)
        # the packed form keeps the non-tensor fields as JSON in one uint8 tensor: edit them there
        text = json.loads(bytes(d.pop(packed_key).tolist())) if packed_form else d
        fields = text if key in text else d
        if what.startswith("no-"):
            del fields[key]
        else:
            fields[key] = value
        if packed_form:
            d[packed_key] = torch.tensor(list(json.dumps(text).encode()), dtype=torch.uint8)
        with pytest.raises((ValueError, TypeError), match=re.escape(key)):
            tritonbits.QuantState.from_dict(d, device)


def test_packed_quant_state_that_is_not_json_is_refused_by_name(device, gen, quantize):
    """The packed form's one uint8 tensor must hold bnb's UTF-8 JSON dict (was JSONDecodeError /
    UnicodeDecodeError / AttributeError from a JSON list)."""
    w = torch.randn(64, 96, generator=gen).to(torch.bfloat16)
    _, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed_key = "quant_state.bitsandbytes__nf4"
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]"):
        d = tritonbits.QuantState.from_any(state).as_dict(packed=True)
        d[packed_key] = torch.tensor(list(raw), dtype=torch.uint8)
        with pytest.raises(ValueError, match=re.escape(packed_key)):
            tritonbits.QuantState.from_dict(d, device)


@pytest.mark.gpu
def test_direct_launch_failure_falls_back_once_with_a_log(device, gen, quantize, caplog, monkeypatch):
    """If Triton's internals change under the fast path, launches take Triton's own path (still exact) and
    the switch is logged once."""
    import logging

    from tritonbits import _launcher

    w = torch.randn(256, 512, generator=gen).to(torch.float16)
    q, state = quantize(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    want = tritonbits.dequantize_4bit(q, state)
    tritonbits.dequantize_4bit(q, state)

    def broken(*args, **kwargs):
        raise TypeError("launcher signature changed")

    monkeypatch.setattr(_launcher, "_raw_launch", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="tritonbits"):
            for _ in range(3):
                assert_exact(tritonbits.dequantize_4bit(q, state), want)
        warnings = [r for r in caplog.records if "direct launch" in r.getMessage()]
        assert len(warnings) == 1, caplog.text
        assert not dq_module._launcher.enabled
    finally:
        dq_module._launcher.enabled = True
