"""The typed recipe: YAML round trip, helpful errors for unknown fields / names / options, method shorthands, and
re-running the recipe written next to a checkpoint."""
from __future__ import annotations

import pytest
import torch
import yaml

import core
from conftest import save_tiny, tiny_model
from core import CalibrationConfig, LayerSelection, LoadConfig, Recipe, Target
from core.errors import InvalidTargetError, PruningError, RecipeError, UnknownNameError
from core.export import RECIPE_FILE
from core.prune import normalize

FULL = Recipe(
    method="attention_heads", target=Target(ratio=0.2), model="org/some-model", revision="v1.0",
    score="activation", round_to=8, layers=LayerSelection(ratios=(0.0, 0.5, 0.25, 0.0)),
    options={"mode": "query"},
    calibration=CalibrationConfig(source="data/calib.jsonl", n_samples=16, seq_len=64, seed=7, split="validation",
                                  text_field="content"),
    batch_size=4, seed=3,
    load=LoadConfig(dtype="bfloat16", device="cuda:1", device_map="auto", allow_pickle=True, trust_remote_code=True),
)


def _base(**changes) -> dict:
    data = {"method": "mlp_width", "target": {"ratio": 0.25}}
    data.update(changes)
    return data


def test_full_recipe_yaml_round_trip():
    text = FULL.to_yaml()
    assert Recipe.from_yaml(text) == FULL
    plain = yaml.safe_load(text)
    assert plain["layers"]["ratios"] == [0.0, 0.5, 0.25, 0.0]  # tuples are written as plain YAML lists
    assert plain["target"]["ratio"] == 0.2 and plain["load"]["device_map"] == "auto"
    assert Recipe.from_dict(FULL.to_dict()) == FULL


def test_minimal_recipe_gets_defaults():
    recipe = Recipe.from_yaml("method: maw\ntarget: {ratio: 0.5}\n")
    assert recipe == Recipe(method="maw", target=Target(ratio=0.5))
    assert recipe.calibration == CalibrationConfig() and recipe.load == LoadConfig() and recipe.round_to == 1


@pytest.mark.parametrize("data,where,suggestion", [
    (_base(scor="l2"), "recipe", "score"),
    (_base(target={"ratoi": 0.5}), "recipe.target", "ratio"),
    (_base(calibration={"n_sample": 4}), "recipe.calibration", "n_samples"),
    (_base(layers={"protect_frist": 1}), "recipe.layers", "protect_first"),
    (_base(load={"allow_pickles": True}), "recipe.load", "allow_pickle"),
])
def test_unknown_field_suggests_the_closest(data, where, suggestion):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(data)
    message = str(err.value)
    assert f"in {where}." in message and f"Did you mean {suggestion!r}?" in message
    assert "Known fields:" in message


