import sys
from pathlib import Path

# workloads.py is a plain module beside the benchmarks (benchmarks/ is not a package): importable
# under every pytest import mode, not only the default "prepend". `training` is an installed package.
sys.path.insert(0, str(Path(__file__).parent))
