"""Export a dense-with-zeros model to BSR / 2:4 / dense safetensors files, verify it, and load it back.

Example::

    from lightning_sparse.export import export_sparse, load_sparse

    manifest = export_sparse(model, "export/", pattern="32x32", example_input=batch)
    sparse_model = load_sparse("export/", build_model())

From the command line (any algorithm's checkpoint)::

    python -m lightning_sparse.export --config configs/gmp.yaml --ckpt_path last.ckpt --out export/ --pattern 32x32
"""

from lightning_sparse.export.checkpoint import export_checkpoint
from lightning_sparse.export.manifest import FORMAT_VERSION, Manifest
from lightning_sparse.export.plan import LayerPlan, plan_layers
from lightning_sparse.export.sparse_io import export_sparse, load_sparse
from lightning_sparse.export.verify import verify_outputs

__all__ = [
    "FORMAT_VERSION",
    "LayerPlan",
    "Manifest",
    "export_checkpoint",
    "export_sparse",
    "load_sparse",
    "plan_layers",
    "verify_outputs",
]
