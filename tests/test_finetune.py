"""``minicpmv finetune`` on a synthetic task (the colour of a solid image): held-out accuracy, the saved adapter in
transformers + peft against our logits, resuming, gradient checkpointing, and the data formats."""

from __future__ import annotations

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch

from minicpmv.cli import main
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import InvalidInputError
from minicpmv.finetune import FinetuneConfig, Trainer, batch_loss, examples, read_conversations
from minicpmv.llm import LLM
from tests.tiny import REAL, from_patches, reference_checkpoint

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTION = "What colour is this?"


def write_task(directory, name: str, per_colour: int, seed: int) -> list[tuple[str, str]]:
    """Solid images of jittered shades and sizes, one JSONL row each (LLaMA-Factory style: <image> tag + images)."""
    rng = np.random.default_rng(seed)
    rows, items = [], []
    for i in range(per_colour):
        for colour, rgb in COLOURS.items():
            pixel = np.clip(np.array(rgb) + rng.integers(-25, 26, 3), 0, 255).astype(np.uint8)
            size = int(rng.integers(56, 72))
            file = directory / f"{name}-{colour}-{i}.png"
            PIL.Image.fromarray(np.tile(pixel, (size, size, 1))).save(file)
            rows.append({"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                      {"role": "assistant", "content": colour}], "images": [file.name]})
            items.append((str(file), colour))
    (directory / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return items


def ask(path: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("colours")
    write_task(data, "train", 4, seed=0)
    held_out = write_task(data, "eval", 3, seed=1)
    out = data / "adapter"
    code = main(["finetune", str(tiny_dir), str(data / "train.jsonl"), str(out), "--target", "all",
                 "--freeze-vision", "--epochs", "10", "--lr", "1e-2", "--lr-scheduler", "constant", "--batch-size", "16",
                 "--max-slices", "1", "--no-gradient-checkpointing",
                 "--eval", str(data / "eval.jsonl"), "--device", "cpu"])
    assert code == 0
    return out, held_out


def test_finetuned_adapter_names_held_out_colours(tiny_dir, trained):
    out, held_out = trained
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in log if "eval_loss" in e]
    assert len(evals) == 10 and evals[-1] < evals[0]  # an eval loss per epoch, falling
    assert all(e["tokens_per_second"] > 0 for e in log if "loss" in e)
    llm = LLM(tiny_dir, dtype="float32", progress=False, lora_modules={"colours": out})
    greedy = SamplingParams(temperature=0, max_tokens=1)  # the first token names the colour
    answers = llm.chat([{"messages": ask(p), "lora": "colours", "max_slice_nums": 1} for p, _ in held_out], greedy)
    accuracy = np.mean([(a.text or "").strip() == colour for a, (_, colour) in zip(answers, held_out)])
    assert accuracy >= 0.95
    base = llm.chat([{"messages": ask(p), "max_slice_nums": 1} for p, _ in held_out[:4]], greedy)
    assert np.mean([(a.text or "").strip() == c for a, (_, c) in zip(base, held_out)]) < 0.5  # the base cannot do it


def test_saved_adapter_in_transformers_and_peft_gives_our_logits(tiny_dir, trained):
    from peft import PeftModel

    out, held_out = trained
    ref, _ = reference_checkpoint("base", REAL)
    reference = PeftModel.from_pretrained(copy.deepcopy(ref), out).eval()
    llm = LLM(tiny_dir, dtype="float32", progress=False, lora_modules={"colours": out})
    messages = ask(held_out[0][0])
    seq = llm.prepare(messages, None, llm._conversations(messages, {"lora": "colours", "max_slice_nums": 1})[0][1])
    v = seq.visuals[0]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(seq.prompt_ids)[None], pixel_values=from_patches(v.pixel_values),
                             target_sizes=v.target_sizes, downsample_mode=v.downsample_mode).logits[0]
    with llm.lora.activate([seq.lora], [seq.num_prompt]):
        features = llm.model.encode_images(v.pixel_values, v.target_sizes, v.downsample_mode)
        got = llm.model(torch.tensor(seq.prompt_ids), [llm.model.new_state()], image_features=features, all_logits=True)
    assert (got - expected).abs().max().item() <= 1e-4


def small_task(tmp_path):
    write_task(tmp_path, "train", 1, seed=2)
    return examples(read_conversations(tmp_path / "train.jsonl"))


def test_resuming_continues_where_it_stopped(tiny_dir, tmp_path):
    data = small_task(tmp_path)
    cfg = dict(rank=2, alpha=4, epochs=2, lr=1e-2, batch_size=2, freeze_vision=True, max_slice_nums=1, save_steps=1)
    straight = Trainer(LLM(tiny_dir, dtype="float32", progress=False), FinetuneConfig(**cfg), tmp_path / "a", False)
    straight.train(data)
    first = Trainer(LLM(tiny_dir, dtype="float32", progress=False), FinetuneConfig(**cfg), tmp_path / "b", False)
    assert [e["step"] for e in first.train(data, max_steps=3)] == [1, 2, 3]  # stopped partway through epoch 2
    resumed = Trainer(LLM(tiny_dir, dtype="float32", progress=False), FinetuneConfig(**cfg), tmp_path / "b", False)
    log = resumed.train(data, resume=True)
    assert [e["step"] for e in log] == [4]  # only the step not yet done ran
    for name, w in straight.wrappers.items():
        assert torch.allclose(w.lora_B, resumed.wrappers[name].lora_B, atol=1e-6), name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_dir, tmp_path):
    data = small_task(tmp_path)
    trainer = Trainer(LLM(tiny_dir, dtype="float32", progress=False),
                      FinetuneConfig(rank=2, targets=["in_proj_qkv", "o_proj", "down_proj"]), tmp_path / "c", False)
    for w in trainer.wrappers.values():
        torch.nn.init.normal_(w.lora_B)  # (B = 0 would give A no gradient)
    batch = [trainer.encode(e) for e in data[:2]]
    results = []
    for checkpointing in (False, True):
        loss, n, _ = batch_loss(trainer.model, batch, False, checkpointing)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in trainer.params]))
        trainer.optimizer.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) and a.abs().sum() > 0 for a, b in zip(grads_a, grads_b))


def test_sharegpt_and_openai_rows_read_alike(tmp_path):
    image = tmp_path / "x.png"
    PIL.Image.new("RGB", (30, 30), (1, 2, 3)).save(image)
    rows = [
        {"conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}], "images": ["x.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{image}"}},
                                                   {"type": "text", "text": "Hi"}]},
                      {"role": "assistant", "content": "Hello"}]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    a, b = read_conversations(tmp_path / "d.jsonl")
    assert a == b == [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Hi"}]},
                      {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}]}, "more <image> tags"),
    ({"messages": [{"role": "user", "content": "Hi"}], "images": []}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "images": ["a.png"]},
     "have no <image> / <video> tag"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "unknown role 'robot'"),
])
def test_bad_rows_name_their_line(tmp_path, row, message):
    (tmp_path / "d.jsonl").write_text("\n" + json.dumps(row))
    with pytest.raises(InvalidInputError, match=rf"d\.jsonl:2: .*{message}"):
        read_conversations(tmp_path / "d.jsonl")
