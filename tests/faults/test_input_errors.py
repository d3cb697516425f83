"""Input errors end in one line and exit 2, and leave the run as it was: nothing is written before the input
is validated, a failed import leaves nothing behind, and the leftover sweep never leaves the run directory."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import vitfold
from vitfold.cli import main
from vitfold.errors import AdapterError, CheckpointError
from vitfold.pipeline.config import load_config
from vitfold.pipeline.stages import RunDir
from vitfold.pipeline.stages import imported_run as import_stage
from vitfold.pipeline.stages.import_official import import_official
from vitfold.pipeline.stages.rollback import removed_on_failure

from helpers import QUIET, copy_run, make_vit
from official_states import KWARGS, NAME, SCALE, official_efft_state


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file of `root` by its relative path: its bytes (a link: where it points), links not followed."""
    found: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = f"-> {os.readlink(path)}"
            elif path.is_file():
                found[key] = path.read_bytes()
            else:
                found[key] = "folder"
    return found


def one_line_error(args: list[str], message: str) -> str:
    """`vitfold ARGS` exits 2 with one `Error:` line holding `message`, and no traceback; returns that line."""
    result = CliRunner().invoke(main, args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture
def run(exported_run, tmp_path) -> Path:
    return copy_run(exported_run, tmp_path / "run")


def _train_bad_backbone(run: Path) -> list[str]:
    return ["train", "--config", str(run / "config.yaml"), "--out", str(run), "--backbone", "vit_nope_xx"]


def _run_bad_backbone(run: Path) -> list[str]:
    bad = run.parent / "bad.yaml"
    bad.write_text((run / "config.yaml").read_text().replace("backbone: vit_tiny_patch16_224", "backbone: vit_nope_xx"))
    return ["run", "--config", str(bad), "--out", str(run)]


def _fold_tampered_adapter(run: Path) -> list[str]:
    with open(run / "train" / "adapter.safetensors", "ab") as f:
        f.write(b"tampered")
    return ["fold", str(run), "--base-mismatch-ok"]


def _export_over_a_linked_triton_folder(run: Path) -> list[str]:
    target = run.parent / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not vitfold's")
    (run.parent / "triton").mkdir()
    (run.parent / "triton" / "vit_tiny_patch16_224_onnx").symlink_to(target)
    return ["export", str(run), "--format", "onnx", "--triton", str(run.parent / "triton"), "--replace-triton"]


def _verify_tampered_onnx(run: Path) -> list[str]:
    with open(run / "export" / "model.onnx", "ab") as f:
        f.write(b"tampered")
    return ["verify", str(run), "--batch-sizes", "1"]


def _bench_without_the_backend(run: Path) -> list[str]:
    return ["bench", str(run), "--backends", "tensorrt", "--batch-sizes", "1"]


# Each command that records settings, made to fail once its options parse: (prepare the run -> args, message).
FAILING_CALLS = {
    "train": (_train_bad_backbone, "unknown backbone 'vit_nope_xx'"),
    "run": (_run_bad_backbone, "unknown backbone 'vit_nope_xx'"),
    "fold": (_fold_tampered_adapter, "adapter.safetensors does not match"),
    "export": (_export_over_a_linked_triton_folder, "is a symbolic link"),
    "verify": (_verify_tampered_onnx, "model.onnx"),
    "bench": (_bench_without_the_backend, "nothing to bench"),
}


@pytest.mark.parametrize("command", FAILING_CALLS)
def test_a_failing_command_leaves_the_run_byte_identical(run, command):
    prepare, message = FAILING_CALLS[command]
    args = prepare(run)
    before = snapshot(run)
    one_line_error(args, message)
    assert snapshot(run) == before  # config.yaml, manifest.json and every artifact as they were
    if command == "export":
        assert sorted(p.name for p in (run.parent / "elsewhere").iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("out", ["new", "runs/deeper/new"])
def test_a_refused_train_into_a_new_folder_leaves_no_folder_behind(run, out):
    """`--out` that did not exist, and its new parents, are gone again after an input error; the folder
    that held them is as it was."""
    before = snapshot(run.parent)
    target = run.parent / out
    one_line_error([*_train_bad_backbone(run)[:-4], "--out", str(target), "--backbone", "vit_nope_xx"], "vit_nope_xx")
    assert snapshot(run.parent) == before


def test_train_writes_its_config_once_backbone_and_data_resolve(run):
    """The repro of the bug: the rewritten config said `backbone: vit_nope_xx`; a good call still saves it."""
    one_line_error(["train", "--config", str(run / "config.yaml"), "--out", str(run), "--data", "digits:7-3"], "digits")
    assert "vit_tiny_patch16_224" in (run / "config.yaml").read_text()
    config = run.parent / "c.yaml"
    config.write_text((run / "config.yaml").read_text().replace("seed: 0", "seed: 5"))
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(run / "new")])
    assert result.exit_code == 0, result.output
    assert "seed: 5" in (run / "new" / "config.yaml").read_text()


