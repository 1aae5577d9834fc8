"""Interruptions and resource failures: SIGTERM / SIGINT in every phase of a run (dense training,
between pruning steps, fine-tuning) and SIGKILL at random moments leave only complete files, and
`--resume` ends with the results of an uninterrupted run; a full disk keeps the previous file;
running out of GPU memory while estimating importance is one line naming the batch size."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from utils import cli
from utils.checkpoint import load_checkpoint, load_pruned_model, save_atomic, write_json
from utils.log import PAUSE_ENV, RunFailure

REPO = Path(__file__).resolve().parent.parent
# Two dense epochs, two pruning steps, two fine-tuning epochs: every phase takes a few seconds.
RUN = ["--num_epochs", "2", "--sl_num_epochs", "2", "--batch_size", "128", "--iterative_steps", "2",
       "--iters_per_step", "1", "--bn_recalibration_batches", "2", "--no-progress",
       "--no-tensorboard", "--model", "resnet8", "--device", "cpu", "--importance_type", "Taylor",
       "--ops_ratios", "0.7"]
TIMING = ("seconds_importance", "seconds_pruning", "seconds_finetune")


def default_sigint():
    """A shell starts background jobs with SIGINT ignored and children inherit that; the test
    sends SIGINT as Ctrl-C would, so give the run the default disposition whatever ran pytest."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(tmp, *extra, pause=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    log = open(tmp / f"log{time.monotonic_ns()}.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(REPO / "train_prune.py"), *RUN,
                             "--output_dir", str(tmp / "out"), "--save_path_prefix",
                             str(tmp / "ckpt"), *extra], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, preexec_fn=default_sigint)
    proc.log = log
    return proc


def output(proc) -> str:
    proc.log.flush()
    return Path(proc.log.name).read_text()


def wait_for(proc, ready, limit=240.0):
    """Poll until `ready()`; fail if the run ends first."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"run ended before the moment to interrupt:\n{output(proc)}"
        assert time.monotonic() - t0 < limit, output(proc)
        time.sleep(0.05)


def finish(proc, limit=300):
    proc.wait(timeout=limit)
    return proc.returncode, output(proc)


def results(folder: Path) -> dict:
    rec = json.loads((folder / "out" / "ops_0.7" / "results.json").read_text())
    for key in TIMING:
        rec.pop(key)
    for key in ("resume", "output_dir", "save_path_prefix"):  # the same run, or another folder
        rec["settings"].pop(key)
    return rec


def check_files(folder: Path, temps_allowed: bool) -> None:
    """Every checkpoint and record on disk loads; temp files only where a kill left them."""
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix == ".txt":
            continue
        if path.name.endswith(".tmp"):
            assert temps_allowed, f"temp file left behind: {path}"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.name.startswith("pruned_"):
            load_pruned_model(path)
        elif path.suffix == ".pth":
            load_checkpoint(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    code, log = finish(start(tmp))
    assert code == 0, log
    return tmp, results(tmp), load_pruned_model(tmp / "out" / "ops_0.7" / "pruned_model.pth")


def assert_same_as_reference(tmp, reference):
    _, expected, expected_model = reference
    assert results(tmp) == expected  # metrics, MACs, parameter counts, settings
    model = load_pruned_model(tmp / "out" / "ops_0.7" / "pruned_model.pth")
    got, want = model.state_dict(), expected_model.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


def test_signals_in_every_phase_then_resume_matches(reference, tmp_path):
    """SIGTERM in dense training, SIGINT between two pruning steps, SIGTERM in fine-tuning; each
    stops the run with one line and exit 143 / 130, leaves only complete files, and the last
    --resume ends with the uninterrupted run's results.json and pruned network."""
    dense_epoch = tmp_path / "ckpt" / "digits_resnet8.train.pth"
    proc = start(tmp_path)
    wait_for(proc, dense_epoch.exists)  # epoch 1 of 2 saved: now in epoch 2
    epoch1 = dense_epoch.read_bytes()
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc, 60)
    assert code == 143, log
    assert "terminated; run again with --resume" in log and "Traceback" not in log
    assert dense_epoch.read_bytes() == epoch1 or load_checkpoint(dense_epoch)["epoch"] == 2
    check_files(tmp_path, temps_allowed=False)

    proc = start(tmp_path, "--resume", pause="pruning step 0.7")
    wait_for(proc, lambda: "paused at pruning step" in output(proc))
    proc.send_signal(signal.SIGINT)
    code, log = finish(proc, 60)
    assert code == 130, log
    assert "interrupted; run again with --resume" in log and "Traceback" not in log
    assert not (tmp_path / "out" / "ops_0.7" / "pruned_init.pth").exists()
    check_files(tmp_path, temps_allowed=False)

    ft_epoch = tmp_path / "out" / "ops_0.7" / "finetune.train.pth"
    proc = start(tmp_path, "--resume")
    wait_for(proc, ft_epoch.exists)
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc, 60)
    assert code in (143, 0), log  # 0 only if the last epoch finished before the signal came
    check_files(tmp_path, temps_allowed=False)

    code, log = finish(start(tmp_path, "--resume"))
    assert code == 0, log
    check_files(tmp_path, temps_allowed=False)
    assert_same_as_reference(tmp_path, reference)


