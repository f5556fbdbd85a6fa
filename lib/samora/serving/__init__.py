"""What the MONAI Label app needs, testable without a server: settings, model runtime, prompts, label remapping."""
