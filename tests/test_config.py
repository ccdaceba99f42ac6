"""Config loading: extends, overrides, variants, and one clear error per bad input."""
import subprocess
import sys

import pytest

from lifelong_moe.config import apply_overrides, load_config
from lifelong_moe.errors import ConfigError

from conftest import CONFIGS, write

BASE = """
stream: {kind: class_incremental, dataset: digits, num_experiences: 5}
strategy: {name: finetune}
"""


def test_shipped_configs_validate():
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.name.startswith("edit_"):  # knowledge-editing configs: tests/test_edit_runner.py validates them
            continue
        assert load_config(path), path


def test_extends_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", BASE + "training: {epochs: 4, optimizer: {lr: 0.5}}\n")
    write(tmp_path / "child.yaml", "extends: base.yaml\ntraining: {optimizer: {lr: 0.25}}\n")
    [cfg] = load_config(tmp_path / "child.yaml", ["training.batch_size=7", "strategy.name=lwf", "strategy.alpha=3"])
    assert cfg.training.epochs == 4  # inherited
    assert cfg.training.optimizer.lr == 0.25  # child wins
    assert cfg.training.batch_size == 7  # override wins
    assert cfg.strategy.name == "lwf" and cfg.strategy_params().alpha == 3.0
    assert cfg.name == "child"


def test_variants_expand_and_overrides_apply_to_each(tmp_path):
    write(tmp_path / "v.yaml", BASE + "variants:\n  - {name: a}\n  - {name: b, strategy: {name: lora, r: 2}}\n")
    a, b = load_config(tmp_path / "v.yaml", ["training.epochs=9"])
    assert (a.name, b.name) == ("v/a", "v/b")
    assert a.strategy.name == "finetune" and b.strategy_params().r == 2
    assert a.training.epochs == b.training.epochs == 9


@pytest.mark.parametrize("text, overrides, expected", [
    (BASE + "trainng: {epochs: 2}\n", [], "unknown key 'trainng' (did you mean 'training'?)"),
    (BASE + "training: {optimizer: {lr_rate: 1}}\n", [], "training.optimizer: unknown key 'lr_rate' (did you mean 'lr'?)"),
    (BASE, ["training.batch_size=abc"], "training.batch_size: Input should be a valid integer"),
    (BASE, ["strategy.alpah=1", "strategy.name=lwf"], "strategy: unknown key 'alpah' (did you mean 'alpha'?)"),
    (BASE, ["strategy.name=finetun"], "unknown strategy 'finetun' (did you mean 'finetune'?)"),
    ("strategy: {name: finetune}\n", [], "stream: required key is missing"),
    (BASE, ["stream.num_experiences=0"], "stream.num_experiences: Input should be greater than 0"),
    ("stream: [1, 2\n", [], "malformed YAML"),
    ("- 1\n- 2\n", [], "the top level must be a mapping"),
    (BASE, ["training"], "is not of the form key.path=value"),
    (BASE + "extends: missing.yaml\n", [], "config file not found"),
])
def test_bad_config_gives_one_clear_error(tmp_path, text, overrides, expected):
    p = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    assert expected in str(e.value)


def test_apply_overrides_parses_yaml_values():
    d = apply_overrides({"a": {"b": 1}}, ["a.b=2.5e-3", "a.c=[1, 2]", "x.y=true", "n=null"])
    assert d == {"a": {"b": 2.5e-3, "c": [1, 2]}, "x": {"y": True}, "n": None}


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path):
    p = write(tmp_path / "bad.yaml", BASE + "training: {epochs: -1}\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lifelong_moe", "run", str(p), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "training.epochs" in r.stderr and "greater than 0" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_missing_config_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lifelong_moe", "run", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "config file not found" in r.stderr
