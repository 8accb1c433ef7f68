"""Summarise runs over calibration draws (or training seeds): each setting's PSNR to the teacher and FID by draw with
their means and PSNR's standard deviation, FID as a multiple of FP, training seconds and peak memory; with `--against`,
each setting's PSNR change against a base setting, with its 95% confidence interval over the draws.

    python experiments/draws.py TABLE.csv [TABLE.csv ...] [--against "bits=w4a8" --against "bits=w4a4"]
                                [--over calib.seed | seed] [--out OUT] [--plot OUT.png [--label "SETTING as NAME"]]

TABLE.csv: tables written by `experiments/collect.py` (`experiments/tables/*.csv`). A setting is a run's overrides
without the `--over` seed (default `calib.seed`); a run without that override has its default (calib.seed 1,
conf/calib/default.yaml; seed 0, conf/train.yaml), and an override that sets the other seed to its default is dropped
(`calib.seed=1` with `--over seed`). Each setting is paired, seed by seed, with the `--against` setting whose
overrides are the largest subset of its own (`bits=w4a8 callbacks=tpq` with `bits=w4a8`): over calibration draws the
two runs of a pair trained on the same calibration pairs; over training seeds they were scored on the same noise
(`eval.seed` is the run's `seed` unless set). The FP FID is the teacher row's; over training seeds a run that drew
its own noise (collect.py's `[eval seed N, teacher FID X]`) is measured against its own teacher, and `x FP` is the
mean of the runs' ratios. Pairs whose two runs came from different code (collect.py's `code`: commit, changed
checkout, threads, CPU) are named under the table. Seconds, memory and PSNR in the tables are as `dq-train` measured
them; this script only does the arithmetic the README and BENCHMARKS quote. `--plot` draws the same: one row per
setting, a dot per draw and a bar at the mean, PSNR on the left, FID as a multiple of FP (log scale) on the right;
with `--label "bits=w4a8 callbacks=tpq as without WD, W4A8"` (repeatable) it draws the settings named so, in that
order, under those names.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure  # mlxtend's dependency, so always installed; no pyplot, no display needed
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from scipy import stats  # mlxtend's dependency, so always installed

from dq.utils.io import atomic_write, atomic_write_text

OTHER_NOISE = re.compile(r"^\[eval seed \d+, teacher FID ([0-9.]+)\]$")  # collect.py's mark of another noise
TOKEN = re.compile(r"\[[^\]]*\]|\S+")  # an override, or one of collect.py's bracketed marks, whole
FP_TOLERANCE = 1e-4  # the teacher's FID in tables from the same noise (float order differs by run: ~2e-6 apart)
MARK_TOLERANCE = 1e-3  # collect.py's marks print the teacher's FID to two decimals
DEFAULT_SEEDS = {"calib.seed": 1, "seed": 0}  # conf/calib/default.yaml, conf/train.yaml


@dataclass
class Setting:
    """The runs of one setting, by the seed they vary over (calib.seed or seed)."""

    overrides: tuple[str, ...]
    seeds: set[int] = field(default_factory=set)
    psnr: dict[int, float] = field(default_factory=dict)
    fid: dict[int, float] = field(default_factory=dict)
    teacher_fid: dict[int, float] = field(default_factory=dict)  # runs scored on another noise than the table's
    train_s: dict[int, float] = field(default_factory=dict)
    peak_mb: dict[int, float] = field(default_factory=dict)
    code: dict[int, str] = field(default_factory=dict)  # collect.py's `code`; older tables lack it

    @property
    def name(self) -> str:
        return " ".join(self.overrides) or "(defaults)"


def split_overrides(text: str, over: str = "calib.seed") -> tuple[tuple[str, ...], int]:
    """A run's overrides -> (the setting's overrides, sorted, without the `over` seed; that seed).

    An override that sets the other seed of DEFAULT_SEEDS to its default is dropped, so a run that names it and
    one that does not are one setting.
    """
    seed, rest = DEFAULT_SEEDS[over], []
    for token in TOKEN.findall(text):
        key, _, value = token.partition("=")
        if key == over and value.isdigit():
            seed = int(value)
        elif not (key in DEFAULT_SEEDS and value.isdigit() and int(value) == DEFAULT_SEEDS[key]):
            rest.append(token)
    return tuple(sorted(rest)), seed


def number(text: str | None) -> float | None:
    """A table cell as a number; None for an empty one or text (`non-finite 3/1000`: a student not scored)."""
    try:
        return float(text) if text else None
    except ValueError:
        return None


def read_tables(paths: list[Path], over: str = "calib.seed") -> tuple[float, dict[tuple[str, ...], Setting]]:
    """FP FID and the settings of collect.py tables; a second run of one setting and seed is refused."""
    fp: float | None = None
    settings: dict[tuple[str, ...], Setting] = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass tables written by experiments/collect.py (experiments/tables/)")
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["bits"] == "fp":
                    if any(OTHER_NOISE.match(t) for t in TOKEN.findall(row["overrides"])):  # fp on other noise
                        raise SystemExit(
                            f"{path}: teacher run {row['run']} was scored on other evaluation noise "
                            f"({row['overrides']}): its FID is no reference for these students; leave it out"
                        )
                    fid = number(row["fid"])
                    if fp is not None and fid is not None and not math.isclose(fid, fp, rel_tol=FP_TOLERANCE):
                        raise SystemExit(f"{path}: FP FID {fid} differs from {fp} in an earlier table")
                    fp = fid if fid is not None else fp
                    continue
                tokens = TOKEN.findall(row["overrides"])
                marks = [m for t in tokens if (m := OTHER_NOISE.match(t))]
                if marks and over == "calib.seed":
                    raise SystemExit(
                        f"{path}: run {row['run']} was scored on other evaluation noise or against another teacher "
                        f"({row['overrides']}): "
                        "draws.py compares runs scored on one noise against one teacher; leave it out"
                    )
                text = " ".join(t for t in tokens if not OTHER_NOISE.match(t))
                key, seed = split_overrides(text, over)
                s = settings.setdefault(key, Setting(key))
                if seed in s.seeds:
                    raise SystemExit(f"{path}: setting '{s.name}' has {over}={seed} twice ({row['run']})")
                s.seeds.add(seed)
                if row.get("code"):
                    s.code[seed] = row["code"]
                if marks:  # over training seeds each seed drew its own noise (eval.seed = seed): its own teacher
                    s.teacher_fid[seed] = float(marks[0].group(1))
                for attr, col in (("psnr", "psnr_to_teacher"), ("fid", "fid"), ("train_s", "train_s"),
                                  ("peak_mb", "peak_mem_mb")):  # fmt: skip
                    if (value := number(row[col])) is not None:
                        getattr(s, attr)[seed] = value
    if fp is None:
        raise SystemExit("no teacher (fp) row in the tables: its FID is the reference for 'x FP'")
    return fp, settings


def base_of(setting: Setting, bases: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The base whose overrides are the largest proper subset of the setting's (None: none is, or it is a base); two
    such bases of one size are refused."""
    own = set(setting.overrides)
    fits = [b for b in bases if set(b) < own]
    if not fits:
        return None
    best = [b for b in fits if len(b) == max(map(len, fits))]
    if len(best) > 1:
        raise SystemExit(f"'{setting.name}' fits the bases {[' '.join(b) for b in best]} alike: pass only one")
    return best[0]


