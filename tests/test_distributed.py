"""Data-parallel training (course_lib.distributed, notebook 11b; launching: course_lib.launch, notebook 11a): sharding
properties in this process, then real two-process runs on the CPU (gloo), launched with torchrun as a reader would,
each bounded by a timeout."""
import json, os, re, shutil, subprocess, sys, threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from course_lib.distributed import shard_indices
from course_lib.launch import torchrun
from course_lib.learner import Learner, Callback, accuracy
from course_lib.loader import DataLoader
import course_lib.progress  # noqa: F401  (the progress bar, as in the two-process runs)
import distributed_job as job

JOB = Path(__file__).parent/'distributed_job.py'
TIMEOUT = 240   # seconds for a whole two-process run (about 15 s here); a hang fails the test instead of CI


@pytest.mark.parametrize('n,ws', [(0, 2), (1, 3), (7, 2), (10, 3), (64, 4), (5, 8)])
def test_shards_are_equal_disjoint_and_cover_every_item(n, ws):
    for epoch in (0, 1):
        shards = [shard_indices(n, r, ws, epoch, seed=1) for r in range(ws)]
        assert len({len(s) for s in shards}) == 1, "padded shards must have equal lengths (equal batch counts)"
        flat = sum(shards, [])
        assert set(flat) == set(range(n))
        assert len(flat) - n == (-n % ws if n else 0), "only the padding may repeat items"
        exact = [shard_indices(n, r, ws, epoch, seed=1, pad=False) for r in range(ws)]
        assert sorted(sum(exact, [])) == list(range(n)), "without padding every item comes exactly once"


def test_every_process_draws_the_same_permutation_and_it_changes_each_epoch():
    e0 = [shard_indices(100, r, 2, epoch=0, seed=5) for r in range(2)]
    e1 = [shard_indices(100, r, 2, epoch=1, seed=5) for r in range(2)]
    assert e0 != e1 and set(e0[0]) != set(e1[0])
    assert e0 == [shard_indices(100, r, 2, epoch=0, seed=5) for r in range(2)]   # no hidden state
    assert shard_indices(10, 0, 1, shuffle=False) == list(range(10))


def test_shard_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match='rank must be in 0..1'): shard_indices(10, 2, 2)
    dl = DataLoader(list(range(4)), bs=2)
    with pytest.raises(ValueError, match='need 0 <= rank < world_size'): dl.shard(rank=3, world_size=2)


def test_a_sharded_loader_splits_each_global_batch_and_keeps_each_photos_random_crop():
    from course_lib.augment import Resize
    rng = np.random.default_rng(1)
    wide = [Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)) for _ in range(32)]
    def loader(bs, r, ws):   # Resize(6) random-crops a 6x6 square out of the 6x12 photo on the training split
        dl = DataLoader(wide, list(range(32)), bs=bs, shuffle=True, split='train', item_tfms=[Resize(6)],
                        device='cpu', num_workers=1)
        return dl.shard(r, ws, seed=7)
    one, halves = loader(8, 0, 1), [loader(4, r, 2) for r in range(2)]
    seen = []
    for epoch in (0, 1):
        for dl in [one, *halves]: dl.set_epoch(epoch)
        big, small = list(one), [list(h) for h in halves]
        assert len(big) == len(small[0]) == len(small[1]) == 4
        for k, (xb, yb) in enumerate(big):   # global batch k of 8 = the two processes' batches k of 4, interleaved
            assert torch.equal(yb, torch.stack([small[0][k][1], small[1][k][1]], 1).flatten())
            assert torch.equal(xb, torch.stack([small[0][k][0], small[1][k][0]], 1).flatten(0, 1))
        seen.append(torch.cat([y for _, y in big]))
    assert sorted(seen[0].tolist()) == list(range(32)) and not torch.equal(seen[0], seen[1])


def test_unshard_restores_the_loaders_own_order():
    dl = job.dls(8).valid
    before = [y.tolist() for _, y in dl]
    dl.shard(1, 2, seed=0)
    assert sum(len(y) for _, y in dl) == job.N_VALID // 2
    assert [y.tolist() for _, y in dl.unshard()] == before


CPU_ONLY = {'CUDA_VISIBLE_DEVICES': '', 'COURSE_LIB_DEVICE': 'cpu'}   # the gloo path, on a GPU machine or a Mac too


def _launch(mode, out, *torchrun_args):
    r = torchrun([*torchrun_args, JOB, mode, out], nproc=2, timeout=TIMEOUT, env=CPU_ONLY)
    return r.returncode, r.stdout


