"""Each endpoint against the real server on loopback: responses, streaming, the openai client, errors."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import KEYS, MODEL, auth, chat_body

from mosaic_safety.policy import Policy


def _sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_models_and_safety(url):
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    models = httpx.get(f"{url}/v1/models", headers=auth("kids")).json()
    ids = [m["id"] for m in models["data"]]
    assert ids == [MODEL, f"{MODEL}:kids", f"{MODEL}:teen-eu", f"{MODEL}:adult"]
    info = httpx.get(f"{url}/v1/safety", headers=auth("venue")).json()
    assert info["key"] == {"name": "venue", "profile": "adult", "floor": ["betting"]}
    assert [c["name"] for c in info["categories"]] == ["addiction", "alcohol", "betting", "horror", "sex"]
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_chat_matches_in_process_generation(live, tiny_backbone):
    url, server = live
    body = chat_body("Plan a trip to Lisbon", max_tokens=8, safety={"categories": ["horror"]})
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth("teen"))
    assert r.status_code == 200, r.text
    got = r.json()
    applied = ["addiction", "alcohol", "betting", "horror", "sex"]  # teen-eu floor + horror
    assert got["safety"]["categories"] == applied
    assert got["safety"]["profile"] == "teen-eu" and got["safety"]["requested"] == ["horror"]
    assert r.headers["x-mosaic-policy"] == ",".join(applied)
    assert got["object"] == "chat.completion" and got["model"] == MODEL
    messages = [{"role": "user", "content": "Plan a trip to Lisbon"}]
    (want,) = server.method.model.generate([messages], [Policy(tuple(applied))], max_new_tokens=8)
    assert got["choices"][0]["message"]["content"] == want
    ids = server.method.model.generate_ids([messages], [Policy(tuple(applied))], max_new_tokens=8)[0]
    assert got["usage"]["completion_tokens"] == len(ids)
    assert got["safety"]["refused"] is False and got["safety"]["rule"] is None  # random model: no refusal


def test_completions_endpoint_takes_several_prompts(live):
    url, server = live
    body = {"model": f"{MODEL}:kids", "prompt": ["What is 17 times 23?", "hi"], "max_tokens": 5}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=auth("adult"))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "text_completion" and len(got["choices"]) == 2
    assert got["safety"]["profile"] == "kids" and len(got["safety"]["categories"]) == 5
    want = server.method.model.generate(
        ["What is 17 times 23?", "hi"], [Policy(tuple(got["safety"]["categories"]))] * 2, max_new_tokens=5
    )
    assert [c["text"] for c in got["choices"]] == want


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streaming_equals_non_streaming(url, path):
    if path.endswith("chat/completions"):
        body = chat_body("Tell me a scary horror story", max_tokens=10)
    else:
        body = {"model": MODEL, "prompt": "Tell me a scary horror story", "max_tokens": 10}
    plain = httpx.post(f"{url}{path}", json=body, headers=auth("kids")).json()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}{path}", json=body, headers=auth("kids")) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    key = "delta" if "chat" in path else None
    pieces = [(c["choices"][0][key].get("content") or "") if key else c["choices"][0]["text"] for c in chunks]
    text = plain["choices"][0]["message"]["content"] if key else plain["choices"][0]["text"]
    assert "".join(pieces) == text
    assert chunks[0]["safety"]["categories"] == plain["safety"]["categories"]  # policy known up front
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["safety"]["refused"] is False
    assert events[-2]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_official_openai_client(url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["venue"], max_retries=0)
    assert MODEL in [m.id for m in client.models.list()]
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Which vape flavour is the smoothest?"}],
        max_tokens=6,
        extra_body={"safety": {"categories": ["addiction"]}},
    )
    assert resp.choices[0].message.content is not None
    assert resp.model_extra["safety"]["categories"] == ["addiction", "betting"]  # venue floor kept
    pieces = []
    stream = client.chat.completions.create(
        model=f"{MODEL}:teen-eu", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    plain = client.chat.completions.create(
        model=f"{MODEL}:teen-eu", messages=[{"role": "user", "content": "hi"}], max_tokens=6
    )
    assert "".join(pieces) == plain.choices[0].message.content
    comp = client.completions.create(model=MODEL, prompt="What is 17 times 23?", max_tokens=4)
    assert comp.choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="valid categories"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"safety": {"categories": ["Sex"]}},
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_openai_client_retrieves_each_listed_model(url):
    """``models.retrieve`` is GET /v1/models/{id}; a profile id holds a colon, which the client sends as is."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["kids"], max_retries=0)
    for listed in client.models.list():
        got = client.models.retrieve(listed.id)
        assert (got.id, got.object, got.owned_by) == (listed.id, "model", "mosaic") and got.created > 0
    with pytest.raises(openai.NotFoundError, match="does not exist") as exc:
        client.models.retrieve(f"{MODEL}:no-such-profile")
    assert exc.value.body["type"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.retrieve(MODEL)


def test_openai_fields_the_server_does_not_use_are_ignored_as_documented(url):
    """docs/serving.md: tools, response_format and logprobs are accepted and ignored; a tool message is a 400."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["kids"], max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    resp = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        tools=[tool],
        tool_choice="auto",
        response_format={"type": "json_object"},
        logprobs=True,
        top_logprobs=2,
        user="u-1",
    )
    choice = resp.choices[0]
    assert (
        choice.message.tool_calls is None and choice.logprobs is None and choice.message.content is not None
    )
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    turns = [
        *messages,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=turns, max_tokens=4)


def test_metrics_count_requests_tokens_and_latency(url):
    before = httpx.get(f"{url}/metrics").text
    httpx.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens=3), headers=auth("kids"))
    text = httpx.get(f"{url}/metrics").text
    assert "# TYPE mosaic_requests_total counter" in text
    assert "# TYPE mosaic_refusals_total counter" in text

    def value(body: str, prefix: str) -> float:
        lines = [line for line in body.splitlines() if line.startswith(prefix)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    ok = 'mosaic_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert value(text, ok) == value(before, ok) + 1
    assert value(text, "mosaic_completion_tokens_total") > value(before, "mosaic_completion_tokens_total")
    count = 'mosaic_request_latency_seconds_count{endpoint="/v1/chat/completions"}'
    assert value(text, count) >= 1
    assert 'mosaic_policy_requests_total{policy="addiction,alcohol,betting,horror,sex"}' in text
    assert value(text, "mosaic_requests_in_flight") == 0


def test_stop_strings_cut_the_text(url):
    plain = httpx.post(
        f"{url}/v1/chat/completions", json=chat_body(max_tokens=12), headers=auth("adult")
    ).json()
    text = plain["choices"][0]["message"]["content"]
    stop = text[3:5]
    assert stop and text.find(stop) >= 0
    cut = httpx.post(
        f"{url}/v1/chat/completions", json=chat_body(max_tokens=12, stop=[stop]), headers=auth("adult")
    ).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_cli_serve_is_registered_and_fails_cleanly(tmp_path):
    from typer.testing import CliRunner

    from mosaic_safety.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--profiles" in result.output and "--max-concurrency" in result.output
    result = runner.invoke(app, ["serve", "--artifact", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    bad = tmp_path / "profiles.yaml"
    bad.write_text("profiles: {kids: [Alcohol]}\n")
    result = runner.invoke(
        app, ["serve", "--method", "none", "--model", "tiny-random-llama", "--profiles", str(bad)]
    )
    assert result.exit_code == 2 and "unknown category 'Alcohol'" in result.output
    # A missing profiles file is reported before anything is loaded (here: before the missing artifact).
    result = runner.invoke(
        app, ["serve", "--artifact", str(tmp_path / "missing"), "--profiles", str(tmp_path / "nope.yaml")]
    )
    assert result.exit_code == 2 and "profiles file" in result.output and "nope.yaml" in result.output


def test_in_context_rules_keep_the_clients_system_message(tiny_backbone):
    from mosaic_safety.methods.controlled_method import in_context_rules
    from mosaic_safety.policy import Policy
    from mosaic_safety.serving.cli import build_server

    server = build_server(method="in_context", backbone=tiny_backbone, model_name="m")
    conversation = [
        {"role": "system", "content": "Always answer in French."},
        {"role": "user", "content": "hi"},
    ]
    policy = Policy.parse("alcohol", server.registry)
    messages, _ = server._rewrite(conversation, policy)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert (
        messages[0]["content"] == in_context_rules(server.registry, policy) + "\n\nAlways answer in French."
    )
    assert server._rewrite(conversation, Policy(()))[0] == conversation  # no rules: as sent


# --- behaviour a mutation audit found unpinned: engine.py / app.py ------------------------


def test_prompt_tokens_count_the_control_positions(live):
    """``usage.prompt_tokens`` is every position the prompt occupies, the policy's control vectors
    included (they take context like text does): the kids floor costs its block length more than
    no policy at all, and the count is the encoded row's length."""
    url, server = live
    model = server.method.model
    messages = [{"role": "user", "content": "What is 17 times 23?"}]
    got = {}
    for who in ("adult", "kids"):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers=auth(who))
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        policy = Policy(tuple(r.json()["safety"]["categories"]))
        batch = model.encode([messages], [policy])
        assert usage["prompt_tokens"] == int(batch.attention_mask[0].sum())
        got[who] = usage["prompt_tokens"]
    kids = Policy(("addiction", "alcohol", "betting", "horror", "sex"))
    assert model.block_length(kids) > 0
    assert got["kids"] - got["adult"] == model.block_length(kids)


