"""End-to-end jobs built from the library: the demo and the unlearning pipeline."""
