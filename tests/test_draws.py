"""experiments/draws.py: means over calibration draws and paired changes (the README and BENCHMARKS quote them)."""

import csv
import statistics
from pathlib import Path

import pytest
from conftest import load_script

COLUMNS = ["quantizer", "bits", "overrides", "fid", "psnr_to_teacher", "train_s", "peak_mem_mb", "code", "run"]


def _script():
    return load_script("draws")


def _table(
    path: Path, rows: list[tuple[str, float, float]], fp: float = 40.0, fp_overrides: str = "", codes: list[str] = ()
) -> Path:
    """A collect.py-like CSV: the teacher row, then (overrides, fid, psnr) rows, with `codes` their `code` cells."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerow({"quantizer": "fp (teacher)", "bits": "fp", "overrides": fp_overrides, "fid": fp, "run": "teacher"})
        for i, (overrides, fid, psnr) in enumerate(rows):
            run = {"overrides": overrides, "fid": fid, "psnr_to_teacher": psnr, "train_s": 100 + i, "run": f"/r/{i}",
                   "code": codes[i] if codes else ""}  # fmt: skip
            w.writerow({"quantizer": "dilatequant", "bits": "w4a8", "peak_mem_mb": 1000, **run})
    return path


def _cells(out: str, setting: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"| {setting} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_means_ratio_and_paired_change_against_the_largest_base(tmp_path, monkeypatch, capsys):
    base = _table(tmp_path / "base.csv", [("bits=w4a8 calib.seed=1", 50.0, 26.0),
                                          ("bits=w4a8 calib.seed=2", 60.0, 25.0),
                                          ("bits=w4a8 calib.seed=3", 70.0, 24.0)])  # fmt: skip
    # the first run names no calib.seed (so 1, the default) and its overrides in another order; seed 4 has no base
    runs = _table(tmp_path / "runs.csv", [("callbacks=tpq bits=w4a8", 44.0, 27.5),
                                          ("bits=w4a8 callbacks=tpq calib.seed=2", 66.0, 24.0),
                                          ("bits=w4a8 callbacks=tpq calib.seed=4", 80.0, 20.0)])  # fmt: skip
    argv = ["draws.py", str(base), str(runs), "--against", "bits=w4a8", "--out", str(tmp_path / "t.md")]
    monkeypatch.setattr("sys.argv", argv)
    _script().main()
    out = capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() in out
    setting, seeds, psnr, psnr_sd, fid, ratio, train_s, mem, change, against = _cells(out, "bits=w4a8 callbacks=tpq")
    assert seeds == "1 / 2 / 4"
    assert psnr == f"27.50 / 24.00 / 20.00 ({statistics.fmean([27.5, 24.0, 20.0]):.2f})"
    assert psnr_sd == f"{statistics.stdev([27.5, 24.0, 20.0]):.2f}"
    assert fid == "44.0 / 66.0 / 80.0 (63.3)"
    assert ratio == f"{(44 + 66 + 80) / 3 / 40:.2f}x"
    assert train_s == "100-102" and mem == "1000"
    diffs = [27.5 - 26.0, 24.0 - 25.0]  # seed 4 has no base run: its cell is '-'
    mean, half = statistics.fmean(diffs), 12.7062 * statistics.stdev(diffs) / 2**0.5  # t(0.975, 1 dof), printed table
    assert change == (
        f"1.50 / -1.00 / - ({mean:.2f}, SD {statistics.stdev(diffs):.2f}, "
        f"95% CI {mean - half:+.2f} to {mean + half:+.2f})"
    )
    assert against == "bits=w4a8"
    assert _cells(out, "bits=w4a8")[8] == "-"  # a base is not paired with itself
    assert "FP classifier-FID 40.00" in out


def test_over_training_seeds_pairs_by_seed_and_scores_each_run_against_its_own_teacher(tmp_path, monkeypatch, capsys):
    """--over seed: a setting's runs are its training seeds (none named: seed 0); calib.seed=1 is the default draw
    whether named or not; a run that drew its own evaluation noise (collect.py's mark) is measured against its own
    teacher; pairs are the runs of one seed (one noise)."""
    own = {1: "[eval seed 1, teacher FID 30.00]", 2: "[eval seed 2, teacher FID 50.00]"}
    runs = _table(tmp_path / "runs.csv", [("bits=w4a8 calib.seed=1", 50.0, 26.0),
                                          (f"bits=w4a8 seed=1 {own[1]}", 45.0, 25.0),
                                          (f"bits=w4a8 calib.seed=1 seed=2 {own[2]}", 70.0, 24.5),
                                          (f"bits=w4a8 calib.seed=2 seed=1 {own[1]}", 55.0, 30.0),
                                          ("bits=w4a8 callbacks=tpq calib.seed=1", 44.0, 27.0),
                                          (f"bits=w4a8 callbacks=tpq seed=2 {own[2]}", 46.0, 25.5)])  # fmt: skip
    monkeypatch.setattr("sys.argv", ["draws.py", str(runs), "--over", "seed", "--against", "bits=w4a8"])
    _script().main()
    out = capsys.readouterr().out
    assert "| setting | seed |" in out
    base = _cells(out, "bits=w4a8")
    assert base[1:4] == ["0 / 1 / 2", f"26.00 / 25.00 / 24.50 ({statistics.fmean([26.0, 25.0, 24.5]):.2f})",
                         f"{statistics.stdev([26.0, 25.0, 24.5]):.2f}"]  # fmt: skip
    assert base[5] == f"{statistics.fmean([50 / 40, 45 / 30, 70 / 50]):.2f}x"  # each run against its own teacher
    assert _cells(out, "bits=w4a8 calib.seed=2")[1:3] == ["1", "30.00"]  # another draw is another setting
    diffs = [27.0 - 26.0, 25.5 - 24.5]
    cells = _cells(out, "bits=w4a8 callbacks=tpq")
    assert cells[8:] == [f"1.00 / 1.00 ({statistics.fmean(diffs):.2f}, SD 0.00, 95% CI +1.00 to +1.00)", "bits=w4a8"]
    monkeypatch.setattr("sys.argv", ["draws.py", str(runs), str(runs), "--over", "seed"])
    with pytest.raises(SystemExit, match="has seed=0 twice"):
        _script().main()
    monkeypatch.setattr("sys.argv", ["draws.py", str(runs)])  # over calibration draws other noise is still refused
    with pytest.raises(SystemExit, match="scored on other evaluation noise"):
        _script().main()


def test_a_setting_pairs_with_the_base_sharing_most_overrides():
    draws = _script()
    bases = [("bits=w4a8",), ("bits=w4a4",), ("bits=w4a8", "distill.dampen=1")]
    setting = draws.Setting(("bits=w4a8", "distill.dampen=1", "distill.freeze=0.02"))
    assert draws.base_of(setting, bases) == ("bits=w4a8", "distill.dampen=1")
    assert draws.base_of(draws.Setting(("bits=w4a4", "callbacks=tpq")), bases) == ("bits=w4a4",)
    assert draws.base_of(draws.Setting(("bits=w8a8",)), bases) is None
    with pytest.raises(SystemExit, match=r"fits the bases \['bits=w4a8', 'callbacks=tpq'\] alike"):
        draws.base_of(draws.Setting(("bits=w4a8", "callbacks=tpq")), [("bits=w4a8",), ("callbacks=tpq",)])


def test_an_unscored_student_and_real_float_noise_in_the_teacher_fid(tmp_path, monkeypatch, capsys):
    """collect.py writes `non-finite 3/1000` for a student it could not score; the teacher's FID differs in the
    sixth digit between tables from the same noise."""
    a = _table(tmp_path / "a.csv", [("bits=w4a8 calib.seed=1", 50.0, 26.0)], fp=42.32760238647461)
    b = _table(tmp_path / "b.csv", [("bits=w4a8 calib.seed=2", "non-finite 3/1000", "")], fp=42.327694)
    monkeypatch.setattr("sys.argv", ["draws.py", str(a), str(b)])
    _script().main()
    out = capsys.readouterr().out
    seeds, psnr, psnr_sd, fid, ratio = _cells(out, "bits=w4a8")[1:6]
    ratio_fp = f"{50 / 42.32760238647461:.2f}x"
    assert (seeds, psnr, psnr_sd, fid, ratio) == ("1 / 2", "26.00 / -", "-", "50.0 / -", ratio_fp)
    assert "Not scored, left out of the means and pairs ('-'): 'bits=w4a8' calib.seed 2." in out


@pytest.mark.parametrize(
    ("rows", "fp2", "argv_extra", "message"),
    [
        ([("bits=w4a8", 1.0, 1.0), ("bits=w4a8 calib.seed=1", 2.0, 2.0)], 40.0, [], "has calib.seed=1 twice"),
        ([("bits=w4a8", 1.0, 1.0)], 41.0, [], "FP FID 41.0 differs from 40.0"),
        ([("bits=w4a8", 1.0, 1.0)], 40.0, ["--against", "bits=w4a4"], r"--against \['bits=w4a4'\]: no such setting"),
        ([("bits=w4a8 calib.seed=1", "non-finite 1/10", ""), ("bits=w4a8", "", "")], 40.0, [], "calib.seed=1 twice"),
        ([("bits=w4a8 [eval seed 5, teacher FID 41.00]", 1.0, 1.0)], 40.0, [], r"scored on other evaluation noise"),
    ],
)
def test_bad_tables_are_refused_by_name(rows, fp2, argv_extra, message, tmp_path, monkeypatch):
    a = _table(tmp_path / "a.csv", [("bits=w4a8 calib.seed=2", 1.0, 1.0)])
    b = _table(tmp_path / "b.csv", rows, fp=fp2)
    monkeypatch.setattr("sys.argv", ["draws.py", str(a), str(b), *argv_extra])
    with pytest.raises(SystemExit, match=message):
        _script().main()


def test_a_teacher_run_on_other_noise_is_no_fp_reference(tmp_path, monkeypatch):
    """A `quantizer=fp eval.seed=3` run among the roots was taken as the students' FP FID (a review helper's
    finding: 1.43x printed where 1.35x was right)."""
    runs = _table(tmp_path / "t.csv", [("bits=w4a8 calib.seed=1", 56.0, 26.5)], fp=39.75,
                  fp_overrides="quantizer=fp eval.seed=3 [eval seed 3, teacher FID 39.75]")  # fmt: skip
    monkeypatch.setattr("sys.argv", ["draws.py", str(runs)])
    with pytest.raises(SystemExit, match=r"teacher run teacher was scored on other evaluation noise"):
        _script().main()


def test_over_training_seeds_a_pair_on_two_noises_is_refused(tmp_path, monkeypatch):
    """A setting scored with eval.seed=0 against a base whose seed 1 drew its own noise was paired silently."""
    runs = _table(tmp_path / "t.csv", [("bits=w4a8 seed=1 [eval seed 1, teacher FID 30.00]", 45.0, 25.0),
                                       ("bits=w4a8 callbacks=tpq seed=1 eval.seed=0", 50.0, 26.0)])  # fmt: skip
    monkeypatch.setattr("sys.argv", ["draws.py", str(runs), "--over", "seed", "--against", "bits=w4a8"])
    with pytest.raises(SystemExit, match=r"seed=1 was scored on other noise than its pair in 'bits=w4a8'"):
        _script().main()


def test_pairs_from_different_code_are_named_under_the_table(tmp_path, monkeypatch, capsys):
    """A paired change holds any change of code between its two runs (the statistics review's finding): such pairs
    are named; a run from a table without `code` is not claimed either way."""
    base = _table(tmp_path / "base.csv", [("bits=w4a8 calib.seed=1", 50.0, 26.0),
                                          ("bits=w4a8 calib.seed=2", 60.0, 25.0),
                                          ("bits=w4a8 calib.seed=3", 70.0, 24.0)],
                  codes=["aaaaaaa AVX512", "aaaaaaa AVX512", ""])  # fmt: skip
    runs = _table(tmp_path / "runs.csv", [("bits=w4a8 callbacks=tpq calib.seed=1", 44.0, 27.5),
                                          ("bits=w4a8 callbacks=tpq calib.seed=2", 66.0, 24.0),
                                          ("bits=w4a8 callbacks=tpq calib.seed=3", 66.0, 24.0)],
                  codes=["aaaaaaa AVX512", "bbbbbbb+ AVX2", "bbbbbbb AVX2"])  # fmt: skip
    monkeypatch.setattr("sys.argv", ["draws.py", str(base), str(runs), "--against", "bits=w4a8"])
    _script().main()
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith("Pairs from different code"))
    assert note.endswith(": 'bits=w4a8 callbacks=tpq' calib.seed 2 (bbbbbbb+ AVX2 against aaaaaaa AVX512).")
    monkeypatch.setattr("sys.argv", ["draws.py", str(base), str(runs)])  # no pairs: nothing to name
    _script().main()
    assert "Pairs from different code" not in capsys.readouterr().out


def test_the_plot_draws_each_draw_and_the_mean_of_the_labelled_settings_in_order(tmp_path, monkeypatch, capsys):
    runs = _table(tmp_path / "runs.csv", [("bits=w4a8 calib.seed=1", 50.0, 26.0),
                                          ("bits=w4a8 calib.seed=2", 60.0, 25.0),
                                          ("bits=w4a8 callbacks=tpq calib.seed=1", 80.0, 20.0),
                                          ("bits=w4a8 callbacks=tpq calib.seed=2", 100.0, 22.0),
                                          ("bits=w4a4 calib.seed=1", 400.0, 14.0)])  # fmt: skip
    draws = _script()
    fp, settings = draws.read_tables([runs])
    labels = {("bits=w4a8", "callbacks=tpq"): "without WD", ("bits=w4a8",): "DilateQuant"}
    psnr_ax, fid_ax = draws.figure(fp, settings, labels).axes
    assert [t.get_text() for t in psnr_ax.get_yticklabels()] == ["without WD", "DilateQuant"]  # w4a4 left out
    assert psnr_ax.get_ylim() == (1.5, -0.5)  # the first label at the top
    for ax, expected in ((psnr_ax, [[20.0, 22.0], [26.0, 25.0]]), (fid_ax, [[2.0, 2.5], [1.25, 1.5]])):
        dots = [c.get_offsets() for c in ax.collections]
        assert [list(d[:, 0]) for d in dots] == expected  # x: each draw's value
        assert [set(d[:, 1]) for d in dots] == [{0.0}, {1.0}]  # y: the setting's row
        means = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "-"]
        assert means == pytest.approx([statistics.fmean(e) for e in expected])
    assert fid_ax.get_xscale() == "log"
    assert len(draws.figure(fp, settings, {}).axes[0].collections) == 3  # no labels: every setting

    plot = tmp_path / "plot.png"
    argv = ["draws.py", str(runs), "--plot", str(plot), "--label", "bits=w4a8 callbacks=tpq calib.seed=1 as without WD"]
    monkeypatch.setattr("sys.argv", argv)
    draws.main()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {plot}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv_extra, message",
    [
        (["--plot", "p.png", "--label", "bits=w4a8 without WD"], "write 'SETTING as NAME'"),
        (["--plot", "p.png", "--label", "bits=w4a2 as W4A2"], "no setting 'bits=w4a2' in the tables"),
        (["--label", "bits=w4a8 as DilateQuant"], "pass --plot OUT.png too"),
    ],
)
def test_bad_labels_are_refused_by_name(argv_extra, message, tmp_path, monkeypatch):
    runs = _table(tmp_path / "runs.csv", [("bits=w4a8 calib.seed=1", 50.0, 26.0)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["draws.py", str(runs), *argv_extra])
    with pytest.raises(SystemExit, match=message):
        _script().main()
    assert not (tmp_path / "p.png").exists()


DDP_DRAWS = ["python", "experiments/draws.py", "--against", "bits=w4a8", "--out"]  # experiments/README.md's command


@pytest.mark.parametrize(
    ("command", "table", "row"),
    [
        (["bash", "experiments/baselines_table.sh"], "baselines_one_machine_draws.md",
         "| bits=w4a8 distill=model_kd | 1 / 2 / 3 |"),
        (["bash", "experiments/qat_lsq_symmetric_table.sh"], "qat_lsq_symmetric_draws.md",
         "| bits=w4a4 experiment=qat_lsq quantizer.spec.weight_init=lsq quantizer.spec.weight_symmetric=true "
         "| 1 / 2 / 3 |"),
        (["bash", "experiments/adaround_paper_budget_table.sh"], "adaround_paper_budget_draws.md",
         "| bits=w4a8 distill.lr_rounding=0.3 distill.lr_weight=0 distill.lr_weight_qparams=0 experiment=paper_budget "
         "quantizer.spec.weight_init=mse | 1 / 2 / 3 |"),
        ([*DDP_DRAWS[:2], "experiments/tables/ddp_draws.csv", *DDP_DRAWS[2:]], "ddp_draws_draws.md",
         "| bits=w4a8 device=cpu trainer.accelerator=cpu trainer.devices=2 trainer=ddp | 1 / 2 / 3 / 4 / 5 / 6 |"),
        ([*DDP_DRAWS[:2], "experiments/tables/ddp_draws_owned.csv", *DDP_DRAWS[2:]], "ddp_draws_owned_draws.md",
         "| bits=w4a8 device=cpu trainer.accelerator=cpu trainer.devices=2 trainer=ddp | 1 / 2 / 3 / 4 / 5 / 6 |"),
    ],
)  # fmt: skip
def test_paired_tables_are_what_their_committed_commands_make(command, table, row, tmp_path):
    """Each paired table the README and BENCHMARKS quote (the README's table of DilateQuant, its ablation and the
    baselines, and each study's) is re-made byte for byte from the committed run tables by its command, and pairs
    the runs on every draw; baselines_table.sh also draws the README's plot."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    md, png = tmp_path / "t.md", tmp_path / "p.png"
    plot = [str(png)] if command[-1].endswith("baselines_table.sh") else []
    command = [str(root / c) if c.startswith("experiments/") else c for c in command]  # run from elsewhere
    subprocess.run([*command, str(md), *plot], check=True, capture_output=True, cwd=tmp_path)
    assert md.read_text() == (root / "experiments/tables" / table).read_text()
    assert row in md.read_text()
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
