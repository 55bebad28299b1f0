"""tools/make_big_preset.py: streamed random presets that refimpl's strict reader and keras-hub both load."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from refimpl.config import PaliGemmaConfig, count_params
from refimpl.dtypes import Policy, round_to_bfloat16
from refimpl.model import PaliGemmaBackbone
from refimpl.weights import expected_entries, load_params, open_weight_file
from tests.memory import traced_peak
from tools import make_big_preset
from tools.make_big_preset import WORKLOADS, entry_values, make_preset, row_slabs

# Small, odd, mutually distinct sizes (style.md section 3); PG2 adds the optional norms, caps and the window.
PG1 = PaliGemmaConfig(vocabulary_size=211, image_size=28, vit_patch_size=7, vit_hidden_dim=24, vit_num_heads=3,
                      vit_num_layers=2, vit_intermediate_dim=37, num_layers=3, num_query_heads=4,
                      num_key_value_heads=2, hidden_dim=40, intermediate_dim=58, head_dim=10, include_rescaling=False)
PG2 = PG1.replace(use_post_attention_norm=True, use_post_ffw_norm=True, attention_logit_soft_cap=50.0,
                  final_logit_soft_cap=30.0, use_sliding_window_attention=True, sliding_window_size=5)


def _inputs(config: PaliGemmaConfig, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    text = 6
    return {"images": rng.uniform(-1, 1, (2, config.image_size, config.image_size, 3)).astype(np.float32),
            "token_ids": rng.integers(0, config.vocabulary_size, (2, text)).astype(np.int32),
            "padding_mask": np.array([[1] * text, [1] * (text - 2) + [0] * 2], bool),
            "response_mask": np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], bool)}


@pytest.mark.parametrize("config", [PG1, PG2], ids=["pg1", "pg2"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_preset_loads_strictly_with_the_drawn_values(tmp_path, config, storage):
    preset, wrote = make_preset(tmp_path / "p", config, storage=storage, seed=3)
    assert wrote
    assert sorted(p.name for p in preset.iterdir()) == ["config.json", "metadata.json", "model.weights.h5"]
    params = load_params(preset, config, Policy("float32"))  # strict: every entry present, shaped, written
    assert params.nbytes == count_params(config) * 4
    with open_weight_file(preset) as weights, h5py.File(preset / "model.weights.h5") as handle:
        variable_paths = {exp.field: key for key, exp in expected_entries(config, "variable_path").items()}
        for number, (key, exp) in enumerate(expected_entries(config, "object_path").items()):
            drawn = np.concatenate(list(entry_values(variable_paths[exp.field], exp.shape, 3, number)))
            stored = weights.entries[key]
            assert stored.dtype == storage, key
            if storage == "bfloat16":
                assert handle[key].attrs["dtype"] == "bfloat16"
                drawn = round_to_bfloat16(drawn)
            out = np.empty(exp.shape, np.float32)
            weights.read_into(key, out)
            assert np.array_equal(out, drawn.reshape(exp.shape)), key


def test_values_follow_the_perturbation_rules():
    """Norm multipliers near 1, kernels with std 1/sqrt(fan_in), token rows with std 1/sqrt(D)."""
    config = PG1.replace(hidden_dim=400, vocabulary_size=2000)
    entries = {exp.field: (key, exp) for key, exp in expected_entries(config, "variable_path").items()}
    order = list(expected_entries(config, "object_path").values())

    def values(field):
        key, exp = entries[field]
        number = next(n for n, e in enumerate(order) if e.field == field)
        return np.concatenate(list(entry_values(key, exp.shape, 0, number)))

    # Hundreds of thousands of draws each: the sample std is within 1% of the rule's; 5% leaves room.
    for field in ("token_embedding", "blocks[0].w_gate", "blocks[0].wq"):  # wq is (N, D, H): fan_in = D
        assert abs(values(field).std() - 400 ** -0.5) < 0.05 * 400 ** -0.5, field
    assert abs(values("vit.blocks[0].ln1_gamma").mean() - 1.0) < 0.1
    assert abs(values("blocks[0].pre_attention_norm").mean()) < 0.1


def test_writing_holds_a_few_slabs_not_the_model(tmp_path, monkeypatch):
    """tracemalloc peak while writing: bounded by the slab size, far below the largest tensor (the token table)."""
    monkeypatch.setattr(make_big_preset, "CHUNK_ELEMENTS", 1 << 14)  # 64 KB slabs
    config = PG1.replace(vocabulary_size=40_000, hidden_dim=64, head_dim=16)  # token table f32[40000, 64]: 10 MB
    peak, _ = traced_peak(lambda: make_preset(tmp_path / "p", config))
    assert peak < 1_000_000, peak
    assert (tmp_path / "p" / "model.weights.h5").stat().st_size > 10_000_000


def test_row_slabs_cover_every_row_once():
    assert [(s.start, s.stop) for s in row_slabs((10, 3), chunk=7)] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert [(s.start, s.stop) for s in row_slabs((3, 100), chunk=7)] == [(0, 1), (1, 2), (2, 3)]  # a row per slab
    assert [(s.start, s.stop) for s in row_slabs((5,), chunk=7)] == [(0, 5)]


def test_existing_preset_is_reused_only_when_its_provenance_matches(tmp_path):
    target = tmp_path / "p"
    assert make_preset(target, PG1, seed=0)[1]
    stamp = (target / "model.weights.h5").stat().st_mtime_ns
    assert not make_preset(target, PG1, seed=0)[1]
    assert (target / "model.weights.h5").stat().st_mtime_ns == stamp
    assert make_preset(target, PG1, seed=1)[1]  # another seed: rewritten
    (target / "metadata.json").unlink()  # an interrupted write leaves no metadata: rewritten
    assert make_preset(target, PG1, seed=1)[1]
    assert json.loads((target / "metadata.json").read_text())["provenance"]["seed"] == 1
    assert not list(target.glob("*.partial"))


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr(make_big_preset.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(OSError, match=r"needs 0\.00 GB .* but only 0\.00 GB is free .* choose another directory"):
        make_preset(tmp_path / "p", PG1)
    assert not (tmp_path / "p").exists()


def test_workloads_are_the_issue_sizes():
    mid = WORKLOADS["midsize"]
    assert count_params(mid) == 680_011_296  # oracles.md's mid-size model (2.7 GB preset)
    assert (mid.image_size, mid.vit_num_layers, mid.vit_hidden_dim, mid.num_layers, mid.hidden_dim) == (
        224, 2, 1152, 2, 2048)
    assert (mid.num_query_heads, mid.num_key_value_heads, mid.head_dim, mid.intermediate_dim,
            mid.vocabulary_size) == (8, 1, 256, 16384, 257152)
    assert count_params(WORKLOADS["pali_gemma_3b_mix_224"]) == 2_923_335_408


@pytest.mark.keras
@pytest.mark.slow  # importing keras-hub and its first eager call take 10-70 s on a busy 2-core machine
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_keras_hub_loads_the_preset_and_agrees_with_refimpl(tmp_path, storage):
    """keras-hub's own from_preset reads the streamed file; its output equals refimpl's within the float32 bound."""
    pytest.importorskip("keras_hub", reason="keras-hub not installed (the oracle); see oracles.md")
    from conformance.tolerances import resolve
    from tools.keras_oracle import import_keras, model_inputs

    _, keras_hub = import_keras()
    preset, _ = make_preset(tmp_path / "p", PG2, storage=storage)
    inputs = _inputs(PG2)
    keras_model = keras_hub.models.PaliGemmaBackbone.from_preset(str(preset))
    theirs = np.asarray(keras_model(model_inputs(keras_model, inputs)), dtype=np.float32)
    ours = PaliGemmaBackbone.from_preset(preset)(inputs)
    valid = np.concatenate([np.ones((2, PG2.image_sequence_length), bool), inputs["padding_mask"]], axis=1)
    scale = float(np.abs(ours[valid]).max())
    bound = resolve("llm/final_norm", "float32", scale, {})
    assert np.abs(theirs[valid] - ours[valid]).max() <= bound.atol
