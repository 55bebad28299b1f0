"""refimpl.weights: real keras-hub files in every layout, then keras-free corruption cases built with h5py.

The keras tests compare every params field with the keras variable it comes from, found through keras' own layer
objects (never through refimpl's SCHEMA) and re-laid-out by the index rules of refimpl/params.py, written out below
as explicit concatenations (``heads_in``, ``heads_out``, ``conv_matrix``) rather than the reader's strided views.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from refimpl import weights
from refimpl.config import PaliGemmaConfig, count_params
from refimpl.dtypes import Policy, round_to_bfloat16
from refimpl.weights import (LAYOUT_KERAS3, LAYOUT_KERAS213, LAYOUT_LEGACY, LAYOUT_SHARDED, SCHEMA, WeightFileError,
                             check_weight_file, expected_entries, iter_decoder_blocks, keras_name_suffix, load_params,
                             open_weight_file, read_stored_variable, rounds_to_bfloat16)
from tests.memory import traced_peak

PG1 = dict(vocabulary_size=97, image_size=28, vit_patch_size=7, vit_hidden_dim=24, vit_num_heads=3, vit_num_layers=2,
           vit_intermediate_dim=37, num_layers=3, num_query_heads=4, num_key_value_heads=1, hidden_dim=40,
           intermediate_dim=58, head_dim=10)
PG2 = dict(PG1, num_key_value_heads=2, use_post_attention_norm=True, use_post_ffw_norm=True,
           attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0, use_sliding_window_attention=True,
           sliding_window_size=4)
CONFIGS = {"pg1": PG1, "pg2": PG2}
TOKEN = "layers/reversible_embedding/vars/0"
QUERY_1 = "layers/pali_gemma_decoder_block_1/attention/query_dense/vars/0"
F32 = Policy("float32")
REPO = Path(__file__).resolve().parents[2]


# ---- the layout rules of refimpl/params.py, written independently of the reader ----------------------------------
def heads_in(kernel):  # f[X, D, H] -> f[D, X*H]: column x*H + h holds kernel[x, :, h]
    return np.concatenate(list(kernel), axis=1)


def heads_out(kernel):  # f[N, H, D] -> f[N*H, D]: row n*H + h holds kernel[n, h, :]
    return np.concatenate(list(kernel), axis=0)


def conv_matrix(kernel):  # f[P, P, 3, Dv] -> f[P*P*3, Dv]: row (ph*P + pw)*3 + c, a patch in (row, col, channel) order
    p = kernel.shape[0]
    return np.stack([kernel[ph, pw, c] for ph in range(p) for pw in range(p) for c in range(3)])


def relayout(field, array):
    if field == "vit.patch_kernel":
        return conv_matrix(array)
    if re.fullmatch(r"blocks\[\d+\]\.w[qkv]", field):
        return heads_in(array)
    if re.fullmatch(r"blocks\[\d+\]\.wo", field):
        return heads_out(array)
    return array


def flatten(params) -> dict[str, np.ndarray]:
    """params field ("blocks[1].wq", ...) -> array, for every array the params hold."""
    out = {f"vit.{name}": a for name, a in params.vit.arrays()}
    for j, block in enumerate(params.vit.blocks):
        out.update({f"vit.blocks[{j}].{name}": a for name, a in block.arrays()})
    for i, block in enumerate(params.blocks):
        out.update({f"blocks[{i}].{name}": a for name, a in block.arrays()})
    out["token_embedding"], out["final_norm"] = params.token_embedding, params.final_norm
    return out


# ---- real keras-hub files, written by a child process ------------------------------------------------------------
def keras_reference(keras, backbone) -> dict[str, np.ndarray]:
    """params field -> the keras variable it must equal (as float32), found through keras' layer objects."""
    def value(variable):
        return np.asarray(keras.ops.convert_to_numpy(variable)).astype(np.float32)

    vit = backbone.vit_encoder
    encoder = vit.get_layer("image_encoder")
    embeddings, classifier = encoder.vision_embeddings, vit.get_layer("image_classifier")
    ref = {"vit.patch_kernel": conv_matrix(value(embeddings.patch_embedding.kernel)),
           "vit.patch_bias": value(embeddings.patch_embedding.bias),
           "vit.position_embedding": value(embeddings.position_embedding.embeddings),
           "vit.encoder_ln_gamma": value(encoder.encoder_layer_norm.gamma),
           "vit.encoder_ln_beta": value(encoder.encoder_layer_norm.beta),
           "vit.proj_kernel": value(classifier.kernel), "vit.proj_bias": value(classifier.bias),
           "token_embedding": value(backbone.token_embedding.embeddings),
           "final_norm": value(backbone.layer_norm.scale)}
    for j, block in enumerate(encoder.resblocks):
        f = f"vit.blocks[{j}]."
        attn = block.attn
        for ours, dense in (("q", attn.query_proj), ("k", attn.key_proj), ("v", attn.value_proj), ("o", attn.out_proj)):
            ref[f"{f}w{ours}"], ref[f"{f}b{ours}"] = value(dense.kernel), value(dense.bias)
        for n, norm in ((1, block.layer_norm_1), (2, block.layer_norm_2)):
            ref[f"{f}ln{n}_gamma"], ref[f"{f}ln{n}_beta"] = value(norm.gamma), value(norm.beta)
        for n, dense in ((1, block.mlp_dense_1), (2, block.mlp_dense_2)):
            ref[f"{f}mlp{n}_kernel"], ref[f"{f}mlp{n}_bias"] = value(dense.kernel), value(dense.bias)
    for i, block in enumerate(backbone.transformer_layers):
        f = f"blocks[{i}]."
        attention = block.attention
        ref[f + "wq"] = heads_in(value(attention.query_dense.kernel))
        ref[f + "wk"] = heads_in(value(attention.key_dense.kernel))
        ref[f + "wv"] = heads_in(value(attention.value_dense.kernel))
        ref[f + "wo"] = heads_out(value(attention.output_dense.kernel))
        ref[f + "w_gate"], ref[f + "w_up"] = value(block.gating_ffw.kernel), value(block.gating_ffw_2.kernel)
        ref[f + "w_down"] = value(block.ffw_linear.kernel)
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            if getattr(block, norm, None) is not None:
                ref[f + norm] = value(getattr(block, norm).scale)
    assert len(ref) == len(backbone.weights), "the reference must cover every keras variable"
    return ref


