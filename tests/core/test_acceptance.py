"""Tests for medusa_vllm.core.acceptance: greedy, typical and lossless tree rejection sampling.

- greedy / typical are compared with plain per-request, per-path reference
  loops on random prefix-closed trees, random logits and random absent nodes;
- rejection sampling is checked statistically: the emitted token sequences
  must follow the target's autoregressive distribution (chi-square goodness of
  fit on exactly enumerated outcomes), and deliberately biased samplers must
  fail the same test (the test has power).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from medusa_vllm.core.acceptance import (
    AcceptanceParams,
    AcceptanceResult,
    AcceptanceRule,
    greedy_accept,
    greedy_accept_argmax,
    rejection_accept,
    tree_accept,
    typical_accept,
)
from medusa_vllm.core.tree import MedusaTree

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------ helpers
@st.composite
def medusa_choices(draw, max_nodes: int = 12, max_depth: int = 4, max_rank: int = 3):
    """A random prefix-closed set of paths, in random order."""
    paths: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(1, max_nodes))):
        parents = [()] + [p for p in paths if len(p) < max_depth]
        parent = draw(st.sampled_from(parents))
        child = (*parent, draw(st.integers(0, max_rank)))
        if child not in paths:
            paths.append(child)
    return [list(p) for p in draw(st.permutations(paths))]


def tree_parents(tree: MedusaTree) -> list[int]:
    """Parent of each node, derived from the paths only."""
    index = {p: i for i, p in enumerate(tree.paths)}
    return [-1] + [index[p[:-1]] for p in tree.paths[1:]]


def leaf_paths(tree: MedusaTree) -> list[list[int]]:
    """Candidate root->leaf node lists in retrieve order, checked against the paths."""
    parents = tree_parents(tree)
    out = [[n for n in row if n >= 0] for row in tree.retrieve_indices.tolist()]
    for nodes in out:
        assert nodes[0] == 0
        assert all(parents[b] == a for a, b in zip(nodes, nodes[1:]))
    return out


def first_argmax(row: Sequence[float]) -> int:
    return max(range(len(row)), key=lambda v: (row[v], -v))


def ref_greedy(tree: MedusaTree, draft: list[int], logits: list[list[float]]):
    """Per path: accept while the token equals the argmax at its parent."""
    parents = tree_parents(tree)
    best: list[int] | None = None
    for nodes in leaf_paths(tree):
        acc = [0]
        for node in nodes[1:]:
            if draft[node] == -1 or draft[node] != first_argmax(logits[parents[node]]):
                break
            acc.append(node)
        if best is None or len(acc) > len(best):
            best = acc
    assert best is not None
    return best, first_argmax(logits[best[-1]])


def softmax(row: Sequence[float], temperature: float) -> list[float]:
    m = max(x / temperature for x in row)
    e = [math.exp(x / temperature - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def ref_typical(tree, draft, logits, temperature, eps, alpha):
    """Per path: accept while p_parent(x) > min(eps, alpha * exp(-H(p_parent)))."""
    if temperature == 0:
        return ref_greedy(tree, draft, logits)[0]
    parents = tree_parents(tree)
    probs = [softmax(row, temperature) for row in logits]
    thresholds = []
    for p in probs:
        entropy = -sum(x * math.log(x) for x in p if x > 0)
        thresholds.append(min(eps, alpha * math.exp(-entropy)))
    best, best_score = None, -math.inf
    for nodes in leaf_paths(tree):
        acc, score = [0], 0.0
        for node in nodes[1:]:
            par = parents[node]
            if draft[node] == -1 or not probs[par][draft[node]] > thresholds[par]:
                break
            acc.append(node)
            score += math.log(probs[par][draft[node]])
        if best is None or len(acc) > len(best) or (len(acc) == len(best) and score > best_score):
            best, best_score = acc, score
    return best


def check_invariants(res: AcceptanceResult, tree: MedusaTree, draft: torch.Tensor) -> None:
    """Shape and consistency contract of AcceptanceResult."""
    b, d1 = draft.shape[0], tree.max_depth + 1
    for t in (res.accepted_nodes, res.output_tokens):
        assert t.shape == (b, d1) and t.dtype == torch.long
    assert res.num_accepted.shape == (b,) and res.last_node.shape == (b,)
    parents = tree_parents(tree)
    for i in range(b):
        n = int(res.num_accepted[i])
        nodes = res.accepted_nodes[i].tolist()
        out = res.output_tokens[i].tolist()
        assert nodes[0] == 0
        assert all(x >= 0 for x in nodes[: n + 1]) and all(x == -1 for x in nodes[n + 1:])
        assert all(parents[nodes[t]] == nodes[t - 1] for t in range(1, n + 1))
        assert out[:n] == [int(draft[i, nodes[t]]) for t in range(1, n + 1)]
        assert all(tok >= 0 for tok in out[: n + 1]) and all(tok == -1 for tok in out[n + 1:])
        assert int(res.last_node[i]) == nodes[n]
        assert int(res.bonus_tokens[i]) == out[n]


def make_draft(gen: torch.Generator, tree: MedusaTree, b: int, v: int,
               guide: torch.Tensor | None, absent: float) -> torch.Tensor:
    """Random drafts; with prob 1/2 a node copies ``guide`` at its parent
    (deep acceptance); each node is absent (-1) with probability ``absent``."""
    n1 = tree.num_nodes + 1
    draft = torch.randint(0, v, (b, n1), generator=gen)
    if guide is not None:
        parents = tree.parents.clamp(min=0)
        copy = torch.rand(b, n1, generator=gen) < 0.5
        draft = torch.where(copy, guide[:, parents], draft)
    gone = torch.rand(b, n1, generator=gen) < absent
    gone[:, 0] = False
    return torch.where(gone, -1, draft)


# ------------------------------------------------------- greedy vs reference
@SETTINGS
@given(choices=medusa_choices(), seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4),
       v=st.integers(2, 8), absent=st.sampled_from([0.0, 0.1, 0.4]))
def test_greedy_matches_reference(choices, seed, b, v, absent):
    tree = MedusaTree(choices)
    gen = torch.Generator().manual_seed(seed)
    # small integer logits: frequent argmax ties (first index wins in both)
    logits = torch.randint(-2, 3, (b, tree.num_nodes + 1, v), generator=gen).double()
    draft = make_draft(gen, tree, b, v, logits.argmax(-1), absent)
    res = greedy_accept(tree, draft, logits)
    fast = greedy_accept_argmax(tree, draft, logits.argmax(-1))
    for r in (res, fast):
        check_invariants(r, tree, draft)
        for i in range(b):
            nodes, bonus = ref_greedy(tree, draft[i].tolist(), logits[i].tolist())
            assert r.accepted_nodes[i, : len(nodes)].tolist() == nodes
            assert int(r.num_accepted[i]) == len(nodes) - 1
            assert int(r.bonus_tokens[i]) == bonus
    assert torch.equal(fast.output_tokens, res.output_tokens)


def test_greedy_accept_argmax_rejects_logits_and_bad_shapes():
    tree = MedusaTree([[0], [1], [0, 0]])
    draft = torch.tensor([[0, 3, 4, 5]])
    with pytest.raises(ValueError, match="target_argmax must be an integer tensor shaped like"):
        greedy_accept_argmax(tree, draft, torch.zeros(1, 4, 7))
    with pytest.raises(ValueError, match="target_argmax must be an integer tensor shaped like"):
        greedy_accept_argmax(tree, draft, torch.zeros(1, 3, dtype=torch.long))


# ------------------------------------------------------ typical vs reference
@SETTINGS
@given(choices=medusa_choices(), seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4),
       v=st.integers(2, 8), absent=st.sampled_from([0.0, 0.1, 0.4]))
def test_typical_matches_reference(choices, seed, b, v, absent):
    tree = MedusaTree(choices)
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(b, 1, 1, generator=gen, dtype=torch.float64) * 4 + 0.2
    logits = torch.randn(b, tree.num_nodes + 1, v, generator=gen, dtype=torch.float64) * scale
    # tokens masked to -inf (as vLLM logits processors do), never a row's maximum
    masked = (torch.rand(logits.shape, generator=gen) < 0.2) & (logits < logits.amax(-1, True))
    logits = logits.masked_fill(masked, -math.inf)
    draft = make_draft(gen, tree, b, v, logits.argmax(-1), absent)
    temperature = torch.rand(b, generator=gen, dtype=torch.float64) * 1.8 + 0.2
    temperature[torch.rand(b, generator=gen) < 0.25] = 0.0
    eps = torch.rand(b, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    alpha = torch.rand(b, generator=gen, dtype=torch.float64)
    res = typical_accept(tree, draft, logits, temperature, eps, alpha,
                         generator=torch.Generator().manual_seed(seed))
    check_invariants(res, tree, draft)
    for i in range(b):
        nodes = ref_typical(tree, draft[i].tolist(), logits[i].tolist(),
                            float(temperature[i]), float(eps[i]), float(alpha[i]))
        assert res.accepted_nodes[i, : len(nodes)].tolist() == nodes
        assert int(res.num_accepted[i]) == len(nodes) - 1
        if temperature[i] == 0:
            assert int(res.bonus_tokens[i]) == first_argmax(logits[i, nodes[-1]].tolist())


def test_typical_float32_logits_agree_with_float64():
    tree = MedusaTree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, tree.num_nodes + 1, 50, generator=gen) * 3
    draft = make_draft(gen, tree, 64, 50, logits.argmax(-1), 0.1)
    a = typical_accept(tree, draft, logits, 0.7)
    b = typical_accept(tree, draft, logits.double(), 0.7)
    assert torch.equal(a.accepted_nodes, b.accepted_nodes)
    assert (a.num_accepted > 0).any()


@SETTINGS
@given(choices=medusa_choices(max_nodes=10), seed=st.integers(0, 2**31 - 1),
       v=st.integers(4, 8), data=st.data())
def test_truncated_tree_equals_absent_suffix(choices, seed, v, data):
    """Marking nodes >= n absent is the same as verifying tree.truncate(n)."""
    tree = MedusaTree(choices)
    n = data.draw(st.integers(0, tree.num_nodes))
    small = tree.truncate(n)
    gen = torch.Generator().manual_seed(seed)
    b = 3
    logits = torch.randn(b, tree.num_nodes + 1, v, generator=gen, dtype=torch.float64) * 2
    # distinct sibling tokens so that the accepted path is unique
    draft = torch.empty(b, tree.num_nodes + 1, dtype=torch.long)
    for i in range(b):
        for parent in range(tree.num_nodes + 1):
            kids = [k for k in tree.children[parent].tolist() if k >= 0]
            toks = torch.randperm(v, generator=gen)[: len(kids)]
            best = logits[i, parent].argmax()
            if kids and best not in toks and torch.rand(1, generator=gen) < 0.7:
                toks[0] = best  # keep the argmax reachable
            draft[i, kids] = toks
        draft[i, 0] = 0
    draft_full = draft.clone()
    draft_full[:, n + 1:] = -1
    for fn in (greedy_accept, lambda t, d, lg: typical_accept(t, d, lg, 0.8, 0.2, 0.5)):
        full = fn(tree, draft_full, logits)
        cut = fn(small, draft[:, : n + 1], logits[:, : n + 1])
        width = small.max_depth + 1
        assert torch.equal(full.accepted_nodes[:, :width], cut.accepted_nodes)
        assert (full.accepted_nodes[:, width:] == -1).all()
        assert torch.equal(full.num_accepted, cut.num_accepted)


# ---------------------------------------------------- hand-worked examples
def test_greedy_chain_example():
    tree = MedusaTree.chain(3)
    logits = torch.full((1, 4, 5), -1.0)
    for node, best in enumerate([2, 4, 1, 3]):  # target argmax after each node
        logits[0, node, best] = 1.0
    draft = torch.tensor([[2, 2, 4, 0]])  # node 3 (token 0) != argmax 1 at node 2
    res = greedy_accept(tree, draft, logits)
    assert res.accepted_nodes.tolist() == [[0, 1, 2, -1]]
    assert res.num_accepted.tolist() == [2]
    assert res.output_tokens.tolist() == [[2, 4, 1, -1]]
    assert res.last_node.tolist() == [2]


def test_greedy_duplicate_siblings_take_first_path():
    tree = MedusaTree([[0], [1]])
    logits = torch.tensor([[[0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    res = greedy_accept(tree, torch.tensor([[0, 1, 1]]), logits)
    assert res.accepted_nodes.tolist() == [[0, 1]]
    assert res.output_tokens.tolist() == [[1, 0]]  # bonus = argmax after node 1


def test_typical_ties_broken_by_likelihood():
    """Both depth-1 candidates pass; the likelier one (node 2) wins."""
    tree = MedusaTree([[0], [1]])
    logits = torch.zeros(1, 3, 4)
    logits[0, 0] = torch.tensor([0.0, 1.0, 2.0, -5.0])
    res = typical_accept(tree, torch.tensor([[0, 1, 2]]), logits, 1.0, 0.09, 0.3)
    assert res.accepted_nodes.tolist() == [[0, 2]]
    # swapping the drafts swaps the winner: retrieve order does not decide
    res = typical_accept(tree, torch.tensor([[0, 2, 1]]), logits, 1.0, 0.09, 0.3)
    assert res.accepted_nodes.tolist() == [[0, 1]]


def test_typical_rejects_below_threshold_and_absent():
    tree = MedusaTree.chain(2)
    logits = torch.zeros(1, 3, 4)  # uniform: p = 0.25, H = log 4, δ e^-H = 0.075
    draft = torch.tensor([[0, 3, 1]])
    assert typical_accept(tree, draft, logits, 1.0, 0.09, 0.3).num_accepted.tolist() == [2]
    # threshold min(0.3, 1.01 * 0.25) = 0.2525 > 0.25: rejected at depth 1
    assert typical_accept(tree, draft, logits, 1.0, 0.3, 1.01).num_accepted.tolist() == [0]
    absent = torch.tensor([[0, -1, 1]])
    assert typical_accept(tree, absent, logits, 1.0, 0.09, 0.3).num_accepted.tolist() == [0]


def test_rejection_point_mass_and_zero_probability_drafts():
    tree = MedusaTree([[0], [1], [0, 0]])
    probs = torch.zeros(1, 4, 4)
    probs[0, 0, 3] = 1.0  # root: always token 3
    probs[0, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    probs[0, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    probs[0, 3] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    # draft token 2 has p = 0 -> never accepted; node 2 (token 3) always accepted
    for _ in range(20):
        res = rejection_accept(tree, torch.tensor([[0, 2, 3, 0]]), probs, generator=gen)
        assert res.accepted_nodes.tolist() == [[0, 2, -1]]
        assert res.output_tokens.tolist() == [[3, 1, -1]]
    # node 1 (token 3) always accepted, then node 3 (token 2, p = 1) always accepted
    res = rejection_accept(tree, torch.tensor([[0, 3, 0, 2]]), probs, generator=gen)
    assert res.accepted_nodes.tolist() == [[0, 1, 3]]
    assert res.output_tokens.tolist()[0][:2] == [3, 2]
    assert res.output_tokens[0, 2] in (0, 1)


# --------------------------------------------- rejection sampling: statistics
V_STAT = 6
N_SAMPLES = 60_000
STAT_TREES = {
    "chain": [[0], [0, 0], [0, 0, 0]],
    "wide": [[0], [1], [2], [3]],
    "mixed": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]],
}


def stat_case(name: str, seed: int):
    """Tree, drafts and target probs for the chi-square tests.

    Drafts include duplicate siblings and tokens with target probability 0;
    nodes with the same token prefix share one target row (as a real target
    model would), so the target is a function of the prefix.
    """
    tree = MedusaTree(STAT_TREES[name])
    gen = torch.Generator().manual_seed(seed)
    n1 = tree.num_nodes + 1
    parents = tree_parents(tree)
    rows: dict[tuple[int, ...], torch.Tensor] = {}

    def row(prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in rows:
            p = torch.rand(V_STAT, generator=gen, dtype=torch.float64) ** 2
            p[torch.randperm(V_STAT, generator=gen)[:2]] = 0.0  # tokens with p = 0
            rows[prefix] = p / p.sum()
        return rows[prefix]

    root = row(())
    draft = torch.randint(0, V_STAT, (n1,), generator=gen)
    for node in range(1, n1):  # make duplicate siblings likely
        sibs = [k for k in range(1, node) if parents[k] == parents[node]]
        if sibs and torch.rand(1, generator=gen) < 0.4:
            draft[node] = draft[sibs[-1]]
    kids = [k for k in range(1, n1) if parents[k] == 0]
    draft[kids[0]] = int(root.argmax())  # a likely draft ...
    if len(kids) > 1:  # ... and one the target never produces
        draft[kids[-1]] = int((root == 0).nonzero()[0])
    probs = torch.stack([
        row(tuple(int(draft[k]) for k in path_nodes(parents, node)[1:])) for node in range(n1)
    ])
    return tree, draft, probs


def path_nodes(parents: list[int], node: int) -> list[int]:
    out = [node]
    while out[-1] != 0:
        out.append(parents[out[-1]])
    return out[::-1]


def child_with_token(tree: MedusaTree, draft: Sequence[int], node: int, tok: int) -> int | None:
    """First present child (rank order) of ``node`` drafting ``tok``."""
    for k in tree.children[node].tolist():
        if k >= 0 and draft[k] == tok:
            return k
    return None


def exact_outcomes(tree: MedusaTree, draft: Sequence[int], probs: torch.Tensor):
    """Outcome -> probability under autoregressive sampling from the target.

    An outcome is the token tuple up to and including the first token that
    leaves the tree; its probability is the product of the target
    probabilities at each prefix.
    """
    out: dict[tuple[int, ...], float] = {}

    def walk(node: int, prefix: tuple[int, ...], prob: float) -> None:
        for tok in range(probs.shape[1]):
            p = float(probs[node, tok])
            if p == 0:
                continue
            nxt = child_with_token(tree, draft, node, tok)
            if nxt is None:
                out[(*prefix, tok)] = out.get((*prefix, tok), 0.0) + prob * p
            else:
                walk(nxt, (*prefix, tok), prob * p)

    walk(0, (), 1.0)
    return out


def to_outcome(tree: MedusaTree, draft: Sequence[int], tokens: Sequence[int]):
    """Truncate emitted tokens just after the first one that leaves the tree."""
    node = 0
    for i, tok in enumerate(tokens):
        nxt = child_with_token(tree, draft, node, tok)
        if nxt is None:
            return tuple(tokens[: i + 1])
        node = nxt
    return ("incomplete", *tokens)  # never leaves the tree: impossible outcome


def gof(tree, draft, probs, samples: Counter) -> tuple[float, float, int]:
    """Chi-square of observed outcome counts vs the exact target distribution."""
    expected = exact_outcomes(tree, draft.tolist(), probs)
    total = sum(samples.values())
    assert abs(sum(expected.values()) - 1.0) < 1e-9
    observed = Counter()
    for tokens, count in samples.items():
        observed[to_outcome(tree, draft.tolist(), list(tokens))] += count
    impossible = sum(c for o, c in observed.items() if o not in expected)
    big = [o for o in expected if expected[o] * total >= 5]
    small = [o for o in expected if expected[o] * total < 5]
    obs = [observed[o] for o in big]
    exp = [expected[o] * total for o in big]
    rest_obs = sum(observed[o] for o in small) + impossible
    rest_exp = sum(expected[o] for o in small) * total
    if rest_obs or rest_exp:  # pooled bin (includes impossible outcomes)
        obs.append(rest_obs)
        exp.append(max(rest_exp, 1e-12 * total))
    exp = [e * sum(obs) / sum(exp) for e in exp]
    stat, pvalue = chisquare(obs, exp)
    return float(stat), float(pvalue), impossible


def counts(res: AcceptanceResult) -> Counter:
    n = res.num_accepted.tolist()
    return Counter(tuple(row[: k + 1]) for row, k in zip(res.output_tokens.tolist(), n))


@pytest.mark.parametrize("name", list(STAT_TREES))
@pytest.mark.parametrize("seed", [1, 2])
def test_rejection_sampling_is_lossless(name, seed):
    tree, draft, probs = stat_case(name, seed)
    b = N_SAMPLES
    params = AcceptanceParams.make("rejection", temperature=1.0, batch_size=b)
    gen = torch.Generator().manual_seed(1000 + seed)
    n1 = tree.num_nodes + 1
    res = tree_accept(
        tree, draft.expand(b, n1), torch.zeros(b, n1, V_STAT, dtype=torch.float64), params,
        target_probs=probs.expand(b, n1, V_STAT), generator=gen,
    )
    stat, pvalue, impossible = gof(tree, draft, probs, counts(res))
    mean_acc = res.num_accepted.double().mean().item()
    print(f"\n[rejection {name} seed={seed}] chi2={stat:.2f} p={pvalue:.4f} "
          f"outcomes={len(exact_outcomes(tree, draft.tolist(), probs))} "
          f"mean_accepted={mean_acc:.3f} draft={draft.tolist()}")
    assert impossible == 0
    assert pvalue > 1e-3
    assert res.num_accepted.max() > 0  # the tree was actually used


def biased_accept_always(tree, draft, probs, n, gen) -> Counter:
    """NEGATIVE CONTROL: accept the first present child at every node."""
    node, prefix = 0, []
    while (nxt := next((k for k in tree.children[node].tolist()
                        if k >= 0 and draft[k] >= 0), None)) is not None:
        prefix.append(int(draft[nxt]))
        node = nxt
    bonus = torch.multinomial(probs[node], n, replacement=True, generator=gen)
    return Counter((*prefix, int(t)) for t in bonus.tolist())


def python_sampler(accept: Callable[[float, float, float], float], update_residual: bool):
    """A plain per-sample tree rejection sampler with a pluggable acceptance rule.

    ``accept(r_x, sum_r, p_x)`` is the probability of accepting a sibling
    whose token has residual mass ``r_x`` (residual total ``sum_r``, original
    target probability ``p_x``). The correct rule is ``r_x / sum_r`` with
    ``update_residual=True``; anything else is a deliberately broken sampler.
    """

    def sample(tree, draft, probs, n, gen) -> Counter:
        out: Counter = Counter()
        width = tree.children.shape[1]
        u = torch.rand(n, tree.max_depth + 1, width + 1, generator=gen, dtype=torch.float64)
        u = u.tolist()
        kids = [[c for c in row if c >= 0 and draft[c] >= 0] for row in tree.children.tolist()]
        rows = probs.tolist()
        for s in range(n):
            node, toks, d = 0, [], 0
            while True:
                r = list(rows[node])
                moved = False
                for k, child in enumerate(kids[node]):
                    x = int(draft[child])
                    if u[s][d][k] < accept(r[x], sum(r), rows[node][x]):
                        toks.append(x)
                        node, moved = child, True
                        break
                    if update_residual:
                        r[x] = 0.0
                if not moved:  # bonus by inverse CDF of the (residual) row
                    t, acc = u[s][d][-1] * sum(r), 0.0
                    for i, m in enumerate(r):
                        acc += m
                        if m > 0 and acc > t:
                            break
                    toks.append(i)
                    break
                d += 1
            out[tuple(toks)] += 1
        return out

    return sample


CORRECT = python_sampler(lambda r_x, total, p_x: r_x / total, update_residual=True)
BROKEN = {
    "accept_always": biased_accept_always,
    # never updates the residual: rejected tokens come back as the bonus
    "no_residual": python_sampler(lambda r_x, total, p_x: p_x, update_residual=False),
    # forgets to renormalise: later siblings are under-accepted (chains unaffected)
    "no_renormalise": python_sampler(lambda r_x, total, p_x: p_x, update_residual=True),
    # over-accepts drafts (sqrt(p) > p), residual otherwise correct
    "over_accept": python_sampler(lambda r_x, total, p_x: math.sqrt(r_x / total), True),
}


@pytest.mark.parametrize("name", list(STAT_TREES))
def test_plain_python_sampler_passes_the_same_test(name):
    """An independent per-sample implementation of the algorithm passes the harness."""
    tree, draft, probs = stat_case(name, 1)
    gen = torch.Generator().manual_seed(8)
    stat, pvalue, impossible = gof(tree, draft, probs, CORRECT(tree, draft, probs, N_SAMPLES, gen))
    print(f"\n[python reference sampler {name}] chi2={stat:.2f} p={pvalue:.4f}")
    assert impossible == 0 and pvalue > 1e-3


@pytest.mark.parametrize(
    "name, seed, broken",
    [(n, 1, b) for b in ("accept_always", "no_residual", "over_accept") for n in STAT_TREES]
    # renormalisation only matters when a rejected sibling had mass and a later one too;
    # (wide, 1) has a single sibling with mass at the root, so it would be lossless there
    + [("wide", 2, "no_renormalise"), ("mixed", 1, "no_renormalise")],
)
def test_rejection_test_has_power(name, seed, broken):
    """NEGATIVE CONTROLS: deliberately broken samplers must fail the same test."""
    tree, draft, probs = stat_case(name, seed)
    gen = torch.Generator().manual_seed(7)
    samples = BROKEN[broken](tree, draft, probs, N_SAMPLES, gen)
    stat, pvalue, impossible = gof(tree, draft, probs, samples)
    print(f"\n[negative control {broken} {name} seed={seed}] chi2={stat:.1f} p={pvalue:.3g} "
          f"impossible={impossible}")
    assert pvalue < 1e-6


def test_typical_bonus_is_sampled_from_p_at_last_node():
    tree = MedusaTree.chain(2)
    v, b, temperature = 5, 40_000, 0.7
    logits = torch.zeros(1, 3, v, dtype=torch.float64)
    logits[0, 0, 2] = 20.0  # node 1 (token 2) surely accepted
    logits[0, 1, 4] = 20.0  # node 2 (token 4) surely accepted
    logits[0, 2] = torch.tensor([0.3, -1.0, 1.2, 0.0, 0.5], dtype=torch.float64)
    draft = torch.tensor([[0, 2, 4]]).expand(b, 3)
    res = typical_accept(tree, draft, logits.expand(b, 3, v), temperature,
                         generator=torch.Generator().manual_seed(5))
    assert (res.num_accepted == 2).all()
    observed = torch.bincount(res.bonus_tokens, minlength=v).double()
    p = torch.softmax(logits[0, 2] / temperature, -1)
    stat, pvalue = chisquare(observed.numpy(), (p * b).numpy())
    wrong = torch.softmax(logits[0, 2], -1)  # the same test rejects T = 1
    _, p_wrong = chisquare(observed.numpy(), (wrong * b).numpy())
    print(f"\n[typical bonus] chi2={stat:.2f} p={pvalue:.4f}; against T=1: p={p_wrong:.3g}")
    assert pvalue > 1e-3 and p_wrong < 1e-6


# ------------------------------------------------- mixing and reproducibility
def test_mixed_batch_matches_single_rule_calls_and_seeds_are_per_request():
    tree = MedusaTree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    gen = torch.Generator().manual_seed(11)
    b, v = 8, 7
    n1 = tree.num_nodes + 1
    logits = torch.randn(b, n1, v, generator=gen) * 2
    probs = torch.softmax(logits / 0.8, -1)
    draft = make_draft(gen, tree, b, v, logits.argmax(-1), 0.1)
    rules = ["greedy", "typical", "rejection", "typical", "rejection", "greedy", "rejection",
             "typical"]
    temps = [1.0, 0.8, 0.8, 0.0, 0.8, 0.0, 0.0, 1.3]
    params = AcceptanceParams.make(rules, temps, 0.2, 0.5)
    seeds = {r: 100 + r for r in range(b)}
    res = tree_accept(tree, draft, logits, params, target_probs=probs,
                      generators={r: torch.Generator().manual_seed(s) for r, s in seeds.items()})
    check_invariants(res, tree, draft)
    for r in range(b):
        one = slice(r, r + 1)
        g = {0: torch.Generator().manual_seed(seeds[r])}
        if rules[r] == "greedy" or temps[r] == 0:
            want = greedy_accept(tree, draft[one], logits[one])
        elif rules[r] == "typical":
            want = typical_accept(tree, draft[one], logits[one], temps[r], 0.2, 0.5, generators=g)
        else:
            want = rejection_accept(tree, draft[one], probs[one], generators=g)
        for field in ("accepted_nodes", "num_accepted", "output_tokens", "last_node"):
            assert torch.equal(getattr(res, field)[one], getattr(want, field)), (r, field)


def test_single_generator_is_reproducible():
    tree = MedusaTree([[0], [1], [0, 0]])
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 4, 9, generator=gen), -1)
    draft = torch.randint(0, 9, (64, 4), generator=gen)
    a = rejection_accept(tree, draft, probs, generator=torch.Generator().manual_seed(4))
    b = rejection_accept(tree, draft, probs, generator=torch.Generator().manual_seed(4))
    c = rejection_accept(tree, draft, probs, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.output_tokens, b.output_tokens)
    assert not torch.equal(a.output_tokens, c.output_tokens)


def test_empty_and_depth_zero_trees():
    tree = MedusaTree([])
    logits = torch.randn(4, 1, 5)
    params = AcceptanceParams.make(["typical", "rejection", "greedy", "typical"],
                                   [1.0, 1.0, 1.0, 0.0])
    res = tree_accept(tree, torch.zeros(4, 1, dtype=torch.long), logits, params,
                      target_probs=logits.softmax(-1))
    assert res.accepted_nodes.tolist() == [[0]] * 4
    assert res.num_accepted.tolist() == [0] * 4
    assert res.output_tokens[2:, 0].tolist() == logits[2:, 0].argmax(-1).tolist()
    empty = greedy_accept(MedusaTree.chain(2), torch.zeros(0, 3, dtype=torch.long),
                          torch.zeros(0, 3, 5))
    assert empty.output_tokens.shape == (0, 3)


# --------------------------------------------------------------- validation
TREE = MedusaTree([[0], [1], [0, 0]])


def _inputs(b=2, v=5):
    return torch.zeros(b, 4, dtype=torch.long), torch.zeros(b, 4, v)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d, lg: greedy_accept(TREE, d[0], lg), r"draft_tokens must be \[batch, num_nodes\+1\]"),
        (lambda d, lg: greedy_accept(TREE, d[:, :3], lg), r"\[2, 4\].*found \(2, 3\)"),
        (lambda d, lg: greedy_accept(TREE, d.float(), lg), "draft_tokens must be an integer"),
        (lambda d, lg: greedy_accept(TREE, d, lg[:1]), r"target_logits must be .*\[2, 4, V\].*\(1, 4, 5\)"),
        (lambda d, lg: greedy_accept(TREE, d, lg[:, :3]), r"target_logits.*found \(2, 3, 5\)"),
        (lambda d, lg: greedy_accept(TREE, d, lg.long()), "target_logits must be a floating"),
        (lambda d, lg: greedy_accept(TREE, d + 5, lg), r"token ids in \[0, 5\) or -1.*\[5, 5\]"),
        (lambda d, lg: greedy_accept(TREE, d - 2, lg), r"found values in \[-2, -2\]"),
        (lambda d, lg: typical_accept(TREE, d, lg, -0.5), r"temperature: expected values >= 0"),
        (lambda d, lg: typical_accept(TREE, d, lg, 1.0, 0.0), r"posterior_threshold: expected values in \(0, 1\)"),
        (lambda d, lg: typical_accept(TREE, d, lg, 1.0, 1.0), r"posterior_threshold.*found \[1.0"),
        (lambda d, lg: typical_accept(TREE, d, lg, 1.0, 0.1, -1.0), r"posterior_alpha: expected values >= 0"),
        (lambda d, lg: typical_accept(TREE, d, lg, torch.ones(3)), r"temperature must be a scalar or \[batch\] = \[2\]"),
        (lambda d, lg: tree_accept(TREE, d, lg, AcceptanceParams.make("greedy", batch_size=3)),
         r"one entry per request \(2 rows.*found 3"),
        (lambda d, lg: tree_accept(TREE, d, lg, AcceptanceParams.make("rejection", batch_size=2)),
         r"target_probs .* is required .*rejection.*rows \[0, 1\]"),
        (lambda d, lg: tree_accept(TREE, d, lg, AcceptanceParams.make("greedy", batch_size=2),
                                   target_probs=torch.zeros(2, 4, 6)),
         r"target_probs must be .*\[2, 4, 5\].*found \(2, 4, 6\)"),
        (lambda d, lg: rejection_accept(TREE, d, lg, generators={5: torch.Generator()}),
         r"generators: row 5 is outside the batch \[0, 2\)"),
        (lambda d, lg: tree_accept(TREE, d, lg, {"rule": "greedy"}), "params must be AcceptanceParams"),
    ],
)
def test_input_validation(call, match):
    draft, logits = _inputs()
    with pytest.raises(ValueError, match=match):
        call(draft, logits)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rule="beam"), r"expected one of \['greedy', 'typical', 'rejection'\].*'beam'"),
        (dict(rule=["greedy", 7]), r"found 7"),
        (dict(rule="typical", temperature=-1.0), r"temperature: expected values >= 0, found \[-1.0\]"),
        (dict(rule="typical", temperature=float("nan")), r"temperature: expected values >= 0"),
        (dict(rule="typical", posterior_threshold=0.0), r"posterior_threshold: expected values in \(0, 1\)"),
        (dict(rule="typical", posterior_threshold=1.5), r"posterior_threshold.*found \[1.5\]"),
        (dict(rule="typical", posterior_alpha=-0.1), r"posterior_alpha: expected values >= 0"),
        (dict(rule=["greedy", "typical"], temperature=[1.0, 1.0, 1.0]),
         r"temperature: expected a scalar or 2 values .*found shape \(3,\)"),
        (dict(rule=torch.tensor([0.0, 1.0])), r"rule: expected AcceptanceRule codes"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AcceptanceParams.make(**kwargs)


def test_params_constructor_validation():
    ok = dict(rule=torch.tensor([0, 1]), temperature=torch.ones(2),
              posterior_threshold=torch.full((2,), 0.1), posterior_alpha=torch.ones(2))
    AcceptanceParams(**ok)
    with pytest.raises(ValueError, match=r"rule: expected codes \[0, 1, 2\].*found \[9\]"):
        AcceptanceParams(**{**ok, "rule": torch.tensor([0, 9])})
    with pytest.raises(ValueError, match=r"temperature: expected 2 entries.*found 3"):
        AcceptanceParams(**{**ok, "temperature": torch.ones(3)})
    with pytest.raises(ValueError, match=r"posterior_alpha: expected a 1-D tensor"):
        AcceptanceParams(**{**ok, "posterior_alpha": 0.3})


def test_rule_parsing():
    assert AcceptanceRule.parse("Typical") is AcceptanceRule.TYPICAL
    assert AcceptanceRule.parse(2) is AcceptanceRule.REJECTION
    p = AcceptanceParams.make(["greedy", AcceptanceRule.REJECTION, 1], temperature=0.5)
    assert p.rule.tolist() == [0, 2, 1] and p.batch_size == 3
    assert p.temperature.tolist() == [0.5] * 3
