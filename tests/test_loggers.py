"""dq.utils.loggers: a resumed run's CSV log keeps the earlier attempt's rows; W&B gets no deprecated setting; each job
ends its own W&B run."""

import csv

import pytest
import wandb
import yaml
from conftest import compose_cfg
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from test_train import fast

from dq.config import build_loggers
from dq.errors import ConfigError
from dq.eval import evaluate
from dq.train import train
from dq.utils import loggers
from dq.utils.loggers import ResumableCSVLogger, ending_wandb_run


def _attempt(cls, run, metrics: dict, step: int) -> None:
    logger = cls(save_dir=str(run), name="csv", version="")
    logger.log_metrics(metrics, step=step)
    logger.finalize("success")


def test_a_resumed_csv_log_appends_under_a_merged_header(tmp_path):
    _attempt(ResumableCSVLogger, tmp_path, {"block/00/loss": 0.5}, step=0)
    _attempt(ResumableCSVLogger, tmp_path, {"block/01/loss": 0.25, "eval/fid": 50.0}, step=1)
    _attempt(ResumableCSVLogger, tmp_path, {"block/01/loss": 0.125}, step=2)  # no new column
    with (tmp_path / "csv" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["block/00/loss"], r["block/01/loss"], r["eval/fid"]) for r in rows] == [
        ("0", "0.5", "", ""),
        ("1", "", "0.25", "50.0"),
        ("2", "", "0.125", ""),
    ]


def test_a_log_set_aside_by_an_attempt_killed_while_starting_is_put_back(tmp_path):
    """The earlier rows are renamed aside while Lightning's writer starts (it deletes metrics.csv), never held in
    memory only: a kill in that moment leaves them on disk, and the next attempt puts them back."""
    _attempt(ResumableCSVLogger, tmp_path, {"block/00/loss": 0.5}, step=0)
    log = tmp_path / "csv" / "metrics.csv"
    log.replace(log.with_name("metrics.csv.kept"))  # where a kill mid-start leaves them
    _attempt(ResumableCSVLogger, tmp_path, {"block/01/loss": 0.25}, step=1)
    with log.open(newline="") as f:
        assert [(r["step"], r["block/00/loss"]) for r in csv.DictReader(f)] == [("0", "0.5"), ("1", "")]
    assert sorted(p.name for p in log.parent.iterdir()) == ["metrics.csv"]  # nothing left aside


@pytest.mark.parametrize("cls", [ResumableCSVLogger, CSVLogger])
def test_a_new_column_rewrites_the_log_whole_or_not_at_all(cls, tmp_path, monkeypatch):
    """Each block logs a column of its own, and a new column rewrites metrics.csv under the new header: a kill in that
    rewrite keeps the rows written so far (Lightning's writer truncates the file first)."""
    logger = cls(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"block/00/loss": 0.5}, step=0)
    logger.save()
    log = tmp_path / "csv" / "metrics.csv"
    before = log.read_text()
    real = csv.DictWriter.writerows

    def killed(self, rows):
        if rows and "block/00/loss" in rows[0]:  # the rewrite of the earlier rows, not the new row
            raise KeyboardInterrupt
        return real(self, rows)

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    logger.log_metrics({"block/01/loss": 0.25}, step=1)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    monkeypatch.undo()
    if cls is CSVLogger:  # why dq rewrites it atomically
        assert log.read_text() == "block/00/loss,block/01/loss,step\n"
    else:
        assert log.read_text() == before and sorted(p.name for p in log.parent.iterdir()) == ["metrics.csv"]


