("Tests of course_lib.models: pretrained weights (real, loaded by position, clear errors), splitter, freezing, lrs, "
 "fine_tune, export.")
import os, time, urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault('COURSE_LIB_DATA', str(Path(__file__).resolve().parents[2]/'shared'/'data'))
from course_lib.external import *
from course_lib.loader import *
from course_lib.data import *
from course_lib.augment import *
from course_lib.learner import Learner, accuracy
from course_lib.export import load_learner
from course_lib.models import *
from course_lib.models import _lite, FrozenBNCallback
from helpers import notebook_cell

torch.set_num_threads(2)
SAMPLE = untar_data(URLs.PETS_SAMPLE)/'images'


def first_files(path, n=48): return get_image_files(path)[:n]  # 6 cat breeds x 8 photos

@pytest.fixture(scope='module')
def dls():
    db = DataBlock(get_items=first_files, splitter=RandomSplitter(seed=42), item_tfms=Resize(32),
                   get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'))
    return db.dataloaders(SAMPLE, bs=8, seed=0)

@pytest.fixture(scope='module')
def lite0():
    return efficientnet_lite0().eval()


# --- pretrained weights -------------------------------------------------------------------------------------------
def test_load_by_position_matches_shapes(lite0):
    sd = torch.load(lite_weights_file('efficientnet_lite0'), map_location='cpu', weights_only=True)
    assert len(sd) == len(lite0.state_dict())
    for (k, v), (k2, t) in zip(sd.items(), lite0.state_dict().items()):
        assert v.shape == t.shape, (k, k2)
        assert torch.equal(v, t), (k, k2)

def test_load_by_position_mismatch_raises():
    sd = torch.load(lite_weights_file('efficientnet_lite0'), map_location='cpu', weights_only=True)
    with pytest.raises(ValueError, match='checkpoint has 296 tensors but the model'):
        load_by_position(_lite('efficientnet_lite1', pretrained=False), sd)
    bad = dict(sd)
    k = list(bad)[6]
    bad[k] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(ValueError, match=r"tensor 6 does not fit: the checkpoint's '_blocks.0._depthwise_conv.weight' "
                                         r"has shape \(3, 1, 3, 3\)"):
        load_by_position(_lite('efficientnet_lite0', pretrained=False), bad)
    with pytest.raises(ValueError, match='checkpoint has 1 tensors but the model'):
        load_by_position(nn.Linear(2, 2), {'w': torch.zeros(2, 2)})

def test_pretrained_top1_is_species_consistent(lite0):
    files = [SAMPLE/'Bengal_142.jpg', SAMPLE/'Siamese_158.jpg', SAMPLE/'beagle_111.jpg', SAMPLE/'pug_168.jpg']
    dl = DataLoader(files, bs=8, item_tfms=[Resize(224)],
                    batch_tfms=[Normalize(*arch_meta(efficientnet_lite0)['stats'])])
    with torch.no_grad(): top1 = lite0(next(iter(dl))[0]).argmax(1)
    got = [imagenet_species(int(k)) for k in top1]
    assert got == [pet_species(f) for f in files], [imagenet_categories()[int(k)] for k in top1]
    assert [imagenet_categories()[int(k)] for k in top1[1:]] == ['Siamese cat', 'beagle', 'pug']

def test_resnet_without_weights_fails_fast_and_clearly(tmp_path, monkeypatch):
    "Offline (simulated): the error names the cache path and pretrained=False, and comes at once."
    def offline(*a, **k): raise urllib.error.URLError('simulated: no network')
    monkeypatch.setattr(torch.hub, 'urlopen', offline)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        t0 = time.perf_counter()
        with pytest.raises(PretrainedWeightsError) as e: resnet34()
        assert time.perf_counter() - t0 < 5   # the simulated network fails at once: proves it does not hang
    finally: torch.hub.set_dir(old)
    msg = str(e.value)
    assert ('pretrained=False' in msg and str(tmp_path/'checkpoints'/'resnet34-b627a593.pth') in msg
            and 'TORCH_HOME' in msg)

def test_resnet_real_download_attempt_is_bounded(tmp_path):
    "Without monkeypatching: on this offline machine the real attempt fails within the timeout."
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        t0 = time.perf_counter()
        try: load_torchvision_weights(__import__('torchvision').models.ResNet18_Weights.DEFAULT, timeout=3)
        except PretrainedWeightsError: pass
        else: pytest.skip('this machine is online: the weights were downloaded')
        assert time.perf_counter() - t0 < 30   # timeout=3: proves a dead network does not hang the call
    finally: torch.hub.set_dir(old)

def _run_weights_cell(hub_dir, monkeypatch, capsys):
    "Run notebook 06's resnet34 cell with torch's hub cache in `hub_dir` and the network blocked; return its output."
    import textwrap, torchvision
    from fastcore.test import test_eq
    def offline(*a, **k): raise urllib.error.URLError('simulated: no network')
    monkeypatch.setattr(torch.hub, 'urlopen', offline)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub_dir))
    ns = dict(torch=torch, torchvision=torchvision, time=time, textwrap=textwrap, Path=Path, test_eq=test_eq,
              resnet34=resnet34, hub_checkpoint=hub_checkpoint, PretrainedWeightsError=PretrainedWeightsError)
    try: exec(notebook_cell('06_transfer_learning', "weights_file = hub_checkpoint("), ns)
    finally: torch.hub.set_dir(old)
    return ns, capsys.readouterr().out

