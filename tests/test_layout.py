"""One idea per module: sizes, the Learner on one screen, no ctypes in the loop, lines of at most 120 characters."""
import ast, json, re
from pathlib import Path

ROOT = Path(__file__).parents[1]
MODULES = sorted(p for p in (ROOT/'course_lib').glob('*.py') if p.name != '_modidx.py')
GENERATED_ALL = re.compile(r"^(__all__ = \[|\s+'[^']*'(, '[^']*')*(,|\]))")   # nbdev writes the `__all__` lines


def test_no_module_over_400_lines():
    big = {p.name: n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"modules over 400 lines (split them by idea): {big}"


def test_learner_class_fits_on_one_screen_and_the_loop_imports_no_ctypes():
    src = (ROOT/'course_lib'/'learner.py').read_text()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == 'Learner')
    assert cls.end_lineno - cls.lineno + 1 <= 150, f"Learner is {cls.end_lineno - cls.lineno + 1} lines"
    assert 'ctypes' not in src, "the allocator tuning lives in course_lib/cpu.py, called explicitly"


def test_code_lines_are_at_most_120_characters():
    long = [f"{p.name}:{i}" for p in MODULES for i, l in enumerate(p.read_text().splitlines(), 1)
            if len(l) > 120 and not GENERATED_ALL.match(l)]
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            if c['cell_type'] == 'code':
                long += [f"{nb.name}:{c['id']}" for l in ''.join(c['source']).splitlines() if len(l) > 120]
    assert not long, f"lines over 120 characters: {long[:20]} ({len(long)} in all)"


def test_each_module_comes_from_its_own_notebook_in_course_order():
    """The notebooks' file order is the course's order: a module only imports modules of earlier notebooks. The one
    exception is an appendix (notebooks 9x, e.g. `95_cpu_allocator`): a module that imports nothing of course_lib may
    be called from anywhere, as `tune_malloc` is from the CLI and the setup cells."""
    order, appendix = {}, set()
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            m = re.match(r'#\|\s*default_exp\s+(\S+)', ''.join(c['source']))
            if c['cell_type'] == 'code' and m:
                order[m.group(1)] = len(order)
                if nb.name.startswith('9'): appendix.add(m.group(1))
    imports = {p.stem: re.findall(r'^from \.(\w+) import', p.read_text(), re.M) for p in MODULES}
    standalone = {a for a in appendix if not imports.get(a)}
    later = [f"{mod} imports {imp}" for mod, imps in imports.items() if mod in order for imp in imps
             if imp in order and order[imp] >= order[mod] and imp not in standalone]
    assert not later, f"a module imports one that a later notebook builds: {later}"
