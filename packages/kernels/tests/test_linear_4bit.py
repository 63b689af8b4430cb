"""tritonbits.linear_4bit: x @ dequant(W).T + bias against the float64 product of the exact dequantized weight
(bnb's on CUDA, the numpy oracle's under the interpreter), under the K-aware fp32-accumulation policy."""

import pytest
import torch

import tritonbits
import tritonbits_reference as R
from tritonbits import configs
from tritonbits.ops import linear_4bit as L
from tritonbits_harness.tolerance import assert_exact, assert_matmul
from tritonbits_reference.dequantize_4bit import dequantize_4bit_float32

N, K = 48, 256  # small: every CPU case runs through the interpreter
MS = (1, 3, 16, 33)
FORCED = {
    "gemv": {"path": "gemv", "bm": 4, "bn": 16, "bk": 128, "split_k": 1, "pair": True},
    "gemv-split3-table16": {"path": "gemv", "bm": 2, "bn": 32, "bk": 64, "split_k": 3, "pair": False},
    "gemv2": {"path": "gemv2", "bm": 4, "bn": 16, "bk": 128, "warps": 4, "rows": 32},
    "gemv2-onechunk": {"path": "gemv2", "bm": 1, "bn": 8, "bk": 256, "warps": 4},
    "gemm": {"path": "gemm", "bm": 16, "bn": 32, "bk": 64, "split_k": 1},
    "gemm-split2": {"path": "gemm", "bm": 16, "bn": 16, "bk": 32, "split_k": 2},
    "dequant": {"path": "dequant"},
    # Gluon, sm90: on other machines aligned_config runs the heuristic's choice instead (after checking the config)
    "wgmma": {"path": "wgmma", "bm": 32, "wg": 1, "split_k": 1, "async": True},
}


def weight_of(shape, dtype, gen, quantize, *, blocksize=64, quant_type="nf4", nested=True, **kwargs):
    w = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    return quantize(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, **kwargs)


def exact_weight(q, state, bnb_dequantize):
    """The [N, K] weight every path must multiply: bnb's dequantization on CUDA, the oracle's on CPU."""
    return bnb_dequantize(q, state).reshape(tuple(state.shape))


def fresh_x(shape, dtype, gen, device):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", R.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_matches_the_exact_weight_product(blocksize, quant_type, nested, out_dtype, device, gen, quantize,
                                          bnb_dequantize):  # fmt: skip
    """Default path choice (the table or the heuristic) at every M, with and without bias."""
    q, state = weight_of((N, K), out_dtype, gen, quantize, blocksize=blocksize, quant_type=quant_type, nested=nested)
    w = exact_weight(q, state, bnb_dequantize)
    for m in MS:
        x = fresh_x((m, K), out_dtype, gen, device)
        bias = fresh_x((N,), out_dtype, gen, device) if m % 2 else None
        out = tritonbits.linear_4bit(x, q, state, bias)
        assert out.dtype == out_dtype and out.shape == (m, N)
        assert_matmul(out, x, w, bias)


@pytest.mark.parametrize("path", FORCED)
def test_every_path_and_split(path, out_dtype, device, gen, quantize, bnb_dequantize):
    """Each kernel path, forced through a config, split-K included (3 splits of 4 chunks: a short last one)."""
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    w = exact_weight(q, state, bnb_dequantize)
    prepared = L._prepare(q, state)
    for m in {"gemv": (1, 5), "gemv2": (1, 5), "dequant": (33,)}.get(path.split("-")[0], (5, 33)):
        x = fresh_x((m, K), out_dtype, gen, device)
        bias = fresh_x((N,), out_dtype, gen, device)
        assert_matmul(L.forward_2d(x, prepared, bias, config=FORCED[path]), x, w, bias)
        assert_matmul(L.forward_2d(x, prepared, None, config=FORCED[path]), x, w)


@pytest.mark.parametrize("path", [p for p in FORCED if p != "dequant"])
def test_launch_constexprs_follow_the_kernel_signature(path, out_dtype, device, gen, quantize):
    """The cached launcher's fast path passes constexprs positionally (on a GPU): every fused launch must list
    them in its kernel's signature order. Checked on the CPU too, where that path never runs."""
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    x = fresh_x((5, K), out_dtype, gen, device)
    out = torch.empty((5, N), dtype=out_dtype, device=device)
    prepared = L._prepare(q, state)
    if path == "wgmma" and out_dtype == torch.float32:  # refused (16-bit x only): fp32 x at M = 5 takes dequantize
        assert L.aligned_config(FORCED[path], prepared, out_dtype, 5, N, K, device, x) == {"path": "dequant"}
        return
    launches, _ws = L.fused_launches(x, prepared, None, out, FORCED[path], use_asm=False)
    for launch in launches:
        L._LAUNCHERS[launch.fn].check_order(len(launch.args), launch.constexprs)


GEMV2_CASES = [  # (quant_type, nested, blocksize, K, M, x dtype or None for W's, bias): small and varied
    ("nf4", True, 64, 256, 1, None, True),
    ("fp4", False, 64, 128, 16, None, False),
    ("nf4", False, 128, 256, 3, torch.float32, True),
    ("fp4", True, 32, 192, 2, torch.float16, False),
    ("nf4", True, 256, 512, 4, torch.bfloat16, True),
    ("nf4", True, 4096, 64, 7, None, True),
]


