"""Pictures for people who would rather look than read: per-layer compression, training curves."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_layers(reports: list[dict], path: str | Path) -> Path:
    """Per compressed layer: the share of parameters kept and the relative error (with and without the
    method's refinements), one bar group per layer in the order they were compressed."""
    plt = _pyplot()
    layers = [layer for report in reports for layer in report["layers"]]
    if not layers:
        raise ValueError("the run holds no compressed layers to plot")
    labels = [f"{layer['name']}" for layer in layers]
    positions = range(len(layers))
    fig, (kept, error) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(layers) + 2), 7), sharex=True)
    kept.bar(positions, [layer["params_after"] / max(layer["params_before"], 1) for layer in layers], color="tab:blue")
    kept.set_ylabel("parameters kept")
    kept.set_ylim(0, 1.05)
    width = 0.4
    error.bar([p - width / 2 for p in positions], [layer["error_plain"] for layer in layers], width, label="plain fit")
    error.bar([p + width / 2 for p in positions], [layer["error"] for layer in layers], width, label="installed")
    objectives = sorted({layer.get("objective", "frobenius") for layer in layers})
    error.set_ylabel(f"relative error ({', '.join(objectives)})")
    error.legend()
    error.set_xticks(list(positions))
    error.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    return _save(fig, path)


def plot_training(records: list[dict], path: str | Path) -> Path:
    """Training loss terms and held-out perplexity against tokens, from ``log.jsonl`` records."""
    plt = _pyplot()
    train = [r for r in records if "loss" in r]
    held = [r for r in records if "heldout_ppl" in r]
    fig, (losses, ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "kl", "ce", "hidden"):
        points = [(r["tokens"], r[key]) for r in train if key in r]
        if points and any(value for _, value in points):
            losses.plot(*zip(*points, strict=True), label=key)
    losses.set_xlabel("tokens")
    losses.set_ylabel("training loss")
    if losses.get_lines():  # a checkpoint before the first logged step has nothing to label
        losses.legend()
    if held:
        ppl.plot([r["tokens"] for r in held], [r["heldout_ppl"] for r in held], marker="o")
        ppl.set_yscale("log")
    ppl.set_xlabel("tokens")
    ppl.set_ylabel("held-out perplexity")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    from .serialization import write_file_atomically  # a killed run leaves no half a PNG

    fig.tight_layout()
    written = write_file_atomically(path, lambda staging: fig.savefig(staging, dpi=110))
    _pyplot().close(fig)
    return written
