"""The analytic FLOP counts behind the benchmark's model utilization, checked against PyTorch's own
count of a real forward pass (`torch.utils.flop_counter.FlopCounterMode`).

`model_flops` and `attention_flops` give forward + backward = 3 × forward, so their forward part is a
third. FlopCounterMode counts the FLOPs of every matmul, convolution and (math-path) attention the
forward dispatches, and no elementwise op (LayerNorm, GELU, the softmax, the seq-norm scaling); the
analytic counts leave out the same elementwise work. What FlopCounterMode counts and the analytic
count leaves out, each bracketed below:

- the seq-norm statistics: `_moments` (volumetric/layers/seqnorm_kernel.py) takes the per-feature
  variance of Q and of K from the diagonal of the Gram matrix xᵀx, one (d × N)·(N × d) matmul each:
  2·2·N·d² per head, as many FLOPs as the attention's own two matmuls. Counted separately below
  (``gram``), so that the tolerance left over stays small;
- the rank-one mean corrections of the fused kernel (μ_kᵀ·ΣV, μ_q·S: 2·d² per head each) and the
  classification head (2·C·classes per volume): together under 0.01 % of these forwards.

Tolerance: ``SMALL = 0.002`` relative, an upper bound on those last two, 20× what they are here.
Lower bound: none (the counted forward may not fall short of the analytic one at all).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from volumetric.bench.cases import attention_flops, model_flops
from volumetric.layers.seqnorm_kernel import seqnorm_attention
from volumetric.models.vit3d import VolumeTransformer

SMALL = 0.002
"""Relative allowance for the head and the rank-one mean corrections the analytic count leaves out."""

PATCH, DIM, DEPTH, HEADS, MLP_RATIO = 4, 64, 2, 4, 4.0


def counted_forward(fn, *args) -> tuple[int, dict[str, int]]:
    """FLOPs FlopCounterMode counts in one forward ``fn(*args)``: the total and the count per op."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    per_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


@pytest.mark.parametrize("attention", ["seqnorm", "softmax"])
@pytest.mark.parametrize("volume", [(32, 32, 32), (48, 32, 16)], ids=["cube", "non-cube"])
def test_model_flops_match_a_counted_forward(volume, attention):
    model = VolumeTransformer(
        num_classes=2,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP_RATIO,
        attention=attention,
    ).eval()
    x = torch.randn(1, 1, *volume)  # (B, C_in, W, H, D)
    tokens = (volume[0] // PATCH) * (volume[1] // PATCH) * (volume[2] // PATCH)  # 512 and 384
    # the softmax model's SDPA through its math path: the CPU's fused kernel is not counted at all
    with sdpa_kernel(SDPBackend.MATH):
        counted, per_op = counted_forward(model, x)
    analytic = (
        model_flops(
            tokens=tokens,
            dim=DIM,
            depth=DEPTH,
            mlp_ratio=MLP_RATIO,
            patch_voxels=PATCH**3,
            attention=attention,
            num_heads=HEADS,
        )
        / 3  # forward + backward = 3 × forward
    )
    head_dim = DIM // HEADS
    # seq-norm only: xᵀx of Q and of K in every block, 2·N·d² per head each (see the module docstring)
    gram = DEPTH * 2 * 2 * tokens * head_dim * DIM if attention == "seqnorm" else 0
    assert analytic <= counted <= (analytic + gram) * (1 + SMALL), (
        f"counted {counted} = {per_op}, analytic forward {analytic:.0f}, statistics {gram}: "
        f"ratio {counted / analytic:.4f}"
    )


def test_seqnorm_attention_flops_match_a_counted_forward():
    b, h, n, d = 2, 4, 512, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    counted, per_op = counted_forward(seqnorm_attention, q, k, v)
    analytic = attention_flops("seqnorm", b, h, n, d) / 3  # Kᵀ V and Q (Kᵀ V): 2·2·N·d² per head
    gram = b * h * 2 * 2 * n * d * d  # xᵀx of Q and of K in `_moments`
    assert analytic <= counted <= (analytic + gram) * (1 + SMALL), (
        f"counted {counted} = {per_op}, analytic forward {analytic:.0f}, statistics {gram}"
    )
