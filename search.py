"""ackd-search command line (the code lives in ackd_search/cli.py):

  python search.py --space spaces/digits.yaml               # run (or resume) the study the space file names
  python search.py export --space spaces/digits.yaml        # best trial -> studies/<name>-best.yaml
  python search.py train --config studies/<name>-best.yaml  # train it to the end, report test accuracy once
  python search.py dashboard --space spaces/digits.yaml     # optuna-dashboard on http://127.0.0.1:8080/
"""

import sys

from ackd_search.cli import main

if __name__ == "__main__":
    sys.exit(main())
