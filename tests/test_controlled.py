"""Invariants of the controlled model on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from tiny import chat_ids

from mosaic_safety.controlled import ControlledModel, pick_token
from mosaic_safety.policy import Policy

PROMPTS = ["How do I bake sourdough bread at home?", "Tell me a scary story", "What is 17 times 23, and why?"]


def base_logits(backbone, prompt):
    ids = chat_ids(backbone, prompt)
    with torch.no_grad():
        return backbone.model(input_ids=ids).logits[0]


def perturb(tokens, seed):
    """Move the control vectors far from their initial rows, so that their effect is large."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in tokens.blocks.values():
            block.add_(torch.randn_like(block))


def base_greedy(backbone, prompt, n):
    ids = chat_ids(backbone, prompt)
    out = backbone.model.generate(
        ids,
        max_new_tokens=n,
        do_sample=False,
        attention_mask=torch.ones_like(ids),
        pad_token_id=backbone.tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("placement", ["prefix", "system", "user", "user_end", "assistant"])
def test_empty_policy_gives_base_logits_and_text(tiny_backbone, tiny_tokens, placement):
    tiny_tokens.placement = placement
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with torch.no_grad():
        logits = cm.forward(PROMPTS, [None] * len(PROMPTS))  # one left-padded batch
    for i, prompt in enumerate(PROMPTS):
        ref = base_logits(tiny_backbone, prompt)
        assert (logits[i, -ref.shape[0] :] - ref).abs().max().item() <= 1e-5
    ours = cm.generate_ids(PROMPTS, [""] * 3, max_new_tokens=6)
    for prompt, row in zip(PROMPTS, ours):
        expected = base_greedy(tiny_backbone, prompt, 6)
        eos = tiny_backbone.tokenizer.eos_token_id
        expected = expected[: expected.index(eos)] if eos in expected else expected
        assert row == expected


@pytest.mark.parametrize("placement", ["prefix", "user", "user_end", "assistant"])
def test_row_does_not_depend_on_batch_or_padding(tiny_backbone, tiny_tokens, minors, placement):
    tiny_tokens.placement = placement
    perturb(tiny_tokens, seed=1)  # make the control tokens matter so that a leak between rows would show
    assert_rows_independent(ControlledModel(tiny_backbone, tiny_tokens), minors)


def assert_rows_independent(cm, minors):
    """Logits and greedy text of each row are the same in a mixed batch as alone."""
    policies = [minors.policy("alcohol"), minors.policy("horror,sex,betting"), Policy(())]
    with torch.no_grad():
        together = cm.next_token_logits(PROMPTS, policies)
        for i in range(3):
            alone = cm.next_token_logits([PROMPTS[i]], [policies[i]])
            assert (together[i] - alone[0]).abs().max().item() <= 1e-5
    batched = cm.generate_ids(PROMPTS, policies, max_new_tokens=5, batch_size=3)
    single = [cm.generate_ids([p], [q], max_new_tokens=5)[0] for p, q in zip(PROMPTS, policies)]
    assert batched == single


def test_control_tokens_change_the_output(tiny_backbone, tiny_tokens, minors):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with torch.no_grad():
        a = cm.next_token_logits(PROMPTS[:1], [minors.policy("alcohol")])
        b = cm.next_token_logits(PROMPTS[:1], [Policy(())])
    assert (a - b).abs().max().item() > 1e-3


def test_policy_order_is_canonical(tiny_backbone, tiny_tokens, minors):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with torch.no_grad():
        a = cm.next_token_logits(PROMPTS[:1], ["sex,alcohol"])
        b = cm.next_token_logits(PROMPTS[:1], [["alcohol", "sex"]])
        # a Policy built by hand, out of order or with a name twice, is the same set of categories
        c = cm.next_token_logits(PROMPTS[:1], [Policy(("sex", "alcohol", "sex"))])
    assert torch.equal(a, b) and torch.equal(a, c)
    assert cm.block_length(Policy(("alcohol", "alcohol"))) == cm.block_length(minors.policy("alcohol"))


def test_layout_left_pads_before_control_tokens(tiny_backbone, tiny_tokens, minors):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    batch = cm.encode(["hi", PROMPTS[0]], [minors.policy("alcohol"), Policy(())])
    mask = batch.attention_mask
    short = mask[0]
    first = int(short.argmax())
    assert short[:first].sum() == 0 and short[first:].all()  # padding only on the left
    assert batch.position_ids[0, first] == 0  # positions restart after padding
    ctrl = tiny_tokens.compose(minors.policy("alcohol"))
    assert torch.allclose(batch.inputs_embeds[0, first : first + 3], ctrl)  # prefix right after padding


def test_stream_matches_generate(tiny_backbone, tiny_tokens, minors):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    text = cm.generate([PROMPTS[0]], ["alcohol"], max_new_tokens=8)[0]
    assert "".join(cm.stream(PROMPTS[0], "alcohol", max_new_tokens=8)) == text


def test_stream_yields_what_it_held_back_when_decoding_ends(tiny_backbone, tiny_tokens):
    """A response cut inside a character ends in U+FFFD in ``generate``; the stream, which holds
    such pieces back for the next token, must not drop it when there is none."""
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    cut = 0
    for prompt in ["How do I bake sourdough bread at home?", "café 😀", "What is 17 times 23?"]:
        for n in (1, 2, 3, 5, 8, 13):
            for kw in ({}, {"do_sample": True, "temperature": 1.3, "seed": 5}):
                text = cm.generate([prompt], ["horror"], max_new_tokens=n, **kw)[0]
                assert "".join(cm.stream(prompt, "horror", max_new_tokens=n, **kw)) == text
                cut += text.endswith("\ufffd")
    assert cut  # the tiny byte-level vocabulary ends some responses inside a character


def test_bad_decoding_settings_are_clear_errors(tiny_backbone, tiny_tokens):
    from mosaic_safety.controlled import GenerationError

    cm = ControlledModel(tiny_backbone, tiny_tokens)
    cases = [
        ({"do_sample": True, "temperature": 0.0}, "temperature above 0"),
        ({"do_sample": True, "temperature": float("inf")}, "finite temperature above 0"),
        ({"do_sample": True, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"max_new_tokens": -3}, "max_new_tokens must be 0 or more"),
    ]
    for kw, message in cases:
        with pytest.raises(GenerationError, match=message):
            cm.generate(PROMPTS[:1], [""], **{"max_new_tokens": 2, **kw})
    with pytest.raises(GenerationError, match="temperature above 0"):
        list(cm.stream(PROMPTS[0], "", do_sample=True, temperature=0.0))
    assert cm.generate(
        PROMPTS[:1], [""], max_new_tokens=2, do_sample=False, temperature=0.0
    )  # greedy ignores it


def test_half_an_emoji_from_a_json_escape_is_a_clear_error(tiny_backbone, tiny_tokens):
    """A JSON "\\ud83d" is a lone surrogate that stands for no escaped byte: the check that names
    bad text raised a UnicodeEncodeError of its own while it built its message."""
    from mosaic_safety.controlled import GenerationError

    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with pytest.raises(GenerationError, match=r"not valid UTF-8 text: b'\\\\ud83d' at character 5"):
        cm.generate(["cats \ud83d broken"], ["horror"], max_new_tokens=2)
    with pytest.raises(GenerationError, match=r"not valid UTF-8 text: b'\\xe9'"):  # a Latin-1 byte
        cm.generate(["caf\udce9"], [""], max_new_tokens=2)


def test_a_generation_past_the_context_window_is_a_clear_error(tiny_backbone, tiny_tokens):
    """Past max_position_embeddings learned positions crash mid-batch and rotary ones decode
    garbage: the prompt plus its budget must fit, control tokens included."""
    from mosaic_safety.controlled import GenerationError

    cm = ControlledModel(tiny_backbone, tiny_tokens)
    window = cm.context_length
    assert window == tiny_backbone.model.config.max_position_embeddings
    positions = sum(map(len, cm.split_prompt(PROMPTS[0]))) + cm.block_length(cm.policy("horror"))
    cm.check_fits(positions, window - positions)  # exactly full: fine
    with pytest.raises(GenerationError, match=f"context window of {window}"):
        cm.generate([PROMPTS[0]], ["horror"], max_new_tokens=window - positions + 1)
    with pytest.raises(GenerationError, match="control tokens included"):
        next(cm.stream(PROMPTS[0], "horror", max_new_tokens=window))


def test_a_text_prompt_is_not_taken_for_a_message_list(tiny_backbone, tiny_tokens):
    messages = [{"role": "user", "content": "hi"}]
    text = repr(messages)  # what a message list's key used to be
    alone = ControlledModel(tiny_backbone, tiny_tokens)
    expected = alone.generate_ids([text], ["alcohol"], max_new_tokens=4)[0]
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    cm.split_prompt(messages)  # the list is cached first
    assert cm.split_prompt(text) == alone.split_prompt(text) != cm.split_prompt(messages)
    together = cm.generate_ids([messages, text], ["alcohol", "alcohol"], max_new_tokens=4)
    assert together[1] == expected


def test_user_end_placement_on_a_template_that_trims_messages(tiny_backbone, tiny_tokens):
    """Llama 3's templates trim each message: the tokens go where the trimmed text ends."""
    from mosaic_safety.backbone import from_model
    from mosaic_safety.tiny import CHATML, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHATML.replace("{{ message['content'] }}", "{{ message['content'] | trim }}")
    assert tokenizer.chat_template != CHATML
    backbone = from_model(tiny_backbone.model, tokenizer, "trimming")
    cm = ControlledModel(backbone, tiny_tokens, placement="user_end")
    for prompt in ("hi ", "hi\n", "  hi"):
        head, rest = cm.split_prompt(prompt)
        assert head + rest == chat_ids(backbone, prompt)[0].tolist()
        assert tokenizer.decode(head).endswith("hi") and tokenizer.decode(rest).startswith("<|im_end|>")


def test_sampling_is_seeded(tiny_backbone, tiny_tokens):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    a = cm.generate_ids(PROMPTS, [""] * 3, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    b = cm.generate_ids(PROMPTS, [""] * 3, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    c = cm.generate_ids(PROMPTS, [""] * 3, max_new_tokens=6, do_sample=True, temperature=1.5, seed=4)
    assert a == b and a != c
    # each row draws from its own generator: the batch size (how rows are grouped) changes nothing
    one = cm.generate_ids(
        PROMPTS, ["", "alcohol", ""], max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, batch_size=1
    )
    all_ = cm.generate_ids(
        PROMPTS, ["", "alcohol", ""], max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, batch_size=3
    )
    assert one == all_ and one[0] == a[0] and one[2] == a[2]
    # ... and row i's draws are those of a call whose first row it is, seeded seed + i
    assert cm.generate_ids(PROMPTS[2:], [""], max_new_tokens=6, do_sample=True, temperature=1.5, seed=5) == [
        a[2]
    ]


def test_chat_messages_and_empty_inputs(tiny_backbone, tiny_tokens):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bake bread?"},
    ]
    assert len(cm.generate([msgs], ["alcohol"], max_new_tokens=3)) == 1
    with pytest.raises(ValueError, match="empty batch"):
        cm.encode([], [])
    with pytest.raises(ValueError, match="at least one message"):
        cm.generate([[]], [""], max_new_tokens=2)
    assert cm.generate([], [], max_new_tokens=2) == []


def test_model_without_tokens_only_takes_empty_policy(tiny_backbone):
    from mosaic_safety.policy import PolicyError

    cm = ControlledModel(tiny_backbone)
    with pytest.raises(PolicyError, match="only the empty policy"):
        cm.policy("alcohol")


def test_model_with_a_registry_but_no_tokens_only_takes_empty_policy(tiny_backbone, minors):
    """A registry names the categories but holds no vectors: a policy is refused, not an AttributeError."""
    from mosaic_safety.policy import PolicyError

    cm = ControlledModel(tiny_backbone, registry=minors)
    with pytest.raises(PolicyError, match="no control tokens"):
        cm.generate([PROMPTS[0]], ["alcohol"], max_new_tokens=2)
    with pytest.raises(PolicyError, match="unknown category"):
        cm.policy("alcohool")
    assert len(cm.generate([PROMPTS[0]], [""], max_new_tokens=2)) == 1


def test_reprs_are_summaries(tiny_backbone, tiny_tokens):
    """A notebook prints these: the generated Backbone repr dumped the module tree and tokenizer."""
    text = repr(tiny_backbone)
    assert len(text) < 300 and f"fingerprint={tiny_backbone.fingerprint!r}" in text and "float32" in text
    cm = repr(ControlledModel(tiny_backbone, tiny_tokens))
    assert len(cm) < 300 and repr(list(tiny_tokens.categories)) in cm and "placement=" in cm


def test_unknown_placement_is_refused(tiny_backbone, tiny_tokens):
    """Any placement outside the list was silently read as ``system``."""
    with pytest.raises(ValueError, match="unknown placement 'middle'"):
        ControlledModel(tiny_backbone, tiny_tokens, placement="middle")


@pytest.mark.parametrize(
    "call",
    [
        lambda cm: cm.generate("hi", ["", ""], max_new_tokens=2),  # was answered as rows "h" and "i"
        lambda cm: cm.generate_ids(["hi"], "alcohol", max_new_tokens=2),
        # a Policy iterates its categories: it was one category per row
        lambda cm: cm.generate(["hi", "yo"], Policy(("alcohol", "betting")), max_new_tokens=2),
        lambda cm: cm.forward("hi", ["alcohol", "betting"]),
        lambda cm: cm.next_token_logits(["hi"], "alcohol"),
        lambda cm: cm.encode("ab", ["", ""]),
    ],
)
def test_a_single_text_or_policy_is_not_read_as_a_batch(tiny_backbone, tiny_tokens, call):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with pytest.raises(TypeError, match="one entry per row"):
        call(cm)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([{"content": "hi"}], "message 0 of a prompt"),  # was rendered with an empty role
        ([{"role": "user", "content": None}], "message 0 of a prompt"),  # was rendered as "None"
        (["hi", "there"], "message 0 of a prompt"),
        ({"role": "user", "content": "hi"}, "wrap it in a list"),
        (3, "a text or a list of chat messages"),
    ],
)
def test_malformed_prompts_are_named(tiny_backbone, tiny_tokens, prompt, message):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with pytest.raises(TypeError, match=message):
        cm.generate([prompt], ["alcohol"], max_new_tokens=2)
    with pytest.raises(TypeError, match=message):
        list(cm.stream(prompt, "alcohol", max_new_tokens=2))


