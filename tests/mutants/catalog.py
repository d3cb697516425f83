"""The mutants `make mutants` plants, one line-replacement each, with the tests expected to kill it.

Each is a bug a test in this repository is named for; a mutant that survives its tests means that test
no longer checks what it claims. A new gate adds its mutant here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # pytest node ids or files (relative to the repository root)


MUTANTS = (
    # -- the fold: formulas shared by the training forward and the fold (only the reference folds see these)
    Mutant("rlrr fold without the 1 +", "pipeline/adapters/rlrr.py",
           "scale = rows * columns + (1 if self.residual else 0)", "scale = rows * columns",
           ("tests/test_fold_matrix.py",)),
    Mutant("rlrr residual switch ignored (Table 6 ablation)", "pipeline/adapters/rlrr.py",
           "scale = rows * columns + (1 if self.residual else 0)", "scale = rows * columns + 1",
           ("tests/test_rlrr_layer.py",)),
    Mutant("rlrr k and v reuse q's input scale", "pipeline/adapters/rlrr.py",
           "columns = s_in.view(g, 1, in_features) if s_in is not None else 1",
           "columns = s_in[:1].expand(g, -1).reshape(g, 1, in_features) if s_in is not None else 1",
           ("tests/test_fold_matrix.py",)),
    Mutant("efft1 fc1 reads fc2's core slice", "pipeline/adapters/efft.py",
           "out[kind] = self.scale * (u[i] @ core[:, i]) @ v[i]",
           "out[kind] = self.scale * (u[i] @ core[:, i + 1]) @ v[i]",
           ("tests/test_fold_matrix.py",)),
    # -- training as the official code trains
    Mutant("rlrr shifts weight-decayed (the generic rule on vitfold's names)", "pipeline/adapters/rlrr.py",
           'official = name.removesuffix(".f") + ".shift_bias" if name.endswith(".f") else name', "official = name",
           ("tests/test_training_rules.py::test_rlrr_groups_are_the_official_ones",)),
    Mutant("efft dropout: one mask per factor shared by every block and layer", "pipeline/adapters/efft.py",
           "        t = t.expand(*copies, *t.shape)  # [*copies, *factor], no copy made\n"
           "        return F.dropout(t, self.dropout, training=True) if dropout else t",
           "        t = F.dropout(t, self.dropout, training=True) if dropout else t\n"
           "        return t.expand(*copies, *t.shape)",
           ("tests/test_training_rules.py::test_efft2_dropout_draws_masks_per_block_and_per_mlp_layer",)),
    Mutant("rlrr drop path per sample instead of the official element-wise dropout", "pipeline/drop_path.py",
           'return nn.Dropout(p) if mode == "elementwise" else DropPath(p)', "return DropPath(p)",
           ("tests/test_drop_path.py::test_elementwise_drop_path_is_the_official_dropout_in_training",)),
    Mutant("per-epoch schedule without the official loops' one-epoch lag", "pipeline/schedules.py",
           "for t in (max(e - 1, 0) for e in range(tc.total_epochs))", "for t in range(tc.total_epochs)",
           ("tests/test_plan.py::test_rlrr_vtab_plan_is_the_official_schedule",)),
    Mutant("best-val trains on val200 too", "pipeline/data.py",
           'train_split = "train800" if validation else "train800val200"', 'train_split = "train800val200"',
           ("tests/test_selection.py::test_best_val_trains_on_train800_and_folds_the_best_epoch_on_val200",)),
    Mutant("Swin qkv with one input scale per q, k, v (the ViT code's), not one shared", "pipeline/adapters/targets.py",
           "block_linears, block_norms = _block(model, prefix, qkv_groups=1, shifts=shifts)",
           "block_linears, block_norms = _block(model, prefix, qkv_groups=3, shifts=shifts)",
           ("tests/test_swin.py::test_rlrr_counts_on_swin_base_match_the_official_code",)),
    Mutant("Swin EFFT shared core reads per-layer slices", "pipeline/adapters/efft.py",
           'self.shared_core = opts.core == "shared"', "self.shared_core = False",
           ("tests/test_fold_matrix.py::test_fold_is_exact[efft2-swin-shared_core]",)),
    Mutant("efft head zero-initialised", "pipeline/adapters/efft.py",
           '        return "timm"', '        return "zero"',
           ("tests/test_training_rules.py::test_the_new_head_is_zero_for_rlrr_and_timm_random_for_efft",)),
    # -- export and verify
    Mutant("verify ignores every export backend but ONNX Runtime", "pipeline/stages/verify.py",
           "for name in requested or default_backends(rd, EXPORT_BACKENDS):",
           "for name in [n for n in requested or default_backends(rd, EXPORT_BACKENDS) if 'onnx' in n]:",
           ("tests/test_planted_faults.py::test_a_fault_in_one_artifact_fails_its_own_row[torchscript]",)),
    Mutant("fp16 ONNX: LayerNorm no longer kept in fp32", "export/fp16.py",
           "op_block_list=list(FP32_OPS)", "op_block_list=[o for o in FP32_OPS if o != 'LayerNormalization']",
           ("tests/test_export_formats.py::test_fp16_onnx_keeps_fragile_ops_fp32_and_io_fp32",)),
    Mutant("TensorRT 10: LayerNorm output types not pinned", "export/tensorrt.py",
           "layer.set_output_type(j, trt.float32)", "pass",
           ("tests/test_export_formats.py::test_tensorrt_fp16_build_choices_per_major_version",)),
    Mutant("block localisation blind to NaN", "export/comparison.py",
           "if not err <= threshold:", "if err > threshold:",
           ("tests/test_gate.py::test_localisation_treats_nan_as_divergence",)),
    Mutant("loosened tolerances hidden", "pipeline/stages/verify.py",
           "loosened = {p: loose for p, t in tolerances.items()", "loosened = {p: loose for p, t in {}.items()",
           ("tests/test_gate.py::test_loosened_tolerances_are_reported_everywhere",)),
    # -- the gate fails closed (issue 15)
    Mutant("a lost artifact is skipped", "pipeline/stages/backends.py",
           'if rd.artifact(fmt) in recorded_outputs(rd, "export"):', "if False:",
           ("tests/test_gate.py::test_a_lost_artifact_fails_verify_instead_of_being_skipped",)),
    Mutant("an unrecorded artifact is loaded", "pipeline/stages/manifest.py",
           "if key not in recorded and recorded_only:", "if False:",
           ("tests/test_gate.py::test_an_artifact_the_export_stage_did_not_record_is_never_loaded",)),
    Mutant("verify's staleness ignores dropped artifacts", "pipeline/stages/manifest.py",
           'gone = sorted(entry["inputs"].keys() - current.keys())', "gone = []",
           ("tests/test_gate.py::test_export_removes_formats_it_did_not_build_and_verify_goes_out_of_date",)),
    Mutant("untrusted executable artifacts are loaded", "pipeline/stages/trust.py",
           "if trust or _marker(digest).is_file():", "if True:",
           ("tests/test_run_state.py::test_an_executable_artifact_not_exported_here_needs_trust",)),
    Mutant("two writers share a run", "pipeline/stages/rundir.py",
           "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
           ("tests/test_run_state.py::test_a_second_writer_is_refused_while_the_first_holds_the_run",)),
    Mutant("a diverging training goes on", "pipeline/training.py",
           "if not math.isfinite(value):", "if False:",
           ("tests/test_run_state.py::test_a_diverging_training_stops_with_one_line_naming_the_step",)),
    # -- resume and the run
    Mutant("a stage left running is taken for finished", "pipeline/stages/manifest.py",
           'if entry.get("status") != "done":', "if False:",
           ("tests/test_faults.py::test_vitfold_run_killed_during_training_resumes_it_to_the_uninterrupted_adapter",)),
    Mutant("vitfold run exits 0 after a failed verify", "vitfold/cli.py",
           'if not read_manifest(rd)["stages"].get("verify", {}).get("passed", True):', "if False:",
           ("tests/test_planted_faults.py::test_vitfold_run_exits_1_when_verify_fails",)),
    Mutant("resume restores nothing but counters", "pipeline/training.py",
           '        load_adapter(self.model, state["adapter"])\n'
           '        self.optimizer.load_state_dict(state["optimizer"])\n'
           '        _set_rng_state(state["rng"])\n', "",
           ("tests/test_train.py::test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run",)),
    Mutant("resume forgets the RNG", "pipeline/training.py",
           '        _set_rng_state(state["rng"])\n', "",
           ("tests/test_train.py::test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run",)),
    # -- verify any artifact (issue 16)
    Mutant("elementwise bar: atol_needed at another rtol accepted", "export/comparison.py",
           'if stats.get("rtol") != rtol:', "if False:",
           ("tests/test_verify_artifact.py::test_elementwise_bar_fails_closed",)),
    Mutant("elementwise bar: rtol ignored", "export/comparison.py",
           '"atol_needed": float((diff - rtol * r.abs()).max()),', '"atol_needed": float(diff.max()),',
           ("tests/test_verify_artifact.py::test_elementwise_bar_against_a_hand_computation",)),
    Mutant("verify --artifact checks the reference against itself", "pipeline/stages/verify_artifact.py",
           "checked = inputs.measure(runtime, runner)", "checked = inputs.measure(runtime, ref_runner)",
           ("tests/test_verify_artifact.py::test_a_perturbed_onnx_copy_exits_1_and_names_its_block",)),
    # -- preprocessing and class names travel with the artifacts; bench and Triton refuse (issue 16)
    Mutant("bench checks only the exported artifacts, skipping a changed fold", "pipeline/stages/bench.py",
           "        check_backend(rd, name, ctx.trust)\n",
           "        name in ARTIFACT_BACKENDS and check_backend(rd, name, ctx.trust)\n",
           ("tests/test_deployment_metadata.py::test_bench_refuses_a_changed_folded_model_instead_of_skipping_it",)),
    Mutant("a Triton model folder replaced without --force", "export/triton.py",
           "if taken and not force:", "if False:",
           ("tests/test_deployment_metadata.py::"
            "test_triton_precisions_get_their_own_models_and_a_foreign_folder_needs_force",)),
    Mutant("the ONNX file loses its preprocessing and class names", "export/onnx.py",
           "onnx.helper.set_model_props(proto, metadata)", "pass",
           ("tests/test_deployment_metadata.py::"
            "test_onnx_metadata_and_export_json_carry_preprocessing_and_class_names",)),
    # -- fixtures that can see swaps: each survived while a fixture made two values coincide
    Mutant("recorded preprocessing swaps mean and std (seen only when they differ)", "pipeline/data.py",
           '"mean": tuple(self.mean),', '"mean": tuple(self.std),',
           ("tests/test_deployment_metadata.py::"
            "test_onnx_metadata_and_export_json_carry_preprocessing_and_class_names",)),
    Mutant("digit classes named by their indices (seen only when names are not indices)", "pipeline/data.py",
           "return [str(c) for c in spec.classes or range(10)]",
           "return [str(i) for i, _ in enumerate(spec.classes or range(10))]",
           ("tests/test_deployment_metadata.py::"
            "test_onnx_metadata_and_export_json_carry_preprocessing_and_class_names",)),
    Mutant("split agreement counted against the labels (seen only when agreement != accuracy)", "export/comparison.py",
           '"split_top1_agreement": float((predicted == reference).double().mean()),',
           '"split_top1_agreement": float((predicted == labels).double().mean()),',
           ("tests/test_precisions.py::test_split_stats_count_agreement_and_accuracy_change",)),
    Mutant("int8 calibrates on evaluation images (seen only when that split outnumbers the count)",
           "pipeline/stages/export.py",
           "train = build_splits(parse_data_spec(rd.config.data), transform).train",
           "train = build_splits(parse_data_spec(rd.config.data), transform).eval",
           ("tests/test_precisions.py::test_calibration_images_are_distinct_images_of_the_training_split",)),
    Mutant("export writes the unmerged model (seen only in the weights: folded ~ unmerged)",
           "pipeline/stages/export.py",
           "    model = folded_model(rd)\n",
           "    from vitfold.pipeline.stages.backends import unmerged_model\n\n    model = unmerged_model(rd)\n",
           ("tests/test_export.py::test_the_onnx_file_holds_the_folded_weights_not_the_base_and_an_adapter",)),
    Mutant("any vitfold cache trusts every artifact (seen only with a foreign cache that exists)",
           "pipeline/stages/trust.py",
           "if trust or _marker(digest).is_file():", "if trust or _marker(digest).parent.is_dir():",
           ("tests/test_run_state.py::test_an_executable_artifact_not_exported_here_needs_trust",)),
    Mutant("train names the best test epoch as the best-val one", "pipeline/training.py",
           'selected = max(scored, key=lambda r: r["select_acc"])',
           'selected = max(scored, key=lambda r: r["eval_acc"])',
           ("tests/test_selection.py::test_train_with_best_val_prints_and_returns_the_best_val_epoch",)),
)  # fmt: skip