def test_the_earliest_stop_string_wins(live):
    """With several stop strings the text ends before the one that starts first, whichever is
    listed first: ``stop=["o w", "lo w"]`` on "hello world" gives "hel"."""
    url, _ = live
    body = chat_body("Plan a trip to Lisbon", max_tokens=24)
    full = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth("adult")).json()
    text = full["choices"][0]["message"]["content"]
    # two stop strings ending at the same character, the longer starting one earlier; neither
    # occurs before: both become visible with the same token
    end = next(
        b
        for b in range(6, len(text))
        if text.find(text[b - 5 : b]) == b - 5 and text.find(text[b - 4 : b]) == b - 4
    )
    longer, shorter = text[end - 5 : end], text[end - 4 : end]
    for stream in (False, True):
        req = {**body, "stop": [shorter, longer]}
        if not stream:
            r = httpx.post(f"{url}/v1/chat/completions", json=req, headers=auth("adult")).json()
            assert r["choices"][0]["message"]["content"] == text[: end - 5]
            assert r["choices"][0]["finish_reason"] == "stop"
        else:
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json={**req, "stream": True}, headers=auth("adult")
            ) as s:
                events = _sse_events(s)
            chunks = [e for e in events if e != "[DONE]" and e["choices"]]
            pieces = [e["choices"][0]["delta"].get("content", "") for e in chunks]
            assert "".join(pieces) == text[: end - 5]


def test_a_stop_string_the_last_flush_shows_finishes_with_stop(url):
    """A budget-cut answer that ends inside a character is decoded once more at the end; a stop
    string that only this flush makes visible still cuts the text, and the choice finished because
    of it ("stop", as OpenAI and vLLM report it), not "length", streamed or not."""
    full = None
    for i in range(40):  # the first prompt whose answer the budget cuts inside a character
        body = chat_body(f"question {i}", max_tokens=8)
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth("adult")).json()
        text = r["choices"][0]["message"]["content"]
        if r["choices"][0]["finish_reason"] == "length" and len(text) > 2 and text.endswith("\ufffd"):
            full = text
            break
    assert full is not None
    stop = full[-2:]  # visible only once the trailing incomplete character is flushed
    expected = full[: full.find(stop)]
    cut = httpx.post(
        f"{url}/v1/chat/completions", json={**body, "stop": [stop]}, headers=auth("adult")
    ).json()
    assert cut["choices"][0]["message"]["content"] == expected
    assert cut["choices"][0]["finish_reason"] == "stop"
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={**body, "stop": [stop], "stream": True},
        headers=auth("adult"),
    ) as s:
        events = [e for e in _sse_events(s) if e != "[DONE]" and e["choices"]]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