def test_prompt_split_follows_a_changed_chat_template(tiny_backbone, tiny_tokens, monkeypatch):
    """The split cache kept the ids of the template a prompt was first seen with."""
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    before = cm.split_prompt(PROMPTS[0])
    template = tiny_backbone.tokenizer.chat_template.replace("tiny test assistant", "pirate")
    monkeypatch.setattr(tiny_backbone.tokenizer, "chat_template", template)
    after = cm.split_prompt(PROMPTS[0])
    assert after != before
    assert after == ControlledModel(tiny_backbone, tiny_tokens).split_prompt(PROMPTS[0])


def test_unknown_category_lists_valid_ones(tiny_backbone, tiny_tokens):
    from mosaic_safety.policy import PolicyError

    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with pytest.raises(PolicyError, match="valid categories: addiction, alcohol, betting, horror, sex"):
        cm.generate([PROMPTS[0]], ["Alcohol"], max_new_tokens=2)


@pytest.mark.parametrize("placement", ["prefix", "system", "user", "user_end", "assistant"])
def test_shared_heads_give_the_full_forward_values_and_gradients(
    tiny_backbone, tiny_tokens, minors, placement
):
    """Training runs the part before the control tokens once without gradients; nothing may change."""
    tiny_tokens.placement = placement
    perturb(tiny_tokens, seed=2)
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    prompts = PROMPTS + ["hi"]
    policies = [minors.policy("alcohol"), minors.policy("sex"), Policy(()), minors.policy("horror")]
    targets = [[5, 6, 7, 2], [9, 2], [11, 12, 13, 14, 15, 2], [3]]

    def run(shared):
        for block in tiny_tokens.blocks.values():
            block.grad = None
        heads = cm.prefill_heads(prompts) if shared else None
        logits, labels = cm.response_logits(prompts, policies, targets, heads)
        (logits * (labels != -100).unsqueeze(-1)).sum().backward()
        grads = {n: b.grad.clone() for n, b in tiny_tokens.blocks.items() if b.grad is not None}
        return logits.detach(), labels, grads, heads

    full, full_labels, full_grads, _ = run(False)
    split, split_labels, split_grads, heads = run(True)
    assert (heads is None) == (placement == "prefix")
    assert torch.equal(full_labels, split_labels)
    assert full.shape == (4, 6, full.shape[-1])
    valid = full_labels != -100  # past a row's target the window holds padding: never used
    # float rounding only: summation order differs between the two paths and between CPUs
    # (1.05e-5 on logits of magnitude ~30 on one AMD EPYC); a wrong mask or position is O(1)
    torch.testing.assert_close(split[valid], full[valid], rtol=1e-5, atol=5e-5)
    assert sorted(full_grads) == sorted(split_grads) == ["alcohol", "horror", "sex"]
    for name in full_grads:
        torch.testing.assert_close(split_grads[name], full_grads[name], rtol=1e-4, atol=1e-4)
    # index j predicts target token j: check one row against a plain forward of the full sequence
    with torch.no_grad():
        alone, _ = cm.response_logits([prompts[2]], [policies[2]], [targets[2]])
        ids = chat_ids(tiny_backbone, prompts[2])
        seq = torch.cat([ids, torch.tensor([targets[2][:-1]])], dim=1)
        ref = tiny_backbone.model(input_ids=seq).logits[0, ids.shape[1] - 1 :]
    assert (alone[0] - ref).abs().max().item() <= 1e-5
    if heads is not None:  # a subset of rows (the teacher pass on negatives) reuses the same heads
        pair, empty, pair_targets = [prompts[1], prompts[3]], [Policy(())] * 2, [targets[1], targets[3]]
        sub, _ = cm.response_logits(pair, empty, pair_targets, heads.rows([1, 3]))
        ref, _ = cm.response_logits(pair, empty, pair_targets)
        assert (sub - ref).abs().max().item() <= 1e-5