def _ranks(out):
    return [json.loads((out/f'rank{r}'/'info.json').read_text()) for r in range(2)], \
           [torch.load(out/f'rank{r}'/'params.pt', weights_only=True) for r in range(2)]


class SetEpoch(Callback):
    "What DistributedCallback does for the loader, for the one-process reference."
    def before_fit(self): self.k = 0
    def before_train(self): self.learn.dls.train.set_epoch(self.k); self.k += 1


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    "finished(mode): (folder, output, each rank's info, each rank's parameters) of that job, launched once per module."
    done = {}
    def get(mode):
        if mode not in done:
            out = tmp_path_factory.mktemp(f'ddp_{mode}')
            code, log = _launch(mode, out)
            assert code == 0, log[-3000:]
            done[mode] = (out, log, *_ranks(out))
        return done[mode]
    return get


def test_two_processes_end_with_identical_parameters_and_equal_one_process_with_the_global_batch(finished):
    out, log, infos, params = finished('plain')
    assert [i['rank'] for i in infos] == [0, 1] and all(i['world_size'] == 2 for i in infos)
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    assert infos[0]['values'] == infos[1]['values'], "every rank must record rank 0's figures"
    assert infos[0]['n_batches'] == job.N_TRAIN // 2 // 8
    assert all(i['model_is_bare'] and not i['sharded'] and i['group_closed'] for i in infos)
    assert (out/'order.txt').read_text() == '0\n1\n', "rank0_first: rank 0 runs first, the others after it"
    ref = Learner(job.dls(16), job.linear_model(), lr=0.05, metrics=accuracy)
    ref.dls.train.shard(0, 1, seed=job.SEED)
    ref.fit(2, cbs=[SetEpoch()])
    for k, v in ref.model.state_dict().items(): torch.testing.assert_close(params[0][k], v, rtol=1e-5, atol=1e-6)
    for got, want in zip(infos[0]['values'], ref.recorder.values):   # train loss, valid loss, accuracy
        np.testing.assert_allclose(got[1:4], want[1:4], rtol=1e-5)
    assert 'distrib_ctx: 2 processes (gloo, cpu); bs 8 per process = 16 per step' in log


def test_on_the_sample_both_ranks_end_with_the_same_weights_and_batchnorm_statistics(finished):
    from course_lib.external import data_home
    if not (data_home()/'oxford-iiit-pet-sample'/'images').is_dir(): pytest.skip("needs the 296-photo sample")
    out, log, infos, params = finished('sample')
    assert infos[0]['n_train'] == infos[1]['n_train'] == 237 and infos[0]['values'] == infos[1]['values']
    stats = [k for k in params[0] if 'running_' in k]
    assert stats, "the model must have BatchNorm statistics"
    for k in params[0]:   # the statistics too: each rank's last training batch moved its own, rank 0's are kept
        assert torch.equal(params[0][k], params[1][k]), k
    # the validation the ranks shared was of that same model: rank 0's model alone on all 59 photos gives its loss
    np.testing.assert_allclose(infos[0]['values'][-1][2], infos[0]['valid_loss_alone'], rtol=1e-5)


def test_only_rank_0_shows_the_epoch_table(finished):
    log = finished('plain')[1]
    assert log.count('epoch       train_loss') == 1 and log.count('distrib_ctx:') == 1


def test_lr_find_and_the_trackers_agree_on_every_rank_and_only_rank_0_writes(finished):
    out, log, infos, params = finished('callbacks')
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0]), "BatchNorm buffers included"
    assert infos[0]['sugg'] == infos[1]['sugg'] and infos[0]['n_finder'] == infos[1]['n_finder'] == 12
    assert infos[0]['lr_find_restored'], "rank 0's model must be as it was before lr_find"
    # rank 0's rows say valid_loss rose after epoch 0, so with patience 2 it stops after epoch 2; rank 1's own rows
    # said every epoch improved (it would have trained on and saved every epoch), yet it took rank 0's and stopped too
    assert infos[0]['stopped_epoch'] == infos[1]['stopped_epoch'] == 2
    assert infos[0]['best_epoch'] == infos[1]['best_epoch'] == 0
    assert len(infos[0]['values']) == 3 and infos[0]['values'] == infos[1]['values']
    assert [r[2] for r in infos[1]['own_rows']] == [0., -1., -2.], "rank 1 saw its own falling valid_loss"
    assert [r[2] for r in infos[1]['values']] == [r[2] for r in infos[0]['own_rows']], "rank 1 took rank 0's rows"
    written = sorted(p.relative_to(out/'learn').as_posix() for p in (out/'learn').rglob('*') if p.is_file())
    assert written == ['model.pth', 'models/best.pth'], written   # no temporary files left
    assert infos[1]['written'] == [] and set(infos[0]['written']) == {'best.pth', 'model.pth'}, infos
    assert log.count('early stopping') == 1 and 'stay per process (SyncBatchNorm needs CUDA)' in log


