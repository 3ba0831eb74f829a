"The `course-lib` program: argument errors, a short end-to-end run with predict, and Ctrl-C leaving a usable report."
import json, os, re, shutil, signal, statistics, subprocess, sys, time
from pathlib import Path
import pytest

from course_lib.cli import build_parser, resolve_config, main, PRESETS
from course_lib.report import PROTOCOL, protocol_estimate, write_report
from course_lib.external import data_home

SAMPLE = data_home()/'oxford-iiit-pet-sample'/'images'
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(),
                                  reason=f"the pets sample is not at {SAMPLE} (set COURSE_LIB_DATA)")
QUICK = ['--size', '64', '--freeze-epochs', '1', '--epochs', '0', '--bs', '16', '--lr', '1e-2']


def parse(*argv): return build_parser().parse_args(list(argv))


@pytest.mark.parametrize('argv, msg', [
    (['pets', '--out', 'x', '--size', 'big'], "expected a whole number, got 'big'"),
    (['pets', '--out', 'x', '--epochs', '-1'], 'expected 0 or more, got -1'),
    (['pets', '--out', 'x', '--bs', '0'], 'expected a number of at least 1, got 0'),
    (['pets', '--out', 'x', '--preset', 'huge'], "invalid choice: 'huge'"),
    (['pets', '--out', 'x', '--cache-mb', '-1'], 'argument --cache-mb: expected 0 or more, got -1'),
    (['pets', '--out', 'x', '--cache-mb', '2GB'], "argument --cache-mb: expected a whole number, got '2GB'"),
    (['pets'], 'the following arguments are required: --out'),
])
def test_bad_arguments_are_named(argv, msg, capsys):
    with pytest.raises(SystemExit) as ei: build_parser().parse_args(argv)
    assert ei.value.code == 2 and msg in capsys.readouterr().err


def test_help_names_the_protocol(capsys):
    with pytest.raises(SystemExit): build_parser().parse_args(['pets', '--help'])
    said = ' '.join(capsys.readouterr().out.split())
    assert '5-fold cross-validation on the sample' in said and 'bench/cv_protocol.py' in said
    assert '--retrain, --no-retrain' in said


def test_config_errors(tmp_path):
    with pytest.raises(SystemExit, match='both 0: nothing to train'):
        resolve_config(parse('pets', '--out', str(tmp_path), '--epochs', '0', '--freeze-epochs', '0',
                             '--data', str(tmp_path)))
    with pytest.raises(SystemExit, match='--lr must be a positive number'):
        resolve_config(parse('pets', '--out', str(tmp_path), '--lr', '-1', '--data', str(tmp_path)))
    with pytest.raises(SystemExit, match='is not a folder of images'):
        resolve_config(parse('pets', '--out', str(tmp_path), '--data', str(tmp_path/'missing')))


