"""LoRA adapters against transformers + peft: fp32 logits and greedy tokens (language and vision targets), the
packed bf16 / int8 / int4 paths, adapters mixed in one batch, merging, caches, and adapters that do not fit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from minicpmv.checkpoint import load_model
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import InvalidInputError
from minicpmv.llm import LLM
from minicpmv.model import lora
from tests.tiny import LM_TARGETS, SMALL, VISION_TARGETS, from_patches, peft_adapter, reference_checkpoint

TOL = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
ATTENTION_MLP = r"^model\.language_model\..*\.(q_proj|v_proj|o_proj|gate_proj|down_proj)$"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> (directory, reference + peft model): every LM linear type; attention+MLP with rsLoRA saved as
    .bin; the vision tower and merger plus the LM; a small-weight one for the bf16 paths."""
    root = tmp_path_factory.mktemp("adapters")
    made = {
        "all": peft_adapter(root / "all", LM_TARGETS, r=4, alpha=8, seed=1),
        "rs": peft_adapter(root / "rs", ATTENTION_MLP, r=8, alpha=4, seed=2, use_rslora=True, safe_serialization=False),
        "vision": peft_adapter(root / "vision", f"{LM_TARGETS}|{VISION_TARGETS}", r=2, alpha=4, seed=3, std=0.15),
        "small": peft_adapter(root / "small", f"{LM_TARGETS}|{VISION_TARGETS}", r=4, alpha=8, seed=4, std=0.1),
    }
    return {name: (root / name, model) for name, model in made.items()}


@pytest.fixture(scope="module")
def llm(tiny_dir, adapters):
    names = ("all", "rs", "vision")
    return LLM(tiny_dir, dtype="float32", progress=False, lora_modules={n: adapters[n][0] for n in names})


def image(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def conversation(with_image: bool = False, text: str = "Name the colour.", seed: int = 7):
    content = ([{"type": "image", "image": image(224, 224, seed)}] if with_image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def reference_logits(model, ids: list[int], seq=None) -> torch.Tensor:
    kwargs = {}
    if seq is not None and seq.visuals:
        v = seq.visuals[0]
        kwargs = {"pixel_values": from_patches(v.pixel_values), "target_sizes": v.target_sizes, "downsample_mode": v.downsample_mode}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)[None], **kwargs).logits[0]


def our_logits(llm, seq, key):
    """Our fp32 logits of every prompt token with adapter ``key``, through the LLM's model and registry."""
    model = llm.model
    features = None
    if seq.visuals:
        v = seq.visuals[0]
        with llm.lora.activate([key], [v.pixel_values.shape[0]]):
            features = model.encode_images(v.pixel_values, v.target_sizes, v.downsample_mode)
    with llm.lora.activate([key], [seq.num_prompt]):
        return model(torch.tensor(seq.prompt_ids), [model.new_state()], image_features=features, all_logits=True)


def reference_greedy(model, ids: list[int], seq, n: int) -> list[int]:
    kwargs = {}
    if seq.visuals:
        v = seq.visuals[0]
        kwargs = {"pixel_values": from_patches(v.pixel_values), "target_sizes": v.target_sizes, "downsample_mode": v.downsample_mode}
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids)[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name,with_image", [("all", False), ("rs", False), ("vision", True)])
def test_logits_and_greedy_tokens_match_transformers_and_peft(llm, adapters, name, with_image):
    _, reference = adapters[name]
    options = llm._conversations(conversation(with_image), {"lora": name})[0][1]
    seq = llm.prepare(conversation(with_image), None, options)
    assert seq.lora == llm.lora.key(name)
    expected = reference_logits(reference, seq.prompt_ids, seq)
    got = our_logits(llm, seq, seq.lora)
    base = our_logits(llm, seq, None)
    assert (got - expected).abs().max().item() <= TOL
    assert (base - expected).abs().max().item() > 0.1  # the adapter matters: this test can fail
    tokens = llm.chat(conversation(with_image), GREEDY, lora=name)[0].token_ids
    assert tokens == reference_greedy(reference, seq.prompt_ids, seq, GREEDY.max_tokens)


def test_every_linear_type_is_targeted(adapters, llm):
    adapter = llm.lora.adapters["all"]
    kinds = {m.rsplit(".", 1)[1] for m in adapter.modules}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b",
                     "out_proj", "gate_proj", "up_proj", "down_proj"}
    assert not adapter.touches_vision and llm.lora.adapters["vision"].touches_vision
    assert all(w.b.abs().min() > 0 for w in adapter.modules.values())
    assert llm.lora.adapters["rs"].modules["model.language_model.layers.3.self_attn.q_proj"].scale == pytest.approx(4 / 8**0.5)


