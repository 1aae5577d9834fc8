"""Training engine: an interrupted run resumed with --resume ends exactly like an uninterrupted one;
checkpoints are atomic and bad ones give one-line errors."""
import random

import pytest
import torch

import utils.engine as engine
from models import get_model
from utils.checkpoint import (CheckpointError, load_checkpoint, load_pruned_model, load_state_into,
                              save_pruned_model)
from utils.data import build_loaders


def _run(tmp_path, epochs, interrupt_after=None):
    engine.seed_everything(0)
    loaders = build_loaders("digits", batch_size=64, seed=0)
    model = get_model("resnet8", 10)
    cfg = engine.TrainConfig(epochs=epochs, lr=0.05, milestones=[1])
    ckpt = tmp_path / "run.train.pth"
    if interrupt_after is not None:
        calls = {"n": 0}
        real = engine.evaluate_metrics

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] > interrupt_after:
                raise KeyboardInterrupt
            return real(*a, **k)
        engine.evaluate_metrics = flaky
        try:
            with pytest.raises(KeyboardInterrupt):
                engine.train(model, loaders, cfg, "cpu", ckpt, progress=False)
        finally:
            engine.evaluate_metrics = real
        engine.seed_everything(123)  # a fresh process would not share the RNG state
        loaders = build_loaders("digits", batch_size=64, seed=0)
        model = get_model("resnet8", 10)
        result = engine.train(model, loaders, cfg, "cpu", ckpt, resume=True, progress=False)
    else:
        result = engine.train(model, loaders, cfg, "cpu", ckpt, progress=False)
    return model, result


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    _run(d, 1)
    return d / "run.train.pth"


