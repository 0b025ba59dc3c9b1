"""The tokenizer through the API: /tokenize, /detokenize and /tokenizer_info (vLLM's shapes,
which lm-eval's remote tokenizer backend reads)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from lmforge.data.tokenizer import TextTokenizer
from lmforge.serve.errors import APIError
from lmforge.serve.prompts import PromptEncoder
from lmforge.serve.protocol import DetokenizeRequest, TokenizeRequest


class TokenService:
    def __init__(self, tokenizer: TextTokenizer, context: int, prompts: PromptEncoder):
        self.tokenizer, self.context, self.prompts = tokenizer, context, prompts

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        body.check_one_input()
        if body.prompt is not None:
            text = body.prompt
        else:
            text = await self.prompts.render_chat(body.messages or [], body.add_generation_prompt)
        (ids,) = await run_in_threadpool(self.tokenizer.encode_batch, [text])
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        vocab = self.tokenizer.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise APIError(400, f"a token id is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def info(self) -> dict[str, Any]:
        cfg = self.tokenizer.config
        names = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items() if k.endswith("_token")}
        return {"eos_token": names.get("eos_token"), "bos_token": names.get("bos_token"),
                "pad_token": names.get("pad_token"), "chat_template": self.tokenizer.chat_template,
                "model_max_length": self.context, "vocab_size": self.tokenizer.vocab_size}
