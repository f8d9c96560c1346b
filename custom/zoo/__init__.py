"""MONAI Model Zoo conformance and the self-contained export."""
