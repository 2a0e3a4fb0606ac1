"""tshsr_train: the trainer of the tshsr library (``tshsr-train``, ``python train.py``) and the
evaluation command line (``tshsr-evaluate``, ``python -m tshsr.evaluate``).

The library (``tshsr``) does not depend on this package (only the ``python -m tshsr.evaluate``
shim hands over to it); the library holds the model, its loss and the
evaluation functions. Here live the settings and their flags (:mod:`.args`), the loop with its
checkpoints and resume (:mod:`.loop`, :mod:`.checkpoint`) and the command lines (:mod:`.cli`,
:mod:`.evaluate_cli`).
"""

from .args import TrainArgs, build_parser, parse_args
from .loop import TrainingDiverged, run

__all__ = ["TrainArgs", "TrainingDiverged", "build_parser", "parse_args", "run"]
