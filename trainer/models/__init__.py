"""The specialized ViT. Importing this package registers its models with timm."""

from trainer.models.accounting import ParameterReport, count_flops, count_kernel_ops, parameter_report
from trainer.models.convert import (
    CheckpointMismatch, ConversionReport, load_vanilla_checkpoint, read_checkpoint, specialize_state_dict,
)
from trainer.models.matching import ParameterMatch, count_parameters, match_vanilla_parameters
from trainer.models.specialized_vit import SpecializedVisionTransformer
from trainer.scales import MODEL_NAMES, SCALES, vanilla_counterpart
from trainer.specialization import PRESETS, Specialization, SpecializationError

__all__ = [
    "MODEL_NAMES", "PRESETS", "SCALES", "CheckpointMismatch", "ConversionReport", "ParameterMatch",
    "ParameterReport", "Specialization", "count_parameters", "match_vanilla_parameters",
    "SpecializationError", "SpecializedVisionTransformer", "count_flops", "count_kernel_ops",
    "load_vanilla_checkpoint", "parameter_report", "read_checkpoint", "specialize_state_dict",
    "vanilla_counterpart",
]
