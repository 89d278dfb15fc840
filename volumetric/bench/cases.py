"""The workloads the benchmark times, each built from a small JSON-able spec.

    attention   forward+backward of one attention variant on (B, H, N, d) tensors
    train_step  forward, backward and AdamW step of a whole classifier on one volume, or with
                ``"mode": "infer"`` its forward alone (eval mode, no autograd)
    matmul      a float32 (or ``dtype``) matmul, square or of a given (M, K, N) shape, for the
                machine's measured peak FLOP/s

Optional keys: ``dtype`` ("float32", "bfloat16", "float16") of the attention's inputs or the
matmul; ``sdpa`` ("flash", "efficient", "math"), the one SDPA backend softmax_sdpa may use;
``precision`` ("bf16", "fp16") of a whole model's autocast, as training's ``train.precision``.

`build(spec)` returns ``(step, flops)``: a zero-argument callable running one repetition, and the
model FLOPs of that repetition (forward + backward = 3× forward, recomputation not counted).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from volumetric.device import autocast
from volumetric.layers.attention_functional import (
    seqnorm_attention_reference,
    sima_attention,
    softmax_attention,
    softmax_attention_explicit,
)
from volumetric.layers.seqnorm_kernel import seqnorm_attention
from volumetric.models.registry import densenet121
from volumetric.models.vit3d import VolumeTransformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def bare_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The floor seq-norm attention is measured against: just Q (Kᵀ V), no normalization."""
    return q @ (k.mT @ v)


def seqnorm_module_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Seq-norm attention as the model calls it: the inputs come centred (the attention layer
    centres its tokens before the projection, a pass over (N, C) timed in the training steps),
    so the kernel makes no copies of its own."""
    return seqnorm_attention(q, k, v, centre=False)


def seqnorm_torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The method through the PyTorch backend, where the default would pick Triton (CUDA)."""
    return seqnorm_attention(q, k, v, centre=False, backend="torch")


