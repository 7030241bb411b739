"""Re-export of the package's tiny random model builder for tests."""

from mosaic_safety.tiny import CHATML, build_backbone, build_model, build_tokenizer

__all__ = ["CHATML", "build_backbone", "build_model", "build_tokenizer"]
