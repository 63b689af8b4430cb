"""`tritonbits.nn.Linear4bit`: a drop-in 4-bit linear layer whose forward is `tritonbits.linear_4bit`.

Built from a bitsandbytes `Linear4bit` (`Linear4bit.from_bnb(layer)`, sharing its packed weight and quant
state) or from a float `nn.Linear` (`Linear4bit.from_linear(linear)`, quantized once with
`tritonbits.quantize_4bit`). Its state dict is bnb's: `weight` (the packed bytes), `bias`, and the quant state
as `weight.<key>` entries of `QuantState.as_dict(packed=True)`, so bnb checkpoints load into it and its
checkpoints load into bnb. The 4-bit weight is a buffer (frozen, as in QLoRA); the bias is a Parameter.
"""

from __future__ import annotations

import torch

from .ops.linear_4bit import linear_4bit
from .ops.quantize_4bit import quantize_4bit
from .quant_state import QuantState

# an integer dtype of each float quant_storage's element size: what a module dtype cast leaves alone
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}


class Linear4bit(torch.nn.Module):
    """y = x @ dequant(weight).T + bias with the dequantization fused (see tritonbits.linear_4bit)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, compress_statistics: bool = True, quant_storage: torch.dtype = torch.uint8,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.compress_statistics = quant_type, blocksize, compress_statistics
        self.quant_storage, self.dtype = quant_storage, dtype
        # an empty layer has no quant state until one is loaded or quantized (forward refuses it until then)
        n_bytes = (in_features * out_features + 1) // 2
        size = quant_storage.itemsize
        self.register_buffer("weight", torch.zeros((-(-n_bytes // size), 1), dtype=quant_storage, device=device))
        self.quant_state: QuantState | None = None
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_bnb(cls, layer) -> Linear4bit:
        """Wrap a bitsandbytes Linear4bit: shares its packed weight, quant state fields and bias (no copy)."""
        weight = layer.weight
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError("layer.weight has no quant_state: quantize the bnb layer first (move it to its device)")
        qs = QuantState.from_any(state)
        n, k = qs.shape
        self = cls(k, n, bias=layer.bias is not None, quant_type=qs.quant_type, blocksize=qs.blocksize,
                   compress_statistics=qs.nested, quant_storage=weight.dtype, dtype=qs.dtype,
                   device=torch.device("meta"))  # fmt: skip
        self.weight = weight.data
        self.quant_state = qs
        if layer.bias is not None:
            self.bias = layer.bias
        return self

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True, quant_storage: torch.dtype = torch.uint8,
                    dtype: torch.dtype | None = None) -> Linear4bit:  # fmt: skip
        """Quantize a float nn.Linear once (tritonbits.quantize_4bit, bnb's format and bytes). dtype: the
        dequantized weight's dtype (default: the linear's weight dtype)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        dtype = dtype or linear.weight.dtype
        w = linear.weight.detach().to(dtype)
        packed, qs = quantize_4bit(w, blocksize=blocksize, compress_statistics=compress_statistics,
                                   quant_type=quant_type, quant_storage=quant_storage)  # fmt: skip
        self = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, quant_type=quant_type,
                   blocksize=blocksize, compress_statistics=compress_statistics, quant_storage=quant_storage,
                   dtype=dtype, device=torch.device("meta"))  # fmt: skip
        self.weight = packed
        self.quant_state = qs
        if linear.bias is not None:
            self.bias = torch.nn.Parameter(linear.bias.detach().to(dtype).clone())
        return self

    # --- forward ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_state is None:
            raise ValueError("this Linear4bit has no quant state: load a state dict or build it with from_bnb / "
                             "from_linear")  # fmt: skip
        bias: torch.Tensor | None = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # as bnb casts its bias to the compute dtype
        return linear_4bit(x, self.weight, self.quant_state, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"nested={self.compress_statistics}")  # fmt: skip

    # --- bnb-format state dicts -------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed) and bias
        if self.quant_state is not None:
            for key, value in self.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        head = prefix + "weight."
        quant = {k[len(head) :]: v for k, v in state_dict.items() if k.startswith(head)}
        weight = state_dict.get(prefix + "weight")
        device = self.weight.device
        if device.type == "meta" and weight is not None:
            device = weight.device
        state = QuantState.from_dict(quant, device=device) if quant else None
        problem = self._mismatch(state, weight) if state is not None else None
        if problem:  # torch's convention for a size mismatch: a message load_state_dict raises; nothing loaded
            error_msgs.append(f"size mismatch for {prefix}weight: {problem}")
            return
        if weight is not None:  # the packed shape/dtype of the checkpoint, on this layer's device
            self.weight = torch.empty(weight.shape, dtype=weight.dtype, device=device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(head)]  # the quant state: consumed here
        if state is not None:
            # the checkpoint's format wins, as in bnb (its quant state carries quant_type, blocksize, nesting)
            self.quant_state = state
            self.quant_type, self.blocksize, self.compress_statistics = state.quant_type, state.blocksize, state.nested
            self.quant_storage, self.dtype = self.weight.dtype, state.dtype
        elif strict:
            missing_keys.append(prefix + "weight.quant_state.bitsandbytes__<quant_type>")

    def _mismatch(self, state: QuantState, weight: torch.Tensor | None) -> str | None:
        """Why a loaded quant state does not fit this layer, or None: its shape must be [out_features,
        in_features], and the packed weight must hold (n + 1) // 2 bytes (rounded up to whole storage
        elements, as validation requires)."""
        expected = (self.out_features, self.in_features)
        if tuple(state.shape) != expected:
            return (f"the checkpoint's quant_state.shape is {tuple(state.shape)}, this layer's [out_features, "
                    f"in_features] is {list(expected)}")  # fmt: skip
        if weight is not None:
            needed = (self.out_features * self.in_features + 1) // 2
            have = weight.numel() * weight.element_size()
            if not needed <= have < needed + weight.element_size():
                return f"the packed weight holds {have} bytes, a {list(expected)} weight needs {needed}"
        return None

    def _apply(self, fn, recurse=True):
        """.to(device) / .cuda() move the quant state's tensors with the weight; a dtype cast (.half(), .to(dtype))
        casts the bias only: never the quant state, nor the packed bytes, also in a float quant_storage (torch
        casts floating buffers: they are passed as an integer view of the same element size, viewed back)."""
        storage = self.weight.dtype
        if storage.is_floating_point:
            self.weight = self.weight.view(_INT_OF_SIZE[storage.itemsize])
        try:
            super()._apply(fn, recurse)
        finally:
            if self.weight.dtype != storage:
                self.weight = self.weight.view(storage)
        qs = self.quant_state
        if qs is not None and qs.absmax.device != self.weight.device:
            device = self.weight.device
            qs.absmax = qs.absmax.to(device)
            if qs.offset is not None:
                qs.offset = qs.offset.to(device)
            if qs.state2 is not None:
                qs.state2.absmax, qs.state2.code = qs.state2.absmax.to(device), qs.state2.code.to(device)
            if qs.code is not None:
                qs.code = qs.code.to(device)
        return self