def test_a_failing_rank_stops_the_run_with_an_error_not_a_hang(tmp_path):
    # torchrun looks at its processes every 5 s here, so it does not stop rank 0 before rank 0 sees the failure
    try: code, log = _launch('fail', tmp_path, '--monitor-interval=5')
    except subprocess.TimeoutExpired as e: pytest.fail(f"the run hung for {TIMEOUT} s: {(e.output or '')[-2000:]}")
    assert code != 0
    assert 'injected failure on rank 1, batch 1' in log
    assert 'DistributedError: rank 0 of 2: another process of this run stopped' in log, log[-3000:]


def test_the_main_job_under_torchrun_trains_on_two_processes_and_writes_one_report(tmp_path):
    import os
    from course_lib.external import data_home
    if not (data_home()/'oxford-iiit-pet-sample'/'images').is_dir(): pytest.skip("needs the 296-photo sample")
    out = tmp_path/'run'
    args = ['-m', 'course_lib', 'pets', '--out', out, '--size', '64', '--freeze-epochs', '1', '--epochs', '0',
            '--bs', '16', '--lr', '0', '--no-retrain']
    r = torchrun(args, nproc=2, timeout=TIMEOUT, env={'COURSE_LIB_DATA': str(data_home()), **CPU_ONLY})
    assert r.returncode == 0, r.stdout[-3000:]
    m = json.loads((out/'metrics.json').read_text())
    assert m['status'] == 'finished' and m['world_size'] == 2 and m['n_valid'] == 59   # the whole validation set
    assert m['base_lr'] == m['lr_min'] and len(m['epochs']) == 1                      # rank 0's finder, shared
    report = (out/'report.md').read_text()
    assert '- device: cpu; world_size 2 (torchrun, gloo): bs 8 per process, 16 per step' in report
    assert sorted(os.listdir(out)) == ['confusion.png', 'loss.png', 'lr_find.png', 'metrics.json', 'model.pth',
                                       'report.md']
    assert r.stdout.count('done in ') == 1 and r.stdout.count('photos to train on') == 1   # rank 0 alone prints
    assert 'each of the 2 processes trains on its share' in r.stdout   # the estimate is one process's


def test_nproc_relaunches_the_same_command_under_torchrun(monkeypatch, capsys):
    import course_lib.cli as cli, course_lib.launch
    seen = {}
    class FakeRun:
        def __init__(self, cmd, env): seen.update(cmd=cmd, env=env)
        def wait(self): return 0
    monkeypatch.setattr(course_lib.launch.subprocess, 'Popen', FakeRun)
    monkeypatch.setattr(course_lib.launch.torch.cuda, 'device_count', lambda: 0)   # a GPU machine too
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert cli.main(['pets', '--out', 'x', '--nproc', '2', '--size', '64']) == 0
    assert seen['cmd'][1:] == ['-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', '-m', 'course_lib',
                               'pets', '--out', 'x', '--size', '64']   # without --nproc: torchrun would take it
    assert int(seen['env']['OMP_NUM_THREADS']) >= 1
    monkeypatch.delenv('USE_LIBUV', raising=False)
    monkeypatch.setattr(course_lib.launch.sys, 'platform', 'win32')
    assert cli.main(['pets', '--out', 'x', '--nproc', '2']) == 0 and seen['env']['USE_LIBUV'] == '0'
    seen.clear()
    with pytest.raises(SystemExit, match=r'the global batch of 15 does not divide by --nproc 2'):
        cli.main(['pets', '--out', 'x', '--nproc', '2', '--bs', '15'])
    assert not seen, "nothing may start"
    monkeypatch.setattr(course_lib.launch.torch.cuda, 'device_count', lambda: 1)   # one GPU, two processes
    assert cli.main(['pets', '--out', 'x', '--nproc', '2']) == 0 and seen
    assert '--nproc 2, but this machine has 1 GPU(s): the processes train on the CPU' in capsys.readouterr().out


