"""``PaliGemmaTokenizer`` against keras-hub's on the same SentencePiece proto, plus its preset files and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _generation_helpers import needs_keras
from refimpl.tokenizer import PaliGemmaTokenizer, TokenizerError

TEXTS = ["caption en\n", "answer en where is the cow?\n", "", "ne the ka lo mi", "<loc0001><loc1023> <seg127>",
         "  double  spaces\tand\ttabs ", "unicode: é ß 日本 🙂", "zzz qqq xyz"]


@pytest.fixture(scope="module")
def tokenizer(vocabulary):
    return PaliGemmaTokenizer(vocabulary)


def test_special_tokens_and_vocabulary(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.end_token_id, tokenizer.start_token_id) == (0, 1, 2)
    assert tokenizer.vocabulary_size() == 211
    assert tokenizer.id_to_token(4) == "<loc0000>" and tokenizer.token_to_id("<seg127>") == 8
    assert tokenizer.token_to_id("not a piece") == tokenizer.token_to_id("<unk>") == 3  # keras maps unknowns to unk
    assert tokenizer.special_token_ids == [0, 1, 2]
    # User symbols stay whole pieces, so location tokens survive tokenization.
    np.testing.assert_array_equal(tokenizer("<loc0001><loc1023>"), [5, 6])


def test_batches_and_round_trip(tokenizer):
    batch = tokenizer(TEXTS)
    assert isinstance(batch, list) and len(batch) == len(TEXTS)
    for text, row in zip(TEXTS, batch):
        single = tokenizer(text)
        assert single.dtype == np.int32
        np.testing.assert_array_equal(single, row)
    assert tokenizer.detokenize(tokenizer("ne the ka lo mi")) == "ne the ka lo mi"
    # "?" is not in this tiny vocabulary (no byte fallback), so it comes back as the unknown mark.
    assert tokenizer.detokenize(batch[:2]) == [TEXTS[0], "answer en where is the cow \u2047 \n"]


def test_sequence_length_pads_and_truncates(vocabulary):
    padded = PaliGemmaTokenizer(vocabulary, sequence_length=4)(["caption en\n", ""])
    full = PaliGemmaTokenizer(vocabulary)("caption en\n")
    assert padded.shape == (2, 4) and padded.dtype == np.int32
    np.testing.assert_array_equal(padded[0], full[:4])
    np.testing.assert_array_equal(padded[1], [0, 0, 0, 0])


@needs_keras
@pytest.mark.keras
def test_ids_and_strings_equal_keras(vocabulary, tokenizer, tmp_path):
    import keras_hub

    theirs = keras_hub.models.PaliGemmaTokenizer(proto=vocabulary.read_bytes())
    for text in TEXTS:
        np.testing.assert_array_equal(tokenizer(text), theirs(text))
    assert tokenizer(TEXTS) == [list(row) for row in theirs(TEXTS)]
    ids = [[2, 9, 10, 11, 1, 0], [5, 6, 30, 40, 50, 60]]
    assert tokenizer.detokenize(ids) == list(theirs.detokenize(ids))
    assert [tokenizer.id_to_token(i) for i in range(211)] == [theirs.id_to_token(i) for i in range(211)]
    for name in ("start_token_id", "end_token_id", "pad_token_id"):
        assert getattr(tokenizer, name) == getattr(theirs, name)
    # The preset files keras writes load into an equal tokenizer.
    theirs.save_to_preset(str(tmp_path))
    loaded = PaliGemmaTokenizer.from_preset(tmp_path)
    assert loaded.proto == vocabulary.read_bytes() and loaded(TEXTS) == tokenizer(TEXTS)


def test_bad_files_and_inputs(vocabulary, tmp_path):
    with pytest.raises(TokenizerError, match="not a SentencePiece model proto"):
        PaliGemmaTokenizer(b"\x00garbage")
    with pytest.raises(FileNotFoundError, match="missing.spm not found"):
        PaliGemmaTokenizer(tmp_path / "missing.spm")
    # A preset whose tokenizer.json names another class is refused before anything else is read.
    (tmp_path / "tokenizer.json").write_text(json.dumps({"class_name": "BertTokenizer", "config": {}}))
    with pytest.raises(TokenizerError, match="class 'BertTokenizer'"):
        PaliGemmaTokenizer.from_preset(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"class_name": "PaliGemmaTokenizer", "registered_name": "keras_hub>PaliGemmaTokenizer",
         "config": {"proto": "/etc/passwd", "sequence_length": None}}))
    with pytest.raises(TokenizerError, match="'proto' must be null"):
        PaliGemmaTokenizer.from_preset(tmp_path)
    tokenizer = PaliGemmaTokenizer(vocabulary)
    with pytest.raises(ValueError, match="element 1 must be a string"):
        tokenizer(["fine", 3])
    with pytest.raises(ValueError, match=r"outside \[0, 211\)"):
        tokenizer.detokenize([2, 500])
    with pytest.raises(ValueError, match=r"id must be an integer in \[0, 210\]"):
        tokenizer.id_to_token(211)


def test_vocabulary_without_special_pieces_is_refused(tmp_path):
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    words = [f"w{i} v{i % 7} u{i % 13}" for i in range(500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_writer=buffer, vocab_size=30,
                                   minloglevel=2)  # default specials: <unk>, <s>, </s>; no <pad>/<bos>/<eos>
    with pytest.raises(TokenizerError, match=r"special tokens \['<bos>', '<eos>', '<pad>'\]"):
        PaliGemmaTokenizer(buffer.getvalue())
