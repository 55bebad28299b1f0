"""tools/export_case.py: the hand-written safetensors writer, big_vision names and shapes, the export directory,
and (when torch and transformers are installed) the HF export loaded by transformers' own ``from_pretrained``.

Expected big_vision names and shapes are written out from spec section 14 and the case configs; values are checked
against the raw Keras arrays read from the preset (spec 14: ``q_einsum`` has the Keras query kernel's layout).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conformance import hf_backend
from refimpl.dtypes import Policy
from refimpl.weights import load_params, read_stored_variable
from tools import export_case as ex

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
needs_torch = pytest.mark.skipif(not hf_backend.transformers_available(), reason="transformers/torch not installed")


@pytest.fixture(scope="module")
def exported(cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    for case in cases.values():
        ex.export_case(case, out)
    return out


# ---- safetensors -----------------------------------------------------------------------------------------------
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U8": "u1", "BOOL": "?"}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A minimal independent reader: u64 LE header size, JSON header, then contiguous raw little-endian data."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    metadata = header.pop("__metadata__", {})
    body, arrays, end = data[8 + size:], {}, 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, stop = info["data_offsets"]
        assert begin == end, f"{name}: gap or overlap at byte {begin}"  # the format forbids holes
        arrays[name] = np.frombuffer(body[begin:stop], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        end = stop
    assert end == len(body), "trailing bytes after the last tensor"
    return arrays, metadata


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"w": rng.standard_normal((3, 5)).astype(np.float32), "a.b.c": np.arange(7, dtype=np.int64),
            "half": rng.standard_normal(4).astype(np.float16), "double": np.array(2.5),  # 0-d
            "empty": np.zeros((0, 3), np.float32), "flags": np.array([True, False, True]),
            "bytes": np.arange(250, 256, dtype=np.uint8), "i32": np.array([[-1, 2]], np.int32),
            "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T}  # not C-contiguous


def test_safetensors_round_trip(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    written = ex.write_safetensors(path, tensors, {"format": "pt"})
    assert written == path.stat().st_size
    size = int.from_bytes(path.read_bytes()[:8], "little")
    assert size % 8 == 0  # space-padded header: the data starts 8-byte aligned
    arrays, metadata = read_safetensors(path)
    assert metadata == {"format": "pt"} and set(arrays) == set(tensors)
    for name, array in tensors.items():
        assert arrays[name].shape == array.shape and arrays[name].dtype == array.dtype.newbyteorder("<")
        np.testing.assert_array_equal(arrays[name], array)


def test_safetensors_bytes_by_hand(tmp_path):
    path = tmp_path / "one.safetensors"
    ex.write_safetensors(path, {"x": np.array([1.0, -2.0], np.float32)})
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    assert json.loads(data[8:8 + size]) == {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert data[8 + size:] == b"\x00\x00\x80\x3f" + b"\x00\x00\x00\xc0"  # 1.0f and -2.0f, little-endian
    ex.write_safetensors(path, {"y": np.array([1], dtype=">i4")})  # big-endian input is written little-endian
    assert path.read_bytes()[-4:] == b"\x01\x00\x00\x00"


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors not installed")
def test_safetensors_package_reads_it(tmp_path):
    from safetensors.numpy import load_file

    tensors = sample_tensors()
    ex.write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt"})
    loaded = load_file(tmp_path / "t.safetensors")
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], array)


@pytest.mark.parametrize("tensors, metadata, match", [
    ({"c": np.zeros(2, np.complex64)}, None, "'c': dtype complex64"),
    ({"o": np.array([None, 1], dtype=object)}, None, "'o': dtype object"),
    ({"": np.zeros(1, np.float32)}, None, "non-empty string"),
    ({"x": np.zeros(1, np.float32)}, {"format": 1}, "metadata"),
])
def test_safetensors_rejects(tmp_path, tensors, metadata, match):
    with pytest.raises(ex.ExportError, match=match):
        ex.write_safetensors(tmp_path / "bad.safetensors", tensors, metadata)


# ---- big_vision ------------------------------------------------------------------------------------------------
def big_vision_shapes(c, qkv: str) -> dict[str, tuple]:
    """Spec section 14 with the config's numbers; L = decoder layers, Lv = ViT layers."""
    a, m = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/", "img/Transformer/encoderblock/MlpBlock_0/"
    lv, dv, hv, iv, d = c["vit_num_layers"], c["vit_hidden_dim"], c["vit_num_heads"], c["vit_intermediate_dim"], \
        c["hidden_dim"]
    n, k, h, layers, f = c["num_query_heads"], c["num_key_value_heads"], c["head_dim"], c["num_layers"], \
        c["intermediate_dim"] // 2
    p, n_img = c["vit_patch_size"], (c["image_size"] // c["vit_patch_size"]) ** 2
    shapes = {"img/embedding/kernel": (p, p, 3, dv), "img/embedding/bias": (dv,), "img/pos_embedding": (1, n_img, dv),
              "img/Transformer/encoder_norm/scale": (dv,), "img/Transformer/encoder_norm/bias": (dv,),
              "img/head/kernel": (dv, d), "img/head/bias": (d,),
              a + "out/kernel": (lv, hv, dv // hv, dv), a + "out/bias": (lv, dv),
              m + "Dense_0/kernel": (lv, dv, iv), m + "Dense_0/bias": (lv, iv),
              m + "Dense_1/kernel": (lv, iv, dv), m + "Dense_1/bias": (lv, dv),
              "llm/embedder/input_embedding": (c["vocabulary_size"], d), "llm/final_norm/scale": (d,),
              "llm/layers/attn/attn_vec_einsum/w": (layers, n, h, d),
              "llm/layers/mlp/gating_einsum": (layers, 2, d, f), "llm/layers/mlp/linear": (layers, f, d),
              "llm/layers/pre_attention_norm/scale": (layers, d), "llm/layers/pre_ffw_norm/scale": (layers, d)}
    for proj in ("query", "key", "value"):
        shapes[a + f"{proj}/kernel"], shapes[a + f"{proj}/bias"] = (lv, dv, hv, dv // hv), (lv, hv, dv // hv)
    for n_ln in (0, 1):
        for part in ("scale", "bias"):
            shapes[f"img/Transformer/encoderblock/LayerNorm_{n_ln}/{part}"] = (lv, dv)
    if qkv == "separate":
        shapes["llm/layers/attn/q_einsum/w"], shapes["llm/layers/attn/kv_einsum/w"] = (layers, n, d, h), \
            (layers, 2, k, d, h)
    else:
        shapes["llm/layers/attn/qkv_einsum/w"] = (layers, 3, n, d, h)
    if c.get("use_post_attention_norm"):
        shapes["llm/layers/post_attention_norm/scale"] = (layers, d)
    if c.get("use_post_ffw_norm"):
        shapes["llm/layers/post_ffw_norm/scale"] = (layers, d)
    return shapes


@pytest.mark.parametrize("name, qkv", [("pg1_basic", "separate"), ("pg2_window", "separate"),
                                       ("pg2_mha_caps", "fused")])
def test_big_vision_names_and_shapes(exported, cases, name, qkv):
    with np.load(exported / name / "big_vision" / "params.npz", allow_pickle=False) as npz:
        found = {key: npz[key].shape for key in npz.files}
        assert {npz[key].dtype for key in npz.files} == {np.dtype(np.float32)}
    assert found == big_vision_shapes(cases[name].config, qkv)


def raw_keras(case, field: str) -> np.ndarray:
    return read_stored_variable(case.preset, case.parsed_config, field)


def test_big_vision_values_against_raw_keras(cases):
    case = cases["pg2_window"]  # N 6, K 2, 4 layers; ViT 3 layers of 20 wide, 4 heads of 5
    bv = ex.big_vision_params(load_params(case.preset, case.parsed_config, Policy("float32")), case.parsed_config)
    np.testing.assert_array_equal(bv["llm/layers/attn/q_einsum/w"][2], raw_keras(case, "blocks[2].wq"))
    np.testing.assert_array_equal(bv["llm/layers/attn/kv_einsum/w"][3, 0], raw_keras(case, "blocks[3].wk"))
    np.testing.assert_array_equal(bv["llm/layers/attn/kv_einsum/w"][3, 1], raw_keras(case, "blocks[3].wv"))
    np.testing.assert_array_equal(bv["llm/layers/attn/attn_vec_einsum/w"][1], raw_keras(case, "blocks[1].wo"))
    np.testing.assert_array_equal(bv["llm/layers/mlp/gating_einsum"][0, 0], raw_keras(case, "blocks[0].w_gate"))
    np.testing.assert_array_equal(bv["llm/layers/mlp/gating_einsum"][0, 1], raw_keras(case, "blocks[0].w_up"))
    np.testing.assert_array_equal(bv["llm/layers/post_ffw_norm/scale"][2], raw_keras(case, "blocks[2].post_ffw_norm"))
    np.testing.assert_array_equal(bv["img/embedding/kernel"], raw_keras(case, "vit.patch_kernel"))
    key = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    np.testing.assert_array_equal(bv[key + "query/kernel"][1], raw_keras(case, "vit.blocks[1].wq").reshape(20, 4, 5))
    np.testing.assert_array_equal(bv[key + "out/kernel"][2], raw_keras(case, "vit.blocks[2].wo").reshape(4, 5, 20))
    fused = cases["pg2_mha_caps"]  # N = K = 3: big_vision's Gemma keeps q, k, v in one qkv_einsum
    bv = ex.big_vision_params(load_params(fused.preset, fused.parsed_config, Policy("float32")), fused.parsed_config)
    np.testing.assert_array_equal(bv["llm/layers/attn/qkv_einsum/w"][1, 2], raw_keras(fused, "blocks[1].wv"))


def test_big_vision_inputs(exported, cases):
    case = cases["pg1_basic"]
    with np.load(exported / "pg1_basic" / "big_vision" / "inputs.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert arrays["mask_ar"].dtype == np.int32 and arrays["text"].dtype == np.int32
    np.testing.assert_array_equal(arrays["mask_ar"], case.inputs["response_mask"].astype(np.int32))
    np.testing.assert_array_equal(arrays["input_mask"], case.inputs["padding_mask"])
    np.testing.assert_array_equal(arrays["image"], case.inputs["images"])  # golden images are already in [-1, 1]


# ---- the export directory --------------------------------------------------------------------------------------
def test_export_layout_and_record(exported, cases):
    target = exported / "pg1_basic"
    record = json.loads((target / "export.json").read_text())
    expected = {"inputs.npz", "hf/config.json", "hf/model.safetensors", "hf/inputs.safetensors", "hf/inputs.npz",
                "big_vision/params.npz", "big_vision/inputs.npz", "keras/config.json", "keras/metadata.json",
                "keras/model.weights.h5"}
    assert set(record["files"]) == expected
    for rel, info in record["files"].items():
        assert hashlib.sha256((target / rel).read_bytes()).hexdigest() == info["sha256"], rel
    keras = cases["pg1_basic"].preset / "model.weights.h5"
    assert (target / "keras/model.weights.h5").read_bytes() == keras.read_bytes()
    arrays, _ = read_safetensors(target / "hf" / "inputs.safetensors")
    assert set(arrays) == {"input_ids", "pixel_values", "attention_mask", "token_type_ids"}
    assert arrays["input_ids"].shape == (2, 16 + 9) and (arrays["input_ids"][:, :16] == 97).all()
    weights, metadata = read_safetensors(target / "hf" / "model.safetensors")
    assert metadata == {"format": "pt"} and weights["language_model.model.embed_tokens.weight"].shape == (98, 40)
    notes = json.loads((exported / "pg2_window" / "export.json").read_text())["notes"]
    assert any("sliding window" in note for note in notes)


def test_export_refuses_golden_and_existing(cases, tmp_path, exported):
    fake_golden = tmp_path / "golden"
    fake_golden.mkdir()
    assert ex.main(["--golden", str(fake_golden), "--out", str(fake_golden / "exports")]) == 2
    assert not (fake_golden / "exports").exists()
    with pytest.raises(ex.ExportError, match="inside the golden directory"):
        ex.check_output_dir(GOLDEN / "pg1_basic" / "x", GOLDEN)
    with pytest.raises(ex.ExportError, match="already exists"):
        ex.export_case(cases["pg1_basic"], exported)
    with pytest.raises(ex.ExportError, match="formats"):
        ex.export_case(cases["pg1_basic"], tmp_path / "new", formats=("onnx",))


def test_cli_one_case_one_format(tmp_path, cases):
    assert ex.main(["--golden", str(GOLDEN), "--out", str(tmp_path), "--case", "pg1_basic", "--formats", "hf"]) == 0
    assert (tmp_path / "pg1_basic" / "hf" / "model.safetensors").is_file()
    assert not (tmp_path / "pg1_basic" / "big_vision").exists()


# ---- transformers loads the HF export --------------------------------------------------------------------------
def _hf_final_norm(directory: Path) -> tuple[np.ndarray, dict]:
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    model, info = PaliGemmaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager",
                                                                    output_loading_info=True)
    arrays, _ = read_safetensors(directory / "inputs.safetensors")
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    with torch.inference_mode():
        hidden = model(**tensors, output_hidden_states=True, use_cache=False).hidden_states[-1]  # post-norm
    return hidden.numpy(), info


@needs_torch
def test_hf_export_reproduces_golden_final_norm(exported, cases):
    from conformance.harness import CheckOptions, compare_tap

    case = cases["pg1_basic"]
    final_norm, info = _hf_final_norm(exported / "pg1_basic" / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    result = compare_tap(case, "llm/final_norm", case.taps.index("llm/final_norm"), final_norm, CheckOptions(),
                         "float32", "run")
    assert result.status == "pass", result.message


@needs_torch
def test_hf_export_matches_backend_model(exported, cases):
    case = cases["pg2_window"]  # Gemma 2 names; its final_norm differs from keras (window), not from the backend
    final_norm, info = _hf_final_norm(exported / "pg2_window" / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    backend = hf_backend.TransformersBackend()
    backend.prepare(case)
    np.testing.assert_array_equal(final_norm, backend.run(case.inputs, [])["llm/final_norm"])
