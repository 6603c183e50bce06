"""
The README and docs/*.md are executable: every shell command in their code blocks (```bash lines, and `$ command` lines in output
blocks) and every ```python snippet runs, in README order, in one scratch copy of the repository's tracked files, so a documented
command that does not run fails CI. Commands run as written, plus appended overrides that keep CI fast:
- train.py: max_iters and eval_interval (the config's values, read through configurator.apply_config) divided by
  SCALE, so chained runs keep their order (500 -> 10, then a resume to 800 -> 16), and a tiny model and batch;
- generate.py: one short sample;
- data/prepare.py on tiny Shakespeare: --input a local copy (../shared/data when present, else generated text).
The commands run offline (proxy variables point at a closed port), as the README promises they can.
A few commands are only parse-checked, each listed in PARSE_ONLY with the reason; `pip install` lines are taken as
done (this test runs in the installed environment). Where the README shows output after a `$ command` (or after a
snippet), its key lines must appear in the real output with numbers normalised; a command whose shown output is an
`error:` / `FAILED:` line must exit 1 with it. The counts of each kind are asserted, so no command falls through.
"""

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from configurator import apply_config
from tests.helpers import GPT2_BPE, REPO, SHARED, TIKTOKEN_CACHE, train_defaults

# read in this order, as one document: a page's commands may use what an earlier page's made
DOCUMENTS = ['README.md'] + [f'docs/{name}.md' for name in ('resume', 'tools', 'huggingface', 'finetuning', 'generation',
                                                            'reliability', 'scaling', 'performance', 'data', 'python_api',
                                                            'tests')]

SCALE = 50
TRAIN_SIZE = ['--eval_iters', '2', '--batch_size', '4', '--block_size', '32', '--n_layer', '2', '--n_embd', '64']
GENERATE_SIZE = ['--num_samples', '1', '--max_new_tokens', '20']
# commands (a prefix of the README's text) that are checked for parsing only, and why
PARSE_ONLY = {
    'python -m pytest': 'the test suite, which runs this test',
    'python test_checkpoint_compatibility.py': 'a test suite that python -m pytest runs (pytest.ini testpaths)',
    'torchrun --standalone --nproc_per_node=8 ': 'needs 8 GPUs',
    'torchrun --nproc_per_node=8 --nnodes=2 ': 'needs two GPU nodes',
    'python bench/bench_checkpoint.py --size gpt2': 'about 3 minutes; --size tiny runs the same code',
    'python bench/bench_checkpoint.py --size tiny': 'tests/test_bench.py runs it and checks every row',
    'python bench/bench_fsdp.py': 'tests/test_bench.py runs --size tiny --procs 2 and checks every row; gpt2 takes '
                                  'minutes',
    'python bench/plot_resume.py': 'tests/test_bench.py runs the same runs and asserts its claims (drawing them needs '
                                   'matplotlib, requirements-bench.txt)',
    'python bench/gpu_check.py --device cuda': 'needs a GPU; --device cpu runs the same script at tiny sizes',
    'python bench/bench_generation.py': 'about a minute of timings; tests/test_bench.py runs --size tiny and checks every '
                                        'row',
    'python bench/bench_finetune_lora.py': 'two 45-step fine-tunes of a 128-wide model (~30 s); its figures are '
                                           'timings, which vary by machine',
    'python train.py config/finetune_shakespeare': "downloads GPT-2 XL (6 GB); tests/test_gpt2_init.py runs both "
                                                   'configs on a tiny GPT-2 in a Hugging Face cache',
    'python finetune_hindi_xnli.py --dataset hindi_xnli --pretrained_ckpt_path best_state_step010000':
        "the users' GPT-2-small run on their own files; the next example runs the same script on generated ones",
}
# commands that need GPT-2 BPE (tiktoken's files): without them here, and offline, only parse-checked
NEEDS_GPT2_BPE = ('python data/prepare.py --dataset shakespeare --',)
EXPECTED = dict(run=59, parse_only=16, installed=4, snippets=7, expected_failures=3)
KEY_LINE = re.compile(r'^(Format:|resume check|=== |fault injection summary|fault class|Location:|Trained with adapters:|'
                      r'Optimizer state:|OK:|FAILED:|error:)|\|diff\||\|logits difference\||\|features difference\|')


