"""ackd-search command line (the code lives in ackd_search/cli.py; `search.py COMMAND --help` for the options):

  python search.py --space spaces/digits.yaml               # search: run (or resume) the study the space names
  python search.py confirm --space spaces/digits.yaml       # retrain the best configurations and baselines over seeds
  python search.py export --space spaces/digits.yaml        # confirmed winner -> studies/<name>-best.yaml
  python search.py train --config studies/<name>-best.yaml  # train it to the end, report test accuracy once
  python search.py report --space spaces/digits.yaml        # summary, plots, confirmation table, trials.csv
  python search.py dashboard --space spaces/digits.yaml     # optuna-dashboard on http://127.0.0.1:8080/
"""

import sys

from ackd_search.cli import main

if __name__ == "__main__":
    sys.exit(main())
