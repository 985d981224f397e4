"""Stage 2, learn: the embedding model, augmentation, losses, one period's trainer, its
checkpoints and data-parallel training under torchrun."""
