import os
import sys

# Eight simulated CPU devices, for the sharded tests (tests/test_sharding.py); set before jax starts its CPU
# backend. Unsharded code runs on the first device as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Most of the suite's time is XLA:CPU compiling small programs once. LLVM's optimisation level changes how fast the
# generated code runs, not what it computes (no fast-math either way): at 0, compiles take 25-35% less time
# (tests/nn/test_remat.py 113 -> 73 s). The tests check numbers, never speed; bench/ measures speed at the
# default level. Set --xla_backend_optimization_level in XLA_FLAGS to test at another.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# Tests import the reference helpers as `reference`.
sys.path.insert(0, os.path.dirname(__file__))
