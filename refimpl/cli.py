"""``paligemma-ref``: inspect presets, run the reference, check a backend against the golden cases.

    paligemma-ref info PRESET
    paligemma-ref forward --preset P --inputs in.npz --out out.npz [--dtype D] [--kernels K] [--taps REGEX]
    paligemma-ref generate --preset P --image IMG --prompt TEXT [--max-length N] [--sampler greedy|top_k|...]
    paligemma-ref check [...]            (the conformance harness; see `paligemma-ref check --help`)

Exit codes: 0 success (check: conforms), 1 divergence, 2 usage, input or integrity error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from refimpl import generate_cli
from refimpl.dtypes import POLICY_NAMES
from refimpl.model import WEIGHT_MODES


def _info(args) -> int:
    from refimpl import presets
    from refimpl.model import read_preset_config

    name = args.preset
    if name in presets.PRESETS and not Path(name).exists():
        preset = presets.PRESETS[name]
        config, files = preset.config, None
        try:
            files = presets.find_local_dir(name)
        except FileNotFoundError as missing:
            files = str(missing).splitlines()[0]
        report = {"preset": name, "description": preset.description, "kaggle_handle": preset.kaggle_handle,
                  "local_files": str(files)}
    else:
        path = Path(name) if Path(name).exists() else presets.find_local_dir(name)
        config = read_preset_config(path)
        report = {"preset": str(path)}
        from refimpl import weights
        with weights.open_weight_file(path) as weight_file:
            entries = weight_file.entries
            report.update({"layout": weight_file.layout, "files": [str(f) for f in weight_file.files],
                           "weight_entries": len(entries),
                           "stored_dtypes": sorted({entry.dtype for entry in entries.values()})})
            weights.check_weight_file(weight_file, config)
            report["checks"] = "every weight present with the shape the config implies; nothing extra"
    from refimpl.config import count_params
    report.update({"parameter_count": count_params(config), "image_tokens": config.image_sequence_length,
                   "config": config.to_keras_config()})
    print(json.dumps(report, indent=2))
    return 0


def _forward(args) -> int:
    from refimpl.model import PaliGemmaBackbone

    model = PaliGemmaBackbone.from_preset(args.preset, dtype=args.dtype, kernels=args.kernels,
                                          **WEIGHT_MODES[args.weights])
    with np.load(args.inputs, allow_pickle=False) as data:
        inputs = {key: data[key] for key in data.files}
    out, taps = model.call_with_taps(inputs, taps=args.taps, check_image_range=not args.no_range_check)
    np.savez(args.out, **{"llm/final_norm": out, **taps})
    print(f"wrote {args.out}: output {out.shape} {out.dtype}, {len(taps)} taps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paligemma-ref", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="config, parameter count, stored dtypes and files of a preset")
    info.add_argument("preset", help="preset directory, legacy .h5 file, built-in name, kaggle:// or hf:// handle")
    forward = commands.add_parser("forward", help="run the backbone on inputs from an .npz file")
    forward.add_argument("--preset", required=True)
    forward.add_argument("--inputs", required=True, help=".npz with images, token_ids, padding_mask[, response_mask]")
    forward.add_argument("--out", required=True, help="output .npz: llm/final_norm plus the selected taps")
    forward.add_argument("--dtype", default="float32", choices=POLICY_NAMES)
    forward.add_argument("--kernels", default="numpy", choices=("numpy", "numba"))
    forward.add_argument("--weights", default="read", choices=tuple(WEIGHT_MODES),
                         help="hold the weights in memory (read), mapped from the file, or streamed per block")
    forward.add_argument("--taps", default=None, help="regex of tap names to save (default: none)")
    forward.add_argument("--no-range-check", action="store_true", help="accept images outside the expected range")
    commands.add_parser("check", help="conformance check against the golden cases", add_help=False)
    generate_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:
        from conformance.cli import main as check_main
        return check_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"info": _info, "forward": _forward, "generate": generate_cli.run}[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"paligemma-ref {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
