"""Text + images -> model inputs: chat templating, tokenizing, image preprocessing,
and expansion of each ``<image>`` placeholder into that image's visual-token positions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import VLMambaConfig
from model.errors import ImageCountMismatch

# Stands for the text "<image>" in a prompt (a private-use character): see escape_markers.
LITERAL_MARKER = "\ue000"


@dataclass
class EncodedPrompt:
    """input_ids: (l,) with ``num_image_tokens`` copies of the image token per image;
    pixel_values: (i, 3, H, W) float32, or None without images."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    def __repr__(self) -> str:  # never print token ids or pixels
        return f"EncodedPrompt(len={len(self.input_ids)}, images={self.num_images})"


class PromptEncoder:
    """``encode`` / ``encode_messages`` over a processor's ``apply_chat_template``, ``tokenize``
    and ``preprocess_images`` (the interface the engine and the server call)."""

    def escape_markers(self, messages: list[dict]) -> list[dict]:
        """``messages`` whose text may mention the image marker as text (a user asking about the
        HTML ``<image>`` tag) without it becoming an image placeholder; as given by default."""
        return messages

    def encode(self, text: str, images: list | None = None) -> EncodedPrompt:
        images = images or []
        return EncodedPrompt(self.tokenize(text, len(images)), self.preprocess_images(images))

    def encode_messages(self, messages: list[dict], images: list | None = None,
                        add_generation_prompt: bool = True) -> EncodedPrompt:
        """Render OpenAI-style messages with the chat template and encode them with ``images`` (in order)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), images)


class VLMambaProcessor(PromptEncoder):
    def __init__(self, tokenizer, image_processor, config: VLMambaConfig):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token = config.image_token
        self.image_token_id = config.image_token_id
        self.num_image_tokens = config.vision.num_patches
        if tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise ValueError(f"tokenizer maps {self.image_token} to a different id than config.image_token_id")

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: VLMambaConfig) -> "VLMambaProcessor":
        from transformers import AutoTokenizer, PretrainedConfig

        from model.vision import image_processor_for

        # An empty config: our config.json is not a transformers model config, and the tokenizer
        # files alone say which tokenizer this is.
        tok = AutoTokenizer.from_pretrained(str(directory), config=PretrainedConfig())
        return cls(tok, image_processor_for(config.vision, directory), config)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def escape_markers(self, messages: list[dict]) -> list[dict]:
        """Every ``<image>`` in the messages' text becomes ``LITERAL_MARKER``, which :meth:`tokenize`
        turns into the marker's text tokens; image parts stay the only placeholders."""
        def escape(text):
            return text.replace(self.image_token, LITERAL_MARKER) if isinstance(text, str) else text

        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [p | {"text": escape(p["text"])} if p.get("type") == "text" and "text" in p else p
                           for p in content]
            out.append(m | {"content": escape(content)})
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def preprocess_images(self, images: list, normalize: bool = True) -> torch.Tensor | None:
        """PIL images -> pixel_values (i, 3, H, W) float32. With ``normalize=False``: the resized
        (and cropped) pixels as uint8, before rescaling and normalizing, which
        :meth:`normalize_pixels` then does on any device: a quarter of the bytes to hash, copy
        and send. (A processor whose resized pixels are not whole numbers gives float32 anyway.)"""
        if not images:
            return None
        # One image at a time: the image processor's copies of a full-size image (numpy arrays of
        # 40 megapixels, say) are then alive for one image, not for all of a request's at once.
        def each(**kw):
            return torch.cat([self.image_processor([im if im.mode == "RGB" else im.convert("RGB")], return_tensors="pt",
                                                   **kw)["pixel_values"] for im in images])

        if normalize:
            return each().float()
        px = each(do_rescale=False, do_normalize=False)
        if px.dtype == torch.uint8:
            return px
        if px.is_floating_point() and bool(((px >= 0) & (px <= 255) & (px == px.round())).all()):
            return px.to(torch.uint8)
        return self.preprocess_images(images)

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels from ``preprocess_images(..., normalize=False)`` (any device) -> the float32
        pixel_values ``preprocess_images`` gives: rescaled and normalized as the image processor
        is configured to."""
        ip = self.image_processor
        x = pixels.to(torch.float32, copy=True)
        if ip.do_rescale:
            x.mul_(ip.rescale_factor)
        if ip.do_normalize:
            # Per channel (the axis third from the end: (3, H, W) or (i, 3, H, W)), with Python
            # scalars: a tensor of the means made here would be a host-to-device copy, which
            # waits for all the work queued on a GPU (the engine's decode steps) before it starts.
            for c, (mean, std) in enumerate(zip(ip.image_mean, ip.image_std)):
                x.select(-3, c).sub_(mean).div_(std)
        return x

    def tokenize(self, text: str, num_images: int) -> list[int]:
        """Token ids of ``text`` with every ``<image>`` expanded to its visual-token positions (and
        every ``LITERAL_MARKER`` tokenized as the text ``<image>``)."""
        ids: list[int] = []
        for k, piece in enumerate(text.split(LITERAL_MARKER)):
            if k:
                ids.extend(self.tokenizer(self.image_token, add_special_tokens=False,
                                          split_special_tokens=True)["input_ids"])
            ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != num_images:
            raise ImageCountMismatch(f"the prompt has {found} image placeholders but {num_images} images were given",
                                     param="messages")
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
        return out
