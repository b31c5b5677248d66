"""A run directory's identity: what made it, which files it wrote, and the checks on both.

A run is identified by its fingerprint, the sha256 of its canonical settings, the identity
of the backbone behind its embeddings, and its proteins (IDs, sequence keys, labels, folds).
A directory is written only when it is new, empty, or holds the same fingerprint (the run
then resumes); ``overwrite`` removes everything in it first. ``models/manifest.json`` lists
every model file the run wrote with its sha256 and classes; ``config.json``, written last,
records the manifest's sha256, so a run without it did not finish. Prediction loads exactly
the listed files after checking their hashes, and only from caches of the same backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedcache.atomic import real_path, write_text
from embedcache.models import sha256_of
from embedcache.sequences import sequence_key
from embedcache.store import CacheLockedError, WriterLock

from .datasets import LabeledSet
from .progress import RUN_LOG, attach_run_log

log = logging.getLogger(__name__)

CONFIG = "config.json"
MANIFEST = "models/manifest.json"
TRAINING_KEYS = "models/training_keys.txt"
MANIFEST_FORMAT = 1
# WriterLock locks NAME.lock beside NAME: the lock file lives inside the run directory.
LOCK_STEM = ".heads"
LOCK_FILE = LOCK_STEM + ".lock"

# What decides the embeddings a head reads. Old caches lack family and pooling: those two are
# compared only where both sides record them.
IDENTITY_FIELDS = ("family", "architecture", "weights_sha256", "embed_dim", "pooling", "dtype", "precision")
OPTIONAL_FIELDS = ("family", "pooling")
# Settings that change only long sequences: a difference is reported, not refused.
LONG_FIELDS = ("long_policy", "max_length", "chunk_overlap")


class RunDirectoryError(ValueError):
    """A run directory cannot be written or read as asked."""


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value == "none":
        return None
    return value


def backbone_identity(provenance: dict | None, layer: int | None = None) -> dict | None:
    """The backbone and extraction settings behind a cache's embeddings, from its provenance.

    ``layer`` is the layer a run reads; without it, the cache's stored layers are listed.
    """
    if not provenance:
        return None
    out = {name: _plain(provenance.get(name)) for name in ("family", "model", *IDENTITY_FIELDS[1:], *LONG_FIELDS)}
    if out["embed_dim"] is not None:
        out["embed_dim"] = int(out["embed_dim"])
    if layer is not None:
        out["layer"] = int(layer)
    else:
        layers = _plain(provenance.get("layers"))
        out["layers"] = [int(x) for x in np.atleast_1d(layers)] if layers is not None else []
    return out


def describe_identity(identity: dict | None) -> str:
    if not identity:
        return "no embeddings"
    sha = identity.get("weights_sha256") or "none"
    parts = [f"{identity.get('model')} ({identity.get('architecture')}", f"weights sha256 {sha[:12]}"]
    if identity.get("family"):
        parts.append(f"family {identity['family']}")
    if "layer" in identity:
        parts.append(f"layer {identity['layer']}")
    parts.append(f"{identity.get('dtype')}, computed in {identity.get('precision')})")
    return ", ".join(parts)


def identity_differences(run: dict, cache: dict) -> list[str]:
    """Why embeddings described by ``cache`` are not what a run described by ``run`` read."""
    differ = []
    for name in IDENTITY_FIELDS:
        a, b = run.get(name), cache.get(name)
        if name in OPTIONAL_FIELDS and (a is None or b is None):
            continue
        if a != b:
            differ.append(f"{name} {b!r} (the run's: {a!r})")
    if "layer" in run and run["layer"] not in cache.get("layers", []):
        differ.append(f"layers {cache.get('layers')} (the run reads layer {run['layer']})")
    return differ


def check_identity(run_identity: dict | None, cache_provenance: dict, run: Path, cache: Path) -> None:
    """Refuse a cache whose embeddings do not come from the backbone and settings the run used."""
    if run_identity is None:
        raise RunDirectoryError(f"{run}: the run was trained without an embedding cache; its frozen heads "
                                "have no backbone identity to check against")
    found = backbone_identity(cache_provenance)
    if found is None:
        raise RunDirectoryError(f"{cache}: the cache records no provenance, so its embeddings cannot be checked "
                                f"against the backbone run {run} was trained on")
    differ = identity_differences(run_identity, found)
    if differ:
        raise RunDirectoryError(
            f"{cache}: embeddings of another backbone or other settings than run {run} was trained on: "
            f"{'; '.join(differ)}. Run: {describe_identity(run_identity)}; cache: {describe_identity(found)}. "
            "Predict from the sequences instead (heads predict --sequences FILE embeds them with the run's backbone)"
        )
    for name in LONG_FIELDS:
        if run_identity.get(name) != found.get(name):
            log.warning("%s: %s is %r, the run's cache had %r; long sequences are embedded differently", cache,
                        name, found.get(name), run_identity.get(name))


def json_default(obj):
    """numpy scalars and arrays, tuples and sets as JSON; anything else as its string."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    return str(obj)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def run_fingerprint(settings: dict, identity: dict | None, methods: dict, data: LabeledSet) -> str:
    """sha256 of what decides a run's results: settings, backbone, methods, proteins and folds.

    ``settings`` should hold no file paths of inputs whose contents are covered otherwise
    (the dataset by its proteins, the cache by its backbone identity), so a moved file is
    still the same run.
    """
    digest = hashlib.sha256(canonical_json({"settings": settings, "backbone": identity, "methods": methods,
                                            "classes": data.classes}).encode())
    folds = data.folds if data.folds is not None else np.full(len(data), -1)
    for ident, sequence, label, fold in zip(data.ids, data.sequences, data.label_names(), folds):
        digest.update(f"{ident}\t{sequence_key(sequence)}\t{label}\t{int(fold)}\n".encode())
    return digest.hexdigest()


