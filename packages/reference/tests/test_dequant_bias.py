import pytest
import torch

import tritonbits_reference as R


@pytest.mark.parametrize("scale_a_shape", ["col", "vec", "scalar"])
@pytest.mark.parametrize("scale_b_shape", ["row", "vec", "scalar"])
@pytest.mark.parametrize("bias_shape", ["vec", "row", None])
def test_oracle_matches_explicit_loops(scale_a_shape, scale_b_shape, bias_shape, gen):
    m, n = 7, 5
    acc = torch.randint(-(2**20), 2**20, (m, n), generator=gen, dtype=torch.int32)
    sa = torch.rand(m, generator=gen) + 0.5
    sb = torch.rand(n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen)
    shapes_a = {"col": sa.reshape(m, 1), "vec": sa, "scalar": sa[0].reshape(())}
    shapes_b = {"row": sb.reshape(1, n), "vec": sb, "scalar": sb[:1]}
    shapes_bias = {"vec": bias, "row": bias.reshape(1, n), None: None}
    got = R.dequant_bias_exact(acc, shapes_a[scale_a_shape], shapes_b[scale_b_shape], shapes_bias[bias_shape])
    for i in range(m):
        for j in range(n):
            a = float(sa[0] if scale_a_shape == "scalar" else sa[i])
            b = float(sb[0] if scale_b_shape == "scalar" else sb[j])
            want = float(acc[i, j]) * a * b + (float(bias[j]) if bias_shape else 0.0)
            assert got[i, j].item() == pytest.approx(want, rel=1e-15, abs=1e-12)
    out = R.dequant_bias(acc, shapes_a[scale_a_shape], shapes_b[scale_b_shape], out_dtype=torch.float16)
    assert out.dtype == torch.float16
