"""Training: data loading and augmentation, losses, configuration, checkpoints, logging and trainers."""