# -- the directory ---------------------------------------------------------------------------
def _contents(out: Path) -> list[Path]:
    # The run's log belongs to whichever run the directory holds: alone (a run killed before it
    # wrote config.json) it leaves the directory empty, so the run starts there again.
    return [p for p in out.iterdir() if p.name not in (LOCK_FILE, RUN_LOG)]


def _check_run_log(out: Path) -> None:
    # The log is appended to in place: through a link it would grow a file outside the run.
    path = out / RUN_LOG
    if path.is_symlink():
        raise RunDirectoryError(f"{path}: is a symbolic link; a run writes its log only into its own directory. "
                                "Remove the link or choose another --out")
    if path.exists() and not path.is_file():
        raise RunDirectoryError(f"{path}: exists and is not a file; a run keeps its log there. "
                                "Move it away or choose another --out")


def read_config(out: Path) -> dict | None:
    """The run's config.json, or None when the directory holds none (or not a run's)."""
    path = out / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirectoryError(f"{path}: cannot be read as a run's config.json ({err})") from None
    # A run's config, of this version (fingerprint) or an older one (its other fields): a JSON
    # file that merely has "classes" is not a run, and --overwrite must never delete it.
    if not isinstance(config, dict) or "classes" not in config:
        return None
    if "fingerprint" not in config and not {"methods", "folds_info", "splits"} <= config.keys():
        return None
    return config


def _inside(path: Path, folder: Path) -> bool:
    try:
        real_path(path).relative_to(folder)
    except ValueError:
        return False
    return True


