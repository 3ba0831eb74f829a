"""Fault injection for course_lib.data / course_lib.augment: broken and odd images, hostile archives, bad downloads."""
import functools, hashlib, http.server, io, os, shutil, socket, tarfile, threading, time, warnings, zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from course_lib.external import *
from course_lib.loader import *
from course_lib.data import *
from course_lib.external import CHECKSUMS
from course_lib.augment import *

SAMPLE = (Path(os.environ.get('COURSE_LIB_DATA', Path(__file__).parents[2]/'shared'/'data'))
          /'oxford-iiit-pet-sample'/'images')
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"pets sample not found at {SAMPLE}")


def _jpeg_bytes(size=(64, 48), color=(200, 30, 30)):
    buf = io.BytesIO(); Image.new('RGB', size, color).save(buf, 'JPEG'); return buf.getvalue()


@pytest.fixture
def salted(tmp_path):
    "A folder of 'pet photos' salted with every kind of broken or odd file."
    d = tmp_path/'images'; d.mkdir()
    for k in range(4):
        (d/f'Bengal_{k}.jpg').write_bytes(_jpeg_bytes(color=(10 * k, 100, 100)))
        (d/f'boxer_{k}.jpg').write_bytes(_jpeg_bytes(size=(48, 64), color=(100, 10 * k, 100)))
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    buf = io.BytesIO(); big.save(buf, 'JPEG')
    (d/'Bengal_truncated.jpg').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 3])
    (d/'Bengal_empty.jpg').write_bytes(b'')
    (d/'boxer_text.jpg').write_text('not an image at all')
    Image.new('CMYK', (50, 40), (0, 200, 200, 0)).save(d/'Bengal_cmyk.jpg')
    Image.new('L', (50, 40), 90).save(d/'boxer_grey.jpg')
    Image.new('RGBA', (50, 40), (0, 0, 255, 128)).save(d/'Bengal_rgba.png')
    Image.new('P', (50, 40), 7).save(d/'boxer_palette.png')
    Image.fromarray(np.full((40, 50), 40000, dtype=np.uint16)).save(d/'Bengal_16bit.png')
    Image.new('RGB', (1, 1), (0, 255, 0)).save(d/'boxer_tiny.png')
    return d

BROKEN = {'Bengal_truncated.jpg', 'Bengal_empty.jpg', 'boxer_text.jpg'}


def _labeller(): return using_attr(RegexLabeller(r'^([^_]+)_'), 'name')


