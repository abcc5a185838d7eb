"""Inputs for MiniCPM-V 4.6: images -> encoder patches, chat messages -> prompt text and token ids.

The names below load on first use, so that `minicpmv.processing.options` (read by the CLI's argument parser) needs
no torch: `minicpmv --help` and an argument error answer in a fraction of a second."""

import importlib

_HOMES = {
    "ChatTemplate": "chat_template",
    "ImagePlan": "image", "ImageSettings": "image", "ProcessedImage": "image", "UnitPlan": "image",
    "plan_image": "image", "process_image": "image",
    "load_image": "image_io",
    "Processor": "prompt", "ProcessorOutput": "prompt", "expand_placeholders": "prompt",
    "image_placeholder": "prompt",
    "MediaTokens": "tokenizer", "TextTokenizer": "tokenizer",
    "write_tokenizer_files": "tokenizer_build",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'minicpmv.processing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minicpmv.processing.{_HOMES[name]}"), name)