def word_case(case, out_dtype, device, gen, quantize, bnb_dequantize):
    """One GEMV2_CASES row's operands: K, M, N=40, x's dtype, the exact weight, the prepared weight, x twice as
    wide as K (for a strided view) and the bias (or None)."""
    quant_type, nested, blocksize, k, m, x_dtype, with_bias = case
    n = 40
    q, state = weight_of((n, k), out_dtype, gen, quantize, blocksize=blocksize, quant_type=quant_type, nested=nested)
    x_dtype = x_dtype or out_dtype
    wide = fresh_x((m, 2 * k), x_dtype, gen, device)
    bias = fresh_x((n,), x_dtype, gen, device) if with_bias else None
    return k, m, n, x_dtype, exact_weight(q, state, bnb_dequantize), L._prepare(q, state), wide, bias


@pytest.mark.parametrize("case", GEMV2_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_gemv2(case, out_dtype, device, gen, quantize, bnb_dequantize):
    """The gemv2 path forced: nf4/fp4, nested or not, blocksizes 32..4096 (sub-chunks per block, a block longer
    than the chunk), M across BLOCK_M (a partial last M block), x dtype unlike W's, bias, a partial last row step
    (N=40 over BLOCK_N=16), several row ranges and K chunks (the split-K workspace), strided x; with PREFETCH on,
    the same bits as with it off (the same products in the same order)."""
    k, m, n, x_dtype, w, prepared, wide, bias = word_case(case, out_dtype, device, gen, quantize, bnb_dequantize)
    for cfg in ({"path": "gemv2", "bm": 4, "bn": 16, "bk": 64, "warps": 4, "rows": 16},
                {"path": "gemv2", "bm": 2, "bn": 8, "bk": 1024, "warps": 2}):  # fmt: skip
        for x in (wide[:, :k], wide[:, ::2]):
            out = L.forward_2d(x, prepared, bias, config={**cfg, "prefetch": False})
            assert out.dtype == x_dtype and out.shape == (m, n)
            assert_matmul(out, x, w, bias)
            assert_exact(L.forward_2d(x, prepared, bias, config={**cfg, "prefetch": True}), out)


@pytest.mark.parametrize("case", GEMV2_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_gemm(case, out_dtype, device, gen, quantize, bnb_dequantize):
    """The tensor-core gemm forced, on gemv2's cases: sub-chunks (BLOCK_K over blocksizes 32/64), a block longer
    than the chunk, x dtype unlike W's (fp32 operands), a partial row tile (N=40 over BLOCK_N=32) and M block,
    split-K (3 splits of K/64 chunks: 3/3/2 at K=512, 1 each at K=192, 2 even ones at K=128/256, none at K=64),
    strided x."""
    k, m, n, x_dtype, w, prepared, wide, bias = word_case(case, out_dtype, device, gen, quantize, bnb_dequantize)
    for cfg in ({"path": "gemm", "bm": 16, "bn": 32, "bk": 128, "warps": 4, "split_k": 1},
                {"path": "gemm", "bm": 16, "bn": 16, "bk": 64, "warps": 4, "split_k": 3}):  # fmt: skip
        for x in (wide[:, :k], wide[:, ::2]):
            out = L.forward_2d(x, prepared, bias, config=cfg)
            assert out.dtype == x_dtype and out.shape == (m, n)
            assert_matmul(out, x, w, bias)


def test_gemv2_unaligned_bytes_fall_back(out_dtype, device, gen, quantize, bnb_dequantize):
    """Packed bytes that are not 4-byte aligned cannot be read as int32 words: the gemv kernel takes gemv2's and
    gemm's configs."""
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    w = exact_weight(q, state, bnb_dequantize)
    shifted = torch.empty(q.numel() + 1, dtype=torch.uint8, device=device)[1:].reshape(q.shape)
    shifted.copy_(q)
    prepared = L._prepare(shifted, state)
    assert L.words_of(prepared) is None
    x = fresh_x((2, K), out_dtype, gen, device)
    assert_matmul(L.forward_2d(x, prepared, None, config=FORCED["gemv2"]), x, w)
    assert_matmul(L.forward_2d(x, prepared, None, config=FORCED["gemm"]), x, w)
    # above M=4 the gemv would re-read W for every 4 rows: dequantize + matmul instead
    for m, want in ((4, "gemv"), (5, "dequant")):
        assert L.aligned_config(FORCED["gemm"], prepared, out_dtype, m, N, K, device)["path"] == want
    x = fresh_x((5, K), out_dtype, gen, device)
    assert_matmul(L.forward_2d(x, prepared, None, config=FORCED["gemm"]), x, w)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_x_dtype_differs_from_the_weight_dtype(x_dtype, out_dtype, device, gen, quantize, bnb_dequantize):
    """Output in x's dtype; products exact in fp32 whatever the pair (fp16 x with a bf16 weight, say)."""
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    w = exact_weight(q, state, bnb_dequantize)
    for m in (2, 17):
        x = fresh_x((m, K), x_dtype, gen, device)
        out = tritonbits.linear_4bit(x, q, state)
        assert out.dtype == x_dtype
        assert_matmul(out, x, w)


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_other_blocksizes_and_a_routed_k(blocksize, out_dtype, device, gen, quantize, bnb_dequantize):
    """Blocksizes without a tuned path (chunks of min(BLOCK_K, blocksize)); K=200 is no multiple of any K
    chunk: routed to dequantize + matmul; rows straddle quantization blocks in both."""
    for k in (192, 200):
        q, state = weight_of((24, k), out_dtype, gen, quantize, blocksize=blocksize)
        w = exact_weight(q, state, bnb_dequantize)
        for m in (1, 20):
            x = fresh_x((m, k), out_dtype, gen, device)
            assert_matmul(tritonbits.linear_4bit(x, q, state), x, w)


def test_leading_dims_and_strided_x(out_dtype, device, gen, quantize, bnb_dequantize):
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    w = exact_weight(q, state, bnb_dequantize)
    bias = fresh_x((N,), out_dtype, gen, device)
    x3 = fresh_x((2, 3, K), out_dtype, gen, device)
    out = tritonbits.linear_4bit(x3, q, state, bias)
    assert out.shape == (2, 3, N)
    assert_matmul(out.reshape(6, N), x3.reshape(6, K), w, bias)
    wide = fresh_x((5, 2 * K), out_dtype, gen, device)
    for x in (wide[:, ::2], fresh_x((K, 4), out_dtype, gen, device).t(), wide[:, K:]):
        assert not x.is_contiguous() or x.storage_offset()
        assert_matmul(tritonbits.linear_4bit(x, q, state, bias), x, w, bias)


@pytest.mark.parametrize("path", FORCED)
def test_strided_and_expanded_bias(path, out_dtype, device, gen, quantize, monkeypatch):
    """A bias view with any strides (every other element of a wider buffer; one value expanded to N, stride 0)
    gives the bytes of its contiguous copy on every path; the fused kernels read N contiguous values, so a
    strided bias reaching them as-is read the wrong elements (and an expanded one past its storage)."""
    monkeypatch.setattr(L, "config_for", lambda *args: FORCED[path])
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    x = fresh_x((5, K), out_dtype, gen, device)
    wide = fresh_x((2 * N,), out_dtype, gen, device)
    for bias in (wide[::2], wide[:1].expand(N)):
        assert not bias.is_contiguous()
        expected = tritonbits.linear_4bit(x, q, state, bias.contiguous())
        assert torch.equal(tritonbits.linear_4bit(x, q, state, bias), expected)
    leaf = fresh_x((2 * N,), out_dtype, gen, device).requires_grad_()
    tritonbits.linear_4bit(x, q, state, leaf[::2]).sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad[1::2], torch.zeros_like(leaf.grad[1::2]))


def test_strided_bias(out_dtype, device, gen, quantize, bnb_dequantize):
    """A bias view with a stride (every other element of a buffer; one value expanded) is read by element, on
    every path."""
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    w = exact_weight(q, state, bnb_dequantize)
    strided = fresh_x((2 * N,), out_dtype, gen, device)[::2]
    expanded = fresh_x((1,), out_dtype, gen, device).expand(N)
    assert strided.stride() == (2,) and expanded.stride() == (0,)
    prepared = L._prepare(q, state)
    for bias in (strided, expanded):
        for m in (1, 3, 33):
            x = fresh_x((m, K), out_dtype, gen, device)
            assert_matmul(tritonbits.linear_4bit(x, q, state, bias), x, w, bias)
        x = fresh_x((5, K), out_dtype, gen, device)
        for path in ("gemv", "gemv2", "gemm-split2"):
            assert_matmul(L.forward_2d(x, prepared, bias, config=FORCED[path]), x, w, bias)


def test_empty_rows(out_dtype, device, gen, quantize):
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    out = tritonbits.linear_4bit(torch.empty(0, K, dtype=out_dtype, device=device), q, state)
    assert out.shape == (0, N)


def test_empty_k(out_dtype, device, gen):
    """K = 0: F.linear's zeros, plus bias where given, for every path and leading shape (the fused kernels would
    leave the output unwritten; _flatten counts the rows, as reshape(-1, 0) cannot). The empty weight comes from
    tritonbits.quantize_4bit: bnb 0.50's CUDA quantize exits the process on it ("invalid argument", ops.cu)."""
    q, state = tritonbits.quantize_4bit(torch.empty(N, 0, dtype=out_dtype, device=device), blocksize=64)
    prepared = L._prepare(q, state)
    bias = fresh_x((N,), out_dtype, gen, device)
    for b in (None, bias):
        for shape in ((1, 0), (3, 0), (2, 3, 0)):
            x = fresh_x(shape, out_dtype, gen, device)
            want = torch.nn.functional.linear(x, torch.zeros(N, 0, dtype=out_dtype, device=device), b)
            assert torch.equal(tritonbits.linear_4bit(x, q, state, b), want), (shape, b is None)
        x = fresh_x((5, 0), out_dtype, gen, device)
        want = torch.nn.functional.linear(x, torch.zeros(N, 0, dtype=out_dtype, device=device), b)
        for path in ("gemv", "gemv2", "gemm-split2"):
            assert torch.equal(L.forward_2d(x, prepared, b, config=FORCED[path]), want), (path, b is None)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
def test_quant_storage_dtypes(quant_storage, out_dtype, device, gen, quantize, bnb_dequantize):
    q, state = weight_of((N, K), out_dtype, gen, quantize, quant_storage=quant_storage)
    assert q.dtype == quant_storage
    w = exact_weight(q, state, bnb_dequantize)
    x = fresh_x((3, K), out_dtype, gen, device)
    assert_matmul(tritonbits.linear_4bit(x, q, state), x, w)


def test_params4bit_carries_its_quant_state(out_dtype, device, gen, bnb_dequantize):
    from tritonbits_reference import bnb as RB

    param = RB.params4bit(torch.randn(N, K, generator=gen).to(out_dtype), device=device)
    w = exact_weight(param.data, param.quant_state, bnb_dequantize)
    x = fresh_x((4, K), out_dtype, gen, device)
    assert_matmul(tritonbits.linear_4bit(x, param), x, w)


def test_reference_oracle_agrees(out_dtype, device, gen, quantize):
    """The package oracle (fp32 x @ W.T + bias on CPU) is within the same policy as the kernel."""
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    x, bias = fresh_x((3, K), out_dtype, gen, device), fresh_x((N,), out_dtype, gen, device)
    w = R.dequantized_weight(q, state)
    assert_matmul(R.linear_4bit(x, q, state, bias), x.cpu().float(), w, bias)
    got = tritonbits.linear_4bit(x, q, state, bias)
    assert_matmul(got, x, w, bias)


def test_the_policy_catches_an_unrounded_weight(gen, quantize, device):
    """The weight must be rounded to its dtype before the product: fp32 code*absmax without that rounding is
    outside the policy (so passing it is earned)."""
    q, state = weight_of((N, K), torch.bfloat16, gen, quantize)
    w = R.dequantized_weight(q, state)
    unrounded = torch.from_numpy(dequantize_4bit_float32(q.cpu(), state)).reshape(N, K)
    assert not torch.equal(unrounded, w.float())
    x = torch.randn(8, K, generator=gen).to(torch.bfloat16)
    wrong = (x.float() @ unrounded.T).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="outside its K-aware policy"):
        assert_matmul(wrong, x, w)


