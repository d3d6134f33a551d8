"""`python -m softprompt.bench RESULTS_DIR CELL_JSON`: run one cell in this process (how the grid isolates cells).

An entry point of its own, because running `-m softprompt.bench.cell` imports that module twice (the
package imports it first) and Python warns about it in every cell's log.
"""

import sys

from .cell import main

sys.exit(main())
