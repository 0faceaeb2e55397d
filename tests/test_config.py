"""Config validation: every violation is one clear line naming the field."""

import pytest

from fsa_train.config import ConfigError, GPTConfig, NSAConfig


def test_defaults_are_valid():
    cfg = GPTConfig()
    assert cfg.head_dim == 64 and cfg.group_size == 3
    assert cfg.ffn_hidden % 64 == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cmp_kernel": 30, "cmp_stride": 16}, "cmp_kernel"),
        ({"sel_block": 40, "cmp_stride": 16}, "sel_block"),
        ({"sel_topk": 2, "init_blocks": 1, "local_blocks": 2}, "sel_topk"),
        ({"local_blocks": 0}, "local_blocks"),
        ({"init_blocks": -1}, "init_blocks"),
        ({"window": 0}, "window"),
        ({"cmp_stride": 2.5}, "cmp_stride"),
        ({"selected_partials": "bf16"}, "selected_partials"),
        ({"selection": "query"}, "selection"),
    ],
)
def test_nsa_violations_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"model\.config\.nsa\.{field}") as info:
        NSAConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_head": 12, "n_kv_head": 5}, "n_head"),
        ({"n_head": 34, "n_kv_head": 2}, "n_head"),
        ({"d_model": 100, "n_head": 12, "n_kv_head": 4}, "d_model"),
        ({"head_dim": 33}, "head_dim"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"attention": "linear"}, "attention"),
        ({"kernel_backend": "cuda"}, "kernel_backend"),
        ({"fused_ops": "triton"}, "fused_ops"),
        ({"attention": "dense", "window": 0}, "window"),
        ({"attention": "nsa", "window": 512}, "window"),
        ({"activation_checkpointing": "block"}, "activation_checkpointing"),
        ({"activation_checkpointing": 1}, "activation_checkpointing"),
    ],
)
def test_gpt_violations_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"model\.config\.{field}") as info:
        GPTConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_nsa_given_as_mapping_is_validated():
    cfg = GPTConfig(nsa={"cmp_kernel": 16, "cmp_stride": 8, "sel_block": 32, "sel_topk": 4})
    assert isinstance(cfg.nsa, NSAConfig) and cfg.nsa.sel_block == 32
    with pytest.raises(ConfigError, match="model.config.nsa.sel_topk"):
        GPTConfig(nsa={"sel_topk": 1})


@pytest.mark.parametrize("value", [False, True, "attention", "mlp"])
def test_activation_checkpointing_is_a_bool_or_a_sublayer(value):
    assert GPTConfig(activation_checkpointing=value).activation_checkpointing is value
