"""Each method owns its configuration: explicit registration, one frozen config class per method,
every setting reachable from Python, a config file and the command line, and the published
settings in one table with their sources."""

from __future__ import annotations

import dataclasses
import json
import math
import runpy

import pytest
import torch

import rlsedit_llm
from rlsedit_llm import EditConfig, Editor, Fact, ValueConfig
from rlsedit_llm.adapters.spec import _FAMILIES, ModelSpec, detect_spec
from rlsedit_llm.editing.catalog import BUILTIN_METHODS
from rlsedit_llm.editing.config import PUBLISHED_D_K, PUBLISHED_MOM2_WEIGHT
from rlsedit_llm.editing.editor_level import EditorLevelMethod, resolve_layers
from rlsedit_llm.editing.finetune import FineTuneEditor, FTConfig
from rlsedit_llm.editing.methods import edit_config_from_mapping, make_editor, parse_settings
from rlsedit_llm.editing.ultraedit import PUBLISHED_LR, UltraEditConfig, UltraEditor
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel import registry
from rlsedit_llm.kernel.alphaedit import AlphaEditConfig, NullSpaceLayer
from rlsedit_llm.kernel.encore import ENCORE_NORM_WEIGHT, EncoreConfig
from rlsedit_llm.kernel.rls import LayerRLS, RLSEditConfig
from rlsedit_llm.pipeline.values import default_value_config
from rlsedit_llm.presets import FAMILY_PRESETS, METHOD_PRESETS, Published, family_presets

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

BUILTIN = ("rlsedit", "memit", "memit_seq", "alphaedit", "encore", "ft", "ultraedit")


def _config(tmp_path, **changes) -> EditConfig:
    return EditConfig(stats_tokens=2000, n_templates=2, template_length=4, cache_dir=str(tmp_path / "stats"),
                      value=ValueConfig(steps=4), **changes)


# ----------------------------------------------------------------------------------------------
# registration


def test_the_catalogue_registers_the_builtins_in_its_order():
    assert tuple(name for name, _, _ in BUILTIN_METHODS) == BUILTIN
    assert rlsedit_llm.method_names()[:len(BUILTIN)] == BUILTIN
    for name, method_cls, config_cls in BUILTIN_METHODS:
        assert registry.get_method(name) is method_cls and rlsedit_llm.config_class(name) is config_cls
        assert config_cls.method == name and method_cls.name == name


def test_a_duplicate_name_is_refused_and_the_registry_is_unchanged():
    before = rlsedit_llm.method_names()
    with pytest.raises(HyperparameterError, match="'rlsedit' is already registered"):
        registry.register("rlsedit", LayerRLS, RLSEditConfig)
    with pytest.raises(HyperparameterError, match="already registered"):
        registry.register("ft", FineTuneEditor, FTConfig)
    assert rlsedit_llm.method_names() == before and registry.get_method("rlsedit") is LayerRLS


def test_registration_checks_the_class_the_config_and_their_match():
    with pytest.raises(TypeError, match="name = 'other'"):
        registry.register("other", LayerRLS, RLSEditConfig)  # the class says "rlsedit"
    with pytest.raises(TypeError, match="frozen MethodConfig"):
        registry.register("rlsedit_twin", type("Twin", (LayerRLS,), {"name": "rlsedit_twin"}), dict)
    with pytest.raises(TypeError, match="method = 'rlsedit_twin'"):
        registry.register("rlsedit_twin", type("Twin", (LayerRLS,), {"name": "rlsedit_twin"}), RLSEditConfig)

    @dataclasses.dataclass(frozen=True)
    class NeedsThreshold(AlphaEditConfig):
        method = "rlsedit_twin"

    with pytest.raises(TypeError, match=r"must take the settings \['threshold', 'ridge', 'threshold_rule', "
                                        r"'mom2_weight'\]"):
        registry.register("rlsedit_twin", type("Twin", (LayerRLS,), {"name": "rlsedit_twin"}), NeedsThreshold)
    assert "rlsedit_twin" not in rlsedit_llm.method_names()
    with pytest.raises(HyperparameterError, match="choose one of"):
        registry.unregister("rlsedit_twin")


