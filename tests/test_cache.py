"""`ImageCache`: bounded memory, keep-first admission (a stable working set under epoch-cyclic reads), counters, and
`cache_mb` through `DataBlock.dataloaders`; on small synthetic tensors and images."""
import threading
import numpy as np
import pytest
import torch
from PIL import Image

from course_lib.loader import ImageCache, DataLoader
from course_lib.data import DataBlock, ImageBlock, CategoryBlock, get_image_files, parent_label, RandomSplitter
from course_lib.augment import Resize


def tensor(nbytes, dtype=torch.uint8):
    return torch.zeros(nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)


@pytest.mark.parametrize('seed', range(20))
def test_never_holds_more_than_its_budget_whatever_the_sizes(seed):
    rng = np.random.default_rng(seed)
    cache = ImageCache(max_mb=float(rng.uniform(0.01, 0.5)))
    for k in rng.integers(0, 200, 400):
        size = int(rng.integers(4, 60_000))
        cache.put(int(k), tensor(size, dtype=torch.float32 if size % 2 else torch.uint8))
        assert cache.nbytes <= cache.max_bytes
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.d.values())


def test_keeps_the_first_items_when_full_and_never_evicts():
    cache = ImageCache(max_mb=10_000 * 5 / 2**20)             # room for exactly 5 items of 10,000 bytes
    for k in range(8): cache.put(k, tensor(10_000))
    assert sorted(cache.d) == [0, 1, 2, 3, 4] and cache.refused == 3
    cache.put(0, tensor(10))                                   # a key already held is not replaced
    assert cache.d[0].numel() == 10_000 and cache.nbytes == 50_000


@pytest.mark.parametrize('n, capacity', [(100, 40), (50, 49), (30, 30), (64, 1)])
def test_cyclic_reads_hit_exactly_capacity_over_n_after_the_first_epoch(n, capacity):
    cache, rng, rates = ImageCache(max_mb=capacity * 1000 / 2**20), np.random.default_rng(0), []
    for epoch in range(4):
        for k in rng.permutation(n):
            if cache.get(int(k)) is None: cache.put(int(k), tensor(1000))
        rates.append(cache.hit_rate); cache.reset_stats()
    assert rates[0] == 0 and rates[1:] == [capacity / n] * 3 and len(cache) == capacity


def test_counters_are_exact_under_concurrent_readers():
    cache = ImageCache(max_mb=50 * 1000 / 2**20)
    def reader(seed):
        for k in np.random.default_rng(seed).integers(0, 100, 2000):
            if cache.get(int(k)) is None: cache.put(int(k), tensor(1000))
    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert cache.hits + cache.misses == 8 * 2000 and len(cache) == 50 and cache.nbytes == 50_000
    assert cache.refused <= cache.misses - 50   # two threads may miss the same key; the second put finds it held


@pytest.mark.parametrize('bad', [-1, float('nan'), float('inf'), '2GB', None, True])
def test_a_bad_budget_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r'cache_mb of DataBlock.dataloaders\) must be a number of megabytes >= 0'):
        ImageCache(bad)


def test_zero_turns_it_off():
    cache = ImageCache(0)
    cache.put('a', tensor(1))
    assert (len(cache), cache.get('a'), cache.stats()['hit_rate']) == (0, None, 0.)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp('imgs'), np.random.default_rng(0)
    for cls in ('cat', 'dog'):
        (root/cls).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root/cls/f'{i}.png')
    return root


@pytest.mark.parametrize('cache_mb', [2048, 0])
def test_dataloaders_cache_mb_is_shared_and_counted(folder, cache_mb):
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=RandomSplitter(seed=0), item_tfms=Resize(32))
    dls = block.dataloaders(folder, bs=4, cache_mb=cache_mb, num_workers=2, device='cpu')
    assert dls.train.cache is dls.valid.cache and dls.train.cache.max_mb == cache_mb
    for _ in range(2):
        list(dls.train); list(dls.valid)
    c, n_read = dls.train.cache.stats(), len(dls.train) * 4 + dls.valid.n     # the training loader drops no item here
    assert dls.train.n + dls.valid.n == 24 and n_read == 24
    assert c['hits'] + c['misses'] == 2 * n_read and c['hits'] == (n_read if cache_mb else 0)
    assert c['items'] == (24 if cache_mb else 0)


def test_a_full_cache_gives_the_same_batches_as_one_that_holds_everything(folder):
    files = sorted(get_image_files(folder))
    def two_epochs(cache):
        dl = DataLoader(files, labels=list(range(len(files))), bs=6, item_tfms=[Resize(32)], device='cpu', cache=cache)
        return [xb for _ in range(2) for xb, _ in dl]
    small = ImageCache(max_mb=3 * 3 * 32 * 40 / 2**20)          # three of the 32x40 decoded images
    for a, b in zip(two_epochs(small), two_epochs(ImageCache())): assert torch.equal(a, b)
    assert len(small) == 3 and small.hits == 3 and small.misses == 2 * len(files) - 3


def test_expected_decodes_counts_what_the_cache_cannot_hold():
    from course_lib.loader import expected_decodes
    assert expected_decodes(0, 0, 3) == 0
    assert expected_decodes(100, 0, 3) == 300 and expected_decodes(100, 0, 3, ws=2) == 150   # no cache
    assert expected_decodes(100, 100, 5) == 100                  # one process: each photo decoded once
    per_process = [expected_decodes(100, 100, e, ws=4) for e in range(1, 30)]
    assert per_process[0] == 25 and all(b > a for a, b in zip(per_process, per_process[1:]))
    assert per_process[-1] < 100 and abs(per_process[-1] - 100) < 0.1   # a process sees every photo in the end
