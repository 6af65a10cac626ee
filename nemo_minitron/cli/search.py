"""minitron search: architecture search under a parameter or memory budget (resumable)."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.search.stage import SearchConfig, search_architecture


def run(cfg) -> dict:
    return search_architecture(typed(SearchConfig, cfg, "search"))
