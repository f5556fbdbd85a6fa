"""SAMora scoring."""
