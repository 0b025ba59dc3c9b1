"""Direct preference optimization (Rafailov et al., 2023) on prompt/chosen/rejected JSONL.

    {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"}
    {"messages": [{"role": "user", "content": "2 + 2?"}], "chosen": "4", "rejected": "5"}

A text prompt is continued as it is, as SFT continues a prompt/completion pair (the reply then
EOS). A chat (`messages`, or `prompt` given as a list of messages) is rendered with the model's
chat template exactly as SFT renders a conversation, the reply being the assistant's next turn
(with the template's end-of-turn marker); earlier assistant turns are context.

The loss is -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))),
each log-probability summed over the response tokens. The reference is the model as training
starts (the base, or base + a fresh LoRA adapter, which computes the same function), so its
log-probabilities are computed once, up front, in eval mode: no second copy of the model is
kept. Each evaluation reports the loss, the mean reward margin and how often chosen wins.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.sft import (
    IGNORE, EpochBatches, Row, check_messages, chunks, collate, encode_pieces, read_jsonl, reply_pieces,
    split_validation,
)
from lmforge.errors import LmforgeError
from lmforge.train.distributed import BatchShare


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's target tokens: (rows,)."""
    logits = model(batch["input_ids"]).float()
    y = batch["targets"]
    keep = y != IGNORE
    logp = torch.gather(logits.log_softmax(-1), 2, y.clamp(min=0)[..., None])[..., 0]
    return (logp * keep).sum(-1)


def _context(obj: dict, line: int, path: str) -> str | list[dict[str, str]]:
    """The text prompt, or the chat (a list of messages) that the replies answer."""
    chat = obj.get("messages", obj.get("prompt"))
    if isinstance(chat, str) and "messages" not in obj:
        return chat
    if not isinstance(chat, list):
        raise LmforgeError(f"{path} line {line}: expected the context as 'prompt' (text) or 'messages' (a chat: "
                           "a list of role/content messages)")
    messages = check_messages(chat, line, Path(path))
    if messages[-1]["role"] == "assistant":
        raise LmforgeError(f"{path} line {line}: the chat ends with an assistant turn; it should end where the reply "
                           "('chosen' or 'rejected') begins")
    return messages


def _reply(value, chat: bool):
    """A reply as text; a chat's reply may also be given as one assistant message (the Hugging Face TRL layout)."""
    if chat and isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        return value[0].get("content")
    return value


class DPOTask:
    head = None
    task_type = "CAUSAL_LM"

    def __init__(self, cfg, loaded, device, log, share: BatchShare | None = None):
        self.share = share or BatchShare()  # the loss is a mean over pairs: this process's pairs, unweighted
        tok, self.context = loaded.tokenizer, loaded.config.context
        self.pad_id, self.beta = tok.pad_id if tok.pad_id is not None else 0, cfg.dpo.beta
        self.batch_size, self.eval_batches = cfg.train.batch_size, cfg.eval.batches
        pairs = self._load(cfg.data.train, tok, cfg.data.on_long)
        if cfg.data.val:
            val = self._load(cfg.data.val, tok, cfg.data.on_long)
        else:
            pairs, val = split_validation(pairs, cfg.data.val_fraction, cfg.train.seed)
        self.pairs, self.val_pairs = pairs, val
        log(f"dpo: {len(pairs)} training pairs, {len(val)} validation pairs; computing reference log-probs")
        model = loaded.model.to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for group in (self.pairs, self.val_pairs):
                for chunk in chunks(group, self.batch_size):
                    ref = sequence_logps(model, {k: v.to(device) for k, v in self._collate(chunk).items()}).cpu()
                    n = len(chunk)
                    for pair, c, r in zip(chunk, ref[:n], ref[n:]):
                        pair["ref"] = (float(c), float(r))
        model.train(was_training)
        self.batches = EpochBatches(self.pairs, cfg.train.batch_size, cfg.train.seed)
        self.tokens_per_batch = 2 * cfg.train.batch_size * self.context

    def _load(self, path: str, tok, on_long: str) -> list[dict]:
        out, too_long = [], []
        for line, obj in read_jsonl(path):
            context = _context(obj, line, path)
            replies = [_reply(obj.get(k), isinstance(context, list)) for k in ("chosen", "rejected")]
            if not all(isinstance(r, str) for r in replies):
                raise LmforgeError(f"{path} line {line}: expected string fields 'chosen' and 'rejected' (the two "
                                   "replies)")
            if replies[0] == replies[1]:
                raise LmforgeError(f"{path} line {line}: chosen and rejected are the same text")
            rows = []
            for reply in replies:
                if isinstance(context, list):
                    ids, labels = encode_pieces(tok, reply_pieces(tok, context, reply))
                else:
                    ids, labels = encode_pieces(tok, [(context, False), (reply, True)])
                    if tok.eos_id is not None:
                        ids, labels = ids + [tok.eos_id], labels + [tok.eos_id]
                if len(ids) > self.context + 1:
                    too_long.append(line)
                    ids, labels = ids[:self.context + 1], labels[:self.context + 1]
                if all(label == IGNORE for label in labels[1:]):
                    raise LmforgeError(f"{path} line {line}: the prompt fills the context, leaving no response "
                                       "tokens to compare")
                rows.append(Row(ids[:-1], labels[1:], [1] * (len(ids) - 1)))
            out.append({"rows": rows, "line": line})
        if too_long and on_long == "error":
            raise LmforgeError(f"{Path(path)}: {len(set(too_long))} pair(s) longer than the context of {self.context} "
                               f"tokens (first at line {too_long[0]}); shorten them or use --data.on_long truncate")
        return out

    def _collate(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        """Chosen rows first, then rejected rows."""
        rows = [p["rows"][0] for p in pairs] + [p["rows"][1] for p in pairs]
        b = collate(rows, self.pad_id, packed=False)
        if all("ref" in p for p in pairs):
            b["ref"] = torch.tensor([p["ref"][0] for p in pairs] + [p["ref"][1] for p in pairs])
        return b

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return self._collate(self.share.items(self.batches.batch(index)))

    def margins(self, model, b) -> torch.Tensor:
        """beta * ((policy - reference) on chosen - (policy - reference) on rejected), per pair."""
        diff = sequence_logps(model, b) - b["ref"]
        n = diff.shape[0] // 2
        return self.beta * (diff[:n] - diff[n:])

    def loss(self, model, b) -> torch.Tensor:
        return -F.logsigmoid(self.margins(model, b)).mean()

    def evaluate(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        margins = []
        for i, chunk in enumerate(chunks(self.val_pairs, self.batch_size)):
            if i >= self.eval_batches:
                break
            margins.append(self.margins(model, {k: v.to(device) for k, v in self._collate(chunk).items()}))
        if not margins:
            return {}
        m = torch.cat(margins)
        return {"val_loss": float(-F.logsigmoid(m).mean()), "reward_margin": float(m.mean()),
                "preference_accuracy": float((m > 0).float().mean())}

    def head_record(self) -> dict:
        return {}
