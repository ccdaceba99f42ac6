"""CL-MoE's shared modules on hand-made tensors: LoRA experts with instance / task routing, task
prototypes and the dynamic momentum merge."""
import pytest
import torch
from torch import nn

from lifelong_moe.moe import (MergeError, TaskPrototypes, expert_roles, inject_lora_experts,
                              momentum_merge)
from lifelong_moe.moe.lora_experts import task_gate, top_set
from lifelong_moe.moe.momentum import REFERENCE_LAMBDAS, UNIFORM_LAMBDAS, snapshot


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(6, 6), "up_proj": nn.Linear(6, 10)})
                                    for _ in range(2))
        self.lm_head = nn.Linear(6, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["q_proj"](x) + layer["up_proj"](x)[..., :6]
        return self.lm_head(x)


def _tiny(**kw):
    torch.manual_seed(0)
    model = Tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = inject_lora_experts(model, ["q_proj", "up_proj"], num_experts=4, r=8, alpha=16, **kw)
    return model, handle, before


def _randomise_b(handle, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in handle.layers.values():
            m.experts.B.copy_(torch.randn(m.experts.B.shape, generator=g))


def test_injection_by_name_keeps_backbone_keys_and_rank_split():
    model, handle, before = _tiny()
    assert sorted(handle.layers) == ["layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj"]
    assert type(model.lm_head) is nn.Linear
    m = handle.layers["layers.0.up_proj"]
    assert m.experts.A.shape == (4, 2, 6) and m.experts.B.shape == (4, 2, 10)  # r 8 over 4 experts
    assert m.scaling == 16 / 8  # alpha / total r
    assert m.router.bias is None and m.router.weight.shape == (4, 6)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())  # same keys, same weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{t}.{s}" for i in range(2) for t in ("q_proj", "up_proj")
                         for s in ("experts.A", "experts.B", "router.weight")}
    assert torch.all(m.experts.B == 0)
    assert abs(float(torch.cat([l.experts.A.detach().flatten() for l in handle.layers.values()]).std()) - 0.01) < 0.003
    with pytest.raises(ValueError, match="split evenly"):
        inject_lora_experts(Tiny(), ["q_proj"], num_experts=3, r=8)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora_experts(Tiny(), ["o_proj"])