def make_keras_files(root: Path) -> None:
    """Child-process entry point: every keras file variant of both configs, plus keras' own reference values."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    import keras_hub

    for seed, (name, config) in enumerate(CONFIGS.items()):
        for dtype in ("float32", "bfloat16"):
            backbone = keras_hub.models.PaliGemmaBackbone(**config, dtype=dtype)
            # Distinct random values everywhere: fresh models have identity norms and zero biases.
            rng = np.random.default_rng(seed)
            for variable in backbone.weights:
                variable.assign(rng.normal(0.0, 0.5, size=variable.shape).astype(np.float32))
            out = root / f"{name}_{dtype}"
            backbone.save_to_preset(str(out / "plain"))
            backbone.save(str(out / "legacy.h5"))  # keras' legacy writer stores bf16 as untagged |V2
            if dtype == "float32":  # 24 KB shards; the largest variable (the token table) is 15.5 KB
                backbone.save_to_preset(str(out / "sharded"), max_shard_size=24 * 1024 / 1024**3)
            np.savez(out / "reference.npz", **keras_reference(keras, backbone))
            (out / "variables.json").write_text(json.dumps({v.path: list(v.shape) for v in backbone.weights}))


@dataclass
class KerasCase:
    config: PaliGemmaConfig
    reference: dict[str, np.ndarray]  # params field -> float32 value
    variables: dict[str, tuple[int, ...]]  # keras variable.path -> shape
    files: dict[str, Path]


def _rename_layers_groups(path: Path):
    """Turn a keras 3 file into the keras 2.13 layout: every ``layers`` group becomes _layer_checkpoint_dependencies."""
    with h5py.File(path, "r+") as f:
        f.move("layers/pali_gemma_vit/layers", "layers/pali_gemma_vit/_layer_checkpoint_dependencies")
        f.move("layers", "_layer_checkpoint_dependencies")


@pytest.fixture(scope="session")
def keras_cases(tmp_path_factory) -> dict[tuple[str, str], KerasCase]:
    """Files written by keras-hub in a child process, so keras never runs inside the test process.

    keras' random initializers compile one XLA program per variable shape, about 0.3-1 s each on a CPU; the child
    compiles them unoptimised (5-8x faster), which cannot change anything we check since every value is overwritten.
    """
    if importlib.util.find_spec("keras_hub") is None:
        pytest.skip("keras-hub not installed")
    root = tmp_path_factory.mktemp("keras_weights")
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("KERAS_BACKEND", "jax")
    done = subprocess.run([sys.executable, __file__, str(root)], env=env, capture_output=True, text=True,
                          timeout=900)
    if done.returncode:
        pytest.fail(f"keras-hub failed to write the test files:\n{done.stderr[-4000:]}")
    cases = {}
    for name, config in CONFIGS.items():
        for dtype in ("float32", "bfloat16"):
            out = root / f"{name}_{dtype}"
            files = {"plain": out / "plain", "legacy": out / "legacy.h5", "sharded": out / "sharded",
                     "keras213": out / "keras213.weights.h5"}
            if dtype == "float32":
                shutil.copy(files["plain"] / "model.weights.h5", files["keras213"])
                _rename_layers_groups(files["keras213"])
            with np.load(out / "reference.npz", allow_pickle=False) as reference:
                reference = {key: reference[key] for key in reference.files}
            variables = {k: tuple(v) for k, v in json.loads((out / "variables.json").read_text()).items()}
            cases[name, dtype] = KerasCase(PaliGemmaConfig(**config), reference, variables, files)
    return cases


FORMATS = [("float32", "plain", LAYOUT_KERAS3, "float32"), ("float32", "sharded", LAYOUT_SHARDED, "float32"),
           ("float32", "legacy", LAYOUT_LEGACY, "float32"), ("float32", "keras213", LAYOUT_KERAS213, "float32"),
           # keras >= 3.0.5 tags bf16 datasets; its legacy writer stores the same |V2 data untagged
           ("bfloat16", "plain", LAYOUT_KERAS3, "bfloat16"), ("bfloat16", "legacy", LAYOUT_LEGACY, "bfloat16")]


@pytest.mark.keras
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype, fmt, layout, stored", FORMATS)
def test_every_field_equals_its_keras_variable(keras_cases, name, dtype, fmt, layout, stored):
    case = keras_cases[name, dtype]
    with open_weight_file(case.files[fmt]) as weight_file:
        assert weight_file.layout == layout
        assert {info.dtype for info in weight_file.entries.values()} == {stored}
        if fmt == "sharded":
            assert len(weight_file.files) >= 3
        if layout in (LAYOUT_KERAS3, LAYOUT_SHARDED):  # keras >= 3.10 names layers, so the name check is active
            assert weight_file.recorded_layer_names(QUERY_1)[-3:] == ["decoder_block_1", "attention", "query"]
    got = flatten(load_params(case.files[fmt], case.config, F32))
    assert got.keys() == case.reference.keys()
    for field, expected in case.reference.items():
        assert got[field].dtype == np.float32 and got[field].flags.c_contiguous, field
        np.testing.assert_array_equal(got[field], expected, err_msg=field)


@pytest.mark.keras
@pytest.mark.parametrize("name", CONFIGS)
def test_schema_lists_exactly_what_keras_writes(keras_cases, name):
    case = keras_cases[name, "float32"]
    datasets = {}
    with h5py.File(case.files["plain"] / "model.weights.h5", "r") as f:
        f.visititems(lambda path, obj: datasets.update({path: obj.shape}) if isinstance(obj, h5py.Dataset) else None)
    assert {k: e.shape for k, e in expected_entries(case.config).items()} == datasets
    assert {k: e.shape for k, e in expected_entries(case.config, "variable_path").items()} == case.variables


@pytest.mark.keras
def test_policies_round_the_right_fields(keras_cases):
    case = keras_cases["pg2", "float32"]
    path = case.files["plain"]
    kept = {row.field.replace("{j}", "0") for row in SCHEMA if not row.autocast} - {"vit.position_embedding",
                                                                                    "token_embedding"}
    assert kept == {"vit.encoder_ln_gamma", "vit.encoder_ln_beta", "vit.blocks[0].ln1_gamma",
                    "vit.blocks[0].ln1_beta", "vit.blocks[0].ln2_gamma", "vit.blocks[0].ln2_beta"}
    f64 = flatten(load_params(path, case.config, Policy("float64")))
    bf16 = flatten(load_params(path, case.config, Policy("bfloat16")))
    mixed = flatten(load_params(path, case.config, Policy("mixed_bfloat16")))
    for field, ref in case.reference.items():
        assert f64[field].dtype == np.float64
        np.testing.assert_array_equal(f64[field], ref.astype(np.float64), err_msg=field)
        np.testing.assert_array_equal(bf16[field], round_to_bfloat16(ref), err_msg=field)
        stays = re.sub(r"\[\d+\]", "[0]", field) in kept
        np.testing.assert_array_equal(mixed[field], ref if stays else round_to_bfloat16(ref), err_msg=field)
        assert stays or not np.array_equal(ref, round_to_bfloat16(ref)), "random values are not bf16-exact"


@pytest.mark.keras
def test_bf16_file_widens_exactly_under_every_policy(keras_cases):
    case = keras_cases["pg1", "bfloat16"]
    for policy in ("float64", "bfloat16", "mixed_bfloat16"):
        got = flatten(load_params(case.files["plain"], case.config, Policy(policy)))
        for field, ref in case.reference.items():
            np.testing.assert_array_equal(got[field], ref, err_msg=f"{policy} {field}")


@pytest.mark.keras
def test_real_file_cut_in_half_is_a_weight_file_error(keras_cases, tmp_path):
    source = keras_cases["pg1", "float32"].files["plain"] / "model.weights.h5"
    cut = tmp_path / "cut.weights.h5"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(WeightFileError, match="truncated") as error:
        load_params(cut, keras_cases["pg1", "float32"].config, F32)
    assert str(cut) in str(error.value)


@pytest.mark.keras
def test_config_mismatch_on_a_real_file_lists_every_problem(keras_cases):
    case = keras_cases["pg2", "float32"]
    with pytest.raises(WeightFileError) as error:
        load_params(case.files["sharded"], keras_cases["pg1", "float32"].config, F32)
    message = str(error.value)
    assert LAYOUT_SHARDED in message and str(case.files["sharded"]) in message
    assert "unexpected entry 'layers/pali_gemma_decoder_block_2/post_ffw_norm/vars/0'" in message
    assert re.search(r"wrong shape for entry 'layers/pali_gemma_decoder_block/attention/key_dense/vars/0' "
                     r"\(params blocks\[0\]\.wk\) at .*: expected \(1, 40, 10\), found \(2, 40, 10\)", message)


@pytest.mark.keras
def test_iter_decoder_blocks_streams_the_same_blocks(keras_cases):
    case = keras_cases["pg2", "float32"]
    with open_weight_file(case.files["legacy"]) as weight_file:
        blocks = list(iter_decoder_blocks(weight_file, case.config, F32))
    assert len(blocks) == 3
    np.testing.assert_array_equal(blocks[2].post_ffw_norm, case.reference["blocks[2].post_ffw_norm"])
    np.testing.assert_array_equal(blocks[1].wk, case.reference["blocks[1].wk"])


# ---- keras-free: small files written with h5py ---------------------------------------------------------------------
CONFIG = PaliGemmaConfig(**PG1)


def _encode(data: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray]:
    """(array to store, the float32 values it holds) for a storage kind."""
    if storage == "float16":
        stored = data.astype(np.float16)
        return stored, stored.astype(np.float32)
    if storage.startswith("bf16"):
        exact = round_to_bfloat16(data)
        return (exact.view(np.uint32) >> 16).astype("<u2").view("V2"), exact
    return data, data


def write_weights(path: Path, config=CONFIG, storage="float32", seed=0) -> dict[str, np.ndarray]:
    """A .weights.h5 in keras' object-path layout; returns object path -> stored value (float32)."""
    rng = np.random.default_rng(seed)
    values = {}
    with h5py.File(path, "w") as f:
        f.create_group("vars")  # keras writes empty vars groups for objects without variables
        f.create_group("layers/input_layer/vars")
        for key, exp in expected_entries(config).items():
            stored, values[key] = _encode(rng.normal(size=exp.shape).astype(np.float32), storage)
            dataset = f.create_dataset(key, data=stored)
            if storage == "bf16_tagged":
                dataset.attrs["dtype"] = "bfloat16"
    return values