def normalise(line):
    """ the words of a line: numbers and <...> reprs (OS error texts) replaced by placeholders """
    line = re.sub(r'<[^<>]*>', '<...>', line.strip())
    return re.sub(r'[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?', '#', line)


def readme_items():
    """ [(place, kind, text, shown output lines)] in DOCUMENTS order (place: 'file:line'); kind is 'bash', '$' or
    'python' """
    return [[f'{name}:{n}', *rest] for name in DOCUMENTS for n, *rest in document_items((REPO / name).read_text().splitlines())]


def document_items(lines):
    """ [(line number, kind, text, shown output lines)] of one document """
    items, i, snippet_end = [], 0, None
    while i < len(lines):
        fence = re.match(r'```(\w*)$', lines[i])
        if not fence:
            i += 1
            continue
        start = i + 1
        end = next(j for j in range(start, len(lines)) if lines[j].startswith('```'))
        lang, block = fence.group(1), lines[start:end]
        if lang == 'python':
            items.append([start, 'python', '\n'.join(block), []])
            snippet_end = end
        elif lang == 'bash' or any(l.startswith('$ ') for l in block):
            for n, text, shown in commands(block, start, lang == 'bash'):
                items.append([n, 'bash' if lang == 'bash' else '$', text, shown])
        elif snippet_end == i - 2:
            items[-1][3] = block  # the output shown right after a snippet
        i = end + 1
    return items


def commands(block, first_line, bash):
    """ (line number, command, shown output) of a block: every line of a bash block, `$ ` lines of an output block """
    j = 0
    while j < len(block):
        n, line = first_line + j + 1, block[j]
        j += 1
        if not (line.strip() and not line.lstrip().startswith('#') if bash else line.startswith('$ ')):
            continue
        text = line if bash else line[2:]
        while text.endswith('\\'):
            text, j = text[:-1] + ' ' + block[j].strip(), j + 1
        shown = []
        while not bash and j < len(block) and not block[j].startswith('$ '):
            shown, j = shown + [block[j]], j + 1
        yield n, text, shown


def chain(tokens):
    """ the commands of a `a && b && c` chain, as argument lists """
    pieces = [[]]
    for token in tokens:
        pieces.append([]) if token == '&&' else pieces[-1].append(token)
    return pieces


def train_config(args, scratch):
    """ the config a train.py command line gives, read the way train.py reads it """
    with contextlib.chdir(scratch), contextlib.redirect_stdout(io.StringIO()):
        return apply_config(train_defaults(), args)


