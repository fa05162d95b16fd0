"""lightning_distill: dataset distillation by trajectory matching for PyTorch Lightning."""

__version__ = "0.1.0.dev0"
