# Sourced by the device scripts (gpu_checks.sh, gpu_speed_checks.sh, swin_checks.sh): the device machine's
# image has torch, timm, onnx and onnxruntime but no vitfold install, so a shim folder maps the source tree
# onto the `vitfold` package (vitfold/, pipeline/ -> vitfold.pipeline, export/ -> vitfold.export), with
# benchmarks/ importable too. Sets SHIM (the folder) and PYTHONPATH.
SHIM=$(mktemp -d)
mkdir "$SHIM/vitfold"
cp vitfold/*.py "$SHIM/vitfold/"
ln -s "$PWD/pipeline" "$SHIM/vitfold/pipeline"
ln -s "$PWD/export" "$SHIM/vitfold/export"
export PYTHONPATH=$SHIM:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
