"""MedusaTreeConfig: validation, tree resolution, dict round trip, request overrides."""

from __future__ import annotations

import json

import pytest

from medusa_vllm.checkpoints import MedusaCheckpointError, read_heads_info
from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.engine.options import (
    ACCEPTANCE_MODES,
    MedusaConfigError,
    MedusaTreeConfig,
    default_tree_spec,
)
from medusa_vllm.engine.request import RequestOverrides, request_overrides
from medusa_vllm.tools.tiny_models import write_medusa_heads_config


def test_defaults(heads_dir):
    from medusa_vllm.core.acceptance import DEFAULT_POSTERIOR_ALPHA, DEFAULT_POSTERIOR_THRESHOLD
    from medusa_vllm.engine.options import DEFAULT_ACCEPTANCE

    cfg = MedusaTreeConfig.from_dict({"heads": str(heads_dir)})
    # the documented defaults, defined once (core.acceptance / engine.options)
    assert cfg.acceptance == DEFAULT_ACCEPTANCE == "rejection"
    assert cfg.posterior_threshold == DEFAULT_POSTERIOR_THRESHOLD == 0.09
    assert cfg.posterior_alpha == DEFAULT_POSTERIOR_ALPHA == 0.3
    assert ACCEPTANCE_MODES == ("greedy", "typical", "rejection")
    assert cfg.tree == "auto"
    assert cfg.max_nodes is None
    assert cfg.heads == str(heads_dir.resolve())


def test_auto_tree_uses_preset_sized_to_heads(tmp_path):
    for num_heads, preset in ((1, "sparse-4"), (2, "sparse-8"), (3, "sparse-16"), (5, "sparse-16")):
        h = write_medusa_heads_config(tmp_path / f"h{num_heads}", num_heads=num_heads)
        tree = MedusaTreeConfig.from_dict({"heads": h}).load_tree()
        assert default_tree_spec(num_heads) == preset
        assert tree == MedusaTree.load(preset, num_heads)
        assert tree.max_depth <= num_heads


def test_auto_tree_prefers_saved_tree(heads_dir):
    saved = MedusaTree([[0], [0, 0], [1]])
    saved.save(heads_dir / "medusa_tree.json", note="calibrated")
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir})
    assert cfg.load_tree() == saved
    assert cfg.num_speculative_tokens == 3


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("chain-2", [[0], [0, 0]]),
        ([[1], [0], [0, 0]], [[0], [1], [0, 0]]),  # re-sorted to BFS order
        ("[[0], [0, 0], [0, 0, 0]]", [[0], [0, 0], [0, 0, 0]]),
    ],
)
def test_explicit_trees(heads_dir, spec, expected):
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": spec})
    assert cfg.load_tree().to_list() == expected
    assert cfg.num_speculative_tokens == len(expected)


def test_tree_from_json_file(heads_dir, tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([[0], [1], [0, 0]]))
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": str(f)})
    assert cfg.load_tree().to_list() == [[0], [1], [0, 0]]


def test_max_nodes_truncates_in_bfs_order(heads_dir):
    full = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "sparse-16"}).load_tree()
    cut = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "sparse-16", "max_nodes": 6})
    assert cut.load_tree().to_list() == full.to_list()[:6]
    assert cut.num_speculative_tokens == 6
    # auto with a cap picks a preset no larger than the cap
    auto = MedusaTreeConfig.from_dict({"heads": heads_dir, "max_nodes": 8}).load_tree()
    assert auto == MedusaTree.load("sparse-8", 3)