def test_response_logits_need_a_target_per_row(tiny_backbone, tiny_tokens):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with pytest.raises(ValueError, match="target"):
        cm.response_logits(["hi"], [Policy(())], [[]])


def test_heads_without_last_states_refuse_a_row_with_nothing_after_them(tiny_backbone, tiny_tokens):
    """With ``assistant`` placement an empty policy leaves nothing after the head: its end state must be kept."""
    import dataclasses

    tiny_tokens.placement = "assistant"
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    heads = cm.prefill_heads(["hi"])
    assert heads is not None and heads.last_states is not None
    with torch.no_grad():
        kept, _ = cm.response_logits(["hi"], [Policy(())], [[5, 2]], heads)
        plain, _ = cm.response_logits(["hi"], [Policy(())], [[5, 2]])
    assert (kept - plain).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="no last states"):
        cm.response_logits(["hi"], [Policy(())], [[5, 2]], dataclasses.replace(heads, last_states=None))


@pytest.fixture
def deep_tokens(tiny_backbone, minors):
    """Deep tokens with random offsets (one layer after the first of the 2-layer tiny model)."""
    from mosaic_safety.tokens import ControlTokens

    emb, tok = tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer
    tokens = ControlTokens.initialise(minors, emb, tok, m=3, deep_layers=1, placement="user_end")
    perturb(tokens, seed=3)
    torch.manual_seed(4)
    with torch.no_grad():
        for offsets in tokens.deep.values():
            offsets.normal_()
    return tokens


