"""Where a model with attention pooling looked: per-residue attention maps, as a file and as a figure.

The attention head and fine-tuning with ``pooling="attention"`` pool residues with a softmax
per attention head: each head's weights sum to 1 over the residues the model read (padding
gets exactly 0). ``heads predict --attention FILE.h5`` writes every protein's weights,
averaged over the run's fold models as its probabilities are; ``heads explain`` draws one
protein, from such a file or computed for it alone.

File layout (HDF5, written whole or not at all)::

    attrs: format, format_version, run, run_fingerprint, method, method_title, kind, n_models,
           aggregation, positions, classes (JSON), heads, created, embedcache version
    /proteins/<ID, percent-encoded>/heads   (attention heads, L) float32: weight of residue j+1
    /proteins/<ID, percent-encoded>/mean    (L,) float32: the mean over attention heads
        attrs: id, sequence, sequence_key, length, residues_seen (JSON list of [first, last],
               1-based), predicted_class, probability, probabilities (JSON, class -> p),
               in_training_data
    /index/id, /index/group   every protein's ID and its group name, in the predictions' order

L is the whole sequence's length; residues a model did not see (beyond its crop, or beyond a
truncated cache's rows) have weight 0 and lie outside ``residues_seen``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from embedcache import __version__
from embedcache.atomic import atomic_h5
from embedcache.sequences import read_sequences, sequence_key

from .rundir import FinishedRun, RunDirectoryError, attention_kind, check_has_attention, open_finished

log = logging.getLogger(__name__)

FORMAT = "heads-residue-attention"
FORMAT_VERSION = 1
FILE_NAME_CHARS = 120  # of an ID in a figure's file name; with "attention_", a hash and ".tmp.svg" well under 255
N_TERMINAL = 30  # residues shaded in the figure: where signal peptides and other sorting signals sit
AGGREGATION = ("mean over the run's fold models of each model's weights, as predict averages their probabilities; "
               "then 'mean' is the mean over attention heads")
POSITIONS = ("index j is residue j+1 of the sequence (BOS/EOS excluded); residues outside residues_seen were not "
             "read by the models and have weight 0")


class AttentionFileError(ValueError):
    """An attention file that is missing, damaged, or written for another run."""


# -- which methods have attention ----------------------------------------------------------


def _pools_with_attention(finished: FinishedRun, method: str) -> bool:
    return attention_kind(finished, method)[0] is not None


# -- the file ------------------------------------------------------------------------------
def group_name(ident: str) -> str:
    """An HDF5 name for any ID: '/' and '%' percent-encoded, and a leading '.' too."""
    name = quote(ident, safe="")
    return "%2E" + name[1:] if name.startswith(".") else name


def file_name(ident: str) -> str:
    """A readable file name for an ID: runs of characters other than letters, digits, '.', '-' become '_'."""
    name = re.sub(r"[^A-Za-z0-9.\-]+", "_", ident).strip("._") or "protein"
    if name == ident and len(name) <= FILE_NAME_CHARS:
        return name
    # File names end at 255 bytes; the hash keeps IDs that share a long beginning apart.
    return f"{name[:FILE_NAME_CHARS].rstrip('._')}_{hashlib.sha1(ident.encode()).hexdigest()[:6]}"


@dataclass
class ProteinAttention:
    """One protein's attention map and what the ensemble predicted for it."""

    id: str
    sequence: str
    weights: np.ndarray  # (attention heads, L)
    seen: np.ndarray  # (L,) True at residues the models read
    predicted: str
    probability: float
    probabilities: dict[str, float]
    in_training_data: bool
    method: str
    method_title: str
    kind: str
    n_models: int
    run_fingerprint: str

    @property
    def mean(self) -> np.ndarray:
        return self.weights.mean(0)


