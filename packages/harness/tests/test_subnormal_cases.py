"""The subnormal cases' own guards (CPU): the bit check sees a sign of zero, each case holds what it claims and
a case that does not is refused, so the GPU tests built on them cannot pass vacuously."""

import pytest
import torch

from tritonbits_harness import subnormal_cases as S


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_bits_see_the_sign_of_zero(dtype):
    a = torch.tensor([1.0, 0.0, -2.0], dtype=dtype)
    S.assert_bits_equal(a, a.clone())
    b = a.clone()
    b[1] = -0.0
    assert torch.equal(a, b)  # what assert_exact (torch.equal) would take as equal
    with pytest.raises(
        AssertionError, match=r"1 of 3 elements differ in their bits(.|\n)*got 0\.0 \(0x0+\), want -0\.0"
    ):
        S.assert_bits_equal(a, b)
    report: list[str] = []
    S.check(report, "x", a, b)
    assert len(report) == 1 and report[0].startswith("x: 1 of 3")


def test_bits_of_bytes():
    q = torch.arange(256, dtype=torch.uint8)
    S.assert_bits_equal(q, q.clone())
    with pytest.raises(AssertionError, match=r"got 255 \(0xff\), want 0 \(0x00\)"):
        S.assert_bits_equal(q, torch.where(q == 255, 0, q).to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cases_hold_what_they_claim(dtype, gen):
    cases = S.subnormal_cases(dtype, gen)  # raises if one does not
    assert sorted(cases) == sorted(name for name, d in S.CASES if d == dtype)


def test_a_case_without_what_it_claims_is_refused(gen):
    cases = S.subnormal_cases(torch.bfloat16, gen)
    bad = {
        "mixed": cases["mixed"].abs(),  # no negative subnormal
        "tiny-absmax": cases["tiny-absmax"][:-1],  # no block of subnormals only
        "underflow": torch.cat([cases["underflow"], cases["huge-absmax"]]),  # the nested offset overflows
        "huge-absmax": cases["underflow"],  # a finite offset
    }
    for name, x in bad.items():
        with pytest.raises(AssertionError, match=f"subnormal case '{name}' does not hold"):
            S._check_case(name, x)
    with pytest.raises(AssertionError, match="no subnormal products"):
        S.assert_subnormal_products(torch.tensor([0.5, 1.0]), torch.tensor([1e-37]))
