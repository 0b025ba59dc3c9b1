"""An lm-evaluation-harness model backend: `--model lmforge --model_args pretrained=DIR`.

lm-eval finds backends in its own registry only (no plugin entry points), so the backend
is registered when this module is imported. From Python:

    import lm_eval, lmforge.eval.harness
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/quickstart/model", tasks=[...])

From the shell, `python -m lmforge.eval.harness ARGS` is `lm_eval ARGS` with the backend
registered (same arguments). Log-likelihood requests go through the shared-prefix scorer
(`lmforge.eval.scoring`), so a multiple-choice question's context runs once for all its
choices, and prefixes that contexts share (the same few-shot examples, as MMLU's five
per subject) are computed once; `prefix_cache=False` in model_args turns that sharing off.
Over-long contexts lose their oldest tokens, as in lm-eval's HF backend.
`generate_until` decodes greedily, or samples (`do_sample`, `temperature`, `top_p`,
`top_k`) from a generator seeded off torch's global one, which lm-eval seeds
(`--seed`), so sampled runs repeat. `--apply_chat_template` renders prompts with the
model's chat template and generation then also stops at its end-of-turn token.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import lmforge
from lmforge.eval.scoring import rolling_logprob, score_requests

DEFAULT_BATCH = 16


@register_model("lmforge")
class LmforgeLM(LM):
    def __init__(self, pretrained: str, batch_size: int | str | None = None, device: str | None = None,
                 dtype: str | None = None, max_gen_toks: int = 256, prefix_cache: bool | str = True, **_: Any):
        super().__init__()
        import torch

        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm_eval's CLI asks for cuda by default
        self.lm = lmforge.load(pretrained, device=device, dtype=getattr(torch, dtype) if dtype else None)
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else DEFAULT_BATCH
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_cache = str(prefix_cache).lower() not in ("false", "0", "no", "off")
        self._device = self.lm.model.tok_emb.weight.device
        tok = self.lm.tokenizer
        self.prefix_id = tok.eos_id if tok.eos_id is not None else (tok.bos_id or 0)
        self.chat = False  # set once lm-eval renders a prompt with the chat template

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.path)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.lm.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.chat = True
        return self.lm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces belong to the continuation (' word' is one BPE token), as in lm-eval.
        n = len(context) - len(context.rstrip(" "))
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        tok = self.lm.tokenizer
        ctx = tok.encode(context) if context else [self.prefix_id]
        return ctx or [self.prefix_id], tok.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        scores = score_requests(self.lm.model, pairs, batch_size=self.batch_size,
                                pad_id=self.lm.tokenizer.pad_id or 0, truncate=True,
                                prefix_cache=self.prefix_cache)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [rolling_logprob(self.lm.model, self.lm.tokenizer.encode(r.args[0]), self.prefix_id)
                for r in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import torch

        from lmforge.data.chat_template import end_of_turn_ids
        from lmforge.infer.generate import generate
        from lmforge.infer.sampling import SamplingParams

        self.lm.check_generates()
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        turn_end = end_of_turn_ids(self.lm.tokenizer) if self.chat else []
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
            sampling = {"temperature": float(kwargs.get("temperature", 1.0)), "top_p": float(kwargs.get("top_p") or 1.0),
                        "top_k": int(kwargs.get("top_k") or 0)} if sample else {}
            keep = max(1, self.lm.config.context - max_new)
            for b in range(0, len(indices), self.batch_size):
                rows = indices[b:b + self.batch_size]
                prompts = [self._encode_pair(requests[i].args[0], "")[0][-keep:] for i in rows]
                params = SamplingParams(max_new_tokens=max_new, stop=[until] if isinstance(until, str) else list(until),
                                        seed=int(torch.randint(0, 1 << 62, (1,))) if sample else 0, **sampling)
                done = generate(self.lm.model, self.lm.tokenizer, prompts, params, stop_token_ids=turn_end)
                for i, c in zip(rows, done):
                    out[i] = c.text
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
