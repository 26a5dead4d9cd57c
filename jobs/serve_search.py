"""Ray job entrypoint: `ray job submit -- python -m jobs.serve_search --config CONFIG [--set KEY=VALUE]`."""

import sys

from larcq_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve-search", *sys.argv[1:]]))
