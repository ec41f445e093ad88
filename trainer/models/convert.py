"""Specialize a vanilla (pretrained) timm ViT: each shared tensor is cloned into both branches.

The converted model computes exactly what the vanilla one did until training moves the branches
apart. This is how a user specializes a pretrained DINOv2 or DeiT-III checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

_BRANCH_KEY = re.compile(r"^(?P<module>.+)\.(prefix|patch)\.(?P<param>[^.]+)$")
# Wrappers that training scripts put around the weights.
_NESTING_KEYS = ("teacher", "model_ema", "model", "state_dict", "module")
_KEY_PREFIXES = ("module.", "backbone.", "_orig_mod.")


@dataclass
class ConversionReport:
    cloned: list[str] = field(default_factory=list)  # vanilla keys copied into two branches
    missing: list[str] = field(default_factory=list)  # model keys left at their init (e.g. a new head)
    unused: list[str] = field(default_factory=list)  # checkpoint keys with no place in the model


def specialize_state_dict(vanilla: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map a vanilla ViT state_dict onto `model`'s keys (`X.w` -> `X.prefix.w`, `X.patch.w`)."""
    report = ConversionReport()
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, current in target.items():
        source_key = key
        if key not in vanilla and (m := _BRANCH_KEY.match(key)):
            source_key = f"{m['module']}.{m['param']}"
            if source_key not in report.cloned:
                report.cloned.append(source_key)
        if source_key not in vanilla:
            report.missing.append(key)
            continue
        tensor = vanilla[source_key]
        if tensor.shape != current.shape:
            if source_key.startswith("head."):  # a classifier for another label set: keep ours
                report.missing.append(key)
                continue
            raise ValueError(f"{source_key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(current.shape)}")
        out[key] = tensor.detach().clone().to(current.dtype)
        used.add(source_key)
    report.unused = sorted(k for k in vanilla if k not in used)
    return out, report


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state_dict from a `.safetensors`, `.pth`/`.pt`/`.bin` file, unwrapping common nesting."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # only .safetensors checkpoints need it

        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"checkpoint {path}: unsupported suffix {path.suffix!r}; use .safetensors, .pth, .pt or .bin")
    for key in _NESTING_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: expected a state_dict, found {type(state).__name__}")
    flat = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        flat[key] = value
    return flat


def load_vanilla_checkpoint(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> ConversionReport:
    """Load a vanilla timm/DINOv2/DeiT-III ViT checkpoint (file or state_dict) into a specialized model.

    timm's own filter adapts original DINOv2/DeiT key names and resizes position embeddings.
    """
    vanilla = read_checkpoint(source) if not isinstance(source, dict) else dict(source)
    vanilla = checkpoint_filter_fn(vanilla, model)
    state, report = specialize_state_dict(vanilla, model)
    blocking = [k for k in report.missing if not k.startswith("head.")]
    if blocking:
        raise ValueError(f"checkpoint lacks {len(blocking)} backbone tensors, e.g. {blocking[:5]}")
    model.load_state_dict(state, strict=False)
    return report
