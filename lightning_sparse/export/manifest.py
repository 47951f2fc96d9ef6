"""``Manifest``: what an export directory holds (``manifest.json``), with its format version checked on read.

An export directory holds three files, and a folder for a Hugging Face model:

- ``model.safetensors``: the full dense-with-zeros ``state_dict`` (the plain model's keys; a tied weight once);
- ``sparse.safetensors``: the converted weights keyed by parameter FQN, ``<fqn>.crow_indices``,
  ``<fqn>.col_indices`` and ``<fqn>.values`` for BSR, ``<fqn>.values`` and ``<fqn>.packed_idx`` for 2:4, each of
  the weight's ``(out, in)`` matrix view: a converted Hugging Face ``Conv1D`` (stored ``(in, out)``) stores the
  transpose, a converted ``Conv2d`` (BSR only) its ``(out, in * kh * kw)`` view, and its stride, padding and
  dilation come from the model it is loaded into, like every bias. Adding Conv2d and Conv1D changed no field:
  exports without a converted Conv2d or Conv1D load in older versions (which refuse those layers by name);
- ``hf/`` (when the model is or holds a ``transformers.PreTrainedModel``): its ``save_pretrained`` output, in
  Hugging Face names and orientation, loadable by ``AutoModelForCausalLM.from_pretrained``; recorded in
  :attr:`Manifest.huggingface`, the one field format version 2 added. A manifest without it is written as version 1;
- ``manifest.json``: this class as JSON, written last, only once the export verified.

Every zero in these files is ``+0.0``.

Example::

    >>> m = Manifest(format="bsr", pattern="32x32", blocksize=(32, 32), n_m=None, dtype="float32", layers={})
    >>> Manifest.from_dict(m.to_dict()) == m
    True
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
"""The newest manifest format this version of the library writes and reads (a manifest is written with the oldest
version that describes it: 1 unless it has a ``huggingface`` entry)."""

MODEL_FILE, SPARSE_FILE, MANIFEST_FILE = "model.safetensors", "sparse.safetensors", "manifest.json"
COMPONENTS = {"bsr": ("crow_indices", "col_indices", "values"), "2:4": ("values", "packed_idx"), "dense": ()}


def library_version() -> str:
    """The installed ``lightning-sparse`` version (``"unknown"`` when run from a source tree without install)."""
    try:
        return importlib.metadata.version("lightning-sparse")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Manifest:
    """Contents of ``manifest.json``.

    Args:
        format: ``"bsr"``, ``"2:4"`` or ``"dense"`` (nothing converted).
        pattern: the pattern the export was asked for (``"32x32"``, ``"2:4"``, ``"dense"``).
        blocksize: BSR block shape ``(R, C)``; ``None`` otherwise.
        n_m: ``(2, 4)`` for 2:4; ``None`` otherwise.
        dtype: dtype of the exported weights (``"float32"``, ...).
        layers: per layer (module FQN): ``param`` (weight FQN), ``type``, ``shape`` (as stored), ``matrix_shape``
            (its ``(out, in)`` view; absent in older exports, and no reader needs it), ``density`` (non-zero
            fraction), ``converted``, ``stored_density`` (stored fraction: kept blocks, or 0.5 for 2:4; converted
            layers only) and ``reason`` (why a layer was not converted).
        verification: ``{"max_abs_error", "rtol", "atol", "worst_layer", ...}`` when outputs were checked on a batch.
        library_version: ``lightning-sparse`` version that wrote the export.
        torch_version: torch version that wrote the export.
        huggingface: the Hugging Face folder, when the model holds a Hugging Face model: ``dir`` (relative to the
            export directory; ``None`` when it could not be written), ``module`` (FQN of the ``PreTrainedModel``
            in the exported model, ``""`` for the model itself), ``class``, ``reason`` (why it was not written) and
            ``verification`` (its reloaded outputs checked on the batch).
    """

    format: str
    pattern: str
    blocksize: tuple[int, int] | None
    n_m: tuple[int, int] | None
    dtype: str
    layers: dict[str, dict[str, Any]]
    verification: dict[str, Any] | None = None
    library_version: str = field(default_factory=library_version)
    torch_version: str = str(torch.__version__)
    huggingface: dict[str, Any] | None = None

    @property
    def format_version(self) -> int:
        """The manifest format version this manifest is written as: 2 with a ``huggingface`` entry, else 1."""
        return 1 if self.huggingface is None else 2

    @property
    def converted(self) -> list[str]:
        """Module FQNs of the layers stored in ``sparse.safetensors``."""
        return [name for name, layer in self.layers.items() if layer["converted"]]

    @property
    def skipped(self) -> dict[str, str]:
        """Why each other layer stayed dense, by module FQN."""
        return {name: layer["reason"] for name, layer in self.layers.items() if not layer["converted"]}

    def summary(self) -> str:
        """A plain-text table: one line per layer with its shape, density and what the export did with it."""
        rows = [("layer", "type", "shape", "density", "stored")]
        for name, layer in self.layers.items():
            pattern = layer.get("pattern", self.pattern)
            stored = f"{layer['stored_density']:.4f} ({pattern})" if layer["converted"] else layer["reason"]
            shape = "x".join(map(str, layer["shape"]))
            rows.append((name or "<root>", layer["type"], shape, f"{layer['density']:.4f}", stored))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[4]]) for row in rows]
        return "\n".join([*lines, *self._hf_line()])

    def _hf_line(self) -> list[str]:
        hf = self.huggingface
        if hf is None:
            return []
        if hf["dir"] is None:
            return [f"Hugging Face folder: not written: {hf['reason']}"]
        error = (hf.get("verification") or {}).get("max_abs_error")
        checked = "unverified" if error is None else f"from_pretrained verified, max abs error {error:.3g}"
        return [f"Hugging Face folder: {hf['dir']}/ ({hf['class']} at {hf['module'] or '<root>'!r}, {checked})"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (with a derived ``converted`` list for readers of the file, and the
        ``format_version``; no ``huggingface`` key in a version-1 manifest)."""
        data = {**asdict(self), "format_version": self.format_version, "converted": self.converted}
        if self.huggingface is None:
            del data["huggingface"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Reads a dict written by :meth:`to_dict`.

        Raises:
            ValueError: if ``format_version`` is missing, not an int, or newer than :data:`FORMAT_VERSION`, or the
                format is unknown.
        """
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"manifest format_version must be an int, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {version} is newer than this lightning-sparse ({library_version()}) "
                f"supports (format_version <= {FORMAT_VERSION}); upgrade lightning-sparse to load it"
            )
        if data.get("format") not in COMPONENTS:
            raise ValueError(f"manifest format must be one of {tuple(COMPONENTS)}, got {data.get('format')!r}")
        data = {key: value for key, value in data.items() if key not in ("converted", "format_version")}
        for key in ("blocksize", "n_m"):
            data[key] = tuple(data[key]) if data.get(key) is not None else None
        return cls(**data)

    def write(self, dirpath: str | Path) -> Path:
        """Writes ``manifest.json`` into ``dirpath``; returns its path."""
        path = Path(dirpath) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, dirpath: str | Path) -> Manifest:
        """Reads ``dirpath/manifest.json`` and checks that the files it describes exist.

        Raises:
            FileNotFoundError: if ``dirpath``, its manifest, one of its safetensors files or its Hugging Face
                folder's ``config.json`` is missing.
            ValueError: as :meth:`from_dict`.
        """
        dirpath = Path(dirpath)
        path = dirpath / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST_FILE} in {str(dirpath)!r}: not an export directory, or its export did not finish "
                "(the manifest is written last, after verification)"
            )
        manifest = cls.from_dict(json.loads(path.read_text()))
        hf_dir = (manifest.huggingface or {}).get("dir")
        files = (MODEL_FILE, SPARSE_FILE, *([f"{hf_dir}/config.json"] if hf_dir else []))
        missing = [name for name in files if not (dirpath / name).is_file()]
        if missing:
            raise FileNotFoundError(f"export directory {str(dirpath)!r} is missing {missing} listed by its manifest")
        return manifest
