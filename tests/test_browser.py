"""The course in JupyterLab, driven by a real browser: notebooks open, run through the UI and show their widgets.

A reader runs the course with `jupyter lab nbs/`, where the browser renders the outputs that `nbdev_test` never
shows: the `lr_picker` slider, tqdm's progress bar, the HTML epoch table. This test starts JupyterLab on a copy of
nbs/ (cells flagged `slow` or `cuda` blanked, as nbdev_test skips them), opens notebooks in headless Chromium with
Selenium, runs them with Run → Run All Cells and reads the page. Screenshots and logs: tests/browser_screenshots/.

It needs Chromium and chromedriver (`apt-get install -y chromium chromium-driver`) and the dev install (jupyterlab,
selenium: `pip install -e ".[dev]"`). Without them it skips, or fails where COURSE_LIB_BROWSER_TEST=required (CI).
COURSE_LIB_BROWSER_TIMEOUT (default 2400 s) bounds the whole module: past it, it fails and the processes are killed.
"""
import configparser, importlib.util, json, os, re, secrets, shutil, signal, socket, subprocess, sys, threading, time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault('SE_AVOID_STATS', 'true')   # Selenium sends no usage statistics (read when it starts a driver)

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(__file__).resolve().parent/'browser_screenshots'
SERVER_LOG, DRIVER_LOG = SHOTS/'jupyterlab.log', SHOTS/'chromedriver.log'
BUDGET = float(os.environ.get('COURSE_LIB_BROWSER_TIMEOUT') or 2400)


def _tst_flags() -> list:
    "settings.ini's tst_flags (cuda, slow): the flags of the cells nbdev_test skips."
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT/'settings.ini', encoding='utf-8')
    return cfg['DEFAULT'].get('tst_flags', '').split()


def _program(*names) -> str | None:
    "The first of `names` on PATH or in /usr/bin, else None."
    return next((p for n in names for p in [shutil.which(n) or f'/usr/bin/{n}'] if Path(p).is_file()), None)


FLAGGED = re.compile(r'^\s*#\|\s*(' + '|'.join(map(re.escape, _tst_flags())) + r')\b', re.M)
CHROMIUM, CHROMEDRIVER = _program('chromium', 'chromium-browser'), _program('chromedriver')
CHROME_ARGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
               '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
               '--disable-quic', '--window-size=1400,1000']
LAB_SETTINGS = {   # JupyterLab user settings: every cell stays in the DOM; no news or update prompts
    '@jupyterlab/notebook-extension/tracker.jupyterlab-settings': {'windowingMode': 'none'},
    '@jupyterlab/apputils-extension/notification.jupyterlab-settings': {'fetchNews': 'false', 'checkForUpdates': False},
}
EPOCH_COLUMNS = ['epoch', 'train_loss', 'valid_loss', 'error_rate', 'time']

pytestmark = pytest.mark.browser


# ---------------------------------------------------------------- requirements and the time budget

def missing_requirements() -> list:
    "What the test needs and this machine lacks, each with the command that installs it."
    apt, pip = 'apt-get install -y chromium chromium-driver', 'pip install -e ".[dev]"'
    found = {'chromium': CHROMIUM, 'chromedriver': CHROMEDRIVER,
             'selenium': importlib.util.find_spec('selenium'), 'jupyterlab': importlib.util.find_spec('jupyterlab')}
    how = {'chromium': apt, 'chromedriver': apt, 'selenium': pip, 'jupyterlab': pip}
    return [f'{name} (install: {how[name]})' for name, ok in found.items() if not ok]


def require_browser():
    "Skip (or fail, with COURSE_LIB_BROWSER_TEST=required) when the browser test cannot run here."
    missing = missing_requirements()
    if not missing: return
    msg = 'the browser test needs ' + ', '.join(missing)
    if os.environ.get('COURSE_LIB_BROWSER_TEST') == 'required': pytest.fail(msg + ' (COURSE_LIB_BROWSER_TEST=required)')
    pytest.skip(msg)


