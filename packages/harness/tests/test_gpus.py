import pytest
import torch

from tritonbits import _runtime
from tritonbits_harness import gpus

TABLE = [
    # capability, native bf16, fp8, bf16 path, supported
    ((7, 0), False, False, "manual-rne", False),
    ((7, 5), False, False, "manual-rne", True),
    ((8, 0), True, False, "native", True),
    ((8, 6), True, False, "native", True),
    ((8, 9), True, True, "native", True),
    ((9, 0), True, True, "native", True),
    ((10, 0), True, True, "native", True),
]


@pytest.mark.parametrize(("cap", "bf16", "fp8", "path", "ok"), TABLE)
def test_gating_table(cap, bf16, fp8, path, ok):
    assert gpus.native_bf16(cap) is bf16
    assert gpus.has_fp8(cap) is fp8
    assert gpus.bf16_path(cap) == path
    assert gpus.supported(cap) is ok


def test_profiles():
    assert set(gpus.PROFILES) == {"t4", "a100", "l4", "h100", "h200"}
    assert gpus.PROFILES["t4"].features == {"bf16-manual-rne"}
    assert gpus.PROFILES["l4"].features == {"bf16-native", "fp8"}
    for p in gpus.PROFILES.values():
        assert p.dtypes == ("fp16", "bf16")


@pytest.mark.parametrize(("name", "profile"), [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("Tesla T4", "t4"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L4", "l4"), ("NVIDIA GeForce RTX 4090", None),
])  # fmt: skip
def test_profile_for_device_name(name, profile):
    found = gpus.profile_for(name)
    assert (found.name if found else None) == profile


@pytest.mark.parametrize(("cap", "native"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_fake_capability_drives_the_kernels_choice(cap, native, fake_capability, monkeypatch):
    """The fixture reaches tritonbits' own gating (which must agree with the harness table)."""
    fake_capability(cap)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _runtime.native_bf16_conversion(torch.device("cuda", 0)) is native
    assert gpus.native_bf16(cap) is native


def test_profiles_are_named_by_the_kernels_family():
    """One owner of family naming: tritonbits._runtime.family_of; every profile is one of its families."""
    families = {f.lower() for f in _runtime.FAMILIES}
    assert set(gpus.PROFILES) <= families
    assert gpus.profile_for("NVIDIA H200 NVL", (9, 0)).name == _runtime.family_of("NVIDIA H200 NVL", (9, 0))