def prefill_and_decode(model, path):
    """(logits of a prompt with the adapter, of one decode step after it beside a base row, of the prompt alone)."""
    registry = lora.registry(model)
    key = registry.load("small", path).key
    ids = torch.randint(0, SMALL.text, (40,), generator=torch.Generator().manual_seed(1))
    state = model.new_state()
    with registry.activate([key, None], [40, 1]):
        prefill = model(torch.cat([ids, ids[:1]]), [state, model.new_state()], lengths=[40, 1], all_logits=True)[:40]
    with registry.activate([key, None], [1, 1]):
        decode = model(torch.tensor([5, 6]), [state, model.new_state()], lengths=[1, 1])
    return prefill, decode[0], model(ids, [model.new_state()], all_logits=True)


@pytest.fixture(scope="module")
def fp32_small(adapters):
    return prefill_and_decode(load_model(reference_checkpoint("base")[1], dtype="float32"), adapters["small"][0])


@pytest.mark.parametrize("quant,tol", [(None, 0.05), ("int8", 0.08), ("int4", 0.5)])
def test_packed_fast_path_applies_the_adapter(adapters, fp32_small, quant, tol):
    """bf16 / int8 / int4 packed kernels plus the low-rank products: the fp32 result up to the format's noise."""
    model = load_model(reference_checkpoint("base")[1], dtype="bfloat16", quantization=quant)
    (f_pre, f_dec, f_base), (p_pre, p_dec, p_base) = fp32_small, prefill_and_decode(model, adapters["small"][0])
    effect = (f_pre - f_base).abs().mean()
    assert effect > 0.1  # the adapter's effect; errors below are relative to it
    assert ((p_pre - p_base) - (f_pre - f_base)).abs().mean() <= tol * effect
    assert (p_dec - f_dec).abs().mean() <= tol * effect + (p_base[-1] - f_base[-1]).abs().mean()


def test_base_and_two_adapters_in_one_batch_give_their_tokens_alone(llm):
    convs = [{"messages": conversation(text=f"Question {i}"), "lora": name}
             for i, name in enumerate([None, "all", "rs", "all"])]
    together = [r.token_ids for r in llm.chat(convs, GREEDY)]
    alone = [llm.chat(c["messages"], GREEDY, lora=c["lora"])[0].token_ids for c in convs]
    assert together == alone
    assert len({tuple(t) for t in together[:3]}) == 3  # base and both adapters differ


def test_bf16_packed_batch_mixes_adapters_like_each_alone(tiny_dir, adapters):
    """Through the LLM on the packed bf16 model: decode steps with adapter rows run in the fused decode kernel,
    a mixed batch gives each conversation its tokens alone, and those are the layer-by-layer path's tokens."""
    llm = LLM(tiny_dir, dtype="bfloat16", progress=False,
              lora_modules={"small": adapters["small"][0], "rs": adapters["rs"][0]})
    lm = llm.model.model.language_model
    decoder = lm.fused_decode
    convs = [{"messages": conversation(with_image=i == 1, text=f"Question {i}"), "lora": name}
             for i, name in enumerate([None, "small", "rs", "small"])]
    together = [r.token_ids for r in llm.chat(convs, GREEDY)]
    assert decoder.lora_steps >= GREEDY.max_tokens - 1  # every decode step of the batch, fused
    alone = [llm.chat(c["messages"], GREEDY, lora=c["lora"])[0].token_ids for c in convs]
    assert together == alone
    steps = decoder.steps
    lm.fused_decode = None  # the layer-by-layer path, the low-rank products in LoRALinear
    try:
        unfused = [r.token_ids for r in llm.chat(convs, GREEDY)]
    finally:
        lm.fused_decode = decoder
    assert decoder.steps == steps and unfused == together


