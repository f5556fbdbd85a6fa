"""SAMora activelearning."""
