"""Re-export of the package's tiny random model builder for tests."""

from mosaic_safety.tiny import CHATML, build_backbone, build_model, build_tokenizer

__all__ = ["CHATML", "build_backbone", "build_model", "build_tokenizer", "chat_ids"]


def chat_ids(backbone, prompt: str):
    """The plain HF input ids of a user prompt: the reference every empty-policy test compares to."""
    return backbone.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
