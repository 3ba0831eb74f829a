"""Where tensors live, checked without a GPU: PyTorch's `meta` device stands in for one. A meta tensor has a shape but
no values, so a model on the CPU meeting a batch on `meta` fails exactly as it would meeting a batch on a GPU
('... is not on the expected device'); reading a value (`.item()`, `.cpu()`) fails for another reason, after the
placement under test has happened."""
import pytest
import torch
from torch import nn

from course_lib.data import DataLoaders, default_device
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
