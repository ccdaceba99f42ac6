"""LiveEdit's fitted weights as an artefact (lifelong_moe/editing/fitted.py), on a randomly initialised
tiny LLaVA: save -> load gives bit-identical edits, an unfitted editor refuses to edit, weights fitted
for another backbone or other settings are refused, a shipped artefact's manifest verifies and
``fitted: auto`` loads it (in the Editor and the edit runner), and ``lifelong-moe fit liveedit`` runs
at a tiny budget."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lifelong_moe.backbones import shipped as S
from lifelong_moe.backbones.vlm import VisionLanguageModel
from lifelong_moe.backbones.vlm_tiny import build_tiny_llava
from lifelong_moe.cli import main
from lifelong_moe.editing import fitted as F
from lifelong_moe.editing.editor import Editor
from lifelong_moe.errors import UserError
from lifelong_moe.streams.edit_synthetic import edit_records

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"steps": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def base_vlm(one_thread) -> VisionLanguageModel:
    model, processor = build_tiny_llava("lmoe-tiny-llava", None, seed=0)  # random init: fast
    return VisionLanguageModel(model, processor, name="lmoe-tiny-llava")


@pytest.fixture(scope="module")
def train():
    return edit_records("train", 4, seed=0)


@pytest.fixture(scope="module")
def recs():
    return edit_records("test", 3, seed=0)


@pytest.fixture(scope="module")
def fitted_file(base_vlm, train, tmp_path_factory):
    """Fitted weights (2 steps) of the random backbone, saved once."""
    editor = Editor(copy.deepcopy(base_vlm), "liveedit", **SMALL)
    editor.fit(train)
    d = tmp_path_factory.mktemp("fitted")
    return editor.save_fitted(d)


@torch.no_grad()
def logits(vlm, recs):
    return vlm.logits(vlm.batch(torch.stack([r.image for r in recs]), [r.src for r in recs], [r.alt for r in recs]))


def test_meta_training_reports_its_progress_without_changing_the_fit(base_vlm, train):
    lines, quiet = [], Editor(copy.deepcopy(base_vlm), "liveedit", steps=40, batch_size=2)
    loud = Editor(copy.deepcopy(base_vlm), "liveedit", steps=40, batch_size=2)
    a, b = quiet.fit(train), loud.fit(train, progress=lines.append)
    assert lines[0].startswith("meta-training cache: ") and "KiB per record x 4 records" in lines[0], lines[0]
    steps = lines[1:]
    assert [ln.split(":")[0] for ln in steps] == [f"meta-training step {2 * (i + 1)}/40" for i in range(20)]
    assert all("rel " in ln and "hard_sentinel " in ln and "s left)" in ln for ln in steps), steps[-1]
    assert a["final_losses"] == b["final_losses"]
    for (k, v), w in zip(quiet.method.state_dict().items(), loud.method.state_dict().values()):
        assert torch.equal(v, w), k


def test_save_then_load_gives_bit_identical_edits(base_vlm, train, recs, tmp_path):
    a = Editor(copy.deepcopy(base_vlm), "liveedit", **SMALL)
    a.fit(train)
    path = a.save_fitted(tmp_path)
    info = json.loads(path.with_suffix(".json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    assert info["key"] == a.method.fitted_key() and info["key"]["layer"] == 2 and info["steps"] == 2
    assert info["backbone"]["fingerprint"] == a.fingerprint and info["train"]["records"] == 4
    assert path.name == f"{F.artefact_name('liveedit', f'lmoe-tiny-llava-fp{a.fingerprint}', info['key'])}.safetensors"
    b = Editor(copy.deepcopy(base_vlm), "liveedit", fitted=str(tmp_path), **SMALL)  # a directory works
    assert b.is_fitted and b.fitted["source"] == "path" and b.fitted["path"] == str(path)
    assert all(torch.equal(v, b.method.state_dict()[k]) for k, v in a.method.state_dict().items())
    a.edit_batch(recs)
    b.edit_batch(recs)
    for ea, eb in zip(a.store.active, b.store.active):
        assert all(torch.equal(ea.tensors[k], eb.tensors[k]) for k in ea.tensors)
    assert torch.equal(logits(a.vlm, recs), logits(b.vlm, recs))
    c = Editor(copy.deepcopy(base_vlm), "liveedit", fitted="none", **SMALL)
    c.load_fitted(path)  # the file itself, through the API
    c.edit_batch(recs)
    assert torch.equal(logits(c.vlm, recs), logits(a.vlm, recs))


@pytest.mark.parametrize("fitted", ["auto", "none"])
def test_an_unfitted_editor_refuses_to_edit_and_says_how_to_fix_it(base_vlm, recs, fitted):
    editor = Editor(copy.deepcopy(base_vlm), "liveedit", fitted=fitted, **SMALL)  # nothing shipped for it
    assert not editor.is_fitted
    r = recs[0]
    for call in (lambda: editor.edit(image=r.image, prompt=r.src, target=r.alt), lambda: editor.edit_batch(recs),
                 lambda: editor.evaluate(recs)):
        with pytest.raises(UserError, match=r"liveedit is not fitted.*editor\.fit\(train_records\).*"
                                            r"editor\.load_fitted\(path\).*fitted=<path>.*lifelong-moe fit liveedit"):
            call()
    assert len(editor.store) == 0
    with pytest.raises(UserError, match="not fitted"):
        editor.save_fitted("unused")


def test_fitted_weights_for_another_backbone_or_other_settings_are_refused(base_vlm, fitted_file):
    other = copy.deepcopy(base_vlm)
    with torch.no_grad():
        other.model.lm_head.weight.mul_(1.5)
    with pytest.raises(UserError, match=r"were fitted on backbone 'lmoe-tiny-llava-fp\w+' .* not on this one"):
        Editor(other, "liveedit", fitted=str(fitted_file), **SMALL)
    with pytest.raises(UserError, match=r"other liveedit settings \(steps: 2 there, 3 here\)"):
        Editor(copy.deepcopy(base_vlm), "liveedit", fitted=str(fitted_file), steps=3, batch_size=2)
    with pytest.raises(UserError, match=r"rank: 4 there, 2 here"):
        Editor(copy.deepcopy(base_vlm), "liveedit", fitted=str(fitted_file), rank=2, **SMALL)
    # settings that act only when editing or answering do not shape the weights
    assert Editor(copy.deepcopy(base_vlm), "liveedit", fitted=str(fitted_file), max_experts=3, **SMALL).is_fitted
    with pytest.raises(UserError, match="no such file or directory"):
        Editor(copy.deepcopy(base_vlm), "liveedit", fitted=str(fitted_file.parent / "missing"), **SMALL)


def test_a_damaged_artefact_is_refused(base_vlm, fitted_file, tmp_path):
    bad = tmp_path / fitted_file.name
    bad.write_bytes(fitted_file.read_bytes()[:-1] + b"\x00")
    bad.with_suffix(".json").write_bytes(fitted_file.with_suffix(".json").read_bytes())
    with pytest.raises(UserError, match="does not match the sha256 .* .damaged."):
        Editor(copy.deepcopy(base_vlm), "liveedit", fitted=str(bad), **SMALL)


def test_a_shipped_artefact_verifies_against_its_manifest_and_auto_loads_it(base_vlm, fitted_file, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(F, "FITTED_ROOT", tmp_path / "weights")
    dest = F.shipped_dir("liveedit")
    dest.mkdir(parents=True)
    shipped = dest / fitted_file.name
    for p in (fitted_file, fitted_file.with_suffix(".json")):
        (dest / p.name).write_bytes(p.read_bytes())
    stale = json.loads(shipped.with_suffix(".json").read_text())  # fitted on an older checkpoint of this model
    stale["backbone"]["checkpoint"] = "lmoe-tiny-llava-000000000000"
    (dest / "liveedit-old.json").write_text(json.dumps(stale))
    (dest / "liveedit-old.safetensors").write_bytes(b"x")
    command = "lifelong-moe fit liveedit configs/edit_quickstart.yaml --ship"
    manifest, removed = F.ship(shipped, command)
    assert removed == ["liveedit-old"] and not (dest / "liveedit-old.json").exists()
    assert S.verify(shipped) == []
    m = json.loads(manifest.read_text())
    assert set(m["files"]) == {shipped.name, shipped.with_suffix(".json").name}
    assert m["command"] == command and m["steps"] == 2 and m["wall_seconds"] > 0 and "commit" in m
    assert m["config"]["backbone"]["tag"].startswith("lmoe-tiny-llava-fp") and m["config"]["key"]["steps"] == 2
    auto = Editor(copy.deepcopy(base_vlm), "liveedit", **SMALL)  # fitted: auto
    assert auto.is_fitted and auto.fitted["source"] == "shipped" and auto.fitted["path"] == str(shipped)
    assert not Editor(copy.deepcopy(base_vlm), "liveedit", steps=3, batch_size=2).is_fitted  # other settings
    assert not Editor(copy.deepcopy(base_vlm), "liveedit", fitted="none", **SMALL).is_fitted
    shipped.write_bytes(shipped.read_bytes()[:-1] + b"\x00")
    with pytest.raises(UserError, match="do not match their manifest .*sha256 differs"):
        Editor(copy.deepcopy(base_vlm), "liveedit", **SMALL)


TINY = """
name: fit_tiny
backbone: {{name: lmoe-tiny-llava}}
method: {{name: liveedit, steps: 2, batch_size: 2}}
data: {{source: synthetic, train: {train}, eval: 2}}
evaluation: {{edit_counts: [1, 2], max_chunks: 1, matrix_chunks: 2, batch_size: 2, max_new_tokens: 2}}
runtime: {{device: cpu, threads: 1}}
"""


def test_cli_fit_liveedit_at_a_tiny_budget_then_the_edit_runner_loads_the_shipped_weights(tmp_path, monkeypatch,
                                                                                           capsys):
    from lifelong_moe.editing.config import load_edit_config
    from lifelong_moe.runs.edit_runner import fit_plan, run_edit

    cfg = tmp_path / "fit.yaml"
    cfg.write_text(TINY.format(train=0))
    assert main(["fit", "liveedit", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "no train split" in capsys.readouterr().err
    assert main(["fit", "liveedit", str(cfg), "data.train=4", "--ship"]) == 2  # a random backbone is not shipped
    assert "shipped for the shipped tiny VLM only" in capsys.readouterr().err
    monkeypatch.setattr(F, "FITTED_ROOT", tmp_path / "weights")
    assert main(["fit", "liveedit", str(cfg), "data.train=4", "--out", str(F.shipped_dir("liveedit")), "-q"]) == 0
    path = F.locate(capsys.readouterr().out.strip().splitlines()[-1])
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["steps"] == 2 and info["train"] == {"source": "synthetic", "records": 4, "seed": 0}
    F.ship(path, "lifelong-moe fit liveedit fit.yaml data.train=4 --ship")
    logs = []
    out = run_edit(load_edit_config(str(cfg))[0], tmp_path / "run", log=logs.append)  # data.train 0: no fit possible
    assert any("shipped fitted weights loaded from" in m and "instead of meta-training" in m for m in logs), logs
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "complete" and rec["extra"]["fit"]["loaded"]["source"] == "shipped"
    with pytest.raises(UserError, match="liveedit needs fitted weights: data.train is 0"):
        run_edit(load_edit_config(str(cfg), ["method.fitted=none"])[0], tmp_path / "never", log=logs.append)
    assert not (tmp_path / "never" / "results.json").exists()
    # a config with another train split meta-trains instead of using the shipped weights
    other = load_edit_config(str(cfg), ["data.train=6"])[0]
    from lifelong_moe.editing.editor import Editor as E

    editor = E.from_edit_config(other)
    assert editor.fitted["source"] == "shipped"
    plan, why = fit_plan(other, editor, [None] * 6)
    assert plan == "fit" and "meta-training" in why
