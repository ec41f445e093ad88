"""`python -m trainer --config trial.yaml --out DIR`: train, evaluate and leave results in DIR.
`python -m trainer analyze --checkpoint PATH --out DIR`: evaluate a checkpoint without training.

Exit codes (trainer.contract): 0 done (or already done), 1 failed (DIR/result.json says why),
2 bad config or unusable --out, 75 stopped by a signal after a checkpoint (run the same command
again to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from trainer.config import ConfigError, parse_config, read_config_data
from trainer.contract import EXIT_BAD_CONFIG, EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED
from trainer.loop import Interrupted, Trial
from trainer.out_dir import UnusableOutDir
from trainer.yaml_guard import YamlGuardError, safe_load


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set schedule.steps=50")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        try:
            node[leaf] = safe_load(raw)
        except (YamlGuardError, yaml.YAMLError) as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {str(err).splitlines()[0]}") from None
    return data


ANALYZE = "analyze"
# What `analyze` sets on top of the config: no training, the checkpoint as the model's weights.
ANALYZE_OVERRIDES = ("schedule.steps=0", "schedule.warmup_steps=0", "evaluation.every_steps=0")


def _parser(analyze: bool) -> argparse.ArgumentParser:
    if analyze:
        parser = argparse.ArgumentParser(
            prog="python -m trainer analyze", description=(
                "Evaluate a checkpoint without training: the token-interaction analysis and the frozen "
                "probes of a trial, written to --out as a trial writes them (result.json, "
                "token_interaction.json/.png). The model's architecture comes from --config / --set "
                "(e.g. --set model.scale=small --set model.patch_size=14); the checkpoint is loaded as "
                "model.pretrained (vanilla timm, DINOv2, DeiT-III or this trainer's own checkpoint.pt)."))
        parser.add_argument("--checkpoint", type=Path, required=True, help="the weights to analyze")
    else:
        parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog="python -m trainer analyze --help: evaluate a checkpoint without training")
    parser.add_argument("--config", type=Path, help="trial config YAML (default: all defaults)")
    parser.add_argument("--out", type=Path, required=True, help="output folder; an existing one is resumed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.specialization=paper (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    analyze = bool(argv) and argv[0] == ANALYZE
    args = _parser(analyze).parse_args(argv[1:] if analyze else argv)
    overrides = list(args.overrides) + (list(ANALYZE_OVERRIDES) if analyze else [])
    try:
        data = apply_overrides(read_config_data(args.config) if args.config else {}, overrides)
        if analyze:
            data.setdefault("model", {})["pretrained"] = str(args.checkpoint)
        cfg = parse_config(data, str(args.config or "--set"))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    def log(message: str) -> None:
        print(f"[{cfg.name}] {message}", flush=True)

    try:
        result = Trial(cfg, args.out, log=log).run()
    except Interrupted:
        return EXIT_INTERRUPTED
    except UnusableOutDir as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return EXIT_DONE if (result is None or result.done) else EXIT_FAILED
