"""DDAS, the task selector of MoE-Adapters (lifelong_moe/moe/ddas.py), as a module: per-task
autoencoders on hand-made feature clusters, thresholds, the stacked forward, pixel features."""
import copy

import pytest
import torch

from lifelong_moe.moe.ddas import DDAS, OOD, AutoEncoder, fit_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(seed=0, dim=24, n=64):
    g = torch.Generator().manual_seed(seed)
    centres = {name: torch.randn(dim, generator=g) * 3 for name in ("a", "b", "ref", "far")}
    return {k: torch.sigmoid(c + 0.3 * torch.randn(n, dim, generator=g)) for k, c in centres.items()}


def batches(x, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(x), generator=g).split(bs):
            yield x[idx]


@pytest.fixture(scope="module")
def ddas():
    torch.manual_seed(0)
    data = clusters()
    d = DDAS(24, hidden=8, num_tasks=3)
    for slot, key in ((0, "a"), (1, "b"), (None, "ref")):
        ae = d.new_autoencoder()
        fit_autoencoder(ae, batches(data[key]), iterations=300, lr=0.01, steps_per_epoch=4)
        d.set_reference(ae) if slot is None else d.set_task_ae(slot, ae)
    return d, clusters(seed=0, n=96)  # same centres, fresh samples for the checks


def test_ddas_selects_cluster_and_reference_routes_to_ood(ddas):
    d, data = ddas
    assert (d.decide(data["a"][64:], [0, 1], None) == 0).all()
    assert (d.decide(data["b"][64:], [0, 1], None) == 1).all()
    assert (d.decide(data["ref"][64:], [0, 1], None) == OOD).all()


def test_ddas_threshold_fallback(ddas):
    d, data = ddas
    err_a = d.errors(data["a"][64:], [0])[0][:, 1]
    assert (d.decide(data["a"][64:], [0, 1], float(err_a.max()) * 1.01) == 0).all()
    assert (d.decide(data["a"][64:], [0, 1], float(err_a.min()) * 0.99) == OOD).all()
    far = d.decide(data["far"], [0, 1], float(err_a.max()) * 1.01)
    assert (far == OOD).all()


def test_ddas_batch_vs_sample_decision(ddas):
    d, data = ddas
    mixed = torch.cat([data["a"][64:70], data["b"][64:66]])
    assert d.decide(mixed, [0, 1], None, "sample").tolist() == [0] * 6 + [1] * 2
    assert d.decide(mixed, [0, 1], None, "batch").tolist() == [0] * 8  # one choice from the mean errors


def test_ddas_future_task_autoencoders_do_not_take_part(ddas):
    d, data = ddas
    dec = d.decide(data["b"][64:], [0], None)  # AE 1 exists but task 1 is not trained
    assert not (dec == 1).any()
    assert (d.decide(data["a"][64:], [], None) == OOD).all()  # only the reference AE is left
    assert (DDAS(24).decide(data["a"][64:], [0], None) == OOD).all()  # no AE at all


def test_per_task_thresholds_judge_the_winning_task_by_its_own_tau(ddas):
    d, data = ddas
    err_a = d.errors(data["a"][64:], [0])[0][:, 1]
    err_b = d.errors(data["b"][64:], [1])[0][:, 1]
    tight_a = {0: float(err_a.min()) * 0.99, 1: float(err_b.max()) * 1.01}
    assert (d.decide(data["a"][64:], [0, 1], tight_a) == OOD).all()  # a's own tau rejects a
    assert (d.decide(data["b"][64:], [0, 1], tight_a) == 1).all()  # b's tau accepts b
    assert (d.decide(data["a"][64:], [0, 1], {1: 0.0}) == 0).all()  # no tau for task 0: never falls back
    d.calibration = torch.tensor([0.02, float("nan"), 0.9])
    assert d.task_thresholds([0, 1]) == {0: pytest.approx(0.02)}


def test_stacked_autoencoders_give_the_loop_errors_and_decisions(ddas):
    """One stacked forward for all autoencoders = the per-autoencoder loop (float tolerance, same
    decisions); the stack follows new, refitted and reloaded autoencoders."""
    d, data = ddas
    st = copy.deepcopy(d)
    st.stacked = True
    x = torch.cat([data[k][64:] for k in ("a", "b", "ref", "far")])
    for active in ([0, 1], [1], []):
        (e_loop, l_loop), (e_st, l_st) = d.errors(x, active), st.errors(x, active)
        assert l_loop == l_st
        torch.testing.assert_close(e_st, e_loop, rtol=1e-5, atol=1e-7)
        assert torch.equal(st.decide(x, active, None), d.decide(x, active, None))
        assert torch.equal(st.decide(x, active, {0: 0.05, 1: 0.05}), d.decide(x, active, {0: 0.05, 1: 0.05}))
    chunked = st._stacked_errors(x, [st.reference, st.task_aes["0"]], max_floats=3 * 2 * 24)
    torch.testing.assert_close(chunked, d.errors(x, [0])[0], rtol=1e-5, atol=1e-7)
    st.errors(x, [0, 1])  # stack built for these three
    fit_autoencoder(st.task_aes["1"], batches(data["a"]), iterations=5)  # refit in place: new version
    loop = copy.deepcopy(st)
    loop.stacked = False
    torch.testing.assert_close(st.errors(x, [0, 1])[0], loop.errors(x, [0, 1])[0], rtol=1e-5, atol=1e-7)
    st.set_task_ae(0, st.new_autoencoder())  # a new autoencoder object in a slot
    assert not torch.allclose(st.errors(x, [0, 1])[0], loop.errors(x, [0, 1])[0])
    st.load_state_dict(loop.state_dict())  # and loaded values (copied in place)
    torch.testing.assert_close(st.errors(x, [0, 1])[0], loop.errors(x, [0, 1])[0], rtol=1e-5, atol=1e-7)


def test_calibrated_threshold_is_max_of_task_quantiles():
    d = DDAS(4, num_tasks=3)
    assert d.calibrated_threshold([0, 1]) is None
    d.calibration[0], d.calibration[1], d.calibration[2] = 0.02, 0.05, 0.9
    assert d.calibrated_threshold([0, 1]) == pytest.approx(0.05)
    ae = AutoEncoder(4, 2)
    assert ae.errors(torch.rand(5, 4)).shape == (5,)


def test_pixel_features_keep_style_and_are_deterministic():
    from lifelong_moe.moe.ddas import PixelFeatures

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 32, 32, generator=g) * 0.1 + torch.linspace(0, 1, 32).view(1, 1, 1, 32)
    noisy = clean + 0.3 * torch.randn(4, 3, 32, 32, generator=g)
    f = PixelFeatures()
    a, b = f(clean), f(noisy)
    assert a.shape == (4, 3 * 64 + 3 * 16 + 3) and ((a > 0) & (a < 1)).all()
    assert torch.equal(a, f(clean))
    energy = slice(3 * 64, 3 * 64 + 3 * 16)  # the high-frequency map sees the noise
    assert (b[:, energy].mean(1) > a[:, energy].mean(1) + 0.05).all()