def prefilled(model, registry, keys, prompts):
    """A state per prompt, prefilled (layer by layer) with its adapter."""
    states = []
    for key, ids in zip(keys, prompts):
        states.append(model.new_state())
        with registry.activate([key], [len(ids)]):
            model(ids, states[-1:])
    return states


def decode_logits(model, registry, keys, states, tokens, fused=True):
    """One decode step of copies of ``states`` (each one token) with adapters ``keys``: logits [len(keys), vocab]."""
    lm = model.model.language_model
    decoder, states = lm.fused_decode, [s.clone() for s in states]
    if not fused:
        lm.fused_decode = None
    try:
        with registry.activate(keys, [1] * len(keys)):
            return model(tokens, states, lengths=[1] * len(keys))
    finally:
        lm.fused_decode = decoder


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_adapter_rows_decode_in_the_fused_step(adapters, quant):
    """Packed bf16 / int8 / int4 models (float32 ones have no fused step: their layers are the reference's): a
    decode step with the base and two adapters (every LM linear type; attention + MLP with rsLoRA) runs in the one
    kernel call, gives the layer-by-layer path's logits within bf16 noise (mean |diff| <= 0.005, max <= 0.03, where
    the adapters change them by > 0.1 on average), and gives each row what it gets alone: the same bits (int4:
    within the same bf16 noise; its tiles of 1-2 rows sum in another order)."""
    model = load_model(reference_checkpoint("base")[1], dtype="bfloat16", quantization=quant)
    registry = lora.registry(model)
    keys = [None, registry.load("small", adapters["small"][0]).key, registry.load("rs", adapters["rs"][0]).key]
    decoder = model.model.language_model.fused_decode
    assert decoder is not None and set(registry.tables) == set(keys[1:])
    g = torch.Generator().manual_seed(5)
    states = prefilled(model, registry, keys, [torch.randint(0, SMALL.text, (n,), generator=g) for n in (7, 12, 5)])
    tokens = torch.tensor([5, 6, 7])
    steps, lora_steps = decoder.steps, decoder.lora_steps
    fused = decode_logits(model, registry, keys, states, tokens)
    assert (decoder.steps, decoder.lora_steps) == (steps + 1, lora_steps + 1)
    unfused = decode_logits(model, registry, keys, states, tokens, fused=False)
    assert decoder.steps == steps + 1
    base = decode_logits(model, registry, [None] * 3, states, tokens)
    assert (fused - base)[1:].abs().mean(-1).min() > 0.1 and torch.equal(fused[0], base[0])
    diff = (fused - unfused).abs()
    assert diff.mean() <= 0.005 and diff.max() <= 0.03
    alone = torch.cat([decode_logits(model, registry, [key], [state], tokens[i : i + 1])
                       for i, (key, state) in enumerate(zip(keys, states))])
    if quant == "int4":  # (the base's rows too: 1-2 rows sum each int4 group in two halves, more in one)
        assert (fused - alone).abs().mean() <= 0.005 and (fused - alone).abs().max() <= 0.03
    else:
        assert torch.equal(fused, alone)
    assert decoder.lora_steps == lora_steps + 3  # the lone adapter rows too