def test_resolved_round_trip(heads_dir):
    cfg = MedusaTreeConfig.from_dict(
        {"heads": heads_dir, "tree": "sparse-8", "acceptance": "Typical", "posterior_alpha": 0.5}
    )
    res = cfg.resolved()
    d = res.to_dict()
    assert d["tree"] == d["medusa_choices"] == MedusaTree.load("sparse-8", 3).to_list()
    assert d["acceptance"] == "typical"
    assert json.loads(json.dumps(d)) == d
    assert MedusaTreeConfig.from_dict(d) == res
    assert MedusaTreeConfig.from_dict(cfg.to_dict()) == cfg
    # medusa_choices alone is accepted as the explicit tree
    only = {k: v for k, v in d.items() if k != "tree"}
    assert MedusaTreeConfig.from_dict(only) == res


def test_resolved_caps_at_num_speculative_tokens(heads_dir):
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "sparse-16"})
    full = MedusaTree.load("sparse-16", 3).to_list()
    cut = cfg.resolved(num_speculative_tokens=5)
    assert cut.tree == full[:5]
    assert cut.nodes_by_batch[1] == 5 and max(cut.nodes_by_batch.values()) == 5
    assert cfg.resolved(num_speculative_tokens=16) == cfg.resolved()
    assert cut.resolved() == cut  # resolving a resolved config changes nothing
    with pytest.raises(MedusaConfigError, match=r"num_speculative_tokens=17 exceeds the tree's 16 nodes"):
        cfg.resolved(num_speculative_tokens=17)
    for bad in (0, True, "3", 2.0):
        with pytest.raises(MedusaConfigError, match=r"num_speculative_tokens: expected an integer >= 1"):
            cfg.resolved(num_speculative_tokens=bad)


def test_medusa_choices_conflicting_with_tree(heads_dir):
    with pytest.raises(MedusaConfigError, match="disagree"):
        MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "chain-2", "medusa_choices": [[0], [1]]})


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("acceptance", "optimistic", "acceptance: expected 'greedy' or 'typical' or 'rejection', found 'optimistic'"),
        ("posterior_threshold", 0.0, "posterior_threshold: expected a number in the open interval (0, 1), found 0.0"),
        ("posterior_threshold", 1.0, "posterior_threshold: expected a number in the open interval (0, 1), found 1.0"),
        ("posterior_threshold", float("nan"), "posterior_threshold: expected a finite number"),
        ("posterior_threshold", True, "posterior_threshold: expected a number, found the boolean True"),
        ("posterior_alpha", -0.1, "posterior_alpha: expected a number >= 0, found -0.1"),
        ("posterior_alpha", "lots", "posterior_alpha: expected a number >= 0, found 'lots'"),
        ("max_nodes", 0, "max_nodes: expected an integer >= 1"),
        ("tree", "sparse-17", "tree: expected \"auto\", a preset"),
        ("tree", [[0], [0, 0, 1, 0]], "its prefix [0, 0] is missing"),
        ("tree", "[[0], [1", "tree: expected a JSON list of paths"),
        ("tree", 7, "tree: expected \"auto\""),
        ("acceptence", "greedy", "unknown option 'acceptence'"),
        ("nodes_by_batch", "sometimes", "nodes_by_batch: expected \"auto\", \"off\", or a {batch_size"),
        ("nodes_by_batch", {"0": 4}, "nodes_by_batch: batch size '0': expected an integer >= 1"),
        ("nodes_by_batch", {"eight": 4}, "nodes_by_batch: batch size 'eight': expected an integer >= 1"),
        ("nodes_by_batch", {"8": -1}, "nodes_by_batch: batch size 8: tree size -1: expected an integer >= 0"),
        ("nodes_by_batch", {}, "nodes_by_batch: expected"),
    ],
)
def test_bad_option_names_field_expected_and_found(heads_dir, field, value, needle):
    with pytest.raises(MedusaConfigError) as err:
        MedusaTreeConfig.from_dict({"heads": heads_dir, field: value})
    assert needle in str(err.value)


def test_several_errors_listed_together(heads_dir):
    with pytest.raises(MedusaConfigError) as err:
        MedusaTreeConfig.from_dict({"heads": heads_dir, "acceptance": "x", "posterior_alpha": -1})
    msg = str(err.value)
    assert "acceptance:" in msg and "posterior_alpha:" in msg


