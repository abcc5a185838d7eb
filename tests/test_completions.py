"""/v1/completions (raw prompts, echo with prompt logprobs), n > 1 choices on one prefill, /tokenize and
/detokenize, through the official openai client against a real server."""

from __future__ import annotations

import httpx
import openai
import pytest

from minicpmv.engine.sampling import SamplingParams
from tests.tiny import KEY, REAL, eventually, reference_checkpoint

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def client(live_server):
    return live_server.client


def auth(live_server) -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def tokenize(live_server, **body):
    r = httpx.post(live_server.url + "/tokenize", json={"model": "tiny", **body}, headers=auth(live_server), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_prompt_logprobs_equal_the_chat_paths_logprobs(live_server, client):
    llm = live_server.llm
    chat = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=4, logprobs=0, prompt_logprobs=0))[0]
    assert chat.prompt_logprobs[0] is None and len(chat.prompt_logprobs) == chat.usage.prompt_tokens
    prompt = tokenize(live_server, messages=MESSAGES)["tokens"]
    assert prompt == llm.prepare(MESSAGES, None, llm.default_options).prompt_ids
    ids = prompt + chat.token_ids
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scored = lp.token_logprobs[len(prompt) : len(ids)]
    assert scored == pytest.approx([e.logprob for e in chat.logprobs], abs=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert out.choices[0].text.startswith(llm.processor.tokenizer.decode(ids))
    assert lp.text_offset[1] == len(lp.tokens[0])
    # what the HTTP chat route reports for the same tokens agrees too
    http_chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True)
    assert [c.logprob for c in http_chat.choices[0].logprobs.content] == pytest.approx(scored, abs=1e-4)


def test_string_prompt_stream_and_non_stream_agree_with_stop_and_several_prompts(live_server, client):
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    whole = client.completions.create(prompt="Once upon a time", **kw)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(prompt="Once upon a time", stream=True, logprobs=0, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == 6
    two = client.completions.create(prompt=["Once upon a time", "The sky is"], **kw)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == whole.choices[0].text
    assert two.usage.completion_tokens == 12
    streamed = list(client.completions.create(prompt=["Once upon a time", "The sky is"], stream=True, **kw))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == two.choices[i].text
    stop = client.completions.create(prompt="x", model="tiny", max_tokens=20, extra_body={"test_output": "red, green; blue"}, stop=[";"])
    assert stop.choices[0].text == "red, green" and stop.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_n4_returns_four_choices_and_prefills_the_prompt_once(live_server, client, route):
    engine = live_server.llm.engine
    before = engine.stats().prefilled_tokens
    kw = dict(model="tiny", max_tokens=5, temperature=1.0, seed=7, n=4)
    if route == "chat":
        out = client.chat.completions.create(messages=[{"role": "user", "content": f"n=4 via {route}"}], **kw)
        texts = [c.message.content for c in out.choices]
    else:
        out = client.completions.create(prompt=f"n=4 via {route}", **kw)
        texts = [c.text for c in out.choices]
    prefilled = engine.stats().prefilled_tokens - before
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert prefilled == out.usage.prompt_tokens  # once, not four times
    assert out.usage.completion_tokens == 20
    assert len(set(texts)) > 1  # each choice samples on its own


def test_n_streamed_chunks_name_their_choice(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=1.0, n=3,
                                                 stream=True, stream_options={"include_usage": True}))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2] and chunks[-1].usage.completion_tokens == 9
    comp = list(client.completions.create(model="tiny", prompt="abc", max_tokens=3, n=2, stream=True, echo=True))
    assert {c.choices[0].index for c in comp} == {0, 1}
    assert all("".join(c.choices[0].text for c in comp if c.choices[0].index == i).startswith("abc") for i in (0, 1))


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "n": 9}, "n"),
    ({"prompt": [10**7]}, "prompt"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": []}, "prompt"),
])
def test_bad_completion_requests_are_400_naming_the_field(live_server, body, param):
    r = httpx.post(live_server.url + "/v1/completions", json={"model": "tiny", **body},
                   headers=auth(live_server), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_n_over_the_limit_is_400(client):
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=9)


