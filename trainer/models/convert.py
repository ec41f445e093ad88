"""Specialize a vanilla (pretrained) timm ViT: each shared tensor is cloned into both branches.

The converted model computes exactly what the vanilla one did until training moves the branches
apart. This is how a user specializes a pretrained DINOv2 or DeiT-III checkpoint.
"""

from __future__ import annotations

import math
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
# DeiT-III (facebookresearch/deit models_v2.py) stores LayerScale as `blocks.N.gamma_1` / `gamma_2`.
_DEIT3_GAMMA = re.compile(r"^blocks\.\d+\.gamma_[12]$")


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


class CheckpointMismatch(ValueError):
    """The checkpoint's architecture differs from the model's in a way a trial config can fix."""


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def check_checkpoint_geometry(vanilla: dict[str, torch.Tensor], model: nn.Module, *, resample: bool = False) -> None:
    """Refuse, naming both sizes and the trial key to change, a checkpoint whose patch size, position
    grid, [CLS] position or register count is not the model's (before timm silently adapts it)."""
    proj = vanilla.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() == 4 and not resample:
        ckpt_patch, model_patch = tuple(proj.shape[-2:]), tuple(model.patch_embed.proj.weight.shape[-2:])
        if ckpt_patch != model_patch:
            raise CheckpointMismatch(
                f"checkpoint patch size {ckpt_patch[0]}x{ckpt_patch[1]} != model patch size "
                f"{model_patch[0]}x{model_patch[1]}: set model.patch_size: {ckpt_patch[0]} (and a model.img_size "
                "divisible by it) to load it as it is, or model.resample_pretrained: true to resample the "
                "patch embedding (the model then no longer computes the checkpoint's function)")
    registers = vanilla.get("register_tokens", vanilla.get("reg_token"))
    ckpt_registers = 0 if registers is None else int(registers.shape[1])
    if ckpt_registers != getattr(model, "num_reg_tokens", 0):
        raise CheckpointMismatch(f"checkpoint has {ckpt_registers} register tokens, the model "
                                 f"{getattr(model, 'num_reg_tokens', 0)}: set model.reg_tokens: {ckpt_registers}")
    pos = vanilla.get("pos_embed")
    if pos is None or getattr(model, "pos_embed", None) is None:
        return
    model_grid = tuple(model.patch_embed.grid_size)
    # Positions = grid^2 + those of the prefix tokens: none (DeiT-III, timm's no_embed_class), the
    # [CLS] only (DINOv2, also with registers) or [CLS] + registers (timm's default with registers).
    positions = int(pos.shape[1])
    layouts = [k for k in dict.fromkeys((1 + ckpt_registers, 1, 0)) if _is_square(positions - k)]
    if not layouts:
        raise CheckpointMismatch(f"checkpoint pos_embed has {positions} positions: not a square grid plus "
                                 "prefix positions; is it a ViT checkpoint?")
    prefix_positions = next((k for k in layouts if math.isqrt(positions - k) == model_grid[0]), layouts[0])
    ckpt_grid = math.isqrt(positions - prefix_positions)
    # DINOv2 with registers: timm folds the [CLS] position into the [CLS] token of a no_embed_class model.
    needs_no_embed_class = prefix_positions == 0 or "register_tokens" in vanilla
    if needs_no_embed_class != bool(getattr(model, "no_embed_class", False)):
        layout = ("has no [CLS] position (DeiT-III layout)" if prefix_positions == 0 else
                  "has registers (DINOv2 layout)" if needs_no_embed_class else "has a [CLS] position")
        fix = "true" if needs_no_embed_class else "false"
        raise CheckpointMismatch(f"checkpoint pos_embed {layout}, which needs model.no_embed_class: {fix}")
    if (ckpt_grid, ckpt_grid) != model_grid and not resample:
        patch = model.patch_embed.proj.weight.shape[-1]
        raise CheckpointMismatch(
            f"checkpoint position grid {ckpt_grid}x{ckpt_grid} != model grid {model_grid[0]}x{model_grid[1]}: set "
            f"model.img_size: {ckpt_grid * patch} to load it as it is, or model.resample_pretrained: true to "
            "interpolate the position embedding")


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
    teacher = "teacher.backbone."  # a DINOv2 meta-architecture's own checkpoint: the teacher is what DINOv2 evaluates
    if any(k.startswith(teacher) for k in state):
        state = {k[len(teacher):]: v for k, v in state.items() if k.startswith(teacher)}
    flat = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        flat[key] = value
    return flat


def load_vanilla_checkpoint(model: nn.Module, source: str | Path | dict[str, torch.Tensor], *,
                            resample: bool = False) -> ConversionReport:
    """Load a vanilla timm/DINOv2/DeiT-III ViT checkpoint (file or state_dict) into a specialized model.

    timm's own filter adapts the official key layouts: DINOv2's (`mask_token` dropped; with registers,
    `register_tokens` and the [CLS] position folded into the tokens of a `no_embed_class` model) and
    DeiT-III's (`gamma_1`/`gamma_2` -> `ls1.gamma`/`ls2.gamma`). A checkpoint whose patch size or
    position grid differs from the model's is refused unless `resample`: timm would resample it, and
    the model would no longer compute the checkpoint's function.
    """
    vanilla = read_checkpoint(source) if not isinstance(source, dict) else dict(source)
    check_checkpoint_geometry(vanilla, model, resample=resample)
    deit3_layer_scale = any(_DEIT3_GAMMA.match(k) for k in vanilla)
    vanilla = checkpoint_filter_fn(vanilla, model, adapt_layer_scale=deit3_layer_scale)
    state, report = specialize_state_dict(vanilla, model)
    blocking = [k for k in report.missing if not k.startswith("head.")]
    if blocking:
        raise ValueError(f"checkpoint lacks {len(blocking)} backbone tensors, e.g. {blocking[:5]}")
    model.load_state_dict(state, strict=False)
    return report
