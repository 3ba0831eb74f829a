"""Repository hygiene: README rendered from nbs/index.ipynb, CI runs the README's commands, notebooks clean \
and small."""
import json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _fenced_sh(md, heading):
    "The first ```sh block after `heading` in markdown `md`."
    part = md.split(heading, 1)[1]
    return re.search(r"```sh\n(.+?)\n```", part, re.S).group(1).strip()


def test_readme_is_rendered_from_index(tmp_path):
    subprocess.run([sys.executable, '-m', 'nbconvert', '--to', 'markdown', '--output-dir', str(tmp_path),
                    '--output', 'README', str(ROOT/'nbs'/'index.ipynb')], check=True, capture_output=True)
    assert (tmp_path/'README.md').read_text() == (ROOT/'README.md').read_text(), \
        "README.md is out of date: run `jupyter nbconvert --to markdown --output-dir . --output README nbs/index.ipynb`"


def test_readme_has_one_install_and_one_test_command_and_ci_runs_them():
    md, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()
    install, test = _fenced_sh(md, '## Install'), _fenced_sh(md, '## Run the tests')
    assert len(install.splitlines()) == 1 and len(test.splitlines()) == 1
    assert install in ci, f".ci/run must run the README's install command: {install}"
    assert test in ci, f".ci/run must run the README's test command: {test}"
    assert 'tests/run_notebooks.py' in test and 'pytest' in test and '--doctest-modules course_lib' in test


def test_notebooks_are_clean_and_small():
    for nb_path in sorted((ROOT/'nbs').glob('*.ipynb')):
        nb = json.loads(nb_path.read_text())
        assert nb_path.stat().st_size < 600_000, \
            f"{nb_path.name} is {nb_path.stat().st_size:,} bytes: downscale its figures"
        for c in nb['cells']:
            assert c.get('execution_count') is None, f"{nb_path.name}: run nbdev_clean (execution counts left)"
            assert not c.get('metadata'), f"{nb_path.name}: run nbdev_clean (cell metadata left)"
            assert not any(o.get('output_type') == 'error' for o in c.get('outputs', [])), \
                f"{nb_path.name}: an error output is committed"


def test_each_notebook_exports_at_most_one_module():
    for nb_path in sorted((ROOT/'nbs').glob('*.ipynb')):
        srcs = [''.join(c['source']) for c in json.loads(nb_path.read_text())['cells'] if c['cell_type'] == 'code']
        assert sum(bool(re.match(r'#\|\s*default_exp\b', s)) for s in srcs) <= 1, nb_path.name


def test_readme_lists_every_notebook():
    md = (ROOT/'README.md').read_text()
    missing = [p.stem for p in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')) if f'`{p.stem}`' not in md]
    assert not missing, f"README's notebook table (nbs/index.ipynb) lacks {missing}"


def test_readme_main_job_is_one_line_right_after_install():
    md = (ROOT/'README.md').read_text()
    after_install = md[md.index('## Install'):]
    blocks = re.findall(r'```sh\n(.*?)```', after_install, flags=re.S)
    assert blocks[1].strip().startswith('course-lib pets') and len(blocks[1].strip().splitlines()) == 1, blocks[:2]


def _outputs():
    "(notebook name, cell index, output) for every saved output of every notebook."
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for i, cell in enumerate(json.loads(nb.read_text())['cells']):
            for out in cell.get('outputs', []): yield nb.name, i, out


def _text(out) -> str:
    parts = [''.join(out.get('text', ''))] + ['\n'.join(out.get('traceback', []))]
    parts += [''.join(v) for k, v in out.get('data', {}).items() if k.startswith('text/')]
    return '\n'.join(parts)


def test_outputs_show_no_paths_of_the_machine_that_ran_them():
    "Committed outputs show paths relative to the data folder or a scratch folder, as the book's Path.BASE_PATH does."
    import tempfile
    from course_lib.external import data_home
    here = {str(p.resolve()) for p in (data_home(), Path.home(), Path(tempfile.gettempdir()), ROOT.parent)}
    here = [p for p in here if len(Path(p).parts) >= 2]   # an absolute path below the root, never '/' alone
    start = r'(?<![\w./:-])'                              # the start of a path, not the middle of a URL or a word
    machine = re.compile('|'.join([start + re.escape(p) + r'(?![\w.-])' for p in here]
                                  + [start + q for q in (r'/tmp/', r'/home/\w', r'/Users/\w', r'/root/',
                                                         r'/var/folders/')]
                                  + [r'ipykernel_\d+', r'(site|dist)-packages']))
    found = [f"{nb} cell {i}: ...{m.string[max(0, m.start() - 30):m.end() + 30]!r}..."
             for nb, i, out in _outputs() for m in [machine.search(_text(out))] if m]
    assert not found, '\n'.join(found[:20])


def test_no_empty_outputs():
    "No output that shows nothing (a progress bar's leftover, an empty print): the reader would see a blank box."
    empty = [f"{nb} cell {i}: {out['output_type']}" for nb, i, out in _outputs()
             if out['output_type'] in ('stream', 'display_data', 'execute_result')
             and all(k.startswith('text/') for k in out.get('data', {})) and not _text(out).strip()]
    assert not empty, '\n'.join(empty)


def test_every_notebook_is_titled_with_its_number():
    "The first cell of nbs/NN_name.ipynb starts with '# NN · ' (index.ipynb is the README)."
    wrong = []
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        if nb.name == 'index.ipynb': continue
        first = (''.join(json.loads(nb.read_text())['cells'][0]['source']).splitlines() or [''])[0]
        if not first.startswith(f"# {nb.name.split('_')[0]} · "): wrong.append(f"{nb.name}: {first!r}")
    assert not wrong, '\n'.join(wrong)


WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json'   # an ipywidgets output, and the reprs of the usual widgets:
WIDGET_REPR = re.compile(r'^\s*(\w*Box\(children=|Output\(|\w*(Slider|Progress|Button|Dropdown|Checkbox)\()')


def test_widgets_are_saved_as_pictures():
    """Without a kernel (GitHub, nbviewer) a widget is only its saved state or its repr, e.g. `VBox(children=(
    FloatLogSlider(...`: no notebook keeps widget state, and a cell that displays a widget also saves its figure."""
    nbs = sorted((ROOT/'nbs').glob('*.ipynb'))
    state = [nb.name for nb in nbs if 'widgets' in json.loads(nb.read_text())['metadata']]
    assert not state, f"saved widget state (metadata.widgets) in {state}: delete it (jq 'del(.metadata.widgets)')"
    bare = []
    for nb in nbs:
        for i, cell in enumerate(json.loads(nb.read_text())['cells']):
            outs = cell.get('outputs', [])
            widget = [o for o in outs if WIDGET_VIEW in o.get('data', {})
                      or WIDGET_REPR.match(''.join(o.get('data', {}).get('text/plain', '')))]
            if widget and not any(k.startswith('image/') for o in outs for k in o.get('data', {})):
                bare.append(f"{nb.name} cell {i}: {''.join(widget[0]['data'].get('text/plain', ''))[:60]!r}")
    assert not bare, "widget outputs without a picture next to them:\n" + '\n'.join(bare)
