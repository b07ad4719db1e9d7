"""vLLM-compatible model-server simulator: an engine model behind an OpenAI HTTP API.

`start_pool(configs)` hosts many simulated servers in one asyncio process;
`python -m epp.sim` (or `epp sim`) does the same from the command line.
"""

from epp.sim.config import PRESETS, SimConfig, load_configs
from epp.sim.pool import ServerHandle, start_pool, stop_pool

__all__ = ["PRESETS", "ServerHandle", "SimConfig", "load_configs", "start_pool", "stop_pool"]
