"""Format and language-consistency values on hand-made strings; composition by data source and YAML."""
import pytest
from hydra import compose, initialize_config_dir

from r1mega.config import CONF_DIR
from r1mega.rewards import RewardConfig, RewardManager, SourceConfig, TermConfig
from r1mega.rewards.format import format_reward
from r1mega.rewards.language import consistency


@pytest.mark.parametrize("completion, style, think_open, expected", [
    ("<think> 2+2=4 </think> <answer> 4 </answer>", "r1_zero", False, 1.0),
    ("\n<think>a</think>\n<answer>4</answer>\n", "r1_zero", False, 1.0),
    (" 2+2=4 </think> <answer> 4 </answer>", "r1_zero", True, 1.0),
    ("<think> 2+2=4 </think> <answer> 4 </answer> trailing", "r1_zero", False, 0.0),
    ("<think> a </think> <answer> 4 </answer><answer> 5 </answer>", "r1_zero", False, 0.0),
    ("<think> a </think><think> b </think> <answer> 4 </answer>", "r1_zero", False, 0.0),
    ("<think>  </think> <answer> 4 </answer>", "r1_zero", False, 0.0),
    ("<answer> 4 </answer>", "r1_zero", False, 0.0),
    ("<think> 2+2=4 </think> The sum is 4.", "r1", False, 1.0),
    ("<think> 2+2=4 </think>   ", "r1", False, 0.0),
    ("<think> a </think> b <think> c </think> d", "r1", False, 0.0),
    ("no tags at all", "r1", False, 0.0),
    # empty or degenerate blocks earn nothing
    ("<think> 2+2=4 </think> <answer>  </answer>", "r1_zero", False, 0.0),
    ("<think> 2+2=4 </think> <answer>\\boxed{}</answer>", "r1_zero", False, 0.0),
    ("<think> ... </think> <answer> 4 </answer>", "r1_zero", False, 0.0),
    ("<think> \\quad </think> <answer> 4 </answer>", "r1_zero", False, 0.0),
    ("<think> 2+2=4 </think> <answer>\\boxed{4}</answer>", "r1_zero", False, 1.0),
    ("<think> 2+2=4 </think> $\\,$", "r1", False, 0.0),
    ("2+2=4 </think> 四", "r1", True, 1.0),
    ("<think>2+2=4 </think> four", "r1", True, 0.0),  # the prompt opened <think>: a second one
])
def test_format_values(completion, style, think_open, expected):
    assert format_reward(completion, style=style, think_open=think_open) == expected


@pytest.mark.parametrize("completion, language, expected", [
    ("<think>I think 所以 answer</think> 42", "en", 3 / 5),
    ("<think>I think 所以 answer</think> 42", "zh", 2 / 5),
    ("<think>我们 计算 x = 3</think>", "zh", 4 / 5),
    ("<think>Die Straße ist lang</think>", "de", 1.0),
    ("<think>Die Straße ist lang</think>", "en", 3 / 4),
    ("<think>Привет world</think>", "ru", 1 / 2),
    ("<think>12 + 30 = 42</think>", "en", 0.0),  # no words at all
    ("<think>only english here</think> 但是总结是中文", "en", 1.0),  # only the chain of thought counts
    ("unclosed <think>one two", "en", 1.0),
])
def test_language_consistency_values(completion, language, expected):
    assert consistency(completion, language=language) == pytest.approx(expected)


def test_composition_picks_terms_by_data_source():
    cfg = RewardConfig(workers=0, sources={
        "default": SourceConfig([TermConfig("accuracy", 1.0), TermConfig("format", 0.5, {"style": "r1_zero"})]),
        "chat": SourceConfig([TermConfig("language", 2.0, {"language": "en"})]),
    })
    good = "<think> one plus one </think> <answer> \\boxed{2} </answer>"
    scores = RewardManager(cfg, "r1_zero").score([({"answer": "2"}, good), ({"answer": "3", "data_source": "gsm8k"}, good),
                                       ({"data_source": "chat"}, "<think>hello world 世界</think>")])
    assert scores == [{"accuracy": 1.0, "format": 1.0, "total": 1.5}, {"accuracy": 0.0, "format": 1.0, "total": 0.5},
                      {"language": 0.5, "total": 1.0}]
    with pytest.raises(KeyError, match="no reward terms"):
        RewardManager(RewardConfig(workers=0, sources={"chat": cfg.sources["chat"]}), "r1_zero").score([({}, "x")])
    for term, message in [(TermConfig("bogus"), r"terms\[0\].name='bogus' is not one of"),
                          (TermConfig("format", params={"stlye": "r1_zero"}), r"params.stlye is not a parameter"),
                          (TermConfig("format", params={"think_in_prompt": True}), "params.think_in_prompt is not a param"),
                          (TermConfig("accuracy", params={"think_open": True}), "params.think_open is not settable"),
                          (TermConfig("format", params={"style": "r1"}), "does not match the prompt template 'r1_zero'")]:
        with pytest.raises(ValueError, match=message):
            RewardManager(RewardConfig(workers=0, sources={"default": SourceConfig([term])}), "r1_zero")


@pytest.mark.parametrize("preset, names", [("r1_zero", ["accuracy", "format"]),
                                           ("r1_reasoning", ["accuracy", "format", "language"])])
def test_yaml_presets_compose_onto_the_schema(preset, names):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+reward={preset}", "reward.workers=0"])
    manager = RewardManager(cfg.reward, "r1_zero" if preset == "r1_zero" else "r1")
    assert [t.name for t in manager.cfg.sources["default"].terms] == names
    assert isinstance(manager.cfg, RewardConfig)
    completion = "<think> two and two </think> <answer> \\boxed{4} </answer>"
    out = manager.score([({"answer": "4"}, completion if preset == "r1_zero" else completion.removeprefix("<think>"))])[0]
    assert out["total"] == (3.0 if preset == "r1_reasoning" else 2.0)


def test_a_code_row_on_a_host_without_the_sandbox_stops_in_the_parent(monkeypatch):
    """Inside the grading pool the error would only score 0.0 for every code row."""
    import r1mega.rewards.sandbox as sandbox

    monkeypatch.setattr(sandbox, "bwrap_problem", lambda python="": "bwrap is not installed")
    cfg = RewardConfig(workers=0, sources={"default": SourceConfig([TermConfig("accuracy")]),
                                           "code": SourceConfig([TermConfig("code")])})
    manager = RewardManager(cfg, "r1_zero")
    assert manager.score([({"answer": "2"}, "\\boxed{2}")])[0]["total"] == 1.0  # math rows need no sandbox
    with pytest.raises(RuntimeError, match="needs bubblewrap, which does not run here"):
        manager.score([({"data_source": "code", "tests": {"inputs": ["1"], "outputs": ["1"]}}, "x")])
