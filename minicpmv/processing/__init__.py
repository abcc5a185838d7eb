"""Inputs for MiniCPM-V 4.6: images -> encoder patches, chat messages -> prompt text and token ids."""

from minicpmv.processing.chat_template import ChatTemplate
from minicpmv.processing.image import ImagePlan, ImageSettings, ProcessedImage, UnitPlan, plan_image, process_image
from minicpmv.processing.image_io import load_image
from minicpmv.processing.prompt import Processor, ProcessorOutput, expand_placeholders, image_placeholder
from minicpmv.processing.tokenizer import MediaTokens, TextTokenizer
from minicpmv.processing.tokenizer_build import write_tokenizer_files

__all__ = [
    "ChatTemplate",
    "ImagePlan",
    "ImageSettings",
    "MediaTokens",
    "ProcessedImage",
    "Processor",
    "ProcessorOutput",
    "TextTokenizer",
    "UnitPlan",
    "expand_placeholders",
    "image_placeholder",
    "load_image",
    "plan_image",
    "process_image",
    "write_tokenizer_files",
]
