"""Chat messages + images + videos -> prompt text, token ids and encoder inputs.

The chat template writes one `<|image_pad|>` per image; each is then expanded into the image's full placeholder
(`<image_id>k</image_id><image>pads</image>` plus one `<slice>pads</slice>` per slice, rows joined by newlines),
with pad counts taken from the image's `ImagePlan`.

Likewise each `<|video_pad|>` becomes the video's placeholder: one `<image_id>k</image_id>` for the whole video (k
counts videos, separately from images), then every visual unit (frame or stacked canvas) written like an image but
with `<|video_pad|>` pads, the units back to back with no separator.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minicpmv.config import read_json
from minicpmv.errors import CheckpointError, ImageError, InvalidInputError, VideoError
from minicpmv.processing.chat_template import ChatTemplate
from minicpmv.processing.image import ImagePlan, ImageSettings, ProcessedImage, process_image
from minicpmv.processing.image_io import ImageInput
from minicpmv.processing.options import ProcessingOptions
from minicpmv.processing.tokenizer import MediaTokens, TextTokenizer
from minicpmv.processing.video import ProcessedVideo, VideoInput, VideoSettings, process_video

IMAGE_KEYS = ("image", "image_url")
VIDEO_KEYS = ("video", "video_url")


def image_placeholder(plan: ImagePlan, tokens: MediaTokens, image_id: int | None = None, pad: str | None = None) -> str:
    """`<image>pads</image>` for the source unit, then one line of `<slice>pads</slice>` per row of slices; ``pad``
    is the image pad unless given (a video's frames use the video pad)."""
    pad = tokens.image if pad is None else pad

    def wrap(start: str, count: int, end: str) -> str:
        return start + pad * count + end

    source, *slices = plan.units
    prefix = "" if image_id is None else f"{tokens.image_id_start}{image_id}{tokens.image_id_end}"
    text = prefix + wrap(tokens.image_start, source.num_tokens, tokens.image_end)
    if plan.grid is not None:
        rows, cols = plan.grid
        row_texts = [
            "".join(wrap(tokens.slice_start, s.num_tokens, tokens.slice_end) for s in slices[r * cols : (r + 1) * cols])
            for r in range(rows)
        ]
        text += "\n".join(row_texts)
    return text


def video_placeholder(video: ProcessedVideo, tokens: MediaTokens, video_id: int | None = None) -> str:
    """One id for the whole video, then every unit's image placeholder (with video pads), with no separator."""
    prefix = "" if video_id is None else f"{tokens.image_id_start}{video_id}{tokens.image_id_end}"
    return prefix + "".join(image_placeholder(plan, tokens, pad=tokens.video) for plan in video.plans)


def expand_placeholders(text: str, placeholder: str, replacements: list[str]) -> str:
    """Replace the i-th `placeholder` in `text` with `replacements[i]`."""
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(replacements):
        raise InvalidInputError(
            f"the conversation has {len(pieces) - 1} {placeholder} placeholder(s) but {len(replacements)} were supplied"
        )
    out = [pieces[0]]
    for replacement, piece in zip(replacements, pieces[1:]):
        out += [replacement, piece]
    return "".join(out)


def _part_source(part: Mapping, key: str, error: type[InvalidInputError] = ImageError) -> Any:
    """The media a content part carries, in any of the usual spellings; None if it carries none."""
    value = part.get(key)
    if isinstance(value, Mapping):  # OpenAI style: {"image_url": {"url": ...}}
        value = value.get("url")
    if value is None:
        value = part.get("url", part.get("path"))
    if value is None and part.get("base64") is not None:
        try:
            value = base64.b64decode(part["base64"], validate=True)
        except (binascii.Error, ValueError, TypeError) as e:
            raise error(f"content part has invalid base64 data: {e}") from e
    return value


def media_part(part: Any) -> tuple[str, Any] | None:
    """("image" or "video", the media it carries) for a media content part in any of the usual spellings, else
    None. The one definition of a media part: the server fetches exactly what the processor will read."""
    if not isinstance(part, Mapping):
        return None
    kind = part.get("type")
    for name, keys, error in (("image", IMAGE_KEYS, ImageError), ("video", VIDEO_KEYS, VideoError)):
        if kind in keys or any(k in part for k in keys):
            return name, _part_source(part, next((k for k in keys if k in part), name), error)
    return None


def map_media(messages: list, replace) -> list:
    """``messages`` with each media part (every spelling ``media_part`` reads) replaced by
    ``{"type": kind, kind: replace(source, kind)}``; other parts and messages stay as they are."""
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            media = media_part(part)
            if media is not None:
                kind, source = media
                part = {"type": kind, kind: replace(source, kind)}
            parts.append(part)
        out.append({**message, "content": parts})
    return out


def collect_media(messages: list[dict]) -> tuple[list[dict], list[Any], list[Any]]:
    """Copy of `messages` whose media parts are reduced to {"type": "image"|"video"}, plus the media they carried
    (None where a part names no data), in conversation order."""
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise InvalidInputError("messages must be a list of dicts")
    images, videos, out = [], [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            media = media_part(part)
            if media is not None:
                if part.get("text"):
                    raise InvalidInputError(f"a content part is either text or {media[0]}, not both (text {part['text']!r:.40})")
                (images if media[0] == "image" else videos).append(media[1])
                part = {"type": media[0]}
            elif isinstance(part, Mapping) and not isinstance(part.get("text", ""), str):
                raise InvalidInputError(f"a text content part needs a string 'text', got {type(part['text']).__name__}")
            parts.append(part)
        out.append({**message, "content": parts})
    return out, images, videos


@dataclass
class ProcessorOutput:
    text: str
    input_ids: torch.Tensor  # 1-D int64, no BOS, no padding
    images: list[ProcessedImage]
    videos: list[ProcessedVideo] = dataclasses.field(default_factory=list)


class Processor:
    def __init__(
        self,
        tokenizer: TextTokenizer,
        template: ChatTemplate,
        image_settings: ImageSettings,
        use_image_id: bool = True,
        video_settings: VideoSettings | None = None,
    ):
        """``use_image_id`` applies to images and videos alike, as in the reference processor (which takes it from
        the image processor's config). Without ``video_settings``, videos use ``image_settings`` per unit."""
        self.tokenizer = tokenizer
        self.template = template
        self.image_settings = image_settings
        self.use_image_id = use_image_id
        self.video_settings = video_settings or VideoSettings(image=image_settings)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Processor:
        directory = Path(directory)
        config: dict = {}
        video_section: dict = {}
        config.update(read_json(directory / "preprocessor_config.json", default={}))
        processor = read_json(directory / "processor_config.json", default={})
        for key in ("image_processor", "video_processor"):
            if not isinstance(processor.get(key, {}), dict):
                raise CheckpointError(f"{directory / 'processor_config.json'}: {key} must be an object")
        config.update(processor.get("image_processor", {}))
        video_section = processor.get("video_processor", {})
        return cls(
            TextTokenizer.from_dir(directory),
            ChatTemplate.from_dir(directory),
            ImageSettings.from_config(config),
            use_image_id=bool(config.get("use_image_id", True)),
            video_settings=VideoSettings.from_config({**config, **video_section}),
        )

    def render(self, messages: list[dict], **kwargs: Any) -> str:
        """The chat template's text, with one raw `<|image_pad|>` / `<|video_pad|>` per image / video (what
        `apply_chat_template` returns)."""
        return self.template.render(collect_media(messages)[0], **kwargs)

    def settings(self, options: ProcessingOptions | None = None, video_max_slice_nums: int | None = None
                 ) -> tuple[ImageSettings, VideoSettings]:
        """The image and video settings with these options (None keeps the checkpoint's value); checked here."""
        o = options or ProcessingOptions()
        overrides = {"downsample_mode": o.downsample_mode, "max_slice_nums": o.max_slice_nums}
        image = dataclasses.replace(self.image_settings, **{k: v for k, v in overrides.items() if v is not None})
        video = self.video_settings.replace(
            downsample_mode=o.downsample_mode,
            max_slice_nums=video_max_slice_nums if video_max_slice_nums is not None else o.max_slice_nums,
            max_num_frames=o.max_num_frames,
            stack_frames=o.stack_frames,
        )
        return image, video

    def __call__(
        self,
        messages: list[dict],
        images: list[ImageInput] | None = None,
        videos: list[VideoInput] | None = None,
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tools: list[dict] | None = None,
        options: ProcessingOptions | None = None,
        video_max_slice_nums: int | None = None,
        **knobs: Any,
    ) -> ProcessorOutput:
        """`images` / `videos` override the data carried by the messages' image / video parts; either way the i-th
        image (video) fills the i-th image (video) placeholder.

        ``options`` (or its fields as keywords): as in the reference processor, ``use_image_id``,
        ``downsample_mode`` and ``max_slice_nums`` apply to images and videos alike; ``video_max_slice_nums``
        overrides ``max_slice_nums`` for videos only; ``max_num_frames`` and ``stack_frames`` apply to videos."""
        if options is None:
            options = ProcessingOptions.from_dict(knobs)
        elif knobs:
            raise InvalidInputError(f"give the processing options either as options= or as keywords, not both: {sorted(knobs)}")
        messages, part_images, part_videos = collect_media(messages)
        text = self.template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            enable_thinking=enable_thinking,
            **self.tokenizer.special_tokens,
        )
        tokens = self.tokenizer.media
        images = _media_list("image", images, part_images, text.count(tokens.image))
        videos = _media_list("video", videos, part_videos, text.count(tokens.video))

        settings, video_settings = self.settings(options, video_max_slice_nums)
        with_ids = self.use_image_id if options.use_image_id is None else options.use_image_id

        processed = [process_image(image, settings) for image in images]
        replacements = [image_placeholder(p.plan, tokens, i if with_ids else None) for i, p in enumerate(processed)]
        text = expand_placeholders(text, tokens.image, replacements)
        processed_videos = [process_video(video, video_settings) for video in videos]
        replacements = [video_placeholder(v, tokens, i if with_ids else None) for i, v in enumerate(processed_videos)]
        text = expand_placeholders(text, tokens.video, replacements)
        input_ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.int64)
        return ProcessorOutput(text, input_ids, processed, processed_videos)


def _media_list(kind: str, given: list | None, from_parts: list[Any], placeholders: int) -> list:
    """The media filling the `kind` placeholders: ``given`` if not None, else what the content parts carried."""
    if given is not None and not isinstance(given, (list, tuple)):
        raise InvalidInputError(f"{kind}s must be a list, got {type(given).__name__}")
    if given is None:
        if any(source is None for source in from_parts):
            article = "an" if kind[0] in "aeiou" else "a"
            raise InvalidInputError(f"{article} {kind} content part carries no {kind} data and no {kind}s= were given")
        given = from_parts
    if placeholders != len(given):
        raise InvalidInputError(
            f"the conversation has {placeholders} {kind} placeholder(s) but {len(given)} {kind}(s) were given"
        )
    return list(given)
