"""Command-line entry points around timm: PMPL search, Hub publishing, and a launcher for timm's scripts."""
