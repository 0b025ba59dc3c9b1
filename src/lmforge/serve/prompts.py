"""Prompts into token ids within the server's limits, without holding up the event loop.

Texts are tokenized in a worker thread (the tokenizer releases the GIL in a batch), and one
whose UTF-8 length alone proves it over the limit is refused before that (prompt_size.py).
Chat messages are rendered by the model's chat template in a worker thread too; the
template's budget (chat_template.TemplateBudget) bounds how long that takes, and a template
that goes over it on a short conversation is refused when the server starts.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from lmforge.data.chat_template import TemplateBudgetExceeded
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.serve.errors import APIError
from lmforge.serve.prompt_size import max_bytes_per_token
from lmforge.serve.protocol import ChatMessage

# What a chat template must render within its budget for the server to start with it.
SMOKE_CONVERSATION = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"},
                      {"role": "user", "content": "Tell me about Romeo."}]


def check_chat_template(tokenizer: TextTokenizer) -> None:
    """Refuse, at start, a chat template that goes over its render budget on a short
    conversation: every chat request would. (A template that refuses this conversation's
    shape, with raise_exception, is left to the requests: they get its message.)"""
    try:
        tokenizer.apply_chat_template(SMOKE_CONVERSATION, add_generation_prompt=True)
    except TemplateBudgetExceeded as e:
        raise LmforgeError(f"refusing the model's chat template: {e}, for a three-message conversation; "
                           "fix the chat_template in tokenizer_config.json (or chat_template.jinja)") from None
    except LmforgeError:
        pass


class PromptEncoder:
    """Token ids of a request's prompts: `max_prompt_tokens` at most each (below the model's
    `context`), ids below `vocab` (the model's embedding rows)."""

    def __init__(self, tokenizer: TextTokenizer, context: int, vocab: int, max_prompt_tokens: int | None):
        self.tokenizer, self.context, self.vocab = tokenizer, context, vocab
        self.max_prompt_tokens = min(max_prompt_tokens or context, context - 1)
        self.bytes_per_token = max_bytes_per_token(tokenizer)

    def too_long(self, what: str, name: str = "prompt") -> APIError:
        return APIError(400, f"the {name} has {what}; this server takes at most {self.max_prompt_tokens} tokens "
                        f"(the model's context is {self.context})", param=name, code="context_length_exceeded")

    async def encode(self, prompts: list[str | list[int]], what: str = "prompt") -> list[list[int]]:
        """Token ids of each prompt; `what` names them in errors (and is the field they came in)."""
        limit, per_token = self.max_prompt_tokens, self.bytes_per_token
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            size = len(text.encode("utf-8"))
            if per_token and size > limit * per_token:  # more tokens, for sure
                raise self.too_long(f"{size} bytes, more than {limit} tokens can hold (one token of "
                                    f"this tokenizer stands for at most {per_token} bytes)", what)
        encoded = iter(await run_in_threadpool(self.tokenizer.encode_batch, texts) if texts else [])
        out = []
        for prompt in prompts:
            ids = next(encoded) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise APIError(400, f"the {what} is empty", param=what)
            if len(ids) > limit:
                raise self.too_long(f"{len(ids)} tokens", what)
            if isinstance(prompt, list) and any(t >= self.vocab for t in ids):
                raise APIError(400, f"a token id in the {what} is outside the vocabulary [0, {self.vocab})",
                               param=what)
            out.append(ids)
        return out

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template renders it (by default ready for an answer)."""
        return await self.render_conversation([{"role": m.role, "content": m.text()} for m in messages],
                                              add_generation_prompt)

    async def render_conversation(self, conversation: list[dict[str, Any]], add_generation_prompt: bool = True,
                                  **variables: Any) -> str:
        """Messages as dicts (HF's shape), with more template variables (`tools`)."""
        try:
            return await run_in_threadpool(self.tokenizer.apply_chat_template, conversation, add_generation_prompt,
                                           **variables)
        except TemplateBudgetExceeded as e:
            raise APIError(400, f"{e} for these messages", param="messages", code="chat_template_budget") from None
        except LmforgeError as e:
            raise APIError(400, str(e), param="messages") from None

    def text(self, prompt: str | list[int]) -> str:
        """A prompt as text (token ids decoded), for echo."""
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
