"""Synthetic tasks of the Mamba, Zoology and hybrid papers: generators with oracles, evaluators, the five
task models and a small training loop. The command line is `mambakit task NAME` (`mambakit.tasks.cli`)."""

from mambakit.tasks.base import IGNORE, TaskBatch, answer_accuracy, make_generator, sequence_accuracy
from mambakit.tasks.induction_heads import InductionHeads
from mambakit.tasks.models import MODEL_NAMES, LTIMamba1, build_task_model
from mambakit.tasks.mqar import MQAR
from mambakit.tasks.phonebook import Phonebook
from mambakit.tasks.selective_copying import SelectiveCopying

__all__ = [
    "IGNORE",
    "MODEL_NAMES",
    "MQAR",
    "InductionHeads",
    "LTIMamba1",
    "Phonebook",
    "SelectiveCopying",
    "TaskBatch",
    "answer_accuracy",
    "build_task_model",
    "make_generator",
    "sequence_accuracy",
]
