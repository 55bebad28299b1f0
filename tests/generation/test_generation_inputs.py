"""Bad generation input gets a clear ValueError; the ``generate`` command end to end and on bad input."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from _generation_helpers import CONFIGS, SEQUENCE_LENGTH, needs_keras, write_png
from refimpl import generate_cli
from refimpl.causal_lm import PaliGemmaCausalLM
from refimpl.config import PaliGemmaConfig
from refimpl.image_converter import PaliGemmaImageConverter
from refimpl.init import random_params
from refimpl.model import PaliGemmaBackbone
from refimpl.preprocessor import PaliGemmaCausalLMPreprocessor
from refimpl.tokenizer import PaliGemmaTokenizer


@pytest.fixture(scope="module")
def lm(vocabulary):
    config = PaliGemmaConfig.from_keras_config(CONFIGS["pg1"])
    backbone = PaliGemmaBackbone.from_config_object(config, random_params(config, seed=0, perturb=True))
    converter = PaliGemmaImageConverter(image_size=(28, 28), scale=1 / 127.5, offset=-1.0)
    pre = PaliGemmaCausalLMPreprocessor(PaliGemmaTokenizer(vocabulary), converter, sequence_length=SEQUENCE_LENGTH)
    return PaliGemmaCausalLM(backbone, pre)


def arrays(batch=2, text=6):
    ids = np.zeros((batch, text), np.int32)
    ids[:, :2] = [2, 9]
    return {"images": np.zeros((batch, 28, 28, 3), np.float32), "token_ids": ids, "padding_mask": ids != 0}


def test_string_generation_runs_batched_and_unbatched(lm):
    image = np.random.default_rng(0).integers(0, 256, (40, 31, 3)).astype(np.uint8)
    text = lm.generate({"images": image, "prompts": "caption en\n"})
    assert isinstance(text, str) and text.startswith("caption en\n")
    texts = lm.generate({"images": np.stack([image, image]), "prompts": ["caption en\n", "ne\n"]},
                        strip_prompt=True)
    assert isinstance(texts, list) and len(texts) == 2


def test_prompt_longer_than_the_sequence_length(lm):
    long_prompt = "ne the ka lo mi " * 10
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens \(with <bos>\) but the sequence length is 12"):
        lm.generate({"images": np.zeros((28, 28, 3)), "prompts": long_prompt})
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens .* sequence length is 30"):
        lm.generate({"images": np.zeros((2, 28, 28, 3)), "prompts": ["a", long_prompt * 2]}, max_length=30)


def test_unknown_sampler_and_stop_ids(lm):
    with pytest.raises(ValueError, match="sampler='beam' is unknown"):
        lm.compile("beam")
    bare = PaliGemmaCausalLM(lm.backbone)
    with pytest.raises(ValueError, match='stop_token_ids="auto" needs a preprocessor'):
        bare.generate(arrays())
    with pytest.raises(ValueError, match=r"stop_token_ids: expected None or a non-empty list of token ids in \[0, 211\)"):
        bare.generate(arrays(), stop_token_ids=[1, 999])


def test_bad_arrays(lm):
    bare = PaliGemmaCausalLM(lm.backbone)
    x = arrays()
    x["padding_mask"] = x["padding_mask"].copy()
    x["padding_mask"][1] = False
    with pytest.raises(ValueError, match="row 1 has no prompt token"):
        bare.generate(x, stop_token_ids=None)
    x = arrays()
    x["images"] = np.zeros((2, 30, 30, 3), np.float32)
    with pytest.raises(ValueError, match=r"input 'images': expected shape \(batch, 28, 28, 3\)"):
        bare.generate(x, stop_token_ids=None)
    x = arrays()
    x["images"] = np.full((2, 28, 28, 3), 200.0, np.float32)  # raw pixels without a preprocessor
    with pytest.raises(ValueError, match=r"input 'images': expected values in \[-1, 1\]"):
        bare.generate(x, stop_token_ids=None)
    with pytest.raises(ValueError, match=r"missing \['padding_mask'\]"):
        bare.generate_step({"images": x["images"], "token_ids": x["token_ids"]})
    with pytest.raises(ValueError, match="expected a dict with 'images' and 'prompts'"):
        lm.generate(arrays())
    with pytest.raises(ValueError, match="images"):
        lm.generate({"images": np.zeros((28, 28)), "prompts": "caption en\n"})


def parse(argv):
    parser = argparse.ArgumentParser()
    generate_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert generate_cli.run(parse(["--preset", str(tmp_path), "--image", str(tmp_path / "broken.png"),
                                   "--prompt", "caption en"])) == 2
    assert "truncated PNG" in capsys.readouterr().err
    assert generate_cli.run(parse(["--preset", str(tmp_path / "nowhere"), "--image", str(tmp_path / "x.png"),
                                   "--prompt", "hi"])) == 2
    assert "x.png not found" in capsys.readouterr().err
    assert generate_cli.run(parse(["--preset", str(tmp_path), "--image", str(tmp_path / "broken.png"),
                                   "--prompt", "hi", "--sampler", "top_k", "--top-k", "0"])) == 2
    assert "k=0" in capsys.readouterr().err


@needs_keras
@pytest.mark.keras
def test_cli_generates_the_text_keras_generates(keras_cases, tmp_path, capsys):
    results = keras_cases["pg1"].results
    image = write_png(tmp_path / "image.png", results["text_inputs"]["images"], filters=(0, 1, 2, 3, 4))
    prompt = results["text_inputs"]["prompts"]
    code = generate_cli.run(parse(["--preset", str(keras_cases["pg1"].preset), "--image", str(image),
                                   "--prompt", prompt.rstrip("\n")]))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == results["text"] + "\n"  # the command appended the "\n" that the prompt needs
    assert "generating: step" in captured.err
    code = generate_cli.run(parse(["--preset", str(keras_cases["pg1"].preset), "--image", str(image),
                                   "--prompt", prompt, "--no-cache", "--quiet", "--strip-prompt",
                                   "--max-length", "9"]))
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    assert captured.out == results["text_stripped"] + "\n"
