"""``--dry-run`` (lifelong_moe/runs/dry_run.py): offline plans of 7B runs from the published model configs.

The published configs of llava-1.5-7b, Qwen2-VL-7B and BLIP-2 OPT-2.7b are checked field by field
against their hub config.json values (written here), then each is built on the meta device, CL-MoE is
injected, one training and one generation step are traced on fake tensors, and the plan's counts are
compared with the published sizes and with CL-MoE's expected trainable count. No network: sockets
refuse to connect and the hub is offline."""
import socket

import pytest

from lifelong_moe.cli import main
from lifelong_moe.config import validate
from lifelong_moe.errors import UserError
from lifelong_moe.runs import dry_run as D

from conftest import CONFIGS

PRESETS = CONFIGS / "presets"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*a, **k):
        raise AssertionError("the dry run tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# the hub's config.json values (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct, Salesforce/blip2-opt-2.7b)
PUBLISHED = {
    "llava-hf/llava-1.5-7b-hf": {
        "model_type": "llava", "image_token_id": 32000, "vision_feature_layer": -2,
        "text_config": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "intermediate_size": 11008, "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "image_size": 336, "patch_size": 14}},
    "Qwen/Qwen2-VL-7B-Instruct": {
        "model_type": "qwen2_vl", "image_token_id": 151655,
        "text_config": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064},
        "vision_config": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2}},
    "Salesforce/blip2-opt-2.7b": {
        "model_type": "blip-2", "num_query_tokens": 32,
        "text_config": {"hidden_size": 2560, "num_hidden_layers": 32, "ffn_dim": 10240, "vocab_size": 50304},
        "vision_config": {"hidden_size": 1408, "num_hidden_layers": 39, "image_size": 224, "patch_size": 14}},
}
# parameters of the published checkpoints (the hub's safetensors metadata)
SIZES = {"llava-hf/llava-1.5-7b-hf": 7_063_427_072, "Qwen/Qwen2-VL-7B-Instruct": 8_291_375_616,
         "Salesforce/blip2-opt-2.7b": 3_744_761_856}
# (hidden, ffn, layers, linears, projector parameters) of each language model
SHAPES = {"llava-hf/llava-1.5-7b-hf": (4096, 11008, 32, "llama", 1024 * 4096 + 4096 + 4096 * 4096 + 4096),
          "Qwen/Qwen2-VL-7B-Instruct": (3584, 18944, 28, "qwen", None),
          "Salesforce/blip2-opt-2.7b": (2560, 10240, 32, "opt", 768 * 2560 + 2560)}


def cl_moe_trainable(name: str, r: int = 32, experts: int = 4) -> int:
    """CL-MoE's trainable count: per targeted linear, A [r, in] + B [r, out] + the router [E, in]."""
    h, f, layers, kind, _ = SHAPES[name]
    kv = 512 if kind == "qwen" else h  # Qwen2-7B: 4 KV heads of 128
    if kind == "opt":  # q, k, v, out_proj, fc1, fc2
        shapes = [(h, h)] * 4 + [(h, f), (f, h)]
    else:  # q, k, v, o, gate, up, down
        shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
    return layers * sum(r * (i + o) + experts * i for i, o in shapes)


def test_published_configs_are_the_hubs():
    for name, want in PUBLISHED.items():
        cfg = D.PUBLISHED[name]()
        for key, value in want.items():
            if isinstance(value, dict):
                sub = getattr(cfg, key)
                assert {k: getattr(sub, k) for k in value} == value, (name, key)
            else:
                assert getattr(cfg, key) == value, (name, key)


def run_config(name: str, **over) -> object:
    data = {"name": "plan", "stream": {"kind": "vqa", "dataset": "vqacl", "order": "vqacl", "root": "data/vqacl"},
            "backbone": {"family": "vlm", "name": name, "dtype": "bf16"},
            "training": {"batch_size": 2, "optimizer": {"name": "adamw", "lr": 2e-4}},
            "evaluation": {"batch_size": 2, "max_new_tokens": 4},
            "strategy": {"name": "cl_moe", "num_experts": 4, "r": 32, "alpha": 64}}
    data.update(over)
    return validate(data)


def check_plan(plan, name: str):
    base = SIZES[name]
    projector = SHAPES[name][4]
    if projector is None:  # Qwen2-VL's merger: LayerNorm 5120 + Linear 5120 -> 5120 + Linear 5120 -> 3584
        projector = 2 * 1280 + 5120 * 5120 + 5120 + 5120 * 3584 + 3584
    experts = cl_moe_trainable(name)
    assert plan.params_total == base + experts  # the experts are new parameters
    assert plan.params_trainable == experts + projector  # experts + routers + the projector (the release)
    assert plan.optimizer_bytes == 2 * 4 * plan.params_trainable  # AdamW, fp32 trainable state
    assert plan.weight_bytes == 2 * (base - projector) + 4 * plan.params_trainable  # bf16 frozen, fp32 trainable
    assert plan.activation_bytes > 0 and plan.kv_cache_bytes > 0
    assert plan.train_total > plan.weight_bytes
    assert "published config" in plan.config_source


