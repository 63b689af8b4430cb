"""Where kernels run: the Triton interpreter or a CUDA device, and what that device can do.

tritonbits picks its own code paths from the device capability (it must work without the harness).
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, read when kernels are decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpreting()


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def native_bf16_conversion(device: torch.device) -> bool:
    """Whether Triton can round fp32 to bf16 itself: sm80+ (it does not compile on sm75) and not the
    interpreter (which truncates instead of rounding to nearest even)."""
    if device.type != "cuda":
        return False
    return capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0)


def check_device(name: str, t: torch.Tensor, device: torch.device | None = None) -> torch.device:
    """The device a kernel argument lives on, refusing what no kernel can run on."""
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other arguments")
    if t.device.type == "cuda":
        return t.device
    if t.device.type == "cpu" and INTERPRET:
        return t.device
    if t.device.type == "cpu":
        raise ValueError(
            f"{name} is a CPU tensor; tritonbits kernels need a CUDA tensor, or TRITON_INTERPRET=1 set "
            "before importing tritonbits to run them through the Triton interpreter"
        )
    raise ValueError(f"{name} is on {t.device}; tritonbits kernels run on CUDA devices")
