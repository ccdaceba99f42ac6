"""runtime.device and runtime.precision: resolution and errors, device plumbing, mixed precision, recording,
and CPU fp32 numbers unchanged.

Without a GPU the device plumbing is exercised on torch's ``meta`` device: a strategy built there
trains and evaluates with every data-dependent read (``.item()``, ``.cpu()``, ``nonzero``) faked, so
any tensor created on the CPU where the model's device was meant (a ``torch.zeros(n)`` without
``device``, a forgotten ``.to(device)``, a hard-coded ``.cpu()`` feeding a model op) meets a meta
tensor in an op and raises, as it would on a GPU. Where torch sees a GPU, the same test also runs on
CUDA, and a few end-to-end runs on the GPU are added.
"""
import contextlib
import json

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from lifelong_moe.runtime import device as D
from lifelong_moe.cli import main
from lifelong_moe.backbones.factory import load_clip
from lifelong_moe.errors import ConfigError, UserError
from lifelong_moe.moe.experts import StackedExperts
from lifelong_moe.registry import strategy_class
from lifelong_moe.results import record_runtime
from lifelong_moe.runs.runner import build, run
from lifelong_moe.strategies.base import StatefulPlugin

from helpers import tiny_config

GPU = torch.cuda.is_available()
MOE = {"num_experts": 4, "bottleneck": 8,
       "ddas": {"iterations": 5, "reference_iterations": 5, "reference_samples": 16}}
STRATEGIES = [("zeroshot", {}), ("finetune", {}), ("lora", {}), ("lwf", {}), ("ewc", {}), ("replay", {}),
              ("moe_adapters", MOE), ("moe_adapters", {**MOE, "ddas": {**MOE["ddas"], "features": "pixels"}})]
IDS = ["zeroshot", "finetune", "lora", "lwf", "ewc", "replay", "moe_adapters", "moe_pixels"]
SMALL = dict(stream__samples_per_class={"train": 4, "test": 2}, training__batch_size=20)  # 1 step per experience


def quiet(*_):
    pass


def record(d):
    return json.loads((d / "results.json").read_text())


# ----------------------------------------------------------------------------- resolution and errors
@pytest.mark.skipif(GPU, reason="auto is cuda:0 where torch sees a GPU")
def test_auto_is_the_cpu_without_a_gpu():
    assert D.resolve_device("auto") == torch.device("cpu") and D.resolve_device("cpu") == torch.device("cpu")
    assert D.describe_device(D.resolve_device("auto")) == "cpu"


@pytest.mark.parametrize("spec", ["cuda", "cuda:7", "mps"])
def test_unavailable_device_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch, capsys, spec):
    if spec != "mps" and torch.cuda.device_count() > int(spec.partition(":")[2] or 0):
        pytest.skip(f"{spec} exists here")
    if spec == "mps" and torch.backends.mps.is_available():
        pytest.skip("mps exists here")

    def no_backbone(*a, **k):
        raise AssertionError("the backbone was built (or pretrained) before the device was checked")

    monkeypatch.setattr("lifelong_moe.backbones.clip.create_clip", no_backbone)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config({"name": "finetune"}).to_dict()))
    out = tmp_path / "out"
    assert main(["run", str(config), "-o", str(out), "-q", f"runtime.device={spec}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: runtime.device: {spec!r} is not available"), err
    assert not out.exists()


def test_parallel_variants_check_the_device_before_pretraining(tmp_path, monkeypatch):
    from lifelong_moe.runs import jobs

    monkeypatch.setattr(jobs, "prepare_assets", lambda *a, **k: pytest.fail("pretraining started"))
    cfgs = [tiny_config({"name": "finetune"}, runtime__device=f"cuda:{torch.cuda.device_count()}")]
    with pytest.raises(UserError, match="runtime.device: 'cuda:.*' is not available"):
        jobs.run_parallel("c.yaml", [], cfgs * 2, [tmp_path / "a", tmp_path / "b"], 2, {}, quiet=True)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("key, value", [("device", "gpu"), ("device", "cuda:x"), ("device", "cpu:0"),
                                        ("precision", "fp8"), ("precision", "half")])
def test_unknown_device_or_precision_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match=f"runtime.{key}"):
        tiny_config({"name": "finetune"}, **{f"runtime__{key}": value})


# ----------------------------------------------------------------------------- CPU fp32 unchanged
REF = dict(stream__classes_per_experience=[4, 3, 3], stream__num_experiences=None,
           stream__samples_per_class={"train": 12, "test": 6}, runtime__threads=1,
           training__epochs=3, training__optimizer={"lr": 3e-3})
REF_MOE = {"num_experts": 4, "bottleneck": 8,
           "ddas": {"iterations": 30, "reference_iterations": 30, "reference_samples": 64}}


