"""Export a dense-with-zeros model to BSR / 2:4 / dense safetensors files, verify it, and load it back.

A Hugging Face model (or a LightningModule holding one, such as ``HFCausalLM``) also gets ``export/hf/``, its
``save_pretrained`` folder: ``AutoModelForCausalLM.from_pretrained("export/hf")`` loads the pruned model.

Example::

    import torch
    from lightning_sparse.export import export_sparse, load_sparse
    from lightning_sparse.models import MLP

    model = MLP(hidden=(256,))  # trained with 16x16 block masks, in practice
    manifest = export_sparse(model, "export/", pattern="16x16", example_input=torch.randn(4, 1, 28, 28))
    sparse_model = load_sparse("export/", MLP(hidden=(256,)))

From the command line (any algorithm's checkpoint): ``lightning-sparse-export`` (or ``python -m
lightning_sparse.export``), see :mod:`lightning_sparse.export.checkpoint`.
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
