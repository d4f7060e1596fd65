"""The medusa_tree translation, checked through vLLM's own EngineArgs.

Each test builds the engine config exactly as ``LLM(...)`` does
(``EngineArgs(...).create_engine_config()``) against a tiny random Llama built
at test time; no engine is started.
"""

from __future__ import annotations

import copy

import pytest
from vllm.engine.arg_utils import EngineArgs

from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.engine import plugin
from medusa_vllm.engine.options import MedusaConfigError, MedusaTreeConfig
from medusa_vllm.engine.plugin import (
    METHOD,
    PROPOSER_CLASS,
    WORKER_CLASSES,
    is_medusa_tree,
    register,
    translate,
)
from medusa_vllm.tools.tiny_models import write_medusa_heads_config

CPU_WORKER = WORKER_CLASSES["cpu"]


def _engine_config(model, **kwargs):
    return EngineArgs(model=model, max_model_len=256, **kwargs).create_engine_config()


def _expected_medusa(heads, **options):
    return MedusaTreeConfig.from_dict({"heads": heads, **options}).resolved().to_dict()


def _assert_translated(cfg, heads, num_nodes, **options):
    sc = cfg.speculative_config
    assert sc is not None
    assert sc.method == "custom_class"
    assert sc.model == PROPOSER_CLASS
    assert sc.num_speculative_tokens == num_nodes
    assert cfg.parallel_config.worker_cls == CPU_WORKER
    medusa = cfg.additional_config["medusa"]
    assert medusa == _expected_medusa(heads, **options)
    assert len(medusa["medusa_choices"]) == num_nodes


# ------------------------------------------------------------- the surfaces
def test_offline_dict(tiny, heads):
    user = {
        "method": METHOD,
        "model": heads,
        "tree": "sparse-8",
        "acceptance": "typical",
        "posterior_threshold": 0.2,
        "posterior_alpha": 0.4,
    }
    before = copy.deepcopy(user)
    cfg = _engine_config(tiny, speculative_config=user)
    _assert_translated(
        cfg, heads, 8, tree="sparse-8", acceptance="typical", posterior_threshold=0.2, posterior_alpha=0.4
    )
    assert user == before, "the user's dict must not be mutated"


def test_offline_defaults_auto_tree(tiny, heads):
    cfg = _engine_config(tiny, speculative_config={"method": METHOD, "model": heads})
    auto = MedusaTree.load("sparse-16", 3)
    _assert_translated(cfg, heads, auto.num_nodes)
    assert cfg.additional_config["medusa"]["acceptance"] == "rejection"


def test_spec_shorthands(tiny, heads):
    """``LLM(spec_method="medusa_tree", spec_model=HEADS, spec_tokens=5)``."""
    cfg = _engine_config(tiny, spec_method=METHOD, spec_model=heads, spec_tokens=5)
    assert cfg.speculative_config.num_speculative_tokens == 5
    full = MedusaTree.load("sparse-16", 3)
    assert cfg.additional_config["medusa"]["medusa_choices"] == full.to_list()[:5]
    assert cfg.parallel_config.worker_cls == CPU_WORKER


def test_num_speculative_tokens_caps_the_tree(tiny, heads):
    cfg = _engine_config(
        tiny, speculative_config={"method": METHOD, "model": heads, "tree": "sparse-8", "num_speculative_tokens": 3}
    )
    assert cfg.speculative_config.num_speculative_tokens == 3
    assert cfg.additional_config["medusa"]["medusa_choices"] == MedusaTree.load("sparse-8", 3).to_list()[:3]


def test_hand_written_custom_class_form_is_validated_and_completed(tiny, heads):
    cfg = _engine_config(
        tiny,
        speculative_config={"method": "custom_class", "model": PROPOSER_CLASS},
        additional_config={"medusa": {"heads": heads, "tree": "chain-2"}},
    )
    _assert_translated(cfg, heads, 2, tree="chain-2")


