"""Print BKD's per-block history of dq-train runs side by side: each block's final calibration MSE, the share of its
latent weights that oscillated while it trained (and that were frozen, with `distill.freeze`), and whether it was put
back; with `--against BASE`, each block's MSE as a ratio to the base run's and their geometric mean.

    python experiments/block_history.py <run> [<run> ...] [--against <base run>]

Reads `<run>/checkpoints/last.json` only (seconds). The summary line of each run gives the geometric mean of the MSE
ratios over the blocks after `conv_in` (whose MSE is the rounding of x_t, which no training changes) and the mean
oscillating share over the blocks of 4-bit weights (the 8-bit `conv_in` / `conv_out` of a 4-bit student train at
the 4-bit rate, and nearly all their weights oscillate).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

EIGHT_BIT_ENDS = ("conv_in", "conv_out")  # 8-bit layers of the 4-bit presets (bits.keep_8bit)


def history(run: Path) -> dict[str, dict]:
    """Block name -> its history entry (`mse_before`, `mse_trained`, `mse_after`, `kept`, `oscillated`, ...)."""
    path = run / "checkpoints" / "last.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass a dq-train run directory of distill=bkd")
    return {h["block"]: h for h in json.loads(path.read_text())["history"]}


def cell(h: dict | None, base: dict | None) -> str:
    if h is None:
        return "-"
    text = f"{h['mse_after']:.3g}"
    if base is not None:
        text += f" ({h['mse_after'] / base['mse_after']:.2f}x)"
    if h.get("oscillated") is not None:
        text += f" {100 * h['oscillated']:.0f}%"
    if h.get("frozen") is not None:
        text += f" f{100 * h['frozen']:.0f}%"
    return text + (" R" if h.get("kept") == "untrained" else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="dq-train run directories (distill=bkd)")
    p.add_argument("--against", type=Path, default=None, help="a run on the same calibration draw to compare with")
    args = p.parse_args()
    base = history(args.against) if args.against is not None else None
    runs = [history(r) for r in args.runs]
    blocks = list(dict.fromkeys(b for h in runs for b in h))
    print("final calibration MSE per block (x base), oscillated %, f: frozen %, R: put back as before training")
    print(f"{'block':32s}" + "".join(f" | {r.name[:26]:>26s}" for r in args.runs))
    for b in blocks:
        ref = base.get(b) if base is not None else None
        print(f"{b[:32]:32s}" + "".join(f" | {cell(h.get(b), ref):>26s}" for h in runs))
    for run, h in zip(args.runs, runs, strict=True):
        summary = []
        if base is not None:
            ratios = [h[b]["mse_after"] / base[b]["mse_after"] for b in h if b in base and b != "conv_in"]
            if ratios:
                geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
                summary.append(
                    f"block MSE x{geo:.3f} (geometric mean of {len(ratios)}, {min(ratios):.2f}-{max(ratios):.2f})"
                )
        shares = [e["oscillated"] for b, e in h.items() if e.get("oscillated") is not None and b not in EIGHT_BIT_ENDS]
        if shares:
            summary.append(
                f"oscillated {100 * sum(shares) / len(shares):.0f}% ({100 * min(shares):.0f}-{100 * max(shares):.0f}%)"
            )
        frozen = [e["frozen"] for b, e in h.items() if e.get("frozen") is not None and b not in EIGHT_BIT_ENDS]
        if frozen:
            summary.append(f"frozen {100 * sum(frozen) / len(frozen):.0f}%")
        print(f"{run.name}: " + ("; ".join(summary) or "no oscillation record (a run made before it was counted)"))


if __name__ == "__main__":
    main()