def test_lightnings_own_csv_logger_would_drop_the_earlier_rows(tmp_path):
    """Why dq has its own: the stock logger deletes metrics.csv when a second attempt starts."""
    _attempt(CSVLogger, tmp_path, {"block/00/loss": 0.5}, step=0)
    with pytest.warns(UserWarning, match="will be deleted"):
        _attempt(CSVLogger, tmp_path, {"block/01/loss": 0.25}, step=1)
    with (tmp_path / "csv" / "metrics.csv").open(newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1"]


def test_each_job_ends_its_wandb_run_so_the_next_gets_its_own(tmp_path, monkeypatch):
    """Hydra runs a multirun's jobs in one process; without ending the run, the second job's WandbLogger would
    log into the first job's run (and directory)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with ending_wandb_run():  # start clean, whatever ran before in this process
        pass
    runs = []
    for job in ("a", "b"):
        with ending_wandb_run():
            logger = WandbLogger(project="dq-test", save_dir=str(tmp_path / job), offline=True)
            logger.log_metrics({"x": 1.0}, step=0)
            logger.finalize("success")
            runs.append((logger.experiment.id, logger.experiment.dir))
    assert runs[0][0] != runs[1][0]
    assert str(tmp_path / "a") in runs[0][1] and str(tmp_path / "b") in runs[1][1]
    assert wandb.run is None


def test_a_failed_job_ends_its_wandb_run_too(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(RuntimeError, match="boom"), ending_wandb_run():
        WandbLogger(project="dq-test", save_dir=str(tmp_path), offline=True).log_metrics({"x": 1.0}, step=0)
        raise RuntimeError("boom")
    assert wandb.run is None


@pytest.mark.parametrize(("entry", "overrides"), [("train", ["quantizer=fp"]), ("eval", ["eval=none"])])
def test_train_and_evaluate_end_the_wandb_run_also_when_called_directly(entry, overrides, tmp_path, monkeypatch):
    """Not only the command lines: code (and tests) calling `train` / `evaluate` get the same clean-up, here on a
    setting they refuse at once."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    WandbLogger(project="dq-test", save_dir=str(tmp_path), offline=True).log_metrics({"x": 1.0}, step=0)
    assert wandb.run is not None
    with pytest.raises(ConfigError):
        {"train": train, "eval": evaluate}[entry](compose_cfg(entry, [*overrides, "logger=none"], tmp_path / "run"))
    assert wandb.run is None


@pytest.mark.parametrize(("anonymous", "passed"), [(None, {}), (True, {"anonymous": "allow"})])
def test_wandb_init_gets_no_anonymous_setting_unless_asked(tmp_path, monkeypatch, anonymous, passed):
    """wandb warns on any `anonymous` passed to init ("has no effect"), and Lightning's logger always passes one."""
    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(wandb, "init", init)
    extra = {} if anonymous is None else {"anonymous": anonymous}
    with pytest.raises(RuntimeError, match="stop here"):
        _ = loggers.WandbLogger(project="dq-test", save_dir=str(tmp_path), offline=True, **extra).experiment
    assert {k: v for k, v in seen.items() if k == "anonymous"} == passed and seen["project"] == "dq-test"
    assert compose_cfg("train", ["logger=wandb"], tmp_path).logger.wandb._target_ == "dq.utils.loggers.WandbLogger"


def test_the_runs_tags_reach_wandb(tmp_path, monkeypatch):
    """`tags` (set by the experiment files) are W&B's run tags; dq-eval's config has none and gets none."""
    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(wandb, "init", init)
    cfg = compose_cfg("train", ["logger=wandb", "experiment=qat_lsq"], tmp_path)
    with pytest.raises(RuntimeError, match="stop here"):
        _ = build_loggers(cfg.logger)[0].experiment
    assert seen["tags"] == ["baseline", "qat_lsq"]
    assert list(compose_cfg("eval", ["logger=wandb"], tmp_path / "eval").logger.wandb.tags) == []


def test_a_wandb_run_is_named_and_grouped_by_its_run_directory_and_a_resumed_one_goes_on(tmp_path, monkeypatch):
    """W&B made up a random name for every run, so a sweep's jobs could not be told apart on the dashboard, and a
    resumed run started a second W&B run. The run directory names and groups it; a later attempt in the directory
    takes the id of the W&B run the earlier one started (wandb's `latest-run` link), a new directory none."""
    seen = []

    def init(**kwargs):
        seen.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(wandb, "init", init)
    run = tmp_path / "sweep" / "0-ptq_minmax-w4a8"
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stop here"):
            _ = loggers.WandbLogger(project="dq-test", save_dir=str(run), offline=True).experiment
        (run / "wandb" / "offline-run-20261208_002948-575ee313f1e5ef36").mkdir(parents=True, exist_ok=True)
        if not (run / "wandb" / "latest-run").exists():
            (run / "wandb" / "latest-run").symlink_to("offline-run-20261208_002948-575ee313f1e5ef36")
    assert (seen[0]["name"], seen[0]["group"]) == ("sweep/0-ptq_minmax-w4a8", "sweep")
    assert seen[0]["id"] is None and seen[1]["id"] == "575ee313f1e5ef36" and seen[1]["resume"] == "allow"
    with pytest.raises(RuntimeError, match="stop here"):
        _ = loggers.WandbLogger(project="q", save_dir=str(run), name="mine", id="abc", offline=True).experiment
    assert (seen[2]["name"], seen[2]["id"]) == ("mine", "abc")


def test_the_composed_config_and_the_cost_reach_the_loggers_and_scores_log_after_training(tiny_teacher_dir, tmp_path):
    """No config reached W&B or the CSV logger (nothing to filter runs by), the cost was in results.json alone, and
    the scores were logged at step 0, before the training rows."""
    run = tmp_path / "run"
    train(compose_cfg("train", [*fast(tiny_teacher_dir), "logger=csv"], run))
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams["bits"]["name"] == "w4a8" and hparams["distill"]["name"] == "bkd" and hparams["calib"]["seed"] == 1
    with (run / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    scored = [r for r in rows if r.get("eval/student/fid")]
    assert len(scored) == 1 and int(scored[0]["step"]) == 34 == max(int(r["step"]) for r in rows)
    assert float(scored[0]["cost/train_s"]) > 0 and scored[0]["cost/steps"] == "34"
