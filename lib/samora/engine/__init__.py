"""Stage-2 training, volume inference, uncertainty and model versioning."""
