"""A strict Hugging Face load that is missing tensors names them by their checkpoint keys.

Tiny random models of each family are written with ``save_pretrained`` (Hub
naming, offline) and one decoder layer's MoE block is loaded from the file's
tensors with some removed. The error must name the keys the user has to
supply (with the prefix), the expert, slot rows and parts each fills, the
decoder layer, and the count, and keep the per-slot-row list; the report of a
non-strict load must list exactly the checkpoint's keys of this block.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from hf_moe_cases import FAMILIES, hf_config  # noqa: E402
from moe_ext.errors import ArgumentError  # noqa: E402
from moe_ext.moe import MoEConfig, MoELayer  # noqa: E402
from moe_ext.moe.hf import BLOCK_NAMES, load_hf_moe_weights, moe_layer_arguments  # noqa: E402

_CHECKPOINTS: dict[str, dict[str, torch.Tensor]] = {}


def _block_tensors(family, tmp_path_factory):
    """The MoE block tensors of layer 0 of a tiny random ``family`` model, as its Hub checkpoint names them."""
    if family not in _CHECKPOINTS:
        import transformers as tf
        from safetensors.torch import load_file

        model_class = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
                       "qwen3_moe": tf.Qwen3MoeForCausalLM, "deepseek_v3": tf.DeepseekV3ForCausalLM,
                       "llama4_text": tf.Llama4ForCausalLM, "gpt_oss": tf.GptOssForCausalLM}[family]
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(family)
        model_class(hf_config(family)).float().save_pretrained(directory)
        (path,) = directory.glob("*.safetensors")
        prefix = _prefix(family)
        _CHECKPOINTS[family] = {name: tensor for name, tensor in load_file(str(path)).items()
                                if name.startswith(prefix)}
    return dict(_CHECKPOINTS[family])


def _prefix(family):
    return f"model.layers.0.{BLOCK_NAMES[family]}."


def _layer(family, placement=None):
    sizes, options = moe_layer_arguments(hf_config(family))
    physical = sizes["num_experts"] if placement is None else len(placement)
    return MoELayer(MoEConfig(**sizes, num_physical_experts=physical),
                    placement=None if placement is None else torch.tensor(placement), **options)


def _strict_error(family, tensors, placement=None):
    with pytest.raises(ArgumentError) as caught:
        load_hf_moe_weights(_layer(family, placement), family, tensors, prefix=_prefix(family))
    return str(caught.value)


def test_one_missing_expert_tensor_is_named_by_its_checkpoint_key(tmp_path_factory):
    tensors = _block_tensors("qwen3_moe", tmp_path_factory)
    key = "model.layers.0.mlp.experts.3.gate_proj.weight"
    del tensors[key]
    message = _strict_error("qwen3_moe", tensors)
    assert f"1 checkpoint tensor not supplied: '{key}' (expert 3 (slot row 3): gate)" in message, message
    assert "qwen3_moe MoE block under prefix 'model.layers.0.mlp.' (decoder layer 0)" in message, message
    assert "Unloaded parts: ['expert 3 (slot row 3): gate']" in message, message  # the slot-row view is kept
    assert "'model.layers.0.mlp.experts.gate_up_proj'" in message  # the fused alternative is named


def test_mixtral_names_its_own_keys_experts_first_then_the_router(tmp_path_factory):
    tensors = _block_tensors("mixtral", tmp_path_factory)
    prefix = _prefix("mixtral")
    removed = [f"{prefix}experts.5.{w}.weight" for w in ("w1", "w3", "w2")] + [f"{prefix}gate.weight"]
    for key in removed:
        del tensors[key]
    message = _strict_error("mixtral", tensors)
    assert "4 checkpoint tensors not supplied" in message, message
    parts = ["expert 5 (slot row 5): gate", "expert 5 (slot row 5): up", "expert 5 (slot row 5): down",
             "router.weight"]
    listed = ", ".join(f"'{key}' ({what})" for key, what in zip(removed, parts))
    assert f"4 checkpoint tensors not supplied: {listed}." in message, message


def test_replicated_expert_is_listed_once_with_all_its_rows(tmp_path_factory):
    tensors = _block_tensors("deepseek_v3", tmp_path_factory)
    del tensors["model.layers.0.mlp.experts.3.down_proj.weight"]
    message = _strict_error("deepseek_v3", tensors, placement=[0, 1, 2, 3, 4, 5, 6, 7, 3])
    assert ("1 checkpoint tensor not supplied: 'model.layers.0.mlp.experts.3.down_proj.weight' "
            "(expert 3 (slot rows 3, 8): down)") in message, message
    assert "'expert 3 (slot row 3): down', 'expert 3 (slot row 8): down'" in message, message


def test_many_missing_tensors_show_the_first_eight_and_the_count(tmp_path_factory):
    tensors = _block_tensors("qwen3_moe", tmp_path_factory)
    only_router = {name: tensor for name, tensor in tensors.items() if name.endswith("mlp.gate.weight")}
    message = _strict_error("qwen3_moe", only_router)
    assert "24 checkpoint tensors not supplied" in message and ", and 16 more." in message, message
    assert len(re.findall(r"'model\.layers\.0\.mlp\.experts\.\d\.\w+_proj\.weight'", message)) == 8, message
    assert "(+0 more)" not in message and "Unloaded parts" in message


def test_all_experts_tensor_names_the_blocks_it_fills(tmp_path_factory):
    tensors = _block_tensors("gpt_oss", tmp_path_factory)
    del tensors["model.layers.0.mlp.experts.gate_up_proj_bias"]
    message = _strict_error("gpt_oss", tensors)
    assert ("1 checkpoint tensor not supplied: 'model.layers.0.mlp.experts.gate_up_proj_bias' "
            "(experts 0-7 (slot rows 0-7): gate_bias, up_bias)") in message, message
    assert "transformers >= 5" not in message  # GPT-OSS's Hub names already hold every expert


def test_a_prefix_without_a_layer_index_still_names_full_keys(tmp_path_factory):
    prefix = _prefix("qwen2_moe")
    tensors = {name[len(prefix):]: tensor for name, tensor in _block_tensors("qwen2_moe", tmp_path_factory).items()}
    del tensors["shared_expert_gate.weight"]
    with pytest.raises(ArgumentError, match=r"block with no prefix is incomplete on this rank: 1 checkpoint "
                                            r"tensor not supplied: 'shared_expert_gate\.weight' \(shared\.gate\)"):
        load_hf_moe_weights(_layer("qwen2_moe"), "qwen2_moe", tensors)


@pytest.mark.parametrize("family", FAMILIES)
def test_report_missing_keys_are_exactly_the_checkpoints_block_keys(family, tmp_path_factory):
    """Nothing loaded: missing_keys is the block's key set in the Hub file; everything loaded: empty."""
    tensors = _block_tensors(family, tmp_path_factory)
    layer = _layer(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_hf_moe_weights(layer, family, {}, prefix=_prefix(family), strict=False)
    assert len(report.missing_keys) == len(set(report.missing_keys)) == len(tensors)
    assert set(report.missing_keys) == set(tensors)
    assert any(report.missing_keys[0] in str(warning.message) for warning in caught)
    report = load_hf_moe_weights(layer, family, tensors, prefix=_prefix(family), strict=False)
    assert report.missing == [] and report.missing_keys == []