def test_other_additional_config_kept_and_not_mutated(tiny, heads):
    extra = {"something_else": {"a": 1}, "medusa": {"acceptance": "greedy"}}
    before = copy.deepcopy(extra)
    cfg = _engine_config(tiny, speculative_config={"method": METHOD, "model": heads}, additional_config=extra)
    assert extra == before
    assert cfg.additional_config["something_else"] == {"a": 1}
    assert cfg.additional_config["medusa"]["acceptance"] == "greedy"


def test_translation_is_idempotent(tiny, heads):
    args = EngineArgs(model=tiny, max_model_len=256, speculative_config={"method": METHOD, "model": heads})
    assert plugin.translate_engine_args(args) is True
    first = (copy.deepcopy(args.speculative_config), copy.deepcopy(args.additional_config), args.worker_cls)
    plugin.translate_engine_args(args)  # the custom_class form again
    assert (args.speculative_config, args.additional_config, args.worker_cls) == first
    cfg = args.create_engine_config()  # translates a third time inside
    _assert_translated(cfg, heads, MedusaTree.load("sparse-16", 3).num_nodes)
    t1 = translate({"method": METHOD, "model": heads}, device_type="cpu")
    t2 = translate(t1.speculative_config, t1.additional_config, t1.worker_cls, device_type="cpu")
    assert t1 == t2


def test_builtin_medusa_untouched(tiny, heads):
    spec = {"method": "medusa", "model": heads, "num_speculative_tokens": 2}
    assert translate(spec) is None and not is_medusa_tree(spec)
    cfg = _engine_config(tiny, speculative_config=dict(spec))
    assert cfg.speculative_config.method == "medusa"
    assert cfg.speculative_config.num_speculative_tokens == 2
    assert cfg.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
    assert "medusa" not in cfg.additional_config


def test_no_speculation_untouched(tiny):
    cfg = _engine_config(tiny)
    assert cfg.speculative_config is None
    assert cfg.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"


def test_passthrough_of_vllm_speculative_keys(heads):
    t = translate(
        {"method": METHOD, "model": heads, "tree": "chain-2", "disable_padded_drafter_batch": True},
        device_type="cpu",
    )
    assert t.speculative_config == {
        "disable_padded_drafter_batch": True,
        "method": "custom_class",
        "model": PROPOSER_CLASS,
        "num_speculative_tokens": 2,
    }


