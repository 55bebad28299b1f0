"""tools/keras_oracle.py against keras-hub itself: perturbation, every save variant, reload, taps, case files.

Skipped without keras-hub. One pg1_basic backbone per dtype is built per module (keras builds take seconds).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tools import keras_oracle as ko

pytestmark = [pytest.mark.keras,
              pytest.mark.skipif(not ko.keras_hub_available(), reason="keras-hub not installed")]

CASE = ko.CASES["pg1_basic"]
CONFIG = CASE.config


@pytest.fixture(scope="module")
def fresh_and_perturbed():
    """(fresh keras-initialised values, the same backbone after perturb_weights(seed 0))."""
    backbone = ko.construct_backbone(CONFIG, dtype="float32")
    fresh = ko.variable_values(backbone)
    ko.perturb_weights(backbone, 0)
    return fresh, backbone


@pytest.fixture(scope="module")
def backbone_f32(fresh_and_perturbed):
    return fresh_and_perturbed[1]


@pytest.fixture(scope="module")
def backbone_bf16():
    return ko.build_backbone(CONFIG, dtype="bfloat16", seed=0)


@pytest.fixture(scope="module")
def inputs():
    return ko.make_inputs(CONFIG, batch=CASE.batch, text_len=CASE.text_len, seed=0, kind=CASE.input_kind)


def _output(backbone, inputs) -> np.ndarray:
    return np.asarray(backbone(ko.model_inputs(backbone, inputs))).astype(np.float32)


def test_perturbation_changes_every_variable(fresh_and_perturbed):
    fresh, backbone = fresh_and_perturbed
    perturbed = ko.variable_values(backbone)
    assert len(perturbed) == len(fresh) == len(backbone.weights)
    unchanged = [(variable.path, int(np.sum(before == after)))
                 for variable, before, after in zip(backbone.weights, fresh, perturbed)
                 if np.any(before == after)]
    assert not unchanged, f"elements still at their fresh-init value: {unchanged}"


def test_perturbation_is_a_pure_function_of_specs_and_seed(backbone_f32):
    specs = ko.variable_specs(backbone_f32)
    first, again, other = (ko.perturbation_values(specs, seed) for seed in (0, 0, 1))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))
    assert all(np.array_equal(a, b) for a, b in zip(first, ko.variable_values(backbone_f32)))


def test_bf16_backbone_holds_the_float32_draws_rounded(backbone_bf16):
    assert {variable.dtype for variable in backbone_bf16.weights} == {"bfloat16"}
    assert ko.check_bf16_rounding(backbone_bf16, 0) == 0.0


@pytest.mark.parametrize("variant", ["plain", "sharded", "bf16", "legacy_h5"])
def test_variant_files_exist_and_reload_identically(variant, backbone_f32, backbone_bf16, inputs, tmp_path):
    backbone = backbone_bf16 if variant == "bf16" else backbone_f32
    written = ko.save_variants(backbone, tmp_path, variant)
    expected = {"plain": ["config.json", "metadata.json", "model.weights.h5"],
                "bf16": ["config.json", "metadata.json", "model.weights.h5"],
                "sharded": ["config.json", "metadata.json", "model.weights.json"],
                "legacy_h5": ["config.json", "model.h5"]}[variant]
    assert all((tmp_path / name).is_file() for name in expected), written
    if variant == "sharded":
        assert not (tmp_path / "model.weights.h5").exists()
        assert len(list(tmp_path.glob("model_0000[0-9].weights.h5"))) >= 3
    dtype = "bfloat16" if variant == "bf16" else None  # from_preset widens bf16 presets to float32 by default
    reloaded, _, _ = ko.reload_backbone(tmp_path, variant, dtype=dtype)
    assert reloaded.dtype_policy.name == backbone.dtype_policy.name
    np.testing.assert_array_equal(_output(reloaded, inputs), _output(backbone, inputs))


def test_taps_chain_reproduces_the_backbone_call(backbone_f32, inputs):
    checks: dict[str, float] = {}
    taps = ko.record_keras_taps(backbone_f32, inputs, checks=checks)
    n_img, text_len = 16, CASE.text_len
    required = ["img/embed", "img/block00/out", "img/block01/out", "img/encoded", "img/proj", "llm/embed_text",
                "llm/input", *(f"llm/layer{i:02d}/out" for i in range(3)), "llm/final_norm", "llm/logits"]
    positions = [list(taps).index(name) for name in required]
    assert positions == sorted(positions), "taps must be in forward order"
    assert "llm/layer00/post_attn_norm" not in taps  # PaliGemma 1 shape: no post-norms
    np.testing.assert_array_equal(taps["llm/final_norm"], _output(backbone_f32, inputs))
    np.testing.assert_array_equal(taps["llm/input"][:, :n_img], taps["img/proj"])
    np.testing.assert_array_equal(taps["llm/input"][:, n_img:], taps["llm/embed_text"])
    assert taps["llm/logits"].shape == (CASE.batch, text_len, CONFIG["vocabulary_size"])
    length = n_img + text_len
    assert taps["llm/mask"].dtype == bool and taps["llm/mask"].shape == (CASE.batch, length, length)
    scale = checks["backbone_output_max_abs"]
    assert all(diff <= 1e-5 * scale for name, diff in checks.items() if name != "backbone_output_max_abs"), checks


@pytest.mark.parametrize("kind", ko.INPUT_KINDS)
def test_make_inputs_follow_the_preprocessor_layout(kind):
    data = ko.make_inputs(CONFIG, batch=3, text_len=9, seed=4, kind=kind)
    ids, pad, resp = data["token_ids"], data["padding_mask"], data["response_mask"]
    assert data["images"].dtype == np.float32 and data["images"].shape == (3, 28, 28, 3)
    assert np.all(np.abs(data["images"]) <= 1) and data["images"].std() > 0.1
    assert ids.dtype == np.int32 and pad.dtype == bool and resp.dtype == bool
    assert np.all(ids[:, 0] == ko.BOS_ID) and np.all(pad[:, 0]) and not np.any(resp[:, 0])
    assert np.all((ids == ko.PAD_ID) == ~pad), "pad id exactly where padding_mask is False"
    assert np.all(ids[:, 1:][pad[:, 1:]] >= ko.FIRST_ORDINARY_ID) and np.all(ids < CONFIG["vocabulary_size"])
    assert not np.any(resp & ~pad)
    assert np.all(np.diff(pad.astype(int), axis=1) <= 0), "padding is trailing"
    expected_response = {"prefix_padded": True, "all_response": True, "empty_prompt": False,
                         "bidirectional": False}[kind]
    assert bool(resp[0].any()) == expected_response
    if kind == "all_response":
        np.testing.assert_array_equal(resp[:, 1:], pad[:, 1:])
    if kind == "empty_prompt":
        assert pad.sum() == 3
    if kind == "bidirectional":
        assert pad.all()
    if kind == "prefix_padded":
        assert pad[0].all() and not pad[1].all() and resp[1].any()


def test_write_case_is_small_and_self_describing(tmp_path):
    out = tmp_path / "case"
    provenance = ko.write_named_case("pg1_basic", out)  # same shapes as the fixtures: jax compiles nothing new
    assert ko.case_size_bytes(out) < ko.MAX_CASE_BYTES
    stored = json.loads((out / "keras_provenance.json").read_text())
    assert stored["config"] == CONFIG and stored["variant"] == "plain" and stored["reload"]["identical"]
    assert stored["chain_vs_call_max_abs_diff"] == provenance["chain_vs_call_max_abs_diff"]
    with np.load(out / "keras_taps.npz", allow_pickle=False) as taps:
        assert list(taps.files) == stored["taps"]
        assert taps["llm/final_norm"].shape == (CASE.batch, 16 + CASE.text_len, CONFIG["hidden_dim"])
    with np.load(out / "inputs.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["images", "padding_mask", "response_mask", "token_ids"]
        expected = ko.make_inputs(CONFIG, batch=CASE.batch, text_len=CASE.text_len, seed=0, kind=CASE.input_kind)
        assert all(np.array_equal(data[name], value) for name, value in expected.items())
    with pytest.raises(FileExistsError, match="not empty"):
        ko.write_named_case("pg1_basic", out)


def test_bad_arguments_are_named_before_any_keras_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="input kind 'nope'"):
        ko.make_inputs(CONFIG, batch=1, text_len=9, seed=0, kind="nope")
    with pytest.raises(ValueError, match="needs text_len >= 5, found 4"):
        ko.make_inputs(CONFIG, batch=2, text_len=4, seed=0, kind="prefix_padded")
    with pytest.raises(ValueError, match="variant 'bf16'.*found dtype='float32'"):
        ko.write_case(tmp_path / "x", CONFIG, variant="bf16", dtype="float32", seed=0, input_kind="bidirectional",
                      batch=1, text_len=4)
    with pytest.raises(ko.ConfigError, match="missing required key 'image_size'"):
        ko.write_case(tmp_path / "x", {"vocabulary_size": 5}, variant="plain", dtype="float32", seed=0,
                      input_kind="bidirectional", batch=1, text_len=4)
    assert ko.main(["--list-cases"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(ko.CASES)