def test_flags_override_the_preset(tmp_path):
    cfg = resolve_config(parse('pets', '--out', str(tmp_path), '--data', str(tmp_path), '--size', '300', '--bs', '8',
                               '--lr', '0', '--cache-mb', '512'))
    assert (cfg['size'], cfg['bs'], cfg['lr'], cfg['cache_mb']) == (300, 8, None, 512)
    assert resolve_config(parse('pets', '--out', str(tmp_path), '--data', str(tmp_path)))['cache_mb'] == 2048
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
    finder = next(l for l in report.splitlines() if l.startswith('Suggestions:'))
    for name, key in [('minimum/10', 'lr_min'), ('steep', 'lr_steep'), ('valley', 'lr_valley'), ('slide', 'lr_slide')]:
        assert f'{name} = {m[key]:.2e}' in finder, name
    assert 'from the preset or --lr' in finder and m['base_lr'] == 1e-2
    assert m['lr_window'] <= 13 and "slide's 15-point window does not fit" in finder   # the preset's 20 iterations
    said = capsys.readouterr().out   # before training: how many photos, and an estimate measured here
    assert re.search(r'237 photos to train on, 59 to validate, then all 296 again for the exported model, 37 breeds; '
                     r'training should take about \d+ (s|min|h) on this machine', said), said[:500]
    assert m['estimated_s'] > 0 and said.index('photos to train on') < said.index('epoch')
    # the exported model was trained again on every photo, without a validation set, and the report says so
    assert m['trained_on']['n'] == 296 and 'all 296 photos (237 training and 59 validation)' in report
    assert [(r['epoch'], r['valid_loss'], r['accuracy']) for r in m['retrain_epochs']] == [(0, None, None)]
    assert '## Retraining on every photo' in report and 'the exported model trains again on all 296 photos' in said
    assert abs(m['accuracy_se'] - (m['accuracy'] * (1 - m['accuracy']) / 59) ** 0.5) < 1e-9
    assert m['protocol'] is None and 'No cross-validated estimate is recorded for this recipe' in report  # --size 64
    # the decoded sample fits in the default cache: each photo read is decoded once, every later read is a hit
    c = m['cache']
    assert (c['max_mb'], c['refused']) == (2048, 0) and c['misses'] == c['items'] <= 296 and c['hits'] > c['misses']
    assert 'the cache (--cache-mb 2048) holds them all' in said
    line = f"- decoded-image cache (`--cache-mb 2048`): {c['items']} photos in {c['mb']:.0f} MB; {c['hit_rate']:.0%} of"
    assert line in report

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
def test_no_retrain_exports_the_validation_runs_model_and_cache_mb_0_turns_the_cache_off(tmp_path, capsys):
    out = tmp_path/'run'
    assert main(['pets', '--out', str(out), *QUICK, '--no-retrain', '--cache-mb', '0']) == 0
    m, said = json.loads((out/'metrics.json').read_text()), capsys.readouterr().out
    report = (out/'report.md').read_text()
    assert m['trained_on']['n'] == 237 and m['retrain_epochs'] == [] and 'again' not in said
    assert 'trained on the 237 training photos' in report
    assert m['config']['cache_mb'] == 0 and m['cache']['items'] == 0 and m['cache']['hits'] == 0
    assert 'the decoded-image cache is off (--cache-mb 0)' in said and 'decoded-image cache: off' in report


def test_the_recorded_estimate_is_for_the_presets_recipe():
    "PROTOCOL names the recipe it was measured for; changing the preset means running bench/cv_protocol.py again."
    lite2, lite0 = PROTOCOL
    assert {k: PRESETS['sample'][k] for k in lite2['recipe']} == lite2['recipe'], "re-run bench/cv_protocol.py"
    for est in (lite2['estimate'], lite2['smaller'], lite0['estimate']):
        assert len(est['folds']) == 5 and abs(sum(est['folds']) / 5 - est['mean']) < 1e-3
        assert abs(statistics.stdev(est['folds']) - est['sd']) < 1e-3
    cfg = {**PRESETS['sample'], 'seed': 42}
    est = protocol_estimate(cfg)
    assert est['mean'] == lite2['estimate']['mean'] and abs(est['se'] - est['sd'] / 5 ** 0.5) < 1e-12
    assert protocol_estimate({**cfg, 'retrain': False}) == est   # the same recipe, whichever model is exported
    assert protocol_estimate({**cfg, 'arch': 'efficientnet_lite0'})['mean'] == lite0['estimate']['mean']
    assert protocol_estimate({**cfg, 'lr': 3e-3}) is None and protocol_estimate(cfg, own_data=True) is None
    assert protocol_estimate({**PRESETS['cpu'], 'seed': 42}) is None


