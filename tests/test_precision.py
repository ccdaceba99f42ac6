"""Precision end to end on the randomly initialised tiny LLaVA: ``backbone.dtype`` stores the frozen
weights in bf16 and ``runtime.precision`` autocasts every model call in it, for every VLM strategy
(training, evaluation, CL-MoE's statistics pass) and for the Editor with every edit method (fit,
edit, answer, evaluate, the edit runner); trainable state stays fp32 and the record says what was
applied."""
import copy
import json

import pytest
import torch

from edit_records import TINY_EDIT_CONFIG, world_records, write_record_file
from lifelong_moe.backbones.vlm import VisionLanguageModel
from lifelong_moe.config import validate
from lifelong_moe.editing.config import load_edit_config
from lifelong_moe.editing.editor import Editor
from lifelong_moe.errors import ConfigError, UserError
from lifelong_moe.families import FAMILIES
from lifelong_moe.runs import runner
from lifelong_moe.runs.edit_runner import run_edit
from lifelong_moe.runtime.device import autocast

BF16 = torch.bfloat16
PARAMS = {"zeroshot": {}, "lora": {"r": 4}, "lwf": {"r": 4}, "replay": {"r": 4, "memory_size": 8},
          "cl_moe": {"r": 8, "num_experts": 4}}


def quiet(*_):
    pass


def vqa_config(strategy: dict, backbone: dict | None = None, runtime: dict | None = None):
    return validate({
        "name": "p", "seed": 0,
        "stream": {"kind": "vqa", "dataset": "synthetic_vqa", "question_types": ["color", "type"],
                   "questions_per_type": {"train": 16, "test": 8}},
        "backbone": {"family": "vlm", "name": "lmoe-tiny-llava", **(backbone or {})},
        "strategy": strategy,
        "training": {"iterations": 2, "batch_size": 8, "optimizer": {"lr": 1e-2}},
        "evaluation": {"batch_size": 16, "max_new_tokens": 2},
        "runtime": {"device": "cpu", "threads": 1, **(runtime or {})},
    })


# ----------------------------------------------------------------------------- configuration
def test_precision_follows_the_backbone_dtype_and_a_mismatch_is_one_error():
    assert vqa_config({"name": "lora"}).runtime.precision == "fp32"
    assert vqa_config({"name": "lora"}, {"dtype": "bf16"}).runtime.precision == "bf16"  # from the dtype
    assert vqa_config({"name": "lora"}, {"dtype": "fp16"}, {"precision": "fp16"}).runtime.precision == "fp16"
    assert vqa_config({"name": "lora"}, runtime={"precision": "bf16"}).backbone.dtype == "fp32"  # fp32 weights, AMP
    for dtype, precision in [("bf16", "fp32"), ("bf16", "fp16"), ("fp16", "bf16")]:
        with pytest.raises(ConfigError, match=f"runtime.precision: {precision} with backbone.dtype {dtype}"):
            vqa_config({"name": "lora"}, {"dtype": dtype}, {"precision": precision})
    with pytest.raises(ConfigError, match="backbone.dtype"):
        vqa_config({"name": "lora"}, {"dtype": "half"})
    edit = {"method": {"name": "retrieval"}, "backbone": {"dtype": "bf16"}}
    assert load_edit_config(edit)[0].runtime.precision == "bf16"
    with pytest.raises(ConfigError, match="runtime.precision: fp32 with backbone.dtype bf16"):
        load_edit_config({**edit, "runtime": {"precision": "fp32"}})


# ----------------------------------------------------------------------------- every VLM strategy
@pytest.mark.parametrize("name", sorted(FAMILIES["vlm"].strategies))
def test_every_vlm_strategy_trains_and_evaluates_in_bf16(one_thread, tmp_path, monkeypatch, name):
    """bf16 weights, bf16 autocast: training steps and evaluation run, every frozen weight stays bf16
    and untouched, trainable state (LoRA, experts, routers, the projector CL-MoE trains) and optimiser
    state are fp32 and learn, losses and logits are finite, and results.json says bf16."""
    cfg = vqa_config({"name": name, **PARAMS[name]}, {"dtype": "bf16"})
    assert cfg.runtime.precision == "bf16"
    built = {}
    real_build = runner.build

    def build(*a, **k):
        stream, s, evaluator = built["parts"] = real_build(*a, **k)
        built["frozen"] = {n: p.detach().clone() for n, p in s.model.named_parameters() if n not in s.state_names}
        built["trainable"] = {n: s.model.get_parameter(n).detach().clone() for n in s.state_names}
        return stream, s, evaluator

    monkeypatch.setattr(runner, "build", build)
    out = runner.run(cfg, tmp_path / "r", progress=False, log=quiet)
    stream, s, _ = built["parts"]
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "complete"
    assert record["runtime"] == {"device": "cpu", "precision": "bf16", "dtype": "bf16"}
    assert all(0.0 <= a <= 1.0 for row in record["matrix"] for a in row)
    params = dict(s.model.named_parameters())
    assert built["frozen"] and all(t.dtype == BF16 and torch.equal(params[n], t) for n, t in built["frozen"].items())
    assert all(params[n].dtype == torch.float32 for n in s.state_names)
    if s.trains:
        assert s.state_names and any(not torch.equal(params[n], t) for n, t in built["trainable"].items())
        steps = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert len(steps) == 4 and all(torch.isfinite(torch.tensor(steps)))
        assert all(v.dtype == torch.float32 for st in s.optimizer.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.is_floating_point())
    task = stream.tasks[0]
    x = torch.stack([stream.test_stream[0].dataset[i][0] for i in range(4)])
    batch = s.qa_batch(x, task.test_records[:4])
    seen = []
    hook = s.model.decoder_layers[-1].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).dtype))
    with torch.no_grad(), s.autocast():
        logits = s.model.logits(batch)
    hook.remove()
    assert seen == [BF16] and logits.dtype == BF16 and torch.isfinite(logits.float()).all()
    assert len(s.answer(x, [r.question for r in task.test_records[:4]], task)) == 4