# -- import-official: unreadable files, wrong contents, and what a failure leaves ---------------------------


def _efft_checkpoint(path: Path, **changes: torch.Tensor) -> Path:
    torch.save({"epoch": 9, "model_state_dict": {**official_efft_state(per_layer=False), **changes}}, path)
    return path


BAD_CHECKPOINTS = {
    "a pickle named .safetensors": ("x.safetensors", lambda p: torch.save({"a": torch.ones(2)}, p), "safetensors"),
    "an empty .safetensors": ("x.safetensors", lambda p: p.write_bytes(b""), "safetensors"),
    "a truncated .safetensors": (
        "x.safetensors",
        lambda p: [save_file({"a": torch.ones(64)}, p), p.write_bytes(p.read_bytes()[:60])],
        "safetensors",
    ),
    "a .pth holding a list": ("x.pth", lambda p: torch.save([torch.ones(2)], p), "holds a list"),
    "a .pth holding a bare tensor": ("x.pth", lambda p: torch.save(torch.ones(2), p), "holds a Tensor"),
    "a NaN factor": ("x.pth", lambda p: _efft_checkpoint(p, EFFTu1=torch.full((192, 4), float("nan"))), "NaN"),
    "an integer head": ("x.pth", lambda p: _efft_checkpoint(p, **{"head.bias": torch.arange(3)}), "torch.int64"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_import_official_refuses_a_bad_checkpoint_by_name(tmp_path, case):
    name, write, message = BAD_CHECKPOINTS[case]
    write(tmp_path / name)
    args = ["import-official", str(tmp_path / name), "--method", "efft2", "-o", f"scale={SCALE}"]
    line = one_line_error([*args, "--backbone", NAME, "--out", str(tmp_path / "run")], message)
    assert str(tmp_path / name) in line
    assert not (tmp_path / "run").exists()


def test_import_official_names_the_non_finite_tensor(tmp_path):
    path = _efft_checkpoint(tmp_path / "x.pth", EFFTc2=torch.full((4, 4, 2), float("inf")))
    cfg = load_config(None, backbone=NAME, backbone_kwargs=KWARGS, method="efft2", method_options={"scale": SCALE})
    with pytest.raises(CheckpointError, match=r"tensor 'efft\.C2' has 32 non-finite"):
        import_official("efft2", path, tmp_path / "run", cfg, **QUIET)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, CheckpointError])
def test_a_failed_import_leaves_no_lock_and_no_import_folder(tmp_path, monkeypatch, interruption):
    path = _efft_checkpoint(tmp_path / "official.pth")
    cfg = load_config(None, backbone=NAME, backbone_kwargs=KWARGS, method="efft2", method_options={"scale": SCALE})
    written = []

    def fail_after_the_backbone(model, adapter: Path, **metadata):  # import/ and config.yaml are written by now
        written.append(sorted(p.name for p in adapter.parent.parent.iterdir()))
        raise interruption("stopped")

    monkeypatch.setattr(import_stage, "save_adapter", fail_after_the_backbone)
    with pytest.raises(interruption):
        import_official("efft2", path, tmp_path / "run", cfg, **QUIET)
    assert written == [[".vitfold.lock", "config.yaml", "import"]]  # the failure came late: there was something
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")  # a folder that existed keeps what was in it
    with pytest.raises(interruption):
        import_official("efft2", path, tmp_path / "kept", cfg, **QUIET)
    assert snapshot(tmp_path / "kept") == {"notes.txt": b"mine"}


