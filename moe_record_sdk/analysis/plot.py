"""Pictures of expert load: a layers × experts heatmap, per-layer imbalance, load over passes.

matplotlib is optional (the ``plot`` extra); it is drawn with the Agg canvas
directly, so no GUI backend or global pyplot state is touched.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Sequence

import torch

from ..schema.dump import Dump
from ..schema.io import write_atomic
from . import metrics as m
from .optional import require
from .summary import _gpu_source, moe_layers


def _matplotlib():
    require("matplotlib", "plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg, LogNorm


def plot_dumps(
    dumps: Sequence[tuple[str, Dump]],
    path: str | os.PathLike[str],
    *,
    log: bool = False,
    ep_size: int | None = None,
    dpi: int = 110,
) -> str:
    """Draw each dump as one row: heatmap, per-layer imbalance, and load over passes if it has any.

    Parameters
    ----------
    dumps:
        ``(label, dump)`` pairs; one row of panels each.
    path:
        The image to write; its suffix picks the format (``.png``, ``.svg``, ``.pdf``...), and
        ``.png`` is added when it has none. The path written is returned.
    log:
        Colour the heatmap on a log scale (zero counts shown blank).
    ep_size:
        Also draw the per-layer balancedness over this many GPUs, placed as ``summary`` places
        them: the recorded physical counts, else the dump's ``physical_to_logical_map``, else
        contiguous experts (the legend says which).

    >>> plot_dumps([("run", load_dump("run.pt"))], "load.png", log=True)  # doctest: +SKIP
    """
    Figure, FigureCanvasAgg, LogNorm = _matplotlib()
    if not dumps:
        raise ValueError("dumps: nothing to plot")
    if ep_size is not None and ep_size < 1:
        raise ValueError(f"ep_size: must be >= 1, got {ep_size}")
    for label, dump in dumps:  # as summary does: a curve left out silently would read as "no data"
        if ep_size:
            try:
                _gpu_source(dump, ep_size, None)
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from None
    if dpi < 1:
        raise ValueError(f"dpi: must be >= 1, got {dpi}")
    path = os.fspath(path)
    if os.path.isdir(path):  # else "out/" would become "out/.png", and "out" a sibling "out.png"
        raise IsADirectoryError(errno.EISDIR, "is a directory; pass an image file name such as load.png", path)
    suffix = os.path.splitext(path)[1].lower()
    if not suffix:  # matplotlib would write path + ".png" and we would report the wrong file
        path, suffix = path + ".png", ".png"
    formats = FigureCanvasAgg.get_supported_filetypes()
    if suffix[1:] not in formats:
        raise ValueError(f"{path}: unknown image format {suffix!r}; use one of .{', .'.join(sorted(formats))}")
    with_passes = any(d.logical_count.shape[0] > 1 for _, d in dumps)
    cols = 3 if with_passes else 2
    fig = Figure(figsize=(6.0 * cols, 4.2 * len(dumps)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(dumps), cols, squeeze=False)
    for row, (label, dump) in enumerate(dumps):
        _heatmap(fig, axes[row][0], label, dump, log, LogNorm)
        _imbalance(axes[row][1], dump, ep_size)
        if with_passes:
            _passes(axes[row][2], dump, ep_size)
    buf = io.BytesIO()
    fig.savefig(buf, format=suffix[1:], dpi=dpi)
    return write_atomic(path, buf.getvalue(), "the image")


def _heatmap(fig, ax, label: str, dump: Dump, log: bool, LogNorm) -> None:
    total = dump.total_count().to(torch.float64)
    layers = moe_layers(dump) or list(range(dump.model.num_layers))
    data = total[layers].numpy()
    norm = None
    if log:
        positive = data[data > 0]
        if positive.size:
            norm = LogNorm(vmin=max(positive.min(), 1.0), vmax=max(positive.max(), 1.0))
            data = data.copy()
            data[data <= 0] = float("nan")  # log of zero: left blank
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    name = os.path.basename(label.rstrip("/")) or label
    # A file name is text, not mathtext ($...$), and may hold bytes that are not UTF-8.
    name = name.encode("utf-8", "backslashreplace").decode("utf-8").replace("$", r"\$")
    ax.set_title(f"{name}: tokens per expert" + (" (log)" if log else ""))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if len(layers) <= 32:
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    else:
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    fig.colorbar(im, ax=ax, label="assignments")


def gpu_balancedness(dump: Dump, ep_size: int) -> tuple[str, torch.Tensor]:
    """The plot's per-layer GPU balancedness over the window ``[MoE layers]``, with its legend:
    the GPU loads ``summary`` reports (recorded physical counts, else the dump's map, else
    contiguous experts)."""
    G, how, to_gpus = _gpu_source(dump, ep_size, None)
    physical = dump.physical_count.sum(0) if dump.physical_count is not None else None
    layers = moe_layers(dump) or list(range(dump.model.num_layers))
    return f"balancedness ({G} GPUs, {how})", m.balancedness(to_gpus(dump.total_count(), physical)[layers])


def _imbalance(ax, dump: Dump, ep_size: int | None) -> None:
    total = dump.total_count()
    layers = moe_layers(dump) or list(range(dump.model.num_layers))
    x = total[layers]
    ax.bar(
        range(len(layers)), m.max_over_mean(x).nan_to_num(0).numpy(), color="tab:orange", label="max/mean over experts"
    )
    ax.set_xticks(range(len(layers)), [str(i) for i in layers] if len(layers) <= 32 else [""] * len(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("max / mean")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title("max / mean per layer (imbalance + 1)")
    twin = ax.twinx()
    twin.plot(
        range(len(layers)), m.balancedness(x).numpy(), "o-", color="tab:blue", ms=3, label="balancedness (experts)"
    )
    if ep_size:
        label, balance = gpu_balancedness(dump, ep_size)
        twin.plot(range(len(layers)), balance.numpy(), "s-", color="tab:green", ms=3, label=label)
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("balancedness (mean/max)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize="small", framealpha=0.8)


def _passes(ax, dump: Dump, ep_size: int | None) -> None:
    B = dump.logical_count.shape[0]
    if B <= 1:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "one row: no passes to show", ha="center", va="center", transform=ax.transAxes)
        return
    layers = moe_layers(dump) or list(range(dump.model.num_layers))
    rows = dump.logical_count[:, layers].to(torch.float64)  # [B, L', E]
    records = dump.records if len(dump.records) == B else []
    x = torch.tensor([r.forward_pass_id for r in records] if records else range(B))
    # A merge's token groups (record ranks) ran side by side, each with its own pass ids: one line each.
    rank = torch.tensor([r.rank for r in records] if records else [0] * B)
    lines = [rank == g for g in dict.fromkeys(rank.tolist())]
    series = [("assignments", "tab:purple", 1.2, ax, rows.sum((1, 2)))]
    twin = ax.twinx()
    bal = m.balancedness(rows)  # [B, L']: SGLang's per-pass value, averaged over layers
    series.append(("balancedness, experts", "tab:blue", 1.0, twin, bal.mean(-1)))
    if ep_size:
        G, how, to_gpus = _gpu_source(dump, ep_size, None)
        all_rows = dump.logical_count.to(torch.float64)
        gpu = m.balancedness(to_gpus(all_rows, dump.physical_count)[:, layers])  # SGLang's per-layer value
        series.append((f"balancedness, {G} GPUs ({how})", "tab:green", 1.0, twin, gpu.mean(-1)))
    for label, color, lw, axis, y in series:
        for i, sel in enumerate(lines):
            axis.plot(x[sel].numpy(), y[sel].numpy(), color=color, lw=lw, label=None if i else label)
    ax.set_xlabel("forward pass")
    ax.set_ylabel("assignments per pass")
    ax.set_title("load over passes" + (f" ({len(lines)} token groups, a line each)" if len(lines) > 1 else ""))
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("balancedness")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize="small", framealpha=0.8)
