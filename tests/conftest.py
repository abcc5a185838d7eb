"""Shared fixtures: a checkpoint-like directory with the rebuilt tokenizer and the reference processor files, the
tiny checkpoint with them, an LLM over it, and a short clip. Helpers are in tests/tiny.py."""

from __future__ import annotations

import pytest

from minicpmv.processing.tokenizer_build import write_tokenizer_files
from tests.tiny import REAL, link_tree, reference_checkpoint, write_clip


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("minicpmv-tokenizer")
    write_tokenizer_files(directory)
    return directory


@pytest.fixture(scope="session")
def ours(tokenizer_dir):
    """Our Processor over the rebuilt tokenizer and the real templates and configs."""
    from minicpmv.processing.prompt import Processor

    return Processor.from_dir(tokenizer_dir)


@pytest.fixture(scope="session")
def reference_processor(tokenizer_dir):
    """transformers' MiniCPMV4_6Processor (torchvision image backend): the test oracle. It reads the same files as a
    ``tiny_dir`` processor would, and loading one takes seconds: build it once."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    """The tiny reference checkpoint (tests/tiny.py) with the real vocabulary, plus the real tokenizer, template and
    processor files. Read-only: its weights are hard links to the reference's."""
    _, source = reference_checkpoint("base", REAL)
    target = tmp_path_factory.mktemp("tiny") / "ckpt"
    link_tree(source, target)
    link_tree(tokenizer_dir, target, dirs_exist_ok=True)
    return target


@pytest.fixture(scope="module")
def llm(tiny_dir):
    """An LLM over ``tiny_dir`` in float32, one per test module."""
    from minicpmv.llm import LLM

    return LLM(tiny_dir, dtype="float32", progress=False)


@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    """A 2.5 s H.264 clip: 3 frames at 1 fps."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_clip(path, "libx264", 160, 120, 4, 10)
    return path


@pytest.fixture(scope="session")
def live_server(tiny_dir):
    """One real server over the tiny checkpoint for the protocol tests (completions, responses, Ollama, Anthropic):
    API key ``tiny.KEY``, model name "tiny", test hooks on."""
    from minicpmv.engine.engine import EngineConfig
    from minicpmv.llm import LLM
    from minicpmv.serve.config import ServerConfig
    from tests.tiny import KEY, Server

    llm = LLM(tiny_dir, dtype="float32", progress=False, engine_config=EngineConfig(max_num_seqs=8))
    server = Server(llm, ServerConfig(model_name="tiny", api_key=KEY, enable_test_hooks=True))
    yield server
    server.stop()
    llm.close()
