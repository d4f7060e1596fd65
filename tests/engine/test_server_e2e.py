"""`vllm serve MODEL --speculative-model medusa:HEADS` (and the
`--speculative-config` JSON form), as a user runs it: real HTTP servers on
127.0.0.1 queried with the `openai` client, our servers' answers compared with
a vanilla server's for the same model and requests; bad requests get a 4xx
naming the problem and the server keeps serving.

One vanilla server and our two forms run for the whole module."""

from __future__ import annotations

import json
import threading

import openai
import pytest

from tests.engine.servers import log_dir, metric, metrics_text, tiny_model_and_heads, vllm_servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

MAX_LEN = 512  # --max-model-len of every server (servers.BASE_FLAGS)
PROMPTS = ["The quick brown fox", "Medusa adds extra decoding heads", "0 1 2 3 4",
           "Once upon a time, there was", "def hello(name):\n"]
CHATS = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "1 2 3"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital"}]]
OURS = ("cli", "json")  # --speculative-model medusa:HEADS / --speculative-config '{...}'


@pytest.fixture(scope="module")
def served():
    """{"vanilla" | "cli" | "json": (Server, openai.OpenAI)} and the model path."""
    root = log_dir("served")
    model, heads = tiny_model_and_heads()
    spec_json = json.dumps({"method": "medusa_tree", "model": str(heads), "tree": "sparse-16"})
    specs = [(model, root / "vanilla.log"),
             (model, root / "cli.log", "--speculative-model", f"medusa:{heads}"),
             (model, root / "json.log", "--speculative-config", spec_json)]
    with vllm_servers(*specs) as servers:
        clients = {name: (s, openai.OpenAI(base_url=s.v1, api_key="unused", timeout=900,
                                           max_retries=0))
                   for name, s in zip(("vanilla", *OURS), servers)}
        yield clients, str(model)


def _client(served, name):
    return served[0][name][1]


def _complete(client, model, prompt, **kw):
    kw.setdefault("max_tokens", 32)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=prompt,
                                     extra_body={"ignore_eos": True, **kw.pop("extra_body", {})},
                                     **kw)


def _greedy_text(client, model, prompt, max_tokens=32):
    r = _complete(client, model, prompt, max_tokens=max_tokens)
    assert r.usage.completion_tokens == max_tokens
    return r.choices[0].text


@pytest.fixture(scope="module")
def vanilla_answers(served):
    """Vanilla's greedy completions and chat answers (computed once)."""
    client, model = _client(served, "vanilla"), served[1]
    return {
        "completions": [_greedy_text(client, model, p) for p in PROMPTS],
        "chats": [client.chat.completions.create(model=model, messages=m, max_tokens=24,
                                                 temperature=0).choices[0].message.content
                  for m in CHATS],
    }


@pytest.mark.parametrize("ours", OURS)
def test_greedy_completions_and_chats_equal_vanilla(served, vanilla_answers, ours):
    client, model = _client(served, ours), served[1]
    assert [_greedy_text(client, model, p) for p in PROMPTS] == vanilla_answers["completions"]
    chats = [client.chat.completions.create(model=model, messages=m, max_tokens=24, temperature=0)
             for m in CHATS]
    assert [c.choices[0].message.content for c in chats] == vanilla_answers["chats"]
    assert all(c.choices[0].finish_reason in ("stop", "length") for c in chats)


