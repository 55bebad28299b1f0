"""from_preset over every kind of preset reference, offline; the CLI's info and forward commands."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from refimpl import PaliGemmaBackbone
from refimpl.cli import main
from refimpl.config import ConfigError

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
CASE = GOLDEN / "pg1_basic"


def golden_inputs():
    with np.load(CASE / "inputs.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def reference_output():
    with np.load(CASE / "taps.npz", allow_pickle=False) as data:
        return data["llm/final_norm"]


def test_builtin_name_without_weights_builds_the_architecture():
    # Building the full 3B model would allocate 12 GB of random weights; the offline config is what is checked.
    config = PaliGemmaBackbone.presets["pali_gemma2_mix_3b_224"]["config"]
    assert config["num_layers"] == 26 and config["use_sliding_window_attention"] and config["hidden_dim"] == 2304


def test_builtin_name_without_local_files_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    with pytest.raises(FileNotFoundError) as error:
        PaliGemmaBackbone.from_preset("pali_gemma_3b_mix_224")
    message = str(error.value)
    assert "never downloads" in message and str(tmp_path / "cache" / "pali_gemma_3b_mix_224") in message
    assert "models/keras/paligemma/keras/pali_gemma_3b_mix_224/4" in message


def test_builtin_name_resolves_to_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_REF_CACHE", str(tmp_path))
    shutil.copytree(CASE / "preset", tmp_path / "pali_gemma_3b_224")
    # The cached files are the tiny golden preset, so this only proves the lookup, not the architecture.
    model = PaliGemmaBackbone.from_preset("pali_gemma_3b_224", dtype="float64")
    np.testing.assert_allclose(model(golden_inputs()), reference_output(), rtol=0, atol=1e-12)


def test_kaggle_and_hf_handles_resolve_to_their_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    shutil.copytree(CASE / "preset", tmp_path / "kaggle/models/keras/paligemma/keras/tiny/3")
    shutil.copytree(CASE / "preset", tmp_path / "hf/hub/models--someone--tiny/snapshots/abc123")
    for handle in ("kaggle://keras/paligemma/keras/tiny/3", "kaggle://keras/paligemma/keras/tiny",
                   "hf://someone/tiny"):
        model = PaliGemmaBackbone.from_preset(handle)
        assert model.config.vocabulary_size == 97, handle
    with pytest.raises(FileNotFoundError, match="hf://someone/other"):
        PaliGemmaBackbone.from_preset("hf://someone/other")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a file, a directory, a built-in preset name"):
        PaliGemmaBackbone.from_preset("pali_gemma_4b_unknown")


def test_config_json_class_name_allowlist(tmp_path):
    preset = tmp_path / "preset"
    shutil.copytree(CASE / "preset", preset)
    document = json.loads((preset / "config.json").read_text())
    (preset / "config.json").write_text(json.dumps(dict(document, class_name="os.system")))
    with pytest.raises(ConfigError, match="class 'os.system'.*not allowed"):
        PaliGemmaBackbone.from_preset(preset)
    (preset / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        PaliGemmaBackbone.from_preset(preset)


def test_keras_nlp_config_rescales_inside_the_backbone(tmp_path):
    """keras-nlp 0.12.1-0.15 configs carry include_rescaling=true: [0, 255] pixels, Rescaling(1/127.5, -1) inside.

    keras-hub >= 0.17 ignores the key, so it cannot be the oracle here; the check is the definition of Rescaling
    (one affine op x * (1/127.5) - 1): raw pixels through the rescaling config must give what [-1, 1] pixels give
    through the keras-hub config, to float32 rounding of that affine op.
    """
    preset = tmp_path / "preset"
    shutil.copytree(CASE / "preset", preset)
    document = json.loads((preset / "config.json").read_text())
    document["config"]["include_rescaling"] = True
    document["module"] = "keras_nlp.src.models.pali_gemma.pali_gemma_backbone"
    document["registered_name"] = "keras_nlp>PaliGemmaBackbone"
    (preset / "config.json").write_text(json.dumps(document))
    model = PaliGemmaBackbone.from_preset(preset)
    inputs = golden_inputs()
    pixels = np.round((inputs["images"] + 1) * 127.5).astype(np.float32)  # raw 0..255 values
    expected_inputs = dict(inputs, images=pixels * np.float32(1 / 127.5) - np.float32(1))
    expected = PaliGemmaBackbone.from_preset(CASE / "preset")(expected_inputs)
    np.testing.assert_array_equal(model(dict(inputs, images=pixels)), expected)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        model(dict(inputs, images=pixels / 300 - 1))


def test_cli_info(capsys):
    assert main(["info", str(CASE / "preset")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameter_count"] == PaliGemmaBackbone.from_preset(CASE / "preset").count_params()
    assert report["stored_dtypes"] == ["float32"] and report["image_tokens"] == 16
    assert main(["info", "pali_gemma_3b_mix_224"]) == 0
    assert json.loads(capsys.readouterr().out)["parameter_count"] == 2_923_335_408


@pytest.mark.parametrize("weights", ["read", "mmap", "stream"])
def test_cli_forward_writes_output_and_taps(tmp_path, capsys, weights):
    out = tmp_path / "out.npz"
    args = ["forward", "--preset", str(CASE / "preset"), "--inputs", str(CASE / "inputs.npz"), "--out", str(out),
            "--dtype", "float64", "--taps", "^llm/layer00/", "--weights", weights]
    assert main(args) == 0
    with np.load(out, allow_pickle=False) as data:
        np.testing.assert_allclose(data["llm/final_norm"], reference_output(), rtol=0, atol=1e-12)
        assert "llm/layer00/out" in data.files and "llm/layer01/out" not in data.files


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["forward", "--preset", str(tmp_path), "--inputs", "x.npz", "--out", "y.npz"]) == 2
    assert "no config.json" in capsys.readouterr().err
