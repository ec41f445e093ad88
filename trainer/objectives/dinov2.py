"""DINOv2 self-distillation: a student (backbone + DINO head + iBOT head) learns to match an EMA
teacher on [CLS] tokens across crops (DINO), on masked patches (iBOT), plus a KoLeo spread term.

The teacher backbone is the one evaluated afterwards (`eval_backbone`), as in DINOv2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.models import checkpoint_seq
from torch import Tensor, nn

from trainer.config import DINOv2Config
from trainer.objectives.heads import DINOHead
from trainer.objectives.losses import DINOLoss, iBOTPatchLoss, KoLeoLoss
from trainer.objectives.meta_arch import MetaArch
from trainer.objectives.schedules import WarmupForm, teacher_momentum, teacher_temperature

# Mixed into the mask seed so masks never share a random stream with another user of the trial seed.
_MASK_STREAM = 0x1B07


def block_mask(height: int, width: int, num_masked: int, generator: torch.Generator, min_block: int = 4,
               max_block: int | None = None, max_attempts: int = 10) -> Tensor:
    """A height x width bool mask made of random rectangles covering about `num_masked` patches (iBOT/BEiT).

    Rectangles have area in [min_block, remaining budget] and aspect ratio in [0.3, 1/0.3]; they
    may overlap, only newly covered patches count, and the count never exceeds `num_masked`.
    """
    max_block = max_block or max(1, height * width // 2)
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(max_attempts):
            area = uniform(min(min_block, budget), budget)
            aspect = math.exp(uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h < height and 0 < w < width):
                continue
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= budget:
                mask[top:top + h, left:left + w] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def sample_masks(num_images: int, grid: tuple[int, int], mask_ratio: tuple[float, float], mask_probability: float,
                 generator: torch.Generator) -> Tensor:
    """num_images x patches bool masks: a `mask_probability` fraction of the images is masked, their
    ratios spread evenly over `mask_ratio` (one stratum each, as DINOv2's collate), order shuffled."""
    height, width = grid
    num_masked_images = int(num_images * mask_probability)
    bounds = torch.linspace(mask_ratio[0], mask_ratio[1], num_masked_images + 1).tolist()
    masks = torch.zeros(num_images, height, width, dtype=torch.bool)
    for i in range(num_masked_images):
        ratio = bounds[i] + (bounds[i + 1] - bounds[i]) * torch.rand((), generator=generator).item()
        masks[i] = block_mask(height, width, int(ratio * height * width), generator)
    return masks[torch.randperm(num_images, generator=generator)].flatten(1)


def mask_generator(seed: int, step: int) -> torch.Generator:
    """A generator determined by (seed, process rank, step) alone: resuming at step k redraws step k's masks."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    state = np.random.SeedSequence([_MASK_STREAM, seed, rank, step]).generate_state(1, np.uint64)[0]
    generator = torch.Generator()
    generator.manual_seed(int(state))
    return generator


def _dino_parts(backbone: nn.Module, cfg: DINOv2Config) -> nn.ModuleDict:
    def head() -> DINOHead:
        return DINOHead(backbone.embed_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim)

    dino_head = head()
    # Shared (DINOv2's ImageNet configs): one module under both names, so its parameters and the
    # teacher's EMA count it once.
    return nn.ModuleDict(dict(backbone=backbone, dino_head=dino_head,
                              ibot_head=head() if cfg.separate_ibot_head else dino_head))


class DINOv2MetaArch(MetaArch):
    """batch = dict(global_crops=2B x 3 x H x W (all first crops, then all second crops),
    local_crops=L*B x 3 x h x w or None, batch_size=B).

    Loss = DINO (student global + local crops vs the teacher's other global crop)
         + ibot_weight * iBOT (student masked global crops vs the teacher's unmasked patches)
         + koleo_weight * KoLeo (student global [CLS], summed over the two crops as DINOv2).
    """

    def __init__(self, student_backbone: nn.Module, teacher_backbone: nn.Module, cfg: DINOv2Config,
                 total_steps: int, seed: int = 0, warmup_form: WarmupForm = "trainer") -> None:
        super().__init__()
        self.warmup_form = warmup_form
        if not isinstance(getattr(student_backbone, "patch_drop", nn.Identity()), nn.Identity):
            raise ValueError("iBOT masks index patch positions: the backbone must not use patch dropout")
        self.cfg = cfg
        self.total_steps = total_steps
        self.seed = seed
        self.student = _dino_parts(student_backbone, cfg)
        self.teacher = _dino_parts(teacher_backbone, cfg)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # Replaces masked patch embeddings before positions are added (the student backbone is
        # a plain timm ViT, so the token lives here rather than inside it).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, student_backbone.embed_dim))
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.centering)
        self.ibot_loss = iBOTPatchLoss(cfg.out_dim, cfg.student_temp, cfg.centering)
        self.koleo_loss = KoLeoLoss()

    @property
    def backbone(self) -> nn.Module:
        return self.student["backbone"]

    @property
    def eval_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter, int | None]]:
        # DINOv2 keeps the mask token inside the backbone, at layer 0 of the lr decay.
        return [(name, param, len(self.backbone.blocks) if name == "mask_token" else blocks)
                for name, param, blocks in super().named_trainable_parameters()]

    def grad_clip_groups(self) -> list[list[nn.Parameter]]:
        # As DINOv2 clips each student module (dinov2/train/train.py); its mask token is the backbone's.
        heads = {id(m): m for m in (self.student["dino_head"], self.student["ibot_head"])}.values()
        return [[self.mask_token, *self.backbone.parameters()], *[list(head.parameters()) for head in heads]]

    def train(self, mode: bool = True) -> "DINOv2MetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never uses drop-path/dropout
        return self

    def teacher_temp(self, step: int) -> float:
        return teacher_temperature(step, self.total_steps, self.cfg.warmup_teacher_temp, self.cfg.teacher_temp,
                                   warmup_form=self.warmup_form)

    def momentum(self, step: int) -> float:
        return teacher_momentum(step, self.total_steps, self.cfg.teacher_momentum)

    @torch.compiler.disable
    def masks(self, step: int, num_images: int, image_size: tuple[int, int]) -> Tensor:
        """The iBOT masks (num_images x patches, bool) of `step`; the same on every call for that step.

        Plain Python on the CPU, kept out of torch.compile: traced, its `.item()` calls and seeded
        generators break the graph at every draw and recompile on each new value until dynamo's
        recompile limit (seen on an H100 with a ViT-S: minutes of compilation before step 1)."""
        grid = tuple(self.backbone.patch_embed.dynamic_feat_size(image_size))
        return sample_masks(num_images, grid, self.cfg.mask_ratio, self.cfg.mask_probability,
                            mask_generator(self.seed, step))

    def masked_features(self, images: Tensor, masks: Tensor) -> Tensor:
        """The student's forward_features with masked patch embeddings replaced by `mask_token`."""
        backbone = self.backbone
        x = backbone.patch_embed(images)  # B x N x C, or B x h x w x C with dynamic_img_size
        x = torch.where(masks.view(*x.shape[:-1], 1), self.mask_token.to(x.dtype), x)
        x = backbone._pos_embed(x)
        x = backbone.norm_pre(x)
        x = checkpoint_seq(backbone.blocks, x) if getattr(backbone, "grad_checkpointing", False) else backbone.blocks(x)
        return backbone.norm(x)

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        global_crops, local_crops = batch["global_crops"], batch.get("local_crops")
        batch_size = batch["batch_size"]
        num_global = global_crops.shape[0] // batch_size
        prefix = self.backbone.num_prefix_tokens
        temp = self.teacher_temp(step)
        masks = self.masks(step, global_crops.shape[0], tuple(global_crops.shape[-2:])).to(global_crops.device)

        with torch.no_grad():
            tokens = self.teacher["backbone"].forward_features(global_crops)
            teacher_cls = self.teacher["dino_head"](tokens[:, 0])
            teacher_patches = self.teacher["ibot_head"](tokens[:, prefix:][masks])
            teacher_cls_probs = self.dino_loss.teacher_probabilities(teacher_cls, temp).chunk(num_global)
            teacher_patch_probs = self.ibot_loss.teacher_probabilities(teacher_patches, temp)

        tokens = self.masked_features(global_crops, masks)
        student_cls = tokens[:, 0]
        cls_per_crop = [student_cls]
        if local_crops is not None and local_crops.numel() > 0:
            cls_per_crop.append(self.backbone.forward_features(local_crops)[:, 0])
        # One head pass over all crops; chunks keep the crop order: globals first, then locals.
        student_logits = self.student["dino_head"](torch.cat(cls_per_crop))
        student_logits = student_logits.chunk(student_logits.shape[0] // batch_size)
        student_patches = self.student["ibot_head"](tokens[:, prefix:][masks])

        loss_dino = self.dino_loss(student_logits, teacher_cls_probs)
        loss_ibot = self.ibot_loss(student_patches, teacher_patch_probs, masks)
        loss_koleo = sum(self.koleo_loss(crop) for crop in student_cls.chunk(num_global))
        loss = loss_dino + self.cfg.ibot_weight * loss_ibot + self.cfg.koleo_weight * loss_koleo
        return {"loss": loss, "loss_dino": loss_dino.detach(), "loss_ibot": loss_ibot.detach(),
                "loss_koleo": loss_koleo.detach()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """teacher = m * teacher + (1 - m) * student, m on a cosine from cfg.teacher_momentum to 1."""
        m = self.momentum(step)
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            teacher.lerp_(student.detach(), 1.0 - m)
