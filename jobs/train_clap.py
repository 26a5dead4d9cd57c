"""Ray job entrypoint: `ray job submit -- python -m jobs.train_clap --config CONFIG [--lora] [--set KEY=VALUE]`."""

import sys

from larcq_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train-clap", *sys.argv[1:]]))
