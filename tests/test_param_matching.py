"""The parameter-matched control: a vanilla ViT widened to a specialized model's parameter count."""

from __future__ import annotations

import pytest
import timm

import trainer.models as tm
from trainer.models.matching import count_parameters, match_vanilla_parameters


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", ["paper", "all", "qkv@first_third"])
def test_the_match_is_the_closest_mlp_width_and_its_count_is_real(spec):
    kwargs = dict(num_classes=0, reg_tokens=1)
    match = match_vanilla_parameters("micro", spec, **kwargs)
    specialized = _params(timm.create_model(tm.MODEL_NAMES["micro"], specialization=spec, **kwargs))
    vanilla = timm.create_model(tm.MODEL_NAMES["micro"], specialization="none", mlp_ratio=match.mlp_ratio, **kwargs)
    assert match.target == specialized
    assert _params(vanilla) == match.params
    assert all(block.mlp.fc1.out_features == match.hidden for block in vanilla.blocks)
    # One more or one fewer hidden unit per block moves the count by 2 * 64 + 1 per block + ...: the
    # match is the closest, so it is within half a step of the target.
    step = count_parameters("micro", mlp_ratio=(match.hidden + 1.5) / 64, **kwargs) - match.params
    assert step == 6 * (2 * 64 + 1)  # fc1 weight row + bias, fc2 weight column, in 6 blocks
    assert abs(match.residual) <= step / 2
    assert match.hidden > 256  # wider than the default MLP (ratio 4): specialization added parameters


def test_the_match_at_vit_b_is_within_a_thousandth():
    match = match_vanilla_parameters("base", "paper", num_classes=0)
    assert abs(match.residual) / match.target < 1e-3
    assert match.params == count_parameters("base", num_classes=0, mlp_ratio=match.mlp_ratio)


def test_matching_vanilla_is_vanilla():
    match = match_vanilla_parameters("micro", "none", num_classes=0)
    assert match.hidden == 256 and match.residual == 0


def test_a_trial_config_asks_for_the_parameter_matched_control():
    from trainer.config import ConfigError, TrialConfig, parse_config
    from trainer.loop import backbone_factory

    def backbone(**model):
        return backbone_factory(TrialConfig.model_validate({"model": {"scale": "micro", **model}}))()

    matched, paper = backbone(match_params_of="paper"), backbone(specialization="paper")
    assert matched.specialization.is_vanilla
    assert abs(_params(matched) - _params(paper)) <= 6 * (2 * 64 + 1) / 2
    assert _params(matched) > _params(backbone())
    for bad, key in (({"match_params_of": "paper", "specialization": "norms"}, "model.match_params_of"),
                     ({"match_params_of": "paper", "mlp_ratio": 5.0}, "model.mlp_ratio"),
                     ({"embed_dim": 66}, "model.embed_dim")):
        with pytest.raises(ConfigError, match=key):
            parse_config({"model": {"scale": "micro", **bad}}, "test")
    assert backbone(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0).blocks[1].mlp.fc1.out_features == 64
