"""Chat templates (Jinja, as in `tokenizer_config.json`), rendered in a sandbox.

A template comes with a downloaded model and is untrusted code: the immutable sandbox
refuses attribute access to Python internals and mutation of the inputs.
"""

from __future__ import annotations

from functools import lru_cache

from lmforge.errors import LmforgeError


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