def test_tree_too_deep_for_heads(tmp_path):
    h = write_medusa_heads_config(tmp_path / "h", num_heads=2)
    cfg = MedusaTreeConfig.from_dict({"heads": h, "tree": "chain-3"})
    with pytest.raises(MedusaConfigError, match=r"tree: 'chain-3' is not a valid tree for 2 Medusa heads.*depth 3"):
        cfg.load_tree()


def test_heads_errors(tmp_path):
    with pytest.raises(MedusaConfigError, match=r"heads: expected the path of a Medusa heads folder, found nothing"):
        MedusaTreeConfig.from_dict({"heads": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedusaConfigError, match=r"heads: expected .*config.json"):
        MedusaTreeConfig.from_dict({"heads": str(tmp_path / "empty")})
    with pytest.raises(MedusaConfigError, match=r"heads: required"):
        MedusaTreeConfig.from_dict({})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(MedusaCheckpointError, match=r"number of heads as 'num_heads' or 'medusa_num_heads' or 'num_medusa_heads'"):
        read_heads_info(bad)
    (bad / "config.json").write_text(json.dumps({"num_heads": 0}))
    with pytest.raises(MedusaCheckpointError, match=r"'num_heads' must be an integer >= 1, found 0"):
        read_heads_info(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(MedusaCheckpointError, match="cannot read"):
        read_heads_info(bad)


def test_heads_info_layouts(tmp_path):
    ours = write_medusa_heads_config(tmp_path / "ours", num_heads=4, hidden_size=32, vocab_size=100)
    info = read_heads_info(ours)
    assert (info.num_heads, info.hidden_size, info.vocab_size) == (4, 32, 100)
    fd = tmp_path / "fd"  # FasterDecoding layout: medusa_num_heads, no sizes
    fd.mkdir()
    (fd / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "medusa_num_layers": 1}))
    info = read_heads_info(fd)
    assert (info.num_heads, info.hidden_size, info.vocab_size) == (5, None, None)
    trt = tmp_path / "trt"  # TensorRT-LLM converted layout
    trt.mkdir()
    (trt / "config.json").write_text(json.dumps(
        {"architecture": "MedusaForCausalLM", "num_medusa_heads": 2, "hidden_size": 48, "vocab_size": 77}))
    info = read_heads_info(trt)
    assert (info.num_heads, info.hidden_size, info.vocab_size) == (2, 48, 77)


def test_check_backbone(heads_dir):
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir})
    cfg.check_backbone(hidden_size=64, vocab_size=512)  # matches: no error
    with pytest.raises(MedusaConfigError, match=r"hidden_size=64, but the backbone has hidden_size=128"):
        cfg.check_backbone(hidden_size=128, vocab_size=512)
    with pytest.raises(MedusaConfigError, match=r"vocab_size=512, but .* has vocab_size=1000"):
        cfg.check_backbone(hidden_size=64, vocab_size=1000, model="tiny")


def test_frozen(heads_dir):
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir})
    with pytest.raises(Exception):
        cfg.acceptance = "greedy"  # type: ignore[misc]


class _FakeVllmConfig:
    def __init__(self, extra):
        self.additional_config = extra


def test_from_vllm_config(heads_dir):
    res = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "chain-2"}).resolved()
    assert MedusaTreeConfig.from_vllm_config(_FakeVllmConfig({"medusa": res.to_dict()})) == res
    with pytest.raises(MedusaConfigError, match=r"additional_config\['medusa'\]: expected"):
        MedusaTreeConfig.from_vllm_config(_FakeVllmConfig({}))


