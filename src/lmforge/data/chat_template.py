"""Chat templates (Jinja, as in `tokenizer_config.json`), rendered in a sandbox.

A template comes with a downloaded model and is untrusted code: the immutable sandbox
refuses attribute access to Python internals and mutation of the inputs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.data.tokenizer import TextTokenizer


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise LmforgeError(f"the chat template does not compile: {e}") from None


def render_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                         **variables: str) -> str:
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmforgeError(f"message {i} needs a 'role' and a 'content'")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except SecurityError as e:
        raise LmforgeError(f"the chat template tried something unsafe and was stopped: {e}") from None
    except TemplateError as e:
        raise LmforgeError(f"the chat template failed: {e}") from None


def end_of_turn_ids(tokenizer: TextTokenizer) -> list[int]:
    """The special token that closes a message under the tokenizer's chat template (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`, Phi-3's `<|end|>`, Mistral's `</s>`...), as a list:
    generation stops on it. Read off the template itself: what follows an assistant message's
    content. A special token never shows in text decoded with special tokens skipped, so
    stopping must be on the id, not on a stop string. Empty when the template ends a message
    with ordinary text, or does not render."""
    marker = "LMFORGE_REPLY_MARKER"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": marker}],
                                                 add_generation_prompt=False)
    except LmforgeError:
        return []
    if marker not in rendered:
        return []
    after = rendered.split(marker, 1)[1].lstrip()
    ids = tokenizer.encode(after)[:1] if after else []
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    return [i for i in ids if i in special]
