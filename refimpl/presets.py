"""Built-in preset names, their architectures, and where their weight files are looked for. Never the network.

Architectures come from keras-hub's conversion scripts (spec section 10.3); each preset's parameter count is
computed from its config by ``refimpl.config.count_params`` and equals keras-hub's metadata (tests pin a few).

Weights are looked up, in order, in
  1. ``$PALIGEMMA_REF_CACHE/<preset name>/`` (default ``~/.cache/paligemma-ref/presets/<preset name>/``),
  2. the kagglehub cache for the preset's Kaggle handle:
     ``$KAGGLEHUB_CACHE/models/<owner>/<model>/<framework>/<variation>/<version>/``
     (default ``~/.cache/kagglehub``),
and ``hf://owner/name`` handles in the Hugging Face hub cache ``$HF_HOME/hub/models--owner--name/snapshots/*/``
(default ``~/.cache/huggingface``). A directory there must hold ``config.json`` and the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from refimpl.config import PaliGemmaConfig, count_params

_COMMON = dict(vocabulary_size=256000 + 1024 + 128, vit_patch_size=14, vit_num_heads=16, vit_hidden_dim=1152,
               vit_num_layers=27, vit_intermediate_dim=4304, include_rescaling=False)
# Gemma 1 2B text tower (keras intermediate_dim is twice the FFN width 16384).
_PG1 = dict(_COMMON, num_layers=18, num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
            intermediate_dim=2 * 16384, head_dim=256)
_PG2_BLOCK = dict(use_post_attention_norm=True, use_post_ffw_norm=True, attention_logit_soft_cap=50.0,
                  final_logit_soft_cap=30.0, use_sliding_window_attention=True, sliding_window_size=4096)
_PG2 = {  # Gemma 2 2B / 9B / 27B text towers
    "3b": dict(_COMMON, **_PG2_BLOCK, num_layers=26, num_query_heads=8, num_key_value_heads=4, hidden_dim=2304,
               intermediate_dim=2 * 9216, head_dim=256),
    "10b": dict(_COMMON, **_PG2_BLOCK, num_layers=42, num_query_heads=16, num_key_value_heads=8, hidden_dim=3584,
                intermediate_dim=2 * 14336, head_dim=256),
    # query_head_dim_normalize=False is what the 28B config says; keras-hub ignores it (quirk Q1).
    "28b": dict(_COMMON, **_PG2_BLOCK, num_layers=46, num_query_heads=32, num_key_value_heads=16, hidden_dim=4608,
                intermediate_dim=2 * 36864, head_dim=128, query_head_dim_normalize=False),
}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: PaliGemmaConfig
    kaggle_handle: str

    @property
    def parameter_count(self) -> int:
        return count_params(self.config)


def _pg1(name: str, image_size: int, description: str) -> Preset:
    return Preset(name, description, PaliGemmaConfig(image_size=image_size, **_PG1),
                  f"kaggle://keras/paligemma/keras/{name}/4")


def _pg2(name: str, size: str, image_size: int, kind: str, version: int, handle_name: str | None = None) -> Preset:
    description = f"PaliGemma 2 {size.upper()} {kind}, {image_size}x{image_size} images"
    return Preset(name, description, PaliGemmaConfig(image_size=image_size, **_PG2[size]),
                  f"kaggle://keras/paligemma2/keras/{handle_name or name}/{version}")


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _pg1("pali_gemma_3b_mix_224", 224, "PaliGemma 3B mix fine-tuned, 224x224 images, text sequence length 256"),
    _pg1("pali_gemma_3b_mix_448", 448, "PaliGemma 3B mix fine-tuned, 448x448 images, text sequence length 512"),
    _pg1("pali_gemma_3b_224", 224, "PaliGemma 3B pre-trained, 224x224 images, text sequence length 128"),
    _pg1("pali_gemma_3b_448", 448, "PaliGemma 3B pre-trained, 448x448 images, text sequence length 512"),
    _pg1("pali_gemma_3b_896", 896, "PaliGemma 3B pre-trained, 896x896 images, text sequence length 512"),
    _pg2("pali_gemma_2_ft_docci_3b_448", "3b", 448, "fine-tuned on DOCCI", 2),
    _pg2("pali_gemma2_ft_docci_10b_448", "10b", 448, "fine-tuned on DOCCI", 3),
    _pg2("pali_gemma2_mix_3b_224", "3b", 224, "mix fine-tuned", 2),
    _pg2("pali_gemma2_mix_3b_448", "3b", 448, "mix fine-tuned", 2),
    _pg2("pali_gemma2_mix_10b_224", "10b", 224, "mix fine-tuned", 3),
    _pg2("pali_gemma2_mix_10b_448", "10b", 448, "mix fine-tuned", 3),
    _pg2("pali_gemma2_mix_28b_224", "28b", 224, "mix fine-tuned", 3, "pali_gemma2_28b_mix_224"),
    _pg2("pali_gemma2_mix_28b_448", "28b", 448, "mix fine-tuned", 3, "pali_gemma2_28b_mix_448"),
    _pg2("pali_gemma2_pt_3b_224", "3b", 224, "pre-trained", 2),
    _pg2("pali_gemma2_pt_3b_448", "3b", 448, "pre-trained", 2),
    _pg2("pali_gemma2_pt_3b_896", "3b", 896, "pre-trained", 2),
    _pg2("pali_gemma2_pt_10b_224", "10b", 224, "pre-trained", 3),
    _pg2("pali_gemma2_pt_10b_448", "10b", 448, "pre-trained", 3),
    _pg2("pali_gemma2_pt_10b_896", "10b", 896, "pre-trained", 3),
    _pg2("pali_gemma2_pt_28b_224", "28b", 224, "pre-trained", 4),
    _pg2("pali_gemma2_pt_28b_448", "28b", 448, "pre-trained", 3),
    _pg2("pali_gemma2_pt_28b_896", "28b", 896, "pre-trained", 3),
]}


def _home_cache(variable: str, default: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / default)


def _kaggle_dir(handle: str) -> Path:
    parts = handle[len("kaggle://"):].strip("/").split("/")
    if len(parts) == 4:  # no version: take the newest cached one
        parts.append("")
    if len(parts) != 5:
        raise ValueError(f"preset handle {handle!r}: expected kaggle://owner/model/framework/variation[/version]")
    owner, model, framework, variation, version = parts
    base = _home_cache("KAGGLEHUB_CACHE", ".cache/kagglehub") / "models" / owner / model / framework / variation
    if version:
        return base / version
    versions = sorted((p for p in base.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    return versions[-1] if versions else base / "<version>"


def _hf_dirs(handle: str) -> list[Path]:
    repo = handle[len("hf://"):].strip("/")
    if repo.count("/") != 1:
        raise ValueError(f"preset handle {handle!r}: expected hf://owner/name")
    snapshots = _home_cache("HF_HOME", ".cache/huggingface") / "hub" / ("models--" + repo.replace("/", "--"))
    return sorted((snapshots / "snapshots").glob("*")) or [snapshots / "snapshots" / "<revision>"]


def candidate_dirs(preset: str) -> list[Path]:
    """Local directories that may hold the files of a built-in preset name or a kaggle:// or hf:// handle."""
    if preset.startswith("kaggle://"):
        return [_kaggle_dir(preset)]
    if preset.startswith("hf://"):
        return _hf_dirs(preset)
    dirs = [_home_cache("PALIGEMMA_REF_CACHE", ".cache/paligemma-ref/presets") / preset]
    if preset in PRESETS:
        dirs.append(_kaggle_dir(PRESETS[preset].kaggle_handle))
    return dirs


def find_local_dir(preset: str) -> Path:
    """The first candidate directory with a config.json; a clear error listing where we looked otherwise."""
    dirs = candidate_dirs(preset)
    for directory in dirs:
        if (directory / "config.json").is_file():
            return directory
    looked = "\n  ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"preset {preset!r}: no local copy found (paligemma-ref never downloads). Looked in:\n  {looked}\n"
        "Put the preset's files (config.json and model.weights.h5, or model.weights.json and its shards) in the "
        "first of these directories, or pass the preset directory itself.")
