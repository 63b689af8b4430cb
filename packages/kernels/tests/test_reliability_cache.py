"""Quant-state cache hazards. The eager path caches validated arguments and a bound launch per quant state
(tritonbits.quant_state.prepare: keyed by id() and the fields' addresses); users change states in place
between calls (absmax values, `quant_state.dtype` reassigned as the Unsloth harness does, `shape`), and a new
state can reuse a dead one's id(). Each case checks the answer against the oracle after the change. Runs on
CPU (interpreter) and in the GPU sessions; the 8-thread test is in test_reliability_gpu.py."""

import pytest
import torch

import tritonbits
import tritonbits_reference as R
from tritonbits import quant_state as qs_module
from tritonbits_harness import op_cases
from tritonbits_harness.tolerance import assert_exact


def oracle(kw) -> torch.Tensor:
    return R.dequantize_4bit(kw["A"].cpu(), kw["quant_state"])


def checked(kw) -> torch.Tensor:
    got = tritonbits.dequantize_4bit(**kw)
    assert_exact(got.cpu(), oracle(kw))
    return got


@pytest.fixture(params=["nf4-nested-bs64", "fp4-plain-bs128"])
def weight(request, device, gen):
    return op_cases.make("dequantize_4bit", request.param, device, gen, torch.bfloat16)


def test_absmax_values_changed_in_place(weight):
    checked(weight)
    checked(weight)  # the second call is served from the cache (bound launch)
    qs = weight["quant_state"]
    qs.absmax.copy_(qs.absmax.flip(0))  # new values, same tensor and address
    if qs.state2 is not None:
        qs.state2.absmax.mul_(1.5)
        qs.offset.add_(0.125)
    checked(weight)


def test_packed_values_changed_in_place(weight):
    checked(weight)
    weight["A"].copy_(255 - weight["A"])
    checked(weight)


def test_dtype_reassigned(weight):
    """The Unsloth harness sets quant_state.dtype on a live state: the next call must follow it."""
    assert checked(weight).dtype == torch.bfloat16
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        weight["quant_state"].dtype = dtype
        assert checked(weight).dtype == dtype


@pytest.mark.parametrize("new_shape", [(70, 33), (2310,), (7, 3, 110)])
def test_shape_reassigned_same_numel(new_shape, weight):
    checked(weight)
    weight["quant_state"].shape = torch.Size(new_shape)
    assert checked(weight).shape == new_shape


def test_shape_changed_to_another_numel_with_a_matching_A(weight, device):
    """A smaller shape with A cut to match: served fresh, the right values (the prefix of the old output)."""
    full = checked(weight)
    qs = weight["quant_state"]
    qs.shape = torch.Size([33 * 64])  # whole blocks at every blocksize of the variants
    blocks = -(-qs.shape.numel() // qs.blocksize)
    weight["A"] = weight["A"][: qs.shape.numel() // 2]
    qs.absmax = qs.absmax[:blocks]
    if qs.state2 is not None:
        qs.state2.absmax = qs.state2.absmax[: -(-blocks // qs.state2.blocksize)]
    got = checked(weight)
    assert_exact(got, full.reshape(-1)[: 33 * 64])


def test_shape_list_mutated_in_place(device, gen):
    """A list shape edited in place (same list object): the cache keeps a copy, so it sees the change."""
    kw = op_cases.make("dequantize_4bit", "fp4-plain-bs128", device, gen, torch.float16)
    kw["quant_state"].shape = [33, 70]
    checked(kw)
    kw["quant_state"].shape[0], kw["quant_state"].shape[1] = 70, 33
    assert checked(kw).shape == (70, 33)


def test_new_state_reusing_a_dead_ones_id_is_not_served_stale(device, gen):
    """A state dies and a different one (other format, blocksize, values) is created at the same id(): its
    call must not use the dead state's cached arguments or bound launch."""
    import copy

    first = op_cases.make("dequantize_4bit", "fp4-plain-bs128", device, gen, torch.bfloat16)
    second = op_cases.make("dequantize_4bit", "nf4-nested-bs64", device, gen, torch.bfloat16)
    # the states themselves are copies made here, referenced from this frame only (make()'s frame can outlive
    # its call: the first make() imports bitsandbytes, whose import keeps a traceback)
    first_template, second_template = first.pop("quant_state"), second.pop("quant_state")
    for _attempt in range(5):
        dead = copy.copy(first_template)
        first["quant_state"] = dead
        checked(first)
        checked(first)  # served from the cache: a bound launch holds the dead state's arguments
        dead_id = id(dead)
        del first["quant_state"], dead  # freed now, by reference count (a gc pass would allocate)
        keep = []  # new objects of the same class and size, held so that each takes another free slot
        for _ in range(5000):
            second["quant_state"] = copy.copy(second_template)
            if id(second["quant_state"]) == dead_id:
                break
            keep.append(second["quant_state"])
        else:
            continue
        assert dead_id not in qs_module._PREPARED  # the dead state's entry was dropped with it
        checked(second)
        checked(second)
        return
    pytest.skip("CPython did not reuse a dead state's address (5 attempts of 5000 allocations): nothing to test")


def test_stale_entry_with_a_reused_id_is_not_served(device, gen):
    """The same hazard forced: a cache entry left under an id (as if its finalizer had not run yet) is not
    served to a different state that has that id, since the entry's key holds every field it validated."""
    live = op_cases.make("dequantize_4bit", "nf4-nested-bs64", device, gen, torch.bfloat16)
    other = op_cases.make("dequantize_4bit", "fp4-plain-bs128", device, gen, torch.bfloat16)
    checked(other)
    stale = qs_module._PREPARED[id(other["quant_state"])]
    qs_module._PREPARED[id(live["quant_state"])] = stale
    try:
        checked(live)
    finally:
        qs_module._PREPARED.pop(id(live["quant_state"]), None)


@pytest.mark.parametrize("field", ["blocksize", "quant_type"])
def test_format_fields_reassigned_on_a_live_state(field, device, gen):
    """blocksize / quant_type changed on the same object (the packed bytes reinterpreted): the answer follows."""
    kw = op_cases.make("dequantize_4bit", "fp4-plain-bs128", device, gen, torch.bfloat16)
    checked(kw)
    qs = kw["quant_state"]
    if field == "blocksize":
        qs.blocksize = 64
        qs.absmax = torch.cat([qs.absmax, qs.absmax.flip(0)])[: -(-qs.shape.numel() // 64)].contiguous()
    else:
        qs.quant_type = "nf4"
    checked(kw)
