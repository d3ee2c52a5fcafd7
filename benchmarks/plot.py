"""PNG plot of a benchmark run: speed-up of each variant by size, and training-step memory by depth."""

from __future__ import annotations

from typing import Any

__all__ = ["plot_results"]


def plot_results(results: dict[str, list[dict[str, Any]]], path: str, device: str) -> str | None:
    """Write the plot to ``path``; returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    speed_cases = [c for c in results if any("speedup_vs_eager" in r for r in results[c])]
    panels = len(speed_cases) + (1 if results.get("train_depth") else 0)
    if panels == 0:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for ax, case in zip(axes[0], speed_cases):
        rows = [r for r in results[case] if "speedup_vs_eager" in r]
        labels = list(dict.fromkeys(_size_label(r) for r in rows))
        variants = list(dict.fromkeys(_variant(r) for r in rows))
        for i, variant in enumerate(variants):
            values = [
                max(
                    (r["speedup_vs_eager"] for r in rows if _size_label(r) == lab and _variant(r) == variant),
                    default=0,
                )
                for lab in labels
            ]
            ax.bar(
                [j + i / (len(variants) + 1) for j in range(len(labels))],
                values,
                1 / (len(variants) + 1),
                label=variant,
            )
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speed-up vs eager (best pass)")
        ax.set_title(case)
        ax.legend(fontsize=7)
    if results.get("train_depth"):
        ax = axes[0][-1]
        for mode in ("standard", "reversible"):
            rows = [r for r in results["train_depth"] if r.get("mode") == mode and "peak_mb" in r]
            ax.plot([r["steps"] for r in rows], [r["peak_mb"] for r in rows], marker="o", label=mode)
        ax.set_xlabel("steps per level K")
        ax.set_ylabel("peak memory of one training step (MB)")
        ax.set_title("Glow training step")
        ax.legend()
    fig.suptitle(f"fastflow on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _size_label(row: dict[str, Any]) -> str:
    for key in ("size", "shape"):
        if key in row:
            return str(row[key])
    if "resolution" in row:
        return f"{row['resolution']}px b{row.get('batch')}"
    return "x".join(str(row[k]) for k in ("batch", "channels", "height", "width") if k in row)


def _variant(row: dict[str, Any]) -> str:
    name = row.get("variant") or row.get("provider")
    if name is None:
        return str(row.get("mode", "?"))
    extra = row.get("pass") or row.get("mode")
    return f"{name} {extra}" if extra else str(name)
