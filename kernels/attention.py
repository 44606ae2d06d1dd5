"""nn.MultiheadAttention with its input and output projections on the Triton GEMM (`ops.linear`).

The projections are most of an attention layer's FLOPs (31.8% of ViT-B/16's), but PyTorch computes
them inside `F.multi_head_attention_forward`, never through a module `swap` could replace (not even
`out_proj`'s forward runs). `TritonMultiheadAttention` re-implements that function around
`ops.linear`, with its semantics: key padding and attention masks (bool or float), the `is_causal`
hint, `bias_k`/`bias_v`, `add_zero_attn`, dropout in training, batch_first either way, unbatched
inputs, separate q/k/v weights when kdim/vdim differ. The attention itself stays PyTorch's:
`F.scaled_dot_product_attention`, or, when the caller asks for the weights (`need_weights=True`, the
default), the explicit softmax(QK^T / sqrt(head_dim)) [-> dropout] @ V that PyTorch computes then too,
returning those weights (averaged over heads with `average_attn_weights`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from triton_workbench.kernels import adapters, ops


def _float_mask(name: str, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`mask` as PyTorch's MHA takes it: float as given, bool as 0 / -inf (True: masked out)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


class TritonMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose projections run on the Triton GEMM; the attention core stays PyTorch's.

    Build it with `from_module`, which shares the module's Parameter objects (in_proj_weight / in_proj_bias or
    q/k/v_proj_weight, out_proj.weight / .bias, bias_k / bias_v): the same state_dict keys, optimizers unchanged.
    """

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> "TritonMultiheadAttention":
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        return adapters.share(module, cls)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check(query, key, value, key_padding_mask, attn_mask)
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=2)  # as PyTorch
        key_padding_mask = _float_mask("key_padding_mask", key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("attn_mask is required with is_causal=True (a hint that attn_mask is the causal "
                               "mask), as in nn.MultiheadAttention")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA applies the causal mask itself
        else:
            attn_mask = _float_mask("attn_mask", attn_mask, query.dtype)
            is_causal = is_causal and key_padding_mask is None
        first = self.batch_first or not batched  # the batch dim comes first in the internal layout [N, L, E]
        q, k, v = self._project(query, key, value)
        if not batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        batch, target = q.shape[:2]
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
            v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        source = k.shape[2]
        mask = attn_mask.view(batch, self.num_heads, target, source) if attn_mask is not None and \
            attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            attention = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            weights = weights if batched else weights.squeeze(0)
        else:
            attention = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal)
        rows = attention.permute((0, 2, 1, 3) if first else (2, 0, 1, 3)).flatten(2)  # [N, L, E] or [L, N, E]
        out = ops.linear(rows, self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out.squeeze(0)), weights

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projected in the caller's layout: one GEMM for self-attention (query is key is value), one
        for q and one for k and v when key is value, else one each."""
        bias = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            biases = bias.chunk(3) if bias is not None else (None,) * 3
            return tuple(ops.linear(x, w, b) for x, w, b in zip(
                (query, key, value), (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight), biases))
        weight, size = self.in_proj_weight, self.embed_dim
        if query is key and key is value:
            return ops.linear(query, weight, bias).chunk(3, dim=-1)
        if key is value:
            q = ops.linear(query, weight[:size], bias[:size] if bias is not None else None)
            return (q, *ops.linear(key, weight[size:], bias[size:] if bias is not None else None).chunk(2, dim=-1))
        biases = bias.chunk(3) if bias is not None else (None,) * 3
        return tuple(ops.linear(x, w, b) for x, w, b in zip((query, key, value), weight.chunk(3), biases))

    def _check(self, query: object, key: object, value: object, key_padding_mask: torch.Tensor | None,
               attn_mask: torch.Tensor | None) -> bool:
        """Whether the inputs are batched; the shapes nn.MultiheadAttention takes, else an error naming the
        argument."""
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and not isinstance(mask, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must have query's {query.dim()} dimensions, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        for name, tensor, size in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                   ("value", value, self.vdim)):
            if tensor.shape[-1] != size:
                raise ValueError(f"{name}'s last dimension must be {size}, got shape {tuple(tensor.shape)}")
        batched = query.dim() == 3
        seq, batch = (1, 0) if self.batch_first and batched else (0, 1)
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must have the same sequence and batch sizes, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if batched and key.shape[batch] != query.shape[batch]:
            raise ValueError(f"key's batch size ({key.shape[batch]}) must be query's ({query.shape[batch]})")
        n, target, source = (query.shape[batch] if batched else 1), query.shape[seq], key.shape[seq]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((n, source) if batched else (source,)):
            raise ValueError(f"key_padding_mask must have shape {(n, source) if batched else (source,)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None and tuple(attn_mask.shape) not in ((target, source),
                                                                     (n * self.num_heads, target, source)):
            raise ValueError(f"attn_mask must have shape {(target, source)} or {(n * self.num_heads, target, source)} "
                             f"(batch * num_heads, target, source), got {tuple(attn_mask.shape)}")
        return batched

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                "projections on the Triton GEMM")


def _pad_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both masks (float) with one more, unmasked, source position: for bias_k/bias_v or the zero attention."""
    return tuple(F.pad(mask, (0, 1)) if mask is not None else None for mask in (attn_mask, key_padding_mask))


def describe(module: nn.Module, parent: nn.Module) -> str:
    """The swap table's detail for an adapted MultiheadAttention (registered in `kernels.adapters`)."""
    detail = "projections on the Triton GEMM, attention in PyTorch"
    if isinstance(parent, nn.TransformerEncoderLayer):
        detail += " (the layer's eval fast path, without grad, runs all in PyTorch)"
    return detail
