"""Draw the over-optimisation curves of a personalisation-study JSON: proxy and truth against reward steps.

One panel per reward (NearID, frozen head, mean pool): the true identity (oracle, solid) and the reward's own score
(proxy: cosine to the subject's views, dashed, right axis) against DRaFT-K steps, with the KL prior (blue) and without
it (orange); a thin vertical line marks the step where the mean truth peaks.

    python benchmarks/plot_overoptimisation.py benchmarks/results/personalisation.json \\
        --out docs/images/overoptimisation.png
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nearid_reward.files import atomic_write  # noqa: E402

REWARDS = {"nearid": "NearID reward", "frozen": "frozen-head reward", "meanpool": "mean-pool reward"}
PRIORS = {"prior": ("with KL prior", "tab:blue"), "noprior": ("no prior", "tab:orange")}


def plot(result: dict[str, Any], path: Path) -> Path:
    """Write the figure for ``result["overoptimisation"]`` to ``path`` (PNG, atomically); returns ``path``."""
    from matplotlib.figure import Figure

    curves = result.get("overoptimisation") or {}
    if not curves:
        raise SystemExit("the JSON holds no 'overoptimisation' curves (run the benchmark with --curve_subjects >= 1)")
    fig = Figure(figsize=(4.2 * len(REWARDS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(REWARDS), sharey=True)
    twins = []
    for ax, (kind, title) in zip(axes, REWARDS.items()):
        proxy_ax = ax.twinx()
        twins.append(proxy_ax)
        for tag, (label, colour) in PRIORS.items():
            curve = curves.get(f"{kind}_{tag}")
            if not curve:
                continue
            ax.plot(curve["steps"], curve["truth"], "-o", color=colour, ms=3, label=f"truth, {label}")
            proxy_ax.plot(curve["steps"], curve["proxy"], "--", color=colour, alpha=0.7, label=f"proxy, {label}")
            ax.axvline(curve["truth_peak_step"], color=colour, lw=0.6, alpha=0.4)
        subjects = sorted({i for tag in PRIORS for i in curves.get(f"{kind}_{tag}", {}).get("subjects", [])})
        label = "subject" if len(subjects) == 1 else "subjects"
        ax.set_title(f"{title} ({label} {', '.join(map(str, subjects))})", fontsize=9)
        ax.set_xlabel("DRaFT-K steps")
        proxy_ax.set_ylabel("proxy: reward's cosine", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("true identity (oracle)")
    handles, labels = axes[0].get_legend_handles_labels()
    more = twins[0].get_legend_handles_labels()
    fig.legend(handles + more[0], labels + more[1], loc="outside lower center", ncols=4, fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="a bench_personalisation.py JSON")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "overoptimisation.png"))
    args = p.parse_args(argv)
    out = plot(json.loads(Path(args.result).read_text()), Path(args.out))
    print(out)
    return out


if __name__ == "__main__":
    main()
