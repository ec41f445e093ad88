"""Where does the paper's token observation appear on a CPU? (issue 15, point 4)

The paper observes in trained ViTs that the [CLS]-patch cosine similarity is clearly positive in the
residual stream before the pre-attention LayerNorm (norm1) and about 0 after it, while patch-patch
similarity stays positive. This script trains the vanilla model (`model.specialization: none`) in a
list of small settings, one trial at a time, collects the token measures every trial writes
(result.json `tokens/*`, DIR/token_interaction.json) and writes reports/token_observation.md (a
table and the finding) and reports/token_observation.png (per-block curves).

    .venv/bin/python scripts/token_observation.py                        # every setting below
    .venv/bin/python scripts/token_observation.py --only base-160 ls1-640
    .venv/bin/python scripts/token_observation.py --no-run               # report from finished runs
    .venv/bin/python scripts/token_observation.py --checkout /work/crn   # the trainer of another checkout

A finished run whose config.yaml equals the one a setting would write is reused, not rerun.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# The criterion, on the means over a stage's blocks (early: first third, late: last third).
PRE_MIN = 0.2  # [CLS]-patch cosine before norm1: "clearly positive"
POST_MAX_ABS = 0.05  # [CLS]-patch cosine after norm1: "about 0"
PATCH_PATCH_MIN = 0.2  # patch-patch cosine after norm1: "stays positive"
STAGES = ("early", "late")
UNIFORM_SPREAD = 0.1  # below it, norm1's per-channel weights are called "nearly uniform"

# The default micro setting of sweeps/component_ablation.yaml (supervised DeiT-III style, micro ViT
# 32 px / patch 4, scenes data), vanilla, seed 0, lighter evaluation: only what the table shows.
BASE: dict[str, Any] = {
    "name": "token_observation",
    "seed": 0,
    "framework": "supervised",
    "model": {"scale": "micro", "specialization": "none", "layer_scale_init": 1.0e-4},
    "data": {"dataset": "scenes", "scenes": {"num_classes": 4, "train_size": 2048, "val_size": 1024},
             "val_fraction": 0.0},
    "schedule": {"steps": 160, "batch_size": 64, "warmup_steps": 16, "checkpoint_every": 80, "log_every": 20},
    "optimizer": {"lr": 2.0e-3},
    "evaluation": {"linear": True, "knn": False, "segmentation": False, "depth": False, "token_interaction": True,
                   "probe_epochs": 10, "max_train_samples": 1024, "max_val_samples": 1024, "every_steps": 0},
    "tracking": {"enabled": False},
    "runtime": {"device": "cpu", "threads": 1},
}


def schedule(steps: int) -> dict[str, Any]:
    """`steps` with the base's warmup fraction (10%) and two checkpoints."""
    return {"schedule.steps": steps, "schedule.warmup_steps": max(1, steps // 10),
            "schedule.checkpoint_every": max(1, steps // 2)}


@dataclass(frozen=True)
class Setting:
    name: str
    why: str  # what the setting changes against the base, in words
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value


# Cheapest first. LayerScale at 1e-4 keeps every residual branch near zero for a short run, so the
# stream before norm1 is mostly the patch/[CLS] embedding; larger inits let the blocks write to it.
SETTINGS: list[Setting] = [
    Setting("base-160", "the default micro setting", schedule(160)),
    Setting("ls1-160", "LayerScale init 1.0", {**schedule(160), "model.layer_scale_init": 1.0}),
    Setting("nols-160", "no LayerScale", {**schedule(160), "model.layer_scale_init": None}),
    Setting("ls1-640", "LayerScale init 1.0, 4x the steps", {**schedule(640), "model.layer_scale_init": 1.0}),
    Setting("p8-ls1-640", "patch 8 (16 patches), LayerScale 1.0, 640 steps",
            {**schedule(640), "model.patch_size": 8, "model.layer_scale_init": 1.0}),
    Setting("p8-base-640", "patch 8 (16 patches), 640 steps", {**schedule(640), "model.patch_size": 8}),
    Setting("p8-ls1-1600", "patch 8, LayerScale 1.0, 1600 steps",
            {**schedule(1600), "model.patch_size": 8, "model.layer_scale_init": 1.0}),
    Setting("p8-ls1-1600-lr6e-3", "patch 8, LayerScale 1.0, 1600 steps, 3x the learning rate",
            {**schedule(1600), "model.patch_size": 8, "model.layer_scale_init": 1.0, "optimizer.lr": 6.0e-3}),
    Setting("dinov2-160", "DINOv2 + iBOT (ibot_weight 1.0), 160 steps",
            {**schedule(160), "framework": "dinov2"}),
    # DINOv2's separate [CLS] (DINO) and patch (iBOT) losses are the paper's main setting; patch 8
    # makes its multi-crop steps affordable on a CPU.
    Setting("dinov2-p8-ls1-640", "DINOv2 + iBOT, patch 8, LayerScale 1.0, 640 steps",
            {**schedule(640), "framework": "dinov2", "model.patch_size": 8, "model.layer_scale_init": 1.0}),
]


def build_config(setting: Setting) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    config["name"] = f"token_observation/{setting.name}"
    for key, value in setting.overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


@dataclass
class Outcome:
    setting: Setting
    config: dict[str, Any]
    result: dict[str, Any]
    curves: dict[str, Any]
    norm1_spread: list[float]  # per block; empty when the run left no checkpoint

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.get("metrics", {})

    def stage(self, stage: str) -> tuple[float, float, float]:
        m = self.metrics
        return (m[f"tokens/{stage}_cls_patch_cos_pre"], m[f"tokens/{stage}_cls_patch_cos_post"],
                m[f"tokens/{stage}_patch_patch_cos_post"])

    def holds(self, stage: str) -> bool:
        return observation_holds(*self.stage(stage))


def observation_holds(pre: float, post: float, patch_patch: float) -> bool:
    return pre >= PRE_MIN and abs(post) <= POST_MAX_ABS and patch_patch > PATCH_PATCH_MIN


# --- running ---------------------------------------------------------------------------------------


def trainer_env(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout)}


def check_trainer_location(python: str, checkout: Path) -> None:
    """The trainer the runs import must be the checkout's (PYTHONPATH could lose to an installed one)."""
    found = subprocess.run([python, "-c", "import trainer; print(trainer.__file__)"], cwd=checkout,
                           env=trainer_env(checkout), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(checkout.resolve()):
        raise SystemExit(f"error: `import trainer` finds {found}, not the checkout {checkout}: "
                         f"pass --checkout the folder whose trainer/ should run")


def run_setting(setting: Setting, runs_dir: Path, python: str, checkout: Path) -> Path:
    """Trains `setting` in runs_dir/<name> unless a finished run of the same config is there."""
    out = (runs_dir / setting.name).resolve()
    config = build_config(setting)
    config_path = out / "config.yaml"
    if config_path.is_file():
        if yaml.safe_load(config_path.read_text()) != config:
            raise SystemExit(f"error: {out} holds a run of another config for setting {setting.name}: "
                             "delete that folder or give the setting a new name")
        if _done(out):
            print(f"[{setting.name}] reusing the finished run in {out}", flush=True)
            return out
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"[{setting.name}] training: {setting.why}", flush=True)
    start = time.monotonic()
    with open(out / "stdout.log", "w") as log:
        code = subprocess.run([python, "-m", "trainer", "--config", str(config_path), "--out", str(out)],
                              cwd=checkout, env=trainer_env(checkout), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not _done(out):
        raise SystemExit(f"error: setting {setting.name} failed (exit {code}); see {out / 'stdout.log'}")
    print(f"[{setting.name}] done in {time.monotonic() - start:.0f} s", flush=True)
    return out


def _done(out: Path) -> bool:
    result = out / "result.json"
    return result.is_file() and json.loads(result.read_text()).get("status") == "done"


def collect(setting: Setting, runs_dir: Path) -> Outcome | None:
    out = runs_dir / setting.name
    if not (_done(out) and (out / "token_interaction.json").is_file()):
        return None
    return Outcome(setting, yaml.safe_load((out / "config.yaml").read_text()),
                   json.loads((out / "result.json").read_text()),
                   json.loads((out / "token_interaction.json").read_text()),
                   norm1_weight_spread(out / "checkpoint.pt"))


def norm1_weight_spread(checkpoint: Path) -> list[float]:
    """Per block, the spread of norm1's weight over channels (std / mean |weight|) in the evaluated
    backbone (DINOv2's teacher). With a uniform weight the norm only centres and rescales each token,
    which leaves a cosine between tokens nearly as it was; per-dimension weights are what can change it."""
    if not checkpoint.is_file():
        return []
    import torch  # heavy: only the report needs it, and only for this

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    prefix = "teacher.backbone." if any(k.startswith("teacher.backbone.") for k in state) else "backbone."
    spreads, block = [], 0
    while (weight := state.get(f"{prefix}blocks.{block}.norm1.weight")) is not None:
        magnitude = weight.float().abs()
        spreads.append((magnitude.std() / magnitude.mean()).item())
        block += 1
    return spreads


# --- reporting -------------------------------------------------------------------------------------


def git_version(checkout: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True).stdout.strip()

    version = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "trainer")
    return f"{version}{' (trainer/ modified)' if dirty else ''}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} logical cores (shared), Python {platform.python_version()}, "
            f"torch {importlib.metadata.version('torch')}, timm {importlib.metadata.version('timm')}")


def describe_config(config: dict[str, Any]) -> str:
    model, sched = config["model"], config["schedule"]
    patch = model.get("patch_size") or 4
    ls = model.get("layer_scale_init")
    return (f"{config['framework']}, patch {patch}, LayerScale {'off' if ls is None else f'{ls:g}'}, "
            f"batch {sched['batch_size']}, lr {config['optimizer']['lr']:g}")


def table(outcomes: list[Outcome]) -> list[str]:
    lines = ["| setting | changes | steps | early pre | early post | early patch-patch | late pre | late post | "
             "late patch-patch | norm1 weight spread, last block | linear top-1 | train s | holds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for o in outcomes:
        cells = [o.setting.name, f"{o.setting.why} ({describe_config(o.config)})", str(o.result["steps"])]
        for stage in STAGES:
            cells += [f"{v:+.3f}" for v in o.stage(stage)]
        train_s = o.result.get("wall_time_s", float("nan")) - o.result.get("eval_time_s", 0.0)
        held = [stage for stage in STAGES if o.holds(stage)]
        cells += [f"{o.norm1_spread[-1]:.3f}" if o.norm1_spread else "n/a",
                  f"{o.metrics.get('linear_top1_cls', float('nan')):.3f}", f"{train_s:.0f}",
                  ", ".join(held) if held else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def block_lines(outcomes: list[Outcome]) -> list[str]:
    """Per-block [CLS]-patch cosine before -> after norm1, so a single block meeting it is visible."""
    lines = ["| setting | " + " | ".join(f"block {i}" for i in range(len(outcomes[0].curves["norm1"]["cls_patch_cos_pre"])))
             + " |", "|---|" + "---:|" * len(outcomes[0].curves["norm1"]["cls_patch_cos_pre"])]
    for o in outcomes:
        pairs = zip(o.curves["norm1"]["cls_patch_cos_pre"], o.curves["norm1"]["cls_patch_cos_post"])
        lines.append(f"| {o.setting.name} | " + " | ".join(f"{a:+.2f} -> {b:+.2f}" for a, b in pairs) + " |")
    return lines


def summary(outcomes: list[Outcome]) -> list[str]:
    holding = [o for o in outcomes if any(o.holds(s) for s in STAGES)]
    best = max(outcomes, key=lambda o: max(o.stage(s)[0] for s in STAGES))
    best_stage = max(STAGES, key=lambda s: best.stage(s)[0])
    pre, post, pp = best.stage(best_stage)
    lines = [f"Largest [CLS]-patch cosine before norm1: {best.setting.name}, {best_stage} blocks: {pre:+.3f} before, "
             f"{post:+.3f} after, patch-patch {pp:+.3f}."]
    if holding:
        cheapest = min(holding, key=lambda o: o.result.get("wall_time_s", float("inf")))
        stages = [s for s in STAGES if cheapest.holds(s)]
        lines.append(f"The observation holds (by the criterion) in {len(holding)} of {len(outcomes)} settings; the "
                     f"cheapest is **{cheapest.setting.name}** ({cheapest.setting.why}; {', '.join(stages)} blocks).")
    else:
        lines.append(f"The observation holds (by the criterion) in **none** of the {len(outcomes)} settings.")
    positive = [o.setting.name for o in outcomes if any(o.stage(s)[0] >= PRE_MIN for s in STAGES)]
    lines.append(f"[CLS]-patch cosine before norm1 >= {PRE_MIN} in a stage: "
                 f"{', '.join(positive) if positive else 'no setting'}.")
    drop, where = max((pre - post, f"{o.setting.name} block {i}") for o in outcomes
                      for i, (pre, post) in enumerate(zip(o.curves["norm1"]["cls_patch_cos_pre"], o.curves["norm1"]["cls_patch_cos_post"])))
    lines.append(f"What norm1 does to it: the largest drop from before to after norm1 in any block of any setting is "
                 f"{drop:+.3f} ({where}).")
    spreads = [x for o in outcomes for x in o.norm1_spread]
    if spreads:
        uniform = "stays nearly uniform over channels" if max(spreads) < UNIFORM_SPREAD else "varies over channels"
        lines.append(f"norm1's weight {uniform}: its spread (std / mean |weight|) is "
                     f"{min(spreads):.3f} to {max(spreads):.3f} across blocks and settings.")
    return [f"- {line}" for line in lines]


def plot(outcomes: list[Outcome], out_png: Path) -> Path:
    # A bare Figure (no pyplot): renders with Agg without touching a global backend.
    from matplotlib.figure import Figure

    columns = min(4, len(outcomes))
    rows = -(-len(outcomes) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
    for ax, o in zip(axes.flat, outcomes):
        blocks = range(len(o.curves["norm1"]["cls_patch_cos_pre"]))
        ax.plot(blocks, o.curves["norm1"]["cls_patch_cos_pre"], "o-", label="[CLS]-patch, before norm1")
        ax.plot(blocks, o.curves["norm1"]["cls_patch_cos_post"], "o-", label="[CLS]-patch, after norm1")
        ax.plot(blocks, o.curves["norm1"]["patch_patch_cos_pre"], "s--", label="patch-patch, before norm1")
        ax.plot(blocks, o.curves["norm1"]["patch_patch_cos_post"], "s--", label="patch-patch, after norm1")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.axhspan(-POST_MAX_ABS, POST_MAX_ABS, color="grey", alpha=0.15, linewidth=0)
        ax.axhline(PRE_MIN, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{o.setting.name} ({o.result['steps']} steps)", fontsize=10)
        ax.set_xlabel("block")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean cosine similarity")
    for ax in list(axes.flat)[len(outcomes):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    return out_png


def write_report(outcomes: list[Outcome], report: Path, png: Path, checkout: Path, notes: str | None) -> None:
    num_images = outcomes[0].curves["num_images"]
    lines = [
        "# Where does the paper's token observation appear on a CPU?",
        "",
        f"Machine: {machine()}. Date: {dt.date.today().isoformat()}. Trainer code version: "
        f"{git_version(checkout)} (checkout {checkout}). Produced by `scripts/token_observation.py`.",
        "",
        "The paper observes, in trained ViTs, that the [CLS]-patch cosine similarity is clearly positive before the "
        "pre-attention LayerNorm (norm1) and about 0 after it, while patch-patch similarity stays positive. Each row "
        "trains the vanilla micro ViT (specialization `none`, seed 0, scenes data, 2,048 training images) and "
        f"measures the cosines on {num_images} validation images, averaged over the early (first third) and late (last "
        "third) blocks. **Criterion**: the observation holds in a stage when [CLS]-patch before norm1 >= "
        f"{PRE_MIN}, |[CLS]-patch after norm1| <= {POST_MAX_ABS} and patch-patch after norm1 > {PATCH_PATCH_MIN}.",
        "",
        "## Finding",
        "",
        *summary(outcomes),
        *(["", notes.strip()] if notes else []),
        "",
        "## Settings",
        "",
        *table(outcomes),
        "",
        "Per block, [CLS]-patch cosine before -> after norm1:",
        "",
        *block_lines(outcomes),
        "",
        f"![per-block cosines]({os.path.relpath(png, report.parent)})",
        "",
        "Norm1 weight spread: std / mean of |norm1.weight| over channels in the last block (0 at init). "
        "Train s: the trial's wall time minus its evaluation, one thread, on a machine shared with other jobs "
        "(indicative only). Linear top-1: linear probe on the [CLS] token, 1,024 validation scenes.",
        "",
    ]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run and report only these settings")
    parser.add_argument("--no-run", action="store_true", help="report the finished runs only; train nothing")
    parser.add_argument("--checkout", type=Path, default=REPO, help="the folder whose trainer/ runs (default: this repo)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the trainer")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "token_observation")
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "token_observation.md")
    parser.add_argument("--plot", nargs="+", metavar="NAME", help="settings whose curves the PNG shows (default: all)")
    parser.add_argument("--notes", type=Path, default=REPO / "reports" / "token_observation_notes.md",
                        help="a markdown file whose text goes under the finding (skipped when absent)")
    args = parser.parse_args(argv)

    known = {s.name: s for s in SETTINGS}
    unknown = sorted((set(args.only or []) | set(args.plot or [])) - set(known))
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    settings = [known[name] for name in args.only] if args.only else SETTINGS
    checkout = args.checkout.resolve()
    if not args.no_run:
        check_trainer_location(args.python, checkout)
        for setting in settings:
            run_setting(setting, args.runs_dir, args.python, checkout)
    outcomes = [o for s in settings if (o := collect(s, args.runs_dir)) is not None]
    if not outcomes:
        print(f"error: no finished runs of these settings in {args.runs_dir}", file=sys.stderr)
        return 1
    missing = sorted({s.name for s in settings} - {o.setting.name for o in outcomes})
    if missing:
        print(f"note: no finished run yet for {', '.join(missing)}; left out of the report", file=sys.stderr)
    shown = [o for o in outcomes if not args.plot or o.setting.name in args.plot]
    png = plot(shown or outcomes, args.report.with_suffix(".png"))
    write_report(outcomes, args.report, png, checkout, args.notes.read_text() if args.notes and args.notes.is_file() else None)
    print(f"wrote {args.report} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
