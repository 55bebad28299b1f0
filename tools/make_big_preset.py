"""Write a full-size keras-hub preset with random weights, one tensor slab at a time (never the whole model).

    python -m tools.make_big_preset /tmp/paligemma-bench/midsize --workload midsize
    python -m tools.make_big_preset /tmp/paligemma-bench/pg1_3b_224 --workload pali_gemma_3b_mix_224
    python -m tools.make_big_preset OUT --config CONFIG.json [--storage bfloat16] [--seed 0] [--force]

The directory gets what keras-hub's ``save_to_preset`` writes: ``config.json``, ``metadata.json`` and
``model.weights.h5`` in keras 3's object-path layout (spec section 11.1), with keras' stored shapes, the ``name``
attribute on every layer's ``vars`` group, and bf16 as 2-byte opaque data tagged ``dtype="bfloat16"``. Object paths,
shapes and layer names come from ``refimpl.weights.expected_entries`` and ``tools.write_preset`` (checked there
against files keras itself wrote), so refimpl's strict reader and keras-hub's ``from_preset`` both load the result.

Memory: each dataset is created empty and filled in row slabs of at most ``CHUNK_ELEMENTS`` values, drawn from a
generator seeded by (seed, entry number), so peak memory is a few slabs (tens of MB) whatever the model size. The
3B preset (2.92e9 weights) is 11.7 GB in float32 and 5.8 GB in bf16. The file is written under a temporary name and
renamed at the end, so an interrupted run never leaves a file that looks complete; free disk space is checked first.

Values follow the perturbation rules of ``tools.keras_oracle`` (kernels N(0, 1/fan_in), norms 1 + N(0, 0.2^2), token
embeddings N(0, 1/D), ...), drawn per slab in float32, so activations stay O(1) through the depth and every weight
matters. They are a pure function of (config, seed, CHUNK_ELEMENTS); ``metadata.json`` records all three, and an
existing preset with the same record is reused (``--force`` rewrites it).

Non-goals: sharded output, real weights, anything but the backbone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from refimpl.config import PaliGemmaConfig, count_params
from refimpl.dtypes import round_to_bfloat16
from refimpl.presets import PRESETS
from refimpl.weights import expected_entries
from tools.keras_oracle import perturbation_rule
from tools.write_preset import STORAGES, config_from_json_file, preset_config_document, vars_names

CHUNK_ELEMENTS = 1 << 21  # values per slab (8 MB as float32); module-level so tests can shrink it
DISK_MARGIN_BYTES = 256 << 20  # keep this much free beyond the file itself
WRITER = "tools/make_big_preset.py"
FORMAT_VERSION = 1  # bump when the values drawn for a (config, seed) change

# The benchmark workloads (issue 6). "midsize" is oracles.md's 680M-parameter model: real PaliGemma 1 widths
# (ViT 1152, text 2048, 8/1 heads of 256, vocabulary 257152) with 2 ViT and 2 decoder layers; its keras
# ``intermediate_dim`` is 16384, i.e. FFN width 8192 (the real model's is 32768 -> 16384).
_MIDSIZE = dict(vocabulary_size=256000 + 1024 + 128, image_size=224, num_layers=2, num_query_heads=8,
                num_key_value_heads=1, hidden_dim=2048, intermediate_dim=16384, head_dim=256, vit_patch_size=14,
                vit_num_heads=16, vit_hidden_dim=1152, vit_num_layers=2, vit_intermediate_dim=4304,
                include_rescaling=False)  # keras-hub >= 0.17 takes images in [-1, 1]
WORKLOADS: dict[str, PaliGemmaConfig] = {
    # A few hundred KB: smoke tests of the tools themselves.
    "tiny": PaliGemmaConfig(vocabulary_size=211, image_size=28, vit_patch_size=7, vit_hidden_dim=24, vit_num_heads=3,
                            vit_num_layers=2, vit_intermediate_dim=37, num_layers=3, num_query_heads=4,
                            num_key_value_heads=2, hidden_dim=40, intermediate_dim=58, head_dim=10,
                            include_rescaling=False),
    "midsize": PaliGemmaConfig(**_MIDSIZE),
    "pali_gemma_3b_mix_224": PRESETS["pali_gemma_3b_mix_224"].config,
}


def weight_bytes(config: PaliGemmaConfig, storage: str) -> int:
    """Bytes of weight data in the file: parameters times 4 (float32) or 2 (bfloat16)."""
    return count_params(config) * (2 if storage == "bfloat16" else 4)


def row_slabs(shape: tuple[int, ...], chunk: int | None = None) -> Iterator[slice]:
    """Slices of the first axis covering ``shape`` with at most ``chunk`` values each (one row if a row is larger)."""
    chunk = CHUNK_ELEMENTS if chunk is None else chunk
    if not shape:
        yield slice(None)
        return
    row = math.prod(shape[1:])
    step = max(1, chunk // max(row, 1))
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def entry_values(variable_path: str, shape: tuple[int, ...], seed: int, number: int) -> Iterator[np.ndarray]:
    """f32 slabs (first axis) of one variable's random values: base + std * N(0, 1), a generator per entry."""
    base, std = perturbation_rule(variable_path, shape)
    rng = np.random.default_rng([seed, number])
    for rows in row_slabs(shape):
        slab_shape = (len(range(*rows.indices(shape[0]))),) + tuple(shape[1:]) if shape else ()
        values = rng.standard_normal(slab_shape, dtype=np.float32)
        values *= np.float32(std)
        if base:
            values += np.float32(base)
        yield values


