"""mosaic-safety: composable per-request safety policies for frozen causal LMs (MOSAIC control tokens)."""

__version__ = "0.1.0"
