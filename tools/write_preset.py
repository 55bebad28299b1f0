"""Write a keras-hub preset directory (config.json, metadata.json, model.weights.h5) for given PaliGemmaParams.

    python -m tools.write_preset OUT_DIR --config CONFIG.json [--seed 0] [--storage float32|bfloat16]
    python -m tools.write_preset OUT_DIR --case pg1_basic           # the config of a golden case, new weights

The weights file is keras 3's ``.weights.h5`` object-path layout (spec section 11.1), as ``save_to_preset`` writes
it: one dataset per variable at ``layers/<object path>/vars/<n>``, keras' stored shapes (query kernel f[N, D, H],
patch kernel f[P, P, 3, Dv], ...), and a ``name`` attribute on every layer's ``vars`` group (keras >= 3.10). bf16
storage is keras' 2-byte opaque data tagged ``dtype="bfloat16"``. The object paths and stored shapes come from
``refimpl.weights.expected_entries`` (the schema that tests/weights checks against files keras itself wrote); the
inverse re-layouts below are written out independently of the reader's views, so a round trip through
``refimpl.weights.load_params`` checks both (tests/property/test_write_preset.py).

Use: test presets for any backend (conformance.properties writes its models with this), and hostile-file fuzzing.
Non-goals: sharded or legacy ``.h5`` output, optimizer state, anything keras needs beyond loading the backbone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from refimpl.config import PaliGemmaConfig, count_params
from refimpl.dtypes import round_to_bfloat16
from refimpl.params import PaliGemmaParams
from refimpl.weights import expected_entries

STORAGES = ("float32", "bfloat16")
BACKBONE_MODULE = "keras_hub.src.models.pali_gemma.pali_gemma_backbone"
REGISTERED_NAME = "keras_hub>PaliGemmaBackbone"
# Object-path components that are containers (lists of layers), not layers: they carry no ``vars`` group.
_CONTAINERS = ("layers", "resblocks")


# ---- params -> keras arrays ------------------------------------------------------------------------------------
def params_array(params: PaliGemmaParams, field: str) -> np.ndarray:
    """The params array named by a schema field such as ``vit.blocks[1].wq`` or ``final_norm``."""
    value: Any = params
    for part in field.split("."):
        match = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        value = getattr(value, match[1])[int(match[2])] if match else getattr(value, part)
    if not isinstance(value, np.ndarray):
        raise ValueError(f"params field {field!r} is {type(value).__name__}, expected an array")
    return value


def to_keras_layout(field: str, array: np.ndarray, stored_shape: tuple[int, ...]) -> np.ndarray:
    """The keras variable for one params array (the inverse of the reader's re-layouts, spelled out).

    patch kernel f[P*P*3, Dv] -> f[P, P, 3, Dv]; decoder wq/wk/wv f[D, X*H] -> f[X, D, H]; wo f[N*H, D] -> f[N, H, D].
    """
    if field == "vit.patch_kernel":
        out = array.reshape(stored_shape)  # row (ph*P + pw)*3 + c is kernel[ph, pw, c]
    elif re.fullmatch(r"blocks\[\d+\]\.w[qkv]", field):
        heads, width, head_dim = stored_shape
        out = array.reshape(width, heads, head_dim).transpose(1, 0, 2)  # column x*H + h is kernel[x, :, h]
    elif re.fullmatch(r"blocks\[\d+\]\.wo", field):
        out = array.reshape(stored_shape)  # row n*H + h is kernel[n, h, :]
    else:
        out = array
    if out.shape != tuple(stored_shape):
        raise ValueError(f"params field {field!r} has shape {array.shape}; the config needs the keras variable "
                         f"shape {tuple(stored_shape)}")
    return out


def keras_arrays(config: PaliGemmaConfig, params: PaliGemmaParams) -> dict[str, np.ndarray]:
    """Object path (``layers/.../vars/0``) -> the keras variable, for every variable of the backbone."""
    return {key: to_keras_layout(exp.field, params_array(params, exp.field), exp.shape)
            for key, exp in expected_entries(config, "object_path").items()}


def vars_names(config: PaliGemmaConfig) -> dict[str, str]:
    """``vars`` group path -> keras layer name, for every layer on the path of a variable (keras >= 3.10).

    A layer's name is read off the variable path (``decoder_block_1/attention/query/kernel``): its layer names,
    aligned from the end with the layer groups of the object path (containers ``layers``/``resblocks`` skipped).
    The ViT model itself is the one layer without a counterpart; keras names it ``vit_name`` or "pali_gemma_vit".
    """
    names = {"vars": "pali_gemma_backbone"}
    variable_paths = {exp.field: key for key, exp in expected_entries(config, "variable_path").items()}
    for object_path, exp in expected_entries(config, "object_path").items():
        parts = object_path.split("/")[:-2]  # drop "vars/<n>"
        layer_names = variable_paths[exp.field].split("/")[:-1]  # drop the variable's own name
        layers = [n for n, part in enumerate(parts) if part not in _CONTAINERS]
        for offset, position in enumerate(reversed(layers), start=1):
            name = layer_names[-offset] if offset <= len(layer_names) else (config.vit_name or "pali_gemma_vit")
            names.setdefault("/".join(parts[: position + 1]) + "/vars", name)
    return names


def _encode(array: np.ndarray, storage: str) -> tuple[np.ndarray, dict[str, str]]:
    """(data to store, dataset attributes) for one variable."""
    if storage == "bfloat16":
        bits = (round_to_bfloat16(array).view(np.uint32) >> np.uint32(16)).astype("<u2")
        return bits.view("V2"), {"dtype": "bfloat16"}
    return np.ascontiguousarray(array, dtype=np.float32), {}


def write_weights(path: str | Path, config: PaliGemmaConfig, params: PaliGemmaParams, *,
                  storage: str = "float32", layer_names: bool = True) -> Path:
    """Write ``params`` as a keras ``.weights.h5`` file at ``path``; returns the path.

    Args:
      storage: "float32" (float64 params are rounded to float32 once) or "bfloat16" (rounded to nearest even).
      layer_names: write the ``name`` attribute of each layer's ``vars`` group, as keras >= 3.10 does.
    Raises:
      ValueError: an unknown storage, or params whose shapes do not fit ``config``.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} must be one of {STORAGES}")
    arrays = keras_arrays(config, params)  # every shape checked before the file is created
    path = Path(path)
    with h5py.File(path, "w") as handle:
        for key, array in arrays.items():
            data, attrs = _encode(array, storage)
            dataset = handle.create_dataset(key, data=data)
            dataset.attrs.update(attrs)
        if layer_names:
            for group, name in vars_names(config).items():
                handle.require_group(group).attrs["name"] = name
    return path


