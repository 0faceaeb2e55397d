"""The GPT on packed documents: shapes, document isolation, chunked loss, learning, generation."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from fsa_train.config import ConfigError, GPTConfig, NSAConfig
from fsa_train.kernels.utils import interpreting
from fsa_train.model import GPT

SMALL_NSA = NSAConfig(
    cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=4, init_blocks=1, local_blocks=2, window=8
)


def small_config(attention: str, **overrides) -> GPTConfig:
    fields = dict(
        vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, attention=attention,
        nsa=SMALL_NSA, loss_chunk=16,
    )
    fields.update(overrides)
    return GPTConfig(**fields)


def packed_batch(lengths: list[int], vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, vocab, (total,), generator=generator)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_forward_shape_and_finite(attention):
    torch.manual_seed(0)
    model = GPT(small_config(attention))
    ids, cu = packed_batch([5, 40, 19], 64)
    hidden = model(ids, cu)
    assert hidden.shape == (64, 32)
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_documents_do_not_attend_to_each_other(attention):
    torch.manual_seed(0)
    model = GPT(small_config(attention)).double()
    lengths = [23, 37, 12]
    ids, cu = packed_batch(lengths, 64)
    base = model(ids, cu)
    perturbed_ids = ids.clone()
    perturbed_ids[23:60] = (perturbed_ids[23:60] + 7) % 64  # change only the second document
    perturbed = model(perturbed_ids, cu)
    torch.testing.assert_close(perturbed[:23], base[:23], rtol=0, atol=0)
    torch.testing.assert_close(perturbed[60:], base[60:], rtol=0, atol=0)
    assert not torch.allclose(perturbed[23:60], base[23:60])


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_no_position_sees_a_later_token(attention):
    """Causality end to end: changing token p changes no output before p. The positions straddle
    NSA's compression windows (8, stride 4), selection blocks (8) and sliding window (8)."""
    torch.manual_seed(0)
    model = GPT(small_config(attention, n_layer=3)).double()
    ids, cu = packed_batch([61], 64)
    base = model(ids, cu)
    for p in (1, 3, 7, 8, 9, 12, 16, 31, 60):
        changed = ids.clone()
        changed[p] = (changed[p] + 5) % 64
        out = model(changed, cu)
        torch.testing.assert_close(out[:p], base[:p], rtol=0, atol=0)
        assert not torch.allclose(out[p], base[p]), p


def test_dense_window_sees_exactly_its_last_keys():
    """``window=W``: the output at t depends on tokens t-W+1..t of its document, none before."""
    torch.manual_seed(0)
    model = GPT(small_config("dense", n_layer=1, window=6)).double()
    ids, cu = packed_batch([40], 64)
    base = model(ids, cu)
    changed = ids.clone()
    changed[10] = (changed[10] + 5) % 64
    out = model(changed, cu)
    torch.testing.assert_close(out[16:], base[16:], rtol=0, atol=0)  # 10 is out of every window
    assert not torch.allclose(out[15], base[15])  # 15 - 6 + 1 = 10: still inside
    full = GPT(small_config("dense", n_layer=1)).double()
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full(changed, cu)[16:], full(ids, cu)[16:])


def test_builds_on_the_meta_device():
    """A model built under ``torch.device("meta")`` (to count or shard parameters before
    allocating them) works, and has the parameter count of a real one."""
    with torch.device("meta"):
        meta = GPT(small_config("nsa"))
    assert all(p.is_meta for p in meta.parameters())
    assert meta.num_parameters(False) == GPT(small_config("nsa")).num_parameters(False)


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_packed_equals_separate_documents(attention):
    torch.manual_seed(0)
    model = GPT(small_config(attention)).double()
    ids, cu = packed_batch([30, 18], 64)
    packed = model(ids, cu)
    first = model(ids[:30], torch.tensor([0, 30], dtype=torch.int32))
    second = model(ids[30:], torch.tensor([0, 18], dtype=torch.int32))
    torch.testing.assert_close(packed, torch.cat([first, second]), rtol=1e-10, atol=1e-10)


def test_chunked_loss_equals_full_cross_entropy():
    torch.manual_seed(0)
    model = GPT(small_config("dense", loss_chunk=7)).double()
    ids, cu = packed_batch([20, 25], 64)
    targets = torch.randint(0, 64, (45,))
    targets[::5] = -100
    hidden = model(ids, cu)
    expected = F.cross_entropy(model.head(hidden), targets, ignore_index=-100)
    loss = model.loss(hidden, targets)
    torch.testing.assert_close(loss, expected.float() if loss.dtype == torch.float32 else expected)
    loss.backward()
    assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()


