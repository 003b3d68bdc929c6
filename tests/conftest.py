import os
import sys

# Tests run on the CPU; several tests fake multiple host devices themselves in subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
