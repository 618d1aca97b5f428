"""spp_cli/io/key_renames.py renames a stored key the way transformers' own loader does (renamings in turn, then
at most one converter). It exists because the module-level helpers transformers later added for this are missing
from 5.17 (the GPU image's); here it must agree with transformers' `rename_source_key` on every mapping that
renames or stacks weights."""

import pytest
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, rename_source_key

from spp_cli.io.key_renames import converted_key, renamed_key

KEYS = {
    "mixtral": ["model.layers.0.block_sparse_moe.experts.3.w1.weight",
                "model.layers.1.block_sparse_moe.experts.0.w2.weight", "model.layers.0.block_sparse_moe.gate.weight",
                "model.layers.0.self_attn.q_proj.weight"],
    "qwen2_moe": ["model.layers.0.mlp.experts.5.gate_proj.weight", "model.layers.0.mlp.experts.5.down_proj.weight",
                  "model.layers.0.mlp.shared_expert.up_proj.weight"],
    "gemma3": ["language_model.model.layers.0.mlp.up_proj.weight", "language_model.lm_head.weight",
               "vision_tower.encoder.layers.0.mlp.fc1.weight", "model.layers.0.self_attn.o_proj.weight"],
}


@pytest.mark.parametrize("model_type", sorted(KEYS))
def test_renames_agree_with_transformers_own(model_type):
    transforms = get_checkpoint_conversion_mapping(model_type)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    changed = 0
    for key in KEYS[model_type]:
        ours = converted_key(renamed_key(key, renamings), converters)
        assert ours == rename_source_key(key, renamings, converters)
        changed += ours[0] != key
    assert changed >= 2  # the cases exercise real renames, not only keys that pass through