def test_b_zero_makes_the_injected_layer_a_noop():
    model, handle, _ = _tiny()
    x = torch.randn(3, 5, 6)
    lin = handle.layers["layers.0.up_proj"]
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    out = model(x)
    handle.state.active = False
    assert torch.equal(model(x), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_run_under_half_precision_autocast_and_train_in_fp32(dtype):
    """Under CPU autocast the frozen layer's output is half precision while the experts stay fp32: the
    in-place expert update must not mix the two (it raised 'self and mat2 must have the same dtype')."""
    model, handle, _ = _tiny(dropout=0.0)
    _randomise_b(handle)
    x = torch.randn(3, 5, 6)
    ref = model(x)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype and torch.allclose(out.float(), ref, atol=0.15, rtol=0.05)
    out.float().sum().backward()
    m = handle.layers["layers.0.q_proj"]
    assert m.experts.B.dtype == torch.float32 and m.experts.B.grad is not None and m.experts.B.grad.dtype == torch.float32


def test_dense_mixture_equals_the_sum_of_experts():
    model, handle, _ = _tiny(dropout=0.0)
    _randomise_b(handle)
    lin = handle.layers["layers.1.up_proj"]
    x = torch.randn(2, 3, 6)
    g = lin.instance_gates(x)
    assert torch.allclose(g.sum(-1), torch.ones(2, 3))
    want = torch.nn.functional.linear(x, lin.weight, lin.bias) + lin.scaling * sum(
        g[..., i:i + 1] * lin.experts.expert_forward(i, x) for i in range(4))
    assert torch.allclose(lin(x), want, atol=1e-5)


def test_top_k_keeps_k_experts_per_token():
    model, handle, _ = _tiny(top_k=2)
    lin = handle.layers["layers.0.q_proj"]
    with torch.no_grad():
        lin.router.weight.normal_()
    g = lin.instance_gates(torch.randn(4, 7, 6))
    assert torch.equal((g > 0).sum(-1), torch.full((4, 7), 2))
    assert torch.allclose(g.sum(-1), torch.ones(4, 7))


def test_task_mixing_and_beta_one_makes_the_task_router_irrelevant():
    model, handle, _ = _tiny(dropout=0.0)
    _randomise_b(handle)
    for m in handle.layers.values():
        m.add_task_gate(torch.tensor([1.0, 0, 0, 0]))
        m.add_task_gate(torch.tensor([0, 0, 0.5, 0.5]))
    x = torch.randn(2, 3, 6)
    lin = handle.layers["layers.0.q_proj"]
    plain = lin(x)
    st = handle.state
    st.task_ids = torch.tensor([0, -1])
    st.beta = 0.5
    mixed = lin(x)
    assert torch.equal(mixed[1], plain[1])  # no task: the instance router alone
    g = 0.5 * lin.instance_gates(x[:1]) + 0.5 * torch.tensor([1.0, 0, 0, 0])
    want = torch.nn.functional.linear(x[:1], lin.weight, lin.bias) + lin.scaling * sum(
        g[..., i:i + 1] * lin.experts.expert_forward(i, x[:1]) for i in range(4))
    assert torch.allclose(mixed[:1], want, atol=1e-5) and not torch.allclose(mixed[:1], plain[:1])
    st.beta = 1.0
    outs = []
    for ids in ([0, 1], [1, 0], [-1, -1]):
        st.task_ids = torch.tensor(ids)
        outs.append(model(x))
    st.task_ids = None
    outs.append(model(x))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_usage_recording_counts_top_k_on_masked_tokens():
    model, handle, _ = _tiny()
    lin = handle.layers["layers.0.q_proj"]
    with torch.no_grad():
        lin.router.weight.zero_()
        lin.router.weight[3, 0] = 10.0  # x[..., 0] > 0 -> expert 3 first; ties below: lower ids
    x = torch.zeros(2, 4, 6)
    x[..., 0] = 1.0
    st = handle.state
    st.record, st.record_k = True, 2
    st.token_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    lin(x)
    assert lin.usage.tolist() == [4, 0, 0, 4]  # 4 tokens, top-2 = {3, 0}
    assert task_gate(lin.usage, 2).tolist() == [0.5, 0, 0, 0.5]
    assert top_set(lin.usage, 2) == {0, 3}
    assert task_gate(torch.tensor([5, 3, 0, 2]), 2).tolist() == pytest.approx([5 / 8, 3 / 8, 0, 0])
    assert top_set(torch.tensor([0, 4, 0, 0]), 2) == {1}  # a never-selected expert is not used


def test_frozen_experts_and_backbone_do_not_change_under_training():
    model, handle, before = _tiny()
    pool = handle.layers["layers.0.q_proj"].experts
    pool.freeze([1])
    frozen = {k: v[1].clone() for k, v in snapshot({"p": pool})["p"].items()}
    opt = torch.optim.AdamW(handle.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(4, 3, 6)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    now = snapshot({"p": pool})["p"]
    assert all(torch.equal(now[k][1], v) for k, v in frozen.items())
    assert not torch.equal(now["B"][0], torch.zeros_like(now["B"][0]))  # the others trained
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_expert_roles():
    assert expert_roles({0, 1}, {1, 2}, 4) == ["new", "both", "previous", "neither"]


@pytest.mark.parametrize("lambdas", [REFERENCE_LAMBDAS, UNIFORM_LAMBDAS,
                                     {"new": 0.1, "previous": 0.9, "both": 0.5, "neither": 1.0}])
def test_momentum_merge_formula_for_every_role(lambdas):
    model, handle, _ = _tiny()
    pools = handle.expert_pools()
    old = snapshot(pools)
    _randomise_b(handle)
    with torch.no_grad():
        for p in pools.values():
            p.A.add_(1.0)
    phi = snapshot(pools)
    roles = expert_roles({0, 1}, {1, 2}, 4)
    lam = {n: torch.tensor([lambdas[r] for r in roles]) for n in pools}
    merged = momentum_merge(pools, old, lam)
    assert merged == 4 * 4 * 2  # 4 layers x 4 experts x (A, B)
    for n, pool in pools.items():
        for k in ("A", "B"):
            for i, role in enumerate(roles):
                want = lambdas[role] * old[n][k][i] + (1 - lambdas[role]) * phi[n][k][i]
                assert torch.allclose(getattr(pool, k)[i], want, atol=1e-6), (n, k, role)


def test_merge_leaves_routers_and_frozen_experts_and_counts_them():
    model, handle, _ = _tiny()
    pools = handle.expert_pools()
    pools["layers.0.q_proj"].freeze([2])
    old = snapshot(pools)
    _randomise_b(handle)
    routers = [m.router.weight.clone() for m in handle.layers.values()]
    before = snapshot(pools)
    lam = {n: torch.full((4,), 0.5) for n in pools}
    assert momentum_merge(pools, old, lam) == (4 * 4 - 1) * 2
    assert torch.equal(pools["layers.0.q_proj"].effective("B")[2], before["layers.0.q_proj"]["B"][2])
    assert all(torch.equal(m.router.weight, r) for m, r in zip(handle.layers.values(), routers))


def test_a_merge_that_touches_nothing_or_too_little_raises():
    model, handle, _ = _tiny()
    pools = handle.expert_pools()
    old = snapshot(pools)
    lam = {n: torch.full((4,), 0.7) for n in pools}
    renamed = {"base_model." + n: v for n, v in old.items()}  # the release's key mismatch
    with pytest.raises(MergeError, match="touched 0 expert tensors, expected 32"):
        momentum_merge(pools, renamed, lam)
    partial = dict(list(old.items())[:3])
    with pytest.raises(MergeError, match="touched 24 expert tensors, expected 32"):
        momentum_merge(pools, partial, lam)
    with pytest.raises(MergeError):
        momentum_merge({}, {}, {})


def test_prototypes_infer_the_task_and_fall_back_outside_every_radius():
    g = torch.Generator().manual_seed(0)
    protos = TaskPrototypes(3)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    for c in centres:
        assert protos.add(c + 0.5 * torch.randn(50, 3, generator=g)) == len(protos) - 1
    assert torch.allclose(protos.centres, centres, atol=0.3)
    assert torch.all(protos.radii > 0.5) and torch.all(protos.radii < 2.5)
    test = torch.cat([c + 0.3 * torch.randn(20, 3, generator=g) for c in centres])
    assert torch.equal(protos.infer(test), torch.arange(3).repeat_interleave(20))
    far = torch.tensor([[50.0, 50, 50], [5.0, 5.0, 0], [-20.0, 0, 0]])
    assert protos.infer(far).tolist() == [-1, -1, -1]
    assert TaskPrototypes(3).infer(test).eq(-1).all()


def test_prototype_normalized_rule_and_state_roundtrip():
    tight = torch.tensor([[0.0], [0.2]])  # centre 0.1, radius 0.1
    wide = torch.tensor([[1.0], [5.0]])  # centre 3, radius 2
    for rule, want in (("nearest", 1), ("normalized", 0)):
        p = TaskPrototypes(1, rule=rule)
        p.add(tight), p.add(wide)
        p.radii[0] = 3.0  # widen the tight cluster: 1.8 lies in both radii
        assert p.infer(torch.tensor([[1.8]])).tolist() == [want]  # d 1.7 vs 1.2; d / r 0.57 vs 0.6
    q = TaskPrototypes(1, rule="normalized")
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.centres, p.centres) and torch.equal(q.radii, p.radii)


def test_remove_restores_plain_linears():
    model, handle, before = _tiny()
    _randomise_b(handle)
    x = torch.randn(2, 3, 6)
    handle.state.active = False
    frozen = model(x)
    handle.state.active = True
    assert not torch.equal(model(x), frozen)
    handle.remove()
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert set(model.state_dict()) == set(before) and torch.equal(model(x), frozen)


def test_bfloat16_backbone_keeps_fp32_experts_and_mixes_in_bfloat16():
    """A bf16 backbone (backbone.dtype): experts and routers stay fp32 (trainable state), cast to the
    activations' dtype where they meet them, with or without autocast."""
    model = Tiny().to(torch.bfloat16).requires_grad_(False)
    handle = inject_lora_experts(model, ["q_proj", "up_proj"], num_experts=4, r=8, alpha=16)
    lin = handle.layers["layers.0.q_proj"]
    assert lin.experts.A.dtype == lin.router.weight.dtype == torch.float32
    x = torch.randn(2, 3, 6, dtype=torch.bfloat16)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    _randomise_b(handle)
    for m in handle.layers.values():
        m.add_task_gate(torch.tensor([1.0, 0, 0, 0]))
    handle.state.task_ids = torch.tensor([0, -1])
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()  # gradients reach the fp32 experts in fp32
    assert lin.experts.B.grad.dtype == lin.router.weight.grad.dtype == torch.float32
    model.eval()  # no dropout: the same computation as autocast's
    with torch.no_grad():
        plain = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.allclose(model(x).float(), plain.float(), atol=1e-2)
