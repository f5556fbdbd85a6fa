"""SAMora trainers."""
