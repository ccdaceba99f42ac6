"""Invariants of the shared MoE modules (lifelong_moe.moe) on a tiny open_clip CLIP."""
import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from lifelong_moe.backbones.clip import register_model_configs
from lifelong_moe.moe import (BottleneckExperts, MoEAdapter, MoEAdapters, NoisyTopKRouter, Routing,
                              inject_moe_adapters)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_clip():
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("lmoe-tiny-vit", pretrained=None).eval()
    return model.requires_grad_(False)  # frozen backbone, as in ClipClassifier (shared: never mutate)


@pytest.fixture
def clip_pair(base_clip):
    """(plain CLIP, injected copy with one task router active, handle)."""
    plain, model = base_clip, copy.deepcopy(base_clip)
    handle = inject_moe_adapters(model, num_experts=6, k=2, bottleneck=8)
    handle.add_task()
    handle.set_task(0)
    return plain, model, handle


def context_length() -> int:
    import json

    from lifelong_moe.backbones.clip import MODEL_CONFIG_DIR

    return json.loads((MODEL_CONFIG_DIR / "lmoe-tiny-vit.json").read_text())["text_cfg"]["context_length"]


def inputs(n_img=4, n_txt=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n_img, 3, 32, 32, generator=g),
            torch.randint(1, 4000, (n_txt, context_length()), generator=g))


@torch.no_grad()
def randomize(handle, std=0.5):
    for p in handle.parameters():
        p.normal_(0, std)


def encode(model, images, tokens):
    """Eval under no_grad, as the evaluator does (open_clip's MHA picks its fused path from the
    autograd state, so compare plain and injected models under the same mode and grad state)."""
    with torch.set_grad_enabled(model.training):
        return model.encode_image(images), model.encode_text(tokens)


def both(plain, model, x, t, train):
    model.train(train), plain.train(train)
    try:
        return encode(plain, x, t), encode(model, x, t)
    finally:
        plain.eval()