def expected_params(values: dict[str, np.ndarray], config=CONFIG, naming="object_path") -> dict[str, np.ndarray]:
    return {exp.field: relayout(exp.field, values[key]) for key, exp in expected_entries(config, naming).items()}


def assert_params_equal(params, expected):
    got = flatten(params)
    assert got.keys() == expected.keys()
    for field in expected:
        np.testing.assert_array_equal(got[field], expected[field], err_msg=field)


@pytest.fixture
def weights_file(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "model.weights.h5"
    return path, write_weights(path)


def load_error(path, config=CONFIG) -> str:
    with pytest.raises(WeightFileError) as error:
        load_params(path, config, F32)
    return str(error.value)


def test_keras_name_suffix():
    assert [keras_name_suffix(i) for i in (0, 1, 2, 10)] == ["", "_1", "_2", "_10"]
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError):
            keras_name_suffix(bad)


def test_schema_counts_every_parameter_of_a_full_size_preset():
    # pali_gemma_3b_mix_224 (spec 10.3): keras-hub's preset metadata says 2,923,335,408 parameters.
    config = PaliGemmaConfig(vocabulary_size=257152, image_size=224, num_layers=18, num_query_heads=8,
                             num_key_value_heads=1, hidden_dim=2048, intermediate_dim=32768, head_dim=256,
                             vit_patch_size=14, vit_num_heads=16, vit_hidden_dim=1152, vit_num_layers=27,
                             vit_intermediate_dim=4304)
    entries = expected_entries(config)
    assert sum(int(np.prod(e.shape)) for e in entries.values()) == 2_923_335_408
    assert entries[QUERY_1.replace("block_1", "block_17")].shape == (8, 2048, 256)
    assert "layers/pali_gemma_vit/layers/pali_gemma_vit_encoder/resblocks/pali_gemma_vit_encoder_block_26/" \
           "mlp_dense_1/vars/0" in entries
    table = weights.schema_table().splitlines()
    assert len(table) == 1 + len(SCHEMA) and any(line.startswith("blocks[{i}].wq ") for line in table)
    for name in CONFIGS:
        small = PaliGemmaConfig(**CONFIGS[name])
        assert sum(int(np.prod(e.shape)) for e in expected_entries(small).values()) == count_params(small)


