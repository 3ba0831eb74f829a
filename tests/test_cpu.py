"""`tune_malloc` (course_lib.cpu): the glibc thresholds it sets, where it declines, and that nothing calls it \
for you."""
import os, shutil, subprocess, sys
import pytest
import torch
from torch import nn
from course_lib.learner import Learner
from course_lib.loader import DataLoaders


class FakeLibc:
    "Stands in for glibc: records mallopt calls and answers `ok` (glibc returns 1 on success, 0 on failure)."
    def __init__(self, ok=1): self.calls, self.ok = [], ok
    def mallopt(self, param, value): self.calls.append((param, value)); return self.ok


@pytest.fixture
def fresh_allocator(monkeypatch):
    "tune_malloc remembers its answer per process: forget it for the test, restore it afterwards."
    import course_lib.cpu as L
    saved = dict(L._allocator)
    L._allocator.clear()
    monkeypatch.setattr(L.sys, 'platform', 'linux')
    monkeypatch.delenv('COURSE_LIB_MALLOC', raising=False)
    yield L
    L._allocator.clear(); L._allocator.update(saved)


def test_tune_malloc_sets_the_documented_thresholds_once(fresh_allocator, monkeypatch):
    L, libc = fresh_allocator, FakeLibc()
    monkeypatch.setattr(L, '_glibc_malloc', lambda: libc)
    assert L.tune_malloc() is True and L.tune_malloc() is True
    assert libc.calls == [(-3, 256 * 2**20), (-1, 2**30)]   # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, once per process


@pytest.mark.parametrize('case', ['not glibc', 'mallopt refuses', 'switched off', 'not linux'])
def test_tune_malloc_declines(fresh_allocator, monkeypatch, case):
    L, libc = fresh_allocator, FakeLibc(ok=0 if case == 'mallopt refuses' else 1)
    monkeypatch.setattr(L, '_glibc_malloc', lambda: None if case == 'not glibc' else libc)
    if case == 'switched off': monkeypatch.setenv('COURSE_LIB_MALLOC', 'default')
    if case == 'not linux': monkeypatch.setattr(L.sys, 'platform', 'darwin')
    assert L.tune_malloc() is False
    assert libc.calls == ([(-3, 256 * 2**20)] if case == 'mallopt refuses' else [])


@pytest.mark.skipif(not sys.platform.startswith('linux') or shutil.which('gcc') is None, reason='needs Linux and gcc')
def test_tune_malloc_declines_when_another_malloc_is_preloaded(tmp_path):
    "mallopt would tune glibc's heap, which a preloaded allocator (jemalloc, tcmalloc) does not use: say False."
    src = tmp_path/'wrap.c'
    src.write_text('#include <stddef.h>\nextern void *__libc_malloc(size_t);\n'
                   'void *malloc(size_t n) { return __libc_malloc(n); }\n')
    subprocess.run(['gcc', '-shared', '-fPIC', '-o', str(tmp_path/'wrap.so'), str(src)], check=True)
    code = ("from course_lib.cpu import tune_malloc; "
            "print(tune_malloc(), 'wrap.so' in open('/proc/self/maps').read())")
    def applied(preload):
        env = {**os.environ, 'LD_PRELOAD': preload, 'COURSE_LIB_MALLOC': ''}
        return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                              check=True).stdout.split()
    assert applied('') == ['True', 'False']
    tuned, loaded = applied(str(tmp_path/'wrap.so'))
    if loaded != 'True': pytest.skip(f"the dynamic loader did not preload {tmp_path/'wrap.so'} "
                                     "(noexec temporary folder?)")
    assert tuned == 'False'


def test_tune_malloc_announces_itself_once(fresh_allocator, monkeypatch, capsys):
    L, libc = fresh_allocator, FakeLibc()
    monkeypatch.setattr(L, '_glibc_malloc', lambda: libc)
    assert L.tune_malloc(verbose=True) is True and L.tune_malloc(verbose=True) is True
    assert capsys.readouterr().out.count('tune_malloc: glibc keeps large blocks') == 1


def test_fit_does_not_tune_the_allocator(fresh_allocator, monkeypatch):
    "The tuning is one explicit call (notebooks, CLI, benches), never a side effect of training."
    L, libc = fresh_allocator, FakeLibc()
    monkeypatch.setattr(L, '_glibc_malloc', lambda: libc)
    from torch.utils.data import TensorDataset, DataLoader as TorchDataLoader
    x, y = torch.randn(32, 2), torch.randint(0, 2, (32,))
    dls = DataLoaders(TorchDataLoader(TensorDataset(x, y), batch_size=8),
                      TorchDataLoader(TensorDataset(x, y), batch_size=8))
    learn = Learner(dls, nn.Linear(2, 2))
    learn.fit(1)
    assert libc.calls == [] and L._allocator == {}


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning is Linux-only')
@pytest.mark.parametrize('env, expected', [('', 'True'), ('default', 'False')])
def test_tune_malloc_is_applied_once_unless_switched_off(env, expected):
    code = ("from course_lib.cpu import tune_malloc, _allocator; import sys; "
            "print(tune_malloc(), tune_malloc(), _allocator)")
    out = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'COURSE_LIB_MALLOC': env, 'LD_PRELOAD': ''},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == [expected, expected]
