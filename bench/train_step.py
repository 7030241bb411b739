"""Training-step time of mosaic-safety vs a PEFT prompt-tuning step on the same batch, side by side.

Same model, same batch, same number of virtual tokens, CE loss on the response, Adam. Steps are
interleaved (ours, PEFT, ours, PEFT, ...) so machine noise hits both alike; the ratio of medians is
what to compare across machines, not the absolute times.

    python bench/train_step.py [--model smollm2-135m-instruct] [--batch 8] [--virtual 5] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--virtual", type=int, default=5, help="virtual tokens (one category of m tokens)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from peft import PromptTuningConfig, TaskType, get_peft_model

    from mosaic_safety.backbone import load_backbone
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.data import load_suite
    from mosaic_safety.tokens import ControlTokens
    from mosaic_safety.training.losses import response_cross_entropy

    backbone = load_backbone(args.model, args.device, "float32")
    tok = backbone.tokenizer
    suite = load_suite("minors")
    registry = suite.registry
    prompts = [e.prompt for e in suite.by_category("train")["alcohol"][: args.batch]]
    target = tok(registry["alcohol"].refusal_text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    # ours: one category with `virtual` tokens, prefix placement (same as PEFT's virtual tokens)
    tokens = ControlTokens.initialise(
        registry, backbone.model.get_input_embeddings(), tok, m=args.virtual, categories=["alcohol"]
    )
    ours = ControlledModel(backbone, tokens)
    policy = registry.policy("alcohol")
    opt_ours = torch.optim.Adam(tokens.parameters(), lr=1e-2)

    def step_ours() -> None:
        batch = ours.encode(prompts, [policy] * len(prompts), [target] * len(prompts))
        loss = response_cross_entropy(ours.logits(batch), batch.labels).mean()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    # PEFT prompt tuning on the same rows (left-padded, labels only on the response)
    peft_model = get_peft_model(
        backbone.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.virtual)
    )
    rows = [ours.split_prompt(p)[1] + target for p in prompts]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
        labels[i, length - len(target) :] = torch.tensor(target)
    ids, mask, labels = ids.to(backbone.device), mask.to(backbone.device), labels.to(backbone.device)
    opt_peft = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)

    def step_peft() -> None:
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt_peft.step()
        opt_peft.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with peft_model.disable_adapter():
        step_ours()  # warm-up
    step_peft()
    t_ours, t_peft = [], []
    for _ in range(args.steps):
        with peft_model.disable_adapter():  # our path must see the plain frozen model
            t_ours.append(timed(step_ours))
        t_peft.append(timed(step_peft))
    mo, mp = statistics.median(t_ours), statistics.median(t_peft)
    print(
        f"model {backbone.name}, batch {args.batch}, {args.virtual} virtual tokens, seq len ~{length + args.virtual}"
    )
    print(f"mosaic step median {mo:.3f}s  (all: {', '.join(f'{t:.2f}' for t in t_ours)})")
    print(f"peft   step median {mp:.3f}s  (all: {', '.join(f'{t:.2f}' for t in t_peft)})")
    print(f"ratio mosaic/peft = {mo / mp:.2f}  (goal <= 0.8)")


if __name__ == "__main__":
    main()
