"""Expert-usage figure: tables from hand-made results records, and the PNG for CL-MoE and
MoE-Adapters records side by side."""
import numpy as np
import pytest

from lifelong_moe.report.usage_plot import expert_usage_figure, usage_table

CL_MOE = {"extra": {"cl_moe": {"usage": {
    "vqa/color": {"0.q_proj": [3, 1, 0, 0], "0.k_proj": [1, 1, 1, 1], "1.q_proj": [0, 0, 0, 4]},
    "vqa/type": {"0.q_proj": [0, 0, 2, 2], "0.k_proj": [0, 0, 0, 0], "1.q_proj": [1, 0, 0, 0]},
}}}}
MOE_ADAPTERS = {"extra": {"moe_adapters": {"usage": {
    "a": {"image": {"0": [2, 2, 0], "1": [0, 0, 5]}, "text": {"0": [1, 0, 0]}},
    "b": {"image": {"0": [0, 4, 0], "1": [5, 0, 0]}, "text": {"0": [0, 0, 0]}},
}}}}


def test_cl_moe_usage_grouped_by_block_and_module():
    tasks, by_block = usage_table(CL_MOE, "block")
    assert tasks == ["vqa/color", "vqa/type"] and sorted(by_block) == ["layer 0", "layer 1"]
    np.testing.assert_allclose(by_block["layer 0"][0], [(0.75 + 0.25) / 2, (0.25 + 0.25) / 2, 0.125, 0.125])
    np.testing.assert_allclose(by_block["layer 0"][1], [0, 0, 0.5, 0.5])  # k_proj had no counts: left out
    np.testing.assert_allclose(by_block["layer 1"], [[0, 0, 0, 1], [1, 0, 0, 0]])
    _, by_module = usage_table(CL_MOE, "module")
    assert sorted(by_module) == ["k_proj", "q_proj"]
    np.testing.assert_allclose(by_module["q_proj"][0], [0.375, 0.125, 0, 0.5])
    assert np.isnan(by_module["k_proj"][1]).all()
    with pytest.raises(ValueError, match="group_by"):
        usage_table(CL_MOE, "tower")


def test_moe_adapters_usage_and_rows_sum_to_one():
    tasks, by_block = usage_table(MOE_ADAPTERS)
    assert sorted(by_block) == ["image 0", "image 1", "text 0"]
    np.testing.assert_allclose(by_block["image 1"], [[0, 0, 1], [1, 0, 0]])
    assert np.isnan(by_block["text 0"][1]).all()
    for a in by_block.values():
        sums = np.nansum(a, axis=1)
        assert np.all((np.abs(sums - 1) < 1e-9) | np.isnan(a).all(1))
    _, by_tower = usage_table(MOE_ADAPTERS, "module")
    assert sorted(by_tower) == ["image", "text"]


def test_figure_is_written_for_runs_with_usage_only(tmp_path):
    png = expert_usage_figure([("clmoe", CL_MOE), ("moe", MOE_ADAPTERS), ("lora", {"extra": {}})],
                              tmp_path / "usage.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert expert_usage_figure([("lora", {"extra": {}})], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
