"""Hostile input on the command line: a bad run directory, damaged files in one, a federated run
that cannot go on, device images that cannot be read. Each gives one `error:` line and exit code 2
(or a DataError naming the file), never a traceback, and never touches what a run already holds.

Run directories are made by hand, as the pipeline lays them out (tests/test_run.py runs the pipeline
itself): a damaged one fails before any NNI experiment starts, in a few seconds."""

import inspect
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from nni_fedexit.data import DataError, load_dataset, load_image_folder
from nni_fedexit.job.cli import main
from helpers import EXAMPLES, TINY_SAMPLE

CONFIG = EXAMPLES / "tiny_digits.yaml"
STAGES_HELP = "delete it to rerun every stage"


def _runner() -> CliRunner:
    """A runner that keeps stderr apart (click < 8.2 mixes it in unless told; 8.2 dropped the option)."""
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def user_error(*args: str) -> str:
    """The one line the CLI prints for ``args`` (asserting exit code 2, no traceback, one line)."""
    result = _runner().invoke(main, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def run_dir(tmp_path: Path, stages: str | None = None, files: dict[str, str] | None = None) -> Path:
    """A run directory as `nni-fedexit run` leaves it: config.yaml, stages.json, and ``files`` (path: text)."""
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(CONFIG, d / "config.yaml")
    if stages is not None:
        (d / "stages.json").write_text(stages)
    for name, text in (files or {}).items():
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return d


# ---- the run directory ---------------------------------------------------------------------------


def test_run_dir_below_a_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    line = user_error("run", str(CONFIG), "--run-dir", str(blocker / "sub"))
    assert f"{blocker} is a file, not a folder" in line and "--run-dir" in line
    assert blocker.read_text() == "not a folder"


CORRUPT_STAGES = {
    "truncated": '{"done": ["search", "fed',
    "not an object": '["search"]',
    "no done": '{"finished": ["search"]}',
    "not stage names": '{"done": ["search", 3]}',
    "empty": "",
}


@pytest.mark.parametrize("content", CORRUPT_STAGES.values(), ids=CORRUPT_STAGES.keys())
@pytest.mark.parametrize("resume", [False, True], ids=["run", "run --resume"])
def test_corrupt_stages_json_on_run(tmp_path, content, resume):
    """Never read as "nothing finished": that would train again over the run's results."""
    arch = json.dumps({"sample": TINY_SAMPLE})
    d = run_dir(tmp_path, content, files={"search/architecture.json": arch})
    line = user_error("run", str(CONFIG), "--run-dir", str(d), *(["--resume"] if resume else []))
    assert str(d / "stages.json") in line and STAGES_HELP in line
    assert (d / "stages.json").read_text() == content and (d / "search/architecture.json").read_text() == arch
    assert not (d / "nni-experiments").exists()


def test_corrupt_stages_json_on_resume(tmp_path):
    d = run_dir(tmp_path, '{"done": ["search", "federate"')
    line = user_error("resume", str(d))
    assert str(d / "stages.json") in line and STAGES_HELP in line and "corrupt" in line


def test_config_of_a_run_dir_that_is_not_text(tmp_path):
    d = run_dir(tmp_path, '{"done": ["search"]}')
    (d / "config.yaml").write_bytes(b"\xff\xfe\x00\x01 binary")
    for command in ("resume", "evaluate", "report"):
        line = user_error(command, str(d))
        assert str(d / "config.yaml") in line and "cannot be read" in line


def test_config_yaml_syntax_error_is_one_line(tmp_path):
    d = run_dir(tmp_path)
    (d / "config.yaml").write_text("seed: 0\ndata: [digits\n")
    line = user_error("resume", str(d))
    assert str(d / "config.yaml") in line and "not valid YAML" in line


def test_corrupt_model_json_on_evaluate(tmp_path):
    d = run_dir(tmp_path, '{"done": ["search", "federate"]}', files={"model.json": '{"architecture": '})
    line = user_error("evaluate", str(d))
    assert str(d / "model.json") in line and "corrupt" in line and "federate" in line


# ---- errors of the stages: PipelineError, FederatedError -------------------------------------------


def test_pipeline_error_for_a_damaged_search_result(tmp_path):
    """The search finished, but its architecture.json is truncated: the federate stage says which file
    and how to search again, before it starts an experiment."""
    d = run_dir(tmp_path, '{"done": ["search"]}', files={"search/architecture.json": '{"sample": {"stage1": "res'})
    line = user_error("resume", str(d))
    assert str(d / "search/architecture.json") in line and "stages.json" in line
    assert not (d / "federated").exists() and not (d / "nni-experiments").exists()


def test_federated_error_for_a_checkpoint_of_other_settings(tmp_path):
    """The run's federated checkpoint was written with other settings: the trial could not go on
    from it, so the CLI says so (FederatedError) instead of starting an NNI experiment that fails."""
    from safetensors.torch import save_file

    state = {"round": 1, "best_round": 1, "fingerprint": "written-with-other-settings",
             "history": [{"round": 1, "exit_accuracy": [0.5, 0.6], "total_loss": 1.0}]}
    d = run_dir(tmp_path, '{"done": ["search"]}', files={"search/architecture.json": json.dumps({"sample": TINY_SAMPLE}),
                                                      "federated/state.json": json.dumps(state)})
    save_file({"w": torch.zeros(2)}, str(d / "federated" / "last.safetensors"))
    line = user_error("resume", str(d))
    assert str(d / "federated") in line and "other settings" in line
    assert json.loads((d / "federated/state.json").read_text()) == state  # the checkpoint is kept as it was
    assert not (d / "federated/experiment.json").exists() and not (d / "nni-experiments").exists()


# ---- data: an edge device's image folder, Fashion-MNIST files ------------------------------------


def test_decompression_bomb_png_is_a_data_error(tmp_path):
    """A 400-megapixel PNG (48 KB as a 1-bit image) is refused by name before it is decoded."""
    folder = tmp_path / "device" / "3"
    folder.mkdir(parents=True)
    bomb = folder / "big.png"
    t0 = time.time()
    Image.new("1", (20000, 20000)).save(bomb)
    assert bomb.stat().st_size < 200_000
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "device", [str(i) for i in range(10)], 1, 8, [0.5], [0.5])
    message = str(err.value)
    assert str(bomb) in message and "400,000,000 pixels" in message and "resize" in message
    assert f"at most {limit:,} pixels" in message
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's global limit is left alone
    assert time.time() - t0 < 20


