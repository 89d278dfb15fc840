"""Self-attention modules: softmax-free sequence-normalized attention, SimA, and the softmax reference.

The method (docs/method.md#sequence-normalization), per batch element and head, with N tokens of
width d:

    SN(X) = (X − mean_N X) / (std_N X + ε)     statistics over the N tokens, per feature
    Q̂, K̂, V̂ = SN(Q), SN(K), SN(V)
    out = Q̂ · (K̂ᵀ V̂) / N                        d×d summary first: O(N·d²) time, O(N·d) memory

registered as ``seqnorm`` (the default). ``seqnorm_qk`` is the earlier form that normalizes Q and
K only and lets V enter as the projection produced it; ``sima`` is SimA (Koohpayegani &
Pirsiavash, WACV 2024), Q and K divided by their L1 norm over the tokens, out = Q̃ (K̃ᵀ V);
``softmax`` the SDPA reference. Without a softmax the products are associative, so the N×N
matrix is never formed.

Three files: the modules and their registry here ((B, N, C) → (B, N, C), registered by name in
``ATTENTION`` so that the model never branches on the kind); the production kernel of both
sequence-normalized forms in seqnorm_kernel.py; the plain functional forms (reference, export,
SimA, softmax) in attention_functional.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volumetric.layers.attention_functional import (
    affine_shapes,
    seqnorm_attention_plain,
    sima_attention,
    softmax_attention,
)
from volumetric.layers.seqnorm_kernel import seqnorm_attention

V_SCALE_INIT = 0.1
"""Starting value of the affine's scales of V̂ (those of Q̂ and K̂ start at 1). Normalizing V lifts
the value features from their spread over the tokens at initialization, about 0.1, to 1, and the
attention branch then adds ten times more to the residual stream than with V raw; from scratch,
such a model did not learn a task whose label is a finding's location. Starting γ_V at 0.1 gives
the branch its Q,K-only size, and it learnt it (docs/method.md#sequence-normalization, "Optional
learnable affine")."""


def _exporting() -> bool:
    """True while torch.export (also under the ONNX exporter) or the TorchScript ONNX exporter
    traces the model."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


# ----------------------------------------------------------------------------------------------
# modules: (B, N, C) → (B, N, C)

ATTENTION: dict[str, type[nn.Module]] = {}


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an attention module to ``ATTENTION`` under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        ATTENTION[name] = cls
        return cls

    return add


class MultiHeadSelfAttention(nn.Module):
    """Projections shared by every attention kind; subclasses define `attend` on (B, H, N, d)."""

    supports_affine = False
    """Whether the kind takes ``affine=True`` (a learnable affine after its normalization)."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True, out_norm: bool = False):
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # TransNormer's fix for linear attention: a LayerNorm of the merged heads, per token,
        # before the projection, which bounds the output whatever the size of the summary
        self.out_norm = nn.LayerNorm(dim) if out_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, d), views
        out = self.attend(q, k, v)  # (B, H, N, d)
        return self.proj(self.out_norm(out.transpose(1, 2).reshape(b, n, c)))  # (B, N, C)


