"""Golden-format cases built in temporary directories, so the harness tests need no golden/ files.

The case layout is the real one (case.json, inputs.npz, taps.npz, preset/config.json, MANIFEST.json); the weights
are not written to a .weights.h5 but regenerated from the seed in case.json (``seeded_loader``), which keeps these
tests independent of the weight reader. The reference taps come from refimpl in float64, the envelopes from refimpl
float32 / bf16 against it: the same recipe as tools/make_goldens.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from conformance.backend import RefimplBackend
from conformance.cases import SCHEMA_VERSION, compute_manifest
from refimpl.config import PaliGemmaConfig
from refimpl.dtypes import round_to_bfloat16
from refimpl.init import random_params
from refimpl.model import PaliGemmaBackbone
from refimpl.params import PaliGemmaParams

# Odd, mutually distinct sizes: 9 image tokens of 7 px, 3 decoder blocks, 2 ViT blocks.
TINY = {"vocabulary_size": 53, "image_size": 21, "num_layers": 3, "num_query_heads": 4, "num_key_value_heads": 2,
        "hidden_dim": 20, "intermediate_dim": 2 * 13, "head_dim": 6, "vit_patch_size": 7, "vit_num_heads": 3,
        "vit_hidden_dim": 15, "vit_num_layers": 2, "vit_intermediate_dim": 17}
# PaliGemma 2 shape: post-norms, soft-caps, a sliding window of 6 (9 image + 7 text tokens, so the band is active).
TINY_PG2 = {**TINY, "use_post_attention_norm": True, "use_post_ffw_norm": True, "attention_logit_soft_cap": 5.0,
            "final_logit_soft_cap": 3.0, "use_sliding_window_attention": True, "sliding_window_size": 6}


def map_arrays(tree, fn):
    """Apply ``fn`` to every array of a params dataclass tree."""
    if isinstance(tree, np.ndarray):
        return fn(tree)
    if isinstance(tree, tuple):
        return tuple(map_arrays(item, fn) for item in tree)
    if dataclasses.is_dataclass(tree):
        return dataclasses.replace(tree, **{f.name: map_arrays(getattr(tree, f.name), fn)
                                            for f in dataclasses.fields(tree)})
    return tree


def stored_params(config: PaliGemmaConfig, seed: int) -> PaliGemmaParams:
    """The case's weights as a preset would store them: float32, every weight perturbed."""
    return random_params(config, seed=seed, dtype=np.float32, perturb=True)


def params_for_policy(params: PaliGemmaParams, policy: str) -> PaliGemmaParams:
    if policy == "float64":
        return map_arrays(params, lambda a: a.astype(np.float64))
    if policy in ("bfloat16", "mixed_bfloat16"):
        return map_arrays(params, round_to_bfloat16)
    return params


Edit = Callable[[PaliGemmaParams], PaliGemmaParams]


def seeded_loader(edit: Edit | None = None):
    """A RefimplBackend model_loader that rebuilds the case's weights from its seed, optionally edited."""
    def load(case, policy: str, kernels: str) -> PaliGemmaBackbone:
        params = stored_params(case.parsed_config, case.provenance["seed"])
        if edit is not None:
            params = edit(params)
        return PaliGemmaBackbone.from_config_object(case.parsed_config, params_for_policy(params, policy),
                                                    dtype=policy, kernels=kernels)
    return load


def refimpl_backend(edit: Edit | None = None, **kwargs) -> RefimplBackend:
    """RefimplBackend (NumPy kernels, float32 unless told) on the case's seeded weights, optionally edited."""
    kwargs.setdefault("kernels", "numpy")
    return RefimplBackend(model_loader=seeded_loader(edit), **kwargs)


def seeded_backend(**kwargs) -> RefimplBackend:
    """Factory for ``--backend _conformance_cases:seeded_backend`` in the CLI tests."""
    return refimpl_backend(**kwargs)


def scale_vit_weight(block: int, field: str, factor: float) -> Edit:
    def edit(params: PaliGemmaParams) -> PaliGemmaParams:
        blocks = list(params.vit.blocks)
        blocks[block] = dataclasses.replace(blocks[block], **{field: getattr(blocks[block], field) * factor})
        return dataclasses.replace(params, vit=dataclasses.replace(params.vit, blocks=tuple(blocks)))
    return edit


