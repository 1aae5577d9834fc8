"""Training engine: an interrupted run resumed with --resume ends exactly like an uninterrupted one;
checkpoints are atomic and bad ones give one-line errors."""
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
