"""SAMora: hierarchical self-supervised LoRA experts for the Segment Anything Model on medical volumes."""

__version__ = "0.1.0"