def scale_decoder_weight(block: int, field: str, factor: float) -> Edit:
    def edit(params: PaliGemmaParams) -> PaliGemmaParams:
        blocks = list(params.blocks)
        blocks[block] = dataclasses.replace(blocks[block], **{field: getattr(blocks[block], field) * factor})
        return dataclasses.replace(params, blocks=tuple(blocks))
    return edit


def make_inputs(config: PaliGemmaConfig, seed: int, batch: int = 2, text_len: int = 7) -> dict[str, np.ndarray]:
    """Row 0 fully present, row 1 padded after 4 tokens; the last tokens of each row are responses."""
    rng = np.random.default_rng([seed, 7])
    size = config.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    token_ids = rng.integers(3, config.vocabulary_size, (batch, text_len)).astype(np.int32)
    padding = np.ones((batch, text_len), dtype=bool)
    padding[1:, 4:] = False
    token_ids[~padding] = 0
    response = np.zeros((batch, text_len), dtype=bool)
    response[0, text_len - 3:] = True
    response[1:, 2:4] = True
    return {"images": images, "token_ids": token_ids, "padding_mask": padding, "response_mask": response}


def _envelope(candidate: dict, reference: dict) -> dict:
    out = {}
    for name, ref in reference.items():
        if ref.dtype == bool:
            continue
        diff = candidate[name].astype(np.float64) - ref
        max_abs, scale = float(np.abs(diff).max()), float(np.abs(ref).max())
        out[name] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale else 0.0,
                     "rms": float(np.sqrt(np.mean(diff ** 2)))}
    return out


def run_taps(config: PaliGemmaConfig, params: PaliGemmaParams, policy: str, inputs: dict) -> dict:
    model = PaliGemmaBackbone.from_config_object(config, params_for_policy(params, policy), dtype=policy)
    return model.call_with_taps(inputs, taps=".*")[1]


def build_case(root: Path, name: str = "tiny", *, config: dict = TINY, seed: int = 0, batch: int = 2,
               text_len: int = 7, manifest: bool = True, keras_taps: dict | None = None, **extra) -> Path:
    """Write case ``name`` under ``root`` in the golden format (and refresh root/MANIFEST.json).

    ``keras_taps``: arrays to store as the case's recorded keras-hub outputs (keras_taps.npz), if any.
    """
    parsed = PaliGemmaConfig.from_keras_config(config)
    case_dir = Path(root) / name
    (case_dir / "preset").mkdir(parents=True)
    params, inputs = stored_params(parsed, seed), make_inputs(parsed, seed, batch, text_len)
    reference = run_taps(parsed, params, "float64", inputs)
    np.savez_compressed(case_dir / "inputs.npz", **inputs)
    np.savez_compressed(case_dir / "taps.npz", **reference)
    serialized = {"module": "keras_hub.src.models.pali_gemma.pali_gemma_backbone", "class_name": "PaliGemmaBackbone",
                  "config": dict(config), "registered_name": "keras_hub>PaliGemmaBackbone"}
    (case_dir / "preset" / "config.json").write_text(json.dumps(serialized))
    keras = {"dtype": "float32"}
    if keras_taps is not None:
        np.savez_compressed(case_dir / "keras_taps.npz", **keras_taps)
        keras["file"] = "keras_taps.npz"
    document = {"schema_version": SCHEMA_VERSION, "name": name, "description": f"test case, seed {seed}",
                "config": dict(config), "preset": "preset", "weights_variant": "plain", "taps": list(reference),
                "float32_envelope": _envelope(run_taps(parsed, params, "float32", inputs), reference),
                "bfloat16_envelope": _envelope(run_taps(parsed, params, "bfloat16", inputs), reference),
                "keras": keras, "provenance": {"seed": seed, "producer": "tests"}, **extra}
    (case_dir / "case.json").write_text(json.dumps(document, indent=1))
    if manifest:
        write_manifest(root)
    return case_dir


def write_manifest(root: Path) -> None:
    names = sorted(p.parent.relative_to(root).as_posix() for p in Path(root).rglob("case.json"))
    (Path(root) / "MANIFEST.json").write_text(json.dumps(compute_manifest(root, names), indent=1))
