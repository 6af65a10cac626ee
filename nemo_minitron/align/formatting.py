"""Conversations -> token ids with a mask of the tokens a stage trains on.

Rendering uses the tokenizer's own chat template (SmolLM2 and Llama-3 instruct models ship one);
tokenizers without one get `DEFAULT_CHAT_TEMPLATE`. Only assistant turns are trained on: each
assistant turn's tokens are the difference between the rendering up to and including the turn and
the rendering of the conversation before it with the generation prompt, so the mask is exact for
any prefix-stable template (checked, with a clear error otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_minitron.errors import UserError
# A plain template for tokenizers without one; the end-of-turn marker is the EOS token.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str      # system | user | assistant
    content: str


@dataclass
class Encoded:
    tokens: list[int]
    train_mask: list[bool]   # True on tokens the loss is computed on (assistant responses)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _render(tokenizer, turns: list[Turn], generation_prompt: bool) -> list[int]:
    if not turns:
        return []
    messages = [{"role": t.role, "content": t.content} for t in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_conversation(tokenizer, turns: list[Turn]) -> Encoded:
    """Token ids of the whole conversation and the mask of its assistant tokens."""
    ensure_chat_template(tokenizer)
    tokens: list[int] = []
    mask: list[bool] = []
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = _render(tokenizer, turns[:i], generation_prompt=True)
        full = _render(tokenizer, turns[: i + 1], generation_prompt=False)
        if full[: len(prompt)] != prompt or prompt[: len(tokens)] != tokens:
            raise UserError(
                "the tokenizer's chat template is not prefix-stable (rendering a later turn changes "
                "earlier tokens), so response tokens cannot be masked exactly"
            )
        mask += [False] * (len(prompt) - len(tokens)) + [True] * (len(full) - len(prompt))
        tokens = full
    rest = _render(tokenizer, turns, generation_prompt=False)
    if rest[: len(tokens)] != tokens:
        raise UserError("the tokenizer's chat template is not prefix-stable")
    mask += [False] * (len(rest) - len(tokens))
    return Encoded(rest, mask)


def encode_prompt_response(tokenizer, prompt: list[Turn] | str, response: str) -> Encoded:
    """A prompt (raw text, used verbatim, or turns rendered with the chat template) followed by a
    response that is trained on. Raw-text prompts follow NeMo-Aligner's DPO files, whose prompts
    are already formatted; the response then ends with EOS."""
    if isinstance(prompt, str):
        head = tokenizer(prompt, add_special_tokens=False).input_ids
        tail = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return Encoded(head + tail, [False] * len(head) + [True] * len(tail))
    return encode_conversation(tokenizer, [*prompt, Turn("assistant", response)])


def generation_prompt(tokenizer, turns: list[Turn]) -> list[int]:
    """Token ids that ask the model for the next assistant turn."""
    ensure_chat_template(tokenizer)
    return _render(tokenizer, turns, generation_prompt=True)
