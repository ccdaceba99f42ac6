"""CL-MoE on the tiny CLIP (the toy MTIL side): the same modules on CLIP's MLP linears."""
import pytest
import torch

from lifelong_moe.runs.runner import build

from helpers import build_on_domains, tiny_config, write_domain_files

SMALL = {"name": "cl_moe", "num_experts": 4, "r": 8, "alpha": 16}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domain_files(tmp_path_factory.mktemp("domains"), n_train=32)


def domain_run(paths, strategy):
    return build_on_domains(paths, strategy, training__optimizer={"lr": 1e-2})


def test_zero_init_experts_give_the_frozen_clip_and_backbone_stays(domains):
    stream, s, ev = domain_run(domains, SMALL)
    task = stream.tasks[0]
    x = torch.stack([stream.test_stream[0].dataset[i][0] for i in range(6)])
    clip = s.model.clip
    before = {n: p.detach().clone() for n, p in clip.named_parameters() if ".experts." not in n and ".router." not in n}
    logits = s.eval_logits(x, task, [0, 1])
    with s._bypass():
        assert torch.equal(s.eval_logits(x, task, [0, 1]), logits)  # B = 0: experts add exactly nothing
    names = sorted(s.layer_key(n) for n in s.moe.layers)
    assert len(names) == 2 * 4 * 2 and names[0] == "image.0.c_fc"  # 2 towers x 4 blocks x (c_fc, c_proj)
    for exp in stream.train_stream:
        s.train(exp, eval_streams=[])
    params = dict(clip.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in before.items())
    assert not torch.equal(s.eval_logits(x, task, [0, 1]), logits)  # the experts learned something


def test_prototypes_pick_the_domain_and_mixing_is_per_sample(domains):
    stream, s, ev = domain_run(domains, SMALL)
    for i, exp in enumerate(stream.train_stream):
        s.train(exp, eval_streams=[])
        ev.row(s, i)
    rec = s.extra_results()["cl_moe"]
    names = [t.name for t in stream.tasks]
    assert rec["task_inference"]["1"][names[0]]["accuracy"] == 1.0
    assert rec["task_inference"]["1"][names[1]]["accuracy"] == 1.0
    assert rec["merge"][names[1]]["merged_tensors"] == 16 * 4 * 2
    assert rec["switches"]["previous_experts"] == "last_task"  # the release's rule, as on the VLM
    assert "train_projector" not in rec["switches"] and "projector" not in rec["params"]  # CLIP has none
    xa = torch.stack([stream.test_stream[0].dataset[i][0] for i in range(4)])
    xb = torch.stack([stream.test_stream[1].dataset[i][0] for i in range(4)])
    task = stream.tasks[0]
    both = s.eval_logits(torch.cat([xa, xb]), task, [0, 1])
    alone = torch.cat([s.eval_logits(xa, task, [0, 1]), s.eval_logits(xb, task, [0, 1])])
    assert torch.allclose(both, alone, atol=1e-5)
    s.moe.state.beta = 1.0  # task router irrelevant: no mixing
    plain = s.eval_logits(xb, task, [0, 1])
    s.moe.state.beta = 0.5
    assert not torch.allclose(plain, alone[4:], atol=1e-6)  # with beta 0.5 the task gate mattered


def test_cl_moe_runs_on_class_incremental_digits_and_resumes_its_state():
    cfg = tiny_config(SMALL, training__iterations=3)
    stream, s, ev = build(cfg, progress=False)
    for i, exp in enumerate(stream.train_stream):
        s.train(exp, eval_streams=[])
        ev.row(s, i)
    state = s.state_dict()
    _, fresh, _ = build(cfg, progress=False)
    fresh.load_state_dict(state)
    assert fresh.extra_results()["cl_moe"] == s.extra_results()["cl_moe"]
    x = torch.stack([stream.test_stream[1].dataset[i][0] for i in range(5)])
    task = stream.tasks[1]
    assert torch.equal(fresh.eval_logits(x, task, [0, 1, 2]), s.eval_logits(x, task, [0, 1, 2]))


def test_the_projector_switch_is_vlm_only():
    from lifelong_moe.config import ConfigError

    with pytest.raises(ConfigError, match="train_projector"):
        tiny_config({**SMALL, "train_projector": False})
    assert tiny_config({**SMALL, "previous_experts": "all_earlier"}).strategy_params().previous_experts == "all_earlier"


def test_shipped_config_is_the_quickstart_with_the_four_variants():
    from lifelong_moe.config import load_config

    from conftest import CONFIGS

    [base] = load_config(CONFIGS / "quickstart.yaml", only=["lora"])
    cfgs = load_config(CONFIGS / "cl_moe_quickstart.yaml")
    switches = [(c.strategy_params().task_router, c.strategy_params().merge) for c in cfgs]
    assert switches == [("paper", "paper"), ("paper", "off"), ("off", "paper"), ("reference", "reference_uniform")]
    assert all(c.stream == base.stream and c.training == base.training and c.backbone == base.backbone for c in cfgs)
