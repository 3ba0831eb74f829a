"""Nothing lost when a write fails: `atomic_write` and what writes through it (save, export, the CLI's files).

Fault injection: errors and Ctrl-C inside the write, a fake disk that answers ENOSPC, a real tmpfs too small for the
file (where this machine lets the tests mount one), and processes killed with SIGKILL in the middle of an export."""
import errno, json, os, re, signal, stat, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch

from course_lib.external import atomic_write, DiskFullError
from course_lib.learner import Learner
from course_lib.export import create_model, load_learner, ExportFileError
from helpers import synth_dls

HERE = Path(__file__).resolve().parent


def learner(tmp_path, widths=(4,)):
    "A tiny learner that can be exported (`widths` sets the size of its model)."
    dls = synth_dls(n=8, bs=4)
    dls.inference_config = lambda: {'vocab': ['a', 'b'], 'bs': 4, 'item_tfms': [], 'batch_tfms': []}
    return Learner(dls, create_model('simple_cnn', n_out=2, n_in=1, widths=widths), path=tmp_path)


def weights(file):
    return torch.load(file, weights_only=True)['model_state']


def leftovers(folder, keep):
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in keep)


# ---------- the helper ----------

def test_replaces_the_file_and_leaves_nothing_else(tmp_path):
    f = tmp_path/'a.txt'
    with atomic_write(f, 'w') as out: out.write('one')
    with atomic_write(f, 'w', encoding='utf-8') as out:
        out.write('two ü')
        assert f.read_text() == 'one'          # the old content until the block ends
    assert f.read_text(encoding='utf-8') == 'two ü' and leftovers(tmp_path, {'a.txt'}) == []


@pytest.mark.skipif(os.name == 'nt', reason='POSIX permission bits')
def test_new_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    with atomic_write(tmp_path/'p.bin') as out: out.write(b'x')
    umask = os.umask(0); os.umask(umask)
    assert stat.S_IMODE((tmp_path/'p.bin').stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize('error', [ValueError('boom'), KeyboardInterrupt()])
def test_an_error_inside_the_block_keeps_the_previous_file(tmp_path, error):
    f = tmp_path/'model.pth'; f.write_bytes(b'previous')
    with pytest.raises(type(error)):
        with atomic_write(f) as out:
            out.write(b'half of the new')
            raise error
    assert f.read_bytes() == b'previous' and leftovers(tmp_path, {'model.pth'}) == []


@pytest.mark.skipif(os.name == 'nt', reason='on Windows the sweep is off: no safe way to ask if a pid runs')
def test_a_temporary_file_of_a_killed_writer_is_swept_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()   # a pid that no longer runs
    stale = tmp_path/f'.m.pth.{dead.pid}.abc123.tmp'; stale.write_bytes(b'partial')
    alive = tmp_path/f'.m.pth.{os.getppid()}.def456.tmp'; alive.write_bytes(b'another writer, still running')
    with atomic_write(tmp_path/'m.pth') as out: out.write(b'new')
    assert not stale.exists() and alive.exists()
    assert (tmp_path/'m.pth').read_bytes() == b'new'


class FullDisk:
    "A file-like whose writes fail as they do on a full disk, after `room` bytes."
    def __init__(self, f, room): self.f, self.room = f, room
    def write(self, b):
        if len(b) > self.room: raise OSError(errno.ENOSPC, 'No space left on device')
        self.room -= len(b); return self.f.write(b)


def test_full_disk_is_one_clear_line_and_keeps_the_previous_file(tmp_path):
    f = tmp_path/'model.pth'; f.write_bytes(b'previous')
    with pytest.raises(DiskFullError) as ei:
        with atomic_write(f, size_hint=15_000_000) as out: FullDisk(out, 10).write(b'x' * 100)
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f'{f}: the disk is full')
    assert 'it needs about 15.0 MB' in msg and re.search(r'[MG]B free there', msg)
    assert 'previous model.pth is untouched' in msg
    assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, OSError)
    assert f.read_bytes() == b'previous' and leftovers(tmp_path, {'model.pth'}) == []


# ---------- its users ----------

def torch_save_on_a_full_disk(monkeypatch, room=1000):
    import course_lib.learner as L
    real = L.torch.save
    monkeypatch.setattr(L.torch, 'save', lambda obj, f, *a, **k: real(obj, FullDisk(f, room), *a, **k))


def test_export_on_a_full_disk_keeps_the_previous_model(tmp_path, monkeypatch):
    learn = learner(tmp_path)
    before = weights(learn.export('model.pth'))
    with torch.no_grad():
        for p in learn.model.parameters(): p.add_(1)
    torch_save_on_a_full_disk(monkeypatch)
    with pytest.raises(DiskFullError, match=r'model\.pth: the disk is full \(it needs about 0\.0 MB'):
        learn.export('model.pth')
    monkeypatch.undo()
    after = load_learner(tmp_path/'model.pth').model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert leftovers(tmp_path, {'model.pth'}) == []


def test_save_and_SaveModelCallback_on_a_full_disk_keep_the_previous_weights(tmp_path, monkeypatch):
    from course_lib.callbacks import SaveModelCallback
    learn = Learner(synth_dls(n=8, bs=4), torch.nn.Linear(2, 2), path=tmp_path)
    file = learn.save('best')
    good = file.read_bytes()
    torch_save_on_a_full_disk(monkeypatch)
    with pytest.raises(DiskFullError): learn.save('best')
    learn.add_cb(SaveModelCallback(fname='best', at_end=True))
    learn.remove_cbs([c for c in learn.cbs if type(c).__name__ == 'ProgressCallback'])
    with pytest.raises(DiskFullError): learn.fit(1, lr=1e-3)
    assert file.read_bytes() == good and leftovers(file.parent, {'best.pth'}) == []