def test_deep_offsets_start_neutral_and_then_matter(tiny_backbone, tiny_tokens, deep_tokens, minors):
    """Zero offsets give exactly the input-level tokens; trained (here random) ones change the output."""
    from mosaic_safety.tokens import ControlTokens

    blocks = {n: b.detach() for n, b in deep_tokens.blocks.items()}
    zeros = {n: torch.zeros_like(o) for n, o in deep_tokens.deep.items()}
    plain = ControlledModel(tiny_backbone, ControlTokens(minors, blocks, "user_end"))
    zeroed = ControlledModel(tiny_backbone, ControlTokens(minors, blocks, "user_end", zeros))
    deep = ControlledModel(tiny_backbone, deep_tokens)
    policies = [minors.policy("alcohol"), minors.policy("horror,sex"), Policy(())]
    with torch.no_grad():
        a, b, c = (m.next_token_logits(PROMPTS, policies) for m in (plain, zeroed, deep))
    assert torch.equal(a, b)
    assert (a[:2] - c[:2]).abs().max().item() > 1e-3
    assert (a[2] - c[2]).abs().max().item() == 0  # the empty policy stays the base model


def test_deep_offsets_land_on_each_rows_control_positions(tiny_backbone, deep_tokens, minors):
    """Against an independent reference: a hook that adds the offsets by explicit row and position."""
    cm = ControlledModel(tiny_backbone, deep_tokens)
    policies = [minors.policy("horror,sex"), Policy(()), minors.policy("alcohol")]
    with torch.no_grad():
        ours = cm.logits(cm.encode(PROMPTS, policies), window=0)
        batch = cm.encode(PROMPTS, policies)
        lengths = batch.attention_mask.sum(-1)
        width = batch.attention_mask.shape[1]
        adds = []
        for i, (prompt, policy) in enumerate(zip(PROMPTS, policies)):
            if policy:
                head = len(cm.split_prompt(prompt)[0])
                start = width - int(lengths[i]) + head
                adds.append((i, start, deep_tokens.compose_deep(policy)[0]))

        def add(_module, args):
            hidden = args[0].clone()
            for i, start, offsets in adds:
                hidden[i, start : start + offsets.shape[0]] += offsets
            return (hidden, *args[1:])

        handle = tiny_backbone.model.model.layers[1].register_forward_pre_hook(add)
        try:
            batch.deep = batch.ctrl_mask = None
            ref = cm.logits(batch, window=0)
        finally:
            handle.remove()
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("placement", ["prefix", "user_end", "assistant"])
def test_deep_rows_are_independent_and_shared_heads_agree(tiny_backbone, deep_tokens, minors, placement):
    deep_tokens.placement = placement
    cm = ControlledModel(tiny_backbone, deep_tokens)
    assert_rows_independent(cm, minors)
    policies = [minors.policy("alcohol"), minors.policy("horror,sex,betting"), Policy(())]
    targets = [[5, 6, 7], [9, 2], [11, 12]]

    def run(shared):
        for p in deep_tokens.parameters():
            p.grad = None
        heads = cm.prefill_heads(PROMPTS) if shared else None
        logits, labels = cm.response_logits(PROMPTS, policies, targets, heads)
        (logits * (labels != -100).unsqueeze(-1)).sum().backward()
        return (
            logits.detach(),
            labels,
            {n: o.grad.clone() for n, o in deep_tokens.deep.items() if o.grad is not None},
        )

    full, labels, full_grads = run(False)
    split, _, split_grads = run(True)
    assert (full - split)[labels != -100].abs().max().item() <= 1e-5
    assert sorted(full_grads) == sorted(split_grads) == ["alcohol", "betting", "horror", "sex"]
    for name in full_grads:
        assert full_grads[name].abs().max() > 0
        torch.testing.assert_close(split_grads[name], full_grads[name], rtol=1e-4, atol=1e-4)


