"""``GPTConfig.fused_ops``: the torch path is the model as before, "auto" falls back to it off the
GPU, "liger" without liger-kernel is one line, state dicts are the same in every mode, and on a
GPU liger's fused ops give torch's loss and gradients."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsa_train.config import ConfigError, GPTConfig, NSAConfig
from fsa_train.model import GPT
from fsa_train.model.fused import LIGER_MISSING, liger

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
AVAILABLE_MODES = ["torch", "auto"] + (["liger"] if liger() is not None else [])

KEYS_BEFORE_THE_SWITCH = [
    "embed.weight", "blocks.0.attn_norm.weight", "blocks.0.attn.q_proj.weight",
    "blocks.0.attn.k_proj.weight", "blocks.0.attn.v_proj.weight", "blocks.0.attn.o_proj.weight",
    "blocks.0.mlp_norm.weight", "blocks.0.mlp.w1.weight", "blocks.0.mlp.w3.weight",
    "blocks.0.mlp.w2.weight", "norm.weight", "head.weight",
]
"""A one-layer dense GPT's state-dict keys as the model had them before ``fused_ops``."""


def small_config(attention: str, **overrides) -> GPTConfig:
    fields = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                  attention=attention, loss_chunk=16,
                  nsa=NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=4,
                                init_blocks=1, local_blocks=2, window=8))
    return GPTConfig(**{**fields, **overrides})


def packed_batch(lengths: list[int], vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=generator)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu


def ignored_targets(ids: torch.Tensor) -> torch.Tensor:
    targets = torch.roll(ids, -1).clone()
    targets[::7] = -100
    return targets


def loss_and_grads(model: GPT, ids, cu, targets, autocast: bool = False):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model(ids, cu)
        total, count = model.loss_terms(hidden, targets)
        loss = total / count
    loss.backward()
    return hidden, total, count, {n: p.grad for n, p in model.named_parameters()}


def test_torch_path_computes_the_modules_it_always_had():
    """In "torch" mode the norms are nn.RMSNorm, the MLP is w2(silu(w1 x) * w3 x) and the head
    a plain linear: bit for bit what the formulas give, and still of the old classes."""
    model = GPT(small_config("dense", fused_ops="torch"))
    block = model.blocks[0]
    assert isinstance(block.attn_norm, nn.RMSNorm) and isinstance(model.head, nn.Linear)
    x = torch.randn(13, 32)
    norm = block.mlp_norm
    assert torch.equal(norm(x), F.rms_norm(x, (32,), norm.weight, norm.eps))
    mlp = block.mlp
    assert torch.equal(mlp(x), mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x)))
    assert torch.equal(model.head(x), x @ model.head.weight.t())


def test_liger_without_liger_kernel_is_one_line():
    if HAS_LIGER:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ConfigError, match=r"model\.config\.fused_ops='liger'") as info:
        GPT(small_config("dense", fused_ops="liger"))
    message = str(info.value)
    assert message == LIGER_MISSING
    assert "\n" not in message and "pip install liger-kernel" in message


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_auto_off_the_gpu_is_the_torch_path_bit_for_bit(attention):
    ids, cu = packed_batch([20, 29], 64, seed=3)
    targets = ignored_targets(ids)
    runs = []
    for mode in ("torch", "auto"):
        torch.manual_seed(0)
        runs.append(loss_and_grads(GPT(small_config(attention, fused_ops=mode)), ids, cu,
                                   targets))
    (hidden, total, count, grads), (hidden_a, total_a, count_a, grads_a) = runs
    assert torch.equal(hidden, hidden_a) and torch.equal(total, total_a)
    assert int(count) == int(count_a) == int((targets != -100).sum())
    assert grads.keys() == grads_a.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, grads_a[name]), name


def test_state_dict_keys_are_the_same_in_every_mode():
    keys = {}
    for mode in AVAILABLE_MODES:
        keys[mode] = list(GPT(small_config("dense", n_layer=1, fused_ops=mode)).state_dict())
    assert all(k == KEYS_BEFORE_THE_SWITCH for k in keys.values()), keys
    torch_model = GPT(small_config("dense", fused_ops="torch"))
    for mode in AVAILABLE_MODES:
        GPT(small_config("dense", fused_ops=mode)).load_state_dict(torch_model.state_dict())