class PlainSteps:
    """The training step from before runtime.precision existed (Avalanche's): ``loss.backward()`` and
    ``optimizer.step()``, no loss scaler in between."""

    def scale(self, loss):
        return loss

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass

    def is_enabled(self):
        return False


def without_device_plumbing(monkeypatch):
    """Strategies compute as the code did before runtime.device / runtime.precision: no autocast or
    full-precision context around any forward pass, no loss scaler, experts on their fp32 branch."""
    from lifelong_moe.moe import experts
    from lifelong_moe.strategies import template

    monkeypatch.setattr(template, "autocast", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(template, "full_precision", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(template, "grad_scaler", lambda *a: PlainSteps())
    monkeypatch.setattr(experts, "autocast_active", lambda *a: False)


def counting_device_calls(monkeypatch) -> list[str]:
    """Names of the runtime.device helpers the strategies call, in call order (still the real ones)."""
    from lifelong_moe.strategies import template

    calls = []
    for name in ("autocast", "full_precision", "grad_scaler"):
        real = getattr(template, name)
        monkeypatch.setattr(template, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def losses(d):
    return [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]


def assert_same_checkpoints(a_dir, b_dir, n):
    from safetensors.torch import load_file

    for i in range(n):
        a, b = (load_file(str(d / "checkpoints" / f"exp_{i:03d}.safetensors")) for d in (a_dir, b_dir))
        assert a.keys() == b.keys()
        for k in a:  # bit for bit (NaN marks a task without DDAS calibration yet)
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["lora", "moe_adapters"])
def test_cpu_fp32_numbers_are_those_from_before_devices_existed(tmp_path, monkeypatch, name):
    """CPU fp32 through the device plumbing (autocast and full-precision contexts, the loss scaler, the
    experts' autocast branch) is bit-identical to the same run with that plumbing taken out, in this
    process: fp32 keeps the numbers of the code from before devices existed, on any CPU."""
    cfg = tiny_config({"name": name, **({"r": 4} if name == "lora" else REF_MOE)}, runtime__device="cpu", **REF)
    with monkeypatch.context() as m:
        calls = counting_device_calls(m)
        plumbed = run(cfg, tmp_path / "plumbed", progress=False, log=quiet)
    assert {"autocast", "grad_scaler"} <= set(calls)  # the first run did go through the plumbing
    with monkeypatch.context() as m:
        without_device_plumbing(m)
        plain = run(cfg, tmp_path / "plain", progress=False, log=quiet)
    a, b = record(plumbed), record(plain)
    assert a["zero_shot"] == b["zero_shot"] and a["matrix"] == b["matrix"]
    assert len(losses(plain)) == 48 and losses(plumbed) == losses(plain)
    assert_same_checkpoints(plumbed, plain, 3)


@pytest.mark.skipif(GPU, reason="auto is the GPU here")
def test_device_cpu_and_auto_give_bit_identical_runs(tmp_path):
    base = tiny_config({"name": "moe_adapters", **REF_MOE}, **{**REF, "training__epochs": 1, "runtime__device": "auto"})
    cpu = run(base.model_copy(update={"runtime": base.runtime.model_copy(update={"device": "cpu"})}),
              tmp_path / "cpu", progress=False, log=quiet)
    auto = run(base, tmp_path / "auto", progress=False, log=quiet)
    assert base.runtime.device == "auto"
    assert record(cpu)["matrix"] == record(auto)["matrix"] and losses(cpu) == losses(auto)
    assert_same_checkpoints(cpu, auto, 3)


# ----------------------------------------------------------------------------- device plumbing (meta)
class MetaReads(TorchDispatchMode):
    """Meta tensors hold no data: reading one back (``.item()``, ``bool``, ``.cpu()``) gives zeros and
    ``nonzero`` finds nothing, so a whole run goes through; every other op runs as it would."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.device.type == "meta":
            if func is aten._local_scalar_dense.default:
                return False if x.dtype == torch.bool else (0.0 if x.is_floating_point() else 0)
            if func is aten._to_copy.default and kwargs.get("device") not in (None, torch.device("meta")):
                return torch.zeros(x.shape, dtype=kwargs.get("dtype") or x.dtype, device=kwargs["device"])
            if func is aten.nonzero.default:
                return torch.empty((0, x.dim()), dtype=torch.long, device="meta")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def small(one_thread):
    """The SMALL stream and its evaluator (the same for every strategy)."""
    stream, _, evaluator = build(tiny_config({"name": "zeroshot"}, **SMALL), progress=False)
    return stream, evaluator


def on_device(cfg, stream, device):
    """``cfg``'s strategy on a fresh copy of its backbone, built on ``device``."""
    b = cfg.backbone
    model = load_clip(b.name, b.pretrained, cache_text=b.cache_text_features, pretrain=b.pretrain, progress=False)
    s = strategy_class(cfg.strategy.name)(model=model, cfg=cfg, params=cfg.strategy_params(), tasks=stream.tasks,
                                          device=device, progress=False)
    s.train_datasets = [e.dataset for e in stream.train_stream]
    return s


def strategy_tensors(s) -> dict[str, torch.Tensor]:
    """Every tensor a strategy holds for the model: the model's parameters and buffers, cached text
    features, MoE-Adapters' DDAS and feature extractor, and plugin state (LwF's teacher too)."""
    out = {f"model.{n}": t for n, t in [*s.model.named_parameters(), *s.model.named_buffers()]}
    out.update({f"text_cache.{i}": t for i, t in enumerate(s.model._text_cache.values())})
    out.update({f"moe_text.{i}": t for i, t in enumerate(getattr(s, "_text_feats", {}).values())})
    for part in ("ddas", "extractor"):
        module = getattr(s, part, None)
        if module is not None:
            out.update({f"{part}.{n}": t for n, t in [*module.named_parameters(), *module.named_buffers()]})
    for i, p in enumerate(s.plugins):
        if isinstance(p, StatefulPlugin) and type(p).__name__ != "ReplayPlugin":  # replay: CPU indices, below
            out.update({f"plugin{i}.{k}": v for k, v in p.state_dict().items()})
        if getattr(p, "old", None) is not None:
            out.update({f"plugin{i}.teacher.{n}": t for n, t in p.old.named_parameters()})
    return out


def assert_on(s, device: str) -> None:
    tensors = strategy_tensors(s)
    elsewhere = sorted(k for k, t in tensors.items() if t.device.type != device)
    assert not elsewhere, f"not on {device}: {elsewhere[:5]}"
    trainable = [n for n, p in s.model.named_parameters() if p.requires_grad]
    assert all(s.model.get_parameter(n).dtype == torch.float32 for n in trainable)
    assert all(t.dtype in (torch.float32, torch.long, torch.bool) for t in tensors.values())


@pytest.mark.parametrize("device", ["meta"] + (["cuda"] if GPU else []))
@pytest.mark.parametrize("name, extra", STRATEGIES, ids=IDS)
def test_every_tensor_follows_the_model_device_through_training_and_evaluation(small, name, extra, device):
    cfg = tiny_config({"name": name, **extra}, **SMALL)
    stream, evaluator = small
    s = on_device(cfg, stream, device)
    for m in s.model.modules():  # the grouped inference path sorts by data (unique): gather per sample
        if isinstance(m, StackedExperts):
            m.group_min = 0
    task = stream.tasks[0]
    s.model.text_features(s.head_for(task, task.classes, "first"))  # cached text features
    assert_on(s, device)
    with MetaReads():
        for exp in stream.train_stream if s.trains else []:
            s.train(exp, eval_streams=[])
        evaluator.row(s, len(stream.tasks) - 1)
        state = s.state_dict()
    assert_on(s, device)
    assert all(v.device.type == "cpu" for v in state.values())  # checkpoints: CPU copies, device-independent
    if name == "moe_adapters":
        assert len(s.ddas.task_aes) == 2 and s.ddas.reference is not None  # fitted there too
    if name == "ewc":
        assert len(s.plugins[0].terms) == 2


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta: loading is a no-op
@pytest.mark.parametrize("name, extra", [(n, e) for n, e in STRATEGIES[1:7]], ids=IDS[1:7])
def test_a_cpu_checkpoint_resumes_onto_another_device(small, name, extra):
    cfg = tiny_config({"name": name, **extra}, **SMALL)
    stream, _ = small
    cpu = on_device(cfg, stream, "cpu")
    cpu.train(stream.train_stream[0], eval_streams=[])
    state = cpu.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())  # device-independent checkpoint
    s = on_device(cfg, stream, "meta")
    with MetaReads():
        s.load_state_dict(state)
    assert_on(s, "meta")
    if name == "replay":  # indices into the CPU datasets: stay on the CPU by design
        assert all(v.device.type == "cpu" for v in s.plugins[0].memory.values())
    if name == "ewc":
        assert len(s.plugins[0].terms) == 1
    if name == "lwf":
        assert s.plugins[0].old is not None


# ----------------------------------------------------------------------------- mixed precision (CPU)
TINY = dict(stream__classes_per_experience=[4, 3, 3], stream__num_experiences=None,
            stream__samples_per_class={"train": 8, "test": 4}, runtime__threads=1)


@pytest.mark.parametrize("name, extra", [STRATEGIES[i] for i in (0, 1, 2, 3, 5, 6)]
                         + [("cl_moe", {"num_experts": 4, "r": 8})],
                         ids=[IDS[i] for i in (0, 1, 2, 3, 5, 6)] + ["cl_moe"])
def test_bf16_autocasts_every_forward_and_keeps_trainable_state_fp32(one_thread, name, extra):
    """bf16 on the CPU end to end: every forward pass of the image tower (training, LwF's teacher,
    replayed batches, DDAS features, evaluation) computes in bf16; weights, optimiser state, cached
    text features and DDAS stay fp32; the loss is fp32 and finite and the run learns something."""
    cfg = tiny_config({"name": name, **extra}, runtime__precision="bf16", **TINY)
    stream, s, evaluator = build(cfg, progress=False)
    assert not s.scaler.is_enabled()
    seen = []  # a function hook: LwF's deepcopied teacher shares it (and this list)
    s.model.clip.visual.conv1.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    before = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    for exp in stream.train_stream if s.trains else []:
        s.train(exp, eval_streams=[])
        assert s.loss.dtype == torch.float32 and torch.isfinite(s.loss).all()
    row = evaluator.row(s, len(stream.tasks) - 1)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(0.0 <= a <= 1.0 for a in row)
    assert_on(s, "cpu")
    for n, p in before.items():
        assert s.model.get_parameter(n).dtype == torch.float32
    if s.trains:
        assert any(not torch.equal(p, s.model.get_parameter(n)) for n, p in before.items())
        assert all(v.dtype == torch.float32 for st in s.optimizer.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.is_floating_point())
    x = stream.test_stream[0].dataset[0][0][None]
    assert s.eval_logits(x, stream.tasks[0], stream.tasks[0].classes).dtype == torch.bfloat16


def test_fp16_scales_the_loss_and_still_trains(one_thread):
    cfg = tiny_config({"name": "finetune"}, runtime__precision="fp16", **TINY)
    stream, s, _ = build(cfg, progress=False)
    assert s.scaler.is_enabled() and s.scaler.get_scale() == 2.0 ** 16
    grads = []  # what backward produces: the loss times the scale
    s.model.clip.visual.conv1.weight.register_hook(lambda g: grads.append(g.abs().max().item()))
    before = s.model.clip.visual.conv1.weight.detach().clone()
    s.train(stream.train_stream[0], eval_streams=[])
    w = s.model.clip.visual.conv1.weight
    assert len(grads) == 4 and max(grads) > 1.0  # scaled: unscaled gradients of this model are far smaller
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert not torch.equal(before, w)  # the scaler let steps through


def test_fp32_uses_no_autocast_and_no_scaler():
    with D.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with D.autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and D.autocast_active("cpu")
        with D.full_precision("cpu"):
            assert not D.autocast_active("cpu")
    assert not D.grad_scaler("cpu", "fp32").is_enabled() and not D.grad_scaler("cpu", "bf16").is_enabled()


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_gpu_run_completes_and_records_its_device(tmp_path, precision):
    out = run(tiny_config({"name": "moe_adapters", **MOE}, runtime__device="cuda", runtime__precision=precision,
                          **TINY), tmp_path / "r", progress=False, log=quiet)
    r = record(out)
    assert r["status"] == "complete" and all(0.0 <= a <= 1.0 for row in r["matrix"] for a in row)
    assert r["runtime"] == {"device": f"cuda:0 ({torch.cuda.get_device_name(0)})", "precision": precision}


# ----------------------------------------------------------------------------- recording
def test_device_and_precision_are_recorded(tmp_path):
    out = run(tiny_config({"name": "zeroshot"}, runtime__device="cpu", runtime__precision="bf16", **TINY),
              tmp_path / "r", progress=False, log=quiet)
    assert record(out)["runtime"] == {"device": "cpu", "precision": "bf16"}
    out = run(tiny_config({"name": "zeroshot"}, **TINY), tmp_path / "a", progress=False, log=quiet)
    assert record(out)["runtime"] == {"device": D.describe_device(D.resolve_device("auto")), "precision": "fp32"}


def test_resume_in_another_precision_is_refused_and_on_another_device_recorded(tmp_path):
    cfg = tiny_config({"name": "finetune"}, runtime__precision="bf16", **TINY)
    out = run(cfg, tmp_path / "r", progress=False, stop_after=1, log=quiet)
    saved = (out / "results.json").read_bytes()
    fp32 = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"precision": "fp32"})})
    with pytest.raises(UserError, match="--resume: the run computes in bf16, runtime.precision is now fp32"):
        run(fp32, out, resume=True, progress=False, log=quiet)
    assert (out / "results.json").read_bytes() == saved
    r = {"runtime": {"device": "cpu", "precision": "bf16"}}
    record_runtime(r, "cuda:0 (NVIDIA H200)", "bf16")
    record_runtime(r, "cuda:0 (NVIDIA H200)", "bf16")
    assert r["runtime"] == {"device": "cpu", "precision": "bf16", "resumed_on": ["cuda:0 (NVIDIA H200)"]}
