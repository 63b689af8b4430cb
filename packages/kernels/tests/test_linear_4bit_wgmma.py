"""linear_4bit's "wgmma" kernel (sm90): the K order its decode and its x copy share, checked on the CPU (the copy
kernel in the interpreter, the operand's assembly mirrored in torch); the kernel itself on an sm90 GPU in the GPU
sessions (forced configs against the K-aware policy, the op's choice on the H100 table's keys, the eager plans)."""

from __future__ import annotations

import pytest
import torch
import triton

from tritonbits.ops import linear_4bit as L
from tritonbits.ops import linear_4bit_wgmma as wg4
from tritonbits.quant_state import prepare


def _prepared(device, n: int, k: int, blocksize: int = 64, dtype=torch.bfloat16, nested: bool = True,
              quant_type: str = "nf4"):  # fmt: skip
    import tritonbits

    w = torch.randn(n, k, device=device, dtype=dtype)
    packed, qs = tritonbits.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, qs, prepare(packed, qs)


def _needs_sm90(device):
    if device.type != "cuda" or not L.wgmma_device(device):
        pytest.skip("needs an sm90 GPU with the Triton the Gluon kernel ran on (runs in the H100/H200 GPU sessions)")


def test_x_perm_is_a_permutation_within_each_segment():
    """x_perm moves each column inside its own 256-column segment and every column once: logical 32 i + 16 j0 +
    8 h + 2 q + e from physical 64 q + 8 i + 4 j0 + 2 h + e (the module doc's formula, over every index)."""
    m, k = 3, 768
    x = torch.arange(m * k, dtype=torch.int32).view(m, k)
    xp = wg4.x_perm(x)
    s, i, j0, h, q, e = torch.meshgrid(*(torch.arange(v) for v in (k // 256, 8, 2, 2, 4, 2)), indexing="ij")
    logical = 256 * s + 32 * i + 16 * j0 + 8 * h + 2 * q + e
    physical = 256 * s + 64 * q + 8 * i + 4 * j0 + 2 * h + e
    assert torch.equal(xp[:, logical.flatten()], x[:, physical.flatten()])
    assert torch.equal(xp.sort(dim=1).values, x)


def test_x_perm_kernel_copies_as_x_perm(device):
    """_x_perm_kernel (the op's copy of x for the wgmma kernel) writes exactly x_perm's layout, from x rows inside
    a wider buffer, odd M, a partial last program (runs in the interpreter on the CPU)."""
    for m, k in ((11, 768), (1, 256), (37, 512)):
        x = torch.randn(m, k + 64, device=device, dtype=torch.bfloat16)[:, 32 : 32 + k]
        xp = torch.full((m * k,), float("nan"), device=device, dtype=torch.bfloat16)
        units = m * k // 2
        wg4._x_perm_kernel[(triton.cdiv(units, wg4.X_PERM_BLOCK),)](x, xp, m, x.stride(0), k,
                                                                    BLOCK=wg4.X_PERM_BLOCK)  # fmt: skip
        assert torch.equal(xp.view(m, k), wg4.x_perm(x)), (m, k)


def _a_tile_mirror(words: torch.Tensor, sub: int) -> torch.Tensor:
    """A torch mirror of the kernel's _a_tile (it restates the kernel's join / permute / reshape order, join
    appending the last axis: a change there must be mirrored here; the GPU tests check the kernel itself): decoded
    words [R, 4 (lane q's block), 8 (word i), 8 (element)] -> sub-tile `sub`'s operand [R, 64]."""
    wa, wb = words[:, :, 2 * sub], words[:, :, 2 * sub + 1]  # [R, 4, 8]: words i2 = 0 and 1

    def joined(w):  # _j2(_j2(_j2(a0, a1), _j2(a2, a3)), _j2(_j2(a4, a5), _j2(a6, a7))): [R, 4, e, h, j0]
        return w.view(w.shape[0], 4, 2, 2, 2).permute(0, 1, 4, 3, 2)

    t = torch.stack((joined(wa), joined(wb)), dim=-1)  # [R, q, e, h, j0, i2]
    return t.permute(0, 5, 4, 3, 1, 2).reshape(t.shape[0], 64)  # gl.permute((0, 5, 4, 3, 1, 2)), gl.reshape


def test_decoded_operand_and_x_copy_share_the_k_order():
    """The products the kernel forms, sum over sub-tiles s and columns l of A_s[r, l] * x_perm(x)[n, 64 s + l],
    equal W @ x^T: the operand's assembly (mirrored from _a_tile) and x_perm put the same physical column at each
    logical one. Integer values, so the sums are exact."""
    gen = torch.Generator().manual_seed(0)
    r, m, k = 16, 5, 512
    w = torch.randint(-8, 8, (r, k), generator=gen, dtype=torch.int64)
    x = torch.randint(-8, 8, (m, k), generator=gen, dtype=torch.int64)
    xp = wg4.x_perm(x)
    got = torch.zeros(r, m, dtype=torch.int64)
    for seg in range(k // 256):
        words = w[:, 256 * seg : 256 * (seg + 1)].reshape(r, 4, 8, 8)  # lane q's block, word i, element
        for s in range(4):
            a = _a_tile_mirror(words, s)
            got += a @ xp[:, 256 * seg + 64 * s : 256 * seg + 64 * (s + 1)].T
    assert torch.equal(got, w @ x.T)
    # and a wrong order would be caught: the same sums with x in physical order differ
    wrong = sum(_a_tile_mirror(w[:, :256].reshape(r, 4, 8, 8), s) @ x[:, 64 * s : 64 * (s + 1)].T for s in range(4))
    assert not torch.equal(wrong, w[:, :256] @ x[:, :256].T)


def test_decode16_asm_keeps_the_decodes_operands():
    """decode16_asm is decode_asm with its inputs renumbered ($4..$12 -> $8..$16) and its four pair outputs moved
    into eight 16-bit ones, the lower element first."""
    asm = wg4.decode16_asm()
    body = L.mma4.decode_asm()
    for i in range(4, 13):
        assert body.count(f"${i},") + body.count(f"${i};") == asm.count(f"${i + 4},") + asm.count(f"${i + 4};"), i
    for j in range(4):
        assert f"mov.b32 {{${2 * j}, ${2 * j + 1}}}, p{j};" in asm


def test_wgmma_config_rule_and_refusals(device):
    """heuristic_wgmma_config (the NOTE's rule) and the plan's refusals of a bad wgmma config (by name)."""
    for m, n, k, want in (
        (17, 4096, 4096, (32, 1, 4)),
        (64, 14336, 4096, (64, 1, 4)),
        (128, 14336, 4096, (128, 2, 1)),
        (200, 4096, 4096, (256, 2, 4)),
        (256, 14336, 4096, (256, 2, 1)),
        (32, 28672, 8192, (32, 1, 2)),
        (64, 4096, 512, (64, 1, 1)),
    ):
        cfg = L.heuristic_wgmma_config(m, n, k)
        assert (cfg["path"], cfg["bm"], cfg["wg"], cfg["split_k"], cfg["async"]) == ("wgmma", *want, True), (m, n, k)
    for m in (1, 16, 17, 256, 257):  # the heuristic's range, N above WGMMA_MIN_N, 16-bit x, K in whole segments
        for n, k, dtype in ((4096, 4096, torch.bfloat16), (2048, 4096, torch.float16), (4096, 4096, torch.float32),
                            (4096, 4096 + 64, torch.bfloat16)):  # fmt: skip
            path = L.heuristic_config(dtype, m, n, k, 132, wgmma=True)["path"]
            wanted = 17 <= m <= 256 and n > 2048 and dtype != torch.float32 and k % 256 == 0
            assert (path == "wgmma") == wanted, (m, n, k, dtype, path)
            assert L.heuristic_config(dtype, m, n, k, 132)["path"] != "wgmma"
    _, _, pw = _prepared(device, 64, 512)
    x = torch.randn(20, 512, device=device, dtype=torch.bfloat16)
    out = torch.empty(20, 64, device=device, dtype=torch.bfloat16)
    bads = ({"bm": 48}, {"bm": 512}, {"bm": 64.0}, {"wg": 4}, {"wg": 1.0}, {"wg": True}, {"async": 1},
            {"split_k": 0}, {"split_k": 2.0}, {"bm": None}, {"splitk": 2}, {"warps": 8})  # fmt: skip
    for bad in bads:
        cfg = {"path": "wgmma", "bm": 64, "wg": 1, "split_k": 1, "async": True, **bad}
        with pytest.raises(ValueError, match="wgmma config"):
            L._wgmma_launches(x, pw, None, out, cfg)
        # and through the op on any machine: checked before a machine that cannot run it replaces the config
        with pytest.raises(ValueError, match="wgmma config"):
            L.forward_2d(x, pw, None, config=cfg)
    with pytest.raises(ValueError, match="rows of x"):  # the grid's second dimension
        L._wgmma_launches(torch.empty(32 * 65535 + 1, 512, dtype=torch.bfloat16, device="meta"), pw, None, out,
                          {"path": "wgmma", "bm": 32})  # fmt: skip
    launches, ws = L._wgmma_launches(x, pw, None, out, {"path": "wgmma", "bm": 32, "wg": 2, "split_k": 2,
                                                         "async": False})  # fmt: skip
    assert [la.fn for la in launches] == [wg4._x_perm_kernel, wg4.linear_4bit_wgmma_kernel, L._splitk_reduce_kernel]
    assert launches[1].grid == (1, 1, 2) and launches[1].slots[0] == (0, "xl") and ws.shape == (2, 20, 64)
    assert L.launch_count({"path": "wgmma", "bm": 32, "wg": 2, "split_k": 2}, 20, 64, 512) == len(launches)
    assert L.launch_count({"path": "wgmma", "bm": 32, "wg": 2, "split_k": 1}, 20, 64, 512) == 2
    for launch in launches:  # the cached launcher's fast path passes constexprs positionally
        L._LAUNCHERS[launch.fn].check_order(len(launch.args), launch.constexprs)
    with pytest.raises(ValueError, match="wrap_triton"):  # Gluon: not under a triton_op
        L.launch_fused(x, pw, None, out, {"path": "wgmma", "bm": 32}, kernel_wrap=lambda fn: fn,
                       use_asm=True if device.type == "cuda" else None)  # fmt: skip


def test_wgmma_ok_follows_the_device_and_the_problem(device):
    """wgmma_problem_ok (the contract on any machine) refuses what the decode and the x copy cannot read, each case
    breaking one condition; wgmma_ok also needs an sm90 device, so a refused config becomes the heuristic's choice
    without it (aligned_config): never the CPU or the interpreter."""
    _, _, pw = _prepared(device, 64, 512)
    x = torch.randn(300, 512, device=device, dtype=torch.bfloat16)
    assert L.wgmma_problem_ok(pw, x) and L.wgmma_problem_ok(pw, x[:17]) and L.wgmma_problem_ok(pw, x[:1])
    buf = torch.randn(4, 1024 + 16, device=device, dtype=torch.bfloat16)
    assert L.wgmma_problem_ok(pw, buf[:, 8:520])  # rows 1040 elements apart, 16 bytes in
    refused = {
        "fp16 x, bf16 W": x.half(),
        "K not a multiple of 256": torch.randn(4, 255, device=device, dtype=torch.bfloat16),
        "not contiguous along K": torch.randn(512, 300, device=device, dtype=torch.bfloat16).T,
        "4 bytes in, not 16": buf[:, 2:514],
        "odd row stride": torch.randn(4, 513, device=device, dtype=torch.bfloat16)[:, :512],
    }
    for name, bad in refused.items():
        assert not L.wgmma_problem_ok(pw, bad), name
    cfg = {"path": "wgmma", "bm": 32, "wg": 1, "split_k": 1, "async": True}

    def without_wgmma(m, x2=None):  # the heuristic's choice, as aligned_config would check it in turn
        chosen = L.heuristic_config(x.dtype, m, 64, 512, L._sm_count(device))
        return L.aligned_config(chosen, pw, x.dtype, m, 64, 512, device, x2)

    assert L.aligned_config(cfg, pw, x.dtype, 300, 64, 512, device) == without_wgmma(300)  # no x: never wgmma
    for name, bad in refused.items():
        if bad.dtype == x.dtype and bad.shape[1] == 512:
            m = bad.shape[0]
            assert L.aligned_config(cfg, pw, x.dtype, m, 64, 512, device, bad) == without_wgmma(m, bad), name
    if device.type != "cuda" or not L.wgmma_device(device):
        assert not L.wgmma_ok(pw, x, device)
        assert L.aligned_config(cfg, pw, x.dtype, 300, 64, 512, device, x) == without_wgmma(300, x)


GPU_FORCED = [  # (M, N, K, blocksize, nested, quant type, bm, wg, split, async, bias)
    (17, 1000, 4096, 64, True, "nf4", 32, 1, 1, True, True),
    (64, 1000, 4096, 128, False, "fp4", 64, 2, 3, False, False),
    (100, 2000, 768, 256, True, "nf4", 128, 2, 2, True, True),
    (129, 1000, 1024, 64, True, "fp4", 64, 1, 4, True, False),
    (256, 4096, 512, 512, False, "nf4", 128, 2, 1, False, True),
    (33, 600, 4096, 4096, True, "nf4", 32, 2, 16, True, True),
    (200, 1000, 256, 64, True, "nf4", 128, 1, 1, True, False),
    (5, 1000, 2048, 64, True, "nf4", 32, 1, 2, False, True),
    (1, 1000, 1024, 64, True, "nf4", 32, 1, 1, True, False),
    (1, 700, 512, 64, False, "fp4", 64, 2, 2, False, True),
    (256, 1000, 4096, 64, True, "nf4", 256, 2, 1, True, True),  # the sub-tile pipeline (bm >= 128)
    (300, 2000, 1536, 128, False, "fp4", 256, 1, 2, False, False),
    (130, 600, 768, 64, True, "nf4", 256, 2, 3, True, False),
    (77, 1000, 2048, 256, True, "nf4", 128, 1, 1, True, True),
    (300, 1000, 4096, 1024, True, "nf4", 256, 2, 3, True, True),  # nested, blocksize > 256, two batch-row tiles
]


# the cases `nox -s sanitize-<gpu>` runs under compute-sanitizer (marker `sanitize`): each pipeline (segments: bm 64
# or less a warpgroup; sub-tiles: bm 128 with one, 256 with one or two), synchronous and asynchronous, in each
# pipeline a split that does not divide the segments and several segments a split (the buffers reused), two batch-row
# tiles (test_sanitize_cases_reach_what_they_claim checks this list)
SANITIZE = {GPU_FORCED[i] for i in (0, 1, 2, 4, 6, 10, 11, 12, 14)}


def test_sanitize_cases_reach_what_they_claim():
    """The sanitizer's wgmma cases cover what SANITIZE's comment says (so that a change to GPU_FORCED cannot quietly
    take a pipeline out of the sanitizer's reach)."""
    cases = sorted(SANITIZE)
    assert len(cases) == 9 and SANITIZE.issubset(GPU_FORCED)
    for subtiles in (False, True):
        mine = [c for c in cases if (c[6] > 64 * c[7]) is subtiles]  # BM > 64 WG: the sub-tile pipeline
        splits = [L.mma_splits({"split_k": c[8]}, c[2]) for c in mine]
        # a short last split
        assert any(s * per != c[2] // 256 for c, (s, per) in zip(mine, splits, strict=True)), subtiles
        assert any(per >= 3 for _s, per in splits), subtiles  # buffers reused within a split
        assert {c[9] for c in mine} == {False, True}, subtiles  # synchronous and asynchronous products
        assert any(c[0] > c[6] for c in mine), subtiles  # two batch-row tiles
    assert {c[6] for c in cases} == {32, 64, 128, 256} and {c[7] for c in cases} == {1, 2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.sanitize) if c in SANITIZE else c for c in GPU_FORCED],
    ids=lambda c: "m{}-n{}-k{}-bs{}-nested{}-{}-bm{}-wg{}-s{}-a{}-b{}".format(*c),
)
def test_forced_wgmma_configs_against_the_policy(device, dtype, case):
    """The wgmma kernel itself (forced configs) on fresh random problems: N and M not multiples of a program's
    tile, splits that do not divide K's segments, a bias, x rows inside a wider buffer; out poisoned; every result
    within the K-aware policy."""
    _needs_sm90(device)
    import tritonbits
    from tritonbits_harness.tolerance import assert_matmul

    m, n, k, bs, nested, qt, bm, wg, split, asy, with_bias = case
    packed, qs, pw = _prepared(device, n, k, bs, dtype, nested, qt)
    wd = tritonbits.dequantize_4bit(packed, qs)
    x = torch.randn(m, k + 128, device=device, dtype=dtype)[:, 64 : 64 + k]
    bias = torch.randn(n, device=device, dtype=dtype) if with_bias else None
    assert L.wgmma_ok(pw, x, device)
    out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
    L.launch_fused(x, pw, bias, out, {"path": "wgmma", "bm": bm, "wg": wg, "split_k": split, "async": asy})
    assert_matmul(out, x, wd, bias)


def test_the_op_takes_wgmma_where_the_table_or_rule_names_it(device):
    """On an sm90 GPU the op's own choice at M = 17..256 is the wgmma kernel where the rule names it (K = 1024: no
    table key), its plans pass each call's own x through the copy, and the result is within the policy."""
    _needs_sm90(device)
    import tritonbits
    from tritonbits_harness.tolerance import assert_matmul

    n, k = 4096, 1024
    packed, qs, pw = _prepared(device, n, k)
    wd = tritonbits.dequantize_4bit(packed, qs)
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    for m in (17, 64, 130):
        cfg = L.aligned_config(L.config_for(device, torch.bfloat16, m, n, k), pw, torch.bfloat16, m, n, k, device,
                               torch.empty(m, k, device=device, dtype=torch.bfloat16))  # fmt: skip
        assert cfg["path"] == "wgmma", (m, cfg)
        for _ in range(3):  # the first call plans, the next ones run the bound launches with fresh x
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            assert_matmul(tritonbits.linear_4bit(x, packed, qs, bias), x, wd, bias)
    plans = L._prepare(packed, qs).launches["linear_4bit"].values()
    assert all(p.lanes and p.steps[0].launcher is L._launcher_of(wg4._x_perm_kernel) for p in plans)


@pytest.mark.parametrize("mnk", [(64, 4096, 4096), (256, 14336, 4096)])
def test_the_tables_wgmma_entries_are_what_the_op_runs(device, mnk):
    """At keys both tables name a wgmma config for ((4096, 4096) at M = 64; (4096, 14336) at M = 256, BLOCK_M = 256
    since session 24), the op on an sm90 GPU runs exactly that entry, and its result (x of three layouts:
    contiguous, rows in a wider buffer, a 3-D view) is within the policy."""
    _needs_sm90(device)
    import tritonbits
    from tritonbits import configs
    from tritonbits_harness.tolerance import assert_matmul

    m, n, k = mnk
    key = L.config_key(torch.bfloat16, m, n, k)
    entry = configs.lookup("linear_4bit", device, key)
    assert entry is not None and entry["path"] == "wgmma", entry
    assert L.config_for(device, torch.bfloat16, m, n, k) == entry
    packed, qs, _pw = _prepared(device, n, k)
    wd = tritonbits.dequantize_4bit(packed, qs)
    for x in (torch.randn(m, k, device=device, dtype=torch.bfloat16),
              torch.randn(m, k + 64, device=device, dtype=torch.bfloat16)[:, 32 : 32 + k],
              torch.randn(2, m // 2, k, device=device, dtype=torch.bfloat16)):  # fmt: skip
        y = tritonbits.linear_4bit(x, packed, qs)
        assert_matmul(y.reshape(m, n), x.reshape(m, k), wd)


def test_wgmma_in_a_cuda_graph(device):
    """The wgmma path's launches (the x copy, the kernel, the split-K reduction) captured in a CUDA graph after an
    eager warm-up; each replay on fresh x gives its own product."""
    _needs_sm90(device)
    import tritonbits
    from tritonbits_harness.tolerance import assert_matmul

    m, n, k = 48, 4096, 2048
    packed, qs, _pw = _prepared(device, n, k)
    wd = tritonbits.dequantize_4bit(packed, qs)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    y = tritonbits.linear_4bit(x, packed, qs, bias)  # warm-up: compiles and binds
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tritonbits.linear_4bit(x, packed, qs, bias)
    for _ in range(3):
        x.copy_(torch.randn(m, k, device=device, dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert_matmul(y, x, wd, bias)
