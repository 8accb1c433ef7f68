"""Collect finished runs' `results.json` into one Markdown + CSV table.

    python experiments/collect.py multirun/eval/2026-11-24_19-30-00 --out experiments/tables/ptq_minmax

Every directory below the given roots that holds a results.json is one row (method, bits, settings, metrics);
`overrides` lists the run's Hydra command-line overrides (from `.hydra/overrides.yaml`) other than logging ones, and
`off=<name>` for each name or glob `release_eval.py` was given (`only=<name>` with `--keep`),
`[fp_network_input]` / `[fp_output_layer_input]` where the run's spec left the network input / the output layer's
input in float, and the evaluation seed with its teacher's FID where a run was scored on other noise than the first
(the teacher row's) or against another teacher FID (another step count, sample count, dtype or model).
`--block NAME` adds a `block_mse` column: that BKD block's calibration MSE before -> after training, from the run's
`checkpoints/last.json` history ("reverted" when revert_worse put it back; after -> the MSE training reached).
`code` says what made a run's numbers, from its `provenance`: the commit (`+` where the checkout differed from it),
the CPU's vector instruction set, the intra-op threads (`t2`), the CPU's id (`cpu:<8 hex>`, a digest of its name and
flags) and, on a GPU, its name; the parts a run's record lacks are left out (all of them for runs from before dq
recorded it). Two runs that differ in any part can differ in float order.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from dq.quant.spec import FP_INPUT_QUANTIZERS
from dq.utils.io import atomic_write_text

FP_TOLERANCE = 1e-4  # teacher FIDs from the same noise differ by float order only (~2e-6 apart); draws.py's too
QUIET = ("logger=", "eval.progress=", "hydra.", "run_dir=")  # overrides that do not change the result


def overrides(run: Path) -> str:
    """The run's Hydra overrides that can change its result, space-separated ("" when none were recorded)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    return " ".join(o for o in OmegaConf.load(path) if not str(o).startswith(QUIET))


COLUMNS = ["quantizer", "bits", "temporal", "distill", "callbacks", "overrides", "fid", "is", "psnr_to_teacher",
           "sample_time_ratio", "train_s", "peak_mem_mb", "peak_gpu_mem_mb", "reverted_blocks", "code",
           "run"]  # fmt: skip


def marks(method: dict, given: str = "") -> list[str]:
    """Settings a row must show even when no command-line override set them: the quantizers `release_eval.py`
    switched off (`off=<name>`), or with `--keep` the only ones it left on (`only=<name>`), and a network input or
    output layer input left in float (`[fp_network_input]`, `[fp_output_layer_input]`) unless `given`, the run's
    overrides, already sets it."""
    spec = method.get("config", {}).get("spec", {})
    kind = "only" if "kept" in method else "off"
    names = method.get("selected", method.get("kept", method.get("released", [])))  # as typed, else expanded
    unsaid = [f for f in FP_INPUT_QUANTIZERS if f"quantizer.spec.{f}=true" not in given.split()]
    fp = [f"[{f}]" for f in unsaid if spec.get(f, False)]
    return [f"{kind}={q}" for q in names] + fp


def block_mse(run: Path, block: str) -> str:
    """`"before -> trained"` calibration MSE of BKD block `block` in `run` ("" without a history entry for it)."""
    path = run / "checkpoints" / "last.json"
    history = json.loads(path.read_text()).get("history", []) if path.is_file() else []
    for h in history:
        if h["block"] == block:
            trained = h.get("mse_trained", h["mse_after"])
            return f"{h['mse_before']:.3g} -> {trained:.3g}" + (" reverted" if h.get("kept") == "untrained" else "")
    return ""


def code(provenance: dict) -> str:
    """`6b8435c+ AVX2 t2 cpu:1f2e3d4c`: the short commit (`+`: the checkout differed from it; `?`: git could not
    tell), the CPU's instruction set, the threads, the CPU's id, a GPU's name; "" for a run without a provenance
    record. Older records lack the threads or the CPU's id: those parts are left out."""
    if not provenance:
        return ""
    git = provenance.get("git") or {}
    changed = {True: "+", False: "", None: "?"}[git.get("dirty")]
    commit = git.get("commit", "")[:7] + changed if git else "installed"
    threads = f"t{provenance['threads']}" if "threads" in provenance else ""
    cpu = f"cpu:{provenance['cpu']['id']}" if "cpu" in provenance else ""
    device = provenance.get("device", "cpu")
    parts = [commit, provenance.get("cpu_capability", ""), threads, cpu, "" if device == "cpu" else device]
    return " ".join(p for p in parts if p)