# --- autograd -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_grads_of_x_and_bias(with_bias, out_dtype, device, gen, quantize, bnb_dequantize):
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    w = exact_weight(q, state, bnb_dequantize)
    x = fresh_x((2, 3, K), out_dtype, gen, device).requires_grad_()
    bias = fresh_x((N,), out_dtype, gen, device).requires_grad_() if with_bias else None
    out = tritonbits.linear_4bit(x, q, state, bias)
    grad = fresh_x(out.shape, out_dtype, gen, device)
    out.backward(grad)
    g2 = grad.reshape(-1, N)
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == out_dtype
    assert_matmul(x.grad.reshape(-1, K), g2, w.t())  # grad_x = grad @ W
    if bias is not None:
        assert bias.grad is not None
        ones = torch.ones(1, g2.shape[0], dtype=out_dtype, device=device)
        assert_matmul(bias.grad.reshape(1, N), ones, g2.t())  # grad_bias = 1^T @ grad


def test_bias_only_grad_and_no_grad_mode(out_dtype, device, gen, quantize):
    q, state = weight_of((N, K), out_dtype, gen, quantize)
    x = fresh_x((3, K), out_dtype, gen, device)
    bias = fresh_x((N,), out_dtype, gen, device).requires_grad_()
    tritonbits.linear_4bit(x, q, state, bias).sum().backward()
    assert bias.grad is not None and x.grad is None
    with torch.no_grad():
        assert not tritonbits.linear_4bit(x, q, state, bias).requires_grad


