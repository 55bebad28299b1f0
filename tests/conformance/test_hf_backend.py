"""The Hugging Face transformers backend: config, weight and input conversions, the sliding-window xfail, and (when
torch and transformers are installed) HF's PaliGemma against the golden cases.

The conversion tests run everywhere (NumPy only). Expected values come from the case configs and from the facts in
/work/shared/docs/oracles.md (vocabulary + 1, intermediate_dim // 2, (N, D, H) -> (N*H, D), HWIO -> OIHW, ...), and
the raw Keras arrays are read from the preset files, not from refimpl's params, so a mapping mistake cannot cancel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conformance import hf_backend
from conformance.backend import BACKENDS, BackendUnavailable, make_backend
from conformance.harness import CheckOptions, check_case
from conformance.hf_backend import (HFConversionError, hf_config_dict, hf_inputs, hf_state_dict, text_family,
                                    window_affected_taps, window_divergence)
from refimpl.config import PaliGemmaConfig
from refimpl.dtypes import Policy
from refimpl.weights import load_params, read_stored_variable

pytestmark = pytest.mark.conformance

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
needs_golden = pytest.mark.skipif(not (GOLDEN / "MANIFEST.json").is_file(),
                                  reason="golden/ cases not present (run python -m tools.make_goldens)")
needs_torch = pytest.mark.skipif(not hf_backend.transformers_available(), reason="transformers/torch not installed")


def raw_keras(case, field: str) -> np.ndarray:
    return read_stored_variable(case.preset, case.parsed_config, field)


# ---- config ----------------------------------------------------------------------------------------------------
def test_pg1_config(cases):
    c = cases["pg1_basic"].parsed_config  # V 97, D 40, intermediate 58, N 4, K 1, H 10, ViT 24 / 37 / 2 / 3, 28 px / 7
    d = hf_config_dict(c)
    assert (d["vocab_size"], d["image_token_index"], d["projection_dim"], d["hidden_size"]) == (98, 97, 40, 40)
    t, v = d["text_config"], d["vision_config"]
    assert t["model_type"] == "gemma" and text_family(c) == "gemma"
    assert (t["vocab_size"], t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"],
            t["head_dim"], t["num_hidden_layers"], t["rms_norm_eps"]) == (98, 29, 4, 1, 10, 3, 1e-6)
    assert not {"query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping"} & set(t)
    assert (v["model_type"], v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"],
            v["num_attention_heads"], v["image_size"], v["patch_size"], v["vision_use_head"]) == \
        ("siglip_vision_model", 24, 37, 2, 3, 28, 7, False)
    json.dumps(d)  # it is also the exported config.json


def test_pg2_config(cases):
    c = cases["pg2_window"].parsed_config  # D 36, N 6, H 8, caps 5 / 3, window 5 on 4 layers
    t = hf_config_dict(c)["text_config"]
    assert t["model_type"] == "gemma2"
    assert t["query_pre_attn_scalar"] == 8  # keras scales by 1/sqrt(head_dim) = 1/sqrt(8), not 1/sqrt(D/N) = 1/sqrt(6)
    assert (t["attn_logit_softcapping"], t["final_logit_softcapping"], t["sliding_window"]) == (5.0, 3.0, 5)
    assert t["layer_types"] == ["sliding_attention", "full_attention"] * 2  # keras windows even layers
    no_window = hf_config_dict(cases["pg2_mha_caps"].parsed_config)["text_config"]
    assert no_window["layer_types"] == ["full_attention"] * 2


@pytest.mark.parametrize("changes, match", [
    ({"use_post_ffw_norm": True}, "both post-norms"),
    ({"attention_logit_soft_cap": 50.0}, "both post-norms"),
    ({"layer_norm_epsilon": 1e-5}, "layer_norm_epsilon=1e-05"),
])
def test_unrepresentable_configs_raise(cases, changes, match):
    config = cases["pg1_basic"].parsed_config.replace(**changes)
    with pytest.raises(HFConversionError, match=match):
        hf_config_dict(config)


# ---- inputs ----------------------------------------------------------------------------------------------------
def test_inputs_layout(cases):
    c = cases["pg1_basic"].parsed_config  # 16 image tokens, V = 97
    rng = np.random.default_rng(0)
    inputs = {"images": rng.uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32),
              "token_ids": np.array([[2, 5, 6, 7], [2, 8, 0, 0]], dtype=np.int32),
              "padding_mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool),
              "response_mask": np.array([[0, 0, 1, 1], [0, 1, 0, 0]], dtype=bool)}
    hf = hf_inputs(inputs, c)
    assert hf["input_ids"].dtype == np.int64 and hf["input_ids"].shape == (2, 20)
    assert (hf["input_ids"][:, :16] == 97).all() and hf["input_ids"][1, 16:].tolist() == [2, 8, 0, 0]
    assert hf["attention_mask"][1].tolist() == [1] * 16 + [1, 1, 0, 0]
    assert hf["token_type_ids"][0].tolist() == [0] * 16 + [0, 0, 1, 1]
    assert hf["pixel_values"].shape == (2, 3, 28, 28)
    assert hf["pixel_values"][1, 2, 5, 9] == inputs["images"][1, 5, 9, 2]  # NCHW[b, c, y, x] = NHWC[b, y, x, c]
    rescaling = c.replace(include_rescaling=True)  # keras-nlp configs take [0, 255] and map them to [-1, 1]
    raw = dict(inputs, images=np.full((2, 28, 28, 3), 255.0, dtype=np.float32))
    raw["images"][0, 0, 0, 0] = 0.0
    pixels = hf_inputs(raw, rescaling)["pixel_values"]
    assert pixels[0, 0, 0, 0] == -1.0 and pixels[1, 1, 3, 3] == 1.0


def test_inputs_reject_bad_token_ids(cases):
    case = cases["pg1_basic"]
    bad = dict(case.inputs, token_ids=np.full_like(case.inputs["token_ids"], 97))  # 97 is <image>, not a text id
    with pytest.raises(ValueError, match="token_ids"):
        hf_inputs(bad, case.parsed_config)


# ---- weights ---------------------------------------------------------------------------------------------------
def test_state_dict_names_and_shapes(cases):
    case = cases["pg1_basic"]
    tensors = hf_state_dict(load_params(case.preset, case.parsed_config, Policy("float32")), case.parsed_config)
    v, t = "vision_tower.vision_model.", "language_model.model."
    expected = {v + "embeddings.patch_embedding.weight": (24, 3, 7, 7), v + "embeddings.position_embedding.weight":
                (16, 24), v + "encoder.layers.1.mlp.fc1.weight": (37, 24), v + "encoder.layers.0.self_attn.out_proj"
                ".bias": (24,), v + "post_layernorm.weight": (24,), "multi_modal_projector.linear.weight": (40, 24),
                t + "embed_tokens.weight": (98, 40), t + "layers.2.self_attn.q_proj.weight": (40, 40),
                t + "layers.2.self_attn.k_proj.weight": (10, 40), t + "layers.0.self_attn.o_proj.weight": (40, 40),
                t + "layers.0.mlp.gate_proj.weight": (29, 40), t + "layers.0.mlp.down_proj.weight": (40, 29),
                t + "layers.1.post_attention_layernorm.weight": (40,), t + "norm.weight": (40,)}
    assert {name: tensors[name].shape for name in expected} == expected
    per_vit, per_layer = 16, 9  # 4 Linear with bias (8) + 2 LayerNorms (4) + 2 MLP Linear (4); Gemma 1: 7 + 2 norms
    assert len(tensors) == 5 + 2 * per_vit + 2 + 2 + 3 * per_layer
    assert not any("lm_head" in name or "pre_feedforward" in name for name in tensors)
    assert (tensors[t + "embed_tokens.weight"][97] == 0).all()  # the <image> row


def test_state_dict_values_against_raw_keras(cases):
    case = cases["pg2_window"]  # N 6, K 2, H 8, D 36, patch 6, Dv 20
    tensors = hf_state_dict(load_params(case.preset, case.parsed_config, Policy("float32")), case.parsed_config)
    t, v = "language_model.model.layers.1.", "vision_tower.vision_model."
    query = raw_keras(case, "blocks[1].wq")  # (N, D, H)
    np.testing.assert_array_equal(tensors[t + "self_attn.q_proj.weight"][3 * 8:4 * 8], query[3].T)  # head 3 rows
    value = raw_keras(case, "blocks[1].wv")  # (K, D, H)
    np.testing.assert_array_equal(tensors[t + "self_attn.v_proj.weight"], value.transpose(0, 2, 1).reshape(16, 36))
    output = raw_keras(case, "blocks[1].wo")  # (N, H, D) -> (D, N*H)
    np.testing.assert_array_equal(tensors[t + "self_attn.o_proj.weight"][:, 8:16], output[1].T)
    np.testing.assert_array_equal(tensors[t + "mlp.gate_proj.weight"], raw_keras(case, "blocks[1].w_gate").T)
    np.testing.assert_array_equal(tensors[t + "mlp.up_proj.weight"], raw_keras(case, "blocks[1].w_up").T)
    # Gemma 2 names: post_attention_layernorm is keras' post_attention_norm, the FFW norms are separate
    np.testing.assert_array_equal(tensors[t + "post_attention_layernorm.weight"],
                                  raw_keras(case, "blocks[1].post_attention_norm"))
    np.testing.assert_array_equal(tensors[t + "pre_feedforward_layernorm.weight"],
                                  raw_keras(case, "blocks[1].pre_ffw_norm"))
    conv = raw_keras(case, "vit.patch_kernel")  # HWIO (6, 6, 3, 20)
    np.testing.assert_array_equal(tensors[v + "embeddings.patch_embedding.weight"][7, 2, 1, 4], conv[1, 4, 2, 7])


def test_gemma1_post_attention_layernorm_is_pre_ffw_norm(cases):
    case = cases["pg1_basic"]
    tensors = hf_state_dict(load_params(case.preset, case.parsed_config, Policy("float32")), case.parsed_config)
    np.testing.assert_array_equal(tensors["language_model.model.layers.2.post_attention_layernorm.weight"],
                                  raw_keras(case, "blocks[2].pre_ffw_norm"))


# ---- the sliding-window difference -----------------------------------------------------------------------------
def test_window_divergence(cases):
    case = cases["pg2_window"]  # 9 image tokens, T 8, window 5: the image alone spans positions 0..8
    c = case.parsed_config
    assert "sliding window" in window_divergence(case.inputs, c)
    assert window_divergence(case.inputs, c.replace(use_sliding_window_attention=False)) is None
    assert window_divergence(case.inputs, c.replace(sliding_window_size=4096)) is None
    wide = c.replace(sliding_window_size=11)  # 9 + 8 = 17 > 11, so it depends on where the prefix ends
    inputs = dict(case.inputs, padding_mask=np.ones((2, 8), bool),
                  response_mask=np.array([[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]], bool))
    assert window_divergence(inputs, wide) is None  # prefix ends at position 9 + 1 = 10 < 11
    inputs["response_mask"][0, 2] = False  # row 0's prefix now reaches position 9 + 2 = 11
    assert "position 11 >= sliding_window_size 11" in window_divergence(inputs, wide)
    assert window_divergence(case.inputs, cases["pg1_basic"].parsed_config) is None


def test_window_affected_taps(cases):
    case = cases["pg2_window"]
    names = window_affected_taps(case.taps, case.parsed_config)
    assert names[0] == "llm/layer00/attn_out" and names[-2:] == ["llm/final_norm", "llm/logits"]
    assert "llm/layer00/pre_attn_norm" not in names and "llm/layer01/pre_attn_norm" in names
    assert not any(n.startswith("img/") or n in ("llm/input", "llm/mask") for n in names)


class _GoldenEcho:
    """A stand-in backend returning the golden taps, one of them off by 1%, optionally declaring it xfail."""

    name = "golden-echo"

    def __init__(self, xfail=()):
        self.xfail = xfail

    def prepare(self, case):
        self.case = case

    def run(self, inputs, taps):
        golden = self.case.golden
        out = {name: golden[name] if golden[name].dtype == bool else golden[name].astype(np.float32) for name in taps}
        out["llm/layer01/out"] = out["llm/layer01/out"] * np.float32(1.01)
        return out


def test_backend_declared_xfails_reach_the_report(cases):
    case = cases["pg1_basic"]
    assert check_case(case, _GoldenEcho()).status == "fail"
    result = check_case(case, _GoldenEcho(xfail=((r"^llm/(layer0[12]/|final_norm|logits)", "declared"),)))
    assert result.status == "pass"
    assert result.tap("llm/layer01/out").status == "xfail" and result.tap("llm/layer01/out").xfail_reason == \
        "declared"
    assert result.tap("llm/layer01/pre_attn_norm").status == "pass"  # an xfail regex only excuses failing taps


# ---- registry --------------------------------------------------------------------------------------------------
def test_registry_names(monkeypatch):
    assert {"transformers", "hf"} <= set(BACKENDS)
    monkeypatch.setattr(hf_backend, "transformers_available", lambda: False)
    for name in ("transformers", "hf", "conformance.hf_backend:TransformersBackend"):
        with pytest.raises(BackendUnavailable, match=re.escape("transformers/torch not installed")):
            make_backend(name)


# ---- transformers itself ---------------------------------------------------------------------------------------
@needs_torch
def test_cli_checks_golden_cases(tmp_path):
    from conformance.cli import main

    report = tmp_path / "report.json"
    code = main(["--golden", str(GOLDEN), "--backend", "transformers", "--case", "pg1_basic", "pg2_mha_caps",
                 "pg2_window", "--json", str(report)])
    assert code == 0
    results = {c["case"]: c for c in json.loads(report.read_text())["cases"]}
    for name, case in results.items():
        statuses = {t["name"]: t["status"] for t in case["taps"]}
        assert "not_provided" not in statuses.values() and "missing" not in statuses.values(), name
        assert statuses["llm/mask"] == "pass" and statuses["img/proj"] == "pass", name
    assert {t["status"] for t in results["pg1_basic"]["taps"]} == {"pass"}
    assert {t["status"] for t in results["pg2_mha_caps"]["taps"]} == {"pass"}
    window = {t["name"]: t for t in results["pg2_window"]["taps"]}
    assert window["llm/layer00/pre_attn_norm"]["status"] == "pass"
    assert window["llm/final_norm"]["status"] == "xfail"
    assert "sliding window" in window["llm/final_norm"]["xfail_reason"]


@needs_torch
def test_hidden_states_last_entry_is_post_norm(cases):
    import torch

    case = cases["pg1_basic"]
    backend = hf_backend.TransformersBackend()
    backend.prepare(case)
    taps = backend.run(case.inputs, ["llm/input", "llm/layer01/out", "llm/layer02/out"])
    tensors = {k: torch.from_numpy(v) for k, v in hf_inputs(case.inputs, case.parsed_config).items()}
    with torch.inference_mode():
        hidden = backend.model(**tensors, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == 4  # 3 layers: input, layer 0, layer 1, then the final norm instead of layer 2's output
    np.testing.assert_array_equal(hidden[0].numpy(), taps["llm/input"])
    np.testing.assert_array_equal(hidden[2].numpy(), taps["llm/layer01/out"])
    np.testing.assert_array_equal(hidden[3].numpy(), taps["llm/final_norm"])
    assert not np.array_equal(hidden[3].numpy(), taps["llm/layer02/out"])


@needs_torch
def test_keras_window_masks_make_hf_match(cases):
    """The xfail is the mask and nothing else: given keras' banded masks, HF's own decoder matches the golden."""
    import torch
    from conformance.harness import compare_tap
    from refimpl.attention import prefix_lm_mask, sliding_window_band

    case = cases["pg2_window"]
    c = case.parsed_config
    backend = hf_backend.TransformersBackend()
    backend.prepare(case)
    taps = backend.run(case.inputs, ["llm/input"])
    length = taps["llm/input"].shape[1]
    full = prefix_lm_mask(case.inputs["padding_mask"], case.inputs["response_mask"], c.image_sequence_length)
    banded = full & sliding_window_band(np.arange(length), length, c.sliding_window_size)[None]

    def additive(mask):  # bool[B, L, L] -> HF eager's additive f32[B, 1, L, L]
        return torch.where(torch.from_numpy(mask)[:, None], 0.0, torch.finfo(torch.float32).min)

    with torch.inference_mode():
        out = backend.model.model.language_model(
            inputs_embeds=torch.from_numpy(taps["llm/input"]), position_ids=torch.arange(length)[None],
            attention_mask={"full_attention": additive(full), "sliding_attention": additive(banded)},
            use_cache=False).last_hidden_state.numpy()
    index = case.taps.index("llm/final_norm")
    assert compare_tap(case, "llm/final_norm", index, out, CheckOptions(), "float32", "run").status == "pass"
    own = compare_tap(case, "llm/final_norm", index, taps["llm/final_norm"], CheckOptions(), "float32", "run")
    assert own.status == "fail" and own.metrics.max_abs > 0.1  # HF's own masks: an O(1) difference


@needs_torch
def test_perturbed_hf_weight_is_located(cases):
    import torch

    case = cases["pg1_basic"]

    class Perturbed(hf_backend.TransformersBackend):
        def prepare(self, case):
            super().prepare(case)
            with torch.no_grad():
                self.model.model.language_model.layers[1].mlp.up_proj.weight.mul_(1.001)

    result = check_case(case, Perturbed())
    assert result.status == "fail" and result.divergence.tap == "llm/layer01/ffw_out"
    assert result.divergence.verdict == "introduced"


@needs_torch
def test_unrepresentable_case_is_an_error_not_a_crash(cases, monkeypatch):
    case = cases["pg1_basic"]
    monkeypatch.setattr(type(case), "parsed_config",
                        property(lambda self: PaliGemmaConfig.from_keras_config(
                            dict(self.config, layer_norm_epsilon=1e-5))))
    result = check_case(case, hf_backend.TransformersBackend())
    assert result.status == "error" and "layer_norm_epsilon" in result.error
