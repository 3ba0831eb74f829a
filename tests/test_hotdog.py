"Tests for course_lib.hotdog that a notebook should not carry: bad inputs, edge cases, exact values."
import math, pytest, torch, torchvision
from torch import nn
from course_lib.hotdog import output_layer, new_output_layer, body_head_splitter, head_from_class_rows


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.classifier = nn.Linear(3, 4), nn.Linear(4, 10)
    def forward(self, x): return self.classifier(self.body(x))


def test_new_output_layer_xavier_bounds_and_zero_bias():
    torch.manual_seed(0)
    m = new_output_layer(Tiny(), 3)
    w, a = m.classifier.weight, math.sqrt(6 / (4 + 3))
    assert w.shape == (3, 4) and w.abs().max() <= a and torch.count_nonzero(m.classifier.bias) == 0
    assert m(torch.zeros(2, 3)).shape == (2, 3)


def test_new_output_layer_default_init_keeps_torch_init():
    torch.manual_seed(0)
    assert torch.count_nonzero(new_output_layer(Tiny(), 3, init='default').classifier.bias) > 0


@pytest.mark.parametrize('kw, exc, msg', [
    (dict(n_out=0), ValueError, 'n_out must be a positive integer'),
    (dict(n_out=2, init='he'), ValueError, "init must be 'xavier' or 'default'"),
])
def test_new_output_layer_rejects_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg): new_output_layer(Tiny(), **kw)


def test_models_without_a_known_output_layer_are_refused():
    with pytest.raises(TypeError, match="no nn.Linear called 'classifier', 'fc' or 'head'"):
        output_layer(nn.Sequential(nn.Linear(2, 2)))


def test_body_head_splitter_partitions_the_parameters():
    for m in (Tiny(), torchvision.models.resnet18()):
        body, head = body_head_splitter(m)
        ids = [id(p) for p in body + head]
        assert len(ids) == len(set(ids)) == len(list(m.parameters()))
        assert {id(p) for p in head} == {id(p) for p in output_layer(m).parameters()}


def test_head_from_class_rows_averages_logits():
    torch.manual_seed(0)
    old, x = nn.Linear(5, 7), torch.randn(3, 5)
    new = head_from_class_rows(old, [[1, 4], [0, 2, 6]])
    torch.testing.assert_close(new(x), torch.stack([old(x)[:, [1, 4]].mean(1), old(x)[:, [0, 2, 6]].mean(1)], 1))
    assert head_from_class_rows(nn.Linear(5, 7, bias=False), [[0]]).bias is None


@pytest.mark.parametrize('groups, msg', [([[0], []], 'group 1 is empty'), ([[0, 7]], r'rows \[7\] outside 0..6'),
                                         ([[-1]], r'rows \[-1\] outside')])
def test_head_from_class_rows_rejects_bad_groups(groups, msg):
    with pytest.raises(ValueError, match=msg): head_from_class_rows(nn.Linear(5, 7), groups)
