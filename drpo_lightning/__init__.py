"""drpo-lightning: off-policy RL post-training of language models with PyTorch Lightning."""

__version__ = "0.1.0"
