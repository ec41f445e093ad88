"""`python -m trainer --config trial.yaml --out DIR`: train, evaluate and leave results in DIR.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="trial config YAML (default: all defaults)")
    parser.add_argument("--out", type=Path, required=True, help="output folder; an existing one is resumed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.specialization=paper (repeatable)")
    args = parser.parse_args(argv)
    try:
        data = read_config_data(args.config) if args.config else {}
        cfg = parse_config(apply_overrides(data, args.overrides), str(args.config or "--set"))
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