def test_image_above_pillows_warning_limit_is_refused_too(tmp_path):
    """Between MAX_IMAGE_PIXELS and twice that Pillow only warns, and would decode it: refused as well."""
    folder = tmp_path / "device" / "0"
    folder.mkdir(parents=True)
    big = folder / "mid.png"
    Image.new("1", (10000, 10000)).save(big)
    with pytest.raises(DataError, match=r"mid\.png is too large to read \(100,000,000 pixels\)"):
        load_image_folder(tmp_path / "device", [str(i) for i in range(10)], 1, 8, [0.5], [0.5])


def test_truncated_png_names_the_file(tmp_path):
    folder = tmp_path / "device" / "1"
    folder.mkdir(parents=True)
    image = folder / "cut.png"
    Image.effect_noise((32, 32), 64).save(image)
    image.write_bytes(image.read_bytes()[:300])
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "device", [str(i) for i in range(10)], 1, 8, [0.5], [0.5])
    message = str(err.value)
    assert str(image) in message and "()" not in message and "truncated" in message


def test_idx_file_with_a_bad_header_says_why(tmp_path, monkeypatch):
    """torchvision's IDX reader asserts on a bad header (an AssertionError without text): the message
    gives the error's type instead of an empty "()"."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "fm"
    folder.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / stem).write_bytes(b"\x00" * 32)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=folder)
    message = str(err.value)
    assert str(folder / "train-images-idx3-ubyte") in message and "()" not in message
    assert "corrupt (AssertionError)" in message
