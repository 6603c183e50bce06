"""
Mutation testing, our own (no dependency): each mutant changes one line of the checkpoint code the way a real
bug would (a flipped comparison, a dropped check, an off-by-one, a wrong scale), the tests that cover that file
run against it, and should fail: the mutant is "killed". One that survives is behaviour no test pins down.

$ python bench/mutants.py                   # every mutant: about 30 minutes on a 2-core CPU
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
    'model.py': ['tests/test_model.py', 'tests/test_checkpoint.py::test_fast_load_is_tied_trainable_and_exact',
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
                       'tests/test_checkpoint.py::test_the_lora_merge_overlapped_with_the_write_gives_the_same_bytes'],
    'core/peft_adapter.py': ['tests/test_peft.py'],
    'core/fsdp.py': ['tests/test_fsdp.py'],
    'test_checkpoint_loading.py': ['test_checkpoint_loading.py'],
    'core/bundle.py': ['tests/test_checkpoint.py', 'test_checkpoint_compatibility.py::test_optimizer_by_name'],
    'core/kind.py': ['tests/test_checkpoint.py', 'tests/test_peft.py'],
    'train.py': ['test_checkpoint_compatibility.py::test_same_config_resume_standard',
                 'tests/test_fsdp.py::test_it_resumes_on_another_number_of_processes'],
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
    ('core/kind.py', "return load_universal_state_dict(model, weights, lora_alpha=self.lora_alpha,",
     "return load_universal_state_dict(model, weights, lora_alpha=None,", "a legacy LoRA file's alpha ignored"),

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
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests]
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
