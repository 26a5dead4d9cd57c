"""Ray job entrypoint: `ray job submit -- python -m jobs.eval_alm --config CONFIG --test-list FILE --task asr|aac
--out DIR [--set KEY=VALUE]`."""

import sys

from larcq_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval-alm", *sys.argv[1:]]))