# --- registration: opcheck, torch.compile, CUDA graphs ---------------------------------------------------


def _op_args(q, state, x, bias):
    p = L._prepare(q, state)
    s = p.state
    return (x, p.A, p.absmax, p.code2, p.absmax2, p.offset, bias, s.blocksize, p.blocksize2, s.quant_type,
            s.shape[0], s.shape[1], s.dtype)  # fmt: skip


def test_opcheck(device, gen, quantize):
    q, state = weight_of((32, 64), torch.float16, gen, quantize)
    x = fresh_x((3, 64), torch.float16, gen, device).requires_grad_()
    bias = fresh_x((32,), torch.float16, gen, device)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.tritonbits.linear_4bit.default, _op_args(q, state, x, bias), test_utils=tests)
    if device.type == "cuda":
        torch.library.opcheck(torch.ops.tritonbits.linear_4bit_triton_op.default, _op_args(q, state, x, bias))


@pytest.mark.gpu
def test_compiles_fullgraph_forward_and_backward(device, gen):
    """A bnb Linear4bit pair inside torch.compile(fullgraph=True): the triton_op in the graph, values and grads
    equal to eager within the policy."""
    from tritonbits_reference import bnb as RB

    layers = [RB.linear4bit(i, o, dtype=torch.bfloat16, bias=True, device=device, generator=gen)
              for i, o in ((256, 512), (512, 256))]  # fmt: skip

    def mlp(x):
        for layer in layers:
            x = tritonbits.linear_4bit(x, layer.weight, bias=layer.bias)
        return x

    targets: list[str] = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    x = torch.randn(8, 256, generator=gen).to(torch.bfloat16).to(device)
    torch._dynamo.reset()
    torch.compile(mlp, fullgraph=True, backend=record)(x)
    assert sum("linear_4bit_triton_op" in t for t in targets) == 2, targets
    torch._dynamo.reset()
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = mlp(xe), torch.compile(mlp, fullgraph=True)(xc)
    torch.testing.assert_close(yc, ye)
    grad = torch.randn_like(ye)
    ye.backward(grad)
    yc.backward(grad)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.gpu
def test_cuda_graph_capture(device, gen, quantize):
    """linear_4bit (split-K workspace included) captured and replayed in a CUDA graph equals eager."""
    q, state = weight_of((4096, 1024), torch.bfloat16, gen, quantize)
    for m in (1, 16, 300):
        x = fresh_x((m, 1024), torch.bfloat16, gen, device)
        want = tritonbits.linear_4bit(x, q, state)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tritonbits.linear_4bit(x, q, state)
        out.fill_(float("nan"))
        graph.replay()
        assert_exact(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 32, 64, 128, 256, 1024])
def test_large_shapes(m, out_dtype, device, gen, quantize, bnb_dequantize):
    """Tuned shapes (Llama-3-8B MLP), every path the table picks, against bnb's dequantized weight."""
    for n, k in ((14336, 4096), (4096, 14336)):
        q, state = weight_of((n, k), out_dtype, gen, quantize)
        w = exact_weight(q, state, bnb_dequantize)
        x = fresh_x((m, k), out_dtype, gen, device)
        bias = fresh_x((n,), out_dtype, gen, device)
        assert_matmul(tritonbits.linear_4bit(x, q, state, bias), x, w, bias)


# --- configs -------------------------------------------------------------------------------------------


