"""Ray job entrypoint: `ray job submit -- python -m jobs.index --config CONFIG [--set KEY=VALUE]`."""

import sys

from larcq_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["index", *sys.argv[1:]]))
