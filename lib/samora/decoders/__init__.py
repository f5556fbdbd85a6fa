"""Decoders: SAMed-style prompt-free head, H-SAM-style two-stage head, and the prompt path."""
