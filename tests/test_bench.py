"""
The benchmark's --size tiny mode as a smoke test: it runs end to end and reports every measurement as a finite
ratio to a limit measured in the same run. No timing is asserted: timings belong to the benchmark's own output.
"""

import json
import math

from tests.helpers import run_script

EXPECTED_ROWS = ['bundle save', 'model save', 'LoRA merge', 'model load, warm', 'model load, cold', 'peak RSS growth',
                 'full resume', 'load_for_inference', 'modded small -> GPTBatched', 'LoRA train step',
                 'fine-tuning throughput', 'test_checkpoint_loading.py on it', "  finetune_hindi_xnli.py's load",
                 'probe forward, its share of the bundle save', 'probe forward, its share of the warm load']


def test_benchmark_tiny_runs_and_reports_ratios(tmp_path):
    code, out = run_script('bench/bench_checkpoint.py', '--size', 'tiny', '--json', tmp_path / 'bench.json', cwd=tmp_path)
    results = json.loads((tmp_path / 'bench.json').read_text())
    rows = {row['what']: row for row in results['rows']}
    for expected in EXPECTED_ROWS:
        row = next((r for what, r in rows.items() if what.startswith(expected)), None)
        assert row is not None, f'no {expected!r} row in {list(rows)}'
        assert row['value'] > 0 and row['limit'] > 0 and math.isfinite(row['ratio']), row
        assert expected in out # and it was printed
    assert results['model_bytes'] > 0 and results['optimizer_bytes'] > results['model_bytes'] # Adam: 2 moments


def test_fsdp_benchmark_tiny_runs_and_reports_every_row(tmp_path):
    code, out = run_script('bench/bench_fsdp.py', '--size', 'tiny', '--procs', '2', '--json', tmp_path / 'fsdp.json',
                           cwd=tmp_path)
    results = json.loads((tmp_path / 'fsdp.json').read_text())
    rows = {row['what']: row for row in results['rows']}
    assert sorted(rows) == ['load, rank-0 bundle', 'load, sharded', 'save, rank-0 bundle', 'save, sharded',
                            'save, sharded async: stall'], rows
    for row in rows.values():
        assert row['processes'] == 2 and row['seconds'] > 0 and math.isfinite(row['vs_bundle']) and row['peak_bytes'] >= 0
        assert row['what'] in out


def test_the_resume_pictures_claims_hold(tmp_path):
    # the numbers behind bench/plot_resume.py's picture (the README shows it): the same runs, without the drawing
    from bench.plot_resume import check_claims, collect
    claims = check_claims(collect(tmp_path))
    assert len(claims) == 8 and all(holds for _, holds, _ in claims), '\n'.join(map(str, claims))


GENERATION_ROWS = ['beam search without the cache', 'generative fine-tuning step', 'LoRA rank 4: trainable parameters',
                   'LoRA rank 4: generative step', 'LoRA rank 4: peak RSS growth']


def test_generation_benchmark_tiny_runs_and_reports_ratios(tmp_path):
    code, out = run_script('bench/bench_generation.py', '--size', 'tiny', '--json', tmp_path / 'generation.json',
                           cwd=tmp_path)
    results = json.loads((tmp_path / 'generation.json').read_text())
    whats = [row['what'] for row in results['rows']]
    assert len(whats) == len(GENERATION_ROWS) and all(map(str.startswith, whats, GENERATION_ROWS)), whats
    for row in results['rows']:
        assert row['value'] > 0 and row['limit'] > 0 and math.isfinite(row['ratio']), row
        assert row['what'] in out # and it was printed
    beam = results['beam'] # the cached search gave the cache-free one's sequences (else the benchmark exits non-zero)
    assert beam['same_sequences'] and 'same sequences' in out and len(beam['generated']) == beam['prompts']
    assert 0 < results['trainable']['lora'] < results['trainable']['full']
