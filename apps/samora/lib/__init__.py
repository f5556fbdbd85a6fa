"""SAMora MONAI Label app helpers: one task per module, all thin layers over the `samora` library."""
