"""experiments/collect.py: the rows a table gets from run directories (the benchmark tables come from it)."""

import json
from pathlib import Path

from conftest import load_script


def _collect():
    return load_script("collect")


def _run(path: Path, seed: int, teacher_fid: float, method: dict, overrides: list[str]) -> None:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    student = {"fid": 50.0, "is": 8.0, "psnr_to_teacher": 30.0}
    results = {"teacher": {"fid": teacher_fid, "is": 8.6}, "student": student, "metric": {"seed": seed}}
    (path / "results.json").write_text(json.dumps(results | {"method": {"quantizer": "dilatequant"} | method}))


def test_rows_mark_released_kept_and_other_noise(tmp_path):
    _run(tmp_path / "a_trained", 0, 42.3, {}, ["bits=w4a4", "logger=csv"])
    released = {"released": ["x.act_quantizer", "y.act_quantizer"], "selected": ["*.act_quantizer"]}
    _run(tmp_path / "b_released", 0, 42.3, released, ["bits=w4a4"])
    kept = {"released": ["x.act_quantizer"], "kept": ["conv_in.act_quantizer"], "selected": ["conv_in"]}
    _run(tmp_path / "c_kept", 1, 34.2, kept, ["distill=none"])
    _run(tmp_path / "d_older", 0, 42.3, {"released": ["conv_in.act_quantizer"]}, [])  # before `selected`

    rows = _collect().rows([tmp_path])
    assert [r["overrides"] for r in rows] == [
        "",  # the teacher row, from the first run's noise
        "bits=w4a4",  # logger= is dropped
        "bits=w4a4 off=*.act_quantizer",  # the names as given, not every quantizer they matched
        "distill=none only=conv_in [eval seed 1, teacher FID 34.20]",
        "off=conv_in.act_quantizer",
    ]
    assert rows[0]["fid"] == 42.3 and rows[0]["quantizer"] == "fp (teacher)"


def test_rows_mark_a_run_scored_against_another_teacher_on_the_same_noise(tmp_path):
    """Another step count (or sample count, dtype, model) gives another teacher FID from the same eval seed: "x FP"
    must use that run's own teacher (draws.py once scored a 100-step run against the 25-step teacher: 0.85x, not
    1.20x). Float-order differences of one teacher's FID are no mark."""
    _run(tmp_path / "a_25_steps", 0, 42.3, {}, ["bits=w4a8"])
    _run(tmp_path / "b_same_teacher", 0, 42.300002, {}, ["bits=w4a4"])
    _run(tmp_path / "c_100_steps", 0, 30.0, {}, ["bits=w4a8", "model.num_inference_steps=100"])
    assert [r["overrides"] for r in _collect().rows([tmp_path])][1:] == [
        "bits=w4a8",
        "bits=w4a4",
        "bits=w4a8 model.num_inference_steps=100 [eval seed 0, teacher FID 30.00]",
    ]


def test_rows_mark_inputs_left_in_float(tmp_path):
    def spec(**flags: bool) -> dict:
        return {"config": {"spec": {"split_concat": True, **flags}}}

    _run(tmp_path / "a", 0, 42.3, spec(), ["bits=w4a8"])
    _run(tmp_path / "b", 0, 42.3, spec(fp_network_input=True), ["bits=w4a8"])
    _run(tmp_path / "c", 0, 42.3, spec(fp_output_layer_input=True, fp_network_input=False), [])
    _run(tmp_path / "d", 0, 42.3, spec(fp_network_input=True, fp_output_layer_input=True), [])
    _run(tmp_path / "e", 0, 42.3, spec(fp_output_layer_input=True), ["quantizer.spec.fp_output_layer_input=true"])
    assert [r["overrides"] for r in _collect().rows([tmp_path])][1:] == [
        "bits=w4a8",
        "bits=w4a8 [fp_network_input]",
        "[fp_output_layer_input]",
        "[fp_network_input] [fp_output_layer_input]",
        "quantizer.spec.fp_output_layer_input=true",  # the override says it already: no mark
    ]


def test_a_run_without_scores_keeps_its_cost(tmp_path):
    """`dq-train eval=none` writes results.json with the method and the cost only."""
    run = tmp_path / "b_none"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- eval=none\n")
    results = {"metric": {"features": "none"}, "method": {"quantizer": "dilatequant"}, "cost": {"train_s": 12.5}}
    (run / "results.json").write_text(json.dumps(results))
    only = _collect().rows([run])
    assert len(only) == 1 and only[0]["train_s"] == 12.5 and only[0]["fid"] == ""
    assert only[0]["overrides"] == "eval=none"
    _run(tmp_path / "a_scored", 0, 42.3, {}, ["bits=w4a4"])
    both = _collect().rows([tmp_path])
    assert [r["run"] for r in both] == ["teacher", str(tmp_path / "a_scored"), str(run)]


def test_a_student_that_sampled_nan_says_so_in_the_fid_cell(tmp_path):
    run = tmp_path / "nan"
    _run(run, 0, 42.3, {}, ["bits=w4a4"])
    results = json.loads((run / "results.json").read_text())
    results["student"] = {"non_finite_samples": 3, "sample_s": 1.0}  # as dq-train writes it
    results["metric"]["n_samples"] = 40
    (run / "results.json").write_text(json.dumps(results))
    (row,) = [r for r in _collect().rows([tmp_path]) if r["run"] == str(run)]
    assert row["fid"] == "non-finite 3/40" and row["psnr_to_teacher"] == ""


def test_the_code_column_names_commit_instruction_set_threads_cpu_and_gpu(tmp_path):
    cpu = {"model": "Xeon", "id": "1f2e3d4c"}
    now = {"git": {"commit": "6b8435cd55503e19", "dirty": False}, "cpu_capability": "AVX512", "cpu": cpu}
    for name, record in [
        ("a", {"git": {"commit": "6b8435cd55503e19", "dirty": False}, "cpu_capability": "AVX2", "device": "cpu"}),
        ("b", {"git": {"commit": "6b8435cd55503e19", "dirty": True}, "cpu_capability": "AVX512", "device": "cpu"}),
        ("c", {"git": None, "cpu_capability": "AVX2", "device": "NVIDIA H200"}),
        ("d", None),  # a run from before dq recorded its provenance
        ("e", {"git": {"commit": "6b8435cd55503e19", "dirty": None}, "cpu_capability": "AVX2", "device": "cpu"}),
        ("f", now | {"threads": 2, "device": "cpu"}),  # what dq records now
        ("g", now | {"threads": 1, "device": "NVIDIA H200"}),
    ]:
        _run(tmp_path / name, 0, 42.3, {}, [])
        if record is not None:
            results = json.loads((tmp_path / name / "results.json").read_text())
            (tmp_path / name / "results.json").write_text(json.dumps(results | {"provenance": record}))
    codes = [r["code"] for r in _collect().rows([tmp_path])]
    # e: git status failed, so whether the checkout differed is unknown (it read as a clean commit)
    assert codes[:6] == ["", "6b8435c AVX2", "6b8435c+ AVX512", "installed AVX2 NVIDIA H200", "", "6b8435c? AVX2"]
    assert codes[6:] == ["6b8435c AVX512 t2 cpu:1f2e3d4c", "6b8435c AVX512 t1 cpu:1f2e3d4c NVIDIA H200"]
