"""``paligemma-ref generate``: caption or answer with the NumPy reference, from a preset, an image and a prompt.

    paligemma-ref generate --preset DIR --image cow.png --prompt "answer en where is the cow?"
        [--max-length 64] [--sampler greedy|random|top_k|top_p] [--seed 0] [--temperature 1.0]
        [--top-k 5] [--top-p 0.1] [--dtype float32] [--kernels numpy|numba] [--no-cache] [--strip-prompt]
        [--no-newline] [--quiet] [--json]

The preset must hold a tokenizer (``tokenizer.json`` + ``assets/tokenizer/vocabulary.spm``); its image converter
(``image_converter.json``) resizes and rescales the image. Images: .npy, binary PPM/PGM (P6/P5) or PNG.
PaliGemma prompts end with "\\n" (keras-hub does not add it; Hugging Face's processor does): this command appends
one unless ``--no-newline`` is given. Progress goes to stderr (``--quiet`` turns it off); the text to stdout.

Exit codes: 0 success, 2 bad input (unreadable image, over-long prompt, missing tokenizer, ...).
"""

from __future__ import annotations

import argparse
import json
import sys

from refimpl.dtypes import POLICY_NAMES
from refimpl.model import WEIGHT_MODES
from refimpl.samplers import SAMPLER_NAMES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on an ``argparse`` subparsers object; returns the new parser."""
    parser = subparsers.add_parser("generate", help="generate text for an image and a prompt",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="preset directory with a tokenizer (or a built-in name)")
    parser.add_argument("--image", required=True, help="image file: .npy, binary PPM/PGM or PNG")
    parser.add_argument("--prompt", required=True, help='e.g. "caption en" or "answer en what is this?"')
    parser.add_argument("--max-length", type=int, default=None,
                        help="text tokens, prompt and <bos> included (default: the preset's sequence_length)")
    parser.add_argument("--sampler", default="greedy", choices=SAMPLER_NAMES)
    parser.add_argument("--seed", type=int, default=None, help="seed of the random samplers")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None, help="k of top_k (default 5) or top_p (default none)")
    parser.add_argument("--top-p", type=float, default=0.1, help="p of top_p")
    parser.add_argument("--dtype", default="float32", choices=POLICY_NAMES)
    parser.add_argument("--kernels", default="numpy", choices=("numpy", "numba"))
    parser.add_argument("--weights", default="read", choices=tuple(WEIGHT_MODES),
                        help="hold the weights in memory (read), mapped from the file, or streamed per block")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    parser.add_argument("--strip-prompt", action="store_true", help="print only the generated text")
    parser.add_argument("--no-newline", action="store_true", help='do not append "\\n" to the prompt')
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    parser.add_argument("--json", action="store_true", help="print a JSON object with the prompt and the text")
    return parser


def sampler_from_args(args):
    """The sampler the command-line options describe."""
    from refimpl.samplers import get_sampler

    kwargs = {"temperature": args.temperature}
    if args.sampler != "greedy":
        kwargs["seed"] = args.seed
    if args.sampler == "top_k" and args.top_k is not None:
        kwargs["k"] = args.top_k
    if args.sampler == "top_p":
        kwargs.update(p=args.top_p, k=args.top_k)
    return get_sampler(args.sampler, **kwargs)


def run(args) -> int:
    """Run ``generate``; returns the exit code (errors are printed to stderr)."""
    from refimpl.causal_lm import PaliGemmaCausalLM, stderr_progress
    from refimpl.image_io import read_image

    try:
        sampler = sampler_from_args(args)
        image = read_image(args.image)
        lm = PaliGemmaCausalLM.from_preset(args.preset, dtype=args.dtype, kernels=args.kernels,
                                           **WEIGHT_MODES[args.weights])
        if lm.preprocessor is None:
            raise ValueError(f"preset {args.preset}: no tokenizer.json, so prompts cannot be tokenized")
        lm.compile(sampler)
        prompt = args.prompt if args.no_newline or args.prompt.endswith("\n") else args.prompt + "\n"
        progress = None if args.quiet else stderr_progress()
        text = lm.generate({"images": image, "prompts": prompt}, max_length=args.max_length,
                           strip_prompt=args.strip_prompt, use_cache=not args.no_cache, progress=progress)
        if progress is not None:
            print(file=sys.stderr)  # end the progress line (generation may stop before the last step)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"paligemma-ref generate: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"prompt": prompt, "text": text}))
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m refimpl.generate_cli ...``) until the main CLI registers it."""
    parser = argparse.ArgumentParser(prog="paligemma-ref")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
