"""Progress bars: every bar can be switched off, by its ``progress`` flag or by ``TQDM_DISABLE``
(read when the bar is made, so setting it after tqdm was imported counts too)."""

from __future__ import annotations

import pytest

from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.evaluation import metrics
from rlsedit_llm.pipeline import values
from rlsedit_llm.pipeline.stats import second_moments

TEXTS = ["The Eiffel Tower is in Paris, the capital of France. The Louvre is a museum in Paris."] * 20
FACTS = [{"prompt": "{} is located in the city of", "subject": "The Louvre", "target": "Rome"}]

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


@pytest.fixture
def model():
    return tiny_model("llama")


def _statistics(model, tmp_path, **kwargs) -> None:
    m, tok = model
    second_moments(m, tok, detect_spec(m), [0, 1], corpus=TEXTS, n_tokens=300, max_length=32,
                   cache_dir=tmp_path, resume=False, **kwargs)


def test_tqdm_disable_silences_the_statistics_pass(model, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _statistics(model, tmp_path)  # progress=True, the default
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_the_statistics_pass_shows_its_bar_unless_switched_off(model, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    _statistics(model, tmp_path / "a")
    assert "key statistics" in capfd.readouterr().err
    _statistics(model, tmp_path / "b", progress=False)
    assert capfd.readouterr().err == ""


def _values(model, **kwargs):
    m, tok = model
    spec = detect_spec(m)
    return values.compute_values(m, tok, spec, 1, FACTS, ["{}"], values.ValueConfig(steps=4, lr=0.5), **kwargs)


def test_the_value_optimisation_bar_shows_only_when_it_takes_long(model, monkeypatch, capfd):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    _values(model)  # a tiny batch ends long before the bar's delay
    assert "value optimisation" not in capfd.readouterr().err
    monkeypatch.setattr(values, "PROGRESS_DELAY", 0.0)
    _values(model)
    assert "value optimisation" in capfd.readouterr().err
    _values(model, progress=False)
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _values(model)
    assert capfd.readouterr().err == ""


def test_scoring_bars_follow_scoring_progress(model, monkeypatch, capfd):
    m, tok = model
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(metrics, "PROGRESS_DELAY", 0.0)
    prompts, targets = ["The Louvre is in", "Paris is the capital of"], [" Paris", " France"]
    metrics.score_pairs(m, tok, prompts, targets)
    assert "scoring" in capfd.readouterr().err
    with metrics.scoring_progress(False):
        metrics.score_pairs(m, tok, prompts, targets)
        metrics.greedy_generate(m, tok, prompts, 2)
    assert capfd.readouterr().err == ""
    metrics.greedy_generate(m, tok, prompts, 2)
    assert "generating" in capfd.readouterr().err
