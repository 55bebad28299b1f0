"""tools/write_preset.py: presets it writes load back exactly, and hold what keras itself writes.

Round trip: params -> write_preset -> refimpl.weights.load_params gives the same arrays bit for bit (float32
storage), or their bf16 rounding (bfloat16 storage), for drawn configs. Keras comparison: re-writing the weights of
a golden preset (written by keras-hub 0.32 / keras 3.15) gives the same datasets, paths, dtypes, values and layer
names (up to keras' per-session name counters) and the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import strategies as strat
from refimpl.dtypes import Policy, round_to_bfloat16
from refimpl.init import random_params
from refimpl.model import PaliGemmaBackbone, read_preset_config
from refimpl.weights import load_params
from tools.write_preset import main, write_preset

pytestmark = pytest.mark.property

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
KERAS_WRITTEN = ["pg1_basic", "pg2_window", "pg2_mha_caps"]


@given(config=strat.configs(), seed=st.integers(0, 2**16), storage=st.sampled_from(["float32", "bfloat16"]))
def test_round_trip_through_the_reader_is_exact(tmp_path_factory, config, seed, storage):
    directory = tmp_path_factory.mktemp("preset")
    params = random_params(config, seed=seed, dtype=np.float32, perturb=True)
    write_preset(directory, config, params, storage=storage)
    assert read_preset_config(directory) == config
    loaded = load_params(directory, config, Policy("float32")).flat()
    expected = params.flat()
    assert loaded.keys() == expected.keys()
    for field, array in expected.items():
        want = round_to_bfloat16(array) if storage == "bfloat16" else array
        assert loaded[field].dtype == np.float32
        np.testing.assert_array_equal(loaded[field], want, err_msg=field)


def _datasets(path: Path) -> dict[str, tuple]:
    out = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: out.update({name: (obj.dtype, obj[()])})
                          if isinstance(obj, h5py.Dataset) else None)
    return out


def _names(path: Path) -> dict[str, str]:
    out = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: out.update({name: obj.attrs["name"]})
                          if isinstance(obj, h5py.Group) and "name" in obj.attrs else None)
    return out


@pytest.mark.parametrize("case", KERAS_WRITTEN)
def test_rewriting_a_keras_preset_reproduces_its_datasets(case, tmp_path):
    source = GOLDEN / case / "preset"
    if not source.is_dir():
        pytest.skip(f"golden case {case} not present: generate it with `python -m tools.make_goldens`")
    config = read_preset_config(source)
    write_preset(tmp_path, config, load_params(source, config, Policy("float32")))
    keras, ours = _datasets(source / "model.weights.h5"), _datasets(tmp_path / "model.weights.h5")
    assert keras.keys() == ours.keys()
    for name, (dtype, value) in keras.items():
        assert ours[name][0] == dtype and np.array_equal(ours[name][1], value), name
    keras_names, our_names = _names(source / "model.weights.h5"), _names(tmp_path / "model.weights.h5")
    for group, name in our_names.items():  # keras numbers names per session: pali_gemma_vit_2 for a second model
        assert keras_names[group] == name or keras_names[group].startswith(name + "_"), (group, name)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert {k: v for k, v in written["config"].items() if k != "name"} == \
           {k: v for k, v in original["config"].items() if k != "name"}
    assert written["class_name"] == original["class_name"]


def test_command_line_writes_a_loadable_preset(tmp_path, capsys):
    assert main([str(tmp_path / "p"), "--case", "pg1_basic", "--seed", "3", "--storage", "bfloat16"]) == 0
    model = PaliGemmaBackbone.from_preset(tmp_path / "p", dtype="bfloat16")
    assert model.config == read_preset_config(GOLDEN / "pg1_basic" / "preset")
    assert "wrote" in capsys.readouterr().out


def test_params_that_do_not_fit_the_config_are_refused(tmp_path):
    config = read_preset_config(GOLDEN / "pg1_basic" / "preset")
    params = random_params(config.replace(hidden_dim=42), seed=0)
    with pytest.raises(ValueError, match="params field 'vit.proj_kernel' has shape"):
        write_preset(tmp_path, config, params)
    assert not (tmp_path / "model.weights.h5").exists()