def seen_ranges(seen: np.ndarray) -> list[list[int]]:
    """[[first, last], ...] 1-based inclusive runs of True."""
    padded = np.concatenate([[False], np.asarray(seen, dtype=bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [[int(a) + 1, int(b)] for a, b in zip(edges[::2], edges[1::2])]


def _seen_from_ranges(ranges: list[list[int]], length: int) -> np.ndarray:
    seen = np.zeros(length, dtype=bool)
    for first, last in ranges:
        seen[first - 1:last] = True
    return seen


def proteins_of(ens, finished: FinishedRun) -> list[ProteinAttention]:
    """The proteins of an :class:`heads.run.Ensemble` computed with attention."""
    from .figstyle import FigureContext

    classes = finished.classes
    kind = check_has_attention(finished, ens.head)
    title = FigureContext("", "", "", 0).method_title(kind)
    frame = ens.frame
    out = []
    for i, row in enumerate(frame.itertuples(index=False)):
        probs = {c: float(frame[f"p_{c}"].iloc[i]) for c in classes}
        # A multi-label prediction is a set "A;B": its most probable label's probability.
        predicted = [c for c in str(row.prediction).split(";") if c in probs]
        out.append(ProteinAttention(
            id=str(row.id), sequence=ens.sequences[i], weights=ens.attention[i], seen=ens.seen[i],
            predicted=str(row.prediction), probability=max(probs[c] for c in predicted), probabilities=probs,
            in_training_data=bool(row.in_training_data), method=ens.head, method_title=title, kind=kind,
            n_models=ens.n_models, run_fingerprint=finished.config["fingerprint"]))
    return out


def write_attention(path: Path | str, proteins: list[ProteinAttention], finished: FinishedRun) -> Path:
    """Every protein's map in one HDF5 file (layout in the module docstring), atomically."""
    import h5py

    path = Path(path)
    if not proteins:
        raise ValueError(f"{path}: no proteins to write attention maps for")
    first = proteins[0]
    with atomic_h5(path) as f:
        f.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "run": str(finished.path),
            "run_fingerprint": first.run_fingerprint, "method": first.method, "method_title": first.method_title,
            "kind": first.kind, "n_models": first.n_models, "aggregation": AGGREGATION, "positions": POSITIONS,
            "classes": json.dumps(finished.classes), "heads": int(first.weights.shape[0]),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "embedcache_version": __version__,
        })
        group = f.create_group("proteins")
        names = []
        for p in proteins:
            name = group_name(p.id)
            if name in group:  # IDs are unique in a cache and in a sequence file
                raise ValueError(f"{path}: protein ID {p.id!r} occurs twice")
            g = group.create_group(name)
            g.create_dataset("heads", data=p.weights.astype(np.float32))
            g.create_dataset("mean", data=p.mean.astype(np.float32))
            g.attrs.update({
                "id": p.id, "sequence": p.sequence, "sequence_key": sequence_key(p.sequence),
                "length": len(p.sequence), "residues_seen": json.dumps(seen_ranges(p.seen)),
                "predicted_class": p.predicted, "probability": p.probability,
                "probabilities": json.dumps(p.probabilities), "in_training_data": p.in_training_data,
            })
            names.append(name)
        text = h5py.string_dtype()
        index = f.create_group("index")
        index.create_dataset("id", data=np.array([p.id for p in proteins], dtype=object), dtype=text)
        index.create_dataset("group", data=np.array(names, dtype=object), dtype=text)
    log.info("%s: attention maps of %d proteins (%s, mean of %d models)", path, len(proteins), first.method,
             first.n_models)
    return path


def read_attention(path: Path | str, ident: str, finished: FinishedRun | None = None) -> ProteinAttention:
    """One protein's map from a file :func:`write_attention` wrote; with ``finished``, checked to be that run's."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise AttentionFileError(f"{path}: no such attention file")
    if not h5py.is_hdf5(path):
        raise AttentionFileError(f"{path}: not an HDF5 file (write one with heads predict --attention)")
    try:
        return _read_protein(path, ident, finished)
    except AttentionFileError:
        raise
    except (OSError, KeyError, ValueError, IndexError, TypeError) as err:
        # h5py reports a truncated file or a missing object as OSError/KeyError, json a bad record as ValueError.
        raise AttentionFileError(f"{path}: damaged attention file ({type(err).__name__}: {err}); write it again "
                                 "with heads predict --attention") from None


def _read_protein(path: Path, ident: str, finished: FinishedRun | None) -> ProteinAttention:
    import h5py

    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        if attrs.get("format") != FORMAT:
            raise AttentionFileError(f"{path}: not an attention file of heads predict (format {attrs.get('format')!r})")
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise AttentionFileError(f"{path}: written by a newer heads (format version {attrs['format_version']}); "
                                     "upgrade to read it")
        if finished is not None and attrs.get("run_fingerprint") != finished.config["fingerprint"]:
            raise AttentionFileError(f"{path}: written for another run (fingerprint "
                                     f"{str(attrs.get('run_fingerprint'))[:12]}), not {finished.path} "
                                     f"({finished.config['fingerprint'][:12]})")
        name = group_name(ident)
        if name not in f["proteins"]:
            raise AttentionFileError(f"{path}: no protein with ID {ident!r} ({len(f['proteins'])} proteins in it)")
        g = f["proteins"][name]
        weights = g["heads"][()]
        a = dict(g.attrs)
        sequence = str(a["sequence"])
        if weights.ndim != 2 or weights.shape[1] != len(sequence) or sequence_key(sequence) != a["sequence_key"]:
            raise AttentionFileError(f"{path}: {ident}: the attention map does not fit its sequence (damaged file)")
    seen = _seen_from_ranges(json.loads(a["residues_seen"]), len(sequence))
    # Each attention head's softmax sums to 1 over the residues read and is 0 elsewhere; an edited map does not.
    if not (np.isfinite(weights).all() and (weights >= 0).all() and not weights[:, ~seen].any()
            and np.allclose(weights.sum(1), 1.0, atol=1e-3)):
        raise AttentionFileError(f"{path}: {ident}: the attention weights are not a softmax over the residues read "
                                 "(edited or damaged file)")
    return ProteinAttention(
        id=str(a["id"]), sequence=sequence, weights=weights, seen=seen, predicted=str(a["predicted_class"]),
        probability=float(a["probability"]), probabilities=json.loads(a["probabilities"]),
        in_training_data=bool(a["in_training_data"]), method=str(attrs["method"]),
        method_title=str(attrs["method_title"]), kind=str(attrs["kind"]), n_models=int(attrs["n_models"]),
        run_fingerprint=str(attrs["run_fingerprint"]))


def compute_attention(run: Path | str, ident: str, *, cache: Path | str | None = None,
                      sequences: Path | str | None = None, head: str | None = None, id_col: str | None = None,
                      seq_col: str | None = None, embeddings_dir: Path | str | None = None, device: str = "auto",
                      threads: int | None = None) -> ProteinAttention:
    """One protein's map computed now with the run's fold models, from a cache or a sequence file.

    From a sequence file only that protein is embedded (its one-record FASTA is cached in
    RUN/embeddings/ by content, and reused).
    """
    from .run import _best_method, ensemble

    finished = open_finished(run)
    method = head or _best_method_with_attention(finished, _best_method)
    check_has_attention(finished, method)
    if sequences is not None:
        records = [r for r in read_sequences(sequences, None, id_col, seq_col) if r.id == ident]
        if not records:
            raise ValueError(f"{sequences}: no protein with ID {ident!r}")
        with tempfile.TemporaryDirectory() as tmp:
            one = Path(tmp) / "protein.fasta"
            one.write_text(f">{ident}\n{records[0].sequence}\n")
            ens = ensemble(run, None, method, sequences=one, embeddings_dir=embeddings_dir, device=device,
                           threads=threads, attention=True)
    else:
        ens = ensemble(run, cache, method, attention=True, only_ids=[ident])
    return proteins_of(ens, finished)[0]


def _best_method_with_attention(finished: FinishedRun, best) -> str:
    """The run's best method when it has attention, else its only method with attention."""
    try:
        method = best(finished)
    except RunDirectoryError:
        method = None
    if method is not None and _pools_with_attention(finished, method):
        return method
    candidates = [m for m in finished.methods if _pools_with_attention(finished, m)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"{finished.path}: no method of this run pools residues with attention "
                         f"({', '.join(finished.methods)}); attention maps need the attention head or fine-tuning "
                         "with --set finetune.pooling=attention")
    raise ValueError(f"{finished.path}: several methods have attention ({', '.join(candidates)}); choose with --head")


# -- the figure ----------------------------------------------------------------------------
def top_positions(mean: np.ndarray, k: int = 5, spacing: int = 3) -> list[int]:
    """0-based indices of the ``k`` highest weights, at least ``spacing`` residues apart."""
    chosen: list[int] = []
    for i in np.argsort(-mean, kind="stable"):
        if mean[i] <= 0:
            break
        if all(abs(int(i) - j) >= spacing for j in chosen):
            chosen.append(int(i))
        if len(chosen) == k:
            break
    return chosen


def draw_attention(protein: ProteinAttention, stem: Path | str, context: str = "") -> dict[str, Path]:
    """Residue position against attention: the mean over attention heads as a line, each head faint,
    a heat strip per head below; the N-terminal residues shaded; the top positions labelled."""
    from .figstyle import colour, pyplot, save_figure

    plt = pyplot()
    weights, mean, seq = protein.weights, protein.mean, protein.sequence
    n_heads, length = weights.shape
    x = np.arange(1, length + 1)
    fig = plt.figure(figsize=(max(6.5, min(12.0, 4.0 + length / 120)), 3.2 + 0.16 * n_heads))
    grid = fig.add_gridspec(2, 2, height_ratios=[3.0, max(0.8, 0.22 * n_heads)], width_ratios=[60, 1],
                            hspace=0.08, wspace=0.02)
    ax = fig.add_subplot(grid[0, 0])
    strip = fig.add_subplot(grid[1, 0], sharex=ax)
    bar_ax = fig.add_subplot(grid[1, 1])
    fig.add_subplot(grid[0, 1]).axis("off")

    uniform = 1.0 / max(1, int(protein.seen.sum()))
    unseen = ~protein.seen
    # Residues the models did not read are left blank (not drawn as weight 0) and hatched.
    shown = np.where(unseen, np.nan, weights)
    shown_mean = np.where(unseen, np.nan, mean)
    for h in range(n_heads):
        ax.plot(x, shown[h], color="0.6", lw=0.6, alpha=0.5, label="single attention head" if h == 0 else None)
    ax.plot(x, shown_mean, color=colour(0), lw=1.3, label=f"mean of {n_heads} attention heads")
    for i, (first, last) in enumerate(seen_ranges(protein.seen)):
        ax.hlines(uniform, first - 0.5, last + 0.5, color="0.3", lw=0.7, ls=":",
                  label="uniform (1 / residues read)" if i == 0 else None)
    top = float(max(np.nanmax(shown), np.nanmax(shown_mean), uniform)) * 1.22
    ax.set_ylim(0, top)
    nterm = min(N_TERMINAL, length)
    # Only the line panel is shaded: a tint over the heat strip would change its colours.
    ax.axvspan(0.5, nterm + 0.5, color=colour(1), alpha=0.15, lw=0)
    # Beside the band, not in it: for long proteins 30 residues are narrower than the label.
    ax.text(nterm + 0.5 + length * 0.008, top * 0.985, f"\u2190 N-terminal {nterm} residues", ha="left", va="top",
            fontsize=7, color="0.25")
    strip.axvline(nterm + 0.5, color="white", lw=0.8, ls="--")
    handles = []
    if unseen.any():
        from matplotlib.patches import Patch

        for first, last in seen_ranges(unseen):
            for a in (ax, strip):
                a.axvspan(first - 0.5, last + 0.5, facecolor="0.92", edgecolor="0.6", lw=0, hatch="//")
        handles.append(Patch(facecolor="0.92", edgecolor="0.6", hatch="//", label="not read by the model (cropped)"))
    for i in top_positions(np.where(unseen, 0.0, mean), k=5, spacing=max(3, -(-length // 18))):
        # A label is about 4 characters wide: labelled residues are kept that many positions apart.
        ax.annotate(f"{seq[i]}{i + 1}", (i + 1, mean[i]), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=7, color=colour(0))
    ax.set_ylabel("attention weight")
    lines, labels = ax.get_legend_handles_labels()
    ax.legend(lines + handles, labels + [h.get_label() for h in handles], loc="upper right", frameon=True,
              framealpha=0.9, edgecolor="none")
    plt.setp(ax.get_xticklabels(), visible=False)

    masked = np.ma.masked_array(weights, np.broadcast_to(unseen, weights.shape))
    image = strip.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest",
                         extent=(0.5, length + 0.5, n_heads + 0.5, 0.5), vmin=0)
    strip.set_yticks(range(1, n_heads + 1) if n_heads <= 8 else [1, n_heads])
    strip.set_ylabel("attention\nhead", labelpad=2)
    strip.set_xlabel("residue position")
    strip.set_xlim(0.5, length + 0.5)
    from matplotlib.ticker import MaxNLocator

    strip.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True, min_n_ticks=3))
    fig.colorbar(image, cax=bar_ax, label="weight")
    bar_ax.yaxis.label.set_size(7)
    bar_ax.tick_params(labelsize=6)

    training = " · in the run's training data" if protein.in_training_data else ""
    fig.suptitle(f"{protein.id}: predicted {protein.predicted} (p = {protein.probability:.2f}), {length} residues",
                 x=0.06, ha="left", y=0.995, fontsize=10)
    name = protein.method_title if protein.method == protein.kind else f"{protein.method_title} ({protein.method})"
    sub = f"{name}: weights averaged over {protein.n_models} fold models{training}"
    ax.set_title(f"{sub}\n{context}" if context else sub, loc="left", fontsize=8, color="0.3")
    return save_figure(fig, stem)


def run_context(finished: FinishedRun) -> str:
    """Dataset and backbone of a run, for a figure's subtitle."""
    config = finished.config
    data = config.get("data")
    names = ", ".join(Path(d).name for d in ([data] if isinstance(data, str) else data or []))
    backbone = config.get("backbone") or {}
    model = backbone.get("model") or (config.get("cache_provenance") or {}).get("model") or ""
    layer = f", layer {backbone['layer']}" if backbone.get("layer") is not None else ""
    return f"trained on {names} · {model}{layer} · run {config['fingerprint'][:10]}"


def explain(run: Path | str, ident: str, out: Path | str, *, attention: Path | str | None = None,
            cache: Path | str | None = None, sequences: Path | str | None = None, head: str | None = None,
            **options) -> dict[str, Path]:
    """Draw one protein's attention map into ``out``/attention_<ID>.svg and .png."""
    finished = open_finished(run)
    if attention is not None:
        protein = read_attention(attention, ident, finished)
        if head is not None and head != protein.method:
            raise AttentionFileError(f"{attention}: holds maps of {protein.method}, not of {head}")
    elif cache is None and sequences is None:
        raise ValueError("give the protein's attention as --attention FILE.h5 (from heads predict), or the protein "
                         "itself with --cache or --sequences")
    else:
        protein = compute_attention(run, ident, cache=cache, sequences=sequences, head=head, **options)
    stem = Path(out) / f"attention_{file_name(ident)}"
    return draw_attention(protein, stem, run_context(finished))