def overrides(argv, scratch, tmp):
    """ the arguments appended to a command to keep CI fast (see the module docstring) """
    script = next((a for a in argv if a.endswith('.py')), '')
    args = argv[argv.index(script) + 1:] if script else []
    if script == 'train.py':
        config = train_config(args, scratch)
        return ['--max_iters', str(config['max_iters'] // SCALE),
                '--eval_interval', str(max(1, config['eval_interval'] // SCALE)), *TRAIN_SIZE]
    if script == 'generate.py':
        return GENERATE_SIZE
    if script == 'data/prepare.py' and 'shakespeare' in ' '.join(args):
        text = SHARED / 'data' / 'tinyshakespeare' / 'input.txt'
        if not text.is_file():
            text = tmp / 'input.txt'
            text.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n' * 2000)
        return ['--input', str(text)]
    return []


def parse_check(argv, scratch, env):
    """ a command that is not run: its script, config files and options exist and parse """
    if argv[:3] == ['python', '-m', 'pytest']:
        missing = [a for a in argv[3:] if not a.startswith('-') and not (scratch / a.split('::')[0]).exists()]
        assert not missing, f'no such test paths: {missing}'
        return
    if argv[0] == 'torchrun':
        from torch.distributed.run import get_args_parser
        parsed = get_args_parser().parse_args(argv[1:])
        script, args = parsed.training_script, parsed.training_script_args
    else:
        script, args = argv[1], argv[2:]
    assert (scratch / script).is_file(), f'{script} does not exist'
    if script == 'train.py':
        train_config(args, scratch)  # config files exist and parse, keys and types are known
    elif script == 'test_checkpoint_compatibility.py':
        assert script in (REPO / 'pytest.ini').read_text()
    else:
        usage = subprocess.run(['python', script, '--help'], cwd=scratch, env=env, capture_output=True, text=True)
        unknown = [a.split('=')[0] for a in args if a.startswith('--') and a.split('=')[0] not in usage.stdout]
        assert usage.returncode == 0 and not unknown, f'options not in {script} --help: {unknown}\n{usage.stdout}'


def check_shown(shown, out, expect_failure, code):
    """ problems: wrong exit code, or key lines of the shown output missing from the real output """
    problems = []
    if code != (1 if expect_failure else 0):
        problems.append(f'exit code {code}, expected {1 if expect_failure else 0}')
    real = {normalise(line) for line in out.splitlines()}
    missing = [line for line in shown if KEY_LINE.search(line) and normalise(line) not in real]
    if missing:
        problems.append('shown lines not in the output:\n    ' + '\n    '.join(missing))
    return problems


def scratch_copy(tmp, repo=REPO):
    """ the repository's tracked files, as they are in the working tree, copied to tmp/repo: what the README's commands
    left in the checkout (hf-model/, ckpt.pt, ...) stays out, so they run as on a fresh clone """
    files = subprocess.run(['git', 'ls-files', '-z', '--cached'], cwd=repo, capture_output=True, text=True,
                           check=True).stdout.split('\0')
    scratch = tmp / 'repo'
    for name in filter(None, files):
        if (repo / name).is_file(): # a tracked file deleted in the working tree stays out
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_bytes((repo / name).read_bytes())
    return scratch


def test_the_scratch_copy_holds_the_tracked_files_only(tmp_path):
    repo = tmp_path / 'checkout'
    (repo / 'core').mkdir(parents=True)
    (repo / 'core' / 'a.py').write_text('edited')
    (repo / 'gone.py').write_text('')
    subprocess.run(['git', 'init', '-q'], cwd=repo, check=True)
    subprocess.run(['git', 'add', 'core/a.py', 'gone.py'], cwd=repo, check=True)
    (repo / 'gone.py').unlink()
    (repo / 'hf-model').mkdir() # what a README command left behind, untracked and not ignored
    (repo / 'hf-model' / 'config.json').write_text('{}')
    (repo / 'ckpt.pt').write_text('')
    scratch = scratch_copy(tmp_path / 'copy', repo)
    assert sorted(str(p.relative_to(scratch)) for p in scratch.rglob('*') if p.is_file()) == ['core/a.py']
    assert (scratch / 'core' / 'a.py').read_text() == 'edited'


def offline_env():
    """ the user's environment, offline (downloads fail at once), the venv's python, pip and torchrun first """
    closed = 'http://127.0.0.1:9'
    env = {**os.environ, 'PATH': f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
           'http_proxy': closed, 'https_proxy': closed, 'HTTP_PROXY': closed, 'HTTPS_PROXY': closed,
           'no_proxy': '', 'NO_PROXY': '', 'HF_HUB_OFFLINE': '1',
           'OMP_NUM_THREADS': '1'}  # tiny models: one thread is faster, and far faster on a busy machine
    env.pop('PYTHONPATH', None)
    if GPT2_BPE:
        env['TIKTOKEN_CACHE_DIR'] = str(TIKTOKEN_CACHE)
    return env


def run_item(kind, text, expect_failure, scratch, env, counts, matched):
    """ run (or parse-check) one README item; returns (output, exit code of the last command run) """
    def run(argv, **kw):
        proc = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=300, **kw)
        return proc.stdout + proc.stderr, proc.returncode

    if kind == 'python':
        counts['snippets'] += 1
        return run([sys.executable, '-c', text], env={**env, 'PYTHONPATH': str(scratch)})
    tokens = shlex.split(text, comments=True)
    assert not {'|', '||', ';', '>', '<', '&'} & set(tokens), 'shell syntax other than && is not supported'
    out, code = '', 0
    for piece in chain(tokens):
        joined = shlex.join(piece)
        parse_only = next((p for p in PARSE_ONLY if joined.startswith(p)), None)
        if not GPT2_BPE and joined.startswith(NEEDS_GPT2_BPE):
            counts['without_gpt2_bpe'] += 1
            parse_check(piece, scratch, env)
            return 'not run: GPT-2 BPE is not available here', 'not run'
        if piece[0] == 'pip':
            counts['installed'] += 1
            assert piece[1:3] == ['install', '-r'] and (scratch / piece[3]).is_file(), joined
        elif parse_only:
            counts['parse_only'] += 1
            matched.add(parse_only)
            parse_check(piece, scratch, env)
        else:
            counts['run'] += 1
            more, code = run(piece + ([] if expect_failure else overrides(piece, scratch, scratch.parent)), env=env)
            out += more
            if code:
                break
    return out, code


def test_readme_commands_and_snippets_run_as_documented(tmp_path):
    scratch, env = scratch_copy(tmp_path), offline_env()
    counts, matched, failures, timings = dict(dict.fromkeys(EXPECTED, 0), without_gpt2_bpe=0), set(), [], []
    for n, kind, text, shown in readme_items():
        started = time.time()
        expect_failure = any(line.startswith(('error:', 'FAILED:')) for line in shown)
        counts['expected_failures'] += expect_failure
        try:
            out, code = run_item(kind, text, expect_failure, scratch, env, counts, matched)
        except (AssertionError, subprocess.SubprocessError, SystemExit, ValueError) as e:
            out, code = f'{type(e).__name__}: {e}', 'not checked'
        timings.append((time.time() - started, n))
        problems = [] if code == 'not run' else check_shown(shown, out, expect_failure, code)
        if problems:
            tail = '\n'.join(out.strip().splitlines()[-15:])
            failures.append(f'{n}: {text}\n  ' + '\n  '.join(problems) + f'\n  output (tail):\n{tail}\n')
    print(f'README: {counts}, {sum(t for t, _ in timings):.0f} s; slowest (s, line):',
          [(round(t), n) for t, n in sorted(timings, reverse=True)[:6]])
    assert not failures, f'{len(failures)} README items failed:\n\n' + '\n'.join(failures)
    assert matched == set(PARSE_ONLY), f'PARSE_ONLY entries not in the README: {set(PARSE_ONLY) - matched}'
    counts['run'] += counts.pop('without_gpt2_bpe') # counted as run: the count is of the documents' commands
    assert counts == EXPECTED, 'the README changed: check each new command runs here, then update EXPECTED'


def test_every_page_is_read_and_every_example_in_the_readme_tables_runs():
    assert sorted(DOCUMENTS[1:]) == sorted(f'docs/{p.name}' for p in (REPO / 'docs').glob('*.md'))
    run = {text for _, kind, text, _ in readme_items() if kind != 'python'}
    readme = (REPO / 'README.md').read_text()
    examples = re.findall(r'^\|[^|]*\|[^|]*\| `((?:python|torchrun) [^`]*)` \|$', readme, re.M)
    assert len(examples) >= 9 and not [e for e in examples if e not in run], [e for e in examples if e not in run]
