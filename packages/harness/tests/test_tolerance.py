import pytest
import torch

from tritonbits_harness import tolerance


def test_dequantize_is_exact_everywhere():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for backend in ("cuda", "interpreter"):
            assert tolerance.policy("dequantize_4bit", dtype, backend) == tolerance.EXACT


def test_unknown_policy_is_an_error():
    with pytest.raises(KeyError, match="no tolerance policy"):
        tolerance.policy("nf4_linear", torch.float16, "cuda")


def test_assert_exact_reports_first_mismatch():
    a = torch.arange(10, dtype=torch.float32)
    b = a.clone()
    b[7] = 99
    with pytest.raises(AssertionError, match=r"(?s)1 of 10 elements differ.*at \(7,\): got 7.0, want 99.0"):
        tolerance.assert_exact(a, b)
    tolerance.assert_exact(a, a.clone())
    with pytest.raises(AssertionError, match="dtype"):
        tolerance.assert_exact(a, a.double())


def test_assert_exact_takes_nan_at_the_same_index_as_equal():
    a = torch.tensor([1.0, float("nan"), -0.0])
    tolerance.assert_exact(a, torch.tensor([1.0, float("nan"), 0.0]))  # torch.equal: -0.0 == 0.0
    with pytest.raises(AssertionError, match=r"(?s)2 of 3 elements differ.*at \(0,\)"):
        tolerance.assert_exact(a, torch.tensor([float("nan"), 1.0, -0.0]))


def test_ulp():
    assert tolerance.ulp(torch.tensor([1.0]), torch.bfloat16).item() == 2.0**-7
    assert tolerance.ulp(torch.tensor([1.5]), torch.float16).item() == 2.0**-10
    assert tolerance.ulp(torch.tensor([0.0]), torch.float16).item() == torch.finfo(torch.float16).tiny * 2.0**-10


def test_epilogue_policy_accepts_correct_rounding_and_rejects_one_ulp_off():
    exact = torch.tensor([1.0 + 2.0**-9, 3.0], dtype=torch.float64)  # 1 + a quarter bf16 ulp
    magnitude = torch.zeros(2, dtype=torch.float64)
    rounded = exact.to(torch.bfloat16)
    tolerance.assert_within("dequant_bias", rounded, exact, magnitude)
    off = rounded.clone()
    off[0] = 1.0 + 2.0**-7  # one ulp up: 0.75 ulp away from the exact value
    with pytest.raises(AssertionError, match="outside its policy"):
        tolerance.assert_within("dequant_bias", off, exact, magnitude)


# --- K-aware matmul policy (linear_4bit) ---------------------------------------------------------------


def _matmul_case(k: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=gen).to(dtype)
    w = torch.randn(5, k, generator=gen).to(dtype)
    bias = torch.randn(5, generator=gen).to(dtype)
    return x, w, bias


def test_linear_4bit_policy_is_k_aware():
    tol = tolerance.policy("linear_4bit", torch.bfloat16, "cuda")
    assert not tol.exact and tol.k_factor > 0
    x, w, bias = _matmul_case(64)
    out = torch.zeros(3, 5, dtype=torch.bfloat16)
    _, small = tolerance.matmul_bound(out, x, w, bias)
    x, w, bias = _matmul_case(4096)
    _, large = tolerance.matmul_bound(out, x, w, bias)
    assert large.min() > small.max()  # the bound grows with K (and with the operand magnitudes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_assert_matmul_accepts_fp32_accumulation(dtype):
    x, w, bias = _matmul_case(2048, dtype)
    out = (x.float() @ w.float().T + bias.float()).to(dtype)  # fp32 accumulation, one final rounding
    tolerance.assert_matmul(out, x, w, bias)


def test_assert_matmul_rejects_just_outside_and_accepts_just_inside():
    x, w, bias = _matmul_case(256)
    out = torch.zeros(3, 5, dtype=torch.float32)
    ref, bound = tolerance.matmul_bound(out, x, w, bias)
    inside = (ref + 0.9 * bound).float()  # the float32 rounding of these moves them by ~1e-7 relative
    ref, bound = tolerance.matmul_bound(inside, x, w, bias)
    assert ((inside.double() - ref).abs() < bound).all()
    tolerance.assert_matmul(inside, x, w, bias)
    outside = inside.clone()
    outside[1, 2] = float(ref[1, 2] + 1.1 * bound[1, 2])
    with pytest.raises(AssertionError, match=r"(?s)K-aware.*1 of 15 elements differ.*at \(1, 2\)"):
        tolerance.assert_matmul(outside, x, w, bias)


def test_assert_matmul_names_bad_shapes():
    x, w, bias = _matmul_case(32)
    with pytest.raises(ValueError, match="w must be"):
        tolerance.assert_matmul(torch.zeros(3, 5), x, w[:, :16], bias)
    with pytest.raises(ValueError, match="bias must be"):
        tolerance.assert_matmul(torch.zeros(3, 5), x, w, bias[:4])
    with pytest.raises(ValueError, match="out"):
        tolerance.assert_matmul(torch.zeros(5, 3), x, w, bias)


# --- quantize: neighbouring codes and the round-trip bound ----------------------------------------------

NF4 = torch.tensor(
    [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
     0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0],
    dtype=torch.float64,
)  # fmt: skip
FP4 = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=torch.float64) / 12
FP4 = torch.cat([FP4, -FP4])  # index order is not value order


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return (scaled.reshape(-1, 1) - code.reshape(1, -1)).abs().argmin(dim=1)


def test_quantize_policy_allows_one_neighbour():
    tol = tolerance.policy("quantize_4bit", torch.float32, "cuda")
    assert tol.code_steps == 1 and 0 < tol.tie_slack < 1e-5


