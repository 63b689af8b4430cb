"""Reliability on a real GPU, for every op in tritonbits_harness.op_cases: a non-default stream with no implicit
sync, another device (cuda:1), CUDA-graph capture and replay with new inputs, 8 threads on different quant
states, small shapes for the sanitizer session (marker `sanitize`), and outputs of more than 2**31 elements
(marker `huge`; deselect with -m "not huge"). All marked `gpu`: skipped on CPU runs, run by test-<gpu>-<dtype>.
"""

import threading

import numpy as np
import pytest
import torch

import tritonbits
import tritonbits_reference as R
from tritonbits_harness import op_cases
from tritonbits_harness.tolerance import assert_dequant_bias, assert_exact

pytestmark = pytest.mark.gpu

VARIANTS = op_cases.variants()
IDS = [f"{op}-{v}" for op, v in VARIANTS]


def assert_outputs_equal(name, got, want):
    got_t, want_t = op_cases.outputs(name, got), op_cases.outputs(name, want)
    assert len(got_t) == len(want_t)
    for g, w in zip(got_t, want_t, strict=True):
        assert_exact(g, w)


def copy_inputs(dst: op_cases.Call, src: op_cases.Call) -> None:
    """Copy every tensor of `src` into the same-placed tensor of `dst` (same structure, new values)."""
    pairs = list(zip(op_cases.tensors(dst), op_cases.tensors(src), strict=True))
    for d, s in pairs:
        d.copy_(s)


def seeded(op, variant, device, seed, dtype) -> op_cases.Call:
    """A valid call whose values depend only on `seed`: two calls of one seed are equal, sharing nothing."""
    return op_cases.make(op, variant, device, torch.Generator().manual_seed(seed), dtype)


def seeds(gen: torch.Generator, k: int) -> list[int]:
    return torch.randint(0, 2**31 - 1, (k,), generator=gen).tolist()


# --- streams ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "variant"), VARIANTS, ids=IDS)
def test_non_default_stream_without_implicit_sync(op, variant, out_dtype, device, gen):
    """On a side stream kept busy (a ~50 ms sleep), then given new inputs (copied on that stream): the op must
    return before the stream's work is done (no sync) and its result, read after an event, must be the new
    inputs' result (a launch on another stream would read the old inputs while the side stream sleeps)."""
    old, new = seeds(gen, 2)
    kw = seeded(op, variant, device, old, out_dtype)
    want = op_cases.call(op, seeded(op, variant, device, new, out_dtype))  # eager, default stream; compiles
    kw_new = seeded(op, variant, device, new, out_dtype)  # untouched (an out= given is still poisoned)
    op_cases.call(op, kw)  # primes the caches for kw's objects: the side-stream call takes the cached path
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    done = torch.cuda.Event()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        copy_inputs(kw, kw_new)
        got = op_cases.call(op, kw)
        done.record(side)
    assert not done.query(), "the call waited for its stream (an implicit sync)"
    torch.cuda.current_stream().wait_event(done)
    assert_outputs_equal(op, got, want)
    torch.cuda.synchronize()


# --- another device -----------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (cuda:1); this machine has fewer")
@pytest.mark.parametrize(("op", "variant"), VARIANTS, ids=IDS)
def test_on_cuda1_while_cuda0_is_current(op, variant, out_dtype, gen):
    """Inputs on cuda:1 while cuda:0 is the current device: the kernel must run on cuda:1 (Triton launches on
    the current device unless told), fresh and from the cache, equal to the same call on cuda:0."""
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    kw0 = op_cases.make(op, variant, torch.device("cuda:0"), torch.Generator().manual_seed(seed), out_dtype)
    kw1 = op_cases.make(op, variant, torch.device("cuda:1"), torch.Generator().manual_seed(seed), out_dtype)
    want = op_cases.call(op, kw0)
    with torch.cuda.device(0):
        for _ in range(3):  # the first call compiles for cuda:1; the next ones take the cached/bound launch
            got = op_cases.call(op, kw1)
            for g, w in zip(op_cases.outputs(op, got), op_cases.outputs(op, want), strict=True):
                assert g.device == torch.device("cuda:1")
                assert_exact(g.cpu(), w.cpu())
    torch.cuda.synchronize(1)