def test_deep_tokens_need_the_layer_count_they_were_made_for(deep_tokens):
    from mosaic_safety.tiny import build_backbone

    deeper = build_backbone(layers=3)  # same embedding (same fingerprint), one more layer
    with pytest.raises(ValueError, match="2-layer model, but this model has 3 layers"):
        ControlledModel(deeper, deep_tokens)


@pytest.mark.parametrize("placement", ["user", "user_end", "assistant"])
def test_policies_sharing_a_prompt_generate_over_one_head(tiny_backbone, deep_tokens, minors, placement):
    """An evaluation asks every policy about the same prompts: each prompt's head runs once per batch,
    and every row's tokens are what it generates alone."""
    deep_tokens.placement = placement
    cm = ControlledModel(tiny_backbone, deep_tokens)
    names = ["", "alcohol", "sex", "horror,sex", "alcohol,betting,horror"]
    prompts = [p for p in PROMPTS for _ in names]
    policies = [n for _ in PROMPTS for n in names]
    calls = []
    original = cm.prefill_heads
    cm.prefill_heads = lambda rows: calls.append(len(rows)) or original(rows)  # count, then run it
    together = cm.generate_ids(prompts, policies, max_new_tokens=6, batch_size=32)
    assert calls and sum(calls) <= len(PROMPTS) * 2  # not one head per row
    calls.clear()
    alone = [cm.generate_ids([p], [q], max_new_tokens=6)[0] for p, q in zip(prompts, policies)]
    assert calls == []  # one row: the plain path
    assert together == alone
    assert len({tuple(r) for r in together}) > 1  # the policies do change the output