@register_attention("seqnorm")
class SeqNormAttention(MultiHeadSelfAttention):
    """Softmax-free attention with sequence normalization of Q, K and V: O(N·d²).

    ``affine=True`` adds a learnable per-feature scale γ of Q̂ and K̂ (ones) and of V̂
    (`V_SCALE_INIT`) and shift β (zeros) of Q̂ (of Q̂ and K̂ in seqnorm_qk) after the
    normalization, folded into the d×d summaries (`fold_affine`). They are stored flat, one block of C per normalized input in the
    qkv layout (head-major), so that the optimizer treats them like the LayerNorms' weights (no
    weight decay).
    """

    supports_affine = True
    normalize_v = True

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        out_norm: bool = False,
        affine: bool = False,
    ):
        super().__init__(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, out_norm=out_norm)
        if affine:
            (scales, _, _), (shifts, _, _) = affine_shapes(self.normalize_v, 1, dim)
            weight = torch.ones(scales * dim)  # (n·C,): γ_Q, γ_K[, γ_V]
            if self.normalize_v:
                weight[2 * dim :] = V_SCALE_INIT
            self.norm_weight = nn.Parameter(weight)
            self.norm_bias = nn.Parameter(torch.zeros(shifts * dim))  # (m·C,)
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)

    def forward(self, x: Tensor) -> Tensor:
        """The tokens centred over N before the projection, which centres Q, K and V at once
        (their means are then the projection's bias: one pass over x instead of three copies),
        keeping the kernel's float32 sums exact (docs/method.md#precision). The normalization
        removes those means anyway, so the bias is inert here but for seqnorm_qk's affine (it
        gets the rounding-sized gradients it always got and stays near its zero start); V's
        mean, which that affine needs, is added back there."""
        b, n, c = x.shape
        mean = x.mean(dim=1, keepdim=True)  # (B, 1, C)
        qkv = F.linear(x - mean, self.qkv.weight, self.qkv.bias)  # (B, N, 3C), centred over N
        qkv = qkv.view(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, d), views
        if not self.normalize_v and self.norm_weight is not None:
            v = v + self.value_mean(mean)  # (B, H, N, d): V as projected, its mean included
        out = self.attend(q, k, v)  # (B, H, N, d)
        return self.proj(self.out_norm(out.transpose(1, 2).reshape(b, n, c)))  # (B, N, C)

    def value_mean(self, mean: Tensor) -> Tensor:
        """What the centring took from V: the projection of the tokens' mean (B, 1, C), without
        the bias, which the projection of the centred tokens kept: (B, H, 1, d)."""
        c = mean.shape[-1]
        w = self.qkv.weight[2 * c :]  # (C, C): V's rows
        return F.linear(mean, w).view(mean.shape[0], 1, self.num_heads, -1).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        weight = bias = None
        if self.norm_weight is not None:
            shape = (-1, self.num_heads, q.shape[-1])  # (n, H, d) and (m, H, d)
            weight, bias = self.norm_weight.view(shape), self.norm_bias.view(shape)
        if _exporting():  # the production Function cannot be traced (see seqnorm_attention_plain)
            return seqnorm_attention_plain(
                q, k, v, normalize_v=self.normalize_v, weight=weight, bias=bias
            )
        return seqnorm_attention(  # centred by `forward`
            q, k, v, normalize_v=self.normalize_v, weight=weight, bias=bias, centre=False
        )


@register_attention("seqnorm_qk")
class SeqNormQKAttention(SeqNormAttention):
    """The earlier form: Q and K sequence-normalized, V as the projection produced it: O(N·d²)."""

    normalize_v = False


@register_attention("sima")
class SimAAttention(MultiHeadSelfAttention):
    """SimA (Koohpayegani & Pirsiavash): Q, K L1-normalized over the tokens, no softmax, O(N·d²)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sima_attention(q, k, v)


@register_attention("softmax")
class SoftmaxAttention(MultiHeadSelfAttention):
    """The reference: softmax(QKᵀ/√d)V through SDPA, O(N²)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return softmax_attention(q, k, v)


def supports_affine(kind: str) -> bool:
    """Whether the attention registered as ``kind`` takes a learnable affine (``affine=True``)."""
    return getattr(ATTENTION[kind], "supports_affine", False)


def build_attention(
    kind: str,
    *,
    dim: int,
    num_heads: int,
    qkv_bias: bool = True,
    affine: bool = False,
    out_norm: bool = False,
) -> nn.Module:
    """Instantiate the attention registered as ``kind``; ``affine`` only for kinds that take one,
    ``out_norm`` (a LayerNorm before the output projection) for every kind."""
    if kind not in ATTENTION:
        raise ValueError(f"attention={kind!r} is not one of {sorted(ATTENTION)}")
    options = dict(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, out_norm=out_norm)
    if not affine:
        return ATTENTION[kind](**options)
    if not supports_affine(kind):
        kinds = sorted(name for name in ATTENTION if supports_affine(name))
        raise ValueError(f"affine=True applies to attention {kinds}, not attention={kind!r}")
    return ATTENTION[kind](**options, affine=True)
