"""Shared fixtures: a checkpoint-like directory with the rebuilt tokenizer and the reference processor files."""

from __future__ import annotations

import pytest

from minicpmv.processing.tokenizer_build import write_tokenizer_files


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
    """transformers' MiniCPMV4_6Processor (torchvision image backend): the test oracle."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny reference checkpoint (tests/tiny.py) plus the real tokenizer, template and processor files."""
    import shutil

    from tests.tiny import reference_checkpoint

    _, source = reference_checkpoint("base")
    target = tmp_path_factory.mktemp("tiny") / "ckpt"
    shutil.copytree(source, target)
    write_tokenizer_files(target)
    return target
