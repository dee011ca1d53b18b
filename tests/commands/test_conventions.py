"""Conventions every command keeps: shared option spellings, help text, progress lines, the namespace."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series
from corona_ct.pipeline.cli import build_parser, main
from corona_ct.pipeline.commands.options import DEVICE_HELP, THREADS_HELP, apply_compute_options
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.threads import THREAD_ENV_VARS
from tests.pipeline.test_api import package_env

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPUTING = ("run", "explain", "demo", "train-cls", "cv", "train-seg", "cluster")


def _subcommands(parser: argparse.ArgumentParser, path: str = "corona-ct", help_text: str | None = "(root)"):
    """(path, parser, the subcommand's help) for every parser in the tree, the root included."""
    yield path, parser, help_text
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield from _subcommands(sub, f"{path} {name}", helps.get(name))


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_every_subcommand_and_argument_has_help() -> None:
    missing = []
    for path, parser, subcommand_help in _subcommands(build_parser()):
        if not subcommand_help or not str(subcommand_help).strip():
            missing.append(f"{path} (the subcommand itself)")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help is None or not str(action.help).strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "arguments without help:\n" + "\n".join(missing)


def test_computing_commands_share_output_device_and_threads_spelled_alike() -> None:
    parsers = {
        path.split(" ", 1)[1]: parser for path, parser, _ in _subcommands(build_parser()) if " " in path
    }
    for name in COMPUTING:
        options = _options(parsers[name])
        assert options["-o"] is options["--output"], name
        assert options["--device"].help == DEVICE_HELP and options["--threads"].help == THREADS_HELP, name
    for name in ("analyze roc", "analyze wilcoxon"):
        options = _options(parsers[name])
        assert options["-o"] is options["--output"] and options["--threads"].help == THREADS_HELP


def test_set_help_lists_every_config_section_and_field() -> None:
    parser = next(p for path, p, _ in _subcommands(build_parser()) if path == "corona-ct run")
    text = _options(parser)["--set"].help or ""
    for section in dataclasses.fields(PipelineConfig):
        names = [field.name for field in dataclasses.fields(getattr(PipelineConfig(), section.name))]
        assert f"{section.name} ({', '.join(names)})" in text


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_must_be_a_whole_number_of_at_least_one(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["run", "x", "-o", "out", "--threads", value])
    assert stop.value.code == 2 and "--threads" in capsys.readouterr().err


def test_threads_limits_torch_and_the_blas_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    for variable in THREAD_ENV_VARS:
        monkeypatch.delenv(variable, raising=False)  # restored after the test
    before_torch, before_pools = torch.get_num_threads(), threadpoolctl.threadpool_info()
    try:
        args = build_parser().parse_args(["cluster", "--results", "r", "-o", "o", "--threads", "1"])
        apply_compute_options(args)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert all(pool["num_threads"] == 1 for pool in threadpoolctl.threadpool_info())
    finally:
        torch.set_num_threads(before_torch)
        for pool in before_pools:
            threadpoolctl.threadpool_limits(limits=pool["num_threads"], user_api=pool["user_api"])


def test_threads_reach_blas_when_numpy_loads_after_the_command_line_is_read() -> None:
    """cli.main sets the variables before its parser imports numpy: OpenBLAS starts with N threads."""
    script = (
        "import os, sys\n"
        "from corona_ct.pipeline.cli import main\n"
        "assert 'numpy' not in sys.modules, 'the CLI module imported numpy'\n"
        "try:\n"
        "    main(['cluster', '--threads', '1', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import numpy  # loaded only now: the CLI's --help imports no numerical library\n"
        "import threadpoolctl\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], sorted({p['num_threads'] for p in threadpoolctl.threadpool_info()}))\n"
    )  # fmt: skip
    env = {k: v for k, v in package_env().items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "1 [1]"


def test_a_missing_gpu_is_named_with_the_devices_there_are_before_models_load(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_load(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("models were loaded before the device was checked")

    monkeypatch.setattr("corona_ct.pipeline.modelset.load_models", must_not_load)
    absent = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 1}"
    for command in (["run", str(tmp_path)], ["explain", str(tmp_path / "a.png")], ["demo"]):
        assert main([*command, "-o", str(tmp_path / "out"), "--device", absent]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"'{absent}'" in err[0] and "cpu" in err[0], err
    assert not (tmp_path / "out").exists()
    assert main(["cluster", "--results", str(tmp_path), "-o", str(tmp_path / "c"), "--device", absent]) == 2
    assert f"'{absent}'" in capsys.readouterr().err


def test_device_spelling_is_checked_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train-seg", "-o", "x", "--device", "gpu0"])
    assert "'gpu0' is not a device; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random ResNet-50 weights with a card that says 48 px (fast on CPU)."""
    from corona_ct.models.checkpoint import save_checkpoint
    from corona_ct.models.classifier import build_classifier

    torch.manual_seed(0)
    return save_checkpoint(
        build_classifier("resnet50"),
        tmp_path_factory.mktemp("weights") / "cls.safetensors",
        {
            "architecture": "classifier/resnet50",
            "task": "covid-vs-normal slice classification (test)",
            "input": {"size": 48, "channels": 3, "window": [-1000, 0], "roi": "lung-bbox"},
        },
    )


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m corona_ct.pipeline ARGS`` with stdout and stderr pipes (no terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "corona_ct.pipeline", *args],
        cwd=cwd, env=package_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_without_a_terminal_run_logs_one_line_per_study_and_draws_no_bars(
    tmp_path: Path, tiny_classifier: Path
) -> None:
    phantom = make_phantom(seed=5, shape=(8, 80, 96), spacing_mm=(5.0, 3.5, 3.5), lesions="mixed")
    no_lungs = dataclasses.replace(  # lungs filled with soft tissue: no call can be made
        phantom, hu=np.where(phantom.lung_labels > 0, 40, phantom.hu).astype(np.int16)
    )
    write_dicom_series(phantom, tmp_path / "in" / "P001", patient_name="A^B", patient_id="X1")
    write_dicom_series(no_lungs, tmp_path / "in" / "P002", patient_name="C^D", patient_id="X2")
    done = _cli(
        ["run", str(tmp_path / "in" / "P001"), str(tmp_path / "in" / "P002"), "-o", str(tmp_path / "out"),
         "--cls-weights", str(tiny_classifier), "--set", "segment.method=classical", "--device", "cpu",
         "--threads", "1"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("study ")]
    assert re.fullmatch(r"study 1/2 P001: ok, p=\d\.\d\d, score \d+\.\d cm3, \d+\.\d s", lines[0]), lines
    assert re.fullmatch(r"study 2/2 P002: not-assessable, \d+\.\d s", lines[1]), lines
    assert len(lines) == 2
    assert "\r" not in done.stderr and "it/s" not in done.stderr and "slice/s" not in done.stderr


@pytest.mark.slow
def test_training_logs_one_line_per_epoch(tmp_path: Path) -> None:
    from corona_ct.data.writers import write_nifti

    study = write_nifti(make_phantom(seed=3, shape=(10, 48, 48), lesions="mixed"), tmp_path / "ct.nii.gz")
    done = _cli(
        ["train-seg", "--unlabeled", str(study), "--pseudo-labels", "classical", "--input-size", "32",
         "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--threads", "1", "-o", str(tmp_path / "seg")],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2, done.stderr
    for epoch, line in enumerate(lines, start=1):
        assert re.fullmatch(
            rf"epoch {epoch}/2: train loss \d+\.\d{{3}}, val Dice (\d\.\d{{3}}|nan), \d+\.\d s", line
        )


SHADOWS = {
    "models.py": "raise RuntimeError('the user models.py was imported instead of corona_ct.models')\n",
    "pipeline.py": "raise RuntimeError('the user pipeline.py was imported instead of corona_ct.pipeline')\n",
    "data/__init__.py": "raise RuntimeError('the user data/ package was imported instead of corona_ct.data')\n",
}


@pytest.mark.slow
def test_the_package_works_from_a_folder_with_its_own_models_data_and_pipeline(
    tmp_path: Path, tiny_classifier: Path
) -> None:
    from corona_ct.data.writers import write_nifti

    for name, text in SHADOWS.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    write_nifti(make_phantom(seed=3, shape=(8, 64, 64), spacing_mm=(5.0, 4.0, 4.0)), tmp_path / "ct.nii.gz")
    script = (
        "import corona_ct.pipeline, sys\n"
        "from corona_ct.pipeline.api import analyse_study\n"
        f"r = analyse_study('ct.nii.gz', 'out', device='cpu', cls_weights={str(tiny_classifier)!r}, "
        "segment_method='classical')\n"
        "assert not {'models', 'pipeline', 'data'} & set(sys.modules), 'a bare top-level name was imported'\n"
        "print(corona_ct.pipeline.__file__, r.status)\n"
    )  # fmt: skip
    env = package_env()
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import corona_ct.pipeline

    assert done.stdout.split() == [corona_ct.pipeline.__file__, "ok"]  # this checkout's code, not another
    assert (tmp_path / "out" / "report.json").is_file()
    for module in ("corona_ct.pipeline", "corona_ct.pipeline.cli"):
        shown = _cli([], tmp_path) if module == "corona_ct.pipeline" else subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
        )  # fmt: skip
        assert "usage: corona-ct" in shown.stdout and "Traceback" not in shown.stderr, shown.stderr


def test_run_pipeline_without_the_package_says_how_to_install_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(  # -S: no site-packages, so no editable install; -I: no PYTHONPATH, no user site
        [sys.executable, "-I", "-S", str(REPO_ROOT / "run_pipeline.py"), "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "corona-ct is not installed: run `make venv` (or pip install -e .), then use that environment's python"
    )


BARE_NAMES = {"pipeline", "models", "data"}


def test_no_module_imports_the_bare_top_level_names() -> None:
    offenders = []
    for folder in ("pipeline", "models", "data", "benchmarks", "tools", "tests"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "attr", getattr(node.func, "id", ""))
                    in {"import_module", "__import__"}
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    names = [node.args[0].value]
                offenders += [
                    f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {name}"
                    for name in names
                    if name.split(".")[0] in BARE_NAMES
                ]
    assert not offenders, "import corona_ct.<name>, never the bare name:\n" + "\n".join(offenders)
