"""What a training step dispatches: the CPU proxy for a GPU's kernel launches (issue 12).

Eager, at ViT-S: kernel-launching aten ops of one step (forward, backward, fused AdamW), a fused
two-branch op counting once. Compiled, at micro: kernels inductor generates, and no graph breaks.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch._dynamo
import torch._inductor.metrics

import trainer.models as tm


def build(scale: str, spec: str | None, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(tm.SCALES[scale], init_values=1e-5, num_classes=10, **kwargs)
    if spec is None:
        return timm.create_model(tm.vanilla_counterpart(scale)[0], **args)
    return timm.create_model(tm.MODEL_NAMES[scale], specialization=spec, **args)


def test_eager_step_dispatches_about_what_vanilla_does():
    counts = {spec: sum(tm.count_kernel_ops(build("small", spec), 224).values()) for spec in (None, "paper", "all")}
    assert counts["paper"] <= 1.15 * counts[None]
    assert counts["all"] <= 1.40 * counts[None]


def test_counter_sees_the_fused_ops_and_what_they_run():
    model = build("micro", "norms,ls1,qkv@first:2")
    fused = tm.count_kernel_ops(model, 32)
    inside = tm.count_kernel_ops(model, 32, inside_fused=True)
    depth = tm.SCALES["micro"]["depth"]
    assert fused["specialized_vit.layer_norm"] == fused["specialized_vit.layer_norm_backward"] == 2 * depth + 1
    assert fused["specialized_vit.scale"] == depth and fused["specialized_vit.linear"] == 2
    assert not any(k.startswith("specialized_vit.") for k in inside)
    assert sum(inside.values()) > sum(fused.values())
    assert "aten.view" not in fused and "aten.detach" not in fused  # metadata only: no kernel


@pytest.mark.slow
def test_compiled_step_generates_about_vanillas_kernels():
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 10, (2,))
    kernels, breaks, grads = {}, {}, {}
    for spec in ("none", "paper", "all"):
        # Three blocks, not micro's six: kernels per block are what differ, and inductor on CPU
        # compiles for minutes at full depth. `paper`'s QKV then specializes block 0 (the first third).
        model = build("micro", spec, depth=3)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch._inductor.metrics.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = torch.nn.functional.cross_entropy(torch.compile(model)(x), y)
            loss.backward()
        kernels[spec] = torch._inductor.metrics.generated_kernel_count
        breaks[spec] = sum(torch._dynamo.utils.counters["graph_break"].values())
        grads[spec] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()  # eager: the same gradients
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[spec][name], p.grad, rtol=1e-4, atol=1e-6)
    assert breaks == {"none": 0, "paper": 0, "all": 0}
    # The two-branch linear is one extern call (no row copies around its GEMMs), norm and scale
    # fuse into their neighbours: every specialization generates about vanilla's kernels.
    assert kernels["paper"] <= 1.05 * kernels["none"], kernels
    assert kernels["all"] <= 1.05 * kernels["none"], kernels