def test_two_processes_on_one_gpu_use_gloo_on_the_cpu(monkeypatch):
    import course_lib.distributed as d
    monkeypatch.setattr(d.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(d.torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert not d._gpu_each(), "NCCL cannot put two processes on one GPU"
    monkeypatch.setattr(d.torch.cuda, 'device_count', lambda: 2)
    assert d._gpu_each()
    monkeypatch.setattr(d.torch.cuda, 'is_available', lambda: False)
    assert not d._gpu_each()


def test_the_global_batch_must_split_evenly(monkeypatch, tmp_path):
    import course_lib.cli as cli
    monkeypatch.setattr(cli, 'world_size', lambda: 2)
    cfg = dict(cli.PRESETS['sample'], bs=15, seed=42, images=str(tmp_path))
    with pytest.raises(SystemExit, match=r'--bs 15 \(the global batch\) does not divide by 2 processes'):
        cli.pets_dataloaders(cfg)


def test_on_windows_torchrun_gets_use_libuv_0_and_a_kill_ends_the_process_tree(monkeypatch):
    import sys, course_lib.launch as d
    assert 'USE_LIBUV' not in d.torchrun_env({}) or sys.platform == 'win32'
    monkeypatch.setattr(sys, 'platform', 'win32')
    assert d.torchrun_env({'A': '1'}) == {'USE_LIBUV': '0', 'A': '1'}
    assert d.torchrun_env({'USE_LIBUV': '1'})['USE_LIBUV'] == '1', "a reader's own setting wins"
    calls = []
    monkeypatch.setattr(d.subprocess, 'run', lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    class Proc:
        pid, killed = 4242, False
        def kill(self): self.killed = True
        def communicate(self, timeout=None): return 'what was left', None
        def poll(self): return 0
    p = Proc()
    assert d._stop_run(p) == 'what was left'
    assert calls == [['taskkill', '/F', '/T', '/PID', '4242']] and not p.killed


needs_ps = pytest.mark.skipif(sys.platform == 'win32' or shutil.which('ps') is None,
                              reason="POSIX process sessions and signals, and ps (procps) to look at the processes")


@needs_ps
def test_a_run_past_its_timeout_is_stopped_with_every_worker(tmp_path):
    # torchrun starts its workers in sessions of their own: killing its process group alone would leave them running
    script = tmp_path/'sleepy.py'
    # one write per line: both workers write to the same pipe, and print's separate writes could interleave
    script.write_text("import os, sys, time\nsys.stdout.write(f'worker pid {os.getpid()}\\n')\ntime.sleep(600)\n")
    got = {}
    def call():
        try: torchrun([script], nproc=2, timeout=30)
        except subprocess.TimeoutExpired as e: got['output'] = e.output
    watchdog = threading.Thread(target=call, daemon=True)   # the hang this test guards against must not hang CI
    watchdog.start(); watchdog.join(TIMEOUT)
    assert not watchdog.is_alive(), f"torchrun() did not return within {TIMEOUT} s of being called with timeout=30"
    assert 'output' in got, "the run should have timed out"
    pids = [int(pid) for pid in re.findall(r'worker pid (\d+)', got['output'])]
    assert len(pids) == 2, got['output'][-2000:]
    assert not any(map(_running, pids)), "a worker outlived the run"


def _running(pid):
    "Is process `pid` still running? A killed process whose parent died waits as a zombie until init reaps it."
    state = subprocess.run(['ps', '-o', 'stat=', '-p', str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith('Z')


@needs_ps
@pytest.mark.skipif(shutil.which('pgrep') is None, reason="finding the children needs pgrep (procps)")
@pytest.mark.parametrize('launcher_on_sigterm', ['ignores it', 'dies'])
def test_a_stopped_launcher_leaves_no_child_in_a_session_of_its_own(tmp_path, launcher_on_sigterm):
    # 'ignores it': the launcher lives on; 'dies': its child, now init's, still holds the output pipe
    from course_lib.launch import _stop_run
    script = tmp_path/'launcher.py'
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if launcher_on_sigterm == 'ignores it' else ''
    script.write_text("import signal, subprocess, sys, time\n" + ignore +
                      "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
                      "start_new_session=True)\n"
                      "print('child pid', kid.pid, flush=True)\ntime.sleep(600)\n")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    kid = int(p.stdout.readline().split()[-1])
    try:
        out = _stop_run(p, grace=2)
        assert p.poll() is not None and not _running(kid), "the launcher and its child must both be gone"
        assert isinstance(out, str)
    finally:   # whatever happened, leave no 600 s sleeper behind
        for pid in (kid, p.pid):
            try: os.killpg(pid, 9)
            except (ProcessLookupError, PermissionError): pass
