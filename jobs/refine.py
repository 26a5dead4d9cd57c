"""Ray job entrypoint: `ray job submit -- python -m jobs.refine --config CONFIG [--set KEY=VALUE]`."""

import sys

from larcq_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["refine", *sys.argv[1:]]))
