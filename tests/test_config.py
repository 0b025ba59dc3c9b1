"""Recipes: typed defaults, YAML files, dotted command-line overrides, errors that name the key."""

from __future__ import annotations

import pytest

from lmforge.config import Recipe, builtin_recipes, load_recipe, parse_overrides
from lmforge.errors import LmforgeError


def test_overrides_parse_both_spellings_and_yaml_scalars():
    assert parse_overrides(["--train.lr", "3e-4", "--model.family=gpt2", "--train.compile", "true",
                            "--model.n_kv_head=", "--run.name", "a b"]) == {
        "train": {"lr": "3e-4", "compile": True}, "model": {"family": "gpt2", "n_kv_head": None},
        "run": {"name": "a b"}}


def test_overrides_apply_on_top_of_a_recipe():
    recipe = load_recipe("tiny", ["--train.lr", "3e-4", "--model.family=gpt2", "--model.n_kv_head=",
                                  "--model.rope_scaling", "null", "--data.tokenizer.vocab_size", "300"])
    assert recipe.train.lr == pytest.approx(3e-4) and isinstance(recipe.train.lr, float)
    assert recipe.model.family == "gpt2" and recipe.model.n_kv_head is None
    assert recipe.data.tokenizer.vocab_size == 300
    assert recipe.model.d_model == 64  # untouched keys keep the recipe's values
    assert recipe.train.seed == 0  # and keys the recipe does not set keep the defaults


@pytest.mark.parametrize(("args", "message"), [
    (["--train.lrr", "1"], "train.lrr: unknown key"),
    (["--trainer.lr", "1"], "trainer: unknown key"),
    (["--model.n_layer", "many"], "model.n_layer"),
    (["--train.schedule", "linear"], "train.schedule"),
    (["--model.d_model", "30"], "divisible"),
    (["--train.lr"], "needs a value"),
    (["train.lr", "1"], "unexpected argument"),
    (["--train.lr=1", "--train.lr.x", "2"], "conflicts"),
])
def test_bad_overrides_are_errors_that_name_the_key(args, message):
    with pytest.raises(LmforgeError, match=message.replace(".", r"\.")) as info:
        load_recipe("tiny", args)
    assert "\n" not in str(info.value)


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {family: llama, n_layers: 4}\n")
    with pytest.raises(LmforgeError, match=r"model\.n_layers: unknown key") as info:
        load_recipe(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("text", "message"), [("model: [1, 2\n", "not valid YAML"),
                                               ("- just\n- a list\n", "must be a YAML mapping"),
                                               ("model: 3\n", "model")])