class Watchdog:
    "The module's time budget: at its end it runs `on_expiry` (kill the server and the browser) so no call hangs."
    def __init__(self, seconds: float):
        self.seconds, self.end, self.on_expiry, self.expired = seconds, time.monotonic() + seconds, [], False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self):
        self.expired = True
        for kill in self.on_expiry: kill()

    def left(self) -> float: return self.end - time.monotonic()
    def cancel(self): self._timer.cancel()
    def message(self, doing: str) -> str:
        return f"the browser test ran past COURSE_LIB_BROWSER_TIMEOUT={self.seconds:.0f} s while {doing}"


def kill_processes_mentioning(marker: str):
    "Kill the processes whose command line contains `marker` (a temporary path of ours: kernels, Chromium)."
    for proc in Path('/proc').glob('[0-9]*'):
        try: cmdline = (proc/'cmdline').read_bytes().decode(errors='replace')
        except OSError: continue
        if marker in cmdline and int(proc.name) != os.getpid():
            try: os.kill(int(proc.name), signal.SIGKILL)
            except OSError: pass


# ---------------------------------------------------------------- the course copy and the JupyterLab server

def copy_course(dest: Path) -> Path:
    """nbs/ copied to `dest`/nbs with the flagged cells' source replaced by a comment (an empty cell would get no
    prompt number); `dest` also gets settings.ini and a link to bench/, so paths relative to nbs/ still work."""
    shutil.copytree(ROOT/'nbs', dest/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc'))
    shutil.copy(ROOT/'settings.ini', dest)
    if (ROOT/'bench').is_dir(): (dest/'bench').symlink_to(ROOT/'bench')
    for nb_path in (dest/'nbs').glob('*.ipynb'):
        nb = json.loads(nb_path.read_text())
        for cell in nb['cells']:
            flag = FLAGGED.search(''.join(cell['source'])) if cell['cell_type'] == 'code' else None
            if flag: cell['source'] = [f'# a `{flag.group(1)}` cell: skipped here, as nbdev_test skips it']
        nb_path.write_text(json.dumps(nb, indent=1))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def lab_env(home: Path) -> dict:
    """The reader's environment, with Jupyter's config, runtime and settings in `home`. MPLBACKEND is dropped:
    ipykernel selects the inline backend only when it is unset, and with MPLBACKEND=Agg no figure would show."""
    env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}
    dirs = {'JUPYTER_CONFIG_DIR': 'config', 'JUPYTER_RUNTIME_DIR': 'runtime', 'IPYTHONDIR': 'ipython',
            'JUPYTERLAB_SETTINGS_DIR': 'settings', 'JUPYTERLAB_WORKSPACES_DIR': 'workspaces'}
    env.update({k: str(home/v) for k, v in dirs.items()})
    for name, settings in LAB_SETTINGS.items():
        (home/'settings'/name).parent.mkdir(parents=True, exist_ok=True)
        (home/'settings'/name).write_text(json.dumps(settings))
    return env


