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


@pytest.mark.parametrize("key,value,ok", [
    ("selected_partials", "half", True), ("selected_partials", "fp32", True),
    ("selected_partials", "bf16", False),
    ("selection", "block", True), ("selection", "token", True), ("selection", "query", False),
])
def test_nsa_run_options_are_config_keys(key, value, ok, capsys, tmp_path):
    """``model.config.nsa.selected_partials`` and ``.selection`` come from YAML; a bad value is
    refused by name."""
    preset = (ROOT / "configs" / "model" / "gpt-150m-nsa.yaml").read_text()
    edited = preset.replace("window: 512}", f"window: 512, {key}: {value}}}")
    assert edited != preset
    config = tmp_path / "model.yaml"
    config.write_text(edited)
    if ok:
        printed = parse(capsys, ROOT / "configs" / "base.yaml", config)
        assert f"{key}: {value}" in printed
        return
    with pytest.raises((SystemExit, ValueError)) as info:
        build_cli(["fit", "--config", str(ROOT / "configs" / "base.yaml"), "--config", str(config),
                   "--print_config"])
    captured = capsys.readouterr()
    assert key in captured.err + captured.out + str(info.value)
