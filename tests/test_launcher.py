"""
tests/launcher.py runs most of the suite's script starts as forks of a process that has imported torch. The tests
that use it are only as good as that fork is like a fresh `python`: here both run the same probe and must agree.
"""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.launcher import run_python

PROBE = '''
import atexit, json, os, sys, tempfile, threading, time
atexit.register(lambda: print('atexit ran', flush=True))
late = threading.Thread(target=lambda: (time.sleep(0.2), print('thread joined', flush=True)))
late.start()
print(json.dumps(dict(argv=sys.argv, name=__name__, cwd=os.getcwd(), path=sys.path[:2], probe=os.environ.get('PROBE'),
                      ours_loaded=[m for m in ('model', 'core.checkpoint', 'train') if m in sys.modules],
                      stdin=sys.stdin.read(), tmp=tempfile.gettempdir())))
import model # the repository is on the path given by PYTHONPATH
unclosed = open('unclosed.txt', 'w') # written out when the interpreter finalises the script's objects
unclosed.write('flushed at exit')
print('to stderr', file=sys.stderr)
how = sys.argv[1]
if how == 'error':
    raise ValueError('probe failed')
if how != 'ok':
    sys.exit(int(how) if how.isdigit() else how)
'''


@pytest.mark.parametrize('how', ['ok', '3', 'a message', 'error'])
def test_a_fork_of_the_launcher_behaves_like_a_fresh_python(tmp_path, how):
    (tmp_path / 'probe.py').write_text(PROBE)
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'PROBE': 'seen', 'TMPDIR': str(tmp_path)}
    fresh = subprocess.run([sys.executable, 'probe.py', how], cwd=tmp_path, env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
    forked = run_python(['probe.py', how], tmp_path, env)
    assert forked.returncode == fresh.returncode == {'ok': 0, '3': 3, 'a message': 1, 'error': 1}[how]
    assert forked.stdout == fresh.stdout and 'thread joined\natexit ran' in fresh.stdout, (forked.stdout, fresh.stdout)
    assert forked.stderr == fresh.stderr, (forked.stderr, fresh.stderr) # a traceback too, frame for frame
    assert ('Traceback' in forked.stderr) == ('Traceback' in fresh.stderr) == (how == 'error')
    assert (tmp_path / 'unclosed.txt').read_text() == 'flushed at exit'
    # and -c, as `python -c CODE ARGS` runs it
    code = 'import sys, os; print(sys.argv, sys.path[0], os.getcwd())'
    fresh = subprocess.run([sys.executable, '-c', code, how], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run_python(['-c', code, how], tmp_path, env).stdout == fresh.stdout


def test_a_run_past_its_timeout_is_killed(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(['-c', 'import time; print("started", flush=True); time.sleep(60)'], tmp_path, os.environ, timeout=1)
    assert run_python(['-c', 'print(1)'], tmp_path, os.environ).stdout == '1\n' # and the launcher goes on


def test_each_run_draws_its_own_random_numbers_and_startup_settings_are_honoured(tmp_path):
    # a script that forgets to seed must not look reproducible: torch and numpy start from fresh entropy each run
    draw = 'import numpy, torch; print(torch.rand(1).item(), numpy.random.rand())'
    draws = [run_python(['-c', draw], tmp_path, os.environ).stdout.split() for _ in range(3)]
    assert len({torch for torch, _ in draws}) == len({numpy for _, numpy in draws}) == 3, draws
    # what the interpreter reads at its start (here the hash seed) cannot change in a fork: a fresh process is used
    env = {**os.environ, 'PYTHONHASHSEED': '0'}
    hashed = 'print(hash("checkpoint"))'
    fresh = subprocess.run([sys.executable, '-c', hashed], env=env, capture_output=True, text=True).stdout
    assert run_python(['-c', hashed], tmp_path, env).stdout == fresh
    # and only those: a fork's parent is the server, a fresh process's is this one
    parent = 'import os; print(os.getppid())'
    assert run_python(['-c', parent], tmp_path, env).stdout == f'{os.getpid()}\n'
    set_by_a_compile = {**os.environ, 'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'inductor')}
    assert run_python(['-c', parent], tmp_path, set_by_a_compile).stdout != f'{os.getpid()}\n'
    set_by_importing_sklearn = {**os.environ, 'KMP_DUPLICATE_LIB_OK': 'True', 'KMP_INIT_AT_FORK': 'FALSE'} # as in the server
    assert run_python(['-c', parent], tmp_path, set_by_importing_sklearn).stdout != f'{os.getpid()}\n'
    other_threads = {**os.environ, 'MKL_NUM_THREADS': '3'}
    assert run_python(['-c', parent], tmp_path, other_threads).stdout == f'{os.getpid()}\n'


def test_a_script_that_does_not_compile_fails_as_in_a_fresh_python(tmp_path):
    (tmp_path / 'broken.py').write_text('def f(:\n')
    fresh = subprocess.run([sys.executable, 'broken.py'], cwd=tmp_path, capture_output=True, text=True)
    forked = run_python(['broken.py'], tmp_path, os.environ)
    assert forked.returncode == fresh.returncode == 1 and forked.stderr == fresh.stderr, (forked.stderr, fresh.stderr)