def test_neighbour_codes_in_value_order():
    want = torch.tensor([4, 6, 3])  # fp4 values 1/3, 1/6, 1
    tolerance.assert_codes(want.clone(), want, FP4)
    # value order 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1 (codes 0, 1, 6, 7, 4, 5, 2, 3), -0 == 0
    tolerance.assert_codes(torch.tensor([7, 1, 2]), want, FP4)  # 1/4, 1/192, 2/3: one step each
    tolerance.assert_codes(torch.tensor([0, 8]), torch.tensor([8, 0]), FP4)  # -0 and +0 are one value
    with pytest.raises(AssertionError, match="codes outside"):
        tolerance.assert_codes(torch.tensor([4, 5, 3]), want, FP4)  # 1/2 is three steps above 1/6
    with pytest.raises(AssertionError, match="codes outside"):
        tolerance.assert_codes(torch.tensor([4, 6, 4]), want, FP4)  # 1/3 is three steps below 1


def test_neighbour_only_at_a_tie_when_the_scaled_value_is_known():
    tol = tolerance.policy("quantize_4bit", torch.float32, "cuda")
    boundary = float((NF4[10] + NF4[11]) / 2)
    near = torch.tensor([boundary - 0.5 * tol.tie_slack])
    tolerance.assert_codes(torch.tensor([11]), torch.tensor([10]), NF4, scaled=near)
    far = torch.tensor([boundary - 2 * tol.tie_slack])
    with pytest.raises(AssertionError, match="codes outside"):
        tolerance.assert_codes(torch.tensor([11]), torch.tensor([10]), NF4, scaled=far)


def test_assert_codes_names_bad_arguments():
    with pytest.raises(ValueError, match=r"outside 0\.\.15"):
        tolerance.assert_codes(torch.tensor([16]), torch.tensor([0]), NF4)
    with pytest.raises(ValueError, match="shape"):
        tolerance.assert_codes(torch.tensor([1, 2]), torch.tensor([0]), NF4)


def test_max_code_gap():
    assert tolerance.max_code_gap(FP4) == pytest.approx(1 / 3)  # 2/3 -> 1
    assert tolerance.max_code_gap(NF4) == pytest.approx(1.0 - 0.6961928)  # -1 -> -0.696
    assert tolerance.max_code_gap(torch.tensor([-0.5, 0.5])) == pytest.approx(1.0)  # the ends count twice
    with pytest.raises(ValueError, match="code_values"):
        tolerance.max_code_gap(torch.tensor([0.0, 2.0]))


@pytest.mark.parametrize(("code", "blocksize"), [(NF4, 64), (FP4, 32), (NF4, 100)])
def test_roundtrip_bound_holds_for_nearest_rounding_and_is_tight(code, blocksize):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    absmax = x.abs().reshape(-1)
    blocks = -(-x.numel() // blocksize)
    per_block = torch.stack([absmax[i * blocksize : (i + 1) * blocksize].max() for i in range(blocks)])
    scale = per_block.repeat_interleave(blocksize)[: x.numel()].double()
    deq = code[_nearest(x.double() / scale, code)] * scale
    tolerance.assert_quantize_roundtrip(deq.float(), x, code, blocksize)
    bound = tolerance.quantize_error_bound(x, code, blocksize)
    assert bound.shape == x.shape
    # the worst element sits in the largest gap; an error just above the bound is refused
    outside = deq.clone()
    outside[7] = x[7].double() + bound[7] * 1.01 + 1e-6
    with pytest.raises(AssertionError, match=r"(?s)round trip outside.*at \(7,\)"):
        tolerance.assert_quantize_roundtrip(outside.float(), x, code, blocksize)


def test_nested_error_widens_the_bound_per_block():
    x = torch.linspace(-1, 1, 128)
    plain = tolerance.quantize_error_bound(x, NF4, 64)
    nested = tolerance.quantize_error_bound(x, NF4, 64, nested_error=torch.tensor([0.0, 0.25]))
    assert torch.equal(nested[:64], plain[:64])
    assert torch.allclose(nested[64:], plain[64:] + 0.25)
    with pytest.raises(ValueError, match="nested_error has 3 entries for 2 blocks"):
        tolerance.quantize_error_bound(x, NF4, 64, nested_error=torch.zeros(3))
    with pytest.raises(ValueError, match="blocksize"):
        tolerance.quantize_error_bound(x, NF4, 0)


def test_packed_4bit_allows_a_neighbour_only_at_a_near_tie_and_only_for_fp32_input():
    import tritonbits_reference as R
    from tritonbits_harness import tolerance

    code = torch.from_numpy(R.NF4_CODE)
    boundary = float((R.NF4_CODE[12] + R.NF4_CODE[13]) / 2)  # NF4 codes 12 | 13
    x = torch.tensor([1.0, boundary, 0.3, 0.0], dtype=torch.float32)  # one block: absmax 1
    absmax = torch.tensor([1.0])
    want = torch.tensor([(15 << 4) | 12, (10 << 4) | 7], dtype=torch.uint8)
    tie = torch.tensor([(15 << 4) | 13, (10 << 4) | 7], dtype=torch.uint8)  # element 1 at the tie: 13
    tolerance.assert_packed_4bit(tie, want, x, absmax, 4, code)
    far = torch.tensor([(15 << 4) | 12, (11 << 4) | 7], dtype=torch.uint8)  # 0.3 is no tie for 10 | 11
    with pytest.raises(AssertionError, match="codes outside"):
        tolerance.assert_packed_4bit(far, want, x, absmax, 4, code)
    with pytest.raises(AssertionError):  # bf16 input: byte-equal, no neighbour
        tolerance.assert_packed_4bit(tie, want, x.to(torch.bfloat16), absmax, 4, code)
