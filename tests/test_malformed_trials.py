"""Every trial config in tests/malformed_trials/ must be refused by `python -m trainer` with exit 2,
before anything is written, naming the file, the key path and the fix.

Each file states its expectation in its leading comments (as tests/malformed_specs/ does):

    # expect: <substring of one error line>
    # at: <the key path that line names (`  - KEY.PATH: ...`), or `line N`>

Relative paths in the corpus are relative to the repository root, where the trainer runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_malformed_specs import read_expectations
from trainer.cli import main
from trainer.contract import EXIT_BAD_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "malformed_trials"
TRIALS = sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_is_large_enough_and_self_describing():
    assert len(TRIALS) >= 15
    for path in TRIALS:
        assert path.read_text().startswith("# expect: "), f"{path.name}: first line must be `# expect: ...`"
        pairs, _, _ = read_expectations(path)
        assert pairs, f"{path.name}: needs `# expect:` and `# at:` lines"


def names_key_and_reason(stderr: str, source: str, key_path: str, expected: str) -> bool:
    lines = stderr.splitlines()
    if not lines or not lines[0].startswith(f"error: {source}: "):
        return False
    if key_path.startswith("line "):
        return any(expected in line and f"({key_path})" in line for line in lines)
    return any(line.startswith(f"  - {key_path}: ") and expected in line for line in lines[1:])


@pytest.mark.parametrize("path", TRIALS, ids=[p.stem for p in TRIALS])
def test_malformed_trial_is_refused_before_anything_is_written(path: Path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    source = str(path.relative_to(ROOT))
    out = tmp_path / "out"
    assert main(["--config", source, "--out", str(out)]) == EXIT_BAD_CONFIG
    assert not out.exists()
    stderr = capsys.readouterr().err
    for expected, key_path in read_expectations(path)[0]:
        assert names_key_and_reason(stderr, source, key_path, expected), \
            f"no error names {source}, {key_path!r} and {expected!r}; got:\n{stderr}"


def test_the_trainer_process_exits_2_with_one_error_block(tmp_path):
    path = CORPUS / "01_block_list_beyond_depth.yaml"
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_CONFIG
    assert proc.stderr.startswith(f"error: {path}: 1 invalid setting(s)\n  - model.specialization: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
