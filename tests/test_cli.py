"The `course-lib` program: argument errors, a short end-to-end run with predict, and Ctrl-C leaving a usable report."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest

from course_lib.cli import build_parser, resolve_config, main
from course_lib.data import data_home

SAMPLE = data_home()/'oxford-iiit-pet-sample'/'images'
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the pets sample is not at {SAMPLE} (set COURSE_LIB_DATA)")
QUICK = ['--size', '64', '--freeze-epochs', '1', '--epochs', '0', '--bs', '16', '--lr', '1e-2']


def parse(*argv): return build_parser().parse_args(list(argv))


@pytest.mark.parametrize('argv, msg', [
    (['pets', '--out', 'x', '--size', 'big'], "expected a whole number, got 'big'"),
    (['pets', '--out', 'x', '--epochs', '-1'], 'expected 0 or more, got -1'),
    (['pets', '--out', 'x', '--bs', '0'], 'expected a number of at least 1, got 0'),
    (['pets', '--out', 'x', '--preset', 'huge'], "invalid choice: 'huge'"),
    (['pets'], 'the following arguments are required: --out'),
])
def test_bad_arguments_are_named(argv, msg, capsys):
    with pytest.raises(SystemExit) as ei: build_parser().parse_args(argv)
    assert ei.value.code == 2 and msg in capsys.readouterr().err


def test_config_errors(tmp_path):
    with pytest.raises(SystemExit, match='both 0: nothing to train'):
        resolve_config(parse('pets', '--out', str(tmp_path), '--epochs', '0', '--freeze-epochs', '0', '--data', str(tmp_path)))
    with pytest.raises(SystemExit, match='--lr must be a positive number'):
        resolve_config(parse('pets', '--out', str(tmp_path), '--lr', '-1', '--data', str(tmp_path)))
    with pytest.raises(SystemExit, match='is not a folder of images'):
        resolve_config(parse('pets', '--out', str(tmp_path), '--data', str(tmp_path/'missing')))


def test_flags_override_the_preset(tmp_path):
    cfg = resolve_config(parse('pets', '--out', str(tmp_path), '--data', str(tmp_path), '--size', '300', '--bs', '8', '--lr', '0'))
    assert (cfg['size'], cfg['bs'], cfg['lr']) == (300, 8, None)
    assert cfg['presize'] >= 300  # the item resize is never smaller than the training size


def test_predict_without_a_model_says_how_to_get_one(tmp_path):
    with pytest.raises(SystemExit, match='no model.pth in .*course-lib pets --out'):
        main(['predict', str(tmp_path), 'cat.jpg'])


@needs_sample
def test_short_run_writes_everything_and_predict_reads_it(tmp_path, capsys):
    out = tmp_path/'run'
    assert main(['pets', '--out', str(out), *QUICK]) == 0
    for f in ('report.md', 'metrics.json', 'lr_find.png', 'loss.png', 'confusion.png', 'model.pth'):
        assert (out/f).stat().st_size > 0, f
    m = json.loads((out/'metrics.json').read_text())
    assert m['status'] == 'finished' and m['n_valid'] == 59 and m['n_classes'] == 37 and 0 <= m['accuracy'] <= 1
    report = (out/'report.md').read_text()
    assert 'Final validation error rate' in report and 'Most confused' in report and 'lr_find.png' in report
    capsys.readouterr()

    bad = tmp_path/'notes.jpg'; bad.write_text('not an image')
    good = sorted(SAMPLE.glob('Abyssinian_*.jpg'))[:2]
    files = [str(good[0]), str(bad), str(good[1]), str(tmp_path/'missing.jpg')]
    assert main(['predict', str(out), *files, '--json']) == 1     # exit code 1: some files failed
    res = json.loads(capsys.readouterr().out)
    assert [r['file'] for r in res] == files
    assert set(res[0]) == {'file', 'label', 'prob'} and 0 < res[0]['prob'] <= 1 and 'label' in res[2]
    assert 'error' in res[1] and 'error' in res[3]
    assert main(['predict', str(out), str(good[0])]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(good[0])) and line.count('%') == 3   # top-3 with probabilities