def _worker_module(tmp_path, monkeypatch, name: str = "my_workers") -> str:
    """An importable module with a subclass of our CPU worker, a foreign worker
    and a non-class; returns the module name."""
    (tmp_path / f"{name}.py").write_text(
        "from medusa_vllm.engine.cpu.worker import MedusaTreeCPUWorker\n"
        "from vllm.v1.worker.cpu_worker import CPUWorker\n"
        "class MyMedusaWorker(MedusaTreeCPUWorker):\n    pass\n"
        "class MyWorker(CPUWorker):\n    pass\n"
        "NOT_A_CLASS = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_worker_subclassing_ours_is_kept(tiny, heads, tmp_path, monkeypatch):
    mine = f"{_worker_module(tmp_path, monkeypatch)}.MyMedusaWorker"
    t = translate({"method": METHOD, "model": heads}, worker_cls=mine, device_type="cpu")
    assert t.worker_cls == mine
    cfg = _engine_config(tiny, speculative_config={"method": METHOD, "model": heads}, worker_cls=mine)
    assert cfg.parallel_config.worker_cls == mine


@pytest.mark.parametrize(
    "attr, why",
    [
        ("MyWorker", f"is not a subclass of {CPU_WORKER}"),
        ("NOT_A_CLASS", "is not a class (found int 3)"),
        ("Missing", "cannot be imported (AttributeError"),
    ],
)
def test_user_worker_replacing_ours_is_refused(tiny, heads, tmp_path, monkeypatch, attr, why):
    theirs = f"{_worker_module(tmp_path, monkeypatch)}.{attr}"
    with pytest.raises(MedusaConfigError) as err:
        _engine_config(tiny, speculative_config={"method": METHOD, "model": heads}, worker_cls=theirs)
    msg = str(err.value)
    assert msg.startswith(f"medusa_tree: worker_cls={theirs!r} {why}")
    assert "would not install the Medusa tree runner" in msg
    assert f"leave worker_cls='auto' (the plugin sets {CPU_WORKER}) or pass a subclass of it" in msg


def test_unsupported_platform_is_refused(heads):
    with pytest.raises(MedusaConfigError) as err:
        translate({"method": METHOD, "model": heads}, device_type="cuda")
    msg = str(err.value)
    assert "tree Medusa supports the platforms ['cpu'], found 'cuda'" in msg
    assert "run on a supported platform, or use vLLM's built-in chain Medusa ({'method': 'medusa', ...})" in msg


def test_registered_device_type_maps_to_its_worker(heads, tmp_path, monkeypatch):
    """The GPU hook: a device type added to WORKER_CLASSES gets that worker, and
    the start-up check resolves it by import (a broken entry is refused)."""
    from types import SimpleNamespace

    from medusa_vllm.engine.plugin import check_engine_compatibility

    mod = _worker_module(tmp_path, monkeypatch, "gpu_workers")
    monkeypatch.setitem(WORKER_CLASSES, "cuda", f"{mod}.MyMedusaWorker")
    t = translate({"method": METHOD, "model": heads}, device_type="cuda")
    assert t.worker_cls == f"{mod}.MyMedusaWorker"
    model = SimpleNamespace(model="m", uses_mrope=False, is_attention_free=False, is_hybrid=False,
                            logprobs_mode="raw_logprobs", get_hidden_size=lambda: 64,
                            get_vocab_size=lambda: 512)

    def check(worker_cls):
        check_engine_compatibility(t.speculative_config, t.additional_config, model,
                                   SimpleNamespace(pipeline_parallel_size=1, worker_cls=worker_cls),
                                   device_type="cuda")

    check(t.worker_cls)  # the registered worker itself
    with pytest.raises(MedusaConfigError, match=rf"worker_cls='{CPU_WORKER}' is not a subclass of {mod}.MyMedusaWorker"):
        check(CPU_WORKER)  # the CPU worker is not the cuda one
    monkeypatch.setitem(WORKER_CLASSES, "cuda", f"{mod}.NoSuchWorker")
    with pytest.raises(MedusaConfigError, match=rf"the Medusa worker '{mod}.NoSuchWorker' registered for this platform cannot be imported"):
        check(f"{mod}.MyMedusaWorker")


def test_registered_workers_import_and_install_the_tree_runner():
    """Every WORKER_CLASSES entry resolves by import to a subclass of vLLM's
    worker for that platform that overrides init_device (where it installs
    the tree runner)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.cpu_worker import CPUWorker

    bases = {"cpu": CPUWorker}
    assert set(WORKER_CLASSES) == set(bases)
    for device, qualname in WORKER_CLASSES.items():
        cls = resolve_obj_by_qualname(qualname)
        assert issubclass(cls, bases[device]) and cls is not bases[device]
        assert cls.init_device is not bases[device].init_device


# ------------------------------------------------- start-up errors (create_engine_config)
def _bad_heads(tmp_path, **sizes):
    return str(write_medusa_heads_config(tmp_path / "bad_heads", **{"num_heads": 3, "hidden_size": 64, "vocab_size": 512, **sizes}))


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"acceptance": "fast"}, "acceptance: expected 'greedy' or 'typical' or 'rejection', found 'fast'"),
        ({"posterior_threshold": 1.2}, "posterior_threshold: expected a number in the open interval (0, 1), found 1.2"),
        ({"posterior_threshold": 0}, "posterior_threshold: expected a number in the open interval (0, 1), found 0"),
        ({"posterior_alpha": -1}, "posterior_alpha: expected a number >= 0"),
        ({"tree": [[0], [1, 1]]}, "its prefix [1] is missing"),
        ({"tree": "[[0], [0,"}, "tree: expected a JSON list of paths"),
        ({"tree": "chain-4"}, "depth 4 exceeds the number of Medusa heads (3)"),
        ({"tree": "sparse-1000"}, "tree: expected \"auto\", a preset"),
        ({"accept": "greedy"}, "unknown key(s) ['accept']"),
        ({"num_speculative_tokens": 99, "tree": "chain-2"}, "num_speculative_tokens=99 exceeds the tree's 2 nodes"),
        ({"max_nodes": 4, "num_speculative_tokens": 3}, "disagree"),
    ],
)
def test_bad_options_fail_at_startup(tiny, heads, options, needle):
    with pytest.raises(MedusaConfigError) as err:
        _engine_config(tiny, speculative_config={"method": METHOD, "model": heads, **options})
    assert needle in str(err.value)
    assert "speculative_config (method 'medusa_tree')" in str(err.value)


def test_missing_heads_dir_fails(tiny, tmp_path):
    with pytest.raises(MedusaConfigError, match=r"model: expected the path of a Medusa heads folder, found nothing"):
        _engine_config(tiny, speculative_config={"method": METHOD, "model": str(tmp_path / "nope")})
    with pytest.raises(MedusaConfigError, match=r"model: required"):
        _engine_config(tiny, speculative_config={"method": METHOD})


@pytest.mark.parametrize(
    "sizes, needle",
    [
        ({"hidden_size": 128}, "hidden_size=128, but the backbone"),
        ({"vocab_size": 1000}, "vocab_size=1000, but the backbone"),
    ],
)
def test_heads_not_matching_backbone_fail(tiny, tmp_path, sizes, needle):
    bad = _bad_heads(tmp_path, **sizes)
    with pytest.raises(MedusaConfigError) as err:
        _engine_config(tiny, speculative_config={"method": METHOD, "model": bad})
    assert needle in str(err.value)
    assert tiny in str(err.value) and "train or convert Medusa heads" in str(err.value)


def test_custom_class_without_options_fails(tiny):
    with pytest.raises(MedusaConfigError, match=r"needs the Medusa options in additional_config\['medusa'\]"):
        _engine_config(tiny, speculative_config={"method": "custom_class", "model": PROPOSER_CLASS})


def test_conflicting_option_sources_fail(tiny, heads):
    with pytest.raises(MedusaConfigError, match=r"'acceptance' is set both"):
        _engine_config(
            tiny,
            speculative_config={"method": METHOD, "model": heads, "acceptance": "typical"},
            additional_config={"medusa": {"acceptance": "greedy"}},
        )


# ------------------------------------------- start-up refusals (check_engine_compatibility)
_HYBRID = "is hybrid (mamba / linear-attention layers beside attention)"
_ATTN_FREE = "is attention-free (state-space / recurrent layers)"


@pytest.mark.parametrize(
    "engine_kwargs, needle",
    [
        ({"pipeline_parallel_size": 2},
         "medusa_tree: pipeline_parallel_size=2: the Medusa heads read the last layer's hidden state "
         "and the tree verifier its logits, which only the last pipeline stage has: set "
         "pipeline_parallel_size=1 (--pipeline-parallel-size 1)"),
        ({"logprobs_mode": "processed_logprobs"},
         "medusa_tree: logprobs_mode='processed_logprobs': with tree Medusa the returned logprobs are "
         "the raw target log-probabilities of each emitted token (logprobs_mode='raw_logprobs'); set "
         "logprobs_mode='raw_logprobs' (--logprobs-mode raw_logprobs, the default) or run without "
         "speculative_config (no speculative decoding)"),
        ({"logprobs_mode": "processed_logits"}, "medusa_tree: logprobs_mode='processed_logits': "),
        ({"logprobs_mode": "raw_logits"}, "medusa_tree: logprobs_mode='raw_logits': "),
        ({"hf_overrides": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": [4, 2, 2]}}},
         "uses M-RoPE positions (an mrope_section in its rope parameters: 3-D multimodal positions); "
         "the tree runner writes one position per token (prefix length + tree depth), so tree rows "
         "would get wrong rotary positions: use a model with 1-D RoPE positions or run without "
         "speculative_config"),
    ],
    ids=["pipeline-parallel", "processed_logprobs", "processed_logits", "raw_logits", "m-rope"],
)
def test_silently_wrong_engines_are_refused_at_startup(tiny, heads, engine_kwargs, needle):
    spec = {"method": METHOD, "model": heads}
    with pytest.raises(MedusaConfigError) as err:
        _engine_config(tiny, speculative_config=spec, **engine_kwargs)
    assert needle in str(err.value)
    # the same engine without Medusa trees is vLLM's business, not ours
    if "hf_overrides" not in engine_kwargs and "pipeline_parallel_size" not in engine_kwargs:
        assert _engine_config(tiny, **engine_kwargs).speculative_config is None


@pytest.mark.parametrize("prop, needle", [("is_hybrid", _HYBRID), ("is_attention_free", _ATTN_FREE)])
def test_hybrid_and_attention_free_models_are_refused(tiny, heads, monkeypatch, prop, needle):
    """vLLM's registry decides these from the architecture (inspecting a real
    Mamba/Jamba config takes over a minute here): the tiny Llama stands in,
    with the one ModelConfig property switched on."""
    from vllm.config import ModelConfig

    _engine_config(tiny, speculative_config={"method": METHOD, "model": heads})  # passes as it is
    monkeypatch.setattr(ModelConfig, prop, property(lambda self: True))
    with pytest.raises(MedusaConfigError) as err:
        _engine_config(tiny, speculative_config={"method": METHOD, "model": heads})
    assert f"medusa_tree: the model {tiny!r} {needle}" in str(err.value)
    assert "or run without speculative_config" in str(err.value)


def test_every_refusal_is_listed_together(tiny, heads):
    with pytest.raises(MedusaConfigError) as err:
        _engine_config(tiny, speculative_config={"method": METHOD, "model": heads},
                       pipeline_parallel_size=2, logprobs_mode="raw_logits",
                       worker_cls="vllm.v1.worker.cpu_worker.CPUWorker")
    lines = str(err.value).splitlines()
    assert lines[0] == "medusa_tree cannot run this engine correctly:"
    heads_of_lines = ("  - pipeline_parallel_size=2: ", "  - logprobs_mode='raw_logits': ",
                      f"  - worker_cls='vllm.v1.worker.cpu_worker.CPUWorker' is not a subclass of {CPU_WORKER}; ")
    assert len(lines) == 4
    assert all(line.startswith(head) for line, head in zip(lines[1:], heads_of_lines)), lines


def test_builtin_medusa_is_not_refused(tiny, heads):
    """The refusals are for tree Medusa only: vLLM's chain Medusa keeps its own rules."""
    cfg = _engine_config(tiny, speculative_config={"method": "medusa", "model": heads, "num_speculative_tokens": 2},
                         logprobs_mode="processed_logprobs")
    assert cfg.speculative_config.method == "medusa"


# ------------------------------------------------------------------ register
def test_register_is_idempotent():
    register()
    ece, csc, cli = (EngineArgs.create_engine_config, EngineArgs.create_speculative_config, EngineArgs.add_cli_args)
    plugin._REGISTERED = False  # force a second full pass, as a re-import would
    register()
    register()
    assert EngineArgs.create_engine_config is ece
    assert EngineArgs.create_speculative_config is csc
    assert EngineArgs.add_cli_args is cli
    # exactly one wrapper layer around vLLM's originals
    for fn in (ece, csc, cli):
        assert getattr(fn, "__medusa_vllm_patch__", False)
        assert not getattr(fn.__wrapped__, "__medusa_vllm_patch__", False)


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "medusa_vllm"]
    assert eps and eps[0].value == "medusa_vllm.engine.plugin:register"
    assert eps[0].load() is register