def test_a_finished_report_quotes_both_figures(tmp_path):
    cfg = {**PRESETS['sample'], 'seed': 42, 'images': 'pets'}
    est = protocol_estimate(cfg)
    m = dict(n_train=237, n_valid=59, n_classes=37, device='cpu', accuracy=0.9, error_rate=0.1, accuracy_se=0.039,
             seconds_total=140., protocol=est, model='model.pth',
             trained_on=dict(n=296, which='all 296 photos (237 training and 59 validation)'))
    write_report(tmp_path, {'config': cfg, 'preset': 'sample', 'status': 'finished', 'step': 'export',
                            'metrics': m, 'written': ['model.pth']})
    report = ' '.join((tmp_path/'report.md').read_text().split())
    assert 'accuracy 0.900) on 59 photos' in report and 'standard error is ±3.9%' in report
    assert f"**{est['mean']:.1%}** (sd {est['sd']:.1%} over 5 folds, so the mean is known to about ±2.3%)" in report
    assert 'bench/cv_protocol.py' in report and 'tuned on these photos' in report
    assert 'trained on all 296 photos' in report
    assert json.loads((tmp_path/'metrics.json').read_text())['protocol']['n_folds'] == 5
    m['protocol'] = None
    write_report(tmp_path, {'config': cfg, 'preset': 'cpu', 'status': 'finished', 'step': 'export', 'metrics': m})
    assert "only the sample preset's recipes have one" in (tmp_path/'report.md').read_text()


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
        if str(arch).startswith('resnet'):
            raise PretrainedWeightsError(f"cannot get the ImageNet weights of {arch}. More text")
        return real(dls, arch, **kw)
    monkeypatch.setattr(cli, 'vision_learner', no_resnet_weights)
    out = tmp_path/'book'
    assert main(['pets', '--out', str(out), '--preset', 'book', '--data', str(SAMPLE), *QUICK, '--lr', '0']) == 0
    err = capsys.readouterr().err
    assert ('resnet34 (the preset\'s default) has no ImageNet weights here' in err
            and 'efficientnet_lite2 instead' in err)
    m = json.loads((out/'metrics.json').read_text())
    assert m['config']['arch'] == 'efficientnet_lite2' and 'arch_note' in m
    key = {'minimum': 'lr_min', 'steep': 'lr_steep', 'valley': 'lr_valley', 'slide': 'lr_slide'}[cli.LR_PICK]
    assert m['base_lr'] == m[key] and m['lr_source'] == f"the finder's {cli.LR_PICK} suggestion"   # --lr 0
    assert '**Backbone:** resnet34' in (out/'report.md').read_text()
    # asked for by name: no substitution, a clear failure
    assert main(['pets', '--out', str(tmp_path/'insist'), '--preset', 'book', '--arch', 'resnet34',
                 '--data', str(SAMPLE), *QUICK]) == 1
    assert "failed during 'model': cannot get the ImageNet weights of resnet34" in capsys.readouterr().err


def test_full_dataset_that_cannot_be_downloaded_is_a_clear_exit(tmp_path, monkeypatch):
    import course_lib.cli as cli
    from course_lib.external import DownloadError
    def offline(url, *a, **kw): raise DownloadError(f"Could not download {url}: no network (simulated).")
    monkeypatch.setattr(cli, 'untar_data', offline)
    with pytest.raises(SystemExit,
                       match=r'full Oxford-IIIT Pets dataset is needed \(or run with --preset sample.*no network'):
        cli.find_images(None, 'full')


def test_download_failure_names_the_way_to_the_sample_that_fits_the_preset(tmp_path, monkeypatch):
    import course_lib.cli as cli
    from course_lib.external import DownloadError
    def offline(url, *a, **kw): raise DownloadError(f"Could not download {url}: no network (simulated).")
    monkeypatch.setattr(cli, 'untar_data', offline)
    monkeypatch.setattr(cli, 'data_home', lambda: tmp_path)   # no sample there
    with pytest.raises(SystemExit, match='or run with --preset sample, or pass --data') as ei:
        cli.find_images(None, 'full')
    assert str(tmp_path) not in str(ei.value)
    with pytest.raises(SystemExit, match=re.escape(f"the sample is not at {tmp_path/'oxford-iiit-pet-sample'} and "
                                                   "deriving it (8 photos per breed) needs the full")):
        cli.find_images(None, 'sample')


