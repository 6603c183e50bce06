"""
Result tables printed at the end of a pytest run, by any test, under pytest-xdist or not.

A test asks for the `record_row` fixture and calls record_row(table, **columns): the row is appended as one JSON
line to <dir>/<table>.jsonl, where <dir> is a temporary directory the controlling process creates in
pytest_configure and names in os.environ['CHECKPOINT_TEST_TABLES'] (xdist's workers inherit the environment, and
appending one short line is atomic, so rows from every worker land in the same file). At the end of the run the
controller prints each table: its columns are the union of its rows' keys, in the order they first appear.
- rows with an 'order' key are printed sorted by it (workers finish in any order); the key itself is not shown;
- a table whose rows are {'row', 'column', 'cell'} is printed as a grid (row labels down, column labels across);
- a column named 'outcome' is counted under the table ("cells by outcome: 18 passed-this-way, ...").
Any table name works (a plain file name). The fault-injection suite (tests/test_reliability.py) records each fault
it tried through `record_fault`, and its table of faults per class, outcomes and data lost is printed in its own form.
"""

import json
import os
import shutil
import tempfile
from collections import defaultdict

import pytest

TABLES_ENV = 'CHECKPOINT_TEST_TABLES'


def is_controller(config):
    return not hasattr(config, 'workerinput') # an xdist worker has workerinput; the controller and a plain run don't


def pytest_configure(config):
    # tests/test_resume_matrix.py groups its cells for xdist's --dist loadgroup; declared here for runs without xdist
    config.addinivalue_line('markers', 'xdist_group(name): run these tests in one xdist worker (--dist loadgroup)')
    if not is_controller(config):
        # each of xdist's workers has a core: one thread, for its tests and the scripts they run (two threads a
        # worker on two cores spin-wait for each other, and the suite took 1.5x the CPU time)
        os.environ['OMP_NUM_THREADS'] = '1'
        import torch
        torch.set_num_threads(1)
    # the scripts the tests start keep their temporary files (torchrun's log folders, one per launch) in a folder
    # removed at the end; this process's own temporary root is read first and stays (pytest's tmp_path live there)
    tempfile.gettempdir()
    config._scratch_tmp, config._tmpdir_before = tempfile.mkdtemp(prefix='checkpoint-test-tmp-'), os.environ.get('TMPDIR')
    os.environ['TMPDIR'] = config._scratch_tmp
    if is_controller(config):
        config._checkpoint_tables = tempfile.mkdtemp(prefix='checkpoint-test-tables-')
        config._checkpoint_tables_before = os.environ.get(TABLES_ENV)
        os.environ[TABLES_ENV] = config._checkpoint_tables


# the longest tests (measured 70-320 s each, most of a minute or less) start first: xdist hands out tests in collection
# order, and one of these started late would finish alone, long after the other worker ran out of tests
LONGEST_FIRST = ('test_readme_commands_and_snippets_run_as_documented', 'test_kill_during_save_leaves_old_or_new_state',
                 'test_end_to_end_train_evaluate_and_resume')


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.name not in LONGEST_FIRST) # a stable sort: the rest keep their order


