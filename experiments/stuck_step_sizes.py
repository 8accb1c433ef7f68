"""Count the quantizer step sizes Δ a trained student holds at or below `SCALE_MIN`.

    python experiments/stuck_step_sizes.py ROOT [ROOT ...] [--out experiments/tables/NAME.md]

Every `student/` below the roots (as dq-train saves it) is one row, named `<root>/<run>`: how many step-size elements
its weight and activation quantizers hold, how many sit at or below SCALE_MIN, and the quantizers they belong to. Fake
quantization clamps Δ at SCALE_MIN and passes no gradient below it, so before 5d5b51b a Δ that an absolute Adam step
took there never moved again (Adam's momentum kept it going the same way): the count at the end of training is then
every Δ that ever crossed (but in blocks BKD put back, `distill.revert_worse`). From 5d5b51b the optimizer puts such a Δ
back at SCALE_MIN, where gradients reach it again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from dq.quant.io import SPEC_NAME, saved_students, weights_file
from dq.quant.quantizer import SCALE_MIN
from dq.utils.io import atomic_write_text


def stuck(student: Path) -> tuple[int, int, list[str]]:
    """(step-size elements, of them at or below SCALE_MIN, `quantizer: count` for each quantizer holding any)."""
    state = load_file(str(weights_file(student)))
    scales = {k.removesuffix(".scale"): v for k, v in state.items() if k.endswith("quantizer.scale")}
    low = {k: int((v <= SCALE_MIN).sum()) for k, v in scales.items()}
    return sum(v.numel() for v in scales.values()), sum(low.values()), [f"{k}: {n}" for k, n in low.items() if n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", type=Path, help="directories holding dq-train runs")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    students = saved_students(args.roots)
    if not students:
        raise SystemExit(f"no student/{SPEC_NAME} below {', '.join(map(str, args.roots))}")
    rows = ["| run | step sizes | at or below SCALE_MIN | quantizers (count) |", "|---|---|---|---|"]
    for root, student in students:
        total, n, where = stuck(student)
        shown = "; ".join(where[:6]) + (f"; {len(where) - 6} more" if len(where) > 6 else "")
        rows.append(f"| {student.parent.relative_to(root.parent)} | {total} | {n} | {shown} |")
    table = "\n".join(rows) + "\n"
    print(table, end="")
    if args.out is not None:
        atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