def test_rounding_rule():
    keep = {"vit.encoder_ln_gamma", "vit.encoder_ln_beta", "vit.blocks[{j}].ln1_gamma",
            "vit.blocks[{j}].ln1_beta", "vit.blocks[{j}].ln2_gamma", "vit.blocks[{j}].ln2_beta"}
    for row in SCHEMA:
        assert not rounds_to_bfloat16(row, Policy("float32")) and not rounds_to_bfloat16(row, Policy("float64"))
        assert rounds_to_bfloat16(row, Policy("bfloat16"))
        assert rounds_to_bfloat16(row, Policy("mixed_bfloat16")) == (row.field not in keep), row.field


@pytest.mark.parametrize("storage", ["float32", "float16", "bf16_tagged", "bf16_untagged"])
def test_stored_dtypes_decode_exactly(tmp_path, storage):
    path = tmp_path / "x.weights.h5"
    values = write_weights(path, storage=storage)
    with open_weight_file(path) as weight_file:
        assert weight_file.layout == LAYOUT_KERAS3
        assert weight_file.entries[TOKEN][:2] == ((97, 40), "bfloat16" if storage.startswith("bf16") else storage)
    assert_params_equal(load_params(path, CONFIG, F32), expected_params(values))
    if storage == "bf16_untagged":  # the widening itself, by hand: 0x3FC0 is 1.5, 0xC000 is -2
        with h5py.File(path, "r+") as f:
            f[TOKEN][0, :2] = np.array([0x3FC0, 0xC000], "<u2").view("V2")
        assert list(load_params(path, CONFIG, F32).token_embedding[0, :2]) == [1.5, -2.0]


