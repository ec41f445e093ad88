"""The built-in "scenes" dataset: procedurally generated images with classification, segmentation
and depth targets, so every evaluation can run on a CPU without downloading anything.

A scene is a textured background plus 2-5 textured objects drawn far-to-near (painter's algorithm).
Each of the C object categories has its own shape, texture pattern and hue; every instance varies
in size, aspect, rotation, hue, saturation, brightness and texture phase, so no single pixel decides
the category. Nearer objects are drawn larger (perspective), so size is a depth cue.

Targets of a sample:
- `label`: the category covering the largest visible area (ties: the lowest category). It is a
  global property: one patch shows at most a few objects and cannot tell which category wins.
- `segmentation`: 0 = background, 1..C = category of the visible object.
- `depth`: 1.0 for the background, the object's own depth in (0.2, 0.95) where it is visible.

Generation is vectorized over chunks of `CHUNK` images with a torch.Generator seeded from
(seed, chunk index), so the content of image i depends only on (seed, image size, C, i), never on
the order of access. Chunks are generated on first use and cached as uint8: the image plus an
instance map (0 = background, k = k-th object); segmentation and depth are looked up per item from
small per-image tables, which keeps 224 px datasets at 4 bytes per pixel.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.utils.data import Dataset

CHUNK = 256  # images generated together; part of the dataset's definition (changes content)
MAX_OBJECTS = 5
MIN_OBJECTS = 2
BACKGROUND_DEPTH = 1.0
NUM_SHAPES = 8
NUM_TEXTURES = 5


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (ints, strings): same parts, same seed, on any machine.

    Python's hash() is salted per process for strings, so it cannot be used for reproducibility.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dominant_category(segmentation: torch.Tensor) -> int:
    """The object category (1..C) with the largest visible area, minus one; ties -> lowest.

    Returns -1 when no object is visible.
    """
    counts = torch.bincount(segmentation.flatten().long())
    if counts.numel() <= 1 or counts[1:].sum() == 0:
        return -1
    return int(counts[1:].argmax())  # argmax returns the first maximum: deterministic ties


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorized HSV (all in [0, 1]) -> RGB in [0, 1], stacked on a new last dimension."""
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6.0) % 6.0
        channels.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, dim=-1)


