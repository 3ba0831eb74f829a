"""fastbook chapter 5 after `from course_lib.all import *`: every name the chapter's cells use is there, and the book's
`Path`, `tensor`, `plot_function`, `doc` and `DataBlock.summary` behave as the chapter shows."""
import io, pathlib, re
from contextlib import redirect_stdout

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch

import course_lib.all as everything
from course_lib.external import Path, data_home, untar_data, URLs
from course_lib.data import (DataBlock, ImageBlock, CategoryBlock, get_image_files, RandomSplitter, RegexLabeller,
                             using_attr)
from course_lib.augment import Resize

SAMPLE = data_home()/'oxford-iiit-pet-sample'/'images'
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(),
                                  reason=f"the pets sample is not at {SAMPLE} (set COURSE_LIB_DATA)")

# Every name the chapter's code uses without importing it (fastai's `from fastai.vision.all import *` provides them).
BOOK_NAMES = [
    'Path', 'untar_data', 'URLs', 're', 'DataBlock', 'ImageBlock', 'CategoryBlock', 'get_image_files', 'RandomSplitter',
    'RegexLabeller', 'using_attr', 'parent_label', 'Resize', 'aug_transforms', 'vision_learner', 'cnn_learner',
    'resnet34', 'resnet50', 'efficientnet_lite0', 'error_rate', 'accuracy', 'torch', 'tensor', 'F', 'nn', 'np', 'plt',
    'partial', 'plot_function', 'ClassificationInterpretation', 'minimum', 'steep', 'valley', 'slide', 'inspect', 'doc',
    'SaveModelCallback', 'EarlyStoppingCallback', 'MixedPrecision', 'Learner', 'load_learner',
]
# `from fastai.callback.fp16 import *` becomes `from course_lib.fp16 import *`
FP16_NAMES = ['MixedPrecision', 'MixedPrecisionWarning', 'to_float']


def star_import(module):
    ns = {}
    exec(f'from {module} import *', ns)
    return ns


@pytest.mark.parametrize('name', BOOK_NAMES)
def test_the_star_import_brings_every_name_the_book_uses(name):
    assert name in star_import('course_lib.all'), f"`from course_lib.all import *` no longer gives {name!r}"


@pytest.mark.parametrize('name', FP16_NAMES)
def test_the_fp16_star_import(name):
    assert name in star_import('course_lib.fp16')


def test_the_standard_names_are_the_real_modules():
    ns = star_import('course_lib.all')
    assert (ns['re'], ns['np'], ns['torch'], ns['F'], ns['nn'], ns['plt']) == (
        re, __import__('numpy'), torch, torch.nn.functional, torch.nn, plt)
    assert ns['Path'] is Path and issubclass(Path, pathlib.Path)
    assert all(hasattr(ns['Learner'], m) for m in ('fine_tune', 'fit_one_cycle', 'lr_find', 'to_fp16', 'get_preds', 'tta'))


@pytest.fixture
def base_path():
    "Restores `Path.BASE_PATH`, which the tests set."
    old = Path.BASE_PATH
    yield
    Path.BASE_PATH = old


def test_path_ls_is_sorted_and_base_path_shortens_the_repr(tmp_path, base_path):
    root = Path(tmp_path)
    for n in ('b.jpg', 'A.jpg', 'c.txt'): (root/n).write_text('x')
    (root/'images').mkdir()
    assert root.ls() == [root/'A.jpg', root/'b.jpg', root/'c.txt', root/'images']
    assert all(type(p) is Path for p in root.ls())
    assert root.ls(file_exts=['jpg']) == [root/'A.jpg', root/'b.jpg'] and root.ls(n_max=2) == root.ls()[:2]
    Path.BASE_PATH = root
    assert repr(root/'images'/'Siamese_87.jpg') == "Path('images/Siamese_87.jpg')" and repr(root) == "Path('.')"
    assert str(root/'b.jpg') == str(tmp_path/'b.jpg')      # str stays the full path
    assert repr(Path('/elsewhere/x.jpg')) == "Path('/elsewhere/x.jpg')"
    with pytest.raises(NotADirectoryError, match='this is a file'): (root/'b.jpg').ls()
    with pytest.raises(FileNotFoundError, match='no such folder'): (root/'nope').ls()
    with pytest.raises(ValueError, match='n_max'): root.ls(n_max=-1)


