"""Test-wide settings: 8 host devices so sharding tests can build a mesh on one CPU, and a fast
CPU compile.

Most of the suite's time is XLA compiling small programs that then run once: LLVM's -O0
without its expensive passes compiles them about a third faster overall (the slowest 40 tests:
267 s -> 183 s on 2 cores) and runs them fast enough. Both flags have long been in XLA (an
unknown flag in XLA_FLAGS aborts the process). A caller's own XLA_FLAGS win.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("XLA_FLAGS", " ".join(_FLAGS))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
