"""Cobra's prompt formats, rendered from OpenAI-style messages.

Cobra's prompt builders (cobra/models/backbones/llm/prompting/zephyr_prompter.py for the
``*-zephyr`` LMs, mamba_prompter.py for the base ones) build the prompt turn by turn; the
string its ``get_prompt()`` returns after the last user turn is what the LM reads, after the
image's patch embeddings:

    zephyr  "<|user|>\\n{q1}<|endoftext|>\\n<|assistant|>\\n{a1}<|endoftext|>"
            "\\n<|user|>\\n{q2}<|endoftext|>\\n<|assistant|>\\n"
    plain   "In: {q1}\\nOut: {a1}<|endoftext|>\\nIn: {q2}\\nOut: "

Each message is stripped and any ``<image>`` in it removed; an empty answer becomes " ".
Neither builder uses a system prompt (the Zephyr one sets it to ""), so system messages are
dropped. Turns must alternate user, assistant, ..., as the builders assert.
"""

from __future__ import annotations

from model.errors import InvalidRequest

EOS = "<|endoftext|>"
FORMATS = ("zephyr", "plain")


def _wrap_user(fmt: str, message: str) -> str:
    if fmt == "zephyr":
        return f"<|user|>\n{message}{EOS}\n<|assistant|>\n"
    return f"In: {message}\nOut: "


def _wrap_assistant(message: str) -> str:
    return f"{message if message != '' else ' '}{EOS}"


def message_text(content) -> str:
    """A message's text: a string, or its text parts joined by newlines (image parts carry none)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def conversation_turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of the user and assistant messages, checked to alternate from a user turn."""
    turns = [(m["role"], message_text(m.get("content"))) for m in messages if m["role"] not in ("system", "developer")]
    for i, (role, _) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise InvalidRequest(f"Cobra models need user and assistant turns alternating from a user turn; message "
                                 f"{i} (not counting system messages) is {role!r}, expected {want!r}", param="messages")
    return turns


def render_prompt(messages: list[dict], fmt: str = "zephyr", add_generation_prompt: bool = True) -> str:
    """The exact prompt string Cobra's builder produces for ``messages`` (without the image)."""
    if fmt not in FORMATS:
        raise ValueError(f"prompt format must be one of {FORMATS}, got {fmt!r}")
    turns = conversation_turns(messages)
    if not turns:
        raise InvalidRequest("the conversation has no user message", param="messages")
    if add_generation_prompt and turns[-1][0] != "user":
        raise InvalidRequest("the last message must be a user message", param="messages")
    out = []
    for i, (role, text) in enumerate(turns):
        text = text.replace("<image>", "").strip()
        if role == "assistant":
            out.append(_wrap_assistant(text))
        else:
            out.append(("\n" if i > 0 else "") + _wrap_user(fmt, text))
    return "".join(out)