def test_slab_reads_match_whole_reads(tmp_path, monkeypatch):
    f32_path, bf16_path = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    f32_values, bf16_values = write_weights(f32_path), write_weights(bf16_path, storage="bf16_tagged")
    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 33)  # rows of 40 or 400 values split into smaller slabs
    assert_params_equal(load_params(bf16_path, CONFIG, F32), expected_params(bf16_values))
    rounded = {k: round_to_bfloat16(v) for k, v in f32_values.items()}
    assert_params_equal(load_params(f32_path, CONFIG, Policy("bfloat16")), expected_params(rounded))


def test_bf16_decode_never_holds_two_copies(tmp_path, monkeypatch):
    config = CONFIG.replace(vocabulary_size=30011)  # token table f32[30011, 40]: 4.8 MB, 2.4 MB stored as bf16
    path = tmp_path / "big.weights.h5"
    write_weights(path, config, storage="bf16_untagged")
    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 1 << 14)
    peak, params = traced_peak(lambda: load_params(path, config, F32))
    # Widening a whole tensor at once would need its raw bits, a uint32 copy and the result: over 2x the table.
    assert peak < params.nbytes + (1 << 20), (peak, params.nbytes)


def test_missing_entry(weights_file):
    path, _ = weights_file
    with h5py.File(path, "r+") as f:
        del f[QUERY_1]
    message = load_error(path)
    assert str(path) in message and LAYOUT_KERAS3 in message
    assert f"missing entry '{QUERY_1}' (params blocks[1].wq): expected shape (4, 40, 10)" in message


def test_unexpected_entry_but_empty_vars_groups_are_fine(weights_file):
    path, values = weights_file
    with h5py.File(path, "r+") as f:
        f.create_group("layers/pali_gemma_decoder_block/attention/rope_layer/vars")
    load_params(path, CONFIG, F32)
    extra = QUERY_1[:-1] + "1"
    with h5py.File(path, "r+") as f:
        f[extra] = np.zeros(3, np.float32)
    assert f"unexpected entry '{extra}' at {path}:/{extra}: shape (3,), float32" in load_error(path)


def test_wrong_shape(weights_file):
    path, _ = weights_file
    with h5py.File(path, "r+") as f:
        del f[QUERY_1]
        f[QUERY_1] = np.zeros((4, 40, 11), np.float32)
    message = load_error(path)
    assert f"wrong shape for entry '{QUERY_1}' (params blocks[1].wq) at {path}:/{QUERY_1}: expected (4, 40, 10), " \
           f"found (4, 40, 11)" in message


def test_absurd_declared_shape_fails_before_any_allocation(weights_file):
    path, _ = weights_file
    with h5py.File(path, "r+") as f:
        del f[TOKEN]
        f.create_dataset(TOKEN, shape=(2**40, 2**20), dtype="f4", chunks=(1, 1024))  # 4 EiB declared, none stored
    with open_weight_file(path) as weight_file:
        assert weight_file.entries[TOKEN][:2] == ((2**40, 2**20), "float32")
    peak, message = traced_peak(lambda: load_error(path))
    assert "expected (97, 40), found (1099511627776, 1048576)" in message
    assert peak < 8 << 20, peak


@pytest.mark.parametrize("data, found", [(np.zeros((97, 40), np.int32), "int32"),
                                         (np.full((97, 40), b"ab"), "string"),
                                         (np.zeros((97, 40), [("a", "f4"), ("b", "f4")]), "compound")])
def test_wrong_dtype(weights_file, data, found):
    path, _ = weights_file
    with h5py.File(path, "r+") as f:
        del f[TOKEN]
        f[TOKEN] = data
    assert f"wrong dtype for entry '{TOKEN}' (params token_embedding) at {path}:/{TOKEN}: expected one of " \
           f"('float16', 'bfloat16', 'float32', 'float64'), found {found}" in load_error(path)


def test_opaque_data_tagged_as_something_else_is_rejected(weights_file):
    path, _ = weights_file
    with h5py.File(path, "r+") as f:
        f[TOKEN].attrs["dtype"] = "float8_e4m3fn"
    assert "found float32 (tagged dtype='float8_e4m3fn')" in load_error(path)
    with h5py.File(path, "r+") as f:
        del f[TOKEN]
        f[TOKEN] = np.zeros((97, 40), "<u2").view("V2")
        f[TOKEN].attrs["dtype"] = "float16"
    assert "found opaque2 (tagged dtype='float16')" in load_error(path)


def test_declared_but_never_written_data(weights_file):
    path, _ = weights_file
    with h5py.File(path, "r+") as f:
        del f[TOKEN]
        f.create_dataset(TOKEN, shape=(97, 40), dtype="f4")  # HDF5 would read back zeros
    assert f"entry '{TOKEN}' (params token_embedding) at {path}:/{TOKEN} declares shape (97, 40) but its data was " \
           "never (fully) written" in load_error(path)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_file(weights_file, keep):
    path, _ = weights_file
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    message = load_error(path)
    assert str(path) in message and "truncated" in message


def test_not_a_weight_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    assert "neither an HDF5 file nor a JSON weight map" in load_error(text)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_group("foo")
    assert "unknown layout" in load_error(tmp_path / "other.h5")
    (tmp_path / "empty").mkdir()
    assert "preset directory holds neither" in load_error(tmp_path / "empty")
    assert "no such file" in load_error(tmp_path / "missing.weights.h5")


def test_links_are_refused(weights_file):
    path, _ = weights_file
    with h5py.File(path, "r+") as f:
        f["layers/elsewhere"] = h5py.ExternalLink("/etc/passwd", "/x")
    assert "layers/elsewhere is a ExternalLink" in load_error(path)


def test_keras213_alias_and_duplicates(weights_file):
    path, values = weights_file
    _rename_layers_groups(path)
    with open_weight_file(path) as weight_file:
        assert weight_file.layout == LAYOUT_KERAS213 and TOKEN in weight_file.entries
    assert_params_equal(load_params(path, CONFIG, F32), expected_params(values))
    with h5py.File(path, "r+") as f:
        f["layers/reversible_embedding/vars/0"] = np.zeros((97, 40), np.float32)
    assert f"entry '{TOKEN}' appears twice" in load_error(path)


