"""Training speed and peak memory of fp32 vs mixed precision for one architecture, through course_lib's Learner.

    python bench/fp16_speed.py --arch resnet50 --bs 64 --size 224 --steps 30          # on a CUDA GPU
    python bench/fp16_speed.py --arch resnet18 --bs 8 --size 64 --steps 3             # small enough for a CPU

Each mode runs in a fresh process (so peak memory is per mode), on one random batch repeated: the model has random
weights, which is fine for speed but says nothing about accuracy. Mixed precision is `MixedPrecision(dtype)` added
directly, so on a CPU it is measured even though `learn.to_fp16()` would keep fp32 there.
Peak memory: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the process's peak resident set (getrusage), shown
with the increase over the resident set just before the model was built.
"""
import argparse, json, os, resource, subprocess, sys, time

import torch
from torch import nn

def _rss_now_mb() -> float:
    "Current resident memory of this process (Linux /proc), in MiB."
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024
    return float('nan')

def _peak_rss_mb() -> float:
    "Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == 'darwin' else r / 1024

def _arch_kind(arch:str) -> str:
    import torchvision
    if arch in torchvision.models.list_models(module=torchvision.models): return 'torchvision'
    from course_lib import models
    if arch.startswith('efficientnet_lite') and hasattr(models, arch): return 'lite'
    from course_lib.export import registered_models
    if arch in registered_models(): return 'registered'
    raise SystemExit(f"unknown --arch {arch!r}: use a torchvision classification model name (resnet18, resnet50, ...), "
                     f"efficientnet_lite0-2, or one of {registered_models()}")

def build_model(arch:str, n_out:int) -> nn.Module:
    "A randomly initialised `arch`: a torchvision model name, or one of course_lib.models' architectures."
    kind = _arch_kind(arch)
    if kind == 'torchvision':
        import torchvision
        return torchvision.models.get_model(arch, weights=None, num_classes=n_out)
    if kind == 'lite':
        from course_lib import models
        return models.vision_model(arch=arch, n_out=n_out, pretrained=False)
    from course_lib.export import create_model
    return create_model(arch, n_out=n_out)

class _Batches:
    "`n` copies of one batch: a stand-in DataLoader with no loading cost."
    def __init__(self, xb, yb, n): self.xb, self.yb, self.n = xb, yb, n
    def __len__(self): return self.n
    def __iter__(self): return ((self.xb, self.yb) for _ in range(self.n))

