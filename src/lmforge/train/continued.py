"""Continued pretraining: `lmforge train RECIPE --init-from MODEL_DIR` (`train.init_from`).

The model's own config replaces the recipe's model section and its weights are the starting
point; its tokenizer is the one the data must be tokenized with. Raw text (the recipe's
corpus) is prepared with that tokenizer; data already prepared with another tokenizer is
refused, since its token ids would mean other tokens to the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config import Recipe
from lmforge.data.prepare import INDEX, data_dir_for, read_index
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.interop.hf import from_hf_config
from lmforge.model import Transformer
from lmforge.model_dir import load_model_dir, load_tokenizer, read_json

# The parts of tokenizer.json that decide which ids a text becomes.
_TOKENIZER_PARTS = ("model", "normalizer", "pre_tokenizer", "added_tokens")


def same_tokenizer(a: TextTokenizer, b: TextTokenizer) -> bool:
    pa, pb = json.loads(a.backend.to_str()), json.loads(b.backend.to_str())
    return all(pa.get(k) == pb.get(k) for k in _TOKENIZER_PARTS)


def continued_pretraining(recipe: Recipe, log) -> Recipe:
    """`recipe` with the model section of `train.init_from` and its data tokenized with that model's tokenizer."""
    source = Path(recipe.train.init_from)
    if not (source / "config.json").is_file():
        raise LmforgeError(f"--init-from {source}: not a model directory (no config.json)")
    hf_config = read_json(source / "config.json")
    if "quantization_config" in hf_config:
        raise LmforgeError(f"--init-from {source}: a quantized model cannot train; start from the full-precision "
                           "model it was made from")
    config = from_hf_config(hf_config)
    if not config.causal:
        raise LmforgeError(f"--init-from {source}: a bidirectional encoder; continue its masked-LM pretraining with "
                           "`lmforge finetune --task mlm --base MODEL`")
    tokenizer = load_tokenizer(source)
    out = recipe.model_copy(deep=True)
    if recipe.model.model_dump(exclude={"vocab_size"}) != config.model_dump(exclude={"vocab_size"}):
        log(f"model: {source}'s own config ({config.n_layer} layers, d_model {config.d_model}, context "
            f"{config.context}) replaces the recipe's model section")
    out.model = config
    named = recipe.data.tokenizer.path
    if named and not same_tokenizer(TextTokenizer.load(named), tokenizer):
        raise LmforgeError(f"data.tokenizer.path {named} is not {source}'s tokenizer; leave it unset, and the "
                           "corpus is tokenized with the model's own")
    out.data.tokenizer.path = named or str(source)
    data_dir = data_dir_for(out)  # data.dir, or a folder named after the model's tokenizer
    if (data_dir / INDEX).is_file():
        if not same_tokenizer(TextTokenizer.load(data_dir), tokenizer):
            raise LmforgeError(f"{data_dir} was prepared with another tokenizer than {source}'s; prepare the text "
                               f"with the model's: `lmforge data prepare CORPUS --tokenizer {source} --out DIR`, or "
                               "leave data.dir unset and give the raw text as data.corpus")
        # Prepared with this tokenizer: reuse it as it was made.
        out.data.tokenizer.path = read_index(data_dir).get("settings", {}).get("tokenizer") or str(source)
    out.data.dir = str(data_dir)
    log(f"continued pretraining from {source}: its weights, config and tokenizer; data in {data_dir}")
    return out


def load_initial_weights(model: Transformer, source: str | Path, log) -> None:
    """Copy the weights of model directory `source` into `model` (built from the same config)."""
    loaded, _, _ = load_model_dir(source)
    missing = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise LmforgeError(f"--init-from {source}: its weights do not fit its config.json "
                           f"({len(missing.missing_keys)} missing, {len(missing.unexpected_keys)} unexpected)")
    log(f"initial weights: {source} ({loaded.num_params():,} parameters)")
