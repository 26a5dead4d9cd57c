"""Ray job entrypoint: `ray job submit -- python -m jobs.train_captioner --config CONFIG [--set KEY=VALUE]`."""

import sys

from larcq_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train-captioner", *sys.argv[1:]]))
