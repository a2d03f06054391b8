"""`hydra/sweeper: grids`: Hydra's basic (cartesian) sweeper, plus a union of per-arm grids.

A study often compares arms that need different grids (every init x optimizer for a cheap MLP, one
setting for an expensive transformer). `hydra.sweeper.params` is swept as the basic sweeper sweeps
it, shared by every arm; `hydra.sweeper.grids` lists further {key: values} grids, each a cartesian
product, and the jobs are params x (grid 1 + grid 2 + ...), in that order. Precedence: params, then
the arm's grid, then the command line. Without `grids` it is the basic sweeper.

Hydra finds sweepers only in the `hydra_plugins` namespace package, hence this folder.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.jaxformer_grids_sweeper.grids_sweeper.GridsSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None  # shared by every arm
    grids: Optional[List[Dict[str, Any]]] = None  # one cartesian grid per arm


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf,
                             provider="jaxformer")


class GridsSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 grids: Optional[List[Dict[str, Any]]] = None) -> None:
        super().__init__(max_batch_size, params)
        self.grids = [dict(grid) for grid in grids or [{}]]

    def split_arguments(self, overrides: List[Override],  # type: ignore[override]
                        max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """BasicSweeper.sweep hands over params + command line; splice each arm's grid between."""
        n_params = len(self._parse_config())
        parser = OverridesParser.create()
        jobs: List[List[str]] = []
        for grid in self.grids:
            arm = parser.parse_overrides([f"{key}={value}" for key, value in grid.items()])
            merged = [*overrides[:n_params], *arm, *overrides[n_params:]]
            jobs += BasicSweeper.split_arguments(merged, None)[0]
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))
