"""What importing `course_lib.progress` and `course_lib.oom` adds to the Learner, and what a Learner does \
without them."""
import subprocess, sys, textwrap


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


def test_a_bare_learner_records_and_asks_for_oom_before_auto_bs():
    out = _run('''
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset, DataLoader
        from course_lib.loader import DataLoaders
        from course_lib.learner import Learner
        x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
        dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x, y), batch_size=8))
        learn = Learner(dls, nn.Linear(2, 2))
        print([type(c).__name__ for c in learn.cbs])
        learn.fit(1)
        try: learn.fit(1, auto_bs=True)
        except RuntimeError as e: print(e)
    ''')
    lines = out.splitlines()
    assert lines[0] == "['Recorder']"
    assert 'auto_bs=True needs course_lib.oom' in lines[-1]


def test_plugins_register_once_even_when_reloaded():
    out = _run('''
        import importlib
        import course_lib.progress as progress, course_lib.oom as oom
        from course_lib.learner import Learner
        importlib.reload(progress); importlib.reload(oom)
        print([c.__name__ for c in Learner.default_cbs], Learner._do_phase.__wrapped__.__name__,
              getattr(Learner._do_phase.__wrapped__, 'retries_smaller', False))
    ''')
    assert out == "['Recorder', 'ProgressCallback'] _do_phase False"
