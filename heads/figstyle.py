"""How every figure of this project is drawn and saved, so that one could go into a paper as it is.

Every figure is saved twice, as SVG (for a paper: vector, fonts kept as text) and as PNG at
200 dpi (for the HTML reports and slides), each written atomically. Figures are drawn with
matplotlib's Agg backend: no display is needed and none is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from embedcache.atomic import atomic_path

PNG_DPI = 200
# Colour-blind-safe categorical colours (Okabe and Ito), in the order methods and classes get them.
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.fonttype": "none",  # text stays text in the SVG: editable, searchable
    "figure.dpi": 100,
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend with this project's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.rcParams.update(STYLE)  # type: ignore[arg-type]
    plt.rcParams["axes.prop_cycle"] = cycler(color=COLOURS)
    return plt


def colour(k: int) -> str:
    return COLOURS[k % len(COLOURS)]


def save_figure(fig: Any, stem: Path | str) -> dict[str, Path]:
    """Write ``STEM.svg`` and ``STEM.png`` (200 dpi), then close the figure; returns both paths."""
    plt = pyplot()
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    try:
        for suffix, options in ((".svg", {}), (".png", {"dpi": PNG_DPI})):
            path = stem.with_name(stem.name + suffix)
            with atomic_path(path, keep_suffix=True) as tmp:
                fig.savefig(tmp, bbox_inches="tight", **options)
            paths[suffix[1:]] = path
    finally:
        plt.close(fig)
    return paths


@dataclass
class FigureContext:
    """What every figure of a run says it shows, in its title or subtitle."""

    dataset: str  # the data as a reader knows it, e.g. "DeepLocPro (graphpart_subset.fasta)"
    backbone: str  # e.g. "ESM-2 8M (esm2_t6_8M_UR50D), layer 6, mean-pooled"
    folds: str  # e.g. "5-fold GraphPart homology partitions at 30% identity"
    n: int  # proteins evaluated
    reference: str = "reference"  # the reference tool's name, for a run that compares with one

    def subtitle(self) -> str:
        return f"{self.dataset} · {self.backbone} · {self.folds} · n = {self.n:,}"

    def for_method(self, name: str) -> FigureContext:
        """The context of a figure of one method: the reference's predictions come from its own model."""
        if name != "reference":
            return self
        return replace(self, backbone=f"{self.reference}'s own predictions (its model, not these embeddings)")

    def method_title(self, name: str) -> str:
        """A method's readable name: the head's title for a head, the reference tool by its name.

        The reference says it ran its own model: figures of several methods carry the run's
        backbone in their subtitle, which the reference's predictions did not come from.
        """
        if name == "reference":
            return f"{self.reference} (own model)"
        from .registry import HEADS

        head = HEADS.get(name)
        return head.title if head is not None and head.title else name


@dataclass
class Figure:
    """A figure written by ``save_figure``, with what a report says about it."""

    stem: Path  # STEM.svg and STEM.png exist
    section: str  # the report section it belongs to, e.g. "Comparison", "Per class", "Training"
    caption: str  # one or two sentences a reader needs: what is plotted, what the bars or bands are

    @property
    def png(self) -> Path:
        return self.stem.with_name(self.stem.name + ".png")

    @property
    def svg(self) -> Path:
        return self.stem.with_name(self.stem.name + ".svg")