class RunDirectory:
    """Exclusive access to a run directory, opened for one fingerprint.

    Use as a context manager: it holds a lock that keeps a second ``heads`` process out of the
    same directory (the kernel drops it if the process dies).
    """

    def __init__(self, out: Path | str, fingerprint: str, overwrite: bool = False,
                 inputs: Iterable[str | Path | None] = ()):
        self.out = Path(out)
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.inputs = [Path(p) for p in inputs if p]
        self.resumed = False
        self._lock: WriterLock | None = None

    def __enter__(self) -> RunDirectory:
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunDirectoryError(f"{out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(out / LOCK_STEM)
        try:
            self._lock.acquire()
        except CacheLockedError:
            holder = (out / LOCK_FILE).read_text().strip() if (out / LOCK_FILE).exists() else "unknown"
            self._lock = None
            raise RunDirectoryError(f"{out}: another heads process (pid {holder}) is writing this run directory; "
                                    "wait for it to finish or choose another --out") from None
        try:
            _check_run_log(out)
            self._claim()
            attach_run_log(out, self.resumed)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _claim(self) -> None:
        out = self.out
        contents = _contents(out)
        if not contents:
            if self.overwrite:
                (out / RUN_LOG).unlink(missing_ok=True)
            return
        config = read_config(out)
        same = config is not None and config.get("fingerprint") == self.fingerprint
        if self.overwrite:
            self._clear(config, contents)
            return
        if same:
            self.resumed = True
            log.info("%s holds the same run (fingerprint %s): resuming; finished methods are recomputed, "
                     "fine-tuning continues from its checkpoints in work/", out, self.fingerprint[:12])
            # Until the run finishes again, the old manifest would vouch for files being replaced.
            (out / MANIFEST).unlink(missing_ok=True)
            return
        if config is None:
            raise RunDirectoryError(f"{out}: is not empty and holds no run (no heads config.json); "
                                    "choose a new or empty directory for --out")
        old = config.get("fingerprint")
        what = (f"another run (fingerprint {old[:12]}; this one is {self.fingerprint[:12]})" if old
                else "a run written without a fingerprint")
        raise RunDirectoryError(
            f"{out}: holds {what}: other settings, data, folds or embeddings. Choose another --out, "
            "or add --overwrite to delete that run and write this one in its place"
        )

    def _clear(self, config: dict | None, contents: list[Path]) -> None:
        out = self.out
        if config is None:
            raise RunDirectoryError(f"{out}: is not empty and holds no run (no heads config.json); "
                                    "--overwrite deletes only run directories. Choose a new or empty directory")
        home = real_path(out)
        for path in self.inputs:
            if _inside(path, home):
                raise RunDirectoryError(f"{out}: --overwrite would delete {path}, an input of this run, which "
                                        "lies inside it; move it out or choose another --out")
        log.warning("%s: --overwrite: deleting the run there (fingerprint %s)", out,
                    str(config.get("fingerprint"))[:12])
        # The index first: an interrupted deletion must not leave a run that looks finished.
        (out / CONFIG).unlink(missing_ok=True)
        for path in [*contents, out / RUN_LOG]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


# -- the manifest ----------------------------------------------------------------------------
@dataclass
class SavedModel:
    """One model file a run wrote."""

    method: str
    split: str
    path: Path  # where it was written
    sha256: str
    classes: list[int]  # indices into the run's classes (the model's classes_)
    input: str  # pooled | per_residue | sequence


def write_training_keys(out: Path, keys: Iterable[str]) -> dict:
    text = "".join(f"{k}\n" for k in sorted(set(keys)))
    path = write_text(out / TRAINING_KEYS, text)
    return {"file": Path(TRAINING_KEYS).name, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "n": text.count("\n"), "path": path}


def write_manifest(out: Path, fingerprint: str, classes: list[str], saved: list[SavedModel],
                   training_keys: dict, backbone: dict | None = None) -> str:
    """Write models/manifest.json; returns its sha256 (recorded in config.json)."""
    models_dir = out / "models"
    entries = []
    for model in saved:
        entries.append({
            "method": model.method,
            "split": model.split,
            "file": model.path.relative_to(models_dir).as_posix(),
            "sha256": model.sha256,
            "classes": [classes[k] for k in model.classes],
            "input": model.input,
        })
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": fingerprint,
        "classes": classes,
        # Under the manifest's hash, so that an edited config.json cannot feed the models
        # embeddings of another layer or model.
        "backbone": backbone,
        "training_keys": {k: v for k, v in training_keys.items() if k != "path"},
        "models": entries,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    write_text(out / MANIFEST, text)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class FinishedRun:
    """A finished run, checked: its config, manifest and the keys of its training sequences."""

    path: Path
    config: dict
    manifest: dict

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(m["method"] for m in self.manifest["models"]))

    def models(self, method: str) -> list[dict]:
        """The manifest's entries of one method, each file checked against its sha256."""
        if method not in self.methods:
            raise RunDirectoryError(f"{self.path}: no saved models for head {method!r}; the run saved models of "
                                    f"{', '.join(self.methods) or 'no head'}")
        entries = [m for m in self.manifest["models"] if m["method"] == method]
        splits = [m["split"] for m in entries]
        expected = self.config.get("splits")
        if expected is not None and sorted(splits) != sorted(expected):
            raise RunDirectoryError(f"{self.path / MANIFEST}: lists splits {sorted(splits)} for {method}, "
                                    f"but the run has {sorted(expected)}")
        models_dir = self.path / "models"
        for entry in entries:
            path = models_dir / entry["file"]
            if not _inside(path, real_path(models_dir)):
                raise RunDirectoryError(f"{self.path / MANIFEST}: file {entry['file']!r} lies outside models/")
            if not path.is_file():
                raise RunDirectoryError(f"{path}: listed in the run's manifest but missing; the run is incomplete "
                                        "(run the same heads command again to rewrite it)")
            actual = sha256_of(path)
            if actual != entry["sha256"]:
                raise RunDirectoryError(f"{path}: sha256 {actual[:12]} differs from the {entry['sha256'][:12]} the "
                                        "run recorded; the file was changed or replaced after the run wrote it")
            unknown = [c for c in entry["classes"] if c not in self.classes]
            if unknown:
                raise RunDirectoryError(f"{self.path / MANIFEST}: {entry['file']} predicts classes {unknown} that "
                                        f"the run does not have ({self.classes})")
        listed = {(models_dir / e["file"]).resolve() for e in self.manifest["models"]}
        own = {(self.path / MANIFEST).resolve(), (self.path / TRAINING_KEYS).resolve()}
        extra = sorted(p for p in (models_dir / method).rglob("*")
                       if p.is_file() and p.resolve() not in listed | own)
        if extra:
            log.warning("%s: %d file(s) the run did not write are ignored: %s", models_dir / method, len(extra),
                        ", ".join(p.name for p in extra[:5]))
        return entries

    def training_keys(self) -> set[str]:
        info = self.manifest["training_keys"]
        path = self.path / "models" / info["file"]
        if not path.is_file():
            raise RunDirectoryError(f"{path}: listed in the run's manifest but missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise RunDirectoryError(f"{path}: changed after the run wrote it (sha256 differs from the manifest's)")
        return set(data.decode().split())


def open_finished(run: Path | str) -> FinishedRun:
    """A run directory whose config.json and manifest agree; clear errors otherwise."""
    run = Path(run)
    config = read_config(run)
    if config is None:
        raise RunDirectoryError(f"{run}: not a run directory (no heads config.json)")
    if "fingerprint" not in config:
        raise RunDirectoryError(f"{run}: written by an older heads that did not record its model files; "
                                "write the run again (the same command with --overwrite) to predict with it")
    if "manifest_sha256" not in config:
        raise RunDirectoryError(f"{run}: the run did not finish (no manifest recorded); "
                                "run the same heads command again to complete it")
    path = run / MANIFEST
    if not path.is_file():
        raise RunDirectoryError(f"{path}: missing; the run is incomplete (run the same heads command again)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != config["manifest_sha256"]:
        raise RunDirectoryError(f"{path}: changed after the run wrote it (its sha256 is not the one config.json "
                                "records); write the run again")
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirectoryError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("fingerprint") != config["fingerprint"]:
        raise RunDirectoryError(f"{path}: belongs to another run (fingerprint {str(manifest.get('fingerprint'))[:12]}, "
                                f"config.json says {config['fingerprint'][:12]})")
    # Manifests written before they held the backbone lack the key; the manifest's own hash still
    # protects everything they do hold.
    if "backbone" in manifest and canonical_json(manifest["backbone"]) != canonical_json(config.get("backbone")):
        raise RunDirectoryError(f"{run}: config.json's backbone {config.get('backbone')} is not the one the run "
                                f"trained on ({manifest.get('backbone')}, in its manifest); config.json was edited")
    if manifest.get("classes") != config["classes"]:
        raise RunDirectoryError(f"{path}: classes {manifest.get('classes')} differ from config.json's "
                                f"{config['classes']}")
    return FinishedRun(run, config, manifest)


def check_has_attention(finished: FinishedRun, method: str) -> str:
    """The method's kind (attention or finetune) when it pools with attention; a clear refusal otherwise."""
    if not any(m["method"] == method for m in finished.manifest["models"]):
        finished.models(method)  # raises the run's own "no saved models for head" error
    kind, reason = attention_kind(finished, method)
    if kind is None:
        with_attention = [m for m in finished.methods if attention_kind(finished, m)[0] is not None]
        raise ValueError(f"{reason}; this run's methods with attention: {', '.join(with_attention) or 'none'}"
                         f"{' (choose one with --head)' if with_attention else ''}")
    return kind


def attention_kind(finished: FinishedRun, method: str) -> tuple[str | None, str]:
    """(attention | finetune, "") for a method that pools with attention, else (None, why not)."""
    entries = [m for m in finished.manifest["models"] if m["method"] == method]
    kind = entries[0]["input"] if entries else None
    if kind == "per_residue":
        return "attention", ""
    params = (finished.config.get("methods") or {}).get(method) or {}
    if kind == "sequence":
        if params.get("pooling") == "attention":
            return "finetune", ""
        return None, (f"{method} fine-tunes with {params.get('pooling', 'mean')} pooling, which has no attention "
                      "weights (fine-tuning has them with --set finetune.pooling=attention)")
    return None, f"{method} predicts from mean-pooled vectors and has no attention weights"
