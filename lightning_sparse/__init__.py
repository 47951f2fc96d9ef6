"""lightning_sparse: sparse training for PyTorch Lightning."""