def seqnorm_qk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The earlier seq-norm form: Q and K normalized, V raw (same fused Function)."""
    return seqnorm_attention(q, k, v, normalize_v=False, centre=False)


ATTENTION_VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "seqnorm": seqnorm_module_attention,  # Q, K and V normalized: the method
    "seqnorm_torch": seqnorm_torch_attention,
    "seqnorm_qk": seqnorm_qk_attention,
    "sima": sima_attention,
    "seqnorm_unfused": seqnorm_attention_reference,
    "bare_qktv": bare_linear_attention,
    "softmax_sdpa": softmax_attention,
    "softmax_explicit": softmax_attention_explicit,
}
QUADRATIC = {"softmax_sdpa", "softmax_explicit"}


def attention_flops(variant: str, b: int, h: int, n: int, d: int) -> float:
    """Forward + backward FLOPs of the matmuls (3× the forward's)."""
    per_head = 2 * 2 * n * n * d if variant in QUADRATIC else 2 * 2 * n * d * d
    return 3.0 * b * h * per_head


def model_flops(
    *,
    tokens: int,
    dim: int,
    depth: int,
    mlp_ratio: float,
    patch_voxels: int,
    attention: str,
    num_heads: int,
    in_channels: int = 1,
) -> float:
    """Forward + backward FLOPs of a ViT on one volume: linear layers, attention matmuls, patch embedding."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2
    d = dim // num_heads
    # two matmuls over all heads
    attn = 2 * 2 * tokens * (tokens if attention == "softmax" else d) * dim
    embed = 2 * tokens * patch_voxels * in_channels * dim
    return 3.0 * (depth * (linear + attn) + embed)


def _attention_case(spec: dict[str, Any], device: torch.device) -> tuple[Callable[[], None], float]:
    b, h, n, d = spec.get("batch", 1), spec["heads"], spec["tokens"], spec["head_dim"]
    fn = ATTENTION_VARIANTS[spec["variant"]]
    dtype = DTYPES[spec.get("dtype", "float32")]
    generator = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (  # (B, H, N, d), drawn on the CPU so that every device sees the same numbers
        torch.randn(b, h, n, d, generator=generator).to(device, dtype).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(b, h, n, d, generator=generator).to(device, dtype)
    backend = spec.get("sdpa")

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        with sdpa_kernel(SDPA_BACKENDS[backend]) if backend else contextlib.nullcontext():
            fn(q, k, v).backward(grad)

    return step, attention_flops(spec["variant"], b, h, n, d)


def _monai_vit(spec: dict[str, Any]) -> nn.Module:
    from monai.networks.blocks.selfattention import SABlock
    from monai.networks.nets import ViT

    model = ViT(
        in_channels=1,
        img_size=spec["volume"],
        patch_size=spec["patch"],
        hidden_size=spec["dim"],
        mlp_dim=int(spec["dim"] * 4),
        num_layers=spec["depth"],
        num_heads=spec["heads"],
        classification=True,
        num_classes=2,
        spatial_dims=3,
    )
    for block in model.blocks:  # route MONAI's attention through SDPA, its fastest path
        cast(SABlock, block.attn).use_flash_attention = True
    return model


def volume_shape(spec: dict[str, Any]) -> tuple[int, int, int]:
    """The spec's volume as (W, H, D): an int means a cube."""
    volume = spec["volume"]
    return (volume,) * 3 if isinstance(volume, int) else tuple(volume)


def tokens_of(spec: dict[str, Any]) -> int:
    w, h, d = volume_shape(spec)
    return (w // spec["patch"]) * (h // spec["patch"]) * (d // spec["patch"])


def counted_flops(model: nn.Module, shape: tuple[int, ...]) -> float:
    """Forward FLOPs of ``model`` on an input of ``shape``, counted by PyTorch on meta tensors (no
    memory, no compute): for models without an analytic count, such as DenseNet121."""
    meta = copy.deepcopy(model).to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.empty(shape, device="meta"))
    return float(counter.get_total_flops())


def _train_step_case(
    spec: dict[str, Any], device: torch.device
) -> tuple[Callable[[], None], float]:
    if spec["model"] == "densenet121":
        model: nn.Module = densenet121(num_classes=2)
        shape = (1, 1, *volume_shape(spec))
        return _model_step(model, spec, device), _scaled(counted_flops(model, shape), spec)
    model, attention = _transformer(spec)
    train_flops = model_flops(  # forward + backward
        tokens=tokens_of(spec),
        dim=spec["dim"],
        depth=spec["depth"],
        mlp_ratio=4.0,
        patch_voxels=spec["patch"] ** 3,
        attention=attention,
        num_heads=spec["heads"],
    )
    return _model_step(model, spec, device), _scaled(train_flops / 3.0, spec)


def _training(spec: dict[str, Any]) -> bool:
    return spec.get("mode", "train") == "train"


def _scaled(forward_flops: float, spec: dict[str, Any]) -> float:
    """A repetition's FLOPs: forward + backward (3× forward) for a training step."""
    return forward_flops * (3.0 if _training(spec) else 1.0)


def _transformer(spec: dict[str, Any]) -> tuple[nn.Module, str]:
    """The ViT of ``spec`` (volumetric's or MONAI's) and its attention ("seqnorm" or "softmax")."""
    patch, dim, depth, heads = spec["patch"], spec["dim"], spec["depth"], spec["heads"]
    if spec["model"] == "monai_vit":
        model: nn.Module = _monai_vit(spec)
        attention = "softmax"
    else:
        attention = spec["model"]  # "seqnorm" or "softmax"
        model = VolumeTransformer(
            num_classes=2,
            patch_size=patch,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            attention=attention,
            grad_checkpointing=spec.get("checkpointing", False),
            memory_lean=spec.get("memory_lean", False),
        )
    return model, attention


def _model_step(model: nn.Module, spec: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) or, for ``"mode": "infer"``, one forward
    without autograd, of ``model`` on one volume under the spec's autocast."""
    model = model.to(device)
    precision = AUTOCAST[spec.get("precision", "fp32")]
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 1, *volume_shape(spec), generator=generator).to(device)  # (1, 1, W, H, D)
    y = torch.tensor([1], device=device)

    def forward() -> torch.Tensor:
        with autocast(device, precision):
            logits = model(x)
        # MONAI's ViT returns (logits, hidden states)
        return logits[0] if isinstance(logits, tuple) else logits

    if not _training(spec):
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                forward()

        return infer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(forward().float(), y).backward()
        optimizer.step()

    return step


def _matmul_case(spec: dict[str, Any], device: torch.device) -> tuple[Callable[[], None], float]:
    """(M, K) @ (K, N): ``shape`` [M, K, N], or ``size`` for a square product."""
    m, k, n = spec.get("shape") or (spec["size"],) * 3
    dtype = DTYPES[spec.get("dtype", "float32")]
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)

    def step() -> None:
        torch.mm(a, b, out=out)

    return step, 2.0 * m * k * n


CASES = {"attention": _attention_case, "train_step": _train_step_case, "matmul": _matmul_case}


def build(spec: dict[str, Any], device: torch.device) -> tuple[Callable[[], None], float]:
    return CASES[spec["kind"]](spec, device)
