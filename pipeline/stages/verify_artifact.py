"""`vitfold verify --artifact FILE --reference REF`: any artifact file (optimized, re-quantized, built by
trtexec, ...) checked against the model it claims to be, with verify's statistics, tolerances, outputs
(verify.json, verify.md, junit.xml) and verdict.

REF, the reference:

    a run directory     its folded model (fold/model.safetensors, integrity-checked as every stage input is);
                        end-to-end its unmerged adapted model; inputs: the run's verify sample (evaluation
                        and random images) and its labelled evaluation split, with the run's `verify:` settings
    FILE.safetensors    a folded model, loaded by timm alone (`backbones.load_folded`): backbone, its options
                        and head size from the file's vitfold metadata, else --backbone and --num-classes
    local-dir:FOLDER    a timm model folder (config.json + weights), `timm.create_model` reads it
    a timm name         with --checkpoint FILE (the whole model's weights, head included) and --num-classes

Without a run there are no labelled images: the inputs are `samples` seeded random images at the
reference's input size and normalisation, and no split statistics are computed (a precision judged on the
split, int8, then fails closed). The artifact's precision is read from the artifact (its graph or package,
`vitfold.export.artifact_precision`), never from its name; `precision` overrides it. An ONNX graph's input
and output are found from the graph (`input_name`/`output_name` choose among several). An artifact that runs
code (.pt, .pt2, .plan) is copied once into a private folder, hashed there, checked against the trust store
and loaded from that copy. Nothing is written into a run directory: RUN/verify/ is the run's record of its own
artifacts, so an output folder inside the reference run is refused; the default is ./verify-artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitfold.errors import VitfoldError, first_line
from vitfold.export import file_sha256
from vitfold.export.artifact_precision import artifact_precision
from vitfold.export.gate import Inputs, gate_result, judge, loosened_tolerances, random_images
from vitfold.export.runners import EXECUTABLE_RUNTIMES, open_hashed, open_runner, runtime_of
from vitfold.pipeline.backbones import create_backbone, load_checkpoint, load_folded
from vitfold.pipeline.config import VerifyConfig, load_config
from vitfold.pipeline.models import model_transform
from vitfold.pipeline.stages.backends import FOLDED, UNMERGED, folded_model, unmerged_model
from vitfold.pipeline.stages.rundir import RunDir
from vitfold.pipeline.stages.stage import Log
from vitfold.pipeline.stages.trust import require_trusted
from vitfold.pipeline.stages.verify import VERIFY, check_writable, run_inputs, write_results

DEFAULT_OUTPUT = Path("verify-artifact")
LOCAL_DIR = "local-dir:"
REFERENCE = "reference"  # the name of a reference that is not a run's folded model


def reference_run(reference: str) -> RunDir | None:
    """The run directory `reference` names (a folder with a run config), else None."""
    rd = RunDir(reference)
    return rd if rd.config_file.is_file() else None


def reference_model(
    reference: str,
    checkpoint: str | None = None,
    backbone: str | None = None,
    num_classes: int | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The model a reference that is not a run names (see the module's table), in eval mode."""
    import timm

    kwargs = dict(backbone_kwargs or {})
    if reference.startswith(LOCAL_DIR):
        if not Path(reference.removeprefix(LOCAL_DIR), "config.json").is_file():
            raise VitfoldError(f"--reference {reference}: no config.json in that folder (a timm model folder)")
        extra = {"num_classes": num_classes} if num_classes else {}
        try:
            return timm.create_model(reference, pretrained=True, **extra, **kwargs).eval()
        except Exception as e:  # noqa: BLE001 - weights a user's folder holds: a blocked pickle, a bad file
            raise VitfoldError(f"--reference {reference}: cannot load the model folder: {first_line(e)}") from None
    if reference.endswith(".safetensors"):
        path = Path(reference)
        meta = RunDir(path.parent).metadata(path)  # a missing or unreadable file: one line naming it
        backbone = backbone or meta.get("backbone")
        num_classes = num_classes or (int(meta["num_classes"]) if "num_classes" in meta else None)
        kwargs = json.loads(meta.get("backbone_kwargs", "{}")) | kwargs
        if backbone is None or num_classes is None:
            raise VitfoldError(f"--reference {path}: no vitfold metadata; say --backbone NAME and --num-classes N")
        return load_folded(path, backbone, num_classes, kwargs)
    if checkpoint is None or num_classes is None:
        raise VitfoldError(
            f"--reference {reference}: a timm name needs --checkpoint FILE (its weights) and --num-classes N "
            "(or give a run directory, a folded .safetensors or local-dir:FOLDER)"
        )
    model = create_backbone(reference, num_classes=num_classes, **kwargs)
    load_checkpoint(model, checkpoint)
    return model.eval()


