"""The specialized ViT's scales (timm's widths, depths and heads, plus a CPU-sized `micro`) and the
timm names they are registered under. Torch-free, so the orchestrator can plan without importing torch.
"""

from __future__ import annotations

from typing import Any

SCALES: dict[str, dict[str, Any]] = {
    "micro": dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4),
    "tiny": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
MODEL_NAMES: dict[str, str] = {
    scale: f"specialized_vit_{scale}_patch{a['patch_size']}_{a['img_size']}" for scale, a in SCALES.items()
}


def vanilla_counterpart(scale: str) -> tuple[str, dict[str, Any]]:
    """The stock timm model name and kwargs that build the same architecture without specialization."""
    base = {"micro": "vit_tiny_patch16_224", "huge": "vit_huge_patch14_224"}.get(scale, f"vit_{scale}_patch16_224")
    return base, dict(SCALES[scale])
