"""Generation records of the shipped golden cases through the harness: greedy ids, returned mask, step logits.

The records (golden/<case>/generation*.npz) were written by ``python -m tools.make_goldens --generation-only``:
keras-hub's own ``PaliGemmaCausalLM.generate`` on ragged prompts, and refimpl in float64 as the ground truth. Here:
refimpl and keras-hub's recorded run pass them; a candidate that flips one token, or moves one logit beyond its
tolerance, fails and is located; tampered generation files are refused; regeneration reproduces the records.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conformance import report
from conformance.backend import DumpBackend, RecordedKerasBackend, RefimplBackend
from conformance.cases import CaseError, IntegrityError, compute_manifest, load_case, read_manifest
from conformance.cli import main
from conformance.harness import CheckOptions, check_case, exit_code
from tools import make_goldens

pytestmark = pytest.mark.conformance

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
GENERATION_CASES = ("pg1_basic", "pg2_window")  # the cases with generation records (``cases``: tests/conftest.py)
GENERATION_FILES = ("generation_inputs.npz", "generation.npz", "generation_keras.npz")
needs_golden = pytest.mark.skipif(not (GOLDEN / "MANIFEST.json").is_file(),
                                  reason="golden/MANIFEST.json missing: run `python -m tools.make_goldens`")


class EditedGeneration(RefimplBackend):
    """refimpl (NumPy kernels, float32) whose generate() output is edited by ``edit(out) -> out``."""

    def __init__(self, edit):
        super().__init__(kernels="numpy")
        self.edit = edit

    def generate(self, inputs, max_length, stop_token_ids):
        return self.edit(super().generate(inputs, max_length, stop_token_ids))


def _flipper(case, step: int, row: int) -> EditedGeneration:
    """refimpl whose generated id at (step, row) is replaced by the next id of the vocabulary."""
    position = case.generation.first_index + step
    vocabulary = case.parsed_config.vocabulary_size

    def edit(out):
        ids = out["token_ids"].copy()
        ids[row, position] = (ids[row, position] + 1) % vocabulary
        return dict(out, token_ids=ids)

    return EditedGeneration(edit)


# ---- the shipped records pass ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GENERATION_CASES)
def test_shipped_records_are_ragged_and_pg2_window_is_windowed_and_stops(cases, name):
    record = cases[name].generation
    assert record is not None
    lengths = record.inputs["padding_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) == len(lengths) > 1, "prompts of different lengths (ragged)"
    assert record.max_length > lengths.max()
    if name == "pg2_window":
        config = cases[name].parsed_config
        assert config.sliding_window_size < config.image_sequence_length + record.max_length  # the band is active
        assert record.stop_token_ids is not None
        assert not record.reference["padding_mask"].all(), "a stop id must actually trigger"
        assert record.steps < record.max_length - record.first_index, "generation stops before max_length"


@pytest.mark.parametrize("name", GENERATION_CASES)
@pytest.mark.parametrize("backend", ["numpy", "float64", "keras-recorded"])
def test_refimpl_and_recorded_keras_pass_the_shipped_records(cases, name, backend):
    candidate = {"numpy": lambda: RefimplBackend(kernels="numpy"),
                 "float64": lambda: RefimplBackend(kernels="numpy", dtype="float64"),
                 "keras-recorded": RecordedKerasBackend}[backend]()
    result = check_case(cases[name], candidate)
    g = result.generation
    assert result.status == "pass", report.format_terminal([result], verbose=True)
    assert (g.status, g.token_ids, g.padding_mask, g.logits.status) == ("pass", "pass", "pass", "pass")
    assert g.logits_compared_steps == g.reference_steps == cases[name].generation.steps
    assert g.logits.metrics.top1_agreement == 1.0
    assert g.logits.metrics.budget_used <= 0.5  # measured: at most 0.23 (keras-hub on pg1_basic)
    assert "generation: " in report.summary_line(result)


def test_numba_kernels_pass_and_no_generation_skips(cases):
    pytest.importorskip("numba", reason="numba not installed")
    result = check_case(cases["pg2_window"], RefimplBackend(kernels="numba"))
    assert result.status == "pass" and result.generation.status == "pass"
    skipped = check_case(cases["pg2_window"], RefimplBackend(kernels="numpy"), CheckOptions(generation=False))
    assert skipped.generation is None and "generation" not in report.summary_line(skipped)


# ---- a diverging candidate is located --------------------------------------------------------------------------
@pytest.mark.parametrize("name, step, row", [("pg1_basic", 0, 1), ("pg1_basic", 3, 0), ("pg2_window", 3, 0)])
def test_a_flipped_token_is_reported_at_its_step_and_row(cases, name, step, row):
    case = cases[name]
    result = check_case(case, _flipper(case, step, row))
    g = result.generation
    assert result.status == "fail" and exit_code([result]) == 1
    assert result.divergence is None  # the taps still conform
    d = g.token_divergence
    assert (d.step, d.position, d.rows) == (step, case.generation.first_index + step, [row])
    assert d.reference == [int(case.generation.reference["token_ids"][row, d.position])]
    assert g.padding_mask == "pass"
    # Logits are compared up to and including the divergence step (later steps are fed other tokens).
    assert g.logits.status == "pass" and g.logits_compared_steps == step + 1
    text = report.format_terminal([result])
    assert f"token ids diverge at step {step} (text position {d.position}): row {row}:" in text
    assert text.splitlines()[0].startswith(f"FAIL  {name}")


def test_a_token_after_a_rows_stop_is_not_compared(cases):
    case = cases["pg2_window"]
    kept = case.generation.reference["padding_mask"]
    row, position = map(int, np.argwhere(~kept)[0])  # a token generated after that row's stop id
    step = position - case.generation.first_index
    result = check_case(case, _flipper(case, step, row))
    assert result.status == "pass" and result.generation.token_ids == "pass"


def test_a_changed_returned_padding_mask_fails(cases):
    case = cases["pg2_window"]

    def edit(out):
        mask = out["padding_mask"].copy()
        mask[1, -1] = True  # row 1 stopped early: keras returns False there
        return dict(out, padding_mask=mask)

    result = check_case(case, EditedGeneration(edit))
    assert result.status == "fail" and result.generation.padding_mask == "fail"
    assert f"row 1, text position {case.generation.max_length - 1}" in result.generation.padding_mask_message


# ---- step logits -------------------------------------------------------------------------------------------------
def _perturb_logits(step, row, token, delta):
    def edit(out):
        logits = out["step_logits"].copy()
        logits[step, row, token] += delta
        return dict(out, step_logits=logits)
    return edit


@pytest.mark.parametrize("name", GENERATION_CASES)
def test_step_logits_beyond_tolerance_fail_and_within_pass(cases, name):
    case = cases[name]
    clean = check_case(case, RefimplBackend(kernels="numpy")).generation.logits
    atol = clean.tolerance.atol
    assert "generation logits" in clean.tolerance.source and "float32 envelope" in clean.tolerance.source
    reference = case.generation.reference["step_logits"]
    step, row = reference.shape[0] - 1, 0
    token = int(np.argsort(reference[step, row])[reference.shape[-1] // 2])  # a middling logit: argmax unchanged
    failing = check_case(case, EditedGeneration(_perturb_logits(step, row, token, 3 * atol)))
    g = failing.generation
    assert failing.status == "fail" and g.token_ids == "pass" and g.logits.status == "fail"
    assert g.logits.metrics.worst_index == (step, row, token)
    assert 2 < g.logits.metrics.budget_used < 4
    assert "step logits fail" in report.summary_line(failing)
    within = check_case(case, EditedGeneration(_perturb_logits(step, row, token, 0.3 * atol)))
    assert within.status == "pass"


def test_top1_must_agree_even_within_a_loose_tolerance(cases):
    case = cases["pg1_basic"]
    reference = case.generation.reference["step_logits"]
    second = int(np.argsort(reference[0, 0])[-2])

    def edit(out):
        logits = out["step_logits"].copy()
        logits[0, 0, second] = logits[0, 0].max() + 0.5  # now the runner-up leads; the token is not changed
        return dict(out, step_logits=logits)

    loose = CheckOptions(tolerance_overrides=(("^gen/step_logits$", 10.0, 0.0),))
    result = check_case(case, EditedGeneration(edit), loose)
    tap = result.generation.logits
    assert tap.tolerance.source.startswith("command-line override")
    assert result.status == "fail" and tap.status == "fail" and "top-1 token differs" in tap.message


def test_xfail_applies_to_generation_parts(cases):
    case = cases["pg1_basic"]
    options = CheckOptions(xfail=(("^gen/token_ids$", "known greedy divergence"),))
    result = check_case(case, _flipper(case, 1, 1), options)
    assert result.status == "pass" and result.generation.token_ids == "xfail"


def test_backend_without_generate_is_not_provided(cases):
    class TapsOnly:
        name = "taps-only"

        def __init__(self):
            self.inner = RefimplBackend(kernels="numpy")

        def prepare(self, case):
            self.inner.prepare(case)

        def run(self, inputs, taps):
            return self.inner.run(inputs, taps)

    result = check_case(cases["pg2_window"], TapsOnly())
    assert result.status == "pass" and result.generation.status == "not_provided"
    assert "generation not checked" in report.summary_line(result)


# ---- dumps, CLI and reports --------------------------------------------------------------------------------------
def _dump(case, directory: Path, generation: dict | None) -> Path:
    """keras-hub's recorded taps of the case plus, optionally, gen/ arrays: what an external port would write."""
    arrays = dict(case.keras_taps())
    if generation is not None:
        arrays.update({f"gen/{key}": value for key, value in generation.items()})
    directory.mkdir(exist_ok=True)
    np.savez(directory / f"{case.name}.npz", **arrays)
    return directory