def test_recorded_layer_names_must_agree_with_the_schema(weights_file):
    path, values = weights_file
    with h5py.File(path, "r+") as f:  # keras >= 3.10 writes each layer's name on its vars group
        for key, exp in expected_entries(CONFIG).items():
            if key.startswith("layers/pali_gemma_decoder_block"):
                groups = key.split("/")[1:-2]
                names = exp.schema.variable_path.replace("{i}", str(exp.index)).split("/")[:-1]
                for n, name in enumerate(names):
                    f.require_group("layers/" + "/".join(groups[: n + 1]) + "/vars").attrs["name"] = name
    assert_params_equal(load_params(path, CONFIG, F32), expected_params(values))
    with h5py.File(path, "r+") as f:  # blocks whose class-counter order disagrees with their layer names
        f["layers/pali_gemma_decoder_block/vars"].attrs["name"] = "decoder_block_1"
        f["layers/pali_gemma_decoder_block_1/vars"].attrs["name"] = "decoder_block_0"
    message = load_error(path)
    assert "layer names recorded along entry 'layers/pali_gemma_decoder_block/attention/query_dense/vars/0'" in message
    assert "['decoder_block_1', 'attention', 'query']; expected them to end with ['decoder_block_0'" in message


# ---- sharded -------------------------------------------------------------------------------------------------------
def write_sharded(directory: Path, values: dict[str, np.ndarray], shards=3) -> Path:
    """keras' ShardedH5IOStore layout: entries spread over shards, one group split across two of them."""
    weight_map = {}
    handles = [h5py.File(directory / f"model_{n:05}.weights.h5", "w") for n in range(shards)]
    for n, (key, value) in enumerate(values.items()):
        shard = n % shards
        handles[shard][key] = value
        group = "/" + key.rsplit("/", 1)[0]
        weight_map.setdefault(group, []).append(f"model_{shard:05}.weights.h5")
    for handle in handles:
        handle.close()
    weight_map = {g: names[0] if len(names) == 1 else names for g, names in weight_map.items()}
    path = directory / "model.weights.json"
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def test_sharded(tmp_path, weights_file):
    _, values = weights_file
    directory = tmp_path / "preset"
    directory.mkdir()
    path = write_sharded(directory, values)
    with open_weight_file(directory) as weight_file:
        assert weight_file.layout == LAYOUT_SHARDED and len(weight_file.files) == 3
    assert_params_equal(load_params(path, CONFIG, F32), expected_params(values))
    (directory / "model_00001.weights.h5").unlink()
    assert "shard 'model_00001.weights.h5' listed in the weight map is missing" in load_error(path)


@pytest.mark.parametrize("document, message", [
    ({"weight_map": {"/layers/x/vars": "../model_00000.weights.h5"}}, "must be plain file names"),
    ({"weight_map": {"/layers/x/vars": []}}, "must be a shard file name or a non-empty list"),
    ({"metadata": {}}, "expected a JSON object with a 'weight_map'"),
    ([1, 2], "expected a JSON object with a 'weight_map'"),
])
def test_bad_weight_map(tmp_path, document, message):
    path = tmp_path / "model.weights.json"
    path.write_text(json.dumps(document))
    assert message in load_error(path)


def test_shard_entry_not_in_the_weight_map(tmp_path, weights_file):
    _, values = weights_file
    path = write_sharded(tmp_path, values)
    with h5py.File(tmp_path / "model_00000.weights.h5", "r+") as f:
        f["layers/stray/vars/0"] = np.zeros(2, np.float32)
    assert "entry 'layers/stray/vars/0' is in shard model_00000.weights.h5 but the weight map" in load_error(path)


# ---- legacy keras-2 .h5 --------------------------------------------------------------------------------------------
def _set_names(group, name: str, names: list[str], chunks: int):
    array = np.array([n.encode() for n in names]) if names else np.array([])  # keras writes [] as float64
    if chunks == 1:
        group.attrs[name] = array
    for n, part in enumerate(np.array_split(array, chunks) if chunks > 1 else []):
        group.attrs[f"{name}{n}"] = part