def _settings(rd: RunDir | None, overrides: dict[str, Any]) -> VerifyConfig:
    """The run's verify settings (defaults without a run) with `overrides`, checked as the stage's are."""
    cfg = rd.config if rd is not None else load_config(None)
    return VERIFY.settings(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _output_folder(out_dir: str | Path | None, rd: RunDir | None) -> Path:
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUTPUT
    if rd is not None and out.resolve().is_relative_to(rd.path.resolve()):
        raise VitfoldError(
            f"--output {out} is inside the reference run {rd.path}, whose verify/ records its own artifacts: "
            "write the artifact's results elsewhere"
        )
    check_writable(out)
    return out


def _open_artifact(artifact: Path, runtime: str, device: str, trust: bool, io_names: dict[str, str | None]):
    """(the artifact's runner, its sha256): one that runs code is loaded from the private copy that was hashed
    and checked against the trust store (`open_hashed`), never by its path again."""
    if runtime not in EXECUTABLE_RUNTIMES:
        return open_runner(runtime, artifact, device, **io_names), file_sha256(artifact)
    hashed: list[str] = []

    def check(digest: str) -> None:
        require_trusted(artifact, digest, trust)
        hashed.append(digest)

    runner = open_hashed(runtime, artifact, check, device)
    return runner, hashed[0]


def verify_artifact(
    artifact: str | Path,
    reference: str,
    *,
    out_dir: str | Path | None = None,
    checkpoint: str | None = None,
    backbone: str | None = None,
    num_classes: int | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    precision: str | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    trust: bool = False,
    log: Log = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Check `artifact` against `reference` (see the module); `overrides`: verify settings (batch_sizes,
    samples, device, tolerances, eval_images). Writes verify.json, verify.md and junit.xml into `out_dir`
    and returns verify.json's content (`passed`: every row within its tolerance)."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise VitfoldError(f"--artifact {artifact} not found")
    if artifact.stat().st_size == 0:
        raise VitfoldError(f"--artifact {artifact} is empty")
    runtime = runtime_of(artifact)
    precision, read_from = (precision, "--precision") if precision else artifact_precision(artifact)
    rd = reference_run(reference)
    v = _settings(rd, overrides)
    tolerances, loosened = loosened_tolerances(v.tolerances, log, precisions=(precision,))
    io_names = {"input_name": input_name, "output_name": output_name}
    # the artifact opens first: a file that cannot load (or may not) fails before any work, with nothing written
    runner, digest = _open_artifact(artifact, runtime, v.device, trust, io_names)
    log(f"{artifact}: {runtime}, {precision} (from {read_from})")
    with runner:
        out = _output_folder(out_dir, rd)
        end_to_end = None
        if rd is not None:
            folded, name = folded_model(rd), FOLDED
            described = f"the run {rd.path}: its folded model, end-to-end its unmerged one"
            unmerged = unmerged_model(rd)
            inputs = run_inputs(rd, unmerged, v)
            with open_runner("torch", unmerged, v.device) as unmerged_runner:
                end_to_end = inputs.measure(UNMERGED, unmerged_runner, log)
        else:
            folded = reference_model(reference, checkpoint, backbone, num_classes, backbone_kwargs)
            name, described = REFERENCE, f"`{reference}`"
            t = model_transform(folded)
            images = random_images(t.mean, t.std, t.size, v.samples, torch.Generator().manual_seed(0))
            inputs = Inputs({"random": images}, tuple(v.batch_sizes))
        with open_runner("torch", folded, v.device) as ref_runner:
            expected = inputs.measure(name, ref_runner, log)
            checked = inputs.measure(runtime, runner, log)
            tolerance = tolerances[precision]
            rows, divergence = judge("artifact", precision, tolerance, checked, expected, end_to_end, inputs)
    result = gate_result(
        rows,
        {runtime: divergence} if divergence else {},
        v.device,
        inputs,
        {precision: tolerances[precision]},
        loosened,
        {},
        artifact={"path": str(artifact), "runtime": runtime, "sha256": digest, "precision_from": read_from},
        reference=described,
    )
    write_results(result, out, log)
    return result