def preset_config_document(config: PaliGemmaConfig, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` of a preset: keras' serialized ``PaliGemmaBackbone`` (spec section 10.2)."""
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype}, "registered_name": None}
    inner = {"name": "pali_gemma_backbone", "trainable": True, "dtype": policy, **config.to_keras_config()}
    return {"module": BACKBONE_MODULE, "class_name": "PaliGemmaBackbone", "config": inner,
            "registered_name": REGISTERED_NAME}


def write_preset(directory: str | Path, config: PaliGemmaConfig, params: PaliGemmaParams, *,
                 storage: str = "float32", layer_names: bool = True) -> Path:
    """Write config.json, metadata.json and model.weights.h5 into ``directory`` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory / "model.weights.h5", config, params, storage=storage, layer_names=layer_names)
    (directory / "config.json").write_text(json.dumps(preset_config_document(config), indent=4) + "\n")
    metadata = {"keras_version": "3.15.1", "keras_hub_version": "0.32.0", "parameter_count": count_params(config),
                "writer": "tools/write_preset.py"}
    (directory / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    return directory


# ---- command line ----------------------------------------------------------------------------------------------
def _config_from_args(args) -> PaliGemmaConfig:
    from refimpl.model import parse_backbone_config

    if args.case:
        golden = Path(__file__).resolve().parent.parent / "golden" / args.case / "case.json"
        return PaliGemmaConfig.from_keras_config(json.loads(golden.read_text())["config"], source=str(golden))
    return config_from_json_file(args.config)


def config_from_json_file(path: str) -> PaliGemmaConfig:
    """A config.json (a serialized keras object) or a bare JSON object of PaliGemmaBackbone arguments."""
    from refimpl.model import parse_backbone_config

    document = json.loads(Path(path).read_text())
    if "class_name" in document:
        return parse_backbone_config(document, path)
    return PaliGemmaConfig.from_keras_config(document, source=path)


def main(argv=None) -> int:
    from refimpl.init import random_params

    parser = argparse.ArgumentParser(prog="python -m tools.write_preset", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="preset directory to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a config.json, or a JSON object of PaliGemmaBackbone arguments")
    source.add_argument("--case", help="take the config of golden/<case>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random (perturbed) weights")
    parser.add_argument("--storage", choices=STORAGES, default="float32")
    args = parser.parse_args(argv)
    config = _config_from_args(args)
    params = random_params(config, seed=args.seed, dtype=np.float32, perturb=True)
    write_preset(args.out, config, params, storage=args.storage)
    print(f"wrote {args.out} ({count_params(config)} parameters, {args.storage})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