def test_prefill_head_matches_the_models_own_last_logits(tiny_backbone, deep_tokens, minors):
    """``prefill_logits`` runs the LM head on a contiguous copy of the last states (much faster in
    bf16 on CPU); it must give what the model's own ``logits_to_keep=1`` gives, and the same cache."""
    from mosaic_safety.controlled import head_logits, prefill_cache, prefill_logits

    cm = ControlledModel(tiny_backbone, deep_tokens)  # random deep offsets: steering is exercised
    batch = cm.encode(["hi", "a much longer request about bourbon"], [Policy(("alcohol",)), Policy(())])
    with torch.no_grad():
        theirs = prefill_cache(cm.model, batch, logits_to_keep=1)
        ours = prefill_logits(cm.model, batch)
        everything = cm.logits(batch, window=0)
        decoder = cm.decoder_output(batch)
    assert ours.logits.shape == theirs.logits.shape == (2, 1, tiny_backbone.vocab_size)
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)
    assert torch.allclose(everything[:, -1:], theirs.logits, atol=1e-5)
    assert torch.allclose(head_logits(cm.model, decoder, 3), everything[:, -3:], atol=1e-5)
    for (k1, v1), (k2, v2) in zip(
        ((layer.keys, layer.values) for layer in ours.past_key_values.layers),
        ((layer.keys, layer.values) for layer in theirs.past_key_values.layers),
    ):
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)


