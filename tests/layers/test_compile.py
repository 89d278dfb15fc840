"""No host synchronization in the model: its forward and backward compile into one graph
(torch.compile, fullgraph) and give what eager gives; on CUDA, a training step raises nothing
under the sync debug mode."""

from __future__ import annotations

import pytest
import torch

from volumetric.models.vit3d import VolumeTransformer

FORMS = {
    "seqnorm": {},
    "seqnorm+affine": {"seqnorm_affine": True},
    "seqnorm_qk+affine": {"attention": "seqnorm_qk", "seqnorm_affine": True},
    "options": {"stem": "conv", "layer_scale": 0.1, "attention_norm": True},
}


def tiny(**options) -> VolumeTransformer:
    torch.manual_seed(0)
    return VolumeTransformer(
        num_classes=2, patch_size=4, embed_dim=24, depth=2, num_heads=2, **options
    )


@pytest.mark.slow  # compiling takes a few seconds a form
@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_model_compiles_into_one_graph(form):
    """fullgraph=True fails on any graph break: a host sync (.item(), bool() of a tensor) or a
    branch on the values would be one."""
    model = tiny(**FORMS[form]).eval()
    x = torch.randn(2, 1, 16, 12, 8) * 3.0 + 100.0  # far from zero mean: the centring matters
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_training_step_makes_no_host_sync():
    model = tiny(seqnorm_affine=True).cuda()
    x = torch.randn(2, 1, 16, 12, 8, device="cuda")
    labels = torch.tensor([0, 1], device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(x), labels)  # warm-up: lazy initializations
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