@needs_sample
def test_ctrl_c_during_training_leaves_a_report(tmp_path):
    out = tmp_path/'run'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    argv = [sys.executable, '-m', 'course_lib', 'pets', '--out', str(out), *QUICK[:2], '--freeze-epochs', '200',
            '--bs', '16', '--lr', '1e-2']
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            m = out/'metrics.json'
            if m.exists() and '"fine_tune"' in m.read_text(): break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        time.sleep(3)   # well inside the 200 epochs
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted during 'fine_tune'" in err and str(out) in err
    m = json.loads((out/'metrics.json').read_text())
    assert m['status'] == 'interrupted' and m['step'] == 'fine_tune' and 'lr_min' in m
    assert 'was interrupted during the step' in (out/'report.md').read_text()
    assert (out/'lr_find.png').exists() and not (out/'model.pth').exists()


@needs_sample
def test_book_preset_offline_falls_back_to_the_offline_backbone_and_says_so(tmp_path, monkeypatch, capsys):
    import course_lib.cli as cli
    from course_lib.models import PretrainedWeightsError
    real = cli.vision_learner
    def no_resnet_weights(dls, arch, **kw):
        if str(arch).startswith('resnet'): raise PretrainedWeightsError(f"cannot get the ImageNet weights of {arch}. More text")
        return real(dls, arch, **kw)
    monkeypatch.setattr(cli, 'vision_learner', no_resnet_weights)
    out = tmp_path/'book'
    assert main(['pets', '--out', str(out), '--preset', 'book', '--data', str(SAMPLE), *QUICK]) == 0
    err = capsys.readouterr().err
    assert 'resnet34 (the preset\'s default) has no ImageNet weights here' in err and 'efficientnet_lite2 instead' in err
    m = json.loads((out/'metrics.json').read_text())
    assert m['config']['arch'] == 'efficientnet_lite2' and 'arch_note' in m
    assert '**Backbone:** resnet34' in (out/'report.md').read_text()
    # asked for by name: no substitution, a clear failure
    assert main(['pets', '--out', str(tmp_path/'insist'), '--preset', 'book', '--arch', 'resnet34', '--data', str(SAMPLE), *QUICK]) == 1
    assert "failed during 'model': cannot get the ImageNet weights of resnet34" in capsys.readouterr().err


def test_full_dataset_that_cannot_be_downloaded_is_a_clear_exit(tmp_path, monkeypatch):
    import course_lib.cli as cli
    from course_lib.data import DownloadError
    def offline(url, *a, **kw): raise DownloadError(f"Could not download {url}: no network (simulated).")
    monkeypatch.setattr(cli, 'untar_data', offline)
    with pytest.raises(SystemExit, match=r'full Oxford-IIIT Pets dataset is needed \(or use the sample.*no network'):
        cli.find_images(None, 'full')


def test_download_failure_names_the_way_to_the_sample_that_fits_the_preset(tmp_path, monkeypatch):
    import course_lib.cli as cli
    from course_lib.data import DownloadError
    def offline(url, *a, **kw): raise DownloadError(f"Could not download {url}: no network (simulated).")
    monkeypatch.setattr(cli, 'untar_data', offline)
    monkeypatch.setattr(cli, 'data_home', lambda: tmp_path)   # no sample there
    with pytest.raises(SystemExit, match='or use the sample: run with --preset sample;') as ei:
        cli.find_images(None, 'full')
    assert str(tmp_path) not in str(ei.value)
    with pytest.raises(SystemExit, match=f"or use the sample: put it at {tmp_path/'oxford-iiit-pet-sample'};"):
        cli.find_images(None, 'sample')
