"""Re-measure the numbers behind ``conformance/tolerances.py``: how far correct implementations are from float64.

    python -m conformance.calibrate                 # refimpl rows on three synthetic configs (about a minute)
    python -m conformance.calibrate --golden golden # plus keras-hub's recorded outputs in the golden cases

For every float tap it prints, per tap kind, the largest ratio of a candidate's max |error| to the case's envelope
(the reference's own float32 error, or the bf16 emulation's error, against float64), and the largest envelope
max_rel. tolerances.py sets each multiple well above the largest ratio; compare its table with this output after
changing kernels, BLAS or keras-hub. Nothing here is imported by the harness.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict

import numpy as np

from conformance.tolerances import tap_kind
from refimpl.config import PaliGemmaConfig
from refimpl.dtypes import round_to_bfloat16
from refimpl.init import random_params
from refimpl.model import PaliGemmaBackbone

# Synthetic configs: PaliGemma 1 shape, PaliGemma 2 shape (post-norms, soft-caps, window), and a wider one.
CONFIGS = {
    "pg1": dict(vocabulary_size=97, image_size=28, num_layers=3, num_query_heads=4, num_key_value_heads=1,
                hidden_dim=40, intermediate_dim=58, head_dim=10, vit_patch_size=7, vit_num_heads=3,
                vit_hidden_dim=24, vit_num_layers=2, vit_intermediate_dim=37),
    "pg2": dict(vocabulary_size=83, image_size=30, num_layers=4, num_query_heads=6, num_key_value_heads=2,
                hidden_dim=36, intermediate_dim=46, head_dim=8, vit_patch_size=6, vit_num_heads=2, vit_hidden_dim=20,
                vit_num_layers=3, vit_intermediate_dim=31, use_post_attention_norm=True, use_post_ffw_norm=True,
                attention_logit_soft_cap=5.0, final_logit_soft_cap=3.0, use_sliding_window_attention=True,
                sliding_window_size=5),
    "wide": dict(vocabulary_size=1001, image_size=56, num_layers=6, num_query_heads=8, num_key_value_heads=1,
                 hidden_dim=256, intermediate_dim=1024, head_dim=32, vit_patch_size=7, vit_num_heads=4,
                 vit_hidden_dim=128, vit_num_layers=6, vit_intermediate_dim=301),
}


def _map(tree, fn):
    if isinstance(tree, np.ndarray):
        return fn(tree)
    if isinstance(tree, tuple):
        return tuple(_map(item, fn) for item in tree)
    if dataclasses.is_dataclass(tree):
        return dataclasses.replace(tree, **{f.name: _map(getattr(tree, f.name), fn) for f in dataclasses.fields(tree)})
    return tree


def _inputs(config: PaliGemmaConfig, seed: int, batch: int = 2, text_len: int = 9) -> dict:
    rng = np.random.default_rng(seed)
    padding = np.ones((batch, text_len), dtype=bool)
    padding[1, 6:] = False
    response = np.zeros((batch, text_len), dtype=bool)
    response[:, 4:] = True
    return {"images": rng.uniform(-1, 1, (batch, config.image_size, config.image_size, 3)).astype(np.float32),
            "token_ids": rng.integers(3, config.vocabulary_size, (batch, text_len)).astype(np.int32),
            "padding_mask": padding, "response_mask": response}


def _taps(config, params, policy, kernels, inputs) -> dict:
    model = PaliGemmaBackbone.from_config_object(config, params, dtype=policy, kernels=kernels)
    return model.call_with_taps(inputs, taps=".*")[1]


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class Table:
    """Largest ratio per (row, kind), remembering where it occurred."""

    def __init__(self):
        self.worst: dict[tuple[str, str], tuple[float, str]] = defaultdict(lambda: (0.0, ""))

    def add(self, row: str, tap: str, error: float, envelope: float, where: str) -> None:
        ratio = error / envelope if envelope > 0 else (0.0 if error == 0 else float("inf"))
        key = (row, tap_kind(tap))
        if ratio > self.worst[key][0]:
            self.worst[key] = (ratio, f"{tap} ({where})")

    def print(self) -> None:
        for (row, kind), (ratio, where) in sorted(self.worst.items()):
            print(f"{row:38s} {kind:10s} {ratio:10.3g}  at {where}")


def measure_refimpl(table: Table, seeds: int) -> None:
    for name, keras_config in CONFIGS.items():
        config = PaliGemmaConfig.from_keras_config(keras_config)
        for seed in range(seeds):
            p32 = random_params(config, seed=seed, dtype=np.float32, perturb=True)
            p64 = _map(p32, lambda a: a.astype(np.float64))
            pbf = _map(p32, round_to_bfloat16)
            x = _inputs(config, seed)
            t64, t32 = _taps(config, p64, "float64", "numpy", x), _taps(config, p32, "float32", "numpy", x)
            n32, n64 = _taps(config, p32, "float32", "numba", x), _taps(config, p64, "float64", "numba", x)
            b64 = _taps(config, _map(pbf, lambda a: a.astype(np.float64)), "float64", "numpy", x)
            bf = _taps(config, pbf, "bfloat16", "numpy", x)
            for tap, ref in t64.items():
                if ref.dtype == bool:
                    continue
                env, scale, where = _max_abs(t32[tap], ref), float(np.abs(ref).max()), f"{name}, seed {seed}"
                table.add("refimpl numba float32 / f32 env", tap, _max_abs(n32[tap], ref), env, where)
                table.add("refimpl numba float64 / f32 env*2^-29", tap, _max_abs(n64[tap], ref), env * 2.0 ** -29,
                          where)
                table.add("f32 envelope max_rel", tap, env, scale, where)
                table.add("bf16 emulation max_rel", tap, _max_abs(bf[tap], b64[tap]), float(np.abs(b64[tap]).max()),
                          where)


def measure_golden(table: Table, golden: str) -> None:
    from conformance.cases import list_cases, load_case

    for name in list_cases(golden):
        case = load_case(golden, name)
        envelope = case.float32_envelope if case.keras_dtype == "float32" else case.bfloat16_envelope
        for tap, value in case.keras_taps().items():
            if tap in envelope and case.golden[tap].dtype != bool:
                table.add(f"keras-hub {case.keras_dtype} / envelope", tap, _max_abs(value, case.golden[tap]),
                          envelope[tap].max_abs, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--golden", help="also measure keras-hub's outputs stored in the cases of this directory")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--skip-refimpl", action="store_true")
    args = parser.parse_args(argv)
    table = Table()
    if not args.skip_refimpl:
        measure_refimpl(table, args.seeds)
    if args.golden:
        measure_golden(table, args.golden)
    print(f"{'row':38s} {'kind':10s} {'max ratio':>10s}")
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
