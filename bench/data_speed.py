"""Training-DataLoader images/s on the pets sample with the book's presizing settings:
Resize(460) item transform, aug_transforms(size=224, min_scale=0.75), bs 32, 3 passes over the training set.

Usage: python bench/data_speed.py [IMAGES_DIR] [--passes 3] [--bs 32]
(IMAGES_DIR defaults to $COURSE_LIB_DATA/oxford-iiit-pet-sample/images). Compare with fastai by running
../shared/bench/data_speed.py fastai IMAGES_DIR/.. in a separate venv that has fastai (never a dependency here)."""
import argparse, time
from pathlib import Path
import torch
from course_lib.all import *

ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
ap.add_argument('images', nargs='?', default=None)
ap.add_argument('--passes', type=int, default=3)
ap.add_argument('--bs', type=int, default=32)
args = ap.parse_args()
images = Path(args.images) if args.images else untar_data(URLs.PETS_SAMPLE)/'images'

pets = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                 splitter=RandomSplitter(seed=42), get_y=using_attr(RegexLabeller(r'(.+)_\d+.jpg$'), 'name'),
                 item_tfms=Resize(460), batch_tfms=aug_transforms(size=224, min_scale=0.75))
t_setup = time.time()
dls = pets.dataloaders(images, bs=args.bs)
t_setup = time.time() - t_setup
n, per_pass, t = 0, [], time.time()
for p in range(args.passes):
    tp, k = time.time(), 0
    for xb, yb in dls.train:
        assert xb.shape[1:] == (3, 224, 224), xb.shape
        k += len(xb)
    per_pass.append(k / (time.time() - tp)); n += k
dt = time.time() - t
print(f"course_lib {n/dt:.1f} img/s ({n} images in {dt:.1f}s; "
      f"per pass: {', '.join(f'{v:.0f}' for v in per_pass)} img/s; "
      f"device {dls.device}, {torch.get_num_threads()} torch threads, setup {t_setup:.1f}s)")
