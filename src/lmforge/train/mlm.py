"""Masked-language-model pretraining of a bidirectional encoder (BERT's objective).

Each step draws token windows as pretraining does (`BatchLoader` over prepared shards), picks
15% of the positions (`mlm.mask_prob`) to predict, and of those replaces 80% with the mask
token, 10% with a random token and leaves 10% unchanged; the loss is over the picked positions
only. The encoder is the same `Transformer` with `model.causal: false` (no causal mask, no KV
cache); its tied output head predicts the masked tokens. Fine-tune it afterwards with a task
head (`--task classify|tag`), which mean-pools an encoder's hidden states.

The mask token is the tokenizer's `<|mask|>`, or the first reserved special token
(`<|reserved_0|>`) that lmforge tokenizers carry for this purpose.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.sft import IGNORE
from lmforge.data.tokenizer import mask_token_id
from lmforge.errors import LmforgeError
from lmforge.train.distributed import BatchShare, weighted

def mask_tokens(x: torch.Tensor, mask_id: int, vocab: int, prob: float, generator: torch.Generator,
                special: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted inputs, targets): targets are IGNORE except at the picked positions."""
    pick = torch.rand(x.shape, generator=generator) < prob
    if special is not None:
        pick &= ~torch.isin(x, special)
    if not pick.any():  # never a batch with nothing to learn
        pick[0, 0] = True
    targets = torch.where(pick, x, torch.full_like(x, IGNORE))
    roll = torch.rand(x.shape, generator=generator)
    inputs = torch.where(pick & (roll < 0.8), torch.full_like(x, mask_id), x)
    random_tokens = torch.randint(0, vocab, x.shape, generator=generator)
    inputs = torch.where(pick & (roll >= 0.8) & (roll < 0.9), random_tokens, inputs)
    return inputs, targets


def data_dir(cfg, tokenizer_source: str | None) -> Path:
    """A prepared directory (`lmforge data prepare`), or the corpus/file prepared under the run."""
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data.prepare import INDEX, prepare

    given = Path(cfg.data.train)
    if (given / INDEX).is_file():
        return given
    vocab = cfg.model.vocab_size if cfg.model is not None and cfg.model.vocab_size else 4096
    data = DataConfig(corpus=cfg.data.train, text_field=cfg.data.text_field,
                      tokenizer=TokenizerConfig(vocab_size=vocab, path=tokenizer_source))
    return prepare(data, cfg.run.dir / "data")


def new_encoder(cfg, log):
    """A freshly initialized bidirectional encoder sized by `cfg.model`, with the data's tokenizer."""
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.loaded import LoadedModel
    from lmforge.model import Transformer

    folder = data_dir(cfg, None)
    tokenizer = TextTokenizer.load(folder)
    model_cfg = cfg.model.model_copy(update={"causal": False, "vocab_size": cfg.model.vocab_size or tokenizer.vocab_size})
    if model_cfg.vocab < tokenizer.vocab_size:
        raise LmforgeError(f"model.vocab_size {model_cfg.vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    model = Transformer(model_cfg)
    log(f"mlm: new encoder, {model.num_params():,} parameters, data {folder}")
    return LoadedModel(model, tokenizer, None, {})


class MLMTask:
    head = None
    task_type = "FEATURE_EXTRACTION"

    def __init__(self, cfg, loaded, device, log, share: BatchShare | None = None):
        from lmforge.data.loader import BatchLoader, TokenSplit

        self.share = share or BatchShare()

        if loaded.config.causal:
            raise LmforgeError("task mlm needs a bidirectional encoder (model.causal: false); a causal model cannot "
                               "see the tokens after a mask")
        folder = data_dir(cfg, str(cfg.base) if cfg.base else None)
        self.train, self.val = TokenSplit(folder, "train"), TokenSplit(folder, "val")
        if self.train.vocab_size > loaded.config.vocab:
            raise LmforgeError(f"{folder} was tokenized with a larger vocabulary than the model has")
        self.context, self.seed, self.prob = loaded.config.context, cfg.train.seed, cfg.mlm.mask_prob
        self.vocab, self.mask_id = loaded.config.vocab, mask_token_id(loaded.tokenizer)
        specials = [i for i in (loaded.tokenizer.eos_id, loaded.tokenizer.pad_id) if i is not None]
        self.special = torch.tensor(specials, dtype=torch.long) if specials else None
        self.loader = BatchLoader(self.train, cfg.train.batch_size, self.context, cfg.train.seed)
        self.batch_size, self.eval_batches = cfg.train.batch_size, cfg.eval.batches
        self.tokens_per_batch = cfg.train.batch_size * self.context

    def _masked(self, x: torch.Tensor, index: int, salt: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 2 + salt)
        inputs, targets = mask_tokens(x, self.mask_id, self.vocab, self.prob, g, self.special)
        return {"input_ids": inputs, "targets": targets}

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        x, _ = self.loader.batch(index)
        b = self._masked(x, index, 0)  # the masks of the whole batch, as one process draws them
        return self.share.rows(b, counted=b["targets"] != IGNORE)

    def loss(self, model, b) -> torch.Tensor:
        logits = model(b["input_ids"]).float()
        return weighted(F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=IGNORE), b)

    def evaluate(self, model) -> dict[str, float]:
        from lmforge.data.loader import sequential_windows

        device = next(model.parameters()).device
        total, count, correct = 0.0, 0, 0
        for i, (x, _) in enumerate(sequential_windows(self.val, self.context, self.batch_size, self.eval_batches)):
            b = {k: v.to(device) for k, v in self._masked(x, i, 1).items()}  # the same masks every evaluation
            logits = model(b["input_ids"]).float()
            keep = b["targets"] != IGNORE
            total += F.cross_entropy(logits[keep], b["targets"][keep], reduction="sum").item()
            correct += int((logits[keep].argmax(-1) == b["targets"][keep]).sum())
            count += int(keep.sum())
        if not count:
            return {}
        return {"val_loss": total / count, "masked_accuracy": correct / count}

    def head_record(self) -> dict:
        return {}
