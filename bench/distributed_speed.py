"""Data-parallel training on this machine's CPU: one process against two (torchrun, gloo), same global batch (issue 19).

    python bench/distributed_speed.py                 # 1 and 2 processes, 3 runs each, the 296-photo sample
    python bench/distributed_speed.py --nprocs 1,2,4 --runs 1 --size 128

Each run is `torchrun --standalone --nproc-per-node N bench/distributed_speed.py --worker ...`: EfficientNet-Lite0 with
its ImageNet weights, body frozen, on the sample at --size pixels; the global batch is --bs photos (bs/N per process)
and the machine's cores are split between the processes (OMP_NUM_THREADS = cores // N). Epoch 1 decodes every photo
into the cache; the figure is epoch 2's training images/s (all processes together), timed on rank 0 between barriers.
Nothing is asserted: it prints what this machine did. On a 2-core CPU two processes share the same two cores, so
expect no speed-up from compute; on N GPUs each process has its own.
"""
import argparse, json, os, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args):
    "One process of the run: train two frozen epochs, print rank 0's JSON line of figures."
    import torch
    from course_lib.all import (untar_data, URLs, DataBlock, ImageBlock, CategoryBlock, get_image_files,
                                RandomSplitter, using_attr, RegexLabeller, Resize, aug_transforms, vision_learner,
                                accuracy, Callback)
    from course_lib.distributed import barrier, world_size, is_main, init_distributed, rank0_first
    init_distributed()
    images = rank0_first(untar_data, URLs.PETS_SAMPLE)/'images'   # a download, if any, happens once
    ws = world_size()
    pets = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                     splitter=RandomSplitter(0.2, seed=42), get_y=using_attr(RegexLabeller(r'(.+)_\d+\.\w+$'), 'name'),
                     item_tfms=Resize(args.size + args.size // 4), batch_tfms=aug_transforms(size=args.size))
    dls = pets.dataloaders(images, bs=args.bs // ws, seed=42, num_workers=max(1, torch.get_num_threads()))
    learn = vision_learner(dls, 'efficientnet_lite0', metrics=accuracy)

    class TrainTimer(Callback):
        "Seconds and photos of each training phase, between barriers so every process has finished."
        def before_fit(self): self.rows = []
        def before_train(self): barrier(); self.t0, self.n = time.perf_counter(), 0
        def after_batch(self):
            if self.learn.training: self.n += len(self.learn.yb[0])
        def after_train(self): barrier(); self.rows.append((time.perf_counter() - self.t0, self.n * ws))

    timer = TrainTimer()
    with learn.distrib_ctx(seed=42):
        learn.fit(2, 2e-3, cbs=[timer])
        valid = learn.recorder.values[-1]
    if is_main():
        (secs1, n1), (secs2, n2) = timer.rows
        print('RESULT ' + json.dumps(dict(nproc=ws, threads=torch.get_num_threads(), bs_per_process=args.bs // ws,
                                          epoch1_img_s=n1 / secs1, epoch2_img_s=n2 / secs2, photos=n2,
                                          valid_loss=valid[2], accuracy=valid[3])), flush=True)


def launch(nproc:int, args) -> dict:
    from course_lib.launch import torchrun
    threads = max(1, (os.cpu_count() or 1) // nproc)
    t0 = time.perf_counter()
    r = torchrun([__file__, '--worker', '--size', args.size, '--bs', args.bs], nproc=nproc, threads=threads,
                 timeout=args.timeout)
    lines = [l for l in r.stdout.splitlines() if l.startswith('RESULT ')]
    if r.returncode or not lines: raise SystemExit(f"the {nproc}-process run failed:\n{r.stdout[-3000:]}")
    return {**json.loads(lines[-1][7:]), 'wall_s': time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--nprocs', default='1,2', help="process counts to compare (default 1,2)")
    p.add_argument('--runs', type=int, default=3, help="runs of each (default 3)")
    p.add_argument('--size', type=int, default=128, help="training image size (default 128)")
    p.add_argument('--bs', type=int, default=32, help="global batch size (default 32)")
    p.add_argument('--timeout', type=float, default=900, help="seconds before a run is killed")
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker: return worker(args)
    nprocs = [int(s) for s in args.nprocs.split(',')]
    print(f"{os.cpu_count()} cores; global batch {args.bs}; {args.size} px; {args.runs} run(s) each", flush=True)
    print(f"{'processes':>9} {'threads':>7} {'bs/proc':>7} {'epoch 1 img/s':>14} {'epoch 2 img/s':>14} "
          f"{'wall s':>7} {'valid loss':>10}", flush=True)
    results = {}
    for run in range(args.runs):
        for n in nprocs:
            r = launch(n, args)
            results.setdefault(n, []).append(r)
            print(f"{n:>9} {r['threads']:>7} {r['bs_per_process']:>7} {r['epoch1_img_s']:>14.1f} "
                  f"{r['epoch2_img_s']:>14.1f} {r['wall_s']:>7.1f} {r['valid_loss']:>10.4f}", flush=True)
    base = statistics.median(r['epoch2_img_s'] for r in results[nprocs[0]])
    for n in nprocs:
        xs = [r['epoch2_img_s'] for r in results[n]]
        print(f"{n} process(es): epoch 2 {statistics.median(xs):.1f} img/s median ({min(xs):.1f}-{max(xs):.1f}), "
              f"{statistics.median(xs) / base:.2f}x the {nprocs[0]}-process figure")


if __name__ == '__main__':
    sys.exit(main())