def paired(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """a - b on the draws both have."""
    return {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))}


def sd(values: dict[int, float]) -> str:
    return f"{statistics.stdev(values.values()):.2f}" if len(values) > 1 else "-"


def spread(values: dict[int, float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values.values()), max(values.values())
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"


def by_seed(values: dict[int, float], digits: int, seeds: set[int] | None = None) -> str:
    """'26.61 / 26.47 / 23.89 (25.66)': the values in seed order and their mean; with `seeds`, one cell per seed, '-'
    where it has no value (a run not scored, a draw without a pair), so that each cell lines up with its seed."""
    if not values:
        return "-"
    cells = " / ".join(f"{values[s]:.{digits}f}" if s in values else "-" for s in sorted(seeds or values))
    return f"{cells} ({statistics.fmean(values.values()):.{digits}f})" if len(values) > 1 else cells


def with_sd(diff: dict[int, float], seeds: set[int] | None = None) -> str:
    """Paired differences by draw, their mean and (over two or more draws) their standard deviation and the mean's 95%
    confidence interval (Student's t with n - 1 degrees of freedom: the draws are independent), its ends printed."""
    if not diff:
        return "-"
    text = by_seed(diff, 2, seeds)
    if len(diff) < 2:
        return text
    n, mean, s = len(diff), statistics.fmean(diff.values()), statistics.stdev(diff.values())
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    return f"{text[:-1]}, SD {s:.2f}, 95% CI {mean - half:+.2f} to {mean + half:+.2f})"


def check_same_noise(setting: Setting, base: Setting, over: str) -> None:
    """Over training seeds each seed drew its own noise: the two runs of a pair must have drawn the same."""
    for seed in sorted(set(setting.psnr) & set(base.psnr)):
        mine, theirs = setting.teacher_fid.get(seed), base.teacher_fid.get(seed)
        same = mine == theirs or (None not in (mine, theirs) and math.isclose(mine, theirs, rel_tol=MARK_TOLERANCE))
        if not same:
            raise SystemExit(
                f"'{setting.name}' {over}={seed} was scored on other noise than its pair in '{base.name}' (teacher FID "
                f"{mine} against {theirs}): a paired change needs both runs on one noise; leave one out"
            )


def mixed_code(setting: Setting, base: Setting, over: str) -> list[str]:
    """The pairs whose two runs came from different code (commit, a changed checkout, threads or CPU): named under the
    table, since a paired change then holds the code's change too. Runs whose table has no `code` are not named."""
    seeds = sorted(set(setting.psnr) & set(base.psnr) & set(setting.code) & set(base.code))
    return [f"'{setting.name}' {over} {k} ({setting.code[k]} against {base.code[k]})"
            for k in seeds if setting.code[k] != base.code[k]]  # fmt: skip


def ratios(fp: float, s: Setting) -> dict[int, float]:
    """Each draw's FID over the FP FID (over training seeds, over the teacher of the run's own noise)."""
    return {k: f / s.teacher_fid.get(k, fp) for k, f in s.fid.items()}


def table(
    fp: float, settings: dict[tuple[str, ...], Setting], against: list[tuple[str, ...]], over: str = "calib.seed"
) -> str:
    """Markdown: one row per setting, in the order the tables list them."""
    head = ["setting", over, "PSNR dB (mean)", "PSNR SD", "FID (mean)", "x FP", "train s", "peak MB"]
    if against:
        head += ["paired PSNR change (mean)", "against"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mixed: list[str] = []
    for s in settings.values():
        ratio = f"{statistics.fmean(ratios(fp, s).values()):.2f}x" if s.fid else "-"
        row = [s.name, " / ".join(map(str, sorted(s.seeds))), by_seed(s.psnr, 2, s.seeds), sd(s.psnr),
               by_seed(s.fid, 1, s.seeds), ratio, spread(s.train_s), spread(s.peak_mb)]  # fmt: skip
        if against:
            base, diff = base_of(s, against), {}
            if base is not None:
                check_same_noise(s, settings[base], over)
                mixed += mixed_code(s, settings[base], over)
                diff = paired(s.psnr, settings[base].psnr)
            row += [with_sd(diff, s.seeds), " ".join(base) if diff else "-"]
        lines.append("| " + " | ".join(row) + " |")
    unscored = [f"'{s.name}' {over} {', '.join(map(str, sorted(m)))}" for s in settings.values()
                if (m := s.seeds - set(s.psnr))]  # fmt: skip
    note = f"\nNot scored, left out of the means and pairs ('-'): {'; '.join(unscored)}.\n" if unscored else ""
    if mixed:
        note += f"\nPairs from different code (collect.py's `code`: commit, threads and CPU): {'; '.join(mixed)}.\n"
    return "\n".join(lines) + f"\n\nFP classifier-FID {fp:.2f}.\n" + note


def figure(fp: float, settings: dict[tuple[str, ...], Setting], labels: dict[tuple[str, ...], str]) -> Figure:
    """Dot plot of the table: one row per setting (the first at the top), each draw a dot, the mean a bar; PSNR to
    the teacher on the left, FID as a multiple of FP on the right, log scale (a dashed line at FP). With `labels`,
    only those settings, in that order, under those names."""
    rows = [settings[k] for k in labels] if labels else list(settings.values())
    fig = Figure(figsize=(10, 0.9 + 0.32 * len(rows)), layout="constrained")
    psnr_ax, fid_ax = fig.subplots(1, 2, sharey=True)
    panels = ((psnr_ax, lambda s: s.psnr, "PSNR to the teacher, dB (higher is better)"),
              (fid_ax, lambda s: ratios(fp, s), f"classifier-FID / FP {fp:.2f} (lower is better)"))  # fmt: skip
    for ax, values, title in panels:
        for y, s in enumerate(rows):
            draws = values(s)
            ax.scatter(list(draws.values()), [y] * len(draws), s=14, color="tab:blue", alpha=0.6, zorder=2)
            if draws:
                ax.plot([statistics.fmean(draws.values())] * 2, [y - 0.3, y + 0.3], color="black", lw=2, zorder=3)
        ax.set_xlabel(title)
        ax.grid(axis="x", alpha=0.3)
    fid_ax.axvline(1.0, color="grey", ls="--", lw=1)
    fid_ax.set_xscale("log")  # 1.1x to 40x in one table
    fid_ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    fid_ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    fid_ax.xaxis.set_minor_formatter(NullFormatter())
    psnr_ax.set_yticks(range(len(rows)), [labels.get(s.overrides, s.name) for s in rows])
    psnr_ax.set_ylim(len(rows) - 0.5, -0.5)  # the table's first row at the top
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--against", action="append", default=[], help="a base setting's overrides (repeatable)")
    over_help = "the seed a setting's runs vary over: calibration draws (default) or training seeds"
    parser.add_argument("--over", choices=sorted(DEFAULT_SEEDS), default="calib.seed", help=over_help)
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--plot", type=Path, help="also draw the table as a dot plot into this PNG file")
    label_help = "the name of a setting in the plot: 'SETTING as NAME' (repeatable)"
    parser.add_argument("--label", action="append", default=[], help=label_help)
    args = parser.parse_args()
    fp, settings = read_tables(args.tables, args.over)
    against = [split_overrides(a, args.over)[0] for a in args.against]
    held = [s.name for s in settings.values()]
    if missing := [" ".join(a) for a in against if a not in settings]:
        raise SystemExit(f"--against {missing}: no such setting in the tables; they hold {held}")
    labels: dict[tuple[str, ...], str] = {}
    for text in args.label:
        setting, sep, name = text.rpartition(" as ")
        key = split_overrides(setting, args.over)[0]
        if not sep or not name.strip():
            raise SystemExit(f"--label {text!r}: write 'SETTING as NAME', e.g. 'bits=w4a8 callbacks=tpq as without WD'")
        if key not in settings:
            raise SystemExit(f"--label {text!r}: no setting '{setting}' in the tables; they hold {held}")
        labels[key] = name.strip()
    if labels and args.plot is None:
        raise SystemExit("--label names settings in the plot: pass --plot OUT.png too")
    text = table(fp, settings, against, args.over)
    print(text)
    if args.out is not None:
        atomic_write_text(args.out, text)
    if args.plot is not None:
        fig = figure(fp, settings, labels)
        atomic_write(args.plot, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