def test_dump_backend_reads_gen_arrays_and_cli_reports(cases, tmp_path, capsys):
    case = cases["pg2_window"]
    keras = case.keras_generation()
    ok = _dump(case, tmp_path / "ok", keras)
    flipped_ids = keras["token_ids"].copy()
    position = case.generation.first_index + 2
    flipped_ids[0, position] = (flipped_ids[0, position] + 1) % case.parsed_config.vocabulary_size
    bad = _dump(case, tmp_path / "bad", dict(keras, token_ids=flipped_ids))
    none = _dump(case, tmp_path / "none", None)
    base = ["check", "--golden", str(GOLDEN), "--case", "pg2_window"]
    assert main([*base, "--candidate", str(ok)]) == 0
    out = capsys.readouterr().out
    assert "generation: 4 steps, token ids and padding mask equal" in out
    paths = {kind: tmp_path / f"report.{kind}" for kind in ("json", "xml", "html")}
    assert main([*base, "--candidate", str(bad), "--json", str(paths["json"]), "--junit", str(paths["xml"]),
                 "--html", str(paths["html"])]) == 1
    out = capsys.readouterr().out
    assert "token ids diverge at step 2 (text position 8): row 0:" in out
    assert main([*base, "--candidate", str(bad), "--no-generation"]) == 0
    assert main([*base, "--candidate", str(none)]) == 0
    assert "generation not checked (the backend returned no generation)" in capsys.readouterr().out

    document = json.loads(paths["json"].read_text())
    generation = document["cases"][0]["generation"]
    assert generation["status"] == "fail" and generation["token_divergence"]["step"] == 2
    assert generation["token_divergence"]["rows"] == [0] and generation["logits"]["name"] == "gen/step_logits"
    doc = report.__doc__
    for key in list(generation) + list(generation["token_divergence"]):
        assert f'"{key}"' in doc, key
    junit = paths["xml"].read_text()
    assert 'name="gen/token_ids"' in junit and "token ids diverge at step 2" in junit
    assert "token ids diverge at step 2" in paths["html"].read_text()