@pytest.mark.parametrize("module", ["rlsedit_llm.kernel.rls", "rlsedit_llm.kernel.memit",
                                    "rlsedit_llm.kernel.memit_seq", "rlsedit_llm.kernel.alphaedit",
                                    "rlsedit_llm.kernel.encore", "rlsedit_llm.editing.finetune",
                                    "rlsedit_llm.editing.ultraedit"])
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_running_a_method_module_registers_nothing(module, monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", {})
    runpy.run_module(module)  # a fresh copy of the module's code, its classes new objects
    assert registry.method_names() == ()


def test_the_registry_is_filled_for_a_fresh_interpreter_that_imports_only_the_kernel():
    import subprocess
    import sys

    code = ("from rlsedit_llm.kernel.registry import method_names, is_layer_method, capabilities;"
            "print(','.join(method_names()), is_layer_method('alphaedit'), capabilities('ultraedit').retracts)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}).stdout.strip()
    assert out == ",".join(BUILTIN) + " True False"


# ----------------------------------------------------------------------------------------------
# the config classes


@pytest.mark.parametrize("build, field", [
    (lambda: AlphaEditConfig(threshold=-1e-3), "AlphaEditConfig.threshold"),
    (lambda: AlphaEditConfig(threshold=math.inf), "AlphaEditConfig.threshold"),
    (lambda: AlphaEditConfig(ridge=0.0), "AlphaEditConfig.ridge"),
    (lambda: AlphaEditConfig(ridge=True), "AlphaEditConfig.ridge"),
    (lambda: EncoreConfig(norm_weight=math.nan), "EncoreConfig.norm_weight"),
    (lambda: EncoreConfig(norm_weight="20"), "EncoreConfig.norm_weight"),
    (lambda: FTConfig(lr=0.0), "FTConfig.lr"),
    (lambda: FTConfig(steps=0), "FTConfig.steps"),
    (lambda: FTConfig(steps=2.0), "FTConfig.steps"),
    (lambda: UltraEditConfig(lr=-1.0), "UltraEditConfig.lr"),
    (lambda: UltraEditConfig(ridge=math.inf), "UltraEditConfig.ridge"),
    (lambda: UltraEditConfig(batch_size=0), "UltraEditConfig.batch_size"),
])
def test_each_config_refuses_a_bad_setting_naming_the_field(build, field):
    with pytest.raises(HyperparameterError, match=field.replace(".", r"\.")):
        build()


def test_configs_are_frozen_and_name_their_settings():
    config = AlphaEditConfig(threshold=2e-2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        ValueConfig().steps = 3
    assert config.replace(ridge=2.0) == AlphaEditConfig(threshold=2e-2, ridge=2.0)
    with pytest.raises(HyperparameterError, match=r"has no setting\(s\) \['thresold'\].*threshold, ridge"):
        config.replace(thresold=1.0)
    with pytest.raises(HyperparameterError, match="rlsedit's settings: none"):
        RLSEditConfig.build(alpha=1.0)
    assert UltraEditConfig.from_dict(UltraEditConfig(lr=None, batch_size=3).to_dict()) == UltraEditConfig(batch_size=3)
    assert UltraEditConfig(lr=None).lr is None  # None: the released lr scaled to the width


def test_defaults_are_the_published_settings_and_the_old_names_keep_their_values():
    assert AlphaEditConfig() == AlphaEditConfig(threshold=1e-2, ridge=1.0)
    assert EncoreConfig().norm_weight == ENCORE_NORM_WEIGHT == 20.0
    assert FTConfig() == FTConfig(lr=5e-4, steps=10)
    assert UltraEditConfig() == UltraEditConfig(lr=None, ridge=1.0, batch_size=16) and PUBLISHED_LR == 1e-6
    assert (PUBLISHED_MOM2_WEIGHT, PUBLISHED_D_K) == (15000.0, 14336)
    assert (EditConfig().alpha, EditConfig().beta) == (0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# reachable from Python: make_editor, EditConfig, the saved state


def test_make_editor_takes_a_layer_solvers_settings_and_the_solvers_use_them(tiny, tmp_path):
    model, tok = tiny("llama")
    editor = make_editor("alphaedit", model, tok, _config(tmp_path), threshold=2e-2)
    assert editor.config.method_config == AlphaEditConfig(threshold=2e-2, ridge=1.0)
    editor.prepare()
    for solver in editor.solvers_.values():
        assert isinstance(solver, NullSpaceLayer) and (solver.threshold, solver.ridge) == (2e-2, 1.0)
    # the projector keeps more directions with the larger threshold than with the default
    default = make_editor("alphaedit", *tiny("llama"), _config(tmp_path)).prepare()
    layer = editor.layers_[0]
    assert torch.trace(editor.solvers_[layer].P_) > torch.trace(default.solvers_[layer].P_)
    with pytest.raises(HyperparameterError, match=r"has no setting\(s\) \['thresh'\].*threshold, ridge"):
        make_editor("alphaedit", *tiny("llama"), _config(tmp_path), thresh=1.0)
    with pytest.raises(HyperparameterError, match="AlphaEditConfig.ridge"):
        make_editor("alphaedit", *tiny("llama"), _config(tmp_path), ridge=-1.0)


def test_edit_config_carries_the_method_config_into_the_solvers_and_the_saved_state(tiny, tmp_path):
    model, tok = tiny("llama")
    config = _config(tmp_path, method="encore", method_config=EncoreConfig(norm_weight=5.0))
    editor = Editor(model, tok, config)
    editor.edit([Fact("{} lives in", "Alice", "Paris")])
    assert all(s.norm_weight == 5.0 for s in editor.solvers_.values())
    editor.save(tmp_path / "enc")
    again = Editor.load(tiny("llama")[0], tok, tmp_path / "enc")
    assert again.config.method_config == EncoreConfig(norm_weight=5.0)
    assert all(s.norm_weight == 5.0 for s in again.solvers_.values())
    # settings over a config's method_config; the wrong class for the method is refused
    editor = make_editor("encore", *tiny("llama"), config, norm_weight=7.0)
    assert editor.config.method_config == EncoreConfig(norm_weight=7.0)
    with pytest.raises(HyperparameterError, match="method_config must be a AlphaEditConfig"):
        make_editor("alphaedit", *tiny("llama"), config)
    with pytest.raises(HyperparameterError, match="method_config must be a EncoreConfig"):
        EditConfig(method="encore", method_config=FTConfig()).validate()


def test_a_state_saved_without_a_method_config_loads_with_the_methods_defaults(tiny, tmp_path):
    model, tok = tiny("llama")
    editor = Editor(model, tok, _config(tmp_path, method="alphaedit"))
    editor.edit([Fact("{} lives in", "Alice", "Paris")])
    state = editor.state_dict()
    assert state["config"]["method_config"] is None
    del state["config"]["method_config"]  # as every state saved before the field existed
    again = Editor.from_state_dict(tiny("llama")[0], tok, state)
    assert again.config.method_config is None
    assert again.config.resolved_method_config() == AlphaEditConfig()
    assert all(torch.equal(again.solvers_[l].W_, editor.solvers_[l].W_) for l in editor.layers_)
    d = EditConfig(method="alphaedit", method_config=AlphaEditConfig(threshold=0.5)).to_dict()
    assert json.loads(json.dumps(d))["method_config"] == {"threshold": 0.5, "ridge": 1.0, "threshold_rule": "relative",
                                                          "mom2_weight": None}
    assert EditConfig.from_dict(d).method_config == AlphaEditConfig(threshold=0.5)


def test_editor_level_methods_share_one_base_and_take_their_config(tiny, tmp_path):
    assert issubclass(FineTuneEditor, EditorLevelMethod) and issubclass(UltraEditor, EditorLevelMethod)
    for name in ("from_config", "load", "save", "weights"):  # one copy of the protocol's plumbing
        assert name not in vars(FineTuneEditor) and name not in vars(UltraEditor)
    model, tok = tiny("llama")
    ft = make_editor("ft", model, tok, EditConfig(layers=(1,), method_config=FTConfig(lr=1e-3)), steps=2)
    assert ft.method_config == FTConfig(lr=1e-3, steps=2) and (ft.lr, ft.steps) == (1e-3, 2)
    ue = make_editor("ultraedit", *tiny("llama"), None, ridge=2.0, batch_size=3)
    assert ue.method_config == UltraEditConfig(ridge=2.0, batch_size=3) and ue.ridge == 2.0
    assert ue.lr_ == PUBLISHED_LR * PUBLISHED_D_K / ue.spec_.d_k
    with pytest.raises(HyperparameterError, match=r"FTConfig has no setting\(s\) \['ridge'\].*lr, steps"):
        make_editor("ft", *tiny("llama"), None, ridge=1.0)
    spec = ft.spec_
    assert resolve_layers(spec, None) == spec.default_layers
    for bad in ((), (2, 1), (1, 1), (spec.n_layers,), (True,)):
        with pytest.raises(HyperparameterError, match="distinct ascending"):
            resolve_layers(spec, bad)
    ft.edit([Fact("{} lives in", "Alice", "Paris")])
    ft.save(tmp_path / "ft")
    again = FineTuneEditor.load(tiny("llama")[0], tok, tmp_path / "ft")
    assert again.method_config == ft.method_config and again.n_batches_ == 1 and again.losses_ == ft.losses_


# ----------------------------------------------------------------------------------------------
# reachable from text: FIELD=VALUE and a config file's object


def test_parse_settings_reads_each_value_as_its_field_type():
    assert parse_settings("alphaedit", ["threshold=0.02", "ridge=3"]) == {"threshold": 0.02, "ridge": 3.0}
    assert parse_settings("ft", ["steps=4", "lr=1e-3", "steps=5"]) == {"steps": 5, "lr": 1e-3}
    assert parse_settings("ultraedit", ["lr=none"]) == {"lr": None}
    assert parse_settings("rlsedit", []) == {}
    for items, message in ((["threshold"], "FIELD=VALUE"), (["thresh=1"], r"no setting\(s\) \['thresh'\]"),
                           (["threshold=abc"], "AlphaEditConfig.threshold must be float"),
                           (["threshold=-1"], "AlphaEditConfig.threshold must be a finite number")):
        with pytest.raises(HyperparameterError, match=message):
            parse_settings("alphaedit", items)
    with pytest.raises(HyperparameterError, match="FTConfig.steps must be int"):
        parse_settings("ft", ["steps=2.5"])


def test_a_config_objects_fields_and_settings_with_overrides():
    data = {"method": "alphaedit", "alpha": 0.5, "layers": [1, 2], "value": {"steps": 3},
            "method_config": {"threshold": 0.05, "ridge": 2.0}}
    config = edit_config_from_mapping(data, settings={"ridge": 4.0}, alpha=0.25)
    assert config.method == "alphaedit" and config.alpha == 0.25 and config.layers == (1, 2)
    assert config.value == ValueConfig(steps=3)
    assert config.method_config == AlphaEditConfig(threshold=0.05, ridge=4.0)
    assert edit_config_from_mapping({}).method_config is None  # nothing given: the defaults
    assert edit_config_from_mapping({}, method="memit").method == "memit"
    with pytest.raises(HyperparameterError, match=r"EditConfig has no field\(s\) \['alfa'\]"):
        edit_config_from_mapping({"alfa": 1.0})
    with pytest.raises(HyperparameterError, match=r"MemitConfig has no setting\(s\) \['ridge', 'threshold'\]"):
        edit_config_from_mapping(data, method="memit")
    saved = EditConfig(method="encore", method_config=EncoreConfig(norm_weight=3.0)).to_dict()
    assert edit_config_from_mapping(json.loads(json.dumps(saved))) == EditConfig.from_dict(saved)


# ----------------------------------------------------------------------------------------------
# reachable from the command line


def _cli_model(monkeypatch):
    from rlsedit_llm.adapters.tiny import tiny_model

    loads = []

    def fake_load(name, **kwargs):
        loads.append(name)
        return tiny_model("llama", init_std=0.3)

    monkeypatch.setattr(rlsedit_llm, "load_model", fake_load)
    return loads, fake_load


def test_cli_edit_takes_the_method_its_settings_and_a_config_file(tmp_path, monkeypatch, capsys):
    from rlsedit_llm import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    loads, fake_load = _cli_model(monkeypatch)
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"prompt": "we saw {}", "subject": "the old cat", "target": "paris"}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"alpha": 0.5, "mom2_weight": 1, "stats_tokens": 2000, "n_templates": 2,
                                  "value": {"steps": 3}, "method_config": {"threshold": 0.05, "ridge": 2.0}}))
    state = tmp_path / "state"
    args = ["edit", "--model", "tiny", "--facts", str(facts), "--state", str(state), "--config", str(config),
            "--method", "alphaedit", "--set", "ridge=3", "--alpha", "0.001"]
    assert cli.main(args) == 0
    editor = Editor.load(*fake_load("tiny"), state)
    assert editor.config.method == "alphaedit" and editor.config.alpha == 0.001  # the flag over the file
    assert editor.config.method_config == AlphaEditConfig(threshold=0.05, ridge=3.0)  # --set over the file
    assert editor.config.value == ValueConfig(steps=3) and editor.config.n_templates == 2
    assert all((s.threshold, s.ridge) == (0.05, 3.0) for s in editor.solvers_.values())
    # the same command continues the stream; a changed setting is refused before any edit
    assert cli.main(args) == 0
    assert cli.main(args[:-4] + ["--set", "ridge=5"]) == 1
    assert "ridge=5.0 (saved: 3.0)" in capsys.readouterr().err
    assert [r.edit_id for r in Editor.load(*fake_load("tiny"), state).journal_] == [0, 1]