def test_tokenize_and_detokenize(live_server):
    out = tokenize(live_server, prompt="Hello world", return_token_strs=True)
    assert out["count"] == len(out["tokens"]) and "".join(out["token_strs"]) == "Hello world"
    r = httpx.post(live_server.url + "/detokenize", json={"model": "tiny", "tokens": out["tokens"]}, headers=auth(live_server))
    assert r.json() == {"prompt": "Hello world"}
    bad = httpx.post(live_server.url + "/detokenize", json={"tokens": [-1]}, headers=auth(live_server))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(live_server.url + "/tokenize", json={"prompt": "a", "messages": MESSAGES}, headers=auth(live_server))
    assert both.status_code == 400
    assert httpx.post(live_server.url + "/tokenize", json={"prompt": "a"}).status_code == 401


def test_prompt_logprobs_over_a_chunked_prefill_match_transformers(tiny_dir):
    import torch

    from minicpmv.engine.engine import EngineConfig
    from minicpmv.engine.sequence import Sequence
    from minicpmv.llm import LLM
    ref, _ = reference_checkpoint("base", REAL)
    llm = LLM(tiny_dir, dtype="float32", progress=False, engine_config=EngineConfig(max_num_batched_tokens=7))
    try:
        ids = llm.processor.tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over, and then once more for luck.")
        seq = Sequence(ids, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))
        list(llm.outputs(seq))
        with torch.no_grad():
            expected = ref(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(ids) > 14  # 3+ chunks
        got = [e.logprob for e in seq.prompt_logprobs[1:]]
        want = [float(expected[i, t]) for i, t in enumerate(ids[1:])]
        assert got == pytest.approx(want, abs=1e-4)
        assert seq.prompt_logprobs[5].top_ids == expected[4].topk(3).indices.tolist()
    finally:
        llm.close()


def test_aborting_a_request_with_n_choices_ends_every_choice(live_server):
    from minicpmv.engine.sequence import Status

    llm = live_server.llm
    seq = llm.prepare(MESSAGES, SamplingParams(temperature=1.0, max_tokens=500, ignore_eos=True), llm.default_options)
    seq.forks = [seq.fork() for _ in range(2)]
    outputs = llm.outputs(seq)
    seen = {next(outputs).seq.request_id for _ in range(6)}
    assert len(seen) > 1  # the choices run side by side
    outputs.close()  # leaving early aborts the request
    assert eventually(lambda: all(s.status == Status.FINISHED and s.state is None for s in (seq, *seq.forks)))
    assert {s.finish_reason for s in (seq, *seq.forks)} == {"abort"}


def test_lm_eval_harness_loglikelihood_payload(live_server, client):
    """local-completions' loglikelihood request (batched token-id prompts, echo, max_tokens=1) read its way."""
    tok = live_server.llm.processor.tokenizer
    context, continuation = tok.encode("The capital of France is"), tok.encode(" Paris")
    other = tok.encode("Two plus two is") + tok.encode(" four")
    out = client.completions.create(model="tiny", prompt=[context + continuation, other], temperature=0, max_tokens=1,
                                    logprobs=1, seed=1234, echo=True)
    assert [c.index for c in out.choices] == [0, 1]
    lp = out.choices[0].logprobs
    scored = lp.token_logprobs[len(context):-1]  # lm-eval's slice: the continuation, not the generated token
    assert len(scored) == len(continuation) and all(v <= 0 for v in scored)
    is_greedy = all(tok_str == max(top, key=top.get) for tok_str, top in zip(lp.tokens[len(context):-1], lp.top_logprobs[len(context):-1]))
    from minicpmv.engine.sequence import Sequence

    seq = Sequence(context + continuation, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    list(live_server.llm.outputs(seq))
    assert scored == pytest.approx([e.logprob for e in seq.prompt_logprobs[len(context):]], abs=1e-5)
    assert is_greedy == all(e.rank == 1 for e in seq.prompt_logprobs[len(context):])
