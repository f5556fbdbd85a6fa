"""SAMora infers."""