def test_zero_init_is_exact_noop(clip_pair):
    plain, model, _ = clip_pair
    x, t = inputs()
    for train in (False, True):  # train: gate noise and dropout on, experts still exact no-ops
        a, b = both(plain, model, x, t, train)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_expert_init_is_the_reference_init(clip_pair):
    """MoE-Adapters' "lora" init (mtil/clip/adapter.py): W_down kaiming_uniform(a=sqrt(5)), W_up,
    b_down and b_up zero, in every expert of every block, and in experts appended later. The no-op
    test above only needs W_up = b_up = 0; b_down = 0 is pinned here, value by value."""
    _, model, _ = clip_pair
    pools = [m for m in model.modules() if isinstance(m, BottleneckExperts)]
    fresh = BottleneckExperts(16, 3, bottleneck=4, dropout=0.0)
    fresh.grow(2)
    assert pools
    for ex in pools + [fresh]:
        for n in ("down_bias", "up_weight", "up_bias"):
            assert torch.count_nonzero(getattr(ex, n)) == 0, n
        bound = 1 / math.sqrt(ex.d_model)  # kaiming_uniform(a=sqrt(5)) on [r, D]: U(-1/sqrt(D), 1/sqrt(D))
        w = ex.down_weight
        assert bool((w.abs() <= bound).all()) and all(torch.count_nonzero(w[i]) == w[i].numel()
                                                      for i in range(ex.num_experts))
    # with W_up live and everything else at init, an expert is s * W_up ReLU(W_down h): no b_down
    with torch.no_grad():
        fresh.up_weight.normal_()
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    for i in (0, 4):
        want = 0.1 * F.relu(h @ fresh.down_weight[i].t()) @ fresh.up_weight[i]
        assert torch.allclose(fresh.expert_forward(i, h), want, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_bypass_is_bit_exact_after_training(clip_pair, train):
    plain, model, handle = clip_pair
    randomize(handle)
    x, t = inputs()
    (ref_img, ref_txt), (img, _) = both(plain, model, x, t, train)
    assert not torch.equal(img, ref_img)  # the experts are live
    for task in (None, -1, torch.full((4,), -1)):
        handle.set_task(task, towers=("image",))
        assert torch.equal(encode(model, x, t)[0], ref_img)
    handle.set_task(None)
    assert torch.equal(encode(model, x, t)[1], ref_txt)
    handle.set_task(torch.tensor([-1, 0, -1, 0]), towers=("image",))
    mixed = encode(model, x, t)[0]
    assert torch.equal(mixed[[0, 2]], ref_img[[0, 2]])
    assert not torch.equal(mixed[1], ref_img[1]) and not torch.equal(mixed[3], ref_img[3])
    if not train:  # same routing as the int task for the kept samples
        handle.set_task(0)
        assert torch.allclose(encode(model, x, t)[0][[1, 3]], mixed[[1, 3]], rtol=1e-5, atol=1e-5)


def make_router(d=16, e=6, k=2, noise=True):
    r = NoisyTopKRouter(d, e, k)
    r.add_task()
    with torch.no_grad():
        r.gate.normal_()
        if noise:
            r.noise.normal_()
    return r


def test_noise_only_in_training():
    torch.manual_seed(0)
    r, c = make_router(), torch.randn(32, 16)
    r.eval()
    a, b = r(c, 0), r(c, 0)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    v, i = (c @ r.gate).topk(2, dim=1)
    assert torch.equal(a.indices, i) and torch.allclose(a.weights, F.softmax(v, dim=1))
    r.train()
    a, b = r(c, 0), r(c, 0)
    assert not torch.equal(a.dense(6), b.dense(6))


@pytest.mark.parametrize("train", [False, True])
def test_topk_gates_k_nonzeros_summing_to_one(train):
    torch.manual_seed(0)
    r = make_router(k=3).train(train)
    g = r(torch.randn(20, 16), 0).dense(6)
    assert ((g != 0).sum(1) == 3).all()
    assert torch.allclose(g.sum(1), torch.ones(20))


def naive_mixture(experts, h, gates):
    """The reference semantics: every expert on every token, weighted by the dense gates."""
    return sum(gates[:, i].view(-1, 1, 1) * experts.expert_forward(i, h) for i in range(experts.num_experts))


def live_experts() -> BottleneckExperts:
    """5 experts of width 12 with every weight drawn (seed 0), so none is a no-op."""
    torch.manual_seed(0)
    ex = BottleneckExperts(12, 5, bottleneck=4, dropout=0.0)
    with torch.no_grad():
        for n in ("down_weight", "down_bias", "up_weight", "up_bias"):
            getattr(ex, n).normal_()
    return ex


def test_grouped_dispatch_matches_naive_loop():
    ex = live_experts()
    h = torch.randn(7, 3, 12)
    routing = Routing(torch.stack([torch.randperm(5)[:2] for _ in range(7)]), F.softmax(torch.randn(7, 2), 1))
    for train in (False, True):
        ex.train(train)
        assert torch.allclose(ex(h, *routing), naive_mixture(ex, h, routing.dense(5)), atol=1e-5)
    ex.freeze([1, 3])  # frozen experts are read from their buffers: same result
    assert torch.allclose(ex(h, *routing), naive_mixture(ex, h, routing.dense(5)), atol=1e-5)
    dense_w = F.softmax(torch.randn(7, 5), 1)  # indices=None: soft routing over all experts
    assert torch.allclose(ex(h, None, dense_w), naive_mixture(ex, h, dense_w), atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_block_matches_reference_formula(clip_pair, train):
    plain, model, handle = clip_pair
    randomize(handle)
    for m in handle.select():
        m.experts.drop.p = 0.0
    model.train(train)
    x = torch.randn(5, 17, 128)
    block, ref_block = model.visual.transformer.resblocks[1], plain.visual.transformer.resblocks[1]
    torch.manual_seed(3)
    y = block(x)
    moe = block.moe
    h = x + ref_block.attention(ref_block.ln_1(x))
    gates = Routing(*moe.last_routing).dense(6)
    assert torch.allclose(y, ref_block(x) + naive_mixture(moe.experts, h, gates), atol=1e-5)
    if not train:  # eval gating is the noise-free top-k of c = CLS
        v, i = (h[:, 0] @ moe.router.gate).topk(2, dim=1)
        assert torch.allclose(gates, Routing(i, F.softmax(v, 1)).dense(6))


def test_frozen_experts_and_old_routers_bit_exact(clip_pair):
    _, model, _ = clip_pair
    handle = MoEAdapters(model)
    handle.remove()
    handle = inject_moe_adapters(model, towers=("image",), layers=[0, 2], num_experts=4, k=4, bottleneck=8)
    handle.add_task()
    handle.set_task(0)
    randomize(handle, 0.1)
    model.train()
    x, _ = inputs(4)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)

    def steps(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=False)  # zero grads (not None): AdamW would still decay them
            model.encode_image(x).pow(2).sum().backward()
            opt.step()

    steps(2)  # Adam moments exist for every expert before freezing
    frozen = {("image", 0): [0, 2], ("image", 2): [1]}
    handle.freeze_experts(frozen)
    snap = {key: {i: {n: t.clone() for n, t in handle[key].experts.expert_parameters(i).items()} for i in range(4)}
            for key in frozen}
    steps(3)
    for key, ids in frozen.items():
        assert handle.frozen_experts()[key] == ids
        for i in range(4):
            now = handle[key].experts.expert_parameters(i)
            same = all(torch.equal(now[n], snap[key][i][n]) for n in now)
            assert same == (i in ids), (key, i)
    gate0 = {key: m.router.gate.detach().clone() for key, m in handle.adapters.items()}
    model.eval()
    out0 = model.encode_image(x)
    assert handle.add_task() == 1
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    handle.set_task(1)
    model.train()
    steps(3)
    for key, m in handle.adapters.items():
        assert torch.equal(m.router.past_gate[0], gate0[key])
        assert not torch.equal(m.router.gate, torch.zeros_like(m.router.gate))
    model.eval()
    handle.set_task(0)
    changed_experts = model.encode_image(x)
    assert not torch.equal(changed_experts, out0)  # unfrozen experts kept training, task-0 router did not
    handle.set_task(torch.tensor([0, 1] * 2))
    assert torch.allclose(model.encode_image(x)[::2], changed_experts[::2], atol=1e-6)


def test_usage_counts_by_hand():
    r = NoisyTopKRouter(3, 4, k=2)
    r.add_task()
    with torch.no_grad():  # logits 100 apart: the noise (std ~0.7) cannot change the top 2
        r.gate.copy_(100 * torch.tensor([[4., 3., 2., 1.], [1., 2., 3., 4.], [3., 1., 4., 2.]]))
    c = torch.eye(3)[[0, 1, 2, 0]]  # tops: {0,1}, {3,2}, {2,0}, {0,1}
    r.train()
    r(c, 0)
    assert r.usage.tolist() == [3, 2, 2, 1]
    r(c, 0, keep=torch.tensor([True, False, True, False]))  # bypassed samples are not counted
    assert r.usage.tolist() == [5, 3, 3, 1]
    r.eval()
    r(c, 0)
    assert r.usage.tolist() == [5, 3, 3, 1]
    r.reset_usage()
    assert r.usage.tolist() == [0, 0, 0, 0]


def test_handle_usage_and_top_used(clip_pair):
    _, model, handle = clip_pair
    x, _ = inputs(8)
    model.train()
    model.encode_image(x)
    usage = handle.usage()
    assert set(usage) == {(t, i) for t in ("image", "text") for i in range(4)}
    assert all(int(usage[("image", i)].sum()) == 8 * 2 for i in range(4))
    assert all(int(usage[("text", i)].sum()) == 0 for i in range(4))
    assert handle.top_used(2)[("image", 0)] == usage[("image", 0)].argsort(descending=True, stable=True)[:2].tolist()
    aux = handle.aux_loss()  # lazily computed from the last training forward, differentiable
    assert aux.ndim == 0 and aux.requires_grad and handle[("text", 0)].router.last_aux_loss is None
    copy.deepcopy(model)  # the stashed graph tensors do not block deepcopy
    model.eval()
    model.encode_image(x)
    assert handle.aux_loss() is None and handle.usage()[("image", 0)].equal(usage[("image", 0)])


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def cv2(xs):
    m = sum(xs) / len(xs)
    return sum((v - m) ** 2 for v in xs) / (len(xs) - 1) / (m * m + 1e-10)


def test_aux_loss_by_hand():
    torch.manual_seed(0)
    r = make_router(d=3, e=4, k=2).train()
    c = torch.randn(3, 3)
    torch.manual_seed(5)
    routing = r(c, 0)
    torch.manual_seed(5)
    eps = torch.randn(3, 4)
    clean, std = (c @ r.gate).tolist(), (F.softplus(c @ r.noise) + 0.01).tolist()
    importance, load = [0.0] * 4, [0.0] * 4
    for b in range(3):
        noisy = [clean[b][i] + eps[b, i].item() * std[b][i] for i in range(4)]
        order = sorted(range(4), key=lambda i: -noisy[i])
        top = [noisy[i] for i in order[:2]]
        z = [math.exp(v - top[0]) for v in top]
        for j, i in enumerate(order[:2]):
            importance[i] += z[j] / sum(z)
        thr_in, thr_out = noisy[order[2]], noisy[order[1]]  # (k+1)-th and k-th largest
        for i in range(4):
            thr = thr_in if noisy[i] > thr_in else thr_out
            load[i] += phi((clean[b][i] - thr) / std[b][i])
    assert torch.allclose(routing.dense(4).sum(0), torch.tensor(importance), atol=1e-6)
    assert r.last_aux_loss.item() == pytest.approx(cv2(importance) + cv2(load), rel=1e-5)
    r.eval()
    r(c, 0)
    assert r.last_aux_loss is None  # only computed in training


def test_eot_routing_positions(base_clip):
    model = copy.deepcopy(base_clip)
    handle = inject_moe_adapters(model, towers=("text",), num_experts=4, k=2, bottleneck=8, route_token="eot")
    handle.add_task()
    handle.set_task(0)
    randomize(handle)
    _, t = inputs()
    t[:, 20:] = 0
    t[:, 19] = 49407  # EOT at 19 (argmax), padding after
    model.encode_text(t)
    assert all(torch.equal(m.route_positions, torch.full((3,), 19)) for m in handle.select())
    first = MoEAdapter(128, 4, 2, 8, route_token="first")
    eot = MoEAdapter(128, 4, 2, 8, route_token="eot")
    first.router.add_task()
    first.set_task(0)
    with torch.no_grad():
        for p in first.parameters():
            p.normal_()
    eot.load_state_dict(first.state_dict())  # recreates the task router
    eot.set_task(0)
    first.eval(), eot.eval()
    h, out = torch.randn(3, 6, 128), torch.randn(3, 6, 128)
    eot.route_positions = torch.zeros(3, dtype=torch.long)
    assert torch.equal(eot(out, h), first(out, h))
    eot.route_positions = torch.tensor([5, 4, 3])
    assert not torch.equal(eot(out, h), first(out, h))


def test_state_dict_roundtrip_and_grow(clip_pair, base_clip):
    plain, model, handle = clip_pair
    randomize(handle)
    handle.freeze_experts({("image", 1): [2]})
    handle.add_task()
    handle.grow(2)
    handle.set_task(0)
    x, t = inputs()
    model.eval()
    ref = encode(model, x, t)
    assert all(int(i) < 6 for m in handle.select() for i in m.last_routing[0].flatten())  # old task: old experts
    fresh = copy.deepcopy(base_clip)
    h2 = inject_moe_adapters(fresh, num_experts=6, k=2, bottleneck=8)
    fresh.load_state_dict(model.state_dict())
    assert h2.num_tasks == 2 and h2.frozen_experts()[("image", 1)] == [2]
    h2.set_task(0)
    out = encode(fresh, x, t)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    h2.remove()
    assert torch.equal(fresh.encode_image(x), plain.encode_image(x))


def test_noise_switch_off_makes_training_gates_deterministic():
    torch.manual_seed(0)
    r, c = make_router(), torch.randn(32, 16)
    r.train()
    r.use_noise = False
    a, b = r(c, 0), r(c, 0)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    v, i = (c @ r.gate).topk(2, dim=1)
    assert torch.equal(a.indices, i) and int(r.usage.sum()) == 2 * 2 * 32  # still counted in training


def test_no_grad_dispatch_by_combination_matches_naive():
    ex = live_experts()
    h = torch.randn(16, 3, 12)
    pairs = torch.tensor([[1, 3], [3, 1], [0, 4]])  # order matters: [1, 3] and [3, 1] are two groups
    idx, w = pairs[torch.arange(16) % 3], F.softmax(torch.randn(16, 2), 1)
    ref = naive_mixture(ex, h, Routing(idx, w).dense(5))
    calls = []
    orig = ex._forward_by_combination
    ex._forward_by_combination = lambda *a: calls.append(1) or orig(*a)
    with torch.no_grad():
        assert torch.allclose(ex(h, idx, w), ref, atol=1e-5)
        out = torch.randn(16, 3, 12)
        assert torch.allclose(ex(h, idx, w, out=out.clone()), out + ref, atol=1e-5)
        assert torch.allclose(ex(h[:4], idx[:4], w[:4]), ref[:4], atol=1e-5)  # too small: per-sample path
    assert len(calls) == 2
    ex.group_min = 0
    with torch.no_grad():
        ex(h, idx, w)
    assert len(calls) == 2


def test_per_sample_router_stack_is_cached_and_follows_every_change():
    """Per-sample task ids read all tasks' gates stacked ``[D, T*E]``: cached without autograd, and
    the cache follows add_task, training steps on the current gate, grow, load_state_dict and
    in-place edits of past gates (every result equals the stack built from scratch, bit for bit)."""
    torch.manual_seed(0)
    r = NoisyTopKRouter(8, 5, k=2, use_noise=False)

    def fresh(c, ids):  # the uncached computation
        stack = torch.cat([r.past_gate, r.gate.detach()[None]]).permute(1, 0, 2).reshape(8, -1)
        return (c @ stack).view(len(c), r.num_tasks, r.num_experts)[torch.arange(len(c)), ids]

    def check(c):
        ids = torch.arange(len(c)) % r.num_tasks
        with torch.no_grad():
            got = r._project(c, ids, r.gate, r.past_gate)
        assert torch.equal(got, fresh(c, ids))
        return got

    c = torch.randn(6, 8)
    opt = None
    for _ in range(3):  # tasks: add, train the current gate, evaluate per sample
        r.add_task()
        opt = torch.optim.SGD([r.gate], lr=0.5)
        r.train()
        r(c, r.num_tasks - 1).weights.sum().backward()  # int task: the training path
        r.gate.grad = torch.randn_like(r.gate)
        opt.step()
        r.eval()
        check(c)
    assert len(r._stack_cache) == 1
    buf = next(iter(r._stack_cache.values()))[2]
    check(c)
    assert next(iter(r._stack_cache.values()))[2] is buf  # reused, not rebuilt
    with torch.no_grad():
        r.past_gate[0].add_(1.0)  # an in-place edit of a past task's gate
    check(c)
    r.grow(2)
    check(c)
    other = NoisyTopKRouter(8, 5, k=2)
    other.load_state_dict(r.state_dict())
    with torch.no_grad():
        r.past_gate.mul_(-1)
    r.load_state_dict(other.state_dict())  # copied in place back to the saved values
    check(c)
    copy.deepcopy(r)._project(c, torch.zeros(6, dtype=torch.long), r.gate, r.past_gate)
    with torch.enable_grad():  # autograd through the current gate: built, not cached
        ids = torch.full((6,), r.num_tasks - 1)
        r._project(c, ids, r.gate, r.past_gate).sum().backward()
    assert r.gate.grad is not None and r.gate.grad.abs().sum() > 0