def write_legacy(path: Path, config=CONFIG, chunks=2, seed=0) -> dict[str, np.ndarray]:
    """``model.save("x.h5")`` layout with layer_names and the ViT's weight_names split into chunks, names ending
    in ``:0`` (tf.keras style) for the ViT; returns variable path -> value."""
    rng = np.random.default_rng(seed)
    entries = expected_entries(config, "variable_path")
    layer_of = {key: "pali_gemma_vit_3" if key.startswith("image_") else key.split("/")[0] for key in entries}
    layers = ["token_ids", "images", "token_embedding", "pali_gemma_vit_3", "padding_mask", "response_mask",
              *[f"decoder_block_{i}" for i in range(config.num_layers)], "final_normalization"]
    values = {key: rng.normal(size=exp.shape).astype(np.float32) for key, exp in entries.items()}
    with h5py.File(path, "w") as f:
        group = f.create_group("model_weights")
        _set_names(group, "layer_names", layers, chunks)
        for layer in layers:
            layer_group = group.create_group(layer)
            names = [key + (":0" if layer.startswith("pali") else "") for key in entries if layer_of[key] == layer]
            _set_names(layer_group, "weight_names", names, 3 if layer.startswith("pali") else 1)
            for name in names:
                layer_group[name] = values[name.removesuffix(":0")]
        _set_names(group.create_group("top_level_model_weights"), "weight_names", [], 1)
    return values


def test_legacy_with_chunked_name_attributes(tmp_path):
    path = tmp_path / "model.h5"
    values = write_legacy(path)
    with h5py.File(path, "r") as f:
        assert "layer_names" not in f["model_weights"].attrs and "layer_names1" in f["model_weights"].attrs
        assert "weight_names2" in f["model_weights/pali_gemma_vit_3"].attrs
    with open_weight_file(path) as weight_file:
        assert weight_file.layout == LAYOUT_LEGACY and weight_file.naming == "variable_path"
    assert_params_equal(load_params(path, CONFIG, F32), expected_params(values, naming="variable_path"))


def test_legacy_unlisted_and_missing_datasets(tmp_path):
    path = tmp_path / "model.h5"
    write_legacy(path, chunks=1)
    with h5py.File(path, "r+") as f:
        f["model_weights/final_normalization/final_normalization/extra"] = np.zeros(2, np.float32)
    message = load_error(path)
    assert LAYOUT_LEGACY in message
    assert "unexpected entry '(unlisted) final_normalization/final_normalization/extra'" in message
    with h5py.File(path, "r+") as f:
        del f["model_weights/final_normalization/final_normalization/extra"]
        del f["model_weights/final_normalization/final_normalization/scale"]
    assert "layer 'final_normalization' lists weight 'final_normalization/scale' but" in load_error(path)


def test_check_weight_file_reads_no_data(weights_file, monkeypatch):
    path, _ = weights_file

    def refuse(*args, **kwargs):
        raise AssertionError("check_weight_file must not read data")

    monkeypatch.setattr(weights, "_fill", refuse)
    with open_weight_file(path) as weight_file:
        plan = check_weight_file(weight_file, CONFIG)
    assert plan["blocks[2].wo"].shape == (4, 10, 40)
    assert plan["blocks[2].wo"].key == "layers/pali_gemma_decoder_block_2/attention/output_dense/vars/0"


if __name__ == "__main__":
    make_keras_files(Path(sys.argv[1]))


def test_read_stored_variable_gives_the_keras_layout(cases):
    """The query kernel as keras stores it, f[N, D, H], equals refimpl's re-laid-out wq f[D, N*H]; an unknown field
    is an error that names it."""
    case = cases["pg1_basic"]
    config = case.parsed_config
    stored = read_stored_variable(case.preset, config, "blocks[1].wq")
    assert stored.shape == (config.num_query_heads, config.hidden_dim, config.head_dim)
    params = load_params(case.preset, config, Policy("float32"))
    np.testing.assert_array_equal(stored.transpose(1, 0, 2).reshape(config.hidden_dim, -1), params.blocks[1].wq)
    with pytest.raises(ValueError, match=r"field='blocks\[9\]\.wq' names no weight"):
        read_stored_variable(case.preset, config, "blocks[9].wq")


def test_params_flat_names_are_the_entries_fields(cases):
    """``PaliGemmaParams.flat()`` names every array by the field the reader fills it from, and nothing else; the
    tree's bytes are those of the file's entries in float32 (re-layouts keep element counts)."""
    for case in cases.values():
        params = load_params(case.preset, case.parsed_config, Policy("float32"))
        with open_weight_file(case.preset) as weights:
            entries = list(expected_entries(case.parsed_config, weights.naming).values())
        assert set(params.flat()) == {e.field for e in entries}
        assert params.nbytes == 4 * sum(math.prod(e.shape) for e in entries)
