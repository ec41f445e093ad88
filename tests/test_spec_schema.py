"""The typed spec: backend settings per kind, the Slurm cluster profile loaded with the spec, and
the spec package's place in the import graph (no torch, nothing that imports it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import (
    LocalBackendSpec,
    LocalOptions,
    Profile,
    RayBackendSpec,
    ResourcesSpec,
    SlurmBackendSpec,
    SpecError,
    load_profile,
    load_spec,
)
from orchestrator.spec.profiles import BUILTIN_RESOURCES, PROFILE_ENV, PROFILE_RESOURCE_OF

REPO = Path(__file__).resolve().parents[1]

SPEC = """
name: typed
axes:
  specialization: {key: model.specialization, values: {none: none, paper: paper}}
"""


def load(tmp_path: Path, backend: str = "", overrides: tuple[str, ...] = ()):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(SPEC) + textwrap.dedent(backend))
    return load_spec(path, overrides)


def test_no_backend_section_is_a_local_backend_with_defaults(tmp_path):
    backend = load(tmp_path).backend
    assert backend == LocalBackendSpec() and isinstance(backend.options, LocalOptions)
    assert (backend.max_parallel, backend.retries, backend.resources) == (1, 2, ResourcesSpec())
    assert backend.resources.model_fields_set == set() and backend.options.model_fields_set == set()


def test_each_kind_gets_its_own_model_with_only_the_written_keys_set(tmp_path):
    ray = load(tmp_path, "backend: {kind: ray, num_cpus: 2, options: {address: auto}, resources: {mem_gb: 8}}\n").backend
    assert isinstance(ray, RayBackendSpec)
    assert (ray.options.num_cpus, ray.options.address, ray.resources.mem_gb) == (2, "auto", 8)
    assert ray.options.model_fields_set == {"num_cpus", "address"}
    assert ray.resources.model_fields_set == {"mem_gb"}


def test_slurm_loads_its_cluster_profile_with_the_spec(tmp_path):
    slurm = load(tmp_path, "backend: {kind: slurm, options: {profile: local, partition: gpu}}\n").backend
    assert isinstance(slurm, SlurmBackendSpec) and isinstance(slurm.profile, Profile)
    assert (slurm.profile.name, slurm.profile.partition, slurm.options.partition) == ("local", "debug", "gpu")
    assert slurm.options.model_fields_set == {"profile", "partition"}
    assert slurm.profile.resources_for("tiny")["cpus"] == 2


def test_slurm_profile_defaults_to_the_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert load(tmp_path, "backend: {kind: slurm}\n").backend.profile.name == "default"
    monkeypatch.setenv(PROFILE_ENV, "example_a100")
    assert load(tmp_path, "backend: {kind: slurm}\n").backend.profile.name == "example_a100"
    monkeypatch.setenv(PROFILE_ENV, "nowhere")
    with pytest.raises(SpecError, match=r"spec.yaml: backend.options.profile: no cluster profile 'nowhere' "
                                        rf"\(named by \${PROFILE_ENV}; "):
        load(tmp_path, "backend: {kind: slurm}\n")


def test_a_missing_profile_set_on_the_command_line_is_blamed_on_the_override(tmp_path):
    with pytest.raises(SpecError) as caught:
        load(tmp_path, overrides=("backend.kind=slurm", "backend.options.profile=nowhere"))
    (error,) = caught.value.errors
    assert error.startswith(f"{tmp_path / 'spec.yaml'}: backend.options.profile: no cluster profile 'nowhere'")
    assert error.endswith("(from --set backend.options.profile=nowhere)")


def test_overrides_reach_the_typed_backend(tmp_path):
    backend = load(tmp_path, overrides=(
        "backend.kind=slurm", "backend.max_parallel=4", "backend.options.account=proj",
        "backend.resources.gpus_per_trial=8", "backend.options.profile=slurm/profiles/local.yaml",
    )).backend
    assert isinstance(backend, SlurmBackendSpec) and backend.max_parallel == 4
    assert (backend.options.account, backend.resources.gpus_per_trial) == ("proj", 8)
    assert backend.resources.model_fields_set == {"gpus_per_trial"}
    assert backend.profile.path == str(REPO / "slurm" / "profiles" / "local.yaml")


def test_load_profile_reports_every_problem_of_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"partiton": "gpu", "scales": {"base": {"gpu": 8}}, "defaults": {"cpus": -1}}))
    with pytest.raises(SpecError) as caught:
        load_profile(bad)
    assert caught.value.errors == [
        f"{bad}: partiton: unknown key; allowed: account, array_parallelism, constraint, defaults, description, device, "
        "env, max_num_timeout, name, partition, poll_max_s, poll_min_s, python, qos, sbatch, scales, setup, "
        "signal_delay_s, stop_timeout_s",
        f"{bad}: defaults.cpus: expected a number >= 0, got -1",
        f"{bad}: scales.base.gpu: unknown resource; allowed: cpus, gpus, mem_gb, time_min, nodes, tasks_per_node",
    ]
    with pytest.raises(SpecError, match="backend.options.profile: no cluster profile 'nope'"):
        load_profile("nope")


def test_builtin_profile_resources_are_the_spec_resource_defaults():
    defaults = ResourcesSpec().model_dump()
    assert BUILTIN_RESOURCES == {PROFILE_RESOURCE_OF[key]: value for key, value in defaults.items()}
    assert Profile().resources_for("base") == BUILTIN_RESOURCES


def test_the_spec_package_imports_neither_torch_nor_its_importers():
    code = ("import sys, orchestrator.spec; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('orchestrator.search', "
            "'orchestrator.backends', 'orchestrator.runner', 'orchestrator.tracking', 'orchestrator.report'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
