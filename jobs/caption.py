"""Ray job entrypoint: `ray job submit -- python -m jobs.caption --config CONFIG [--set KEY=VALUE]`."""

import sys

from larcq_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["caption", *sys.argv[1:]]))
