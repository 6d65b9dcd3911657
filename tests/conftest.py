import os
import sys

# Eight simulated CPU devices, for the sharded tests (tests/test_sharding.py); set before jax starts its CPU
# backend. Unsharded code runs on the first device as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# Tests import the reference helpers as `reference`.
sys.path.insert(0, os.path.dirname(__file__))