@pytest.mark.parametrize("ours", OURS)
def test_streamed_chunks_reassemble_to_the_greedy_text(served, vanilla_answers, ours):
    client, model = _client(served, ours), served[1]
    for i in (0, 3):
        stream = _complete(client, model, PROMPTS[i], stream=True)
        chunks = [c.choices[0].text for c in stream if c.choices]
        assert len(chunks) > 1, "one chunk: nothing was streamed"
        assert "".join(chunks) == vanilla_answers["completions"][i]
    stream = client.chat.completions.create(model=model, messages=CHATS[0], max_tokens=24,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == vanilla_answers["chats"][0]


def _shape(r):
    """What a sampled n>1 answer looks like, not its text."""
    return sorted((c.index, c.finish_reason) for c in r.choices), r.usage.completion_tokens


def test_n_sampled_with_seed_answers_like_vanilla(served):
    model = served[1]
    shapes = {}
    for name in ("vanilla", *OURS):
        client = _client(served, name)
        r = _complete(client, model, PROMPTS[1], n=3, temperature=0.8, seed=7, max_tokens=20)
        assert all(c.text for c in r.choices)
        chat = client.chat.completions.create(model=model, messages=CHATS[1], n=2, temperature=0.9,
                                              seed=3, max_tokens=12)
        shapes[name] = (_shape(r), sorted(c.index for c in chat.choices))
    assert shapes["cli"] == shapes["json"] == shapes["vanilla"]
    assert shapes["vanilla"] == (([(0, "length"), (1, "length"), (2, "length")], 60), [0, 1])


def _completion_logprobs(client, model):
    r = _complete(client, model, PROMPTS[1], max_tokens=12, logprobs=3)
    lp = r.choices[0].logprobs
    return list(lp.tokens), list(lp.token_logprobs), [dict(d) for d in lp.top_logprobs]


def _chat_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=CHATS[0], max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    return ([t.token for t in content], [t.logprob for t in content],
            [{a.token: a.logprob for a in t.top_logprobs} for t in content])


@pytest.mark.parametrize("ask", [_completion_logprobs, _chat_logprobs])
def test_greedy_logprobs_equal_vanilla(served, ask):
    model = served[1]
    tokens, values, tops = ask(_client(served, "vanilla"), model)
    # (tops are keyed by token text: two byte tokens with the same text make one entry)
    assert len(tokens) == len(tops) and all(1 <= len(t) <= 3 for t in tops)
    assert sum(len(t) == 3 for t in tops) >= len(tops) // 2
    for ours in OURS:
        o_tokens, o_values, o_tops = ask(_client(served, ours), model)
        assert o_tokens == tokens
        assert o_values == pytest.approx(values, abs=1e-3)
        for mine, theirs in zip(o_tops, tops):
            assert list(mine) == list(theirs)  # the same top tokens, in the same order
            assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-3)


@pytest.mark.parametrize("ours", OURS)
def test_acceptance_figures_on_metrics(served, ours):
    server, client = served[0][ours]
    model = served[1]
    _greedy_text(client, model, PROMPTS[2], max_tokens=48)
    metrics = metrics_text(server.base)
    drafts = metric(metrics, "vllm:spec_decode_num_drafts_total")
    accepted = metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0, "no speculative steps"
    assert accepted > 0, "nothing accepted"
    assert metric(metrics, "vllm:spec_decode_num_draft_tokens_total") >= accepted
    assert metric(metrics, "vllm:spec_decode_num_accepted_tokens_per_pos_total") == accepted
    assert "medusa_tree" in server.log(), "the server log does not show the Medusa tree plugin"
    vanilla = metrics_text(served[0]["vanilla"][0].base)
    assert metric(vanilla, "vllm:spec_decode_num_drafts_total", required=False) == 0


def test_typical_acceptance_per_request(served):
    client, model = _client(served, "cli"), served[1]
    r = _complete(client, model, PROMPTS[0], max_tokens=16, temperature=0.7,
                  extra_body={"vllm_xargs": {"medusa_acceptance": "typical",
                                             "medusa_posterior_threshold": 0.2,
                                             "medusa_posterior_alpha": 0.1}})
    assert r.usage.completion_tokens == 16


# ----------------------------------------------------------------- bad requests
def _long_prompt(tokens):
    """A text prompt of at least ``tokens`` tokens (each space-separated number is
    one pre-tokenizer word, so at least one token)."""
    return " ".join(str(i) for i in range(tokens))


