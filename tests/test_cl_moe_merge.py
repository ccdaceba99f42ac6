"""CL-MoE's momentum merge (MMoE, theta_t = lambda_i theta_{t-1} + (1 - lambda_i) phi_t per expert) at
strategy level, on the randomly initialised tiny VLM: after every task boundary each expert's A and B
equal the formula computed here from snapshots taken before the task's training (theta_{t-1}) and right
before the merge (phi_t), with lambda_i from the expert's role, found here from the recorded usage;
routers and the projector keep phi_t."""
import pytest
import torch

from lifelong_moe.config import validate
from lifelong_moe.runs.runner import build

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = ["color", "type", "count"]
RELEASE = {"new": 0.7, "previous": 0.3, "both": 0.7, "neither": 0.7}  # the release's params.py
DISTINCT = {"new": 0.9, "previous": 0.2, "both": 0.6, "neither": 0.4}  # every role its own lambda


def config(**strategy):
    return validate({
        "name": "merge", "seed": 0,
        "stream": {"kind": "vqa", "dataset": "synthetic_vqa", "question_types": TYPES,
                   "questions_per_type": {"train": 24, "test": 8}},
        "backbone": {"family": "vlm", "name": "lmoe-tiny-llava"},
        "strategy": {"name": "cl_moe", "r": 8, "alpha": 16, **strategy},
        "training": {"iterations": 3, "batch_size": 8, "optimizer": {"lr": 1e-2}},
        "evaluation": {"batch_size": 64, "max_new_tokens": 2},
        "runtime": {"threads": 1, "device": "cpu"},
    })


def experts(s):
    return {n: {"A": m.experts.A.detach().clone(), "B": m.experts.B.detach().clone()} for n, m in s.moe.layers.items()}


def routers(s):
    return {n: m.router.weight.detach().clone() for n, m in s.moe.layers.items()}


def projector(s):
    return {n: p.detach().clone() for n, p in s._projector.named_parameters()}


def top2(counts):
    """A task's experts in one layer: its two most selected (ties: lower id), selected at least once."""
    c = counts.tolist()
    return {i for i in sorted(range(len(c)), key=lambda i: (-c[i], i))[:2] if c[i] > 0}


def role(i, new, previous):
    return {(True, True): "both", (True, False): "new", (False, True): "previous", (False, False): "neither"}[
        (i in new, i in previous)]


def train_with_snapshots(s, exp):
    """Train one task; returns theta_{t-1} (before training) and phi_t (after the statistics pass, which
    runs right before the merge) of the experts, routers and projector."""
    theta = experts(s), routers(s), projector(s)
    phi = {}
    stats = s.statistics_pass

    def spy(dataset):
        stats(dataset)
        phi["v"] = experts(s), routers(s), projector(s)

    s.statistics_pass = spy
    try:
        s.train(exp, eval_streams=[])
    finally:
        del s.statistics_pass
    return theta, phi["v"]


def check_merge(s, theta, phi, previous_sets, index, lam):
    """Every expert after the boundary is lambda_i theta + (1 - lambda_i) phi; returns the roles."""
    (t_exp, _, t_proj), (p_exp, p_rout, p_proj) = theta, phi
    now_exp, roles = experts(s), {}
    for name, counts in s.usage_log[index].items():
        new = top2(counts)
        previous = set().union(*(top2(s.usage_log[t][name]) for t in previous_sets))
        roles[name] = [role(i, new, previous) for i in range(len(counts))]
        for k in ("A", "B"):
            for i, r in enumerate(roles[name]):
                old, trained = t_exp[name][k][i], p_exp[name][k][i]
                assert not torch.equal(old, trained), (name, k, i)  # trained: a no-op merge cannot pass
                want = lam[r] * old + (1 - lam[r]) * trained
                assert torch.allclose(now_exp[name][k][i], want, rtol=1e-5, atol=1e-7), (index, name, k, i, r)
    assert all(torch.equal(w, p_rout[n]) for n, w in routers(s).items())  # routers: phi_t, unmerged
    proj = projector(s)
    assert all(torch.equal(v, p_proj[n]) for n, v in proj.items())  # the projector: phi_t, unmerged
    assert all(not torch.equal(v, t_proj[n]) for n, v in proj.items())  # and it trained (the default)
    return roles


def test_every_boundary_merges_each_expert_by_its_role_against_the_last_task():
    """The defaults: the release's lambdas, the "previous" experts task t-1's (params.py:28-32)."""
    stream, s, _ = build(config(), progress=False)
    assert s.params.previous_experts == "last_task" and s.params.train_projector
    s.train(stream.train_stream[0], eval_streams=[])
    assert s.merge_log == {}  # the first task has no theta_{t-1}
    seen = set()
    for t in (1, 2):
        theta, phi = train_with_snapshots(s, stream.train_stream[t])
        roles = check_merge(s, theta, phi, [t - 1], t, RELEASE)
        seen |= {r for rs in roles.values() for r in rs}
        assert {s.layer_key(n): [RELEASE[r] for r in rs] for n, rs in roles.items()} == \
            s.extra_results()["cl_moe"]["merge"][s.tasks[t].name]["lambdas"]
    assert "previous" in seen  # the lambda = 0.3 branch ran somewhere


@pytest.mark.parametrize("rule", ["last_task", "all_earlier"])
def test_the_previous_experts_switch_decides_the_roles(rule):
    """Task 0's usage is set to the complement of task 1's in every layer, so that the union of the
    earlier sets holds every expert while task 1's holds two: the two rules give different roles."""
    stream, s, _ = build(config(previous_experts=rule, lambdas=DISTINCT), progress=False)
    for t in (0, 1):
        s.train(stream.train_stream[t], eval_streams=[])
    last = {n: top2(c) for n, c in s.usage_log[1].items()}
    for name, counts in s.usage_log[1].items():
        assert len(last[name]) == 2
        rest = sorted(set(range(len(counts))) - last[name])
        fake = torch.zeros_like(counts)
        fake[rest[0]], fake[rest[1]] = 5, 4
        s.usage_log[0][name] = fake
    union = {n: top2(s.usage_log[0][n]) | last[n] for n in last}
    assert all(u == {0, 1, 2, 3} for u in union.values())
    theta, phi = train_with_snapshots(s, stream.train_stream[2])
    roles = check_merge(s, theta, phi, [1] if rule == "last_task" else [0, 1], 2, DISTINCT)
    previous = {"last_task": last, "all_earlier": union}
    other = previous["all_earlier" if rule == "last_task" else "last_task"]
    other_roles = {n: [role(i, top2(c), other[n]) for i in range(len(c))] for n, c in s.usage_log[2].items()}
    assert all(roles[n] != other_roles[n] for n in roles)  # the switch changed the roles in every layer


def test_a_frozen_projector_stays_bit_identical():
    stream, s, _ = build(config(train_projector=False), progress=False)
    before = projector(s)
    assert not any(p.requires_grad for p in s._projector.parameters())
    for exp in stream.train_stream[:2]:
        s.train(exp, eval_streams=[])
    assert all(torch.equal(v, before[n]) for n, v in projector(s).items())
    assert s.extra_results()["cl_moe"]["switches"]["train_projector"] is False
