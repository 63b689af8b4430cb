import bitsandbytes.functional as F
import numpy as np
import pytest

from tritonbits_reference import formats


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_4bit_code_equals_bnb(quant_type):
    assert np.array_equal(formats.code_4bit(quant_type), F.get_4bit_type(quant_type, device="cpu").numpy())


def test_dynamic_code_equals_bnb():
    assert np.array_equal(formats.dynamic_code(), F.create_dynamic_map().numpy())


def test_unknown_quant_type_is_refused():
    with pytest.raises(ValueError, match="quant_type"):
        formats.code_4bit("int4")
