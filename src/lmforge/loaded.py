"""`lmforge.load(path)`: a model directory as one object with its tokenizer and config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.infer.chunked_prefill import DEFAULT_PREFILL_CHUNK
from lmforge.infer.generate import Completion, TextCallback, generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.model_dir import load_model_dir, save_model_dir


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: TextTokenizer
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def complete(self, prompts: list[str] | list[list[int]], on_text: TextCallback | None = None,
                 native: bool = True, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, kv_cache_dtype: str = "auto",
                 **sampling: Any) -> list[Completion]:
        """Completions of each prompt; `native=False` decodes through the PyTorch model only
        (see `generate` for `prefill_chunk` and `kv_cache_dtype`)."""
        self.check_generates()
        return generate(self.model, self.tokenizer, prompts, SamplingParams(**sampling), on_text, native,
                        prefill_chunk=prefill_chunk, kv_cache_dtype=kv_cache_dtype)

    def check_generates(self) -> None:
        """A user error unless the model writes text (a masked-LM encoder does not)."""
        if not self.config.causal:
            raise LmforgeError(f"{self.path or 'this model'} is a masked-LM encoder (bidirectional): it does not "
                               "generate text; give it a task head (lmforge finetune --task classify|tag) or score "
                               "it with lmforge eval --data (pseudo-perplexity)")

    def generate(self, prompts: list[str] | str, **sampling: Any) -> list[str]:
        """Continuations of each prompt (greedy unless `temperature` > 0)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return [c.text for c in self.complete(prompts, **sampling)]

    def save(self, out: str | Path, **provenance: Any) -> Path:
        parents = [str(self.path)] if self.path else []
        return save_model_dir(self.model, self.tokenizer, out, {"parents": parents, **provenance})


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, key: bytes | str | None = None,
         allow_pickle: bool = False) -> LoadedModel:
    """Load any model directory: ours, a Hugging Face one of a supported family, or an encrypted
    one given its `key` (32 bytes, or their hex/base64 text). `~` means the home directory, as in a shell."""
    path = Path(path).expanduser()
    model, tokenizer, meta = load_model_dir(path, device=device, dtype=dtype, allow_pickle=allow_pickle, key=key)
    return LoadedModel(model, tokenizer, path, meta)