def test_salted_folder_trains_every_batch(salted):
    block = DataBlock(get_y=_labeller(), splitter=RandomSplitter(0.25, seed=0),
                      item_tfms=Resize(32), batch_tfms=aug_transforms(size=24, min_scale=0.5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        dls = block.dataloaders(salted, bs=3, num_workers=2)
        seen = []
        for dl in (dls.train, dls.valid):
            for xb, yb in dl:
                assert xb.shape[1:] == (3, 24, 24) and torch.isfinite(xb).all()
                assert len(xb) == len(yb) > 0
                seen.append(len(xb))
        # a second epoch, without drop_last so that a broken file the shuffle dropped in the first one is met now;
        # the broken files already met are remembered, not re-warned
        dls.train.drop_last = False
        for xb, yb in dls.train: pass
    msgs = [str(w.message) for w in caught]
    for name in BROKEN:
        assert sum(name in m for m in msgs) == 1, (name, msgs)
    n_train_ok = dls.train.n
    assert sum(seen) >= n_train_ok - n_train_ok % 3 - 3  # every readable item seen (drop_last aside)
    assert set(dls.train.bad.values()) | set(dls.valid.bad.values())
    assert all(Path(dl.items[i]).name in BROKEN for dl in (dls.train, dls.valid) for i in dl.bad)


@pytest.mark.parametrize('name,expected', [('Bengal_cmyk.jpg', None), ('boxer_grey.jpg', (90, 90, 90)),
                                           ('Bengal_16bit.png', (156, 156, 156)), ('boxer_tiny.png', (0, 255, 0)),
                                           ('boxer_palette.png', None), ('Bengal_rgba.png', None)])
def test_every_mode_becomes_rgb(salted, name, expected):
    im = load_image(salted/name)
    assert im.mode == 'RGB'
    if expected: assert im.getpixel((0, 0)) == expected
    x = Resize(20)(Resize(20).fixed(im), 'valid')
    assert x.dtype == torch.uint8 and x.shape == (3, 20, 20)


def test_rgba_is_composited_on_white(salted):
    r, g, b = load_image(salted/'Bengal_rgba.png').getpixel((0, 0))
    assert b == 255 and 120 <= r <= 135 and 120 <= g <= 135  # half-transparent blue over white


@pytest.mark.parametrize('name,msg', [('Bengal_truncated.jpg', 'truncated'), ('Bengal_empty.jpg', 'empty'),
                                      ('boxer_text.jpg', 'cannot be read')])
def test_broken_files_raise_clear_errors(salted, name, msg):
    with pytest.raises(UnreadableImageError, match=msg) as e: load_image(salted/name)
    assert name in str(e.value)


def test_decompression_bomb_refused(tmp_path):
    f = tmp_path/'bomb.png'
    Image.new('L', (6000, 6000)).save(f, optimize=True)  # 36M pixels, a few KB on disk
    assert f.stat().st_size < 200_000
    with pytest.raises(UnreadableImageError, match='decompression bomb'): load_image(f, max_pixels=10_000_000)
    block = DataBlock(get_y=lambda p: 'x', splitter=lambda items: ([0], [0]), item_tfms=Resize(8))
    dl = block.dataloaders(tmp_path, bs=1).train
    dl.loader = functools.partial(load_image, max_pixels=10_000_000)
    with pytest.warns(UserWarning, match='bomb.png'):
        assert list(dl) == []


def test_regex_that_matches_nothing_shows_pattern_and_example(salted):
    block = DataBlock(get_y=using_attr(RegexLabeller(r'(.+)_\d+\.png$'), 'name'), item_tfms=Resize(8))
    with pytest.raises(ValueError, match=r"pattern '\(\.\+\)_\\\\d\+\\\\.png\$' does not match 'Bengal_0.jpg'"):
        block.dataloaders(salted)


def test_items_of_different_sizes_need_resize(salted):
    block = DataBlock(get_y=_labeller(), splitter=RandomSplitter(0.25, seed=0))
    for f in BROKEN: (salted/f).unlink()
    with pytest.raises(RuntimeError, match=r'Resize\(460\)'):
        for _ in block.dataloaders(salted, bs=4).train: pass


# ---- downloads and archives -------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    root = tmp_path/'srv'; root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown(); srv.server_close()


def test_checksum_mismatch_deletes_and_says_so(server, tmp_path):
    root, base = server
    (root/'data.bin').write_bytes(b'x' * 5000)
    dest = tmp_path/'dl'/'data.bin'
    with pytest.raises(ChecksumError, match='was deleted'):
        download_url(f"{base}/data.bin", dest, checksum=('md5', '0' * 32, None), show_progress=False)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    ok = ('md5', hashlib.md5(b'x' * 5000).hexdigest(), 5000)
    assert download_url(f"{base}/data.bin", dest, checksum=ok, show_progress=False).read_bytes() == b'x' * 5000


def test_size_mismatch_is_a_checksum_error(server, tmp_path):
    root, base = server
    (root/'data.bin').write_bytes(b'x' * 10)
    with pytest.raises(ChecksumError, match='size is 10 bytes, expected 11'):
        download_url(f"{base}/data.bin", tmp_path/'d.bin', checksum=('md5', hashlib.md5(b'x' * 10).hexdigest(), 11),
                     show_progress=False)


def test_offline_error_is_fast_and_helpful(tmp_path):
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()  # nobody listens here
    t0 = time.time()
    with pytest.raises(DownloadError) as e:
        download_url(f"http://127.0.0.1:{port}/oxford-iiit-pet.tgz", tmp_path/'oxford-iiit-pet.tgz',
                     show_progress=False)
    assert time.time() - t0 < 10   # a refused connection fails at once: this bound only proves it does not hang
    msg = str(e.value)
    assert f"127.0.0.1:{port}/oxford-iiit-pet.tgz" in msg and str(tmp_path/'oxford-iiit-pet.tgz') in msg
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_nothing(server, tmp_path, monkeypatch):
    root, base = server
    (root/'big.bin').write_bytes(os.urandom(3 << 20))
    import course_lib.external as cd
    real_tqdm = cd.tqdm
    class Boom(real_tqdm):
        def update(self, n):
            super().update(n); raise KeyboardInterrupt
    monkeypatch.setattr(cd, 'tqdm', Boom)
    with pytest.raises(KeyboardInterrupt): download_url(f"{base}/big.bin", tmp_path/'big.bin', show_progress=False)
    assert list(tmp_path.iterdir()) == [root.parent/'srv'] or not (tmp_path/'big.bin').exists()
    assert not any(p.name.startswith('big.bin') for p in tmp_path.iterdir())


def _tar_with(tmp_path, name, **member):
    src = tmp_path/'payload.txt'; src.write_text('payload')
    arc = tmp_path/f'{abs(hash(name))}.tar'
    with tarfile.open(arc, 'w') as t:
        info = t.gettarinfo(src, arcname=name)
        info.name = name  # gettarinfo strips a leading '/'; a hostile archive keeps it
        for k, v in member.items(): setattr(info, k, v)
        if info.isreg():
            with open(src, 'rb') as fh: t.addfile(info, fh)
        else: info.size = 0; t.addfile(info)
    return arc


@pytest.mark.parametrize('name,member,msg', [
    ('../escape.txt', {}, "contains '..'"),
    ('pets/../../escape.txt', {}, "contains '..'"),
    ('/tmp/absolute.txt', {}, 'absolute path'),
    ('pets/link', {'type': tarfile.SYMTYPE, 'linkname': '../../outside'}, 'outside the target'),
    ('pets/abslink', {'type': tarfile.SYMTYPE, 'linkname': '/etc/passwd'}, 'outside the target'),
    ('pets/hard', {'type': tarfile.LNKTYPE, 'linkname': '../x'}, "outside the target|contains '..'"),
    ('pets/dev', {'type': tarfile.CHRTYPE}, 'device or fifo'),
])
def test_hostile_tar_refused(tmp_path, name, member, msg):
    arc = _tar_with(tmp_path, name, **member)
    with pytest.raises(UnsafeArchiveError, match=msg): safe_extract(arc, tmp_path/'out')
    assert not (tmp_path/'out').exists() and not (tmp_path/'escape.txt').exists()
    assert not any(p.name.startswith('.out-') for p in tmp_path.iterdir())  # no temp folder left


def test_hostile_zip_refused(tmp_path):
    arc = tmp_path/'evil.zip'
    with zipfile.ZipFile(arc, 'w') as z: z.writestr('../evil.txt', 'x')
    with pytest.raises(UnsafeArchiveError, match="contains '..'"): safe_extract(arc, tmp_path/'out')
    assert not (tmp_path/'evil.txt').exists()


def test_safe_archive_extracts_and_inner_links_allowed(tmp_path):
    (tmp_path/'src'/'pets').mkdir(parents=True); (tmp_path/'src'/'pets'/'a.txt').write_text('a')
    os.symlink('a.txt', tmp_path/'src'/'pets'/'b.txt')
    with tarfile.open(tmp_path/'ok.tgz', 'w:gz') as t: t.add(tmp_path/'src'/'pets', arcname='pets')
    out = safe_extract(tmp_path/'ok.tgz', tmp_path/'out')
    assert (out/'a.txt').read_text() == 'a' and (out/'b.txt').read_text() == 'a'


def test_untar_data_verifies_and_derives_sample(server, tmp_path, monkeypatch):
    root, base = server
    pets = tmp_path/'build'/'oxford-iiit-pet'/'images'; pets.mkdir(parents=True)
    for breed in ['Bengal', 'boxer', 'pug']:
        for k in range(12): (pets/f'{breed}_{k}.jpg').write_bytes(_jpeg_bytes())
    with tarfile.open(root/'oxford-iiit-pet.tgz', 'w:gz') as t: t.add(pets.parent, arcname='oxford-iiit-pet')
    url = f"{base}/oxford-iiit-pet.tgz"
    data = tmp_path/'home'
    monkeypatch.setattr(URLs, 'PETS', url)
    monkeypatch.setitem(CHECKSUMS, url, ('md5', 'f' * 32, None))
    with pytest.raises(ChecksumError, match='was deleted'): untar_data(url, data=data)
    assert not (data/'archive'/'oxford-iiit-pet.tgz').exists() and not (data/'oxford-iiit-pet').exists()
    monkeypatch.setitem(CHECKSUMS, url, ('md5', file_hash(root/'oxford-iiit-pet.tgz'), None))
    sample = untar_data(URLs.PETS_SAMPLE, data=data)
    names = sorted(p.name for p in (sample/'images').iterdir())
    assert len(names) == 24 and {n.split('_')[0] for n in names} == {'Bengal', 'boxer', 'pug'}
    again = tmp_path/'home2'
    shutil.copytree(data/'oxford-iiit-pet', again/'oxford-iiit-pet')
    assert sorted(p.name for p in (untar_data(URLs.PETS_SAMPLE, data=again)/'images').iterdir()) == names  # seeded


def test_hand_placed_archive_with_bad_checksum_is_deleted(tmp_path, monkeypatch):
    url = 'http://127.0.0.1:9/hotdog.zip'
    monkeypatch.setitem(CHECKSUMS, url, ('sha1', '0' * 40, None))
    (tmp_path/'archive').mkdir(); (tmp_path/'archive'/'hotdog.zip').write_bytes(b'garbage')
    with pytest.raises(ChecksumError, match='hotdog.zip.*was deleted'): untar_data(url, data=tmp_path)
    assert not (tmp_path/'archive'/'hotdog.zip').exists()


# ---- augmentation properties ---------------------------------------------------------------------------------

def test_composite_equals_chain_of_warps():
    "Composing the matrices and sampling once is the same geometry as sampling each step (on a smooth image)."
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 96), indexing='ij')
    img = torch.stack([(xx * 2).sin() * 0.5 + 0.5, (yy * 3).cos() * 0.5 + 0.5, (xx * yy) * 0.5 + 0.5])[None]
    a, b = rotate_mats(1, 10, p=1.), zoom_mats(1, 1., 1.05, p=1.)
    once = apply_homography(img, a @ b)
    twice = apply_homography(apply_homography(img, a), b)
    inner = (slice(None), slice(None), slice(16, 80), slice(16, 80))
    assert (once - twice)[inner].abs().mean() < 0.01