def test_h5_dump_with_integer_token_ids(cases, tmp_path):
    h5py = pytest.importorskip("h5py", reason="h5py not installed")
    case = cases["pg1_basic"]
    with h5py.File(tmp_path / "pg1_basic.h5", "w") as handle:
        for key, value in {**case.keras_taps(), **{f"gen/{k}": v for k, v in case.keras_generation().items()}}.items():
            handle[key] = value
    backend = DumpBackend(tmp_path / "pg1_basic.h5")
    result = check_case(case, backend)
    assert result.status == "pass" and result.generation.status == "pass" and not backend.notes


# ---- integrity and format ---------------------------------------------------------------------------------------
@pytest.fixture
def case_copy(tmp_path):
    """pg2_window alone in a golden directory, with the shipped manifest's entries for it."""
    if not (GOLDEN / "MANIFEST.json").is_file():
        pytest.skip("golden/MANIFEST.json missing: run `python -m tools.make_goldens`")
    root = tmp_path / "golden"
    shutil.copytree(GOLDEN / "pg2_window", root / "pg2_window")
    files = {k: v for k, v in read_manifest(GOLDEN).items() if k.startswith("pg2_window/")}
    (root / "MANIFEST.json").write_text(json.dumps({"schema_version": 1, "files": files}))
    return root


