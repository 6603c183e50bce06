"""
pytest hooks: the fault-injection suite (tests/test_reliability.py) records each fault it tried, and the table
of faults per class, outcomes and data lost is printed at the end of the run.
"""

from collections import defaultdict

import pytest

FAULTS = defaultdict(lambda: {'tried': 0, 'outcomes': defaultdict(int), 'lost': 0})


@pytest.fixture
def record_fault():
    def record(fault_class, outcome, lost=False):
        entry = FAULTS[fault_class]
        entry['tried'] += 1
        entry['outcomes'][outcome] += 1
        entry['lost'] += int(lost)
    return record


def pytest_terminal_summary(terminalreporter):
    if not FAULTS:
        return
    write = terminalreporter.write_line
    write('')
    write('fault injection summary')
    write(f"{'fault class':<34} {'tried':>5}  {'data lost':>9}  outcomes")
    for name, entry in FAULTS.items():
        outcomes = ', '.join(f'{n} {what}' for what, n in sorted(entry['outcomes'].items()))
        write(f"{name:<34} {entry['tried']:>5}  {entry['lost']:>9}  {outcomes}")
    write(f"{'total':<34} {sum(e['tried'] for e in FAULTS.values()):>5}  {sum(e['lost'] for e in FAULTS.values()):>9}")
