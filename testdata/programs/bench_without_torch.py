"""bench.py generate --vs-hf as if torch and transformers were not installed. Run by tests.py with the checkout on
PYTHONPATH."""
import importlib.util
import sys

find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name in ("torch", "transformers") else find_spec(name, *a)

import bench  # noqa: E402 (after the patch above)

sys.exit(bench.main(["generate", "--vs_hf"]))
