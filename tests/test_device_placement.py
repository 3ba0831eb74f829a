"""Where tensors live, checked without a GPU: PyTorch's `meta` device stands in for one. A meta tensor has a shape but
no values, so a model on the CPU meeting a batch on `meta` fails exactly as it would meeting a batch on a GPU
('... is not on the expected device'); reading a value (`.item()`, `.cpu()`) fails for another reason, after the
placement under test has happened."""
import pytest
import torch
from torch import nn

from course_lib.loader import default_device
from course_lib.learner import Learner
from course_lib.architectures import saved_activation_bytes, training_memory

from helpers import synth_dls

META = torch.device('meta')


def mlp(): return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
def device_of(model): return next(model.parameters()).device


def test_learner_moves_its_model_to_the_loaders_device_when_created():
    dls = synth_dls()
    dls.device = META
    learn = Learner(dls, mlp())
    assert device_of(learn.model) == META


@pytest.mark.parametrize('call', ['get_preds', 'predict'])
def test_inference_moves_the_model_to_where_the_batches_go(call):
    learn = Learner(synth_dls(), mlp())          # created on the CPU ...
    learn.dls.to(META)                           # ... then the loaders move (as `learn.dls.to('cuda')` would)
    if call == 'predict': learn.dls.test_dl = lambda items: [(torch.randn(1, 2),)]
    with pytest.raises((RuntimeError, NotImplementedError)) as e:
        learn.get_preds() if call == 'get_preds' else learn.predict(None)
    assert 'expected device' not in str(e.value) and 'same device' not in str(e.value), e.value
    assert device_of(learn.model) == META        # it ran the model there; only copying the meta result back failed


def test_fit_runs_the_model_on_the_loaders_device():
    learn = Learner(synth_dls(), mlp())
    learn.dls.to(META)
    with pytest.raises((RuntimeError, NotImplementedError)) as e: learn.fit(1)
    assert 'expected device' not in str(e.value) and 'same device' not in str(e.value), e.value
    assert device_of(learn.model) == META


def test_memory_helpers_take_the_batch_to_the_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU()).to(META)   # Linear checks devices
    xb = torch.randn(2, 3, 8, 8)                 # a batch on the CPU, a model elsewhere
    saved_activation_bytes(model, xb)            # raised "Tensor on device cpu is not on the expected device meta"
    assert set(training_memory(model, xb)) == {'params', 'grads', 'optimizer', 'activations', 'total'}


def test_without_a_device_the_model_stays_where_it_is():
    "Plain torch loaders (no `device`): the Learner has nowhere to move the model to, so it leaves it alone."
    class NoDevice: pass
    dls = NoDevice()
    learn = Learner(dls, mlp().to(META))
    assert device_of(learn.model) == META


@pytest.mark.parametrize('name, expected', [('cpu', 'cpu'), ('meta', 'meta'), ('cuda:1', 'cuda:1')])
def test_default_device_can_be_chosen_with_an_environment_variable(monkeypatch, name, expected):
    monkeypatch.setenv('COURSE_LIB_DEVICE', name)
    assert str(default_device()) == expected


def test_a_wrong_device_name_says_which_variable(monkeypatch):
    monkeypatch.setenv('COURSE_LIB_DEVICE', 'gpu0')
    with pytest.raises(ValueError, match=r"COURSE_LIB_DEVICE='gpu0' is not a torch device"): default_device()


def test_step_memory_counts_16_bit_activations_under_mixed_precision():
    "compare_archs after to_fp16()/to_bf16(): the memory columns are measured under the same autocast as training."
    from types import SimpleNamespace
    from course_lib.architectures import _step_memory
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU())
    def learn(dtype=None):
        mp = SimpleNamespace(dtype=dtype) if dtype else None
        return SimpleNamespace(model=model, device=torch.device('cpu'), mixed_precision=mp, freeze=lambda: None,
                               unfreeze=lambda: None)
    xb = torch.randn(4, 3, 32, 32)
    fp32, bf16 = _step_memory(learn(), xb, False), _step_memory(learn(torch.bfloat16), xb, False)
    assert bf16 < fp32
    assert _step_memory(learn(torch.float32), xb, False) == fp32   # to_fp16 on a CPU keeps fp32: same figure


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_questionnaire_fp16_cell_holds_on_each_device(monkeypatch, device):
    "Notebook 16's Q23 cell, with its learner on the CPU and (pretended: only `learn.device` says so) on a CUDA GPU."
    import warnings
    from fastcore.test import test_eq
    from course_lib.fp16 import MixedPrecisionWarning
    from helpers import notebook_cell
    learn = Learner(synth_dls(), mlp())
    monkeypatch.setattr(Learner, 'device', property(lambda self: torch.device(device)))
    ns = dict(learn=learn, warnings=warnings, test_eq=test_eq, torch=torch, nn=nn,
              MixedPrecisionWarning=MixedPrecisionWarning)
    exec(notebook_cell('16_questionnaire', 'learn.to_fp16()'), ns)


def test_hotdog_loaders_go_to_the_default_device(monkeypatch):
    "Notebook 12's d2l-style loaders follow `default_device()` (a GPU when there is one), not a fixed CPU."
    from pathlib import Path
    from helpers import notebook_cell
    monkeypatch.setenv('COURSE_LIB_DEVICE', 'meta')
    ns = {}
    exec('import torch\nfrom torchvision.transforms import v2\nfrom course_lib.external import *\n'
         'from course_lib.loader import *\nfrom course_lib.data import *\nfrom course_lib.models import arch_meta\n'
         + notebook_cell('12_fine_tuning_hotdog', 'def d2l_dls('), ns)
    class Block:   # two photos of the sample, one to train, one to validate
        def datasets(self, source):
            files = sorted(Path(source).glob('*.jpg'))[:2]
            return [files[0]], [0], [files[1]], [1], ['a', 'b']
    sample = ns['untar_data'](ns['URLs'].PETS_SAMPLE)/'images'
    assert ns['d2l_dls'](Block(), sample, size=32).device == META


def _cross_device(e): return any(s in str(e) for s in ('expected device', 'same device', 'on device cpu'))


def test_imagenet_check_of_notebook_06_runs_the_model_where_the_loader_puts_the_batches(monkeypatch):
    "Notebook 06's top-1 cell with its loader on a stand-in GPU: the model must follow the batches there."
    from fastcore.test import test_close
    from helpers import notebook_cell
    import course_lib.external as external, course_lib.loader as loader, course_lib.data as data
    import course_lib.augment as augment, course_lib.models as models
    monkeypatch.setenv('COURSE_LIB_DEVICE', 'meta')
    ns = {**vars(external), **vars(loader), **vars(data), **vars(augment),
          **{k: getattr(models, k) for k in models.__all__}, 'torch': torch,
          'test_close': test_close, 'lite0': models.efficientnet_lite0()}
    try: exec(notebook_cell('06_transfer_learning', 'lite0(xb).argmax(1)'), ns)
    except (RuntimeError, NotImplementedError) as e:   # reading a meta tensor's value fails: after the placement
        assert not _cross_device(e), e
    assert device_of(ns['lite0']) == META