def test_cli_edit_continues_an_editor_level_stream(tmp_path, monkeypatch, capsys):
    from rlsedit_llm import cli

    _, fake_load = _cli_model(monkeypatch)
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"prompt": "we saw {}", "subject": "the old cat", "target": "paris"}))
    state = tmp_path / "ft"
    args = ["edit", "--model", "tiny", "--facts", str(facts), "--state", str(state), "--method", "ft",
            "--set", "steps=1", "--layers", "1"]
    assert cli.main(args) == 0 and cli.main(args) == 0
    again = FineTuneEditor.load(*fake_load("tiny"), state)
    assert again.n_batches_ == 2 and again.method_config == FTConfig(steps=1) and again.layers_ == (1,)
    assert cli.main(args[:-4] + ["--method", "ultraedit"]) == 1
    assert "method ultraedit (saved: ft)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--method", "alphaedit", "--set", "thresh=1"], r"no setting\(s\) \['thresh'\]"),
    (["--method", "ft", "--set", "steps=0"], "FTConfig.steps must be an int >= 1"),
    (["--set", "threshold"], "FIELD=VALUE"),
    (["--method", "romeo"], "unknown method 'romeo'"),
    (["--alpha", "-1"], "alpha must be a finite number"),
])
def test_cli_edit_refuses_a_bad_setting_before_loading_the_model(tmp_path, monkeypatch, capsys, flags, message):
    import re

    from rlsedit_llm import cli

    loads, _ = _cli_model(monkeypatch)
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"prompt": "we saw {}", "subject": "the old cat", "target": "paris"}))
    assert cli.main(["edit", "--model", "tiny", "--facts", str(facts), *flags]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and loads == [] and "Traceback" not in err


def test_cli_edit_refuses_a_bad_config_file_naming_it(tmp_path, monkeypatch, capsys):
    from rlsedit_llm import cli

    loads, _ = _cli_model(monkeypatch)
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"prompt": "we saw {}", "subject": "the old cat", "target": "paris"}))
    config = tmp_path / "c.json"
    for text, message in (('{"alfa": 1}', "c.json: EditConfig has no field(s) ['alfa']"),
                          ('{"alpha": 1,', "c.json:1:"), ("[1]", "one JSON object")):
        config.write_text(text)
        assert cli.main(["edit", "--model", "tiny", "--facts", str(facts), "--config", str(config)]) == 1
        assert message in capsys.readouterr().err
    assert loads == []