def test_sigkill_at_random_moments_never_corrupts(reference, tmp_path):
    """kill -9 at three seeded random moments: every file on disk loads after each kill, and
    resuming to the end gives the uninterrupted run's results; temp files of killed writes are
    removed when the same file is written again."""
    rng = random.Random(1234)

    def resume_flag():  # --resume only once a kill left something to resume (a loaded machine
        # may still be starting up at every kill; --resume with nothing is refused, by design)
        something = any((tmp_path / d).exists() and any(
            p.suffix in (".pth", ".json") for p in (tmp_path / d).rglob("*"))
            for d in ("out", "ckpt"))
        return ["--resume"] if something else []

    for _ in range(3):
        proc = start(tmp_path, *resume_flag())
        time.sleep(rng.uniform(2.0, 12.0))
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        check_files(tmp_path, temps_allowed=True)
    # a temp file as a kill during a write leaves it: cleaned when that file is written again
    stale = tmp_path / "out" / "ops_0.7" / ".results.json.killed.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    flag = resume_flag()
    stale.write_bytes(b"half a record")
    code, log = finish(start(tmp_path, *flag))
    assert code == 0, log
    check_files(tmp_path, temps_allowed=False)
    assert_same_as_reference(tmp_path, reference)


# ----------------------------------------------------------------------------- in-process

@pytest.fixture
def keep_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_mid_write_keeps_previous_file(tmp_path, keep_sigterm, capsys):
    path = tmp_path / "ckpt.pth"
    save_atomic({"format": "x", "value": torch.ones(3)}, path)
    before = path.read_bytes()

    def main(argv):
        def write(f):
            f.write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
            f.write(b"never")
        from utils.checkpoint import _atomic_write
        _atomic_write(path, write)
        return 0

    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main, [])
    assert exit_.value.code == 143
    err = capsys.readouterr().err.strip()
    assert err.endswith("terminated; run again with --resume to continue") and len(err.splitlines()) == 1
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left


def test_full_disk_keeps_previous_file(tmp_path, monkeypatch, keep_sigterm, capsys):
    path = tmp_path / "results.json"
    write_json({"run": 1}, path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RunFailure, match="no space left"):
        write_json({"run": 2}, path)
    with pytest.raises(RunFailure, match="no space left"):
        save_atomic({"big": torch.zeros(10)}, tmp_path / "model.pth")
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(lambda argv: write_json({"run": 3}, path), [])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "no space left" in err and "free space or pass another --output_dir" in err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_write_error_inside_torch_save_keeps_previous_file(tmp_path, monkeypatch):
    """torch.save reports a failed write of its file as a RuntimeError: also one line."""
    path = tmp_path / "model.pth"
    save_atomic({"v": torch.ones(2)}, path)
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RunFailure, match=r"(no space left|could not write).*model\.pth"):
        save_atomic({"v": torch.zeros(2)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pth"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 2 MB filesystem (tmpfs); needs the right to mount, else the test is skipped (the
    monkeypatched tests above cover the same code)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_really_full_disk(small_filesystem):
    path = small_filesystem / "ckpt.pth"
    save_atomic({"v": torch.ones(1000)}, path)
    before = path.read_bytes()
    for write in (lambda: save_atomic({"v": torch.ones(1_000_000)}, path),  # 4 MB
                  lambda: write_json({"x": "a" * 3_000_000}, small_filesystem / "r.json")):
        with pytest.raises(RunFailure, match="no space left on the device writing"):
            write()
    assert path.read_bytes() == before
    assert [p.name for p in small_filesystem.iterdir()] == ["ckpt.pth"]


def test_stale_temp_files_removed_on_next_write(tmp_path):
    (tmp_path / ".a.pth.x1y2.tmp").write_bytes(b"killed mid-write")
    (tmp_path / ".b.pth.x1y2.tmp").write_bytes(b"another file's")
    save_atomic({"v": torch.ones(1)}, tmp_path / "a.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.pth.x1y2.tmp", "a.pth"]


# ----------------------------------------------------------------------------- out of memory

def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(3))


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_in_a_criterion_names_the_batch_size(error, monkeypatch):
    from pruners.registry import get_method, parameter_scores
    model = _tiny()
    x, y = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    model(x)
    taylor = get_method("Taylor")
    real = taylor.estimate

    def exhausted(model, batches, loss_fn, **options):
        for _ in batches:
            raise error
        return real(model, batches, loss_fn, **options)
    monkeypatch.setattr(taylor, "estimate", exhausted)
    with pytest.raises(RunFailure) as err:
        parameter_scores("Taylor", model, [(x, y)])
    message = str(err.value)
    assert "out of memory" in message and "batches of 5 images" in message
    assert "--importance_batch_size" in message and "--batch_size" in message
    assert "\n" not in message


