"""POST /v1/classify and POST /v1/tag: the task head that `lmforge finetune --task classify|tag`
trained, over HTTP, with what `lmforge classify` / `lmforge tag` print (train/labeling.py).

The server finds the head where the fine-tune saved it: head.json and head.safetensors in the
served model directory (full fine-tuning) or in the --adapter directory (LoRA, whose weights the
server merges). A server without one answers these routes 404, and one with the other kind of
head names the route that serves it. Inputs are held to the same limits as embeddings' and
charged to the key's token rate limit; the head runs in a worker thread (`ModelTurn`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.serve.errors import APIError
from lmforge.serve.prompts import PromptEncoder
from lmforge.serve.protocol import ClassifyRequest, TagRequest, listed_inputs
from lmforge.serve.services.embeddings import ModelTurn, TokenCharge, record_folder
from lmforge.serve.settings import ServeSettings
from lmforge.train.labeling import classification, tag_text

ROUTES = {"classify": "/v1/classify", "tag": "/v1/tag"}


def load_served_head(model, tokenizer, folders: list[Path]):
    """A TaskModel over the served model with the head found in `folders`, or None."""
    from lmforge.loaded import LoadedModel
    from lmforge.train.classify import TaskModel, load_head

    folder = record_folder(folders, "head.json")
    if folder is None or not (folder / "head.safetensors").is_file():
        return None
    head, record = load_head(folder)
    if head.score.in_features != model.config.d_model:
        raise LmforgeError(f"the task head in {folder} reads {head.score.in_features}-wide hidden states, but the "
                           f"served model's are {model.config.d_model} wide: serve the model it was trained on")
    return TaskModel(LoadedModel(model, tokenizer), head, record)


class HeadService:
    def __init__(self, tuned, prompts: PromptEncoder, settings: ServeSettings, charge: TokenCharge, turn: ModelTurn):
        self.tuned, self.prompts, self.settings, self.charge, self.turn = tuned, prompts, settings, charge, turn

    @property
    def task(self) -> str | None:
        return self.tuned.task if self.tuned is not None else None

    def _head(self, task: str):
        if self.task == task:
            return self.tuned
        kind = {"classify": "classification", "tag": "tagging"}[task]
        also = f"; its head is a {self.task} head, served at {ROUTES[self.task]}" if self.task else ""
        raise APIError(404, f"the model '{self.settings.model_name}' has no {kind} head{also}. {ROUTES[task]} serves "
                       f"a model fine-tuned with lmforge finetune --task {task} (its directory holds head.json)",
                       "not_found_error", code="no_task_head")

    def _answer(self, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
        return {"object": "list", "data": data, "model": self.settings.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def classify(self, body: ClassifyRequest, key_id: str) -> dict[str, Any]:
        tuned = self._head("classify")
        rows = await self.prompts.encode(listed_inputs(body.input, self.settings.max_embedding_inputs), what="input")
        tokens = sum(map(len, rows))
        self.charge(key_id, tokens)
        probabilities = await self.turn.run(tuned.probabilities_of, rows, self.settings.max_batch)
        return self._answer([{"index": i, **classification(tuned.labels, p)} for i, p in enumerate(probabilities)],
                            tokens)

    async def tag(self, body: TagRequest, key_id: str) -> dict[str, Any]:
        tuned = self._head("tag")
        texts = listed_inputs(body.input, self.settings.max_embedding_inputs)
        rows = await self.prompts.encode(texts, what="input")  # the limits, and the usage
        tokens = sum(map(len, rows))
        self.charge(key_id, tokens)
        tagged = await self.turn.run(lambda: [tag_text(tuned, text) for text in texts])
        return self._answer([{"index": i, **t} for i, t in enumerate(tagged)], tokens)
