"""``from_preset(..., stream=True)``: blocks and token rows read from the file when used, same outputs, little memory.

The reference is the same model loaded normally (``stream=False``): streaming only changes when the reader runs,
so backbone outputs and every tap must be bit-identical. The LM head walks the table in slabs, so its logits may
differ from one big matmul by BLAS blocking (float32 rounding of the same dot products); that bound is tabled here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conformance.cases import load_case
from refimpl import weights
from refimpl.model import PaliGemmaBackbone
from refimpl.weights import StreamedBlocks, StreamedTable, WeightFileError
from tests.memory import traced_peak

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
# pg1_basic: plain file; pg1_sharded: shards; pg1_bf16: bf16 storage; pg1_legacy_h5: keras-2 variable paths;
# pg2_mha_caps: post-norms, caps, window.
CASES = ("pg1_basic", "pg1_sharded", "pg1_bf16", "pg1_legacy_h5", "pg2_mha_caps")
KERNELS = ["numpy", pytest.param("numba", marks=pytest.mark.numba)]
# LM head in slabs vs one matmul: the same float32 dot products blocked differently by BLAS (measured about 2e-7
# of the largest logit on the mid-size model); float64 stays far below.
SLAB_LOGITS_RTOL = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 1e-2}


def _case(name):
    return load_case(GOLDEN, name, verify=False)  # integrity is tests/conformance's job


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("name", CASES)
def test_streamed_outputs_and_taps_equal_loaded_ones(name, dtype, kernels):
    if kernels == "numba":
        pytest.importorskip("numba", reason="numba not installed")
    case = _case(name)
    loaded = PaliGemmaBackbone.from_preset(case.preset, dtype=dtype, kernels=kernels)
    with PaliGemmaBackbone.from_preset(case.preset, dtype=dtype, kernels=kernels, stream=True) as streamed:
        assert isinstance(streamed.params.blocks, StreamedBlocks)
        assert isinstance(streamed.params.vit.blocks, StreamedBlocks)
        assert isinstance(streamed.params.token_embedding, StreamedTable)
        out, taps = streamed.call_with_taps(case.inputs, taps=".*")
    expected_out, expected_taps = loaded.call_with_taps(case.inputs, taps=".*")
    assert np.array_equal(out, expected_out)
    assert taps.keys() == expected_taps.keys()
    for tap in taps:
        if tap == "llm/logits":
            scale = np.abs(expected_taps[tap]).max()
            np.testing.assert_allclose(taps[tap], expected_taps[tap], rtol=0, atol=SLAB_LOGITS_RTOL[dtype] * scale,
                                       err_msg=tap)
        else:
            assert np.array_equal(taps[tap], expected_taps[tap]), tap


@pytest.mark.parametrize("dtype", ["float32", "float64", "mixed_bfloat16"])
def test_streamed_table_rows_and_slabs_equal_the_loaded_table(dtype):
    case = _case("pg1_bf16")  # bf16 storage: exercises the decode and rounding path
    loaded = PaliGemmaBackbone.from_preset(case.preset, dtype=dtype).params.token_embedding
    with PaliGemmaBackbone.from_preset(case.preset, dtype=dtype, stream=True) as streamed:
        table = streamed.params.token_embedding
        ids = np.array([[5, 0, 5], [loaded.shape[0] - 1, 3, 0]])
        rows = table[ids]
        assert rows.dtype == loaded.dtype and rows.shape == (2, 3, loaded.shape[1])
        assert np.array_equal(rows, loaded[ids])
        assert np.array_equal(table[np.zeros((0,), int)], loaded[np.zeros((0,), int)])
        slabs = list(table.row_slabs(rows_per_slab=10))
        assert [s.start for s, _ in slabs] == list(range(0, loaded.shape[0], 10))
        assert np.array_equal(np.concatenate([slab for _, slab in slabs]), loaded)


def test_streamed_table_rejects_bad_ids():
    with PaliGemmaBackbone.from_preset(_case("pg1_basic").preset, stream=True) as model:
        table = model.params.token_embedding
        vocabulary = table.shape[0]
        with pytest.raises(IndexError, match=rf"ids must be in \[0, {vocabulary}\), found \[0, {vocabulary}\]"):
            table[np.array([0, vocabulary])]
        with pytest.raises(IndexError, match=r"found \[-1, 2\]"):
            table[np.array([-1, 2])]
        with pytest.raises(TypeError, match="ids must be integers, found dtype float64"):
            table[np.array([1.0])]


def test_streamed_blocks_read_on_each_access_and_check_indices():
    with PaliGemmaBackbone.from_preset(_case("pg1_basic").preset, stream=True) as model:
        blocks = model.params.blocks
        count = model.config.num_layers
        assert len(blocks) == count and len(list(blocks)) == count
        first, again = blocks[0], blocks[0]
        assert first is not again and np.array_equal(first.wq, again.wq)  # read anew, never cached
        assert np.array_equal(blocks[-1].w_down, blocks[count - 1].w_down)
        assert len(blocks[0:2]) == min(2, count)
        with pytest.raises(IndexError, match=f"decoder block index {count} out of range for {count} blocks"):
            blocks[count]
        with pytest.raises(TypeError, match="index must be an integer, found str"):
            blocks["0"]


def test_closed_streaming_model_says_so():
    case = _case("pg1_basic")
    model = PaliGemmaBackbone.from_preset(case.preset, stream=True)
    model.close()
    model.close()  # idempotent
    with pytest.raises(WeightFileError, match="the weight file has been closed"):
        model(case.inputs)


def test_stream_checks_the_whole_file_first(tmp_path):
    """A file that does not match the config fails at from_preset, not halfway through a forward pass."""
    import shutil

    import h5py

    case = _case("pg1_basic")
    preset = tmp_path / "preset"
    shutil.copytree(case.preset, preset)
    with h5py.File(preset / "model.weights.h5", "a") as handle:
        last = case.parsed_config.num_layers - 1
        suffix = weights.keras_name_suffix(last)
        del handle[f"layers/pali_gemma_decoder_block{suffix}/ffw_linear/vars/0"]
    with pytest.raises(WeightFileError, match=rf"missing entry .*blocks\[{last}\]\.w_down"):
        PaliGemmaBackbone.from_preset(preset, stream=True)


def test_streaming_forward_holds_one_or_two_blocks_not_the_model(tmp_path):
    """tracemalloc peak of a streamed float64 forward pass vs the model's weights (numpy allocations are traced).

    Resident at most: two decoder blocks (the loop variable still names block i while block i+1 is read), the
    small always-resident arrays, activations and the gathered embedding rows (about 1 MB here). The model has 8
    decoder blocks of 3.2 MB and a 10 MB table, so holding all blocks, or the table, would break the bound.
    """
    from tools.make_big_preset import make_preset

    case = _case("pg1_basic")
    config = case.parsed_config.replace(num_layers=8, vocabulary_size=20000, hidden_dim=64, intermediate_dim=4096)
    preset, _ = make_preset(tmp_path / "preset", config)
    loaded = PaliGemmaBackbone.from_preset(preset, dtype="float64")
    total = loaded.params.nbytes
    block = loaded.params.blocks[0].nbytes
    inputs = case.inputs
    expected = loaded(inputs)
    del loaded
    with PaliGemmaBackbone.from_preset(preset, dtype="float64", stream=True) as model:
        peak, out = traced_peak(lambda: model(inputs))
    assert np.array_equal(out, expected)
    assert peak < 2 * block + 2_000_000, (peak, block, total)


# ---- mmap=True: map what is stored as the params array, read the rest ------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("name", CASES)
def test_mapped_outputs_and_taps_equal_read_ones(name, dtype, stream):
    case = _case(name)
    loaded = PaliGemmaBackbone.from_preset(case.preset, dtype=dtype)
    with PaliGemmaBackbone.from_preset(case.preset, dtype=dtype, mmap=True, stream=stream) as mapped:
        out, taps = mapped.call_with_taps(case.inputs, taps=".*")
    expected_out, expected_taps = loaded.call_with_taps(case.inputs, taps=".*")
    assert np.array_equal(out, expected_out)
    for tap in taps:
        if tap == "llm/logits" and stream and dtype != "float32":  # the table is mapped (one matmul) only in float32
            np.testing.assert_allclose(taps[tap], expected_taps[tap], rtol=0,
                                       atol=SLAB_LOGITS_RTOL[dtype] * np.abs(expected_taps[tap]).max())
        else:
            assert np.array_equal(taps[tap], expected_taps[tap]), tap


def _writeable(params) -> dict[str, bool]:
    out = {f"vit.{n}": a.flags.writeable for n, a in params.vit.arrays()}
    out.update({f"blocks[0].{n}": a.flags.writeable for n, a in params.blocks[0].arrays()})
    out["token_embedding"] = params.token_embedding.flags.writeable
    return out


def test_mmap_maps_exactly_the_entries_stored_as_the_params_array():
    """float32 file, float32 policy: every entry but the re-laid-out ones (q/k/v kernels, the patch conv) is a
    read-only map; float64 policy or bf16 storage: nothing is (the bytes differ), so everything is read."""
    case = _case("pg1_basic")
    mapped = _writeable(PaliGemmaBackbone.from_preset(case.preset, mmap=True).params)
    relaid = {"vit.patch_kernel", "blocks[0].wq", "blocks[0].wk", "blocks[0].wv", "blocks[0].wo"}
    assert {name for name, writeable in mapped.items() if writeable} == relaid
    for name, dtype in (("pg1_basic", "float64"), ("pg1_bf16", "float32")):
        params = PaliGemmaBackbone.from_preset(_case(name).preset, dtype=dtype, mmap=True).params
        assert all(_writeable(params).values()), name
    with pytest.raises(ValueError, match="read-only"):
        PaliGemmaBackbone.from_preset(case.preset, mmap=True).params.token_embedding[0, 0] = 1.0


def test_mmap_of_a_truncated_file_fails_cleanly(tmp_path):
    import shutil

    case = _case("pg1_basic")
    preset = tmp_path / "preset"
    shutil.copytree(case.preset, preset)
    weights_file = preset / "model.weights.h5"
    size = weights_file.stat().st_size
    with open(weights_file, "r+b") as stream:
        stream.truncate(size - 4096)
    with pytest.raises(WeightFileError):
        PaliGemmaBackbone.from_preset(preset, mmap=True)
