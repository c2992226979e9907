"""`python -m nexus_dev`: the demo stack (fake upstreams + ext_proc + Envoy) in the foreground."""

import argparse

from nexus_dev.demo import add_demo_args, run_demo

parser = argparse.ArgumentParser(prog="python -m nexus_dev", description=__doc__)
add_demo_args(parser)
raise SystemExit(run_demo(parser.parse_args()))