# --- CUDA graphs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "variant"), VARIANTS, ids=IDS)
def test_cuda_graph_replay_with_new_inputs_equals_eager(op, variant, out_dtype, device, gen):
    """Capture one call, then twice: copy new inputs into the captured buffers, replay, and compare with an
    eager call on separate tensors holding the same new values."""
    first, *later = seeds(gen, 3)
    kw = seeded(op, variant, device, first, out_dtype)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):  # warm up (compile, fill the caches) off the capture, as torch's docs do
        for _ in range(2):
            op_cases.call(op, kw)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op_cases.call(op, kw)
    for seed in later:
        for t in op_cases.outputs(op, captured):  # poison what the replay must write
            t.fill_(float("nan") if t.is_floating_point() else 0x5A)
        copy_inputs(kw, seeded(op, variant, device, seed, out_dtype))
        graph.replay()
        want = op_cases.call(op, seeded(op, variant, device, seed, out_dtype))
        torch.cuda.synchronize()
        assert_outputs_equal(op, captured, want)


# --- threads ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(op_cases.CASES))
def test_eight_threads_on_different_inputs(op, out_dtype, device, gen):
    """8 Python threads, each with its own inputs (quant states) and stream, calling the op 20 times: every
    result equals the single-threaded one. Triton's interpreter is not thread-safe: GPU only."""
    variants = list(op_cases.CASES[op].variants)
    thread_seeds = seeds(gen, 8)

    def fresh(i: int) -> op_cases.Call:
        return seeded(op, variants[i % len(variants)], device, thread_seeds[i], out_dtype)

    wants = [tuple(t.clone() for t in op_cases.outputs(op, op_cases.call(op, fresh(i)))) for i in range(8)]
    torch.cuda.synchronize()
    calls = [fresh(i) for i in range(8)]  # new objects: the threads fill the per-quant-state caches concurrently
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            stream = torch.cuda.Stream()
            start.wait()
            with torch.cuda.stream(stream):
                for _ in range(20):
                    got = op_cases.outputs(op, op_cases.call(op, calls[i]))
                    stream.synchronize()
                    for g, w in zip(got, wants[i], strict=True):
                        assert_exact(g, w)
        except BaseException as exc:  # reported below, with the thread's index
            errors.append(AssertionError(f"thread {i}: {type(exc).__name__}: {exc}"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --- small shapes, every path: the selection the sanitizer session runs ----------------------------------------

SMALL = {
    "dequantize_4bit": [(1,), (5,), (3, 1025), (130, 64)],
    "dequant_bias": [(1, 1), (3, 17), (65, 1025)],
    "quantize_4bit": [(1,), (5,), (3, 1025), (130, 64)],
    "quantize_blockwise": [(1,), (5,), (3, 1025)],
    "dequantize_blockwise": [(1,), (5,), (3, 1025)],
    "linear_4bit": [(1, 64, 1), (1, 192, 33), (3, 128, 17), (17, 320, 65)],  # (M, K, N): gemv, gemm, odd N
}


@pytest.mark.sanitize
@pytest.mark.parametrize(("op", "variant"), VARIANTS, ids=IDS)
def test_small_shapes_every_variant(op, variant, out_dtype, device, gen):
    """Each variant on a few small shapes (one element, odd counts, tail blocks), fresh and cached; outputs
    read back in full (the sanitizer's initcheck sees any element a kernel left unwritten)."""
    for shape in SMALL[op]:
        kw = op_cases.CASES[op].make(device, gen, out_dtype, **{**op_cases.CASES[op].variants[variant],
                                                                "shape": shape})  # fmt: skip
        first = [t.clone() for t in op_cases.outputs(op, op_cases.call(op, kw))]
        again = op_cases.outputs(op, op_cases.call(op, kw))
        for a, b in zip(first, again, strict=True):
            assert_exact(b, a)
            a.cpu()


# --- more than 2**31 output elements ---------------------------------------------------------------------------------

HUGE_N = 2**31 + 2**20 + 37  # odd, a tail block, past 2**31


def sample_positions(n: int, gen: torch.Generator, k: int = 4096) -> torch.Tensor:
    edges = torch.tensor([0, 1, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, n - 64, n - 2, n - 1])
    return torch.cat([edges[edges < n], torch.randint(0, n, (k,), generator=gen)]).unique()


def free_gb(device) -> float:
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**30


@pytest.mark.huge
def test_huge_dequantize_4bit_nested_bf16(device):
    """2**31 + 2**20 + 37 bf16 outputs from a nested NF4 state (~5.4 GB): sampled positions, the last element
    included, against the format computed on those positions only (two fp32 roundings for the nested absmax,
    one product, one rounding to bf16: docs/format.md)."""
    gen = torch.Generator(device=device).manual_seed(3)
    n, blocksize = HUGE_N, 64
    blocks = -(-n // blocksize)
    q = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device, generator=gen)
    absmax_u8 = torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=device, generator=gen)
    absmax2 = torch.rand(-(-blocks // 256), device=device, generator=gen) + 0.5
    code2 = torch.from_numpy(R.dynamic_code()).float().to(device)
    offset = torch.tensor(0.25, device=device)
    state = tritonbits.QuantState(absmax=absmax_u8, shape=torch.Size([n]), dtype=torch.bfloat16, blocksize=64,
                                  quant_type="nf4", offset=offset,
                                  state2=tritonbits.quant_state.NestedState(absmax=absmax2, code=code2))  # fmt: skip
    got = tritonbits.dequantize_4bit(q, state)
    assert got.shape == (n,)
    pos = sample_positions(n, torch.Generator().manual_seed(4)).to(device)
    byte = q.view(-1)[pos // 2].long()
    nibble = torch.where(pos % 2 == 0, byte >> 4, byte & 15)
    block = pos // blocksize
    absmax = code2[absmax_u8[block].long()] * absmax2[block // 256]  # rounded
    absmax = absmax + offset  # rounded again (no FMA: two torch ops)
    code4 = torch.from_numpy(np.asarray(R.NF4_CODE, dtype=np.float32)).to(device)
    want = (code4[nibble] * absmax).to(torch.bfloat16)
    assert_exact(got[pos], want)
    assert pos[-1].item() == n - 1


@pytest.mark.huge
def test_huge_dequant_bias_rows_across_2_pow_31(device):
    """[524291, 4096] int32 acc -> bf16 (2**31 + 12288 outputs, ~13 GB): whole rows at the start, across
    element 2**31, at random and at the end, against the float64 oracle under the epilogue policy."""
    gen = torch.Generator(device=device).manual_seed(5)
    m, n = 2**31 // 4096 + 3, 4096
    acc = torch.randint(-(2**20), 2**20, (m, n), dtype=torch.int32, device=device, generator=gen)
    sa = (torch.rand(m, 1, device=device, generator=gen) + 0.5) * 1e-3
    sb = torch.rand(1, n, device=device, generator=gen) + 0.5
    bias = torch.randn(n, device=device, generator=gen)
    out = tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=torch.bfloat16)
    assert out.numel() > 2**31
    rows = torch.cat([torch.tensor([0, 2**31 // n - 1, 2**31 // n, m - 1]),
                      torch.randint(0, m, (28,), generator=torch.Generator().manual_seed(6))]).unique()  # fmt: skip
    rows = rows.to(device)
    assert_dequant_bias(out[rows], acc[rows], sa[rows], sb, bias)


@pytest.mark.huge
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_huge_quantize_4bit_windows_equal_bnb(quant_type, device):
    """2**32 + 2**20 + 37 bf16 values -> 2**31 + ... packed bytes (~11 GB in all): windows of whole blocks at
    the start, across byte 2**31 and at the end (the tail block included) equal bnb CUDA quantizing the same
    window (blocks are independent)."""
    import bitsandbytes.functional as F

    gen = torch.Generator(device=device).manual_seed(7)
    n, blocksize, w = 2**32 + 2**20 + 37, 64, 64 * 1024
    x = torch.randn(n, dtype=torch.bfloat16, device=device, generator=gen)
    packed, state = tritonbits.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert packed.numel() > 2**31
    tail = n % blocksize
    starts = [0, int(torch.randint(0, n // w, (1,))) * w, 2**32 - w // 2, n - tail - (w - blocksize)]
    for start in starts:  # the last window ends at n: the tail block and the last byte
        stop = min(start + w, n)
        want_packed, want_state = F.quantize_4bit(x[start:stop], blocksize=blocksize, quant_type=quant_type)
        got_bytes = packed.view(-1)[start // 2 : (stop + 1) // 2]
        assert_exact(got_bytes, want_packed.view(-1)[: got_bytes.numel()])
        assert_exact(state.absmax[start // blocksize : -(-stop // blocksize)], want_state.absmax)
    assert stop == n