def test_without_the_sample_the_sample_preset_derives_it_from_the_full_download(tmp_path, monkeypatch):
    "No sample folder: `--preset sample` trains on 8 seeded photos per breed of the full download, not on all of it."
    import course_lib.cli as cli
    full = tmp_path/'oxford-iiit-pet'/'images'   # where untar_data(URLs.PETS) unpacks: 'downloaded' already
    full.mkdir(parents=True)
    for breed in ('Abyssinian', 'pug', 'great_pyrenees'):
        for i in range(1, 21): (full/f'{breed}_{i}.jpg').write_bytes(b'not decoded here')
    monkeypatch.setenv('COURSE_LIB_DATA', str(tmp_path))
    images = cli.find_images(None, 'sample')
    assert images == tmp_path/'oxford-iiit-pet-sample'/'images'
    names = sorted(f.name for f in images.iterdir())
    assert len(names) == 24 and all(sum(n.startswith(b + '_') for n in names) == 8
                                    for b in ('Abyssinian', 'pug', 'great_pyrenees'))
    first = names
    shutil.rmtree(images.parent)
    assert sorted(f.name for f in cli.find_images(None, 'sample').iterdir()) == first   # seeded: the same sample
    assert cli.find_images(None, 'full') == full


def _export_file(tmp_path, **changes):
    "A real (tiny) course_lib export, with `changes` applied to its entries."
    import torch
    from course_lib.learner import Learner
    from course_lib.export import create_model
    from helpers import synth_dls
    dls = synth_dls(n=8, bs=4)
    dls.inference_config = lambda: {'vocab': ['a', 'b'], 'bs': 4, 'item_tfms': [], 'batch_tfms': []}
    learn = Learner(dls, create_model('simple_cnn', n_out=2, n_in=1, widths=(4,)), path=tmp_path)
    f = learn.export('real.pth')
    if changes:
        state = torch.load(f, weights_only=True)
        state.update(changes)
        torch.save(state, f)
    return f.read_bytes()


def _bad_models(tmp_path):
    import torch
    torch.save({'just': 'a dict'}, tmp_path/'foreign.pth')
    return {
        'truncated': (_export_file(tmp_path)[:300], 'the file is truncated or damaged'),
        'foreign': ((tmp_path/'foreign.pth').read_bytes(), "this is not a course_lib export (written by "
                    "Learner.export): it holds a dict without a 'format' entry (keys: ['just'])"),
        'garbage': (b'<html>404 Not Found</html>',
                    "this is not a file written by torch.save (it starts with the bytes b'<htm')"),
        'empty': (b'', 'the file is empty (0 bytes)'),
        'older': (_export_file(tmp_path, version=0), 'it was written by an older course_lib (export format version 0; '
                  'this one reads version 1 only)'),
        'newer': (_export_file(tmp_path, version=7), 'it was written by a newer course_lib (export format version 7'),
    }


@pytest.mark.parametrize('kind', ['truncated', 'foreign', 'garbage', 'empty', 'older', 'newer'])
def test_predict_with_an_unusable_model_says_so_in_one_line(kind, tmp_path, capsys):
    content, problem = _bad_models(tmp_path)[kind]
    run = tmp_path/'run'; run.mkdir()
    (run/'model.pth').write_bytes(content)
    assert main(['predict', str(run), 'cat.jpg']) == 2
    out, err = capsys.readouterr()
    assert out == '' and len(err.splitlines()) == 1, err
    assert err.startswith(f"course-lib predict: {run/'model.pth'}: {problem}"), err
    assert f"Retrain the model with `course-lib pets --out {run}`" in err


def test_predict_with_a_folder_named_model_pth(tmp_path, capsys):
    (tmp_path/'model.pth').mkdir()
    assert main(['predict', str(tmp_path), 'cat.jpg']) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and 'the file cannot be read (Is a directory)' in err