def test_notebook_weights_cell_offline_with_an_empty_cache(tmp_path, monkeypatch, capsys):
    ns, out = _run_weights_cell(tmp_path, monkeypatch, capsys)
    assert ns['model'] is None and isinstance(ns['err'], PretrainedWeightsError)
    assert 'cached before: False; an error' in out and 'pretrained=False' in out

def _cache_resnet34_weights(hub_dir):
    "The file torchvision would have downloaded, in the cache (random weights stand in for ImageNet's)."
    torch.manual_seed(0)
    file = hub_dir/'checkpoints'/'resnet34-b627a593.pth'
    file.parent.mkdir()
    torch.save(resnet34(pretrained=False).state_dict(), file)
    return file

def test_notebook_weights_cell_with_the_weights_cached(tmp_path, monkeypatch, capsys):
    file = _cache_resnet34_weights(tmp_path)
    ns, out = _run_weights_cell(tmp_path, monkeypatch, capsys)
    assert ns['err'] is None and 'cached before: True; the pretrained model' in out
    assert torch.equal(ns['model'].conv1.weight, torch.load(file)['conv1.weight'])

def test_notebook_weights_cell_fails_if_the_model_ignores_the_cache(tmp_path, monkeypatch, capsys):
    "The cell's check has teeth: a resnet34 that came back with other weights than the file's fails it."
    _cache_resnet34_weights(tmp_path)
    monkeypatch.setitem(globals(), 'resnet34', lambda: __import__('torchvision').models.resnet34())
    with pytest.raises(AssertionError): _run_weights_cell(tmp_path, monkeypatch, capsys)

def test_resnet_random_init_architecture_only():
    m = resnet18(pretrained=False)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    vm = vision_model('resnet18', n_out=5, pretrained=False)
    assert vm(torch.randn(2, 3, 64, 64)).shape == (2, 5)


# --- splitter and freezing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['resnet18', 'resnet50', 'efficientnet_lite0'])
def test_splitter_covers_every_parameter_once(arch):
    m = vision_model(arch, n_out=3, pretrained=False)
    groups = vision_splitter(m)
    assert len(groups) >= 3 and all(groups)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters()}

def _bn_ids(model): return {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                            for p in m.parameters()}

def test_freeze_unfreeze_freeze_to(dls):
    learn = vision_learner(dls, efficientnet_lite0, metrics=accuracy, path='/tmp')
    groups, bn = learn.splitter(learn.model), _bn_ids(learn.model)
    def trainable(): return [[p.requires_grad for p in g] for g in groups]
    # starts frozen (pretrained): head trains, body only its BatchNorm parameters (train_bn=True)
    assert learn.frozen_idx == 2
    for g in groups[:2]:
        assert all(p.requires_grad == (id(p) in bn) for p in g)
    assert all(all(t) for t in trainable()[2:])
    learn.create_opt()
    p0 = groups[2][0]
    learn.opt.state[p0]['exp_avg'] = torch.ones_like(p0)
    learn.freeze_to(1)
    assert len(learn.opt.state) == 0, 'optimiser state must be cleared at each (re)freeze'
    assert all(p.requires_grad == (id(p) in bn) for p in groups[0]) and all(all(t) for t in trainable()[1:])
    learn.unfreeze()
    assert all(all(t) for t in trainable())
    learn.freeze(train_bn=False)
    assert not any(p.requires_grad for g in groups[:2] for p in g) and all(all(t) for t in trainable()[2:])
    with pytest.raises(ValueError, match='from -3 to 2'): learn.freeze_to(3)

