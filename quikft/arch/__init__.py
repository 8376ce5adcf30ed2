"""The architecture adapter (:mod:`quikft.arch.adapter`) and routed experts (:mod:`quikft.arch.experts`).

The only package that knows model families; everything else asks it where the blocks, the
quantizable projections, the experts and the head are.
"""

from quikft.arch.adapter import (
    FAMILY_OVERRIDES,
    FamilyOverride,
    ModelLayout,
    UnsupportedArchitectureError,
    as_linear,
    check_supported,
    decoder_hidden,
    dims_of,
    experts_names,
    fuse_all_experts,
    head_is_tied,
    head_name,
    head_path_matches,
    is_projection,
    layout,
    logits_from_hidden,
    mark_quantized,
    prepare,
    selected,
    unfuse_all_experts,
    unfuse_listed_experts,
    untie_head,
    weight_of,
)
from quikft.arch.experts import RoutedExperts, route_all_tokens

__all__ = [
    "FAMILY_OVERRIDES", "FamilyOverride", "ModelLayout", "RoutedExperts", "UnsupportedArchitectureError", "as_linear",
    "check_supported", "decoder_hidden", "dims_of", "experts_names", "fuse_all_experts", "head_is_tied", "head_name",
    "head_path_matches", "is_projection", "layout", "logits_from_hidden", "mark_quantized", "prepare", "route_all_tokens", "selected",
    "unfuse_all_experts", "unfuse_listed_experts", "untie_head", "weight_of",
]
