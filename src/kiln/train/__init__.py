"""Training parts: Engine (device, precision, accumulation), optimizers, checkpoints, Trainer."""
