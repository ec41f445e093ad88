"""Every spec in tests/malformed_specs/ must be refused with a message that says where and why.

Each file states its own expectation in its leading comments:

    # expect: <substring of one error line>
    # at: <the key path (or `line N`, `--set KEY`) that same line names>
    # set: key=value          (optional, repeatable: --set overrides applied while loading)
    # check: files            (optional: refused by the check `run` adds, the files each trial reads)

`expect`/`at` pairs may repeat: a spec with several problems must report all of them at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import SpecError, load_spec
from orchestrator.spec.validation import check_trial_files

CORPUS = Path(__file__).parent / "malformed_specs"
SPECS = sorted(CORPUS.glob("*.yaml"))


def read_expectations(path: Path) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    expects, ats, sets, checks = [], [], [], []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        tag, _, value = line[1:].strip().partition(":")
        {"expect": expects, "at": ats, "set": sets, "check": checks}.get(tag.strip(), []).append(value.strip())
    return list(zip(expects, ats, strict=True)), sets, checks


def test_the_corpus_is_large_enough_and_self_describing():
    assert len(SPECS) >= 25
    for path in SPECS:
        assert path.read_text().startswith("# expect: "), f"{path.name}: first line must be `# expect: ...`"
        pairs, _, _ = read_expectations(path)
        assert pairs, f"{path.name}: needs `# expect:` and `# at:` lines"


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_malformed_spec_is_refused_with_file_key_path_and_reason(path: Path, monkeypatch):
    monkeypatch.chdir(CORPUS.parent.parent)  # relative paths in the corpus are relative to the repo
    pairs, overrides, checks = read_expectations(path)
    with pytest.raises(SpecError) as caught:
        spec = load_spec(path, overrides)
        if "files" in checks:
            check_trial_files(spec)
    errors = caught.value.errors
    assert errors and str(caught.value) == "\n".join(errors)
    for expected, key_path in pairs:
        # One line carries all three: `FILE: KEY.PATH: ... expected ...` (or `FILE: line N, column M: ...`).
        where = f"{path}: {key_path}"
        matching = [e for e in errors if e.startswith(where) and e[len(where)] in ":," and expected in e]
        assert matching, f"no error names {path}, {key_path!r} and {expected!r}; got:\n" + "\n".join(errors)