# ----------------------------------------------------------------------------- the Editor
@pytest.fixture(scope="module")
def bf16_vlm(one_thread):
    torch.manual_seed(0)
    return VisionLanguageModel.from_config("lmoe-tiny-llava", dtype=BF16)  # random init: fast


@pytest.fixture(scope="module")
def recs(bf16_vlm):
    return world_records(bf16_vlm, 8, seed=3)


def outputs(vlm, recs):
    """Teacher-forced logits and greedy ids of ``recs`` under bf16 autocast."""
    x = torch.stack([r.image for r in recs])
    batch = vlm.batch(x, [r.src for r in recs], [r.alt for r in recs])
    with torch.no_grad(), autocast("cpu", "bf16"):
        return vlm.logits(batch), vlm.generate_ids(x, [r.src for r in recs], 3)


# LiveEdit: 2 meta-training steps; its vision-sentinel filter, barely trained, would pass no expert
METHODS = {"liveedit": {"steps": 2, "batch_size": 2, "fitted": "none", "hard_filter": False}, "ft": {"steps": 3},
           "lora": {"steps": 3}, "retrieval": {"threshold": 0.999}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_editor_fits_edits_and_answers_in_bf16(bf16_vlm, recs, method):
    vlm = copy.deepcopy(bf16_vlm)
    ref_logits, ref_ids = outputs(vlm, recs)
    frozen = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    assert all(p.dtype == BF16 for p in frozen.values())
    editor = Editor(vlm, method, **METHODS[method])
    assert (editor.dtype, editor.precision) == ("bf16", "bf16")  # precision: the weights' dtype by default
    if editor.needs_fit:
        stats = editor.fit(recs[4:])
        assert all(torch.isfinite(torch.tensor(v)) for v in stats["final_losses"].values())
    state = editor.method.state_dict()
    if method in ("liveedit", "lora"):  # the method's own trainable state: fp32
        assert state and all(v.dtype == torch.float32 for v in state.values())
    logits, ids = outputs(editor.vlm, recs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)  # empty store: the unedited bf16 model
    r = recs[0]
    editor.edit(image=r.image, prompt=r.src, target=r.alt)
    answer = editor.answer(r.image, r.src, max_new_tokens=3)
    moved, _ = outputs(editor.vlm, recs)
    assert torch.isfinite(moved.float()).all() and not torch.equal(moved, ref_logits)  # the edit acts
    if method == "retrieval":
        assert answer == r.alt
    if method == "ft":  # the edited weight stays bf16 and moved (fp32 master steps, not rounded away)
        assert all(v.dtype == BF16 for v in editor.method.state_dict().values())
        assert any(not torch.equal(v, state[n]) for n, v in editor.method.state_dict().items())
    scores = editor.evaluate(recs[1:3], keep=False, batch_size=4, max_new_tokens=3)
    assert all(v is None or 0.0 <= v <= 1.0 for v in scores["metrics"].values())
    editor.reset()
    logits, ids = outputs(editor.vlm, recs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    if method != "ft":  # FT edits the backbone's own weight (restored by reset)
        assert all(torch.equal(p, frozen[n]) for n, p in editor.vlm.named_parameters() if n in frozen)


def test_the_editor_refuses_another_precision_on_a_bf16_backbone(bf16_vlm):
    with pytest.raises(UserError, match="precision: fp32 with backbone.dtype bf16"):
        Editor(copy.deepcopy(bf16_vlm), "retrieval", precision="fp32")


def test_edit_runner_applies_and_records_bf16(one_thread, tmp_path, monkeypatch):
    write_record_file(tmp_path / "data", 12)
    path = tmp_path / "edit.yaml"
    path.write_text(TINY_EDIT_CONFIG.format(data=tmp_path / "data").replace(
        "backbone: {name: lmoe-tiny-llava}", "backbone: {name: lmoe-tiny-llava, dtype: bf16}"))
    cfg = load_edit_config(path)[0]
    assert (cfg.backbone.dtype, cfg.runtime.precision) == ("bf16", "bf16")
    calls = []  # the editor's autocast is on around the whole run
    real = Editor.autocast
    monkeypatch.setattr(Editor, "autocast", lambda self: calls.append(self.precision) or real(self))
    from lifelong_moe.editing import metrics as EM

    real_score = EM.score

    def score(*a, **k):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
        return real_score(*a, **k)

    monkeypatch.setattr(EM, "score", score)
    out = run_edit(cfg, tmp_path / "run", progress=False, log=quiet)
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "complete" and calls and set(calls) == {"bf16"}
    assert rec["runtime"] == {"device": "cpu", "precision": "bf16", "dtype": "bf16"}
    assert all(rec["extra"]["edit_table"][k]["reliability.exact_match"] == 1.0 for k in ("1", "4", "8"))


def test_a_vlm_run_saved_before_backbone_dtype_existed_still_resumes(tmp_path):
    import yaml

    from lifelong_moe.results import RunDir

    cfg = vqa_config({"name": "lora"})
    saved = cfg.to_dict()
    del saved["backbone"]["dtype"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    RunDir(tmp_path)._check_saved_config(cfg)  # the default: no difference
    with pytest.raises(UserError, match="differs from the saved run in: backbone"):
        RunDir(tmp_path)._check_saved_config(vqa_config({"name": "lora"}, {"dtype": "bf16"}))