KNOWN_CONFIG_KEYS = {"gemv2": {"path", "bm", "bn", "bk", "warps", "stages", "rows", "per_sm", "prefetch"},
                     "gemv": {"path", "bm", "bn", "bk", "warps", "stages", "split_k", "pair"},
                     "gemm": {"path", "bm", "bn", "bk", "warps", "stages", "split_k"}, "dequant": {"path"},
                     "mma": {"path", "warps", "split_k", "kwarps", "prefetch"},
                     "wgmma": {"path", "bm", "wg", "split_k", "async"}}  # fmt: skip


def test_table_entries_are_reachable_and_valid():
    """Every checked-in entry has a key the op's key function can produce and a launchable config."""
    for family, entries in configs.table("linear_4bit").items():
        for key, cfg in entries.items():
            width, m, n, k = key.split("/")
            assert width in ("x16", "x32"), (family, key)
            dtype = torch.float32 if width == "x32" else torch.bfloat16
            assert L.config_key(dtype, int(m[1:]), int(n[1:]), int(k[1:])) == key, (family, key)
            assert cfg["path"] in ("gemv", "gemv2", "gemm", "dequant", "mma", "wgmma"), (family, key)
            if cfg["path"] == "wgmma":  # 16-bit x, M in the kernel's range (a bucket of M = 17..256)
                assert width == "x16" and L.wg4.MIN_M <= int(m[1:]) <= L.wg4.MAX_M, (family, key)
                assert cfg["bm"] in L.WGMMA_BM and cfg["wg"] in L.WGMMA_WG and cfg["async"] in (False, True)
                assert type(cfg["split_k"]) is int and cfg["split_k"] >= 1, (family, key)
            elif cfg["path"] == "mma":  # 16-bit x, M <= mma4.MAX_M (mma_ok; the tuner writes it up to M = 32)
                assert width == "x16" and int(m[1:]) <= L.mma4.MAX_M, (family, key)
                assert {"warps", "split_k"} <= set(cfg) and cfg["warps"] in (1, 2, 4, 8), (family, key)
                assert cfg["warps"] % cfg.get("kwarps", 1) == 0, (family, key)
            elif cfg["path"] == "gemv2":
                assert {"bm", "bn", "bk", "warps"} <= set(cfg) and cfg["bm"] <= 4, (family, key)
                assert cfg.get("prefetch", False) in (False, True), (family, key)
            elif cfg["path"] != "dequant":
                assert {"bm", "bn", "bk", "split_k", "warps"} <= set(cfg), (family, key)
                assert cfg["path"] == "gemv" or cfg["bm"] >= 16, (family, key)
            # a misspelt key would be ignored by the launch (cfg.get): only the keys the paths read
            assert set(cfg) <= KNOWN_CONFIG_KEYS[cfg["path"]], (family, key, set(cfg) - KNOWN_CONFIG_KEYS[cfg["path"]])


def test_a_family_without_a_table_takes_its_fallback(monkeypatch):
    """configs.FALLBACK_FAMILY: a family without entries of its own for an op reads its fallback family's (the
    H200 the H100's; both checked-in tables now have h200 entries, so a table with h100 entries only stands in),
    a family with its own table reads only that one, an unknown family none."""
    from tritonbits import _runtime

    h100 = configs.table("linear_4bit")["h100"]
    key = next(iter(h100))
    assert configs.FALLBACK_FAMILY["h200"] == "h100"
    for op in ("dequant_bias", "linear_4bit"):
        own = configs.table(op)
        assert configs.family_table(op, "h200") is own["h200"] and configs.family_table(op, "h100") is own["h100"]
    real = configs.table
    monkeypatch.setattr(configs, "table", lambda op: {"h100": h100} if op == "linear_4bit" else real(op))
    for family, want in (("h200", h100[key]), ("h100", h100[key]), ("t4", None)):
        monkeypatch.setattr(_runtime, "gpu_family", lambda device, family=family: family)
        assert configs.lookup("linear_4bit", torch.device("cuda", 0), key) == want, family


def test_launch_count_is_the_launches_planned(device, gen, quantize):
    """launch_count (the tuner's near-tie rank) against the launches each path actually plans."""
    q, state = weight_of((64, 1024), torch.bfloat16, gen, quantize)
    pw = L._prepare(q, state)
    x = fresh_x((3, 1024), torch.bfloat16, gen, device)
    out = torch.empty(3, 64, device=device, dtype=torch.bfloat16)
    cfgs = [{"path": "mma", "warps": 4, "split_k": s, "kwarps": kw} for s, kw in ((1, 1), (1, 4), (2, 1), (4, 2))]
    cfgs += [{"path": "gemm", "bm": 16, "bn": 64, "bk": 128, "warps": 4, "stages": 3, "split_k": s} for s in (1, 4)]
    cfgs += [{"path": "gemv2", "bm": 4, "bn": 16, "bk": bk, "warps": 4, "stages": 1} for bk in (1024, 256)]
    cfgs += [{"path": "gemv", "bm": 4, "bn": 32, "bk": 64, "warps": 4, "stages": 3, "split_k": s} for s in (1, 3)]
    for cfg in cfgs:
        planned = L._mma_launches(x, pw, None, out, cfg)[0] if cfg["path"] == "mma" else (
            L.fused_launches(x, pw, None, out, cfg, use_asm=False)[0])  # fmt: skip
        assert L.launch_count(cfg, 3, 64, 1024) == len(planned), cfg
    x12 = fresh_x((12, 1024), torch.bfloat16, gen, device)  # above DIRECT_MAX_M: the lane-order copy first
    out12 = torch.empty(12, 64, device=device, dtype=torch.bfloat16)
    for cfg in cfgs[:4]:
        planned = L._mma_launches(x12, pw, None, out12, cfg)[0]
        assert L.launch_count(cfg, 12, 64, 1024) == len(planned), cfg
        assert planned[0].fn is L.mma4._lane_order_kernel and planned[1].slots[0] == (0, "xl"), cfg
    assert L.launch_count({"path": "dequant"}, 300, 64, 1024) == 2