def test_sigterm_inside_an_import_removes_what_it_created(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "before.txt").write_text("kept")
    with pytest.raises(SystemExit) as ended, removed_on_failure(tmp_path / "run"):
        (tmp_path / "run" / "import").mkdir()
        (tmp_path / "run" / "import" / "backbone.safetensors").write_bytes(b"half")
        (tmp_path / "run" / ".vitfold.lock").touch()
        os.kill(os.getpid(), signal.SIGTERM)
    assert ended.value.code == 128 + signal.SIGTERM
    assert snapshot(tmp_path / "run") == {"before.txt": b"kept"}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back


# -- other inputs -----------------------------------------------------------------------------------------


def test_local_dir_reference_with_a_blocked_pickle_is_one_line(run, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_bytes((run / "fold" / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cbuiltins\nprint\n\x94.")  # pickle calling print
    args = ["verify", "--artifact", str(run / "export" / "model.onnx"), "--reference", f"local-dir:{folder}"]
    one_line_error([*args, "--output", str(tmp_path / "out")], f"local-dir:{folder}")


@pytest.mark.parametrize("name", ["timm/vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg/x", "hf-hub:a/b"])
def test_backbone_name_with_a_path_is_one_line(name):
    one_line_error(["info", "--backbone", name], f"backbone '{name}'")


@pytest.mark.parametrize(("method", "layer"), [("efft2", "blocks.0.attn.qkv"), ("lora", "blocks.0.attn.qkv")])
def test_a_rank_larger_than_the_layer_is_refused_before_allocation(tiny_vit, method, layer):
    width = tiny_vit.embed_dim
    options = {"scale": 1.0} if method == "efft2" else {}
    with pytest.raises(AdapterError, match=rf"'rank' \(100000\).*'{layer}' \(at most {width}\)"):
        vitfold.adapt(tiny_vit, method, rank=100000, **options)  # 100000² floats per core: would not fit
    vitfold.adapt(make_vit(NAME, **KWARGS), method, rank=width, **options)  # the largest rank that fits
    one_line_error(["info", "--backbone", "vit_tiny_patch16_224", "--method", method, "--rank", "100000"], layer)


def test_verify_on_a_read_only_run_says_to_use_output(run, tmp_path, monkeypatch):
    """A run the user may not write (the lock file cannot be opened for writing: as root, which ignores
    permissions, the refusal is planted) gets one line naming --output; with --output it verifies."""
    from vitfold.pipeline.stages import rundir

    opened = os.open

    def read_only(path, flags, *args):
        if Path(path).is_relative_to(run) and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, flags, *args)

    for folder, dirs, files in os.walk(run):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.chmod(name, os.stat(name).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:
        monkeypatch.setattr(rundir.os, "open", read_only)
    before = snapshot(run)
    one_line_error(["verify", str(run), "--backends", "onnxruntime"], "verify a read-only run with --output DIR")
    args = ["verify", str(run), "--backends", "onnxruntime", "--batch-sizes", "1", "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "verify.json").is_file()
    assert snapshot(run) == before


# -- the leftover sweep ------------------------------------------------------------------------------------


def test_the_leftover_sweep_never_follows_a_link_out_of_the_run(tmp_path):
    outside = tmp_path / "outside"
    (outside / ".export-abc").mkdir(parents=True)
    (outside / ".export-abc" / "model.onnx").write_bytes(b"someone else's")
    (outside / ".notes.txt.tmp").write_text("someone else's")
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / ".metrics.csv.x.tmp").write_text("cut short")  # a leftover of the run's own
    (run / "export").symlink_to(outside)
    (run / "linked").symlink_to(outside)
    with RunDir(run).locked():
        pass
    assert not (run / "train" / ".metrics.csv.x.tmp").exists()  # the sweep ran
    assert snapshot(outside) == {
        ".export-abc": "folder",
        ".export-abc/model.onnx": b"someone else's",
        ".notes.txt.tmp": b"someone else's",
    }
