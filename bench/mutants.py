"""
Mutation testing, our own (no dependency): each mutant changes one line of the code the way a real bug would
(a flipped comparison, a dropped check, an off-by-one, a wrong scale, a wrong table entry), the tests that cover
that file run against it, and should fail: the mutant is "killed". One that survives is behaviour no test pins
down. They cover the checkpoint core and every file whose output users read (metrics, exports, sampling, data).

$ python bench/mutants.py                   # every mutant: a few hours on a 2-core CPU; --only for a part
$ python bench/mutants.py --only commit.py  # the mutants whose file, line or description contains the text
$ python bench/mutants.py --list            # the mutants, and whether each still matches exactly one line

Each mutant runs in a fresh copy of the repository (the files git tracks, plus the prepared data), so the
checkout is never touched. Mutants marked equivalent (they cannot change behaviour, the reason says why) are
run too and counted apart: if one is killed, the reason was wrong.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the tests that cover each file, fastest first (-x stops at the first failure)
TESTS = {
    'model.py': ['tests/test_model.py', 'tests/test_modded_lora.py', 'test_checkpoint_loading.py', 'tests/test_sampling.py',
                 'tests/test_finetune_xlsum.py',
                 'tests/test_checkpoint.py::test_fast_load_is_tied_trainable_and_exact',
                 'tests/test_checkpoint.py::test_same_adapters_are_restored_other_alpha_starts_fresh',
                 'tests/test_checkpoint.py::test_legacy_seed_api',
                 'tests/test_interop.py::test_import_hugging_face_directory_gives_transformers_logits'],
    'core/commit.py': ['tests/test_reliability.py::test_single_file_is_written_beside_and_renamed_into_place',
                       'tests/test_reliability.py::test_disk_full_at_each_write_step',
                       'tests/test_reliability.py::test_damaged_bundle_is_named_and_refused',
                       'tests/test_reliability.py::test_files_beside_a_bundle_are_carried_over',
                       'tests/test_reliability.py::test_reader_uses_a_complete_interrupted_save',
                       'tests/test_reliability.py::test_an_empty_directory_where_the_checkpoint_goes_does_not_block_recovery',
                       'tests/test_checkpoint.py::test_bundle_layout_and_contents',
                       'tests/test_checkpoint.py::test_config_json_grows_and_shrinks_safely',
                       'tests/test_reliability.py::test_resume_after_crash_mid_save',
                       'tests/test_reliability.py::test_a_second_writer_of_a_checkpoint_directory_is_refused_and_the_first_run_loses_nothing',
                       'tests/test_checkpoint.py::test_the_lora_merge_overlapped_with_the_write_gives_the_same_bytes',
                       'tests/test_bad_input.py::test_bad_input_exits_1_with_one_clear_message[generate.py: a config file]'],
    'core/peft_adapter.py': ['tests/test_peft.py'],
    'core/fsdp.py': ['tests/test_fsdp.py'],
    'test_checkpoint_loading.py': ['test_checkpoint_loading.py'],
    'core/bundle.py': ['tests/test_checkpoint.py', 'test_checkpoint_compatibility.py::test_optimizer_by_name'],
    'core/kind.py': ['tests/test_checkpoint.py', 'tests/test_peft.py', 'tests/test_probe.py'],
    'train.py': ['test_checkpoint_compatibility.py::test_same_config_resume_standard',
                 'tests/test_scale.py::test_torchrun_two_processes_then_resume_with_one_and_with_lora',
                 'tests/test_fsdp.py::test_it_resumes_on_another_number_of_processes'],
    'finetune_hindi_xnli.py': ['tests/test_finetune_xnli.py::test_metrics_on_a_hand_made_example',
        'tests/test_finetune_xnli.py::test_the_loss_of_an_evaluation_is_the_mean_over_examples_not_over_batches',
        'tests/test_finetune_xnli.py::test_class_weights_are_inverse_class_frequencies',
        'tests/test_finetune_xnli.py::test_the_best_model_is_the_most_accurate_and_at_equal_accuracy_the_lower_loss',
        'tests/test_finetune_xnli.py::test_steps_per_epoch_and_the_warmup_follow_the_batch_accumulation_and_ratio',
        'tests/test_finetune_xnli.py::test_the_schedule_keeps_each_groups_own_learning_rate_and_their_ratio',
        'tests/test_finetune_xnli.py::test_pair_encoding_joins_with_the_tokenizers_eot_id_and_truncates_the_premise_first',
        'tests/test_finetune_xnli.py::test_pooling_takes_the_real_last_token_not_the_last_non_zero_id',
        'tests/test_finetune_xnli.py::test_padding_does_not_change_the_classifiers_output',
        'tests/test_finetune_xnli.py::test_end_to_end_train_evaluate_and_resume'],
    'core/finetune_data.py': ['tests/test_finetune_xnli.py::test_every_accepted_label_form_maps_to_its_class',
        'tests/test_finetune_xnli.py::test_tsv_reader_keeps_the_language_and_maps_gold_labels',
        'tests/test_finetune_xnli.py::test_jsonl_json_and_csv_readers_with_custom_columns',
        'tests/test_finetune_xnli.py::test_unknown_label_names_the_row_and_value',
        'tests/test_finetune_xnli.py::test_missing_column_lists_the_columns_found',
        'tests/test_finetune_xnli.py::test_splits_hold_out_a_seeded_tenth_of_xnli_dev',
        'tests/test_finetune_datasets.py'],
    'core/tokenizer.py': ['tests/test_data.py',
        'tests/test_hf_tokenizer.py'],
    'core/hf.py': ['tests/test_probe.py', 'tests/test_interop.py',
        'tests/test_peft.py::test_a_lora_run_without_biases_goes_to_peft_with_zero_biases_in_its_base'],
    'core/nanogpt.py': ['tests/test_probe.py', 'tests/test_interop.py::test_export_to_nanogpt_resumes_like_nanogpt',
        'tests/test_user_paths.py'],
    'load_checkpoint_helper.py': ['test_checkpoint_loading.py', 'tests/test_finetune_xlsum.py'],
    'generate.py': ['tests/test_sampling.py'],
    'sample.py': ['tests/test_sampling.py'],
    'configurator.py': ['tests/test_configurator.py'],
    'core/args.py': ['tests/test_bad_input.py::test_bad_input_exits_1_with_one_clear_message[generate.py: a misspelt option]',
        'tests/test_bad_input.py::test_bad_input_exits_1_with_one_clear_message[finetune_hindi_xnli.py: abbreviated flag]',
        'tests/test_bad_input.py::test_bad_input_exits_1_with_one_clear_message[generate.py: --top_k 0]',
        'test_checkpoint_loading.py::test_command_line'],
    'core/checkpoint.py': ['tests/test_sampling.py::test_meta_names_the_vocabulary_of_every_kind',
                           'tests/test_sampling.py::test_sample_py_takes_the_vocabulary_of_a_checkpoint_that_stores_none'],
    'data/prepare.py': ['tests/test_data.py'],
    'finetune_xlsum.py': ['tests/test_finetune_xlsum.py'],
    'core/generation_data.py': ['tests/test_finetune_xlsum.py'],
    'core/beam_search.py': ['tests/test_finetune_xlsum.py'],
    'core/generative_models.py': ['tests/test_finetune_xlsum.py'],
    'core/text_metrics.py': ['tests/test_text_metrics.py'],
    'core/probe.py': ['tests/test_probe.py'],
    'core/classifier.py': ['tests/test_finetune_xlsum.py', 'tests/test_finetune_xnli.py::test_end_to_end_train_evaluate_and_resume'],
    'core/training.py': ['tests/test_checkpoint.py::test_lr_schedule_is_nanogpts',
                         'tests/test_checkpoint.py::test_train_step_accumulates_clips_and_prefetches',
                         'tests/test_checkpoint.py::test_estimate_loss_is_the_same_sample_each_time_in_eval_mode',
                         'tests/test_checkpoint.py::test_save_checkpoint_stores_the_pending_batch_random_state',
                         'tests/test_checkpoint.py::test_checkpoint_manager_fresh_then_resume'],
}

# (file, a text on exactly one line ('function::text' to look in one function only), what replaces that text,
#  what the mutant breaks[, why it is equivalent: it cannot change behaviour])
MUTANTS = [
    # core/peft_adapter.py: peft's layout, both ways
    ('core/peft_adapter.py', "tensors[f'{PREFIX}lm_head.lora_B.weight'] = A",
     "tensors[f'{PREFIX}lm_head.lora_B.weight'] = A.clone().zero_()", "the tied head's share of the update dropped"),
    ('core/peft_adapter.py', "tensors[f'{PREFIX}transformer.wte.lora_embedding_A'] = A.t()",
     "tensors[f'{PREFIX}transformer.wte.lora_embedding_A'] = A", "the embedding's A exported untransposed"),
    ('core/peft_adapter.py', "if field in HARMLESS or value in OFF and field != 'init_lora_weights':",
     "if True:", "every peft setting accepted"),
    ('core/peft_adapter.py', "settings[field] = ranks.pop() if ranks else 0", "settings[field] = 0",
     "the adapter's ranks not read"),
    ('core/peft_adapter.py', "own_base = os.path.realpath(base_path) == os.path.realpath(Path(path) / BASE_DIR)",
     "own_base = True", "an adapter's step and val loss taken onto another base"),
    ('core/commit.py', "taken = lock_writer(final_dir) # before recover()", "taken = False # before recover()",
     "a commit without the directory's writer lock"),
    ('test_checkpoint_loading.py', "        if diff > FEATURE_TOLERANCE:", "        if False:",
     "the modded tool never compares the converted model with the small model's own"),
    # core/fsdp.py: FSDP checkpoints' files
    ('core/fsdp.py', "return {k: copy(v) for k, v in tensors.items()}", "return tensors",
     "a background sharded save writes the live tensors, which training changes meanwhile"),
    ('core/fsdp.py', "if (module, name) in ALLOWED or", "if True or", "any class named in DCP's index unpickled"),
    ('core/fsdp.py', "open_shards::verify_file(directory, name, manifest)", "pass", "the shards' checksums never verified"),
    ('core/fsdp.py', "return name == METADATA or re.fullmatch(r'__\\d+_\\d+\\.distcp', name) is not None",
     "return name == METADATA", "another save's shards left beside a new save's"),
    # model.py: the key rules
    ('model.py', "return key.replace('.main_weight.', '.')", "return key", "adapter main weights keep their name"),
    ('model.py', "while k.startswith(WRAPPER_PREFIXES):", "if k.startswith(WRAPPER_PREFIXES):",
     "only one wrapper prefix stripped (module._orig_mod.)"),
    ('model.py', "if A.shape[0] == B.shape[1] and weight.shape == (B.shape[0], A.shape[1]):",
     "if A.shape[0] == B.shape[1]:", "linear LoRA factors not checked against their weight"),
    ('model.py', "left, right, rank = A, B.t(), A.shape[1]", "left, right, rank = A, B.t(), B.shape[1]",
     "embedding rank read from B", "A [V, r] and B [D, r] share r: A.shape[1] == B.shape[1] is the branch's condition"),
    ('model.py', "alpha=lora_alpha / rank)", "alpha=lora_alpha)", "update scaled by alpha, not alpha/r"),
    ('model.py', "alpha=lora_alpha / rank).to(weight.dtype)", "alpha=lora_alpha / rank)", "merged weight left in fp32"),
    ('model.py', "if lora_alpha is None:", "if lora_alpha is None and False:", "LoRA factors merged with no alpha"),
    ('model.py', "if not torch.isfinite(merged.sum()):", "if torch.isnan(merged.sum()):", "an inf in a merged adapter passes"),
    ('model.py', "merged_embedding |= module == 'transformer.wte'", "merged_embedding |= False",
     "the head not replaced by the merged embedding"),
    ('model.py', "elif wte is not None and head.data_ptr() != wte.data_ptr() and not torch.equal(head, wte):",
     "elif wte is not None and head.data_ptr() != wte.data_ptr():", "an equal copy of the tied head refused"),
    ('model.py', "out[standard_key(k)] = v", "out[k] = v", "main_weight keys left in the merged state dict"),
    ('model.py', "if k not in target and f'{module}.main_weight.{leaf}' in target:",
     "if f'{module}.main_weight.{leaf}' in target:", "remap even when the key exists",
     "a module is either plain or an adapter: X.weight and X.main_weight.weight are never both in a model"),
    ('model.py', "k, remapped = f'{module}.main_weight.{leaf}', remapped + 1",
     "k, remapped = f'{module}.main_weight.{leaf}', remapped + 2", "remapped count off"),
    ('model.py', "factors = [k for k in target if k not in mapped and is_lora_factor(k)]",
     "factors = [k for k in target if k not in mapped]", "a missing base weight allowed like a LoRA factor"),
    ('model.py', "restore = {m for m in restore if all(k in adapters and adapters[k].shape == target[k].shape",
     "restore = {m for m in restore if all(k in adapters", "adapters of another rank restored"),
    ('model.py', "merge_lora_factors(mapped[base], A, B, -model.config.lora_alpha)",
     "merge_lora_factors(mapped[base], A, B, model.config.lora_alpha)",
     "restored update added to the base, not taken out"),
    ('model.py', "if 'transformer.wte' in restore:", "if False:", "the head not tied to the restored base table"),
    ('model.py', "on_meta = any(p.is_meta", "on_meta = all(p.is_meta", "meta detection by all()",
     "a model is built on the meta device as a whole or not at all"),
    ('model.py', "model.token_table().weight = model.lm_head.weight  # assign gave", "pass  # assign gave",
     "head and table untied after a fast load"),
    ('model.py', "for m in fresh:", "for m in []:", "stale adapters kept instead of starting fresh"),
    ('model.py', "missing = [k for k in target if k not in mapped and k not in allowed_missing]",
     "missing = [k for k in target if k not in mapped and k in allowed_missing]", "missing keys not reported"),
    ('model.py', "misshapen = [k for k in mapped if k in target and mapped[k].shape != target[k].shape]",
     "misshapen = [k for k in mapped if k in target and mapped[k].shape == target[k].shape]", "shape check inverted"),
    ('model.py', "if not (missing or unexpected or misshapen):", "if not (missing or misshapen):",
     "unexpected keys let through to load_state_dict"),

    # core/commit.py: crash-safe writes, manifests, verified reads
    ('core/commit.py', "tmp = path if in_commit else path.with_name", "tmp = path if True else path.with_name",
     "a single file written in place"),
    ('core/commit.py', "os.fsync(f.fileno())", "pass", "a file's data never fsynced"),
    ('core/commit.py', "tmp.unlink(missing_ok=True)", "pass", "a failed write leaves its temporary file"),
    ('core/commit.py', "atomic_write::fsync_dir(path.parent)", "pass", "the rename of a single file not made durable"),
    ('core/commit.py', "if size != entry['size'] and name not in editable:", "if size != entry['size']:",
     "a JSON file edited by hand refused"),
    ('core/commit.py', "if not path.is_file():", "if False:", "a listed file that is missing not named"),
    ('core/commit.py', "kind = 'xxh3_64' if 'xxh3_64' in entry else 'crc32'", "kind = 'xxh3_64'",
     "version-1 (crc32) manifests no longer verified"),
    ('core/commit.py', "or file_checksum(path, kind) != entry[kind]:", ":", "checksums not compared"),
    ('core/commit.py', "return read_manifest(directory) is not None and check_sizes(directory) is not None",
     "return read_manifest(directory) is not None", "a truncated interrupted save counts as complete"),
    ('core/commit.py', "interrupted_save::siblings(final_dir, SAVING) + siblings(final_dir, PREVIOUS)",
     "siblings(final_dir, PREVIOUS)", "the complete new save ignored after a crash"),
    ('core/commit.py', "if missing(final_dir):", "if not final_dir.exists():",
     "an empty directory where the checkpoint goes blocks recovery"),
    ('core/commit.py', "if p.name not in written and not replaced(p.name) and p.name != MANIFEST_FILE)",
     "if p.name not in written and p.name != MANIFEST_FILE)", "old bundle files carried into a deploy-only save"),
    ('core/commit.py', "carry_over(final_dir, tmp, kept)", "pass", "a user's files beside the bundle lost"),
    ('core/commit.py', "files.update({name: old_entries[name] for name in kept if name in old_entries})", "pass",
     "carried files dropped from the manifest"),
    ('core/commit.py', "files = {name: WRITTEN.pop(str(tmp / name), None) or",
     "files = {name: WRITTEN.get(str(tmp / name), None) or", "the checksum cache not emptied",
     "the entry is the same either way; a leftover is keyed by the pid-named directory, never read again"),
    ('core/commit.py', "fsync_dir(tmp)", "pass", "the new bundle's entries not made durable"),
    ('core/commit.py', "os.rename(old, final_dir) # the swap itself failed", "pass # the swap itself failed",
     "a failed swap leaves the old checkpoint aside"),
    ('core/commit.py', "fsync_dir(final_dir.parent) # committed", "pass # committed",
     "the commit rename not made durable"),

    # core/bundle.py and core/kind.py: optimizer state by name, random state, resume
    ('core/bundle.py', "return {'state': {names[i]: s for i, s in positional['state'].items()},",
     "return {'state': {names[i - 1]: s for i, s in positional['state'].items()},", "state named off by one"),
    ('core/bundle.py', "'params': [names[i] for i in g['params']]}", "'params': g['params']}",
     "param groups keep positions"),
    ('core/bundle.py', "named_optimizer_state::name_of = {id(p): standard_key(n)",
     "name_of = {id(p): n", "state saved under adapter names"),
    ('core/bundle.py', "if 'exp_avg' in s and s['exp_avg'].shape != params[i][1].shape:", "if False:",
     "shapes of a positional state not checked"),
    ('core/bundle.py', "name_of = {id(p): (n, standard_key(n))",
     "name_of = {id(p): (n, n)", "state looked up under adapter names"),
    ('core/bundle.py', "if s and all(v.shape == p.shape for v in s.values() if torch.is_tensor(v) and v.dim() > 0):",
     "if s:", "optimizer state of another shape applied"),
    ('core/bundle.py', "if torch.is_tensor(v) and v.dim() > 0):", "if torch.is_tensor(v) and v.dim() >= 0):",
     "the 0-d step compared with the parameter's shape"),
    ('core/bundle.py', "torch.set_rng_state(unb64(state['torch']))", "pass", "random state not restored"),
    ('core/bundle.py', "if 'cuda' in state and torch.cuda.is_available():", "if 'cuda' in state:",
     "a GPU run's random state set on a CPU", "without CUDA, torch.cuda.set_rng_state_all is queued lazily, never run"),
    ('core/kind.py', "same_alpha = saved.get('lora_alpha') == model.config.lora_alpha",
     "same_alpha = saved.get('lora_alpha') != model.config.lora_alpha", "adapters restored for the wrong alpha"),
    ('core/kind.py', "report = load_universal_state_dict(model, weights, lora_alpha=self.lora_alpha, source=self.path,",
     "report = load_universal_state_dict(model, weights, lora_alpha=None, source=self.path,", "a legacy LoRA file's alpha ignored"),

    # core/training.py: LR schedule, one step, evaluation, the save block
    ('core/training.py', "coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))",
     "coeff = 0.5 * (1.0 - math.cos(math.pi * decay_ratio))", "cosine decay inverted (the LR rises)"),
    ('core/training.py', "if it < warmup_iters:", "if it <= warmup_iters:",
     "warmup one step longer (the peak LR where warmup meets lr_decay_iters)"),
    ('core/training.py', "if it >= lr_decay_iters:", "if it > lr_decay_iters:",
     "the cosine at lr_decay_iters (0/0 when warmup equals it)"),
    ('core/training.py', "return min_lr + coeff * (learning_rate - min_lr)", "return coeff * learning_rate",
     "decays to 0, not min_lr"),
    ('core/training.py', "if not decay_lr:", "if decay_lr:", "decay_lr inverted"),
    ('core/training.py', "model.require_backward_grad_sync = (micro_step == grad_accum_steps - 1)",
     "model.require_backward_grad_sync = (micro_step == grad_accum_steps)", "DDP never syncs gradients"),
    ('core/training.py', "loss = loss / grad_accum_steps # scale", "loss = loss # scale",
     "accumulated gradient not averaged"),
    ('core/training.py', "X, Y = next_batch()", "next_batch()", "the same batch used again"),
    ('core/training.py', "if grad_clip != 0.0:", "if grad_clip == 0.0:", "clipping inverted"),
    ('core/training.py', "scaler.unscale_(optimizer)", "pass", "fp16 gradients clipped while scaled"),
    ('core/training.py', "optimizer.zero_grad(set_to_none=True)", "pass", "gradients accumulate across steps"),
    ('core/training.py', "estimate_loss::model.eval()", "pass", "evaluation with dropout on"),
    ('core/training.py', "estimate_loss::model.train()", "pass", "the model left in eval mode"),
    ('core/training.py', "manual_seed(seed)", "manual_seed(seed + len(out))",
     "val drawn from another seed than train"),
    ('core/training.py', "extra = {'rng': rng or rng_state()}", "extra = {'rng': rng_state()}",
     "the save stores the current random state, not the pending batch's"),
    ('core/training.py', "if scaler is not None and scaler.is_enabled():", "if scaler is not None:",
     "a disabled scaler's empty state saved"),
    ('core/commit.py', "                    done.wait()", "                    pass", "model.pt written before its LoRA merges are done"),
    ('train.py', "shard_by_shard = fsdp and ckpt.loads_shard_by_shard(", "shard_by_shard = False and (",
     "under FSDP every process reads the whole checkpoint, never only its own shards"),
    ('train.py', "if evaluation_due(iter_num + 1):", "if evaluation_due(iter_num):",
     "the random state read a step early: a resume draws another batch than the interrupted run"),
    # finetune_hindi_xnli.py: the fine-tune's metrics, its choice of best/, its schedule and class weights
    ('finetune_hindi_xnli.py', "'f1_score': f1_score(gold, pred, average='macro'",
     "'f1_score': f1_score(gold, pred, average='micro'", "the fork's F1 micro- instead of macro-averaged"),
    ('finetune_hindi_xnli.py', 'fbeta_score(gold, pred, beta=2,',
     'fbeta_score(gold, pred, beta=1,', 'F2 computed as F1'),
    ('finetune_hindi_xnli.py', "'recall': recall_score(gold, pred, average='macro'",
     "'recall': recall_score(gold, pred, average='weighted'", 'recall weighted by class size'),
    ('finetune_hindi_xnli.py', "'macro_f1': sum(f1) / len(f1)",
     "'macro_f1': sum(f1) / max(1, len(set(gold)))", 'macro-F1 averaged over the classes in gold only'),
    ('finetune_hindi_xnli.py', 'cm[c][c] / sum(cm[c]) if sum(cm[c])',
     'cm[c][c] / sum(row[c] for row in cm) if sum(cm[c])', 'per-class accuracy is precision, not recall'),
    ('finetune_hindi_xnli.py', "return {'loss': loss_sum / len(data),",
     "return {'loss': loss_sum / -(-len(data) // batch_size),", 'the validation loss averaged over batches, not examples'),
    ('finetune_hindi_xnli.py', "(val['accuracy'], -val['loss']) > (best['accuracy'], -best['loss'])",
     "(-val['loss'], val['accuracy']) > (-best['loss'], best['accuracy'])", 'best/ chosen by loss, not accuracy'),
    ('finetune_hindi_xnli.py', "(val['accuracy'], -val['loss']) > (best['accuracy'], -best['loss'])",
     "(val['accuracy'], -val['loss']) >= (best['accuracy'], -best['loss'])", 'a tie replaces the earlier best'),
    ('finetune_hindi_xnli.py', 'return counts.sum() / (num_classes * counts.clamp(min=1))',
     'return counts / counts.sum()', 'class weights proportional to frequency, not inverse'),
    ('finetune_hindi_xnli.py', 'warmup_steps = int(args.warmup_ratio * total_steps)',
     'warmup_steps = int(args.warmup_ratio * total_steps / args.num_epochs)', 'warmup a ratio of one epoch, not of the run'),
    ('finetune_hindi_xnli.py', 'steps_per_epoch = math.ceil(num_train / (args.batch_size * args.gradient_accumulation_steps))',
     'steps_per_epoch = math.ceil(num_train / args.batch_size)', 'gradient accumulation ignored in the step count'),
    ('finetune_hindi_xnli.py', 'return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))',
     'return 0.5 * (1 + math.cos(math.pi * progress))', 'cosine decays to 0, not to 10%'),
    ('finetune_hindi_xnli.py', 'if args.no_decay_lr:',
     'if False:', '--no_decay_lr ignored'),
    ('finetune_hindi_xnli.py', 'for piece in reversed(ids):',
     'for piece in ids:', 'the hypothesis cut before the premise'),
    # core/finetune_data.py: labels in every accepted form, the columns, the held-out split
    ('core/finetune_data.py', "return int(v == 'true')",
     "return int(v == 'false')", 'boolean labels inverted'),
    ('core/finetune_data.py', 'return lowered.index(v) if v in lowered else None',
     'return lowered.index(v) + 1 if v in lowered else None', 'label names mapped one id off'),
    ('core/finetune_data.py', 'if isinstance(value, float) and value.is_integer():',
     'if False:', 'a float label (1.0 from a parquet column) not read as its class'),
    ('core/finetune_data.py', 'v = str(value).strip().lower()',
     'v = str(value).strip()', 'label names read case-sensitively'),
    ('core/finetune_data.py', "return ['sentence1', 'sentence2'], 'gold_label'",
     "return ['sentence2', 'sentence1'], 'gold_label'", "XNLI's premise and hypothesis swapped"),
    ('core/finetune_data.py', "rows = [(where, row) for where, row in rows if row.get('language') == language]",
     'rows = [(where, row) for where, row in rows]', '--language ignored: every language trains'),
    ('core/finetune_data.py', 'n_valid = max(1, len(train) // 10)',
     'n_valid = max(1, len(train) // 5)', 'a fifth held out for validation, not a tenth'),
    ('core/finetune_data.py', 'random.Random(args.seed).shuffle(order)',
     'random.Random(0).shuffle(order)', 'the held-out split ignores --seed'),
    ('core/finetune_data.py', 'num_classes = len(LABELS) if words or not ids else max(2, max(ids) + 1)',
     'num_classes = len(LABELS) if words or not ids else max(ids)', 'one class too few for numeric labels'),
    ('core/finetune_data.py', 'return list(LABELS) if num_classes == len(LABELS) else [str(i) for i in range(num_classes)]',
     'return list(LABELS)', "another class count named as XNLI's three"),
    # core/tokenizer.py: what is encoded and decoded, per kind
    ('core/tokenizer.py', 'return self.enc.encode_ordinary(text)',
     "return self.enc.encode(text, allowed_special='all')", "'<|endoftext|>' inside a text encoded as the special token"),
    ('core/tokenizer.py', 'return self.tok.decode(list(ids), skip_special_tokens=False)',
     'return self.tok.decode(list(ids))', 'special tokens dropped on decode'),
    ('core/tokenizer.py', 'return self.tok.encode(text, add_special_tokens=False).ids',
     'return self.tok.encode(text).ids', "a post-processor's [CLS] / [SEP] added to every text"),
    ('core/tokenizer.py', 'HF_EOT_TOKENS = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "[EOS]")',
     'HF_EOT_TOKENS = ("<|endoftext|>", "[SEP]", "</s>", "<eos>", "[EOS]")', '[SEP] preferred over </s> as end of text'),
    ('core/tokenizer.py', 'return {"token_kind": "char", "chars": sorted(set(text))}',
     'return {"token_kind": "char", "chars": list(dict.fromkeys(text))}', "char ids in order of appearance, not sorted (nanoGPT's)"),
    ('core/tokenizer.py', 'self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)',
     'self.vocab_size = self.tok.get_vocab_size(with_added_tokens=False)', 'added tokens left out of the vocabulary size'),
    ('core/tokenizer.py', 'tok.decoder = decoders.Fuse()',
     'tok.decoder = None', 'the char export decodes with spaces between characters'),
    ('core/tokenizer.py', 'moved = [b for b in range(256) if b not in keep]',
     'moved = [b for b in reversed(range(256)) if b not in keep]', "GPT-2's byte alphabet moved in the wrong order"),
    ('core/tokenizer.py', 'tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)',
     'tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)', 'a space put before every text'),
    # core/hf.py: each field of the Hugging Face export, the zero biases, the reader's table
    ('core/hf.py', "'n_inner': None if config.n_hidden == 4 * config.n_embd else config.n_hidden,",
     "'n_inner': None,", "another MLP width exported as GPT-2's 4x"),
    ('core/hf.py', "'activation_function': 'gelu_new' if config.activation == 'gelu_tanh' else 'gelu',",
     "'activation_function': 'gelu_new',", 'an exact-GELU model exported as tanh GELU'),
    ('core/hf.py', "'resid_pdrop': config.dropout,",
     "'resid_pdrop': 0.0,", "the run's dropout not exported"),
    ('core/hf.py', "'n_positions': config.block_size,",
     "'n_positions': 1024,", "the context length exported as GPT-2's"),
    ('core/hf.py', "'temperature': 0.8, 'top_k': 200}",
     "'temperature': 1.0, 'top_k': 50}", "pipeline() samples with transformers' defaults, not nanoGPT's"),
    ('core/hf.py', "zeros = {k[:-len('weight')] + 'bias': v.new_zeros(v.shape[0])",
     "zeros = {k[:-len('weight')] + 'bias': v.new_ones(v.shape[0])", 'a model without biases exported with biases of one'),
    ('core/hf.py', "if any(v.any() for k, v in state_dict.items() if k.endswith('.bias')):",
     'if True:', 'a directory of zero biases read back with biases'),
    ('core/hf.py', "if any(v.any() for k, v in state_dict.items() if k.endswith('.bias')):",
     "if any(v.all() for k, v in state_dict.items() if k.endswith('.bias')):", 'real biases dropped unless every entry is nonzero'),
    ('core/hf.py', "'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh'}",
     "'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh'}", "GPT-2's own gelu_new read as the exact GELU"),
    ('core/hf.py', "n_inner = cfg.get('n_inner') or 4 * cfg['n_embd']",
     "n_inner = 4 * cfg['n_embd']", 'n_inner ignored on reading'),
    ('core/hf.py', "dropout=float(cfg.get('resid_pdrop', 0.0)))",
     'dropout=0.0)', "the directory's dropout not read"),
    # core/nanogpt.py: what nanoGPT's train.py and sample.py read from our ckpt.pt and meta.pkl
    ('core/nanogpt.py', 'for params, decay in zip(standard.optimizer_groups(), (weight_decay, 0.0)):',
     'for params, decay in zip(standard.optimizer_groups(), (weight_decay, weight_decay)):', 'the no-decay group exported with decay'),
    ('core/nanogpt.py', "groups.append({'lr': learning_rate, 'betas': betas,",
     "groups.append({'lr': learning_rate, 'betas': (0.9, 0.999),", "the exported optimizer groups carry torch's betas, not nanoGPT's"),
    ('core/nanogpt.py', "meta = {'vocab_size': len(tokenizer['chars']), 'itos': dict(enumerate(tokenizer['chars'])),",
     "meta = {'vocab_size': len(tokenizer['chars']), 'itos': dict(enumerate(sorted(tokenizer['chars'], reverse=True))),", "meta.pkl's itos in another order"),
    ('core/nanogpt.py', "'best_val_loss': float(best_val_loss) if best_val_loss is not None else 1e9,",
     "'best_val_loss': 1e9,", 'best_val_loss not exported'),
    ('core/nanogpt.py', "'iter_num': int(step),",
     "'iter_num': 0,", 'the step not exported: nanoGPT resumes at 0'),
    ('core/nanogpt.py', 'state[position + i] = moments',
     'state[i] = moments', "the second group's moments exported at the first group's positions"),
    ('core/nanogpt.py', "'model_args': {f: getattr(config, f) for f in NANOGPT_ARGS},",
     "'model_args': {f: getattr(config, f) for f in NANOGPT_ARGS if f != 'dropout'},", 'dropout left out of model_args'),
    ('core/nanogpt.py', "step = int(ck.get('iter_num', ck.get('step', 0)))",
     "step = int(ck.get('step', 0))", "nanoGPT's iter_num not read"),
    # model.py: the modded half: logit cap, attention scale, skips, value embeddings, rotary, LoRA scale, known heads
    ('model.py', "LOGIT_CAPS = {'small': lambda z, dim: 30 * torch.sigmoid(z / (7.5 * dim ** 0.5)),",
     "LOGIT_CAPS = {'small': lambda z, dim: 30 * torch.sigmoid(z / (15 * dim ** 0.5)),", "the small logit cap's scale doubled"),
    ('model.py', "LOGIT_CAPS = {'small': lambda z, dim: 30 * torch.sigmoid(z / (7.5 * dim ** 0.5)),",
     "LOGIT_CAPS = {'small': lambda z, dim: 15 * torch.sigmoid(z / (7.5 * dim ** 0.5)),", 'the small logit cap at 15, not 30'),
    ('model.py', 'self.rank, self.alpha, self.scale = rank, alpha, alpha / rank',
     'self.rank, self.alpha, self.scale = rank, alpha, alpha / rank ** 0.5', 'modded LoRA scaled by alpha / sqrt(r)'),
    ('model.py', 'ATTENTION_SCALE = 0.12',
     'ATTENTION_SCALE = 0.125', "softmax scale 1/sqrt(64), not modded's 0.12"),
    ('model.py', 'MEDIUM_SKIPS = {9: 6, 10: 4, 11: 2}',
     'MEDIUM_SKIPS = {9: 6, 10: 4, 11: 3}', 'one medium skip from the wrong block'),
    ('model.py', 'x = x + skip_w[i - n] * outputs[2 * n - 1 - i]',
     'x = x + skip_w[i - n] * outputs[2 * n - 2 - i]', 'the U-net pairs one layer off'),
    ('model.py', 've = ve + [None] * (L - 6) + ve',
     've = ve + [None] * (L - 6) + ve[::-1]', 'the last value embeddings in reverse order'),
    ('model.py', 'v = lambdas[0] * v + lambdas[1] * ve.view_as(v) if ve is not None else lambdas[0] * v',
     'v = lambdas[0] * v + lambdas[1] * ve.view_as(v) if ve is not None else v', 'the attention lambda skipped where there is no value embedding'),
    ('model.py', 'x = lambdas[i][0] * x + lambdas[i][1] * x0',
     'x = lambdas[i][0] * x + lambdas[i][0] * x0', 'the block lambda of x0 is the one of x'),
    ('model.py', 'freq = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4',
     'freq = (1 / 10000) ** torch.linspace(0, 1, steps=head_dim // 4', "rotary base 10000, not modded's 1024"),
    ('model.py', 'return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x)',
     'return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)', 'rotary rotates the other way'),
    ('model.py', 'x = x + F.linear(F.relu(F.linear(rms_norm(x), fc.type_as(x))).square(), proj.type_as(x))',
     'x = x + F.linear(F.relu(F.linear(rms_norm(x), fc.type_as(x))), proj.type_as(x))', 'ReLU, not ReLU squared'),
    ('model.py', 'if norm_v:',
     'if not norm_v:', 'v normed under the small rules, not the medium ones'),
    ('model.py', 'return weight + self.delta().to(weight.dtype)',
     'return weight + self.delta().to(weight.dtype) * 0.5', 'the modded LoRA update applied at half strength'),
    ('model.py', 'merged[key] = (original.float() + plist[0].delta().float()).to(original.dtype)',
     'merged[key] = original', 'a modded LoRA run saved without its update'),
    ('model.py', '(12, 768): 6,',
     '(12, 768): 12,', 'the known head count of a GPT-2-small-sized modded model'),
    ('model.py', '(16, 1024): 8,',
     '(16, 1024): 16,', 'the known head count of the medium model'),
    ('model.py', '(24, 1152): 18,',
     '(24, 1152): 9,', "large-lite's head count guessed from 128-wide heads"),
    ('model.py', '(36, 1280): 20}',
     '(36, 1280): 10}', 'the known head count of the 36-layer model'),
    # load_checkpoint_helper.py: what a modded checkpoint is said to be, and how it is loaded
    ('load_checkpoint_helper.py', 'if padding.numel() and not torch.all(padding == 1.0):',
     'if False:', "scalars padding that is not the script's ones accepted"),
    ('load_checkpoint_helper.py', 'if scalars.numel() < used:',
     'if scalars.numel() < used - 10:', 'a short scalars vector accepted'),
    ('load_checkpoint_helper.py', "sd['scalars'] = scalars[:used]",
     "sd['scalars'] = scalars[-used:]", 'the scalars taken from the padded end'),
    ('load_checkpoint_helper.py', 'if num_heads is None and (num_layers, model_dim) in KNOWN_HEADS:',
     'if (num_layers, model_dim) in KNOWN_HEADS:', 'the table overrides the head count the user gave'),
    ('load_checkpoint_helper.py', "fmt = 'large-lite' if layout == 'medium' and head_dim not in (None, 128) else layout",
     "fmt = 'large-lite' if layout == 'medium' and head_dim not in (None, 64) else layout", 'medium and large-lite named the other way round'),
    ('load_checkpoint_helper.py', 'model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)',
     'model.load_state_dict(sd, strict=True, assign=True)', 'bf16 weights kept in bf16 for fine-tuning'),
    ('load_checkpoint_helper.py', 'val_loss=float(val_loss) if val_loss is not None else None,',
     'val_loss=None,', "the file's val_loss not reported"),
    ('load_checkpoint_helper.py', 'head_dim = hdim // num_heads if num_heads and hdim % num_heads == 0 else None',
     'head_dim = 128 if num_heads else None', 'the head size assumed 128'),
    ('load_checkpoint_helper.py', "attn_layers = sorted(int(k.split('.')[1]) for k in sd if k.endswith(f'.attn.{qkv}'))",
     "attn_layers = sorted(int(k.split('.')[1]) for k in sd if k.endswith('.attn.qkv_w'))", "the medium layout's attention layers not found"),
    # test_checkpoint_loading.py: the tool's verdict on a modded checkpoint
    ('test_checkpoint_loading.py', 'if pad_diff > FEATURE_TOLERANCE:',
     'if False:', 'a model that padding changes passes the check'),
    ('test_checkpoint_loading.py', 'if tuple(features.shape) != expected or not torch.isfinite(features).all():',
     'if tuple(features.shape) != expected:', 'NaN features pass the check'),
    ('test_checkpoint_loading.py', 'if tuple(features.shape) != expected or not torch.isfinite(features).all():',
     'if not torch.isfinite(features).all():', 'features of the wrong shape pass the check'),
    ('test_checkpoint_loading.py', 'lengths = [16, 9]',
     'lengths = [16, 16]', 'the padding check runs on unpadded rows'),
    ('test_checkpoint_loading.py', "if info['layout'] == 'small': # the conversion must compute",
     'if False: # the conversion must compute', 'the small conversion never compared with the small model'),
    ('test_checkpoint_loading.py', 'return flex, (flex.forward_features(idx) - converted).abs().max().item()',
     'return flex, 0.0', "the conversion's difference reported as 0"),
    ('test_checkpoint_loading.py', '--n_layer {info[\'num_layers\']} --n_head {info[\'num_heads\']} "',
     '--n_layer {info[\'num_heads\']} --n_head {info[\'num_layers\']} "', 'the fine-tuning flags it prints swapped'),
    # generate.py: every sampling option reaches the sampler
    ('generate.py', 'temperature=args.temperature, top_k=args.top_k,',
     'temperature=1.0, top_k=args.top_k,', '--temperature ignored'),
    ('generate.py', 'temperature=args.temperature, top_k=args.top_k,',
     'temperature=args.temperature, top_k=None,', '--top_k ignored'),
    ('generate.py', 'y = model.generate(x, args.max_new_tokens,',
     'y = model.generate(x, args.max_new_tokens - 1,', 'one token fewer than asked'),
    ('generate.py', 'vocab_size=tokenizer.vocab_size)',
     'vocab_size=None)', "a padded vocabulary's rows sampled"),
    ('generate.py', 'torch.manual_seed(args.seed)',
     'torch.manual_seed(1337)', '--seed ignored'),
    ('generate.py', 'for _ in range(args.num_samples):',
     'for _ in range(1):', '--num_samples ignored'),
    ('generate.py', 'start_ids = tokenizer.encode(start) or',
     'start_ids = tokenizer.encode(start)[1:] or', "the prompt's first token dropped"),
    ('generate.py', 'print(tokenizer.decode(y[0].tolist()))',
     'print(tokenizer.decode(y[0, x.size(1):].tolist()))', 'samples printed without their prompt (nanoGPT prints it)'),
    ('generate.py', "path = start[len('FILE:'):]",
     "path = start[len('FILE'):]", 'FILE: prompts read from the wrong path'),
    # sample.py: nanoGPT's defaults and spellings
    ('sample.py', 'num_samples=10,',
     'num_samples=3,', "nanoGPT's default of 10 samples"),
    ('sample.py', 'temperature=0.8, # 1.0 = no change',
     'temperature=1.0, # 1.0 = no change', "nanoGPT's default temperature 0.8"),
    ('sample.py', 'top_k=200, # retain only',
     'top_k=5, # retain only', "nanoGPT's default top_k 200"),
    ('sample.py', 'seed=1337,',
     'seed=0,', "nanoGPT's default seed"),
    ('sample.py', "start='\\n', # or",
     "start='a', # or", "nanoGPT's default prompt, a newline"),
    ('sample.py', "out_dir='out',",
     "out_dir='out-sample',", "nanoGPT's default out_dir"),
    ('sample.py', "where = (args.out_dir if args.init_from == 'resume' else",
     "where = (args.out_dir if args.init_from != 'gpt2' else", 'init_from=PATH reads out_dir instead'),
    ('sample.py', 'generate.main(argparse.Namespace(**vars(args), path=None, checkpoint=where,',
     'generate.main(argparse.Namespace(**vars(args), path=None, checkpoint=args.out_dir,', 'init_from ignored'),
    # configurator.py: how typed text becomes a config value
    ('configurator.py', 'if type(current) is float and type(value) is int:',
     'if False:', '--learning_rate 1 refused for a float key'),
    ('configurator.py', 'if type(value) is not type(current):',
     'if not isinstance(value, type(current)):', 'True accepted for an int key'),
    ('configurator.py', 'if isinstance(current, str):',
     'if False:', "a str key's text read as a Python literal"),
    ('configurator.py', "raw = 'True'  # bare",
     "raw = 'False'  # bare", 'a bare --flag switches the bool off'),
    ('configurator.py', "and not (is_bool and argv[i].endswith('.py'))",
     '', 'a bare --flag before a config file eats the file'),
    ('configurator.py', "if os.environ.get('RANK', '0') == '0':",
     'if True:', 'every torchrun process prints the overrides'),
    ('configurator.py', 'given.update(k for k in assigned_names(src) if k in keys)',
     'given.update(())', 'keys a config file sets not counted as given'),
    ('configurator.py', 'close = difflib.get_close_matches(key, sorted(keys), n=3)',
     'close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.99)', "no 'did you mean' for a typo"),
    ('configurator.py', 'seed = {k: config[k] for k in keys}',
     'seed = {}', 'a config file cannot build on the current values'),
    # data/prepare.py: every row of the table, the split, the files
    ('data/prepare.py', '"pydocs": ("pydocs", "gpt2"),',
     '"pydocs": ("pydocs", "char"),', 'pydocs prepared char-level, not GPT-2 BPE'),
    ('data/prepare.py', '"pydocs_char": ("pydocs", "char"),',
     '"pydocs_char": ("pydocs", "gpt2"),', 'pydocs_char prepared with GPT-2 BPE'),
    ('data/prepare.py', '"shakespeare_char": ("shakespeare", "char"),',
     '"shakespeare_char": ("shakespeare", "gpt2"),', 'shakespeare_char prepared with GPT-2 BPE'),
    ('data/prepare.py', '"shakespeare": ("shakespeare", "gpt2"),',
     '"shakespeare": ("shakespeare", "char"),', 'shakespeare prepared char-level'),
    ('data/prepare.py', 'split = int(n * (1 - val_fraction))',
     'split = int(n * val_fraction)', 'train and val sizes swapped'),
    ('data/prepare.py', 'enc.encode(text[split:])',
     'enc.encode(text[split + 1:])', 'a character lost between train and val'),
    ('data/prepare.py', 'tokenizer = tokenizer or DATASETS.get(dataset, (None, "char"))[1]',
     'tokenizer = DATASETS.get(dataset, (None, "char"))[1]', '--tokenizer ignored'),
    ('data/prepare.py', 'data = np.array(ids, dtype=np.uint16).data',
     'data = np.array(ids, dtype=np.int32).data', 'train.bin not uint16, as nanoGPT reads it'),
    ('data/prepare.py', 'return "\\n".join(topics[key] for key in sorted(topics))',
     'return "\\n".join(topics.values())', 'the pydocs corpus in dict order',
     "pydoc_data.topics is a dict literal already in sorted key order (CPython 3.11): the sort keeps the corpus the "
     'same on a Python that writes it otherwise'),
    ('data/prepare.py', '"train_tokens": len(train_ids), "val_tokens": len(val_ids)}',
     '"train_tokens": len(val_ids), "val_tokens": len(train_ids)}', "meta.json's token counts swapped"),
    ('core/commit.py', "raise CheckpointError(f'{path} is not a PyTorch checkpoint: {what_file_holds(path)}') from None",
     "raise CheckpointError(f'{path} is not a PyTorch checkpoint: {e}') from None",
     "a text file passed as a checkpoint named by torch's pickle opcode, not its first bytes"),
    # core/args.py: how a bad option ends
    ('core/args.py', "self.exit(1, f'{self.prog}: error:", "self.exit(2, f'{self.prog}: error:", "argparse's exit code 2, not 1"),
    ('core/args.py', "super().__init__(*args, allow_abbrev=False, **kwargs)", "super().__init__(*args, **kwargs)",
     "--num_epoch taken as --num_epochs"),
    ('core/args.py', "difflib.get_close_matches(flag.split('=')[0], options, n=1)]", "difflib.get_close_matches(flag, [], n=1)]",
     "no near option named for a misspelt one"),
    ('core/args.py', "if value < minimum:", "if value < minimum - 1:", "a number one below the least accepted"),
    # core/checkpoint.py: --meta, for every kind
    ('core/checkpoint.py', 'if meta_path: # a vocabulary named on the command line wins, whatever the checkpoint stores',
     'if False:', '--meta ignored'),
    ('core/checkpoint.py', 'if meta_path: # a vocabulary named on the command line wins, whatever the checkpoint stores',
     'if meta_path and ck.tokenizer is None:', '--meta ignored where the checkpoint stores a vocabulary'),
    ('sample.py', "    meta=None, # a vocabulary", "    # a vocabulary", "sample.py has no --meta"),
    # core/peft_adapter.py: more of peft's layout
    ('core/peft_adapter.py', "'r': r, 'lora_alpha': config.lora_alpha,",
     "'r': r, 'lora_alpha': float(r),", 'the exported lora_alpha is r'),
    ('core/peft_adapter.py', 'if ranks[field] not in (0, r)}',
     'if ranks[field] not in (0,)}', 'rank_pattern lists every module'),
    ('core/peft_adapter.py', "ranks = {(v.shape[1] if field == 'embedding_rank' else v.shape[0]) for v in found.values()}",
     'ranks = {v.shape[0] for v in found.values()}', "an embedding adapter's rank read as the vocabulary size"),
    # train.py: under torchrun: tokens per step, which process logs and saves, whose batches
    ('train.py', 'gradient_accumulation_steps //= ddp_world_size',
     'gradient_accumulation_steps //= 1', "every process runs all the config's micro-steps: a step trains on world_size x the tokens"),
    ('train.py', 'if gradient_accumulation_steps % ddp_world_size == 0:',
     'if gradient_accumulation_steps >= ddp_world_size:', 'an accumulation that does not divide is cut down'),
    ('train.py', 'tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size',
     'tokens_per_iter = gradient_accumulation_steps * batch_size * block_size', 'tokens per iteration reported for one process'),
    ('train.py', 'elif master_process: # ...and where they do not divide',
     'elif True: # ...and where they do not divide', 'every process prints the note'),
    ('train.py', 'master_process = ddp_rank == 0 # this process',
     'master_process = True # this process', 'every process saves'),
    ('train.py', 'seed_offset = ddp_rank # each process gets a different seed',
     'seed_offset = 0 # each process gets a different seed', 'every process trains on the same batches'),
    ('train.py', "log = print if os.environ.get('RANK', '0') == '0' else (lambda *args: None)",
     'log = print', 'every process logs'),
    # generative fine-tuning (issue 25): the loss, the schedule, the step, best/, the results
    ('finetune_xlsum.py', 'logits, labels = logits[:, :-1], labels[:, 1:]',
     'logits, labels = logits[:, 1:], labels[:, :-1]', 'the loss shifted the wrong way'),
    ('finetune_xlsum.py', 'if shifted:', 'if False:', "the fork's unshifted loss"),
    ('finetune_xlsum.py', "return total, (labels != -100).sum()", "return total, torch.tensor(labels.numel())",
     'the mean over every position, prompt and padding too'),
    ('finetune_xlsum.py', 'return step / max(1, warmup_steps)', 'return (step + 1) / max(1, warmup_steps)',
     'warmup one step ahead'),
    ('finetune_xlsum.py', 'return (total_steps - step) / max(1, total_steps - warmup_steps)',
     'return (total_steps - step) / max(1, total_steps)', 'the decay starts below the peak'),
    ('finetune_xlsum.py', 'total = math.ceil(steps_per_epoch * args.num_train_epochs)',
     'total = int(steps_per_epoch * args.num_train_epochs)', 'a fractional epoch rounded down'),
    ('finetune_xlsum.py', 'steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)',
     'steps_per_epoch = math.ceil(num_train / args.gradient_accumulation_steps)', 'steps counted in examples'),
    ('finetune_xlsum.py', 'batches = math.ceil(num_train / (args.per_device_batch_size * world))',
     'batches = math.ceil(num_train / args.per_device_batch_size)', 'steps counted as if one process ran'),
    ('finetune_xlsum.py', "if g['params']], betas=(0.9, 0.95))", "if g['params']], betas=(0.9, 0.999))",
     "AdamW's default betas, not the fork's"),
    ('finetune_xlsum.py', 'dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]',
     'dict(params=[p for p in params if p.dim() < 2], weight_decay=args.weight_decay)]', 'the scalars decay'),
    ('finetune_xlsum.py', 'loss = total / count.clamp(min=1) / (step_size or len(micro_batches))',
     'loss = total / count.clamp(min=1)', 'accumulated micro-batches summed, not averaged'),
    ('finetune_xlsum.py', 'train_step::dist.all_reduce(p.grad)', 'pass', 'torchrun: each process steps on its own gradient'),
    ('finetune_xlsum.py', 'mine = micro[rank * args.gradient_accumulation_steps:(rank + 1) * args.gradient_accumulation_steps]',
     'mine = micro[:args.gradient_accumulation_steps]', 'torchrun: every process trains on the first micro-batches'),
    ('finetune_xlsum.py', 'dist.all_reduce(every)', 'pass', "torchrun: the validation loss of process 0's share only"),
    ('finetune_xlsum.py', 'if max_grad_norm > 0:', 'if False:', 'no clipping'),
    ('finetune_xlsum.py', "is_best = best is None or loss < best['loss']", "is_best = best is None or loss > best['loss']",
     'best/ by the highest loss'),
    ('core/generative_models.py', "optimizer.load_state_dict(read_bundle_tensors(path, 'optimizer.pt'))", 'pass',
     'a resumed modded run starts a fresh optimizer'),
    ('finetune_xlsum.py', 'preds.append(tok.decode(ids[:ids.index(eos)] if eos in ids else ids))',
     'preds.append(tok.decode(ids))', 'predictions keep their EOS'),
    ('finetune_xlsum.py', "macro = {k: sum(r[k] for r in rows) / len(rows) for k in keys}",
     "macro = {k: sum(r[k] for r in rows) / max(total, 1) for k in keys}", 'the macro average divided by examples'),
    ('finetune_xlsum.py', "weighted = {k: sum(r[k] * r['num_examples'] for r in rows) / max(total, 1) for k in keys}",
     "weighted = {k: sum(r[k] for r in rows) / len(rows) for k in keys}", 'the weighted average unweighted'),
    ('finetune_xlsum.py', "if tok.vocab_size > rows:", "if False:",
     "a tokenizer larger than the checkpoint's vocabulary accepted"),
    ('finetune_xlsum.py', 'if args.size and SIZES[args.size] != got:', 'if False:', '--size not checked'),
    # core/generation_data.py: the fork's data, and the prompt that keeps its template
    ('core/generation_data.py', 'keep = room - len(head) - len(tail)', 'keep = room - len(head)',
     'the cut article leaves no room for the template\'s end'),
    ('core/generation_data.py', "return head + tok.encode(source)[:keep] + tail if keep > 0 else None",
     "return ids[:room]", "the fork's cut: Summary: lost"),
    ('core/generation_data.py', "target = tok.encode(pair['target'])[:settings['target_max_tokens']] + [eos]",
     "target = tok.encode(pair['target'])[:settings['target_max_tokens']]", 'no EOS after the target'),
    ('core/generation_data.py', "'labels': [-100] * len(prompt) + target,", "'labels': prompt + target,",
     'the prompt is trained on'),
    ('core/generation_data.py', 'for r in [random.Random(seed + i)]', 'for r in [random.Random(seed)]',
     'every language upsampled with one seed'),
    ('core/generation_data.py', 'return np.random.default_rng(seed).permutation(n).tolist()',
     'return np.random.RandomState(seed).permutation(n).tolist()', "not datasets' shuffle order"),
    ('core/generation_data.py', 'permutation(len(mine), seed + i)[:max(1, int(len(mine) * frac))]',
     'permutation(len(mine), seed + i)[:int(len(mine) * frac)]', 'a language can lose all its rows'),
    ('core/generation_data.py', "EOS_TOKENS = ('<|endoftext|>', '<|eot_id|>', '<eos>', '</s>')",
     "EOS_TOKENS = ('<|endoftext|>', '<|eot_id|>', '</s>', '<eos>')", "not the fork's EOS order"),
    ('core/generation_data.py', "differ = [k for k in PACK_SETTINGS if k in meta and meta[k] != settings[k]]",
     'differ = []', 'packs of other settings accepted'),
    # core/classifier.py: the fine-tuned modded bundles
    ('core/classifier.py', "model.load_state_dict(read_bundle_tensors(path, 'model.pt'))",
     "model.load_state_dict(read_bundle_tensors(path, 'model.pt'), strict=False)", 'a bundle that misfits its config loaded'),
    ('core/classifier.py', "lambda p: p if p.is_dir() and config_kind(p) == declared else None",
     "lambda p: p if p.is_dir() else None", 'every directory taken for a fine-tuned bundle'),
    # core/probe.py: every load proves itself
    ('core/probe.py', 'if not diff <= tolerance:  # NaN fails too', 'if False:', 'a mismatch passes'),
    ('core/probe.py', "next_log_probs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]",
     "next_log_probs = F.log_softmax(logits[:, 1:], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]",
     'the log-probabilities of the tokens each position sees'),
    ('core/probe.py', "ours = torch.cat([next_log_probs.flatten(), last.gather(-1, torch.tensor(probe['top_ids'])).flatten()])",
     "ours = torch.cat([next_log_probs.flatten(), last.topk(len(probe['top_ids'][0]), dim=-1).values.flatten()])",
     "the loaded model's own top logits compared, not the saved entries"),
    ('core/probe.py', "model.eval()", "pass", 'the probe measured in train mode (dropout)'),
    ('core/probe.py', 'if model.config.block_size < ids.size(1):', 'if False:', 'a cropped model run past its positions'),
    ('core/kind.py', 'if block_size is not None and block_size < model.config.block_size:', 'if False:',
     'the load not cropped to a smaller block_size'),
    ('core/kind.py', "report['probe'] = check_probe(model, self.probe(), f'{self.path} ({self.kind})', into, probe_check)",
     "report['probe'] = check_probe(model, None, f'{self.path} ({self.kind})', into, probe_check)",
     'the stored probe never run'),
    ('core/nanogpt.py', "**({'probe': ck['probe']} if isinstance(ck.get('probe'), dict) else {})}", '}',
     "a nanoGPT file's probe not read"),
    ('core/hf.py', "EXPORT_STATE = ('step', 'best_val_loss', 'val_loss', 'config', 'probe')",
     "EXPORT_STATE = ('step', 'best_val_loss', 'val_loss', 'config')", "a Hugging Face export's probe dropped"),
    # core/generative_models.py: the two families
    ('core/generative_models.py', "adapters = dict(attn_lora_rank=lora['rank'], mlp_lora_rank=lora['rank'], lora_alpha=lora['alpha']) if lora else {}",
     "adapters = dict(attn_lora_rank=lora['rank'], lora_alpha=lora['alpha']) if lora else {}", "our GPT's MLP without LoRA"),
    ('core/generative_models.py', 'apply_optimizer_state(model.gpt, optimizer, read_checkpoint(path).optimizer_state(model.gpt), fresh)',
     'pass', "our GPT resumes with a fresh optimizer"),
    ('core/generative_models.py', 'return self.gpt(idx, cache=cache, every_position=True)[0]',
     'return self.gpt(idx, cache=cache)[0]', "our GPT scored on its last position only"),
    ('core/generative_models.py', "return MODDED if any(k.endswith(('.attn.qkv_w', '.attn.qkvo_w')) for k in sd) else OUR_GPT",
     "return MODDED if any(k.endswith('.attn.qkvo_w') for k in sd) else OUR_GPT", 'a small-layout file taken for a GPT'),
    ('core/generative_models.py', "heads = args.n_head or (SIZES[args.size][1] if args.size else None)",
     'heads = args.n_head', "--size's head count not used"),
    ('core/generative_models.py', 'if lora and lora == saved and os.path.exists(os.path.join(path, \'adapter.pt\')):',
     'if False:', 'a modded LoRA run resumes with fresh factors'),
    # core/beam_search.py: the fork's search
    ('core/beam_search.py', 'candidates.sort(key=lambda c: c[0], reverse=True)',
     'candidates.sort(key=lambda c: c[0], reverse=False)', 'the worst beams kept'),
    ('core/beam_search.py', 'return eos_id is not None and len(tokens) > prompt_len and tokens[-1] == eos_id',
     'return eos_id is not None and tokens[-1] == eos_id', "a prompt ending in EOS is an ended beam"),
    ('core/beam_search.py', 'candidates.append((score, row, None))', 'pass', 'ended beams dropped'),
    ('core/beam_search.py', 'logits[:, vocab_size:] = -float(\'inf\')', 'logits[:, vocab_size + 1:] = -float(\'inf\')',
     'the first padding row generated'),
    ('core/beam_search.py', 'beam_search::cache.reorder(torch.tensor([row for _, row, _ in chosen], device=device))',
     'cache.reorder(torch.tensor([0 for _ in chosen], device=device))', "every beam continues the first one's keys"),
    # model.py: the cache and the LM heads
    ('model.py', 'mask = None if start == 0 or T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)',
     'mask = None if start == 0 or T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start - 1)',
     'a chunk after the cache sees one position too few'),
    ('model.py', "cos, sin = (t[None, start:start + x.size(1), None, :] for t in (self.cos, self.sin))",
     "cos, sin = (t[None, :x.size(1), None, :] for t in (self.cos, self.sin))", 'cached positions rotated as position 0'),
    ('model.py', 'cache.length += idx.size(1)', 'cache.length += 1', 'the modded cache moves one position per call'),
    ('model.py', "LOGIT_CAPS = {'small': lambda z, dim: 30 * torch.sigmoid(z / (7.5 * dim ** 0.5)),",
     "LOGIT_CAPS = {'small': lambda z, dim: 30 * torch.sigmoid(z / (7.5 * dim)),", 'the small cap scale'),
    ('model.py', "'medium': lambda z, dim: 15 * z * torch.rsqrt(z.square() + 225)}",
     "'medium': lambda z, dim: 15 * torch.tanh(z / 15)}", 'a tanh cap for the medium layout'),
    ('model.py', 'cache = None # the window slides: every position moves, so no cached key holds any more',
     'pass', 'the cache kept when the window slides'),
    ('model.py', "elif k == 'lm_head.weight':", "elif k == 'lm_head':", "the small layout's head not mapped"),
    # core/text_metrics.py
    ('core/text_metrics.py', "STEMMED_LANGUAGES = ('english',)", "STEMMED_LANGUAGES = ('english', 'spanish')",
     "Porter's English stemmer on Spanish"),
    ('core/text_metrics.py', "return unicodedata.category(ch)[0] in 'LMN'", "return unicodedata.category(ch)[0] in 'LN'",
     'a vowel sign or virama splits its word'),
    ('core/text_metrics.py', "scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)",
     "scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)", "the fork's ROUGE without its stemmer"),
    ('core/text_metrics.py', "stem=language.casefold() in STEMMED_LANGUAGES and not ipa)",
     "stem=language.casefold() in STEMMED_LANGUAGES)", 'IPA stemmed as English'),
    ('core/text_metrics.py', "totals[key] += scores[key].fmeasure", "totals[key] += scores[key].precision",
     'precision reported as F'),
]


def locate(mutant, root=REPO):
    """
    (the file's lines, the indexes of the lines that hold the mutant's text). 'name::text' looks only inside
    def name (up to the next line indented as little as the def), for a text that occurs in several functions.
    """
    scope, _, old = mutant[1].rpartition('::')
    lines = (root / mutant[0]).read_text().splitlines(keepends=True)
    start, end = 0, len(lines)
    if scope:
        defs = [i for i, line in enumerate(lines) if re.match(rf'\s*def {scope}\(', line)]
        if len(defs) != 1:
            return lines, []
        start, indent = defs[0], len(lines[defs[0]]) - len(lines[defs[0]].lstrip())
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent), len(lines))
    return lines, [i for i in range(start, end) if old in lines[i]]


def mutate(mutant, root):
    """ apply the mutant to the copy at root; False (stale) unless its text is on exactly one line """
    lines, found = locate(mutant, root)
    if len(found) != 1:
        return False
    old, new = mutant[1].rpartition('::')[2], mutant[2]
    lines[found[0]] = lines[found[0]].replace(old, new, 1)
    (root / mutant[0]).write_text(''.join(lines))
    return True


def make_copy(dest):
    """ the tracked files, the prepared data beside them, and ../shared (the tests look there for data) """
    files = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / 'main' / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / 'main' / name)
    for data in REPO.glob('data/*/*'):
        if data.suffix in ('.bin', '.json', '.txt') and not (dest / 'main' / data.relative_to(REPO)).exists():
            (dest / 'main' / data.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(data, dest / 'main' / data.relative_to(REPO))
    if (REPO.parent / 'shared').exists():
        os.symlink(REPO.parent / 'shared', dest / 'shared')
    return dest / 'main'


def run_tests(root, tests, timeout):
    """ (passed, seconds, last lines); a run past the timeout counts as failed (the mutant hangs something) """
    t0 = time.time()
    # one process (-n 0): with -x the first failing test ends the run, which pytest-xdist's workers would not
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-n', '0', '-p', 'no:cacheprovider', *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        return proc.returncode == 0, time.time() - t0, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        return False, time.time() - t0, [f'timed out after {timeout} s']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', default='', help='run the mutants whose file, line or description contains this')
    parser.add_argument('--list', action='store_true', help='list the mutants and whether each matches one line')
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if any(args.only in part for part in m)]
    if args.list:
        for i, m in enumerate(mutants):
            count = len(locate(m)[1])
            state = 'ok' if count == 1 else f'STALE ({count} matches)'
            print(f"{i:3d} {m[0]:<20} {state:<18} {m[3]}{'  [equivalent: ' + m[4] + ']' if len(m) > 4 else ''}")
        return

    results = [] # (mutant, result, seconds)
    with tempfile.TemporaryDirectory(prefix='mutants-') as tmp:
        # the unmutated tests must pass first, else every mutant would look killed; their time sets the timeouts
        baseline = {}
        for name in sorted({m[0] for m in mutants}):
            root = make_copy(Path(tmp) / 'baseline' / name.replace('/', '_'))
            passed, seconds, last = run_tests(root, TESTS[name], timeout=1800)
            if not passed:
                sys.exit(f'the tests for {name} fail without any mutant: {last}')
            baseline[name] = seconds
            print(f'baseline {name}: tests pass in {seconds:.0f} s', flush=True)
        for i, m in enumerate(mutants):
            file, what = m[0], m[3]
            root = make_copy(Path(tmp) / f'm{i}')
            if not mutate(m, root):
                results.append((m, 'stale', 0.0))
                print(f'{i:3d} stale     {file}: {what} (its text is not on exactly one line)', flush=True)
                continue
            passed, seconds, last = run_tests(root, TESTS[file], timeout=int(3 * baseline[file]) + 60)
            result = 'survived' if passed else 'killed'
            results.append((m, result, seconds))
            equivalent = '  [equivalent]' if len(m) > 4 else ''
            print(f'{i:3d} {result:<9} {file}: {what} ({seconds:.0f} s){equivalent}', flush=True)
            shutil.rmtree(root.parent, ignore_errors=True)

    print(f"\n{'file':<20} {'mutant':<62} {'result':<9}")
    for m, result, _ in results:
        print(f"{m[0]:<20} {m[3][:62]:<62} {result}{'  (equivalent: ' + m[4] + ')' if len(m) > 4 else ''}")
    real = [r for m, r, _ in results if len(m) == 4 and r != 'stale']
    equivalent = [(m, r) for m, r, _ in results if len(m) > 4]
    stale = [m for m, r, _ in results if r == 'stale']
    killed = real.count('killed')
    print(f'\n{len(results)} mutants: {killed} of {len(real)} killed ({100 * killed / max(len(real), 1):.0f}%), '
          f"{real.count('survived')} survived, {len(equivalent)} marked equivalent "
          f"({sum(r == 'killed' for _, r in equivalent)} of them killed), {len(stale)} stale")


if __name__ == '__main__':
    main()
