"""Adaptive head selection: per request, how deep to draft from its recent acceptance.

Seed 003's "dynamic head selection". The engine's tree is static (one tree
mask for every request); what a request may change is how many of its BFS
nodes it drafts, i.e. how many heads it uses: drafting depth ``D`` means the
first ``nodes_at_depth[D]`` BFS nodes (every node of depth <= ``D``, capped
by whatever the batch size allows).

Per request the policy keeps an exponential moving average ``c[d]`` of the
*conditional* acceptance at depth ``d``: the chance that the accepted path
reaches depth ``d`` given that it reached depth ``d-1`` and depth ``d`` was
drafted (updated only on such steps, so it is unbiased by shallower drafts).
Then ``P[d] = c[1] * ... * c[d]`` is the chance of reaching depth ``d`` and a
step drafting depth ``D`` emits ``1 + P[1] + ... + P[D]`` tokens in
expectation at a relative step time ``step_cost(nodes_at_depth[D])``. The
policy drafts the depth with the most expected tokens per unit of step time:
depth ``d+1`` is worth drafting only while its expected gain ``P[d+1]`` pays
for the extra time its nodes cost. ``step_cost`` is an argument: the cost
curve ``medusa-vllm calibrate`` measured when the proposer has one, else
:func:`linear_cost` with :data:`DEFAULT_NODE_COST`.

A new request starts optimistic (``c[d] = prior``, by default 1: the whole
tree). A request whose heads keep missing soon drafts nothing; so that it can
recover, every ``probe_every`` steps it drafts one depth deeper than the
policy says (a probe), which is the only way its estimate can move again.

State lives per request id, is created on the request's first step and is
dropped when the request leaves the engine (:meth:`AdaptiveDepth.drop`), so
nothing leaks from one request to the next, even one reusing an id. Pure
Python: nothing here touches vLLM or torch; greedy output never depends on
it (it only changes how many nodes are drafted, and any BFS prefix of the
tree is verified exactly).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from medusa_vllm.core.tree import nodes_at_depth

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_NODE_COST",
    "DEFAULT_PROBE_EVERY",
    "AdaptiveDepth",
    "linear_cost",
    "nodes_at_depth",
]

# Relative step time of one drafted node (1.0 = a plain decode step) when no
# measured cost curve is available: on the 2-core CPU this was written on a
# 16-node tree measured ~1.86x a plain step for the SmolLM2-135M default model
# (about 0.05 per node); a conservative round figure, not a measurement of
# whatever machine runs it.
DEFAULT_NODE_COST = 0.05
DEFAULT_DECAY = 0.25  # EMA weight of the newest step (about the last 4-8 steps count)
DEFAULT_PROBE_EVERY = 8  # steps between probes one depth deeper than the policy's choice


def linear_cost(node_cost: float = DEFAULT_NODE_COST) -> Callable[[int], float]:
    """``step_cost(n) = 1 + node_cost * n``: the default cost model."""
    if not node_cost >= 0:
        raise ValueError(f"node_cost must be >= 0, found {node_cost!r}")
    return lambda n: 1.0 + node_cost * n


@dataclass
class _State:
    accept: list[float]  # c[d-1]: EMA of P(reach depth d | reached d-1, d drafted), d = 1..D
    since_probe: int = 0  # steps since this request last drafted deeper than its choice
    steps: int = 0
    observed: list[int] = field(default_factory=list)  # updates per depth (for inspection)


class AdaptiveDepth:
    """Per-request drafting depth from recent acceptance and node cost (module docstring).

    ``nodes_at_depth[d]``: how many BFS nodes drafting depth ``d`` takes (see
    :func:`nodes_at_depth`); ``step_cost(n)``: relative time of a step that
    drafts ``n`` nodes (``step_cost(0)`` is a plain decode step).
    """

    def __init__(
        self,
        nodes_at_depth: Sequence[int],
        step_cost: Callable[[int], float] | None = None,
        *,
        decay: float = DEFAULT_DECAY,
        prior: float = 1.0,
        probe_every: int = DEFAULT_PROBE_EVERY,
    ) -> None:
        nodes = [int(n) for n in nodes_at_depth]
        if not nodes or nodes[0] != 0 or any(b <= a for a, b in itertools.pairwise(nodes)):
            raise ValueError(
                f"nodes_at_depth must start at 0 and increase strictly, found {list(nodes_at_depth)}"
            )
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], found {decay!r}")
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"prior must be in [0, 1], found {prior!r}")
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 0:
            raise ValueError(f"probe_every must be an integer >= 0 (0: never), found {probe_every!r}")
        self.nodes_at_depth = nodes
        self.max_depth = len(nodes) - 1
        self.step_cost = step_cost or linear_cost()
        self.costs = [float(self.step_cost(n)) for n in nodes]
        if any(not c > 0 for c in self.costs):
            raise ValueError(f"step_cost must be > 0, found {dict(zip(nodes, self.costs))}")
        self.decay = float(decay)
        self.prior = float(prior)
        self.probe_every = probe_every
        self.states: dict[str, _State] = {}

    # ----------------------------------------------------------- policy
    def best_depth(self, accept: Sequence[float]) -> int:
        """The depth maximising expected tokens per unit of step time for the
        conditional acceptances ``accept`` (ties: the shallower depth)."""
        best, best_rate = 0, 1.0 / self.costs[0]
        tokens, reach = 1.0, 1.0
        for d in range(1, self.max_depth + 1):
            reach *= accept[d - 1]
            tokens += reach
            rate = tokens / self.costs[d]
            if rate > best_rate * (1.0 + 1e-9):
                best, best_rate = d, rate
        return best

    def _state(self, req_id: str) -> _State:
        state = self.states.get(req_id)
        if state is None:
            state = self.states[req_id] = _State(accept=[self.prior] * self.max_depth,
                                                 observed=[0] * self.max_depth)
        return state

    def depth(self, req_id: str) -> int:
        """This step's drafting depth for ``req_id`` (counts a step; may probe)."""
        state = self._state(req_id)
        state.steps += 1
        d = self.best_depth(state.accept)
        if d < self.max_depth and self.probe_every:
            state.since_probe += 1
            if state.since_probe >= self.probe_every:
                state.since_probe = 0
                return d + 1
        else:
            state.since_probe = 0
        return d

    def nodes(self, req_id: str) -> int:
        """This step's number of BFS nodes for ``req_id`` (:meth:`depth`'s nodes)."""
        return self.nodes_at_depth[self.depth(req_id)]

    def depth_of(self, num_nodes: int) -> int:
        """The depth a draft of the first ``num_nodes`` BFS nodes reaches (a level
        drafted only in part counts as drafted)."""
        if not 0 <= num_nodes <= self.nodes_at_depth[-1]:
            raise ValueError(
                f"depth_of: num_nodes must be in [0, {self.nodes_at_depth[-1]}], found {num_nodes}"
            )
        return bisect.bisect_left(self.nodes_at_depth, num_nodes)

    def observe(self, req_id: str, drafted_depth: int, accepted: int) -> None:
        """A verified step of ``req_id``: it drafted nodes down to ``drafted_depth``
        and its accepted path holds ``accepted`` draft tokens (depth reached)."""
        if drafted_depth <= 0:
            return
        if accepted > drafted_depth or accepted < 0:
            raise ValueError(
                f"observe({req_id!r}): accepted={accepted} outside [0, drafted_depth={drafted_depth}]"
            )
        state = self._state(req_id)
        a = self.decay
        for d in range(1, min(drafted_depth, accepted + 1, self.max_depth) + 1):
            hit = 1.0 if accepted >= d else 0.0
            state.accept[d - 1] += a * (hit - state.accept[d - 1])
            state.observed[d - 1] += 1

    def drop(self, req_id: str) -> None:
        """Forget ``req_id`` (it finished or was aborted); a later request with the
        same id starts fresh."""
        self.states.pop(req_id, None)

    def __len__(self) -> int:
        return len(self.states)
