"""tritonbits.dequant_bias against the float64 oracle under the harness policy (<= 0.5 ulp of the output
dtype plus the fp32 rounding terms; see tritonbits_harness.tolerance)."""

import pytest
import torch

import tritonbits
from tritonbits import _launcher
from tritonbits.ops import dequant_bias as db_module
from tritonbits_harness import op_cases
from tritonbits_harness.launch_stub import stubbed_launches
from tritonbits_harness.tolerance import assert_dequant_bias

SHAPES_CPU = [(1, 1), (1, 37), (7, 130), (33, 64), (130, 257)]
SHAPES_GPU = [*SHAPES_CPU, (1, 4096), (16, 14336), (300, 2560), (4097, 3840), (8192, 13824)]


def make_acc(m, n, dtype, gen):
    if dtype == torch.int32:  # the output of an int8 GEMM with K = 4096
        return torch.randint(-(2**26), 2**26, (m, n), generator=gen, dtype=torch.int32)
    return (torch.randn(m, n, generator=gen) * 50).to(dtype)


def operands(m, n, acc_dtype, gen, device, *, sa_kind="col", sb_kind="row", bias_kind="vec",
             scale_dtype=torch.float32, bias_dtype=torch.bfloat16):  # fmt: skip
    acc = make_acc(m, n, acc_dtype, gen)
    small = 1e-4 if acc_dtype == torch.int32 else 1e-2
    sa = (torch.rand(m, generator=gen) + 0.5) * small
    sb = torch.rand(n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen)
    sa = {"col": sa.reshape(m, 1), "vec": sa, "scalar": sa[:1].reshape(())}[sa_kind].to(scale_dtype)
    sb = {"row": sb.reshape(1, n), "vec": sb, "scalar": sb[:1]}[sb_kind].to(scale_dtype)
    bias = {"vec": bias, "row": bias.reshape(1, n), None: None}[bias_kind]
    bias = bias.to(bias_dtype) if bias is not None else None
    move = lambda t: t.to(device) if t is not None else None
    return move(acc), move(sa), move(sb), move(bias)


check = assert_dequant_bias


@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_oracle(acc_dtype, out_dtype, device, gen):
    for m, n in SHAPES_GPU if device.type == "cuda" else SHAPES_CPU:
        acc, sa, sb, bias = operands(m, n, acc_dtype, gen, device)
        out = tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, n)
        check(out, acc, sa, sb, bias)


@pytest.mark.parametrize("sa_kind", ["col", "vec", "scalar"])
@pytest.mark.parametrize("sb_kind", ["row", "vec", "scalar"])
@pytest.mark.parametrize("bias_kind", ["vec", "row", None])
def test_every_scale_and_bias_shape(sa_kind, sb_kind, bias_kind, device, gen):
    acc, sa, sb, bias = operands(37, 300, torch.int32, gen, device, sa_kind=sa_kind, sb_kind=sb_kind,
                                 bias_kind=bias_kind)  # fmt: skip
    out = torch.full((37, 300), float("nan"), dtype=torch.bfloat16, device=device)
    assert tritonbits.dequant_bias(acc, sa, sb, bias, out=out) is out
    check(out, acc, sa, sb, bias)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float32], ids=str)
def test_low_precision_scales_are_upcast(scale_dtype, bias_dtype, device, gen):
    """int32 acc with fp16 scales: acc*sa would overflow fp16; the kernel upcasts instead of refusing."""
    acc, sa, sb, bias = operands(64, 96, torch.int32, gen, device, scale_dtype=scale_dtype, bias_dtype=bias_dtype)
    out = tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=torch.float32)
    check(out, acc, sa, sb, bias)


def test_row_stride_slice_without_copy(device, gen):
    big = make_acc(64, 512, torch.int32, gen).to(device)
    acc = big[3:50, 100:400]  # rows of stride 512
    _, sa, sb, bias = operands(47, 300, torch.int32, gen, device)
    out = tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=torch.float16)
    check(out, acc, sa, sb, bias)
    wide = torch.full((47, 600), float("nan"), dtype=torch.float16, device=device)
    tritonbits.dequant_bias(acc, sa, sb, bias, out=wide[:, 300:])
    check(wide[:, 300:], acc, sa, sb, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 65536 + 3])