@pytest.mark.parametrize("name", ["Qwen/Qwen2-VL-7B-Instruct", "Salesforce/blip2-opt-2.7b"])
def test_dry_run_published_configs(name):
    plan = D.plan_run(run_config(name), check_data=False)
    check_plan(plan, name)
    text = plan.format()
    assert f"{plan.params_total:,}" in text and "per device, training" in text


def test_cl_moe_preset_plans_llava_7b_from_the_cli(capsys):
    """The README's command: the CL-MoE preset on llava-1.5-7b (7.06B parameters), offline."""
    assert main(["run", str(PRESETS / "cl_moe_vqacl_llava7b.yaml"), "--dry-run", "--skip-data"]) == 0
    out = capsys.readouterr().out
    name = "llava-hf/llava-1.5-7b-hf"
    experts = cl_moe_trainable(name)
    assert f"{SIZES[name] + experts:,}" in out  # 7,063,427,072 + the experts
    assert f"{experts + SHAPES[name][4]:,}" in out  # 105,488,384 trainable
    assert "built on the meta device in bf16" in out and "not checked (--skip-data)" in out
    assert "batch 8 x (576 image" in out  # LLaVA-1.5: 576 image tokens per picture


def test_skip_data_without_dry_run_is_refused(capsys):
    for cmd in ("run", "edit"):
        assert main([cmd, str(PRESETS / "cl_moe_vqacl_llava7b.yaml"), "--skip-data"]) == 2
        assert "--skip-data only applies to --dry-run" in capsys.readouterr().err


def test_liveedit_preset_plans_its_meta_training_step(capsys):
    """LiveEdit at the reference's 7B sizes: ~103M trainable (docs: "about 103M for LLaVA")."""
    assert main(["edit", str(PRESETS / "liveedit_evqa_llava7b.yaml"), "--dry-run", "--skip-data"]) == 0
    out = capsys.readouterr().out
    assert "editing method liveedit on llava-hf/llava-1.5-7b-hf" in out
    frozen = next(line for line in out.splitlines() if line.strip().startswith("frozen"))
    trainable = next(line for line in out.splitlines() if line.strip().startswith("trainable"))
    assert "7,063,427,072" in frozen
    n = int(trainable.split()[1].replace(",", ""))
    assert 100e6 < n < 106e6
    assert "8 edits x 4 inputs" in out and "1000 edits stored" in out


def test_missing_partition_file_fails_before_any_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "Partition_Q").mkdir()

    def no_model(*a, **k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(D, "meta_vlm", no_model)
    code = main(["run", str(PRESETS / "cl_moe_vqacl_llava7b.yaml"), "--dry-run", f"stream.root={tmp_path}",
                 f"stream.partition_dir={tmp_path / 'Partition_Q'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "karpathy_train_q_recognition.json not found" in err and "--skip-data" in err


def test_missing_edit_file_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "meta_vlm", lambda *a, **k: pytest.fail("model built before the data was checked"))
    code = main(["edit", str(PRESETS / "liveedit_evqa_llava7b.yaml"), "--dry-run", f"data.image_root={tmp_path}",
                 f"data.train_path={tmp_path / 'vqa_train.json'}"])
    err = capsys.readouterr().err
    assert code == 2 and "vqa_train.json" in err and "not found" in err


def test_unknown_model_without_a_config_is_one_error():
    with pytest.raises(UserError, match="published configs"):
        D.model_config("nobody/no-such-vlm")
    with pytest.raises(UserError, match="shipped tiny VLM"):
        D.model_config("lmoe-tiny-llava")


def test_present_data_is_checked_by_the_stream_loader(tmp_path):
    from test_vqa_real_path import _partition

    for q in ("color", "count"):
        _partition(tmp_path, q)
    cfg = run_config("llava-hf/llava-1.5-7b-hf", stream={"kind": "vqa", "dataset": "vqacl", "root": str(tmp_path),
                                                          "question_types": ["color", "count"]})
    lines = D.check_stream_data(cfg.stream, cfg.seed)
    assert lines[0].startswith("vqacl/color: 4 train / 3 test questions") and "karpathy_train_q_color.json" in lines[0]
    (tmp_path / "val2014" / "COCO_val2014_000000001000.jpg").unlink()  # one of count's test pictures
    with pytest.raises(UserError, match="COCO_val2014_000000001000"):
        D.check_stream_data(cfg.stream, cfg.seed)


def test_a_local_config_comes_before_the_published_one(tmp_path):
    cfg = D.PUBLISHED["llava-hf/llava-1.5-7b-hf"]()
    cfg.text_config.num_hidden_layers = 2  # a user's own model: its directory's config.json is the one read
    cfg.save_pretrained(tmp_path)
    got, source = D.model_config(str(tmp_path))
    assert got.text_config.num_hidden_layers == 2 and source == f"{tmp_path}/config.json"


def test_a_failing_step_is_one_error_naming_the_model():
    with pytest.raises(UserError, match=r"dry run of m/x: a traced step failed \(RuntimeError: shapes"):
        with D.tracing("m/x"):
            raise RuntimeError("shapes [2, 3] and [4, 5] cannot be multiplied")