def test_plain_pathlib_paths_still_work_as_items(tmp_path):
    "Items may be plain `pathlib.Path`s (other code makes them): the loader opens them as files, not as PIL images."
    from PIL import Image
    from course_lib.loader import DataLoader
    for i in range(2): Image.new('RGB', (8, 8), (i * 100, 0, 0)).save(tmp_path/f'{i}.png')
    dl = DataLoader([pathlib.Path(tmp_path/'0.png'), str(tmp_path/'1.png')], labels=[0, 1], bs=2, device='cpu')
    xb, yb = dl.one_batch()
    assert xb.shape == (2, 3, 8, 8) and yb.tolist() == [0, 1]


@needs_sample
def test_untar_data_gives_the_books_path(base_path):
    path = untar_data(URLs.PETS_SAMPLE)
    assert isinstance(path, Path)
    Path.BASE_PATH = path
    fname = (path/'images').ls()[0]
    assert repr(fname) == "Path('images/Abyssinian_101.jpg')" and path.ls() == [path/'images']
    assert re.findall(r'(.+)_\d+.jpg$', fname.name) == ['Abyssinian']
    assert all(isinstance(p, Path) for p in get_image_files(path/'images')[:3])


def test_tensor_like_the_book():
    t = everything.tensor([0, 1, 0, 1, 1, 0])
    assert t.dtype == torch.int64 and t.tolist() == [0, 1, 0, 1, 1, 0]
    assert everything.tensor(1, 2, 3).tolist() == [1, 2, 3]
    x = torch.zeros(2)
    assert everything.tensor(x) is x and everything.tensor(x, dtype=torch.int64).dtype == torch.int64
    with pytest.raises(TypeError, match='cannot make a tensor'): everything.tensor({'a': 1})


def test_plot_function_like_the_book():
    everything.plot_function(torch.sigmoid, min=-4, max=4)
    (line,) = plt.gca().get_lines()
    x, y = line.get_data()
    assert len(x) == 100 and (x[0], x[-1]) == (-4, 4) and abs(y[50] - torch.sigmoid(torch.tensor(x[50])).item()) < 1e-6
    everything.plot_function(torch.log, 'x', 'log(x)', 'Log', min=0, max=4)
    assert (plt.gca().get_xlabel(), plt.gca().get_title()) == ('x', 'Log')
    with pytest.raises(TypeError, match='give the range by name'): everything.plot_function(torch.log, 0, 4)
    with pytest.raises(ValueError, match='min < max'): everything.plot_function(torch.log, min=1, max=1)
    with pytest.raises(ValueError, match='one value per input'):
        everything.plot_function(lambda x: x.sum(), min=0, max=1)
    plt.close('all')


def test_doc_shows_signature_docstring_and_where_the_code_is(capsys):
    everything.doc(everything.Learner.fine_tune)
    out = capsys.readouterr().out
    assert out.startswith('fine_tune(self: course_lib.learner.Learner, epochs: int, base_lr: float = 0.002,')
    assert 'Train the head for `freeze_epochs`' in out
    assert 'defined in course_lib.models, from nbs/06_transfer_learning.ipynb' in out


def pets1():
    "The book's `pets1`: the pets recipe without an item transform."
    return DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, splitter=RandomSplitter(seed=42),
                     get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'))


@needs_sample
def test_summary_shows_the_books_collate_error_and_returns(base_path):
    Path.BASE_PATH = SAMPLE.parent
    out = io.StringIO()
    with redirect_stdout(out): pets1().summary(SAMPLE)            # printed, not raised: the cell runs to its end
    text = out.getvalue()
    assert 'get_items: 296 items, e.g. images/Abyssinian_101.jpg' in text     # relative to Path.BASE_PATH
    assert "Failed at step 'collate and batch_tfms': RuntimeError: Items of different sizes" in text
    assert 'item_tfms=Resize(460)' in text and 'All steps succeeded' not in text
    with redirect_stdout(io.StringIO()), pytest.raises(RuntimeError, match='cannot be stacked'):
        pets1().summary(SAMPLE, raise_error=True)
    fixed = DataBlock(get_y=pets1().get_y, item_tfms=Resize(64))
    with redirect_stdout(out := io.StringIO()): fixed.summary(SAMPLE, raise_error=True)
    assert 'All steps succeeded.' in out.getvalue()
