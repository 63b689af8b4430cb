"""GPU profiles and capability gating, as pure functions of the compute capability (major, minor).

The kernels choose their own code paths; this module decides what the test and benchmark sessions
expect of a device: which dtypes a profile tests, and through which path bf16 reaches memory. Which GPU
family a device belongs to is the kernels' decision (tritonbits._runtime.family_of, which also names the
tuned config tables); a profile is keyed by that family name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonbits import _runtime

Capability = tuple[int, int]


def native_bf16(cap: Capability) -> bool:
    """Triton rounds fp32 -> bf16 itself from sm80; on sm75 the kernels round with integer ops."""
    return cap >= (8, 0)


def has_fp8(cap: Capability) -> bool:
    """fp8 (e4m3/e5m2) tensor-core types exist from sm89 (Ada, Hopper)."""
    return cap >= (8, 9)


def bf16_path(cap: Capability) -> str:
    return "native" if native_bf16(cap) else "manual-rne"


def supported(cap: Capability) -> bool:
    """tritonbits targets T4 (sm75) and newer."""
    return cap >= (7, 5)


@dataclass(frozen=True)
class GpuProfile:
    name: str
    capability: Capability
    dtypes: tuple[str, ...]  # output dtypes the GPU sessions test and benchmark

    @property
    def features(self) -> frozenset[str]:
        feats = {"bf16-" + bf16_path(self.capability)}
        if has_fp8(self.capability):
            feats.add("fp8")
        return frozenset(feats)


PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        # T4 stores bf16 only through the kernels' own round-to-nearest-even (no native conversion)
        GpuProfile("t4", (7, 5), ("fp16", "bf16")),
        GpuProfile("a100", (8, 0), ("fp16", "bf16")),
        GpuProfile("l4", (8, 9), ("fp16", "bf16")),
        GpuProfile("h100", (9, 0), ("fp16", "bf16")),
        GpuProfile("h200", (9, 0), ("fp16", "bf16")),
    )
}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def profile_for(device_name: str, capability: Capability = (0, 0)) -> GpuProfile | None:
    """The profile of a CUDA device's family (e.g. 'NVIDIA H100 80GB HBM3' -> h100), None for other GPUs."""
    return PROFILES.get(_runtime.family_of(device_name, capability))


@dataclass(frozen=True)
class Device:
    """What the sessions are really running on."""

    name: str
    capability: Capability
    profile: GpuProfile | None


def current_device() -> Device | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    return Device(name, cap, profile_for(name, cap))