def _encode(values: np.ndarray, storage: str) -> np.ndarray:
    if storage == "bfloat16":  # keras' layout: the top 16 bits of each rounded float32, as opaque 2-byte records
        return (round_to_bfloat16(values).view(np.uint32) >> np.uint32(16)).astype("<u2").view("V2")
    return values


def provenance(config: PaliGemmaConfig, storage: str, seed: int) -> dict:
    """What makes the file's bytes: compared before an existing preset is reused."""
    text = json.dumps(config.to_keras_config(), sort_keys=True)
    return {"writer": WRITER, "format_version": FORMAT_VERSION, "seed": seed, "storage": storage,
            "chunk_elements": CHUNK_ELEMENTS, "config_sha256": hashlib.sha256(text.encode()).hexdigest()}


def check_disk(directory: Path, needed: int) -> None:
    """Raise OSError unless the file system of ``directory`` has ``needed`` bytes plus a margin free."""
    probe = directory if directory.exists() else directory.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + DISK_MARGIN_BYTES:
        raise OSError(f"{directory}: needs {needed / 1e9:.2f} GB (+{DISK_MARGIN_BYTES >> 20} MB margin) but only "
                      f"{free / 1e9:.2f} GB is free on that file system; choose another directory")


def write_weights_streaming(path: Path, config: PaliGemmaConfig, *, storage: str = "float32", seed: int = 0,
                            progress=None) -> int:
    """Write ``model.weights.h5`` for ``config`` at ``path`` slab by slab; returns the number of values written."""
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} must be one of {STORAGES}")
    entries = expected_entries(config, "object_path")
    variable_paths = {exp.field: key for key, exp in expected_entries(config, "variable_path").items()}
    written = 0
    with h5py.File(path, "w") as handle:
        for number, (key, exp) in enumerate(entries.items()):
            dtype = np.dtype("V2") if storage == "bfloat16" else np.dtype(np.float32)
            dataset = handle.create_dataset(key, shape=exp.shape, dtype=dtype)
            if storage == "bfloat16":
                dataset.attrs["dtype"] = "bfloat16"
            slabs = entry_values(variable_paths[exp.field], exp.shape, seed, number)
            for rows, values in zip(row_slabs(exp.shape), slabs, strict=True):
                dataset[rows] = _encode(values, storage)
                written += values.size
            if progress:
                progress(key, exp.shape, written)
        for group, name in vars_names(config).items():
            handle.require_group(group).attrs["name"] = name
    return written


def make_preset(directory: str | Path, config: PaliGemmaConfig, *, storage: str = "float32", seed: int = 0,
                force: bool = False, verbose: bool = False) -> tuple[Path, bool]:
    """Write (or reuse) a preset directory for ``config``; returns (directory, whether it was written now)."""
    directory = Path(directory)
    record = provenance(config, storage, seed)
    metadata_file, weights_file = directory / "metadata.json", directory / "model.weights.h5"
    if not force and metadata_file.is_file() and weights_file.is_file():
        try:
            existing = json.loads(metadata_file.read_text())
        except (OSError, json.JSONDecodeError):
            existing = {}
        if existing.get("provenance") == record:
            return directory, False
    check_disk(directory, weight_bytes(config, storage))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (metadata_file, weights_file):
        stale.unlink(missing_ok=True)
    partial = directory / "model.weights.h5.partial"
    start = time.perf_counter()

    def report(key, shape, written):
        if verbose:
            print(f"  {written / 1e6:9.1f} M values  {key} {shape}", file=sys.stderr)

    count = write_weights_streaming(partial, config, storage=storage, seed=seed, progress=report)
    os.replace(partial, weights_file)
    (directory / "config.json").write_text(json.dumps(preset_config_document(config), indent=4) + "\n")
    metadata = {"keras_version": "3.15.1", "keras_hub_version": "0.32.0", "parameter_count": count,
                "writer": WRITER, "seconds_to_write": round(time.perf_counter() - start, 1), "provenance": record}
    metadata_file.write_text(json.dumps(metadata, indent=4) + "\n")  # written last: marks the preset complete
    return directory, True


def _config_from_args(args) -> PaliGemmaConfig:
    if args.workload:
        return WORKLOADS[args.workload]
    return config_from_json_file(args.config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_big_preset", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="preset directory to write (outside the repository)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", choices=sorted(WORKLOADS))
    source.add_argument("--config", help="a config.json, or a JSON object of PaliGemmaBackbone arguments")
    parser.add_argument("--storage", choices=STORAGES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite even if an identical preset exists")
    parser.add_argument("--verbose", action="store_true", help="print every tensor as it is written")
    args = parser.parse_args(argv)
    config = _config_from_args(args)
    start = time.perf_counter()
    out, wrote = make_preset(args.out, config, storage=args.storage, seed=args.seed, force=args.force,
                             verbose=args.verbose)
    size = (out / "model.weights.h5").stat().st_size
    verb = "wrote" if wrote else "reused"
    print(f"{verb} {out}: {count_params(config)} parameters, {args.storage}, {size / 1e9:.2f} GB "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