def run_one(mode:str, a) -> dict:
    "Train `a.warmup + a.steps` batches in `mode` ('fp32', 'fp16', 'bf16'); time the last `a.steps`."
    from course_lib.loader import DataLoaders
    from course_lib.learner import Learner, Callback
    from course_lib.progress import ProgressCallback
    from course_lib.fp16 import MixedPrecision
    from course_lib._utils import sync_device
    from course_lib.cpu import tune_malloc
    tune_malloc()
    device = torch.device(a.device)
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rss_before = _rss_now_mb()
    model = build_model(a.arch, a.classes).to(device)
    xb = torch.randn(a.bs, 3, a.size, a.size, device=device)
    yb = torch.randint(0, a.classes, (a.bs,), device=device)
    dls = DataLoaders(_Batches(xb, yb, a.warmup + a.steps), _Batches(xb[:1], yb[:1], 1), device=device)

    def clock(): sync_device(device); return time.perf_counter()
    class Timer(Callback):
        """The clock after the last warm-up batch and after the last timed one (no sync in between: the GPU keeps its
        queue)."""
        order = 100
        def after_batch(self):
            if self.learn.training and self.learn.iter == a.warmup - 1: self.t_warm = clock()
        def after_train(self): self.t_end = clock()
    timer = Timer()
    cbs = [timer] + ([MixedPrecision(mode)] if mode != 'fp32' else [])
    learn = Learner(dls, model, lr=1e-3, cbs=cbs)
    learn.remove_cb(ProgressCallback)
    if device.type == 'cuda':
        torch.cuda.synchronize(device); torch.cuda.reset_peak_memory_stats(device)
    learn.fit(1)
    secs = timer.t_end - timer.t_warm
    res = dict(mode=mode, images_per_s=a.bs * a.steps / secs, step_ms=1e3 * secs / a.steps,
               skipped=getattr(learn.recorder, 'skipped_steps', 0))
    if device.type == 'cuda':
        res.update(peak_mb=torch.cuda.max_memory_allocated(device) / 2**20, mem_kind='max_memory_allocated')
    else:
        res.update(peak_mb=_peak_rss_mb(), rss_before_mb=rss_before, mem_kind='peak RSS')
    return res

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='resnet50')
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--steps', type=int, default=20, help='timed training steps per mode')
    p.add_argument('--warmup', type=int, default=2, help='untimed training steps first (cudnn/oneDNN kernel selection)')
    p.add_argument('--dtype', choices=['fp16', 'bf16'], default='fp16',
                   help='the mixed-precision dtype to compare with fp32')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--classes', type=int, default=37)
    p.add_argument('--threads', type=int, default=0, help='CPU threads (torch.set_num_threads); 0: torch default')
    p.add_argument('--child', choices=['fp32', 'fp16', 'bf16'], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for k in ('bs', 'size', 'steps', 'classes'):
        if getattr(a, k) < 1: p.error(f"--{k} must be >= 1, got {getattr(a, k)}")
    if a.warmup < 1: p.error(f"--warmup must be >= 1 (the first step includes one-time setup), got {a.warmup}")
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA GPU is available here; use --device cpu")

    if a.child:
        print(json.dumps(run_one(a.child, a)))
        return

    _arch_kind(a.arch)   # fail here, not in the child processes
    dev = torch.device(a.device)
    where = (torch.cuda.get_device_name(dev) if dev.type == 'cuda'
             else f'cpu, {a.threads or torch.get_num_threads()} threads')
    print(f"fp16_speed: {a.arch} (random init: measures speed, not accuracy), batch {a.bs}, {a.size}x{a.size} px, "
          f"{a.steps} timed steps after {a.warmup} warm-up, on {where}; torch {torch.__version__}")
    if dev.type == 'cpu':
        print(f"note: on a CPU learn.to_fp16() keeps fp32 (and to_bf16() measures first); {a.dtype} autocast is forced "
              "here to show what that avoids.")
    load, cores = os.getloadavg()[0], os.cpu_count()
    if load > 0.8 * cores:
        print(f"warning: this machine is busy (load average {load:.1f} on {cores} cores): timings are unreliable; "
              "on a CPU, --threads 1 is steadier")
    results = []
    for mode in ('fp32', a.dtype):
        args = [sys.executable, os.path.abspath(__file__), '--child', mode] + [
            f'--{k}={getattr(a, k)}' for k in ('arch', 'bs', 'size', 'steps', 'warmup', 'device', 'classes', 'threads')]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            raise SystemExit(f"the {mode} run failed (exit code {r.returncode}); its error is above")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    mem = results[0]['mem_kind']
    print(f"{'mode':<6}{'images/s':>10}{'ms/step':>10}{mem + ' MiB':>22}"
          + ("" if dev.type == 'cuda' else f"{'(+ over start)':>16}") + f"{'skipped':>9}")
    for r in results:
        extra = "" if dev.type == 'cuda' else f"{r['peak_mb'] - r['rss_before_mb']:>+16.0f}"
        print(f"{r['mode']:<6}{r['images_per_s']:>10.1f}{r['step_ms']:>10.1f}{r['peak_mb']:>22.0f}{extra}"
              f"{r['skipped']:>9}")
    f32, mp = results
    print(f"{a.dtype}/fp32: speed x{mp['images_per_s'] / f32['images_per_s']:.2f}, "
          f"{mem} x{mp['peak_mb'] / f32['peak_mb']:.2f}")

if __name__ == '__main__': main()