def test_prefix_and_vision_caches_are_kept_per_adapter(llm):
    first = conversation(with_image=True, text="Cache test.", seed=8)
    base = llm.chat(first, GREEDY)[0]
    second = first + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "And now?"}]
    cached_base = llm.chat(second, GREEDY)[0]
    assert cached_base.usage.cached_tokens > 0
    encoded = llm.engine.runner.encoded
    with_adapter = llm.chat(second, GREEDY, lora="vision")[0]
    assert with_adapter.usage.cached_tokens == 0  # the base's states are not the adapter's
    assert llm.engine.runner.encoded == encoded + 1  # it touches the vision tower: its own features
    llm.chat(second, GREEDY, lora="all")
    assert llm.engine.runner.encoded == encoded + 1  # a language-only adapter shares the base's features
    llm.engine.prefix_cache.clear()
    llm.engine.vision_cache.clear()
    assert llm.chat(second, GREEDY, lora="vision")[0].token_ids == with_adapter.token_ids


def test_merged_adapter_equals_unmerged(tiny_dir, adapters, llm):
    merged = LLM(tiny_dir, dtype="float32", progress=False, merge_lora=adapters["all"][0])
    for text in ("one", "two"):
        assert merged.chat(conversation(text=text), GREEDY)[0].token_ids == llm.chat(conversation(text=text), GREEDY, lora="all")[0].token_ids


def test_unknown_adapter_name_is_a_typed_error(llm):
    with pytest.raises(InvalidInputError, match="'nope' is not loaded") as info:
        llm.chat(conversation(), GREEDY, lora="nope")
    assert info.value.param == "lora"


def _broken(tmp_path, adapters, edit_tensors=None, edit_config=None):
    source = adapters["all"][0]
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    if edit_tensors:
        from safetensors.torch import load_file, save_file

        file = target / "adapter_model.safetensors"
        tensors = load_file(str(file))
        edit_tensors(tensors)
        save_file(tensors, str(file))
    if edit_config:
        config = json.loads((target / "adapter_config.json").read_text())
        edit_config(config)
        (target / "adapter_config.json").write_text(json.dumps(config))
    return target


PREFIX = "base_model.model.model.language_model.layers.0.linear_attn.in_proj_qkv"


@pytest.mark.parametrize("edit_tensors,edit_config,message", [
    (lambda t: t.update({"base_model.model.model.language_model.layers.0.mlp.nope.lora_A.weight": torch.zeros(4, 64),
                         "base_model.model.model.language_model.layers.0.mlp.nope.lora_B.weight": torch.zeros(64, 4)}),
     None, r"mlp\.nope\.lora_[AB]\.weight'? targets 'model\.language_model\.layers\.0\.mlp\.nope'"),
    (lambda t: t.update({f"{PREFIX}.lora_A.weight": torch.zeros(4, 65)}), None, rf"{PREFIX}\.lora_A\.weight has shape \[4, 65\]"),
    (lambda t: t.update({f"{PREFIX}.lora_B.weight": torch.zeros(3, 4)}), None, rf"{PREFIX}\.lora_B\.weight has shape \[3, 4\]"),
    (lambda t: t.pop(f"{PREFIX}.lora_B.weight"), None, rf"{PREFIX}\.lora_B\.weight is missing"),
    (lambda t: t.update({f"{PREFIX}.lora_magnitude_vector": torch.ones(160)}), None, r"lora_magnitude_vector' is DoRA"),
    (lambda t: t.update({"base_model.model.model.language_model.embed_tokens.lora_embedding_A": torch.ones(4, 9)}), None,
     r"lora_embedding_A' is LoRA on embeddings"),
    (None, lambda c: c.update(use_dora=True), r"use_dora=True is a LoRA variant"),
    (None, lambda c: c.update(peft_type="IA3"), r"peft_type 'IA3' is not supported"),
    (None, lambda c: c.update(init_lora_weights="pissa"), r"init_lora_weights='pissa'"),
])
def test_an_adapter_that_does_not_fit_names_the_problem(tmp_path, adapters, edit_tensors, edit_config, message):
    _, directory = reference_checkpoint("base")
    model = load_model(directory)
    with pytest.raises(lora.AdapterError, match=message):
        lora.load_adapter(_broken(tmp_path, adapters, edit_tensors, edit_config), model)


