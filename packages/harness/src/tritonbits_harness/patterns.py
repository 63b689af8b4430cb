"""Pattern kernels: the same bytes in the same access pattern as a real kernel, with no math. They are the
rooflines for their kernels, measured in the same run (a plain copy overstates what a 1:4 read:write
stream can reach)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _expand_kernel(packed_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
    """Read BLOCK bytes, write 2*BLOCK elements (each nibble converted as is): dequantize's pattern."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n_bytes - base
    b = tl.load(packed_ptr + base + offs, mask=mask, other=0, eviction_policy="evict_first")
    out = tl.interleave(b >> 4, b & 0xF).to(out_ptr.dtype.element_ty)
    offs2 = tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + 2 * base + offs2, out, mask=offs2 < 2 * (n_bytes - base), eviction_policy="evict_first")


def expand(packed: torch.Tensor, out: torch.Tensor, block: int = 2048) -> torch.Tensor:
    n_bytes = packed.numel()
    _expand_kernel[(triton.cdiv(n_bytes, block),)](packed, out, n_bytes, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _cast_copy_kernel(src_ptr, dst_ptr, M, N, stride_s, stride_d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Read an [M, N] tile of one dtype and write it in another: the epilogue's pattern."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(src_ptr + rows[:, None] * stride_s + cols[None, :], mask=mask, eviction_policy="evict_first")
    tl.store(dst_ptr + rows[:, None] * stride_d + cols[None, :], x.to(dst_ptr.dtype.element_ty), mask=mask)


def cast_copy(src: torch.Tensor, dst: torch.Tensor, block_m: int = 32, block_n: int = 256) -> torch.Tensor:
    m, n = src.shape
    bm = min(block_m, triton.next_power_of_2(m))
    grid = (triton.cdiv(m, bm), triton.cdiv(n, block_n))
    _cast_copy_kernel[grid](src, dst, m, n, src.stride(0), dst.stride(0), BLOCK_M=bm, BLOCK_N=block_n, num_warps=8)
    return dst


@triton.jit
def _compress_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """Read 2*BLOCK elements, write BLOCK bytes (one byte from each pair, no math): quantize_4bit's pattern."""
    base = tl.program_id(0).to(tl.int64) * (2 * BLOCK)
    offs = tl.arange(0, 2 * BLOCK)
    x = tl.load(src_ptr + base + offs, mask=offs < n - base, other=0, eviction_policy="evict_first")
    even, odd = tl.split(tl.reshape(x, (BLOCK, 2)))
    byte = (even.to(tl.int32, bitcast=False) ^ odd.to(tl.int32)).to(tl.uint8)
    boffs = tl.arange(0, BLOCK)
    tl.store(dst_ptr + base // 2 + boffs, byte, mask=boffs < (n - base + 1) // 2, eviction_policy="evict_first")


def compress(src: torch.Tensor, dst: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """Read `src` (n elements), write n/2 bytes into `dst`: the roofline of a 4-bit quantizer."""
    n = src.numel()
    _compress_kernel[(triton.cdiv(n, 2 * block),)](src, dst, n, BLOCK=block, num_warps=4)
    return dst


@triton.jit
def _narrow_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """Read BLOCK elements, write BLOCK bytes: the 8-bit quantizer's pattern."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n - base
    x = tl.load(src_ptr + base + offs, mask=mask, other=0, eviction_policy="evict_first")
    tl.store(dst_ptr + base + offs, x.to(tl.int32).to(tl.uint8), mask=mask, eviction_policy="evict_first")


def narrow(src: torch.Tensor, dst: torch.Tensor, block: int = 4096) -> torch.Tensor:
    n = src.numel()
    _narrow_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block, num_warps=4)
    return dst
