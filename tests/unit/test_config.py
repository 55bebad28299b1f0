"""Config validation, keras config round trips, and parameter counts against keras-hub's preset metadata."""

import pytest

from refimpl import PaliGemmaBackbone
from refimpl.config import ConfigError, PaliGemmaConfig, count_params
from refimpl.presets import PRESETS

TINY = dict(vocabulary_size=97, image_size=28, num_layers=3, num_query_heads=4, num_key_value_heads=2,
            hidden_dim=40, intermediate_dim=58, head_dim=10, vit_patch_size=7, vit_num_heads=3, vit_hidden_dim=24,
            vit_num_layers=2, vit_intermediate_dim=37)

# Parameter counts from keras-hub's pali_gemma_presets.py metadata (spec section 10.3), except the two 28B entries
# whose metadata repeats the 224 px number; for those the spec's exact analytic count is used.
KERAS_HUB_PARAMS = {
    "pali_gemma_3b_mix_224": 2_923_335_408, "pali_gemma_3b_mix_448": 2_924_220_144,
    "pali_gemma_3b_224": 2_923_335_408, "pali_gemma_3b_448": 2_924_220_144, "pali_gemma_3b_896": 2_927_759_088,
    "pali_gemma_2_ft_docci_3b_448": 3_032_979_696, "pali_gemma2_ft_docci_10b_448": 9_663_294_192,
    "pali_gemma2_mix_3b_224": 3_032_094_960, "pali_gemma2_mix_3b_448": 3_032_979_696,
    "pali_gemma2_mix_10b_224": 9_662_409_456, "pali_gemma2_mix_10b_448": 9_663_294_192,
    "pali_gemma2_mix_28b_224": 27_650_192_112, "pali_gemma2_mix_28b_448": 27_651_076_848,
    "pali_gemma2_pt_3b_224": 3_032_094_960, "pali_gemma2_pt_3b_448": 3_032_979_696,
    "pali_gemma2_pt_3b_896": 3_036_518_640, "pali_gemma2_pt_10b_224": 9_662_409_456,
    "pali_gemma2_pt_10b_448": 9_663_294_192, "pali_gemma2_pt_10b_896": 9_666_833_136,
    "pali_gemma2_pt_28b_224": 27_650_192_112, "pali_gemma2_pt_28b_448": 27_651_076_848,
    "pali_gemma2_pt_28b_896": 27_654_615_792,
}


@pytest.mark.parametrize("name", sorted(KERAS_HUB_PARAMS))
def test_preset_parameter_counts_equal_keras_hub(name):
    assert PRESETS[name].parameter_count == KERAS_HUB_PARAMS[name]
    assert PaliGemmaBackbone.presets[name]["params"] == KERAS_HUB_PARAMS[name]


def test_every_preset_is_pinned():
    assert set(PRESETS) == set(KERAS_HUB_PARAMS)


def test_builtin_preset_config_is_known_offline():
    config = PRESETS["pali_gemma_3b_896"].config
    assert config.image_sequence_length == 4096 and config.ffw_dim == 16384
    assert not config.include_rescaling  # keras-hub presets expect [-1, 1] images


def test_vit_intermediate_dim_none_becomes_4304():
    assert PaliGemmaConfig(**{**TINY, "vit_intermediate_dim": None}).vit_intermediate_dim == 4304
    assert PaliGemmaConfig(**{**TINY, "vit_intermediate_dim": 0}).vit_intermediate_dim == 4304


def test_all_problems_reported_at_once_and_named():
    with pytest.raises(ConfigError) as error:
        PaliGemmaConfig(**{**TINY, "num_key_value_heads": 3, "image_size": 30, "head_dim": 9, "vit_pooling": "map",
                           "attention_logit_soft_cap": -1.0})
    message = str(error.value)
    for fragment in ("num_query_heads=4 must be a multiple of num_key_value_heads=3", "image_size=30",
                     "head_dim=9", "vit_pooling='map'", "attention_logit_soft_cap=-1.0"):
        assert fragment in message


@pytest.mark.parametrize("field,value", [("hidden_dim", 0), ("num_layers", -1), ("head_dim", 2.0),
                                         ("use_post_ffw_norm", 1), ("dropout", 1.5), ("layer_norm_epsilon", 0)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        PaliGemmaConfig(**{**TINY, field: value})


def test_keras_config_round_trip():
    keras_config = {"name": "pali_gemma_backbone", "trainable": True,
                    "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
                              "registered_name": None},
                    **PaliGemmaConfig(**TINY, include_rescaling=False).to_keras_config()}
    model = PaliGemmaBackbone.from_config(keras_config)
    assert model.get_config() == keras_config
    assert "include_rescaling" not in keras_config


def test_keras_hub_config_means_no_rescaling_and_keras_nlp_keeps_it():
    hub = PaliGemmaConfig(**TINY, include_rescaling=False).to_keras_config()
    assert PaliGemmaConfig.from_keras_config(hub).include_rescaling is False
    nlp = dict(hub, include_rescaling=True)
    assert PaliGemmaConfig.from_keras_config(nlp).include_rescaling is True


def test_unknown_and_missing_keys_are_errors():
    config = PaliGemmaConfig(**TINY).to_keras_config()
    with pytest.raises(ConfigError, match="unknown key 'rope_theta'"):
        PaliGemmaConfig.from_keras_config({**config, "rope_theta": 1})
    del config["hidden_dim"]
    with pytest.raises(ConfigError, match="missing required key 'hidden_dim'"):
        PaliGemmaConfig.from_keras_config(config)


def test_constructor_defaults_follow_keras_nlp_docs():
    model = PaliGemmaBackbone(**TINY)
    assert model.config.include_rescaling is True  # keras-nlp 0.12.1-0.15 default
    assert model.count_params() == count_params(model.config)
    assert model.policy.name == "float32"
