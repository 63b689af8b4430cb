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
