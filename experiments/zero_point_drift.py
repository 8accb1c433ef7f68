"""How far training moved the zero-points of trained students from the whole numbers they start on.

    python experiments/zero_point_drift.py ROOT [ROOT ...] [--out experiments/tables/NAME.md]

Every `student/` below the roots (as dq-train saves it) is one row, named `<root>/<run>`: how many zero-point elements
its weight and activation quantizers hold and how far the farthest sits from a whole number. Min-max and MSE
initialisation put each zero-point on a whole number and the forward pass uses `round(z)`, so a distance under 0.5 means
no zero-point has changed the value the student computes with (a zero-point that moved by more than half a step shows
its distance to the nearest whole number, not its whole move). At the step-size rates (`distill.lr_zero_point=null`)
Adam moves each by about the rate per step: 1e-3 for weights and 1e-4 for activations over BKD's 120-step blocks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from dq.quant.io import SPEC_NAME, saved_students, weights_file
from dq.utils.io import atomic_write_text


def drift(student: Path) -> dict[str, tuple[int, float]]:
    """Per quantizer kind ("weight", "activation"): (zero-point elements, largest distance to a whole number)."""
    state = load_file(str(weights_file(student)))
    out: dict[str, tuple[int, float]] = {}
    for key, z in state.items():
        if not key.endswith("quantizer.zero_point"):
            continue
        kind = "weight" if key.endswith("weight_quantizer.zero_point") else "activation"
        n, far = out.get(kind, (0, 0.0))
        out[kind] = (n + z.numel(), max(far, float((z.double() - z.double().round()).abs().max())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", type=Path, help="directories holding dq-train runs")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    students = saved_students(args.roots)
    if not students:
        raise SystemExit(f"no student/{SPEC_NAME} below {', '.join(map(str, args.roots))}")
    rows = [
        "| run | weight zero-points | farthest from a whole number | activation zero-points | farthest |",
        "|---|---|---|---|---|",
    ]
    for root, student in students:
        d = drift(student)
        cells = [f"{d[k][0]} | {d[k][1]:.4f}" if k in d else "0 | -" for k in ("weight", "activation")]
        rows.append(f"| {student.parent.relative_to(root.parent)} | {' | '.join(cells)} |")
    table = "\n".join(rows) + "\n"
    print(table, end="")
    if args.out is not None:
        atomic_write_text(args.out, table)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
