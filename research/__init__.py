"""The experiments behind docs/results.md: scripts (run as `python -m research.<name>` from the
repository root) and their recorded outputs. Not part of the served package or its wheel."""
