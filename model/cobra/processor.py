"""Messages + images -> Cobra model inputs, behind the interface of :class:`~model.processor.VLMambaProcessor`.

Cobra reads one image, always in front of the prompt (cobra/models/vlms/cobra.py concatenates
the patch embeddings before the prompt's token embeddings; there is no image token in its
vocabulary). The processor therefore renders Cobra's prompt string, marks a conversation with
an image by a leading ``<image>``, and tokenizes to ``p`` placeholder ids followed by the
prompt's ids, tokenized as Cobra does (``tokenizer(prompt)``: GPT-NeoX adds no BOS). The
placeholder is ``<image>`` added to the tokenizer in memory; its id falls in the LM's padded
vocabulary rows, which the engine never samples.
"""

from __future__ import annotations

import torch

from model.cobra.image import CobraImageTransform
from model.cobra.prompt import render_prompt
from model.errors import ImageCountMismatch, InvalidRequest
from model.processor import PromptEncoder

IMAGE_TOKEN = "<image>"


class CobraProcessor(PromptEncoder):
    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer, transform: CobraImageTransform, prompt_format: str, num_image_tokens: int):
        self.tokenizer, self.transform, self.prompt_format = tokenizer, transform, prompt_format
        self.num_image_tokens = num_image_tokens
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tokenizer.eos_token is None:
            raise ValueError("the Cobra tokenizer has no eos token (GPT-NeoX's is <|endoftext|>)")

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def render_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Cobra's prompt string for ``messages`` (what its ``PromptBuilder.get_prompt()`` returns)."""
        return render_prompt(messages, self.prompt_format, add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt after one leading ``<image>`` per image part (Cobra reads the image first,
        wherever the message puts it; :meth:`tokenize` accepts one)."""
        n = sum(1 for m in messages if isinstance(m.get("content"), list)
                for p in m["content"] if p.get("type") in ("image", "image_url"))
        return IMAGE_TOKEN * n + self.render_prompt(messages, add_generation_prompt)

    def preprocess_images(self, images: list, normalize: bool = True) -> torch.Tensor | None:
        """PIL images -> pixel_values (i, 3k, S, S) float32 (k featurizers' normalized pixels),
        with or without ``normalize`` (each featurizer normalizes its own way)."""
        if not images:
            return None
        return torch.stack([self.transform(im) for im in images])

    def tokenize(self, text: str, num_images: int) -> list[int]:
        """``p`` placeholder ids (with an image) followed by the ids of ``text`` without its marker."""
        found = text.count(IMAGE_TOKEN)
        if found != num_images:
            raise ImageCountMismatch(f"the prompt has {found} image placeholders but {num_images} images were given",
                                     param="messages")
        if num_images > 1:
            raise InvalidRequest(f"Cobra models read one image per conversation; got {num_images}",
                                 param="messages", code="too_many_images")
        ids = self.tokenizer(text.replace(IMAGE_TOKEN, ""))["input_ids"]
        return [self.image_token_id] * (self.num_image_tokens * num_images) + ids