def _shape_mask(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-test of a shape in the object's unit frame (before area normalization)."""
    r2 = u * u + v * v
    if shape == 0:  # disk
        return r2 <= 1.0
    if shape == 1:  # square
        return torch.maximum(u.abs(), v.abs()) <= 0.8
    if shape == 2:  # triangle (pointing "up" in the object frame)
        return (v >= -0.6) & (v <= 1.1 - 1.9 * u.abs())
    if shape == 3:  # ring
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == 4:  # plus / cross
        return ((u.abs() <= 0.35) & (v.abs() <= 1.0)) | ((v.abs() <= 0.35) & (u.abs() <= 1.0))
    if shape == 5:  # diamond
        return u.abs() + v.abs() <= 1.1
    if shape == 6:  # half disk
        return (r2 <= 1.1) & (v >= -0.25)
    return u * u + (v / 0.5) ** 2 <= 1.2  # 7: elongated ellipse


def _shape_area(shape: int, resolution: int = 512) -> float:
    """Area of a shape in its unit frame, measured on a grid over [-1.5, 1.5]^2."""
    c = (torch.arange(resolution) + 0.5) / resolution * 3.0 - 1.5
    u, v = c.view(1, -1).expand(resolution, resolution), c.view(-1, 1).expand(resolution, resolution)
    return _shape_mask(shape, u, v).float().mean().item() * 9.0


# Coordinates are multiplied by these so that every shape covers the same area (that of a disk of
# radius 0.9): otherwise the label "largest visible category" would mostly encode the shape's size.
SHAPE_SCALE = [math.sqrt(_shape_area(s) / (math.pi * 0.81)) for s in range(NUM_SHAPES)]


def _texture(texture: int, u: torch.Tensor, v: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """A pattern in [0, 1] in the object's frame; `freq`/`phase` broadcast per image."""
    a, b = freq * u * math.pi + phase, freq * v * math.pi + phase
    if texture == 0:  # smooth shading across the object
        return 0.5 + 0.5 * torch.tanh(u + v)
    if texture == 1:  # stripes
        return 0.5 + 0.5 * torch.sin(a)
    if texture == 2:  # checkerboard
        return (torch.sin(a) * torch.sin(b) > 0).float()
    if texture == 3:  # dots
        return (torch.cos(a) * torch.cos(b) > 0.35).float()
    return 0.5 + 0.5 * torch.cos(freq * math.pi * torch.sqrt(u * u + v * v) + phase)  # 4: rings


def _affine(xs: torch.Tensor, ys: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ax * x + ay * y + b per image, for xs (1, 1, W) and ys (1, H, 1): one full-size add only."""
    return (xs * ax[:, None, None] + b[:, None, None]) + ys * ay[:, None, None]


def _background(gen: torch.Generator, n: int, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greyish random colours (n, 3) and shading (n, H, W): random-phase stripes + smooth noise."""
    height, width = ys.shape[1], xs.shape[2]
    colour = hsv_to_rgb(_uniform(gen, (n,), 0, 1), _uniform(gen, (n,), 0.0, 0.5), _uniform(gen, (n,), 0.3, 0.75))
    theta = _uniform(gen, (n,), 0, math.pi)
    freq = _uniform(gen, (n,), 2.0, 8.0) * 2 * math.pi
    phase = _uniform(gen, (n,), 0, 2 * math.pi)
    amplitude = _uniform(gen, (n, 1, 1), 0.05, 0.25)
    stripes = amplitude * torch.sin(_affine(xs, ys, freq * torch.cos(theta), freq * torch.sin(theta), phase))
    coarse = torch.randn((n, 1, 4, 4), generator=gen) * 0.12
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[:, 0]
    return colour, 1.0 + stripes + smooth


def generate_scenes(n: int, image_size: int, num_classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Generate `n` scenes. Returns dict(
        image uint8 (n, 3, H, W), instance uint8 (n, H, W) (0 = background, k = k-th object from far),
        category long (n, MAX_OBJECTS + 1) (category + 1 per instance id, 0 for background/unused),
        depth float32 (n, MAX_OBJECTS + 1) (depth per instance id, BACKGROUND_DEPTH for background),
        label long (n,) (dominant visible category)).

    Speed: each object's frame (u, v) is an affine function of (x, y), computed by broadcasting a
    row and a column; each image evaluates only its own object's shape and texture; colours are
    composed once at the end from the instance map and a per-pixel shading.
    """
    h = w = image_size
    coords = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs, ys = coords.view(1, 1, w), coords.view(1, h, 1)
    background_rgb, shade = _background(gen, n, xs, ys)
    instance = torch.zeros((n, h, w), dtype=torch.uint8)

    # Per-object parameters, (n, MAX_OBJECTS); unused slots are drawn nowhere.
    k = MAX_OBJECTS
    count = torch.randint(MIN_OBJECTS, MAX_OBJECTS + 1, (n, 1), generator=gen)
    active = torch.arange(k).view(1, k) < count
    category = torch.randint(0, num_classes, (n, k), generator=gen)
    depth = _uniform(gen, (n, k), 0.2, 0.95)
    depth = torch.where(active, depth, torch.full_like(depth, 2.0))  # unused slots sort first
    depth, order = depth.sort(dim=1, descending=True)  # painter's algorithm: far to near
    active, category = active.gather(1, order), category.gather(1, order)

    nearness = (0.95 - depth).clamp(min=0) / 0.75  # 0 (far) .. 1 (near)
    radius = _uniform(gen, (n, k), 0.10, 0.15) * (0.75 + 1.0 * nearness)
    aspect = torch.exp(_uniform(gen, (n, k), -0.25, 0.25))
    centre_x, centre_y = _uniform(gen, (n, k), 0.12, 0.88), _uniform(gen, (n, k), 0.12, 0.88)
    rotation = _uniform(gen, (n, k), 0, 2 * math.pi)
    # Colour: the category's hue plus per-instance jitter that stays inside its own sector.
    hue = (category.float() + _uniform(gen, (n, k), -0.45, 0.45)) / num_classes % 1.0
    object_rgb = hsv_to_rgb(hue, _uniform(gen, (n, k), 0.4, 0.95), _uniform(gen, (n, k), 0.55, 1.0))
    texture_freq = _uniform(gen, (n, k), 2.5, 4.0) + (category % 3).float()
    texture_phase = _uniform(gen, (n, k), 0, 2 * math.pi)
    shape_of = category % NUM_SHAPES
    texture_of = (category + category // NUM_SHAPES) % NUM_TEXTURES
    scale = torch.tensor(SHAPE_SCALE)[shape_of]

    # u = R(rotation) (x - centre) / (radius * aspect), v likewise with radius / aspect.
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    su, sv = scale / (radius * aspect), scale * aspect / radius
    ux, uy = cos * su, sin * su
    vx, vy = -sin * sv, cos * sv
    u0, v0 = -(ux * centre_x + uy * centre_y), -(vx * centre_x + vy * centre_y)

    for slot in range(k):
        for shape in range(NUM_SHAPES):
            idx = (active[:, slot] & (shape_of[:, slot] == shape)).nonzero().flatten()
            if idx.numel() == 0:
                continue
            u = _affine(xs, ys, ux[idx, slot], uy[idx, slot], u0[idx, slot])
            v = _affine(xs, ys, vx[idx, slot], vy[idx, slot], v0[idx, slot])
            mask = _shape_mask(shape, u, v)
            # Categories sharing a shape (C > 8) differ in texture: split the group by texture.
            for texture in texture_of[idx, slot].unique().tolist():
                sub = (texture_of[idx, slot] == texture).nonzero().flatten()
                f, p = texture_freq[idx[sub], slot, None, None], texture_phase[idx[sub], slot, None, None]
                pattern = 0.6 + 0.4 * _texture(texture, u[sub], v[sub], f, p)
                m = mask[sub]
                shade[idx[sub]] = torch.where(m, pattern, shade[idx[sub]])
                instance[idx[sub]] = torch.where(m, slot + 1, instance[idx[sub]]).to(torch.uint8)

    # Colour per pixel from its instance (0 = background), times its shading, plus sensor noise.
    colour_table = torch.cat([background_rgb[:, None], object_rgb], dim=1)  # (n, k + 1, 3)
    flat = instance.view(n, -1, 1).long().expand(-1, -1, 3)
    rgb = colour_table.gather(1, flat).view(n, h, w, 3).permute(0, 3, 1, 2) * shade[:, None]
    rgb = rgb + torch.randn(rgb.shape, generator=gen) * 0.02
    image = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()

    zero = torch.zeros((n, 1), dtype=torch.long)
    category_table = torch.cat([zero, torch.where(active, category + 1, zero)], dim=1)
    depth_table = torch.cat([torch.full((n, 1), BACKGROUND_DEPTH), torch.where(active, depth, 0.0)], dim=1)
    segmentation = category_table.gather(1, instance.view(n, -1).long())
    area = torch.zeros((n, num_classes + 1)).scatter_add_(1, segmentation, torch.ones(segmentation.shape))
    label = area[:, 1:].argmax(dim=1)  # first maximum on ties: the lowest category
    return dict(image=image, instance=instance, category=category_table, depth=depth_table.float(), label=label)


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class ScenesDataset(Dataset):
    """`size` generated scenes; items are dicts with image (uint8 3xHxW), label (int),
    segmentation (long HxW, 0 = background, 1..C) and depth (float32 HxW).

    Chunks are generated on first access and kept; call `materialize()` to generate all of them
    up front (e.g. before DataLoader workers fork, so they share the cache).
    """

    def __init__(self, size: int, image_size: int = 32, num_classes: int = 4, seed: int = 0):
        if num_classes < 2:
            raise ValueError(f"scenes need at least 2 categories, got {num_classes}")
        self.size, self.image_size, self.num_classes, self.seed = size, image_size, num_classes, seed
        self._chunks: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.size

    def _chunk(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._chunks:
            gen = torch.Generator().manual_seed(derive_seed("scenes", self.seed, index))
            n = min(CHUNK, self.size - index * CHUNK)
            self._chunks[index] = generate_scenes(n, self.image_size, self.num_classes, gen)
        return self._chunks[index]

    def materialize(self) -> "ScenesDataset":
        for index in range(math.ceil(self.size / CHUNK)):
            self._chunk(index)
        return self

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"scene {i} out of range for {self.size} scenes")
        chunk, j = self._chunk(i // CHUNK), i % CHUNK
        instance = chunk["instance"][j].long()
        return dict(
            image=chunk["image"][j],  # a view of the cache: transforms must not work in place
            label=int(chunk["label"][j]),
            segmentation=chunk["category"][j][instance],
            depth=chunk["depth"][j][instance],
        )


def scenes_split(split: str, size: int, image_size: int, num_classes: int, seed: int) -> ScenesDataset:
    """The `train` or `val` split: seeds derived from (seed, split), so the splits never share a scene."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown scenes split {split!r}; expected 'train' or 'val'")
    return ScenesDataset(size, image_size=image_size, num_classes=num_classes, seed=derive_seed(seed, split))