def pytest_unconfigure(config):
    shutil.rmtree(config._scratch_tmp, ignore_errors=True)
    if config._tmpdir_before is None:
        os.environ.pop('TMPDIR', None)
    else:
        os.environ['TMPDIR'] = config._tmpdir_before
    directory = getattr(config, '_checkpoint_tables', None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        before = config._checkpoint_tables_before
        if before is None:
            os.environ.pop(TABLES_ENV, None)
        else:
            os.environ[TABLES_ENV] = before


def append_row(table, **columns):
    """ one row of `table`, from any process of the run (a worker or the controller) """
    directory = os.environ.get(TABLES_ENV)
    if not directory or not os.path.isdir(directory):
        return # outside a pytest run with these hooks (e.g. a test module imported by hand): nothing to print
    if not table or os.sep in table or table.startswith('.'):
        raise ValueError(f'table name {table!r}: expected a plain file name')
    line = json.dumps(columns, default=str) + '\n'
    fd = os.open(os.path.join(directory, f'{table}.jsonl'), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode()) # one write of one line with O_APPEND: rows of concurrent workers never interleave
    finally:
        os.close(fd)


@pytest.fixture
def record_row():
    """ record_row(table, **columns): a row of a table printed at the end of the run """
    return append_row


@pytest.fixture
def record_fault():
    # `lost` has no default: each test says what it checked (the data that survived the fault, or the input a
    # tool refused), so the column counts findings, never an assumption
    def record(fault_class, outcome, *, lost):
        append_row('faults', order=0, fault_class=fault_class, outcome=outcome, lost=bool(lost))
    return record


def format_faults(rows):
    """ the fault-injection summary: per class, how many faults were tried, how much data was lost, the outcomes """
    table = defaultdict(lambda: {'tried': 0, 'outcomes': defaultdict(int), 'lost': 0})
    for row in rows:
        entry = table[row['fault_class']]
        entry['tried'] += 1
        entry['outcomes'][row['outcome']] += 1
        entry['lost'] += int(row['lost'])
    lines = ['fault injection summary', f"{'fault class':<34} {'tried':>5}  {'data lost':>9}  outcomes"]
    for name, entry in table.items():
        outcomes = ', '.join(f'{n} {what}' for what, n in sorted(entry['outcomes'].items()))
        lines.append(f"{name:<34} {entry['tried']:>5}  {entry['lost']:>9}  {outcomes}")
    return lines + [f"{'total':<34} {sum(e['tried'] for e in table.values()):>5}  "
                    f"{sum(e['lost'] for e in table.values()):>9}"]


def read_tables(directory):
    tables = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith('.jsonl'):
            with open(os.path.join(directory, name), encoding='utf-8') as f:
                tables[name[:-len('.jsonl')]] = [json.loads(line) for line in f if line.strip()]
    return tables


def format_table(rows):
    """ the lines of a plain-text table of dicts (columns in the order their keys first appear); a table whose
    rows are all {'row', 'column', 'cell'} is printed as a grid: one line per row label, one column per column label """
    if rows and all(set(row) == {'row', 'column', 'cell'} for row in rows):
        labels, columns = list(dict.fromkeys(r['row'] for r in rows)), list(dict.fromkeys(r['column'] for r in rows))
        grid = {(r['row'], r['column']): r['cell'] for r in rows}
        rows = [{'': label, **{c: grid.get((label, c), '') for c in columns}} for label in labels]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(c, '')) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: '  '.join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return [line(columns), line(['-' * w for w in widths])] + [line(r) for r in cells]


def pytest_terminal_summary(terminalreporter, config):
    directory = getattr(config, '_checkpoint_tables', None)
    if not directory or not is_controller(config) or not os.path.isdir(directory):
        return
    for table, rows in read_tables(directory).items():
        if not rows:
            continue
        if table == 'faults':
            terminalreporter.write_line('')
            for line in format_faults(rows):
                terminalreporter.write_line(line)
            continue
        terminalreporter.write_sep('=', f'{table} ({len(rows)} rows)')
        # rows that say where they belong ('order') are printed in that order, whichever worker finished first
        if all('order' in r for r in rows):
            rows = [{k: v for k, v in r.items() if k != 'order'} for r in sorted(rows, key=lambda r: r['order'])]
        for line in format_table(rows):
            terminalreporter.write_line(line)
        outcomes = {}
        for row in rows:
            if 'outcome' in row:
                outcomes[row['outcome']] = outcomes.get(row['outcome'], 0) + 1
        if outcomes: # a column named 'outcome' is counted
            terminalreporter.write_line('cells by outcome: ' + ', '.join(f'{n} {what}' for what, n in
                                        sorted(outcomes.items(), key=lambda kv: -kv[1])) + f' (total {len(rows)})')