def test_an_export_trained_with_liger_loads_anywhere(tmp_path):
    """An exported model's "liger" becomes "auto" on loading: evaluation and generation run
    on the CPU and without liger-kernel."""
    import dataclasses

    from fsa_train.export import EXPORT_FORMAT, load_exported

    model = GPT(small_config("dense"))
    config = dict(dataclasses.asdict(model.cfg), fused_ops="liger")
    path = tmp_path / "model.pt"
    torch.save({"format": EXPORT_FORMAT, "config": config, "state_dict": model.state_dict(),
                "tokenizer_model": None, "step": 0}, path)
    loaded, _ = load_exported(path)
    assert loaded.cfg.fused_ops == "auto"
    ids, cu = packed_batch([9], 64)
    with torch.no_grad():
        assert torch.equal(loaded(ids, cu), model(ids, cu))


def test_liger_refuses_cpu_tensors_in_one_line():
    pytest.importorskip("liger_kernel")
    if liger() is None:
        pytest.skip("liger-kernel does not import here")
    model = GPT(small_config("dense", fused_ops="liger"))
    ids, cu = packed_batch([10], 64)
    with pytest.raises(ConfigError, match=r"fused_ops='liger' needs CUDA tensors") as info:
        model(ids, cu)
    assert "\n" not in str(info.value)


def graph_functions(grad_fn) -> str:
    """The names of every autograd function behind ``grad_fn``, space-separated."""
    names, seen, stack = [], set(), [grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return " ".join(names)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["liger", "auto"])
def test_gpu_liger_matches_torch(mode, autocast):
    """liger's RMSNorm, SiLU-mul and fused linear cross-entropy against the torch modules on
    one small dense GPT (same weights): the (sum, count) loss terms with ignored targets, the
    mean loss and every parameter's gradient, in fp32 and under bf16 autocast."""
    pytest.importorskip("liger_kernel")
    if liger() is None:
        pytest.skip("liger-kernel does not import here")
    lengths = [700, 33, 291]
    ids, cu = packed_batch(lengths, 1024, seed=1)
    ids, cu = ids.cuda(), cu.cuda()
    targets = ignored_targets(ids)
    torch.manual_seed(0)
    cfg = dict(vocab_size=1024, d_model=256, n_head=4, n_kv_head=2, loss_chunk=256)
    reference = GPT(small_config("dense", fused_ops="torch", **cfg)).cuda()
    fused = GPT(small_config("dense", fused_ops=mode, **cfg)).cuda()
    fused.load_state_dict(reference.state_dict())
    hidden_r, total_r, count_r, grads_r = loss_and_grads(reference, ids, cu, targets, autocast)
    hidden_f, total_f, count_f, grads_f = loss_and_grads(fused, ids, cu, targets, autocast)
    # the liger ops ran where the mode says: every op under "liger"; under "auto" the loss and
    # SiLU-mul, with torch's RMSNorm (the final norm is the hidden states' last function)
    assert ("Liger" in type(hidden_f.grad_fn).__name__) == (mode == "liger"), hidden_f.grad_fn
    assert "LigerSiLUMul" in graph_functions(hidden_f.grad_fn)
    assert "LigerFusedLinearCrossEntropy" in graph_functions(total_f.grad_fn)
    assert "Liger" not in graph_functions(total_r.grad_fn)
    assert int(count_f) == int(count_r) == int((targets != -100).sum().item())
    assert total_f.dtype == torch.float32
    loss_tol, grad_tol = (5e-3, 3e-2) if autocast else (1e-5, 1e-3)
    assert abs(total_f.item() - total_r.item()) <= loss_tol * abs(total_r.item()), \
        (total_f.item(), total_r.item())
    assert grads_f.keys() == grads_r.keys()
    for name, grad in grads_f.items():
        ref = grads_r[name].float()
        err = ((grad.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert err <= grad_tol, (name, err)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        mean_f = fused.loss(fused(ids, cu), targets)  # no-grad path (validation)
        mean_r = reference.loss(reference(ids, cu), targets)
    assert abs(mean_f.item() - mean_r.item()) <= loss_tol * abs(mean_r.item())