@pytest.mark.parametrize('seed', range(5))
def test_aug_transforms_shapes_range_and_valid_determinism(seed):
    torch.manual_seed(seed)
    x = torch.rand(6, 3, 60, 80)
    tfms = aug_transforms(size=(32, 48), min_scale=0.5)
    y = x
    for t in tfms: y = t(y, split='train')
    assert y.shape == (6, 3, 32, 48) and 0 <= y.min() and y.max() <= 1
    v1 = tfms[0](x, split='valid'); v2 = tfms[0](x, split='valid')
    assert torch.equal(v1, v2) and v1.shape == (6, 3, 32, 48)
    assert torch.equal(tfms[1](x, split='valid'), x)


def test_bad_augment_arguments():
    with pytest.raises(ValueError, match='min_scale'): aug_transforms(size=224, min_scale=0)
    with pytest.raises(ValueError, match='max_lighting'): aug_transforms(size=224, max_lighting=1.5)
    with pytest.raises(ValueError, match="method must be"): Resize(10, method='x')


@needs_sample
def test_inference_config_roundtrip():
    block = DataBlock(get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'), splitter=RandomSplitter(seed=1),
                      item_tfms=Resize(64), batch_tfms=[*aug_transforms(size=48), Normalize()])
    dls = block.dataloaders(SAMPLE, bs=8)
    files = dls.valid.items[:4]
    cfg = dls.inference_config()
    import json; cfg = json.loads(json.dumps(cfg))  # plain data only
    fresh = DataLoaders.for_inference(cfg)
    assert fresh.vocab == dls.vocab
    assert torch.equal(fresh.test_dl(files).one_batch()[0], dls.test_dl(files).one_batch()[0])
