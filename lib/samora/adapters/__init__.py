"""LoRA experts and their HL-Attn fusion."""
