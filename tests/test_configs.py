"""Every shipped config (and each model × strategy combination) parses through the real CLI."""

from pathlib import Path

import pytest

from fsa_train.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "configs" / "model").glob("*.yaml"))
STRATEGIES = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))


def parse(capsys, *configs: Path) -> str:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*args, "--print_config"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_presets_exist():
    assert len(MODELS) >= 2 and {p.stem for p in STRATEGIES} >= {"ddp", "zero1", "zero2", "zero3",
                                                            "ulysses"}


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
def test_base_model_strategy_combination_parses(model, strategy, capsys):
    printed = parse(capsys, ROOT / "configs" / "base.yaml", model, strategy)
    assert "bf16-mixed" in printed
    if strategy.stem.startswith("zero"):
        assert f"stage: {strategy.stem[-1]}" in printed
    if strategy.stem == "ulysses":
        assert "sequence_parallel: 2" in printed and "stage: 2" in printed


def test_demo_config_parses(capsys):
    printed = parse(capsys, ROOT / "configs" / "demo.yaml")
    assert "attention: nsa" in printed


def check_edited_preset(old: str, new: str, key: str, printed_value: str, ok: bool, capsys,
                        tmp_path: Path) -> None:
    """The NSA model preset with ``old`` replaced by ``new`` parses and prints
    ``key: printed_value``, or (not ``ok``) is refused with a message naming ``key``."""
    preset = (ROOT / "configs" / "model" / "gpt-150m-nsa.yaml").read_text()
    edited = preset.replace(old, new)
    assert edited != preset
    config = tmp_path / "model.yaml"
    config.write_text(edited)
    if ok:
        printed = parse(capsys, ROOT / "configs" / "base.yaml", config)
        assert f"{key}: {printed_value}" in printed
        return
    with pytest.raises((SystemExit, ValueError)) as info:
        build_cli(["fit", "--config", str(ROOT / "configs" / "base.yaml"), "--config", str(config),
                   "--print_config"])
    captured = capsys.readouterr()
    assert key in captured.err + captured.out + str(info.value)


@pytest.mark.parametrize("key,value,ok", [
    ("selected_partials", "half", True), ("selected_partials", "fp32", True),
    ("selected_partials", "bf16", False),
    ("selection", "block", True), ("selection", "token", True), ("selection", "query", False),
])
def test_nsa_run_options_are_config_keys(key, value, ok, capsys, tmp_path):
    """``model.config.nsa.selected_partials`` and ``.selection`` come from YAML; a bad value is
    refused by name."""
    check_edited_preset("window: 512}", f"window: 512, {key}: {value}}}", key, value, ok, capsys,
                        tmp_path)


@pytest.mark.parametrize("value,printed,ok", [
    ("true", "true", True), ("false", "false", True), ("attention", "attention", True),
    ("block", None, False),
])
def test_activation_checkpointing_takes_a_bool_or_a_sublayer(value, printed, ok, capsys,
                                                             tmp_path):
    """``model.config.activation_checkpointing`` from YAML: ``true`` / ``false`` as before (a
    bool, not a string), or the sub-layer to recompute; anything else is refused by name."""
    check_edited_preset("attention: nsa\n", f"attention: nsa\n    activation_checkpointing: "
                        f"{value}\n", "activation_checkpointing", printed, ok, capsys, tmp_path)