def test_predict_with_an_unusable_model_from_the_shell_prints_no_traceback(tmp_path):
    (tmp_path/'model.pth').write_bytes(_export_file(tmp_path)[:300])
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'course_lib', 'predict', str(tmp_path), 'cat.jpg'], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == '' and len(r.stderr.splitlines()) == 1, r.stderr
    assert 'Traceback' not in r.stderr and 'truncated' in r.stderr and str(tmp_path/'model.pth') in r.stderr


def test_load_learner_errors_keep_their_types(tmp_path):
    "Callers that caught ValueError / pickle.UnpicklingError before still catch the new errors."
    import pickle, torch
    from course_lib.export import load_learner, ExportFileError, UnsafeExportError
    class Payload:
        def __reduce__(self): return (print, ('pwned',))
    torch.save({'format': 'course_lib.learner.export', 'x': Payload()}, tmp_path/'unsafe.pth')
    with pytest.raises(UnsafeExportError, match='was refused') as ei: load_learner(tmp_path/'unsafe.pth')
    assert isinstance(ei.value, pickle.UnpicklingError) and isinstance(ei.value, ValueError)
    (tmp_path/'bad.pth').write_bytes(b'garbage!')
    with pytest.raises(ExportFileError) as ei: load_learner(tmp_path/'bad.pth')
    assert ei.value.fname == tmp_path/'bad.pth' and 'torch.save' in ei.value.problem
    assert isinstance(ei.value, ValueError)
    (tmp_path/'wrong.pth').write_bytes(_export_file(tmp_path, model_state={'nope': torch.zeros(1)}))
    with pytest.raises(ExportFileError, match='its weights do not fit the model it describes'):
        load_learner(tmp_path/'wrong.pth', dls_fn=lambda cfg: None)


def test_the_estimate_under_torchrun_is_one_processs_share(monkeypatch):
    """With every timed training pass taking 1 s, a forward pass 0.5 s (per batch of 8), and loading one batch 1 s, the
    estimate counts work: each process trains on its shard, validates its share and decodes its share; lr_find stays."""
    import itertools, types, course_lib.cli as cli
    import distributed_job as job   # 48 training photos, 20 validation photos, in memory (so never cached)
    from course_lib.learner import Learner
    monkeypatch.setattr(cli, '_timed_pass', lambda learn, xb, yb, every_layer=False, backward=True, reps=3:
                        1. if backward else .5)
    clock = itertools.count()   # perf_counter() before and after loading the batch: 1 s apart
    monkeypatch.setattr(cli, 'time', types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    learn = Learner(job.dls(8), job.linear_model())
    cfg = dict(num_it=10, freeze_epochs=2, epochs=1, retrain=False)
    fwd, load = .5 / 8, 1 / 8   # seconds per validation photo, per decoded photo
    # 10 finder steps; 48 photos / bs 8 = 6 batches x (2 frozen + 1 unfrozen passes); 3 epochs of 20 validation
    # photos; every read of the 68 photos a decode. With 2 processes: 3 batches, 10 validation photos, 34 decodes
    est = lambda c, ws: cli.estimate_seconds(learn, c, ws=ws)
    assert est(cfg, 1) == pytest.approx(10 + 6 * 3 + 3 * 20 * fwd + 3 * 68 * load)
    assert est(cfg, 2) == pytest.approx(10 + 3 * 3 + 3 * 10 * fwd + 3 * 34 * load)
    assert est(cfg, 3) == pytest.approx(10 + 2 * 3 + 3 * 7 * fwd + 3 * 68 / 3 * load)   # 16 training photos each
    retrain = dict(cfg, retrain=True)   # again on all 68 photos: 8 batches, or 34 photos = 4 batches per process
    assert est(retrain, 1) == pytest.approx(est(cfg, 1) + 8 * 3 + 3 * 68 * load)
    assert est(retrain, 2) == pytest.approx(est(cfg, 2) + 4 * 3 + 3 * 34 * load)
