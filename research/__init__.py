"""The experiments behind docs/results.md (the summary) and research/NOTES.md (the full notebook):
scripts, run as `python -m research.<name>` from the repository root, and their recorded outputs.
Not part of the served package: the wheel and the Docker image leave this folder out."""