# -- controlled.py: behaviour a mutation audit found unpinned ------------------------------
def test_encoded_labels_are_the_tokens_each_logit_predicts(tiny_backbone, tiny_tokens, minors):
    """``encode(..., targets)`` labels (used by the LoRA / ORPO losses) line up with the logits of
    ``logits(batch)``: window index j predicts sequence position L - window + j + 1."""
    from mosaic_safety.training.losses import response_cross_entropy

    cm = ControlledModel(tiny_backbone, tiny_tokens)
    policies = [minors.policy("alcohol"), Policy(())]
    targets = [[5, 6, 7], [8]]
    batch = cm.encode(PROMPTS[:2], policies, targets)
    assert batch.window == 4
    assert batch.labels.tolist() == [[5, 6, 7, -100], [-100, -100, 8, -100]]
    with torch.no_grad():
        full = response_cross_entropy(cm.logits(batch), batch.labels)
        logits, labels = cm.response_logits(PROMPTS[:2], policies, targets)
        aligned = response_cross_entropy(logits, labels)
    assert torch.allclose(full, aligned, atol=1e-5)


def test_decoding_pads_finished_rows_and_stops_once_all_have_finished(tiny_backbone, tiny_tokens):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    pad = tiny_backbone.tokenizer.pad_token_id
    batch = cm.encode(PROMPTS[:2], [Policy(())] * 2)
    free = torch.stack(list(cm.decode_steps(batch, max_new_tokens=6)), 1).tolist()
    # a token row 0 produces and row 1 never does: make it the stop token
    j, stop = next((j, t) for j, t in enumerate(free[0]) if t not in free[1] and t != pad and j < 5)
    cm.eos_ids = [stop]
    steps = torch.stack(list(cm.decode_steps(batch, max_new_tokens=6)), 1).tolist()
    assert steps[1] == free[1]  # the other row runs to the budget
    assert steps[0][: j + 1] == free[0][: j + 1]
    assert steps[0][j + 1 :] == [pad] * (6 - j - 1)  # a finished row yields the pad id
    alone = cm.encode(PROMPTS[:1], [Policy(())])
    assert len(list(cm.decode_steps(alone, max_new_tokens=6))) == j + 1  # all finished: stop
    assert cm.generate_ids(PROMPTS[:1], [""], max_new_tokens=6) == [free[0][:j]]
    assert cm.generate_ids(PROMPTS[:1], [""], max_new_tokens=6, keep_eos=True) == [free[0][: j + 1]]


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    """probs 0.5 / 0.3 / 0.2 with top_p 0.6: the nucleus is the first two tokens (0.5 < 0.6)."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    drawn = pick_token(logits, True, 1.0, 0.6, gen).bincount(minlength=3).tolist()
    assert drawn[2] == 0
    assert 0.55 < drawn[0] / 4000 < 0.70 and 0.30 < drawn[1] / 4000 < 0.45  # 5/8 and 3/8


def test_temperature_divides_the_logits():
    logits = torch.tensor([[2.0, 0.0]]).expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    cold = pick_token(logits, True, 0.5, 1.0, gen).eq(0).float().mean().item()  # softmax(4, 0): 0.982
    hot = pick_token(logits, True, 2.0, 1.0, gen).eq(0).float().mean().item()  # softmax(1, 0): 0.731
    assert cold > 0.96 and 0.69 < hot < 0.77


def test_response_logits_take_a_hand_built_policy_in_canonical_order(tiny_backbone, tiny_tokens, minors):
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    with torch.no_grad():
        a, _ = cm.response_logits(PROMPTS[:1], [Policy(("sex", "alcohol", "sex"))], [[5, 6]])
        b, _ = cm.response_logits(PROMPTS[:1], [minors.policy("alcohol,sex")], [[5, 6]])
    assert torch.equal(a, b)


def test_stream_never_yields_half_a_character(tiny_backbone, tiny_tokens, monkeypatch):
    """A character split over several byte tokens is held back until it is complete."""
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    ids = tiny_backbone.tokenizer("é😀 ok", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(cm, "decode_steps", lambda *a, **k: iter(torch.tensor([t]) for t in ids))
    pieces = list(cm.stream(PROMPTS[0], None, max_new_tokens=len(ids)))
    assert "".join(pieces) == "é😀 ok"
    assert not any("\ufffd" in p for p in pieces)


def test_eos_ids_include_the_generation_configs(tiny_backbone, tiny_tokens, monkeypatch):
    """Llama 3 style: the generation config lists more stop tokens than the tokenizer's EOS."""
    eos = tiny_backbone.tokenizer.eos_token_id
    monkeypatch.setattr(tiny_backbone.model.generation_config, "eos_token_id", [eos, 7])
    assert ControlledModel(tiny_backbone, tiny_tokens).eos_ids == sorted({eos, 7})
