"The dry run of flagged cells picks what they need and shrinks sizes; its stand-in data look like the downloads."
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dry_run_flagged import select_cells, smaller, stand_in_data


def cells(*srcs): return ([dict(cell_type='markdown', source=['# title'])]
                          + [dict(cell_type='code', source=[s]) for s in srcs])


def test_flagged_cells_bring_the_cells_that_define_their_names_and_nothing_else():
    nb = cells('import torch\nfrom course_lib.data import *',          # 1: imports always run
               'x = torch.ones(3)\nslow_result = train_for_an_hour()', # 2: defines x
               'unrelated = train_for_another_hour()',                 # 3: nobody needs it
               'y = x * 2',                                            # 4: defines y from x
               '#| export\ndef helper(v): return v',                   # 5: the notebook's library
               '#| cuda\nprint(helper(y).cuda())',                     # 6: flagged, needs y
               'x = 0')                                                # 7: after the flagged cell
    assert select_cells(nb) == [1, 2, 4, 5, 6]


def test_the_latest_definition_before_the_flagged_cell_is_the_one_taken():
    nb = cells('n = 1', 'n = 2', '#| slow\nprint(n)')
    assert select_cells(nb) == [2, 3]


def test_sizes_and_batches_are_cut():
    src = "dls = pets.dataloaders(p, bs=64, item_tfms=Resize(460), batch_tfms=aug_transforms(size=224, min_scale=0.75))"
    assert smaller(src) == ("dls = pets.dataloaders(p, bs=16, item_tfms=Resize(32), "
                            "batch_tfms=aug_transforms(size=32, min_scale=0.75))")
    assert smaller("figsize=(12, 12), bs=8") == "figsize=(12, 12), bs=8"


def test_stand_in_downloads_are_laid_out_like_the_real_ones(tmp_path):
    sample = Path(__import__('os').environ.get('COURSE_LIB_DATA', Path(__file__).parents[2]/'shared'/'data'))
    sample = sample/'oxford-iiit-pet-sample'/'images'
    if not sample.is_dir(): pytest.skip(f"no pets sample at {sample}")
    stand_in_data(tmp_path, sample)
    assert len(list((tmp_path/'oxford-iiit-pet'/'images').glob('*.jpg'))) == len(list(sample.glob('*.jpg')))
    assert sorted(p.name for p in (tmp_path/'hotdog').iterdir()) == ['test', 'train']
    assert sorted(p.name for p in (tmp_path/'hotdog'/'train').iterdir()) == ['hotdog', 'not-hotdog']
    from torchvision.datasets import FashionMNIST
    fm = FashionMNIST(root=tmp_path/'fashion-mnist', train=True, download=False)
    assert fm.data.shape == (7000, 28, 28) and set(fm.targets.tolist()) == set(range(10))
    import torch
    state = torch.load(tmp_path/'torch'/'hub'/'checkpoints'/'resnet34-b627a593.pth')
    assert state['fc.weight'].shape == (1000, 512)


def _imports_a_module(): import colorsys; print('child ran'); return 3   # a module this test process has not imported


@pytest.mark.skipif(not __import__('run_notebooks').can_fork(), reason='this system cannot fork')
def test_a_fresh_process_returns_its_code_and_output_and_leaves_this_process_alone():
    from run_notebooks import in_fresh_process
    sys.modules.pop('colorsys', None)
    code, out = in_fresh_process(_imports_a_module)
    assert (code, out.strip()) == (3, 'child ran') and 'colorsys' not in sys.modules