# ------------------------------------------------------------ request overrides
def test_request_overrides_parse_and_resolve(heads_dir):
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir, "acceptance": "typical", "posterior_alpha": 0.5})
    assert request_overrides(None) == RequestOverrides()
    assert request_overrides({"other_plugin": 1}) == RequestOverrides()
    ov = request_overrides({"medusa_acceptance": "GREEDY", "medusa_posterior_threshold": 0.2, "x": 3})
    assert ov == RequestOverrides("greedy", 0.2, None)
    assert ov.resolve(cfg) == RequestOverrides("greedy", 0.2, 0.5)
    assert ov.as_dict() == {"acceptance": "greedy", "posterior_threshold": 0.2}
    assert ov.get("posterior_alpha", 0.7) == 0.7 and ov.get("acceptance", "x") == "greedy"
    assert RequestOverrides().resolve(cfg) == RequestOverrides("typical", 0.09, 0.5)
    # an explicit 0 alpha must not fall back to the engine value
    assert request_overrides({"medusa_posterior_alpha": 0}).resolve(cfg).posterior_alpha == 0.0
    for mode in ACCEPTANCE_MODES:
        assert request_overrides({"medusa_acceptance": mode}).acceptance == mode


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"medusa_acceptance": "fast"}, "medusa_acceptance: expected 'greedy' or 'typical' or 'rejection', found 'fast'"),
        ({"medusa_posterior_threshold": 1.5}, "medusa_posterior_threshold: expected a number in the open interval (0, 1), found 1.5"),
        ({"medusa_posterior_alpha": -2}, "medusa_posterior_alpha: expected a number >= 0, found -2"),
        ({"medusa_threshold": 0.1}, "unknown Medusa key 'medusa_threshold'"),
    ],
)
def test_request_overrides_errors(extra, needle):
    with pytest.raises(MedusaConfigError) as err:
        request_overrides(extra)
    assert "SamplingParams.extra_args" in str(err.value)
    assert needle in str(err.value)


def test_nodes_by_batch_auto_off_explicit_and_saved(heads_dir):
    from medusa_vllm.core.tree import budget_nodes_by_batch
    from medusa_vllm.engine.options import DEFAULT_VERIFY_TOKEN_BUDGET

    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "sparse-16"})
    tree = cfg.load_tree()
    auto = cfg.load_nodes_by_batch(tree)
    assert auto[1] == 16  # batch 1: the whole tree the user asked for
    want = budget_nodes_by_batch(16, DEFAULT_VERIFY_TOKEN_BUDGET)
    assert {b: n for b, n in auto.items() if b > 1} == {b: n for b, n in want.items() if b > 1}
    off = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "sparse-16", "nodes_by_batch": "off"})
    assert off.load_nodes_by_batch(tree) is None
    explicit = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "sparse-16",
                                           "nodes_by_batch": {"1": 99, "8": 2}})
    assert explicit.load_nodes_by_batch(tree) == {1: 16, 8: 2}  # capped at the tree size
    # tree="auto" with a calibrated file: its table wins
    MedusaTree([[0], [1], [0, 0]]).save(heads_dir / "medusa_tree.json", nodes_by_batch={"1": 3, "4": 1, "16": 0})
    saved = MedusaTreeConfig.from_dict({"heads": heads_dir})
    assert saved.load_nodes_by_batch(saved.load_tree()) == {1: 3, 4: 1, 16: 0}
    resolved = saved.resolved()
    assert resolved.nodes_by_batch == {1: 3, 4: 1, 16: 0}
    d = resolved.to_dict()
    assert d["nodes_by_batch"] == {"1": 3, "4": 1, "16": 0}
    assert MedusaTreeConfig.from_dict(json.loads(json.dumps(d))) == resolved
    (heads_dir / "medusa_tree.json").write_text(json.dumps({"medusa_choices": [[0]], "nodes_by_batch": {"x": 1}}))
    with pytest.raises(MedusaConfigError, match="invalid 'nodes_by_batch' table"):
        MedusaTreeConfig.from_dict({"heads": heads_dir}).load_nodes_by_batch(MedusaTree([[0]]))


