"Small builders shared by the tests (imported as `from helpers import ...`; pytest puts tests/ on sys.path)."
import torch
from torch.utils.data import TensorDataset, DataLoader as TorchDataLoader

from course_lib.loader import DataLoaders


def synth_dls(n=256, bs=32, seed=0, n_train=None):
    "Points in 2D labelled by the side of a line; the first 3/4 (or `n_train`) train, the rest validate. On the CPU."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    n_train = n * 3 // 4 if n_train is None else n_train
    train = TorchDataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=bs, shuffle=True, generator=g)
    valid = TorchDataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=bs)
    return DataLoaders(train, valid, vocab=['a', 'b'], device='cpu')


def notebook_cell(notebook, contains):
    "The source of the one code cell of `nbs/<notebook>.ipynb` that contains `contains`, to run it in a test."
    import json
    from pathlib import Path
    cells = json.loads((Path(__file__).parent.parent/'nbs'/f'{notebook}.ipynb').read_text())['cells']
    found = [''.join(c['source']) for c in cells if c['cell_type'] == 'code' and contains in ''.join(c['source'])]
    assert len(found) == 1, f"{len(found)} code cells of {notebook} contain {contains!r}"
    return found[0]