def test_heuristic_without_a_table(device):
    for m in (1, 3, 4, 5, 8, 9, 16, 100, 256, 257, 4096):
        # the mma kernel up to MMA_MAX_M for 16-bit x and K a multiple of its segment (aligned_config asks again
        # with mma=False where mma_ok refuses the problem)
        for dtype in (torch.bfloat16, torch.float16):
            mma = L.heuristic_config(dtype, m, 4096, 4096, 132)
            assert (mma["path"] == "mma") == (m <= L.MMA_MAX_M), (m, mma)
            assert L.heuristic_config(dtype, m, 4096, 4096 + 128, 132)["path"] != "mma"
        cfg = L.heuristic_config(torch.bfloat16, m, 4096, 4096, 132, mma=False)
        assert cfg["path"] == ("gemv2" if m <= 2 else "gemm" if m <= 128 else "dequant")
        if cfg["path"] == "gemm":  # HEURISTIC_GEMM's NOTE: BLOCK_M from M, the probe's tiles
            assert cfg["bm"] == max(16, L.bucket(m)) and cfg["split_k"] >= 1
            wide_n = L.heuristic_config(torch.bfloat16, m, 14336, 4096, 132, mma=False)
            assert wide_n["bn"] == (64 if m <= 32 else cfg["bn"])
        wide = L.heuristic_config(torch.float32, m, 4096, 4096, 132)
        assert wide["path"] == ("gemv2" if m <= 4 else "dequant")
        for chosen in (mma, cfg, wide):
            if chosen["path"] != "dequant":
                assert set(chosen) <= KNOWN_CONFIG_KEYS[chosen["path"]], chosen

    # the heuristic's mma config (HEURISTIC_MMA's NOTE): one launch (one split, K warps) except where the probe
    # measured the 8-split config more than 3% faster; M <= 2 reads M = 1's row; splits capped at K's segments / 2
    def mma_of(m, n, k=4096):
        c = L.heuristic_config(torch.bfloat16, m, n, k, 132)
        return c["warps"], c["split_k"], c["kwarps"], L.launch_count(c, m, n, k)

    assert [mma_of(1, n) for n in (1024, 4096, 14336, 28672)] == [(4, 8, 1, 2), (8, 1, 8, 1), (4, 8, 1, 2),
                                                                   (4, 1, 4, 1)]  # fmt: skip
    assert [mma_of(8, n) for n in (1024, 4096, 14336, 28672)] == [(4, 8, 1, 2), (8, 1, 8, 1), (2, 1, 2, 1),
                                                                   (2, 1, 1, 1)]  # fmt: skip
    assert mma_of(2, 14336) == mma_of(1, 14336) and mma_of(3, 28672) == mma_of(4, 28672) == (4, 8, 1, 2)
    assert [mma_of(1, 1024, k)[1] for k in (256, 512, 1024, 4096, 14336)] == [1, 1, 2, 8, 8]
    # M = 9..16 (session 21): 4 warps, 4 K warps (one mma launch after the lane-order copy) where N > 2048; no mma
    # config at N <= 2048 (not measured there), so the gemm; above M = 16 the gemm
    assert [mma_of(m, n) for m, n in ((9, 4096), (16, 14336), (16, 28672))] == [(4, 1, 4, 2)] * 3
    assert L.heuristic_mma_config(16, 2048, 4096) is None and L.heuristic_mma_config(12, 2049, 4096) is not None
    assert L.heuristic_config(torch.bfloat16, 12, 1024, 4096, 132)["path"] == "gemm"
    assert L.heuristic_config(torch.bfloat16, 17, 4096, 4096, 132)["path"] == "gemm"

    # HEURISTIC_GEMV2's NOTE: M=1 32 x 128 up to K=4096, 8 x 1024 above when 1024 divides K; M=2 16 x 512, 4 an SM
    def tile(m: int, k: int) -> tuple:
        cfg = L.heuristic_config(torch.bfloat16, m, 4096, k, 132, mma=False)
        return cfg["bn"], cfg["bk"], cfg["warps"], cfg["per_sm"]

    assert tile(1, 4096) == (32, 128, 4, 8) and tile(1, 14336) == (8, 1024, 4, 8) and tile(1, 8192) == (8, 1024, 4, 8)
    assert tile(1, 11008) == (32, 128, 4, 8) and tile(2, 14336) == (16, 512, 4, 4)
    assert L.config_key(torch.float16, 3, 14336, 4096) == L.config_key(torch.bfloat16, 4, 16384, 4096)


# --- bad input ----------------------------------------------------------------------------------------