@pytest.mark.parametrize("relative", GENERATION_FILES)
def test_generation_files_are_covered_by_the_integrity_check(case_copy, relative, capsys):
    assert f"pg2_window/{relative}" in read_manifest(case_copy)
    load_case(case_copy, "pg2_window")  # intact
    path = case_copy / "pg2_window" / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"{relative}: sha256"):
        load_case(case_copy, "pg2_window")
    assert main(["--golden", str(case_copy), "--backend", "refimpl-numpy"]) == 2
    path.unlink()
    with pytest.raises(IntegrityError, match=f"missing file {relative}"):
        load_case(case_copy, "pg2_window")


def _rewrite_case_json(root: Path, edit) -> None:
    path = root / "pg2_window" / "case.json"
    document = json.loads(path.read_text())
    edit(document["generation"])
    path.write_text(json.dumps(document, indent=1))
    (root / "MANIFEST.json").write_text(json.dumps(compute_manifest(root, ["pg2_window"])))


@pytest.mark.parametrize("edit, message", [
    (lambda g: g.update(max_length=12), r"token_ids must be int\[2, 12\]"),
    (lambda g: g.update(stop_token_ids=[83]), "stop_token_ids must be null or a non-empty list of ids in"),
    (lambda g: g.update(reference="../inputs.npz"), "must name an existing file inside the case"),
    (lambda g: g.pop("float32_envelope"), "float32_envelope must be"),
    (lambda g: g.update(reference="generation_inputs.npz"), "expected exactly the arrays"),
])
def test_malformed_generation_section_is_a_case_error(case_copy, edit, message):
    _rewrite_case_json(case_copy, edit)
    with pytest.raises(CaseError, match=message):
        load_case(case_copy, "pg2_window")


def test_case_without_generation_section_still_loads(case_copy):
    _rewrite_case_json(case_copy, lambda g: g.clear())  # {} is not None: an empty section is malformed
    with pytest.raises(CaseError):
        load_case(case_copy, "pg2_window")
    path = case_copy / "pg2_window" / "case.json"
    document = json.loads(path.read_text())
    del document["generation"]
    path.write_text(json.dumps(document, indent=1))
    for name in GENERATION_FILES:
        (case_copy / "pg2_window" / name).unlink()
    (case_copy / "MANIFEST.json").write_text(json.dumps(compute_manifest(case_copy, ["pg2_window"])))
    assert load_case(case_copy, "pg2_window").generation is None


# ---- regeneration ------------------------------------------------------------------------------------------------
@needs_golden
@pytest.mark.parametrize("name", GENERATION_CASES)
def test_regenerating_the_refimpl_part_reproduces_the_committed_record(name):
    case_dir = GOLDEN / name
    case = json.loads((case_dir / "case.json").read_text())
    with np.load(case_dir / case["generation"]["reference"], allow_pickle=False) as data:
        committed = {key: data[key] for key in data.files}
    regenerated = make_goldens.run_generation(case_dir, case, "float64")
    assert sorted(regenerated) == sorted(committed)
    for key in ("token_ids", "padding_mask", "steps"):
        np.testing.assert_array_equal(regenerated[key], committed[key], err_msg=key)
        assert regenerated[key].dtype == committed[key].dtype, key
    logits, reference = regenerated["step_logits"], committed["step_logits"]
    assert logits.dtype == reference.dtype == np.float64 and logits.shape == reference.shape
    assert np.max(np.abs(logits - reference)) <= 1e-12 * np.max(np.abs(reference))
    # The float32 run generates the same ids, and its error (the envelope) is the committed one within a factor 4.
    float32 = make_goldens.run_generation(case_dir, case, "float32")
    np.testing.assert_array_equal(float32["token_ids"], committed["token_ids"])
    keep = make_goldens.compared_step_mask(committed["padding_mask"], committed["steps"])
    new = make_goldens.error_summary(float32["step_logits"][keep], reference[keep])["max_abs"]
    old = case["generation"]["float32_envelope"]["max_abs"]
    assert old / 4 <= new <= old * 4
