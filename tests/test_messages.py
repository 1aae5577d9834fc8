"""Fallbacks are said once, not silently taken and not repeated for every layer or epoch."""
import sys

import torch

from pruners.kfac import spd_inverse
from utils import engine, log


def test_cholesky_failure_is_said_once(capsys, monkeypatch):
    monkeypatch.setattr(log, "_said", set())
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    for _ in range(3):
        inv = spd_inverse(indefinite)
    torch.testing.assert_close(inv, torch.linalg.pinv(indefinite))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Cholesky" in err[0] and "--damping" in err[0]


def test_missing_tensorboard_is_said_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(log, "_said", set())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert engine._open_writer(tmp_path / "tb") is None
    assert engine._open_writer(tmp_path / "tb") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard" in err[0] and "--no-tensorboard" in err[0]
    assert not (tmp_path / "tb").exists()