def test_frozen_bn_stays_in_eval_mode_with_train_bn_false(dls):
    learn = vision_learner(dls, efficientnet_lite0, train_bn=False, path='/tmp')
    body_bn0 = learn.model[0][1]
    before = body_bn0.running_mean.clone()
    learn.model.train()
    cb = next(c for c in learn.cbs if isinstance(c, FrozenBNCallback))
    cb.before_train()
    assert not body_bn0.training and learn.model[1].training
    learn.fit(1, 1e-3)
    assert torch.equal(before, body_bn0.running_mean), 'frozen BatchNorm statistics must not change'

def test_slice_lrs_per_group(dls):
    learn = vision_learner(dls, resnet18, pretrained=False, path='/tmp')
    learn.set_lrs(slice(1e-5, 1e-3))
    assert [round(v, 10) for v in learn.get_hyper('lr')] == [1e-5, 1e-4, 1e-3]
    learn.set_lrs(slice(1e-3))
    assert [round(v, 10) for v in learn.get_hyper('lr')] == [1e-4, 1e-4, 1e-3]
    learn.set_lrs(3e-3)
    assert learn.get_hyper('lr') == [3e-3] * 3


# --- fine_tune and export -----------------------------------------------------------------------------------------
def test_fine_tune_phases(dls, monkeypatch):
    # fine_tune freezes even an untrained body; resnet18 without BatchNorm training keeps this test fast on a CPU
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy, train_bn=False, path='/tmp')
    calls, orig = [], Learner.fit_one_cycle
    def spy(self, n_epoch, lr_max=None, **kw):
        calls.append((n_epoch, lr_max, kw.get('pct_start'), kw.get('div', 25.), self.frozen_idx))
        return orig(self, n_epoch, lr_max, **kw)
    monkeypatch.setattr(Learner, 'fit_one_cycle', spy)
    learn.fine_tune(1, base_lr=2e-3, freeze_epochs=1)
    assert calls[0] == (1, slice(None, 2e-3, None), 0.99, 25., 2)
    assert calls[1][0] == 1 and calls[1][2:] == (0.3, 5., 0)
    assert (calls[1][1].start, calls[1][1].stop) == pytest.approx((1e-5, 1e-3))
    rows = learn.history.rows
    assert [(r['fit'], r['phase'], r['epoch']) for r in rows] == [(0, 'frozen', 0), (1, 'unfrozen', 0)]
    # peak lrs: the frozen phase has slice(2e-3) -> 2e-4, 2e-4, 2e-3 (up to where the cosine was sampled);
    # unfrozen is halved
    f, u = rows[0]['peak_lrs'], rows[-1]['peak_lrs']
    assert f[0] == pytest.approx(f[2] / 10) and u[0] == pytest.approx(u[2] / 100)
    assert f[2] <= 2e-3 and u[2] <= 1e-3 and u[2] > 1e-3 / 5

def test_lr_find_is_not_in_history(dls):
    learn = vision_learner(dls, efficientnet_lite0, train_bn=False, path='/tmp')
    learn.lr_find(num_it=10, show_plot=False)
    assert learn.history.rows == [] and learn.history.lrs == []

def test_export_roundtrip_identical_predictions(dls, tmp_path):
    learn = vision_learner(dls, efficientnet_lite0, metrics=accuracy, path=tmp_path, lin_ftrs=[], ps=0.1,
                           train_bn=False)
    learn.fit(1, 1e-3)
    fname = learn.export('pets.pth')
    spec = torch.load(fname, weights_only=True)['model_spec']
    assert spec['name'] == 'vision_model' and spec['kwargs']['pretrained'] is False
    learn2 = load_learner(fname)
    files = first_files(SAMPLE)[:6]
    p1, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    p2, _ = learn2.get_preds(dl=learn2.dls.test_dl(files))
    assert torch.allclose(p1, p2, atol=1e-6)
    assert learn2.dls.vocab == learn.dls.vocab