def test_other_runtime_errors_pass_through(monkeypatch):
    from pruners.registry import get_method, parameter_scores
    taylor = get_method("Taylor")
    monkeypatch.setattr(taylor, "estimate", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        parameter_scores("Taylor", _tiny(), [(torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))])


def test_out_of_memory_in_eigen_pruning(monkeypatch):
    """The EigenDamage path rebuilds the network itself (workflow.prune_model): same message."""
    from models import get_model
    from pruners import workflow
    from pruners.registry import get_method
    eigen = get_method("Eigen")

    def exhausted(model, batches, *a, **k):
        for _ in batches:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(eigen, "prune_to_target", exhausted)
    model = get_model("resnet8", 10)
    x = torch.zeros(1, 3, 32, 32)
    args = SimpleNamespace(importance_type="Eigen", iters_per_step=2, max_pruning_ratio=0.9,
                           fisher_type="true", damping=1e-3, depthwise=False)
    ctx = SimpleNamespace(args=args, example_inputs=x,
                          batches=lambda n: [(torch.randn(7, 3, 32, 32), torch.zeros(7).long())] * n)
    from utils.flops import count_macs
    with pytest.raises(RunFailure, match="Eigen estimated importance on batches of 7 images"):
        workflow.prune_model(ctx, model, 0.5, count_macs(model, x), {})


@pytest.mark.slow
def test_iterative_interrupted_while_pruning_second_target(tmp_path):
    """iterative_prune.py: SIGTERM between two pruning steps of the second target; --resume
    reloads the first target's fine-tuned network and prunes the second again from it."""
    def launch(folder, *extra, pause=None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop(PAUSE_ENV, None)
        if pause:
            env[PAUSE_ENV] = pause
        args = [a for a in RUN if a not in ("--ops_ratios", "0.7")]
        log = open(folder / f"log{time.monotonic_ns()}.txt", "w+")
        proc = subprocess.Popen([sys.executable, str(REPO / "iterative_prune.py"), *args,
                                 "--ops_ratios", "0.8", "0.6", "--output_dir", str(folder / "out"),
                                 "--save_path_prefix", str(folder / "ckpt"), *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        proc.log = log
        return proc

    def records(folder):
        recs = json.loads((folder / "out" / "summary.json").read_text())
        for rec in recs:
            for key in TIMING:
                rec.pop(key)
            for key in ("resume", "output_dir", "save_path_prefix"):
                rec["settings"].pop(key)
        return recs

    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    code, log = finish(launch(ref))
    assert code == 0, log
    proc = launch(run, pause="pruning step 0.6")  # target 0.8 runs through; 0.6 pauses
    wait_for(proc, lambda: "paused at pruning step" in output(proc))
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc, 60)
    assert code == 143, log
    check_files(run, temps_allowed=False)
    code, log = finish(launch(run, "--resume"))
    assert code == 0, log
    check_files(run, temps_allowed=False)
    assert records(run) == records(ref)


def test_resume_sweeps_temp_files_of_killed_writes(tmp_path):
    from utils.checkpoint import remove_stale_temps, write_json
    (tmp_path / "ops_0.5").mkdir()
    write_json({"a": 1}, tmp_path / "ops_0.5" / "results.json")
    stale = [tmp_path / "ops_0.5" / ".results.json.killed.tmp", tmp_path / ".summary.json.x1.tmp",
             tmp_path / ".pruned_model.pth.abc_12.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in keep:
        path.write_bytes(b"theirs")
    remove_stale_temps(tmp_path)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert json.loads((tmp_path / "ops_0.5" / "results.json").read_text()) == {"a": 1}