def unscored(scores: dict, metric: dict) -> str:
    """The FID cell of a model that sampled NaN or infinite images (`non-finite 3/1000`), else ""."""
    bad = scores.get("non_finite_samples")
    return f"non-finite {bad}/{metric.get('n_samples', '?')}" if bad else ""


def rows(roots: list[Path], block: str | None = None) -> list[dict]:
    """One row per results.json below `roots`, plus the teacher's row (from the first run) on top; with `block`, each
    row's `block_mse` of that block."""
    out, teacher, seed = [], None, None
    for path in sorted(p for root in roots for p in root.rglob("results.json")):
        r = json.loads(path.read_text())
        # a run with eval=none has neither teacher nor student scores: its row keeps the cost only
        m, s, cost = r.get("method", {}), r.get("student", r.get("teacher", {})), r.get("cost", {})
        teacher = teacher or r.get("teacher")
        seed = r["metric"].get("seed") if seed is None else seed
        # scored on other noise, or against another teacher FID (another step count, sample count, dtype, model):
        # "x FP" must use its own teacher, so name it
        other_noise = "teacher" in r and (
            r["metric"]["seed"] != seed or not math.isclose(r["teacher"]["fid"], teacher["fid"], rel_tol=FP_TOLERANCE)
        )
        noise = [f"[eval seed {r['metric']['seed']}, teacher FID {r['teacher']['fid']:.2f}]"] if other_noise else []
        out.append({
            "quantizer": m.get("quantizer", "fp"), "bits": m.get("bits", "fp"),
            "temporal": m.get("config", {}).get("temporal", ""), "distill": m.get("distill", "none"),
            "callbacks": "+".join(m.get("callbacks", [])) or "-",
            "overrides": " ".join([given := overrides(path.parent)] + marks(m, given) + noise).strip(),
            "fid": s.get("fid", unscored(s, r["metric"])), "is": s.get("is", ""),
            "psnr_to_teacher": s.get("psnr_to_teacher", ""),
            "sample_time_ratio": s.get("sample_time_ratio", ""), "train_s": cost.get("train_s", ""),
            "peak_mem_mb": cost.get("peak_mem_mb", ""), "peak_gpu_mem_mb": cost.get("peak_gpu_mem_mb", ""),
            "reverted_blocks": " ".join(cost.get("reverted_blocks", [])), "code": code(r.get("provenance", {})),
            "run": str(path.parent),
        } | ({"block_mse": block_mse(path.parent, block)} if block else {}))  # fmt: skip
    if teacher is not None and all(r["quantizer"] != "fp" for r in out):
        out.insert(0, dict.fromkeys(COLUMNS, "") | {"quantizer": "fp (teacher)", "bits": "fp", "fid": teacher["fid"],
                                                     "is": teacher["is"], "run": "teacher"})  # fmt: skip
    return out


def columns(table: list[dict]) -> list[str]:
    """COLUMNS, with `block_mse` before `run` when the rows have it."""
    return COLUMNS[:-1] + ["block_mse", "run"] if any("block_mse" in r for r in table) else COLUMNS


def markdown(table: list[dict]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    cols = [c for c in columns(table) if c != "run"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.csv")
    p.add_argument("--block", default=None, help="add a column with this BKD block's calibration MSE before -> after")
    args = p.parse_args()
    table = rows(args.roots, args.block)
    md = markdown(table)
    print(md)
    if args.out:
        atomic_write_text(args.out.with_suffix(".md"), md)
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, columns(table), restval="")
        w.writeheader()
        w.writerows(table)
        atomic_write_text(args.out.with_suffix(".csv"), text.getvalue())


if __name__ == "__main__":
    main()