def test_extreme_m(m, device, gen):
    acc, sa, sb, bias = operands(m, 2560, torch.int32, gen, device)
    check(tritonbits.dequant_bias(acc, sa, sb, bias), acc, sa, sb, bias)


@pytest.mark.gpu
def test_fake_sm75_rounds_bf16_with_integer_ops(device, gen, fake_capability):
    fake_capability((7, 5))
    acc, sa, sb, bias = operands(300, 2560, torch.float32, gen, device)
    check(tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=torch.bfloat16), acc, sa, sb, bias)


@pytest.mark.gpu
def test_opcheck_and_compile(device, gen):
    acc, sa, sb, bias = operands(64, 256, torch.int32, gen, device)
    torch.library.opcheck(torch.ops.tritonbits.dequant_bias.default, (acc, sa, sb, bias, torch.bfloat16))
    torch.library.opcheck(torch.ops.tritonbits.dequant_bias.default, (acc, sa, sb, None, torch.float16))
    out = torch.empty(64, 256, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.tritonbits.dequant_bias.out, (acc, sa, sb, bias, out))

    def epilogue(acc, sa, sb, bias):
        return torch.relu(tritonbits.dequant_bias(acc, sa, sb, bias)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(epilogue, fullgraph=True)
    torch.testing.assert_close(compiled(acc, sa, sb, bias), epilogue(acc, sa, sb, bias), rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_graph_capture(device, gen):
    acc, sa, sb, bias = operands(128, 4096, torch.int32, gen, device)
    want = tritonbits.dequant_bias(acc, sa, sb, bias)
    out = torch.empty_like(want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tritonbits.dequant_bias(acc, sa, sb, bias, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_config_table_and_fallback():
    assert db_module.bucket(1) == 1 and db_module.bucket(3840) == 4096 and db_module.bucket(4096) == 4096
    # N: quarter octaves, each bucket its own fixed point (the round trip below relies on it)
    want = {1000: 1024, 2560: 2560, 3840: 4096, 4096: 4096, 6144: 6144, 11008: 12288, 13824: 14336, 28672: 28672}
    assert {n: db_module.n_bucket(n) for n in want} == want
    for n in range(1, 70000, 7):
        b = db_module.n_bucket(n)
        assert n <= b < n * 1.25 + 1 and db_module.n_bucket(b) == b, n
    for m, n in [(1, 2560), (100, 14336), (65536, 4096), (4096, 1000)]:
        kind, block_m, block_n, warps = db_module.heuristic_config(m, n, flat=False)
        assert kind == "2d" and block_m >= 1 and 16 <= block_n <= 256 and warps in (4, 8)
        assert block_m <= db_module.bucket(m)
    # contiguous inputs: flat programs of 512 / 1024 / 2048 elements by size, the 2-D tile in the L2-sized band
    # and for wide rows at M 64-128, only where N keeps rows 16-byte aligned
    flat = db_module.heuristic_flat
    assert flat(1, 2560) == flat(16, 4096) == ("1d", 512, 4)
    assert flat(1024, 4096) == flat(1024, 1000) == flat(2048, 4096) == ("1d", 1024, 8)  # 2048 x 4096: 8M, below
    assert flat(2048, 6144) == flat(4096, 4096) == ("2d", 8, 256, 4)  # 12M, 16M elements: the band
    assert flat(2048, 5000) == ("1d", 1024, 8)  # the band, but N % 16 != 0
    assert flat(64, 28672) == flat(128, 16384) == ("2d", 16, 128, 8)
    assert flat(64, 28670) == ("1d", 1024, 8) and flat(256, 28672) == ("1d", 1024, 8)
    assert flat(4096, 4097) == flat(65536, 28672) == ("1d", 2048, 8)
    for m in (1, 3, 64, 100, 4096, 65536):
        for n in (1, 1000, 2560, 6144, 11008, 28672, 40000):
            cfg = db_module.heuristic_config(m, n)
            assert cfg == db_module.as_config(cfg) and (cfg[0] == "1d" or cfg[1] <= 2 * m), (m, n, cfg)
    cpu = torch.device("cpu")
    assert db_module.config_for(cpu, torch.int32, 8, 4096) == db_module.heuristic_config(8, 4096)
    assert db_module.config_for(cpu, torch.bfloat16, 2048, 6144) == ("2d", 8, 256, 4)
    assert db_module.config_for(cpu, torch.int32, 8, 4096, flat=False) == db_module.heuristic_config(8, 4096, False)


def test_configs_name_their_path():
    assert db_module.as_config([8, 128, 4]) == ("2d", 8, 128, 4)  # a legacy table triple
    assert db_module.as_config(["1d", 1024, 4]) == ("1d", 1024, 4)
    for bad in (["1d", 1024], ["2d", 8, 128], ["3d", 1, 2, 4], ["1d", 1000, 4], [8, 128]):
        with pytest.raises(ValueError, match="bad dequant_bias config"):
            db_module.as_config(bad)


def test_heuristic_picks_1d_for_contiguous_inputs_and_2d_for_strided(device, gen, monkeypatch):
    chosen = []
    real_plan = db_module.plan
    monkeypatch.setattr(db_module, "plan", lambda *a, **k: chosen.append(real_plan(*a, **k)) or chosen[-1])
    monkeypatch.setattr(db_module, "_plans", {})
    acc, sa, sb, bias = operands(5, 1000, torch.int32, gen, device)
    tritonbits.dequant_bias(acc, sa, sb, bias)
    big = make_acc(5, 1024, torch.int32, gen).to(device)
    tritonbits.dequant_bias(big[:, :1000], sa, sb, bias)
    out = torch.empty(5, 2000, dtype=torch.bfloat16, device=device)
    tritonbits.dequant_bias(acc, sa, sb, bias, out=out[:, :1000])
    assert [p.config[0] for p in chosen] == ["1d", "2d", "2d"]
    assert chosen[0].config == db_module.heuristic_config(5, 1000)


PATHS = [("1d", 256, 2), ("1d", 1024, 4), ("2d", 4, 128, 4), ("2d", 16, 32, 4)]
SHAPES_PATHS = [(1, 1), (1, 37), (5, 1), (3, 1000), (7, 130), (33, 64), (2, 2048)]


@pytest.mark.parametrize("config", PATHS, ids=str)
@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_every_path_forced(config, acc_dtype, out_dtype, device, gen):
    """Each path on odd N (1000, 37, 1, 130: rows ending inside a program, tails), M=1, every dtype pair."""
    for m, n in SHAPES_PATHS:
        bias_kind = None if (m + n) % 3 == 0 else "vec"
        acc, sa, sb, bias = operands(m, n, acc_dtype, gen, device, bias_kind=bias_kind)
        out = torch.full((m, n), float("nan"), dtype=out_dtype, device=device)
        strides = db_module.validate(acc, sa, sb, bias, out_dtype, out)
        db_module.launch(acc, sa, sb, bias, out, *strides, config=config)
        check(out, acc, sa, sb, bias)


def test_flat_index_width():
    """int32 indices up to the last element int32 holds (the grid's, masked tail included) and the farthest
    scale/bias gather, int64 beyond."""
    assert not db_module.index_int64(1, 1024) and not db_module.index_int64(2**31, 1024)
    assert db_module.index_int64(2**31 + 1, 1024) and db_module.index_int64(2**31 - 1, 3 * 2**20)
    assert not db_module.index_int64(2**31 - 1, 1)
    assert db_module.index_int64(64, 64, 2**31) and not db_module.index_int64(64, 64, 2**31 - 1, 5)


@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.bfloat16], ids=str)
def test_flat_kernel_int32_and_int64_indices_agree(acc_dtype, device, gen):
    """The flat kernel with int64 indices (what tensors past 2**31 elements get) equals the int32 one, tails too."""
    acc, sa, sb, bias = operands(7, 130, acc_dtype, gen, device)
    strides = db_module.validate(acc, sa, sb, bias, torch.bfloat16, None)
    outs = []
    for int64 in (False, True):
        out = torch.full((7, 130), float("nan"), dtype=torch.bfloat16, device=device)
        p = db_module.plan(acc, sa, sb, bias, out, *strides, config=("1d", 256, 2))
        assert p.constexprs["INT64"] is False
        p.launcher(p.grid, p.args, {**p.constexprs, "INT64": int64}, p.options, acc.device)
        check(out, acc, sa, sb, bias)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("config", PATHS[:2] + PATHS[2:3], ids=str)
@pytest.mark.parametrize(("sa_kind", "sb_kind"), [("scalar", "scalar"), ("vec", "vec"), ("col", "scalar")])
def test_paths_with_every_scale_form_and_in_place(config, sa_kind, sb_kind, device, gen):
    acc, sa, sb, bias = operands(9, 1000, torch.float32, gen, device, sa_kind=sa_kind, sb_kind=sb_kind)
    want = acc.clone()
    strides = db_module.validate(acc, sa, sb, bias, torch.float32, acc)
    db_module.launch(acc, sa, sb, bias, acc, *strides, config=config)  # out = acc, in place
    check(acc, want, sa, sb, bias)


def test_1d_path_refuses_strided_inputs_and_2d_handles_them(device, gen):
    big = make_acc(6, 1024, torch.bfloat16, gen).to(device)
    acc = big[:, :1000]  # row stride 1024 != N
    _, sa, sb, bias = operands(6, 1000, torch.bfloat16, gen, device)
    out = torch.empty(6, 1000, dtype=torch.bfloat16, device=device)
    strides = db_module.validate(acc, sa, sb, bias, torch.bfloat16, out)
    with pytest.raises(ValueError, match="needs contiguous acc and out"):
        db_module.launch(acc, sa, sb, bias, out, *strides, config=("1d", 256, 2))
    wide = torch.full((6, 1100), float("nan"), dtype=torch.bfloat16, device=device)
    strides = db_module.validate(big[:, :1000].contiguous(), sa, sb, bias, torch.bfloat16, wide[:, 100:])
    with pytest.raises(ValueError, match="needs contiguous acc and out"):
        db_module.launch(acc.contiguous(), sa, sb, bias, wide[:, 100:], *strides, config=("1d", 256, 2))
    db_module.launch(acc.contiguous(), sa, sb, bias, wide[:, 100:], *strides, config=("2d", 2, 128, 4))
    check(wide[:, 100:], acc, sa, sb, bias)
    assert torch.isnan(wide[:, :100].float()).all()


DTYPES_BY_KEY = {"int32": torch.int32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def test_every_tuned_entry_is_reachable_by_the_lookup(monkeypatch):
    """Round trip: for each (family, key) in the checked-in table, a problem in that bucket looks up exactly
    that entry (the tuner and the lookup share config_key; a mismatch once left bf16/fp32 untuned)."""
    from tritonbits import _runtime, configs

    table = configs.table("dequant_bias")
    assert table, "the dequant_bias table is empty"
    db_module._config.cache_clear()
    for family, entries in table.items():
        monkeypatch.setattr(_runtime, "gpu_family", lambda device, family=family: family)
        db_module._config.cache_clear()
        for key, cfg in entries.items():
            acc, buckets = key.split("/")
            m, n = map(int, buckets.split("x"))
            assert db_module.config_key(DTYPES_BY_KEY[acc], m, n) == key
            assert db_module.config_for(torch.device("cuda"), DTYPES_BY_KEY[acc], m, n) == tuple(cfg), key
            assert cfg[0] in ("1d", "2d"), (family, key, "the checked-in table names each entry's path")
            db_module.as_config(cfg)  # sizes are powers of two
    db_module._config.cache_clear()


def test_config_cache_is_bounded_by_buckets():
    """The per-call config cache keys on buckets: a new batch size in a known bucket adds no entry."""
    db_module._config.cache_clear()
    cpu = torch.device("cpu")
    for m in range(1000, 1024):
        db_module.config_for(cpu, torch.int32, m, 4096)
    assert db_module._config.cache_info().currsize == 1


BAD = [
    (lambda a, sa, sb, b: (a.to(torch.int64), sa, sb, b), TypeError, "acc must be int32"),
    (lambda a, sa, sb, b: (a[0], sa, sb, b), ValueError, "acc must be 2-D"),
    (lambda a, sa, sb, b: (a.t(), sa, sb, b), ValueError, "row-major"),
    (lambda a, sa, sb, b: (a, sa[:-1], sb, b), ValueError, "scale_a has shape"),
    (lambda a, sa, sb, b: (a, sa, sb.reshape(-1, 1), b), ValueError, "scale_b has shape"),
    (lambda a, sa, sb, b: (a, sa.to(torch.int32), sb, b), TypeError, "scale_a must be"),
    (lambda a, sa, sb, b: (a, sa, sb, b[:-1]), ValueError, "bias has shape"),
    (lambda a, sa, sb, b: (a, sa, sb, b.to(torch.int8)), TypeError, "bias must be"),
]


@pytest.mark.parametrize(("mutate", "error", "match"), BAD)
def test_bad_input_is_refused(mutate, error, match, device, gen):
    args = mutate(*operands(8, 16, torch.int32, gen, device))
    with pytest.raises(error, match=match):
        tritonbits.dequant_bias(*args)


def test_bad_out_and_out_dtype_are_refused(device, gen):
    acc, sa, sb, bias = operands(8, 16, torch.int32, gen, device)
    with pytest.raises(TypeError, match="out_dtype"):
        tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out has shape"):
        tritonbits.dequant_bias(acc, sa, sb, bias, out=torch.empty(8, 17, dtype=torch.bfloat16, device=device))


@pytest.mark.gpu
def test_device_mismatch_is_refused(device, gen):
    acc, sa, sb, bias = operands(8, 16, torch.int32, gen, device)
    with pytest.raises(ValueError, match="scale_b is on cpu"):
        tritonbits.dequant_bias(acc, sa, sb.cpu(), bias)


def test_opcheck_on_the_test_device(device, gen):
    """opcheck on CPU (interpreter) as well as CUDA."""
    acc, sa, sb, bias = operands(8, 32, torch.int32, gen, device)
    torch.library.opcheck(torch.ops.tritonbits.dequant_bias.default, (acc, sa, sb, bias, torch.bfloat16))
    out = torch.empty(8, 32, dtype=torch.float16, device=device)
    torch.library.opcheck(torch.ops.tritonbits.dequant_bias.out, (acc, sa, sb, None, out))


# --- regressions: inputs that once gave a wrong answer with no error ---------------------------------


def test_out_overlapping_an_input_is_refused(device, gen):
    """dequant_bias(acc[:300], sa, sb, out=acc[1:]) wrote 5400 wrong elements; now refused. Exactly
    out=acc (in place, same dtype) stays allowed and correct."""
    acc = make_acc(301, 18, torch.float32, gen).to(device)
    _, sa, sb, bias = operands(300, 18, torch.float32, gen, device)
    with pytest.raises(ValueError, match="out overlaps acc"):
        tritonbits.dequant_bias(acc[:300], sa, sb, bias, out=acc[1:])
    with pytest.raises(ValueError, match="out overlaps scale_a"):
        big = torch.rand(300, 18, device=device) + 0.5
        tritonbits.dequant_bias(acc[:300], big[:, :1], sb, bias, out=big)
    inplace = acc[:300].clone()
    want = tritonbits.dequant_bias(inplace, sa, sb, bias, out_dtype=torch.float32)
    assert tritonbits.dequant_bias(inplace, sa, sb, bias, out=inplace) is inplace
    assert torch.equal(inplace, want)


def test_bad_out_forms_are_refused(device, gen):
    acc, sa, sb, bias = operands(8, 16, torch.int32, gen, device)
    expanded = torch.empty(1, 16, dtype=torch.bfloat16, device=device).expand(8, 16)
    with pytest.raises(ValueError, match="out rows overlap"):
        tritonbits.dequant_bias(acc, sa, sb, bias, out=expanded)
    needs_grad = torch.empty(8, 16, dtype=torch.float32, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="out requires grad"):
        tritonbits.dequant_bias(acc, sa, sb, bias, out=needs_grad)
    with pytest.raises(TypeError, match=r"out_dtype is torch\.float16"):
        out = torch.empty(8, 16, dtype=torch.bfloat16, device=device)
        tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=torch.float16, out=out)


def test_bias_messages(device, gen):
    acc, sa, sb, bias = operands(8, 16, torch.int32, gen, device)
    with pytest.raises(TypeError, match=r"bias must be a torch\.Tensor"):
        tritonbits.dequant_bias(acc, sa, sb, bias.tolist())
    with pytest.raises(ValueError, match="bias has shape") as info:
        tritonbits.dequant_bias(acc, sa, sb, bias[:1])
    assert "scalar" not in str(info.value)


def test_inputs_that_require_grad_are_refused(device, gen):
    """The eager path once dropped the gradient silently; now it says the op is not differentiable."""
    acc, sa, sb, bias = operands(8, 16, torch.float32, gen, device)
    with pytest.raises(ValueError, match="scale_b requires grad"):
        tritonbits.dequant_bias(acc, sa, sb.requires_grad_(), bias)
    with torch.no_grad():
        tritonbits.dequant_bias(acc, sa, sb, bias)


@pytest.mark.parametrize(("mutate", "error", "match"), BAD)
def test_cached_plan_refuses_what_a_fresh_call_refuses(mutate, error, match, device, gen, monkeypatch):
    """After a good call has cached its plan, the same shapes with one bad argument are still refused."""
    monkeypatch.setattr(db_module, "_plans", {})
    good = operands(8, 16, torch.int32, gen, device)
    tritonbits.dequant_bias(*good)
    tritonbits.dequant_bias(*good)
    assert len(db_module._plans) == (1 if device.type == "cuda" else 0)  # the interpreter binds nothing
    with pytest.raises(error, match=match):
        tritonbits.dequant_bias(*mutate(*good))
    acc, sa, sb, bias = good
    out = torch.empty(8, 16, dtype=torch.bfloat16, device=device)
    tritonbits.dequant_bias(acc, sa, sb, bias, out=out)
    with pytest.raises(ValueError, match="out overlaps acc"):  # same shapes, strides and dtypes, now overlapping
        tritonbits.dequant_bias(acc, sa, sb, bias, out=acc.view(torch.bfloat16)[:, :16])


def test_compile_fullgraph_calls_a_registered_op(device, gen):
    """torch.compile(fullgraph=True) traces dequant_bias to one registered op: the triton_op on CUDA, the
    custom op for CPU tensors (interpreter); aot_eager keeps the test off Inductor's code generation."""
    acc, sa, sb, bias = operands(16, 1000, torch.int32, gen, device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def epilogue(acc, sa, sb, bias):
        return tritonbits.dequant_bias(acc, sa, sb, bias) * 2

    torch._dynamo.reset()
    got = torch.compile(epilogue, fullgraph=True, backend=backend)(acc, sa, sb, bias)
    want = "dequant_bias_triton_op" if device.type == "cuda" else "tritonbits.dequant_bias.default"
    assert len(graphs) == 1 and want in graphs[0], graphs
    assert torch.equal(got, epilogue(acc, sa, sb, bias))


@pytest.mark.gpu
def test_triton_op_opcheck_and_inductor(device, gen):
    acc, sa, sb, bias = operands(64, 1000, torch.int32, gen, device)
    op = torch.ops.tritonbits.dequant_bias_triton_op.default
    torch.library.opcheck(op, (acc, sa, sb, bias, torch.bfloat16))
    torch.library.opcheck(op, (acc, sa, sb, None, torch.float16))

    def epilogue(acc, sa, sb, bias):
        return tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=torch.float32)

    torch._dynamo.reset()
    compiled = torch.compile(epilogue, fullgraph=True)
    assert torch.equal(compiled(acc, sa, sb, bias), epilogue(acc, sa, sb, bias))


# --- the eager plan cache's fast path on the CPU (tritonbits_harness.launch_stub) --------------------------
# Under the interpreter nothing is bound, so plans are made only on a GPU; `stubbed_launches(execute=True)` turns
# the bound launches on here and runs each through the interpreter with exactly the arguments the raw launch
# gets: `log.jit` counts slow-path launches (validate + plan), `log.raw` fast-path ones (a cached plan).

LAUNCHERS = [db_module._launcher, db_module._launcher_1d]


class Stubbed:
    """The stub's launch log and how many calls went through `validate` (the slow path)."""

    def __init__(self, log):
        self.log, self.validated = log, 0

    @property
    def counts(self) -> tuple[int, int, int]:
        """(slow-path calls, launches through the JIT entry, raw launches: bound or CachedLauncher-cached)."""
        return self.validated, self.log.jit, self.log.raw


@pytest.fixture
def stubbed(device, monkeypatch):
    if device.type == "cuda":
        pytest.skip("the interpreter stands in for the raw launch (on a GPU the other tests run this path)")
    monkeypatch.setattr(db_module, "_plans", {})
    real_validate = db_module.validate
    with stubbed_launches(LAUNCHERS, execute=True) as log:
        state = Stubbed(log)

        def counting_validate(*args, **kwargs):
            state.validated += 1
            return real_validate(*args, **kwargs)

        monkeypatch.setattr(db_module, "validate", counting_validate)
        yield state


@pytest.mark.parametrize("form", ["alloc", "out", "in-place", "no-bias-scalar", "strided", "unaligned"])
def test_plans_serve_new_tensors_of_a_seen_layout(form, stubbed, gen, device):
    """After the first call (slow path: compiles, plans, binds), calls with fresh tensors of the same layout go
    through the plan's bound launch only, with the right answer."""
    for i in range(3):
        sa_kind = "scalar" if form == "no-bias-scalar" else "col"
        bias_kind = None if form == "no-bias-scalar" else "vec"
        acc, sa, sb, bias = operands(9, 70, torch.float32, gen, device, sa_kind=sa_kind, bias_kind=bias_kind)
        want = acc.clone()
        out = None
        if form == "out":
            out = torch.full((9, 70), float("nan"), dtype=torch.float16, device=device)
        elif form == "in-place":
            out = acc
        elif form == "strided":
            acc = torch.cat([acc, acc], 1)[:, :70]
            out = torch.full((9, 100), float("nan"), dtype=torch.bfloat16, device=device)[:, 30:]
        elif form == "unaligned":  # acc one element into its buffer: 4-byte, not 16-byte aligned
            acc = torch.cat([acc.new_zeros(1), acc.flatten()])[1:].view(9, 70)
        got = tritonbits.dequant_bias(acc, sa, sb, bias, out=out, out_dtype=None if out is not None else torch.float32)
        assert out is None or got is out
        check(got, want if form == "in-place" else acc, sa, sb, bias)
        assert stubbed.counts == (1, 1, i), "the first call plans, the later ones take the bound launch"
    assert len(db_module._plans) == 1


def test_plans_key_on_alignment(stubbed, gen, device):
    """An address that is not 16-byte aligned where the plan's was: a new specialization (the slow path once)."""
    acc, sa, sb, bias = operands(8, 64, torch.int32, gen, device)
    tritonbits.dequant_bias(acc, sa, sb, bias)
    shifted = torch.cat([acc.new_zeros(1), acc.flatten()])[1:].view(8, 64)
    check(tritonbits.dequant_bias(shifted, sa, sb, bias), acc, sa, sb, bias)
    tritonbits.dequant_bias(acc.clone(), sa, sb, bias)
    assert (*stubbed.counts, len(db_module._plans)) == (2, 2, 1, 2)


@pytest.mark.parametrize(("op", "variant", "row"), [r for r in op_cases.bad_rows() if r[0] == "dequant_bias"],
                         ids=lambda r: getattr(r, "id", r))  # fmt: skip
def test_a_cached_plan_refuses_every_bad_input(op, variant, row, stubbed, gen, device):
    """op_cases' bad-input table after two good calls made and bound the plan of these very objects: each row is
    refused with its error naming the argument, and nothing launches."""
    kw = op_cases.make(op, variant, device, gen, torch.bfloat16)
    op_cases.call(op, kw)
    op_cases.call(op, kw)
    assert (*stubbed.counts, len(db_module._plans)) == (1, 1, 1, 1)
    row.edit(kw, device)
    with pytest.raises(row.exc, match=row.name):
        op_cases.call(op, kw)
    assert stubbed.counts[1:] == (1, 1), f"{row.id}: reached a kernel launch"


@pytest.mark.parametrize("victim", ["acc", "scale_a", "scale_b", "bias"])
def test_a_cached_plan_refuses_an_out_that_overlaps_an_input(victim, stubbed, gen, device):
    """The fast path's O(1) overlap check: the same layout as a planned out= call (so the key matches), the
    out's memory now meets an input's: refused with check_out's message, nothing launched. Exactly out=acc
    still runs on the fast path."""
    m, n = 8, 16
    buf = torch.zeros(4 * m * n, dtype=torch.float32, device=device)
    acc, sa, sb, bias = operands(m, n, torch.float32, gen, device, sb_kind="vec", bias_kind="vec",
                                 bias_dtype=torch.float32)  # fmt: skip
    tritonbits.dequant_bias(acc, sa, sb, bias, out=buf[: m * n].view(m, n))  # plans the layout: out [8, 16] fp32
    at = {"acc": 100, "scale_a": 64, "scale_b": 32, "bias": 48}[victim]  # element offsets, 16-byte aligned
    out = buf[at : at + m * n].view(m, n)  # the overlapping out: same layout as the planned one
    placed = {"acc": acc, "scale_a": sa, "scale_b": sb, "bias": bias}
    source = buf[144 : 144 + placed[victim].numel()] if victim != "acc" else buf[: m * n]
    placed[victim] = source.view(placed[victim].shape).copy_(placed[victim])
    args = (placed["acc"], placed["scale_a"], placed["scale_b"], placed["bias"])
    assert db_module._plan_key(*args, torch.float32, out) in db_module._plans, "the call must reach the fast path"
    with pytest.raises(ValueError, match=f"out overlaps {victim} in memory"):
        tritonbits.dequant_bias(*args, out=out)
    assert stubbed.counts == (2, 1, 0)  # validate refused it, nothing launched
    # exactly out=acc: acc and out have the planned call's layouts, so the fast path serves it (alias allowed)
    for _ in range(2):
        inplace = make_acc(m, n, torch.float32, gen).to(device)
        want = inplace.clone()
        assert tritonbits.dequant_bias(inplace, sa, sb, bias, out=inplace) is inplace
        check(inplace, want, sa, sb, bias)
    assert stubbed.counts == (2, 1, 2)


def test_a_launch_hook_sends_a_planned_call_through_triton(stubbed, gen, device, monkeypatch):
    """With a launch hook registered the bound launch steps aside: the call is validated and launched through
    the CachedLauncher (Triton's own launcher then); still the right answer."""
    acc, sa, sb, bias = operands(5, 40, torch.int32, gen, device)
    tritonbits.dequant_bias(acc, sa, sb, bias)
    monkeypatch.setattr(_launcher, "_hooks_set", lambda: True)
    check(tritonbits.dequant_bias(acc, sa, sb, bias), acc, sa, sb, bias)
    assert stubbed.counts == (2, 2, 0)


def test_tensor_subclasses_take_the_slow_path(stubbed, gen, device):
    """Only plain tensors (and Parameters) are keyed: a subclass is validated on every call."""

    class Sub(torch.Tensor):
        pass

    acc, sa, sb, bias = operands(5, 40, torch.int32, gen, device)
    sub = sb.as_subclass(Sub)
    assert db_module._plan_key(acc, sa, sub, bias, torch.bfloat16, None) is None
    for _ in range(2):
        check(tritonbits.dequant_bias(acc, sa, sub, bias).as_subclass(torch.Tensor), acc, sa, sb, bias)
    assert (stubbed.validated, len(db_module._plans)) == (2, 0)
    param = torch.nn.Parameter(bias, requires_grad=False)
    for _ in range(2):
        check(tritonbits.dequant_bias(acc, sa, sb, param), acc, sa, sb, bias)
    assert (stubbed.validated, len(db_module._plans)) == (3, 1)


def test_the_plan_cache_is_bounded(stubbed, gen, device, monkeypatch):
    """PLAN_CACHE_MAX layouts at most; the oldest plan goes first, and a re-bound plan (a launch hook made the
    call take the slow path) replaces its own entry without evicting another."""
    monkeypatch.setattr(db_module, "PLAN_CACHE_MAX", 3)
    calls = [operands(2, n, torch.float32, gen, device) for n in (8, 16, 24, 32)]
    for args in calls:
        tritonbits.dequant_bias(*args)
    assert [k[2] for k in db_module._plans] == [(2, 16), (2, 24), (2, 32)]
    monkeypatch.setattr(_launcher, "_hooks_set", lambda: True)
    tritonbits.dequant_bias(*calls[1])
    assert [k[2] for k in db_module._plans] == [(2, 16), (2, 24), (2, 32)]