def test_a_file_truncated_anywhere_gives_the_one_line_error(tmp_path):
    "What an older course_lib, which wrote in place, could leave behind when it was interrupted."
    data = learner(tmp_path).export('full.pth').read_bytes()
    for n in sorted({0, 1, 10, 100, *range(200, len(data), max(1, len(data) // 25)), len(data) - 1}):
        (tmp_path/'model.pth').write_bytes(data[:n])
        with pytest.raises(ExportFileError) as ei: load_learner(tmp_path/'model.pth')
        assert len(str(ei.value).splitlines()) == 1 and str(ei.value).startswith(str(tmp_path/'model.pth')), n


# ---------- a real full disk ----------

@pytest.fixture
def small_tmpfs(tmp_path):
    "A 2 MB tmpfs mounted on a fresh folder (Linux, as root); skipped with the reason where that is not allowed."
    mnt = tmp_path/'tmpfs'; mnt.mkdir()
    if sys.platform != 'linux': pytest.skip('mounting a tmpfs needs Linux')
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mnt)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f'cannot mount a tmpfs here: {(r.stderr or r.stdout).strip() or r.returncode}')
    try: yield mnt
    finally: subprocess.run(['umount', str(mnt)], check=False)


def test_export_onto_a_real_full_disk(small_tmpfs):
    small = learner(small_tmpfs)
    before = weights(small.export('model.pth'))
    big = learner(small_tmpfs, widths=(4, 256, 256))          # about 2.4 MB of weights, more than the disk holds
    with pytest.raises(DiskFullError) as ei: big.export('model.pth')
    msg = str(ei.value)
    m = re.search(r'the disk is full \(it needs about ([\d.]+) MB; ([\d.]+) MB free there\); '
                  r'the previous model\.pth is untouched', msg)
    assert len(msg.splitlines()) == 1 and m and float(m[1]) > float(m[2]), msg
    after = weights(small_tmpfs/'model.pth')
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert leftovers(small_tmpfs, {'model.pth'}) == []


# ---------- killed in the middle of the write ----------

KILL_TRIALS = textwrap.dedent('''
    import io, json, os, signal, sys
    import torch
    sys.path.insert(0, {here!r})
    from test_atomic import learner, weights
    import course_lib.external as D
    from course_lib.export import load_learner
    from pathlib import Path
    folder = Path({folder!r})
    learner(folder).export('model.pth')
    good = weights(folder/'model.pth')
    big = learner(folder, widths=(4, 64, 64))

    class CountingWriter(io.FileIO):
        "Counts write calls; with `kill_at`, sends itself SIGKILL just after that write reached the file."
        kill_at, writes = None, 0
        def write(self, b):
            n = super().write(b); CountingWriter.writes += 1
            if CountingWriter.writes == CountingWriter.kill_at: os.kill(os.getpid(), signal.SIGKILL)
            return n
    D.open = lambda path, mode, encoding=None: io.BufferedWriter(CountingWriter(path, 'w'), buffer_size=1)
    big.export('probe.pth'); n_writes = CountingWriter.writes; (folder/'probe.pth').unlink()
    res = []
    for k in sorted({{1, 2, 3, *range(5, n_writes, max(1, n_writes // 20)), n_writes - 1, n_writes}}):
        pid = os.fork()
        if pid == 0:
            CountingWriter.writes, CountingWriter.kill_at = 0, k
            big.export('model.pth'); os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        after = weights(folder/'model.pth')
        loadable = (all(torch.equal(after[n], v) for n, v in good.items())
                    and load_learner(folder/'model.pth') is not None)
        names = sorted(p.name for p in folder.iterdir())
        res.append(dict(kill_at=k, killed=killed, previous_loads=loadable, files=names))
    D.open = open                                  # a last export that is not killed sweeps the dead writers' files
    big.export('model.pth')
    final = dict(files=sorted(p.name for p in folder.iterdir()), loads=load_learner(folder/'model.pth') is not None)
    print(json.dumps(dict(writes=n_writes, trials=res, final=final)))
''')


@pytest.mark.skipif(sys.platform != 'linux', reason="the kill trials fork writers from a process that imported torch, "
                    "safe only on Linux (macOS's fork is unsafe with threads; Windows has no fork)")
def test_sigkill_in_the_middle_of_an_export_keeps_the_previous_model(tmp_path):
    code = KILL_TRIALS.format(here=str(HERE), folder=str(tmp_path))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{len(out['trials'])} kills during an export of {out['writes']} writes:",
          [(t['kill_at'], t['previous_loads']) for t in out['trials']])
    assert out['writes'] >= 4
    for t in out['trials']:
        assert t['killed'] and t['previous_loads'], t
        partial = [n for n in t['files'] if n != 'model.pth']
        assert all(n.startswith('.model.pth.') and n.endswith('.tmp') for n in partial), t   # never the final name
        assert len(partial) <= 1, t        # each export removed the temporary file of the writer killed before it
    assert out['final'] == {'files': ['model.pth'], 'loads': True}