def test_cli_edit_help_takes_its_defaults_from_edit_config():
    from rlsedit_llm import cli

    parser = cli.build_parser()
    edit = parser._subparsers._group_actions[0].choices["edit"]
    helps = {a.dest: a.help for a in edit._actions}
    assert f"default {EditConfig.alpha}" in helps["alpha"] and f"default {EditConfig.beta}" in helps["beta"]
    assert f"default {EditConfig.stats_tokens}" in helps["stats_tokens"]
    assert f"default {EditConfig.method}" in helps["method"]


# ----------------------------------------------------------------------------------------------
# the presets table


def test_every_preset_has_a_value_and_a_source():
    assert set(METHOD_PRESETS) >= {"rlsedit", "alphaedit", "encore", "ultraedit"}
    for table in (METHOD_PRESETS, FAMILY_PRESETS):
        for row in table.values():
            for entry in row.values():
                assert isinstance(entry, Published) and len(entry.source) > 10
    assert METHOD_PRESETS["encore"]["norm_weight"].value == EncoreConfig().norm_weight
    assert "update_norm_lambda" in METHOD_PRESETS["encore"]["norm_weight"].source
    assert METHOD_PRESETS["alphaedit"]["threshold"].value == AlphaEditConfig().threshold
    assert METHOD_PRESETS["ultraedit"]["lr"].value == PUBLISHED_LR
    assert METHOD_PRESETS["rlsedit"]["mom2_weight"].value == PUBLISHED_MOM2_WEIGHT
    with pytest.raises(TypeError):
        METHOD_PRESETS["encore"]["norm_weight"] = Published(1.0, "x")  # read-only


