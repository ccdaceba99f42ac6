"""MoE-Adapters + DDAS strategy (strategies/moe_adapters.py, lifelong_moe/moe/ddas.py) on a tiny
random-init CLIP and tiny streams."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from lifelong_moe.config import load_config
from lifelong_moe.errors import UserError
from lifelong_moe.moe.ddas import OOD
from lifelong_moe.runs.runner import build
from lifelong_moe.strategies.moe_adapters import freeze_choice, reference_parameter_count

from conftest import CONFIGS
from helpers import build_on_domains, tiny_config, write_domain_files

SMALL = {"name": "moe_adapters", "num_experts": 6, "bottleneck": 8}
NO_DDAS = {**SMALL, "ddas": {"enabled": False}}
FAST_DDAS = {"iterations": 60, "batch_size": 16, "reference_data": "none"}


pytestmark = pytest.mark.usefixtures("one_thread")


def digits(strategy, **over):
    """Class-incremental digits, 2 experiences, 4 steps each."""
    over = {"training__iterations": 4, **over}
    return build(tiny_config(strategy, **over), progress=False)


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory):
    return write_domain_files(tmp_path_factory.mktemp("domains"), n_train=48)


domains = build_on_domains


def sample_images(stream, col, n=8):
    return torch.stack([stream.test_stream[col].dataset[i][0] for i in range(n)])


def train_all(strategy, stream, upto=None):
    for exp in list(stream.train_stream)[:upto]:
        strategy.train(exp, eval_streams=[])


def backbone(strategy):
    return {n: p.detach().clone() for n, p in strategy.model.clip.named_parameters() if ".moe." not in n}


# ------------------------------------------------------------------------------------- identity
def test_zero_init_experts_equal_frozen_clip_through_eval_logits():
    stream, moe, _ = digits(NO_DDAS)
    _, zs, _ = digits({"name": "zeroshot"})
    task, x = stream.tasks[0], sample_images(stream, 0)
    ref = zs.eval_logits(x, task, task.classes)
    assert torch.equal(moe.eval_logits(x, task, task.classes), ref)  # untrained: zero-shot
    moe.moe.add_task()  # a zero router over zero-init experts, used as task 0's (oracle id)
    moe.task_routes[0], moe.trained_count = 0, 1
    for m in moe.moe.select():
        m.router.gate.data.normal_()  # whatever the routing, zero experts add exactly nothing
    assert torch.equal(moe.eval_logits(x, task, task.classes), ref)
    assert all(m.active for m in moe.moe.select("image"))  # the MoE path did run


def test_text_tower_trainable_and_reencoded_in_training():
    stream, s, _ = digits(NO_DDAS)
    assert s.model.text_tower_trainable()
    task = stream.tasks[0]
    s.moe.add_task()
    s.moe.set_task(0)
    s.model.train()
    head = s.head_for(task, task.classes, "first")
    f = s.model.text_features(head)
    assert f.requires_grad and f is not s.model.text_features(head)


# ------------------------------------------------------------------------------- training effects
@pytest.fixture(scope="module")
def trained_two():
    """Two digits tasks trained with the real strategy (no DDAS); snapshots after task 0."""
    stream, s, ev = digits(NO_DDAS, training__iterations=6, training__optimizer={"lr": 5e-2})
    before = backbone(s)
    train_all(s, stream, upto=1)
    snap = {key: {i: {n: t.clone() for n, t in m.experts.expert_parameters(i).items()}
                  for i in range(m.experts.num_experts)} for key, m in s.moe.adapters.items()}
    gate0 = {key: m.router.gate.detach().clone() for key, m in s.moe.adapters.items()}
    frozen0 = s.moe.frozen_experts()
    s.train(stream.train_stream[1], eval_streams=[])
    return stream, s, ev, before, snap, gate0, frozen0


def test_frozen_experts_and_earlier_router_bit_identical(trained_two):
    _, s, _, _, snap, gate0, frozen0 = trained_two
    assert all(len(ids) == 2 for ids in frozen0.values())
    changed = 0
    for key, m in s.moe.adapters.items():
        assert torch.equal(m.router.past_gate[0], gate0[key])  # task 0's router frozen
        assert not torch.equal(m.router.gate, torch.zeros_like(m.router.gate))  # task 1's trained
        for i in range(m.experts.num_experts):
            now = m.experts.expert_parameters(i)
            same = all(torch.equal(now[n], snap[key][i][n]) for n in now)
            if i in frozen0[key]:
                assert same, (key, i)
            changed += not same
    assert changed > 0  # unfrozen experts kept training


def test_backbone_bit_identical_after_training(trained_two):
    _, s, _, before, *_ = trained_two
    after = backbone(s)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_freeze_is_cumulative_top_k_of_each_tasks_usage(trained_two):
    _, s, *_ = trained_two
    union = {}
    for t in (0, 1):
        for key, ids in freeze_choice(s.usage_log[t], 2).items():
            union[key] = sorted(set(union.get(key, [])) | set(ids))
        assert s.frozen_log[t] == union
    assert any(len(v) > 2 for v in union.values())  # task 1 froze more experts in some block
    extra = s.extra_results()["moe_adapters"]
    assert set(extra["usage"]) == {t.name for t in s.tasks}
    assert extra["frozen_after_task"][s.tasks[1].name]["image"]["0"] == union[("image", 0)]
    n0, n1 = (extra["trainable_params_per_task"][t.name] for t in s.tasks)
    assert n1 < n0  # frozen experts are not trained any more


def test_freeze_rule_on_hand_made_counts():
    usage = {("image", 0): torch.tensor([5, 9, 9, 0]), ("image", 1): torch.tensor([7, 1, 3, 8]),
             ("text", 0): torch.tensor([0, 0, 4, 0])}
    assert freeze_choice(usage, 2) == {("image", 0): [1, 2], ("image", 1): [0, 3], ("text", 0): [2]}
    assert freeze_choice(usage, 1) == {("image", 0): [1], ("image", 1): [3], ("text", 0): [2]}


def test_noise_off_in_eval():
    stream, s, _ = digits(NO_DDAS)
    s.moe.add_task()
    s.task_routes[0], s.trained_count = 0, 1
    torch.manual_seed(0)
    with torch.no_grad():
        for m in s.moe.select():
            m.router.gate.normal_(0, 0.01)
            m.router.noise.normal_(0, 5.0)  # large noise: any noise would change the top-k
            m.experts.up_weight.normal_()
    task, x = stream.tasks[0], sample_images(stream, 0)
    a = s.eval_logits(x, task, task.classes)
    assert torch.equal(a, s.eval_logits(x, task, task.classes))
    s.moe.set_task(0)
    s.model.train()
    for m in s.moe.select():
        m.experts.drop.p = 0.0
    img = [s.model.encode_image(x) for _ in range(2)]
    assert not torch.equal(img[0], img[1])  # noise is live in training


class _Capture(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.seen = []

    def before_backward(self, strategy, **kw):
        ce = F.cross_entropy(strategy.mb_output, strategy.target_map[strategy.mb_y],
                             label_smoothing=strategy.cfg.training.label_smoothing)
        aux = strategy.moe.aux_loss()
        self.seen.append((strategy.loss.detach().clone().reshape(()), ce.detach(), None if aux is None else aux.detach()))


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_loss_is_ce_plus_weighted_aux(weight):
    stream, s, _ = digits({**NO_DDAS, "aux_loss_weight": weight}, training__iterations=2,
                          training__label_smoothing=0.2)
    cap = _Capture()
    s.plugins.append(cap)
    s.train(stream.train_stream[0], eval_streams=[])
    assert len(cap.seen) == 2
    for loss, ce, aux in cap.seen:
        if weight == 0:
            assert torch.equal(loss, ce)
        else:
            assert aux > 0 and torch.allclose(loss, ce + weight * aux)


# ------------------------------------------------------------------------ DDAS in the strategy
@pytest.fixture(scope="module")
def ddas_run(domain_files):
    """Two distinct domains, DDAS on frozen CLIP features with a synthetic reference AE."""
    strat = {**SMALL, "ddas": {**FAST_DDAS, "iterations": 150, "reference_data": "synthetic_pretrain", "reference_samples": 64,
                               "reference_iterations": 30, "threshold": {"mode": "calibrated", "quantile": 1.0, "holdout": 0.3}}}
    stream, s, ev = domains(domain_files, strat)
    zs_row = ev.row(s, -1)
    rows = []
    for i, exp in enumerate(stream.train_stream):
        s.train(exp, eval_streams=[])
        rows.append(ev.row(s, i))
    return stream, s, ev, zs_row, strat


def test_ddas_strategy_selects_domains_and_records(ddas_run):
    stream, s, _, _, _ = ddas_run
    sel = s.extra_results()["moe_adapters"]["ddas"]["selection"]
    names = [t.name for t in stream.tasks]
    assert all(v["ood_rate"] == 1.0 and v["expected"] == "ood" for v in sel["-1"].values())
    assert sel["0"][names[0]]["accuracy"] >= 0.9 and sel["0"][names[0]]["expected"] == names[0]
    assert sel["0"][names[1]]["counts"].get(names[1], 0) == 0  # task 1 untrained after row 0
    assert sel["1"][names[0]]["accuracy"] >= 0.9 and sel["1"][names[1]]["accuracy"] >= 0.9, sel["1"]
    assert s.ddas.reference is not None
    tau = s.threshold()
    assert tau == pytest.approx(float(s.ddas.calibration[:2].max())) and np.isfinite(tau)


def test_ddas_ae_of_task_in_training_never_selected(domain_files):
    stream, s, _ = domains(domain_files, {**SMALL, "ddas": {**FAST_DDAS, "stacked": True}})
    assert s.ddas.stacked  # the stacked decision path, in the strategy
    s.train(stream.train_stream[0], eval_streams=[])
    s._fit_ddas(1, stream.train_stream[1].dataset)  # AE fitted, task 1 not trained
    assert "1" in s.ddas.task_aes
    task = stream.tasks[1]
    dec, _ = s.decisions(sample_images(stream, 1, 16), task)
    assert not (dec == 1).any()


def test_ddas_cached_features_fit_the_autoencoder_of_streamed_features(domain_files):
    """Features extracted once per task (default) or re-extracted per batch (``feature_cache_mb:
    0``, for data too large to cache) feed the same batches to the autoencoder."""
    fitted = []
    for cache_mb in (1024, 0):
        ddas = {**FAST_DDAS, "feature_cache_mb": cache_mb, "threshold": {"quantile": 0.9, "holdout": 0.25}}
        stream, s, _ = domains(domain_files, {**SMALL, "ddas": ddas})
        s._fit_ddas(0, stream.train_stream[0].dataset)
        fitted.append((s.ddas.task_aes["0"].state_dict(), float(s.ddas.calibration[0])))
    (a, tau_a), (b, tau_b) = fitted
    assert tau_a == pytest.approx(tau_b, rel=1e-4) and tau_a > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_ood_rows_get_exact_zero_shot_logits(ddas_run, domain_files, monkeypatch):
    stream, s, _, _, _ = ddas_run
    _, zs, _ = domains(domain_files, {"name": "zeroshot"})
    task, x = stream.tasks[0], sample_images(stream, 0)
    ref = zs.eval_logits(x, task, task.classes)
    forced = torch.tensor([0, OOD, 1, OOD, 0, OOD, 1, 0])
    monkeypatch.setattr(s, "decisions", lambda x, task: (forced, None))
    mixed = s.eval_logits(x, task, task.classes)
    ood = forced == OOD
    assert torch.equal(mixed[ood], ref[ood])
    assert not torch.allclose(mixed[~ood], ref[~ood])
    for t in (0, 1):  # in-distribution rows: that task's router in both towers
        monkeypatch.setattr(s, "decisions", lambda x, task, t=t: (torch.full((8,), t), None))
        alone = s.eval_logits(x, task, task.classes)
        assert torch.allclose(mixed[forced == t], alone[forced == t], atol=1e-5)
    monkeypatch.setattr(s, "decisions", lambda x, task: (torch.full((8,), OOD), None))
    assert torch.equal(s.eval_logits(x, task, task.classes), ref)


def full_pass_image_features(s, x, routes):
    """The former evaluation: one MoE pass over the whole batch, zero-shot rows (-1) bypassed."""
    s.moe.set_task(routes, towers=("image",))
    return s.model.encode_image(x)


@pytest.mark.parametrize("n", [6, 24])  # 6: per-sample gathered experts; 24: grouped by combination
def test_zero_shot_rows_reuse_the_ddas_pass_and_moe_runs_on_routed_rows_only(ddas_run, n, monkeypatch):
    """With DDAS on CLIP features, the rows sent to zero-shot take the frozen pass DDAS ran (bit for
    bit) and no image runs through the towers twice; the routed rows equal those of one MoE pass
    over the whole batch with the zero-shot rows bypassed (the former evaluation) up to rounding."""
    from lifelong_moe.moe.experts import BottleneckExperts

    stream, s, _, _, _ = ddas_run
    x = torch.cat([sample_images(stream, 0, n // 2), sample_images(stream, 1, n - n // 2)])
    paths = []
    grouped = BottleneckExperts._forward_by_combination
    monkeypatch.setattr(BottleneckExperts, "_forward_by_combination",
                        lambda self, *a: paths.append("grouped") or grouped(self, *a))
    s.model.eval()
    with torch.no_grad():
        for routes in (torch.tensor([0, -1, 1, -1, 0, 1] * (n // 6)), torch.tensor([-1, 1] * (n // 2)),
                       torch.tensor([-1] * (n - 1) + [0])):
            plain = s._frozen_image_features(x)
            sizes = []
            hook = s.model.clip.visual.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
            split = s._image_features(x, routes, routes.unique().tolist(), plain)
            hook.remove()
            keep = routes >= 0
            assert sizes == [int(keep.sum())]
            assert torch.equal(split[~keep], plain[~keep])
            full = full_pass_image_features(s, x, routes)
            assert torch.equal(full[~keep], plain[~keep])  # what the former pass gave them too
            torch.testing.assert_close(split[keep], full[keep], rtol=0, atol=1e-6)
            assert not torch.equal(split[keep], plain[keep])  # the experts did act
    assert ("grouped" in paths) == (n == 24)


def test_state_dict_resume_reproduces_eval_bit_identically(ddas_run, domain_files, tmp_path):
    from safetensors.torch import load_file, save_file

    stream, s, _, _, strat = ddas_run
    save_file(s.state_dict(), str(tmp_path / "ckpt.safetensors"))
    _, fresh, _ = domains(domain_files, strat)
    fresh.load_state_dict(load_file(str(tmp_path / "ckpt.safetensors")))
    for col in (0, 1):
        task, x = stream.tasks[col], sample_images(stream, col)
        assert torch.equal(fresh.eval_logits(x, task, task.classes), s.eval_logits(x, task, task.classes))
    a, b = fresh.extra_results()["moe_adapters"], s.extra_results()["moe_adapters"]
    for key in ("usage", "frozen_after_task", "trainable_params_per_task", "task_routes"):
        assert a[key] == b[key], key
    assert fresh.threshold() == s.threshold()


# ------------------------------------------------------------------------------------ variants
def test_alexnet_features_from_local_weights(tmp_path, domain_files):
    from safetensors.torch import save_file
    from torchvision.models import alexnet

    from lifelong_moe.moe.ddas import AlexNetFeatures

    torch.manual_seed(0)
    path = tmp_path / "alexnet.safetensors"
    net = alexnet(weights=None).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    # the reference feature at the reference size: conv5's output BEFORE its ReLU (256 x 13 x 13 =
    # 43,264 values at 224 px), flattened, sigmoid
    conv5 = [m for m in net.features if isinstance(m, torch.nn.Conv2d)][-1]
    seen = []
    conv5.register_forward_hook(lambda mod, inp, out: seen.append(out.clone()))  # its ReLU is in place
    x224 = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net(x224)
    f224 = AlexNetFeatures(path)(x224)
    assert f224.shape == (2, 43264)
    assert torch.allclose(f224, torch.sigmoid(seen[0].flatten(1)), atol=1e-6)
    assert bool((f224 < 0.5).any())  # negative pre-activations survive: no ReLU (after it, all >= 0.5)
    strat = {**SMALL, "ddas": {**FAST_DDAS, "iterations": 5, "features": "alexnet", "alexnet_weights": str(path),
                               "threshold": {"mode": "fixed", "value": 0.0655}}}
    stream, s, _ = domains(domain_files, strat)
    assert s.ddas.dim == 256  # conv5 (256 channels) on 32 px images: 1x1
    x = sample_images(stream, 0)
    f = s.extractor(x)
    assert f.shape == (8, 256) and bool(((f > 0) & (f < 1)).all())
    with pytest.raises(UserError, match="alexnet_weights"):
        domains(domain_files, {**SMALL, "ddas": {"features": "alexnet", "alexnet_weights": str(tmp_path / "no.pt")}})
    with pytest.raises(UserError, match="alexnet_weights"):
        domains(domain_files, {**SMALL, "ddas": {"features": "alexnet"}})


def test_cil_preset_runs_dense_two_experts_one_router():
    preset = load_config(CONFIGS / "moe_adapters_cil_cifar100.yaml")[0]
    strat = {"name": "moe_adapters", **preset.strategy_params().model_dump(exclude={"name"}), "bottleneck": 8}
    stream, s, ev = digits(strat, training__label_space="task", evaluation__label_space="seen")
    assert s.ddas is None
    train_all(s, stream)
    assert s.moe.num_tasks == 1 and s.task_routes.tolist() == [0, 0]
    assert all(m.experts.num_experts == 2 and not m.experts.frozen_ids() for m in s.moe.select())
    s.moe.set_task(0)
    s.model.eval()
    s.model.encode_image(sample_images(stream, 0))
    assert all(sorted(set(m.last_routing[0].flatten().tolist())) == [0, 1] for m in s.moe.select("image"))
    row = ev.row(s, 1)
    assert len(row) == 2 and all(0 <= a <= 1 for a in row)


def test_eot_routing_and_growth_run():
    stream, s, _ = digits({**NO_DDAS, "route_token": "eot", "grow_per_task": 2})
    train_all(s, stream)
    assert all(m.experts.num_experts == 8 and m.route_token == ("eot" if k[0] == "text" else "first")
               for k, m in s.moe.adapters.items())
    s2 = copy.deepcopy(s.state_dict())
    _, fresh, _ = digits({**NO_DDAS, "route_token": "eot", "grow_per_task": 2})
    fresh.load_state_dict(s2)
    task, x = stream.tasks[0], sample_images(stream, 0)
    assert torch.equal(fresh.eval_logits(x, task, task.classes), s.eval_logits(x, task, task.classes))


def test_shipped_configs_validate():
    files = sorted(CONFIGS.glob("moe_adapters_*.yaml"))
    assert len(files) == 3
    cfgs = {f.stem: load_config(f)[0] for f in files}
    full, few = cfgs["moe_adapters_mtil_order1"], cfgs["moe_adapters_mtil_order1_fewshot"]
    assert full.strategy_params().num_experts == 22 and len(full.training.lr_per_experience) == 11
    assert full.training.label_smoothing == 0.2 and full.training.iterations == 1000
    assert few.stream.samples_per_class.train == 5 and few.training.iterations == 500
    assert few.strategy_params().ddas.threshold.value == 0.06
    cil = cfgs["moe_adapters_cil_cifar100"].strategy_params()
    assert (cil.num_experts, cil.top_k, cil.router_per_task, cil.freeze_top_k, cil.ddas.enabled) == (2, 2, False, 0, False)


def test_reference_parameter_count_vit_b16():
    c = reference_parameter_count("ViT-B-16")  # built on the meta device: no weights, instant
    assert c["moe_total"] == 51_059_712 and c["ddas_autoencoder"] == 8_696_164
    assert round(c["paper_count"] / 1e6, 1) == 59.8
    assert round(reference_parameter_count("ViT-B-16", num_tasks=1, num_experts=2)["moe_total"] / 1e6, 2) == 4.03
