"""The real-data configs (MTIL orders, CIFAR-100) validate, and missing data or weights give one
clear error that says what to obtain and where to put it, with nothing written."""
import pytest

from lifelong_moe.cli import main
from lifelong_moe.config import load_config

from conftest import CONFIGS

REAL = ["mtil_order1.yaml", "mtil_order2.yaml", "cifar100_cil.yaml"]
TINY = ["backbone.name=lmoe-tiny-vit", "backbone.pretrained=null"]


@pytest.mark.parametrize("name", REAL)
def test_real_configs_validate(name):
    cfgs = load_config(CONFIGS / name)
    assert {c.name.split("/")[-1] for c in cfgs} >= {"zeroshot", "finetune", "replay"}
    assert all(c.backbone.name == "ViT-B-16" and c.backbone.pretrained == "openai" for c in cfgs)


@pytest.mark.parametrize("name,expected", [("mtil_order1.yaml", "fgvc_aircraft"), ("mtil_order2.yaml", "stanford_cars"),
                                           ("cifar100_cil.yaml", "cifar100")])
def test_missing_dataset_says_where(name, expected, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(CONFIGS / name), "--only", "zeroshot", "-q", "-o", str(out),
                 f"stream.root={tmp_path / 'nodata'}", *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and str(tmp_path / "nodata") in err
    assert not out.exists() or not any(out.rglob("*.json"))


def test_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(CONFIGS / "mtil_order1.yaml"), "--only", "zeroshot", "-q", "-o", str(out),
                 f"backbone.pretrained={tmp_path / 'ViT-B-16.pt'}"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint file not found" in err and "ViT-B-16.pt" in err
    assert not out.exists() or not any(out.rglob("*.json"))