BAD_XARGS = {
    # name: (vllm_xargs, phrases the 400's message must contain)
    "epsilon_above_one": ({"medusa_posterior_threshold": 1.5}, ["medusa_posterior_threshold", "1.5"]),
    "epsilon_negative": ({"medusa_posterior_threshold": -0.1}, ["medusa_posterior_threshold"]),
    "epsilon_not_a_number": ({"medusa_posterior_threshold": "high"},
                             ["medusa_posterior_threshold", "high"]),
    "delta_not_a_number": ({"medusa_posterior_alpha": "low"}, ["medusa_posterior_alpha", "low"]),
    "delta_negative": ({"medusa_posterior_alpha": -1}, ["medusa_posterior_alpha"]),
    "unknown_acceptance": ({"medusa_acceptance": "fast"}, ["medusa_acceptance", "fast", "typical"]),
    "unknown_medusa_key": ({"medusa_treee": "sparse-16"}, ["medusa_treee", "unknown"]),
}


def _bad(call):
    with pytest.raises(openai.APIStatusError) as err:
        call()
    status = err.value.status_code
    assert 400 <= status < 500, f"status {status}: {err.value}"
    return str(err.value)


@pytest.mark.parametrize("case", list(BAD_XARGS))
def test_bad_medusa_override_is_a_4xx_naming_it(served, vanilla_answers, case):
    xargs, phrases = BAD_XARGS[case]
    client, model = _client(served, "cli"), served[1]
    calls = [
        lambda: _complete(client, model, PROMPTS[0], temperature=0.8,
                          extra_body={"vllm_xargs": xargs}),
        lambda: list(_complete(client, model, PROMPTS[0], temperature=0.8, stream=True,
                               extra_body={"vllm_xargs": xargs})),
        lambda: client.chat.completions.create(model=model, messages=CHATS[0], max_tokens=8,
                                               extra_body={"vllm_xargs": xargs}),
    ]
    for call in calls:
        msg = _bad(call)
        for phrase in phrases:
            assert phrase in msg, f"{phrase!r} not in {msg!r}"
    assert _greedy_text(client, model, PROMPTS[0]) == vanilla_answers["completions"][0]


def test_bad_prompts_and_lengths_are_4xx_naming_them(served, vanilla_answers):
    client, model = _client(served, "cli"), served[1]
    long_prompt = _long_prompt(MAX_LEN + 50)
    cases = {
        "empty prompt": (lambda: _complete(client, model, ""), ["prompt", "empty"]),
        "max_tokens beyond the context": (
            lambda: _complete(client, model, PROMPTS[0], max_tokens=MAX_LEN + 100),
            ["max_tokens", str(MAX_LEN)]),
        "prompt longer than the context": (
            lambda: _complete(client, model, long_prompt, max_tokens=4), [str(MAX_LEN), "context"]),
        "chat longer than the context": (
            lambda: client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": long_prompt}], max_tokens=4),
            [str(MAX_LEN)]),
    }
    for name, (call, phrases) in cases.items():
        msg = _bad(call)
        for phrase in phrases:
            assert phrase in msg.lower() or phrase in msg, f"{name}: {phrase!r} not in {msg!r}"
    assert _greedy_text(client, model, PROMPTS[1]) == vanilla_answers["completions"][1]


def test_bad_requests_while_others_run_do_not_disturb_them(served, vanilla_answers):
    """Bad requests arriving while greedy streams are mid-flight: every stream
    completes with vanilla's text, and the server keeps serving."""
    client, model = _client(served, "cli"), served[1]
    expected = {i: _greedy_text(_client(served, "vanilla"), model, PROMPTS[i], max_tokens=160)
                for i in range(3)}
    texts: dict[int, str] = {}

    def run(i):
        stream = _complete(client, model, PROMPTS[i], max_tokens=160, stream=True)
        texts[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in expected]
    for t in threads:
        t.start()
    for xargs, _ in BAD_XARGS.values():
        _bad(lambda x=xargs: _complete(client, model, PROMPTS[3], temperature=0.5,
                                       extra_body={"vllm_xargs": x}))
    _bad(lambda: _complete(client, model, ""))
    for t in threads:
        t.join(300)
    assert texts == expected
    assert _greedy_text(client, model, PROMPTS[4]) == vanilla_answers["completions"][4]
    assert served[0]["cli"][0].alive()