@pytest.mark.parametrize("data,match", [
    (_base(round_to="eight"), r"recipe\.round_to must be of type int"),
    (_base(round_to=True), r"recipe\.round_to must be of type int"),
    (_base(batch_size=2.5), r"recipe\.batch_size must be of type int"),
    (_base(target={"ratio": "half"}), r"recipe\.target\.ratio must be of type float"),
    (_base(target=0.5), r"recipe\.target must be a mapping"),
    (_base(layers={"ratios": 0.5}), r"recipe\.layers\.ratios must be a list"),
    (_base(layers={"ratios": [0.5, "x"]}), r"recipe\.layers\.ratios must be of type float"),
    (_base(load={"allow_pickle": "yes"}), r"recipe\.load\.allow_pickle must be of type bool"),
    (_base(options=["mode"]), r"recipe\.options must be a mapping"),
    (_base(model=123), r"recipe\.model must be of type str"),
    (_base(round_to=0), r"round_to must be >= 1"),
    ({"target": {"ratio": 0.5}}, r"method"),
])
def test_wrong_types_are_recipe_errors(data, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(data)


def test_harmless_numeric_coercions():
    recipe = Recipe.from_dict(_base(batch_size=4.0, target={"target_params": 5e5}))
    assert recipe.batch_size == 4 and isinstance(recipe.batch_size, int)
    assert recipe.target.target_params == 500_000 and isinstance(recipe.target.target_params, int)


def test_invalid_yaml_and_non_mapping():
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("method: [maw\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        Recipe.from_yaml("- maw\n")
    with pytest.raises(InvalidTargetError, match=r"\[0, 1\)"):  # a target error keeps its own type
        Recipe.from_yaml("method: maw\ntarget: {ratio: 1}\n")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="Cannot read recipe"):
        Recipe.from_file(tmp_path / "none.yaml")


@pytest.mark.parametrize("score", ["maw", "maw_range", "vow", "pon", "l2", "activation", "random"])
def test_method_shorthand(score):
    recipe = normalize(Recipe(method=score, target=Target(ratio=0.5)))
    assert (recipe.method, recipe.score) == ("mlp_width", score)


def test_normalize_fills_the_default_score():
    assert normalize(Recipe(method="mlp_width", target=Target(ratio=0.5))).score == "maw"
    assert normalize(Recipe(method="attention_heads", target=Target(ratio=0.5))).score == "magnitude"
    assert normalize(Recipe(method="depth", target=Target(ratio=0.25))).score == "cosine"


@pytest.mark.parametrize("method,suggestion", [("mlp_widht", "mlp_width"), ("attention_head", "attention_heads"),
                                               ("maww", "maw"), ("dept", "depth")])
def test_unknown_method_lists_available_with_did_you_mean(method, suggestion):
    with pytest.raises(UnknownNameError) as err:
        normalize(Recipe(method=method, target=Target(ratio=0.5)))
    message = str(err.value)
    assert f"Did you mean {suggestion!r}?" in message
    for name in ("mlp_width", "attention_heads", "depth"):
        assert name in message
    assert isinstance(err.value, PruningError) and isinstance(err.value, KeyError)
    assert not message.startswith(("'", '"'))  # not KeyError's quoted repr


def test_unknown_score_names_the_method_scores():
    with pytest.raises(UnknownNameError, match=r"Did you mean 'magnitude'\?.*activation, entropy, magnitude, random, taylor"):
        normalize(Recipe(method="attention_heads", score="magnitud", target=Target(ratio=0.5)))


def test_unknown_option_and_bad_option_values():
    with pytest.raises(RecipeError, match="has no option 'mdoe'; its options are: mode"):
        normalize(Recipe(method="attention_heads", options={"mdoe": "query"}, target=Target(ratio=0.5)))
    with pytest.raises(RecipeError, match="has no option 'mode'; its options are: none"):
        normalize(Recipe(method="maw", options={"mode": "query"}, target=Target(ratio=0.5)))
    with pytest.raises(RecipeError, match="mode must be one of"):
        normalize(Recipe(method="attention_heads", options={"mode": "keys"}, target=Target(ratio=0.5)))
    with pytest.raises(RecipeError, match="unit must be one of"):
        normalize(Recipe(method="depth", options={"unit": "layer"}, target=Target(ratio=0.5)))


@pytest.mark.parametrize("method", ["attention_heads", "depth"])
@pytest.mark.parametrize("target", [Target(expansion_rate=2.0), Target(width=64)])
def test_mlp_only_targets_are_rejected_for_other_methods(method, target):
    with pytest.raises(InvalidTargetError, match="MLP width pruning only"):
        normalize(Recipe(method=method, target=target))
    assert normalize(Recipe(method="maw", target=target)).method == "mlp_width"


def test_recipe_written_next_to_a_checkpoint_reruns(tmp_path):
    src = save_tiny(tiny_model("qwen2"), tmp_path / "src")
    recipe = Recipe(model=str(src), method="mlp_width", score="activation", target=Target(ratio=0.25),
                    layers=LayerSelection(protect_last=1), calibration=CalibrationConfig(n_samples=4, seq_len=32),
                    load=LoadConfig(device="cpu"))
    first = core.run_recipe(recipe, stream=False)  # in memory: the weights are compared below
    out = core.save_pruned(first, tmp_path / "out")
    doc = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert doc["result"]["params_after"] == first.params_after["total"]  # results are stored next to the recipe

    again = Recipe.from_file(out / RECIPE_FILE)
    assert again == first.recipe  # the normalised recipe, result section dropped
    second = core.run_recipe(again, stream=False)
    assert second.layers() == first.layers()
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("data,match", [
    (_base(target={"param_ratio": 0.1}, layers={"ratios": [0.1, 0.2, 0.3, 0.4]}), "per-layer ratios"),
    (_base(layers={"ratios": [0.1, 0.2, 0.3, 0.4], "protect_first": 1}), "not both"),
    (_base(method="maw", score="l2"), "conflicts with score"),
    (_base(score="activation", calibration={"source": "/no/such/calib.txt"}), "does not exist"),
])
def test_conflicting_requests_fail_before_any_model_is_loaded(data, match):
    with pytest.raises(PruningError, match=match):
        normalize(Recipe.from_dict(data))


def test_a_method_describes_itself_by_the_first_sentence_of_its_doc():
    import sys
    import types

    from core.methods import Method

    class Documented(Method):
        """Removes planted units. A second sentence.

        A second paragraph."""

    module = types.ModuleType("planted_method", "Removes whole planted blocks, one at a time. More words.\n\nMore.")
    sys.modules[module.__name__] = module
    try:
        Undocumented = type("Undocumented", (Method,), {"__module__": module.__name__})
        assert Documented().describe() == "Removes planted units"
        assert Undocumented().describe() == "Removes whole planted blocks, one at a time"  # not Method's own doc
    finally:
        del sys.modules[module.__name__]


@pytest.mark.parametrize("method,score,options,streams", [
    ("mlp_width", "maw", {}, True),                   # a weight score: block by block
    ("mlp_width", "activation", {}, True),            # one block's inputs
    ("slimllm", None, {}, True),                      # the default score (none named)
    ("mlp_width", "taylor", {}, False),               # whole-model gradients
    ("depth", "taylor", {}, False),
    ("depth", "cosine", {"recovery": "learned_bias"}, False),  # trains constants through the whole model
    ("depth", "cosine", {"recovery": "mean_update"}, True),
])
def test_which_recipes_stream(method, score, options, streams):
    from core.methods import METHODS

    recipe = Recipe(method=method, score=score, target=Target(ratio=0.25), options=options)
    assert METHODS.get(method).streams(recipe) is streams


def test_should_stream_follows_the_recipe_and_refuses_what_cannot_stream(tmp_path):
    from core.model_io import LoadOptions
    from core.prune import should_stream
    from core.recover_config import RecoverConfig

    src = str(save_tiny(tiny_model("llama"), tmp_path / "src"))
    opts = LoadOptions()
    plain = Recipe(method="maw_range", target=Target(ratio=0.3))  # a shorthand: normalised first
    assert should_stream(plain, src, opts) is True and should_stream(plain, src, opts, stream=False) is False
    trained = Recipe(method="maw", target=Target(ratio=0.3), recover=RecoverConfig(steps=2))
    assert should_stream(trained, src, opts) is False  # the bot and run_recipe load such a model whole
    with pytest.raises(RecipeError, match="recover"):
        should_stream(trained, src, opts, stream=True)
    gradients = Recipe(method="mlp_width", score="taylor", target=Target(ratio=0.3))
    assert should_stream(gradients, src, opts) is False
    with pytest.raises(RecipeError, match="cannot stream"):
        should_stream(gradients, src, opts, stream=True)