def test_resume_equals_uninterrupted(tmp_path):
    m1, r1 = _run(tmp_path / "a", 2)
    # evaluate_metrics() runs once on the starting point, then once per epoch: stop during epoch 2's
    m2, r2 = _run(tmp_path / "b", 2, interrupt_after=2)
    assert r2.epochs_run == 1
    assert [h["val_acc"] for h in r1.history] == [h["val_acc"] for h in r2.history]
    assert r1.history[-1]["train_loss"] == r2.history[-1]["train_loss"]
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_restores_the_cuda_rng_states_of_the_gpus_it_sees(monkeypatch):
    """A checkpoint saved with two GPUs visible, resumed where one is: the one state that fits
    is restored, no IndexError (torch.cuda is faked: no GPU needed)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((s, i)))
    state = {"torch": torch.get_rng_state(), "numpy": engine._numpy_state(),
             "python": random.getstate(), "cuda": ["gpu0", "gpu1"]}
    engine._set_rng_state(state, loader=None)
    assert restored == [("gpu0", 0)]


def test_truncated_checkpoint_is_one_line_error(tmp_path, one_epoch):
    path = tmp_path / "run.train.pth"
    data = one_epoch.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_wrong_architecture_is_one_line_error(one_epoch):
    ckpt = load_checkpoint(one_epoch)
    with pytest.raises(CheckpointError) as err:
        load_state_into(get_model("vgg11", 10), ckpt["state_dict"], "x.pth", "vgg11")
    assert "\n" not in str(err.value) and "vgg11" in str(err.value)


def test_pruned_model_round_trip(tmp_path):
    model = get_model("resnet8", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    save_pruned_model(model, tmp_path / "p.pth", note="x")
    again, meta = load_pruned_model(tmp_path / "p.pth", with_meta=True)
    assert meta["note"] == "x"
    torch.testing.assert_close(again(x), model(x))
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


# ----------------------------------------------------------------------------- recipe options

from types import SimpleNamespace  # noqa: E402

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


def _tiny(batches=1, batch=8, classes=3, val=False):
    torch.manual_seed(0)
    x = torch.randn(batches * batch, 5)
    y = torch.arange(batches * batch) % classes
    train = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    v = DataLoader(TensorDataset(x, y), batch_size=batch) if val else None
    return SimpleNamespace(train=train, val=v, num_classes=classes), x, y


def _lrs(cfg, n):
    opt = engine.build_optimizer([nn.Parameter(torch.zeros(1))], cfg)
    sched = engine.build_scheduler(opt, cfg)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_linear_warmup_matches_hand_computed():
    import math
    cfg = engine.TrainConfig(epochs=5, lr=1.0, lr_scheduler="cosineannealinglr", lr_warmup_epochs=2,
                             lr_warmup_decay=0.01)
    # warm-up: 0.01 -> 1 linearly over 2 epochs; then cosine over the remaining 3
    want = [0.01, 0.01 + 0.99 / 2] + [0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    assert _lrs(cfg, 5) == pytest.approx(want, abs=1e-12)


def test_step_and_multistep_count_from_the_end_of_warmup():
    cfg = engine.TrainConfig(epochs=6, lr=1.0, lr_scheduler="steplr", lr_step_size=2, gamma=0.5,
                             lr_warmup_epochs=1, lr_warmup_method="constant", lr_warmup_decay=0.1)
    assert _lrs(cfg, 6) == pytest.approx([0.1, 1, 1, 0.5, 0.5, 0.25])
    cfg = engine.TrainConfig(epochs=4, lr=1.0, milestones=[1, 3])  # today's default schedule
    assert _lrs(cfg, 4) == pytest.approx([1, 0.1, 0.1, 0.01])


def test_adamw_and_bad_options():
    cfg = engine.TrainConfig(epochs=1, lr=0.1, optimizer="adamw", weight_decay=0.05)
    opt = engine.build_optimizer([nn.Parameter(torch.zeros(1))], cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.05
    for bad in (dict(amp=True), dict(optimizer="lamb"), dict(lr_scheduler="poly"),
                dict(lr_warmup_epochs=3), dict(select="best_val")):
        with pytest.raises(engine.TrainConfigError) as err:
            engine.TrainConfig(epochs=3, lr=0.1, **bad).check(torch.device("cpu"), has_val=False)
        assert "\n" not in str(err.value)


def test_label_smoothing_loss_is_the_smoothed_cross_entropy(tmp_path):
    loaders, x, y = _tiny()
    model = nn.Linear(5, 3)
    with torch.no_grad():
        logp = F.log_softmax(model(x), 1)
    eps = 0.2
    want = ((1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) - eps * logp.mean(1)).mean().item()
    cfg = engine.TrainConfig(epochs=1, lr=0.1, label_smoothing=eps)
    result = engine.train(model, loaders, cfg, "cpu", tmp_path / "c.pth", progress=False)
    assert result.history[0]["train_loss"] == pytest.approx(want, rel=1e-6)


def test_clip_grad_norm_bounds_the_step(tmp_path):
    loaders, _, _ = _tiny()
    model = nn.Linear(5, 3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = engine.TrainConfig(epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad_norm=1e-3)
    engine.train(model, loaders, cfg, "cpu", tmp_path / "c.pth", progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-4)  # plain SGD: lr * c


def test_mixup_cutmix_give_soft_targets():
    cfg = engine.TrainConfig(epochs=1, lr=0.1, mixup_alpha=0.2, cutmix_alpha=1.0)
    mixer = engine.build_batch_mixer(cfg, 4)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    for _ in range(4):  # either transform, chosen at random
        xm, ym = mixer(x, y)
        assert xm.shape == x.shape and ym.shape == (6, 4)
        torch.testing.assert_close(ym.sum(1), torch.ones(6))
    assert engine.build_batch_mixer(engine.TrainConfig(epochs=1, lr=0.1), 4) is None


def test_ema_follows_torchvision_decay(tmp_path):
    cfg = engine.TrainConfig(epochs=1, lr=0.1, model_ema=True, model_ema_steps=1,
                             model_ema_decay=0.75)
    model = nn.Linear(2, 1)
    ema = engine.build_ema(model, cfg, global_batch=1)  # adjust = 1: per-update decay 0.75
    w0 = model.weight.detach().clone()
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, 0.75 * w0 + 0.25 * (w0 + 1.0))
    # through train(): the checkpoint carries the EMA, which differs from the trained weights
    loaders, _, _ = _tiny(batches=3)
    model = nn.Linear(5, 3)
    cfg = engine.TrainConfig(epochs=1, lr=0.5, model_ema=True, model_ema_steps=1,
                             model_ema_decay=0.9)
    result = engine.train(model, loaders, cfg, "cpu", tmp_path / "c.pth", progress=False)
    assert result.ema is not None
    assert not torch.equal(result.ema.module.weight, model.weight)
    assert "ema" in load_checkpoint(tmp_path / "c.pth")


def test_without_validation_split_the_last_epoch_is_kept(tmp_path):
    loaders, _, _ = _tiny(batches=2)
    model = nn.Linear(5, 3)
    cfg = engine.TrainConfig(epochs=2, lr=0.1)
    result = engine.train(model, loaders, cfg, "cpu", tmp_path / "c.pth", progress=False)
    assert result.best_val_acc is None and result.best_epoch == 2
    torch.testing.assert_close(model.state_dict()["weight"],
                               load_checkpoint(tmp_path / "c.pth")["state_dict"]["weight"])


def test_evaluate_metrics_top5_and_count():
    model = nn.Linear(5, 7)
    x, y = torch.randn(10, 5), torch.arange(10) % 7
    m = engine.evaluate_metrics(model, DataLoader(TensorDataset(x, y), batch_size=3), "cpu")
    out = model(x)
    assert m["count"] == 10
    assert m["top1"] == pytest.approx(100.0 * (out.argmax(1) == y).float().mean().item())
    assert m["top5"] == pytest.approx(
        100.0 * (out.topk(5, 1).indices == y[:, None]).any(1).float().mean().item())
    assert m["loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)


def _poisoned_loaders(bad_batch: int):
    """Digits loaders whose training batch `bad_batch` (of every epoch) has a NaN pixel."""
    from types import SimpleNamespace
    loaders = build_loaders("digits", batch_size=64, seed=0)
    clean = list(loaders.train)

    class Poisoned:
        def __iter__(self):
            for k, (x, y) in enumerate(clean):
                if k == bad_batch:
                    x = x.clone()
                    x[0, 0, 0, 0] = float("nan")
                yield x, y

        def __len__(self):
            return len(clean)
    return SimpleNamespace(train=Poisoned(), val=loaders.val, test=loaders.test)


def test_nan_loss_stops_before_any_weight_changes(tmp_path):
    from utils.log import RunFailure
    torch.manual_seed(0)
    model = get_model("resnet8", 10)
    before = {k: v.clone() for k, v in model.named_parameters()}
    cfg = engine.TrainConfig(epochs=1, lr=0.05, milestones=[1])
    with pytest.raises(RunFailure, match=r"epoch 1, step 1 .*--nan_policy skip_batch"):
        engine.train(model, _poisoned_loaders(0), cfg, "cpu", tmp_path / "c.pth", progress=False)
    for k, v in model.named_parameters():  # the NaN loss never reached the optimiser
        assert torch.equal(v, before[k]), k
    assert not (tmp_path / "c.pth").exists()


def test_nan_policy_skip_batch_skips_and_counts(tmp_path):
    torch.manual_seed(0)
    model = get_model("resnet8", 10)
    cfg = engine.TrainConfig(epochs=2, lr=0.05, milestones=[1], nan_policy="skip_batch")
    result = engine.train(model, _poisoned_loaders(2), cfg, "cpu", tmp_path / "c.pth",
                          progress=False)
    assert [h["skipped_batches"] for h in result.history] == [1, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers())  # BatchNorm statistics too
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)


def test_unknown_nan_policy_is_rejected(tmp_path):
    cfg = engine.TrainConfig(epochs=1, lr=0.05, milestones=[1], nan_policy="ignore")
    with pytest.raises(ValueError, match="nan_policy"):
        engine.train(get_model("resnet8", 10), build_loaders("digits", batch_size=64), cfg, "cpu",
                     tmp_path / "c.pth", progress=False)
