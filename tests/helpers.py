"""What the editing tests share: a short CounterFact-style stream of facts and the small, fast
editor settings (a 1,000-token statistics pass, one context template, three value steps) that
every test of the edit flow runs with. The statistics folder is the ``stats_dir`` fixture of
``tests/conftest.py``."""

from __future__ import annotations

from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.values import ValueConfig

__all__ = ["STREAM", "FIRST", "NEXT", "OTHER", "small_config", "FAST_VALUE", "fast_config", "random_model_config"]

#: Four batches of a stream (the second holds two facts); every fact has a relation, so a later
#: fact for the same subject and relation replaces an earlier one.
STREAM = [
    [Fact("The mother tongue of {} is", "Danielle Darrieux", "English", relation_id="P103")],
    [Fact("{} is located in", "Toyota", "Germany", relation_id="P17"),
     Fact("The capital of {} is", "Italy", "Madrid", relation_id="P36")],
    [Fact("{} plays the", "Alice", "piano", relation_id="P1303")],
    [Fact("The native language of {} is", "Bob Marley", "French", relation_id="P103")],
]
FIRST, NEXT, OTHER = STREAM[1], STREAM[0], STREAM[2]


def small_config(stats_dir: str, **changes) -> EditConfig:
    """Fast settings for tiny models (``changes`` are EditConfig fields; ``value`` defaults to
    three value steps)."""
    changes.setdefault("value", ValueConfig(steps=3))
    return EditConfig(cache_dir=stats_dir, stats_tokens=1000, stats_max_length=128, n_templates=1, **changes)


#: Few value steps at a high rate: a tiny-model edit in well under a second.
FAST_VALUE = ValueConfig(lr=0.5, steps=6)


def fast_config(tmp_path, **changes) -> EditConfig:
    """Small statistics (cached under ``tmp_path/stats``), two short templates, :data:`FAST_VALUE`,
    no replacement: the settings of the benchmark and rival tests (``changes`` override them)."""
    settings = dict(stats_tokens=3000, stats_max_length=128, cache_dir=str(tmp_path / "stats"), n_templates=2,
                    template_length=4, value=FAST_VALUE, replace=False)
    settings.update(changes)
    return EditConfig(**settings)


def random_model_config(tmp_path, **changes) -> EditConfig:
    """Settings for edits that must take on tiny *random* models (the family tests): a light
    anchor (``N = 1``), a small ``alpha`` and a loose clamp, since random models need large
    hidden-state changes."""
    settings = dict(alpha=1e-3, mom2_weight=1.0, stats_tokens=2000, stats_max_length=64, cache_dir=str(tmp_path),
                    n_templates=2, template_length=4, value=ValueConfig(lr=0.5, steps=40, clamp_norm_factor=4.0))
    settings.update(changes)
    return EditConfig(**settings)