def test_malformed_recipe_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(LmforgeError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_missing_recipe_lists_the_built_in_ones():
    with pytest.raises(LmforgeError, match="tiny"):
        load_recipe("no-such-recipe")


def test_every_built_in_recipe_loads_and_round_trips(tmp_path):
    assert {"quickstart", "tiny", "gpt2-124m"} <= set(builtin_recipes())
    for name in builtin_recipes():
        recipe = load_recipe(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe.to_yaml())
        assert load_recipe(path) == recipe


def test_empty_file_and_no_source_mean_all_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_recipe(tmp_path / "empty.yaml") == load_recipe(None) == Recipe()


def test_a_file_named_like_a_built_in_recipe_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("train: {lr: 0.5}\n")
    assert load_recipe("tiny").train.lr == 0.5


# ----------------------------------------------------------------------------- every YAML config, one loader

def _loaders():
    from lmforge.data.clean.recipe import load_recipe as load_cleaning_recipe
    from lmforge.train.finetune import load_finetune_config

    return {"recipe": load_recipe, "fine-tuning config": load_finetune_config, "cleaning recipe": load_cleaning_recipe}


@pytest.mark.parametrize("kind", ["recipe", "fine-tuning config", "cleaning recipe"])
def test_every_config_file_gets_the_same_errors(tmp_path, kind):
    """The pretraining recipe, the fine-tuning config and the cleaning recipe are read by one
    loader: the same one-line errors, each naming the file and what to do."""
    load = _loaders()[kind]
    cases = {
        "broken.yaml": ("train: {lr: 1\n", r"broken\.yaml is not valid YAML at line 2, column 1: expected ','"),
        "list.yaml": ("- a\n- b\n", r"list\.yaml must be a YAML mapping of the keys "),
        "latin1.yaml": (b"train: {lr: caf\xe9}\n", r"latin1\.yaml is not UTF-8 text"),
        "typo.yaml": ("trian: {}\n", rf"invalid {kind} .*typo\.yaml: trian: unknown key \(did you mean train\?\)"
                      if kind != "cleaning recipe" else r"trian: unknown key \(the top level has: reader, "),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(LmforgeError, match=message) as info:
            load(path)
        assert "\n" not in str(info.value)
    with pytest.raises(LmforgeError, match=rf"^{kind} {tmp_path / 'none.yaml'} does not exist: give .*a YAML file or a "
                                            rf"built-in {kind} \(") as info:
        load(tmp_path / "none.yaml")
    with pytest.raises(LmforgeError, match="is not a file"):
        load(tmp_path)


@pytest.mark.parametrize(("kind", "text", "message"), [
    ("recipe", "train: {lrr: 0.1}\n", r"train\.lrr: unknown key \(did you mean train\.lr\?\)"),
    ("recipe", "model: {rope_scaling: {factr: 2}}\n", r"model\.rope_scaling\.factr: unknown key \(did you mean "
                                                      r"model\.rope_scaling\.factor\?\)"),
    ("recipe", "eval: {zzz: 1}\n", r"eval\.zzz: unknown key \(eval has: every, batches\)"),
    ("fine-tuning config", "base: m\ndata: {train: t.jsonl}\nlora: {rank: 8}\n", r"lora\.rank: unknown key"),
    ("cleaning recipe", "dedup: {bandz: 3}\n", r"dedup\.bandz: unknown key \(did you mean dedup\.bands\?\)"),
])
def test_an_unknown_key_gets_the_nearest_valid_one(tmp_path, kind, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(LmforgeError, match=message):
        _loaders()[kind](path)


def test_settings_problems_are_named_by_their_command_line_flags():
    """`from_flags`: each bad option is one line naming the flag the user typed (renamed ones
    included); a problem of the options together is its message alone."""
    from lmforge.config import from_flags
    from lmforge.infer.sampling import SamplingParams
    from lmforge.serve.settings import FLAGS, ServeSettings

    with pytest.raises(LmforgeError) as e:
        from_flags(SamplingParams, {"max_new_tokens": "max-tokens"}, max_new_tokens=-1, top_p=1.5)
    assert str(e.value) == "--max-tokens must be >= 0; --top-p must be in (0, 1] (1: off)"
    with pytest.raises(LmforgeError, match=r"^--header-timeout must be more than 0 seconds$"):
        from_flags(ServeSettings, FLAGS, model_name="m", header_timeout=0.0)
    with pytest.raises(LmforgeError, match=r"^--served-model-name: Input should be a valid string$"):
        from_flags(ServeSettings, FLAGS, model_name=None)
    with pytest.raises(LmforgeError, match=r"^give --speculative ngram or --draft MODEL, not both$"):
        from_flags(ServeSettings, FLAGS, model_name="m", speculative="ngram", draft="small")
    settings = from_flags(ServeSettings, FLAGS, model_name="m", max_batch=4)
    assert (settings.max_batch, settings.header_timeout, settings.cors_origins) == (4, 10.0, [])


def test_sampling_params_are_a_frozen_section():
    from pydantic import ValidationError

    from lmforge.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0.7, stop=["\n\n"], seed=3)
    with pytest.raises(ValidationError):
        params.temperature = 2.0  # a request's parameters stay what was checked
    with pytest.raises(ValidationError, match="topp"):
        SamplingParams(topp=0.9)  # a misspelt field is an error, not ignored
    hotter = params.model_copy(update={"temperature": 1.0})
    assert (hotter.temperature, hotter.stop, hotter.seed, params.temperature) == (1.0, ["\n\n"], 3, 0.7)