def _bad_cases(device):
    f16 = dict(dtype=torch.float16, device=device)
    return {
        "K mismatch": (lambda q, st: (torch.randn(2, K + 2, **f16), q, st, None), ValueError, "x has shape"),
        "x 0-d": (lambda q, st: (torch.tensor(1.0, **f16), q, st, None), ValueError, "x has shape"),
        "x dtype": (lambda q, st: (torch.ones(2, K, dtype=torch.int32, device=device), q, st, None), TypeError,
                    "x must have dtype"),
        "x type": (lambda q, st: ([[1.0] * K], q, st, None), TypeError, "x must be a torch.Tensor"),
        "bias shape": (lambda q, st: (torch.randn(2, K, **f16), q, st, torch.randn(N + 1, **f16)), ValueError,
                       "bias has shape"),
        "bias dtype": (lambda q, st: (torch.randn(2, K, **f16), q, st, torch.randn(N, device=device)), TypeError,
                       "bias has dtype"),
        "bias type": (lambda q, st: (torch.randn(2, K, **f16), q, st, 1.0), TypeError, "bias must be"),
        "missing quant_state": (lambda q, st: (torch.randn(2, K, **f16), q, None, None), ValueError,
                                "quant_state is required"),
        "weight requires grad": (lambda q, st: (torch.randn(2, K, **f16), torch.nn.Parameter(
            torch.randn(N * K // 4, 1, device=device)), st, None), ValueError, "weight requires grad"),
        "weight type": (lambda q, st: (torch.randn(2, K, **f16), q.tolist(), st, None), TypeError, "weight must be"),
        "weight dtype": (lambda q, st: (torch.randn(2, K, **f16), q.to(torch.int64), st, None), TypeError,
                         "weight"),
        "weight size": (lambda q, st: (torch.randn(2, K, **f16), q[:-1], st, None), ValueError,
                        "weight holds"),
        "1-d quant_state": (lambda q, st: (torch.randn(2, K, **f16), q, _reshaped(st, [N * K]), None), ValueError,
                            r"quant_state\.shape must be 2-D"),
        "absmax dtype": (lambda q, st: (torch.randn(2, K, **f16), q, _with(st, absmax=st.absmax.float()), None),
                         TypeError, r"quant_state\.absmax"),
    }  # fmt: skip


def _state(device):
    w = torch.randn(N, K).to(torch.float16)
    q, st = R.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    st = tritonbits.QuantState.from_any(st)
    st.absmax, st.offset = st.absmax.to(device), st.offset.to(device)
    st.state2.absmax, st.state2.code = st.state2.absmax.to(device), st.state2.code.to(device)
    return q.to(device), st


def _reshaped(st, shape):
    import copy

    st = copy.copy(st)
    st.shape = torch.Size(shape)
    return st


def _with(st, **fields):
    import copy

    st = copy.copy(st)
    for k, v in fields.items():
        setattr(st, k, v)
    return st


@pytest.mark.parametrize("case", list(_bad_cases(torch.device("cpu"))))
def test_bad_input_is_refused(case, device):
    q, st = _state(device)
    make, error, match = _bad_cases(device)[case]
    with pytest.raises(error, match=match):
        tritonbits.linear_4bit(*make(q, st))


@pytest.mark.gpu
def test_device_mismatch_is_refused(device):
    q, st = _state(device)
    with pytest.raises(ValueError, match="x is on cpu"):
        tritonbits.linear_4bit(torch.randn(2, K, dtype=torch.float16), q, st)
    with pytest.raises(ValueError, match="bias is on cpu"):
        tritonbits.linear_4bit(torch.randn(2, K, dtype=torch.float16, device=device), q, st,
                               torch.randn(N, dtype=torch.float16))  # fmt: skip


# --- tritonbits.nn.Linear4bit -----------------------------------------------------------------------------


def test_module_from_bnb_matches_the_function_and_bnb_weight(device, gen, bnb_dequantize):
    from tritonbits_reference import bnb as RB

    layer = RB.linear4bit(K, N, dtype=torch.bfloat16, bias=True, device=device, generator=gen)
    module = tritonbits.nn.Linear4bit.from_bnb(layer)
    x = fresh_x((2, 5, K), torch.bfloat16, gen, device)
    out = module(x)
    assert_exact(out, tritonbits.linear_4bit(x, layer.weight, bias=layer.bias))
    w = exact_weight(layer.weight.data, layer.weight.quant_state, bnb_dequantize)
    assert_matmul(out.reshape(-1, N), x.reshape(-1, K), w, layer.bias)


def test_module_from_linear_quantizes_once(device, gen):
    linear = torch.nn.Linear(K, N, dtype=torch.bfloat16).to(device)
    module = tritonbits.nn.Linear4bit.from_linear(linear, blocksize=128)
    packed, state = tritonbits.quantize_4bit(linear.weight.detach(), blocksize=128, compress_statistics=True,
                                             quant_type="nf4")  # fmt: skip
    assert torch.equal(module.weight, packed)
    x = fresh_x((3, K), torch.bfloat16, gen, device)
    assert_exact(module(x), tritonbits.linear_4bit(x, packed, state, linear.bias.detach()))
    with pytest.raises(TypeError, match="linear must be"):
        tritonbits.nn.Linear4bit.from_linear(module)


def test_module_state_dict_is_bnb_format(device, gen):
    """Our state dict has bnb's keys and tensors; bnb's loads into a fresh module (and gives the same output);
    ours round-trips; an empty module refuses to run."""
    from tritonbits_reference import bnb as RB

    layer = RB.linear4bit(K, N, dtype=torch.bfloat16, bias=True, device=device, generator=gen)
    theirs = layer.state_dict()
    ours = tritonbits.nn.Linear4bit.from_bnb(layer).state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key].cpu(), theirs[key].cpu()), key
    fresh = tritonbits.nn.Linear4bit(K, N, dtype=torch.bfloat16, device=device)
    x = fresh_x((4, K), torch.bfloat16, gen, device)
    with pytest.raises(ValueError, match="no quant state"):
        fresh(x)
    fresh.load_state_dict(theirs)
    assert_exact(fresh(x), tritonbits.linear_4bit(x, layer.weight, bias=layer.bias))
    again = tritonbits.nn.Linear4bit(K, N, dtype=torch.bfloat16, device=device)
    again.load_state_dict(fresh.state_dict())
    assert_exact(again(x), fresh(x))
    with pytest.raises(RuntimeError, match="quant_state"):
        tritonbits.nn.Linear4bit(K, N, device=device).load_state_dict({"weight": theirs["weight"],
                                                                       "bias": theirs["bias"]})  # fmt: skip


def test_module_load_checks_shape_and_takes_the_checkpoint_format(device, gen):
    """A checkpoint of another shape (or a packed weight too short for this one) is refused as torch refuses a
    size mismatch; one of another format (fp4, blocksize 128, not nested) loads, and the layer then says so."""
    linear = torch.nn.Linear(K, N, dtype=torch.bfloat16).to(device)
    theirs = tritonbits.nn.Linear4bit.from_linear(linear, quant_type="fp4", blocksize=128,
                                                  compress_statistics=False).state_dict()  # fmt: skip
    layer = tritonbits.nn.Linear4bit(K, N, dtype=torch.bfloat16, device=device)
    layer.load_state_dict(theirs)
    assert (layer.quant_type, layer.blocksize, layer.compress_statistics) == ("fp4", 128, False)
    assert "quant_type=fp4, blocksize=128, nested=False" in repr(layer)
    x = fresh_x((3, K), torch.bfloat16, gen, device)
    assert_exact(layer(x), tritonbits.nn.Linear4bit.from_linear(linear, quant_type="fp4", blocksize=128,
                                                                compress_statistics=False)(x))  # fmt: skip
    with pytest.raises(RuntimeError, match=rf"size mismatch for weight: .*quant_state.shape is \({N}, {K}\)"):
        tritonbits.nn.Linear4bit(N, K, dtype=torch.bfloat16, device=device).load_state_dict(theirs)
    for packed in (theirs["weight"][: theirs["weight"].shape[0] // 2], torch.cat([theirs["weight"]] * 2)):
        with pytest.raises(RuntimeError, match="size mismatch for weight: the packed weight holds"):
            layer.load_state_dict(dict(theirs, weight=packed))
    # a refused load leaves the layer as it was (torch leaves a mismatched parameter untouched)
    assert_exact(layer(x), tritonbits.nn.Linear4bit.from_linear(linear, quant_type="fp4", blocksize=128,
                                                                compress_statistics=False)(x))  # fmt: skip
    nf4 = tritonbits.nn.Linear4bit.from_linear(linear).state_dict()
    transposed = tritonbits.nn.Linear4bit.from_linear(torch.nn.Linear(N, K, dtype=torch.bfloat16).to(device))
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(dict(transposed.state_dict(), bias=nf4["bias"]))  # same packed bytes, [K, N]
    assert layer.quant_type == "fp4" and tuple(layer.quant_state.shape) == (N, K)


def test_module_grads_and_frozen_weight(device, gen):
    linear = torch.nn.Linear(K, N, dtype=torch.bfloat16).to(device)
    module = tritonbits.nn.Linear4bit.from_linear(linear)
    assert [name for name, _ in module.named_parameters()] == ["bias"]
    x = fresh_x((3, K), torch.bfloat16, gen, device).requires_grad_()
    module(x).sum().backward()
    assert x.grad is not None and module.bias.grad is not None


CASTS = {
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "double": torch.float64,
    "to": torch.float16,
}


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cast", list(CASTS))
def test_module_dtype_cast_keeps_packed_weight(quant_storage, cast, device, gen, bnb_dequantize):
    """A module dtype cast (.half(), .to(dtype), ...) casts the bias, never the packed bytes, also in a float
    quant_storage (they were converted value by value: a wrong forward with no error, or a refused size)."""
    linear = torch.nn.Linear(K, N, dtype=torch.bfloat16).to(device)
    module = tritonbits.nn.Linear4bit.from_linear(linear, quant_storage=quant_storage)
    packed, state = module.weight.clone(), module.quant_state
    module = module.to(torch.float16) if cast == "to" else getattr(module, cast)()
    assert module.weight.dtype == quant_storage and module.quant_state is state
    assert_exact(module.weight.view(torch.uint8), packed.view(torch.uint8))
    assert module.bias is not None and module.bias.dtype == CASTS[cast]
    x = fresh_x((3, K), torch.float16, gen, device)
    w = exact_weight(packed, state, bnb_dequantize).to(torch.float16)
    assert_matmul(module(x), x, w, module.bias.to(torch.float16))


@pytest.mark.gpu
def test_module_moves_and_compiles(device, gen):
    """.to() moves the quant state with the weight; torch.compile(fullgraph=True) of the module matches eager."""
    linear = torch.nn.Linear(K, N, dtype=torch.bfloat16)
    module = tritonbits.nn.Linear4bit.from_linear(linear.to(device)).cpu().to(device)
    assert module.quant_state is not None and module.quant_state.absmax.device.type == "cuda"
    x = fresh_x((5, K), torch.bfloat16, gen, device)
    torch._dynamo.reset()
    assert_exact(torch.compile(module, fullgraph=True)(x), module(x))


def test_words_need_an_aligned_address():
    """gemv2 reads the packed bytes as int32 words only where their address is 4-byte aligned: a storage that
    itself starts off alignment (a buffer from outside torch's allocator) has storage offset 0 but is refused."""
    from types import SimpleNamespace

    buf = bytearray(4 * 64 + 1)
    odd = torch.frombuffer(buf, dtype=torch.uint8, offset=1)
    if odd.data_ptr() % 4 == 0:  # the buffer itself started at an odd address: one byte further is aligned
        odd = torch.frombuffer(buf, dtype=torch.uint8, offset=0, count=4 * 64)
    assert odd.storage_offset() == 0 and odd.data_ptr() % 4
    assert L.words_of(SimpleNamespace(A=odd)) is None
    aligned = torch.empty(4 * 64, dtype=torch.uint8)
    assert L.words_of(SimpleNamespace(A=aligned)) is not None
    assert L.words_of(SimpleNamespace(A=aligned[1:65])) is None