def test_limits_and_missing_files(tmp_path, adapters, llm):
    with pytest.raises(lora.AdapterError, match="rank 8, above --max-lora-rank 4"):
        lora.Registry(llm.model, max_rank=4).load("rs", adapters["rs"][0])
    with pytest.raises(lora.AdapterError, match="the most --max-loras allows"):
        lora.Registry(llm.model, max_loras=0).load("rs", adapters["rs"][0])
    with pytest.raises(lora.AdapterError, match="already loaded"):
        llm.lora.load("all", adapters["all"][0])
    with pytest.raises(lora.AdapterError, match="adapter_config.json is missing"):
        lora.load_adapter(tmp_path, llm.model)
    with pytest.raises(lora.AdapterError, match="is not a directory"):
        lora.load_adapter(tmp_path / "nowhere", llm.model)


# -- the server ---------------------------------------------------------------------------------------------------
KEY = "lora-key"


@pytest.fixture(scope="module")
def server(tiny_dir, adapters):
    import threading
    import time

    import uvicorn
    from openai import OpenAI

    from minicpmv.serve.app import ServerConfig, create_app

    llm = LLM(tiny_dir, dtype="float32", progress=False, lora_modules={"all": adapters["all"][0]})
    app = create_app(llm, ServerConfig(model_name="tiny", api_key=KEY, enable_lora_loading=True))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    yield llm, url, OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    server.should_exit = True
    thread.join(timeout=30)


def post(url, route, body, key=KEY):
    import httpx2 as httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/{route}", json=body, headers=headers, timeout=60)


def test_server_answers_with_the_adapter_a_request_names(server, adapters):
    llm, url, client = server
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["tiny", "all"] and models["all"].parent == "tiny"
    messages = conversation(text="Server question.")
    seq = llm.prepare(messages, None, llm._conversations(messages, {})[0][1])
    r = client.chat.completions.create(model="all", messages=messages, max_tokens=4, temperature=0, logprobs=True)
    assert r.model == "all"
    expected = reference_greedy(adapters["all"][1], seq.prompt_ids, seq, 4)
    assert r.choices[0].message.content == llm.processor.tokenizer.decode(expected)
    reference = torch.log_softmax(reference_logits(adapters["all"][1], seq.prompt_ids + expected), -1)
    got = [t.logprob for t in r.choices[0].logprobs.content]
    want = [reference[seq.num_prompt - 1 + i, t].item() for i, t in enumerate(expected)]
    assert np.allclose(got, want, atol=1e-4)
    base = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert base.choices[0].message.content != r.choices[0].message.content