def test_prompt_lookup_options(heads_dir):
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "chain-2", "ngram_nodes": 3})
    assert (cfg.ngram_nodes, cfg.ngram_min, cfg.ngram_max) == (3, 2, 5)
    assert cfg.load_tree().to_list() == [[0], [0, 0]]  # the heads' nodes
    # the top-1 chain down to depth 3, where lookup continuations go
    assert cfg.engine_tree().to_list() == [[0], [0, 0], [0, 0, 0]]
    assert cfg.num_speculative_tokens == 3
    res = cfg.resolved()
    assert res.tree == [[0], [0, 0]] and res.num_speculative_tokens == 3
    wide = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": [[0], [1], [1, 0]],
                                       "ngram_nodes": 2})
    assert wide.engine_tree().to_list() == [[0], [1], [0, 0], [1, 0]]
    assert wide.num_speculative_tokens == 4
    assert MedusaTreeConfig.from_dict(res.to_dict()).engine_tree() == cfg.engine_tree()
    off = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "chain-2"})
    assert off.engine_tree() == off.load_tree() and off.num_speculative_tokens == 2


def test_prompt_lookup_is_on_where_the_engine_fits_the_tree(heads_dir, monkeypatch):
    """ngram_nodes="auto" (the default): a lookup chain as deep as DEFAULT_NGRAM_NODES
    allows within the heads' depth where the engine fits tree="auto" at start-up (the
    fit prices it), none with an explicit tree or without a fit."""
    monkeypatch.delenv("MEDUSA_VLLM_COST_CURVE", raising=False)
    plain = MedusaTreeConfig.from_dict({"heads": heads_dir})
    assert plain.ngram_nodes == "auto"
    assert plain.lookup_depth() == 0  # these heads ship no acceptance statistics: no fit
    (heads_dir / "medusa_tree.json").write_text(json.dumps(
        {"medusa_choices": [[0]], "per_rank_accuracy": [[0.8, 0.1], [0.7, 0.1], [0.6, 0.1]]}))
    fitted = MedusaTreeConfig.from_dict({"heads": heads_dir})
    assert fitted.lookup_depth() == 3  # DEFAULT_NGRAM_NODES = 4, but only 3 heads
    assert fitted.lookup_depth(num_heads=5) == 4
    res = fitted.resolved()
    assert res.ngram_nodes == 3 and res.fit_max_nodes == 64 + 3
    assert MedusaTreeConfig.from_dict(res.to_dict()) == res
    for options in ({"tree": "chain-2"}, {"tree": "beam:2"}, {"cost_curve": "off"}):
        cfg = MedusaTreeConfig.from_dict({"heads": heads_dir, **options})
        assert cfg.lookup_depth() == 0 and cfg.resolved().ngram_nodes == 0, options
    assert MedusaTreeConfig.from_dict({"heads": heads_dir, "ngram_nodes": "AUTO"}).ngram_nodes == "auto"


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"ngram_nodes": -1}, "ngram_nodes"),
        ({"ngram_nodes": "sometimes"}, "ngram_nodes"),
        ({"ngram_nodes": True}, "ngram_nodes"),
        ({"ngram_min": 0}, "ngram_min"),
        ({"ngram_min": 4, "ngram_max": 3}, r"ngram_max: expected an integer >= ngram_min \(4\)"),
    ],
)
def test_ngram_options_refused(heads_dir, options, needle):
    with pytest.raises(MedusaConfigError, match=needle):
        MedusaTreeConfig.from_dict({"heads": heads_dir, **options})


def test_ngram_branch_deeper_than_the_heads_is_refused(heads_dir):
    cfg = MedusaTreeConfig.from_dict({"heads": heads_dir, "tree": "chain-2", "ngram_nodes": 4})
    with pytest.raises(MedusaConfigError, match=r"ngram_nodes: 4 is deeper than the 3 Medusa heads"):
        cfg.engine_tree()