class Lab:
    "A JupyterLab server on 127.0.0.1 with a random port and token, serving `root`; `stop()` ends it and its kernels."
    def __init__(self, root: Path, home: Path):
        self.port, self.token, self.home = free_port(), secrets.token_hex(16), home
        self.url = f'http://127.0.0.1:{self.port}'
        cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1',
               f'--ServerApp.port={self.port}', '--ServerApp.port_retries=0', f'--IdentityProvider.token={self.token}',
               f'--ServerApp.root_dir={root}', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
        cmd += ['--allow-root'] if os.geteuid() == 0 else []   # CI containers run as root
        with open(SERVER_LOG, 'w') as log:
            self.proc = subprocess.Popen(cmd, cwd=root, env=lab_env(home), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def api(self, path: str, method: str = 'GET'):
        req = urllib.request.Request(f'{self.url}/api/{path}', method=method,
                                     headers={'Authorization': f'token {self.token}'})
        with urllib.request.urlopen(req, timeout=10) as r: return json.loads(r.read() or 'null')

    def is_up(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {self.proc.returncode} at start: see {SERVER_LOG}")
        try: return bool(self.api('status'))
        except OSError: return False

    def kernel_state(self, path: str) -> tuple:
        """(execution state, whether a browser tab is connected) of the kernel of notebook `path`, as the server
        knows it. Not the page's execution indicator: it says idle before the page has a kernel, and Run All Cells
        then clears the outputs and runs nothing."""
        for session in self.api('sessions'):
            kernel = session.get('kernel') or {}
            if session.get('path') == path: return kernel.get('execution_state'), kernel.get('connections', 0) > 0
        return None, False

    def shutdown_kernels(self):
        "Free the CPU for the next notebook (the 2-core machines this course is tested on feel every kernel)."
        try:
            for kernel in self.api('kernels'): self.api(f"kernels/{kernel['id']}", 'DELETE')
        except OSError: pass   # a dead server: the test has failed already, and stop() kills what is left

    def stop(self):
        "SIGTERM to the server's process group (it shuts its kernels down), SIGKILL if it lingers, then stray kernels."
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None: break
            try: os.killpg(self.proc.pid, sig)
            except ProcessLookupError: break   # the watchdog's thread got there first
            try: self.proc.wait(wait)
            except subprocess.TimeoutExpired: pass
        kill_processes_mentioning(str(self.home/'runtime'))   # kernels run in sessions of their own


# ---------------------------------------------------------------- the page

JS_CELLS = """
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
return panel ? [...panel.querySelectorAll('.jp-CodeCell')].map(c => ({
  prompt: (c.querySelector('.jp-InputPrompt') || {}).textContent || '',
  empty: !((c.querySelector('.cm-content') || {}).textContent || '').trim()})) : null;
"""
JS_ERRORS = """
const errors = [];
for (const out of document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output')) {
  const mime = out.dataset.mimeType || '', text = (out.textContent || '').trim();
  const traceback = /Traceback \\(most recent call last\\)|^\\w+(Error|Exception)\\b/m.test(text);
  if (!(mime.endsWith('.error') || (mime.endsWith('.stderr') && traceback))) continue;
  const cell = out.closest('.jp-CodeCell'), prompt = cell ? cell.querySelector('.jp-InputPrompt') : null;
  const code = cell ? (cell.querySelector('.cm-line') || {}).textContent : '';
  errors.push(`cell ${prompt ? prompt.textContent.trim() : '?'} (${code}): ${text.split('\\n').slice(-1)[0]}`);
}
return errors;
"""
JS_WATCH_PROGRESS = """
window.courseLibSawBar = false;
const bars = '.jp-NotebookPanel .widget-hprogress .progress-bar, .jp-NotebookPanel progress';
const seen = () => document.querySelector(bars);
new MutationObserver(() => { if (!window.courseLibSawBar && seen()) window.courseLibSawBar = true; })
  .observe(document.body, {childList: true, subtree: true});
"""
JS_CELL_WITH = """
for (const cell of document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')) {
  const code = [...cell.querySelectorAll('.cm-line')].map(l => l.textContent).join('\\n');
  if (code.includes(arguments[0])) return cell;
}
return null;
"""


class Page:
    """One notebook open in JupyterLab in the browser, as a context manager: on exit its screenshot is saved, and a
    failure after the watchdog fired says so. Failures name the notebook, its screenshot and the server log."""
    def __init__(self, driver, lab: Lab, dog: Watchdog, name: str):
        self.driver, self.lab, self.dog, self.name, self.dialogs = driver, lab, dog, name, []
        self.shot, self.path = SHOTS/f'{name}.png', f'nbs/{name}.ipynb'

    def __enter__(self):
        try: self.open()
        except BaseException: self.__exit__(*sys.exc_info()); raise
        return self

    def __exit__(self, kind, error, tb):
        self.screenshot()
        print(f"screenshot of {self.name}: {self.shot}")
        if kind is not None and self.dog.expired and not isinstance(error, pytest.fail.Exception):
            pytest.fail(self.dog.message(f'running {self.name} (screenshot {self.shot}, server log {SERVER_LOG})'))

    def fail(self, what: str):
        self.screenshot()
        seen = f"; dialogs seen: {self.dialogs}" if self.dialogs else ''
        pytest.fail(f"{self.name}: {what} (screenshot {self.shot}, server log {SERVER_LOG}{seen})")

    def screenshot(self):
        try: self.driver.save_screenshot(str(self.shot))
        except Exception: pass   # a dead browser: the message still names the log

    def js(self, script: str, *args): return self.driver.execute_script(script, *args)

    def cells(self) -> list:
        "Each code cell's prompt (`[3]:`, `[*]:` or `[ ]:`) and whether its source is empty."
        return self.js(JS_CELLS) or []

    def wait(self, cond, what: str, timeout: float = 300, every: float = 1.0):
        "Poll `cond()` until it is truthy (dismissing any dialog); fail saying what was awaited."
        end = time.monotonic() + timeout
        while True:
            self.dismiss_dialogs()
            res = cond()
            if res: return res
            if self.dog.left() <= 0: self.fail(self.dog.message(f'waiting for {what}'))
            if time.monotonic() > end: self.fail(f'no {what} after {timeout:.0f} s')
            time.sleep(every)

    def dismiss_dialogs(self):
        "Accept any modal dialog (kernel selection, a prompt), keeping its text for the failure message."
        for dialog in self.driver.find_elements('css selector', '.jp-Dialog'):
            self.dialogs.append(' '.join(dialog.text.split())[:200])
            for button in dialog.find_elements('css selector', '.jp-Dialog-button.jp-mod-accept'): button.click()

    def open(self):
        "Open the notebook in a workspace of its own (no tab restored from an earlier page), wait for an idle kernel."
        self.driver.get(f'{self.lab.url}/lab/workspaces/{self.name}/tree/{self.path}?token={self.lab.token}')
        self.wait(self.cells, 'notebook cells on the page')
        self.wait(lambda: self.lab.kernel_state(self.path) == ('idle', True), 'idle kernel connected to the page',
                  timeout=180)

    def click_menu(self, menu: str, label: str):
        "Click the menu bar's `menu`, then its item `label`, as a reader does."
        top = f"//li[contains(@class, 'lm-MenuBar-item')][normalize-space()='{menu}']"
        self.driver.find_element('xpath', top).click()
        item = (f"//li[contains(@class, 'lm-Menu-item')]"
                f"[.//div[contains(@class, 'lm-Menu-itemLabel')][normalize-space()='{label}']]")
        self.wait(lambda: self.driver.find_elements('xpath', item), f'item {label!r} in the {menu} menu', timeout=30)
        self.driver.find_element('xpath', item).click()

    def run_all(self):
        "Run → Run All Cells; wait until the kernel is idle and no cell is queued; fail on an error or a cell left."
        self.click_menu('Run', 'Run All Cells')
        self.wait(lambda: any(re.search(r'[\d*]', c['prompt']) for c in self.cells()),
                  'cell queued ([*]) or run after Run All Cells', timeout=60)
        self.wait(self.finished, 'end of Run All Cells', timeout=max(self.dog.left(), 1))
        errors = self.js(JS_ERRORS)
        if errors: self.fail('error output in ' + '; '.join(errors))
        cells = self.cells()
        not_run = [c['prompt'] for c in cells if not c['empty'] and not re.search(r'\d', c['prompt'])]
        if not_run: self.fail(f'{len(not_run)} code cells have no execution number after Run All')

    def finished(self) -> bool:
        "The kernel is idle, no cell is queued, and a cell has run (or failed): Run All has ended."
        kernel, _ = self.lab.kernel_state(self.path)
        if kernel in (None, 'dead'): self.fail(f"the notebook's kernel is {kernel or 'gone'} during Run All Cells")
        prompts = [c['prompt'] for c in self.cells()]
        ran = any(re.search(r'\d', p) for p in prompts) or self.js(JS_ERRORS)
        return kernel == 'idle' and not any('*' in p for p in prompts) and bool(ran)

    def cell_with(self, code: str):
        "The code cell whose source contains `code`."
        return self.js(JS_CELL_WITH, code) or self.fail(f'no code cell contains {code!r}')

    def show(self, element):
        self.js("arguments[0].scrollIntoView({block: 'center'})", element)
        time.sleep(0.5)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def watchdog():
    require_browser()
    dog = Watchdog(BUDGET)
    yield dog
    dog.cancel()


@pytest.fixture(scope='module')
def lab(watchdog, tmp_path_factory):
    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob('*.png'): old.unlink()   # no screenshot of an earlier run passes for this one's
    print(f"browser screenshots and logs: {SHOTS}")
    course = copy_course(tmp_path_factory.mktemp('course'))
    server = Lab(course, tmp_path_factory.mktemp('jupyter'))
    watchdog.on_expiry.append(server.stop)
    try:
        end = time.monotonic() + 180
        while not server.is_up():
            if watchdog.expired or time.monotonic() > end: pytest.fail(f"JupyterLab did not answer: see {SERVER_LOG}")
            time.sleep(1)
        yield server
    finally: server.stop()


@pytest.fixture(scope='module')
def browser(watchdog, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tmp_path_factory.mktemp('chromium-profile')
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS + [f'--user-data-dir={profile}']: options.add_argument(arg)
    watchdog.on_expiry.append(lambda: kill_processes_mentioning(str(profile)))
    try:
        service = Service(CHROMEDRIVER, service_args=['--log-level=WARNING'], log_output=str(DRIVER_LOG))
        driver = webdriver.Chrome(service=service, options=options)
    except Exception as e:
        kill_processes_mentioning(str(profile))
        pytest.fail(f"Chromium did not start through {CHROMEDRIVER}: {type(e).__name__}: {e} (see {DRIVER_LOG})")
    try:
        driver.set_page_load_timeout(180)
        yield driver
    finally:
        try: driver.quit()
        except Exception: pass
        kill_processes_mentioning(str(profile))


@pytest.fixture
def notebook(lab, browser, watchdog):
    "`with notebook(name) as page:` that notebook open in the browser; afterwards every kernel is shut down."
    yield lambda name: Page(browser, lab, watchdog, name)
    if not watchdog.expired: lab.shutdown_kernels()


# ---------------------------------------------------------------- the tests

def test_lr_finder_runs_and_its_picker_moves(notebook):
    with notebook('05_lr_finder') as page:
        page.run_all()
        check_finder_figure(page)
        check_picker_moves(page)


def check_finder_figure(page: Page):
    finder = page.cell_with('lr_min, lr_steep = learn.lr_find()')
    if not finder.find_elements('css selector', '.jp-RenderedImage img'): page.fail("lr_find's cell shows no figure")


def check_picker_moves(page: Page):
    "lr_picker renders a slider and a figure; five right-arrow presses on the slider change the lr and redraw it."
    from selenium.webdriver.common.keys import Keys
    picker = page.cell_with('picker = lr_picker(r)')
    slider = page.wait(lambda: picker.find_elements('css selector', '.widget-slider .noUi-handle'),
                       "lr_picker's slider (the widget did not render)", timeout=60)[0]
    page.show(picker)
    before = picker_state(picker)
    if not before['img']: page.fail("lr_picker shows no figure inside its Output widget")
    slider.send_keys(*[Keys.ARROW_RIGHT] * 5)   # noUiSlider's handle takes focus and moves one step per key
    page.wait(lambda: moved(picker, before), f"new lr (was {before['readout']}) and redrawn figure after moving the "
              "slider", timeout=120)
    page.show(picker)


def picker_state(picker) -> dict:
    "The slider's readout and the src of the figure drawn in the widget's Output."
    readout = picker.find_elements('css selector', '.widget-slider .widget-readout')
    imgs = picker.find_elements('css selector', '.widget-output img, .jupyter-widgets-output-area img')
    return {'readout': readout[0].text if readout else None, 'img': imgs[0].get_attribute('src') if imgs else None}


def moved(picker, before: dict):
    now = picker_state(picker)
    return now if now['img'] and now['readout'] != before['readout'] and now['img'] != before['img'] else None


def test_fit_shows_a_progress_bar_and_an_epoch_table(notebook):
    with notebook('04e_export') as page:
        page.js(JS_WATCH_PROGRESS)
        page.run_all()
        check_progress_and_table(page)


def check_progress_and_table(page: Page):
    "A tqdm widget bar appeared during the run (it closes at the end of fit); the epoch table is HTML, one row."
    if not page.js('return window.courseLibSawBar'): page.fail("fit's progress bar never appeared as a widget")
    fit = page.cell_with('learn.fit_one_cycle(1, 3e-3)')
    tables = fit.find_elements('css selector', '.jp-RenderedHTMLCommon table')
    if not tables: page.fail("fit's cell shows no HTML epoch table")
    page.show(tables[0])
    header = [th.text for th in tables[0].find_elements('css selector', 'thead th')]
    rows = tables[0].find_elements('css selector', 'tbody tr')
    if header != EPOCH_COLUMNS or len(rows) != 1: page.fail(f"epoch table has columns {header} and {len(rows)} rows")