def test_adapters_load_and_unload_at_runtime_behind_the_api_key(server, adapters):
    from openai import NotFoundError

    llm, url, client = server
    body = {"lora_name": "rs", "lora_path": str(adapters["rs"][0])}
    assert post(url, "load_lora_adapter", body, key=None).status_code == 401
    ok = post(url, "load_lora_adapter", body)
    assert ok.status_code == 200 and "rs" in ok.text
    assert [m.id for m in client.models.list().data] == ["tiny", "all", "rs"]
    r = client.chat.completions.create(model="rs", messages=conversation(), max_tokens=4, temperature=0)
    seq = llm.prepare(conversation(), None, llm._conversations(conversation(), {})[0][1])
    expected = reference_greedy(adapters["rs"][1], seq.prompt_ids, seq, 4)
    assert r.choices[0].message.content == llm.processor.tokenizer.decode(expected)
    again = post(url, "load_lora_adapter", body)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    bad = post(url, "load_lora_adapter", {"lora_name": "bad", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    assert post(url, "unload_lora_adapter", {"lora_name": "rs"}).status_code == 200
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="rs", messages=conversation(), max_tokens=2)
    gone = post(url, "unload_lora_adapter", {"lora_name": "rs"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
    assert client.chat.completions.create(model="all", messages=conversation(), max_tokens=2).choices[0].message


def test_every_protocol_picks_the_adapter_its_model_names(server):
    """Completions, Responses, Ollama and Anthropic route ``model`` to the adapter as the chat route does."""
    import httpx2 as httpx

    from minicpmv.engine.sampling import SamplingParams

    llm, url, client = server
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "Which colour?"
    chat = lambda model: client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                        max_tokens=4, temperature=0).choices[0].message.content
    adapter, base = chat("all"), chat("tiny")
    assert adapter != base
    answers = {
        "responses": lambda m: post(url, "responses", {"model": m, "input": text, "max_output_tokens": 4,
                                                       "temperature": 0}).json()["output"][-1]["content"][0]["text"],
        "ollama": lambda m: httpx.post(f"{url}/api/chat", timeout=60, headers=auth, json={
            "model": m, "messages": [{"role": "user", "content": text}], "stream": False,
            "options": {"temperature": 0, "num_predict": 4}}).json()["message"]["content"],
        "anthropic": lambda m: post(url, "messages", {"model": m, "max_tokens": 4, "temperature": 0,
                                                      "messages": [{"role": "user", "content": text}]}).json()["content"][0]["text"],
    }
    for name, answer in answers.items():
        assert (answer("all"), answer("tiny")) == (adapter, base), name
    assert answers["ollama"]("all:latest") == adapter
    tags = httpx.get(f"{url}/api/tags", headers=auth, timeout=60).json()["models"]
    assert [(t["name"], t["details"]["parent_model"]) for t in tags] == [("tiny", ""), ("all", "tiny")]
    # raw completions: the adapter's tokens for the same ids
    ids = llm.processor.tokenizer.encode(text)
    seq = llm.prepare_ids(ids, SamplingParams(temperature=0, max_tokens=4), lora="all")
    list(llm.outputs(seq))
    got = post(url, "completions", {"model": "all", "prompt": text, "max_tokens": 4, "temperature": 0}).json()
    assert got["model"] == "all" and got["choices"][0]["text"] == llm.result(seq).text
    for route, body in [("completions", {"prompt": text, "max_tokens": 1}), ("responses", {"input": text}),
                        ("messages", {"max_tokens": 1, "messages": [{"role": "user", "content": text}]})]:
        missing = post(url, route, {"model": "nope", **body})
        assert missing.status_code == 404 and "'all'" in missing.text, route


def test_runtime_loading_is_off_unless_enabled(server):
    from minicpmv.serve.app import ServerConfig, create_app

    llm, _, _ = server
    app = create_app(llm, ServerConfig(model_name="tiny"))
    paths = {getattr(r, "path", None) for r in app.routes}
    assert "/v1/models" in paths and not {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} & paths


def test_cli_lora_flags():
    from minicpmv.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--lora-modules", "a=/x", '{"name": "b", "path": "/y"}',
                                      "--enable-lora-loading", "--max-loras", "2", "--max-lora-rank", "16"])
    assert args.lora_modules == [("a", "/x"), ("b", "/y")] and args.enable_lora_loading
    assert (args.max_loras, args.max_lora_rank, args.merge_lora) == (2, 16, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--lora-modules", "no-equals-sign"])


def test_ray_serve_replicas_get_the_adapters(tmp_path, capsys):
    import pickle

    from minicpmv.cli import _llm_kwargs, build_parser, main

    kwargs = _llm_kwargs(build_parser().parse_args(["serve", "m", "--lora-modules", "a=/x", "--ray-replicas", "2"]))
    assert pickle.loads(pickle.dumps(kwargs))["lora_modules"] == {"a": "/x"}  # what each replica's LLM is built with
    assert main(["serve", str(tmp_path), "--ray-replicas", "2", "--enable-lora-loading"]) == 1
    assert "--enable-lora-loading does not work with --ray-replicas" in capsys.readouterr().err


def test_every_choice_of_a_request_uses_its_adapter(llm):
    """n > 1 (the server forks the sequence): the other choices run with the adapter too."""
    seq = llm.prepare(conversation(), None, llm._conversations(conversation(), {"lora": "all"})[0][1])
    assert seq.fork().lora == seq.lora == llm.lora.key("all")
