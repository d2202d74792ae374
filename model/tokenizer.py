"""Tokenizer helpers: the default chat template and a small BPE trainer for demo models.

The chat template renders OpenAI-style messages whose content is a string or a list of
parts (``{"type": "text"}``, ``{"type": "image"}`` / ``{"type": "image_url"}``); each image
part becomes the placeholder ``<image>`` followed by a newline. The turn format is
Zephyr's: ``<|user|>\\n...<eos>\\n<|assistant|>\\n...<eos>\\n``.
"""

from __future__ import annotations

from collections.abc import Iterable

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"

DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{{ '<image>\\n' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}{{ render(message['content']) }}{{ eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def ensure_image_token(tokenizer) -> int:
    """Add ``<image>`` as a special token if missing; returns its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1):
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer.

    Specials: ``<|endoftext|>`` (eos, pad), ``<image>``; the chat template is set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN, IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) + ["<|user|>\n<|assistant|>\n<|system|>\n"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   additional_special_tokens=[IMAGE_TOKEN])
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast
