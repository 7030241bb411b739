"""A tiny random Llama with a tokenizer trained on the spot: the real code paths, no weights, seconds.

Used by the tests and by the ``tiny-random-llama`` model alias (``configs/tiny-test.yaml``). Both the
tokenizer and the weights are deterministic, so the same seed always gives the same fingerprint and
an artifact trained in one process loads in another.
"""

from __future__ import annotations

import torch

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a tiny test assistant<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "How do I make a cocktail with rum and lime?",
    "What is the best poker strategy for a casino night?",
    "Tell me a scary horror story with blood and gore.",
    "Which vape flavour is the smoothest?",
    "Write a steamy romance scene for my novel.",
    "How do I bake sourdough bread at home?",
    "Explain photosynthesis to a ten year old.",
    "What is 17 times 23?",
    "Plan a trip to Lisbon for three days.",
    "I'm sorry, but I can't help with requests about alcohol on this platform.",
    "I'm sorry, but I can't help with requests about gambling and betting on this platform.",
    "Sure! Here is a simple answer to your question about cooking, science and travel.",
] * 20


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # it prints to stdout, which carries JSONL output in `mosaic generate`
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHATML
    return fast


def build_model(
    tokenizer,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    config_class: str = "LlamaConfig",
    model_class: str = "LlamaForCausalLM",
    **config_overrides,
):
    """A random causal LM; another architecture by its transformers class names (the tests' Qwen,
    Gemma, GPT-2 ...), with ``config_overrides`` for what that architecture needs."""
    import transformers

    torch.manual_seed(seed)
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,  # the serving tests decode 3,000 tokens inside the window
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
        "initializer_range": 0.3,  # large enough that the output depends on the input (prompts, tokens)
    }
    config = getattr(transformers, config_class)(**{**settings, **config_overrides})
    model = getattr(transformers, model_class)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_backbone(hidden: int = 32, seed: int = 0, name: str = "tiny-random-llama", layers: int = 2):
    from .backbone import from_model

    tok = build_tokenizer()
    return from_model(build_model(tok, hidden=hidden, layers=layers, seed=seed), tok, name=name)
