"""`metalora bench`: every figure a ratio of variants measured side by side in one run."""