def test_tied_embeddings_share_storage():
    model = GPT(small_config("dense", tie_embeddings=True))
    assert model.head.weight is model.embed.weight
    untied = GPT(small_config("dense"))
    assert model.num_parameters(False) == untied.num_parameters(False) - 64 * 32


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_loss_falls_when_memorising(attention):
    torch.manual_seed(0)
    model = GPT(small_config(attention))
    ids, cu = packed_batch([48, 48], 64, seed=3)
    targets = torch.cat([ids[1:48], torch.tensor([-100]), ids[49:], torch.tensor([-100])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.loss(model(ids, cu), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_nsa_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = GPT(small_config("nsa"))
    ids, cu = packed_batch([40, 25], 64)
    model.loss(model(ids, cu), torch.randint(0, 64, (65,))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_generate_is_deterministic_with_generator():
    torch.manual_seed(0)
    model = GPT(small_config("nsa")).eval()
    a = model.generate([1, 2, 3], 10, generator=torch.Generator().manual_seed(1))
    b = model.generate([1, 2, 3], 10, generator=torch.Generator().manual_seed(1))
    assert a == b and len(a) == 10 and all(0 <= t < 64 for t in a)
    greedy = model.generate([1, 2, 3], 5, temperature=0)
    assert greedy == model.generate([1, 2, 3], 5, temperature=0)


def test_packed_input_must_be_flat():
    model = GPT(small_config("dense"))
    with pytest.raises(ValueError, match="packed 1-D"):
        model(torch.zeros(2, 8, dtype=torch.long), torch.tensor([0, 16], dtype=torch.int32))


CHECKPOINTING = [True, "attention", "mlp"]
"""``activation_checkpointing``: whole blocks, or one sub-layer of each."""


@pytest.mark.parametrize(("attention", "checkpointing"), [
    *((attention, mode) for attention in ("dense", "nsa") for mode in CHECKPOINTING),
    ("nsa", "sparse_branches"),
])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(attention, checkpointing):
    torch.manual_seed(0)
    plain = GPT(small_config(attention, kernel_backend="reference")).double()
    recomputed = GPT(small_config(attention, kernel_backend="reference",
                                  activation_checkpointing=checkpointing)).double()
    assert_trains_alike(plain, recomputed, rtol=1e-10, atol=1e-12)


def assert_trains_alike(plain: GPT, other: GPT, rtol: float, atol: float) -> None:
    """``other``, given ``plain``'s weights, has its loss and every gradient on one packed
    batch of odd-length documents (the loss to ``rtol * 1e-2``)."""
    other.load_state_dict(plain.state_dict())
    ids, cu = packed_batch([29, 3, 19], 64)
    targets = torch.randint(0, 64, (51,))
    losses = [model.loss(model(ids, cu), targets) for model in (plain, other)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=rtol * 1e-2, atol=0)
    for (name, a), b in zip(plain.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=name)


def packed_bytes(cfg: GPTConfig, lengths: list[int]) -> int:
    """Bytes autograd packs for the backward in one forward of a one-block GPT (fp64, each
    storage once, parameters left out): what the step keeps from forward to backward."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg, n_layer=1)).double()
    ids, cu = packed_batch(lengths, cfg.vocab_size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, cu)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_checkpointed_sublayers_keep_less_than_the_block_and_more_than_its_checkpoint():
    """A checkpointed sub-layer keeps its input instead of its tensors: fewer bytes than no
    checkpointing, more than the whole block checkpointed. With its attention recomputed an
    NSA block keeps exactly what a dense one does: none of the three branch outputs and gates
    that the gated output projection (and each branch) keep without checkpointing."""
    lengths = [29, 3, 19]
    kept = {(attention, mode): packed_bytes(small_config(attention, kernel_backend="reference",
                                                         activation_checkpointing=mode), lengths)
            for attention in ("dense", "nsa") for mode in [False, *CHECKPOINTING]}
    for attention in ("dense", "nsa"):
        for part in ("attention", "mlp"):
            assert kept[attention, False] > kept[attention, part] > kept[attention, True], \
                (attention, part, kept)
    cfg = small_config("nsa")
    branches = 3 * sum(lengths) * cfg.n_head * cfg.head_dim * 8  # o_cmp, o_sel, o_win in fp64
    assert kept["nsa", False] - kept["dense", False] >= branches
    assert kept["nsa", False] - kept["nsa", "attention"] >= branches
    assert kept["nsa", "attention"] == kept["dense", "attention"]
    assert kept["nsa", "mlp"] - kept["dense", "mlp"] >= branches  # the attention's are kept


def test_recomputed_sparse_branches_keep_neither_sparse_output():
    """``sparse_branches``: an NSA block keeps at least the compressed and selected outputs
    less than without checkpointing (and their log-sum-exps and the selection), and more than
    with its whole attention recomputed (the window branch and the projections keep theirs)."""
    lengths = [29, 3, 19]
    kept = {mode: packed_bytes(small_config("nsa", kernel_backend="reference",
                                            activation_checkpointing=mode), lengths)
            for mode in (False, "sparse_branches", "attention")}
    cfg = small_config("nsa")
    two_outputs = 2 * sum(lengths) * cfg.n_head * cfg.head_dim * 8  # fp64
    assert kept[False] - kept["sparse_branches"] >= two_outputs, kept
    assert kept["sparse_branches"] > kept["attention"], kept


@pytest.mark.skipif(not interpreting(), reason="the CPU run of the Triton path")
def test_recomputed_sparse_branches_on_the_triton_path():
    """``sparse_branches`` on the kernels (Triton's interpreter, fp32): the recomputed
    compressed and selected branches and gated projection give no checkpointing's loss and
    gradients (the selection is recomputed too, so it must come out the same)."""
    nsa = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=3, init_blocks=1,
                    local_blocks=1, window=8)
    cfg = small_config("nsa", kernel_backend="triton", n_layer=1, d_model=64, nsa=nsa)
    torch.manual_seed(0)
    plain = GPT(cfg)
    recomputed = GPT(dataclasses.replace(cfg, activation_checkpointing="sparse_branches"))
    for model in (plain, recomputed):
        model.blocks[0].attn.rope.interpret = True
    assert_trains_alike(plain, recomputed, rtol=1e-5, atol=1e-7)


def test_sparse_branches_checkpointing_needs_nsa():
    with pytest.raises(ConfigError, match="activation_checkpointing='sparse_branches'.*dense"):
        small_config("dense", activation_checkpointing="sparse_branches")


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_autocast_keeps_one_half_copy_of_each_normed_input(attention):
    """Under autocast a block casts each norm's output once: the attention's projections (q, k,
    v, NSA's gates) and the MLP's two share one bf16 copy for their backward, where autocast
    alone casts and keeps one per projection (5 for dense, 6 for NSA)."""
    torch.manual_seed(0)
    cfg = small_config(attention, kernel_backend="reference", n_layer=1)
    model = GPT(cfg)
    ids, cu = packed_batch([37, 11], cfg.vocab_size)
    block = model.blocks[0]
    normed = []
    for norm in (block.attn_norm, block.mlp_norm):
        norm.register_forward_hook(lambda module, args, out: normed.append(out.detach()))
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(ids, cu)
    copies = {t.untyped_storage().data_ptr() for t in saved for n in normed
              if t.dtype == torch.bfloat16 and t.shape == n.shape
              and torch.equal(t, n.to(torch.bfloat16))}
    assert len(copies) == 2, len(copies)  # the attention norm's and the MLP norm's


def test_dense_and_nsa_start_from_the_same_shared_weights():
    """Name-keyed initialisation: after the same seed, every parameter both models have is equal
    (the loss-parity experiment compares them from one starting point); NSA's own are extra."""
    torch.manual_seed(7)
    dense = GPT(small_config("dense")).state_dict()
    torch.manual_seed(7)
    nsa = GPT(small_config("nsa")).state_dict()
    assert set(dense) < set(nsa)
    extra = set(nsa) - set(dense)
    nsa_only = re.compile(r"blocks\.\d+\.attn\.(w_ck|w_cv|pe|gate\.weight)$")
    assert extra and all(nsa_only.match(k) for k in extra), extra
    for name, value in dense.items():
        assert torch.equal(value, nsa[name]), name
    torch.manual_seed(8)
    other = GPT(small_config("dense")).state_dict()
    name = "blocks.0.attn.q_proj.weight"
    assert not torch.equal(other[name], dense[name])


def test_initialisation_scales():
    torch.manual_seed(0)
    cfg = small_config("nsa", d_model=64, n_layer=4)
    model = GPT(cfg)
    std = cfg.init_std
    assert abs(model.embed.weight.std().item() - std) < 0.1 * std
    o_proj = torch.cat([b.attn.o_proj.weight.flatten() for b in model.blocks])
    assert abs(o_proj.std().item() - std / (2 * cfg.n_layer) ** 0.5) < 0.1 * std
    attn = model.blocks[0].attn
    pooling = torch.eye(cfg.head_dim).repeat(cfg.nsa.cmp_kernel, 1) / cfg.nsa.cmp_kernel
    assert (attn.w_ck - pooling).abs().max() < 10 * std  # mean pooling plus small noise
    assert not torch.equal(attn.w_ck, attn.w_cv)  # each weight draws its own noise


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["token", "block"])
def test_gpu_nsa_model_on_kernels_matches_the_reference_model(selection):
    """The whole NSA model on the GPU kernels (branch outputs mixed inside the output
    projection, library kernels where "auto" picks them) against the same model on the naive
    ops: loss and every parameter's gradient, bf16 autocast, packed documents."""
    nsa = NSAConfig(selection=selection)
    lengths = [3000, 100, 900, 31, 4160]
    ids, cu = packed_batch(lengths, 512, seed=1)
    ids, cu = ids.cuda(), cu.cuda()
    targets = torch.roll(ids, -1)
    results = []
    for backend in ("auto", "reference"):
        torch.manual_seed(0)
        cfg = small_config("nsa", vocab_size=512, d_model=256, n_head=8, n_kv_head=2,
                           head_dim=64, nsa=nsa, kernel_backend=backend, loss_chunk=1024)
        model = GPT(cfg).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(model(ids, cu, max(lengths)), targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ref, grads_ref) = results
    assert abs(loss.item() - loss_ref.item()) <= 1e-2 * loss_ref.item()
    for name, grad in grads.items():
        ref = grads_ref[name]
        err = ((grad.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
        assert err <= 5e-2, (name, err)