def test_the_family_table_and_value_defaults_read_the_presets(tiny):
    for family, row in _FAMILIES.items():
        assert row["start"] == family_presets(family)["layer_start"].value
    starts = (_FAMILIES["gpt2"]["start"], _FAMILIES["gptj"]["start"], _FAMILIES["qwen2"]["start"])
    assert starts == (13 / 48, 3 / 28, 7 / 28)
    assert _FAMILIES["opt"]["start"] == 4 / 32
    llama = detect_spec(tiny("llama")[0])

    def spec(family: str, d_model: int) -> ModelSpec:  # only the family and the width are read
        return dataclasses.replace(llama, family=family, d_model=d_model)

    assert default_value_config(spec("gpt2", 1600)) == ValueConfig(lr=0.5, steps=20)
    assert default_value_config(spec("gptj", 4096)) == ValueConfig(lr=0.5)
    assert default_value_config(spec("gpt_neox", 4096)) == ValueConfig(lr=0.5)
    assert default_value_config(spec("llama", 4096)) == ValueConfig(lr=0.1)
    assert default_value_config(spec("mistral", 4096)) == ValueConfig(lr=0.1)
    assert default_value_config(spec("llama", 576)) == ValueConfig(lr=0.5)  # SmolLM2-135M
    assert default_value_config(spec("custom", 576)) == ValueConfig(lr=0.5)
